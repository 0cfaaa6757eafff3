//! Node mode against a pod that tries to get around it or to harm others:
//! each test is one property of docs/security.md, tried as an attacker
//! with a pod (or a process) on the node would try it.
//!
//! The node, its pods, the API stand-in and the services are the test
//! kit's (tests/src/node.rs, node_agent.rs): Lattice is the botocore
//! verifier on 169.254.171.33 in the node's namespace (403 to anything
//! unsigned), STS is moto, the Pod Identity Agent is the verifier's
//! container-credentials endpoint. Needs root, the built agent and test
//! binaries, and the test venv.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lattice_tests::{
    bpffs::{MountNs, SysFsBpf},
    node::{LATTICE_V4, NodePod, POD_GATEWAY, POD_IDENTITY_V4, PodSpec},
    node_agent::{
        AgentPin, AgentStart, AppReply, Cluster, NodeAgent, POD_IDENTITY_TOKEN_FILE,
        POD_IDENTITY_VOLUME, PodObject, app_request, app_request_as, sts_url,
    },
    require_root,
    spawn::Stream,
    test_bin, venv,
};
use serde_json::{Value, json};

const HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
const REGION: &str = "us-west-2";
const ROLE: &str = "arn:aws:iam::123456789012:role/shop";
/// The UID the iptables setup (and `--exempt-uid`'s default) exempts, and
/// the default user of common images (nginx-unprivileged).
const UID_101: u32 = 101;
/// A UID that is neither root nor the agent's.
const STRANGER_UID: u32 = 4321;

fn sts_env(sts: &str) -> [(&str, &str); 1] {
    [("AWS_ENDPOINT_URL_STS", sts)]
}

fn get_as(pod: &NodePod, uid: u32, path: &str) -> AppReply {
    app_request_as(
        pod,
        uid,
        &[
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{LATTICE_V4}{path}"),
        ],
    )
}

/// An annotated IRSA pod (role [`ROLE`]), applied.
fn irsa_pod(cluster: &Cluster, name: &str) -> NodePod {
    let pod = cluster.node.add_pod(PodSpec::new("shop", name));
    cluster.apply(
        &PodObject::new(&pod, cluster.node.name())
            .annotated()
            .service_account("shop")
            .irsa(&pod, ROLE, REGION, "token"),
    );
    pod
}

/// Requests the verifier saw under `path`.
/// The requests for `path` the verifier recorded. It writes its record
/// after answering, so a reply can come back before its record: wait up
/// to 2 s for the first one.
fn seen(verifier: &lattice_tests::Verifier, path: &str) -> Vec<lattice_tests::verifier::Received> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found: Vec<_> = verifier
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect();
        if !found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Item 1 of the hardening list: in node mode no UID inside an enrolled pod
/// escapes signing, not even the UID the agent itself runs as (101, the
/// `--exempt-uid`, also the default user of common images). The agent is
/// exempted by its own cgroup instead, which a pod cannot join: here it
/// runs where a DaemonSet's agent runs, in a container cgroup under the
/// kubelet's pod tree, so its own upstream connects, made inside the pod's
/// network namespace, pass the programs and must not be taken for the
/// pod's.
#[test]
fn uid_101_and_root_in_an_enrolled_pod_are_signed() {
    if !require_root("uid_101_and_root_in_an_enrolled_pod_are_signed") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let pod = irsa_pod(&cluster, "uids-0");
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster
            .agent_command([] as [&str; 0])
            .cgroup(cluster.agent_container_cgroup()),
        &sts_env(&sts),
    );
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);

    for (uid, path) in [(UID_101, "/uid-101"), (0, "/uid-0"), (1000, "/uid-1000")] {
        let reply = get_as(&pod, uid, path);
        let requests = seen(&verifier, path);
        assert_eq!(
            (reply.status, requests.len()),
            (200, 1),
            "UID {uid}: {reply:?}\nverifier saw {requests:?}\nagent log:\n{}",
            agent.log()
        );
        assert_eq!(requests[0].role_arn.as_deref(), Some(ROLE), "UID {uid}");
    }
}

