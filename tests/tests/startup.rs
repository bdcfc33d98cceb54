//! `meshd run` refuses to start with one clear sentence when its config is
//! malformed or the host lacks what it needs, and its eBPF log can be raised.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use meshd_tests::{
    sys::{self, wait_with_timeout},
    testbed::{Meshd, Testbed},
};

fn run(command: &mut Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_with_timeout(child, Duration::from_secs(30), "meshd")
}

/// meshd's stderr, asserting that it is exactly one `meshd: …` line.
fn one_sentence(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("meshd: "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_owned()
}

fn valid_config(bed: &Testbed) -> std::path::PathBuf {
    bed.write("valid.yaml", &bed.config(""))
}

#[test]
fn a_malformed_config_names_file_line_and_field() {
    let bed = Testbed::new(&[]);
    let text = format!(
        "{}services:\n  - name: web\n    vip: 10.96.0.300\n    ports: [{{ port: 80 }}]\n",
        bed.config("")
    );
    let line = text
        .lines()
        .position(|l| l.contains("10.96.0.300"))
        .expect("line")
        + 1;
    let path = bed.write("bad.yaml", &text);
    let meshd = sys::workspace_binary("meshd");
    for verb in ["run", "check"] {
        let output = run(Command::new(&meshd).args([verb, "--config"]).arg(&path));
        assert_eq!(
            output.status.code(),
            Some(2),
            "meshd {verb} must exit 2 on a bad config"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let want = format!(
            "{}:{line}: services[0].vip: invalid IP address syntax",
            path.display()
        );
        assert!(
            stderr.contains(&want),
            "meshd {verb}: want {want:?} in:\n{stderr}"
        );
    }
    // The same file corrected passes `meshd check`.
    let fixed = bed.write("fixed.yaml", &text.replace("10.96.0.300", "10.96.0.30"));
    let output = run(Command::new(&meshd).args(["check", "--config"]).arg(&fixed));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn missing_privileges_are_one_clear_sentence() {
    let bed = Testbed::new(&[]);
    let config = valid_config(&bed);
    let meshd = sys::workspace_binary("meshd");
    let output = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&meshd)
        .args(["run", "--config"])
        .arg(&config));
    assert_eq!(output.status.code(), Some(1));
    let line = one_sentence(&output);
    assert!(
        line.contains("meshd lacks CAP_BPF and CAP_NET_ADMIN"),
        "{line}"
    );
}

/// Runs meshd in a private mount namespace after `setup` (shell) ran there.
fn in_private_mounts(config: &Path, setup: &str) -> Output {
    let meshd = sys::workspace_binary("meshd");
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(r#"{setup} && exec "$0" run --config "$1""#))
        .arg(&meshd)
        .arg(config))
}

#[test]
fn a_missing_cgroup2_mount_is_one_clear_sentence() {
    let bed = Testbed::new(&[]);
    let config = valid_config(&bed);
    let mount = sys::cgroup2_mount();
    let output = in_private_mounts(&config, &format!("umount -l {}", mount.display()));
    assert_eq!(output.status.code(), Some(1));
    let line = one_sentence(&output);
    assert!(line.contains("no cgroup2 filesystem is mounted"), "{line}");
}

#[test]
fn missing_btf_is_one_clear_sentence() {
    let bed = Testbed::new(&[]);
    let config = valid_config(&bed);
    let output = in_private_mounts(&config, "mount -t tmpfs none /sys/kernel/btf");
    assert_eq!(output.status.code(), Some(1));
    let line = one_sentence(&output);
    assert!(line.contains("the kernel has no BTF"), "{line}");
}

#[test]
fn the_ebpf_log_is_quiet_by_default_and_raised_by_a_flag() {
    let bed = Testbed::new(&["client"]);
    let services = "services:\n  - { name: web, vip: 10.96.0.40, ports: [{ port: 80 }], endpoints: [{ address: 10.77.0.99 }] }\n";
    let config = bed.write("log.yaml", &bed.config(services));
    for (flag, expect) in [(None, false), (Some("debug"), true)] {
        let mut extra = Vec::new();
        if let Some(level) = flag {
            extra.extend(["--bpf-log", level]);
        }
        let meshd = Meshd::spawn(&bed, std::slice::from_ref(&config), &extra);
        meshd.wait_ready();
        // Captured, then refused upstream: enough to make connect4 log.
        let curl = bed
            .command(
                bed.pod("client"),
                Path::new("curl"),
                &["-sS", "-m", "3", "http://10.96.0.40/"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl");
        let _ = wait_with_timeout(curl, Duration::from_secs(10), "curl");
        let logged = sys::eventually(Duration::from_secs(3), || {
            meshd.log().contains("captured connect to 10.96.0.40:80")
        });
        assert_eq!(logged, expect, "--bpf-log {flag:?}; log:\n{}", meshd.log());
    }
}

#[test]
fn huge_deeply_nested_and_duplicated_configs_are_refused_with_a_message() {
    let dir = std::env::temp_dir().join(format!("meshd-bad-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let node = "node: { name: a, captureAddress: 10.77.0.1, podCgroup: /pods }\n";
    let mut duplicates = String::from(node);
    duplicates.push_str("services:\n");
    for _ in 0..20_000 {
        duplicates.push_str("  - { name: same, vip: 10.96.0.1, ports: [{ port: 80 }] }\n");
    }
    let cases: [(&str, String, &str); 4] = [
        (
            "huge.yaml",
            format!("{node}# {}\n", "x".repeat(17 * 1024 * 1024)),
            "more than the 16777216 meshd accepts",
        ),
        (
            "deep.yaml",
            format!(
                "{node}services: {}{}\n",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            "nested more than 64 levels deep",
        ),
        (
            "keys.yaml",
            format!("{node}proxy: {{ skMsg: true, skMsg: false }}\n"),
            "duplicate",
        ),
        (
            "many.yaml",
            duplicates,
            "services[1].name: service default/same is defined twice",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        let output = run(Command::new(sys::workspace_binary("meshd"))
            .args(["check", "--config"])
            .arg(&path));
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {said:.300}");
        assert!(said.contains(want), "{name}: want {want:?} in {said:.300}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn meshd_in_a_private_cgroup_namespace_still_joins_its_cgroup_and_captures() {
    // Container runtimes on cgroup v2 give containers a cgroup namespace of
    // their own, from which the host's proxy cgroup is out of reach.
    use meshd_tests::{clients::serve_hello, testbed::Meshd};
    // As systemd mounts it: namespaces are delegation boundaries, so a
    // process cannot move itself out of its namespace's root.
    let _delegate = sys::NsDelegate::enable();
    let bed = Testbed::new(&["client", "server"]);
    serve_hello(&bed, "server", &[]);
    let config = bed.write(
        "meshd.yaml",
        &bed.config_with(
            0,
            // This test's own namespace plays the host's.
            &format!("  hostCgroupNamespace: /proc/{}/ns/cgroup\n", std::process::id()),
            "services:\n  - { name: web, vip: 10.96.0.20, ports: [{ port: 80, targetPort: 8080 }], endpoints: [{ address: 10.77.0.11 }] }\n",
        ),
    );
    // Like a container: its own cgroup (inside the pod tree), made the
    // root of a new cgroup namespace; node.proxyCgroup lies outside it.
    let container = bed.pods[0]
        .cgroup
        .dir
        .parent()
        .expect("pods cgroup")
        .join("meshd-container");
    let script = format!(
        r#"mkdir -p {dir} && echo $$ > {dir}/cgroup.procs && exec unshare --cgroup -- "$@""#,
        dir = container.display()
    );
    let meshd = Meshd::spawn_wrapped(&bed, 0, &[config], &[], &["sh", "-c", &script, "sh"]);
    meshd.wait_ready();
    assert!(
        meshd.log().contains("entered the host's cgroup namespace"),
        "{}",
        meshd.log()
    );
    let (code, body) = meshd_tests::clients::curl(&bed, bed.pod("client"), "http://10.96.0.20/");
    assert_eq!(code, 0, "{}", meshd.log());
    assert!(
        body.starts_with("hello from server to 10.77.0.1:"),
        "{body}"
    );
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in:\n{status}"))
}

#[test]
fn starting_leaves_no_memory_peak_above_the_steady_state() {
    // A pod's memory limit must hold meshd's peak, not only its steady
    // state: loading the eBPF programs once parsed the kernel's whole BTF
    // (~15 MiB of transient heap) although the programs need none of it.
    let bed = Testbed::new(&["client"]);
    let meshd = Meshd::spawn(&bed, &[valid_config(&bed)], &[]);
    meshd.wait_ready();
    let (peak, steady) = (
        status_kib(meshd.pid(), "VmHWM"),
        status_kib(meshd.pid(), "VmRSS"),
    );
    assert!(
        peak * 10 <= steady * 11,
        "peak {peak} KiB is more than 10 % above the steady {steady} KiB"
    );
}

/// The `workers=N` of meshd's `meshd ready` line.
fn workers(meshd: &Meshd) -> usize {
    let log = meshd.log();
    log.lines()
        .filter(|l| l.contains("meshd ready"))
        .find_map(|l| {
            // The log may be coloured: drop each `ESC[…m` first.
            let mut pieces = l.split('\x1b');
            let mut plain = pieces.next().unwrap_or_default().to_owned();
            for piece in pieces {
                plain.push_str(piece.split_once('m').map_or(piece, |(_, text)| text));
            }
            let rest = plain.split_once("workers=")?.1;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no workers in meshd's ready line:\n{log}"))
}

/// A cgroup v1 `cpu` hierarchy's directory for this test (where this
/// machine's CPU controller lives; cgroup v2 quotas are unit-tested), with
/// a quota of one CPU; removed on drop.
struct OneCpu(std::path::PathBuf);

impl OneCpu {
    fn new() -> Self {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu"))
            .map(|f| f[1].to_owned())
            .expect("this test needs a cgroup v1 cpu hierarchy to set a CPU quota in");
        let dir = Path::new(&mount).join(format!("meshd-test-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the cpu cgroup");
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").expect("period");
        std::fs::write(dir.join("cpu.cfs_quota_us"), "100000").expect("quota");
        Self(dir)
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn worker_threads_default_to_the_cpus_meshd_may_use_and_follow_the_config() {
    let bed = Testbed::new(&["client"]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = valid_config(&bed);
    let meshd = Meshd::spawn(&bed, std::slice::from_ref(&config), &[]);
    meshd.wait_ready();
    assert_eq!(workers(&meshd), cpus, "no quota: every CPU");
    drop(meshd);

    // As a DaemonSet's `limits.cpu: 1` puts it: a quota on the container's
    // CPU cgroup, which meshd stays in.
    let quota = OneCpu::new();
    let script = format!(
        r#"echo $$ > {}/cgroup.procs && exec "$@""#,
        quota.0.display()
    );
    let meshd = Meshd::spawn_wrapped(
        &bed,
        0,
        std::slice::from_ref(&config),
        &[],
        &["sh", "-c", &script, "sh"],
    );
    meshd.wait_ready();
    assert_eq!(workers(&meshd), 1, "a one-CPU quota");
    drop(meshd);

    let three = bed.write("three.yaml", &bed.config("proxy:\n  workerThreads: 3\n"));
    let meshd = Meshd::spawn_wrapped(&bed, 0, &[three], &[], &["sh", "-c", &script, "sh"]);
    meshd.wait_ready();
    assert_eq!(workers(&meshd), 3, "workerThreads over the quota");
    drop(meshd);
    drop(quota);
}
