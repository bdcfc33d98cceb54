//! Shared test bed for meshd's black-box tests, demo and bench: cgroup and
//! network-namespace guards, a one-node topology, and a handle on a running
//! meshd.
#![forbid(unsafe_code)]

pub mod clients;
pub mod sys;
pub mod testbed;
