//! Config hot reload. The config files are re-read every second (their
//! contents, so Kubernetes ConfigMap symlink swaps are seen like any edit)
//! and on SIGHUP. A changed config is validated exactly as at start-up and
//! applied at once: a new snapshot, the kernel's capture map brought in
//! line with it, certificates for new identities, health checks for its
//! endpoints. What meshd learned at run time — endpoint health, ejections,
//! latency, breaker counts, budgets, rate-limit buckets — carries over to
//! the new snapshot for every service and endpoint still configured. A config that fails validation — or changes what
//! only a restart can change — is refused: the error (file, line, field) is
//! logged and kept for the admin API, counted, and the last good config
//! keeps serving. Connections already established are never touched: one
//! to an endpoint that a reload removed finishes normally.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use crate::{
    capture::Capture,
    config::{BpfLogLevel, Config, ConfigErrors, Source},
    identity::store::CertStore,
    proxy::ProxyInputs,
    state::snapshot::Snapshot,
    telemetry::metrics::{Metrics, ResultLabels},
};

/// How often the files are checked for changes.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(
        "{0} changed: meshd applies that only at start-up; restart it (the running config is unchanged)"
    )]
    NeedsRestart(&'static str),
    #[error("updating the capture map: {0}")]
    Capture(#[from] crate::capture::CaptureError),
    #[error("internal error while applying the config (please report it): {0}")]
    Panicked(String),
}

/// Everything a reload needs.
pub struct Reloader {
    pub paths: Vec<PathBuf>,
    /// How pod cgroups are placed on this node (detected at start-up).
    pub cgroup_driver: crate::config::CgroupDriver,
    pub bpf_log_level: Option<BpfLogLevel>,
    pub inputs: Arc<ProxyInputs>,
    pub capture: Arc<Capture>,
    pub store: Option<Arc<CertStore>>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<crate::admin::ReloadState>,
    pub checkers: Arc<crate::proxy::health::HealthCheckers>,
    /// The JSON texts the running config's services were read from: a
    /// reload takes over every service whose text is unchanged instead of
    /// reading and validating it again.
    pub texts: crate::config::ServiceTexts,
}

impl Reloader {
    /// Watches the files until `stop`; SIGHUP forces a reload.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(err) => {
                warn!(error = %err, "no SIGHUP handler: reloads follow file changes only");
                None
            }
        };
        // What was read last, to tell a change: shared with the sources
        // (a large mesh's files are megabytes).
        let texts = |read: &Result<Vec<Source>, ConfigErrors>| -> Option<Vec<Arc<str>>> {
            read.as_ref()
                .ok()
                .map(|sources| sources.iter().map(|s| s.text.clone()).collect())
        };
        let mut last = texts(&crate::config::read_sources(&self.paths));
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match &mut hangup { Some(h) => h.recv().await, None => None } } => true,
                _ = crate::net::accept::stopped(&mut stop) => return,
            };
            // Read once; what was read is what is validated and recorded.
            // A file that cannot be read counts as changed.
            let started = std::time::Instant::now();
            let read = crate::config::read_sources(&self.paths);
            let now = texts(&read);
            if now == last && !forced {
                continue;
            }
            last = now;
            // A large mesh takes a good part of a second: the control
            // runtime's other tasks (admin, metrics) move to another
            // thread meanwhile. Connections are on the workers.
            match tokio::runtime::Handle::current().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => self.reload(read, started),
                _ => tokio::task::block_in_place(|| self.reload(read, started)),
            }
        }
    }

    /// Validates and applies files read since `started`; records the
    /// outcome and how long it took.
    fn reload(&mut self, read: Result<Vec<Source>, ConfigErrors>, started: std::time::Instant) {
        let result = read.map_err(ReloadError::from).and_then(|sources| {
            // A bug that panics while applying must not end reloading for
            // good: it is this reload's error, and the next one runs.
            let applied =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(&sources)))
                    .unwrap_or_else(|panic| Err(ReloadError::Panicked(panic_message(&*panic))));
            applied.map(|(config, replaced)| (config, sources, replaced))
        });
        self.metrics
            .config_last_reload_duration
            .set(started.elapsed().as_secs_f64());
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        self.metrics
            .config_last_reload_ok
            .set(i64::from(result.is_ok()));
        match result {
            Ok((config, sources, replaced)) => {
                // The new config serves: the one it replaced is freed now,
                // after the reload was timed (with ten thousand services,
                // some 15 ms), unless connections still hold it.
                drop(replaced);
                info!(
                    services = config.services.len(),
                    workloads = config.workloads.len(),
                    policies = config.policies.len(),
                    "config reloaded"
                );
                self.state.record_files(&sources);
                self.state.update(|s| {
                    s.generation += 1;
                    s.last_applied = Some(SystemTime::now());
                    s.last_error = None;
                });
            }
            Err(err) => {
                let message = err.to_string();
                warn!(error = %message, "config reload refused; the last good config keeps serving");
                self.state.update(|s| s.last_error = Some(message));
            }
        }
        // The old config and snapshot are gone (unless a connection still
        // holds them), and so is what parsing the files took.
        crate::app::trim::release_freed();
    }

    /// Applies `sources`: the new config, and the snapshot it replaced.
    fn apply(&mut self, sources: &[Source]) -> Result<(Arc<Config>, Arc<Snapshot>), ReloadError> {
        let running = self.inputs.snapshot.load_full();
        let (mut config, texts) = crate::config::reload_sources(
            sources,
            Some(crate::config::Running {
                config: &running.config,
                texts: &self.texts,
            }),
        )?;
        if let Some(level) = self.bpf_log_level {
            config.proxy.bpf_log_level = level;
        }
        restart_only_change(&running.config, &config)
            .map_or(Ok(()), |what| Err(ReloadError::NeedsRestart(what)))?;
        config.place_pods(self.cgroup_driver);
        let config = Arc::new(config);
        let mesh = Arc::new(Snapshot::new(config.clone(), Some(&running)));
        if let Err(err) = self.capture.sync_destinations(&mesh) {
            // The running config keeps serving: so must its map.
            if let Err(again) = self.capture.sync_destinations(&running) {
                warn!(error = %again, "restoring the capture map of the running config failed");
            }
            return Err(err.into());
        }
        if let Some(store) = &self.store {
            store.set_identities(config.workloads.iter().map(|w| w.identity.clone()));
            store.refresh();
        }
        mesh.apply_limits();
        let marks: Arc<dyn crate::state::ids::OrigDstSource> = self.capture.clone();
        self.checkers.sync(&mesh, &self.metrics, &marks);
        self.inputs.snapshot.store(mesh);
        self.texts = texts;
        Ok((config, running))
    }
}

/// What a panic said, as text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// The first setting that differs between `running` and `next` and that
/// only a restart applies: listeners, cgroups, capture, identity.
fn restart_only_change(running: &Config, next: &Config) -> Option<&'static str> {
    let own = |c: &Config| c.nodes.get(&c.node.name).copied();
    // The mTLS mode is the kernel filter's setting, applied on reload.
    let mesh = |c: &Config| crate::config::MeshSpec {
        mode: Default::default(),
        ..c.mesh.clone()
    };
    [
        ("node", running.node == next.node),
        ("proxy", running.proxy == next.proxy),
        ("mesh", mesh(running) == mesh(next)),
        ("tracing", running.tracing == next.tracing),
        ("accessLog", running.access_log == next.access_log),
        ("this node's address in nodes", own(running) == own(next)),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(what, _)| what)
}
