//! The cluster's objects → meshd's config, for one node. Pure and
//! deterministic: objects in sorted maps, lists sorted, so unchanged
//! objects give byte-identical files and meshd reloads only on a real
//! change. What meshd cannot express is reported, never dropped silently.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{json, Map, Value};

use super::{
    cluster::{Cluster, Key, Kind, PodInfo},
    peer, policies, traffic,
};
use crate::config::{Protocol, QosClass};

/// What the files say beyond the cluster's objects.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The node whose pods become `workloads`.
    pub node: String,
    pub trust_domain: String,
    pub cluster_name: String,
    /// Istio's root namespace: a PeerAuthentication there without a
    /// selector is mesh-wide. Default `istio-system`.
    pub root_namespace: String,
    /// The operator's node settings (`node`, `proxy`, `tracing`,
    /// `accessLog`), completed with `node.name` and, when absent,
    /// `node.captureAddress` (the Node's InternalIP) into one whole config.
    pub node_config: Option<Map<String, Value>>,
}

/// Sections of a config discovery writes itself: a node config holding
/// any of them is refused.
pub const DISCOVERED_SECTIONS: &[&str] = &["mesh", "nodes", "policies", "services", "workloads"];

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pod labels meshd reports in metrics (Istio's canonical service and
/// revision are derived from them); others are left out of `workloads`
/// so a change to them does not rewrite the files.
const REPORTED_LABELS: &[&str] = &[
    "app",
    "version",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
];

/// Something of an object that meshd cannot express, and what was done
/// instead (never more access than the object gives).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unsupported {
    pub kind: Kind,
    /// `namespace/name`.
    pub object: String,
    /// The field, from a closed set (it labels a metric).
    pub field: &'static str,
    /// What was found and what meshd does instead.
    pub detail: String,
}

/// The files for one node, and what could not be translated.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    /// The config discovery writes (`CONFIG_FILE`): the mesh and this
    /// node's workloads, with the node settings when they were given.
    pub config: String,
    /// The mesh-wide file (`mesh`, `nodes`, `services`): the same for
    /// every node.
    pub mesh: String,
    /// This node's `workloads`.
    pub workloads: String,
    pub unsupported: Vec<Unsupported>,
}

/// The file discovery writes.
pub const CONFIG_FILE: &str = "meshd.yaml";

/// What a translation could not express, collected as it goes.
#[derive(Debug, Default)]
pub struct Reports(Vec<Unsupported>);

impl Reports {
    /// The fields reported so far, in order.
    pub fn fields(&self) -> Vec<&'static str> {
        self.0.iter().map(|u| u.field).collect()
    }

    pub fn add(&mut self, kind: Kind, key: &Key, field: &'static str, detail: String) {
        self.0.push(Unsupported {
            kind,
            object: name_of(key),
            field,
            detail,
        });
    }
}

struct Translator<'a> {
    cluster: &'a Cluster,
    reports: Reports,
    /// Every service's IPv4 cluster IP: no endpoint or workload address.
    vips: BTreeSet<Ipv4Addr>,
}

