//! Prometheus metrics: Istio's standard metrics, so existing dashboards
//! and Kiali work unchanged, and `meshd_*` metrics about the proxy itself.
//!
//! Label values are interned `Arc<str>` taken from the config snapshot, so a
//! connection builds its label set without formatting anything.

use std::sync::Arc;

use crate::state::snapshot::Snapshot;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Istio's `istio_request_duration_milliseconds` buckets.
pub const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's request and response size buckets (bytes).
pub const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// Istio's label set for `istio_requests_total` and the request histograms:
/// the TCP labels plus the response code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    #[prometheus(flatten)]
    pub connection: TcpLabels,
    pub response_code: u16,
    pub grpc_response_status: Arc<str>,
}

type HistogramFamily = Capped<HttpLabels, Histogram>;

/// A metric family that holds at most `cap` series. Its label values come
/// from the config, certificates and closed sets, but their product grows
/// with the mesh and the traffic; a label set beyond the cap is counted in
/// `meshd_metric_series_dropped_total{metric}` and its samples go to a
/// series that is never exported, so a scrape stays bounded.
pub struct Capped<S, M> {
    family: Family<S, M, fn() -> M>,
    cap: usize,
    /// Series created (a race may count one twice: never under).
    series: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Counter,
    spare: M,
}

impl<S, M: Clone> Clone for Capped<S, M> {
    fn clone(&self) -> Self {
        Self {
            family: self.family.clone(),
            cap: self.cap,
            series: self.series.clone(),
            dropped: self.dropped.clone(),
            spare: self.spare.clone(),
        }
    }
}

impl<S, M> Capped<S, M>
where
    S: Clone + std::hash::Hash + Eq,
    M: Clone,
{
    fn new(constructor: fn() -> M, cap: usize, dropped: Counter) -> Self {
        Self {
            family: Family::new_with_constructor(constructor),
            cap,
            series: Default::default(),
            dropped,
            spare: constructor(),
        }
    }

    /// Runs `f` on the series for `labels` (created while the family has
    /// room), without taking a handle of its own: the per-request path.
    pub fn with<R>(&self, labels: &S, f: impl FnOnce(&M) -> R) -> R {
        if let Some(metric) = self.family.get(labels) {
            return f(&metric);
        }
        use std::sync::atomic::Ordering;
        if self.series.load(Ordering::Relaxed) >= self.cap {
            self.dropped.inc();
            return f(&self.spare);
        }
        self.series.fetch_add(1, Ordering::Relaxed);
        f(&self.family.get_or_create(labels))
    }

    /// A handle on the series for `labels`, created while the family has
    /// room (for a counter fed for a connection's life).
    pub fn get_or_create(&self, labels: &S) -> M {
        self.with(labels, M::clone)
    }

    /// A handle on the series for `labels`, and, when the family was full,
    /// the counter its samples must be counted in as dropped.
    fn handle(&self, labels: &S) -> (M, Option<Counter>) {
        if let Some(metric) = self.family.get(labels) {
            return (metric.clone(), None);
        }
        use std::sync::atomic::Ordering;
        if self.series.load(Ordering::Relaxed) >= self.cap {
            return (self.spare.clone(), Some(self.dropped.clone()));
        }
        self.series.fetch_add(1, Ordering::Relaxed);
        (self.family.get_or_create(labels).clone(), None)
    }
}

impl<S, M> std::fmt::Debug for Capped<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capped").field("cap", &self.cap).finish()
    }
}

impl<S, M> prometheus_client::encoding::EncodeMetric for Capped<S, M>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet,
    M: prometheus_client::encoding::EncodeMetric + prometheus_client::metrics::TypedMetric,
{
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.family.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        self.family.is_empty()
    }
}

/// `istio_build`'s labels, as Istio's proxies report them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// `proxy`: the data plane.
    pub component: &'static str,
    /// meshd's version.
    pub tag: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetricLabels {
    /// The metric family's exported name.
    pub metric: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// Istio's label set for `istio_tcp_*`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub request_protocol: &'static str,
    pub response_flags: crate::telemetry::ResponseFlag,
    pub connection_security_policy: &'static str,
}

