//! HTTP through meshd: HTTP/1.1 (wrk, keep-alive) and HTTP/2 (h2load,
//! multiplexed) against nginx, on one node and across nodes, each against a
//! direct connection and, across nodes, HAProxy mutual-TLS pairs in TCP
//! mode and in HTTP mode (full L7, like for like with meshd's http ports)
//! measured in the same run; with the proxies' CPU time per 1000 requests
//! and their memory under load and at peak.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{ensure, Context as _};
use meshd_tests::testbed::{Meshd, PodSpec, Testbed};

use super::{cpu_seconds, haproxy_pair, output, peak_rss_kib, Bench, HaproxyMode, Hop, RssSampler};

/// HTTP/1.1 connections and HTTP/2 connections × streams.
const H1_CONNECTIONS: usize = 16;
const H2_CONNECTIONS: &str = "4";
const H2_STREAMS: &str = "16";
/// Requests/s of the fixed-rate latency runs (open loop, one keep-alive
/// connection), their seconds, and how many (the median run by p99 shown).
const FIXED_RATE: u64 = 2000;
const FIXED_SECONDS: u64 = 3;
const FIXED_ROUNDS: usize = 3;

pub struct Table {
    title: &'static str,
    rows: Vec<Row>,
}

struct Row {
    path: &'static str,
    protocol: &'static str,
    /// The median run's, with the lowest and highest of all runs.
    rps: f64,
    rps_range: (f64, f64),
    /// wrk's percentiles (HTTP/1.1) or h2load's mean (HTTP/2), ms.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    mean_ms: Option<f64>,
    cpu_ms_per_1000: Option<f64>,
    /// HTTP/1.1 at a fixed `FIXED_RATE` on one connection: p50 and p99, ms.
    fixed: Option<(f64, f64)>,
    /// The proxies' CPU ms per 1000 requests over those fixed-rate runs:
    /// the cost of a request that nothing is batched with, less subject
    /// than saturated load to how the two cores happen to be shared.
    fixed_cpu_ms_per_1000: Option<f64>,
    rss_mib: Option<f64>,
    /// The processes' summed VmHWM after the run (start-up included).
    peak_mib: Option<f64>,
}

/// One load run's results.
pub struct Load {
    pub requests: f64,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

/// Where one path's clients connect: the HTTP/1.1 and the HTTP/2 server.
struct Urls<'a> {
    h1: &'a str,
    h2: &'a str,
}

pub fn run(bench: &Bench) -> anyhow::Result<Vec<Table>> {
    // Access logging is off in the bench (no `accessLog` section), as it is
    // by default in Istio and Linkerd: a line per request is a cost of its
    // own.
    Ok(vec![same_node(bench)?, cross_node(bench)?])
}

