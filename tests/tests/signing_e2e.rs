//! Signing end to end through the eBPF path, against the real kernel:
//!
//!   app (curl, UID 1000, in the pod cgroup, plain HTTP to a Lattice address)
//!   → connect4/connect6 redirect → lattice-agent (the real binary, signing)
//!   → a Lattice-like service on the pod's Lattice address: the botocore
//!     verifier (tests/python/sigv4_verifier.py), written independently of
//!     our signer, answering 403 on any mismatch.
//!
//! Every credential source runs on the pod's own loopback (moto's STS, a
//! container-credentials endpoint, both inside the verifier process, which
//! therefore knows the keys they issue); the agent, after dropping to UID
//! 101, reaches them directly (only 169.254.171.0/24 and fd00:ec2:80::/64
//! are intercepted). Nothing leaves the pod's network namespace. The agent
//! runs with a cleared environment: no IMDS, no profile files.
//!
//! Needs root, a built agent (`cargo build -p lattice-agent`) and the test
//! venv (`cargo xtask setup`). Each test has its own pod; they run in
//! parallel.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use lattice_tests::{
    ChildGuard, Pod, TempDir,
    agent::{READY_LINE, READY_TIMEOUT, STOP_TIMEOUT, agent_bin, assert_no_credentials_text},
    pod::{LATTICE_V4, LATTICE_V6},
    probe::grpc_curl_args,
    require_root,
    sigv4::ENCODING_CASES,
    spawn::Stream,
    verifier::{Credentials, Verifier},
};

/// The application's UID: neither root nor the exempt UID 101.
const APP_UID: u32 = 1000;
/// A Lattice service name, as apps put in Host.
const HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";
/// Static credentials with a session token (the token must be signed and
/// never logged).
const STATIC: Credentials = Credentials {
    access_key_id: "AKIDLATTICEE2ETEST",
    secret_access_key: "lattice/e2e/SECRET+key0123456789abcdefgh",
    session_token: Some("E2E-SESSION-TOKEN-lattice-0123456789abcdef"),
    region: "us-west-2",
};
/// The agent's admin listener (its default) in the pod netns.
const ADMIN: &str = "http://127.0.0.1:15090";
/// Credential endpoints on the pod's loopback (one pod each: fixed ports).
const MOTO_PORT: u16 = 5000;
const CONTAINER_CREDS_PORT: u16 = 8099;
const CONTAINER_AUTH_TOKEN: &str = "container-authorization-token-e2e-0123456789";
/// The web identity token the agent exchanges at moto's STS.
const WEB_IDENTITY_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsYXR0aWNlLWUyZSJ9.c2lnbmF0dXJl";

// ------------------------------------------------------------------ agent

/// lattice-agent run on a pod, started with only the environment given.
struct RunningAgent {
    child: ChildGuard,
}

impl RunningAgent {
    /// `lattice-agent run --cgroup <pod> --region <region> ARGS`, with a
    /// cleared environment plus `env` (no IMDS, no profile files), waiting
    /// for its ready line.
    fn start(pod: &Pod, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut cmd = pod
            .command(agent_bin())
            .in_cgroup(false)
            .arg("run")
            .arg("--cgroup")
            .arg(pod.cgroup_path())
            .args(["--region", STATIC.region])
            .args(args)
            .build();
        cmd.env_clear()
            .envs([
                ("AWS_EC2_METADATA_DISABLED", "true"),
                ("AWS_CONFIG_FILE", "/nonexistent/lattice-e2e/config"),
                (
                    "AWS_SHARED_CREDENTIALS_FILE",
                    "/nonexistent/lattice-e2e/credentials",
                ),
                ("HOME", "/nonexistent/lattice-e2e"),
            ])
            .envs(env.iter().copied());
        let mut child = ChildGuard::spawn(cmd, "lattice-agent run".to_owned());
        child.wait_for(Stream::Stderr, READY_LINE, READY_TIMEOUT);
        Self { child }
    }

    /// With static credentials from the environment.
    fn with_static(pod: &Pod, args: &[&str]) -> Self {
        Self::start(pod, &STATIC.agent_env(), args)
    }

    fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Everything it printed, stdout and stderr.
    fn logs(&self) -> String {
        self.child.stdout() + &self.child.stderr()
    }

    /// A `/proc/<pid>/status` field in bytes (VmRSS, VmHWM).
    fn memory(&self, field: &str) -> u64 {
        proc_status_bytes(self.pid(), field)
            .unwrap_or_else(|| panic!("no {field} for the agent:\n{}", self.logs()))
    }

    /// SIGTERM and wait, so every log line is flushed; panics if it does
    /// not exit cleanly.
    fn stop(&mut self) {
        self.child.signal(libc::SIGTERM);
        let status = self.child.wait_timeout(STOP_TIMEOUT);
        let out = status.map(|s| self.child.output(s));
        assert!(
            out.as_ref().is_some_and(|o| o.success()),
            "agent did not stop cleanly: {:?}\n{}",
            out.map(|o| o.status),
            self.logs()
        );
    }
}

