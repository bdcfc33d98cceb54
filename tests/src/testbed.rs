//! Nodes on one machine. Each node is a network namespace with a bridge;
//! its pods each have their own network namespace and cgroup (veth to the
//! bridge); nodes are joined by a backbone bridge in a namespace of its own.
//! Node 0 also has an "outside" host on its bridge, outside the pods' cgroup
//! subtree. meshd runs in a node's namespace.
//!
//! Addresses: node i is 10.(77+i).0.1/24 on its bridge and 192.168.77.(1+i)
//! on the backbone; pod j of node i is 10.(77+i).0.(10+j); the outside host
//! is 10.77.0.250. Nodes route each other's pod subnets; no namespace has a
//! default route, so a service VIP (10.96.x.x) is unreachable unless meshd
//! captures it, and nothing can leave the machine.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use crate::sys::{self, Cgroup, Netns};

/// Node 0's bridge address (where its pods reach meshd).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 250);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A host on a node's bridge: a pod, or the outside host.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Index of the node it runs on.
    pub node: usize,
    pub netns: Netns,
    pub cgroup: Cgroup,
    /// The pod's cgroup path as meshd's config writes it (from the mount
    /// root). Its processes run in `cgroup`: this cgroup itself, or in the
    /// kubelet's layouts a container's below it.
    pub cgroup_path: String,
    /// `metadata.uid` in the kubelet's layouts.
    pub uid: String,
    /// `status.qosClass`.
    pub qos: String,
    pub namespace: String,
    pub service_account: String,
    /// Its workload's labels (YAML flow mapping entries).
    pub labels: String,
}

pub struct Node {
    pub name: String,
    pub netns: Netns,
    /// Bridge address: pods' gateway and meshd's capture address.
    pub ip: Ipv4Addr,
    /// Backbone address: where its meshd accepts tunnels.
    pub backbone_ip: Ipv4Addr,
    /// `/<root>/<node>`: the pods' subtree and `proxy/` live below.
    pub cgroup_path: String,
    /// `node.podCgroup`: `<cgroup_path>/pods`, or the kubelet's
    /// `kubepods.slice` / `kubepods`.
    pub pod_cgroup: String,
}

/// How pods' cgroups are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// `/<root>/<node>/pods/<pod>`, processes in the pod's cgroup; the
    /// config names each cgroup.
    Plain,
    /// The kubelet's with the systemd driver: `…/kubepods.slice/
    /// kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`, processes in
    /// a `cri-containerd-<id>.scope` below; the config names the pod.
    Systemd,
    /// The kubelet's with the cgroupfs driver: `…/kubepods/<qos>/pod<uid>`,
    /// processes in a `<container id>` cgroup below.
    Cgroupfs,
}

pub struct Testbed {
    pub tag: String,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub outside: Pod,
    /// Kept for its guard: deleted with the testbed.
    _backbone: Option<Netns>,
    processes: Mutex<Vec<Child>>,
    layout: CgroupLayout,
    /// Containers made so far (for their ids).
    containers: AtomicUsize,
    /// Where meshd pins; unmounted once the processes are gone.
    bpffs: sys::Bpffs,
    // Dropped last, after every process in it is gone.
    root: Cgroup,
}

/// A pod to create: name, namespace, service account.
#[derive(Clone, Copy)]
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The workload's labels as a YAML flow mapping's entries; `None`:
    /// `app: <name>`.
    pub labels: Option<&'a str>,
    /// `Guaranteed`, `Burstable` or `BestEffort` (where the kubelet's
    /// layouts put the pod).
    pub qos: &'a str,
}

impl<'a> PodSpec<'a> {
    /// A pod in `default` whose service account is its name.
    pub fn named(name: &'a str) -> Self {
        Self {
            name,
            namespace: "default",
            service_account: name,
            labels: None,
            qos: "Burstable",
        }
    }

    /// This pod with QoS class `qos`.
    pub fn qos(self, qos: &'a str) -> Self {
        Self { qos, ..self }
    }
}

impl Testbed {
    /// One node with `pods`.
    pub fn new(pods: &[&str]) -> Self {
        let specs: Vec<_> = pods.iter().map(|p| PodSpec::named(p)).collect();
        Self::nodes(&[("node-a", &specs)])
    }

