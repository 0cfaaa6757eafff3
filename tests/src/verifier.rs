//! tests/python/sigv4_verifier.py inside a pod: a Lattice-like service that
//! recomputes every request's SigV4 signature with botocore (written
//! independently of our signer) and answers 200 with a JSON echo, or 403
//! (`AccessDeniedException`, with the reason) when the request is unsigned
//! or the signature does not match.
//!
//! It runs in the pod netns, outside the pod cgroup, as root (so it may bind
//! port 80), with `--log-requests`: every request it answered is printed as
//! a `REQUEST <json>` line, readable through [`Verifier::requests`], with
//! the signature and security token already redacted by the verifier.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    pod::Pod,
    skip,
    spawn::{ChildGuard, PodCommand, Stream},
    venv, workspace,
};

/// How long the verifier may take to import botocore and bind.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Static AWS credentials and the region to sign for.
#[derive(Debug, Clone, Copy)]
pub struct Credentials {
    pub access_key_id: &'static str,
    pub secret_access_key: &'static str,
    pub session_token: Option<&'static str>,
    pub region: &'static str,
}

/// The embedded demo identity: clearly fake, no AWS account behind it. The
/// agent (`Agent::start`, the demo) signs with it and the verifier accepts
/// exactly it.
pub const DEMO_CREDENTIALS: Credentials = Credentials {
    access_key_id: "AKIDEXAMPLELATTICEDEMO",
    secret_access_key: "lattice/demo/NOT+a+real+secret+0123456789ab",
    session_token: None,
    region: "us-west-2",
};

/// A fixed key no agent signs with: for a verifier that checks only keys
/// issued during the test (moto's STS, its container-credentials
/// endpoint). A request signed with it means an agent used credentials it
/// must not have.
pub const UNUSED_KEY: Credentials = Credentials {
    access_key_id: "AKIDNOAGENTSIGNSWITH",
    secret_access_key: "lattice/unused/NOT+a+real+secret+0123456",
    session_token: None,
    region: "us-west-2",
};

/// The loopback signing tests' static identity, with a session token: the
/// proxy child signs with it and the loopback verifier accepts it.
pub const TEST_CREDENTIALS: Credentials = Credentials {
    access_key_id: "AKIDLATTICETEST",
    secret_access_key: "lattice/test/SECRET+key0123456789abcdefgh",
    session_token: Some("SESSION-TOKEN-lattice-test-0123456789"),
    region: "us-west-2",
};

/// The service name Lattice signs for.
pub const SERVICE: &str = "vpc-lattice-svcs";

impl Credentials {
    /// The environment variables aws-config's env provider reads, plus
    /// AWS_REGION, and IMDS switched off (it is not the subject, and the
    /// agent must not probe 169.254.169.254).
    pub fn agent_env(&self) -> Vec<(&'static str, &'static str)> {
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key),
            ("AWS_REGION", self.region),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        if let Some(token) = self.session_token {
            env.push(("AWS_SESSION_TOKEN", token));
        }
        env
    }

    /// The start of the Authorization header a request signed with these
    /// credentials carries, up to the date: `Credential=<AKID>/`.
    pub fn credential_prefix(&self) -> String {
        format!("Credential={}/", self.access_key_id)
    }

    /// The end of the credential scope: `/<region>/vpc-lattice-svcs/aws4_request`.
    pub fn scope_suffix(&self) -> String {
        format!("/{}/{SERVICE}/aws4_request", self.region)
    }
}

/// One request the verifier answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub status: u16,
    /// Why it was refused (403/400), None when accepted.
    pub reason: Option<String>,
    pub method: String,
    /// `HTTP/1.1`, or `HTTP/2` for an h2c connection.
    pub http_version: String,
    /// Path and query as received.
    pub path: String,
    /// The client's IP address, as the service saw it.
    pub peer: String,
    /// The access key that signed it (None when unsigned or malformed).
    pub access_key: Option<String>,
    /// For a key moto's STS issued: the IAM role it assumed.
    pub role_arn: Option<String>,
    /// For a key moto's STS issued: the role session name.
    pub session_name: Option<String>,
    /// Header names (lowercase) and values in arrival order; Authorization's
    /// signature and any security token are `<redacted>`.
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A key the verifier's container-credentials endpoint issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_key: String,
    pub secret: String,
    pub token: String,
    /// When it expires, Unix seconds.
    pub expiry_unix: u64,
    /// Which `--container-creds-token` asked for it (0-based).
    pub caller: usize,
}

/// The running verifier; dropping it kills it.
pub struct Verifier {
    child: ChildGuard,
    addr: String,
    port: u16,
}

impl Verifier {
    /// Starts the verifier in `pod`'s netns on `addr` (an address on the
    /// pod's `lo`, e.g. 169.254.171.33 or fd00:ec2:80::33) and `port`,
    /// accepting only `creds`; returns once it listens. Panics with the
    /// verifier's output if it cannot start; see [`python`] for the venv.
    pub fn start(pod: &Pod, addr: &str, port: u16, creds: &Credentials) -> Self {
        Self::start_with(pod, addr, port, creds, &[])
    }

    /// [`Verifier::start`] with more sigv4_verifier.py arguments, e.g.
    /// `--moto-sts-port` or `--container-creds-port` (credential sources on
    /// the pod's loopback whose keys it also accepts).
    pub fn start_with(
        pod: &Pod,
        addr: &str,
        port: u16,
        creds: &Credentials,
        extra: &[&str],
    ) -> Self {
        let python = python().unwrap_or_else(|missing| panic!("{missing}"));
        Self::start_as(
            pod.command(python).in_cgroup(false),
            addr,
            port,
            creds,
            extra,
        )
    }