fn proc_status_bytes(pid: i32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Polls `/readyz` until 200; panics with the agent's log after `limit`.
fn wait_ready(pod: &Pod, agent: &RunningAgent, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let r = app(pod, &[&format!("{ADMIN}/readyz")]);
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent never ready: {} {}\n{}",
            r.status,
            r.body,
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts none of `secrets` occurs in the agent's output.
fn assert_not_logged(agent: &RunningAgent, secrets: &[&str]) {
    let logs = agent.logs();
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !logs.contains(secret),
            "the agent logged {secret:?}:\n{logs}"
        );
    }
}

// -------------------------------------------------------------------- app

/// What the app got for one request.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// curl's `%{http_version}`: "1.1" or "2".
    version: String,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The verifier accepted the signature.
    fn assert_ok(&self) -> serde_json::Value {
        assert_eq!(self.status, 200, "verifier said: {self:?}");
        self.json()
    }
}

/// The app's curl, placed in the pod (netns and cgroup) as [`APP_UID`]:
/// never a proxy, no config file, paths and brackets as given.
fn curl(pod: &Pod, args: &[&str], timeout: Duration) -> lattice_tests::Output {
    let out = pod
        .command("curl")
        .uid(APP_UID)
        .args(["-q", "-sS", "--noproxy", "*", "--path-as-is"])
        .args(["--max-time", &timeout.as_secs().to_string()])
        .args([
            "-w",
            "%{stderr}CURL status=%{http_code} version=%{http_version}\\n",
        ])
        .args(args)
        .run(timeout + Duration::from_secs(10));
    assert!(
        out.success(),
        "curl {args:?} failed (exit {:?}):\n{out}",
        out.code()
    );
    out
}

/// One request by the app (`-g`: URL brackets are literal); the answer with
/// its headers.
fn app(pod: &Pod, args: &[&str]) -> Reply {
    app_timeout(pod, args, Duration::from_secs(30))
}

fn app_timeout(pod: &Pod, args: &[&str], timeout: Duration) -> Reply {
    let mut all = vec!["-g", "-i"];
    all.extend_from_slice(args);
    let out = curl(pod, &all, timeout);
    let version = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("CURL "))
        .and_then(|l| l.split_once(" version="))
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    // Skip interim 1xx heads (100 Continue).
    let mut rest = out.stdout.as_str();
    loop {
        let (head, tail) = rest
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in curl output:\n{out}"));
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in curl output:\n{out}"));
        if (100..200).contains(&status) {
            rest = tail;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        return Reply {
            status,
            version,
            headers,
            body: tail.to_owned(),
        };
    }
}

/// The app's request to the Lattice service at `http://<LATTICE_V4><target>`
/// (Host: the service name), `args` first.
fn to_service(pod: &Pod, args: &[&str], target: &str) -> Reply {
    let host = format!("Host: {HOST}");
    let url = v4(target);
    let mut all = args.to_vec();
    all.extend(["-H", &host, &url]);
    app(pod, &all)
}

/// `http://<LATTICE_V4><target>` (port 80).
fn v4(target: &str) -> String {
    format!("http://{LATTICE_V4}{target}")
}

// ------------------------------------------------------------------ files

// The directories are the kit's `TempDir`: every UID may read them (the
// app runs as 1000, the agent as 101).