/// Item 2: a pod that can DNAT (NET_ADMIN in its own namespace) sends the
/// proxy a connection to an address that is not VPC Lattice's. In node
/// mode the proxy takes original destinations only from the programs'
/// records, never from conntrack: the connection is answered 421 and
/// nothing reaches that address, signed or not.
#[test]
fn a_pod_that_dnats_to_its_proxy_port_gets_421_not_a_signature() {
    if !require_root("a_pod_that_dnats_to_its_proxy_port_gets_421_not_a_signature") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let pod = irsa_pod(&cluster, "dnat-0");
    // A service of the node that is not VPC Lattice, on the pods' gateway.
    let target = format!("{POD_GATEWAY}:8099");
    let mut service = cluster
        .node
        .command(test_bin("lattice-test-service"))
        .in_cgroup(false)
        .args(["--http", &format!("tcp:{target}")])
        .spawn();
    service.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command([] as [&str; 0]),
        &sts_env(&sts),
    );
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);

    // The app's own NAT rule, as the iptables setup's init container wrote
    // them, sending its connections to that service to the proxy's port.
    let rule = pod
        .command("iptables")
        .in_cgroup(false)
        .args(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d"])
        .arg(POD_GATEWAY.to_string())
        .args(["--dport", "8099", "-m", "owner", "--uid-owner", "1000"])
        .args(["-j", "REDIRECT", "--to-ports", "15080"])
        .run(Duration::from_secs(10));
    assert!(rule.success(), "{rule}");

    let reply = app_request(
        &pod,
        &[
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{target}/dnat"),
        ],
    );
    assert_eq!(reply.status, 421, "{reply:?}\n{}", agent.log());
    assert!(
        !service.stdout().contains("service "),
        "the DNAT target was reached through the proxy:\n{}",
        service.stdout()
    );
}

/// The first line of `stream`'s answer, as a reply, or None when the
/// agent closed without answering.
fn call_cni(
    cluster: &Cluster,
    request: &lattice_cni::protocol::Request,
    netns: &Path,
) -> Option<lattice_cni::protocol::Reply> {
    use std::os::fd::AsFd as _;
    let stream = std::os::unix::net::UnixStream::connect(
        cluster.run_dir().join(lattice_cni::protocol::SOCKET_NAME),
    )
    .expect("connect to the agent's CNI socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let ns = fs::File::open(netns).expect("open the sandbox's netns");
    lattice_cni::protocol::send(&stream, request, Some(ns.as_fd())).expect("send");
    lattice_cni::protocol::receive(&stream)
        .ok()
        .map(|(reply, _)| reply)
}

/// Item 4: a CNI call without a pod UID (runtimes need not pass
/// `K8S_POD_UID`) names a pod that runs on another node. The agent must not
/// take that pod's identity for this sandbox: it looks pods up on its own
/// node only. A call naming a pod of this node, without UID, still enrolls.
#[test]
fn cni_calls_without_a_pod_uid_never_match_another_nodes_pod() {
    if !require_root("cni_calls_without_a_pod_uid_never_match_another_nodes_pod") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    // The sandbox, set up before the plugin is chained.
    let sandbox = cluster.node.add_pod(PodSpec::new("shop", "sandbox-0"));
    let elsewhere = PodObject::pending(
        "shop",
        "elsewhere-0",
        &lattice_tests::node::random_uuid(),
        "another-node",
    )
    .annotated()
    .service_account("shop")
    .irsa_env(ROLE, REGION);
    cluster.apply(&elsewhere);
    let here = PodObject::pending(
        "shop",
        "here-0",
        &lattice_tests::node::random_uuid(),
        cluster.node.name(),
    )
    .annotated()
    .service_account("shop")
    .irsa_env(ROLE, REGION);
    cluster.apply(&here);
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command(cluster.cni_args()),
        &sts_env(&sts),
    );

    let call = |name: &str| lattice_cni::protocol::Request {
        command: lattice_cni::protocol::Command::Add,
        container_id: "0123456789abcdef".into(),
        netns: sandbox.netns_path().display().to_string(),
        pod_namespace: "shop".into(),
        pod_name: name.into(),
        pod_uid: String::new(),
    };
    let reply = call_cni(&cluster, &call("elsewhere-0"), sandbox.netns_path())
        .expect("the agent answers the plugin");
    assert!(
        !reply.enrolled
            && reply
                .error
                .as_deref()
                .is_some_and(|e| e.contains("another-node")),
        "a sandbox was enrolled as another node's pod: {reply:?}\n{}",
        agent.log()
    );
    let reply = call_cni(&cluster, &call("here-0"), sandbox.netns_path())
        .expect("the agent answers the plugin");
    assert!(reply.enrolled, "{reply:?}\n{}", agent.log());
}

