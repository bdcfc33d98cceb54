//! Bodies that count what passes through them — bytes, and gRPC's
//! length-prefixed messages — for Istio's size and message metrics.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Finds where gRPC messages start in a body's bytes: each is a 1-byte
/// compression flag, a 4-byte big-endian length, then that many bytes.
/// Fed the body chunk by chunk, however it was cut.
#[derive(Debug, Default, Clone)]
pub struct GrpcFrames {
    /// Bytes of the current message's prefix seen so far (0..5).
    prefix: usize,
    length: [u8; 4],
    /// Bytes of the current message still to come.
    left: u64,
}

/// The length prefix of a gRPC message.
const PREFIX: usize = 5;

impl GrpcFrames {
    /// Feeds the next chunk; returns how many messages began in it.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.left > 0 {
                let skip = usize::try_from(self.left).map_or(data.len(), |l| l.min(data.len()));
                self.left -= skip as u64;
                data = &data[skip..];
                continue;
            }
            if self.prefix > 0 {
                self.length[self.prefix - 1] = data[0];
            }
            self.prefix += 1;
            data = &data[1..];
            if self.prefix == PREFIX {
                messages += 1;
                self.prefix = 0;
                self.left = u64::from(u32::from_be_bytes(self.length));
            }
        }
        messages
    }
}

/// What a request body carried, read by its result once it is recorded.
#[derive(Debug, Default)]
pub struct Tally {
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
}

impl Tally {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// A body that adds what passes to a `Tally` (messages only for gRPC);
/// none for a body empty from the start.
pub struct Counted<B> {
    inner: B,
    tally: Option<Arc<Tally>>,
    grpc: Option<GrpcFrames>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, tally: Option<Arc<Tally>>, grpc: bool) -> Self {
        Self {
            inner,
            tally,
            grpc: grpc.then(GrpcFrames::default),
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(tally)) = (&polled, &self.tally) {
            if let Some(data) = frame.data_ref() {
                tally.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                let tally = tally.clone();
                if let Some(grpc) = &mut self.grpc {
                    tally.messages.fetch_add(grpc.feed(data), Ordering::Relaxed);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn messages_are_counted_however_the_body_is_cut() {
        let body: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        for cut in [1, 2, 4, 5, 6, 7, 64, body.len()] {
            let mut frames = GrpcFrames::default();
            let counted: u64 = body.chunks(cut).map(|c| frames.feed(c)).sum();
            assert_eq!(counted, 4, "chunks of {cut}");
        }
    }

    #[test]
    fn a_huge_declared_length_only_skips_bytes() {
        let mut frames = GrpcFrames::default();
        assert_eq!(frames.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]), 1);
        assert_eq!(frames.feed(&[0; 4096]), 0);
    }
}
