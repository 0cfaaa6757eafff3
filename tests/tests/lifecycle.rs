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
    bpffs::{MountNs, SysFsBpf},
    bpftool::attached_programs,
    node::{LATTICE_V4, NodePod, PodSpec},
    node_agent::{
        self, AgentPin, AgentStart, Cluster, NodeAgent, PodObject, load_count, load_result,
        sts_url, unsigned_requests,
    },
    reliability::Record,
    require_root,
    spawn::Stream,
    time::monotonic_ns,
    verifier::{DEMO_CREDENTIALS, Verifier, python},
};

const HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";
/// How long the kubelet takes to start a crashed container again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The app's load: new connection per request, refused connects retried.
fn start_load(pod: &NodePod, seconds: u64) -> ChildGuard {
    node_agent::start_load(pod, "load", seconds)
}

/// A pod annotated for the node agent, with an IRSA identity (role `node`).
fn annotated_irsa_pod(cluster: &Cluster, name: &str) -> NodePod {
    let pod = cluster.node.add_pod(PodSpec::new("shop", name));
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
    pod
}

/// The node agent `bin` with its programs and maps pinned under `pin`.
fn start_pinned_agent(cluster: &Cluster, bin: &std::path::Path, pin: &str) -> NodeAgent {
    NodeAgent::start(
        cluster,
        cluster.agent_command_with(bin, ["--pin", pin]),
        &[("AWS_ENDPOINT_URL_STS", &sts_url())],
    )
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
        attempted: load_count(&result, "ok")
            + load_count(&result, "failed")
            + load_count(&result, "refused"),
        failed: load_count(&result, "failed") + load_count(&result, "refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: recovered.map(|r| (r.saturating_sub(restarted)) as f64 / 1e6),
        notes: format!(
            "connects refused while no sidecar ran ({} refusals); the restarted sidecar was \
             ready after {start_ms:.0} ms; a connect made as it replaced the programs can \
             find no record (421)",
            load_count(&result, "refused")
        ),
    };
    record.save();
    assert_eq!(
        record.unsigned, 0,
        "unsigned requests reached the service: {result}"
    );
    assert!(
        load_count(&result, "refused") > 0,
        "the app never saw the gap: {result}"
    );
    assert!(
        result["first_refused_ns"]
            .as_u64()
            .is_some_and(|f| u128::from(f) >= killed),
        "refusals began before the kill? {result}"
    );
    assert!(recovered.is_some(), "never recovered: {result}");
    assert!(load_count(&result, "ok") > 100, "{result}");
}

