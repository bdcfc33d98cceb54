//! Any bytes on a relayed stream, both ways: the HTTP/1 and HTTP/2
//! followers never panic, whatever a peer or a pod sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::proxy::inbound::fuzz_observers(data));
