//! The signing proxy in a child process of the test binary, for the
//! loopback tests: the binary re-runs itself with only its entry test
//! ([`ENTRY`]) and `LATTICE_TEST_CHILD=proxy`, in a cleared environment, and
//! the entry serves the proxy configured like the agent, by `LATTICE_*`
//! variables. A child of its own gives each case its own process
//! environment for aws-config, its own memory high-water mark and its own
//! captured logs.
//!
//! This module is both sides of that exchange: [`ProxyChild`] starts the
//! child and reads its `READY` line; [`ChildConfig`], [`announce_ready`] and
//! [`stop_at_end_of_input`] are what the entry uses. The entry serves
//! through the agent's own assembly entry (`app::build_proxy_only`); it
//! lives in the test binary, since the kit does not depend on the agent.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    procfs,
    spawn::{ChildGuard, Stream},
    verifier::TEST_CREDENTIALS,
};

/// The name of the test function each test binary using [`ProxyChild`]
/// defines as the child's entry: it calls the child's main when
/// [`is_child`], and does nothing in the normal run.
pub const ENTRY: &str = "child_proxy_entry";

const CHILD: &str = "LATTICE_TEST_CHILD";
const UPSTREAM: &str = "LATTICE_TEST_UPSTREAM";
const CREDS: &str = "LATTICE_TEST_CREDS";
const LOG: &str = "LATTICE_TEST_LOG";
const READY: &str = "READY ";

/// How the child proxy gets credentials.
pub enum Creds<'a> {
    /// Fixed [`TEST_CREDENTIALS`].
    Static,
    /// aws-config's default chain, from these environment variables only.
    Chain(&'a [(&'a str, String)]),
}

/// The proxy under test, in a child process; killed and reaped on drop.
pub struct ProxyChild {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub addr_v6: Option<SocketAddr>,
    pub admin: SocketAddr,
}

impl ProxyChild {
    /// `upstream`: the original destination of every connection (None: no
    /// record). `env`: extra `LATTICE_*` settings (a `LATTICE_TEST_CREDS`
    /// there replaces what `creds` says).
    pub fn start(upstream: Option<SocketAddr>, creds: Creds<'_>, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(CHILD, "proxy")
            .env(LOG, "debug")
            .env("LATTICE_REGION", TEST_CREDENTIALS.region)
            // Only ever loopback; no instance metadata, no profile files.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent/lattice-test/config")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/lattice-test/credentials",
            )
            .env("HOME", "/nonexistent/lattice-test");
        if let Some(u) = upstream {
            cmd.env(UPSTREAM, u.to_string());
        }
        match creds {
            Creds::Static => {
                let c = TEST_CREDENTIALS;
                cmd.env(
                    CREDS,
                    format!(
                        "static:{}:{}:{}",
                        c.access_key_id,
                        c.secret_access_key,
                        c.session_token.unwrap_or_default()
                    ),
                );
            }
            Creds::Chain(vars) => {
                cmd.env(CREDS, "chain");
                for (k, v) in vars {
                    cmd.env(k, v);
                }
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // The child stops gracefully when its stdin closes.
        cmd.stdin(Stdio::piped());
        let mut guard = ChildGuard::spawn(cmd, "proxy child".to_owned());
        let line = guard.wait_line(Stream::Stdout, READY, Duration::from_secs(60));
        let fields: HashMap<&str, &str> = line[READY.len()..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        Self {
            addr: fields["proxy"].parse().expect("proxy addr"),
            addr_v6: fields.get("proxy6").and_then(|a| a.parse().ok()),
            admin: fields["admin"].parse().expect("admin addr"),
            guard,
        }
    }

    /// Everything the proxy logged so far.
    pub fn logs(&self) -> String {
        self.guard.stderr()
    }

    /// Peak resident set size of the child (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        procfs::peak_rss(self.guard.pid()).expect("the proxy child's VmHWM")
    }

    /// Closes the child's stdin (it stops gracefully) and waits up to
    /// `limit` for it to exit.
    pub fn close_stdin_and_wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.guard.close_stdin();
        self.guard.wait_timeout(limit)
    }
}

// ------------------------------------------------------------ child side

/// True in the child: the entry test then runs the proxy.
pub fn is_child() -> bool {
    std::env::var(CHILD).as_deref() == Ok("proxy")
}

/// Where the child's credentials come from.
pub enum ChildCreds {
    /// aws-config's default chain from this process's environment.
    Chain,
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: String,
    },
}

/// What the parent asked of the child.
pub struct ChildConfig {
    /// Every connection's original destination (None: no record).
    pub upstream: Option<SocketAddr>,
    pub creds: ChildCreds,
    /// The tracing filter for the child's logs (stderr).
    pub log_filter: String,
}

impl ChildConfig {
    /// Reads the parent's settings from the environment; panics on a
    /// malformed one.
    pub fn from_env() -> Self {
        let spec = std::env::var(CREDS).expect("LATTICE_TEST_CREDS");
        let creds = if spec == "chain" {
            ChildCreds::Chain
        } else {
            let parts: Vec<&str> = spec
                .strip_prefix("static:")
                .expect("static:AK:SK:TOKEN")
                .splitn(3, ':')
                .collect();
            let [access_key_id, secret_access_key, session_token] = parts[..] else {
                panic!("LATTICE_TEST_CREDS {spec:?}: expected static:AK:SK:TOKEN");
            };
            ChildCreds::Static {
                access_key_id: access_key_id.to_owned(),
                secret_access_key: secret_access_key.to_owned(),
                session_token: session_token.to_owned(),
            }
        };
        Self {
            upstream: std::env::var(UPSTREAM)
                .ok()
                .map(|u| u.parse().expect("LATTICE_TEST_UPSTREAM")),
            creds,
            log_filter: std::env::var(LOG).unwrap_or_else(|_| "info".into()),
        }
    }
}

/// Tells the parent where the child serves: `READY proxy=… [proxy6=…]
/// admin=…` on stdout.
pub fn announce_ready(proxy: SocketAddr, proxy6: Option<SocketAddr>, admin: SocketAddr) {
    let mut ready = format!("{READY}proxy={proxy}");
    if let Some(p6) = proxy6 {
        ready.push_str(&format!(" proxy6={p6}"));
    }
    ready.push_str(&format!(" admin={admin}"));
    println!("{ready}");
}

/// Calls `stop` (from a thread of its own) once stdin reaches its end:
/// when the parent closes it, or dies.
pub fn stop_at_end_of_input(stop: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        stop();
    });
}
