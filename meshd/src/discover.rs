//! `meshd discover`: meshd's node-local files from the cluster's own
//! objects. Objects (from YAML on disk, or the API) are kept in a
//! `Cluster`; `translate` turns it into the files for one node, purely and
//! deterministically; `write` replaces a file only when its bytes change,
//! atomically, so the running meshd's hot reload picks up real changes
//! only and never reads half a file.

pub mod cluster;
pub mod crds;
pub mod manifests;
mod peer;
mod policies;
mod traffic;
pub mod translate;
pub mod watch;
pub mod write;

use std::path::Path;

use tracing::warn;

pub use self::translate::{Settings, Translation, Unsupported, MESH_FILE, WORKLOADS_FILE};

/// Logs what could not be translated, each with its object.
pub fn log_unsupported(unsupported: &[Unsupported]) {
    for u in unsupported {
        warn!(
            kind = u.kind.as_str(),
            object = %u.object,
            field = u.field,
            detail = %u.detail,
            "cannot translate"
        );
    }
}

/// Writes a translation's files into `out`; whether any changed.
pub fn write_files(out: &Path, translation: &Translation) -> std::io::Result<bool> {
    std::fs::create_dir_all(out)?;
    let mesh = write::write_if_changed(out, MESH_FILE, &translation.mesh)?;
    let workloads = write::write_if_changed(out, WORKLOADS_FILE, &translation.workloads)?;
    Ok(mesh || workloads)
}

/// The files as meshd loads them, beside a node file of the operator's
/// (only its name matters here): what discovery writes must never be a
/// config meshd refuses.
pub fn load(
    translation: &Translation,
    node: &str,
) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    let node_file = format!(
        "node: {{ name: {node:?}, captureAddress: 127.0.0.1, podCgroup: /kubepods.slice, cgroupDriver: systemd, identity: {{ issuer: /nonexistent }} }}\n"
    );
    let sources = [
        ("(node)", node_file.as_str()),
        (MESH_FILE, translation.mesh.as_str()),
        (WORKLOADS_FILE, translation.workloads.as_str()),
    ]
    .map(|(name, text)| crate::config::Source {
        path: name.into(),
        text: text.to_owned(),
    });
    crate::config::load_sources(&sources)
}

/// `meshd discover --from-manifests DIR`: the files for `settings.node`
/// from the manifests below `dir`, written into `out` once meshd's own
/// validation accepts them.
pub fn from_manifests(dir: &Path, out: &Path, settings: &Settings) -> anyhow::Result<Translation> {
    let cluster = manifests::read_dir(dir)?;
    let translation = translate::translate(&cluster, settings);
    log_unsupported(&translation.unsupported);
    load(&translation, &settings.node).map_err(|errors| {
        anyhow::anyhow!("the translation is no config meshd accepts (a discovery bug), nothing written:\n{errors}")
    })?;
    write_files(out, &translation)
        .map_err(|err| anyhow::anyhow!("cannot write into {}: {err}", out.display()))?;
    Ok(translation)
}
