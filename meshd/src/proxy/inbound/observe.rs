//! Requests seen on a relayed stream. Where no policy needs each request
//! decided, the destination relays an HTTP port's tunnel stream as bytes —
//! as cheap as TCP — and follows its requests: HTTP/2's framing in `h2`,
//! HTTP/1.1's here. For HTTP/1, it follows the framing on both
//! directions to report every request and its answer (`reporter=
//! "destination"`): heads, `Content-Length` and chunked bodies, bodiless
//! answers (to `HEAD`, `1xx`, `204`, `304`), pipelining, an answer that ends
//! with the connection. Observing never changes a byte; what it cannot
//! follow (an upgrade, bytes that are not HTTP/1) ends the observing, not
//! the stream.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddrV4,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod h2;
mod hpack;

use crate::{
    net::relay::Resettable,
    telemetry::{
        access::{AccessLog, Downstream},
        labels,
        metrics::{Metrics, SeriesCache, TcpLabels},
        result::{Reports, RequestLine},
        RequestResult, ResponseFlag,
    },
};

/// A request or answer head larger than this is not followed (what one
/// stream may make meshd hold: about a relay buffer).
const MAX_HEAD: usize = 16 * 1024;
/// Requests sent ahead of their answers (pipelined) that are followed: a
/// client cannot make meshd hold more.
const MAX_PENDING: usize = 32;
/// Headers one head may have and still be followed.
const MAX_HEADERS: usize = 100;

/// What the framing of one direction found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request head (a target that is no URI is named `/`).
    Request {
        method: hyper::Method,
        target: hyper::Uri,
    },
    /// The request's body ended, after this many bytes.
    RequestDone { body: u64 },
    /// A final answer's head (not `1xx`, but `101`).
    Response { status: u16 },
    /// The answer's body ended, after this many bytes.
    ResponseDone { body: u64 },
    /// What follows is not HTTP/1 (an upgrade, or bytes that do not parse).
    Stop,
}

/// Where one direction's framing is.
#[derive(Debug)]
enum Framing {
    /// Collecting a head.
    Head(Vec<u8>),
    /// This many body bytes to come.
    Body(u64),
    Chunked(Chunk),
    /// An answer whose body ends with the connection.
    UntilClose,
    Stopped,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading a chunk-size line; `digits` seen, `ext`: past the size.
    Size { size: u64, digits: u32, ext: bool },
    /// Chunk data to come.
    Data(u64),
    /// The CRLF after chunk data: bytes of it left.
    DataEnd(u8),
    /// Trailer lines; `line`: bytes in the current line.
    Trailers { line: usize },
}

/// HTTP/1.1 framing of both directions of one connection.
#[derive(Debug)]
pub struct Framer {
    requests: Framing,
    responses: Framing,
    /// Body bytes of the current request and answer.
    request_body: u64,
    response_body: u64,
    /// Per request still unanswered: whether it was `HEAD`.
    head_only: VecDeque<bool>,
    /// A request asked to upgrade (`101` then ends the observing).
    stopped: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            requests: Framing::Head(Vec::new()),
            responses: Framing::Head(Vec::new()),
            request_body: 0,
            response_body: 0,
            head_only: VecDeque::new(),
            stopped: false,
        }
    }
}

/// How a head says its body is framed.
enum BodyKind {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

fn body_kind(headers: &[httparse::Header<'_>], until_close: bool) -> Option<BodyKind> {
    let mut length = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = std::str::from_utf8(header.value).ok()?;
            return if value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"))
            {
                Some(BodyKind::Chunked)
            } else if until_close {
                Some(BodyKind::UntilClose)
            } else {
                // A request body framed otherwise cannot be delimited.
                None
            };
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value: u64 = std::str::from_utf8(header.value)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            if length.is_some_and(|l| l != value) {
                return None;
            }
            length = Some(value);
        }
    }
    Some(match length {
        Some(0) => BodyKind::None,
        Some(n) => BodyKind::Length(n),
        None if until_close => BodyKind::UntilClose,
        None => BodyKind::None,
    })
}

impl Framer {
    /// Bytes from the client.
    pub fn client(&mut self, data: &[u8], events: &mut Vec<Event>) {
        self.feed(true, data, events);
    }

