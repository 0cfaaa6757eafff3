//! `cargo xtask bench [--quick]`: lattice against direct traffic, against
//! the floor of any user-space proxy on its path, and against the iptables
//! setup's interception, side by side in one run on this machine.
//!
//! Each scenario gets its own network namespace (nginx on its `lo` at
//! 169.254.171.33:80), cgroup tree and scratch directory, all removed at the
//! end, on error, panic or Ctrl-C alike; the run then checks that nothing it
//! created is left. They exist side by side and take turns for every
//! measurement, so machine drift hits them alike and ratios hold.
//!
//! - `direct`: wrk → nginx.
//! - `lattice`: wrk in the pod cgroup → eBPF connect redirect → agent
//!   (signs) → nginx.
//! - `lattice-w2`: the same with the agent's `--workers 2`: how its
//!   throughput scales with a second proxy thread.
//! - `floor`: the same redirect (the agent attached with
//!   `--intercept-only`) → a one-thread TCP relay (no HTTP, no signing) →
//!   nginx: what the two extra loopback hops alone cost.
//! - `http-floor`: the same, but the relay speaks HTTP/1.1 through hyper on
//!   both hops, as the agent does, and forwards requests unchanged (no
//!   signing, no header rules, no metrics): what hyper's HTTP/1 server and
//!   client cost on this path. `lattice` above it is the agent's own work.
//! - `iptables`: wrk → the iptables setup's NAT REDIRECT rules → the same agent, its
//!   programs attached to an empty cgroup so they see nothing; it finds the
//!   original destination with SO_ORIGINAL_DST.
//! - `tls`: `lattice` with HTTPS origination (`--upstream-tls-rule
//!   "port:80 => 443"`): the agent signs and connects with TLS to nginx's
//!   TLS listener (a certificate from a CA of the run's own, `--ca-file`).
//! - `baseline` (only with `--baseline-agent PATH`): `lattice` with another
//!   agent binary, e.g. one built from another commit, so a change is
//!   judged against what it replaces within one run.
//!
//! `passthrough` is not a world of its own but TCP traffic that is not
//! HTTP (see `tcp`), through `direct`, `floor` and `lattice`: what passing
//! a connection through costs the agent against the floor's byte relay.

mod agent;
mod cgroup;
mod chart;
mod interrupt;
mod micro;
mod nginx;
mod process;
mod profile;
mod relay;
mod report;
mod scratch;
mod tcp;
mod upload;
mod wrk;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use lattice_tests::{
    TempDir,
    iptables::EgressProxyRules,
    netns::{self, Netns},
    unique_name,
};

use self::{
    agent::{Agent, Role},
    cgroup::Cgroups,
    interrupt::Interrupt,
    nginx::Nginx,
    process::ProcStats,
    relay::{Relay, RelayMode},
    report::{Machine, Report, Run},
    scratch::scratch_dir,
};
use crate::{Workspace, cmd, setup::Ready};

/// How long each measurement takes.
struct Plan {
    duration: Duration,
    warmup: Duration,
    idle_settle: Duration,
    /// Each measurement is repeated this often, the scenarios taking turns,
    /// and the median round is reported: drift on a shared machine then hits
    /// all scenarios alike.
    rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                duration: Duration::from_secs(4),
                warmup: Duration::from_secs(1),
                idle_settle: Duration::from_secs(1),
                rounds: 1,
            }
        } else {
            Self {
                duration: Duration::from_secs(10),
                warmup: Duration::from_secs(3),
                idle_settle: Duration::from_secs(3),
                rounds: 3,
            }
        }
    }
}

/// A way for the app to reach nginx; one of these, `passthrough` or
/// `node` may be picked with `--only` (`Node` is the node-mode scenario,
/// which runs on its own; `Passthrough` is TCP traffic through `direct`,
/// `floor` and `lattice`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Part {
    Direct,
    Lattice,
    #[value(name = "lattice-w2")]
    LatticeW2,
    Floor,
    #[value(name = "http-floor")]
    HttpFloor,
    Iptables,
    Tls,
    Passthrough,
    Node,
}

