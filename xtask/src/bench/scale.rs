//! How meshd's costs grow with the mesh and with its connections, one row
//! per doubling (`cargo xtask bench --only scale`):
//!
//! - services: N services of 5 endpoints each, reloaded in full and then
//!   with one endpoint moved, timed by meshd itself
//!   (`meshd_config_last_reload_duration_seconds`: from reading the files
//!   to the new snapshot serving), with meshd's memory after each;
//! - workloads: the same with W workloads on the node beside 1000 services;
//! - idle connections: meshd's memory with C captured connections open;
//! - concurrency: HTTP/1.1 keep-alive requests/s through meshd across
//!   nodes with 1 to 1000 connections, against direct in the same run.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use meshd_tests::{
    sys::{self, wait_with_timeout},
    testbed::{metric_sum, Meshd, PodSpec, Testbed},
};

use super::{http, peak_rss_kib, rss_kib, Bench, RssSampler};

/// Services (5 endpoints each) per row: doubling from 100, then 10 000.
const SERVICES: &[usize] = &[100, 200, 400, 800, 1600, 3200, 6400, 10_000];
const ENDPOINTS_PER_SERVICE: usize = 5;
/// Workloads on the node per row, beside `WORKLOAD_SERVICES` services.
const WORKLOADS: &[usize] = &[10, 20, 40, 80, 160, 320, 500];
const WORKLOAD_SERVICES: usize = 1000;
/// Idle captured connections per row (each holds two of meshd's
/// descriptors, so 5000 stays under the 20 000 a process may hold).
const IDLE: &[usize] = &[0, 625, 1250, 2500, 5000];
/// HTTP/1.1 keep-alive connections per row.
const CONCURRENCY: &[usize] = &[1, 10, 100, 1000];

/// A table of text cells under a header.
pub struct Table {
    title: &'static str,
    note: &'static str,
    header: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

pub fn run(bench: &Bench) -> anyhow::Result<Vec<Table>> {
    Ok(vec![
        services(bench)?,
        services_json(bench)?,
        workloads(bench)?,
        idle_connections(bench)?,
        concurrency(bench)?,
    ])
}

pub fn print(tables: &[Table]) {
    for table in tables {
        println!("\n### {}\n\n{}\n", table.title, table.note);
        println!("| {} |", table.header.join(" | "));
        println!("|{}", "---|".repeat(table.header.len()));
        for row in &table.rows {
            println!("| {} |", row.join(" | "));
        }
    }
}

// === the config's size ===

/// Service `i`'s VIP and its endpoints' addresses: 10.100/16 and 10.120/16
/// (never routed: nothing connects to them, meshd only maps them).
fn service_yaml(i: usize, moved: bool) -> String {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 1)) + i as u32);
    let endpoints: Vec<String> = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| {
            let n = i * ENDPOINTS_PER_SERVICE + j + usize::from(moved && i == 0 && j == 0) * 60_000;
            let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 120, 0, 1)) + n as u32);
            format!(
                "{{ address: {address}, labels: {{ version: v{} }} }}",
                j % 2
            )
        })
        .collect();
    format!(
        "  - {{ name: s{i}, namespace: scale, vip: {vip}, ports: [{{ port: 80, targetPort: 8080, protocol: http }}], endpoints: [{}] }}\n",
        endpoints.join(", ")
    )
}

/// Workload `i` on the node: a pod cgroup no process is in (it only has
/// to be looked up), an address in 10.130/16.
fn workload_yaml(bed: &Testbed, i: usize) -> String {
    let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 130, 0, 1)) + i as u32);
    format!(
        "  - {{ name: w{i}, namespace: scale, serviceAccount: w{i}, cgroup: {}/scale-w{i}, addresses: [{address}], labels: {{ app: w{i} }} }}\n",
        bed.nodes[0].pod_cgroup
    )
}

/// The node's config with `services` services and, after the test bed's
/// own pods, `workloads` more workloads; service 0's first endpoint moved
/// when `moved`.
fn config(bed: &Testbed, services: usize, workloads: usize, moved: bool) -> String {
    // The test bed's config ends with its pods' workloads list: the extra
    // workloads continue it.
    let mut rest: String = (0..workloads).map(|i| workload_yaml(bed, i)).collect();
    rest.push_str("services:\n");
    for i in 0..services {
        rest.push_str(&service_yaml(i, moved));
    }
    bed.config(&rest)
}

/// `yaml` written as JSON the way meshd-discover writes it: each section
/// on its own line, each item of a list on a line of its own.
fn as_json(yaml: &str) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_yaml::from_str(yaml)?;
    let serde_json::Value::Object(sections) = value else {
        anyhow::bail!("the config is no mapping");
    };
    let sections: Vec<String> = sections
        .iter()
        .map(|(name, section)| match section {
            serde_json::Value::Array(items) => {
                let items: Vec<String> = items.iter().map(|i| format!("    {i}")).collect();
                format!("  {name:?}: [\n{}\n  ]", items.join(",\n"))
            }
            other => format!("  {name:?}: {other}"),
        })
        .collect();
    Ok(format!("{{\n{}\n}}\n", sections.join(",\n")))
}

