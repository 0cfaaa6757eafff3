//! A network namespace of the test's own, created with `ip netns add` so it
//! has a path (/run/netns/NAME) other tools and `setns` can use.
//!
//! Commands run inside it with `nsenter --net=PATH`, not `ip netns exec`:
//! the latter remounts /sys and hides the cgroup2 mount.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::spawn::{PodCommand, run_ok};

pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates the namespace and brings its `lo` up.
    pub fn new(name: &str) -> Self {
        let ns = Self::new_down(name);
        // The guard exists from here on, so a failure below still cleans up.
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Creates the namespace and leaves its `lo` down, as a container
    /// runtime does before the CNI `loopback` plugin brings it up.
    pub fn new_down(name: &str) -> Self {
        run(Command::new("ip").args(["netns", "add", name]));
        Self {
            name: name.to_owned(),
            path: PathBuf::from("/run/netns").join(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// `program` in the namespace (in this process's cgroup, as root,
    /// unless changed).
    pub fn command(&self, program: impl AsRef<std::path::Path>) -> PodCommand {
        PodCommand::host(program).netns(&self.path)
    }

    /// Runs a command inside the namespace and panics if it fails.
    pub fn exec(&self, argv: &[&str]) {
        exec_in(&self.path, argv);
    }

    /// Adds an address on the namespace's `lo` (no dummy links on this
    /// kernel; `lo` also guarantees the traffic stays inside). IPv6
    /// addresses get `nodad` so they are usable at once.
    pub fn add_lo_addr(&self, cidr: &str) {
        let mut argv = vec!["ip", "addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            argv.push("nodad");
        }
        self.exec(&argv);
    }

    /// A TCP listener bound inside the namespace, usable from any thread
    /// (see [`listen_tcp_in`]).
    pub fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        listen_tcp_in(&self.path, addr)
    }

    /// PIDs of processes still inside the namespace (`ip netns pids`).
    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Anything still running in the namespace was started by this test
        // (the name is unique): kill it, so the namespace really goes away
        // instead of living on, unnamed, with a process inside.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "lattice-tests: netns {}: processes {pids:?} survive SIGKILL",
                    self.name
                );
                break;
            }
            for pid in pids {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "lattice-tests: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("lattice-tests: ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs a command inside the namespace at `netns` (a path such as
/// /run/netns/NAME) and panics if it fails.
pub(crate) fn exec_in(netns: &Path, argv: &[&str]) {
    run(Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(argv));
}

/// A TCP listener bound inside the namespace at `netns`, usable from any
/// thread. Bound on a short-lived helper thread because setns affects only
/// the calling thread, and the test thread must stay in the host namespace.
pub(crate) fn listen_tcp_in(netns: &Path, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let ns = File::open(netns)?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd; affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpListener::bind(addr)
    })
    .join()
    .expect("listener thread panicked")
}

/// Runs a setup command, panicking with its stderr if it fails.
pub(crate) fn run(cmd: &mut Command) {
    run_ok(cmd);
}

/// True while `ip netns list` lists `name`.
pub fn listed(name: &str) -> bool {
    let out = run_ok(Command::new("ip").args(["netns", "list"]));
    out.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}
