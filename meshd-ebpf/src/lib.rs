//! Host-side stub so user space can name this crate as a build dependency;
//! the programs themselves live in `main.rs` and build for `bpfel-unknown-none`.
#![no_std]
