//! L7 authorization at the destination. When a policy for a pod's services
//! names HTTP methods, paths or headers, a tunnel stream to one of its HTTP
//! ports is not relayed as bytes: meshd serves it as HTTP, decides each
//! request with the source identity the tunnel proved, answers a denied one
//! `403` itself, and forwards the rest over the stream's own connection to
//! the pod. The source node is not trusted to have enforced anything.

use std::{convert::Infallible, net::SocketAddrV4, sync::Arc};

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
        http::{drain, respond::reply, splice_upgrade, upstream::Body},
        ProxyInputs,
    },
    telemetry::ResponseFlag,
};

/// The stream's connection to the pod, in the HTTP version the source
/// speaks (known from its first request).
enum Pod {
    Unopened(TcpStream),
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
    Gone,
}

/// Serves one tunnel stream as HTTP until either side closes it.
pub async fn serve<S>(
    inputs: Arc<ProxyInputs>,
    stream: S,
    pod: TcpStream,
    source: Identity,
    target: SocketAddrV4,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let pod = Arc::new(Mutex::new(Pod::Unopened(pod)));
    let header_timeout = inputs.header_read_timeout;
    let activity = Arc::new(drain::Activity::new(inputs.stop.clone()));
    let tracked = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let (inputs, pod, source) = (inputs.clone(), pod.clone(), source.clone());
        let activity = tracked.clone();
        async move {
            let version = request.version();
            let answer = one(&inputs, &pod, &source, target, request);
            Ok::<_, Infallible>(activity.answer(version, answer).await)
        }
    });
    let builder = crate::proxy::http::server(header_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(err) = drain::serve(conn, &activity).await {
        debug!(error = %err, "tunnel HTTP stream ended with an error");
    }
}

async fn one(
    inputs: &ProxyInputs,
    pod: &Mutex<Pod>,
    source: &Identity,
    target: SocketAddrV4,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let mesh = inputs.snapshot.load();
    // Decided on the path the pod will get, and forwarded as decided.
    let normalization = mesh.config.mesh.path_normalization;
    let normalized = match path::normalize(request.uri().path(), normalization) {
        Ok(path) if !path::miscased_method(request.method().as_str()) => path,
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                ResponseFlag::DownstreamProtocolError,
            )
        }
    };
    if normalized != request.uri().path() {
        let Some(uri) = with_path(request.uri(), &normalized) else {
            return reply(
                StatusCode::BAD_REQUEST,
                ResponseFlag::DownstreamProtocolError,
            );
        };
        *request.uri_mut() = uri;
    }
    let decision = authz::authorize(
        &mesh.config.policies,
        &authz::Request {
            source: Some(source),
            services: mesh.services_of(*target.ip()),
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
        return reply(StatusCode::FORBIDDEN, ResponseFlag::Rbac);
    }
    drop(mesh);
    let upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let sent = send(pod, request).await;
    match sent {
        Ok(response) => match upgrade {
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
            _ => response.map(BodyExt::boxed),
        },
        Err(err) => {
            warn!(%target, error = %err, "forwarding to the pod failed");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionTermination,
            )
        }
    }
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

async fn send(
    pod: &Mutex<Pod>,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, SendError> {
    let mut state = pod.lock().await;
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
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(connection.with_upgrades());
            Pod::Http1(sender)
        };
    }
    match &mut *state {
        Pod::Http2(sender) => {
            let mut sender = sender.clone();
            drop(state);
            Ok(sender.send_request(request).await?)
        }
        // One request at a time on HTTP/1.1, as on the stream itself.
        Pod::Http1(sender) => {
            sender.ready().await?;
            Ok(sender.send_request(request).await?)
        }
        Pod::Unopened(_) | Pod::Gone => Err("the connection to the pod failed earlier".into()),
    }
}
