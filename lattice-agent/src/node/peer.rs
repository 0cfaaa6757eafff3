//! Who may talk to the agent's Unix sockets (the control socket a
//! successor takes the pods' listeners through, the CNI plugin's socket):
//! root (the container runtime running the plugin, a new agent before it
//! drops privileges) or the agent's own UID. The run directory is root's
//! alone as well; the peer's credentials are checked besides, so a process
//! that reaches a socket some other way (a hostPath of the directory, a
//! capability to pass its mode) can neither take the pods' sockets and
//! network namespaces nor enroll or unenroll pods.

use std::os::unix::net::UnixStream;

use nix::sys::socket::{UnixCredentials, getsockopt, sockopt::PeerCredentials};

/// Whether the peer of `stream` (accepted on the socket named `socket`)
/// may be served; a refusal is logged with the peer's credentials.
pub fn allowed(stream: &UnixStream, socket: &'static str) -> bool {
    // SO_PEERCRED: the peer's credentials when it connected, as the
    // kernel saw them (not what it claims).
    match getsockopt(stream, PeerCredentials) {
        Ok(cred) if may_serve(&cred, nix::unistd::geteuid().as_raw()) => true,
        Ok(cred) => {
            tracing::warn!(
                socket,
                uid = cred.uid(),
                gid = cred.gid(),
                pid = cred.pid(),
                "refused a connection on an agent socket: its peer is neither root nor the agent's UID"
            );
            false
        }
        Err(e) => {
            tracing::warn!(socket, error = %e, "refused a connection on an agent socket: its peer's credentials are unknown");
            false
        }
    }
}

fn may_serve(peer: &UnixCredentials, own_uid: u32) -> bool {
    peer.uid() == 0 || peer.uid() == own_uid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_agents_own_uid_only() {
        let cred = |uid| {
            UnixCredentials::from(libc::ucred {
                pid: 1,
                uid,
                gid: uid,
            })
        };
        assert!(may_serve(&cred(0), 101));
        assert!(may_serve(&cred(101), 101));
        assert!(!may_serve(&cred(1000), 101));
        assert!(!may_serve(&cred(65534), 0));
    }

    /// A connection from this process: its own UID, served.
    #[test]
    fn a_peer_of_the_same_uid_is_served() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(allowed(&a, "test"));
    }
}
