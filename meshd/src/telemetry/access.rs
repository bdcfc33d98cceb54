//! Access logs: one line per request and per TCP connection, with the
//! fields of Istio's default access log — as JSON, or as Istio's default
//! text format — written to stdout or appended to a file.
//!
//! A line is queued when its request or connection is recorded and written
//! by a thread of its own, so a slow disk or a blocked stdout never slows a
//! request: a line that finds the queue full is dropped and counted. Every
//! value a client chose (path, `user-agent`, `x-request-id`, `:authority`,
//! `x-forwarded-for`) is escaped and cut to `MAX_FIELD` bytes, so no client
//! can forge a line or grow one without bound.

use std::{
    io::Write as _,
    net::{SocketAddr, SocketAddrV4},
    sync::{mpsc, Arc},
    time::{Duration, SystemTime},
};

use hyper::{header::HeaderValue, HeaderMap, Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;

use super::{metrics::TcpLabels, ResponseFlag};
use crate::config::{AccessLogFormat, AccessLogSpec};

/// A client-chosen value is cut to this many bytes.
pub const MAX_FIELD: usize = 1024;

/// Where a connection came from and went to, as this node saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Downstream {
    /// The client's address (for a tunnel stream, the peer node's).
    pub remote: Option<SocketAddr>,
    /// The address the client connected to (the service's VIP, the pod).
    pub local: Option<SocketAddr>,
}

/// What counts the access log's lost lines.
#[derive(Clone)]
pub struct AccessLogCounters {
    pub queue_full: Counter,
    pub write_failed: Counter,
}

/// The access log's queue; cloned into every request that is logged.
pub struct AccessLog {
    queue: mpsc::SyncSender<Entry>,
    counters: AccessLogCounters,
}

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {path}: {source}")]
pub struct OpenError {
    path: String,
    source: std::io::Error,
}

impl AccessLog {
    /// Opens the log's output and starts its writer.
    pub fn start(
        spec: &AccessLogSpec,
        counters: AccessLogCounters,
    ) -> Result<Arc<Self>, OpenError> {
        let mut out: Box<dyn std::io::Write + Send> = if spec.path.as_os_str() == "/dev/stdout" {
            Box::new(std::io::stdout())
        } else {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&spec.path)
                .map_err(|source| OpenError {
                    path: spec.path.display().to_string(),
                    source,
                })?;
            Box::new(file)
        };
        let (queue, lines) = mpsc::sync_channel::<Entry>(spec.max_queue);
        let format = spec.format;
        let failed = counters.write_failed.clone();
        std::thread::Builder::new()
            .name("meshd-access-log".into())
            .spawn(move || {
                let mut buffer = String::new();
                // Until every sender is gone: at meshd's exit.
                while let Ok(first) = lines.recv() {
                    buffer.clear();
                    let mut count = 1;
                    first.write(format, &mut buffer);
                    while let Ok(next) = lines.try_recv() {
                        next.write(format, &mut buffer);
                        count += 1;
                        if buffer.len() > 64 * 1024 {
                            break;
                        }
                    }
                    if out
                        .write_all(buffer.as_bytes())
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        failed.inc_by(count);
                    }
                }
            })
            .map_err(|source| OpenError {
                path: "(writer thread)".into(),
                source,
            })?;
        Ok(Arc::new(Self { queue, counters }))
    }

    /// Queues `entry`, or counts it dropped when the writer is behind.
    pub fn send(&self, entry: Entry) {
        if self.queue.try_send(entry).is_err() {
            self.counters.queue_full.inc();
        }
    }
}

/// One line to write.
pub enum Entry {
    Request(Box<RequestEntry>),
    Connection(Box<ConnectionEntry>),
}

/// What a request's line says, besides its labels.
pub struct RequestEntry {
    pub common: Common,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: RequestHeaders,
    pub response_code: u16,
    pub route: Option<Arc<str>>,
    pub tries: u32,
    pub trace_id: Option<[u8; 16]>,
}

/// What a TCP connection's line says, besides its labels.
pub struct ConnectionEntry {
    pub common: Common,
}

/// What every line says.
pub struct Common {
    pub start: SystemTime,
    pub duration: Duration,
    pub labels: TcpLabels,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub downstream: Downstream,
    pub upstream: Option<SocketAddrV4>,
}

/// The request headers an access log line names, as the client sent them.
#[derive(Default)]
pub struct RequestHeaders {
    pub authority: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    pub forwarded_for: Option<HeaderValue>,
}

