//! `lattice-agent sidecar` on simulated kubepods trees built from real cgroup
//! v2 directories under a fixture pod's cgroup: for every kubelet layout
//! (systemd and cgroupfs drivers, each QoS class) and for a container that
//! shares the host's cgroup namespace, the agent finds the pod's cgroup from
//! its UID, attaches there and nowhere else, and an app process in the pod
//! is redirected while the same connect from outside the pod is not.
//!
//! And the sidecar as deploy/ runs it: the container rendered from the
//! manifests (args, env, user, capabilities, probes) started the way
//! containerd starts it, inside the pod's cgroup: its startupProbe fails
//! until credentials are there, then passes, and the app's request to a
//! Lattice address reaches the service signed (the agent's own upstream
//! connection, from inside the pod, is exempt by its UID).
//!
//! Needs root; traffic stays inside the fixture pod's network namespace.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lattice_tests::{
    Pod, PodCommand,
    agent::{READY_LINE, READY_TIMEOUT, STOP_TIMEOUT},
    agent_bin,
    bpftool::{INTERCEPTOR, attach_types},
    cgroup::{CgroupTree, cgroup2_mount},
    manifests::{manifest_tools, rendered_sidecar},
    pod::LATTICE_V4,
    probe::{Connect, connect_with, drain, http_get, serve_one_request, wait_http_ok},
    require_root, require_tool,
    sidecar::{FileCapsAgent, assert_signed, assert_unprivileged, container_start, proxy_env},
    spawn::{ChildGuard, Stream},
    unique_name,
};

/// `program` started in the network namespace `netns` and the cgroup
/// `cgroup`, as root.
fn placed(program: impl AsRef<Path>, netns: &Path, cgroup: &Path) -> Command {
    PodCommand::new(program, netns, cgroup).build()
}

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
    let tree = CgroupTree::below(node.cgroup_path());
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

    // Stopping the sidecar leaves the programs attached, held by the pod's
    // cgroup: the app's connects fail closed, never direct (unsigned)...
    let before = attach_types(&pod);
    stop(&mut agent);
    assert_eq!(
        attach_types(&pod),
        before,
        "{layout_name}: detached on exit"
    );
    assert_eq!(connect_with(app(), lattice), Connect::Refused);
    assert_eq!(drain(&upstream), 0, "{layout_name}: app reached upstream");
    drop(agent);
    // ...until the pod's cgroup goes, taking them with it.
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
    let tree = CgroupTree::below(node.cgroup_path());
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

/// The rendered container's `name=value` env (the downward API's POD_UID
/// filled in with `pod_uid`; any other valueFrom is an error here).
fn container_env(container: &serde_json::Value, pod_uid: &str) -> Vec<String> {
    let mut env = Vec::new();
    for var in container["env"].as_array().expect("env list") {
        let name = var["name"].as_str().expect("env name");
        if let Some(value) = var["value"].as_str() {
            env.push(format!("{name}={value}"));
        } else {
            assert_eq!(
                (name, &var["valueFrom"]["fieldRef"]["fieldPath"]),
                ("POD_UID", &serde_json::json!("metadata.uid")),
                "env {var}: the test cannot fill this in"
            );
            env.push(format!("POD_UID={pod_uid}"));
        }
    }
    env
}

/// The probe's URL inside the pod's netns (the kubelet uses the pod IP;
/// the admin server listens on 0.0.0.0 per the manifest).
fn probe_url(container: &serde_json::Value, probe: &str) -> String {
    let get = &container[probe]["httpGet"];
    let path = get["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{probe}: {get}"));
    let port = get["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("{probe}: {get}"));
    format!("http://127.0.0.1:{port}{path}")
}

