//! What the plugin and the node agent say to each other over the agent's
//! Unix socket (`<run dir>/cni.sock`).
//!
//! One exchange per connection: the plugin sends one JSON [`Request`] line,
//! for `ADD` and `CHECK` with the pod's network namespace as a descriptor
//! alongside (SCM_RIGHTS; the plugin runs in the host's mount namespace
//! and can open `CNI_NETNS`, the agent's container may not see that path);
//! the agent answers one JSON [`Reply`] line and closes.

use std::{
    io::{self, IoSlice, IoSliceMut, Read as _, Write as _},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The agent's socket, in its run directory.
pub const SOCKET_NAME: &str = "cni.sock";
/// No message is longer (a request is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

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
/// stream's read timeout bounds the wait.
pub fn receive<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<(T, Option<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    // The descriptor comes with the first segment: read that with recvmsg,
    // the rest (if the line was split) with read.
    let first = {
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process: nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    line.extend_from_slice(&buf[..first]);
    let mut eof = first == 0;
    while !line.contains(&b'\n') && !eof {
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message longer than 64 KiB",
            ));
        }
        let n = (&*stream).read(&mut buf)?;
        eof = n == 0;
        line.extend_from_slice(&buf[..n]);
    }
    let Some(end) = line.iter().position(|b| *b == b'\n') else {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a whole message",
        ));
    };
    if fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more than one descriptor sent",
        ));
    }
    let message = serde_json::from_slice(&line[..end])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((message, fds.pop()))
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
}
