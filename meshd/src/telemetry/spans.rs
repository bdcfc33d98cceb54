//! The spans meshd makes for requests, and their export over OTLP (gRPC or
//! HTTP/protobuf) with the `opentelemetry-otlp` exporter. A bounded queue
//! stands in front of one export task: a request only ever tries to put
//! its span in the queue, so a slow or dead collector never holds a request
//! up — spans that do not fit, or whose export failed, are counted and
//! dropped.

use std::{borrow::Cow, sync::Arc, time::Duration};

use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
    Resource,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::trace::Span;
use crate::config::{OtlpProtocol, TracingSpec};

#[derive(Debug, thiserror::Error)]
#[error("cannot export spans to {endpoint}: {source}")]
pub struct ExporterError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// What records a request's spans: the sampling ratio for new traces, and
/// the queue to the export task.
pub struct Tracer {
    ratio: f64,
    queue: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    dropped: Counter,
}

/// Counters of what became of the spans.
#[derive(Clone)]
pub struct SpanCounters {
    pub exported: Counter,
    /// Spans that found the queue full.
    pub queue_full: Counter,
    /// Spans in a batch the collector did not take.
    pub export_failed: Counter,
}

impl Tracer {
    /// Builds the exporter for `spec` and starts its task (on the current
    /// runtime); `node` names this meshd in the spans' resource.
    pub fn start(
        spec: &TracingSpec,
        node: &str,
        counters: SpanCounters,
    ) -> Result<Arc<Self>, ExporterError> {
        let failed = |source| ExporterError {
            endpoint: spec.endpoint.clone(),
            source,
        };
        let mut exporter = match spec.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(spec.endpoint.clone())
                .with_timeout(spec.export_timeout)
                .build()
                .map_err(failed)?,
            OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(http_endpoint(&spec.endpoint))
                .with_timeout(spec.export_timeout)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build()
                .map_err(failed)?,
        };
        exporter.set_resource(
            &Resource::builder()
                .with_service_name("meshd")
                .with_attributes([
                    KeyValue::new("service.instance.id", node.to_owned()),
                    KeyValue::new("k8s.node.name", node.to_owned()),
                    KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                ])
                .build(),
        );
        let (queue, spans) = mpsc::channel(spec.max_queue);
        let batch = spec.max_batch;
        tokio::spawn(export(spans, exporter, batch, counters.clone()));
        Ok(Arc::new(Self {
            ratio: spec.sampling,
            queue,
            scope: InstrumentationScope::builder("meshd")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            dropped: counters.queue_full,
        }))
    }

    /// The fraction of new traces sampled.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Queues a finished span for export, or counts it dropped.
    pub fn submit(&self, span: Finished) {
        let data = span.into_data(self.scope.clone());
        if self.queue.try_send(data).is_err() {
            self.dropped.inc();
        }
    }
}

/// An OTLP/HTTP endpoint given as a bare address gets the traces path.
fn http_endpoint(endpoint: &str) -> String {
    match endpoint.parse::<hyper::Uri>() {
        Ok(uri) if uri.path() == "/" && !endpoint.ends_with('/') => {
            format!("{endpoint}/v1/traces")
        }
        Ok(uri) if uri.path() == "/" => format!("{endpoint}v1/traces"),
        _ => endpoint.to_owned(),
    }
}

/// A finished span: where it sits, what it was, how it went.
pub struct Finished {
    pub span: Span,
    pub kind: SpanKind,
    pub name: Cow<'static, str>,
    pub start: std::time::SystemTime,
    pub end: std::time::SystemTime,
    pub attributes: Vec<KeyValue>,
    pub error: bool,
}

impl Finished {
    fn into_data(self, scope: InstrumentationScope) -> SpanData {
        let context = self.span.context;
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(context.trace_id),
                SpanId::from_bytes(context.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: self.span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            span_kind: self.kind,
            name: self.name,
            start_time: self.start,
            end_time: self.end,
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if self.error {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: scope,
        }
    }
}

/// How long the exporter gathers spans after the first of a batch.
const GATHER: Duration = Duration::from_millis(200);

/// How often it looks at the queue meanwhile. Looking, not being woken:
/// the spans come from the worker threads, and a wake-up per span would
/// wake this thread (a futex call and an interrupt) once per request.
const GATHER_TICK: Duration = Duration::from_millis(5);

/// Takes spans off the queue and exports them, a batch at a time: what
/// has gathered while the last export ran, up to `batch`, at least every
/// second. One export at a time, each bounded by the exporter's timeout.
async fn export(
    mut spans: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch: usize,
    counters: SpanCounters,
) {
    let mut buffer = Vec::with_capacity(batch);
    loop {
        // Wait for the first span, then a little for its company.
        if spans.recv_many(&mut buffer, batch).await == 0 {
            return;
        }
        let until = tokio::time::Instant::now() + GATHER;
        while buffer.len() < batch {
            match spans.try_recv() {
                Ok(span) => buffer.push(span),
                Err(mpsc::error::TryRecvError::Empty) => {
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                    tokio::time::sleep(GATHER_TICK).await;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        let count = buffer.len() as u64;
        let sent = std::mem::replace(&mut buffer, Vec::with_capacity(batch));
        match exporter.export(sent).await {
            Ok(()) => {
                counters.exported.inc_by(count);
                debug!(spans = count, "spans exported");
            }
            Err(err) => {
                counters.export_failed.inc_by(count);
                warn!(spans = count, error = %err, "span export failed; spans dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::http_endpoint;

    #[test]
    fn a_bare_http_endpoint_gets_the_traces_path() {
        assert_eq!(
            http_endpoint("http://10.0.0.9:4318"),
            "http://10.0.0.9:4318/v1/traces"
        );
        assert_eq!(
            http_endpoint("http://10.0.0.9:4318/"),
            "http://10.0.0.9:4318/v1/traces"
        );
        assert_eq!(
            http_endpoint("http://collector:4318/otlp/v1/traces"),
            "http://collector:4318/otlp/v1/traces"
        );
    }
}
