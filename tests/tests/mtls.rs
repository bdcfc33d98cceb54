//! Zero trust between nodes: two meshd nodes, pods with SPIFFE identities
//! from a CA made by `meshd ca`, HTTP/2 CONNECT over mutual TLS 1.3, and
//! authorization at the destination. Real TLS clients (openssl, curl) try
//! what attackers and misconfigurations would.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use meshd_tests::{
    clients::{curl, serve, serve_hello},
    sys::{self, eventually, wait_with_timeout},
    testbed::{Meshd, PodSpec, Testbed},
};

const TUNNEL_B: &str = "192.168.77.2:15008";

fn meshd_bin(args: &[&str]) {
    let output = Command::new(sys::workspace_binary("meshd"))
        .args(args)
        .output()
        .expect("run meshd");
    assert!(
        output.status.success(),
        "meshd {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA in `dir/name`.
fn ca(bed: &Testbed, name: &str) -> PathBuf {
    let dir = bed.dir.join(name);
    meshd_bin(&["ca", "init", "--out", &dir.display().to_string()]);
    dir
}

/// Issues `namespace/sa` from `ca` into `out`, with extra `meshd ca issue` flags.
fn issue(ca: &Path, out: &Path, namespace: &str, sa: &str, extra: &[&str]) {
    let mut args = vec![
        "ca".to_owned(),
        "issue".into(),
        "--ca".into(),
        ca.display().to_string(),
        "--namespace".into(),
        namespace.into(),
        "--service-account".into(),
        sa.into(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    meshd_bin(&args);
}

/// Two nodes with their pods, a CA, and a certificate for every pod in its
/// node's `certs-<node>/<ns>/<sa>` directory. Like Kubernetes' secret
/// volumes, each `<sa>` is a symlink to a versioned directory, swapped
/// atomically on rotation.
struct Mesh {
    bed: Testbed,
    ca: PathBuf,
    /// Extra `node.identity` lines (`NODE` stands for the node's index).
    identity: String,
    version: std::cell::Cell<u32>,
}

impl Mesh {
    fn new(node_a: &[PodSpec<'_>], node_b: &[PodSpec<'_>]) -> Self {
        let bed = Testbed::nodes(&[("node-a", node_a), ("node-b", node_b)]);
        let ca = ca(&bed, "ca");
        // Each node trusts the mesh CA's root, and only what its bundle says.
        let identity = format!("    trustBundle: {}\n", ca.join("ca.crt").display());
        let mesh = Self {
            bed,
            ca,
            identity,
            version: std::cell::Cell::new(0),
        };
        mesh.rotate(&mesh.ca, &[]);
        mesh
    }

    fn certs(bed: &Testbed, node: usize) -> PathBuf {
        bed.dir.join(format!("certs-{}", bed.nodes[node].name))
    }

    /// Issues every pod a new certificate from `ca` and swaps it in.
    fn rotate(&self, ca: &Path, extra: &[&str]) {
        let version = self.version.get() + 1;
        self.version.set(version);
        for pod in &self.bed.pods {
            let namespace = Self::certs(&self.bed, pod.node).join(&pod.namespace);
            let versioned = namespace.join(format!(".{}-v{version}", pod.service_account));
            issue(ca, &versioned, &pod.namespace, &pod.service_account, extra);
            let staged = namespace.join(format!(".staged-{}", pod.service_account));
            let _ = std::fs::remove_file(&staged);
            std::os::unix::fs::symlink(&versioned, &staged).expect("symlink");
            std::fs::rename(&staged, namespace.join(&pod.service_account)).expect("swap symlink");
        }
    }

    /// Node `node`'s config with file-based identities and `rest`.
    fn config(&self, node: usize, rest: &str) -> String {
        let certs = Self::certs(&self.bed, node);
        let extra = self.identity.replace("NODE", &node.to_string());
        self.bed.config_with(
            node,
            &format!(
                "  identity:\n    certificates: {}\n{extra}",
                certs.display()
            ),
            &format!("mesh:\n  trustDomain: cluster.local\n{rest}"),
        )
    }

    fn start(&self, rest: &str) -> (Meshd, Meshd) {
        let a = self.bed.start_meshd_on(0, &self.config(0, rest));
        let b = self.bed.start_meshd_on(1, &self.config(1, rest));
        (a, b)
    }
}

/// A service `name` on `vip`:80 whose one endpoint is `address`:8080 on node-b.
fn service(name: &str, vip: &str, address: &str, sa: &str) -> String {
    format!(
        "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints: [{{ address: {address}, node: node-b, workload: {name}, serviceAccount: {sa} }}]\n"
    )
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

#[test]
fn a_cross_node_request_goes_through_mutual_tls_with_principals_on_both_sides() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    serve_hello(bed, "server", &[]);
    // One worker: tunnel connections are pooled per worker, and this
    // test counts the pool's connections.
    let services = format!(
        "proxy:\n  workerThreads: 1\nservices:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (a, b) = mesh.start(&services);

    for _ in 0..3 {
        let (code, body) = curl(bed, bed.pod("client"), "http://10.96.0.20/");
        assert_eq!(
            code,
            0,
            "cross-node curl failed\nnode-a:\n{}\nnode-b:\n{}",
            a.log(),
            b.log()
        );
        // node-b's meshd connected to the pod from its own bridge address.
        assert!(
            body.starts_with("hello from server to 10.78.0.1:"),
            "{body}"
        );
    }
    let principals = [
        ("source_principal", spiffe("client")),
        ("destination_principal", spiffe("server")),
        ("source_workload", "client".to_owned()),
        ("destination_workload", "server".to_owned()),
        (
            "destination_service",
            "server.default.svc.cluster.local".to_owned(),
        ),
    ];
    // The destination believes a peer's word for its workload only where
    // its config knows that workload as that identity: `client` is no
    // workload node-b's config describes, so there it is `unknown`.
    let labels = |reporter: &'static str| {
        let mut l: Vec<(&str, &str)> = principals
            .iter()
            .filter(|(k, _)| reporter == "source" || *k != "source_workload")
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        l.push(("reporter", reporter));
        l.push(("connection_security_policy", "mutual_tls"));
        if reporter == "destination" {
            l.push(("source_workload", "unknown"));
        }
        l.push(("source_cluster", "Kubernetes"));
        l.push(("destination_cluster", "Kubernetes"));
        l.push(("destination_canonical_service", "server"));
        l
    };
    assert_eq!(
        a.metric("istio_tcp_connections_opened_total", &labels("source")),
        3.0
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            b.metric("istio_tcp_connections_closed_total", &labels("destination")) == 3.0
        }),
        "node-b metrics:\n{}",
        b.metrics()
    );
    assert!(b.metric("istio_tcp_sent_bytes_total", &labels("destination")) > 0.0);
    // Three streams, one pooled connection.
    assert_eq!(a.metric("meshd_tunnel_connections", &[]), 1.0);
    let expiry = b.metric(
        "meshd_certificate_expiry_seconds",
        &[("identity", &spiffe("server"))],
    );
    assert!(
        expiry > 23.0 * 3600.0 && expiry <= 24.0 * 3600.0,
        "{expiry}"
    );
}

/// Runs `program args` in node-a's network namespace.
fn on_node_a(bed: &Testbed, program: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", bed.nodes[0].netns.path().display()))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    wait_with_timeout(child, Duration::from_secs(20), program)
}

/// `openssl s_client` to node-b's tunnel port presenting `cert_dir`'s certificate.
fn s_client(bed: &Testbed, cert_dir: Option<&Path>, ca: &Path, extra: &[&str]) -> String {
    let ca_file = ca.join("ca.crt").display().to_string();
    let mut args = vec![
        "s_client".to_owned(),
        "-connect".into(),
        TUNNEL_B.into(),
        "-servername".into(),
        "server.default.cluster.local".into(),
        "-CAfile".into(),
        ca_file,
        "-alpn".into(),
        "h2".into(),
    ];
    if let Some(dir) = cert_dir {
        args.extend(["-cert".into(), dir.join("tls.crt").display().to_string()]);
        args.extend(["-key".into(), dir.join("tls.key").display().to_string()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = on_node_a(bed, "openssl", &args, b"");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_tunnel_port_speaks_only_tls_1_3_and_demands_a_client_certificate() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (_a, b) = mesh.start(&services);
    let out = s_client(bed, None, &mesh.ca, &[]);
    assert!(out.contains("TLSv1.3"), "{out}");
    assert!(
        out.contains("Acceptable client certificate CA names"),
        "no CertificateRequest:\n{out}"
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    // Without a certificate the handshake is refused.
    assert!(
        eventually(Duration::from_secs(5), || {
            b.metric(
                "meshd_tls_handshake_failures_total",
                &[("reason", "no_client_certificate")],
            ) == 1.0
        }),
        "{}",
        b.metrics()
    );
}

/// A certificate from `ca` (its `ca.crt` and `ca.key`) with exactly the
/// URI SANs `uris`, made with openssl, in `out` (`tls.crt`, `tls.key`).
fn forge(ca: &Path, out: &Path, uris: &[&str]) {
    std::fs::create_dir_all(out).expect("cert dir");
    let san: Vec<String> = uris.iter().map(|u| format!("URI:{u}")).collect();
    let ext = out.join("ext.cnf");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nsubjectAltName={}\n",
            san.join(",")
        ),
    )
    .expect("extensions");
    let path = |name: &str| out.join(name).display().to_string();
    let ca_file = |name: &str| ca.join(name).display().to_string();
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(status.status.success(), "openssl {args:?}: {status:?}");
    };
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &path("tls.key"),
        "-subj",
        "/CN=forged",
        "-out",
        &path("req.csr"),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &path("req.csr"),
        "-CA",
        &ca_file("ca.crt"),
        "-CAkey",
        &ca_file("ca.key"),
        "-CAcreateserial",
        "-CAserial",
        &path("ca.srl"),
        "-days",
        "1",
        "-extfile",
        &ext.display().to_string(),
        "-out",
        &path("tls.crt"),
    ]);
}

#[test]
fn a_certificate_must_carry_exactly_one_well_formed_spiffe_id() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (_a, b) = mesh.start(&services);
    let refused = || {
        b.metric(
            "meshd_tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", "bad_identity")],
        )
    };
    // Signed by the mesh's own CA, so only the identity rules refuse them.
    let cases: [(&str, &[&str]); 3] = [
        (
            "two SPIFFE IDs (which one would the peer be?)",
            &[
                "spiffe://cluster.local/ns/default/sa/client",
                "spiffe://cluster.local/ns/default/sa/server",
            ],
        ),
        (
            "a service account that is no DNS label",
            &["spiffe://cluster.local/ns/default/sa/Client_1"],
        ),
        (
            "a namespace that is no DNS label",
            &["spiffe://cluster.local/ns/-default/sa/client"],
        ),
    ];
    let well_formed = bed.dir.join("well-formed");
    forge(
        &mesh.ca,
        &well_formed,
        &["spiffe://cluster.local/ns/default/sa/client"],
    );
    let out = s_client(bed, Some(&well_formed), &mesh.ca, &[]);
    assert!(
        out.contains("TLSv1.3"),
        "the forging itself is sound: {out}"
    );
    for (i, (what, uris)) in cases.iter().enumerate() {
        let dir = bed.dir.join(format!("forged-{i}"));
        forge(&mesh.ca, &dir, uris);
        let out = s_client(bed, Some(&dir), &mesh.ca, &[]);
        let want = (i + 1) as f64;
        assert!(
            eventually(Duration::from_secs(5), || refused() == want),
            "{what}: not refused\n{out}\n{}",
            b.metrics()
        );
    }
    assert_eq!(refused(), 3.0, "the well-formed one was accepted");
}