impl Part {
    /// The scenario whose HTTP loads this part runs.
    fn scenario(self) -> Option<Scenario> {
        match self {
            Self::Direct => Some(Scenario::Direct),
            Self::Lattice => Some(Scenario::Lattice),
            Self::LatticeW2 => Some(Scenario::LatticeW2),
            Self::Floor => Some(Scenario::Floor),
            Self::HttpFloor => Some(Scenario::HttpFloor),
            Self::Iptables => Some(Scenario::Iptables),
            Self::Tls => Some(Scenario::Tls),
            Self::Passthrough | Self::Node => None,
        }
    }
}

/// The scenarios the `passthrough` loads run through.
const PASSTHROUGH: [Scenario; 3] = [Scenario::Direct, Scenario::Floor, Scenario::Lattice];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Direct,
    Lattice,
    LatticeW2,
    Floor,
    HttpFloor,
    Iptables,
    Tls,
    Baseline,
}

impl Scenario {
    /// The scenarios measured side by side (`Baseline` when asked for).
    const ALL: [Self; 8] = [
        Self::Direct,
        Self::Lattice,
        Self::LatticeW2,
        Self::Floor,
        Self::HttpFloor,
        Self::Iptables,
        Self::Tls,
        Self::Baseline,
    ];

    /// The name in the logs, `--only` and the report (see
    /// [`report::SCENARIOS`]).
    const fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Lattice => "lattice",
            Self::LatticeW2 => "lattice-w2",
            Self::Floor => "floor",
            Self::HttpFloor => "http-floor",
            Self::Iptables => "iptables",
            Self::Tls => "tls",
            Self::Baseline => "baseline",
        }
    }
}

/// The measured workloads: (name, connections), each for every scenario.
const WORKLOADS: [(&str, u32); 5] = [
    ("keepalive", 1),
    ("keepalive", 16),
    ("keepalive", 64),
    ("newconn", 1),
    ("newconn", 16),
];

/// The programs the scenarios run.
struct Binaries {
    agent: PathBuf,
    relay: PathBuf,
    /// The passthrough loads and their echo server.
    tcp: PathBuf,
    /// The `baseline` scenario's agent.
    baseline: Option<PathBuf>,
}

/// What the run created, to check afterwards that all of it is gone.
#[derive(Default)]
struct Created {
    names: Vec<String>,
    cgroups: Vec<PathBuf>,
    pids: Vec<i32>,
}

/// What `cargo xtask bench` was asked for.
pub struct Options {
    pub quick: bool,
    /// Pods of the node-mode scenario.
    pub pods: u32,
    /// Also write a flame graph of the agent under the keep-alive load.
    pub profile: bool,
    /// Only these scenarios; empty: all.
    pub only: Vec<Part>,
    /// Adds the `baseline` scenario, run with this agent binary.
    pub baseline_agent: Option<PathBuf>,
}

