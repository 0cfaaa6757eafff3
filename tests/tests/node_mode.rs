//! Node mode end to end, against the real kernel: `lattice-agent node` in a
//! test node's network namespace serves the pods the Kubernetes API stand-in
//! shows on that node. Pods are network namespaces wired by Debian's CNI
//! plugins, with kubelet-like cgroups and projected token files; STS is
//! moto, the Pod Identity Agent is the verifier's container-credentials
//! endpoint on 169.254.170.23, and the Lattice service is the botocore
//! verifier on 169.254.171.33 in the node's namespace, recording which
//! access key (and which role) signed each request and from which address
//! it came. Nothing leaves the node's namespace.
//!
//! Needs root, the built agent and test binaries, the test venv.

use std::{
    collections::HashMap,
    fs,
    time::{Duration, Instant},
};

use lattice_tests::{
    Bpffs,
    agent::release_agent_bin,
    bpftool::{attached_programs, map_entries},
    node::{LATTICE_V4, POD_IDENTITY_V4, PodSpec},
    node_agent::{
        AgentStart, AppReply, Cluster, INJECT, LATTICE_HOST, NodeAgent, POD_IDENTITY_TOKEN_FILE,
        POD_IDENTITY_VOLUME, PodObject, REGION, app_request, apply_irsa_pod, irsa_token,
        lattice_get, role_arn, sequential_gets, start_agent, sts_url,
    },
    reliability::Record,
    require_root, test_bin,
    verifier::UNUSED_KEY,
};
use serde_json::json;

const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);

fn url(path: &str) -> String {
    format!("http://{LATTICE_V4}{path}")
}

