//! The accept loop every listener runs: a span per connection, caps on
//! connections in all and per source address, shedding when descriptors
//! run out, an idle timeout, and a bounded drain when meshd stops.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::FutureExt as _;
use prometheus_client::metrics::counter::Counter;

use super::idle::Idle;

/// What an accept loop counts.
#[derive(Clone, Default)]
pub struct AcceptCounters {
    /// Accept calls that failed.
    pub errors: Counter,
    /// Connections reset at once because no descriptor was left.
    pub shed: Counter,
    /// Connections reset at once because the listener had `max` of them.
    pub over_max: Counter,
    /// Connections reset at once because their source had `per_source`.
    pub over_per_source: Counter,
    /// Connections closed after `idle` without a byte either way.
    pub idle_closed: Counter,
}

/// How much one listener takes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max: usize,
    pub per_source: usize,
    pub idle: Duration,
}

/// A listener's caps as every loop accepting on it shares them (one loop
/// per worker): one count of places, however many loops take from it.
#[derive(Clone)]
pub struct Caps {
    slots: Slots,
    idle: Duration,
    /// The last connection id given, so ids are unique per listener.
    ids: Arc<AtomicU64>,
}

impl From<Limits> for Caps {
    fn from(limits: Limits) -> Self {
        Self {
            slots: Slots::new(limits.max, limits.per_source),
            idle: limits.idle,
            ids: Default::default(),
        }
    }
}

/// Counted places, in all and per source address; a taken `Slot` gives
/// its place back when dropped (also when its task panics or is aborted).
#[derive(Clone)]
pub struct Slots {
    max: usize,
    per_source: usize,
    taken: Arc<Mutex<Taken>>,
}

#[derive(Default)]
struct Taken {
    all: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    All,
    Source,
}

pub struct Slot {
    taken: Arc<Mutex<Taken>>,
    source: IpAddr,
}

impl Slots {
    pub fn new(max: usize, per_source: usize) -> Self {
        Self {
            max,
            per_source,
            taken: Default::default(),
        }
    }

    pub fn take(&self, source: IpAddr) -> Result<Slot, Full> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if taken.all >= self.max {
            return Err(Full::All);
        }
        let mine = taken.by_source.entry(source).or_default();
        if *mine >= self.per_source {
            return Err(Full::Source);
        }
        *mine += 1;
        taken.all += 1;
        Ok(Slot {
            taken: self.taken.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.all -= 1;
        if let Some(mine) = taken.by_source.get_mut(&self.source) {
            *mine -= 1;
            if *mine == 0 {
                taken.by_source.remove(&self.source);
            }
        }
    }
}

/// Pause after an accept error (such as running out of descriptors) so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A connection as `serve` gets it: closed once idle for the limit.
pub type Accepted = Idle<tokio::net::TcpStream>;

/// Accepts on `listener` until `stop` turns true, running `serve` for each
/// connection in a span of its own, within `caps` (a connection over a
/// cap is reset at once and counted); then closes the listener and waits
/// up to `drain` for the connections in flight before cutting the rest.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    caps: impl Into<Caps>,
    counters: &AcceptCounters,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    mut serve: F,
) where
    F: FnMut(Accepted, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument as _;
    let mut connections = tokio::task::JoinSet::new();
    let mut shedder = Shedder::new(what);
    let Caps { slots, idle, ids } = caps.into();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let slot = match slots.take(peer.ip()) {
                        Ok(slot) => slot,
                        Err(full) => {
                            let (counter, cap) = match full {
                                Full::All => (&counters.over_max, "max"),
                                Full::Source => (&counters.over_per_source, "perSource"),
                            };
                            counter.inc();
                            shedder.refused(cap, &peer);
                            let _ = stream.set_zero_linger();
                            continue;
                        }
                    };
                    let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
                    let span = tracing::info_span!("conn", listener = what, id, peer = %peer);
                    let stream = Idle::new(stream, idle, counters.idle_closed.clone());
                    // The slot is given back once served (`map`, not an
                    // async block: that would hold the connection's future
                    // twice, as its capture and as what it awaits).
                    let served = serve(stream, peer).map(move |()| drop(slot));
                    connections.spawn(served.instrument(span));
                }
                Err(err) => {
                    counters.errors.inc();
                    if out_of_descriptors(&err) {
                        shedder.shed(&listener, counters).await;
                    } else {
                        tracing::warn!(listener = what, error = %err, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tracing::info!(
        listener = what,
        in_flight = connections.len(),
        ?drain,
        "listener closed; draining"
    );
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = what,
            cut = connections.len(),
            "drain timeout reached; closing the rest"
        );
        connections.shutdown().await;
    }
}

fn out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Out of file descriptors, a listener cannot even accept a connection to
/// refuse it: the connection would sit in the accept queue, its client
/// waiting. A descriptor kept in reserve is given up to accept one such
/// connection and reset it at once (the client learns immediately), then
/// taken back. When descriptors free up, accepting just works again.
struct Shedder {
    what: &'static str,
    reserve: Option<std::fs::File>,
    shed: u64,
    last_log: Option<std::time::Instant>,
    refused: u64,
}

/// At most one warning per listener and cause in this long.
const QUIET: Duration = Duration::from_secs(5);

impl Shedder {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            reserve: std::fs::File::open("/dev/null").ok(),
            shed: 0,
            last_log: None,
            refused: 0,
        }
    }

    fn quiet(&mut self) -> bool {
        let quiet = self.last_log.is_some_and(|t| t.elapsed() < QUIET);
        if !quiet {
            self.last_log = Some(std::time::Instant::now());
        }
        quiet
    }

    /// A connection over one of the listener's caps.
    fn refused(&mut self, cap: &'static str, peer: &SocketAddr) {
        self.refused += 1;
        if !self.quiet() {
            tracing::warn!(
                listener = self.what,
                cap,
                %peer,
                refused = self.refused,
                "connection limit reached: resetting new connections"
            );
        }
    }

    async fn shed(&mut self, listener: &tokio::net::TcpListener, counters: &AcceptCounters) {
        self.reserve = None;
        // Whatever is queued now, without waiting for more.
        while let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::ZERO, listener.accept()).await
        {
            let _ = stream.set_zero_linger();
            drop(stream);
            self.shed += 1;
            counters.shed.inc();
        }
        self.reserve = std::fs::File::open("/dev/null").ok();
        if !self.quiet() {
            tracing::warn!(
                listener = self.what,
                shed = self.shed,
                "out of file descriptors: resetting new connections until some free up"
            );
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loops_of_one_listener_share_its_caps() {
        let caps = Caps::from(Limits {
            max: 2,
            per_source: 1,
            idle: Duration::from_secs(1),
        });
        // One clone per worker's loop.
        let (one, two) = (caps.clone(), caps);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = one.slots.take(a).expect("a's first place");
        assert_eq!(
            two.slots.take(a).err(),
            Some(Full::Source),
            "per source, across loops"
        );
        let _second = two.slots.take(b).expect("b's first place");
        assert_eq!(
            one.slots.take([10, 0, 0, 3].into()).err(),
            Some(Full::All),
            "in all, across loops"
        );
        drop(first);
        assert!(
            two.slots.take(a).is_ok(),
            "a place freed on one loop frees it on all"
        );
    }
}
