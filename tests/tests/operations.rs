//! Operating meshd: config hot reload through Kubernetes-style ConfigMap
//! symlink swaps, refused mistakes while the last good config serves.

use std::{os::unix::fs::symlink, path::PathBuf, time::Duration};

use meshd_tests::{
    clients::{client, curl, serve, serve_hello, spawn_in, testkit},
    sys::{eventually, wait_with_timeout, workspace_binary},
    testbed::{Meshd, Testbed},
};

/// A ConfigMap as the kubelet mounts it: `mesh.yaml` → `..data/mesh.yaml`,
/// `..data` → a timestamped directory, swapped atomically on update.
struct ConfigMap {
    dir: PathBuf,
    version: usize,
}

impl ConfigMap {
    fn new(bed: &Testbed, text: &str) -> Self {
        let dir = bed.dir.join("configmap");
        std::fs::create_dir_all(&dir).expect("configmap dir");
        symlink("..data/mesh.yaml", dir.join("mesh.yaml")).expect("file link");
        let mut map = Self { dir, version: 0 };
        map.update(text);
        map
    }

    fn file(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    /// Writes a new version and swaps `..data` to it in one rename.
    fn update(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).expect("version dir");
        std::fs::write(self.dir.join(&version).join("mesh.yaml"), text).expect("write config");
        let tmp = self.dir.join("..data_tmp");
        symlink(&version, &tmp).expect("data link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap data link");
    }
}

fn reloads(meshd: &Meshd, result: &str) -> f64 {
    meshd.metric("meshd_config_reloads_total", &[("result", result)])
}

fn web(endpoints: &str, extra: &str) -> String {
    format!(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{endpoints}]
  - name: echo
    vip: 10.96.0.40
    ports: [{{ port: 9000 }}]
    endpoints: [{endpoints}]
{extra}"
    )
}

const V1: &str = "{ address: 10.77.0.11, workload: v1 }";
const V2: &str = "{ address: 10.77.0.12, workload: v2 }";