#[test]
fn a_ca_dropped_into_one_identity_directory_is_not_trusted_for_the_node() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    // An attacker who can write one identity directory on node-b drops a
    // CA of its own there, next to a certificate that still loads.
    let evil = ca(bed, "evil-ca");
    let dir = bed.dir.join("certs-node-b").join("default").join("server");
    std::fs::copy(evil.join("ca.crt"), dir.join("ca.crt")).expect("plant the CA");
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (_a, b) = mesh.start(&services);
    // ...and presents a certificate that CA made for another identity.
    let forged = bed.dir.join("evil-client");
    issue(&evil, &forged, "default", "client", &[]);
    let out = s_client(bed, Some(&forged), &mesh.ca, &[]);
    assert!(
        eventually(Duration::from_secs(5), || b.metric(
            "meshd_tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", "untrusted")],
        ) == 1.0),
        "a CA from one directory authenticated a peer:\n{out}\n{}",
        b.metrics()
    );
}

#[test]
fn certificate_directories_without_a_trust_bundle_are_refused() {
    let mut mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    mesh.identity = String::new();
    let file = mesh.bed.write("no-bundle.yaml", &mesh.config(0, &services));
    let out = Command::new(sys::workspace_binary("meshd"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("meshd check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("node.identity.trustBundle"), "{stderr}");
    // An empty bundle: meshd refuses to start rather than trust nobody.
    let empty = mesh.bed.write("empty.pem", "");
    mesh.identity = format!("    trustBundle: {}\n", empty.display());
    let config = mesh
        .bed
        .write("empty-bundle.yaml", &mesh.config(0, &services));
    let mut meshd = Meshd::spawn_on(&mesh.bed, 0, &[config], &[]);
    let status = meshd.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        meshd.log().contains("holds no root certificate"),
        "{}",
        meshd.log()
    );
}

#[test]
fn a_peers_baggage_cannot_name_its_workload_in_the_metrics() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    serve_hello(bed, "server", &[]);
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (_a, b) = mesh.start(&services);
    // A peer with a valid certificate (the client's) that says it is
    // someone else, with a fresh name each time.
    let cert = bed.dir.join("certs-node-a").join("default").join("client");
    for i in 0..3 {
        let baggage = format!("k8s.workload.name=evil-{i},app.name=evil,app.version=v{i}");
        let output = on_node_a(
            bed,
            &meshd_tests::clients::testkit().display().to_string(),
            &[
                "hbone",
                "--node",
                TUNNEL_B,
                "--cert",
                &cert.display().to_string(),
                "--target",
                "10.78.0.10:8080",
                "--server-name",
                "server.default.cluster.local",
                "--baggage",
                &baggage,
                "--request",
                "GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n",
            ],
            b"",
        );
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(
            out.contains("status 200") && out.contains("hello from server"),
            "{out}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = b.metrics();
    let from_peer: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
        })
        .collect();
    assert!(!from_peer.is_empty(), "{text}");
    for line in from_peer {
        assert!(
            !line.contains("evil"),
            "a peer named itself in the labels: {line}"
        );
        // The client is no workload the mesh config describes: unknown.
        assert!(line.contains("source_workload=\"unknown\""), "{line}");
        assert!(
            line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\""),
            "{line}"
        );
    }
}

