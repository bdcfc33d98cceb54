//! One result object per connection and per request. Each is made as soon
//! as what it is about is known, learns how things went as they go, and
//! records Istio's metrics (and, for a request, the access-log line) once:
//! when it is finished, or when it is dropped on a path that forgot to —
//! a client that went away mid-request is counted too (flag `DC`).

use std::{net::SocketAddrV4, sync::Arc, time::Instant};

use hyper::{header, HeaderMap, StatusCode};
use prometheus_client::metrics::counter::Counter;
use tracing::info;

use super::{
    metrics::{HttpLabels, Metrics, TcpLabels},
    ResponseFlag,
};
use crate::{config::Endpoint, state::snapshot::Path};

// === impl ConnectionResult ===

/// One captured connection or tunnel stream: `istio_tcp_connections_opened`
/// and `_closed` with its labels, whichever way it ends. A connection that
/// never reached its upstream (refused, failed) counts as opened and closed
/// at once, with its flag.
pub struct ConnectionResult {
    metrics: Arc<Metrics>,
    labels: TcpLabels,
    opened: bool,
}

impl ConnectionResult {
    pub fn new(metrics: &Arc<Metrics>, labels: TcpLabels) -> Self {
        Self {
            metrics: metrics.clone(),
            labels,
            opened: false,
        }
    }

    pub fn labels(&self) -> &TcpLabels {
        &self.labels
    }

    /// Istio's `connection_security_policy`, once known.
    pub fn set_security_policy(&mut self, policy: &'static str) {
        self.labels.connection_security_policy = policy;
    }

    /// The connection reached its upstream: counted opened (and active)
    /// now, closed when this is dropped. Returns the (received, sent) byte
    /// counters for the relay.
    pub fn open(&mut self) -> (Counter, Counter) {
        let metrics = &self.metrics;
        if !self.opened {
            self.opened = true;
            metrics.tcp_opened.with(&self.labels, |c| c.inc());
            metrics.active_connections.inc();
        }
        (
            metrics
                .tcp_received_bytes
                .get_or_create(&self.labels)
                .clone(),
            metrics.tcp_sent_bytes.get_or_create(&self.labels).clone(),
        )
    }

    /// Ends a connection that did not reach its upstream, with `flag`.
    pub fn end(mut self, flag: ResponseFlag) {
        self.labels.response_flags = flag;
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        let metrics = &self.metrics;
        if self.opened {
            metrics.active_connections.dec();
        } else {
            metrics.tcp_opened.with(&self.labels, |c| c.inc());
        }
        metrics.tcp_closed.with(&self.labels, |c| c.inc());
    }
}

// === impl RequestResult ===

/// "METHOD /path" for the access log, kept without formatting anything
/// until a line is actually written (cloning both only bumps counts).
pub struct RequestLine {
    pub method: hyper::Method,
    pub uri: hyper::Uri,
}

impl std::fmt::Display for RequestLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.uri.path())
    }
}

/// One HTTP request: `istio_requests_total`, its duration and sizes, and
/// one access-log line.
pub struct RequestResult<'a> {
    metrics: &'a Metrics,
    labels: HttpLabels,
    started: Instant,
    line: RequestLine,
    request_bytes: u64,
    route: Option<Arc<str>>,
    upstream: Option<SocketAddrV4>,
    recorded: bool,
}

