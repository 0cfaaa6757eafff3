//! Running `lattice-agent run` inside a pod.

use std::{ffi::OsStr, path::PathBuf, process::ExitStatus, time::Duration};

use crate::{
    pod::{Pod, sibling_of_test_dir},
    spawn::{ChildGuard, PodCommand, Stream},
    verifier::DEMO_CREDENTIALS,
};

/// How long the agent may take to load, attach and bind.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to detach and exit on SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The line the agent logs once it serves.
pub const READY_LINE: &str = "lattice-agent ready";

/// The lattice-agent binary: `$LATTICE_AGENT_BIN`, else the one cargo built
/// next to the tests (target/debug/lattice-agent).
///
/// Panics with [`find_agent_bin`]'s message when it is missing.
pub fn agent_bin() -> PathBuf {
    find_agent_bin().unwrap_or_else(|missing| panic!("{missing}"))
}

/// [`agent_bin`], or an error saying how to build it. Next to a bin of this
/// package (the demo, target/release) it is the binary of the same profile.
pub fn find_agent_bin() -> Result<PathBuf, String> {
    let path = std::env::var_os("LATTICE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling_of_test_dir("lattice-agent"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "lattice-agent binary {} missing: build it: cargo build -p lattice-agent \
             (or set LATTICE_AGENT_BIN)",
            path.display()
        ))
    }
}

/// The `lattice-cni` plugin binary next to the agent (`cargo build
/// --workspace --bins` builds both); `$LATTICE_CNI_BIN` overrides.
pub fn cni_plugin_bin() -> PathBuf {
    let path = std::env::var_os("LATTICE_CNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling_of_test_dir("lattice-cni"));
    assert!(
        path.is_file(),
        "lattice-cni binary {} missing: build it: cargo build -p lattice-cni (or set LATTICE_CNI_BIN)",
        path.display()
    );
    path
}

/// The optimised static agent of the image the tests check (musl, cargo
/// profile [`crate::IMAGE_TEST_PROFILE`]; `cargo xtask test` builds it
/// before the tests, and so does the first image test), for tests whose
/// figures must be those of an optimised build like the one users deploy:
/// `$LATTICE_RELEASE_AGENT_BIN`, else `<target>/<arch>-unknown-linux-musl/
/// quick-release/lattice-agent`. Panics when it is missing or older than
/// its sources (a stale build would measure old code).
pub fn release_agent_bin() -> PathBuf {
    let path = std::env::var_os("LATTICE_RELEASE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::target_dir()
                .join(format!("{}-unknown-linux-musl", std::env::consts::ARCH))
                .join(crate::IMAGE_TEST_PROFILE)
                .join("lattice-agent")
        });
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(release) = modified(&path) else {
        panic!(
            "optimised agent {} missing: `cargo xtask test` builds it (its image \
             step, `cargo xtask image --profile {}`), or set LATTICE_RELEASE_AGENT_BIN",
            path.display(),
            crate::IMAGE_TEST_PROFILE
        );
    };
    // Stale when a source it is built from changed after it was built
    // (the debug agent's own date says nothing: `cargo test` may relink
    // it with other features).
    let sources = ["lattice-agent", "lattice-ebpf", "lattice-common"]
        .iter()
        .map(|c| crate::workspace().join(c))
        .chain([crate::workspace().join("Cargo.lock")]);
    if let Some((newest, changed)) = sources.filter_map(|p| newest_file(&p)).max() {
        assert!(
            release >= newest,
            "optimised agent {} is older than {}: rebuild it with `cargo xtask image \
             --profile {}`",
            path.display(),
            changed.display(),
            crate::IMAGE_TEST_PROFILE
        );
    }
    path
}

/// The most recently modified file under `path` (or `path` itself).
fn newest_file(path: &std::path::Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return Some((meta.modified().ok()?, path.to_owned()));
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "target")
        .filter_map(|e| newest_file(&e.path()))
        .max()
}

/// `lattice-agent run --cgroup <pod cgroup> ARGS...`, placed inside the pod
/// netns (its proxy listens on the pod's loopback), outside the cgroup, as
/// root (it switches to the exempt UID itself after attaching). It signs
/// with the static [`DEMO_CREDENTIALS`] and their region, given by
/// environment as a pod would get them; IMDS is off.
pub fn agent_command<I, S>(pod: &Pod, args: I) -> PodCommand
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = pod.command(agent_bin()).in_cgroup(false);
    for (key, value) in DEMO_CREDENTIALS.agent_env() {
        cmd = cmd.env(key, value);
    }
    cmd.arg("run")
        .arg("--cgroup")
        .arg(pod.cgroup_path())
        .args(args)
}

/// A running agent. Its stderr is kept for assertions (and printed if the
/// test fails); dropping it kills the agent if still running.
pub struct Agent {
    child: ChildGuard,
}

impl Agent {
    /// Starts `lattice-agent run --cgroup <pod cgroup> ARGS...` and waits
    /// for it to be ready.
    pub fn start<I, S>(pod: &Pod, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn(&agent_command(pod, args))
    }

    /// Starts an agent placed as `cmd` says and waits for it to be ready.
    pub fn spawn(cmd: &PodCommand) -> Self {
        let mut child = cmd.spawn();
        child.wait_for(Stream::Stderr, READY_LINE, READY_TIMEOUT);
        Self { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// SIGTERM, then waits for the exit; panics (with the log) if it does
    /// not exit within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> ExitStatus {
        self.child.signal(libc::SIGTERM);
        match self.child.wait_timeout(STOP_TIMEOUT) {
            Some(status) => {
                // Collects the last log lines (the pipe is drained to EOF).
                self.child.output(status);
                status
            }
            None => {
                self.child.kill();
                panic!(
                    "agent ignored SIGTERM for {STOP_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGKILL (a crash: no cleanup runs in the agent).
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill()
    }
}

/// The body of the agent's 503 when it has no credentials to sign with:
/// one line that says so and names the provider's error.
pub fn assert_no_credentials_text(text: &str) {
    assert!(
        text.starts_with("lattice-agent: no AWS credentials: "),
        "{text}"
    );
    assert!(
        text.contains("500") || text.contains("unavailable") || text.contains("provider"),
        "503 should name the provider error: {text}"
    );
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
}
