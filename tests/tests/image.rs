//! The OCI image (`cargo xtask image`): built once with buildah (reused while
//! newer than the agent binary), its config names the entrypoint and the
//! non-root user 101, its only file is the agent carrying the file
//! capabilities BPF and NET_ADMIN, the unpacked root filesystem runs
//! `lattice-agent --version` under chroot, and the unpacked binary started
//! the way containerd starts deploy/sidecar (UID 101, no_new_privs, bounding
//! set BPF + NET_ADMIN) attaches and serves /readyz.
//!
//! Needs root (chroot, setcap; buildah without a rootless setup) and buildah,
//! skopeo, tar, getcap (Debian packages, installed by `cargo xtask setup`).
//! The first run builds the static release agent: about 3 minutes on 2
//! cores (cached afterwards: the test then takes a few seconds).

#[path = "../../xtask/src/image.rs"]
mod image;
mod sidecar_support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lattice_tests::{Agent, Pod, require_root, target_dir, unique_name, workspace};
use sidecar_support::{
    INTERCEPTOR, SIDECAR_CAPS, SIDECAR_UID, assert_unprivileged, attach_types, container_start,
    file_caps, proxy_env, require_tool, wait_http_ok,
};

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
        ("getcap", "libcap2-bin"),
        ("setpriv", "util-linux"),
        ("curl", "curl"),
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
        r#""User":"101:101""#,
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
        // With the file capabilities, as containerd unpacks layers.
        output(
            Command::new("tar")
                .args(["--xattrs", "--xattrs-include=security.capability"])
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
    assert!(help.contains("sidecar"), "{help}");

    // The binary carries exactly the sidecar's capability set, and with it
    // the image's non-root start works: attach, drop, serve.
    let agent_file = rootfs.join("lattice-agent");
    let mut want: Vec<String> = SIDECAR_CAPS.iter().map(|c| (*c).to_owned()).collect();
    want.sort();
    assert_eq!(
        file_caps(&agent_file),
        Some((want, "ep".to_owned())),
        "file capabilities of the image's /lattice-agent"
    );
    let pod = Pod::new();
    let start = pod
        .command("env")
        .in_cgroup(false)
        .arg("-i")
        .args(proxy_env(true))
        .args(container_start(SIDECAR_UID, &SIDECAR_CAPS))
        .arg(&agent_file)
        .arg("run")
        .arg("--cgroup")
        .arg(pod.cgroup_path());
    let mut agent = Agent::spawn(&start);
    assert_eq!(
        attach_types(pod.cgroup_path()),
        INTERCEPTOR,
        "{}",
        agent.log()
    );
    assert_unprivileged(agent.pid(), SIDECAR_UID, &agent.log());
    let ready = wait_http_ok(
        || pod.command("curl").in_cgroup(false).build(),
        "http://127.0.0.1:15090/readyz",
        Duration::from_secs(10),
    );
    assert_eq!(ready.trim(), "ready");
    agent.stop();
}
