//! Objects from YAML on disk: every `*.yaml`, `*.yml` and `*.json` file of
//! a directory (and its subdirectories), multi-document files and
//! `kubectl get -o yaml` `List`s alike. Kinds discovery does not read
//! (Deployments, ConfigMaps, …) are skipped.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cluster::{Cluster, Object};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {message}")]
    Parse {
        path: PathBuf,
        /// 1-based, in the file.
        document: usize,
        message: String,
    },
}

/// Reads every manifest below `dir`, in path order, into one `Cluster`.
pub fn read_dir(dir: &Path) -> Result<Cluster, ManifestError> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut cluster = Cluster::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        for object in parse(&path, &text)? {
            cluster.apply(object);
        }
    }
    Ok(cluster)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read = |source| ManifestError::Read {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.is_dir() {
            collect(&path, files)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(path);
        }
    }
    Ok(())
}

/// The objects of one file's text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let failed = |message: String| ManifestError::Parse {
            path: path.to_owned(),
            document: i + 1,
            message,
        };
        let value = serde_yaml::Value::deserialize(document).map_err(|e| failed(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let is_list = value
            .get("kind")
            .and_then(|k| k.as_str())
            .is_some_and(|k| k == "List" || k.ends_with("List"));
        let items = match value.get("items") {
            Some(serde_yaml::Value::Sequence(items)) if is_list => items.clone(),
            _ => vec![value],
        };
        for item in items {
            if let Some(object) = Object::from_value(item).map_err(|e| failed(e.to_string()))? {
                objects.push(object);
            }
        }
    }
    Ok(objects)
}