impl<'a> RequestResult<'a> {
    pub fn new(
        metrics: &'a Metrics,
        labels: HttpLabels,
        line: RequestLine,
        started: Instant,
    ) -> Self {
        Self {
            metrics,
            labels,
            started,
            line,
            request_bytes: 0,
            route: None,
            upstream: None,
            recorded: false,
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn set_route(&mut self, route: &Arc<str>) {
        self.route = Some(route.clone());
    }

    pub fn set_request_bytes(&mut self, bytes: u64) {
        self.request_bytes = bytes;
    }

    /// The endpoint the (last) try went to, reached by `path`.
    pub fn set_endpoint(
        &mut self,
        endpoint: &Endpoint,
        path: Option<Path>,
        upstream: SocketAddrV4,
    ) {
        super::labels::to_endpoint(&mut self.labels.connection, endpoint, path);
        self.upstream = Some(upstream);
    }

    /// Records the answer the client gets: its status, meshd's flag, and
    /// the answer's own headers (size, gRPC status of a trailers-only one).
    pub fn finish(mut self, status: StatusCode, headers: &HeaderMap, flag: ResponseFlag) {
        self.labels.response_code = status.as_u16();
        self.labels.connection.response_flags = flag;
        if let Some(code) = headers.get("grpc-status").map(grpc_status) {
            self.labels.grpc_response_status = code;
        }
        let response_bytes = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        self.record(response_bytes);
    }

    fn record(&mut self, response_bytes: u64) {
        self.recorded = true;
        let elapsed = self.started.elapsed();
        let labels = &self.labels;
        let metrics = &self.metrics;
        metrics.requests.with(labels, |c| c.inc());
        metrics
            .request_duration
            .with(labels, |h| h.observe(elapsed.as_secs_f64() * 1000.0));
        metrics
            .request_bytes
            .with(labels, |h| h.observe(self.request_bytes as f64));
        metrics
            .response_bytes
            .with(labels, |h| h.observe(response_bytes as f64));
        info!(
            target: "meshd::access",
            request = %self.line,
            status = labels.response_code,
            flags = %labels.connection.response_flags,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            route = self.route.as_deref().unwrap_or("none"),
            upstream = %self.upstream.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            source = %labels.connection.source_workload,
            destination = %labels.connection.destination_service,
            "request"
        );
    }
}

impl Drop for RequestResult<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            // The client went away (or a path forgot to finish).
            self.labels.connection.response_flags = ResponseFlag::DownstreamConnectionTermination;
            self.record(0);
        }
    }
}

/// A gRPC status code as a label: the number of one of the 17 codes, else
/// `unknown` — never the header's bytes as they came.
fn grpc_status(value: &hyper::header::HeaderValue) -> Arc<str> {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let code = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .and_then(|c| CODES.get(c));
    Arc::from(*code.unwrap_or(&"unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::labels;
    use prometheus_client::registry::Registry;

    fn metrics() -> (Registry, Arc<Metrics>) {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        (registry, metrics)
    }

    fn tcp_labels() -> TcpLabels {
        let config = crate::config::load_str(
            "t.yaml",
            "node: { name: a, captureAddress: 10.77.0.1, podCgroup: /pods }
services:
  - { name: web, vip: 10.96.0.20, ports: [{ port: 80 }], endpoints: [{ address: 10.77.0.7 }] }
",
        )
        .expect("valid");
        labels::source(None, &config.services[0], None, None, "http")
    }

    fn text(registry: &Registry) -> String {
        crate::telemetry::metrics::render(registry)
    }

    #[test]
    fn a_connection_that_never_opened_counts_opened_and_closed_with_its_flag() {
        let (registry, metrics) = metrics();
        ConnectionResult::new(&metrics, tcp_labels()).end(ResponseFlag::Rbac);
        let text = text(&registry);
        for name in ["opened", "closed"] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("istio_tcp_connections_{name}_total{{")))
                .unwrap_or_else(|| panic!("no {name} series: {text}"));
            assert!(
                line.contains("response_flags=\"RBAC\"") && line.ends_with(" 1"),
                "{line}"
            );
        }
        assert!(text.contains("meshd_active_connections 0"), "{text}");
    }

    #[test]
    fn an_opened_connection_is_active_until_dropped() {
        let (registry, metrics) = metrics();
        let mut result = ConnectionResult::new(&metrics, tcp_labels());
        let (received, _) = result.open();
        received.inc_by(5);
        assert!(text(&registry).contains("meshd_active_connections 1"));
        drop(result);
        let text = text(&registry);
        assert!(text.contains("meshd_active_connections 0"), "{text}");
        assert!(text.contains("response_flags=\"-\""), "{text}");
    }

    #[test]
    fn a_request_dropped_unfinished_is_counted_as_the_client_going_away() {
        let (registry, metrics) = metrics();
        let line = RequestLine {
            method: hyper::Method::GET,
            uri: "/x".parse().expect("uri"),
        };
        drop(RequestResult::new(
            &metrics,
            labels::http(tcp_labels()),
            line,
            Instant::now(),
        ));
        let text = text(&registry);
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .expect("counted");
        assert!(
            line.contains("response_flags=\"DC\"") && line.contains("response_code=\"0\""),
            "{line}"
        );
    }

    #[test]
    fn grpc_status_labels_come_from_a_closed_set() {
        let value = |v: &str| hyper::header::HeaderValue::from_str(v).expect("value");
        assert_eq!(&*grpc_status(&value("14")), "14");
        assert_eq!(&*grpc_status(&value("0")), "0");
        assert_eq!(&*grpc_status(&value("17")), "unknown");
        assert_eq!(&*grpc_status(&value(&"9".repeat(500))), "unknown");
        assert_eq!(&*grpc_status(&value("x-evil")), "unknown");
    }
}
