//! Requests seen on a relayed HTTP/2 stream: the destination relays an
//! `http2` or `grpc` port's tunnel stream as bytes and follows HTTP/2's
//! framing both ways — frame heads, header blocks (decoded with HPACK, in
//! order, so the decoders' tables stay right), DATA lengths without their
//! padding, `END_STREAM`, `RST_STREAM` — to report each stream's request
//! and answer: method and path, status, body sizes, and for gRPC the
//! `grpc-status` from the trailers and the messages each way. What it
//! cannot follow (a header block over `MAX_HEAD`, an HPACK table over
//! `MAX_TABLE`, a push, bytes that are not HTTP/2, more than `MAX_STREAMS`
//! streams open at once) ends the observing, never the stream.

use std::collections::HashMap;

use super::hpack::Decoder;

use super::{unanswered, Reporting, MAX_HEAD};
use crate::telemetry::{body::GrpcFrames, result::RequestLine, RequestResult, ResponseFlag};

/// The connection preface a client starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Streams followed at once; a client cannot make meshd hold more.
const MAX_STREAMS: usize = 256;
/// The largest HPACK table a side may use and still be followed (the
/// default is 4096 bytes).
const MAX_TABLE: usize = 16 * 1024;
/// A `grpc-status` value longer than this is not a status.
const MAX_GRPC_STATUS: usize = 8;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What cannot be followed.
#[derive(Debug)]
struct Stop;

/// What one direction's frames said.
enum Seen<'a> {
    Headers {
        stream: u32,
        end_stream: bool,
        fields: Box<Fields>,
    },
    Data {
        stream: u32,
        data: &'a [u8],
    },
    /// A DATA frame ended the stream's side.
    DataEnd {
        stream: u32,
    },
    Reset {
        stream: u32,
    },
}

/// What a header block says that meshd reports.
#[derive(Default)]
struct Fields {
    method: Option<hyper::Method>,
    path: Option<hyper::Uri>,
    status: Option<u16>,
    grpc_status: Option<Vec<u8>>,
    grpc: bool,
    /// What an access-log line names, only when lines are written.
    headers: hyper::HeaderMap,
}

impl Fields {
    fn take(&mut self, name: &[u8], value: &[u8], logs: bool) {
        match name {
            b":method" => self.method = hyper::Method::from_bytes(value).ok(),
            b":path" => self.path = hyper::Uri::try_from(value).ok(),
            b":status" => {
                self.status = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| v.len() == 3)
                    .and_then(|v| v.parse().ok());
            }
            b"grpc-status" if value.len() <= MAX_GRPC_STATUS => {
                self.grpc_status = Some(value.to_vec());
            }
            b"content-type" => self.grpc = value.starts_with(b"application/grpc"),
            b":authority" | b"user-agent" | b"x-request-id" | b"x-forwarded-for" if logs => {
                let name = if name == b":authority" {
                    hyper::header::HOST
                } else {
                    match hyper::header::HeaderName::from_bytes(name) {
                        Ok(name) => name,
                        Err(_) => return,
                    }
                };
                if let Ok(value) = hyper::header::HeaderValue::from_bytes(value) {
                    self.headers.append(name, value);
                }
            }
            _ => {}
        }
    }
}

/// A frame being read: its head, and what is kept of its payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    /// Payload bytes still to come.
    left: usize,
    part: Part,
}

enum Part {
    /// A header block fragment or a reset: kept whole (at most `MAX_HEAD`).
    Collect(Vec<u8>),
    /// DATA: reported as it passes, without its padding.
    Data {
        padded: bool,
        /// Data bytes still to come, once the pad length is known.
        data_left: Option<usize>,
    },
    Skip,
}

/// A header block being gathered across HEADERS and CONTINUATION.
struct Block {
    stream: u32,
    end_stream: bool,
    bytes: Vec<u8>,
}

/// Where one direction's framing is.
struct Reader {
    /// Bytes of the connection preface still to come (the client's side).
    preface: usize,
    head: [u8; 9],
    have: usize,
    frame: Option<Frame>,
    block: Option<Block>,
    decoder: Decoder,
}

