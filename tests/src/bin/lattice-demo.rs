//! `cargo xtask demo`: lattice's main job, end to end, on one machine and
//! with no AWS account.
//!
//! A demo pod (network namespace + cgroup v2) gets a Lattice-like service at
//! 169.254.171.33:80 that checks SigV4 signatures with botocore. The app's
//! plain `curl` is denied (403) until lattice-agent runs; then the same
//! `curl` is accepted (200) because the agent signed it on the way. The
//! credentials are fake demo ones, and every packet stays inside the demo
//! pod's network namespace.
//!
//! It is also an end-to-end check: any step that does not behave as told
//! ends the demo with a non-zero exit and the reason. Needs root.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use lattice_tests::{
    Agent, DEMO_CREDENTIALS, Pod, Verifier,
    agent::{agent_command, find_agent_bin},
    bpftool::attached_programs,
    verifier::{self, Received},
};

/// The app's UID: an ordinary user, intercepted.
const APP_UID: u32 = 1000;
/// The "Lattice service" address, on the demo pod's `lo`.
const SERVICE_ADDR: &str = "169.254.171.33";
/// What the app asks for.
const URL: &str = "http://169.254.171.33/orders?id=42";
const PROXY_PORT: &str = "15080";
const STEPS: usize = 7;
const T: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "lattice-demo: needs root: it creates a network namespace and a cgroup and \
             attaches eBPF programs (run `sudo -E cargo xtask demo`)"
        );
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nlattice-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: usize, text: &str) {
    println!("[{n}/{STEPS}] {text}");
}

fn evidence(text: &str) {
    for line in text.lines() {
        println!("{}", format!("      {line}").trim_end());
    }
}

fn run() -> Result<()> {
    let curl = find_curl()?;
    verifier::python().map_err(anyhow::Error::msg)?;
    let agent = find_agent_bin().map_err(anyhow::Error::msg)?;

    println!(
        "lattice demo: an app's plain HTTP call to a VPC Lattice service, signed on its way \
         out by lattice-agent.\nNo AWS account: fake demo credentials ({}); all traffic stays \
         inside a demo pod's network namespace.\n",
        DEMO_CREDENTIALS.access_key_id
    );

    // The pod lives in this block: its guard removes the netns and cgroup
    // (also on error or panic) before the leftovers are checked below.
    let (name, netns, cgroup, pids, result) = {
        let pod = Pod::new();
        step(
            1,
            &format!(
                "Create a demo pod: network namespace {} ({SERVICE_ADDR} on its lo), cgroup {}",
                pod.name(),
                pod.cgroup_path().display()
            ),
        );
        let mut pids = Vec::new();
        let result = story(&pod, &curl, &agent, &mut pids);
        (
            pod.name().to_owned(),
            pod.netns_path().to_owned(),
            pod.cgroup_path().to_owned(),
            pids,
            result,
        )
    };
    result?;

    let mut left = Vec::new();
    if netns.exists() || ip_netns_list()?.contains(&name) {
        left.push(format!("network namespace {name}"));
    }
    if cgroup.exists() {
        left.push(format!("cgroup {}", cgroup.display()));
    }
    for pid in pids {
        if Path::new(&format!("/proc/{pid}")).exists() {
            left.push(format!("process {pid}"));
        }
    }
    ensure!(left.is_empty(), "left behind: {}", left.join(", "));
    evidence(&format!(
        "removed network namespace {name} and cgroup {}; service and agent processes gone",
        cgroup.display()
    ));

    println!(
        "\nSummary: the app's unchanged `curl {URL}` was denied (403, unsigned) without \
         lattice and accepted (200) with it: lattice-agent redirected the connection with \
         eBPF, signed the request as {} for vpc-lattice-svcs, and sent it to the original \
         destination. Nothing was left behind.",
        DEMO_CREDENTIALS.access_key_id
    );
    Ok(())
}

