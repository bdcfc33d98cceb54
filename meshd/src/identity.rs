//! Workload identities: SPIFFE IDs, the certificates that prove them, and
//! meshd's certificate authority.

pub mod ca;
pub mod store;
pub mod tls;

pub use crate::spiffe::{Identity, IdentityError};
