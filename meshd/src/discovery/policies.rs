//! Istio `AuthorizationPolicy` into meshd's `policies`. One meshd policy
//! per rule and operation (a rule's sources stay one list: any may match).
//! What meshd cannot evaluate follows Istio's own rule for what a proxy
//! cannot enforce: in an `ALLOW` it never matches (the source, operation
//! or rule holding it is left out), in a `DENY` it matches (the condition
//! is left out, so the rule matches more). Either way it is reported.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::{
    cluster::{Cluster, Key, Kind},
    crds::{AuthorizationPolicySpec, AuthorizationRule, RuleOperation, RuleSource},
    translate::Reports,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

/// Every policy's meshd policies, and the workload label keys their
/// selectors use (the workloads must carry them).
pub fn policies(
    cluster: &Cluster,
    root_namespace: &str,
    reports: &mut Reports,
) -> (Vec<Value>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut keys = BTreeSet::new();
    for (key, policy) in &cluster.authorization_policies {
        let mut report = |field: &'static str, detail: String| {
            reports.add(Kind::AuthorizationPolicy, key, field, detail)
        };
        let spec = &policy.spec;
        let action = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => {
                report("spec.action", "AUDIT decides nothing: not applied".into());
                continue;
            }
            other => {
                // An external decision meshd cannot ask for: denied where
                // it would have been asked.
                report(
                    "spec.action",
                    format!("{other}: meshd cannot ask a provider, so its rules deny"),
                );
                Action::Deny
            }
        };
        for field in spec.other.keys().filter(|f| *f != "provider") {
            report("spec", format!("{field:?} is not applied"));
        }
        let targets = targets(cluster, key, spec, root_namespace, &mut report, &mut keys);
        let rules = translate_rules(spec, action, &mut report);
        for target in &targets {
            let base = |suffix: String| {
                let mut value = Map::new();
                value.insert("name".into(), json!(format!("{}/{}{suffix}", key.0, key.1)));
                value.insert("target".into(), target.clone());
                value.insert(
                    "action".into(),
                    json!(if action == Action::Allow {
                        "allow"
                    } else {
                        "deny"
                    }),
                );
                value
            };
            if rules.is_empty() && action == Action::Allow {
                // No rule can match: the target admits only what other
                // allows do.
                let mut value = base(String::new());
                value.insert("matchesNothing".into(), json!(true));
                out.push(Value::Object(value));
            }
            for (i, rule) in rules.iter().enumerate() {
                let mut value = base(format!("[{i}]"));
                value.extend(rule.clone());
                out.push(Value::Object(value));
            }
        }
    }
    (out, keys)
}

