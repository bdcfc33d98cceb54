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

/// `curl URL` in `pod`: (exit code, body).
pub fn curl(bed: &Testbed, pod: &Pod, url: &str) -> (i32, String) {
    let child = spawn_in(bed, pod, Path::new("curl"), &["-sS", "-g", "-m", "3", url]);
    let output: Output = wait_with_timeout(child, Duration::from_secs(10), "curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}
