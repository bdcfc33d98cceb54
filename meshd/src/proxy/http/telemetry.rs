//! What each request leaves behind: Istio's request metrics with their
//! labels, and one access-log line.

use std::{net::SocketAddrV4, sync::Arc, time::Instant};

use hyper::{body::Incoming, header, Request, Response};
use tracing::info;

use super::{upstream::Body, UNKNOWN};
use crate::{
    config::Workload,
    proxy::ProxyInputs,
    state::snapshot::{Path, Snapshot},
    telemetry::metrics::{HttpLabels, TcpLabels},
};

/// "METHOD /path" for the access log, kept without formatting anything
/// until a line is actually written (cloning both only bumps counts).
pub(super) struct RequestLine {
    method: hyper::Method,
    uri: hyper::Uri,
}

impl RequestLine {
    pub(super) fn of(request: &Request<Incoming>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
        }
    }
}

impl std::fmt::Display for RequestLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.uri.path())
    }
}

/// Counts a request or connection shed by a circuit-breaker limit.
pub fn breaker_tripped(inputs: &ProxyInputs, service: &Arc<str>, limit: &'static str) {
    inputs
        .metrics
        .circuit_breaker_rejections
        .get_or_create(&crate::telemetry::metrics::BreakerLabels {
            destination_service: service.clone(),
            limit,
        })
        .inc();
}

pub(super) fn http_labels(
    mesh: &Snapshot,
    source: Option<&Workload>,
    service: usize,
    endpoint: Option<usize>,
    path: Option<Path>,
    grpc: bool,
) -> HttpLabels {
    let svc = &mesh.config.services[service];
    let ep = endpoint.map(|e| &svc.endpoints[e]);
    let unknown: Arc<str> = Arc::from(UNKNOWN);
    let pick =
        |f: fn(&Workload) -> &Arc<str>| source.map_or_else(|| unknown.clone(), |w| f(w).clone());
    HttpLabels {
        connection: TcpLabels {
            reporter: "source",
            source_workload: pick(|w| &w.name),
            source_workload_namespace: pick(|w| &w.namespace),
            source_principal: pick(|w| w.identity.uri()),
            source_app: pick(|w| &w.app),
            source_version: pick(|w| &w.version),
            destination_workload: ep.map_or_else(|| unknown.clone(), |e| e.workload.clone()),
            destination_workload_namespace: svc.namespace.clone(),
            destination_principal: ep.map_or_else(|| unknown.clone(), |e| e.identity.uri().clone()),
            destination_service: svc.hostname.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_flags: "-",
            connection_security_policy: match path {
                Some(Path::Local) => "none",
                Some(Path::Tunnel { .. }) => "mutual_tls",
                None => "unknown",
            },
        },
        response_code: 0,
        grpc_response_status: Arc::from(""),
    }
}

/// Counts the request, logs it, and hands back the response.
#[allow(clippy::too_many_arguments)]
pub(super) fn record(
    inputs: &ProxyInputs,
    labels: &mut HttpLabels,
    response: Response<Body>,
    request_bytes: u64,
    started: Instant,
    route: &str,
    line: &RequestLine,
    upstream: Option<SocketAddrV4>,
) -> Response<Body> {
    labels.response_code = response.status().as_u16();
    if let Some(flags) = response.headers().get("x-meshd-response-flags") {
        labels.connection.response_flags = match flags.as_bytes() {
            b"UT" => "UT",
            b"UF" => "UF",
            b"UC" => "UC",
            b"UH" => "UH",
            b"NR" => "NR",
            b"RBAC" => "RBAC",
            b"RL" => "RL",
            b"UO" => "UO",
            b"URX" => "URX",
            _ => "DPE",
        };
    }
    if let Some(status) = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        labels.grpc_response_status = Arc::from(status);
    }
    let elapsed = started.elapsed();
    let metrics = &inputs.metrics;
    metrics.requests.get_or_create(labels).inc();
    metrics
        .request_duration
        .get_or_create(labels)
        .observe(elapsed.as_secs_f64() * 1000.0);
    metrics
        .request_bytes
        .get_or_create(labels)
        .observe(request_bytes as f64);
    let response_bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    metrics
        .response_bytes
        .get_or_create(labels)
        .observe(response_bytes as f64);
    info!(
        target: "meshd::access",
        request = %line,
        status = labels.response_code,
        flags = labels.connection.response_flags,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        route,
        upstream = %upstream.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        source = %labels.connection.source_workload,
        destination = %labels.connection.destination_service,
        "request"
    );
    response
}
