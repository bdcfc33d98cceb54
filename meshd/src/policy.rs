//! Authorization, with Istio's semantics, evaluated where the destination
//! runs: a workload no policy selects allows everything; a matching `deny`
//! wins; once an `allow` policy selects a workload, only matches pass.
//! Pure: a snapshot in, a decision out.

use std::sync::Arc;

use crate::{
    config::{validate::Policy, validate::PolicySource, PolicyAction},
    identity::Identity,
};

/// What is being decided: who connects, to which services' endpoint, on
/// which (target) port.
pub struct Request<'a> {
    /// The peer's proven identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    /// Indexes of the services the destination endpoint belongs to.
    pub services: &'a [usize],
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by a matching deny policy, or by no allow policy matching.
    Deny {
        reason: Arc<str>,
    },
}

pub fn authorize(policies: &[Policy], request: &Request<'_>) -> Decision {
    let selected = || {
        policies
            .iter()
            .filter(|p| request.services.contains(&p.service))
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
    let port = policy.ports.is_empty() || policy.ports.contains(&request.port);
    let from = policy.from.is_empty()
        || policy
            .from
            .iter()
            .any(|f| source_matches(f, request.source));
    port && from
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
            service,
            action,
            from,
            ports: ports.to_vec(),
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
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
        let policies = vec![
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
            // service 4: no policy selects it
            (Some(&a), &[4], 80, true),
            (None, &[4], 80, true),
            // an endpoint behind services 1 and 2: the deny applies
            (Some(&x), &[1, 2], 80, false),
        ];
        for (source, services, port, allowed) in cases {
            let request = Request {
                source: *source,
                services,
                port: *port,
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
                services: &[0],
                port: 1,
            },
        );
        assert_eq!(
            decision,
            Decision::Deny {
                reason: "denied by policy block".into()
            }
        );
    }
}
