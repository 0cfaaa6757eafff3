//! The node-mode bench, run by `cargo xtask bench` (as root) with the
//! release agent: one node agent serving N pods on a test node (the test
//! kit's node fixture and API stand-in), against the same agent as a
//! single-pod (sidecar) agent and against direct traffic.
//!
//! It measures:
//! - agent RSS with no pod, with N enrolled pods (each with its own service
//!   account and IAM role, each having served a request), and so the cost
//!   of an added pod; and the RSS N sidecar agents would take (the node
//!   agent's worker, which serves; its parent, which holds the pods'
//!   sockets, separately, with the part of its RSS the worker does not
//!   share);
//! - enrollment latency: from the pod's annotation reaching the API to the
//!   first request of the pod's app arriving signed (an app polling every
//!   millisecond from inside the pod);
//! - keep-alive throughput (c=16) and latency (c=1) through the node agent,
//!   through a sidecar agent, and direct, taking turns, median of rounds;
//! - the connect4 program's cost per connect (kernel BPF statistics) from
//!   an enrolled pod (redirected) and from a pod that is not (passed on);
//! - fairness: one pod's 400 sequential requests on a kept-alive
//!   connection, p50/p99 before and while another pod floods the agent
//!   (1,900 slowloris connections and 100 back to back, to an upstream of
//!   its own).
//!
//! The upstream is lattice-test-service --keep-alive on 169.254.171.33 in
//! the node's namespace; STS is moto. Prints a Markdown table and writes
//! the figures as JSON to --json. Everything it creates goes with it, also
//! on SIGINT/SIGTERM.
//!
//! Usage: lattice-bench-node --agent PATH [--pods N] [--seconds S]
//!        [--rounds R] [--json PATH]