/// `len` pseudo-random bytes in `name`, written in 1 MiB steps.
fn random_file(dir: &TempDir, name: &str, len: usize) -> PathBuf {
    let path = dir.file(name, b"");
    let mut out = std::io::BufWriter::new(fs::File::create(&path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in chunk.chunks_mut(8) {
            // xorshift64: incompressible enough, and reproducible.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
        let n = left.min(chunk.len());
        out.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    out.flush().unwrap();
    path
}

fn sha256_file(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn str_path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A pod whose verifier also serves container credentials (EKS Pod
/// Identity / ECS style: full URI plus an authorization token file) on the
/// pod's loopback, and an agent getting its credentials there. Fields drop
/// in order: agent, verifier, pod, files.
struct ContainerCase {
    agent: RunningAgent,
    verifier: Verifier,
    pod: Pod,
    /// While this file exists the endpoint answers 500.
    fail_flag: PathBuf,
    _dir: TempDir,
}

impl ContainerCase {
    /// Keys valid for `lifetime_s` seconds; `failing`: the endpoint fails
    /// until `fail_flag` is removed.
    fn start(lifetime_s: &str, failing: bool, agent_args: &[&str]) -> Self {
        let dir = TempDir::new("e2e");
        let token_file = dir.file("token", CONTAINER_AUTH_TOKEN.as_bytes());
        let fail_flag = dir.path().join("fail");
        if failing {
            dir.file("fail", b"");
        }
        let pod = Pod::new();
        let port = CONTAINER_CREDS_PORT.to_string();
        let verifier = Verifier::start_with(
            &pod,
            LATTICE_V4,
            80,
            &STATIC,
            &[
                "--container-creds-port",
                &port,
                "--container-creds-token",
                CONTAINER_AUTH_TOKEN,
                "--container-creds-lifetime",
                lifetime_s,
                "--container-creds-fail-while",
                str_path(&fail_flag),
            ],
        );
        let uri = format!("http://127.0.0.1:{CONTAINER_CREDS_PORT}/v1/credentials");
        let agent = RunningAgent::start(
            &pod,
            &[
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
                (
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                    str_path(&token_file),
                ),
                ("AWS_REGION", STATIC.region),
            ],
            agent_args,
        );
        Self {
            agent,
            verifier,
            pod,
            fail_flag,
            _dir: dir,
        }
    }

    /// The authorization token and every secret and session token issued.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![CONTAINER_AUTH_TOKEN.to_owned()];
        for i in self.verifier.issued() {
            secrets.extend([i.secret, i.token]);
        }
        secrets
    }
}

// ------------------------------------------------------------------ cases

/// Reserved and percent-encoded characters in path and query arrive as
/// signed: the verifier's botocore canonicalization agrees (the path as
/// sent, the query in the app's order with ambiguous pairs re-encoded).
/// Without the agent the same request is refused, so the 200s are the
/// agent's doing.
#[test]
fn get_with_reserved_and_percent_encoded_characters() {
    if !require_root("get_with_reserved_and_percent_encoded_characters") {
        return;
    }
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);

    let unsigned = to_service(&pod, &[], "/");
    assert_eq!(unsigned.status, 403, "{unsigned:?}");
    assert!(unsigned.body.contains("Authorization"), "{unsigned:?}");

    let agent = RunningAgent::with_static(&pod, &[]);
    let cases = ENCODING_CASES;
    for &(target, want_path, want_query) in cases {
        let j = to_service(&pod, &[], target).assert_ok();
        assert_eq!(j["path"], want_path, "{target}");
        assert_eq!(j["query"], want_query, "{target}");
        assert_eq!(j["host"], HOST);
        assert_eq!(j["access_key"], STATIC.access_key_id);
        assert_eq!(j["content_sha256"], "UNSIGNED-PAYLOAD");
        assert_eq!(j["http_version"], "HTTP/1.1");
        let signed = j["signed_headers"].as_array().unwrap();
        for h in ["host", "x-amz-date", "x-amz-security-token"] {
            assert!(signed.iter().any(|s| s == h), "{h} unsigned: {j}");
        }
    }
    let seen = verifier.wait_requests(cases.len() + 1, Duration::from_secs(10));
    assert_eq!(seen.len(), cases.len() + 1, "{seen:?}");
    assert!(seen[1..].iter().all(|r| r.status == 200), "{seen:?}");
    assert_not_logged(
        &agent,
        &[STATIC.secret_access_key, STATIC.session_token.unwrap()],
    );
}

/// The query reaches the service with the app's parameters in the app's
/// order (repeated keys carry ordered lists), over HTTP/1.1 and h2c, and
/// still verifies: the verifier sorts when it canonicalises. Only pairs
/// whose encoding a verifier could read differently are re-encoded.
#[test]
fn query_arrives_in_the_order_the_app_sent() {
    if !require_root("query_arrives_in_the_order_the_app_sent") {
        return;
    }
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let _agent = RunningAgent::with_static(&pod, &[]);

    // 100 pairs, keys repeated and out of order, values descending.
    let long: String = (0..100)
        .map(|i| format!("k{}=v{:02}", (i * 7) % 13, 99 - i))
        .collect::<Vec<_>>()
        .join("&");
    let cases: Vec<(String, String)> = [
        ("tag=z&tag=y&tag=x", "tag=z&tag=y&tag=x"),
        ("b=2&a=1&a=0", "b=2&a=1&a=0"),
        ("z=1&y=%2F&x=a+b", "z=1&y=%2F&x=a%20b"),
        ("b=&a=1&c=", "b=&a=1&c="),
        ("zflag&a=1&flag", "zflag&a=1&flag"),
        ("s=a+b&p=%2B&s=%2B+", "s=a%20b&p=%2B&s=%2B%20"),
    ]
    .into_iter()
    .map(|(sent, want)| (sent.to_owned(), want.to_owned()))
    .chain(std::iter::once((long.clone(), long)))
    .collect();
    for h2c in [false, true] {
        for (sent, want) in &cases {
            let args: &[&str] = if h2c {
                &["--http2-prior-knowledge"]
            } else {
                &[]
            };
            let r = to_service(&pod, args, &format!("/q?{sent}"));
            let j = r.assert_ok();
            assert_eq!(j["query"], *want, "h2c={h2c} sent {sent}");
            let version = if h2c { "HTTP/2" } else { "HTTP/1.1" };
            assert_eq!(j["http_version"], version, "{sent}");
        }
    }
    let seen = verifier.wait_requests(2 * cases.len(), Duration::from_secs(10));
    assert_eq!(seen.len(), 2 * cases.len(), "{seen:?}");
    for (r, (_, want)) in seen.iter().zip(cases.iter().chain(cases.iter())) {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.path, format!("/q?{want}"), "as received");
    }
}

/// With `--workers 2` the connections are served by two worker threads of
/// the agent's own: every request, HTTP/1.1 and h2c, arrives signed, and
/// the agent still drains and stops cleanly.
#[test]
fn requests_spread_over_two_workers_are_all_signed() {
    if !require_root("requests_spread_over_two_workers_are_all_signed") {
        return;
    }
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let mut agent = RunningAgent::with_static(&pod, &["--workers", "2"]);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect();
    for worker in ["lattice-wrk-0", "lattice-wrk-1"] {
        assert!(threads.iter().any(|t| t == worker), "{threads:?}");
    }
    let mut sent = 0;
    for h2c in [false, true] {
        for i in 0..4 {
            let args: &[&str] = if h2c {
                &["--http2-prior-knowledge"]
            } else {
                &[]
            };
            let j = to_service(&pod, args, &format!("/w?i={i}")).assert_ok();
            assert_eq!(j["query"], format!("i={i}"));
            sent += 1;
        }
    }
    let seen = verifier.requests();
    assert_eq!(seen.len(), sent, "{seen:?}");
    assert!(seen.iter().all(|r| r.status == 200), "{seen:?}");
    agent.stop();
}

/// A query whose percent-encoded bytes are not UTF-8 cannot be signed so
/// that every verifier agrees: 400 naming the pair, nothing forwarded.
#[test]
fn query_with_non_utf8_escapes_is_refused() {
    if !require_root("query_with_non_utf8_escapes_is_refused") {
        return;
    }
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let _agent = RunningAgent::with_static(&pod, &[]);
    let r = to_service(&pod, &[], "/q?a=1&k=%FF");
    let text = assert_text_error(&r, 400);
    assert!(text.contains("k=%FF") && text.contains("UTF-8"), "{text}");
    assert!(
        verifier.requests().is_empty(),
        "nothing reaches the service"
    );
}

/// A 64 MiB body streams through with the agent's memory bounded: its peak
/// resident set (VmHWM, since start) stays under 64 MiB.
#[test]
fn post_64_mib_body_streams_with_bounded_agent_memory() {
    if !require_root("post_64_mib_body_streams_with_bounded_agent_memory") {
        return;
    }
    const LEN: usize = 64 << 20;
    let dir = TempDir::new("e2e");
    let body = random_file(&dir, "body.bin", LEN);
    let sha = sha256_file(&body);
    let pod = Pod::new();
    let _verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let agent = RunningAgent::with_static(&pod, &[]);
    let idle = agent.memory("VmRSS");

    // Sample VmRSS while the upload runs (VmHWM gives the peak anyway).
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pid) = (Arc::clone(&stop), agent.pid());
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(proc_status_bytes(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        })
    };
    let started = Instant::now();
    let r = app_timeout(
        &pod,
        &[
            "-X",
            "POST",
            "-T",
            str_path(&body),
            "-H",
            &format!("Host: {HOST}"),
            "-H",
            "Content-Type: application/octet-stream",
            &v4("/upload"),
        ],
        Duration::from_secs(120),
    );
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.join().unwrap();
    let j = r.assert_ok();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body_length"], LEN);
    assert_eq!(j["body_sha256"], sha.as_str());
    let peak = agent.memory("VmHWM");
    eprintln!(
        "agent RSS: idle {:.1} MiB, max sampled during upload {:.1} MiB, \
         peak (VmHWM) {:.1} MiB; 64 MiB upload took {took:?}",
        mib(idle),
        mib(sampled),
        mib(peak)
    );
    assert!(
        peak < LEN as u64,
        "agent peak RSS {:.1} MiB for a 64 MiB body: the body is not streamed",
        mib(peak)
    );
}

