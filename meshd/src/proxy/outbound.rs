//! The outbound listener: accepts connections the connect hooks captured,
//! finds where each was going, and relays it to an endpoint.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::http;
use super::{ConnectionGuard, ProxyInputs};
use crate::{
    config::Protocol,
    hbone::{pool::Key, Baggage},
    net::relay::{relay, Resettable},
    state::{
        ids::ClientAddr,
        snapshot::{Path, Target, Unresolved},
    },
    telemetry::metrics::{Metrics, ReasonLabels, ServiceLabels, TcpLabels, UnresolvedReason},
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "cannot listen on {address} for captured connections: {source} \
         (is node.captureAddress an address of this node, and the port free?)"
    )]
    Bind {
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
}

pub struct Outbound {
    listener: TcpListener,
    address: SocketAddrV4,
}

const UNKNOWN: &str = "unknown";

impl Outbound {
    pub async fn bind(address: SocketAddrV4) -> Result<Self, OutboundError> {
        let listener = crate::net::listen::listen(address.into())
            .map_err(|source| OutboundError::Bind { address, source })?;
        Ok(Self { listener, address })
    }

    /// Serves on a listener handed over by the previous meshd.
    pub fn adopt(
        listener: std::net::TcpListener,
        address: SocketAddrV4,
    ) -> Result<Self, OutboundError> {
        let listener = TcpListener::from_std(listener)
            .map_err(|source| OutboundError::Bind { address, source })?;
        Ok(Self { listener, address })
    }

    /// A duplicate of the listening socket, for the next meshd.
    pub fn duplicate(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    pub fn address(&self) -> SocketAddrV4 {
        self.address
    }

    /// Accepts until `stop` turns true, then drains (see `accept_loop`).
    pub async fn run(self, inputs: Arc<ProxyInputs>, stop: watch::Receiver<bool>, drain: Duration) {
        let metrics = inputs.metrics.clone();
        crate::net::accept::accept_loop(
            self.listener,
            "outbound",
            &metrics.accept_counters(),
            stop,
            drain,
            move |stream, peer| handle(inputs.clone(), stream, peer),
        )
        .await;
    }
}

/// Ends the connection at once with a reset, so the client sees a failure
/// instead of an empty answer.
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn unresolved(metrics: &Metrics, reason: UnresolvedReason) {
    metrics
        .unresolved
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

async fn handle(inputs: Arc<ProxyInputs>, client: TcpStream, peer: SocketAddr) {
    let metrics = &inputs.metrics;
    let orig = match peer {
        SocketAddr::V4(peer) => inputs.orig_dst.take(ClientAddr(peer)).map(|o| (peer, o)),
        SocketAddr::V6(_) => None,
    };
    let Some((peer, orig)) = orig else {
        unresolved(metrics, UnresolvedReason::no_original_destination);
        warn!("no original destination recorded for this client; closing");
        return refuse(client);
    };
    let dst = orig.dst;
    let mesh = inputs.snapshot.load();
    let source = mesh.source(orig.cgroup_id, *peer.ip());
    // HTTP ports balance per request: no endpoint is chosen here.
    let declared = mesh.http_target(dst).map(|t| t.port.protocol);
    let protocol = match declared {
        Some(Protocol::Auto) => sniff(&client).await,
        Some(declared) => declared,
        None => Protocol::Tcp,
    };
    if protocol != Protocol::Tcp {
        let connection = http::Connection {
            dst,
            source: source.cloned(),
            protocol,
        };
        drop(mesh);
        let _ = client.set_nodelay(true);
        return http::serve(inputs.clone(), client, connection).await;
    }
    let target = match mesh.resolve(dst, crate::net::clock::now_nanos()) {
        Ok(target) => target,
        Err(reason) => {
            let reason = match reason {
                Unresolved::UnknownDestination => UnresolvedReason::unknown_destination,
                Unresolved::NoEndpoints => UnresolvedReason::no_endpoints,
                Unresolved::UnknownNode => UnresolvedReason::unknown_node,
            };
            unresolved(metrics, reason);
            warn!(dst = %dst.0, ?reason, "cannot resolve destination; closing");
            return refuse(client);
        }
    };
    let mut labels = tcp_labels(source, &target);
    let upstream_addr = target.upstream;
    let service = target.service.hostname.clone();
    debug!(dst = %dst.0, upstream = %upstream_addr, path = ?target.path, "relaying");

    // The service's connection limit holds for the connection's life.
    let Some(_slot) = mesh.connection_limit(target.service_index).try_open() else {
        warn!(dst = %dst.0, "circuit breaker: the service's connection limit is reached; refusing");
        http::breaker_tripped(&inputs, &service, "connections");
        return refuse(client);
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    match target.path {
        Path::Local => {
            // Same node: no tunnel, but the destination's policy still applies.
            if !super::authorized_locally(
                &inputs,
                &mesh,
                source,
                upstream_addr,
                target.endpoint,
                None,
            ) {
                return refuse(client);
            }
            // The snapshot is not needed past this point; let a reload free it.
            drop(mesh);
            let connect =
                tokio::time::timeout(inputs.connect_timeout, TcpStream::connect(upstream_addr));
            let mut upstream = match connect.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    warn!(upstream = %upstream_addr, error = %err, "connecting to the endpoint failed");
                    labels.response_flags = "UF";
                    return upstream_failed(metrics, &labels, service, client);
                }
                Err(_) => {
                    warn!(upstream = %upstream_addr, timeout = ?inputs.connect_timeout, "connecting to the endpoint timed out");
                    labels.response_flags = "UF";
                    return upstream_failed(metrics, &labels, service, client);
                }
            };
            let _ = upstream.set_nodelay(true);
            relay_counted(&inputs, &labels, &mut client, &mut upstream).await;
        }
        Path::Tunnel { node } => {
            let (Some(source), Some(pool)) = (source, inputs.pool.as_ref()) else {
                warn!(
                    upstream = %upstream_addr,
                    "no identity to tunnel with (unknown source workload, or no node.identity configured)"
                );
                labels.response_flags = "UF";
                return upstream_failed(metrics, &labels, service, client);
            };
            let key = Key {
                source: source.identity.clone(),
                node,
                destination: target.endpoint.identity.clone(),
            };
            let baggage = Baggage {
                workload: Some(source.name.clone()),
                app: Some(source.app.clone()),
                version: Some(source.version.clone()),
                service: Some((
                    target.service.namespace.clone(),
                    target.service.name.clone(),
                )),
            }
            .encode();
            labels.connection_security_policy = "mutual_tls";
            drop(mesh);
            let mut stream = match pool.open(&key, upstream_addr, &baggage).await {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(upstream = %upstream_addr, error = %err, "tunnel failed");
                    labels.response_flags = "UF";
                    return upstream_failed(metrics, &labels, service, client);
                }
            };
            relay_counted(&inputs, &labels, &mut client, &mut stream).await;
        }
    }
}

