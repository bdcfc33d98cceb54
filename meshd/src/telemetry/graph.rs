//! The service dependency graph, from live traffic: workloads (and services
//! that name no workload) as nodes, one edge per caller, callee, service,
//! protocol and security — with its request count, rate, error rate and
//! latency over a window.
//!
//! Two sources give the same graph: this node's own metrics (`GET /graph`
//! on the admin API, from samples of Istio's series taken every
//! `SAMPLE_EVERY`), and Prometheus (`meshd graph --prometheus`, the whole
//! mesh, with Kiali's graph queries). Either way an edge is counted once:
//! from its source's report where there is one (the caller is in the
//! mesh), else from its destination's (a caller outside it).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How often this node's series are sampled for `/graph`.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The longest window `/graph` answers for.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// Istio's labels an edge is told by (Kiali's grouping, and the security).
pub const EDGE_LABELS: &[&str] = &[
    "reporter",
    "source_workload_namespace",
    "source_workload",
    "destination_service",
    "destination_workload_namespace",
    "destination_workload",
    "request_protocol",
    "connection_security_policy",
];

/// What tells one edge from another, as reported by one side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    pub reporter: String,
    pub source_namespace: String,
    pub source_workload: String,
    pub destination_service: String,
    pub destination_namespace: String,
    pub destination_workload: String,
    pub protocol: String,
    pub security: String,
}

impl EdgeKey {
    /// From a series' labels; `None` when one is missing.
    pub fn of(labels: &BTreeMap<String, String>) -> Option<Self> {
        let get = |name: &str| labels.get(name).cloned();
        Some(Self {
            reporter: get("reporter")?,
            source_namespace: get("source_workload_namespace")?,
            source_workload: get("source_workload")?,
            destination_service: get("destination_service")?,
            destination_namespace: get("destination_workload_namespace")?,
            destination_workload: get("destination_workload")?,
            protocol: get("request_protocol")?,
            security: get("connection_security_policy")?,
        })
    }

    fn without_reporter(&self) -> Self {
        Self {
            reporter: String::new(),
            ..self.clone()
        }
    }
}

/// What one edge carried, as one side reported it: HTTP and gRPC requests,
/// or TCP connections and bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgeStats {
    /// Requests (connections for TCP) since the counters began.
    pub total: f64,
    pub per_second: f64,
    /// The share of requests answered 5xx, over the window.
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// TCP: bytes received from the caller per second.
    pub bytes_per_second: f64,
}

/// The graph as `/graph` and `meshd graph` give it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Graph {
    /// The window rates and latencies are over, in seconds.
    pub window_seconds: u64,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// `namespace/workload`, `service:HOST` or `unknown`.
    pub id: String,
    /// `workload`, `service` (no workload known behind it) or `unknown`
    /// (a caller outside the mesh).
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub service: String,
    /// `http`, `grpc` or `tcp`.
    pub protocol: String,
    pub mtls: bool,
    /// Which side's report it is from: `source`, or `destination` for a
    /// caller outside the mesh.
    pub reporter: String,
    /// Requests (TCP: connections) since the counters began.
    pub total: f64,
    pub per_second: f64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub bytes_per_second: f64,
}

