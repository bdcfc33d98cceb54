//! Connection limits of a service's circuit breaker: at most
//! `maxConnections` upstream connections from this node, and at most
//! `maxPendingRequests` requests waiting for one of them to free up. What
//! exceeds a limit is shed at once (503, flag `UO`) instead of queueing
//! without bound.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::Notify;

/// No limit.
const UNLIMITED: u32 = u32::MAX;

/// The connection count and limits of one service. The limits can change
/// while connections are open (a reload); the counts stay.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: AtomicU32,
    max_pending: AtomicU32,
    open: AtomicU32,
    pending: AtomicU32,
    /// Wakes waiters when a connection closes or goes idle.
    freed: Notify,
}

/// One open connection's place under the limit, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<ConnectionLimit>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// Why no connection could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Too many requests already wait.
    Pending,
    /// None freed up in time.
    Connections,
}

impl ConnectionLimit {
    /// `None`: no limit.
    pub fn new(max: Option<u32>, max_pending: Option<u32>) -> Arc<Self> {
        let limit = Arc::new(Self {
            max: AtomicU32::new(UNLIMITED),
            max_pending: AtomicU32::new(UNLIMITED),
            open: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            freed: Notify::new(),
        });
        limit.set_limits(max, max_pending);
        limit
    }

    /// Makes these the limits from now on (`None`: no limit); waiters
    /// look again.
    pub fn set_limits(&self, max: Option<u32>, max_pending: Option<u32>) {
        self.max.store(max.unwrap_or(UNLIMITED), Ordering::Release);
        self.max_pending
            .store(max_pending.unwrap_or(UNLIMITED), Ordering::Release);
        self.freed.notify_waiters();
    }

    /// A place for one more connection, if the limit has one now.
    pub fn try_open(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max.load(Ordering::Acquire)).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// Tells waiters a connection went idle (they may reuse it).
    pub fn idle(&self) {
        self.freed.notify_waiters();
    }

    /// Waits, as one pending request, until `ready` yields something
    /// (checked now and whenever a connection frees up), for at most `wait`.
    pub async fn wait_for<T>(
        &self,
        wait: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T, Overflow> {
        let pending = self.pending.fetch_add(1, Ordering::AcqRel);
        let _pending = Pending(&self.pending);
        if pending >= self.max_pending.load(Ordering::Acquire) {
            return Err(Overflow::Pending);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(found) = ready() {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return ready().ok_or(Overflow::Connections);
            }
        }
    }

    /// (connections at the limit, pending requests at theirs)
    pub fn state(&self) -> (bool, bool) {
        let open = self.open.load(Ordering::Acquire) >= self.max.load(Ordering::Acquire);
        let pending =
            self.pending.load(Ordering::Acquire) >= self.max_pending.load(Ordering::Acquire);
        (open, pending)
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }
}

struct Pending<'a>(&'a AtomicU32);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_limited_and_given_back() {
        let limit = ConnectionLimit::new(Some(2), None);
        let a = limit.try_open().expect("first");
        let _b = limit.try_open().expect("second");
        assert!(limit.try_open().is_none());
        assert_eq!(limit.state(), (true, false));
        drop(a);
        assert!(limit.try_open().is_some());
    }

    #[tokio::test]
    async fn a_waiter_gets_the_freed_slot_and_extra_waiters_are_shed() {
        let limit = ConnectionLimit::new(Some(1), Some(1));
        let held = limit.try_open().expect("slot");
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move {
                let l = limit.clone();
                limit
                    .wait_for(Duration::from_secs(5), || l.try_open())
                    .await
                    .map(|_| ())
            })
        };
        // Let the waiter queue up; a second one finds the queue full.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let shed = limit
            .wait_for(Duration::from_secs(5), || limit.try_open())
            .await;
        assert_eq!(shed.err(), Some(Overflow::Pending));
        drop(held);
        assert_eq!(waiter.await.expect("joined"), Ok(()));
    }

    #[tokio::test]
    async fn waiting_ends_at_its_limit() {
        let limit = ConnectionLimit::new(Some(1), None);
        let _held = limit.try_open().expect("slot");
        let got = limit
            .wait_for(Duration::from_millis(50), || limit.try_open())
            .await;
        assert_eq!(got.err(), Some(Overflow::Connections));
    }

    #[test]
    fn limits_change_in_place_and_counts_stay() {
        let limit = ConnectionLimit::new(None, None);
        let held: Vec<_> = (0..3)
            .map(|_| limit.try_open().expect("unlimited"))
            .collect();
        limit.set_limits(Some(3), None);
        assert!(limit.try_open().is_none(), "the open ones count");
        limit.set_limits(Some(4), None);
        assert!(limit.try_open().is_some());
        limit.set_limits(None, None);
        assert_eq!(limit.state(), (false, false));
        drop(held);
        assert_eq!(limit.open(), 0);
    }
}
