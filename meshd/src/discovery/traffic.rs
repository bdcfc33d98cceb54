//! Traffic management into a service's config: Gateway API `HTTPRoute`s
//! with the Service as parent (GAMMA) become its `routes`, in the Gateway
//! API's precedence order; an Istio `DestinationRule` for its host gives
//! its balancer, circuit breaker and outlier detection.

use std::{cmp::Reverse, collections::BTreeMap, net::Ipv4Addr};

use serde_json::{json, Map, Value};

use super::{
    cluster::{age_order, Cluster, Key, Kind},
    crds::{DestinationRuleSpec, HttpRouteMatch, HttpRouteRule, Resource, TrafficPolicy},
    translate::Reports,
};

/// One match of one rule of one route, with what orders it.
struct Candidate<'a> {
    route: &'a Key,
    created: Option<k8s_openapi::jiff::Timestamp>,
    rule_index: usize,
    rule: &'a HttpRouteRule,
    matched: HttpRouteMatch,
}

impl Candidate<'_> {
    /// The Gateway API's precedence: exact paths, then the longest
    /// prefixes, then a method, then the most headers, then the most query
    /// parameters; then the oldest route, then by namespace/name, then
    /// rule order.
    fn order(&self) -> impl Ord + '_ {
        let path = self.matched.path.as_ref();
        let kind = match path
            .and_then(|p| p.type_.as_deref())
            .unwrap_or("PathPrefix")
        {
            "Exact" => 0,
            "PathPrefix" => 1,
            _ => 2,
        };
        let length = path.and_then(|p| p.value.as_ref()).map_or(1, String::len);
        (
            kind,
            Reverse(length),
            self.matched.method.is_none(),
            Reverse(self.matched.headers.len()),
            Reverse(self.matched.query_params.len()),
            self.created,
            self.route,
            self.rule_index,
        )
    }
}

/// What a service's routes need of its endpoints: the label keys their
/// backends select on.
pub type SubsetKeys = std::collections::BTreeSet<String>;

/// Reports what of the HTTPRoutes themselves meshd does not serve: parents
/// that are no Service (a gateway's routes), Services that do not exist,
/// and fields it does not read.
pub fn check_routes(cluster: &Cluster, reports: &mut Reports) {
    for (key, route) in &cluster.http_routes {
        for parent in &route.spec.parent_refs {
            let target = (
                parent.namespace.clone().unwrap_or_else(|| key.0.clone()),
                parent.name.clone(),
            );
            if !parent.is_service("Gateway") {
                reports.add(
                    Kind::HttpRoute,
                    key,
                    "spec.parentRefs",
                    format!(
                        "parent {} is no Service (a gateway's route): not meshd's",
                        parent.name
                    ),
                );
            } else if !cluster.services.contains_key(&target) {
                reports.add(
                    Kind::HttpRoute,
                    key,
                    "spec.parentRefs",
                    format!("parent Service {}/{} does not exist", target.0, target.1),
                );
            } else if parent.section_name.is_some() {
                reports.add(
                    Kind::HttpRoute,
                    key,
                    "spec.parentRefs.sectionName",
                    "applies to every HTTP port of the Service".into(),
                );
            }
        }
        if !route.spec.hostnames.is_empty() {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec.hostnames",
                "a Service parent's route ignores hostnames (GAMMA)".into(),
            );
        }
        for field in route.spec.other.keys() {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec",
                format!("{field:?} is not applied"),
            );
        }
    }
}

/// The service's `routes` from every HTTPRoute with it as parent.
pub fn routes(
    cluster: &Cluster,
    service: &Key,
    endpoints: &dyn Fn(&Key) -> Vec<Ipv4Addr>,
    reports: &mut Reports,
    keys: &mut SubsetKeys,
) -> Vec<Value> {
    let mut candidates = Vec::new();
    for (key, route) in &cluster.http_routes {
        let parent = route.spec.parent_refs.iter().any(|p| {
            p.is_service("Gateway")
                && p.name == service.1
                && p.namespace.as_deref().unwrap_or(&key.0) == service.0
        });
        if !parent {
            continue;
        }
        if key.0 != service.0 {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec.parentRefs",
                format!(
                    "a route from namespace {} for {}/{} applies only to its own namespace's clients, which meshd cannot tell apart: not applied",
                    key.0, service.0, service.1
                ),
            );
            continue;
        }
        let created = age_order(&route.metadata, key).0;
        for (rule_index, rule) in route.spec.rules.iter().enumerate() {
            let matches = if rule.matches.is_empty() {
                vec![HttpRouteMatch::default()]
            } else {
                rule.matches.clone()
            };
            for matched in matches {
                candidates.push(Candidate {
                    route: key,
                    created,
                    rule_index,
                    rule,
                    matched,
                });
            }
        }
    }
    candidates.sort_by(|a, b| a.order().cmp(&b.order()));
    let mut routes = Vec::new();
    for candidate in &candidates {
        if let Some(route) = route_value(cluster, service, candidate, endpoints, reports, keys) {
            routes.push(route);
        }
    }
    routes
}