pub fn run(ws: &Workspace, ready: &Ready, opts: &Options) -> Result<()> {
    let Options {
        quick,
        pods,
        profile,
        ref only,
        ref baseline_agent,
    } = *opts;
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    // Scenarios whose HTTP loads run, and those the passthrough loads do.
    let http: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|&s| match s {
            Scenario::Baseline => baseline_agent.is_some(),
            s => only.is_empty() || only.iter().any(|p| p.scenario() == Some(s)),
        })
        .collect();
    let passthrough: &[Scenario] = if wanted(Part::Passthrough) {
        &PASSTHROUGH
    } else {
        &[]
    };
    let scenarios: Vec<Worlds> = Scenario::ALL
        .into_iter()
        .filter(|s| http.contains(s) || passthrough.contains(s))
        .map(|s| Worlds {
            scenario: s,
            http: http.contains(&s),
            tcp: passthrough.contains(&s),
        })
        .collect();
    if let Some(b) = baseline_agent
        && !b.is_file()
    {
        bail!("--baseline-agent {}: no such file", b.display());
    }
    if profile && !wanted(Part::Lattice) {
        bail!("--profile samples the lattice scenario's agent: add `lattice` to --only");
    }
    let stop = Interrupt::install()?;
    for tool in [
        "nginx",
        "wrk",
        "iptables",
        "iptables-save",
        "curl",
        "nsenter",
        "ip",
        "openssl",
    ] {
        if !cmd::succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            bail!("`{tool}` not found: run `cargo xtask setup` as root");
        }
    }
    let mut build = Command::new("cargo");
    cmd::without_cargo_run_env(&mut build).current_dir(&ws.root);
    ready.apply(&mut build)?;
    cmd::run(build.args(["build", "--release", "--package", "lattice-agent"]))?;
    let binaries = Binaries {
        agent: ws.target_dir.join("release/lattice-agent"),
        relay: ws.target_dir.join("release/lattice-bench-relay"),
        tcp: ws.target_dir.join("release/lattice-bench-tcp"),
        baseline: baseline_agent.clone(),
    };
    // The floor's relay, the node-mode scenario and its cheap upstream,
    // from the test kit.
    let mut build = Command::new("cargo");
    cmd::without_cargo_run_env(&mut build).current_dir(&ws.root);
    ready.apply(&mut build)?;
    cmd::run(build.args(["build", "--release", "--package", "lattice-tests", "--bins"]))?;

    let plan = Plan::new(quick);
    let out = ws.target_dir.join("bench");
    std::fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let flamegraph = profile.then(|| out.join("flamegraph.svg"));
    let host_rules = host_nat_rules();
    let mut created = Created::default();
    let measured = measure_all(
        &scenarios,
        &binaries,
        &plan,
        flamegraph.as_deref(),
        &stop,
        &mut created,
    );
    // Checked even after a failure: a leak matters more than the figures.
    let clean = check_clean(&created, &host_rules);
    let (runs, tcp_runs) = measured?;
    clean?;
    eprintln!(
        "bench: cleanup verified: {} namespaces, {} cgroup trees, {} processes gone; host NAT rules unchanged",
        created.names.len(),
        created.cgroups.len(),
        created.pids.len()
    );

    let (node, node_markdown) = if wanted(Part::Node) {
        let (figures, tables) = node_scenario(ws, ready, &binaries.agent, quick, pods, &out)?;
        (Some(figures), tables)
    } else {
        (None, String::new())
    };
    let micro = micro::signing(ws, ready, quick)?;
    let cost = report::cost(&runs);
    let mut targets = report::targets(&runs, &cost, &micro);
    targets.extend(report::traffic_targets(&cost, &tcp_runs));
    if let Some(node) = &node {
        targets.extend(report::node_targets(node));
    }
    let report = Report {
        quick,
        machine: Machine::read(),
        node,
        node_markdown,
        targets,
        runs,
        passthrough: tcp_runs,
        cost,
        micro,
    };
    report::write(&report, &out)?;
    chart::draw(&report.runs, &out.join("report.png"))?;
    println!("{}", report::markdown(&report));
    eprintln!(
        "bench: wrote {0}/report.md, {0}/report.json, {0}/report.png",
        out.display()
    );
    if let Some(svg) = flamegraph {
        eprintln!("bench: wrote {}", svg.display());
    }
    Ok(())
}

