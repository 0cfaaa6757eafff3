//! Network namespaces and where the agent's sockets are created.
//!
//! A socket belongs to the network namespace its creating thread was in at
//! `socket()` time, for its whole life: a listener created inside a pod's
//! namespace serves that pod's loopback, and an upstream connection created
//! there leaves from the pod's address. So the node agent, whose threads
//! live in the node's namespace, enters a pod's namespace (`setns`) just
//! for the `socket()` (and `bind`) call and returns at once. This needs
//! CAP_SYS_ADMIN; the sidecar and `run` never enter another namespace.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path} (needs CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open network namespace (`/proc/<pid>/ns/net` or a bind mount of it).
/// The open file keeps the namespace alive and lets threads enter it.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// A namespace handed over as a descriptor (by the CNI plugin, or by
    /// the agent this one replaces); `label` names it in logs and errors.
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> Result<Self, NetnsError> {
        let path = label.into();
        // NS_GET_NSTYPE: anything but a network namespace is refused here,
        // not at the first setns.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: an ioctl without arguments on a descriptor we own.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            let source = if kind < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace")
            };
            return Err(NetnsError::Open { path, source });
        }
        Ok(Self {
            file: File::from(fd),
            path,
        })
    }

    /// A second descriptor of the namespace, to hand it on.
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        self.file.as_fd().try_clone_to_owned()
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// The namespace of process `pid`, through a proc filesystem mounted at
    /// `proc_root` (the host's /proc, seen from a container with hostPID).
    pub fn of_process(proc_root: &Path, pid: u32) -> Result<Self, NetnsError> {
        Self::open(&proc_root.join(pid.to_string()).join("ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the namespace: equal for two handles exactly
    /// when they name the same namespace.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let st = nix::sys::stat::fstat(self.file.as_fd())?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Runs `f` on this thread inside `self`, then returns the thread to
    /// `home`. `f` must not block or yield: it is for `socket()`, `bind()`
    /// and reading addresses.
    pub fn run<T>(&self, home: &NetNs, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(&self.file).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        if let Err(e) = setns(&home.file) {
            // The thread would create every later socket in the pod's
            // namespace: a wrong address, or another pod's loopback.
            tracing::error!(error = %e, netns = %home.path.display(), "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a valid namespace fd; affects the calling thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a workload's sockets are created: the agent's own namespace
/// (`run`, `sidecar`: the agent lives in the pod) or a pod's (node mode).
#[derive(Debug, Clone)]
pub enum SocketFactory {
    Current,
    In { netns: Arc<NetNs>, home: Arc<NetNs> },
}

impl SocketFactory {
    /// A non-blocking TCP socket for `addr`'s family, in the workload's
    /// namespace.
    pub fn tcp_socket(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let make = || {
            let socket = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        };
        self.in_netns(make)
    }

    /// Runs `f` (no blocking, no awaiting) in the workload's namespace.
    pub fn in_netns<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match self {
            Self::Current => f(),
            Self::In { netns, home } => netns.run(home, f).map_err(io::Error::other)?,
        }
    }
}

/// The kernel's cookie of the network namespace `socket` belongs to
/// (`SO_NETNS_COOKIE`, Linux >= 5.14): what the eBPF programs see as
/// `bpf_get_netns_cookie()` for connects made in that namespace.
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Addresses on the interfaces of the calling thread's namespace.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs()?;
    Ok(addrs
        .filter_map(|ifa| {
            let a = ifa.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_of_a_socket_in_this_namespace_is_stable() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ca = netns_cookie(&a).unwrap();
        assert_ne!(ca, 0);
        assert_eq!(ca, netns_cookie(&b).unwrap());
    }

    #[test]
    fn current_namespace_has_loopback() {
        assert!(
            local_addresses()
                .unwrap()
                .contains(&IpAddr::from([127, 0, 0, 1]))
        );
        let here = NetNs::current().unwrap();
        let again = NetNs::current().unwrap();
        assert_eq!(here.id().unwrap(), again.id().unwrap());
    }
}
