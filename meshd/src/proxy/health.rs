//! Active health checks, made. Each meshd checks the endpoints on its own node,
//! which it reaches directly: an HTTP GET answered 2xx, or a TCP connection
//! accepted, passes. An endpoint that fails `unhealthyThreshold` checks in a
//! row leaves the rotation of this node's requests, and this node refuses
//! tunnel streams to it (other nodes then see a connect failure, retry
//! elsewhere and count it towards ejection); `healthyThreshold` passes in a
//! row bring it back.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{client::conn::http1, Request};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

use crate::{
    config::HealthProtocol,
    policy::health::{Check, Tally},
    state::{
        ids::{EndpointId, OrigDstSource, ServiceId},
        runtime::EndpointRuntime,
        snapshot::{Path, Snapshot},
    },
    telemetry::metrics::{HealthLabels, Metrics},
};

/// Whether one check of `address` passes.
async fn probe(
    check: &Check,
    marks: &dyn OrigDstSource,
    address: SocketAddrV4,
) -> Result<(), String> {
    let attempt = async {
        let stream = crate::proxy::connect(marks, address)
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

/// One checker that runs.
struct Checker {
    check: Check,
    hostname: Arc<str>,
    runtime: Arc<EndpointRuntime>,
    task: tokio::task::AbortHandle,
}

/// The checkers of this node's checked endpoints, by service and endpoint.
/// They outlive config snapshots: a reload that leaves an endpoint and its
/// check as they were leaves its checker running, counts and all.
#[derive(Default)]
pub struct HealthCheckers {
    running: Mutex<HashMap<(ServiceId, EndpointId), Checker>>,
}

impl HealthCheckers {
    /// Makes the running checkers those `snapshot` asks for: one whose
    /// endpoint, check and service name are unchanged keeps running; a
    /// changed one restarts (its endpoint keeps the health it has); one no
    /// longer wanted stops.
    pub fn sync(
        &self,
        snapshot: &Snapshot,
        metrics: &Arc<Metrics>,
        marks: &Arc<dyn OrigDstSource>,
    ) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted = HashMap::new();
        for (s, service) in snapshot.config.services.iter().enumerate() {
            let Some(check) = &service.health_check else {
                continue;
            };
            for (e, endpoint) in service.endpoints.iter().enumerate() {
                if snapshot.path(endpoint) != Ok(Path::Local) {
                    continue;
                }
                let runtime = snapshot.endpoint_runtime(s, e);
                let key = (snapshot.service_id(s).clone(), runtime.id);
                let kept = running.remove(&key).filter(|c| {
                    c.check == *check
                        && c.hostname == service.hostname
                        && Arc::ptr_eq(&c.runtime, runtime)
                });
                let checker = kept.unwrap_or_else(|| {
                    let address = SocketAddrV4::new(endpoint.address, check.port);
                    let task = tokio::spawn(run(
                        runtime.clone(),
                        service.hostname.clone(),
                        metrics.clone(),
                        check.clone(),
                        marks.clone(),
                        address,
                    ));
                    Checker {
                        check: check.clone(),
                        hostname: service.hostname.clone(),
                        runtime: runtime.clone(),
                        task: task.abort_handle(),
                    }
                });
                wanted.insert(key, checker);
            }
        }
        for (_, stale) in running.drain() {
            stale.task.abort();
        }
        *running = wanted;
    }

    /// How many checkers run now.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for HealthCheckers {
    fn drop(&mut self) {
        let running = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, checker) in running.drain() {
            checker.task.abort();
        }
    }
}

async fn run(
    endpoint: Arc<EndpointRuntime>,
    hostname: Arc<str>,
    metrics: Arc<Metrics>,
    check: Check,
    marks: Arc<dyn OrigDstSource>,
    address: SocketAddrV4,
) {
    let mut tally = Tally::default();
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe(&check, &*marks, address).await;
        metrics
            .health_checks
            .get_or_create(&HealthLabels {
                destination_service: hostname.clone(),
                result: if result.is_ok() { "pass" } else { "fail" },
            })
            .inc();
        match (
            tally.observe(&check, result.is_ok(), endpoint.healthy()),
            result,
        ) {
            (Some(true), _) => {
                info!(service = %hostname, endpoint = %address, "endpoint healthy again: back in rotation");
                endpoint.set_healthy(true);
            }
            (Some(false), Err(reason)) => {
                warn!(service = %hostname, endpoint = %address, %reason, "endpoint unhealthy: out of rotation");
                endpoint.set_healthy(false);
            }
            _ => {}
        }
    }
}
