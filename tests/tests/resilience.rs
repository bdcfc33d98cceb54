//! Resilience and L7 policy through meshd, against real upstreams that
//! misbehave on command (fail the next N requests with a status, reset the
//! connection, answer slowly, fail their health check): retries and their
//! budget, outlier ejection, active health checks, latency-aware balancing,
//! per-request authorization, and upgraded (websocket) connections — on one
//! node and across nodes.

use std::time::{Duration, Instant};

use meshd_tests::{
    clients::{client, curl_args, issuer_identity, serve, serve_hello},
    sys::eventually,
    testbed::{Meshd, PodSpec, Testbed},
};

const LOCAL: &str = "local.default.svc.cluster.local";
const REMOTE: &str = "remote.default.svc.cluster.local";

/// Lines of `out` that start with `prefix`.
fn count(out: &str, prefix: &str) -> usize {
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Node-a runs `client` and `local` (10.77.0.11), node-b runs `remote`
/// (10.78.0.10); both hello servers on :8080 take `local_args` and
/// `remote_args`. Services `local` (10.96.0.30) and `remote` (10.96.0.31)
/// each add `extra` (indented under the service), then `policies`.
struct TwoNodes {
    bed: Testbed,
    a: Meshd,
    b: Meshd,
}

impl TwoNodes {
    fn start(local_args: &[&str], remote_args: &[&str], extra: &str, policies: &str) -> Self {
        let bed = Testbed::nodes(&[
            (
                "node-a",
                &[PodSpec::named("client"), PodSpec::named("local")],
            ),
            ("node-b", &[PodSpec::named("remote")]),
        ]);
        for (pod, args) in [("local", local_args), ("remote", remote_args)] {
            serve_hello(&bed, pod, args);
        }
        let services = format!(
            "services:
  - name: local
    vip: 10.96.0.30
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: 10.77.0.11, node: node-a, workload: local, serviceAccount: local }}]
{extra}  - name: remote
    vip: 10.96.0.31
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: 10.78.0.10, node: node-b, workload: remote, serviceAccount: remote }}]
{extra}{policies}"
        );
        let identity = issuer_identity(&bed);
        let a = bed.start_meshd_on(0, &bed.config_with(0, &identity, &services));
        let b = bed.start_meshd_on(1, &bed.config_with(1, &identity, &services));
        Self { bed, a, b }
    }

    /// curl in the client pod.
    fn curl(&self, args: &[&str]) -> (i32, String) {
        curl_args(&self.bed, self.bed.pod("client"), args)
    }

    fn logs(&self) -> String {
        format!("node-a:\n{}\nnode-b:\n{}", self.a.log(), self.b.log())
    }
}

