//! Upstream HTTP connections, reused: HTTP/1.1 connections go back to an
//! idle list once their response is read; one HTTP/2 connection per
//! upstream carries every request. An upstream on another node is reached
//! through a tunnel stream, so its HTTP connection rides inside mTLS.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;

use crate::tunnel::pool::{Key as TunnelKey, Pool, TunnelError};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How an upstream is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Direct,
    Tunnel(TunnelKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub address: SocketAddrV4,
    pub via: Via,
    pub http2: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddrV4, std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddrV4),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("no tunnel to {0}: this node has no identity configured")]
    NoTunnel(SocketAddrV4),
    #[error("HTTP with {0}: {1}")]
    Http(SocketAddrV4, hyper::Error),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<UpstreamKey, Vec<http1::SendRequest<Body>>>>,
    shared: Mutex<HashMap<UpstreamKey, http2::SendRequest<Body>>>,
}

impl Upstreams {
    /// A connection to the upstream `key`, ready for one request: a free
    /// pooled one if there is one, else a new one. Connecting happens here,
    /// before any request body is handed over, so a connect failure leaves
    /// the request intact for another try.
    pub async fn checkout(
        self: &Arc<Self>,
        key: &UpstreamKey,
        tunnels: Option<&Pool>,
        baggage: &str,
        connect_timeout: Duration,
    ) -> Result<Sender, UpstreamError> {
        let address = key.address;
        if key.http2 {
            let existing = self
                .shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(key)
                .cloned();
            if let Some(sender) = existing.filter(|s| !s.is_closed()) {
                return Ok(Sender::Http2(sender, address));
            }
            let io = connect(key, tunnels, baggage, connect_timeout).await?;
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Http(address, e))?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    debug!(%address, error = %err, "upstream HTTP/2 connection ended");
                }
            });
            self.shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), sender.clone());
            return Ok(Sender::Http2(sender, address));
        }
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(key.clone()).or_default();
            loop {
                match list.pop() {
                    Some(sender) if sender.is_ready() => break Some(sender),
                    Some(_) => continue,
                    None => break None,
                }
            }
        };
        let sender = match idle {
            Some(sender) => sender,
            None => {
                let io = connect(key, tunnels, baggage, connect_timeout).await?;
                let (sender, connection) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Http(address, e))?;
                tokio::spawn(async move {
                    if let Err(err) = connection.with_upgrades().await {
                        debug!(%address, error = %err, "upstream HTTP/1.1 connection ended");
                    }
                });
                sender
            }
        };
        Ok(Sender::Http1(sender, Arc::downgrade(self), key.clone()))
    }
}

/// A checked-out upstream connection.
pub enum Sender {
    /// Goes back to its pool's idle list once the response has been read.
    Http1(
        http1::SendRequest<Body>,
        std::sync::Weak<Upstreams>,
        UpstreamKey,
    ),
    Http2(http2::SendRequest<Body>, SocketAddrV4),
}

impl Sender {
    pub async fn send(self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        match self {
            Self::Http2(mut sender, address) => sender
                .send_request(request)
                .await
                .map_err(|e| UpstreamError::Http(address, e)),
            Self::Http1(mut sender, pool, key) => {
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| UpstreamError::Http(key.address, e))?;
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        if let Some(pool) = pool.upgrade() {
                            pool.idle
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(key)
                                .or_default()
                                .push(sender);
                        }
                    }
                });
                Ok(response)
            }
        }
    }
}

impl UpstreamError {
    /// Whether the request never left meshd (nothing was sent).
    pub fn before_sending(&self) -> bool {
        !matches!(self, Self::Http(..))
    }
}

async fn connect(
    key: &UpstreamKey,
    tunnels: Option<&Pool>,
    baggage: &str,
    connect_timeout: Duration,
) -> Result<Box<dyn Io>, UpstreamError> {
    let address = key.address;
    match &key.via {
        Via::Direct => {
            let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(address))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout(address))?
                .map_err(|e| UpstreamError::Connect(address, e))?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream))
        }
        Via::Tunnel(tunnel) => {
            let pool = tunnels.ok_or(UpstreamError::NoTunnel(address))?;
            let stream = pool.open(tunnel, address, baggage).await?;
            Ok(Box::new(stream))
        }
    }
}
