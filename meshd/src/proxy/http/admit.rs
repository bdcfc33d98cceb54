//! The admit stage: what a request must pass before any try — a route, the
//! service's rate limits, a place under its request limit, and a head the
//! upstream can take. Authorization is decided per endpoint, in `attempt`,
//! because the destination's policy is that endpoint's.

use hyper::http::request::Parts;
use tokio::time::Instant;

use super::{message::Head, respond::Refusal, Connection};
use crate::{
    config::{Protocol, Service},
    policy::{path, retry, routing},
    state::{
        runtime::Permit,
        snapshot::{HttpTarget, Snapshot},
    },
    telemetry::{labels::UNKNOWN, metrics::Metrics},
};

/// A request let in: where it goes and under which policy.
pub struct Admitted<'a> {
    pub target: HttpTarget,
    pub service: &'a Service,
    /// The request's path, normalized (see `policy::path`): what routes
    /// and policies matched, and what the upstream gets.
    pub path: String,
    pub route: &'a routing::Route,
    /// The route's retry policy, else the service's.
    pub retries: &'a retry::Policy,
    /// When the whole request times out (the route's timeout, else the
    /// service's).
    pub deadline: Option<Instant>,
    /// The request as the upstream gets it, minus its body.
    pub head: Head,
    /// Holds the request's place under `maxRequests`.
    _permit: Permit<'a>,
}

/// Admits the request with `parts` to `target`, or says why not (counted).
pub fn admit<'a>(
    snapshot: &'a Snapshot,
    metrics: &Metrics,
    connection: &Connection,
    target: HttpTarget,
    parts: &Parts,
    started: Instant,
) -> Result<Admitted<'a>, Refusal> {
    let service = &snapshot.config.services[target.service];
    // What routes and policies match is what the backend will get.
    if path::miscased_method(parts.method.as_str()) {
        return Err(Refusal::BAD_REQUEST);
    }
    let normalization = snapshot.config.mesh.path_normalization;
    let path =
        path::normalize(parts.uri.path(), normalization).map_err(|_| Refusal::BAD_REQUEST)?;
    let route = routing::select(&service.routes, &parts.method, &path, &parts.headers)
        .ok_or(Refusal::NO_ROUTE)?;
    let source = connection.source.as_ref().map_or(UNKNOWN, |w| &*w.name);
    if let Err(limit) = snapshot.admit(target.service, source, crate::net::clock::since_origin()) {
        metrics.rate_limited(&service.hostname, limit);
        return Err(Refusal::RATE_LIMITED);
    }
    let Some(permit) = snapshot.request_permit(target.service) else {
        metrics.breaker_tripped(&service.hostname, "requests");
        return Err(Refusal::OVERFLOW);
    };
    let http2 = match target.port.protocol {
        Protocol::Http => false,
        Protocol::Http2 | Protocol::Grpc => true,
        _ => connection.protocol == Protocol::Http2,
    };
    let head = Head::outgoing(parts, &path, http2).ok_or(Refusal::BAD_REQUEST)?;
    Ok(Admitted {
        target,
        service,
        path,
        route,
        retries: route.retries.as_ref().unwrap_or(&service.retries),
        deadline: route.timeout.or(service.timeout).map(|t| started + t),
        head,
        _permit: permit,
    })
}

impl Admitted<'_> {
    /// Whether the upstream speaks HTTP/2.
    pub fn http2(&self) -> bool {
        self.head.http2()
    }

    /// Whether a copy of the body must be kept: a failure after sending
    /// could be retried (connect failures never need one: nothing was sent).
    pub fn keeps_body(&self, method_allowed: bool, upgrading: bool) -> bool {
        let policy = self.retries;
        policy.max_retries > 0
            && method_allowed
            && !upgrading
            && (!policy.statuses.is_empty()
                || policy
                    .conditions
                    .iter()
                    .any(|c| *c != retry::Condition::ConnectFailure))
    }
}