/// The node agent killed under load, started as users start it, without
/// `--pin`: node mode pins by default (at `/sys/fs/bpf/lattice-node`,
/// created on the node's bpffs: here a bpffs mounted there in a mount
/// namespace of the test's own), so its programs and maps stay, the pod's
/// namespace stays enrolled, and while no agent runs the pod's connects
/// are refused, never unsigned; the restarted agent takes the pins over
/// (no second attachment), re-enrolls the pod from the API and serves
/// again, without the pod restarting.
#[test]
fn node_agent_killed_under_load_fails_closed_and_recovers() {
    if !require_root("node_agent_killed_under_load_fails_closed_and_recovers") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let mount_ns = MountNs::new(SysFsBpf::Bpffs);
    let pod = annotated_irsa_pod(&cluster, "node-0");
    let sts = sts_url();
    let env = [("AWS_ENDPOINT_URL_STS", sts.as_str())];
    let start = || {
        NodeAgent::start_with(
            &cluster,
            cluster.agent_command_via(&mount_ns.command_prefix(), [] as [&str; 0]),
            &AgentStart {
                env: &env,
                pin: AgentPin::Default,
                ..AgentStart::default()
            },
        )
    };
    let mut agent = start();
    agent.wait_pod(pod.uid(), Some("enrolled"), Duration::from_secs(15));
    let kubepods = cluster.node.cgroup_root().join("kubepods.slice");
    let attached = attached_programs(&kubepods);
    assert_eq!(attached.len(), 4, "{attached:?}");
    let pins = std::process::Command::new("nsenter")
        .args(&mount_ns.command_prefix()[1..])
        .args(["ls", "/sys/fs/bpf/lattice-node"])
        .output()
        .expect("list the default pin directory");
    let pins = String::from_utf8_lossy(&pins.stdout).into_owned();

    let load = start_load(&pod, 8);
    std::thread::sleep(Duration::from_secs(2));
    agent.kill();
    let after_kill = attached_programs(&kubepods);
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
        fault: "node agent SIGKILL, restarted 1 s later (pinned by default)".into(),
        load: "1 app, new connection per request, back to back, 8 s".into(),
        attempted: load_count(&result, "ok")
            + load_count(&result, "failed")
            + load_count(&result, "refused"),
        failed: load_count(&result, "failed") + load_count(&result, "refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: recovered.map(|r| (r.saturating_sub(restarted)) as f64 / 1e6),
        notes: format!(
            "connects refused while no agent ran ({} refusals); recovery includes the agent's start and the pod's re-enrollment",
            load_count(&result, "refused")
        ),
    };
    record.save();
    assert_eq!(
        record.unsigned, 0,
        "unsigned requests reached the service: {result}"
    );
    assert_eq!(after_kill, attached, "pinned programs stay");
    assert!(
        pins.contains("link_lattice_connect4") && pins.contains("map_ENROLLED_NETNS"),
        "nothing pinned at the default path: {pins:?}"
    );
    assert!(
        load_count(&result, "refused") > 0,
        "the app never saw the gap: {result}"
    );
    assert!(
        recovered.is_some(),
        "never recovered: {result}\n{}",
        agent.log()
    );
}

/// The Lattice service itself goes away for 2 s under load and comes back:
/// meanwhile the agent answers each request with 502 (the app's connects
/// to the agent still succeed: no hang, no refusal), nothing goes out
/// unsigned, and requests succeed again once the service is back, without
/// anything restarting.
#[test]
fn upstream_down_under_load_502s_then_recovers() {
    if !require_root("upstream_down_under_load_502s_then_recovers") {
        return;
    }
    let cluster = Cluster::new();
    let python = python().unwrap_or_else(|m| panic!("{m}"));
    let service = || {
        Verifier::start_as(
            cluster.node.command(&python),
            LATTICE_V4,
            80,
            &DEMO_CREDENTIALS,
            &[],
        )
    };
    let before = service();
    let pod = cluster.node.add_pod(PodSpec::new("shop", "upstream-0"));
    let container = pod.add_container();
    let _sidecar = start_sidecar(&cluster, &pod, &container);

    let load = start_load(&pod, 8);
    std::thread::sleep(Duration::from_secs(2));
    let unsigned_before = unsigned_requests(&before);
    drop(before);
    std::thread::sleep(Duration::from_secs(2));
    let after = service();
    let back = monotonic_ns();
    let result = load_result(load, Duration::from_secs(40));
    let recovered = result["recovered_ns"].as_u64().map(u128::from);
    let record = Record {
        id: "upstream-down",
        fault: "the Lattice service down for 2 s".into(),
        load: "1 app, new connection per request, back to back, 8 s".into(),
        attempted: load_count(&result, "ok")
            + load_count(&result, "failed")
            + load_count(&result, "refused"),
        failed: load_count(&result, "failed") + load_count(&result, "refused"),
        unsigned: unsigned_before + unsigned_requests(&after),
        recovery_ms: recovered.map(|r| (r.saturating_sub(back)) as f64 / 1e6),
        notes: format!(
            "every failure a 502 from the agent ({} during the outage); recovery counted from \
             the service listening again",
            load_count(&result, "failed")
        ),
    };
    record.save();
    assert_eq!(
        record.unsigned, 0,
        "unsigned requests reached the service: {result}"
    );
    assert_eq!(load_count(&result, "refused"), 0, "{result}");
    assert!(
        load_count(&result, "failed") > 0,
        "the outage went unseen: {result}"
    );
    let reasons = result["reasons"].as_array().expect("reasons");
    assert!(
        reasons
            .iter()
            .all(|r| r.as_str().is_some_and(|r| r.starts_with("HTTP/1.1 502 "))),
        "failures other than 502: {result}"
    );
    assert!(recovered.is_some(), "never recovered: {result}");
    assert!(load_count(&result, "ok") > 100, "{result}");
}

