//! A real application's manifests become a working mesh, with no
//! hand-written address: Bookinfo's shape (productpage → details,
//! productpage → reviews split v1/v2 → ratings) as the Kubernetes objects
//! of the test bed's pods (on the kubelet's systemd cgroup layout), turned
//! into each node's file by `meshd discover --from-manifests`, served by
//! two meshd. Then a pod that moves to the other node, and a new pod, are
//! followed through meshd's reload, with load running and no request
//! failed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use meshd_tests::{
    clients::{curl_args, issuer_identity, serve_hello, spawn_in, testkit},
    sys::{self, eventually, wait_with_timeout},
    testbed::{CgroupLayout, Meshd, PodSpec, Testbed},
};

const PRODUCTPAGE: &str = "10.96.1.10";
const DETAILS: &str = "10.96.1.11";
const REVIEWS: &str = "10.96.1.12";
const RATINGS: &str = "10.96.1.13";

fn pod<'a>(name: &'a str, account: &'a str, labels: &'a str) -> PodSpec<'a> {
    PodSpec {
        name,
        namespace: "bookinfo",
        service_account: account,
        labels: Some(labels),
        qos: "Burstable",
    }
}

/// The pods the cluster's objects hold now: which pod is reviews v2, and
/// the replicas of details.
struct Scheduled<'a> {
    reviews_v2: &'a str,
    details: &'a [&'a str],
}

fn pod_object(bed: &Testbed, name: &str) -> String {
    let p = bed.pod(name);
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: bookinfo
  uid: {uid}
  labels: {{ {labels} }}
spec:
  nodeName: {node}
  serviceAccountName: {account}
  containers: [{{ name: app, image: hello, ports: [{{ containerPort: 8080, name: http }}] }}]
status:
  phase: Running
  qosClass: {qos}
  podIP: {ip}
  podIPs: [{{ ip: {ip} }}]
---
",
        uid = p.uid,
        labels = p.labels,
        node = bed.nodes[p.node].name,
        account = p.service_account,
        qos = p.qos,
        ip = p.ip,
    )
}

/// A Service and its EndpointSlice (as the endpoint controller writes it).
fn service(bed: &Testbed, name: &str, vip: &str, selector: &str, pods: &[&str]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|name| {
            let p = bed.pod(name);
            format!(
                "- addresses: [{ip}]\n  conditions: {{ ready: true, serving: true, terminating: false }}\n  nodeName: {node}\n  targetRef: {{ kind: Pod, name: {name}, namespace: bookinfo, uid: {uid} }}\n",
                ip = p.ip,
                node = bed.nodes[p.node].name,
                uid = p.uid
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: bookinfo }}
spec:
  clusterIP: {vip}
  clusterIPs: [{vip}]
  ports: [{{ name: http, port: 9080, targetPort: 8080 }}]
  selector: {{ {selector} }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-x7k2p
  namespace: bookinfo
  labels: {{ kubernetes.io/service-name: {name} }}
addressType: IPv4
ports: [{{ name: http, port: 8080, protocol: TCP }}]
endpoints:
{endpoints}---
"
    )
}

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: istio-system }
spec: { mtls: { mode: STRICT } }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: details-viewer, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: details } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage] } }]
    to: [{ operation: { methods: [GET] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: reviews-viewer, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ratings-viewer, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: ratings } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: [cluster.local/ns/bookinfo/sa/bookinfo-reviews] } }]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: details, namespace: bookinfo }
spec:
  host: details.bookinfo.svc.cluster.local
  trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews, namespace: bookinfo }
spec:
  parentRefs: [{ group: \"\", kind: Service, name: reviews, port: 9080 }]
  rules:
  - backendRefs:
    - { name: reviews-v1, port: 9080, weight: 50 }
    - { name: reviews-v2, port: 9080, weight: 50 }
---
";

/// The cluster's objects for `now`.
fn manifests(bed: &Testbed, now: &Scheduled<'_>) -> String {
    let mut pods = vec!["productpage", "reviews-v1", now.reviews_v2, "ratings"];
    pods.extend_from_slice(now.details);
    let mut text: String = pods.iter().map(|p| pod_object(bed, p)).collect();
    for node in &bed.nodes {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{ name: {} }}\nstatus:\n  addresses: [{{ type: InternalIP, address: {} }}]\n---\n",
            node.name, node.backbone_ip
        ));
    }
    let reviews = ["reviews-v1", now.reviews_v2];
    for (name, vip, selector, pods) in [
        (
            "productpage",
            PRODUCTPAGE,
            "app: productpage",
            &["productpage"][..],
        ),
        ("details", DETAILS, "app: details", now.details),
        ("reviews", REVIEWS, "app: reviews", &reviews[..]),
        (
            "reviews-v1",
            "10.96.1.14",
            "app: reviews, version: v1",
            &reviews[..1],
        ),
        (
            "reviews-v2",
            "10.96.1.15",
            "app: reviews, version: v2",
            &reviews[1..],
        ),
        ("ratings", RATINGS, "app: ratings", &["ratings"][..]),
    ] {
        text.push_str(&service(bed, name, vip, selector, pods));
    }
    text.push_str(POLICIES);
    text
}

