//! A node on one machine: a node network namespace with a bridge, pods each
//! in their own network namespace and cgroup (veth to the bridge), an
//! "outside" host on the same bridge but outside the pods' cgroup subtree,
//! and meshd running in the node namespace.
//!
//! Addresses: node 10.77.0.1/24 on `br0`; pod i at 10.77.0.(10+i); the
//! outside host at 10.77.0.250. No namespace has a default route, so a
//! service VIP (10.96.x.x) is unreachable unless meshd captures it.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use crate::sys::{self, Cgroup, Netns};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 250);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A host on the bridge: a pod, or the outside host.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: Netns,
    pub cgroup: Cgroup,
    /// The cgroup path as meshd's config writes it (from the mount root).
    pub cgroup_path: String,
}

pub struct Testbed {
    pub tag: String,
    pub dir: PathBuf,
    pub node: Netns,
    pub pods: Vec<Pod>,
    pub outside: Pod,
    /// `/<root>`: the test's cgroup; `/<root>/pods` holds the pods.
    pub root_path: String,
    processes: std::sync::Mutex<Vec<Child>>,
    // Dropped last, after every process in it is gone.
    root: Cgroup,
}

impl Testbed {
    pub fn new(pod_names: &[&str]) -> Self {
        sys::require_privileges();
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mount = sys::cgroup2_mount();
        let root_path = format!("/meshd-test-{tag}");
        let root = Cgroup::create(mount.join(&root_path[1..]));
        let _proxy = fs::create_dir_all(root.dir.join("proxy"));
        let dir = std::env::temp_dir().join(format!("meshd-test-{tag}"));
        fs::create_dir_all(&dir).expect("create test dir");

        let node = Netns::create(&format!("mt{tag}-node"));
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "br0"]);
        node.ip(&["link", "set", "br0", "up"]);

        let mut testbed = Self {
            dir,
            node,
            pods: Vec::new(),
            outside: Pod {
                name: String::new(),
                ip: OUTSIDE_IP,
                netns: Netns::create(&format!("mt{tag}-outside")),
                cgroup: Cgroup::create(root.dir.join("outside")),
                cgroup_path: format!("{root_path}/outside"),
            },
            root_path,
            processes: Default::default(),
            root,
            tag,
        };
        testbed.outside.name = "outside".into();
        testbed.wire(&testbed.outside, "vpo");
        for (i, name) in pod_names.iter().enumerate() {
            let pod = Pod {
                name: (*name).to_owned(),
                ip: Ipv4Addr::new(10, 77, 0, 10 + i as u8),
                netns: Netns::create(&format!("mt{}-{name}", testbed.tag)),
                cgroup: Cgroup::create(testbed.root.dir.join("pods").join(name)),
                cgroup_path: format!("{}/pods/{name}", testbed.root_path),
            };
            testbed.wire(&pod, &format!("vp{i}"));
            testbed.pods.push(pod);
        }
        testbed
    }

    /// Connects `pod` to the bridge with a veth pair.
    fn wire(&self, pod: &Pod, node_end: &str) {
        sys::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &pod.netns.name,
            "type",
            "veth",
            "peer",
            "name",
            node_end,
            "netns",
            &self.node.name,
        ]);
        self.node.ip(&["link", "set", node_end, "master", "br0"]);
        self.node.ip(&["link", "set", node_end, "up"]);
        pod.netns
            .ip(&["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"]);
        pod.netns.ip(&["link", "set", "eth0", "up"]);
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The config's `node` section and one workload per pod; `rest` adds
    /// `proxy` and `services`.
    pub fn config(&self, rest: &str) -> String {
        let mut yaml = format!(
            "node:\n  name: node-a\n  captureAddress: {NODE_IP}\n  podCgroup: {root}/pods\n  proxyCgroup: {root}/proxy\nworkloads:\n",
            root = self.root_path
        );
        for pod in &self.pods {
            yaml.push_str(&format!(
                "  - {{ name: {name}, namespace: default, cgroup: {cg}, addresses: [{ip}], labels: {{ app: {name} }} }}\n",
                name = pod.name,
                cg = pod.cgroup_path,
                ip = pod.ip
            ));
        }
        yaml.push_str(rest);
        yaml
    }

    /// Writes `text` to a file in the test's directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, text).expect("write file");
        path
    }

    /// Starts `program args` in `pod` and keeps it until the testbed ends.
    pub fn spawn(&self, pod: &Pod, program: &std::path::Path, args: &[&str]) -> u32 {
        let child = sys::command_in(&pod.cgroup, &pod.netns, program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn in pod");
        let pid = child.id();
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
        pid
    }

    /// A command that runs in `pod`; the caller spawns and waits.
    pub fn command(&self, pod: &Pod, program: &std::path::Path, args: &[&str]) -> Command {
        sys::command_in(&pod.cgroup, &pod.netns, program, args)
    }

    /// Starts meshd in the node namespace with `config` (YAML text) and
    /// waits until it reports ready.
    pub fn start_meshd(&self, config: &str) -> Meshd {
        let path = self.write("meshd.yaml", config);
        let meshd = Meshd::spawn(self, &[path], &[]);
        meshd.wait_ready();
        meshd
    }

    /// Waits until `addr` accepts connections inside `pod`'s namespace.
    pub fn wait_listening(&self, pod: &Pod, addr: SocketAddr) {
        let ok = sys::eventually(Duration::from_secs(10), || {
            pod.netns.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        });
        assert!(ok, "nothing listens on {addr} in {}", pod.name);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.root.kill_all();
        let processes = self.processes.get_mut().unwrap_or_else(|p| p.into_inner());
        for child in processes.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
        // Fields drop next: netns guards, then the root cgroup.
    }
}

