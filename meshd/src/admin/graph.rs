//! `meshd graph`: the dependency graph of this node (from its admin API's
//! `GET /graph`) or of the whole mesh (from Prometheus, with Kiali's graph
//! queries: Kiali's grouping, plus `reporter` and
//! `connection_security_policy` so that each edge is counted once and its
//! security shown).

use std::{collections::HashMap, time::Duration};

use anyhow::{anyhow, bail, Context as _};

use crate::telemetry::graph::{EdgeKey, EdgeStats, Graph, EDGE_LABELS};

/// The labels Kiali's graph queries group `istio_requests_total` by
/// (kiali/kiali `graph/telemetry/istio/istio.go`).
const KIALI_HTTP_GROUPING: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";

/// The graph of the node whose admin API is at `admin`, over `window`.
pub fn from_admin(admin: std::net::SocketAddr, window: Duration) -> anyhow::Result<Graph> {
    let body = super::api::admin_get(admin, &format!("/graph?window={}s", window.as_secs()))?;
    serde_json::from_str(&body).with_context(|| format!("malformed /graph answer from {admin}"))
}

/// The mesh-wide graph from the Prometheus at `url` (`http://host:port`,
/// with a path prefix if it serves under one), over `window`.
pub fn from_prometheus(url: &str, window: Duration) -> anyhow::Result<Graph> {
    let prometheus = Prometheus::parse(url)?;
    let w = format!("{}s", window.as_secs().max(1));
    let edge = EDGE_LABELS.join(",");
    let http = format!("reporter,connection_security_policy,{KIALI_HTTP_GROUPING}");
    let mut stats: HashMap<EdgeKey, EdgeStats> = HashMap::new();
    let mut errors: HashMap<EdgeKey, f64> = HashMap::new();
    // Requests: totals, and the rate with each response code.
    for (key, value) in prometheus.query(&format!("sum(istio_requests_total) by ({http})"))? {
        stats.entry(key.0).or_default().total += value;
    }
    let rate = format!("sum(rate(istio_requests_total[{w}])) by ({http})");
    for (key, value) in prometheus.query(&rate)? {
        stats.entry(key.0.clone()).or_default().per_second += value;
        if key.1.starts_with('5') {
            *errors.entry(key.0).or_default() += value;
        }
    }
    for (q, set) in [
        (0.5, (|s, v| s.p50_ms = Some(v)) as fn(&mut EdgeStats, f64)),
        (0.99, |s, v| s.p99_ms = Some(v)),
    ] {
        let query = format!(
            "histogram_quantile({q}, sum(rate(istio_request_duration_milliseconds_bucket[{w}])) by (le,{edge}))"
        );
        for (key, value) in prometheus.query(&query)? {
            if let Some(s) = stats.get_mut(&key.0).filter(|_| !value.is_nan()) {
                set(s, value);
            }
        }
    }
    // TCP: connections, and bytes from the caller (Kiali's TCP edges).
    let tcp = "request_protocol=\"tcp\"";
    let queries = [
        format!("sum(istio_tcp_connections_opened_total{{{tcp}}}) by ({edge})"),
        format!("sum(rate(istio_tcp_connections_opened_total{{{tcp}}}[{w}])) by ({edge})"),
        format!("sum(rate(istio_tcp_received_bytes_total{{{tcp}}}[{w}])) by ({edge})"),
    ];
    for (i, query) in queries.iter().enumerate() {
        for (key, value) in prometheus.query(query)? {
            let s = stats.entry(key.0).or_default();
            match i {
                0 => s.total += value,
                1 => s.per_second += value,
                _ => s.bytes_per_second += value,
            }
        }
    }
    for (key, s) in &mut stats {
        if s.per_second > 0.0 {
            s.error_rate = errors.get(key).copied().unwrap_or(0.0) / s.per_second;
        }
    }
    Ok(Graph::of(stats, window))
}

/// A Prometheus server's HTTP API.
struct Prometheus {
    address: std::net::SocketAddr,
    host: String,
    prefix: String,
}

impl Prometheus {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("{url:?}: give an http:// URL (https is not supported)"))?;
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let address = std::net::ToSocketAddrs::to_socket_addrs(host)
            .with_context(|| format!("{url:?}: cannot resolve {host:?} (give host:port)"))?
            .next()
            .ok_or_else(|| anyhow!("{url:?}: {host:?} has no address"))?;
        let prefix = prefix.trim_end_matches('/');
        Ok(Self {
            address,
            host: host.to_owned(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("/{prefix}")
            },
        })
    }

    /// An instant query's samples, keyed by edge and response code.
    fn query(&self, promql: &str) -> anyhow::Result<Vec<((EdgeKey, String), f64)>> {
        let path = format!("{}/api/v1/query?query={}", self.prefix, url_encode(promql));
        let body = super::api::http_get(self.address, &self.host, &path)
            .with_context(|| format!("querying Prometheus at {}", self.address))?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered no JSON: {body:.200}"))?;
        if json["status"] != "success" {
            bail!("Prometheus refused {promql}: {}", json["error"]);
        }
        let mut samples = Vec::new();
        for series in json["data"]["result"].as_array().into_iter().flatten() {
            let labels: std::collections::BTreeMap<String, String> = series["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            let (Some(key), Some(value)) = (EdgeKey::of(&labels), value) else {
                continue;
            };
            let code = labels.get("response_code").cloned().unwrap_or_default();
            samples.push(((key, code), value));
        }
        Ok(samples)
    }
}

/// A query string's value, percent-encoded.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_urls_are_checked() {
        let p = Prometheus::parse("http://127.0.0.1:9090/").expect("parses");
        assert_eq!((p.address.port(), p.prefix.as_str()), (9090, ""));
        let p = Prometheus::parse("http://127.0.0.1:9090/prom/").expect("parses");
        assert_eq!(p.prefix, "/prom");
        assert!(Prometheus::parse("https://127.0.0.1:9090").is_err());
        assert!(Prometheus::parse("http://127.0.0.1").is_err());
        assert_eq!(
            url_encode("a{b=\"c\"} [1m]"),
            "a%7Bb%3D%22c%22%7D%20%5B1m%5D"
        );
    }
}