/// What one reload cost: meshd's own measure, and its memory after.
struct Reload {
    ms: f64,
    rss_mib: f64,
}

/// Writes `text` over meshd's config file and waits for the reload it
/// causes (the `ok` reload count going up); refused reloads fail the bench.
fn reload(bed: &Testbed, meshd: &Meshd, text: &str) -> anyhow::Result<Reload> {
    // One scrape per look: each scrape walks every service, and would
    // compete with the reload it waits for.
    let reloads = |m: &Meshd| {
        let metrics = m.metrics();
        let count = |result| {
            metric_sum(
                &metrics,
                "meshd_config_reloads_total",
                &[("result", result)],
            )
        };
        (count("ok"), count("error"))
    };
    let (before, _) = reloads(meshd);
    // Replaced whole (written beside, then renamed), so the reloader never
    // reads half a file.
    let name = format!("meshd-{}.yaml", bed.nodes[0].name);
    let next = bed.write(&format!("{name}.next"), text);
    std::fs::rename(&next, bed.dir.join(&name))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ok, errors) = reloads(meshd);
        if ok != before {
            break;
        }
        ensure!(errors == 0.0, "a reload was refused:\n{}", meshd.log());
        ensure!(
            Instant::now() < deadline,
            "no reload in 120 s:\n{}",
            meshd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Reload {
        ms: meshd.metric("meshd_config_last_reload_duration_seconds", &[]) * 1000.0,
        rss_mib: rss_kib(meshd.pid()).context("meshd's RSS")? / 1024.0,
    })
}

/// A full reload to each size and a one-endpoint change at it, in one
/// meshd, from `sizes[0]` up; `text(size, moved)` is a size's config.
fn grow(
    bed: &Testbed,
    sizes: &[usize],
    text: impl Fn(usize, bool) -> String,
) -> anyhow::Result<Vec<Vec<String>>> {
    // Each size's full reload comes from the previous size's config (the
    // first from the start-up config with one endpoint moved).
    let mut meshd = bed.start_meshd(&text(sizes[0], true));
    let mut rows = Vec::new();
    for &size in sizes {
        let full_text = text(size, false);
        let full = reload(bed, &meshd, &full_text)?;
        let one = reload(bed, &meshd, &text(size, true))?;
        rows.push(vec![
            size.to_string(),
            format!("{:.1}", full_text.len() as f64 / (1024.0 * 1024.0)),
            format!("{:.0}", full.ms),
            format!("{:.0}", one.ms),
            format!("{:.1}", one.rss_mib),
            format!(
                "{:.1}",
                peak_rss_kib(meshd.pid()).context("meshd's peak RSS")? / 1024.0
            ),
        ]);
        eprintln!("bench: scale {size}: {:?}", rows.last());
    }
    ensure!(
        meshd.terminate(Duration::from_secs(40)).success(),
        "meshd failed:\n{}",
        meshd.log()
    );
    Ok(rows)
}

const GROW_HEADER: &[&str] = &[
    "size",
    "config MiB",
    "full reload ms",
    "one-endpoint change ms",
    "meshd RSS MiB",
    "meshd peak RSS MiB (since start)",
];

fn services(_bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::new(&["client", "server"]);
    let rows = grow(&bed, SERVICES, |n, moved| config(&bed, n, 0, moved))?;
    Ok(Table {
        title: "Scale: services (5 endpoints each), one node",
        note: "A full reload rewrites the file with every service (after the previous, smaller \
               size); the one-endpoint change moves one endpoint of one service. Reload time is \
               meshd's own (`meshd_config_last_reload_duration_seconds`: parse, validate, \
               snapshot, capture map, limits, health checks, swap); the files are checked for \
               changes every second.",
        header: GROW_HEADER,
        rows,
    })
}

fn services_json(_bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::new(&["client", "server"]);
    let rows = grow(&bed, SERVICES, |n, moved| {
        as_json(&config(&bed, n, 0, moved)).expect("the bench's own YAML")
    })?;
    Ok(Table {
        title: "Scale: services (5 endpoints each), one node, the config as JSON",
        note: "As above, the same config written as JSON (YAML's JSON subset, as meshd-discover \
               writes it: one line per service), which meshd reads with serde_json.",
        header: GROW_HEADER,
        rows,
    })
}

fn workloads(_bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::new(&["client", "server"]);
    let rows = grow(&bed, WORKLOADS, |w, moved| {
        config(&bed, WORKLOAD_SERVICES, w, moved)
    })?;
    Ok(Table {
        title: "Scale: workloads on the node, beside 1000 services",
        note: "As above, the size being the node's workloads.",
        header: GROW_HEADER,
        rows,
    })
}

