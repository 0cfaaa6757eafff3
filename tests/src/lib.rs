//! Test fixtures for lattice's integration tests against the real kernel.
//!
//! The central piece is [`Pod`]: a network namespace plus a cgroup v2
//! directory of the test's own, standing in for a Kubernetes pod. Test
//! traffic only ever goes to loopback or to addresses on the pod netns'
//! `lo`, so nothing can leave the machine. Everything created here has a
//! unique name (`lat-<pid>-<n>`) and is removed by an RAII guard, also when
//! the test panics; several test runs may share the machine.
//!
//! Modules, one job each:
//! - [`netns`]: the network namespace (`ip netns add/del`) and its addresses;
//! - [`cgroup`]: finding the cgroup2 mount, a test cgroup directory, trees
//!   of cgroups;
//! - [`spawn`]: starting processes inside a pod (netns, cgroup, UID), guards;
//! - [`pod`]: the pod fixture tying these together, plus the test binaries;
//! - [`node`]: a node for `lattice-agent node`: its own network namespace
//!   with a CNI bridge, a kubelet-like cgroup tree and kubelet root, and
//!   pods wired by Debian's CNI plugins, with pause processes and projected
//!   volumes;
//! - [`agent`]: running `lattice-agent` in a pod;
//! - [`node_agent`]: running `lattice-agent node` on a [`node::Node`] with
//!   the API stand-in, and pods' API objects as the EKS webhooks shape them;
//! - [`bpftool`]: what is attached to a cgroup, how full a pinned map is;
//! - [`rebuild`]: pins as an agent of another build leaves them (other
//!   programs in the pinned links, maps laid out otherwise);
//! - [`bpffs`]: a private bpffs mount for `--pin`, and a mount namespace
//!   whose `/sys/fs/bpf` is a bpffs or not (node mode's default pin);
//! - [`orig_dst`]: `SO_ORIGINAL_DST`, as proxies written for iptables ask it;
//! - [`verifier`]: the botocore SigV4 verifier as a Lattice-like service in
//!   a pod, and the demo credentials.
//! - [`apiserver`]: the Kubernetes API stand-in kube-rs and kubectl talk to;
//! - [`script`]: scripted byte exchanges for protocols that are not HTTP;
//! - [`tls`]: test CAs and the certificates they issue;
//! - [`time`], [`random`]: dates, clocks, UIDs and IDs for the above;
//! - [`reliability`]: the lifecycle tests' figures for the README table.
//! - [`loopback`]: HTTP/1.1 and h2c clients and small upstreams on 127.0.0.1
//!   for the signing proxy's loopback tests; [`proxy_child`]: that proxy in
//!   a child process of the test binary;
//! - [`sigv4`]: the request targets whose SigV4 canonical form is easy to
//!   get wrong, with what must arrive;
//! - [`sidecar`]: the sidecar container as containerd starts it (UID,
//!   capabilities, no_new_privs) and what a process runs with;
//!   [`manifests`]: the rendered deploy/ manifests; [`probe`]: what a
//!   process in a pod sees of the network (connect, curl, one request);
//! - [`iptables`]: the iptables setup's NAT rules, as a baseline;
//! - [`procfs`]: memory, CPU and status of a process;
//! - [`tempdir`]: scratch directories removed on drop.
//!
//! With the default `full` feature off, only the process fixtures are
//! built ([`netns`], [`cgroup`], [`spawn`], [`iptables`], [`procfs`],
//! [`tempdir`]): what `cargo xtask bench` links.

// The process fixtures: everything `cargo xtask bench` links (the `full`
// feature off keeps hyper and tokio out of xtask's own build).
pub mod cgroup;
pub mod iptables;
pub mod netns;
pub mod procfs;
pub mod spawn;
pub mod tempdir;

#[cfg(feature = "full")]
pub mod agent;
#[cfg(feature = "full")]
pub mod apiserver;
#[cfg(feature = "full")]
pub mod bpffs;
#[cfg(feature = "full")]
pub mod bpftool;
#[cfg(feature = "full")]
pub mod loopback;
#[cfg(feature = "full")]
pub mod manifests;
#[cfg(feature = "full")]
pub mod node;
#[cfg(feature = "full")]
pub mod node_agent;
#[cfg(feature = "full")]
pub mod orig_dst;
#[cfg(feature = "full")]
pub mod pod;
#[cfg(feature = "full")]
pub mod probe;
#[cfg(feature = "full")]
pub mod proxy_child;
#[cfg(feature = "full")]
pub mod random;
#[cfg(feature = "full")]
pub mod rebuild;
#[cfg(feature = "full")]
pub mod reliability;
#[cfg(feature = "full")]
pub mod script;
#[cfg(feature = "full")]
pub mod sidecar;
#[cfg(feature = "full")]
pub mod sigv4;
#[cfg(feature = "full")]
pub mod time;
#[cfg(feature = "full")]
pub mod tls;
#[cfg(feature = "full")]
pub mod verifier;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

#[cfg(feature = "full")]
pub use agent::{Agent, agent_bin};
#[cfg(feature = "full")]
pub use apiserver::ApiServer;
#[cfg(feature = "full")]
pub use bpffs::Bpffs;
#[cfg(feature = "full")]
pub use node::{CgroupDriver, Node, NodePod, PodSpec, Qos};
#[cfg(feature = "full")]
pub use pod::{Pod, test_bin};
pub use spawn::{ChildGuard, Output, PodCommand};
pub use tempdir::TempDir;
#[cfg(feature = "full")]
pub use verifier::{DEMO_CREDENTIALS, Verifier};

/// The cargo profile of the image `cargo xtask test` builds and the image
/// tests check, and of the static agent the timed tests run (Cargo.toml:
/// the release profile without fat LTO, one codegen unit and debug info).
pub const IMAGE_TEST_PROFILE: &str = "quick-release";

/// The workspace root (this crate is `<root>/tests`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent dir")
        .to_owned()
}

/// Every `.rs` file below `dir`, sorted: the sources the tests that read
/// code (layering, error types) check.
pub fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading source directory {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// `$CARGO_TARGET_DIR`, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// `$LATTICE_TEST_VENV` (set by `cargo xtask test|demo`), else
/// `<target dir>/venv`, where `cargo xtask setup` creates it.
pub fn venv() -> PathBuf {
    std::env::var_os("LATTICE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("venv"))
}

/// A name nothing else on the machine uses: `lat-<pid>-<n>`, with a counter
/// shared by every fixture of this process (tests run in parallel threads).
pub fn unique_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "lat-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when `CI` is `true` (or `1`): there a skip would hide a broken
/// set-up, so what would skip fails instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips `test` loudly for want of `needs` (what is missing and how to get
/// it); under CI (see [`in_ci`]) panics instead. The caller returns.
pub fn skip(test: &str, needs: &str) {
    assert!(!in_ci(), "{test}: needs {needs}; CI=true forbids skipping");
    eprintln!("\n*** SKIPPED {test}: needs {needs} ***\n");
}

/// True when a privileged test may run: as root. Otherwise it is skipped
/// loudly, or fails under CI (see [`skip`]).
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip(test, "root (privileged tests run as root)");
    false
}

/// Fails (never skips) when a tool the test needs is missing: `cargo
/// xtask setup` installs every one.
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
