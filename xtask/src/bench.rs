//! `cargo xtask bench`: bulk throughput (iperf3) and request/response
//! latency at a fixed rate (meshd-testkit rr), each path against a direct
//! connection measured in the same run:
//!
//! - same node: direct vs meshd with sk_msg off and on;
//! - across nodes: direct (routed) vs meshd's mTLS tunnel vs an HAProxy
//!   mutual-TLS pair (what a user would otherwise build).
//!
//! Plus meshd's CPU time per GiB relayed and its memory idle and under load.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{ensure, Context as _};
use meshd_tests::{
    sys::{self, wait_with_timeout},
    testbed::{Meshd, PodSpec, Testbed},
};

const RR_RATE: u64 = 1000;
const RR_SECONDS: u64 = 5;
/// Latency runs per path; the median run is reported, so one stall of this
/// shared 2-core machine does not decide a row.
const RR_ROUNDS: usize = 5;

struct Row {
    path: &'static str,
    gbps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_s_per_gib: Option<f64>,
    rss_idle_mib: Option<f64>,
    rss_load_mib: Option<f64>,
}

/// Where a path's client connects: the iperf3 server and the echo server.
struct Targets<'a> {
    iperf: (&'a str, &'a str),
    echo: &'a str,
}

mod http;
mod scale;

pub fn run(
    seconds: u64,
    runs: usize,
    only: Option<&str>,
    bin_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    ensure!(
        std::fs::read_to_string("/proc/self/status")?.contains("Uid:\t0\t"),
        "the bench creates cgroups, network namespaces and eBPF programs: run it as root"
    );
    // Measure the release build (or the binaries given).
    let release = match bin_dir {
        Some(dir) => dir,
        None => sys::profile_dir()
            .parent()
            .context("target dir")?
            .join("release"),
    };
    std::env::set_var("MESHD_BIN", release.join("meshd"));
    // Per-connection debug lines would be measured too.
    std::env::set_var("MESHD_TEST_LOG", "info");
    let bench = Bench {
        testkit: release.join("meshd-testkit"),
        meshd: release.join("meshd"),
        seconds,
        runs,
    };
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let same_node = wanted("same-node").then(|| bench.same_node()).transpose()?;
    let cross_node = wanted("cross-node")
        .then(|| bench.cross_node())
        .transpose()?;
    let http = wanted("http").then(|| http::run(&bench)).transpose()?;
    let scale = wanted("scale").then(|| scale::run(&bench)).transpose()?;
    println!(
        "\nThroughput: iperf3, one stream, {seconds} s. Latency: one connection, 64-byte echo, \
         {RR_RATE} req/s for {RR_SECONDS} s, open loop, median of {RR_ROUNDS} runs."
    );
    if let Some(rows) = same_node {
        println!("\n### Same node, pod → pod\n");
        print_table(&rows);
    }
    if let Some(rows) = cross_node {
        println!("\n### Across nodes, pod → pod (meshd rows: CPU and memory summed over both nodes' meshd)\n");
        print_table(&rows);
    }
    if let Some(tables) = http {
        http::print(&tables);
    }
    if let Some(tables) = scale {
        scale::print(&tables);
    }
    Ok(())
}

/// The mesh CA the bench's two meshd take their identities from.
struct MeshCa {
    /// Its directory (`meshd ca init`), also HAProxy's CA.
    dir: PathBuf,
    /// The node section's `identity` lines that use it.
    identity: String,
}

impl MeshCa {
    /// node-a's and node-b's meshd, each with `rest(node)` after its node
    /// section, ready and settled.
    fn start_pair(&self, bed: &Testbed, rest: impl Fn(usize) -> String) -> (Meshd, Meshd) {
        let start =
            |node| bed.start_meshd_on(node, &bed.config_with(node, &self.identity, &rest(node)));
        let pair = (start(0), start(1));
        std::thread::sleep(Duration::from_millis(500));
        pair
    }
}

struct Bench {
    testkit: PathBuf,
    meshd: PathBuf,
    seconds: u64,
    /// Runs per HTTP row (median and range shown).
    runs: usize,
}

impl Bench {
    /// A fresh mesh CA in the test bed's directory.
    fn mesh_ca(&self, bed: &Testbed) -> anyhow::Result<MeshCa> {
        let dir = bed.dir.join("ca");
        quiet(
            Command::new(&self.meshd)
                .args(["ca", "init", "--out"])
                .arg(&dir),
        )?;
        let identity = format!("  identity:\n    issuer: {}\n", dir.display());
        Ok(MeshCa { dir, identity })
    }

