//! Capture and relay, end to end: pods in their own cgroups and network
//! namespaces, real eBPF programs, a real meshd, real clients (curl and
//! meshd-testkit) and real servers. Needs root and cgroup v2; fails, never
//! skips, without them.

use std::time::{Duration, Instant};

use meshd_tests::{
    clients::{client, curl, serve, serve_hello, spawn_in, testkit},
    sys::{eventually, wait_with_timeout},
    testbed::Testbed,
};

const VIP: &str = "10.96.0.20";
const MIB: u64 = 1024 * 1024;
const SERVER_IP: &str = "10.77.0.11";

/// Pods `client` (10.77.0.10) and `server` (10.77.0.11).
fn testbed() -> Testbed {
    Testbed::new(&["client", "server"])
}

/// Service `server` (VIP:80 → server:8080) plus `extra` YAML (proxy settings,
/// more services).
fn config(bed: &Testbed, extra: &str) -> String {
    bed.config(&format!(
        "services:\n  - name: server\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints: [{{ address: {SERVER_IP}, workload: server }}]\n{extra}"
    ))
}

#[test]
fn pod_reaches_service_vip_through_meshd() {
    let bed = testbed();
    serve_hello(&bed, "server", &[]);
    let meshd = bed.start_meshd(&config(&bed, ""));

    let (code, body) = curl(&bed, bed.pod("client"), &format!("http://{VIP}/"));
    assert_eq!(
        code,
        0,
        "curl through meshd failed; meshd log:\n{}",
        meshd.log()
    );
    // The server saw meshd (the node address) as its peer: the connection was relayed.
    assert!(
        body.starts_with("hello from server to 10.77.0.1:"),
        "{body}"
    );

    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("destination_service", "server.default.svc.cluster.local"),
        ("destination_workload", "server"),
    ];
    assert_eq!(
        meshd.metric("istio_tcp_connections_opened_total", &labels),
        1.0
    );
    assert!(eventually(Duration::from_secs(5), || {
        meshd.metric("istio_tcp_connections_closed_total", &labels) == 1.0
    }));
    assert!(meshd.metric("istio_tcp_received_bytes_total", &labels) > 0.0);
    assert!(meshd.metric("istio_tcp_sent_bytes_total", &labels) >= body.len() as f64);
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "captured")]),
        1.0
    );
}

#[test]
fn uncaptured_connections_pass_untouched() {
    let bed = testbed();
    let server = bed.pod("server");
    serve(&bed, server, 8080, &["--mode", "hello", "--name", "server"]);
    serve(&bed, server, 9090, &["--mode", "hello", "--name", "other"]);
    let meshd = bed.start_meshd(&config(&bed, ""));

    // A destination not in the map, from a captured pod: reached directly.
    let (code, body) = curl(
        &bed,
        bed.pod("client"),
        &format!("http://{SERVER_IP}:9090/"),
    );
    assert_eq!(code, 0, "direct connection failed");
    assert!(
        body.starts_with("hello from other to 10.77.0.10:"),
        "{body}"
    );

    // A process outside the pods' cgroup subtree: a meshed pod address is
    // reached directly, and a VIP is not captured at all (and has no route).
    let (code, body) = curl(&bed, &bed.outside, &format!("http://{SERVER_IP}:8080/"));
    assert_eq!(code, 0, "outside host could not reach the pod");
    assert!(
        body.starts_with("hello from server to 10.77.0.250:"),
        "{body}"
    );
    let (code, _) = curl(&bed, &bed.outside, &format!("http://{VIP}/"));
    assert_eq!(
        code, 7,
        "a VIP from outside the subtree must not be captured"
    );

    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "captured")]),
        0.0
    );
    assert_eq!(meshd.metric("istio_tcp_connections_opened_total", &[]), 0.0);
}

#[test]
fn a_meshed_pod_address_is_captured_too() {
    let bed = testbed();
    serve_hello(&bed, "server", &[]);
    let meshd = bed.start_meshd(&config(&bed, ""));
    let (code, body) = curl(
        &bed,
        bed.pod("client"),
        &format!("http://{SERVER_IP}:8080/"),
    );
    assert_eq!(code, 0);
    assert!(
        body.starts_with("hello from server to 10.77.0.1:"),
        "{body}"
    );
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "captured")]),
        1.0
    );
}

#[test]
fn ipv4_mapped_destinations_on_ipv6_sockets_are_captured() {
    let bed = testbed();
    serve(&bed, bed.pod("server"), 8080, &["--mode", "sink"]);
    let meshd = bed.start_meshd(&config(&bed, ""));
    let out = client(
        &bed,
        bed.pod("client"),
        &[
            "upload",
            "--connect",
            &format!("[::ffff:{VIP}]:80"),
            "--bytes",
            "1048576",
        ],
        Duration::from_secs(30),
    );
    assert!(out.starts_with("ok upload"), "{out}");
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "captured")]),
        1.0
    );
}

