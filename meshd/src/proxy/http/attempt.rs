//! The attempt stage: one try of a request — an endpoint chosen (another
//! than those tried, when there is one), the destination's policy on the
//! same node, an upstream connection (through the tunnel across nodes), the
//! request sent under the per-try and request timeouts — and what the try
//! teaches: latency for the balancer, success or failure for outlier
//! detection.

use std::net::SocketAddrV4;

use hyper::Response;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{
    admit::Admitted,
    replay::Payload,
    respond::Refusal,
    retry::{Attempt, Try},
    upstream::{Answer, UpstreamError, UpstreamKey, Via},
    Connection,
};
use crate::{
    hbone::{pool::Key as TunnelKey, Baggage},
    net::clock,
    policy::{authz, balance::EndpointStats, retry::Outcome},
    proxy::ProxyInputs,
    state::snapshot::{Path, Snapshot},
};

/// The endpoint a try went to.
#[derive(Clone, Copy)]
struct Chosen {
    endpoint: usize,
    path: Option<Path>,
    address: SocketAddrV4,
}

/// The tries of one request.
pub struct HttpAttempt<'a> {
    inputs: &'a ProxyInputs,
    snapshot: &'a Snapshot,
    connection: &'a Connection,
    admitted: &'a Admitted<'a>,
    /// What L7 policy looks at.
    request: authz::Http<'a>,
    payload: Payload<super::ClientBody>,
    tried: Vec<usize>,
    /// Only a tunnel stream carries baggage: made once, when first needed.
    baggage: Option<String>,
    last: Option<Chosen>,
    /// Whether the last try reached its endpoint's side on this node (it
    /// was sent, or the destination's own policy refused it): only then
    /// does this node report it as the destination too.
    reached_locally: bool,
    /// The destination's server span a try to this node's workload is the
    /// child of (its `traceparent`), when tracing.
    local_span: Option<crate::telemetry::trace::SpanContext>,
}

impl<'a> HttpAttempt<'a> {
    pub fn new(
        inputs: &'a ProxyInputs,
        snapshot: &'a Snapshot,
        connection: &'a Connection,
        admitted: &'a Admitted<'a>,
        request: authz::Http<'a>,
        payload: Payload<super::ClientBody>,
    ) -> Self {
        Self {
            inputs,
            snapshot,
            connection,
            admitted,
            request,
            payload,
            tried: Vec::new(),
            baggage: None,
            last: None,
            reached_locally: false,
            local_span: None,
        }
    }

    /// Tries to this node's workloads carry `span` as their `traceparent`.
    pub fn trace_locally(&mut self, span: crate::telemetry::trace::SpanContext) {
        self.local_span = Some(span);
    }

    /// How many tries were made.
    pub fn tries(&self) -> u32 {
        self.tried.len().max(1) as u32
    }

    /// The endpoint the last try went to, how, and its address.
    pub fn last_endpoint(
        &self,
    ) -> Option<(&'a crate::config::Endpoint, Option<Path>, SocketAddrV4)> {
        let chosen = self.last?;
        let endpoint = &self.admitted.service.endpoints[chosen.endpoint];
        Some((endpoint, chosen.path, chosen.address))
    }

    /// Whether the last try reached a workload of this node (see
    /// `reached_locally`).
    pub fn reached_locally(&self) -> bool {
        self.reached_locally
    }

    /// The endpoint for the next try: the pinned one, else one balanced
    /// over the route's backend, avoiding those tried.
    fn pick(&mut self) -> Result<usize, Refusal> {
        let target = self.admitted.target;
        let endpoint = match target.pinned {
            Some(endpoint) => Some(endpoint),
            None => {
                let backend = self.admitted.route.backend(fastrand::u64(..));
                self.snapshot.pick_endpoint(
                    target.service,
                    |e| backend.admits(&e.labels),
                    self.admitted.service.load_balancer,
                    [fastrand::u64(..), fastrand::u64(..)],
                    clock::now_nanos(),
                    &self.tried,
                )
            }
        };
        let endpoint = endpoint.ok_or(Refusal::NO_ENDPOINT)?;
        self.tried.push(endpoint);
        Ok(endpoint)
    }

