//! Real TCP clients and servers for meshd's black-box tests, demo and bench:
//! deterministic data, SHA-256 digests, and a line of output per outcome.
//!
//! Servers: `hello` (a minimal HTTP/1.1 responder that names itself and the
//! peer it saw), `echo`, `sink` (answers the digest of what it read) and
//! `source` (sends N deterministic bytes). Clients: `upload`, `download`,
//! `echo`, `many` (concurrent echo round trips) and `hold`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How `hello` misbehaves on command.
#[derive(Clone, clap::Args)]
struct Misbehave {
    /// Fail the first N requests (counted over all connections), then behave.
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    /// How a request fails: `status` (answers --fail-status), `reset`
    /// (closes the connection with a TCP RST) or `hang` (never answers).
    #[arg(long, default_value = "status", value_parser = ["status", "reset", "hang"])]
    fail_mode: String,
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// `GET /healthz` answers 200 while this file exists, else 503 (not
    /// counted as a request).
    #[arg(long)]
    health_file: Option<std::path::PathBuf>,
    /// A hostile upstream: every answer carries a `grpc-status` header of
    /// this many bytes, different each time (an attempt to blow up the
    /// proxy's metric labels).
    #[arg(long, default_value_t = 0)]
    hostile_grpc_status: usize,
    /// Answer each request with the next status code of 200..=599 (every
    /// one a valid label value: an attempt to multiply the series).
    #[arg(long)]
    every_status: bool,
}

/// Requests `hello` has seen, for `--fail-first`.
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Subcommand)]
enum Command {
    /// Serve on ADDR until killed.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// `echo-many` echoes like `echo` on one thread, for thousands of
        /// connections at once.
        #[arg(long, value_parser = ["hello", "echo", "echo-many", "sink", "source"])]
        mode: String,
        /// Name `hello` answers with.
        #[arg(long, default_value = "server")]
        name: String,
        /// Bytes `source` sends per connection.
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        /// `source` sends at most this many bytes per second (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// `hello` waits this long before each answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[command(flatten)]
        misbehave: Misbehave,
    },
    /// Send N bytes to a sink and check the digest it answers.
    Upload {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Read from a source and check the digest of N bytes.
    Download {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Send N bytes to an echo server while reading them back.
    Echo {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Open COUNT connections at once to an echo server, one round trip each.
    Many {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Spread the connects over this many milliseconds (all connections
        /// are still open at once before any round trip starts).
        #[arg(long, default_value_t = 0)]
        ramp_ms: u64,
    },
    /// Ask an HTTP/1.1 server to upgrade the connection (as a websocket
    /// client does), then send N bytes over it and check they come back.
    Upgrade {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 100_000)]
        bytes: u64,
    },
    /// Open COUNT connections to an echo server one after another, one
    /// round trip each, then keep them all open and idle for SECONDS;
    /// prints `open COUNT` once they all are.
    Idle {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Connect, send bytes for ever (slowly), never read.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
    },
    /// One HTTP/1.1 keep-alive request, then idle until the server closes
    /// the connection (up to 120 s); prints what happened.
    HttpIdle {
        #[arg(long)]
        connect: SocketAddr,
    },
    /// A new connection per request to an echo server, at a fixed rate, for
    /// a while; prints successes and exits non-zero if any request failed.
    Load {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 50)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Each request an HTTP/1.1 `GET /` to a `hello` server instead,
        /// which must answer 200; prints `served NAME COUNT` per name.
        #[arg(long)]
        http: bool,
    },
    /// A gRPC server (the standard health service) whose `meshd.test`
    /// status flips every 100 ms, so Watch streams updates.
    GrpcServe {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A gRPC client: unary Check, a NOT_FOUND error (status in trailers),
    /// and a server stream (Watch) of N messages.
    GrpcCheck {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 3)]
        stream_messages: usize,
    },
    /// A peer of meshd's tunnel with a certificate of its own: opens an
    /// HTTP/2 CONNECT stream to TARGET through NODE's :15008 (mutual TLS
    /// 1.3), with BAGGAGE, sends REQUEST and prints the status and what
    /// came back — what a hostile peer with a valid certificate can do.
    Hbone {
        /// The destination meshd's tunnel address.
        #[arg(long)]
        node: SocketAddr,
        /// A directory with `tls.crt` and `tls.key`.
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        target: SocketAddr,
        /// The TLS server name: which of the node's identities answers
        /// (`<serviceAccount>.<namespace>.<trustDomain>`).
        #[arg(long)]
        server_name: String,
        #[arg(long, default_value = "")]
        baggage: String,
        /// Sent on the stream (`\r\n` escapes allowed).
        #[arg(long, default_value = "")]
        request: String,
    },
    /// Request/response latency at a fixed rate over one connection to an
    /// echo server; prints percentiles in microseconds.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Request (and response) size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Keep-alive HTTP/1.1 `GET /` requests to an HTTP server instead
        /// of echoed bytes (`size` unused).
        #[arg(long)]
        http: bool,
    },
}

