//! The snapshot built from a validated config: which destinations are
//! captured, where a captured connection goes, who made it, and which
//! endpoints are in rotation. Lookups only; a reload builds a new one and
//! swaps it in whole. The runtime state it points to (see `runtime`) is
//! carried over from the snapshot it replaces.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use super::{
    ids::{OrigDstAddr, ServiceId},
    runtime::{carry_over, EndpointRuntime, Permit, ServiceRuntime, ServiceState},
};
use crate::{
    config::{Config, Endpoint, Protocol, Service, ServicePort, Workload},
    policy::{balance, breaker::ConnectionLimit, outlier, ratelimit::Refused, retry::Budget},
    spiffe::Identity,
};

/// What a captured destination is, as the `DESTINATIONS` BPF map records it.
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

/// Where one captured TCP connection is relayed to.
#[derive(Debug)]
pub struct Target<'a> {
    pub service: &'a Service,
    /// Index of `service` in this snapshot.
    pub service_index: usize,
    pub endpoint: &'a Endpoint,
    pub upstream: SocketAddrV4,
    pub path: Path,
    pub protocol: Protocol,
}

/// Where the requests of an HTTP connection go: a service port, and the
/// endpoint when the client addressed a pod directly (indexes into this
/// snapshot).
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

/// A workload of the mesh as the config describes it, for the labels of
/// connections from it.
#[derive(Debug, Clone)]
pub struct KnownWorkload {
    pub name: Arc<str>,
    pub reported: crate::config::Reported,
}

/// What the kernel does with plaintext (a connection that does not come
/// from meshd) to a pod's port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaintextRule {
    /// Refused even in permissive mode: the pod's policy never admits it.
    pub refused: bool,
    /// Admitted on this port although the pod's other ports refuse it.
    pub admitted: bool,
    /// Admitted from the node itself (kubelet probes), in every mode.
    pub probe: bool,
    /// The pod's own mTLS mode, on its port 0 (else `mesh.mode`).
    pub mode: Option<crate::config::MeshMode>,
}

/// How one endpoint stands right now, for the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointState {
    pub healthy: bool,
    pub ejected: bool,
    pub in_flight: u64,
}

pub struct Snapshot {
    pub config: Arc<Config>,
    entries: HashMap<SocketAddrV4, Entry>,
    /// Workloads by cgroup path (from the cgroup2 mount's root).
    by_cgroup: HashMap<String, usize>,
    /// Every local workload by address (the destination side's lookup).
    by_address: HashMap<Ipv4Addr, usize>,
    /// Workloads without a cgroup by address (the source side's fallback).
    by_address_only: HashMap<Ipv4Addr, usize>,
    /// Services each endpoint address belongs to, for policy (most to one:
    /// kept inline, not in an allocation per address).
    services_by_address: HashMap<Ipv4Addr, smallvec::SmallVec<[usize; 1]>>,
    /// Runtime state per service, in config order.
    runtime: Vec<ServiceState>,
    /// Every workload the config names (endpoints of any node, this node's
    /// workloads), by identity and name.
    known: HashMap<(Identity, Arc<str>), KnownWorkload>,
}

impl Snapshot {
    /// Builds the snapshot, taking runtime state over from `previous`.
    pub fn new(config: Arc<Config>, previous: Option<&Snapshot>) -> Self {
        let endpoints: usize = config.services.iter().map(|s| s.endpoints.len()).sum();
        let ports: usize = config.services.iter().map(|s| s.ports.len()).sum();
        let mut entries = HashMap::with_capacity(endpoints + ports);
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
        let mut by_address_only = HashMap::new();
        for (w, workload) in config.workloads.iter().enumerate() {
            if let Some(cgroup) = &workload.cgroup {
                by_cgroup.insert(cgroup.trim_end_matches('/').to_owned(), w);
            }
            for address in &workload.addresses {
                by_address.insert(*address, w);
            }
            // A workload with a cgroup is known by it alone: a process in
            // another cgroup that shares its address (its network
            // namespace) is not that workload.
            if workload.cgroup.is_none() {
                for address in &workload.addresses {
                    by_address_only.insert(*address, w);
                }
            }
        }
        let mut services_by_address: HashMap<Ipv4Addr, smallvec::SmallVec<[usize; 1]>> =
            HashMap::with_capacity(endpoints);
        for (s, service) in config.services.iter().enumerate() {
            for endpoint in &service.endpoints {
                services_by_address
                    .entry(endpoint.address)
                    .or_default()
                    .push(s);
            }
        }
        let mut known = HashMap::with_capacity(config.workloads.len() + 1);
        for endpoint in config.services.iter().flat_map(|s| &s.endpoints) {
            known
                .entry((endpoint.identity.clone(), endpoint.workload.clone()))
                .or_insert_with(|| KnownWorkload {
                    name: endpoint.workload.clone(),
                    reported: endpoint.reported.clone(),
                });
        }
        for workload in &config.workloads {
            known.insert(
                (workload.identity.clone(), workload.name.clone()),
                KnownWorkload {
                    name: workload.name.clone(),
                    reported: workload.reported.clone(),
                },
            );
        }
        let runtime = carry_over(
            previous.map_or(&[][..], |p| &p.runtime[..]),
            &config.services,
        );
        Self {
            config,
            entries,
            by_cgroup,
            by_address,
            by_address_only,
            services_by_address,
            runtime,
            known,
        }
    }

