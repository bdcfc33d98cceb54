//! `cargo xtask demo`: three pods and a service on one node, real traffic
//! captured by meshd, what happened, and a clean machine afterwards.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{bail, ensure, Context as _};
use meshd_tests::{
    sys::{self, wait_with_timeout},
    testbed::Testbed,
};

const MIB: u64 = 1024 * 1024;

pub fn run() -> anyhow::Result<()> {
    ensure!(
        std::fs::read_to_string("/proc/self/status")?.contains("Uid:\t0\t"),
        "the demo creates cgroups, network namespaces and eBPF programs: run it as root"
    );
    let tag;
    {
        let bed = Testbed::new(&["productpage", "reviews-v1", "reviews-v2"]);
        tag = bed.tag.clone();
        show(&bed)?;
    }
    let leftovers = leftovers(&tag);
    ensure!(leftovers.is_empty(), "left behind: {leftovers:?}");
    println!("\n== cleaned up: pods, namespaces, cgroups and meshd are gone");
    Ok(())
}

fn show(bed: &Testbed) -> anyhow::Result<()> {
    let testkit = sys::workspace_binary("meshd-testkit");
    println!("== a node (network namespace) with three pods, each in its own netns and cgroup:");
    for pod in &bed.pods {
        println!(
            "   {:<12} {:<12} cgroup {}",
            pod.name,
            pod.ip.to_string(),
            pod.cgroup_path
        );
    }
    for (pod, name) in [
        (bed.pod("reviews-v1"), "reviews-v1"),
        (bed.pod("reviews-v2"), "reviews-v2"),
    ] {
        let listen = format!("{}:9080", pod.ip);
        bed.spawn(
            pod,
            &testkit,
            &[
                "serve", "--listen", &listen, "--mode", "hello", "--name", name,
            ],
        );
        bed.wait_listening(pod, listen.parse()?);
    }
    let echo = format!("{}:7000", bed.pod("reviews-v1").ip);
    bed.spawn(
        bed.pod("reviews-v1"),
        &testkit,
        &["serve", "--listen", &echo, "--mode", "echo"],
    );
    bed.wait_listening(bed.pod("reviews-v1"), echo.parse()?);

    let services = "\
proxy:
  skMsg: true
services:
  - name: reviews
    namespace: default
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 9080 }]
    endpoints:
      - { address: 10.77.0.11, workload: reviews-v1 }
      - { address: 10.77.0.12, workload: reviews-v2 }
  - name: bulk
    vip: 10.96.0.21
    ports: [{ port: 7000 }]
    endpoints: [{ address: 10.77.0.11, workload: reviews-v1 }]
";
    let config = bed.config(services);
    println!(
        "\n== meshd config ({}):\n{}",
        bed.dir.join("meshd.yaml").display(),
        indent(&config)
    );
    let mut meshd = bed.start_meshd(&config);
    println!(
        "== meshd is ready (pid {}); its cgroup programs capture the pods' connects",
        meshd.pid()
    );

    println!("\n== productpage: curl http://10.96.0.20/ six times (a VIP routable nowhere but through meshd)");
    for _ in 0..6 {
        let body = in_pod(
            bed,
            "productpage",
            Path::new("curl"),
            &["-sS", "-m", "5", "http://10.96.0.20/"],
        )?;
        println!("   {}", body.trim());
    }
    println!("   (each server saw 10.77.0.1 — meshd — as its peer: the connection was relayed)");

    println!(
        "\n== productpage: 16 MiB echoed through meshd (sk_msg acceleration on), digests compared"
    );
    let out = in_pod(
        bed,
        "productpage",
        &testkit,
        &[
            "echo",
            "--connect",
            "10.96.0.21:7000",
            "--bytes",
            &(16 * MIB).to_string(),
        ],
    )?;
    println!("   {}", out.trim());

    println!("\n== productpage: a VIP meshd does not know is left alone (no route, not captured)");
    let code = exit_code(
        bed,
        "productpage",
        &["-sS", "-m", "2", "http://10.96.0.99/"],
    );
    println!("   curl http://10.96.0.99/ exit code {code} (7: could not connect)");

    println!("\n== /metrics excerpt (:15020)");
    let metrics = meshd.metrics();
    for line in metrics.lines().filter(|l| excerpt(l)) {
        println!("   {}", shorten(line));
    }

    println!("\n== SIGTERM: meshd stops capturing, drains, detaches and exits");
    let status = meshd.terminate(Duration::from_secs(40));
    println!("   meshd exited: {status}");
    if !status.success() {
        bail!("meshd failed; log:\n{}", meshd.log());
    }
    drop(meshd);
    Ok(())
}

fn in_pod(bed: &Testbed, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let child = bed
        .command(bed.pod(pod), program, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let output = wait_with_timeout(
        child,
        Duration::from_secs(60),
        &program.display().to_string(),
    );
    ensure!(
        output.status.success(),
        "{} {} failed: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn exit_code(bed: &Testbed, pod: &str, args: &[&str]) -> i32 {
    bed.command(bed.pod(pod), Path::new("curl"), args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .and_then(|s| s.code())
        .unwrap_or(-1)
}

fn excerpt(line: &str) -> bool {
    let interesting = [
        "istio_tcp_connections_opened_total{",
        "istio_tcp_sent_bytes_total{",
        "istio_tcp_received_bytes_total{",
        "meshd_active_connections ",
        "meshd_bpf_events{",
        "meshd_bpf_map_entries{",
        "meshd_sk_msg_enabled ",
        "meshd_unresolved_destinations_total",
    ];
    interesting.iter().any(|p| line.starts_with(p))
}

/// Drops the labels that are "unknown" so an excerpt line fits a screen.
fn shorten(line: &str) -> String {
    let Some((series, value)) = line.rsplit_once(' ') else {
        return line.to_owned();
    };
    let Some((name, labels)) = series.split_once('{') else {
        return line.to_owned();
    };
    let kept: Vec<&str> = labels
        .trim_end_matches('}')
        .split("\",")
        .filter(|l| {
            !l.contains("\"unknown")
                && !l.starts_with("destination_service_n")
                && !l.starts_with("source_app")
        })
        .collect();
    let labels = kept.join("\",");
    let labels = if labels.ends_with('"') {
        labels
    } else {
        format!("{labels}\"")
    };
    format!("{name}{{{labels}}} {value}")
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

/// Anything of this run that still exists.
fn leftovers(tag: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("mt{tag}-")) {
                found.push(format!("netns {name}"));
            }
        }
    }
    let cgroup = sys::cgroup2_mount().join(format!("meshd-test-{tag}"));
    if cgroup.exists() {
        found.push(format!("cgroup {}", cgroup.display()));
    }
    found
}
