//! meshd's kernel half: capture of pod connections into the node proxy.
//!
//! - `meshd_connect4` / `meshd_connect6` (cgroup/connect4, cgroup/connect6)
//!   run when a process in the pods' cgroup subtree calls `connect()`. A TCP
//!   destination meshd put into `DESTINATIONS` is rewritten to meshd's
//!   outbound listener and the original destination is remembered by socket
//!   cookie. IPv6 sockets are captured only for IPv4-mapped destinations.
//! - `meshd_sock_ops` hands that record over, once the connection is
//!   established, to `ORIG_DST` keyed by the client's (ip, port): the only
//!   name meshd knows for the connection after `accept()`. It also puts both
//!   ends of the app⇄meshd hop into `SOCKETS` when same-node acceleration is on.
//! - `meshd_sk_msg` moves bytes between those two sockets directly.
//! - `meshd_ingress` (cgroup_skb/ingress) enforces the mesh mode on the
//!   pods: a new TCP connection that does not come from meshd's own socket
//!   (its SYN from a node address with a 4-tuple meshd registered in
//!   `OWN_CONNECTS`) is dropped in strict mode — over IPv6 always, meshd
//!   relays IPv4 only — and in permissive mode to a port whose policy can
//!   never admit plaintext; other plaintext is counted. A workload's probe
//!   ports take plaintext from the node itself (the kubelet).
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use meshd_common::{
    counter, Destination, OrigDst, OwnConnect, Settings, SockKey, DESTINATIONS_CAPACITY,
    FLAG_FAIL_CLOSED, FLAG_SK_MSG, FLAG_STRICT, FLAG_STRICT_IPV6, ORIG_DST_CAPACITY,
    OWN_CONNECTS_CAPACITY, POD_PORTS_CAPACITY, PORT_OPEN, PORT_PERMISSIVE, PORT_PROBE,
    PORT_PROTECTED, PORT_STRICT, SOCKETS_CAPACITY, TRUSTED_CAPACITY,
};

/// `connect()` verdicts for cgroup/connect programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
/// Third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

// Every map is pinned by name under meshd's pin directory, so a meshd
// that restarts (or takes over from another) finds the same maps.

#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// meshd's last sign of life, CLOCK_MONOTONIC nanoseconds.
#[map]
static HEARTBEAT: Array<u64> = Array::pinned(1, 0);

/// Destinations to capture; the value is informational (1 service, 2 pod).
#[map]
static DESTINATIONS: HashMap<Destination, u32> = HashMap::pinned(DESTINATIONS_CAPACITY, 0);

/// Original destination by socket cookie, from connect until established.
#[map]
static CONNECTING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

/// Original destination by the client's (ip, port); meshd deletes an entry
/// once it has read it.
#[map]
static ORIG_DST: LruHashMap<Destination, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

/// Both ends of every accelerated app⇄meshd connection, each under its own key.
#[map]
static SOCKETS: SockHash<SockKey> = SockHash::pinned(SOCKETS_CAPACITY, 0);

/// Sockets whose sends once found no peer: they stay on the TCP path for
/// good, so their bytes can never overtake each other.
#[map]
static PASSTHROUGH: LruHashMap<SockKey, u8> = LruHashMap::pinned(SOCKETS_CAPACITY, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);

/// The node's own addresses, which meshd connects to pods from.
#[map]
static TRUSTED: HashMap<u32, u8> = HashMap::pinned(TRUSTED_CAPACITY, 0);

/// meshd's connects to pods in progress (written by meshd only).
#[map]
static OWN_CONNECTS: HashMap<OwnConnect, u8> = HashMap::pinned(OWN_CONNECTS_CAPACITY, 0);

/// Pod ports with their own plaintext rules (`PORT_*` bits); port 0
/// stands for every port of the pod.
#[map]
static POD_PORTS: HashMap<Destination, u32> = HashMap::pinned(POD_PORTS_CAPACITY, 0);

// === connect ===