impl Reader {
    fn new(preface: bool) -> Self {
        // The table starts at HPACK's 4096 bytes; a side may grow it to
        // `MAX_TABLE` with a size update, no further.
        let decoder = Decoder::new(MAX_TABLE);
        Self {
            preface: if preface { PREFACE.len() } else { 0 },
            head: [0; 9],
            have: 0,
            frame: None,
            block: None,
            decoder,
        }
    }

    fn feed(
        &mut self,
        mut data: &[u8],
        logs: bool,
        on: &mut dyn FnMut(Seen<'_>) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        if self.preface > 0 {
            let take = self.preface.min(data.len());
            let at = PREFACE.len() - self.preface;
            if data[..take] != PREFACE[at..at + take] {
                return Err(Stop);
            }
            self.preface -= take;
            data = &data[take..];
        }
        while !data.is_empty() {
            let Some(frame) = &mut self.frame else {
                let take = (9 - self.have).min(data.len());
                self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have == 9 {
                    self.have = 0;
                    self.start()?;
                    if self.frame.as_ref().is_some_and(|f| f.left == 0) {
                        self.finish(logs, on)?;
                    }
                }
                continue;
            };
            let take = frame.left.min(data.len());
            let chunk = &data[..take];
            data = &data[take..];
            frame.left -= take;
            match &mut frame.part {
                Part::Collect(kept) => kept.extend_from_slice(chunk),
                Part::Skip => {}
                Part::Data { padded, data_left } => {
                    let mut chunk = chunk;
                    let left = match data_left {
                        Some(left) => left,
                        None => {
                            let pad = if *padded {
                                let Some((&pad, rest)) = chunk.split_first() else {
                                    continue;
                                };
                                chunk = rest;
                                usize::from(pad)
                            } else {
                                0
                            };
                            let rest = frame.left + chunk.len();
                            let Some(data) = rest.checked_sub(pad) else {
                                return Err(Stop);
                            };
                            data_left.insert(data)
                        }
                    };
                    let n = (*left).min(chunk.len());
                    *left -= n;
                    if n > 0 {
                        on(Seen::Data {
                            stream: frame.stream,
                            data: &chunk[..n],
                        })?;
                    }
                }
            }
            if frame.left == 0 {
                self.finish(logs, on)?;
            }
        }
        Ok(())
    }

    /// A frame head was read.
    fn start(&mut self) -> Result<(), Stop> {
        let h = self.head;
        let left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        // A header block's CONTINUATION frames follow it, and nothing else.
        if (kind == CONTINUATION) != self.block.is_some() {
            return Err(Stop);
        }
        let part = match kind {
            HEADERS | CONTINUATION | RST_STREAM if left <= MAX_HEAD => {
                Part::Collect(Vec::with_capacity(left))
            }
            HEADERS | CONTINUATION | RST_STREAM | PUSH_PROMISE => return Err(Stop),
            DATA => Part::Data {
                padded: flags & PADDED != 0,
                data_left: None,
            },
            _ => Part::Skip,
        };
        self.frame = Some(Frame {
            kind,
            flags,
            stream,
            left,
            part,
        });
        Ok(())
    }

