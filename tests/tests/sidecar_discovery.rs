//! `lattice-agent sidecar` on simulated kubepods trees built from real cgroup
//! v2 directories under a fixture pod's cgroup: for every kubelet layout
//! (systemd and cgroupfs drivers, each QoS class) and for a container that
//! shares the host's cgroup namespace, the agent finds the pod's cgroup from
//! its UID, attaches there and nowhere else, and an app process in the pod
//! is redirected while the same connect from outside the pod is not.
//!
//! Needs root; traffic stays inside the fixture pod's network namespace.

mod sidecar_support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lattice_tests::{
    Pod,
    agent::{READY_LINE, READY_TIMEOUT, STOP_TIMEOUT},
    agent_bin,
    cgroup::cgroup2_mount,
    pod::LATTICE_V4,
    require_root,
    spawn::{ChildGuard, Stream},
    unique_name,
};
use sidecar_support::{
    CgroupTree, Connect, INTERCEPTOR, attach_types, connect_with, drain, placed, require_tool,
};

/// The agent's default --proxy-port: nothing listens there with --intercept-only.
const PROXY_PORT: u16 = 15080;

/// A UID in Kubernetes' format, distinct per call.
fn pod_uid() -> String {
    let digits: String = unique_name().chars().filter(char::is_ascii_digit).collect();
    let hex = format!("{digits:0>32}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The pod cgroup's path below the node's cgroup root, per layout.
fn layout(name: &str, uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    PathBuf::from(match name {
        "systemd/burstable" => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
        }
        "systemd/besteffort" => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
        }
        "systemd/guaranteed" => format!("kubepods.slice/kubepods-pod{u}.slice"),
        "cgroupfs/burstable" => format!("kubepods/burstable/pod{uid}"),
        "cgroupfs/besteffort" => format!("kubepods/besteffort/pod{uid}"),
        "cgroupfs/guaranteed" => format!("kubepods/pod{uid}"),
        // Not a layout the agent knows: only /proc/self/cgroup leads there.
        "host-cgroupns" => format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{u}.slice"
        ),
        other => panic!("unknown layout {other}"),
    })
}

const LAYOUTS: [&str; 6] = [
    "systemd/burstable",
    "systemd/besteffort",
    "systemd/guaranteed",
    "cgroupfs/burstable",
    "cgroupfs/besteffort",
    "cgroupfs/guaranteed",
];

/// `lattice-agent sidecar --pod-uid UID --cgroup-root ROOT --intercept-only`,
/// with nothing from the caller's environment (no LATTICE_*, no POD_UID).
fn sidecar_args(cmd: &mut Command, pod_uid: &str, cgroup_root: &Path) {
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("sidecar")
        .args(["--pod-uid", pod_uid])
        .arg("--cgroup-root")
        .arg(cgroup_root)
        .args(["--intercept-only", "--log", "info"]);
}

fn preflight(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    require_tool("bpftool", "bpftool");
    require_tool("ip", "iproute2");
    let help = Command::new(agent_bin())
        .args(["sidecar", "--help"])
        .output()
        .expect("run lattice-agent");
    assert!(
        help.status.success(),
        "lattice-agent has no `sidecar` subcommand (wire it in cli.rs/main.rs, see issue 5):\n{}",
        String::from_utf8_lossy(&help.stderr)
    );
    true
}

fn stop(agent: &mut ChildGuard) {
    agent.signal(libc::SIGTERM);
    assert!(
        agent.wait_timeout(STOP_TIMEOUT).is_some(),
        "agent ignored SIGTERM:\n{}",
        agent.captured()
    );
}

