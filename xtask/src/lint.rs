//! Clippy inside the build (see `test`'s module comment): cargo runs
//! `clippy-driver` as the compiler of the workspace's own crates, with the
//! settings `cargo clippy -- -D warnings` would give it, and the build's
//! diagnostics are read from cargo's JSON messages so that a warning fails
//! the step after the build rather than stopping it.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::cmd;

/// Makes `cmd` (a cargo invocation in `workspace`) compile the workspace's
/// crates with clippy-driver and its default lints, warnings allowed
/// through (they are counted by [`build`]: the effect of `-D warnings`
/// without stopping the build). Every cargo step uses the same setting: it
/// is part of what cargo fingerprints, so a step without it would compile
/// the workspace's crates again.
pub fn apply(cmd: &mut Command, workspace: &Path) -> Result<()> {
    let driver = driver(workspace)?;
    cmd.env("RUSTC_WORKSPACE_WRAPPER", driver)
        .env_remove("CLIPPY_ARGS");
    Ok(())
}

/// The toolchain's clippy-driver (the one `cargo clippy` would run in
/// `workspace`).
fn driver(workspace: &Path) -> Result<String> {
    let path = cmd::read(
        Command::new("rustup")
            .args(["which", "clippy-driver"])
            .current_dir(workspace),
    )
    .context("finding clippy-driver (rustup component add clippy)")?;
    Ok(path.trim().to_owned())
}

/// Runs the cargo build `cmd` (set up by [`apply`]), printing every
/// diagnostic as cargo would; fails if the build fails, else if any
/// diagnostic of the workspace's crates was a warning.
pub fn build(cmd: &mut Command) -> Result<()> {
    cmd.arg("--message-format=json-diagnostic-rendered-ansi")
        .stdout(Stdio::piped());
    eprintln!("$ {}", cmd::display(cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(cmd)))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut warnings = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        match serde_json::from_str::<Message>(&line) {
            Ok(message) => warnings += message.show(),
            // Not a message (a build script's output, say): as it is.
            Err(_) => println!("{line}"),
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`{}` failed ({status})", cmd::display(cmd));
    }
    if warnings > 0 {
        bail!("{warnings} warning(s) from rustc or clippy (shown above): clippy's -D warnings");
    }
    Ok(())
}

/// One line of cargo's `--message-format json` output.
#[derive(Deserialize)]
struct Message {
    reason: String,
    message: Option<Diagnostic>,
}

#[derive(Deserialize)]
struct Diagnostic {
    level: String,
    rendered: Option<String>,
    /// Empty for the "N warnings emitted" summary.
    #[serde(default)]
    spans: Vec<serde_json::Value>,
}

impl Message {
    /// Prints a compiler diagnostic; returns 1 if it is a warning about
    /// code (not a summary).
    fn show(&self) -> usize {
        let Some(diagnostic) = self
            .message
            .as_ref()
            .filter(|_| self.reason == "compiler-message")
        else {
            return 0;
        };
        if let Some(rendered) = &diagnostic.rendered {
            eprint!("{rendered}");
        }
        usize::from(diagnostic.level == "warning" && !diagnostic.spans.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_warnings_about_code_not_summaries_or_artifacts() {
        let count = |json: &str| serde_json::from_str::<Message>(json).unwrap().show();
        assert_eq!(
            count(
                r#"{"reason":"compiler-message","message":{"level":"warning","rendered":"warning: x\n","spans":[{"file_name":"src/lib.rs"}]}}"#
            ),
            1
        );
        assert_eq!(
            count(
                r#"{"reason":"compiler-message","message":{"level":"warning","rendered":"warning: 1 warning emitted\n","spans":[]}}"#
            ),
            0
        );
        assert_eq!(
            count(r#"{"reason":"compiler-artifact","target":{"name":"x"}}"#),
            0
        );
    }
}