    /// A frame's payload is complete.
    fn finish(
        &mut self,
        logs: bool,
        on: &mut dyn FnMut(Seen<'_>) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let Some(frame) = self.frame.take() else {
            return Ok(());
        };
        let end_stream = frame.flags & END_STREAM != 0;
        match (frame.kind, frame.part) {
            (DATA, Part::Data { padded, data_left }) => {
                // A padded frame too short for its pad length.
                if padded && data_left.is_none() {
                    return Err(Stop);
                }
                if end_stream {
                    on(Seen::DataEnd {
                        stream: frame.stream,
                    })?;
                }
            }
            (RST_STREAM, _) => on(Seen::Reset {
                stream: frame.stream,
            })?,
            (HEADERS, Part::Collect(payload)) => {
                let mut fragment = &payload[..];
                if frame.flags & PADDED != 0 {
                    let (&pad, rest) = fragment.split_first().ok_or(Stop)?;
                    let keep = rest.len().checked_sub(usize::from(pad)).ok_or(Stop)?;
                    fragment = &rest[..keep];
                }
                if frame.flags & PRIORITY != 0 {
                    fragment = fragment.get(5..).ok_or(Stop)?;
                }
                self.block = Some(Block {
                    stream: frame.stream,
                    end_stream,
                    bytes: fragment.to_vec(),
                });
            }
            (CONTINUATION, Part::Collect(payload)) => {
                let block = self.block.as_mut().ok_or(Stop)?;
                if block.stream != frame.stream || block.bytes.len() + payload.len() > MAX_HEAD {
                    return Err(Stop);
                }
                block.bytes.extend_from_slice(&payload);
            }
            _ => {}
        }
        let ended = matches!(frame.kind, HEADERS | CONTINUATION) && frame.flags & END_HEADERS != 0;
        if let Some(block) = self.block.take_if(|_| ended) {
            let mut fields = Box::<Fields>::default();
            self.decoder
                .decode(&block.bytes, |name, value| fields.take(name, value, logs))
                .map_err(|_| Stop)?;
            on(Seen::Headers {
                stream: block.stream,
                end_stream: block.end_stream,
                fields,
            })?;
        }
        Ok(())
    }
}

/// One stream's request and answer.
struct Exchange {
    result: RequestResult,
    grpc: bool,
    request_bytes: u64,
    request_frames: GrpcFrames,
    request_messages: u64,
    status: Option<u16>,
    response_bytes: u64,
    response_frames: GrpcFrames,
    response_messages: u64,
    grpc_status: Option<Vec<u8>>,
}

impl Exchange {
    fn record(mut self, status: u16, flag: ResponseFlag) {
        self.result.set_request_bytes(self.request_bytes);
        if self.grpc {
            self.result.set_observed_grpc(
                self.grpc_status.as_deref(),
                self.request_messages,
                self.response_messages,
            );
        }
        self.result.observed(status, self.response_bytes, flag);
    }
}

/// The streams of one relayed HTTP/2 connection.
pub struct Http2 {
    reporting: Reporting,
    client: Reader,
    server: Reader,
    exchanges: HashMap<u32, Exchange>,
    stopped: bool,
}

impl Http2 {
    pub fn new(reporting: Reporting) -> Self {
        Self {
            reporting,
            client: Reader::new(true),
            server: Reader::new(false),
            exchanges: HashMap::new(),
            stopped: false,
        }
    }

    pub fn client(&mut self, data: &[u8]) {
        if self.stopped {
            return;
        }
        let logs = self.reporting.logs();
        let Self {
            client,
            exchanges,
            reporting,
            ..
        } = self;
        let fed = client.feed(data, logs, &mut |seen| {
            from_client(exchanges, reporting, seen)
        });
        if fed.is_err() {
            self.stop();
        }
    }

    pub fn server(&mut self, data: &[u8]) {
        if self.stopped {
            return;
        }
        let Self {
            server, exchanges, ..
        } = self;
        let fed = server.feed(data, false, &mut |seen| from_server(exchanges, seen));
        if fed.is_err() {
            self.stop();
        }
    }

    /// What is not followed is not reported.
    fn stop(&mut self) {
        self.stopped = true;
        for (_, exchange) in self.exchanges.drain() {
            exchange.result.discard();
        }
    }

    /// The stream ended with `flag`: exchanges still open are counted with
    /// it, as the HTTP/1 follower counts them.
    pub fn end(&mut self, flag: ResponseFlag) {
        let mut open: Vec<(u32, Exchange)> = self.exchanges.drain().collect();
        open.sort_by_key(|(stream, _)| *stream);
        for (_, exchange) in open {
            let status = exchange.status.unwrap_or(unanswered(flag));
            exchange.record(status, flag);
        }
    }
}

