//! Istio's own dashboards and Kiali, read unchanged: a real Prometheus
//! scrapes two nodes' meshd while real HTTP, gRPC and TCP traffic flows on
//! one node and across nodes, then runs every data-plane query of Istio's
//! mesh, service and workload dashboards and of Kiali's graph, health and
//! metrics pages (`tests/data/dashboard-queries.json`, each with the
//! upstream file it comes from) with their variables filled in — and each
//! must return data; so must every Istio-metric panel of meshd's own
//! dashboard (`deploy/grafana`), for either reporter.
//!
//! The mesh: namespace `shop` runs `web` (HTTP :80, TCP :9000, gRPC :50051)
//! on `web-a` (node-a) and `web-b` (node-b), each also calling `web`, so
//! each is a client and a server, over the tunnel and on its own node.
//! `outsider` (namespace `ops`, node-a) calls `web` and `legacy`, a service
//! of `shop` whose endpoint (the outside host) is no workload the mesh
//! knows: Kiali's "unserviced" traffic.

use std::{path::Path, time::Duration};

use meshd_tests::{
    clients::{issuer_identity, serve, testkit},
    sys::{self, eventually},
    testbed::{PodSpec, Testbed},
};

const NAMESPACE: &str = "shop";
const SERVICE: &str = "web.shop.svc.cluster.local";
const WORKLOAD: &str = "web-a";

/// How the dashboards' variables are filled: as an operator looking at
/// `web`, `web-a` and `shop` would, with the reporter the dashboards ship
/// with (`destination`) and Grafana's "All" for the rest.
fn fill(expr: &str) -> String {
    // Longest names first: `$service_name` before `$service`.
    let values = [
        ("$kiali_metrics_rate_interval", "1m"),
        ("$kiali_health_rate_interval", "5m"),
        ("$kiali_duration", "600s"),
        ("$__rate_interval", "1m"),
        ("$service_name", "web"),
        ("$dstcluster", ".*"),
        ("$srccluster", ".*"),
        ("$namespace", NAMESPACE),
        ("$workload", WORKLOAD),
        ("$service", SERVICE),
        ("$cluster", "Kubernetes"),
        ("$dstsvc", ".*"),
        ("$srcns", ".*"),
        ("$srcwl", ".*"),
        ("$dstns", ".*"),
        ("$dstwl", ".*"),
        ("$qrep", "destination"),
        ("$app", "web"),
    ];
    let mut out = expr.to_owned();
    for (name, value) in values {
        out = out.replace(name, value);
    }
    // (A `$` before anything but a name is a regex anchor.)
    let unfilled = out.match_indices('$').any(|(i, _)| {
        out[i + 1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '{')
    });
    assert!(!unfilled, "a variable left unfilled in {out}");
    out
}

struct Query {
    id: String,
    upstream: String,
    expr: String,
}

fn queries() -> Vec<Query> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dashboard-queries.json");
    let text = std::fs::read_to_string(&path).expect("dashboard-queries.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let field = |q: &serde_json::Value, name: &str| {
        q[name]
            .as_str()
            .unwrap_or_else(|| panic!("query without {name}: {q}"))
            .to_owned()
    };
    json["queries"]
        .as_array()
        .expect("queries")
        .iter()
        .map(|q| Query {
            id: field(q, "id"),
            upstream: field(q, "upstream"),
            expr: field(q, "expr"),
        })
        .collect()
}

/// The Istio-metric queries of meshd's own dashboard (`deploy/grafana`),
/// for either reporter.
fn own_dashboard() -> Vec<Query> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/meshd-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("meshd-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut out = Vec::new();
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            if !expr.contains("istio_") {
                continue;
            }
            for reporter in ["source", "destination"] {
                out.push(Query {
                    id: format!("meshd-dashboard {} ({reporter})", panel["title"]),
                    upstream: "deploy/grafana/meshd-dashboard.json".into(),
                    expr: expr.replace("$reporter", reporter),
                });
            }
        }
    }
    assert!(
        out.len() >= 20,
        "only {} queries in meshd's dashboard",
        out.len()
    );
    out
}

/// Whether a query's answer holds data: at least one sample that is a
/// number (an empty rate makes `histogram_quantile` NaN).
fn has_data(body: &str) -> Result<bool, String> {
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    if json["status"] != "success" {
        return Err(body.to_owned());
    }
    let result = &json["data"]["result"];
    let samples: Vec<&serde_json::Value> = match json["data"]["resultType"].as_str() {
        Some("vector") => result
            .as_array()
            .map(|r| r.iter().map(|s| &s["value"][1]).collect())
            .unwrap_or_default(),
        Some("scalar") => vec![&result[1]],
        other => return Err(format!("unexpected result type {other:?}")),
    };
    Ok(samples
        .iter()
        .filter_map(|v| v.as_str()?.parse::<f64>().ok())
        .any(|v| !v.is_nan()))
}

/// A bounded loop of `steps` (shell lines) in a pod: at most `rounds`
/// times, 200 ms apart, for at most three minutes (and no longer than the
/// testbed).
fn traffic(bed: &Testbed, pod: &str, steps: &[String], rounds: u32) {
    let script = format!(
        "for i in $(seq 1 {rounds}); do {}; sleep 0.2; done",
        steps.join("; ")
    );
    bed.spawn(
        bed.pod(pod),
        Path::new("timeout"),
        &["180", "bash", "-c", &script],
    );
}

