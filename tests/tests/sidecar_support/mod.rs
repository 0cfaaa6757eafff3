//! What the sidecar tests need beyond the crate's pod fixture (tests/src):
//! a simulated kubepods tree of nested cgroups under a pod's cgroup, and
//! processes placed in any cgroup of that tree (the fixture places them in
//! the pod cgroup itself only).
#![allow(dead_code)] // each test file uses a different subset

use std::{
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lattice_tests::{venv, workspace};

/// The measured minimal capability set of the sidecar, in setpriv's
/// spelling: the image's file capabilities on /lattice-agent, and exactly
/// deploy/sidecar's `capabilities.add` (checked by manifests.rs and
/// image.rs). least_privilege.rs proves it suffices for a start as UID 101
/// the way containerd starts the container, and that each one is needed.
pub const SIDECAR_CAPS: [&str; 2] = ["bpf", "net_admin"];

/// The UID the sidecar runs as from the start (the image's USER), which is
/// also the agent's default --exempt-uid.
pub const SIDECAR_UID: u32 = 101;

/// `-all,+a,+b`: a capability list for setpriv.
pub fn setpriv_caps(caps: &[&str]) -> String {
    let mut arg = String::from("-all");
    for cap in caps {
        arg.push_str(",+");
        arg.push_str(cap);
    }
    arg
}

/// The argv prefix (`setpriv ... setpriv ...`, to be followed by the program
/// and its arguments) that starts a program as containerd/runc start a
/// Kubernetes container with `runAsUser: uid`, `allowPrivilegeEscalation:
/// false` and `capabilities: {drop: [ALL], add: caps}`: bounding set =
/// `caps`, the UID switched with the capabilities kept in the permitted set
/// (runc sets permitted = effective = the list before exec), no_new_privs.
/// The exec then grants the program's file capabilities only when they are
/// within both sets; without file capabilities a non-root program gets none.
///
/// The outer setpriv (still root) narrows the bounding set to `caps` plus
/// what the inner one needs to switch UID; the inner drops those extras
/// from the bounding set, switches UID keeping permitted capabilities, sets
/// no_new_privs and execs. (The permitted set then holds setuid/setgid/
/// setpcap as well; the exec cannot grant them, the bounding set lacks them.)
pub fn container_start(uid: u32, caps: &[&str]) -> Vec<String> {
    let mut outer = caps.to_vec();
    outer.extend(["setuid", "setgid", "setpcap"]);
    let id = uid.to_string();
    [
        "setpriv",
        "--bounding-set",
        &setpriv_caps(&outer),
        "setpriv",
        "--bounding-set",
        &setpriv_caps(caps),
        "--reuid",
        &id,
        "--regid",
        &id,
        "--clear-groups",
        "--no-new-privs",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A copy of the agent binary carrying the sidecar's file capabilities
/// (`setcap cap_bpf,cap_net_admin=ep`), as the image has it; in a fresh
/// directory every UID can read, removed on drop.
pub struct FileCapsAgent(PathBuf);

impl FileCapsAgent {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("{}-filecaps", lattice_tests::unique_name()));
        fs::create_dir(&dir).expect("mkdir");
        let guard = Self(dir);
        // By `cp`, not fs::copy: a process another test thread forks while
        // our write fd is open would hold it until its exec, and executing
        // the copy would then fail with ETXTBSY.
        let copied = Command::new("cp")
            .arg(lattice_tests::agent_bin())
            .arg(guard.path())
            .status()
            .expect("run cp");
        assert!(copied.success(), "cp agent: {copied}");
        let caps: Vec<String> = SIDECAR_CAPS.iter().map(|c| format!("cap_{c}")).collect();
        let out = Command::new("setcap")
            .arg(format!("{}=ep", caps.join(",")))
            .arg(guard.path())
            .output()
            .expect("run setcap (Debian package libcap2-bin)");
        assert!(
            out.status.success(),
            "setcap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        guard
    }

    pub fn path(&self) -> PathBuf {
        self.0.join("lattice-agent")
    }
}

impl Drop for FileCapsAgent {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The capability names (`bpf`, `net_admin`, sorted) and flags (`ep`) of a
/// file, from `getcap`; None without file capabilities.
pub fn file_caps(path: &Path) -> Option<(Vec<String>, String)> {
    let out = Command::new("getcap")
        .arg(path)
        .output()
        .expect("run getcap");
    assert!(out.status.success(), "getcap {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    // "<path> cap_net_admin,cap_bpf=ep"
    let (_, spec) = text.trim().rsplit_once(' ')?;
    let (names, flags) = spec.split_once('=')?;
    let mut names: Vec<String> = names
        .split(',')
        .map(|n| n.trim_start_matches("cap_").to_owned())
        .collect();
    names.sort();
    Some((names, flags.to_owned()))
}

/// Fails (never skips) when a tool the test needs is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` not found: install Debian package {package} (`cargo xtask setup` does)"
    );
}

/// Cgroups created below an existing cgroup (e.g. a fixture pod's).
/// Dropping it kills every process in them and removes them, deepest
/// first, so the owner of `root` can then remove `root` itself.
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// Creates `relative` (and its parents) below the root: real cgroups,
    /// since mkdir on cgroupfs creates one.
    pub fn mkdir(&self, relative: impl AsRef<Path>) -> PathBuf {
        let path = self.root.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let dirs = subdirs_deepest_first(&self.root);
        for dir in &dirs {
            // cgroup.kill (Linux >= 5.14) kills the subtree; else one by one.
            if fs::write(dir.join("cgroup.kill"), "1").is_err()
                && let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs"))
            {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // rmdir is EBUSY until the killed processes are released: retry.
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in &dirs {
            while let Err(e) = fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("lattice-tests: rmdir {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Every directory strictly below `dir`, children before parents.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subdirs_deepest_first(&entry.path()));
                out.push(entry.path());
            }
        }
    }
    out
}

/// `program` set up to start in network namespace `netns` (a /run/netns
/// path) and cgroup `cgroup`, as root. Files are opened here, before fork;
/// the child only makes raw syscalls on them.
pub fn placed(program: impl AsRef<Path>, netns: &Path, cgroup: &Path) -> Command {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    let mut cmd = Command::new(program.as_ref());
    cmd.stdin(Stdio::null());
    // SAFETY: only raw syscalls on fds opened above; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                || libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            // Never outlive the test, even if it dies without destructors.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// What a TCP connect did.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    Refused,
    Other(String),
}

/// Connects to `addr` from `bash` (its /dev/tcp: no extra tools), started
/// by `bash` (a placed `Command` for "bash"), and closes again.
pub fn connect_with(mut bash: Command, addr: SocketAddr) -> Connect {
    bash.args([
        "-c",
        &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
    ]);
    let out = bash.output().expect("spawn bash");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Connect::Connected
    } else if stderr.contains("Connection refused") {
        Connect::Refused
    } else {
        Connect::Other(format!("{}: {stderr}", out.status))
    }
}

/// Takes every connection waiting on `listener`; returns how many.
pub fn drain(listener: &TcpListener) -> usize {
    listener.set_nonblocking(true).expect("non-blocking");
    // The connect has returned; give the accept queue a moment anyway.
    std::thread::sleep(Duration::from_millis(50));
    let mut n = 0;
    while listener.accept().is_ok() {
        n += 1;
    }
    n
}

/// The attach types bpftool lists for `cgroup`, sorted. (Only the types:
/// program names are empty when the agent ran without CAP_PERFMON, because
/// aya probes name support by loading a tracepoint program.)
pub fn attach_types(cgroup: &Path) -> Vec<String> {
    let mut types: Vec<String> = lattice_tests::bpftool::attached_programs(cgroup)
        .into_iter()
        .map(|(attach_type, _name)| attach_type)
        .collect();
    types.sort();
    types
}

/// Waits (up to 5 s) until nothing is attached to `cgroup` any more and
/// panics otherwise. The kernel releases a BPF link whose last reference
/// was a removed pin from a workqueue, not synchronously.
pub fn wait_detached(cgroup: &Path, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = attach_types(cgroup);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still attached to {}: {left:?}\n{context}",
            cgroup.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the interceptor attaches to a cgroup, as bpftool names the types.
pub const INTERCEPTOR: [&str; 4] = [
    "cgroup_getsockopt",
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_sock_ops",
];

/// A fake access key id: requests signed with it can only ever reach the
/// test's own listeners.
pub const FAKE_ACCESS_KEY: &str = "AKIDLATTICETESTONLY";

/// The environment of an agent that serves the signing proxy: a region and
/// static fake credentials, IMDS off, and no HOME (no ~/.aws of the host).
/// Everything else is cleared with `env -i`, so nothing of the caller's
/// environment (a real AWS_PROFILE, LATTICE_*) reaches the agent.
pub fn proxy_env(with_credentials: bool) -> Vec<String> {
    let mut env = vec![
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/nonexistent".to_owned(),
        "AWS_REGION=us-west-2".to_owned(),
        "AWS_EC2_METADATA_DISABLED=true".to_owned(),
    ];
    if with_credentials {
        env.push(format!("AWS_ACCESS_KEY_ID={FAKE_ACCESS_KEY}"));
        env.push("AWS_SECRET_ACCESS_KEY=lattice-test-secret-not-real".to_owned());
    }
    env
}

/// `curl` (a placed `Command` for it) fetching `url`: (status, body). The
/// status is 0 when no HTTP response came back.
pub fn http_get(mut curl: Command, url: &str) -> (u16, String) {
    curl.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url]);
    let out = curl.output().expect("spawn curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Polls `url` with curl (from `curl()`) until it answers 200, as the
/// kubelet's startupProbe does; panics with the last answer on timeout.
pub fn wait_http_ok(curl: impl Fn() -> Command, url: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = http_get(curl(), url);
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not 200 within {timeout:?}: last answer {status} {body:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serves one HTTP request on `listener` (the stand-in for a Lattice
/// service): answers 200 with `body` and returns the request head, header
/// names lower-cased. Panics if no request arrives within `timeout`.
pub fn serve_one_request(listener: &TcpListener, body: &str, timeout: Duration) -> String {
    use std::io::{Read, Write};
    listener.set_nonblocking(true).expect("non-blocking");
    let deadline = Instant::now() + timeout;
    let (mut conn, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no request reached the listener within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read request");
        assert!(n > 0, "connection closed mid-request: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).expect("write response");
    let head = String::from_utf8_lossy(&head).into_owned();
    head.lines()
        .map(|line| match line.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that a request head carries a SigV4 signature made with the
/// fake key for VPC Lattice in us-west-2 (the proxy signed it).
pub fn assert_signed(head: &str) {
    let auth = head
        .lines()
        .find_map(|l| l.strip_prefix("authorization:"))
        .unwrap_or_else(|| panic!("request reached upstream unsigned:\n{head}"));
    let auth = auth.trim();
    assert!(
        auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={FAKE_ACCESS_KEY}/"))
            && auth.contains("/us-west-2/vpc-lattice-svcs/aws4_request")
            && auth.contains("Signature="),
        "unexpected Authorization: {auth}"
    );
    assert!(head.contains("\nx-amz-date:"), "no x-amz-date:\n{head}");
}

/// Reads `/proc/PID/status` of every thread of `pid`.
pub fn thread_statuses(pid: i32) -> Vec<String> {
    let mut out = Vec::<String>::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).expect("read task dir") {
        let status = entry.expect("task entry").path().join("status");
        out.push(fs::read_to_string(&status).expect("read status"));
    }
    assert!(!out.is_empty());
    out
}

/// One `Name:` field of a /proc status file.
pub fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{name} missing from status"))
        .trim()
}

/// Every thread of `pid` runs as UID/GID `uid`, with no supplementary
/// groups, no capabilities in any set, and no_new_privs.
pub fn assert_unprivileged(pid: i32, uid: u32, log: &str) {
    for status in thread_statuses(pid) {
        let ids = format!("{0}\t{0}\t{0}\t{0}", uid);
        assert_eq!(status_field(&status, "Uid"), ids, "{status}");
        assert_eq!(status_field(&status, "Gid"), ids, "{status}");
        assert_eq!(status_field(&status, "Groups"), "", "{status}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                status_field(&status, set),
                "0000000000000000",
                "{set} not empty\n{status}\n{log}"
            );
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    }
}

/// What tests/manifests/check_manifests.py needs.
pub struct ManifestTools {
    pub python: PathBuf,
    pub validator: PathBuf,
}

/// The tools, or None (skip, loudly) when missing outside CI; panics under
/// CI=true.
pub fn manifest_tools(test: &str) -> Option<ManifestTools> {
    let venv = venv();
    let python = venv.join("bin/python");
    let validator = venv.join("bin/kubernetes-validate");
    let mut missing = Vec::new();
    let kubectl_ok = Command::new("kubectl")
        .args(["kustomize", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !kubectl_ok {
        missing.push("kubectl with kustomize (`kubectl kustomize`)".to_owned());
    }
    let venv_ok = Command::new(&python)
        .args(["-c", "import yaml, kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !venv_ok || !validator.is_file() {
        missing.push(format!(
            "a venv at {} with PyYAML and kubernetes-validate (tests/requirements.txt; \
             `cargo xtask setup`, or set LATTICE_TEST_VENV)",
            venv.display()
        ));
    }
    if missing.is_empty() {
        return Some(ManifestTools { python, validator });
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: missing {}; CI=true forbids skipping",
        missing.join(", ")
    );
    eprintln!("\n*** SKIPPED {test}: missing {} ***\n", missing.join(", "));
    None
}

/// The lattice-agent container (`container`) and the pod's volumes
/// (`volumes`) as deploy/examples/app1-with-sidecar renders them.
pub fn rendered_sidecar(tools: &ManifestTools) -> serde_json::Value {
    let out = Command::new(&tools.python)
        .arg(workspace().join("tests/manifests/check_manifests.py"))
        .arg("container")
        .arg("--workspace")
        .arg(workspace())
        .output()
        .expect("run check_manifests.py");
    assert!(
        out.status.success(),
        "check_manifests.py container: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from check_manifests.py container")
}
