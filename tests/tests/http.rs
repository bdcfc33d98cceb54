//! L7 through meshd: HTTP/1.1 and HTTP/2 served by the node proxy, routes
//! with weighted subsets and header matches, Istio's
//! request metrics — with curl and h2load against real servers. (Request
//! timeouts and flags are in the in-process tier, `meshd/tests/direct.rs`.)

use std::{path::Path, time::Duration};

use meshd_tests::{
    clients::{serve_hello, spawn_in},
    sys::{eventually, wait_with_timeout},
    testbed::Testbed,
};

/// Runs curl with `args` in pod `pod`: (exit code, stdout).
fn curl(bed: &Testbed, pod: &str, args: &[&str]) -> (i32, String) {
    meshd_tests::clients::curl_args(bed, bed.pod(pod), args)
}

/// `client` plus servers `v1` (10.77.0.11) and `v2` (10.77.0.12) answering
/// with their names on :8080, `delay_ms` late.
fn bed_with_versions(delay_ms: &str) -> Testbed {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &["--delay-ms", delay_ms]);
    }
    bed
}

/// Service `web` on 10.96.0.20:80 (HTTP) with endpoints v1 and v2, then `extra`.
fn web(protocol: &str, extra: &str) -> String {
    format!(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: {protocol} }}]
    endpoints:
      - {{ address: 10.77.0.11, workload: v1, labels: {{ version: v1 }} }}
      - {{ address: 10.77.0.12, workload: v2, labels: {{ version: v2 }} }}
{extra}"
    )
}

#[test]
fn http_requests_are_proxied_balanced_and_counted() {
    let bed = bed_with_versions("0");
    let meshd = bed.start_meshd(&bed.config(&web("http", "")));
    // Twenty requests on one keep-alive client connection, each balanced.
    let (code, out) = curl(&bed, "client", &["http://10.96.0.20/[1-20]"]);
    assert_eq!(code, 0, "{out}\n{}", meshd.log());
    assert_eq!(out.lines().count(), 20, "{out}");
    assert!(out.lines().all(|l| l.starts_with("hello from v")), "{out}");
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("request_protocol", "http"),
        ("response_code", "200"),
    ];
    assert_eq!(meshd.metric("istio_requests_total", &labels), 20.0);
    assert_eq!(
        meshd.metric("istio_request_duration_milliseconds_count", &labels),
        20.0
    );
    // One captured connection carried them all.
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "captured")]),
        1.0
    );
}

/// The lines of the access log at `path`, once there are `count` of them.
fn access_lines(path: &Path, count: usize) -> Vec<String> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), || read().len() >= count);
    read()
}