impl RequestHeaders {
    /// Takes them from a request (cloning a header value bumps a count).
    pub fn of(uri: &Uri, headers: &HeaderMap) -> Self {
        let get = |name: &str| headers.get(name).cloned();
        Self {
            authority: get("host").or_else(|| {
                uri.authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            }),
            user_agent: get("user-agent"),
            request_id: get("x-request-id"),
            forwarded_for: get("x-forwarded-for"),
        }
    }
}

impl Entry {
    fn write(&self, format: AccessLogFormat, out: &mut String) {
        let line = match format {
            AccessLogFormat::Json => self.json(),
            AccessLogFormat::Text => self.text(),
        };
        out.push_str(&line);
        out.push('\n');
    }

    fn common(&self) -> &Common {
        match self {
            Self::Request(r) => &r.common,
            Self::Connection(c) => &c.common,
        }
    }

    /// The fields, in Istio's default JSON format's names, plus the mesh's.
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let c = self.common();
        let l = &c.labels;
        let request = match self {
            Self::Request(r) => Some(r),
            Self::Connection(_) => None,
        };
        let header = |pick: fn(&RequestHeaders) -> &Option<HeaderValue>| {
            request.map_or(Value::None, |r| {
                pick(&r.headers)
                    .as_ref()
                    .map_or(Value::None, |v| Value::Client(v.as_bytes().to_vec()))
            })
        };
        let address = |a: Option<String>| a.map_or(Value::None, Value::Text);
        vec![
            ("start_time", Value::Text(rfc3339_millis(c.start))),
            (
                "method",
                request.map_or(Value::None, |r| {
                    Value::Client(r.method.as_str().as_bytes().to_vec())
                }),
            ),
            (
                "path",
                request.map_or(Value::None, |r| {
                    let path = r.uri.path_and_query().map_or("/", |p| p.as_str());
                    Value::Client(path.as_bytes().to_vec())
                }),
            ),
            (
                "protocol",
                request.map_or(Value::None, |r| Value::Text(protocol(r.version).into())),
            ),
            (
                "response_code",
                Value::Number(request.map_or(0, |r| u64::from(r.response_code))),
            ),
            (
                "response_flags",
                Value::Text(l.response_flags.as_str().into()),
            ),
            (
                "response_code_details",
                Value::Text(details(l.response_flags, request.is_some()).into()),
            ),
            ("bytes_received", Value::Number(c.bytes_received)),
            ("bytes_sent", Value::Number(c.bytes_sent)),
            (
                "duration",
                Value::Number(u64::try_from(c.duration.as_millis()).unwrap_or(u64::MAX)),
            ),
            ("x_forwarded_for", header(|h| &h.forwarded_for)),
            ("user_agent", header(|h| &h.user_agent)),
            ("request_id", header(|h| &h.request_id)),
            ("authority", header(|h| &h.authority)),
            ("upstream_host", address(c.upstream.map(|a| a.to_string()))),
            ("upstream_cluster", Value::Text(upstream_cluster(c))),
            (
                "downstream_local_address",
                address(c.downstream.local.map(|a| a.to_string())),
            ),
            (
                "downstream_remote_address",
                address(c.downstream.remote.map(|a| a.to_string())),
            ),
            (
                "route_name",
                request
                    .and_then(|r| r.route.as_ref())
                    .map_or(Value::None, |r| Value::Text(r.to_string())),
            ),
            ("downstream_peer_principal", principal(&l.source_principal)),
            (
                "upstream_peer_principal",
                principal(&l.destination_principal),
            ),
            (
                "trace_id",
                request
                    .and_then(|r| r.trace_id)
                    .map_or(Value::None, |t| Value::Text(hex(&t))),
            ),
            ("reporter", Value::Text(l.reporter.into())),
            (
                "source_workload",
                Value::Text(l.source_workload.to_string()),
            ),
            (
                "source_namespace",
                Value::Text(l.source_workload_namespace.to_string()),
            ),
            (
                "destination_service",
                Value::Text(l.destination_service.to_string()),
            ),
            (
                "destination_workload",
                Value::Text(l.destination_workload.to_string()),
            ),
            (
                "destination_namespace",
                Value::Text(l.destination_workload_namespace.to_string()),
            ),
            ("request_protocol", Value::Text(l.request_protocol.into())),
            (
                "attempts",
                request.map_or(Value::None, |r| Value::Number(u64::from(r.tries))),
            ),
        ]
    }

    fn json(&self) -> String {
        let mut object = serde_json::Map::new();
        for (name, value) in self.fields() {
            let value = match value {
                Value::None => serde_json::Value::Null,
                Value::Number(n) => n.into(),
                Value::Text(t) => t.into(),
                Value::Client(bytes) => escaped(&bytes).into(),
            };
            object.insert(name.into(), value);
        }
        serde_json::Value::Object(object).to_string()
    }

    /// Istio's default text format (Envoy's, with Istio's additions):
    /// `[start] "METHOD PATH PROTOCOL" code flags details - "-" received
    /// sent duration - "xff" "user-agent" "request-id" "authority"
    /// "upstream" cluster - local remote - route`, then the peers' identities.
    fn text(&self) -> String {
        let fields = self.fields();
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| *n == name)
                .map_or_else(|| "-".to_owned(), |(_, v)| v.plain())
        };
        format!(
            "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - {} {} {}",
            get("start_time"),
            get("method"),
            get("path"),
            get("protocol"),
            get("response_code"),
            get("response_flags"),
            get("response_code_details"),
            get("bytes_received"),
            get("bytes_sent"),
            get("duration"),
            get("x_forwarded_for"),
            get("user_agent"),
            get("request_id"),
            get("authority"),
            get("upstream_host"),
            get("upstream_cluster"),
            get("downstream_local_address"),
            get("downstream_remote_address"),
            get("route_name"),
            get("downstream_peer_principal"),
            get("upstream_peer_principal"),
        )
    }
}

