//! The custom resources discovery reads — Gateway API `HTTPRoute`, Istio
//! `DestinationRule` and `PeerAuthentication` — as far as meshd uses them.
//! Every other field lands in `other`, so it can be reported by name
//! instead of being dropped unseen.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

/// Fields of an object meshd does not read, by name.
pub type Other = BTreeMap<String, Value>;

/// A namespaced custom resource: its metadata and `spec`.
#[derive(Debug, Clone, Deserialize)]
pub struct Resource<S> {
    pub metadata: ObjectMeta,
    pub spec: S,
}

// === Gateway API ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<Reference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
    #[serde(flatten)]
    pub other: Other,
}

/// A `parentRef` or `backendRef`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub section_name: Option<String>,
    /// Backends only; default 1.
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<Value>,
}

impl Reference {
    /// Whether it names a core `Service` (`group: ""`, `kind: Service`);
    /// `default_kind` is what an absent `kind` means (parents: Gateway,
    /// backends: Service).
    pub fn is_service(&self, default_kind: &str) -> bool {
        let group = self
            .group
            .as_deref()
            .unwrap_or(if default_kind == "Service" {
                ""
            } else {
                "gateway.networking.k8s.io"
            });
        let kind = self.kind.as_deref().unwrap_or(default_kind);
        (group.is_empty() || group == "core") && kind == "Service"
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<Reference>,
    #[serde(default)]
    pub filters: Vec<Value>,
    pub timeouts: Option<HttpRouteTimeouts>,
    pub retry: Option<HttpRouteRetry>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    pub method: Option<String>,
    #[serde(default)]
    pub query_params: Vec<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Default `/`.
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpHeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
}

// === Istio ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Option<Value>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub simple: Option<String>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    pub max_connections: Option<u32>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_errors: Option<u32>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: Option<String>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<Value>,
    pub mtls: Option<Mtls>,
    pub port_level_mtls: Option<Value>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Mtls {
    /// `UNSET`, `DISABLE`, `PERMISSIVE` or `STRICT`.
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_refs: Vec<Reference>,
    pub target_ref: Option<Reference>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    pub action: Option<String>,
    /// Absent: an `ALLOW` matches nothing, a `DENY` nothing.
    pub rules: Option<Vec<AuthorizationRule>>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthorizationRule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: RuleSource,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Every other condition (`notPrincipals`, `ipBlocks`, …).
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: RuleOperation,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleOperation {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    /// Every other condition (`hosts`, `notPaths`, …).
    #[serde(flatten)]
    pub other: Other,
}
