//! A shared node proxy must never take the node's pods down with it. meshd
//! beats a heartbeat into a BPF map; its programs stay pinned when it
//! dies. With the heartbeat stale, captured connects go straight to their
//! destination (fail-open) or are refused (fail-closed) — and a meshd that
//! starts again adopts the pinned programs, with no moment where capture
//! is off.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use meshd_tests::{
    clients::{curl, serve, serve_hello},
    sys::eventually,
    testbed::Testbed,
};

/// How a connection to the pod address 10.77.0.11:8080 went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Through meshd: the server saw meshd's address (10.77.0.1).
    ViaMeshd,
    /// Straight to the pod: the server saw the client (10.77.0.10).
    Direct,
    /// Refused or failed (curl's exit code).
    Failed(i32),
}

fn probe(bed: &Testbed) -> Probe {
    match curl(bed, bed.pod("client"), "http://10.77.0.11:8080/") {
        (0, body) if body.contains(" to 10.77.0.1:") => Probe::ViaMeshd,
        (0, body) if body.contains(" to 10.77.0.10:") => Probe::Direct,
        (code, _) => Probe::Failed(code),
    }
}

/// `client` and `v1` (a hello server on 8080, meshed), strict mode,
/// `fail_mode`, a 1 s heartbeat timeout.
fn bed(fail_mode: &str) -> (Testbed, String) {
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &[]);
    let config = bed.config(&format!(
        "mesh: {{ mode: strict }}
proxy: {{ failMode: {fail_mode}, failTimeout: 1s }}
services:
  - name: web
    vip: 10.96.0.20
    ports: [{{ port: 8080 }}]
    endpoints: [{{ address: 10.77.0.11, workload: v1 }}]
"
    ));
    (bed, config)
}

