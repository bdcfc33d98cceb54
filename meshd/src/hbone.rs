//! Tunnels between nodes, HBONE-style: HTTP/2 CONNECT over mutual TLS 1.3,
//! `:authority` = the endpoint's `ip:port`, many streams per connection.
//! `pool` is the source side; the destination side (:15008) is
//! `proxy::inbound`. The HTTP/2 settings both sides use live here.

pub mod pool;

use std::{sync::Arc, time::Duration};

/// HTTP/2 flow control. A stream's window is large enough for one stream
/// to fill a fast link; the connection's is the sum of all its streams'
/// windows, so streams whose reader stopped (their windows full, released
/// only as the reader reads) can never use up the connection's window and
/// stall their neighbours. Each side buffers at most a stream's window per
/// stream.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * STREAMS_PER_CONNECTION as u32;
/// Streams one tunnel connection carries at once (ztunnel's pool default);
/// the source opens another connection to the same peer beyond them.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// Largest HTTP/2 DATA frame either side accepts: fewer, larger frames
/// for bulk streams.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Streams the destination lets one tunnel connection carry at once: as
/// many as the source opens on one, so the connection window holds.
pub const MAX_STREAMS: u32 = STREAMS_PER_CONNECTION as u32;
/// Limit for the answer to a CONNECT (a stream opening).
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs keep idle pooled connections alive and detect dead peers.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// The request header carrying the source workload's metadata.
pub const BAGGAGE: &str = "baggage";
const MAX_BAGGAGE: usize = 1024;

/// What the source tells the destination about itself, for metrics only
/// (authorization uses the certificate's identity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub workload: Option<Arc<str>>,
    pub app: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    /// `namespace/name` of the service the source addressed.
    pub service: Option<(Arc<str>, Arc<str>)>,
}

impl Baggage {
    /// What the source node says of `source`, addressing `service`.
    pub fn of(source: &crate::config::Workload, service: &crate::config::Service) -> Self {
        Self {
            workload: Some(source.name.clone()),
            app: Some(source.reported.app.clone()),
            version: Some(source.reported.version.clone()),
            service: Some((service.namespace.clone(), service.name.clone())),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let mut push = |key: &str, value: &Option<Arc<str>>| {
            if let Some(value) = value {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(key);
                out.push('=');
                out.push_str(value);
            }
        };
        push("k8s.workload.name", &self.workload);
        push("app.name", &self.app);
        push("app.version", &self.version);
        if let Some((namespace, name)) = &self.service {
            push("service.namespace", &Some(namespace.clone()));
            push("service.name", &Some(name.clone()));
        }
        out
    }

    /// Parses a header value; values that are not short DNS-ish tokens are
    /// dropped, so a peer cannot inflate label cardinality with junk.
    pub fn decode(value: &str) -> Self {
        let mut baggage = Self::default();
        if value.len() > MAX_BAGGAGE {
            return baggage;
        }
        let (mut svc_ns, mut svc_name) = (None, None);
        for pair in value.split(',') {
            let Some((key, value)) = pair.trim().split_once('=') else {
                continue;
            };
            if !token(value) {
                continue;
            }
            let value = Some(Arc::from(value));
            match key {
                "k8s.workload.name" => baggage.workload = value,
                "app.name" => baggage.app = value,
                "app.version" => baggage.version = value,
                "service.namespace" => svc_ns = value,
                "service.name" => svc_name = value,
                _ => {}
            }
        }
        if let (Some(ns), Some(name)) = (svc_ns, svc_name) {
            baggage.service = Some((ns, name));
        }
        baggage
    }
}

fn token(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_round_trips_and_drops_junk() {
        let baggage = Baggage {
            workload: Some("productpage-v1".into()),
            app: Some("productpage".into()),
            version: None,
            service: Some(("default".into(), "reviews".into())),
        };
        let text = baggage.encode();
        assert_eq!(
            text,
            "k8s.workload.name=productpage-v1,app.name=productpage,service.namespace=default,service.name=reviews"
        );
        assert_eq!(Baggage::decode(&text), baggage);
        let junk = Baggage::decode("k8s.workload.name=a b,app.name=\u{1F600},app.version=v1");
        assert_eq!(junk.workload, None);
        assert_eq!(junk.app, None);
        assert_eq!(junk.version.as_deref(), Some("v1"));
        assert_eq!(Baggage::decode(&"x".repeat(2000)), Baggage::default());
    }
}