#[test]
fn every_request_gets_one_json_access_log_line_with_istios_fields() {
    let bed = bed_with_versions("0");
    let log = bed.dir.join("access.log");
    let config = format!(
        "accessLog: {{ path: {} }}\n{}",
        log.display(),
        web("http", "")
    );
    let meshd = bed.start_meshd(&bed.config(&config));
    // A client that tries to forge a line and a field through its headers.
    let (code, out) = curl(
        &bed,
        "client",
        &[
            "-A",
            "evil\" \"response_code\": 999, \t[31m",
            "-H",
            "x-request-id: req-42",
            "http://10.96.0.20/item/[1-20]?q=1",
        ],
    );
    assert_eq!(code, 0, "{out}\n{}", meshd.log());
    let lines = access_lines(&log, 20);
    assert_eq!(lines.len(), 20, "{lines:#?}\n{}", meshd.log());
    let client = bed.pod("client").ip.to_string();
    for (i, line) in lines.iter().enumerate() {
        let entry: serde_json::Value = serde_json::from_str(line).expect("one JSON object a line");
        let field = |name: &str| entry[name].clone();
        assert_eq!(field("method"), "GET", "{line}");
        assert_eq!(field("path"), format!("/item/{}?q=1", i + 1), "{line}");
        assert_eq!(field("protocol"), "HTTP/1.1", "{line}");
        assert_eq!(field("response_code"), 200, "{line}");
        assert_eq!(field("response_flags"), "-", "{line}");
        assert_eq!(field("response_code_details"), "via_upstream", "{line}");
        assert_eq!(field("request_id"), "req-42", "{line}");
        assert_eq!(
            field("user_agent"),
            "evil\\\" \\\"response_code\\\": 999, \\x09[31m",
            "{line}"
        );
        assert_eq!(field("authority"), "10.96.0.20", "{line}");
        assert_eq!(field("downstream_local_address"), "10.96.0.20:80", "{line}");
        let remote = field("downstream_remote_address");
        assert!(
            remote
                .as_str()
                .is_some_and(|r| r.starts_with(&format!("{client}:"))),
            "{line}"
        );
        let upstream = field("upstream_host");
        assert!(
            ["10.77.0.11:8080", "10.77.0.12:8080"].contains(&upstream.as_str().unwrap_or("")),
            "{line}"
        );
        assert_eq!(
            field("upstream_cluster"),
            "outbound|80||web.default.svc.cluster.local",
            "{line}"
        );
        assert_eq!(field("route_name"), "default", "{line}");
        assert_eq!(field("reporter"), "source", "{line}");
        assert_eq!(field("source_workload"), "client", "{line}");
        assert!(
            field("bytes_sent").as_u64().is_some_and(|b| b > 0),
            "{line}"
        );
        assert_eq!(field("bytes_received"), 0, "{line}");
        assert!(field("duration").is_u64(), "{line}");
        let start = field("start_time");
        assert!(
            start
                .as_str()
                .is_some_and(|t| t.len() == 24 && t.ends_with('Z')),
            "{line}"
        );
    }
    assert_eq!(
        meshd.metric(
            "meshd_access_log_dropped_total",
            &[("reason", "queue_full")]
        ),
        0.0
    );
}

#[test]
fn tcp_connections_get_text_lines_and_a_service_can_turn_its_lines_off() {
    let bed = bed_with_versions("0");
    let log = bed.dir.join("access.log");
    let config = format!(
        "accessLog: {{ path: {}, format: text }}
services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: tcp }}]
    endpoints: [{{ address: 10.77.0.11, workload: v1 }}]
  - name: quiet
    vip: 10.96.0.21
    accessLog: false
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: 10.77.0.12, workload: v2 }}]
",
        log.display()
    );
    let meshd = bed.start_meshd(&bed.config(&config));
    let (code, out) = curl(&bed, "client", &["http://10.96.0.21/[1-3]"]);
    assert_eq!(code, 0, "{out}\n{}", meshd.log());
    let (code, out) = curl(&bed, "client", &["http://10.96.0.20/"]);
    assert_eq!(code, 0, "{out}\n{}", meshd.log());
    let lines = access_lines(&log, 1);
    // The quiet service's three requests were served, and counted, unlogged.
    let quiet = [
        ("destination_service_name", "quiet"),
        ("reporter", "source"),
    ];
    assert_eq!(meshd.metric("istio_requests_total", &quiet), 3.0);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert!(
        line.starts_with("[20") && line.contains("Z] \"- - -\" 0 - - "),
        "{line}"
    );
    assert!(
        line.contains("\"10.77.0.11:8080\" outbound|80||web.default.svc.cluster.local"),
        "{line}"
    );
    assert!(line.contains(" 10.96.0.20:80 "), "{line}");
    let fields: Vec<&str> = line.split(' ').collect();
    // [start] "- - -" code flags details - "-" RECEIVED SENT DURATION
    let (received, sent) = (fields[9], fields[10]);
    assert!(received.parse::<u64>().is_ok_and(|b| b > 0), "{line}");
    assert!(sent.parse::<u64>().is_ok_and(|b| b > 0), "{line}");
}

#[test]
fn a_90_10_split_lands_within_tolerance_over_2000_requests() {
    let bed = bed_with_versions("0");
    let routes = "    routes:
      - name: split
        to: [{ subset: { version: v1 }, weight: 90 }, { subset: { version: v2 }, weight: 10 }]
";
    let meshd = bed.start_meshd(&bed.config(&web("http", routes)));
    let (code, out) = curl(&bed, "client", &["http://10.96.0.20/[1-2000]"]);
    assert_eq!(code, 0, "{}", meshd.log());
    let v2 = out
        .lines()
        .filter(|l| l.starts_with("hello from v2"))
        .count();
    let v1 = out
        .lines()
        .filter(|l| l.starts_with("hello from v1"))
        .count();
    assert_eq!(v1 + v2, 2000);
    // Binomial(2000, 0.1): mean 200, σ ≈ 13.4; ±4σ fails once in ~16 000 runs.
    assert!(
        (146..=254).contains(&v2),
        "v2 got {v2} of 2000, expected 200 ± 54"
    );
}

