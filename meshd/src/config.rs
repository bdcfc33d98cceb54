//! meshd's configuration: the YAML schema, loading one or more files, and
//! the validated `Config` the rest of meshd reads.
//!
//! Files are merged: the mesh-wide file (services, e.g. from a ConfigMap) and
//! the node file (this node, its workloads, proxy settings) may be separate or
//! one. `node` must appear exactly once across files and `proxy` at most once;
//! `services` and `workloads` lists are concatenated. Every error names the
//! file, the line and the field.

mod kubelet;
mod locate;
pub mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

pub use crate::policy::routing::Labels;
pub use kubelet::{CgroupDriver, CgroupDriverSpec, PodRef, QosClass};
pub use locate::FieldPath;
pub use validate::{Config, Endpoint, Reported, Service, ServicePort, Workload};

/// Largest config file meshd reads; bigger files are refused unread.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

// === errors ===

/// A configuration problem, located as precisely as meshd can.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: file is {size} bytes, more than the {MAX_FILE_BYTES} meshd accepts")]
    TooLarge { file: PathBuf, size: u64 },
    #[error("{}", render_invalid(.file, .line, .field, .message))]
    Invalid {
        file: PathBuf,
        line: Option<usize>,
        field: String,
        message: String,
    },
    #[error("no config file given")]
    NoFiles,
    #[error("… and {0} more problems")]
    More(usize),
}

/// Deepest nesting of flow collections (`[…]`, `{…}`) a config may have.
pub const MAX_NESTING: usize = 64;

/// The 1-based line where flow collections first nest deeper than `limit`
/// (quotes and comments respected), if they do.
fn too_deep(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let (mut single, mut double, mut comment) = (false, false, false);
    let mut previous = b'\n';
    // Bytes, not chars: every byte it looks for is ASCII, which UTF-8 never
    // uses inside another character.
    for &c in text.as_bytes() {
        match c {
            b'\n' => {
                line += 1;
                comment = false;
            }
            _ if comment => {}
            b'\'' if !double => single = !single,
            b'"' if !single && previous != b'\\' => double = !double,
            b'#' if !single && !double && previous.is_ascii_whitespace() => comment = true,
            b'[' | b'{' if !single && !double => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
            }
            b']' | b'}' if !single && !double => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
    }
    None
}

fn render_invalid(file: &Path, line: &Option<usize>, field: &str, message: &str) -> String {
    let place = match line {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    };
    if field.is_empty() {
        format!("{place}: {message}")
    } else {
        format!("{place}: {field}: {message}")
    }
}

/// The result of checking a set of files: every problem found, in file order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === schema ===

/// One config file as written. Every section is optional in a single file;
/// the merged set must hold exactly one `node`. Its services are specs as
/// written (`S`), or their JSON texts, or `ServiceItem`s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "S: Deserialize<'de>"))]
pub struct ConfigFile<S = ServiceSpec> {
    /// Snapshot-wide settings: trust domain and mTLS mode.
    pub mesh: Option<MeshSpec>,
    /// Every node of the mesh and where its meshd accepts tunnels.
    #[serde(default)]
    pub nodes: Vec<NodeAddressSpec>,
    /// Authorization policies, evaluated where the destination runs.
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
    /// This node: its name, where pods reach meshd, and the cgroups involved.
    pub node: Option<NodeSpec>,
    /// Proxy tuning; every field has a default.
    pub proxy: Option<ProxySpec>,
    /// Services of the mesh (the same on every node).
    #[serde(default)]
    pub services: Vec<S>,
    /// Workloads (pods) running on this node.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Distributed tracing: spans exported over OTLP. Default off.
    pub tracing: Option<TracingSpec>,
    /// Access logs: a line per request and per TCP connection. Default off.
    #[serde(rename = "accessLog")]
    pub access_log: Option<AccessLogSpec>,
}

impl<S> Default for ConfigFile<S> {
    fn default() -> Self {
        Self {
            mesh: None,
            nodes: Vec::new(),
            policies: Vec::new(),
            node: None,
            proxy: None,
            services: Vec::new(),
            workloads: Vec::new(),
            tracing: None,
            access_log: None,
        }
    }
}

impl ConfigFile {
    /// The same file, each service spec a `ServiceItem` to validate.
    fn into_items(self) -> ConfigFile<ServiceItem> {
        let file = self.try_map_services(|spec| Some(ServiceItem::Spec(spec)));
        file.expect("every spec maps")
    }
}

impl<S> ConfigFile<S> {
    /// The same file with each service made by `f`; `None` when `f` makes
    /// none of one.
    fn try_map_services<T>(self, f: impl FnMut(S) -> Option<T>) -> Option<ConfigFile<T>> {
        Some(ConfigFile {
            services: self.services.into_iter().map(f).collect::<Option<_>>()?,
            mesh: self.mesh,
            nodes: self.nodes,
            policies: self.policies,
            node: self.node,
            proxy: self.proxy,
            workloads: self.workloads,
            tracing: self.tracing,
            access_log: self.access_log,
        })
    }
}

/// A service of a file as read: its spec, or the running config's service
/// read from the very same JSON text, validated already.
#[derive(Debug)]
// Specs live in one file's list until validation consumes them: boxing
// each would be an allocation per service on every full read.
#[allow(clippy::large_enum_variant)]
pub enum ServiceItem {
    Spec(ServiceSpec),
    Kept(std::sync::Arc<validate::Service>),
}

