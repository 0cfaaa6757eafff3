//! Node mode's privileges, measured. The agent starts as root with exactly
//! the set deploy/node adds, SYS_ADMIN, SYS_PTRACE, DAC_READ_SEARCH, SETUID
//! and SETGID (the container start as containerd does it: bounding, hence
//! permitted and effective, set = the list; no_new_privs), serves a pod,
//! and from then on both its processes run as UID 101: the worker, which
//! serves, with only SYS_ADMIN, SYS_PTRACE and DAC_READ_SEARCH; the parent,
//! which holds the pods' sockets and starts workers, with none effective,
//! the same three permitted and inheritable only to hand them on (raised as
//! ambient capabilities in each worker it starts, which clears them once
//! it runs). Removing any capability from the start set makes the
//! start fail; adding BPF or NET_ADMIN adds nothing (the kernel accepts
//! SYS_ADMIN in their place for loading and attaching the programs); and
//! the kernel itself shows why the three kept ones are needed for every
//! pod that arrives later:
//!
//! - SYS_PTRACE: opening `/proc/<pid>/ns/net` of a pod's process (the pause
//!   process runs as 65535, another user) is a ptrace access check;
//! - SYS_ADMIN: `setns` into the pod's network namespace, where the agent
//!   creates the pod's listeners and upstream sockets;
//! - DAC_READ_SEARCH: the kubelet's pod directories are root's, mode 0750,
//!   and the projected tokens are inside them.
//!
//! With the CNI plugin chained (deploy/node), DAC_OVERRIDE and CHOWN are
//! added to both sets: as UID 101 the agent writes the plugin back into
//! the runtime's root-owned configuration directory whenever the node's CNI
//! rewrites its file, and gives the new file back to root.
//!
//! (SETUID and SETGID switch to UID 101 after attaching.) The bounding set
//! keeps the start set: without CAP_SETPCAP it cannot be
//! narrowed, and with no_new_privs nothing can be regained from it.

use std::time::Duration;

use lattice_tests::{
    agent_bin,
    node::{LATTICE_V4, PodSpec},
    node_agent::{
        Cluster, IRSA_VOLUME, NODE_CNI_CAPS, NODE_KEPT_CAPS, NODE_START_CAPS, NodeAgent, PodObject,
        app_request, sts_url,
    },
    procfs::{status_field, thread_statuses},
    require_root, require_tool,
    sidecar::setpriv_caps,
    spawn::PodCommand,
};

/// Capability numbers (linux/capability.h) of the names used here.
fn cap_bit(name: &str) -> u64 {
    let n = match name {
        "chown" => 0,
        "dac_override" => 1,
        "dac_read_search" => 2,
        "setgid" => 6,
        "setuid" => 7,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        other => panic!("unknown capability {other}"),
    };
    1 << n
}

fn mask(caps: &[&str]) -> String {
    format!(
        "{:016x}",
        caps.iter().map(|c| cap_bit(c)).fold(0, |a, b| a | b)
    )
}

/// The agent started as containerd starts deploy/node's container:
/// root, bounding set = `caps`, no_new_privs.
fn agent_with(cluster: &Cluster, caps: &[&str]) -> PodCommand {
    cluster
        .node
        .command("setpriv")
        .args(["--no-new-privs", "--bounding-set", &setpriv_caps(caps)])
        .arg(agent_bin())
        .args(cluster.agent_args())
}

