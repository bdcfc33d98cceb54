//! The accept loop every listener runs: a span per connection, shedding
//! when descriptors run out, and a bounded drain when meshd stops.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

/// What an accept loop counts.
#[derive(Clone, Default)]
pub struct AcceptCounters {
    /// Accept calls that failed.
    pub errors: Counter,
    /// Connections reset at once because no descriptor was left.
    pub shed: Counter,
}

/// Pause after an accept error (such as running out of descriptors) so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts on `listener` until `stop` turns true, running `serve` for each
/// connection in a span of its own; then closes the listener and waits up
/// to `drain` for the connections in flight before cutting the rest.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    counters: &AcceptCounters,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument as _;
    let mut next_id = 0u64;
    let mut connections = tokio::task::JoinSet::new();
    let mut shedder = Shedder::new(what);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    let span = tracing::info_span!("conn", listener = what, id = next_id, peer = %peer);
                    connections.spawn(serve(stream, peer).instrument(span));
                }
                Err(err) => {
                    counters.errors.inc();
                    if out_of_descriptors(&err) {
                        shedder.shed(&listener, counters).await;
                    } else {
                        tracing::warn!(listener = what, error = %err, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tracing::info!(
        listener = what,
        in_flight = connections.len(),
        ?drain,
        "listener closed; draining"
    );
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = what,
            cut = connections.len(),
            "drain timeout reached; closing the rest"
        );
        connections.shutdown().await;
    }
}

fn out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Out of file descriptors, a listener cannot even accept a connection to
/// refuse it: the connection would sit in the accept queue, its client
/// waiting. A descriptor kept in reserve is given up to accept one such
/// connection and reset it at once (the client learns immediately), then
/// taken back. When descriptors free up, accepting just works again.
struct Shedder {
    what: &'static str,
    reserve: Option<std::fs::File>,
    shed: u64,
    last_log: Option<std::time::Instant>,
}

impl Shedder {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            reserve: std::fs::File::open("/dev/null").ok(),
            shed: 0,
            last_log: None,
        }
    }

    async fn shed(&mut self, listener: &tokio::net::TcpListener, counters: &AcceptCounters) {
        self.reserve = None;
        // Whatever is queued now, without waiting for more.
        while let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::ZERO, listener.accept()).await
        {
            let _ = stream.set_zero_linger();
            drop(stream);
            self.shed += 1;
            counters.shed.inc();
        }
        self.reserve = std::fs::File::open("/dev/null").ok();
        let quiet = self
            .last_log
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
        if !quiet {
            self.last_log = Some(std::time::Instant::now());
            tracing::warn!(
                listener = self.what,
                shed = self.shed,
                "out of file descriptors: resetting new connections until some free up"
            );
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
