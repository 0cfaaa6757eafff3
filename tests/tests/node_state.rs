//! Node mode's view of its pods stays true to the node: a pod's sandbox
//! recreated under the same IP is served in its new network namespace, a
//! re-enrollment that fails leaves the pod refused (never hanging, never
//! unsigned), and what no pod uses any more (entries of the kernel's table
//! of enrolled namespaces, credential metric series) goes, across agent
//! crashes too.
//!
//! The real agent on the test kit's node (kubelet-like cgroups, Debian's
//! CNI plugins, the API stand-in); the service is the botocore verifier on
//! 169.254.171.33 in the node's namespace, which answers 403 to anything
//! unsigned.
//!
//! Needs root, the built agent and test binaries, the test venv.

use std::time::{Duration, Instant};

use lattice_tests::{
    Bpffs,
    bpftool::{map_entries, map_update},
    node::{NodePod, PodSpec},
    node_agent::{
        Cluster, INJECT, PodObject, apply_irsa_pod, lattice_get, role_arn, start_agent,
        unsigned_under,
    },
    require_root,
};
use serde_json::json;

const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// The kubelet has recreated a pod's sandbox: the pod keeps its IP, and
/// its status says so (the container restarted, the sandbox is ready
/// again).
fn after_sandbox_restart(obj: &PodObject, restarts: u32) -> PodObject {
    let mut obj = obj.clone();
    obj.json["status"]["conditions"] = json!([
        {"type": "PodReadyToStartContainers", "status": "True"},
        {"type": "Ready", "status": "True"},
    ]);
    obj.json["status"]["containerStatuses"] = json!([{
        "name": "app",
        "image": "app:1",
        "imageID": "",
        "ready": true,
        "restartCount": restarts,
        "state": {"running": {}},
    }]);
    obj
}

/// A pod enrolled from the API (no CNI plugin) whose sandbox the runtime
/// recreates under the same IP: the agent serves the new network
/// namespace, so the pod's requests are signed again; the old namespace
/// leaves the kernel's table of enrolled namespaces.
#[test]
fn a_recreated_sandbox_keeping_its_ip_is_served_in_its_new_namespace() {
    if !require_root("a_recreated_sandbox_keeping_its_ip_is_served_in_its_new_namespace") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let bpffs = Bpffs::new();
    let pin = bpffs.path().to_str().unwrap().to_owned();
    let mut p = cluster.node.add_pod(PodSpec::new("shop", "keep-ip-0"));
    let obj = apply_irsa_pod(&cluster, &p, "keep", 1);
    let agent = start_agent(&cluster, &["--pin", &pin]);
    agent.wait_pod(p.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let r = lattice_get(&p, "/before");
    assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());
    let ip = p.ip();
    let old_netns = p.netns_path().to_owned();

    p.recreate_sandbox();
    assert_eq!(p.ip(), ip);
    assert_ne!(p.netns_path(), old_netns);
    cluster.apply(&after_sandbox_restart(&obj, 1));
    let reported = Instant::now();

    // Until the agent has seen the new sandbox, a request may leave
    // unsigned (as at any pod's start without the CNI plugin); then every
    // one is signed.
    let deadline = Instant::now() + ENROLL_TIMEOUT;
    let first_signed = loop {
        let r = lattice_get(&p, "/new-sandbox");
        if r.status == 200 {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the pod's new sandbox is not served {ENROLL_TIMEOUT:?} after it started: {r:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = verifier.requests().len();
    for i in 0..10 {
        let r = lattice_get(&p, &format!("/after/{i}"));
        assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());
    }
    let after: Vec<_> = verifier.requests().into_iter().skip(before).collect();
    assert_eq!(after.len(), 10);
    assert!(
        after
            .iter()
            .all(|r| r.status == 200 && r.role_arn.as_deref() == Some(role_arn("keep").as_str())),
        "{after:?}"
    );
    eprintln!(
        "first signed request {:?} after the API showed the new sandbox",
        first_signed.duration_since(reported)
    );
    let gated = map_entries(&bpffs.path().join("map_ENROLLED_NETNS"));
    assert_eq!(gated, 1, "only the new namespace stays enrolled");
    assert_eq!(
        agent.pod_row(p.uid()).expect("in /pods")["state"],
        "enrolled"
    );
}

/// A served pod's re-enrollment fails (the API shows an IP its namespace
/// does not hold): its namespace stays enrolled with nobody listening, so
/// the app's connects are refused at once, not left hanging in a backlog
/// no one accepts from, and nothing leaves unsigned. Once the API is right
/// again the pod is served again.
#[test]
fn a_failed_re_enrollment_refuses_connects_instead_of_hanging() {
    if !require_root("a_failed_re_enrollment_refuses_connects_instead_of_hanging") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let p = cluster.node.add_pod(PodSpec::new("shop", "reenroll-0"));
    let good = apply_irsa_pod(&cluster, &p, "reenroll", 1);
    let agent = start_agent(&cluster, &[]);
    agent.wait_pod(p.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&p, "/before").status, 200);

    let mut wrong = good.clone();
    wrong.json["status"]["podIP"] = "169.254.99.99".into();
    wrong.json["status"]["podIPs"] = json!([{"ip": "169.254.99.99"}]);
    cluster.apply(&wrong);
    let row = agent
        .wait_pod(p.uid(), Some("failed"), ENROLL_TIMEOUT)
        .unwrap();
    assert!(
        row["reason"].as_str().unwrap().contains("169.254.99.99"),
        "{row}"
    );

    for i in 0..3 {
        let started = Instant::now();
        let r = lattice_get(&p, &format!("/while-failed/{i}"));
        let took = started.elapsed();
        assert_eq!(r.status, 0, "the pod's request was answered: {r:?}");
        assert!(
            // curl's exit code 7: the connect failed (refused).
            r.stderr.starts_with("curl: (7)") && took < Duration::from_secs(2),
            "the pod's connect was not refused at once ({took:?}): {r:?}\n{}",
            agent.log()
        );
    }
    assert_eq!(unsigned_under(&verifier, "/"), Vec::<String>::new());

    cluster.apply(&good);
    agent.wait_pod(p.uid(), Some("enrolled"), Duration::from_secs(40));
    let r = lattice_get(&p, "/again");
    assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());
}

