//! The source side: one pooled mTLS HTTP/2 connection per (source identity,
//! destination node, destination identity), carrying a CONNECT stream per
//! captured connection. The destination identity is part of the key so the
//! certificate the destination presents always proves exactly the
//! endpoint's identity.

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
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
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{
    BAGGAGE, CONNECTION_WINDOW, KEEPALIVE, MAX_FRAME, STREAMS_PER_CONNECTION, STREAM_OPEN_TIMEOUT,
    STREAM_WINDOW,
};
use crate::{
    identity::{store::CertStore, tls, Identity},
    net::{
        relay::Resettable,
        workers::{self, PerWorker},
    },
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
    /// The shared attempt to connect, which another caller started, failed.
    #[error(transparent)]
    Attempt(Arc<TunnelError>),
    #[error("{node} refused the stream to {target}: {status}")]
    Refused {
        node: SocketAddrV4,
        target: SocketAddrV4,
        status: StatusCode,
    },
}

/// One pooled connection: the certificate generation it was made with and
/// how many streams it carries now.
#[derive(Clone)]
struct Connection {
    generation: u64,
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
}

/// What one key has: its connections, and the attempt in progress to make
/// another, which every caller waiting for one shares.
#[derive(Default)]
struct Entry {
    connections: Vec<Connection>,
    connecting: Option<watch::Receiver<Option<Attempt>>>,
}

type Attempt = Result<Connection, Arc<TunnelError>>;

pub struct Pool {
    /// Each worker's connections (a connection's task runs on the worker
    /// that made it: its streams are opened from there only).
    entries: Arc<Mutex<PerWorker<HashMap<Key, Entry>>>>,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    port: u16,
    /// Limit for TCP connect, TLS and HTTP/2 handshakes together.
    connect_timeout: Duration,
}

/// An open stream through a tunnel; its connection counts it until dropped.
pub struct Stream {
    io: TokioIo<Upgraded>,
    _counted: Counted,
}

struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::AcqRel);
        Self(streams.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Resettable for Stream {
    /// Dropping the stream resets it (RST_STREAM); nothing to arrange.
    fn reset_on_close(&self) {}
}

impl Resettable for TokioIo<Upgraded> {
    /// As for a `Stream`: the destination's end of one.
    fn reset_on_close(&self) {}
}

impl Pool {
    pub fn new(
        store: Arc<CertStore>,
        metrics: Arc<Metrics>,
        port: u16,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            entries: Default::default(),
            store,
            metrics,
            port,
            connect_timeout,
        }
    }

    /// Opens a CONNECT stream to `target` through a connection for `key`.
    pub async fn open(
        &self,
        key: &Key,
        target: SocketAddrV4,
        baggage: &str,
    ) -> Result<Stream, TunnelError> {
        let node = SocketAddrV4::new(key.node, self.port);
        let (mut sender, counted) = self.sender(key).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(BAGGAGE, baggage)
            .body(Empty::new())
            .expect("a CONNECT request from valid parts");
        let response = tokio::time::timeout(STREAM_OPEN_TIMEOUT, sender.send_request(request))
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
        Ok(Stream {
            io: TokioIo::new(upgraded),
            _counted: counted,
        })
    }

    /// A pooled connection for `key` with room for one more stream (the
    /// stream counted on it), connecting when there is none: none yet, all
    /// closed or full, or certificates or trust changed since they were
    /// made (new streams then use new ones; old streams finish on the old).
    /// Callers waiting for the same key share one attempt, bounded by the
    /// connect timeout; a caller that goes away does not cancel it.
    async fn sender(&self, key: &Key) -> Result<(SendRequest<Empty<Bytes>>, Counted), TunnelError> {
        loop {
            let mut attempt = {
                let generation = self.store.current().generation;
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                let entry = entries.mine().entry(key.clone()).or_default();
                entry
                    .connections
                    .retain(|c| c.generation == generation && !c.sender.is_closed());
                let open = entry
                    .connections
                    .iter()
                    .find(|c| c.streams.load(Ordering::Acquire) < STREAMS_PER_CONNECTION);
                if let Some(connection) = open {
                    return Ok((connection.sender.clone(), Counted::new(&connection.streams)));
                }
                match &entry.connecting {
                    Some(attempt) => attempt.clone(),
                    None => {
                        let attempt = self.start_connecting(key, generation);
                        entry.connecting = Some(attempt.clone());
                        attempt
                    }
                }
            };
            let done = attempt.wait_for(Option::is_some).await.map(|d| d.clone());
            match done {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(err))) => return Err(TunnelError::Attempt(err)),
                _ => return Err(TunnelError::Timeout(SocketAddrV4::new(key.node, self.port))),
            }
        }
    }

    /// Connects for `key` in a task of its own; the connection joins the
    /// key's entry and the attempt's outcome is published to its waiters.
    fn start_connecting(&self, key: &Key, generation: u64) -> watch::Receiver<Option<Attempt>> {
        let (done, attempt) = watch::channel(None);
        let connector = Connector {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            node: SocketAddrV4::new(key.node, self.port),
        };
        let (entries, key, timeout) = (self.entries.clone(), key.clone(), self.connect_timeout);
        let worker = workers::current();
        tokio::spawn(async move {
            let connected = match tokio::time::timeout(timeout, connector.connect(&key)).await {
                Ok(connected) => connected,
                Err(_) => {
                    connector.handshake_failed("timeout");
                    Err(TunnelError::Timeout(connector.node))
                }
            };
            let outcome = connected
                .map(|sender| Connection {
                    generation,
                    sender,
                    streams: Default::default(),
                })
                .map_err(Arc::new);
            {
                let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
                let entry = entries.of(worker).entry(key).or_default();
                if let Ok(connection) = &outcome {
                    entry.connections.push(connection.clone());
                }
                entry.connecting = None;
            }
            let _ = done.send(Some(outcome));
        });
        attempt
    }
}

/// What making one tunnel connection needs.
struct Connector {
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    node: SocketAddrV4,
}

impl Connector {
    async fn connect(&self, key: &Key) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let node = self.node;
        let tcp = TcpStream::connect(node)
            .await
            .map_err(|e| TunnelError::Connect(node, e))?;
        let _ = tcp.set_nodelay(true);
        let certs = self.store.current();
        let config =
            tls::client_config(&certs, &key.source, &key.destination, self.store.provider())?;
        let name = ServerName::try_from(key.destination.server_name())
            .map_err(|_| TunnelError::ServerName(key.destination.server_name()))?;
        let tls = match TlsConnector::from(config).connect(name, tcp).await {
            Ok(tls) => tls,
            Err(source) => {
                let reason = tls::failure_reason(&source);
                self.handshake_failed(reason);
                return Err(TunnelError::Handshake {
                    node,
                    reason,
                    source,
                });
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
