//! The agent starts with exactly the measured minimal capability set, loads
//! and attaches (and pins) the interceptor, then runs as UID 101 with no
//! capabilities, and as such serves: /readyz answers 200 and an app's
//! request to a Lattice address reaches the service signed. Removing any
//! one capability from the set makes the start fail.
//!
//! Three ways to start, each with its own minimal set:
//! - Container (the image and deploy/sidecar): UID 101 from the start; the
//!   image's /lattice-agent carries the file capabilities BPF and NET_ADMIN,
//!   which the exec grants under no_new_privs (`allowPrivilegeEscalation:
//!   false`) because the container's `capabilities.add` put them in the
//!   bounding and permitted sets. Set: BPF, NET_ADMIN.
//! - Root (e.g. `run` on a host, or `runAsUser: 0`): BPF, NET_ADMIN, plus
//!   SETUID and SETGID to switch to --exempt-uid after attaching.
//! - UID 101 with ambient capabilities (e.g. systemd AmbientCapabilities=):
//!   BPF, NET_ADMIN.
//!
//! Why each: CAP_BPF creates maps and loads programs (BPF_MAP_CREATE,
//! BPF_PROG_LOAD); cgroup sock_addr / sock_ops / sockopt programs are "net
//! admin" program types, which the kernel loads only with CAP_NET_ADMIN.
//!
//! Not needed: CAP_SYS_ADMIN; CAP_PERFMON (the programs avoid the
//! variable-offset stack writes the verifier only allows with it; without
//! it aya's name probe fails, so bpftool shows the programs unnamed);
//! CAP_DAC_OVERRIDE (the cgroup dir is opened read-only, pins go to a
//! directory the starting UID owns); CAP_SYS_RESOURCE (Linux >= 5.11 charges
//! BPF memory to the memory cgroup, not RLIMIT_MEMLOCK); CAP_SETPCAP (the
//! bounding set stays, but with no_new_privs and empty permitted/effective
//! sets nothing can be regained); CAP_NET_BIND_SERVICE (ports 15080/15090).
//!
//! Needs root (to hand out capabilities with setpriv, setcap); uses fixture
//! pods (tests/src) and a private bpffs mount; traffic stays in the pods'
//! netns.

use std::{fs, net::SocketAddr, path::Path, time::Duration};

use lattice_tests::{
    Agent, Bpffs, Pod, PodCommand, agent_bin,
    bpftool::{INTERCEPTOR, attach_types, wait_detached},
    pod::LATTICE_V4,
    probe::{http_get, serve_one_request, wait_http_ok},
    require_root, require_tool,
    sidecar::{
        FileCapsAgent, SIDECAR_CAPS, SIDECAR_UID, assert_signed, assert_unprivileged,
        container_start, proxy_env, setpriv_caps,
    },
};

/// As UID 0.
const ROOT_SET: [&str; 4] = ["bpf", "net_admin", "setuid", "setgid"];
/// As UID 101 from the start, with ambient capabilities.
const UID_101_SET: [&str; 2] = ["bpf", "net_admin"];
const EXEMPT_UID: u32 = SIDECAR_UID;
/// The agent's default --admin-addr; each pod has its own netns.
const READYZ: &str = "http://127.0.0.1:15090/readyz";

#[derive(Clone, Copy)]
enum Start<'a> {
    /// As the container runtime starts deploy/sidecar: UID 101, this
    /// binary's file capabilities, the set as bounding (and permitted) set,
    /// no_new_privs.
    Container(&'a FileCapsAgent),
    /// UID 0, bounding set (hence permitted/effective) limited to the set,
    /// no_new_privs.
    Root,
    /// UID/GID 101, the set as inheritable + ambient + bounding.
    Uid101,
}

impl Start<'_> {
    fn minimal_set(self) -> &'static [&'static str] {
        match self {
            Start::Container(_) => &SIDECAR_CAPS,
            Start::Root => &ROOT_SET,
            Start::Uid101 => &UID_101_SET,
        }
    }

    /// Who owns what the agent creates (pins) before it drops privileges.
    fn starting_uid(self) -> u32 {
        match self {
            Start::Root => 0,
            Start::Container(_) | Start::Uid101 => EXEMPT_UID,
        }
    }
}