async fn relay_counted<U>(
    inputs: &ProxyInputs,
    labels: &TcpLabels,
    client: &mut TcpStream,
    upstream: &mut U,
) where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Resettable,
{
    let metrics = &inputs.metrics;
    let _guard = ConnectionGuard::open(metrics, labels);
    let received = metrics.tcp_received_bytes.get_or_create(labels).clone();
    let sent = metrics.tcp_sent_bytes.get_or_create(labels).clone();
    match relay(client, upstream, inputs.buffer_size, &received, &sent).await {
        Ok(()) => debug!("closed"),
        Err(err) => debug!(error = %err, "closed with an error"),
    }
}

/// Peeks at the client's first bytes (waiting at most `SNIFF_WAIT`) to tell
/// HTTP/1.1 and HTTP/2 from other TCP on an `auto` port.
async fn sniff(client: &TcpStream) -> Protocol {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + http::SNIFF_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(Ok(n)) if n >= buf.len() || n == 0 => return http::sniff(&buf[..n]),
            Ok(Ok(n)) => {
                // A partial request line: wait a little for more.
                if http::sniff(&buf[..n]) != Protocol::Tcp {
                    return http::sniff(&buf[..n]);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => return Protocol::Tcp,
        }
    }
}

/// Counts a connection that never reached its endpoint (Istio's `UF` flag)
/// and resets the client.
fn upstream_failed(metrics: &Metrics, labels: &TcpLabels, service: Arc<str>, client: TcpStream) {
    metrics.tcp_opened.get_or_create(labels).inc();
    metrics.tcp_closed.get_or_create(labels).inc();
    metrics
        .upstream_connect_failures
        .get_or_create(&ServiceLabels {
            destination_service: service,
        })
        .inc();
    refuse(client);
}

fn tcp_labels(source: Option<&crate::config::Workload>, target: &Target<'_>) -> TcpLabels {
    let unknown: Arc<str> = Arc::from(UNKNOWN);
    let (workload, namespace, app, version, principal) = match source {
        Some(w) => (
            w.name.clone(),
            w.namespace.clone(),
            w.app.clone(),
            w.version.clone(),
            w.identity.uri().clone(),
        ),
        None => (
            unknown.clone(),
            unknown.clone(),
            unknown.clone(),
            unknown.clone(),
            unknown.clone(),
        ),
    };
    TcpLabels {
        reporter: "source",
        source_workload: workload,
        source_workload_namespace: namespace,
        source_principal: principal,
        source_app: app,
        source_version: version,
        destination_workload: target.endpoint.workload.clone(),
        destination_workload_namespace: target.service.namespace.clone(),
        destination_principal: target.endpoint.identity.uri().clone(),
        destination_service: target.service.hostname.clone(),
        destination_service_name: target.service.name.clone(),
        destination_service_namespace: target.service.namespace.clone(),
        request_protocol: "tcp",
        response_flags: "-",
        // Same-node traffic never leaves the node and is not encrypted.
        connection_security_policy: "none",
    }
}
