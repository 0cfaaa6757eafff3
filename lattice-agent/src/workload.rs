//! One served workload: the proxy listeners in its network namespace, the
//! proxy serving them with that workload's credentials, and a shutdown of
//! its own. `run` and `sidecar` serve one workload for the whole process;
//! node mode starts and stops one per enrolled pod on a shared runtime.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    netns::SocketFactory,
    proxy::{self, WorkloadProxy},
};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("port {port} already in use on {addr}")]
    PortInUse { port: u16, addr: SocketAddr },
    #[error("binding port {port} on {addr}")]
    Bind {
        port: u16,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the listening sockets handed over by the agent being replaced")]
    Adopted(#[source] io::Error),
    #[error("reading the network namespace cookie of the listener on {addr}")]
    Cookie {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The proxy's listening sockets of one workload.
#[derive(Debug)]
pub struct Listeners {
    pub sockets: Vec<std::net::TcpListener>,
    /// Cookie of the network namespace they live in: how the eBPF
    /// programs name that namespace.
    pub netns_cookie: u64,
}

impl Listeners {
    /// Listeners handed over by the agent this one replaces (see
    /// `node::handover`), named by the cookie of their namespace.
    pub fn adopt(sockets: Vec<std::net::TcpListener>) -> Result<Self, ListenError> {
        let first = sockets.first().ok_or_else(|| {
            ListenError::Adopted(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no socket handed over",
            ))
        })?;
        let netns_cookie = crate::netns::netns_cookie(first).map_err(ListenError::Adopted)?;
        for s in &sockets {
            s.set_nonblocking(true).map_err(ListenError::Adopted)?;
        }
        Ok(Self {
            sockets,
            netns_cookie,
        })
    }

    /// A second descriptor for each socket: the agent keeps them to hand
    /// the very sockets to the agent that replaces it.
    pub fn duplicates(&self) -> io::Result<Vec<std::os::fd::OwnedFd>> {
        self.sockets
            .iter()
            .map(|s| s.try_clone().map(std::os::fd::OwnedFd::from))
            .collect()
    }
}

/// Binds 127.0.0.1:port and [::1]:port in `factory`'s network namespace;
/// the IPv6 one is skipped where that namespace has no IPv6. With
/// `reuse_port`, beside listeners of another agent of the same UID (node
/// mode: the agent being replaced, should it not hand its sockets over).
pub fn bind_loopback(
    port: u16,
    factory: &SocketFactory,
    reuse_port: bool,
) -> Result<Listeners, ListenError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let first = bind(v4, port, factory, reuse_port)?;
    let netns_cookie = crate::netns::netns_cookie(&first)
        .map_err(|source| ListenError::Cookie { addr: v4, source })?;
    let mut sockets = vec![first];
    match bind(v6, port, factory, reuse_port) {
        Ok(l) => sockets.push(l),
        Err(ListenError::Bind { source, .. })
            if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
        {
            tracing::debug!("IPv6 loopback unavailable; serving IPv4 only");
        }
        Err(e) => return Err(e),
    }
    Ok(Listeners {
        sockets,
        netns_cookie,
    })
}

fn bind(
    addr: SocketAddr,
    port: u16,
    factory: &SocketFactory,
    reuse_port: bool,
) -> Result<std::net::TcpListener, ListenError> {
    let err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenError::PortInUse { port, addr }
        } else {
            ListenError::Bind { port, addr, source }
        }
    };
    // socket() and bind() inside the namespace; listen() works from anywhere.
    let socket = factory
        .in_netns(|| {
            let socket = listener_socket(&addr)?;
            socket.set_reuse_port(reuse_port)?;
            socket.bind(&addr.into())?;
            Ok(socket)
        })
        .map_err(err)?;
    socket.listen(1024).map_err(err)?;
    Ok(socket.into())
}

fn listener_socket(addr: &SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A running workload proxy; [`Workload::stop`] drains it.
pub struct Workload {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    netns_cookie: u64,
}

impl Workload {
    /// Serves `proxy` on `listeners`, on the current runtime.
    pub fn start(proxy: WorkloadProxy, listeners: Listeners) -> io::Result<Self> {
        let Listeners {
            sockets,
            netns_cookie,
        } = listeners;
        let sockets = sockets
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<io::Result<Vec<_>>>()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy::serve(proxy, sockets, shutdown.clone()));
        Ok(Self {
            shutdown,
            task,
            netns_cookie,
        })
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Stops accepting (the listeners close) and waits for in-flight
    /// requests, up to the proxy's `--drain-timeout`.
    pub async fn stop(self) {
        self.shutdown.cancel();
        match self.task.await {
            Ok(()) => {}
            Err(e) if e.is_cancelled() => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