impl Graph {
    /// The graph of `reports`: each edge from its source's report where
    /// there is one, else its destination's.
    pub fn of(reports: HashMap<EdgeKey, EdgeStats>, window: Duration) -> Self {
        let mut chosen: BTreeMap<EdgeKey, (EdgeKey, EdgeStats)> = BTreeMap::new();
        for (key, stats) in reports {
            // A series that carried nothing (yet) is no edge.
            if stats.total <= 0.0 && stats.per_second <= 0.0 && stats.bytes_per_second <= 0.0 {
                continue;
            }
            let edge = key.without_reporter();
            let better = match chosen.get(&edge) {
                None => true,
                Some((held, _)) => held.reporter != "source" && key.reporter == "source",
            };
            if better {
                chosen.insert(edge, (key, stats));
            }
        }
        let mut nodes = BTreeMap::new();
        let mut edges = Vec::new();
        for (key, stats) in chosen.into_values() {
            let source = if key.source_workload == "unknown" {
                node("unknown", "unknown", "unknown", "unknown")
            } else {
                let id = format!("{}/{}", key.source_namespace, key.source_workload);
                node(&id, "workload", &key.source_namespace, &key.source_workload)
            };
            let destination = if key.destination_workload == "unknown" {
                let id = format!("service:{}", key.destination_service);
                node(&id, "service", "unknown", &key.destination_service)
            } else {
                let id = format!("{}/{}", key.destination_namespace, key.destination_workload);
                let (ns, name) = (&key.destination_namespace, &key.destination_workload);
                node(&id, "workload", ns, name)
            };
            edges.push(Edge {
                source: source.id.clone(),
                destination: destination.id.clone(),
                service: key.destination_service,
                protocol: key.protocol,
                mtls: key.security == "mutual_tls",
                reporter: key.reporter,
                total: stats.total,
                per_second: stats.per_second,
                error_rate: stats.error_rate,
                p50_ms: stats.p50_ms,
                p99_ms: stats.p99_ms,
                bytes_per_second: stats.bytes_per_second,
            });
            nodes.insert(source.id.clone(), source);
            nodes.insert(destination.id.clone(), destination);
        }
        edges.sort_by(|a: &Edge, b: &Edge| {
            (&a.source, &a.destination, &a.service, &a.protocol).cmp(&(
                &b.source,
                &b.destination,
                &b.service,
                &b.protocol,
            ))
        });
        Self {
            window_seconds: window.as_secs(),
            nodes: nodes.into_values().collect(),
            edges,
        }
    }

    /// A table, one edge a line.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<28} {:<28} {:<40} {:<5} {:<4} {:>9} {:>9} {:>6} {:>9} {:>9}\n",
            "SOURCE",
            "DESTINATION",
            "SERVICE",
            "PROTO",
            "MTLS",
            "TOTAL",
            "PER-SEC",
            "ERR%",
            "P50-MS",
            "P99-MS"
        );
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        for e in &self.edges {
            let _ = writeln!(
                out,
                "{:<28} {:<28} {:<40} {:<5} {:<4} {:>9} {:>9.2} {:>6.1} {:>9} {:>9}",
                e.source,
                e.destination,
                e.service,
                e.protocol,
                if e.mtls { "yes" } else { "no" },
                e.total.round(),
                e.per_second,
                e.error_rate * 100.0,
                ms(e.p50_ms),
                ms(e.p99_ms)
            );
        }
        if self.edges.is_empty() {
            out.push_str("(no traffic)\n");
        }
        let _ = writeln!(out, "rates over the last {}s", self.window_seconds);
        out
    }

    /// Graphviz: `meshd graph --format dot | dot -Tsvg > mesh.svg`.
    /// Plaintext edges are dashed, failing ones red.
    pub fn dot(&self) -> String {
        let mut out = String::from(
            "digraph mesh {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
        );
        for n in &self.nodes {
            let shape = match n.kind.as_str() {
                "service" => ", shape=ellipse",
                "unknown" => ", shape=diamond",
                _ => "",
            };
            let label = if n.kind == "workload" {
                format!("{}\\n{}", quoted(&n.name), quoted(&n.namespace))
            } else {
                quoted(&n.name)
            };
            let _ = writeln!(out, "  \"{}\" [label=\"{label}\"{shape}];", quoted(&n.id));
        }
        for e in &self.edges {
            let style = if e.mtls { "solid" } else { "dashed" };
            let color = if e.error_rate > 0.0 { "red" } else { "black" };
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [label=\"{}\", style={style}, color={color}];",
                quoted(&e.source),
                quoted(&e.destination),
                quoted(&e.summary()).replace('\n', "\\n"),
            );
        }
        out.push_str("}\n");
        out
    }

    /// Mermaid, for a Markdown page: `flowchart LR`.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        let index: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            let label = if n.kind == "workload" {
                format!("{} ({})", n.name, n.namespace)
            } else {
                n.name.clone()
            };
            let _ = writeln!(out, "  n{i}[\"{}\"]", mermaid_text(&label));
        }
        for e in &self.edges {
            let (Some(from), Some(to)) = (
                index.get(e.source.as_str()),
                index.get(e.destination.as_str()),
            ) else {
                continue;
            };
            let arrow = if e.mtls { "-->" } else { "-.->" };
            let _ = writeln!(
                out,
                "  n{from} {arrow}|\"{}\"| n{to}",
                mermaid_text(&e.summary().replace('\n', ", "))
            );
        }
        out
    }
}

