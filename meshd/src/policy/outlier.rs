//! Outlier detection: an endpoint that fails several requests in a row
//! (5xx, gateway errors, connect failures, resets) leaves the rotation for
//! a while, longer each time it is ejected again, but never more than a
//! maximum share of a service's endpoints at once. It comes back by itself
//! when its time is up. Atomics and an explicit clock; no I/O.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Mutex,
    },
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

#[derive(Debug, Default)]
struct State {
    consecutive: AtomicU32,
    /// Ejected until this time (nanoseconds on the caller's clock); 0: never.
    until: AtomicU64,
    /// Ejections so far; grows the next ejection. Forgotten once the
    /// endpoint has served well for a base ejection time after returning.
    ejections: AtomicU32,
}

/// The outlier state of one service's endpoints.
#[derive(Debug)]
pub struct Detector {
    settings: Option<Settings>,
    endpoints: Vec<State>,
    /// Serialises ejections, so the maximum share holds.
    ejecting: Mutex<()>,
}

impl Detector {
    pub fn new(settings: Option<Settings>, endpoints: usize) -> Self {
        Self {
            settings,
            endpoints: (0..endpoints).map(|_| State::default()).collect(),
            ejecting: Mutex::new(()),
        }
    }

    /// Whether `endpoint` is out of the rotation at `now`.
    pub fn ejected(&self, endpoint: usize, now: u64) -> bool {
        self.endpoints[endpoint].until.load(Ordering::Relaxed) > now
    }

    /// How many endpoints are ejected at `now`.
    pub fn ejected_count(&self, now: u64) -> usize {
        (0..self.endpoints.len())
            .filter(|e| self.ejected(*e, now))
            .count()
    }

    /// Records how a request to `endpoint` ended. Returns the ejection's
    /// length when this failure ejected the endpoint.
    pub fn record(&self, endpoint: usize, failed: bool, now: u64) -> Option<Duration> {
        let settings = self.settings?;
        let state = &self.endpoints[endpoint];
        if !failed {
            state.consecutive.store(0, Ordering::Relaxed);
            let until = state.until.load(Ordering::Relaxed);
            let settled = until + settings.base_ejection_time.as_nanos() as u64;
            if until != 0 && now >= settled {
                state.ejections.store(0, Ordering::Relaxed);
                state.until.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let failures = state.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < settings.consecutive_errors || self.ejected(endpoint, now) {
            return None;
        }
        let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let share = self.endpoints.len() * settings.max_ejection_percent as usize / 100;
        if self.ejected_count(now) >= share.max(1) {
            return None;
        }
        let times = state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = settings
            .base_ejection_time
            .saturating_mul(times)
            .min(settings.max_ejection_time);
        state
            .until
            .store(now + length.as_nanos() as u64, Ordering::Relaxed);
        state.consecutive.store(0, Ordering::Relaxed);
        Some(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn detector(endpoints: usize, percent: u32) -> Detector {
        Detector::new(
            Some(Settings {
                consecutive_errors: 3,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_time: Duration::from_secs(25),
                max_ejection_percent: percent,
            }),
            endpoints,
        )
    }

    #[test]
    fn consecutive_failures_eject_and_time_brings_it_back() {
        let d = detector(4, 50);
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
        let d = detector(4, 50);
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
        let d = detector(4, 50);
        let ejected = (0..4)
            .filter(|e| (0..3).any(|_| d.record(*e, true, SECOND).is_some()))
            .count();
        assert_eq!(ejected, 2);
        assert_eq!(d.ejected_count(SECOND), 2);
        // One endpoint may always go, however small the share.
        let d = detector(3, 10);
        assert!((0..3).any(|_| d.record(2, true, SECOND).is_some()));
        assert!(!(0..3).any(|_| d.record(1, true, SECOND).is_some()));
    }

    #[test]
    fn without_settings_nothing_is_ejected() {
        let d = Detector::new(None, 2);
        assert!((0..100).all(|_| d.record(0, true, SECOND).is_none()));
    }
}
