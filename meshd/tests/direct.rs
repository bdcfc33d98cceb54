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

/// A TCP service on `net` whose endpoint answers HTTP.
fn tcp_service(net: u8) -> String {
    format!(
        "services:
  - name: db
    vip: 10.96.{net}.20
    ports: [{{ port: 9000, protocol: tcp }}]
    endpoints: [{{ address: 127.0.{net}.2, workload: db }}]
"
    )
}

/// Whether a request through `stream` is answered.
async fn answered(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sent = stream
        .write_all(b"GET / HTTP/1.1\r\nhost: db\r\nconnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    sent.is_ok() && matches!(read, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 200")
}

#[tokio::test]
async fn one_source_cannot_take_more_than_its_share_of_a_listener() {
    let _upstream = serve_http("127.0.6.2:9000", |_| Reply::ok("hi")).await;
    let limits = meshd::net::accept::Limits {
        max: 100,
        per_source: 3,
        idle: Duration::from_secs(60),
    };
    let proxy = Proxy::start_with(6, &tcp_service(6), limits).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(proxy.connect("10.96.6.20:9000").await);
    }
    assert!(
        proxy
            .eventually(|t| metric(t, "meshd_active_connections", &[]) == 3.0)
            .await
    );
    let mut fourth = proxy.connect("10.96.6.20:9000").await;
    assert!(
        !answered(&mut fourth).await,
        "a fourth connection was served"
    );
    let shed = [("listener", "outbound"), ("reason", "max_per_source")];
    assert_eq!(
        metric(&proxy.metrics(), "meshd_connections_shed_total", &shed),
        1.0
    );
    // A place given back is taken again.
    let mut first = held.remove(0);
    assert!(answered(&mut first).await);
    drop(first);
    assert!(
        proxy
            .eventually(|t| metric(t, "meshd_active_connections", &[]) == 2.0)
            .await
    );
    let mut again = proxy.connect("10.96.6.20:9000").await;
    assert!(answered(&mut again).await, "a freed place was not taken");
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _upstream = serve_http("127.0.7.2:9000", |_| Reply::ok("hi")).await;
    let limits = meshd::net::accept::Limits {
        max: 100,
        per_source: 100,
        idle: Duration::from_secs(1),
    };
    let proxy = Proxy::start_with(7, &tcp_service(7), limits).await;
    let mut idle = proxy.connect("10.96.7.20:9000").await;
    let mut busy = proxy.connect("10.96.7.20:9000").await;
    // The busy one sends a header line every 300 ms for 2.4 s: never idle
    // for the timeout, while the idle one passes it twice.
    busy.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.write_all(format!("x-tick: {i}\r\n").as_bytes())
            .await
            .unwrap();
    }
    busy.write_all(b"host: db\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), busy.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 200"),
        "the busy connection was cut: {read:?} {:?}",
        String::from_utf8_lossy(&answer)
    );
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection is still open: {read:?}"
    );
    assert_eq!(
        metric(
            &proxy.metrics(),
            "meshd_connections_idle_closed_total",
            &[("listener", "outbound")]
        ),
        1.0
    );
}