/// The kernel's table of enrolled network namespaces holds `--max-pods`
/// entries. Pods churn through it across agent crashes (SIGKILL: nothing
/// is cleaned up on the way out): each restarted agent keeps only the
/// namespaces of pods that still ask for signing, so thirteen enrollments
/// fit a table of six, and a pod that stopped asking while no agent ran is
/// let go (its requests leave as they would without lattice) instead of
/// having its connects refused for ever. One pod more than the table
/// holds fails with a reason naming the limit.
#[test]
fn the_gate_keeps_only_pods_that_ask_across_crashes() {
    if !require_root("the_gate_keeps_only_pods_that_ask_across_crashes") {
        return;
    }
    const CAPACITY: usize = 6;
    const ROUNDS: usize = 3;
    const PODS: usize = 4;
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let bpffs = Bpffs::new();
    let pin = bpffs.path().to_str().unwrap().to_owned();
    let gate = bpffs.path().join("map_ENROLLED_NETNS");
    let capacity = CAPACITY.to_string();
    let start = || start_agent(&cluster, &["--pin", &pin, "--max-pods", &capacity]);

    let stays = cluster.node.add_pod(PodSpec::new("shop", "stays-0"));
    let stays_obj = apply_irsa_pod(&cluster, &stays, "stays", 0);
    let mut agent = start();
    agent.wait_pod(stays.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let mut enrollments = 1;
    let mut last_round = Vec::new();
    for round in 0..ROUNDS {
        let pods: Vec<NodePod> = (0..PODS)
            .map(|i| {
                cluster
                    .node
                    .add_pod(PodSpec::new("churn", &format!("r{round}-{i}")))
            })
            .collect();
        for (i, pod) in pods.iter().enumerate() {
            apply_irsa_pod(&cluster, pod, &format!("churn{i}"), 10 * round + i);
        }
        for pod in &pods {
            agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
            let r = lattice_get(pod, "/churn");
            assert_eq!(r.status, 200, "round {round}: {r:?}\n{}", agent.log());
            enrollments += 1;
        }
        if round == ROUNDS - 1 {
            last_round = pods;
            break;
        }
        agent.kill();
        // While no agent runs: the round's pods go, and the first pod
        // stops asking for signing.
        for pod in pods {
            cluster.api.delete_pod("churn", pod.name());
            drop(pod);
        }
        if round == 0 {
            cluster.apply(&stays_obj.clone().without_annotation(INJECT));
        }
        agent = start();
        assert_eq!(
            map_entries(&gate),
            0,
            "round {round}: the restarted agent left namespaces enrolled that no pod asks for\n{}",
            agent.log()
        );
        let r = lattice_get(&stays, &format!("/stopped-asking/{round}"));
        assert_eq!(
            r.status,
            403,
            "round {round}: a pod that stopped asking is still intercepted: {r:?}\n{}",
            agent.log()
        );
    }
    assert!(enrollments > CAPACITY, "{enrollments} enrollments");
    assert_eq!(map_entries(&gate), last_round.len());

    // More pods at once than the table holds: the one too many fails with
    // a reason naming the limit (and is retried); the others are served.
    let extra: Vec<NodePod> = (0..=CAPACITY - last_round.len())
        .map(|i| {
            cluster
                .node
                .add_pod(PodSpec::new("churn", &format!("extra-{i}")))
        })
        .collect();
    for (i, pod) in extra.iter().enumerate() {
        apply_irsa_pod(&cluster, pod, "extra", 100 + i);
    }
    let deadline = Instant::now() + ENROLL_TIMEOUT;
    let states = loop {
        let rows: Vec<_> = extra
            .iter()
            .filter_map(|p| agent.pod_row(p.uid()))
            .collect();
        let states: Vec<String> = rows
            .iter()
            .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
            .collect();
        if states.len() == extra.len() && states.iter().all(|s| s == "enrolled" || s == "failed") {
            break rows;
        }
        assert!(Instant::now() < deadline, "{rows:?}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let failed: Vec<_> = states.iter().filter(|r| r["state"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{states:?}");
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("is full") && reason.contains("--max-pods"),
        "{reason}"
    );
    assert_eq!(map_entries(&gate), CAPACITY);
    let signed_unexpectedly = verifier
        .requests()
        .iter()
        .filter(|r| r.status != 200 && !r.path.starts_with("/stopped-asking"))
        .count();
    assert_eq!(signed_unexpectedly, 0, "{:?}", verifier.requests());
}

/// Credential series (`identity` label) live as long as a pod uses the
/// identity: two pods sharing one keep it while either runs; when the last
/// one goes, its series go too, so pod churn does not grow `/metrics`.
#[test]
fn credential_series_go_with_the_last_pod_of_their_identity() {
    if !require_root("credential_series_go_with_the_last_pod_of_their_identity") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let a1 = cluster.node.add_pod(PodSpec::new("shop", "shared-1"));
    let a2 = cluster.node.add_pod(PodSpec::new("shop", "shared-2"));
    let b = cluster.node.add_pod(PodSpec::new("shop", "alone-0"));
    apply_irsa_pod(&cluster, &a1, "shared", 1);
    apply_irsa_pod(&cluster, &a2, "shared", 2);
    apply_irsa_pod(&cluster, &b, "alone", 3);
    let agent = start_agent(&cluster, &[]);
    for pod in [&a1, &a2, &b] {
        agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
        assert_eq!(lattice_get(pod, "/x").status, 200);
    }
    let series = |sa: &str| -> Vec<String> {
        let needle = format!("identity=\"irsa:{}\"", role_arn(sa));
        let (_, metrics) = agent.admin("/metrics");
        metrics
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        series("shared").len() >= 2 && series("alone").len() >= 2,
        "shared: {:?}, alone: {:?}",
        series("shared"),
        series("alone")
    );
    let gone = |sa: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !series(sa).is_empty() {
            assert!(
                Instant::now() < deadline,
                "series of identity {sa} stay after its last pod went: {:?}",
                series(sa)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    cluster.api.delete_pod("shop", b.name());
    agent.wait_pod(b.uid(), None, ENROLL_TIMEOUT);
    gone("alone");
    cluster.api.delete_pod("shop", a1.name());
    agent.wait_pod(a1.uid(), None, ENROLL_TIMEOUT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !series("shared").is_empty(),
        "a pod still uses the identity"
    );
    assert_eq!(lattice_get(&a2, "/still").status, 200);
    cluster.api.delete_pod("shop", a2.name());
    agent.wait_pod(a2.uid(), None, ENROLL_TIMEOUT);
    gone("shared");
}

/// An agent taking over from a running one (a rolling update) brings the
/// gate in line with the pods it serves: a namespace entry no pod asks for
/// (left, say, by an agent that crashed before the running one started
/// and did not reconcile the gate) is removed; the served pod stays
/// served throughout.
#[test]
fn an_agent_taking_over_removes_gate_entries_no_pod_asks_for() {
    if !require_root("an_agent_taking_over_removes_gate_entries_no_pod_asks_for") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let bpffs = Bpffs::new();
    let pin = bpffs.path().to_str().unwrap().to_owned();
    let gate = bpffs.path().join("map_ENROLLED_NETNS");
    let p = cluster.node.add_pod(PodSpec::new("shop", "takeover-0"));
    apply_irsa_pod(&cluster, &p, "takeover", 1);
    let old = start_agent(&cluster, &["--pin", &pin]);
    old.wait_pod(p.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&p, "/before").status, 200);
    // A cookie no namespace has (the kernel counts them up from 1).
    map_update(&gate, &u64::MAX.to_ne_bytes(), &1u32.to_ne_bytes());
    assert_eq!(map_entries(&gate), 2);

    let new = start_agent(&cluster, &["--pin", &pin]);
    old.wait_log("a new agent took the pods over", ENROLL_TIMEOUT);
    assert_eq!(new.pod_row(p.uid()).expect("in /pods")["state"], "enrolled");
    assert_eq!(
        map_entries(&gate),
        1,
        "the stale entry stays after the takeover\n{}",
        new.log()
    );
    assert_eq!(lattice_get(&p, "/after").status, 200);
}
