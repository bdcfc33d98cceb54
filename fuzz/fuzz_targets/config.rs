//! Any text as a config file: validation reports problems, never panics;
//! a config it accepts is accepted again from the same text; a text both
//! YAML readers (streaming and serde_yaml) accept, they read alike.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(difference) = meshd::config::streaming_matches_serde_yaml(text) {
        panic!("{difference}");
    }
    if let Ok(config) = meshd::config::load_str("fuzz.yaml", text) {
        let again =
            meshd::config::load_str("fuzz.yaml", text).expect("accepted once, accepted twice");
        assert_eq!(config.services.len(), again.services.len());
    }
});
