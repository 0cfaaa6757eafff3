//! `cargo xtask image`: the lattice-agent OCI image for amd64 and arm64
//! (Graviton), one OCI image index holding both, built with Debian's buildah
//! from deploy/Containerfile (FROM scratch: no registry pull, no Docker
//! engine, nothing run inside the image, so no emulation for the foreign
//! platform) and written to `<target>/image/lattice-agent.oci.tar`.
//!
//! Each image holds two binaries: the agent, `/lattice-agent`, and the
//! chained CNI plugin, `/lattice-cni`, which the node agent copies into the
//! node's CNI bin directory (the container runtime runs it there, on the
//! host, as root).
//!
//! Both are statically linked for `<arch>-unknown-linux-musl` (the Rust
//! targets are added with rustup when missing). C dependencies (ring, used
//! by rustls) need a C compiler for each target: musl-gcc (Debian package
//! musl-tools) for the build machine's own architecture, Debian's cross gcc
//! (`aarch64-linux-gnu-gcc`, package gcc-aarch64-linux-gnu, with the C
//! headers of libc6-dev-arm64-cross) for arm64. That gcc also links: rustc
//! supplies musl's libc and start files for a static musl target, so any gcc
//! for the architecture can drive the link, and ring needs that compiler
//! anyway (rust-lld would link, but not compile ring's C). Should the native
//! musl build be unavailable, the glibc build is used instead, with the
//! shared libraries `ldd` lists copied into the image at their paths.
//!
//! When `cargo auditable` is installed (`cargo xtask setup` does), the
//! binaries carry their dependency list (section `.dep-v0`) for scanners
//! such as Trivy or Grype.
//!
//! Each staged agent gets the file capabilities BPF and NET_ADMIN
//! (`setcap`; buildah's COPY keeps the security.capability xattr in the
//! layer), so the image can run as its non-root USER 101: see
//! deploy/Containerfile. The plugin gets none: it is never executed in the
//! container, and a copy to the host does not keep the xattr anyway.
//!
//! Incremental: cargo rebuilds only what changed, and buildah does not run
//! again while the archive is newer than the staged binaries and the
//! Containerfile and holds the same platforms.
//!
//! The binaries are built with a cargo profile: `release` (fat LTO, what
//! users ship) for `cargo xtask image`, `quick-release` for the image
//! `cargo xtask test` builds and its tests check (same Containerfile, same
//! steps, a fraction of the build time; `lattice_tests::IMAGE_TEST_PROFILE`).
//! Each profile has its own archive.
//!
//! Self-contained (std + anyhow), so tests/tests/image.rs compiles this file
//! too and builds the image the same way.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
};

use anyhow::{Context as _, bail, ensure};

const IMAGE: &str = "lattice-agent";
/// The CNI plugin's package and binary, staged as `/lattice-cni`.
const PLUGIN: &str = "lattice-cni";
const ARCHIVE: &str = "lattice-agent.oci.tar";
/// The image binary's file capabilities: the sidecar's minimal set (see
/// tests/tests/least_privilege.rs), granted at exec to the non-root user.
pub const FILE_CAPS: &str = "cap_bpf,cap_net_admin=ep";
/// The profile of what users ship.
pub const RELEASE_PROFILE: &str = "release";

/// Where the image of `profile` is built: `<target>/image` for the
/// release, `<target>/image/<profile>` for another profile.
pub fn image_dir(target_dir: &Path, profile: &str) -> PathBuf {
    let dir = target_dir.join("image");
    if profile == RELEASE_PROFILE {
        dir
    } else {
        dir.join(profile)
    }
}

