//! Trace context as it travels in request headers: W3C `traceparent` (and
//! `tracestate`, passed on untouched), or Zipkin's B3 (`b3`, or the
//! `x-b3-*` headers) when no `traceparent` came. Pure: parsing, formatting
//! and the sampling decision; spans are made and exported elsewhere.

use hyper::{header::HeaderValue, HeaderMap};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Where a span sits in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// What a request's headers say of the trace it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's span; none: this request starts a trace.
    pub parent: Option<SpanContext>,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
}

impl Incoming {
    /// Reads `traceparent`, else B3. Malformed values count as absent (W3C:
    /// a vendor that cannot parse `traceparent` starts a new trace).
    pub fn read(headers: &HeaderMap) -> Self {
        if let Some(parent) = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
        {
            return Self {
                parent: Some(parent),
                sampled: Some(parent.sampled),
            };
        }
        read_b3(headers)
    }

    /// The span a proxy makes for this request: a child of the caller's (in
    /// its trace, with its decision), or the root of a new trace sampled at
    /// `ratio`. `random` gives fresh ids.
    pub fn child(&self, ratio: f64, mut random: impl FnMut() -> u64) -> Span {
        let mut span_id = [0u8; 8];
        while span_id == [0; 8] {
            span_id = random().to_be_bytes();
        }
        let (trace_id, parent) = match self.parent {
            Some(parent) => (parent.trace_id, Some(parent.span_id)),
            None => {
                let mut id = [0u8; 16];
                while id == [0; 16] {
                    id[..8].copy_from_slice(&random().to_be_bytes());
                    id[8..].copy_from_slice(&random().to_be_bytes());
                }
                (id, None)
            }
        };
        let sampled = self.sampled.unwrap_or_else(|| {
            // `random` is uniform over u64: below `ratio` of its range.
            (random() as f64) < ratio.clamp(0.0, 1.0) * u64::MAX as f64
        });
        Span {
            context: SpanContext {
                trace_id,
                span_id,
                sampled,
            },
            parent,
        }
    }
}

/// A span's place: its own context and its parent's span id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
}

impl Span {
    /// The same trace one level down: this span as the parent.
    pub fn as_incoming(&self) -> Incoming {
        Incoming {
            parent: Some(self.context),
            sampled: Some(self.context.sampled),
        }
    }
}

