//! The in-process harness: a meshd outbound listener on loopback fed by a
//! table of original destinations, loopback upstreams, and an HTTP client.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn, HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use meshd::{
    net::accept::Limits,
    proxy::{Outbound, ProxyInputs},
    state::{
        ids::{Captured, ClientAddr, OrigDstAddr, OrigDstSource},
        snapshot::Snapshot,
    },
    telemetry::metrics::{render, Metrics},
};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// Original destinations by client address, as capture would record them.
#[derive(Default)]
struct Table(Mutex<HashMap<SocketAddrV4, Captured>>);

impl OrigDstSource for Table {
    fn take(&self, client: ClientAddr) -> Option<Captured> {
        self.0.lock().expect("table").remove(&client.0)
    }
}

/// A meshd outbound listener serving one config, in this process.
pub struct Proxy {
    outbound: SocketAddr,
    table: Arc<Table>,
    registry: Registry,
    client: Ipv4Addr,
    _stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Serves `services` (YAML: services, policies, …) for test `net`: the
    /// client workload `client` is `127.0.<net>.1`.
    pub async fn start(net: u8, services: &str) -> Self {
        let limits = Limits {
            max: 1024,
            per_source: 1024,
            idle: Duration::from_secs(60),
        };
        Self::start_with(net, services, limits).await
    }

    /// As `start`, the outbound listener taking connections within `limits`.
    pub async fn start_with(net: u8, services: &str, limits: Limits) -> Self {
        let client = Ipv4Addr::new(127, 0, net, 1);
        let yaml = format!(
            "node: {{ name: node-a, captureAddress: 127.0.0.1, podCgroup: /pods }}
workloads:
  - {{ name: client, serviceAccount: client, addresses: [{client}] }}
{services}"
        );
        let config = meshd::config::load_str("mesh.yaml", &yaml)
            .unwrap_or_else(|e| panic!("test config: {e}"));
        let snapshot = Snapshot::new(Arc::new(config), None);
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let table = Arc::new(Table::default());
        let (stop, stopped) = watch::channel(false);
        let inputs = Arc::new(ProxyInputs {
            snapshot: ArcSwap::new(Arc::new(snapshot)),
            orig_dst: table.clone(),
            metrics,
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: limits.idle,
            buffer_size: 16 * 1024,
            pool: None,
            store: None,
            upstreams: Default::default(),
            stop: stopped.clone(),
            tracer: None,
            access_log: None,
        });
        let outbound = Outbound::bind(SocketAddrV4::new(Ipv4Addr::new(127, 0, net, 100), 0))
            .await
            .expect("bind the outbound listener");
        let address = outbound.local_addr().expect("bound address");
        let task = tokio::spawn(outbound.run(inputs, limits, stopped, Duration::from_secs(1)));
        Self {
            outbound: address,
            table,
            registry,
            client,
            _stop: stop,
            task,
        }
    }

    /// A connection from the client workload to `dst`, delivered to meshd
    /// as capture would deliver it.
    pub async fn connect(&self, dst: &str) -> TcpStream {
        let dst: SocketAddrV4 = dst.parse().expect("destination");
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((self.client, 0)))
            .expect("bind the client");
        let SocketAddr::V4(local) = socket.local_addr().expect("local address") else {
            unreachable!("bound to IPv4")
        };
        self.table.0.lock().expect("table").insert(
            local,
            Captured {
                dst: OrigDstAddr(dst),
                cgroup: None,
            },
        );
        socket
            .connect(self.outbound)
            .await
            .expect("connect to meshd")
    }

    /// The metrics as `/metrics` renders them.
    pub fn metrics(&self) -> String {
        render(&self.registry)
    }

    /// Waits (up to 5 s) until `check` holds for the metrics.
    pub async fn eventually(&self, check: impl Fn(&str) -> bool) -> bool {
        for _ in 0..100 {
            if check(&self.metrics()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a test upstream answers.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: &'static str,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: &'static str) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
            delay: Duration::ZERO,
        }
    }
}

/// An HTTP/1.1 upstream on `address` answering every request with
/// `reply(request)`. Stops when dropped.
pub async fn serve_http(
    address: &str,
    reply: impl Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
) -> Upstream {
    let listener = TcpListener::bind(address).await.expect("bind the upstream");
    let reply = Arc::new(reply);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let reply = reply.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let answer = reply(&request);
                    async move {
                        tokio::time::sleep(answer.delay).await;
                        let mut response = Response::new(Full::new(Bytes::from(answer.body)));
                        *response.status_mut() = answer.status.try_into().expect("status");
                        for (name, value) in answer.headers {
                            response
                                .headers_mut()
                                .insert(name, value.parse().expect("header value"));
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream(task)
}

/// A running test upstream.
pub struct Upstream(JoinHandle<()>);

impl Drop for Upstream {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET path` through meshd to `dst`, on a connection of its own: (status,
/// headers, body).
pub async fn http_get(proxy: &Proxy, dst: &str, path: &str) -> (u16, HeaderMap, String) {
    let stream = proxy.connect(dst).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake with meshd");
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, dst)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("meshd answered in time")
        .expect("an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The sum of the series of `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
