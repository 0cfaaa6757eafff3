//! `cargo xtask image`: the lattice-agent OCI image, built with Debian's
//! buildah from deploy/Containerfile (FROM scratch: no registry pull, no
//! Docker engine), written to `<target>/image/lattice-agent.oci.tar`.
//!
//! The binary is statically linked for `x86_64-unknown-linux-musl` (the
//! target is added with rustup when missing; C dependencies need musl-gcc,
//! Debian package musl-tools). Should either be unavailable, the glibc build
//! is used instead, with the shared libraries `ldd` lists copied into the
//! image at their paths.
//!
//! The staged binary gets the file capabilities BPF and NET_ADMIN (`setcap`;
//! buildah's COPY keeps the security.capability xattr in the layer), so the
//! image can run as its non-root USER 101: see deploy/Containerfile.
//!
//! Incremental: when the archive is newer than the staged binary and the
//! Containerfile, buildah is not run again.
//!
//! Self-contained (std + anyhow), so tests/tests/image.rs compiles this file
//! too and builds the image the same way.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

const MUSL: &str = "x86_64-unknown-linux-musl";
const IMAGE: &str = "lattice-agent";
const ARCHIVE: &str = "lattice-agent.oci.tar";
/// The image binary's file capabilities: the sidecar's minimal set (see
/// tests/tests/least_privilege.rs), granted at exec to the non-root user.
pub const FILE_CAPS: &str = "cap_bpf,cap_net_admin=ep";

/// Builds (or reuses) the OCI archive and returns its path.
pub fn build_image(workspace: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    for (tool, package) in [
        ("buildah", "buildah"),
        ("strip", "binutils"),
        ("setcap", "libcap2-bin"),
        ("getcap", "libcap2-bin"),
    ] {
        ensure!(
            which(tool).is_some(),
            "`{tool}` not found: install the Debian package {package} (`cargo xtask setup` does)"
        );
    }
    let out_dir = target_dir.join("image");
    let context = out_dir.join("context");
    let archive = out_dir.join(ARCHIVE);
    let containerfile = workspace.join("deploy/Containerfile");
    ensure!(
        containerfile.is_file(),
        "{} missing",
        containerfile.display()
    );

    let (binary, linkage) = build_agent(workspace, target_dir)?;
    let staged = context.join("rootfs").join(IMAGE);
    if !is_newer(&staged, &binary) || !has_file_caps(&staged) {
        stage(&binary, linkage, &context)?;
    }
    if is_newer(&archive, &staged) && is_newer(&archive, &containerfile) {
        eprintln!("image: {} is up to date", archive.display());
        return Ok(archive);
    }

    let version = agent_version(&staged)?;
    let tag = format!("localhost/{IMAGE}:{version}");
    // A private buildah store under target/, removed afterwards: nothing is
    // left in /var/lib/containers, and concurrent builds cannot collide.
    let store = out_dir.join("buildah");
    let _ = fs::remove_dir_all(&store);
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
        run(&mut buildah(&[
            "build",
            "--isolation",
            "chroot",
            "--pull=never",
            "--layers=false",
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            "-f",
            path_str(&containerfile)?,
            "-t",
            &tag,
            path_str(&context)?,
        ]))?;
        let tmp = out_dir.join(format!("{ARCHIVE}.tmp"));
        let _ = fs::remove_file(&tmp);
        let dest = format!("oci-archive:{}:{IMAGE}:{version}", path_str(&tmp)?);
        run(&mut buildah(&["push", &tag, &dest]))?;
        fs::rename(&tmp, &archive).with_context(|| format!("writing {}", archive.display()))
    })();
    let _ = Command::new("buildah")
        .arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs", "rmi", "--all", "--force"])
        .output();
    let _ = fs::remove_dir_all(&store);
    result?;
    eprintln!(
        "image: wrote {} ({linkage}); inspect with `skopeo inspect --config oci-archive:{}`",
        archive.display(),
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

/// Builds the release agent: static musl if that target can be had, else glibc.
fn build_agent(workspace: &Path, target_dir: &Path) -> anyhow::Result<(PathBuf, Linkage)> {
    let musl = musl_target_available();
    if !musl {
        eprintln!(
            "image: cannot build for {MUSL}; \
             falling back to the glibc build plus its shared libraries"
        );
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace)
        .args(["build", "--release", "--package", "lattice-agent"])
        .arg("--target-dir")
        .arg(target_dir);
    if musl {
        cmd.args(["--target", MUSL]);
    }
    // build.rs builds the eBPF object with bpf-linker.
    if let Some(path) = path_with_bpf_linker() {
        cmd.env("PATH", path);
    }
    run(&mut cmd)?;
    Ok(if musl {
        (
            target_dir.join(MUSL).join("release").join(IMAGE),
            Linkage::StaticMusl,
        )
    } else {
        (
            target_dir.join("release").join(IMAGE),
            Linkage::GlibcWithLibraries,
        )
    })
}

/// The musl target needs the Rust target and a musl C compiler (ring, used
/// by rustls, has C code; Debian package musl-tools).
fn musl_target_available() -> bool {
    if which("x86_64-linux-musl-gcc").is_none() && which("musl-gcc").is_none() {
        eprintln!("image: no musl C compiler (install Debian package musl-tools)");
        return false;
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == MUSL)
        });
    installed
        || Command::new("rustup")
            .args(["target", "add", MUSL])
            .status()
            .is_ok_and(|s| s.success())
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

/// Fills `context/rootfs` with the stripped binary (and, for glibc, its libraries).
fn stage(binary: &Path, linkage: Linkage, context: &Path) -> anyhow::Result<()> {
    let rootfs = context.join("rootfs");
    let _ = fs::remove_dir_all(context);
    fs::create_dir_all(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let staged = rootfs.join(IMAGE);
    fs::copy(binary, &staged)
        .with_context(|| format!("copying {} (was it built?)", binary.display()))?;
    // The release profile keeps debug info (for profiling); the image needs none.
    run(Command::new("strip").arg("--strip-debug").arg(&staged))?;
    // After strip, which writes a new file without the xattr. Needs
    // CAP_SETFCAP (root), as buildah without a rootless setup does anyway.
    run(Command::new("setcap").arg(FILE_CAPS).arg(&staged))
        .context("setting the image binary's file capabilities (needs root)")?;
    if let Linkage::GlibcWithLibraries = linkage {
        for lib in shared_libraries(binary)? {
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
fn agent_version(binary: &Path) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().collect::<Vec<_>>().as_slice() {
        [name, version] if *name == IMAGE => Ok((*version).to_owned()),
        _ => bail!("unexpected `--version` output: {text:?}"),
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