/// Steps 2 to 7, inside the pod. `pids` collects the processes started, so
/// the caller can check they are gone.
fn story(pod: &Pod, curl: &Path, agent_bin: &Path, pids: &mut Vec<i32>) -> Result<()> {
    let creds = DEMO_CREDENTIALS;
    step(
        2,
        &format!(
            "Start a Lattice-like service at {SERVICE_ADDR}:80 in the pod: it recomputes each \
             request's SigV4 signature (botocore) and accepts only {} in {}",
            creds.access_key_id, creds.region
        ),
    );
    let verifier = Verifier::start(pod, SERVICE_ADDR, 80, &creds);
    pids.push(verifier.pid());

    step(
        3,
        &format!("Without lattice: the app (UID {APP_UID}, in the pod) runs `curl -sS -i {URL}`"),
    );
    let (status, status_line, body) = app_curl(pod, curl)?;
    evidence(&format!("{status_line}\n{body}"));
    ensure!(
        status == 403,
        "expected the service to deny the unsigned request with 403, got {status}"
    );
    ensure!(
        body.contains("AccessDeniedException"),
        "the 403 should come from the service (AccessDeniedException)"
    );
    let seen = verifier.wait_requests(1, T);
    ensure!(
        seen.len() == 1 && seen[0].status == 403 && seen[0].header("authorization").is_none(),
        "the service should have seen one unsigned request, saw: {seen:?}"
    );

    step(
        4,
        &format!(
            "Start lattice-agent for the pod's cgroup with the demo credentials: its eBPF \
             programs send the pod's connections to 169.254.171.0/24 to its signing proxy on \
             127.0.0.1:{PROXY_PORT} ({})",
            agent_bin.display()
        ),
    );
    let mut agent = Agent::spawn(&agent_command(
        pod,
        [
            "--log-signing",
            "--log-format",
            "json",
            "--proxy-port",
            PROXY_PORT,
        ],
    ));
    pids.push(agent.pid());
    let attached = attached_programs(pod.cgroup_path());
    ensure!(
        attached.len() == 4,
        "expected 4 programs on the pod cgroup, bpftool shows {attached:?}"
    );
    evidence(&format!(
        "attached to {}: {}",
        pod.cgroup_path().display(),
        attached
            .iter()
            .map(|(kind, name)| format!("{name} ({kind})"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    step(
        5,
        "With lattice: the app runs the very same curl, unchanged (no proxy setting, no SDK)",
    );
    let (status, status_line, body) = app_curl(pod, curl)?;
    ensure!(
        status == 200,
        "expected the signed request to be accepted with 200, got {status}: {body}"
    );
    // The body is the service's JSON echo of the request it verified.
    let echo: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("the 200 body is not the service's JSON echo: {body}"))?;
    ensure!(
        echo["access_key"] == creds.access_key_id && echo["path"] == "/orders",
        "the service accepted something else: {body}"
    );
    evidence(&format!(
        "{status_line}\nbody (the service's echo): path={} query={} access_key={} signed_headers={}",
        echo["path"], echo["query"], echo["access_key"], echo["signed_headers"]
    ));
    let seen = verifier.wait_requests(2, T);
    let signed = &seen[1];
    ensure!(
        signed.status == 200,
        "the service should have accepted the second request, saw: {signed:?}"
    );

    step(
        6,
        "What the service received from lattice-agent (signature redacted here and in every log):",
    );
    evidence(&signed_headers(signed)?);
    let log = agent.log();
    let (canonical, string_to_sign) = signing_trace(&log)
        .with_context(|| format!("--log-signing: the agent logged no signed request:\n{log}"))?;
    println!("      and what the agent logged with --log-signing:");
    evidence(&format!(
        "  canonical request:\n{}\n  string to sign:\n{}",
        indent(&canonical),
        indent(&string_to_sign)
    ));
    ensure!(
        !log.contains(creds.secret_access_key),
        "the agent's log contains the secret key"
    );

    step(7, "Stop the agent (SIGTERM) and remove the demo pod");
    let status = agent.stop();
    ensure!(
        status.success(),
        "agent exit on SIGTERM: {status}\n{}",
        agent.log()
    );
    let attached = attached_programs(pod.cgroup_path());
    ensure!(
        attached.is_empty(),
        "programs still attached after the agent stopped: {attached:?}"
    );
    evidence("agent stopped, programs detached");
    Ok(())
}

/// The app's curl, in the pod's netns and cgroup as UID 1000. Returns the
/// status, the status line and the body.
fn app_curl(pod: &Pod, curl: &Path) -> Result<(u16, String, String)> {
    // --noproxy: a proxy setting inherited from the host must not apply.
    let out = pod
        .command(curl)
        .uid(APP_UID)
        .args(["-sS", "-i", "--noproxy", "*", "--max-time", "10", URL])
        .run(T);
    ensure!(out.success(), "curl failed: {out}");
    let text = out.stdout.replace("\r\n", "\n");
    let (head, body) = text
        .split_once("\n\n")
        .with_context(|| format!("curl printed no HTTP response: {out}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {status_line:?}"))?;
    Ok((status, status_line.to_owned(), body.trim_end().to_owned()))
}

/// The signing headers of `req` as received (the verifier already cut the
/// signature and any token), checked against the demo identity.
fn signed_headers(req: &Received) -> Result<String> {
    let creds = DEMO_CREDENTIALS;
    let auth = req
        .header("authorization")
        .context("the accepted request has no Authorization header")?;
    ensure!(
        auth.starts_with("AWS4-HMAC-SHA256 ")
            && auth.contains(&creds.credential_prefix())
            && auth.contains(&creds.scope_suffix())
            && auth.ends_with("Signature=<redacted>"),
        "unexpected Authorization header: {auth}"
    );
    let mut lines = Vec::new();
    for name in [
        "host",
        "x-amz-date",
        "x-amz-content-sha256",
        "x-amz-security-token",
        "authorization",
    ] {
        if let Some(value) = req.header(name) {
            lines.push(format!("{name}: {value}"));
        }
    }
    if lines.len() < 4 {
        bail!("expected host, x-amz-date, x-amz-content-sha256 and authorization, got {req:?}");
    }
    Ok(lines.join("\n"))
}

/// Canonical request and string to sign of the agent's first `signed
/// request` log line (JSON log format).
fn signing_trace(log: &str) -> Option<(String, String)> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = v.get("fields").unwrap_or(&v);
        Some((
            fields.get("canonical_request")?.as_str()?.to_owned(),
            fields.get("string_to_sign")?.as_str()?.to_owned(),
        ))
    })
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn find_curl() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("curl"))
        .find(|p| p.is_file())
        .context("curl not found on PATH: install it (`cargo xtask setup` does)")
}

/// Names `ip netns list` shows.
fn ip_netns_list() -> Result<Vec<String>> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list`")?;
    ensure!(out.status.success(), "`ip netns list` failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}
