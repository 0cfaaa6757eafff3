//! The figures of one bench run: the Markdown tables (stdout and
//! report.md), the raw JSON (report.json, checked against its schema before
//! it is written) and the targets of the performance issues.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;

use super::{Scenario, tcp::TcpRun};

/// Every scenario's name, in the order they are measured and shown.
pub const SCENARIOS: [&str; Scenario::ALL.len()] = {
    let mut names = [""; Scenario::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Scenario::ALL[i].name();
        i += 1;
    }
    names
};
/// The scenarios with a proxy between the app and nginx: all but `direct`.
pub const PROXIES: &[&str] = SCENARIOS.split_at(1).1;
/// The loads the proxy cost is reported for: (workload, connections).
pub const COST_LOADS: [(&str, u32); 4] = [
    ("keepalive", 1),
    ("keepalive", 16),
    ("newconn", 1),
    ("newconn", 16),
];
pub const WORKLOADS: [&str; 4] = ["keepalive", "newconn", "upload", "idle"];

/// One measured row; a figure that does not apply is `None` (null in JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub scenario: &'static str,
    pub workload: &'static str,
    pub concurrency: Option<u32>,
    pub rps: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub throughput_mib_s: Option<f64>,
    /// The proxy's (agent's, or the floor's relay's) peak RSS during the
    /// run (VmHWM reset at its start); RSS for `idle`.
    pub agent_rss_mib: Option<f64>,
    /// The proxy's CPU time (user + system) per request.
    pub agent_cpu_us_per_req: Option<f64>,
    /// The user-space part of it: the rest is the kernel's (socket I/O,
    /// wake-ups), which any proxy on the path pays.
    pub agent_user_us_per_req: Option<f64>,
    pub requests: Option<u64>,
    pub errors: Option<u64>,
    pub duration_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    /// "KVM" and the like when lscpu reports one, else empty.
    pub hypervisor: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn read() -> Self {
        let lscpu = std::process::Command::new("lscpu")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let cpu = lscpu
            .lines()
            .find_map(|l| l.strip_prefix("Model name:"))
            .map_or_else(|| "unknown".to_owned(), |m| m.trim().to_owned());
        let hypervisor = lscpu
            .lines()
            .find_map(|l| l.strip_prefix("Hypervisor vendor:"))
            .map_or_else(String::new, |h| h.trim().to_owned());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        let memory_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        Self {
            cpu,
            hypervisor,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            memory_gib,
        }
    }

    pub fn describe(&self) -> String {
        let vm = if self.hypervisor.is_empty() {
            String::new()
        } else {
            format!(" ({} guest)", self.hypervisor)
        };
        format!(
            "{}{vm}, {} cores, {:.0} GiB RAM, Linux {}",
            self.cpu, self.cores, self.memory_gib, self.kernel
        )
    }
}

/// A target of the performance issue and how this run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub measured: Option<f64>,
    /// None when it depends on a figure that is missing.
    pub limit: Option<f64>,
    /// "min" (measured must be >= limit) or "max" (<=).
    pub kind: &'static str,
    pub unit: &'static str,
    /// The absolute figures behind a ratio or a relative limit.
    pub detail: String,
    /// None when a figure it needs is missing.
    pub met: Option<bool>,
}

impl Target {
    fn new(
        name: &'static str,
        measured: Option<f64>,
        kind: &'static str,
        limit: Option<f64>,
        unit: &'static str,
    ) -> Self {
        let met = measured.zip(limit).map(|(m, l)| match kind {
            "min" => m >= l,
            _ => m <= l,
        });
        Self {
            name,
            measured,
            limit,
            kind,
            unit,
            detail: String::new(),
            met,
        }
    }

    fn detail(mut self, detail: Option<String>) -> Self {
        self.detail = detail.unwrap_or_default();
        self
    }
}

/// What a proxy costs at one load: its CPU per request and the latency it
/// adds over `direct` in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub scenario: &'static str,
    pub workload: &'static str,
    pub concurrency: u32,
    pub cpu_us_per_req: Option<f64>,
    pub user_us_per_req: Option<f64>,
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
}

/// Micro-benchmarks (criterion), nanoseconds per iteration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Micro {
    pub sign_sigv4_ns: Option<f64>,
    pub sign_sigv4a_ns: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: Machine,
    pub runs: Vec<Run>,
    /// The passthrough loads (TCP that is not HTTP).
    pub passthrough: Vec<TcpRun>,
    /// Each proxy's cost, from `runs`.
    pub cost: Vec<Cost>,
    pub micro: Micro,
    /// The node-mode scenario's figures (lattice-bench-node's JSON).
    pub node: Option<Value>,
    /// Its tables, as lattice-bench-node printed them.
    #[serde(skip)]
    pub node_markdown: String,
    pub targets: Vec<Target>,
}

