//! The destination side (:15008): accepts mutual TLS 1.3 from other nodes'
//! meshd, reads the peer's SPIFFE ID from its certificate, and serves
//! HTTP/2 CONNECT streams to this node's pods after authorization.

use std::{
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::{debug, warn, Instrument as _};

use crate::{
    config::Protocol,
    hbone::{Baggage, BAGGAGE, CONNECTION_WINDOW, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW},
    identity::{tls, Identity},
    net::accept::{Accepted, Caps, Slot, Slots},
    net::relay::relay,
    policy::authz::{self, Decision},
    proxy::ProxyInputs,
    state::snapshot::Snapshot,
    telemetry::{
        access::{self, AccessLog},
        labels,
        metrics::{HandshakeLabels, Metrics, TcpLabels},
        result::{Reports, RequestLine},
        ConnectionResult, RequestResult, ResponseFlag,
    },
};

mod observe;

pub use observe::fuzz as fuzz_observers;
mod requests;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for tunnels: {source}")]
pub struct BindError {
    pub address: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

pub struct Inbound {
    listener: TcpListener,
    address: SocketAddr,
}

/// The TLS config for the certificate generation it was built from.
#[derive(Default)]
struct ServerTls {
    config: Mutex<Option<(u64, Arc<ServerConfig>)>>,
}

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

impl Inbound {
    pub async fn bind(address: SocketAddr) -> Result<Self, BindError> {
        let listener =
            crate::net::listen::listen(address).map_err(|source| BindError { address, source })?;
        Ok(Self { listener, address })
    }

    /// Serves on a listener handed over by the previous meshd.
    pub fn adopt(listener: std::net::TcpListener, address: SocketAddr) -> Result<Self, BindError> {
        let listener =
            TcpListener::from_std(listener).map_err(|source| BindError { address, source })?;
        Ok(Self { listener, address })
    }

    /// A duplicate of the listening socket, for the next meshd.
    pub fn duplicate(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Accepts until `stop` turns true, then drains (see `accept_loop`).
    /// Connections not yet authenticated also take one of `handshakes`.
    pub async fn run(
        self,
        inputs: Arc<ProxyInputs>,
        caps: impl Into<Caps>,
        handshakes: Handshakes,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let tls = Arc::new(ServerTls::default());
        let metrics = inputs.metrics.clone();
        let handshakes = Arc::new(handshakes);
        let over = metrics.shed("inbound", "max_handshakes");
        crate::net::accept::accept_loop(
            self.listener,
            "inbound",
            caps,
            &metrics.accept_counters("inbound"),
            stop,
            drain,
            move |stream, peer| {
                let slot = handshakes.slots.take(peer.ip());
                let (tls, inputs, handshakes, over) = (
                    tls.clone(),
                    inputs.clone(),
                    handshakes.clone(),
                    over.clone(),
                );
                async move {
                    let Ok(slot) = slot else {
                        over.inc();
                        debug!(%peer, "too many handshakes in progress; resetting");
                        let _ = stream.get_ref().set_zero_linger();
                        return;
                    };
                    serve(tls, inputs, stream, slot, handshakes.timeout).await
                }
            },
        )
        .await;
    }
}

/// Handshakes in progress on the tunnel port: before a peer is
/// authenticated it holds one of few places (a quarter of them at most
/// from one source address) for at most `timeout`. Clones share the
/// places (one per worker accepting on the port).
#[derive(Clone)]
pub struct Handshakes {
    pub slots: Slots,
    pub timeout: Duration,
}

impl Handshakes {
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self {
            slots: Slots::new(max, max.div_ceil(4)),
            timeout,
        }
    }
}

impl ServerTls {
    /// The server config for the current certificates, rebuilt when they change.
    fn server_config(&self, inputs: &ProxyInputs) -> Result<Arc<ServerConfig>, tls::TlsError> {
        let store = inputs.store.as_ref().ok_or(tls::TlsError::NoRoots)?;
        let certs = store.current();
        let mut cached = self.config.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((generation, config)) = cached.as_ref() {
            if *generation == certs.generation {
                return Ok(config.clone());
            }
        }
        let generation = certs.generation;
        let config = tls::server_config(certs, store.provider())?;
        *cached = Some((generation, config.clone()));
        Ok(config)
    }
}

async fn serve(
    tls_cache: Arc<ServerTls>,
    inputs: Arc<ProxyInputs>,
    stream: Accepted,
    handshake: Slot,
    handshake_timeout: Duration,
) {
    let metrics = &inputs.metrics;
    // HTTP/2 frames small writes (window updates, short replies): never
    // hold them back for Nagle.
    let _ = stream.get_ref().set_nodelay(true);
    let remote = stream.get_ref().peer_addr().ok();
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let failed = |reason: &'static str| {
        metrics
            .tls_handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: "inbound",
                reason,
            })
            .inc();
    };
    let (tls, source) = match handshake_peer(&tls_cache, &inputs, stream, deadline).await {
        Ok(authenticated) => authenticated,
        Err(reason) => return failed(reason),
    };
    // Authenticated: the place is free for the next peer.
    drop(handshake);
    debug!(%source, "tunnel accepted");
    let inputs_stop = inputs.stop.clone();
    let service = service_fn(move |request| {
        let inputs = inputs.clone();
        let source = source.clone();
        async move { Ok::<_, Infallible>(stream_request(inputs, source, remote, request).await) }
    });
    let mut stop = inputs_stop;
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // On stop: GOAWAY, so the peer opens new streams elsewhere while
    // the streams in flight finish.
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = crate::net::accept::stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = served {
        debug!(error = %err, "tunnel connection ended with an error");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// The TLS handshake of a tunnel connection, by `deadline`, and the
/// SPIFFE ID the peer's certificate proves; else the failure's reason.
async fn handshake_peer(
    tls_cache: &ServerTls,
    inputs: &ProxyInputs,
    stream: Accepted,
    deadline: tokio::time::Instant,
) -> Result<(TlsStream<Accepted>, Identity), &'static str> {
    // Name what is plainly not TLS before rustls reads it.
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.get_ref().peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        Ok(Ok(1)) => {
            let reason = if first[0].is_ascii_alphabetic() {
                "plaintext"
            } else {
                "not_tls"
            };
            warn!(
                reason,
                "refusing a connection that does not start a TLS handshake"
            );
            return Err(reason);
        }
        Ok(_) => return Err("eof"),
        Err(_) => return Err("timeout"),
    }
    let config = match tls_cache.server_config(inputs) {
        Ok(config) => config,
        Err(err) => {
            warn!(error = %err, "cannot accept tunnels");
            return Err("no_certificates");
        }
    };
    let tls =
        match tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = tls::failure_reason(&err);
                warn!(reason, error = %err, "tunnel handshake failed");
                return Err(reason);
            }
            Err(_) => return Err("timeout"),
        };
    let trust_domain = inputs.snapshot.load().config.mesh.trust_domain.clone();
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| "no client certificate".to_owned())
        .and_then(|certs| tls::peer_identity(certs, &trust_domain));
    match peer {
        Ok(source) => Ok((tls, source)),
        Err(reason) => {
            warn!(%reason, "refusing a peer without a valid SPIFFE ID");
            Err("bad_identity")
        }
    }
}

