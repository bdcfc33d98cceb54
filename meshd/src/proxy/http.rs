//! L7: captured connections to `http`, `http2` and `grpc` ports (and `auto`
//! ports that sniff as HTTP) are served by hyper; each request is routed,
//! balanced over endpoints, given its timeout, forwarded over a reused
//! upstream connection (through a tunnel for other nodes), measured with
//! Istio's request metrics and written to the access log.

pub mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    service::service_fn,
    HeaderMap, Request, Response, StatusCode, Uri, Version,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use self::upstream::{Body, UpstreamError, UpstreamKey, Via};
use super::ProxyInputs;
use crate::{
    config::{Protocol, Workload},
    mesh::{Mesh, Path},
    metrics::{HttpLabels, TcpLabels},
    routing,
    tunnel::{pool::Key as TunnelKey, Baggage},
};

const UNKNOWN: &str = "unknown";

/// What every request of one captured connection shares.
pub struct Connection {
    pub dst: SocketAddrV4,
    pub source: Option<Workload>,
    /// The client's HTTP version decides the upstream's on `auto` ports.
    pub protocol: Protocol,
}

/// Serves one captured connection as HTTP until the client closes it.
/// When meshd stops, the connection is shut down gracefully: requests in
/// flight finish, then it closes (HTTP/2 GOAWAY; HTTP/1.1 closes after the
/// current response) instead of holding the drain open while idle.
pub async fn serve(inputs: Arc<ProxyInputs>, client: TcpStream, connection: Connection) {
    let mut stop = inputs.stop.clone();
    let connection = Arc::new(connection);
    let service = service_fn(move |request| {
        let inputs = inputs.clone();
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(handle(&inputs, &connection, request).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = super::stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = served {
        debug!(error = %err, "HTTP connection ended with an error");
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `TE: trailers` survives (gRPC needs it), as does `Upgrade` when the
/// request upgrades.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrading && name == header::UPGRADE))
        .collect();
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn reply(status: StatusCode, flags: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!(
            "meshd: {}\n",
            status.canonical_reason().unwrap_or("error")
        )))
        .map_err(|never| match never {})
        .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-meshd-response-flags", HeaderValue::from_static(flags));
    response
}

/// A quick random number for weights and balancing.
fn random() -> u64 {
    fastrand::u64(..)
}

async fn handle(
    inputs: &ProxyInputs,
    connection: &Connection,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let mesh = inputs.mesh.load_full();
    let Some(target) = mesh.http_target(connection.dst) else {
        // The service went away with a reload while this connection lived.
        inputs
            .metrics
            .unresolved
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: crate::metrics::UnresolvedReason::unknown_destination,
            })
            .inc();
        return reply(StatusCode::SERVICE_UNAVAILABLE, "NR");
    };
    let service = &mesh.config.services[target.service];
    let source = connection.source.as_ref();
    let grpc = is_grpc(request.headers());
    let line = request_line(&request);
    // Answers meshd gives itself, counted and logged like any other.
    let refuse = |status, flags, route: &str, endpoint: Option<usize>, path: Option<Path>| {
        let mut labels = http_labels(&mesh, source, target.service, endpoint, path, grpc);
        let upstream = endpoint
            .map(|e| SocketAddrV4::new(service.endpoints[e].address, target.port.target_port));
        record(
            inputs,
            &mut labels,
            reply(status, flags),
            0,
            started,
            route,
            &line,
            upstream,
        )
    };
    let route = match routing::select(
        &service.routes,
        request.method(),
        request.uri().path(),
        request.headers(),
    ) {
        Some(route) => route,
        None => return refuse(StatusCode::NOT_FOUND, "NR", "none", None, None),
    };
    let source_name = source.map_or(UNKNOWN, |w| &*w.name);
    if let Err(limit) = mesh.admit(
        target.service,
        source_name,
        started.duration_since(*clock_origin()),
    ) {
        let limit = match limit {
            crate::ratelimit::Refused::Service => "service",
            crate::ratelimit::Refused::Source => "source",
        };
        inputs
            .metrics
            .rate_limited
            .get_or_create(&crate::metrics::RateLimitLabels {
                destination_service: service.hostname.clone(),
                limit,
            })
            .inc();
        return refuse(StatusCode::TOO_MANY_REQUESTS, "RL", &route.name, None, None);
    }
    let Some(_permit) = mesh.request_permit(target.service) else {
        breaker_tripped(inputs, &service.hostname, "requests");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "UO",
            &route.name,
            None,
            None,
        );
    };
    let endpoint = match target.pinned {
        Some(endpoint) => Some(endpoint),
        None => mesh.pick_endpoint(
            target.service,
            route.backend(random()),
            [random(), random()],
        ),
    };
    let Some(endpoint_index) = endpoint else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            &route.name,
            None,
            None,
        );
    };
    let endpoint = &service.endpoints[endpoint_index];
    let address = SocketAddrV4::new(endpoint.address, target.port.target_port);
    let path = match mesh.path(endpoint) {
        Ok(path) => path,
        Err(_) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                &route.name,
                Some(endpoint_index),
                None,
            )
        }
    };
    let mut labels = http_labels(
        &mesh,
        source,
        target.service,
        Some(endpoint_index),
        Some(path),
        grpc,
    );

    if path == Path::Local {
        if !super::authorized_locally(inputs, &mesh, source, address, endpoint) {
            return record(
                inputs,
                &mut labels,
                reply(StatusCode::FORBIDDEN, "RBAC"),
                0,
                started,
                &route.name,
                &line,
                Some(address),
            );
        }
    }
    let http2 = match target.port.protocol {
        Protocol::Http => false,
        Protocol::Http2 | Protocol::Grpc => true,
        _ => connection.protocol == Protocol::Http2,
    };
    let via = match path {
        Path::Local => Via::Direct,
        Path::Tunnel { node } => match source {
            Some(source) => Via::Tunnel(TunnelKey {
                source: source.identity.clone(),
                node,
                destination: endpoint.identity.clone(),
            }),
            None => {
                warn!(upstream = %address, "no identity to tunnel with: the source workload is unknown");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UF",
                    &route.name,
                    Some(endpoint_index),
                    Some(path),
                );
            }
        },
    };
    let baggage = source
        .map(|w| {
            Baggage {
                workload: Some(w.name.clone()),
                app: Some(w.app.clone()),
                version: Some(w.version.clone()),
                service: Some((service.namespace.clone(), service.name.clone())),
            }
            .encode()
        })
        .unwrap_or_default();
    let request_bytes = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .is_some()
        .then(|| hyper::upgrade::on(&mut request));
    let outgoing = match rewrite(request, http2) {
        Some(outgoing) => outgoing,
        None => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "DPE",
                &route.name,
                Some(endpoint_index),
                Some(path),
            )
        }
    };
    let timeout = route.timeout.or(service.timeout);
    let stats = mesh.endpoint_stats(target.service, endpoint_index);
    let in_flight = InFlight::start(stats);
    let key = UpstreamKey {
        address,
        via,
        http2,
    };
    let send = inputs.upstreams.send(
        &key,
        outgoing,
        inputs.pool.as_ref(),
        &baggage,
        inputs.connect_timeout,
    );
    let result = match timeout {
        Some(limit) => tokio::time::timeout(limit, send).await.ok(),
        None => Some(send.await),
    };
    drop(in_flight);
    // Only answers teach the balancer latency: an endpoint that fails fast
    // must not look fast.
    if matches!(result, Some(Ok(_))) {
        stats.observe(started.elapsed().as_nanos() as u64, now_nanos());
    }
    let response = match result {
        None => reply(StatusCode::GATEWAY_TIMEOUT, "UT"),
        Some(Err(err)) => {
            warn!(upstream = %address, error = %err, "upstream request failed");
            match err {
                UpstreamError::Http(..) => reply(StatusCode::SERVICE_UNAVAILABLE, "UC"),
                _ => reply(StatusCode::SERVICE_UNAVAILABLE, "UF"),
            }
        }
        Some(Ok(response)) => {
            if let Some(upgrade) =
                upgrade.filter(|_| response.status() == StatusCode::SWITCHING_PROTOCOLS)
            {
                let upstream = response.into_parts();
                return finish_upgrade(
                    inputs,
                    &mut labels,
                    upgrade,
                    upstream,
                    started,
                    &route.name,
                    &line,
                    address,
                );
            }
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            Response::from_parts(parts, body.boxed())
        }
    };
    record(
        inputs,
        &mut labels,
        response,
        request_bytes,
        started,
        &route.name,
        &line,
        Some(address),
    )
}