/// What a policy protects: its `targetRefs` (Services), else its selector's
/// workloads, else every workload of its namespace (of the mesh, for the
/// root namespace).
fn targets(
    cluster: &Cluster,
    key: &Key,
    spec: &AuthorizationPolicySpec,
    root_namespace: &str,
    report: &mut dyn FnMut(&'static str, String),
    keys: &mut BTreeSet<String>,
) -> Vec<Value> {
    let refs: Vec<_> = spec.target_refs.iter().chain(&spec.target_ref).collect();
    if !refs.is_empty() {
        let mut targets = Vec::new();
        for reference in refs {
            let namespace = reference.namespace.as_deref().unwrap_or(&key.0);
            if !reference.is_service("Service") {
                report(
                    "spec.targetRefs",
                    format!(
                        "{} is no Service (a gateway's policy): not meshd's",
                        reference.name
                    ),
                );
            } else if !cluster
                .services
                .contains_key(&(namespace.to_owned(), reference.name.clone()))
            {
                report(
                    "spec.targetRefs",
                    format!(
                        "Service {namespace}/{} does not exist (yet)",
                        reference.name
                    ),
                );
            } else {
                targets.push(json!({ "service": format!("{namespace}/{}", reference.name) }));
            }
        }
        return targets;
    }
    let namespace = if key.0 == root_namespace {
        "*".to_owned()
    } else {
        key.0.clone()
    };
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    keys.extend(selector.keys().cloned());
    let mut target = Map::new();
    target.insert("namespace".into(), json!(namespace));
    if !selector.is_empty() {
        target.insert("selector".into(), json!(selector));
    }
    vec![Value::Object(target)]
}

/// A policy's rules as meshd policy bodies (`from`, `ports`, `methods`,
/// `paths`), one per rule and operation.
fn translate_rules(
    spec: &AuthorizationPolicySpec,
    action: Action,
    report: &mut dyn FnMut(&'static str, String),
) -> Vec<Map<String, Value>> {
    let mut bodies = Vec::new();
    for rule in spec.rules.iter().flatten() {
        bodies.extend(translate_rule(rule, action, report));
    }
    bodies
}

fn translate_rule(
    rule: &AuthorizationRule,
    action: Action,
    report: &mut dyn FnMut(&'static str, String),
) -> Vec<Map<String, Value>> {
    if !rule.when.is_empty() {
        if action == Action::Allow {
            report(
                "spec.rules.when",
                "conditions meshd cannot evaluate: the rule never matches".into(),
            );
            return Vec::new();
        }
        report(
            "spec.rules.when",
            "conditions meshd cannot evaluate: the rule matches without them".into(),
        );
    }
    let mut from = Vec::new();
    for source in &rule.from {
        if let Some(clause) = source_clause(&source.source, action, report) {
            from.push(clause);
        }
    }
    if !rule.from.is_empty() && from.is_empty() {
        // Every source held what an ALLOW cannot match.
        return Vec::new();
    }
    // A DENY source left with no condition matches every source.
    if from
        .iter()
        .any(|c: &Value| c.as_object().is_some_and(Map::is_empty))
    {
        from.clear();
    }
    let operations: Vec<Map<String, Value>> = if rule.to.is_empty() {
        vec![Map::new()]
    } else {
        let ops: Vec<_> = rule
            .to
            .iter()
            .filter_map(|to| operation(&to.operation, action, report))
            .collect();
        if ops.is_empty() {
            return Vec::new();
        }
        ops
    };
    operations
        .into_iter()
        .map(|mut body| {
            if !from.is_empty() {
                body.insert("from".into(), json!(from));
            }
            body
        })
        .collect()
}

/// A principal or namespace meshd matches as written: a whole value
/// (a principal as `<trust-domain>/ns/<ns>/sa/<sa>`), or `*`. Istio's
/// prefix and suffix patterns are not.
fn exact(value: &str) -> bool {
    value == "*" || !value.contains('*')
}

fn valid_principal(value: &str) -> bool {
    value == "*" || crate::spiffe::Identity::parse(&format!("spiffe://{value}")).is_ok()
}

/// A path as meshd's policies match it: exact `/a/b`, prefix `/a/*`,
/// suffix `*.json`, or `*`.
fn meshd_path(path: &str) -> bool {
    let stars = path.matches('*').count();
    path == "*"
        || (stars == 0 && path.starts_with('/'))
        || (stars == 1
            && ((path.ends_with("/*") && path.starts_with('/')) || path.starts_with('*')))
}

fn meshd_method(method: &str) -> bool {
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && hyper::Method::from_bytes(method.as_bytes()).is_ok()
}

/// One `from.source` as a meshd source clause; `None` when it cannot
/// match (ALLOW).
fn source_clause(
    source: &RuleSource,
    action: Action,
    report: &mut dyn FnMut(&'static str, String),
) -> Option<Value> {
    let mut clause = Map::new();
    for field in source.other.keys() {
        if action == Action::Allow {
            report(
                "spec.rules.from.source",
                format!("{field:?}: this source never matches"),
            );
            return None;
        }
        report(
            "spec.rules.from.source",
            format!("{field:?}: the source matches without it"),
        );
    }
    for (field, values, name) in [
        (
            "principals",
            &source.principals,
            "spec.rules.from.source.principals",
        ),
        (
            "namespaces",
            &source.namespaces,
            "spec.rules.from.source.namespaces",
        ),
    ] {
        if values.is_empty() {
            continue;
        }
        let usable = |v: &String| exact(v) && (field != "principals" || valid_principal(v));
        let patterns = values.iter().any(|v| !usable(v));
        let kept: Vec<&String> = values.iter().filter(|v| usable(v)).collect();
        match action {
            Action::Allow => {
                if patterns {
                    report(
                        name,
                        "prefix/suffix patterns (or malformed values) never match".into(),
                    );
                }
                if kept.is_empty() {
                    return None;
                }
                clause.insert(field.into(), json!(kept));
            }
            Action::Deny if patterns => {
                report(
                    name,
                    "prefix/suffix patterns (or malformed values): any authenticated source".into(),
                );
                if field == "principals" {
                    clause.insert(field.into(), json!(["*"]));
                }
            }
            Action::Deny => drop(clause.insert(field.into(), json!(kept))),
        }
    }
    Some(Value::Object(clause))
}

/// One `to.operation` as meshd's `ports`, `methods` and `paths`; `None`
/// when it cannot match (ALLOW).
fn operation(
    operation: &RuleOperation,
    action: Action,
    report: &mut dyn FnMut(&'static str, String),
) -> Option<Map<String, Value>> {
    let mut body = Map::new();
    for field in operation.other.keys() {
        if action == Action::Allow {
            report(
                "spec.rules.to.operation",
                format!("{field:?}: this operation never matches"),
            );
            return None;
        }
        report(
            "spec.rules.to.operation",
            format!("{field:?}: the operation matches without it"),
        );
    }
    if !operation.ports.is_empty() {
        let ports: Vec<u16> = operation
            .ports
            .iter()
            .filter_map(|p| p.parse().ok())
            .filter(|p| *p != 0)
            .collect();
        if ports.len() != operation.ports.len() {
            report(
                "spec.rules.to.operation.ports",
                "a port that is no number never matches".into(),
            );
            if ports.is_empty() && action == Action::Allow {
                return None;
            }
        }
        if !ports.is_empty() {
            body.insert("ports".into(), json!(ports));
        }
    }
    if !operation.methods.is_empty() {
        let kept: Vec<&String> = operation
            .methods
            .iter()
            .filter(|m| meshd_method(m))
            .collect();
        if kept.len() != operation.methods.len() {
            report(
                "spec.rules.to.operation.methods",
                "a method that is none (or not upper case) never matches".into(),
            );
        }
        match action {
            Action::Allow if kept.is_empty() => return None,
            Action::Deny if kept.len() != operation.methods.len() => {}
            _ => drop(body.insert("methods".into(), json!(kept))),
        }
    }
    if !operation.paths.is_empty() {
        // meshd's paths are Istio's: exact, `/a/*`, `*.json`, `*`; path
        // templates (`{*}`, `{**}`) are not.
        let templates = operation.paths.iter().any(|p| !meshd_path(p));
        let kept: Vec<&String> = operation.paths.iter().filter(|p| meshd_path(p)).collect();
        if templates {
            let instead = match action {
                Action::Allow => "never match",
                Action::Deny => "match every path",
            };
            report(
                "spec.rules.to.operation.paths",
                format!("path templates and other patterns {instead}"),
            );
        }
        match action {
            Action::Allow if kept.is_empty() => return None,
            Action::Allow => drop(body.insert("paths".into(), json!(kept))),
            Action::Deny if templates => {}
            Action::Deny => drop(body.insert("paths".into(), json!(kept))),
        }
    }
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The meshd policies of one AuthorizationPolicy `spec` (YAML) in
    /// namespace `shop`, and the fields reported.
    fn translated(spec: &str) -> (Vec<Value>, Vec<&'static str>) {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: shop }}\nspec: {spec}\n"
        );
        let mut cluster = Cluster::default();
        for object in super::super::manifests::parse("p.yaml".as_ref(), &text).unwrap() {
            cluster.apply(object);
        }
        let mut reports = Reports::default();
        let (policies, _) = policies(&cluster, "istio-system", &mut reports);
        (policies, reports.fields())
    }

    fn bodies(policies: &[Value]) -> Vec<Value> {
        policies
            .iter()
            .map(|p| {
                let mut p = p.as_object().unwrap().clone();
                p.remove("name");
                p.remove("target");
                Value::Object(p)
            })
            .collect()
    }

    #[test]
    fn an_allow_without_rules_matches_nothing_and_a_deny_without_rules_nothing_either() {
        let (allow, _) = translated("{}");
        assert_eq!(
            bodies(&allow),
            [json!({ "action": "allow", "matchesNothing": true })]
        );
        assert_eq!(allow[0]["target"], json!({ "namespace": "shop" }));
        let (deny, _) = translated("{ action: DENY }");
        assert!(deny.is_empty(), "{deny:?}");
        // `rules: [{}]` matches everything.
        let (all, _) = translated("{ rules: [{}] }");
        assert_eq!(bodies(&all), [json!({ "action": "allow" })]);
    }

    #[test]
    fn what_meshd_cannot_evaluate_never_matches_in_an_allow_and_always_in_a_deny() {
        let rule = "rules: [{ from: [{ source: { principals: [cluster.local/ns/a/sa/x], notNamespaces: [b] } }], to: [{ operation: { methods: [GET], notPaths: [/x] } }] }]";
        // ALLOW: the source (and the operation) cannot match: nothing is
        // allowed, so the target only admits what other allows do.
        let (allow, fields) = translated(&format!("{{ {rule} }}"));
        assert_eq!(
            bodies(&allow),
            [json!({ "action": "allow", "matchesNothing": true })]
        );
        assert_eq!(fields, ["spec.rules.from.source"]);
        // DENY: both conditions are left out; the rest still applies.
        let (deny, fields) = translated(&format!("{{ action: DENY, {rule} }}"));
        assert_eq!(
            bodies(&deny),
            [
                json!({ "action": "deny", "from": [{ "principals": ["cluster.local/ns/a/sa/x"] }], "methods": ["GET"] })
            ]
        );
        assert_eq!(
            fields,
            ["spec.rules.from.source", "spec.rules.to.operation"]
        );
        // `when`: an allow rule with it never matches, a deny rule matches
        // without it.
        let when = "rules: [{ to: [{ operation: { ports: ['8080'] } }], when: [{ key: 'request.headers[x]', values: ['1'] }] }]";
        let (allow, _) = translated(&format!("{{ {when} }}"));
        assert_eq!(
            bodies(&allow),
            [json!({ "action": "allow", "matchesNothing": true })]
        );
        let (deny, _) = translated(&format!("{{ action: DENY, {when} }}"));
        assert_eq!(
            bodies(&deny),
            [json!({ "action": "deny", "ports": [8080] })]
        );
    }

    #[test]
    fn patterns_meshd_does_not_match_narrow_an_allow_and_widen_a_deny() {
        let rule = "rules: [{ from: [{ source: { principals: [cluster.local/ns/a/sa/x, cluster.local/ns/b/*] } }], to: [{ operation: { paths: [/api/*, '/items/{*}'] } }] }]";
        let (allow, _) = translated(&format!("{{ {rule} }}"));
        assert_eq!(
            bodies(&allow),
            [
                json!({ "action": "allow", "from": [{ "principals": ["cluster.local/ns/a/sa/x"] }], "paths": ["/api/*"] })
            ]
        );
        let (deny, _) = translated(&format!("{{ action: DENY, {rule} }}"));
        assert_eq!(
            bodies(&deny),
            [json!({ "action": "deny", "from": [{ "principals": ["*"] }] })]
        );
    }

    #[test]
    fn targets_are_services_selected_workloads_or_the_namespace_and_custom_denies() {
        let (by_selector, _) =
            translated("{ selector: { matchLabels: { app: web } }, rules: [{}] }");
        assert_eq!(
            by_selector[0]["target"],
            json!({ "namespace": "shop", "selector": { "app": "web" } })
        );
        // A Service that does not exist is reported, and nothing is made
        // up for it; a Gateway target is a gateway's.
        let (missing, fields) =
            translated("{ targetRefs: [{ kind: Service, group: '', name: web }, { kind: Gateway, group: gateway.networking.k8s.io, name: gw }], rules: [{}] }");
        assert!(missing.is_empty());
        assert_eq!(fields, ["spec.targetRefs", "spec.targetRefs"]);
        // CUSTOM: meshd cannot ask the provider, so its rules deny.
        let (custom, _) =
            translated("{ action: CUSTOM, provider: { name: ext-authz }, rules: [{ to: [{ operation: { paths: [/admin/*] } }] }] }");
        assert_eq!(
            bodies(&custom),
            [json!({ "action": "deny", "paths": ["/admin/*"] })]
        );
        let (audit, fields) = translated("{ action: AUDIT, rules: [{}] }");
        assert!(audit.is_empty());
        assert_eq!(fields, ["spec.action"]);
    }
}