/// Node mode: `lattice-bench-node` (the test kit's node fixture, one node
/// agent serving `pods` pods, against a sidecar agent and direct); returns
/// its figures and its tables.
fn node_scenario(
    ws: &Workspace,
    ready: &Ready,
    agent: &Path,
    quick: bool,
    pods: u32,
    out: &Path,
) -> Result<(serde_json::Value, String)> {
    let json = out.join("node.json");
    let (seconds, rounds) = if quick { ("4", "1") } else { ("10", "3") };
    let mut bench = Command::new(ws.target_dir.join("release/lattice-bench-node"));
    bench
        .arg("--agent")
        .arg(agent)
        .args([
            "--pods",
            &pods.to_string(),
            "--seconds",
            seconds,
            "--rounds",
            rounds,
        ])
        .arg("--json")
        .arg(&json);
    ready.apply(&mut bench)?;
    // Its progress lines go to the terminal as they come; stdout is the tables.
    bench.stderr(std::process::Stdio::inherit());
    eprintln!("bench: node mode, {pods} pods");
    let tables = cmd::read(&mut bench).context("the node-mode scenario (lattice-bench-node)")?;
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let figures =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    Ok((figures, tables))
}

/// A scenario to build a world for, and which loads it runs.
#[derive(Clone, Copy)]
struct Worlds {
    scenario: Scenario,
    /// wrk's HTTP loads and the upload.
    http: bool,
    /// The passthrough loads (an echo server beside nginx).
    tcp: bool,
}

/// One scenario's world. Fields drop in order: agent, relay, nginx, cgroups
/// (and any process left in them), namespace (and its iptables rules),
/// scratch directory.
struct Pod {
    scenario: Scenario,
    agent: Option<Agent>,
    /// The floor's proxy, in place of the agent's.
    relay: Option<Relay>,
    /// The proxy's process, whichever it is: the agent or the relay.
    stats: Option<ProcStats>,
    /// Held for its drop, which stops it.
    _nginx: Nginx,
    /// The passthrough loads' echo server, when they run here.
    _echo: Option<tcp::Echo>,
    http: bool,
    cgroups: Cgroups,
    ns: Netns,
    scripts: (PathBuf, PathBuf),
    /// Requests sent through it, to check against the agent's count.
    sent: u64,
    /// Connections at least opened through it, to check the relay's count.
    connections: u64,
    dir: TempDir,
}

impl Pod {
    fn new(
        worlds: Worlds,
        binaries: &Binaries,
        stop: &Interrupt,
        created: &mut Created,
    ) -> Result<Self> {
        let scenario = worlds.scenario;
        let name = unique_name();
        eprintln!("bench: {} in namespace and cgroup {name}", scenario.name());
        let dir = scratch_dir(&name);
        created.names.push(name.clone());
        let ns = Netns::new(&name);
        ns.add_lo_addr(&format!("{}/32", nginx::ADDR));
        let cgroups = Cgroups::new(&name);
        created.cgroups.push(cgroups.root().to_path_buf());
        let tls = scenario == Scenario::Tls;
        let nginx = Nginx::start(&ns, &cgroups.upstream(), dir.path(), tls, stop)?;
        created.pids.push(nginx.process.pid());
        let echo = worlds
            .tcp
            .then(|| tcp::Echo::start(&binaries.tcp, &ns, &cgroups.upstream(), stop))
            .transpose()?;
        if let Some(e) = &echo {
            created.pids.push(e.process.pid());
        }
        if scenario == Scenario::Iptables {
            iptables_setup_rules(&ns)?;
        }
        let proxy = Role::Proxy { workers: 1 };
        let attach = match scenario {
            Scenario::Direct => None,
            Scenario::Lattice => Some((cgroups.app(), proxy)),
            Scenario::LatticeW2 => Some((cgroups.app(), Role::Proxy { workers: 2 })),
            Scenario::Floor | Scenario::HttpFloor => Some((cgroups.app(), Role::InterceptOnly)),
            // Nobody runs there: the programs see no traffic, NAT steers it.
            Scenario::Iptables => Some((cgroups.empty(), proxy)),
            Scenario::Tls => Some((cgroups.app(), Role::TlsProxy)),
            Scenario::Baseline => Some((cgroups.app(), proxy)),
        };
        let agent_binary = match (scenario, &binaries.baseline) {
            (Scenario::Baseline, Some(b)) => b,
            _ => &binaries.agent,
        };
        let agent = attach
            .map(|(to, role)| {
                Agent::start(
                    agent_binary,
                    &ns,
                    &cgroups.agent(),
                    &to,
                    role,
                    dir.path(),
                    stop,
                )
            })
            .transpose()?;
        if let Some(a) = &agent {
            created.pids.push(a.process.pid());
        }
        let relay = match scenario {
            Scenario::Floor => Some(RelayMode::Bytes),
            Scenario::HttpFloor => Some(RelayMode::Http),
            _ => None,
        }
        .map(|mode| Relay::start(&binaries.relay, mode, &ns, &cgroups.app(), stop))
        .transpose()?;
        if let Some(r) = &relay {
            created.pids.push(r.process.pid());
        }
        let proxy_pid = match (&relay, &agent) {
            (Some(r), _) => Some(r.process.pid()),
            (None, Some(a)) => Some(a.process.pid()),
            (None, None) => None,
        };
        let stats = proxy_pid.map(ProcStats::new);
        let scripts = wrk::write_scripts(dir.path())?;
        Ok(Self {
            scenario,
            agent,
            relay,
            stats,
            _nginx: nginx,
            _echo: echo,
            http: worlds.http,
            cgroups,
            ns,
            scripts,
            sent: 0,
            connections: 0,
            dir,
        })
    }

