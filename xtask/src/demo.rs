//! `cargo xtask demo`: builds the agent (release) and runs the end-to-end
//! demo, the `lattice-demo` binary of the lattice-tests package
//! (tests/src/bin/lattice-demo.rs). The demo finds the release agent next to
//! itself (or `$LATTICE_AGENT_BIN`) and the Python venv through
//! `LATTICE_TEST_VENV`, which setup's `Ready` sets; it needs root.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{Workspace, cmd, setup::Ready};

const DEMO_BIN: &str = "lattice-demo";

pub fn run(ws: &Workspace, ready: &Ready) -> Result<()> {
    // Checked before the (long) release build, which would be wasted.
    if !demo_exists(ws) {
        bail!("tests/src/bin/{DEMO_BIN}.rs is missing from this checkout");
    }
    cmd::run(cargo(ws, ready)?.args(["build", "--release", "--package", "lattice-agent"]))?;
    cmd::run(cargo(ws, ready)?.args([
        "run",
        "--release",
        "--package",
        "lattice-tests",
        "--bin",
        DEMO_BIN,
    ]))
}

/// The bin target exists: a file where cargo auto-discovers bins, or an
/// explicit `[[bin]]` in tests/Cargo.toml.
fn demo_exists(ws: &Workspace) -> bool {
    let package = ws.root.join("tests");
    let bins = package.join("src/bin");
    bins.join(format!("{DEMO_BIN}.rs")).is_file()
        || bins.join(DEMO_BIN).join("main.rs").is_file()
        || std::fs::read_to_string(package.join("Cargo.toml"))
            .is_ok_and(|toml| toml.contains(&format!("name = \"{DEMO_BIN}\"")))
}

fn cargo(ws: &Workspace, ready: &Ready) -> Result<Command> {
    let mut cargo = Command::new("cargo");
    cmd::without_cargo_run_env(&mut cargo).current_dir(&ws.root);
    ready.apply(&mut cargo)?;
    Ok(cargo)
}