pub fn print(tables: &[Table]) {
    println!(
        "\nHTTP: nginx answering 6 bytes. HTTP/1.1: wrk, {H1_CONNECTIONS} keep-alive connections, \
         closed loop. HTTP/2: h2load, {H2_CONNECTIONS} connections × {H2_STREAMS} streams. \
         meshd's access log off; tracing off but in the rows that say otherwise. \
         Rows \"auto ports\": the same requests on ports declared `auto`, which the \
         destination reports as connections — the second reporter's per-request cost \
         is the difference to the row above them. Proxy CPU and memory: meshd's, or \
         HAProxy's; summed over both nodes across nodes. Each row is the median of \
         `--runs` runs (the other columns that run's), with the range of all runs."
    );
    for table in tables {
        println!("\n### {}\n", table.title);
        println!("| path | protocol | requests/s | range | × direct | p50 ms | p99 ms | mean ms | p50 / p99 ms at {FIXED_RATE}/s (added) | proxy CPU ms per 1000 requests | … at {FIXED_RATE}/s | proxy RSS under load MiB | proxy peak RSS MiB |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let opt = |v: Option<f64>, d: usize| v.map_or("–".to_owned(), |v| format!("{v:.d$}"));
        for row in &table.rows {
            let direct = table.rows.iter().find(|r| r.protocol == row.protocol);
            let fixed = match (row.fixed, direct.and_then(|d| d.fixed)) {
                (Some((p50, p99)), Some((d50, d99))) => {
                    format!(
                        "{p50:.2} / {p99:.2} (+{:.2} / +{:.2})",
                        p50 - d50,
                        p99 - d99
                    )
                }
                _ => "–".to_owned(),
            };
            let direct = direct.map_or(row.rps, |r| r.rps);
            println!(
                "| {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.path,
                row.protocol,
                row.rps,
                row.rps_range.0,
                row.rps_range.1,
                row.rps / direct,
                opt(row.p50_ms, 2),
                opt(row.p99_ms, 2),
                opt(row.mean_ms, 2),
                fixed,
                opt(row.cpu_ms_per_1000, 1),
                opt(row.fixed_cpu_ms_per_1000, 1),
                opt(row.rss_mib, 1),
                opt(row.peak_mib, 1),
            );
        }
    }
}

/// nginx in the server pod: HTTP/1.1 on :8080, :8082 and :8084, HTTP/2
/// (h2c) on :8081, :8083 and :8085 (the others for the `auto` and `tcp`
/// services: the
/// destination tells a stream's port by its target port).
pub fn nginx(bed: &Testbed) -> anyhow::Result<()> {
    let server = bed.pod("server");
    let dir = bed.dir.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let ip = server.ip;
    let conf = format!(
        "user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 10000000;
  server {{ listen {ip}:8080; listen {ip}:8082; listen {ip}:8084; location / {{ return 200 \"hello\\n\"; }} }}
  server {{ listen {ip}:8081 http2; listen {ip}:8083 http2; listen {ip}:8085 http2; location / {{ return 200 \"hello\\n\"; }} }}
}}
"
    );
    let path = bed.write("nginx.conf", &conf);
    bed.spawn(
        server,
        Path::new("nginx"),
        &["-c", &path.display().to_string(), "-e", "stderr"],
    );
    for port in [8080, 8081, 8082, 8083, 8084, 8085] {
        bed.wait_listening(server, format!("{ip}:{port}").parse()?);
    }
    Ok(())
}

pub fn services(server_ip: &str, node: &str) -> String {
    format!(
        "services:
  - {{ name: h1, vip: 10.96.0.30, ports: [{{ port: 80, targetPort: 8080, protocol: http }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}
  - {{ name: h2, vip: 10.96.0.31, ports: [{{ port: 80, targetPort: 8081, protocol: http2 }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}
  - {{ name: h1-auto, vip: 10.96.0.32, ports: [{{ port: 80, targetPort: 8082, protocol: auto }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}
  - {{ name: h2-auto, vip: 10.96.0.33, ports: [{{ port: 80, targetPort: 8083, protocol: auto }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}
  - {{ name: h1-tcp, vip: 10.96.0.34, ports: [{{ port: 80, targetPort: 8084, protocol: tcp }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}
  - {{ name: h2-tcp, vip: 10.96.0.35, ports: [{{ port: 80, targetPort: 8085, protocol: tcp }}], endpoints: [{{ address: {server_ip}{node}, serviceAccount: server }}] }}
"
    )
}

/// An OTLP/HTTP sink on node-a (nginx answering every export `200`), for
/// the tracing rows: what meshd spends making and exporting spans, without
/// a collector's own CPU in the way.
fn span_sink(bed: &Testbed) -> anyhow::Result<()> {
    let dir = bed.dir.join("sink");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 64m;
  server {{ listen 0.0.0.0:4318; location / {{ default_type application/x-protobuf; return 200 \"\"; }} }}
}}
"
    );
    let path = bed.write("sink.conf", &conf);
    bed.spawn_on_node(
        0,
        Path::new("nginx"),
        &["-c", &path.display().to_string(), "-e", "stderr"],
    );
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

fn same_node(bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::new(&["client", "server"]);
    nginx(&bed)?;
    let mut rows = measure(
        bench,
        &bed,
        "direct",
        &Urls {
            h1: "http://10.77.0.11:8080/",
            h2: "http://10.77.0.11:8081/",
        },
        &[],
    )?;
    let mut meshd = bed.start_meshd(&bed.config(&services("10.77.0.11", "")));
    std::thread::sleep(Duration::from_millis(500));
    rows.extend(measure(bench, &bed, "meshd", &meshed(), &[meshd.pid()])?);
    ensure!(
        meshd.terminate(Duration::from_secs(40)).success(),
        "meshd failed:\n{}",
        meshd.log()
    );
    Ok(Table {
        title: "HTTP, same node, pod → pod",
        rows,
    })
}

fn meshed() -> Urls<'static> {
    Urls {
        h1: "http://10.96.0.30/",
        h2: "http://10.96.0.31/",
    }
}

fn cross_node(bench: &Bench) -> anyhow::Result<Table> {
    let bed = Testbed::nodes(&[
        ("node-a", &[PodSpec::named("client")]),
        ("node-b", &[PodSpec::named("server")]),
    ]);
    nginx(&bed)?;
    let mut rows = measure(
        bench,
        &bed,
        "direct",
        &Urls {
            h1: "http://10.78.0.10:8080/",
            h2: "http://10.78.0.10:8081/",
        },
        &[],
    )?;
    let mesh = bench.mesh_ca(&bed)?;
    let services = services("10.78.0.10", ", node: node-b");
    let (a, b) = mesh.start_pair(&bed, |_| services.clone());
    rows.extend(measure(
        bench,
        &bed,
        "meshd mTLS",
        &meshed(),
        &pids(&[&a, &b]),
    )?);
    let auto = Urls {
        h1: "http://10.96.0.32/",
        h2: "http://10.96.0.33/",
    };
    rows.extend(measure(
        bench,
        &bed,
        "meshd mTLS, auto ports (destination: connections only)",
        &auto,
        &pids(&[&a, &b]),
    )?);
    // The same requests on `tcp` ports: meshd's L4 path, bytes relayed
    // through the tunnel and counted as connections (ztunnel's kind of row).
    let tcp = Urls {
        h1: "http://10.96.0.34/",
        h2: "http://10.96.0.35/",
    };
    rows.extend(measure(
        bench,
        &bed,
        "meshd mTLS, tcp ports (L4 only)",
        &tcp,
        &pids(&[&a, &b]),
    )?);
    drop((a, b));
    // One worker thread each (proxy.workerThreads: 1) against the default
    // of one per CPU — when the meshd measured has the setting (a build
    // from before it, given with --bin-dir, does not).
    let one = format!("{services}proxy: {{ workerThreads: 1 }}\n");
    let checked = Command::new(&bench.meshd)
        .args(["check", "--config"])
        .arg(bed.write("one-thread.yaml", &bed.config_with(0, &mesh.identity, &one)))
        .output()?;
    if checked.status.success() {
        let (a, b) = mesh.start_pair(&bed, |_| one.clone());
        rows.extend(measure(
            bench,
            &bed,
            "meshd mTLS, 1 worker thread each",
            &meshed(),
            &pids(&[&a, &b]),
        )?);
        drop((a, b));
    } else {
        eprintln!("bench: this meshd has no proxy.workerThreads: its row is left out");
    }
    // Tracing on: spans made for every request, a share of them sampled
    // and exported (OTLP/HTTP) to a sink.
    span_sink(&bed)?;
    for (path, sampling) in [
        ("meshd mTLS, tracing on, 1 % sampled", "0.01"),
        ("meshd mTLS, tracing on, 100 % sampled", "1"),
    ] {
        // Each node's meshd exports to the sink on node-a.
        let sink = ["10.77.0.1", "192.168.77.1"];
        let (a, b) = mesh.start_pair(&bed, |node| {
            format!(
                "{services}tracing: {{ endpoint: 'http://{}:4318', protocol: http, sampling: {sampling} }}\n",
                sink[node]
            )
        });
        rows.extend(measure(bench, &bed, path, &meshed(), &pids(&[&a, &b]))?);
    }
    let hops = |h1, h2| {
        [
            Hop {
                name: "h1",
                port: h1,
                hop: h1 + 500,
                target: "10.78.0.10:8080",
                h2c: false,
            },
            Hop {
                name: "h2",
                port: h2,
                hop: h2 + 500,
                target: "10.78.0.10:8081",
                h2c: true,
            },
        ]
    };
    for (mode, h1, h2, path) in [
        (HaproxyMode::Tcp, 6002, 6003, "HAProxy mTLS pair, TCP mode"),
        (
            HaproxyMode::Http,
            6004,
            6005,
            "HAProxy mTLS pair, HTTP mode (full L7, h2 between the nodes)",
        ),
    ] {
        let pair = haproxy_pair(&bed, &bench.meshd, &mesh.dir, mode, &hops(h1, h2))?;
        let (h1, h2) = (
            format!("http://10.77.0.1:{h1}/"),
            format!("http://10.77.0.1:{h2}/"),
        );
        let urls = Urls { h1: &h1, h2: &h2 };
        rows.extend(measure(bench, &bed, path, &urls, &pair)?);
    }
    Ok(Table {
        title: "HTTP across nodes, pod → pod (CPU and memory summed over both nodes' proxies)",
        rows,
    })
}

fn pids(meshds: &[&Meshd]) -> Vec<u32> {
    meshds.iter().map(|m| m.pid()).collect()
}

/// The CPU seconds `pids` have used.
fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p).unwrap_or(0.0)).sum()
}

/// Both protocols over one path; CPU and memory are `pids`' (none for a
/// direct path).
fn measure(
    bench: &Bench,
    bed: &Testbed,
    path: &'static str,
    urls: &Urls<'_>,
    pids: &[u32],
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (protocol, url) in [("HTTP/1.1", urls.h1), ("HTTP/2", urls.h2)] {
        eprintln!("bench: {path} {protocol}");
        // Warm up connections and balancer state, unmeasured.
        load(bed, protocol, url, 1)?;
        let mut runs = (0..bench.runs)
            .map(|_| measure_once(bench, bed, path, protocol, url, pids))
            .collect::<anyhow::Result<Vec<Row>>>()?;
        runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let range = (runs[0].rps, runs[runs.len() - 1].rps);
        let mut median = runs.swap_remove(runs.len() / 2);
        median.rps_range = range;
        if protocol == "HTTP/1.1" {
            let before = cpu(pids);
            median.fixed = Some(fixed_rate(bench, bed, url)?);
            let requests = (FIXED_RATE * FIXED_SECONDS) as f64 * FIXED_ROUNDS as f64;
            median.fixed_cpu_ms_per_1000 =
                (!pids.is_empty()).then(|| (cpu(pids) - before) * 1000.0 / (requests / 1000.0));
        }
        rows.push(median);
    }
    Ok(rows)
}

/// One timed run of one protocol over one path.
fn measure_once(
    bench: &Bench,
    bed: &Testbed,
    path: &'static str,
    protocol: &'static str,
    url: &str,
    pids: &[u32],
) -> anyhow::Result<Row> {
    let sampler = RssSampler::start(pids.to_vec());
    let before = cpu(pids);
    let run = load(bed, protocol, url, bench.seconds)?;
    let used = cpu(pids) - before;
    let rss = sampler.stop() / 1024.0;
    let peak: f64 = pids.iter().map(|p| peak_rss_kib(*p).unwrap_or(0.0)).sum();
    let measured = !pids.is_empty();
    Ok(Row {
        path,
        protocol,
        rps: run.rps,
        rps_range: (run.rps, run.rps),
        p50_ms: run.p50_ms,
        p99_ms: run.p99_ms,
        mean_ms: run.mean_ms,
        cpu_ms_per_1000: measured.then(|| used * 1000.0 / (run.requests / 1000.0)),
        fixed: None,
        fixed_cpu_ms_per_1000: None,
        rss_mib: measured.then_some(rss),
        peak_mib: measured.then_some(peak / 1024.0),
    })
}

/// Latency of HTTP/1.1 requests at `FIXED_RATE` on one keep-alive
/// connection, open loop (`meshd-testkit rr --http`: counted from when each
/// request was due); p50 and p99 in ms of the median run by p99.
fn fixed_rate(bench: &Bench, bed: &Testbed, url: &str) -> anyhow::Result<(f64, f64)> {
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let connect = if authority.contains(':') {
        authority
    } else {
        format!("{authority}:80")
    };
    let (rate, seconds) = (FIXED_RATE.to_string(), FIXED_SECONDS.to_string());
    let args = [
        "rr",
        "--http",
        "--connect",
        &connect,
        "--rate",
        &rate,
        "--seconds",
        &seconds,
    ];
    let mut runs = (0..FIXED_ROUNDS)
        .map(|_| {
            let out = output(bed, &bench.testkit, &args, FIXED_SECONDS + 30)?;
            let field = |name: &str| {
                out.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|us| us / 1000.0)
                    .with_context(|| format!("no {name} in {out}"))
            };
            Ok((field("p50_us=")?, field("p99_us=")?))
        })
        .collect::<anyhow::Result<Vec<(f64, f64)>>>()?;
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(runs[runs.len() / 2])
}

fn load(bed: &Testbed, protocol: &str, url: &str, seconds: u64) -> anyhow::Result<Load> {
    if protocol == "HTTP/1.1" {
        return wrk(bed, url, seconds, H1_CONNECTIONS);
    }
    let duration = seconds.to_string();
    let out = output(
        bed,
        Path::new("h2load"),
        &["-c", H2_CONNECTIONS, "-m", H2_STREAMS, "-D", &duration, url],
        seconds + 30,
    )?;
    let done = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .with_context(|| format!("no request summary in {out}"))?;
    ensure!(
        done.contains(" 0 failed, 0 errored"),
        "h2load saw errors:\n{out}"
    );
    let requests = done
        .split(", ")
        .find_map(|f| f.strip_suffix(" succeeded"))
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no success count in {done}"))?;
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|f| f.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no req/s in {out}"))?;
    let mean_ms = out
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(millis);
    Ok(Load {
        requests,
        rps,
        p50_ms: None,
        p99_ms: None,
        mean_ms,
    })
}

/// HTTP/1.1 from the client pod: wrk with `connections` keep-alive
/// connections (on up to two threads), closed loop, for `seconds`.
pub fn wrk(bed: &Testbed, url: &str, seconds: u64, connections: usize) -> anyhow::Result<Load> {
    let d = format!("{seconds}s");
    let c = connections.to_string();
    let t = connections.min(2).to_string();
    let out = output(
        bed,
        Path::new("wrk"),
        &["-t", &t, "-c", &c, "-d", &d, "--latency", url],
        seconds + 30,
    )?;
    ensure!(
        !out.contains("Non-2xx") && !out.contains("Socket errors"),
        "wrk saw errors:\n{out}"
    );
    let requests = out
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.to_owned())
        })
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no request count in {out}"))?;
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in {out}"))?;
    let percentile = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|v| millis(v.trim()))
    };
    Ok(Load {
        requests,
        rps,
        p50_ms: percentile("50%"),
        p99_ms: percentile("99%"),
        mean_ms: None,
    })
}

/// "1.23ms", "850.00us", "1.20s" in milliseconds.
fn millis(value: &str) -> Option<f64> {
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else {
        (value.strip_suffix('s')?, 1000.0)
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}
