//! The status listeners: `/metrics` on :15020 for Prometheus and
//! `/healthz/ready` on :15021 for the kubelet.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

use crate::{capture::Capture, telemetry::metrics::Metrics};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for {what}: {source}")]
pub struct BindError {
    pub address: SocketAddr,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// What the status endpoints report on.
pub struct StatusInputs {
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub capture: std::sync::OnceLock<Arc<Capture>>,
    pub store: Option<Arc<crate::identity::store::CertStore>>,
    pub ready: AtomicBool,
    /// The proxy's state, for the gauges read at each scrape.
    pub proxy: std::sync::OnceLock<Arc<crate::proxy::ProxyInputs>>,
    pub reload: Arc<crate::admin::ReloadState>,
    /// Samples of this node's series for `/graph`.
    pub graph: std::sync::Mutex<crate::telemetry::graph::History>,
}

/// Samples the series `/graph` reads every `SAMPLE_EVERY`, until `stop`.
pub async fn sample_graph(inputs: Arc<StatusInputs>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use crate::telemetry::graph::{Sample, SAMPLE_EVERY};
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = crate::net::accept::stopped(&mut stop) => return,
        }
        let sampled = inputs.clone();
        // Rendering every series takes a while in a big mesh: off the
        // proxy's threads.
        let sample = tokio::task::spawn_blocking(move || {
            Sample::parse(&crate::telemetry::metrics::render(&sampled.registry))
        })
        .await;
        if let Ok(sample) = sample {
            inputs
                .graph
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(std::time::Instant::now(), sample);
        }
    }
}

impl StatusInputs {
    /// Fills the gauges that are read from the kernel, then renders.
    fn render_metrics(&self) -> String {
        if let Some(capture) = self.capture.get() {
            let stats = capture.stats();
            for (map, entries) in stats.map_entries {
                self.metrics
                    .bpf_map_entries
                    .get_or_create(&crate::telemetry::metrics::MapLabels { map })
                    .set(entries);
            }
            for (event, total) in stats.events {
                self.metrics
                    .bpf_events
                    .get_or_create(&crate::telemetry::metrics::CounterLabels { event })
                    .set(total);
            }
        }
        if let Some(store) = &self.store {
            let now = std::time::SystemTime::now();
            for (identity, cert) in &store.current().by_identity {
                self.metrics
                    .certificate_expiry
                    .get_or_create(&crate::telemetry::metrics::IdentityLabels {
                        identity: identity.uri().clone(),
                    })
                    .set(cert.seconds_left(now));
            }
        }
        if let Some(inputs) = self.proxy.get() {
            self.metrics
                .export_state(&inputs.snapshot.load(), crate::net::clock::now_nanos());
        }
        self.export_process();
        crate::telemetry::metrics::render(&self.registry)
    }
}

impl StatusInputs {
    /// Memory and descriptors, from /proc and the descriptor limit.
    fn export_process(&self) {
        let metrics = &self.metrics;
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            });
        if let Some(kib) = rss {
            metrics.resident_memory.set(kib * 1024);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // Less the descriptor this listing holds.
            metrics.open_fds.set(entries.count() as i64 - 1);
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            metrics.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
    }
}

/// A bound status listener.
pub struct StatusListener {
    listener: TcpListener,
    what: &'static str,
}

impl StatusListener {
    pub async fn bind(address: SocketAddr, what: &'static str) -> Result<Self, BindError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| BindError {
                address,
                what,
                source,
            })?;
        Ok(Self { listener, what })
    }

    /// Serves on a listener handed over by the previous meshd.
    pub fn adopt(
        listener: std::net::TcpListener,
        address: SocketAddr,
        what: &'static str,
    ) -> Result<Self, BindError> {
        let listener = TcpListener::from_std(listener).map_err(|source| BindError {
            address,
            what,
            source,
        })?;
        Ok(Self { listener, what })
    }

    /// A duplicate of the listening socket, for the next meshd.
    pub fn duplicate(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    /// Serves until `stop` turns true, within `limits`. A client gets
    /// `header_timeout` to send each request's headers.
    pub async fn run(
        self,
        inputs: Arc<StatusInputs>,
        limits: crate::net::accept::Limits,
        stop: watch::Receiver<bool>,
        header_timeout: std::time::Duration,
    ) {
        let what = self.what;
        let counters = inputs.metrics.accept_counters(what);
        crate::net::accept::accept_loop(
            self.listener,
            what,
            limits,
            &counters,
            stop,
            std::time::Duration::ZERO,
            move |stream, _| {
                let inputs = inputs.clone();
                async move {
                    let service = service_fn(move |request| {
                        let inputs = inputs.clone();
                        async move { Ok::<_, Infallible>(route(&inputs, what, &request)) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(err) = served {
                        debug!(error = %err, "status connection ended with an error");
                    }
                }
            },
        )
        .await;
    }
}

fn route(
    inputs: &StatusInputs,
    what: &'static str,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if what == "admin" {
        let (code, body) = crate::admin::api::answer(
            inputs,
            request.method(),
            request.uri().path(),
            request.uri().query().unwrap_or(""),
            request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        let mut response = text(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            format!("{body:#}\n"),
        );
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return response;
    }
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let body = inputs.render_metrics();
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        // Liveness: the runtime answers.
        "/healthz/live" => text(StatusCode::OK, "alive\n".into()),
        "/healthz/ready" => {
            if inputs.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