fn main() -> anyhow::Result<()> {
    // Thousands of connections need more descriptors than the usual soft
    // limit: take what the hard limit allows.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    match Cli::parse().command {
        Command::Serve {
            listen,
            mode,
            name,
            bytes,
            rate,
            delay_ms,
            misbehave,
        } => serve(
            listen,
            &mode,
            &name,
            bytes,
            rate,
            Duration::from_millis(delay_ms),
            misbehave,
        ),
        Command::Upload { connect, bytes } => upload(connect, bytes),
        Command::Download { connect, bytes } => download(connect, bytes),
        Command::Echo { connect, bytes } => echo(connect, bytes),
        Command::Upgrade { connect, bytes } => upgrade(connect, bytes),
        Command::Many {
            connect,
            count,
            timeout,
            ramp_ms,
        } => many(
            connect,
            count,
            Duration::from_secs(timeout),
            Duration::from_millis(ramp_ms),
        ),
        Command::Hold { connect } => hold(connect),
        Command::Idle {
            connect,
            count,
            seconds,
        } => idle(connect, count, seconds),
        Command::HttpIdle { connect } => http_idle(connect),
        Command::Load {
            connect,
            rate,
            seconds,
            http,
        } => load(connect, rate, seconds, http),
        Command::GrpcServe { listen } => grpc::serve(listen),
        Command::GrpcCheck {
            connect,
            stream_messages,
        } => grpc::check(connect, stream_messages),
        Command::Rr {
            connect,
            rate,
            seconds,
            size,
            http,
        } => rr(connect, rate, seconds, size, http),
        Command::Hbone {
            node,
            cert,
            target,
            server_name,
            baggage,
            request,
        } => hbone::run(
            node,
            &cert,
            target,
            &server_name,
            &baggage,
            &request.replace("\\r\\n", "\r\n"),
        ),
    }
}

// === data ===

/// The same pseudo-random bytes on both ends (xorshift64*).
struct Pattern(u64);

impl Pattern {
    fn new() -> Self {
        Self(0x9E37_79B9_7F4A_7C15)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Writes `bytes` of the pattern, feeding `digest`, optionally rate-limited.
fn send_pattern(w: &mut impl Write, bytes: u64, rate: u64, digest: &mut Sha256) -> io::Result<()> {
    let mut pattern = Pattern::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    let start = Instant::now();
    let mut sent = 0u64;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        digest.update(&buf[..n]);
        left -= n as u64;
        sent += n as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
    }
    Ok(())
}

/// A blocking reader that retries `EAGAIN`.
///
/// A socket in a sockmap (meshd's same-node acceleration) reads through the
/// kernel's `tcp_bpf_recvmsg`, which returns `EAGAIN` to a *blocking* reader
/// woken without data, e.g. by the state change after its own FIN is
/// acknowledged. Non-blocking applications retry such reads anyway; this
/// client does the same so it can exercise acceleration. README documents
/// the caveat for blocking applications.
struct Retrying<R>(R);

impl<R: Read> Read for Retrying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Reads to EOF, returning the byte count and digest.
fn read_all(r: &mut impl Read) -> io::Result<(u64, String)> {
    let mut r = Retrying(r);
    let mut digest = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hex(digest)));
        }
        digest.update(&buf[..n]);
        total += n as u64;
    }
}

