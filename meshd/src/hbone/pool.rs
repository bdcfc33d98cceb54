//! The source side: one pooled mTLS HTTP/2 connection per (source identity,
//! destination node, destination identity), carrying a CONNECT stream per
//! captured connection. The destination identity is part of the key so the
//! certificate the destination presents always proves exactly the
//! endpoint's identity.

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    client::conn::http2::{self, SendRequest},
    upgrade::Upgraded,
    Method, Request, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{BAGGAGE, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, KEEPALIVE, MAX_FRAME, STREAM_WINDOW};
use crate::{
    identity::{store::CertStore, tls, Identity},
    net::relay::Resettable,
    telemetry::metrics::{HandshakeLabels, Metrics},
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: Identity,
    pub node: Ipv4Addr,
    pub destination: Identity,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddrV4, io::Error),
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddrV4),
    #[error("TLS with {node} failed ({reason}): {source}")]
    Handshake {
        node: SocketAddrV4,
        reason: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{0} is not a usable TLS server name")]
    ServerName(String),
    #[error("HTTP/2 with {0}: {1}")]
    Http(SocketAddrV4, hyper::Error),
    #[error("{node} refused the stream to {target}: {status}")]
    Refused {
        node: SocketAddrV4,
        target: SocketAddrV4,
        status: StatusCode,
    },
}

/// A pooled connection and the certificate generation it was made with.
type Slot = Arc<tokio::sync::Mutex<Option<(u64, SendRequest<Empty<Bytes>>)>>>;

pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    port: u16,
}

/// An open stream through a tunnel.
pub type Stream = TokioIo<Upgraded>;

impl Resettable for Stream {
    /// Dropping the stream resets it (RST_STREAM); nothing to arrange.
    fn reset_on_close(&self) {}
}

impl Pool {
    pub fn new(store: Arc<CertStore>, metrics: Arc<Metrics>, port: u16) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            store,
            metrics,
            port,
        }
    }

    /// Opens a CONNECT stream to `target` through the connection for `key`.
    pub async fn open(
        &self,
        key: &Key,
        target: SocketAddrV4,
        baggage: &str,
    ) -> Result<Stream, TunnelError> {
        let node = SocketAddrV4::new(key.node, self.port);
        let mut sender = self.sender(key).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(BAGGAGE, baggage)
            .body(Empty::new())
            .expect("a CONNECT request from valid parts");
        let response = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| TunnelError::Timeout(node))?
            .map_err(|e| TunnelError::Http(node, e))?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused {
                node,
                target,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| TunnelError::Http(node, e))?;
        Ok(TokioIo::new(upgraded))
    }

    /// The pooled connection for `key`, (re)connecting when there is none,
    /// it has closed, or certificates or trust changed since it was made (new
    /// streams then use the new ones; old streams finish on the old
    /// connection). Concurrent callers for one key share one handshake.
    async fn sender(&self, key: &Key) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        let generation = self.store.current().generation;
        if let Some((_, sender)) = slot
            .as_ref()
            .filter(|(made, sender)| *made == generation && !sender.is_closed())
        {
            return Ok(sender.clone());
        }
        let sender = self.connect(key).await?;
        *slot = Some((generation, sender.clone()));
        Ok(sender)
    }

    async fn connect(&self, key: &Key) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let node = SocketAddrV4::new(key.node, self.port);
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(node))
            .await
            .map_err(|_| TunnelError::Timeout(node))?
            .map_err(|e| TunnelError::Connect(node, e))?;
        let _ = tcp.set_nodelay(true);
        let certs = self.store.current();
        let config =
            tls::client_config(&certs, &key.source, &key.destination, self.store.provider())?;
        let name = ServerName::try_from(key.destination.server_name())
            .map_err(|_| TunnelError::ServerName(key.destination.server_name()))?;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => {
                let reason = tls::failure_reason(&source);
                self.handshake_failed(reason);
                return Err(TunnelError::Handshake {
                    node,
                    reason,
                    source,
                });
            }
            Err(_) => {
                self.handshake_failed("timeout");
                return Err(TunnelError::Timeout(node));
            }
        };
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| TunnelError::Http(node, e))?;
        let metrics = self.metrics.clone();
        metrics.tunnel_connections.inc();
        debug!(%node, source = %key.source, destination = %key.destination, "tunnel connection established");
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                warn!(%node, error = %err, "tunnel connection ended with an error");
            }
            metrics.tunnel_connections.dec();
        });
        Ok(sender)
    }

    fn handshake_failed(&self, reason: &'static str) {
        self.metrics
            .tls_handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: "outbound",
                reason,
            })
            .inc();
    }
}