#[test]
fn sidecar_runs_as_the_manifests_say() {
    if !preflight("sidecar_runs_as_the_manifests_say") {
        return;
    }
    require_tool("setpriv", "util-linux");
    require_tool("setcap", "libcap2-bin");
    require_tool("curl", "curl");
    let Some(tools) = manifest_tools("sidecar_runs_as_the_manifests_say") else {
        return;
    };
    let rendered = rendered_sidecar(&tools);
    let container = &rendered["container"];
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    let uid = sc["runAsUser"].as_u64().expect("runAsUser") as u32;
    assert_eq!(sc["runAsGroup"].as_u64(), Some(uid.into()), "{sc}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{sc}"
    );
    let caps: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability").to_ascii_lowercase())
        .collect();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    // The hostPath mount of the node's cgroup tree is where the agent looks
    // by default; here the simulated tree stands in for it.
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| {
            rendered["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .any(|v| v["name"] == m["name"] && v["hostPath"]["path"] == "/sys/fs/cgroup")
        })
        .expect("a hostPath mount of /sys/fs/cgroup");
    assert_eq!(
        mount["mountPath"], "/sys/fs/cgroup",
        "the agent's default --cgroup-root"
    );

    let pod_uid = pod_uid();
    let node = Pod::new();
    let tree = CgroupTree::below(node.cgroup_path());
    let pod = tree.mkdir(layout("systemd/burstable", &pod_uid));
    let sidecar_cg = tree.mkdir(layout("systemd/burstable", &pod_uid).join("lattice-agent"));
    let app_cg = tree.mkdir(layout("systemd/burstable", &pod_uid).join("app1-v1"));
    // The image's entrypoint: the agent with the image's file capabilities.
    let entrypoint = FileCapsAgent::new();
    let probe = || node.command("curl").build();
    let start = |with_credentials: bool| {
        let mut cmd = placed("env", node.netns_path(), &sidecar_cg);
        cmd.arg("-i")
            .args(proxy_env(with_credentials))
            .args(container_env(container, &pod_uid))
            .arg(format!(
                "LATTICE_CGROUP_ROOT={}",
                node.cgroup_path().display()
            ))
            .args(container_start(uid, &caps))
            .arg(entrypoint.path())
            .args(&args);
        let mut agent = ChildGuard::spawn(cmd, "lattice-agent (as deployed)".to_owned());
        agent.wait_for(Stream::Stderr, READY_LINE, READY_TIMEOUT);
        agent
    };

    // Without credentials (no IRSA / Pod Identity yet) the startupProbe
    // fails, so the kubelet would not start the app containers.
    let mut agent = start(false);
    let (status, body) = http_get(probe(), &probe_url(container, "startupProbe"));
    assert_eq!(
        status, 503,
        "startupProbe passed without credentials: {body}"
    );
    assert!(body.contains("no credentials"), "{body}");
    let (status, _) = http_get(probe(), &probe_url(container, "livenessProbe"));
    assert_eq!(status, 200, "livenessProbe");
    stop(&mut agent);
    drop(agent);

    // With credentials: the probes pass, the agent runs as the manifest's
    // UID with no capabilities, and the app's call is signed.
    let mut agent = start(true);
    for name in ["startupProbe", "readinessProbe", "livenessProbe"] {
        wait_http_ok(probe, &probe_url(container, name), Duration::from_secs(10));
    }
    assert!(
        agent.stderr().contains(&*pod.to_string_lossy()),
        "{}",
        agent.stderr()
    );
    assert_eq!(attach_types(&pod), INTERCEPTOR, "{}", agent.stderr());
    assert_unprivileged(agent.pid(), uid, &agent.stderr());

    let lattice = SocketAddr::new(LATTICE_V4.parse().unwrap(), 80);
    let service = node
        .listen_tcp(lattice)
        .expect("listen on the Lattice address");
    let mut curl = placed("curl", node.netns_path(), &app_cg);
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{lattice}/from-app1"),
    ]);
    let mut app = ChildGuard::spawn(curl, "curl (app1-v1)".to_owned());
    let head = serve_one_request(&service, "hello from the service", Duration::from_secs(10));
    let status = app
        .wait_timeout(Duration::from_secs(10))
        .expect("curl hangs");
    let out = app.output(status);
    assert!(
        out.success(),
        "app request failed:\n{out}\n{}",
        agent.stderr()
    );
    assert_eq!(out.stdout, "hello from the service");
    assert!(head.starts_with("GET /from-app1 HTTP/1.1"), "{head}");
    assert_signed(&head);

    // The programs stay with the pod's cgroup after the sidecar stops (fail
    // closed); they go with the cgroup.
    stop(&mut agent);
    assert_eq!(attach_types(&pod), INTERCEPTOR);
    drop(agent);
    drop(tree);
}
