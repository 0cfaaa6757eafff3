//! The bench's long-running children (nginx, the agent, the relay) are the
//! test kit's `ChildGuard`s; this is how it stops them and what it reads
//! of them, in the report's units.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lattice_tests::{ChildGuard, procfs};

use super::interrupt::Interrupt;

/// How long a child may take to stop after its stop signal.
const GRACE: Duration = Duration::from_secs(10);

/// Sends `signal`, waits up to 10 s for the exit, then kills.
pub fn stop_gracefully(child: &mut ChildGuard, signal: i32) {
    if child.try_wait().is_some() {
        return;
    }
    let (_, in_time) = child.stop(signal, GRACE);
    if !in_time {
        eprintln!(
            "bench: `{}` did not stop within {}s; killed it",
            child.name(),
            GRACE.as_secs()
        );
    }
}

/// Polls `ready` every `every` until it says yes. Fails, with the end of
/// the child's stderr, when the child exits first, when `limit` passes
/// (naming what `ready` last said) or on Ctrl-C.
pub fn wait_ready(
    process: &mut ChildGuard,
    limit: Duration,
    every: Duration,
    stop: &Interrupt,
    mut ready: impl FnMut(&ChildGuard) -> Result<(), String>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        stop.check()?;
        if let Some(status) = process.try_wait() {
            let said = ready(process).err().unwrap_or_default();
            bail!(
                "`{}` exited at start ({status}; {said}):\n{}",
                process.name(),
                log_tail(&process.stderr())
            );
        }
        let not_yet = match ready(process) {
            Ok(()) => return Ok(()),
            Err(not_yet) => not_yet,
        };
        if Instant::now() > deadline {
            bail!(
                "`{}` not ready within {}s ({not_yet}):\n{}",
                process.name(),
                limit.as_secs(),
                log_tail(&process.stderr())
            );
        }
        std::thread::sleep(every);
    }
}

/// The last lines of a child's output, for error messages.
pub fn log_tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Memory and CPU of one process, from /proc/<pid>.
pub struct ProcStats {
    pid: i32,
}

impl ProcStats {
    pub fn new(pid: i32) -> Self {
        Self { pid }
    }

    /// Resident set size now, MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        Ok(procfs::mib(procfs::rss(self.pid)?))
    }

    /// Peak resident set size since the last [`Self::reset_peak`], MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        Ok(procfs::mib(procfs::peak_rss(self.pid)?))
    }

    /// Restarts the peak (VmHWM) from the current RSS.
    pub fn reset_peak(&self) -> Result<()> {
        Ok(procfs::reset_peak_rss(self.pid)?)
    }

    /// CPU time of all its threads, seconds: (user, system).
    pub fn cpu_seconds(&self) -> Result<(f64, f64)> {
        Ok(procfs::cpu_seconds(self.pid)?)
    }
}
