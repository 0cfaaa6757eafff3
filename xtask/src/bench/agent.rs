//! lattice-agent in the pod's namespace (in a cgroup of its own, outside the
//! app's), signing with static credentials from the environment; or, for
//! the floor, attaching its programs only (`--intercept-only`).

use std::{path::Path, time::Duration};

use anyhow::Result;
use lattice_tests::{ChildGuard, netns::Netns};

use super::{
    interrupt::Interrupt,
    process::{stop_gracefully, wait_ready},
};
use crate::cmd;

pub const PROXY_PORT: u16 = 15080;
pub const EXEMPT_UID: u32 = 101;
const ADMIN: &str = "127.0.0.1:15090";

// Static demo credentials: nginx does not check signatures, the point is
// that the agent does the full signing work for every request.
const ACCESS_KEY: &str = "AKIDLATTICEBENCH";
const SECRET_KEY: &str = "lattice/bench/SECRET+key0123456789abcdefgh";
const REGION: &str = "us-west-2";

/// What the agent does once attached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The signing proxy, with this many proxy threads (`--workers`).
    Proxy { workers: u16 },
    /// Nothing: another proxy serves the port (`--intercept-only`).
    InterceptOnly,
    /// The signing proxy (one thread) sending every request to nginx's TLS
    /// listener (port 80 → 443), trusting the run's CA (see `nginx`).
    TlsProxy,
}

/// The line an intercept-only agent logs once attached.
const INTERCEPT_ONLY_READY: &str = "lattice-agent ready (intercept only)";

pub struct Agent {
    pub process: ChildGuard,
}

impl Agent {
    /// Starts the agent attached to `attach_to` and waits until it is
    /// ready: /readyz for the proxy, its ready line when intercept-only.
    pub fn start(
        binary: &Path,
        ns: &Netns,
        own_cgroup: &Path,
        attach_to: &Path,
        role: Role,
        dir: &Path,
        stop: &Interrupt,
    ) -> Result<Self> {
        let mut command = ns.command(binary).cgroup(own_cgroup).build();
        command
            .args(["run", "--cgroup"])
            .arg(attach_to)
            .args(["--proxy-port", &PROXY_PORT.to_string()])
            .args(["--exempt-uid", &EXEMPT_UID.to_string()])
            .args(["--admin-addr", ADMIN])
            // A clean environment: no profile, IMDS or ambient AWS settings
            // of the host can change what the agent does.
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("LATTICE_LOG", "warn,lattice_agent=info");
        match role {
            Role::Proxy { workers } => {
                command.args(["--workers", &workers.to_string()]);
            }
            Role::InterceptOnly => {
                command.arg("--intercept-only");
            }
            Role::TlsProxy => {
                command
                    .args(["--upstream-tls-rule", "port:80 => 443", "--ca-file"])
                    .arg(dir.join("tls/ca.pem"));
            }
        }
        let name = cmd::display(&command);
        let mut process = ChildGuard::spawn(command, name);

        wait_ready(
            &mut process,
            Duration::from_secs(30),
            Duration::from_millis(100),
            stop,
            |process| {
                if role == Role::InterceptOnly {
                    return match process.stderr().contains(INTERCEPT_ONLY_READY) {
                        true => Ok(()),
                        false => Err(format!("no {INTERCEPT_ONLY_READY:?} in its log")),
                    };
                }
                let code = cmd::read(
                    &mut ns
                        .command("curl")
                        .args([
                            "-s",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{http_code}",
                            "--max-time",
                            "2",
                            &format!("http://{ADMIN}/readyz"),
                        ])
                        .build(),
                )
                .unwrap_or_default();
                match code.as_str() {
                    "200" => Ok(()),
                    _ => Err(format!("/readyz: {code:?}")),
                }
            },
        )?;
        Ok(Self { process })
    }

    /// Sum of a counter family in /metrics (all label sets).
    pub fn counter(ns: &Netns, name: &str) -> Result<f64> {
        let text = cmd::read(
            &mut ns
                .command("curl")
                .args(["-sS", "--max-time", "5", &format!("http://{ADMIN}/metrics")])
                .build(),
        )?;
        Ok(sum_counter(&text, name))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_gracefully(&mut self.process, nix::libc::SIGTERM);
    }
}

/// Sums the samples of `name` (with or without labels) in Prometheus text.
fn sum_counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::sum_counter;

    #[test]
    fn counter_sums_label_sets_and_ignores_other_metrics() {
        let text = "# HELP lattice_requests_total x\n\
                    lattice_requests_total{method=\"GET\",status=\"200\"} 5\n\
                    lattice_requests_total{method=\"PUT\",status=\"201\"} 2\n\
                    lattice_requests_total_other 9\n\
                    lattice_redirected_connections_total 3\n";
        assert_eq!(sum_counter(text, "lattice_requests_total"), 7.0);
        assert_eq!(
            sum_counter(text, "lattice_redirected_connections_total"),
            3.0
        );
        assert_eq!(sum_counter(text, "missing"), 0.0);
    }
}
