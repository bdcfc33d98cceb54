//! Upstream HTTP connections, reused: HTTP/1.1 connections go back to an
//! idle list once their response is read; one HTTP/2 connection per
//! upstream carries every request. An upstream on another node is reached
//! through a tunnel stream, so its HTTP connection rides inside mTLS.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{
    hbone::pool::{Key as TunnelKey, Pool, TunnelError},
    policy::breaker::{ConnectionLimit, Overflow},
    state::ids::{OrigDstSource, ServiceId},
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How an upstream is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Direct,
    Tunnel(TunnelKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    /// The service the connection is for (its limits apply).
    pub service: ServiceId,
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
    #[error("circuit breaker: {0:?} limit reached")]
    Overflow(Overflow),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A free HTTP/1.1 connection and when it became free.
type Idle = (http1::SendRequest<Body>, Instant);

#[derive(Default)]
pub struct Upstreams {
    /// Free HTTP/1.1 connections, with when each became free.
    idle: Mutex<HashMap<UpstreamKey, Vec<Idle>>>,
    shared: Mutex<HashMap<UpstreamKey, http2::SendRequest<Body>>>,
}

impl Upstreams {
    /// A connection to the upstream `key`, ready for one request: a free
    /// pooled one if there is one, else a new one. Connecting happens here,
    /// before any request body is handed over, so a connect failure leaves
    /// the request intact for another try. Under a service's connection
    /// `limit`, a request that needs a new connection when none may be
    /// opened waits (as a pending request) for one to free up.
    pub async fn checkout(
        self: &Arc<Self>,
        key: &UpstreamKey,
        tunnels: Option<&Pool>,
        marks: &dyn OrigDstSource,
        baggage: &str,
        connect_timeout: Duration,
        limit: &Arc<ConnectionLimit>,
    ) -> Result<Sender, UpstreamError> {
        if let Some(sender) = self.reuse(key, limit) {
            return Ok(sender);
        }
        let slot = match limit.try_open() {
            Some(slot) => slot,
            None => {
                let wait = limit.wait_for(connect_timeout, || {
                    if let Some(sender) = self.reuse(key, limit) {
                        return Some(Err(sender));
                    }
                    self.close_idle_of(&key.service);
                    limit.try_open().map(Ok)
                });
                match wait.await.map_err(UpstreamError::Overflow)? {
                    Ok(slot) => slot,
                    Err(sender) => return Ok(sender),
                }
            }
        };
        let address = key.address;
        let io = connect(key, tunnels, marks, baggage, connect_timeout).await?;
        if key.http2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Http(address, e))?;
            tokio::spawn(async move {
                let _slot = slot;
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
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Http(address, e))?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(err) = connection.with_upgrades().await {
                debug!(%address, error = %err, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(Sender::Http1(Reusable {
            sender,
            pool: Arc::downgrade(self),
            key: key.clone(),
            limit: limit.clone(),
        }))
    }

    /// A pooled connection to `key` that can take a request now.
    fn reuse(self: &Arc<Self>, key: &UpstreamKey, limit: &Arc<ConnectionLimit>) -> Option<Sender> {
        if key.http2 {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            return shared
                .get(key)
                .filter(|s| !s.is_closed())
                .map(|s| Sender::Http2(s.clone(), key.address));
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((sender, _)) = list.pop() {
            if sender.is_ready() {
                return Some(Sender::Http1(Reusable {
                    sender,
                    pool: Arc::downgrade(self),
                    key: key.clone(),
                    limit: limit.clone(),
                }));
            }
        }
        None
    }

    /// Closes connections idle for longer than `idle_for`, closed ones, and
    /// the pool entries of endpoints that no longer have any (an endpoint
    /// a reload removed is forgotten this way).
    pub fn sweep(&self, idle_for: Duration) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for list in idle.values_mut() {
            list.retain(|(sender, since)| {
                !sender.is_closed() && now.duration_since(*since) < idle_for
            });
        }
        idle.retain(|_, list| !list.is_empty());
        drop(idle);
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, sender| !sender.is_closed());
    }

    /// Closes one idle HTTP/1.1 connection of `service` (to any of its
    /// endpoints), freeing its place under the connection limit.
    fn close_idle_of(&self, service: &ServiceId) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = idle
            .iter_mut()
            .find(|(k, list)| k.service == *service && !list.is_empty())
            .map(|(_, list)| list)
        {
            list.pop();
        }
    }
}

/// A checked-out HTTP/1.1 connection; goes back to its pool's idle list
/// once the response has been read.
pub struct Reusable {
    sender: http1::SendRequest<Body>,
    pool: std::sync::Weak<Upstreams>,
    key: UpstreamKey,
    limit: Arc<ConnectionLimit>,
}

impl Reusable {
    /// Puts the connection, free for a request, back on its pool's idle
    /// list (unless the pool is gone).
    fn give_back(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.key)
                .or_default()
                .push((self.sender, Instant::now()));
            self.limit.idle();
        }
    }
}

/// A checked-out upstream connection.
pub enum Sender {
    Http1(Reusable),
    Http2(http2::SendRequest<Body>, SocketAddrV4),
}

impl Sender {
    pub async fn send(self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        match self {
            Self::Http2(mut sender, address) => sender
                .send_request(request)
                .await
                .map_err(|e| UpstreamError::Http(address, e)),
            Self::Http1(mut conn) => {
                let response = conn
                    .sender
                    .send_request(request)
                    .await
                    .map_err(|e| UpstreamError::Http(conn.key.address, e))?;
                // A short response is often read whole by the connection's
                // task before its head reaches us: the connection is free
                // already and goes back now. Otherwise a task waits for it
                // (the response's body being read by the client's side).
                if conn.sender.is_ready() {
                    conn.give_back();
                } else {
                    tokio::spawn(async move {
                        if conn.sender.ready().await.is_ok() {
                            conn.give_back();
                        }
                    });
                }
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
    marks: &dyn OrigDstSource,
    baggage: &str,
    connect_timeout: Duration,
) -> Result<Box<dyn Io>, UpstreamError> {
    let address = key.address;
    match &key.via {
        Via::Direct => {
            let stream =
                tokio::time::timeout(connect_timeout, crate::proxy::connect(marks, address))
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