    /// The workload `name` that `identity` proved, if the config knows that
    /// workload to run as that identity: what a peer says of itself is
    /// believed only so far.
    pub fn known_workload(&self, identity: &Identity, name: &Arc<str>) -> Option<&KnownWorkload> {
        self.known.get(&(identity.clone(), name.clone()))
    }

    /// Makes this snapshot's limits (circuit breaker, rate limits) the ones
    /// in force for the runtime state it shares with the snapshot it
    /// replaces; counts and buckets stay.
    pub fn apply_limits(&self) {
        for (service, state) in self.config.services.iter().zip(&self.runtime) {
            state.runtime.apply(service);
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

    /// Picks the endpoint for a TCP connection to `dst`: round robin over
    /// the service's endpoints in rotation (see `pick_endpoint`); a pod
    /// address goes to that pod.
    pub fn resolve(&self, dst: OrigDstAddr, now: u64) -> Result<Target<'_>, Unresolved> {
        let dst = dst.0;
        let (service, port, endpoint) = match *self
            .entries
            .get(&dst)
            .ok_or(Unresolved::UnknownDestination)?
        {
            Entry::Vip { service, port } => {
                let endpoint = self
                    .pick_endpoint(
                        service,
                        |_| true,
                        balance::Policy::RoundRobin,
                        [0, 0],
                        now,
                        &[],
                    )
                    .ok_or(Unresolved::NoEndpoints)?;
                (service, port, endpoint)
            }
            Entry::Pod {
                service,
                port,
                endpoint,
            } => (service, port, endpoint),
        };
        let svc = &self.config.services[service];
        let endpoint = &svc.endpoints[endpoint];
        Ok(Target {
            service: svc,
            service_index: service,
            endpoint,
            upstream: SocketAddrV4::new(endpoint.address, svc.ports[port].target_port),
            path: self.path(endpoint)?,
            protocol: svc.ports[port].protocol,
        })
    }

    /// The service port (and pinned endpoint) behind `dst`, for HTTP.
    pub fn http_target(&self, dst: OrigDstAddr) -> Option<HttpTarget> {
        let (service, port, pinned) = match *self.entries.get(&dst.0)? {
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

    /// The one endpoint selection, for TCP connections and HTTP requests:
    /// balances with `policy` over the endpoints `admits` lets in, leaving
    /// out ejected and unhealthy ones and those already `tried` — unless
    /// that leaves none: then every admitted endpoint in rotation is a
    /// candidate again, and if none is, every admitted one (Envoy's
    /// "panic" routing: failing over to a doubtful endpoint beats failing
    /// for certain).
    pub fn pick_endpoint(
        &self,
        service: usize,
        admits: impl Fn(&Endpoint) -> bool,
        policy: balance::Policy,
        random: [u64; 2],
        now: u64,
        tried: &[usize],
    ) -> Option<usize> {
        let svc = &self.config.services[service];
        let state = &self.runtime[service];
        let admitted = || (0..svc.endpoints.len()).filter(|e| admits(&svc.endpoints[*e]));
        let available = |e: &usize| in_rotation(&state.endpoints[*e], now);
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
            policy,
            &candidates,
            |e| &state.endpoints[e].stats,
            &state.runtime.next,
            random,
        )
    }

    /// The runtime state of `service`.
    pub fn service_runtime(&self, service: usize) -> &Arc<ServiceRuntime> {
        &self.runtime[service].runtime
    }

    /// The runtime state of one endpoint of `service`.
    pub fn endpoint_runtime(&self, service: usize, endpoint: usize) -> &Arc<EndpointRuntime> {
        &self.runtime[service].endpoints[endpoint]
    }

    /// The stable id of `service`.
    pub fn service_id(&self, service: usize) -> &ServiceId {
        &self.runtime[service].runtime.id
    }

    /// A place for one more HTTP request to `service`, if its circuit
    /// breaker has one.
    pub fn request_permit(&self, service: usize) -> Option<Permit<'_>> {
        let limit = self.config.services[service].circuit_breaker.max_requests;
        self.runtime[service].runtime.request_permit(limit)
    }

    /// The connection count and limits of `service`.
    pub fn connection_limit(&self, service: usize) -> &Arc<ConnectionLimit> {
        &self.runtime[service].runtime.connections
    }

    /// Admits one request of `service` from `source` under its rate limits.
    pub fn admit(&self, service: usize, source: &str, now: Duration) -> Result<(), Refused> {
        self.runtime[service].runtime.limiter.admit(source, now)
    }

    /// Feeds outlier detection; returns the ejection's length when this
    /// failure ejected the endpoint.
    pub fn record_result(
        &self,
        service: usize,
        endpoint: usize,
        failed: bool,
        now: u64,
    ) -> Option<Duration> {
        let settings = self.config.services[service].outlier.as_ref()?;
        let state = &self.runtime[service];
        if !state.endpoints[endpoint]
            .outlier
            .record(settings, failed, now)
        {
            return None;
        }
        let _one_at_a_time = state
            .runtime
            .ejecting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ejected = self.ejected_count(service, now);
        outlier::may_eject(settings, ejected, state.endpoints.len())
            .then(|| state.endpoints[endpoint].outlier.eject(settings, now))
    }

    /// How many of `service`'s endpoints are ejected at `now`.
    pub fn ejected_count(&self, service: usize, now: u64) -> usize {
        self.runtime[service]
            .endpoints
            .iter()
            .filter(|e| e.outlier.ejected(now))
            .count()
    }

    /// How many of `service`'s endpoints fail their health check now.
    pub fn unhealthy_count(&self, service: usize) -> usize {
        self.runtime[service]
            .endpoints
            .iter()
            .filter(|e| !e.healthy())
            .count()
    }

    pub fn retry_budget(&self, service: usize) -> &Budget {
        &self.runtime[service].runtime.budget
    }

    /// How one endpoint stands at `now`.
    pub fn endpoint_state(&self, service: usize, endpoint: usize, now: u64) -> EndpointState {
        let runtime = &self.runtime[service].endpoints[endpoint];
        EndpointState {
            healthy: runtime.healthy(),
            ejected: runtime.outlier.ejected(now),
            in_flight: runtime.stats.in_flight(),
        }
    }

    /// Whether a local endpoint address passes every health check that
    /// covers it (an unchecked one always does).
    pub fn local_endpoint_healthy(&self, address: Ipv4Addr) -> bool {
        self.services_of(address).iter().all(|s| {
            self.config.services[*s]
                .endpoints
                .iter()
                .position(|e| e.address == address)
                .is_none_or(|e| self.runtime[*s].endpoints[e].healthy())
        })
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

    /// The plaintext rules of this node's pods for the kernel's ingress
    /// filter, by (address, port; port 0 for every port the others leave).
    pub fn pod_ports(&self) -> std::collections::HashMap<SocketAddrV4, PlaintextRule> {
        let mut rules = std::collections::HashMap::<SocketAddrV4, PlaintextRule>::new();
        let addresses: std::collections::BTreeSet<Ipv4Addr> = self
            .services_by_address
            .keys()
            .chain(self.by_address.keys())
            .copied()
            .collect();
        for address in addresses {
            let (others, differing) =
                crate::policy::authz::plaintext(&self.config.policies, &self.destination(address));
            if !others {
                rules
                    .entry(SocketAddrV4::new(address, 0))
                    .or_default()
                    .refused = true;
            }
            for (port, admitted) in differing {
                let rule = rules.entry(SocketAddrV4::new(address, port)).or_default();
                rule.refused = !admitted;
                rule.admitted = admitted;
            }
        }
        for workload in &self.config.workloads {
            for address in &workload.addresses {
                if workload.mtls_mode.is_some() {
                    rules
                        .entry(SocketAddrV4::new(*address, 0))
                        .or_default()
                        .mode = workload.mtls_mode;
                }
                for port in &workload.probe_ports {
                    let rule = rules.entry(SocketAddrV4::new(*address, *port)).or_default();
                    rule.probe = true;
                }
            }
        }
        rules
    }

    /// The services an endpoint address belongs to.
    pub fn services_of(&self, address: Ipv4Addr) -> &[usize] {
        self.services_by_address
            .get(&address)
            .map_or(&[], |services| services.as_slice())
    }

    /// The workload of this node that owns `address`.
    /// The endpoint at `address` as policies select it: the services it
    /// backs and, when it is one of this node's, its workload.
    pub fn destination(&self, address: Ipv4Addr) -> crate::policy::authz::Destination<'_> {
        crate::policy::authz::Destination {
            services: self.services_of(address),
            workload: self
                .local_workload(address)
                .map(|w| (&*w.namespace, &w.labels)),
        }
    }

    pub fn local_workload(&self, address: Ipv4Addr) -> Option<&Workload> {
        self.by_address
            .get(&address)
            .map(|w| &self.config.workloads[*w])
    }

    /// This node's tunnel address, if the config lists it.
    pub fn own_tunnel_address(&self) -> Option<Ipv4Addr> {
        self.config.nodes.get(&self.config.node.name).copied()
    }

    /// The workload a connection came from: the one whose cgroup is the
    /// cgroup `connect` ran in or one of its ancestors (the pod's cgroup
    /// for a process in one of its containers; validation refuses nested
    /// workload cgroups), else — for a workload configured without a
    /// cgroup — by the client's address.
    pub fn source(&self, cgroup: Option<&str>, client: Ipv4Addr) -> Option<&Workload> {
        cgroup
            .and_then(|path| self.workload_in(path))
            .or_else(|| self.by_address_only.get(&client).copied())
            .map(|w| &self.config.workloads[w])
    }

    /// The workload whose cgroup is `path` or its nearest ancestor.
    fn workload_in(&self, path: &str) -> Option<usize> {
        crate::config::validate::cgroup_lineage(path).find_map(|c| self.by_cgroup.get(c).copied())
    }
}

/// Whether an endpoint takes new traffic at `now`: healthy and not ejected.
fn in_rotation(endpoint: &EndpointRuntime, now: u64) -> bool {
    endpoint.healthy() && !endpoint.outlier.ejected(now)
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

    fn snapshot() -> Snapshot {
        let config = Arc::new(load_str("t.yaml", YAML).expect("valid"));
        Snapshot::new(config, None)
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().expect("address")
    }

    fn resolve(snapshot: &Snapshot, dst: &str) -> Result<SocketAddrV4, Unresolved> {
        snapshot
            .resolve(OrigDstAddr(addr(dst)), 1)
            .map(|t| t.upstream)
    }

    #[test]
    fn resolves_vips_round_robin_and_pods_directly() {
        let snapshot = snapshot();
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
            assert_eq!(resolve(&snapshot, dst), want.map(addr), "{dst}");
        }
    }

