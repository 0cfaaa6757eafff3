//! `cargo xtask setup`: installs what building and testing need, and only
//! what is missing, so that it costs well under a second on a ready machine
//! and every other command can run it first.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{Workspace, cmd};

/// Debian packages the tests, the demo and `cargo xtask image` use.
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",      // inspecting programs and links in tests
    "iproute2",     // `ip netns`, addresses on a namespace's lo
    "util-linux",   // nsenter, setpriv, mount
    "curl",         // the demo's client
    "openssl",      // tests: an app's own TLS (s_client) to a TLS server (s_server)
    "nginx-light",  // an upstream HTTP server for the demo
    "wrk",          // load generator
    "python3-venv", // the Python test venv (pyenv's python may lack it)
    "buildah",      // `cargo xtask image`: builds OCI images without a daemon
    "skopeo",       // inspecting the OCI archive in tests
    "binutils",     // strip, for the image
    "musl-tools",   // a static agent binary for the image
    // The image's arm64 agent: C compiler and linker for aarch64, the C
    // headers ring's C code includes, qemu-aarch64-static to run the binary.
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    // `cargo xtask bench`: the iptables setup's NAT rules as a baseline; the chart's font
    "iptables",
    "fonts-dejavu-core",
    // the node fixture's pod network: CNI bridge, host-local, loopback
    "containernetworking-plugins",
    // `cargo xtask bench --profile`: perf record / perf script
    "linux-perf",
];

const REQUIREMENTS: &str = "tests/requirements.txt";

/// What setup provides to the commands that follow it.
pub struct Ready {
    /// The Python venv with tests/requirements.txt installed (see
    /// [`Ready::wait_for_venv`]).
    pub venv: PathBuf,
    /// `$CARGO_HOME/bin`, where bpf-linker is linked.
    pub cargo_bin: PathBuf,
    /// The venv's installation, when it runs beside what follows setup.
    venv_job: std::sync::Mutex<Option<std::thread::JoinHandle<Result<bool>>>>,
}

/// When setup installs the Python venv.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Venv {
    /// Before setup returns.
    Now,
    /// Beside what follows (`cargo xtask test` builds for minutes before
    /// a test runs Python): [`Ready::wait_for_venv`] before using it.
    Background,
}

impl Ready {
    /// Waits for a venv installed in the background (at once otherwise).
    pub fn wait_for_venv(&self) -> Result<()> {
        let job = self
            .venv_job
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match job {
            Some(job) => match job.join() {
                Ok(result) => result.map(drop).context("installing the Python test venv"),
                Err(_) => bail!("installing the Python test venv panicked"),
            },
            None => Ok(()),
        }
    }

    /// PATH with `$CARGO_HOME/bin` first, so nested builds find bpf-linker
    /// even when the user's PATH lacks it.
    pub fn path(&self) -> Result<OsString> {
        let current = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.cargo_bin.clone()).chain(env::split_paths(&current));
        env::join_paths(dirs).context("PATH contains a directory with ':' in its name")
    }

    /// Puts PATH and LATTICE_TEST_VENV into `cmd`'s environment.
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        cmd.env("PATH", self.path()?)
            .env("LATTICE_TEST_VENV", &self.venv);
        Ok(())
    }
}

pub fn run(ws: &Workspace, when: Venv) -> Result<Ready> {
    let mut changed = debian_packages()?;
    changed |= nightly_rust_src()?;
    changed |= bpf_linker(ws)?;
    changed |= cargo_auditable(ws)?;
    changed |= cargo_fuzz(ws)?;
    let venv = ws.target_dir.join("venv");
    let requirements = ws.root.join(REQUIREMENTS);
    let venv_job = match when {
        Venv::Now => {
            changed |= python_venv(&requirements, &venv)?;
            None
        }
        Venv::Background => {
            let venv = venv.clone();
            Some(std::thread::spawn(move || {
                python_venv(&requirements, &venv)
            }))
        }
    };
    if changed {
        eprintln!("setup: ready");
    }
    Ok(Ready {
        venv,
        cargo_bin: ws.cargo_home.join("bin"),
        venv_job: std::sync::Mutex::new(venv_job),
    })
}

