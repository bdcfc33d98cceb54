//! The eBPF loader: loads meshd's programs, attaches them to the pod and
//! proxy cgroups, keeps the maps in step with the config, and answers
//! "where was this accepted connection going?".
//!
//! Maps and links are pinned under `node.pinDir` (bpffs), so capture
//! outlives the process: a meshd that is killed leaves its programs
//! attached (the heartbeat then decides whether connects fail open or
//! closed), and the next meshd adopts the maps, attaches its own programs
//! and only then removes the old ones — no moment without capture. A
//! graceful stop removes everything.

use std::{
    fs::File,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SkMsg,
        SockOps,
    },
    Ebpf, EbpfLoader,
};
use meshd_common::{
    counter, Destination, OrigDst, OwnConnect, Settings, SockKey, FLAG_FAIL_CLOSED, FLAG_SK_MSG,
    FLAG_STRICT, FLAG_STRICT_IPV6, PORT_OPEN, PORT_PERMISSIVE, PORT_PROBE, PORT_PROTECTED,
    PORT_STRICT,
};

// Decodes cgroup ids as file handles (`open_by_handle_at`).
#[allow(unsafe_code)]
mod cgroups;
pub use cgroups::CgroupTree;

use crate::{
    config::BpfLogLevel,
    state::{
        ids::{Captured, ClientAddr, OrigDstAddr, OrigDstSource},
        snapshot::Snapshot,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot load meshd's eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not on a BPF filesystem (bpffs): mount one with `mount -t bpf bpf /sys/fs/bpf` or set node.pinDir"
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "cannot find meshd's own cgroup (id {id}) by its id: meshd identifies a pod's connections by \
         the cgroup they come from and needs CAP_DAC_READ_SEARCH (open_by_handle_at) and the \
         host's cgroup2 tree mounted for it"
    )]
    CgroupIds { id: u64 },
    #[error("pin directory {path}: {source}")]
    Pins {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how to capture.
pub struct CaptureSpec<'a> {
    /// The cgroup2 mount the cgroups below are in.
    pub cgroup_mount: &'a Path,
    pub pod_cgroup: &'a Path,
    pub proxy_cgroup: &'a Path,
    pub proxy_cgroup_id: u64,
    pub proxy: SocketAddrV4,
    pub sk_msg: bool,
    /// Addresses meshd connects to pods from.
    pub trusted: Vec<std::net::Ipv4Addr>,
    pub log_level: BpfLogLevel,
    /// Where maps and links are pinned (on bpffs).
    pub pin_dir: &'a Path,
    /// Capture stops redirecting (or refuses, `fail_closed`) once meshd's
    /// heartbeat is older than this.
    pub heartbeat_timeout: std::time::Duration,
    pub fail_closed: bool,
}

/// Loaded, attached programs and the maps meshd talks to. Dropping it
/// detaches everything.
pub struct Capture {
    programs: Mutex<Programs>,
    settings: Mutex<Array<MapData, Settings>>,
    heartbeat: Mutex<Array<MapData, u64>>,
    pin_dir: PathBuf,
    destinations: Mutex<HashMap<MapData, Destination, u32>>,
    orig_dst: Mutex<HashMap<MapData, Destination, OrigDst>>,
    sockets: SockHash<MapData, SockKey>,
    counters: PerCpuArray<MapData, u64>,
    /// What `destinations` holds: meshd is its only writer.
    installed: Mutex<Installed>,
    own_connects: Mutex<HashMap<MapData, OwnConnect, u8>>,
    /// `POD_PORTS` and the keys it holds.
    pod_ports: Mutex<(HashMap<MapData, Destination, u32>, Installed)>,
    /// Where the cgroups capture records are.
    cgroups: CgroupTree,
}

/// The loaded object and the (pinned) links that make capture live.
struct Programs {
    ebpf: Ebpf,
    /// This process's links, by pin name; connect hooks first.
    links: Vec<(String, PinnedLink)>,
    /// Prefix of this process's link pins.
    generation: String,
}