/// A platform of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub const ALL: [Self; 2] = [Self::Amd64, Self::Arm64];

    /// The OCI name: `architecture` in the image config and index.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// `variant` in the image config and index: arm64 is ARMv8, written
    /// `v8` as Docker and containerd do; amd64 has none.
    pub fn variant(self) -> Option<&'static str> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some("v8"),
        }
    }

    /// `linux/arm64/v8`, as `--platform` takes it.
    pub fn platform(self) -> String {
        match self.variant() {
            Some(v) => format!("linux/{}/{v}", self.name()),
            None => format!("linux/{}", self.name()),
        }
    }

    /// The kernel's and Rust's name (`uname -m`, `std::env::consts::ARCH`).
    pub fn machine(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64",
            Self::Arm64 => "aarch64",
        }
    }

    /// The Rust target the image's binary is built for.
    pub fn musl_target(self) -> String {
        format!("{}-unknown-linux-musl", self.machine())
    }

    /// Prefix of Debian's binutils and cross gcc for this architecture.
    fn gnu_prefix(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-linux-gnu",
            Self::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// The Debian package with `<prefix>-gcc`.
    fn gcc_package(self) -> &'static str {
        match self {
            Self::Amd64 => "gcc-x86-64-linux-gnu",
            Self::Arm64 => "gcc-aarch64-linux-gnu",
        }
    }

    /// True when this machine runs the architecture's binaries natively.
    pub fn is_native(self) -> bool {
        self.machine() == std::env::consts::ARCH
    }

    /// The qemu-user emulator that runs this architecture's binaries
    /// elsewhere (Debian package qemu-user-static).
    pub fn qemu(self) -> String {
        format!("qemu-{}-static", self.machine())
    }

    /// A command running `binary` of this architecture on this machine:
    /// directly, or under qemu-user (no binfmt_misc registration needed).
    pub fn command(self, binary: &Path) -> Command {
        if self.is_native() {
            Command::new(binary)
        } else {
            let mut cmd = Command::new(self.qemu());
            cmd.arg(binary);
            cmd
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `--arch`: which platforms to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platforms {
    One(Arch),
    All,
}

impl Platforms {
    pub fn arches(self) -> Vec<Arch> {
        match self {
            Self::One(arch) => vec![arch],
            Self::All => Arch::ALL.to_vec(),
        }
    }
}

impl FromStr for Platforms {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            _ => Arch::ALL
                .into_iter()
                .find(|a| a.name() == s)
                .map(Self::One)
                .ok_or_else(|| "expected amd64, arm64 or all".to_owned()),
        }
    }
}

