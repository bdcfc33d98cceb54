//! One result object per connection and per request. Each is made as soon
//! as what it is about is known, learns how things went as they go, and
//! records Istio's metrics (and, for a request, the access-log line) once:
//! when it is finished, or when it is dropped on a path that forgot to —
//! a client that went away mid-request is counted too (flag `DC`).

use std::{net::SocketAddrV4, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::Response;
use opentelemetry::{trace::SpanKind, KeyValue};
use prometheus_client::metrics::counter::Counter;

use super::{
    access::{AccessLog, Common, ConnectionEntry, Downstream, Entry, RequestEntry, RequestHeaders},
    body::{Counted, GrpcFrames, Tally},
    metrics::{HttpLabels, Metrics, RequestSample, SeriesCache, TcpLabels},
    spans::{Finished, Tracer},
    trace, ResponseFlag,
};
use crate::config::Endpoint;

/// The body every answer is sent with.
pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

// === impl ConnectionResult ===

/// One captured connection or tunnel stream: `istio_tcp_connections_opened`
/// and `_closed` with its labels, whichever way it ends — once per reporter
/// (both where this node is source and destination). A connection that
/// never reached its upstream (refused, failed) counts as opened and closed
/// at once, with its flag.
pub struct ConnectionResult {
    metrics: Arc<Metrics>,
    reports: Reports<TcpLabels>,
    opened: bool,
    /// Where its access-log line goes, when it is logged.
    access: Option<Box<ConnectionLogged>>,
}

/// What a logged connection's line needs: its own byte counts among them.
struct ConnectionLogged {
    log: Arc<AccessLog>,
    started: Instant,
    downstream: Downstream,
    upstream: Option<SocketAddrV4>,
    received: Counter,
    sent: Counter,
}

/// The label sets one connection or request is reported with: the source
/// node's or the destination node's, or both when one meshd is both.
#[derive(Debug, Clone)]
pub struct Reports<L> {
    pub first: L,
    pub destination: Option<Box<L>>,
}

impl<L> Reports<L> {
    pub fn one(labels: L) -> Self {
        Self {
            first: labels,
            destination: None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &L> {
        std::iter::once(&self.first).chain(self.destination.as_deref())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut L> {
        std::iter::once(&mut self.first).chain(self.destination.as_deref_mut())
    }
}

/// The byte counters of an opened connection, one per reporter.
pub struct ByteCounters {
    pub received: Vec<Counter>,
    pub sent: Vec<Counter>,
}

impl ConnectionResult {
    pub fn new(metrics: &Arc<Metrics>, reports: Reports<TcpLabels>) -> Self {
        Self {
            metrics: metrics.clone(),
            reports,
            opened: false,
            access: None,
        }
    }

    /// Writes the connection's line to `log` when it ends.
    pub fn log_access(
        &mut self,
        log: &Arc<AccessLog>,
        downstream: Downstream,
        upstream: Option<SocketAddrV4>,
    ) {
        self.access = Some(Box::new(ConnectionLogged {
            log: log.clone(),
            started: Instant::now(),
            downstream,
            upstream,
            received: Counter::default(),
            sent: Counter::default(),
        }));
    }

    /// The connection reached its upstream: counted opened (and active)
    /// now, closed when this is dropped. Returns the byte counters for the
    /// relay.
    pub fn open(&mut self) -> ByteCounters {
        let metrics = &self.metrics;
        if !self.opened {
            self.opened = true;
            for labels in self.reports.iter() {
                metrics.tcp_opened.with(labels, |c| c.inc());
            }
            metrics.active_connections.inc();
        }
        let own = self.access.as_deref();
        ByteCounters {
            received: self
                .reports
                .iter()
                .map(|l| metrics.tcp_received_bytes.get_or_create(l))
                .chain(own.map(|a| a.received.clone()))
                .collect(),
            sent: self
                .reports
                .iter()
                .map(|l| metrics.tcp_sent_bytes.get_or_create(l))
                .chain(own.map(|a| a.sent.clone()))
                .collect(),
        }
    }

    /// Ends a connection that did not reach its upstream, with `flag`.
    pub fn end(mut self, flag: ResponseFlag) {
        for labels in self.reports.iter_mut() {
            labels.response_flags = flag;
        }
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        let metrics = &self.metrics;
        if self.opened {
            metrics.active_connections.dec();
        }
        for labels in self.reports.iter() {
            if !self.opened {
                metrics.tcp_opened.with(labels, |c| c.inc());
            }
            metrics.tcp_closed.with(labels, |c| c.inc());
        }
        if let Some(logged) = self.access.take() {
            logged.log.send(Entry::Connection(Box::new(ConnectionEntry {
                common: Common {
                    start: wall_clock(logged.started),
                    duration: logged.started.elapsed(),
                    labels: self.reports.first.clone(),
                    bytes_received: logged.received.get(),
                    bytes_sent: logged.sent.get(),
                    downstream: logged.downstream,
                    upstream: logged.upstream,
                },
            })));
        }
    }
}

/// The wall-clock time of `instant` (a moment past).
fn wall_clock(instant: Instant) -> std::time::SystemTime {
    let now = std::time::SystemTime::now();
    now.checked_sub(instant.elapsed()).unwrap_or(now)
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

/// One HTTP request: `istio_requests_total`, its duration, sizes and gRPC
/// messages, and one access-log line — for each reporter it is made for.
/// It is recorded when the response's body ends (its duration, bytes and
/// gRPC trailers known then), or when that body is dropped.
pub struct RequestResult {
    metrics: Arc<Metrics>,
    /// The series its connection's last request went to.
    cache: Arc<SeriesCache>,
    reports: Reports<HttpLabels>,
    started: Instant,
    line: RequestLine,
    /// What the request's body carried; none while it is empty.
    request: Option<Arc<Tally>>,
    response_bytes: u64,
    response_messages: u64,
    route: Option<Arc<str>>,
    upstream: Option<SocketAddrV4>,
    /// Tries made (more than one when retried).
    tries: u32,
    /// The spans it is traced with, when tracing.
    traced: Option<Box<Traced>>,
    /// Where its access-log line goes, when it is logged.
    access: Option<Box<Logged>>,
    recorded: bool,
}

/// What a logged request's line needs that its metrics do not.
struct Logged {
    log: Arc<AccessLog>,
    version: hyper::Version,
    headers: RequestHeaders,
    downstream: Downstream,
}

/// A request's spans: one per reporter (the source's a client span, the
/// destination's a server span).
struct Traced {
    tracer: Arc<Tracer>,
    start: std::time::SystemTime,
    spans: [Option<trace::Span>; 2],
}

impl RequestResult {
    /// A request on a connection whose requests share `cache`.
    pub fn new(
        metrics: &Arc<Metrics>,
        cache: &Arc<SeriesCache>,
        reports: Reports<HttpLabels>,
        line: RequestLine,
        started: Instant,
    ) -> Self {
        Self {
            metrics: metrics.clone(),
            cache: cache.clone(),
            reports,
            started,
            line,
            request: None,
            response_bytes: 0,
            response_messages: 0,
            route: None,
            upstream: None,
            tries: 1,
            traced: None,
            access: None,
            recorded: false,
        }
    }

    /// Writes the request's line to `log` once it is recorded.
    pub fn log_access(
        &mut self,
        log: &Arc<AccessLog>,
        version: hyper::Version,
        headers: &hyper::HeaderMap,
        downstream: Downstream,
    ) {
        self.access = Some(Box::new(Logged {
            log: log.clone(),
            version,
            headers: RequestHeaders::of(&self.line.uri, headers),
            downstream,
        }));
    }

    /// Traces the request with `first` (the span of the first reporter)
    /// and, when this node is its destination too, `destination`.
    pub fn set_trace(
        &mut self,
        tracer: &Arc<Tracer>,
        first: trace::Span,
        destination: Option<trace::Span>,
    ) {
        self.traced = Some(Box::new(Traced {
            tracer: tracer.clone(),
            start: wall_clock(self.started),
            spans: [Some(first), destination],
        }));
    }

    pub fn set_tries(&mut self, tries: u32) {
        self.tries = tries;
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn is_grpc(&self) -> bool {
        self.reports.first.connection.request_protocol == "grpc"
    }

    /// The client's request body, counted for this result.
    pub fn count_request<B: hyper::body::Body>(&mut self, body: B) -> Counted<B> {
        // A body empty from the start needs no counting.
        let tally = (!hyper::body::Body::is_end_stream(&body))
            .then(|| self.request.get_or_insert_with(Arc::default).clone());
        Counted::new(body, tally, self.is_grpc())
    }

    pub fn set_route(&mut self, route: &Arc<str>) {
        self.route = Some(route.clone());
    }

    /// The endpoint the (last) try went to, reached by `path`.
    pub fn set_endpoint(
        &mut self,
        endpoint: &Endpoint,
        path: Option<crate::state::snapshot::Path>,
        upstream: SocketAddrV4,
    ) {
        let labels = &mut self.reports.first.connection;
        let namespace = labels.destination_service_namespace.clone();
        super::labels::to_endpoint(labels, endpoint, &namespace, path);
        self.upstream = Some(upstream);
    }

    /// The pod the request went to (at its destination).
    pub fn set_upstream(&mut self, upstream: SocketAddrV4) {
        self.upstream = Some(upstream);
    }

    /// Also reports the request as its destination (this node's workload),
    /// with `labels`.
    pub fn set_destination(&mut self, labels: TcpLabels) {
        self.reports.destination = Some(Box::new(super::labels::http(labels)));
    }

    /// The answer the client gets, with meshd's `flag`: recorded once its
    /// body has been sent (or dropped).
    pub fn finish<B>(mut self, response: Response<B>, flag: ResponseFlag) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    {
        let status = response.status().as_u16();
        let grpc = response.headers().get(GRPC_STATUS).map(grpc_status);
        for labels in self.reports.iter_mut() {
            labels.response_code = status;
            labels.connection.response_flags = flag;
            if let Some(code) = &grpc {
                labels.grpc_response_status = code.clone();
            }
        }
        let frames = self.is_grpc().then(GrpcFrames::default);
        response.map(|inner| {
            Recorded {
                inner,
                result: Some(self),
                frames,
            }
            .boxed()
        })
    }

    /// The request's body, counted by whoever saw it go by.
    pub fn set_request_bytes(&mut self, bytes: u64) {
        self.request
            .get_or_insert_with(Arc::default)
            .bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records an exchange seen rather than served: its answer's status,
    /// body size and meshd's flag.
    pub fn observed(mut self, status: u16, response_bytes: u64, flag: ResponseFlag) {
        for labels in self.reports.iter_mut() {
            labels.response_code = status;
            labels.connection.response_flags = flag;
        }
        self.response_bytes = response_bytes;
        self.record();
    }

    /// What an exchange seen rather than served said of gRPC: the
    /// `grpc-status` of its answer, and the messages each way.
    pub fn set_observed_grpc(&mut self, status: Option<&[u8]>, sent: u64, received: u64) {
        if let Some(status) = status {
            self.set_grpc_status(grpc_code(status));
        }
        self.request
            .get_or_insert_with(Arc::default)
            .messages
            .store(sent, std::sync::atomic::Ordering::Relaxed);
        self.response_messages = received;
    }

    /// Forgets the request unrecorded: what could not be followed is not
    /// reported.
    pub fn discard(mut self) {
        self.recorded = true;
    }

    fn set_grpc_status(&mut self, code: Arc<str>) {
        for labels in self.reports.iter_mut() {
            labels.grpc_response_status = code.clone();
        }
    }

    fn set_flag(&mut self, flag: ResponseFlag) {
        for labels in self.reports.iter_mut() {
            labels.connection.response_flags = flag;
        }
    }

    fn record(&mut self) {
        self.recorded = true;
        let elapsed = self.started.elapsed();
        let sample = RequestSample {
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            request_bytes: self.request.as_ref().map_or(0, |t| t.bytes()),
            response_bytes: self.response_bytes,
            messages: self.is_grpc().then(|| {
                let sent = self.request.as_ref().map_or(0, |t| t.messages());
                (sent, self.response_messages)
            }),
        };
        for (slot, labels) in self.reports.iter().enumerate() {
            self.cache.record(slot, &self.metrics, labels, &sample);
        }
        let trace_id = self
            .traced
            .as_ref()
            .and_then(|t| t.spans[0].as_ref())
            .map(|span| span.context.trace_id);
        if let Some(traced) = self.traced.take() {
            self.export_spans(&traced);
        }
        if let Some(logged) = self.access.take() {
            let Logged {
                log,
                version,
                headers,
                downstream,
            } = *logged;
            let labels = &self.reports.first;
            log.send(Entry::Request(Box::new(RequestEntry {
                common: Common {
                    start: wall_clock(self.started),
                    duration: elapsed,
                    labels: labels.connection.clone(),
                    bytes_received: sample.request_bytes,
                    bytes_sent: sample.response_bytes,
                    downstream,
                    upstream: self.upstream,
                },
                method: self.line.method.clone(),
                uri: self.line.uri.clone(),
                version,
                headers,
                response_code: labels.response_code,
                route: self.route.clone(),
                tries: self.tries,
                trace_id,
            })));
        }
    }
}

impl RequestResult {
    /// Queues this request's sampled spans for export, with OpenTelemetry's
    /// HTTP attributes and the mesh's.
    fn export_spans(&self, traced: &Traced) {
        let end = std::time::SystemTime::now();
        for (slot, labels) in self.reports.iter().enumerate() {
            let Some(span) = traced.spans.get(slot).copied().flatten() else {
                continue;
            };
            if !span.context.sampled {
                continue;
            }
            let server = labels.connection.reporter == "destination";
            let c = &labels.connection;
            let path: String = self.line.uri.path().chars().take(MAX_TRACED_PATH).collect();
            let mut attributes = vec![
                KeyValue::new("http.request.method", span_method(&self.line.method)),
                KeyValue::new("url.path", path),
                KeyValue::new("url.scheme", "http"),
                KeyValue::new("http.response.status_code", i64::from(labels.response_code)),
                KeyValue::new("server.address", c.destination_service.to_string()),
                KeyValue::new("meshd.reporter", c.reporter),
                KeyValue::new("meshd.source.principal", c.source_principal.to_string()),
                KeyValue::new("meshd.source.workload", c.source_workload.to_string()),
                KeyValue::new(
                    "meshd.source.namespace",
                    c.source_workload_namespace.to_string(),
                ),
                KeyValue::new(
                    "meshd.destination.principal",
                    c.destination_principal.to_string(),
                ),
                KeyValue::new(
                    "meshd.destination.workload",
                    c.destination_workload.to_string(),
                ),
                KeyValue::new(
                    "meshd.destination.namespace",
                    c.destination_workload_namespace.to_string(),
                ),
                KeyValue::new(
                    "meshd.destination.service",
                    c.destination_service.to_string(),
                ),
                KeyValue::new("meshd.response_flags", c.response_flags.as_str()),
                KeyValue::new(
                    "meshd.connection_security_policy",
                    c.connection_security_policy,
                ),
                KeyValue::new("meshd.protocol", c.request_protocol),
            ];
            if !server {
                attributes.push(KeyValue::new("meshd.tries", i64::from(self.tries)));
                if let Some(route) = &self.route {
                    attributes.push(KeyValue::new("meshd.route", route.to_string()));
                }
                if let Some(upstream) = self.upstream {
                    attributes.push(KeyValue::new(
                        "network.peer.address",
                        upstream.ip().to_string(),
                    ));
                    attributes.push(KeyValue::new(
                        "network.peer.port",
                        i64::from(upstream.port()),
                    ));
                }
            }
            if !labels.grpc_response_status.is_empty() {
                attributes.push(KeyValue::new(
                    "rpc.grpc.status_code",
                    labels.grpc_response_status.to_string(),
                ));
            }
            // OpenTelemetry: a client span fails on 4xx and 5xx, a server
            // span on 5xx; meshd's own refusals fail either way.
            let code = labels.response_code;
            let error = c.response_flags != ResponseFlag::None
                || code == 0
                || code >= 500
                || (!server && code >= 400);
            traced.tracer.submit(Finished {
                span,
                kind: if server {
                    SpanKind::Server
                } else {
                    SpanKind::Client
                },
                name: std::borrow::Cow::Borrowed(span_method(&self.line.method)),
                start: traced.start,
                end,
                attributes,
                error,
            });
        }
    }
}

/// A traced path is cut to this many characters.
const MAX_TRACED_PATH: usize = 256;

/// A request's method as a span names it: one of HTTP's, else `_OTHER`
/// (OpenTelemetry's rule) — never the bytes a client sent as a method,
/// which could be as long as a request head and would be held in the
/// export queue.
fn span_method(method: &hyper::Method) -> &'static str {
    use hyper::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    const NAMES: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN
        .iter()
        .position(|m| m == method)
        .map_or("_OTHER", |i| NAMES[i])
}

impl Drop for RequestResult {
    fn drop(&mut self) {
        if !self.recorded {
            // The client went away before an answer (or a path forgot to
            // finish).
            self.set_flag(ResponseFlag::DownstreamConnectionTermination);
            self.record();
        }
    }
}

const GRPC_STATUS: &str = "grpc-status";

// === impl Recorded ===

/// A response body on its way to the client: counts its bytes and gRPC
/// messages, reads the gRPC status from its trailers, and records the
/// request when it ends — or when it is dropped before its end (the client
/// went away: `DC`, unless meshd had a flag already).
struct Recorded<B: hyper::body::Body> {
    inner: B,
    result: Option<RequestResult>,
    frames: Option<GrpcFrames>,
}

impl<B: hyper::body::Body> Recorded<B> {
    fn end(&mut self) {
        if let Some(mut result) = self.result.take() {
            result.record();
        }
    }
}

impl<B> hyper::body::Body for Recorded<B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        let Some(result) = this.result.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    result.response_bytes += data.len() as u64;
                    if let Some(frames) = &mut this.frames {
                        result.response_messages += frames.feed(data);
                    }
                } else if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|t| t.get(GRPC_STATUS))
                    .map(grpc_status)
                {
                    result.set_grpc_status(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // The upstream's connection ended mid-body.
                result.set_flag(ResponseFlag::UpstreamConnectionTermination);
                this.end();
            }
            Poll::Ready(None) => this.end(),
            Poll::Pending => {}
        }
        if this.inner.is_end_stream() {
            this.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B: hyper::body::Body> Drop for Recorded<B> {
    fn drop(&mut self) {
        if let Some(result) = &mut self.result {
            let ended = self.inner.is_end_stream();
            if !ended && result.reports.first.connection.response_flags == ResponseFlag::None {
                result.set_flag(ResponseFlag::DownstreamConnectionTermination);
            }
            result.record();
        }
    }
}

/// A gRPC status code as a label: the number of one of the 17 codes, else
/// `unknown` — never the header's bytes as they came.
fn grpc_status(value: &hyper::header::HeaderValue) -> Arc<str> {
    grpc_code(value.as_bytes())
}

/// A `grpc-status` value as a label: `0` to `16`, else `unknown`.
fn grpc_code(value: &[u8]) -> Arc<str> {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let code = std::str::from_utf8(value)
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

    fn config() -> crate::config::Config {
        crate::config::load_str(
            "t.yaml",
            "node: { name: a, captureAddress: 10.77.0.1, podCgroup: /pods }
services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80 }]
    endpoints:
      - { address: 10.77.0.7 }
      - { address: 10.77.0.8, workload: web-1, labels: { app: web, version: v3 } }
workloads:
  - { name: web-1, addresses: [10.77.0.8], labels: { app: web, version: v3 } }
",
        )
        .expect("valid")
    }

    fn tcp_labels() -> TcpLabels {
        let config = config();
        labels::source(&config.cluster, None, &config.services[0], None, "http")
    }

    fn one(labels: TcpLabels) -> Reports<HttpLabels> {
        Reports::one(labels::http(labels))
    }

    fn line() -> RequestLine {
        RequestLine {
            method: hyper::Method::POST,
            uri: "/x".parse().expect("uri"),
        }
    }

    fn series<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    fn text(registry: &Registry) -> String {
        crate::telemetry::metrics::render(registry)
    }

    #[test]
    fn a_connection_that_never_opened_counts_opened_and_closed_with_its_flag() {
        let (registry, metrics) = metrics();
        ConnectionResult::new(&metrics, Reports::one(tcp_labels())).end(ResponseFlag::Rbac);
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
        let mut result = ConnectionResult::new(&metrics, Reports::one(tcp_labels()));
        let bytes = result.open();
        bytes.received[0].inc_by(5);
        assert!(text(&registry).contains("meshd_active_connections 1"));
        drop(result);
        let text = text(&registry);
        assert!(text.contains("meshd_active_connections 0"), "{text}");
        assert!(text.contains("response_flags=\"-\""), "{text}");
    }

    #[test]
    fn a_request_dropped_unfinished_is_counted_as_the_client_going_away() {
        let (registry, metrics) = metrics();
        drop(RequestResult::new(
            &metrics,
            &Arc::default(),
            one(tcp_labels()),
            line(),
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

    /// A gRPC answer: headers, two messages, trailers with `status`.
    fn grpc_answer(status: &'static str) -> Response<Body> {
        let mut message = vec![0, 0, 0, 0, 2, b'h', b'i'];
        message.extend_from_slice(&[0, 0, 0, 0, 1, b'!']);
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert(GRPC_STATUS, hyper::header::HeaderValue::from_static(status));
        let frames = vec![
            hyper::body::Frame::data(Bytes::from(message)),
            hyper::body::Frame::trailers(trailers),
        ];
        Response::new(Frames(frames.into()).boxed())
    }

    /// A body of these frames, then its end; or, empty from the start, one
    /// that never ends.
    struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
            match self.0.pop_front() {
                Some(frame) => std::task::Poll::Ready(Some(Ok(frame))),
                None => std::task::Poll::Ready(None),
            }
        }
    }

    struct Never;

    impl hyper::body::Body for Never {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn grpc_status_and_messages_are_read_from_the_answer_as_it_is_sent() {
        let (registry, metrics) = metrics();
        let config = config();
        let labels = labels::source(&config.cluster, None, &config.services[0], None, "grpc");
        let result = RequestResult::new(
            &metrics,
            &Arc::default(),
            one(labels),
            line(),
            Instant::now(),
        );
        let answer = result.finish(grpc_answer("0"), ResponseFlag::None);
        let text_before = text(&registry);
        assert!(
            series(&text_before, "istio_requests_total{").is_empty(),
            "recorded before the body ended: {text_before}"
        );
        answer.into_body().collect().await.expect("body");
        let text = text(&registry);
        let requests = series(&text, "istio_requests_total{");
        assert_eq!(requests.len(), 1, "{text}");
        assert!(
            requests[0].contains("grpc_response_status=\"0\"") && requests[0].ends_with(" 1"),
            "{text}"
        );
        let messages = series(&text, "istio_response_messages_total{");
        assert!(messages.len() == 1 && messages[0].ends_with(" 2"), "{text}");
        let size = series(&text, "istio_response_bytes_sum{");
        assert!(size.len() == 1 && size[0].ends_with(" 13.0"), "{text}");
    }

    #[tokio::test]
    async fn an_answer_cut_off_mid_body_is_the_client_going_away() {
        let (registry, metrics) = metrics();
        let result = RequestResult::new(
            &metrics,
            &Arc::default(),
            one(tcp_labels()),
            line(),
            Instant::now(),
        );
        let answer = result.finish(Response::new(Never), ResponseFlag::None);
        drop(answer);
        let text = text(&registry);
        let requests = series(&text, "istio_requests_total{");
        assert!(
            requests.len() == 1
                && requests[0].contains("response_flags=\"DC\"")
                && requests[0].contains("response_code=\"200\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn one_meshd_on_both_sides_reports_both() {
        let (registry, metrics) = metrics();
        let config = config();
        let service = &config.services[0];
        let source = &config.workloads[0];
        let mut result = RequestResult::new(
            &metrics,
            &Arc::default(),
            one(labels::source(
                &config.cluster,
                Some(source),
                service,
                None,
                "http",
            )),
            line(),
            Instant::now(),
        );
        result.set_endpoint(
            &service.endpoints[1],
            Some(crate::state::snapshot::Path::Local),
            "10.77.0.8:80".parse().expect("addr"),
        );
        result.set_destination(labels::destination(
            &config.cluster,
            labels::Peer::local(Some(source)),
            &config.workloads[0],
            Some(service),
            labels::Security::None,
            "http",
        ));
        let answer = http_body_util::Full::new(Bytes::from_static(b"ok"))
            .map_err(|never| match never {})
            .boxed();
        let answer = result.finish(Response::new(answer), ResponseFlag::None);
        answer.into_body().collect().await.expect("body");
        let text = text(&registry);
        let requests = series(&text, "istio_requests_total{");
        assert_eq!(requests.len(), 2, "{text}");
        let source = requests
            .iter()
            .find(|l| l.contains("reporter=\"source\""))
            .expect("source");
        let destination = requests
            .iter()
            .find(|l| l.contains("reporter=\"destination\""))
            .expect("destination");
        for want in [
            "destination_canonical_service=\"web\"",
            "destination_canonical_revision=\"v3\"",
            "destination_app=\"web\"",
            "destination_cluster=\"Kubernetes\"",
            "source_cluster=\"Kubernetes\"",
        ] {
            assert!(
                source.contains(want) && destination.contains(want),
                "{want}: {text}"
            );
        }
        assert!(
            source.contains("connection_security_policy=\"none\""),
            "{source}"
        );
        assert!(
            destination.contains("connection_security_policy=\"none\""),
            "{destination}"
        );
    }

    #[test]
    fn an_endpoint_without_a_workload_has_no_namespace_either() {
        let config = config();
        let service = &config.services[0];
        let mut labels = labels::source(&config.cluster, None, service, None, "tcp");
        labels::to_endpoint(&mut labels, &service.endpoints[0], &service.namespace, None);
        assert_eq!(&*labels.destination_workload, "unknown");
        assert_eq!(&*labels.destination_workload_namespace, "unknown");
        assert_eq!(&*labels.destination_principal, "unknown");
        assert_eq!(&*labels.destination_canonical_service, "unknown");
        labels::to_endpoint(&mut labels, &service.endpoints[1], &service.namespace, None);
        assert_eq!(&*labels.destination_workload_namespace, "default");
    }

    #[test]
    fn a_span_names_only_http_methods() {
        assert_eq!(span_method(&hyper::Method::PATCH), "PATCH");
        let long = hyper::Method::from_bytes("X".repeat(10_000).as_bytes()).expect("a token");
        assert_eq!(span_method(&long), "_OTHER");
        let odd = hyper::Method::from_bytes(b"get").expect("a token");
        assert_eq!(span_method(&odd), "_OTHER");
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
