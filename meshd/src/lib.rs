//! meshd: a sidecarless service-mesh data plane. eBPF programs steer pod
//! sockets into this one node proxy.
// Unsafe only where descriptors arrive from another process (handover).
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod breaker;
pub mod capture;
pub mod config;
pub mod daemon;
#[allow(unsafe_code)]
pub mod handover;
pub mod health;
pub mod host;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod outlier;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod retry;
pub mod routing;
pub mod status;
pub mod tunnel;
