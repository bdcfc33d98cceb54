//! The status listeners (`/metrics` on :15020, readiness on :15021) and the
//! admin API on loopback :15000, with `meshd status` reading it.

pub mod api;
pub mod graph;
pub mod listeners;
pub mod reloads;

pub use api::{install_log_control, status_command, LogControl};
pub use listeners::{BindError, StatusInputs, StatusListener};
pub use reloads::ReloadState;