/// `python3 -c <client>` as [`STRANGER_UID`], with CAP_DAC_OVERRIDE only
/// (ambient): it gets past the run directory's mode, as a process that
/// reached the socket some other way would, but it is neither root nor the
/// agent. Sends `line` on the Unix socket `path` and prints what came
/// back before the agent closed (nothing when refused).
fn stranger_sends(path: &Path, line: &str) -> String {
    const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\n")
except (BrokenPipeError, ConnectionResetError):
    sys.exit(0)  # closed at once: refused
data = b""
while b"\n" not in data:
    try:
        chunk = s.recv(65536)
    except (ConnectionResetError, socket.timeout):
        break
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode(errors="replace"))
"#;
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &STRANGER_UID.to_string(),
            "--regid",
            &STRANGER_UID.to_string(),
        ])
        .args([
            "--clear-groups",
            "--inh-caps",
            "+dac_override",
            "--ambient-caps",
            "+dac_override",
        ])
        .args(["python3", "-c", CLIENT])
        .arg(path)
        .arg(line)
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "client: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Item 5: the control socket (handover) and the CNI plugin's socket
/// answer root and the agent's own UID only. A process of another UID that
/// reaches them (past the run directory's mode) can neither take the pods'
/// listening sockets (and network namespaces) from the control socket nor
/// unenroll a pod by a forged CNI DEL: its connection is closed unanswered
/// and the agent logs the refusal.
#[test]
fn control_and_cni_sockets_refuse_peers_of_another_uid() {
    if !require_root("control_and_cni_sockets_refuse_peers_of_another_uid") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    // Started before the plugin is chained: enrolled from the API.
    let pod = irsa_pod(&cluster, "victim-0");
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command(cluster.cni_args()),
        &sts_env(&sts),
    );
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);

    let control = stranger_sends(&cluster.run_dir().join("agent.sock"), r#"{"op":"next"}"#);
    assert!(
        control.is_empty(),
        "the control socket answered UID {STRANGER_UID}: {control}\n{}",
        agent.log()
    );
    let del = json!({
        "command": "DEL", "container_id": "forged", "netns": "",
        "pod_namespace": "shop", "pod_name": "victim-0", "pod_uid": pod.uid(),
    });
    let cni = stranger_sends(
        &cluster.run_dir().join(lattice_cni::protocol::SOCKET_NAME),
        &del.to_string(),
    );
    assert!(
        cni.is_empty(),
        "the CNI socket answered UID {STRANGER_UID}: {cni}\n{}",
        agent.log()
    );
    agent.wait_log(&format!("uid={STRANGER_UID}"), Duration::from_secs(5));
    let row = agent.pod_row(pod.uid());
    assert_eq!(
        row.as_ref().and_then(|r| r["state"].as_str()),
        Some("enrolled"),
        "{row:?}\n{}",
        agent.log()
    );
    assert_eq!(get_as(&pod, 1000, "/still-signed").status, 200);
}