#[cgroup_sock_addr(connect4)]
pub fn meshd_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn meshd_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(ALLOW)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, ()> {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let dst = Destination::new(addr.user_ip4, u16::from_be(addr.user_port as u16));
    let settings = match capture(ctx, dst) {
        Verdict::Pass => return Ok(ALLOW),
        Verdict::Refuse => return Ok(REFUSE),
        Verdict::Redirect(settings) => settings,
    };
    addr.user_ip4 = settings.proxy_ip;
    addr.user_port = u32::from((settings.proxy_port as u16).to_be());
    Ok(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, ()> {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return Ok(ALLOW);
    }
    // Word by word: the verifier accepts 4-byte loads of `user_ip6[i]`.
    let ip6 = addr.user_ip6;
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED_WORD {
        return Ok(ALLOW);
    }
    let dst = Destination::new(ip6[3], u16::from_be(addr.user_port as u16));
    let settings = match capture(ctx, dst) {
        Verdict::Pass => return Ok(ALLOW),
        Verdict::Refuse => return Ok(REFUSE),
        Verdict::Redirect(settings) => settings,
    };
    addr.user_ip6[3] = settings.proxy_ip;
    addr.user_port = u32::from((settings.proxy_port as u16).to_be());
    Ok(ALLOW)
}

/// What a captured connect becomes.
enum Verdict {
    /// Untouched: not a mesh destination, meshd's own, or meshd is gone
    /// and the mesh fails open.
    Pass,
    /// Refused: meshd is gone and the mesh fails closed.
    Refuse,
    /// To meshd's outbound listener (these settings).
    Redirect(Settings),
}

/// Whether meshd's heartbeat is older than the settings allow.
#[inline(always)]
fn meshd_gone(settings: &Settings) -> bool {
    if settings.heartbeat_timeout_ns == 0 {
        return false;
    }
    let Some(beat) = HEARTBEAT.get(0) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(*beat) > settings.heartbeat_timeout_ns
}

/// Decides what a connect to `dst` becomes and, when it is captured,
/// records its original destination.
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst: Destination) -> Verdict {
    let Some(settings) = SETTINGS.get(0).copied() else {
        return Verdict::Pass;
    };
    if settings.proxy_port == 0 {
        return Verdict::Pass;
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if cgroup_id == settings.proxy_cgroup_id {
        return Verdict::Pass;
    }
    // SAFETY: only presence is checked.
    if unsafe { DESTINATIONS.get(&dst) }.is_none() {
        return Verdict::Pass;
    }
    if meshd_gone(&settings) {
        if settings.flags & FLAG_FAIL_CLOSED != 0 {
            count(counter::FAILED_CLOSED);
            return Verdict::Refuse;
        }
        count(counter::FAILED_OPEN);
        return Verdict::Pass;
    }
    // SAFETY: `ctx` is the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    if CONNECTING
        .insert(&cookie, &OrigDst { cgroup_id, dst }, BPF_ANY as u64)
        .is_err()
    {
        return Verdict::Pass;
    }
    count(counter::CAPTURED);
    debug!(
        ctx,
        "captured connect to {:i}:{} from cgroup {}",
        u32::from_be(dst.ip),
        dst.port,
        cgroup_id
    );
    Verdict::Redirect(settings)
}

// === sock_ops ===

#[sock_ops]
pub fn meshd_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        _ => {}
    }
    1
}

/// A pod's captured connection reached meshd: publish its original
/// destination under the client's address and enrol the socket.
fn on_active_established(ctx: &SockOpsContext) {
    // SAFETY: `ctx` is the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { CONNECTING.get(&cookie) }).copied() else {
        return;
    };
    let key = sock_ops_key(ctx);
    let client = Destination::new(key.local_ip, key.local_port as u16);
    let _ = ORIG_DST.insert(&client, &orig, BPF_ANY as u64);
    let _ = CONNECTING.remove(&cookie);
    enrol(ctx, key);
}

/// meshd accepted a captured connection: enrol meshd's end.
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(settings) = SETTINGS.get(0) else {
        return;
    };
    let key = sock_ops_key(ctx);
    if key.local_port != settings.proxy_port || key.local_ip != settings.proxy_ip {
        return;
    }
    enrol(ctx, key);
}

