//! "A proxy written for iptables": it learns where a redirected connection
//! was going the iptables way, getsockopt(SO_ORIGINAL_DST), and answers
//! with that address instead of proxying. With lattice the answer comes
//! from the cgroup/getsockopt program, which only runs when this process
//! is inside the pod cgroup.
//!
//! Usage: lattice-test-origdst-proxy PORT
//! Listens on 127.0.0.1:PORT and [::1]:PORT, prints `listening`; for each
//! connection writes `orig=<addr:port>` or `orig-error=<errno>` and closes.

use std::{
    io::Write,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    process::ExitCode,
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

/// SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST
/// (linux/netfilter_ipv6/ip6_tables.h) are both 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

fn main() -> ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: lattice-test-origdst-proxy PORT");
        return ExitCode::from(64);
    };
    let addrs = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let mut threads = Vec::new();
    for addr in addrs {
        match listen_on(addr) {
            Ok(l) => threads.push(std::thread::spawn(move || serve(l))),
            Err(e) => {
                eprintln!("lattice-test-origdst-proxy: listen {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("listening");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn listen_on(addr: SocketAddr) -> nix::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if family == AddressFamily::Inet6 {
        // Like a typical iptables proxy: separate v4 and v6 sockets.
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(TcpListener::from(fd))
}

fn serve(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let line = match original_dst(&conn) {
            Ok(addr) => format!("orig={addr}\n"),
            Err(errno) => format!("orig-error={errno}\n"),
        };
        let _ = conn.write_all(line.as_bytes());
    }
}

/// Asks at SOL_IP with a sockaddr_in for an IPv4 peer and at SOL_IPV6 with
/// a sockaddr_in6 for an IPv6 one, exactly as iptables-era proxies do; the
/// answer is decoded by its family field.
fn original_dst(conn: &TcpStream) -> Result<SocketAddr, nix::errno::Errno> {
    let peer = conn.peer_addr().map_err(|_| nix::errno::Errno::ENOTCONN)?;
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
        return Err(nix::errno::Errno::last());
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
        _ => Err(nix::errno::Errno::EAFNOSUPPORT),
    }
}
