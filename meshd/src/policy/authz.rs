//! Authorization, with Istio's semantics, evaluated where the destination
//! runs: a workload no policy selects allows everything; a matching `deny`
//! wins; once an `allow` policy selects a workload, only matches pass.
//! Policies may name HTTP methods, paths and headers (L7); those are
//! checked per request on HTTP ports. On a plain TCP connection (no request
//! to look at) Istio's rule holds: an `allow` with L7 conditions never
//! matches, a `deny` with L7 conditions matches on its other conditions.
//! Pure: a snapshot in, a decision out.

use std::sync::Arc;

use crate::spiffe::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A validated authorization policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: Arc<str>,
    /// What it protects.
    pub target: Target,
    /// Matches nothing (an allow that only closes its target).
    pub nothing: bool,
    pub action: PolicyAction,
    pub from: Vec<PolicySource>,
    pub ports: Vec<u16>,
    /// L7 conditions; a policy with any is an HTTP policy.
    pub methods: Vec<hyper::Method>,
    pub paths: Vec<String>,
    pub headers: Vec<(hyper::header::HeaderName, String)>,
}

impl Policy {
    /// Whether the policy says anything about HTTP requests.
    pub fn is_http(&self) -> bool {
        !(self.methods.is_empty() && self.paths.is_empty() && self.headers.is_empty())
    }
}

/// What a policy protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The endpoints of a service (an index into `Config::services`).
    Service(usize),
    /// The workloads of a namespace (of every namespace: `None`) whose
    /// labels hold every pair of `selector` (Istio's workload selector).
    Workloads {
        namespace: Option<Arc<str>>,
        selector: Vec<(String, String)>,
    },
}

impl Target {
    fn applies(&self, destination: &Destination<'_>) -> bool {
        match self {
            Self::Service(service) => destination.services.contains(service),
            Self::Workloads {
                namespace,
                selector,
            } => destination.workload.is_some_and(|(ns, labels)| {
                namespace.as_deref().is_none_or(|want| want == ns)
                    && selector
                        .iter()
                        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            }),
        }
    }
}

/// The endpoint a connection or request goes to, as policies select it:
/// the services it backs, and the workload it is (namespace and labels)
/// when it is one of this node's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Destination<'a> {
    pub services: &'a [usize],
    pub workload: Option<(&'a str, &'a std::collections::BTreeMap<String, String>)>,
}

/// A source clause; every non-empty list must match.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    /// Principals (`<td>/ns/<ns>/sa/<sa>`); `*` matches any.
    pub principals: Vec<String>,
    pub namespaces: Vec<String>,
}

/// What is being decided: who connects, to which endpoint, on which
/// (target) port.
pub struct Request<'a> {
    /// The peer's proven identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub destination: Destination<'a>,
    pub port: u16,
    /// The HTTP request, when one is being decided (L7).
    pub http: Option<Http<'a>>,
}

/// What L7 rules look at.
#[derive(Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a hyper::Method,
    pub path: &'a str,
    pub headers: &'a hyper::HeaderMap,
}

/// Whether the policies for `destination` need each HTTP request decided
/// on its own (some policy there has L7 conditions).
pub fn needs_requests(policies: &[Policy], destination: &Destination<'_>) -> bool {
    policies
        .iter()
        .any(|p| p.target.applies(destination) && p.is_http())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by a matching deny policy, or by no allow policy matching.
    Deny {
        reason: Arc<str>,
    },
}

/// How plaintext that reaches `destination` without meshd (no principal,
/// no request to look at) would be decided: whether it is admitted on the
/// ports no policy names, and each named port where the answer differs.
/// Enforced in the kernel, since meshd never sees it.
pub fn plaintext(policies: &[Policy], destination: &Destination<'_>) -> (bool, Vec<(u16, bool)>) {
    let admitted = |port| {
        let request = Request {
            source: None,
            destination: *destination,
            port,
            http: None,
        };
        authorize(policies, &request) == Decision::Allow
    };
    // No policy names port 0: it stands for every port none names.
    let others = admitted(0);
    let mut named: Vec<u16> = policies
        .iter()
        .filter(|p| p.target.applies(destination))
        .flat_map(|p| p.ports.iter().copied())
        .collect();
    named.sort_unstable();
    named.dedup();
    let differing = named
        .into_iter()
        .map(|port| (port, admitted(port)))
        .filter(|(_, admitted)| *admitted != others)
        .collect();
    (others, differing)
}

pub fn authorize(policies: &[Policy], request: &Request<'_>) -> Decision {
    let selected = || {
        policies
            .iter()
            .filter(|p| p.target.applies(&request.destination))
    };
    if let Some(deny) = selected()
        .filter(|p| p.action == PolicyAction::Deny)
        .find(|p| matches(p, request))
    {
        return Decision::Deny {
            reason: format!("denied by policy {}", deny.name).into(),
        };
    }
    let mut allows = selected()
        .filter(|p| p.action == PolicyAction::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|p| matches(p, request)) {
        Decision::Allow
    } else {
        Decision::Deny {
            reason: "no allow policy matched".into(),
        }
    }
}

