//! What meshd needs from the host before it can capture anything:
//! privileges, a cgroup2 mount, kernel BTF; and moving meshd into its cgroup.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
/// Where the kernel publishes its own BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "meshd lacks {0}: it needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN, to load \
         its eBPF programs and attach them to cgroups"
    )]
    MissingPrivileges(String),
    #[error(
        "no cgroup2 filesystem is mounted (nothing of type cgroup2 in /proc/mounts): meshd \
         attaches its capture programs to cgroup v2, so mount it, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error(
        "the kernel has no BTF ({KERNEL_BTF} is missing): meshd needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux 5.10 or newer)"
    )]
    NoBtf,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} does not exist: {source}")]
    NoCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot move meshd into cgroup {path}: {source} (in a container with its own cgroup namespace, give meshd hostPID and CAP_SYS_ADMIN so it can enter the host's)"
    )]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the host's cgroup namespace (meshd needs CAP_SYS_ADMIN for it): {0}")]
    CgroupNamespace(#[source] std::io::Error),
}

/// Checks, in order, privileges, the cgroup2 mount and BTF, and returns the
/// cgroup2 mount point.
pub fn preflight() -> Result<PathBuf, HostError> {
    check_privileges()?;
    raise_descriptor_limit();
    let mount = cgroup2_mount()?;
    if !Path::new(KERNEL_BTF).exists() {
        return Err(HostError::NoBtf);
    }
    Ok(mount)
}

/// Every captured connection costs two descriptors (client and upstream):
/// take all the hard limit allows (raising the soft limit needs no
/// privilege). When even that runs out, listeners shed new connections.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::warn!(soft, hard, "cannot raise the descriptor limit");
        }
    }
}

fn check_privileges() -> Result<(), HostError> {
    let path = Path::new("/proc/self/status");
    let status = fs::read_to_string(path).map_err(|source| HostError::Read {
        path: path.to_owned(),
        source,
    })?;
    let effective = effective_capabilities(&status).unwrap_or(0);
    let missing = missing_capabilities(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(HostError::MissingPrivileges(missing.join(" and ")))
    }
}

/// The `CapEff` bit set from `/proc/self/status`.
fn effective_capabilities(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN stands in for CAP_BPF on kernels that predate it.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// The first cgroup2 mount point listed in `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, HostError> {
    let path = Path::new("/proc/mounts");
    let mounts = fs::read_to_string(path).map_err(|source| HostError::Read {
        path: path.to_owned(),
        source,
    })?;
    find_cgroup2(&mounts).ok_or(HostError::NoCgroup2)
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (written from the mount root) under `mount`.
pub fn cgroup_dir(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// The kubelet's cgroup driver, as the tree below the pods' cgroup shows
/// it: `kubepods-*.slice` children are systemd's, `burstable`,
/// `besteffort` or `pod<uid>` children cgroupfs's; an empty subtree (no
/// pod yet) goes by the subtree's own name (`*.slice`: systemd).
pub fn detect_cgroup_driver(pod_dir: &Path, pod_cgroup: &str) -> crate::config::CgroupDriver {
    use crate::config::CgroupDriver;
    let children = fs::read_dir(pod_dir).into_iter().flatten().flatten();
    for child in children.filter(|c| c.path().is_dir()) {
        let name = child.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".slice") && name.contains("-") {
            return CgroupDriver::Systemd;
        }
        if name == "burstable" || name == "besteffort" || name.starts_with("pod") {
            return CgroupDriver::Cgroupfs;
        }
    }
    CgroupDriver::guess(pod_cgroup)
}

/// The id the kernel reports for a cgroup (`bpf_get_current_cgroup_id`):
/// the inode number of its directory.
pub fn cgroup_id(dir: &Path) -> Result<u64, HostError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| HostError::NoCgroup {
            path: dir.to_owned(),
            source,
        })
}

/// Creates cgroup `dir` if needed and moves this whole process into it.
/// Returns the cgroup's id.
/// The inode of the kernel's initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INIT_CGROUP_NAMESPACE: u64 = 0xEFFF_FFFB;

/// Enters the host's cgroup namespace (`host`, e.g. `/proc/1/ns/cgroup`
/// with `hostPID`) when meshd runs in one of its own: container runtimes on
/// cgroup v2 give every container one, and from inside it a host mounted
/// with `nsdelegate` (systemd's default) refuses to move meshd out to
/// `node.proxyCgroup`. Needs CAP_SYS_ADMIN; returns whether it switched.
/// Call it before any thread starts: the namespace is per thread.
pub fn enter_host_cgroup_namespace(host: &Path) -> Result<bool, HostError> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = fs::metadata("/proc/self/ns/cgroup").map(|m| m.ino());
    if ours.is_err() || ours.is_ok_and(|ino| ino == INIT_CGROUP_NAMESPACE) {
        return Ok(false);
    }
    let target = fs::File::open(host).map_err(|source| HostError::Read {
        path: host.to_owned(),
        source,
    })?;
    nix::sched::setns(target, nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|err| HostError::CgroupNamespace(err.into()))?;
    Ok(true)
}

pub fn join_cgroup(dir: &Path) -> Result<u64, HostError> {
    let join = |source| HostError::JoinCgroup {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(join)?;
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).map_err(join)?;
    cgroup_id(dir)
}