#[test]
fn node_agent_serves_with_exactly_the_measured_set() {
    if !require_root("node_agent_serves_with_exactly_the_measured_set") {
        return;
    }
    require_tool("setpriv", "util-linux");
    let cluster = Cluster::new();
    let _service = cluster.lattice_service(&[]);
    let pod = cluster.node.add_pod(PodSpec::new("shop", "least-0"));
    cluster.apply(
        &PodObject::new(&pod, cluster.node.name())
            .annotated()
            .service_account("least")
            .irsa(
                &pod,
                "arn:aws:iam::123456789012:role/least",
                "us-west-2",
                "token",
            ),
    );
    let agent = NodeAgent::start(
        &cluster,
        agent_with(&cluster, &NODE_START_CAPS),
        &[("AWS_ENDPOINT_URL_STS", &sts_url())],
    );
    agent.wait_pod(pod.uid(), Some("enrolled"), Duration::from_secs(15));
    let r = app_request(&pod, &[&format!("http://{LATTICE_V4}/least")]);
    assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());

    let (kept, none) = (mask(&NODE_KEPT_CAPS), mask(&[]));
    let worker = agent.wait_worker(None, Duration::from_secs(10));
    for (pid, effective, inheritable) in [(worker, &kept, &none), (agent.pid(), &none, &kept)] {
        for status in thread_statuses(pid).expect("read /proc/PID/task") {
            assert_eq!(
                status_field(&status, "Uid"),
                "101\t101\t101\t101",
                "{status}"
            );
            assert_eq!(
                status_field(&status, "Gid"),
                "101\t101\t101\t101",
                "{status}"
            );
            assert_eq!(status_field(&status, "Groups"), "", "{status}");
            assert_eq!(status_field(&status, "CapEff"), *effective, "{status}");
            assert_eq!(status_field(&status, "CapPrm"), kept, "{status}");
            assert_eq!(status_field(&status, "CapInh"), *inheritable, "{status}");
            assert_eq!(status_field(&status, "CapAmb"), none, "{status}");
            assert_eq!(
                status_field(&status, "CapBnd"),
                mask(&NODE_START_CAPS),
                "{status}"
            );
            assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
        }
    }
    // A pod arriving now is served with the kept set alone.
    let later = cluster.node.add_pod(PodSpec::new("shop", "later-0"));
    cluster.apply(
        &PodObject::new(&later, cluster.node.name())
            .annotated()
            .service_account("later")
            .irsa(
                &later,
                "arn:aws:iam::123456789012:role/later",
                "us-west-2",
                "token2",
            ),
    );
    agent.wait_pod(later.uid(), Some("enrolled"), Duration::from_secs(15));
    let r = app_request(&later, &[&format!("http://{LATTICE_V4}/later")]);
    assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());
}

#[test]
fn without_any_one_capability_the_start_fails() {
    if !require_root("without_any_one_capability_the_start_fails") {
        return;
    }
    require_tool("setpriv", "util-linux");
    let cluster = Cluster::new();
    for missing in NODE_START_CAPS {
        let set: Vec<&str> = NODE_START_CAPS
            .iter()
            .copied()
            .filter(|c| *c != missing)
            .collect();
        let mut cmd = agent_with(&cluster, &set).build();
        cmd.env_clear().envs(cluster.agent_env());
        let mut child = lattice_tests::ChildGuard::spawn(cmd, format!("agent without {missing}"));
        let status = child
            .wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("started without {missing}:\n{}", child.captured()));
        let out = child.output(status);
        assert!(!out.success(), "started without {missing}:\n{out}");
        let why = match missing {
            // Loading the programs is the first thing it tries.
            "sys_admin" => "missing capability CAP_BPF".to_owned(),
            "setuid" | "setgid" => "switching to UID 101".to_owned(),
            kept => format!("CAP_{}", kept.to_uppercase()),
        };
        assert!(
            out.stderr.contains(&why),
            "without {missing}, expected {why:?}:\n{out}"
        );
    }
}

/// As UID 101 with exactly `caps` (inheritable, ambient, bounding), run
/// `argv`; true when it succeeds.
fn as_uid_101_with(cluster: &Cluster, caps: &[&str], argv: &[&str]) -> bool {
    let set = setpriv_caps(caps);
    cluster
        .node
        .command("setpriv")
        .args(["--reuid", "101", "--regid", "101", "--clear-groups"])
        .args([
            "--inh-caps",
            &set,
            "--ambient-caps",
            &set,
            "--bounding-set",
            &set,
        ])
        .args(argv)
        .run(Duration::from_secs(20))
        .success()
}

#[test]
fn each_kept_capability_is_what_a_new_pod_needs() {
    if !require_root("each_kept_capability_is_what_a_new_pod_needs") {
        return;
    }
    require_tool("setpriv", "util-linux");
    require_tool("nsenter", "util-linux");
    let cluster = Cluster::new();
    let pod = cluster.node.add_pod(PodSpec::new("shop", "probe-0"));
    let token = pod.write_projected(IRSA_VOLUME, "token", "token");
    let ns = format!("--net=/proc/{}/ns/net", pod.pause_pid());
    let enter: [&str; 3] = ["nsenter", &ns, "true"];
    let read = ["cat", token.to_str().unwrap()];
    let without = |cap: &str| -> Vec<&str> {
        NODE_KEPT_CAPS
            .iter()
            .copied()
            .filter(|c| *c != cap)
            .collect()
    };

    assert!(
        as_uid_101_with(&cluster, &NODE_KEPT_CAPS, &enter),
        "the kept set enters the pod's netns"
    );
    assert!(
        as_uid_101_with(&cluster, &NODE_KEPT_CAPS, &read),
        "the kept set reads the pod's token"
    );
    assert!(
        !as_uid_101_with(&cluster, &without("sys_admin"), &enter),
        "setns without CAP_SYS_ADMIN"
    );
    assert!(
        !as_uid_101_with(&cluster, &without("sys_ptrace"), &enter),
        "/proc/<pause>/ns/net without CAP_SYS_PTRACE"
    );
    assert!(
        !as_uid_101_with(&cluster, &without("dac_read_search"), &read),
        "the kubelet's pod directory without CAP_DAC_READ_SEARCH"
    );
}

