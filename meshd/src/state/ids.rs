//! Names for the things meshd keeps state about and for the addresses it
//! handles, so the type says which is which. A `ServiceId` and an
//! `EndpointId` are stable across reloads (a reordered config keeps them);
//! indexes into a snapshot are valid for that snapshot only.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

/// A service, as the config names it: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceId {
    pub fn of(service: &crate::config::Service) -> Self {
        Self {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One endpoint of a service: its pod address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub Ipv4Addr);

/// Where a captured connection was going, as the connect hook saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddrV4);

/// The address a captured connection comes from (the pod's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddrV4);

/// What capture recorded about one accepted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub dst: OrigDstAddr,
    /// The path (from the cgroup2 mount's root) of the cgroup the client's
    /// `connect()` ran in; `None` when it no longer exists or is unknown.
    pub cgroup: Option<Arc<str>>,
}

/// Where the proxy learns a captured connection's original destination:
/// the eBPF maps in production, a table in the in-process tests.
pub trait OrigDstSource: Send + Sync {
    /// What was recorded for `client`, removed as it is read.
    fn take(&self, client: ClientAddr) -> Option<Captured>;

    /// Marks (while `connecting`) or unmarks meshd's own connect from
    /// `local_port` to `remote`, so the pods' ingress filter knows its SYN
    /// comes from meshd. Nothing to do without the kernel half.
    fn mark_own(&self, _local_port: u16, _remote: std::net::SocketAddrV4, _connecting: bool) {}
}