/// A chunked upload stays chunked (streamed, not buffered to learn its
/// length) and arrives whole; HEAD is signed and answered without a body.
#[test]
fn chunked_upload_and_head() {
    if !require_root("chunked_upload_and_head") {
        return;
    }
    let dir = TempDir::new("e2e");
    let len = (3 << 20) + 12_345;
    let body = random_file(&dir, "chunked.bin", len);
    let sha = sha256_file(&body);
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let _agent = RunningAgent::with_static(&pod, &[]);

    let data = format!("@{}", str_path(&body));
    let chunked = ["-H", "Transfer-Encoding: chunked", "--data-binary", &data];
    let j = to_service(&pod, &chunked, "/chunked").assert_ok();
    assert_eq!(j["body_length"], len);
    assert_eq!(j["body_sha256"], sha.as_str());
    let names = j["header_names"].as_array().unwrap();
    assert!(
        names.iter().any(|n| n == "transfer-encoding"),
        "upstream request not chunked: {j}"
    );
    assert!(!names.iter().any(|n| n == "content-length"), "{j}");

    let head = to_service(&pod, &["-I"], "/head");
    assert_eq!(head.status, 200, "{head:?}");
    assert!(head.body.is_empty(), "{head:?}");
    assert_eq!(head.header("content-type"), Some("application/json"));
    let seen = verifier.wait_requests(2, Duration::from_secs(5));
    assert_eq!(seen[1].method, "HEAD");
    assert_eq!(seen[1].status, 200, "{:?}", seen[1]);
}

