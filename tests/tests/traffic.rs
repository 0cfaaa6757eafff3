//! Every kind of traffic an enrolled app sends to a Lattice address, end
//! to end through the eBPF redirect and the real agent (`run`): HTTP is
//! signed, everything else arrives unchanged. Real servers on the pod's
//! Lattice addresses: `openssl s_server` for the app's own TLS, scripted
//! TCP servers (test threads listening in the pod's namespace) for
//! server-first and binary protocols, the kit's HTTP service for signing.
//!
//! Needs root, a built agent and `openssl` (`cargo xtask setup`).

use std::{net::SocketAddr, time::Duration};

use lattice_tests::{
    Agent, DEMO_CREDENTIALS, Pod,
    node::{LATTICE_V4 as NODE_LATTICE_V4, PodSpec},
    node_agent::{Cluster, NodeAgent, PodObject, sts_url},
    pod::{LATTICE_V4, LATTICE_V6},
    require_root,
    script::{self, Step, Transcript},
    spawn::Stream,
    test_bin,
    tls::{TestCa, Validity},
};

/// Upper bound for one client run.
const T: Duration = Duration::from_secs(60);
/// The app's UID: neither root nor the exempt UID.
const APP_UID: u32 = 1000;
/// A Lattice service name, as apps put in SNI and Host.
const HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";
/// Postgres' SSLRequest: length 8, code 80877103.
const PG_SSL_REQUEST: [u8; 8] = [0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f];

/// The agent with its debug lines (one per classified connection).
fn agent(pod: &Pod) -> Agent {
    Agent::start(pod, ["--log", "info,lattice_agent=debug"])
}

/// `lattice_client_connections_total{kind=KIND}` from the agent's
/// `/metrics`, read inside the pod's namespace.
fn connections(pod: &Pod, kind: &str) -> u64 {
    let out = pod
        .command("curl")
        .in_cgroup(false)
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:15090/metrics"])
        .run(Duration::from_secs(15));
    assert!(out.success(), "metrics: {out}");
    let series = format!("lattice_client_connections_total{{kind=\"{kind}\"}} ");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {series} in\n{}", out.stdout))
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("IP"), port)
}

/// The app's side of a scripted exchange with `dst`, as [`APP_UID`].
fn app_script(pod: &Pod, dst: SocketAddr, steps: &[Step]) -> (Transcript, String) {
    let mut args = vec!["script".to_owned(), dst.to_string()];
    args.extend(steps.iter().map(Step::to_arg));
    let out = pod.client(args).uid(APP_UID).run(T);
    assert!(out.success(), "app's exchange with {dst}: {out}");
    let t = Transcript::find(&out.stdout).unwrap_or_else(|| panic!("no transcript: {out}"));
    let head = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("head="))
        .unwrap_or_default()
        .to_owned();
    (t, head)
}

/// Runs a server script on `dst` in the pod and the app's script against
/// it; checks that each side received exactly what the other sent.
fn exchange(pod: &Pod, dst: SocketAddr, server: Vec<Step>, app: &[Step]) {
    let listener = pod.listen_tcp(dst).expect("listening in the pod");
    let served = script::serve_once(listener, server);
    let (app_side, _) = app_script(pod, dst, app);
    let server_side = served
        .join()
        .expect("server thread")
        .expect("server's exchange")
        .transcript;
    assert_eq!(
        app_side.sent, server_side.received,
        "{dst}: the server did not receive what the app sent"
    );
    assert_eq!(
        server_side.sent, app_side.received,
        "{dst}: the app did not receive what the server sent"
    );
    assert!(app_side.sent.len > 0 && app_side.received.len > 0);
}