    /// Bytes from the server.
    pub fn server(&mut self, data: &[u8], events: &mut Vec<Event>) {
        self.feed(false, data, events);
    }

    /// Follows one direction's bytes: requests (`client`) or answers.
    fn feed(&mut self, client: bool, mut data: &[u8], events: &mut Vec<Event>) {
        while !data.is_empty() && !self.stopped {
            let (framing, body) = if client {
                (&mut self.requests, &mut self.request_body)
            } else {
                (&mut self.responses, &mut self.response_body)
            };
            match framing {
                Framing::Head(head) => {
                    let Some(used) = take_head(head, data) else {
                        if head.len() > MAX_HEAD {
                            self.stop(events);
                        }
                        return;
                    };
                    data = &data[used..];
                    let head = std::mem::take(head);
                    if client {
                        self.request_head(&head, events);
                    } else {
                        self.response_head(&head, events);
                    }
                }
                Framing::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    *body += n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.done(client, events);
                    }
                }
                Framing::Chunked(chunk) => {
                    let (used, bytes, ended) = chunked(chunk, data);
                    *body += bytes;
                    data = &data[used..];
                    match ended {
                        Some(true) => self.done(client, events),
                        Some(false) => return self.stop(events),
                        None => {}
                    }
                }
                // Only an answer is read until the connection closes.
                Framing::UntilClose => {
                    *body += data.len() as u64;
                    return;
                }
                Framing::Stopped => return,
            }
        }
    }

    fn done(&mut self, client: bool, events: &mut Vec<Event>) {
        if client {
            self.request_done(events);
        } else {
            self.response_done(events);
        }
    }

    /// The server closed its side: an answer read until the close ends.
    pub fn server_closed(&mut self, events: &mut Vec<Event>) {
        if matches!(self.responses, Framing::UntilClose) {
            self.response_done(events);
            self.stop(events);
        }
    }

    fn stop(&mut self, events: &mut Vec<Event>) {
        if !self.stopped {
            self.stopped = true;
            self.requests = Framing::Stopped;
            self.responses = Framing::Stopped;
            events.push(Event::Stop);
        }
    }

    fn request_head(&mut self, head: &[u8], events: &mut Vec<Event>) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let (Ok(httparse::Status::Complete(_)), Some(method), Some(target)) =
            (request.parse(head), request.method, request.path)
        else {
            return self.stop(events);
        };
        let Ok(method) = hyper::Method::from_bytes(method.as_bytes()) else {
            return self.stop(events);
        };
        let target = hyper::Uri::try_from(target).unwrap_or_else(|_| hyper::Uri::from_static("/"));
        let Some(kind) = body_kind(request.headers, false) else {
            return self.stop(events);
        };
        if self.head_only.len() >= MAX_PENDING {
            return self.stop(events);
        }
        self.head_only.push_back(method == hyper::Method::HEAD);
        events.push(Event::Request { method, target });
        self.request_body = 0;
        match kind {
            BodyKind::None | BodyKind::UntilClose => self.request_done(events),
            BodyKind::Length(n) => self.requests = Framing::Body(n),
            BodyKind::Chunked => {
                self.requests = Framing::Chunked(Chunk::Size {
                    size: 0,
                    digits: 0,
                    ext: false,
                })
            }
        }
    }

    fn request_done(&mut self, events: &mut Vec<Event>) {
        events.push(Event::RequestDone {
            body: self.request_body,
        });
        self.requests = Framing::Head(Vec::new());
    }

    fn response_head(&mut self, head: &[u8], events: &mut Vec<Event>) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let (Ok(httparse::Status::Complete(_)), Some(status)) =
            (response.parse(head), response.code)
        else {
            return self.stop(events);
        };
        if status == 101 {
            // The connection is no longer HTTP/1.
            events.push(Event::Response { status });
            events.push(Event::ResponseDone { body: 0 });
            self.head_only.pop_front();
            return self.stop(events);
        }
        if (100..200).contains(&status) {
            // An interim answer: the final one follows.
            self.responses = Framing::Head(Vec::new());
            return;
        }
        let head_only = self.head_only.front().copied().unwrap_or(false);
        events.push(Event::Response { status });
        self.response_body = 0;
        let kind = if head_only || status == 204 || status == 304 {
            Some(BodyKind::None)
        } else {
            body_kind(response.headers, true)
        };
        match kind {
            None => self.stop(events),
            Some(BodyKind::None) => self.response_done(events),
            Some(BodyKind::Length(n)) => self.responses = Framing::Body(n),
            Some(BodyKind::Chunked) => {
                self.responses = Framing::Chunked(Chunk::Size {
                    size: 0,
                    digits: 0,
                    ext: false,
                })
            }
            Some(BodyKind::UntilClose) => self.responses = Framing::UntilClose,
        }
    }

    fn response_done(&mut self, events: &mut Vec<Event>) {
        self.head_only.pop_front();
        events.push(Event::ResponseDone {
            body: self.response_body,
        });
        self.responses = Framing::Head(Vec::new());
    }
}