#[test]
fn retries_recover_transient_failures_on_the_same_node_and_across_nodes() {
    let extra = "    retries: { maxRetries: 3, retryOn: [5xx, reset], backoffBase: 5ms }\n";
    let nodes = TwoNodes::start(
        &["--fail-first", "3", "--fail-status", "503"],
        &["--fail-first", "3", "--fail-mode", "reset"],
        extra,
        "",
    );
    // A POST is not idempotent: its 503 stands (the first of three failures).
    let (code, out) = nodes.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "-d",
        "x=1",
        "http://10.96.0.30/order",
    ]);
    assert_eq!((code, out.trim()), (0, "503"), "{}", nodes.logs());
    // GETs: the two failures left locally and three resets across nodes
    // are retried; every request succeeds.
    for (vip, name) in [("10.96.0.30", "local"), ("10.96.0.31", "remote")] {
        let (code, out) = nodes.curl(&[&format!("http://{vip}/[1-10]")]);
        assert_eq!(code, 0, "{out}\n{}", nodes.logs());
        assert_eq!(
            count(&out, &format!("hello from {name}")),
            10,
            "{out}\n{}",
            nodes.logs()
        );
    }
    let retries = |service, reason| {
        nodes.a.metric(
            "meshd_retries_total",
            &[("destination_service", service), ("reason", reason)],
        )
    };
    assert_eq!(retries(LOCAL, "5xx"), 2.0, "{}", nodes.a.metrics());
    assert_eq!(retries(REMOTE, "reset"), 3.0, "{}", nodes.a.metrics());
    let requests = |meshd: &meshd_tests::testbed::Meshd, reporter, service, code| {
        meshd.metric(
            "istio_requests_total",
            &[
                ("reporter", reporter),
                ("destination_service", service),
                ("response_code", code),
            ],
        )
    };
    let (a, b) = (&nodes.a, &nodes.b);
    assert_eq!(requests(a, "source", LOCAL, "503"), 1.0);
    assert_eq!(requests(a, "source", LOCAL, "200"), 10.0);
    assert_eq!(requests(a, "source", REMOTE, "200"), 10.0);
    // The destinations report what reached them: node-a the local answers
    // that stood, node-b every try through the tunnel — the three the pod
    // reset (recorded as 503 UC, the source getting the reset) and the ten
    // answered.
    assert_eq!(requests(a, "destination", LOCAL, "503"), 1.0);
    assert_eq!(requests(a, "destination", LOCAL, "200"), 10.0);
    assert_eq!(
        requests(b, "destination", REMOTE, "200"),
        10.0,
        "{}",
        b.metrics()
    );
    let reset = [
        ("reporter", "destination"),
        ("response_code", "503"),
        ("response_flags", "UC"),
    ];
    assert_eq!(
        b.metric("istio_requests_total", &reset),
        3.0,
        "{}",
        b.metrics()
    );
    // An upgraded connection (as a websocket's) passes through both ways.
    for vip in ["10.96.0.30:80", "10.96.0.31:80"] {
        let out = client(
            &nodes.bed,
            nodes.bed.pod("client"),
            &["upgrade", "--connect", vip, "--bytes", "200000"],
            Duration::from_secs(30),
        );
        assert!(out.contains("upgraded echo ok 200000"), "{out}");
    }
}

#[test]
fn the_retry_budget_caps_retries_during_a_total_outage() {
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &["--fail-first", "1000000000"]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
    retries:
      maxRetries: 3
      retryOn: [5xx]
      backoffBase: 1ms
      backoffMax: 2ms
      budgetRatio: 0.1
      budgetMinPerSecond: 1
",
    ));
    let started = Instant::now();
    let (code, out) = curl_args(
        &bed,
        bed.pod("client"),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.20/[1-100]",
        ],
    );
    let seconds = started.elapsed().as_secs_f64().ceil();
    assert_eq!(code, 0, "{}", meshd.log());
    assert_eq!(count(&out, "503"), 100, "{out}");
    let retries = meshd.metric("meshd_retries_total", &[("reason", "5xx")]);
    // Unbudgeted, 100 failing requests would make 300 retries. The budget
    // allows 10% of requests plus 1/s over its 10 s window.
    let allowed = 0.1 * 100.0 + 1.0 * (10.0 + seconds);
    assert!(
        (10.0..=allowed).contains(&retries),
        "{retries} retries, budget {allowed}"
    );
    assert!(
        meshd.metric("meshd_retry_budget_exhausted_total", &[]) >= 100.0 - allowed,
        "{}",
        meshd.metrics()
    );
}

