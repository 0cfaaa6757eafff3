//! TLS origination per destination (`--upstream-tls-rule`, a pod's
//! `upstream-tls` annotation): the app speaks plain HTTP, the agent signs
//! and, where a rule matches, connects with TLS (SNI and certificate name
//! from `Host`), to the rule's port. The HTTPS listener is a real TLS
//! server (rustls, `lattice-test-tls-front`) in front of the botocore
//! verifier, with certificates made by the test's own CA (passed with
//! `--ca-file`, as an ACM Private CA's would be); an HTTP listener is the
//! verifier itself. Every service shares the pod's Lattice address, as
//! Lattice services do, and is told apart by `Host`.
//!
//! Needs root, the built agent and test binaries, the test venv.

use std::time::Duration;

use lattice_tests::{
    Agent, ChildGuard, DEMO_CREDENTIALS, Pod,
    node::{LATTICE_V4 as NODE_LATTICE_V4, NodePod, PodSpec},
    node_agent::{Cluster, NodeAgent, app_request, irsa_pod, sts_url},
    pod::LATTICE_V4,
    probe::grpc_curl_args,
    require_root,
    spawn::{PodCommand, Stream},
    test_bin,
    tls::{TestCa, Validity},
    verifier::{Received, Verifier},
};

const APP_UID: u32 = 1000;
/// A service behind an HTTP listener.
const HTTP_SVC: &str = "svc-http-0123456789abcdef.aaaaaaa.vpc-lattice-svcs.us-west-2.on.aws";
/// A service behind an HTTPS listener (its certificate from the test CA).
const HTTPS_SVC: &str = "svc-https-0123456789abcdef.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws";
/// The HTTPS listener's own certificate name, as Lattice's covers a
/// service network's names.
const HTTPS_CERT_NAME: &str = "*.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws";

/// A TLS listener on `listen` in front of `backend`, with `cert`.
fn tls_front(
    placed: PodCommand,
    listen: &str,
    cert: &lattice_tests::tls::CertFiles,
    backend: &str,
) -> ChildGuard {
    let mut front = placed
        .arg(listen)
        .arg(&cert.cert)
        .arg(&cert.key)
        .arg(backend)
        .spawn();
    front.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    front
}