/// Adds `data` to a head being collected; once it holds the blank line
/// that ends it, returns how many of `data`'s bytes were the head's (the
/// rest is body, or the next message).
fn take_head(head: &mut Vec<u8>, data: &[u8]) -> Option<usize> {
    let before = head.len();
    // Look again from a little before the new bytes: the end may straddle.
    let from = before.saturating_sub(3);
    let room = (MAX_HEAD + 1).saturating_sub(before);
    head.extend_from_slice(&data[..data.len().min(room)]);
    let end = head[from..].windows(4).position(|w| w == b"\r\n\r\n")? + from + 4;
    head.truncate(end);
    Some(end - before)
}

/// Follows a chunked body through `data`: returns the bytes used, how many
/// of them were chunk data, and whether the body ended (`Some(true)`) or
/// cannot be followed (`Some(false)`).
fn chunked(chunk: &mut Chunk, data: &[u8]) -> (usize, u64, Option<bool>) {
    let mut used = 0;
    let mut body = 0;
    while used < data.len() {
        let byte = data[used];
        match chunk {
            Chunk::Size { size, digits, ext } => {
                used += 1;
                match byte {
                    b'\n' => {
                        if *digits == 0 {
                            return (used, body, Some(false));
                        }
                        *chunk = if *size == 0 {
                            Chunk::Trailers { line: 0 }
                        } else {
                            Chunk::Data(*size)
                        };
                    }
                    b'\r' => {}
                    _ if *ext => {}
                    b';' | b' ' | b'\t' => *ext = true,
                    _ => {
                        let Some(digit) = (byte as char).to_digit(16) else {
                            return (used, body, Some(false));
                        };
                        if *digits >= 15 {
                            return (used, body, Some(false));
                        }
                        *size = *size * 16 + u64::from(digit);
                        *digits += 1;
                    }
                }
            }
            Chunk::Data(left) => {
                let n = (*left).min((data.len() - used) as u64);
                *left -= n;
                used += n as usize;
                body += n;
                if *left == 0 {
                    *chunk = Chunk::DataEnd(2);
                }
            }
            Chunk::DataEnd(left) => {
                used += 1;
                *left -= 1;
                if *left == 0 {
                    *chunk = Chunk::Size {
                        size: 0,
                        digits: 0,
                        ext: false,
                    };
                }
            }
            Chunk::Trailers { line } => {
                used += 1;
                match byte {
                    b'\n' if *line == 0 => return (used, body, Some(true)),
                    b'\n' => *line = 0,
                    b'\r' => {}
                    _ => {
                        *line += 1;
                        if *line > MAX_HEAD {
                            return (used, body, Some(false));
                        }
                    }
                }
            }
        }
    }
    (used, body, None)
}

// === impl Observer ===

/// What every followed request is reported with, and where its line goes.
pub struct Reporting {
    metrics: Arc<Metrics>,
    series: Arc<SeriesCache>,
    labels: TcpLabels,
    /// Where its requests' lines go, what they say of the stream's ends,
    /// and the pod they went to.
    access: Option<(Arc<AccessLog>, Downstream, SocketAddrV4)>,
}