#[test]
fn reloads_apply_changes_and_refuse_mistakes_while_the_last_good_config_serves() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &[]);
        serve(&bed, bed.pod(name), 9000, &["--mode", "echo"]);
    }
    let mut map = ConfigMap::new(&bed, &bed.config(&web(V1, "")));
    let meshd = Meshd::spawn(&bed, &[map.file()], &[]);
    meshd.wait_ready();
    let hello = || curl(&bed, bed.pod("client"), "http://10.96.0.20/").1;
    assert!(hello().starts_with("hello from v1"));
    // The capture map's entries (counted from what meshd installed, which
    // each reload brings in line with the config).
    let entries = || meshd.metric("meshd_bpf_map_entries", &[("map", "destinations")]);
    let first = entries();
    assert!(first >= 4.0, "{first} destinations");

    // A connection to v1 that outlives v1's removal from the config.
    let long_lived = spawn_in(
        &bed,
        bed.pod("client"),
        &testkit(),
        &[
            "rr",
            "--connect",
            "10.96.0.40:9000",
            "--rate",
            "50",
            "--seconds",
            "6",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));

    // v1 replaced by v2; a new service added.
    let added = "  - name: extra
    vip: 10.96.0.21
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
";
    map.update(&bed.config(&web(V2, added)));
    assert!(
        eventually(Duration::from_secs(10), || reloads(&meshd, "ok") == 1.0),
        "{}",
        meshd.log()
    );
    assert!(hello().starts_with("hello from v2"));
    // The extra VIP and its endpoint's port: two more.
    assert_eq!(entries(), first + 2.0);
    // meshd says how long the reload took: more than nothing, and far less
    // than the time the test waited for it.
    let took = meshd.metric("meshd_config_last_reload_duration_seconds", &[]);
    assert!(took > 0.0 && took < 10.0, "reload took {took} s");
    let (_, extra) = curl(&bed, bed.pod("client"), "http://10.96.0.21/");
    assert!(extra.starts_with("hello from v1"), "{extra}");
    let out = client(
        &bed,
        bed.pod("client"),
        &["echo", "--connect", "10.96.0.40:9000", "--bytes", "10000"],
        Duration::from_secs(20),
    );
    assert!(out.starts_with("ok echo"), "{out}");
    let drained = wait_with_timeout(long_lived, Duration::from_secs(30), "rr");
    assert!(
        drained.status.success(),
        "the established connection did not survive the reload: {}",
        String::from_utf8_lossy(&drained.stderr)
    );

    // A mistake: refused with file, line and field; the last good config
    // keeps serving.
    let broken =
        bed.config(&web(V2, "").replace("ports: [{ port: 9000 }]", "prots: [{ port: 9000 }]"));
    map.update(&broken);
    assert!(
        eventually(Duration::from_secs(10), || reloads(&meshd, "error") == 1.0),
        "{}",
        meshd.log()
    );
    assert!(
        meshd.log().contains("services[1]: unknown field `prots`"),
        "{}",
        meshd.log()
    );
    assert_eq!(
        meshd.metric("meshd_config_last_reload_successful", &[]),
        0.0
    );
    assert!(hello().starts_with("hello from v2"));
    // `meshd check` says the same about the same file, and fails.
    let bad = bed.write("broken.yaml", &broken);
    let check = std::process::Command::new(workspace_binary("meshd"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("meshd check");
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("services[1]: unknown field `prots`"));

    // What only a restart can change is refused too, and said so.
    let moved = bed
        .config(&web(V2, ""))
        .replace("captureAddress: 10.77.0.1", "captureAddress: 10.77.0.2");
    map.update(&moved);
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "error"
    ) == 2.0));
    assert!(meshd
        .log()
        .contains("node changed: meshd applies that only at start-up"));
    assert!(hello().starts_with("hello from v2"));

    // Fixed: applied again.
    map.update(&bed.config(&web(V1, "")));
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "ok"
    ) == 2.0));
    assert!(hello().starts_with("hello from v1"));
    assert_eq!(
        meshd.metric("meshd_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(entries(), first);

    // A policy added by a reload applies at once, and goes with the next.
    let deny = "policies:
  - name: no-client
    target: { service: default/web }
    action: deny
    from: [{ principals: [cluster.local/ns/default/sa/client] }]
";
    map.update(&bed.config(&web(V1, deny)));
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "ok"
    ) == 3.0));
    let (_, denied) = meshd_tests::clients::curl_args(
        &bed,
        bed.pod("client"),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://10.96.0.20/",
        ],
    );
    assert_eq!(denied, "403");
    map.update(&bed.config(&web(V1, "")));
    assert!(eventually(Duration::from_secs(10), || reloads(
        &meshd, "ok"
    ) == 4.0));
    assert!(hello().starts_with("hello from v1"));
}

/// Additions to a config that used to panic meshd (exit 101, or a reload
/// task dead for good), and the field each must be refused at.
const PANICKING: [(&str, &str); 4] = [
    (
        "  - { name: bad, vip: 10.96.0.60, ports: [{ port: 80 }], endpoints: [{ address: 10.77.0.60, serviceAccount: \"\" }] }\n",
        "services[2].endpoints[0].serviceAccount",
    ),
    (
        "  - { name: bad, vip: 10.96.0.60, ports: [{ port: 80 }], endpoints: [{ address: 10.77.0.60, serviceAccount: a/b }] }\n",
        "services[2].endpoints[0].serviceAccount",
    ),
    (
        "  - { name: bad, namespace: \"\", vip: 10.96.0.60, ports: [{ port: 80 }], endpoints: [{ address: 10.77.0.60 }] }\n",
        "services[2].namespace",
    ),
    ("mesh: { trustDomain: \"\" }\n", "mesh.trustDomain"),
];

