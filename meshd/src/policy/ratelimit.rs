//! Local rate limiting: token buckets per destination service and per
//! (service, source workload), so one noisy pod cannot starve its
//! neighbours. Pure arithmetic over an explicit clock.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

/// Limits as configured: a steady rate and a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limit {
    /// Requests per second, sustained.
    pub rps: f64,
    /// Requests that may arrive at once. Default: one second's worth.
    pub burst: Option<f64>,
}

impl Limit {
    fn capacity(&self) -> f64 {
        self.burst.unwrap_or(self.rps).max(1.0)
    }
}

/// A token bucket; `now` is time since any fixed origin.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Duration,
}

impl Bucket {
    pub fn full(limit: &Limit) -> Self {
        Self {
            tokens: limit.capacity(),
            last: Duration::ZERO,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, limit: &Limit, now: Duration) -> bool {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * limit.rps).min(limit.capacity());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Service,
    Source,
}

/// The buckets of one service. The limits can change (a reload): the
/// buckets keep their tokens, and the new rate and burst apply from then on.
#[derive(Debug, Default)]
pub struct ServiceLimiter {
    /// Whether any limit is set: a service without limits takes no lock.
    limited: AtomicBool,
    service: Mutex<Option<(Limit, Bucket)>>,
    per_source: Mutex<Option<(Limit, HashMap<String, Bucket>)>>,
}

impl ServiceLimiter {
    pub fn new(service: Option<Limit>, per_source: Option<Limit>) -> Self {
        let limiter = Self::default();
        limiter.set_limits(service, per_source);
        limiter
    }

    /// Makes these the limits from now on. A limit that was already set
    /// keeps its buckets (no refill); a new one starts full; a removed one
    /// is forgotten.
    pub fn set_limits(&self, service: Option<Limit>, per_source: Option<Limit>) {
        self.limited
            .store(service.is_some() || per_source.is_some(), Ordering::Release);
        let mut current = lock(&self.service);
        *current = service.map(|limit| match current.take() {
            Some((_, bucket)) => (limit, bucket),
            None => (limit, Bucket::full(&limit)),
        });
        drop(current);
        let mut current = lock(&self.per_source);
        *current = per_source.map(|limit| match current.take() {
            Some((_, buckets)) => (limit, buckets),
            None => (limit, HashMap::new()),
        });
    }

    /// Admits a request from `source` at `now`, or says which limit
    /// refused it. The source's own bucket is checked first, so a noisy
    /// source spends its tokens before it can drain the shared ones.
    pub fn admit(&self, source: &str, now: Duration) -> Result<(), Refused> {
        if !self.limited.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some((limit, buckets)) = &mut *lock(&self.per_source) {
            // Allocates a key only the first time a source is seen.
            if !buckets.contains_key(source) {
                buckets.insert(source.to_owned(), Bucket::full(limit));
            }
            let bucket = buckets.get_mut(source).expect("inserted above");
            if !bucket.try_take(limit, now) {
                return Err(Refused::Source);
            }
        }
        if let Some((limit, bucket)) = &mut *lock(&self.service) {
            if !bucket.try_take(limit, now) {
                return Err(Refused::Service);
            }
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rps: f64, burst: f64) -> Limit {
        Limit {
            rps,
            burst: Some(burst),
        }
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let l = limit(10.0, 5.0);
        let mut bucket = Bucket::full(&l);
        let at = |ms| Duration::from_millis(ms);
        let admitted = (0..8).filter(|_| bucket.try_take(&l, at(0))).count();
        assert_eq!(admitted, 5);
        // 100 ms later one more token has dripped in.
        assert!(bucket.try_take(&l, at(100)));
        assert!(!bucket.try_take(&l, at(100)));
        // Idle for a long time: back to a full burst, no more.
        let admitted = (0..8).filter(|_| bucket.try_take(&l, at(10_000))).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn a_noisy_source_is_held_to_its_own_share() {
        let limiter = ServiceLimiter::new(Some(limit(100.0, 100.0)), Some(limit(10.0, 10.0)));
        let now = Duration::from_secs(1);
        let noisy = (0..50)
            .filter(|_| limiter.admit("noisy", now).is_ok())
            .count();
        assert_eq!(noisy, 10);
        assert_eq!(limiter.admit("noisy", now), Err(Refused::Source));
        // Its neighbour still gets through.
        assert_eq!(limiter.admit("quiet", now), Ok(()));
    }

    #[test]
    fn the_service_limit_caps_everyone_together() {
        let limiter = ServiceLimiter::new(Some(limit(1.0, 3.0)), None);
        let now = Duration::from_secs(5);
        let admitted = ["a", "b", "c", "d", "e"]
            .iter()
            .filter(|s| limiter.admit(s, now).is_ok())
            .count();
        assert_eq!(admitted, 3);
        assert_eq!(limiter.admit("f", now), Err(Refused::Service));
    }

    #[test]
    fn changed_limits_keep_the_tokens_left() {
        let limiter = ServiceLimiter::new(Some(limit(1.0, 3.0)), None);
        let now = Duration::from_secs(5);
        assert_eq!(
            (0..3).filter(|_| limiter.admit("a", now).is_ok()).count(),
            3
        );
        // A reload that raises the burst does not refill the bucket...
        limiter.set_limits(Some(limit(1.0, 10.0)), None);
        assert_eq!(limiter.admit("a", now), Err(Refused::Service));
        // ...but the new rate fills it from now on, up to the new burst.
        let later = now + Duration::from_secs(20);
        assert_eq!(
            (0..20)
                .filter(|_| limiter.admit("a", later).is_ok())
                .count(),
            10
        );
        limiter.set_limits(None, None);
        assert!((0..20).all(|_| limiter.admit("a", later).is_ok()));
    }
}