/// `env -i <proxy env> setpriv ... lattice-agent run --cgroup <pod cgroup>`
/// (the signing proxy and admin server on their default ports), in the
/// pod's netns, outside its cgroup, as the fixture's agent runs.
fn agent_command(pod: &Pod, start: Start, caps: &[&str], pin: Option<&Path>) -> PodCommand {
    let (set, caps) = (caps, setpriv_caps(caps));
    let id = EXEMPT_UID.to_string();
    let (setpriv, agent): (Vec<String>, _) = match start {
        Start::Container(file) => (container_start(EXEMPT_UID, set), file.path()),
        Start::Root => (
            ["setpriv", "--no-new-privs", "--bounding-set", &caps]
                .map(str::to_owned)
                .to_vec(),
            agent_bin(),
        ),
        Start::Uid101 => (
            [
                "setpriv",
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                "--inh-caps",
                &caps,
                "--ambient-caps",
                &caps,
                "--bounding-set",
                &caps,
            ]
            .map(str::to_owned)
            .to_vec(),
            agent_bin(),
        ),
    };
    let mut cmd = pod
        .command("env")
        .in_cgroup(false)
        .arg("-i")
        .args(proxy_env(true))
        .args(setpriv)
        .arg(agent)
        .arg("run")
        .arg("--cgroup")
        .arg(pod.cgroup_path())
        .args(["--log", "info"]);
    if let Some(pin) = pin {
        cmd = cmd.arg("--pin").arg(pin);
    }
    cmd
}

fn preflight(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    require_tool("setpriv", "util-linux");
    require_tool("bpftool", "bpftool");
    require_tool("curl", "curl");
    require_tool("setcap", "libcap2-bin");
    true
}

/// The unprivileged agent serves: /readyz is 200 (attached, listening,
/// credentials loaded), and an app in the pod (root, so intercepted) that
/// calls a Lattice address gets the service's answer, signed on the way.
fn assert_serves(pod: &Pod, agent: &Agent) {
    let body = wait_http_ok(
        || pod.command("curl").in_cgroup(false).build(),
        READYZ,
        Duration::from_secs(10),
    );
    assert_eq!(body.trim(), "ready", "{}", agent.log());

    let lattice = SocketAddr::new(LATTICE_V4.parse().unwrap(), 80);
    let service = pod
        .listen_tcp(lattice)
        .expect("listen on the Lattice address");
    let mut app = pod
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{lattice}/least-privilege"),
        ])
        .spawn();
    let head = serve_one_request(&service, "served", Duration::from_secs(10));
    let status = app
        .wait_timeout(Duration::from_secs(10))
        .expect("curl hangs");
    let out = app.output(status);
    assert!(out.success(), "app request failed:\n{out}\n{}", agent.log());
    assert_eq!(out.stdout, "served", "{out}");
    assert!(head.starts_with("GET /least-privilege HTTP/1.1"), "{head}");
    assert_signed(&head);
}

fn starts_with_exactly(start: Start) {
    let pod = Pod::new();
    let mut agent = Agent::spawn(&agent_command(&pod, start, start.minimal_set(), None));
    assert_eq!(
        attach_types(pod.cgroup_path()),
        INTERCEPTOR,
        "{}",
        agent.log()
    );
    assert_unprivileged(agent.pid(), EXEMPT_UID, &agent.log());
    assert_serves(&pod, &agent);
    agent.stop();
    assert_eq!(attach_types(pod.cgroup_path()), Vec::<String>::new());
}

#[test]
fn container_start_as_101_with_file_caps_bpf_net_admin() {
    if preflight("container_start_as_101_with_file_caps_bpf_net_admin") {
        starts_with_exactly(Start::Container(&FileCapsAgent::new()));
    }
}

#[test]
fn root_start_with_bpf_net_admin_setuid_setgid() {
    if preflight("root_start_with_bpf_net_admin_setuid_setgid") {
        starts_with_exactly(Start::Root);
    }
}

#[test]
fn uid_101_start_with_ambient_bpf_net_admin() {
    if preflight("uid_101_start_with_ambient_bpf_net_admin") {
        starts_with_exactly(Start::Uid101);
    }
}