// === meshd ===

/// A running meshd; killed on drop if still running.
pub struct Meshd {
    child: Child,
    log: PathBuf,
    node: PathBuf,
}

impl Meshd {
    /// Spawns `meshd run` in the testbed's node namespace, starting from the
    /// test's root cgroup (meshd moves itself into its own).
    pub fn spawn(testbed: &Testbed, configs: &[PathBuf], extra: &[&str]) -> Self {
        let meshd = sys::workspace_binary("meshd");
        let log = testbed.dir.join(format!(
            "meshd-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut args = vec!["run".to_owned()];
        for config in configs {
            args.push("--config".into());
            args.push(config.display().to_string());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log_file = fs::File::create(&log).expect("create meshd log");
        let child = sys::command_in(&testbed.root, &testbed.node, &meshd, &args)
            .env("MESHD_LOG", "info,meshd=debug")
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn meshd");
        Self {
            child,
            log,
            node: testbed.node.path(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let path = path.to_owned();
        sys::in_netns(&self.node, move || {
            sys::http_get(SocketAddr::from((NODE_IP, port)), &path)
        })
    }

    pub fn wait_ready(&self) {
        let mut child_exited = false;
        let ready = sys::eventually(Duration::from_secs(30), || {
            if fs::metadata(&self.node).is_err() {
                return false;
            }
            if let Some((200, _)) = self.get(15021, "/healthz/ready") {
                return true;
            }
            child_exited = !self.running();
            child_exited
        });
        assert!(
            ready && !child_exited,
            "meshd did not become ready; its log:\n{}",
            self.log()
        );
    }

    fn running(&self) -> bool {
        // Signal 0 only checks the process exists.
        nix::sys::signal::kill(pid(&self.child), None).is_ok()
            && !fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
                .unwrap_or_default()
                .contains(") Z ")
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        match self.get(15020, "/metrics") {
            Some((200, body)) => body,
            other => panic!(
                "GET /metrics answered {other:?}; meshd log:\n{}",
                self.log()
            ),
        }
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        nix::sys::signal::kill(pid(&self.child), nix::sys::signal::Signal::SIGTERM)
            .expect("SIGTERM");
        sys::wait_exit(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "meshd did not exit within {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }

    /// Waits for meshd to exit by itself (e.g. on a start-up error).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        sys::wait_exit(&mut self.child, timeout)
            .unwrap_or_else(|| panic!("meshd still runs after {timeout:?}; log:\n{}", self.log()))
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pid(child: &Child) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(child.id() as i32)
}

/// Sum of the samples of metric `name` (exact family sample name) whose
/// label set contains every pair in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