#[test]
fn a_header_route_selects_its_subset() {
    let bed = bed_with_versions("0");
    let routes = "    routes:
      - name: canary
        match: { headers: { x-canary: \"1\" } }
        to: [{ subset: { version: v2 } }]
      - name: stable
        to: [{ subset: { version: v1 } }]
";
    let meshd = bed.start_meshd(&bed.config(&web("http", routes)));
    let (code, out) = curl(
        &bed,
        "client",
        &["-H", "x-canary: 1", "http://10.96.0.20/[1-20]"],
    );
    assert_eq!(code, 0, "{}", meshd.log());
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("hello from v2"))
            .count(),
        20,
        "{out}"
    );
    let (_, out) = curl(&bed, "client", &["http://10.96.0.20/[1-20]"]);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("hello from v1"))
            .count(),
        20,
        "{out}"
    );
}

#[test]
fn h2load_through_meshd_completes_without_errors() {
    let bed = bed_with_versions("0");
    let meshd = bed.start_meshd(&bed.config(&web("http", "")));
    let child = spawn_in(
        &bed,
        bed.pod("client"),
        Path::new("h2load"),
        &["-n", "2000", "-c", "10", "-m", "10", "http://10.96.0.20/"],
    );
    let output = wait_with_timeout(child, Duration::from_secs(120), "h2load");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(
        out.contains(
            "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"
        ),
        "{out}\n{}",
        meshd.log()
    );
    assert!(out.contains("status codes: 2000 2xx"), "{out}");
    // h2load spoke HTTP/2 to meshd; the servers (declared `http`) got HTTP/1.1.
    assert!(eventually(Duration::from_secs(5), || {
        let labels = [("reporter", "source"), ("response_code", "200")];
        meshd.metric("istio_requests_total", &labels) == 2000.0
    }));
}

#[test]
fn http_across_nodes_rides_the_mtls_tunnel() {
    use meshd_tests::testbed::PodSpec;
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("client")]),
        ("node-b", &[PodSpec::named("v1"), PodSpec::named("v2")]),
    ]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &[]);
    }
    let services = "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints:
      - { address: 10.78.0.10, node: node-b, workload: v1, serviceAccount: v1 }
      - { address: 10.78.0.11, node: node-b, workload: v2, serviceAccount: v2 }
