//! The figures of one bench run: the Markdown table (stdout and
//! report.md), the raw JSON (report.json, checked against its schema before
//! it is written) and the targets of the performance issue.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;

pub const SCENARIOS: [&str; 3] = ["direct", "lattice", "iptables"];
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
    /// Peak RSS during the run (VmHWM reset at its start); RSS for `idle`.
    pub agent_rss_mib: Option<f64>,
    pub agent_cpu_s_per_10k: Option<f64>,
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
    pub limit: f64,
    /// "min" (measured must be >= limit) or "max" (<=).
    pub kind: &'static str,
    pub unit: &'static str,
    /// None when a figure it needs is missing.
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: Machine,
    pub runs: Vec<Run>,
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

/// The performance issue's targets, from this run's figures.
pub fn targets(runs: &[Run]) -> Vec<Target> {
    let ka16 = |s| find(runs, s, "keepalive", Some(16));
    let nc16 = |s| find(runs, s, "newconn", Some(16));
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    let t = |name, measured: Option<f64>, kind, limit, unit| Target {
        name,
        measured,
        limit,
        kind,
        unit,
        met: measured.map(|m| {
            if kind == "min" {
                m >= limit
            } else {
                m <= limit
            }
        }),
    };
    vec![
        t(
            "lattice keep-alive throughput at c=16 / direct",
            ratio(
                ka16("lattice").and_then(|r| r.rps),
                ka16("direct").and_then(|r| r.rps),
            ),
            "min",
            0.6,
            "x",
        ),
        t(
            "p99 latency lattice adds at c=16",
            diff(
                ka16("lattice").and_then(|r| r.p99_ms),
                ka16("direct").and_then(|r| r.p99_ms),
            ),
            "max",
            1.0,
            "ms",
        ),
        t(
            "lattice new-connection rate / iptables",
            ratio(
                nc16("lattice").and_then(|r| r.rps),
                nc16("iptables").and_then(|r| r.rps),
            ),
            "min",
            1.0,
            "x",
        ),
        t(
            "lattice agent idle RSS",
            find(runs, "lattice", "idle", None).and_then(|r| r.agent_rss_mib),
            "max",
            16.0,
            "MiB",
        ),
        t(
            "lattice agent peak RSS during the 256 MiB upload",
            find(runs, "lattice", "upload", None).and_then(|r| r.agent_rss_mib),
            "max",
            32.0,
            "MiB",
        ),
    ]
}

/// The node-mode issue's targets, from lattice-bench-node's figures.
pub fn node_targets(node: &Value) -> Vec<Target> {
    let f = |v: &Value| v.as_f64();
    let t = |name, measured: Option<f64>, limit, unit| Target {
        name,
        measured,
        limit,
        kind: "max",
        unit,
        met: measured.map(|m| m <= limit),
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
    ]
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| scenario | workload | conc. | req/s | p50 ms | p99 ms | p99.9 ms | MiB/s | agent RSS MiB | agent CPU s / 10k req |"
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
            cell(r.agent_cpu_s_per_10k, 3),
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
        let _ = writeln!(
            md,
            "| {} | {} {} | {op} {} {} | {result} |",
            t.name,
            cell(t.measured, 2),
            t.unit,
            t.limit,
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
    ensure!(!runs.is_empty(), "`runs` is empty");
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
            "agent_cpu_s_per_10k",
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
        let ka = |scenario, rps, p99| Run {
            scenario,
            workload: "keepalive",
            concurrency: Some(16),
            rps: Some(rps),
            p99_ms: Some(p99),
            ..Run::default()
        };
        vec![
            ka("direct", 10_000.0, 1.0),
            ka("lattice", 7_000.0, 1.5),
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
        });
        let t = node_targets(&node);
        let met: Vec<Option<bool>> = t.iter().map(|t| t.met).collect();
        assert_eq!(met, [Some(true), Some(false), Some(true), Some(true)]);
        assert_eq!(node_targets(&serde_json::json!({}))[3].met, None);
    }

    #[test]
    fn targets_compare_within_the_run() {
        let t = targets(&sample());
        assert_eq!(t[0].met, Some(true), "0.7 >= 0.6");
        assert!((t[0].measured.unwrap() - 0.7).abs() < 1e-9);
        assert_eq!(t[1].met, Some(true), "0.5 ms added <= 1 ms");
        assert_eq!(t[2].met, None, "no newconn figures");
        assert_eq!(t[3].met, Some(false), "20 MiB idle > 16 MiB");
    }

    #[test]
    fn schema_accepts_the_report_and_rejects_bad_rows() {
        let report = Report {
            quick: true,
            machine: Machine::read(),
            runs: sample(),
            node: None,
            node_markdown: String::new(),
            targets: targets(&sample()),
        };
        let mut json = serde_json::to_value(&report).unwrap();
        check_schema(&json).unwrap();
        assert_eq!(json["runs"][2]["rps"], Value::Null);
        json["runs"][0]["scenario"] = "envoy".into();
        assert!(check_schema(&json).is_err());
        json["runs"][0]["scenario"] = "direct".into();
        json["runs"][1].as_object_mut().unwrap().remove("p99_ms");
        assert!(check_schema(&json).is_err());
        assert!(check_schema(&serde_json::json!({"runs": []})).is_err());
        assert!(markdown(&report).contains("| lattice | keepalive | 16 | 7000 |"));
    }
}
