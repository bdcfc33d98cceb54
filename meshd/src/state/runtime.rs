//! Runtime state: what meshd learns while it serves, per service and per
//! endpoint — round-robin position, latency estimates and requests in
//! flight, health, outlier ejections, circuit-breaker counts, retry budget,
//! rate-limit buckets. It is keyed by stable ids and outlives a config
//! snapshot: a reload hands what is still configured to the new snapshot
//! (the very same objects, so permits and counts taken under the old one
//! stay counted), applies changed limits from then on, and drops the rest.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use super::ids::{EndpointId, ServiceId};
use crate::{
    config::Service,
    policy::{
        balance::EndpointStats, breaker::ConnectionLimit, outlier, ratelimit::ServiceLimiter,
        retry::Budget,
    },
};

/// What one service's traffic from this node has taught meshd.
#[derive(Debug)]
pub struct ServiceRuntime {
    pub id: ServiceId,
    /// Round-robin position over the service's endpoints.
    pub next: AtomicUsize,
    /// HTTP requests in flight, for `circuitBreaker.maxRequests`.
    requests: AtomicU32,
    /// Upstream connections (HTTP and TCP) and requests waiting for one.
    /// Every connection counts, limited or not, so a limit added by a
    /// reload sees the connections already open.
    pub connections: Arc<ConnectionLimit>,
    pub limiter: ServiceLimiter,
    pub budget: Budget,
    /// Serialises outlier ejections, so the maximum share holds.
    pub ejecting: Mutex<()>,
}

/// What meshd knows of one endpoint of one service.
#[derive(Debug)]
pub struct EndpointRuntime {
    pub id: EndpointId,
    pub stats: EndpointStats,
    /// Active health: true until a check fails.
    pub healthy: AtomicBool,
    pub outlier: outlier::State,
}

/// One service's runtime as a snapshot holds it: the service's own and its
/// endpoints', in the config's order.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub runtime: Arc<ServiceRuntime>,
    pub endpoints: Vec<Arc<EndpointRuntime>>,
}

/// Holds a place under `maxRequests` until dropped.
pub struct Permit<'a>(&'a AtomicU32);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl ServiceRuntime ===

impl ServiceRuntime {
    fn new(service: &Service) -> Self {
        let runtime = Self {
            id: ServiceId::of(service),
            next: AtomicUsize::new(0),
            requests: AtomicU32::new(0),
            connections: ConnectionLimit::new(None, None),
            limiter: ServiceLimiter::default(),
            budget: Budget::default(),
            ejecting: Mutex::new(()),
        };
        runtime.apply(service);
        runtime
    }

    /// Makes `service`'s limits the ones in force, keeping the counts.
    pub fn apply(&self, service: &Service) {
        let breaker = &service.circuit_breaker;
        self.connections
            .set_limits(breaker.max_connections, breaker.max_pending_requests);
        self.limiter
            .set_limits(service.rate_limit.0, service.rate_limit.1);
    }

