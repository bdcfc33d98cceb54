//! L7: captured connections to `http`, `http2` and `grpc` ports (and `auto`
//! ports that sniff as HTTP) are served by hyper. Each request goes through
//! small stages: `admit` (route, rate limit, request limit), tries made by
//! `attempt` (endpoint, policy, upstream, timeouts) and repeated by `retry`
//! (policy, budget, backoff), then `respond` (one place that turns a
//! refusal, a failure or an upstream's answer into what the client gets).
//! A `RequestResult` records Istio's request metrics and the access log.

mod admit;
mod attempt;
pub mod drain;
pub mod h1;
mod message;
pub mod replay;
pub mod respond;
pub mod retry;
pub mod upstream;

pub use self::message::{is_grpc, sniff, splice_upgrade, SNIFF_WAIT};

use std::{convert::Infallible, sync::Arc};

use hyper::{body::Incoming, header, service::service_fn, Request, Response};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::time::Instant;
use tracing::debug;

use self::{attempt::HttpAttempt, replay::Payload, respond::Refusal, retry::Retry, upstream::Body};
use super::ProxyInputs;
use crate::{
    config::{Protocol, Service, Workload},
    net::accept::Accepted,
    policy::authz,
    state::{
        ids::OrigDstAddr,
        snapshot::{Path, Snapshot},
    },
    telemetry::{
        access,
        body::Counted,
        labels,
        metrics::{SeriesCache, UnresolvedReason},
        result::{Reports, RequestLine, RequestResult},
        trace,
    },
};

/// A client's request body on its way: counted for the request's result.
pub type ClientBody = Counted<Incoming>;

/// What every request of one captured connection shares.
pub struct Connection {
    /// The pod's end of the connection.
    pub client: std::net::SocketAddrV4,
    pub dst: OrigDstAddr,
    pub source: Option<Workload>,
    /// The client's HTTP version decides the upstream's on `auto` ports.
    pub protocol: Protocol,
    /// The series its last request was recorded in.
    pub series: Arc<SeriesCache>,
}

/// Serves one captured connection as HTTP until the client closes it, or
/// meshd stops and it is drained (see `drain`).
pub async fn serve(inputs: Arc<ProxyInputs>, client: Accepted, connection: Connection) {
    let header_timeout = inputs.header_read_timeout;
    let activity = Arc::new(drain::Activity::new(inputs.stop.clone()));
    let connection = Arc::new(connection);
    let tracked = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let inputs = inputs.clone();
        let connection = connection.clone();
        let activity = tracked.clone();
        async move {
            let version = request.version();
            let answer = Box::pin(handle(&inputs, &connection, request));
            Ok::<_, Infallible>(activity.answer(version, answer).await)
        }
    });
    let builder = server(header_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    if let Err(err) = drain::serve(conn, &activity).await {
        debug!(error = %err, "HTTP connection ended with an error");
    }
}

/// The HTTP server for a pod's connection (or a tunnel stream served as
/// HTTP): either version, a client given `header_timeout` to send each
/// request's headers (hyper enforces it only with a timer).
pub(super) fn server(header_timeout: std::time::Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
}

