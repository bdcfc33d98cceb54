//! Request bodies that can be sent again. The first try streams the
//! client's body through unchanged while keeping a copy, up to a limit; a
//! retry replays the copy, but only when the first try read the whole body
//! and it fit. Streaming while copying (rather than buffering first) keeps
//! client-streaming gRPC calls, which wait for answers mid-body, working.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{
    body::{Frame, Incoming, SizeHint},
    HeaderMap,
};

use super::upstream::Body;

#[derive(Default)]
struct Copy {
    data: Vec<Bytes>,
    size: usize,
    trailers: Option<HeaderMap>,
    complete: bool,
    too_large: bool,
}

/// One request's body across its tries.
pub struct Payload {
    first: Option<Incoming>,
    /// The copy, when retries may need it; `None`: stream only.
    copy: Option<(Arc<Mutex<Copy>>, usize)>,
}

impl Payload {
    /// `limit`: keep a copy of up to this many bytes for replay.
    pub fn new(body: Incoming, limit: Option<usize>) -> Self {
        Self {
            first: Some(body),
            copy: limit.map(|limit| (Arc::default(), limit)),
        }
    }

    /// Whether another try can have the body: it was never sent, or a
    /// complete copy exists.
    pub fn replayable(&self) -> bool {
        self.first.is_some()
            || self.copy.as_ref().is_some_and(|(copy, _)| {
                let copy = copy.lock().unwrap_or_else(|p| p.into_inner());
                copy.complete && !copy.too_large
            })
    }

    /// The body for the next try, if there can be one.
    pub fn for_next_try(&mut self) -> Option<Body> {
        if let Some(body) = self.first.take() {
            return Some(match &self.copy {
                Some((copy, limit)) => Tee {
                    inner: body,
                    copy: copy.clone(),
                    limit: *limit,
                }
                .boxed(),
                None => body.boxed(),
            });
        }
        if !self.replayable() {
            return None;
        }
        let (copy, _) = self.copy.as_ref()?;
        let copy = copy.lock().unwrap_or_else(|p| p.into_inner());
        let mut frames: VecDeque<Frame<Bytes>> =
            copy.data.iter().cloned().map(Frame::data).collect();
        if let Some(trailers) = &copy.trailers {
            frames.push_back(Frame::trailers(trailers.clone()));
        }
        Some(Replay(frames).boxed())
    }
}

/// Passes the client's body through, copying it.
struct Tee {
    inner: Incoming,
    copy: Arc<Mutex<Copy>>,
    limit: usize,
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    copy.size += data.len();
                    if copy.size > self.limit {
                        copy.too_large = true;
                        copy.data.clear();
                    } else {
                        copy.data.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            Poll::Ready(None) => copy.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.copy.lock().unwrap_or_else(|p| p.into_inner()).complete = true;
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A copied body, sent again.
struct Replay(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let bytes = self
            .0
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64);
        SizeHint::with_exact(bytes.sum())
    }
}