    /// A place for one more request under `limit` (none: always), or none.
    pub fn request_permit(&self, limit: Option<u32>) -> Option<Permit<'_>> {
        let previous = self.requests.fetch_add(1, Ordering::Relaxed);
        let permit = Permit(&self.requests);
        match limit {
            Some(limit) if previous >= limit => None,
            _ => Some(permit),
        }
    }

    /// Requests in flight now.
    pub fn requests_in_flight(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

// === impl EndpointRuntime ===

impl EndpointRuntime {
    fn new(id: EndpointId) -> Self {
        Self {
            id,
            stats: EndpointStats::default(),
            healthy: AtomicBool::new(true),
            outlier: outlier::State::default(),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }
}

/// Endpoints of a service up to which one not in its old place is looked
/// for one by one.
const LOOKED_FOR: usize = 16;

/// The runtime for `services`, taking over from `previous` (the snapshot
/// being replaced) whatever is still configured: a service by its id, an
/// endpoint by its service's id and its address. A kept service's limits
/// stay as they are until `ServiceRuntime::apply` (the reload calls it once
/// the new snapshot is sure to go live).
pub fn carry_over(previous: &[ServiceState], services: &[Arc<Service>]) -> Vec<ServiceState> {
    let old: HashMap<&ServiceId, &ServiceState> =
        previous.iter().map(|s| (&s.runtime.id, s)).collect();
    services
        .iter()
        .map(|service| {
            let id = ServiceId::of(service);
            let Some(kept) = old.get(&id) else {
                return ServiceState {
                    runtime: Arc::new(ServiceRuntime::new(service)),
                    endpoints: service
                        .endpoints
                        .iter()
                        .map(|e| Arc::new(EndpointRuntime::new(EndpointId(e.address))))
                        .collect(),
                };
            };
            // An endpoint is mostly where it was; a few are looked for
            // among the rest, many through a table.
            let by_id: Option<HashMap<EndpointId, &Arc<EndpointRuntime>>> = (kept.endpoints.len()
                > LOOKED_FOR)
                .then(|| kept.endpoints.iter().map(|e| (e.id, e)).collect());
            let find = |i: usize, id: EndpointId| {
                let same_place = kept.endpoints.get(i).filter(|e| e.id == id);
                same_place.or_else(|| match &by_id {
                    Some(by_id) => by_id.get(&id).copied(),
                    None => kept.endpoints.iter().find(|e| e.id == id),
                })
            };
            ServiceState {
                runtime: kept.runtime.clone(),
                endpoints: service
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let id = EndpointId(e.address);
                        find(i, id).map_or_else(|| Arc::new(EndpointRuntime::new(id)), Arc::clone)
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn services(yaml: &str) -> Vec<Arc<Service>> {
        let text =
            format!("node: {{ name: a, captureAddress: 10.77.0.1, podCgroup: /pods }}\n{yaml}");
        load_str("t.yaml", &text).expect("valid").services
    }

    const TWO: &str = "\
services:
  - name: a
    vip: 10.96.0.1
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.7 }, { address: 10.77.0.8 }]
    circuitBreaker: { maxConnections: 5 }
  - name: b
    vip: 10.96.0.2
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.9 }]
";

    /// A service's name, `=` when kept or `+` when new, and whether each of
    /// its endpoints was kept.
    type Kept = (String, Vec<bool>);

    /// Which of `next`'s services and endpoints are the very objects of
    /// `previous` (kept) rather than new ones.
    fn kept(previous: &[ServiceState], next: &[ServiceState]) -> Vec<Kept> {
        next.iter()
            .map(|s| {
                let old = previous
                    .iter()
                    .find(|p| Arc::ptr_eq(&p.runtime, &s.runtime));
                let endpoints = s
                    .endpoints
                    .iter()
                    .map(|e| old.is_some_and(|o| o.endpoints.iter().any(|p| Arc::ptr_eq(p, e))))
                    .collect();
                let name = format!(
                    "{}{}",
                    s.runtime.id.name,
                    if old.is_some() { "=" } else { "+" }
                );
                (name, endpoints)
            })
            .collect()
    }

    #[test]
    fn carry_over_keeps_what_is_still_configured_by_id() {
        let first = carry_over(&[], &services(TWO));
        first[0].endpoints[0].set_healthy(false);
        type Case<'a> = (&'a str, &'a str, Vec<(&'a str, Vec<bool>)>);
        let cases: [Case; 5] = [
            (
                "unchanged",
                TWO,
                vec![("a=", vec![true, true]), ("b=", vec![true])],
            ),
            (
                "reordered, and an unrelated service added",
                "\
services:
  - name: c
    vip: 10.96.0.3
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.10 }]
  - name: b
    vip: 10.96.0.2
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.9 }]
  - name: a
    vip: 10.96.0.1
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.8 }, { address: 10.77.0.7 }]
",
                vec![
                    ("c+", vec![false]),
                    ("b=", vec![true]),
                    ("a=", vec![true, true]),
                ],
            ),
            (
                "an endpoint removed and another added",
                "\
services:
  - name: a
    vip: 10.96.0.1
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.8 }, { address: 10.77.0.11 }]
",
                vec![("a=", vec![true, false])],
            ),
            (
                "same name in another namespace is another service",
                "\
services:
  - name: a
    namespace: other
    vip: 10.96.0.1
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.77.0.7 }]
",
                vec![("a+", vec![false])],
            ),
            ("everything removed", "services: []\n", vec![]),
        ];
        for (what, yaml, want) in cases {
            let next = carry_over(&first, &services(yaml));
            let got = kept(&first, &next);
            let want: Vec<Kept> = want.into_iter().map(|(n, e)| (n.to_owned(), e)).collect();
            assert_eq!(got, want, "{what}");
        }
        // What is kept keeps its state.
        let next = carry_over(&first, &services(TWO));
        assert!(!next[0].endpoints[0].healthy());
        assert!(next[0].endpoints[1].healthy());
    }

    /// An endpoint keeps its state wherever it moves in its service's
    /// list: among a few (looked for one by one) and among many (through a
    /// table).
    #[test]
    fn an_endpoint_keeps_its_state_when_its_list_is_reordered() {
        for count in [3, LOOKED_FOR + 4] {
            let list = |order: &mut dyn Iterator<Item = usize>| {
                let endpoints: Vec<String> = order
                    .map(|i| format!("{{ address: 10.77.1.{i} }}"))
                    .collect();
                services(&format!(
                    "services:\n  - {{ name: a, vip: 10.96.0.1, ports: [{{ port: 80 }}], endpoints: [{}] }}\n",
                    endpoints.join(", ")
                ))
            };
            let first = carry_over(&[], &list(&mut (0..count)));
            first[0].endpoints[1].set_healthy(false);
            let reversed = list(&mut (0..count).rev());
            let next = carry_over(&first, &reversed);
            for (endpoint, state) in reversed[0].endpoints.iter().zip(&next[0].endpoints) {
                assert_eq!(state.id, EndpointId(endpoint.address));
                let was_marked = endpoint.address == std::net::Ipv4Addr::new(10, 77, 1, 1);
                assert_eq!(
                    state.healthy(),
                    !was_marked,
                    "{count}: {}",
                    endpoint.address
                );
            }
        }
    }

    #[test]
    fn one_count_holds_across_a_reload_and_changed_limits_apply_at_once() {
        let first = carry_over(&[], &services(TWO));
        let held = first[0].runtime.request_permit(Some(1)).expect("first");
        let next = carry_over(&first, &services(TWO));
        // The permit taken under the old snapshot still counts.
        assert!(next[0].runtime.request_permit(Some(1)).is_none());
        drop(held);
        assert!(next[0].runtime.request_permit(Some(1)).is_some());

        let slots: Vec<_> = (0..5)
            .map(|_| first[0].runtime.connections.try_open().expect("slot"))
            .collect();
        assert!(
            next[0].runtime.connections.try_open().is_none(),
            "limit 5 held"
        );
        let raised = TWO.replace("maxConnections: 5", "maxConnections: 6");
        let raised = services(&raised);
        let third = carry_over(&next, &raised);
        assert!(
            third[0].runtime.connections.try_open().is_none(),
            "not applied yet"
        );
        third[0].runtime.apply(&raised[0]);
        assert!(
            third[0].runtime.connections.try_open().is_some(),
            "raised to 6"
        );
        drop(slots);
    }
}
