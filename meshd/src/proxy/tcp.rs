//! Captured TCP connections: an endpoint chosen per connection (round robin
//! over those in rotation), the service's connection limit held for the
//! connection's life, the destination's policy on the same node, then the
//! bytes relayed — directly, or through the tunnel to the endpoint's node.
//! A `ConnectionResult` counts the connection whichever way it ends.

use std::sync::Arc;

use crate::net::accept::Accepted;
use tracing::{debug, warn};

use super::{outbound::reset, ProxyInputs};
use crate::{
    config::Workload,
    hbone::{pool::Key, Baggage},
    net::{
        clock,
        relay::{relay, Resettable},
    },
    state::{
        ids::OrigDstAddr,
        snapshot::{Path, Snapshot, Target, Unresolved},
    },
    telemetry::{
        access, labels, metrics::UnresolvedReason, result::Reports, ConnectionResult, ResponseFlag,
    },
};

/// Relays one captured connection to `dst` from `source`.
pub async fn serve(
    inputs: &ProxyInputs,
    snapshot: Arc<Snapshot>,
    client: Accepted,
    peer: std::net::SocketAddrV4,
    dst: OrigDstAddr,
    source: Option<Workload>,
) {
    let target = match snapshot.resolve(dst, clock::now_nanos()) {
        Ok(target) => target,
        Err(reason) => {
            let reason = match reason {
                Unresolved::UnknownDestination => UnresolvedReason::unknown_destination,
                Unresolved::NoEndpoints => UnresolvedReason::no_endpoints,
                Unresolved::UnknownNode => UnresolvedReason::unknown_node,
            };
            inputs.metrics.unresolved(reason);
            warn!(dst = %dst.0, ?reason, "cannot resolve destination; closing");
            return reset(client);
        }
    };
    let source = source.as_ref();
    let cluster = &snapshot.config.cluster;
    let mut reports = Reports::one(labels::source(
        cluster,
        source,
        target.service,
        Some((target.endpoint, Some(target.path))),
        "tcp",
    ));
    if target.path == Path::Local {
        // This node is the destination too: it reports both sides.
        reports.destination = snapshot
            .local_workload(target.endpoint.address)
            .map(|workload| {
                Box::new(labels::destination(
                    cluster,
                    labels::Peer::local(source),
                    workload,
                    Some(target.service),
                    labels::Security::None,
                    "tcp",
                ))
            });
    }
    let mut result = ConnectionResult::new(&inputs.metrics, reports);
    if let Some(log) = inputs.access_log_for(Some(target.service)) {
        let downstream = access::Downstream {
            remote: Some(peer.into()),
            local: Some(dst.0.into()),
        };
        result.log_access(log, downstream, Some(target.upstream));
    }
    debug!(dst = %dst.0, upstream = %target.upstream, path = ?target.path, "relaying");
    // The service's connection limit holds for the connection's life.
    let Some(_slot) = snapshot.connection_limit(target.service_index).try_open() else {
        warn!(dst = %dst.0, "circuit breaker: the service's connection limit is reached; refusing");
        inputs
            .metrics
            .breaker_tripped(&target.service.hostname, "connections");
        result.end(ResponseFlag::UpstreamOverflow);
        return reset(client);
    };
    let _ = client.get_ref().set_nodelay(true);
    match target.path {
        Path::Local => local(inputs, &snapshot, client, source, target, result).await,
        Path::Tunnel { node } => {
            let key = source.map(|source| {
                let key = Key {
                    source: source.identity.clone(),
                    node,
                    destination: target.endpoint.identity.clone(),
                };
                let baggage = Baggage::of(source, target.service);
                (key, baggage.encode())
            });
            let (upstream, service) = (target.upstream, target.service.hostname.clone());
            // The snapshot is not needed past this point; let a reload free it.
            drop(snapshot);
            let (Some((key, baggage)), Some(pool)) = (key, inputs.pool.as_ref()) else {
                warn!(%upstream, "no identity to tunnel with (unknown source workload, or no node.identity configured)");
                inputs.metrics.upstream_connect_failed(&service);
                result.end(ResponseFlag::UpstreamConnectFailure);
                return reset(client);
            };
            match pool.open(&key, upstream, &baggage).await {
                Ok(mut stream) => relayed(inputs, result, client, &mut stream).await,
                Err(err) => {
                    warn!(%upstream, error = %err, "tunnel failed");
                    inputs.metrics.upstream_connect_failed(&service);
                    result.end(ResponseFlag::UpstreamConnectFailure);
                    reset(client)
                }
            }
        }
    }
}

/// Same node: no tunnel, but the destination's policy still applies.
async fn local(
    inputs: &ProxyInputs,
    snapshot: &Snapshot,
    client: Accepted,
    source: Option<&Workload>,
    target: Target<'_>,
    result: ConnectionResult,
) {
    let upstream = target.upstream;
    if !super::authorized_locally(inputs, snapshot, source, upstream, target.endpoint, None) {
        result.end(ResponseFlag::Rbac);
        return reset(client);
    }
    let service = target.service.hostname.clone();
    let timeout = inputs.connect_timeout;
    match tokio::time::timeout(timeout, super::connect(&*inputs.orig_dst, upstream)).await {
        Ok(Ok(mut stream)) => {
            let _ = stream.set_nodelay(true);
            relayed(inputs, result, client, &mut stream).await;
        }
        failed => {
            match failed {
                Ok(Err(err)) => warn!(%upstream, error = %err, "connecting to the endpoint failed"),
                _ => warn!(%upstream, ?timeout, "connecting to the endpoint timed out"),
            }
            inputs.metrics.upstream_connect_failed(&service);
            result.end(ResponseFlag::UpstreamConnectFailure);
            reset(client);
        }
    }
}

/// Relays until both sides are done, counted open until then.
async fn relayed<U>(
    inputs: &ProxyInputs,
    mut result: ConnectionResult,
    mut client: Accepted,
    upstream: &mut U,
) where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Resettable,
{
    let bytes = result.open();
    match relay(
        &mut client,
        upstream,
        inputs.buffer_size,
        &bytes.received,
        &bytes.sent,
    )
    .await
    {
        Ok(()) => debug!("closed"),
        Err(err) => debug!(error = %err, "closed with an error"),
    }
}