/// Echo, upload and download of `bytes` each through meshd, digests compared.
fn transfers_arrive_intact(sk_msg: bool) {
    let bed = testbed();
    let server = bed.pod("server");
    serve(&bed, server, 8080, &["--mode", "echo"]);
    serve(&bed, server, 8081, &["--mode", "sink"]);
    let size = (64 * MIB).to_string();
    serve(&bed, server, 8082, &["--mode", "source", "--bytes", &size]);
    let extra = format!(
        "  - name: sink\n    vip: 10.96.0.21\n    ports: [{{ port: 80, targetPort: 8081 }}]\n    endpoints: [{{ address: {SERVER_IP} }}]\n  - name: source\n    vip: 10.96.0.22\n    ports: [{{ port: 80, targetPort: 8082 }}]\n    endpoints: [{{ address: {SERVER_IP} }}]\nproxy:\n  skMsg: {sk_msg}\n"
    );
    let meshd = bed.start_meshd(&config(&bed, &extra));
    let pod = bed.pod("client");
    let timeout = Duration::from_secs(120);
    let echo = client(
        &bed,
        pod,
        &["echo", "--connect", &format!("{VIP}:80"), "--bytes", &size],
        timeout,
    );
    assert!(echo.starts_with("ok echo"), "{echo}");
    let up = client(
        &bed,
        pod,
        &["upload", "--connect", "10.96.0.21:80", "--bytes", &size],
        timeout,
    );
    assert!(up.starts_with("ok upload"), "{up}");
    let down = client(
        &bed,
        pod,
        &["download", "--connect", "10.96.0.22:80", "--bytes", &size],
        timeout,
    );
    assert!(down.starts_with("ok download"), "{down}");

    let metrics = meshd.metrics();
    let value =
        |name, labels: &[(&str, &str)]| meshd_tests::testbed::metric_sum(&metrics, name, labels);
    assert_eq!(
        value("meshd_sk_msg_enabled", &[]),
        if sk_msg { 1.0 } else { 0.0 }
    );
    let enrolled = value("meshd_bpf_events", &[("event", "sockets_added")]);
    if sk_msg {
        // Both ends of each of the three app⇄meshd connections.
        assert_eq!(enrolled, 6.0, "{metrics}");
    } else {
        assert_eq!(enrolled, 0.0, "{metrics}");
    }
    // Both ends are on this node: it reports the bytes as both.
    for reporter in ["source", "destination"] {
        let echo_labels = [
            ("reporter", reporter),
            ("destination_service", "server.default.svc.cluster.local"),
        ];
        let sent = value("istio_tcp_sent_bytes_total", &echo_labels);
        let received = value("istio_tcp_received_bytes_total", &echo_labels);
        assert_eq!(
            (sent, received),
            ((64 * MIB) as f64, (64 * MIB) as f64),
            "{reporter}"
        );
    }
}

#[test]
fn transfers_of_64_mib_arrive_intact_with_sk_msg() {
    transfers_arrive_intact(true);
}

#[test]
fn transfers_of_64_mib_arrive_intact_without_sk_msg() {
    transfers_arrive_intact(false);
}

fn five_hundred_concurrent_connections_complete(sk_msg: bool) {
    let bed = testbed();
    serve(&bed, bed.pod("server"), 8080, &["--mode", "echo"]);
    let meshd = bed.start_meshd(&config(&bed, &format!("proxy:\n  skMsg: {sk_msg}\n")));
    let many = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        // Connects spread over half a second: a burst of 500 handshakes
        // through one veth bridge on 2 vCPUs has lost packets (see notes).
        &[
            "many",
            "--connect",
            &format!("{VIP}:80"),
            "--count",
            "500",
            "--ramp-ms",
            "500",
        ],
    );
    let output = wait_with_timeout(many, Duration::from_secs(90), "testkit many");
    let out = String::from_utf8_lossy(&output.stdout);
    if !out.contains("ok 500 of 500") {
        let metrics = meshd.metrics();
        let meshd_lines: Vec<_> = metrics
            .lines()
            .filter(|l| l.starts_with("meshd_"))
            .collect();
        panic!(
            "{out}{}\nmeshd metrics:\n{}\nmeshd log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            meshd_lines.join("\n"),
            meshd
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(
        meshd.metric(
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        ),
        500.0
    );
    assert!(eventually(Duration::from_secs(10), || {
        meshd.metric("meshd_active_connections", &[]) == 0.0
    }));
}

#[test]
fn five_hundred_concurrent_connections_complete_with_sk_msg() {
    five_hundred_concurrent_connections_complete(true);
}

#[test]
fn five_hundred_concurrent_connections_complete_without_sk_msg() {
    five_hundred_concurrent_connections_complete(false);
}

#[test]
fn a_killed_client_frees_meshds_side() {
    let bed = testbed();
    serve(&bed, bed.pod("server"), 8080, &["--mode", "sink"]);
    let meshd = bed.start_meshd(&config(&bed, ""));
    let mut holder = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &["hold", "--connect", &format!("{VIP}:80")],
    );
    let active = || meshd.metric("meshd_active_connections", &[]);
    assert!(
        eventually(Duration::from_secs(10), || active() == 1.0),
        "the held connection never became active"
    );
    holder.kill().expect("kill client");
    let _ = holder.wait();
    assert!(
        eventually(Duration::from_secs(10), || active() == 0.0),
        "meshd kept the dead client's connection; log:\n{}",
        meshd.log()
    );
    // Reported by this node as source and as destination.
    for reporter in ["source", "destination"] {
        let labels = [("reporter", reporter)];
        assert_eq!(
            meshd.metric("istio_tcp_connections_closed_total", &labels),
            1.0
        );
    }
}

