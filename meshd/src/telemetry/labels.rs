//! Istio's label sets, built from what meshd knows for certain: the config
//! snapshot, a certificate, or a closed set. Values are interned `Arc<str>`
//! from the config, so building a label set formats nothing.

use std::sync::Arc;

use super::{metrics::HttpLabels, metrics::TcpLabels, ResponseFlag};
use crate::{
    config::{Endpoint, Service, Workload},
    spiffe::Identity,
    state::snapshot::Path,
};

/// What a label says when meshd does not know.
pub const UNKNOWN: &str = "unknown";

fn unknown() -> Arc<str> {
    Arc::from(UNKNOWN)
}

/// Istio's `connection_security_policy` for how the endpoint is reached.
fn security(path: Option<Path>) -> &'static str {
    match path {
        // Same-node traffic never leaves the node and is not encrypted.
        Some(Path::Local) => "none",
        Some(Path::Tunnel { .. }) => "mutual_tls",
        None => "unknown",
    }
}

/// The source node's labels for a connection (`request_protocol` `tcp`)
/// or request from `source` to an endpoint of `service` (none chosen yet:
/// `unknown`).
pub fn source(
    source: Option<&Workload>,
    service: &Service,
    endpoint: Option<&Endpoint>,
    path: Option<Path>,
    request_protocol: &'static str,
) -> TcpLabels {
    let pick = |f: fn(&Workload) -> &Arc<str>| source.map_or_else(unknown, |w| f(w).clone());
    TcpLabels {
        reporter: "source",
        source_workload: pick(|w| &w.name),
        source_workload_namespace: pick(|w| &w.namespace),
        source_principal: pick(|w| w.identity.uri()),
        source_app: pick(|w| &w.app),
        source_version: pick(|w| &w.version),
        destination_workload: endpoint.map_or_else(unknown, |e| e.workload.clone()),
        destination_workload_namespace: service.namespace.clone(),
        destination_principal: endpoint.map_or_else(unknown, |e| e.identity.uri().clone()),
        destination_service: service.hostname.clone(),
        destination_service_name: service.name.clone(),
        destination_service_namespace: service.namespace.clone(),
        request_protocol,
        response_flags: ResponseFlag::None,
        connection_security_policy: security(path),
    }
}

/// What is known of a peer's workload: what its baggage said, where the
/// config confirms it (for metrics only).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerSays<'a> {
    pub workload: Option<&'a Arc<str>>,
    pub app: Option<&'a Arc<str>>,
    pub version: Option<&'a Arc<str>>,
}

/// The destination node's labels for a tunnel stream from the peer that
/// proved `peer`, to `workload` as an endpoint of `service`.
pub fn destination(
    peer: &Identity,
    says: PeerSays<'_>,
    workload: &Workload,
    service: Option<&Service>,
) -> TcpLabels {
    let said = |v: Option<&Arc<str>>| v.cloned().unwrap_or_else(unknown);
    TcpLabels {
        reporter: "destination",
        source_workload: said(says.workload),
        source_workload_namespace: peer.namespace().into(),
        source_principal: peer.uri().clone(),
        source_app: said(says.app),
        source_version: said(says.version),
        destination_workload: workload.name.clone(),
        destination_workload_namespace: workload.namespace.clone(),
        destination_principal: workload.identity.uri().clone(),
        destination_service: service.map_or_else(unknown, |s| s.hostname.clone()),
        destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
        destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
        request_protocol: "tcp",
        response_flags: ResponseFlag::None,
        connection_security_policy: "mutual_tls",
    }
}

/// Makes `labels` (a source node's, built before an endpoint was chosen)
/// those of `endpoint`, reached by `path`: only what the endpoint decides
/// changes.
pub fn to_endpoint(labels: &mut TcpLabels, endpoint: &Endpoint, path: Option<Path>) {
    labels.destination_workload = endpoint.workload.clone();
    labels.destination_principal = endpoint.identity.uri().clone();
    labels.connection_security_policy = security(path);
}

/// A request's labels on top of its connection's.
pub fn http(connection: TcpLabels) -> HttpLabels {
    HttpLabels {
        connection,
        response_code: 0,
        grpc_response_status: Arc::from(""),
    }
}
