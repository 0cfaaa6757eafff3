//! One exchange with the node agent over its socket (see
//! [`crate::protocol`]), every step bounded by the configured timeout.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use crate::protocol::{self, Reply, Request};

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer from {} within {} s", socket.display(), timeout.as_secs())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("exchange with {} failed", socket.display())]
    Exchange {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Sends `request` (with `netns` alongside, if given) and returns the
/// agent's reply.
pub fn ask(
    socket: &Path,
    timeout: Duration,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
) -> Result<Reply, AgentError> {
    let stream = connect_to(socket, timeout)?;
    let failed = |source| error(socket, timeout, source, Step::Exchange);
    protocol::send(&stream, request, netns).map_err(failed)?;
    let (reply, _no_fd): (Reply, Option<OwnedFd>) = protocol::receive(&stream).map_err(failed)?;
    Ok(reply)
}

/// Whether the agent accepts connections (STATUS): connects, sends nothing.
pub fn probe(socket: &Path, timeout: Duration) -> Result<(), AgentError> {
    connect_to(socket, timeout).map(drop)
}

/// A connected stream whose connect, reads and writes each give up after
/// `timeout` (a Unix connect waits while the listener's backlog is full).
fn connect_to(socket: &Path, timeout: Duration) -> Result<UnixStream, AgentError> {
    let failed = |source| error(socket, timeout, source, Step::Connect);
    let fd: OwnedFd = socket_fd().map_err(failed)?;
    let stream = UnixStream::from(fd);
    // SO_SNDTIMEO also bounds connect(2) on a Unix socket.
    stream.set_write_timeout(Some(timeout)).map_err(failed)?;
    stream.set_read_timeout(Some(timeout)).map_err(failed)?;
    let addr = UnixAddr::new(socket).map_err(|e| failed(e.into()))?;
    connect(stream.as_raw_fd(), &addr).map_err(|e| failed(e.into()))?;
    Ok(stream)
}

fn socket_fd() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

enum Step {
    Connect,
    Exchange,
}

/// The error for `source`; EAGAIN on a socket with timeouts means the
/// time ran out.
fn error(socket: &Path, timeout: Duration, source: io::Error, step: Step) -> AgentError {
    let socket = socket.to_owned();
    match (source.kind(), step) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, _) => {
            AgentError::Timeout { socket, timeout }
        }
        (_, Step::Connect) => AgentError::Connect { socket, source },
        (_, Step::Exchange) => AgentError::Exchange { socket, source },
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixListener, thread};

    use super::*;
    use crate::{plugin::error::describe, protocol::Command};

    fn request() -> Request {
        Request {
            command: Command::Del,
            container_id: "c1".into(),
            netns: String::new(),
            pod_namespace: "shop".into(),
            pod_name: "cart-0".into(),
            pod_uid: "u1".into(),
        }
    }

    #[test]
    fn asks_and_reads_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let (got, fd): (Request, _) = protocol::receive(&conn).unwrap();
            protocol::send(
                &conn,
                &Reply {
                    enrolled: false,
                    error: Some("no".into()),
                },
                None,
            )
            .unwrap();
            (got, fd.is_some())
        });
        let reply = ask(&path, Duration::from_secs(5), &request(), None).unwrap();
        assert_eq!(reply.error.as_deref(), Some("no"));
        assert_eq!(agent.join().unwrap(), (request(), false));
    }

    #[test]
    fn unreachable_agents_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let err = ask(&path, Duration::from_secs(1), &request(), None).unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. }), "{err:?}");
        assert!(
            describe(&err).starts_with(&format!("cannot connect to {}: ", path.display())),
            "{}",
            describe(&err)
        );
        assert!(probe(&path, Duration::from_secs(1)).is_err());

        // Listening, never answering.
        let listener = UnixListener::bind(&path).unwrap();
        probe(&path, Duration::from_secs(1)).unwrap();
        let err = ask(&path, Duration::from_secs(1), &request(), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no answer from {} within 1 s", path.display())
        );
        drop(listener);
    }
}