/// `meshd check` on `text`: (exit code, stderr).
fn check(bed: &Testbed, name: &str, text: &str) -> (Option<i32>, String) {
    let file = bed.write(name, text);
    let out = std::process::Command::new(workspace_binary("meshd"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("meshd check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn values_that_used_to_panic_are_refused_with_their_place() {
    let bed = Testbed::new(&["client", "v1"]);
    let mut cases: Vec<(String, &str)> = PANICKING
        .iter()
        .map(|(extra, field)| (bed.config(&web(V1, extra)), *field))
        .collect();
    for timeout in ["0s", "100ms"] {
        let text = bed.config(&format!(
            "proxy: {{ failTimeout: {timeout} }}\n{}",
            web(V1, "")
        ));
        cases.push((text, "proxy.failTimeout"));
    }
    // More captured destinations than the kernel's map holds: 256 ports
    // on 257 endpoints.
    let ports: Vec<String> = (1..=256).map(|p| format!("{{ port: {p} }}")).collect();
    let endpoints: Vec<String> = (0..257)
        .map(|i| format!("{{ address: 10.100.{}.{} }}", i / 200, 1 + i % 200))
        .collect();
    let huge = format!(
        "  - {{ name: huge, vip: 10.96.0.61, ports: [{}], endpoints: [{}] }}\n",
        ports.join(", "),
        endpoints.join(", ")
    );
    cases.push((bed.config(&web(V1, &huge)), "services[2]"));
    for (i, (text, field)) in cases.iter().enumerate() {
        let (code, stderr) = check(&bed, &format!("bad-{i}.yaml"), text);
        assert_eq!(code, Some(2), "case {i} ({field}): {stderr}");
        assert!(
            stderr.contains(&format!("bad-{i}.yaml:")) && stderr.contains(field),
            "case {i}: no file:line at {field}: {stderr}"
        );
    }
}

#[test]
fn a_reload_that_used_to_panic_is_refused_and_the_next_good_change_applies() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    for name in ["v1", "v2"] {
        serve_hello(&bed, name, &[]);
    }
    let mut map = ConfigMap::new(&bed, &bed.config(&web(V1, "")));
    let meshd = Meshd::spawn(&bed, &[map.file()], &[]);
    meshd.wait_ready();
    let hello = || curl(&bed, bed.pod("client"), "http://10.96.0.20/").1;
    assert!(hello().starts_with("hello from v1"));
    // The capture map's entries (counted from what meshd installed, which
    // each reload brings in line with the config).
    let entries = || meshd.metric("meshd_bpf_map_entries", &[("map", "destinations")]);
    let first = entries();
    assert!(first >= 4.0, "{first} destinations");
    for (i, (extra, field)) in PANICKING.iter().enumerate() {
        map.update(&bed.config(&web(V1, extra)));
        let refused = (i + 1) as f64;
        assert!(
            eventually(Duration::from_secs(10), || reloads(&meshd, "error")
                == refused),
            "case {i} ({field}) was not refused: {}",
            meshd.log()
        );
        assert!(meshd.log().contains(field), "{}", meshd.log());
        assert!(
            hello().starts_with("hello from v1"),
            "the last good config stopped serving"
        );
    }
    // The reloader is alive: a good change applies.
    map.update(&bed.config(&web(V2, "")));
    assert!(
        eventually(Duration::from_secs(10), || reloads(&meshd, "ok") == 1.0),
        "a good change after the refused ones never applied: {}",
        meshd.log()
    );
    assert!(hello().starts_with("hello from v2"));
    assert_eq!(
        meshd.metric("meshd_config_last_reload_successful", &[]),
        1.0
    );
    assert!(!meshd.log().contains("panicked"), "{}", meshd.log());
}

/// `(healthy, ejected)` of the endpoint at `address` of service `name`,
/// from the admin API.
fn endpoint_state(meshd: &Meshd, name: &str, address: &str) -> (bool, bool) {
    let services: serde_json::Value =
        serde_json::from_str(&meshd.admin("/services")).expect("JSON from /services");
    let endpoint = services
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == name)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("no endpoint {address} of {name} in {services:#}"));
    (
        endpoint["healthy"].as_bool().expect("healthy"),
        endpoint["ejected"].as_bool().expect("ejected"),
    )
}

