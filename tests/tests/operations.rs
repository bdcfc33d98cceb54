//! Operating meshd: config hot reload through Kubernetes-style ConfigMap
//! symlink swaps, refused mistakes while the last good config serves.

use std::{os::unix::fs::symlink, path::PathBuf, time::Duration};

use meshd_tests::{
    clients::{client, curl, serve, serve_hello, spawn_in, testkit},
    sys::{eventually, wait_with_timeout, workspace_binary},
    testbed::{Meshd, Testbed},
};

/// A ConfigMap as the kubelet mounts it: `mesh.yaml` → `..data/mesh.yaml`,
/// `..data` → a timestamped directory, swapped atomically on update.
struct ConfigMap {
    dir: PathBuf,
    version: usize,
}

impl ConfigMap {
    fn new(bed: &Testbed, text: &str) -> Self {
        let dir = bed.dir.join("configmap");
        std::fs::create_dir_all(&dir).expect("configmap dir");
        symlink("..data/mesh.yaml", dir.join("mesh.yaml")).expect("file link");
        let mut map = Self { dir, version: 0 };
        map.update(text);
        map
    }

    fn file(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    /// Writes a new version and swaps `..data` to it in one rename.
    fn update(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).expect("version dir");
        std::fs::write(self.dir.join(&version).join("mesh.yaml"), text).expect("write config");
        let tmp = self.dir.join("..data_tmp");
        symlink(&version, &tmp).expect("data link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap data link");
    }
}

fn reloads(meshd: &Meshd, result: &str) -> f64 {
    meshd.metric("meshd_config_reloads_total", &[("result", result)])
}

fn web(endpoints: &str, extra: &str) -> String {
    format!(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{endpoints}]
  - name: echo
    vip: 10.96.0.40
    ports: [{{ port: 9000 }}]
    endpoints: [{endpoints}]
{extra}"
    )
}

const V1: &str = "{ address: 10.77.0.11, workload: v1 }";
const V2: &str = "{ address: 10.77.0.12, workload: v2 }";

#[test]
fn reloads_apply_changes_and_refuse_mistakes_while_the_last_good_config_serves() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &[]);
        serve(&bed, bed.pod(name), 9000, &["--mode", "echo"]);
    }
    let mut map = ConfigMap::new(&bed, &bed.config(&web(V1, "")));
    let meshd = Meshd::spawn(&bed, &[map.file()], &[]);
    meshd.wait_ready();
    let hello = || curl(&bed, bed.pod("client"), "http://10.96.0.20/").1;
    assert!(hello().starts_with("hello from v1"));

    // A connection to v1 that outlives v1's removal from the config.
    let long_lived = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &[
            "rr",
            "--connect",
            "10.96.0.40:9000",
            "--rate",
            "50",
            "--seconds",
            "6",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));

    // v1 replaced by v2; a new service added.
    let added = "  - name: extra
    vip: 10.96.0.21
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
";
    map.update(&bed.config(&web(V2, added)));
    assert!(
        eventually(Duration::from_secs(10), || reloads(&meshd, "ok") == 1.0),
        "{}",
        meshd.log()
    );
    assert!(hello().starts_with("hello from v2"));
    let (_, extra) = curl(&bed, bed.pod("client"), "http://10.96.0.21/");
    assert!(extra.starts_with("hello from v1"), "{extra}");
    let out = client(
        &bed,
        bed.pod("client"),
        &["echo", "--connect", "10.96.0.40:9000", "--bytes", "10000"],
        Duration::from_secs(20),
    );
    assert!(out.starts_with("ok echo"), "{out}");
    let drained = wait_with_timeout(long_lived, Duration::from_secs(30), "rr");
    assert!(
        drained.status.success(),
        "the established connection did not survive the reload: {}",
        String::from_utf8_lossy(&drained.stderr)
    );

    // A mistake: refused with file, line and field; the last good config
    // keeps serving.
    let broken =
        bed.config(&web(V2, "").replace("ports: [{ port: 9000 }]", "prots: [{ port: 9000 }]"));
    map.update(&broken);
    assert!(
        eventually(Duration::from_secs(10), || reloads(&meshd, "error") == 1.0),
        "{}",
        meshd.log()
    );
    assert!(
        meshd.log().contains("services[1]: unknown field `prots`"),
        "{}",
        meshd.log()
    );
    assert_eq!(
        meshd.metric("meshd_config_last_reload_successful", &[]),
        0.0
    );
    assert!(hello().starts_with("hello from v2"));
    // `meshd check` says the same about the same file, and fails.
    let bad = bed.write("broken.yaml", &broken);
    let check = std::process::Command::new(workspace_binary("meshd"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("meshd check");
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("services[1]: unknown field `prots`"));

    // What only a restart can change is refused too, and said so.
    let moved = bed
        .config(&web(V2, ""))
        .replace("captureAddress: 10.77.0.1", "captureAddress: 10.77.0.2");
    map.update(&moved);
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "error"
    ) == 2.0));
    assert!(meshd
        .log()
        .contains("node changed: meshd applies that only at start-up"));
    assert!(hello().starts_with("hello from v2"));

    // Fixed: applied again.
    map.update(&bed.config(&web(V1, "")));
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "ok"
    ) == 2.0));
    assert!(hello().starts_with("hello from v1"));
    assert_eq!(
        meshd.metric("meshd_config_last_reload_successful", &[]),
        1.0
    );

    // A policy added by a reload applies at once, and goes with the next.
    let deny = "policies:
  - name: no-client
    target: { service: default/web }
    action: deny
    from: [{ principals: [cluster.local/ns/default/sa/client] }]