/// Entry counts and kernel-side event counters, for metrics.
#[derive(Debug, Default)]
pub struct CaptureStats {
    pub map_entries: Vec<(&'static str, i64)>,
    pub events: Vec<(&'static str, i64)>,
}

const CONNECT4: &str = "meshd_connect4";
const CONNECT6: &str = "meshd_connect6";
const SOCK_OPS: &str = "meshd_sock_ops";
const SK_MSG: &str = "meshd_sk_msg";
const INGRESS: &str = "meshd_ingress";

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, CaptureError> {
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::MissingMap { name })?;
    T::try_from(map).map_err(map_error(name))
}

fn open_cgroup(path: &Path) -> Result<File, CaptureError> {
    File::open(path).map_err(|source| CaptureError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

impl Capture {
    /// Loads and attaches everything, with `mesh`'s destinations installed
    /// before the connect hooks go live.
    pub fn start(spec: &CaptureSpec<'_>, mesh: &Snapshot) -> Result<Self, CaptureError> {
        let cgroups = CgroupTree::new(spec.cgroup_mount);
        // Identity by cgroup must work before anything is captured: meshd
        // finds its own cgroup by id, as it will find the pods'.
        if cgroups.path_of(spec.proxy_cgroup_id).is_none() {
            return Err(CaptureError::CgroupIds {
                id: spec.proxy_cgroup_id,
            });
        }
        prepare_pin_dir(spec.pin_dir)?;
        let level = bpf_level(spec.log_level);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(spec.pin_dir)
            .override_global(aya_log::LEVEL, &level, true)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/meshd-ebpf"
            )))?;
        if spec.log_level != BpfLogLevel::Off {
            start_bpf_logger(&mut ebpf);
        }

        let mut settings: Array<MapData, Settings> = take_map(&mut ebpf, "SETTINGS")?;
        let mut heartbeat: Array<MapData, u64> = take_map(&mut ebpf, "HEARTBEAT")?;
        // Alive before anything reads the settings (an adopted map may hold
        // a stale beat from a meshd that died).
        beat(&mut heartbeat);
        let destinations: HashMap<MapData, Destination, u32> = take_map(&mut ebpf, "DESTINATIONS")?;
        let orig_dst = take_map(&mut ebpf, "ORIG_DST")?;
        let sockets: SockHash<MapData, SockKey> = take_map(&mut ebpf, "SOCKETS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;

        let value = Settings {
            proxy_ip: u32::from_ne_bytes(spec.proxy.ip().octets()),
            proxy_port: u32::from(spec.proxy.port()),
            proxy_cgroup_id: spec.proxy_cgroup_id,
            flags: if spec.sk_msg { FLAG_SK_MSG } else { 0 }
                | mode_flags(mesh)
                | if spec.fail_closed {
                    FLAG_FAIL_CLOSED
                } else {
                    0
                },
            _pad: 0,
            heartbeat_timeout_ns: spec.heartbeat_timeout.as_nanos() as u64,
        };
        settings.set(0, value, 0).map_err(map_error("SETTINGS"))?;
        let mut trusted: HashMap<MapData, u32, u8> = take_map(&mut ebpf, "TRUSTED")?;
        let wanted: Vec<u32> = spec
            .trusted
            .iter()
            .map(|a| u32::from_ne_bytes(a.octets()))
            .collect();
        let stale: Vec<u32> = trusted
            .keys()
            .flatten()
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            let _ = trusted.remove(&key);
        }
        for address in &spec.trusted {
            trusted
                .insert(u32::from_ne_bytes(address.octets()), 1, 0)
                .map_err(map_error("TRUSTED"))?;
        }

        let mut destinations = destinations;
        // What an earlier meshd installed counts as installed: the sync
        // below removes what this config does not want.
        let mut installed: Installed = destinations.iter().flatten().collect();
        install_destinations(&mut destinations, &mut installed, mesh)?;
        let own_connects = take_map(&mut ebpf, "OWN_CONNECTS")?;
        let mut pod_ports: HashMap<MapData, Destination, u32> = take_map(&mut ebpf, "POD_PORTS")?;
        let mut pod_ports_installed: Installed = pod_ports.iter().flatten().collect();
        install_pod_ports(&mut pod_ports, &mut pod_ports_installed, mesh)?;
        let mut programs = Programs {
            ebpf,
            links: Vec::new(),
            generation: format!("link-{}-{}", std::process::id(), monotonic_nanos()),
        };
        programs.attach(spec, &sockets)?;
        // Ours are live: the programs an earlier meshd left go now.
        remove_links(spec.pin_dir, |name| !name.starts_with(&programs.generation));
        Ok(Self {
            programs: Mutex::new(programs),
            settings: Mutex::new(settings),
            heartbeat: Mutex::new(heartbeat),
            pin_dir: spec.pin_dir.to_owned(),
            destinations: Mutex::new(destinations),
            orig_dst: Mutex::new(orig_dst),
            sockets,
            counters,
            installed: Mutex::new(installed),
            own_connects: Mutex::new(own_connects),
            pod_ports: Mutex::new((pod_ports, pod_ports_installed)),
            cgroups,
        })
    }

