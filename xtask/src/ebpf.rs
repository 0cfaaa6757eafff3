//! `cargo xtask build-ebpf`: the eBPF object alone, for inspection or
//! `bpftool prog load`. lattice-agent's build.rs builds (and embeds) its own
//! copy; this is the same build, by hand.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{Workspace, cmd, setup::Ready};

const PACKAGE: &str = "lattice-ebpf";
const TARGET: &str = "bpfel-unknown-none";

/// Builds the object and returns its path.
pub fn build(ws: &Workspace, ready: &Ready, release: bool) -> Result<PathBuf> {
    let target_dir = ws.target_dir.join("ebpf");
    let mut cargo = Command::new("rustup");
    // The nested build must use nightly (build-std) and must not inherit the
    // stable toolchain or target settings the outer `cargo xtask` put into
    // our environment. PATH: bpf-linker.
    cmd::without_cargo_env(&mut cargo)
        .current_dir(ws.root.join(PACKAGE))
        .env("PATH", ready.path()?)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            PACKAGE,
            "--bins",
        ])
        .args(["-Z", "build-std=core", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo).context("building the eBPF object")?;

    let profile = if release { "release" } else { "debug" };
    let object = target_dir.join(TARGET).join(profile).join(PACKAGE);
    anyhow::ensure!(
        object.is_file(),
        "the build succeeded but {} is missing",
        object.display()
    );
    print_sections(&object);
    Ok(object)
}

/// Lists the program sections (what `bpftool prog load` would see), when
/// readelf is there; stderr, so stdout stays just the path for scripts.
fn print_sections(object: &Path) {
    let Ok(listing) = cmd::read(Command::new("readelf").args(["-S", "-W"]).arg(object)) else {
        return;
    };
    let programs: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().find(|w| is_program_section(w)))
        .collect();
    if !programs.is_empty() {
        eprintln!("sections: {}", programs.join(" "));
    }
}

/// aya puts programs in sections named after the program type, e.g.
/// `cgroup/connect4`, `sockops`, `cgroup/getsockopt`; maps go to `maps`.
fn is_program_section(name: &str) -> bool {
    name.starts_with("cgroup/") || name.starts_with("sockops") || name == "maps"
}