#[test]
fn bad_peers_are_refused_each_with_its_own_counted_reason() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (_a, b) = mesh.start(&services);
    let failures = |reason: &str| {
        b.metric(
            "meshd_tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", reason)],
        )
    };

    let expired = bed.dir.join("expired");
    issue(
        &mesh.ca,
        &expired,
        "default",
        "client",
        &["--ttl", "1h", "--backdate", "2h"],
    );
    let other_ca = ca(bed, "other-ca");
    let foreign = bed.dir.join("foreign");
    issue(&other_ca, &foreign, "default", "client", &[]);
    let wrong_san = bed.dir.join("wrong-san");
    issue(
        &mesh.ca,
        &wrong_san,
        "default",
        "client",
        &["--trust-domain", "evil.example"],
    );

    let cases: [(&str, &Path, &str); 3] = [
        ("an expired certificate", &expired, "expired"),
        ("a certificate from another CA", &foreign, "untrusted"),
        ("a SAN outside the trust domain", &wrong_san, "bad_identity"),
    ];
    for (what, dir, reason) in cases {
        let out = s_client(bed, Some(dir), &mesh.ca, &[]);
        assert!(
            eventually(Duration::from_secs(5), || failures(reason) == 1.0),
            "{what}: no {reason} failure counted\n{out}\n{}",
            b.metrics()
        );
    }

    // Plaintext HTTP.
    let output = on_node_a(
        bed,
        "curl",
        &["-sS", "-m", "3", &format!("http://{TUNNEL_B}/")],
        b"",
    );
    assert!(!output.status.success());
    assert!(eventually(Duration::from_secs(5), || failures("plaintext") == 1.0));

    // A TLS 1.2-only client.
    let out = s_client(bed, Some(&expired), &mesh.ca, &["-tls1_2"]);
    assert!(
        !out.contains("TLSv1.2, Cipher is"),
        "a TLS 1.2 session was established:\n{out}"
    );
    assert!(
        eventually(Duration::from_secs(5), || failures("protocol_version")
            == 1.0),
        "{}",
        b.metrics()
    );

    // Random bytes.
    let node_a = bed.nodes[0].netns.path();
    sys::in_netns(&node_a, || {
        let addr: SocketAddr = TUNNEL_B.parse().expect("address");
        let mut stream = TcpStream::connect(addr).expect("connect");
        let garbage: Vec<u8> = (0..256u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
            .collect();
        let _ = stream.write_all(&garbage);
    });
    assert!(
        eventually(Duration::from_secs(5), || failures("not_tls") == 1.0),
        "{}",
        b.metrics()
    );

    // Nothing else was counted along the way.
    let total = b.metric("meshd_tls_handshake_failures_total", &[]);
    assert_eq!(total, 6.0, "{}", b.metrics());
}

#[test]
fn authorization_allows_denies_and_deny_wins_with_real_traffic() {
    let spec = |name| PodSpec::named(name);
    let mesh = Mesh::new(&[spec("a"), spec("d")], &[spec("b"), spec("c")]);
    let bed = &mesh.bed;
    serve_hello(bed, "b", &[]);
    serve_hello(bed, "c", &[]);
    let rest = format!(
        "services:\n{}{}policies:
  - name: b-from-a
    target: {{ service: default/svc-b }}
    action: allow
    from: [{{ principals: [cluster.local/ns/default/sa/a] }}]
  - name: c-from-a
    target: {{ service: default/svc-c }}
    action: allow
    from: [{{ principals: [cluster.local/ns/default/sa/a] }}]
  - name: no-c-for-a
    target: {{ service: default/svc-c }}
    action: deny
    from: [{{ principals: [cluster.local/ns/default/sa/a] }}]
",
        service("svc-b", "10.96.0.21", "10.78.0.10", "b"),
        service("svc-c", "10.96.0.22", "10.78.0.11", "c"),
    );
    let (a_node, b_node) = mesh.start(&rest);
    let cases = [
        ("a", "10.96.0.21", true),
        ("d", "10.96.0.21", false),
        ("a", "10.96.0.22", false),
        ("d", "10.96.0.22", false),
    ];
    for (source, vip, allowed) in cases {
        let (code, body) = curl(bed, bed.pod(source), &format!("http://{vip}/"));
        assert_eq!(
            code == 0,
            allowed,
            "{source} → {vip}: curl {code} {body}\nnode-a:\n{}\nnode-b:\n{}",
            a_node.log(),
            b_node.log()
        );
    }
    let denied = |source: &str, destination: &str| {
        b_node.metric(
            "meshd_authorization_denied_total",
            &[
                ("source_principal", &spiffe(source)),
                ("destination_principal", &spiffe(destination)),
            ],
        )
    };
    assert_eq!(denied("d", "b"), 1.0);
    assert_eq!(denied("a", "c"), 1.0);
    assert_eq!(denied("d", "c"), 1.0);
    assert_eq!(denied("a", "b"), 0.0);
    let log = b_node.log();
    assert!(
        log.contains("authorization denied")
            && log.contains(&spiffe("d"))
            && log.contains(&spiffe("c")),
        "{log}"
    );
}

