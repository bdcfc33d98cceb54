//! `meshd run`: start-up in an order that never half-starts, serving, and a
//! graceful stop.
//!
//! Start-up: config → host checks → join meshd's cgroup → bind every
//! listener → load and attach eBPF (capture goes live last) → ready.
//! SIGTERM/SIGINT: stop capturing new connections, close the listener,
//! drain in-flight connections up to `proxy.drainTimeout`, detach, exit 0.

#[allow(unsafe_code)]
pub mod handover;
pub mod host;
pub mod listeners;
pub mod reload;
#[allow(unsafe_code)]
pub mod trim;

use listeners::Listeners;

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
};

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    admin::{BindError, StatusInputs},
    app::host::HostError,
    capture::{Capture, CaptureError, CaptureSpec},
    config::{BpfLogLevel, Config, ConfigErrors},
    hbone::pool::Pool,
    identity::{
        ca::{Authority, CaError},
        store::{self, CertStore},
        tls,
    },
    proxy::inbound::BindError as InboundBindError,
    proxy::{OutboundError, ProxyInputs},
    state::snapshot::Snapshot,
    telemetry::metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error(transparent)]
    Status(#[from] BindError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Inbound(#[from] InboundBindError),
    #[error("node.identity.issuer: {0}")]
    Issuer(#[from] CaError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error("worker {0} ended unexpectedly")]
    WorkerEnded(usize),
    #[error(transparent)]
    Handover(#[from] crate::app::handover::HandoverError),
    #[error("tracing: {0}")]
    Tracing(#[from] crate::telemetry::spans::ExporterError),
    #[error("accessLog: {0}")]
    AccessLog(#[from] crate::telemetry::access::OpenError),
    #[error(
        "node.identity.trustBundle {0:?} holds no root certificate: this node would trust no peer"
    )]
    NoTrust(PathBuf),
}

/// The certificate store `node.identity` asks for, loaded once.
fn cert_store(config: &Config) -> Result<Option<Arc<CertStore>>, StartError> {
    let Some(identity) = &config.node.identity else {
        return Ok(None);
    };
    let source = match (&identity.certificates, &identity.issuer) {
        (Some(dir), _) => store::Source::Files { dir: dir.clone() },
        (None, Some(ca)) => {
            let mut identities: Vec<_> = config
                .workloads
                .iter()
                .map(|w| w.identity.clone())
                .collect();
            identities.sort();
            identities.dedup();
            store::Source::Issuer {
                ca: Box::new(Authority::load(ca)?),
                identities: std::sync::Mutex::new(identities),
                ttl: identity.ttl,
            }
        }
        (None, None) => return Ok(None),
    };
    let store = CertStore::new(
        source,
        identity.trust_bundle.clone(),
        &config.mesh.trust_domain,
        tls::provider(),
    );
    store.refresh();
    if store.current().roots.is_empty() {
        let bundle = identity.trust_bundle.clone().unwrap_or_default();
        return Err(StartError::NoTrust(bundle));
    }
    Ok(Some(Arc::new(store)))
}

/// Command-line settings that override the config.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub bpf_log_level: Option<BpfLogLevel>,
}

/// Host checks and joining meshd's own cgroup. Runs before the async
/// runtime starts so that every thread is created inside the cgroup.
pub struct Prepared {
    paths: Vec<PathBuf>,
    /// The files as read, shown by the admin API.
    sources: Vec<crate::config::Source>,
    overrides: Overrides,
    config: Arc<Config>,
    /// The JSON texts `config`'s services were read from.
    texts: crate::config::ServiceTexts,
    cgroup_root: PathBuf,
    /// How the kubelet places pod cgroups on this node.
    cgroup_driver: crate::config::CgroupDriver,
    proxy_cgroup_id: u64,
    /// `proxy.workerThreads`, or the CPUs meshd's cgroup may use.
    worker_threads: usize,
}

pub fn prepare(paths: &[PathBuf], overrides: &Overrides) -> Result<Prepared, StartError> {
    let sources = crate::config::read_sources(paths)?;
    let (mut config, texts) = crate::config::reload_sources(&sources, None)?;
    if let Some(level) = overrides.bpf_log_level {
        config.proxy.bpf_log_level = level;
    }
    let cgroup_root = host::preflight()?;
    let proxy_dir = host::cgroup_dir(&cgroup_root, &config.node.proxy_cgroup);
    if host::enter_host_cgroup_namespace(&config.node.host_cgroup_namespace)? {
        info!("entered the host's cgroup namespace");
    }
    let started_in = host::own_cgroup(&cgroup_root);
    let proxy_cgroup_id = host::join_cgroup(&proxy_dir)?;
    let cgroup_driver = config.node.cgroup_driver.decided().unwrap_or_else(|| {
        let pods = host::cgroup_dir(&cgroup_root, &config.node.pod_cgroup);
        host::detect_cgroup_driver(&pods, &config.node.pod_cgroup)
    });
    info!(
        driver = cgroup_driver.name(),
        "pod cgroups placed as the kubelet's cgroup driver does"
    );
    config.place_pods(cgroup_driver);
    let worker_threads = config.proxy.worker_threads.unwrap_or_else(|| {
        let cgroups: Vec<PathBuf> = started_in.into_iter().chain([proxy_dir]).collect();
        host::usable_cpus(&cgroup_root, &cgroups)
    });
    Ok(Prepared {
        paths: paths.to_vec(),
        sources,
        overrides: overrides.clone(),
        config: Arc::new(config),
        texts,
        cgroup_root,
        cgroup_driver,
        proxy_cgroup_id,
        worker_threads,
    })
}

pub async fn run(prepared: Prepared) -> Result<(), StartError> {
    let config = prepared.config.clone();
    let proxy = &config.proxy;
    let mesh = Snapshot::new(config.clone(), None);

    // A meshd already running on this node hands its listeners over;
    // otherwise bind everything, before anything is served or captured.
    let mut taken = crate::app::handover::request(&config.node.handover_socket)?;
    let store = cert_store(&config)?;
    let listeners = Listeners::open(&config, &mesh, store.is_some(), &mut taken).await?;
    let handed = listeners.duplicates();
    let Listeners {
        outbound,
        metrics: metrics_listener,
        readiness: ready_listener,
        admin: admin_listener,
        inbound,
    } = listeners;
    let outbound_addr = outbound.address();
    let mut terminate =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut interrupt =
        tokio::signal::unix::signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::with_series_cap(
        &mut registry,
        proxy.max_series_per_metric,
    ));
    metrics.sk_msg_enabled.set(i64::from(proxy.sk_msg));
    let status = Arc::new(StatusInputs {
        registry,
        metrics: metrics.clone(),
        capture: std::sync::OnceLock::new(),
        store: store.clone(),
        ready: Default::default(),
        proxy: std::sync::OnceLock::new(),
        reload: Default::default(),
        graph: std::sync::Mutex::new(crate::telemetry::graph::History::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(crate::admin::listeners::sample_graph(
        status.clone(),
        stop_rx.clone(),
    ));
    let status_tasks = [
        tokio::spawn(metrics_listener.run(
            status.clone(),
            limits(proxy, proxy.connection_limits.metrics),
            stop_rx.clone(),
            proxy.header_read_timeout,
        )),
        tokio::spawn(ready_listener.run(
            status.clone(),
            limits(proxy, proxy.connection_limits.readiness),
            stop_rx.clone(),
            proxy.header_read_timeout,
        )),
        tokio::spawn(admin_listener.run(
            status.clone(),
            limits(proxy, proxy.connection_limits.admin),
            stop_rx.clone(),
            proxy.header_read_timeout,
        )),
    ];
    status.reload.record_files(&prepared.sources);

    let pod_cgroup = host::cgroup_dir(&prepared.cgroup_root, &config.node.pod_cgroup);
    let capture = start_capture(&prepared, &mesh, outbound_addr)?;
    let capture = Arc::new(capture);
    let _ = status.capture.set(capture.clone());

    let mesh = Arc::new(mesh);
    let checkers = Arc::new(crate::proxy::health::HealthCheckers::default());
    let marks: Arc<dyn crate::state::ids::OrigDstSource> = capture.clone();
    checkers.sync(&mesh, &metrics, &marks);
    let tracer = match &config.tracing {
        Some(spec) => {
            let tracer = crate::telemetry::spans::Tracer::start(
                spec,
                &config.node.name,
                metrics.span_counters(),
            )?;
            info!(endpoint = %spec.endpoint, protocol = ?spec.protocol, sampling = spec.sampling, "exporting spans");
            Some(tracer)
        }
        None => None,
    };
    let access_log = match &config.access_log {
        Some(spec) => {
            let log =
                crate::telemetry::access::AccessLog::start(spec, metrics.access_log_counters())?;
            info!(path = %spec.path.display(), format = ?spec.format, "writing the access log");
            Some(log)
        }
        None => None,
    };
    let inputs = Arc::new(ProxyInputs {
        snapshot: ArcSwap::new(mesh),
        orig_dst: capture.clone(),
        metrics: metrics.clone(),
        connect_timeout: proxy.connect_timeout,
        header_read_timeout: proxy.header_read_timeout,
        idle_timeout: proxy.idle_timeout,
        buffer_size: proxy.buffer_size,
        pool: store.clone().map(|store| {
            Pool::new(
                store,
                metrics.clone(),
                proxy.inbound_port,
                proxy.connect_timeout,
            )
        }),
        store: store.clone(),
        upstreams: Default::default(),
        stop: stop_rx.clone(),
        tracer,
        access_log,
    });
    let _ = status.proxy.set(inputs.clone());
    tokio::spawn(sweep_upstreams(inputs.upstreams.clone(), stop_rx.clone()));
    let mut workers = serve_on_workers(
        &prepared,
        outbound,
        inbound,
        &inputs,
        &capture,
        stop_rx.clone(),
    )?;
    if let Some(store) = store.clone() {
        tokio::spawn(refresh_certificates(store, stop_rx.clone()));
    }
    let reloader = crate::app::reload::Reloader {
        paths: prepared.paths.clone(),
        cgroup_driver: prepared.cgroup_driver,
        bpf_log_level: prepared.overrides.bpf_log_level,
        inputs: inputs.clone(),
        capture: capture.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        state: status.reload.clone(),
        checkers,
        texts: prepared.texts.clone(),
    };
    tokio::spawn(reloader.run(stop_rx.clone()));

    status.ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    // Serving: the meshd we took over from may stop accepting and drain.
    if let Some(taken) = taken {
        taken.ready();
    }
    let (handed_tx, mut handed_rx) = tokio::sync::oneshot::channel();
    let handover_path = config.node.handover_socket.clone();
    tokio::spawn(async move {
        crate::app::handover::serve(handover_path, handed).await;
        let _ = handed_tx.send(());
    });
    info!(
        node = %config.node.name,
        outbound = %outbound_addr,
        pods = %pod_cgroup.display(),
        services = config.services.len(),
        sk_msg = proxy.sk_msg,
        workers = workers.count(),
        "meshd ready"
    );

    let mut handed_over = false;
    let mut ended = None;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: stopping"),
        _ = interrupt.recv() => info!("SIGINT: stopping"),
        Ok(()) = &mut handed_rx => { info!("handed over to a new meshd: draining"); handed_over = true; }
        // The others stop and drain as on a signal; meshd exits failed.
        worker = workers.one_ended() => {
            warn!(worker, "a worker ended unexpectedly: stopping");
            ended = Some(worker);
        }
    };
    status.ready.store(false, Ordering::Release);
    metrics.ready.set(0);

    // New connections stop being captured before the listener closes, so
    // none is redirected to a closed port — unless a new meshd serves the
    // same listener now: then capture stays exactly as it is.
    if !handed_over {
        capture.stop_capture();
    }
    drop(inputs);
    let _ = stop_tx.send(true);
    workers.join().await;
    for task in status_tasks {
        let _ = task.await;
    }
    drop(status);
    if handed_over {
        capture.keep_pins();
    } else {
        // No meshd takes over: capture ends with this one.
        capture.remove_pins();
    }
    drop(capture);
    info!("stopped");
    match ended {
        Some(worker) => Err(StartError::WorkerEnded(worker)),
        None => Ok(()),
    }
}

/// Serves the outbound and tunnel listeners on `proxy.workerThreads`
/// workers, each accepting on a duplicate of both sockets and beating the
/// capture's heartbeat (so the heartbeat goes stale only when no worker
/// runs); every worker stops and drains when `stop` turns true.
fn serve_on_workers(
    prepared: &Prepared,
    outbound: crate::proxy::Outbound,
    inbound: Option<crate::proxy::inbound::Inbound>,
    inputs: &Arc<ProxyInputs>,
    capture: &Arc<Capture>,
    stop: watch::Receiver<bool>,
) -> Result<crate::net::workers::Workers, StartError> {
    use crate::net::accept::Caps;
    let proxy = &prepared.config.proxy;
    let drain = proxy.drain_timeout;
    let outbound_address = outbound.address();
    let outbound_caps = Caps::from(limits(proxy, proxy.connection_limits.outbound));
    let inbound_caps = Caps::from(limits(proxy, proxy.connection_limits.inbound));
    let handshakes =
        crate::proxy::inbound::Handshakes::new(proxy.max_handshakes, proxy.handshake_timeout);
    if let Some(inbound) = &inbound {
        info!(address = %inbound.address(), "accepting tunnels");
    }
    // Each worker's own duplicates (as the hand-over makes them), made
    // here so a failure stops start-up; the originals close after.
    let mut sockets = Vec::new();
    for _ in 0..prepared.worker_threads.max(1) {
        let outbound = outbound.duplicate().map_err(StartError::Workers)?;
        let inbound = match &inbound {
            Some(inbound) => Some((
                inbound.duplicate().map_err(StartError::Workers)?,
                inbound.address(),
            )),
            None => None,
        };
        sockets.push((std::net::TcpListener::from(outbound), inbound));
    }
    drop((outbound, inbound));
    let mut sockets = sockets.into_iter();
    crate::net::workers::Workers::start(prepared.worker_threads, |worker| {
        let (outbound, inbound) = sockets.next().expect("a pair of sockets per worker");
        let (inputs, capture, stop) = (inputs.clone(), capture.clone(), stop.clone());
        let (outbound_caps, inbound_caps, handshakes) = (
            outbound_caps.clone(),
            inbound_caps.clone(),
            handshakes.clone(),
        );
        move || async move {
            tokio::spawn(heartbeat(capture, stop.clone()));
            let outbound = match crate::proxy::Outbound::adopt(outbound, outbound_address) {
                Ok(outbound) => outbound,
                Err(err) => {
                    warn!(worker, error = %err, "cannot serve the outbound listener");
                    return;
                }
            };
            let inbound = match inbound
                .map(|(fd, address)| crate::proxy::inbound::Inbound::adopt(fd.into(), address))
                .transpose()
            {
                Ok(inbound) => inbound,
                Err(err) => {
                    warn!(worker, error = %err, "cannot serve the tunnel listener");
                    return;
                }
            };
            let outbound = outbound.run(inputs.clone(), outbound_caps, stop.clone(), drain);
            let inbound = async {
                if let Some(inbound) = inbound {
                    inbound
                        .run(
                            inputs.clone(),
                            inbound_caps,
                            handshakes,
                            stop.clone(),
                            drain,
                        )
                        .await
                }
            };
            tokio::join!(outbound, inbound);
        }
    })
    .map_err(StartError::Workers)
}

/// Loads and attaches the eBPF programs for `config`, capturing into the
/// outbound listener at `outbound`.
fn start_capture(
    prepared: &Prepared,
    snapshot: &Snapshot,
    outbound: SocketAddrV4,
) -> Result<Capture, StartError> {
    let config = &prepared.config;
    let proxy = &config.proxy;
    let pod_cgroup = host::cgroup_dir(&prepared.cgroup_root, &config.node.pod_cgroup);
    let proxy_cgroup = host::cgroup_dir(&prepared.cgroup_root, &config.node.proxy_cgroup);
    let spec = CaptureSpec {
        cgroup_mount: &prepared.cgroup_root,
        pod_cgroup: &pod_cgroup,
        proxy_cgroup: &proxy_cgroup,
        proxy_cgroup_id: prepared.proxy_cgroup_id,
        proxy: outbound,
        sk_msg: proxy.sk_msg,
        trusted: [
            Some(config.node.capture_address),
            snapshot.own_tunnel_address(),
        ]
        .into_iter()
        .flatten()
        .collect(),
        log_level: proxy.bpf_log_level,
        pin_dir: &config.node.pin_dir,
        heartbeat_timeout: proxy.fail_timeout,
        fail_closed: proxy.fail_mode == crate::config::FailMode::Closed,
    };
    Ok(Capture::start(&spec, snapshot)?)
}

/// What one listener takes, from its `proxy.connectionLimits` entry.
fn limits(
    proxy: &crate::config::ProxySpec,
    limit: crate::config::ConnectionLimit,
) -> crate::net::accept::Limits {
    crate::net::accept::Limits {
        max: limit.max,
        per_source: limit.per_source,
        idle: proxy.idle_timeout,
    }
}

/// Upstream HTTP/1.1 connections idle longer than this are closed.
const UPSTREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Closes idle and dead upstream connections now and then.
async fn sweep_upstreams(
    upstreams: Arc<crate::proxy::http::upstream::Upstreams>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(UPSTREAM_IDLE / 4);
    loop {
        tokio::select! {
            _ = tick.tick() => upstreams.sweep(UPSTREAM_IDLE),
            _ = crate::net::accept::stopped(&mut stop) => return,
        }
    }
}

/// How often meshd tells its programs it is alive.
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Beats until meshd stops; each worker runs one. Workers too wedged to
/// run this task let the heartbeat go stale, and the programs apply
/// `proxy.failMode`.
async fn heartbeat(capture: Arc<Capture>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => capture.beat(),
            _ = crate::net::accept::stopped(&mut stop) => return,
        }
    }
}

/// Re-reads changed certificate files and renews issued certificates.
async fn refresh_certificates(store: Arc<CertStore>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(store::REFRESH_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::net::accept::stopped(&mut stop) => return,
        }
        let store = store.clone();
        let _ = tokio::task::spawn_blocking(move || store.refresh()).await;
    }
}
