//! An upgrade upgrades: a node agent started over pins left by an agent
//! of another build makes the pinned links run its own programs, in one
//! step per link (the link stays, its program changes), carrying over
//! what must survive, under load from enrolled pods without one request
//! sent unsigned.
//!
//! The other build is the agent's own eBPF object with one instruction
//! of each program encoded another way (`lattice_tests::rebuild`): the
//! same behaviour, another kernel tag, as a build from changed sources
//! has. An older map layout is a map the test pins in place of the
//! agent's, laid out as an older agent's (CONFIG's 8-byte value before
//! the exempt cgroups were added; a gate with 8-byte values).
//!
//! What is checked comes from the kernel (bpftool) and from the traffic
//! (the botocore verifier answers 403 to anything unsigned).
//!
//! Needs root, the built agent and test binaries, the test venv.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lattice_common::names;
use lattice_tests::{
    Agent, Bpffs, DEMO_CREDENTIALS, Pod,
    agent::READY_LINE,
    bpftool::{
        attached_programs, map_create, map_keys_u64, map_update, pinned_link, pinned_map, prog_tag,
    },
    node::{NodePod, PodSpec},
    node_agent::{
        AgentStart, Cluster, NodeAgent, apply_irsa_pod, lattice_get, load_count, load_result,
        start_agent, start_load, sts_url, unsigned_requests,
    },
    rebuild::{rebuilt, swap_pinned_links},
    reliability::Record,
    require_root,
    time::monotonic_ns,
};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
const PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_SOCK_OPS,
    names::PROG_GETSOCKOPT,
];

/// Per pinned link: `(program, link id, program id, program tag)`, as
/// the kernel reports them.
fn links(pin_dir: &Path) -> Vec<(&'static str, u64, u64, String)> {
    PROGRAMS
        .iter()
        .map(|&name| {
            let (link, prog) = pinned_link(&pin_dir.join(format!("link_{name}")));
            (name, link, prog, prog_tag(prog))
        })
        .collect()
}

fn map_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("map_{name}"))
}

fn enrolled_pod(cluster: &Cluster, name: &str, n: usize) -> NodePod {
    let pod = cluster.node.add_pod(PodSpec::new("shop", name));
    apply_irsa_pod(cluster, &pod, "upgrade", n);
    pod
}

fn embedded_object() -> &'static [u8] {
    lattice_agent::bpf::EBPF_OBJECT
}

