//! Distributed tracing through real parts: an application instrumented with
//! the OpenTelemetry SDK (Python), two nodes' meshd, and an OTLP receiver
//! built from the official OpenTelemetry protobufs (Python `grpcio` and
//! `opentelemetry-proto`, `tests/python/otlp_receiver.py`) taking OTLP/gRPC
//! from one node and OTLP/HTTP from the other.

use std::{path::Path, time::Duration};

use meshd_tests::{
    clients::{
        curl_args, issuer_identity, otlp_receiver, python_script, serve_hello, spawn_in, PYTHON,
    },
    sys::{eventually, wait_with_timeout},
    testbed::{Meshd, PodSpec, Testbed},
};

/// The spans received so far.
fn spans(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// node-a runs `app`, node-b `server` (a hello server) behind `web`.
fn two_nodes(tracing_a: &str, tracing_b: &str) -> (Testbed, Meshd, Meshd) {
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("app")]),
        ("node-b", &[PodSpec::named("server")]),
    ]);
    serve_hello(&bed, "server", &[]);
    let services = "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.78.0.10, node: node-b, workload: server, serviceAccount: server }]
";
    let identity = issuer_identity(&bed);
    let a = bed.start_meshd_on(
        0,
        &bed.config_with(0, &identity, &format!("{services}{tracing_a}")),
    );
    let b = bed.start_meshd_on(
        1,
        &bed.config_with(1, &identity, &format!("{services}{tracing_b}")),
    );
    (bed, a, b)
}

const SPAN_KIND_SERVER: i64 = 2;
const SPAN_KIND_CLIENT: i64 = 3;

#[test]
fn one_request_through_two_nodes_is_one_trace_from_the_app_to_the_server() {
    // Both meshd sample no new trace: the app's sampled flag decides.
    let (bed, a, b) = two_nodes(
        "tracing: { endpoint: 'http://10.77.0.1:4317', protocol: grpc, sampling: 0 }\n",
        "tracing: { endpoint: 'http://192.168.77.1:4318', protocol: http, sampling: 0 }\n",
    );
    let file = otlp_receiver(&bed);
    let client = spawn_in(
        &bed,
        bed.pod("app"),
        Path::new(PYTHON),
        &[
            &python_script("traced_client.py").display().to_string(),
            "--url",
            "http://10.96.0.20/",
            "--otlp",
            "http://10.77.0.1:4317",
        ],
    );
    let output = wait_with_timeout(client, Duration::from_secs(60), "traced client");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && out.contains("status 200 hello from server"),
        "{out}{}\nnode-a:\n{}\nnode-b:\n{}",
        String::from_utf8_lossy(&output.stderr),
        a.log(),
        b.log()
    );
    let trace_id = out
        .split_whitespace()
        .nth(1)
        .expect("the client prints its trace id")
        .to_owned();
    // The server saw the trace too, as a child of a span of node-b's meshd.
    let seen = out
        .split("traceparent: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("the server got no traceparent: {out}"))
        .to_owned();
    let in_trace = |file: &Path| -> Vec<serde_json::Value> {
        spans(file)
            .into_iter()
            .filter(|s| s["trace_id"] == trace_id.as_str())
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(20), || in_trace(&file).len() >= 3),
        "spans of trace {trace_id}: {:#?}\nall: {:#?}\nnode-a:\n{}\nnode-b:\n{}",
        in_trace(&file),
        spans(&file),
        a.log(),
        b.log()
    );
    let trace = in_trace(&file);
    assert_eq!(trace.len(), 3, "{trace:#?}");
    let find = |service: &str, kind: i64| {
        trace
            .iter()
            .find(|s| s["service"] == service && s["kind"] == kind)
            .unwrap_or_else(|| panic!("no {service} span of kind {kind}: {trace:#?}"))
    };
    let app = find("traced-client", SPAN_KIND_CLIENT);
    let source = find("meshd", SPAN_KIND_CLIENT);
    let destination = find("meshd", SPAN_KIND_SERVER);
    // app → source meshd → destination meshd → server.
    assert_eq!(app["parent_span_id"], "", "{trace:#?}");
    assert_eq!(source["parent_span_id"], app["span_id"], "{trace:#?}");
    assert_eq!(
        destination["parent_span_id"], source["span_id"],
        "{trace:#?}"
    );
    let span_id = destination["span_id"].as_str().expect("span id");
    assert_eq!(seen, format!("00-{trace_id}-{span_id}-01"));
    // Each node exported its own span, over its own protocol.
    assert_eq!(source["protocol"], "grpc");
    assert_eq!(destination["protocol"], "http");
    assert_eq!(source["resource"]["k8s.node.name"], "node-a");
    assert_eq!(destination["resource"]["k8s.node.name"], "node-b");
    // OpenTelemetry's HTTP attributes and the mesh's.
    for span in [source, destination] {
        let attributes = &span["attributes"];
        assert_eq!(attributes["http.request.method"], "GET", "{span:#}");
        assert_eq!(attributes["http.response.status_code"], 200, "{span:#}");
        assert_eq!(attributes["url.path"], "/", "{span:#}");
        assert_eq!(
            attributes["meshd.source.principal"],
            "spiffe://cluster.local/ns/default/sa/app"
        );
        assert_eq!(
            attributes["meshd.destination.principal"],
            "spiffe://cluster.local/ns/default/sa/server"
        );
        assert_eq!(
            attributes["meshd.destination.service"],
            "web.default.svc.cluster.local"
        );
        assert_eq!(attributes["meshd.response_flags"], "-");
    }
    assert_eq!(source["attributes"]["meshd.tries"], 1);
    assert_eq!(
        source["attributes"]["meshd.connection_security_policy"],
        "mutual_tls"
    );
    // Nothing was dropped.
    for meshd in [&a, &b] {
        let exported = || meshd.metric("meshd_spans_exported_total", &[]);
        assert!(
            eventually(Duration::from_secs(5), || exported() == 1.0),
            "{}",
            meshd.metrics()
        );
        assert_eq!(meshd.metric("meshd_spans_dropped_total", &[]), 0.0);
    }
}