/// Parses a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
/// Later versions may append fields after the flags, which are ignored.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let value = value.trim();
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || !lower_hex(version) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id: [u8; 16] = hex(trace)?;
    let span_id: [u8; 8] = hex(span)?;
    let [flags]: [u8; 1] = hex(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// `traceparent` for `context` (version 00).
pub fn format_traceparent(context: &SpanContext) -> HeaderValue {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &context.trace_id);
    out.push('-');
    push_hex(&mut out, &context.span_id);
    out.push_str(if context.sampled { "-01" } else { "-00" });
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Exactly `2 * N` lowercase hex digits.
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !lower_hex(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A B3 trace id: 32 hex digits, or 16 (the high half zero).
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let s = s.to_ascii_lowercase();
    if s.len() == 16 {
        let low: [u8; 8] = hex(&s)?;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&low);
        return Some(id);
    }
    hex(&s)
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// B3: the single `b3` header (`{trace}-{span}[-{sampled}[-{parent}]]`, or
/// just a sampling decision), else `x-b3-traceid`, `x-b3-spanid`,
/// `x-b3-sampled` (`x-b3-flags: 1` is debug: sampled).
fn read_b3(headers: &HeaderMap) -> Incoming {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let none = Incoming {
        parent: None,
        sampled: None,
    };
    if let Some(single) = get("b3") {
        let parts: Vec<&str> = single.trim().split('-').collect();
        return match parts.as_slice() {
            [decision] => Incoming {
                parent: None,
                sampled: b3_sampled(decision),
            },
            [trace, span, rest @ ..] => {
                let sampled = rest.first().and_then(|s| b3_sampled(s));
                let context = b3_trace_id(trace).zip(hex(&span.to_ascii_lowercase()));
                match context {
                    Some((trace_id, span_id)) if trace_id != [0; 16] && span_id != [0; 8] => {
                        Incoming {
                            parent: Some(SpanContext {
                                trace_id,
                                span_id,
                                sampled: sampled.unwrap_or(false),
                            }),
                            sampled,
                        }
                    }
                    _ => none,
                }
            }
            _ => none,
        };
    }
    let sampled = if get("x-b3-flags") == Some("1") {
        Some(true)
    } else {
        get("x-b3-sampled").and_then(b3_sampled)
    };
    let trace = get("x-b3-traceid").and_then(b3_trace_id);
    let span = get("x-b3-spanid").and_then(|s| hex(&s.to_ascii_lowercase()));
    match trace.zip(span) {
        Some((trace_id, span_id)) if trace_id != [0; 16] && span_id != [0; 8] => Incoming {
            parent: Some(SpanContext {
                trace_id,
                span_id,
                sampled: sampled.unwrap_or(false),
            }),
            sampled,
        },
        _ => Incoming {
            parent: None,
            sampled,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        map
    }

    #[test]
    fn traceparent_round_trips_and_rejects_what_w3c_rejects() {
        let context = parse_traceparent(PARENT).expect("valid");
        assert!(context.sampled);
        assert_eq!(format_traceparent(&context), PARENT);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A later version may add fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert_eq!(parse_traceparent(later).map(|c| c.sampled), Some(false));
    }

    #[test]
    fn a_child_stays_in_the_callers_trace_with_its_decision() {
        let incoming = Incoming::read(&headers(&[(TRACEPARENT, PARENT)]));
        let mut n = 0;
        let span = incoming.child(0.0, || {
            n += 1;
            n
        });
        let parent = parse_traceparent(PARENT).expect("valid");
        assert_eq!(span.context.trace_id, parent.trace_id);
        assert_eq!(span.parent, Some(parent.span_id));
        assert_ne!(span.context.span_id, parent.span_id);
        assert!(
            span.context.sampled,
            "the caller sampled it; ratio 0 does not undo that"
        );
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let incoming = Incoming::read(&headers(&[(TRACEPARENT, unsampled)]));
        assert!(!incoming.child(1.0, || fastrand::u64(..)).context.sampled);
    }

    #[test]
    fn a_new_trace_is_sampled_at_the_ratio() {
        let none = Incoming::read(&HeaderMap::new());
        assert_eq!(none.parent, None);
        let sampled = (0..2000)
            .filter(|_| none.child(0.25, || fastrand::u64(..)).context.sampled)
            .count();
        assert!((350..650).contains(&sampled), "{sampled} of 2000 at 25%");
        assert!(!none.child(0.0, || fastrand::u64(..)).context.sampled);
        let root = none.child(1.0, || fastrand::u64(..));
        assert!(root.context.sampled && root.parent.is_none());
    }

    #[test]
    fn b3_is_honoured_when_no_traceparent_came() {
        let single = Incoming::read(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        let parent = single.parent.expect("parent");
        assert_eq!(to_hex(&parent.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(to_hex(&parent.span_id), "e457b5a2e4d86bd1");
        assert_eq!(single.sampled, Some(true));
        let multi = Incoming::read(&headers(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]));
        let parent = multi.parent.expect("parent");
        assert_eq!(to_hex(&parent.trace_id), "000000000000000064fe8b2a57d3eff7");
        assert_eq!(multi.sampled, Some(false));
        let deny = Incoming::read(&headers(&[("b3", "0")]));
        assert_eq!((deny.parent, deny.sampled), (None, Some(false)));
        // traceparent wins over B3.
        let both = Incoming::read(&headers(&[(TRACEPARENT, PARENT), ("b3", "0")]));
        assert_eq!(both.sampled, Some(true));
        let junk = Incoming::read(&headers(&[("b3", "zz-yy-1")]));
        assert_eq!(junk.parent, None);
    }
}
