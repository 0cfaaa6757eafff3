//! The OCI image (`cargo xtask image`, its binaries built with the
//! `quick-release` profile: the same Containerfile and steps as the image
//! users get, without the release profile's fat LTO), built once for all
//! tests of this file with buildah (reused while newer than the agent
//! binaries): an OCI
//! index of an amd64 and an arm64 (v8) image, each config naming its
//! platform, the entrypoint and the non-root user 101, each image holding
//! only the agent, carrying the file capabilities BPF and NET_ADMIN, and
//! the CNI plugin `/lattice-cni`, carrying none; both with their
//! dependency list (`cargo auditable`).
//!
//! amd64: the unpacked root filesystem runs `lattice-agent --version` and
//! `self-check` and the plugin's CNI VERSION command under chroot, and the
//! unpacked binary started the way containerd starts deploy/sidecar (UID
//! 101, no_new_privs, bounding set BPF + NET_ADMIN) attaches and serves
//! /readyz.
//! arm64: the unpacked binaries are AArch64 executables and, under Debian's
//! qemu-user-static in a chroot of their root filesystem, the agent prints
//! its version and passes `self-check` (SigV4 and TLS crypto known answers,
//! the eBPF object) as the aarch64 machine it was built for, and the plugin
//! answers VERSION.
//!
//! Needs root (chroot, setcap; buildah without a rootless setup) and
//! buildah, skopeo, tar, getcap, qemu-aarch64-static (Debian packages,
//! installed by `cargo xtask setup`). The first run builds the static
//! agent for both architectures (`cargo xtask test` does so in its image
//! step; cached afterwards: the tests then take seconds).

#[path = "../../xtask/src/image.rs"]
#[allow(dead_code)] // --arch parsing: xtask's, tested there
mod image;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use image::Arch;
use lattice_tests::{
    Agent, IMAGE_TEST_PROFILE, Pod, TempDir,
    bpftool::{INTERCEPTOR, attach_types},
    probe::wait_http_ok,
    require_root, require_tool,
    sidecar::{
        SIDECAR_CAPS, SIDECAR_UID, assert_unprivileged, container_start, file_caps, proxy_env,
    },
    spawn::{copy_program, run_ok},
    target_dir, workspace,
};

/// True when the test may run (root; else skipped loudly, see
/// `require_root`); fails (never skips) when a tool is missing.
fn ready(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    require_tools();
    true
}

/// The tools every test here needs; fails (never skips) when one is missing.
fn require_tools() {
    for (tool, package) in [
        ("buildah", "buildah"),
        ("skopeo", "skopeo"),
        ("tar", "tar"),
        ("chroot", "coreutils"),
        ("getcap", "libcap2-bin"),
        ("setpriv", "util-linux"),
        ("curl", "curl"),
        ("qemu-aarch64-static", "qemu-user-static"),
    ] {
        require_tool(tool, package);
    }
}

/// `cargo xtask image` for both platforms, once for every test of this
/// file (they run in parallel threads; the others wait for the first).
fn archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let archive =
            image::build_image(&workspace(), &target_dir(), &Arch::ALL, IMAGE_TEST_PROFILE)
                .expect("cargo xtask image --profile quick-release");
        assert!(
            archive.ends_with("image/quick-release/lattice-agent.oci.tar"),
            "{}",
            archive.display()
        );
        archive
    })
}

fn transport() -> String {
    format!("oci-archive:{}", archive().display())
}

/// `skopeo inspect` of one platform's image (the index entry it picks).
fn skopeo_inspect(arch: Arch, extra: &[&str]) -> String {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--override-os", "linux", "--override-arch", arch.name()]);
    if let Some(variant) = arch.variant() {
        cmd.args(["--override-variant", variant]);
    }
    run_ok(cmd.arg("inspect").args(extra).arg(transport()))
}

/// One platform's image unpacked: the OCI layout, then each of its layers
/// in order onto one root filesystem, with the file capabilities, as
/// containerd unpacks layers.
struct Unpacked {
    _tmp: TempDir,
    rootfs: PathBuf,
}

fn unpack(arch: Arch) -> Unpacked {
    let tmp = TempDir::new("image");
    let layout = tmp.path().join("oci");
    let rootfs = tmp.path().join("rootfs");
    fs::create_dir_all(&layout).unwrap();
    fs::create_dir_all(&rootfs).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(archive())
            .arg("-C")
            .arg(&layout),
    );
    let layers = skopeo_inspect(arch, &["--format", "{{range .Layers}}{{println .}}{{end}}"]);
    let layers: Vec<&str> = layers.lines().filter(|l| !l.is_empty()).collect();
    assert!(!layers.is_empty(), "the {arch} image has no layers");
    for digest in layers {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let blob = layout.join("blobs/sha256").join(hex);
        run_ok(
            Command::new("tar")
                .args(["--xattrs", "--xattrs-include=security.capability"])
                .arg("-xf")
                .arg(&blob)
                .arg("-C")
                .arg(&rootfs),
        );
    }
    Unpacked { _tmp: tmp, rootfs }
}

