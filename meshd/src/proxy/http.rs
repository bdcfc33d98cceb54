//! L7: captured connections to `http`, `http2` and `grpc` ports (and `auto`
//! ports that sniff as HTTP) are served by hyper; each request is routed,
//! balanced over endpoints, given its timeout, forwarded over a reused
//! upstream connection (through a tunnel for other nodes), measured with
//! Istio's request metrics and written to the access log.

mod message;
pub mod replay;
mod telemetry;
pub mod upstream;

pub use self::message::{reply, sniff, splice_upgrade, SNIFF_WAIT};
pub use self::telemetry::breaker_tripped;
use self::{
    message::{is_grpc, strip_hop_by_hop, Head},
    telemetry::{http_labels, record, RequestLine},
};

use std::{convert::Infallible, net::SocketAddrV4, sync::Arc, time::Instant};

use http_body_util::BodyExt as _;
use hyper::{body::Incoming, header, service::service_fn, Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use self::{
    replay::Payload,
    upstream::{Body, UpstreamError, UpstreamKey, Via},
};
use super::ProxyInputs;
use crate::{
    config::{Protocol, Workload},
    hbone::{pool::Key as TunnelKey, Baggage},
    net::clock,
    policy::retry::Outcome,
    policy::routing,
    state::ids::OrigDstAddr,
    state::snapshot::Path,
    telemetry::metrics::{HttpLabels, ServiceLabels},
};

pub(super) const UNKNOWN: &str = "unknown";

/// What every request of one captured connection shares.
pub struct Connection {
    pub dst: OrigDstAddr,
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
        _ = crate::net::accept::stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = served {
        debug!(error = %err, "HTTP connection ended with an error");
    }
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
    let mesh = inputs.snapshot.load_full();
    let Some(target) = mesh.http_target(connection.dst) else {
        // The service went away with a reload while this connection lived.
        inputs
            .metrics
            .unresolved
            .get_or_create(&crate::telemetry::metrics::ReasonLabels {
                reason: crate::telemetry::metrics::UnresolvedReason::unknown_destination,
            })
            .inc();
        return reply(StatusCode::SERVICE_UNAVAILABLE, "NR");
    };
    let service = &mesh.config.services[target.service];
    let source = connection.source.as_ref();
    let grpc = is_grpc(request.headers());
    let line = RequestLine::of(&request);
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
    if let Err(limit) = mesh.admit(target.service, source_name, clock::at(started)) {
        let limit = match limit {
            crate::policy::ratelimit::Refused::Service => "service",
            crate::policy::ratelimit::Refused::Source => "source",
        };
        inputs
            .metrics
            .rate_limited
            .get_or_create(&crate::telemetry::metrics::RateLimitLabels {
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
    // Only a tunnel stream carries baggage: made once, when first needed.
    let mut baggage: Option<String> = None;
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
    let l7 = crate::policy::authz::Http {
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
                .any(|c| *c != crate::policy::retry::Condition::ConnectFailure));
    let mut payload = Payload::new(body, keeps_copy.then_some(policy.buffer_limit));
    let budget = mesh.retry_budget(target.service);
    budget.deposit(clock::at(started));
    let deadline = route.timeout.or(service.timeout).map(|t| started + t);
    let mut tried: Vec<usize> = Vec::new();
    let mut retries = 0;
    let (result, mut labels, address) = loop {
        let endpoint = match target.pinned {
            Some(endpoint) => Some(endpoint),
            None => {
                let backend = route.backend(random());
                mesh.pick_endpoint(
                    target.service,
                    |e| backend.admits(&e.labels),
                    service.load_balancer,
                    [random(), random()],
                    clock::now_nanos(),
                    &tried,
                )
            }
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
            return refuse(
                StatusCode::FORBIDDEN,
                "RBAC",
                &route.name,
                Some(endpoint_index),
                Some(path),
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
        let baggage: &str = match (&via, source) {
            (Via::Tunnel(_), Some(w)) => baggage.get_or_insert_with(|| {
                Baggage {
                    workload: Some(w.name.clone()),
                    app: Some(w.app.clone()),
                    version: Some(w.version.clone()),
                    service: Some((service.namespace.clone(), service.name.clone())),
                }
                .encode()
            }),
            _ => "",
        };
        let key = UpstreamKey {
            service: mesh.service_id(target.service).clone(),
            address,
            via,
            http2,
        };
        let stats = &mesh.endpoint_runtime(target.service, endpoint_index).stats;
        let in_flight = InFlight::start(stats);
        let try_started = Instant::now();
        let attempt = async {
            let sender = inputs
                .upstreams
                .checkout(
                    &key,
                    inputs.pool.as_ref(),
                    baggage,
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
                crate::policy::breaker::Overflow::Pending => "pending",
                crate::policy::breaker::Overflow::Connections => "connections",
            };
            breaker_tripped(inputs, &service.hostname, limit);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "UO",
                &route.name,
                Some(endpoint_index),
                Some(path),
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
            stats.observe(try_started.elapsed().as_nanos() as u64, clock::now_nanos());
        }
        let failed = match outcome {
            Outcome::Response(status) => status.is_server_error(),
            _ => true,
        };
        if let Some(length) =
            mesh.record_result(target.service, endpoint_index, failed, clock::now_nanos())
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
        if !budget.withdraw(policy, clock::at(started)) {
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
            .get_or_create(&crate::telemetry::metrics::RetryLabels {
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
    line: &RequestLine,
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

/// Counts a request as outstanding on an endpoint until dropped, so a
/// client that goes away mid-request does not leave it counted for ever.
struct InFlight<'a>(&'a crate::policy::balance::EndpointStats);

impl<'a> InFlight<'a> {
    fn start(stats: &'a crate::policy::balance::EndpointStats) -> Self {
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