/// Runs `meshd discover --from-manifests` for every node.
fn discover(bed: &Testbed, manifests_dir: &Path, node_configs: &[PathBuf]) -> Vec<PathBuf> {
    bed.nodes
        .iter()
        .zip(node_configs)
        .map(|(node, node_config)| {
            let out = bed.dir.join(format!("discovered-{}", node.name));
            let output = Command::new(sys::workspace_binary("meshd"))
                .args(["discover", "--node", &node.name, "--from-manifests"])
                .arg(manifests_dir)
                .arg("--out")
                .arg(&out)
                .arg("--node-config")
                .arg(node_config)
                .output()
                .expect("run meshd discover");
            assert!(
                output.status.success(),
                "meshd discover --node {}: {}",
                node.name,
                String::from_utf8_lossy(&output.stderr)
            );
            out.join("meshd.yaml")
        })
        .collect()
}

/// An HTTP status and body.
fn get(bed: &Testbed, from: &str, vip: &str) -> (String, String) {
    let (code, out) = curl_args(
        bed,
        bed.pod(from),
        &["-w", "\n%{http_code}", &format!("http://{vip}:9080/")],
    );
    assert_eq!(code, 0, "curl {from} → {vip}: exit {code} {out}");
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.to_owned(), body.to_owned())
}

/// Who answered each request of a bounded load (`served NAME COUNT`).
fn served(stdout: &str) -> std::collections::BTreeMap<String, u64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("served "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, count)| (name.to_owned(), count.parse().unwrap()))
        .collect()
}