// ---------------------------------------------------------------- Debian

/// Installs the missing Debian packages; true if it installed any.
fn debian_packages() -> Result<bool> {
    let missing = missing_packages(DEBIAN_PACKAGES)?;
    if missing.is_empty() {
        return Ok(false);
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing Debian packages: {list}\n\
             install them as root, then run this again:\n  \
             sudo apt-get update && sudo apt-get install -y --no-install-recommends {list}"
        );
    }
    eprintln!("setup: installing Debian packages: {list}");
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    Ok(true)
}

/// The packages of `wanted` dpkg does not report as installed (one dpkg-query
/// for all: it is the slow part of a ready machine's setup).
fn missing_packages<'a>(wanted: &[&'a str]) -> Result<Vec<&'a str>> {
    // dpkg-query exits 1 when some package is unknown, yet lists the others.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(wanted)
        .output()
        .context(
            "setup installs system packages with apt and needs dpkg-query \
             (Debian or Ubuntu); on another system install the equivalents of: "
                .to_owned()
                + &wanted.join(" "),
        )?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Ok(wanted
        .iter()
        .copied()
        .filter(|pkg| !installed.contains(pkg))
        .collect())
}

/// Effective UID 0: /proc/self belongs to the process's effective UID,
/// which saves a libc dependency for one check.
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

// ---------------------------------------------------------------- nightly