/// v1 fails its first five requests, v2 never; round robin, no retries,
/// ejection after three failures in a row. With `cross_node`, the client
/// is on node-a and both servers on node-b (ejection is decided at the
/// source, over the tunnel's answers).
fn ejected_and_returns(cross_node: bool) {
    let (bed, addresses) = if cross_node {
        let bed = Testbed::nodes(&[
            ("node-a", &[PodSpec::named("client")]),
            ("node-b", &[PodSpec::named("v1"), PodSpec::named("v2")]),
        ]);
        (bed, ["10.78.0.10", "10.78.0.11"])
    } else {
        (
            Testbed::new(&["client", "v1", "v2"]),
            ["10.77.0.11", "10.77.0.12"],
        )
    };
    serve_hello(&bed, "v1", &["--fail-first", "5"]);
    serve_hello(&bed, "v2", &[]);
    let node = if cross_node { "node-b" } else { "node-a" };
    let services = format!(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints:
      - {{ address: {}, node: {node}, workload: v1, serviceAccount: v1 }}
      - {{ address: {}, node: {node}, workload: v2, serviceAccount: v2 }}
    loadBalancer: round-robin
    retries: {{ maxRetries: 0 }}
    outlierDetection: {{ consecutiveErrors: 3, baseEjectionTime: 3s }}
",
        addresses[0], addresses[1]
    );
    let identity = issuer_identity(&bed);
    let meshd = bed.start_meshd_on(0, &bed.config_with(0, &identity, &services));
    let _b = cross_node.then(|| bed.start_meshd_on(1, &bed.config_with(1, &identity, &services)));
    let get = |n: usize| {
        let (code, out) = curl_args(
            &bed,
            bed.pod("client"),
            &[&format!("http://10.96.0.20/[1-{n}]")],
        );
        assert_eq!(code, 0, "{}", meshd.log());
        out
    };
    // Round robin: v1 fails its 1st, 2nd and 3rd request and is ejected.
    let out = get(6);
    assert_eq!(count(&out, "v1 failing"), 3, "{out}");
    let ejected = [("destination_service", "web.default.svc.cluster.local")];
    assert_eq!(meshd.metric("meshd_outlier_ejections_total", &ejected), 1.0);
    assert_eq!(
        meshd.metric("meshd_outlier_ejected_endpoints", &ejected),
        1.0
    );
    let out = get(20);
    assert_eq!(
        count(&out, "hello from v2"),
        20,
        "ejected v1 got traffic: {out}"
    );
    // Its ejection over, v1 is back: two more failures (not three in a
    // row), then it serves again.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        meshd.metric("meshd_outlier_ejected_endpoints", &ejected),
        0.0
    );
    let out = get(20);
    assert_eq!(count(&out, "v1 failing"), 2, "{out}");
    assert_eq!(count(&out, "hello from v1"), 8, "{out}");
    assert_eq!(meshd.metric("meshd_outlier_ejections_total", &ejected), 1.0);
}

#[test]
fn an_endpoint_failing_in_a_row_is_ejected_and_returns() {
    ejected_and_returns(false);
}

#[test]
fn an_endpoint_across_nodes_failing_in_a_row_is_ejected_and_returns() {
    ejected_and_returns(true);
}

#[test]
fn health_checks_take_failing_endpoints_out_and_bring_them_back() {
    let bed = Testbed::new(&["client", "v1", "v2", "v3"]);
    let healthy = bed.write("v1-healthy", "");
    let health_file = healthy.display().to_string();
    serve_hello(&bed, "v1", &["--health-file", &health_file]);
    serve_hello(&bed, "v2", &[]);
    // v3 runs no server at all: its TCP check fails.
    let check = "interval: 200ms, timeout: 500ms, unhealthyThreshold: 2";
    let meshd = bed.start_meshd(&bed.config(&format!(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: 10.77.0.11, workload: v1 }}, {{ address: 10.77.0.12, workload: v2 }}]
    loadBalancer: round-robin
    retries: {{ maxRetries: 0 }}
    healthCheck: {{ protocol: http, path: /healthz, {check} }}
  - name: plain
    vip: 10.96.0.21
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: 10.77.0.12, workload: v2 }}, {{ address: 10.77.0.13, workload: v3 }}]
    loadBalancer: round-robin
    retries: {{ maxRetries: 0 }}
    healthCheck: {{ protocol: tcp, {check} }}
"
    )));
    let unhealthy = |service: &str| {
        meshd.metric(
            "meshd_unhealthy_endpoints",
            &[("destination_service", service)],
        )
    };
    let get = |vip: &str| {
        let (code, out) = curl_args(&bed, bed.pod("client"), &[&format!("http://{vip}/[1-20]")]);
        assert_eq!(code, 0, "{out}\n{}", meshd.log());
        out
    };
    assert!(
        eventually(Duration::from_secs(10), || unhealthy(
            "plain.default.svc.cluster.local"
        ) == 1.0),
        "{}",
        meshd.metrics()
    );
    let out = get("10.96.0.21");
    assert_eq!(count(&out, "hello from v2"), 20, "{out}");

    assert_eq!(unhealthy("web.default.svc.cluster.local"), 0.0);
    std::fs::remove_file(&healthy).expect("remove health file");
    assert!(eventually(Duration::from_secs(10), || unhealthy(
        "web.default.svc.cluster.local"
    ) == 1.0));
    let out = get("10.96.0.20");
    assert_eq!(count(&out, "hello from v2"), 20, "{out}");
    std::fs::write(&healthy, "").expect("restore health file");
    assert!(eventually(Duration::from_secs(10), || unhealthy(
        "web.default.svc.cluster.local"
    ) == 0.0));
    let out = get("10.96.0.20");
    assert_eq!(count(&out, "hello from v1"), 10, "{out}");
    assert!(
        meshd.log().contains("endpoint unhealthy: out of rotation"),
        "{}",
        meshd.log()
    );
}