fn hex(digest: Sha256) -> String {
    digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pattern_digest(bytes: u64) -> String {
    let mut digest = Sha256::new();
    let _ = send_pattern(&mut io::sink(), bytes, 0, &mut digest);
    hex(digest)
}

// === servers ===

fn serve(
    listen: SocketAddr,
    mode: &str,
    name: &str,
    bytes: u64,
    rate: u64,
    delay: Duration,
    misbehave: Misbehave,
) -> anyhow::Result<()> {
    if mode == "echo-many" {
        return serve_echo_many(listen);
    }
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening {listen} {mode}");
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mode = mode.to_owned();
        let name = name.to_owned();
        let misbehave = misbehave.clone();
        thread::spawn(move || {
            let result = match mode.as_str() {
                "hello" => serve_hello(stream, &name, delay, &misbehave),
                "echo" => serve_echo(stream),
                "sink" => serve_sink(stream),
                _ => serve_source(stream, bytes, rate),
            };
            // A peer that hangs up early (a readiness probe, a killed
            // client) is no news.
            match result {
                Err(err)
                    if !matches!(
                        err.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    eprintln!("connection: {err}");
                }
                _ => {}
            }
        });
    }
    Ok(())
}

/// Writes one whole HTTP/1.1 response: one write, as a head and body in
/// separate segments would wait on Nagle for the peer's delayed ACK.
fn respond(stream: &mut TcpStream, status: &str, body: &str, close: bool) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    stream.write_all(response.as_bytes())
}

/// A minimal HTTP/1.1 server: answers every request on a connection
/// (keep-alive) with its name and the peer it saw, after `delay`. It fails
/// requests on command (`Misbehave`), and a request to upgrade the
/// connection (`Upgrade: websocket`) switches it to echoing bytes.
fn serve_hello(
    stream: TcpStream,
    name: &str,
    delay: Duration,
    misbehave: &Misbehave,
) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        let mut first = true;
        let mut close = false;
        let mut content_length = 0usize;
        let mut path = String::new();
        let mut upgrade = false;
        let mut traceparent = None;
        // The request head; a body, if any, is read and ignored.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if first {
                close = lower.ends_with("http/1.0\r\n");
                path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                first = false;
            } else if lower.starts_with("upgrade:") {
                upgrade = true;
            } else if let Some(value) = lower.strip_prefix("traceparent:") {
                traceparent = Some(value.trim().to_owned());
            } else if let Some(value) = lower.strip_prefix("content-length:") {
                content_length = value.trim().parse().unwrap_or(0);
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        io::copy(
            &mut (&mut reader).take(content_length as u64),
            &mut io::sink(),
        )?;
        if let (Some(file), "/healthz") = (&misbehave.health_file, path.as_str()) {
            let status = if file.exists() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            respond(&mut stream, status, "health\n", close)?;
            continue;
        }
        if upgrade {
            stream.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            )?;
            // What the reader buffered already, then the rest, echoed.
            let buffered = reader.buffer().to_vec();
            stream.write_all(&buffered)?;
            reader.consume(buffered.len());
            io::copy(&mut reader.into_inner(), &mut stream)?;
            return stream.shutdown(Shutdown::Write);
        }
        if REQUESTS.fetch_add(1, Ordering::Relaxed) < misbehave.fail_first {
            match misbehave.fail_mode.as_str() {
                "reset" => {
                    let linger = nix::sys::socket::sockopt::Linger;
                    let off = nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    nix::sys::socket::setsockopt(&stream, linger, &off)?;
                    return Ok(());
                }
                "hang" => {
                    // Until the peer gives up.
                    while reader.read(&mut [0u8; 512])? > 0 {}
                    return Ok(());
                }
                _ => {
                    let status = format!("{} Failing On Command", misbehave.fail_status);
                    respond(&mut stream, &status, &format!("{name} failing\n"), close)?;
                    continue;
                }
            }
        }
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        // A traced request: the trace context it came with, for the tests.
        let body = match &traceparent {
            Some(context) => format!("hello from {name} to {peer}\ntraceparent: {context}\n"),
            None => format!("hello from {name} to {peer}\n"),
        };
        if misbehave.hostile_grpc_status > 0 {
            let seen = REQUESTS.load(Ordering::Relaxed);
            let junk: String = format!("{seen}-")
                .chars()
                .chain(std::iter::repeat('x'))
                .take(misbehave.hostile_grpc_status)
                .collect();
            let response = format!(
                "HTTP/1.1 200 OK\r\ngrpc-status: {junk}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes())?;
            continue;
        }
        if misbehave.every_status {
            let seen = REQUESTS.load(Ordering::Relaxed);
            // Not the codes that forbid a body.
            let code = match 200 + seen % 400 {
                204 | 205 | 304 => 299,
                code => code,
            };
            let status = format!("{code} Whatever");
            respond(&mut stream, &status, &body, close)?;
        } else {
            respond(&mut stream, "200 OK", &body, close)?;
        }
        if close {
            return stream.shutdown(Shutdown::Write);
        }
    }
}

