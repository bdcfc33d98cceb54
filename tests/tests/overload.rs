//! Overload: thousands of idle captured connections keep meshd's memory
//! bounded (and it says how much it uses); running out of file descriptors
//! sheds new connections at once, is logged and counted, and meshd
//! recovers by itself when descriptors free up.

use std::{
    io::{BufRead as _, BufReader},
    process::Child,
    time::Duration,
};

use meshd_tests::{
    clients::{serve, spawn_in, testkit},
    sys::{eventually, wait_with_timeout},
    testbed::{Meshd, Testbed},
};

const SERVICES: &str = "services:
  - name: echo
    vip: 10.96.0.40
    ports: [{ port: 9000 }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
";

/// Reads `child`'s stdout until a line starts with `prefix`.
fn wait_for_line(child: &mut Child, prefix: &str) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with(prefix) => return line,
            Some(Ok(_)) => continue,
            other => panic!("no line starting with {prefix:?}: {other:?}"),
        }
    }
}

fn echo_once(bed: &Testbed) -> bool {
    let child = spawn_in(
        bed,
        bed.pod("client"),
        &testkit(),
        &["echo", "--connect", "10.96.0.40:9000", "--bytes", "100"],
    );
    wait_with_timeout(child, Duration::from_secs(20), "echo")
        .status
        .success()
}

#[test]
fn five_thousand_idle_connections_keep_memory_bounded_and_reported() {
    let bed = Testbed::new(&["client", "v1"]);
    serve(&bed, bed.pod("v1"), 9000, &["--mode", "echo-many"]);
    let meshd = bed.start_meshd(&bed.config(SERVICES));
    let idle_before = meshd.metric("process_resident_memory_bytes", &[]);
    assert!(idle_before > 0.0, "{}", meshd.metrics());

    let mut idle = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &[
            "idle",
            "--connect",
            "10.96.0.40:9000",
            "--count",
            "5000",
            "--seconds",
            "5",
        ],
    );
    let line = wait_for_line(&mut idle, "open ");
    assert_eq!(line, "open 5000");
    assert!(eventually(Duration::from_secs(10), || {
        meshd.metric("meshd_active_connections", &[]) == 5000.0
    }));
    let rss = meshd.metric("process_resident_memory_bytes", &[]);
    let fds = meshd.metric("process_open_fds", &[]);
    // Two descriptors per connection: the client's and the upstream's.
    assert!(fds >= 10_000.0, "{fds} descriptors open");
    // The DaemonSet's memory limit is 256 MiB; 5000 idle connections must
    // fit well inside it.
    let mib = rss / (1024.0 * 1024.0);
    assert!(
        mib < 160.0,
        "meshd uses {mib:.0} MiB with 5000 idle connections"
    );
    eprintln!(
        "5000 idle connections: {mib:.1} MiB resident ({:.1} MiB idle before)",
        idle_before / (1024.0 * 1024.0)
    );
    let done = wait_with_timeout(idle, Duration::from_secs(60), "idle");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(eventually(Duration::from_secs(10), || {
        meshd.metric("meshd_active_connections", &[]) == 0.0
    }));
}

/// Lowers meshd's descriptor limit (soft and hard) with prlimit.
fn limit_descriptors(meshd: &Meshd, limit: u64) {
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", meshd.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");
}

#[test]
fn running_out_of_descriptors_sheds_new_connections_and_recovers() {
    let bed = Testbed::new(&["client", "v1"]);
    serve(&bed, bed.pod("v1"), 9000, &["--mode", "echo-many"]);
    let meshd = bed.start_meshd(&bed.config(SERVICES));
    assert!(echo_once(&bed));
    let mut holders = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &[
            "idle",
            "--connect",
            "10.96.0.40:9000",
            "--count",
            "2",
            "--seconds",
            "4",
        ],
    );
    assert_eq!(wait_for_line(&mut holders, "open "), "open 2");
    // No descriptor to spare. The limit caps descriptor *numbers*, and a
    // new one takes the lowest free number: limit meshd to that.
    let used: std::collections::HashSet<u64> =
        std::fs::read_dir(format!("/proc/{}/fd", meshd.pid()))
            .expect("meshd's descriptors")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
    let open = (0..).find(|n| !used.contains(n)).expect("a free number");
    limit_descriptors(&meshd, open);

    // Out of descriptors: a new connection is reset at once, not left
    // waiting in the accept queue.
    assert!(
        !echo_once(&bed),
        "a connection got through with no descriptors left"
    );
    assert!(
        meshd
            .log()
            .contains("out of file descriptors: resetting new connections"),
        "{}",
        meshd.log()
    );

    // The holders close: meshd serves again by itself.
    let done = wait_with_timeout(holders, Duration::from_secs(30), "idle");
    assert!(
        done.status.success(),
        "held connections broke: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || echo_once(&bed)),
        "meshd did not recover: {}",
        meshd.log()
    );
    assert!(
        meshd.metric(
            "meshd_connections_shed_total",
            &[("reason", "fd_exhausted")]
        ) >= 1.0
    );
    assert!(meshd.metric("meshd_accept_errors_total", &[]) >= 1.0);
    assert_eq!(meshd.metric("process_max_fds", &[]), open as f64);
}
