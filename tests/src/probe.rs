//! What a process placed in a pod sees of the network: whether a TCP
//! connect gets through (bash's /dev/tcp: no extra tools), what an HTTP GET
//! answers (curl), and a one-request stand-in for a Lattice service that
//! keeps the request head that reached it.

use std::{
    net::{SocketAddr, TcpListener},
    process::Command,
    time::{Duration, Instant},
};

/// What a TCP connect did.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    Refused,
    Other(String),
}

/// Connects to `addr` from `bash` (a placed `Command` for "bash") and
/// closes again.
pub fn connect_with(mut bash: Command, addr: SocketAddr) -> Connect {
    bash.args([
        "-c",
        &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
    ]);
    let out = bash.output().expect("spawn bash");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Connect::Connected
    } else if stderr.contains("Connection refused") {
        Connect::Refused
    } else {
        Connect::Other(format!("{}: {stderr}", out.status))
    }
}

/// Takes every connection waiting on `listener`; returns how many.
pub fn drain(listener: &TcpListener) -> usize {
    listener.set_nonblocking(true).expect("non-blocking");
    // The connect has returned; give the accept queue a moment anyway.
    std::thread::sleep(Duration::from_millis(50));
    let mut n = 0;
    while listener.accept().is_ok() {
        n += 1;
    }
    n
}

/// `curl` (a placed `Command` for it) fetching `url`: (status, body). The
/// status is 0 when no HTTP response came back.
pub fn http_get(mut curl: Command, url: &str) -> (u16, String) {
    curl.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url]);
    let out = curl.output().expect("spawn curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Polls `url` with curl (from `curl()`) until it answers 200, as the
/// kubelet's startupProbe does; panics with the last answer on timeout.
pub fn wait_http_ok(curl: impl Fn() -> Command, url: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = http_get(curl(), url);
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not 200 within {timeout:?}: last answer {status} {body:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serves one HTTP request on `listener` (the stand-in for a Lattice
/// service): answers 200 with `body` and returns the request head, header
/// names lower-cased. Panics if no request arrives within `timeout`.
pub fn serve_one_request(listener: &TcpListener, body: &str, timeout: Duration) -> String {
    use std::io::{Read, Write};
    listener.set_nonblocking(true).expect("non-blocking");
    let deadline = Instant::now() + timeout;
    let (mut conn, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no request reached the listener within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read request");
        assert!(n > 0, "connection closed mid-request: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).expect("write response");
    let head = String::from_utf8_lossy(&head).into_owned();
    head.lines()
        .map(|line| match line.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// gRPC-style h2c arguments for curl: HTTP/2 prior knowledge, a POST of
/// `data` (curl's `--data-binary` syntax) as application/grpc.
pub fn grpc_curl_args(data: &str) -> [&str; 7] {
    [
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        data,
    ]
}
