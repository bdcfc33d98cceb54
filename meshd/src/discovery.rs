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
pub mod report;
mod traffic;
pub mod translate;
pub mod watch;
pub mod write;

use std::path::Path;

use tracing::warn;

pub use self::translate::{Settings, Translation, Unsupported, CONFIG_FILE, DISCOVERED_SECTIONS};

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

/// Writes a translation's config into `out` (one file, so meshd never
/// sees a new half beside an old one); whether it changed.
pub fn write_files(out: &Path, translation: &Translation) -> std::io::Result<bool> {
    std::fs::create_dir_all(out)?;
    write::write_if_changed(out, CONFIG_FILE, &translation.config)
}

/// Reads the operator's node settings for `--node-config`: a YAML mapping
/// without the sections discovery writes.
pub fn read_node_config(path: &Path) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let serde_json::Value::Object(map) = value else {
        anyhow::bail!("{}: not a mapping of config sections", path.display());
    };
    if let Some(section) = DISCOVERED_SECTIONS.iter().find(|s| map.contains_key(**s)) {
        anyhow::bail!(
            "{}: {section} is written by discovery from the cluster's objects; leave it out",
            path.display()
        );
    }
    Ok(map)
}

/// The config as meshd loads it: what discovery writes must never be a
/// config meshd refuses. Without the operator's node settings
/// (`with_node_config` false), a stand-in node file is added.
pub fn load(
    translation: &Translation,
    node: &str,
    with_node_config: bool,
) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    let mut sources = vec![crate::config::Source {
        path: CONFIG_FILE.into(),
        text: translation.config.as_str().into(),
    }];
    if !with_node_config {
        sources.push(crate::config::Source {
            path: "(node)".into(),
            text: format!(
                "node: {{ name: {node:?}, captureAddress: 127.0.0.1, podCgroup: /kubepods.slice, cgroupDriver: systemd, identity: {{ issuer: /nonexistent }} }}\n"
            )
            .into(),
        });
    }
    crate::config::load_sources(&sources)
}

/// `meshd discover --from-manifests DIR`: the files for `settings.node`
/// from the manifests below `dir`, written into `out` once meshd's own
/// validation accepts them.
pub fn from_manifests(dir: &Path, out: &Path, settings: &Settings) -> anyhow::Result<Translation> {
    let cluster = manifests::read_dir(dir)?;
    let translation = translate::translate(&cluster, settings);
    log_unsupported(&translation.unsupported);
    load(&translation, &settings.node, settings.node_config.is_some()).map_err(|errors| {
        anyhow::anyhow!("the translation is no config meshd accepts (a discovery bug), nothing written:\n{errors}")
    })?;
    write_files(out, &translation)
        .map_err(|err| anyhow::anyhow!("cannot write into {}: {err}", out.display()))?;
    Ok(translation)
}
