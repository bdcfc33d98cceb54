//! `meshd discover` (which runs this binary): the cluster's objects
//! written as meshd's node-local config. A binary of its own so that the
//! Kubernetes client and the API's types are not in the node proxy's.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use meshd::cli::{render_chain, EXIT_CONFIG};
use tracing_subscriber::{fmt, EnvFilter};

/// Write meshd's node-local files (`mesh.yaml`, `workloads.yaml`) for
/// one node from the cluster's objects (Services, EndpointSlices, Pods,
/// Nodes, HTTPRoutes, Istio's DestinationRules, PeerAuthentications and
/// AuthorizationPolicies): watched on the API server, or once from
/// manifests.
#[derive(Parser)]
#[command(name = "meshd discover", bin_name = "meshd discover", version)]
struct Discover {
    /// Read the objects from the manifests below this directory
    /// (multi-document files and `List`s), write the files once and exit.
    #[arg(long)]
    from_manifests: Option<PathBuf>,
    /// The node whose pods become workloads.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Where the config is written (`meshd.yaml`, atomically, only when
    /// its bytes change).
    #[arg(long)]
    out: PathBuf,
    /// The node settings (`node`, `proxy`, …) to complete with the
    /// node's name and capture address into one whole config.
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The cluster's name in metrics.
    #[arg(long, default_value = "Kubernetes")]
    cluster_name: String,
    /// Istio's root namespace: its PeerAuthentication without a
    /// selector is mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Where discovery's `/metrics` is served (watching the API only).
    #[arg(long, default_value = "0.0.0.0:15023")]
    metrics_address: std::net::SocketAddr,
    /// Where discovery's `/status` is served, for `meshd status`
    /// (watching the API only; loopback: it names objects).
    #[arg(long, default_value = "127.0.0.1:15024")]
    admin_address: std::net::SocketAddr,
}

/// Logs to stderr at `MESHD_LOG`'s filter (default `info`).
fn init_logging() {
    let filter = std::env::var("MESHD_LOG").unwrap_or_else(|_| "info".into());
    fmt()
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let Discover {
        from_manifests,
        node,
        out,
        trust_domain,
        cluster_name,
        root_namespace,
        node_config,
        metrics_address,
        admin_address,
    } = Discover::parse();
    init_logging();
    let node_config = match node_config
        .as_deref()
        .map(meshd::discovery::read_node_config)
    {
        None => None,
        Some(Ok(config)) => Some(config),
        Some(Err(err)) => {
            eprintln!("meshd discover: {}", render_chain(&err));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = meshd::discovery::Settings {
        node,
        trust_domain,
        cluster_name,
        root_namespace,
        node_config,
    };
    let Some(from_manifests) = from_manifests else {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("meshd discover: {err}");
                return ExitCode::FAILURE;
            }
        };
        return match runtime.block_on(meshd::discovery::watch::run(
            settings,
            out,
            meshd::discovery::report::Addresses {
                metrics: metrics_address,
                admin: admin_address,
            },
        )) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("meshd discover: {}", render_chain(&err));
                ExitCode::FAILURE
            }
        };
    };
    match meshd::discovery::from_manifests(&from_manifests, &out, &settings) {
        Ok(translation) => {
            println!(
                "ok: wrote {} ({} fields could not be translated)",
                out.join(meshd::discovery::CONFIG_FILE).display(),
                translation.unsupported.len()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("meshd discover: {}", render_chain(&err));
            ExitCode::FAILURE
        }
    }
}