/// Two pods with different roles, 1,000 requests interleaved between them
/// (ten concurrent keep-alive clients): every request reaches the service
/// from its own pod's address, signed with its own pod's role; none with
/// the other's, none with the node's. `/pods`, metrics and Events say so.
#[test]
fn pods_sign_with_their_own_identity_none_cross_signed() {
    if !require_root("pods_sign_with_their_own_identity_none_cross_signed") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let a = cluster.node.add_pod(PodSpec::new("shop", "cart-0"));
    let b = cluster.node.add_pod(PodSpec::new("shop", "pay-0"));
    apply_irsa_pod(&cluster, &a, "cart", 1);
    apply_irsa_pod(&cluster, &b, "pay", 2);
    let agent = start_agent(&cluster, &[]);
    agent.wait_pod(a.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    agent.wait_pod(b.uid(), Some("enrolled"), ENROLL_TIMEOUT);

    let host = format!("Host: {LATTICE_HOST}");
    let clients: Vec<_> = (0..5)
        .flat_map(|i| [(&a, i), (&b, i)])
        .map(|(pod, i)| {
            pod.command("curl")
                .uid(1000)
                .args(["-q", "-sS", "--noproxy", "*", "-o", "/dev/null"])
                .args(["-w", "%{http_code}\\n", "-H", &host])
                .arg(url(&format!("/c{i}/r[1-100]")))
                .spawn()
        })
        .collect();
    for mut c in clients {
        let status = c
            .wait_timeout(Duration::from_secs(120))
            .expect("client finished");
        let out = c.output(status);
        assert!(out.success(), "{out}");
        assert_eq!(
            out.stdout.lines().filter(|l| *l == "200").count(),
            100,
            "{out}"
        );
    }

    let seen = verifier.wait_requests(1000, Duration::from_secs(30));
    assert_eq!(seen.len(), 1000);
    let pods: HashMap<String, String> = [
        (a.ip().to_string(), role_arn("cart")),
        (b.ip().to_string(), role_arn("pay")),
    ]
    .into();
    let mut per_pod: HashMap<&str, usize> = HashMap::new();
    let mut cross_signed = 0;
    for r in &seen {
        assert_eq!(r.status, 200, "{r:?}");
        let want = pods
            .get(&r.peer)
            .unwrap_or_else(|| panic!("request from {} (not a pod's address): {r:?}", r.peer));
        if r.role_arn.as_deref() != Some(want.as_str()) {
            cross_signed += 1;
        }
        *per_pod.entry(r.peer.as_str()).or_default() += 1;
        assert_ne!(r.access_key.as_deref(), Some(UNUSED_KEY.access_key_id));
    }
    assert_eq!(cross_signed, 0, "requests signed with another pod's role");
    assert_eq!(per_pod.values().copied().collect::<Vec<_>>(), [500, 500]);
    let sessions: Vec<_> = seen.iter().filter_map(|r| r.session_name.clone()).collect();
    assert!(
        sessions.iter().any(|s| s == "lattice-shop-cart"),
        "{sessions:?}"
    );

    for (pod, sa) in [(&a, "cart"), (&b, "pay")] {
        let row = agent.pod_row(pod.uid()).expect("in /pods");
        assert_eq!(row["namespace"], "shop");
        assert_eq!(row["name"], pod.name());
        assert_eq!(row["identity"], "irsa");
        assert_eq!(row["role_arn"], role_arn(sa));
        assert_eq!(row["service_account"], sa);
        assert_eq!(row["requests"], 500);
        assert_eq!(row["errors"], 0);
        assert!(!row.to_string().to_lowercase().contains("secret"), "{row}");
    }
    let (_, metrics) = agent.admin("/metrics");
    assert!(
        metrics.contains(
            "lattice_requests_total{namespace=\"shop\",pod=\"cart-0\",method=\"GET\",status=\"200\"} 500"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("lattice_enrolled_pods 2"), "{metrics}");
    let events = cluster.api.events();
    for pod in [&a, &b] {
        assert!(
            events.iter().any(|e| e["reason"] == "Enrolled"
                && e["regarding"]["uid"] == pod.uid()
                && e["note"].as_str().is_some_and(|n| n.contains("role/"))),
            "no Enrolled event for {}: {events:?}",
            pod.name()
        );
    }
}

/// Enrollment follows the API while pods run: a pod annotated after it
/// started is served without a restart, removing the annotation stops it,
/// a namespace label enrolls its pods (unless a pod opts out), a
/// hostNetwork pod is refused with a reason, a deleted pod is let go. A
/// pod not asking, and the node itself, are never touched: their requests
/// reach the service unsigned.
#[test]
fn enrollment_follows_annotations_and_namespace_labels() {
    if !require_root("enrollment_follows_annotations_and_namespace_labels") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let p = cluster.node.add_pod(PodSpec::new("shop", "late-0"));
    let plain = PodObject::new(&p, cluster.node.name())
        .service_account("late")
        .irsa(&p, &role_arn("late"), REGION, &irsa_token(1));
    cluster.apply(&plain);
    let agent = start_agent(&cluster, &[]);
    let attached = attached_programs(&cluster.node.cgroup_root().join("kubepods.slice"));
    assert_eq!(attached.len(), 4, "{attached:?}");

    let unsigned = |reply: &AppReply, who: &str| {
        assert_eq!(reply.status, 403, "{who}: {reply:?}");
        assert!(
            reply.body.contains("AccessDeniedException"),
            "{who}: {reply:?}"
        );
    };
    unsigned(&lattice_get(&p, "/before"), "pod not annotated");
    assert_eq!(agent.pod_row(p.uid()), None);
    let node_app = app_request_from_node(&cluster);
    unsigned(&node_app, "the node itself");

    let started = Instant::now();
    cluster.apply(&plain.clone().annotated());
    agent.wait_pod(p.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let r = lattice_get(&p, "/after");
    assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());
    eprintln!("annotated → first signed 200: {:?}", started.elapsed());

    cluster.apply(&plain.clone().without_annotation(INJECT));
    agent.wait_pod(p.uid(), None, ENROLL_TIMEOUT);
    unsigned(&lattice_get(&p, "/unannotated"), "annotation removed");

    // The namespace label, and a pod opting out of it.
    cluster.api.apply_namespace(json!({
        "metadata": {"name": "labeled", "labels": {INJECT: "true"}}
    }));
    let q = cluster.node.add_pod(PodSpec::new("labeled", "q-0"));
    let out = cluster.node.add_pod(PodSpec::new("labeled", "out-0"));
    cluster.apply(
        &PodObject::new(&q, cluster.node.name())
            .service_account("q")
            .irsa(&q, &role_arn("q"), REGION, &irsa_token(2)),
    );
    cluster.apply(&PodObject::new(&out, cluster.node.name()).annotation(INJECT, "false"));
    agent.wait_pod(q.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&q, "/labeled").status, 200);
    unsigned(
        &lattice_get(&out, "/opted-out"),
        "pod opting out of its namespace's label",
    );
    assert_eq!(agent.pod_row(out.uid()), None);

    // hostNetwork: refused, with a reason, an Event and a log line.
    let h = cluster.node.add_pod(PodSpec::new("shop", "hostnet-0"));
    cluster.apply(
        &PodObject::new(&h, cluster.node.name())
            .annotated()
            .host_network(),
    );
    let row = agent
        .wait_pod(h.uid(), Some("refused"), ENROLL_TIMEOUT)
        .unwrap();
    assert!(
        row["reason"].as_str().unwrap().contains("hostNetwork"),
        "{row}"
    );
    agent.wait_log("not enrolling pod", ENROLL_TIMEOUT);
    cluster.wait_event(h.uid(), "EnrollmentRefused");

    // Deleting the pod lets it go.
    cluster.api.delete_pod("labeled", "q-0");
    agent.wait_pod(q.uid(), None, ENROLL_TIMEOUT);
    unsigned(&lattice_get(&q, "/deleted"), "pod deleted from the API");
    cluster.wait_event(q.uid(), "Unenrolled");

    let signed_by_node = verifier
        .requests()
        .iter()
        .filter(|r| r.access_key.as_deref() == Some(UNUSED_KEY.access_key_id))
        .count();
    assert_eq!(signed_by_node, 0);
}

/// The node's own request to the Lattice address (curl in the node's
/// namespace, outside every pod): never intercepted.
fn app_request_from_node(cluster: &Cluster) -> AppReply {
    let out = cluster
        .node
        .command("curl")
        .uid(1000)
        .args([
            "-q",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-w",
            "\nSTATUS %{http_code}",
        ])
        .args([
            "-H",
            &format!("Host: {LATTICE_HOST}"),
            &url("/from-the-node"),
        ])
        .run(Duration::from_secs(20));
    let (body, status) = out.stdout.rsplit_once("\nSTATUS ").expect("status");
    AppReply {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: out.stderr,
    }
}

/// An enrollment that cannot succeed yet (the API shows an IP the pod's
/// network namespace does not hold) is reported, with the reason, on
/// `/pods` and as one Event, and retried with backoff until it succeeds;
/// a pod without IPv6 is served on IPv4 alone.
#[test]
fn failed_enrollment_is_reported_and_retried() {
    if !require_root("failed_enrollment_is_reported_and_retried") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let p = cluster
        .node
        .add_pod(PodSpec::new("shop", "v4only-0").ipv6(false));
    let good = PodObject::new(&p, cluster.node.name())
        .annotated()
        .service_account("v4only")
        .irsa(&p, &role_arn("v4only"), REGION, &irsa_token(1));
    let mut wrong = good.clone();
    wrong.json["status"]["podIP"] = "169.254.99.99".into();
    wrong.json["status"]["podIPs"] = json!([{"ip": "169.254.99.99"}]);
    cluster.apply(&wrong);
    let agent = start_agent(&cluster, &[]);
    let row = agent
        .wait_pod(p.uid(), Some("failed"), ENROLL_TIMEOUT)
        .unwrap();
    let reason = row["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("does not hold the pod's IP") && reason.contains("169.254.99.99"),
        "{row}"
    );
    let event = cluster.wait_event(p.uid(), "EnrollmentFailed");
    assert!(
        event["note"].as_str().unwrap().contains("169.254.99.99"),
        "{event}"
    );
    assert_eq!(event["type"], "Warning");
    // Retried (backoff from 200 ms), but reported once per reason.
    std::thread::sleep(Duration::from_secs(2));
    let failures = cluster
        .api
        .events()
        .iter()
        .filter(|e| e["reason"] == "EnrollmentFailed" && e["regarding"]["uid"] == p.uid())
        .count();
    assert_eq!(failures, 1, "{:?}", cluster.api.events());
    let (_, metrics) = agent.admin("/metrics");
    let attempts: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lattice_enrollments_total{result=\"error\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(attempts >= 3.0, "retried {attempts} times:\n{metrics}");

    cluster.apply(&good);
    agent.wait_pod(p.uid(), Some("enrolled"), Duration::from_secs(40));
    let r = lattice_get(&p, "/v4-only");
    assert_eq!(r.status, 200, "{r:?}\n{}", agent.log());
}

/// A pod asking for signing but with no AWS identity is served, and every
/// request gets 503 naming the pod and what is missing; the node's own
/// credentials (the agent has none, and the service would refuse them) are
/// never used. An Event says so.
#[test]
fn a_pod_without_identity_gets_503_naming_it() {
    if !require_root("a_pod_without_identity_gets_503_naming_it") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let p = cluster.node.add_pod(PodSpec::new("shop", "nocreds-0"));
    cluster.apply(
        &PodObject::new(&p, cluster.node.name())
            .annotated()
            .env("AWS_REGION", REGION),
    );
    let agent = start_agent(&cluster, &[]);
    let row = agent
        .wait_pod(p.uid(), Some("enrolled"), ENROLL_TIMEOUT)
        .unwrap();
    assert_eq!(row["identity"], "none");
    let r = lattice_get(&p, "/x");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body.starts_with(
            "lattice-agent: no AWS credentials: pod shop/nocreds-0 has no AWS identity"
        ),
        "{r:?}"
    );
    assert!(
        r.body.contains("AWS_ROLE_ARN") && r.body.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        "{r:?}"
    );
    assert!(
        verifier.requests().is_empty(),
        "nothing reached the service"
    );
    let event = cluster.wait_event(p.uid(), "Enrolled");
    assert!(
        event["note"].as_str().unwrap().contains("cannot sign"),
        "{event}"
    );
    assert_eq!(agent.pod_row(p.uid()).unwrap()["errors"], 1);
}

/// EKS Pod Identity: the agent calls the Pod Identity Agent's endpoint with
/// the pod's own token, re-reading the token file on every refresh. The
/// endpoint accepts only the current token and issues keys valid for 6 s;
/// after the kubelet rotates the token, requests keep succeeding well past
/// the lifetime of every key fetched with the old one.
#[test]
fn pod_identity_follows_token_rotation() {
    if !require_root("pod_identity_follows_token_rotation") {
        return;
    }
    let cluster = Cluster::new();
    let expected = cluster.node.temp_dir().join("pod-identity-token");
    fs::write(&expected, "pod-identity-token-1").unwrap();
    let token_spec = format!("@{}", expected.display());
    let verifier = cluster.lattice_service(&[
        "--container-creds-host",
        POD_IDENTITY_V4,
        "--container-creds-port",
        "80",
        "--container-creds-token",
        &token_spec,
        "--container-creds-lifetime",
        "6",
    ]);
    let p = cluster.node.add_pod(PodSpec::new("shop", "podid-0"));
    cluster.apply(
        &PodObject::new(&p, cluster.node.name())
            .annotated()
            .service_account("podid")
            .pod_identity(&p, REGION, "pod-identity-token-1"),
    );
    let agent = start_agent(&cluster, &[]);
    let row = agent
        .wait_pod(p.uid(), Some("enrolled"), ENROLL_TIMEOUT)
        .unwrap();
    assert_eq!(row["identity"], "pod-identity");
    assert_eq!(lattice_get(&p, "/first").status, 200);
    let before = verifier.issued().len();
    assert!(before >= 1);

    // The kubelet rotates the token; the endpoint now takes only the new one.
    p.write_projected(
        POD_IDENTITY_VOLUME,
        POD_IDENTITY_TOKEN_FILE,
        "pod-identity-token-2",
    );
    fs::write(&expected, "pod-identity-token-2").unwrap();
    let rotated = Instant::now();
    let mut failures = Vec::new();
    while rotated.elapsed() < Duration::from_secs(14) {
        let r = lattice_get(&p, "/during");
        if r.status != 200 {
            failures.push(r);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", agent.log());
    let issued = verifier.issued();
    assert!(
        issued.len() >= before + 2,
        "keys issued after the rotation: {}",
        issued.len() - before
    );
    // The last request, more than a key's life after the rotation, was
    // signed with a key fetched with the new token.
    let used: Vec<_> = verifier
        .requests()
        .into_iter()
        .filter_map(|r| r.access_key)
        .collect();
    let last_used = used.last().expect("requests were signed");
    assert!(
        issued[before..].iter().any(|k| &k.access_key == last_used),
        "the last request used {last_used}, a key from before the rotation"
    );
}

/// 100 pods come and go (each enrolled, used once, deleted): afterwards the
/// agent holds no more file descriptors than before, the pinned maps hold
/// no entry, the programs are attached once, `/pods` is empty and no AWS
/// identity is left refreshing.
#[test]
fn hundred_pods_come_and_go_leaving_nothing() {
    if !require_root("hundred_pods_come_and_go_leaving_nothing") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let bpffs = Bpffs::new();
    let pin = bpffs.path().to_str().unwrap().to_owned();
    let agent = start_agent(&cluster, &["--pin", &pin]);
    let fds = |pid: i32| fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    // One pod first, to count the descriptors that stay (pools, runtime).
    let warm = cluster.node.add_pod(PodSpec::new("churn", "warm"));
    let warm_obj = apply_irsa_pod(&cluster, &warm, "warm", 0);
    agent.wait_pod(warm.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&warm, "/warm").status, 200);
    let _ = warm_obj;
    cluster.api.delete_pod("churn", "warm");
    agent.wait_pod(warm.uid(), None, ENROLL_TIMEOUT);
    drop(warm);
    std::thread::sleep(Duration::from_millis(500));
    let baseline = fds(agent.pid());

    for i in 0..100 {
        let pod = cluster
            .node
            .add_pod(PodSpec::new("churn", &format!("p{i}")));
        apply_irsa_pod(&cluster, &pod, &format!("sa{}", i % 7), i + 10);
        agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
        let r = lattice_get(&pod, "/once");
        assert_eq!(r.status, 200, "cycle {i}: {r:?}\n{}", agent.log());
        cluster.api.delete_pod("churn", pod.name());
        agent.wait_pod(pod.uid(), None, ENROLL_TIMEOUT);
    }
    // Pods drain in the background; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds(agent.pid()) > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = fds(agent.pid());
    assert!(
        after <= baseline,
        "fds: {baseline} before, {after} after 100 pods"
    );
    let pinned = std::path::Path::new(&pin);
    for map in [
        "map_ENROLLED_NETNS",
        "map_ORIG_DST_BY_PEER",
        "map_ORIG_DST_BY_COOKIE",
    ] {
        assert_eq!(map_entries(&pinned.join(map)), 0, "{map} not empty");
    }
    let attached = attached_programs(&cluster.node.cgroup_root().join("kubepods.slice"));
    assert_eq!(attached.len(), 4, "{attached:?}");
    assert_eq!(agent.pods()["pods"].as_array().unwrap().len(), 0);
    let (_, metrics) = agent.admin("/metrics");
    assert!(metrics.contains("lattice_enrolled_pods 0"), "{metrics}");
    assert!(
        !metrics.contains("pod=\"p"),
        "series of departed pods remain:\n{metrics}"
    );
}

/// One pod floods its proxy: 1,900 connections trickling a request head
/// (slowloris) and 100 sending keep-alive requests back to back, 2,000 in
/// all, beyond its per-pod connection limit. Meanwhile another pod's
/// requests (signed with its own role) all succeed and none waits as long
/// as a dropped SYN's first retransmit (1 s), the mark of a starved
/// listener; the median stays under a quarter second. They do slow down:
/// one proxy thread serves both pods and the flood keeps it busy; the
/// figures before and during the flood are printed, and the p99 target
/// (50 ms) is checked by `cargo xtask bench`'s node scenario. Both upstreams are
/// cheap keep-alive services in the node's namespace, so the agent, not the
/// test's own servers, is what the flood saturates; and the agent is the
/// image's release binary, the one users run. (The flooder's own reconnects
/// wait in its backlog behind its slowloris holders at the pod's connection
/// limit: it only hurts itself.)
#[test]
fn a_flooding_pod_does_not_starve_another() {
    if !require_root("a_flooding_pod_does_not_starve_another") {
        return;
    }
    let cluster = Cluster::new();
    let _sts = cluster.lattice_service(&[]);
    let _services = cluster.keep_alive_services(&["169.254.171.34", "169.254.171.35"]);
    let flooder = cluster.node.add_pod(PodSpec::new("shop", "flood-0"));
    let victim = cluster.node.add_pod(PodSpec::new("shop", "quiet-0"));
    apply_irsa_pod(&cluster, &flooder, "flood", 1);
    apply_irsa_pod(&cluster, &victim, "quiet", 2);
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command_with(release_agent_bin(), [] as [&str; 0]),
        &[("AWS_ENDPOINT_URL_STS", &sts)],
    );
    agent.wait_pod(flooder.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    agent.wait_pod(victim.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let victim_url = "http://169.254.171.35/victim";
    let warm = app_request(&victim, &[victim_url]);
    assert_eq!(warm.status, 200, "{warm:?}");
    assert!(
        warm.body.contains("credential=ASIA"),
        "victim's request unsigned: {warm:?}"
    );

    let before = sequential_gets(&victim, victim_url, 200);

    // As root (intercepted like any UID but 101).
    let mut flood = flooder
        .command(test_bin("lattice-test-client"))
        .args(["flood", "169.254.171.34:80", "1900", "100", "20"])
        .spawn();
    std::thread::sleep(Duration::from_secs(5));
    let during = sequential_gets(&victim, victim_url, 400);
    let status = flood
        .wait_timeout(Duration::from_secs(60))
        .expect("flood ends");
    let flood_out = flood.output(status);
    let held: usize = field(&flood_out.stdout, "held");
    let requests: usize = field(&flood_out.stdout, "requests");
    let record = Record {
        id: "node-flood",
        fault: "node mode: one pod floods the agent (1,900 slowloris and 100 back-to-back \
                keep-alive connections, 20 s)"
            .into(),
        load: "another pod: 600 sequential requests on one kept-alive connection, \
               200 before the flood and 400 during it"
            .into(),
        attempted: 600,
        failed: before.failed + during.failed,
        unsigned: before.unsigned + during.unsigned,
        recovery_ms: None,
        notes: format!(
            "the other pod's p50/p99 {:.1}/{:.1} ms before, {:.1}/{:.1} ms during the flood; \
             the flooder held {held} connections and completed {requests} requests",
            before.p50_ms, before.p99_ms, during.p50_ms, during.p99_ms
        ),
    };
    record.save();
    assert_eq!(record.failed, 0, "the other pod's requests failed");
    assert_eq!(record.unsigned, 0, "the other pod's requests went unsigned");
    assert!(
        held >= 1000,
        "the flood held only {held} connections: {flood_out}"
    );
    // The flood is served too: it keeps the agent at least ten times as
    // busy as the other pod's requests.
    assert!(
        requests > 10 * 400,
        "the flood's active clients got little through: {flood_out}"
    );
    assert!(
        during.p50_ms < 250.0 && during.p99_ms < 1000.0,
        "victim starved: p50 {:.1} ms, p99 {:.1} ms under flood \
         (before it: p50 {:.1} ms, p99 {:.1} ms)\n{}",
        during.p50_ms,
        during.p99_ms,
        before.p50_ms,
        before.p99_ms,
        agent.log()
    );
}

fn field(line: &str, name: &str) -> usize {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// The API server forgets the watch history (the watch gets 410 Expired)
/// while a pod is annotated: the agent re-lists and enrolls it.
#[test]
fn expired_watch_relists_and_misses_nothing() {
    if !require_root("expired_watch_relists_and_misses_nothing") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let p = cluster.node.add_pod(PodSpec::new("shop", "gap-0"));
    let plain = PodObject::new(&p, cluster.node.name())
        .service_account("gap")
        .irsa(&p, &role_arn("gap"), REGION, &irsa_token(1));
    cluster.apply(&plain);
    let agent = start_agent(&cluster, &[]);
    let lists_before = list_requests(&cluster);
    // The agent is cut off: its watches end and cannot resume until the
    // annotation has happened and the history holding it is forgotten.
    let hold = cluster.api.hold_watches();
    cluster.api.close_watches();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.api.open_watches() > 0 {
        assert!(Instant::now() < deadline, "watches still open");
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.apply(&plain.clone().annotated());
    cluster.api.compact();
    drop(hold);
    agent.wait_pod(p.uid(), Some("enrolled"), Duration::from_secs(30));
    assert_eq!(lattice_get(&p, "/after-gap").status, 200);
    assert!(
        list_requests(&cluster) > lists_before,
        "no re-list after 410: {:?}",
        cluster.api.requests()
    );
}

fn list_requests(cluster: &Cluster) -> usize {
    cluster
        .api
        .requests()
        .iter()
        .filter(|r| r.path() == "/api/v1/pods" && !r.is_watch())
        .count()
}

/// SIGTERM while the API has not answered the first list yet (the API
/// down as the node drains): the agent exits at once instead of waiting
/// for an answer that may never come until the kubelet kills it.
#[test]
fn an_agent_stopped_before_the_api_answers_exits_promptly() {
    if !require_root("an_agent_stopped_before_the_api_answers_exits_promptly") {
        return;
    }
    let cluster = Cluster::new();
    let _lists = cluster.api.hold_lists();
    let mut agent = NodeAgent::start_until(
        &cluster,
        cluster.agent_command(["--log", "info"]),
        &AgentStart::default(),
        "worker serving",
    );
    // The worker lists as it starts; the stand-in holds the answer.
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Instant::now();
    let status = agent.stop_within(Duration::from_secs(5));
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert!(
        !agent.log().contains("lattice-agent ready"),
        "the agent listed the pods: the check proves nothing\n{}",
        agent.log()
    );
    eprintln!("stopped {:?} after SIGTERM", stopped.elapsed());
}
