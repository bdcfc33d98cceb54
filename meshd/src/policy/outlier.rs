//! Outlier detection: an endpoint that fails several requests in a row
//! (5xx, gateway errors, connect failures, resets) leaves the rotation for
//! a while, longer each time it is ejected again, but never more than a
//! maximum share of a service's endpoints at once. It comes back by itself
//! when its time is up. Atomics and an explicit clock; no I/O.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

/// As configured under a service's `outlierDetection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Failures in a row that eject an endpoint.
    pub consecutive_errors: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// Largest share of the service's endpoints ejected at once, percent.
    /// One endpoint may always be ejected.
    pub max_ejection_percent: u32,
}

/// The outlier state of one endpoint. Kept in the endpoint's runtime, so
/// it outlives config reloads.
#[derive(Debug, Default)]
pub struct State {
    consecutive: AtomicU32,
    /// Ejected until this time (nanoseconds on the caller's clock); 0: never.
    until: AtomicU64,
    /// Ejections so far; grows the next ejection. Forgotten once the
    /// endpoint has served well for a base ejection time after returning.
    ejections: AtomicU32,
}

impl State {
    /// Whether the endpoint is out of the rotation at `now`.
    pub fn ejected(&self, now: u64) -> bool {
        self.until.load(Ordering::Relaxed) > now
    }

    /// Records how a request ended. Returns true when this failure makes
    /// the endpoint due for ejection; the caller then checks the service's
    /// share (`may_eject`) and calls `eject`, one ejection at a time.
    pub fn record(&self, settings: &Settings, failed: bool, now: u64) -> bool {
        if !failed {
            self.consecutive.store(0, Ordering::Relaxed);
            let until = self.until.load(Ordering::Relaxed);
            let settled = until + settings.base_ejection_time.as_nanos() as u64;
            if until != 0 && now >= settled {
                self.ejections.store(0, Ordering::Relaxed);
                self.until.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let failures = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        failures >= settings.consecutive_errors && !self.ejected(now)
    }

    /// Ejects the endpoint from `now`; returns for how long.
    pub fn eject(&self, settings: &Settings, now: u64) -> Duration {
        let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = settings
            .base_ejection_time
            .saturating_mul(times)
            .min(settings.max_ejection_time);
        self.until
            .store(now + length.as_nanos() as u64, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        length
    }
}

/// Whether one more of a service's `endpoints` may be ejected while
/// `ejected` already are. One endpoint may always be ejected.
pub fn may_eject(settings: &Settings, ejected: usize, endpoints: usize) -> bool {
    let share = endpoints * settings.max_ejection_percent as usize / 100;
    ejected < share.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    /// One service's endpoints, as the snapshot drives them.
    struct Service {
        settings: Settings,
        endpoints: Vec<State>,
    }

    impl Service {
        fn new(endpoints: usize, percent: u32) -> Self {
            Self {
                settings: Settings {
                    consecutive_errors: 3,
                    base_ejection_time: Duration::from_secs(10),
                    max_ejection_time: Duration::from_secs(25),
                    max_ejection_percent: percent,
                },
                endpoints: (0..endpoints).map(|_| State::default()).collect(),
            }
        }

        fn record(&self, endpoint: usize, failed: bool, now: u64) -> Option<Duration> {
            if !self.endpoints[endpoint].record(&self.settings, failed, now) {
                return None;
            }
            let ejected = self.endpoints.iter().filter(|e| e.ejected(now)).count();
            may_eject(&self.settings, ejected, self.endpoints.len())
                .then(|| self.endpoints[endpoint].eject(&self.settings, now))
        }

        fn ejected(&self, endpoint: usize, now: u64) -> bool {
            self.endpoints[endpoint].ejected(now)
        }
    }

    #[test]
    fn consecutive_failures_eject_and_time_brings_it_back() {
        let d = Service::new(4, 50);
        assert_eq!(d.record(0, true, SECOND), None);
        assert_eq!(d.record(0, false, SECOND), None, "a success resets the run");
        assert_eq!(d.record(0, true, SECOND), None);
        assert_eq!(d.record(0, true, SECOND), None);
        assert_eq!(
            d.record(0, true, SECOND),
            Some(Duration::from_secs(10)),
            "third in a row"
        );
        assert!(d.ejected(0, 5 * SECOND));
        assert!(!d.ejected(0, 11 * SECOND + 1), "back after its time");
    }

    #[test]
    fn each_ejection_lasts_longer_up_to_the_maximum() {
        let d = Service::new(4, 50);
        let mut now = SECOND;
        let mut lengths = vec![];
        for _ in 0..4 {
            let got = (0..3)
                .find_map(|_| d.record(1, true, now))
                .expect("ejected");
            lengths.push(got.as_secs());
            now += got.as_nanos() as u64 + 1;
        }
        assert_eq!(lengths, [10, 20, 25, 25]);
        // Serving well for a base time after returning forgets the history.
        d.record(1, false, now + 11 * SECOND);
        let got = (0..3).find_map(|_| d.record(1, true, now + 12 * SECOND));
        assert_eq!(got, Some(Duration::from_secs(10)));
    }

    #[test]
    fn never_more_than_the_maximum_share_at_once() {
        let d = Service::new(4, 50);
        let ejected = (0..4)
            .filter(|e| (0..3).any(|_| d.record(*e, true, SECOND).is_some()))
            .count();
        assert_eq!(ejected, 2);
        // One endpoint may always go, however small the share.
        let d = Service::new(3, 10);
        assert!((0..3).any(|_| d.record(2, true, SECOND).is_some()));
        assert!(!(0..3).any(|_| d.record(1, true, SECOND).is_some()));
    }
}
