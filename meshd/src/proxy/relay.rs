//! Copies bytes both ways between a client and its upstream with bounded
//! buffers, propagating half-close, and counting bytes as they pass.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A stream that adds every byte read from it to a counter.
struct Counted<'a, S> {
    inner: &'a mut S,
    read: &'a Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read.inc_by(read as u64);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Something a relay can reset when the other side failed.
pub trait Resettable {
    /// Makes the next close a reset (a no-op where there is no socket).
    fn reset_on_close(&self);
}

impl Resettable for TcpStream {
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

/// Relays until both directions have ended. When one side finishes sending,
/// the other side's write half is shut down (half-close) and the opposite
/// direction carries on. On an error both ends are reset where they can be,
/// so each peer learns the other is gone.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    buffer_size: usize,
    received: &Counter,
    sent: &Counter,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Resettable,
    U: AsyncRead + AsyncWrite + Unpin + Resettable,
{
    let mut from_client = Counted {
        inner: client,
        read: received,
    };
    let mut from_upstream = Counted {
        inner: upstream,
        read: sent,
    };
    let result = tokio::io::copy_bidirectional_with_sizes(
        &mut from_client,
        &mut from_upstream,
        buffer_size,
        buffer_size,
    )
    .await;
    if result.is_err() {
        from_client.inner.reset_on_close();
        from_upstream.inner.reset_on_close();
    }
    result.map(|_| ())
}