use std::{
    fs,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lattice_tests::{
    node::{LATTICE_V4, NodePod, PodSpec},
    node_agent::{Cluster, MOTO_PORT, NodeAgent, PodObject, sequential_gets, sts_url},
    procfs,
    spawn::Stream,
    test_bin,
    verifier::{UNUSED_KEY, Verifier, python},
};
use serde_json::{Value, json};

const MOTO_ADDR: &str = "169.254.171.40";
const HOST: &str = "bench-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    agent: PathBuf,
    pods: usize,
    seconds: u64,
    rounds: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        agent: PathBuf::new(),
        pods: 20,
        seconds: 10,
        rounds: 3,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--agent" => args.agent = PathBuf::from(value()?),
            "--pods" => args.pods = value()?.parse().map_err(|e| format!("--pods: {e}"))?,
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--json" => args.json = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !args.agent.is_file() {
        return Err("--agent PATH (the release lattice-agent) is required".into());
    }
    if args.pods == 0 || args.rounds == 0 {
        return Err("--pods and --rounds must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        if let Err(e) = unsafe { signal(sig, SigHandler::Handler(on_signal)) } {
            eprintln!("lattice-bench-node: installing the {sig} handler: {e}");
        }
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lattice-bench-node: {e}");
            return ExitCode::from(64);
        }
    };
    match run(&args) {
        Ok(report) => {
            println!("{}", markdown(&report));
            if let Some(path) = &args.json
                && let Err(e) = fs::write(
                    path,
                    serde_json::to_string_pretty(&report).unwrap_or_default(),
                )
            {
                eprintln!("lattice-bench-node: writing {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lattice-bench-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_stop() -> Result<(), String> {
    if STOP.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn run(args: &Args) -> Result<Value, String> {
    let cluster = Cluster::new();
    cluster.node.add_lo_addr(&format!("{MOTO_ADDR}/32"));
    let python = python()?;
    let _sts = Verifier::start_as(
        cluster.node.command(python),
        MOTO_ADDR,
        80,
        &UNUSED_KEY,
        &["--moto-sts-port", MOTO_PORT],
    );
    let mut upstream = cluster
        .node
        .command(test_bin("lattice-test-service"))
        .args(["--keep-alive", &format!("tcp:{LATTICE_V4}:80")])
        .spawn();
    upstream.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));

    let sts = sts_url();
    // moto loads its STS model on its first call (a few hundred ms in
    // Python); one call beforehand keeps that out of the first pod's
    // enrollment time, which then holds only the agent's own set-up.
    let warm = cluster
        .node
        .command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--data",
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn:aws:iam::123456789012:role/warm&RoleSessionName=warm&WebIdentityToken=warm",
            &sts,
        ])
        .run(Duration::from_secs(30));
    if warm.stdout.trim() != "200" {
        return Err(format!("warming up moto's STS at {sts}: {warm:?}"));
    }
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command_with(
            &args.agent,
            [
                "--log",
                "warn,lattice_agent::node=info,lattice_agent::keeper=info",
            ],
        ),
        &[("AWS_ENDPOINT_URL_STS", &sts)],
    );
    // The worker serves; its parent only holds the pods' sockets.
    let worker = agent.wait_worker(None, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = rss_mib(worker)?;
    let parent_rss_idle = rss_mib(agent.pid())?;
    eprintln!(
        "bench node: node agent idle RSS {rss_idle:.1} MiB (worker), {parent_rss_idle:.1} MiB (parent)"
    );

    // N pods, each its own service account and role, annotated one by one
    // while its app polls: the time to its first signed request.
    let mut pods = Vec::new();
    let mut enroll_ms = Vec::new();
    let mut rss_first = rss_idle;
    for i in 0..args.pods {
        check_stop()?;
        let pod = cluster
            .node
            .add_pod(PodSpec::new("bench", &format!("p{i}")));
        let object = PodObject::new(&pod, cluster.node.name())
            .service_account(&format!("sa{i}"))
            .irsa(
                &pod,
                &format!("arn:aws:iam::123456789012:role/bench{i}"),
                "us-west-2",
                &format!("token-{i}"),
            );
        cluster.apply(&object);
        let mut probe = pod
            .command(test_bin("lattice-test-client"))
            .uid(1000)
            .args(["wait-signed", &format!("{LATTICE_V4}:80"), "30"])
            .spawn();
        probe.wait_for(Stream::Stdout, "polling", Duration::from_secs(10));
        let annotated = lattice_tests::time::monotonic_ns();
        cluster.apply(&object.annotated());
        let status = probe
            .wait_timeout(Duration::from_secs(40))
            .ok_or("enrollment probe did not finish")?;
        let out = probe.output(status);
        let signed: u128 = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("signed ")?.trim().parse().ok())
            .ok_or_else(|| {
                format!(
                    "pod p{i} never got a signed request:\n{out}\n{}",
                    agent.log()
                )
            })?;
        enroll_ms.push((signed.saturating_sub(annotated)) as f64 / 1e6);
        if i == 0 {
            // The first pod also pays for one-time set-up (the first STS
            // client, the first upstream pool): added pods are measured
            // from here.
            std::thread::sleep(Duration::from_secs(1));
            rss_first = rss_mib(worker)?;
        }
        eprintln!(
            "bench node:   pod p{i}: first signed request {:.0} ms after its annotation",
            enroll_ms[i]
        );
        pods.push(pod);
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_pods = rss_mib(worker)?;
    let parent_rss = rss_mib(agent.pid())?;
    let parent_private = private_mib(agent.pid())?;
    eprintln!(
        "bench node: node agent parent RSS {parent_rss:.1} MiB, {parent_private:.1} MiB of it not shared with the worker"
    );
    let per_pod_kib = if args.pods > 1 {
        (rss_pods - rss_first) * 1024.0 / (args.pods - 1) as f64
    } else {
        (rss_pods - rss_idle) * 1024.0
    };
    eprintln!(
        "bench node: {} pods enrolled: RSS {rss_pods:.1} MiB ({per_pod_kib:.0} KiB per pod)",
        args.pods
    );

    // The same request through a sidecar agent and direct.
    let sidecar_pod = cluster.node.add_pod(PodSpec::new("bench", "sidecar"));
    let direct_pod = cluster.node.add_pod(PodSpec::new("bench", "direct"));
    let mut sidecar = sidecar_pod
        .command(&args.agent)
        .in_cgroup(false)
        .env("AWS_ACCESS_KEY_ID", UNUSED_KEY.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", UNUSED_KEY.secret_access_key)
        .env("AWS_REGION", UNUSED_KEY.region)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["--log", "warn,lattice_agent::app=info", "run", "--cgroup"])
        .arg(sidecar_pod.cgroup_path())
        .spawn();
    sidecar.wait_for(
        Stream::Stderr,
        "lattice-agent ready",
        Duration::from_secs(20),
    );

    let paths: [(&str, &NodePod); 3] = [
        ("node", &pods[0]),
        ("sidecar", &sidecar_pod),
        ("direct", &direct_pod),
    ];
    for (_, pod) in &paths {
        wrk(pod, 16, 2)?;
    }
    let mut rounds: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); paths.len()];
    for _ in 0..args.rounds {
        for ((name, pod), rounds) in paths.iter().zip(&mut rounds) {
            check_stop()?;
            let c16 = wrk(pod, 16, args.seconds)?;
            let c1 = wrk(pod, 1, args.seconds)?;
            eprintln!(
                "bench node:   {name:8} keep-alive c=16 {:.0} req/s; c=1 p50 {:.3} ms, p99 {:.3} ms",
                c16.rps, c1.p50_ms, c1.p99_ms
            );
            rounds.push((c16.rps, c1.p50_ms, c1.p99_ms));
        }
    }
    let medians: Vec<(f64, f64, f64)> = rounds
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|x| x.0)),
                median(r.iter().map(|x| x.1)),
                median(r.iter().map(|x| x.2)),
            )
        })
        .collect();
    let sidecar_rss = rss_mib(sidecar.pid())?;

    let gate = connect4_cost(&cluster, &pods[0], &direct_pod)?;
    let flood = match pods.get(1) {
        Some(flooder) => Some(flood(&cluster, &pods[0], flooder)?),
        None => None,
    };
    drop(sidecar);
    drop(upstream);
    let (node, side, direct) = (medians[0], medians[1], medians[2]);
    let pct = |v: &[f64], q: f64| -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1]
    };
    let rss_100 = if args.pods >= 100 {
        rss_pods
    } else {
        rss_first + per_pod_kib * 99.0 / 1024.0
    };
    Ok(json!({
        "pods": args.pods,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "node_agent_rss_idle_mib": rss_idle,
        "node_agent_rss_one_pod_mib": rss_first,
        "node_agent_rss_mib": rss_pods,
        "rss_per_added_pod_kib": per_pod_kib,
        "node_agent_rss_100_pods_mib": rss_100,
        "node_agent_parent_rss_idle_mib": parent_rss_idle,
        "node_agent_parent_rss_mib": parent_rss,
        "node_agent_parent_private_mib": parent_private,
        "rss_100_pods_is_projected": args.pods < 100,
        "enrollment_ms": {"p50": pct(&enroll_ms, 0.5), "p99": pct(&enroll_ms, 0.99), "max": pct(&enroll_ms, 1.0)},
        "sidecar_agent_rss_mib": sidecar_rss,
        "sidecars_rss_mib": sidecar_rss * args.pods as f64,
        "keepalive_c16_rps": {"node": node.0, "sidecar": side.0, "direct": direct.0},
        "c1_p50_ms": {"node": node.1, "sidecar": side.1, "direct": direct.1},
        "c1_p99_ms": {"node": node.2, "sidecar": side.2, "direct": direct.2},
        "added_p50_ms": {"node": node.1 - direct.1, "sidecar": side.1 - direct.1},
        "connect4_ns": {"enrolled": gate.0, "not_enrolled": gate.1},
        "flood": flood,
    }))
}

