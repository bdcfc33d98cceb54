//! Files written so meshd never reads half of one, and only when their
//! bytes change: the new text goes to a temporary file in the same
//! directory, is synced, and is renamed over the old one.

use std::{io::Write as _, path::Path};

/// Writes `text` to `dir/name` atomically; `Ok(false)` when the file
/// already holds exactly `text` (it is not touched, so its reader sees no
/// change).
pub fn write_if_changed(dir: &Path, name: &str, text: &str) -> std::io::Result<bool> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(false);
    }
    let temporary = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, &path)?;
    // The rename itself is durable once the directory is synced.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_left_alone_when_unchanged() {
        let dir = std::env::temp_dir().join(format!("meshd-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(write_if_changed(&dir, "a.yaml", "one\n").unwrap());
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let first = inode(&dir.join("a.yaml"));
        assert!(!write_if_changed(&dir, "a.yaml", "one\n").unwrap());
        assert_eq!(
            inode(&dir.join("a.yaml")),
            first,
            "unchanged text rewrote the file"
        );
        assert!(write_if_changed(&dir, "a.yaml", "two\n").unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("a.yaml")).unwrap(),
            "two\n"
        );
        assert_ne!(
            inode(&dir.join("a.yaml")),
            first,
            "not replaced by a rename"
        );
        assert!(!dir.join(".a.yaml.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
