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

/// One request's body across its tries (the client's body, `Incoming`,
/// when serving).
pub struct Payload<B = Incoming> {
    first: Option<B>,
    /// The copy, when retries may need it; `None`: stream only.
    copy: Option<(Arc<Mutex<Copy>>, usize)>,
}

impl<B> Payload<B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
{
    /// `limit`: keep a copy of up to this many bytes for replay.
    pub fn new(body: B, limit: Option<usize>) -> Self {
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
struct Tee<B> {
    inner: B,
    copy: Arc<Mutex<Copy>>,
    limit: usize,
}

impl<B> hyper::body::Body for Tee<B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client body of `chunks`, then trailers if asked (a queued body is
    /// all the tee needs).
    fn body(chunks: &[&'static str], trailers: bool) -> Replay {
        let mut frames: VecDeque<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect();
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", "0".parse().expect("value"));
            frames.push_back(Frame::trailers(map));
        }
        Replay(frames)
    }

    async fn read(body: Body) -> (Vec<u8>, bool) {
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().is_some();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn the_first_try_streams_and_a_retry_replays_the_same_bytes() {
        let mut payload = Payload::new(body(&["hello ", "world"], true), Some(1024));
        assert!(payload.replayable(), "nothing sent yet");
        let first = read(payload.for_next_try().expect("first")).await;
        assert_eq!(first, (b"hello world".to_vec(), true));
        assert!(payload.replayable());
        let again = read(payload.for_next_try().expect("replay")).await;
        assert_eq!(again, first);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_not_read_to_its_end_is_not_replayed() {
        let mut payload = Payload::new(body(&["0123456789", "0123456789"], false), Some(15));
        let _ = read(payload.for_next_try().expect("first")).await;
        assert!(!payload.replayable(), "20 bytes over a 15-byte limit");
        assert!(payload.for_next_try().is_none());

        let mut payload = Payload::new(body(&["abc", "def"], false), Some(1024));
        let mut first = payload.for_next_try().expect("first");
        let _ = first.frame().await;
        assert!(!payload.replayable(), "the try read only part of the body");
    }

    #[tokio::test]
    async fn without_a_copy_the_body_goes_once() {
        let mut payload = Payload::new(body(&["abc"], false), None);
        let _ = read(payload.for_next_try().expect("first")).await;
        assert!(!payload.replayable());
        assert!(payload.for_next_try().is_none());
    }
}