#[test]
fn a_collector_that_is_down_or_stuck_costs_no_request() {
    // node-a's collector refuses connections; node-b's accepts them and
    // never answers. Every request is sampled.
    let (bed, a, b) = two_nodes(
        "tracing: { endpoint: 'http://10.77.0.1:4999', sampling: 1, maxQueue: 8, maxBatch: 4, exportTimeout: 1s }\n",
        "tracing: { endpoint: 'http://192.168.77.2:4318', protocol: http, sampling: 1, maxQueue: 8, maxBatch: 4, exportTimeout: 1s }\n",
    );
    // A listener that takes connections and never reads them.
    bed.spawn_on_node(
        1,
        Path::new("python3"),
        &[
            "-c",
            "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('192.168.77.2',4318))\ns.listen(64)\nc=[]\nwhile True:\n  c.append(s.accept())\n",
        ],
    );
    let (code, out) = curl_args(
        &bed,
        bed.pod("app"),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.20/[1-300]",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let ok = out.lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 300, "{out}\nnode-a:\n{}\nnode-b:\n{}", a.log(), b.log());
    // Every span is accounted for: a refused export fails fast (node-a
    // drops its spans as export failures); a stuck collector holds each
    // export for its timeout, so node-b's queue fills and spans that do
    // not fit are dropped at once.
    let dropped =
        |meshd: &Meshd, reason| meshd.metric("meshd_spans_dropped_total", &[("reason", reason)]);
    let all = |meshd: &Meshd| dropped(meshd, "queue_full") + dropped(meshd, "export_failed");
    assert!(
        eventually(Duration::from_secs(20), || all(&a) == 300.0),
        "{}",
        a.metrics()
    );
    assert!(dropped(&a, "export_failed") > 0.0, "{}", a.metrics());
    assert!(dropped(&b, "queue_full") > 0.0, "{}", b.metrics());
    assert!(
        eventually(Duration::from_secs(20), || dropped(&b, "export_failed")
            > 0.0),
        "{}",
        b.metrics()
    );
    for meshd in [&a, &b] {
        assert_eq!(meshd.metric("meshd_spans_exported_total", &[]), 0.0);
    }
}
