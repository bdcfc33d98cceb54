//! Pure decisions, no I/O: authorization, routing, load balancing,
//! retries, outlier detection, rate limits, circuit-breaker limits and
//! health-check thresholds. Each takes what it decides on and returns an
//! answer; the proxy does the I/O around them.

pub mod authz;
pub mod balance;
pub mod breaker;
pub mod health;
pub mod outlier;
pub mod path;
pub mod ratelimit;
pub mod retry;
pub mod routing;