/// One request through the stages: admit, then tries (attempt, retry),
/// then respond. Its result records it whichever way it ends.
async fn handle(
    inputs: &ProxyInputs,
    connection: &Connection,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let snapshot = inputs.snapshot.load_full();
    let Some(target) = snapshot.http_target(connection.dst) else {
        // The service went away with a reload while this connection lived.
        inputs
            .metrics
            .unresolved(UnresolvedReason::unknown_destination);
        let refusal = Refusal::UNKNOWN_SERVICE;
        return respond::reply(refusal.status, refusal.flag);
    };
    let service = &snapshot.config.services[target.service];
    let protocol = if is_grpc(request.headers()) {
        "grpc"
    } else {
        "http"
    };
    let mut result = start_result(
        inputs, &snapshot, connection, service, protocol, &request, started,
    );
    // Traced: meshd's client span joins the caller's trace (or starts one)
    // and is the upstream's parent; on this node, the destination's server
    // span sits between them.
    let traced = inputs.tracer.as_ref().map(|tracer| {
        let client =
            trace::Incoming::read(request.headers()).child(tracer.ratio(), || fastrand::u64(..));
        let server = client
            .as_incoming()
            .child(tracer.ratio(), || fastrand::u64(..));
        request.headers_mut().insert(
            trace::TRACEPARENT,
            trace::format_traceparent(&client.context),
        );
        (tracer, client, server)
    });
    let upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let admitted = match admit::admit(
        &snapshot,
        &inputs.metrics,
        connection,
        target,
        &parts,
        started,
    ) {
        Ok(admitted) => admitted,
        Err(refusal) => return respond::refuse(refusal, result),
    };
    result.set_route(&admitted.route.name);
    let body = result.count_request(body);
    let method_allowed = admitted.retries.method_allowed(&parts.method);
    let keeps = admitted.keeps_body(method_allowed, upgrade.is_some());
    let payload = Payload::new(body, keeps.then_some(admitted.retries.buffer_limit));
    let request = authz::Http {
        method: &parts.method,
        path: &admitted.path,
        headers: &parts.headers,
    };
    let mut attempt = HttpAttempt::new(inputs, &snapshot, connection, &admitted, request, payload);
    if let Some((_, _, server)) = &traced {
        attempt.trace_locally(server.context);
    }
    let retry = Retry {
        policy: admitted.retries,
        budget: snapshot.retry_budget(target.service),
        method_allowed,
        deadline: admitted.deadline,
    };
    let tried = retry.run(&mut attempt, || fastrand::u64(..)).await;
    result.set_tries(attempt.tries());
    let local = report_endpoint(
        &attempt,
        &snapshot,
        connection,
        service,
        protocol,
        &mut result,
    );
    if let Some((tracer, client, server)) = traced {
        result.set_trace(tracer, client, local.then_some(server));
    }
    respond::ended(tried, upgrade, result)
}

/// The request's result, with the source's label set and, when the
/// service logs, its access-log fields.
fn start_result(
    inputs: &ProxyInputs,
    snapshot: &Snapshot,
    connection: &Connection,
    service: &Service,
    protocol: &'static str,
    request: &Request<Incoming>,
    started: Instant,
) -> RequestResult {
    let source = connection.source.as_ref();
    let labels = labels::source(&snapshot.config.cluster, source, service, None, protocol);
    let line = RequestLine {
        method: request.method().clone(),
        uri: request.uri().clone(),
    };
    let mut result = RequestResult::new(
        &inputs.metrics,
        &connection.series,
        Reports::one(labels::http(labels)),
        line,
        started.into_std(),
    );
    if let Some(log) = inputs.access_log_for(Some(service)) {
        let downstream = access::Downstream {
            remote: Some(connection.client.into()),
            local: Some(connection.dst.0.into()),
        };
        result.log_access(log, request.version(), request.headers(), downstream);
    }
    result
}

/// Puts the endpoint the last try went to into the result; when that was
/// this node's workload, reached directly, meshd reports the request as
/// its destination too (and says so).
fn report_endpoint(
    attempt: &HttpAttempt<'_>,
    snapshot: &Snapshot,
    connection: &Connection,
    service: &Service,
    protocol: &'static str,
    result: &mut RequestResult,
) -> bool {
    let Some((endpoint, path, upstream)) = attempt.last_endpoint() else {
        return false;
    };
    result.set_endpoint(endpoint, path, upstream);
    let workload = (attempt.reached_locally() && path == Some(Path::Local))
        .then(|| snapshot.local_workload(endpoint.address))
        .flatten();
    let Some(workload) = workload else {
        return false;
    };
    result.set_destination(labels::destination(
        &snapshot.config.cluster,
        labels::Peer::local(connection.source.as_ref()),
        workload,
        Some(service),
        labels::Security::None,
        protocol,
    ));
    true
}