/// A rolling update from an agent whose pinned links run another build of
/// the programs (the DaemonSet rolls a new image out): the new agent
/// keeps each link and makes it run its own program (same link id, new
/// program, the embedded object's tag), reuses the maps (the gate keeps
/// its map and both pods), and under load on kept-alive and new
/// connections not one request fails or goes out unsigned. An agent
/// started over its own programs changes nothing.
#[test]
fn a_rolling_update_swaps_other_programs_in_the_pinned_links_under_load() {
    if !require_root("a_rolling_update_swaps_other_programs_in_the_pinned_links_under_load") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let pin_dir = cluster.pin_dir();
    let pods = [
        enrolled_pod(&cluster, "kept", 0),
        enrolled_pod(&cluster, "fresh", 1),
    ];
    let old = start_agent(&cluster, &[]);
    for pod in &pods {
        old.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    }
    let own = links(&pin_dir);
    let gate = pinned_map(&map_path(&pin_dir, names::ENROLLED_NETNS));
    let cookies = map_keys_u64(&map_path(&pin_dir, names::ENROLLED_NETNS));
    assert_eq!(cookies.len(), 2, "{cookies:?}");

    // The running agent's links now run another build of the programs.
    let other = swap_pinned_links(&rebuilt(embedded_object()), &pin_dir, &[]);
    let before = links(&pin_dir);
    for ((name, link, prog, tag), (_, own_link, _, own_tag)) in before.iter().zip(&own) {
        assert_eq!(link, own_link, "{name}: the link stays");
        assert_ne!(tag, own_tag, "{name}: the rebuilt program has another tag");
        assert!(other.contains(&(*name, *prog as u32)), "{name}: {other:?}");
    }
    assert_eq!(lattice_get(&pods[1], "/other-build").status, 200);

    let seconds = 8;
    let kept = start_load(&pods[0], "load-keepalive", seconds);
    let fresh = start_load(&pods[1], "load", seconds);
    std::thread::sleep(Duration::from_millis(1500));
    let new = start_agent(&cluster, &[]);
    old_stops(old, &new, &pods);
    let kept = load_result(kept, Duration::from_secs(seconds + 30));
    let fresh = load_result(fresh, Duration::from_secs(seconds + 30));

    let after = links(&pin_dir);
    for ((name, link, prog, tag), (_, old_link, old_prog, _)) in after.iter().zip(&before) {
        let own_tag = &own.iter().find(|l| l.0 == *name).unwrap().3;
        assert_eq!(link, old_link, "{name}: the same link\n{}", new.log());
        assert_ne!(prog, old_prog, "{name}: still the other build's program");
        assert_eq!(tag, own_tag, "{name}: runs the embedded program");
    }
    let kubepods = cluster.node.cgroup_root().join("kubepods.slice");
    assert_eq!(attached_programs(&kubepods).len(), 4, "attached once");
    assert_eq!(
        pinned_map(&map_path(&pin_dir, names::ENROLLED_NETNS)),
        gate,
        "the gate's map is reused"
    );
    assert_eq!(
        map_keys_u64(&map_path(&pin_dir, names::ENROLLED_NETNS)),
        cookies
    );
    let log = new.log();
    let failed = |s: &serde_json::Value| load_count(s, "failed") + load_count(s, "refused");
    let record = Record {
        id: "node-agent-upgrade-programs",
        fault: "node agent rolling update onto another build of the eBPF programs (the pinned links made to run the new programs in place)".into(),
        load: format!(
            "2 apps, back to back, {seconds} s: kept-alive connections; a new connection per request"
        ),
        attempted: load_count(&kept, "ok") + load_count(&fresh, "ok") + failed(&kept) + failed(&fresh),
        failed: failed(&kept) + failed(&fresh),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: None,
        notes: format!(
            "4 links kept (same ids), each running the new program; p99 {} µs (kept-alive) / {} µs (new connections)",
            kept["p99_us"], fresh["p99_us"]
        ),
    };
    record.save();
    assert!(
        log.contains("upgraded the pinned eBPF programs in place") && log.contains("code (tag"),
        "{log}"
    );
    assert_eq!(record.unsigned, 0, "unsigned requests");
    assert_eq!(
        record.failed, 0,
        "requests failed across the upgrade:\nkept-alive: {kept}\nnew connections: {fresh}\n{log}"
    );
    assert!(
        load_count(&kept, "ok") > 100 && load_count(&fresh, "ok") > 100,
        "too little load to mean anything: {kept} {fresh}"
    );

    // The same build again: nothing to swap.
    let same = start_agent(&cluster, &[]);
    old_stops(new, &same, &pods);
    assert_eq!(links(&pin_dir), after, "an agent of the same build swapped");
    assert!(
        same.log()
            .contains("the pinned programs are this agent's: reusing them"),
        "{}",
        same.log()
    );
}

