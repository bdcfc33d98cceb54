//! The admin API (`proxy.adminAddress`, loopback `:15000` by default):
//! read-only JSON about what meshd runs with — the config and the last
//! reload error, workloads, services with their endpoints' health,
//! certificates with their expiry — and the one write, the log level.
//! `meshd status` reads it and prints a summary.
//!
//! | path | |
//! |---|---|
//! | `GET /status` | everything below in one document |
//! | `GET /config` | the files last applied, reload generation and last error |
//! | `GET /services`, `/workloads`, `/certificates` | one part each |
//! | `GET /logging`, `PUT /logging?level=FILTER` | the log filter, e.g. `debug` or `info,meshd::proxy=debug` |
//! | `GET /graph?window=60s` | this node's dependency graph: workloads, edges with rates, errors, latency |

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use crate::{admin::StatusInputs, state::snapshot::Snapshot};

/// Changes the log filter at run time; installed by the binary.
pub struct LogControl {
    pub current: Mutex<String>,
    #[allow(clippy::type_complexity)]
    pub set: Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>,
}

static LOG: OnceLock<LogControl> = OnceLock::new();

/// Installs the log-level control (once, at start-up).
pub fn install_log_control(control: LogControl) {
    let _ = LOG.set(control);
}

/// Sets the log filter; returns the filter now in force.
pub fn set_log_level(filter: &str) -> Result<String, String> {
    let control = LOG
        .get()
        .ok_or("this process cannot change its log level")?;
    (control.set)(filter)?;
    *control.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
    tracing::info!(filter, "log level changed");
    Ok(filter.to_owned())
}

fn log_level() -> String {
    LOG.get().map_or_else(
        || "unknown".to_owned(),
        |c| c.current.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    )
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Answers one admin request: (status code, JSON).
/// `authorization` is the request's `Authorization` header, if any.
pub fn answer(
    inputs: &StatusInputs,
    method: &hyper::Method,
    path: &str,
    query: &str,
    authorization: Option<&[u8]>,
) -> (u16, Value) {
    let Some(proxy) = inputs.proxy.get() else {
        return (503, json!({ "error": "meshd is starting" }));
    };
    let mesh = proxy.snapshot.load_full();
    match (method.as_str(), path) {
        ("GET", "/status") => (
            200,
            json!({
                "node": &*mesh.config.node.name,
                "ready": inputs.ready.load(std::sync::atomic::Ordering::Acquire),
                "config": config(inputs, false),
                "services": services(&mesh),
                "workloads": workloads(&mesh),
                "certificates": certificates(inputs),
                "logLevel": log_level(),
            }),
        ),
        ("GET", "/config") => (200, config(inputs, true)),
        ("GET", "/services") => (200, services(&mesh)),
        ("GET", "/workloads") => (200, workloads(&mesh)),
        ("GET", "/certificates") => (200, certificates(inputs)),
        ("GET", "/logging") => (200, json!({ "level": log_level() })),
        ("GET", "/graph") => match graph_window(query) {
            Ok(window) => (200, graph(inputs, window)),
            Err(err) => (400, json!({ "error": err })),
        },
        ("PUT" | "POST", "/logging") => {
            let token = mesh.config.proxy.admin_token_file.as_deref();
            if let Err(refused) = authorized(token, authorization) {
                tracing::warn!(
                    reason = refused,
                    "admin API: a log level change was refused"
                );
                return (403, json!({ "error": refused }));
            }
            let level = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .map(|v| v.replace("%2C", ",").replace("%3D", "="));
            match level.map(|l| set_log_level(&l)) {
                Some(Ok(level)) => (200, json!({ "level": level })),
                Some(Err(err)) => (400, json!({ "error": err })),
                None => (400, json!({ "error": "give ?level=<filter>, e.g. debug" })),
            }
        }
        (
            _,
            "/status" | "/config" | "/services" | "/workloads" | "/certificates" | "/logging"
            | "/graph",
        ) => (405, json!({ "error": "method not allowed" })),
        _ => (
            404,
            json!({ "error": "not found", "paths": ["/status", "/config", "/services", "/workloads", "/certificates", "/logging", "/graph"] }),
        ),
    }
}

/// `?window=60s` (default 60s), 10s to an hour.
fn graph_window(query: &str) -> Result<Duration, String> {
    use crate::telemetry::graph::{MAX_WINDOW, SAMPLE_EVERY};
    let Some(value) = query.split('&').find_map(|kv| kv.strip_prefix("window=")) else {
        return Ok(Duration::from_secs(60));
    };
    let window = humantime::parse_duration(value).map_err(|e| format!("window: {e}"))?;
    if window < SAMPLE_EVERY || window > MAX_WINDOW {
        return Err(format!(
            "window: give {}s to {}s",
            SAMPLE_EVERY.as_secs(),
            MAX_WINDOW.as_secs()
        ));
    }
    Ok(window)
}

/// This node's dependency graph over `window`.
fn graph(inputs: &StatusInputs, window: Duration) -> Value {
    let now = crate::telemetry::graph::Sample::parse(&crate::telemetry::metrics::render(
        &inputs.registry,
    ));
    let graph = inputs
        .graph
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .graph(&now, window);
    serde_json::to_value(graph).unwrap_or(Value::Null)
}

/// Whether a change may be made: the request presents the token in
/// `token_file` as `Bearer <token>`. Without a token file no change may.
fn authorized(
    token_file: Option<&std::path::Path>,
    authorization: Option<&[u8]>,
) -> Result<(), &'static str> {
    let file =
        token_file.ok_or("changes need proxy.adminTokenFile set (the admin API is read-only)")?;
    let token = std::fs::read_to_string(file).map_err(|_| "the admin token file cannot be read")?;
    let token = token.trim();
    if token.is_empty() {
        return Err("the admin token file is empty");
    }
    let presented = authorization
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .ok_or("no Authorization: Bearer token")?;
    // Compared in full whatever the first difference, so timing tells nothing.
    let same = presented.len() == token.len()
        && presented
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err("wrong admin token")
    }
}