#[test]
fn istios_dashboards_and_kiali_find_data_for_every_query() {
    let web = |name| PodSpec {
        name,
        namespace: NAMESPACE,
        service_account: "web",
        labels: Some(if name == "web-a" {
            "app: web, version: v1"
        } else {
            "app: web, version: v2"
        }),
        qos: "Burstable",
    };
    let outsider = PodSpec {
        name: "outsider",
        namespace: "ops",
        service_account: "outsider",
        labels: None,
        qos: "BestEffort",
    };
    let bed = Testbed::nodes(&[
        ("node-a", &[web("web-a"), outsider]),
        ("node-b", &[web("web-b")]),
    ]);
    let kit = testkit();
    for name in ["web-a", "web-b"] {
        let pod = bed.pod(name);
        serve(&bed, pod, 8080, &["--mode", "hello", "--name", name]);
        serve(&bed, pod, 9000, &["--mode", "echo"]);
        let grpc = format!("{}:50051", pod.ip);
        bed.spawn(pod, &kit, &["grpc-serve", "--listen", &grpc]);
        bed.wait_listening(pod, grpc.parse().expect("address"));
    }
    // The outside host serves `legacy`; meshd knows no workload there.
    let outside = &bed.outside;
    for (port, mode) in [(8080, "hello"), (9000, "echo")] {
        let listen = format!("{}:{port}", outside.ip);
        bed.spawn(
            outside,
            &kit,
            &["serve", "--listen", &listen, "--mode", mode],
        );
        bed.wait_listening(outside, listen.parse().expect("address"));
    }
    let endpoint = |pod: &str, node: &str, version: &str| {
        format!(
            "{{ address: {}, node: {node}, workload: {pod}, serviceAccount: web, labels: {{ app: web, version: {version} }} }}",
            bed.pod(pod).ip
        )
    };
    let services = format!(
        "services:
  - name: web
    namespace: {NAMESPACE}
    vip: 10.96.0.20
    loadBalancer: round-robin
    ports:
      - {{ port: 80, targetPort: 8080, protocol: http }}
      - {{ port: 9000, protocol: tcp }}
      - {{ port: 50051, protocol: grpc }}
    endpoints:
      - {}
      - {}
  - name: legacy
    namespace: {NAMESPACE}
    vip: 10.96.0.21
    ports:
      - {{ port: 80, targetPort: 8080, protocol: http }}
      - {{ port: 9000, protocol: tcp }}
    endpoints: [{{ address: {}, node: node-a }}]
",
        endpoint("web-a", "node-a", "v1"),
        endpoint("web-b", "node-b", "v2"),
        outside.ip
    );
    let identity = issuer_identity(&bed);
    let a = bed.start_meshd_on(0, &bed.config_with(0, &identity, &services));
    let b = bed.start_meshd_on(1, &bed.config_with(1, &identity, &services));

    let kit = kit.display().to_string();
    let http = |vip: &str| format!("curl -s -o /dev/null -m 2 'http://{vip}/[1-4]'");
    let tcp = |vip: &str| format!("{kit} echo --connect {vip}:9000 --bytes 2000 >/dev/null");
    let grpc =
        format!("{kit} grpc-check --connect 10.96.0.20:50051 --stream-messages 1 >/dev/null");
    let rounds = 400;
    for pod in ["web-a", "web-b"] {
        let mut steps = vec![http("10.96.0.20"), tcp("10.96.0.20"), grpc.clone()];
        if pod == "web-a" {
            // A destination outside the mesh (no SPIFFE principal).
            steps.push(http("10.96.0.21"));
        }
        traffic(&bed, pod, &steps, rounds);
    }
    let steps = [
        http("10.96.0.20"),
        tcp("10.96.0.20"),
        http("10.96.0.21"),
        tcp("10.96.0.21"),
    ];
    traffic(&bed, "outsider", &steps, rounds);

    // Prometheus on node-a, scraping both nodes' meshd.
    bed.start_prometheus("2s");
    let node = bed.nodes[0].netns.path();
    let query = |promql: &str| -> Result<bool, String> {
        let path = format!(
            "/api/v1/query?query={}",
            meshd_tests::sys::url_encode(promql)
        );
        let node = node.clone();
        let answer = sys::in_netns(&node, move || {
            sys::http_get("127.0.0.1:9090".parse().expect("addr"), &path)
        });
        match answer {
            Some((200, body)) => has_data(&body),
            other => Err(format!("{other:?}")),
        }
    };
    // Both nodes scraped, each with samples of both reporters in a rate window.
    let ready = "count(rate(istio_requests_total{reporter=\"destination\"}[1m]) > 0) >= 4 and on() count(up == 1) == 2";
    assert!(
        eventually(Duration::from_secs(90), || query(ready) == Ok(true)),
        "Prometheus never saw both nodes' traffic: {:?}\nnode-a:\n{}\nnode-b:\n{}",
        query(ready),
        a.log(),
        b.log()
    );
    let mut all = queries();
    assert!(all.len() >= 200, "only {} queries", all.len());
    all.extend(own_dashboard());
    // A panel's series may still be one scrape short: the failing ones
    // are asked again for a while before they count as failures.
    let mut failing: Vec<&Query> = all.iter().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        failing.retain(|q| query(&fill(&q.expr)) != Ok(true));
        if failing.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let report: Vec<String> = failing
        .iter()
        .map(|q| {
            let expr = fill(&q.expr);
            format!("{} ({}): {:?}\n  {expr}", q.id, q.upstream, query(&expr))
        })
        .collect();
    assert!(
        report.is_empty(),
        "{} of {} queries found no data:\n{}\n\nnode-a /metrics:\n{}\nnode-b /metrics:\n{}",
        report.len(),
        all.len(),
        report.join("\n"),
        a.metrics(),
        b.metrics()
    );
}