fn route_value(
    cluster: &Cluster,
    service: &Key,
    candidate: &Candidate<'_>,
    endpoints: &dyn Fn(&Key) -> Vec<Ipv4Addr>,
    reports: &mut Reports,
    keys: &mut SubsetKeys,
) -> Option<Value> {
    let key = candidate.route;
    let rule = candidate.rule;
    let matched = &candidate.matched;
    if !matched.query_params.is_empty() {
        reports.add(
            Kind::HttpRoute,
            key,
            "spec.rules.matches.queryParams",
            "query parameter matches: this match never matches".into(),
        );
        return None;
    }
    let mut condition = Map::new();
    if let Some(path) = &matched.path {
        let value = path.value.clone().unwrap_or_else(|| "/".to_owned());
        let path = match path.type_.as_deref().unwrap_or("PathPrefix") {
            "Exact" => json!({ "exact": value }),
            "PathPrefix" => json!({ "prefix": value }),
            _ => {
                let regex = format!("^(?:{value})$");
                if regex::Regex::new(&regex).is_err() {
                    reports.add(
                        Kind::HttpRoute,
                        key,
                        "spec.rules.matches.path",
                        format!("{value:?} is no regular expression meshd reads: this match never matches"),
                    );
                    return None;
                }
                json!({ "regex": regex })
            }
        };
        condition.insert("path".into(), path);
    }
    if let Some(method) = &matched.method {
        if hyper::Method::from_bytes(method.as_bytes()).is_err() {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec.rules.matches.method",
                format!("{method:?} is no method: this match never matches"),
            );
            return None;
        }
        condition.insert("method".into(), json!(method));
    }
    let mut headers = BTreeMap::new();
    for header in &matched.headers {
        if header.type_.as_deref().unwrap_or("Exact") != "Exact" {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec.rules.matches.headers.type",
                format!(
                    "header {:?} by regular expression: this match never matches",
                    header.name
                ),
            );
            return None;
        }
        let name = header.name.to_ascii_lowercase();
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec.rules.matches.headers.name",
                format!(
                    "{:?} is no header name: this match never matches",
                    header.name
                ),
            );
            return None;
        }
        headers.insert(name, header.value.clone());
    }
    if !headers.is_empty() {
        condition.insert("headers".into(), json!(headers));
    }
    if !rule.filters.is_empty() {
        reports.add(
            Kind::HttpRoute,
            key,
            "spec.rules.filters",
            "filters (header changes, redirects, rewrites, mirrors) are not applied".into(),
        );
    }
    for field in rule.other.keys() {
        reports.add(
            Kind::HttpRoute,
            key,
            "spec.rules",
            format!("{field:?} is not applied"),
        );
    }
    let to = backends(cluster, service, key, rule, endpoints, reports, keys);
    if to.is_empty() {
        reports.add(
            Kind::HttpRoute,
            key,
            "spec.rules.backendRefs",
            format!(
                "rule {} has no backend meshd can serve: not applied",
                candidate.rule_index
            ),
        );
        return None;
    }
    let name = match &rule.name {
        Some(name) => format!("{}.{}", key.1, name),
        None => format!("{}.{}", key.1, candidate.rule_index),
    };
    let mut route = Map::new();
    route.insert("name".into(), json!(name));
    if !condition.is_empty() {
        route.insert("match".into(), Value::Object(condition));
    }
    route.insert("to".into(), json!(to));
    let timeouts = rule.timeouts.as_ref();
    if let Some(timeout) = duration(timeouts.and_then(|t| t.request.as_deref()), key, reports) {
        route.insert("timeout".into(), json!(timeout));
    }
    let per_try = duration(
        timeouts.and_then(|t| t.backend_request.as_deref()),
        key,
        reports,
    );
    if rule.retry.is_some() || per_try.is_some() {
        let mut retries = Map::new();
        retries.insert("retryOn".into(), json!(["connect-failure"]));
        if let Some(retry) = &rule.retry {
            if let Some(attempts) = retry.attempts {
                retries.insert("maxRetries".into(), json!(attempts));
            }
            if !retry.codes.is_empty() {
                retries.insert("statuses".into(), json!(retry.codes));
            }
            if let Some(backoff) = duration(retry.backoff.as_deref(), key, reports) {
                retries.insert("backoffBase".into(), json!(backoff));
            }
        }
        if let Some(per_try) = per_try {
            retries.insert("perTryTimeout".into(), json!(per_try));
        }
        route.insert("retries".into(), Value::Object(retries));
    }
    Some(Value::Object(route))
}

