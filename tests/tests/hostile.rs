//! Attacks on meshd from the pods it serves: each test does what a hostile
//! process on a meshed node could do, and checks the mesh's guarantee holds.

use std::{path::Path, time::Duration};

use meshd_tests::{
    clients::{curl_args, serve_hello},
    sys::{command_in, wait_with_timeout, Cgroup},
    testbed::Testbed,
};

#[test]
fn a_process_sharing_a_pods_address_does_not_get_its_identity() {
    let bed = Testbed::new(&["client", "web"]);
    serve_hello(&bed, "web", &[]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: web, serviceAccount: web }]
policies:
  - name: only-client
    target: { service: default/web }
    action: allow
    from: [{ principals: [cluster.local/ns/default/sa/client] }]
",
    ));
    let code = |out: &str| out.trim().to_owned();
    let args = [
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://10.96.0.20/",
    ];
    let (_, out) = curl_args(&bed, bed.pod("client"), &args);
    assert_eq!(code(&out), "200", "the real client is allowed");

    // Another process in the client's network namespace (so with its
    // address) but not in its cgroup: a sidecar-less pod cannot tell
    // them apart by address, so meshd must not either.
    let client = bed.pod("client");
    let pods = client.cgroup.dir.parent().expect("the pods' cgroup");
    let imposter = Cgroup::create(pods.join("imposter"));
    let child = command_in(&imposter, &client.netns, Path::new("curl"), &{
        let mut all = vec!["-sS", "-m", "3"];
        all.extend_from_slice(&args);
        all
    })
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("curl as the imposter");
    let out = wait_with_timeout(child, Duration::from_secs(10), "imposter curl");
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        code(&answer),
        "403",
        "a process outside the client's cgroup was taken for the client\n{}",
        meshd.log()
    );
    imposter.kill_all();
}

/// Asks a hand-over socket for its listeners like a new meshd would, then
/// claims to be ready; prints how many descriptors it got.
const TAKE_OVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(b"meshd handover v1\n")
    msg, anc, flags, addr = s.recvmsg(512, socket.CMSG_SPACE(4 * 8))
except OSError:
    anc = []
fds = sum(len(data) // 4 for (level, kind, data) in anc if kind == socket.SCM_RIGHTS)
try:
    s.sendall(b"ready\n")
except OSError:
    pass
print("descriptors", fds)
"#;

#[test]
fn only_a_meshd_of_the_same_user_can_take_over_the_listeners() {
    use std::os::unix::fs::PermissionsExt as _;
    let bed = Testbed::new(&["client", "web"]);
    serve_hello(&bed, "web", &[]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: web }]
",
    ));
    let socket = bed.dir.join("handover-node-a.sock");
    let mode = std::fs::metadata(&socket)
        .expect("the hand-over socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "hand-over socket mode {mode:o}");
    let socket = socket.display().to_string();

    // Another user cannot connect at all.
    let other = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            TAKE_OVER,
            &socket,
        ])
        .output()
        .expect("python3 as nobody");
    let refused = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && refused.contains("PermissionError"),
        "nobody was not refused by the socket's permissions: {other:?}"
    );

    // The same user, but not meshd: gets nothing, and its "ready" does not
    // make meshd drain.
    let same = std::process::Command::new("python3")
        .args(["-c", TAKE_OVER, &socket])
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&same.stdout);
    assert!(
        said.contains("descriptors 0"),
        "{said}\n{}",
        String::from_utf8_lossy(&same.stderr)
    );
    std::thread::sleep(Duration::from_secs(1));
    let (_, out) = curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/"]);
    assert!(
        out.starts_with("hello from web"),
        "meshd stopped serving: {out}\n{}",
        meshd.log()
    );
    assert!(
        meshd.log().contains("refusing a hand-over request"),
        "{}",
        meshd.log()
    );
    assert!(
        !meshd.log().contains("handing over and draining"),
        "{}",
        meshd.log()
    );
}

#[test]
fn slow_uploads_from_a_client_do_not_eject_a_healthy_endpoint() {
    let bed = Testbed::new(&["client", "web"]);
    serve_hello(&bed, "web", &[]);
    let meshd = bed.start_meshd(&bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: web }]
    timeout: 300ms
    retries: { maxRetries: 0 }
    outlierDetection: { consecutiveErrors: 3, baseEjectionTime: 60s }
",
    ));
    let upload = bed.write("upload", &"x".repeat(20_000));
    let upload = format!("@{}", upload.display());
    // Five POSTs whose client sends 2 kB/s: each outlasts the timeout
    // while the client is still uploading — the client's fault, not the
    // endpoint's.
    for _ in 0..5 {
        let (_, out) = curl_args(
            &bed,
            bed.pod("client"),
            &[
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--limit-rate",
                "2k",
                "--data-binary",
                &upload,
                "http://10.96.0.20/",
            ],
        );
        assert_eq!(out.trim(), "504", "{}", meshd.log());
    }
    let ejected = [("destination_service", "web.default.svc.cluster.local")];
    assert_eq!(
        meshd.metric("meshd_outlier_ejections_total", &ejected),
        0.0,
        "slow clients ejected a healthy endpoint"
    );
    let (_, out) = curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/"]);
    assert!(out.starts_with("hello from web"), "{out}");
}

/// Connects from inside a pod (its cgroup and network namespace, so
/// capture applies), sends a request's headers but never their end
/// (slowloris), and prints `closed` once meshd closes the connection, or
/// `open` after the given seconds.
const SLOWLORIS: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
s.settimeout(float(sys.argv[3]))
try:
    while s.recv(256):
        pass
    print("closed")
except socket.timeout:
    print("open")
except OSError:
    print("closed")
"#;

/// Whether meshd closed a slowloris connection from `pod` to `host:port`
/// within `seconds`.
fn slowloris(bed: &Testbed, pod: &str, host: &str, port: &str, seconds: &str) -> bool {
    let child = meshd_tests::clients::spawn_in(
        bed,
        bed.pod(pod),
        Path::new("/usr/bin/python3"),
        &["-c", SLOWLORIS, host, port, seconds],
    );
    let out = wait_with_timeout(child, Duration::from_secs(30), "slowloris");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("closed") || said.contains("open"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said.contains("closed")
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let bed = Testbed::new(&["client", "web"]);
    serve_hello(&bed, "web", &[]);
    let _meshd = bed.start_meshd(&bed.config(
        "proxy: { headerReadTimeout: 1s }
services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: web }]
",
    ));
    // The metrics port listens on every address, so a pod reaches it;
    // and a captured HTTP connection.
    for (host, port) in [("10.77.0.1", "15020"), ("10.96.0.20", "80")] {
        assert!(
            slowloris(&bed, "client", host, port, "8"),
            "{host}:{port}: a connection without the end of its headers is still open after 8 s"
        );
    }
    let (_, out) = curl_args(&bed, bed.pod("client"), &["http://10.96.0.20/"]);
    assert!(out.starts_with("hello from web"), "{out}");
}
