//! The `meshd` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use meshd::{
    app::{self as daemon, Overrides, StartError},
    cli::{render_chain, EXIT_CONFIG},
    config::{self, BpfLogLevel},
    identity::{ca::Authority, Identity},
};
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Parser)]
#[command(name = "meshd", version, about = "Sidecarless service-mesh data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy: capture pod connections and relay them.
    Run {
        /// A config file; repeat to merge several (mesh-wide and node files).
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
        /// Forward the eBPF programs' log at this level (overrides proxy.bpfLogLevel).
        #[arg(long, value_enum)]
        bpf_log: Option<BpfLogLevel>,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Summarise a running meshd: config, services and endpoint health,
    /// workloads, certificates (from its admin API).
    Status {
        /// The admin API's address (`proxy.adminAddress`).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// Where `meshd discover` serves its `/status` (its
        /// `--admin-address`); shown when it answers.
        #[arg(long, default_value = "127.0.0.1:15024")]
        discovery: std::net::SocketAddr,
    },
    /// The service dependency graph: this node's (from its admin API), or
    /// the whole mesh's (from Prometheus, with Kiali's queries).
    Graph {
        /// The admin API's address (`proxy.adminAddress`).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// Build the mesh-wide graph from this Prometheus (`http://host:port`).
        #[arg(long)]
        prometheus: Option<String>,
        /// How to print it.
        #[arg(long, value_enum, default_value_t = GraphFormat::Table)]
        format: GraphFormat,
        /// The window rates, errors and latencies are over.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        window: Duration,
    },
    /// Validate config files without running; exits 2 if they are invalid.
    Check {
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// Write meshd's node-local files from the cluster's objects (watched
    /// on the API server, or once from manifests): runs `meshd-discover`,
    /// installed beside meshd, with these arguments (`meshd discover
    /// --help` for its own).
    #[command(disable_help_flag = true)]
    Discover {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// A certificate authority for workload identities.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root CA: writes ca.crt and ca.key (mode 0600) into --out.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// The root's common name.
        #[arg(long, default_value = "meshd root CA")]
        name: String,
        /// How long the root is valid.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
    /// Issue a workload certificate: writes tls.crt, tls.key and ca.crt into --out.
    Issue {
        /// The CA directory (ca.crt, ca.key).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity of the certificate.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Start the validity this long ago (a test can issue an expired one).
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        backdate: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Table,
    Json,
    Dot,
    Mermaid,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    // eBPF records are already filtered in the kernel by --bpf-log /
    // proxy.bpfLogLevel; let all that arrive through.
    let initial = std::env::var("MESHD_LOG").unwrap_or_else(|_| "info,meshd::bpf=trace".into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_filter_reloading();
    // The admin API changes the filter at run time through this handle.
    macro_rules! install {
        ($builder:expr) => {{
            let handle = $builder.reload_handle();
            meshd::admin::install_log_control(meshd::admin::LogControl {
                current: std::sync::Mutex::new(initial.clone()),
                set: Box::new(move |filter: &str| {
                    let next = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
                    handle.reload(next).map_err(|e| e.to_string())
                }),
            });
            $builder.init();
        }};
    }
    match format {
        LogFormat::Text => install!(builder),
        LogFormat::Json => {
            let builder = fmt()
                .with_env_filter(
                    EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true)
                .with_filter_reloading();
            install!(builder)
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => match config::load(&config) {
            Ok(config) => {
                println!(
                    "ok: node {} with {} services and {} workloads",
                    config.node.name,
                    config.services.len(),
                    config.workloads.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Discover { args } => {
            // Its own binary: the Kubernetes client and the API's types stay
            // out of the node proxy's (its memory is mostly its code).
            let err = meshd::cli::run_beside("meshd-discover", &args);
            eprintln!("meshd discover: {}", render_chain(&err));
            ExitCode::FAILURE
        }
        Command::Status { admin, discovery } => {
            match meshd::admin::status_command(admin, discovery) {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("meshd status: {}", render_chain(&err));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Graph {
            admin,
            prometheus,
            format,
            window,
        } => {
            let graph = match &prometheus {
                Some(url) => meshd::admin::graph::from_prometheus(url, window),
                None => meshd::admin::graph::from_admin(admin, window),
            };
            match graph {
                Ok(graph) => {
                    let out = match format {
                        GraphFormat::Table => graph.table(),
                        GraphFormat::Json => {
                            serde_json::to_string_pretty(&graph).unwrap_or_default() + "\n"
                        }
                        GraphFormat::Dot => graph.dot(),
                        GraphFormat::Mermaid => graph.mermaid(),
                    };
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("meshd graph: {}", render_chain(&err));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca { command } => match ca(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("meshd ca: {}", render_chain(&err));
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            bpf_log,
            log_format,
        } => {
            init_logging(log_format);
            let overrides = Overrides {
                bpf_log_level: bpf_log,
            };
            match run(&config, &overrides) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("meshd: {}", render_chain(&err));
                    match err.downcast_ref::<StartError>() {
                        Some(StartError::Config(_)) => ExitCode::from(EXIT_CONFIG),
                        _ => ExitCode::FAILURE,
                    }
                }
            }
        }
    }
}

fn ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init {
            out,
            name,
            validity,
        } => {
            Authority::init(&out, &name, validity)?;
            println!(
                "wrote {}/ca.crt and {}/ca.key",
                out.display(),
                out.display()
            );
        }
        CaCommand::Issue {
            ca,
            namespace,
            service_account,
            trust_domain,
            out,
            ttl,
            backdate,
        } => {
            let identity = Identity::new(&trust_domain, &namespace, &service_account)?;
            let not_before = std::time::SystemTime::now() - backdate;
            Authority::load(&ca)?.issue_to(&identity, &out, not_before, ttl)?;
            println!("wrote {} for {identity}", out.display());
        }
    }
    Ok(())
}

fn run(config: &[PathBuf], overrides: &Overrides) -> anyhow::Result<()> {
    // Join meshd's cgroup before the runtime spawns its threads.
    let prepared = daemon::prepare(config, overrides)?;
    // The control plane's runtime: admin and metrics listeners, reloads,
    // certificates, span export. Connections are served on the workers
    // (`proxy.workerThreads`), each a thread with a runtime of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("meshd")
        .build()?;
    runtime.block_on(daemon::run(prepared))?;
    Ok(())
}
