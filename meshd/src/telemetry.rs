//! What meshd reports: Istio's standard metrics and meshd's own, in the
//! Prometheus text format.

pub mod metrics;
