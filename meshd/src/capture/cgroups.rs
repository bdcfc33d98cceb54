//! From the cgroup id a connect hook recorded to that cgroup's path.
//!
//! `bpf_get_current_cgroup_id()` names the *leaf* cgroup the process runs
//! in: on a Kubernetes node a container's scope below its pod's cgroup.
//! The id is the cgroup directory's kernfs node id, which is also a file
//! handle for it: `open_by_handle_at` opens the directory and
//! `/proc/self/fd` tells its path, which the snapshot then matches against
//! the workloads' cgroups and their ancestors. So a container started after
//! the config was applied, or a pod whose cgroup did not exist then, is
//! recognised without a reload. Ids are never reused while the system runs,
//! so an answer, found or not, holds for the id's lifetime and is cached.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// `FILEID_KERNFS`: the handle type of kernfs (cgroupfs) file handles,
/// whose 8 bytes are the node id.
const FILEID_KERNFS: i32 = 0xfe;
/// Answers kept before the cache starts over (a node runs far fewer
/// containers; a cleared cache only costs the lookups again).
const CACHE_CAPACITY: usize = 16_384;

/// The cgroup2 tree meshd resolves ids in, with the answers so far.
pub struct CgroupTree {
    mount: PathBuf,
    /// An open handle on the mount, the base `open_by_handle_at` decodes
    /// handles against; `None` when the mount cannot be opened (nothing
    /// resolves then, and it was logged).
    root: Option<File>,
    cache: Mutex<HashMap<u64, Option<Arc<str>>>>,
}

/// The layout `open_by_handle_at` reads: `struct file_handle` with its
/// eight bytes of kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

impl CgroupTree {
    /// The tree mounted at `mount` (cgroup2).
    pub fn new(mount: &Path) -> Self {
        let root = File::open(mount)
            .inspect_err(|err| {
                tracing::warn!(mount = %mount.display(), error = %err, "cannot open the cgroup2 mount: connections are identified by address only");
            })
            .ok();
        Self {
            mount: mount.to_owned(),
            root,
            cache: Mutex::default(),
        }
    }

    /// The path (from the mount's root, `/a/b`) of the cgroup with `id`,
    /// if it exists.
    pub fn path_of(&self, id: u64) -> Option<Arc<str>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = cache.get(&id) {
            return known.clone();
        }
        drop(cache);
        // A failure that says nothing of the cgroup (out of descriptors
        // under load, say) is not remembered: the next connection asks
        // again, so a busy moment never leaves a container unidentified.
        let found = self.resolve(id).ok()?;
        cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(id, found.clone());
        found
    }

    /// `Ok(None)`: no such cgroup (any more); `Err`: could not tell now.
    fn resolve(&self, id: u64) -> Result<Option<Arc<str>>, std::io::Error> {
        let Some(root) = self.root.as_ref() else {
            return Ok(None);
        };
        let dir = match open_by_id(root, id) {
            Ok(dir) => dir,
            Err(err) if gone(&err) => return Ok(None),
            Err(err) => {
                tracing::debug!(id, error = %err, "cannot open a cgroup by id now");
                return Err(err);
            }
        };
        let fd_path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
        let Some(path) = relative_cgroup_path(&self.mount, &fd_path) else {
            return Ok(None);
        };
        // The directory the path names now must be the one opened: not
        // removed meanwhile ("… (deleted)"), renamed or replaced.
        let Ok(now) = std::fs::metadata(&fd_path) else {
            return Ok(None);
        };
        let opened = dir.metadata()?;
        Ok((now.ino() == opened.ino() && now.dev() == opened.dev()).then(|| path.into()))
    }
}

/// Whether `open_by_handle_at` failed because the cgroup is gone (or the
/// id never named one), rather than for a reason of the moment.
fn gone(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ESTALE | libc::ENOENT | libc::EINVAL | libc::ENOTDIR)
    )
}

/// Opens the cgroup directory with kernfs id `id` below `root`'s mount.
fn open_by_id(root: &File, id: u64) -> std::io::Result<File> {
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` is a `struct file_handle` header followed by exactly
    // `handle_bytes` bytes of handle, alive for the call; the kernel only
    // reads it. The returned descriptor, when valid, is owned by nobody else.
    let fd = unsafe {
        libc::open_by_handle_at(
            root.as_raw_fd(),
            (&raw mut handle).cast::<libc::file_handle>(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by this process and is not owned elsewhere.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `path` (a directory below `mount`) written from the mount's root, as
/// the config writes cgroups; `None` outside the mount.
fn relative_cgroup_path(mount: &Path, path: &Path) -> Option<String> {
    let below = path.strip_prefix(mount).ok()?;
    let text = below.to_str()?;
    Some(format!("/{}", text.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_written_from_the_mount_root() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            relative_cgroup_path(mount, Path::new("/sys/fs/cgroup/kubepods.slice/x.scope")),
            Some("/kubepods.slice/x.scope".to_owned())
        );
        assert_eq!(
            relative_cgroup_path(mount, Path::new("/sys/fs/cgroup")),
            Some("/".to_owned())
        );
        assert_eq!(relative_cgroup_path(mount, Path::new("/elsewhere/x")), None);
    }
}
