//! Long-running children (nginx, the agent) and what /proc says about them.

use std::{
    fs,
    path::PathBuf,
    process::Child,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, SysconfVar, sysconf},
};

/// A child that is asked to stop (`stop_signal`), then killed, and always
/// reaped on drop.
pub struct ChildGuard {
    child: Child,
    name: &'static str,
    stop_signal: Signal,
    /// Its stderr, shown when something goes wrong.
    pub log: PathBuf,
}

impl ChildGuard {
    pub fn new(child: Child, name: &'static str, stop_signal: Signal, log: PathBuf) -> Self {
        Self {
            child,
            name,
            stop_signal,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Stops it: the stop signal, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, self.stop_signal);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if self.exited().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: {} did not stop within {}s; killing it",
            self.name,
            grace.as_secs()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Memory and CPU of one process, from /proc/<pid>.
pub struct ProcStats {
    pid: u32,
    ticks_per_s: f64,
}

impl ProcStats {
    pub fn new(pid: u32) -> Result<Self> {
        let ticks = sysconf(SysconfVar::CLK_TCK)
            .context("sysconf(CLK_TCK)")?
            .context("CLK_TCK unknown")?;
        Ok(Self {
            pid,
            ticks_per_s: ticks as f64,
        })
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no {field} in {path}"))
    }

    /// Resident set size now, MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        Ok(self.status_kib("VmRSS:")? as f64 / 1024.0)
    }

    /// Peak resident set size since the last [`Self::reset_peak`], MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        Ok(self.status_kib("VmHWM:")? as f64 / 1024.0)
    }

    /// Restarts the peak (VmHWM) from the current RSS (proc(5), clear_refs 5).
    pub fn reset_peak(&self) -> Result<()> {
        let path = format!("/proc/{}/clear_refs", self.pid);
        fs::write(&path, "5").with_context(|| format!("writing {path}"))
    }

    /// CPU time of all its threads, seconds: (user, system).
    pub fn cpu_seconds(&self) -> Result<(f64, f64)> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The command name may hold spaces and parentheses: fields are
        // counted from the last ')'. After it come field 3 (state) onwards;
        // utime and stime are fields 14 and 15.
        let rest = stat
            .rsplit_once(')')
            .with_context(|| format!("malformed {path}"))?
            .1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .map(|t| t as f64)
                .with_context(|| format!("malformed {path}"))
        };
        Ok((tick(11)? / self.ticks_per_s, tick(12)? / self.ticks_per_s))
    }
}
