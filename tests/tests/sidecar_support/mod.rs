//! What the sidecar tests need beyond the crate's pod fixture (tests/src):
//! a simulated kubepods tree of nested cgroups under a pod's cgroup, and
//! processes placed in any cgroup of that tree (the fixture places them in
//! the pod cgroup itself only).
#![allow(dead_code)] // each test file uses a different subset

use std::{
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The measured minimal capability set for an agent started as UID 0 (as in
/// Kubernetes), in setpriv's spelling. deploy/sidecar's `capabilities.add`
/// must be exactly this (checked by manifests.rs); least_privilege.rs proves
/// it suffices and that each one is needed.
pub const ROOT_START_CAPS: [&str; 4] = ["bpf", "net_admin", "setuid", "setgid"];

/// Fails (never skips) when a tool the test needs is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` not found: install Debian package {package} (`cargo xtask setup` does)"
    );
}

/// Cgroups created below an existing cgroup (e.g. a fixture pod's).
/// Dropping it kills every process in them and removes them, deepest
/// first, so the owner of `root` can then remove `root` itself.
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// Creates `relative` (and its parents) below the root: real cgroups,
    /// since mkdir on cgroupfs creates one.
    pub fn mkdir(&self, relative: impl AsRef<Path>) -> PathBuf {
        let path = self.root.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let dirs = subdirs_deepest_first(&self.root);
        for dir in &dirs {
            // cgroup.kill (Linux >= 5.14) kills the subtree; else one by one.
            if fs::write(dir.join("cgroup.kill"), "1").is_err()
                && let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs"))
            {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // rmdir is EBUSY until the killed processes are released: retry.
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in &dirs {
            while let Err(e) = fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("lattice-tests: rmdir {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Every directory strictly below `dir`, children before parents.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subdirs_deepest_first(&entry.path()));
                out.push(entry.path());
            }
        }
    }
    out
}

/// `program` set up to start in network namespace `netns` (a /run/netns
/// path) and cgroup `cgroup`, as root. Files are opened here, before fork;
/// the child only makes raw syscalls on them.
pub fn placed(program: impl AsRef<Path>, netns: &Path, cgroup: &Path) -> Command {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    let mut cmd = Command::new(program.as_ref());
    cmd.stdin(Stdio::null());
    // SAFETY: only raw syscalls on fds opened above; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                || libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            // Never outlive the test, even if it dies without destructors.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// What a TCP connect did.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    Refused,
    Other(String),
}

/// Connects to `addr` from `bash` (its /dev/tcp: no extra tools), started
/// by `bash` (a placed `Command` for "bash"), and closes again.
pub fn connect_with(mut bash: Command, addr: SocketAddr) -> Connect {
    bash.args([
        "-c",
        &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
    ]);
    let out = bash.output().expect("spawn bash");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Connect::Connected
    } else if stderr.contains("Connection refused") {
        Connect::Refused
    } else {
        Connect::Other(format!("{}: {stderr}", out.status))
    }
}

/// Takes every connection waiting on `listener`; returns how many.
pub fn drain(listener: &TcpListener) -> usize {
    listener.set_nonblocking(true).expect("non-blocking");
    // The connect has returned; give the accept queue a moment anyway.
    std::thread::sleep(Duration::from_millis(50));
    let mut n = 0;
    while listener.accept().is_ok() {
        n += 1;
    }
    n
}

/// The attach types bpftool lists for `cgroup`, sorted. (Only the types:
/// program names are empty when the agent ran without CAP_PERFMON, because
/// aya probes name support by loading a tracepoint program.)
pub fn attach_types(cgroup: &Path) -> Vec<String> {
    let mut types: Vec<String> = lattice_tests::bpftool::attached_programs(cgroup)
        .into_iter()
        .map(|(attach_type, _name)| attach_type)
        .collect();
    types.sort();
    types
}

/// What the interceptor attaches to a cgroup, as bpftool names the types.
pub const INTERCEPTOR: [&str; 4] = [
    "cgroup_getsockopt",
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_sock_ops",
];
