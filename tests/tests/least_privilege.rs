//! The agent starts with exactly the measured minimal capability set, loads
//! and attaches (and pins) the interceptor, and then runs as UID 101 with no
//! capabilities. Removing any one capability from the set makes it fail.
//!
//! The set (see deploy/README.md, "Capabilities"):
//! - CAP_BPF: create maps, load programs (BPF_MAP_CREATE, BPF_PROG_LOAD).
//! - CAP_NET_ADMIN: cgroup sock_addr / sock_ops / sockopt programs are
//!   "net admin" program types; the kernel refuses to load them without it.
//! - CAP_SETUID + CAP_SETGID: only when started as UID 0 (Kubernetes), to
//!   switch to --exempt-uid after attaching. Started as UID 101 already
//!   (ambient capabilities, e.g. systemd), they are not needed.
//!
//! Not needed: CAP_SYS_ADMIN; CAP_PERFMON (the programs avoid the
//! variable-offset stack writes the verifier only allows with it; without
//! it aya's name probe fails, so bpftool shows the programs unnamed);
//! CAP_DAC_OVERRIDE (the cgroup dir is opened read-only, pins go to a
//! directory the starting UID owns); CAP_SYS_RESOURCE (Linux >= 5.11 charges
//! BPF memory to the memory cgroup, not RLIMIT_MEMLOCK); CAP_SETPCAP (the
//! bounding set stays, but with no_new_privs and empty permitted/effective
//! sets nothing can be regained).
//!
//! Needs root (to hand out capabilities with setpriv); uses fixture pods
//! (tests/src) and a private bpffs mount, sends no traffic.

mod sidecar_support;

use std::{fs, path::Path, time::Duration};

use lattice_tests::{Agent, Bpffs, Pod, PodCommand, agent_bin, require_root};
use sidecar_support::{INTERCEPTOR, ROOT_START_CAPS, attach_types, require_tool};

/// As UID 0 (a Kubernetes container with `runAsUser: 0`).
const ROOT_SET: [&str; 4] = ROOT_START_CAPS;
/// As UID 101 from the start, with ambient capabilities.
const UID_101_SET: [&str; 2] = ["bpf", "net_admin"];
const EXEMPT_UID: u32 = 101;

#[derive(Clone, Copy)]
enum Start {
    /// UID 0, bounding set (hence permitted/effective) limited to the set,
    /// no_new_privs set as `allowPrivilegeEscalation: false` does.
    Root,
    /// UID/GID 101, the set as inheritable + ambient + bounding.
    Uid101,
}

fn caps_arg(caps: &[&str]) -> String {
    let mut arg = String::from("-all");
    for cap in caps {
        arg.push_str(",+");
        arg.push_str(cap);
    }
    arg
}

/// `setpriv ... lattice-agent run --cgroup <pod cgroup> --intercept-only`,
/// in the pod's netns, outside its cgroup, as the fixture's agent runs.
fn agent_command(pod: &Pod, start: Start, caps: &[&str], pin: Option<&Path>) -> PodCommand {
    let caps = caps_arg(caps);
    let id = EXEMPT_UID.to_string();
    let setpriv: Vec<&str> = match start {
        Start::Root => vec!["--no-new-privs", "--bounding-set", &caps],
        Start::Uid101 => vec![
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
        ],
    };
    let mut cmd = pod
        .command("setpriv")
        .in_cgroup(false)
        .args(setpriv)
        .arg(agent_bin())
        .arg("run")
        .arg("--cgroup")
        .arg(pod.cgroup_path())
        .args(["--intercept-only", "--log", "info"]);
    if let Some(pin) = pin {
        cmd = cmd.arg("--pin").arg(pin);
    }
    cmd
}

/// `/proc/PID/status` of every thread of `pid`.
fn thread_statuses(pid: i32) -> Vec<String> {
    let mut out = Vec::<String>::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).expect("read task dir") {
        let status = entry.expect("task entry").path().join("status");
        out.push(fs::read_to_string(&status).expect("read status"));
    }
    assert!(!out.is_empty());
    out
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{name} missing from status"))
        .trim()
}

