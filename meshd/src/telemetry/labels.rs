//! Istio's label sets, built from what meshd knows for certain: the config
//! snapshot, a certificate, or a closed set. Values are interned `Arc<str>`
//! from the config, so building a label set formats nothing.
//!
//! Value rules are Istio's ("Istio Standard Metrics"): a workload meshd does
//! not know is `unknown`, and so is its namespace. `connection_security_policy`
//! says how the hop went, as Istio's ztunnel reports it on both sides:
//! `mutual_tls` through a tunnel, `none` on the same node, `unknown` before
//! an endpoint was chosen. (The sidecar docs say `unknown` for every source
//! report, but Istio's own workload dashboard selects
//! `reporter="source",connection_security_policy="mutual_tls"`.)

use std::sync::{Arc, LazyLock};

use super::{metrics::HttpLabels, metrics::TcpLabels, ResponseFlag};
use crate::{
    config::{Endpoint, Reported, Service, Workload},
    spiffe::Identity,
    state::snapshot::Path,
};

/// What a label says when meshd does not know.
pub const UNKNOWN: &str = "unknown";

/// `unknown`, and an empty value, interned once: every request's label
/// set has several, and a fresh `Arc` each would be an allocation each.
static UNKNOWN_VALUE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN));
static EMPTY_VALUE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

fn unknown() -> Arc<str> {
    UNKNOWN_VALUE.clone()
}

/// How the destination was reached, as the destination reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Through a tunnel: mutual TLS.
    MutualTls,
    /// On the same node: never encrypted, never left the node.
    None,
}

impl Security {
    /// How an endpoint reached by `path` is reached.
    pub fn of(path: Path) -> Self {
        match path {
            Path::Local => Self::None,
            Path::Tunnel { .. } => Self::MutualTls,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
        }
    }
}

/// The source node's labels for a connection (`request_protocol` `tcp`)
/// or request from `source` to an endpoint of `service` reached by a path
/// (none chosen yet: `unknown`) in `cluster`.
pub fn source(
    cluster: &Arc<str>,
    source: Option<&Workload>,
    service: &Service,
    endpoint: Option<(&Endpoint, Option<Path>)>,
    request_protocol: &'static str,
) -> TcpLabels {
    let pick = |f: fn(&Workload) -> &Arc<str>| source.map_or_else(unknown, |w| f(w).clone());
    let mut labels = TcpLabels {
        reporter: "source",
        source_workload: pick(|w| &w.name),
        source_workload_namespace: pick(|w| &w.namespace),
        source_principal: pick(|w| w.identity.uri()),
        source_app: pick(|w| &w.reported.app),
        source_version: pick(|w| &w.reported.version),
        source_canonical_service: pick(|w| &w.reported.canonical_service),
        source_canonical_revision: pick(|w| &w.reported.canonical_revision),
        source_cluster: cluster.clone(),
        destination_workload: unknown(),
        destination_workload_namespace: unknown(),
        destination_principal: unknown(),
        destination_app: unknown(),
        destination_version: unknown(),
        destination_canonical_service: unknown(),
        destination_canonical_revision: unknown(),
        destination_service: service.hostname.clone(),
        destination_service_name: service.name.clone(),
        destination_service_namespace: service.namespace.clone(),
        destination_cluster: cluster.clone(),
        request_protocol,
        response_flags: ResponseFlag::None,
        connection_security_policy: UNKNOWN,
    };
    if let Some((endpoint, path)) = endpoint {
        to_endpoint(&mut labels, endpoint, &service.namespace, path);
    }
    labels
}

/// Who the destination node knows the source of a connection to be.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The identity it proved (through a tunnel), or its workload's; none
    /// for a source on this node that meshd does not know.
    pub identity: Option<&'a Identity>,
    /// Its workload's name and labels, where the config confirms them.
    pub workload: Option<(&'a Arc<str>, &'a Reported)>,
}

impl<'a> Peer<'a> {
    /// A source on this node, reaching a workload on the same node.
    pub fn local(workload: Option<&'a Workload>) -> Self {
        Self {
            identity: workload.map(|w| &w.identity),
            workload: workload.map(|w| (&w.name, &w.reported)),
        }
    }
}

/// The destination node's labels for a connection or request from `peer`
/// to `workload` of this node, as an endpoint of `service`, reached as
/// `security` says.
pub fn destination(
    cluster: &Arc<str>,
    peer: Peer<'_>,
    workload: &Workload,
    service: Option<&Service>,
    security: Security,
    request_protocol: &'static str,
) -> TcpLabels {
    let said =
        |f: fn(&Reported) -> &Arc<str>| peer.workload.map_or_else(unknown, |(_, r)| f(r).clone());
    let reported = &workload.reported;
    TcpLabels {
        reporter: "destination",
        source_workload: peer.workload.map_or_else(unknown, |(name, _)| name.clone()),
        // The proved identity's namespace: the workload's, whether or not
        // the config names the workload.
        source_workload_namespace: peer.identity.map_or_else(unknown, |i| i.namespace().into()),
        source_principal: peer.identity.map_or_else(unknown, |i| i.uri().clone()),
        source_app: said(|r| &r.app),
        source_version: said(|r| &r.version),
        source_canonical_service: said(|r| &r.canonical_service),
        source_canonical_revision: said(|r| &r.canonical_revision),
        source_cluster: cluster.clone(),
        destination_workload: workload.name.clone(),
        destination_workload_namespace: workload.namespace.clone(),
        destination_principal: workload.identity.uri().clone(),
        destination_app: reported.app.clone(),
        destination_version: reported.version.clone(),
        destination_canonical_service: reported.canonical_service.clone(),
        destination_canonical_revision: reported.canonical_revision.clone(),
        destination_service: service.map_or_else(unknown, |s| s.hostname.clone()),
        destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
        destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
        destination_cluster: cluster.clone(),
        request_protocol,
        response_flags: ResponseFlag::None,
        connection_security_policy: security.label(),
    }
}

/// Makes `labels` (a source node's, built before an endpoint was chosen)
/// those of `endpoint` of a service in `namespace`, reached by `path`: only
/// what the endpoint decides changes. An endpoint whose workload the config
/// does not name has no known namespace or principal either (Istio's rule).
pub fn to_endpoint(
    labels: &mut TcpLabels,
    endpoint: &Endpoint,
    namespace: &Arc<str>,
    path: Option<Path>,
) {
    let reported = &endpoint.reported;
    labels.connection_security_policy = path.map_or(UNKNOWN, |p| Security::of(p).label());
    let known = &*endpoint.workload != UNKNOWN;
    labels.destination_workload_namespace = if known { namespace.clone() } else { unknown() };
    labels.destination_workload = endpoint.workload.clone();
    // An endpoint that is no workload of the mesh has no identity either.
    labels.destination_principal = if known {
        endpoint.identity.uri().clone()
    } else {
        unknown()
    };
    labels.destination_app = reported.app.clone();
    labels.destination_version = reported.version.clone();
    labels.destination_canonical_service = reported.canonical_service.clone();
    labels.destination_canonical_revision = reported.canonical_revision.clone();
}

/// A request's labels on top of its connection's.
pub fn http(connection: TcpLabels) -> HttpLabels {
    HttpLabels {
        connection,
        response_code: 0,
        grpc_response_status: EMPTY_VALUE.clone(),
    }
}
