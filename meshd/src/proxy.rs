//! The node proxy: listeners and the per-connection work behind them.

pub mod health;
pub mod http;
pub mod inbound;
pub mod outbound;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;

pub use outbound::{Outbound, OutboundError};

use crate::{
    hbone::pool::Pool,
    identity::store::CertStore,
    state::{ids::OrigDstSource, snapshot::Snapshot},
    telemetry::metrics::{Metrics, TcpLabels},
};

/// Everything a connection handler reads, shared by all of them.
pub struct ProxyInputs {
    pub snapshot: ArcSwap<Snapshot>,
    /// Where captured connections were going (the eBPF maps).
    pub orig_dst: Arc<dyn OrigDstSource>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    pub buffer_size: usize,
    /// Tunnels to other nodes; `None` without `node.identity`.
    pub pool: Option<Pool>,
    /// This node's workload certificates; `None` without `node.identity`.
    pub store: Option<Arc<CertStore>>,
    /// Reused upstream HTTP connections.
    pub upstreams: Arc<http::upstream::Upstreams>,
    /// Turns true when meshd stops: long-lived connections wind down.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// The destination's policy for a same-node endpoint, decided here. A
/// denial is logged with both identities and counted; returns whether the
/// connection or request may proceed.
pub fn authorized_locally(
    inputs: &ProxyInputs,
    mesh: &Snapshot,
    source: Option<&crate::config::Workload>,
    address: std::net::SocketAddrV4,
    endpoint: &crate::config::Endpoint,
    http: Option<crate::policy::authz::Http<'_>>,
) -> bool {
    let decision = crate::policy::authz::authorize(
        &mesh.config.policies,
        &crate::policy::authz::Request {
            source: source.map(|w| &w.identity),
            services: mesh.services_of(*address.ip()),
            port: address.port(),
            http,
        },
    );
    let crate::policy::authz::Decision::Deny { reason } = decision else {
        return true;
    };
    let source_principal =
        source.map_or_else(|| Arc::from("unknown"), |w| w.identity.uri().clone());
    denied(
        &inputs.metrics,
        source_principal,
        endpoint.identity.uri().clone(),
        &reason,
    );
    false
}

/// Logs a denial with both identities and counts it.
pub fn denied(metrics: &Metrics, source: Arc<str>, destination: Arc<str>, reason: &str) {
    tracing::warn!(%source, %destination, reason, "authorization denied");
    metrics
        .authorization_denied
        .get_or_create(&crate::telemetry::metrics::DenyLabels {
            source_principal: source,
            destination_principal: destination,
        })
        .inc();
}

/// Counts a connection opened now and closed when dropped, whichever way
/// the handler ends.
pub struct ConnectionGuard<'a> {
    metrics: &'a Metrics,
    labels: &'a TcpLabels,
}

impl<'a> ConnectionGuard<'a> {
    pub fn open(metrics: &'a Metrics, labels: &'a TcpLabels) -> Self {
        metrics.tcp_opened.get_or_create(labels).inc();
        metrics.active_connections.inc();
        Self { metrics, labels }
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.metrics.tcp_closed.get_or_create(self.labels).inc();
        self.metrics.active_connections.dec();
    }
}