/// The victim's 400 sequential requests before and during a flood from
/// `flooder` (to an upstream of its own, so the agent is what it loads).
fn flood(cluster: &Cluster, victim: &NodePod, flooder: &NodePod) -> Result<Value, String> {
    const FLOOD_ADDR: &str = "169.254.171.34";
    check_stop()?;
    cluster.node.add_lo_addr(&format!("{FLOOD_ADDR}/32"));
    let mut upstream = cluster
        .node
        .command(test_bin("lattice-test-service"))
        .args(["--keep-alive", &format!("tcp:{FLOOD_ADDR}:80")])
        .spawn();
    upstream.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
    let url = format!("http://{LATTICE_V4}/fair");
    let before = sequential_gets(victim, &url, 400);
    let mut flood = flooder
        .command(test_bin("lattice-test-client"))
        .args(["flood", &format!("{FLOOD_ADDR}:80"), "1900", "100", "20"])
        .spawn();
    std::thread::sleep(Duration::from_secs(5));
    let during = sequential_gets(victim, &url, 400);
    let status = flood
        .wait_timeout(Duration::from_secs(60))
        .ok_or("the flood did not end")?;
    let out = flood.output(status);
    let requests: u64 = out
        .stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("requests=")?.parse().ok())
        .ok_or_else(|| format!("flood output:\n{out}"))?;
    if before.failed + during.failed + before.unsigned + during.unsigned > 0 {
        return Err(format!(
            "the victim's requests failed or went unsigned during the flood: \
             {} failed, {} unsigned",
            before.failed + during.failed,
            before.unsigned + during.unsigned
        ));
    }
    eprintln!(
        "bench node: flood: victim p50/p99 {:.2}/{:.2} ms before, {:.2}/{:.2} ms during \
         ({requests} flood requests)",
        before.p50_ms, before.p99_ms, during.p50_ms, during.p99_ms
    );
    Ok(json!({
        "victim_p50_ms_before": before.p50_ms,
        "victim_p99_ms_before": before.p99_ms,
        "victim_p50_ms": during.p50_ms,
        "victim_p99_ms": during.p99_ms,
        "flood_requests": requests,
    }))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_mib(pid: i32) -> Result<f64, String> {
    procfs::rss(pid)
        .map(procfs::mib)
        .map_err(|e| format!("/proc/{pid}/status: {e}"))
}