impl Reporting {
    /// The result of a request just seen, with the headers an access-log
    /// line names when they were read.
    pub fn start(
        &self,
        line: RequestLine,
        protocol: &'static str,
        version: hyper::Version,
        headers: &hyper::HeaderMap,
    ) -> RequestResult {
        let mut labels = self.labels.clone();
        labels.request_protocol = protocol;
        let mut result = RequestResult::new(
            &self.metrics,
            &self.series,
            Reports::one(labels::http(labels)),
            line,
            std::time::Instant::now(),
        );
        if let Some((log, downstream, pod)) = &self.access {
            result.log_access(log, version, headers, *downstream);
            result.set_upstream(*pod);
        }
        result
    }

    /// Whether an access-log line wants the request's headers.
    pub fn logs(&self) -> bool {
        self.access.is_some()
    }
}

/// A relayed stream's requests, reported as its destination: followed as
/// HTTP/1 or HTTP/2, as the port declares.
pub struct Observer {
    follower: Follower,
}

enum Follower {
    Http1(Box<Http1>),
    Http2(Box<h2::Http2>),
}

/// What a stream's observer follows: the port's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Http1,
    Http2,
}

impl Observer {
    pub fn new(
        metrics: &Arc<Metrics>,
        labels: TcpLabels,
        access: Option<(Arc<AccessLog>, Downstream, SocketAddrV4)>,
        speaks: Speaks,
    ) -> Self {
        let reporting = Reporting {
            metrics: metrics.clone(),
            series: Arc::default(),
            labels,
            access,
        };
        let follower = match speaks {
            Speaks::Http1 => Follower::Http1(Box::new(Http1::new(reporting))),
            Speaks::Http2 => Follower::Http2(Box::new(h2::Http2::new(reporting))),
        };
        Self { follower }
    }

    fn client(&mut self, data: &[u8]) {
        match &mut self.follower {
            Follower::Http1(f) => f.client(data),
            Follower::Http2(f) => f.client(data),
        }
    }

    fn server(&mut self, data: &[u8]) {
        match &mut self.follower {
            Follower::Http1(f) => f.server(data),
            Follower::Http2(f) => f.server(data),
        }
    }

    fn server_closed(&mut self) {
        if let Follower::Http1(f) = &mut self.follower {
            f.server_closed();
        }
    }

    /// The stream ended with `flag`: requests still unanswered are counted
    /// with it — as the source counts them: `503` when the pod's side
    /// failed (`UC`), else `0` (the client went away).
    pub fn end(&mut self, flag: ResponseFlag) {
        match &mut self.follower {
            Follower::Http1(f) => f.end(flag),
            Follower::Http2(f) => f.end(flag),
        }
    }
}

/// Feeds `data` to an HTTP/1 and an HTTP/2 follower as both sides of one
/// stream, cut where its first byte says (for the fuzz target): whatever
/// the bytes, nothing panics and nothing is held without bound.
pub fn fuzz(data: &[u8]) {
    static SETUP: std::sync::OnceLock<(Arc<Metrics>, TcpLabels)> = std::sync::OnceLock::new();
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let (metrics, labels) = SETUP.get_or_init(|| {
        let config = crate::config::load_str(
            "fuzz.yaml",
            "node: { name: a, captureAddress: 10.77.0.1, podCgroup: /pods }\nservices: [{ name: web, vip: 10.96.0.20, ports: [{ port: 80 }] }]\n",
        )
        .expect("the fuzz config is valid");
        let labels = labels::source(&config.cluster, None, &config.services[0], None, "http");
        let mut registry = prometheus_client::registry::Registry::default();
        (Arc::new(Metrics::new(&mut registry)), labels)
    });
    let cut = usize::from(cut % 32) + 1;
    for speaks in [Speaks::Http1, Speaks::Http2] {
        let mut observer = Observer::new(metrics, labels.clone(), None, speaks);
        if speaks == Speaks::Http2 {
            observer.client(h2::PREFACE);
        }
        // Two pieces from the client, then one from the server.
        for (i, piece) in rest.chunks(cut).enumerate() {
            if i % 3 == 2 {
                observer.server(piece);
            } else {
                observer.client(piece);
            }
        }
        observer.end(ResponseFlag::DownstreamConnectionTermination);
    }
}

/// The status of a request left unanswered when its stream ended `flag`.
pub fn unanswered(flag: ResponseFlag) -> u16 {
    if flag == ResponseFlag::UpstreamConnectionTermination {
        503
    } else {
        0
    }
}

