//! Validation: turns parsed files into one checked `Config`, or every
//! problem found, each located by file, line and field. Pure: no I/O.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use super::{
    ConfigError, ConfigErrors, ConfigFile, FieldPath, IdentitySpec, MeshMode, MeshSpec, NodeSpec,
    PolicySpec, Protocol, ProxySpec, ServiceItem, Source,
};
use crate::policy::routing::Labels;
use crate::spiffe::Identity;

mod service;
use service::check_service;

/// A validated configuration: what meshd runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub mesh: MeshSpec,
    pub node: Node,
    pub proxy: ProxySpec,
    /// Shared with the config a reload took them over from.
    pub services: Vec<Arc<Service>>,
    pub workloads: Vec<Workload>,
    /// Tunnel address of every node, by name.
    pub nodes: HashMap<Arc<str>, Ipv4Addr>,
    pub policies: Vec<Policy>,
    /// `mesh.clusterName`, interned for `source_cluster` and
    /// `destination_cluster`.
    pub cluster: Arc<str>,
    pub tracing: Option<super::TracingSpec>,
    pub access_log: Option<super::AccessLogSpec>,
}

impl Config {
    /// Places the cgroups of workloads given as `pod` for `driver` (the
    /// one detected on the node when `node.cgroupDriver` is `auto`;
    /// validation guessed it from `podCgroup`'s name).
    pub fn place_pods(&mut self, driver: super::CgroupDriver) {
        for workload in &mut self.workloads {
            if let Some(pod) = &workload.pod {
                workload.cgroup = Some(pod.cgroup(&self.node.pod_cgroup, driver));
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: Arc<str>,
    pub capture_address: Ipv4Addr,
    pub pod_cgroup: String,
    pub proxy_cgroup: String,
    pub identity: Option<IdentitySpec>,
    pub pin_dir: std::path::PathBuf,
    pub handover_socket: std::path::PathBuf,
    pub host_cgroup_namespace: std::path::PathBuf,
    pub cgroup_driver: super::CgroupDriverSpec,
}

pub use crate::policy::authz::{Policy, PolicySource};

#[derive(Debug, Clone)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `name.namespace.svc.cluster.local`, as Istio's `destination_service`.
    pub hostname: Arc<str>,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    pub load_balancer: crate::policy::balance::Policy,
    pub timeout: Option<std::time::Duration>,
    /// Compiled routes; a service without routes gets the default one.
    /// Shared by every service without routes of its own.
    pub routes: Arc<[crate::policy::routing::Route]>,
    /// (whole service, per source workload) request limits.
    pub rate_limit: (
        Option<crate::policy::ratelimit::Limit>,
        Option<crate::policy::ratelimit::Limit>,
    ),
    pub circuit_breaker: super::CircuitBreakerSpec,
    pub retries: crate::policy::retry::Policy,
    pub outlier: Option<crate::policy::outlier::Settings>,
    pub health_check: Option<crate::policy::health::Check>,
    /// Whether the access log (when configured) has its lines.
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub node: Option<Arc<str>>,
    pub workload: Arc<str>,
    /// The identity a tunnel to this endpoint must prove.
    pub identity: Identity,
    pub labels: Labels,
    /// What metrics say of the endpoint's workload.
    pub reported: Reported,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    /// The workload's cgroup (from the cgroup2 mount's root): as given, or
    /// the kubelet's for `pod` (see [`Config::place_pods`]).
    pub cgroup: Option<String>,
    pub pod: Option<super::PodRef>,
    pub addresses: Vec<Ipv4Addr>,
    /// What metrics say of the workload.
    pub reported: Reported,
    /// Its labels as given (policies select workloads on them).
    pub labels: BTreeMap<String, String>,
    pub identity: Identity,
    /// Ports the node itself may reach in plaintext (kubelet probes).
    pub probe_ports: Vec<u16>,
    /// Its own mTLS mode, when it is not `mesh.mode`.
    pub mtls_mode: Option<MeshMode>,
}

const UNKNOWN: &str = "unknown";

/// What Istio's metrics say of a workload, from its labels the way Istio
/// derives them: `app` and `version` as they are, the canonical service
/// from `service.istio.io/canonical-name`, `app.kubernetes.io/name`,
/// `app`, else the workload's name; the canonical revision from
/// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`,
/// `version`, else `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
}

impl Reported {
    /// What `labels` say; each value made by `intern`, which may share it.
    fn from_labels(
        labels: &super::LabelList,
        workload: &Arc<str>,
        mut intern: impl FnMut(&str) -> Arc<str>,
    ) -> Self {
        let mut first = |keys: &[&str], otherwise: &str| {
            let value = keys.iter().find_map(|k| labels.get(k));
            intern(value.unwrap_or(otherwise))
        };
        Self {
            app: first(&["app"], UNKNOWN),
            version: first(&["version"], UNKNOWN),
            canonical_service: first(
                &[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ],
                workload,
            ),
            canonical_revision: first(
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
                "latest",
            ),
        }
    }

    /// For a peer meshd knows nothing about.
    pub fn unknown() -> Self {
        let unknown: Arc<str> = Arc::from(UNKNOWN);
        Self {
            app: unknown.clone(),
            version: unknown.clone(),
            canonical_service: unknown.clone(),
            canonical_revision: unknown,
        }
    }
}

/// Collects errors against the file they belong to.
struct Checker<'a> {
    sources: &'a [Source],
    errors: Vec<ConfigError>,
    /// Errors beyond the first `MAX_REPORTED`, only counted: locating each
    /// costs a pass over its file, and nobody reads ten thousand.
    more: usize,
    /// Values, label sets and identities met so far: what many endpoints
    /// repeat is kept once (see `Labels`).
    shared: Shared,
}

#[derive(Default)]
struct Shared {
    strings: HashSet<Arc<str>>,
    label_sets: HashMap<super::LabelList, Labels>,
    /// What metrics say of an endpoint's workload, by its shared label set
    /// and name (both kept in this table's neighbours while it lives).
    reported: HashMap<(usize, usize), Reported>,
    identities: HashMap<String, Identity>,
    /// Where an identity's URI is written to be looked up.
    uri: String,
}

/// Errors reported in full; the rest are counted.
const MAX_REPORTED: usize = 50;

fn intern(strings: &mut HashSet<Arc<str>>, value: &str) -> Arc<str> {
    if let Some(shared) = strings.get(value) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(value);
    strings.insert(shared.clone());
    shared
}