/// Why a captured connection could not be relayed before it reached an endpoint.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UnresolvedReason {
    /// No original destination was recorded for the client's address.
    no_original_destination,
    /// The original destination is not a service or meshed pod in the config.
    unknown_destination,
    /// The service has no endpoints.
    no_endpoints,
    /// The endpoint's node is not in the config's node list.
    unknown_node,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: UnresolvedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (this meshd accepting a tunnel) or `outbound`.
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyLabels {
    pub source_principal: Arc<str>,
    pub destination_principal: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub destination_service: Arc<str>,
    /// `service` or `source`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    pub destination_service: Arc<str>,
    /// `requests`, `pending` or `connections`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub destination_service: Arc<str>,
    /// What failed: `connect-failure`, `reset`, `timeout`, `5xx`,
    /// `gateway-error`, `status` or `grpc`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub destination_service: Arc<str>,
    /// `pass` or `fail`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `outbound`, `inbound`, `metrics`, `readiness` or `admin`.
    pub listener: &'static str,
    /// `fd_exhausted`, `max_connections`, `max_per_source` or
    /// `max_handshakes`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `outbound`, `inbound`, `metrics`, `readiness` or `admin`.
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub event: &'static str,
}

/// Every metric meshd exports.
pub struct Metrics {
    pub tcp_opened: Capped<TcpLabels, Counter>,
    pub tcp_closed: Capped<TcpLabels, Counter>,
    pub tcp_sent_bytes: Capped<TcpLabels, Counter>,
    pub tcp_received_bytes: Capped<TcpLabels, Counter>,
    /// Captured connections currently relayed.
    pub active_connections: Gauge,
    pub unresolved: Family<ReasonLabels, Counter>,
    pub upstream_connect_failures: Family<ServiceLabels, Counter>,
    pub accept_errors: Counter,
    pub bpf_map_entries: Family<MapLabels, Gauge>,
    pub bpf_events: Family<CounterLabels, Gauge>,
    pub sk_msg_enabled: Gauge,
    pub ready: Gauge,
    pub tls_handshake_failures: Family<HandshakeLabels, Counter>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    pub authorization_denied: Capped<DenyLabels, Counter>,
    /// Pooled mTLS connections to other nodes.
    pub tunnel_connections: Gauge,
    pub requests: Capped<HttpLabels, Counter>,
    /// gRPC messages each way (`istio_request_messages_total`, `_response_`).
    pub request_messages: Capped<HttpLabels, Counter>,
    pub response_messages: Capped<HttpLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
    pub circuit_breaker_rejections: Family<BreakerLabels, Counter>,
    /// 1 while a service's limit is reached; refreshed at each scrape.
    pub circuit_breaker_open: Family<BreakerLabels, Gauge>,
    pub retries: Family<RetryLabels, Counter>,
    pub retry_budget_exhausted: Family<ServiceLabels, Counter>,
    pub outlier_ejections: Family<ServiceLabels, Counter>,
    /// Endpoints ejected now; refreshed at each scrape.
    pub outlier_ejected: Family<ServiceLabels, Gauge>,
    pub health_checks: Family<HealthLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub connections_shed: Family<ShedLabels, Counter>,
    pub connections_idle_closed: Family<ListenerLabels, Counter>,
    /// The process's own state, read at each scrape.
    pub resident_memory: Gauge,
    pub open_fds: Gauge,
    pub max_fds: Gauge,
    /// 1 when the last reload was applied, 0 when it was refused.
    pub config_last_reload_ok: Gauge,
    /// Seconds the last reload took, from reading the files to the new
    /// config serving (or to its refusal).
    pub config_last_reload_duration: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Endpoints failing their health check now; refreshed at each scrape.
    pub unhealthy_endpoints: Family<ServiceLabels, Gauge>,
    pub request_duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub series_dropped: Family<MetricLabels, Counter>,
    pub spans_exported: Counter,
    pub spans_dropped: Family<DropLabels, Counter>,
    pub access_log_dropped: Family<DropLabels, Counter>,
}

/// Why spans or access-log lines were dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full`, `export_failed` (spans), `write_failed` (lines).
    pub reason: &'static str,
}

/// The series one request label set is recorded in, looked up once: a
/// request recorded into them touches no family's map.
#[derive(Clone)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
    /// gRPC requests only: (from the client, from the server).
    pub messages: Option<(Counter, Counter)>,
    /// Set when a family was full: each request recorded counts here.
    dropped: Vec<Counter>,
}

