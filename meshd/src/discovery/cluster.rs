//! What discovery knows of the cluster: the objects it translates, kept
//! by kind and `namespace/name` in sorted maps, so the same objects give
//! the same files whatever order they arrived in. Pods are held as the
//! few fields meshd needs, never as whole objects.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use super::crds::{
    AuthorizationPolicySpec, DestinationRuleSpec, HttpRouteSpec, PeerAuthenticationSpec, Resource,
};
use crate::config::QosClass;

/// `namespace`, `name` (cluster-scoped objects: an empty namespace).
pub type Key = (String, String);

/// The kinds discovery reads; every other kind in a manifest is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
    HttpRoute,
    DestinationRule,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    /// The kind's name, as `kind:` spells it (and as metrics label it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Pod => "Pod",
            Self::Node => "Node",
            Self::HttpRoute => "HTTPRoute",
            Self::DestinationRule => "DestinationRule",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// The kind an object's `apiVersion` and `kind` name, when discovery
    /// reads it.
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Self::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Self::EndpointSlice),
            ("v1", "Pod") => Some(Self::Pod),
            ("v1", "Node") => Some(Self::Node),
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                Some(Self::HttpRoute)
            }
            (
                "networking.istio.io/v1"
                | "networking.istio.io/v1beta1"
                | "networking.istio.io/v1alpha3",
                "DestinationRule",
            ) => Some(Self::DestinationRule),
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                Some(Self::PeerAuthentication)
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                Some(Self::AuthorizationPolicy)
            }
            _ => None,
        }
    }
}

/// One object as it arrived, typed.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    Node(Box<Node>),
    HttpRoute(Box<Resource<HttpRouteSpec>>),
    DestinationRule(Box<Resource<DestinationRuleSpec>>),
    PeerAuthentication(Box<Resource<PeerAuthenticationSpec>>),
    AuthorizationPolicy(Box<Resource<AuthorizationPolicySpec>>),
}

/// Why an object could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {key}: {message}")]
pub struct ObjectError {
    pub kind: &'static str,
    /// `namespace/name`, as far as it could be read.
    pub key: String,
    pub message: String,
}

impl Object {
    /// Reads an object of a kind discovery reads from its YAML (or JSON)
    /// form; `Ok(None)` for any other kind.
    pub fn from_value(value: serde_yaml::Value) -> Result<Option<Self>, ObjectError> {
        let text = |field: &str| {
            value
                .get(field)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let api_version = text("apiVersion");
        let Some(kind) = Kind::of(&api_version, &text("kind")) else {
            if api_version.starts_with("security.istio.io/") {
                // Leaving a policy out would give more access than it
                // does (RequestAuthentication, …): refused.
                return Err(ObjectError {
                    kind: "security.istio.io",
                    key: text("kind"),
                    message: "is not translated by meshd: files without it would give more access than the cluster does, so none are written".into(),
                });
            }
            return Ok(None);
        };
        let metadata = value.get("metadata");
        let meta = |field: &str| {
            metadata
                .and_then(|m| m.get(field))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
        };
        let key = format!("{}/{}", meta("namespace"), meta("name"));
        let failed = |err: serde_yaml::Error| ObjectError {
            kind: kind.as_str(),
            key: key.clone(),
            message: err.to_string(),
        };
        Ok(Some(match kind {
            Kind::Service => Self::Service(Box::new(Service::deserialize(value).map_err(failed)?)),
            Kind::EndpointSlice => {
                Self::EndpointSlice(Box::new(EndpointSlice::deserialize(value).map_err(failed)?))
            }
            Kind::Pod => Self::Pod(Box::new(Pod::deserialize(value).map_err(failed)?)),
            Kind::Node => Self::Node(Box::new(Node::deserialize(value).map_err(failed)?)),
            Kind::HttpRoute => {
                Self::HttpRoute(Box::new(Resource::deserialize(value).map_err(failed)?))
            }
            Kind::DestinationRule => {
                Self::DestinationRule(Box::new(Resource::deserialize(value).map_err(failed)?))
            }
            Kind::PeerAuthentication => {
                Self::PeerAuthentication(Box::new(Resource::deserialize(value).map_err(failed)?))
            }
            Kind::AuthorizationPolicy => {
                Self::AuthorizationPolicy(Box::new(Resource::deserialize(value).map_err(failed)?))
            }
        }))
    }
}

/// A pod, as much of it as meshd needs: identity, placement, labels,
/// addresses, and for this node's pods what places their cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// The UID its cgroup is named after: `metadata.uid`, or for a static
    /// pod's mirror the `kubernetes.io/config.mirror` annotation.
    pub uid: String,
    pub node: Option<String>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<Ipv4Addr>,
    pub qos_class: Option<QosClass>,
    /// Shares the node's network: not a workload meshd can tell apart.
    pub host_network: bool,
    /// Ended (`Succeeded` or `Failed`): no longer a workload.
    pub finished: bool,
    /// Ports the kubelet probes (HTTP, TCP and gRPC probes of every
    /// container, named ports resolved).
    pub probe_ports: Vec<u16>,
}

