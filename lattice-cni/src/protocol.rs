//! What the plugin and the node agent say to each other over the agent's
//! Unix socket (`<run dir>/cni.sock`).
//!
//! One exchange per connection: the plugin sends one JSON [`Request`] line,
//! for `ADD` and `CHECK` with the pod's network namespace as a descriptor
//! alongside (SCM_RIGHTS; the plugin runs in the host's mount namespace
//! and can open `CNI_NETNS`, the agent's container may not see that path);
//! the agent answers one JSON [`Reply`] line and closes.

use std::{
    io::{self, IoSlice, Write as _},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::frame;

/// The agent's socket, in its run directory.
pub const SOCKET_NAME: &str = "cni.sock";
/// No message is longer (a request is a few hundred bytes).
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// A CNI call for a Kubernetes pod, as the runtime made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// `CNI_CONTAINERID`: the pod sandbox.
    pub container_id: String,
    /// `CNI_NETNS` as the runtime named it (for logs; the namespace itself
    /// travels as a descriptor).
    pub netns: String,
    /// From `CNI_ARGS`: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`
    /// (empty when the runtime does not pass it).
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// `ADD`, `CHECK`: the pod's Lattice connects are intercepted (false:
    /// the pod does not ask for signing, nothing to do).
    pub enrolled: bool,
    /// Why the agent could not do what was asked; the plugin fails the
    /// call with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends `message` as one line, with `fd` alongside if given.
pub fn send(
    stream: &UnixStream,
    message: &impl Serialize,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    if line.len() > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message longer than 64 KiB",
        ));
    }
    line.push(b'\n');
    let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        stream.as_fd().as_raw_fd(),
        &[IoSlice::new(&line)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    // The descriptor went with the first bytes; the rest is plain data.
    (&*stream).write_all(&line[sent..])
}

/// Receives one line and the descriptor sent with it, if any. The
/// stream's read timeout bounds the wait; a line longer than 64 KiB, or
/// more than one descriptor, is refused ([`frame`]).
pub fn receive<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<(T, Option<OwnedFd>)> {
    let (line, mut fds) = frame::read_frame(stream, &mut frame::Lines::new(MAX_LINE), 1)?;
    let message = decode(&line)?;
    Ok((message, fds.pop()))
}

/// One message of the protocol from its line.
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> io::Result<T> {
    serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn request() -> Request {
        Request {
            command: Command::Add,
            container_id: "0123abcd".into(),
            netns: "/var/run/netns/cni-1".into(),
            pod_namespace: "shop".into(),
            pod_name: "cart-0".into(),
            pod_uid: "8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d".into(),
        }
    }

    #[test]
    fn a_request_arrives_with_its_descriptor() {
        let (plugin, agent) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send(&plugin, &request(), Some(file.as_fd())).unwrap();
        let (got, fd): (Request, _) = receive(&agent).unwrap();
        assert_eq!(got, request());
        let fd = fd.expect("descriptor received");
        // The same open file: same inode.
        let a = nix::sys::stat::fstat(&file).unwrap();
        let b = nix::sys::stat::fstat(&fd).unwrap();
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));

        let reply = Reply {
            enrolled: true,
            error: None,
        };
        send(&agent, &reply, None).unwrap();
        let (back, none): (Reply, _) = receive(&plugin).unwrap();
        assert_eq!(back, reply);
        assert!(none.is_none());
    }

    #[test]
    fn wire_format_is_stable() {
        let line = serde_json::to_string(&request()).unwrap();
        assert_eq!(
            line,
            r#"{"command":"ADD","container_id":"0123abcd","netns":"/var/run/netns/cni-1","pod_namespace":"shop","pod_name":"cart-0","pod_uid":"8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d"}"#
        );
        let reply: Reply = serde_json::from_str(r#"{"enrolled":false}"#).unwrap();
        assert_eq!(
            reply,
            Reply {
                enrolled: false,
                error: None
            }
        );
    }

    #[test]
    fn a_closed_connection_is_an_error_not_a_message() {
        let (plugin, agent) = UnixStream::pair().unwrap();
        drop(plugin);
        let err = receive::<Request>(&agent).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_message_past_64_kib_is_refused() {
        let (plugin, agent) = UnixStream::pair().unwrap();
        let mut huge = request();
        huge.netns = "n".repeat(MAX_LINE);
        assert_eq!(
            send(&plugin, &huge, None).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Written by hand: one line of 64 KiB and one byte.
        let writer = std::thread::spawn(move || {
            let _ = (&plugin).write_all(&vec![b'x'; MAX_LINE + 1]);
            plugin
        });
        let err = receive::<Request>(&agent).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(err.to_string(), "message longer than 65536 bytes");
        drop(writer.join().unwrap());
    }
}
