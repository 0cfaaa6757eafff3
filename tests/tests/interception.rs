//! Interception end to end against the real kernel: lattice-agent attaches
//! its cgroup programs to a pod's cgroup, and processes in the pod connect
//! to the pod's "Lattice" addresses (all on the pod netns' `lo`: nothing
//! leaves the machine). Where the agent serves its signing proxy, the pod's
//! service speaks HTTP and reports the address reached, the peer and the
//! SigV4 credential that arrived; `--intercept-only` cases use plain TCP.
//!
//! Needs root and a built agent (`cargo build -p lattice-agent`). Every test
//! has its own pod, so they run in parallel.

use std::time::Duration;

use lattice_tests::{
    Agent, Bpffs, DEMO_CREDENTIALS, Output, Pod,
    agent::agent_command,
    bpftool::{attached_programs, map_entries},
    cgroup::cgroup2_mount,
    require_root,
    spawn::Stream,
    test_bin, unique_name,
};

/// Upper bound for one short client run.
const T: Duration = Duration::from_secs(30);
/// An application's UID (intercepted) and the agent's exempt UID.
const APP_UID: u32 = 1000;
const EXEMPT_UID: u32 = 101;

/// What a working interceptor attaches, one program per attach type.
fn interceptor_programs() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("cgroup_getsockopt", "lattice_getsockopt"),
        ("cgroup_inet4_connect", "lattice_connect4"),
        ("cgroup_inet6_connect", "lattice_connect6"),
        ("cgroup_sock_ops", "lattice_sock_ops"),
    ]
    .iter()
    .map(|(a, n)| (a.to_string(), n.to_string()))
    .collect();
    v.sort();
    v
}

fn assert_reached(out: &Output, local: &str) {
    let want = format!("service local={local}");
    assert!(
        out.success() && out.stdout.starts_with(&want),
        "expected the service at {local}, got: {out}"
    );
}

/// An HTTP request the app sent in the clear reached `dest` (its original
/// destination) through the agent: the service saw the agent's upstream
/// socket, not the client's, and a SigV4 Authorization header for the demo
/// credentials and the Lattice service.
fn assert_signed_at(out: &Output, dest: &str) {
    assert_reached(out, dest);
    let creds = DEMO_CREDENTIALS;
    let credential = out
        .stdout
        .split_whitespace()
        .find_map(|f| f.strip_prefix("credential="))
        .unwrap_or_default();
    assert!(
        credential.starts_with(&format!("{}/", creds.access_key_id))
            && credential.ends_with(&creds.scope_suffix()),
        "expected a request signed by the agent for {}…{}, got: {out}",
        creds.access_key_id,
        creds.scope_suffix()
    );
    assert!(
        out.stdout.contains("method=GET path=/lattice-test "),
        "method and path must pass through unchanged: {out}"
    );
    // A direct connection would show the client's own port as the peer.
    let client_port = port_of(&out.stderr, "local");
    let service_peer_port = port_of(&out.stdout, "peer");
    assert!(
        client_port.is_some() && service_peer_port.is_some(),
        "{out}"
    );
    assert_ne!(
        client_port, service_peer_port,
        "connection did not go through the agent: {out}"
    );
}

/// An HTTP request reached `dest` directly: unsigned, and the service's
/// peer is the client's own socket.
fn assert_direct_at(out: &Output, dest: &str) {
    assert_reached(out, dest);
    assert!(
        out.stdout.contains("credential=none"),
        "expected an unsigned request: {out}"
    );
    let client_port = port_of(&out.stderr, "local");
    assert!(client_port.is_some(), "{out}");
    assert_eq!(
        client_port,
        port_of(&out.stdout, "peer"),
        "expected a direct connection: {out}"
    );
}

fn assert_refused(out: &Output) {
    assert!(
        out.code() == Some(2) && out.stdout.contains("error: ConnectionRefused"),
        "expected connection refused (redirected to a port nobody serves), got: {out}"
    );
}

/// `port=N` from a `local=` or `peer=` field of a line like
/// `service local=169.254.171.33:80 peer=169.254.171.33:41234`.
fn port_of(text: &str, field: &str) -> Option<u16> {
    let rest = text.split(&format!("{field}=")).nth(1)?;
    let addr = rest.split_whitespace().next()?;
    addr.rsplit(':').next()?.parse().ok()
}

// a.
#[test]
fn v4_redirected_through_proxy_reaches_original_destination() {
    if !require_root("v4_redirected_through_proxy_reaches_original_destination") {
        return;
    }
    let pod = Pod::new();
    let _service = pod.start_http_service();
    let _agent = Agent::start(&pod, ["--proxy-port", "15080"]);

    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "169.254.171.33:80");
}