    /// Several nodes, each `(name, pods)`.
    pub fn nodes(layout: &[(&str, &[PodSpec<'_>])]) -> Self {
        Self::with_cgroups(CgroupLayout::Plain, layout)
    }

    /// Several nodes whose pods' cgroups are laid out as `cgroups` says.
    pub fn with_cgroups(cgroups: CgroupLayout, layout: &[(&str, &[PodSpec<'_>])]) -> Self {
        sys::require_privileges();
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mount = sys::cgroup2_mount();
        let root_path = format!("/meshd-test-{tag}");
        let root = Cgroup::create(mount.join(&root_path[1..]));
        let dir = std::env::temp_dir().join(format!("meshd-test-{tag}"));
        fs::create_dir_all(&dir).expect("create test dir");
        let bpffs = sys::Bpffs::mount(std::env::temp_dir().join(format!("meshd-bpf-{tag}")));

        let backbone = (layout.len() > 1).then(|| {
            let backbone = Netns::create(&format!("mt{tag}-wire"));
            backbone.ip(&["link", "add", "br0", "type", "bridge"]);
            backbone.ip(&["link", "set", "br0", "up"]);
            backbone
        });
        let mut nodes = Vec::new();
        for (i, (name, _)) in layout.iter().enumerate() {
            let node = Node {
                name: (*name).to_owned(),
                netns: Netns::create(&format!("mt{tag}-n{i}")),
                ip: Ipv4Addr::new(10, 77 + i as u8, 0, 1),
                backbone_ip: Ipv4Addr::new(192, 168, 77, 1 + i as u8),
                cgroup_path: format!("{root_path}/{name}"),
                pod_cgroup: format!(
                    "{root_path}/{name}/{}",
                    match cgroups {
                        CgroupLayout::Plain => "pods",
                        CgroupLayout::Systemd => "kubepods.slice",
                        CgroupLayout::Cgroupfs => "kubepods",
                    }
                ),
            };
            fs::create_dir_all(root.dir.join(name).join("proxy")).expect("proxy cgroup");
            node.netns.ip(&["link", "add", "br0", "type", "bridge"]);
            node.netns
                .ip(&["addr", "add", &format!("{}/24", node.ip), "dev", "br0"]);
            node.netns.ip(&["link", "set", "br0", "up"]);
            if let Some(backbone) = &backbone {
                let end = format!("bb{i}");
                sys::ip(&[
                    "link",
                    "add",
                    "eth1",
                    "netns",
                    &node.netns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &end,
                    "netns",
                    &backbone.name,
                ]);
                backbone.ip(&["link", "set", &end, "master", "br0"]);
                backbone.ip(&["link", "set", &end, "up"]);
                node.netns.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", node.backbone_ip),
                    "dev",
                    "eth1",
                ]);
                node.netns.ip(&["link", "set", "eth1", "up"]);
                sysctl(&node.netns, "net.ipv4.ip_forward=1");
            }
            nodes.push(node);
        }
        // Each node routes the other nodes' pod subnets over the backbone.
        for (i, node) in nodes.iter().enumerate() {
            for (j, other) in nodes.iter().enumerate() {
                if i != j {
                    let subnet = format!("10.{}.0.0/24", 77 + j);
                    node.netns.ip(&[
                        "route",
                        "add",
                        &subnet,
                        "via",
                        &other.backbone_ip.to_string(),
                    ]);
                }
            }
        }

        let outside = Pod {
            name: "outside".into(),
            ip: OUTSIDE_IP,
            node: 0,
            netns: Netns::create(&format!("mt{tag}-outside")),
            cgroup: Cgroup::create(root.dir.join("outside")),
            cgroup_path: format!("{root_path}/outside"),
            uid: String::new(),
            qos: "BestEffort".into(),
            namespace: "default".into(),
            service_account: "outside".into(),
            labels: "app: outside".into(),
        };
        wire(&nodes, &outside, "vpo");
        let mut pods = Vec::new();
        for (i, (_, specs)) in layout.iter().enumerate() {
            for (j, spec) in specs.iter().enumerate() {
                let uid = format!(
                    "{:08x}-0000-4000-8000-{:012x}",
                    i * 256 + j,
                    NEXT.load(Ordering::Relaxed)
                );
                let cgroup_path = pod_cgroup(cgroups, &nodes[i].pod_cgroup, spec, &uid);
                // In the kubelet's layouts the pod's own directory holds
                // no process (removed with the root); a container's does.
                let procs = match cgroups {
                    CgroupLayout::Plain => cgroup_path.clone(),
                    _ => container_cgroup(cgroups, &cgroup_path, j),
                };
                let cgroup = Cgroup::create(mount.join(&procs[1..]));
                let pod = Pod {
                    name: spec.name.to_owned(),
                    ip: Ipv4Addr::new(10, 77 + i as u8, 0, 10 + j as u8),
                    node: i,
                    netns: Netns::create(&format!("mt{tag}-{}", spec.name)),
                    cgroup,
                    cgroup_path,
                    uid,
                    qos: spec.qos.to_owned(),
                    namespace: spec.namespace.to_owned(),
                    service_account: spec.service_account.to_owned(),
                    labels: spec
                        .labels
                        .map_or_else(|| format!("app: {}", spec.name), str::to_owned),
                };
                wire(&nodes, &pod, &format!("vp{j}"));
                pods.push(pod);
            }
        }
        Self {
            tag,
            dir,
            nodes,
            pods,
            outside,
            _backbone: backbone,
            processes: Mutex::default(),
            layout: cgroups,
            containers: AtomicUsize::new(1000),
            bpffs,
            root,
        }
    }

    /// A new container of `pod` (a cgroup below the pod's, as the runtime
    /// makes one when a container starts), removed with the testbed.
    pub fn new_container(&self, pod: &Pod) -> Cgroup {
        let n = self.containers.fetch_add(1, Ordering::Relaxed);
        let path = container_cgroup(self.layout, &pod.cgroup_path, n);
        Cgroup::create(sys::cgroup2_mount().join(&path[1..]))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Node 0's network namespace.
    pub fn node(&self) -> &Netns {
        &self.nodes[0].netns
    }

    /// Node `node`'s config: its `node` section, its pods as workloads, the
    /// `nodes` list when there are several; `rest` adds the rest.
    pub fn config_for(&self, node: usize, rest: &str) -> String {
        self.config_with(node, "", rest)
    }

    /// As [`Self::config_for`], with `node_extra` (lines indented by two
    /// spaces) added to the `node` section.
    pub fn config_with(&self, node: usize, node_extra: &str, rest: &str) -> String {
        let this = &self.nodes[node];
        let mut yaml = format!(
            "node:\n  name: {}\n  captureAddress: {}\n  podCgroup: {}\n  proxyCgroup: {cg}/proxy\n  pinDir: {}\n  handoverSocket: {}\n{node_extra}",
            this.name,
            this.ip,
            this.pod_cgroup,
            self.pin_dir(node).display(),
            self.dir.join(format!("handover-{}.sock", this.name)).display(),
            cg = this.cgroup_path
        );
        if self.nodes.len() > 1 {
            yaml.push_str("nodes:\n");
            for node in &self.nodes {
                yaml.push_str(&format!(
                    "  - {{ name: {}, address: {} }}\n",
                    node.name, node.backbone_ip
                ));
            }
        }
        let mut workloads = String::new();
        for pod in self.pods.iter().filter(|p| p.node == node) {
            let cgroup = match self.layout {
                CgroupLayout::Plain => format!("cgroup: {}", pod.cgroup_path),
                _ => format!("pod: {{ uid: {}, qosClass: {} }}", pod.uid, pod.qos),
            };
            workloads.push_str(&format!(
                "  - {{ name: {name}, namespace: {ns}, serviceAccount: {sa}, {cgroup}, addresses: [{ip}], labels: {{ {labels} }} }}\n",
                labels = pod.labels,
                name = pod.name,
                ns = pod.namespace,
                sa = pod.service_account,
                ip = pod.ip
            ));
        }
        if workloads.is_empty() {
            yaml.push_str("workloads: []\n");
        } else {
            yaml.push_str("workloads:\n");
            yaml.push_str(&workloads);
        }
        yaml.push_str(rest);
        yaml
    }

    /// Where node `node`'s meshd pins its programs and maps (removed with
    /// the testbed).
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.bpffs.dir.join(&self.nodes[node].name)
    }

    /// Node 0's config (see [`Self::config_for`]).
    pub fn config(&self, rest: &str) -> String {
        self.config_for(0, rest)
    }

    /// Writes `text` to a file in the test's directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, text).expect("write file");
        path
    }

    /// Starts `program args` in `pod` and keeps it until the testbed ends.
    pub fn spawn(&self, pod: &Pod, program: &Path, args: &[&str]) -> u32 {
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

    /// Starts `program args` in node `node`'s network namespace (in the
    /// test's cgroup, so it is cleaned up), kept until the testbed ends;
    /// its pid.
    pub fn spawn_on_node(&self, node: usize, program: &Path, args: &[&str]) -> u32 {
        let child = sys::command_in(&self.root, &self.nodes[node].netns, program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn on node");
        let pid = child.id();
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
        pid
    }

    /// A real Prometheus on node 0 (`127.0.0.1:9090` in its namespace),
    /// scraping every node's meshd (`:15020`) each `interval`.
    pub fn start_prometheus(&self, interval: &str) {
        let targets: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("'{}:15020'", n.ip))
            .collect();
        let config = self.write(
            "prometheus.yml",
            &format!(
                "global: {{ scrape_interval: {interval} }}\nscrape_configs:\n  - job_name: meshd\n    static_configs: [{{ targets: [{}] }}]\n",
                targets.join(", ")
            ),
        );
        let data = self.dir.join("prometheus");
        self.spawn_on_node(
            0,
            Path::new("prometheus"),
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", data.display()),
                "--web.listen-address=127.0.0.1:9090",
            ],
        );
    }

    /// A command that runs in `pod`; the caller spawns and waits.
    pub fn command(&self, pod: &Pod, program: &Path, args: &[&str]) -> Command {
        sys::command_in(&pod.cgroup, &pod.netns, program, args)
    }

    /// Starts meshd on node 0 with `config` (YAML text), waits until ready.
    pub fn start_meshd(&self, config: &str) -> Meshd {
        self.start_meshd_on(0, config)
    }

    /// Starts meshd on node `node` with `config`, waits until ready.
    pub fn start_meshd_on(&self, node: usize, config: &str) -> Meshd {
        let path = self.write(&format!("meshd-{}.yaml", self.nodes[node].name), config);
        let meshd = Meshd::spawn_on(self, node, &[path], &[]);
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

/// Where the kubelet puts `spec`'s cgroup below `pods` (see the kubelet's
/// `pkg/kubelet/cm`: QoS classes as child cgroups, Guaranteed pods
/// directly below; systemd names each slice by its whole ancestry).
fn pod_cgroup(layout: CgroupLayout, pods: &str, spec: &PodSpec<'_>, uid: &str) -> String {
    let qos = spec.qos.to_lowercase();
    match (layout, spec.qos) {
        (CgroupLayout::Plain, _) => format!("{pods}/{}", spec.name),
        (CgroupLayout::Systemd, "Guaranteed") => {
            format!("{pods}/kubepods-pod{}.slice", uid.replace('-', "_"))
        }
        (CgroupLayout::Systemd, _) => format!(
            "{pods}/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice",
            uid.replace('-', "_")
        ),
        (CgroupLayout::Cgroupfs, "Guaranteed") => format!("{pods}/pod{uid}"),
        (CgroupLayout::Cgroupfs, _) => format!("{pods}/{qos}/pod{uid}"),
    }
}

/// Container `n`'s cgroup below a pod's: containerd's scope with systemd,
/// the bare container id with cgroupfs.
fn container_cgroup(layout: CgroupLayout, pod: &str, n: usize) -> String {
    let id = format!("{n:064x}");
    match layout {
        CgroupLayout::Systemd => format!("{pod}/cri-containerd-{id}.scope"),
        _ => format!("{pod}/{id}"),
    }
}

/// Connects `pod` to its node's bridge with a veth pair, and routes the
/// other nodes' pod subnets through the node.
fn wire(nodes: &[Node], pod: &Pod, node_end: &str) {
    let node = &nodes[pod.node];
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
        &node.netns.name,
    ]);
    node.netns.ip(&["link", "set", node_end, "master", "br0"]);
    node.netns.ip(&["link", "set", node_end, "up"]);
    pod.netns
        .ip(&["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"]);
    pod.netns.ip(&["link", "set", "eth0", "up"]);
    for (j, _) in nodes.iter().enumerate().filter(|(j, _)| *j != pod.node) {
        let subnet = format!("10.{}.0.0/24", 77 + j);
        pod.netns
            .ip(&["route", "add", &subnet, "via", &node.ip.to_string()]);
    }
}

fn sysctl(netns: &Netns, setting: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", &netns.name, "sysctl", "-qw", setting])
        .status()
        .expect("run sysctl");
    assert!(status.success(), "sysctl {setting} in {}", netns.name);
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
        // Fields drop next: netns guards, the bpffs, then the root cgroup.
    }
}

// === meshd ===

/// A running meshd; killed on drop if still running.
pub struct Meshd {
    child: Child,
    log: PathBuf,
    node: PathBuf,
    ip: Ipv4Addr,
}

impl Meshd {
    /// Spawns `meshd run` in node 0's namespace.
    pub fn spawn(testbed: &Testbed, configs: &[PathBuf], extra: &[&str]) -> Self {
        Self::spawn_on(testbed, 0, configs, extra)
    }

    /// Spawns `meshd run` in node `node`'s namespace, starting from the
    /// test's root cgroup (meshd moves itself into its own).
    pub fn spawn_on(testbed: &Testbed, node: usize, configs: &[PathBuf], extra: &[&str]) -> Self {
        Self::spawn_wrapped(testbed, node, configs, extra, &[])
    }

    /// As [`Self::spawn_on`], with meshd started by `wrapper` (e.g.
    /// `["unshare", "--cgroup", "--"]`).
    pub fn spawn_wrapped(
        testbed: &Testbed,
        node: usize,
        configs: &[PathBuf],
        extra: &[&str],
        wrapper: &[&str],
    ) -> Self {
        let meshd = sys::workspace_binary("meshd");
        let log = testbed.dir.join(format!(
            "meshd-{}-{}.log",
            testbed.nodes[node].name,
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let (program, mut args) = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut args: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
                args.push(meshd.display().to_string());
                (PathBuf::from(program), args)
            }
            None => (meshd.clone(), Vec::new()),
        };
        args.push("run".to_owned());
        for config in configs {
            args.push("--config".into());
            args.push(config.display().to_string());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log_file = fs::File::create(&log).expect("create meshd log");
        let child = sys::command_in(&testbed.root, &testbed.nodes[node].netns, &program, &args)
            .env(
                "MESHD_LOG",
                std::env::var("MESHD_TEST_LOG").unwrap_or_else(|_| "info,meshd=debug".into()),
            )
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn meshd");
        Self {
            child,
            log,
            node: testbed.nodes[node].netns.path(),
            ip: testbed.nodes[node].ip,
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
        let addr = SocketAddr::from((self.ip, port));
        sys::in_netns(&self.node, move || sys::http_get(addr, &path))
    }

    pub fn wait_ready(&self) {
        let mut child_exited = false;
        let ready = sys::eventually(Duration::from_secs(30), || {
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

    /// A JSON document from the admin API (loopback :15000 in the node).
    pub fn admin(&self, path: &str) -> String {
        let path = path.to_owned();
        let addr = SocketAddr::from(([127, 0, 0, 1], 15000));
        match sys::in_netns(&self.node, move || sys::http_get(addr, &path)) {
            Some((200, body)) => body,
            other => panic!("admin API answered {other:?}; meshd log:\n{}", self.log()),
        }
    }

    /// Runs `program args` in meshd's node namespace (where its loopback
    /// admin API is), expecting success; returns stdout.
    pub fn run_in_node(&self, program: &Path, args: &[&str]) -> String {
        let output = self.output_in_node(program, args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `program args` in meshd's node namespace; its output, whatever
    /// its exit status.
    pub fn output_in_node(&self, program: &Path, args: &[&str]) -> std::process::Output {
        let program = program.to_owned();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        sys::in_netns(&self.node, move || {
            std::process::Command::new(program).args(args).output()
        })
        .expect("run in the node namespace")
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

    /// SIGKILL, as a crash would: nothing of meshd's own shutdown runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
