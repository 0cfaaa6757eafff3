//! `cargo xtask test`: every check CI runs, in order. All steps run even
//! after a failure (a formatting slip should not hide a failing test), and
//! the summary names each step that failed and what each stage cost.
//!
//! Nothing is built twice: `build` compiles every target with the feature
//! set `cargo test` uses (`--all-targets`: dev-dependencies on), so `test`
//! only runs them; xtask's own tests build with xtask's feature set
//! (`xtask lint`), reusing what `cargo xtask` compiled to start; the image
//! the tests check is built with the quick-release profile (see
//! Cargo.toml).
//!
//! Clippy lints in the same pass: the workspace's own crates are compiled
//! by `clippy-driver` (cargo's `RUSTC_WORKSPACE_WRAPPER`, as `cargo clippy`
//! does it), which compiles as rustc does and lints on the way, so the
//! dependencies are compiled once rather than once more for
//! `cargo clippy`'s check. Every step runs with the same wrapper, so
//! `cargo test` reuses the build. A lint warning fails the step once the
//! build is done: it does not keep the tests from running.

use std::{
    fmt, fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lattice_tests::IMAGE_TEST_PROFILE;
use nix::sys::resource::{UsageWho, getrusage};

use crate::{
    Workspace, cmd, fuzz,
    image::{self, Arch},
    lint, reliability,
    setup::Ready,
};

/// On the host the eBPF crate fails with "duplicate lang item"; it is
/// checked by the nested bpfel build in lattice-agent's build.rs instead.
/// xtask is built and tested on its own (`test xtask`), with the features
/// `cargo xtask` built it with.
const WORKSPACE_EXCLUDE: [&str; 4] = ["--exclude", "lattice-ebpf", "--exclude", "xtask"];

struct Step {
    name: &'static str,
    work: Work,
}

enum Work {
    /// A cargo invocation with these arguments.
    Cargo(Vec<String>),
    /// A cargo build with these arguments whose lint warnings fail the step
    /// (after the build: see the module's comment).
    LintedBuild(Vec<String>),
    /// The agents and the OCI image with the quick-release profile (`cargo
    /// xtask image --profile quick-release`): the image tests check them,
    /// and the timed node-mode tests run the image's static agent.
    Image,
    /// Every fuzz target for a few seconds, after replaying the inputs
    /// kept in fuzz/regressions/ (`cargo xtask fuzz`).
    Fuzz,
}

/// Runs every step; `xtask_build` and `setup` are what came before (see
/// [`xtask_build`]).
pub fn run(
    ws: &Workspace,
    ready: &Ready,
    xtask_build: Option<Timing>,
    setup: Timing,
    test_args: &[String],
) -> Result<()> {
    let mut times = Vec::new();
    if let Some(build) = xtask_build {
        times.push(("xtask build", build));
    }
    times.push(("setup", setup));
    for (name, took) in &times {
        eprintln!("==> {name} took {took}");
    }
    let mut failed = Vec::new();
    for step in steps(test_args) {
        eprintln!("==> {}", step.name);
        let clock = Stopwatch::start();
        let result = if step.name == "test" {
            reliability::clear(&ws.target_dir)?;
            ready
                .wait_for_venv()
                .and_then(|()| run_step(ws, ready, &step))
        } else {
            run_step(ws, ready, &step)
        };
        if let Err(err) = result {
            eprintln!("==> {} FAILED: {err:#}", step.name);
            failed.push(step.name);
        }
        let took = clock.stop();
        eprintln!("==> {} took {}", step.name, took);
        times.push((step.name, took));
    }
    // The lifecycle tests' figures, failing runs included (each test
    // writes its record before its assertions).
    match reliability::table(&ws.target_dir) {
        Ok(table) => eprintln!("==> reliability (README \"Reliability\")\n{table}"),
        Err(err) => eprintln!("==> no reliability table: {err:#}"),
    }
    eprintln!("{}", stage_table(&times));
    if !failed.is_empty() {
        bail!("failed step(s): {}", failed.join(", "));
    }
    eprintln!("==> all steps passed");
    Ok(())
}

fn steps(test_args: &[String]) -> Vec<Step> {
    let strings = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    // The integration tests run the agent and test binaries from target/;
    // build them explicitly rather than rely on what `cargo test` builds:
    // every target (clippy's `--all-targets`), with the feature set of
    // `cargo test` (dev-dependencies on), so `test` reuses all of it.
    let mut build = strings(&["build", "--workspace", "--all-targets"]);
    build.extend(strings(&WORKSPACE_EXCLUDE));
    let mut test = strings(&["test", "--workspace", "--no-fail-fast"]);
    test.extend(strings(&WORKSPACE_EXCLUDE));
    test.extend(test_args.iter().cloned());
    let xtask_build = strings(&["test", "--package", "xtask", "--no-run"]);
    let mut test_xtask = strings(&["test", "--package", "xtask"]);
    test_xtask.extend(test_args.iter().cloned());
    vec![
        Step {
            name: "fmt",
            work: Work::Cargo(strings(&["fmt", "--all", "--check"])),
        },
        Step {
            name: "build",
            work: Work::LintedBuild(build),
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
            name: "xtask lint",
            work: Work::LintedBuild(xtask_build),
        },
        Step {
            name: "test xtask",
            work: Work::Cargo(test_xtask),
        },
        Step {
            name: "fuzz",
            work: Work::Fuzz,
        },
    ]
}

/// One step: a cargo invocation from the workspace root, with bpf-linker
/// on PATH (lattice-agent's build.rs needs it), the venv for the test
/// servers and clippy as the workspace's compiler; or the image build; or
/// the fuzz targets.
fn run_step(ws: &Workspace, ready: &Ready, step: &Step) -> Result<()> {
    let cargo = |args: &[String]| -> Result<Command> {
        let mut cargo = Command::new("cargo");
        cmd::without_cargo_run_env(&mut cargo)
            .current_dir(&ws.root)
            .args(args);
        ready.apply(&mut cargo)?;
        lint::apply(&mut cargo, &ws.root)?;
        Ok(cargo)
    };
    match &step.work {
        Work::Cargo(args) => cmd::run(&mut cargo(args)?),
        Work::LintedBuild(args) => lint::build(&mut cargo(args)?),
        Work::Image => {
            image::build_image(&ws.root, &ws.target_dir, &Arch::ALL, IMAGE_TEST_PROFILE).map(drop)
        }
        Work::Fuzz => fuzz::run(ws, ready, fuzz::TEST_SECONDS),
    }
}

/// What a stage cost: wall-clock time, and the CPU time (user + system) of
/// the processes it ran (cargo, rustc, the linker, the tests...), which
/// other work on a shared machine does not inflate.
#[derive(Clone, Copy, Default)]
pub struct Timing {
    wall: Duration,
    cpu: Duration,
}

/// Measures one stage: wall time, and the CPU time of the child processes
/// reaped meanwhile (each waits for its own children, so rustc and the
/// linker under cargo count too).
pub struct Stopwatch {
    started: Instant,
    cpu: Duration,
}

impl Stopwatch {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu: children_cpu(),
        }
    }

    pub fn stop(self) -> Timing {
        Timing {
            wall: self.started.elapsed(),
            cpu: children_cpu().saturating_sub(self.cpu),
        }
    }
}

