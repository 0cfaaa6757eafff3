//! The floors' proxy: the test kit's `lattice-bench-relay` (one thread, no
//! signing; bytes for `floor`, HTTP/1.1 through hyper for `http-floor`) on
//! the agent's port, in the app's cgroup (where the cgroup/getsockopt
//! program answers its `SO_ORIGINAL_DST`) and as the exempt UID (so its own
//! upstream connects are not redirected).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use lattice_tests::{ChildGuard, netns::Netns};

use super::{
    agent::{EXEMPT_UID, PROXY_PORT},
    interrupt::Interrupt,
    process::{log_tail, stop_gracefully, wait_ready},
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
        let process = start_listening(command, stop)?;
        Ok(Self { process })
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

/// Starts `command` and waits (10 s at most) until it says "listening" on
/// stdout: the kit's relay and echo server do once they accept.
pub fn start_listening(command: Command, stop: &Interrupt) -> Result<ChildGuard> {
    let name = cmd::display(&command);
    let mut process = ChildGuard::spawn(command, name);
    wait_ready(
        &mut process,
        Duration::from_secs(10),
        Duration::from_millis(20),
        stop,
        |process| match process.stdout().contains("listening") {
            true => Ok(()),
            false => Err("no \"listening\" on its stdout".to_owned()),
        },
    )?;
    Ok(process)
}
