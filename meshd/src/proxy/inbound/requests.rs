//! The destination's HTTP: a tunnel stream to one of a pod's HTTP ports is
//! not relayed as bytes. meshd serves it as HTTP, decides each request with
//! the source identity the tunnel proved (the source node is not trusted to
//! have enforced anything), answers a denied one `403` itself, forwards the
//! rest over the stream's own connection to the pod, and reports every
//! request as its destination (`reporter="destination"`).

use std::{net::SocketAddrV4, sync::Arc};

use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header,
    service::service_fn,
    Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex};
use tracing::{debug, warn};

use crate::{
    identity::Identity,
    policy::{
        authz::{self, Decision},
        path,
    },
    proxy::{
        http::{
            drain,
            h1::{Client, Home},
            is_grpc,
            respond::{reply, Refusal},
            splice_upgrade,
            upstream::Body,
        },
        ProxyInputs,
    },
    telemetry::{
        access::{AccessLog, Downstream},
        body::Counted,
        labels,
        metrics::{SeriesCache, TcpLabels},
        result::{Reports, RequestLine},
        trace, RequestResult, ResponseFlag,
    },
};

/// A request body as it goes to the pod: counted for the request's result.
type Sent = Counted<Incoming>;

/// The stream's connection to the pod, in the HTTP version the source
/// speaks (known from its first request).
enum Pod {
    Unopened(TcpStream),
    /// Free for the next request.
    Http1(Client<Sent>),
    /// Lent to a request's response, until its body is read (see `h1`).
    Lent,
    Http2(http2::SendRequest<Sent>),
    Gone,
}

/// Where a stream's HTTP/1.1 connection to its pod goes back to.
struct PodSlot(Arc<Mutex<Pod>>);

impl Home<Sent> for PodSlot {
    fn back(self, client: Client<Sent>) {
        // Requests on one HTTP/1.1 stream come one after another: the
        // slot is free, and still waits for this connection, unless the
        // stream moved on without it (then it is dropped).
        if let Ok(mut slot) = self.0.try_lock() {
            if matches!(*slot, Pod::Lent) {
                *slot = Pod::Http1(client);
            }
        }
    }
}

/// The source of a stream: the identity it proved, and the labels its
/// requests are reported with (`reporter="destination"`).
pub struct Peer {
    pub identity: Identity,
    pub labels: TcpLabels,
    /// The series its last request was recorded in.
    pub series: Arc<SeriesCache>,
    /// Where its requests' lines go, when they are logged.
    pub access: Option<(Arc<AccessLog>, Downstream)>,
}

/// Serves one tunnel stream as HTTP until either side closes it.
pub async fn serve<S>(
    inputs: Arc<ProxyInputs>,
    stream: S,
    pod: TcpStream,
    peer: Peer,
    target: SocketAddrV4,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let pod = Arc::new(Mutex::new(Pod::Unopened(pod)));
    let peer = Arc::new(peer);
    let header_timeout = inputs.header_read_timeout;
    let activity = Arc::new(drain::Activity::new(inputs.stop.clone()));
    let tracked = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let (inputs, pod, peer) = (inputs.clone(), pod.clone(), peer.clone());
        let activity = tracked.clone();
        async move {
            let version = request.version();
            let answer = Box::pin(one(&inputs, &pod, &peer, target, request));
            let answer = activity.answer(version, answer).await;
            // What the pod did to its connection, the stream does to the
            // source: its request ends without an answer.
            match answer.extensions().get::<PodReset>() {
                Some(reset) => Err(*reset),
                None => Ok(answer),
            }
        }
    });
    let builder = crate::proxy::http::server(header_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(err) = drain::serve(conn, &activity).await {
        debug!(error = %err, "tunnel HTTP stream ended with an error");
    }
}

/// One request: decided, forwarded, and reported as its destination.
async fn one(
    inputs: &Arc<ProxyInputs>,
    pod: &Arc<Mutex<Pod>>,
    peer: &Peer,
    target: SocketAddrV4,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let mut labels = peer.labels.clone();
    labels.request_protocol = if is_grpc(request.headers()) {
        "grpc"
    } else {
        "http"
    };
    let line = RequestLine {
        method: request.method().clone(),
        uri: request.uri().clone(),
    };
    let mut result = RequestResult::new(
        &inputs.metrics,
        &peer.series,
        Reports::one(labels::http(labels)),
        line,
        std::time::Instant::now(),
    );
    if let Some((log, downstream)) = &peer.access {
        result.log_access(log, request.version(), request.headers(), *downstream);
        result.set_upstream(target);
    }
    // Traced: the server span is a child of the source's client span, and
    // the pod's parent.
    if let Some(tracer) = &inputs.tracer {
        let span =
            trace::Incoming::read(request.headers()).child(tracer.ratio(), || fastrand::u64(..));
        request
            .headers_mut()
            .insert(trace::TRACEPARENT, trace::format_traceparent(&span.context));
        result.set_trace(tracer, span, None);
    }
    let request = request.map(|body| result.count_request(body));
    match forward(inputs, pod, &peer.identity, target, request).await {
        Ok(response) => result.finish(response, ResponseFlag::None),
        Err(refusal) => {
            let mut answer = result.finish(reply(refusal.status, refusal.flag), refusal.flag);
            if refusal == Refusal::UPSTREAM_RESET {
                answer.extensions_mut().insert(PodReset);
            }
            answer
        }
    }
}

