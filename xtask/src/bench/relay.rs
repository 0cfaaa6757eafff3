//! The floors' proxy: the test kit's `lattice-bench-relay` (one thread, no
//! signing; bytes for `floor`, HTTP/1.1 through hyper for `http-floor`) on
//! the agent's port, in the app's cgroup (where the cgroup/getsockopt
//! program answers its `SO_ORIGINAL_DST`) and as the exempt UID (so its own
//! upstream connects are not redirected).

use std::{
    fs::{self, File},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

use super::{
    agent::{EXEMPT_UID, PROXY_PORT},
    interrupt::Interrupt,
    netns::Netns,
    process::ChildGuard,
};
use crate::cmd;

/// What the relay relays.
#[derive(Clone, Copy)]
pub enum RelayMode {
    Bytes,
    Http,
}

pub struct Relay {
    pub process: ChildGuard,
    out: std::path::PathBuf,
}

impl Relay {
    /// Starts the relay and waits until it listens.
    pub fn start(
        binary: &Path,
        mode: RelayMode,
        ns: &Netns,
        app_cgroup: &Path,
        dir: &Path,
        stop: &Interrupt,
    ) -> Result<Self> {
        let out = dir.join("relay.out");
        let log = dir.join("relay.log");
        let uid = EXEMPT_UID.to_string();
        let mut command = ns.command_in_cgroup(app_cgroup, "setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(binary)
            .args(match mode {
                RelayMode::Bytes => None,
                RelayMode::Http => Some("--http"),
            })
            .arg(PROXY_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(File::create(&out).context("creating the relay's output")?)
            .stderr(File::create(&log).context("creating the relay's log")?);
        let child = command
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::display(&command)))?;
        let mut process = ChildGuard::new(child, "lattice-bench-relay", Signal::SIGTERM, log);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            stop.check()?;
            if let Some(status) = process.exited() {
                bail!(
                    "lattice-bench-relay exited at start ({status}):\n{}",
                    process.log_tail()
                );
            }
            if fs::read_to_string(&out).is_ok_and(|o| o.contains("listening")) {
                return Ok(Self { process, out });
            }
            if Instant::now() > deadline {
                bail!(
                    "lattice-bench-relay not listening within 10s:\n{}",
                    process.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it and returns how many connections it relayed.
    pub fn stop(&mut self) -> Result<u64> {
        self.process.stop(Duration::from_secs(10));
        let out = fs::read_to_string(&self.out).context("reading the relay's output")?;
        out.lines()
            .find_map(|l| {
                l.strip_prefix("relayed ")?
                    .strip_suffix(" connections")?
                    .parse()
                    .ok()
            })
            .with_context(|| {
                format!(
                    "the relay did not report its count:\n{out}\n{}",
                    self.process.log_tail()
                )
            })
    }
}
