//! At a pod's connection limit (`--max-connections`, 1,024 by default) a
//! new connection is not left waiting behind idle ones: the agent closes
//! idle client connections (no request in flight, or a request head still
//! trickling in), oldest first, to admit it, as nginx does when it runs
//! out of connections. Here an app holds 1,500 idle keep-alive connections
//! and a slowloris flood of 200 more; its next request is answered at
//! once. In node mode another pod is unaffected all along.
//!
//! Needs root, the built agent and test binaries (and for node mode the
//! test venv).

use std::time::Duration;

use lattice_tests::{
    Agent, ChildGuard, Pod,
    node::PodSpec,
    node_agent::{Cluster, app_request, apply_irsa_pod, sequential_gets, start_agent},
    pod::LATTICE_V4,
    require_root,
    spawn::{PodCommand, Stream},
    test_bin,
};

/// Idle keep-alive connections the app holds: beyond the limit.
const IDLE: &str = "1500";
/// Connections trickling a request head, one byte a second.
const SLOWLORIS: &str = "200";
/// How long the idle and slowloris connections are held.
const HOLD_SECS: &str = "40";
/// Fresh requests made while they are held.
const PROBES: usize = 5;
/// How soon each must be answered (median).
const ANSWERED_WITHIN_MS: f64 = 100.0;

/// The app's idle connections and slowloris flood to `dst`, from `cmd`'s
/// placement; returns them once all are opened.
fn hold_connections(app: impl Fn() -> PodCommand, dst: &str) -> (ChildGuard, ChildGuard) {
    let mut idle = app().args(["idle", dst, IDLE, HOLD_SECS]).spawn();
    idle.wait_for(Stream::Stdout, "holding", Duration::from_secs(60));
    assert!(
        idle.stdout().contains(&format!("opened={IDLE} failed=0")),
        "{}",
        idle.captured()
    );
    let flood = app()
        .args(["flood", dst, SLOWLORIS, "0", HOLD_SECS])
        .spawn();
    // The flood's connections are opened, and the agent took in what it
    // could.
    std::thread::sleep(Duration::from_secs(3));
    (idle, flood)
}

/// [`PROBES`] fresh requests (a new connection each, as `first-call`
/// makes them): each answered 200; returns their times, sorted (ms).
fn probe(app: impl Fn() -> PodCommand, dst: &str) -> Vec<f64> {
    let mut ms: Vec<f64> = (0..PROBES)
        .map(|i| {
            let out = app()
                .args(["first-call", dst, "svc.lattice.test", &format!("/probe{i}")])
                .run(Duration::from_secs(30));
            let line: serde_json::Value = out
                .stdout
                .lines()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| panic!("no result: {out}"));
            assert_eq!(
                (line["outcome"].as_str(), line["status"].as_u64()),
                (Some("reply"), Some(200)),
                "a new request beside the held connections was not answered: {line}"
            );
            line["total_us"].as_f64().unwrap_or(f64::MAX) / 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    eprintln!("new requests beside the held connections: {ms:?} ms");
    ms
}

#[test]
fn at_the_limit_idle_connections_make_room_for_a_new_request() {
    if !require_root("at_the_limit_idle_connections_make_room_for_a_new_request") {
        return;
    }
    let pod = Pod::new();
    let _service = started(
        pod.command(test_bin("lattice-test-service"))
            .in_cgroup(false)
            .args(["--keep-alive", &format!("tcp:{LATTICE_V4}:80")]),
    );
    let agent = Agent::start(&pod, [] as [&str; 0]);
    let dst = format!("{LATTICE_V4}:80");
    let app = || pod.client([] as [&str; 0]).uid(1000);

    let (_idle, _flood) = hold_connections(app, &dst);
    let ms = probe(app, &dst);
    assert!(
        ms[PROBES / 2] < ANSWERED_WITHIN_MS,
        "new requests waited {ms:?} ms beside {IDLE} idle and {SLOWLORIS} slowloris connections\n{}",
        agent.log()
    );
}

#[test]
fn node_mode_at_one_pods_limit_new_requests_are_answered_and_another_pod_is_unaffected() {
    if !require_root(
        "node_mode_at_one_pods_limit_new_requests_are_answered_and_another_pod_is_unaffected",
    ) {
        return;
    }
    let cluster = Cluster::new();
    let _sts = cluster.lattice_service(&[]);
    let _services = cluster.keep_alive_services(&["169.254.171.34", "169.254.171.35"]);
    let busy = cluster.node.add_pod(PodSpec::new("shop", "busy-0"));
    let other = cluster.node.add_pod(PodSpec::new("shop", "other-0"));
    apply_irsa_pod(&cluster, &busy, "busy", 1);
    apply_irsa_pod(&cluster, &other, "other", 2);
    let agent = start_agent(&cluster, &[]);
    for p in [&busy, &other] {
        agent.wait_pod(p.uid(), Some("enrolled"), Duration::from_secs(15));
    }
    let warm = app_request(&other, &["http://169.254.171.35/warm"]);
    assert_eq!(warm.status, 200, "{warm:?}");

    let dst = "169.254.171.34:80";
    let app = || busy.command(test_bin("lattice-test-client")).uid(1000);
    let (_idle, _flood) = hold_connections(app, dst);
    let ms = probe(app, dst);
    assert!(
        ms[PROBES / 2] < ANSWERED_WITHIN_MS,
        "the pod's new requests waited {ms:?} ms beside its own held connections\n{}",
        agent.log()
    );
    let others = sequential_gets(&other, "http://169.254.171.35/other", 50);
    assert_eq!(others.failed, 0, "the other pod's requests failed");
    assert_eq!(others.unsigned, 0, "the other pod's requests went unsigned");
}

/// A service started and listening.
fn started(cmd: PodCommand) -> ChildGuard {
    let mut child = cmd.spawn();
    child.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    child
}