/// UID/GID 101 everywhere, no capabilities that could be used, no way back.
fn assert_unprivileged(agent: &Agent) {
    for status in thread_statuses(agent.pid()) {
        let ids = format!("{0}\t{0}\t{0}\t{0}", EXEMPT_UID);
        assert_eq!(field(&status, "Uid"), ids, "{status}");
        assert_eq!(field(&status, "Gid"), ids, "{status}");
        assert_eq!(field(&status, "Groups"), "", "{status}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                field(&status, set),
                "0000000000000000",
                "{set} not empty\n{status}\n{}",
                agent.log()
            );
        }
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
    }
}

fn preflight(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    require_tool("setpriv", "util-linux");
    require_tool("bpftool", "bpftool");
    true
}

fn starts_with_exactly(start: Start, caps: &[&str]) {
    let pod = Pod::new();
    let mut agent = Agent::spawn(&agent_command(&pod, start, caps, None));
    assert_eq!(
        attach_types(pod.cgroup_path()),
        INTERCEPTOR,
        "{}",
        agent.log()
    );
    assert_unprivileged(&agent);
    agent.stop();
    assert_eq!(attach_types(pod.cgroup_path()), Vec::<String>::new());
}

#[test]
fn root_start_with_bpf_net_admin_setuid_setgid() {
    if preflight("root_start_with_bpf_net_admin_setuid_setgid") {
        starts_with_exactly(Start::Root, &ROOT_SET);
    }
}

#[test]
fn uid_101_start_with_ambient_bpf_net_admin() {
    if preflight("uid_101_start_with_ambient_bpf_net_admin") {
        starts_with_exactly(Start::Uid101, &UID_101_SET);
    }
}

#[test]
fn pins_with_the_same_sets() {
    if !preflight("pins_with_the_same_sets") {
        return;
    }
    let bpffs = Bpffs::new();
    for (start, caps, owner) in [
        (Start::Root, &ROOT_SET[..], 0),
        (Start::Uid101, &UID_101_SET[..], EXEMPT_UID),
    ] {
        let pod = Pod::new();
        // A pin directory the starting UID owns: no CAP_DAC_OVERRIDE needed.
        let pin = bpffs.path().join(format!("uid{owner}"));
        fs::create_dir(&pin).expect("mkdir pin dir");
        std::os::unix::fs::chown(&pin, Some(owner), Some(owner)).expect("chown pin dir");
        // First start creates the pins, the second takes them over.
        for round in ["create", "reuse"] {
            let mut agent = Agent::spawn(&agent_command(&pod, start, caps, Some(&pin)));
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
            assert_unprivileged(&agent);
            agent.stop();
            // Pinned: interception outlives the agent (exactly one set).
            assert_eq!(attach_types(pod.cgroup_path()), INTERCEPTOR, "{round}");
        }
        // Removing the pins detaches.
        for entry in fs::read_dir(&pin).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        assert_eq!(attach_types(pod.cgroup_path()), Vec::<String>::new());
    }
}

#[test]
fn every_capability_in_the_set_is_needed() {
    if !preflight("every_capability_in_the_set_is_needed") {
        return;
    }
    for (start, set) in [
        (Start::Root, &ROOT_SET[..]),
        (Start::Uid101, &UID_101_SET[..]),
    ] {
        for missing in set {
            let caps: Vec<&str> = set.iter().copied().filter(|c| c != missing).collect();
            let pod = Pod::new();
            let out = agent_command(&pod, start, &caps, None).run(Duration::from_secs(30));
            assert!(!out.success(), "started without CAP_{missing}:\n{out}");
            let named = match *missing {
                "setuid" | "setgid" => "switching to UID".to_owned(),
                cap => format!("CAP_{}", cap.to_uppercase()),
            };
            assert!(
                out.stderr.contains(&named),
                "without CAP_{missing}, expected {named:?} in:\n{out}"
            );
            // A failed start leaves nothing attached.
            assert_eq!(
                attach_types(pod.cgroup_path()),
                Vec::<String>::new(),
                "{out}"
            );
        }
    }
}
