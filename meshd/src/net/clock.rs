//! One monotonic clock for the decisions that take time as a number
//! (balancer, outlier detection, rate limits, retry budgets): time since a
//! fixed origin, the first time anyone asked.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

fn origin() -> &'static Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now)
}

/// Time since the origin.
pub fn since_origin() -> Duration {
    origin().elapsed()
}

/// `instant` as time since the origin (zero for an instant before it).
pub fn at(instant: Instant) -> Duration {
    instant.saturating_duration_since(*origin())
}

/// Nanoseconds since the origin.
pub fn now_nanos() -> u64 {
    since_origin().as_nanos() as u64
}
