//! Guards for the kernel objects tests create (cgroups, network namespaces)
//! and small helpers to run things inside them. Every guard removes what it
//! made when dropped, also while a failing test unwinds.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::sched::CloneFlags;

/// The first cgroup2 mount point in `/proc/mounts`.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<_> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("no cgroup2 mount in /proc/mounts: these tests need cgroup v2")
}

/// Panics (never skips) unless the process can run privileged tests.
pub fn require_privileges() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "meshd's black-box tests need root (eBPF, cgroups, network namespaces); run `cargo xtask test` as root"
    );
    let _ = cgroup2_mount();
}

/// A BPF filesystem of the test's own, where its meshd pin their programs
/// and maps. Unmounted on drop: that releases every pin, so whatever a
/// killed meshd left attached is detached, and the host's bpffs (if any)
/// is never touched.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn mount(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).expect("bpffs mount point");
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("cannot mount a bpffs at {}: {e}", dir.display()));
        Self { dir }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The cgroup2 mount made a delegation boundary for cgroup namespaces
/// (`nsdelegate`, as systemd mounts it on most hosts) while this lives;
/// put back as it was on drop.
pub struct NsDelegate {
    mount: PathBuf,
    was_set: bool,
}

impl NsDelegate {
    pub fn enable() -> Self {
        let mount = cgroup2_mount();
        let was_set = fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == mount.to_str() && l.contains("nsdelegate"));
        if !was_set {
            nix::mount::mount(
                None::<&str>,
                &mount,
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT,
                Some("nsdelegate"),
            )
            .expect("remount cgroup2 with nsdelegate");
        }
        Self { mount, was_set }
    }
}

impl Drop for NsDelegate {
    fn drop(&mut self) {
        if !self.was_set {
            // A remount with no options clears the flag again.
            let _ = nix::mount::mount(
                None::<&str>,
                &self.mount,
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT,
                Some(""),
            );
        }
    }
}

// === cgroups ===

/// A cgroup directory that is emptied of processes and removed on drop,
/// together with every cgroup below it.
pub struct Cgroup {
    pub dir: PathBuf,
}

impl Cgroup {
    pub fn create(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { dir }
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Kills every process in this cgroup and below, and waits until they are gone.
    pub fn kill_all(&self) {
        let _ = fs::write(self.dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let events = fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if !events.contains("populated 1") {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("warning: processes linger in {}", self.dir.display());
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        remove_cgroup_tree(&self.dir);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // EBUSY while the last exiting tasks leave.
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

// === network namespaces ===

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `ip -n NAME args…`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` inside this namespace (see [`in_netns`]).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.path(), f)
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path`:
/// sockets it creates live there.
pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A minimal HTTP/1.0 GET; `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

// === processes ===

/// A command that first moves itself into `cgroup`, then enters `netns`
/// (in that order: entering a namespace first could hide the cgroup mount).
pub fn command_in(cgroup: &Cgroup, netns: &Netns, program: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$1" && ns="$2" && shift 2 && exec nsenter --net="$ns" -- "$@""#)
        .arg("sh")
        .arg(cgroup.procs())
        .arg(netns.path())
        .arg(program)
        .args(args);
    command
}

/// Waits for `child` up to `timeout`, killing it (and panicking) when it
/// runs over. Its output is drained as it comes, so a chatty child never
/// blocks on a full pipe.
pub fn wait_with_timeout(mut child: Child, timeout: Duration, what: &str) -> Output {
    fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break (status, false),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                break (child.wait().expect("wait"), true);
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if timed_out {
        panic!(
            "{what} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Waits up to `timeout` for `child` to exit on its own.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The profile directory (`target/<profile>`) the running executable is in.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A built binary of this workspace, next to the running executable
/// (`target/<profile>/NAME`). `MESHD_BIN` overrides meshd's path.
pub fn workspace_binary(name: &str) -> PathBuf {
    if name == "meshd" {
        if let Some(path) = std::env::var_os("MESHD_BIN") {
            return PathBuf::from(path);
        }
    }
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build`, which `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Percent-encodes `text` for a URL's query (a PromQL query, say).
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
