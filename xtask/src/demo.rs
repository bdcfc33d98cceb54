//! `cargo xtask demo`: two nodes, pods with SPIFFE identities, real traffic
//! captured by meshd — same node, and across nodes through the mTLS tunnel —
//! what happened (a trace, the dependency graph, metrics), and a clean
//! machine afterwards.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{bail, ensure, Context as _};
use meshd_tests::{
    sys::{self, wait_with_timeout},
    testbed::{Meshd, PodSpec, Testbed},
};

const MIB: u64 = 1024 * 1024;

pub fn run() -> anyhow::Result<()> {
    ensure!(
        std::fs::read_to_string("/proc/self/status")?.contains("Uid:\t0\t"),
        "the demo creates cgroups, network namespaces and eBPF programs: run it as root"
    );
    let tag;
    {
        let pod = |name, sa| PodSpec {
            name,
            namespace: "default",
            service_account: sa,
            labels: None,
            qos: "Burstable",
        };
        let bed = Testbed::nodes(&[
            (
                "node-a",
                &[pod("productpage", "productpage"), pod("ratings", "ratings")],
            ),
            (
                "node-b",
                &[pod("reviews-v1", "reviews"), pod("reviews-v2", "reviews")],
            ),
        ]);
        tag = bed.tag.clone();
        show(&bed)?;
    }
    let leftovers = leftovers(&tag);
    ensure!(leftovers.is_empty(), "left behind: {leftovers:?}");
    println!("\n== cleaned up: pods, nodes, namespaces, cgroups and both meshd are gone");
    Ok(())
}

const SERVICES: &str = "\
services:
  - name: reviews
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 9080, protocol: http }]
    endpoints:
      - { address: 10.78.0.10, node: node-b, workload: reviews-v1, serviceAccount: reviews }
      - { address: 10.78.0.11, node: node-b, workload: reviews-v2, serviceAccount: reviews }
    retries: { maxRetries: 2, retryOn: [5xx] }
  - name: ratings
    vip: 10.96.0.21
    ports: [{ port: 80, targetPort: 9080, protocol: http }]
    endpoints:
      - { address: 10.77.0.11, node: node-a, workload: ratings, serviceAccount: ratings }
  # productpage backs a service too: a destination believes the workload
  # name a peer gives only for a workload its config knows to run as the
  # identity the peer proved.
  - name: productpage
    vip: 10.96.0.23
    ports: [{ port: 80, targetPort: 9080, protocol: http }]
    endpoints:
      - { address: 10.77.0.10, node: node-a, workload: productpage, serviceAccount: productpage }
  - name: bulk
    vip: 10.96.0.22
    ports: [{ port: 7000 }]
    endpoints:
      - { address: 10.78.0.10, node: node-b, workload: reviews-v1, serviceAccount: reviews }
policies:
  - name: reviews-from-productpage
    target: { service: default/reviews }
    action: allow
    from: [{ principals: [cluster.local/ns/default/sa/productpage] }]
    methods: [GET]
  # The same pods serve bulk over TCP: an allow with HTTP conditions never
  # matches plain TCP (Istio's rule), so TCP needs its own allow.
  - name: bulk-from-productpage
    target: { service: default/bulk }
    action: allow
    from: [{ principals: [cluster.local/ns/default/sa/productpage] }]
    ports: [7000]
";