/// This process's cgroup (v2) under `mount`, if it can be read.
pub fn own_cgroup(mount: &Path) -> Option<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(cgroup_dir(mount, path))
}

/// The CPUs meshd may use: its CPU affinity (and a cgroup v1 CPU quota,
/// as the standard library reads them), and the tightest `cpu.max` quota
/// of each of `cgroups` and the cgroups above it up to the mount `root`
/// (rounded up) — the container's cgroup, where a DaemonSet's CPU limit
/// is set, and the one meshd moves into. At least 1.
pub fn usable_cpus(root: &Path, cgroups: &[PathBuf]) -> usize {
    let mut cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for own in cgroups {
        let mut dir = Some(own.as_path());
        while let Some(at) = dir.filter(|d| d.starts_with(root)) {
            let quota = fs::read_to_string(at.join("cpu.max")).ok();
            if let Some(quota) = quota.as_deref().and_then(cpus_of_quota) {
                cpus = cpus.min(quota);
            }
            dir = at.parent();
        }
    }
    cpus.max(1)
}

/// The CPUs a `cpu.max` line (`$MAX $PERIOD`, `max` for none) allows,
/// rounded up.
fn cpus_of_quota(line: &str) -> Option<usize> {
    let mut fields = line.split_whitespace();
    let max: u64 = fields.next()?.parse().ok()?;
    let period: u64 = fields.next()?.parse().ok().filter(|p| *p > 0)?;
    usize::try_from(max.div_ceil(period)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_quota_is_rounded_up_to_whole_cpus() {
        assert_eq!(cpus_of_quota("max 100000\n"), None);
        assert_eq!(cpus_of_quota("100000 100000\n"), Some(1));
        assert_eq!(cpus_of_quota("150000 100000\n"), Some(2));
        assert_eq!(cpus_of_quota("50000 100000"), Some(1));
        assert_eq!(cpus_of_quota("400000 100000"), Some(4));
        assert_eq!(cpus_of_quota("100000 0"), None);
        assert_eq!(cpus_of_quota("garbage"), None);
    }

    #[test]
    fn the_tightest_quota_on_either_cgroups_path_bounds_the_cpus() {
        let root = std::env::temp_dir().join(format!("meshd-cpus-{}", std::process::id()));
        let container = root.join("kubepods/pod1/container");
        let proxy = root.join("meshd/proxy");
        for dir in [&container, &proxy] {
            fs::create_dir_all(dir).expect("mkdir");
        }
        let affinity = std::thread::available_parallelism().map_or(1, |n| n.get());
        let both = [container.clone(), proxy.clone()];
        assert_eq!(usable_cpus(&root, &both), affinity, "no quota anywhere");
        fs::write(root.join("kubepods/pod1/cpu.max"), "100000 100000\n").expect("write");
        fs::write(container.join("cpu.max"), "max 100000\n").expect("write");
        assert_eq!(
            usable_cpus(&root, &both),
            1,
            "the pod's quota, above the container"
        );
        assert_eq!(usable_cpus(&root, std::slice::from_ref(&proxy)), affinity);
        // A cgroup file above the mount is not this hierarchy's.
        assert_eq!(usable_cpus(&root.join("meshd"), &[container]), affinity);
        fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn finds_the_cgroup2_mount_among_v1_mounts() {
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
";
        assert_eq!(
            find_cgroup2(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_cgroup2("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            find_cgroup2("none /mnt/with\\040space cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn names_missing_capabilities() {
        let status = "Name:\tmeshd\nCapEff:\t0000000000003000\n";
        let effective = effective_capabilities(status).expect("CapEff");
        assert_eq!(missing_capabilities(effective), vec!["CAP_BPF"]);
        assert_eq!(missing_capabilities(0), vec!["CAP_BPF", "CAP_NET_ADMIN"]);
        assert!(missing_capabilities(u64::MAX).is_empty());
    }

    #[test]
    fn the_cgroup_driver_is_read_from_the_tree() {
        use crate::config::CgroupDriver;
        let dir = std::env::temp_dir().join(format!("meshd-driver-{}", std::process::id()));
        let at = |children: &[&str], name: &str| {
            let _ = fs::remove_dir_all(&dir);
            for child in children {
                fs::create_dir_all(dir.join(child)).expect("create");
            }
            fs::create_dir_all(&dir).expect("create");
            detect_cgroup_driver(&dir, name)
        };
        assert_eq!(
            at(&["kubepods-besteffort.slice"], "/pods"),
            CgroupDriver::Systemd
        );
        assert_eq!(
            at(&["burstable", "besteffort"], "/x.slice"),
            CgroupDriver::Cgroupfs
        );
        assert_eq!(at(&["pod1234"], "/kubepods"), CgroupDriver::Cgroupfs);
        assert_eq!(at(&[], "/kubepods.slice"), CgroupDriver::Systemd);
        assert_eq!(at(&[], "/kubepods"), CgroupDriver::Cgroupfs);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn cgroup_dirs_join_below_the_mount() {
        let dir = cgroup_dir(Path::new("/sys/fs/cgroup"), "/kubepods/pod1");
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/kubepods/pod1"));
    }
}