impl Checker<'_> {
    fn fail(&mut self, file: usize, field: &FieldPath, message: impl Into<String>) {
        if self.errors.len() >= MAX_REPORTED {
            self.more += 1;
            return;
        }
        let error = self.sources[file].error(field, message);
        self.errors.push(error);
    }

    fn ipv4(&mut self, file: usize, field: &FieldPath, ip: IpAddr) -> Ipv4Addr {
        match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => {
                    self.fail(
                        file,
                        field,
                        format!(
                            "{v6} is IPv6; meshd captures IPv4 only (dual-stack sockets \
                             reaching IPv4 addresses are captured), use an IPv4 address"
                        ),
                    );
                    Ipv4Addr::UNSPECIFIED
                }
            },
        }
    }

    fn dns_label(&mut self, file: usize, field: &FieldPath, value: &str) {
        if !crate::spiffe::is_dns_label(value) {
            self.fail(
                file,
                field,
                format!(
                    "{value:?} is not a DNS label (1-63 lowercase letters, digits or '-', \
                     not starting or ending with '-')"
                ),
            );
        }
    }

    /// The SPIFFE ID of `service_account` in `namespace`. The service
    /// account must be a DNS label (as the namespace and trust domain are
    /// checked to be); anything that does not make a well-formed ID is an
    /// error at `field`, never a panic.
    fn identity(
        &mut self,
        file: usize,
        field: &FieldPath,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Identity {
        self.dns_label(file, field, service_account);
        let uri = &mut self.shared.uri;
        uri.clear();
        std::fmt::Write::write_fmt(
            uri,
            format_args!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
        )
        .expect("writing to a String");
        if let Some(identity) = self.shared.identities.get(uri.as_str()) {
            return identity.clone();
        }
        let uri = uri.clone();
        let identity = Identity::parse(&uri).unwrap_or_else(|_| {
            // Reported above (or at the namespace or trust domain); this
            // config is refused, so the stand-in never serves.
            Identity::parse("spiffe://invalid/ns/invalid/sa/invalid").expect("a well-formed ID")
        });
        self.shared.identities.insert(uri, identity.clone());
        identity
    }

    /// `value`, shared with every equal value interned before.
    fn intern(&mut self, value: &str) -> Arc<str> {
        intern(&mut self.shared.strings, value)
    }

    /// `labels`, shared with every equal set seen before.
    fn labels(&mut self, labels: &super::LabelList) -> Labels {
        if let Some(shared) = self.shared.label_sets.get(labels) {
            return shared.clone();
        }
        let strings = &mut self.shared.strings;
        let set: Labels = labels
            .iter()
            .map(|(k, v)| (intern(strings, k), intern(strings, v)))
            .collect();
        self.shared.label_sets.insert(labels.clone(), set.clone());
        set
    }

    /// What metrics say of a workload with `labels`, its values shared.
    fn reported(&mut self, labels: &super::LabelList, workload: &Arc<str>) -> Reported {
        let strings = &mut self.shared.strings;
        Reported::from_labels(labels, workload, |v| intern(strings, v))
    }

    /// `reported` for an endpoint whose labels were shared as `set` and
    /// whose workload name was interned: endpoints of one workload repeat
    /// both, and derive it once.
    fn endpoint_reported(
        &mut self,
        labels: &super::LabelList,
        set: &Labels,
        workload: &Arc<str>,
    ) -> Reported {
        let key = (set.set_id(), Arc::as_ptr(workload).cast::<()>() as usize);
        if let Some(shared) = self.shared.reported.get(&key) {
            return shared.clone();
        }
        let reported = self.reported(labels, workload);
        self.shared.reported.insert(key, reported.clone());
        reported
    }

    fn cgroup_path(&mut self, file: usize, field: &FieldPath, value: &str) {
        let ok = value.starts_with('/')
            && !value.split('/').any(|part| part == ".." || part == ".")
            && !value.contains('\0');
        if !ok {
            self.fail(
                file,
                field,
                format!(
                    "{value:?} is not a cgroup path: write it absolute from the cgroup2 mount, \
                     e.g. /kubepods.slice, without '.' or '..'"
                ),
            );
        }
    }
}

/// `path` and then each of its ancestors, nearest first (`/a/b/c`,
/// `/a/b`, `/a`), without trailing `/`.
pub fn cgroup_lineage(path: &str) -> impl Iterator<Item = &str> {
    let start = Some(path.trim_end_matches('/')).filter(|p| !p.is_empty());
    std::iter::successors(start, |p| {
        p.rfind('/').filter(|cut| *cut > 0).map(|cut| &p[..cut])
    })
}

/// The field a workload's cgroup comes from: `cgroup`, or `pod`.
fn cgroup_field(at: &FieldPath, workload: &Workload) -> FieldPath {
    at.clone().key(if workload.pod.is_some() {
        "pod"
    } else {
        "cgroup"
    })
}

fn cgroup_clash(cgroup: &str, other: &str, other_cgroup: &str) -> String {
    format!(
        "cgroup {cgroup} is, holds or lies inside workload {other}'s ({other_cgroup}): a process must be one workload"
    )
}

/// Whether cgroup path `inner` is `outer` or lies below it.
fn cgroup_within(inner: &str, outer: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    inner == outer || outer.is_empty() || inner.starts_with(&format!("{outer}/"))
}

/// Keeps the first file's `section`; a second one is an error naming the first.
fn once<T>(
    check: &mut Checker<'_>,
    slot: &mut Option<(usize, T)>,
    file: usize,
    value: Option<T>,
    section: &'static str,
) {
    let Some(value) = value else {
        return;
    };
    match slot {
        Some((first, _)) => {
            let first = check.sources[*first].path.display().to_string();
            check.fail(
                file,
                &FieldPath::default().key(section),
                format!("{section} is already defined in {first}"),
            );
        }
        None => *slot = Some((file, value)),
    }
}

