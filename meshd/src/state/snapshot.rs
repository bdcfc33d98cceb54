//! The routing snapshot built from a validated config: which destinations
//! are captured, where a captured connection goes, and who made it.
//! Pure: lookups and decisions only, no I/O.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use crate::{
    config::{Config, Endpoint, Protocol, Service, ServicePort, Workload},
    policy::balance::{self, EndpointStats},
    policy::breaker::ConnectionLimit,
    policy::outlier::Detector,
    policy::ratelimit::{Refused, ServiceLimiter},
    policy::retry::Budget,
    policy::routing::Backend,
};

/// Value stored in the `DESTINATIONS` BPF map, for whoever inspects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DestinationKind {
    ServiceVip = 1,
    Pod = 2,
}

/// What a captured destination refers to.
#[derive(Clone, Copy, Debug)]
enum Entry {
    /// A service VIP:port; `port` indexes `Service::ports`.
    Vip { service: usize, port: usize },
    /// A meshed pod address:targetPort, reached directly.
    Pod {
        service: usize,
        port: usize,
        endpoint: usize,
    },
}

/// Where one captured connection is relayed to.
#[derive(Debug)]
pub struct Target<'a> {
    pub service: &'a Service,
    /// Index of `service` in the config.
    pub service_index: usize,
    pub endpoint: &'a Endpoint,
    pub upstream: SocketAddrV4,
    pub path: Path,
    pub protocol: Protocol,
}

/// Where the requests of an HTTP connection go: a service port, and the
/// endpoint when the client addressed a pod directly.
#[derive(Debug, Clone, Copy)]
pub struct HttpTarget {
    pub service: usize,
    pub port: ServicePort,
    pub pinned: Option<usize>,
}

/// How a connection reaches its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The endpoint runs on this node (or its node is unknown): connect
    /// directly, after the destination's policy.
    Local,
    /// Through the mTLS tunnel of the endpoint's node meshd.
    Tunnel { node: Ipv4Addr },
}

/// Why no target was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    UnknownDestination,
    NoEndpoints,
    /// The endpoint's node is not in the config's `nodes`.
    UnknownNode,
}

pub struct Snapshot {
    pub config: Arc<Config>,
    entries: HashMap<SocketAddrV4, Entry>,
    /// Round-robin position per service.
    next: Vec<AtomicUsize>,
    by_cgroup: HashMap<u64, usize>,
    by_address: HashMap<Ipv4Addr, usize>,
    /// Services each endpoint address belongs to, for policy.
    services_by_address: HashMap<Ipv4Addr, Vec<usize>>,
    /// Load-balancing statistics per service, per endpoint.
    stats: Vec<Vec<EndpointStats>>,
    /// Rate-limit buckets per service.
    limiters: Vec<ServiceLimiter>,
    /// Requests and connections in flight per service, for circuit breaking.
    breakers: Vec<Breaker>,
    /// Outlier detection per service.
    outliers: Vec<Detector>,
    /// Active health per service, per endpoint (true until a check fails).
    health: Vec<Vec<AtomicBool>>,
    /// Retry budget per service.
    budgets: Vec<Budget>,
}

/// What is in flight to one service from this node.
#[derive(Debug, Default)]
pub struct Breaker {
    requests: std::sync::atomic::AtomicU32,
    connections: Option<Arc<ConnectionLimit>>,
}

/// Holds a place under a circuit-breaker limit until dropped.
pub struct Permit<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a place under `limit` (none: always), or refuses.
fn take(counter: &std::sync::atomic::AtomicU32, limit: Option<u32>) -> Option<Permit<'_>> {
    let previous = counter.fetch_add(1, Ordering::Relaxed);
    let permit = Permit(counter);
    match limit {
        Some(limit) if previous >= limit => None,
        _ => Some(permit),
    }
}

