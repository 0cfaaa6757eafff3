//! The floors' proxy: the test kit's `lattice-bench-relay` (one thread, no
//! signing; bytes for `floor`, HTTP/1.1 through hyper for `http-floor`) on
//! the agent's port, in the app's cgroup (where the cgroup/getsockopt
//! program answers its `SO_ORIGINAL_DST`) and as the exempt UID (so its own
//! upstream connects are not redirected).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lattice_tests::{ChildGuard, netns::Netns};

use super::{
    agent::{EXEMPT_UID, PROXY_PORT},
    interrupt::Interrupt,
    process::{log_tail, stop_gracefully},
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
}

impl Relay {
    /// Starts the relay and waits until it listens.
    pub fn start(
        binary: &Path,
        mode: RelayMode,
        ns: &Netns,
        app_cgroup: &Path,
        stop: &Interrupt,
    ) -> Result<Self> {
        let command = ns
            .command(binary)
            .cgroup(app_cgroup)
            .uid(EXEMPT_UID)
            .args(match mode {
                RelayMode::Bytes => None,
                RelayMode::Http => Some("--http"),
            })
            .arg(PROXY_PORT.to_string())
            .build();
        let name = cmd::display(&command);
        let mut process = ChildGuard::spawn(command, name);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            stop.check()?;
            if let Some(status) = process.try_wait() {
                bail!(
                    "lattice-bench-relay exited at start ({status}):\n{}",
                    log_tail(&process.stderr())
                );
            }
            if process.stdout().contains("listening") {
                return Ok(Self { process });
            }
            if Instant::now() > deadline {
                bail!(
                    "lattice-bench-relay not listening within 10s:\n{}",
                    log_tail(&process.stderr())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it and returns how many connections it relayed.
    pub fn stop(&mut self) -> Result<u64> {
        stop_gracefully(&mut self.process, nix::libc::SIGTERM);
        let out = self.process.stdout();
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
                    log_tail(&self.process.stderr())
                )
            })
    }
}