";
    map.update(&bed.config(&web(V1, deny)));
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "ok"
    ) == 3.0));
    let (_, denied) = meshd_tests::clients::curl_args(
        &bed,
        bed.pod("client"),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://10.96.0.20/",
        ],
    );
    assert_eq!(denied, "403");
    map.update(&bed.config(&web(V1, "")));
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "ok"
    ) == 4.0));
    assert!(hello().starts_with("hello from v1"));
}

#[test]
fn the_admin_api_and_meshd_status_show_config_health_certificates_and_change_the_log_level() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    serve_hello(&bed, "v1", &[]);
    // v2 runs nothing: its health check fails.
    let identity = meshd_tests::clients::issuer_identity(&bed);
    let services = format!(
        "{}    healthCheck: {{ protocol: tcp, interval: 200ms }}\n",
        web(&format!("{V1}, {V2}"), "").replace(
            "  - name: echo\n    vip: 10.96.0.40\n    ports: [{ port: 9000 }]\n    endpoints: [{ address: 10.77.0.11, workload: v1 }, { address: 10.77.0.12, workload: v2 }]\n",
            ""
        )
    );
    let mut map = ConfigMap::new(&bed, &bed.config_with(0, &identity, &services));
    let meshd = Meshd::spawn(&bed, &[map.file()], &[]);
    meshd.wait_ready();
    assert!(eventually(Duration::from_secs(10), || {
        meshd.admin("/services").contains("\"healthy\": false")
    }));
    let status: serde_json::Value =
        serde_json::from_str(&meshd.admin("/status")).expect("status JSON");
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["ready"], true);
    let endpoints = &status["services"][0]["endpoints"];
    assert_eq!(endpoints[0]["healthy"], true, "{status:#}");
    assert_eq!(endpoints[1]["healthy"], false, "{status:#}");
    let certificates = status["certificates"].as_array().expect("certificates");
    assert!(
        certificates.iter().any(
            |c| c["identity"] == "spiffe://cluster.local/ns/default/sa/client"
                && c["expiresInSeconds"].as_i64().unwrap_or(0) > 3600
        ),
        "{status:#}"
    );
    assert!(status["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .any(|w| w["name"] == "client"));

    // A refused reload shows up, with its reason.
    map.update("services: [\n");
    assert!(eventually(Duration::from_secs(10), || {
        meshd.admin("/config").contains("lastError\": \"")
    }));
    let config: serde_json::Value =
        serde_json::from_str(&meshd.admin("/config")).expect("config JSON");
    assert!(
        config["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("mesh.yaml"),
        "{config:#}"
    );
    assert!(config["files"][0]["contents"]
        .as_str()
        .unwrap_or("")
        .contains("healthCheck"));

    let summary = meshd.run_in_node(&workspace_binary("meshd"), &["status"]);
    for want in [
        "node node-a  ready",
        "LAST RELOAD REFUSED",
        "default/web 10.96.0.20  1/2 endpoints in rotation",
        "10.77.0.12      this node  UNHEALTHY",
        "spiffe://cluster.local/ns/default/sa/client  expires in 23h",
    ] {
        assert!(summary.contains(want), "no {want:?} in:\n{summary}");
    }

    // The log level changes at run time.
    let out = meshd.run_in_node(
        std::path::Path::new("curl"),
        &[
            "-sS",
            "-X",
            "PUT",
            "http://127.0.0.1:15000/logging?level=warn",
        ],
    );
    assert!(out.contains("\"level\": \"warn\""), "{out}");
    assert!(meshd.admin("/logging").contains("\"warn\""));
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_meshd_and_promtool_finds_its_output_clean() {
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &[]);
    serve(&bed, bed.pod("v1"), 9000, &["--mode", "echo"]);
    let meshd = bed.start_meshd(&bed.config(&web(V1, "")));
    let (code, _) = meshd_tests::clients::curl_args(
        &bed,
        bed.pod("client"),
        &["-o", "/dev/null", "http://10.96.0.20/[1-5]"],
    );
    assert_eq!(code, 0);
    client(
        &bed,
        bed.pod("client"),
        &["echo", "--connect", "10.96.0.40:9000", "--bytes", "1000"],
        Duration::from_secs(20),
    );

    // promtool lints exactly what meshd serves.
    let text = meshd.metrics();
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs it)");
    use std::io::Write as _;
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let lint = wait_with_timeout(lint, Duration::from_secs(30), "promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    // The one name promtool would have otherwise is Istio's own: dashboards
    // and Kiali query `istio_request_duration_milliseconds`, so it stays.
    let istio_unit =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty() && *l != istio_unit)
        .collect();
    assert!(problems.is_empty(), "promtool: {said}");

    // Prometheus in the node's namespace, scraping every second.
    let data = bed.dir.join("prometheus");
    let config = bed.write(
        "prometheus.yml",
        &format!(
            "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: meshd\n    static_configs: [{{ targets: ['{}:15020'] }}]\n",
            bed.nodes[0].ip
        ),
    );
    bed.spawn_on_node(
        0,
        std::path::Path::new("prometheus"),
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    );
    let query = |promql: &str| -> Option<f64> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let node = bed.nodes[0].netns.path();
        let answer = meshd_tests::sys::in_netns(&node, move || {
            meshd_tests::sys::http_get("127.0.0.1:9090".parse().expect("addr"), &path)
        });
        let (200, body) = answer? else { return None };
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let requests = "sum(istio_requests_total{reporter=\"source\",destination_service=\"web.default.svc.cluster.local\",response_code=\"200\"})";
    assert!(
        eventually(Duration::from_secs(60), || query(requests) == Some(5.0)),
        "Prometheus never saw 5 requests: {:?}",
        query(requests)
    );
    let opened = "sum(istio_tcp_connections_opened_total{destination_service=\"echo.default.svc.cluster.local\",source_workload=\"client\"})";
    assert_eq!(query(opened), Some(1.0));
    assert_eq!(query("up{job=\"meshd\"}"), Some(1.0));
}
