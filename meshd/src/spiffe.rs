//! The SPIFFE ID type, `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`:
//! a pure value at the bottom of the layers, so config validation and
//! policy can name identities without reaching up to certificates.

use std::{fmt, sync::Arc};

/// Whether `value` is a DNS label (RFC 1123, as Kubernetes names
/// namespaces and service accounts): 1–63 lowercase letters, digits or
/// `-`, not starting or ending with `-`.
pub fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// Whether `value` is a SPIFFE trust domain name: lowercase letters,
/// digits, `.`, `-` and `_`, at most 255 bytes.
pub fn is_trust_domain(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A SPIFFE ID of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    /// Byte offsets of the namespace and service account within `uri`.
    namespace: (usize, usize),
    service_account: (usize, usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Malformed(String),
    #[error("{uri} belongs to trust domain {found}, not {expected}")]
    ForeignTrustDomain {
        uri: String,
        found: String,
        expected: String,
    },
}

impl Identity {
    /// The ID of `namespace/service_account` in `trust_domain`, if those
    /// are a trust domain name and DNS labels.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// Parses a SPIFFE workload ID: a trust domain name, then a namespace
    /// and a service account that are DNS labels (as Kubernetes names
    /// them; anything else is no workload's and refused).
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::Malformed(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(malformed());
        };
        if !is_trust_domain(domain) || !is_dns_label(namespace) || !is_dns_label(service_account) {
            return Err(malformed());
        }
        let ns_start = "spiffe://".len() + domain.len() + "/ns/".len();
        let sa_start = ns_start + namespace.len() + "/sa/".len();
        Ok(Self {
            uri: uri.into(),
            namespace: (ns_start, ns_start + namespace.len()),
            service_account: (sa_start, sa_start + service_account.len()),
        })
    }

    /// Parses a peer's ID and checks it belongs to `trust_domain`.
    pub fn parse_in(uri: &str, trust_domain: &str) -> Result<Self, IdentityError> {
        let id = Self::parse(uri)?;
        if id.trust_domain() != trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                uri: uri.to_owned(),
                found: id.trust_domain().to_owned(),
                expected: trust_domain.to_owned(),
            });
        }
        Ok(id)
    }

    pub fn uri(&self) -> &Arc<str> {
        &self.uri
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.namespace.0 - "/ns/".len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.0..self.namespace.1]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account.0..self.service_account.1]
    }

    /// The ID without its scheme, as Istio's policies write principals.
    pub fn principal(&self) -> &str {
        &self.uri["spiffe://".len()..]
    }

    /// The TLS server name a client asks for to get this identity's
    /// certificate: `<sa>.<namespace>.<trust-domain>`, used only as a key.
    pub fn server_name(&self) -> String {
        format!(
            "{}.{}.{}",
            self.service_account(),
            self.namespace(),
            self.trust_domain()
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_spiffe_ids() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "reviews");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/reviews");
        assert_eq!(id.server_name(), "reviews.default.cluster.local");
        assert_eq!(
            id,
            Identity::new("cluster.local", "default", "reviews").expect("valid")
        );
    }

    #[test]
    fn refuses_what_is_not_a_workload_id() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
            // Found by fuzzing (`cargo xtask fuzz --target spiffe`): parts
            // that are no DNS label, and a trust domain with a slash-free
            // but foreign alphabet, used to parse.
            "spiffe://cluster.local/ns/A_B/sa/b",
            "spiffe://cluster.local/ns/a/sa/b.c",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/-a/sa/b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
        assert!(Identity::new("cluster.local", "a/b", "c").is_err());
        let err = Identity::parse_in("spiffe://evil.org/ns/a/sa/b", "cluster.local").unwrap_err();
        assert!(matches!(err, IdentityError::ForeignTrustDomain { .. }));
    }
}
