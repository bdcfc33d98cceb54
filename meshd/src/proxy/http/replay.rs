//! Request bodies that can be sent again. The first try streams the
//! client's body through unchanged while keeping a copy, up to a limit; a
//! retry replays the copy, but only when the first try read the whole body
//! and it fit. Streaming while copying (rather than buffering first) keeps
//! client-streaming gRPC calls, which wait for answers mid-body, working.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
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
    /// Set once the client's body has been read to its end; `None` for a
    /// body that was empty from the start.
    received: Option<Arc<AtomicBool>>,
}

impl<B> Payload<B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
{
    /// `limit`: keep a copy of up to this many bytes for replay.
    pub fn new(body: B, limit: Option<usize>) -> Self {
        let empty = body.is_end_stream();
        // An empty body is complete (and its copy too) before any try.
        let copy = limit.map(|limit| {
            let copy = Copy {
                complete: empty,
                ..Copy::default()
            };
            (Arc::new(Mutex::new(copy)), limit)
        });
        Self {
            first: Some(body),
            copy,
            received: (!empty).then(Arc::default),
        }
    }

    /// Whether the client has sent its whole body. A try that failed
    /// before then may have failed because of the client (a slow upload
    /// outlasting the timeout, a client that went away): that is no
    /// failure of the endpoint's.
    pub fn received(&self) -> bool {
        self.received
            .as_ref()
            .is_none_or(|r| r.load(Ordering::Relaxed))
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
            let Some(received) = self.received.clone() else {
                return Some(body.boxed());
            };
            return Some(
                Tee {
                    inner: body,
                    copy: self.copy.clone(),
                    received,
                }
                .boxed(),
            );
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

/// Passes the client's body through, noting when it ends — and copying
/// it, up to a limit, when retries may need it.
struct Tee<B> {
    inner: B,
    copy: Option<(Arc<Mutex<Copy>>, usize)>,
    received: Arc<AtomicBool>,
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
        let ended = matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream();
        if let Some((copy, limit)) = &self.copy {
            let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                if let Some(data) = frame.data_ref() {
                    copy.size += data.len();
                    if copy.size > *limit {
                        copy.too_large = true;
                        copy.data.clear();
                    } else {
                        copy.data.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            copy.complete |= ended;
        }
        if ended {
            self.received.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            if let Some((copy, _)) = &self.copy {
                copy.lock().unwrap_or_else(|p| p.into_inner()).complete = true;
            }
            self.received.store(true, Ordering::Relaxed);
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
    async fn the_client_has_sent_its_body_once_it_was_read_to_the_end() {
        assert!(
            Payload::new(body(&[], false), None).received(),
            "an empty body"
        );
        for limit in [None, Some(1024)] {
            let mut payload = Payload::new(body(&["abc", "def"], false), limit);
            assert!(!payload.received(), "{limit:?}: nothing read yet");
            let mut first = payload.for_next_try().expect("first");
            let _ = first.frame().await;
            assert!(!payload.received(), "{limit:?}: half read");
            let _ = read(first).await;
            assert!(payload.received(), "{limit:?}: read to the end");
        }
    }

    #[tokio::test]
    async fn an_empty_body_is_replayed_empty() {
        let mut payload = Payload::new(body(&[], false), Some(1024));
        assert_eq!(
            read(payload.for_next_try().expect("first")).await,
            (vec![], false)
        );
        assert!(payload.replayable());
        assert_eq!(
            read(payload.for_next_try().expect("again")).await,
            (vec![], false)
        );
    }

    #[tokio::test]
    async fn without_a_copy_the_body_goes_once() {
        let mut payload = Payload::new(body(&["abc"], false), None);
        let _ = read(payload.for_next_try().expect("first")).await;
        assert!(!payload.replayable());
        assert!(payload.for_next_try().is_none());
    }
}
