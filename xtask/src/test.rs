//! `cargo xtask test`: every check CI runs, in order. All steps run even
//! after a failure (a formatting slip should not hide a failing test), and
//! the summary names each step that failed.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    Workspace, cmd, fuzz,
    image::{self, Arch},
    reliability,
    setup::Ready,
};

/// On the host the eBPF crate fails with "duplicate lang item"; it is
/// checked by the nested bpfel build in lattice-agent's build.rs instead.
const HOST_EXCLUDE: [&str; 2] = ["--exclude", "lattice-ebpf"];

struct Step {
    name: &'static str,
    work: Work,
}

enum Work {
    /// A cargo invocation with these arguments.
    Cargo(Vec<String>),
    /// The release agents and the OCI image (`cargo xtask image`): the
    /// image tests check them, and the timed node-mode tests measure the
    /// image's static agent, the binary users deploy.
    Image,
    /// Every fuzz target for a few seconds, after replaying the inputs
    /// kept in fuzz/regressions/ (`cargo xtask fuzz`).
    Fuzz,
}

pub fn run(ws: &Workspace, ready: &Ready, test_args: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    for step in steps(test_args) {
        eprintln!("==> {}", step.name);
        if step.name == "test" {
            reliability::clear(&ws.target_dir)?;
        }
        if let Err(err) = run_step(ws, ready, &step) {
            eprintln!("==> {} FAILED: {err:#}", step.name);
            failed.push(step.name);
        }
    }
    // The lifecycle tests' figures, failing runs included (each test
    // writes its record before its assertions).
    match reliability::table(&ws.target_dir) {
        Ok(table) => eprintln!("==> reliability (README \"Reliability\")\n{table}"),
        Err(err) => eprintln!("==> no reliability table: {err:#}"),
    }
    if !failed.is_empty() {
        bail!("failed step(s): {}", failed.join(", "));
    }
    eprintln!("==> all steps passed");
    Ok(())
}

fn steps(test_args: &[String]) -> Vec<Step> {
    let strings = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let mut clippy = strings(&["clippy", "--workspace", "--all-targets"]);
    clippy.extend(strings(&HOST_EXCLUDE));
    clippy.extend(strings(&["--", "-D", "warnings"]));
    // The integration tests run the agent and test binaries from target/;
    // build them explicitly rather than rely on what `cargo test` builds.
    let mut build = strings(&["build", "--workspace", "--bins"]);
    build.extend(strings(&HOST_EXCLUDE));
    let mut test = strings(&["test", "--workspace", "--no-fail-fast"]);
    test.extend(strings(&HOST_EXCLUDE));
    test.extend(test_args.iter().cloned());
    vec![
        Step {
            name: "fmt",
            work: Work::Cargo(strings(&["fmt", "--all", "--check"])),
        },
        Step {
            name: "clippy",
            work: Work::Cargo(clippy),
        },
        Step {
            name: "build",
            work: Work::Cargo(build),
        },
        Step {
            name: "image",
            work: Work::Image,
        },
        Step {
            name: "test",
            work: Work::Cargo(test),
        },
        Step {
            name: "fuzz",
            work: Work::Fuzz,
        },
    ]
}

/// One step: a cargo invocation from the workspace root, with bpf-linker
/// on PATH (lattice-agent's build.rs needs it) and the venv for the test
/// servers; or the image build; or the fuzz targets.
fn run_step(ws: &Workspace, ready: &Ready, step: &Step) -> Result<()> {
    match &step.work {
        Work::Cargo(args) => {
            let mut cargo = Command::new("cargo");
            cmd::without_cargo_run_env(&mut cargo)
                .current_dir(&ws.root)
                .args(args);
            ready.apply(&mut cargo)?;
            cmd::run(&mut cargo)
        }
        Work::Image => image::build_image(&ws.root, &ws.target_dir, &Arch::ALL).map(drop),
        Work::Fuzz => fuzz::run(ws, ready, fuzz::TEST_SECONDS),
    }
}
