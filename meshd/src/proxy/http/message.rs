//! The shape of an HTTP message as it crosses meshd: hop-by-hop headers
//! removed (RFC 9110), the request head rewritten for the upstream's HTTP
//! version, meshd's own answers, upgraded connections joined, and the
//! first-bytes sniffing of `auto` ports.

use std::time::Duration;

use hyper::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Request, Response, Uri, Version,
};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::upstream::Body;
use crate::config::Protocol;

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `TE: trailers` survives (gRPC needs it), as does `Upgrade` when the
/// request upgrades.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrading && name == header::UPGRADE))
        .collect();
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Joins a client's connection to an upstream's once both have switched
/// protocols (a 101 answer), and relays between them.
pub fn splice_upgrade<B: Send + 'static>(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: Response<B>,
) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, hyper::upgrade::on(upstream)) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
            Err(err) => debug!(error = %err, "upgrade failed"),
        }
    });
}

/// A request as the upstream must see it, minus its body: hop-by-hop
/// headers gone, the URI in the form the upstream's HTTP version wants.
/// Built once; each try sends a copy.
pub(super) struct Head {
    method: hyper::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    /// `path`: the request's path as it goes out (normalized), its query
    /// kept.
    pub(super) fn outgoing(
        parts: &hyper::http::request::Parts,
        path: &str,
        http2: bool,
    ) -> Option<Self> {
        let mut headers = parts.headers.clone();
        let upgrading = headers.contains_key(header::UPGRADE) && !http2;
        strip_hop_by_hop(&mut headers, upgrading);
        let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })?;
        let path = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_owned(),
        };
        let (version, uri) = if http2 {
            headers.remove(header::HOST);
            let uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path.as_str())
                .build()
                .ok()?;
            (Version::HTTP_2, uri)
        } else {
            if !headers.contains_key(header::HOST) {
                headers.insert(header::HOST, HeaderValue::from_str(&authority).ok()?);
            }
            let uri = Uri::builder().path_and_query(path.as_str()).build().ok()?;
            (Version::HTTP_11, uri)
        };
        Some(Self {
            method: parts.method.clone(),
            uri,
            version,
            headers,
        })
    }

    /// Whether the head is for an HTTP/2 upstream.
    pub(super) fn http2(&self) -> bool {
        self.version == Version::HTTP_2
    }

    pub(super) fn request(&self, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// How long `auto` waits for a client's first bytes before treating the
/// connection as plain TCP (a server-speaks-first protocol).
pub const SNIFF_WAIT: Duration = Duration::from_millis(200);

/// Classifies a client's first bytes: HTTP/2 preface, an HTTP/1 request
/// line, or anything else.
pub fn sniff(bytes: &[u8]) -> Protocol {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    if bytes.starts_with(PREFACE) {
        Protocol::Http2
    } else if METHODS.iter().any(|m| bytes.starts_with(m)) {
        Protocol::Http
    } else {
        Protocol::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header;

    #[test]
    fn sniffs_http_versions_and_falls_back_to_tcp() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Protocol::Http2);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Protocol::Http);
        assert_eq!(sniff(b"POST /x HTTP/1.1\r\n"), Protocol::Http);
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00"), Protocol::Tcp);
        assert_eq!(sniff(b"GETX"), Protocol::Tcp);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_survives() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(headers[header::TE], "trailers");

        let mut upgrade = HeaderMap::new();
        upgrade.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[header::UPGRADE], "websocket");
        assert_eq!(upgrade[header::CONNECTION], "upgrade");
    }
}