// === impl Http1 ===

/// A stream's HTTP/1 requests, in order.
pub struct Http1 {
    framer: Framer,
    reporting: Reporting,
    /// Requests in order, each with its status once answered.
    pending: VecDeque<(RequestResult, Option<u16>)>,
    /// Requests whose body has not ended yet (from the back of `pending`).
    receiving: usize,
    events: Vec<Event>,
}

impl Http1 {
    fn new(reporting: Reporting) -> Self {
        Self {
            framer: Framer::default(),
            reporting,
            pending: VecDeque::new(),
            receiving: 0,
            events: Vec::new(),
        }
    }

    fn client(&mut self, data: &[u8]) {
        let mut events = std::mem::take(&mut self.events);
        self.framer.client(data, &mut events);
        self.apply(&mut events);
        self.events = events;
    }

    fn server(&mut self, data: &[u8]) {
        let mut events = std::mem::take(&mut self.events);
        self.framer.server(data, &mut events);
        self.apply(&mut events);
        self.events = events;
    }

    fn server_closed(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        self.framer.server_closed(&mut events);
        self.apply(&mut events);
        self.events = events;
    }

    fn apply(&mut self, events: &mut Vec<Event>) {
        for event in events.drain(..) {
            match event {
                Event::Request { method, target } => {
                    let line = RequestLine {
                        method,
                        uri: target,
                    };
                    // The framer reads no header a line names.
                    let headers = hyper::HeaderMap::new();
                    let result =
                        self.reporting
                            .start(line, "http", hyper::Version::HTTP_11, &headers);
                    self.pending.push_back((result, None));
                    self.receiving += 1;
                }
                Event::RequestDone { body } => {
                    let index = self.pending.len().saturating_sub(self.receiving);
                    if let Some((result, _)) = self.pending.get_mut(index) {
                        result.set_request_bytes(body);
                    }
                    self.receiving = self.receiving.saturating_sub(1);
                }
                Event::Response { status } => {
                    if let Some((_, answered)) = self.pending.front_mut() {
                        *answered = Some(status);
                    }
                }
                Event::ResponseDone { body } => {
                    if let Some((result, Some(status))) = self.pending.pop_front() {
                        self.receiving = self.receiving.min(self.pending.len());
                        result.observed(status, body, ResponseFlag::None);
                    }
                }
                Event::Stop => {
                    // What is not followed is not reported.
                    for (result, _) in self.pending.drain(..) {
                        result.discard();
                    }
                    self.receiving = 0;
                }
            }
        }
    }

    fn end(&mut self, flag: ResponseFlag) {
        self.server_closed();
        for (result, status) in self.pending.drain(..) {
            result.observed(status.unwrap_or(unanswered(flag)), 0, flag);
        }
    }
}

/// One side of a relayed stream, feeding what is read from it to the
/// stream's observer.
pub struct Observed<S> {
    inner: S,
    observer: Arc<Mutex<Observer>>,
    /// Bytes read from here come from the client.
    client: bool,
}

impl<S> Observed<S> {
    pub fn client(inner: S, observer: &Arc<Mutex<Observer>>) -> Self {
        Self {
            inner,
            observer: observer.clone(),
            client: true,
        }
    }