fn find<'a>(runs: &'a [Run], scenario: &str, workload: &str, c: Option<u32>) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.scenario == scenario && r.workload == workload && r.concurrency == c)
}

/// Each proxy's CPU per request and added latency, against `direct`.
pub fn cost(runs: &[Run]) -> Vec<Cost> {
    let added = |a: Option<f64>, direct: Option<f64>| Some((a? - direct?) * 1000.0);
    let mut out = Vec::new();
    for scenario in PROXIES {
        for (workload, c) in COST_LOADS {
            let Some(run) = find(runs, scenario, workload, Some(c)) else {
                continue;
            };
            let direct = find(runs, "direct", workload, Some(c));
            out.push(Cost {
                scenario,
                workload,
                concurrency: c,
                cpu_us_per_req: run.agent_cpu_us_per_req,
                user_us_per_req: run.agent_user_us_per_req,
                added_p50_us: added(run.p50_ms, direct.and_then(|d| d.p50_ms)),
                added_p99_us: added(run.p99_ms, direct.and_then(|d| d.p99_ms)),
            });
        }
    }
    out
}

/// What a second worker thread must add to the agent's throughput. Less
/// than 2×: on this two-core machine the load generator and nginx share
/// the cores with the agent.
const WORKERS_SCALING: f64 = 1.2;

/// The performance issue's targets, from this run's figures.
pub fn targets(runs: &[Run], cost: &[Cost], micro: &Micro) -> Vec<Target> {
    let cost_of = |scenario: &str, workload: &str, c: u32| {
        cost.iter()
            .find(|k| k.scenario == scenario && k.workload == workload && k.concurrency == c)
    };
    let cpu16 = |s| cost_of(s, "keepalive", 16).and_then(|k| k.cpu_us_per_req);
    let (lattice_cpu, floor_cpu) = (cpu16("lattice"), cpu16("floor"));
    let p50 = |s| cost_of(s, "keepalive", 1).and_then(|k| k.added_p50_us);
    let (lattice_p50, floor_p50) = (p50("lattice"), p50("floor"));
    let nc16 = |s| find(runs, s, "newconn", Some(16)).and_then(|r| r.rps);
    let (lattice_nc, iptables_nc) = (nc16("lattice"), nc16("iptables"));
    let ka64 = |s| find(runs, s, "keepalive", Some(64)).and_then(|r| r.rps);
    let (w1, w2) = (ka64("lattice"), ka64("lattice-w2"));
    vec![
        Target::new(
            "proxy CPU per keep-alive request at c=16, lattice / floor",
            lattice_cpu.zip(floor_cpu).map(|(l, f)| l / f),
            "max",
            Some(1.5),
            "x",
        )
        .detail(
            lattice_cpu
                .zip(floor_cpu)
                .map(|(l, f)| format!("lattice {l:.1} µs, floor {f:.1} µs")),
        ),
        Target::new(
            "p50 latency lattice adds over direct, keep-alive c=1",
            lattice_p50,
            "max",
            floor_p50.map(|f| f + 10.0),
            "µs",
        )
        .detail(floor_p50.map(|f| format!("floor adds {f:.0} µs; limit = floor + 10 µs"))),
        Target::new(
            "lattice new-connection rate at c=16 / iptables",
            lattice_nc.zip(iptables_nc).map(|(l, i)| l / i),
            "min",
            Some(1.0),
            "x",
        )
        .detail(
            lattice_nc
                .zip(iptables_nc)
                .map(|(l, i)| format!("lattice {l:.0}/s, iptables {i:.0}/s")),
        ),
        Target::new(
            "lattice agent idle RSS",
            find(runs, "lattice", "idle", None).and_then(|r| r.agent_rss_mib),
            "max",
            Some(16.0),
            "MiB",
        ),
        Target::new(
            "lattice agent peak RSS during the 256 MiB upload",
            find(runs, "lattice", "upload", None).and_then(|r| r.agent_rss_mib),
            "max",
            Some(32.0),
            "MiB",
        ),
        Target::new(
            "keep-alive throughput at c=64, --workers 2 / --workers 1",
            w2.zip(w1).map(|(two, one)| two / one),
            "min",
            Some(WORKERS_SCALING),
            "x",
        )
        .detail(
            w1.zip(w2)
                .map(|(one, two)| format!("1 worker {one:.0}/s, 2 workers {two:.0}/s")),
        ),
        Target::new(
            "SigV4 signing of a headers-only request (criterion)",
            micro.sign_sigv4_ns.map(|ns| ns / 1000.0),
            "max",
            Some(2.0),
            "µs",
        ),
        Target::new(
            "SigV4A signing of a headers-only request (criterion)",
            micro.sign_sigv4a_ns.map(|ns| ns / 1000.0),
            "max",
            Some(20.0),
            "µs",
        ),
    ]
}