// b.
#[test]
fn original_destination_via_so_original_dst() {
    if !require_root("original_destination_via_so_original_dst") {
        return;
    }
    let pod = Pod::new();
    let _agent = Agent::start(&pod, ["--intercept-only", "--proxy-port", "15081"]);
    // The iptables-style proxy: in the cgroup (the getsockopt program only
    // runs there), as the exempt UID.
    let mut proxy = pod
        .command(test_bin("lattice-test-origdst-proxy"))
        .arg("15081")
        .uid(EXEMPT_UID)
        .spawn();
    proxy.wait_for(Stream::Stdout, "listening", T);

    let out = pod.client(["tcp", "169.254.171.33:80"]).uid(APP_UID).run(T);
    assert!(
        out.success() && out.stdout.trim() == "orig=169.254.171.33:80",
        "v4: {out}"
    );

    let out = pod
        .client(["tcp", "[fd00:ec2:80::33]:80"])
        .uid(APP_UID)
        .run(T);
    assert!(
        out.success() && out.stdout.trim() == "orig=[fd00:ec2:80::33]:80",
        "v6: {out}"
    );

    let out = pod
        .client(["tcp-mapped", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    let orig = out.stdout.trim();
    assert!(
        out.success()
            && (orig == "orig=169.254.171.33:80" || orig == "orig=[::ffff:169.254.171.33]:80"),
        "v4-mapped on an AF_INET6 socket: {out}"
    );
}

// c.
#[test]
fn v6_and_v4_mapped_redirected_through_proxy() {
    if !require_root("v6_and_v4_mapped_redirected_through_proxy") {
        return;
    }
    let pod = Pod::new();
    let _service = pod.start_http_service();
    let _agent = Agent::start(&pod, ["--proxy-port", "15080"]);

    let out = pod
        .client(["http", "[fd00:ec2:80::33]:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "[fd00:ec2:80::33]:80");

    let out = pod
        .client(["http-mapped", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "169.254.171.33:80");
}

/// A pod whose interceptor redirects to a port nobody listens on: any
/// redirected connect is refused, so "reached the service" proves it was
/// not redirected.
fn pod_with_dead_end_interceptor() -> (Pod, lattice_tests::ChildGuard, Agent) {
    let pod = Pod::new();
    let service = pod.start_service();
    let agent = Agent::start(&pod, ["--intercept-only", "--proxy-port", "15080"]);
    (pod, service, agent)
}

// d.
#[test]
fn exempt_uid_is_not_redirected() {
    if !require_root("exempt_uid_is_not_redirected") {
        return;
    }
    let (pod, _service, _agent) = pod_with_dead_end_interceptor();

    let out = pod.client(["tcp", "169.254.171.33:80"]).uid(APP_UID).run(T);
    assert_refused(&out);

    let out = pod
        .client(["tcp", "169.254.171.33:80"])
        .uid(EXEMPT_UID)
        .run(T);
    assert_reached(&out, "169.254.171.33:80");
    let out = pod
        .client(["tcp", "[fd00:ec2:80::33]:80"])
        .uid(EXEMPT_UID)
        .run(T);
    assert_reached(&out, "[fd00:ec2:80::33]:80");
}

// e.
#[test]
fn process_outside_cgroup_is_not_redirected() {
    if !require_root("process_outside_cgroup_is_not_redirected") {
        return;
    }
    let (pod, _service, _agent) = pod_with_dead_end_interceptor();

    let out = pod
        .client(["tcp", "169.254.171.33:80"])
        .uid(APP_UID)
        .in_cgroup(false)
        .run(T);
    assert_reached(&out, "169.254.171.33:80");
    let out = pod
        .client(["tcp", "[fd00:ec2:80::33]:80"])
        .uid(APP_UID)
        .in_cgroup(false)
        .run(T);
    assert_reached(&out, "[fd00:ec2:80::33]:80");
}

// f.
#[test]
fn destinations_outside_prefixes_are_not_redirected() {
    if !require_root("destinations_outside_prefixes_are_not_redirected") {
        return;
    }
    let (pod, _service, _agent) = pod_with_dead_end_interceptor();

    let out = pod.client(["tcp", "169.254.172.33:80"]).uid(APP_UID).run(T);
    assert_reached(&out, "169.254.172.33:80");
    let out = pod
        .client(["tcp", "[fd00:ec2:81::33]:80"])
        .uid(APP_UID)
        .run(T);
    assert_reached(&out, "[fd00:ec2:81::33]:80");
    let out = pod
        .client(["tcp-mapped", "169.254.172.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_reached(&out, "169.254.172.33:80");
}

// g.
#[test]
fn udp_is_not_intercepted() {
    if !require_root("udp_is_not_intercepted") {
        return;
    }
    let (pod, _service, _agent) = pod_with_dead_end_interceptor();

    // A connected UDP socket runs the connect4 hook too.
    let out = pod
        .client(["udp", "169.254.171.33:5353"])
        .uid(APP_UID)
        .run(T);
    assert!(
        out.success() && out.stdout.trim() == "udp-service ping",
        "UDP to a Lattice address must pass untouched: {out}"
    );
}

// h.
#[test]
fn original_destination_maps_empty_after_10000_connections() {
    if !require_root("original_destination_maps_empty_after_10000_connections") {
        return;
    }
    let pod = Pod::new();
    let bpffs = Bpffs::new();
    let _service = pod.start_http_service();
    let _agent = Agent::start(
        &pod,
        [
            "--proxy-port".as_ref(),
            "15080".as_ref(),
            "--pin".as_ref(),
            bpffs.path().as_os_str(),
        ],
    );

    // One short HTTP request per connection, each redirected, looked up by
    // the proxy, signed and forwarded.
    let started = std::time::Instant::now();
    let out = pod
        .client(["many-http", "169.254.171.33:80", "10000"])
        .uid(APP_UID)
        .run(Duration::from_secs(300));
    eprintln!(
        "10000 HTTP connections through the proxy in {:?}",
        started.elapsed()
    );
    assert!(
        out.success() && out.stdout.contains("ok=10000 failed=0 unsigned=0"),
        "10000 signed requests through the proxy: {out}"
    );

    // The counting itself works: the prefix maps hold the two defaults.
    for (map, want) in [("V4_PREFIXES", 1), ("V6_PREFIXES", 1)] {
        let n = map_entries(&bpffs.path().join(format!("map_{map}")));
        assert_eq!(
            n, want,
            "{map}: default --cidr set has one prefix per family"
        );
    }

    // Entries are removed as connections are looked up / closed; give the
    // last connection's teardown a moment.
    for map in ["ORIG_DST_BY_COOKIE", "ORIG_DST_BY_PEER"] {
        let path = bpffs.path().join(format!("map_{map}"));
        assert!(path.exists(), "{} not pinned", path.display());
        let mut n = map_entries(&path);
        for _ in 0..20 {
            if n == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            n = map_entries(&path);
        }
        assert_eq!(n, 0, "{map} still has {n} entries after 10000 connections");
    }
}

// i.
#[test]
fn sigterm_detaches_everything() {
    if !require_root("sigterm_detaches_everything") {
        return;
    }
    let pod = Pod::new();
    let _service = pod.start_http_service();
    let mut agent = Agent::start(&pod, ["--proxy-port", "15080"]);
    assert_eq!(attached_programs(pod.cgroup_path()), interceptor_programs());
    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "169.254.171.33:80");

    let status = agent.stop();
    assert!(
        status.success(),
        "exit on SIGTERM: {status}\n{}",
        agent.log()
    );
    assert_eq!(
        attached_programs(pod.cgroup_path()),
        Vec::new(),
        "programs left attached after SIGTERM"
    );
    // Unpinned: with the agent gone, traffic goes straight out again.
    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_direct_at(&out, "169.254.171.33:80");
}

// j.
#[test]
fn pinned_interception_survives_sigkill_and_is_taken_over() {
    if !require_root("pinned_interception_survives_sigkill_and_is_taken_over") {
        return;
    }
    let pod = Pod::new();
    let bpffs = Bpffs::new();
    let _service = pod.start_http_service();
    let args = [
        "--proxy-port".as_ref(),
        "15080".as_ref(),
        "--pin".as_ref(),
        bpffs.path().as_os_str(),
    ];
    let mut agent = Agent::start(&pod, args);
    assert_eq!(attached_programs(pod.cgroup_path()), interceptor_programs());
    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "169.254.171.33:80");

    agent.kill();
    assert_eq!(
        attached_programs(pod.cgroup_path()),
        interceptor_programs(),
        "pinned programs must survive kill -9"
    );
    for map in [
        "CONFIG",
        "V4_PREFIXES",
        "V6_PREFIXES",
        "ORIG_DST_BY_COOKIE",
        "ORIG_DST_BY_PEER",
    ] {
        let path = bpffs.path().join(format!("map_{map}"));
        assert!(path.exists(), "{} not pinned", path.display());
    }
    // Fail closed: still redirected, nobody serves the port; no request
    // leaves unsigned.
    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_refused(&out);

    let mut agent = Agent::start(&pod, args);
    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "169.254.171.33:80");
    let out = pod
        .client(["http", "[fd00:ec2:80::33]:80"])
        .uid(APP_UID)
        .run(T);
    assert_signed_at(&out, "[fd00:ec2:80::33]:80");
    assert_eq!(
        attached_programs(pod.cgroup_path()),
        interceptor_programs(),
        "a restarted agent must take the pins over, not attach a second time"
    );

    // Pinned interception stays even after a clean stop.
    let status = agent.stop();
    assert!(
        status.success(),
        "exit on SIGTERM: {status}\n{}",
        agent.log()
    );
    assert_eq!(attached_programs(pod.cgroup_path()), interceptor_programs());
    let out = pod
        .client(["http", "169.254.171.33:80"])
        .uid(APP_UID)
        .run(T);
    assert_refused(&out);

    // Releasing the bpffs (the fixture's cleanup) releases the links.
    drop(bpffs);
    let mut left = attached_programs(pod.cgroup_path());
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = attached_programs(pod.cgroup_path());
    }
    assert_eq!(left, Vec::new(), "unmounting the pins did not detach");
}

// k. Bad input: a clear message naming the problem, non-zero exit, and
// nothing attached.

fn agent_fails(pod: &Pod, cmd: lattice_tests::PodCommand) -> Output {
    let out = cmd.run(T);
    // Shown with --nocapture: the message is the user-facing result here.
    eprintln!(
        "agent rejected bad input ({}):\n{}",
        out.status,
        out.stderr.trim()
    );
    assert!(!out.success(), "agent should have failed: {out}");
    assert_eq!(
        attached_programs(pod.cgroup_path()),
        Vec::new(),
        "a failed start must leave nothing attached"
    );
    out
}

fn raw_agent(pod: &Pod) -> lattice_tests::PodCommand {
    pod.command(lattice_tests::agent_bin())
        .in_cgroup(false)
        .arg("run")
}

#[test]
fn bad_input_missing_cgroup() {
    if !require_root("bad_input_missing_cgroup") {
        return;
    }
    let pod = Pod::new();
    let missing = cgroup2_mount().join(format!("{}-missing", unique_name()));
    let out = agent_fails(&pod, raw_agent(&pod).arg("--cgroup").arg(&missing));
    assert!(
        out.stderr.contains("--cgroup") && out.stderr.contains(&*missing.to_string_lossy()),
        "message should name --cgroup and the path: {out}"
    );
}

#[test]
fn bad_input_cgroup_v1_dir() {
    if !require_root("bad_input_cgroup_v1_dir") {
        return;
    }
    let Some(v1) = cgroup_v1_dir() else {
        eprintln!("SKIPPED bad_input_cgroup_v1_dir: no cgroup v1 hierarchy mounted here");
        return;
    };
    let pod = Pod::new();
    let out = agent_fails(&pod, raw_agent(&pod).arg("--cgroup").arg(&v1));
    let msg = out.stderr.to_lowercase();
    assert!(
        msg.contains("--cgroup") && msg.contains("cgroup v2"),
        "message should say {} is not cgroup v2: {out}",
        v1.display()
    );
}

/// A mounted cgroup v1 hierarchy (fstype `cgroup`), if any.
fn cgroup_v1_dir() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup")
            .then(|| left.split_whitespace().nth(4).map(Into::into))
            .flatten()
    })
}

