//! The lowest layer: listening sockets, the accept loop with its drain,
//! the byte relay, and the clock the decisions use. No mesh knowledge.

pub mod accept;
pub mod clock;
pub mod idle;
pub mod listen;
pub mod relay;
pub mod workers;