#[test]
fn a_reload_keeps_what_meshd_learned_about_endpoints_still_configured() {
    let bed = Testbed::new(&["client", "v1", "v2", "v3"]);
    serve_hello(&bed, "v1", &["--fail-first", "3"]);
    serve_hello(&bed, "v2", &[]);
    serve_hello(&bed, "v3", &[]);
    // web: v1 fails three in a row and is ejected for a minute. checked:
    // v3 serves, but its check looks at a port nobody listens on; checks
    // every 2 s, two failures take it out — so an endpoint whose health a
    // reload forgot would read healthy for seconds afterwards.
    let services = |extra: &str| {
        format!(
            "services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 80, targetPort: 8080, protocol: http }}]
    endpoints: [{V1}, {V2}]
    loadBalancer: round-robin
    retries: {{ maxRetries: 0 }}
    outlierDetection: {{ consecutiveErrors: 3, baseEjectionTime: 60s }}
  - name: checked
    vip: 10.96.0.21
    ports: [{{ port: 80, targetPort: 8080, protocol: tcp }}]
    endpoints: [{V2}, {{ address: 10.77.0.13, workload: v3 }}]
    healthCheck: {{ protocol: tcp, port: 9999, interval: 2s, unhealthyThreshold: 2 }}
{extra}"
        )
    };
    let mut map = ConfigMap::new(&bed, &bed.config(&services("")));
    let meshd = Meshd::spawn(&bed, &[map.file()], &[]);
    meshd.wait_ready();
    assert!(
        eventually(Duration::from_secs(15), || endpoint_state(
            &meshd,
            "checked",
            "10.77.0.13"
        ) == (false, false)),
        "{}",
        meshd.admin("/services")
    );
    let (code, out) =
        meshd_tests::clients::curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/[1-6]"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(endpoint_state(&meshd, "web", "10.77.0.11"), (true, true));

    // An unrelated service added: nothing learned about the others is lost.
    let unrelated = "  - name: unrelated
    vip: 10.96.0.22
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.12, workload: v2 }]
";
    map.update(&bed.config(&services(unrelated)));
    assert!(
        eventually(Duration::from_secs(10), || reloads(&meshd, "ok") == 1.0),
        "{}",
        meshd.log()
    );
    assert_eq!(
        endpoint_state(&meshd, "checked", "10.77.0.13"),
        (false, false),
        "the failing endpoint came back healthy after the reload"
    );
    assert_eq!(
        endpoint_state(&meshd, "web", "10.77.0.11"),
        (true, true),
        "the ejected endpoint came back after the reload"
    );
    // Traffic agrees: the ejected v1 still gets none.
    let (_, out) =
        meshd_tests::clients::curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/[1-6]"]);
    assert_eq!(
        out.matches("hello from v2").count(),
        6,
        "{out}\n{}",
        meshd.log()
    );
    assert_eq!(
        meshd.metric(
            "meshd_outlier_ejected_endpoints",
            &[("destination_service", "web.default.svc.cluster.local")]
        ),
        1.0
    );
}

