//! The node proxy: listeners and the per-connection work behind them.

pub mod http;
pub mod outbound;
pub mod relay;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;

pub use outbound::{Outbound, OutboundError};

use crate::{
    capture::Capture,
    identity::store::CertStore,
    mesh::Mesh,
    metrics::{Metrics, TcpLabels},
    tunnel::pool::Pool,
};

/// Everything a connection handler reads, shared by all of them.
pub struct ProxyInputs {
    pub mesh: ArcSwap<Mesh>,
    pub capture: Arc<Capture>,
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

/// Pending connections a listener queues before accepting (the kernel
/// caps it at `net.core.somaxconn`): a node's pods may open thousands at
/// once, and the default of 1024 would make the kernel drop handshakes.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listening socket with a deep accept queue.
pub fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match address {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The destination's policy for a same-node endpoint, decided here. A
/// denial is logged with both identities and counted; returns whether the
/// connection or request may proceed.
pub fn authorized_locally(
    inputs: &ProxyInputs,
    mesh: &Mesh,
    source: Option<&crate::config::Workload>,
    address: std::net::SocketAddrV4,
    endpoint: &crate::config::Endpoint,
    http: Option<crate::policy::Http<'_>>,
) -> bool {
    let decision = crate::policy::authorize(
        &mesh.config.policies,
        &crate::policy::Request {
            source: source.map(|w| &w.identity),
            services: mesh.services_of(*address.ip()),
            port: address.port(),
            http,
        },
    );
    let crate::policy::Decision::Deny { reason } = decision else {
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
        .get_or_create(&crate::metrics::DenyLabels {
            source_principal: source,
            destination_principal: destination,
        })
        .inc();
}

/// Pause after an accept error (such as running out of descriptors) so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts on `listener` until `stop` turns true, running `serve` for each
/// connection in a span of its own; then closes the listener and waits up
/// to `drain` for the connections in flight before cutting the rest.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    metrics: &Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument as _;
    let mut next_id = 0u64;
    let mut connections = tokio::task::JoinSet::new();
    let mut shedder = Shedder::new(what);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    let span = tracing::info_span!("conn", listener = what, id = next_id, peer = %peer);
                    connections.spawn(serve(stream, peer).instrument(span));
                }
                Err(err) => {
                    metrics.accept_errors.inc();
                    if out_of_descriptors(&err) {
                        shedder.shed(&listener, metrics).await;
                    } else {
                        tracing::warn!(listener = what, error = %err, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tracing::info!(
        listener = what,
        in_flight = connections.len(),
        ?drain,
        "listener closed; draining"
    );
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = what,
            cut = connections.len(),
            "drain timeout reached; closing the rest"
        );
        connections.shutdown().await;
    }
}

fn out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Out of file descriptors, a listener cannot even accept a connection to
/// refuse it: the connection would sit in the accept queue, its client
/// waiting. A descriptor kept in reserve is given up to accept one such
/// connection and reset it at once (the client learns immediately), then
/// taken back. When descriptors free up, accepting just works again.
struct Shedder {
    what: &'static str,
    reserve: Option<std::fs::File>,
    shed: u64,
    last_log: Option<std::time::Instant>,
}

impl Shedder {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            reserve: std::fs::File::open("/dev/null").ok(),
            shed: 0,
            last_log: None,
        }
    }

    async fn shed(&mut self, listener: &tokio::net::TcpListener, metrics: &Metrics) {
        self.reserve = None;
        // Whatever is queued now, without waiting for more.
        while let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::ZERO, listener.accept()).await
        {
            let _ = stream.set_zero_linger();
            drop(stream);
            self.shed += 1;
            metrics
                .connections_shed
                .get_or_create(&crate::metrics::ShedLabels {
                    reason: "fd_exhausted",
                })
                .inc();
        }
        self.reserve = std::fs::File::open("/dev/null").ok();
        let quiet = self
            .last_log
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
        if !quiet {
            self.last_log = Some(std::time::Instant::now());
            tracing::warn!(
                listener = self.what,
                shed = self.shed,
                "out of file descriptors: resetting new connections until some free up"
            );
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
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
