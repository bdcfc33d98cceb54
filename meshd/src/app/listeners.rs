//! Every listener meshd serves, opened before anything is served or
//! captured — taken over from the meshd handing over when there is one,
//! else bound — so a port conflict fails start-up instead of half-starting.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::OwnedFd,
};

use tracing::{info, warn};

use super::{handover::Taken, StartError};
use crate::{
    admin::StatusListener,
    config::Config,
    proxy::{inbound::Inbound, Outbound},
    state::snapshot::Snapshot,
};

pub struct Listeners {
    pub outbound: Outbound,
    pub metrics: StatusListener,
    pub readiness: StatusListener,
    pub admin: StatusListener,
    /// The tunnel listener, when this node has identities to serve it with.
    pub inbound: Option<Inbound>,
}

/// Whether a socket bound to `bound` serves `wanted` (the same port, and
/// the same address — an unspecified one stands for any).
fn same_address(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound.port() == wanted.port() && bound.ip() == wanted.ip()
}

impl Listeners {
    /// Opens every listener `config` asks for; `tunnels`: this node has
    /// certificates, so it serves `:15008`.
    pub async fn open(
        config: &Config,
        snapshot: &Snapshot,
        tunnels: bool,
        taken: &mut Option<Taken>,
    ) -> Result<Self, StartError> {
        let proxy = &config.proxy;
        // A listener handed over is used only where it is bound to what
        // this config asks for; where the address changed, bind anew.
        let mut take = |name: &str, wanted: SocketAddr| {
            let listener = taken.as_mut().and_then(|t| t.take(name))?;
            match listener.local_addr() {
                Ok(bound) if same_address(bound, wanted) => Some(listener),
                bound => {
                    info!(listener = name, ?bound, %wanted, "the address changed: binding anew");
                    None
                }
            }
        };
        let outbound_addr = SocketAddrV4::new(config.node.capture_address, proxy.outbound_port);
        let outbound = match take("outbound", outbound_addr.into()) {
            Some(listener) => Outbound::adopt(listener, outbound_addr)?,
            None => Outbound::bind(outbound_addr).await?,
        };
        let mut status = async |address, what: &'static str| match take(what, address) {
            Some(listener) => StatusListener::adopt(listener, address, what),
            None => StatusListener::bind(address, what).await,
        };
        let metrics = status(proxy.metrics_address, "metrics").await?;
        let readiness = status(proxy.readiness_address, "readiness").await?;
        let admin = status(proxy.admin_address, "admin").await?;
        let inbound = if tunnels {
            let ip = snapshot
                .own_tunnel_address()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
            let address = SocketAddrV4::new(ip, proxy.inbound_port).into();
            Some(match take("inbound", address) {
                Some(listener) => Inbound::adopt(listener, address)?,
                None => Inbound::bind(address).await?,
            })
        } else {
            None
        };
        Ok(Self {
            outbound,
            metrics,
            readiness,
            admin,
            inbound,
        })
    }

    /// Duplicates of every listener, for the meshd that takes over from
    /// this one.
    pub fn duplicates(&self) -> Vec<(String, OwnedFd)> {
        let mut handed = Vec::new();
        let mut keep = |name: &str, fd: std::io::Result<OwnedFd>| match fd {
            Ok(fd) => handed.push((name.to_owned(), fd)),
            Err(err) => {
                warn!(listener = name, error = %err, "cannot keep a listener for hand-over")
            }
        };
        keep("outbound", self.outbound.duplicate());
        keep("metrics", self.metrics.duplicate());
        keep("readiness", self.readiness.duplicate());
        keep("admin", self.admin.duplicate());
        if let Some(inbound) = &self.inbound {
            keep("inbound", inbound.duplicate());
        }
        handed
    }
}