fn show(bed: &Testbed) -> anyhow::Result<()> {
    let testkit = sys::workspace_binary("meshd-testkit");
    let meshd_bin = sys::workspace_binary("meshd");
    println!("== two nodes (network namespaces joined by a backbone), pods each in their own netns and cgroup:");
    for pod in &bed.pods {
        println!(
            "   {:<7} {:<12} {:<11} spiffe://cluster.local/ns/{}/sa/{}",
            bed.nodes[pod.node].name,
            pod.name,
            pod.ip.to_string(),
            pod.namespace,
            pod.service_account
        );
    }
    for name in ["reviews-v1", "reviews-v2", "ratings"] {
        let pod = bed.pod(name);
        let listen = format!("{}:9080", pod.ip);
        // reviews-v2 fails its first two requests: meshd retries them.
        let fail_first = if name == "reviews-v2" { "2" } else { "0" };
        bed.spawn(
            pod,
            &testkit,
            &[
                "serve",
                "--listen",
                &listen,
                "--mode",
                "hello",
                "--name",
                name,
                "--fail-first",
                fail_first,
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

    let ca = bed.dir.join("ca");
    let status = std::process::Command::new(&meshd_bin)
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .stdout(Stdio::null())
        .status()?;
    ensure!(status.success(), "meshd ca init failed");
    println!(
        "\n== meshd ca init --out {}: both nodes' meshd mint 24 h workload certificates from it",
        ca.display()
    );
    let identity = format!("  identity:\n    issuer: {}\n", ca.display());
    // An OTLP receiver (the official protobufs, Python) on node-a takes
    // both nodes' spans: node-a's over OTLP/gRPC, node-b's over OTLP/HTTP.
    let spans = meshd_tests::clients::otlp_receiver(bed);
    let tracing = |node: usize| {
        if node == 0 {
            "tracing: { endpoint: 'http://10.77.0.1:4317', protocol: grpc }\n"
        } else {
            "tracing: { endpoint: 'http://192.168.77.1:4318', protocol: http }\n"
        }
    };
    let a_config = bed.config_with(0, &identity, &format!("{SERVICES}{}", tracing(0)));
    println!("\n== node-a's config:\n{}", indent(&a_config));
    let a = bed.start_meshd_on(0, &a_config);
    let b = bed.start_meshd_on(
        1,
        &bed.config_with(1, &identity, &format!("{SERVICES}{}", tracing(1))),
    );
    println!(
        "== meshd ready on node-a (pid {}) and node-b (pid {})",
        a.pid(),
        b.pid()
    );

    println!("\n== productpage → http://10.96.0.20/ (reviews, on node-b): captured, HTTP balanced per request, each over HTTP/2 CONNECT and mutual TLS 1.3");
    println!("   (reviews-v2 answers its first two requests 503: meshd retries them on another endpoint)");
    for _ in 0..6 {
        let body = in_pod(
            bed,
            "productpage",
            Path::new("curl"),
            &["-sS", "-m", "5", "http://10.96.0.20/"],
        )?;
        println!("   {}", body.trim());
    }
    println!("   (10.78.0.1 is node-b's meshd: it authorized productpage's identity, then connected to the pod)");

    println!("\n== productpage → http://10.96.0.21/ (ratings, same node): no tunnel, destination policy still applied");
    let body = in_pod(
        bed,
        "productpage",
        Path::new("curl"),
        &["-sS", "-m", "5", "http://10.96.0.21/"],
    )?;
    println!("   {}", body.trim());

    println!(
        "\n== node-b decides each request by the identity the tunnel proved: GET from productpage only"
    );
    for (pod, args) in [
        ("ratings", &["http://10.96.0.20/"][..]),
        ("productpage", &["-X", "DELETE", "http://10.96.0.20/"][..]),
    ] {
        let mut all = vec!["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        let code = in_pod(bed, pod, Path::new("curl"), &all)?;
        println!("   {pod}: curl {} → {code}", args.join(" "));
    }

    println!("\n== productpage: 16 MiB echoed across nodes through the tunnel, digests compared");
    let size = (16 * MIB).to_string();
    let out = in_pod(
        bed,
        "productpage",
        &testkit,
        &["echo", "--connect", "10.96.0.22:7000", "--bytes", &size],
    )?;
    println!("   {}", out.trim());

    println!(
        "\n== productpage sends a sampled W3C traceparent: the trace, as the OTLP receiver got it"
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    in_pod(
        bed,
        "productpage",
        Path::new("curl"),
        &[
            "-sS",
            "-m",
            "5",
            "-H",
            &format!("traceparent: 00-{trace_id}-{parent}-01"),
            "http://10.96.0.20/",
        ],
    )?;
    print_trace(&spans, trace_id, parent)?;

    println!("\n== meshd graph (node-a's view; --prometheus URL gives the mesh's)");
    for line in graph(&a, &[])?.lines() {
        println!("   {line}");
    }
    for format in ["mermaid", "dot"] {
        println!("\n== meshd graph --format {format}");
        for line in graph(&a, &["--format", format])?.lines() {
            println!("   {line}");
        }
    }

    println!("\n== /metrics excerpt, node-a (reporter=source)");
    print_excerpt(&a);
    println!("\n== /metrics excerpt, node-b (reporter=destination)");
    print_excerpt(&b);

    println!("\n== SIGTERM: each meshd stops capturing, drains, detaches and exits");
    for (name, mut meshd) in [("node-a", a), ("node-b", b)] {
        let status = meshd.terminate(Duration::from_secs(40));
        println!("   {name}: meshd exited: {status}");
        if !status.success() {
            bail!("meshd failed; log:\n{}", meshd.log());
        }
    }
    Ok(())
}

/// The spans of `trace_id` as a tree under the caller's span `parent`.
fn print_trace(file: &Path, trace_id: &str, parent: &str) -> anyhow::Result<()> {
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|s: &serde_json::Value| s["trace_id"] == trace_id)
            .collect()
    };
    // Both meshd export in batches: wait for the client and server span.
    sys::eventually(Duration::from_secs(15), || read().len() >= 2);
    let spans = read();
    ensure!(
        spans.len() >= 2,
        "the receiver got {} spans of the trace",
        spans.len()
    );
    println!("   trace {trace_id}");
    println!("   └─ {parent}  productpage (the caller's span)");
    fn children(spans: &[serde_json::Value], parent: &str, depth: usize) {
        for span in spans.iter().filter(|s| s["parent_span_id"] == parent) {
            let kind = match span["kind"].as_i64() {
                Some(2) => "server",
                Some(3) => "client",
                _ => "span",
            };
            let a = &span["attributes"];
            let ms =
                (span["end"].as_f64().unwrap_or(0.0) - span["start"].as_f64().unwrap_or(0.0)) / 1e6;
            println!(
                "   {}└─ {}  {kind} span of {}'s meshd: {} → {} {} {:.2} ms",
                "   ".repeat(depth),
                span["span_id"].as_str().unwrap_or("?"),
                span["resource"]["k8s.node.name"].as_str().unwrap_or("?"),
                a["meshd.source.workload"].as_str().unwrap_or("?"),
                a["meshd.destination.workload"].as_str().unwrap_or("?"),
                a["http.response.status_code"],
                ms
            );
            children(spans, span["span_id"].as_str().unwrap_or(""), depth + 1);
        }
    }
    children(&spans, parent, 1);
    Ok(())
}

/// `meshd graph ARGS` in the node namespace of `meshd`.
fn graph(meshd: &Meshd, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["graph"];
    all.extend_from_slice(args);
    let output = meshd.output_in_node(&sys::workspace_binary("meshd"), &all);
    ensure!(
        output.status.success(),
        "meshd graph failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn print_excerpt(meshd: &Meshd) {
    let metrics = meshd.metrics();
    for line in metrics.lines().filter(|l| excerpt(l)) {
        println!("   {}", shorten(line));
    }
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

fn excerpt(line: &str) -> bool {
    let interesting = [
        "istio_tcp_connections_opened_total{",
        "istio_tcp_sent_bytes_total{",
        "meshd_active_connections ",
        "meshd_tunnel_connections ",
        "meshd_authorization_denied_total{",
        "meshd_certificate_expiry_seconds{",
        "meshd_bpf_events{event=\"captured\"}",
        "istio_requests_total{",
        "meshd_retries_total{",
    ];
    interesting.iter().any(|p| line.starts_with(p))
}

/// Keeps the labels that tell the story so an excerpt line fits a screen.
fn shorten(line: &str) -> String {
    let Some((series, value)) = line.rsplit_once(' ') else {
        return line.to_owned();
    };
    let Some((name, labels)) = series.split_once('{') else {
        return line.to_owned();
    };
    let keep = [
        "reporter",
        "source_workload",
        "source_principal",
        "destination_workload",
        "destination_principal",
        "destination_service",
        "connection_security_policy",
        "response_flags",
        "response_code",
        "reason",
        "identity",
        "event",
    ];
    let kept: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| keep.iter().any(|k| l.starts_with(&format!("{k}="))))
        .collect();
    format!("{name}{{{}}} {value}", kept.join(","))
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