impl Edge {
    /// `http mTLS · 20 total · 0.33/s · 0.0% errors · p50 1.2 ms · p99 4.5 ms`.
    fn summary(&self) -> String {
        let mut s = format!(
            "{}{}\n{} {}",
            self.protocol,
            if self.mtls { " mTLS" } else { "" },
            self.total.round(),
            if self.protocol == "tcp" {
                "conns"
            } else {
                "reqs"
            }
        );
        let _ = write!(s, ", {:.2}/s", self.per_second);
        if self.protocol != "tcp" {
            let _ = write!(s, ", {:.1}% err", self.error_rate * 100.0);
        }
        if let (Some(p50), Some(p99)) = (self.p50_ms, self.p99_ms) {
            let _ = write!(s, "\np50 {p50:.1} ms, p99 {p99:.1} ms");
        }
        s
    }
}

fn node(id: &str, kind: &str, namespace: &str, name: &str) -> Node {
    Node {
        id: id.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// For a DOT string: `"` and `\` escaped (names come from the config, but
/// the output must stay DOT whatever they are).
fn quoted(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn mermaid_text(s: &str) -> String {
    s.replace('"', "#quot;")
}

// === this node's samples ===

/// What Istio's series said of every edge at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    edges: HashMap<EdgeKey, Counters>,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    requests: f64,
    errors: f64,
    /// Cumulative duration buckets: (upper bound in ms, count).
    buckets: Vec<(f64, f64)>,
    connections: f64,
    received_bytes: f64,
}

impl Sample {
    /// Reads Istio's series from a Prometheus text exposition.
    pub fn parse(text: &str) -> Self {
        let mut sample = Self::default();
        for line in text.lines() {
            // Only the four series the graph reads get their labels parsed.
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let wanted = matches!(
                name,
                "istio_requests_total"
                    | "istio_request_duration_milliseconds_bucket"
                    | "istio_tcp_connections_opened_total"
                    | "istio_tcp_received_bytes_total"
            );
            if !wanted {
                continue;
            }
            let Some((name, labels, value)) = series(line) else {
                continue;
            };
            let Some(key) = EdgeKey::of(&labels) else {
                continue;
            };
            let counters = sample.edges.entry(key).or_default();
            match name {
                "istio_requests_total" => {
                    counters.requests += value;
                    if labels
                        .get("response_code")
                        .is_some_and(|c| c.starts_with('5'))
                    {
                        counters.errors += value;
                    }
                }
                "istio_request_duration_milliseconds_bucket" => {
                    let le = labels
                        .get("le")
                        .map_or(f64::INFINITY, |le| le.parse().unwrap_or(f64::INFINITY));
                    match counters.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, count)) => *count += value,
                        None => counters.buckets.push((le, value)),
                    }
                }
                "istio_tcp_connections_opened_total" => counters.connections += value,
                _ => counters.received_bytes += value,
            }
        }
        for counters in sample.edges.values_mut() {
            counters.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        sample
    }

    /// Each edge's stats between `earlier` and this sample, `elapsed` apart.
    pub fn since(&self, earlier: &Self, elapsed: Duration) -> HashMap<EdgeKey, EdgeStats> {
        let seconds = elapsed.as_secs_f64().max(1.0);
        let none = Counters::default();
        self.edges
            .iter()
            .map(|(key, now)| {
                let then = earlier.edges.get(key).unwrap_or(&none);
                let tcp = key.protocol == "tcp";
                let requests = now.requests - then.requests;
                let buckets: Vec<(f64, f64)> = now
                    .buckets
                    .iter()
                    .map(|(le, count)| {
                        let before = then
                            .buckets
                            .iter()
                            .find(|(b, _)| b == le)
                            .map_or(0.0, |(_, c)| *c);
                        (*le, count - before)
                    })
                    .collect();
                let stats = EdgeStats {
                    total: if tcp { now.connections } else { now.requests },
                    per_second: if tcp {
                        (now.connections - then.connections) / seconds
                    } else {
                        requests / seconds
                    },
                    error_rate: if requests > 0.0 {
                        (now.errors - then.errors) / requests
                    } else {
                        0.0
                    },
                    p50_ms: quantile(0.5, &buckets),
                    p99_ms: quantile(0.99, &buckets),
                    bytes_per_second: (now.received_bytes - then.received_bytes) / seconds,
                };
                (key.clone(), stats)
            })
            .collect()
    }
}

