//! `cargo xtask <command>`: the project's tasks (the alias is in
//! .cargo/config.toml). Every command first runs `setup`, so one command on
//! a fresh machine is enough.

mod bench;
mod cmd;
mod demo;
mod ebpf;
mod fuzz;
mod image;
mod lint;
mod reliability;
mod setup;
mod test;

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "lattice project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready to build and test: nightly rust-src,
    /// bpf-linker, cargo-auditable, cargo-fuzz, Debian packages, the Python
    /// test venv.
    Setup,
    /// Build only the eBPF object and print its path.
    BuildEbpf {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test: cargo fmt --check, clippy -D warnings, cargo test,
    /// a short run of every fuzz target.
    Test {
        /// Passed to `cargo test` after its own arguments, e.g. a test name
        /// filter, or `-- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the end-to-end demo on this machine.
    Demo,
    /// Run every fuzz target (fuzz/, cargo-fuzz on nightly) for a while,
    /// after replaying the failing inputs kept in fuzz/regressions/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        time: u64,
    },
    /// Build the lattice-agent OCI image (the agent and the CNI plugin; an
    /// index of amd64 and arm64 images) into
    /// <target>/image/lattice-agent.oci.tar.
    Image {
        /// Platforms to build: amd64, arm64 or all.
        #[arg(long, default_value = "all")]
        arch: image::Platforms,
        /// The cargo profile of its binaries: `release` (what users get) or
        /// `quick-release` (the image `cargo xtask test` checks: no fat LTO,
        /// in <target>/image/quick-release/).
        #[arg(long, default_value = image::RELEASE_PROFILE,
              value_parser = [image::RELEASE_PROFILE, lattice_tests::IMAGE_TEST_PROFILE])]
        profile: String,
    },
    /// Print the "Reliability" table from the last `cargo xtask test` run's
    /// records (<target>/reliability/*.json).
    Reliability {
        /// Also write it into README.md between its reliability markers.
        #[arg(long)]
        update_readme: bool,
    },
    /// Benchmark lattice against direct traffic and iptables interception;
    /// writes <target>/bench/report.{md,json,png}. Needs root.
    Bench {
        /// A short run (about 3 minutes) instead of the full one.
        #[arg(long)]
        quick: bool,
        /// Pods served by the node agent in the node-mode scenario.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..=1000))]
        pods: u32,
        /// Also profile the agent under the keep-alive load (perf) and
        /// write <target>/bench/flamegraph.svg.
        #[arg(long)]
        profile: bool,
        /// Run only these scenarios (comma-separated); the default is all.
        /// Targets whose figures were not measured are shown as such.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
        /// Also run the `baseline` scenario: `lattice` with this agent
        /// binary (e.g. built from another commit), for an A/B comparison
        /// within one run.
        #[arg(long, value_name = "PATH")]
        baseline_agent: Option<PathBuf>,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse().command) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> Result<()> {
    let xtask_build = test::xtask_build();
    let ws = Workspace::locate()?;
    let setup = test::Stopwatch::start();
    // The tests' Python venv installs while `cargo xtask test` builds.
    let venv = match task {
        Task::Test { .. } => setup::Venv::Background,
        _ => setup::Venv::Now,
    };
    let ready = setup::run(&ws, venv)?;
    let setup = setup.stop();
    match task {
        Task::Setup => Ok(()),
        Task::BuildEbpf { release } => {
            let object = ebpf::build(&ws, &ready, release)?;
            println!("{}", object.display());
            Ok(())
        }
        Task::Test { args } => test::run(&ws, &ready, xtask_build, setup, &args),
        Task::Demo => demo::run(&ws, &ready),
        Task::Fuzz { time } => fuzz::run(&ws, &ready, time),
        Task::Image { arch, profile } => {
            image::build_image(&ws.root, &ws.target_dir, &arch.arches(), &profile)?;
            Ok(())
        }
        Task::Reliability { update_readme } => {
            reliability::run(&ws.root, &ws.target_dir, update_readme)
        }
        Task::Bench {
            quick,
            pods,
            profile,
            only,
            baseline_agent,
        } => bench::run(
            &ws,
            &ready,
            &bench::Options {
                quick,
                pods,
                profile,
                only,
                baseline_agent,
            },
        ),
    }
}

/// Where things are; computed once so every step agrees.
pub struct Workspace {
    /// The repository root (the workspace Cargo.toml).
    pub root: PathBuf,
    /// cargo's target dir: CARGO_TARGET_DIR if set, else `<root>/target`.
    pub target_dir: PathBuf,
    /// CARGO_HOME, else ~/.cargo: bpf-linker is cached and linked there.
    pub cargo_home: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        // xtask/ sits directly in the workspace root.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let cwd = env::current_dir().context("reading the current directory")?;
        // cargo resolves a relative CARGO_TARGET_DIR against the current dir.
        let target_dir = env::var_os("CARGO_TARGET_DIR")
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| root.join("target"), |dir| cwd.join(dir));
        let cargo_home = match env::var_os("CARGO_HOME").filter(|dir| !dir.is_empty()) {
            Some(dir) => cwd.join(dir),
            None => env::home_dir()
                .context("neither CARGO_HOME nor HOME is set")?
                .join(".cargo"),
        };
        Ok(Self {
            root,
            target_dir,
            cargo_home,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Task};

    /// Everything after the first `--` reaches `cargo test` verbatim,
    /// including a second `--` for the test harness.
    #[test]
    fn test_args_pass_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "filter", "--", "--nocapture"])
            .expect("parses");
        let Task::Test { args } = cli.command else {
            panic!("not the test task");
        };
        assert_eq!(args, ["filter", "--", "--nocapture"]);
    }

    #[test]
    fn image_arch_defaults_to_all_and_rejects_others_by_flag_name() {
        use crate::image::{Arch, Platforms};

        let arch = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["xtask", "image"], args].concat())?;
            let Task::Image { arch, .. } = cli.command else {
                panic!("not the image task");
            };
            Ok::<_, clap::Error>(arch.arches())
        };
        assert_eq!(arch(&[]).unwrap(), Arch::ALL);
        assert_eq!(arch(&["--arch", "arm64"]).unwrap(), [Arch::Arm64]);
        assert_eq!(arch(&["--arch", "amd64"]).unwrap(), [Arch::Amd64]);
        let err = arch(&["--arch", "x86_64"]).unwrap_err().to_string();
        assert!(
            err.contains("--arch") && err.contains("amd64, arm64 or all"),
            "{err}"
        );
        assert_eq!("all".parse::<Platforms>(), Ok(Platforms::All));
    }
}