/// One CONNECT stream: authorize, connect to the pod, relay. Every stream
/// that names a workload of this node is counted (`reporter=destination`),
/// refused ones with their flag.
async fn stream_request(
    inputs: Arc<ProxyInputs>,
    source: Identity,
    remote: Option<std::net::SocketAddr>,
    request: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let (target, baggage) = match connect_target(&request) {
        Ok(opened) => opened,
        Err(code) => return status(code),
    };
    let snapshot = inputs.snapshot.load();
    let Some(workload) = snapshot.local_workload(*target.ip()) else {
        warn!(%source, %target, "tunnel stream to an address that is no workload of this node");
        return status(StatusCode::NOT_FOUND);
    };
    let services = snapshot.services_of(*target.ip());
    let service = addressed(&snapshot, services, &baggage);
    // The peer's baggage names its workload; believed only when the
    // config knows that workload to run as the identity the peer proved,
    // and then the config's app and version are used, not the baggage's.
    let known = baggage
        .workload
        .as_ref()
        .and_then(|name| snapshot.known_workload(&source, name));
    let peer = labels::Peer {
        identity: Some(&source),
        workload: known.map(|k| (&k.name, &k.reported)),
    };
    let (speaks, serve) = how_followed(&inputs, &snapshot, target);
    let http = speaks.is_some();
    let labels = labels::destination(
        &snapshot.config.cluster,
        peer,
        workload,
        service,
        labels::Security::MutualTls,
        if http { "http" } else { "tcp" },
    );
    let access = inputs.access_log_for(service).map(|log| {
        let downstream = access::Downstream {
            remote,
            local: Some(target.into()),
        };
        (log.clone(), downstream)
    });
    let result = Outcome::new(&inputs.metrics, http, &labels, &access, target);
    if let Err((code, flag)) = admit(&inputs, &snapshot, &source, workload, target, serve) {
        return result.refuse(&inputs.metrics, code, flag);
    }
    drop(snapshot);

    let pod = match connect_pod(&inputs, target).await {
        Ok(pod) => pod,
        Err(code) => {
            return result.refuse(&inputs.metrics, code, ResponseFlag::UpstreamConnectFailure)
        }
    };
    let stream = Stream {
        pod,
        source,
        target,
        labels,
        access,
        speaks: speaks.unwrap_or(observe::Speaks::Http1),
    };
    match result {
        Outcome::Connection(connection) => {
            tokio::spawn(stream.relay(inputs, request, connection).in_current_span())
        }
        // Each request is reported on its own from here.
        Outcome::Requests(..) if serve => {
            tokio::spawn(stream.serve_http(inputs, request).in_current_span())
        }
        Outcome::Requests(..) => tokio::spawn(stream.observe(inputs, request).in_current_span()),
    };
    status(StatusCode::OK)
}