/// One field's value.
enum Value {
    /// Not known or not applicable: `-` in text, `null` in JSON.
    None,
    Number(u64),
    /// A value meshd made (from the config, a certificate, a closed set).
    Text(String),
    /// Bytes a client chose.
    Client(Vec<u8>),
}

impl Value {
    fn plain(&self) -> String {
        match self {
            Self::None => "-".into(),
            Self::Number(n) => n.to_string(),
            Self::Text(t) => t.clone(),
            Self::Client(bytes) => escaped(bytes),
        }
    }
}

/// A client's bytes as printable ASCII: `"`, `\`, controls and non-ASCII
/// escaped (`\xNN`), cut to `MAX_FIELD` bytes.
pub fn escaped(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_FIELD)];
    let mut out = String::with_capacity(cut.len());
    for &b in cut {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > MAX_FIELD {
        out.push_str("...");
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn principal(principal: &str) -> Value {
    if principal == "unknown" {
        Value::None
    } else {
        Value::Text(principal.into())
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for meshd's flags.
fn details(flag: ResponseFlag, request: bool) -> &'static str {
    match flag {
        ResponseFlag::None if request => "via_upstream",
        ResponseFlag::None => "-",
        ResponseFlag::UpstreamTimeout => "upstream_response_timeout",
        ResponseFlag::UpstreamConnectFailure => {
            "upstream_reset_before_response_started{connection_failure}"
        }
        ResponseFlag::UpstreamConnectionTermination => {
            "upstream_reset_before_response_started{connection_termination}"
        }
        ResponseFlag::NoHealthyUpstream => "no_healthy_upstream",
        ResponseFlag::NoRoute => "route_not_found",
        ResponseFlag::Rbac => "rbac_access_denied_matched_policy",
        ResponseFlag::RateLimited => "local_rate_limited",
        ResponseFlag::UpstreamOverflow => "upstream_overflow",
        ResponseFlag::DownstreamProtocolError => "downstream_protocol_error",
        ResponseFlag::DownstreamConnectionTermination => "downstream_remote_disconnect",
    }
}

/// Istio's cluster names: `outbound|PORT||HOST` at the source,
/// `inbound|PORT||` at the destination.
fn upstream_cluster(c: &Common) -> String {
    if c.labels.reporter == "destination" {
        let port = c.upstream.map_or(0, |a| a.port());
        format!("inbound|{port}||")
    } else {
        let port = c.downstream.local.map_or(0, |a| a.port());
        format!("outbound|{port}||{}", c.labels.destination_service)
    }
}

/// `2026-12-02T05:40:20.123Z`.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_190_020_123);
        assert_eq!(rfc3339_millis(at), "2026-12-02T05:40:20.123Z");
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_clients_bytes_cannot_forge_a_line_or_a_field() {
        assert_eq!(escaped(b"curl/8"), "curl/8");
        assert_eq!(
            escaped(b"x\" \"200\n[fake] \\\x1b[31m\xff"),
            "x\\\" \\\"200\\x0a[fake] \\\\\\x1b[31m\\xff"
        );
        let long = vec![b'a'; MAX_FIELD + 10];
        let cut = escaped(&long);
        assert_eq!(cut.len(), MAX_FIELD + 3);
        assert!(cut.ends_with("..."));
    }
}