pub fn translate(cluster: &Cluster, settings: &Settings) -> Translation {
    let vips = cluster
        .services
        .values()
        .filter_map(|s| s.spec.as_ref())
        .flat_map(|s| s.cluster_ips.iter().flatten().chain(s.cluster_ip.as_ref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut t = Translator {
        cluster,
        reports: Reports::default(),
        vips,
    };
    let modes = peer::modes(cluster, &settings.root_namespace, &mut t.reports);
    let mesh = json!({
        "trustDomain": settings.trust_domain,
        "clusterName": settings.cluster_name,
        "mode": modes.mesh.as_str(),
    });
    traffic::check_routes(cluster, &mut t.reports);
    let nodes = t.nodes();
    let services = t.services();
    let (policies, selector_keys) =
        policies::policies(cluster, &settings.root_namespace, &mut t.reports);
    let workloads = t.workloads(&settings.node, &selector_keys, &modes);
    let mut unsupported = t.reports.0;
    unsupported.sort();
    unsupported.dedup();
    let mesh = json!({ "mesh": mesh, "nodes": nodes, "policies": policies, "services": services });
    let workloads = json!({ "workloads": workloads });
    let mut config = settings
        .node_config
        .clone()
        .map(|node| complete_node(node, cluster, &settings.node))
        .unwrap_or_default();
    for part in [&mesh, &workloads] {
        config.extend(
            part.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    Translation {
        config: document(
            &format!("node {}'s config", settings.node),
            Value::Object(config),
        ),
        mesh: document("the mesh: nodes and services", mesh),
        workloads: document(&format!("the pods on node {}", settings.node), workloads),
        unsupported,
    }
}

/// The operator's node settings with this node's name and, unless given,
/// its capture address: the Node's InternalIP (left out while the Node is
/// unknown, so the config does not validate and is not written).
fn complete_node(
    mut config: Map<String, Value>,
    cluster: &Cluster,
    node: &str,
) -> Map<String, Value> {
    let section = config
        .entry("node")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(section) = section {
        section.insert("name".into(), json!(node));
        if !section.contains_key("captureAddress") {
            let address = cluster.nodes.get(node).and_then(|n| {
                n.status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            });
            if let Some(address) = address {
                section.insert("captureAddress".into(), json!(address.to_string()));
            }
        }
    }
    config
}

/// A file's text: a header saying where it came from, then the config as
/// JSON — YAML's JSON subset, which meshd reads some twenty times faster
/// than YAML — with each section on its own line and each item of a list
/// (a service, a workload, a policy) on one line of its own, so that a
/// change to one is a one-line difference.
fn document(what: &str, value: Value) -> String {
    let mut text =
        format!("# Written by meshd discover from the cluster's objects: {what}. Do not edit.\n");
    let Value::Object(sections) = value else {
        return format!("{text}{value}\n");
    };
    text.push('{');
    for (i, (name, section)) in sections.iter().enumerate() {
        let comma = if i == 0 { "" } else { "," };
        text.push_str(&format!("{comma}\n  {}: ", Value::String(name.clone())));
        match section {
            Value::Array(items) if !items.is_empty() => {
                let items: Vec<String> = items.iter().map(|item| format!("    {item}")).collect();
                text.push_str(&format!("[\n{}\n  ]", items.join(",\n")));
            }
            other => text.push_str(&other.to_string()),
        }
    }
    text.push_str("\n}\n");
    text
}

fn name_of(key: &Key) -> String {
    format!("{}/{}", key.0, key.1)
}

impl<'a> Translator<'a> {
    fn report(&mut self, kind: Kind, key: &Key, field: &'static str, detail: String) {
        self.reports.add(kind, key, field, detail);
    }

    /// Every node with an IPv4 address: where its meshd takes tunnels.
    fn nodes(&mut self) -> Vec<Value> {
        let mut nodes = Vec::new();
        for (name, node) in &self.cluster.nodes {
            let addresses = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .cloned()
                .unwrap_or_default();
            let of_type = |t: &str| {
                addresses
                    .iter()
                    .filter(|a| a.type_ == t)
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            };
            match of_type("InternalIP").or_else(|| of_type("ExternalIP")) {
                Some(address) => {
                    nodes.push(json!({ "name": name, "address": address.to_string() }))
                }
                None => self.report(
                    Kind::Node,
                    &(String::new(), name.clone()),
                    "status.addresses",
                    "no IPv4 InternalIP or ExternalIP: no tunnel to this node".into(),
                ),
            }
        }
        nodes
    }

    fn services(&mut self) -> Vec<Value> {
        let cluster = self.cluster;
        let mut services = Vec::new();
        for (key, service) in &cluster.services {
            if let Some(service) = self.service(key, service) {
                services.push(service);
            }
        }
        services
    }

    fn service(&mut self, key: &Key, service: &Service) -> Option<Value> {
        let spec = service.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            self.report(
                Kind::Service,
                key,
                "spec.type",
                "ExternalName: not meshed".into(),
            );
            return None;
        }
        let ips: Vec<&String> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.as_ref())
            .collect();
        let vip = ips.iter().find_map(|ip| ip.parse::<Ipv4Addr>().ok());
        let Some(vip) = vip else {
            let detail = if ips.iter().any(|ip| *ip == "None") {
                "headless (clusterIP None): not meshed".to_owned()
            } else {
                "no IPv4 cluster IP: not meshed".to_owned()
            };
            self.report(Kind::Service, key, "spec.clusterIP", detail);
            return None;
        };
        let slices = slices_of(self.cluster, key);
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if protocol != "TCP" {
                self.report(
                    Kind::Service,
                    key,
                    "spec.ports.protocol",
                    format!("port {} is {protocol}: only TCP is meshed", port.port),
                );
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let target = self.target_port(key, port, &slices).unwrap_or(number);
            ports.push(json!({
                "port": number,
                "targetPort": target,
                "protocol": protocol_of(port.app_protocol.as_deref(), port.name.as_deref()).as_str(),
            }));
        }
        if ports.is_empty() {
            self.report(
                Kind::Service,
                key,
                "spec.ports",
                "no TCP port: not meshed".into(),
            );
            return None;
        }
        let cluster = self.cluster;
        let addresses = |service: &Key| ready_addresses(cluster, service);
        let mut keys = traffic::SubsetKeys::new();
        let routes = traffic::routes(cluster, key, &addresses, &mut self.reports, &mut keys);
        let endpoints = self.endpoints(key, &slices, &keys);
        let mut value = Map::new();
        value.insert("name".into(), json!(key.1));
        value.insert("namespace".into(), json!(key.0));
        value.insert("vip".into(), json!(vip.to_string()));
        value.insert("ports".into(), json!(ports));
        value.insert("endpoints".into(), json!(endpoints));
        if !routes.is_empty() {
            value.insert("routes".into(), json!(routes));
        }
        if let Some((rule_key, rule)) = traffic::destination_rule(cluster, key, &mut self.reports) {
            value.extend(traffic::traffic_policy(rule_key, rule, &mut self.reports));
        }
        Some(Value::Object(value))
    }

    /// A service port's number on the endpoints: a number as given; a name
    /// as the EndpointSlices resolved it (the lowest, reported, when pods
    /// disagree); `None` when nothing resolves it yet.
    fn target_port(
        &mut self,
        key: &Key,
        port: &k8s_openapi::api::core::v1::ServicePort,
        slices: &[(&Key, &EndpointSlice)],
    ) -> Option<u16> {
        match &port.target_port {
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(_)) | None => {
                let name = port.name.as_deref().unwrap_or_default();
                let resolved: BTreeSet<u16> = slices
                    .iter()
                    .flat_map(|(_, s)| s.ports.iter().flatten())
                    .filter(|p| p.name.as_deref().unwrap_or_default() == name)
                    .filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok()))
                    .collect();
                if resolved.len() > 1 {
                    self.report(
                        Kind::Service,
                        key,
                        "spec.ports.targetPort",
                        format!("named target port resolves to {resolved:?} on different pods: using the lowest"),
                    );
                }
                match (&port.target_port, resolved.first()) {
                    (_, Some(n)) => Some(*n),
                    (None, None) => u16::try_from(port.port).ok(),
                    (Some(_), None) => None,
                }
            }
        }
    }

    /// The ready IPv4 endpoints of a service's slices, each once, by
    /// address: node, pod and service account from the pod it names.
    fn endpoints(
        &mut self,
        service: &Key,
        slices: &[(&Key, &EndpointSlice)],
        subset_keys: &traffic::SubsetKeys,
    ) -> Vec<Value> {
        let cluster = self.cluster;
        let mut endpoints: BTreeMap<Ipv4Addr, Value> = BTreeMap::new();
        for (key, slice) in slices {
            if slice.address_type != "IPv4" {
                self.report(
                    Kind::EndpointSlice,
                    key,
                    "addressType",
                    format!("{}: only IPv4 endpoints are meshed", slice.address_type),
                );
                continue;
            }
            for endpoint in slice.endpoints.iter().flatten() {
                if !is_ready(endpoint) {
                    continue;
                }
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .map(|r| {
                        let namespace = r.namespace.clone().unwrap_or_else(|| service.0.clone());
                        (namespace, r.name.clone().unwrap_or_default())
                    });
                if pod
                    .as_ref()
                    .is_some_and(|(namespace, _)| *namespace != service.0)
                {
                    self.report(
                        Kind::EndpointSlice,
                        key,
                        "endpoints.targetRef",
                        "a pod of another namespace: not an endpoint".into(),
                    );
                    continue;
                }
                let info = pod.as_ref().and_then(|p| cluster.pods.get(p));
                if pod.is_some() && info.is_none() {
                    // Its pod is not known yet: without it the identity a
                    // tunnel to it must prove is unknown. It comes with
                    // the pod.
                    continue;
                }
                for address in &endpoint.addresses {
                    let Ok(address) = address.parse::<Ipv4Addr>() else {
                        continue;
                    };
                    // An address its pod does not have, or a service's
                    // VIP, is no endpoint (meshd would refuse the VIP).
                    let foreign = info.is_some_and(|p| !p.addresses.contains(&address));
                    if foreign || self.vips.contains(&address) {
                        self.report(
                            Kind::EndpointSlice,
                            key,
                            "endpoints.addresses",
                            format!("{address} is not its pod's address, or is a service VIP: not an endpoint"),
                        );
                        continue;
                    }
                    endpoints
                        .entry(address)
                        .or_insert_with(|| endpoint_value(address, endpoint, info, subset_keys));
                }
            }
        }
        endpoints.into_values().collect()
    }

    /// This node's pods, as workloads named by UID and QoS class.
    fn workloads(
        &mut self,
        node: &str,
        selector_keys: &BTreeSet<String>,
        modes: &peer::Modes,
    ) -> Vec<Value> {
        let cluster = self.cluster;
        let mut workloads = Vec::new();
        let mut taken = BTreeSet::new();
        for (key, pod) in &cluster.pods {
            if pod.node.as_deref() != Some(node) || pod.finished || pod.host_network {
                continue;
            }
            let Some(qos) = pod.qos_class else {
                self.report(
                    Kind::Pod,
                    key,
                    "status.qosClass",
                    "no QoS class yet: its cgroup cannot be placed; it joins when the kubelet reports it".into(),
                );
                continue;
            };
            let valid_uid = crate::config::PodRef {
                uid: pod.uid.clone(),
                qos_class: qos,
            }
            .uid_is_valid();
            if !valid_uid {
                self.report(
                    Kind::Pod,
                    key,
                    "metadata.uid",
                    format!("{:?} cannot name a cgroup: not a workload", pod.uid),
                );
                continue;
            }
            let clash = pod
                .addresses
                .iter()
                .find(|a| self.vips.contains(a) || !taken.insert(**a));
            if let Some(address) = clash {
                self.report(
                    Kind::Pod,
                    key,
                    "status.podIPs",
                    format!("{address} is another pod's on this node, or a service VIP: not a workload until that clears"),
                );
                continue;
            }
            let mut value = workload_value(pod, qos, selector_keys);
            let mode = modes.of(&pod.namespace, &pod.labels);
            if mode != modes.mesh {
                value["mtlsMode"] = json!(mode.as_str());
            }
            workloads.push(value);
        }
        workloads
    }
}