#[test]
fn unresolvable_connections_are_closed_at_once_and_counted() {
    let bed = testbed();
    let extra = "  - name: empty\n    vip: 10.96.0.30\n    ports: [{ port: 80 }]\n";
    let meshd = bed.start_meshd(&config(&bed, extra));

    // Captured, but the service has no endpoints: reset, not left hanging.
    let started = Instant::now();
    let (code, _) = curl(&bed, bed.pod("client"), "http://10.96.0.30/");
    assert!(
        code == 56 || code == 52 || code == 7,
        "curl exit {code}: expected a reset"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the connection was left hanging"
    );
    assert_eq!(
        meshd.metric(
            "meshd_unresolved_destinations_total",
            &[("reason", "no_endpoints")]
        ),
        1.0
    );

    // Straight to meshd's listener, not captured: no original destination.
    let (code, _) = curl(&bed, &bed.outside, "http://10.77.0.1:15001/");
    assert_ne!(code, 0);
    assert!(eventually(Duration::from_secs(5), || {
        meshd.metric(
            "meshd_unresolved_destinations_total",
            &[("reason", "no_original_destination")],
        ) == 1.0
    }));
    assert!(
        meshd.log().contains("no original destination"),
        "{}",
        meshd.log()
    );
}

#[test]
fn sigterm_lets_in_flight_connections_finish_then_exits_zero() {
    let bed = testbed();
    let size = (4 * MIB).to_string();
    let rate = (2 * MIB).to_string();
    serve(
        &bed,
        bed.pod("server"),
        8080,
        &["--mode", "source", "--bytes", &size, "--rate", &rate],
    );
    let mut meshd = bed.start_meshd(&config(&bed, ""));
    let download = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &[
            "download",
            "--connect",
            &format!("{VIP}:80"),
            "--bytes",
            &size,
        ],
    );
    assert!(eventually(Duration::from_secs(5), || {
        meshd.metric("meshd_active_connections", &[]) == 1.0
    }));
    let status = meshd.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "meshd exited with {status}; log:\n{}",
        meshd.log()
    );
    let output = wait_with_timeout(download, Duration::from_secs(30), "download");
    assert!(
        output.status.success(),
        "the in-flight download broke: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(meshd.log().contains("draining"), "{}", meshd.log());
}

#[test]
fn sigterm_cuts_connections_still_open_after_the_drain_timeout() {
    let bed = testbed();
    let size = (64 * MIB).to_string();
    serve(
        &bed,
        bed.pod("server"),
        8080,
        &["--mode", "source", "--bytes", &size, "--rate", "1048576"],
    );
    let mut meshd = bed.start_meshd(&config(&bed, "proxy:\n  drainTimeout: 1s\n"));
    let download = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &[
            "download",
            "--connect",
            &format!("{VIP}:80"),
            "--bytes",
            &size,
        ],
    );
    assert!(eventually(Duration::from_secs(5), || {
        meshd.metric("meshd_active_connections", &[]) == 1.0
    }));
    let status = meshd.terminate(Duration::from_secs(10));
    assert!(status.success(), "meshd exited with {status}");
    let output = wait_with_timeout(download, Duration::from_secs(10), "download");
    assert!(
        !output.status.success(),
        "a 64 s download cannot have finished"
    );
    assert!(
        meshd.log().contains("drain timeout reached"),
        "{}",
        meshd.log()
    );
}

#[test]
fn an_unreachable_endpoint_times_out_resets_the_client_and_is_counted() {
    let bed = testbed();
    // 10.77.0.99 is on the bridge's subnet but no host answers for it.
    let extra = "  - name: gone\n    vip: 10.96.0.31\n    ports: [{ port: 80 }]\n    endpoints: [{ address: 10.77.0.99, workload: gone }]\nproxy:\n  connectTimeout: 500ms\n";
    let meshd = bed.start_meshd(&config(&bed, extra));
    let started = Instant::now();
    let (code, _) = curl(&bed, bed.pod("client"), "http://10.96.0.31/");
    assert!(
        code == 56 || code == 52,
        "curl exit {code}: expected a reset"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the connect timeout was not applied"
    );
    let service = [("destination_service", "gone.default.svc.cluster.local")];
    assert_eq!(
        meshd.metric("meshd_upstream_connect_failures_total", &service),
        1.0
    );
    let failed = [service[0], ("response_flags", "UF")];
    assert_eq!(
        meshd.metric("istio_tcp_connections_opened_total", &failed),
        1.0
    );
    assert_eq!(
        meshd.metric("istio_tcp_connections_closed_total", &failed),
        1.0
    );
    assert_eq!(meshd.metric("meshd_active_connections", &[]), 0.0);
}