#[test]
fn a_tcp_service_sends_no_new_connections_to_an_endpoint_failing_its_check() {
    // client 10.77.0.10, v2 10.77.0.11, v3 10.77.0.12.
    let bed = Testbed::new(&["client", "v2", "v3"]);
    serve_hello(&bed, "v2", &[]);
    serve_hello(&bed, "v3", &[]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: plain
    vip: 10.96.0.21
    ports: [{ port: 80, targetPort: 8080, protocol: tcp }]
    endpoints: [{ address: 10.77.0.11, workload: v2 }, { address: 10.77.0.12, workload: v3 }]
    healthCheck: { protocol: tcp, port: 9999, interval: 200ms, unhealthyThreshold: 2 }
",
    ));
    assert!(
        eventually(Duration::from_secs(10), || meshd.metric(
            "meshd_unhealthy_endpoints",
            &[("destination_service", "plain.default.svc.cluster.local")]
        ) == 2.0),
        "both endpoints fail the check on port 9999: {}",
        meshd.metrics()
    );
    // One new TCP connection per request.
    let answers = |n: usize| -> String {
        (0..n)
            .map(|_| {
                let (code, out) = curl(&bed, bed.pod("client"), "http://10.96.0.21/");
                format!("{code} {out}\n")
            })
            .collect()
    };
    // Both out of rotation: panic routing still serves, from both.
    let out = answers(4);
    assert_eq!(out.matches("hello from v2").count(), 2, "{out}");
    assert_eq!(out.matches("hello from v3").count(), 2, "{out}");
    // v2's check passes once it listens on 9999 too; v3 stays out.
    serve(&bed, bed.pod("v2"), 9999, &["--mode", "echo"]);
    assert!(eventually(Duration::from_secs(10), || meshd.metric(
        "meshd_unhealthy_endpoints",
        &[("destination_service", "plain.default.svc.cluster.local")]
    ) == 1.0));
    let out = answers(10);
    assert_eq!(
        out.matches("hello from v2").count(),
        10,
        "a new connection reached the unhealthy v3: {out}"
    );
}