fn matches(policy: &Policy, request: &Request<'_>) -> bool {
    if policy.nothing {
        return false;
    }
    let port = policy.ports.is_empty() || policy.ports.contains(&request.port);
    let from = policy.from.is_empty()
        || policy
            .from
            .iter()
            .any(|f| source_matches(f, request.source));
    let l7 = !policy.is_http()
        || match &request.http {
            Some(http) => http_matches(policy, http),
            None => policy.action == PolicyAction::Deny,
        };
    port && from && l7
}

fn http_matches(policy: &Policy, http: &Http<'_>) -> bool {
    let method = policy.methods.is_empty() || policy.methods.contains(http.method);
    // A deny rule's paths match whatever the case: a backend that serves
    // `/ADMIN` as `/admin` must not be a way around it. (An allow rule
    // matches exactly: allowing more than written is no safe default.)
    let deny = policy.action == PolicyAction::Deny;
    let path = policy.paths.is_empty()
        || policy.paths.iter().any(|p| {
            if deny {
                path_matches(&p.to_ascii_lowercase(), &http.path.to_ascii_lowercase())
            } else {
                path_matches(p, http.path)
            }
        });
    let headers = policy.headers.iter().all(|(name, want)| {
        http.headers
            .get_all(name)
            .iter()
            .any(|v| want == "*" || v.as_bytes() == want.as_bytes())
    });
    method && path && headers
}

/// Istio's path forms: exact, `/prefix/*`, `*suffix`, or `*`.
fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        path.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        path.ends_with(suffix)
    } else {
        pattern == path
    }
}