/// Strict: a plain client on the node's network that bypasses meshd cannot
/// reach a meshed pod, while meshed traffic still can. Permissive: the
/// bypass works and is counted as plaintext.
fn bypass_attempt(mode: &str) -> (i32, Meshd, Testbed) {
    let bed = Testbed::new(&["client", "server"]);
    serve_hello(&bed, "server", &[]);
    let rest = format!(
        "mesh:\n  mode: {mode}\nservices:\n  - {{ name: server, vip: 10.96.0.20, ports: [{{ port: 80, targetPort: 8080 }}], endpoints: [{{ address: 10.77.0.11 }}] }}\n"
    );
    let meshd = bed.start_meshd(&bed.config(&rest));
    let (code, body) = curl(&bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "meshed traffic must pass in {mode} mode: {body}");
    let (bypass, _) = curl(&bed, &bed.outside, "http://10.77.0.11:8080/");
    (bypass, meshd, bed)
}

#[test]
fn strict_mode_refuses_a_plaintext_bypass_in_the_kernel() {
    let (code, meshd, _bed) = bypass_attempt("strict");
    assert_eq!(
        code, 28,
        "the bypass must time out (its SYNs are dropped), curl exit {code}"
    );
    assert!(meshd.metric("meshd_bpf_events", &[("event", "strict_dropped")]) >= 1.0);
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "plaintext_accepted")]),
        0.0
    );
}

#[test]
fn permissive_mode_accepts_a_plaintext_bypass_and_counts_it() {
    let (code, meshd, _bed) = bypass_attempt("permissive");
    assert_eq!(code, 0, "the bypass must succeed in permissive mode");
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "plaintext_accepted")]),
        1.0
    );
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "strict_dropped")]),
        0.0
    );
}

/// Istio's namespace and workload PeerAuthentication: each pod's own mode
/// in the kernel filter over the mesh's, both ways, and changed on a
/// reload (the mesh's mode too) without a restart.
#[test]
fn each_workload_may_have_its_own_mode_and_modes_change_on_reload() {
    let bed = Testbed::new(&["client", "a", "b"]);
    serve_hello(&bed, "a", &[]);
    serve_hello(&bed, "b", &[]);
    let config = |mesh: &str, a: Option<&str>, b: Option<&str>| {
        let mut text = bed.config(&format!(
            "mesh: {{ mode: {mesh} }}
services:
  - {{ name: a, vip: 10.96.0.20, ports: [{{ port: 80, targetPort: 8080 }}], endpoints: [{{ address: 10.77.0.11 }}] }}
  - {{ name: b, vip: 10.96.0.21, ports: [{{ port: 80, targetPort: 8080 }}], endpoints: [{{ address: 10.77.0.12 }}] }}
"
        ));
        for (name, mode) in [("a", a), ("b", b)] {
            if let Some(mode) = mode {
                let workload = format!("{{ name: {name}, namespace:");
                assert!(text.contains(&workload), "{text}");
                text = text.replace(
                    &workload,
                    &format!("{{ name: {name}, mtlsMode: {mode}, namespace:"),
                );
            }
        }
        text
    };
    let path = bed.write("meshd.yaml", &config("permissive", Some("strict"), None));
    let meshd = Meshd::spawn(&bed, std::slice::from_ref(&path), &[]);
    meshd.wait_ready();
    let update = |text: &str, reloads: f64| {
        let next = bed.write("meshd.yaml.next", text);
        std::fs::rename(next, &path).expect("swap config");
        assert!(
            eventually(Duration::from_secs(10), || meshd
                .metric("meshd_config_reloads_total", &[("result", "ok")])
                == reloads),
            "reload {reloads} not applied:\n{}",
            meshd.log()
        );
    };
    let meshed = |vip: &str| curl(&bed, bed.pod("client"), &format!("http://{vip}/")).0;
    let bypass = |ip: &str| curl(&bed, &bed.outside, &format!("http://{ip}:8080/")).0;
    let dropped = || meshd.metric("meshd_bpf_events", &[("event", "strict_dropped")]);
    let cases = [
        // A permissive mesh; a is strict of its own.
        ("permissive", Some("strict"), None, [28, 0]),
        // A strict mesh; b is permissive of its own, a follows the mesh.
        ("strict", None, Some("permissive"), [28, 0]),
        // A strict mesh; b follows it now.
        ("strict", None, None, [28, 28]),
    ];
    for (i, (mesh, a, b, expected)) in cases.into_iter().enumerate() {
        if i > 0 {
            update(&config(mesh, a, b), i as f64);
        }
        let before = dropped();
        for vip in ["10.96.0.20", "10.96.0.21"] {
            assert_eq!(meshed(vip), 0, "meshed traffic to {vip} passes (case {i})");
        }
        let got = [bypass("10.77.0.11"), bypass("10.77.0.12")];
        assert_eq!(
            got, expected,
            "plaintext bypass to a and b, mesh {mesh}, a {a:?}, b {b:?} (28: dropped)"
        );
        let strict = expected.iter().filter(|c| **c == 28).count();
        assert!(
            dropped() - before >= strict as f64,
            "drops counted: {} of at least {strict}",
            dropped() - before
        );
    }
}

// === rotation ===

const LOAD_RATE: &str = "50";

/// An echo server on node-b behind VIP 10.96.0.20, and the services YAML.
fn echo_service(mesh: &Mesh) -> String {
    serve(&mesh.bed, mesh.bed.pod("server"), 8080, &["--mode", "echo"]);
    format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    )
}

