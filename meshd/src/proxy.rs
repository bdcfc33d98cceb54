//! The node proxy: the outbound listener (captured connections: TCP
//! relayed in `outbound`, HTTP through the stages of `http`), the inbound
//! tunnel listener, and active health checks of this node's endpoints.

pub mod health;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod tcp;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;

pub use outbound::{Outbound, OutboundError};

use crate::{
    hbone::pool::Pool,
    identity::store::CertStore,
    state::{ids::OrigDstSource, snapshot::Snapshot},
    telemetry::metrics::Metrics,
};

/// Connects meshd to `address` (a pod of this node, usually), its SYN
/// marked as meshd's own while the connect is in flight, so the pods'
/// ingress filter admits it in strict mode and nothing else from the node
/// passes (a port bound here is this socket's alone: no other process can
/// send from it). Cancelling the future unmarks it too.
pub async fn connect(
    marks: &dyn OrigDstSource,
    address: std::net::SocketAddrV4,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::UNSPECIFIED, 0).into())?;
    let port = socket.local_addr()?.port();
    let _marked = Marked {
        marks,
        port,
        address,
    };
    marks.mark_own(port, address, true);
    socket.connect(address.into()).await
}

/// Unmarks a connect once it is done, whichever way.
struct Marked<'a> {
    marks: &'a dyn OrigDstSource,
    port: u16,
    address: std::net::SocketAddrV4,
}

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        self.marks.mark_own(self.port, self.address, false);
    }
}

/// Everything a connection handler reads, shared by all of them.
pub struct ProxyInputs {
    pub snapshot: ArcSwap<Snapshot>,
    /// Where captured connections were going (the eBPF maps).
    pub orig_dst: Arc<dyn OrigDstSource>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a relayed stream may move no byte before it is closed.
    pub idle_timeout: Duration,
    pub buffer_size: usize,
    /// Tunnels to other nodes; `None` without `node.identity`.
    pub pool: Option<Pool>,
    /// This node's workload certificates; `None` without `node.identity`.
    pub store: Option<Arc<CertStore>>,
    /// Reused upstream HTTP connections.
    pub upstreams: Arc<http::upstream::Upstreams>,
    /// Turns true when meshd stops: long-lived connections wind down.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Spans for requests, when `tracing` is configured.
    pub tracer: Option<Arc<crate::telemetry::spans::Tracer>>,
    /// Lines for requests and connections, when `accessLog` is configured.
    pub access_log: Option<Arc<crate::telemetry::access::AccessLog>>,
}

impl ProxyInputs {
    /// The access log, when `service`'s requests and connections are
    /// logged (a stream to a pod that backs no service is logged too).
    pub fn access_log_for(
        &self,
        service: Option<&crate::config::Service>,
    ) -> Option<&Arc<crate::telemetry::access::AccessLog>> {
        self.access_log
            .as_ref()
            .filter(|_| service.is_none_or(|s| s.access_log))
    }
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
            destination: mesh.destination(*address.ip()),
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
    metrics.denied(source, destination);
}