    /// iperf3 servers on 5201 (behind a VIP) and 5202 (direct), echo
    /// servers on 7000 (behind a VIP) and 7001 (direct), in `server`.
    fn servers(&self, bed: &Testbed) -> anyhow::Result<()> {
        let server = bed.pod("server");
        let ip = server.ip.to_string();
        for port in ["5201", "5202"] {
            bed.spawn(
                server,
                Path::new("iperf3"),
                &["-s", "-p", port, "-B", &ip, "--logfile", "/dev/null"],
            );
            bed.wait_listening(server, format!("{ip}:{port}").parse()?);
        }
        for port in ["7000", "7001"] {
            let listen = format!("{ip}:{port}");
            bed.spawn(
                server,
                &self.testkit,
                &["serve", "--listen", &listen, "--mode", "echo"],
            );
            bed.wait_listening(server, listen.parse()?);
        }
        Ok(())
    }

    fn services(server_ip: &str, node: &str) -> String {
        format!(
            "services:\n  - {{ name: iperf, vip: 10.96.0.20, ports: [{{ port: 5201 }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}\n  - {{ name: echo, vip: 10.96.0.21, ports: [{{ port: 7000 }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}\n"
        )
    }

    /// Latency first (on a quiet path), then throughput.
    fn measure(
        &self,
        bed: &Testbed,
        path: &'static str,
        targets: &Targets<'_>,
        meshds: &[&Meshd],
    ) -> anyhow::Result<Row> {
        eprintln!("bench: {path}");
        let pids: Vec<u32> = meshds.iter().map(|m| m.pid()).collect();
        let rss_idle = pids.iter().map(|p| rss_kib(*p).unwrap_or(0.0)).sum::<f64>() / 1024.0;
        let sampler = RssSampler::start(pids.clone());
        let (p50_us, p99_us) = self.rr(bed, targets.echo)?;
        let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p).unwrap_or(0.0)).sum();
        let (gbps, bytes) = self.iperf(bed, targets.iperf.0, targets.iperf.1)?;
        let cpu = pids
            .iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .sum::<f64>()
            - cpu_before;
        let rss_load = sampler.stop() / 1024.0;
        let measured = !meshds.is_empty();
        Ok(Row {
            path,
            gbps,
            p50_us,
            p99_us,
            cpu_s_per_gib: measured.then(|| cpu / (bytes / (1u64 << 30) as f64)),
            rss_idle_mib: measured.then_some(rss_idle),
            rss_load_mib: measured.then_some(rss_load),
        })
    }

    fn same_node(&self) -> anyhow::Result<Vec<Row>> {
        let bed = Testbed::new(&["client", "server"]);
        self.servers(&bed)?;
        let server = "10.77.0.11";
        let direct = Targets {
            iperf: (server, "5202"),
            echo: "10.77.0.11:7001",
        };
        let meshed = Targets {
            iperf: ("10.96.0.20", "5201"),
            echo: "10.96.0.21:7000",
        };
        let mut rows = vec![self.measure(&bed, "direct", &direct, &[])?];
        for (path, sk_msg) in [("meshd, sk_msg off", false), ("meshd, sk_msg on", true)] {
            let config = bed.config(&format!(
                "proxy:\n  skMsg: {sk_msg}\n{}",
                Self::services(server, "")
            ));
            let mut meshd = bed.start_meshd(&config);
            std::thread::sleep(Duration::from_millis(500));
            rows.push(self.measure(&bed, path, &meshed, &[&meshd])?);
            ensure!(
                meshd.terminate(Duration::from_secs(40)).success(),
                "meshd failed:\n{}",
                meshd.log()
            );
        }
        Ok(rows)
    }

    fn cross_node(&self) -> anyhow::Result<Vec<Row>> {
        let bed = Testbed::nodes(&[
            ("node-a", &[PodSpec::named("client")]),
            ("node-b", &[PodSpec::named("server")]),
        ]);
        self.servers(&bed)?;
        let server = "10.78.0.10";
        let mut rows = Vec::new();
        let direct = Targets {
            iperf: (server, "5202"),
            echo: "10.78.0.10:7001",
        };
        rows.push(self.measure(&bed, "direct", &direct, &[])?);

        let mesh = self.mesh_ca(&bed)?;
        let services = Self::services(server, ", node: node-b");
        let (a, b) = mesh.start_pair(&bed, |_| services.clone());
        let meshed = Targets {
            iperf: ("10.96.0.20", "5201"),
            echo: "10.96.0.21:7000",
        };
        rows.push(self.measure(&bed, "meshd mTLS tunnel", &meshed, &[&a, &b])?);
        drop((a, b));

        let hop = |name, port, hop, target| Hop {
            name,
            port,
            hop,
            target,
            h2c: false,
        };
        haproxy_pair(
            &bed,
            &self.meshd,
            &mesh.dir,
            HaproxyMode::Tcp,
            &[
                hop("iperf", 6000, 6443, "10.78.0.10:5202"),
                hop("echo", 6001, 6444, "10.78.0.10:7001"),
            ],
        )?;
        let haproxy = Targets {
            iperf: ("10.77.0.1", "6000"),
            echo: "10.77.0.1:6001",
        };
        rows.push(self.measure(&bed, "HAProxy mTLS pair", &haproxy, &[])?);
        Ok(rows)
    }

    /// iperf3 from the client pod: (Gbit/s received, bytes received).
    fn iperf(&self, bed: &Testbed, host: &str, port: &str) -> anyhow::Result<(f64, f64)> {
        let seconds = self.seconds.to_string();
        let out = output(
            bed,
            Path::new("iperf3"),
            &["-c", host, "-p", port, "-t", &seconds, "-J"],
            self.seconds + 30,
        )?;
        let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        let received = &json["end"]["sum_received"];
        let bps = received["bits_per_second"]
            .as_f64()
            .context("iperf3 bits_per_second")?;
        let bytes = received["bytes"].as_f64().context("iperf3 bytes")?;
        Ok((bps / 1e9, bytes))
    }

    /// testkit rr from the client pod, after a discarded warm-up, RR_ROUNDS
    /// times: (p50, p99) in microseconds of the run with the median p99.
    fn rr(&self, bed: &Testbed, target: &str) -> anyhow::Result<(f64, f64)> {
        self.rr_once(bed, target, 1)?;
        let mut runs = (0..RR_ROUNDS)
            .map(|_| self.rr_once(bed, target, RR_SECONDS))
            .collect::<anyhow::Result<Vec<_>>>()?;
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        Ok(runs[RR_ROUNDS / 2])
    }

    fn rr_once(&self, bed: &Testbed, target: &str, seconds: u64) -> anyhow::Result<(f64, f64)> {
        let args = [
            "rr",
            "--connect",
            target,
            "--rate",
            &RR_RATE.to_string(),
            "--seconds",
            &seconds.to_string(),
        ];
        let out = output(bed, &self.testkit, &args, seconds + 30)?;
        let field = |name: &str| -> anyhow::Result<f64> {
            out.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in {out:?}"))
        };
        Ok((field("p50_us=")?, field("p99_us=")?))
    }
}