/// The app's curl, plain HTTP to the pod's Lattice address, `Host: host`.
fn call(pod: &Pod, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let out = pod
        .command("curl")
        .uid(APP_UID)
        .args(["-q", "-sS", "--noproxy", "*", "--max-time", "20"])
        .args([
            "-w",
            "\nSTATUS %{http_code}",
            "-H",
            &format!("Host: {host}"),
        ])
        .args(extra)
        .arg(format!("http://{LATTICE_V4}{path}"))
        .run(Duration::from_secs(40));
    let (body, status) = out
        .stdout
        .rsplit_once("\nSTATUS ")
        .unwrap_or_else(|| panic!("curl: {out}"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// The request at `path` the verifier saw, signed with the demo key.
fn signed_request(verifier: &Verifier, path: &str) -> Received {
    let seen = verifier.requests();
    let r = seen
        .iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the verifier never saw {path}: {seen:?}"))
        .clone();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.access_key.as_deref(),
        Some(DEMO_CREDENTIALS.access_key_id),
        "{r:?}"
    );
    r
}

#[test]
fn http_and_https_listener_services_from_one_pod_and_h2c_over_tls() {
    if !require_root("http_and_https_listener_services_from_one_pod_and_h2c_over_tls") {
        return;
    }
    let pod = Pod::new();
    let ca = TestCa::new("lattice test private CA");
    let cert = ca.issue("https-listener", &[HTTPS_CERT_NAME], Validity::Current);
    let http_listener = Verifier::start(&pod, LATTICE_V4, 80, &DEMO_CREDENTIALS);
    let https_backend = Verifier::start(&pod, LATTICE_V4, 8080, &DEMO_CREDENTIALS);
    let front = tls_front(
        pod.command(test_bin("lattice-test-tls-front"))
            .in_cgroup(false),
        &format!("{LATTICE_V4}:443"),
        &cert,
        &format!("{LATTICE_V4}:8080"),
    );
    let rule = format!("host:{HTTPS_SVC} => 443");
    let ca_file = ca.ca_file().to_str().expect("path").to_owned();
    let _agent = Agent::start(&pod, ["--upstream-tls-rule", &rule, "--ca-file", &ca_file]);

    let (status, body) = call(&pod, HTTP_SVC, "/plain", &[]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&pod, HTTPS_SVC, "/over-tls", &[]);
    assert_eq!(status, 200, "{body}");
    let plain = signed_request(&http_listener, "/plain");
    let tls = signed_request(&https_backend, "/over-tls");
    assert_eq!(plain.header("host"), Some(HTTP_SVC));
    assert_eq!(tls.header("host"), Some(HTTPS_SVC));
    assert_eq!(tls.http_version, "HTTP/1.1");
    assert!(
        https_backend.requests().iter().all(|r| r.path != "/plain")
            && http_listener
                .requests()
                .iter()
                .all(|r| r.path != "/over-tls"),
        "a request reached the other listener"
    );
    assert!(
        front
            .stdout()
            .contains(&format!("tls-front sni={HTTPS_SVC} alpn=http/1.1")),
        "{}",
        front.stdout()
    );

    // gRPC-style h2c from the app, carried over h2 to the HTTPS listener.
    let (status, body) = call(
        &pod,
        HTTPS_SVC,
        "/grpc.Health/Check",
        &grpc_curl_args("ping"),
    );
    assert_eq!(status, 200, "{body}");
    let grpc = signed_request(&https_backend, "/grpc.Health/Check");
    assert_eq!(grpc.http_version, "HTTP/2", "{grpc:?}");
    assert!(
        front
            .stdout()
            .contains(&format!("tls-front sni={HTTPS_SVC} alpn=h2")),
        "{}",
        front.stdout()
    );
}

#[test]
fn certificate_failures_are_502_naming_the_cause() {
    if !require_root("certificate_failures_are_502_naming_the_cause") {
        return;
    }
    let pod = Pod::new();
    let ca = TestCa::new("lattice test private CA");
    let stranger = TestCa::new("a CA nobody trusts");
    let backend = Verifier::start(&pod, LATTICE_V4, 8080, &DEMO_CREDENTIALS);
    let cases = [
        (
            "expired.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws",
            8443,
            ca.issue(
                "expired",
                &["expired.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws"],
                Validity::Expired,
            ),
            "certificate expired",
        ),
        (
            "wrong.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws",
            9443,
            ca.issue("wrong", &["other.example"], Validity::Current),
            "certificate not valid for this name (it is for other.example)",
        ),
        (
            "unknown.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws",
            10443,
            stranger.issue(
                "unknown",
                &["unknown.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws"],
                Validity::Current,
            ),
            "certificate issued by an unknown CA",
        ),
    ];
    let mut fronts = Vec::new();
    let mut args = Vec::new();
    for (host, port, cert, _) in &cases {
        fronts.push(tls_front(
            pod.command(test_bin("lattice-test-tls-front"))
                .in_cgroup(false),
            &format!("{LATTICE_V4}:{port}"),
            cert,
            &format!("{LATTICE_V4}:8080"),
        ));
        args.push("--upstream-tls-rule".to_owned());
        args.push(format!("host:{host} => {port}"));
    }
    args.push("--ca-file".to_owned());
    args.push(ca.ca_file().to_str().expect("path").to_owned());
    let _agent = Agent::start(&pod, &args);
    for (host, port, _, cause) in &cases {
        let (status, body) = call(&pod, host, "/", &[]);
        assert_eq!(status, 502, "{host}: {body}");
        let want = format!("lattice-agent: upstream {LATTICE_V4}:{port}: TLS with {host}: {cause}");
        assert!(
            body.starts_with(&want),
            "{host}: want {want:?}, got {body:?}"
        );
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
}

/// Node mode: a pod's annotation sets its own rules; a bad annotation is
/// told in an Event and the pod is served with the agent's (none here).
#[test]
fn node_mode_tls_rules_from_the_pods_annotation() {
    if !require_root("node_mode_tls_rules_from_the_pods_annotation") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let ca = TestCa::new("lattice test private CA");
    let cert = ca.issue("https-listener", &[HTTPS_CERT_NAME], Validity::Current);
    let front = tls_front(
        cluster.node.command(test_bin("lattice-test-tls-front")),
        &format!("{NODE_LATTICE_V4}:443"),
        &cert,
        &format!("{NODE_LATTICE_V4}:80"),
    );
    let tls_pod = cluster.node.add_pod(PodSpec::new("shop", "tls-0"));
    let bad_pod = cluster.node.add_pod(PodSpec::new("shop", "bad-0"));
    apply(
        &cluster,
        &tls_pod,
        "tls",
        1,
        "host:*.bbbbbbb.vpc-lattice-svcs.us-west-2.on.aws => 443",
    );
    apply(&cluster, &bad_pod, "bad", 2, "https://bbbbbbb");
    let ca_file = ca.ca_file().to_str().expect("path").to_owned();
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command(["--ca-file", &ca_file]),
        &[("AWS_ENDPOINT_URL_STS", &sts_url())],
    );
    for p in [&tls_pod, &bad_pod] {
        agent.wait_pod(p.uid(), Some("enrolled"), Duration::from_secs(15));
    }
    let event = cluster.wait_event(bad_pod.uid(), "BadAnnotation");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("upstream-tls") && note.contains("https://bbbbbbb"),
        "{event}"
    );

    let host = format!("Host: {HTTPS_SVC}");
    let url = format!("http://{NODE_LATTICE_V4}/from-annotation");
    let r = app_request(&tls_pod, &["-H", &host, &url]);
    assert_eq!(r.status, 200, "{r:?}");
    let url = format!("http://{NODE_LATTICE_V4}/agent-defaults");
    let r = app_request(&bad_pod, &["-H", &host, &url]);
    assert_eq!(r.status, 200, "{r:?}");
    let seen = verifier.wait_requests(2, Duration::from_secs(10));
    for path in ["/from-annotation", "/agent-defaults"] {
        let r = seen
            .iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("{path} not seen: {seen:?}"));
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Only the annotated pod's request came through the TLS listener.
    let through_tls = || {
        front
            .stdout()
            .lines()
            .filter(|l| l.starts_with("tls-front sni="))
            .count()
    };
    assert_eq!(through_tls(), 1, "{}", front.stdout());

    // A worker that replaces a dead one serves the pod with its
    // annotation's rules from the state its parent kept, before the API
    // is listed: the listing then finds the same plan and enrolls nothing
    // anew.
    let dead = agent.kill_worker();
    agent.wait_worker(Some(dead), Duration::from_secs(10));
    let enrolled = format!("pod enrolled pod=shop/{}", tls_pod.name());
    let log = agent.log();
    let restarted = log
        .rfind(&format!("{enrolled} identity=\"irsa\" via=\"restart\""))
        .unwrap_or_else(|| panic!("the pod was not served again from its state:\n{log}"));
    let url = format!("http://{NODE_LATTICE_V4}/after-restart");
    let r = app_request(&tls_pod, &["-H", &host, &url]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(through_tls(), 2, "{}", front.stdout());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent
        .log()
        .matches("lattice-agent ready (node mode)")
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !agent.log()[restarted + enrolled.len()..].contains(&enrolled),
        "the listing enrolled the pod anew (its resumed plan differed):\n{}",
        agent.log()
    );
}

fn apply(cluster: &Cluster, pod: &NodePod, sa: &str, n: usize, rules: &str) {
    let obj = irsa_pod(cluster, pod, sa, n)
        .annotation("vpc-lattices-svcs.amazonaws.com/upstream-tls", rules);
    cluster.apply(&obj);
}