/// Whether a stream may reach the pod: its policies (unless each request
/// is decided when the stream is served as HTTP) and the endpoint's health.
fn admit(
    inputs: &ProxyInputs,
    snapshot: &Snapshot,
    source: &Identity,
    workload: &crate::config::Workload,
    target: SocketAddrV4,
    serve: bool,
) -> Result<(), (StatusCode, ResponseFlag)> {
    let decision = if serve {
        Decision::Allow
    } else {
        authz::authorize(
            &snapshot.config.policies,
            &authz::Request {
                source: Some(source),
                destination: snapshot.destination(*target.ip()),
                port: target.port(),
                http: None,
            },
        )
    };
    if let Decision::Deny { reason } = decision {
        let destination = workload.identity.uri().clone();
        crate::proxy::denied(&inputs.metrics, source.uri().clone(), destination, &reason);
        return Err((StatusCode::FORBIDDEN, ResponseFlag::Rbac));
    }
    if !snapshot.local_endpoint_healthy(*target.ip()) {
        warn!(%source, %target, "refusing a tunnel stream to an endpoint failing its health check");
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoHealthyUpstream,
        ));
    }
    Ok(())
}

/// The pod address a CONNECT stream asks for, and the peer's baggage.
fn connect_target(request: &Request<Incoming>) -> Result<(SocketAddrV4, Baggage), StatusCode> {
    if request.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let target = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddrV4>().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let baggage = request
        .headers()
        .get(BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .map(Baggage::decode)
        .unwrap_or_default();
    Ok((target, baggage))
}

/// How a stream to `port` is followed: the HTTP version its requests are
/// read in (none for a TCP port), and whether it is served as HTTP.
///
/// Where a policy decides each request, an HTTP port's stream is served
/// as HTTP. Else it is relayed as bytes and its requests followed —
/// HTTP/1 on an `http` port, HTTP/2 on an `http2` or `grpc` one (see
/// `observe`). With tracing on, every HTTP port's stream is served: the
/// destination's span must be the pod's parent, so `traceparent` is
/// rewritten. An `auto` port's stream is reported as a connection (what
/// the source sniffed as TCP must be counted as TCP).
fn how_followed(
    inputs: &ProxyInputs,
    snapshot: &Snapshot,
    target: SocketAddrV4,
) -> (Option<observe::Speaks>, bool) {
    let services = snapshot.services_of(*target.ip());
    let destination = snapshot.destination(*target.ip());
    let speaks = match port_protocol(snapshot, services, target.port()) {
        Some(Protocol::Http) => Some(observe::Speaks::Http1),
        Some(Protocol::Http2 | Protocol::Grpc) => Some(observe::Speaks::Http2),
        _ => None,
    };
    let serve = speaks.is_some()
        && (inputs.tracer.is_some()
            || authz::needs_requests(&snapshot.config.policies, &destination));
    (speaks, serve)
}

/// Connects to the pod within the connect timeout; the status the source
/// is answered with when that fails.
async fn connect_pod(inputs: &ProxyInputs, target: SocketAddrV4) -> Result<TcpStream, StatusCode> {
    let connect = tokio::time::timeout(
        inputs.connect_timeout,
        crate::proxy::connect(&*inputs.orig_dst, target),
    )
    .await;
    match connect {
        Ok(Ok(pod)) => {
            let _ = pod.set_nodelay(true);
            Ok(pod)
        }
        Ok(Err(err)) => {
            warn!(%target, error = %err, "connecting to the pod failed");
            Err(StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(_) => {
            warn!(%target, "connecting to the pod timed out");
            Err(StatusCode::GATEWAY_TIMEOUT)
        }
    }
}

/// How a tunnel stream is reported: as one connection (a TCP port), or
/// request by request (an HTTP port), where a stream that cannot be
/// served is one failed request.
enum Outcome {
    Connection(ConnectionResult),
    /// Reported with these labels, request by request (and logged so).
    Requests(TcpLabels, Option<Logged>),
}

/// Where a stream's lines go, and what they say of its ends.
type Logged = (Arc<AccessLog>, access::Downstream);

impl Outcome {
    /// An HTTP port's stream is reported request by request (a stream
    /// that cannot be served counts as one failed request); any other as
    /// one connection, logged from now.
    fn new(
        metrics: &Arc<Metrics>,
        http: bool,
        labels: &TcpLabels,
        access: &Option<Logged>,
        target: SocketAddrV4,
    ) -> Self {
        if http {
            return Self::Requests(labels.clone(), access.clone());
        }
        let mut result = ConnectionResult::new(metrics, Reports::one(labels.clone()));
        if let Some((log, downstream)) = access {
            result.log_access(log, *downstream, Some(target));
        }
        Self::Connection(result)
    }

    /// Refuses the stream with `code`, recorded with `flag`.
    fn refuse(
        self,
        metrics: &Arc<Metrics>,
        code: StatusCode,
        flag: ResponseFlag,
    ) -> Response<Empty<Bytes>> {
        match self {
            Self::Connection(result) => result.end(flag),
            Self::Requests(labels, access) => {
                let line = RequestLine {
                    method: Method::CONNECT,
                    uri: hyper::Uri::from_static("/"),
                };
                let mut result = RequestResult::new(
                    metrics,
                    &Arc::default(),
                    Reports::one(labels::http(labels)),
                    line,
                    std::time::Instant::now(),
                );
                if let Some((log, downstream)) = &access {
                    let headers = hyper::HeaderMap::new();
                    result.log_access(log, hyper::Version::HTTP_2, &headers, *downstream);
                }
                let answer = status(code)
                    .map(|body| http_body_util::BodyExt::map_err(body, |never| match never {}));
                drop(result.finish(answer, flag));
            }
        }
        status(code)
    }
}

/// The service the source says it addressed, if this endpoint really
/// backs it; else the endpoint's first service.
fn addressed<'a>(
    snapshot: &'a crate::state::snapshot::Snapshot,
    services: &[usize],
    baggage: &Baggage,
) -> Option<&'a crate::config::Service> {
    let of = |s: &usize| &*snapshot.config.services[*s];
    baggage
        .service
        .as_ref()
        .and_then(|(ns, name)| {
            services
                .iter()
                .map(of)
                .find(|s| s.namespace == *ns && s.name == *name)
        })
        .or_else(|| services.first().map(of))
}

/// An accepted tunnel stream and the pod connection it goes to.
struct Stream {
    pod: TcpStream,
    source: Identity,
    target: SocketAddrV4,
    /// The destination's labels for what the stream carries.
    labels: TcpLabels,
    access: Option<Logged>,
    /// What its requests are followed as, when they are.
    speaks: observe::Speaks,
}

impl Stream {
    /// Once the stream is open, relays it as bytes.
    async fn relay(
        self,
        inputs: Arc<ProxyInputs>,
        request: Request<Incoming>,
        mut result: ConnectionResult,
    ) {
        let Some(mut stream) = upgraded(request).await else {
            return result.end(ResponseFlag::DownstreamConnectionTermination);
        };
        let bytes = result.open();
        // A stream idle as long as a connection would be is closed too.
        let mut pod = crate::net::idle::Idle::new(
            self.pod,
            inputs.idle_timeout,
            inputs.metrics.idle_closed("inbound"),
        );
        let relayed = relay(
            &mut stream,
            &mut pod,
            inputs.buffer_size,
            &bytes.received,
            &bytes.sent,
        )
        .await;
        if let Err(err) = relayed {
            debug!(error = %err, "stream closed with an error");
        }
    }

    /// Once the stream is open, relays it as bytes while following its
    /// HTTP/1 requests (see `observe`).
    async fn observe(self, inputs: Arc<ProxyInputs>, request: Request<Incoming>) {
        let Some(stream) = upgraded(request).await else {
            return;
        };
        let observer = Arc::new(std::sync::Mutex::new(observe::Observer::new(
            &inputs.metrics,
            self.labels,
            self.access
                .map(|(log, downstream)| (log, downstream, self.target)),
            self.speaks,
        )));
        let mut client = observe::Observed::client(stream, &observer);
        let pod = crate::net::idle::Idle::new(
            self.pod,
            inputs.idle_timeout,
            inputs.metrics.idle_closed("inbound"),
        );
        let mut pod = observe::Observed::server(pod, &observer);
        let relayed = relay(&mut client, &mut pod, inputs.buffer_size, &[], &[]).await;
        let flag = match relayed {
            Ok(()) => ResponseFlag::DownstreamConnectionTermination,
            Err(err) => {
                debug!(error = %err, "stream closed with an error");
                ResponseFlag::UpstreamConnectionTermination
            }
        };
        observer.lock().unwrap_or_else(|p| p.into_inner()).end(flag);
    }

    /// Once the stream is open, serves its requests (see `requests`).
    async fn serve_http(self, inputs: Arc<ProxyInputs>, request: Request<Incoming>) {
        let Some(stream) = upgraded(request).await else {
            return;
        };
        let stream = crate::net::idle::Idle::new(
            stream,
            inputs.idle_timeout,
            inputs.metrics.idle_closed("inbound"),
        );
        let peer = requests::Peer {
            identity: self.source,
            labels: self.labels,
            series: Arc::default(),
            access: self.access,
        };
        requests::serve(inputs, stream, self.pod, peer, self.target).await;
    }
}

/// The stream a CONNECT request opened, once its answer is sent.
async fn upgraded(request: Request<Incoming>) -> Option<TokioIo<hyper::upgrade::Upgraded>> {
    match hyper::upgrade::on(request).await {
        Ok(upgraded) => Some(TokioIo::new(upgraded)),
        Err(err) => {
            debug!(error = %err, "stream upgrade failed");
            None
        }
    }
}

/// What `port` (a target port) of these services speaks.
fn port_protocol(snapshot: &Snapshot, services: &[usize], port: u16) -> Option<Protocol> {
    services
        .iter()
        .flat_map(|s| &snapshot.config.services[*s].ports)
        .find(|p| p.target_port == port)
        .map(|p| p.protocol)
}
