//! The sidecar container as containerd starts it from deploy/sidecar
//! (UID 101, `allowPrivilegeEscalation: false`, capabilities dropped but
//! BPF and NET_ADMIN), the image's copy of the agent with its file
//! capabilities, and what a running process holds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    agent::agent_bin,
    procfs::{self, status_field},
    spawn::copy_program,
    tempdir::TempDir,
};

/// The measured minimal capability set of the sidecar, in setpriv's
/// spelling: the image's file capabilities on /lattice-agent, and exactly
/// deploy/sidecar's `capabilities.add` (checked by manifests.rs and
/// image.rs). least_privilege.rs proves it suffices for a start as UID 101
/// the way containerd starts the container, and that each one is needed.
pub const SIDECAR_CAPS: [&str; 2] = ["bpf", "net_admin"];

/// The UID the sidecar runs as from the start (the image's USER), which is
/// also the agent's default --exempt-uid.
pub const SIDECAR_UID: u32 = 101;

/// `-all,+a,+b`: a capability list for setpriv.
pub fn setpriv_caps(caps: &[&str]) -> String {
    let mut arg = String::from("-all");
    for cap in caps {
        arg.push_str(",+");
        arg.push_str(cap);
    }
    arg
}

/// The argv prefix (`setpriv ... setpriv ...`, to be followed by the program
/// and its arguments) that starts a program as containerd/runc start a
/// Kubernetes container with `runAsUser: uid`, `allowPrivilegeEscalation:
/// false` and `capabilities: {drop: [ALL], add: caps}`: bounding set =
/// `caps`, the UID switched with the capabilities kept in the permitted set
/// (runc sets permitted = effective = the list before exec), no_new_privs.
/// The exec then grants the program's file capabilities only when they are
/// within both sets; without file capabilities a non-root program gets none.
///
/// The outer setpriv (still root) narrows the bounding set to `caps` plus
/// what the inner one needs to switch UID; the inner drops those extras
/// from the bounding set, switches UID keeping permitted capabilities, sets
/// no_new_privs and execs. (The permitted set then holds setuid/setgid/
/// setpcap as well; the exec cannot grant them, the bounding set lacks them.)
pub fn container_start(uid: u32, caps: &[&str]) -> Vec<String> {
    let mut outer = caps.to_vec();
    outer.extend(["setuid", "setgid", "setpcap"]);
    let id = uid.to_string();
    [
        "setpriv",
        "--bounding-set",
        &setpriv_caps(&outer),
        "setpriv",
        "--bounding-set",
        &setpriv_caps(caps),
        "--reuid",
        &id,
        "--regid",
        &id,
        "--clear-groups",
        "--no-new-privs",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A copy of the agent binary carrying the sidecar's file capabilities
/// (`setcap cap_bpf,cap_net_admin=ep`), as the image has it; in a fresh
/// directory every UID can read, removed on drop.
pub struct FileCapsAgent(TempDir);

impl FileCapsAgent {
    pub fn new() -> Self {
        let guard = Self(TempDir::new("filecaps"));
        copy_program(&agent_bin(), &guard.path());
        let caps: Vec<String> = SIDECAR_CAPS.iter().map(|c| format!("cap_{c}")).collect();
        let out = Command::new("setcap")
            .arg(format!("{}=ep", caps.join(",")))
            .arg(guard.path())
            .output()
            .expect("run setcap (Debian package libcap2-bin)");
        assert!(
            out.status.success(),
            "setcap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        guard
    }

    pub fn path(&self) -> PathBuf {
        self.0.path().join("lattice-agent")
    }
}

impl Default for FileCapsAgent {
    fn default() -> Self {
        Self::new()
    }
}

/// The capability names (`bpf`, `net_admin`, sorted) and flags (`ep`) of a
/// file, from `getcap`; None without file capabilities.
pub fn file_caps(path: &Path) -> Option<(Vec<String>, String)> {
    let out = Command::new("getcap")
        .arg(path)
        .output()
        .expect("run getcap");
    assert!(out.status.success(), "getcap {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    // "<path> cap_net_admin,cap_bpf=ep"
    let (_, spec) = text.trim().rsplit_once(' ')?;
    let (names, flags) = spec.split_once('=')?;
    let mut names: Vec<String> = names
        .split(',')
        .map(|n| n.trim_start_matches("cap_").to_owned())
        .collect();
    names.sort();
    Some((names, flags.to_owned()))
}

/// A fake access key id: requests signed with it can only ever reach the
/// test's own listeners.
pub const FAKE_ACCESS_KEY: &str = "AKIDLATTICETESTONLY";

/// The environment of an agent that serves the signing proxy: a region and
/// static fake credentials, IMDS off, and no HOME (no ~/.aws of the host).
/// Everything else is cleared with `env -i`, so nothing of the caller's
/// environment (a real AWS_PROFILE, LATTICE_*) reaches the agent.
pub fn proxy_env(with_credentials: bool) -> Vec<String> {
    let mut env = vec![
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/nonexistent".to_owned(),
        "AWS_REGION=us-west-2".to_owned(),
        "AWS_EC2_METADATA_DISABLED=true".to_owned(),
    ];
    if with_credentials {
        env.push(format!("AWS_ACCESS_KEY_ID={FAKE_ACCESS_KEY}"));
        env.push("AWS_SECRET_ACCESS_KEY=lattice-test-secret-not-real".to_owned());
    }
    env
}

/// Asserts that a request head carries a SigV4 signature made with the
/// fake key for VPC Lattice in us-west-2 (the proxy signed it).
pub fn assert_signed(head: &str) {
    let auth = head
        .lines()
        .find_map(|l| l.strip_prefix("authorization:"))
        .unwrap_or_else(|| panic!("request reached upstream unsigned:\n{head}"));
    let auth = auth.trim();
    assert!(
        auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={FAKE_ACCESS_KEY}/"))
            && auth.contains("/us-west-2/vpc-lattice-svcs/aws4_request")
            && auth.contains("Signature="),
        "unexpected Authorization: {auth}"
    );
    assert!(head.contains("\nx-amz-date:"), "no x-amz-date:\n{head}");
}

/// Every thread of `pid` runs as UID/GID `uid`, with no supplementary
/// groups, no capabilities in any set, and no_new_privs.
pub fn assert_unprivileged(pid: i32, uid: u32, log: &str) {
    for status in procfs::thread_statuses(pid).expect("read /proc/PID/task") {
        let ids = format!("{0}\t{0}\t{0}\t{0}", uid);
        assert_eq!(status_field(&status, "Uid"), ids, "{status}");
        assert_eq!(status_field(&status, "Gid"), ids, "{status}");
        assert_eq!(status_field(&status, "Groups"), "", "{status}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                status_field(&status, set),
                "0000000000000000",
                "{set} not empty\n{status}\n{log}"
            );
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    }
}
