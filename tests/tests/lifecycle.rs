//! Where interception systems hurt users: the lifecycle. Under continuous
//! load from an app that retries refused connects, the agent is killed
//! (SIGKILL: no clean-up runs) and started again as the kubelet would.
//! Not one request may reach the service unsigned; the figures (attempted,
//! failed, unsigned, time to recover) are recorded for the README's
//! "Reliability" table (lattice_tests::reliability).
//!
//! Pods are the test kit's node fixture (kubelet-like cgroups, Debian's CNI
//! plugins); the service is the botocore verifier on 169.254.171.33 in the
//! node's namespace, which answers 403 to anything unsigned.

use std::time::{Duration, Instant};

use lattice_tests::{
    Bpffs, ChildGuard, agent_bin,
    bpftool::attached_programs,
    node::{LATTICE_V4, NodePod, PodSpec},
    node_agent::{Cluster, NodeAgent, PodObject},
    reliability::Record,
    require_root,
    spawn::Stream,
    test_bin,
    time::monotonic_ns,
    verifier::{DEMO_CREDENTIALS, Verifier, python},
};
use serde_json::Value;

const HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";
const MOTO_PORT: &str = "5000";
/// How long the kubelet takes to start a crashed container again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The app's load: new connection per request, refused connects retried.
fn start_load(pod: &NodePod, seconds: u64) -> ChildGuard {
    pod.command(test_bin("lattice-test-client"))
        .uid(1000)
        .args([
            "load",
            &format!("{LATTICE_V4}:80"),
            &seconds.to_string(),
            HOST,
        ])
        .spawn()
}

fn load_result(mut load: ChildGuard, timeout: Duration) -> Value {
    let status = load.wait_timeout(timeout).expect("the load ends");
    let out = load.output(status);
    assert!(out.success(), "{out}");
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("load output ({e}): {out}"))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Requests the service refused because they were not signed.
fn unsigned(verifier: &Verifier) -> u64 {
    verifier
        .requests()
        .iter()
        .filter(|r| r.status != 200)
        .inspect(|r| eprintln!("not accepted: {r:?}"))
        .count() as u64
}

/// `lattice-agent sidecar` in `pod`, in a container of its own, as the
/// image starts it (as root here; it switches to UID 101 after attaching).
fn start_sidecar(cluster: &Cluster, pod: &NodePod, container: &std::path::Path) -> ChildGuard {
    let mut cmd = pod
        .command_in(container, agent_bin())
        .env("POD_UID", pod.uid())
        .arg("sidecar")
        .arg("--cgroup-root")
        .arg(cluster.node.cgroup_root())
        .build();
    cmd.env_clear()
        .envs(lattice_tests::node_agent::clean_env())
        .envs(DEMO_CREDENTIALS.agent_env())
        .env("POD_UID", pod.uid());
    let mut child = ChildGuard::spawn(cmd, "lattice-agent sidecar".to_owned());
    child.wait_for(
        Stream::Stderr,
        "lattice-agent ready",
        Duration::from_secs(30),
    );
    child
}

/// A sidecar killed under load: its programs stay attached, held by the
/// pod's cgroup, so while it is gone the app's connects are refused, never
/// sent unsigned; the restarted sidecar replaces them (no second
/// attachment) and serves again.
#[test]
fn sidecar_killed_under_load_fails_closed_and_recovers() {
    if !require_root("sidecar_killed_under_load_fails_closed_and_recovers") {
        return;
    }
    let cluster = Cluster::new();
    let python = python().unwrap_or_else(|m| panic!("{m}"));
    let verifier = Verifier::start_as(
        cluster.node.command(python),
        LATTICE_V4,
        80,
        &DEMO_CREDENTIALS,
        &[],
    );
    let pod = cluster.node.add_pod(PodSpec::new("shop", "sidecar-0"));
    let container = pod.add_container();
    let mut sidecar = start_sidecar(&cluster, &pod, &container);
    let attached = attached_programs(pod.cgroup_path());
    assert_eq!(attached.len(), 4, "{attached:?}");

    let load = start_load(&pod, 8);
    std::thread::sleep(Duration::from_secs(2));
    let killed = monotonic_ns();
    sidecar.kill();
    assert_eq!(
        attached_programs(pod.cgroup_path()),
        attached,
        "programs stay attached after the sidecar died"
    );
    std::thread::sleep(RESTART_DELAY);
    let restarted_at = Instant::now();
    let restarted = monotonic_ns();
    let _sidecar = start_sidecar(&cluster, &pod, &container);
    let start_ms = restarted_at.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(
        attached_programs(pod.cgroup_path()).len(),
        4,
        "the restarted sidecar replaced the programs, not added to them"
    );
    let result = load_result(load, Duration::from_secs(40));
    let recovered = result["recovered_ns"].as_u64().map(u128::from);
    let record = Record {
        id: "sidecar-sigkill",
        fault: "sidecar SIGKILL, restarted 1 s later".into(),
        load: "1 app, new connection per request, back to back, 8 s".into(),
        attempted: count(&result, "ok") + count(&result, "failed") + count(&result, "refused"),
        failed: count(&result, "failed") + count(&result, "refused"),
        unsigned: unsigned(&verifier),
        recovery_ms: recovered.map(|r| (r.saturating_sub(restarted)) as f64 / 1e6),
        notes: format!(
            "connects refused while no sidecar ran ({} refusals); the restarted sidecar was \
             ready after {start_ms:.0} ms; a connect made as it replaced the programs can \
             find no record (421)",
            count(&result, "refused")
        ),
    };
    record.save();
    assert_eq!(
        record.unsigned, 0,
        "unsigned requests reached the service: {result}"
    );
    assert!(
        count(&result, "refused") > 0,
        "the app never saw the gap: {result}"
    );
    assert!(
        result["first_refused_ns"]
            .as_u64()
            .is_some_and(|f| u128::from(f) >= killed),
        "refusals began before the kill? {result}"
    );
    assert!(recovered.is_some(), "never recovered: {result}");
    assert!(count(&result, "ok") > 100, "{result}");
}

