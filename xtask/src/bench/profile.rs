//! `cargo xtask bench --profile`: where the agent's CPU goes under the
//! keep-alive load, as a flame graph (target/bench/flamegraph.svg).
//!
//! `perf record` (Debian's linux-perf) samples the agent's threads, user
//! and kernel stacks; user stacks are unwound from DWARF call frame
//! information, since release builds keep no frame pointers. `perf script`
//! prints the samples; inferno (the Rust port of Brendan Gregg's FlameGraph
//! tools) folds the stacks and draws the SVG.

use std::{
    fs::File,
    io::{BufReader, BufWriter},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use inferno::{
    collapse::{
        Collapse as _,
        perf::{Folder, Options as FoldOptions},
    },
    flamegraph::{self, Options as GraphOptions},
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::interrupt::Interrupt;
use crate::cmd;

/// Samples per second: odd, so it does not beat with periodic work.
const FREQUENCY: &str = "997";
/// Bytes of user stack copied per sample for DWARF unwinding.
const STACK_BYTES: &str = "16384";

/// A `perf record` of one process, running until [`Recording::finish`].
pub struct Recording {
    child: std::process::Child,
    data: std::path::PathBuf,
}

impl Recording {
    /// Starts sampling `pid` into `out/perf.data`.
    pub fn start(pid: i32, out: &Path) -> Result<Self> {
        if !cmd::succeeds(Command::new("sh").args(["-c", "command -v perf"])) {
            bail!("`perf` not found: run `cargo xtask setup` as root (Debian's linux-perf)");
        }
        let data = out.join("perf.data");
        let mut command = Command::new("perf");
        command
            .args(["record", "--quiet", "-F", FREQUENCY, "--call-graph"])
            .arg(format!("dwarf,{STACK_BYTES}"))
            .args(["-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(out.join("perf-record.log")).context("creating perf's log")?);
        let child = command
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::display(&command)))?;
        // perf needs a moment to attach to every thread before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { child, data })
    }

    /// Stops sampling and draws `svg` from the samples.
    pub fn finish(mut self, svg: &Path, title: &str, stop: &Interrupt) -> Result<()> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let status = stop.wait(&mut self.child, Duration::from_secs(120), "perf record")?;
        if !status.success() && !self.data.exists() {
            bail!("perf record failed ({status})");
        }
        let mut script = Command::new("perf");
        script
            .arg("script")
            .arg("-i")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = script
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::display(&script)))?;
        let stacks = child.stdout.take().context("perf script's output")?;
        let mut folded = Vec::new();
        Folder::from(FoldOptions::default())
            .collapse(BufReader::new(stacks), &mut folded)
            .context("folding perf's stacks")?;
        let status = child.wait().context("waiting for perf script")?;
        if !status.success() || folded.is_empty() {
            bail!("perf script failed ({status}) or recorded no samples");
        }
        let folded = String::from_utf8_lossy(&folded);
        let mut options = GraphOptions::default();
        options.title = title.to_owned();
        let file = File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
        flamegraph::from_lines(&mut options, folded.lines(), BufWriter::new(file))
            .context("drawing the flame graph")?;
        Ok(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