#[test]
fn bad_input_malformed_cidr() {
    if !require_root("bad_input_malformed_cidr") {
        return;
    }
    let pod = Pod::new();
    let out = agent_fails(&pod, agent_command(&pod, ["--cidr", "300.1.1.1/8"]));
    assert!(
        out.stderr.contains("--cidr") && out.stderr.contains("300.1.1.1/8"),
        "message should name --cidr and the value: {out}"
    );
}

#[test]
fn bad_input_proxy_port_in_use() {
    if !require_root("bad_input_proxy_port_in_use") {
        return;
    }
    let pod = Pod::new();
    let _occupied = pod
        .listen_tcp("127.0.0.1:15082".parse().unwrap())
        .expect("occupy the port inside the pod netns");
    let out = agent_fails(&pod, agent_command(&pod, ["--proxy-port", "15082"]));
    assert!(
        out.stderr.contains("15082") && out.stderr.to_lowercase().contains("in use"),
        "message should say the port is in use: {out}"
    );
}

/// Proxy flags are checked before anything is attached (and while the
/// agent can still read a root-only --ca-file).
#[test]
fn bad_input_ca_file_fails_before_attaching() {
    if !require_root("bad_input_ca_file_fails_before_attaching") {
        return;
    }
    let pod = Pod::new();
    let missing = format!("/nonexistent/{}-ca.pem", unique_name());
    let out = agent_fails(
        &pod,
        agent_command(&pod, ["--upstream-tls", "--ca-file", &missing]),
    );
    assert!(
        out.stderr.contains("--ca-file") && out.stderr.contains(&missing),
        "message should name --ca-file and the path: {out}"
    );
    assert!(
        !out.stderr.contains("interceptor attached"),
        "the agent attached before checking its flags: {out}"
    );
}