    /// Makes the `DESTINATIONS` map hold exactly `mesh`'s destinations,
    /// `POD_PORTS` its pods' plaintext rules and `SETTINGS` its mTLS
    /// modes.
    pub fn sync_destinations(&self, mesh: &Snapshot) -> Result<(), CaptureError> {
        {
            let mut settings = lock(&self.settings);
            let mut value = settings.get(&0, 0).map_err(map_error("SETTINGS"))?;
            value.flags = value.flags & !(FLAG_STRICT | FLAG_STRICT_IPV6) | mode_flags(mesh);
            settings.set(0, value, 0).map_err(map_error("SETTINGS"))?;
        }
        install_destinations(
            &mut lock(&self.destinations),
            &mut lock(&self.installed),
            mesh,
        )?;
        let (map, installed) = &mut *lock(&self.pod_ports);
        install_pod_ports(map, installed, mesh)
    }

    /// The original destination of a connection accepted from `client`,
    /// removed from the map as it is read.
    pub fn take_orig_dst(&self, client: SocketAddrV4) -> Option<OrigDst> {
        let key = destination_key(client);
        let mut map = lock(&self.orig_dst);
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig)
    }

    /// Stops capturing new connections; established ones keep their
    /// acceleration until they close.
    pub fn stop_capture(&self) {
        let mut settings = lock(&self.settings);
        if let Ok(mut value) = settings.get(&0, 0) {
            value.proxy_port = 0;
            let _ = settings.set(0, value, 0);
        }
        drop(settings);
        lock(&self.programs).detach_connect();
    }

    /// Refreshes the heartbeat the programs check.
    pub fn beat(&self) {
        beat(&mut lock(&self.heartbeat));
    }

    /// Removes every program and pin: capture ends for good (a graceful
    /// stop with no meshd taking over).
    pub fn remove_pins(&self) {
        let mut programs = lock(&self.programs);
        for (_, link) in std::mem::take(&mut programs.links) {
            if let Ok(link) = link.unpin() {
                drop(link);
            }
        }
        drop(programs);
        remove_links(&self.pin_dir, |_| true);
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }

    /// Leaves programs, links and maps in place for the next meshd (a
    /// hand-over, or a restart that must not open a capture gap).
    pub fn keep_pins(&self) {
        lock(&self.programs).links.clear();
    }
    /// Map sizes and kernel counters. Walks the maps the programs write:
    /// call it at scrape time. `DESTINATIONS`, which only meshd writes, is
    /// counted from what meshd installed — walking its tens of thousands
    /// of keys (a system call each) under its lock held a reload's map
    /// update up for every scrape.
    pub fn stats(&self) -> CaptureStats {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let destinations = count(lock(&self.installed).len());
        let orig_dst = count(lock(&self.orig_dst).keys().count());
        let sockets = count(self.sockets.keys().count());
        let event = |index: u32| -> i64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().map(|v| *v as i64).sum())
                .unwrap_or(0)
        };
        CaptureStats {
            map_entries: vec![
                ("destinations", destinations),
                ("orig_dst", orig_dst),
                ("sockets", sockets),
            ],
            events: vec![
                ("captured", event(counter::CAPTURED)),
                ("sk_msg_fallback", event(counter::SK_MSG_FALLBACK)),
                ("sockets_added", event(counter::SOCKETS_ADDED)),
                ("strict_dropped", event(counter::STRICT_DROPPED)),
                ("plaintext_accepted", event(counter::PLAINTEXT_ACCEPTED)),
                ("failed_open", event(counter::FAILED_OPEN)),
                ("failed_closed", event(counter::FAILED_CLOSED)),
                ("plaintext_refused", event(counter::PLAINTEXT_REFUSED)),
            ],
        }
    }
}