fn config(inputs: &StatusInputs, with_files: bool) -> Value {
    let state = inputs.reload.snapshot();
    let files: Vec<Value> = state
        .files
        .iter()
        .map(|(path, text)| {
            if with_files {
                json!({ "path": path.display().to_string(), "contents": &**text })
            } else {
                json!(path.display().to_string())
            }
        })
        .collect();
    json!({
        "generation": state.generation,
        "lastApplied": state.last_applied.map(seconds),
        "lastError": state.last_error,
        "files": files,
    })
}

fn services(mesh: &Snapshot) -> Value {
    let now = crate::net::clock::now_nanos();
    let services: Vec<Value> = mesh
        .config
        .services
        .iter()
        .enumerate()
        .map(|(s, service)| {
            let endpoints: Vec<Value> = service
                .endpoints
                .iter()
                .enumerate()
                .map(|(e, endpoint)| {
                    let state = mesh.endpoint_state(s, e, now);
                    json!({
                        "address": endpoint.address.to_string(),
                        "node": endpoint.node.as_deref(),
                        "workload": &*endpoint.workload,
                        "identity": &**endpoint.identity.uri(),
                        "healthy": state.healthy,
                        "ejected": state.ejected,
                        "inFlight": state.in_flight,
                    })
                })
                .collect();
            let ports: Vec<Value> = service
                .ports
                .iter()
                .map(|p| json!({ "port": p.port, "targetPort": p.target_port, "protocol": format!("{:?}", p.protocol).to_lowercase() }))
                .collect();
            json!({
                "name": &*service.name,
                "namespace": &*service.namespace,
                "vip": service.vip.to_string(),
                "ports": ports,
                "endpoints": endpoints,
            })
        })
        .collect();
    Value::Array(services)
}