/// Adds rust-src to the nightly toolchain (build-std needs it); true if it did.
fn nightly_rust_src() -> Result<bool> {
    let toolchains = cmd::read(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain: see https://rustup.rs")?;
    // Checked here rather than left to rustup, which may install a toolchain
    // on its own (RUSTUP_AUTO_INSTALL) or fail with a less direct message.
    if !toolchains.lines().any(is_nightly_channel) {
        bail!(
            "no nightly Rust toolchain (the eBPF crate needs it): \
             run `rustup toolchain install nightly`"
        );
    }
    let installed = cmd::read(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        return Ok(false);
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok(true)
}

/// `nightly-x86_64-unknown-linux-gnu (…)`, the toolchain `+nightly` names;
/// a dated `nightly-2026-01-01-…` is not it.
fn is_nightly_channel(line: &str) -> bool {
    line.strip_prefix("nightly-")
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

// ------------------------------------------------------------- bpf-linker

/// Makes sure `$CARGO_HOME/bin/bpf-linker` is a bpf-linker built against the
/// nightly toolchain's own LLVM; true if it built or relinked one.
///
/// bpf-linker must use the same LLVM as the rustc that emits the bitcode,
/// and no distribution ships that exact LLVM, so it is linked against the
/// libLLVM inside the nightly sysroot. One build per libLLVM, cached under
/// `$CARGO_HOME/lattice-tools/<libLLVM file name>/`: a new nightly with
/// another LLVM gets its own build, and the old one stays usable.
fn bpf_linker(ws: &Workspace) -> Result<bool> {
    let libllvm = nightly_libllvm()?;
    let lib_name = file_name(&libllvm)?;
    let major = llvm_major(lib_name)
        .with_context(|| format!("cannot read the LLVM major version from {lib_name}"))?;
    let cache = ws.cargo_home.join("lattice-tools").join(lib_name);
    let built = cache.join("bin/bpf-linker");
    let stamp = cache.join("lattice-stamp");
    let stamp_text = format!(
        "bpf-linker --features llvm-{major} against {}\n",
        libllvm.display()
    );

    let fresh = fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text)
        && cmd::succeeds(Command::new(&built).arg("--version"));
    if !fresh {
        build_bpf_linker(&cache, &libllvm, major)?;
        fs::write(&stamp, stamp_text).with_context(|| format!("writing {}", stamp.display()))?;
    }
    let relinked = link(&built, &ws.cargo_home.join("bin/bpf-linker"))?;
    Ok(!fresh || relinked)
}

/// The nightly sysroot's `libLLVM.so.*` (older toolchains: `libLLVM-NN*.so`).
fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot =
        cmd::read(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let names: Vec<String> = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    let pick = |prefix: &str| names.iter().find(|n| n.starts_with(prefix));
    let name = pick("libLLVM.so.")
        .or_else(|| pick("libLLVM-"))
        .with_context(|| {
            format!(
                "no libLLVM in {}: the nightly toolchain looks incomplete; \
             try `rustup toolchain install --force nightly`",
                lib_dir.display()
            )
        })?;
    Ok(lib_dir.join(name))
}

/// 22 from `libLLVM.so.22.1-rust-1.97.0-nightly` or `libLLVM-22-rust-….so`.
fn llvm_major(lib_name: &str) -> Option<u32> {
    let rest = lib_name
        .strip_prefix("libLLVM.so.")
        .or_else(|| lib_name.strip_prefix("libLLVM-"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `cargo install bpf-linker` into `cache`, against `libllvm`.
fn build_bpf_linker(cache: &Path, libllvm: &Path, major: u32) -> Result<()> {
    eprintln!(
        "setup: building bpf-linker against {} (about a minute)",
        libllvm.display()
    );
    // bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`; the second
    // link, under the library's own name (its SONAME), is what the binary
    // loads at run time through its RUNPATH into this directory.
    let lib_dir = cache.join("rust-llvm/lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    link(libllvm, &lib_dir.join("libLLVM.so"))?;
    link(libllvm, &lib_dir.join(file_name(libllvm)?))?;

    let mut install = Command::new("cargo");
    // From the cache dir, not the workspace: our rust-version, lockfile and
    // .cargo/config.toml must not apply to a tool install. --force: a
    // half-finished earlier attempt may be recorded as installed.
    cmd::without_cargo_env(&mut install)
        .current_dir(cache)
        .env("LLVM_PREFIX", cache.join("rust-llvm"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(cache);
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker failed; if cargo says it has no feature `llvm-{major}`, \
             this nightly's LLVM is newer than bpf-linker supports: install an older \
             nightly (`rustup toolchain install nightly-YYYY-MM-DD`) and make it `nightly`"
        )
    })
}

// -------------------------------------------------------- cargo-auditable

/// The cargo-auditable release `cargo xtask image` embeds dependency lists
/// with; pinned, so every machine writes the same format.
const CARGO_AUDITABLE: &str = "0.7.7";

/// Makes sure `$CARGO_HOME/bin/cargo-auditable` is [`CARGO_AUDITABLE`];
/// true if it built or relinked it.
fn cargo_auditable(ws: &Workspace) -> Result<bool> {
    cargo_tool(ws, "cargo-auditable", CARGO_AUDITABLE, "about a minute")
}

// -------------------------------------------------------------- cargo-fuzz

/// The cargo-fuzz release `cargo xtask fuzz` drives; pinned like
/// cargo-auditable.
const CARGO_FUZZ: &str = "0.13.2";

/// Makes sure `$CARGO_HOME/bin/cargo-fuzz` is [`CARGO_FUZZ`]; true if it
/// built or relinked it.
fn cargo_fuzz(ws: &Workspace) -> Result<bool> {
    cargo_tool(ws, "cargo-fuzz", CARGO_FUZZ, "about two minutes")
}

/// Makes sure `$CARGO_HOME/bin/<name>` is that crate's `version`, built
/// once into `$CARGO_HOME/lattice-tools/<name>-<version>/`; true if it
/// built or relinked it.
fn cargo_tool(ws: &Workspace, name: &str, version: &str, takes: &str) -> Result<bool> {
    let cache = ws
        .cargo_home
        .join("lattice-tools")
        .join(format!("{name}-{version}"));
    let built = cache.join("bin").join(name);
    // cargo install writes the binary last: present means complete.
    let fresh = built.is_file();
    if !fresh {
        eprintln!("setup: building {name} {version} ({takes})");
        let mut install = Command::new("cargo");
        // From the cache dir, as for bpf-linker: the workspace's settings
        // must not apply to a tool install.
        fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        cmd::without_cargo_env(&mut install)
            .current_dir(&cache)
            .args(["install", name, "--locked", "--force"])
            .args(["--version", &format!("={version}")])
            .arg("--root")
            .arg(&cache);
        cmd::run(&mut install)?;
    }
    let relinked = link(&built, &ws.cargo_home.join("bin").join(name))?;
    Ok(!fresh || relinked)
}

/// Makes `link` a symlink to `target`; true if it had to change it.
/// Replaced through a rename, so a concurrent build never sees it missing.
fn link(target: &Path, link: &Path) -> Result<bool> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(false);
    }
    let dir = link.parent().context("link path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.lattice-tmp", file_name(link)?));
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))?;
    eprintln!("setup: {} -> {}", link.display(), target.display());
    Ok(true)
}