/// The pod's connection failed under a request: the request is recorded
/// as meshd's `503` (`UC`), as the source records a reset, but the source
/// gets the reset itself — as it would from a relayed stream — so its
/// retry policy sees what really happened.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the pod's connection failed under the request")]
struct PodReset;

/// Decides the request on the path the pod will get, and forwards it so.
async fn forward(
    inputs: &ProxyInputs,
    pod: &Arc<Mutex<Pod>>,
    source: &Identity,
    target: SocketAddrV4,
    mut request: Request<Sent>,
) -> Result<Response<Body>, Refusal> {
    let mesh = inputs.snapshot.load();
    let normalization = mesh.config.mesh.path_normalization;
    let normalized = match path::normalize(request.uri().path(), normalization) {
        Ok(path) if !path::miscased_method(request.method().as_str()) => path,
        _ => return Err(Refusal::BAD_REQUEST),
    };
    if normalized != request.uri().path() {
        let uri = with_path(request.uri(), &normalized).ok_or(Refusal::BAD_REQUEST)?;
        *request.uri_mut() = uri;
    }
    let decision = authz::authorize(
        &mesh.config.policies,
        &authz::Request {
            source: Some(source),
            destination: mesh.destination(*target.ip()),
            port: target.port(),
            http: Some(authz::Http {
                method: request.method(),
                path: request.uri().path(),
                headers: request.headers(),
            }),
        },
    );
    if let Decision::Deny { reason } = decision {
        let destination = mesh
            .local_workload(*target.ip())
            .map_or_else(|| Arc::from("unknown"), |w| w.identity.uri().clone());
        let reason = format!("{reason} ({} {})", request.method(), request.uri().path());
        crate::proxy::denied(&inputs.metrics, source.uri().clone(), destination, &reason);
        return Err(Refusal::DENIED);
    }
    drop(mesh);
    let upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let response = send(inputs, pod, target, request).await.map_err(|err| {
        warn!(%target, error = %err, "forwarding to the pod failed");
        Refusal::UPSTREAM_RESET
    })?;
    Ok(match upgrade {
        Some(upgrade) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let (parts, body) = response.into_parts();
            splice_upgrade(upgrade, Response::from_parts(parts.clone(), body));
            Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
        }
        _ => response,
    })
}

/// `uri` with its path replaced by `path` (its query kept).
fn with_path(uri: &hyper::Uri, path: &str) -> Option<hyper::Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    hyper::Uri::from_parts(parts).ok()
}

type SendError = Box<dyn std::error::Error + Send + Sync>;

/// Sends `request` on the stream's connection to the pod, opened in the
/// request's HTTP version when first needed — and opened again when the
/// pod closed or reset the last one.
async fn send(
    inputs: &ProxyInputs,
    pod: &Arc<Mutex<Pod>>,
    target: SocketAddrV4,
    request: Request<Sent>,
) -> Result<Response<Body>, SendError> {
    let mut state = pod.lock().await;
    let closed = match &mut *state {
        Pod::Http1(client) => !client.usable(),
        Pod::Http2(sender) => sender.is_closed(),
        Pod::Unopened(_) => false,
        Pod::Lent | Pod::Gone => true,
    };
    if closed {
        let connect = crate::proxy::connect(&*inputs.orig_dst, target);
        let stream = tokio::time::timeout(inputs.connect_timeout, connect)
            .await
            .map_err(|_| "connecting to the pod again timed out")??;
        let _ = stream.set_nodelay(true);
        *state = Pod::Unopened(stream);
    }
    if let Pod::Unopened(_) = &*state {
        let Pod::Unopened(stream) = std::mem::replace(&mut *state, Pod::Gone) else {
            unreachable!("matched above")
        };
        let io = TokioIo::new(stream);
        *state = if request.version() == Version::HTTP_2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(connection);
            Pod::Http2(sender)
        } else {
            Pod::Http1(Client::handshake(&http1::Builder::new(), io).await?)
        };
    }
    match std::mem::replace(&mut *state, Pod::Lent) {
        Pod::Http2(mut sender) => {
            *state = Pod::Http2(sender.clone());
            drop(state);
            Ok(sender.send_request(request).await?.map(BodyExt::boxed))
        }
        // One request at a time on HTTP/1.1, as on the stream itself: the
        // connection is lent to it, and back once its answer is read.
        Pod::Http1(client) => {
            drop(state);
            let slot = PodSlot(pod.clone());
            Ok(client.send(request, slot).await?.map(BodyExt::boxed))
        }
        Pod::Unopened(_) | Pod::Lent | Pod::Gone => {
            *state = Pod::Gone;
            Err("the connection to the pod failed earlier".into())
        }
    }
}
