//! Identity on a real kubelet's cgroup layout: pods in the kubelet's QoS
//! cgroups (all three classes, both cgroup drivers), their processes in a
//! container's cgroup below the pod's, the config naming each pod by UID
//! and QoS class only. Every client crosses the tunnel to a server whose
//! policy admits exactly the clients' service accounts: a client meshd
//! did not identify by its cgroup has no certificate to present and is
//! reset, so each answer is the identity at work. Also: a container
//! started after meshd, a pod whose cgroup appeared after meshd started,
//! and a process that shares a pod's address from outside its cgroup
//! (never that pod).

use std::{path::Path, process::Stdio, time::Duration};

use meshd_tests::{
    clients::{issuer_identity, serve_hello},
    sys::{self, wait_with_timeout, Cgroup},
    testbed::{CgroupLayout, Meshd, Pod, PodSpec, Testbed},
};

const CLIENTS: [(&str, &str); 4] = [
    ("guaranteed", "Guaranteed"),
    ("burstable", "Burstable"),
    ("besteffort", "BestEffort"),
    ("late", "BestEffort"),
];

/// curl to the server's VIP from `pod`'s network namespace, in `cgroup`:
/// (exit code, body).
fn curl_from(pod: &Pod, cgroup: &Cgroup) -> (i32, String) {
    let child = sys::command_in(
        cgroup,
        &pod.netns,
        Path::new("curl"),
        &["-sS", "-m", "5", "http://10.96.0.40/"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn curl");
    let output = wait_with_timeout(child, Duration::from_secs(20), "curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn identity_follows_the_kubelets_layout(layout: CgroupLayout) {
    let specs: Vec<PodSpec<'_>> = CLIENTS
        .iter()
        .map(|(name, qos)| PodSpec::named(name).qos(qos))
        .collect();
    let bed = Testbed::with_cgroups(
        layout,
        &[("node-a", &specs), ("node-b", &[PodSpec::named("server")])],
    );
    serve_hello(&bed, "server", &[]);
    // "late" is scheduled, in the config, but the kubelet has not made its
    // cgroup yet when meshd starts.
    let late = bed.pod("late");
    let late_container = late.cgroup.dir.clone();
    let late_pod = sys::cgroup2_mount().join(&late.cgroup_path[1..]);
    std::fs::remove_dir(&late_container).expect("remove late's container cgroup");
    std::fs::remove_dir(&late_pod).expect("remove late's pod cgroup");

    let principals: Vec<String> = CLIENTS
        .iter()
        .map(|(name, _)| format!("cluster.local/ns/default/sa/{name}"))
        .collect();
    let rest = format!(
        "services:
  - name: server
    vip: 10.96.0.40
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{{ address: {}, node: node-b, workload: server, serviceAccount: server }}]
policies:
  - name: server-from-the-clients
    target: {{ service: default/server }}
    action: allow
    from: [{{ principals: [{}] }}]
",
        bed.pod("server").ip,
        principals.join(", ")
    );
    let identity = issuer_identity(&bed);
    let a = bed.start_meshd_on(0, &bed.config_with(0, &identity, &rest));
    let b = bed.start_meshd_on(1, &bed.config_with(1, &identity, &rest));
    let logs = |a: &Meshd, b: &Meshd| format!("node-a:\n{}\nnode-b:\n{}", a.log(), b.log());
    let driver = match layout {
        CgroupLayout::Systemd => "systemd",
        _ => "cgroupfs",
    };
    assert!(
        a.log()
            .lines()
            .any(|l| l.contains("pod cgroups placed") && l.contains(&format!("\"{driver}\""))),
        "meshd did not detect the {driver} driver:\n{}",
        a.log()
    );

    for (name, _) in &CLIENTS[..3] {
        let pod = bed.pod(name);
        assert!(
            pod.cgroup
                .dir
                .starts_with(sys::cgroup2_mount().join(&pod.cgroup_path[1..]))
                && pod.cgroup.dir != sys::cgroup2_mount().join(&pod.cgroup_path[1..]),
            "the client runs in a container's cgroup below its pod's"
        );
        let (code, body) = curl_from(pod, &pod.cgroup);
        assert!(
            code == 0 && body.starts_with("hello from server"),
            "{name}: {code} {body}\n{}",
            logs(&a, &b)
        );
    }

    // A container that starts after meshd: identified with no reload.
    let burstable = bed.pod("burstable");
    let container = bed.new_container(burstable);
    let (code, body) = curl_from(burstable, &container);
    assert!(
        code == 0 && body.starts_with("hello from server"),
        "new container: {code} {body}\n{}",
        logs(&a, &b)
    );

    // The pod whose cgroup the kubelet makes now.
    std::fs::create_dir_all(&late_container).expect("late's cgroups");
    let late_cgroup = Cgroup::create(late_container);
    let (code, body) = curl_from(late, &late_cgroup);
    assert!(
        code == 0 && body.starts_with("hello from server"),
        "late pod: {code} {body}\n{}",
        logs(&a, &b)
    );

    // A process with burstable's address but outside its cgroup (another
    // pod's netns could be joined by anything on the node): not burstable,
    // not anyone; no certificate, so no tunnel is opened for it (meshd
    // answers 503 itself).
    let elsewhere = Cgroup::create(
        sys::cgroup2_mount()
            .join(&bed.nodes[0].pod_cgroup[1..])
            .join("not-a-pod"),
    );
    let (code, body) = curl_from(burstable, &elsewhere);
    assert!(
        !body.starts_with("hello from server"),
        "an unidentified process got through: {code} {body}\n{}",
        logs(&a, &b)
    );

    // Counted at its source as unknown's, refused by meshd itself.
    let source_metrics = a.metrics();
    let refused = source_metrics.lines().any(|l| {
        l.starts_with("istio_requests_total{")
            && l.contains("source_workload=\"unknown\"")
            && l.contains("response_code=\"503\"")
    });
    assert!(
        refused,
        "the unidentified request is not counted:\n{source_metrics}"
    );

    // The destination saw each client by its own principal.
    let metrics = b.metrics();
    for (name, _) in &CLIENTS {
        let principal = format!("source_principal=\"spiffe://cluster.local/ns/default/sa/{name}\"");
        let counted = metrics.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&principal)
        });
        assert!(
            counted,
            "no request from {name} at the destination:\n{metrics}"
        );
    }
    let reached: usize = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as usize)
        .sum();
    assert_eq!(reached, 5, "requests the destination served:\n{metrics}");
}

#[test]
fn identity_by_cgroup_on_the_systemd_drivers_layout() {
    identity_follows_the_kubelets_layout(CgroupLayout::Systemd);
}

#[test]
fn identity_by_cgroup_on_the_cgroupfs_drivers_layout() {
    identity_follows_the_kubelets_layout(CgroupLayout::Cgroupfs);
}
