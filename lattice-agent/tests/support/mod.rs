//! Loopback harness for the signing-proxy tests.
//!
//! - [`Verifier`]: tests/python/sigv4_verifier.py, an independent botocore
//!   SigV4 verifier, as a child process.
//! - [`ProxyChild`]: the real proxy (`proxy::serve`, `credentials`, `admin`)
//!   in a child process: this test binary re-run with `LATTICE_TEST_CHILD`
//!   set, configured like the agent through `LATTICE_*` variables, in a
//!   cleared environment. A child of its own gives each case its own process
//!   environment for aws-config, its own memory high-water mark, and its own
//!   captured logs. Its original destination for every connection is
//!   `LATTICE_TEST_UPSTREAM` (the verifier's loopback address).
//! - HTTP/1.1 and h2c clients that connect to an explicit loopback address
//!   and never resolve a name.
//!
//! Every child is killed and reaped on drop.

#![allow(dead_code)]

pub mod child;
pub mod servers;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt as _, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub const REGION: &str = "us-west-2";
pub const SERVICE: &str = "vpc-lattice-svcs";
pub const AK: &str = "AKIDLATTICETEST";
pub const SK: &str = "lattice/test/SECRET+key0123456789abcdefgh";
pub const TOKEN: &str = "SESSION-TOKEN-lattice-test-0123456789";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// $LATTICE_TEST_VENV, else `<target dir>/venv`.
fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("LATTICE_TEST_VENV") {
        return PathBuf::from(v);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("venv")
}

/// The venv's python with botocore (and moto when `moto`), or None (skip)
/// outside CI; panics under CI=true.
pub fn python(test: &str, moto: bool) -> Option<PathBuf> {
    let python = venv().join("bin/python");
    let import = if moto {
        "import botocore, moto.server"
    } else {
        "import botocore"
    };
    let ok = Command::new(&python)
        .args(["-c", import])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let missing = format!(
        "a venv at {} with botocore{} (tests/requirements.txt; `cargo xtask setup`, or set LATTICE_TEST_VENV)",
        venv().display(),
        if moto { " and moto[server]" } else { "" }
    );
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: missing {missing}; CI=true forbids skipping");
    eprintln!("\n*** SKIPPED {test}: missing {missing} ***\n");
    None
}

/// A child process killed and reaped on drop.
pub struct ChildGuard {
    pub child: Child,
    stdin: Option<ChildStdin>,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the child's stdin (our children stop gracefully on EOF) and
    /// waits up to `limit` for it to exit.
    pub fn close_stdin_and_wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` with piped stdio; returns the guard, a channel of stdout
/// lines, and the collected stderr.
fn spawn(mut cmd: Command) -> (ChildGuard, mpsc::Receiver<String>, Arc<Mutex<String>>) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning child");
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let guard = ChildGuard { child, stdin };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading after nobody listens: a child must never see EPIPE.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let log = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    (guard, rx, log)
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, log: &Mutex<String>) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            // libtest may have printed `test name ... ` on the same line.
            Ok(line) => {
                if let Some(i) = line.find(prefix) {
                    return line[i..].to_owned();
                }
            }
            Err(_) => panic!(
                "child never printed {prefix:?}; its stderr:\n{}",
                log.lock().unwrap()
            ),
        }
    }
}

/// The botocore verifier on 127.0.0.1.
pub struct Verifier {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Verifier {
    /// Accepting `AK`/`SK`/`TOKEN` plus whatever `extra` adds.
    pub fn start(python: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(python);
        cmd.arg(workspace().join("tests/python/sigv4_verifier.py"))
            .args(["--region", REGION, "--service", SERVICE])
            .args(["--access-key", AK, "--secret-key", SK, "--token", TOKEN])
            .args(extra)
            .env("PYTHONUNBUFFERED", "1");
        let (guard, rx, log) = spawn(cmd);
        let line = wait_line(&rx, "LISTENING ", &log);
        let port: u16 = line["LISTENING ".len()..].trim().parse().expect("port");
        Self {
            guard,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        }
    }
}

/// The proxy under test, in a child process.
pub struct ProxyChild {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub addr_v6: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

/// How the child proxy gets credentials.
pub enum Creds<'a> {
    /// Fixed `AK`/`SK`/`TOKEN`.
    Static,
    /// aws-config's default chain, from these environment variables only.
    Chain(&'a [(&'a str, String)]),
}

impl ProxyChild {
    /// `upstream`: the original destination of every connection (None: no
    /// record). `env`: extra `LATTICE_*` settings.
    pub fn start(upstream: Option<SocketAddr>, creds: Creds<'_>, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "--exact",
            "child_proxy_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LATTICE_TEST_CHILD", "proxy")
        .env("LATTICE_TEST_LOG", "debug")
        .env("LATTICE_REGION", REGION)
        // Only ever loopback; no instance metadata, no profile files.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/lattice-test/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/lattice-test/credentials",
        )
        .env("HOME", "/nonexistent/lattice-test");
        if let Some(u) = upstream {
            cmd.env("LATTICE_TEST_UPSTREAM", u.to_string());
        }
        match creds {
            Creds::Static => {
                cmd.env("LATTICE_TEST_CREDS", format!("static:{AK}:{SK}:{TOKEN}"));
            }
            Creds::Chain(vars) => {
                cmd.env("LATTICE_TEST_CREDS", "chain");
                for (k, v) in vars {
                    cmd.env(k, v);
                }
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (guard, rx, log) = spawn(cmd);
        let line = wait_line(&rx, "READY ", &log);
        let mut fields = HashMap::new();
        for kv in line["READY ".len()..].split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                fields.insert(k.to_owned(), v.to_owned());
            }
        }
        Self {
            guard,
            addr: fields["proxy"].parse().expect("proxy addr"),
            addr_v6: fields.get("proxy6").and_then(|a| a.parse().ok()),
            admin: fields["admin"].parse().expect("admin addr"),
            log,
        }
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Peak resident set size of the child (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.guard.pid())).expect("status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kb * 1024
    }
}

/// A collected response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub async fn collect(resp: Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("response body");
    let trailers = collected.trailers().cloned();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// One HTTP/1.1 connection to `addr`.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    send
}

/// One HTTP/2 prior-knowledge (h2c) connection to `addr`.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Sends `req` on an open HTTP/1.1 connection once it is ready.
pub async fn send_on(
    s: &mut hyper::client::conn::http1::SendRequest<Body>,
    req: Request<Body>,
) -> Resp {
    s.ready().await.expect("connection ready");
    collect(s.send_request(req).await.expect("request")).await
}

/// Sends one request on a fresh HTTP/1.1 connection.
pub async fn send1(addr: SocketAddr, req: Request<Body>) -> Resp {
    let mut s = h1(addr).await;
    collect(s.send_request(req).await.expect("request")).await
}

/// `GET path` with `Host: host`, on a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    send1(
        addr,
        Request::get(path)
            .header("host", host)
            .body(empty())
            .unwrap(),
    )
    .await
}

/// RFC 3339 UTC, second precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYYMMDDTHHMMSSZ` (x-amz-date) to Unix seconds.
pub fn amz_date_secs(s: &str) -> u64 {
    let n = |a: usize, b: usize| -> i64 { s[a..b].parse().unwrap() };
    let (y, m, d) = (n(0, 4), n(4, 6), n(6, 8));
    let (hh, mm, ss) = (n(9, 11), n(11, 13), n(13, 15));
    // Days from civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + hh * 3600 + mm * 60 + ss) as u64
}

/// A free loopback port nobody listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
