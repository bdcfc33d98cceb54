//! What meshd reports: Istio's standard metrics and meshd's own (in the
//! Prometheus text format), and one result object per connection and per
//! request that records them — and the access log — on every way out.

pub mod access;
pub mod body;
pub mod flags;
pub mod graph;
pub mod labels;
pub mod metrics;
pub mod result;
pub mod spans;
pub mod trace;

pub use flags::ResponseFlag;
pub use result::{ConnectionResult, RequestResult};