/// Completes a 101 response: relays the upgraded streams both ways.
#[allow(clippy::too_many_arguments)]
fn finish_upgrade(
    inputs: &ProxyInputs,
    labels: &mut HttpLabels,
    downstream: hyper::upgrade::OnUpgrade,
    (mut parts, body): (hyper::http::response::Parts, Incoming),
    started: Instant,
    route: &str,
    line: &str,
    address: SocketAddrV4,
) -> Response<Body> {
    let upstream_upgrade = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream_upgrade) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
            Err(err) => debug!(error = %err, "upgrade failed"),
        }
    });
    strip_hop_by_hop(&mut parts.headers, true);
    let response = Response::from_parts(
        parts,
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    record(
        inputs,
        labels,
        response,
        0,
        started,
        route,
        line,
        Some(address),
    )
}

/// The request as the upstream must see it: hop-by-hop headers gone, the
/// URI in the form the upstream's HTTP version wants.
fn rewrite(request: Request<Incoming>, http2: bool) -> Option<Request<Body>> {
    let (mut parts, body) = request.into_parts();
    let upgrading = parts.headers.contains_key(header::UPGRADE) && !http2;
    strip_hop_by_hop(&mut parts.headers, upgrading);
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    })?;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if http2 {
        parts.version = Version::HTTP_2;
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .ok()?;
        parts.headers.remove(header::HOST);
    } else {
        parts.version = Version::HTTP_11;
        parts.uri = Uri::builder().path_and_query(path).build().ok()?;
        if !parts.headers.contains_key(header::HOST) {
            parts
                .headers
                .insert(header::HOST, HeaderValue::from_str(&authority).ok()?);
        }
    }
    Some(Request::from_parts(parts, body.boxed()))
}