    /// The verifier started as `cmd` places it (e.g. `node.command(python())`
    /// for a node's network namespace); `cmd` names the Python interpreter.
    pub fn start_as(
        cmd: PodCommand,
        addr: &str,
        port: u16,
        creds: &Credentials,
        extra: &[&str],
    ) -> Self {
        let mut cmd = cmd
            .arg(script())
            .args([
                "--host",
                addr,
                "--port",
                &port.to_string(),
                "--log-requests",
            ])
            .args(["--region", creds.region, "--service", SERVICE])
            .args(["--access-key", creds.access_key_id])
            .args(["--secret-key", creds.secret_access_key])
            .args(extra);
        if let Some(token) = creds.session_token {
            cmd = cmd.args(["--token", token]);
        }
        let mut command = cmd.build();
        // The verifier exits when its stdin closes: keep a pipe open for as
        // long as the child lives (ChildGuard holds it).
        command.stdin(Stdio::piped());
        let mut child = ChildGuard::spawn(command, format!("sigv4_verifier.py {addr}:{port}"));
        // Port 0 picks one: the line names it.
        let line = child.wait_line(Stream::Stdout, "LISTENING", START_TIMEOUT);
        let port = line["LISTENING".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("verifier's {line:?}: {e}"));
        Self {
            child,
            addr: addr.to_owned(),
            port,
        }
    }

    /// The verifier on 127.0.0.1 (a port of its own), for tests without
    /// namespaces: accepting `creds` plus what `extra` adds.
    pub fn start_loopback(python: &std::path::Path, creds: &Credentials, extra: &[&str]) -> Self {
        Self::start_as(PodCommand::host(python), "127.0.0.1", 0, creds, extra)
    }

    /// Where it listens.
    pub fn socket_addr(&self) -> SocketAddr {
        let ip: std::net::IpAddr = self.addr.parse().expect("the verifier's address");
        SocketAddr::new(ip, self.port)
    }

    /// `http://ADDR:PORT` (IPv6 in brackets).
    pub fn url(&self) -> String {
        if self.addr.contains(':') {
            format!("http://[{}]:{}", self.addr, self.port)
        } else {
            format!("http://{}:{}", self.addr, self.port)
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<Received> {
        self.child
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("REQUEST "))
            .map(|json| parse_received(json).unwrap_or_else(|e| panic!("{e}: {json}")))
            .collect()
    }

    /// Waits until at least `n` requests were answered; panics after
    /// `timeout`. (The verifier logs after it has sent the reply.)
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "verifier saw {} request(s), expected {n}:\n{}",
                got.len(),
                self.child.captured()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Keys its container-credentials endpoint handed out so far, oldest
    /// first.
    pub fn issued(&self) -> Vec<Issued> {
        self.child
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("ISSUED "))
            .map(|json| {
                let v: serde_json::Value = serde_json::from_str(json)
                    .unwrap_or_else(|e| panic!("verifier ISSUED line: {e}: {json}"));
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                Issued {
                    access_key: text("access_key"),
                    secret: text("secret"),
                    token: text("token"),
                    expiry_unix: v["expiry_unix"].as_u64().unwrap_or_default(),
                    caller: v["caller"]
                        .as_u64()
                        .and_then(|c| usize::try_from(c).ok())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Statuses of every call its container-credentials endpoint answered,
    /// oldest first.
    pub fn credential_calls(&self) -> Vec<u16> {
        self.child
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("CREDS-CALL "))
            .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .filter_map(|v| v["status"].as_u64().and_then(|s| u16::try_from(s).ok()))
            .collect()
    }

    /// stdout and stderr so far (for failure messages).
    pub fn log(&self) -> String {
        self.child.captured()
    }
}

fn parse_received(json: &str) -> Result<Received, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("verifier REQUEST line: {e}"))?;
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let headers = v["headers"]
        .as_array()
        .ok_or("verifier REQUEST line without headers")?
        .iter()
        .filter_map(|pair| Some((pair[0].as_str()?.to_owned(), pair[1].as_str()?.to_owned())))
        .collect();
    Ok(Received {
        status: v["status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .ok_or("verifier REQUEST line without status")?,
        reason: v["reason"].as_str().map(str::to_owned),
        method: text("method"),
        http_version: text("http_version"),
        path: text("path"),
        peer: text("peer"),
        access_key: v["access_key"].as_str().map(str::to_owned),
        role_arn: v["role_arn"].as_str().map(str::to_owned),
        session_name: v["session_name"].as_str().map(str::to_owned),
        headers,
    })
}

/// `tests/python/sigv4_verifier.py`.
pub fn script() -> PathBuf {
    workspace().join("tests/python/sigv4_verifier.py")
}

/// The venv's python if it can import botocore, else Err naming what is
/// missing and how to get it.
pub fn python() -> Result<PathBuf, String> {
    python_importing(&["botocore"]).map_err(|needs| format!("missing {needs}"))
}

/// The venv's python if it can import botocore (and, with `moto`, moto's
/// server); else the test is skipped loudly, or fails under CI.
pub fn python_or_skip(test: &str, moto: bool) -> Option<PathBuf> {
    let modules: &[&str] = if moto {
        &["botocore", "moto.server"]
    } else {
        &["botocore"]
    };
    match python_importing(modules) {
        Ok(python) => Some(python),
        Err(missing) => {
            skip(test, &missing);
            None
        }
    }
}

/// The venv's python if it can import every one of `modules`, else Err
/// saying what is needed and how to get it.
pub fn python_importing(modules: &[&str]) -> Result<PathBuf, String> {
    let python = venv().join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "a Python venv at {} with {}: run `cargo xtask setup` (or set \
             LATTICE_TEST_VENV to a venv with tests/requirements.txt)",
            venv().display(),
            modules.join(", ")
        ))
    }
}