    #[test]
    fn tcp_skips_endpoints_out_of_rotation_unless_none_is_left() {
        let snapshot = snapshot();
        snapshot.endpoint_runtime(0, 0).set_healthy(false);
        for _ in 0..4 {
            assert_eq!(
                resolve(&snapshot, "10.96.0.20:80"),
                Ok(addr("10.77.0.8:9080"))
            );
        }
        // Both out: panic routing spreads over both again.
        snapshot.endpoint_runtime(0, 1).set_healthy(false);
        let picks: std::collections::HashSet<_> = (0..4)
            .map(|_| resolve(&snapshot, "10.96.0.20:80").expect("panic routing"))
            .collect();
        assert_eq!(picks.len(), 2, "{picks:?}");
    }

    #[test]
    fn captures_vips_and_pod_target_ports() {
        let snapshot = snapshot();
        let mut got: Vec<_> = snapshot.destinations().map(|(d, _)| d).collect();
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
        let snapshot = snapshot();
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        let source = |cgroup, client| snapshot.source(cgroup, ip(client)).map(|w| &*w.name);
        assert_eq!(source(Some("/pods/pp"), "10.77.0.99"), Some("pp"));
        // A container's cgroup below the pod's is the pod.
        assert_eq!(
            source(Some("/pods/pp/cri-containerd-1.scope"), "10.77.0.99"),
            Some("pp")
        );
        assert_eq!(source(Some("/pods/pp/a/b/"), "10.77.0.99"), Some("pp"));
        // A sibling whose name merely starts alike is not.
        assert_eq!(source(Some("/pods/pp2"), "10.77.0.99"), None);
        assert_eq!(source(Some("/pods"), "10.77.0.3"), Some("other"));
        assert_eq!(source(None, "10.77.0.3"), Some("other"));
        assert_eq!(source(Some("/pods/x"), "10.77.0.99"), None);
        // pp has a cgroup: another cgroup at its address is not pp.
        assert_eq!(source(Some("/pods/x"), "10.77.0.2"), None);
        assert_eq!(source(None, "10.77.0.2"), None);
    }
}