/// User + system time of every reaped child process so far.
fn children_cpu() -> Duration {
    let Ok(usage) = getrusage(UsageWho::RUSAGE_CHILDREN) else {
        return Duration::ZERO;
    };
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

/// What `cargo xtask` spent before xtask's main (compiling xtask, on a
/// fresh clone). cargo runs xtask by exec, so this process started as that
/// cargo: its age, and its CPU time with that of the compilers it reaped.
/// Call first thing, before xtask starts children of its own.
pub fn xtask_build() -> Option<Timing> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()??
        .max(1) as f64;
    let stat = stat_fields(Path::new("/proc/self/stat"))?;
    // Fields counted from 1 as in proc(5): utime 14, stime 15, cutime 16,
    // cstime 17, starttime 22 (clock ticks after boot).
    let field = |n: usize| stat.get(n - 3)?.parse::<u64>().ok();
    let cpu_ticks = [14, 15, 16, 17]
        .into_iter()
        .map(field)
        .sum::<Option<u64>>()?;
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let age = (uptime - field(22)? as f64 / ticks).max(0.0);
    Some(Timing {
        wall: Duration::from_secs_f64(age),
        cpu: Duration::from_secs_f64(cpu_ticks as f64 / ticks),
    })
}

/// The fields of a /proc/PID/stat file after the command name (which may
/// hold spaces): the first is field 3, the state.
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let stat = fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} wall, {} CPU",
            Minutes(self.wall).to_string().trim_start(),
            Minutes(self.cpu).to_string().trim_start()
        )
    }
}

struct Minutes(Duration);

impl fmt::Display for Minutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        write!(f, "{:>3}m {:02}s", secs / 60, secs % 60)
    }
}

/// The per-stage summary printed at the end.
fn stage_table(times: &[(&str, Timing)]) -> String {
    let total = times.iter().fold(Timing::default(), |sum, (_, t)| Timing {
        wall: sum.wall + t.wall,
        cpu: sum.cpu + t.cpu,
    });
    let mut out = String::from(
        "==> time per stage (CPU: user + system time of the processes the stage ran)\n\
         \x20   stage          wall       CPU\n",
    );
    for (name, t) in times.iter().chain([&("total", total)]) {
        out.push_str(&format!(
            "    {name:<12} {}  {}\n",
            Minutes(t.wall),
            Minutes(t.cpu)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_table_lists_each_stage_and_the_total() {
        let t = |wall, cpu| Timing {
            wall: Duration::from_secs(wall),
            cpu: Duration::from_secs(cpu),
        };
        let table = stage_table(&[("setup", t(5, 1)), ("build", t(125, 230))]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[2], "    setup          0m 05s    0m 01s");
        assert_eq!(lines[3], "    build          2m 05s    3m 50s");
        assert_eq!(lines[4], "    total          2m 10s    3m 51s");
        assert_eq!(t(125, 230).to_string(), "2m 05s wall, 3m 50s CPU");
    }

    #[test]
    fn children_cpu_counts_reaped_children() {
        let clock = Stopwatch::start();
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh");
        assert!(status.success());
        let t = clock.stop();
        assert!(t.cpu > Duration::ZERO, "no CPU time counted");
        assert!(t.cpu <= t.wall + Duration::from_millis(20), "{:?}", t.cpu);
    }
}