#[inline(always)]
fn enrol(ctx: &SockOpsContext, mut key: SockKey) {
    let Some(settings) = SETTINGS.get(0) else {
        return;
    };
    if settings.flags & FLAG_SK_MSG == 0 {
        return;
    }
    // A reused 4-tuple starts fresh.
    let _ = PASSTHROUGH.remove(&key);
    // SAFETY: `ctx.ops` is the program's own context.
    if SOCKETS
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .is_ok()
    {
        count(counter::SOCKETS_ADDED);
    }
}

#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext) -> SockKey {
    SockKey {
        local_ip: ctx.local_ip4(),
        remote_ip: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        // The kernel hands the remote port over big-endian, shifted left 16.
        remote_port: u32::from(u16::from_be((ctx.remote_port() >> 16) as u16)),
    }
}

// === sk_msg ===

#[sk_msg]
pub fn meshd_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel passes a valid `sk_msg_md` for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    let key = SockKey {
        local_ip: md.local_ip4,
        remote_ip: md.remote_ip4,
        local_port: md.local_port,
        // Big-endian, shifted left 16, as in sock_ops.
        remote_port: u32::from(u16::from_be((md.remote_port >> 16) as u16)),
    };
    // SAFETY: only presence is checked.
    if unsafe { PASSTHROUGH.get(&key) }.is_some() {
        return SK_PASS;
    }
    let mut peer = key.peer();
    if SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        return SK_PASS;
    }
    // No peer yet (its handshake is still in flight) or any more (it closed):
    // this socket's bytes take the TCP path from now on. Mixing the two paths
    // on one socket could reorder bytes at the receiver.
    let _ = PASSTHROUGH.insert(&key, &1, BPF_ANY as u64);
    count(counter::SK_MSG_FALLBACK);
    debug!(&ctx, "sk_msg: no peer socket, falling back to TCP");
    SK_PASS
}

// === cgroup_skb/ingress ===

const PASS: i32 = 1;
const DROP: i32 = 0;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[cgroup_skb]
pub fn meshd_ingress(ctx: SkBuffContext) -> i32 {
    try_ingress(&ctx).unwrap_or(PASS)
}

/// Looks only at TCP SYNs (new connections); everything else, including
/// every packet of established connections, passes.
fn try_ingress(ctx: &SkBuffContext) -> Result<i32, i64> {
    let Some(settings) = SETTINGS.get(0) else {
        return Ok(PASS);
    };
    // cgroup_skb sees packets from the IP header on.
    let version_ihl: u8 = ctx.load(0)?;
    match version_ihl >> 4 {
        4 => ingress4(ctx, settings, version_ihl),
        6 => ingress6(ctx, settings),
        _ => Ok(PASS),
    }
}

/// Whether the TCP header at `at` starts a connection (SYN without ACK).
#[inline(always)]
fn is_syn(ctx: &SkBuffContext, at: usize) -> Result<bool, i64> {
    let flags: u8 = ctx.load(at + 13)?;
    Ok(flags & TCP_SYN != 0 && flags & TCP_ACK == 0)
}

/// The rules `POD_PORTS` holds for `ip:port` (network-order ip).
#[inline(always)]
fn pod_port(ip: u32, port: u16) -> u32 {
    // SAFETY: the values are copied out at once.
    let exact = unsafe { POD_PORTS.get(&Destination::new(ip, port)) }.copied();
    // SAFETY: as above.
    let pod = unsafe { POD_PORTS.get(&Destination::new(ip, 0)) }.copied();
    exact.unwrap_or(0) | pod.unwrap_or(0)
}

