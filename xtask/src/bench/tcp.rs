//! The `passthrough` scenario's traffic: TCP that is not HTTP (binary
//! messages, a zero byte first), which lattice passes through unchanged,
//! to an echo server beside nginx (`lattice-bench-tcp`, from the test kit).
//! Three loads, each on `direct`, `floor` and `lattice`: round trips of
//! 64-byte messages on one connection (latency), one connection streaming
//! MiBs both ways (proxy CPU per MiB) and short connections from 16
//! threads (proxy CPU per connection).

use std::{
    fs::{self, File},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use lattice_tests::{ChildGuard, netns::Netns};
use serde::{Deserialize, Serialize};

use super::{interrupt::Interrupt, nginx, relay};
use crate::cmd;

/// The echo server's port, on nginx's address.
pub const PORT: u16 = 7000;
/// Threads opening connections in the `conns` load.
pub const CONNS_THREADS: u32 = 16;

/// One passthrough measurement (a load on one scenario).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TcpRun {
    pub scenario: &'static str,
    /// `pingpong`, `stream` or `conns`.
    pub load: &'static str,
    pub concurrency: u32,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub mib_s: Option<f64>,
    pub conns_s: Option<f64>,
    /// The proxy's CPU (user + system) per MiB moved (both ways counted).
    pub cpu_us_per_mib: Option<f64>,
    /// The proxy's CPU per connection (`conns`).
    pub cpu_us_per_conn: Option<f64>,
    pub errors: u64,
}

/// What one `lattice-bench-tcp` load printed.
#[derive(Debug, Deserialize)]
pub struct Load {
    #[serde(default)]
    pub connections: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub errors: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// The echo server in a scenario's namespace; killed on drop.
pub struct Echo {
    pub process: ChildGuard,
}

impl Echo {
    pub fn start(binary: &Path, ns: &Netns, cgroup: &Path, stop: &Interrupt) -> Result<Self> {
        let command = ns
            .command(binary)
            .cgroup(cgroup)
            .args(["echo", &format!("{}:{PORT}", nginx::ADDR)])
            .build();
        let process = relay::start_listening(command, stop)?;
        Ok(Self { process })
    }
}

/// Runs one load as the app (in the namespace and the app's cgroup).
pub fn run(
    binary: &Path,
    ns: &Netns,
    app_cgroup: &Path,
    args: &[String],
    limit: Duration,
    stop: &Interrupt,
    out_file: &Path,
) -> Result<Load> {
    let mut command = ns.command(binary).cgroup(app_cgroup).args(args).build();
    command
        .stdin(Stdio::null())
        .stdout(File::create(out_file).context("creating the load's output")?)
        .stderr(Stdio::inherit());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(&command)))?;
    let status = stop.wait(&mut child, limit, "lattice-bench-tcp")?;
    let out = fs::read_to_string(out_file).unwrap_or_default();
    if !status.success() {
        bail!("lattice-bench-tcp {args:?} failed ({status}):\n{out}");
    }
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("lattice-bench-tcp printed no result:\n{out}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}

/// The loads: (name, arguments after ADDR:PORT, concurrency).
pub fn loads(seconds: u64, stream_mib: u64) -> [(&'static str, Vec<String>, u32); 3] {
    let addr = format!("{}:{PORT}", nginx::ADDR);
    [
        (
            "pingpong",
            vec!["pingpong".into(), addr.clone(), seconds.to_string()],
            1,
        ),
        (
            "stream",
            vec!["stream".into(), addr.clone(), stream_mib.to_string()],
            1,
        ),
        (
            "conns",
            vec![
                "conns".into(),
                addr,
                seconds.to_string(),
                CONNS_THREADS.to_string(),
            ],
            CONNS_THREADS,
        ),
    ]
}

/// A measured row: the load's figures and the proxy's CPU over it
/// (`cpu_s`: user + system seconds, when a proxy ran).
pub fn row(
    scenario: &'static str,
    load: &'static str,
    concurrency: u32,
    l: &Load,
    cpu_s: Option<f64>,
) -> TcpRun {
    let mib = l.bytes as f64 / f64::from(1 << 20);
    TcpRun {
        scenario,
        load,
        concurrency,
        p50_us: l.p50_us,
        p99_us: l.p99_us,
        mib_s: (load == "stream").then(|| mib / l.seconds),
        conns_s: (load == "conns").then(|| l.connections as f64 / l.seconds),
        cpu_us_per_mib: cpu_s
            .filter(|_| load == "stream")
            .map(|c| c * 1e6 / mib.max(f64::MIN_POSITIVE)),
        cpu_us_per_conn: cpu_s
            .filter(|_| load == "conns")
            .map(|c| c * 1e6 / (l.connections.max(1) as f64)),
        errors: l.errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_take_cpu_per_mib_and_per_connection() {
        let stream: Load =
            serde_json::from_str(r#"{"bytes":536870912,"seconds":2.0,"errors":0}"#).unwrap();
        let r = row("lattice", "stream", 1, &stream, Some(0.512));
        assert_eq!(r.mib_s, Some(256.0));
        assert_eq!(r.cpu_us_per_mib, Some(1000.0));
        assert_eq!(r.cpu_us_per_conn, None);
        let conns: Load =
            serde_json::from_str(r#"{"connections":1000,"bytes":128000,"seconds":1.0,"errors":0}"#)
                .unwrap();
        let r = row("floor", "conns", 16, &conns, Some(0.02));
        assert_eq!(r.conns_s, Some(1000.0));
        assert!((r.cpu_us_per_conn.unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(
            row("direct", "conns", 16, &conns, None).cpu_us_per_conn,
            None
        );
    }
}