fn serve_echo_many(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind {listen}"))?;
        println!("listening {listen} echo-many");
        io::stdout().flush()?;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    })
}

fn serve_echo(mut stream: TcpStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)
}

fn serve_sink(mut stream: TcpStream) -> io::Result<()> {
    let (total, digest) = read_all(&mut stream)?;
    writeln!(stream, "{total} {digest}")?;
    stream.shutdown(Shutdown::Write)
}

fn serve_source(mut stream: TcpStream, bytes: u64, rate: u64) -> io::Result<()> {
    send_pattern(&mut stream, bytes, rate, &mut Sha256::new())?;
    stream.shutdown(Shutdown::Write)
}

// === clients ===

fn upgrade(connect: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /chat HTTP/1.1\r\nhost: {connect}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    let mut reader = BufReader::new(Retrying(stream.try_clone()?));
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 101") {
        bail!("expected 101 Switching Protocols, got {status:?}");
    }
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let writer = {
        let mut stream = stream.try_clone()?;
        thread::spawn(move || {
            let mut digest = Sha256::new();
            send_pattern(&mut stream, bytes, 0, &mut digest).map(|()| hex(digest))
        })
    };
    let mut echoed = Sha256::new();
    let mut left = bytes;
    let mut buf = vec![0u8; 16 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            bail!("the upgraded connection closed with {left} bytes still to come");
        }
        echoed.update(&buf[..n]);
        left -= n as u64;
    }
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    if hex(echoed) != sent {
        bail!("the echo differs from what was sent");
    }
    println!("upgraded echo ok {bytes}");
    Ok(())
}

fn idle(connect: SocketAddr, count: usize, seconds: u64) -> anyhow::Result<()> {
    let mut open = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&connect, Duration::from_secs(10))
            .with_context(|| format!("connection {i} of {count}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"ping")?;
        let mut pong = [0u8; 4];
        Retrying(&mut stream)
            .read_exact(&mut pong)
            .with_context(|| format!("round trip {i} of {count}"))?;
        open.push(stream);
    }
    println!("open {count}");
    io::stdout().flush()?;
    thread::sleep(Duration::from_secs(seconds));
    // Still all usable at the end.
    for (i, stream) in open.iter_mut().enumerate() {
        stream.write_all(b"ping")?;
        let mut pong = [0u8; 4];
        Retrying(&mut *stream)
            .read_exact(&mut pong)
            .with_context(|| format!("final round trip {i}"))?;
    }
    // Whoever read "open" may have stopped listening.
    let _ = writeln!(io::stdout(), "closed {count}");
    Ok(())
}

fn upload(connect: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    let mut digest = Sha256::new();
    send_pattern(&mut stream, bytes, 0, &mut digest)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    Retrying(&mut stream).read_to_string(&mut answer)?;
    let want = format!("{bytes} {}", hex(digest));
    if answer.trim() != want {
        bail!("sink answered {:?}, expected {want:?}", answer.trim());
    }
    println!("ok upload {want}");
    Ok(())
}

fn download(connect: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    let got = read_all(&mut stream)?;
    let want = (bytes, pattern_digest(bytes));
    if got != want {
        bail!(
            "received {} bytes with digest {}, expected {} bytes with {}",
            got.0,
            got.1,
            want.0,
            want.1
        );
    }
    println!("ok download {} {}", got.0, got.1);
    Ok(())
}

fn echo(connect: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<String> {
        let mut digest = Sha256::new();
        send_pattern(&mut writer, bytes, 0, &mut digest)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(hex(digest))
    });
    let mut reader = stream;
    let got = read_all(&mut reader)?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    if got != (bytes, sent.clone()) {
        bail!(
            "echo returned {} bytes with digest {}, sent {bytes} with {sent}",
            got.0,
            got.1
        );
    }
    println!("ok echo {bytes} {sent}");
    Ok(())
}