/// The service's EndpointSlices, in name order.
fn slices_of<'a>(cluster: &'a Cluster, service: &Key) -> Vec<(&'a Key, &'a EndpointSlice)> {
    cluster
        .endpoint_slices
        .iter()
        .filter(|((namespace, _), slice)| {
            *namespace == service.0
                && slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(&service.1)
        })
        .collect()
}

/// `ready` unset means ready (the API's own rule).
fn is_ready(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> bool {
    endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false)
}

/// A service's ready IPv4 endpoint addresses, from its slices.
fn ready_addresses(cluster: &Cluster, service: &Key) -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = slices_of(cluster, service)
        .into_iter()
        .filter(|(_, slice)| slice.address_type == "IPv4")
        .flat_map(|(_, slice)| slice.endpoints.iter().flatten())
        .filter(|e| is_ready(e))
        .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

fn endpoint_value(
    address: Ipv4Addr,
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
    pod: Option<&PodInfo>,
    subset_keys: &traffic::SubsetKeys,
) -> Value {
    let mut value = Map::new();
    value.insert("address".into(), json!(address.to_string()));
    if let Some(node) = &endpoint.node_name {
        value.insert("node".into(), json!(node));
    }
    if let Some(pod) = pod {
        value.insert("workload".into(), json!(pod.name));
        value.insert("serviceAccount".into(), json!(pod.service_account));
        let labels = labels_of(&pod.labels, subset_keys);
        if !labels.is_empty() {
            value.insert("labels".into(), json!(labels));
        }
    }
    Value::Object(value)
}