impl RequestSeries {
    /// Records one request.
    pub fn record(&self, sample: &RequestSample) {
        self.requests.inc();
        self.duration.observe(sample.duration_ms);
        self.request_bytes.observe(sample.request_bytes as f64);
        self.response_bytes.observe(sample.response_bytes as f64);
        if let (Some((up, down)), Some((sent, received))) = (&self.messages, sample.messages) {
            up.inc_by(sent);
            down.inc_by(received);
        }
        for dropped in &self.dropped {
            dropped.inc();
        }
    }
}

/// What one request measured.
pub struct RequestSample {
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages (from the client, from the server).
    pub messages: Option<(u64, u64)>,
}

/// The last label set a connection's requests were recorded with (one per
/// reporter) and its series: most requests on a connection share their
/// labels, so most are recorded without hashing 20-odd labels into each of
/// six families.
#[derive(Default)]
pub struct SeriesCache {
    last: [std::sync::Mutex<Option<(HttpLabels, RequestSeries)>>; 2],
}

impl SeriesCache {
    /// Records `sample` under `labels` for reporter slot `slot` (0 or 1).
    pub fn record(
        &self,
        slot: usize,
        metrics: &Metrics,
        labels: &HttpLabels,
        sample: &RequestSample,
    ) {
        // Another request of the connection recording now: no waiting.
        let Some(mut last) = self.last.get(slot).and_then(|l| l.try_lock().ok()) else {
            return metrics.request_series(labels).record(sample);
        };
        match &*last {
            Some((cached, series)) if cached == labels => series.record(sample),
            _ => {
                let series = metrics.request_series(labels);
                series.record(sample);
                *last = Some((labels.clone(), series));
            }
        }
    }
}

impl Metrics {
    /// The series of every request family for `labels`.
    pub fn request_series(&self, labels: &HttpLabels) -> RequestSeries {
        fn take<M>(dropped: &mut Vec<Counter>, (metric, full): (M, Option<Counter>)) -> M {
            dropped.extend(full);
            metric
        }
        let mut dropped = Vec::new();
        let d = &mut dropped;
        let requests = take(d, self.requests.handle(labels));
        let duration = take(d, self.request_duration.handle(labels));
        let request_bytes = take(d, self.request_bytes.handle(labels));
        let response_bytes = take(d, self.response_bytes.handle(labels));
        let messages = (labels.connection.request_protocol == "grpc").then(|| {
            (
                take(d, self.request_messages.handle(labels)),
                take(d, self.response_messages.handle(labels)),
            )
        });
        RequestSeries {
            requests,
            duration,
            request_bytes,
            response_bytes,
            messages,
            dropped,
        }
    }

    pub fn new(registry: &mut Registry) -> Self {
        let cap = crate::config::ProxySpec::default().max_series_per_metric;
        Self::with_series_cap(registry, cap)
    }