/// IPv6 destinations (connect6) and IPv4-mapped ones on an AF_INET6 socket
/// (`::ffff:169.254.171.33`, as JVMs connect) are both signed and reach the
/// service they were addressed to.
#[test]
fn ipv6_and_ipv4_mapped_destinations() {
    if !require_root("ipv6_and_ipv4_mapped_destinations") {
        return;
    }
    let pod = Pod::new();
    let verifier6 = Verifier::start(&pod, LATTICE_V6, 80, &STATIC);
    let verifier4 = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let agent = RunningAgent::with_static(&pod, &[]);

    let j = app(&pod, &[&format!("http://[{LATTICE_V6}]:80/six")]).assert_ok();
    assert_eq!(j["path"], "/six");
    assert_eq!(j["host"], format!("[{LATTICE_V6}]"));
    // curl connects an AF_INET6 socket to a v4-mapped literal.
    let j = app(&pod, &[&format!("http://[::ffff:{LATTICE_V4}]:80/mapped")]).assert_ok();
    assert_eq!(j["path"], "/mapped");
    assert_eq!(j["access_key"], STATIC.access_key_id);

    let six = verifier6.wait_requests(1, Duration::from_secs(10));
    assert_eq!(six.len(), 1, "{six:?}");
    assert_eq!((six[0].path.as_str(), six[0].status), ("/six", 200));
    let four = verifier4.wait_requests(1, Duration::from_secs(10));
    assert_eq!(four.len(), 1, "{four:?}");
    assert_eq!((four[0].path.as_str(), four[0].status), ("/mapped", 200));
    let logs = agent.logs();
    assert!(!logs.contains(" ERROR "), "{logs}");
}

/// An h2c client (HTTP/2 prior knowledge, gRPC-style POST) is signed and
/// forwarded over HTTP/2; the gRPC trailer comes back to the app.
#[test]
fn h2c_grpc_style_request_is_signed_and_forwarded() {
    if !require_root("h2c_grpc_style_request_is_signed_and_forwarded") {
        return;
    }
    let dir = TempDir::new("e2e");
    // One gRPC message: uncompressed flag, 4-byte length, payload.
    let frame = dir.file("frame.bin", b"\x00\x00\x00\x00\x05hello");
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let _agent = RunningAgent::with_static(&pod, &[]);

    let data = format!("@{}", str_path(&frame));
    let r = to_service(&pod, &grpc_curl_args(&data), "/lattice.test.Echo/Say");
    assert_eq!(r.version, "2", "{r:?}");
    assert_eq!(r.status, 200, "{r:?}");
    // curl -i prints trailers after the body.
    let json = r
        .body
        .strip_suffix("grpc-status: 0\r\n")
        .unwrap_or_else(|| panic!("no grpc-status trailer: {r:?}"));
    let j: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(j["http_version"], "HTTP/2", "upstream leg not h2: {j}");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/lattice.test.Echo/Say");
    assert_eq!(j["host"], HOST);
    assert_eq!(j["body_length"], 10);
    assert_eq!(j["access_key"], STATIC.access_key_id);
    let seen = verifier.wait_requests(1, Duration::from_secs(10));
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].http_version, "HTTP/2");
    assert_eq!(seen[0].header("content-type"), Some("application/grpc"));
}

