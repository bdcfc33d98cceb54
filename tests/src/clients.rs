//! Running real servers and clients in pods: meshd-testkit, curl, openssl.

use std::{
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::Duration,
};

use crate::{
    sys::{self, wait_with_timeout},
    testbed::{Pod, Testbed},
};

/// The meshd-testkit binary built beside the running test.
pub fn testkit() -> PathBuf {
    sys::workspace_binary("meshd-testkit")
}

/// Starts a testkit server in `pod` on `port` and waits until it listens.
pub fn serve(bed: &Testbed, pod: &Pod, port: u16, args: &[&str]) {
    let listen = format!("{}:{port}", pod.ip);
    let mut all = vec!["serve", "--listen", listen.as_str()];
    all.extend_from_slice(args);
    bed.spawn(pod, &testkit(), &all);
    bed.wait_listening(pod, listen.parse().expect("address"));
}

/// A `hello` server on :8080 in pod `name`, answering with that name;
/// `extra` adds arguments (`--delay-ms`, `--fail-first`, …).
pub fn serve_hello(bed: &Testbed, name: &str, extra: &[&str]) {
    let mut args = vec!["--mode", "hello", "--name", name];
    args.extend_from_slice(extra);
    serve(bed, bed.pod(name), 8080, &args);
}

/// Spawns `program args` in `pod` with stdout and stderr captured.
pub fn spawn_in(bed: &Testbed, pod: &Pod, program: &Path, args: &[&str]) -> Child {
    bed.command(pod, program, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn in pod")
}

/// Runs testkit `args` in `pod`, expecting success; returns its stdout.
pub fn client(bed: &Testbed, pod: &Pod, args: &[&str], timeout: Duration) -> String {
    let child = spawn_in(bed, pod, &testkit(), args);
    let output = wait_with_timeout(child, timeout, &format!("testkit {}", args.join(" ")));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "testkit {} failed: {stdout}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// curl with `args` in `pod` (20 s per transfer): (exit code, stdout).
pub fn curl_args(bed: &Testbed, pod: &Pod, args: &[&str]) -> (i32, String) {
    let mut all = vec!["-sS", "-m", "20"];
    all.extend_from_slice(args);
    let child = spawn_in(bed, pod, Path::new("curl"), &all);
    let output = wait_with_timeout(child, Duration::from_secs(120), "curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A fresh CA in the test's directory, and the `node.identity` lines that
/// make meshd issue its workloads' certificates from it.
pub fn issuer_identity(bed: &Testbed) -> String {
    let ca = bed.dir.join("ca");
    let status = std::process::Command::new(sys::workspace_binary("meshd"))
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .output()
        .expect("meshd ca init");
    assert!(status.status.success(), "meshd ca init: {status:?}");
    format!("  identity:\n    issuer: {}\n", ca.display())
}

/// `curl URL` in `pod`: (exit code, body).
pub fn curl(bed: &Testbed, pod: &Pod, url: &str) -> (i32, String) {
    let child = spawn_in(bed, pod, Path::new("curl"), &["-sS", "-g", "-m", "3", url]);
    let output: Output = wait_with_timeout(child, Duration::from_secs(10), "curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Where `cargo xtask setup` installs the Python packages the tests use.
pub const PYTHON: &str = "/usr/local/lib/meshd-xtask/venv/bin/python";

pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// The OTLP receiver (`tests/python/otlp_receiver.py`, built from the
/// official OpenTelemetry protobufs) in node-a's network namespace, on
/// every address: gRPC on 4317, HTTP on 4318. Returns the file it writes
/// spans to.
pub fn otlp_receiver(bed: &Testbed) -> PathBuf {
    let out = bed.dir.join("spans.jsonl");
    let receiver = python_script("otlp_receiver.py");
    bed.spawn_on_node(
        0,
        Path::new(PYTHON),
        &[
            &receiver.display().to_string(),
            "--grpc",
            "0.0.0.0:4317",
            "--http",
            "0.0.0.0:4318",
            "--out",
            &out.display().to_string(),
        ],
    );
    let node = bed.nodes[0].netns.path();
    for port in [4317, 4318] {
        let addr: std::net::SocketAddr =
            format!("{}:{port}", bed.nodes[0].ip).parse().expect("addr");
        let node = node.clone();
        let listening = sys::eventually(Duration::from_secs(20), move || {
            let node = node.clone();
            sys::in_netns(&node, move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        });
        assert!(listening, "the OTLP receiver never listened on {addr}");
    }
    out
}