    /// With at most `cap` series in each family fed by traffic.
    pub fn with_series_cap(registry: &mut Registry, cap: usize) -> Self {
        let series_dropped = Family::<MetricLabels, Counter>::default();
        fn capped<S, M>(
            dropped: &Family<MetricLabels, Counter>,
            cap: usize,
            metric: &'static str,
            constructor: fn() -> M,
        ) -> Capped<S, M>
        where
            S: Clone + std::hash::Hash + Eq,
            M: Clone,
        {
            let dropped = dropped.get_or_create_owned(&MetricLabels { metric });
            Capped::new(constructor, cap, dropped)
        }
        let counter = Counter::default as fn() -> Counter;
        let drops = &series_dropped;
        let metrics = Self {
            tcp_opened: capped(drops, cap, "istio_tcp_connections_opened_total", counter),
            tcp_closed: capped(drops, cap, "istio_tcp_connections_closed_total", counter),
            tcp_sent_bytes: capped(drops, cap, "istio_tcp_sent_bytes_total", counter),
            tcp_received_bytes: capped(drops, cap, "istio_tcp_received_bytes_total", counter),
            active_connections: Gauge::default(),
            unresolved: Family::default(),
            upstream_connect_failures: Family::default(),
            accept_errors: Counter::default(),
            bpf_map_entries: Family::default(),
            bpf_events: Family::default(),
            sk_msg_enabled: Gauge::default(),
            ready: Gauge::default(),
            tls_handshake_failures: Family::default(),
            certificate_expiry: Family::default(),
            authorization_denied: capped(drops, cap, "meshd_authorization_denied_total", counter),
            tunnel_connections: Gauge::default(),
            requests: capped(drops, cap, "istio_requests_total", counter),
            request_messages: capped(drops, cap, "istio_request_messages_total", counter),
            response_messages: capped(drops, cap, "istio_response_messages_total", counter),
            rate_limited: Family::default(),
            circuit_breaker_rejections: Family::default(),
            circuit_breaker_open: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            outlier_ejections: Family::default(),
            outlier_ejected: Family::default(),
            health_checks: Family::default(),
            config_reloads: Family::default(),
            connections_shed: Family::default(),
            connections_idle_closed: Family::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            config_last_reload_ok: Gauge::default(),
            config_last_reload_duration: Gauge::default(),
            unhealthy_endpoints: Family::default(),
            request_duration: capped(
                drops,
                cap,
                "istio_request_duration_milliseconds",
                duration_histogram,
            ),
            request_bytes: capped(drops, cap, "istio_request_bytes", size_histogram),
            response_bytes: capped(drops, cap, "istio_response_bytes", size_histogram),
            series_dropped,
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            access_log_dropped: Family::default(),
        };
        let spans = &metrics;
        for reason in ["queue_full", "export_failed"] {
            let _ = spans.spans_dropped.get_or_create(&DropLabels { reason });
        }
        for reason in ["queue_full", "write_failed"] {
            let _ = spans
                .access_log_dropped
                .get_or_create(&DropLabels { reason });
        }
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "Total TCP connections opened",
            metrics.tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "Total TCP connections closed",
            metrics.tcp_closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent to the client (response direction) over TCP connections",
            metrics.tcp_sent_bytes.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received from the client (request direction) over TCP connections",
            metrics.tcp_received_bytes.clone(),
        );
        istio.register("requests", "Total requests", metrics.requests.clone());
        istio.register(
            "request_messages",
            "gRPC messages sent by clients",
            metrics.request_messages.clone(),
        );
        istio.register(
            "response_messages",
            "gRPC messages sent by servers",
            metrics.response_messages.clone(),
        );
        // Istio's dashboards list the mesh's components by version from it.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "proxy",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        istio.register("build", "Istio component build info", build);
        istio.register(
            "request_duration_milliseconds",
            "Time from request start to the end of the response, in milliseconds",
            metrics.request_duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Request body sizes in bytes, as received",
            metrics.request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Response body sizes in bytes, as sent",
            metrics.response_bytes.clone(),
        );
        let meshd = registry.sub_registry_with_prefix("meshd");
        meshd.register(
            "spans_exported",
            "Spans the OTLP collector accepted",
            metrics.spans_exported.clone(),
        );
        meshd.register(
            "spans_dropped",
            "Spans not exported: the queue was full, or the collector failed the export",
            metrics.spans_dropped.clone(),
        );
        meshd.register(
            "access_log_dropped",
            "Access-log lines not written: the queue was full, or the write failed",
            metrics.access_log_dropped.clone(),
        );
        meshd.register(
            "active_connections",
            "Captured connections meshd is relaying now",
            metrics.active_connections.clone(),
        );
        meshd.register(
            "unresolved_destinations",
            "Captured connections closed at once because their destination could not be resolved",
            metrics.unresolved.clone(),
        );
        meshd.register(
            "upstream_connect_failures",
            "Connections to an endpoint that failed or timed out",
            metrics.upstream_connect_failures.clone(),
        );
        meshd.register(
            "accept_errors",
            "Errors accepting captured connections (e.g. out of file descriptors)",
            metrics.accept_errors.clone(),
        );
        meshd.register(
            "bpf_map_entries",
            "Entries in meshd's BPF maps",
            metrics.bpf_map_entries.clone(),
        );
        meshd.register(
            "bpf_events",
            "Events counted by meshd's eBPF programs since they were loaded",
            metrics.bpf_events.clone(),
        );
        meshd.register(
            "sk_msg_enabled",
            "1 when same-node acceleration (sk_msg) is on",
            metrics.sk_msg_enabled.clone(),
        );
        meshd.register(
            "ready",
            "1 once programs are attached and listeners bound",
            metrics.ready.clone(),
        );
        meshd.register(
            "tls_handshake_failures",
            "Tunnel TLS handshakes that failed, by direction and reason",
            metrics.tls_handshake_failures.clone(),
        );
        meshd.register(
            "certificate_expiry_seconds",
            "Seconds until each workload certificate meshd holds expires",
            metrics.certificate_expiry.clone(),
        );
        meshd.register(
            "authorization_denied",
            "Connections refused by authorization policy at their destination",
            metrics.authorization_denied.clone(),
        );
        meshd.register(
            "circuit_breaker_rejections",
            "Requests shed with 503 (flag UO) by a circuit-breaker limit",
            metrics.circuit_breaker_rejections.clone(),
        );
        meshd.register(
            "circuit_breaker_open",
            "1 while a service's circuit-breaker limit is reached on this node",
            metrics.circuit_breaker_open.clone(),
        );
        meshd.register(
            "retries",
            "HTTP requests tried again, by the reason the previous try failed",
            metrics.retries.clone(),
        );
        meshd.register(
            "retry_budget_exhausted",
            "Retriable failures not retried because the service's retry budget was spent",
            metrics.retry_budget_exhausted.clone(),
        );
        meshd.register(
            "outlier_ejections",
            "Endpoints ejected from rotation after failing requests in a row",
            metrics.outlier_ejections.clone(),
        );
        meshd.register(
            "outlier_ejected_endpoints",
            "Endpoints out of rotation now by outlier detection",
            metrics.outlier_ejected.clone(),
        );
        meshd.register(
            "health_checks",
            "Active health checks of this node's endpoints, by result",
            metrics.health_checks.clone(),
        );
        meshd.register(
            "unhealthy_endpoints",
            "Endpoints out of rotation now because their health check fails",
            metrics.unhealthy_endpoints.clone(),
        );
        meshd.register(
            "connections_shed",
            "New connections reset at once because meshd could not take them (out of file descriptors, or a listener's connection or handshake cap reached)",
            metrics.connections_shed.clone(),
        );
        meshd.register(
            "metric_series_dropped",
            "Samples not recorded because their metric family held proxy.maxSeriesPerMetric series",
            metrics.series_dropped.clone(),
        );
        meshd.register(
            "connections_idle_closed",
            "Connections closed after proxy.idleTimeout without a byte either way",
            metrics.connections_idle_closed.clone(),
        );
        // The names every Prometheus client library uses for these.
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            metrics.resident_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            metrics.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            metrics.max_fds.clone(),
        );
        let meshd = registry.sub_registry_with_prefix("meshd");
        meshd.register(
            "config_reloads",
            "Config reloads, applied (ok) or refused (error)",
            metrics.config_reloads.clone(),
        );
        meshd.register(
            "config_last_reload_successful",
            "1 when the last config reload was applied, 0 when it was refused",
            metrics.config_last_reload_ok.clone(),
        );
        meshd.register_with_unit(
            "config_last_reload_duration",
            "How long the last config reload took, from reading the files to the new config serving (or to its refusal)",
            prometheus_client::registry::Unit::Seconds,
            metrics.config_last_reload_duration.clone(),
        );
        meshd.register(
            "rate_limited",
            "HTTP requests refused with 429 by a local rate limit",
            metrics.rate_limited.clone(),
        );
        meshd.register(
            "tunnel_connections",
            "Pooled mTLS connections to other nodes' meshd",
            metrics.tunnel_connections.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// Sets the gauges that describe the state at `now`: open circuit
    /// breakers, ejected and unhealthy endpoints.
    pub fn export_state(&self, snapshot: &Snapshot, now: u64) {
        for (s, service) in snapshot.config.services.iter().enumerate() {
            let limits = &service.circuit_breaker;
            let limited = limits.max_requests.is_some()
                || limits.max_connections.is_some()
                || limits.max_pending_requests.is_some();
            // Most services of a large mesh have none of these: each scrape
            // passes over them without a label or a lookup.
            if !limited && service.outlier.is_none() && service.health_check.is_none() {
                continue;
            }
            let labels = ServiceLabels {
                destination_service: service.hostname.clone(),
            };
            let breaker = |limit| BreakerLabels {
                destination_service: service.hostname.clone(),
                limit,
            };
            let runtime = snapshot.service_runtime(s);
            if let Some(limit) = limits.max_requests {
                let open = runtime.requests_in_flight() >= limit;
                self.circuit_breaker_open
                    .get_or_create(&breaker("requests"))
                    .set(i64::from(open));
            }
            let (connections, pending) = runtime.connections.state();
            if limits.max_connections.is_some() {
                self.circuit_breaker_open
                    .get_or_create(&breaker("connections"))
                    .set(i64::from(connections));
            }
            if limits.max_pending_requests.is_some() {
                self.circuit_breaker_open
                    .get_or_create(&breaker("pending"))
                    .set(i64::from(pending));
            }
            if service.outlier.is_some() {
                self.outlier_ejected
                    .get_or_create(&labels)
                    .set(snapshot.ejected_count(s, now) as i64);
            }
            if service.health_check.is_some() {
                self.unhealthy_endpoints
                    .get_or_create(&labels)
                    .set(snapshot.unhealthy_count(s) as i64);
            }
        }
    }

    /// A captured connection or request whose destination could not be
    /// resolved.
    pub fn unresolved(&self, reason: UnresolvedReason) {
        self.unresolved
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A request refused by one of `service`'s rate limits.
    pub fn rate_limited(&self, service: &Arc<str>, limit: crate::policy::ratelimit::Refused) {
        let limit = match limit {
            crate::policy::ratelimit::Refused::Service => "service",
            crate::policy::ratelimit::Refused::Source => "source",
        };
        self.rate_limited
            .get_or_create(&RateLimitLabels {
                destination_service: service.clone(),
                limit,
            })
            .inc();
    }

    /// A request or connection shed by `service`'s circuit-breaker `limit`
    /// (`requests`, `pending` or `connections`).
    pub fn breaker_tripped(&self, service: &Arc<str>, limit: &'static str) {
        self.circuit_breaker_rejections
            .get_or_create(&BreakerLabels {
                destination_service: service.clone(),
                limit,
            })
            .inc();
    }

    /// A request of `service` tried again, for `reason`.
    pub fn retried(&self, service: &Arc<str>, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                destination_service: service.clone(),
                reason,
            })
            .inc();
    }

    /// A retriable failure of `service` not retried: the budget is spent.
    pub fn retry_budget_exhausted(&self, service: &Arc<str>) {
        self.retry_budget_exhausted
            .get_or_create(&ServiceLabels {
                destination_service: service.clone(),
            })
            .inc();
    }

    /// An endpoint of `service` ejected by outlier detection.
    pub fn ejected(&self, service: &Arc<str>) {
        self.outlier_ejections
            .get_or_create(&ServiceLabels {
                destination_service: service.clone(),
            })
            .inc();
    }

    /// A connection to an endpoint of `service` that failed or timed out.
    pub fn upstream_connect_failed(&self, service: &Arc<str>) {
        self.upstream_connect_failures
            .get_or_create(&ServiceLabels {
                destination_service: service.clone(),
            })
            .inc();
    }

    /// A connection or request refused by authorization policy.
    pub fn denied(&self, source: Arc<str>, destination: Arc<str>) {
        self.authorization_denied
            .get_or_create(&DenyLabels {
                source_principal: source,
                destination_principal: destination,
            })
            .inc();
    }

    /// The counters `listener`'s accept loop feeds.
    pub fn accept_counters(&self, listener: &'static str) -> crate::net::accept::AcceptCounters {
        crate::net::accept::AcceptCounters {
            errors: self.accept_errors.clone(),
            shed: self.shed(listener, "fd_exhausted"),
            over_max: self.shed(listener, "max_connections"),
            over_per_source: self.shed(listener, "max_per_source"),
            idle_closed: self.idle_closed(listener),
        }
    }

    /// The counter of `listener`'s connections closed for idleness.
    pub fn idle_closed(&self, listener: &'static str) -> Counter {
        self.connections_idle_closed
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// What the span exporter counts in.
    pub fn span_counters(&self) -> super::spans::SpanCounters {
        let dropped = |reason| {
            self.spans_dropped
                .get_or_create_owned(&DropLabels { reason })
        };
        super::spans::SpanCounters {
            exported: self.spans_exported.clone(),
            queue_full: dropped("queue_full"),
            export_failed: dropped("export_failed"),
        }
    }

    /// What the access log counts its lost lines in.
    pub fn access_log_counters(&self) -> super::access::AccessLogCounters {
        let dropped = |reason| {
            self.access_log_dropped
                .get_or_create_owned(&DropLabels { reason })
        };
        super::access::AccessLogCounters {
            queue_full: dropped("queue_full"),
            write_failed: dropped("write_failed"),
        }
    }

    /// The counter of `listener`'s connections shed for `reason`.
    pub fn shed(&self, listener: &'static str, reason: &'static str) -> Counter {
        self.connections_shed
            .get_or_create(&ShedLabels { listener, reason })
            .clone()
    }
}

