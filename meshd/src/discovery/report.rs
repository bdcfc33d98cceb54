//! What `meshd discover` says while it watches: `meshd_discovery_*`
//! metrics on its metrics address (for Prometheus, beside meshd's own),
//! and a `/status` document on loopback, which `meshd status` shows. Both
//! are read from one `Report` the watch loop keeps current.
//!
//! How stale the files are: `meshd_discovery_last_sync_timestamp_seconds`
//! is the last moment they were known to hold everything watched (every
//! watch connected and listed, nothing unreadable, the translation
//! written). While that holds it is refreshed at each scrape, so
//! `time() - meshd_discovery_last_sync_timestamp_seconds` is how long the
//! API server has been out of reach.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_json::{json, Value};

use super::{
    cluster::{Cluster, Kind},
    translate::Unsupported,
    watch::{Update, Watched},
};
use crate::telemetry::metrics::ShedLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FieldLabels {
    kind: &'static str,
    field: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// What became of a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// New bytes were written.
    Written,
    /// The files already held it.
    Unchanged,
    /// meshd's validation refused it (a discovery bug); not written.
    Refused,
    /// The write failed.
    Failed,
}

impl Written {
    fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Unchanged => "unchanged",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

#[derive(Default)]
struct Metrics {
    connected: Family<KindLabels, Gauge>,
    last_event: Family<KindLabels, Gauge>,
    watch_errors: Family<KindLabels, Counter>,
    objects: Family<KindLabels, Gauge>,
    unreadable: Gauge,
    unsupported: Family<FieldLabels, Counter>,
    unsupported_now: Family<FieldLabels, Gauge>,
    writes: Family<ResultLabels, Counter>,
    last_write: Gauge,
    last_sync: Gauge,
    shed: Family<ShedLabels, Counter>,
}

#[derive(Default)]
struct KindState {
    listed: bool,
    connected: bool,
    absent: bool,
    objects: usize,
    last_event: Option<SystemTime>,
    last_error: Option<String>,
}

#[derive(Default)]
struct State {
    kinds: BTreeMap<Kind, KindState>,
    /// `(kind, namespace/name, why)`.
    unreadable: Vec<(Kind, String, String)>,
    unsupported: Vec<Unsupported>,
    last_write: Option<SystemTime>,
    last_result: Option<Written>,
}

impl State {
    /// Every watch connected and listed, nothing unreadable, the last
    /// translation in the files.
    fn synced(&self) -> bool {
        self.kinds.len() == super::watch::KINDS
            && self.kinds.values().all(|k| k.listed && k.connected)
            && self.unreadable.is_empty()
            && matches!(
                self.last_result,
                Some(Written::Written | Written::Unchanged)
            )
    }
}

/// The watch loop's report.
pub struct Report {
    registry: Registry,
    metrics: Metrics,
    state: Mutex<State>,
    node: String,
    file: String,
}

fn seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Report {
    pub fn new(node: &str, file: &std::path::Path) -> Self {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("meshd_discovery");
        r.register(
            "watch_connected",
            "Whether the watch of a kind is connected (1) or retrying after an error (0)",
            metrics.connected.clone(),
        );
        r.register(
            "last_event_timestamp_seconds",
            "When the watch of a kind last brought an event or a list",
            metrics.last_event.clone(),
        );
        r.register(
            "watch_errors",
            "Errors of the watch of a kind (it retries with backoff)",
            metrics.watch_errors.clone(),
        );
        r.register("objects", "Objects of a kind held", metrics.objects.clone());
        r.register(
            "unreadable_objects",
            "Objects that cannot be read; while there are any no files are written",
            metrics.unreadable.clone(),
        );
        r.register(
            "unsupported",
            "Fields of objects meshd cannot express, counted when they first appear (left out, never widening access)",
            metrics.unsupported.clone(),
        );
        r.register(
            "unsupported_fields",
            "Fields of objects meshd cannot express, in the current translation",
            metrics.unsupported_now.clone(),
        );
        r.register(
            "writes",
            "Translations by what became of them: written, unchanged, refused (by meshd's validation) or failed (the write)",
            metrics.writes.clone(),
        );
        r.register(
            "last_write_timestamp_seconds",
            "When the files last got new bytes",
            metrics.last_write.clone(),
        );
        r.register(
            "last_sync_timestamp_seconds",
            "When the files last held everything watched (refreshed while they do)",
            metrics.last_sync.clone(),
        );
        r.register(
            "connections_shed",
            "Connections to discover's own listeners reset at once, by listener and reason",
            metrics.shed.clone(),
        );
        Self {
            registry,
            metrics,
            state: Mutex::default(),
            node: node.to_owned(),
            file: file.display().to_string(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes what a watch reported (before `watched` applies it).
    pub fn observed(&self, update: &Update, now: SystemTime) {
        let mut state = self.state();
        let (kind, connected) = match update {
            Update::Change(change) => (change.kind(), true),
            Update::Unreadable(kind, ..) => (*kind, true),
            Update::Absent(kind) => (*kind, true),
            Update::Error(kind, _) => (*kind, false),
        };
        let labels = KindLabels {
            kind: kind.as_str(),
        };
        let entry = state.kinds.entry(kind).or_default();
        entry.connected = connected;
        self.metrics
            .connected
            .get_or_create(&labels)
            .set(i64::from(connected));
        match update {
            Update::Error(_, message) => {
                entry.last_error = Some(message.clone());
                self.metrics.watch_errors.get_or_create(&labels).inc();
            }
            _ => {
                entry.last_event = Some(now);
                entry.absent = matches!(update, Update::Absent(_));
                self.metrics
                    .last_event
                    .get_or_create(&labels)
                    .set(seconds(now));
            }
        }
    }

    /// Takes what the loop knows after an update: kinds listed, objects
    /// held, objects unreadable.
    pub fn held(&self, watched: &Watched) {
        let mut state = self.state();
        for (kind, count) in counts(&watched.cluster) {
            let entry = state.kinds.entry(kind).or_default();
            entry.objects = count;
            entry.listed = watched.listed.contains(&kind);
            self.metrics
                .objects
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        state.unreadable = watched
            .unreadable
            .iter()
            .map(|((kind, key), why)| (*kind, format!("{}/{}", key.0, key.1), why.clone()))
            .collect();
        self.metrics
            .unreadable
            .set(i64::try_from(state.unreadable.len()).unwrap_or(i64::MAX));
    }

    /// Takes a translation's findings; those not in the last one are
    /// counted. Returns them, for the log.
    pub fn translated(&self, unsupported: &[Unsupported]) -> Vec<Unsupported> {
        let mut state = self.state();
        let new: Vec<Unsupported> = unsupported
            .iter()
            .filter(|u| !state.unsupported.contains(u))
            .cloned()
            .collect();
        let labels = |u: &Unsupported| FieldLabels {
            kind: u.kind.as_str(),
            field: u.field,
        };
        for u in &new {
            self.metrics.unsupported.get_or_create(&labels(u)).inc();
        }
        let mut now: BTreeMap<(&'static str, &'static str), i64> = BTreeMap::new();
        for u in &state.unsupported {
            now.insert((u.kind.as_str(), u.field), 0);
        }
        for u in unsupported {
            *now.entry((u.kind.as_str(), u.field)).or_default() += 1;
        }
        for ((kind, field), count) in now {
            self.metrics
                .unsupported_now
                .get_or_create(&FieldLabels { kind, field })
                .set(count);
        }
        state.unsupported = unsupported.to_vec();
        new
    }

    /// Takes what became of the last translation.
    pub fn wrote(&self, result: Written, now: SystemTime) {
        let mut state = self.state();
        state.last_result = Some(result);
        self.metrics
            .writes
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
        if result == Written::Written {
            state.last_write = Some(now);
            self.metrics.last_write.set(seconds(now));
        }
        if state.synced() {
            self.metrics.last_sync.set(seconds(now));
        }
    }

    /// `/metrics`.
    pub fn render_metrics(&self, now: SystemTime) -> String {
        if self.state().synced() {
            self.metrics.last_sync.set(seconds(now));
        }
        crate::telemetry::metrics::render(&self.registry)
    }

    /// `/status`: the document `meshd status` shows.
    pub fn status(&self, now: SystemTime) -> Value {
        let state = self.state();
        let ago =
            |t: Option<SystemTime>| t.map(|t| now.duration_since(t).unwrap_or_default().as_secs());
        let kinds: Vec<Value> = state
            .kinds
            .iter()
            .map(|(kind, k)| {
                json!({
                    "kind": kind.as_str(),
                    "listed": k.listed,
                    "connected": k.connected,
                    "served": !k.absent,
                    "objects": k.objects,
                    "lastEventSecondsAgo": ago(k.last_event),
                    "lastError": k.last_error,
                })
            })
            .collect();
        let unsupported: Vec<Value> = state
            .unsupported
            .iter()
            .take(STATUS_FINDINGS)
            .map(|u| {
                json!({
                    "kind": u.kind.as_str(),
                    "object": u.object,
                    "field": u.field,
                    "detail": u.detail,
                })
            })
            .collect();
        json!({
            "node": self.node,
            "file": self.file,
            "synced": state.synced(),
            "lastResult": state.last_result.map(Written::as_str),
            "lastWriteSecondsAgo": ago(state.last_write),
            "kinds": kinds,
            "unreadable": state.unreadable.iter().map(|(kind, object, why)| json!({
                "kind": kind.as_str(), "object": object, "error": why,
            })).collect::<Vec<_>>(),
            "unsupportedCount": state.unsupported.len(),
            "unsupported": unsupported,
        })
    }
}

/// How many findings `/status` lists (all are counted).
const STATUS_FINDINGS: usize = 200;

/// Objects held per kind.
fn counts(cluster: &Cluster) -> [(Kind, usize); super::watch::KINDS] {
    [
        (Kind::Service, cluster.services.len()),
        (Kind::EndpointSlice, cluster.endpoint_slices.len()),
        (Kind::Pod, cluster.pods.len()),
        (Kind::Node, cluster.nodes.len()),
        (Kind::HttpRoute, cluster.http_routes.len()),
        (Kind::DestinationRule, cluster.destination_rules.len()),
        (Kind::PeerAuthentication, cluster.peer_authentications.len()),
        (
            Kind::AuthorizationPolicy,
            cluster.authorization_policies.len(),
        ),
    ]
}

/// A readable summary of discover's `/status` document, for `meshd status`.
pub fn render_status(status: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let ago = |v: &Value| {
        v.as_u64()
            .map_or("never".to_owned(), |s| format!("{s}s ago"))
    };
    let _ = writeln!(
        out,
        "discovery: node {}  {}  file {}  last written {}",
        s(&status["node"]),
        if status["synced"].as_bool() == Some(true) {
            "in sync"
        } else {
            "NOT IN SYNC (the last files keep serving)"
        },
        s(&status["file"]),
        ago(&status["lastWriteSecondsAgo"]),
    );
    for k in status["kinds"].as_array().into_iter().flatten() {
        let state = match (k["connected"].as_bool(), k["served"].as_bool()) {
            (Some(false), _) => "RETRYING",
            (_, Some(false)) => "not served",
            _ if k["listed"].as_bool() != Some(true) => "listing",
            _ => "watching",
        };
        let _ = write!(
            out,
            "  {:<20} {:<10} {:>6} objects  last event {}",
            s(&k["kind"]),
            state,
            k["objects"],
            ago(&k["lastEventSecondsAgo"])
        );
        if let Some(error) = k["lastError"].as_str().filter(|_| state == "RETRYING") {
            let _ = write!(out, "  ({error:.200})");
        }
        out.push('\n');
    }
    for u in status["unreadable"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  UNREADABLE {} {}: {:.200} (no files are written until it is readable or gone)",
            s(&u["kind"]),
            s(&u["object"]),
            s(&u["error"])
        );
    }
    let _ = writeln!(
        out,
        "  not translated: {} fields (left out without widening access)",
        status["unsupportedCount"]
    );
    for u in status["unsupported"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "    {} {} {}: {:.200}",
            s(&u["kind"]),
            s(&u["object"]),
            s(&u["field"]),
            s(&u["detail"])
        );
    }
    out
}

/// discover's listeners: a connection cap, an idle timeout, and a few
/// seconds for a request's headers.
const LIMITS: crate::net::accept::Limits = crate::net::accept::Limits {
    max: 64,
    per_source: 16,
    idle: Duration::from_secs(30),
};
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where discover serves.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// `/metrics`, for Prometheus.
    pub metrics: SocketAddr,
    /// `/status`, for `meshd status` (loopback: it names objects).
    pub admin: SocketAddr,
}

/// Binds both listeners and serves them for the life of the process;
/// the addresses bound (a port 0 picked).
pub async fn serve(report: Arc<Report>, addresses: Addresses) -> anyhow::Result<Addresses> {
    let mut bound = addresses;
    for (address, what, bound) in [
        (addresses.metrics, "discovery_metrics", &mut bound.metrics),
        (addresses.admin, "discovery_admin", &mut bound.admin),
    ] {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {address} for {what}: {e}"))?;
        *bound = listener.local_addr()?;
        tokio::spawn(listen(listener, what, report.clone()));
    }
    Ok(bound)
}

async fn listen(listener: tokio::net::TcpListener, what: &'static str, report: Arc<Report>) {
    let shed = |reason| {
        report
            .metrics
            .shed
            .get_or_create(&ShedLabels {
                listener: what,
                reason,
            })
            .clone()
    };
    let counters = crate::net::accept::AcceptCounters {
        errors: shed("accept_error"),
        shed: shed("fd_exhausted"),
        over_max: shed("max_connections"),
        over_per_source: shed("max_per_source"),
        idle_closed: shed("idle"),
    };
    // Never stopped: the process ends with the watch.
    let (_keep, stop) = tokio::sync::watch::channel(false);
    crate::net::accept::accept_loop(
        listener,
        what,
        LIMITS,
        &counters,
        stop,
        Duration::ZERO,
        move |stream, _| {
            let report = report.clone();
            async move {
                let service = hyper::service::service_fn(move |request| {
                    let answer = answer(&report, what, &request);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            }
        },
    )
    .await;
}

fn answer<B>(
    report: &Report,
    what: &'static str,
    request: &hyper::Request<B>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let now = SystemTime::now();
    let (status, kind, body) = match (request.method(), request.uri().path(), what) {
        (&hyper::Method::GET, "/metrics", "discovery_metrics") => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            report.render_metrics(now),
        ),
        (&hyper::Method::GET, "/status", "discovery_admin") => (
            200,
            "application/json",
            format!("{:#}\n", report.status(now)),
        ),
        (&hyper::Method::GET, _, _) => (404, "text/plain", "not found\n".to_owned()),
        _ => (405, "text/plain", "GET only\n".to_owned()),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}
