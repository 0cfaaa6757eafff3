//! Original destination of a connection steered by iptables NAT
//! (`-j REDIRECT`), read from conntrack with `getsockopt(SO_ORIGINAL_DST)` /
//! `IP6T_SO_ORIGINAL_DST` on the accepted socket.
//!
//! This is the iptables setup's interception (an init container adding NAT
//! rules), kept working in `run` and `sidecar` so users can move to the
//! agent before they move off iptables ([`WithNatFallback`]). The proxy
//! asks here only when the eBPF map has no record. Node mode never does:
//! there the app, not the agent, owns its network namespace's NAT rules.

use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, BorrowedFd},
};

use nix::sys::socket::{SockaddrLike as _, SockaddrStorage, getsockname, getsockopt, sockopt};

use crate::orig_dst::OriginalDestination;

/// `inner`'s records, then conntrack's NAT destination for connections it
/// has none of: the workload's own network namespace may hold the
/// iptables setup's REDIRECT rules (`run`, `sidecar`).
pub struct WithNatFallback<T>(pub T);

impl<T: OriginalDestination> OriginalDestination for WithNatFallback<T> {
    fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.0.original_destination(peer)
    }

    fn untracked_destination(&self, socket: BorrowedFd<'_>) -> Option<SocketAddr> {
        nat_original_destination(&socket)
    }
}

/// Where a NAT-redirected connection was going, or `None` when the
/// connection was not redirected by NAT (no conntrack entry, or the entry
/// shows no address translation).
///
/// A connection made straight to the proxy's port has a conntrack entry
/// whose "original destination" is the proxy itself; that is refused, so a
/// local process cannot make the proxy connect back to itself.
pub fn nat_original_destination(socket: &impl AsFd) -> Option<SocketAddr> {
    let local = local_addr(socket)?;
    let orig = match local {
        SocketAddr::V4(_) => {
            let sin = getsockopt(socket, sockopt::OriginalDst).ok()?;
            SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(socket, sockopt::Ip6tOriginalDst).ok()?;
            SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ))
        }
    };
    nat_translated(local, orig)
}

/// `orig` if it is a real translation target: neither the socket's own
/// address (no NAT) nor unspecified.
fn nat_translated(local: SocketAddr, orig: SocketAddr) -> Option<SocketAddr> {
    if orig == local || orig.ip().is_unspecified() || orig.port() == 0 {
        return None;
    }
    Some(orig)
}

fn local_addr(socket: &impl AsFd) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd as _;
    let addr: SockaddrStorage = getsockname(socket.as_fd().as_raw_fd()).ok()?;
    match addr.family()? {
        nix::sys::socket::AddressFamily::Inet => {
            Some(SocketAddr::V4((*addr.as_sockaddr_in()?).into()))
        }
        nix::sys::socket::AddressFamily::Inet6 => {
            Some(SocketAddr::V6((*addr.as_sockaddr_in6()?).into()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn untranslated_destination_is_refused() {
        let local: SocketAddr = "127.0.0.1:15080".parse().unwrap();
        assert_eq!(nat_translated(local, local), None);
        assert_eq!(
            nat_translated(local, "0.0.0.0:80".parse().unwrap()),
            None,
            "unspecified address"
        );
        let real: SocketAddr = "169.254.171.33:80".parse().unwrap();
        assert_eq!(nat_translated(local, real), Some(real));
    }

    /// A plain loopback connection (whether or not conntrack is loaded in
    /// this namespace) has no NAT record: the proxy must not get one.
    #[test]
    fn direct_connection_has_no_nat_destination() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(nat_original_destination(&accepted), None);
    }
}
