//! `cargo xtask fuzz [--time S]`: builds the fuzz targets (the `fuzz/`
//! crate, cargo-fuzz and libFuzzer on the nightly toolchain) and runs each
//! for S seconds, two at a time, each one's output in
//! `<target dir>/fuzz/<target>.log` and its end shown as it finishes.
//! What each target checks: docs/fuzzing.md.
//!
//! Per target, libFuzzer first runs every input of its corpus
//! directories: `fuzz/regressions/<target>/` (inputs that once failed,
//! kept in the repository, so each is replayed on every run),
//! `fuzz/seeds/<target>/` (a few valid inputs to start from) and
//! `<target dir>/fuzz-corpus/<target>/` (what earlier runs on this machine
//! found; not in the repository). A new failing input is copied into
//! `fuzz/regressions/<target>/` and the run fails, naming it: commit it
//! with the fix.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{Workspace, cmd, setup::Ready};

/// The targets, as fuzz/Cargo.toml names them.
pub const TARGETS: [&str; 6] = [
    "canonical",
    "cni_netconf",
    "cni_env",
    "cni_conflist",
    "cni_frame",
    "handover_frame",
];

/// Seconds per target in `cargo xtask test`: six targets, two at a time,
/// in about half a minute, after the inputs kept in the repository are
/// replayed.
pub const TEST_SECONDS: u64 = 10;