/// Counts a request as outstanding on an endpoint until dropped, so a
/// client that goes away mid-request does not leave it counted for ever.
struct InFlight<'a>(&'a crate::balance::EndpointStats);

impl<'a> InFlight<'a> {
    fn start(stats: &'a crate::balance::EndpointStats) -> Self {
        stats
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn request_line(request: &Request<Incoming>) -> String {
    format!("{} {}", request.method(), request.uri().path())
}

/// Counts a request or connection shed by a circuit-breaker limit.
pub fn breaker_tripped(inputs: &ProxyInputs, service: &Arc<str>, limit: &'static str) {
    inputs
        .metrics
        .circuit_breaker_rejections
        .get_or_create(&crate::metrics::BreakerLabels {
            destination_service: service.clone(),
            limit,
        })
        .inc();
}

/// A fixed origin for the balancer's and rate limiter's clocks.
fn clock_origin() -> &'static Instant {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    clock_origin().elapsed().as_nanos() as u64
}

fn http_labels(
    mesh: &Mesh,
    source: Option<&Workload>,
    service: usize,
    endpoint: Option<usize>,
    path: Option<Path>,
    grpc: bool,
) -> HttpLabels {
    let svc = &mesh.config.services[service];
    let ep = endpoint.map(|e| &svc.endpoints[e]);
    let unknown: Arc<str> = Arc::from(UNKNOWN);
    let pick =
        |f: fn(&Workload) -> &Arc<str>| source.map_or_else(|| unknown.clone(), |w| f(w).clone());
    HttpLabels {
        connection: TcpLabels {
            reporter: "source",
            source_workload: pick(|w| &w.name),
            source_workload_namespace: pick(|w| &w.namespace),
            source_principal: pick(|w| w.identity.uri()),
            source_app: pick(|w| &w.app),
            source_version: pick(|w| &w.version),
            destination_workload: ep.map_or_else(|| unknown.clone(), |e| e.workload.clone()),
            destination_workload_namespace: svc.namespace.clone(),
            destination_principal: ep.map_or_else(|| unknown.clone(), |e| e.identity.uri().clone()),
            destination_service: svc.hostname.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_flags: "-",
            connection_security_policy: match path {
                Some(Path::Local) => "none",
                Some(Path::Tunnel { .. }) => "mutual_tls",
                None => "unknown",
            },
        },
        response_code: 0,
        grpc_response_status: Arc::from(""),
    }
}

/// Counts the request, logs it, and hands back the response.
#[allow(clippy::too_many_arguments)]
fn record(
    inputs: &ProxyInputs,
    labels: &mut HttpLabels,
    response: Response<Body>,
    request_bytes: u64,
    started: Instant,
    route: &str,
    line: &str,
    upstream: Option<SocketAddrV4>,
) -> Response<Body> {
    labels.response_code = response.status().as_u16();
    if let Some(flags) = response.headers().get("x-meshd-response-flags") {
        labels.connection.response_flags = match flags.as_bytes() {
            b"UT" => "UT",
            b"UF" => "UF",
            b"UC" => "UC",
            b"UH" => "UH",
            b"NR" => "NR",
            b"RBAC" => "RBAC",
            b"RL" => "RL",
            b"UO" => "UO",
            _ => "DPE",
        };
    }
    if let Some(status) = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        labels.grpc_response_status = Arc::from(status);
    }
    let elapsed = started.elapsed();
    let metrics = &inputs.metrics;
    metrics.requests.get_or_create(labels).inc();
    metrics
        .request_duration
        .get_or_create(labels)
        .observe(elapsed.as_secs_f64() * 1000.0);
    metrics
        .request_bytes
        .get_or_create(labels)
        .observe(request_bytes as f64);
    let response_bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    metrics
        .response_bytes
        .get_or_create(labels)
        .observe(response_bytes as f64);
    info!(
        target: "meshd::access",
        request = %line,
        status = labels.response_code,
        flags = labels.connection.response_flags,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        route,
        upstream = %upstream.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        source = %labels.connection.source_workload,
        destination = %labels.connection.destination_service,
        "request"
    );
    response
}

/// How long `auto` waits for a client's first bytes before treating the
/// connection as plain TCP (a server-speaks-first protocol).
pub const SNIFF_WAIT: Duration = Duration::from_millis(200);

/// Classifies a client's first bytes: HTTP/2 preface, an HTTP/1 request
/// line, or anything else.
pub fn sniff(bytes: &[u8]) -> Protocol {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    if bytes.starts_with(PREFACE) {
        Protocol::Http2
    } else if METHODS.iter().any(|m| bytes.starts_with(m)) {
        Protocol::Http
    } else {
        Protocol::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_http_versions_and_falls_back_to_tcp() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Protocol::Http2);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Protocol::Http);
        assert_eq!(sniff(b"POST /x HTTP/1.1\r\n"), Protocol::Http);
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00"), Protocol::Tcp);
        assert_eq!(sniff(b"GETX"), Protocol::Tcp);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_survives() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(headers[header::TE], "trailers");

        let mut upgrade = HeaderMap::new();
        upgrade.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[header::UPGRADE], "websocket");
        assert_eq!(upgrade[header::CONNECTION], "upgrade");
    }
}
