//! An HTTP/1.1 client connection with no task of its own: whoever waits on
//! it drives it — the request's task until the response head is in, then
//! whoever reads the response body. A task per connection would cost a
//! hand-off each way per request (the request's task waking the
//! connection's to write, the connection's waking the request's with the
//! answer); driven in place, a request is written and its answer parsed by
//! the task that needs them. Once the body is read the connection goes
//! back to its `Home` (a pool, a stream's pod slot) from where it stands.
//!
//! A connection that cannot be reused when its response is done with (the
//! peer asked to close, the body was dropped half-read, an upgrade is
//! under way) gets a task to finish on, as every connection had before.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1,
    rt::{Read, Write},
    Request, Response,
};
use sync_wrapper::SyncWrapper;

/// The connection's protocol state machine (hyper's dispatcher, upgrades
/// included). Boxed once per connection, not per request. Only ever
/// reached through `&mut`, hence `SyncWrapper`: response bodies must be
/// `Sync`, the I/O under it (a tunnel stream) is not.
type Driver = SyncWrapper<Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>>;

/// A request body hyper can send.
pub trait Payload: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}
impl<B> Payload for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a connection goes once its response has been read.
pub trait Home<B: Payload>: Send + Sync + Unpin + 'static {
    /// Takes back `client`, free for another request.
    fn back(self, client: Client<B>);
}

/// One HTTP/1.1 connection to an upstream, driven by its users.
pub struct Client<B: Payload> {
    sender: http1::SendRequest<B>,
    /// `None` once the connection has ended (closed, failed or upgraded).
    driver: Option<Driver>,
}

impl<B: Payload> Client<B> {
    /// Starts HTTP/1.1 on `io` (nothing is exchanged until a request).
    pub async fn handshake<T>(builder: &http1::Builder, io: T) -> hyper::Result<Self>
    where
        T: Read + Write + Unpin + Send + 'static,
    {
        let (sender, connection) = builder.handshake(io).await?;
        Ok(Self {
            sender,
            driver: Some(SyncWrapper::new(Box::pin(connection.with_upgrades()))),
        })
    }

    /// Whether the connection can take a request now. What the peer did
    /// while nobody drove it (closed it) is read first.
    pub fn usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop()));
        self.driver.is_some() && self.sender.is_ready()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.driver.is_none() || self.sender.is_closed()
    }

    /// Lets the connection make progress. Once it has ended its state is
    /// dropped, which also tells a request still waiting that it never
    /// will be answered.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver {
            if driver.get_mut().as_mut().poll(cx).is_ready() {
                self.driver = None;
            }
        }
    }

    /// Sends `request` and drives the connection until its response head
    /// is in. The response's body drives it on, and hands it to `home`
    /// once read.
    pub async fn send<H: Home<B>>(
        mut self,
        request: Request<B>,
        home: H,
    ) -> hyper::Result<Response<Driven<B, H>>> {
        let mut response = std::pin::pin!(self.sender.send_request(request));
        let head = std::future::poll_fn(|cx| {
            // The request is written and its answer parsed by the
            // driving; one drive per wake-up, then look again.
            if let Poll::Ready(head) = response.as_mut().poll(cx) {
                return Poll::Ready(head);
            }
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await?;
        // That driving left this task's waker with the body's sender: the
        // body's first read, asking for bytes, would wake this very task —
        // a yield back through the scheduler's queue. Driven once more
        // without a waker, the connection waits for that ask with none;
        // whoever reads the body drives it anyway.
        self.drive(&mut Context::from_waker(Waker::noop()));
        Ok(head.map(|body| Driven {
            body,
            client: Some((self, home)),
        }))
    }

    /// Done with for good: a connection still running gets a task to end
    /// on (a close to send, an upgrade to complete), and closes once idle
    /// (nobody can send on it any more); else it is dropped.
    fn finish(self) {
        let Some(driver) = self.driver else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(driver.into_inner());
        }
    }
}

/// A response body that drives its connection while it is read.
pub struct Driven<B: Payload, H: Home<B>> {
    body: Incoming,
    /// `None` once the connection went home or was given up.
    client: Option<(Client<B>, H)>,
}

impl<B: Payload, H: Home<B>> Driven<B, H> {
    /// The body's next frame, if it is in; the connection released after
    /// the last.
    fn next_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() || self.body.is_end_stream() {
            self.release();
        }
        Poll::Ready(frame)
    }

    /// The body is done with: its connection goes home if it can take
    /// another request, else it is finished.
    fn release(&mut self) {
        if let Some((mut client, home)) = self.client.take() {
            if client.usable() {
                home.back(client);
            } else {
                client.finish();
            }
        }
    }
}