/// `/metrics` parsed by prometheus_client's OpenMetrics parser (the
/// format the agent declares): the families, or the parser's refusal.
fn parse_metrics(page: &str) -> Result<Value, String> {
    use std::io::Write as _;
    let python = venv().join("bin/python");
    let script = lattice_tests::workspace().join("tests/python/metrics_parse.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg("openmetrics")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run metrics_parse.py (cargo xtask setup makes the venv)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Label sets of the samples named `sample`.
fn label_sets(families: &Value, sample: &str) -> Vec<Value> {
    families["families"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap().iter())
        .filter(|s| s["name"] == sample)
        .map(|s| s["labels"].clone())
        .collect()
}

/// Item 6: what a pod controls (its role ARN, its name and namespace)
/// becomes label values of `/metrics`. Values with `"`, `}`, `\` and line
/// breaks must neither break the page (Prometheus drops the whole scrape)
/// nor inject series: every value is escaped, and a role ARN that is no
/// IAM role ARN (a line break in it) is refused when the pod is planned,
/// with an Event naming the problem. The page is checked with the official
/// parser, and the values read back are exactly the pods'.
#[test]
fn what_a_pod_controls_never_breaks_the_metrics_page() {
    if !require_root("what_a_pod_controls_never_breaks_the_metrics_page") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    // Valid IAM: a role path may hold any printable ASCII but space.
    let odd_role = r#"arn:aws:iam::123456789012:role/q"u}o\te/app"#;
    let odd_namespace = "shop\"}\\\nns";
    let odd_name = "odd\"} 1\n# EOF\n\\pod";
    let odd = cluster.node.add_pod(PodSpec::new("shop", "odd-0"));
    let mut object = PodObject::new(&odd, cluster.node.name())
        .annotated()
        .service_account("odd")
        .irsa(&odd, odd_role, REGION, "token");
    object.json["metadata"]["namespace"] = odd_namespace.into();
    object.json["metadata"]["name"] = odd_name.into();
    cluster.apply(&object);
    let injected = cluster.node.add_pod(PodSpec::new("shop", "inject-0"));
    let injecting_role = "arn:aws:iam::123456789012:role/x\"} 1\nlattice_injected_total 1\n#";
    cluster.apply(
        &PodObject::new(&injected, cluster.node.name())
            .annotated()
            .service_account("inject")
            .irsa(&injected, injecting_role, REGION, "token"),
    );
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command([] as [&str; 0]),
        &sts_env(&sts),
    );
    agent.wait_pod(odd.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let row = agent
        .wait_pod(injected.uid(), Some("enrolled"), ENROLL_TIMEOUT)
        .unwrap();
    assert_eq!(get_as(&odd, 1000, "/odd").status, 200, "{}", agent.log());
    // Both identities have been fetched once (if taken) by now.
    std::thread::sleep(Duration::from_secs(1));

    let (status, page) = agent.admin("/metrics");
    assert_eq!(status, 200);
    let families = parse_metrics(&page).unwrap_or_else(|e| panic!("{e}\n--- page ---\n{page}"));
    assert!(
        label_sets(&families, "lattice_injected_total").is_empty(),
        "a pod injected a series:\n{page}"
    );
    let identities = label_sets(&families, "lattice_credential_refreshes_total");
    assert!(
        identities
            .iter()
            .any(|l| l["identity"] == format!("irsa:{odd_role}").as_str()),
        "{identities:?}\n{page}"
    );
    let requests = label_sets(&families, "lattice_requests_total");
    assert!(
        requests
            .iter()
            .any(|l| l["namespace"] == odd_namespace && l["pod"] == odd_name),
        "{requests:?}\n{page}"
    );

    // The ARN that is no IAM role ARN was refused as an identity, with an
    // Event on the pod naming the variable; its requests get 503.
    assert_eq!(row["identity"], "none", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("AWS_ROLE_ARN") && r.contains("not an IAM role ARN")),
        "{row}"
    );
    assert_eq!(get_as(&injected, 1000, "/injected").status, 503);
    cluster.wait_event_where("AWS_ROLE_ARN", |e| {
        e["regarding"]["uid"] == injected.uid()
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("AWS_ROLE_ARN"))
    });
}

/// An annotated pod of the service account `shared`, as the Pod Identity
/// webhook shapes it.
fn shared_account_pod(pod: &NodePod, cluster: &Cluster) -> PodObject {
    PodObject::new(pod, cluster.node.name())
        .annotated()
        .service_account("shared")
}