#[test]
fn pins_with_the_same_sets() {
    if !preflight("pins_with_the_same_sets") {
        return;
    }
    let bpffs = Bpffs::new();
    let file = FileCapsAgent::new();
    for (n, start) in [Start::Container(&file), Start::Root, Start::Uid101]
        .into_iter()
        .enumerate()
    {
        let pod = Pod::new();
        // A pin directory the starting UID owns: no CAP_DAC_OVERRIDE needed.
        let owner = start.starting_uid();
        let pin = bpffs.path().join(format!("start{n}"));
        fs::create_dir(&pin).expect("mkdir pin dir");
        std::os::unix::fs::chown(&pin, Some(owner), Some(owner)).expect("chown pin dir");
        // First start creates the pins, the second takes them over.
        for round in ["create", "reuse"] {
            let cmd = agent_command(&pod, start, start.minimal_set(), Some(&pin));
            let mut agent = Agent::spawn(&cmd);
            assert_eq!(
                attach_types(pod.cgroup_path()),
                INTERCEPTOR,
                "{round} (owner {owner}):\n{}",
                agent.log()
            );
            for program in [
                "lattice_connect4",
                "lattice_connect6",
                "lattice_sock_ops",
                "lattice_getsockopt",
            ] {
                assert!(
                    pin.join(format!("link_{program}")).exists(),
                    "{round}: link_{program} not pinned\n{}",
                    agent.log()
                );
            }
            assert_unprivileged(agent.pid(), EXEMPT_UID, &agent.log());
            assert_serves(&pod, &agent);
            agent.stop();
            // Pinned: interception outlives the agent (exactly one set).
            assert_eq!(attach_types(pod.cgroup_path()), INTERCEPTOR, "{round}");
        }
        // Removing the pins detaches.
        for entry in fs::read_dir(&pin).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        wait_detached(pod.cgroup_path(), "after removing the pins");
    }
}

#[test]
fn every_capability_in_the_set_is_needed() {
    if !preflight("every_capability_in_the_set_is_needed") {
        return;
    }
    let file = FileCapsAgent::new();
    for start in [Start::Container(&file), Start::Root, Start::Uid101] {
        let set = start.minimal_set();
        for missing in set {
            let caps: Vec<&str> = set.iter().copied().filter(|c| c != missing).collect();
            let pod = Pod::new();
            let out = agent_command(&pod, start, &caps, None).run(Duration::from_secs(30));
            assert!(!out.success(), "started without CAP_{missing}:\n{out}");
            let named = match (start, *missing) {
                // The exec itself fails: a file with the effective bit
                // needs all its capabilities (Kubernetes reports
                // "exec /lattice-agent: operation not permitted").
                (Start::Container(_), _) => "Operation not permitted".to_owned(),
                (_, "setuid" | "setgid") => "switching to UID".to_owned(),
                (_, cap) => format!("CAP_{}", cap.to_uppercase()),
            };
            assert!(
                out.stderr.contains(&named),
                "without CAP_{missing}, expected {named:?} in:\n{out}"
            );
            // A failed start leaves nothing attached and serves nothing.
            assert_eq!(
                attach_types(pod.cgroup_path()),
                Vec::<String>::new(),
                "{out}"
            );
            let (status, _) = http_get(pod.command("curl").in_cgroup(false).build(), READYZ);
            assert_eq!(status, 0, "admin server still answering after {out}");
        }
    }
}

/// Why the image carries file capabilities: a container running as UID 101
/// (no ambient capabilities from Kubernetes) gets none without them, even
/// with the set in `capabilities.add`.
#[test]
fn container_start_without_file_caps_has_no_capabilities() {
    if !preflight("container_start_without_file_caps_has_no_capabilities") {
        return;
    }
    let pod = Pod::new();
    let out = pod
        .command("env")
        .in_cgroup(false)
        .arg("-i")
        .args(proxy_env(true))
        .args(container_start(EXEMPT_UID, &SIDECAR_CAPS))
        .arg(agent_bin())
        .arg("run")
        .arg("--cgroup")
        .arg(pod.cgroup_path())
        .run(Duration::from_secs(30));
    assert!(!out.success(), "started without file capabilities:\n{out}");
    assert!(out.stderr.contains("CAP_BPF"), "{out}");
    assert_eq!(attach_types(pod.cgroup_path()), Vec::<String>::new());
}