pub(super) fn validate(
    sources: &[Source],
    files: Vec<ConfigFile<ServiceItem>>,
) -> Result<Config, ConfigErrors> {
    let mut check = Checker {
        sources,
        errors: Vec::new(),
        more: 0,
        shared: Shared::default(),
    };
    let root = FieldPath::default();

    // One node section, at most one proxy section.
    let mut node: Option<(usize, NodeSpec)> = None;
    let mut proxy: Option<(usize, ProxySpec)> = None;
    let mut mesh: Option<(usize, MeshSpec)> = None;
    let mut tracing: Option<(usize, super::TracingSpec)> = None;
    let mut access_log: Option<(usize, super::AccessLogSpec)> = None;
    let mut services = Vec::new();
    let mut workloads = Vec::new();
    let mut node_addresses = Vec::new();
    let mut policies = Vec::new();
    for (file, parsed) in files.into_iter().enumerate() {
        once(&mut check, &mut mesh, file, parsed.mesh, "mesh");
        node_addresses.extend(
            parsed
                .nodes
                .into_iter()
                .enumerate()
                .map(|(i, n)| (file, i, n)),
        );
        policies.extend(
            parsed
                .policies
                .into_iter()
                .enumerate()
                .map(|(i, p)| (file, i, p)),
        );
        once(&mut check, &mut node, file, parsed.node, "node");
        once(&mut check, &mut proxy, file, parsed.proxy, "proxy");
        once(&mut check, &mut tracing, file, parsed.tracing, "tracing");
        once(
            &mut check,
            &mut access_log,
            file,
            parsed.access_log,
            "accessLog",
        );
        services.extend(
            parsed
                .services
                .into_iter()
                .enumerate()
                .map(|(i, s)| (file, i, s)),
        );
        workloads.extend(
            parsed
                .workloads
                .into_iter()
                .enumerate()
                .map(|(i, w)| (file, i, w)),
        );
    }

    let node = match node {
        Some((file, spec)) => Some(check_node(&mut check, file, spec)),
        None => {
            let last = sources.len() - 1;
            check.fail(
                last,
                &root.clone().key("node"),
                "no file defines the node section",
            );
            None
        }
    };
    let (proxy_file, proxy) = proxy.unwrap_or((0, ProxySpec::default()));
    if let Some((file, spec)) = &tracing {
        check_tracing(&mut check, *file, spec);
    }
    if let Some((file, spec)) = &access_log {
        check_access_log(&mut check, *file, spec);
    }
    check_proxy(&mut check, proxy_file, &proxy);
    let (mesh_file, mesh) = mesh.unwrap_or((0, MeshSpec::default()));
    check_mesh(&mut check, mesh_file, &mesh);
    let td = mesh.trust_domain.as_str();
    let nodes = check_nodes(&mut check, node_addresses);

    let workloads: Vec<(usize, FieldPath, Workload)> = workloads
        .into_iter()
        .map(|(file, index, spec)| {
            let at = root.clone().key("workloads").index(index);
            check_workload(&mut check, file, &at, spec, node.as_ref(), td)
        })
        .collect();
    let services: Vec<(usize, FieldPath, Arc<Service>)> = services
        .into_iter()
        .map(|(file, index, item)| {
            let at = root.clone().key("services").index(index);
            match item {
                ServiceItem::Spec(spec) => {
                    let (file, at, service) = check_service(&mut check, file, &at, spec, td);
                    (file, at, Arc::new(service))
                }
                // Read from the text the running config's was: the same
                // spec, validated as it was then (the trust domain, all
                // else it depends on, changes only with a restart).
                ServiceItem::Kept(service) => (file, at, service),
            }
        })
        .collect();
    check_uniqueness(&mut check, &services, &workloads);
    check_capture_size(&mut check, &services);
    let policies = policies
        .into_iter()
        .filter_map(|(file, index, spec)| {
            let at = root.clone().key("policies").index(index);
            check_policy(&mut check, file, &at, spec, &services)
        })
        .collect();
    if let Some(node) = &node {
        let uses_tunnels = services
            .iter()
            .flat_map(|(_, _, s)| &s.endpoints)
            .any(|e| e.node.as_ref().is_some_and(|n| *n != node.name));
        let strict = mesh.mode == MeshMode::Strict
            || workloads
                .iter()
                .any(|(_, _, w)| w.mtls_mode == Some(MeshMode::Strict));
        if uses_tunnels && node.identity.is_none() && strict {
            let file = sources.len() - 1;
            check.fail(
                file,
                &root.clone().key("node").key("identity"),
                "strict mode with endpoints on other nodes needs node.identity (certificates or issuer)",
            );
        }
    }

    match (node, check.errors.is_empty()) {
        (Some(node), true) => Ok(Config {
            cluster: mesh.cluster_name.as_str().into(),
            tracing: tracing.map(|(_, t)| t),
            access_log: access_log.map(|(_, a)| a),
            mesh,
            node,
            proxy,
            nodes,
            policies,
            services: services.into_iter().map(|(_, _, s)| s).collect(),
            workloads: workloads.into_iter().map(|(_, _, w)| w).collect(),
        }),
        _ => {
            let mut errors = check.errors;
            if check.more > 0 {
                errors.push(ConfigError::More(check.more));
            }
            Err(ConfigErrors(errors))
        }
    }
}

fn check_node(check: &mut Checker<'_>, file: usize, spec: NodeSpec) -> Node {
    let at = FieldPath::default().key("node");
    if spec.name.is_empty() {
        check.fail(file, &at.clone().key("name"), "must not be empty");
    }
    let capture_address = check.ipv4(
        file,
        &at.clone().key("captureAddress"),
        spec.capture_address,
    );
    if capture_address.is_unspecified() || capture_address.is_broadcast() {
        check.fail(
            file,
            &at.clone().key("captureAddress"),
            "must be an address of this node that pods can reach",
        );
    }
    check.cgroup_path(file, &at.clone().key("podCgroup"), &spec.pod_cgroup);
    check.cgroup_path(file, &at.clone().key("proxyCgroup"), &spec.proxy_cgroup);
    if spec.pod_cgroup == "/" {
        check.fail(
            file,
            &at.clone().key("podCgroup"),
            "the root cgroup would capture the whole host; name the subtree that holds the pods",
        );
    }
    if cgroup_within(&spec.proxy_cgroup, &spec.pod_cgroup) {
        check.fail(
            file,
            &at.clone().key("proxyCgroup"),
            format!(
                "{} lies inside podCgroup {}: meshd must not capture itself",
                spec.proxy_cgroup, spec.pod_cgroup
            ),
        );
    }
    if let Some(identity) = &spec.identity {
        let field = at.clone().key("identity");
        match (&identity.certificates, &identity.issuer) {
            (Some(_), Some(_)) => check.fail(file, &field, "give certificates or issuer, not both"),
            (None, None) => check.fail(
                file,
                &field,
                "needs certificates (a directory) or issuer (a CA directory)",
            ),
            (Some(_), None) if identity.trust_bundle.is_none() => check.fail(
                file,
                &field.clone().key("trustBundle"),
                "certificate directories need a trust bundle (the roots this node trusts, PEM): \
                 a directory's own ca.crt is never trusted mesh-wide",
            ),
            _ => {}
        }
        if identity.ttl < std::time::Duration::from_secs(10) {
            check.fail(file, &field.clone().key("ttl"), "must be at least 10s");
        }
    }
    let pin_dir = spec
        .pin_dir
        .unwrap_or_else(|| std::path::Path::new("/sys/fs/bpf/meshd").join(&spec.name));
    if !pin_dir.is_absolute() {
        check.fail(file, &at.clone().key("pinDir"), "must be an absolute path");
    }
    let handover_socket = spec
        .handover_socket
        .unwrap_or_else(|| std::path::Path::new("/run/meshd").join(format!("{}.sock", spec.name)));
    Node {
        host_cgroup_namespace: spec
            .host_cgroup_namespace
            .unwrap_or_else(|| std::path::PathBuf::from("/proc/1/ns/cgroup")),
        handover_socket,
        pin_dir,
        name: spec.name.into(),
        capture_address,
        pod_cgroup: spec.pod_cgroup,
        proxy_cgroup: spec.proxy_cgroup,
        identity: spec.identity,
        cgroup_driver: spec.cgroup_driver,
    }
}