/// A rolling update that also raises `--max-pods`: the gate is replaced
/// (its namespaces carried over) while the agent being replaced still
/// serves the pods from the gate it knows until it hands them over. Under
/// load on kept-alive and new connections not one request fails or goes
/// out unsigned, and the new, larger gate holds both pods.
#[test]
fn a_rolling_update_that_grows_the_gate_loses_no_request() {
    if !require_root("a_rolling_update_that_grows_the_gate_loses_no_request") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let gate_path = map_path(&cluster.pin_dir(), names::ENROLLED_NETNS);
    let pods = [
        enrolled_pod(&cluster, "grown-kept", 0),
        enrolled_pod(&cluster, "grown-fresh", 1),
    ];
    let old = start_agent(&cluster, &["--max-pods", "6"]);
    for pod in &pods {
        old.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    }
    let small = pinned_map(&gate_path);
    let cookies = map_keys_u64(&gate_path);
    assert_eq!((small.max_entries, cookies.len()), (6, 2), "{cookies:?}");

    let seconds = 8;
    let kept = start_load(&pods[0], "load-keepalive", seconds);
    let fresh = start_load(&pods[1], "load", seconds);
    std::thread::sleep(Duration::from_millis(1500));
    let new = start_agent(&cluster, &["--max-pods", "8"]);
    old_stops(old, &new, &pods);
    let kept = load_result(kept, Duration::from_secs(seconds + 30));
    let fresh = load_result(fresh, Duration::from_secs(seconds + 30));
    let failed = |s: &serde_json::Value| load_count(s, "failed") + load_count(s, "refused");
    let record = Record {
        id: "node-agent-upgrade-gate-replaced",
        fault: "node agent rolling update that replaces the gate (--max-pods raised): namespaces carried over, the agent being replaced serving until it hands over".into(),
        load: format!(
            "2 apps, back to back, {seconds} s: kept-alive connections; a new connection per request"
        ),
        attempted: load_count(&kept, "ok") + load_count(&fresh, "ok") + failed(&kept) + failed(&fresh),
        failed: failed(&kept) + failed(&fresh),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: None,
        notes: format!(
            "the gate replaced by one of 8 entries holding both pods; p99 {} µs (kept-alive) / {} µs (new connections)",
            kept["p99_us"], fresh["p99_us"]
        ),
    };
    record.save();

    let log = new.log();
    let grown = pinned_map(&gate_path);
    assert_eq!(grown.max_entries, 8, "{log}");
    assert_ne!(grown.id, small.id, "{log}");
    assert_eq!(map_keys_u64(&gate_path), cookies, "{log}");
    assert!(
        log.contains("ENROLLED_NETNS (was hash key 8 B value 4 B, 6 entries")
            && log.contains("gated_namespaces_carried=2"),
        "{log}"
    );
    assert_eq!(record.unsigned, 0, "unsigned requests");
    assert_eq!(
        record.failed, 0,
        "requests failed across the upgrade:\nkept-alive: {kept}\nnew connections: {fresh}\n{log}"
    );
    assert!(
        load_count(&kept, "ok") > 100 && load_count(&fresh, "ok") > 100,
        "too little load to mean anything: {kept} {fresh}"
    );
}

/// `new` took `pods` over from `old`, which then stops.
fn old_stops(mut old: NodeAgent, new: &NodeAgent, pods: &[NodePod]) {
    for pod in pods {
        let row = new.pod_row(pod.uid());
        assert_eq!(
            row.as_ref().and_then(|r| r["state"].as_str()),
            Some("enrolled"),
            "the new agent is ready without serving {}: {row:?}\n{}",
            pod.uid(),
            new.log()
        );
    }
    old.wait_log("a new agent took the pods over", ENROLL_TIMEOUT);
    let status = old.stop();
    assert!(status.success(), "old agent: {status}\n{}", old.log());
}

