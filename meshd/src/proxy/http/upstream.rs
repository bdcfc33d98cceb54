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

use super::h1::{Client, Driven, Home};
use crate::{
    hbone::pool::{Key as TunnelKey, Pool, TunnelError},
    net::workers::{self, PerWorker},
    policy::breaker::{ConnectionLimit, Overflow, Slot},
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

/// A free HTTP/1.1 connection, its place in the pool, and when it became
/// free.
type Idle = (Client<Body>, Pooled, Instant);

#[derive(Default)]
pub struct Upstreams {
    /// Free HTTP/1.1 connections, with when each became free — each
    /// worker's apart, as a connection is driven by the worker that made it.
    idle: Mutex<PerWorker<HashMap<UpstreamKey, Vec<Idle>>>>,
    /// Each worker's HTTP/2 connections (their tasks run on that worker).
    shared: Mutex<PerWorker<HashMap<UpstreamKey, http2::SendRequest<Body>>>>,
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
        if let Some(sender) = self.reuse(key) {
            return Ok(sender);
        }
        let slot = match limit.try_open() {
            Some(slot) => slot,
            None => {
                let wait = limit.wait_for(connect_timeout, || {
                    if let Some(sender) = self.reuse(key) {
                        return Some(Err(sender));
                    }
                    // At the limit, another worker's HTTP/2 connection
                    // (its task runs there) rather than none: one may be
                    // all the limit allows, held as long as it is open.
                    if let Some(sender) = self.reuse_elsewhere(key) {
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
                .mine()
                .insert(key.clone(), sender.clone());
            return Ok(Sender::Http2(sender, address));
        }
        let client = Client::handshake(&http1::Builder::new(), TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Http(address, e))?;
        Ok(Sender::Http1(
            client,
            Pooled {
                pool: Arc::downgrade(self),
                worker: workers::current(),
                key: key.clone(),
                limit: limit.clone(),
                _slot: slot,
            },
        ))
    }

    /// A pooled connection to `key` that can take a request now.
    fn reuse(&self, key: &UpstreamKey) -> Option<Sender> {
        if key.http2 {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            return open_http2(shared.mine(), key);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.mine().get_mut(key)?;
        while let Some((mut client, pooled, _)) = list.pop() {
            if client.usable() {
                return Some(Sender::Http1(client, pooled));
            }
        }
        None
    }

    /// Any worker's open HTTP/2 connection to `key` (none for HTTP/1.1,
    /// whose free connections are closed to make room instead).
    fn reuse_elsewhere(&self, key: &UpstreamKey) -> Option<Sender> {
        if !key.http2 {
            return None;
        }
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let found = shared.all().find_map(|senders| open_http2(senders, key));
        found
    }

    /// Closes connections idle for longer than `idle_for`, closed ones, and
    /// the pool entries of endpoints that no longer have any (an endpoint
    /// a reload removed is forgotten this way).
    pub fn sweep(&self, idle_for: Duration) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for lists in idle.all() {
            for list in lists.values_mut() {
                list.retain(|(client, _, since)| {
                    !client.is_closed() && now.duration_since(*since) < idle_for
                });
            }
            lists.retain(|_, list| !list.is_empty());
        }
        drop(idle);
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for senders in shared.all() {
            senders.retain(|_, sender| !sender.is_closed());
        }
    }

    /// Closes one idle HTTP/1.1 connection of `service` (to any of its
    /// endpoints), freeing its place under the connection limit.
    fn close_idle_of(&self, service: &ServiceId) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let closed = idle
            .all()
            .flat_map(|lists| lists.iter_mut())
            .find(|(k, list)| k.service == *service && !list.is_empty())
            .and_then(|(_, list)| list.pop());
        drop(closed);
    }
}

/// `key`'s HTTP/2 connection among `senders`, if it is still open.
fn open_http2(
    senders: &HashMap<UpstreamKey, http2::SendRequest<Body>>,
    key: &UpstreamKey,
) -> Option<Sender> {
    senders
        .get(key)
        .filter(|s| !s.is_closed())
        .map(|s| Sender::Http2(s.clone(), key.address))
}

/// A checked-out HTTP/1.1 connection's place: the pool it goes back to
/// once its response has been read, and its place under the service's
/// connection limit, held until the connection is dropped.
pub struct Pooled {
    pool: std::sync::Weak<Upstreams>,
    /// The worker driving the connection.
    worker: usize,
    key: UpstreamKey,
    limit: Arc<ConnectionLimit>,
    _slot: Slot,
}

impl Home<Body> for Pooled {
    /// Puts the connection, free for a request, back on its pool's idle
    /// list (unless the pool is gone).
    fn back(self, client: Client<Body>) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let limit = self.limit.clone();
        pool.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .of(self.worker)
            .entry(self.key.clone())
            .or_default()
            .push((client, self, Instant::now()));
        limit.idle();
    }
}

/// A checked-out upstream connection.
pub enum Sender {
    Http1(Client<Body>, Pooled),
    Http2(http2::SendRequest<Body>, SocketAddrV4),
}

impl Sender {
    pub async fn send(self, request: Request<Body>) -> Result<Response<Answer>, UpstreamError> {
        match self {
            Self::Http2(mut sender, address) => sender
                .send_request(request)
                .await
                .map(|r| r.map(Answer::Http2))
                .map_err(|e| UpstreamError::Http(address, e)),
            Self::Http1(client, pooled) => {
                let address = pooled.key.address;
                client
                    .send(request, pooled)
                    .await
                    .map(|r| r.map(Answer::Http1))
                    .map_err(|e| UpstreamError::Http(address, e))
            }
        }
    }
}

/// An upstream's response body.
// Moved a few times, then boxed as the client's response body: boxing a
// variant here would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    /// Its connection is driven while it is read (see `h1`).
    Http1(Driven<Body, Pooled>),
    Http2(Incoming),
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Http1(body) => std::pin::Pin::new(body).poll_frame(cx),
            Self::Http2(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2(body) => body.size_hint(),
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Empty};
    use tokio::sync::mpsc;

    use super::*;
    use crate::{
        net::workers::Workers,
        state::ids::{Captured, ClientAddr},
    };

    struct NoCapture;

    impl OrigDstSource for NoCapture {
        fn take(&self, _: ClientAddr) -> Option<Captured> {
            None
        }
    }

    /// An HTTP/2 server on loopback answering every request with 200.
    async fn http2_server() -> SocketAddrV4 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let std::net::SocketAddr::V4(address) = listener.local_addr().expect("address") else {
            panic!("an IPv4 address");
        };
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|_| async {
                    Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        address
    }

    /// One request to `key` from the calling worker: its status, or why
    /// there was none.
    async fn ask(
        upstreams: &Arc<Upstreams>,
        key: &UpstreamKey,
        limit: &Arc<ConnectionLimit>,
    ) -> Result<u16, String> {
        let sender = upstreams
            .checkout(key, None, &NoCapture, "", Duration::from_secs(1), limit)
            .await
            .map_err(|e| e.to_string())?;
        let request = Request::builder()
            .uri(format!("http://{}/", key.address))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .expect("request");
        let response = sender.send(request).await.map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }

    #[tokio::test]
    async fn an_http2_upstream_at_its_connection_limit_serves_every_worker() {
        let address = http2_server().await;
        let upstreams = Arc::new(Upstreams::default());
        // One connection in all: worker 0's, held while it is open.
        let limit = ConnectionLimit::new(Some(1), None);
        let key = UpstreamKey {
            service: ServiceId {
                namespace: "default".into(),
                name: "echo".into(),
            },
            address,
            via: Via::Direct,
            http2: true,
        };
        let (answers, mut answered) = mpsc::unbounded_channel();
        let (first_done, first) = tokio::sync::watch::channel(false);
        let (second_done, second) = tokio::sync::watch::channel(false);
        let workers = Workers::start(2, |index| {
            let (upstreams, key, limit, answers) = (
                upstreams.clone(),
                key.clone(),
                limit.clone(),
                answers.clone(),
            );
            let (first_done, mut first, mut second) =
                (first_done.clone(), first.clone(), second.clone());
            move || async move {
                if index == 1 {
                    // Only once worker 0 holds the one connection.
                    let _ = first.wait_for(|done| *done).await;
                }
                let _ = answers.send((index, ask(&upstreams, &key, &limit).await));
                if index == 0 {
                    let _ = first_done.send(true);
                    // Keep the connection (its task runs here) until the
                    // other worker has asked.
                    let _ = second.wait_for(|done| *done).await;
                }
            }
        })
        .expect("workers");
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(answered.recv().await.expect("an answer from each worker"));
            if got.len() == 2 {
                let _ = second_done.send(true);
            }
        }
        workers.join().await;
        got.sort_by_key(|(index, _)| *index);
        assert_eq!(got, [(0, Ok(200)), (1, Ok(200))]);
    }
}
