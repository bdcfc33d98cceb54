//! Copies bytes both ways between a client and its upstream with bounded
//! buffers, propagating half-close, and counting bytes as they pass. A
//! direction holds its buffer only while bytes are in flight: thousands of
//! idle connections cost no buffer memory. A direction going idle hands
//! its buffer to its thread's small pool, and one becoming active takes it
//! back from there: no allocation and no zeroing per burst.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A stream that adds every byte read from it to counters (one per
/// reporter).
struct Counted<'a, S> {
    inner: &'a mut S,
    read: &'a [Counter],
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
            for counter in self.read {
                counter.inc_by(read as u64);
            }
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

/// Idle buffers each thread keeps (of any one size): a burst that starts
/// while fewer than this many directions on the thread are active costs
/// no allocation. 16 × the default 16 KiB is 256 KiB per worker thread.
const POOLED: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `size` bytes: one from this thread's pool, else a new one
/// (zeroed once, then reused as initialized memory).
fn take_buffer(size: usize) -> Box<[u8]> {
    let pooled = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let at = pool.iter().rposition(|b| b.len() == size)?;
        Some(pool.swap_remove(at))
    });
    pooled.unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Gives an idle buffer back to this thread's pool (dropped when full).
fn give_back(buffer: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED {
            pool.push(buffer);
        }
    });
}

/// One direction of a relay.
struct Pump {
    /// Present only while bytes wait to be written.
    buffer: Option<Box<[u8]>>,
    size: usize,
    /// Buffered bytes not yet written: `buffer[written..filled]`.
    written: usize,
    filled: usize,
    /// The reader reached its end; the writer is shut down once flushed.
    eof: bool,
    finished: bool,
}

impl Pump {
    fn new(size: usize) -> Self {
        Self {
            buffer: None,
            size,
            written: 0,
            filled: 0,
            eof: false,
            finished: false,
        }
    }

    /// Moves bytes from `reader` to `writer` until the reader ends (then
    /// shuts the writer down) or either side would block.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.written < self.filled {
                let Some(buffer) = &self.buffer else { break };
                let n = std::task::ready!(
                    Pin::new(&mut *writer).poll_write(cx, &buffer[self.written..self.filled])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
            }
            if self.eof {
                std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                std::task::ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                self.release();
                return Poll::Ready(Ok(()));
            }
            let size = self.size;
            let buffer = self.buffer.get_or_insert_with(|| take_buffer(size));
            let mut read = ReadBuf::new(buffer);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    self.written = 0;
                    self.filled = n;
                    self.eof = n == 0;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    // Nothing in flight: an idle direction holds no buffer.
                    self.release();
                    self.written = 0;
                    self.filled = 0;
                    std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Pump {
    fn release(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back(buffer);
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.release();
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
    received: &[Counter],
    sent: &[Counter],
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
    let mut to_upstream = Pump::new(buffer_size);
    let mut to_client = Pump::new(buffer_size);
    let result = std::future::poll_fn(|cx| {
        let up = to_upstream.poll(cx, &mut from_client, &mut from_upstream)?;
        let down = to_client.poll(cx, &mut from_upstream, &mut from_client)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    if result.is_err() {
        from_client.inner.reset_on_close();
        from_upstream.inner.reset_on_close();
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    fn pooled(size: usize) -> usize {
        POOL.with(|pool| pool.borrow().iter().filter(|b| b.len() == size).count())
    }

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bursts_reuse_the_threads_buffers_and_bytes_arrive_intact() {
        const SIZE: usize = 4096;
        let (mut app, mut client) = pair().await;
        let (mut upstream, mut server) = pair().await;
        let relaying =
            tokio::spawn(async move { relay(&mut client, &mut upstream, SIZE, &[], &[]).await });
        for round in 0..3u8 {
            // A burst larger than the buffer, each round with other bytes.
            let burst: Vec<u8> = (0..3 * SIZE).map(|i| (i as u8) ^ round).collect();
            app.write_all(&burst).await.expect("write");
            let mut got = vec![0; burst.len()];
            server.read_exact(&mut got).await.expect("read");
            assert_eq!(got, burst, "round {round}");
            tokio::task::yield_now().await;
            // Idle again: both directions' buffers are back in the pool
            // (the return direction never went active, so it took none).
            assert_eq!(pooled(SIZE), 1, "round {round}");
        }
        drop(app);
        drop(server);
        relaying.await.expect("join").expect("relay");
        assert_eq!(pooled(SIZE), 1, "no buffer lost or duplicated");
    }
}
