//! `cargo xtask bench`: bulk throughput (iperf3) and request/response
//! latency at a fixed rate (meshd-testkit rr), direct vs through meshd with
//! sk_msg off and on, all in one run, as ratios to direct; plus meshd's
//! memory idle and at peak and its CPU time per GiB relayed.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{ensure, Context as _};
use meshd_tests::{
    sys::{self, wait_with_timeout},
    testbed::{Meshd, Testbed},
};

const SERVER: &str = "10.77.0.11";
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
    rss_peak_mib: Option<f64>,
}

pub fn run(seconds: u64) -> anyhow::Result<()> {
    ensure!(
        std::fs::read_to_string("/proc/self/status")?.contains("Uid:\t0\t"),
        "the bench creates cgroups, network namespaces and eBPF programs: run it as root"
    );
    // Measure the release build.
    let release = sys::profile_dir()
        .parent()
        .context("target dir")?
        .join("release");
    std::env::set_var("MESHD_BIN", release.join("meshd"));
    let testkit = release.join("meshd-testkit");

    let bed = Testbed::new(&["client", "server"]);
    let server = bed.pod("server");
    for port in ["5201", "5202"] {
        bed.spawn(
            server,
            std::path::Path::new("iperf3"),
            &["-s", "-p", port, "-B", SERVER, "--logfile", "/dev/null"],
        );
        bed.wait_listening(server, format!("{SERVER}:{port}").parse()?);
    }
    for port in ["7000", "7001"] {
        let listen = format!("{SERVER}:{port}");
        bed.spawn(
            server,
            &testkit,
            &["serve", "--listen", &listen, "--mode", "echo"],
        );
        bed.wait_listening(server, listen.parse()?);
    }

    let mut rows = Vec::new();
    eprintln!("bench: direct");
    let (p50_us, p99_us) = rr(&bed, &testkit, &format!("{SERVER}:7001"))?;
    let (gbps, _) = iperf(&bed, SERVER, "5202", seconds)?;
    rows.push(Row {
        path: "direct",
        gbps,
        p50_us,
        p99_us,
        cpu_s_per_gib: None,
        rss_idle_mib: None,
        rss_peak_mib: None,
    });

    for (path, sk_msg) in [("meshd, sk_msg off", false), ("meshd, sk_msg on", true)] {
        eprintln!("bench: {path}");
        let services = format!(
            "proxy:\n  skMsg: {sk_msg}\nservices:\n  - {{ name: iperf, vip: 10.96.0.20, ports: [{{ port: 5201 }}], endpoints: [{{ address: {SERVER} }}] }}\n  - {{ name: echo, vip: 10.96.0.21, ports: [{{ port: 7000 }}], endpoints: [{{ address: {SERVER} }}] }}\n"
        );
        let mut meshd = bed.start_meshd(&bed.config(&services));
        std::thread::sleep(Duration::from_millis(500));
        let rss_idle = rss_kib(meshd.pid()).context("meshd RSS")? / 1024.0;
        let sampler = RssSampler::start(meshd.pid());
        let (p50_us, p99_us) = rr(&bed, &testkit, "10.96.0.21:7000")?;
        let cpu_before = cpu_seconds(&meshd)?;
        let (gbps, bytes) = iperf(&bed, "10.96.0.20", "5201", seconds)?;
        let cpu = cpu_seconds(&meshd)? - cpu_before;
        let rss_peak = sampler.stop() / 1024.0;
        ensure!(
            meshd.terminate(Duration::from_secs(40)).success(),
            "meshd failed:\n{}",
            meshd.log()
        );
        rows.push(Row {
            path,
            gbps,
            p50_us,
            p99_us,
            cpu_s_per_gib: Some(cpu / (bytes / (1u64 << 30) as f64)),
            rss_idle_mib: Some(rss_idle),
            rss_peak_mib: Some(rss_peak),
        });
    }
    print_table(&rows, seconds);
    Ok(())
}

fn print_table(rows: &[Row], seconds: u64) {
    let direct = &rows[0];
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    println!("\nSame node, pod → pod. Throughput: iperf3, one stream, {seconds} s. Latency: one connection, 64-byte echo, {RR_RATE} req/s for {RR_SECONDS} s, open loop, median of {RR_ROUNDS} runs.\n");
    println!("| path | throughput Gbit/s | × direct | p50 µs | p99 µs | p99 × direct | p99 added µs | meshd CPU s/GiB | meshd RSS idle MiB | meshd RSS under load MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {} | {} | {} |",
            row.path,
            row.gbps,
            row.gbps / direct.gbps,
            row.p50_us,
            row.p99_us,
            row.p99_us / direct.p99_us,
            row.p99_us - direct.p99_us,
            opt(row.cpu_s_per_gib, 2),
            opt(row.rss_idle_mib, 1),
            opt(row.rss_peak_mib, 1),
        );
    }
}

/// iperf3 from the client pod: (Gbit/s received, bytes received).
fn iperf(bed: &Testbed, host: &str, port: &str, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let out = output(
        bed,
        &PathBuf::from("iperf3"),
        &["-c", host, "-p", port, "-t", &seconds.to_string(), "-J"],
        seconds + 30,
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let received = &json["end"]["sum_received"];
    let bps = received["bits_per_second"]
        .as_f64()
        .context("iperf3 bits_per_second")?;
    let bytes = received["bytes"].as_f64().context("iperf3 bytes")?;
    Ok((bps / 1e9, bytes))
}

/// testkit rr from the client pod, RR_ROUNDS times: (p50, p99) in
/// microseconds of the run with the median p99.
fn rr(bed: &Testbed, testkit: &PathBuf, target: &str) -> anyhow::Result<(f64, f64)> {
    // A discarded warm-up run: first connections pay for cold caches.
    rr_once(bed, testkit, target, 1)?;
    let mut runs = (0..RR_ROUNDS)
        .map(|_| rr_once(bed, testkit, target, RR_SECONDS))
        .collect::<anyhow::Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(runs[RR_ROUNDS / 2])
}

fn rr_once(
    bed: &Testbed,
    testkit: &PathBuf,
    target: &str,
    seconds: u64,
) -> anyhow::Result<(f64, f64)> {
    let out = output(
        bed,
        testkit,
        &[
            "rr",
            "--connect",
            target,
            "--rate",
            &RR_RATE.to_string(),
            "--seconds",
            &seconds.to_string(),
        ],
        seconds + 30,
    )?;
    let field = |name: &str| -> anyhow::Result<f64> {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {out:?}"))
    };
    Ok((field("p50_us=")?, field("p99_us=")?))
}

fn output(bed: &Testbed, program: &PathBuf, args: &[&str], timeout: u64) -> anyhow::Result<String> {
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
fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples a process's RSS every 50 ms while load runs. (VmHWM would also
/// count the transient peak of parsing the kernel's BTF at start-up.)
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0f64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(rss_kib(pid).unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        Self { stop, thread }
    }

    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

/// meshd's user + system CPU time so far.
fn cpu_seconds(meshd: &Meshd) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", meshd.pid()))?;
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