/// What passing TCP through may cost lattice over the floor's byte relay
/// (CPU per MiB and per connection), and the latency it may add over it.
const PASSTHROUGH_CPU: f64 = 1.1;
const PASSTHROUGH_ADDED_P50_US: f64 = 5.0;
/// What HTTPS origination may cost per keep-alive request over plain HTTP.
const TLS_CPU: f64 = 1.3;

/// The traffic issue's targets: passthrough against the floor, HTTPS
/// origination against plain HTTP.
pub fn traffic_targets(cost: &[Cost], tcp: &[TcpRun]) -> Vec<Target> {
    let row = |scenario: &str, load: &str| {
        tcp.iter()
            .find(|r| r.scenario == scenario && r.load == load)
    };
    let ratio = |load: &str, f: fn(&TcpRun) -> Option<f64>| {
        let l = row("lattice", load).and_then(f);
        let fl = row("floor", load).and_then(f);
        (l.zip(fl).map(|(l, f)| l / f), l.zip(fl))
    };
    let (per_mib, mib) = ratio("stream", |r| r.cpu_us_per_mib);
    let (per_conn, conn) = ratio("conns", |r| r.cpu_us_per_conn);
    let p50 = |s| row(s, "pingpong").and_then(|r| r.p50_us);
    let added = |s| p50(s).zip(p50("direct")).map(|(a, d)| a - d);
    let (lattice_added, floor_added) = (added("lattice"), added("floor"));
    let cpu16 = |s: &str| {
        cost.iter()
            .find(|k| k.scenario == s && k.workload == "keepalive" && k.concurrency == 16)
            .and_then(|k| k.cpu_us_per_req)
    };
    let (tls_cpu, plain_cpu) = (cpu16("tls"), cpu16("lattice"));
    vec![
        Target::new(
            "passthrough: proxy CPU per MiB, lattice / floor",
            per_mib,
            "max",
            Some(PASSTHROUGH_CPU),
            "x",
        )
        .detail(mib.map(|(l, f)| format!("lattice {l:.0} µs, floor {f:.0} µs"))),
        Target::new(
            "passthrough: proxy CPU per connection, lattice / floor",
            per_conn,
            "max",
            Some(PASSTHROUGH_CPU),
            "x",
        )
        .detail(conn.map(|(l, f)| format!("lattice {l:.1} µs, floor {f:.1} µs"))),
        Target::new(
            "passthrough: p50 lattice adds to a round trip over direct, c=1",
            lattice_added,
            "max",
            floor_added.map(|f| f + PASSTHROUGH_ADDED_P50_US),
            "µs",
        )
        .detail(floor_added.map(|f| format!("floor adds {f:.1} µs; limit = floor + 5 µs"))),
        Target::new(
            "tls: proxy CPU per keep-alive request at c=16, HTTPS origination / plain HTTP",
            tls_cpu.zip(plain_cpu).map(|(t, p)| t / p),
            "max",
            Some(TLS_CPU),
            "x",
        )
        .detail(
            tls_cpu
                .zip(plain_cpu)
                .map(|(t, p)| format!("tls {t:.1} µs, lattice {p:.1} µs")),
        ),
    ]
}