fn print_table(rows: &[Row]) {
    let direct = &rows[0];
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    println!(
        "| path | throughput Gbit/s | × direct | p50 µs | p99 µs | p50 added µs | p99 × direct | meshd CPU s/GiB | meshd RSS idle MiB | meshd RSS under load MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} | {} |",
            row.path,
            row.gbps,
            row.gbps / direct.gbps,
            row.p50_us,
            row.p99_us,
            row.p50_us - direct.p50_us,
            row.p99_us / direct.p99_us,
            opt(row.cpu_s_per_gib, 2),
            opt(row.rss_idle_mib, 1),
            opt(row.rss_load_mib, 1),
        );
    }
}

/// Runs a command, its output kept unless it fails.
pub fn quiet(command: &mut Command) -> anyhow::Result<()> {
    let out = command.output()?;
    ensure!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn output(
    bed: &Testbed,
    program: &Path,
    args: &[&str],
    timeout: u64,
) -> anyhow::Result<String> {
    let child = bed
        .command(bed.pod("client"), program, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = wait_with_timeout(
        child,
        Duration::from_secs(timeout),
        &program.display().to_string(),
    );
    ensure!(
        out.status.success(),
        "{} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:")
}

/// The most memory `pid` has had resident (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples processes' summed RSS every 50 ms while load runs.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0f64;
            while !flag.load(Ordering::Relaxed) {
                max = max.max(pids.iter().map(|p| rss_kib(*p).unwrap_or(0.0)).sum());
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        Self { stop, thread }
    }

    pub fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

/// A process's user + system CPU time so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; after "pid (comm)" they are 11 and 12.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// HAProxy on node-a originates TLS 1.3 with a client certificate to
/// HAProxy on node-b, which demands and verifies it and forwards to the
/// server pod: the same hop count and crypto as meshd's tunnel.
/// `hops`: (name, port on node-a, port on node-b, the pod's address).
/// One proxied path through an HAProxy pair: clients connect to
/// node-a's `port`, node-a's HAProxy to node-b's `hop` over mutual TLS,
/// node-b's to `target`.
pub struct Hop<'a> {
    pub name: &'a str,
    pub port: u16,
    pub hop: u16,
    pub target: &'a str,
    /// In HTTP mode: clients and `target` speak HTTP/2 without TLS (h2c).
    pub h2c: bool,
}

/// How an HAProxy pair proxies.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum HaproxyMode {
    /// Bytes (`mode tcp`): parses nothing, as meshd's tcp ports.
    Tcp,
    /// Full L7 (`mode http`), as meshd's http ports: each request parsed
    /// and routed, carried between the nodes over HTTP/2 (ALPN h2), as
    /// meshd's tunnel does.
    Http,
}