impl Snapshot {
    /// Builds the snapshot. `cgroup_ids` maps workload cgroup paths to the
    /// ids the kernel reports for them (found by the caller).
    pub fn new(config: Arc<Config>, cgroup_ids: &HashMap<String, u64>) -> Self {
        let mut entries = HashMap::new();
        for (s, service) in config.services.iter().enumerate() {
            for (p, port) in service.ports.iter().enumerate() {
                for (e, endpoint) in service.endpoints.iter().enumerate() {
                    let pod = SocketAddrV4::new(endpoint.address, port.target_port);
                    entries.entry(pod).or_insert(Entry::Pod {
                        service: s,
                        port: p,
                        endpoint: e,
                    });
                }
                let vip = SocketAddrV4::new(service.vip, port.port);
                entries.insert(
                    vip,
                    Entry::Vip {
                        service: s,
                        port: p,
                    },
                );
            }
        }
        let mut by_cgroup = HashMap::new();
        let mut by_address = HashMap::new();
        for (w, workload) in config.workloads.iter().enumerate() {
            if let Some(id) = workload.cgroup.as_ref().and_then(|c| cgroup_ids.get(c)) {
                by_cgroup.insert(*id, w);
            }
            for address in &workload.addresses {
                by_address.insert(*address, w);
            }
        }
        let mut services_by_address: HashMap<Ipv4Addr, Vec<usize>> = HashMap::new();
        for (s, service) in config.services.iter().enumerate() {
            for endpoint in &service.endpoints {
                services_by_address
                    .entry(endpoint.address)
                    .or_default()
                    .push(s);
            }
        }
        let next = config
            .services
            .iter()
            .map(|_| AtomicUsize::new(0))
            .collect();
        let stats = config
            .services
            .iter()
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|_| EndpointStats::default())
                    .collect()
            })
            .collect();
        let limiters = config
            .services
            .iter()
            .map(|s| ServiceLimiter::new(s.rate_limit.0, s.rate_limit.1))
            .collect();
        let breakers = config
            .services
            .iter()
            .map(|s| Breaker {
                requests: Default::default(),
                connections: s
                    .circuit_breaker
                    .max_connections
                    .map(|max| ConnectionLimit::new(max, s.circuit_breaker.max_pending_requests)),
            })
            .collect();
        let outliers = config
            .services
            .iter()
            .map(|s| Detector::new(s.outlier, s.endpoints.len()))
            .collect();
        let health = config
            .services
            .iter()
            .map(|s| s.endpoints.iter().map(|_| AtomicBool::new(true)).collect())
            .collect();
        let budgets = config.services.iter().map(|_| Budget::default()).collect();
        Self {
            outliers,
            health,
            budgets,
            breakers,
            limiters,
            config,
            entries,
            next,
            by_cgroup,
            by_address,
            services_by_address,
            stats,
        }
    }

    /// Every destination the kernel should capture.
    pub fn destinations(&self) -> impl Iterator<Item = (SocketAddrV4, DestinationKind)> + '_ {
        self.entries.iter().map(|(addr, entry)| {
            let kind = match entry {
                Entry::Vip { .. } => DestinationKind::ServiceVip,
                Entry::Pod { .. } => DestinationKind::Pod,
            };
            (*addr, kind)
        })
    }

    /// Picks the endpoint for a connection to `dst` (round robin over a
    /// service's endpoints; a pod address goes to that pod).
    pub fn resolve(&self, dst: SocketAddrV4) -> Result<Target<'_>, Unresolved> {
        match *self
            .entries
            .get(&dst)
            .ok_or(Unresolved::UnknownDestination)?
        {
            Entry::Vip { service, port } => {
                let svc = &self.config.services[service];
                let count = svc.endpoints.len();
                if count == 0 {
                    return Err(Unresolved::NoEndpoints);
                }
                let turn = self.next[service].fetch_add(1, Ordering::Relaxed) % count;
                let endpoint = &svc.endpoints[turn];
                Ok(Target {
                    service: svc,
                    service_index: service,
                    endpoint,
                    upstream: SocketAddrV4::new(endpoint.address, svc.ports[port].target_port),
                    path: self.path(endpoint)?,
                    protocol: svc.ports[port].protocol,
                })
            }
            Entry::Pod {
                service,
                port,
                endpoint,
            } => {
                let svc = &self.config.services[service];
                let endpoint = &svc.endpoints[endpoint];
                Ok(Target {
                    service: svc,
                    service_index: service,
                    endpoint,
                    upstream: dst,
                    path: self.path(endpoint)?,
                    protocol: svc.ports[port].protocol,
                })
            }
        }
    }

    /// The service port (and pinned endpoint) behind `dst`, for HTTP.
    pub fn http_target(&self, dst: SocketAddrV4) -> Option<HttpTarget> {
        let (service, port, pinned) = match *self.entries.get(&dst)? {
            Entry::Vip { service, port } => (service, port, None),
            Entry::Pod {
                service,
                port,
                endpoint,
            } => (service, port, Some(endpoint)),
        };
        Some(HttpTarget {
            service,
            port: self.config.services[service].ports[port],
            pinned,
        })
    }

    /// Balances one request of `service` over the endpoints `backend`
    /// admits, leaving out ejected and unhealthy ones and those already
    /// `tried` — unless that leaves none: then every admitted endpoint is a
    /// candidate again (Envoy's "panic" routing), as failing over to a
    /// doubtful endpoint beats failing for certain.
    pub fn pick_endpoint(
        &self,
        service: usize,
        backend: &Backend,
        random: [u64; 2],
        now: u64,
        tried: &[usize],
    ) -> Option<usize> {
        let svc = &self.config.services[service];
        let admitted =
            || (0..svc.endpoints.len()).filter(|e| backend.admits(&svc.endpoints[*e].labels));
        let available = |e: &usize| {
            self.health[service][*e].load(Ordering::Relaxed)
                && !self.outliers[service].ejected(*e, now)
        };
        let mut candidates: Vec<usize> = admitted()
            .filter(available)
            .filter(|e| !tried.contains(e))
            .collect();
        if candidates.is_empty() {
            candidates = admitted().filter(available).collect();
        }
        if candidates.is_empty() {
            candidates = admitted().collect();
        }
        balance::pick(
            svc.load_balancer,
            &candidates,
            &self.stats[service],
            &self.next[service],
            random,
        )
    }

    /// A place for one more HTTP request to `service`, if its circuit
    /// breaker has one.
    pub fn request_permit(&self, service: usize) -> Option<Permit<'_>> {
        let limit = self.config.services[service].circuit_breaker.max_requests;
        take(&self.breakers[service].requests, limit)
    }

    /// The connection limits of `service`, if it has any.
    pub fn connection_limit(&self, service: usize) -> Option<&Arc<ConnectionLimit>> {
        self.breakers[service].connections.as_ref()
    }

    /// Admits one request of `service` from `source` under its rate limits.
    pub fn admit(
        &self,
        service: usize,
        source: &str,
        now: std::time::Duration,
    ) -> Result<(), Refused> {
        self.limiters[service].admit(source, now)
    }

    pub fn endpoint_stats(&self, service: usize, endpoint: usize) -> &EndpointStats {
        &self.stats[service][endpoint]
    }

    /// Feeds outlier detection; returns the ejection's length when this
    /// failure ejected the endpoint.
    pub fn record_result(
        &self,
        service: usize,
        endpoint: usize,
        failed: bool,
        now: u64,
    ) -> Option<std::time::Duration> {
        self.outliers[service].record(endpoint, failed, now)
    }

    pub fn retry_budget(&self, service: usize) -> &Budget {
        &self.budgets[service]
    }

    /// (healthy, ejected, requests in flight) of one endpoint at `now`.
    pub fn endpoint_state(&self, service: usize, endpoint: usize, now: u64) -> (bool, bool, u64) {
        (
            self.endpoint_healthy(service, endpoint),
            self.outliers[service].ejected(endpoint, now),
            self.stats[service][endpoint]
                .in_flight
                .load(Ordering::Relaxed),
        )
    }

    pub fn endpoint_healthy(&self, service: usize, endpoint: usize) -> bool {
        self.health[service][endpoint].load(Ordering::Relaxed)
    }

    pub fn set_endpoint_health(&self, service: usize, endpoint: usize, healthy: bool) {
        self.health[service][endpoint].store(healthy, Ordering::Relaxed);
    }

    /// Whether a local endpoint address passes every health check that
    /// covers it (an unchecked one always does).
    pub fn local_endpoint_healthy(&self, address: Ipv4Addr) -> bool {
        self.services_of(address).iter().all(|s| {
            self.config.services[*s]
                .endpoints
                .iter()
                .position(|e| e.address == address)
                .is_none_or(|e| self.endpoint_healthy(*s, e))
        })
    }

    /// Sets the gauges that describe the state right now: open circuit
    /// breakers, ejected and unhealthy endpoints.
    pub fn export_state(&self, metrics: &crate::telemetry::metrics::Metrics) {
        use crate::telemetry::metrics::{BreakerLabels, ServiceLabels};
        let now = crate::net::clock::now_nanos();
        for (s, service) in self.config.services.iter().enumerate() {
            let labels = ServiceLabels {
                destination_service: service.hostname.clone(),
            };
            if let Some(limit) = service.circuit_breaker.max_requests {
                let open = self.breakers[s].requests.load(Ordering::Relaxed) >= limit;
                metrics
                    .circuit_breaker_open
                    .get_or_create(&BreakerLabels {
                        destination_service: service.hostname.clone(),
                        limit: "requests",
                    })
                    .set(i64::from(open));
            }
            if let Some(limit) = &self.breakers[s].connections {
                let (connections, pending) = limit.state();
                for (name, open) in [("connections", connections), ("pending", pending)] {
                    metrics
                        .circuit_breaker_open
                        .get_or_create(&BreakerLabels {
                            destination_service: service.hostname.clone(),
                            limit: name,
                        })
                        .set(i64::from(open));
                }
            }
            if service.outlier.is_some() {
                metrics
                    .outlier_ejected
                    .get_or_create(&labels)
                    .set(self.outliers[s].ejected_count(now) as i64);
            }
            if service.health_check.is_some() {
                let unhealthy = (0..service.endpoints.len())
                    .filter(|e| !self.endpoint_healthy(s, *e))
                    .count();
                metrics
                    .unhealthy_endpoints
                    .get_or_create(&labels)
                    .set(unhealthy as i64);
            }
        }
    }

    /// How `endpoint` is reached from this node.
    pub fn path(&self, endpoint: &Endpoint) -> Result<Path, Unresolved> {
        match &endpoint.node {
            Some(node) if *node != self.config.node.name => self
                .config
                .nodes
                .get(node)
                .map(|node| Path::Tunnel { node: *node })
                .ok_or(Unresolved::UnknownNode),
            _ => Ok(Path::Local),
        }
    }

    /// The services an endpoint address belongs to.
    pub fn services_of(&self, address: Ipv4Addr) -> &[usize] {
        self.services_by_address
            .get(&address)
            .map_or(&[], Vec::as_slice)
    }

    /// The workload of this node that owns `address`.
    pub fn local_workload(&self, address: Ipv4Addr) -> Option<&Workload> {
        self.by_address
            .get(&address)
            .map(|w| &self.config.workloads[*w])
    }

    /// This node's tunnel address, if the config lists it.
    pub fn own_tunnel_address(&self) -> Option<Ipv4Addr> {
        self.config.nodes.get(&self.config.node.name).copied()
    }

    /// The workload a connection came from: by the cgroup `connect` ran in,
    /// else by the client's address.
    pub fn source(&self, cgroup_id: u64, client: Ipv4Addr) -> Option<&Workload> {
        self.by_cgroup
            .get(&cgroup_id)
            .or_else(|| self.by_address.get(&client))
            .map(|w| &self.config.workloads[*w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    const YAML: &str = "\
node: { name: a, captureAddress: 10.77.0.1, podCgroup: /pods }
services:
  - name: reviews
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 9080 }, { port: 443 }]
    endpoints: [{ address: 10.77.0.7 }, { address: 10.77.0.8 }]
  - name: empty
    vip: 10.96.0.21
    ports: [{ port: 80 }]
workloads:
  - { name: pp, cgroup: /pods/pp, addresses: [10.77.0.2] }
  - { name: other, addresses: [10.77.0.3] }
";

    fn mesh() -> Snapshot {
        let config = Arc::new(load_str("t.yaml", YAML).expect("valid"));
        let ids = HashMap::from([("/pods/pp".to_owned(), 42)]);
        Snapshot::new(config, &ids)
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().expect("address")
    }

    #[test]
    fn resolves_vips_round_robin_and_pods_directly() {
        let mesh = mesh();
        let cases = [
            ("10.96.0.20:80", Ok("10.77.0.7:9080")),
            ("10.96.0.20:80", Ok("10.77.0.8:9080")),
            ("10.96.0.20:80", Ok("10.77.0.7:9080")),
            ("10.96.0.20:443", Ok("10.77.0.8:443")),
            ("10.77.0.8:9080", Ok("10.77.0.8:9080")),
            ("10.96.0.20:81", Err(Unresolved::UnknownDestination)),
            ("10.96.0.99:80", Err(Unresolved::UnknownDestination)),
            ("10.96.0.21:80", Err(Unresolved::NoEndpoints)),
        ];
        for (dst, want) in cases {
            let got = mesh.resolve(addr(dst)).map(|t| t.upstream);
            assert_eq!(got, want.map(addr), "{dst}");
        }
    }

    #[test]
    fn captures_vips_and_pod_target_ports() {
        let mesh = mesh();
        let mut got: Vec<_> = mesh.destinations().map(|(d, _)| d).collect();
        got.sort();
        let mut want: Vec<_> = [
            "10.96.0.20:80",
            "10.96.0.20:443",
            "10.96.0.21:80",
            "10.77.0.7:9080",
            "10.77.0.8:9080",
            "10.77.0.7:443",
            "10.77.0.8:443",
        ]
        .into_iter()
        .map(addr)
        .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn identifies_source_by_cgroup_then_address() {
        let mesh = mesh();
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        assert_eq!(
            mesh.source(42, ip("10.77.0.99")).map(|w| &*w.name),
            Some("pp")
        );
        assert_eq!(
            mesh.source(7, ip("10.77.0.3")).map(|w| &*w.name),
            Some("other")
        );
        assert!(mesh.source(7, ip("10.77.0.99")).is_none());
    }
}