impl OrigDstSource for Capture {
    fn take(&self, client: ClientAddr) -> Option<Captured> {
        let orig = self.take_orig_dst(client.0)?;
        Some(Captured {
            dst: OrigDstAddr(destination_addr(orig.dst)),
            cgroup: self.cgroups.path_of(orig.cgroup_id),
        })
    }

    fn mark_own(&self, local_port: u16, remote: SocketAddrV4, connecting: bool) {
        let key = OwnConnect {
            remote_ip: u32::from_ne_bytes(remote.ip().octets()),
            local_port,
            remote_port: remote.port(),
        };
        let mut map = lock(&self.own_connects);
        if connecting {
            if let Err(err) = map.insert(key, 1, 0) {
                tracing::warn!(%remote, error = %err, "cannot mark meshd's connect: strict mode may drop it");
            }
        } else {
            let _ = map.remove(&key);
        }
    }
}

// === impl Programs ===

impl Programs {
    fn attach(
        &mut self,
        spec: &CaptureSpec<'_>,
        sockets: &SockHash<MapData, SockKey>,
    ) -> Result<(), CaptureError> {
        let pods = open_cgroup(spec.pod_cgroup)?;
        let proxy = open_cgroup(spec.proxy_cgroup)?;
        // On kernels with BPF links (5.7+) aya attaches through a link, which
        // the kernel always lets coexist with others; link_create refuses
        // any flags ("Invalid argument"), so the mode must be the default.
        let mode = CgroupAttachMode::Single;

        let sk_msg: &mut SkMsg = self.program(SK_MSG)?;
        sk_msg.load().map_err(program_error(SK_MSG))?;
        sk_msg.attach(sockets.fd()).map_err(program_error(SK_MSG))?;

        // sock_ops sees the pods' ends (active) and meshd's ends (passive).
        let sock_ops: &mut SockOps = self.program(SOCK_OPS)?;
        sock_ops.load().map_err(program_error(SOCK_OPS))?;
        let mut links = Vec::new();
        for (cgroup, place) in [(&pods, "pods"), (&proxy, "proxy")] {
            let id = sock_ops
                .attach(cgroup, mode)
                .map_err(program_error(SOCK_OPS))?;
            let link = sock_ops.take_link(id).map_err(program_error(SOCK_OPS))?;
            links.push((format!("{SOCK_OPS}-{place}"), FdLink::try_from(link)));
        }

        // Snapshot-mode enforcement on what reaches the pods.
        let ingress: &mut CgroupSkb = self.program(INGRESS)?;
        ingress.load().map_err(program_error(INGRESS))?;
        let id = ingress
            .attach(&pods, CgroupSkbAttachType::Ingress, mode)
            .map_err(program_error(INGRESS))?;
        let link = ingress.take_link(id).map_err(program_error(INGRESS))?;
        links.push((INGRESS.to_owned(), FdLink::try_from(link)));
        for (name, link) in links {
            self.pin(spec.pin_dir, name, link)?;
        }

        // Connect hooks last: from here on connections are captured.
        for name in [CONNECT4, CONNECT6] {
            let program: &mut CgroupSockAddr = self.program(name)?;
            program.load().map_err(program_error(name))?;
            let id = program.attach(&pods, mode).map_err(program_error(name))?;
            let link = program.take_link(id).map_err(program_error(name))?;
            self.pin(spec.pin_dir, name.to_owned(), FdLink::try_from(link))?;
        }
        Ok(())
    }