#[test]
fn apps_own_tls_passes_through_and_sees_the_servers_certificate() {
    if !require_root("apps_own_tls_passes_through_and_sees_the_servers_certificate") {
        return;
    }
    let pod = Pod::new();
    let ca = TestCa::new("lattice test CA");
    let server = ca.issue("server", &[HOST], Validity::Current);
    let mut s_server = pod
        .command("openssl")
        .in_cgroup(false)
        .args(["s_server", "-www", "-accept", &format!("{LATTICE_V4}:443")])
        .arg("-cert")
        .arg(&server.cert)
        .arg("-key")
        .arg(&server.key)
        .spawn();
    s_server.wait_for(Stream::Stdout, "ACCEPT", Duration::from_secs(10));
    let agent = agent(&pod);

    let out = pod
        .command("openssl")
        .uid(APP_UID)
        .args(["s_client", "-connect", &format!("{LATTICE_V4}:443")])
        .args(["-servername", HOST, "-verify_return_error", "-showcerts"])
        .arg("-CAfile")
        .arg(ca.ca_file())
        .run(T);
    assert!(
        out.stdout.contains("Verify return code: 0 (ok)"),
        "the app's handshake did not complete: {out}"
    );
    // The certificate the app saw is the server's own, byte for byte.
    let base64 = |pem: &str| -> String {
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
    };
    assert!(
        base64(&out.stdout).contains(&base64(&server.pem)),
        "the app did not see the server's certificate: {out}"
    );
    assert_eq!(connections(&pod, "tls"), 1, "{}", agent.log());
    assert_eq!(connections(&pod, "http1"), 0);
    assert!(
        agent.log().contains("kind=\"tls\""),
        "no debug line for the passed-through connection:\n{}",
        agent.log()
    );
}

#[test]
fn server_first_and_binary_protocols_pass_through_intact_on_both_families() {
    if !require_root("server_first_and_binary_protocols_pass_through_intact_on_both_families") {
        return;
    }
    let pod = Pod::new();
    let _agent = agent(&pod);
    for ip in [LATTICE_V4, LATTICE_V6] {
        // Server-first (a database greeting), then both ways, with
        // half-closes.
        exchange(
            &pod,
            addr(ip, 3306),
            vec![
                Step::SendRandom(256 << 10),
                Step::Rest,
                Step::SendRandom(4 << 20),
                Step::Shut,
            ],
            &[
                Step::Expect(256 << 10),
                Step::SendRandom(8 << 20),
                Step::Shut,
                Step::Rest,
            ],
        );
        // Client-first binary: Postgres' SSLRequest, refused with `N`,
        // then the session.
        exchange(
            &pod,
            addr(ip, 5432),
            vec![
                Step::Expect(8),
                Step::Send(b"N".to_vec()),
                Step::Rest,
                Step::SendRandom(4 << 20),
                Step::Shut,
            ],
            &[
                Step::Send(PG_SSL_REQUEST.to_vec()),
                Step::Expect(1),
                Step::SendRandom(8 << 20),
                Step::Shut,
                Step::Rest,
            ],
        );
        // A text protocol whose first word is not an HTTP method
        // (memcached).
        exchange(
            &pod,
            addr(ip, 11211),
            vec![Step::Rest, Step::Send(b"END\r\n".to_vec()), Step::Shut],
            &[Step::Send(b"get key\r\n".to_vec()), Step::Shut, Step::Rest],
        );
    }
    assert_eq!(connections(&pod, "server-first"), 2);
    assert_eq!(connections(&pod, "opaque"), 4);
    assert_eq!(connections(&pod, "http1"), 0);
}

/// A ClientHello-looking prefix decides: what follows is never parsed as
/// HTTP or signed, it arrives as sent. Plain HTTP in the same pod is
/// still signed, and malformed HTTP still gets its 400.
#[test]
fn a_tls_prefix_before_http_is_passed_through_never_signed() {
    if !require_root("a_tls_prefix_before_http_is_passed_through_never_signed") {
        return;
    }
    let pod = Pod::new();
    let _agent = agent(&pod);
    let mut sent = vec![0x16, 0x03, 0x01];
    sent.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes());
    let dst = addr(LATTICE_V4, 443);
    let listener = pod.listen_tcp(dst).expect("listening in the pod");
    let served = script::serve_once(listener, vec![Step::Rest, Step::Shut]);
    let (app_side, _) = app_script(
        &pod,
        dst,
        &[Step::Send(sent.clone()), Step::Shut, Step::Rest],
    );
    let server_side = served.join().expect("server thread").expect("exchange");
    assert_eq!(server_side.transcript.received, app_side.sent);
    assert_eq!(
        server_side.head,
        sent[..sent.len().min(64)],
        "the bytes arrived changed"
    );
    assert_eq!(connections(&pod, "tls"), 1);

    // Malformed HTTP: the proxy's 400, nothing passed through.
    let (_, head) = app_script(
        &pod,
        addr(LATTICE_V4, 80),
        &[Step::Send(b"NOT HTTP AT ALL\r\n\r\n".to_vec()), Step::Rest],
    );
    assert!(
        head.starts_with(&script::encode_hex(b"HTTP/1.1 400")),
        "malformed HTTP was not refused: {head}"
    );

    // Plain HTTP: signed.
    let _service = pod.start_http_service();
    let out = pod
        .client(["http", &format!("{LATTICE_V4}:80")])
        .uid(APP_UID)
        .run(T);
    assert!(
        out.success()
            && out
                .stdout
                .contains(&format!("credential={}/", DEMO_CREDENTIALS.access_key_id)),
        "plain HTTP was not signed: {out}"
    );
    assert_eq!(connections(&pod, "http1"), 2);
    assert_eq!(connections(&pod, "tls"), 1);
}