";
    let identity = meshd_tests::clients::issuer_identity(&bed);
    let a = bed.start_meshd_on(0, &bed.config_with(0, &identity, services));
    let b = bed.start_meshd_on(1, &bed.config_with(1, &identity, services));
    let (code, out) = curl(&bed, "client", &["http://10.96.0.20/[1-20]"]);
    assert_eq!(code, 0, "{out}\nnode-a:\n{}\nnode-b:\n{}", a.log(), b.log());
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("hello from v"))
            .count(),
        20,
        "{out}"
    );
    // node-b's meshd connected to the pods.
    assert!(out.lines().all(|l| l.contains(" to 10.78.0.1:")), "{out}");
    // Both reporters count every request, the destination through the
    // tunnel.
    for (meshd, reporter) in [(&a, "source"), (&b, "destination")] {
        let labels = [
            ("reporter", reporter),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("connection_security_policy", "mutual_tls"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("destination_service", "web.default.svc.cluster.local"),
            ("source_cluster", "Kubernetes"),
            ("destination_cluster", "Kubernetes"),
        ];
        assert_eq!(
            meshd.metric("istio_requests_total", &labels),
            20.0,
            "{reporter}: {}",
            meshd.metrics()
        );
    }
    // An HTTP port's streams are reported as requests, not as TCP.
    assert_eq!(
        b.metric(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0.0
    );
}

#[test]
fn grpc_across_nodes_is_reported_call_by_call_by_the_destination_too() {
    use meshd_tests::testbed::PodSpec;
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("client")]),
        ("node-b", &[PodSpec::named("server")]),
    ]);
    let kit = meshd_tests::clients::testkit();
    let listen = format!("{}:50051", bed.pod("server").ip);
    bed.spawn(
        bed.pod("server"),
        &kit,
        &["grpc-serve", "--listen", &listen],
    );
    bed.wait_listening(bed.pod("server"), listen.parse().expect("address"));
    // No policy and no tracing: node-b relays the tunnel stream as bytes
    // and follows its HTTP/2 framing.
    let services = format!(
        "services:
  - name: health
    vip: 10.96.0.30
    ports: [{{ port: 50051, protocol: grpc }}]
    endpoints: [{{ address: {}, node: node-b, workload: server, serviceAccount: server }}]
",
        bed.pod("server").ip
    );
    let identity = meshd_tests::clients::issuer_identity(&bed);
    let a = bed.start_meshd_on(0, &bed.config_with(0, &identity, &services));
    let b = bed.start_meshd_on(1, &bed.config_with(1, &identity, &services));
    for _ in 0..3 {
        let out = meshd_tests::clients::client(
            &bed,
            bed.pod("client"),
            &[
                "grpc-check",
                "--connect",
                "10.96.0.30:50051",
                "--stream-messages",
                "3",
            ],
            Duration::from_secs(60),
        );
        assert!(
            out.contains("not_found=trailers stream=3"),
            "{out}\n{}",
            b.log()
        );
    }
    // Every call, as both nodes saw it: the same statuses from the
    // trailers, the same messages each way.
    let grpc = |meshd: &meshd_tests::testbed::Meshd, reporter: &str, status: &str| {
        let labels = [
            ("reporter", reporter),
            ("request_protocol", "grpc"),
            ("grpc_response_status", status),
            ("connection_security_policy", "mutual_tls"),
            // (The destination knows the client by its certificate only:
            // it backs no service, so no config names it on node-b.)
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("destination_workload", "server"),
        ];
        meshd.metric("istio_requests_total", &labels)
    };
    let settled = eventually(Duration::from_secs(10), || {
        ["0", "5"].iter().all(|status| {
            let source = grpc(&a, "source", status);
            source > 0.0 && grpc(&b, "destination", status) == source
        })
    });
    assert!(
        settled,
        "source:\n{}\ndestination:\n{}",
        a.metrics(),
        b.metrics()
    );
    // Three calls a round, one message each; answers: the unary call's
    // one, the watch's three or more (the destination may see a message
    // more than the client took before it cancelled).
    let messages = |meshd: &meshd_tests::testbed::Meshd, name: &str, reporter: &str| {
        meshd.metric(name, &[("reporter", reporter)])
    };
    let sent = "istio_request_messages_total";
    assert_eq!(messages(&a, sent, "source"), 9.0, "{}", a.metrics());
    assert_eq!(messages(&b, sent, "destination"), 9.0, "{}", b.metrics());
    let received = "istio_response_messages_total";
    let (source, destination) = (
        messages(&a, received, "source"),
        messages(&b, received, "destination"),
    );
    assert!(
        source >= 12.0 && destination >= source,
        "{source} vs {destination}"
    );
    // Reported as calls, not as TCP.
    assert_eq!(
        b.metric(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0.0
    );
}