/// The annotation a static pod's mirror carries: the UID the kubelet
/// named the pod's cgroup after.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mirror = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR_ANNOTATION));
        let uid = mirror.or(meta.uid.as_ref()).cloned().unwrap_or_default();
        let mut addresses: Vec<Ipv4Addr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if addresses.is_empty() {
            addresses.extend(
                status
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
            );
        }
        let qos_class = status
            .and_then(|s| s.qos_class.as_deref())
            .and_then(|q| match q {
                "Guaranteed" => Some(QosClass::Guaranteed),
                "Burstable" => Some(QosClass::Burstable),
                "BestEffort" => Some(QosClass::BestEffort),
                _ => None,
            });
        let phase = status.and_then(|s| s.phase.as_deref());
        Self {
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            name: meta.name.clone().unwrap_or_default(),
            uid,
            node: spec.and_then(|s| s.node_name.clone()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            labels: meta.labels.clone().unwrap_or_default(),
            addresses,
            qos_class,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            probe_ports: spec.map(probe_ports).unwrap_or_default(),
        }
    }
}

/// The ports of every container's HTTP, TCP and gRPC probes (liveness,
/// readiness, startup), named ports resolved against the container's own.
fn probe_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut ports = Vec::new();
    for container in &spec.containers {
        let named = |name: &str| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let resolve = |port: &IntOrString| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => named(name),
        };
        let probes = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        for probe in probes.into_iter().flatten() {
            ports.extend(probe.http_get.as_ref().and_then(|h| resolve(&h.port)));
            ports.extend(probe.tcp_socket.as_ref().and_then(|t| resolve(&t.port)));
            ports.extend(probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()));
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// One change a watch reports (kube-rs's `watcher::Event`, typed as an
/// `Object`): an object applied or deleted, or a relist — `Init`, then
/// the listed objects, then `InitDone`, after which what was not listed
/// is gone.
#[derive(Debug, Clone)]
pub enum Change {
    Apply(Object),
    Delete(Kind, Key),
    Init(Kind),
    InitApply(Object),
    InitDone(Kind),
}

impl Change {
    /// The kind the change is of.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Apply(object) | Self::InitApply(object) => object.kind(),
            Self::Delete(kind, _) | Self::Init(kind) | Self::InitDone(kind) => *kind,
        }
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Pod(_) => Kind::Pod,
            Self::Node(_) => Kind::Node,
            Self::HttpRoute(_) => Kind::HttpRoute,
            Self::DestinationRule(_) => Kind::DestinationRule,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// Its `namespace`, `name`.
    pub fn key(&self) -> Key {
        key_of(match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::DestinationRule(o) => &o.metadata,
            Self::PeerAuthentication(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
        })
    }
}

/// Everything discovery knows, by kind and key.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub services: BTreeMap<Key, Service>,
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    pub pods: BTreeMap<Key, PodInfo>,
    pub nodes: BTreeMap<String, Node>,
    pub http_routes: BTreeMap<Key, Resource<HttpRouteSpec>>,
    pub destination_rules: BTreeMap<Key, Resource<DestinationRuleSpec>>,
    pub peer_authentications: BTreeMap<Key, Resource<PeerAuthenticationSpec>>,
    pub authorization_policies: BTreeMap<Key, Resource<AuthorizationPolicySpec>>,
    /// Kinds being relisted: what the relist has brought so far.
    relisting: BTreeMap<Kind, Box<Cluster>>,
}