fn source_matches(clause: &PolicySource, source: Option<&Identity>) -> bool {
    let principal = clause.principals.is_empty()
        || source.is_some_and(|id| {
            clause
                .principals
                .iter()
                .any(|p| p == "*" || p == id.principal())
        });
    let namespace = clause.namespaces.is_empty()
        || source.is_some_and(|id| clause.namespaces.iter().any(|n| n == id.namespace()));
    principal && namespace
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        name: &str,
        service: usize,
        action: PolicyAction,
        principals: &[&str],
        namespaces: &[&str],
        ports: &[u16],
    ) -> Policy {
        let from = if principals.is_empty() && namespaces.is_empty() {
            vec![]
        } else {
            vec![PolicySource {
                principals: principals.iter().map(|s| s.to_string()).collect(),
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            }]
        };
        Policy {
            name: name.into(),
            target: Target::Service(service),
            nothing: false,
            action,
            from,
            ports: ports.to_vec(),
            methods: vec![],
            paths: vec![],
            headers: vec![],
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).expect("a test identity")
    }

    #[test]
    fn istio_semantics_table() {
        use PolicyAction::*;
        let a = id("default", "a");
        let x = id("other", "x");
        let allow_a = policy(
            "allow-a",
            0,
            Allow,
            &["cluster.local/ns/default/sa/a"],
            &[],
            &[],
        );
        let deny_a_9090 = policy(
            "deny-a-9090",
            0,
            Deny,
            &["cluster.local/ns/default/sa/a"],
            &[],
            &[9090],
        );
        let allow_ns_other = policy("allow-other", 1, Allow, &[], &["other"], &[]);
        let deny_all_svc2 = policy("deny-all", 2, Deny, &[], &[], &[]);
        let allow_any = policy("allow-any", 3, Allow, &["*"], &[], &[]);
        let mut allow_nothing = policy("allow-nothing", 5, Allow, &[], &[], &[]);
        allow_nothing.nothing = true;
        let policies = vec![
            allow_nothing,
            allow_a,
            deny_a_9090,
            allow_ns_other,
            deny_all_svc2,
            allow_any,
        ];
        let cases: &[(Option<&Identity>, &[usize], u16, bool)] = &[
            // service 0: only a, and not on 9090 (deny wins over allow)
            (Some(&a), &[0], 80, true),
            (Some(&x), &[0], 80, false),
            (Some(&a), &[0], 9090, false),
            (None, &[0], 80, false),
            // service 1: namespace "other" only
            (Some(&x), &[1], 80, true),
            (Some(&a), &[1], 80, false),
            // service 2: deny everyone
            (Some(&a), &[2], 80, false),
            // service 3: any authenticated source
            (Some(&x), &[3], 80, true),
            (None, &[3], 80, false),
            // service 5: an allow that matches nothing closes it
            (Some(&a), &[5], 80, false),
            (None, &[5], 80, false),
            // service 4: no policy selects it
            (Some(&a), &[4], 80, true),
            (None, &[4], 80, true),
            // an endpoint behind services 1 and 2: the deny applies
            (Some(&x), &[1, 2], 80, false),
        ];
        for (source, services, port, allowed) in cases {
            let request = Request {
                source: *source,
                destination: Destination {
                    services,
                    workload: None,
                },
                port: *port,
                http: None,
            };
            let decision = authorize(&policies, &request);
            assert_eq!(
                decision == Decision::Allow,
                *allowed,
                "{source:?} → {services:?}:{port}: {decision:?}"
            );
        }
    }

    #[test]
    fn denials_name_their_reason() {
        let policies = vec![policy("block", 0, PolicyAction::Deny, &[], &[], &[])];
        let decision = authorize(
            &policies,
            &Request {
                source: None,
                destination: Destination {
                    services: &[0],
                    workload: None,
                },
                port: 1,
                http: None,
            },
        );
        assert_eq!(
            decision,
            Decision::Deny {
                reason: "denied by policy block".into()
            }
        );
    }

    #[test]
    fn l7_rules_match_methods_paths_and_headers() {
        use hyper::{HeaderMap, Method};
        let a = id("default", "a");
        let mut read_only = policy("read-only", 0, PolicyAction::Allow, &["*"], &[], &[]);
        read_only.methods = vec![Method::GET, Method::HEAD];
        read_only.paths = vec!["/api/*".into(), "/healthz".into(), "*.css".into()];
        let mut no_debug = policy("no-debug", 0, PolicyAction::Deny, &[], &[], &[]);
        no_debug.headers = vec![("x-debug".parse().expect("name"), "*".into())];
        let policies = vec![read_only, no_debug];
        let plain = HeaderMap::new();
        let mut debug = HeaderMap::new();
        debug.insert("x-debug", "1".parse().expect("value"));
        let cases: &[(Method, &str, &HeaderMap, bool)] = &[
            (Method::GET, "/api/v1/items", &plain, true),
            (Method::HEAD, "/healthz", &plain, true),
            (Method::GET, "/static/site.css", &plain, true),
            (Method::POST, "/api/v1/items", &plain, false),
            (Method::GET, "/admin", &plain, false),
            (Method::GET, "/healthz/x", &plain, false),
            (Method::GET, "/api/v1/items", &debug, false),
        ];
        for (method, path, headers, allowed) in cases {
            let request = Request {
                source: Some(&a),
                destination: Destination {
                    services: &[0],
                    workload: None,
                },
                port: 80,
                http: Some(Http {
                    method,
                    path,
                    headers,
                }),
            };
            let decision = authorize(&policies, &request);
            assert_eq!(
                decision == Decision::Allow,
                *allowed,
                "{method} {path}: {decision:?}"
            );
        }
        // A plain TCP connection: the L7 allow cannot match, so it is denied.
        let tcp = Request {
            source: Some(&a),
            destination: Destination {
                services: &[0],
                workload: None,
            },
            port: 80,
            http: None,
        };
        assert_ne!(authorize(&policies, &tcp), Decision::Allow);
        assert!(needs_requests(
            &policies,
            &Destination {
                services: &[0],
                workload: None
            }
        ));
        assert!(!needs_requests(
            &policies,
            &Destination {
                services: &[1],
                workload: None
            }
        ));
    }

    #[test]
    fn a_workload_selector_picks_workloads_by_namespace_and_labels() {
        let a = id("default", "a");
        let mut deny_v2 = policy("deny-v2", 0, PolicyAction::Deny, &[], &[], &[]);
        deny_v2.target = Target::Workloads {
            namespace: Some("shop".into()),
            selector: vec![
                ("app".into(), "reviews".into()),
                ("version".into(), "v2".into()),
            ],
        };
        let mut allow_all_ns = policy(
            "allow-a",
            0,
            PolicyAction::Allow,
            &["cluster.local/ns/default/sa/a"],
            &[],
            &[],
        );
        allow_all_ns.target = Target::Workloads {
            namespace: None,
            selector: vec![("app".into(), "ratings".into())],
        };
        let policies = vec![deny_v2, allow_all_ns];
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let v2 = labels(&[("app", "reviews"), ("version", "v2")]);
        let v1 = labels(&[("app", "reviews"), ("version", "v1")]);
        let ratings = labels(&[("app", "ratings")]);
        let x = id("other", "x");
        let cases: &[(
            &Identity,
            &str,
            &std::collections::BTreeMap<String, String>,
            bool,
        )] = &[
            (&a, "shop", &v2, false),
            // another namespace, or other labels: not selected
            (&a, "other", &v2, true),
            (&a, "shop", &v1, true),
            // every namespace's ratings: a only
            (&a, "shop", &ratings, true),
            (&x, "elsewhere", &ratings, false),
        ];
        for (source, namespace, labels, allowed) in cases {
            let request = Request {
                source: Some(source),
                destination: Destination {
                    services: &[],
                    workload: Some((namespace, labels)),
                },
                port: 80,
                http: None,
            };
            assert_eq!(
                authorize(&policies, &request) == Decision::Allow,
                *allowed,
                "{source:?} → {namespace} {labels:?}"
            );
        }
        // An endpoint that is no workload of this node: only service targets.
        let none = Request {
            source: Some(&x),
            destination: Destination::default(),
            port: 80,
            http: None,
        };
        assert_eq!(authorize(&policies, &none), Decision::Allow);
    }
}
