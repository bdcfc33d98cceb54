//! The outbound listener: accepts connections the connect hooks captured,
//! finds where each was going, and hands it to the HTTP stages or the TCP
//! relay.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::net::accept::{Accepted, Caps};
use tracing::warn;

use super::{http, ProxyInputs};
use crate::{config::Protocol, state::ids::ClientAddr, telemetry::metrics::UnresolvedReason};

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

    /// The address the listener is bound to (its port when bound to 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `stop` turns true, then drains (see `accept_loop`).
    pub async fn run(
        self,
        inputs: Arc<ProxyInputs>,
        caps: impl Into<Caps>,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let metrics = inputs.metrics.clone();
        crate::net::accept::accept_loop(
            self.listener,
            "outbound",
            caps,
            &metrics.accept_counters("outbound"),
            stop,
            drain,
            move |stream, peer| handle(inputs.clone(), stream, peer),
        )
        .await;
    }
}

/// Ends the connection at once with a reset, so the client sees a failure
/// instead of an empty answer.
pub(super) fn reset(stream: Accepted) {
    let _ = stream.get_ref().set_zero_linger();
    drop(stream);
}

/// Where a captured connection was going, then: HTTP for ports that speak
/// it (balanced per request), else a TCP relay.
async fn handle(inputs: Arc<ProxyInputs>, client: Accepted, peer: SocketAddr) {
    let metrics = &inputs.metrics;
    let orig = match peer {
        SocketAddr::V4(peer) => inputs.orig_dst.take(ClientAddr(peer)).map(|o| (peer, o)),
        SocketAddr::V6(_) => None,
    };
    let Some((peer, orig)) = orig else {
        metrics.unresolved(UnresolvedReason::no_original_destination);
        warn!("no original destination recorded for this client; closing");
        return reset(client);
    };
    let snapshot = inputs.snapshot.load_full();
    let declared = snapshot.http_target(orig.dst).map(|t| t.port.protocol);
    let protocol = match declared {
        Some(Protocol::Auto) => sniff(client.get_ref()).await,
        Some(declared) => declared,
        None => Protocol::Tcp,
    };
    let source = snapshot.source(orig.cgroup.as_deref(), *peer.ip());
    if protocol == Protocol::Tcp {
        let source = source.cloned();
        return super::tcp::serve(&inputs, snapshot, client, peer, orig.dst, source).await;
    }
    let connection = http::Connection {
        client: peer,
        dst: orig.dst,
        source: source.cloned(),
        protocol,
        series: Arc::default(),
    };
    drop(snapshot);
    let _ = client.get_ref().set_nodelay(true);
    http::serve(inputs.clone(), client, connection).await
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