fn ingress4(ctx: &SkBuffContext, settings: &Settings, version_ihl: u8) -> Result<i32, i64> {
    let protocol: u8 = ctx.load(9)?;
    if protocol != IPPROTO_TCP {
        return Ok(PASS);
    }
    let header = usize::from(version_ihl & 0x0f) * 4;
    if !is_syn(ctx, header)? {
        return Ok(PASS);
    }
    let source: u32 = ctx.load(12)?;
    let destination: u32 = ctx.load(16)?;
    // Loopback and a pod talking to itself are the pod's own business.
    if source.to_ne_bytes()[0] == 127 || source == destination {
        return Ok(PASS);
    }
    let source_port = u16::from_be(ctx.load::<u16>(header)?);
    let destination_port = u16::from_be(ctx.load::<u16>(header + 2)?);
    // SAFETY: only presence is checked.
    let from_node = unsafe { TRUSTED.get(&source) }.is_some();
    let own = OwnConnect {
        remote_ip: destination,
        local_port: source_port,
        remote_port: destination_port,
    };
    // SAFETY: only presence is checked.
    if from_node && unsafe { OWN_CONNECTS.get(&own) }.is_some() {
        return Ok(PASS);
    }
    let rules = pod_port(destination, destination_port);
    if from_node && rules & PORT_PROBE != 0 {
        count(counter::PLAINTEXT_ACCEPTED);
        return Ok(PASS);
    }
    // With meshd gone and the mesh failing open, connections that would
    // have gone through it come straight here: let them in.
    let failing_open = settings.flags & FLAG_FAIL_CLOSED == 0 && meshd_gone(settings);
    if failing_open {
        count(counter::PLAINTEXT_ACCEPTED);
        return Ok(PASS);
    }
    // The pod's own mode, else the mesh's.
    let strict = if rules & PORT_STRICT != 0 {
        true
    } else if rules & PORT_PERMISSIVE != 0 {
        false
    } else {
        settings.flags & FLAG_STRICT != 0
    };
    if strict {
        count(counter::STRICT_DROPPED);
        debug!(
            ctx,
            "strict: dropped a connection from {:i}",
            u32::from_be(source)
        );
        return Ok(DROP);
    }
    if rules & PORT_PROTECTED != 0 && rules & PORT_OPEN == 0 {
        count(counter::PLAINTEXT_REFUSED);
        debug!(
            ctx,
            "permissive: refused plaintext from {:i} to a port its policy closes to it",
            u32::from_be(source)
        );
        return Ok(DROP);
    }
    count(counter::PLAINTEXT_ACCEPTED);
    Ok(PASS)
}

/// Length of the fixed IPv6 header.
const IPV6_HEADER: usize = 40;

/// Extension headers walked to find the TCP header behind them.
const MAX_EXTENSIONS: usize = 4;

/// meshd relays IPv4 only, so no IPv6 connection to a pod comes from it:
/// strict mode drops every new one (but loopback's and the pod's own),
/// also behind extension headers (up to `MAX_EXTENSIONS`; a SYN behind
/// more is dropped too).
fn ingress6(ctx: &SkBuffContext, settings: &Settings) -> Result<i32, i64> {
    if settings.flags & FLAG_STRICT_IPV6 == 0 {
        return Ok(PASS);
    }
    let mut next: u8 = ctx.load(6)?;
    let mut at = IPV6_HEADER;
    for _ in 0..MAX_EXTENSIONS {
        let length = match next {
            // Hop-by-hop, routing, destination options: 8-byte units.
            0 | 43 | 60 => (usize::from(ctx.load::<u8>(at + 1)?) + 1) * 8,
            // Fragment.
            44 => 8,
            // Authentication header: 4-byte units.
            51 => (usize::from(ctx.load::<u8>(at + 1)?) + 2) * 4,
            _ => break,
        };
        // Each extension header starts with the type of the next.
        next = ctx.load(at)?;
        at += length;
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        count(counter::STRICT_DROPPED);
        return Ok(DROP);
    }
    if next != IPPROTO_TCP || !is_syn(ctx, at)? {
        return Ok(PASS);
    }
    let source: [u32; 4] = [ctx.load(8)?, ctx.load(12)?, ctx.load(16)?, ctx.load(20)?];
    let destination: [u32; 4] = [ctx.load(24)?, ctx.load(28)?, ctx.load(32)?, ctx.load(36)?];
    let loopback = source == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    if loopback || source == destination {
        return Ok(PASS);
    }
    let failing_open = settings.flags & FLAG_FAIL_CLOSED == 0 && meshd_gone(settings);
    if failing_open {
        count(counter::PLAINTEXT_ACCEPTED);
        return Ok(PASS);
    }
    count(counter::STRICT_DROPPED);
    debug!(ctx, "strict: dropped an IPv6 connection");
    Ok(DROP)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs on one CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