#[test]
fn the_admin_api_and_meshd_status_show_config_health_certificates_and_change_the_log_level() {
    let bed = Testbed::new(&["client", "v1", "v2"]);
    serve_hello(&bed, "v1", &[]);
    // v2 runs nothing: its health check fails.
    let identity = meshd_tests::clients::issuer_identity(&bed);
    let token = bed.write("admin-token", "s3cret-token\n");
    let services = format!(
        "proxy: {{ adminTokenFile: {} }}\n{}    healthCheck: {{ protocol: tcp, interval: 200ms }}\n",
        token.display(),
        web(&format!("{V1}, {V2}"), "").replace(
            "  - name: echo\n    vip: 10.96.0.40\n    ports: [{ port: 9000 }]\n    endpoints: [{ address: 10.77.0.11, workload: v1 }, { address: 10.77.0.12, workload: v2 }]\n",
            ""
        )
    );
    let mut map = ConfigMap::new(&bed, &bed.config_with(0, &identity, &services));
    let meshd = Meshd::spawn(&bed, &[map.file()], &[]);
    meshd.wait_ready();
    assert!(eventually(Duration::from_secs(10), || {
        meshd.admin("/services").contains("\"healthy\": false")
    }));
    let status: serde_json::Value =
        serde_json::from_str(&meshd.admin("/status")).expect("status JSON");
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["ready"], true);
    let endpoints = &status["services"][0]["endpoints"];
    assert_eq!(endpoints[0]["healthy"], true, "{status:#}");
    assert_eq!(endpoints[1]["healthy"], false, "{status:#}");
    let certificates = status["certificates"].as_array().expect("certificates");
    assert!(
        certificates.iter().any(
            |c| c["identity"] == "spiffe://cluster.local/ns/default/sa/client"
                && c["expiresInSeconds"].as_i64().unwrap_or(0) > 3600
        ),
        "{status:#}"
    );
    assert!(status["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .any(|w| w["name"] == "client"));

    // A refused reload shows up, with its reason.
    map.update("services: [\n");
    assert!(eventually(Duration::from_secs(10), || {
        meshd.admin("/config").contains("lastError\": \"")
    }));
    let config: serde_json::Value =
        serde_json::from_str(&meshd.admin("/config")).expect("config JSON");
    assert!(
        config["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("mesh.yaml"),
        "{config:#}"
    );
    assert!(config["files"][0]["contents"]
        .as_str()
        .unwrap_or("")
        .contains("healthCheck"));

    let summary = meshd.run_in_node(&workspace_binary("meshd"), &["status"]);
    for want in [
        "node node-a  ready",
        "LAST RELOAD REFUSED",
        "default/web 10.96.0.20  1/2 endpoints in rotation",
        "10.77.0.12      this node  UNHEALTHY",
        "spiffe://cluster.local/ns/default/sa/client  expires in 23h",
    ] {
        assert!(summary.contains(want), "no {want:?} in:\n{summary}");
    }

    // The log level changes at run time — for whoever holds the token.
    let put = |extra: &[&str]| {
        let mut args = vec!["-sS", "-X", "PUT"];
        args.extend_from_slice(extra);
        args.push("http://127.0.0.1:15000/logging?level=warn");
        meshd.run_in_node(std::path::Path::new("curl"), &args)
    };
    for refused in [
        put(&[]),
        put(&["-H", "Authorization: Bearer wrong-token!"]),
        put(&["-H", "Authorization: Bearer s3cret-toke"]),
    ] {
        assert!(refused.contains("\"error\""), "{refused}");
        assert!(!meshd.admin("/logging").contains("\"warn\""), "{refused}");
    }
    assert!(meshd.log().contains("a log level change was refused"));
    let out = put(&["-H", "Authorization: Bearer s3cret-token"]);
    assert!(out.contains("\"level\": \"warn\""), "{out}");
    assert!(meshd.admin("/logging").contains("\"warn\""));
}

#[test]
fn a_real_prometheus_scrapes_meshd_and_promtool_finds_its_output_clean() {
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &[]);
    serve(&bed, bed.pod("v1"), 9000, &["--mode", "echo"]);
    let meshd = bed.start_meshd(&bed.config(&web(V1, "")));
    let (code, _) = meshd_tests::clients::curl_args(
        &bed,
        bed.pod("client"),
        &["-o", "/dev/null", "http://10.96.0.20/[1-5]"],
    );
    assert_eq!(code, 0);
    client(
        &bed,
        bed.pod("client"),
        &["echo", "--connect", "10.96.0.40:9000", "--bytes", "1000"],
        Duration::from_secs(20),
    );

    // promtool lints exactly what meshd serves.
    let text = meshd.metrics();
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs it)");
    use std::io::Write as _;
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let lint = wait_with_timeout(lint, Duration::from_secs(30), "promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    // The one name promtool would have otherwise is Istio's own: dashboards
    // and Kiali query `istio_request_duration_milliseconds`, so it stays.
    let istio_unit =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty() && *l != istio_unit)
        .collect();
    assert!(problems.is_empty(), "promtool: {said}");

    // Prometheus in the node's namespace, scraping every second.
    let data = bed.dir.join("prometheus");
    let config = bed.write(
        "prometheus.yml",
        &format!(
            "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: meshd\n    static_configs: [{{ targets: ['{}:15020'] }}]\n",
            bed.nodes[0].ip
        ),
    );
    bed.spawn_on_node(
        0,
        std::path::Path::new("prometheus"),
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    );
    let query = |promql: &str| -> Option<f64> {
        let path = format!(
            "/api/v1/query?query={}",
            meshd_tests::sys::url_encode(promql)
        );
        let node = bed.nodes[0].netns.path();
        let answer = meshd_tests::sys::in_netns(&node, move || {
            meshd_tests::sys::http_get("127.0.0.1:9090".parse().expect("addr"), &path)
        });
        let (200, body) = answer? else { return None };
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let requests = "sum(istio_requests_total{reporter=\"source\",destination_service=\"web.default.svc.cluster.local\",response_code=\"200\"})";
    assert!(
        eventually(Duration::from_secs(60), || query(requests) == Some(5.0)),
        "Prometheus never saw 5 requests: {:?}",
        query(requests)
    );
    let opened = "sum(istio_tcp_connections_opened_total{reporter=\"source\",destination_service=\"echo.default.svc.cluster.local\",source_workload=\"client\"})";
    assert_eq!(query(opened), Some(1.0));
    assert_eq!(query("up{job=\"meshd\"}"), Some(1.0));
}