/// IRSA: a web identity token file and a role ARN, exchanged at a real STS
/// implementation (moto) on the pod's loopback via AWS_ENDPOINT_URL_STS.
/// The verifier (moto runs in its process) accepts the issued temporary
/// credentials.
#[test]
fn irsa_web_identity_with_moto_sts() {
    if !require_root("irsa_web_identity_with_moto_sts") {
        return;
    }
    let dir = TempDir::new("e2e");
    let token_file = dir.file("web-identity-token", WEB_IDENTITY_TOKEN.as_bytes());
    let pod = Pod::new();
    let moto = MOTO_PORT.to_string();
    let _verifier =
        Verifier::start_with(&pod, LATTICE_V4, 80, &STATIC, &["--moto-sts-port", &moto]);
    let sts = format!("http://127.0.0.1:{MOTO_PORT}");
    let agent = RunningAgent::start(
        &pod,
        &[
            ("AWS_ENDPOINT_URL_STS", &sts),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", str_path(&token_file)),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/lattice-e2e"),
            ("AWS_ROLE_SESSION_NAME", "lattice-e2e"),
            ("AWS_REGION", STATIC.region),
        ],
        &["--log", "debug"],
    );
    wait_ready(&pod, &agent, Duration::from_secs(60));
    let j = to_service(&pod, &[], "/irsa").assert_ok();
    let ak = j["access_key"].as_str().unwrap();
    assert!(
        ak.starts_with("ASIA") && ak != STATIC.access_key_id,
        "not an STS-issued key: {ak}"
    );
    let signed = j["signed_headers"].as_array().unwrap();
    assert!(signed.iter().any(|h| h == "x-amz-security-token"), "{j}");
    assert_not_logged(&agent, &[WEB_IDENTITY_TOKEN]);
}

