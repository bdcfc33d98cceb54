//! meshd: a sidecarless service-mesh data plane. eBPF programs steer pod
//! sockets into this one node proxy.
//!
//! Layers, lowest first; a module uses those below it, never one above:
//!
//! | layer | |
//! |---|---|
//! | `net`, `spiffe`, `policy`, `config` | sockets and relays; the SPIFFE ID type; pure decisions; the schema and its validation |
//! | `state` | the config snapshot (lookups) and the runtime state that outlives it |
//! | `identity`, `capture`, `hbone`, `telemetry` | certificates and TLS; the eBPF loader; the tunnel pool; metrics and results |
//! | `discovery` | the cluster's objects translated into config files (beside `capture`, `hbone`) |
//! | `proxy` | outbound, inbound, TCP and HTTP stages |
//! | `admin`, `app`, `cli` | status listeners and admin API; start-up, reload, hand-over; what the command-line binaries share |
// Unsafe only where descriptors arrive from another process (handover) and
// where a cgroup id is opened as a file handle (capture).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod hbone;
pub mod identity;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod spiffe;
pub mod state;
pub mod telemetry;