#[test]
fn grpc_unary_errors_and_streams_pass_with_trailers() {
    let bed = Testbed::new(&["client", "server"]);
    let kit = meshd_tests::clients::testkit();
    bed.spawn(
        bed.pod("server"),
        &kit,
        &["grpc-serve", "--listen", "10.77.0.11:50051"],
    );
    bed.wait_listening(
        bed.pod("server"),
        "10.77.0.11:50051".parse().expect("address"),
    );
    let services = "services:
  - name: health
    vip: 10.96.0.30
    ports: [{ port: 50051, protocol: grpc }]
    endpoints: [{ address: 10.77.0.11, workload: server }]
";
    let meshd = bed.start_meshd(&bed.config(services));
    let out = meshd_tests::clients::client(
        &bed,
        bed.pod("client"),
        &[
            "grpc-check",
            "--connect",
            "10.96.0.30:50051",
            "--stream-messages",
            "3",
        ],
        Duration::from_secs(60),
    );
    // Status 1 is SERVING, 2 NOT_SERVING: the server flips it all the time.
    assert!(
        out.starts_with("ok unary status="),
        "{out}\n{}",
        meshd.log()
    );
    assert!(out.contains("not_found=trailers stream=3"), "{out}");
    // One meshd on both sides: each call is reported by both — the Watch
    // stream once the client has cancelled it.
    for reporter in ["source", "destination"] {
        let grpc = [
            ("reporter", reporter),
            ("request_protocol", "grpc"),
            ("response_code", "200"),
        ];
        assert!(
            eventually(Duration::from_secs(5), || meshd
                .metric("istio_requests_total", &grpc)
                == 3.0),
            "{}",
            meshd.metrics()
        );
        // The NOT_FOUND answer was trailers-only: its status is in the
        // headers; the unary Check's is in its trailers.
        let status = |code| {
            let labels = [("reporter", reporter), ("grpc_response_status", code)];
            meshd.metric("istio_requests_total", &labels)
        };
        assert_eq!(status("5"), 1.0);
        assert_eq!(status("0"), 1.0, "{}", meshd.metrics());
        // One message up per call; down, the Check's answer and at least
        // the three stream messages the client read.
        let by = [("reporter", reporter)];
        assert_eq!(meshd.metric("istio_request_messages_total", &by), 3.0);
        assert!(meshd.metric("istio_response_messages_total", &by) >= 4.0);
    }
}

#[test]
fn sigterm_winds_down_idle_keep_alive_connections_without_waiting_for_the_drain_timeout() {
    let bed = bed_with_versions("0");
    let mut meshd = bed.start_meshd(&bed.config(&web("http", "proxy:\n  drainTimeout: 60s\n")));
    // One request, then the client keeps the connection open, idle.
    let client = spawn_in(
        &bed,
        bed.pod("client"),
        &meshd_tests::clients::testkit(),
        &["http-idle", "--connect", "10.96.0.20:80"],
    );
    assert!(eventually(Duration::from_secs(10), || {
        let labels = [("reporter", "source"), ("response_code", "200")];
        meshd.metric("istio_requests_total", &labels) == 1.0
    }));
    let started = std::time::Instant::now();
    let status = meshd.terminate(Duration::from_secs(55));
    assert!(status.success(), "{}", meshd.log());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "an idle keep-alive connection held the stop for {:?} (drainTimeout is 60 s)",
        started.elapsed()
    );
    let output = wait_with_timeout(client, Duration::from_secs(30), "http-idle");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        out.contains("response HTTP/1.1 200") && out.contains("closed by server"),
        "{out}"
    );
}

#[test]
fn rate_limits_answer_429_per_service_and_per_source() {
    let bed = Testbed::new(&["client", "neighbour", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &[]);
    }
    let services = "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints:
      - { address: 10.77.0.12, workload: v1 }
      - { address: 10.77.0.13, workload: v2 }
    rateLimit: { rps: 1, burst: 30, perSource: { rps: 1, burst: 10 } }
";
    let meshd = bed.start_meshd(&bed.config(services));
    // 40 quick requests from one pod: its own bucket (10) runs dry first.
    let codes = |pod: &str| {
        let (code, out) = curl(
            &bed,
            pod,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
                "http://10.96.0.20/[1-40]",
            ],
        );
        assert_eq!(code, 0);
        let ok = out.lines().filter(|l| *l == "200").count();
        let limited = out.lines().filter(|l| *l == "429").count();
        (ok, limited)
    };
    let (ok, limited) = codes("client");
    assert!(
        (10..=12).contains(&ok) && ok + limited == 40,
        "client: {ok} ok, {limited} limited"
    );
    // A neighbour is not starved by the noisy client.
    let (ok, _) = codes("neighbour");
    assert!((10..=12).contains(&ok), "neighbour: {ok} ok");
    let service = [
        ("destination_service", "web.default.svc.cluster.local"),
        ("limit", "source"),
    ];
    assert!(
        meshd.metric("meshd_rate_limited_total", &service) >= 56.0,
        "{}",
        meshd.metrics()
    );
    assert!(
        meshd.metric(
            "istio_requests_total",
            &[("response_code", "429"), ("response_flags", "RL")]
        ) >= 56.0
    );
}