/// The EKS Pod Identity Agent's addresses are never intercepted, even
/// under a configured prefix that covers them: with the agent redirecting
/// to a port nobody serves, reaching the service proves a connect was not
/// redirected, and a refusal proves the covering prefix is active.
#[test]
fn the_pod_identity_agent_is_never_intercepted_under_a_covering_cidr() {
    if !require_root("the_pod_identity_agent_is_never_intercepted_under_a_covering_cidr") {
        return;
    }
    let pod = Pod::new();
    pod.netns().add_lo_addr("169.254.170.23/32");
    pod.netns().add_lo_addr("fd00:ec2::23/128");
    let mut service = pod
        .command(test_bin("lattice-test-service"))
        .in_cgroup(false)
        .args([
            "tcp:169.254.170.23:80",
            "tcp:[fd00:ec2::23]:80",
            &format!("tcp:{LATTICE_V4}:80"),
            &format!("tcp:[{LATTICE_V6}]:80"),
        ])
        .spawn();
    service.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    let _agent = Agent::start(
        &pod,
        [
            "--intercept-only",
            "--cidr",
            "169.254.0.0/16",
            "--cidr",
            "fd00:ec2::/32",
        ],
    );
    for (mode, dst) in [
        ("tcp", "169.254.170.23:80"),
        ("tcp-mapped", "169.254.170.23:80"),
        ("tcp", "[fd00:ec2::23]:80"),
    ] {
        let out = pod.client([mode, dst]).uid(APP_UID).run(T);
        assert!(
            out.success() && out.stdout.starts_with(&format!("service local={dst}")),
            "{mode} {dst} was intercepted: {out}"
        );
    }
    for dst in [format!("{LATTICE_V4}:80"), format!("[{LATTICE_V6}]:80")] {
        let out = pod.client(["tcp", &dst]).uid(APP_UID).run(T);
        assert!(
            out.code() == Some(2) && out.stdout.contains("error: ConnectionRefused"),
            "{dst} inside the covering prefix was not intercepted: {out}"
        );
    }
}

/// A service-network endpoint's address (a VPC subnet address; here a
/// link-local stand-in on the pod's `lo`) intercepted with `--cidr`:
/// plaintext HTTP to it is signed, other traffic to it arrives unchanged.
#[test]
fn endpoint_addresses_from_cidr_sign_http_and_pass_the_rest_through() {
    if !require_root("endpoint_addresses_from_cidr_sign_http_and_pass_the_rest_through") {
        return;
    }
    const ENDPOINT: &str = "169.254.180.10";
    let pod = Pod::new();
    pod.netns().add_lo_addr(&format!("{ENDPOINT}/32"));
    let mut service = pod
        .command(test_bin("lattice-test-service"))
        .in_cgroup(false)
        .args(["--http", &format!("tcp:{ENDPOINT}:80")])
        .spawn();
    service.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    let _agent = Agent::start(
        &pod,
        [
            "--cidr",
            "169.254.171.0/24",
            "--cidr",
            "fd00:ec2:80::/64",
            "--cidr",
            &format!("{ENDPOINT}/32"),
        ],
    );
    let out = pod
        .client(["http", &format!("{ENDPOINT}:80")])
        .uid(APP_UID)
        .run(T);
    assert!(
        out.success()
            && out
                .stdout
                .contains(&format!("credential={}/", DEMO_CREDENTIALS.access_key_id)),
        "HTTP to the endpoint address was not signed: {out}"
    );
    exchange(
        &pod,
        addr(ENDPOINT, 5432),
        vec![
            Step::Expect(8),
            Step::Send(b"N".to_vec()),
            Step::Rest,
            Step::SendRandom(1 << 20),
            Step::Shut,
        ],
        &[
            Step::Send(PG_SSL_REQUEST.to_vec()),
            Step::Expect(1),
            Step::SendRandom(2 << 20),
            Step::Shut,
            Step::Rest,
        ],
    );
    assert_eq!(connections(&pod, "http1"), 1);
    assert_eq!(connections(&pod, "opaque"), 1);
}