/// Runs the sidecar for a pod laid out as `layout_name` and proves the
/// redirect. With `host_cgroupns`, --cgroup-root is the real cgroup2 mount
/// and only the agent's own /proc/self/cgroup can lead to the pod.
fn discover_and_redirect(layout_name: &str, host_cgroupns: bool) {
    let uid = pod_uid();
    // The fixture pod's cgroup plays the node's cgroup root; its netns has
    // 169.254.171.33 on lo.
    let node = Pod::new();
    let tree = CgroupTree::new(node.cgroup_path());
    // A neighbouring pod of the same layout that must stay untouched.
    let decoy = tree.mkdir(layout(layout_name, &pod_uid()));
    let pod = tree.mkdir(layout(layout_name, &uid));
    let sidecar_cg = tree.mkdir(layout(layout_name, &uid).join("lattice-agent"));
    let app_cg = tree.mkdir(layout(layout_name, &uid).join("app"));

    let lattice = SocketAddr::new(LATTICE_V4.parse().unwrap(), 80);
    let upstream = node
        .listen_tcp(lattice)
        .expect("listen on the Lattice address");
    let app = || placed("bash", node.netns_path(), &app_cg);
    // In the netns, in the node's root cgroup: outside the pod.
    let outside = || node.command("bash").build();

    // Before the agent: the app reaches the Lattice address directly.
    assert_eq!(connect_with(app(), lattice), Connect::Connected);
    assert_eq!(drain(&upstream), 1);

    let cgroup_root = if host_cgroupns {
        cgroup2_mount()
    } else {
        node.cgroup_path().to_owned()
    };
    let mut cmd = placed(agent_bin(), node.netns_path(), &sidecar_cg);
    sidecar_args(&mut cmd, &uid, &cgroup_root);
    let mut agent = ChildGuard::spawn(cmd, format!("lattice-agent sidecar ({layout_name})"));
    agent.wait_for(Stream::Stderr, READY_LINE, READY_TIMEOUT);
    let log = agent.stderr();
    assert!(
        log.contains("found the pod's cgroup") && log.contains(&*pod.to_string_lossy()),
        "{layout_name}: agent did not report {}:\n{log}",
        pod.display()
    );

    // Attached to the pod, and only there.
    assert_eq!(attach_types(&pod), INTERCEPTOR, "{layout_name}: {log}");
    for elsewhere in [&decoy, &app_cg, &node.cgroup_path().to_owned()] {
        assert_eq!(
            attach_types(elsewhere),
            Vec::<String>::new(),
            "{layout_name}: something attached to {}",
            elsewhere.display()
        );
    }

    // The app in the pod is sent to the (unserved) loopback proxy port...
    assert_eq!(
        connect_with(app(), lattice),
        Connect::Refused,
        "{layout_name}: app in the pod was not redirected\n{}",
        agent.stderr()
    );
    assert_eq!(drain(&upstream), 0, "{layout_name}: app reached upstream");
    // ...while the same connect from outside the pod reaches the listener.
    assert_eq!(connect_with(outside(), lattice), Connect::Connected);
    assert_eq!(drain(&upstream), 1);

    // And it lands on 127.0.0.1:PROXY_PORT once something listens there.
    let proxy = node
        .listen_tcp(SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)))
        .expect("listen on the proxy port");
    assert_eq!(connect_with(app(), lattice), Connect::Connected);
    assert_eq!(
        drain(&proxy),
        1,
        "{layout_name}: redirect missed the proxy port"
    );
    assert_eq!(drain(&upstream), 0);
    drop(proxy);

    // Stopping the (unpinned) agent detaches: direct again.
    stop(&mut agent);
    assert_eq!(attach_types(&pod), Vec::<String>::new());
    assert_eq!(connect_with(app(), lattice), Connect::Connected);
    assert_eq!(drain(&upstream), 1);
    drop(agent);
    drop(tree); // before the pod: the pod's cgroup must be empty to go
}

#[test]
fn finds_every_kubelet_layout_and_redirects_the_pod() {
    if !preflight("finds_every_kubelet_layout_and_redirects_the_pod") {
        return;
    }
    for name in LAYOUTS {
        discover_and_redirect(name, false);
    }
}

#[test]
fn host_cgroup_namespace_uses_proc_self_cgroup() {
    if !preflight("host_cgroup_namespace_uses_proc_self_cgroup") {
        return;
    }
    // The pod sits where no known layout looks; --cgroup-root is the real
    // cgroup2 mount: only the agent's own /proc/self/cgroup finds it.
    discover_and_redirect("host-cgroupns", true);
}

#[test]
fn unknown_pod_fails_listing_every_path_searched() {
    if !preflight("unknown_pod_fails_listing_every_path_searched") {
        return;
    }
    let node = Pod::new();
    let tree = CgroupTree::new(node.cgroup_path());
    // Another pod exists; ours does not.
    tree.mkdir(layout("systemd/burstable", &pod_uid()));
    let uid = pod_uid();
    let mut cmd = Command::new(agent_bin());
    sidecar_args(&mut cmd, &uid, node.cgroup_path());
    let mut agent = ChildGuard::spawn(cmd, "lattice-agent sidecar (unknown pod)".to_owned());
    let status = agent
        .wait_timeout(Duration::from_secs(20))
        .expect("agent still running");
    let out = agent.output(status);
    assert!(
        !out.success(),
        "agent succeeded without a pod cgroup:\n{out}"
    );
    for name in LAYOUTS {
        let path = node.cgroup_path().join(layout(name, &uid));
        assert!(
            out.stderr.contains(&*path.to_string_lossy()),
            "{} not listed in:\n{out}",
            path.display()
        );
    }
    assert!(out.stderr.contains(&uid), "{out}");
    assert_eq!(attach_types(node.cgroup_path()), Vec::<String>::new());
    drop(tree);
}