/// Starts `seconds` of new-connection-per-request load from `client`.
fn start_load(bed: &Testbed, seconds: u64) -> std::process::Child {
    meshd_tests::clients::spawn_in(
        bed,
        bed.pod("client"),
        &meshd_tests::clients::testkit(),
        &[
            "load",
            "--connect",
            "10.96.0.20:80",
            "--rate",
            LOAD_RATE,
            "--seconds",
            &seconds.to_string(),
        ],
    )
}

/// Waits for the load and asserts that every request succeeded.
fn finish_load(load: std::process::Child, seconds: u64, a: &Meshd, b: &Meshd) -> u64 {
    let output = wait_with_timeout(load, Duration::from_secs(seconds + 60), "load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "requests failed under rotation: {stdout}{}\nnode-a:\n{}\nnode-b:\n{}",
        String::from_utf8_lossy(&output.stderr),
        a.log(),
        b.log()
    );
    let want = seconds * LOAD_RATE.parse::<u64>().expect("rate");
    assert!(stdout.contains(&format!("ok {want} of {want}")), "{stdout}");
    want
}

fn expiry(meshd: &Meshd, sa: &str) -> f64 {
    meshd.metric(
        "meshd_certificate_expiry_seconds",
        &[("identity", &spiffe(sa))],
    )
}

/// Connections the node-b meshd accepted.
fn tunnels_accepted(b: &Meshd) -> usize {
    b.log().matches("tunnel accepted").count()
}

#[test]
fn certificate_rotation_under_load_fails_no_request() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let services = echo_service(&mesh);
    let (a, b) = mesh.start(&services);
    let load = start_load(&mesh.bed, 6);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(expiry(&b, "server") > 23.0 * 3600.0);
    let before = tunnels_accepted(&b);

    mesh.rotate(&mesh.ca, &["--ttl", "12h"]);
    assert!(
        eventually(Duration::from_secs(5), || expiry(&a, "client")
            < 12.5 * 3600.0
            && expiry(&b, "server") < 12.5 * 3600.0),
        "the rotated certificates were not picked up"
    );
    finish_load(load, 6, &a, &b);
    // New handshakes happened with the new certificates.
    assert!(
        tunnels_accepted(&b) > before,
        "no tunnel was re-established after the rotation"
    );
}

#[test]
fn ca_rotation_under_load_fails_no_request() {
    let mut mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    // Each node reads its own trust bundle, the old root for now.
    let bundle = |node: usize| mesh.bed.dir.join(format!("bundle-{node}.pem"));
    let old_root = std::fs::read_to_string(mesh.ca.join("ca.crt")).expect("ca.crt");
    for node in 0..2 {
        std::fs::write(bundle(node), &old_root).expect("bundle");
    }
    mesh.identity = format!(
        "    trustBundle: {}\n",
        mesh.bed.dir.join("bundle-NODE.pem").display()
    );
    let services = echo_service(&mesh);
    let (a, b) = mesh.start(&services);
    let old_ca = mesh.ca.clone();
    let new_ca = ca(&mesh.bed, "ca-2");
    let pem = |dir: &Path| std::fs::read_to_string(dir.join("ca.crt")).expect("ca.crt");
    // Longer than the refresh interval, so both nodes have seen a step
    // before the next begins.
    let settle = || std::thread::sleep(Duration::from_millis(2500));

    let load = start_load(&mesh.bed, 10);
    std::thread::sleep(Duration::from_millis(1000));
    // 1. Trust both roots everywhere.
    for node in 0..2 {
        std::fs::write(bundle(node), format!("{}{}", pem(&old_ca), pem(&new_ca))).expect("bundle");
    }
    settle();
    // 2. Re-issue every workload from the new root.
    mesh.rotate(&new_ca, &[]);
    settle();
    // 3. Trust only the new root.
    for node in 0..2 {
        std::fs::write(bundle(node), pem(&new_ca)).expect("bundle");
    }
    finish_load(load, 10, &a, &b);

    // The old root is no longer trusted: its certificates are refused.
    let old_client = mesh.bed.dir.join("old-client");
    issue(&old_ca, &old_client, "default", "client", &[]);
    let out = s_client(&mesh.bed, Some(&old_client), &new_ca, &[]);
    assert!(
        eventually(Duration::from_secs(5), || {
            b.metric(
                "meshd_tls_handshake_failures_total",
                &[("reason", "untrusted")],
            ) == 1.0
        }),
        "a certificate from the retired CA was not refused:\n{out}\n{}",
        b.metrics()
    );
}

#[test]
fn the_built_in_issuer_mints_and_renews_at_half_life_under_load() {
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("client")]),
        ("node-b", &[PodSpec::named("server")]),
    ]);
    let ca_dir = ca(&bed, "ca");
    serve(&bed, bed.pod("server"), 8080, &["--mode", "echo"]);
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let config = |node| {
        bed.config_with(
            node,
            &format!(
                "  identity:\n    issuer: {}\n    ttl: 10s\n",
                ca_dir.display()
            ),
            &services,
        )
    };
    let a = bed.start_meshd_on(0, &config(0));
    let b = bed.start_meshd_on(1, &config(1));
    let load = start_load(&bed, 14);
    finish_load(load, 14, &a, &b);
    // Renewed at half-life: more than two certificates each in 14 s, and
    // the current one never has more than its 10 s to live.
    let loaded = |meshd: &Meshd, sa: &str| {
        meshd
            .log()
            .lines()
            .filter(|l| l.contains("certificate loaded") && l.contains(&spiffe(sa)))
            .count()
    };
    assert!(loaded(&a, "client") >= 3, "{}", a.log());
    assert!(loaded(&b, "server") >= 3, "{}", b.log());
    let left = expiry(&b, "server");
    assert!(left > 0.0 && left <= 10.0, "{left}");
}