/// Refuses more captured destinations (VIP ports and endpoint target
/// ports) than the kernel's map holds: the rest would silently go
/// uncaptured.
fn check_capture_size(check: &mut Checker<'_>, services: &[(usize, FieldPath, Arc<Service>)]) {
    let mut destinations = HashSet::new();
    for (_, _, service) in services {
        for port in &service.ports {
            destinations.insert((service.vip, port.port));
            for endpoint in &service.endpoints {
                destinations.insert((endpoint.address, port.target_port));
            }
        }
    }
    let capacity = meshd_common::DESTINATIONS_CAPACITY as usize;
    if let Some((file, at, _)) = services.last().filter(|_| destinations.len() > capacity) {
        check.fail(
            *file,
            at,
            format!(
                "the services capture {} destinations (VIP ports and endpoint target ports); \
                 the kernel's map holds {capacity}",
                destinations.len()
            ),
        );
    }
}

fn check_tracing(check: &mut Checker<'_>, file: usize, spec: &super::TracingSpec) {
    let at = FieldPath::default().key("tracing");
    let endpoint = spec.endpoint.parse::<hyper::Uri>();
    let usable = endpoint
        .as_ref()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    if !usable {
        check.fail(
            file,
            &at.clone().key("endpoint"),
            format!(
                "{:?} is not a collector URL (http://host:port)",
                spec.endpoint
            ),
        );
    }
    if !(0.0..=1.0).contains(&spec.sampling) {
        check.fail(
            file,
            &at.clone().key("sampling"),
            format!("{} is not a fraction between 0 and 1", spec.sampling),
        );
    }
    if spec.max_queue == 0 || spec.max_queue > 1_000_000 {
        check.fail(file, &at.clone().key("maxQueue"), "must be 1 to 1000000");
    }
    if spec.max_batch == 0 || spec.max_batch > spec.max_queue {
        check.fail(file, &at.clone().key("maxBatch"), "must be 1 to maxQueue");
    }
    if spec.export_timeout.is_zero() {
        check.fail(file, &at.key("exportTimeout"), "must be more than 0s");
    }
}

fn check_access_log(check: &mut Checker<'_>, file: usize, spec: &super::AccessLogSpec) {
    let at = FieldPath::default().key("accessLog");
    if !spec.path.is_absolute() {
        check.fail(
            file,
            &at.clone().key("path"),
            format!("{:?} is not an absolute path", spec.path),
        );
    }
    if spec.max_queue == 0 || spec.max_queue > 1_000_000 {
        check.fail(file, &at.key("maxQueue"), "must be 1 to 1000000");
    }
}

fn check_mesh(check: &mut Checker<'_>, file: usize, spec: &MeshSpec) {
    let cluster = &spec.cluster_name;
    let label_value = !cluster.is_empty()
        && cluster.len() <= 63
        && cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if !label_value {
        check.fail(
            file,
            &FieldPath::default().key("mesh").key("clusterName"),
            format!("{cluster:?} is not a cluster name (1 to 63 letters, digits, '-', '.', '_')"),
        );
    }
    let td = &spec.trust_domain;
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !ok {
        check.fail(
            file,
            &FieldPath::default().key("mesh").key("trustDomain"),
            format!(
                "{td:?} is not a SPIFFE trust domain (lowercase letters, digits, '-', '.', '_')"
            ),
        );
    }
}

fn check_nodes(
    check: &mut Checker<'_>,
    specs: Vec<(usize, usize, super::NodeAddressSpec)>,
) -> HashMap<Arc<str>, Ipv4Addr> {
    let mut nodes = HashMap::new();
    for (file, index, spec) in specs {
        let at = FieldPath::default().key("nodes").index(index);
        let address = check.ipv4(file, &at.clone().key("address"), spec.address);
        if nodes
            .insert(Arc::from(spec.name.as_str()), address)
            .is_some()
        {
            check.fail(
                file,
                &at.key("name"),
                format!("node {} is listed twice", spec.name),
            );
        }
    }
    nodes
}

fn check_policy(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: PolicySpec,
    services: &[(usize, FieldPath, Arc<Service>)],
) -> Option<Policy> {
    let target = policy_target(check, file, at, &spec.target, services)?;
    for (i, source) in spec.from.iter().enumerate() {
        for (j, principal) in source.principals.iter().enumerate() {
            let valid =
                principal == "*" || Identity::parse(&format!("spiffe://{principal}")).is_ok();
            if !valid {
                check.fail(
                    file,
                    &at.clone().key("from").index(i).key("principals").index(j),
                    format!("{principal:?} is not <trust-domain>/ns/<namespace>/sa/<service-account> or *"),
                );
            }
        }
    }
    let mut methods = Vec::new();
    for (i, method) in spec.methods.iter().enumerate() {
        match hyper::Method::from_bytes(method.as_bytes()) {
            Ok(m) if method.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(m),
            _ => check.fail(
                file,
                &at.clone().key("methods").index(i),
                format!("{method:?} is not an HTTP method (upper case, e.g. GET)"),
            ),
        }
    }
    for (i, path) in spec.paths.iter().enumerate() {
        let stars = path.matches('*').count();
        let valid = path == "*"
            || (stars == 0 && path.starts_with('/'))
            || (stars == 1
                && (path.ends_with("/*") && path.starts_with('/') || path.starts_with('*')));
        if !valid {
            check.fail(
                file,
                &at.clone().key("paths").index(i),
                format!(
                    "{path:?} must be an exact path (/a/b), a prefix (/a/*) or a suffix (*.json)"
                ),
            );
        }
    }
    let mut headers = Vec::new();
    for (name, value) in &spec.headers {
        match hyper::header::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(header) => headers.push((header, value.clone())),
            Err(_) => check.fail(
                file,
                &at.clone().key("headers"),
                format!("{name:?} is not a header name"),
            ),
        }
    }
    Some(Policy {
        methods,
        paths: spec.paths,
        headers,
        name: spec.name.into(),
        target,
        nothing: spec.matches_nothing,
        action: spec.action,
        from: spec
            .from
            .into_iter()
            .map(|f| PolicySource {
                principals: f.principals,
                namespaces: f.namespaces,
            })
            .collect(),
        ports: spec.ports,
    })
}