fn file_name(path: &Path) -> Result<&str> {
    path.file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("no UTF-8 file name in {}", path.display()))
}

// ----------------------------------------------------------------- Python

/// Creates or updates the test venv; true if it did anything. pip runs only
/// when requirements.txt differs from the copy kept in the venv (a copy
/// rather than a hash: exact, and no hashing dependency).
fn python_venv(requirements: &Path, venv: &Path) -> Result<bool> {
    let wanted = fs::read_to_string(requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let python = venv.join("bin/python");
    let stamp = venv.join("lattice-requirements.txt");
    // exists() follows the symlink: false too when the base python is gone.
    let have_python = python.exists();
    if have_python && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(false);
    }
    if !have_python {
        create_venv(venv)?;
    }
    cmd::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(requirements),
    )?;
    fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(true)
}

/// `python3 -m venv`, else Debian's /usr/bin/python3 (python3 on PATH may be
/// a pyenv or other build without the venv/ensurepip modules).
fn create_venv(venv: &Path) -> Result<()> {
    let mut last_error = None;
    for python in ["python3", "/usr/bin/python3"] {
        let mut create = Command::new(python);
        create.args(["-m", "venv", "--clear"]).arg(venv);
        match cmd::run(&mut create) {
            Ok(()) => return Ok(()),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.expect("tried at least one python")).context(
        "could not create the Python venv: install python3 with the venv module \
         (Debian package python3-venv)",
    )
}

#[cfg(test)]
mod tests {
    use super::{is_nightly_channel, llvm_major, missing_packages};

    #[test]
    fn nightly_channel_but_not_a_dated_nightly() {
        assert!(is_nightly_channel("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_nightly_channel(
            "nightly-aarch64-unknown-linux-gnu (active)"
        ));
        assert!(!is_nightly_channel(
            "nightly-2026-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_nightly_channel(
            "stable-x86_64-unknown-linux-gnu (default)"
        ));
    }

    #[test]
    fn llvm_major_from_both_library_names() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM-19-rust-1.84.0-nightly.so"), Some(19));
        assert_eq!(llvm_major("libLLVM.so"), None);
        assert_eq!(llvm_major("librustc_driver.so"), None);
    }

    /// dpkg-query lists known packages even when another is unknown.
    #[test]
    fn missing_packages_reports_only_the_missing() {
        if !std::path::Path::new("/usr/bin/dpkg-query").exists() {
            eprintln!("skipped: not a Debian system");
            return;
        }
        let missing = missing_packages(&["dpkg", "lattice-no-such-package"]).unwrap();
        assert_eq!(missing, ["lattice-no-such-package"]);
    }
}