    /// Pins one link as `<generation>-<name>`.
    fn pin(
        &mut self,
        dir: &Path,
        name: String,
        link: Result<FdLink, aya::programs::links::LinkError>,
    ) -> Result<(), CaptureError> {
        let pin_name = format!("{}-{name}", self.generation);
        let path = dir.join(&pin_name);
        let pinned = link
            .map_err(|e| CaptureError::Pins {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .pin(&path)
            .map_err(|e| CaptureError::Pins {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        self.links.push((pin_name, pinned));
        Ok(())
    }

    fn detach_connect(&mut self) {
        let (connect, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(name, _)| name.ends_with(CONNECT4) || name.ends_with(CONNECT6));
        self.links = rest;
        for (name, link) in connect {
            match link.unpin() {
                Ok(link) => drop(link),
                Err(err) => {
                    tracing::warn!(link = name, error = %err, "detaching a connect hook failed")
                }
            }
        }
    }

    fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, CaptureError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(CaptureError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?;
        program.try_into().map_err(program_error(name))
    }
}

/// The `SETTINGS` bits of `mesh`'s mTLS modes: the mesh's, and IPv6
/// refused when the mesh or any of this node's workloads is strict.
fn mode_flags(mesh: &Snapshot) -> u32 {
    use crate::config::MeshMode;
    let mesh_strict = mesh.config.mesh.mode == MeshMode::Strict;
    let any_strict = mesh_strict
        || mesh
            .config
            .workloads
            .iter()
            .any(|w| w.mtls_mode == Some(MeshMode::Strict));
    let strict = if mesh_strict { FLAG_STRICT } else { 0 };
    strict | if any_strict { FLAG_STRICT_IPV6 } else { 0 }
}

/// Makes `POD_PORTS` hold exactly `mesh`'s pods' plaintext rules.
fn install_pod_ports(
    map: &mut HashMap<MapData, Destination, u32>,
    installed: &mut Installed,
    mesh: &Snapshot,
) -> Result<(), CaptureError> {
    let wanted = mesh
        .pod_ports()
        .into_iter()
        .map(|(addr, rule)| {
            let bits = if rule.refused { PORT_PROTECTED } else { 0 }
                | if rule.admitted { PORT_OPEN } else { 0 }
                | if rule.probe { PORT_PROBE } else { 0 }
                | match rule.mode {
                    Some(crate::config::MeshMode::Strict) => PORT_STRICT,
                    Some(crate::config::MeshMode::Permissive) => PORT_PERMISSIVE,
                    None => 0,
                };
            (destination_key(addr), bits)
        })
        .collect();
    sync_map(map, installed, wanted, "POD_PORTS")
}

fn install_destinations(
    map: &mut HashMap<MapData, Destination, u32>,
    installed: &mut Installed,
    mesh: &Snapshot,
) -> Result<(), CaptureError> {
    let wanted = mesh
        .destinations()
        .map(|(dst, kind)| (destination_key(dst), kind as u32))
        .collect();
    sync_map(map, installed, wanted, "DESTINATIONS")
}

/// The entries meshd put into one of its maps, with their values.
type Installed = std::collections::HashMap<Destination, u32>;

/// Makes `map` (whose entries `installed` tracks) hold exactly `wanted`,
/// writing only what differs: a reload that moves one endpoint of ten
/// thousand services makes a few map updates, not sixty thousand.
fn sync_map(
    map: &mut HashMap<MapData, Destination, u32>,
    installed: &mut Installed,
    wanted: std::collections::HashMap<Destination, u32>,
    name: &'static str,
) -> Result<(), CaptureError> {
    // Stale entries go first, so a full map has room for the new ones.
    let stale: Vec<Destination> = installed
        .keys()
        .filter(|d| !wanted.contains_key(d))
        .copied()
        .collect();
    for key in stale {
        // Already gone is as good as removed.
        let _ = map.remove(&key);
        installed.remove(&key);
    }
    for (key, value) in &wanted {
        if installed.get(key) == Some(value) {
            continue;
        }
        // Tracked once inserted: an update that fails leaves the map, and
        // so `installed`, as they were.
        map.insert(key, value, 0).map_err(map_error(name))?;
        installed.insert(*key, *value);
    }
    Ok(())
}

/// The BPF map key for `addr`.
pub fn destination_key(addr: SocketAddrV4) -> Destination {
    Destination::new(u32::from_ne_bytes(addr.ip().octets()), addr.port())
}

/// The address a BPF map key stands for.
pub fn destination_addr(key: Destination) -> SocketAddrV4 {
    SocketAddrV4::new(std::net::Ipv4Addr::from(key.ip.to_ne_bytes()), key.port)
}

/// Makes sure `dir` exists on a BPF filesystem.
fn prepare_pin_dir(dir: &Path) -> Result<(), CaptureError> {
    std::fs::create_dir_all(dir).map_err(|source| CaptureError::Pins {
        path: dir.to_owned(),
        source,
    })?;
    let on_bpffs = nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if on_bpffs {
        Ok(())
    } else {
        Err(CaptureError::NotBpffs {
            path: dir.to_owned(),
        })
    }
}

/// Unpins (and so detaches) the link pins in `dir` whose names `which`
/// selects.
fn remove_links(dir: &Path, which: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("link-") || !which(&name) {
            continue;
        }
        match PinnedLink::from_pin(entry.path()).map(PinnedLink::unpin) {
            Ok(Ok(link)) => drop(link),
            _ => {
                // Not a link any more: just remove the pin.
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
fn monotonic_nanos() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn beat(map: &mut Array<MapData, u64>) {
    let _ = map.set(0, monotonic_nanos(), 0);
}

/// A poisoned lock only means another thread panicked mid-syscall; the map
/// itself is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bpf_level(level: BpfLogLevel) -> u8 {
    use aya_log::Level;
    match level {
        BpfLogLevel::Off => 0,
        BpfLogLevel::Error => Level::Error as u8,
        BpfLogLevel::Warn => Level::Warn as u8,
        BpfLogLevel::Info => Level::Info as u8,
        BpfLogLevel::Debug => Level::Debug as u8,
        BpfLogLevel::Trace => Level::Trace as u8,
    }
}

/// How often the eBPF log ring buffer is drained. The log is a debugging aid,
/// off by default, so polling is simpler than readiness notification.
const BPF_LOG_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Forwards the programs' aya-log records into meshd's own log.
fn start_bpf_logger(ebpf: &mut Ebpf) {
    let mut logger = match aya_log::EbpfLogger::init_with_logger(ebpf, BpfLog) {
        Ok(logger) => logger,
        Err(err) => {
            tracing::warn!(error = %err, "eBPF log not available");
            return;
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BPF_LOG_POLL);
        loop {
            tick.tick().await;
            logger.flush();
        }
    });
}

/// Re-emits eBPF log records as tracing events under the `meshd::bpf` target,
/// so operators can filter them apart from meshd's own log.
struct BpfLog;

impl log::Log for BpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "meshd::bpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "meshd::bpf", "{message}"),
            log::Level::Info => tracing::info!(target: "meshd::bpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "meshd::bpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "meshd::bpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_round_trip() {
        let a: SocketAddrV4 = "10.96.0.20:80".parse().expect("address");
        let key = destination_key(a);
        assert_eq!(key.ip.to_ne_bytes(), [10, 96, 0, 20]);
        assert_eq!(destination_addr(key), a);
    }
}
