//! What the proxy looks things up in: the snapshot of a validated config
//! (immutable, swapped whole on reload) and the ids and address types it
//! is keyed by.

pub mod ids;
pub mod snapshot;
