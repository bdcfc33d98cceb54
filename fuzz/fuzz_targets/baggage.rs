//! Any header value as baggage: decoding never panics and keeps only
//! short, tame values (what could reach a label if the config allowed it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let baggage = meshd::hbone::Baggage::decode(value);
    for kept in [&baggage.workload, &baggage.app, &baggage.version]
        .into_iter()
        .flatten()
    {
        assert!(kept.len() <= 253, "{kept:?}");
        assert!(
            kept.bytes().all(|b| b.is_ascii_graphic()),
            "{kept:?} from {value:?}"
        );
    }
    let again = meshd::hbone::Baggage::decode(&baggage.encode());
    assert_eq!(again, baggage, "{value:?}");
});