/// Builds (or reuses) the OCI archive holding an image for each of
/// `arches`, its binaries built with the cargo profile `profile`, and
/// returns its path.
pub fn build_image(
    workspace: &Path,
    target_dir: &Path,
    arches: &[Arch],
    profile: &str,
) -> anyhow::Result<PathBuf> {
    ensure!(!arches.is_empty(), "no platform to build");
    let mut tools = vec![
        ("buildah".to_owned(), "buildah"),
        ("setcap".to_owned(), "libcap2-bin"),
        ("getcap".to_owned(), "libcap2-bin"),
    ];
    for &arch in arches {
        tools.push((format!("{}-strip", arch.gnu_prefix()), "binutils"));
        if !arch.is_native() {
            tools.push((arch.qemu(), "qemu-user-static"));
        }
    }
    for (tool, package) in tools {
        ensure!(
            which(&tool).is_some(),
            "`{tool}` not found: install the Debian package {package} (`cargo xtask setup` does)"
        );
    }
    let out_dir = image_dir(target_dir, profile);
    let archive = out_dir.join(ARCHIVE);
    // Which platforms the archive holds, written after it.
    let platforms_stamp = out_dir.join(format!("{ARCHIVE}.platforms"));
    let platforms: String = arches.iter().map(|a| a.platform() + "\n").collect();
    let containerfile = workspace.join("deploy/Containerfile");
    ensure!(
        containerfile.is_file(),
        "{} missing",
        containerfile.display()
    );

    let mut staged = Vec::new();
    for built in build_agents(workspace, target_dir, arches, profile)? {
        // One build context a platform: context/<arch>/rootfs/lattice-agent
        // and rootfs/lattice-cni.
        let context = out_dir.join("context").join(built.arch.name());
        let binary = context.join("rootfs").join(IMAGE);
        let plugin = context.join("rootfs").join(PLUGIN);
        if !is_newer(&binary, &built.binary)
            || !is_newer(&plugin, &built.plugin)
            || !has_file_caps(&binary)
        {
            stage(&built, &context)?;
        }
        eprintln!(
            "image: {} agent: {} bytes stripped, CNI plugin: {} bytes stripped ({})",
            built.arch,
            fs::metadata(&binary)?.len(),
            fs::metadata(&plugin)?.len(),
            built.linkage
        );
        staged.push((built.arch, context, binary, plugin));
    }
    if staged
        .iter()
        .all(|(_, _, binary, plugin)| is_newer(&archive, binary) && is_newer(&archive, plugin))
        && is_newer(&archive, &containerfile)
        && fs::read_to_string(&platforms_stamp).is_ok_and(|p| p == platforms)
    {
        eprintln!("image: {} is up to date", archive.display());
        return Ok(archive);
    }

    // Every binary runs here (the foreign one under qemu-user) and reports
    // the same version, which becomes the tag and label.
    let mut version = None::<String>;
    for (arch, _, binary, _) in &staged {
        let v = agent_version(*arch, binary)?;
        if let Some(first) = &version {
            ensure!(
                *first == v,
                "the {arch} agent reports version {v}, another {first}"
            );
        }
        version = Some(v);
    }
    let version = version.expect("at least one platform");
    let tag = format!("localhost/{IMAGE}:{version}");
    // A private buildah store under target/, removed afterwards: nothing is
    // left in /var/lib/containers, and concurrent builds cannot collide.
    let store = out_dir.join("buildah");
    let _ = fs::remove_dir_all(&store);
    let tmp = out_dir.join(format!("{ARCHIVE}.tmp"));
    // Written again once the new archive is in place.
    let _ = fs::remove_file(&platforms_stamp);
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        cmd
    };
    let result = (|| {
        // Each image is added to the manifest list `tag`, which buildah
        // creates with the first.
        for (arch, context, _, _) in &staged {
            run(&mut buildah(&[
                "build",
                "--isolation",
                "chroot",
                "--pull=never",
                "--layers=false",
                "--platform",
                &arch.platform(),
                "--label",
                &format!("org.opencontainers.image.version={version}"),
                "-f",
                path_str(&containerfile)?,
                "--manifest",
                &tag,
                path_str(context)?,
            ]))?;
        }
        let _ = fs::remove_file(&tmp);
        let dest = format!("oci-archive:{}:{IMAGE}:{version}", path_str(&tmp)?);
        // --all: the images too, not only the index.
        run(&mut buildah(&[
            "manifest", "push", "--all", "--format", "oci", &tag, &dest,
        ]))?;
        fs::rename(&tmp, &archive).with_context(|| format!("writing {}", archive.display()))?;
        fs::write(&platforms_stamp, &platforms)
            .with_context(|| format!("writing {}", platforms_stamp.display()))
    })();
    let _ = buildah(&["rmi", "--all", "--force"]).output();
    let _ = fs::remove_dir_all(&store);
    let _ = fs::remove_file(&tmp);
    result?;
    eprintln!(
        "image: wrote {} ({}); inspect with `skopeo inspect --raw oci-archive:{}`",
        archive.display(),
        platforms.trim().replace('\n', ", "),
        archive.display()
    );
    Ok(archive)
}

#[derive(Clone, Copy, Debug)]
enum Linkage {
    StaticMusl,
    GlibcWithLibraries,
}

impl std::fmt::Display for Linkage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::StaticMusl => "static musl binary",
            Self::GlibcWithLibraries => "glibc binary with its shared libraries",
        })
    }
}

/// The agent and CNI plugin built for one platform.
struct Built {
    arch: Arch,
    binary: PathBuf,
    plugin: PathBuf,
    linkage: Linkage,
}