/// Which JSON text each service of a config was read from, by a hash
/// keyed for this process: a reload reads and validates again only the
/// services whose text changed (`meshd discover` rewrites its one file for
/// a single endpoint). The hash is 64 bits of SipHash under random keys:
/// two texts of one mesh share one by chance about once in 10^11 reloads
/// of 10 000 services, and nobody outside the process can aim for it.
#[derive(Clone, Default)]
pub struct ServiceTexts {
    hasher: std::hash::RandomState,
    by_text: std::collections::HashMap<u64, usize>,
}

/// The config serving now and the texts its services were read from.
#[derive(Clone, Copy)]
pub struct Running<'a> {
    pub config: &'a Config,
    pub texts: &'a ServiceTexts,
}

/// Where and how meshd writes its access log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogSpec {
    /// `/dev/stdout` (default), or an absolute path of a file appended to.
    #[serde(default = "default_access_log_path")]
    pub path: std::path::PathBuf,
    /// `json` (Istio's default JSON fields) or `text` (Istio's default text
    /// format). Default `json`.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Lines waiting to be written at most; more are dropped (and counted).
    /// Default 4096.
    #[serde(default = "default_access_log_queue")]
    pub max_queue: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Text,
}

fn default_access_log_path() -> std::path::PathBuf {
    "/dev/stdout".into()
}

fn default_access_log_queue() -> usize {
    4096
}

fn default_true() -> bool {
    true
}

/// Where and how meshd exports the spans it makes for requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// The OTLP collector: `http://host:4317` for gRPC, `http://host:4318`
    /// (or a full URL ending in `/v1/traces`) for HTTP. Required.
    pub endpoint: String,
    /// `grpc` or `http` (OTLP/HTTP with protobuf). Default `grpc`.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// The fraction of new traces sampled, 0 to 1; a caller's own decision
    /// (the sampled flag of its `traceparent` or B3 headers) is kept.
    /// Default `0.01`, Istio's 1 %.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// Spans waiting for export at most; more are dropped (and counted).
    /// Default 2048.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Spans sent in one export at most. Default 512.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long one export may take. Default 10s.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

/// OTLP's transports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    Http,
}

fn default_sampling() -> f64 {
    0.01
}

fn default_max_queue() -> usize {
    2048
}

fn default_max_batch() -> usize {
    512
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    /// This node's name, as endpoints' `node` fields refer to it. Required.
    pub name: String,
    /// The IPv4 address pods reach meshd at (their gateway or the node IP);
    /// captured connections are redirected to `captureAddress:outboundPort`.
    /// Required.
    pub capture_address: IpAddr,
    /// The cgroup subtree holding the pods, relative to the cgroup2 mount
    /// (e.g. `/kubepods.slice`). Capture hooks attach here. Required.
    pub pod_cgroup: String,
    /// The cgroup meshd moves itself into, relative to the cgroup2 mount; it
    /// must lie outside `podCgroup`. Default `/meshd`.
    #[serde(default = "default_proxy_cgroup")]
    pub proxy_cgroup: String,
    /// Where this node's workload certificates come from. Default: none
    /// (no tunnels; cross-node endpoints are unreachable).
    pub identity: Option<IdentitySpec>,
    /// Directory on bpffs where meshd pins its maps and programs, so
    /// capture survives a meshd restart. Default `/sys/fs/bpf/meshd/<name>`.
    pub pin_dir: Option<std::path::PathBuf>,
    /// The kubelet's cgroup driver (`systemd` or `cgroupfs`), which places
    /// the cgroups of workloads given as `pod`. Default `auto`: detected
    /// from the tree below `podCgroup` when meshd starts.
    #[serde(default)]
    pub cgroup_driver: CgroupDriverSpec,
    /// Unix socket a new meshd takes the running one's listeners over
    /// from. Default `/run/meshd/<name>.sock`.
    pub handover_socket: Option<std::path::PathBuf>,
    /// The host's cgroup namespace, entered when meshd starts in a
    /// container's own. Default `/proc/1/ns/cgroup` (needs `hostPID`).
    pub host_cgroup_namespace: Option<std::path::PathBuf>,
}

/// Certificates for the workloads of this node: from files, or minted by
/// meshd's built-in issuer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentitySpec {
    /// A directory with one `<namespace>/<serviceAccount>/` directory per
    /// identity, each holding `tls.crt`, `tls.key` and `ca.crt` (the
    /// cert-manager / SPIFFE helper layout). Changes are picked up live.
    pub certificates: Option<PathBuf>,
    /// A CA directory (`ca.crt`, `ca.key`, as `meshd ca init` writes) from
    /// which meshd mints short-lived certificates for this node's workloads.
    pub issuer: Option<PathBuf>,
    /// Lifetime of minted certificates; each is renewed at half-life.
    /// Default `24h`.
    #[serde(default = "default_certificate_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// The roots this node trusts (PEM; several during a CA rotation).
    /// Required with `certificates`: a directory's own `ca.crt` is never
    /// trusted mesh-wide. With `issuer`, added to the issuer's root.
    pub trust_bundle: Option<PathBuf>,
}

fn default_certificate_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    /// SPIFFE trust domain of every identity. Default `cluster.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// `strict`: meshed pods accept only traffic relayed by meshd (mTLS
    /// across nodes); plaintext from outside the mesh is dropped in the
    /// kernel. `permissive`: plaintext is accepted and counted. Default
    /// `permissive`.
    #[serde(default)]
    pub mode: MeshMode,
    /// How request paths are normalized before routes and policies see them
    /// (and as they are forwarded): `base`, `merge-slashes` or
    /// `decode-and-merge-slashes`. Default `merge-slashes`.
    #[serde(default)]
    pub path_normalization: crate::policy::path::Normalization,
    /// The cluster's name, reported as `source_cluster` and
    /// `destination_cluster` (Kiali filters on it). Default `Kubernetes`,
    /// Istio's name for a cluster not given one.
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            cluster_name: default_cluster_name(),
            trust_domain: default_trust_domain(),
            mode: MeshMode::default(),
            path_normalization: Default::default(),
        }
    }
}

