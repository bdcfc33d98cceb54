//! Restarts that drop nothing. A running meshd serves hand-over requests on
//! a unix socket (`node.handoverSocket`). A new meshd starting on the same
//! node asks there first: the old one passes its listening sockets over
//! (`SCM_RIGHTS`), the new one starts with them — no port is ever closed,
//! no queued connection is lost — adopts the pinned eBPF programs, and once
//! ready says so. Only then does the old meshd stop accepting and drain
//! the connections it holds, leaving capture in place. If the new meshd
//! dies before it is ready, the old one carries on as if nothing happened.

use std::{
    io::{IoSlice, IoSliceMut, Read as _, Write as _},
    net::TcpListener,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tracing::{info, warn};

/// What a request says, and what confirms the new meshd is serving.
const REQUEST: &[u8] = b"meshd handover v1\n";
const READY: &[u8] = b"ready\n";
/// How long the old meshd waits for the new one to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The most listeners passed over.
const MAX_LISTENERS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hand-over from the running meshd failed: {0}")]
    Protocol(String),
}

/// Listening sockets by name (`outbound`, `inbound`, `metrics`,
/// `readiness`, `admin`).
pub type Listeners = Vec<(String, TcpListener)>;

/// A hand-over received, awaiting our readiness.
pub struct Taken {
    pub listeners: Listeners,
    stream: UnixStream,
}

impl Taken {
    /// Tells the old meshd this one serves now: it stops accepting and drains.
    pub fn ready(mut self) {
        if let Err(err) = self.stream.write_all(READY) {
            warn!(error = %err, "could not tell the previous meshd to stop; it keeps serving alongside");
        }
    }

    /// The listener called `name`, if it was handed over.
    pub fn take(&mut self, name: &str) -> Option<TcpListener> {
        let index = self.listeners.iter().position(|(n, _)| n == name)?;
        Some(self.listeners.remove(index).1)
    }
}

/// Asks a meshd running at `path` for its listeners; `None` when none runs.
pub fn request(path: &Path) -> Result<Option<Taken>, HandoverError> {
    let io = |source| HandoverError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(err) => return Err(io(err)),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    stream.write_all(REQUEST).map_err(io)?;
    let mut names = [0u8; 512];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut names)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io(e.into()))?;
        let mut fds = Vec::new();
        for control in message.cmsgs().map_err(|e| io(e.into()))? {
            if let ControlMessageOwned::ScmRights(received) = control {
                // SAFETY: SCM_RIGHTS gives this process new descriptors
                // that nothing else owns; each is wrapped exactly once.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (message.bytes, fds)
    };
    let names = String::from_utf8_lossy(&names[..bytes]).into_owned();
    let names: Vec<&str> = names.split_whitespace().collect();
    if names.len() != fds.len() || fds.is_empty() {
        return Err(HandoverError::Protocol(format!(
            "got {} descriptors for {names:?}",
            fds.len()
        )));
    }
    let listeners = names
        .into_iter()
        .zip(fds)
        .map(|(name, fd)| {
            let listener = TcpListener::from(fd);
            listener
                .set_nonblocking(true)
                .map(|()| (name.to_owned(), listener))
        })
        .collect::<Result<Listeners, _>>()
        .map_err(io)?;
    stream.set_read_timeout(None).map_err(io)?;
    info!(
        listeners = listeners.len(),
        "took over the running meshd's listeners"
    );
    Ok(Some(Taken { listeners, stream }))
}

/// Serves one hand-over at `path`: passes `listeners` (duplicates of the
/// ones in use) to the first meshd that asks and confirms it is ready.
/// Returns once that happened; never, if nobody asks.
pub async fn serve(path: PathBuf, listeners: Vec<(String, OwnedFd)>) {
    let listener = match bind_private(&path) {
        Ok(listener) => listener,
        Err(err) => {
            warn!(path = %path.display(), error = %err, "no hand-over socket: a restart will have to rebind");
            return std::future::pending().await;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if let Err(reason) = trusted_peer(&stream) {
            warn!(path = %path.display(), %reason, "refusing a hand-over request");
            continue;
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let names: Vec<String> = listeners.iter().map(|(n, _)| n.clone()).collect();
        let fds: Vec<RawFd> = listeners
            .iter()
            .map(|(_, fd)| fd.as_fd().as_raw_fd())
            .collect();
        let handed = tokio::task::spawn_blocking(move || give(stream, &names, &fds)).await;
        match handed {
            Ok(Ok(())) => {
                info!("the new meshd is ready: handing over and draining");
                return;
            }
            Ok(Err(err)) => warn!(error = %err, "hand-over abandoned; still serving"),
            Err(err) => warn!(error = %err, "hand-over task failed; still serving"),
        }
    }
}

/// Binds the hand-over socket so that only this user can reach it: the
/// socket 0600, in a directory that only its owner may change (created
/// 0700 when missing). Whoever may connect gets every listener, or makes
/// this meshd drain and exit.
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let meta = std::fs::metadata(dir)?;
        if meta.mode() & 0o022 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(std::io::Error::other(format!(
                "{} is writable by others or not ours: anyone could replace the socket",
                dir.display()
            )));
        }
    }
    // A socket file left by an earlier meshd is stale: this one serves now.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether the peer may take the listeners: the same user, running the
/// same program (a meshd binary: its executable has this one's name).
fn trusted_peer(stream: &tokio::net::UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("no peer credentials: {e}"))?;
    let uid = nix::unistd::geteuid().as_raw();
    if cred.uid() != uid {
        return Err(format!("peer uid {} is not {uid}", cred.uid()));
    }
    let pid = cred.pid().ok_or("the peer's pid is unknown")?;
    let name = |exe: std::io::Result<PathBuf>| {
        exe.ok()
            .and_then(|p| p.file_name().map(|n| n.to_os_string()))
    };
    let theirs = name(std::fs::read_link(format!("/proc/{pid}/exe")));
    let ours = name(std::env::current_exe());
    match (theirs, ours) {
        (Some(theirs), Some(ours)) if theirs == ours => Ok(()),
        (theirs, _) => Err(format!("peer pid {pid} runs {theirs:?}, not meshd")),
    }
}

/// One hand-over conversation: request → listeners → ready.
fn give(mut stream: UnixStream, names: &[String], fds: &[RawFd]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = [0u8; REQUEST.len()];
    stream.read_exact(&mut request)?;
    if request != REQUEST {
        return Err(std::io::Error::other("not a hand-over request"));
    }
    let text = names.join(" ");
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::empty(),
        None,
    )?;
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut ready = [0u8; READY.len()];
    stream.read_exact(&mut ready)?;
    if ready != READY {
        return Err(std::io::Error::other("the new meshd did not confirm"));
    }
    Ok(())
}
