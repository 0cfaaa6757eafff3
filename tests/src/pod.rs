//! The pod fixture: a network namespace with the test addresses on its `lo`
//! and a cgroup v2 directory, both named `lat-<pid>-<n>`.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    cgroup::Cgroup,
    netns::Netns,
    spawn::{ChildGuard, PodCommand, Stream},
    unique_name,
};

/// A VPC Lattice service address: inside 169.254.171.0/24.
pub const LATTICE_V4: &str = "169.254.171.33";
/// Link-local, but outside the Lattice prefix.
pub const OUTSIDE_V4: &str = "169.254.172.33";
/// Inside the Lattice IPv6 prefix fd00:ec2:80::/64.
pub const LATTICE_V6: &str = "fd00:ec2:80::33";
/// Outside the IPv6 prefix.
pub const OUTSIDE_V6: &str = "fd00:ec2:81::33";

/// Process placement in a [`Pod`] is done with [`Pod::command`]. Fields drop
/// in declaration order: the cgroup (killing its processes) before the
/// namespace.
pub struct Pod {
    cgroup: Cgroup,
    netns: Netns,
    name: String,
}

impl Pod {
    pub fn new() -> Self {
        let name = unique_name();
        let netns = Netns::new(&name);
        for addr in [LATTICE_V4, OUTSIDE_V4] {
            netns.add_lo_addr(&format!("{addr}/32"));
        }
        for addr in [LATTICE_V6, OUTSIDE_V6] {
            netns.add_lo_addr(&format!("{addr}/128"));
        }
        let cgroup = Cgroup::new(&name);
        Self {
            cgroup,
            netns,
            name,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// PIDs currently in the pod cgroup.
    pub fn cgroup_pids(&self) -> Vec<i32> {
        self.cgroup.pids()
    }

    /// A process in the pod: netns and cgroup, as root, unless changed.
    pub fn command(&self, program: impl AsRef<Path>) -> PodCommand {
        PodCommand::new(program, self.netns.path(), self.cgroup.path())
    }

    /// `lattice-test-client ARGS...` in the pod (netns and cgroup).
    pub fn client<I, S>(&self, args: I) -> PodCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command(test_bin("lattice-test-client")).args(args)
    }

    /// `lattice-test-service` on the pod's test addresses: in the netns but
    /// outside the cgroup (it plays the remote service), as root (port 80).
    /// Returns once every socket is bound.
    pub fn start_service(&self) -> ChildGuard {
        self.service(&[])
    }

    /// The same service speaking HTTP/1.1 on its TCP ports (`--http`): the
    /// reply body names the address reached, the peer, and the SigV4
    /// credential scope that arrived (`credential=none` if unsigned).
    pub fn start_http_service(&self) -> ChildGuard {
        self.service(&["--http"])
    }

    fn service(&self, args: &[&str]) -> ChildGuard {
        let mut child = self
            .command(test_bin("lattice-test-service"))
            .args(args)
            .in_cgroup(false)
            .spawn();
        child.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
        child
    }

    /// A TCP listener bound inside the pod netns (e.g. to occupy a port).
    pub fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        self.netns.listen_tcp(addr)
    }
}

impl Default for Pod {
    fn default() -> Self {
        Self::new()
    }
}

/// A binary of this package (`tests/src/bin`). Cargo builds them before it
/// runs integration tests, next to the test binaries' parent directory:
/// target/debug/deps/<test> -> target/debug/<bin>.
pub fn test_bin(name: &str) -> PathBuf {
    let path = sibling_of_test_dir(name);
    assert!(
        path.is_file(),
        "{} missing: build it with `cargo build -p lattice-tests --bins`",
        path.display()
    );
    path
}

/// `<name>` in cargo's output dir for the running binary's profile: for a
/// test (target/debug/deps/<test>) the parent of its dir, for a bin of this
/// package (target/release/lattice-demo) its own dir.
pub(crate) fn sibling_of_test_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("binary has no parent dir");
    let dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps dir has no parent")
    } else {
        dir
    };
    dir.join(name)
}
