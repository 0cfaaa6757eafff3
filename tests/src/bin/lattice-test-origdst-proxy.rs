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
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd, OwnedFd},
    process::ExitCode,
};

use lattice_tests::orig_dst::original_dst;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

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
        let orig = conn
            .peer_addr()
            .map_err(|_| nix::errno::Errno::ENOTCONN)
            .and_then(|peer| original_dst(&conn, peer));
        let line = match orig {
            Ok(addr) => format!("orig={addr}\n"),
            Err(errno) => format!("orig-error={errno}\n"),
        };
        let _ = conn.write_all(line.as_bytes());
    }
}