#[test]
fn the_source_refuses_a_destination_proving_another_identity() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    let services = format!(
        "services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let a = bed.start_meshd_on(0, &mesh.config(0, &services));
    // Node-b's tunnel port is taken by an impostor holding a valid
    // certificate from the mesh CA, for the wrong identity.
    let impostor = bed.dir.join("impostor");
    issue(&mesh.ca, &impostor, "default", "impostor", &[]);
    let server = Command::new("nsenter")
        .arg(format!("--net={}", bed.nodes[1].netns.path().display()))
        .args([
            "--", "openssl", "s_server", "-quiet", "-accept", TUNNEL_B, "-tls1_3", "-alpn", "h2",
        ])
        .args(["-cert", &impostor.join("tls.crt").display().to_string()])
        .args(["-key", &impostor.join("tls.key").display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let _server = KillOnDrop(server);
    let listening = eventually(Duration::from_secs(5), || {
        sys::in_netns(&bed.nodes[0].netns.path(), || {
            TcpStream::connect_timeout(
                &TUNNEL_B.parse().expect("address"),
                Duration::from_millis(200),
            )
            .is_ok()
        })
    });
    assert!(listening, "openssl s_server did not start");
    let (code, _) = curl(bed, bed.pod("client"), "http://10.96.0.20/");
    assert_ne!(code, 0, "the connection must not go through an impostor");
    let mismatches = a.metric(
        "meshd_tls_handshake_failures_total",
        &[("direction", "outbound"), ("reason", "identity_mismatch")],
    );
    assert!(mismatches >= 1.0, "{}\n{}", a.metrics(), a.log());
    assert!(a.log().contains(&spiffe("impostor")), "{}", a.log());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn same_node_traffic_skips_the_tunnel_but_not_the_destination_policy() {
    let bed = Testbed::new(&["client", "other", "server"]);
    serve_hello(&bed, "server", &[]);
    let rest = "services:
  - { name: server, vip: 10.96.0.20, ports: [{ port: 80, targetPort: 8080 }], endpoints: [{ address: 10.77.0.12, node: node-a, serviceAccount: server }] }
policies:
  - name: server-from-client
    target: { service: default/server }
    action: allow
    from: [{ principals: [cluster.local/ns/default/sa/client] }]
";
    let meshd = bed.start_meshd(&bed.config(rest));
    let (code, body) = curl(&bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "{body}\n{}", meshd.log());
    let (code, _) = curl(&bed, bed.pod("other"), "http://10.96.0.20/");
    assert_ne!(code, 0, "other is not allowed");
    let denied = [
        ("source_principal", spiffe("other")),
        ("destination_principal", spiffe("server")),
    ];
    let denied: Vec<(&str, &str)> = denied.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        meshd.metric("meshd_authorization_denied_total", &denied),
        1.0
    );
    // One meshd is source and destination: it reports both sides of the
    // hop that was never encrypted.
    for reporter in ["source", "destination"] {
        let allowed = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("connection_security_policy", "none"),
        ];
        assert_eq!(
            meshd.metric("istio_tcp_connections_opened_total", &allowed),
            1.0,
            "{}",
            meshd.metrics()
        );
    }
    assert_eq!(meshd.metric("meshd_tunnel_connections", &[]), 0.0);
}

/// Opens `count` connections to each `host:port` and sends nothing; once
/// all are open, writes `holding` to the marker file; after `hold` seconds
/// prints, per target, how many it opened and how many meshd had closed
/// (reset at a cap, or by a timeout).
const IDLE_FLOOD: &str = r#"
import json, resource, socket, sys, time
marker, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
targets = sys.argv[4:]
held = {t: [] for t in targets}
failed = {t: "" for t in targets}
# A connection shed before connect() looked at it reports the reset there:
# it was opened, and closed.
shed = {t: 0 for t in targets}
for _ in range(count):
    for target in targets:
        host, port = target.rsplit(":", 1)
        try:
            held[target].append(socket.create_connection((host, int(port)), timeout=2))
        except ConnectionResetError as e:
            shed[target] += 1
            failed[target] = str(e)
        except OSError as e:
            failed[target] = str(e)
open(marker, "w").write("holding")
time.sleep(hold)
report = {}
for target, socks in held.items():
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    report[target] = [len(socks) + shed[target], closed + shed[target], failed[target]]
print(json.dumps(report))
"#;

/// Descriptors `pid` holds.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list descriptors")
        .count()
}

/// Starts the idle flood against `targets`, in `pod` (its cgroup and
/// network namespace) or else in node-a's network namespace.
fn idle_flood(
    bed: &Testbed,
    pod: Option<&str>,
    targets: &[String],
) -> (PathBuf, std::process::Child) {
    let name = pod.unwrap_or("node");
    let marker = bed.dir.join(format!("{name}.holding"));
    let mut args = vec![
        "-c".to_owned(),
        IDLE_FLOOD.to_owned(),
        marker.display().to_string(),
        "1500".into(),
        "15".into(),
    ];
    args.extend(targets.iter().cloned());
    let python = Path::new("/usr/bin/python3");
    let mut command = match pod {
        Some(pod) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            bed.command(bed.pod(pod), python, &args)
        }
        None => {
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net={}", bed.nodes[0].netns.path().display()))
                .arg("--")
                .arg(python)
                .args(&args);
            command
        }
    };
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the flood");
    (marker, child)
}