/// Builds the agent and CNI plugin with `profile` for every arch in one
/// cargo run: static musl where that target can be had, else (native arch
/// only) glibc.
fn build_agents(
    workspace: &Path,
    target_dir: &Path,
    arches: &[Arch],
    profile: &str,
) -> anyhow::Result<Vec<Built>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace);
    without_outer_cargo_vars(&mut cmd);
    if cargo_auditable_available(&cargo) {
        cmd.arg("auditable");
    } else {
        eprintln!(
            "image: `cargo auditable` not found (`cargo xtask setup` installs it); \
             the binaries carry no dependency list"
        );
    }
    cmd.args([
        "build",
        "--profile",
        profile,
        "--package",
        IMAGE,
        "--package",
        PLUGIN,
    ])
    .arg("--target-dir")
    .arg(target_dir);
    let mut built = Vec::new();
    for &arch in arches {
        let (target, linkage) = if musl_target_available(arch)? {
            (arch.musl_target(), Linkage::StaticMusl)
        } else {
            eprintln!(
                "image: cannot build for {}; \
                 falling back to the glibc build plus its shared libraries",
                arch.musl_target()
            );
            (
                format!("{}-unknown-linux-gnu", arch.machine()),
                Linkage::GlibcWithLibraries,
            )
        };
        if !arch.is_native() {
            cross_compile_env(&mut cmd, arch, &target);
        }
        cmd.args(["--target", &target]);
        // cargo names the output directory after the profile.
        let out = target_dir.join(&target).join(profile);
        built.push(Built {
            arch,
            binary: out.join(IMAGE),
            plugin: out.join(PLUGIN),
            linkage,
        });
    }
    // build.rs builds the eBPF object with bpf-linker.
    if let Some(path) = path_with_bpf_linker() {
        cmd.env("PATH", path);
    }
    run(&mut cmd)?;
    Ok(built)
}

/// Drops the variables cargo sets for the program it runs (`cargo xtask`
/// or the image test): build scripts such as ring's rerun when
/// CARGO_PKG_NAME and the like change, and the two would otherwise rebuild
/// each other's agents.
fn without_outer_cargo_vars(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*name,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            cmd.env_remove(&key);
        }
    }
}

/// Debian's cross gcc as the C compiler, archiver and linker for `target`,
/// unless the environment names others.
fn cross_compile_env(cmd: &mut Command, arch: Arch, target: &str) {
    let prefix = arch.gnu_prefix();
    let target_var = target.replace('-', "_");
    for (var, tool) in [
        (
            format!("CARGO_TARGET_{}_LINKER", target_var.to_uppercase()),
            "gcc",
        ),
        (format!("CC_{target_var}"), "gcc"),
        (format!("AR_{target_var}"), "ar"),
    ] {
        if std::env::var_os(&var).is_none() {
            cmd.env(var, format!("{prefix}-{tool}"));
        }
    }
}

/// The musl target needs the Rust target and a C compiler for it (ring has
/// C code): musl-gcc natively (Debian package musl-tools), Debian's cross
/// gcc for another architecture. Only the native build may fall back to
/// glibc; for another architecture a missing piece is an error.
fn musl_target_available(arch: Arch) -> anyhow::Result<bool> {
    let target = arch.musl_target();
    let have_cc = if arch.is_native() {
        let found = which(&format!("{}-linux-musl-gcc", arch.machine())).is_some()
            || which("musl-gcc").is_some();
        if !found {
            eprintln!("image: no musl C compiler (install Debian package musl-tools)");
        }
        found
    } else {
        let gcc = format!("{}-gcc", arch.gnu_prefix());
        ensure!(
            which(&gcc).is_some(),
            "--arch {arch}: `{gcc}` not found: install the Debian package {} \
             (`cargo xtask setup` does)",
            arch.gcc_package()
        );
        true
    };
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == target)
        });
    let have_target = installed
        || Command::new("rustup")
            .args(["target", "add", &target])
            .status()
            .is_ok_and(|s| s.success());
    if !have_target && !arch.is_native() {
        bail!("--arch {arch}: cannot add the Rust target {target} (`rustup target add {target}`)");
    }
    Ok(have_cc && have_target)
}