/// Every regular file under `rootfs`, relative to it, sorted.
fn files(rootfs: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("read rootfs").flatten() {
            let path = entry.path();
            if entry.file_type().expect("file type").is_dir() {
                walk(&path, base, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(rootfs, rootfs, &mut out);
    out.sort();
    out
}

/// The binary carries exactly the sidecar's capability set.
fn assert_file_caps(agent: &Path, arch: Arch) {
    let mut want: Vec<String> = SIDECAR_CAPS.iter().map(|c| (*c).to_owned()).collect();
    want.sort();
    assert_eq!(
        file_caps(agent),
        Some((want, "ep".to_owned())),
        "file capabilities of the {arch} image's /lattice-agent"
    );
}

/// The plugin carries no file capabilities: the runtime runs it as root on
/// the host, and it never runs in the container.
fn assert_no_file_caps(plugin: &Path, arch: Arch) {
    assert_eq!(
        file_caps(plugin),
        None,
        "file capabilities of the {arch} image's /lattice-cni"
    );
}

/// `command` (the image's `/lattice-cni`, run in its root filesystem) as
/// the container runtime runs it for the CNI VERSION command: its own
/// environment (libcni passes it on; `chroot` is found through PATH) plus
/// `CNI_COMMAND`, nothing on stdin. Asserts the answer is the plugin's
/// version JSON.
fn assert_cni_version(mut command: Command, arch: Arch) {
    let out = command
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{arch} /lattice-cni VERSION: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{arch} /lattice-cni VERSION printed no JSON ({e}): {stdout}"));
    assert_eq!(
        answer,
        serde_json::json!({
            "cniVersion": "1.1.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        }),
        "{arch} /lattice-cni VERSION"
    );
}

/// `self-check` passed on `machine`: every check reported, the last line
/// naming the architecture the binary was built for.
fn assert_self_check(report: &str, machine: &str) {
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 4, "{report}");
    assert!(
        lines[0].starts_with("sigv4: ok (2 botocore signatures"),
        "{report}"
    );
    assert!(lines[1].starts_with("tls crypto: ok"), "{report}");
    assert!(
        lines[2].starts_with("ebpf object: ok") && lines[2].contains("4 programs"),
        "{report}"
    );
    assert_eq!(
        lines[3],
        format!("self-check passed on {machine} (linux)"),
        "{report}"
    );
}

#[test]
fn index_holds_an_amd64_and_an_arm64_image() {
    if !ready("index_holds_an_amd64_and_an_arm64_image") {
        return;
    }
    let index: serde_json::Value = serde_json::from_str(&run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &transport(),
    ])))
    .expect("index JSON");
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let platforms: Vec<(String, String, Option<String>)> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            let p = &m["platform"];
            (
                p["os"].as_str().unwrap_or_default().to_owned(),
                p["architecture"].as_str().unwrap_or_default().to_owned(),
                p["variant"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        platforms,
        [
            ("linux".to_owned(), "amd64".to_owned(), None),
            (
                "linux".to_owned(),
                "arm64".to_owned(),
                Some("v8".to_owned())
            ),
        ],
        "{index}"
    );

    // Each config: its platform, entrypoint, default command, starting
    // user; each image: the version label.
    for arch in Arch::ALL {
        let config: serde_json::Value =
            serde_json::from_str(&skopeo_inspect(arch, &["--config"])).expect("config JSON");
        assert_eq!(config["os"], "linux", "{config}");
        assert_eq!(config["architecture"], arch.name(), "{config}");
        assert_eq!(config["variant"].as_str(), arch.variant(), "{config}");
        let run = &config["config"];
        assert_eq!(run["Entrypoint"], serde_json::json!(["/lattice-agent"]));
        assert_eq!(run["Cmd"], serde_json::json!(["sidecar"]));
        assert_eq!(run["User"], "101:101");
        let info: serde_json::Value =
            serde_json::from_str(&skopeo_inspect(arch, &[])).expect("inspect JSON");
        assert_eq!(
            info["Labels"]["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION"),
            "{info}"
        );
    }
}

#[test]
fn amd64_image_unpacks_and_runs_the_agent_under_chroot() {
    if !ready("amd64_image_unpacks_and_runs_the_agent_under_chroot") {
        return;
    }
    let Unpacked { rootfs, _tmp } = unpack(Arch::Amd64);

    // Nothing but the agent and the plugin (and, for a glibc fallback
    // build, their libraries).
    let content = files(&rootfs);
    for binary in ["lattice-agent", "lattice-cni"] {
        assert!(content.contains(&PathBuf::from(binary)), "{content:?}");
    }
    for file in &content {
        let name = file.to_string_lossy();
        assert!(
            name == "lattice-agent" || name == "lattice-cni" || name.contains(".so"),
            "unexpected file in the image: {name}"
        );
    }

    // The entrypoint runs in that root filesystem alone.
    let chroot = |args: &[&str]| {
        run_ok(
            Command::new("chroot")
                .arg(&rootfs)
                .arg("/lattice-agent")
                .args(args),
        )
    };
    assert_eq!(
        chroot(&["--version"]).trim(),
        format!("lattice-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let help = chroot(&["--help"]);
    assert!(help.contains("sidecar"), "{help}");
    assert_self_check(&chroot(&["self-check"]), "x86_64");

    // The plugin runs there too, as the runtime runs it.
    assert_no_file_caps(&rootfs.join("lattice-cni"), Arch::Amd64);
    let mut plugin = Command::new("chroot");
    plugin.arg(&rootfs).arg("/lattice-cni");
    assert_cni_version(plugin, Arch::Amd64);

    // With the sidecar's capability set the image's non-root start works:
    // attach, drop, serve.
    let agent_file = rootfs.join("lattice-agent");
    assert_file_caps(&agent_file, Arch::Amd64);
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

/// `e_machine` of an ELF file (little-endian, at offset 18).
fn elf_machine(path: &Path) -> u16 {
    let bytes = fs::read(path).expect("read binary");
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is no ELF file", path.display());
    u16::from_le_bytes([bytes[18], bytes[19]])
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

#[test]
fn arm64_image_passes_its_self_check_under_qemu() {
    if !ready("arm64_image_passes_its_self_check_under_qemu") {
        return;
    }
    let Unpacked { rootfs, _tmp } = unpack(Arch::Arm64);

    // Only the agent and the plugin: static AArch64 binaries, the agent
    // with the file capabilities (the xattr survived the arm64 layer).
    let content = files(&rootfs);
    assert_eq!(
        content,
        [PathBuf::from("lattice-agent"), PathBuf::from("lattice-cni")]
    );
    let agent_file = rootfs.join("lattice-agent");
    assert_eq!(elf_machine(&agent_file), EM_AARCH64);
    assert_file_caps(&agent_file, Arch::Arm64);
    let plugin_file = rootfs.join("lattice-cni");
    assert_eq!(elf_machine(&plugin_file), EM_AARCH64);
    assert_no_file_caps(&plugin_file, Arch::Arm64);

    // The emulator (itself static) joins the root filesystem, so the agent
    // runs with nothing but what the image holds.
    let qemu = run_ok(Command::new("sh").args(["-c", "command -v qemu-aarch64-static"]));
    let qemu = Path::new(qemu.trim());
    assert_eq!(elf_machine(qemu), EM_X86_64, "this test runs on x86_64");
    copy_program(qemu, &rootfs.join("qemu-aarch64-static"));
    let run = |args: &[&str]| {
        run_ok(
            Command::new("chroot")
                .arg(&rootfs)
                .args(["/qemu-aarch64-static", "/lattice-agent"])
                .args(args),
        )
    };
    assert_eq!(
        run(&["--version"]).trim(),
        format!("lattice-agent {}", env!("CARGO_PKG_VERSION"))
    );
    assert_self_check(&run(&["self-check"]), "aarch64");
    let mut plugin = Command::new("chroot");
    plugin
        .arg(&rootfs)
        .args(["/qemu-aarch64-static", "/lattice-cni"]);
    assert_cni_version(plugin, Arch::Arm64);
}

/// The crates `cargo auditable` embedded in `binary`, name to versions.
fn audited_crates(binary: &Path) -> BTreeMap<String, Vec<String>> {
    let info = auditable_info::audit_info_from_file(binary, Default::default())
        .unwrap_or_else(|e| panic!("dependency list of {}: {e}", binary.display()));
    let mut crates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in info.packages {
        crates
            .entry(package.name)
            .or_default()
            .push(package.version.to_string());
    }
    crates
}

/// The version of each of `names` in Cargo.lock (first entry of that name).
fn locked_versions(names: &[&str]) -> BTreeMap<String, String> {
    let lock = fs::read_to_string(workspace().join("Cargo.lock")).expect("Cargo.lock");
    let mut found = BTreeMap::new();
    for entry in lock.split("[[package]]") {
        let field = |key: &str| {
            entry.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.strip_prefix(" = "))
                    .map(|v| v.trim_matches('"').to_owned())
            })
        };
        if let (Some(name), Some(version)) = (field("name"), field("version"))
            && names.contains(&name.as_str())
        {
            found.entry(name).or_insert(version);
        }
    }
    found
}

#[test]
fn every_binary_carries_its_dependency_list() {
    if !ready("every_binary_carries_its_dependency_list") {
        return;
    }
    let agent_crates = [
        "lattice-agent",
        "aws-sigv4",
        "aya",
        "ring",
        "rustls",
        "tokio",
    ];
    let plugin_crates = ["lattice-cni", "nix", "serde_json"];
    for arch in Arch::ALL {
        let Unpacked { rootfs, _tmp } = unpack(arch);
        for (binary, wanted) in [
            ("lattice-agent", &agent_crates[..]),
            ("lattice-cni", &plugin_crates[..]),
        ] {
            let locked = locked_versions(wanted);
            assert_eq!(locked.len(), wanted.len(), "{locked:?}");
            let crates = audited_crates(&rootfs.join(binary));
            for (name, version) in &locked {
                assert!(
                    crates.get(name).is_some_and(|v| v.contains(version)),
                    "{arch} /{binary}: {name} {version} not in the embedded list: {crates:?}"
                );
            }
        }
    }
}