/// Starts an HAProxy pair; their pids (node-a's, node-b's).
pub fn haproxy_pair(
    bed: &Testbed,
    meshd: &Path,
    ca: &Path,
    mode: HaproxyMode,
    hops: &[Hop<'_>],
) -> anyhow::Result<Vec<u32>> {
    let pem = |namespace: &str, sa: &str| -> anyhow::Result<PathBuf> {
        let dir = bed.dir.join(format!("haproxy-{sa}"));
        quiet(
            Command::new(meshd)
                .args(["ca", "issue", "--ca"])
                .arg(ca)
                .args(["--namespace", namespace, "--service-account", sa, "--out"])
                .arg(&dir),
        )?;
        let combined = dir.join("combined.pem");
        let text = std::fs::read_to_string(dir.join("tls.crt"))?
            + &std::fs::read_to_string(dir.join("tls.key"))?;
        std::fs::write(&combined, text)?;
        Ok(combined)
    };
    let client_pem = pem("default", "client")?;
    let server_pem = pem("default", "server")?;
    let ca_file = ca.join("ca.crt");
    let (defaults, alpn) = match mode {
        HaproxyMode::Tcp => ("mode tcp", ""),
        HaproxyMode::Http => ("mode http\n  http-reuse always", " alpn h2"),
    };
    let global = format!("global\n  maxconn 4096\ndefaults\n  {defaults}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n");
    let h2c = |hop: &Hop<'_>| {
        if mode == HaproxyMode::Http && hop.h2c {
            " proto h2"
        } else {
            ""
        }
    };
    // Both hops verify the chain against the mesh CA. HAProxy checks a
    // server's DNS name only when given one; SPIFFE certificates carry
    // a URI instead, so no name check is configured.
    let origin = |hop: &Hop<'_>| {
        format!(
            "frontend {name}\n  bind 10.77.0.1:{port}{h2c}\n  default_backend {name}\nbackend {name}\n  server b 192.168.77.2:{next} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3{alpn}\n",
            client_pem.display(),
            ca_file.display(),
            name = hop.name,
            port = hop.port,
            next = hop.hop,
            h2c = h2c(hop),
        )
    };
    let terminate = |hop: &Hop<'_>| {
        format!(
            "frontend {name}\n  bind 192.168.77.2:{next} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3{alpn}\n  default_backend {name}\nbackend {name}\n  server pod {target}{h2c}\n",
            server_pem.display(),
            ca_file.display(),
            name = hop.name,
            next = hop.hop,
            target = hop.target,
            h2c = h2c(hop),
        )
    };
    let mut source = global.clone();
    let mut destination = global;
    for hop in hops {
        source.push_str(&origin(hop));
        destination.push_str(&terminate(hop));
    }
    let source_cfg = bed.write("haproxy-a.cfg", &source);
    let destination_cfg = bed.write("haproxy-b.cfg", &destination);
    let b = bed.spawn_on_node(
        1,
        Path::new("haproxy"),
        &["-db", "-f", &destination_cfg.display().to_string()],
    );
    let a = bed.spawn_on_node(
        0,
        Path::new("haproxy"),
        &["-db", "-f", &source_cfg.display().to_string()],
    );
    let first = std::net::SocketAddr::from(([10, 77, 0, 1], hops[0].port));
    let up = sys::eventually(Duration::from_secs(10), || {
        sys::in_netns(&bed.nodes[0].netns.path(), move || {
            std::net::TcpStream::connect_timeout(&first, Duration::from_millis(200)).is_ok()
        })
    });
    ensure!(up, "HAProxy did not start");
    Ok(vec![a, b])
}