/// The node agent killed under load: its programs and maps are pinned, the
/// pod's namespace stays enrolled, so while no agent runs the pod's
/// connects are refused, never unsigned; the restarted agent takes the
/// pins over (no second attachment), re-enrolls the pod from the API and
/// serves again, without the pod restarting.
#[test]
fn node_agent_killed_under_load_fails_closed_and_recovers() {
    if !require_root("node_agent_killed_under_load_fails_closed_and_recovers") {
        return;
    }
    let cluster = Cluster::new();
    let python = python().unwrap_or_else(|m| panic!("{m}"));
    let verifier = Verifier::start_as(
        cluster.node.command(python),
        LATTICE_V4,
        80,
        &lattice_tests::verifier::UNUSED_KEY,
        &["--moto-sts-port", MOTO_PORT],
    );
    let bpffs = Bpffs::new();
    let pin = bpffs.path().join("lattice-node");
    let pin_arg = pin.to_str().unwrap().to_owned();
    let pod = cluster.node.add_pod(PodSpec::new("shop", "node-0"));
    cluster.apply(
        &PodObject::new(&pod, cluster.node.name())
            .annotated()
            .service_account("node")
            .irsa(
                &pod,
                "arn:aws:iam::123456789012:role/node",
                "us-west-2",
                "token",
            ),
    );
    let sts = format!("http://127.0.0.1:{MOTO_PORT}");
    let start = || {
        NodeAgent::start(
            &cluster,
            cluster.agent_command(["--pin", &pin_arg]),
            &[("AWS_ENDPOINT_URL_STS", &sts)],
        )
    };
    let mut agent = start();
    agent.wait_pod(pod.uid(), Some("enrolled"), Duration::from_secs(15));
    let kubepods = cluster.node.cgroup_root().join("kubepods.slice");
    let attached = attached_programs(&kubepods);
    assert_eq!(attached.len(), 4, "{attached:?}");

    let load = start_load(&pod, 8);
    std::thread::sleep(Duration::from_secs(2));
    agent.kill();
    assert_eq!(
        attached_programs(&kubepods),
        attached,
        "pinned programs stay"
    );
    std::thread::sleep(RESTART_DELAY);
    let restarted = monotonic_ns();
    let agent = start();
    agent.wait_pod(pod.uid(), Some("enrolled"), Duration::from_secs(15));
    assert_eq!(
        attached_programs(&kubepods).len(),
        4,
        "taken over, not attached twice"
    );
    let result = load_result(load, Duration::from_secs(40));
    let recovered = result["recovered_ns"].as_u64().map(u128::from);
    let record = Record {
        id: "node-agent-sigkill",
        fault: "node agent SIGKILL, restarted 1 s later (pinned)".into(),
        load: "1 app, new connection per request, back to back, 8 s".into(),
        attempted: count(&result, "ok") + count(&result, "failed") + count(&result, "refused"),
        failed: count(&result, "failed") + count(&result, "refused"),
        unsigned: unsigned(&verifier),
        recovery_ms: recovered.map(|r| (r.saturating_sub(restarted)) as f64 / 1e6),
        notes: format!(
            "connects refused while no agent ran ({} refusals); recovery includes the agent's start and the pod's re-enrollment",
            count(&result, "refused")
        ),
    };
    record.save();
    assert_eq!(
        record.unsigned, 0,
        "unsigned requests reached the service: {result}"
    );
    assert!(
        count(&result, "refused") > 0,
        "the app never saw the gap: {result}"
    );
    assert!(
        recovered.is_some(),
        "never recovered: {result}\n{}",
        agent.log()
    );
}