fn workload_value(pod: &PodInfo, qos: QosClass, selector_keys: &BTreeSet<String>) -> Value {
    let qos = match qos {
        QosClass::Guaranteed => "Guaranteed",
        QosClass::Burstable => "Burstable",
        QosClass::BestEffort => "BestEffort",
    };
    let mut value = Map::new();
    value.insert("name".into(), json!(pod.name));
    value.insert("namespace".into(), json!(pod.namespace));
    value.insert("serviceAccount".into(), json!(pod.service_account));
    value.insert("pod".into(), json!({ "uid": pod.uid, "qosClass": qos }));
    let addresses: Vec<String> = pod.addresses.iter().map(|a| a.to_string()).collect();
    if !addresses.is_empty() {
        value.insert("addresses".into(), json!(addresses));
    }
    // The labels metrics use, and those policies select workloads on.
    let labels = labels_of(&pod.labels, selector_keys);
    if !labels.is_empty() {
        value.insert("labels".into(), json!(labels));
    }
    if !pod.probe_ports.is_empty() {
        value.insert("probePorts".into(), json!(pod.probe_ports));
    }
    Value::Object(value)
}

/// The labels metrics use, and those of `keys` (what subsets or policy
/// selectors select on).
fn labels_of<'l>(
    labels: &'l BTreeMap<String, String>,
    keys: &BTreeSet<String>,
) -> BTreeMap<&'l str, &'l str> {
    labels
        .iter()
        .filter(|(k, _)| REPORTED_LABELS.contains(&k.as_str()) || keys.contains(*k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// A Service port's protocol, as Istio selects it: `appProtocol` first,
/// then the port name's prefix (`http-web`, `grpc`, …); neither: `auto`
/// (sniffed, as Istio does). TLS and the database protocols are relayed
/// as TCP.
pub fn protocol_of(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let named = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "http-web" | "kubernetes.io/ws" | "grpc-web" => Some(Protocol::Http),
        "http2" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" => Some(Protocol::Grpc),
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
            Some(Protocol::Tcp)
        }
        _ => None,
    };
    if let Some(protocol) = app_protocol.and_then(named) {
        return protocol;
    }
    let prefix = name.map(|n| n.split_once('-').map_or(n, |(p, _)| p));
    // `grpc-web` is a name of its own, not `grpc` with a suffix.
    let name = name.map(str::to_ascii_lowercase);
    if name
        .as_deref()
        .is_some_and(|n| n == "grpc-web" || n.starts_with("grpc-web-"))
    {
        return Protocol::Http;
    }
    prefix.and_then(named).unwrap_or(Protocol::Auto)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_selected_as_istio_selects_them() {
        let cases = [
            (Some("http"), Some("tcp-x"), Protocol::Http),
            (Some("kubernetes.io/h2c"), None, Protocol::Http2),
            (Some("grpc"), None, Protocol::Grpc),
            (None, Some("http"), Protocol::Http),
            (None, Some("http-api"), Protocol::Http),
            (None, Some("http2-x"), Protocol::Http2),
            (None, Some("grpc"), Protocol::Grpc),
            (None, Some("grpc-web"), Protocol::Http),
            (None, Some("tcp-db"), Protocol::Tcp),
            (None, Some("https"), Protocol::Tcp),
            (None, Some("mongo-1"), Protocol::Tcp),
            (None, Some("web"), Protocol::Auto),
            (None, Some("httpx"), Protocol::Auto),
            (None, None, Protocol::Auto),
            (Some("unknown"), Some("grpc"), Protocol::Grpc),
        ];
        for (app, name, want) in cases {
            assert_eq!(protocol_of(app, name), want, "{app:?} {name:?}");
        }
    }

    /// A file is its header, then JSON with one line per item of a list;
    /// it reads back as the value written, as JSON and as YAML.
    #[test]
    fn a_file_is_json_with_a_line_per_item() {
        let value = json!({
            "mesh": { "trustDomain": "cluster.local" },
            "services": [{ "name": "a", "ports": [{ "port": 80 }] }, { "name": "b" }],
            "workloads": [],
        });
        let text = document("a test", value.clone());
        assert_eq!(
            text,
            "# Written by meshd discover from the cluster's objects: a test. Do not edit.\n{\n  \"mesh\": {\"trustDomain\":\"cluster.local\"},\n  \"services\": [\n    {\"name\":\"a\",\"ports\":[{\"port\":80}]},\n    {\"name\":\"b\"}\n  ],\n  \"workloads\": []\n}\n"
        );
        let body = text.split_once('\n').unwrap().1;
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), value);
        assert_eq!(serde_yaml::from_str::<Value>(&text).unwrap(), value);
        assert_eq!(document("empty", json!({})).lines().nth(1), Some("{"));
    }
}