/// Memory `pid` alone maps (see [`procfs::private_memory`]): the node
/// agent's parent and worker run the same executable, and pages both map
/// are counted once on the node.
fn private_mib(pid: i32) -> Result<f64, String> {
    procfs::private_memory(pid)
        .map(procfs::mib)
        .map_err(|e| format!("/proc/{pid}/smaps_rollup: {e}"))
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// wrk (one thread, `c` keep-alive connections) from the pod's app.
fn wrk(pod: &NodePod, c: u32, seconds: u64) -> Result<Wrk, String> {
    let out = pod
        .command("wrk")
        .uid(1000)
        .args([
            "-t1",
            &format!("-c{c}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args([
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{LATTICE_V4}/bench"),
        ])
        .run(Duration::from_secs(seconds + 30));
    if !out.success() || out.stdout.contains("Non-2xx") {
        return Err(format!("wrk failed:\n{out}"));
    }
    let field = |prefix: &str| -> Result<f64, String> {
        let text = out
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .ok_or_else(|| format!("no {prefix:?} in wrk's output:\n{out}"))?
            .trim();
        parse_wrk_value(text).ok_or_else(|| format!("wrk value {text:?}"))
    };
    Ok(Wrk {
        rps: field("Requests/sec:")?,
        p50_ms: field("50%")?,
        p99_ms: field("99%")?,
    })
}

/// `1.23ms`, `456.00us`, `1.02s`, or a plain number (req/s), in ms.
fn parse_wrk_value(text: &str) -> Option<f64> {
    let (num, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (text, 1.0)
    };
    num.trim().parse::<f64>().ok().map(|v| v * factor)
}

/// ns per run of the connect4 program for connects from an enrolled pod
/// (redirected) and from one that is not (looked up, passed on), from the
/// kernel's BPF statistics (enabled for the measurement only).
fn connect4_cost(
    cluster: &Cluster,
    enrolled: &NodePod,
    other: &NodePod,
) -> Result<(f64, f64), String> {
    let stats = BpfStats::enable()?;
    let kubepods = cluster.node.cgroup_root().join("kubepods.slice");
    let progs = lattice_tests::bpftool::attached_program_ids(&kubepods);
    let id = progs
        .iter()
        .find(|(name, _)| name == "lattice_connect4")
        .map(|(_, id)| *id)
        .ok_or_else(|| {
            format!(
                "lattice_connect4 not attached to {}: {progs:?}",
                kubepods.display()
            )
        })?;
    let mut cost = Vec::new();
    for pod in [enrolled, other] {
        let before = lattice_tests::bpftool::prog_run_stats(id);
        let out = pod
            .command(test_bin("lattice-test-client"))
            .uid(1000)
            .args(["many-http", &format!("{LATTICE_V4}:80"), "2000"])
            .run(Duration::from_secs(120));
        if !out.success() {
            return Err(format!("connects for the BPF statistics failed:\n{out}"));
        }
        let after = lattice_tests::bpftool::prog_run_stats(id);
        let runs = after.1.saturating_sub(before.1).max(1);
        cost.push(after.0.saturating_sub(before.0) as f64 / runs as f64);
    }
    drop(stats);
    Ok((cost[0], cost[1]))
}

/// `kernel.bpf_stats_enabled` on, restored on drop.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self, String> {
        let before = fs::read_to_string(BPF_STATS).map_err(|e| format!("{BPF_STATS}: {e}"))?;
        fs::write(BPF_STATS, "1").map_err(|e| format!("{BPF_STATS}: {e}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.before.trim());
    }
}

fn markdown(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let pods = r["pods"].as_u64().unwrap_or(0);
    let projected = if r["rss_100_pods_is_projected"] == true {
        " (projected)"
    } else {
        ""
    };
    let mut out = String::new();
    out.push_str(&format!(
        "| node agent, {pods} pods | value |\n|---|--:|\n\
         | RSS, no pod | {:.1} MiB |\n| RSS, one pod | {:.1} MiB |\n| RSS, {pods} pods | {:.1} MiB |\n\
         | RSS per added pod | {:.0} KiB |\n| RSS, 100 pods{projected} | {:.1} MiB |\n\
         | {pods} sidecars' RSS ({:.1} MiB each) | {:.1} MiB |\n\
         | parent RSS, no pod / {pods} pods | {:.1} / {:.1} MiB |\n\
         | parent memory not shared with the worker, {pods} pods | {:.1} MiB |\n\
         | enrollment p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |\n\
         | connect4 per connect, enrolled / not enrolled | {:.0} / {:.0} ns |\n\n",
        f(&r["node_agent_rss_idle_mib"]),
        f(&r["node_agent_rss_one_pod_mib"]),
        f(&r["node_agent_rss_mib"]),
        f(&r["rss_per_added_pod_kib"]),
        f(&r["node_agent_rss_100_pods_mib"]),
        f(&r["sidecar_agent_rss_mib"]),
        f(&r["sidecars_rss_mib"]),
        f(&r["node_agent_parent_rss_idle_mib"]),
        f(&r["node_agent_parent_rss_mib"]),
        f(&r["node_agent_parent_private_mib"]),
        f(&r["enrollment_ms"]["p50"]),
        f(&r["enrollment_ms"]["p99"]),
        f(&r["enrollment_ms"]["max"]),
        f(&r["connect4_ns"]["enrolled"]),
        f(&r["connect4_ns"]["not_enrolled"]),
    ));
    if r["flood"].is_object() {
        out.push_str(&format!(
            "| one pod flooding the agent | value |\n|---|--:|\n\
             | another pod's 400 requests, p50 / p99, before the flood | {:.2} / {:.2} ms |\n\
             | the same during the flood ({} flood requests) | {:.2} / {:.2} ms |\n\n",
            f(&r["flood"]["victim_p50_ms_before"]),
            f(&r["flood"]["victim_p99_ms_before"]),
            r["flood"]["flood_requests"],
            f(&r["flood"]["victim_p50_ms"]),
            f(&r["flood"]["victim_p99_ms"]),
        ));
    }
    out.push_str("| path | keep-alive c=16 req/s | c=1 p50 ms | c=1 p99 ms | added p50 ms |\n|---|--:|--:|--:|--:|\n");
    for path in ["node", "sidecar", "direct"] {
        let added = r["added_p50_ms"]
            .get(path)
            .map_or("–".to_owned(), |v| format!("{:.3}", f(v)));
        out.push_str(&format!(
            "| {path} | {:.0} | {:.3} | {:.3} | {added} |\n",
            f(&r["keepalive_c16_rps"][path]),
            f(&r["c1_p50_ms"][path]),
            f(&r["c1_p99_ms"][path]),
        ));
    }
    out
}