fn workloads(mesh: &Snapshot) -> Value {
    Value::Array(
        mesh.config
            .workloads
            .iter()
            .map(|w| {
                json!({
                    "name": &*w.name,
                    "namespace": &*w.namespace,
                    "identity": &**w.identity.uri(),
                    "cgroup": w.cgroup,
                    "addresses": w.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn certificates(inputs: &StatusInputs) -> Value {
    let Some(store) = &inputs.store else {
        return Value::Array(vec![]);
    };
    let now = SystemTime::now();
    Value::Array(
        store
            .current()
            .by_identity
            .iter()
            .map(|(identity, cert)| {
                json!({
                    "identity": &**identity.uri(),
                    "notAfter": seconds(cert.not_after),
                    "expiresInSeconds": cert.seconds_left(now),
                })
            })
            .collect(),
    )
}

/// `meshd status`: fetches `/status` from `admin` and renders it, and
/// discovery's from `discovery` when something listens there (meshd runs
/// from hand-written files too).
pub fn status_command(
    admin: std::net::SocketAddr,
    discovery: std::net::SocketAddr,
) -> anyhow::Result<String> {
    let body = admin_get(admin, "/status")?;
    let status: Value = serde_json::from_str(&body)?;
    let mut out = render(&status);
    match http_get(discovery, &discovery.to_string(), "/status") {
        Ok(body) => {
            let status: Value = serde_json::from_str(&body)
                .map_err(|e| anyhow::anyhow!("discovery's /status at {discovery}: {e}"))?;
            out.push_str(&crate::discovery::report::render_status(&status));
        }
        Err(err) => {
            let refused = err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            if refused {
                out.push_str(&format!("discovery: none at {discovery}\n"));
            } else {
                out.push_str(&format!("discovery: CANNOT READ {discovery}: {err}\n"));
            }
        }
    }
    Ok(out)
}

/// The body of `GET path` from the admin API at `admin`.
pub fn admin_get(admin: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    http_get(admin, &admin.to_string(), path)
        .map_err(|e| anyhow::anyhow!("cannot read {path} from meshd's admin API at {admin}: {e}"))
}

/// The body of a `200` answer to `GET path` (HTTP/1.0, so never chunked),
/// within a few seconds.
pub fn http_get(address: std::net::SocketAddr, host: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(64 << 20).read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed answer from {address}"))?;
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != "200" {
        anyhow::bail!("{address} answered {status}: {body:.300}");
    }
    Ok(body.to_owned())
}

/// A readable summary of a `/status` document.
pub fn render(status: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(
        out,
        "node {}  {}  log level {}",
        s(&status["node"]),
        if status["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        },
        s(&status["logLevel"])
    );
    let config = &status["config"];
    let _ = writeln!(
        out,
        "config: reload generation {}, files {}",
        config["generation"],
        config["files"]
            .as_array()
            .map(|f| f.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    if let Some(error) = config["lastError"].as_str() {
        let _ = writeln!(
            out,
            "  LAST RELOAD REFUSED (still serving the previous config):\n  {error}"
        );
    }
    let _ = writeln!(out, "services:");
    for service in status["services"].as_array().into_iter().flatten() {
        let endpoints = service["endpoints"].as_array().cloned().unwrap_or_default();
        let up = endpoints
            .iter()
            .filter(|e| e["healthy"] == true && e["ejected"] == false)
            .count();
        let _ = writeln!(
            out,
            "  {}/{} {}  {}/{} endpoints in rotation",
            s(&service["namespace"]),
            s(&service["name"]),
            s(&service["vip"]),
            up,
            endpoints.len()
        );
        for e in &endpoints {
            let state = match (e["healthy"].as_bool(), e["ejected"].as_bool()) {
                (Some(false), _) => "UNHEALTHY",
                (_, Some(true)) => "EJECTED",
                _ => "ok",
            };
            let _ = writeln!(
                out,
                "    {:<15} {:<10} {:<9} in flight {}",
                s(&e["address"]),
                e["node"].as_str().unwrap_or("this node"),
                state,
                e["inFlight"]
            );
        }
    }
    let _ = writeln!(out, "workloads:");
    for w in status["workloads"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {}/{}  {}",
            s(&w["namespace"]),
            s(&w["name"]),
            s(&w["identity"])
        );
    }
    let _ = writeln!(out, "certificates:");
    for c in status["certificates"].as_array().into_iter().flatten() {
        let left = c["expiresInSeconds"].as_i64().unwrap_or(0);
        let when = if left < 0 {
            format!("EXPIRED {}s ago", -left)
        } else {
            format!("expires in {}h{:02}m", left / 3600, (left % 3600) / 60)
        };
        let _ = writeln!(out, "  {}  {when}", s(&c["identity"]));
    }
    out
}