/// Probes every 50 ms on a thread until stopped; returns what it saw.
struct Prober {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Probe>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(bed: &Arc<Testbed>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (bed, stop, seen) = (bed.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                // Bounded: at most two minutes of probes.
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120)
                {
                    let outcome = probe(&bed);
                    seen.lock().expect("lock").push(outcome);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn fail_open_lets_connections_through_when_meshd_is_killed_and_a_restart_adopts_capture() {
    let (bed, config) = bed("open");
    let mut first = bed.start_meshd(&config);
    assert_eq!(probe(&bed), Probe::ViaMeshd, "{}", first.log());

    // Wedged (stopped, not dead): the heartbeat goes stale just the same,
    // and capture comes back when meshd runs again.
    let pid = nix::unistd::Pid::from_raw(first.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let failed_open = eventually(Duration::from_secs(4), || probe(&bed) == Probe::Direct);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    assert!(
        failed_open,
        "connections did not fail open while meshd was stopped"
    );
    assert!(
        eventually(Duration::from_secs(4), || probe(&bed) == Probe::ViaMeshd),
        "capture did not resume: {}",
        first.log()
    );

    first.kill();
    // Within the heartbeat timeout (1 s) plus slack, connects go straight
    // to the pod — strict mode's ingress filter failing open too.
    assert!(
        eventually(Duration::from_secs(4), || probe(&bed) == Probe::Direct),
        "connections did not fail open after meshd was killed"
    );
    for _ in 0..10 {
        assert_eq!(probe(&bed), Probe::Direct);
    }

    // A new meshd adopts the pinned maps and programs.
    let second = bed.start_meshd(&config);
    assert_eq!(probe(&bed), Probe::ViaMeshd, "{}", second.log());
    assert!(second.metric("meshd_bpf_events", &[("event", "failed_open")]) >= 10.0);
}

#[test]
fn fail_closed_refuses_connections_when_meshd_is_killed_and_never_bypasses_it() {
    let (bed, config) = bed("closed");
    let bed = Arc::new(bed);
    let mut first = bed.start_meshd(&config);
    assert_eq!(probe(&bed), Probe::ViaMeshd, "{}", first.log());

    let prober = Prober::start(&bed);
    first.kill();
    assert!(
        eventually(Duration::from_secs(4), || {
            prober
                .seen
                .lock()
                .expect("lock")
                .last()
                .is_some_and(|p| matches!(p, Probe::Failed(_)))
        }),
        "connections were not refused after meshd was killed"
    );
    // Past the heartbeat timeout: now the programs refuse (before it, the
    // dead listener did).
    std::thread::sleep(Duration::from_secs(2));
    let mut second = bed.start_meshd(&config);
    assert!(eventually(Duration::from_secs(5), || {
        prober.seen.lock().expect("lock").last() == Some(&Probe::ViaMeshd)
    }));
    let seen = prober.stop();
    // Refused while meshd was gone, through meshd again after: never around it.
    assert!(
        !seen.contains(&Probe::Direct),
        "a connection bypassed meshd: {seen:?}"
    );
    assert!(
        seen.iter().any(|p| matches!(p, Probe::Failed(_))),
        "{seen:?}"
    );
    assert!(second.metric("meshd_bpf_events", &[("event", "failed_closed")]) >= 1.0);

    // A graceful stop takes the pinned programs with it (strict mode
    // included): the pod is reached directly, nothing is left pinned.
    let pins = bed.pin_dir(0);
    assert!(second.terminate(Duration::from_secs(40)).success());
    assert!(
        !Path::new(&pins).exists(),
        "pins left behind in {}",
        pins.display()
    );
    assert_eq!(probe(&bed), Probe::Direct);
}

#[test]
fn a_rolling_restart_under_load_fails_no_request_and_resets_no_connection() {
    use meshd_tests::clients::{spawn_in, testkit};
    use meshd_tests::sys::wait_with_timeout;
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &[]);
    serve(&bed, bed.pod("v1"), 9000, &["--mode", "echo"]);
    let config = bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
  - name: echo
    vip: 10.96.0.40
    ports: [{ port: 9000 }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
",
    );
    let mut old = bed.start_meshd(&config);
    let client = bed.pod("client");
    // A new connection per request, a long-lived connection, and HTTP
    // keep-alive, all running across the restart.
    let fresh = spawn_in(
        &bed,
        client,
        &testkit(),
        &[
            "load",
            "--connect",
            "10.96.0.40:9000",
            "--rate",
            "50",
            "--seconds",
            "8",
        ],
    );
    let long_lived = spawn_in(
        &bed,
        client,
        &testkit(),
        &[
            "rr",
            "--connect",
            "10.96.0.40:9000",
            "--rate",
            "50",
            "--seconds",
            "8",
        ],
    );
    let keep_alive = spawn_in(
        &bed,
        client,
        std::path::Path::new("curl"),
        &[
            "-sS",
            "-m",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            "http://10.96.0.20/[1-300]",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));

    // The new meshd takes the listeners over; the old one drains and exits
    // by itself once its connections are done.
    let new = bed.start_meshd(&config);
    let exited = old.wait_exit(Duration::from_secs(40));
    assert!(exited.success(), "old meshd: {exited}\n{}", old.log());
    assert!(
        old.log().contains("handed over to a new meshd"),
        "{}",
        old.log()
    );

    for (what, child) in [("load", fresh), ("rr", long_lived)] {
        let out = wait_with_timeout(child, Duration::from_secs(60), what);
        assert!(
            out.status.success(),
            "{what} failed across the restart: {}{}\nold:\n{}\nnew:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            old.log(),
            new.log()
        );
    }
    let out = wait_with_timeout(keep_alive, Duration::from_secs(60), "curl");
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        300,
        "{codes}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The new meshd serves, with the same pinned capture.
    assert_eq!(probe_vip(&bed), "hello from v1");
    assert!(new.metric("meshd_bpf_events", &[("event", "captured")]) > 0.0);
}

fn probe_vip(bed: &Testbed) -> String {
    let (_, body) = curl(bed, bed.pod("client"), "http://10.96.0.20/");
    body.split(" to ").next().unwrap_or_default().to_owned()
}

#[test]
fn a_new_meshd_with_another_outbound_port_binds_it_and_capture_follows() {
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &[]);
    let services = "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
";
    let mut old = bed.start_meshd(&bed.config(services));
    assert_eq!(probe_vip(&bed), "hello from v1");
    // The next meshd's config moves the outbound listener to 15006: the
    // listener handed over (15001) is not what it asks for.
    let moved = bed.config(&format!("proxy: {{ outboundPort: 15006 }}\n{services}"));
    let new = bed.start_meshd(&moved);
    let exited = old.wait_exit(Duration::from_secs(40));
    assert!(exited.success(), "old meshd: {exited}\n{}", old.log());
    assert!(
        new.log().contains("the address changed: binding anew"),
        "{}",
        new.log()
    );
    for _ in 0..5 {
        assert_eq!(probe_vip(&bed), "hello from v1", "{}", new.log());
    }
}

/// A keep-alive HTTP/1.1 client that neither retries nor checks a pooled
/// connection before reusing it (Python's `http.client`): one GET every
/// 250 ms until the stop file appears (at most 120 s), then prints
/// `ok <n> failed <n> reconnects <n>` and the first failures.
const KEEP_ALIVE: &str = r#"
import http.client, os, sys, time
host, stop = sys.argv[1], sys.argv[2]
conn = http.client.HTTPConnection(host, 80, timeout=5)
ok = failed = reconnects = 0
errors = []
deadline = time.time() + 120
while time.time() < deadline and not os.path.exists(stop):
    try:
        if conn.sock is None and ok + failed > 0:
            reconnects += 1
        conn.request("GET", "/")
        answer = conn.getresponse()
        answer.read()
        if answer.status == 200:
            ok += 1
        else:
            failed += 1
            errors.append("status %d" % answer.status)
    except Exception as e:
        failed += 1
        errors.append(repr(e))
        conn.close()
    time.sleep(0.25)
print("ok", ok, "failed", failed, "reconnects", reconnects)
print(errors[:5])
"#;

#[test]
fn ten_hand_overs_under_keep_alive_fail_no_request_and_the_old_meshd_leaves_once_drained() {
    use meshd_tests::clients::spawn_in;
    use meshd_tests::sys::wait_with_timeout;
    let bed = Testbed::new(&["client", "v1"]);
    serve_hello(&bed, "v1", &[]);
    // The default drainTimeout (30 s): an old meshd that waited for it
    // would fail the exit bound below.
    let config = bed.config(
        "services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 10.77.0.11, workload: v1 }]
",
    );
    let mut old = bed.start_meshd(&config);
    let stop = bed.dir.join("keep-alive.stop");
    let stop_arg = stop.display().to_string();
    let client = spawn_in(
        &bed,
        bed.pod("client"),
        Path::new("/usr/bin/python3"),
        &["-c", KEEP_ALIVE, "10.96.0.20", &stop_arg],
    );
    std::thread::sleep(Duration::from_secs(1));
    for round in 0..10 {
        let new = bed.start_meshd(&config);
        let exited = old.wait_exit(Duration::from_secs(15));
        assert!(
            exited.success(),
            "hand-over {round}: the old meshd did not leave once drained: {exited}\n{}",
            old.log()
        );
        old = new;
        std::thread::sleep(Duration::from_millis(500));
    }
    std::fs::write(&stop, "stop").expect("stop file");
    let out = wait_with_timeout(client, Duration::from_secs(30), "keep-alive client");
    let said = String::from_utf8_lossy(&out.stdout);
    let count = |word: &str| -> u64 {
        said.split_whitespace()
            .skip_while(|w| *w != word)
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no {word} in {said:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    assert_eq!(count("failed"), 0, "{said}\nlast meshd:\n{}", old.log());
    assert!(count("ok") >= 20, "{said}");
    // Each hand-over moved the client to the new meshd by Connection: close.
    assert!(count("reconnects") >= 10, "{said}");
}
