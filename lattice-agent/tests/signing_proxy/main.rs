//! The signing proxy end to end on loopback: client → proxy (child process,
//! real `proxy::serve`) → independent botocore verifier
//! (tests/python/sigv4_verifier.py) as the original destination. No eBPF, no
//! root; nothing leaves 127.0.0.1 / ::1. The fixtures are the test kit's
//! (`lattice_tests::{loopback, proxy_child, verifier}`); what the child
//! process runs is in `signing_proxy/child.rs`.

mod child;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use lattice_tests::{
    agent::assert_no_credentials_text,
    loopback::{
        AfterResponse, Body, BoxError, ConnUpstream, CredsMode, CredsServer, Resp, closed_port,
        collect, empty, full, get, h1, h2, h2_replay_upstream, send_on, send1, slow_upstream,
        tls_upstream,
    },
    proxy_child::{self, Creds, ProxyChild},
    sigv4::ENCODING_CASES,
    time::parse_amz_date,
    tls::{TestCa, Validity},
    verifier::{TEST_CREDENTIALS, Verifier, python_or_skip},
};
use sha2::{Digest as _, Sha256};

const AK: &str = TEST_CREDENTIALS.access_key_id;
const SK: &str = TEST_CREDENTIALS.secret_access_key;
const TOKEN: &str = match TEST_CREDENTIALS.session_token {
    Some(token) => token,
    None => panic!("the test credentials carry a session token"),
};
const REGION: &str = TEST_CREDENTIALS.region;

/// Entry point of the proxy child processes (a no-op in the normal run).
#[test]
fn child_proxy_entry() {
    if proxy_child::is_child() {
        child::main();
    }
}

/// The botocore verifier on 127.0.0.1, accepting the test credentials and
/// what `extra` adds.
fn verifier(python: &std::path::Path, extra: &[&str]) -> Verifier {
    Verifier::start_loopback(python, &TEST_CREDENTIALS, extra)
}

const HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";