fn many(
    connect: SocketAddr,
    count: usize,
    timeout: Duration,
    ramp: Duration,
) -> anyhow::Result<()> {
    let ok = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(std::sync::Barrier::new(count));
    let workers: Vec<_> = (0..count)
        .map(|i| {
            let ok = ok.clone();
            let connected = connected.clone();
            thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || -> io::Result<()> {
                    thread::sleep(ramp.mul_f64(i as f64 / count as f64));
                    let stream = TcpStream::connect_timeout(&connect, timeout);
                    // All connections are open at the same moment (a failed
                    // one still joins, so nobody waits for ever).
                    connected.wait();
                    let mut stream = stream?;
                    let message = format!("ping {i}\n");
                    stream.write_all(message.as_bytes())?;
                    stream.shutdown(Shutdown::Write)?;
                    let mut answer = String::new();
                    Retrying(&mut stream).read_to_string(&mut answer)?;
                    if answer == message {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
        })
        .collect::<Result<_, _>>()?;
    let mut errors = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => errors.push(err.to_string()),
            Err(_) => errors.push("worker panicked".into()),
        }
    }
    let ok = ok.load(Ordering::Relaxed);
    println!("ok {ok} of {count}");
    if ok != count {
        bail!(
            "{} of {count} round trips failed: {:?}",
            count - ok,
            &errors[..errors.len().min(5)]
        );
    }
    Ok(())
}

fn hold(connect: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    println!("connected");
    io::stdout().flush()?;
    let buf = [0x55u8; 1024];
    loop {
        stream.write_all(&buf)?;
        thread::sleep(Duration::from_millis(20));
    }
}

/// Open-loop: request i is due at start + i/rate, and its latency counts
/// from when it was due, so a stall is not hidden by sending later
/// (no coordinated omission).
fn rr(connect: SocketAddr, rate: u64, seconds: u64, size: usize, http: bool) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    stream.set_nodelay(true)?;
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let request = if http {
        format!("GET / HTTP/1.1\r\nHost: {connect}\r\n\r\n").into_bytes()
    } else {
        vec![0x42u8; size]
    };
    let mut response = vec![0u8; size];
    let mut latencies = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        stream.write_all(&request)?;
        if http {
            read_http_response(&mut stream, &mut response)?;
        } else {
            Retrying(&mut stream).read_exact(&mut response)?;
        }
        latencies.push(due.elapsed());
    }
    latencies.sort();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_micros()
    };
    println!(
        "rr requests={total} p50_us={} p90_us={} p99_us={} max_us={}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

/// Reads one HTTP/1.1 response with a `Content-Length` body (keep-alive:
/// nothing after it is read); fails on anything but `200`.
fn read_http_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        anyhow::ensure!(buf.len() < 64 * 1024, "response head over 64 KiB");
        let n = Retrying(&mut *stream).read(&mut chunk)?;
        anyhow::ensure!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    anyhow::ensure!(head.starts_with("http/1.1 200"), "answered {head:?}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no content-length in {head:?}"))?;
    while buf.len() < head_end + length {
        let n = Retrying(&mut *stream).read(&mut chunk)?;
        anyhow::ensure!(n > 0, "connection closed in a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// One echo round trip on a new connection.
fn round_trip(connect: SocketAddr, i: u64) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&connect, Duration::from_secs(5))?;
    let message = format!("request {i}\n");
    stream.write_all(message.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    Retrying(&mut stream).read_to_string(&mut answer)?;
    if answer != message {
        return Err(io::Error::other(format!("echo returned {answer:?}")));
    }
    Ok(())
}

/// One `GET /` on a connection of its own: the name the `hello` server
/// answered with.
fn http_round_trip(connect: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&connect, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {connect}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    Retrying(&mut stream).read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!(
            "answered {:?}",
            &answer[..answer.len().min(200)]
        )));
    }
    answer
        .split("hello from ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("no hello in {answer:?}")))
}