#[test]
fn p2c_sends_measurably_less_to_a_slow_endpoint() {
    let bed = Testbed::new(&["client", "fast", "slow"]);
    serve_hello(&bed, "fast", &[]);
    serve_hello(&bed, "slow", &["--delay-ms", "40"]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: fast }, { address: 10.77.0.12, workload: slow }]
",
    ));
    let (code, out) = curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/[1-200]"]);
    assert_eq!(code, 0, "{}", meshd.log());
    let slow = count(&out, "hello from slow");
    assert_eq!(slow + count(&out, "hello from fast"), 200, "{out}");
    // An even spread would give the slow one 100.
    assert!(slow <= 20, "the slow endpoint got {slow} of 200");
}

#[test]
fn l7_policies_decide_each_request_on_the_same_node_and_across_nodes() {
    let mut policies = String::from("policies:\n");
    for service in ["local", "remote"] {
        policies.push_str(&format!(
            "  - name: {service}-read-public
    target: {{ service: default/{service} }}
    action: allow
    from: [{{ principals: [cluster.local/ns/default/sa/client] }}]
    methods: [GET]
    paths: [/public/*, /chat]
  - name: {service}-no-debug
    target: {{ service: default/{service} }}
    action: deny
    headers: {{ x-debug: \"*\" }}
"
        ));
    }
    let nodes = TwoNodes::start(&[], &[], "", &policies);
    let cases: [(&[&str], &str, &str); 4] = [
        (&[], "/public/a", "200"),
        (&[], "/private", "403"),
        (&["-d", "x=1"], "/public/a", "403"),
        (&["-H", "x-debug: 1"], "/public/a", "403"),
    ];
    for vip in ["10.96.0.30", "10.96.0.31"] {
        for (extra, path, want) in cases {
            let url = format!("http://{vip}{path}");
            let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}\n"];
            args.extend_from_slice(extra);
            args.push(&url);
            let (code, out) = nodes.curl(&args);
            assert_eq!(
                (code, out.trim()),
                (0, want),
                "{extra:?} {url}\n{}",
                nodes.logs()
            );
        }
        // The allowed upgrade path still upgrades.
        let out = client(
            &nodes.bed,
            nodes.bed.pod("client"),
            &["upgrade", "--connect", &format!("{vip}:80")],
            Duration::from_secs(30),
        );
        assert!(out.contains("upgraded echo ok"), "{out}");
    }
    // Each side decided its own endpoint's requests: node-a the local
    // service's, node-b (the destination) the remote one's.
    let denied = |meshd: &Meshd, workload: &str| {
        meshd.metric(
            "meshd_authorization_denied_total",
            &[(
                "destination_principal",
                &format!("spiffe://cluster.local/ns/default/sa/{workload}"),
            )],
        )
    };
    assert_eq!(denied(&nodes.a, "local"), 3.0, "{}", nodes.a.metrics());
    assert_eq!(denied(&nodes.b, "remote"), 3.0, "{}", nodes.b.metrics());
    // The source counts what it got, a 403 — with no flag of its own: a
    // flag is only ever what this meshd decided, never read from an
    // answer (the destination's, or a pod's posing as one).
    let remote = |flags: &str| {
        nodes.a.metric(
            "istio_requests_total",
            &[
                ("destination_service", REMOTE),
                ("response_code", "403"),
                ("response_flags", flags),
            ],
        )
    };
    assert_eq!((remote("-"), remote("RBAC")), (3.0, 0.0));
}

#[test]
fn a_tcp_service_refuses_connections_beyond_its_limit() {
    use meshd_tests::{
        clients::{spawn_in, testkit},
        sys::wait_with_timeout,
    };
    let bed = Testbed::new(&["client", "v1"]);
    serve(&bed, bed.pod("v1"), 9000, &["--mode", "echo"]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: echo
    vip: 10.96.0.40
    ports: [{ port: 9000 }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
    circuitBreaker: { maxConnections: 1 }
",
    ));
    let echo = |bed: &Testbed| {
        let child = spawn_in(
            bed,
            bed.pod("client"),
            &testkit(),
            &["echo", "--connect", "10.96.0.40:9000", "--bytes", "1000"],
        );
        wait_with_timeout(child, Duration::from_secs(30), "echo").status
    };
    let mut holder = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &["hold", "--connect", "10.96.0.40:9000"],
    );
    assert!(eventually(Duration::from_secs(10), || {
        meshd.metric("meshd_active_connections", &[]) == 1.0
    }));
    assert!(!echo(&bed).success(), "a second connection got through");
    assert_eq!(
        meshd.metric(
            "meshd_circuit_breaker_rejections_total",
            &[("limit", "connections")]
        ),
        1.0
    );
    holder.kill().expect("kill holder");
    let _ = holder.wait();
    assert!(eventually(Duration::from_secs(10), || {
        meshd.metric("meshd_active_connections", &[]) == 0.0
    }));
    assert!(echo(&bed).success(), "{}", meshd.log());
}

#[test]
fn a_hung_try_times_out_and_is_retried() {
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &["--fail-first", "1", "--fail-mode", "hang"]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
    timeout: 10s
    retries: { perTryTimeout: 300ms, retryOn: [gateway-error] }
",
    ));
    let (code, out) = curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/"]);
    assert_eq!(code, 0, "{}", meshd.log());
    assert!(out.starts_with("hello from v1"), "{out}");
    assert_eq!(
        meshd.metric("meshd_retries_total", &[("reason", "timeout")]),
        1.0
    );
}

#[test]
fn the_circuit_breaker_sheds_overload_to_another_node_and_recovers() {
    let slow = ["--delay-ms", "1500"];
    let nodes = TwoNodes::start(&slow, &slow, "    circuitBreaker: { maxRequests: 2 }\n", "");
    let codes = |n: usize| {
        let (code, out) = nodes.curl(&[
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "6",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &format!("http://10.96.0.31/[1-{n}]"),
        ]);
        assert_eq!(code, 0, "{}", nodes.logs());
        (count(&out, "200"), count(&out, "503"))
    };
    assert_eq!(codes(6), (2, 4), "{}", nodes.logs());
    assert_eq!(
        nodes.a.metric(
            "istio_requests_total",
            &[("destination_service", REMOTE), ("response_flags", "UO")]
        ),
        4.0,
        "{}",
        nodes.a.metrics()
    );
    assert_eq!(codes(1), (1, 0), "recovered");
}

#[test]
fn l7_policy_sees_the_path_the_backend_will_see_on_the_same_node_and_across_nodes() {
    let mut policies = String::from("policies:\n");
    for service in ["local", "remote"] {
        policies.push_str(&format!(
            "  - name: {service}-client
    target: {{ service: default/{service} }}
    action: allow
    from: [{{ principals: [cluster.local/ns/default/sa/client] }}]
    paths: [\"*\"]
  - name: {service}-no-admin
    target: {{ service: default/{service} }}
    action: deny
    paths: [/admin, /admin/*]
"
        ));
    }
    let nodes = TwoNodes::start(&[], &[], "", &policies);
    // Each spelling of /admin a backend may take for /admin.
    let cases: [(&[&str], &str, &str); 9] = [
        (&[], "/public", "200"),
        (&[], "/admin", "403"),
        (&[], "//admin", "403"),
        (&[], "/./admin", "403"),
        (&[], "/public/../admin", "403"),
        (&[], "/%61dmin/x", "403"),
        (&[], "/ADMIN", "403"),
        // Not forwarded at all: an encoded slash, a lower-case method.
        (&[], "/x%2f..%2fadmin", "400"),
        (&["-X", "delete"], "/public", "400"),
    ];
    for vip in ["10.96.0.30", "10.96.0.31"] {
        for (extra, path, want) in cases {
            let url = format!("http://{vip}{path}");
            let mut args = vec!["--path-as-is", "-o", "/dev/null", "-w", "%{http_code}\n"];
            args.extend_from_slice(extra);
            args.push(&url);
            let (code, out) = nodes.curl(&args);
            assert_eq!(
                (code, out.trim()),
                (0, want),
                "{extra:?} {url}\n{}",
                nodes.logs()
            );
        }
    }
}