/// A rule's weighted backends as subsets of the parent's endpoints: the
/// parent itself is every endpoint; another Service is its selector, when
/// all its endpoints are the parent's too (the GAMMA split: `reviews-v1`
/// inside `reviews`).
fn backends(
    cluster: &Cluster,
    service: &Key,
    route: &Key,
    rule: &HttpRouteRule,
    endpoints: &dyn Fn(&Key) -> Vec<Ipv4Addr>,
    reports: &mut Reports,
    keys: &mut SubsetKeys,
) -> Vec<Value> {
    let parent = endpoints(service);
    let mut to = Vec::new();
    for backend in &rule.backend_refs {
        let weight = backend.weight.unwrap_or(1);
        if weight == 0 {
            continue;
        }
        if !backend.filters.is_empty() {
            reports.add(
                Kind::HttpRoute,
                route,
                "spec.rules.backendRefs.filters",
                "backend filters are not applied".into(),
            );
        }
        let target = (
            backend.namespace.clone().unwrap_or_else(|| route.0.clone()),
            backend.name.clone(),
        );
        if !backend.is_service("Service") {
            reports.add(
                Kind::HttpRoute,
                route,
                "spec.rules.backendRefs.kind",
                format!("backend {} is no Service: dropped", target.1),
            );
            continue;
        }
        if &target == service {
            to.push(json!({ "weight": weight }));
            continue;
        }
        let selector = cluster
            .services
            .get(&target)
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty());
        let inside = {
            let own = endpoints(&target);
            own.iter().all(|a| parent.contains(a))
        };
        match selector {
            Some(selector) if inside => {
                keys.extend(selector.keys().cloned());
                to.push(json!({ "subset": selector, "weight": weight }));
            }
            _ => reports.add(
                Kind::HttpRoute,
                route,
                "spec.rules.backendRefs",
                format!(
                    "backend {}/{} is not a subset of {}/{}'s pods by its selector: dropped",
                    target.0, target.1, service.0, service.1
                ),
            ),
        }
    }
    to
}

/// A Gateway API duration (`10s`, `500ms`, `1h30m`) as meshd writes it;
/// `0s` (no limit) and an unreadable one (reported) are none.
fn duration(text: Option<&str>, key: &Key, reports: &mut Reports) -> Option<String> {
    let text = text?;
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => None,
        Ok(d) => Some(humantime::format_duration(d).to_string().replace(' ', "")),
        Err(_) => {
            reports.add(
                Kind::HttpRoute,
                key,
                "spec.rules.timeouts",
                format!("{text:?} is not a duration: not applied"),
            );
            None
        }
    }
}

/// The DestinationRule that applies to a service: the oldest whose host
/// names it (`name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>`);
/// others for the same host are reported.
pub fn destination_rule<'a>(
    cluster: &'a Cluster,
    service: &Key,
    reports: &mut Reports,
) -> Option<(&'a Key, &'a Resource<DestinationRuleSpec>)> {
    let mut rules: Vec<_> = cluster
        .destination_rules
        .iter()
        .filter(|(key, rule)| names(&rule.spec.host, &key.0, service))
        .collect();
    rules.sort_by_cached_key(|(key, rule)| age_order(&rule.metadata, key));
    for (key, _) in rules.iter().skip(1) {
        reports.add(
            Kind::DestinationRule,
            key,
            "spec.host",
            format!(
                "an older DestinationRule is {}/{}'s: this one is not applied",
                service.0, service.1
            ),
        );
    }
    rules.into_iter().next()
}

fn names(host: &str, rule_namespace: &str, service: &Key) -> bool {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default();
    let namespace = parts.next().unwrap_or(rule_namespace);
    let svc = parts.next();
    name == service.1 && namespace == service.0 && svc.is_none_or(|s| s == "svc")
}

/// A DestinationRule's traffic policy as a service's fields.
pub fn traffic_policy(
    key: &Key,
    rule: &Resource<DestinationRuleSpec>,
    reports: &mut Reports,
) -> Map<String, Value> {
    let spec = &rule.spec;
    let mut report = |field: &'static str, detail: String| {
        reports.add(Kind::DestinationRule, key, field, detail);
    };
    let mut fields = Map::new();
    if spec.host.contains('*') {
        report("spec.host", "wildcard hosts are not applied".into());
        return fields;
    }
    if !spec.export_to.is_empty() {
        report(
            "spec.exportTo",
            "applies to every client, not only those it is exported to".into(),
        );
    }
    if spec.workload_selector.is_some() {
        report(
            "spec.workloadSelector",
            "applies to every client, not only the selected".into(),
        );
    }
    for subset in spec.subsets.iter().filter(|s| s.traffic_policy.is_some()) {
        report(
            "spec.subsets.trafficPolicy",
            format!("subset {:?}'s own policy is not applied", subset.name),
        );
    }
    for field in spec.other.keys() {
        report("spec", format!("{field:?} is not applied"));
    }
    let Some(policy) = &spec.traffic_policy else {
        return fields;
    };
    policy_fields(policy, &mut fields, &mut report);
    fields
}