/// Six requests at once against 1.5 s upstreams under the circuit breaker
/// `limits`: `served` pass, the rest are shed at once with 503 `UO`, counted
/// under `limit`; then, the load gone, requests pass again.
fn breaker_sheds(limits: &str, limit: &str, served: usize) {
    let bed = bed_with_versions("1500");
    let meshd = bed.start_meshd(&bed.config(&web(
        "http",
        &format!("    circuitBreaker: {{ {limits} }}\n"),
    )));
    let (code, out) = curl(
        &bed,
        "client",
        &[
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "6",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.20/[1-6]",
        ],
    );
    assert_eq!(code, 0);
    let ok = out.lines().filter(|l| *l == "200").count();
    let shed = out.lines().filter(|l| *l == "503").count();
    assert_eq!((ok, shed), (served, 6 - served), "{out}\n{}", meshd.log());
    let labels = [("response_code", "503"), ("response_flags", "UO")];
    assert_eq!(
        meshd.metric("istio_requests_total", &labels),
        (6 - served) as f64
    );
    assert_eq!(
        meshd.metric(
            "meshd_circuit_breaker_rejections_total",
            &[("limit", limit)]
        ),
        (6 - served) as f64
    );
    let (_, out) = curl(
        &bed,
        "client",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.20/",
        ],
    );
    assert_eq!(out.trim(), "200");
    let open = meshd.metrics();
    assert!(
        open.contains(&format!("meshd_circuit_breaker_open{{destination_service=\"web.default.svc.cluster.local\",limit=\"{limit}\"}} 0")),
        "{open}"
    );
}

#[test]
fn the_circuit_breaker_sheds_excess_requests_fast_and_recovers() {
    breaker_sheds("maxRequests: 2", "requests", 2);
}

#[test]
fn the_connection_limit_queues_a_pending_request_and_sheds_the_rest() {
    // One connection busy, one request waiting for it, four shed.
    breaker_sheds("maxConnections: 1, maxPendingRequests: 1", "pending", 2);
}

#[test]
fn an_upstream_answering_every_status_code_cannot_grow_a_family_past_its_cap() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &["--every-status"]);
    }
    let config = format!("proxy: {{ maxSeriesPerMetric: 20 }}\n{}", web("http", ""));
    let meshd = bed.start_meshd(&bed.config(&config));
    let (code, out) = curl(
        &bed,
        "client",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.20/[1-400]",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let codes: std::collections::BTreeSet<&str> = out.lines().collect();
    assert!(
        codes.len() > 100,
        "the upstream did not vary its codes: {codes:?}"
    );
    let text = meshd.metrics();
    // Every code is a valid label value, so only the cap holds the series:
    // at most 20 per family (a histogram's series is its ~25 lines).
    let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    assert!(series("istio_requests_total{") <= 20, "{text}");
    assert!(
        series("istio_request_duration_milliseconds_count{") <= 20,
        "{text}"
    );
    assert!(
        meshd.metric(
            "meshd_metric_series_dropped_total",
            &[("metric", "istio_requests_total")]
        ) > 0.0,
        "{text}"
    );
    assert!(
        text.len() < 1024 * 1024,
        "/metrics is {} bytes with 20 series per family",
        text.len()
    );
}

#[test]
fn a_hostile_upstream_cannot_grow_the_metrics_with_its_headers() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &["--hostile-grpc-status", "4000"]);
    }
    let meshd = bed.start_meshd(&bed.config(&web("http", "")));
    let (code, out) = curl(
        &bed,
        "client",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.20/[1-300]",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 300, "{out}");
    let text = meshd.metrics();
    // 300 answers, each with a different 4 kB grpc-status: one series per
    // endpoint, whose label is a closed-set value, never the header.
    let statuses: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.split("grpc_response_status=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        ["unknown"],
        "{text}"
    );
    assert!(
        text.len() < 256 * 1024,
        "/metrics grew to {} bytes under a hostile upstream",
        text.len()
    );
}