pub fn run(ws: &Workspace, ready: &Ready, seconds: u64) -> Result<()> {
    let fuzz_dir = ws.root.join("fuzz");
    let target_dir = ws.target_dir.join("fuzz");
    cmd::run(
        cargo_fuzz(ws, ready)?
            .arg("build")
            .args(options(&target_dir)),
    )?;
    let mut failed = Vec::new();
    for batch in TARGETS.chunks(AT_ONCE) {
        let running = batch
            .iter()
            .map(|target| Running::start(ws, ready, &fuzz_dir, &target_dir, target, seconds))
            .collect::<Result<Vec<_>>>()?;
        for run in running {
            let target = run.target;
            if let Err(err) = run.finish(&fuzz_dir) {
                eprintln!("{err:#}");
                failed.push(target);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz target(s) failed: {} (the failing inputs are in fuzz/regressions/: \
             fix the bug and commit them)",
            failed.join(", ")
        );
    }
    eprintln!("fuzz: every target ran {seconds} s without a failure");
    Ok(())
}

/// Targets fuzzed at once: one per core of the two-core machines the
/// tests run on (libFuzzer runs one process per target).
const AT_ONCE: usize = 2;

/// Lines of a failed target's log shown (the input's report and stack);
/// a target that passes shows libFuzzer's final statistics.
const TAIL_FAILED: usize = 80;

/// One target being fuzzed; its output goes to a log file (targets run
/// side by side), shown when it ends.
struct Running {
    target: &'static str,
    child: std::process::Child,
    log: PathBuf,
    artifacts: PathBuf,
}

impl Running {
    fn start(
        ws: &Workspace,
        ready: &Ready,
        fuzz_dir: &Path,
        target_dir: &Path,
        target: &'static str,
        seconds: u64,
    ) -> Result<Self> {
        let corpus = ws.target_dir.join("fuzz-corpus").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let mut dirs = vec![corpus];
        for kept in ["regressions", "seeds"] {
            let dir = fuzz_dir.join(kept).join(target);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
        let artifacts = target_dir.join("artifacts").join(target);
        fs::create_dir_all(&artifacts)
            .with_context(|| format!("creating {}", artifacts.display()))?;
        let log = target_dir.join(format!("{target}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut run = cargo_fuzz(ws, ready)?;
        run.arg("run")
            .args(options(target_dir))
            .arg(target)
            .args(&dirs)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            // libFuzzer's own summary is enough; no per-input lines.
            .arg("-print_final_stats=1")
            .stdout(file.try_clone()?)
            .stderr(file);
        eprintln!("fuzz: {target} for {seconds} s (log: {})", log.display());
        eprintln!("$ {}", cmd::display(&run));
        let child = run
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::display(&run)))?;
        Ok(Self {
            target,
            child,
            log,
            artifacts,
        })
    }

    /// Waits for the target, shows the end of its log, and on a failure
    /// keeps the failing inputs in `fuzz/regressions/<target>/`.
    fn finish(mut self, fuzz_dir: &Path) -> Result<()> {
        let status = self.child.wait().context("waiting for cargo fuzz")?;
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if status.success() {
            for line in lines
                .iter()
                .filter(|l| l.starts_with("Done ") || l.starts_with("stat::"))
            {
                eprintln!("fuzz: {}: {line}", self.target);
            }
            return Ok(());
        }
        for line in &lines[lines.len().saturating_sub(TAIL_FAILED)..] {
            eprintln!("fuzz: {}: {line}", self.target);
        }
        let kept = keep_failures(
            &self.artifacts,
            &fuzz_dir.join("regressions").join(self.target),
        )?;
        for input in &kept {
            eprintln!("fuzz: failing input kept as {}", input.display());
        }
        bail!(
            "fuzz: {} FAILED ({status}); its whole log: {}",
            self.target,
            self.log.display()
        )
    }
}

/// `cargo +nightly fuzz`, from the repository root, with cargo-fuzz on
/// PATH and no trace of the outer cargo's toolchain.
fn cargo_fuzz(ws: &Workspace, ready: &Ready) -> Result<Command> {
    let mut cargo = Command::new("cargo");
    cmd::without_cargo_env(&mut cargo)
        .current_dir(&ws.root)
        .args(["+nightly", "fuzz"]);
    ready.apply(&mut cargo)?;
    Ok(cargo)
}

/// Build options shared by `build` and `run` (the same flags, or cargo
/// rebuilds). No sanitizer: the code under test is safe Rust; overflow
/// checks and debug assertions stay on (cargo-fuzz's default).
fn options(target_dir: &Path) -> Vec<String> {
    vec![
        "--sanitizer=none".into(),
        format!("--target-dir={}", target_dir.display()),
    ]
}

/// Moves libFuzzer's crash, timeout and out-of-memory inputs from
/// `artifacts` into `regressions` (named as libFuzzer names them, by
/// content); returns where they are now.
fn keep_failures(artifacts: &Path, regressions: &Path) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    for entry in
        fs::read_dir(artifacts).with_context(|| format!("reading {}", artifacts.display()))?
    {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !["crash-", "timeout-", "oom-", "leak-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        fs::create_dir_all(regressions)
            .with_context(|| format!("creating {}", regressions.display()))?;
        let to = regressions.join(name);
        fs::copy(&path, &to).with_context(|| format!("copying to {}", to.display()))?;
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        kept.push(to);
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target the xtask runs is a binary of fuzz/Cargo.toml, and
    /// every binary there is run.
    #[test]
    fn targets_match_the_fuzz_crate() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml");
        let text = fs::read_to_string(&manifest).unwrap();
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "lattice-fuzz")
            .collect();
        names.sort_unstable();
        let mut targets = TARGETS.to_vec();
        targets.sort_unstable();
        assert_eq!(names, targets);
    }

    #[test]
    fn failures_move_into_the_regressions() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("artifacts");
        let regressions = dir.path().join("regressions/canonical");
        fs::create_dir_all(&artifacts).unwrap();
        fs::write(artifacts.join("crash-abc"), b"input").unwrap();
        fs::write(artifacts.join("slow-unit-def"), b"slow").unwrap();
        let kept = keep_failures(&artifacts, &regressions).unwrap();
        assert_eq!(kept, vec![regressions.join("crash-abc")]);
        assert_eq!(fs::read(&kept[0]).unwrap(), b"input");
        assert!(!artifacts.join("crash-abc").exists());
        assert!(artifacts.join("slow-unit-def").exists());
    }
}