/// `testkit load --http` from productpage to `vip` while `change` runs;
/// every request must succeed.
fn load_through(
    bed: &Testbed,
    vip: &str,
    change: impl FnOnce(),
) -> std::collections::BTreeMap<String, u64> {
    let connect = format!("{vip}:9080");
    let load = spawn_in(
        bed,
        bed.pod("productpage"),
        &testkit(),
        &[
            "load",
            "--http",
            "--connect",
            &connect,
            "--rate",
            "20",
            "--seconds",
            "8",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    change();
    let output = wait_with_timeout(load, Duration::from_secs(60), "testkit load");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "a request failed while the change was applied: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    served(&stdout)
}

#[test]
fn bookinfo_manifests_become_a_working_mesh_that_follows_pods_moving_and_new_pods() {
    let bed = Testbed::with_cgroups(
        CgroupLayout::Systemd,
        &[
            (
                "node-a",
                &[
                    pod(
                        "productpage",
                        "bookinfo-productpage",
                        "app: productpage, version: v1",
                    ),
                    pod("details", "bookinfo-details", "app: details, version: v1"),
                    pod(
                        "reviews-v1",
                        "bookinfo-reviews",
                        "app: reviews, version: v1",
                    ),
                    // Where reviews v2 moves to.
                    pod(
                        "reviews-v2-b",
                        "bookinfo-reviews",
                        "app: reviews, version: v2",
                    ),
                ],
            ),
            (
                "node-b",
                &[
                    pod(
                        "reviews-v2",
                        "bookinfo-reviews",
                        "app: reviews, version: v2",
                    ),
                    pod("ratings", "bookinfo-ratings", "app: ratings, version: v1"),
                    // A replica of details that starts later.
                    pod("details-2", "bookinfo-details", "app: details, version: v1"),
                ],
            ),
        ],
    );
    for name in [
        "productpage",
        "details",
        "reviews-v1",
        "reviews-v2-b",
        "reviews-v2",
        "ratings",
        "details-2",
    ] {
        serve_hello(&bed, name, &[]);
    }
    // The operator's node settings: the node section without its name (the
    // test bed's cgroups, pins, hand-over socket, capture address), with
    // the mesh's CA.
    let identity = issuer_identity(&bed);
    let node_configs: Vec<PathBuf> = (0..bed.nodes.len())
        .map(|i| {
            let whole = bed.config_with(i, &identity, "");
            let node = whole.split("nodes:\n").next().unwrap();
            let node: String = node
                .lines()
                .filter(|l| !l.starts_with("  name:"))
                .map(|l| format!("{l}\n"))
                .collect();
            bed.write(&format!("node-{i}.yaml"), &node)
        })
        .collect();
    let manifests_dir = bed.dir.join("manifests");
    std::fs::create_dir_all(&manifests_dir).unwrap();
    let apply = |now: &Scheduled<'_>| {
        // What `kubectl get -o yaml` would give now; discover rewrites each
        // node's file, atomically, and each meshd reloads it.
        let next = manifests_dir.join("bookinfo.yaml.next");
        std::fs::write(&next, manifests(&bed, now)).unwrap();
        std::fs::rename(&next, manifests_dir.join("bookinfo.yaml")).unwrap();
        discover(&bed, &manifests_dir, &node_configs)
    };
    let files = apply(&Scheduled {
        reviews_v2: "reviews-v2",
        details: &["details"],
    });
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.contains(r#""qosClass":"Burstable""#) && !text.contains(r#""cgroup":"#),
            "workloads by pod UID and QoS class, not by cgroup:\n{text}"
        );
    }
    let meshd: Vec<Meshd> = files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let meshd = Meshd::spawn_on(&bed, i, std::slice::from_ref(file), &[]);
            meshd.wait_ready();
            meshd
        })
        .collect();
    let logs = || {
        meshd
            .iter()
            .map(|m| m.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // The app, with its policies: details and reviews for productpage only,
    // ratings for reviews only (across nodes, by the tunnel's identity).
    let (status, body) = get(&bed, "productpage", DETAILS);
    assert!(
        status == "200" && body.starts_with("hello from details "),
        "{status} {body}\n{}",
        logs()
    );
    let (status, body) = get(&bed, "reviews-v1", RATINGS);
    assert!(
        status == "200" && body.starts_with("hello from ratings "),
        "{status} {body}\n{}",
        logs()
    );
    for (from, to) in [
        ("productpage", RATINGS),
        ("ratings", DETAILS),
        ("details", REVIEWS),
    ] {
        let (status, body) = get(&bed, from, to);
        assert_eq!(
            status,
            "403",
            "{from} → {to} is not allowed: {body}\n{}",
            logs()
        );
    }
    // The split: both versions answer.
    let before = load_through(&bed, REVIEWS, || {});
    assert!(
        before.get("reviews-v1").copied().unwrap_or(0) >= 20
            && before.get("reviews-v2").copied().unwrap_or(0) >= 20,
        "reviews split 50/50 over 160 requests: {before:?}"
    );

    let reloads = |m: &Meshd| m.metric("meshd_config_reloads_total", &[("result", "ok")]);
    let wait_reloads = |n: f64| {
        for m in &meshd {
            assert!(
                eventually(Duration::from_secs(15), || reloads(m) == n),
                "reload {n} not applied:\n{}",
                logs()
            );
        }
    };

    // reviews v2 moves to node-a: its EndpointSlice names the new pod.
    let during = load_through(&bed, REVIEWS, || {
        apply(&Scheduled {
            reviews_v2: "reviews-v2-b",
            details: &["details"],
        });
        wait_reloads(1.0);
    });
    assert!(during.contains_key("reviews-v2-b"), "{during:?}");
    let after = load_through(&bed, REVIEWS, || {});
    assert!(
        !after.contains_key("reviews-v2") && after.get("reviews-v2-b").copied().unwrap_or(0) >= 20,
        "after the move, v2 is the pod on node-a only: {after:?}"
    );
    // Its identity moved with it: ratings still admits it, across nodes.
    let (status, body) = get(&bed, "reviews-v2-b", RATINGS);
    assert!(
        status == "200" && body.starts_with("hello from ratings "),
        "{status} {body}\n{}",
        logs()
    );

    // A new details pod on node-b (details balances round robin: by
    // latency, the default, the pod on productpage's node would win every
    // request of a sequential load).
    let during = load_through(&bed, DETAILS, || {
        apply(&Scheduled {
            reviews_v2: "reviews-v2-b",
            details: &["details", "details-2"],
        });
        wait_reloads(2.0);
    });
    assert!(during.contains_key("details"), "{during:?}");
    let after = load_through(&bed, DETAILS, || {});
    assert!(
        after.get("details").copied().unwrap_or(0) >= 20
            && after.get("details-2").copied().unwrap_or(0) >= 20,
        "both replicas answer, round robin (the DestinationRule): {after:?}"
    );
    for m in &meshd {
        assert_eq!(
            m.metric("meshd_config_reloads_total", &[("result", "error")]),
            0.0,
            "{}",
            logs()
        );
    }
}