    fn base(&self) -> Run {
        Run {
            scenario: self.scenario.name(),
            ..Run::default()
        }
    }

    /// One wrk run; agent CPU and peak RSS are taken over exactly that run.
    fn load(
        &mut self,
        workload: &'static str,
        c: u32,
        plan: &Plan,
        stop: &Interrupt,
    ) -> Result<Run> {
        let script = if workload == "newconn" {
            &self.scripts.1
        } else {
            &self.scripts.0
        };
        if let Some(s) = &self.stats {
            s.reset_peak()?;
        }
        let cpu_before = self
            .stats
            .as_ref()
            .map(ProcStats::cpu_seconds)
            .transpose()?;
        let w = wrk::run(
            &self.ns,
            &self.cgroups.app(),
            script,
            c,
            plan.duration,
            stop,
        )?;
        let cpu_after = self
            .stats
            .as_ref()
            .map(ProcStats::cpu_seconds)
            .transpose()?;
        let name = self.scenario.name();
        if w.bad_status > 0 {
            bail!(
                "{name} {workload} c={c}: {} responses with status >= 400",
                w.bad_status
            );
        }
        self.sent += w.requests;
        self.connections += if workload == "newconn" {
            w.requests
        } else {
            u64::from(c)
        };
        let per_req = |a: f64, b: f64| (b - a) / w.requests.max(1) as f64 * 1e6;
        let user_us = cpu_before.zip(cpu_after).map(|(a, b)| per_req(a.0, b.0));
        let cpu_us = cpu_before
            .zip(cpu_after)
            .map(|(a, b)| per_req(a.0 + a.1, b.0 + b.1));
        eprintln!(
            "bench:   {name:8} {workload:9} c={c:<2}: {:>6.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} socket errors{}",
            w.rps(),
            w.p50_us / 1000.0,
            w.p99_us / 1000.0,
            w.errors,
            cpu_us
                .zip(user_us)
                .map_or_else(String::new, |(us, user)| format!(
                    ", proxy CPU {us:.1} µs/req ({user:.1} user)"
                ))
        );
        Ok(Run {
            workload,
            concurrency: Some(c),
            rps: Some(w.rps()),
            p50_ms: Some(w.p50_us / 1000.0),
            p99_ms: Some(w.p99_us / 1000.0),
            p999_ms: Some(w.p999_us / 1000.0),
            agent_rss_mib: self
                .stats
                .as_ref()
                .map(ProcStats::peak_rss_mib)
                .transpose()?,
            agent_cpu_us_per_req: cpu_us,
            agent_user_us_per_req: user_us,
            requests: Some(w.requests),
            errors: Some(w.errors),
            duration_s: Some(w.duration_us as f64 / 1e6),
            ..self.base()
        })
    }