impl<B: Payload, H: Home<B>> Body for Driven<B, H> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Whatever is in first; else the connection driven once (it reads
        // the upstream into the body), and look again.
        let this = self.get_mut();
        if let Poll::Ready(frame) = this.next_frame(cx) {
            return Poll::Ready(frame);
        }
        match &mut this.client {
            Some((client, _)) => client.drive(cx),
            None => return Poll::Pending,
        }
        this.next_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: Payload, H: Home<B>> Drop for Driven<B, H> {
    /// A body dropped before its end (a retried answer, a client gone):
    /// its connection goes home if what was left had been read already.
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::oneshot,
    };

    use super::*;

    type Slot = Arc<Mutex<Option<Client<Empty<Bytes>>>>>;

    /// A home that keeps the one connection handed back.
    struct Kept(Slot);

    impl Home<Empty<Bytes>> for Kept {
        fn back(self, client: Client<Empty<Bytes>>) {
            *self.0.lock().unwrap() = Some(client);
        }
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("/")
            .header("host", "upstream")
            .body(Empty::new())
            .unwrap()
    }

    /// A server answering each request on one connection with `answer`,
    /// then closing it when `close` fires. Returns its address.
    async fn server(answer: &'static [u8], close: oneshot::Receiver<()>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let answering = async {
                let mut buf = [0u8; 4096];
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    socket.write_all(answer).await.unwrap();
                }
            };
            // A close already asked for wins over a request read.
            tokio::select! {
                biased;
                _ = close => {}
                () = answering => {}
            }
            // Only one connection is ever accepted: a second would hang.
            drop(listener);
        });
        address
    }

    async fn connect(address: std::net::SocketAddr) -> Client<Empty<Bytes>> {
        let io = TokioIo::new(TcpStream::connect(address).await.unwrap());
        Client::handshake(&http1::Builder::new(), io).await.unwrap()
    }

    /// One request to a server answering `answer`: the server's closer,
    /// the home the connection goes to, and the response.
    async fn exchange(
        answer: &'static [u8],
    ) -> (
        oneshot::Sender<()>,
        Slot,
        Response<Driven<Empty<Bytes>, Kept>>,
    ) {
        let (close, closing) = oneshot::channel();
        let address = server(answer, closing).await;
        let home = Slot::default();
        let response = connect(address)
            .await
            .send(get(), Kept(home.clone()))
            .await
            .unwrap();
        (close, home, response)
    }

    #[tokio::test]
    async fn a_connection_whose_body_was_read_goes_home_and_serves_the_next_request() {
        let (_close, closing) = oneshot::channel();
        let address = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", closing).await;
        let home = Slot::default();
        let mut client = connect(address).await;
        for _ in 0..3 {
            let response = client.send(get(), Kept(home.clone())).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            client = home
                .lock()
                .unwrap()
                .take()
                .expect("the connection came home");
            assert!(client.usable());
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_does_not_bring_its_connection_home() {
        // Announces more than it sends: the body never ends.
        let (_close, home, response) =
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart").await;
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(&first.into_data().unwrap()[..], b"part");
        drop(body);
        assert!(
            home.lock().unwrap().is_none(),
            "a half-read connection was reused"
        );
    }

    #[tokio::test]
    async fn a_connection_asked_to_close_does_not_go_home() {
        let (_close, home, response) =
            exchange(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok").await;
        response.into_body().collect().await.unwrap();
        assert!(home.lock().unwrap().is_none());
    }

    /// Nobody drives a connection at rest in a pool: that its peer closed
    /// it is read when it is next looked at.
    #[tokio::test]
    async fn a_connection_closed_by_its_peer_while_at_rest_is_not_usable() {
        let (close, home, response) =
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        response.into_body().collect().await.unwrap();
        let mut client = home
            .lock()
            .unwrap()
            .take()
            .expect("the connection came home");
        assert!(client.usable());
        close.send(()).unwrap();
        // The close reaches the socket soon; bounded, not timed.
        for _ in 0..200 {
            if !client.usable() {
                assert!(client.is_closed());
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("a connection its peer closed still looks usable after 2 s");
    }

    #[tokio::test]
    async fn a_request_on_a_connection_that_failed_gets_an_error() {
        let (close, closing) = oneshot::channel();
        let address = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", closing).await;
        let client = connect(address).await;
        close.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let home = Slot::default();
        let sent = client.send(get(), Kept(home.clone())).await;
        assert!(
            sent.is_err(),
            "a request on a closed connection was answered"
        );
        assert!(home.lock().unwrap().is_none());
    }
}