fn assert_ok(r: &Resp) {
    assert_eq!(r.status, 200, "verifier said: {}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn get_with_reserved_and_percent_encoded_characters() {
    let Some(py) = python_or_skip("get_with_reserved_and_percent_encoded_characters", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &[]);
    for &(target, want_path, want_query) in ENCODING_CASES {
        let r = get(p.addr, HOST, target).await;
        assert_ok(&r);
        let j = r.json();
        assert_eq!(j["path"], want_path, "{target}");
        assert_eq!(j["query"], want_query, "{target}");
        assert_eq!(j["host"], HOST);
        assert_eq!(j["content_sha256"], "UNSIGNED-PAYLOAD");
        assert_eq!(j["access_key"], AK);
        let signed: Vec<&str> = j["signed_headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            signed,
            [
                "host",
                "x-amz-content-sha256",
                "x-amz-date",
                "x-amz-security-token"
            ]
        );
    }
    // Host with a port, and the IPv6 loopback listener.
    let r = get(p.addr, "svc.example:8080", "/port").await;
    assert_ok(&r);
    assert_eq!(r.json()["host"], "svc.example:8080");
    if let Some(a6) = p.addr_v6 {
        assert_ok(&get(a6, HOST, "/over-ipv6").await);
    }
}

/// 64 MiB, generated on the fly, streamed client → proxy → verifier. The
/// proxy runs in a child process with nothing else in it, so its peak RSS
/// (VmHWM) bounds what it ever held; buffering the body would put it above
/// 64 MiB by itself.
#[tokio::test(flavor = "multi_thread")]
async fn post_64_mib_streams_with_bounded_memory() {
    let Some(py) = python_or_skip("post_64_mib_streams_with_bounded_memory", false) else {
        return;
    };
    const SIZE: usize = 64 << 20;
    const CHUNK: usize = 64 << 10;
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &[]);
    let chunk = Bytes::from(
        (0..CHUNK)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut h = Sha256::new();
    for _ in 0..SIZE / CHUNK {
        h.update(&chunk);
    }
    let want_sha = hex::encode(h.finalize());
    let c = chunk.clone();
    let frames = futures_util::stream::iter(
        (0..SIZE / CHUNK).map(move |_| Ok::<_, BoxError>(Frame::data(c.clone()))),
    );
    let req = Request::post("/upload")
        .header("host", HOST)
        .header("content-length", SIZE)
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap();
    let started = Instant::now();
    let r = send1(p.addr, req).await;
    assert_ok(&r);
    let j = r.json();
    assert_eq!(j["body_length"], SIZE as u64);
    assert_eq!(j["body_sha256"], want_sha.as_str());
    let rss = p.peak_rss();
    eprintln!(
        "64 MiB in {:?}; proxy peak RSS {} KiB",
        started.elapsed(),
        rss / 1024
    );
    assert!(rss < 64 << 20, "proxy peak RSS {rss} bytes >= 64 MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_with_trailers() {
    let Some(py) = python_or_skip("chunked_upload_with_trailers", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &[]);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..10)
        .map(|i| Ok(Frame::data(Bytes::from(vec![b'a' + i; 1000]))))
        .collect();
    frames.push(Ok(Frame::trailers(trailers)));
    let req = Request::put("/chunked")
        .header("host", HOST)
        .header("trailer", "x-checksum")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        .unwrap();
    let r = send1(p.addr, req).await;
    assert_ok(&r);
    let j = r.json();
    assert_eq!(j["method"], "PUT");
    assert_eq!(j["body_length"], 10_000);
    assert_eq!(j["trailers"], serde_json::json!(["x-checksum"]));
    assert!(
        !j["header_names"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("content-length")),
        "proxy must stream a chunked upload chunked, not buffer it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn head_request() {
    let Some(py) = python_or_skip("head_request", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &[]);
    let mut s = h1(p.addr).await;
    for _ in 0..3 {
        // Same client connection: keep-alive across HEADs and GETs.
        let r = send_on(
            &mut s,
            Request::head("/head?x=1")
                .header("host", HOST)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        assert!(r.headers.contains_key("content-length"));
        let r = send_on(
            &mut s,
            Request::get("/get")
                .header("host", HOST)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_ok(&r);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_request_signed_and_forwarded_over_h2() {
    let Some(py) = python_or_skip("h2c_request_signed_and_forwarded_over_h2", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let upstream = h2_replay_upstream(v.socket_addr()).await;
    let p = ProxyChild::start(Some(upstream), Creds::Static, &[]);
    let mut s = h2(p.addr).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        // Several streams multiplexed on one client connection.
        let req = Request::post(format!("http://{HOST}/pkg.Service/Method{i}?z=1&a=2"))
            .version(http::Version::HTTP_2)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(vec![0u8; 5 + i]))
            .unwrap();
        tasks.push(s.send_request(req));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = collect(t.await.unwrap()).await;
        assert_ok(&r);
        assert_eq!(r.headers["x-upstream-version"], "HTTP/2.0");
        let j = r.json();
        assert_eq!(j["path"], format!("/pkg.Service/Method{i}"));
        assert_eq!(j["query"], "z=1&a=2", "order as sent");
        assert_eq!(j["host"], HOST);
        assert_eq!(j["body_length"], 5 + i as u64);
        let trailers = r.trailers.expect("response trailers pass through");
        assert_eq!(trailers["grpc-status"], "0");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_is_502_with_a_text_reason() {
    let down = closed_port();
    let p = ProxyChild::start(Some(down), Creds::Static, &[]);
    let r = get(p.addr, HOST, "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.text(),
        format!("lattice-agent: upstream {down}: connection refused\n")
    );
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_timeout_is_504() {
    let slow = slow_upstream(Duration::from_secs(30)).await;
    let p = ProxyChild::start(
        Some(slow),
        Creds::Static,
        &[("LATTICE_REQUEST_TIMEOUT", "500ms")],
    );
    let started = Instant::now();
    let r = get(p.addr, HOST, "/").await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.text(),
        format!("lattice-agent: upstream {slow}: no response within 500ms\n")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_without_original_destination_is_421() {
    let p = ProxyChild::start(None, Creds::Static, &[]);
    let r = get(p.addr, HOST, "/").await;
    assert_eq!(r.status, 421);
    assert!(
        r.text().starts_with(
            "lattice-agent: no original destination recorded for the connection from 127.0.0.1:"
        ),
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_sent_signature_headers_are_replaced() {
    let Some(py) = python_or_skip("client_sent_signature_headers_are_replaced", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &[]);
    let req = Request::post("/fake")
        .header("host", HOST)
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDFAKE/20000101/us-east-1/vpc-lattice-svcs/aws4_request, SignedHeaders=host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        )
        .header("x-amz-date", "20000101T000000Z")
        .header("x-amz-security-token", "FAKE-TOKEN")
        .header("x-amz-content-sha256", "deadbeef")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .header("x-end-to-end", "passes")
        .body(full("payload"))
        .unwrap();
    let r = send1(p.addr, req).await;
    assert_ok(&r);
    let j = r.json();
    assert_eq!(j["authorization_count"], 1);
    assert_eq!(j["access_key"], AK);
    let names = j["header_names"].as_array().unwrap();
    assert!(names.contains(&serde_json::json!("x-end-to-end")));
    assert!(!names.contains(&serde_json::json!("x-hop")));
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_payload_signs_the_body_hash_and_limits_size() {
    let Some(py) = python_or_skip("sign_payload_signs_the_body_hash_and_limits_size", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(
        Some(v.socket_addr()),
        Creds::Static,
        &[
            ("LATTICE_SIGN_PAYLOAD", "true"),
            ("LATTICE_MAX_SIGNED_BODY", "1KiB"),
        ],
    );
    let body = b"signed payload body".to_vec();
    let r = send1(
        p.addr,
        Request::post("/signed")
            .header("host", HOST)
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_ok(&r);
    assert_eq!(
        r.json()["content_sha256"],
        hex::encode(Sha256::digest(&body)).as_str()
    );
    // Over the limit with a Content-Length, and chunked.
    let r = send1(
        p.addr,
        Request::post("/big")
            .header("host", HOST)
            .body(full(vec![0u8; 2048]))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    let frames = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![1u8; 512])))),
    );
    let r = send1(
        p.addr,
        Request::post("/big-chunked")
            .header("host", HOST)
            .body(StreamBody::new(frames).boxed_unsync())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("--max-signed-body (1024 bytes)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_malformed_requests() {
    let p = ProxyChild::start(
        Some(closed_port()),
        Creds::Static,
        &[("LATTICE_MAX_HEADER_BYTES", "16KiB")],
    );
    // Over the limit but within hyper's read buffer: our 431.
    let r = send1(
        p.addr,
        Request::get("/")
            .header("host", HOST)
            .header("x-big", "b".repeat(16 << 10))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 431, "{}", r.text());
    // Way over: hyper's own 431.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {}\r\n\r\n",
        "b".repeat(64 << 10)
    );
    let _ = tcp.write_all(big.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    // Malformed request line: 400.
    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    tcp.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"));
    // HTTP/1.1 without Host: 400 with our text.
    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(
        text.contains("lattice-agent: bad request: missing Host header"),
        "{text}"
    );
}

/// With `--log-signing` and every log at trace level, no secret key, session
/// token or Authorization value appears anywhere in the logs.
#[tokio::test(flavor = "multi_thread")]
async fn logs_never_contain_credentials() {
    let Some(py) = python_or_skip("logs_never_contain_credentials", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let h2_up = h2_replay_upstream(v.socket_addr()).await;
    let env = [
        ("LATTICE_LOG_SIGNING", "true"),
        ("LATTICE_TEST_LOG", "trace"),
    ];
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &env);
    let p2 = ProxyChild::start(Some(h2_up), Creds::Static, &env);
    let fake_auth = "AWS4-HMAC-SHA256 Credential=CLIENTFAKE/x, Signature=clientsignature0123";
    assert_ok(
        &send1(
            p.addr,
            Request::post("/logged?a=1")
                .header("host", HOST)
                .header("authorization", fake_auth)
                .header("x-amz-security-token", "CLIENT-FAKE-TOKEN-XYZ")
                .body(full("body"))
                .unwrap(),
        )
        .await,
    );
    let mut s = h2(p2.addr).await;
    let r = collect(
        s.send_request(
            Request::get(format!("http://{HOST}/logged-h2"))
                .version(http::Version::HTTP_2)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_ok(&r);
    // Let the children flush.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(path) = std::env::var_os("LATTICE_TEST_DUMP_LOGS") {
        std::fs::write(path, p.logs() + &p2.logs()).unwrap();
    }
    for logs in [p.logs(), p2.logs()] {
        assert!(
            logs.contains("x-amz-security-token:REDACTED"),
            "--log-signing output missing:\n{logs}"
        );
        assert!(logs.contains("AWS4-HMAC-SHA256\n") || logs.contains("AWS4-HMAC-SHA256\\n"));
        for secret in [
            SK,
            TOKEN,
            "Signature=",
            fake_auth,
            "CLIENT-FAKE-TOKEN-XYZ",
            "clientsignature0123",
        ] {
            assert!(!logs.contains(secret), "logs contain {secret:?}:\n{logs}");
        }
    }
}

/// Container credentials (the EKS Pod Identity / ECS path) that expire every
/// few seconds: the background refresh replaces them ahead of expiry and no
/// request fails or is signed with an expired key.
#[tokio::test(flavor = "multi_thread")]
async fn expiring_container_credentials_are_refreshed_without_failures() {
    let Some(py) = python_or_skip(
        "expiring_container_credentials_are_refreshed_without_failures",
        false,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let creds = CredsServer::start(CredsMode::Serve, Duration::from_secs(4), keys.clone()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &creds.token).unwrap();
    let v = verifier(&py, &["--keys-file", keys.to_str().unwrap()]);
    let env = container_env(&creds, &token_file);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Chain(&env), &[]);
    wait_ready(&p).await;

    let deadline = Instant::now() + Duration::from_secs(9);
    let mut seen = Vec::new();
    let mut s = h1(p.addr).await;
    while Instant::now() < deadline {
        let r = send_on(
            &mut s,
            Request::get("/tick")
                .header("host", HOST)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_ok(&r);
        let j = r.json();
        seen.push((
            j["access_key"].as_str().unwrap().to_owned(),
            parse_amz_date(j["amz_date"].as_str().unwrap()).expect("an x-amz-date"),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued = creds.issued();
    let mut keys_used: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    keys_used.dedup();
    assert!(
        keys_used.len() >= 3,
        "keys used: {keys_used:?}; issued {issued:?}"
    );
    for (key, signed_at) in &seen {
        let i = issued.iter().find(|i| &i.access_key == key).unwrap();
        assert!(
            *signed_at < i.expiry_unix,
            "{key} used at {signed_at} but expired at {}",
            i.expiry_unix
        );
    }
    let metrics = get(p.admin, "admin", "/metrics").await.text();
    assert!(
        metrics.contains("lattice_credential_refreshes_total{result=\"success\"}"),
        "{metrics}"
    );
    let logs = p.logs();
    for secret in creds.secrets() {
        assert!(!logs.contains(&secret), "logs contain a secret:\n{logs}");
    }
}

/// IRSA: web identity token file + role ARN, exchanged at moto's STS on
/// loopback (`AWS_ENDPOINT_URL_STS`); the verifier knows the key moto issued.
#[tokio::test(flavor = "multi_thread")]
async fn irsa_web_identity_with_moto_sts() {
    let Some(py) = python_or_skip("irsa_web_identity_with_moto_sts", true) else {
        return;
    };
    let moto_port = closed_port().port();
    let moto_port_s = moto_port.to_string();
    let v = verifier(&py, &["--moto-sts-port", &moto_port_s]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("web-identity-token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2ln").unwrap();
    let env = [
        (
            "AWS_ENDPOINT_URL_STS",
            format!("http://127.0.0.1:{moto_port}"),
        ),
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            token_file.to_str().unwrap().to_owned(),
        ),
        (
            "AWS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/lattice-test".to_owned(),
        ),
        ("AWS_ROLE_SESSION_NAME", "lattice-test".to_owned()),
        ("AWS_REGION", REGION.to_owned()),
    ];
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Chain(&env), &[]);
    wait_ready(&p).await;
    let r = get(p.addr, HOST, "/irsa").await;
    assert_ok(&r);
    let ak = r.json()["access_key"].as_str().unwrap().to_owned();
    assert_ne!(ak, AK, "must be moto's key, not the static one");
}

/// No credentials at start: 503 naming the provider error, /readyz not
/// ready; once the endpoint works, both recover without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_unavailable_at_start_then_recover() {
    let Some(py) = python_or_skip("credentials_unavailable_at_start_then_recover", false) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let creds = CredsServer::start(CredsMode::Fail, Duration::from_secs(3600), keys.clone()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &creds.token).unwrap();
    let v = verifier(&py, &["--keys-file", keys.to_str().unwrap()]);
    let env = container_env(&creds, &token_file);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Chain(&env), &[]);

    // Until the first attempt failed, the reason may still be "not loaded yet".
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = get(p.addr, HOST, "/").await;
        assert_eq!(r.status, 503, "{}", r.text());
        if !r.text().contains("not loaded yet") || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = r.text();
    assert_no_credentials_text(&text);
    assert_eq!(text.lines().count(), 1, "{text}");
    let ready = get(p.admin, "admin", "/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("no credentials"), "{}", ready.text());
    assert_eq!(get(p.admin, "admin", "/healthz").await.status, 200);

    creds.set_mode(CredsMode::Serve);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let r = get(p.addr, HOST, "/").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "never recovered: {}", r.text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(get(p.admin, "admin", "/readyz").await.status, 200);
}

/// Shutdown: stop accepting, finish the in-flight request, exit.
#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_drains_in_flight_requests() {
    let slow = slow_upstream(Duration::from_millis(1500)).await;
    let mut p = ProxyChild::start(
        Some(slow),
        Creds::Static,
        &[("LATTICE_DRAIN_TIMEOUT", "10s")],
    );
    let addr = p.addr;
    let in_flight = tokio::spawn(async move { get(addr, HOST, "/slow").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = p.close_stdin_and_wait(Duration::from_secs(10));
        (s, p)
    })
    .await
    .unwrap();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow");
    assert!(
        status.0.is_some_and(|s| s.success()),
        "child did not exit cleanly ({:?}):\n{}",
        status.0,
        status.1.logs()
    );
    // New connections are refused once it stopped.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health() {
    let Some(py) = python_or_skip("metrics_and_health", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let p = ProxyChild::start(Some(v.socket_addr()), Creds::Static, &[]);
    assert_ok(&get(p.addr, HOST, "/m").await);
    assert_eq!(get(p.admin, "admin", "/healthz").await.status, 200);
    assert_eq!(get(p.admin, "admin", "/readyz").await.status, 200);
    let m = get(p.admin, "admin", "/metrics").await.text();
    for needle in [
        "lattice_requests_total{method=\"GET\",status=\"200\"} 1",
        "lattice_redirected_connections_total{} 1",
        "lattice_upstream_duration_seconds_count 1",
        "lattice_open_connections",
        "lattice_signing_failures_total{} 0",
    ] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
}

fn container_env(creds: &CredsServer, token_file: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://{}/v1/credentials", creds.addr),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            token_file.to_str().unwrap().to_owned(),
        ),
        ("AWS_REGION", REGION.to_owned()),
    ]
}

async fn wait_ready(p: &ProxyChild) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(p.admin, "admin", "/readyz").await;
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {}\n{}",
            r.text(),
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A wrong signature reaches the verifier, whose 403 comes back untouched
/// (as Lattice's own 403s must).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_403_passes_through_untouched() {
    let Some(py) = python_or_skip("upstream_403_passes_through_untouched", false) else {
        return;
    };
    let v = verifier(&py, &[]);
    let wrong = format!("static:{AK}:not-the-secret:{TOKEN}");
    let p = ProxyChild::start(
        Some(v.socket_addr()),
        Creds::Static,
        &[("LATTICE_TEST_CREDS", wrong.as_str())],
    );
    let r = get(p.addr, HOST, "/denied").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("signature mismatch"),
        "{}",
        r.text()
    );
}

/// `--idle-timeout` closes a client connection with no request in flight:
/// idle after its answer, or with a request head trickling in (a byte
/// every 200 ms, never finished). Returns what the proxy wrote.
async fn closed_after_idle_timeout(head: String, trickle: bool) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let p = ProxyChild::start(
        Some(closed_port()),
        Creds::Static,
        &[("LATTICE_IDLE_TIMEOUT", "1s")],
    );
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        while trickle && wr.write_all(b"x").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Held open until the proxy closes.
        std::future::pending::<()>().await;
    });
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf)).await;
    writer.abort();
    assert!(closed.is_ok(), "the connection was still open after 10 s");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    buf
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_client_connections_are_closed() {
    let answer =
        closed_after_idle_timeout(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), false).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 502"));
}

#[tokio::test(flavor = "multi_thread")]
async fn trickled_request_head_is_cut_off_at_the_idle_timeout() {
    closed_after_idle_timeout(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n"), true).await;
}

/// `--upstream-tls`: SNI and certificate name from the Host / :authority,
/// trust from `--ca-file`; HTTP/1.1 and h2 (ALPN) upstream.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_tls_uses_host_for_sni_and_ca_file_for_trust() {
    let ca = TestCa::new("lattice test CA");
    let leaf = ca.issue("svc", &["svc.example"], Validity::Current);
    let up = tls_upstream(&leaf.cert, &leaf.key).await;
    let ca_s = ca.ca_file().to_str().unwrap().to_owned();
    let env = [
        ("LATTICE_UPSTREAM_TLS", "true"),
        ("LATTICE_CA_FILE", ca_s.as_str()),
    ];
    let p = ProxyChild::start(Some(up), Creds::Static, &env);

    let r = get(p.addr, "svc.example", "/tls").await;
    assert_ok(&r);
    assert_eq!(
        r.text(),
        "sni=svc.example alpn=http/1.1 version=HTTP/1.1 authority=svc.example"
    );

    let mut s = h2(p.addr).await;
    let r = collect(
        s.send_request(
            Request::get("http://svc.example/tls-h2")
                .version(http::Version::HTTP_2)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_ok(&r);
    assert_eq!(
        r.text(),
        "sni=svc.example alpn=h2 version=HTTP/2.0 authority=svc.example"
    );

    // A name the certificate does not cover: 502 naming the TLS failure.
    let r = get(p.addr, "other.example", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().starts_with(&format!(
            "lattice-agent: upstream {up}: TLS with other.example: certificate not valid for this name"
        )),
        "{}",
        r.text()
    );

    // Without --ca-file the test CA is not trusted.
    let p = ProxyChild::start(Some(up), Creds::Static, &[("LATTICE_UPSTREAM_TLS", "true")]);
    let r = get(p.addr, "svc.example", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("TLS"), "{}", r.text());
}

/// `--role-arn`: AssumeRole (at moto's STS on loopback) on top of the
/// default chain's environment credentials; requests are signed with the
/// assumed role's key, not the base key.
#[tokio::test(flavor = "multi_thread")]
async fn role_arn_assumes_a_role_on_top_of_the_chain() {
    let Some(py) = python_or_skip("role_arn_assumes_a_role_on_top_of_the_chain", true) else {
        return;
    };
    let moto_port = closed_port().port();
    let moto_port_s = moto_port.to_string();
    let v = verifier(&py, &["--moto-sts-port", &moto_port_s]);
    let env = [
        (
            "AWS_ENDPOINT_URL_STS",
            format!("http://127.0.0.1:{moto_port}"),
        ),
        ("AWS_ACCESS_KEY_ID", "AKIDBASEENVKEY".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "base/env/secret".to_owned()),
        ("AWS_REGION", REGION.to_owned()),
    ];
    let p = ProxyChild::start(
        Some(v.socket_addr()),
        Creds::Chain(&env),
        &[
            (
                "LATTICE_ROLE_ARN",
                "arn:aws:iam::123456789012:role/lattice-assumed",
            ),
            ("LATTICE_ROLE_SESSION_NAME", "lattice-test-session"),
        ],
    );
    wait_ready(&p).await;
    let r = get(p.addr, HOST, "/assumed").await;
    assert_ok(&r);
    let ak = r.json()["access_key"].as_str().unwrap().to_owned();
    assert!(ak != AK && ak != "AKIDBASEENVKEY", "{ak}");
    assert!(!p.logs().contains("base/env/secret"));
}

/// `conn=<n>` of a [`ConnUpstream`] answer.
fn upstream_conn(r: &Resp) -> u64 {
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    text.strip_prefix("conn=")
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {text:?}"))
}

async fn get_on(s: &mut hyper::client::conn::http1::SendRequest<Body>, host: &str) -> u64 {
    upstream_conn(
        &send_on(
            s,
            Request::get("/")
                .header("host", host)
                .body(empty())
                .unwrap(),
        )
        .await,
    )
}

/// A client connection's requests share one upstream connection; a closed
/// client connection leaves it to the next one; client connections open
/// at the same time get one each; another authority gets its own.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_kept_per_client_connection_and_reused() {
    let up = ConnUpstream::start(AfterResponse::KeepAlive).await;
    let p = ProxyChild::start(Some(up.addr), Creds::Static, &[]);

    let mut a = h1(p.addr).await;
    let first = get_on(&mut a, HOST).await;
    for _ in 0..4 {
        assert_eq!(get_on(&mut a, HOST).await, first);
    }
    drop(a);
    // The agent sees the client close after a moment; until then it still
    // holds the upstream connection, so wait for the pool to have it.
    let mut reused = false;
    for _ in 0..50 {
        let mut b = h1(p.addr).await;
        if get_on(&mut b, HOST).await == first {
            reused = true;
            // Held by `b` now: a client connection open at the same time
            // gets another one.
            let mut c = h1(p.addr).await;
            let other = get_on(&mut c, HOST).await;
            assert_ne!(other, first);
            assert_eq!(get_on(&mut b, HOST).await, first);
            assert_eq!(get_on(&mut c, HOST).await, other);
            // Another authority on the same client connection: a
            // connection of its own, and back again.
            let elsewhere = get_on(&mut b, "other.example").await;
            assert!(elsewhere != first && elsewhere != other);
            assert_eq!(get_on(&mut b, HOST).await, first);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reused,
        "a new client connection never reused the pooled upstream connection"
    );
}

/// Upstreams that close connections (with `Connection: close`, or silently
/// when idle) cost the client nothing: every request is answered, on a new
/// connection where needed.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_closing_connections_is_transparent() {
    let up = ConnUpstream::start(AfterResponse::Close).await;
    let p = ProxyChild::start(Some(up.addr), Creds::Static, &[]);
    let mut a = h1(p.addr).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(get_on(&mut a, HOST).await);
    }
    seen.dedup();
    assert_eq!(seen.len(), 5, "each answer closed its connection: {seen:?}");

    let up = ConnUpstream::start(AfterResponse::CloseWhenIdle(Duration::from_millis(100))).await;
    let p = ProxyChild::start(Some(up.addr), Creds::Static, &[]);
    let mut a = h1(p.addr).await;
    let first = get_on(&mut a, HOST).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = get_on(&mut a, HOST).await;
    assert_ne!(second, first, "the upstream closed the first connection");
}

/// `--idle-timeout` also closes pooled upstream connections.
#[tokio::test(flavor = "multi_thread")]
async fn idle_upstream_connections_are_closed() {
    let up = ConnUpstream::start(AfterResponse::KeepAlive).await;
    let p = ProxyChild::start(
        Some(up.addr),
        Creds::Static,
        &[("LATTICE_IDLE_TIMEOUT", "1s")],
    );
    let mut a = h1(p.addr).await;
    let n = get_on(&mut a, HOST).await;
    let released = Instant::now();
    drop(a);
    let closed_at = loop {
        if let Some(&(_, at)) = up.closed().iter().find(|(c, _)| *c == n) {
            break at;
        }
        assert!(
            released.elapsed() < Duration::from_secs(10),
            "the idle upstream connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let idle = closed_at - released;
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "closed after {idle:?} with --idle-timeout 1s"
    );
}
