//! Types and constants shared by meshd's eBPF programs and its user-space loader.
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers only
//! (no `bool`, no hidden padding) so that kernel and user space agree on its
//! layout byte for byte. IPv4 addresses are kept exactly as the kernel hands
//! them to programs: a `u32` whose in-memory bytes are the address octets
//! (network order). Ports are kept in host order.
#![no_std]

/// The port meshd's outbound listener accepts captured connections on.
pub const OUTBOUND_PORT: u16 = 15001;

/// Capacity of the map of destinations meshd captures (service VIP:port and
/// meshed pod address:port).
pub const DESTINATIONS_CAPACITY: u32 = 65_536;
/// Capacity of the LRU maps that carry an original destination from
/// `connect` to `accept`.
pub const ORIG_DST_CAPACITY: u32 = 65_536;
/// Capacity of the socket hash used for same-node acceleration.
pub const SOCKETS_CAPACITY: u32 = 65_536;

/// `Settings::flags` bit: put captured app⇄meshd sockets into the socket hash
/// so the `sk_msg` program moves their bytes without the TCP stack.
pub const FLAG_SK_MSG: u32 = 1;
/// `Settings::flags` bit: strict mode. Pods in the subtree accept new IPv4
/// TCP connections only from `TRUSTED` sources (meshd's own addresses),
/// unless their `POD_PORTS` entry gives them a mode of their own.
pub const FLAG_STRICT: u32 = 2;
/// `Settings::flags` bit: fail closed. While meshd's heartbeat is stale,
/// captured connects are refused instead of going straight to their
/// destination.
pub const FLAG_FAIL_CLOSED: u32 = 4;
/// `Settings::flags` bit: new IPv6 TCP connections to pods are dropped
/// (strict mode, or some pod on the node strict: `POD_PORTS` is keyed by
/// IPv4 address, so a pod's own mode cannot be found for IPv6).
pub const FLAG_STRICT_IPV6: u32 = 8;
/// Capacity of the map of trusted source addresses.
pub const TRUSTED_CAPACITY: u32 = 64;
/// Capacity of the map of meshd's connects to pods in progress.
pub const OWN_CONNECTS_CAPACITY: u32 = 65_536;
/// Capacity of the map of pod ports with their own plaintext rules.
pub const POD_PORTS_CAPACITY: u32 = 65_536;

/// `POD_PORTS` bits. `PORT_PROTECTED` (on a pod's port 0: every port):
/// refuses plaintext even in permissive mode (an `allow` policy selects the
/// workload that plaintext, without a principal, can never match).
pub const PORT_PROTECTED: u32 = 1;
/// Overrides `PORT_PROTECTED` for one port (an `allow` plaintext matches).
pub const PORT_OPEN: u32 = 2;
/// The node itself (its own addresses: the kubelet) may connect in
/// plaintext, in every mode (the workload's `probePorts`).
pub const PORT_PROBE: u32 = 4;
/// On a pod's port 0: the pod is strict whatever `FLAG_STRICT` says (its
/// own `PeerAuthentication`).
pub const PORT_STRICT: u32 = 8;
/// On a pod's port 0: the pod is permissive whatever `FLAG_STRICT` says.
pub const PORT_PERMISSIVE: u32 = 16;

/// A connect meshd makes to a pod, as the pod's ingress filter sees its
/// SYN: meshd registers it just before connecting and removes it once the
/// connection is up, so only meshd's own sockets pass strict mode.
/// `remote_ip` in network order, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OwnConnect {
    pub remote_ip: u32,
    pub local_port: u16,
    pub remote_port: u16,
}

/// An IPv4 destination, as a map key. `ip` is in network order (octets in
/// memory order), `port` in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

impl Destination {
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// What `connect4` recorded about a captured connection: where the
/// application meant to go and which cgroup it connected from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub cgroup_id: u64,
    pub dst: Destination,
}

/// One end of a TCP connection, seen from that end: its own address and port
/// first. The peer's key is the same four numbers swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key the other end of this connection is stored under.
    pub const fn peer(&self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Run-time settings meshd writes into the one-entry `SETTINGS` array.
/// A zeroed entry (meshd not ready yet) captures nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Address pods reach meshd's outbound listener at (network order).
    pub proxy_ip: u32,
    /// meshd's outbound listener port (host order); 0 disables capture.
    pub proxy_port: u32,
    /// The cgroup meshd runs in; its own sockets are never captured.
    pub proxy_cgroup_id: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// meshd counts as gone when its heartbeat (`HEARTBEAT`, CLOCK_MONOTONIC
    /// nanoseconds) is older than this; 0 never.
    pub heartbeat_timeout_ns: u64,
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Connections `connect4`/`connect6` redirected to meshd.
    pub const CAPTURED: u32 = 0;
    /// `sk_msg` sends that found no peer socket and went through TCP instead.
    pub const SK_MSG_FALLBACK: u32 = 1;
    /// Sockets added to the socket hash.
    pub const SOCKETS_ADDED: u32 = 2;
    /// New inbound TCP connections to a pod dropped by strict mode.
    pub const STRICT_DROPPED: u32 = 3;
    /// New inbound TCP connections to a pod that did not come through meshd,
    /// let in because the mesh is permissive.
    pub const PLAINTEXT_ACCEPTED: u32 = 4;
    /// Captured connects let through to their destination because meshd's
    /// heartbeat was stale (fail-open).
    pub const FAILED_OPEN: u32 = 5;
    /// Captured connects refused because meshd's heartbeat was stale
    /// (fail-closed).
    pub const FAILED_CLOSED: u32 = 6;
    /// New inbound TCP connections to a pod refused in permissive mode
    /// because the pod's policy can never admit plaintext.
    pub const PLAINTEXT_REFUSED: u32 = 7;
    /// Number of counters.
    pub const LEN: u32 = 8;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, built only of integers, with
    // explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Destination {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above (no padding: 4 + 2 + 2 bytes).
    unsafe impl aya::Pod for super::OwnConnect {}
}