/// Node mode: a passed-through connection leaves from the pod's own
/// address (its upstream socket is made in the pod's network namespace),
/// and `/pods` counts the pod's connections by kind.
#[test]
fn node_mode_passes_through_from_the_pods_own_address() {
    if !require_root("node_mode_passes_through_from_the_pods_own_address") {
        return;
    }
    let cluster = Cluster::new();
    let _sts = cluster.lattice_service(&[]);
    let pod = cluster.node.add_pod(PodSpec::new("shop", "db-client-0"));
    cluster.apply(
        &PodObject::new(&pod, cluster.node.name())
            .annotated()
            .service_account("db")
            .irsa(
                &pod,
                "arn:aws:iam::123456789012:role/db",
                "us-west-2",
                "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJkYiJ9.c2ln",
            ),
    );
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command([] as [&str; 0]),
        &[("AWS_ENDPOINT_URL_STS", &sts_url())],
    );
    agent.wait_pod(pod.uid(), Some("enrolled"), Duration::from_secs(15));

    let dst = addr(NODE_LATTICE_V4, 3306);
    let listener = cluster.node.listen_tcp(dst).expect("listening on the node");
    let served = script::serve_once(
        listener,
        vec![Step::SendRandom(64 << 10), Step::Rest, Step::Shut],
    );
    let mut args = vec!["script".to_owned(), dst.to_string()];
    args.extend(
        [
            Step::Expect(64 << 10),
            Step::SendRandom(1 << 20),
            Step::Shut,
            Step::Rest,
        ]
        .iter()
        .map(Step::to_arg),
    );
    let out = pod
        .command(test_bin("lattice-test-client"))
        .uid(APP_UID)
        .args(args)
        .run(T);
    assert!(out.success(), "{out}");
    let app_side = Transcript::find(&out.stdout).expect("transcript");
    let server_side = served.join().expect("server thread").expect("exchange");
    assert_eq!(server_side.transcript.received, app_side.sent);
    assert_eq!(server_side.transcript.sent, app_side.received);
    assert_eq!(
        server_side.peer.ip(),
        std::net::IpAddr::V4(pod.ip()),
        "the passed-through connection did not leave from the pod's address"
    );
    let row = agent.pod_row(pod.uid()).expect("the pod's /pods row");
    assert_eq!(row["connections"]["server-first"], 1, "{row}");
    assert_eq!(row["connections"]["http1"], 0, "{row}");
}

/// A passed-through connection is drained like a request: on SIGTERM it
/// keeps working for `--drain-timeout`, then it is closed.
#[test]
fn passed_through_connections_drain_on_shutdown() {
    if !require_root("passed_through_connections_drain_on_shutdown") {
        return;
    }
    let pod = Pod::new();
    let mut agent = Agent::start(&pod, ["--drain-timeout", "3s"]);
    let dst = addr(LATTICE_V4, 5432);
    let listener = pod.listen_tcp(dst).expect("listening in the pod");
    let served = script::serve_once(
        listener,
        vec![
            Step::Expect(8),
            Step::Send(b"N".to_vec()),
            Step::Expect(4),
            Step::Send(b"pong".to_vec()),
            Step::Rest,
        ],
    );
    let mut args = vec!["script".to_owned(), dst.to_string()];
    args.extend(
        [
            Step::Send(PG_SSL_REQUEST.to_vec()),
            Step::Expect(1),
            // The agent is told to stop meanwhile: the session goes on.
            Step::Sleep(1500),
            Step::Send(b"ping".to_vec()),
            Step::Expect(4),
            // Then the drain ends and the agent closes it.
            Step::Rest,
        ]
        .iter()
        .map(Step::to_arg),
    );
    let app = pod.client(args).uid(APP_UID).spawn();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    assert!(agent.stop().success(), "{}", agent.log());
    let drained_for = started.elapsed();
    let mut app = app;
    let status = app
        .wait_timeout(Duration::from_secs(20))
        .expect("the app's session ended");
    let out = app.output(status);
    assert!(out.success(), "the session broke during the drain: {out}");
    let app_side = Transcript::find(&out.stdout).expect("transcript");
    assert_eq!(app_side.received.len, 5, "{out}");
    let server_side = served.join().expect("server thread").expect("exchange");
    assert_eq!(server_side.transcript.received, app_side.sent);
    assert!(
        drained_for >= Duration::from_millis(2500),
        "the agent stopped after {drained_for:?}, before the drain timeout\n{}",
        agent.log()
    );
}
