//! Node mode's two processes under failure: the parent holds every pod's
//! listening sockets, so a worker that dies (SIGKILL, an OOM kill) loses
//! only the requests it was serving; connects wait in the listeners'
//! backlogs for the next worker, which serves them with their original
//! destinations. A pod started (CNI ADD) while no worker runs waits and
//! is enrolled by the next one; workers that keep dying make the parent
//! exit, leaving the programs pinned and connects refused.
//!
//! Pods are the test kit's node fixture; the service is the botocore
//! verifier on 169.254.171.33 in the node's namespace (403 to anything
//! unsigned), with moto's STS for the pods' IRSA roles. The agent is the
//! release build the image ships (`cargo xtask image`), as users deploy
//! it. Figures go to the README's "Reliability" table
//! (lattice_tests::reliability).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lattice_tests::{
    ChildGuard,
    agent::release_agent_bin,
    bpftool::attached_programs,
    node::{LATTICE_V4, NodePod, PodSpec, random_uuid},
    node_agent::{
        Cluster, IRSA_VOLUME, LATTICE_HOST, NodeAgent, PodObject, apply_irsa_pod, first_call,
        lattice_get, load_result, role_arn, start_agent_with, start_load_with, sts_url,
        unsigned_requests,
    },
    reliability::Record,
    require_root, test_bin,
    time::monotonic_ns,
};
use serde_json::Value;

/// These tests kill and starve the agent's workers under load, and one
/// times the recovery: they run one at a time, so that no test's load or
/// OOM flood slows another's agent.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// A worker must be serving again well within this.
const RESTART_TIMEOUT: Duration = Duration::from_secs(10);

/// `n` pods of the node, annotated, each with an IRSA role of its own.
fn irsa_pods(cluster: &Cluster, prefix: &str, n: usize) -> Vec<NodePod> {
    (0..n)
        .map(|i| {
            let pod = cluster
                .node
                .add_pod(PodSpec::new("shop", &format!("{prefix}{i}")));
            apply_irsa_pod(cluster, &pod, &format!("{prefix}{i}"), i);
            pod
        })
        .collect()
}

/// What one load client saw.
struct Load {
    name: String,
    result: Value,
}