/// Renders `registry` in the Prometheus text format (0.0.4), which every
/// Prometheus, promtool and agent reads.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    prometheus_text(&out)
}

/// OpenMetrics text (what the encoder writes) as Prometheus text: counter
/// families are named with their `_total` suffix in `HELP` and `TYPE`, and
/// the OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_family_keeps_its_series_and_counts_the_rest() {
        let dropped = Counter::default();
        let family: Capped<MetricLabels, Counter> =
            Capped::new(Counter::default as fn() -> Counter, 2, dropped.clone());
        for metric in ["a", "b", "c", "a", "d", "b"] {
            family.get_or_create(&MetricLabels { metric }).inc();
        }
        let mut registry = Registry::default();
        registry.register("capped", "test", family.clone());
        let text = render(&registry);
        assert!(text.contains("capped_total{metric=\"a\"} 2"), "{text}");
        assert!(text.contains("capped_total{metric=\"b\"} 2"), "{text}");
        assert!(!text.contains("metric=\"c\""), "{text}");
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn istio_names_are_exported() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let unknown: Arc<str> = "unknown".into();
        let labels = TcpLabels {
            reporter: "source",
            source_workload: "productpage-v1".into(),
            source_workload_namespace: "default".into(),
            source_principal: unknown.clone(),
            source_app: unknown.clone(),
            source_version: unknown.clone(),
            source_canonical_service: "productpage".into(),
            source_canonical_revision: "v1".into(),
            source_cluster: "Kubernetes".into(),
            destination_workload: "reviews-v1".into(),
            destination_workload_namespace: "default".into(),
            destination_principal: unknown.clone(),
            destination_app: unknown.clone(),
            destination_version: unknown.clone(),
            destination_canonical_service: "reviews".into(),
            destination_canonical_revision: "latest".into(),
            destination_service: "reviews.default.svc.cluster.local".into(),
            destination_service_name: "reviews".into(),
            destination_service_namespace: "default".into(),
            destination_cluster: "Kubernetes".into(),
            request_protocol: "tcp",
            response_flags: crate::telemetry::ResponseFlag::None,
            connection_security_policy: "unknown",
        };
        metrics.tcp_opened.get_or_create(&labels).inc();
        let _ = metrics.unresolved.get_or_create(&ReasonLabels {
            reason: UnresolvedReason::unknown_destination,
        });
        let text = render(&registry);
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"productpage-v1\""), "{text}");
        assert!(
            text.contains("meshd_unresolved_destinations_total{reason=\"unknown_destination\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE meshd_active_connections gauge"),
            "{text}"
        );
        let build = format!(
            "istio_build{{component=\"proxy\",tag=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
    }

    #[test]
    fn counters_are_named_with_their_total_suffix_in_prometheus_text() {
        let openmetrics = "# HELP istio_requests Total requests.\n# TYPE istio_requests counter\nistio_requests_total{a=\"b\"} 3\n# HELP meshd_ready 1 while ready.\n# TYPE meshd_ready gauge\n# UNIT meshd_ready x\nmeshd_ready 1\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP istio_requests_total Total requests.\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"b\"} 3\n# HELP meshd_ready 1 while ready.\n# TYPE meshd_ready gauge\nmeshd_ready 1\n"
        );
    }
}