/// The node-mode issue's targets, from lattice-bench-node's figures.
pub fn node_targets(node: &Value) -> Vec<Target> {
    let f = |v: &Value| v.as_f64();
    let t = |name, measured: Option<f64>, limit, unit| {
        Target::new(name, measured, "max", Some(limit), unit)
    };
    let ratio = match (
        f(&node["added_p50_ms"]["node"]),
        f(&node["added_p50_ms"]["sidecar"]),
    ) {
        (Some(n), Some(s)) if s > 0.0 => Some(n / s),
        _ => None,
    };
    vec![
        t(
            "node agent RSS with 100 pods",
            f(&node["node_agent_rss_100_pods_mib"]),
            48.0,
            "MiB",
        ),
        t(
            "node agent RSS per added pod",
            f(&node["rss_per_added_pod_kib"]),
            256.0,
            "KiB",
        ),
        t(
            "enrollment p99 (annotation to first signed request)",
            f(&node["enrollment_ms"]["p99"]),
            250.0,
            "ms",
        ),
        t(
            "added p50 at c=1, node agent / sidecar agent",
            ratio,
            1.1,
            "x",
        ),
        t(
            "another pod's p99 while one pod floods the agent",
            f(&node["flood"]["victim_p99_ms"]),
            50.0,
            "ms",
        ),
    ]
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| scenario | workload | conc. | req/s | p50 ms | p99 ms | p99.9 ms | MiB/s | proxy RSS MiB | proxy CPU µs / req |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in &report.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.workload,
            r.concurrency
                .map_or_else(|| "–".to_owned(), |c| c.to_string()),
            cell(r.rps, 0),
            cell(r.p50_ms, 3),
            cell(r.p99_ms, 3),
            cell(r.p999_ms, 3),
            cell(r.throughput_mib_s, 0),
            cell(r.agent_rss_mib, 1),
            cell(r.agent_cpu_us_per_req, 1),
        );
    }
    if !report.cost.is_empty() {
        let _ = writeln!(
            md,
            "\nWhat each proxy costs (CPU per request, and its user-space part; latency added over direct):\n"
        );
        let _ = writeln!(
            md,
            "| proxy | workload | conc. | CPU µs / req | of it user µs | added p50 µs | added p99 µs |"
        );
        let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|");
        for k in &report.cost {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                k.scenario,
                k.workload,
                k.concurrency,
                cell(k.cpu_us_per_req, 1),
                cell(k.user_us_per_req, 1),
                cell(k.added_p50_us, 0),
                cell(k.added_p99_us, 0),
            );
        }
    }
    if !report.passthrough.is_empty() {
        let _ = writeln!(
            md,
            "\nPassthrough (TCP that is not HTTP, to an echo server; MiB counted both ways):\n"
        );
        let _ = writeln!(
            md,
            "| scenario | load | conc. | p50 µs | p99 µs | MiB/s | conn/s | proxy CPU µs / MiB | proxy CPU µs / conn |"
        );
        let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
        for r in &report.passthrough {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.load,
                r.concurrency,
                cell(r.p50_us, 1),
                cell(r.p99_us, 1),
                cell(r.mib_s, 0),
                cell(r.conns_s, 0),
                cell(r.cpu_us_per_mib, 0),
                cell(r.cpu_us_per_conn, 1),
            );
        }
    }
    if report.micro.sign_sigv4_ns.is_some() || report.micro.sign_sigv4a_ns.is_some() {
        let us = |ns: Option<f64>| ns.map(|n| n / 1000.0);
        let _ = writeln!(
            md,
            "\nSigning one headers-only request (criterion): SigV4 {} µs, SigV4A {} µs.",
            cell(us(report.micro.sign_sigv4_ns), 2),
            cell(us(report.micro.sign_sigv4a_ns), 1),
        );
    }
    if !report.node_markdown.is_empty() {
        let _ = writeln!(md, "\nNode mode:\n\n{}", report.node_markdown.trim_end());
    }
    let _ = writeln!(md, "\n| target | measured | limit | result |");
    let _ = writeln!(md, "|---|--:|--:|---|");
    for t in &report.targets {
        let op = if t.kind == "min" { "≥" } else { "≤" };
        let result = match t.met {
            Some(true) => "met".to_owned(),
            Some(false) => "**missed**".to_owned(),
            None => "not measured".to_owned(),
        };
        let detail = if t.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", t.detail)
        };
        let _ = writeln!(
            md,
            "| {}{detail} | {} {} | {op} {} {} | {result} |",
            t.name,
            cell(t.measured, 2),
            t.unit,
            cell(t.limit, 2),
            t.unit
        );
    }
    let _ = writeln!(
        md,
        "\nMachine: {}. Mode: {}.",
        report.machine.describe(),
        if report.quick { "--quick" } else { "full" }
    );
    md
}

/// Writes report.md and report.json (after checking the JSON's schema).
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let json = serde_json::to_value(report).context("serializing the report")?;
    check_schema(&json).context("report.json does not match its schema")?;
    let text = serde_json::to_string_pretty(&json).context("serializing the report")?;
    fs::write(dir.join("report.json"), text + "\n").context("writing report.json")?;
    fs::write(dir.join("report.md"), markdown(report)).context("writing report.md")?;
    Ok(())
}