impl Load {
    fn count(&self, key: &str) -> u64 {
        self.result[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {}", self.result))
    }

    fn times(&self, key: &str) -> Vec<u128> {
        self.result[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {}", self.result))
            .iter()
            .filter_map(|v| v.as_u64().map(u128::from))
            .collect()
    }

    /// Requests lost: failed, or sent again on a new connection.
    fn lost(&self) -> Vec<u128> {
        let mut lost = self.times("failed_ns");
        lost.extend(self.times("retried_ns"));
        lost.sort_unstable();
        lost
    }
}

/// Each pod's two apps for `seconds`, with their timelines: one on
/// kept-alive connections, one opening a connection per request.
fn start_loads(pods: &[NodePod], seconds: u64) -> Vec<(String, ChildGuard)> {
    pods.iter()
        .flat_map(|pod| {
            ["load-keepalive", "load"].map(|mode| {
                (
                    format!("{} {mode}", pod.name()),
                    start_load_with(pod, mode, seconds, &["timeline"]),
                )
            })
        })
        .collect()
}

fn finish(loads: Vec<(String, ChildGuard)>, timeout: Duration) -> Vec<Load> {
    loads
        .into_iter()
        .map(|(name, child)| Load {
            result: load_result(child, timeout),
            name,
        })
        .collect()
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// What the loads saw around each kill: the time from the kill to each
/// client's next 200, and the requests each lost.
struct AroundKills {
    /// Milliseconds, one per client and kill.
    to_served_ms: Vec<f64>,
    /// Requests lost within a kill's span, the most by one client in one.
    most_lost: usize,
    /// Requests lost outside every kill's span.
    stray: Vec<String>,
}

/// When `load` next got a 200 after `t` (a reply the dead worker wrote
/// before it died may be read just after: the next one is the new
/// worker's).
fn first_served_after(load: &Load, t: u128) -> u128 {
    load.times("ok_ns")
        .into_iter()
        .find(|ok| *ok > t + 2_000_000)
        .unwrap_or_else(|| panic!("{}: nothing served after {t}", load.name))
}

/// Each kill's span runs to the next kill (the last: to the loads' end).
fn around_kills(loads: &[Load], kills: &[u128]) -> AroundKills {
    let mut to_served_ms = Vec::new();
    let mut most_lost = 0;
    let mut stray = Vec::new();
    for load in loads {
        let lost = load.lost();
        for (i, &kill) in kills.iter().enumerate() {
            let end = kills.get(i + 1).copied().unwrap_or(u128::MAX);
            to_served_ms.push((first_served_after(load, kill) - kill) as f64 / 1e6);
            most_lost = most_lost.max(lost.iter().filter(|t| **t >= kill && **t < end).count());
        }
        stray.extend(
            lost.iter()
                .filter(|t| kills.first().is_none_or(|first| *t < first))
                .map(|t| format!("{}: lost a request at {t} ns, before any kill", load.name)),
        );
    }
    AroundKills {
        to_served_ms,
        most_lost,
        stray,
    }
}

/// SIGKILL the worker 5 times under load from 10 enrolled pods, each with
/// an app on kept-alive connections and an app opening a connection per
/// request: no connect is refused, nothing goes out unsigned, and the only
/// requests lost are those in flight on the killed worker (at most one
/// per app per kill); the next request is served within 250 ms of the
/// kill (p99). The release agent, as users deploy it.
#[test]
fn a_killed_worker_loses_only_its_in_flight_requests() {
    if !require_root("a_killed_worker_loses_only_its_in_flight_requests") {
        return;
    }
    let _one_at_a_time = one_at_a_time();
    const PODS: usize = 10;
    const KILLS: usize = 5;
    const SERVING_BETWEEN: Duration = Duration::from_millis(1500);
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let pods = irsa_pods(&cluster, "w", PODS);
    let agent = start_agent_with(&cluster, &release_agent_bin(), &[]);
    for pod in &pods {
        agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    }
    let mut worker = agent.wait_worker(None, RESTART_TIMEOUT);

    let seconds = 4 + 2 * KILLS as u64;
    let loads = start_loads(&pods, seconds);
    std::thread::sleep(Duration::from_secs(2));
    let mut kills = Vec::new();
    let mut restarts_ms = Vec::new();
    for _ in 0..KILLS {
        let dead = worker;
        let killed = Instant::now();
        kills.push(monotonic_ns());
        // SAFETY: kill(2) on the agent's worker.
        unsafe { libc::kill(dead, libc::SIGKILL) };
        worker = agent.wait_worker(Some(dead), RESTART_TIMEOUT);
        restarts_ms.push(killed.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(SERVING_BETWEEN);
    }
    let loads = finish(loads, Duration::from_secs(seconds + 30));
    let total = |key: &str| loads.iter().map(|l| l.count(key)).sum::<u64>();
    let around = around_kills(&loads, &kills);
    let p = |q| percentile(&around.to_served_ms, q);
    let record = Record {
        id: "node-worker-sigkill",
        fault: format!(
            "worker SIGKILL ({KILLS}×): the node agent's worker killed under load, its parent holding the pods' sockets"
        ),
        load: format!(
            "{PODS} pods, each an app on kept-alive connections and an app opening a connection per request, back to back, {seconds} s"
        ),
        attempted: total("ok") + total("failed") + total("refused"),
        failed: total("failed") + total("refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: Some(p(0.99)),
        notes: format!(
            "lost only requests in flight on the killed worker: {} failed, {} sent again on a new \
             connection by the kept-alive apps (at most {} per app per kill); 0 refused; kill to the \
             next served request p50 {:.0} / p99 {:.0} / max {:.0} ms (release agent); next worker \
             serving {:.0}-{:.0} ms after the kill",
            total("failed"),
            total("retried"),
            around.most_lost,
            p(0.5),
            p(0.99),
            p(1.0),
            restarts_ms.iter().copied().fold(f64::INFINITY, f64::min),
            restarts_ms.iter().copied().fold(0.0, f64::max),
        ),
    };
    record.save();
    assert_eq!(record.unsigned, 0, "unsigned requests reached the service");
    assert_eq!(
        total("refused"),
        0,
        "connects refused while a worker restarted:\n{}",
        agent.log()
    );
    assert!(around.stray.is_empty(), "{:?}", around.stray);
    assert!(
        around.most_lost <= 1,
        "an app lost {} requests to one kill (only the one in flight may be lost)",
        around.most_lost
    );
    assert!(
        p(0.99) <= 250.0,
        "kill to the next served request: p99 {:.0} ms ({:?})\n{}",
        p(0.99),
        around.to_served_ms,
        agent.log()
    );
    for load in &loads {
        assert!(load.count("ok") > 50, "{}: {}", load.name, load.result);
    }
}

/// A pod whose sandbox starts while no worker runs (here the parent is
/// held stopped for 2 s after its worker was killed): the CNI plugin's ADD
/// waits in the CNI socket's backlog, the next worker answers it, the pod
/// is enrolled and its app's first call is signed; the sandbox is not
/// failed.
#[test]
fn a_pod_started_while_no_worker_runs_is_enrolled_by_the_next() {
    if !require_root("a_pod_started_while_no_worker_runs_is_enrolled_by_the_next") {
        return;
    }
    let _one_at_a_time = one_at_a_time();
    const DOWN: Duration = Duration::from_secs(2);
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let agent = NodeAgent::start(
        &cluster,
        cluster.agent_command_with(release_agent_bin(), cluster.cni_args()),
        &[("AWS_ENDPOINT_URL_STS", &sts_url())],
    );
    let worker = agent.wait_worker(None, RESTART_TIMEOUT);

    let (name, uid) = ("late-0", random_uuid());
    let object = |o: PodObject| {
        o.annotated()
            .service_account("late")
            .irsa_env(&role_arn("late"), "us-west-2")
    };
    cluster.apply(&object(PodObject::pending(
        "shop",
        name,
        &uid,
        cluster.node.name(),
    )));
    // No worker, and none started for DOWN.
    let parent = agent.pid();
    // SAFETY: kill(2) on the agent's own processes.
    unsafe { libc::kill(parent, libc::SIGSTOP) };
    agent.kill_worker();
    lattice_tests::node_agent::wait_gone(worker, Duration::from_secs(5));
    let resume = std::thread::spawn(move || {
        std::thread::sleep(DOWN);
        // SAFETY: as above.
        unsafe { libc::kill(parent, libc::SIGCONT) };
        Instant::now()
    });
    let started = Instant::now();
    // The runtime's CNI ADD, on the test's own thread (the pod's
    // processes die with the thread that started them).
    let pod = cluster
        .node
        .try_add_pod(
            PodSpec::new("shop", name)
                .uid(&uid)
                .projected(IRSA_VOLUME, "token", "token"),
        );
    let added = started.elapsed();
    let resumed = resume.join().unwrap();
    let pod = pod.unwrap_or_else(|e| panic!("the sandbox failed: {e}\n{}", agent.log()));
    assert!(
        added >= DOWN,
        "the ADD was answered after {added:?}, while no worker ran?\n{}",
        agent.log()
    );
    let new = agent.wait_worker(Some(worker), RESTART_TIMEOUT);
    assert_ne!(new, worker);
    let row = agent.wait_pod(&uid, Some("enrolled"), ENROLL_TIMEOUT);
    let call = first_call(&pod, "/late");
    assert_eq!(
        (call["outcome"].as_str(), call["status"].as_u64()),
        (Some("reply"), Some(200)),
        "{call}\n{row:?}\n{}",
        agent.log()
    );
    assert_eq!(unsigned_requests(&verifier), 0);
    eprintln!(
        "CNI ADD answered {added:?} after it was sent, {:?} after the parent went on",
        (started + added).saturating_duration_since(resumed)
    );
}

/// Workers that keep dying (here each one is killed as soon as it
/// appears): the parent backs off, then exits after --worker-crash-limit
/// deaths so the kubelet restarts the agent with its own back-off; the
/// programs stay pinned and the pod's Lattice connects are refused, never
/// sent unsigned; the agent started next takes over and serves again.
#[test]
fn a_worker_crash_loop_makes_the_agent_exit_failing_closed() {
    if !require_root("a_worker_crash_loop_makes_the_agent_exit_failing_closed") {
        return;
    }
    let _one_at_a_time = one_at_a_time();
    const LIMIT: usize = 5;
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let pod = irsa_pods(&cluster, "loop", 1).remove(0);
    let agent_bin = release_agent_bin();
    let limit = LIMIT.to_string();
    let mut agent = start_agent_with(&cluster, &agent_bin, &["--worker-crash-limit", &limit]);
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let kubepods = cluster.node.cgroup_root().join("kubepods.slice");
    let attached = attached_programs(&kubepods);
    let load = pod
        .command(test_bin("lattice-test-client"))
        .uid(1000)
        .args(["load", &format!("{LATTICE_V4}:80"), "12", LATTICE_HOST])
        .spawn();
    std::thread::sleep(Duration::from_millis(500));

    let looping = Instant::now();
    let mut killed = Vec::new();
    let status = loop {
        if let Some(status) = agent.wait_exit(Duration::ZERO) {
            break status;
        }
        if let Some(pid) = agent.worker_pid()
            && !killed.contains(&pid)
        {
            // SAFETY: kill(2) on the agent's worker.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
        assert!(
            looping.elapsed() < Duration::from_secs(60),
            "the agent still runs after {} worker deaths:\n{}",
            killed.len(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let gave_up_after = looping.elapsed();
    assert!(!status.success(), "{status}\n{}", agent.log());
    assert_eq!(killed.len(), LIMIT, "{}", agent.log());
    assert!(
        agent
            .log()
            .contains(&format!("the worker died {LIMIT} times within 60s")),
        "{}",
        agent.log()
    );
    assert_eq!(
        attached_programs(&kubepods),
        attached,
        "the programs stay attached"
    );
    for pin in ["link_lattice_connect4", "map_ENROLLED_NETNS"] {
        assert!(cluster.pin_dir().join(pin).exists(), "{pin} not pinned");
    }
    let call = first_call(&pod, "/gone");
    assert_eq!(call["outcome"], "refused", "{call}");

    // The kubelet starts the container again.
    let restarted = monotonic_ns();
    let agent = start_agent_with(&cluster, &agent_bin, &["--worker-crash-limit", &limit]);
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&pod, "/back").status, 200, "{}", agent.log());
    let result = finish(vec![("load".to_owned(), load)], Duration::from_secs(40)).remove(0);
    let recovered = result.result["recovered_ns"].as_u64().map(u128::from);
    let record = Record {
        id: "node-worker-crash-loop",
        fault: format!(
            "worker crash loop: each worker killed as it starts; the agent exits after {LIMIT} deaths (--worker-crash-limit {LIMIT}), restarted 0 s later"
        ),
        load: "1 app, new connection per request, back to back, 12 s".into(),
        attempted: result.count("ok") + result.count("failed") + result.count("refused"),
        failed: result.count("failed") + result.count("refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: recovered.map(|r| (r.saturating_sub(restarted)) as f64 / 1e6),
        notes: format!(
            "the agent exited {:.1} s after the first death (back-off 100 ms doubling); connects waited \
             in the listener's backlog while it backed off and were refused once it exited ({} refusals); \
             recovery counted from the next agent's start",
            gave_up_after.as_secs_f64(),
            result.count("refused")
        ),
    };
    record.save();
    assert_eq!(record.unsigned, 0, "unsigned requests reached the service");
    assert!(recovered.is_some(), "never recovered: {}", result.result);
}

/// The worker killed by the kernel's OOM killer (a memory limit on a
/// memory cgroup of its own, see [`MemoryLimit`], then connections it must
/// allocate for) is replaced as a SIGKILLed one is: no connect refused,
/// nothing unsigned, only in-flight requests lost.
#[test]
fn an_oom_killed_worker_is_replaced_like_a_killed_one() {
    if !require_root("an_oom_killed_worker_is_replaced_like_a_killed_one") {
        return;
    }
    let _one_at_a_time = one_at_a_time();
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let pods = irsa_pods(&cluster, "oom", 2);
    let agent = start_agent_with(&cluster, &release_agent_bin(), &[]);
    for pod in &pods {
        agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    }
    let worker = agent.wait_worker(None, RESTART_TIMEOUT);
    let seconds = 8;
    let loads = start_loads(&pods, seconds);
    std::thread::sleep(Duration::from_secs(1));

    let memcg = MemoryLimit::confine(worker);
    let limited = monotonic_ns();
    // Connections the worker must allocate for, until it is killed.
    let flood = pods[0]
        .command(test_bin("lattice-test-client"))
        .uid(1000)
        .args(["flood", &format!("{LATTICE_V4}:80"), "200", "50", "2"])
        .spawn();
    lattice_tests::node_agent::wait_gone(worker, Duration::from_secs(20));
    let died = monotonic_ns();
    let new = agent.wait_worker(Some(worker), RESTART_TIMEOUT);
    let ooms = memcg.oom_kills();
    drop(flood);
    assert!(ooms >= 1, "the worker died, but not by the OOM killer");
    assert!(
        agent.log().contains("worker died") && agent.log().contains("killed by SIGKILL"),
        "{}",
        agent.log()
    );
    drop(memcg);
    assert_ne!(new, worker);

    let loads = finish(loads, Duration::from_secs(seconds + 30));
    let total = |key: &str| loads.iter().map(|l| l.count(key)).sum::<u64>();
    // Losses from the limit on; the next 200s from the death.
    let around = around_kills(&loads, &[limited]);
    let to_served_ms: Vec<f64> = loads
        .iter()
        .map(|l| (first_served_after(l, died) - died) as f64 / 1e6)
        .collect();
    let record = Record {
        id: "node-worker-oom",
        fault:
            "worker OOM kill: a memory limit on the worker's memory cgroup, then 250 connections"
                .into(),
        load: format!(
            "2 pods, each an app on kept-alive connections and an app opening a connection per request, back to back, {seconds} s"
        ),
        attempted: total("ok") + total("failed") + total("refused"),
        failed: total("failed") + total("refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: Some(percentile(&to_served_ms, 1.0)),
        notes: format!(
            "{} OOM kill(s) in the worker's memory cgroup; {} failed, {} sent again on a new \
             connection (in flight on the killed worker); 0 refused; the death to each app's next \
             200 at most {:.0} ms",
            ooms,
            total("failed"),
            total("retried"),
            percentile(&to_served_ms, 1.0),
        ),
    };
    record.save();
    assert_eq!(record.unsigned, 0);
    assert_eq!(total("refused"), 0, "{}", agent.log());
    assert!(
        around.most_lost <= 1 && around.stray.is_empty(),
        "lost {} in one span; {:?}",
        around.most_lost,
        around.stray
    );
}

/// A cgroup v1 memory cgroup of the worker's own, below the one it is in,
/// with a small limit: the kernel's OOM killer kills the worker when it
/// charges more, and its cgroup v2 membership (by which the programs
/// exempt it) stays as it is. Needs the v1 memory controller (mounted at
/// /sys/fs/cgroup/memory, as on the machines the tests run on: their
/// cgroup v2 hierarchy has no memory controller). Removed on drop.
struct MemoryLimit {
    dir: PathBuf,
}

impl MemoryLimit {
    /// Room for a few pages the worker touches anew.
    const LIMIT: &str = "262144";

    fn confine(pid: i32) -> Self {
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let own = cgroup
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then(|| path.to_owned())
            })
            .unwrap_or_else(|| {
                panic!(
                    "no cgroup v1 memory controller on this machine: the OOM kill cannot be \
                     staged ({cgroup})"
                )
            });
        let dir = Path::new("/sys/fs/cgroup/memory")
            .join(own.trim_start_matches('/'))
            .join(format!(
                "lattice-oom-{}-{}",
                std::process::id(),
                random_uuid()
            ));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let limit = Self { dir };
        fs::write(limit.dir.join("memory.limit_in_bytes"), Self::LIMIT).unwrap();
        fs::write(limit.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        limit
    }

    /// OOM kills in the cgroup so far.
    fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.dir.join("memory.oom_control"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
