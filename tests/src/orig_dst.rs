//! `getsockopt(SO_ORIGINAL_DST)` as a proxy written for iptables asks it:
//! where an accepted, redirected connection was going. Under lattice the
//! cgroup/getsockopt program answers, when the asking socket is inside the
//! intercepted cgroup; under NAT, conntrack does.

use std::{
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

use nix::errno::Errno;

/// SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST
/// (linux/netfilter_ipv6/ip6_tables.h) are both 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Asks at SOL_IP with a sockaddr_in for an IPv4 `peer` and at SOL_IPV6
/// with a sockaddr_in6 for an IPv6 one, exactly as iptables-era proxies do;
/// the answer is decoded by its family field.
pub fn original_dst(conn: &impl AsRawFd, peer: SocketAddr) -> Result<SocketAddr, Errno> {
    let (level, len) = match peer {
        SocketAddr::V4(_) => (libc::SOL_IP, size_of::<libc::sockaddr_in>()),
        SocketAddr::V6(_) => (libc::SOL_IPV6, size_of::<libc::sockaddr_in6>()),
    };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut optlen = len as libc::socklen_t;
    // SAFETY: the buffer is at least `optlen` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&raw mut storage).cast(),
            &mut optlen,
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    let len = optlen as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say it is a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { *(&raw const storage).cast() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say it is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { *(&raw const storage).cast() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => Err(Errno::EAFNOSUPPORT),
    }
}
