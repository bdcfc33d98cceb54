//! What the proxy looks things up in: the snapshot of a validated config
//! (immutable, swapped whole on reload), the runtime state that outlives
//! it (carried over by stable id), and the ids and address types both are
//! keyed by.

pub mod ids;
pub mod runtime;
pub mod snapshot;
