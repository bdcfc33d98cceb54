//! Any path, in every normalization mode: normalizing never panics, is
//! idempotent (the path forwarded is the path matched, and matching it
//! again changes nothing), and a deny rule on `/admin` and `/admin/*`
//! denies every path a case-insensitive backend would take for them, while
//! an allow on `/public/*` admits nothing outside `/public/`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshd::policy::{
    authz::{authorize, Decision, Destination, Http, Request},
    path::{normalize, Normalization},
};

const CONFIG: &str = "node: { name: node-a, captureAddress: 10.77.0.1, podCgroup: /pods }
services:
  - name: web
    vip: 10.96.0.20
    ports: [{ port: 80, protocol: http }]
    endpoints: [{ address: 10.77.0.11 }]
  - name: api
    vip: 10.96.0.21
    ports: [{ port: 80, protocol: http }]
    endpoints: [{ address: 10.77.0.12 }]
policies:
  - name: no-admin
    target: { service: default/web }
    action: deny
    paths: [/admin, /admin/*]
  - name: public-only
    target: { service: default/api }
    action: allow
    paths: [/public/*]
";

fn config() -> &'static meshd::config::Config {
    static CONFIG_ONCE: OnceLock<meshd::config::Config> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| meshd::config::load_str("fuzz.yaml", CONFIG).expect("fuzz config"))
}

fn decide(service: usize, path: &str) -> Decision {
    let headers = hyper::HeaderMap::new();
    let method = hyper::Method::GET;
    authorize(
        &config().policies,
        &Request {
            source: None,
            destination: Destination {
                services: &[service],
                workload: None,
            },
            port: 80,
            http: Some(Http {
                method: &method,
                path,
                headers: &headers,
            }),
        },
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let _ = meshd::policy::path::miscased_method(path);
    for mode in [
        Normalization::Base,
        Normalization::MergeSlashes,
        Normalization::DecodeAndMergeSlashes,
    ] {
        let Ok(normalized) = normalize(path, mode) else {
            continue;
        };
        assert_eq!(
            normalize(&normalized, mode).as_deref(),
            Ok(normalized.as_str()),
            "not idempotent in {mode:?}: {path:?}"
        );
        let lower = normalized.to_ascii_lowercase();
        if lower == "/admin" || lower.starts_with("/admin/") {
            assert!(
                matches!(decide(0, &normalized), Decision::Deny { .. }),
                "{path:?} -> {normalized:?} passed the deny on /admin"
            );
        }
        if !normalized.starts_with("/public/") {
            assert!(
                !matches!(decide(1, &normalized), Decision::Allow),
                "{path:?} -> {normalized:?} passed the allow on /public/*"
            );
        }
    }
});