/// A rolling update of the node agent, as the DaemonSet does it
/// (`maxSurge: 1`): the new agent starts beside the old one, takes the
/// pods' listening sockets over (`--run-dir`'s control socket), and the old
/// one stops accepting, drains and exits on SIGTERM. Three replacements in
/// a row, under two apps' load (one on kept-alive connections, one opening
/// a connection per request): not one request fails, is refused or goes
/// out unsigned, and the programs are never attached twice.
#[test]
fn node_agent_replaced_under_load_loses_no_request() {
    if !require_root("node_agent_replaced_under_load_loses_no_request") {
        return;
    }
    const REPLACEMENTS: usize = 3;
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let bpffs = Bpffs::new();
    let pin = bpffs.path().join("lattice-node");
    let pin_arg = pin.to_str().unwrap().to_owned();
    let pods: Vec<NodePod> = ["kept", "fresh"]
        .into_iter()
        .map(|name| annotated_irsa_pod(&cluster, name))
        .collect();
    // The binary users deploy: the latencies recorded are the release's.
    let release = lattice_tests::agent::release_agent_bin();
    let start = || start_pinned_agent(&cluster, &release, &pin_arg);
    let mut agent = start();
    for pod in &pods {
        agent.wait_pod(pod.uid(), Some("enrolled"), Duration::from_secs(15));
    }
    let kubepods = cluster.node.cgroup_root().join("kubepods.slice");
    let attached = attached_programs(&kubepods);
    assert_eq!(attached.len(), 4, "{attached:?}");

    let seconds = 3 + 3 * REPLACEMENTS as u64;
    let kept = node_agent::start_load(&pods[0], "load-keepalive", seconds);
    let fresh = node_agent::start_load(&pods[1], "load", seconds);
    let mut takeovers_ms = Vec::new();
    for round in 0..REPLACEMENTS {
        std::thread::sleep(Duration::from_millis(1500));
        let started = Instant::now();
        let new = start();
        takeovers_ms.push(started.elapsed().as_secs_f64() * 1e3);
        for pod in &pods {
            let row = new.pod_row(pod.uid());
            assert_eq!(
                row.as_ref().and_then(|r| r["state"].as_str()),
                Some("enrolled"),
                "round {round}: the new agent is ready without serving {}: {row:?}\n{}",
                pod.uid(),
                new.log()
            );
        }
        agent.wait_log("a new agent took the pods over", Duration::from_secs(10));
        let status = agent.stop();
        assert!(
            status.success(),
            "round {round}: old agent: {status}\n{}",
            agent.log()
        );
        agent = new;
        assert_eq!(
            attached_programs(&kubepods),
            attached,
            "round {round}: the same programs stay attached, once"
        );
    }
    let kept = load_result(kept, Duration::from_secs(seconds + 30));
    let fresh = load_result(fresh, Duration::from_secs(seconds + 30));
    let total = |key: &str| load_count(&kept, key) + load_count(&fresh, key);
    let record = Record {
        id: "node-agent-upgrade",
        fault: format!(
            "node agent replaced {REPLACEMENTS} times (rolling update, maxSurge 1: the new agent takes the listeners over, the old one drains)"
        ),
        load: format!(
            "2 apps, back to back, {seconds} s: kept-alive connections; a new connection per request"
        ),
        attempted: total("ok") + total("failed") + total("refused"),
        failed: total("failed") + total("refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: None,
        notes: format!(
            "p99 {} µs (kept-alive) / {} µs (new connections); {} requests sent again on a new connection after the old agent closed an idle kept-alive one (as Go's net/http does); takeover {:.0}-{:.0} ms",
            kept["p99_us"],
            fresh["p99_us"],
            load_count(&kept, "retried"),
            takeovers_ms.iter().copied().fold(f64::INFINITY, f64::min),
            takeovers_ms.iter().copied().fold(0.0, f64::max),
        ),
    };
    record.save();
    assert_eq!(record.unsigned, 0, "unsigned requests reached the service");
    assert_eq!(
        record.failed,
        0,
        "requests failed across the replacements:\nkept-alive: {kept}\nnew connections: {fresh}\n{}",
        agent.log()
    );
    assert!(
        load_count(&kept, "ok") > 100 && load_count(&fresh, "ok") > 100,
        "too little load to mean anything: {kept} {fresh}"
    );
    assert!(
        load_count(&kept, "connections") > 1,
        "the kept-alive app never moved to the new agent: {kept}"
    );
}

/// The app's request through `pod`: (status, body); 0 when it failed.
fn app_get(pod: &NodePod, path: &str) -> (u16, String) {
    let r = lattice_tests::node_agent::app_request(
        pod,
        &[
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{LATTICE_V4}{path}"),
        ],
    );
    (r.status, r.body)
}

/// The container-credentials endpoint (EKS Pod Identity's address) fails
/// for longer than the cached credentials live: requests get 503 naming
/// the cause and /readyz says so; the agent retries with backoff (a
/// handful of calls, however many requests arrive) and recovers on its
/// own once the endpoint answers again. Nothing goes out unsigned.
#[test]
fn credential_outage_503s_then_recovers_without_a_storm() {
    if !require_root("credential_outage_503s_then_recovers_without_a_storm") {
        return;
    }
    const TOKEN: &str = "pod-identity-token-outage-0123456789";
    const LIFETIME_S: u64 = 4;
    const OUTAGE: Duration = Duration::from_secs(8);
    let cluster = Cluster::new();
    let failing = cluster.node.temp_dir().join("creds-failing");
    let token_file = cluster.node.temp_dir().join("pod-identity-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    // Readable by UID 101, the sidecar after its privilege drop.
    use std::os::unix::fs::PermissionsExt as _;
    for p in [cluster.node.temp_dir(), token_file.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let python = python().unwrap_or_else(|m| panic!("{m}"));
    let lifetime = LIFETIME_S.to_string();
    let verifier = Verifier::start_as(
        cluster.node.command(python),
        LATTICE_V4,
        80,
        &lattice_tests::verifier::UNUSED_KEY,
        &[
            "--container-creds-host",
            lattice_tests::node::POD_IDENTITY_V4,
            "--container-creds-port",
            "80",
            "--container-creds-token",
            TOKEN,
            "--container-creds-lifetime",
            &lifetime,
            "--container-creds-fail-while",
            failing.to_str().unwrap(),
        ],
    );
    let pod = cluster.node.add_pod(PodSpec::new("shop", "outage-0"));
    let container = pod.add_container();
    let mut cmd = pod
        .command_in(&container, agent_bin())
        .arg("sidecar")
        .arg("--cgroup-root")
        .arg(cluster.node.cgroup_root())
        .build();
    cmd.env_clear()
        .envs(lattice_tests::node_agent::clean_env())
        .env("POD_UID", pod.uid())
        .env("AWS_REGION", "us-west-2")
        .env(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://169.254.170.23/v1/credentials",
        )
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
    let mut sidecar = ChildGuard::spawn(cmd, "lattice-agent sidecar".to_owned());
    sidecar.wait_for(
        Stream::Stderr,
        "lattice-agent ready",
        Duration::from_secs(30),
    );
    let readyz = || {
        let out = pod
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                "http://127.0.0.1:15090/readyz",
            ])
            .run(Duration::from_secs(10));
        let (body, status) = out.stdout.rsplit_once('\n').unwrap_or_default();
        (status.parse::<u16>().unwrap_or(0), body.to_owned())
    };

    assert!(
        poll(&pod, Duration::from_secs(2)).first_ok.is_some(),
        "no success before the outage"
    );
    let calls_before = verifier.credential_calls().len();

    std::fs::write(&failing, "").unwrap();
    let outage = poll_for(&pod, OUTAGE);
    let outage_calls = verifier.credential_calls()[calls_before..].to_vec();
    let (ready, ready_body) = readyz();
    std::fs::remove_file(&failing).unwrap();
    let back = Instant::now();
    let after = poll(&pod, Duration::from_secs(35));
    let recovered = after.first_ok.map(|t| t.duration_since(back));
    let (attempted, failed) = (
        outage.attempted + after.attempted,
        outage.failed + after.failed,
    );
    let mut reasons = outage.reasons;
    reasons.extend(after.reasons);

    let record = Record {
        id: "credential-outage",
        fault: format!(
            "container-credentials endpoint answering 500 for {} s (keys live {LIFETIME_S} s)",
            OUTAGE.as_secs()
        ),
        load: "1 app, one request every 200 ms".into(),
        attempted,
        failed,
        unsigned: unsigned_requests(&verifier),
        recovery_ms: recovered.map(|d| d.as_secs_f64() * 1000.0),
        notes: format!(
            "{failed} requests answered 503 (no credentials), {} naming the endpoint's 500; \
             {} calls to the endpoint for {} requests during the outage",
            outage.named + after.named,
            outage_calls.len(),
            outage.attempted
        ),
    };
    record.save();
    assert_eq!(record.unsigned, 0);
    assert!(
        reasons.is_empty(),
        "failures other than the agent's 503: {reasons:?}"
    );
    assert!(
        outage.named > 0,
        "no 503 named the endpoint's error (keys live {LIFETIME_S} s)"
    );
    assert_eq!(ready, 503, "/readyz during the outage: {ready_body}");
    assert!(ready_body.contains("no credentials"), "{ready_body}");
    // Refreshes back off (1 s, 2 s, 4 s, ...; the SDK's provider retries a
    // 500 up to three times within each): a few calls, not one per request.
    assert!(
        outage_calls.len() >= 2
            && outage_calls.len() <= 15
            && outage.attempted >= 20
            && (outage_calls.len() as u64) < outage.attempted / 2,
        "{} calls to the endpoint for {} requests during {OUTAGE:?}: {outage_calls:?}",
        outage_calls.len(),
        outage.attempted
    );
    assert!(outage_calls.iter().all(|s| *s == 500), "{outage_calls:?}");
    assert!(
        recovered.is_some(),
        "not recovered 35 s after the endpoint came back:\n{}",
        sidecar.stderr()
    );
}

/// [`poll`] for the whole of `span`, successes or not.
fn poll_for(pod: &NodePod, span: Duration) -> Tally {
    let until = Instant::now() + span;
    let mut all = Tally::default();
    while Instant::now() < until {
        let t = poll(pod, until - Instant::now());
        all.attempted += t.attempted;
        all.failed += t.failed;
        all.named += t.named;
        all.reasons.extend(t.reasons);
        all.first_ok = all.first_ok.or(t.first_ok);
    }
    all
}

/// What polling the app's requests for a while saw.
#[derive(Default)]
struct Tally {
    attempted: u64,
    failed: u64,
    /// 503s naming the credential endpoint's 500.
    named: u64,
    /// Failures that were not the agent's 503 for missing credentials.
    reasons: Vec<String>,
    first_ok: Option<Instant>,
}

/// One request every 200 ms for `span` (or until a second after the
/// first success). Every failure must be the agent's 503 for missing
/// credentials; once the provider has answered, it names the endpoint's
/// 500.
fn poll(pod: &NodePod, span: Duration) -> Tally {
    let until = Instant::now() + span;
    let mut t = Tally::default();
    while Instant::now() < until
        && t.first_ok
            .is_none_or(|ok| ok.elapsed() < Duration::from_secs(1))
    {
        let (status, body) = app_get(pod, "/outage");
        t.attempted += 1;
        if status == 200 {
            t.first_ok.get_or_insert_with(Instant::now);
        } else {
            t.failed += 1;
            if status != 503 || !body.starts_with("lattice-agent: no AWS credentials") {
                t.reasons.push(format!("{status} {body}"));
            } else if body.contains("500") {
                t.named += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    t
}