/// Item 8: two pods of one service account share a credential cache. The
/// first one points its token file at a projected ConfigMap of its own
/// (not a service-account token): its "token" must not become the one its
/// sibling's credentials are fetched with. It is refused as an identity
/// (its requests get 503 naming the cause); the sibling, whose token the
/// Pod Identity Agent accepts, is signed.
#[test]
fn a_sibling_with_a_config_map_for_a_token_cannot_break_credentials() {
    if !require_root("a_sibling_with_a_config_map_for_a_token_cannot_break_credentials") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[
        "--container-creds-host",
        POD_IDENTITY_V4,
        "--container-creds-port",
        "80",
        "--container-creds-token",
        "sibling-token",
    ]);
    let sts = sts_url();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command([] as [&str; 0]),
        &sts_env(&sts),
    );

    let attacker = cluster.node.add_pod(PodSpec::new("shop", "attacker-0"));
    attacker.write_projected(POD_IDENTITY_VOLUME, POD_IDENTITY_TOKEN_FILE, "not-a-token");
    cluster.apply(&shared_account_pod(&attacker, &cluster).pod_identity_from(
        REGION,
        json!({"configMap": {"name": "fake-token", "items": [
            {"key": "t", "path": POD_IDENTITY_TOKEN_FILE}
        ]}}),
    ));
    let row = agent
        .wait_pod(attacker.uid(), Some("enrolled"), ENROLL_TIMEOUT)
        .unwrap();
    // Its credentials have been tried (with its file) before the sibling
    // comes, where a shared cache would try it first.
    std::thread::sleep(Duration::from_secs(1));

    let sibling = cluster.node.add_pod(PodSpec::new("shop", "sibling-0"));
    cluster.apply(&shared_account_pod(&sibling, &cluster).pod_identity(
        &sibling,
        REGION,
        "sibling-token",
    ));
    agent.wait_pod(sibling.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = get_as(&sibling, 1000, "/sibling");
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(row["identity"], "none", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("serviceAccountToken")),
        "{row}"
    );
    assert_eq!(get_as(&attacker, 1000, "/attacker").status, 503);
}