#[test]
fn thousands_of_idle_connections_are_shed_and_closed_while_real_requests_pass() {
    let mesh = Mesh::new(
        &[PodSpec::named("client"), PodSpec::named("attacker")],
        &[PodSpec::named("server")],
    );
    let bed = &mesh.bed;
    serve_hello(bed, "server", &[]);
    let services = format!(
        "proxy:
  idleTimeout: 5s
  handshakeTimeout: 5s
  maxHandshakes: 8
  connectionLimits:
    outbound: {{ max: 1000, perSource: 100 }}
    inbound: {{ max: 1000, perSource: 100 }}
    metrics: {{ max: 100, perSource: 20 }}
    readiness: {{ max: 100, perSource: 20 }}
    admin: {{ max: 10, perSource: 10 }}
services:\n{}",
        service("server", "10.96.0.20", "10.78.0.10", "server")
    );
    let (a, b) = mesh.start(&services);
    let before = (descriptors(a.pid()), descriptors(b.pid()));

    // A pod floods its own node's captured path and status ports and the
    // other node's tunnel port (pre-authentication); a process on the node
    // floods the admin port.
    let node_a = bed.nodes[0].ip;
    let pod_targets = [
        "10.96.0.20:80".to_owned(),
        format!("{node_a}:15020"),
        format!("{node_a}:15021"),
        TUNNEL_B.to_owned(),
    ];
    // As on a real cluster, the pod can reach the other node's address.
    bed.pod("attacker").netns.ip(&[
        "route",
        "add",
        "192.168.77.0/24",
        "via",
        &node_a.to_string(),
    ]);
    let (pod_marker, pod_flood) = idle_flood(bed, Some("attacker"), &pod_targets);
    let admin = ["127.0.0.1:15000".to_owned()];
    let (node_marker, node_flood) = idle_flood(bed, None, &admin);
    assert!(
        eventually(Duration::from_secs(60), || pod_marker.exists()
            && node_marker.exists()),
        "the flood did not get its connections opened"
    );

    // While the flood holds its connections: a real cross-node request
    // (whose tunnel handshake happens now) and the kubelet's probe pass
    // within a second, and meshd's descriptors stay bounded by its caps.
    let (code, body) =
        meshd_tests::clients::curl_args(bed, bed.pod("client"), &["-m", "1", "http://10.96.0.20/"]);
    assert_eq!(
        code,
        0,
        "{body}\nnode-a:\n{}\nnode-b:\n{}",
        a.log(),
        b.log()
    );
    assert!(body.starts_with("hello from server"), "{body}");
    let probe = bed.nodes[0]
        .netns
        .run(move || sys::http_get(SocketAddr::from((node_a, 15021)), "/healthz/ready"));
    assert!(
        matches!(probe, Some((200, _))),
        "readiness probe: {probe:?}"
    );
    let during = (descriptors(a.pid()), descriptors(b.pid()));
    // Caps: 100 captured + 20 + 20 (status) + 10 (admin) on node-a; on
    // node-b the pod's share of 8 handshakes and the 100 admitted captured
    // connections' streams to the server. The flood opened 7 500.
    assert!(
        during.0 <= before.0 + 200 && during.1 <= before.1 + 150,
        "descriptors before {before:?}, during the flood {during:?}\n{}\n{}",
        a.metrics(),
        b.metrics()
    );
    // Every connection the flood kept was closed by a timeout.
    for (flood, targets) in [(pod_flood, &pod_targets[..]), (node_flood, &admin[..])] {
        let out = wait_with_timeout(flood, Duration::from_secs(90), "idle flood");
        let report = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(report.trim())
            .unwrap_or_else(|e| panic!("{e}: {report}{}", String::from_utf8_lossy(&out.stderr)));
        for target in targets {
            let [opened, closed] = [0, 1].map(|i| report[target][i].as_u64().unwrap_or(0));
            assert!(
                opened >= 1000,
                "{target}: only {opened} connections opened: {report}"
            );
            assert_eq!(opened, closed, "{target}: connections left open: {report}");
        }
    }
    for (meshd, listener, reason) in [
        (&a, "outbound", "max_per_source"),
        (&a, "metrics", "max_per_source"),
        (&a, "readiness", "max_per_source"),
        (&a, "admin", "max_connections"),
        (&b, "inbound", "max_handshakes"),
    ] {
        let shed = meshd.metric(
            "meshd_connections_shed_total",
            &[("listener", listener), ("reason", reason)],
        );
        assert!(shed > 0.0, "{listener}: nothing shed for {reason}");
    }

    assert!(
        a.metric(
            "meshd_connections_idle_closed_total",
            &[("listener", "outbound")]
        ) > 0.0,
        "no idle connection was closed by the idle timeout"
    );
    let (code, body) = curl(bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "after the flood: {body}");
}

/// Opens `count` connections to the stopped reader at argv[1] and fills
/// each until nothing more is taken, then asks the echo at argv[2] for
/// 100 bytes back, waiting at most a second.
const STALL: &str = r#"
import socket, sys, time
sink, echo, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
def addr(a):
    host, port = a.rsplit(":", 1)
    return host, int(port)
held, pushed = [], 0
chunk = b"x" * 65536
for _ in range(count):
    s = socket.create_connection(addr(sink), timeout=5)
    s.setblocking(False)
    held.append(s)
deadline = time.time() + 6
while time.time() < deadline:
    moved = 0
    for s in held:
        try:
            moved += s.send(chunk)
        except BlockingIOError:
            pass
    pushed += moved
    if moved == 0:
        time.sleep(0.05)
print("pushed", pushed)
e = socket.create_connection(addr(echo), timeout=1)
e.settimeout(1.0)
started = time.time()
try:
    e.sendall(b"y" * 100)
    got = b""
    while len(got) < 100:
        part = e.recv(100 - len(got))
        if not part:
            break
        got += part
    print("echo", len(got), "in", round(time.time() - started, 3))
except socket.timeout:
    print("echo stalled")
"#;

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn a_stopped_reader_does_not_stall_the_streams_sharing_its_tunnel_connection() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    let server = bed.pod("server");
    serve(bed, server, 9000, &["--mode", "echo"]);
    // The reader that stops, in the same pod: the same identity, so its
    // streams share the echo's tunnel connection.
    let sink = bed.spawn(
        server,
        &meshd_tests::clients::testkit(),
        &["serve", "--listen", "10.78.0.10:9001", "--mode", "echo"],
    );
    bed.wait_listening(server, "10.78.0.10:9001".parse().expect("address"));
    let services = "services:
  - name: echo
    vip: 10.96.0.40
    ports: [{ port: 9000, protocol: tcp }]
    endpoints: [{ address: 10.78.0.10, node: node-b, workload: server, serviceAccount: server }]
  - name: sink
    vip: 10.96.0.41
    ports: [{ port: 9001, protocol: tcp }]
    endpoints: [{ address: 10.78.0.10, node: node-b, workload: server, serviceAccount: server }]
";
    let (a, b) = mesh.start(services);
    signal(sink, "-STOP");
    let child = bed
        .command(
            bed.pod("client"),
            Path::new("/usr/bin/python3"),
            &["-c", STALL, "10.96.0.41:9001", "10.96.0.40:9000", "8"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the stall");
    let out = wait_with_timeout(child, Duration::from_secs(60), "stall");
    signal(sink, "-CONT");
    let said = String::from_utf8_lossy(&out.stdout);
    let pushed: u64 = said
        .split_whitespace()
        .skip_while(|w| *w != "pushed")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}{}", String::from_utf8_lossy(&out.stderr)));
    // Eight stopped streams took more than the old 16 MiB connection window.
    assert!(pushed > 24 << 20, "only {pushed} bytes pushed: {said}");
    assert!(
        said.contains("echo 100 in"),
        "the echo sharing the tunnel stalled: {said}{}\nnode-a:\n{}\nnode-b:\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
}

#[test]
fn callers_waiting_for_a_tunnel_share_one_attempt_bounded_by_the_connect_timeout() {
    let mesh = Mesh::new(&[PodSpec::named("client")], &[PodSpec::named("server")]);
    let bed = &mesh.bed;
    serve_hello(bed, "server", &[]);
    // TCP: no retries, so each caller waits for exactly one attempt.
    // One worker: each worker makes its own tunnel connections, and this
    // test counts the attempts.
    let services = "proxy: { connectTimeout: 1s, workerThreads: 1 }
services:
  - name: server
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: tcp }]
    endpoints: [{ address: 10.78.0.10, node: node-b, workload: server, serviceAccount: server }]