/// Prometheus's `histogram_quantile` over cumulative buckets: linear
/// within the bucket the rank falls in; `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last().map(|(_, c)| *c)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let fraction = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// One sample line of the text exposition: name, labels, value.
fn series(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, BTreeMap::new(), value.trim().parse().ok()?));
        }
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.char_indices();
    let end = loop {
        // name="value", ...}
        let (start, c) = chars.next()?;
        if c == '}' {
            break start;
        }
        if c == ',' || c == ' ' {
            continue;
        }
        let eq = rest[start..].find('=')? + start;
        let label = rest[start..eq].to_owned();
        while chars.next()?.0 < eq + 1 {}
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        }
        labels.insert(label, value);
    };
    let value = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// This node's recent samples, one every `SAMPLE_EVERY`, for `MAX_WINDOW`.
#[derive(Default)]
pub struct History {
    samples: VecDeque<(Instant, Sample)>,
}

impl History {
    /// Starts with an empty sample: every counter begins at zero.
    pub fn new() -> Self {
        let mut samples = VecDeque::new();
        samples.push_back((Instant::now(), Sample::default()));
        Self { samples }
    }

    pub fn push(&mut self, at: Instant, sample: Sample) {
        self.samples.push_back((at, sample));
        let keep = (MAX_WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize + 2;
        while self.samples.len() > keep {
            self.samples.pop_front();
        }
    }

    /// The graph from `now` (a fresh sample) over `window`: against the
    /// newest sample at least `window` old, else the oldest there is.
    pub fn graph(&self, now: &Sample, window: Duration) -> Graph {
        let at = Instant::now();
        let base = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| at.duration_since(*t) >= window)
            .or(self.samples.front());
        let stats = match base {
            Some((t, sample)) => now.since(sample, at.duration_since(*t)),
            None => now.since(&Sample::default(), window),
        };
        Graph::of(stats, window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP istio_requests_total Total requests
# TYPE istio_requests_total counter
istio_requests_total{reporter="source",source_workload="a",source_workload_namespace="shop",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="mutual_tls",response_code="200"} 18
istio_requests_total{reporter="source",source_workload="a",source_workload_namespace="shop",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="mutual_tls",response_code="503"} 2
istio_requests_total{reporter="destination",source_workload="a",source_workload_namespace="shop",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="mutual_tls",response_code="200"} 18
istio_requests_total{reporter="destination",source_workload="unknown",source_workload_namespace="unknown",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="none",response_code="200"} 5
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="a",source_workload_namespace="shop",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="mutual_tls",response_code="200",le="1.0"} 10
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="a",source_workload_namespace="shop",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="mutual_tls",response_code="200",le="5.0"} 20
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="a",source_workload_namespace="shop",destination_service="b.shop.svc.cluster.local",destination_workload="b",destination_workload_namespace="shop",request_protocol="http",connection_security_policy="mutual_tls",response_code="200",le="+Inf"} 20
istio_tcp_connections_opened_total{reporter="source",source_workload="a",source_workload_namespace="shop",destination_service="db.shop.svc.cluster.local",destination_workload="unknown",destination_workload_namespace="unknown",request_protocol="tcp",connection_security_policy="none",note="a \"quoted\" value"} 3
"#;

    #[test]
    fn the_exposition_gives_one_edge_per_caller_and_callee_counted_once() {
        let sample = Sample::parse(EXPOSITION);
        let graph = Graph::of(
            sample.since(&Sample::default(), Duration::from_secs(10)),
            Duration::from_secs(10),
        );
        let edges: Vec<(&str, &str, &str, f64)> = graph
            .edges
            .iter()
            .map(|e| {
                (
                    e.source.as_str(),
                    e.destination.as_str(),
                    e.reporter.as_str(),
                    e.total,
                )
            })
            .collect();
        assert_eq!(
            edges,
            [
                ("shop/a", "service:db.shop.svc.cluster.local", "source", 3.0),
                ("shop/a", "shop/b", "source", 20.0),
                ("unknown", "shop/b", "destination", 5.0),
            ]
        );
        let ab = &graph.edges[1];
        assert!(ab.mtls);
        assert!((ab.error_rate - 0.1).abs() < 1e-9, "{}", ab.error_rate);
        assert!((ab.per_second - 2.0).abs() < 1e-9);
        // Ranks 10 and 19.8 of 20: the top of the first bucket, then
        // 98 % of the way through the second.
        assert_eq!(ab.p50_ms, Some(1.0));
        assert!((ab.p99_ms.unwrap() - 4.92).abs() < 1e-9, "{:?}", ab.p99_ms);
        assert_eq!(graph.nodes.len(), 4);
    }

    #[test]
    fn rates_are_over_the_window_and_totals_since_the_start() {
        let earlier = Sample::parse(EXPOSITION);
        let later = Sample::parse(&EXPOSITION.replace("} 18\n", "} 38\n"));
        let stats = later.since(&earlier, Duration::from_secs(20));
        let ab = stats
            .iter()
            .find(|(k, _)| k.reporter == "source" && k.destination_workload == "b")
            .map(|(_, s)| s)
            .expect("edge");
        assert_eq!(ab.total, 40.0);
        assert!((ab.per_second - 1.0).abs() < 1e-9);
        assert_eq!(ab.error_rate, 0.0);
    }

    #[test]
    fn dot_and_mermaid_name_every_edge_and_escape_names() {
        let mut graph = Graph::of(
            Sample::parse(EXPOSITION).since(&Sample::default(), Duration::from_secs(10)),
            Duration::from_secs(10),
        );
        graph.nodes[0].name = "odd\"name".into();
        let dot = graph.dot();
        assert!(dot.starts_with("digraph mesh {"), "{dot}");
        assert!(dot.contains("\"shop/a\" -> \"shop/b\""), "{dot}");
        assert!(dot.contains("odd\\\"name"), "{dot}");
        assert_eq!(dot.matches(" -> ").count(), 3);
        let mermaid = graph.mermaid();
        assert_eq!(
            mermaid.matches("-->").count() + mermaid.matches("-.->").count(),
            3
        );
        assert!(!mermaid.contains("odd\"name"), "{mermaid}");
    }

    #[test]
    fn quantiles_follow_prometheus() {
        assert_eq!(quantile(0.5, &[]), None);
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.5, &[(10.0, 4.0), (f64::INFINITY, 4.0)]),
            Some(5.0)
        );
        // Beyond the last finite bound: that bound.
        assert_eq!(
            quantile(0.99, &[(10.0, 1.0), (f64::INFINITY, 4.0)]),
            Some(10.0)
        );
    }
}
