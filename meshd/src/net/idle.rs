//! An idle timeout for any byte stream: a connection on which no byte has
//! moved either way for the timeout fails its next read with `TimedOut`,
//! so whatever serves it (hyper, the relay) ends it as it ends any broken
//! connection. The clock is read only when bytes move; the timer is
//! re-armed only when it fires.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// `inner`, closed once idle for `timeout`.
pub struct Idle<S> {
    inner: S,
    timeout: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    /// Counts connections this timeout closed.
    closed: Counter,
}

impl<S> Idle<S> {
    pub fn new(inner: S, timeout: Duration, closed: Counter) -> Self {
        let last = Instant::now();
        Self {
            inner,
            timeout,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + timeout)),
            closed,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether the connection has been idle for the timeout; else the
    /// timer is armed for the moment it would be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last + self.timeout;
            if Instant::now() >= deadline {
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.last = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx) => {
                self.closed.inc();
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: super::relay::Resettable> super::relay::Resettable for Idle<S> {
    fn reset_on_close(&self) {
        self.inner.reset_on_close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn closes_only_after_the_timeout_without_bytes() {
        let (near, mut far) = tokio::io::duplex(64);
        let closed = Counter::default();
        let mut idle = Idle::new(near, Duration::from_secs(10), closed.clone());
        tokio::time::sleep(Duration::from_secs(6)).await;
        far.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        idle.read_exact(&mut byte).await.unwrap();
        // 6 s after that byte the connection is still open...
        let read = tokio::time::timeout(Duration::from_secs(6), idle.read(&mut byte)).await;
        assert!(read.is_err(), "closed before the timeout: {read:?}");
        assert_eq!(closed.get(), 0);
        // ...and at 10 s it is closed.
        let err = idle.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(closed.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_count_as_activity() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut idle = Idle::new(near, Duration::from_secs(10), Counter::default());
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            idle.write_all(b"tick").await.unwrap();
        }
        let mut ticks = [0u8; 20];
        far.read_exact(&mut ticks).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut byte)).await;
        assert!(read.is_err(), "closed while the other way was busy");
    }
}
