//! Istio `PeerAuthentication` into meshd's mTLS mode. meshd's mode is
//! mesh-wide: the root namespace's policy without a selector sets it; a
//! namespace's or workload's `STRICT` that the mesh-wide mode would not
//! enforce makes the whole mesh strict rather than leave plaintext in
//! (reported), and a narrower `PERMISSIVE` or `DISABLE` under a strict
//! mesh stays strict (reported).

use super::{
    cluster::{age_order, Cluster, Kind},
    translate::Reports,
};

/// `strict` or `permissive`.
pub fn mesh_mode(cluster: &Cluster, root_namespace: &str, reports: &mut Reports) -> &'static str {
    let mut mesh_wide: Vec<_> = cluster
        .peer_authentications
        .iter()
        .filter(|(key, pa)| key.0 == root_namespace && pa.spec.selector.is_none())
        .collect();
    mesh_wide.sort_by_cached_key(|(key, pa)| age_order(&pa.metadata, key));
    for (key, _) in mesh_wide.iter().skip(1) {
        reports.add(
            Kind::PeerAuthentication,
            key,
            "metadata.namespace",
            "an older mesh-wide PeerAuthentication sets the mode: not applied".into(),
        );
    }
    let mode_of = |spec: &super::crds::PeerAuthenticationSpec| {
        spec.mtls
            .as_ref()
            .and_then(|m| m.mode.clone())
            .unwrap_or_else(|| "UNSET".to_owned())
    };
    let mut strict = false;
    if let Some((key, pa)) = mesh_wide.first() {
        match mode_of(&pa.spec).as_str() {
            "STRICT" => strict = true,
            "PERMISSIVE" | "UNSET" => {}
            other => reports.add(
                Kind::PeerAuthentication,
                key,
                "spec.mtls.mode",
                format!("{other}: meshd always uses mutual TLS between nodes; plaintext is accepted as in PERMISSIVE"),
            ),
        }
    }
    let mesh_wide_keys: Vec<_> = mesh_wide.iter().map(|(k, _)| (*k).clone()).collect();
    let mut narrower = Vec::new();
    for (key, pa) in &cluster.peer_authentications {
        if mesh_wide_keys.contains(key) {
            continue;
        }
        for field in pa.spec.other.keys() {
            reports.add(
                Kind::PeerAuthentication,
                key,
                "spec",
                format!("{field:?} is not applied"),
            );
        }
        let ports_strict = pa
            .spec
            .port_level_mtls
            .as_ref()
            .and_then(|p| p.as_object())
            .is_some_and(|ports| {
                ports
                    .values()
                    .any(|p| p.get("mode").and_then(|m| m.as_str()) == Some("STRICT"))
            });
        let mode = mode_of(&pa.spec);
        if mode == "STRICT" || ports_strict {
            if !strict {
                reports.add(
                    Kind::PeerAuthentication,
                    key,
                    "spec.selector",
                    "meshd's mode is mesh-wide: this STRICT makes the whole mesh strict".into(),
                );
            }
            strict = true;
        } else if mode != "UNSET" {
            narrower.push((key, mode));
        }
    }
    for (key, mode) in narrower.into_iter().filter(|_| strict) {
        reports.add(
            Kind::PeerAuthentication,
            key,
            "spec.selector",
            format!("meshd's mode is mesh-wide: this {mode} is not applied, the mesh is strict"),
        );
    }
    if strict {
        "strict"
    } else {
        "permissive"
    }
}