// === connections ===

/// Captured connections through meshd on one node, held open by
/// `meshd-testkit idle`, meshd's memory at each count.
fn idle_connections(bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::new(&["client", "server"]);
    let server = bed.pod("server");
    let echo = format!("{}:7000", server.ip);
    bed.spawn(
        server,
        &bench.testkit,
        &["serve", "--listen", &echo, "--mode", "echo-many"],
    );
    bed.wait_listening(server, echo.parse()?);
    let meshd = bed.start_meshd(&bed.config(&format!(
        "services:\n  - {{ name: echo, vip: 10.96.0.21, ports: [{{ port: 7000, protocol: tcp }}], endpoints: [{{ address: {} }}] }}\n",
        server.ip
    )));
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_kib(meshd.pid()).context("meshd's RSS")?;
    let mut rows = Vec::new();
    for &count in IDLE {
        let rss = if count == 0 {
            base
        } else {
            let mut holder = hold(&bed, bench, count)?;
            let rss = rss_kib(meshd.pid()).context("meshd's RSS")?;
            let _ = holder.kill();
            wait_with_timeout(holder, Duration::from_secs(30), "idle");
            // Let meshd see every connection close before the next row.
            let closed = sys::eventually(Duration::from_secs(30), || {
                meshd.metric("meshd_active_connections", &[]) == 0.0
            });
            ensure!(closed, "connections still open:\n{}", meshd.metrics());
            rss
        };
        let per = (count > 0).then(|| (rss - base) / count as f64);
        rows.push(vec![
            count.to_string(),
            format!("{:.1}", rss / 1024.0),
            per.map_or("–".into(), |kib| format!("{kib:.1}")),
        ]);
        eprintln!("bench: idle {count}: {:?}", rows.last());
    }
    Ok(Table {
        title: "Scale: idle captured connections, one node",
        note: "meshd-testkit idle opens the connections (one round trip each through meshd to \
               an echo server), then holds them; meshd's RSS once all are open. Per \
               connection: above the row with none (each has its upstream leg).",
        header: &["connections", "meshd RSS MiB", "KiB per connection"],
        rows,
    })
}

/// `count` connections to the echo VIP, open and idle until killed.
fn hold(bed: &Testbed, bench: &Bench, count: usize) -> anyhow::Result<Child> {
    let mut child = bed
        .command(
            bed.pod("client"),
            &bench.testkit,
            &[
                "idle",
                "--connect",
                "10.96.0.21:7000",
                "--count",
                &count.to_string(),
                "--seconds",
                "120",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("idle's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(
        line.trim() == format!("open {count}"),
        "meshd-testkit idle: {line:?}"
    );
    Ok(child)
}

/// HTTP/1.1 through meshd across nodes (the bench's `h1` service) and
/// directly, with 1 to 1000 keep-alive connections.
fn concurrency(bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("client")]),
        ("node-b", &[PodSpec::named("server")]),
    ]);
    http::nginx(&bed)?;
    // Direct first: once meshd runs, it captures connections to the
    // server pod too.
    let direct = CONCURRENCY
        .iter()
        .map(|&c| http::wrk(&bed, "http://10.78.0.10:8080/", bench.seconds, c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let services = http::services("10.78.0.10", ", node: node-b");
    let (a, b) = bench.mesh_ca(&bed)?.start_pair(&bed, |_| services.clone());
    let pids = [a.pid(), b.pid()];
    let mut rows = Vec::new();
    for (&connections, direct) in CONCURRENCY.iter().zip(direct) {
        http::wrk(&bed, "http://10.96.0.30/", 1, connections)?;
        let sampler = RssSampler::start(pids.to_vec());
        let meshed = http::wrk(&bed, "http://10.96.0.30/", bench.seconds, connections)?;
        let rss = sampler.stop() / 1024.0;
        let ms = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.2}"));
        rows.push(vec![
            connections.to_string(),
            format!("{:.0}", direct.rps),
            format!("{:.0}", meshed.rps),
            format!("{:.2}", meshed.rps / direct.rps),
            ms(meshed.p50_ms),
            ms(meshed.p99_ms),
            format!("{rss:.1}"),
        ]);
        eprintln!("bench: concurrency {connections}: {:?}", rows.last());
    }
    Ok(Table {
        title: "Scale: concurrent HTTP/1.1 connections, across nodes (full L7, mTLS)",
        note: "wrk, keep-alive, closed loop, through meshd (`http` port) and directly, each \
               measured in the same run; meshd's RSS summed over both nodes, sampled under load.",
        header: &[
            "connections",
            "direct req/s",
            "meshd req/s",
            "× direct",
            "meshd p50 ms",
            "meshd p99 ms",
            "meshd RSS under load MiB (both)",
        ],
        rows,
    })
}