fn load(connect: SocketAddr, rate: u64, seconds: u64, http: bool) -> anyhow::Result<()> {
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut served = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..total {
        if let Some(wait) = (start + interval * i as u32).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let result = if http {
            http_round_trip(connect).map(|name| *served.entry(name).or_default() += 1)
        } else {
            round_trip(connect, i)
        };
        if let Err(err) = result {
            failures.push(format!("request {i} at {:?}: {err}", start.elapsed()));
        }
    }
    for (name, count) in &served {
        println!("served {name} {count}");
    }
    println!("ok {} of {total}", total - failures.len() as u64);
    if !failures.is_empty() {
        bail!(
            "{} requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
    Ok(())
}

mod hbone {
    //! A tunnel peer that says what it likes (its baggage) over a valid
    //! certificate.

    use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

    use anyhow::Context as _;
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::{
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
        DigitallySignedStruct, SignatureScheme,
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Accepts any server: this client tests the server's side.
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    pub fn run(
        node: SocketAddr,
        cert: &Path,
        target: SocketAddr,
        server_name: &str,
        baggage: &str,
        request: &str,
    ) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let chain = CertificateDer::pem_file_iter(cert.join("tls.crt"))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(cert.join("tls.key"))?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
                .with_client_auth_cert(chain, key)?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            let tcp = tokio::net::TcpStream::connect(node).await?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from(server_name.to_owned())?, tcp)
                .await
                .context("TLS handshake")?;
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await?;
            tokio::spawn(connection);
            let mut connect = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri(target.to_string());
            if !baggage.is_empty() {
                connect = connect.header("baggage", baggage);
            }
            let response = sender
                .send_request(connect.body(Empty::<Bytes>::new())?)
                .await?;
            println!("status {}", response.status().as_u16());
            if !response.status().is_success() {
                return Ok(());
            }
            let mut stream = TokioIo::new(hyper::upgrade::on(response).await?);
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
            println!("{}", String::from_utf8_lossy(&answer));
            Ok(())
        })
    }
}

/// gRPC with tonic, over the standard health service.
mod grpc {
    use std::{net::SocketAddr, time::Duration};

    use anyhow::{bail, Context as _};
    use tokio_stream::StreamExt as _;
    use tonic_health::{
        pb::{health_client::HealthClient, HealthCheckRequest},
        ServingStatus,
    };

    const SERVICE: &str = "meshd.test";

    fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?)
    }

    pub fn serve(listen: SocketAddr) -> anyhow::Result<()> {
        runtime()?.block_on(async move {
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter
                .set_service_status(SERVICE, ServingStatus::Serving)
                .await;
            tokio::spawn(async move {
                let mut serving = true;
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    serving = !serving;
                    let status = if serving {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    reporter.set_service_status(SERVICE, status).await;
                }
            });
            println!("listening {listen} grpc");
            tonic::transport::Server::builder()
                .add_service(service)
                .serve(listen)
                .await
                .context("gRPC server")
        })
    }

    pub fn check(connect: SocketAddr, messages: usize) -> anyhow::Result<()> {
        runtime()?.block_on(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{connect}"))?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .context("connect")?;
            let mut client = HealthClient::new(channel);
            let request = || HealthCheckRequest {
                service: SERVICE.to_owned(),
            };
            let status = client
                .check(request())
                .await
                .context("unary Check")?
                .into_inner()
                .status;
            let unknown = client
                .check(HealthCheckRequest {
                    service: "no.such.service".to_owned(),
                })
                .await;
            match unknown {
                Err(status) if status.code() == tonic::Code::NotFound => {}
                other => bail!("expected NOT_FOUND for an unknown service, got {other:?}"),
            }
            let mut stream = client.watch(request()).await.context("Watch")?.into_inner();
            let mut seen = 0;
            while seen < messages {
                match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                    Ok(Some(Ok(_))) => seen += 1,
                    Ok(Some(Err(status))) => bail!("stream failed: {status}"),
                    Ok(None) => bail!("stream ended after {seen} messages"),
                    Err(_) => bail!("no stream message within 5 s after {seen}"),
                }
            }
            println!("ok unary status={status} not_found=trailers stream={seen}");
            Ok(())
        })
    }
}

fn http_idle(connect: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
    stream.write_all(format!("GET / HTTP/1.1\r\nhost: {connect}\r\n\r\n").as_bytes())?;
    let mut reader = BufReader::new(Retrying(stream.try_clone()?));
    let mut length = 0usize;
    let mut line = String::new();
    let status = {
        reader.read_line(&mut line)?;
        line.trim().to_owned()
    };
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    println!("response {status}");
    io::stdout().flush()?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => println!("closed by server"),
        Err(err) => println!("still open: {err}"),
    }
    Ok(())
}
