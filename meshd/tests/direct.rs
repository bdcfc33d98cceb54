//! The in-process tier: meshd's outbound listener, snapshot and HTTP
//! stages on loopback, with original destinations from a table instead of
//! the eBPF maps. No root, no kernel programs: what does not need capture
//! is tested here; what does stays in the black-box suite (`tests/`).
//!
//! Each test has its own loopback /24 (`127.0.N.0`): the client is
//! `127.0.N.1`, endpoints `127.0.N.2…`, so tests run in parallel.

mod direct {
    pub mod harness;
}

use std::time::Duration;

use direct::harness::{http_get, metric, serve_http, Proxy, Reply};

#[tokio::test]
async fn an_upstream_cannot_set_meshds_response_flag() {
    let _upstream = serve_http("127.0.1.2:8080", |_| Reply {
        status: 200,
        headers: vec![("x-meshd-response-flags", "RBAC")],
        body: "spoofed",
        delay: Duration::ZERO,
    })
    .await;
    let proxy = Proxy::start(
        1,
        "services:
  - name: web
    vip: 10.96.1.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 127.0.1.2, workload: web }]
",
    )
    .await;
    let (status, headers, body) = http_get(&proxy, "10.96.1.20:80", "/").await;
    assert_eq!((status, &*body), (200, "spoofed"));
    assert!(
        !headers.contains_key("x-meshd-response-flags"),
        "an upstream spoke for meshd: {headers:?}"
    );
    let text = proxy.metrics();
    let ok = [("response_code", "200"), ("response_flags", "-")];
    assert_eq!(metric(&text, "istio_requests_total", &ok), 1.0, "{text}");
    let spoofed = [("response_flags", "RBAC")];
    assert_eq!(
        metric(&text, "istio_requests_total", &spoofed),
        0.0,
        "{text}"
    );
}

#[tokio::test]
async fn meshds_own_answers_carry_their_flag_in_the_label_and_the_header() {
    let _slow = serve_http("127.0.2.2:8080", |_| Reply {
        delay: Duration::from_secs(5),
        ..Reply::ok("late")
    })
    .await;
    let proxy = Proxy::start(
        2,
        "services:
  - name: web
    vip: 10.96.2.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 127.0.2.2, workload: web }]
    timeout: 200ms
    routes:
      - match: { path: { prefix: /api } }
        to: [{ weight: 1 }]
",
    )
    .await;
    let (status, headers, _) = http_get(&proxy, "10.96.2.20:80", "/api/x").await;
    assert_eq!(status, 504);
    assert_eq!(headers["x-meshd-response-flags"], "UT");
    let (status, headers, _) = http_get(&proxy, "10.96.2.20:80", "/other").await;
    assert_eq!(status, 404);
    assert_eq!(headers["x-meshd-response-flags"], "NR");
    let text = proxy.metrics();
    for (code, flag) in [("504", "UT"), ("404", "NR")] {
        let labels = [("response_code", code), ("response_flags", flag)];
        assert_eq!(
            metric(&text, "istio_requests_total", &labels),
            1.0,
            "{text}"
        );
    }
}

#[tokio::test]
async fn retries_move_to_another_endpoint_and_are_counted() {
    let _failing = serve_http("127.0.3.2:8080", |_| Reply {
        status: 503,
        ..Reply::ok("down")
    })
    .await;
    let _healthy = serve_http("127.0.3.3:8080", |_| Reply::ok("up")).await;
    let proxy = Proxy::start(
        3,
        "services:
  - name: web
    vip: 10.96.3.20
    ports: [{ port: 80, targetPort: 8080, protocol: http }]
    endpoints: [{ address: 127.0.3.2, workload: a }, { address: 127.0.3.3, workload: b }]
    loadBalancer: round-robin
    retries: { maxRetries: 1, retryOn: [5xx] }
",
    )
    .await;
    for _ in 0..4 {
        let (status, _, body) = http_get(&proxy, "10.96.3.20:80", "/").await;
        assert_eq!((status, &*body), (200, "up"));
    }
    let text = proxy.metrics();
    let retried = metric(&text, "meshd_retries_total", &[("reason", "5xx")]);
    assert_eq!(
        retried, 2.0,
        "round robin sends every other request to the failing one: {text}"
    );
    // The request is labelled with the endpoint that answered.
    let labels = [("destination_workload", "b"), ("response_code", "200")];
    assert_eq!(
        metric(&text, "istio_requests_total", &labels),
        4.0,
        "{text}"
    );
}

#[tokio::test]
async fn an_rbac_refused_tcp_connection_is_counted_with_its_flag() {
    let _echo = serve_http("127.0.4.2:9000", |_| Reply::ok("never")).await;
    let proxy = Proxy::start(
        4,
        "services:
  - name: db
    vip: 10.96.4.20
    ports: [{ port: 9000, protocol: tcp }]
    endpoints: [{ address: 127.0.4.2, workload: db }]
policies:
  - name: no-client
    target: { service: default/db }
    action: deny
    from: [{ principals: [cluster.local/ns/default/sa/client] }]
",
    )
    .await;
    let mut stream = proxy.connect("10.96.4.20:9000").await;
    let mut buf = [0u8; 16];
    let read = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a denied connection got bytes: {read:?}"
    );
    let text = proxy.metrics();
    let refused = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "db"),
        ("response_flags", "RBAC"),
    ];
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
    ] {
        assert_eq!(metric(&text, name, &refused), 1.0, "{name}: {text}");
    }
    assert_eq!(
        metric(&text, "meshd_active_connections", &[]),
        0.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_tcp_connection_over_the_limit_is_refused_and_counted() {
    let _upstream = serve_http("127.0.5.2:9000", |_| Reply::ok("hi")).await;
    let proxy = Proxy::start(
        5,
        "services:
  - name: db
    vip: 10.96.5.20
    ports: [{ port: 9000, protocol: tcp }]
    endpoints: [{ address: 127.0.5.2, workload: db }]
    circuitBreaker: { maxConnections: 1 }
",
    )
    .await;
    let held = proxy.connect("10.96.5.20:9000").await;
    // The first is relayed (counted active) before the second arrives.
    assert!(
        proxy
            .eventually(|t| metric(t, "meshd_active_connections", &[]) == 1.0)
            .await
    );
    let mut second = proxy.connect("10.96.5.20:9000").await;
    let mut buf = [0u8; 4];
    let read = tokio::io::AsyncReadExt::read(&mut second, &mut buf).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let text = proxy.metrics();
    let shed = [("response_flags", "UO")];
    assert_eq!(
        metric(&text, "istio_tcp_connections_closed_total", &shed),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshd_circuit_breaker_rejections_total",
            &[("limit", "connections")]
        ),
        1.0
    );
    drop(held);
}
