//! The dependency graph from live traffic, both forms: each node's own
//! (`meshd graph`, from its admin API's `/graph`) and the mesh's (`meshd
//! graph --prometheus`, from a real Prometheus scraping both nodes, with
//! Kiali's graph queries). Traffic A → B → C with A and C on node-a and B
//! on node-b; every edge crosses the tunnel. The DOT form goes through
//! Graphviz's `dot`. The destination's access log is read here too.

use std::time::Duration;

use meshd_tests::{
    clients::{curl_args, issuer_identity, serve_hello},
    sys::{self, eventually},
    testbed::{Meshd, PodSpec, Testbed},
};

const A_TO_B: usize = 20;
const B_TO_C: usize = 30;

/// `(source, destination, total, mtls)` of each edge of a JSON graph.
fn edges(graph: &str) -> Vec<(String, String, f64, bool)> {
    let json: serde_json::Value = serde_json::from_str(graph).expect("graph JSON");
    json["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap_or("?").to_owned(),
                e["destination"].as_str().unwrap_or("?").to_owned(),
                e["total"].as_f64().unwrap_or(-1.0),
                e["mtls"] == true,
            )
        })
        .collect()
}

fn expected() -> Vec<(String, String, f64, bool)> {
    vec![
        ("default/a".into(), "default/b".into(), A_TO_B as f64, true),
        ("default/b".into(), "default/c".into(), B_TO_C as f64, true),
    ]
}

fn graph(meshd: &Meshd, args: &[&str]) -> String {
    let meshd_bin = sys::workspace_binary("meshd");
    let mut all = vec!["graph"];
    all.extend_from_slice(args);
    meshd.run_in_node(&meshd_bin, &all)
}

#[test]
fn meshd_graph_shows_the_edges_the_traffic_made_from_each_node_and_from_prometheus() {
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("a"), PodSpec::named("c")]),
        ("node-b", &[PodSpec::named("b")]),
    ]);
    for pod in ["a", "b", "c"] {
        serve_hello(&bed, pod, &[]);
    }
    // A backs a service too: a destination believes the workload name a
    // peer gives only for a workload its config knows to run as the
    // identity the peer proved (else the caller is `unknown`, its
    // namespace and principal from its certificate).
    let services = format!(
        "services:
  - name: a
    vip: 10.96.0.30
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: {}, node: node-a, workload: a, serviceAccount: a }}]
  - name: b
    vip: 10.96.0.31
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: {}, node: node-b, workload: b, serviceAccount: b }}]
  - name: c
    vip: 10.96.0.32
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: {}, node: node-a, workload: c, serviceAccount: c }}]
",
        bed.pod("a").ip,
        bed.pod("b").ip,
        bed.pod("c").ip
    );
    let identity = issuer_identity(&bed);
    let log_b = bed.dir.join("access-b.log");
    let a = bed.start_meshd_on(0, &bed.config_with(0, &identity, &services));
    let b = bed.start_meshd_on(
        1,
        &bed.config_with(
            1,
            &identity,
            &format!("{services}accessLog: {{ path: {} }}\n", log_b.display()),
        ),
    );
    let (code, out) = curl_args(
        &bed,
        bed.pod("a"),
        &[&format!("http://10.96.0.31/[1-{A_TO_B}]")],
    );
    assert_eq!(code, 0, "{out}\nnode-a:\n{}\nnode-b:\n{}", a.log(), b.log());
    let (code, out) = curl_args(
        &bed,
        bed.pod("b"),
        &[&format!("http://10.96.0.32/[1-{B_TO_C}]")],
    );
    assert_eq!(code, 0, "{out}\nnode-a:\n{}\nnode-b:\n{}", a.log(), b.log());

    // Each node's own graph: node-a is A's source and C's destination,
    // node-b the other way round; each shows both edges, counted once.
    for (node, meshd) in [("node-a", &a), ("node-b", &b)] {
        let mut got = Vec::new();
        let settled = eventually(Duration::from_secs(10), || {
            got = edges(&graph(meshd, &["--format", "json", "--window", "60s"]));
            got == expected()
        });
        assert!(settled, "{node}: {got:?}\n{}", meshd.admin("/graph"));
    }
    let table = graph(&a, &[]);
    assert!(
        table.contains("default/a") && table.contains("b.default.svc.cluster.local"),
        "{table}"
    );

    // DOT that Graphviz draws, and Mermaid.
    let dot = graph(&a, &["--format", "dot"]);
    assert_eq!(dot.matches(" -> ").count(), 2, "{dot}");
    let svg = bed.dir.join("mesh.svg");
    let dot_file = bed.write("mesh.dot", &dot);
    let drawn = std::process::Command::new("dot")
        .args(["-Tsvg", "-o"])
        .arg(&svg)
        .arg(&dot_file)
        .output()
        .expect("Graphviz's dot (cargo xtask setup installs graphviz)");
    assert!(
        drawn.status.success(),
        "dot refused the graph: {}\n{dot}",
        String::from_utf8_lossy(&drawn.stderr)
    );
    let svg = std::fs::read_to_string(&svg).expect("mesh.svg");
    assert!(
        svg.contains("<svg") && svg.contains("default/b"),
        "{svg:.400}"
    );
    let mermaid = graph(&b, &["--format", "mermaid"]);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert_eq!(mermaid.matches("-->").count(), 2, "{mermaid}");

    // node-b's access log: A's requests as their destination served them,
    // with the peers' identities, and B's own as their source.
    let lines = {
        let read = || std::fs::read_to_string(&log_b).unwrap_or_default();
        eventually(Duration::from_secs(10), || {
            read().lines().count() >= A_TO_B + B_TO_C
        });
        read()
    };
    let entries: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let served: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["reporter"] == "destination")
        .collect();
    assert_eq!(served.len(), A_TO_B, "{lines}");
    let b_ip = bed.pod("b").ip;
    for e in served {
        assert_eq!(
            e["downstream_peer_principal"], "spiffe://cluster.local/ns/default/sa/a",
            "{e}"
        );
        assert_eq!(
            e["upstream_peer_principal"], "spiffe://cluster.local/ns/default/sa/b",
            "{e}"
        );
        assert_eq!(e["upstream_cluster"], "inbound|8080||", "{e}");
        assert_eq!(e["upstream_host"], format!("{b_ip}:8080"), "{e}");
        assert_eq!(e["response_code"], 200, "{e}");
        assert_eq!(e["source_workload"], "a", "{e}");
    }
    let sent = entries.iter().filter(|e| e["reporter"] == "source").count();
    assert_eq!(sent, B_TO_C, "{lines}");

    // The mesh-wide graph, from a real Prometheus scraping both nodes.
    bed.start_prometheus("1s");
    let mut got = Vec::new();
    let mut last_error = String::new();
    let settled = eventually(Duration::from_secs(60), || {
        let output = a.output_in_node(
            &sys::workspace_binary("meshd"),
            &[
                "graph",
                "--prometheus",
                "http://127.0.0.1:9090",
                "--format",
                "json",
            ],
        );
        if output.status.success() {
            got = edges(&String::from_utf8_lossy(&output.stdout));
            got == expected()
        } else {
            last_error = String::from_utf8_lossy(&output.stderr).into_owned();
            false
        }
    });
    assert!(settled, "from Prometheus: {got:?} {last_error}");
    let table = graph(&a, &["--prometheus", "http://127.0.0.1:9090"]);
    assert!(table.contains("default/c"), "{table}");
}