/// Item 9: `/pods` names every enrolled pod's role ARN (so its account),
/// service account and IPs. Bound on every address (as the DaemonSet binds
/// `--admin-addr`, for the kubelet's probes and Prometheus), the admin
/// server answers `/pods` only on loopback (`kubectl port-forward`): a pod
/// of the cluster gets 403 naming why, while `/metrics` and the probes
/// still answer it.
#[test]
fn pods_listing_is_served_on_loopback_only() {
    if !require_root("pods_listing_is_served_on_loopback_only") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let pod = irsa_pod(&cluster, "lister-0");
    let sts = sts_url();
    let env = sts_env(&sts);
    let agent = NodeAgent::start_with(
        &cluster,
        cluster.agent_command([] as [&str; 0]),
        &AgentStart {
            env: &env,
            admin_ip: std::net::Ipv4Addr::UNSPECIFIED,
            ..AgentStart::default()
        },
    );
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    // From the node's loopback (what port-forward reaches): served.
    assert!(agent.pods()["pods"][0]["role_arn"] == ROLE);

    let from_pod = |path: &str| {
        app_request(
            &pod,
            &[&format!(
                "http://{POD_GATEWAY}:{}{path}",
                agent.admin_port()
            )],
        )
    };
    let pods = from_pod("/pods");
    assert_eq!(pods.status, 403, "{pods:?}");
    assert!(!pods.body.contains(ROLE), "{pods:?}");
    assert!(pods.body.contains("loopback"), "{pods:?}");
    for path in ["/metrics", "/readyz", "/healthz"] {
        let r = from_pod(path);
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
}

/// Issue 24: node mode pins by default, at `/sys/fs/bpf/lattice-node`.
/// Where that is not on a bpffs, the agent refuses to start, naming the
/// path and both ways out (mount bpffs there, or `--pin none`). Run in a
/// mount namespace of the test's own whose `/sys/fs/bpf` is a tmpfs.
#[test]
fn node_mode_refuses_to_start_when_its_default_pin_is_not_on_a_bpffs() {
    if !require_root("node_mode_refuses_to_start_when_its_default_pin_is_not_on_a_bpffs") {
        return;
    }
    let cluster = Cluster::new();
    let mount_ns = MountNs::new(SysFsBpf::NotBpffs);
    let out = NodeAgent::run_to_exit(
        &cluster,
        cluster.agent_command_via(&mount_ns.command_prefix(), [] as [&str; 0]),
        &AgentStart {
            pin: AgentPin::Default,
            ..AgentStart::default()
        },
        Duration::from_secs(30),
    );
    assert!(!out.success(), "started without a bpffs to pin to:\n{out}");
    for needle in ["/sys/fs/bpf/lattice-node", "bpf", "--pin none"] {
        assert!(out.stderr.contains(needle), "no {needle:?} in:\n{out}");
    }
    assert!(
        !out.stderr.contains(lattice_tests::node_agent::READY_LINE),
        "{out}"
    );
}

/// Issue 24: `--pin none` runs unpinned on purpose: fail-open is then a
/// choice, stated as a warning at start and on `/readyz`.
#[test]
fn pin_none_is_a_warning_in_the_log_and_on_readyz() {
    if !require_root("pin_none_is_a_warning_in_the_log_and_on_readyz") {
        return;
    }
    let cluster = Cluster::new();
    let agent = NodeAgent::start_with(
        &cluster,
        cluster.agent_command(["--pin", "none"]),
        &AgentStart {
            pin: AgentPin::Default,
            ..AgentStart::default()
        },
    );
    let warning = agent
        .log()
        .lines()
        .find(|l| l.contains("WARN") && l.contains("--pin none"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no warning about --pin none:\n{}", agent.log()));
    assert!(warning.contains("unsigned"), "{warning}");
    let (status, body) = agent.admin("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("--pin none") && body.contains("unsigned"),
        "{body}"
    );
}

/// During an update the new agent starts beside the old one, which serves
/// on until the new one has taken over (and drains after). The new agent
/// writes its own cgroup into the programs' config as it attaches: the old
/// one's new upstream connects, made in pods' namespaces from its own
/// container cgroup, must stay exempt meanwhile. Here the new agent cannot
/// reach the API, so it never takes over; the old one then serves a
/// request to a destination it has no pooled connection to.
#[test]
fn the_replaced_agent_stays_exempt_while_its_successor_starts() {
    if !require_root("the_replaced_agent_stays_exempt_while_its_successor_starts") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let pod = irsa_pod(&cluster, "surge-0");
    // A second Lattice-like service, that no request has used yet.
    let target = format!("{LATTICE_V4}:8081");
    let mut service = cluster
        .node
        .command(test_bin("lattice-test-service"))
        .args(["--http", &format!("tcp:{target}")])
        .spawn();
    service.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    let sts = sts_url();
    let old = NodeAgent::start(
        &cluster,
        cluster
            .agent_command([] as [&str; 0])
            .cgroup(cluster.agent_container_cgroup()),
        &sts_env(&sts),
    );
    old.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(get_as(&pod, 1000, "/before").status, 200, "{}", old.log());

    // The new agent, in a container cgroup of its own, with an API it
    // cannot reach: it attaches (and asks the old one for its listeners)
    // but never takes over.
    let unreachable = cluster.node.temp_dir().join("kubeconfig-unreachable");
    fs::write(
        &unreachable,
        fs::read_to_string(cluster.kubeconfig())
            .unwrap()
            .replace(&cluster.api.url(), "http://127.0.0.1:1"),
    )
    .unwrap();
    let mut args = cluster.agent_args();
    let i = args.iter().position(|a| a == "--kubeconfig").unwrap();
    args[i + 1] = unreachable.into();
    let mut command = cluster
        .node
        .command(lattice_tests::agent_bin())
        .args(args)
        .args(["--admin-addr", "127.0.0.1:0"])
        .cgroup(cluster.agent_container_cgroup())
        .build();
    command.env_clear().envs(cluster.agent_env());
    let mut new = lattice_tests::ChildGuard::spawn(command, "the new agent".to_owned());
    new.wait_for(
        Stream::Stderr,
        "interceptor attached",
        Duration::from_secs(30),
    );

    let reply = app_request(
        &pod,
        &[
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{target}/during"),
        ],
    );
    assert_eq!(
        reply.status,
        200,
        "{reply:?}\nold agent:\n{}\nnew agent:\n{}",
        old.log(),
        new.stderr()
    );
    assert!(
        reply.body.contains("credential=ASIA"),
        "not signed: {reply:?}"
    );
}