    /// How the chosen endpoint is reached, after the destination's policy
    /// when it is on this node.
    fn route_to(&mut self, chosen: Chosen) -> Result<Via, Refusal> {
        let endpoint = &self.admitted.service.endpoints[chosen.endpoint];
        let source = self.connection.source.as_ref();
        match chosen.path.ok_or(Refusal::UNKNOWN_NODE)? {
            Path::Local => {
                let allowed = super::super::authorized_locally(
                    self.inputs,
                    self.snapshot,
                    source,
                    chosen.address,
                    endpoint,
                    Some(self.request),
                );
                if allowed {
                    Ok(Via::Direct)
                } else {
                    Err(Refusal::DENIED)
                }
            }
            Path::Tunnel { node } => {
                let Some(source) = source else {
                    warn!(upstream = %chosen.address, "no identity to tunnel with: the source workload is unknown");
                    return Err(Refusal::NO_TUNNEL);
                };
                let service = self.admitted.service;
                self.baggage
                    .get_or_insert_with(|| Baggage::of(source, service).encode());
                Ok(Via::Tunnel(TunnelKey {
                    source: source.identity.clone(),
                    node,
                    destination: endpoint.identity.clone(),
                }))
            }
        }
    }

    /// Sends the request to `key` under the try's time limits. `None`: it
    /// timed out.
    async fn send(&mut self, key: &UpstreamKey) -> Option<Result<Response<Answer>, UpstreamError>> {
        let inputs = self.inputs;
        let limit = self.snapshot.connection_limit(self.admitted.target.service);
        let baggage = self.baggage.as_deref().unwrap_or("");
        let payload = &mut self.payload;
        let head = &self.admitted.head;
        // Formatted only for a try that goes to this node's workload.
        let traceparent = self
            .local_span
            .filter(|_| key.via == Via::Direct)
            .map(|span| crate::telemetry::trace::format_traceparent(&span));
        let send = async {
            let sender = inputs
                .upstreams
                .checkout(
                    key,
                    inputs.pool.as_ref(),
                    &*inputs.orig_dst,
                    baggage,
                    inputs.connect_timeout,
                    limit,
                )
                .await?;
            let body = payload.for_next_try().unwrap_or_else(empty_body);
            let mut request = head.request(body);
            if let Some(traceparent) = traceparent {
                request
                    .headers_mut()
                    .insert(crate::telemetry::trace::TRACEPARENT, traceparent);
            }
            sender.send(request).await
        };
        let now = Instant::now();
        let limit = [
            self.admitted.retries.per_try_timeout,
            self.admitted
                .deadline
                .map(|d| d.saturating_duration_since(now)),
        ]
        .into_iter()
        .flatten()
        .min();
        match limit {
            Some(limit) => tokio::time::timeout(limit, send).await.ok(),
            None => Some(send.await),
        }
    }

    /// Feeds the try's end to the balancer and outlier detection.
    fn learn(
        &self,
        chosen: Chosen,
        tried: &Try<Response<Answer>, UpstreamError, Refusal>,
        took: std::time::Duration,
    ) {
        let service = self.admitted.target.service;
        let runtime = self.snapshot.endpoint_runtime(service, chosen.endpoint);
        // Only answers teach the balancer latency: an endpoint that fails
        // fast must not look fast.
        let failed = match tried {
            Try::Answered(response) => {
                runtime
                    .stats
                    .observe(took.as_nanos() as u64, clock::now_nanos());
                response.status().is_server_error()
            }
            // A try that ended while the client was still sending its body
            // may be the client's doing (a slow upload outlasting the
            // timeout, a client gone): it counts neither way.
            _ if !self.payload.received() => return,
            _ => true,
        };
        let hostname = &self.admitted.service.hostname;
        if let Some(length) =
            self.snapshot
                .record_result(service, chosen.endpoint, failed, clock::now_nanos())
        {
            warn!(service = %hostname, endpoint = %chosen.address, seconds = length.as_secs(), "endpoint ejected after failing in a row");
            self.inputs.metrics.ejected(hostname);
        }
    }
}

