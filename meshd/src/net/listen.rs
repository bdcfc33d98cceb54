//! Listening sockets.

/// Pending connections a listener queues before accepting (the kernel
/// caps it at `net.core.somaxconn`): a node's pods may open thousands at
/// once, and the default of 1024 would make the kernel drop handshakes.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listening socket with a deep accept queue.
pub fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match address {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}
