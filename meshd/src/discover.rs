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
mod traffic;
pub mod translate;
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

/// `meshd discover --from-manifests DIR`: the files for `settings.node`
/// from the manifests below `dir`, written into `out`.
pub fn from_manifests(dir: &Path, out: &Path, settings: &Settings) -> anyhow::Result<Translation> {
    let cluster = manifests::read_dir(dir)?;
    let translation = translate::translate(&cluster, settings);
    log_unsupported(&translation.unsupported);
    write_files(out, &translation)
        .map_err(|err| anyhow::anyhow!("cannot write into {}: {err}", out.display()))?;
    Ok(translation)
}