/// With the CNI plugin: the start set plus DAC_OVERRIDE and CHOWN, kept
/// after the switch to UID 101; the plugin is chained again after the
/// runtime's file is rewritten, and the file stays root's. Without either
/// capability the start fails naming it, and the kernel shows why each is
/// needed: creating a file in the root-owned directory as UID 101, giving
/// it to root.
#[test]
fn with_the_cni_plugin_it_keeps_dac_override_and_chown() {
    if !require_root("with_the_cni_plugin_it_keeps_dac_override_and_chown") {
        return;
    }
    require_tool("setpriv", "util-linux");
    use std::os::unix::fs::MetadataExt as _;
    let cluster = Cluster::new();
    let start: Vec<&str> = NODE_START_CAPS
        .iter()
        .chain(&NODE_CNI_CAPS)
        .copied()
        .collect();
    let kept: Vec<&str> = NODE_KEPT_CAPS
        .iter()
        .chain(&NODE_CNI_CAPS)
        .copied()
        .collect();
    let with_cni = |caps: &[&str]| agent_with(&cluster, caps).args(cluster.cni_args());

    let agent = NodeAgent::start(&cluster, with_cni(&start), &[]);
    let worker = agent.wait_worker(None, Duration::from_secs(10));
    for (pid, effective) in [(worker, mask(&kept)), (agent.pid(), mask(&[]))] {
        for status in thread_statuses(pid).expect("read /proc/PID/task") {
            assert_eq!(
                status_field(&status, "Uid"),
                "101\t101\t101\t101",
                "{status}"
            );
            assert_eq!(status_field(&status, "CapEff"), effective, "{status}");
            assert_eq!(status_field(&status, "CapPrm"), mask(&kept), "{status}");
        }
    }
    let conflist = cluster.node.cni_conflist().to_owned();
    let chained = || {
        std::fs::read_to_string(&conflist)
            .unwrap()
            .contains("lattice-cni")
    };
    assert!(chained(), "{}", agent.log());
    // The node's CNI writes its file again (as root), without the plugin.
    let mut list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "lattice-cni");
    std::fs::write(&conflist, serde_json::to_vec(&list).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !chained() {
        assert!(
            std::time::Instant::now() < deadline,
            "not chained again as UID 101:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let meta = std::fs::metadata(&conflist).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "the file stays root's");
    drop(agent);

    for missing in NODE_CNI_CAPS {
        let set: Vec<&str> = start.iter().copied().filter(|c| *c != missing).collect();
        let mut cmd = with_cni(&set).build();
        cmd.env_clear().envs(cluster.agent_env());
        let mut child = lattice_tests::ChildGuard::spawn(cmd, format!("agent without {missing}"));
        let status = child
            .wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("started without {missing}:\n{}", child.captured()));
        let out = child.output(status);
        assert!(!out.success(), "started without {missing}:\n{out}");
        let why = format!("CAP_{}", missing.to_uppercase());
        assert!(
            out.stderr.contains(&why),
            "without {missing}, expected {why:?}:\n{out}"
        );
    }

    let dir = cluster.node.cni_conf_dir();
    let probe = dir.join("probe.tmp");
    let probe = probe.to_str().unwrap();
    let without = |cap: &str| -> Vec<&str> { kept.iter().copied().filter(|c| *c != cap).collect() };
    assert!(
        !as_uid_101_with(&cluster, &without("dac_override"), &["touch", probe]),
        "created a file in the root-owned directory without CAP_DAC_OVERRIDE"
    );
    assert!(as_uid_101_with(&cluster, &kept, &["touch", probe]));
    assert!(
        !as_uid_101_with(&cluster, &without("chown"), &["chown", "0:0", probe]),
        "gave a file to root without CAP_CHOWN"
    );
    assert!(as_uid_101_with(&cluster, &kept, &["chown", "0:0", probe]));
    std::fs::remove_file(probe).unwrap();
}