fn default_cluster_name() -> String {
    "Kubernetes".to_owned()
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshMode {
    Strict,
    #[default]
    Permissive,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeAddressSpec {
    /// Node name, as endpoints' `node` refer to it.
    pub name: String,
    /// The IPv4 address its meshd accepts tunnels on (port `proxy.inboundPort`).
    pub address: IpAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    /// Policy name, for logs.
    pub name: String,
    /// The service whose endpoints the policy protects (`namespace/name`).
    pub target: PolicyTarget,
    /// `allow` or `deny`.
    pub action: PolicyAction,
    /// Sources the policy matches; empty matches every source.
    #[serde(default)]
    pub from: Vec<PolicySource>,
    /// Destination ports (target ports) it matches; empty matches all.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// HTTP methods it matches (L7); empty matches all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// HTTP paths it matches (L7): exact, `/prefix/*` or `*suffix`; empty
    /// matches all.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Request headers it matches (L7): name → exact value, or `*` for
    /// present; every one listed must match.
    #[serde(default, deserialize_with = "unique_keys")]
    pub headers: BTreeMap<String, String>,
    /// Matches no connection or request (Istio's `ALLOW` without rules:
    /// its target then admits only what another allow matches).
    #[serde(default)]
    pub matches_nothing: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTarget {
    /// `namespace/name` of a service: its endpoints.
    pub service: Option<String>,
    /// Instead of `service`: the workloads of this namespace (`*`: of every
    /// namespace) whose labels hold every pair of `selector`.
    pub namespace: Option<String>,
    /// With `namespace`: labels a workload must carry; empty selects all.
    #[serde(default, deserialize_with = "unique_keys")]
    pub selector: BTreeMap<String, String>,
}

pub use crate::policy::authz::PolicyAction;

/// One source clause: every field given must match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySource {
    /// SPIFFE IDs without the scheme, `<trust-domain>/ns/<ns>/sa/<sa>`;
    /// `*` matches any authenticated source.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Source namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

fn default_proxy_cgroup() -> String {
    "/meshd".to_owned()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProxySpec {
    /// Port of the outbound listener captured connections arrive at. Default 15001.
    pub outbound_port: u16,
    /// Port of the listener for mTLS tunnels from other nodes. Default 15008.
    pub inbound_port: u16,
    /// Where `/metrics` is served. Default `0.0.0.0:15020`.
    pub metrics_address: SocketAddr,
    /// Where `/healthz/ready` is served. Default `0.0.0.0:15021`.
    pub readiness_address: SocketAddr,
    /// Where the admin API is served. Default `127.0.0.1:15000` (loopback:
    /// it shows the config and changes the log level).
    pub admin_address: SocketAddr,
    /// A file holding the token that changes through the admin API (`PUT
    /// /logging`) must present as `Authorization: Bearer <token>`; read at
    /// each change, so it can be rotated. Default none: the admin API is
    /// read-only.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Same-node acceleration: move app⇄meshd bytes with sk_msg instead of
    /// the TCP stack. Default `false`: an accelerated socket reads through
    /// the kernel's sockmap path, which can hand a *blocking* reader a
    /// spurious EAGAIN (see README); non-blocking applications are unaffected.
    pub sk_msg: bool,
    /// Limit for connecting to an endpoint. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long SIGTERM waits for in-flight connections before closing
    /// them. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long an HTTP client (a pod on a captured connection, a scraper
    /// on the status ports) may take to send a request's headers before
    /// the connection is closed. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a connection on any listener (and a relayed connection)
    /// may move no byte either way before it is closed. Default `1h`
    /// (Envoy's TCP proxy and HTTP connection idle timeout).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a peer connecting to the tunnel port has to complete its
    /// TLS handshake. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes in progress on the tunnel port, before anyone is
    /// authenticated; one source address may hold a quarter. Default 64.
    pub max_handshakes: usize,
    /// Concurrent connections each listener takes, in all and from one
    /// source address; beyond them a new connection is reset at once.
    pub connection_limits: ConnectionLimitsSpec,
    /// Series each metric family fed by traffic (`istio_*`,
    /// `meshd_authorization_denied_total`) may hold; samples of further
    /// label sets are counted in `meshd_metric_series_dropped_total`.
    /// Default 20000.
    pub max_series_per_metric: usize,
    /// Bytes buffered per direction per connection. Default 16384.
    pub buffer_size: usize,
    /// Threads serving traffic (ztunnel's `ZTUNNEL_WORKER_THREADS`,
    /// Envoy's `--concurrency`), each serving the connections it accepts
    /// from start to end with upstream and tunnel connections of its own
    /// (a peer node sees as many tunnel connections, and handshakes after
    /// a certificate rotation, per identity pair as this node has
    /// workers: keep its `connectionLimits.inbound.perSource` and
    /// `maxHandshakes` above that); one more thread runs the control
    /// plane (admin, reloads, certificates, span export). Default: the CPUs meshd may use — its
    /// CPU affinity and its cgroup's `cpu.max` quota (a DaemonSet's CPU
    /// limit), rounded up. Applied at start-up.
    pub worker_threads: Option<usize>,
    /// Level of the eBPF programs' own log (forwarded into meshd's log):
    /// `off`, `error`, `warn`, `info`, `debug` or `trace`. Default `off`.
    pub bpf_log_level: BpfLogLevel,
    /// What captured connects do while meshd is dead or wedged (its
    /// heartbeat older than `failTimeout`): `open` (go straight to their
    /// destination) or `closed` (refused). Default `open`.
    pub fail_mode: FailMode,
    /// How old meshd's heartbeat may get before `failMode` applies.
    /// Default `1s` (meshd beats every 200 ms).
    #[serde(with = "humantime_serde")]
    pub fail_timeout: Duration,
}

/// Per listener: `max` connections at once, `perSource` of them from one
/// source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionLimit {
    pub max: usize,
    pub per_source: usize,
}

impl ConnectionLimit {
    const fn new(max: usize, per_source: usize) -> Self {
        Self { max, per_source }
    }
}

/// The connection caps of each listener. Defaults: `outbound` (pods'
/// captured connections, two descriptors each) 16384 / 8192 per pod
/// address; `inbound` (tunnels from other nodes, pooled, so few per node)
/// 4096 / 512; `metrics`, `readiness` 128 / 32; `admin` 32 / 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConnectionLimitsSpec {
    pub outbound: ConnectionLimit,
    pub inbound: ConnectionLimit,
    pub metrics: ConnectionLimit,
    pub readiness: ConnectionLimit,
    pub admin: ConnectionLimit,
}

impl Default for ConnectionLimitsSpec {
    fn default() -> Self {
        Self {
            outbound: ConnectionLimit::new(16384, 8192),
            inbound: ConnectionLimit::new(4096, 512),
            metrics: ConnectionLimit::new(128, 32),
            readiness: ConnectionLimit::new(128, 32),
            admin: ConnectionLimit::new(32, 32),
        }
    }
}

impl ConnectionLimitsSpec {
    /// Each listener's limit with its field name.
    pub fn each(&self) -> [(&'static str, ConnectionLimit); 5] {
        [
            ("outbound", self.outbound),
            ("inbound", self.inbound),
            ("metrics", self.metrics),
            ("readiness", self.readiness),
            ("admin", self.admin),
        ]
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            outbound_port: meshd_common::OUTBOUND_PORT,
            inbound_port: 15008,
            metrics_address: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness_address: SocketAddr::from(([0, 0, 0, 0], 15021)),
            admin_address: SocketAddr::from(([127, 0, 0, 1], 15000)),
            admin_token_file: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 64,
            connection_limits: ConnectionLimitsSpec::default(),
            max_series_per_metric: 20_000,
            sk_msg: false,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            buffer_size: 16 * 1024,
            worker_threads: None,
            bpf_log_level: BpfLogLevel::Off,
            fail_mode: FailMode::Open,
            fail_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BpfLogLevel {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service name (a DNS label). Required.
    pub name: String,
    /// Namespace (a DNS label). Default `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service's virtual IPv4 address. Required.
    pub vip: IpAddr,
    /// Ports the service exposes. At least one.
    pub ports: Vec<PortSpec>,
    /// Where the service's pods are.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// How requests (HTTP) or connections (TCP) are spread over endpoints:
    /// `p2c-ewma` (default), `round-robin`, `least-request`, `random`.
    #[serde(default)]
    pub load_balancer: crate::policy::balance::Policy,
    /// Limit for a whole HTTP request (until the response headers). Default:
    /// none.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// HTTP routes, tried in order; the first whose `match` holds takes the
    /// request. Without routes every endpoint serves every request.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Local rate limits for HTTP requests to this service (429 beyond).
    /// Default: none.
    pub rate_limit: Option<RateLimitSpec>,
    /// Limits that shed load fast instead of queueing it. Default: none.
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// When failed HTTP requests are tried again. Default: connect failures,
    /// twice, within the default budget.
    pub retries: Option<RetrySpec>,
    /// Ejects endpoints that fail requests in a row. Default: off.
    pub outlier_detection: Option<OutlierSpec>,
    /// Active checks of this node's endpoints. Default: none.
    pub health_check: Option<HealthCheckSpec>,
    /// Whether requests and connections to this service are access-logged
    /// (when the `accessLog` section is there). Default `true`.
    #[serde(default = "default_true")]
    pub access_log: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries after the first try. Default 2; 0 turns retries off.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`, and
    /// the gRPC statuses `cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`, `unavailable`. Default `[connect-failure]`.
    pub retry_on: Option<Vec<String>>,
    /// HTTP statuses retried besides the conditions, e.g. `[409]`.
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Limit for each try. Default: none (the request `timeout` bounds all).
    #[serde(default, with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    /// First backoff cap (full jitter below it, doubling). Default `25ms`.
    #[serde(default, with = "humantime_serde")]
    pub backoff_base: Option<Duration>,
    /// Largest backoff. Default `250ms`.
    #[serde(default, with = "humantime_serde")]
    pub backoff_max: Option<Duration>,
    /// Retry budget: retries per original request over 10 s. Default 0.2.
    pub budget_ratio: Option<f64>,
    /// Retries per second always allowed. Default 10.
    pub budget_min_per_second: Option<f64>,
    /// Also retry POST and PATCH. Default `false`.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Largest request body kept for replay, bytes. Default 65536.
    pub buffer_limit: Option<usize>,
}

fn default_max_retries() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierSpec {
    /// Failures in a row (5xx, gateway errors, connect failures, resets)
    /// that eject an endpoint. Default 5.
    pub consecutive_errors: Option<u32>,
    /// First ejection; the n-th lasts n times as long. Default `30s`.
    #[serde(default, with = "humantime_serde")]
    pub base_ejection_time: Option<Duration>,
    /// Longest ejection. Default `300s`.
    #[serde(default, with = "humantime_serde")]
    pub max_ejection_time: Option<Duration>,
    /// Most endpoints ejected at once, percent (one may always be).
    /// Default 50.
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// `http` (a GET answered 2xx passes) or `tcp` (a connection passes).
    pub protocol: HealthProtocol,
    /// Path for `http`. Default `/healthz`.
    pub path: Option<String>,
    /// Endpoint port checked. Default: the service's first target port.
    pub port: Option<u16>,
    /// Default `5s`.
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Default `1s`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Failed checks in a row that take an endpoint out. Default 2.
    pub unhealthy_threshold: Option<u32>,
    /// Passed checks in a row that bring it back. Default 1.
    pub healthy_threshold: Option<u32>,
}

pub use crate::policy::health::HealthProtocol;

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// HTTP requests in flight to the service from this node; more are
    /// answered `503` at once (flag `UO`).
    pub max_requests: Option<u32>,
    /// Upstream connections from this node to the service's endpoints
    /// (HTTP connections, or relayed TCP connections). A TCP connection
    /// beyond it is refused; an HTTP request that needs a new connection
    /// waits for one to free up (up to `proxy.connectTimeout`).
    pub max_connections: Option<u32>,
    /// HTTP requests allowed to wait for a connection under
    /// `maxConnections`; more are answered `503` at once (flag `UO`).
    pub max_pending_requests: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Requests per second for the whole service, from this node.
    pub rps: Option<f64>,
    /// Burst for the whole service. Default: one second's worth.
    pub burst: Option<f64>,
    /// The same, for each source workload on its own.
    pub per_source: Option<crate::policy::ratelimit::Limit>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    /// A name for metrics and logs. Default `route-<index>`.
    pub name: Option<String>,
    /// Conditions; every one given must hold. Default: matches everything.
    #[serde(default, rename = "match")]
    pub matches: MatchSpec,
    /// Weighted backends (subsets of the service's endpoints). At least one.
    pub to: Vec<BackendSpec>,
    /// Overrides the service's `timeout` for this route.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Overrides the service's `retries` for this route.
    pub retries: Option<RetrySpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// `{ exact: /p }`, `{ prefix: /p }` or `{ regex: "^/p/[0-9]+$" }`.
    pub path: Option<PathSpec>,
    /// An HTTP method, e.g. `GET`.
    pub method: Option<String>,
    /// Header name → exact value.
    #[serde(default, deserialize_with = "unique_keys")]
    pub headers: BTreeMap<String, String>,
}

/// Exactly one of the three.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendSpec {
    /// Endpoint labels that select this backend's endpoints, e.g.
    /// `{ version: v2 }`. Default: every endpoint.
    #[serde(default, deserialize_with = "unique_keys")]
    pub subset: BTreeMap<String, String>,
    /// Relative share of the route's requests. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    /// Port on the VIP. Required.
    pub port: u16,
    /// Port on the endpoints. Default: the same as `port`.
    pub target_port: Option<u16>,
    /// Application protocol: `tcp` (default; bytes relayed as they are),
    /// `http` (HTTP/1.1), `http2`, `grpc` (HTTP/2), or `auto` (sniffed from
    /// the first bytes: HTTP/1.1, HTTP/2, else TCP).
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Http2,
    Grpc,
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
            Self::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    /// The pod's IPv4 address. Required.
    pub address: IpAddr,
    /// The node the pod runs on. Default: unknown (treated as remote).
    pub node: Option<String>,
    /// The workload (pod) name, for metrics. Default: unknown.
    pub workload: Option<String>,
    /// The pod's service account: its identity is
    /// `spiffe://<trustDomain>/ns/<service namespace>/sa/<serviceAccount>`,
    /// which a tunnel to it must present. Default `default`.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Labels, e.g. `version: v2`.
    #[serde(default)]
    pub labels: LabelList,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Workload (pod) name. Required.
    pub name: String,
    /// Namespace. Default `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Service account; the identity's last segment. Default `default`.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The pod's cgroup, relative to the cgroup2 mount; must lie inside
    /// `node.podCgroup`. Identifies the source of captured connections: a
    /// process in this cgroup or any below it (the pod's containers) is
    /// this workload.
    pub cgroup: Option<String>,
    /// Instead of `cgroup`: the kubelet's pod (`uid`, `qosClass`), whose
    /// cgroup meshd computes for `node.cgroupDriver`.
    pub pod: Option<PodRef>,
    /// The pod's IPv4 addresses; identify the source when no cgroup matches.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Labels such as `app` and `version`, reported in metrics.
    #[serde(default)]
    pub labels: LabelList,
    /// Ports the node itself (its own addresses: the kubelet's probes) may
    /// connect to in plaintext, in every mode. Default none: in strict
    /// mode a probe from the node is dropped like any other plaintext.
    #[serde(default)]
    pub probe_ports: Vec<u16>,
    /// This workload's own mTLS mode (Istio's namespace or workload
    /// `PeerAuthentication`): `strict` or `permissive`. Default
    /// `mesh.mode`.
    pub mtls_mode: Option<MeshMode>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

// === loading ===

/// A file's text, kept so errors found later can be located in it; shared
/// (not copied) with what the reloader and the admin API keep of it.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: Arc<str>,
}

impl Source {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            file: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                file: path.to_owned(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?.into();
        Ok(Self {
            path: path.to_owned(),
            text,
        })
    }

    /// An error at `field` of this file.
    pub fn error(&self, field: &FieldPath, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.path.clone(),
            line: locate::line_of(&self.text, field),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The file's config; with each service, the hash of its JSON text
    /// (none when read as YAML). A service whose text `running` read too is
    /// taken over from it.
    fn parse(
        &self,
        hasher: &std::hash::RandomState,
        running: Option<Running<'_>>,
    ) -> Result<(ConfigFile<ServiceItem>, Vec<Option<u64>>), ConfigError> {
        if self.text.trim().is_empty() {
            return Ok((ConfigFile::default(), Vec::new()));
        }
        if let Some(line) = too_deep(&self.text, MAX_NESTING) {
            return Err(ConfigError::Invalid {
                file: self.path.clone(),
                line: Some(line),
                field: String::new(),
                message: format!("nested more than {MAX_NESTING} levels deep"),
            });
        }
        if let Some(read) = parse_json(&self.text, hasher, running) {
            return Ok(read);
        }
        let file = self.parse_yaml()?;
        let texts = vec![None; file.services.len()];
        Ok((file.into_items(), texts))
    }

    /// The file read as YAML (after the checks in `parse`).
    fn parse_yaml(&self) -> Result<ConfigFile, ConfigError> {
        if let Some(file) = parse_streaming(&self.text) {
            return Ok(file);
        }
        serde_yaml::from_str(&self.text).map_err(|err| {
            let line = err.location().map(|l| l.line());
            // serde_yaml prefixes the message with the field path when it has one.
            let text = err.to_string();
            let text = match text.rfind(" at line ") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            let (field, message) = match text.split_once(": ") {
                Some((field, message)) if !field.contains(' ') => {
                    (field.to_owned(), message.to_owned())
                }
                _ => (String::new(), text),
            };
            ConfigError::Invalid {
                file: self.path.clone(),
                line,
                field,
                message,
            }
        })
    }
}

/// A config file written as JSON — YAML's JSON subset, as `meshd-discover`
/// writes it, after any `#` comment lines — read by serde_json, several
/// times faster than a YAML reader reads the same config; `None` when the
/// text is no JSON object or serde_json refuses it, and the YAML readers
/// then read it (a refusal is reported as theirs, with its field path and
/// line). A key repeated in a mapping is refused by both (`LabelList`), so
/// a text both accept is read alike (the fuzz target `config` checks it).
/// Each service's text is hashed by `hasher`; one `running` read from the
/// same text is taken over, not read again.
fn parse_json(
    text: &str,
    hasher: &std::hash::RandomState,
    running: Option<Running<'_>>,
) -> Option<(ConfigFile<ServiceItem>, Vec<Option<u64>>)> {
    use std::hash::BuildHasher as _;
    let mut body = text.trim_start();
    while body.starts_with('#') {
        body = body
            .split_once('\n')
            .map_or("", |(_, rest)| rest)
            .trim_start();
    }
    if !body.starts_with('{') {
        return None;
    }
    let file: ConfigFile<&serde_json::value::RawValue> = serde_json::from_str(body).ok()?;
    let mut texts = Vec::with_capacity(file.services.len());
    let file = file.try_map_services(|service| {
        let hash = hasher.hash_one(service.get());
        texts.push(Some(hash));
        let kept = running.and_then(|running| {
            let index = *running.texts.by_text.get(&hash)?;
            running.config.services.get(index).cloned()
        });
        Some(match kept {
            Some(service) => ServiceItem::Kept(service),
            None => ServiceItem::Spec(serde_json::from_str(service.get()).ok()?),
        })
    })?;
    Some((file, texts))
}

/// Labels as written: in key order, each key once. Endpoints carry them
/// by the ten thousand, where a `BTreeMap` would take a 0.5 KiB node for
/// every set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelList(Vec<(String, String)>);

impl LabelList {
    pub fn get(&self, key: &str) -> Option<&str> {
        let found = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key));
        found.ok().map(|i| self.0[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A mapping of strings whose keys are all different: serde_json keeps the
/// last of a repeated key, where the YAML readers refuse the text; meshd
/// refuses it whichever reads it.
impl<'de> Deserialize<'de> for LabelList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Unique;
        impl<'de> serde::de::Visitor<'de> for Unique {
            type Value = LabelList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of strings")
            }

            fn visit_map<A>(self, mut map: A) -> Result<LabelList, A::Error>
            where
                A: serde::de::MapAccess<'de>,
            {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
                if let Some(twice) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
                    let message = format!("duplicate key {:?}", twice[0].0);
                    return Err(serde::de::Error::custom(message));
                }
                Ok(LabelList(pairs))
            }
        }
        deserializer.deserialize_map(Unique)
    }
}

/// A `LabelList` where a `BTreeMap` is kept (headers, selectors, subsets).
fn unique_keys<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(LabelList::deserialize(deserializer)?
        .0
        .into_iter()
        .collect())
}

/// A config file read by serde-saphyr, which deserializes as it parses;
/// `None` when it refuses the text (or it exceeds the budget), which is then
/// read again by serde_yaml for the message meshd reports (its field path
/// and line). serde_yaml (libyaml) first loads a whole document's events —
/// about 40 times the text in memory, 150 MB for 10 000 services — which set
/// meshd's high-water mark on every reload of a large mesh. The options
/// keep to what serde_yaml accepts: duplicate keys and merge keys refused,
/// only `true`/`false` as booleans, no includes; the fuzz target `config`
/// checks that a text both accept is read alike.
fn parse_streaming(text: &str) -> Option<ConfigFile> {
    let mut budget = serde_saphyr::Budget::default();
    // Sized for the largest file meshd reads (MAX_FILE_BYTES): every byte
    // an event at most. The alias limits stay as they are.
    budget.max_events = MAX_FILE_BYTES as usize;
    budget.max_nodes = MAX_FILE_BYTES as usize;
    let options = serde_saphyr::options! {
        budget: Some(budget),
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        merge_keys: serde_saphyr::MergeKeyPolicy::Error,
        strict_booleans: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(text, options).ok()
}

/// For the fuzz target: a text both YAML readers accept is read alike,
/// and so is one the JSON reader accepts too. (The
/// streaming reader follows YAML 1.2 where libyaml has gaps — `...` alone,
/// an empty document, is one — so it may accept what serde_yaml refuses;
/// validation then judges the file as for any other.) Returns what differs.
pub fn streaming_matches_serde_yaml(text: &str) -> Result<(), String> {
    let Some(streamed) = parse_streaming(text) else {
        return Ok(());
    };
    match serde_yaml::from_str::<ConfigFile>(text) {
        Ok(file) if format!("{file:?}") != format!("{streamed:?}") => {
            return Err(format!("read differently:\n{streamed:?}\n{file:?}"));
        }
        _ => {}
    }
    if let Some((json, _)) = parse_json(text, &Default::default(), None) {
        let streamed = streamed.into_items();
        if format!("{json:?}") != format!("{streamed:?}") {
            return Err(format!("read differently as JSON:\n{json:?}\n{streamed:?}"));
        }
    }
    Ok(())
}

/// Reads, parses and validates `paths` together. All problems are returned,
/// not just the first.
pub fn load(paths: &[PathBuf]) -> Result<Config, ConfigErrors> {
    load_sources(&read_sources(paths)?)
}

/// Reads `paths` (each within the size limit); every unreadable file is
/// reported.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, ConfigErrors> {
    if paths.is_empty() {
        return Err(ConfigErrors(vec![ConfigError::NoFiles]));
    }
    let (sources, errors): (Vec<_>, Vec<_>) = paths
        .iter()
        .map(|p| Source::read(p))
        .partition(Result::is_ok);
    if errors.is_empty() {
        Ok(sources.into_iter().flatten().collect())
    } else {
        Err(ConfigErrors(
            errors.into_iter().filter_map(Result::err).collect(),
        ))
    }
}

/// Parses and validates files already read, together.
pub fn load_sources(sources: &[Source]) -> Result<Config, ConfigErrors> {
    reload_sources(sources, None).map(|(config, _)| config)
}

/// As `load_sources`, taking over from `running` every service read from
/// the same JSON text as one of its own; with the texts of the new
/// config's services.
pub fn reload_sources(
    sources: &[Source],
    running: Option<Running<'_>>,
) -> Result<(Config, ServiceTexts), ConfigErrors> {
    let fresh = std::hash::RandomState::new();
    let hasher = running.map_or(&fresh, |running| &running.texts.hasher);
    let (files, errors): (Vec<_>, Vec<_>) = sources
        .iter()
        .map(|source| source.parse(hasher, running))
        .partition(Result::is_ok);
    if !errors.is_empty() {
        return Err(ConfigErrors(
            errors.into_iter().filter_map(Result::err).collect(),
        ));
    }
    let (files, texts): (Vec<_>, Vec<_>) = files.into_iter().flatten().unzip();
    let config = validate::validate(sources, files)?;
    // Validation keeps the services in file order, as they were read.
    let by_text = texts
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(index, text)| Some((text?, index)))
        .collect();
    let texts = ServiceTexts {
        hasher: hasher.clone(),
        by_text,
    };
    Ok((config, texts))
}

/// Parses YAML text as one file named `name`; for tests and `meshd check`.
pub fn load_str(name: &str, text: &str) -> Result<Config, ConfigErrors> {
    let source = Source {
        path: PathBuf::from(name),
        text: text.into(),
    };
    let (file, _) = source
        .parse(&Default::default(), None)
        .map_err(|e| ConfigErrors(vec![e]))?;
    validate::validate(&[source], vec![file])
}

#[cfg(test)]
mod tests {
    use super::{load_str, parse_streaming, streaming_matches_serde_yaml, too_deep};

    /// The file `text` as read as JSON, on its own.
    fn json(text: &str) -> Option<(super::ConfigFile<super::ServiceItem>, Vec<Option<u64>>)> {
        super::parse_json(text, &Default::default(), None)
    }

    /// The shipped examples: read by the streaming reader, as serde_yaml
    /// reads them.
    #[test]
    fn the_examples_stream_and_read_as_serde_yaml_reads_them() {
        for text in [
            include_str!("../../deploy/config/mesh.yaml"),
            include_str!("../../deploy/config/node-a.yaml"),
            include_str!("../../deploy/config/node-b.yaml"),
        ] {
            assert!(parse_streaming(text).is_some(), "not streamed:\n{text}");
            streaming_matches_serde_yaml(text).unwrap();
        }
    }

    /// What serde_yaml refuses, the streaming reader refuses too, and the
    /// message is serde_yaml's (field path and line).
    #[test]
    fn what_serde_yaml_refuses_is_refused_with_its_message() {
        for (text, expected) in [
            ("mesh: { trustDomain: a, trustDomain: b }\n", "duplicate"),
            (
                "base: &b { trustDomain: a }\nmesh: { <<: *b }\n",
                "unknown field",
            ),
            ("proxy: { skMsg: yes }\n", "invalid type"),
            (
                "services:\n  - { name: a, prots: [] }\n",
                "services[0]: unknown field `prots`",
            ),
        ] {
            assert!(parse_streaming(text).is_none(), "streamed: {text}");
            let error = load_str("t.yaml", text).unwrap_err().to_string();
            assert!(error.contains(expected), "{expected:?} not in {error}");
        }
    }

    /// The shipped examples written as JSON (after a comment line, as
    /// meshd-discover writes them): read by serde_json as the YAML readers
    /// read the YAML.
    #[test]
    fn json_is_read_as_the_same_yaml_is_read() {
        for text in [
            include_str!("../../deploy/config/mesh.yaml"),
            include_str!("../../deploy/config/node-a.yaml"),
        ] {
            let value: serde_json::Value = serde_yaml::from_str(text).unwrap();
            let written = format!(
                "# a comment\n{}",
                serde_json::to_string_pretty(&value).unwrap()
            );
            let (read, _) = json(&written).expect("read as JSON");
            assert_eq!(
                format!("{read:?}"),
                format!("{:?}", parse_streaming(text).unwrap().into_items())
            );
            streaming_matches_serde_yaml(&written).unwrap();
        }
        // YAML that is no JSON object is left to the YAML readers.
        assert!(json("mesh: { trustDomain: a }\n").is_none());
        assert!(json("# {\n[]\n").is_none());
    }

    /// JSON keeps the last of a repeated key; meshd refuses it in a
    /// mapping as YAML does, and reports it as the YAML reader does (field
    /// and line).
    #[test]
    fn a_key_repeated_in_json_is_refused_where_it_is() {
        let text = "{\n  \"services\": [\n    { \"name\": \"a\", \"vip\": \"10.96.0.1\", \"ports\": [{ \"port\": 80 }],\n      \"endpoints\": [{ \"address\": \"10.1.0.1\", \"labels\": { \"version\": \"v1\", \"version\": \"v2\" } }] }\n  ]\n}\n";
        assert!(json(text).is_none(), "a repeated key read as JSON");
        let error = load_str("mesh.json", text).unwrap_err().to_string();
        assert!(error.contains("mesh.json:4"), "{error}");
        assert!(error.contains("duplicate"), "{error}");
        // A repeated field is refused by serde_json itself; a JSON syntax
        // error (a trailing comma) is YAML, and read as YAML.
        assert!(json("{ \"mesh\": {}, \"mesh\": {} }").is_none());
        assert!(json("{ \"nodes\": [], }").is_none());
        assert!(parse_streaming("{ \"nodes\": [], }").is_some());
    }

    /// A reload takes over every service whose JSON text is unchanged (the
    /// same allocation as the running one's), reads the changed one
    /// again, and still checks the services against each other.
    #[test]
    fn a_reload_reads_again_only_the_services_whose_json_changed() {
        use super::{reload_sources, Running, Source};
        use std::sync::Arc;
        let node = r#""node": {"name":"a","captureAddress":"10.77.0.1","podCgroup":"/pods"}"#;
        let service = |name: &str, vip: &str, address: &str| {
            format!(
                r#"    {{"name":"{name}","vip":"{vip}","ports":[{{"port":80}}],"endpoints":[{{"address":"{address}"}}]}}"#
            )
        };
        let file = |services: &[String]| Source {
            path: "meshd.yaml".into(),
            text: format!(
                "{{\n  {node},\n  \"services\": [\n{}\n  ]\n}}\n",
                services.join(",\n")
            )
            .into(),
        };
        let first = [
            service("a", "10.96.0.1", "10.77.0.10"),
            service("b", "10.96.0.2", "10.77.0.20"),
        ];
        let (running, texts) = reload_sources(&[file(&first)], None).unwrap();
        let moved = [first[0].clone(), service("b", "10.96.0.2", "10.77.0.21")];
        let next = [file(&moved)];
        let reload = |sources: &[Source]| {
            let running = Some(Running {
                config: &running,
                texts: &texts,
            });
            reload_sources(sources, running)
        };
        let (config, _) = reload(&next).unwrap();
        let same =
            |i: usize| Arc::ptr_eq(&config.services[i].hostname, &running.services[i].hostname);
        assert!(same(0), "an unchanged service was read again");
        assert!(!same(1), "the changed service was taken over");
        assert_eq!(
            config.services[1].endpoints[0].address.to_string(),
            "10.77.0.21"
        );
        // What a reload takes over is what a fresh read reads.
        let fresh = super::load_sources(&next).unwrap();
        assert_eq!(
            format!("{:?}", config.services),
            format!("{:?}", fresh.services)
        );
        // An unchanged service is still checked against the others: a new
        // one on its VIP is refused.
        let clash = [
            first[0].clone(),
            first[1].clone(),
            service("c", "10.96.0.1", "10.77.0.30"),
        ];
        let error = reload(&[file(&clash)]).err().expect("refused").to_string();
        assert!(
            error.contains("10.96.0.1 is already the VIP of service a"),
            "{error}"
        );
    }

    #[test]
    fn nesting_is_measured_outside_quotes_and_comments() {
        assert_eq!(too_deep("a: [[1], {b: [2]}]\n", 3), None);
        assert_eq!(too_deep("a: [[[[1]]]]\n", 3), Some(1));
        assert_eq!(too_deep("x: 1\na: {b: {c: {d: 1}}}\n", 2), Some(2));
        // Brackets in strings and comments are text.
        assert_eq!(too_deep("a: \"[[[[\"\nb: '{{{{'\n# [[[[\n", 1), None);
    }
}
