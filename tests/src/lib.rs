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
//! - [`cgroup`]: finding the cgroup2 mount, a test cgroup directory;
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

pub mod agent;
pub mod apiserver;
pub mod bpffs;
pub mod bpftool;
pub mod cgroup;
pub mod netns;
pub mod node;
pub mod node_agent;
pub mod orig_dst;
pub mod pod;
pub mod random;
pub mod rebuild;
pub mod reliability;
pub mod script;
pub mod spawn;
pub mod time;
pub mod tls;
pub mod verifier;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

pub use agent::{Agent, agent_bin};
pub use apiserver::ApiServer;
pub use bpffs::Bpffs;
pub use node::{CgroupDriver, Node, NodePod, PodSpec, Qos};
pub use pod::{Pod, test_bin};
pub use spawn::{ChildGuard, Output, PodCommand};
pub use verifier::{DEMO_CREDENTIALS, Verifier};

/// The workspace root (this crate is `<root>/tests`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent dir")
        .to_owned()
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

/// True when a privileged test may run. Without root it is skipped loudly,
/// except under `CI=true`, where a skip would hide a broken setup: it panics.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: privileged tests must not be skipped under CI (run as root)");
    }
    eprintln!("\n*** SKIPPED (needs root): {test} ***\n");
    false
}