/// A policy's `target`: a service's endpoints, or workloads by namespace
/// and labels.
fn policy_target(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: &crate::config::PolicyTarget,
    services: &[(usize, FieldPath, Arc<Service>)],
) -> Option<crate::policy::authz::Target> {
    use crate::policy::authz::Target;
    let at = at.clone().key("target");
    match (&spec.service, &spec.namespace) {
        (Some(service), None) if spec.selector.is_empty() => {
            let Some((namespace, name)) = service.split_once('/') else {
                check.fail(
                    file,
                    &at.key("service"),
                    format!("{service:?} must be namespace/name"),
                );
                return None;
            };
            let Some(index) = services
                .iter()
                .position(|(_, _, s)| &*s.namespace == namespace && &*s.name == name)
            else {
                check.fail(
                    file,
                    &at.key("service"),
                    format!("no service {namespace}/{name}"),
                );
                return None;
            };
            Some(Target::Service(index))
        }
        (None, Some(namespace)) => {
            let namespace = match namespace.as_str() {
                "*" => None,
                ns if crate::spiffe::is_dns_label(ns) => Some(ns.into()),
                ns => {
                    check.fail(
                        file,
                        &at.key("namespace"),
                        format!("{ns:?} is neither a namespace nor *"),
                    );
                    return None;
                }
            };
            Some(Target::Workloads {
                namespace,
                selector: spec
                    .selector
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        }
        _ => {
            check.fail(
                file,
                &at,
                "give either service (namespace/name) or namespace (with an optional selector)",
            );
            None
        }
    }
}

/// The most `proxy.workerThreads`: more threads than any node has CPUs
/// only add context switches.
const MAX_WORKER_THREADS: usize = 256;

/// The shortest `proxy.failTimeout`: two and a half heartbeats.
const MIN_FAIL_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

fn check_proxy(check: &mut Checker<'_>, file: usize, spec: &ProxySpec) {
    let at = FieldPath::default().key("proxy");
    if spec.outbound_port == 0 {
        check.fail(file, &at.clone().key("outboundPort"), "must not be 0");
    }
    if !(1024..=1024 * 1024).contains(&spec.buffer_size) {
        check.fail(
            file,
            &at.clone().key("bufferSize"),
            format!("{} is outside 1024..=1048576 bytes", spec.buffer_size),
        );
    }
    if let Some(threads) = spec.worker_threads {
        if !(1..=MAX_WORKER_THREADS).contains(&threads) {
            check.fail(
                file,
                &at.clone().key("workerThreads"),
                format!("{threads} is outside 1..={MAX_WORKER_THREADS}"),
            );
        }
    }
    if spec.fail_timeout < MIN_FAIL_TIMEOUT {
        check.fail(
            file,
            &at.clone().key("failTimeout"),
            format!(
                "{:?} is under {MIN_FAIL_TIMEOUT:?}: meshd beats every 200 ms, so a shorter \
                 timeout flaps into failMode while meshd is fine (and 0 would never fail open)",
                spec.fail_timeout
            ),
        );
    }
    let timeouts = [
        ("connectTimeout", spec.connect_timeout),
        ("headerReadTimeout", spec.header_read_timeout),
        ("idleTimeout", spec.idle_timeout),
        ("handshakeTimeout", spec.handshake_timeout),
    ];
    for (name, timeout) in timeouts {
        if timeout.is_zero() {
            check.fail(file, &at.clone().key(name), "must be more than 0");
        }
    }
    if spec.max_series_per_metric == 0 {
        check.fail(
            file,
            &at.clone().key("maxSeriesPerMetric"),
            "must be at least 1",
        );
    }
    if spec.max_handshakes == 0 {
        check.fail(file, &at.clone().key("maxHandshakes"), "must be at least 1");
    }
    for (name, limit) in spec.connection_limits.each() {
        let field = at.clone().key("connectionLimits").key(name);
        if limit.max == 0 || limit.per_source == 0 {
            check.fail(file, &field, "max and perSource must be at least 1");
        } else if limit.per_source > limit.max {
            check.fail(
                file,
                &field.key("perSource"),
                format!("{} is more than max ({})", limit.per_source, limit.max),
            );
        }
    }
    let ports = [
        ("outboundPort", spec.outbound_port),
        ("metricsAddress", spec.metrics_address.port()),
        ("readinessAddress", spec.readiness_address.port()),
    ];
    for (i, (name, port)) in ports.iter().enumerate() {
        if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
            check.fail(
                file,
                &at.clone().key(name),
                format!("port {port} is already used by {other}"),
            );
        }
    }
}

fn check_workload(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: super::WorkloadSpec,
    node: Option<&Node>,
    trust_domain: &str,
) -> (usize, FieldPath, Workload) {
    check.dns_label(file, &at.clone().key("namespace"), &spec.namespace);
    if spec.name.is_empty() {
        check.fail(file, &at.clone().key("name"), "must not be empty");
    }
    if let Some(cgroup) = &spec.cgroup {
        let field = at.clone().key("cgroup");
        check.cgroup_path(file, &field, cgroup);
        if let Some(node) = node {
            // A process is the workload whose cgroup holds it: a cgroup
            // above the pods' own would make every pod below it this one.
            if cgroup.trim_end_matches('/') == node.pod_cgroup.trim_end_matches('/') {
                check.fail(
                    file,
                    &field,
                    "is node.podCgroup itself: every pod on the node would be this workload; name the pod's own cgroup",
                );
            }
            let last = cgroup
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("");
            if super::kubelet::is_qos_cgroup(last) {
                check.fail(
                    file,
                    &field,
                    format!("{cgroup} is a kubelet QoS cgroup: every pod of that class would be this workload; name the pod's own cgroup (or give `pod`)"),
                );
            }
            if !cgroup_within(cgroup, &node.pod_cgroup) {
                check.fail(
                    file,
                    &field,
                    format!(
                        "{cgroup} is outside node.podCgroup {}: its connections would not be captured",
                        node.pod_cgroup
                    ),
                );
            }
        }
    }
    if let Some(pod) = &spec.pod {
        let field = at.clone().key("pod");
        if spec.cgroup.is_some() {
            check.fail(file, &field, "give cgroup or pod, not both");
        }
        if !pod.uid_is_valid() {
            check.fail(
                file,
                &field.key("uid"),
                format!(
                    "{:?} is not a pod UID (letters, digits and '-', at most 64)",
                    pod.uid
                ),
            );
        }
    }
    if spec.cgroup.is_none() && spec.pod.is_none() && spec.addresses.is_empty() {
        check.fail(
            file,
            at,
            "needs a cgroup, a pod or at least one address, or meshd cannot recognise its connections",
        );
    }
    let addresses = spec
        .addresses
        .iter()
        .enumerate()
        .map(|(i, ip)| check.ipv4(file, &at.clone().key("addresses").index(i), *ip))
        .collect();
    let identity = check.identity(
        file,
        &at.clone().key("serviceAccount"),
        trust_domain,
        &spec.namespace,
        &spec.service_account,
    );
    let name: Arc<str> = spec.name.as_str().into();
    let workload = Workload {
        identity,
        reported: check.reported(&spec.labels, &name),
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        name,
        namespace: spec.namespace.as_str().into(),
        service_account: spec.service_account.as_str().into(),
        cgroup: match (&spec.pod, node) {
            (Some(pod), Some(node)) if spec.cgroup.is_none() => Some(
                pod.cgroup(
                    &node.pod_cgroup,
                    node.cgroup_driver
                        .decided()
                        .unwrap_or_else(|| super::CgroupDriver::guess(&node.pod_cgroup)),
                ),
            ),
            _ => spec.cgroup.map(|c| c.trim_end_matches('/').to_owned()),
        },
        pod: spec.pod,
        addresses,
        probe_ports: spec.probe_ports,
        mtls_mode: spec.mtls_mode,
    };
    (file, at.clone(), workload)
}

/// Names and addresses that must be unique across all files.
fn check_uniqueness(
    check: &mut Checker<'_>,
    services: &[(usize, FieldPath, Arc<Service>)],
    workloads: &[(usize, FieldPath, Workload)],
) {
    let mut names = HashSet::new();
    let mut vips: HashMap<Ipv4Addr, &str> = HashMap::new();
    for (file, at, service) in services {
        if !names.insert((service.namespace.clone(), service.name.clone())) {
            check.fail(
                *file,
                &at.clone().key("name"),
                format!(
                    "service {}/{} is defined twice",
                    service.namespace, service.name
                ),
            );
        }
        if let Some(other) = vips.insert(service.vip, &service.name) {
            check.fail(
                *file,
                &at.clone().key("vip"),
                format!("{} is already the VIP of service {other}", service.vip),
            );
        }
    }
    let mut workload_names = HashSet::new();
    let mut owners: HashMap<Ipv4Addr, &str> = HashMap::new();
    // One process, one workload: no two cgroups equal or nested. Each
    // clash is reported at the later (equal) or the inner (nested) one.
    let mut cgroups: HashMap<&str, &str> = HashMap::new();
    for (file, at, workload) in workloads {
        let Some(cgroup) = workload.cgroup.as_deref() else {
            continue;
        };
        if let Some(other) = cgroups.insert(cgroup, &workload.name) {
            cgroups.insert(cgroup, other);
            check.fail(
                *file,
                &cgroup_field(at, workload),
                cgroup_clash(cgroup, other, cgroup),
            );
        }
    }
    for (file, at, workload) in workloads {
        let Some(cgroup) = workload.cgroup.as_deref() else {
            continue;
        };
        let outer = cgroup_lineage(cgroup)
            .skip(1)
            .find_map(|c| Some((c, *cgroups.get(c)?)));
        if let Some((outer, other)) = outer {
            check.fail(
                *file,
                &cgroup_field(at, workload),
                cgroup_clash(cgroup, other, outer),
            );
        }
    }
    for (file, at, workload) in workloads {
        if !workload_names.insert((workload.namespace.clone(), workload.name.clone())) {
            check.fail(
                *file,
                &at.clone().key("name"),
                format!(
                    "workload {}/{} is defined twice",
                    workload.namespace, workload.name
                ),
            );
        }
        for (i, address) in workload.addresses.iter().enumerate() {
            let field = at.clone().key("addresses").index(i);
            if let Some(other) = owners.insert(*address, &workload.name) {
                check.fail(
                    *file,
                    &field,
                    format!("{address} already belongs to workload {other}"),
                );
            }
            if let Some(service) = vips.get(address) {
                check.fail(
                    *file,
                    &field,
                    format!("{address} is the VIP of service {service}"),
                );
            }
        }
    }
    for (file, at, service) in services {
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            if let Some(other) = vips.get(&endpoint.address) {
                check.fail(
                    *file,
                    &at.clone().key("endpoints").index(i).key("address"),
                    format!("{} is the VIP of service {other}", endpoint.address),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::load_str;

    const NODE: &str = "\
node:
  name: node-a
  captureAddress: 10.77.0.1
  podCgroup: /pods
  proxyCgroup: /meshd
";

    fn errors(yaml: &str) -> String {
        match load_str("mesh.yaml", yaml) {
            Ok(_) => panic!("expected an error for:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_policy_targets_a_service_or_workloads_by_namespace_and_labels() {
        use crate::policy::authz::Target;
        let config = load_str(
            "mesh.yaml",
            &format!(
                "{NODE}services:\n  - {{ name: web, vip: 10.96.0.9, ports: [{{ port: 80 }}] }}\npolicies:\n  - {{ name: a, target: {{ service: default/web }}, action: deny }}\n  - {{ name: b, target: {{ namespace: shop, selector: {{ app: reviews }} }}, action: allow }}\n  - {{ name: c, target: {{ namespace: '*' }}, action: deny }}\n"
            ),
        )
        .expect("valid");
        let targets: Vec<_> = config.policies.iter().map(|p| p.target.clone()).collect();
        assert_eq!(
            targets,
            [
                Target::Service(0),
                Target::Workloads {
                    namespace: Some("shop".into()),
                    selector: vec![("app".into(), "reviews".into())]
                },
                Target::Workloads {
                    namespace: None,
                    selector: vec![]
                },
            ]
        );
        for target in [
            "{}",
            "{ service: default/web, namespace: shop }",
            "{ service: default/web, selector: { app: x } }",
            "{ selector: { app: x } }",
            "{ namespace: 'Not/A/Label' }",
        ] {
            let text = errors(&format!(
                "{NODE}services:\n  - {{ name: web, vip: 10.96.0.9, ports: [{{ port: 80 }}] }}\npolicies:\n  - {{ name: a, target: {target}, action: deny }}\n"
            ));
            assert!(
                text.contains("mesh.yaml:9: policies[0].target"),
                "{target}: {text}"
            );
        }
    }

    #[test]
    fn endpoints_share_equal_label_sets_values_and_identities() {
        let config = load_str(
            "mesh.yaml",
            &format!(
                "{NODE}services:\n  - {{ name: a, vip: 10.96.0.9, ports: [{{ port: 80 }}], endpoints: [{{ address: 10.1.0.1, labels: {{ version: v1, app: a }} }}, {{ address: 10.1.0.2, labels: {{ app: a, version: v1 }} }}, {{ address: 10.1.0.3, labels: {{ version: v2 }} }}] }}\n  - {{ name: b, vip: 10.96.0.10, ports: [{{ port: 80 }}], endpoints: [{{ address: 10.1.0.4, labels: {{ app: a, version: v1 }} }}] }}\n"
            ),
        )
        .expect("valid");
        let endpoints: Vec<_> = config.services.iter().flat_map(|s| &s.endpoints).collect();
        let labels = |i: usize| &endpoints[i].labels;
        assert_eq!(labels(0).get("version"), Some("v1"));
        assert_eq!(labels(0).get("app"), Some("a"));
        assert_eq!(labels(0).get("zone"), None);
        assert_eq!(labels(2).get("version"), Some("v2"));
        assert_eq!(labels(2).get("app"), None);
        // One set for the three endpoints that have it, in both services.
        assert!(labels(0).same_set(labels(1)));
        assert!(labels(0).same_set(labels(3)));
        assert!(!labels(0).same_set(labels(2)));
        // What metrics say of them is read off the labels, values shared.
        let reported = |i: usize| &endpoints[i].reported;
        assert_eq!(&*reported(0).version, "v1");
        assert_eq!(&*reported(2).app, "unknown");
        assert_eq!(&*reported(2).canonical_revision, "v2");
        assert!(std::sync::Arc::ptr_eq(&reported(0).app, &reported(3).app));
        let version = labels(1)
            .iter()
            .find(|(k, _)| &***k == "version")
            .unwrap()
            .1;
        assert!(std::sync::Arc::ptr_eq(&reported(0).version, version));
        assert_eq!(endpoints[0].identity, endpoints[3].identity);
    }

    #[test]
    fn minimal_config_is_valid() {
        let config = load_str("mesh.yaml", NODE).expect("valid");
        assert_eq!(&*config.node.name, "node-a");
        assert_eq!(config.proxy.outbound_port, 15001);
        assert!(!config.proxy.sk_msg);
    }

    #[test]
    fn access_log_settings_are_checked_with_their_lines() {
        let config = load_str(
            "mesh.yaml",
            &format!("{NODE}accessLog: {{ format: text }}\nservices:\n  - {{ name: quiet, vip: 10.96.0.9, ports: [{{ port: 80 }}], accessLog: false }}\n"),
        )
        .expect("valid");
        let log = config.access_log.expect("accessLog");
        assert_eq!(log.format, crate::config::AccessLogFormat::Text);
        assert_eq!(log.path, std::path::Path::new("/dev/stdout"));
        assert!(!config.services[0].access_log);
        let text = errors(&format!(
            "{NODE}accessLog:\n  path: relative/log\n  maxQueue: 0\n"
        ));
        for want in [
            "mesh.yaml:7: accessLog.path",
            "mesh.yaml:8: accessLog.maxQueue",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(errors(&format!("{NODE}accessLog: {{ format: xml }}\n")).contains("format"));
    }

    #[test]
    fn tracing_settings_are_checked_with_their_lines() {
        let config = load_str(
            "mesh.yaml",
            &format!("{NODE}tracing: {{ endpoint: 'http://10.0.0.9:4318', protocol: http }}\n"),
        )
        .expect("valid");
        let tracing = config.tracing.expect("tracing");
        assert_eq!(tracing.protocol, crate::config::OtlpProtocol::Http);
        assert_eq!((tracing.sampling, tracing.max_queue), (0.01, 2048));
        let text = errors(&format!(
            "{NODE}tracing:\n  endpoint: collector\n  sampling: 2\n  maxQueue: 4\n  maxBatch: 8\n"
        ));
        for want in [
            "mesh.yaml:7: tracing.endpoint",
            "mesh.yaml:8: tracing.sampling",
            "mesh.yaml:10: tracing.maxBatch",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }

    #[test]
    fn canonical_names_are_derived_as_istio_does() {
        let config = load_str(
            "mesh.yaml",
            &format!(
                "{NODE}mesh: {{ clusterName: east-1 }}
workloads:
  - {{ name: a-7f9, addresses: [10.77.0.5] }}
  - name: b-1
    addresses: [10.77.0.6]
    labels: {{ app: b, version: v2 }}
  - name: c-1
    addresses: [10.77.0.7]
    labels:
      app: c
      app.kubernetes.io/name: c-kube
      app.kubernetes.io/version: '3.1'
      version: v1
  - name: d-1
    addresses: [10.77.0.8]
    labels:
      app.kubernetes.io/name: d-kube
      service.istio.io/canonical-name: d-canon
      service.istio.io/canonical-revision: r9
"
            ),
        )
        .expect("valid");
        assert_eq!(&*config.cluster, "east-1");
        let got: Vec<[&str; 4]> = config
            .workloads
            .iter()
            .map(|w| {
                let r = &w.reported;
                [
                    &*r.app,
                    &*r.version,
                    &*r.canonical_service,
                    &*r.canonical_revision,
                ]
            })
            .collect();
        assert_eq!(
            got,
            [
                ["unknown", "unknown", "a-7f9", "latest"],
                ["b", "v2", "b", "v2"],
                ["c", "v1", "c-kube", "3.1"],
                ["unknown", "unknown", "d-canon", "r9"],
            ]
        );
        let default = load_str("mesh.yaml", NODE).expect("valid");
        assert_eq!(&*default.cluster, "Kubernetes");
        let text = errors(&format!("{NODE}mesh: {{ clusterName: \"a b\" }}\n"));
        assert!(text.contains("mesh.yaml:6: mesh.clusterName"), "{text}");
    }

    #[test]
    fn connection_limits_and_timeouts_are_checked() {
        let text = errors(&format!(
            "{NODE}proxy:
  idleTimeout: 0s
  maxHandshakes: 0
  connectionLimits:
    outbound: {{ max: 10, perSource: 20 }}
    admin: {{ max: 0, perSource: 0 }}
  workerThreads: 0
"
        ));
        for expected in [
            "mesh.yaml:7: proxy.idleTimeout: must be more than 0",
            "mesh.yaml:8: proxy.maxHandshakes: must be at least 1",
            "mesh.yaml:10: proxy.connectionLimits.outbound.perSource: 20 is more than max (10)",
            "mesh.yaml:11: proxy.connectionLimits.admin: max and perSource must be at least 1",
            "mesh.yaml:12: proxy.workerThreads: 0 is outside 1..=256",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let config = load_str("mesh.yaml", NODE).expect("valid");
        assert_eq!(config.proxy.connection_limits.outbound.max, 16384);
        assert_eq!(config.proxy.max_handshakes, 64);
    }

    #[test]
    fn full_service_is_typed() {
        let yaml = format!(
            "{NODE}services:
  - name: reviews
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 9080 }}]
    endpoints:
      - {{ address: 10.77.0.7, node: node-a, workload: reviews-v1 }}
"
        );
        let config = load_str("mesh.yaml", &yaml).expect("valid");
        let service = &config.services[0];
        assert_eq!(&*service.hostname, "reviews.default.svc.cluster.local");
        assert_eq!(service.ports[0].target_port, 9080);
        assert_eq!(&*service.endpoints[0].workload, "reviews-v1");
    }

    #[test]
    fn rejections_name_file_line_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 80, protocol: smtp }]\n",
                "mesh.yaml:9: services[0].ports[0].protocol: unknown variant `smtp`",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 80 }]\n    routes: [{ match: { path: { regex: \"([\" } }, to: [{ weight: 1 }] }]\n",
                "mesh.yaml:10: services[0].routes[0].match.path.regex: invalid regex",
            ),
            (
                "services:\n  - name: a\n    vip: fd00::1\n    ports: [{ port: 80 }]\n",
                "mesh.yaml:8: services[0].vip: fd00::1 is IPv6",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: []\n",
                "mesh.yaml:9: services[0].ports: a service needs at least one port",
            ),
            (
                "services:\n  - name: Bad_Name\n    vip: 10.96.0.1\n    ports: [{ port: 1 }]\n",
                "mesh.yaml:7: services[0].name: \"Bad_Name\" is not a DNS label",
            ),
            (
                "services:\n  - { name: a, vip: 10.96.0.1, ports: [{ port: 1 }] }\n  - { name: b, vip: 10.96.0.1, ports: [{ port: 1 }] }\n",
                "mesh.yaml:8: services[1].vip: 10.96.0.1 is already the VIP of service a",
            ),
            (
                "workloads:\n  - { name: w, cgroup: /elsewhere/w }\n",
                "mesh.yaml:7: workloads[0].cgroup: /elsewhere/w is outside node.podCgroup /pods",
            ),
            (
                "workloads:\n  - { name: w }\n",
                "mesh.yaml:7: workloads[0]: needs a cgroup, a pod or at least one address",
            ),
            (
                "workloads:\n  - { name: w, pod: { uid: ../../x, qosClass: Burstable } }\n",
                "mesh.yaml:7: workloads[0].pod.uid: \"../../x\" is not a pod UID",
            ),
            (
                "workloads:\n  - { name: w, cgroup: /pods/w, pod: { uid: a1, qosClass: Burstable } }\n",
                "mesh.yaml:7: workloads[0].pod: give cgroup or pod, not both",
            ),
            (
                "workloads:\n  - { name: w, cgroup: /pods/ }\n",
                "mesh.yaml:7: workloads[0].cgroup: is node.podCgroup itself",
            ),
            (
                "workloads:\n  - { name: w, cgroup: /pods/kubepods-burstable.slice }\n",
                "mesh.yaml:7: workloads[0].cgroup: /pods/kubepods-burstable.slice is a kubelet QoS cgroup",
            ),
            (
                "workloads:\n  - { name: w, cgroup: /pods/w }\n  - { name: v, cgroup: /pods/w/c }\n",
                "mesh.yaml:8: workloads[1].cgroup: cgroup /pods/w/c is, holds or lies inside workload w's (/pods/w)",
            ),
            (
                "workloads:\n  - { name: w, pod: { uid: a1, qosClass: Burstable } }\n  - { name: v, pod: { uid: a1, qosClass: Burstable } }\n",
                "mesh.yaml:8: workloads[1].pod: cgroup /pods/burstable/poda1 is, holds or lies inside workload w's",
            ),
            (
                "workloads:\n  - { name: w, pod: { uid: a1, qosClass: Bursty } }\n",
                "mesh.yaml:7: workloads[0].pod.qosClass: unknown variant `Bursty`",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 99999 }]\n",
                "mesh.yaml:9: services[0].ports[0].port: invalid value: integer `99999`",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    prots: []\n",
                "mesh.yaml:9: services[0]: unknown field `prots`",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 1 }]\n    retries: { retryOn: [5xx, flaky] }\n",
                "mesh.yaml:10: services[0].retries.retryOn[1]: unknown condition \"flaky\"; use one of 5xx, gateway-error",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 1 }]\n    retries: { backoffBase: 1s, backoffMax: 10ms }\n",
                "mesh.yaml:10: services[0].retries.backoffMax: must not be less than backoffBase",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 1 }]\n    outlierDetection: { maxEjectionPercent: 150 }\n",
                "mesh.yaml:10: services[0].outlierDetection.maxEjectionPercent: must be 0 to 100",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 1 }]\n    healthCheck: { protocol: http, path: healthz }\n",
                "mesh.yaml:10: services[0].healthCheck.path: must start with /",
            ),
            (
                "services:\n  - name: a\n    vip: 10.96.0.1\n    ports: [{ port: 1 }]\n    circuitBreaker: { maxPendingRequests: 0 }\n",
                "mesh.yaml:10: services[0].circuitBreaker: limits must be at least 1",
            ),
            (
                "services:\n  - { name: a, vip: 10.96.0.1, ports: [{ port: 1 }] }\npolicies:\n  - { name: p, target: { service: default/a }, action: allow, methods: [get] }\n",
                "mesh.yaml:9: policies[0].methods[0]: \"get\" is not an HTTP method",
            ),
            (
                "services:\n  - { name: a, vip: 10.96.0.1, ports: [{ port: 1 }] }\npolicies:\n  - { name: p, target: { service: default/a }, action: allow, paths: [/a/*/b] }\n",
                "mesh.yaml:9: policies[0].paths[0]: \"/a/*/b\" must be an exact path",
            ),
        ];
        for (tail, want) in cases {
            let got = errors(&format!("{NODE}{tail}"));
            assert!(
                got.starts_with(want),
                "for\n{tail}\nwant prefix: {want}\ngot: {got}"
            );
        }
    }

    #[test]
    fn missing_node_and_self_capture_are_refused() {
        assert!(errors("services: []\n").contains("no file defines the node section"));
        let inside = NODE.replace("proxyCgroup: /meshd", "proxyCgroup: /pods/meshd");
        assert!(errors(&inside).contains("meshd must not capture itself"));
        let root = NODE.replace("podCgroup: /pods", "podCgroup: /");
        assert!(errors(&root).contains("the root cgroup would capture the whole host"));
    }

    #[test]
    fn every_problem_is_reported() {
        let yaml = format!(
            "{NODE}services:\n  - {{ name: a, vip: 0.0.0.0, ports: [] }}\n  - {{ name: a, vip: 10.96.0.2, ports: [{{ port: 0 }}] }}\n"
        );
        let got = errors(&yaml);
        assert_eq!(got.lines().count(), 4, "{got}");
    }
}
