//! How an HTTP connection ends when meshd stops (SIGTERM, or a hand-over
//! to a new meshd) without failing a request. HTTP/2 gets GOAWAY at once:
//! the client opens new streams elsewhere, those in flight finish. HTTP/1.1
//! has no such message, and closing an idle keep-alive connection races
//! the client's next request on it. So, as Envoy drains: every answer from
//! then on carries `Connection: close` (the client reconnects, to the new
//! meshd), and a connection with nothing in flight is closed only once it
//! has been idle for `DRAIN_GRACE` after its last answer — a client that
//! sends within the grace is told, one that is idle longer sees the close
//! well before it reuses the connection.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use hyper::{header, http::HeaderValue, Response, Version};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;

use crate::net::{accept::stopped, clock};

/// How long a draining HTTP/1.1 connection may sit idle after its last
/// answer before it is closed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What one connection's requests tell its drain.
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last answer left (clock nanoseconds); the connection's
    /// start until then.
    last: AtomicU64,
    http2: AtomicBool,
    stop: watch::Receiver<bool>,
}

impl Activity {
    pub fn new(stop: watch::Receiver<bool>) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(clock::now_nanos()),
            http2: AtomicBool::new(false),
            stop,
        }
    }

    /// Answers a request of `version` with `answer`, tracked for the
    /// drain: in flight until the answer is ready, then (while draining)
    /// marked as the connection's last. `answer` comes boxed: a request's
    /// future is kilobytes, and it is moved several times before it first
    /// runs (into an HTTP/2 stream's task, through hyper and tokio) — a
    /// pointer moves for free, and is not held twice (as the argument and
    /// as the future awaited) the way a future by value is.
    pub async fn answer<B>(
        &self,
        version: Version,
        answer: Pin<Box<impl Future<Output = Response<B>>>>,
    ) -> Response<B> {
        self.begin(version);
        let mut response = answer.await;
        self.end(version, &mut response);
        response
    }

    /// A request arrived.
    fn begin(&self, version: Version) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
    }

    /// Its answer is ready: while draining, an HTTP/1 answer tells the
    /// client this connection closes after it.
    fn end<B>(&self, version: Version, response: &mut Response<B>) {
        self.last.store(clock::now_nanos(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if version < Version::HTTP_2 && *self.stop.borrow() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// How much longer the connection must stay idle before it may close;
    /// zero when it may close now.
    fn grace_left(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return DRAIN_GRACE;
        }
        let idle = clock::now_nanos().saturating_sub(self.last.load(Ordering::Acquire));
        DRAIN_GRACE.saturating_sub(Duration::from_nanos(idle))
    }
}

/// Serves `conn` until the client closes it or, once meshd stops, until
/// it is drained (see the module).
pub async fn serve<C: GracefulConnection>(conn: C, activity: &Activity) -> Result<(), C::Error> {
    tokio::pin!(conn);
    let mut stop = activity.stop.clone();
    tokio::select! {
        served = conn.as_mut() => return served,
        _ = stopped(&mut stop) => {}
    }
    if !activity.http2.load(Ordering::Relaxed) {
        loop {
            let left = activity.grace_left();
            if left.is_zero() {
                break;
            }
            tokio::select! {
                served = conn.as_mut() => return served,
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
