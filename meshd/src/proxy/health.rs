//! Active health checks, made. Each meshd checks the endpoints on its own node,
//! which it reaches directly: an HTTP GET answered 2xx, or a TCP connection
//! accepted, passes. An endpoint that fails `unhealthyThreshold` checks in a
//! row leaves the rotation of this node's requests, and this node refuses
//! tunnel streams to it (other nodes then see a connect failure, retry
//! elsewhere and count it towards ejection); `healthyThreshold` passes in a
//! row bring it back.

use std::{
    net::SocketAddrV4,
    sync::{Arc, Weak},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{client::conn::http1, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::{
    config::HealthProtocol,
    policy::health::{Check, Tally},
    state::snapshot::{Path, Snapshot},
    telemetry::metrics::{HealthLabels, Metrics},
};

/// Whether one check of `address` passes.
async fn probe(check: &Check, address: SocketAddrV4) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if check.protocol == HealthProtocol::Tcp {
            return Ok(());
        }
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(connection);
        let request = Request::get(check.path.as_str())
            .header(hyper::header::HOST, address.to_string())
            .header(hyper::header::USER_AGENT, "meshd-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", check.timeout)))
}

/// Starts a checker for every checked endpoint on this node. Each stops by
/// itself once `mesh` is replaced or dropped.
pub fn spawn_checkers(mesh: &Arc<Snapshot>, metrics: &Arc<Metrics>) {
    for (s, service) in mesh.config.services.iter().enumerate() {
        let Some(check) = &service.health_check else {
            continue;
        };
        for (e, endpoint) in service.endpoints.iter().enumerate() {
            if mesh.path(endpoint) != Ok(Path::Local) {
                continue;
            }
            let address = SocketAddrV4::new(endpoint.address, check.port);
            tokio::spawn(run(
                Arc::downgrade(mesh),
                metrics.clone(),
                check.clone(),
                (s, e),
                address,
            ));
        }
    }
}

async fn run(
    mesh: Weak<Snapshot>,
    metrics: Arc<Metrics>,
    check: Check,
    (service, endpoint): (usize, usize),
    address: SocketAddrV4,
) {
    let mut tally = Tally::default();
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe(&check, address).await;
        let Some(mesh) = mesh.upgrade() else { return };
        let hostname = mesh.config.services[service].hostname.clone();
        metrics
            .health_checks
            .get_or_create(&HealthLabels {
                destination_service: hostname.clone(),
                result: if result.is_ok() { "pass" } else { "fail" },
            })
            .inc();
        let healthy = mesh.endpoint_healthy(service, endpoint);
        match (tally.observe(&check, result.is_ok(), healthy), result) {
            (Some(true), _) => {
                info!(service = %hostname, endpoint = %address, "endpoint healthy again: back in rotation");
                mesh.set_endpoint_health(service, endpoint, true);
            }
            (Some(false), Err(reason)) => {
                warn!(service = %hostname, endpoint = %address, %reason, "endpoint unhealthy: out of rotation");
                mesh.set_endpoint_health(service, endpoint, false);
            }
            _ => {}
        }
    }
}