/// An agent restarted (after a crash, or into a new image) over pins an
/// older agent left, whose maps are laid out otherwise: CONFIG with its
/// older 8-byte value, and a gate with 8-byte values, which the pinned
/// links' programs read and which holds the enrolled pod's namespace. The
/// new agent starts, replaces both maps (the gate's namespaces carried
/// over before any program is swapped), makes the links run its own
/// programs, pins the new maps in place of the old, and serves the pod;
/// under load from the pod nothing goes out unsigned at any point (its
/// connects are refused while no agent serves it). A namespace the
/// replaced gate gains afterwards (what an older agent still running
/// beside would enroll) is gated too.
#[test]
fn an_agent_over_older_map_layouts_migrates_them_and_serves() {
    if !require_root("an_agent_over_older_map_layouts_migrates_them_and_serves") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let pin_dir = cluster.pin_dir();
    let pod = enrolled_pod(&cluster, "older", 0);
    let mut old = start_agent(&cluster, &[]);
    old.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&pod, "/before").status, 200);
    let own = links(&pin_dir);
    let cookies = map_keys_u64(&map_path(&pin_dir, names::ENROLLED_NETNS));
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    old.kill();

    // The older agent's gate: 8-byte values, the pod's namespace in it,
    // read by the programs the pinned links run (another build). A second
    // pin outside the pin directory keeps it after it is replaced, as an
    // older agent still running would.
    let bpffs = pin_dir.parent().expect("the pin directory's bpffs");
    let older_gate = bpffs.join("older_gate");
    map_create(&older_gate, "hash", 8, 8, 4096, names::ENROLLED_NETNS);
    for cookie in &cookies {
        map_update(&older_gate, &cookie.to_ne_bytes(), &1u64.to_ne_bytes());
    }
    let other = swap_pinned_links(
        &rebuilt(embedded_object()),
        &pin_dir,
        &[(names::ENROLLED_NETNS, older_gate.as_path())],
    );
    replace_pin(&older_gate, &map_path(&pin_dir, names::ENROLLED_NETNS));
    // The older CONFIG: proxy port 15080, gated by netns, exempt UID 101.
    let staged = pin_dir.join("older_config");
    map_create(&staged, "array", 4, 8, 1, names::CONFIG);
    let mut config = Vec::new();
    config.extend(15080u16.to_ne_bytes());
    config.extend(1u16.to_ne_bytes());
    config.extend(101u32.to_ne_bytes());
    map_update(&staged, &0u32.to_ne_bytes(), &config);
    std::fs::rename(&staged, map_path(&pin_dir, names::CONFIG)).expect("pin the older CONFIG");
    assert_eq!(pinned_map(&map_path(&pin_dir, names::CONFIG)).value_size, 8);
    // Nothing serves the pod, and its connects are still redirected.
    let reply = lattice_get(&pod, "/no-agent");
    assert_eq!(reply.status, 0, "{reply:?}");

    let load = start_load(&pod, "load", 6);
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    let started_ns = monotonic_ns();
    let new = start_agent(&cluster, &[]);
    let ready_ms = started.elapsed().as_millis();
    new.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);

    // What an older agent running beside would enroll meanwhile.
    let late = u64::MAX - 1;
    map_update(&older_gate, &late.to_ne_bytes(), &1u64.to_ne_bytes());
    let gate_path = map_path(&pin_dir, names::ENROLLED_NETNS);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !map_keys_u64(&gate_path).contains(&late) {
        assert!(
            Instant::now() < deadline,
            "a namespace the replaced gate gained is not gated\n{}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = load_result(load, Duration::from_secs(40));
    let recovered = result["recovered_ns"].as_u64().map(u128::from);
    let record = Record {
        id: "node-agent-restart-older-maps",
        fault: "node agent restarted over an older agent's pins (CONFIG and gate laid out otherwise): maps replaced, the gate carried over, the pinned links made to run the new programs".into(),
        load: "1 app, new connection per request, refused connects retried, 6 s".into(),
        attempted: load_count(&result, "ok")
            + load_count(&result, "failed")
            + load_count(&result, "refused"),
        failed: load_count(&result, "failed") + load_count(&result, "refused"),
        unsigned: unsigned_requests(&verifier),
        recovery_ms: recovered.map(|r| r.saturating_sub(started_ns) as f64 / 1e6),
        notes: format!(
            "connects refused while no agent served the pod ({} refusals); recovery counted from the new agent's start (ready after {ready_ms} ms) and includes the pod's re-enrollment",
            load_count(&result, "refused")
        ),
    };
    record.save();

    let log = new.log();
    let config = pinned_map(&map_path(&pin_dir, names::CONFIG));
    assert_eq!(config.value_size, 24, "CONFIG replaced\n{log}");
    let gate = pinned_map(&gate_path);
    assert_eq!(
        (gate.key_size, gate.value_size),
        (8, 4),
        "gate replaced\n{log}"
    );
    let mut gated = cookies.clone();
    gated.push(late);
    gated.sort_unstable();
    assert_eq!(
        map_keys_u64(&gate_path),
        gated,
        "the pod's namespace carried over"
    );
    for ((name, link, prog, tag), (_, own_link, _, own_tag)) in links(&pin_dir).iter().zip(&own) {
        assert_eq!(link, own_link, "{name}: the same link");
        assert!(
            !other.contains(&(*name, *prog as u32)),
            "{name} still runs the older programs"
        );
        assert_eq!(tag, own_tag, "{name}: runs the embedded program");
    }
    assert!(
        log.contains("upgraded the pinned eBPF programs in place")
            && log.contains("CONFIG (was array key 4 B value 8 B")
            && log.contains("ENROLLED_NETNS (was hash key 8 B value 8 B")
            && log.contains("gated_namespaces_carried=1"),
        "{log}"
    );
    assert!(
        !std::fs::read_dir(&pin_dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("new_")),
        "staged pins left behind"
    );
    assert_eq!(record.unsigned, 0, "unsigned requests: {result}");
    assert!(
        recovered.is_some() && load_count(&result, "ok") > 50,
        "the pod was not served again (agent ready after {ready_ms} ms): {result}\n{log}"
    );
    assert_eq!(lattice_get(&pod, "/after").status, 200, "{}", new.log());
}

/// Pins the map pinned at `from` at `to` too, replacing what is pinned
/// there in one step (bpffs renames replace).
fn replace_pin(from: &Path, to: &Path) {
    let staged = to.with_file_name("staged_pin");
    pin_again(from, &staged);
    std::fs::rename(&staged, to).expect("replace the pin");
}

/// Pins the map pinned at `from` at `to` too.
fn pin_again(from: &Path, to: &Path) {
    let id = pinned_map(from).id.to_string();
    let out = std::process::Command::new("bpftool")
        .args(["map", "pin", "id", &id])
        .arg(to)
        .output()
        .expect("bpftool map pin");
    assert!(
        out.status.success(),
        "bpftool map pin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--max-pods` raised on a node with pins: the pinned gate, too small,
/// is replaced by one of the new size with the enrolled pod's namespace
/// carried over, and the pod is served; lowered again, the larger gate is
/// kept (shrinking could not hold what it holds) and the agent says so.
#[test]
fn a_larger_max_pods_grows_the_pinned_gate_a_smaller_one_keeps_it() {
    if !require_root("a_larger_max_pods_grows_the_pinned_gate_a_smaller_one_keeps_it") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let gate_path = map_path(&cluster.pin_dir(), names::ENROLLED_NETNS);
    let pod = enrolled_pod(&cluster, "sized", 0);
    let mut agent = start_agent(&cluster, &["--max-pods", "6"]);
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let small = pinned_map(&gate_path);
    assert_eq!(small.max_entries, 6);
    let cookies = map_keys_u64(&gate_path);
    assert_eq!(cookies.len(), 1);
    agent.kill();

    let mut agent = start_agent(&cluster, &["--max-pods", "8"]);
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    let grown = pinned_map(&gate_path);
    assert_eq!(grown.max_entries, 8, "{}", agent.log());
    assert_ne!(grown.id, small.id);
    assert_eq!(map_keys_u64(&gate_path), cookies);
    assert!(
        agent
            .log()
            .contains("ENROLLED_NETNS (was hash key 8 B value 4 B, 6 entries"),
        "{}",
        agent.log()
    );
    assert_eq!(lattice_get(&pod, "/grown").status, 200, "{}", agent.log());
    agent.kill();

    let agent = start_agent(&cluster, &["--max-pods", "6"]);
    agent.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(pinned_map(&gate_path), grown, "the larger gate is kept");
    assert!(
        agent.log().contains("larger than --max-pods"),
        "{}",
        agent.log()
    );
    assert_eq!(lattice_get(&pod, "/kept").status, 200, "{}", agent.log());
}

/// During a rolling update the agent being replaced may still enroll a
/// pod (a CNI `ADD`) in the gate it knows after the new agent replaced
/// that gate: the new agent gates such a namespace from the moment it has
/// swapped the programs, not only once it has listed the pods (which a
/// slow API server delays; the stand-in holds the lists here). The gate is
/// replaced by a larger `--max-pods`; a second pin of the replaced gate
/// stands for the older agent's handle on it.
#[test]
fn a_namespace_enrolled_in_a_replaced_gate_is_gated_before_the_first_list() {
    if !require_root("a_namespace_enrolled_in_a_replaced_gate_is_gated_before_the_first_list") {
        return;
    }
    let cluster = Cluster::new();
    let _verifier = cluster.lattice_service(&[]);
    let pin_dir = cluster.pin_dir();
    let gate_path = map_path(&pin_dir, names::ENROLLED_NETNS);
    let pod = enrolled_pod(&cluster, "replaced-gate", 0);
    let mut old = start_agent(&cluster, &["--max-pods", "6"]);
    old.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    old.kill();
    let replaced = pin_dir.parent().expect("a bpffs").join("replaced_gate");
    pin_again(&gate_path, &replaced);

    let lists = cluster.api.hold_lists();
    let new = NodeAgent::start_until(
        &cluster,
        cluster.agent_command(["--max-pods", "8"]),
        &AgentStart {
            env: &[("AWS_ENDPOINT_URL_STS", &sts_url())],
            ..AgentStart::default()
        },
        "upgraded the pinned eBPF programs in place",
    );
    let late = u64::MAX - 2;
    map_update(&replaced, &late.to_ne_bytes(), &1u32.to_ne_bytes());
    let deadline = Instant::now() + Duration::from_secs(2);
    while !map_keys_u64(&gate_path).contains(&late) {
        assert!(
            Instant::now() < deadline,
            "a namespace the replaced gate gained is not gated before the first list\n{}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pinned_map(&gate_path).max_entries, 8, "{}", new.log());
    assert!(
        !new.log().contains(READY_LINE),
        "the agent listed the pods: the check proves nothing\n{}",
        new.log()
    );
    drop(lists);
    new.wait_pod(pod.uid(), Some("enrolled"), ENROLL_TIMEOUT);
    assert_eq!(lattice_get(&pod, "/after").status, 200, "{}", new.log());
}

/// `run --pin` (and the sidecar's `--pin`, the same attach) restarted
/// over another build's programs: the pinned links run the agent's own
/// programs again, the same links, and requests are signed before,
/// during and after.
#[test]
fn run_with_pins_swaps_other_programs_in_its_links_at_restart() {
    if !require_root("run_with_pins_swaps_other_programs_in_its_links_at_restart") {
        return;
    }
    let pod = Pod::new();
    let bpffs = Bpffs::new();
    let _service = pod.start_http_service();
    let args = [
        "--proxy-port".as_ref(),
        "15080".as_ref(),
        "--pin".as_ref(),
        bpffs.path().as_os_str(),
    ];
    let signed = |when: &str| {
        let out = pod
            .client(["http", "169.254.171.33:80"])
            .uid(1000)
            .run(Duration::from_secs(30));
        let credential = format!("credential={}/", DEMO_CREDENTIALS.access_key_id);
        assert!(
            out.success() && out.stdout.contains(&credential),
            "{when}: not signed by the agent: {out}"
        );
    };
    let mut agent = Agent::start(&pod, args);
    let own = links(bpffs.path());
    signed("own programs");
    let other = swap_pinned_links(&rebuilt(embedded_object()), bpffs.path(), &[]);
    signed("another build's programs");
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log());

    let agent = Agent::start(&pod, args);
    for ((name, link, prog, tag), (_, own_link, _, own_tag)) in links(bpffs.path()).iter().zip(&own)
    {
        assert_eq!(link, own_link, "{name}: the same link\n{}", agent.log());
        assert!(
            !other.contains(&(*name, *prog as u32)),
            "{name}: not swapped"
        );
        assert_eq!(tag, own_tag, "{name}: runs the embedded program");
    }
    assert_eq!(attached_programs(pod.cgroup_path()).len(), 4);
    assert!(
        agent
            .log()
            .contains("upgraded the pinned eBPF programs in place"),
        "{}",
        agent.log()
    );
    signed("after the restart");
}
