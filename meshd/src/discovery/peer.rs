//! Istio `PeerAuthentication` into meshd's mTLS modes, as Istio resolves
//! them: a workload's own policy (a `selector` in its namespace), else its
//! namespace's (no selector), else the mesh's (the root namespace's, no
//! selector), else `PERMISSIVE`; `UNSET` inherits; among several at one
//! level the oldest applies. The mesh's becomes `mesh.mode`, a pod's that
//! differs its workload's `mtlsMode`. meshd's kernel filter knows modes
//! per pod, not per port: a `STRICT` port makes the whole workload strict
//! and a narrower `PERMISSIVE` port of a strict workload stays strict
//! (both reported). `DISABLE` is applied as `PERMISSIVE` (meshd always
//! uses mutual TLS between nodes), reported.

use std::collections::BTreeMap;

use super::{
    cluster::{age_order, Cluster, Key, Kind},
    crds::PeerAuthenticationSpec,
    translate::Reports,
};

/// A resolved mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Strict,
    Permissive,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
        }
    }
}

/// One workload policy: its namespace, the labels it selects, its mode.
struct ForWorkloads {
    namespace: String,
    labels: BTreeMap<String, String>,
    mode: Mode,
}

/// The modes of the mesh, its namespaces and its workloads.
pub struct Modes {
    pub mesh: Mode,
    namespaces: BTreeMap<String, Mode>,
    /// Oldest first.
    workloads: Vec<ForWorkloads>,
}

impl Modes {
    /// The mode of a pod with `labels` in `namespace`.
    pub fn of(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Mode {
        self.workloads
            .iter()
            .find(|w| {
                w.namespace == namespace && w.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|w| w.mode)
            .or_else(|| self.namespaces.get(namespace).copied())
            .unwrap_or(self.mesh)
    }
}

/// A policy's own mode (`None`: `UNSET`, inherited).
fn mode_of(key: &Key, spec: &PeerAuthenticationSpec, reports: &mut Reports) -> Option<Mode> {
    let mode = spec.mtls.as_ref().and_then(|m| m.mode.as_deref());
    match mode.unwrap_or("UNSET") {
        "STRICT" => Some(Mode::Strict),
        "PERMISSIVE" => Some(Mode::Permissive),
        "UNSET" => None,
        other => {
            reports.add(
                Kind::PeerAuthentication,
                key,
                "spec.mtls.mode",
                format!("{other}: meshd always uses mutual TLS between nodes; plaintext is accepted as in PERMISSIVE"),
            );
            Some(Mode::Permissive)
        }
    }
}

/// The modes of `portLevelMtls`' ports.
fn port_modes(spec: &PeerAuthenticationSpec) -> Vec<&str> {
    spec.port_level_mtls
        .as_ref()
        .and_then(|p| p.as_object())
        .into_iter()
        .flat_map(|ports| ports.values())
        .map(|p| p.get("mode").and_then(|m| m.as_str()).unwrap_or("UNSET"))
        .collect()
}

/// Resolves every `PeerAuthentication` of `cluster`.
pub fn modes(cluster: &Cluster, root_namespace: &str, reports: &mut Reports) -> Modes {
    let mut policies: Vec<_> = cluster.peer_authentications.iter().collect();
    policies.sort_by_cached_key(|(key, pa)| age_order(&pa.metadata, key));
    let mut mesh = None;
    let mut namespaces = BTreeMap::new();
    let mut workloads = Vec::new();
    let mut namespace_wide = |namespace: &str, key: &Key, mode, reports: &mut Reports| {
        if namespaces.contains_key(namespace) {
            reports.add(
                Kind::PeerAuthentication,
                key,
                "metadata.namespace",
                "an older PeerAuthentication without a selector sets this namespace's mode: not applied".into(),
            );
        } else {
            namespaces.insert(namespace.to_owned(), mode);
        }
    };
    for (key, pa) in policies {
        for field in pa.spec.other.keys() {
            reports.add(
                Kind::PeerAuthentication,
                key,
                "spec",
                format!("{field:?} is not applied"),
            );
        }
        let own = mode_of(key, &pa.spec, reports);
        let Some(selector) = &pa.spec.selector else {
            if !port_modes(&pa.spec).is_empty() {
                reports.add(
                    Kind::PeerAuthentication,
                    key,
                    "spec.portLevelMtls",
                    "applies only with a selector (as in Istio): not applied".into(),
                );
            }
            if key.0 == root_namespace {
                if mesh.is_some() {
                    reports.add(
                        Kind::PeerAuthentication,
                        key,
                        "metadata.namespace",
                        "an older mesh-wide PeerAuthentication sets the mode: not applied".into(),
                    );
                } else {
                    mesh = Some(own);
                }
            } else if let Some(mode) = own {
                namespace_wide(&key.0, key, mode, reports);
            }
            continue;
        };
        let labels = serde_json::from_value::<super::crds::WorkloadSelector>(selector.clone())
            .ok()
            .filter(|_| {
                selector
                    .as_object()
                    .is_some_and(|s| s.keys().all(|k| k == "matchLabels"))
            });
        let ports = port_modes(&pa.spec);
        let mut mode = own;
        if ports.contains(&"STRICT") && mode != Some(Mode::Strict) {
            reports.add(
                Kind::PeerAuthentication,
                key,
                "spec.portLevelMtls",
                "meshd's mode is per workload, not per port: a STRICT port makes the whole workload strict".into(),
            );
            mode = Some(Mode::Strict);
        } else if mode == Some(Mode::Strict)
            && ports.iter().any(|p| *p != "STRICT" && *p != "UNSET")
        {
            reports.add(
                Kind::PeerAuthentication,
                key,
                "spec.portLevelMtls",
                "meshd's mode is per workload, not per port: the workload stays strict on every port".into(),
            );
        }
        let Some(mode) = mode else {
            continue;
        };
        match labels {
            Some(selector) => workloads.push(ForWorkloads {
                namespace: key.0.clone(),
                labels: selector.match_labels,
                mode,
            }),
            // A selector meshd cannot read: strict on the whole namespace
            // rather than plaintext where it was refused; a permissive one
            // is not applied.
            None => {
                reports.add(
                    Kind::PeerAuthentication,
                    key,
                    "spec.selector",
                    match mode {
                        Mode::Strict => {
                            "only matchLabels is read: strict on every pod of the namespace instead"
                        }
                        Mode::Permissive => "only matchLabels is read: not applied",
                    }
                    .into(),
                );
                if mode == Mode::Strict {
                    workloads.push(ForWorkloads {
                        namespace: key.0.clone(),
                        labels: BTreeMap::new(),
                        mode,
                    });
                }
            }
        }
    }
    Modes {
        mesh: mesh.flatten().unwrap_or(Mode::Permissive),
        namespaces,
        workloads,
    }
}