/// Oldest first, then by namespace/name: the order Istio and the Gateway
/// API settle conflicts between objects in (no timestamp, as in manifests:
/// first).
pub fn age_order(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &Key,
) -> (Option<k8s_openapi::jiff::Timestamp>, Key) {
    (meta.creation_timestamp.as_ref().map(|t| t.0), key.clone())
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Cluster {
    /// Adds an object, or replaces the one of its kind and key.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Service(s) => {
                self.services.insert(key_of(&s.metadata), *s);
            }
            Object::EndpointSlice(s) => {
                self.endpoint_slices.insert(key_of(&s.metadata), *s);
            }
            Object::Pod(p) => {
                self.pods.insert(key_of(&p.metadata), PodInfo::from_pod(&p));
            }
            Object::Node(n) => {
                self.nodes.insert(key_of(&n.metadata).1, *n);
            }
            Object::HttpRoute(r) => {
                self.http_routes.insert(key_of(&r.metadata), *r);
            }
            Object::DestinationRule(r) => {
                self.destination_rules.insert(key_of(&r.metadata), *r);
            }
            Object::PeerAuthentication(r) => {
                self.peer_authentications.insert(key_of(&r.metadata), *r);
            }
            Object::AuthorizationPolicy(r) => {
                self.authorization_policies.insert(key_of(&r.metadata), *r);
            }
        }
    }

    /// Applies one watch change. Objects of a kind being relisted are
    /// collected apart and replace the kind's whole set at `InitDone`, so a
    /// restarted watch drops what was deleted while it was away.
    pub fn change(&mut self, change: Change) {
        match change {
            Change::Apply(object) => self.apply(object),
            Change::Delete(kind, key) => self.delete(kind, &key),
            Change::Init(kind) => drop(self.relisting.insert(kind, Box::default())),
            Change::InitApply(object) => match self.relisting.get_mut(&object.kind()) {
                Some(pending) => pending.apply(object),
                None => self.apply(object),
            },
            Change::InitDone(kind) => {
                let mut listed = self.relisting.remove(&kind).unwrap_or_default();
                self.take_kind(&mut listed, kind);
            }
        }
    }

    /// Replaces this cluster's objects of `kind` by `other`'s.
    fn take_kind(&mut self, other: &mut Cluster, kind: Kind) {
        use std::mem::take;
        match kind {
            Kind::Service => self.services = take(&mut other.services),
            Kind::EndpointSlice => self.endpoint_slices = take(&mut other.endpoint_slices),
            Kind::Pod => self.pods = take(&mut other.pods),
            Kind::Node => self.nodes = take(&mut other.nodes),
            Kind::HttpRoute => self.http_routes = take(&mut other.http_routes),
            Kind::DestinationRule => self.destination_rules = take(&mut other.destination_rules),
            Kind::PeerAuthentication => {
                self.peer_authentications = take(&mut other.peer_authentications)
            }
            Kind::AuthorizationPolicy => {
                self.authorization_policies = take(&mut other.authorization_policies)
            }
        }
    }

    /// Removes the object of `kind` at `key`, if it is known.
    pub fn delete(&mut self, kind: Kind, key: &Key) {
        match kind {
            Kind::Service => drop(self.services.remove(key)),
            Kind::EndpointSlice => drop(self.endpoint_slices.remove(key)),
            Kind::Pod => drop(self.pods.remove(key)),
            Kind::Node => drop(self.nodes.remove(&key.1)),
            Kind::HttpRoute => drop(self.http_routes.remove(key)),
            Kind::DestinationRule => drop(self.destination_rules.remove(key)),
            Kind::PeerAuthentication => drop(self.peer_authentications.remove(key)),
            Kind::AuthorizationPolicy => drop(self.authorization_policies.remove(key)),
        }
    }
}