/// Container credentials that expire every few seconds: the agent
/// refreshes them ahead of expiry, so a steady stream of requests on one
/// keep-alive connection never fails and is never signed with an expired
/// key.
#[test]
fn expiring_container_credentials_are_refreshed_without_failures() {
    if !require_root("expiring_container_credentials_are_refreshed_without_failures") {
        return;
    }
    let case = ContainerCase::start("4", false, &[]);
    wait_ready(&case.pod, &case.agent, Duration::from_secs(30));

    // 90 requests, 10 a second, one connection (curl's URL range).
    const N: usize = 90;
    let out = curl(
        &case.pod,
        &[
            "--rate",
            "10/s",
            "-H",
            &format!("Host: {HOST}"),
            &v4(&format!("/tick[1-{N}]")),
        ],
        Duration::from_secs(60),
    );
    let statuses: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("CURL status="))
        .collect();
    assert_eq!(statuses.len(), N, "{out}");
    assert!(
        statuses.iter().all(|s| s.starts_with("200 ")),
        "a request failed: {out}"
    );
    let issued = case.verifier.issued();
    let mut used: Vec<&str> = Vec::new();
    for line in out.stdout.lines() {
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        let ak = j["access_key"].as_str().unwrap();
        let at = amz_date_unix(j["amz_date"].as_str().unwrap());
        let key = issued
            .iter()
            .find(|i| i.access_key == ak)
            .unwrap_or_else(|| panic!("{ak} was never issued: {issued:?}"));
        assert!(
            at < key.expiry_unix,
            "{ak} used at {at}, expired at {}",
            key.expiry_unix
        );
        used.push(&key.access_key);
    }
    assert_eq!(used.len(), N);
    used.dedup();
    eprintln!("keys used in turn: {used:?}");
    assert!(
        used.len() >= 3,
        "not refreshed ahead of expiry: {used:?}; {issued:?}"
    );
    let seen = case.verifier.requests();
    assert!(seen.iter().all(|r| r.status == 200), "{seen:?}");
    let secrets = case.secrets();
    assert_not_logged(
        &case.agent,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// The upstream refuses the connection: 502 with a one-line text body
/// naming the upstream.
#[test]
fn upstream_down_is_502_naming_the_upstream() {
    if !require_root("upstream_down_is_502_naming_the_upstream") {
        return;
    }
    let pod = Pod::new();
    let _agent = RunningAgent::with_static(&pod, &[]);
    let r = to_service(&pod, &[], "/down");
    let text = assert_text_error(&r, 502);
    assert!(
        text.starts_with(&format!("lattice-agent: upstream {LATTICE_V4}:80: ")),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
}

/// The agent's own error answer: `status`, text/plain, one line; its text.
fn assert_text_error(r: &Reply, status: u16) -> &str {
    assert_eq!(r.status, status, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{r:?}"
    );
    let text = r.body.trim_end();
    assert_eq!(text.lines().count(), 1, "{text}");
    text
}

/// No credentials can be had at start: requests get 503 with a one-line
/// text body naming the provider error and /readyz says not ready (while
/// /healthz is live); once the endpoint serves, both recover without a
/// restart.
#[test]
fn credentials_unavailable_at_start_then_recover() {
    if !require_root("credentials_unavailable_at_start_then_recover") {
        return;
    }
    let case = ContainerCase::start("3600", true, &[]);
    let pod = &case.pod;

    // Until the first attempt has failed, the reason may be "not loaded yet".
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = to_service(pod, &[], "/");
        assert_eq!(r.status, 503, "{r:?}");
        if !r.body.contains("not loaded yet") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = assert_text_error(&r, 503);
    assert_no_credentials_text(text);
    let ready = app(pod, &[&format!("{ADMIN}/readyz")]);
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.contains("no credentials"), "{ready:?}");
    assert_eq!(app(pod, &[&format!("{ADMIN}/healthz")]).status, 200);

    fs::remove_file(&case.fail_flag).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = to_service(pod, &[], "/");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "never recovered: {r:?}\n{}",
            case.agent.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(app(pod, &[&format!("{ADMIN}/readyz")]).status, 200);
}

/// A client that sends its own (fake) Authorization and X-Amz-* signing
/// headers gets them replaced: exactly one Authorization, ours, arrives.
#[test]
fn client_sent_fake_authorization_is_replaced() {
    if !require_root("client_sent_fake_authorization_is_replaced") {
        return;
    }
    let pod = Pod::new();
    let verifier = Verifier::start(&pod, LATTICE_V4, 80, &STATIC);
    let _agent = RunningAgent::with_static(&pod, &[]);
    let fake = [
        "-H",
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIDCLIENTFAKE/20000101/us-east-1/\
         vpc-lattice-svcs/aws4_request, SignedHeaders=host, Signature=00ff",
        "-H",
        "X-Amz-Security-Token: CLIENT-FAKE-TOKEN",
        "-H",
        "X-Amz-Date: 20000101T000000Z",
        "-H",
        "X-Amz-Content-Sha256: 0000",
    ];
    let j = to_service(&pod, &fake, "/fake-auth").assert_ok();
    assert_eq!(j["authorization_count"], 1);
    assert_eq!(j["access_key"], STATIC.access_key_id);
    assert_ne!(j["amz_date"], "20000101T000000Z");
    assert_eq!(j["content_sha256"], "UNSIGNED-PAYLOAD");
    let seen = verifier.wait_requests(1, Duration::from_secs(10));
    assert_eq!(seen.len(), 1, "{seen:?}");
    let count = |name: &str| seen[0].headers.iter().filter(|(n, _)| n == name).count();
    for name in [
        "authorization",
        "x-amz-security-token",
        "x-amz-date",
        "x-amz-content-sha256",
    ] {
        assert_eq!(count(name), 1, "{name}: {:?}", seen[0]);
    }
}

/// With `--log-signing` and trace logging, through h1, h2c, an error and a
/// credential fetch: no secret, session token, authorization token,
/// signature or client-sent credential appears in stdout or stderr, while
/// the signing details themselves are logged (so the scan is not vacuous).
#[test]
fn no_secret_or_token_in_the_agent_logs() {
    if !require_root("no_secret_or_token_in_the_agent_logs") {
        return;
    }
    let mut case = ContainerCase::start("3600", false, &["--log-signing", "--log", "trace"]);
    let pod = &case.pod;
    wait_ready(pod, &case.agent, Duration::from_secs(30));
    let fake_auth = "AWS4-HMAC-SHA256 Credential=AKIDCLIENTFAKE/20000101/us-east-1/\
                     vpc-lattice-svcs/aws4_request, SignedHeaders=host, \
                     Signature=c11e47fa4e5ec8e7c11e47fa4e5ec8e7";
    let auth_header = format!("Authorization: {fake_auth}");
    let client_creds = [
        "-H",
        &auth_header,
        "-H",
        "X-Amz-Security-Token: CLIENT-FAKE-TOKEN-XYZ",
    ];
    to_service(pod, &client_creds, "/logged?a=1").assert_ok();
    let r = to_service(pod, &grpc_curl_args("grpc"), "/lattice.test.Echo/Logged");
    assert_eq!((r.status, r.version.as_str()), (200, "2"), "{r:?}");
    // An upstream error: nothing listens on port 81.
    let r = app(pod, &[&format!("http://{LATTICE_V4}:81/")]);
    assert_eq!(r.status, 502, "{r:?}");
    case.agent.stop();

    let logs = case.agent.logs();
    assert!(
        logs.contains("x-amz-security-token:REDACTED"),
        "--log-signing output missing:\n{logs}"
    );
    assert!(logs.contains("AWS4-HMAC-SHA256"), "{logs}");
    assert!(logs.contains("/lattice.test.Echo/Logged"), "{logs}");
    let mut secrets = case.secrets();
    assert!(secrets.len() >= 3, "no key issued: {secrets:?}");
    secrets.extend(
        [
            "Signature=",
            fake_auth,
            "c11e47fa4e5ec8e7",
            "CLIENT-FAKE-TOKEN-XYZ",
        ]
        .map(str::to_owned),
    );
    assert_not_logged(
        &case.agent,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// `YYYYMMDDTHHMMSSZ` (x-amz-date) as Unix seconds, via `date` to keep the
/// test free of a calendar implementation.
fn amz_date_unix(s: &str) -> u64 {
    assert_eq!(s.len(), 16, "{s}");
    let iso = format!(
        "{}-{}-{} {}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &iso, "+%s"])
        .output()
        .expect("date");
    assert!(out.status.success(), "date -d {iso}");
    let secs: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // Sanity: a signing time within a day of now.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(secs.abs_diff(now) < 86_400, "{s} is not today");
    secs
}

// ------------------------------------------------------------ measurement

/// Not a check but the measurement quoted in the issue note: the latency
/// the agent adds to a small keep-alive GET, and its RSS idle and during a
/// 64 MiB upload. Upstream: nginx (`return 200`) on the pod's Lattice
/// address. Client: one curl process sending 2000 sequential GETs on one
/// connection, `%{time_total}` per request; "direct" runs outside the pod
/// cgroup (not intercepted), "agent" inside it. Runs alternate so drift
/// hits both. Use the release agent:
///
///   cargo build --release -p lattice-agent
///   LATTICE_AGENT_BIN=target/release/lattice-agent \
///     cargo test -p lattice-tests --test signing_e2e -- --ignored --nocapture
#[test]
#[ignore = "measurement; run by hand with the release agent"]
fn measure_added_latency_and_rss() {
    if !require_root("measure_added_latency_and_rss") {
        return;
    }
    const N: usize = 2000;
    const ROUNDS: usize = 5;
    let dir = TempDir::new("e2e");
    let conf = dir.file(
        "nginx.conf",
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  client_max_body_size 0;\n  keepalive_requests 1000000;\n  \
             server {{ listen {LATTICE_V4}:80; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            d = dir.path().display()
        )
        .as_bytes(),
    );
    let error_log = dir.path().join("error.log");
    let pod = Pod::new();
    let mut nginx = pod
        .command("nginx")
        .in_cgroup(false)
        .args(["-c", str_path(&conf), "-e", str_path(&error_log)])
        .spawn();
    let direct = |pod: &Pod, args: &[&str]| {
        pod.command("curl")
            .in_cgroup(false)
            .uid(APP_UID)
            .args(["-q", "-sS", "--noproxy", "*"])
            .args(args)
            .run(Duration::from_secs(120))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !direct(&pod, &["-f", &v4("/")]).success() {
        assert!(
            nginx.try_wait().is_none(),
            "nginx exited: {}",
            nginx.captured()
        );
        assert!(Instant::now() < deadline, "nginx never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut agent = RunningAgent::with_static(&pod, &[]);
    let idle = agent.memory("VmRSS");

    let url = v4(&format!("/small[1-{N}]"));
    let timing = [
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{time_total}\\n",
        &url,
    ];
    let times = |out: &lattice_tests::Output| -> Vec<f64> {
        assert!(out.success(), "{out}");
        let t: Vec<f64> = out
            .stdout
            .lines()
            .map(|l| {
                let (code, secs) = l.split_once(' ').unwrap();
                assert_eq!(code, "200", "{l}");
                secs.parse::<f64>().unwrap() * 1e6
            })
            .collect();
        assert_eq!(t.len(), N);
        t
    };
    let (mut plain, mut signed) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        plain.extend(times(&direct(&pod, &timing)));
        signed.extend(times(
            &pod.command("curl")
                .uid(APP_UID)
                .args(["-q", "-sS", "--noproxy", "*"])
                .args(timing)
                .run(Duration::from_secs(120)),
        ));
    }
    let pct = |v: &mut Vec<f64>, p: usize| {
        v.sort_by(f64::total_cmp);
        v[(v.len() * p / 100).min(v.len() - 1)]
    };
    let (d50, d99) = (pct(&mut plain, 50), pct(&mut plain, 99));
    let (a50, a99) = (pct(&mut signed, 50), pct(&mut signed, 99));
    let after_gets = agent.memory("VmRSS");

    let body = random_file(&dir, "body.bin", 64 << 20);
    let up = app_timeout(
        &pod,
        &["-X", "POST", "-T", str_path(&body), &v4("/upload")],
        Duration::from_secs(120),
    );
    assert_eq!(up.status, 200, "{up:?}");
    let peak = agent.memory("VmHWM");
    agent.stop();
    eprintln!(
        "\n{} GETs per mode ({ROUNDS} x {N}, keep-alive, sequential), curl time_total in µs:\n  \
         direct: p50 {d50:.0} p99 {d99:.0}\n  agent:  p50 {a50:.0} p99 {a99:.0}\n  \
         added:  p50 {:.0} p99 {:.0}\n\
         agent RSS: idle {:.1} MiB, after the GETs {:.1} MiB, peak (VmHWM) with a 64 MiB upload {:.1} MiB\n\
         agent binary: {}",
        ROUNDS * N,
        a50 - d50,
        a99 - d99,
        mib(idle),
        mib(after_gets),
        mib(peak),
        agent_bin().display()
    );
}