/// True when cargo has the `auditable` subcommand (cargo finds
/// `cargo-auditable` on PATH or in `$CARGO_HOME/bin`, where setup links it).
fn cargo_auditable_available(cargo: &std::ffi::OsStr) -> bool {
    Command::new(cargo)
        .args(["auditable", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// PATH with the bpf-linker `cargo xtask setup` provides (in
/// `$CARGO_HOME/bin` or cached under `$CARGO_HOME/lattice-tools/*/bin`),
/// when it is not on PATH already.
fn path_with_bpf_linker() -> Option<OsString> {
    if which("bpf-linker").is_some() {
        return None;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(std::env::var_os("HOME")?).join(".cargo")))?;
    let cached = fs::read_dir(cargo_home.join("lattice-tools"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"));
    let bin = std::iter::once(cargo_home.join("bin"))
        .chain(cached)
        .find(|b| b.join("bpf-linker").is_file())?;
    let mut paths = vec![bin];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).ok()
}

/// Fills `context/rootfs` with the stripped agent and plugin (and, for
/// glibc, their libraries).
fn stage(built: &Built, context: &Path) -> anyhow::Result<()> {
    let rootfs = context.join("rootfs");
    let _ = fs::remove_dir_all(context);
    fs::create_dir_all(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let staged = rootfs.join(IMAGE);
    for (binary, name) in [(&built.binary, IMAGE), (&built.plugin, PLUGIN)] {
        let dest = rootfs.join(name);
        fs::copy(binary, &dest)
            .with_context(|| format!("copying {} (was it built?)", binary.display()))?;
        // The release profile keeps debug info (for profiling); the image
        // needs none. The architecture's own strip: binutils' `strip` reads
        // only the build machine's.
        run(Command::new(format!("{}-strip", built.arch.gnu_prefix()))
            .arg("--strip-debug")
            .arg(&dest))?;
    }
    // After strip, which writes a new file without the xattr. Needs
    // CAP_SETFCAP (root), as buildah without a rootless setup does anyway.
    run(Command::new("setcap").arg(FILE_CAPS).arg(&staged))
        .context("setting the image binary's file capabilities (needs root)")?;
    if let Linkage::GlibcWithLibraries = built.linkage {
        let mut libraries = shared_libraries(&built.binary)?;
        libraries.extend(shared_libraries(&built.plugin)?);
        libraries.sort();
        libraries.dedup();
        for lib in libraries {
            let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
            fs::create_dir_all(dest.parent().expect("library path has a parent"))?;
            // Follow symlinks: the image gets the file under the name ldd uses.
            fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    Ok(())
}

/// True when `path` carries exactly [`FILE_CAPS`] (as `getcap` prints them).
fn has_file_caps(path: &Path) -> bool {
    let Ok(out) = Command::new("getcap").arg(path).output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some((_, spec)) = text.trim().rsplit_once(' ') else {
        return false;
    };
    sorted_caps(spec) == sorted_caps(FILE_CAPS)
}

/// "cap_b,cap_a=ep" as (["cap_a", "cap_b"], "ep").
fn sorted_caps(spec: &str) -> (Vec<&str>, &str) {
    let (names, flags) = spec.split_once('=').unwrap_or((spec, ""));
    let mut names: Vec<&str> = names.split(',').collect();
    names.sort_unstable();
    (names, flags)
}

/// Absolute paths `ldd` reports for `binary`, the dynamic loader included.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    ensure!(out.status.success(), "ldd {} failed", binary.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; vdso has no path.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// "0.1.0" from `lattice-agent --version` ("lattice-agent 0.1.0").
fn agent_version(arch: Arch, binary: &Path) -> anyhow::Result<String> {
    let mut cmd = arch.command(binary);
    let out = cmd
        .arg("--version")
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().collect::<Vec<_>>().as_slice() {
        [name, version] if *name == IMAGE => Ok((*version).to_owned()),
        _ => bail!(
            "unexpected `--version` output of the {arch} agent: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// True when both exist and `a` was modified after `b`.
fn is_newer(a: &Path, b: &Path) -> bool {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((mtime(a), mtime(b)), (Some(a), Some(b)) if a > b)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}