/// The contract of report.json that other tools read: `runs` is a list of
/// objects with these keys, numbers or null, and known scenario/workload.
pub fn check_schema(json: &Value) -> Result<()> {
    let runs = json
        .get("runs")
        .and_then(Value::as_array)
        .context("no `runs` list")?;
    // Empty only when the run was the node scenario alone (--only node).
    let node_only = json.get("node").is_some_and(|n| !n.is_null());
    ensure!(!runs.is_empty() || node_only, "`runs` is empty");
    for (i, run) in runs.iter().enumerate() {
        let obj = run
            .as_object()
            .with_context(|| format!("runs[{i}] is not an object"))?;
        let text = |key: &str, allowed: &[&str]| -> Result<()> {
            match obj.get(key).and_then(Value::as_str) {
                Some(v) if allowed.contains(&v) => Ok(()),
                other => bail!("runs[{i}].{key} = {other:?}, expected one of {allowed:?}"),
            }
        };
        text("scenario", &SCENARIOS)?;
        text("workload", &WORKLOADS)?;
        for key in [
            "concurrency",
            "rps",
            "p50_ms",
            "p99_ms",
            "agent_rss_mib",
            "agent_cpu_us_per_req",
        ] {
            match obj.get(key) {
                Some(Value::Null) => {}
                Some(Value::Number(n)) if n.as_f64().is_some_and(|v| v.is_finite() && v >= 0.0) => {
                }
                other => bail!("runs[{i}].{key} = {other:?}, expected a number >= 0 or null"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Run> {
        let run = |scenario, workload, c, rps, p50, p99, cpu| Run {
            scenario,
            workload,
            concurrency: Some(c),
            rps: Some(rps),
            p50_ms: Some(p50),
            p99_ms: Some(p99),
            agent_cpu_us_per_req: cpu,
            ..Run::default()
        };
        vec![
            run("direct", "keepalive", 1, 15_000.0, 0.060, 0.150, None),
            run("direct", "keepalive", 16, 90_000.0, 0.170, 0.900, None),
            run("lattice", "keepalive", 1, 9_000.0, 0.100, 0.300, Some(40.0)),
            run(
                "lattice",
                "keepalive",
                16,
                40_000.0,
                0.390,
                1.600,
                Some(21.0),
            ),
            run("floor", "keepalive", 1, 11_000.0, 0.095, 0.200, Some(20.0)),
            run("floor", "keepalive", 16, 60_000.0, 0.250, 1.000, Some(15.0)),
            Run {
                scenario: "lattice",
                workload: "idle",
                agent_rss_mib: Some(20.0),
                ..Run::default()
            },
        ]
    }

    #[test]
    fn node_targets_from_the_node_bench_figures() {
        let node = serde_json::json!({
            "node_agent_rss_100_pods_mib": 30.0,
            "rss_per_added_pod_kib": 300.0,
            "enrollment_ms": {"p99": 40.0},
            "added_p50_ms": {"node": 0.05, "sidecar": 0.05},
            "flood": {"victim_p99_ms": 80.0},
        });
        let t = node_targets(&node);
        let met: Vec<Option<bool>> = t.iter().map(|t| t.met).collect();
        assert_eq!(
            met,
            [Some(true), Some(false), Some(true), Some(true), Some(false)]
        );
        assert_eq!(node_targets(&serde_json::json!({}))[3].met, None);
    }

    #[test]
    fn traffic_targets_compare_passthrough_with_the_floor_and_tls_with_http() {
        let tcp = |scenario, load, p50, per_mib, per_conn| TcpRun {
            scenario,
            load,
            p50_us: p50,
            cpu_us_per_mib: per_mib,
            cpu_us_per_conn: per_conn,
            ..TcpRun::default()
        };
        let rows = [
            tcp("direct", "pingpong", Some(20.0), None, None),
            tcp("floor", "pingpong", Some(50.0), None, None),
            tcp("lattice", "pingpong", Some(56.0), None, None),
            tcp("floor", "stream", None, Some(1000.0), None),
            tcp("lattice", "stream", None, Some(1050.0), None),
            tcp("floor", "conns", None, None, Some(20.0)),
            tcp("lattice", "conns", None, None, Some(30.0)),
        ];
        let mut runs = sample();
        runs.push(Run {
            scenario: "tls",
            workload: "keepalive",
            concurrency: Some(16),
            agent_cpu_us_per_req: Some(25.0),
            ..Run::default()
        });
        let t = traffic_targets(&cost(&runs), &rows);
        assert!((t[0].measured.unwrap() - 1.05).abs() < 1e-9);
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[1].met, Some(false), "1.5 > 1.1");
        // Lattice adds 36 µs, the floor 30: over floor + 5.
        assert!((t[2].measured.unwrap() - 36.0).abs() < 1e-9);
        assert_eq!(t[2].limit, Some(35.0));
        assert_eq!(t[2].met, Some(false));
        assert!((t[3].measured.unwrap() - 25.0 / 21.0).abs() < 1e-9);
        assert_eq!(t[3].met, Some(true));
        assert!(traffic_targets(&[], &[]).iter().all(|t| t.met.is_none()));
    }

    #[test]
    fn cost_is_against_direct_in_the_same_run() {
        let cost = cost(&sample());
        let lattice16 = cost
            .iter()
            .find(|k| k.scenario == "lattice" && k.concurrency == 16)
            .unwrap();
        assert_eq!(lattice16.cpu_us_per_req, Some(21.0));
        assert!((lattice16.added_p50_us.unwrap() - 220.0).abs() < 1e-6);
        assert!((lattice16.added_p99_us.unwrap() - 700.0).abs() < 1e-6);
        // No newconn figures, no iptables scenario: no rows for them.
        assert_eq!(cost.len(), 4);
    }

    #[test]
    fn targets_compare_within_the_run() {
        let runs = sample();
        let micro = Micro {
            sign_sigv4_ns: Some(2500.0),
            sign_sigv4a_ns: Some(15_000.0),
        };
        let t = targets(&runs, &cost(&runs), &micro);
        assert!((t[0].measured.unwrap() - 1.4).abs() < 1e-9, "21 / 15");
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[0].detail, "lattice 21.0 µs, floor 15.0 µs");
        // Lattice adds 40 µs at c=1, the floor 35: within floor + 10.
        assert!((t[1].measured.unwrap() - 40.0).abs() < 1e-6);
        assert!((t[1].limit.unwrap() - 45.0).abs() < 1e-6);
        assert_eq!(t[1].met, Some(true));
        assert_eq!(t[2].met, None, "no newconn figures");
        assert_eq!(t[3].met, Some(false), "20 MiB idle > 16 MiB");
        assert_eq!(t[4].met, None, "no upload");
        assert_eq!(t[5].met, None, "no lattice-w2 figures");
        assert_eq!(t[6].met, Some(false), "2.5 µs > 2 µs");
        assert_eq!(t[7].met, Some(true), "15 µs <= 20 µs");
    }

    #[test]
    fn workers_scaling_is_against_one_worker_at_c64() {
        let mut runs = sample();
        let ka64 = |scenario, rps| Run {
            scenario,
            workload: "keepalive",
            concurrency: Some(64),
            rps: Some(rps),
            ..Run::default()
        };
        runs.push(ka64("lattice", 30_000.0));
        runs.push(ka64("lattice-w2", 33_000.0));
        let t = targets(&runs, &cost(&runs), &Micro::default());
        assert!((t[5].measured.unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(t[5].met, Some(false), "1.1 < 1.2");
        assert_eq!(t[5].detail, "1 worker 30000/s, 2 workers 33000/s");
    }

    #[test]
    fn schema_accepts_the_report_and_rejects_bad_rows() {
        let runs = sample();
        let cost = cost(&runs);
        let micro = Micro::default();
        let report = Report {
            quick: true,
            machine: Machine::read(),
            targets: targets(&runs, &cost, &micro),
            runs,
            passthrough: Vec::new(),
            cost,
            micro,
            node: None,
            node_markdown: String::new(),
        };
        let mut json = serde_json::to_value(&report).unwrap();
        check_schema(&json).unwrap();
        assert_eq!(json["runs"][6]["rps"], Value::Null);
        json["runs"][0]["scenario"] = "envoy".into();
        assert!(check_schema(&json).is_err());
        json["runs"][0]["scenario"] = "direct".into();
        json["runs"][1].as_object_mut().unwrap().remove("p99_ms");
        assert!(check_schema(&json).is_err());
        assert!(check_schema(&serde_json::json!({"runs": []})).is_err());
        let md = markdown(&report);
        assert!(md.contains("| lattice | keepalive | 16 | 40000 |"), "{md}");
        assert!(
            md.contains("| floor | keepalive | 16 | 15.0 | – | 80 | 100 |"),
            "{md}"
        );
    }
}