";
    let (a, b) = mesh.start(services);
    // node-b's meshd stops: its kernel still completes TCP handshakes on
    // :15008, but no TLS handshake ever finishes.
    signal(b.pid(), "-STOP");
    let curls: Vec<_> = (0..5)
        .map(|_| {
            meshd_tests::clients::spawn_in(
                bed,
                bed.pod("client"),
                Path::new("curl"),
                &["-sS", "-m", "8", "-o", "/dev/null", "http://10.96.0.20/"],
            )
        })
        .collect();
    let codes: Vec<Option<i32>> = curls
        .into_iter()
        .map(|c| {
            wait_with_timeout(c, Duration::from_secs(20), "curl")
                .status
                .code()
        })
        .collect();
    signal(b.pid(), "-CONT");
    // Each was reset once the one shared attempt gave up after
    // connectTimeout, not left to curl's own 8 s limit (28).
    assert!(
        codes.iter().all(|c| *c != Some(28)),
        "a caller waited past the connect timeout: {codes:?}\n{}",
        a.log()
    );
    let timeouts = a.metric(
        "meshd_tls_handshake_failures_total",
        &[("direction", "outbound"), ("reason", "timeout")],
    );
    assert_eq!(timeouts, 1.0, "attempts that timed out: {timeouts}");
}

/// Whether a plain connection from node 0's own network namespace
/// (`bind` as its source address, if given) to `url` got an answer.
fn from_node(bed: &Testbed, bind: Option<&str>, url: &str) -> i32 {
    let mut args = vec!["-sS", "-g", "-m", "2", "-o", "/dev/null"];
    if let Some(bind) = bind {
        args.extend(["--interface", bind]);
    }
    args.push(url);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", bed.nodes[0].netns.path().display()))
        .arg("--")
        .arg("curl")
        .args(&args)
        .output()
        .expect("curl on the node");
    out.status.code().unwrap_or(-1)
}

#[test]
fn strict_mode_drops_plaintext_from_the_node_itself_from_the_capture_address_and_over_ipv6() {
    let bed = Testbed::new(&["client", "server"]);
    serve_hello(&bed, "server", &[]);
    let server = bed.pod("server");
    // The pod also has IPv6, and a second server on a probe port.
    bed.nodes[0]
        .netns
        .ip(&["-6", "addr", "add", "fd00:77::1/64", "dev", "br0", "nodad"]);
    server.netns.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:77::11/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    bed.spawn(
        server,
        Path::new("/usr/bin/python3"),
        &["-m", "http.server", "--bind", "::", "9090"],
    );
    bed.wait_listening(server, "10.77.0.11:9090".parse().expect("address"));
    let config = bed
        .config(
            "mesh: { mode: strict }
services:
  - { name: server, vip: 10.96.0.20, ports: [{ port: 80, targetPort: 8080 }], endpoints: [{ address: 10.77.0.11 }] }
",
        )
        .replace(
            "labels: { app: server } }",
            "labels: { app: server }, probePorts: [9090] }",
        );
    assert!(config.contains("probePorts"), "{config}");
    let meshd = bed.start_meshd(&config);
    let (code, body) = curl(&bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "meshed traffic must pass: {body}\n{}", meshd.log());
    let node = bed.nodes[0].ip.to_string();
    let dropped = || meshd.metric("meshd_bpf_events", &[("event", "strict_dropped")]);
    let before = dropped();
    // A process on the node (hostNetwork, kubelet, …), one bound to the
    // capture address meshd connects from, and IPv6: all dropped (28:
    // their SYNs go unanswered).
    assert_eq!(from_node(&bed, None, "http://10.77.0.11:8080/"), 28);
    assert_eq!(from_node(&bed, Some(&node), "http://10.77.0.11:8080/"), 28);
    assert_eq!(from_node(&bed, None, "http://[fd00:77::11]:9090/"), 28);
    assert!(dropped() >= before + 3.0, "{}", meshd.metrics());
    // The probe port takes the node's plaintext; the mesh still works.
    assert_eq!(from_node(&bed, None, "http://10.77.0.11:9090/"), 0);
    let (code, body) = curl(&bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "{body}");
}

#[test]
fn permissive_mode_refuses_plaintext_to_a_workload_only_principals_may_reach() {
    let bed = Testbed::new(&["client", "server", "open"]);
    serve_hello(&bed, "server", &[]);
    serve_hello(&bed, "open", &[]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - { name: server, vip: 10.96.0.20, ports: [{ port: 80, targetPort: 8080 }], endpoints: [{ address: 10.77.0.11, workload: server }] }
  - { name: open, vip: 10.96.0.21, ports: [{ port: 80, targetPort: 8080 }], endpoints: [{ address: 10.77.0.12, workload: open }] }
policies:
  - name: only-client
    target: { service: default/server }
    action: allow
    from: [{ principals: [cluster.local/ns/default/sa/client] }]
",
    ));
    // The principal it names passes through meshd.
    let (code, body) = curl(&bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "{body}\n{}", meshd.log());
    // Plaintext has no principal: it could never match, so the kernel
    // refuses it even though the mesh is permissive...
    let (code, _) = curl(&bed, &bed.outside, "http://10.77.0.11:8080/");
    assert_eq!(code, 28, "plaintext reached a principal-only workload");
    // (Each of the SYN's retransmissions is refused and counted.)
    assert!(meshd.metric("meshd_bpf_events", &[("event", "plaintext_refused")]) >= 1.0);
    // ...while a workload without such a policy still takes it, counted.
    let (code, body) = curl(&bed, &bed.outside, "http://10.77.0.12:8080/");
    assert_eq!(code, 0, "{body}");
    assert_eq!(
        meshd.metric("meshd_bpf_events", &[("event", "plaintext_accepted")]),
        1.0
    );
}
