//! L7: captured connections to `http`, `http2` and `grpc` ports (and `auto`
//! ports that sniff as HTTP) are served by hyper; each request is routed,
//! balanced over endpoints, given its timeout, forwarded over a reused
//! upstream connection (through a tunnel for other nodes), measured with
//! Istio's request metrics and written to the access log.

pub mod replay;
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

use self::{
    replay::Payload,
    upstream::{Body, UpstreamError, UpstreamKey, Via},
};
use super::ProxyInputs;
use crate::{
    config::{Protocol, Workload},
    mesh::{Mesh, Path},
    metrics::{HttpLabels, ServiceLabels, TcpLabels},
    retry::Outcome,
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

pub fn reply(status: StatusCode, flags: &'static str) -> Response<Body> {
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
    let http2 = match target.port.protocol {
        Protocol::Http => false,
        Protocol::Http2 | Protocol::Grpc => true,
        _ => connection.protocol == Protocol::Http2,
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
    let (parts, body) = request.into_parts();
    let Some(head) = Head::outgoing(&parts, http2) else {
        return refuse(StatusCode::BAD_REQUEST, "DPE", &route.name, None, None);
    };
    let l7 = crate::policy::Http {
        method: &parts.method,
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    let policy = route.retries.as_ref().unwrap_or(&service.retries);
    let method_allowed = policy.method_allowed(&parts.method);
    // A copy of the body is kept only when a failure after sending could
    // be retried; connect failures never need one.
    let keeps_copy = policy.max_retries > 0
        && method_allowed
        && upgrade.is_none()
        && (!policy.statuses.is_empty()
            || policy
                .conditions
                .iter()
                .any(|c| *c != crate::retry::Condition::ConnectFailure));
    let mut payload = Payload::new(body, keeps_copy.then_some(policy.buffer_limit));
    let budget = mesh.retry_budget(target.service);
    budget.deposit(started.duration_since(*clock_origin()));
    let deadline = route.timeout.or(service.timeout).map(|t| started + t);
    let mut tried: Vec<usize> = Vec::new();
    let mut retries = 0;
    let (result, mut labels, address) = loop {
        let endpoint = match target.pinned {
            Some(endpoint) => Some(endpoint),
            None => mesh.pick_endpoint(
                target.service,
                route.backend(random()),
                [random(), random()],
                now_nanos(),
                &tried,
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
        tried.push(endpoint_index);
        let endpoint = &service.endpoints[endpoint_index];
        let address = SocketAddrV4::new(endpoint.address, target.port.target_port);
        let Ok(path) = mesh.path(endpoint) else {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                &route.name,
                Some(endpoint_index),
                None,
            );
        };
        let mut labels = http_labels(
            &mesh,
            source,
            target.service,
            Some(endpoint_index),
            Some(path),
            grpc,
        );
        if path == Path::Local
            && !super::authorized_locally(inputs, &mesh, source, address, endpoint, Some(l7))
        {
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
        let key = UpstreamKey {
            service: target.service,
            address,
            via,
            http2,
        };
        let stats = mesh.endpoint_stats(target.service, endpoint_index);
        let in_flight = InFlight::start(stats);
        let try_started = Instant::now();
        let attempt = async {
            let sender = inputs
                .upstreams
                .checkout(
                    &key,
                    inputs.pool.as_ref(),
                    &baggage,
                    inputs.connect_timeout,
                    mesh.connection_limit(target.service),
                )
                .await?;
            let body = payload.for_next_try().unwrap_or_else(|| {
                // Unreachable: a try only starts with a body to send.
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed()
            });
            sender.send(head.request(body)).await
        };
        let limit = [
            policy.per_try_timeout,
            deadline.map(|d| d.saturating_duration_since(try_started)),
        ]
        .into_iter()
        .flatten()
        .min();
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, attempt).await.ok(),
            None => Some(attempt.await),
        };
        drop(in_flight);
        if let Some(Err(UpstreamError::Overflow(overflow))) = &result {
            let limit = match overflow {
                crate::breaker::Overflow::Pending => "pending",
                crate::breaker::Overflow::Connections => "connections",
            };
            breaker_tripped(inputs, &service.hostname, limit);
            return record(
                inputs,
                &mut labels,
                reply(StatusCode::SERVICE_UNAVAILABLE, "UO"),
                0,
                started,
                &route.name,
                &line,
                Some(address),
            );
        }
        let outcome = match &result {
            None => Outcome::Timeout,
            Some(Ok(response)) => Outcome::Response(response.status()),
            Some(Err(err)) if err.before_sending() => Outcome::ConnectFailure,
            Some(Err(_)) => Outcome::Reset,
        };
        // Only answers teach the balancer latency: an endpoint that fails
        // fast must not look fast.
        if let Some(Ok(_)) = &result {
            stats.observe(try_started.elapsed().as_nanos() as u64, now_nanos());
        }
        let failed = match outcome {
            Outcome::Response(status) => status.is_server_error(),
            _ => true,
        };
        if let Some(length) =
            mesh.record_result(target.service, endpoint_index, failed, now_nanos())
        {
            warn!(service = %service.hostname, endpoint = %address, seconds = length.as_secs(), "endpoint ejected after failing in a row");
            inputs
                .metrics
                .outlier_ejections
                .get_or_create(&ServiceLabels {
                    destination_service: service.hostname.clone(),
                })
                .inc();
        }
        let headers = match &result {
            Some(Ok(response)) => Some(response.headers()),
            _ => None,
        };
        let reason = policy.retriable(outcome, headers, method_allowed);
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        let Some(reason) =
            reason.filter(|_| retries < policy.max_retries && !out_of_time && payload.replayable())
        else {
            break (result, labels, address);
        };
        if !budget.withdraw(policy, started.duration_since(*clock_origin())) {
            inputs
                .metrics
                .retry_budget_exhausted
                .get_or_create(&ServiceLabels {
                    destination_service: service.hostname.clone(),
                })
                .inc();
            break (result, labels, address);
        }
        retries += 1;
        inputs
            .metrics
            .retries
            .get_or_create(&crate::metrics::RetryLabels {
                destination_service: service.hostname.clone(),
                reason,
            })
            .inc();
        debug!(upstream = %address, reason, retry = retries, "retrying");
        let mut wait = policy.backoff(retries, random());
        if let Some(deadline) = deadline {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        tokio::time::sleep(wait).await;
        labels.response_code = 0;
    };
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
    splice_upgrade(downstream, Response::from_parts(parts.clone(), body));
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

/// Joins a client's connection to an upstream's once both have switched
/// protocols (a 101 answer), and relays between them.
pub fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, upstream: Response<Incoming>) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, hyper::upgrade::on(upstream)) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
            Err(err) => debug!(error = %err, "upgrade failed"),
        }
    });
}

/// A request as the upstream must see it, minus its body: hop-by-hop
/// headers gone, the URI in the form the upstream's HTTP version wants.
/// Built once; each try sends a copy.
struct Head {
    method: hyper::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn outgoing(parts: &hyper::http::request::Parts, http2: bool) -> Option<Self> {
        let mut headers = parts.headers.clone();
        let upgrading = headers.contains_key(header::UPGRADE) && !http2;
        strip_hop_by_hop(&mut headers, upgrading);
        let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })?;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let (version, uri) = if http2 {
            headers.remove(header::HOST);
            let uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build()
                .ok()?;
            (Version::HTTP_2, uri)
        } else {
            if !headers.contains_key(header::HOST) {
                headers.insert(header::HOST, HeaderValue::from_str(&authority).ok()?);
            }
            let uri = Uri::builder().path_and_query(path).build().ok()?;
            (Version::HTTP_11, uri)
        };
        Some(Self {
            method: parts.method.clone(),
            uri,
            version,
            headers,
        })
    }

    fn request(&self, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
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

pub fn now_nanos() -> u64 {
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
            b"URX" => "URX",
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