    fn upload(&mut self, stop: &Interrupt) -> Result<Run> {
        if let Some(s) = &self.stats {
            s.reset_peak()?;
        }
        let up = upload::run(&self.ns, &self.cgroups.app(), self.dir.path(), stop)?;
        self.sent += 1;
        self.connections += 1;
        let peak = self
            .stats
            .as_ref()
            .map(ProcStats::peak_rss_mib)
            .transpose()?;
        eprintln!(
            "bench:   {:8} upload 256 MiB: {:.0} MiB/s{}",
            self.scenario.name(),
            up.mib_per_s(),
            peak.map_or_else(String::new, |p| format!(", agent peak RSS {p:.1} MiB"))
        );
        Ok(Run {
            workload: "upload",
            throughput_mib_s: Some(up.mib_per_s()),
            agent_rss_mib: peak,
            requests: Some(1),
            duration_s: Some(up.seconds),
            ..self.base()
        })
    }

    /// Samples the agent under the keep-alive load at c=16 (a run of its
    /// own, not in the figures) and draws `svg`.
    fn profile(&mut self, svg: &Path, plan: &Plan, stop: &Interrupt) -> Result<()> {
        let pid = self
            .agent
            .as_ref()
            .map(|a| a.process.pid())
            .context("no agent to profile")?;
        let dir = svg.parent().context("the flame graph's directory")?;
        eprintln!("bench: profiling the agent (perf record) under keep-alive c=16");
        let recording = profile::Recording::start(pid, dir)?;
        let w = self.keepalive_c16(plan.duration, stop)?;
        recording.finish(
            svg,
            &format!(
                "lattice-agent, keep-alive c=16, {:.0} req/s (perf record)",
                w.rps()
            ),
            stop,
        )
    }

    /// Keep-alive load at c=16 outside the figures (a warm-up, a profile),
    /// counted for [`Self::check_proxy_saw_everything`].
    fn keepalive_c16(&mut self, duration: Duration, stop: &Interrupt) -> Result<wrk::WrkResult> {
        let w = wrk::run(
            &self.ns,
            &self.cgroups.app(),
            &self.scripts.0,
            16,
            duration,
            stop,
        )?;
        self.sent += w.requests;
        self.connections += 16;
        Ok(w)
    }

    /// The traffic really went through the proxy, and it always knew where
    /// it was going (eBPF record, or SO_ORIGINAL_DST from the getsockopt
    /// program or from conntrack under NAT). Stops the floor's relay.
    fn check_proxy_saw_everything(&mut self) -> Result<()> {
        if let Some(relay) = &mut self.relay {
            let relayed = relay.stop()?;
            if relayed < self.connections {
                bail!(
                    "{}: the relay relayed {relayed} connections; at least {} were opened",
                    self.scenario.name(),
                    self.connections
                );
            }
            return Ok(());
        }
        if self.agent.is_none() {
            return Ok(());
        }
        let served = Agent::counter(&self.ns, "lattice_requests_total")?;
        let unknown = Agent::counter(&self.ns, "lattice_unknown_destination_connections_total")?;
        if served < self.sent as f64 || unknown > 0.0 {
            bail!(
                "{}: the agent served {served} of {} requests; {unknown} connections had no original destination",
                self.scenario.name(),
                self.sent
            );
        }
        Ok(())
    }
}