    pub fn server(inner: S, observer: &Arc<Mutex<Observer>>) -> Self {
        Self {
            inner,
            observer: observer.clone(),
            client: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Observed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let read = &buf.filled()[before..];
            let mut observer = self.observer.lock().unwrap_or_else(|p| p.into_inner());
            match (self.client, read.is_empty()) {
                (true, false) => observer.client(read),
                (false, false) => observer.server(read),
                (false, true) => observer.server_closed(),
                (true, true) => {}
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Observed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Resettable> Resettable for Observed<S> {
    fn reset_on_close(&self) {
        self.inner.reset_on_close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a conversation in pieces of `cut` bytes.
    fn follow(exchanges: &[(&[u8], &[u8])], cut: usize) -> Vec<Event> {
        let mut framer = Framer::default();
        let mut events = Vec::new();
        for (request, response) in exchanges {
            for piece in request.chunks(cut) {
                framer.client(piece, &mut events);
            }
            for piece in response.chunks(cut) {
                framer.server(piece, &mut events);
            }
        }
        framer.server_closed(&mut events);
        events
    }

    fn request(method: &str, target: &str) -> Event {
        Event::Request {
            method: method.parse().expect("method"),
            target: target.parse().expect("target"),
        }
    }

    #[test]
    fn lengths_chunks_and_bodiless_answers_are_followed_however_the_bytes_come() {
        let exchanges: [(&[u8], &[u8]); 5] = [
            (
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            ),
            (
                b"POST /b HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nTrailer: 1\r\n\r\n",
            ),
            (
                b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ),
            (
                b"HEAD /d HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n",
            ),
            (
                b"GET /e HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 503 Busy\r\n\r\nuntil the end",
            ),
        ];
        let want = vec![
            request("GET", "/a"),
            Event::RequestDone { body: 0 },
            Event::Response { status: 200 },
            Event::ResponseDone { body: 5 },
            request("POST", "/b"),
            Event::RequestDone { body: 3 },
            Event::Response { status: 201 },
            Event::ResponseDone { body: 9 },
            request("PUT", "/c"),
            Event::RequestDone { body: 2 },
            Event::Response { status: 204 },
            Event::ResponseDone { body: 0 },
            request("HEAD", "/d"),
            Event::RequestDone { body: 0 },
            Event::Response { status: 200 },
            Event::ResponseDone { body: 0 },
            request("GET", "/e"),
            Event::RequestDone { body: 0 },
            Event::Response { status: 503 },
            Event::ResponseDone { body: 13 },
            Event::Stop,
        ];
        for cut in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(follow(&exchanges, cut), want, "pieces of {cut}");
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let mut framer = Framer::default();
        let mut events = Vec::new();
        framer.client(
            b"GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
            &mut events,
        );
        framer.server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nHTTP/1.1 404 No\r\nContent-Length: 0\r\n\r\n",
            &mut events,
        );
        let statuses: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Response { status } => Some(*status),
                _ => None,
            })
            .collect();
        assert_eq!(statuses, [200, 200, 404]);
        assert_eq!(events.last(), Some(&Event::ResponseDone { body: 0 }));
    }

    #[test]
    fn an_upgrade_or_bytes_that_are_not_http1_end_the_observing() {
        let upgraded = follow(
            &[(
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
            )],
            5,
        );
        assert_eq!(
            &upgraded[2..],
            [
                Event::Response { status: 101 },
                Event::ResponseDone { body: 0 },
                Event::Stop
            ]
        );
        for junk in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let mut framer = Framer::default();
            let mut events = Vec::new();
            framer.client(junk, &mut events);
            assert_eq!(events.last(), Some(&Event::Stop), "{junk:?}");
        }
        // A head that never ends is not buffered for ever.
        let mut framer = Framer::default();
        let mut events = Vec::new();
        framer.client(b"GET / HTTP/1.1\r\n", &mut events);
        for _ in 0..100 {
            framer.client(&[b'a'; 1024], &mut events);
        }
        assert_eq!(events, [Event::Stop]);
        assert!(matches!(framer.requests, Framing::Stopped));
    }

    #[test]
    fn a_client_cannot_pile_up_unanswered_requests() {
        let mut framer = Framer::default();
        let mut events = Vec::new();
        for _ in 0..10_000 {
            framer.client(b"GET / HTTP/1.1\r\n\r\n", &mut events);
        }
        let requests = events
            .iter()
            .filter(|e| matches!(e, Event::Request { .. }))
            .count();
        assert_eq!(requests, MAX_PENDING);
        assert_eq!(events.last(), Some(&Event::Stop));
        assert!(framer.head_only.len() <= MAX_PENDING);
    }

    #[test]
    fn a_bad_chunk_size_ends_the_observing() {
        let mut framer = Framer::default();
        let mut events = Vec::new();
        framer.client(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            &mut events,
        );
        assert_eq!(events.last(), Some(&Event::Stop));
        let mut events = Vec::new();
        let mut framer = Framer::default();
        framer.client(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            &mut events,
        );
        assert_eq!(events.last(), Some(&Event::Stop));
    }
}