impl Attempt for HttpAttempt<'_> {
    type Response = Response<Answer>;
    type Error = UpstreamError;
    type Refusal = Refusal;

    async fn attempt(&mut self) -> Try<Response<Answer>, UpstreamError, Refusal> {
        let endpoint = match self.pick() {
            Ok(endpoint) => endpoint,
            Err(refusal) => return Try::Refused(refusal),
        };
        let service = self.admitted.service;
        let address = SocketAddrV4::new(
            service.endpoints[endpoint].address,
            self.admitted.target.port.target_port,
        );
        let chosen = Chosen {
            endpoint,
            path: self.snapshot.path(&service.endpoints[endpoint]).ok(),
            address,
        };
        self.last = Some(chosen);
        let local = chosen.path == Some(Path::Local);
        let via = match self.route_to(chosen) {
            Ok(via) => via,
            Err(refusal) => {
                self.reached_locally = local && refusal == Refusal::DENIED;
                return Try::Refused(refusal);
            }
        };
        self.reached_locally = local;
        let key = UpstreamKey {
            service: self
                .snapshot
                .service_id(self.admitted.target.service)
                .clone(),
            address,
            via,
            http2: self.admitted.http2(),
        };
        let stats = &self
            .snapshot
            .endpoint_runtime(self.admitted.target.service, endpoint)
            .stats;
        let in_flight = InFlight::start(stats);
        let started = Instant::now();
        let sent = self.send(&key).await;
        drop(in_flight);
        let tried = match sent {
            None => Try::Failed(Outcome::Timeout, None),
            Some(Ok(response)) => Try::Answered(response),
            Some(Err(UpstreamError::Overflow(overflow))) => {
                let limit = match overflow {
                    crate::policy::breaker::Overflow::Pending => "pending",
                    crate::policy::breaker::Overflow::Connections => "connections",
                };
                self.inputs
                    .metrics
                    .breaker_tripped(&service.hostname, limit);
                // The source's own limit: the destination never saw it.
                self.reached_locally = false;
                return Try::Refused(Refusal::OVERFLOW);
            }
            // The destination's meshd refused the stream by its policy:
            // its answer, not this endpoint failing, and any other try
            // would be refused alike.
            Some(Err(UpstreamError::Tunnel(crate::hbone::pool::TunnelError::Refused {
                status: hyper::StatusCode::FORBIDDEN,
                ..
            }))) => return Try::Refused(Refusal::DENIED_THERE),
            Some(Err(err)) if err.before_sending() => {
                Try::Failed(Outcome::ConnectFailure, Some(err))
            }
            Some(Err(err)) => Try::Failed(Outcome::Reset, Some(err)),
        };
        self.learn(chosen, &tried, started.elapsed());
        tried
    }

    fn replayable(&self) -> bool {
        self.payload.replayable()
    }

    fn retrying(&mut self, reason: &'static str, retry: u32) {
        let upstream = self.last.map(|c| c.address);
        debug!(?upstream, reason, retry, "retrying");
        self.inputs
            .metrics
            .retried(&self.admitted.service.hostname, reason);
    }

    fn budget_exhausted(&mut self) {
        self.inputs
            .metrics
            .retry_budget_exhausted(&self.admitted.service.hostname);
    }
}

fn empty_body() -> super::upstream::Body {
    use http_body_util::BodyExt as _;
    // A try only starts with a body to send; this is never sent.
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Counts a request as outstanding on an endpoint until dropped, so a
/// client that goes away mid-request does not leave it counted for ever.
struct InFlight<'a>(&'a EndpointStats);

impl<'a> InFlight<'a> {
    fn start(stats: &'a EndpointStats) -> Self {
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
