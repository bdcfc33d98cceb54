//! Any string as a SPIFFE ID: parsing never panics, and an accepted ID has
//! DNS-label namespace and service account and prints back as it parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = std::str::from_utf8(data) else {
        return;
    };
    let _ = meshd::spiffe::Identity::parse_in(uri, "cluster.local");
    if let Ok(identity) = meshd::spiffe::Identity::parse(uri) {
        assert!(meshd::spiffe::is_dns_label(identity.namespace()));
        assert!(meshd::spiffe::is_dns_label(identity.service_account()));
        let again = meshd::spiffe::Identity::parse(identity.uri()).expect("reparse");
        assert_eq!(again, identity);
    }
});
