//! Load balancing across a backend's endpoints: round robin, least request,
//! random, and power of two choices over peak-EWMA latency (the default,
//! as in Linkerd). Pure decisions over per-endpoint statistics that the
//! proxy updates as requests start and finish.

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    RoundRobin,
    LeastRequest,
    Random,
    #[default]
    P2cEwma,
}

/// How fast the latency estimate forgets the past.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate a never-measured endpoint starts with.
const DEFAULT_RTT_NANOS: u64 = 1_000_000;

/// What the balancer knows of one endpoint. Atomics: many requests update
/// it at once; an occasional lost EWMA update is harmless.
#[derive(Debug)]
pub struct EndpointStats {
    pub in_flight: AtomicU64,
    /// Peak-EWMA round-trip estimate, nanoseconds.
    ewma_nanos: AtomicU64,
    /// When the estimate last changed, nanoseconds on the caller's clock.
    updated_nanos: AtomicU64,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            ewma_nanos: AtomicU64::new(DEFAULT_RTT_NANOS),
            updated_nanos: AtomicU64::new(0),
        }
    }
}

impl EndpointStats {
    /// Folds in one observed latency at time `now` (both in nanoseconds):
    /// a slower sample is taken at once (peak), a faster one decays in.
    pub fn observe(&self, rtt_nanos: u64, now_nanos: u64) {
        let previous = self.ewma_nanos.load(Ordering::Relaxed);
        let last = self.updated_nanos.swap(now_nanos, Ordering::Relaxed);
        let next = if rtt_nanos > previous {
            rtt_nanos
        } else {
            let elapsed = now_nanos.saturating_sub(last) as f64;
            let keep = (-elapsed / DECAY.as_nanos() as f64).exp();
            (previous as f64 * keep + rtt_nanos as f64 * (1.0 - keep)) as u64
        };
        self.ewma_nanos.store(next.max(1), Ordering::Relaxed);
    }

    /// Requests outstanding on the endpoint now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Linkerd's cost: expected latency scaled by the queue it would join.
    fn cost(&self) -> u64 {
        self.ewma_nanos
            .load(Ordering::Relaxed)
            .saturating_mul(self.in_flight.load(Ordering::Relaxed) + 1)
    }
}

/// Picks one of `candidates` (endpoint indexes; `stats` gives each one's
/// statistics). `next` is the service's round-robin position; `random` two
/// independent random numbers.
pub fn pick<'a>(
    policy: Policy,
    candidates: &[usize],
    stats: impl Fn(usize) -> &'a EndpointStats,
    next: &AtomicUsize,
    random: [u64; 2],
) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    if n == 1 {
        return Some(candidates[0]);
    }
    let index = match policy {
        Policy::RoundRobin => next.fetch_add(1, Ordering::Relaxed) % n,
        Policy::Random => (random[0] % n as u64) as usize,
        Policy::LeastRequest | Policy::P2cEwma => {
            // Two distinct candidates at random; the cheaper one wins.
            let a = (random[0] % n as u64) as usize;
            let b = (a + 1 + (random[1] % (n as u64 - 1)) as usize) % n;
            let cost = |i: usize| {
                let s = stats(candidates[i]);
                match policy {
                    Policy::LeastRequest => s.in_flight.load(Ordering::Relaxed),
                    _ => s.cost(),
                }
            };
            if cost(b) < cost(a) {
                b
            } else {
                a
            }
        }
    };
    Some(candidates[index])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(n: usize) -> Vec<EndpointStats> {
        (0..n).map(|_| EndpointStats::default()).collect()
    }

    /// A tiny deterministic generator for the tests.
    fn rolls(seed: u64) -> impl FnMut() -> [u64; 2] {
        let mut x = seed;
        move || {
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            [next(), next()]
        }
    }

    #[test]
    fn round_robin_cycles() {
        let s = stats(3);
        let next = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(Policy::RoundRobin, &[0, 1, 2], |e| &s[e], &next, [0, 0]).expect("pick"))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_endpoint() {
        let s = stats(3);
        // Endpoint 2 answers in 50 ms, the others in 1 ms.
        for (i, rtt) in [(0, 1_000_000), (1, 1_000_000), (2, 50_000_000)] {
            s[i].observe(rtt, 1);
        }
        let next = AtomicUsize::new(0);
        let mut roll = rolls(7);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[pick(Policy::P2cEwma, &[0, 1, 2], |e| &s[e], &next, roll()).expect("pick")] += 1;
        }
        // The slow one is only chosen when it is drawn twice — never, as
        // the two draws are distinct.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > 1000 && counts[1] > 1000, "{counts:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let s = stats(2);
        s[0].in_flight.store(5, Ordering::Relaxed);
        let next = AtomicUsize::new(0);
        for r in 0..10 {
            assert_eq!(
                pick(Policy::LeastRequest, &[0, 1], |e| &s[e], &next, [r, r * 3]),
                Some(1)
            );
        }
    }

    #[test]
    fn ewma_takes_peaks_at_once_and_decays_back() {
        let s = EndpointStats::default();
        s.observe(1_000_000, 0);
        s.observe(100_000_000, 1);
        assert_eq!(s.ewma_nanos.load(Ordering::Relaxed), 100_000_000);
        // Ten decay periods of fast answers later, the peak is forgotten.
        s.observe(1_000_000, 1 + 10 * DECAY.as_nanos() as u64);
        assert!(s.ewma_nanos.load(Ordering::Relaxed) < 2_000_000);
    }

    #[test]
    fn no_candidates_no_pick() {
        assert_eq!(
            pick(
                Policy::Random,
                &[],
                |_| unreachable!("no candidate to look at"),
                &AtomicUsize::new(0),
                [1, 2]
            ),
            None
        );
    }
}
