//! The load generator: wrk (Debian). Chosen because it is the well-known
//! HTTP/1.1 benchmark, drives thousands of connections from one thread with
//! epoll, records every request's latency in an HdrHistogram (exact p99.9),
//! and is scriptable in Lua: the script below adds `Connection: close` for
//! the new-connection workload and prints the figures as one JSON line.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use lattice_tests::netns::Netns;

use super::{interrupt::Interrupt, nginx};
use crate::cmd;

const MARK: &str = "LATTICE_BENCH ";

/// What one wrk run measured.
#[derive(Debug, Clone, Deserialize)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_us: u64,
    /// Connect, read, write errors and timeouts.
    pub errors: u64,
    /// Responses with status >= 400.
    pub bad_status: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }
}

/// Writes the two Lua scripts into `dir`; returns (keep-alive, new-conn).
pub fn write_scripts(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let done = format!(
        r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{MARK}{{"requests":%d,"duration_us":%d,"errors":%d,"bad_status":%d,' ..
    '"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f}}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#
    );
    let keepalive = dir.join("keepalive.lua");
    let newconn = dir.join("newconn.lua");
    fs::write(&keepalive, &done).context("writing the wrk script")?;
    // The server closes after answering; wrk then opens a new connection.
    fs::write(
        &newconn,
        format!("wrk.headers[\"Connection\"] = \"close\"\n{done}"),
    )
    .context("writing the wrk script")?;
    Ok((keepalive, newconn))
}

/// Runs wrk as the app: in the pod's namespace and cgroup.
pub fn run(
    ns: &Netns,
    app_cgroup: &Path,
    script: &Path,
    connections: u32,
    duration: Duration,
    stop: &Interrupt,
) -> Result<WrkResult> {
    let threads = connections.min(2);
    let out_file = script.with_extension(format!("c{connections}.out"));
    let mut command = ns.command("wrk").cgroup(app_cgroup).build();
    command
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs()))
        .args(["--timeout", "5s", "-s"])
        .arg(script)
        .arg(format!("http://{}/index.json", nginx::ADDR))
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_file).context("creating wrk's output")?)
        .stderr(Stdio::inherit());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(&command)))?;
    let status = stop.wait(&mut child, duration + Duration::from_secs(30), "wrk")?;
    let out = fs::read_to_string(&out_file).unwrap_or_default();
    if !status.success() {
        bail!("wrk failed ({status}):\n{out}");
    }
    parse(&out)
}

fn parse(out: &str) -> Result<WrkResult> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(MARK))
        .with_context(|| format!("wrk printed no result line:\n{out}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing wrk's result {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_the_script_line_among_wrk_output() {
        let out = "Running 3s test @ http://169.254.171.33/index.json\n  1 threads\n\
            LATTICE_BENCH {\"requests\":3000,\"duration_us\":3000000,\"errors\":1,\
            \"bad_status\":0,\"p50_us\":250.0,\"p99_us\":900.5,\"p999_us\":1500.0}\n";
        let r = parse(out).unwrap();
        assert_eq!(r.requests, 3000);
        assert_eq!(r.errors, 1);
        assert!((r.rps() - 1000.0).abs() < 1e-9);
        assert!((r.p99_us - 900.5).abs() < 1e-9);
        assert!(parse("no result").is_err());
    }
}
