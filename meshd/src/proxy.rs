//! The node proxy: listeners and the per-connection work behind them.

mod outbound;
mod relay;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;

pub use outbound::{Outbound, OutboundError};

use crate::{capture::Capture, mesh::Mesh, metrics::Metrics};

/// Everything a connection handler reads, shared by all of them.
pub struct ProxyInputs {
    pub mesh: ArcSwap<Mesh>,
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    pub buffer_size: usize,
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
