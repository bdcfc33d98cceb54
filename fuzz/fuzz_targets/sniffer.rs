//! Any first bytes of a connection: the sniffer never panics and never
//! calls something HTTP that does not start like HTTP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::{config::Protocol, proxy::http::sniff};

fuzz_target!(|data: &[u8]| {
    match sniff(data) {
        Protocol::Http2 => assert!(data.starts_with(b"PRI")),
        Protocol::Http => assert!(data.first().is_some_and(|b| b.is_ascii_uppercase())),
        _ => {}
    }
});
