//! Running external commands. Each one that changes something is echoed
//! before it runs and a failure names it, so a CI log shows what xtask did
//! and where it stopped; probes run silently so a ready machine stays quiet.

use std::{
    env,
    ffi::{OsStr, OsString},
    io,
    path::Path,
    process::Command,
};

use anyhow::{Result, anyhow, bail};

/// Echoes `cmd`, runs it with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().map_err(|e| start_error(cmd, e))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` silently and returns its stdout; on failure the error carries
/// its stderr, which says why (e.g. rustup's "toolchain not installed").
pub fn read(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| start_error(cmd, e))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `cmd` can be started and exits 0; output is discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|out| out.status.success())
}

/// Removes what the outer `cargo run` (via `cargo xtask`) put into our
/// environment, so a nested cargo behaves as if started from a shell: the
/// xtask package's CARGO_PKG_* must not leak into test binaries, and the
/// LD_LIBRARY_PATH entries pointing into the stable toolchain and our target
/// dir must not shadow another toolchain's libraries. User settings
/// (CARGO_TARGET_DIR, CARGO_HOME, RUSTFLAGS, a `+toolchain`) are kept.
pub fn without_cargo_run_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in env::vars_os() {
        if is_cargo_run_var(&key) {
            cmd.env_remove(key);
        }
    }
    if let Some(path) = env::var_os("LD_LIBRARY_PATH") {
        match without_cargo_run_libs(&path) {
            kept if kept.is_empty() => cmd.env_remove("LD_LIBRARY_PATH"),
            kept => cmd.env("LD_LIBRARY_PATH", kept),
        };
    }
    cmd
}

/// For a nested build with another toolchain (nightly) or outside the
/// workspace: additionally drops every CARGO_* setting but CARGO_HOME and the
/// toolchain selection, so neither this workspace's config nor the stable
/// toolchain that runs xtask leaks into it.
pub fn without_cargo_env(cmd: &mut Command) -> &mut Command {
    without_cargo_run_env(cmd);
    for (key, _) in env::vars_os() {
        let key_str = key.to_string_lossy();
        let drop = (key_str.starts_with("CARGO_") && key_str != "CARGO_HOME")
            || matches!(
                &*key_str,
                "RUSTC"
                    | "RUSTDOC"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTUP_TOOLCHAIN"
                    | "RUSTUP_TOOLCHAIN_SOURCE"
            );
        if drop {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Variables `cargo run` sets for the program it runs (see the cargo book,
/// "Environment variables Cargo sets for crates").
fn is_cargo_run_var(key: &OsStr) -> bool {
    let key = key.to_string_lossy();
    key == "CARGO"
        || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            &*key,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
        )
}

/// LD_LIBRARY_PATH without the entries `cargo run` prepends: the target dir's
/// `debug`/`deps` and the running toolchain's `lib` directories.
fn without_cargo_run_libs(path: &OsStr) -> OsString {
    let toolchain = env::var_os("RUSTUP_HOME").map(|home| Path::new(&home).join("toolchains"));
    let target = env::var_os("CARGO_MANIFEST_DIR")
        .and_then(|dir| Path::new(&dir).parent().map(|ws| ws.join("target")));
    let added_by_cargo = |entry: &Path| {
        [&toolchain, &target]
            .into_iter()
            .flatten()
            .any(|prefix| entry.starts_with(prefix))
            || env::var_os("CARGO_TARGET_DIR").is_some_and(|t| entry.starts_with(t))
    };
    let kept: Vec<_> = env::split_paths(path)
        .filter(|entry| !added_by_cargo(entry))
        .collect();
    env::join_paths(kept).unwrap_or_default()
}

/// The command as a shell would show it; environment variables it sets are
/// shown too (they matter to reproduce it), except the long PATH.
pub fn display(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| Some((key, value?)))
        .filter(|(key, _)| *key != "PATH" && *key != "LD_LIBRARY_PATH")
        .map(|(key, value)| format!("{}={}", key.to_string_lossy(), quote(value)))
        .collect();
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    let line = words.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", quote(dir.as_os_str())),
        None => line,
    }
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// "not found" for a missing program says so plainly; that is the usual cause.
fn start_error(cmd: &Command, err: io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy();
    if err.kind() == io::ErrorKind::NotFound {
        anyhow!("`{program}` not found on PATH: is it installed?")
    } else {
        anyhow!(err).context(format!("could not start `{}`", display(cmd)))
    }
}