fn policy_fields(
    policy: &TrafficPolicy,
    fields: &mut Map<String, Value>,
    report: &mut dyn FnMut(&'static str, String),
) {
    for field in policy.other.keys() {
        report("spec.trafficPolicy", format!("{field:?} is not applied"));
    }
    if let Some(lb) = &policy.load_balancer {
        match lb.simple.as_deref() {
            None | Some("UNSPECIFIED") => {}
            Some("ROUND_ROBIN") => drop(fields.insert("loadBalancer".into(), json!("round-robin"))),
            Some("LEAST_REQUEST" | "LEAST_CONN") => {
                drop(fields.insert("loadBalancer".into(), json!("least-request")))
            }
            Some("RANDOM") => drop(fields.insert("loadBalancer".into(), json!("random"))),
            Some(other) => report(
                "spec.trafficPolicy.loadBalancer.simple",
                format!("{other:?}: meshd's default balancer is used"),
            ),
        }
        for field in lb.other.keys() {
            report(
                "spec.trafficPolicy.loadBalancer",
                format!("{field:?}: meshd's default balancer is used"),
            );
        }
    }
    if let Some(pool) = &policy.connection_pool {
        let mut breaker = Map::new();
        if let Some(tcp) = &pool.tcp {
            if let Some(n) = tcp.max_connections {
                breaker.insert("maxConnections".into(), json!(n));
            }
            for field in tcp.other.keys() {
                report(
                    "spec.trafficPolicy.connectionPool.tcp",
                    format!("{field:?} is not applied"),
                );
            }
        }
        if let Some(http) = &pool.http {
            if let Some(n) = http.http2_max_requests {
                breaker.insert("maxRequests".into(), json!(n));
            }
            if let Some(n) = http.http1_max_pending_requests {
                breaker.insert("maxPendingRequests".into(), json!(n));
            }
            for field in http.other.keys() {
                report(
                    "spec.trafficPolicy.connectionPool.http",
                    format!("{field:?} is not applied"),
                );
            }
        }
        if !breaker.is_empty() {
            fields.insert("circuitBreaker".into(), Value::Object(breaker));
        }
    }
    if let Some(outlier) = &policy.outlier_detection {
        let mut detection = Map::new();
        let errors = outlier
            .consecutive_5xx_errors
            .or(outlier.consecutive_gateway_errors)
            .or(outlier.consecutive_errors)
            .unwrap_or(5);
        if errors > 0 {
            detection.insert("consecutiveErrors".into(), json!(errors));
            if let Some(base) = outlier
                .base_ejection_time
                .as_deref()
                .and_then(|t| humantime::parse_duration(t).ok())
            {
                if base.is_zero() {
                    report(
                        "spec.trafficPolicy.outlierDetection.baseEjectionTime",
                        "0: meshd's default is used".into(),
                    );
                } else {
                    // meshd's longest ejection (300s by default) is never
                    // shorter than the first.
                    let longest = base.max(std::time::Duration::from_secs(300));
                    let format = |d| humantime::format_duration(d).to_string().replace(' ', "");
                    detection.insert("baseEjectionTime".into(), json!(format(base)));
                    detection.insert("maxEjectionTime".into(), json!(format(longest)));
                }
            }
            // Istio's (Envoy's) default share, not meshd's.
            let percent = outlier.max_ejection_percent.unwrap_or(10).min(100);
            detection.insert("maxEjectionPercent".into(), json!(percent));
            fields.insert("outlierDetection".into(), Value::Object(detection));
        }
        for field in outlier.other.keys() {
            report(
                "spec.trafficPolicy.outlierDetection",
                format!(
                    "{field:?} is not applied (meshd ejects on failures in a row as they happen)"
                ),
            );
        }
    }
    if let Some(tls) = &policy.tls {
        if tls.mode.as_deref().is_some_and(|m| m != "ISTIO_MUTUAL") || !tls.other.is_empty() {
            report(
                "spec.trafficPolicy.tls",
                "meshd's own mutual TLS is used between nodes".into(),
            );
        }
    }
}