fn from_client(
    exchanges: &mut HashMap<u32, Exchange>,
    reporting: &Reporting,
    seen: Seen<'_>,
) -> Result<(), Stop> {
    match seen {
        Seen::Headers {
            stream,
            end_stream: _,
            fields,
        } if !exchanges.contains_key(&stream) => {
            let (Some(method), Some(uri)) = (fields.method, fields.path) else {
                return Err(Stop);
            };
            if exchanges.len() >= MAX_STREAMS {
                return Err(Stop);
            }
            let protocol = if fields.grpc { "grpc" } else { "http" };
            let line = RequestLine { method, uri };
            let result = reporting.start(line, protocol, hyper::Version::HTTP_2, &fields.headers);
            exchanges.insert(
                stream,
                Exchange {
                    result,
                    grpc: fields.grpc,
                    request_bytes: 0,
                    request_frames: GrpcFrames::default(),
                    request_messages: 0,
                    status: None,
                    response_bytes: 0,
                    response_frames: GrpcFrames::default(),
                    response_messages: 0,
                    grpc_status: None,
                },
            );
        }
        // The request's trailers, or the end of a side already reported.
        Seen::Headers { .. } | Seen::DataEnd { .. } => {}
        Seen::Data { stream, data } => {
            if let Some(exchange) = exchanges.get_mut(&stream) {
                exchange.request_bytes += data.len() as u64;
                if exchange.grpc {
                    exchange.request_messages += exchange.request_frames.feed(data);
                }
            }
        }
        Seen::Reset { stream } => {
            // The client gave the request up.
            if let Some(exchange) = exchanges.remove(&stream) {
                let status = exchange.status.unwrap_or(0);
                exchange.record(status, ResponseFlag::DownstreamConnectionTermination);
            }
        }
    }
    Ok(())
}

fn from_server(exchanges: &mut HashMap<u32, Exchange>, seen: Seen<'_>) -> Result<(), Stop> {
    match seen {
        Seen::Headers {
            stream,
            end_stream,
            fields,
        } => {
            let Some(exchange) = exchanges.get_mut(&stream) else {
                return Ok(());
            };
            match (exchange.status, fields.status) {
                // Informational: the answer is still to come.
                (None, Some(100..=199)) => {}
                (None, Some(status)) => exchange.status = Some(status),
                (None, None) => return Err(Stop),
                // Trailers.
                (Some(_), _) => {}
            }
            if fields.grpc_status.is_some() {
                exchange.grpc_status = fields.grpc_status;
            }
            if end_stream {
                answered(exchanges, stream);
            }
        }
        Seen::Data { stream, data } => {
            if let Some(exchange) = exchanges.get_mut(&stream) {
                exchange.response_bytes += data.len() as u64;
                if exchange.grpc {
                    exchange.response_messages += exchange.response_frames.feed(data);
                }
            }
        }
        Seen::DataEnd { stream } => answered(exchanges, stream),
        Seen::Reset { stream } => {
            // The pod gave the request up: as the source records a reset.
            if let Some(exchange) = exchanges.remove(&stream) {
                let status = exchange.status.unwrap_or(503);
                exchange.record(status, ResponseFlag::UpstreamConnectionTermination);
            }
        }
    }
    Ok(())
}

