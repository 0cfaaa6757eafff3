//! The OCI image (`cargo xtask image`): built once with buildah (reused while
//! newer than the agent binary), its config names the entrypoint, and the
//! unpacked root filesystem runs `lattice-agent --version` under chroot.
//!
//! Needs root (chroot; buildah without a rootless setup) and buildah, skopeo,
//! tar (Debian packages, installed by `cargo xtask setup`). The first run
//! builds the static release agent: several minutes.

#[path = "../../xtask/src/image.rs"]
mod image;
mod sidecar_support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use lattice_tests::{require_root, unique_name};
use sidecar_support::require_tool;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// A scratch directory, removed on drop (also on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("{}-image", unique_name()));
        fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every regular file under `dir`, relative to it.
fn files(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read rootfs").flatten() {
        let path = entry.path();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            files(&path, base, out);
        } else {
            out.push(path.strip_prefix(base).unwrap().to_owned());
        }
    }
}

#[test]
fn image_unpacks_and_runs_the_agent_under_chroot() {
    if !require_root("image_unpacks_and_runs_the_agent_under_chroot") {
        return;
    }
    for (tool, package) in [
        ("buildah", "buildah"),
        ("skopeo", "skopeo"),
        ("tar", "tar"),
        ("chroot", "coreutils"),
        ("strip", "binutils"),
    ] {
        require_tool(tool, package);
    }

    let archive = image::build_image(&workspace(), &target_dir()).expect("cargo xtask image");
    assert!(
        archive.ends_with("image/lattice-agent.oci.tar"),
        "{}",
        archive.display()
    );
    let transport = format!("oci-archive:{}", archive.display());

    // The config: entrypoint, default command, starting user.
    let config: String = output(Command::new("skopeo").args(["inspect", "--config", &transport]))
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    for wanted in [
        r#""Entrypoint":["/lattice-agent"]"#,
        r#""Cmd":["sidecar"]"#,
        r#""User":"0:0""#,
    ] {
        assert!(
            config.contains(wanted),
            "{wanted} not in image config: {config}"
        );
    }
    let info = output(Command::new("skopeo").args(["inspect", &transport]));
    assert!(
        info.contains(&format!(
            r#""org.opencontainers.image.version": "{}""#,
            env!("CARGO_PKG_VERSION")
        )),
        "version label missing: {info}"
    );

    // Unpack: the OCI layout, then each layer in order onto one rootfs.
    let tmp = TempDir::new();
    let layout = tmp.0.join("oci");
    let rootfs = tmp.0.join("rootfs");
    fs::create_dir_all(&layout).unwrap();
    fs::create_dir_all(&rootfs).unwrap();
    output(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    );
    let layers = output(Command::new("skopeo").args([
        "inspect",
        "--format",
        "{{range .Layers}}{{println .}}{{end}}",
        &transport,
    ]));
    let layers: Vec<&str> = layers.lines().filter(|l| !l.is_empty()).collect();
    assert!(!layers.is_empty(), "image has no layers");
    for digest in layers {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let blob = layout.join("blobs/sha256").join(hex);
        output(
            Command::new("tar")
                .arg("-xf")
                .arg(&blob)
                .arg("-C")
                .arg(&rootfs),
        );
    }

    // Nothing but the agent (and, for a glibc fallback build, its libraries).
    let mut content = Vec::new();
    files(&rootfs, &rootfs, &mut content);
    assert!(
        content.contains(&PathBuf::from("lattice-agent")),
        "{content:?}"
    );
    for file in &content {
        let name = file.to_string_lossy();
        assert!(
            name == "lattice-agent" || name.contains(".so"),
            "unexpected file in the image: {name}"
        );
    }

    // The entrypoint runs in that root filesystem alone.
    let version = output(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/lattice-agent", "--version"]),
    );
    assert_eq!(
        version.trim(),
        format!("lattice-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let help = output(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/lattice-agent", "--help"]),
    );
    assert!(help.contains("run"), "{help}");
}