/// The round whose `key` is the median: its figures are reported together.
fn median_by(mut rounds: Vec<Run>, key: impl Fn(&Run) -> Option<f64>) -> Option<Run> {
    rounds.sort_by(|a, b| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let peak = rounds
        .iter()
        .filter_map(|r| r.agent_rss_mib)
        .reduce(f64::max);
    let mid = rounds.len() / 2;
    let mut run = rounds.into_iter().nth(mid)?;
    // A peak is a peak: the highest of all rounds.
    run.agent_rss_mib = peak;
    Some(run)
}

fn measure_all(
    scenarios: &[Worlds],
    binaries: &Binaries,
    plan: &Plan,
    flamegraph: Option<&Path>,
    stop: &Interrupt,
    created: &mut Created,
) -> Result<(Vec<Run>, Vec<tcp::TcpRun>)> {
    let mut pods = Vec::new();
    for &worlds in scenarios {
        pods.push(Pod::new(worlds, binaries, stop, created)?);
    }
    let mut rows: Vec<Vec<Run>> = vec![Vec::new(); pods.len()];

    stop.sleep(plan.idle_settle)?;
    for (pod, rows) in pods.iter().zip(&mut rows) {
        if let Some(stats) = pod.stats.as_ref().filter(|_| pod.http) {
            let rss = stats.rss_mib()?;
            eprintln!(
                "bench:   {:8} idle agent RSS {rss:.1} MiB",
                pod.scenario.name()
            );
            rows.push(Run {
                workload: "idle",
                agent_rss_mib: Some(rss),
                ..pod.base()
            });
        }
    }
    for pod in pods.iter_mut().filter(|p| p.http) {
        pod.keepalive_c16(plan.warmup, stop)?;
    }

    for (workload, c) in WORKLOADS {
        let mut rounds: Vec<Vec<Run>> = vec![Vec::new(); pods.len()];
        for _ in 0..plan.rounds {
            for (pod, rounds) in pods.iter_mut().zip(&mut rounds).filter(|(p, _)| p.http) {
                rounds.push(pod.load(workload, c, plan, stop)?);
            }
        }
        for (rows, rounds) in rows.iter_mut().zip(rounds) {
            rows.extend(median_by(rounds, |r| r.rps));
        }
    }
    let mut uploads: Vec<Vec<Run>> = vec![Vec::new(); pods.len()];
    for _ in 0..plan.rounds {
        for (pod, uploads) in pods.iter_mut().zip(&mut uploads).filter(|(p, _)| p.http) {
            uploads.push(pod.upload(stop)?);
        }
    }
    for (rows, uploads) in rows.iter_mut().zip(uploads) {
        rows.extend(median_by(uploads, |r| r.throughput_mib_s));
    }
    if let Some(svg) = flamegraph
        && let Some(pod) = pods.iter_mut().find(|p| p.scenario == Scenario::Lattice)
    {
        pod.profile(svg, plan, stop)?;
    }
    let tcp_rows = measure_passthrough(&mut pods, scenarios, binaries, plan, stop)?;
    for pod in &mut pods {
        pod.check_proxy_saw_everything()?;
    }
    Ok((rows.into_iter().flatten().collect(), tcp_rows))
}

/// The passthrough loads on the worlds that run them, rounds taking turns
/// as for HTTP; the median round of each.
fn measure_passthrough(
    pods: &mut [Pod],
    scenarios: &[Worlds],
    binaries: &Binaries,
    plan: &Plan,
    stop: &Interrupt,
) -> Result<Vec<tcp::TcpRun>> {
    let stream_mib = if plan.rounds == 1 { 512 } else { 2048 };
    // Short connections by the thousand: without reuse of TIME_WAIT ports
    // (which Linux allows on 127.0.0.0/8 only by default) the proxies' own
    // connects to the echo server would soon search for a free port, and
    // that search, not the proxy, would be measured. Every scenario alike.
    for (pod, worlds) in pods.iter().zip(scenarios) {
        if worlds.tcp {
            cmd::read(
                &mut pod
                    .ns
                    .command("sysctl")
                    .args(["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
                    .build(),
            )
            .with_context(|| format!("sysctl in namespace {}", pod.ns.name()))?;
        }
    }
    let mut out = Vec::new();
    for (load, args, c) in tcp::loads(plan.duration.as_secs(), stream_mib) {
        let mut rounds: Vec<Vec<tcp::TcpRun>> = vec![Vec::new(); pods.len()];
        for _ in 0..plan.rounds {
            for ((pod, worlds), rounds) in pods.iter_mut().zip(scenarios).zip(&mut rounds) {
                if !worlds.tcp {
                    continue;
                }
                let cpu = || -> Result<Option<f64>> {
                    pod.stats
                        .as_ref()
                        .map(|s| s.cpu_seconds().map(|(u, k)| u + k))
                        .transpose()
                };
                let before = cpu()?;
                let result = tcp::run(
                    &binaries.tcp,
                    &pod.ns,
                    &pod.cgroups.app(),
                    &args,
                    plan.duration + Duration::from_secs(60),
                    stop,
                    &pod.dir.path().join(format!("tcp-{load}.out")),
                )?;
                let after = cpu()?;
                pod.connections += result.connections.max(1);
                let row = tcp::row(
                    pod.scenario.name(),
                    load,
                    c,
                    &result,
                    before.zip(after).map(|(b, a)| a - b),
                );
                eprintln!(
                    "bench:   {:8} tcp {load:8} c={c:<2}: p50 {} µs, {} MiB/s, {} conn/s, proxy CPU {} µs/MiB, {} µs/conn, {} errors",
                    pod.scenario.name(),
                    fmt(row.p50_us, 1),
                    fmt(row.mib_s, 0),
                    fmt(row.conns_s, 0),
                    fmt(row.cpu_us_per_mib, 0),
                    fmt(row.cpu_us_per_conn, 1),
                    row.errors,
                );
                if row.errors > 0 {
                    bail!("{} tcp {load}: {} errors", pod.scenario.name(), row.errors);
                }
                rounds.push(row);
            }
        }
        for mut r in rounds.into_iter().filter(|r| !r.is_empty()) {
            let key = |t: &tcp::TcpRun| match load {
                "pingpong" => t.p50_us,
                "stream" => t.mib_s,
                _ => t.conns_s,
            };
            r.sort_by(|a, b| {
                key(a)
                    .partial_cmp(&key(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let mid = r.len() / 2;
            out.push(r.swap_remove(mid));
        }
    }
    Ok(out)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// The iptables setup's init-container rules, with the agent's port,
/// inside the scenario's namespace only.
fn iptables_setup_rules(ns: &Netns) -> Result<()> {
    let rules = EgressProxyRules {
        program: "iptables",
        prefix: "169.254.171.0/24",
        to_port: agent::PROXY_PORT,
        exempt_uid: agent::EXEMPT_UID,
    };
    for args in rules.args() {
        cmd::read(&mut ns.command(rules.program).args(&args).build())
            .with_context(|| format!("iptables rule in namespace {}", ns.name()))?;
    }
    Ok(())
}

/// The host namespace's NAT rules, to show the bench never touched them.
fn host_nat_rules() -> Vec<String> {
    cmd::read(Command::new("iptables-save").args(["-t", "nat"]))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(":EGRESS"))
        .map(str::to_owned)
        .collect()
}

fn check_clean(created: &Created, host_rules: &[String]) -> Result<()> {
    let mut left = Vec::new();
    for name in &created.names {
        if netns::listed(name) {
            left.push(format!("network namespace {name}"));
        }
    }
    for cgroup in &created.cgroups {
        if cgroup.exists() {
            left.push(format!("cgroup {}", cgroup.display()));
        }
    }
    for pid in &created.pids {
        if Path::new(&format!("/proc/{pid}")).exists() {
            left.push(format!("process {pid}"));
        }
    }
    if host_nat_rules() != host_rules {
        left.push("changed NAT rules in the host namespace".to_owned());
    }
    if !left.is_empty() {
        bail!("the bench left behind: {}", left.join(", "));
    }
    Ok(())
}