/// The answer on `stream` ended: its exchange is recorded.
fn answered(exchanges: &mut HashMap<u32, Exchange>, stream: u32) {
    if let Some(exchange) = exchanges.remove(&stream) {
        let status = exchange.status.unwrap_or(0);
        exchange.record(status, ResponseFlag::None);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::telemetry::{labels, metrics::Metrics};

    fn reporting() -> (Registry, Reporting) {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let config = crate::config::load_str(
            "t.yaml",
            "node: { name: a, captureAddress: 10.77.0.1, podCgroup: /pods }
services: [{ name: web, vip: 10.96.0.20, ports: [{ port: 80 }], endpoints: [{ address: 10.77.0.7 }] }]
",
        )
        .expect("valid");
        let labels = labels::source(&config.cluster, None, &config.services[0], None, "http");
        let reporting = Reporting {
            metrics,
            series: Arc::default(),
            labels,
            access: None,
        };
        (registry, reporting)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A header block as an HTTP/2 library sends it: Huffman-coded,
    /// indexed where it can be.
    fn headers(encoder: &mut httlib_hpack::Encoder<'_>, fields: &[(&str, &str)]) -> Vec<u8> {
        let flags = httlib_hpack::Encoder::HUFFMAN_NAME
            | httlib_hpack::Encoder::HUFFMAN_VALUE
            | httlib_hpack::Encoder::WITH_INDEXING
            | httlib_hpack::Encoder::BEST_FORMAT;
        let mut out = Vec::new();
        for (name, value) in fields {
            let field = (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags);
            encoder.encode(field, &mut out).expect("encodes");
        }
        out
    }

    /// A gRPC message: flag, length, bytes.
    fn message(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Two streams interleaved: a GET answered 200 with a body, and a gRPC
    /// call (padded DATA, a header block split over CONTINUATION, trailers
    /// with `grpc-status`); then a third reset by the pod.
    fn conversation() -> (Vec<u8>, Vec<u8>) {
        let mut to_server = httlib_hpack::Encoder::default();
        let mut to_client = httlib_hpack::Encoder::default();
        let mut client = PREFACE.to_vec();
        client.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let get = headers(
            &mut to_server,
            &[
                (":method", "GET"),
                (":path", "/items?x=1"),
                (":scheme", "http"),
                (":authority", "web"),
            ],
        );
        client.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get));
        let call = headers(
            &mut to_server,
            &[
                (":method", "POST"),
                (":path", "/pkg.Svc/Call"),
                (":scheme", "http"),
                (":authority", "web"),
                ("content-type", "application/grpc"),
            ],
        );
        let (first, rest) = call.split_at(call.len() / 2);
        let mut padded = vec![3];
        padded.extend_from_slice(first);
        padded.extend_from_slice(&[0, 0, 0]);
        client.extend(frame(HEADERS, PADDED, 3, &padded));
        client.extend(frame(CONTINUATION, END_HEADERS, 3, rest));
        let mut data = vec![4];
        data.extend(message(b"one"));
        data.extend(message(b"two!"));
        data.extend_from_slice(&[0; 4]);
        client.extend(frame(DATA, PADDED | END_STREAM, 3, &data));
        let third = headers(
            &mut to_server,
            &[(":method", "GET"), (":path", "/slow"), (":scheme", "http")],
        );
        client.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &third));

        let mut server = frame(0x4, 0, 0, &[]);
        let status = headers(&mut to_client, &[(":status", "100")]);
        server.extend(frame(HEADERS, END_HEADERS, 1, &status));
        let ok = headers(
            &mut to_client,
            &[(":status", "200"), ("content-type", "text/plain")],
        );
        server.extend(frame(HEADERS, END_HEADERS, 1, &ok));
        let grpc_ok = headers(
            &mut to_client,
            &[(":status", "200"), ("content-type", "application/grpc")],
        );
        server.extend(frame(HEADERS, END_HEADERS, 3, &grpc_ok));
        server.extend(frame(DATA, 0, 1, b"hello "));
        server.extend(frame(DATA, 0, 3, &message(b"answer")));
        server.extend(frame(DATA, END_STREAM, 1, b"world"));
        let trailers = headers(&mut to_client, &[("grpc-status", "14")]);
        server.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &trailers));
        server.extend(frame(RST_STREAM, 0, 5, &[0, 0, 0, 2]));
        (client, server)
    }

    fn series<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    /// The three exchanges of `conversation`, each once with its code,
    /// flags and sizes.
    fn assert_conversation_reported(text: &str, cut: usize) {
        let requests = series(text, "istio_requests_total{");
        assert_eq!(requests.len(), 3, "cut {cut}: {text}");
        let find = |want: &[&str]| {
            requests
                .iter()
                .filter(|l| want.iter().all(|w| l.contains(w)))
                .count()
        };
        assert_eq!(
            find(&[
                "response_code=\"200\"",
                "request_protocol=\"http\"",
                "response_flags=\"-\""
            ]),
            1,
            "{text}"
        );
        assert_eq!(
            find(&[
                "response_code=\"200\"",
                "request_protocol=\"grpc\"",
                "grpc_response_status=\"14\""
            ]),
            1,
            "{text}"
        );
        assert_eq!(
            find(&["response_code=\"503\"", "response_flags=\"UC\""]),
            1,
            "{text}"
        );
        // 11 response bytes for the GET; the call's 8 + 9 request bytes
        // (padding left out) and its one 11-byte answer message.
        assert!(text.contains("istio_response_bytes_sum{"), "{text}");
        let sent = series(text, "istio_request_messages_total{");
        assert!(sent.len() == 1 && sent[0].ends_with(" 2"), "{text}");
        let received = series(text, "istio_response_messages_total{");
        assert!(received.len() == 1 && received[0].ends_with(" 1"), "{text}");
        let sizes = series(text, "istio_request_bytes_sum{");
        assert!(
            sizes
                .iter()
                .any(|l| l.ends_with(" 17.0") || l.ends_with(" 17")),
            "{text}"
        );
        let answers = series(text, "istio_response_bytes_sum{");
        assert!(
            answers
                .iter()
                .any(|l| l.ends_with(" 11.0") || l.ends_with(" 11")),
            "{text}"
        );
    }

    #[test]
    fn every_stream_is_reported_however_the_bytes_are_cut() {
        let (client, server) = conversation();
        for cut in [1, 2, 5, 9, 10, 64, 100_000] {
            let (registry, reporting) = reporting();
            let mut follower = Http2::new(reporting);
            for piece in client.chunks(cut) {
                follower.client(piece);
            }
            for piece in server.chunks(cut) {
                follower.server(piece);
            }
            assert!(!follower.stopped, "cut {cut}");
            assert!(follower.exchanges.is_empty(), "cut {cut}");
            let text = crate::telemetry::metrics::render(&registry);
            assert_conversation_reported(&text, cut);
        }
    }

    #[test]
    fn what_cannot_be_followed_stops_the_observing_and_reports_nothing_made_up() {
        let garbage = [
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            [PREFACE, &frame(0x5, END_HEADERS, 1, &[0; 8])].concat(),
            [PREFACE, &frame(HEADERS, 0, 1, &vec![0; MAX_HEAD + 1])].concat(),
            [
                PREFACE,
                &frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]),
            ]
            .concat(),
            [PREFACE, &frame(CONTINUATION, END_HEADERS, 1, &[0x82])].concat(),
            [PREFACE, &frame(DATA, PADDED, 1, &[9, 1, 2])].concat(),
        ];
        for bytes in garbage {
            let (registry, reporting) = reporting();
            let mut follower = Http2::new(reporting);
            follower.client(&bytes);
            follower.end(ResponseFlag::DownstreamConnectionTermination);
            assert!(follower.stopped, "{bytes:?}");
            let text = crate::telemetry::metrics::render(&registry);
            assert!(series(&text, "istio_requests_total{").is_empty(), "{text}");
        }
    }

    #[test]
    fn streams_open_when_the_connection_ends_are_counted_with_its_flag() {
        let (registry, reporting) = reporting();
        let mut follower = Http2::new(reporting);
        let mut encoder = httlib_hpack::Encoder::default();
        let mut client = PREFACE.to_vec();
        let get = headers(&mut encoder, &[(":method", "GET"), (":path", "/")]);
        client.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get));
        follower.client(&client);
        follower.end(ResponseFlag::UpstreamConnectionTermination);
        let text = crate::telemetry::metrics::render(&registry);
        let requests = series(&text, "istio_requests_total{");
        assert_eq!(requests.len(), 1, "{text}");
        assert!(
            requests[0].contains("response_code=\"503\"") && requests[0].contains("UC"),
            "{text}"
        );
    }

    #[test]
    fn a_client_cannot_make_it_hold_more_than_max_streams() {
        let (_registry, reporting) = reporting();
        let mut follower = Http2::new(reporting);
        let mut encoder = httlib_hpack::Encoder::default();
        follower.client(PREFACE);
        for i in 0..=MAX_STREAMS as u32 {
            let get = headers(&mut encoder, &[(":method", "GET"), (":path", "/")]);
            follower.client(&frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &get));
        }
        assert!(follower.stopped);
        assert!(follower.exchanges.is_empty());
    }
}
