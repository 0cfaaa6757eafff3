//! Pod start: with lattice-cni chained after the node's CNI, the node agent
//! enrolls a pod while its sandbox is set up, so the app's very first
//! connect to VPC Lattice is signed (or refused), never sent unsigned.
//!
//! Pods start here as the kubelet and containerd start them: the pod is in
//! the API (Pending) and its projected token on disk; the runtime runs
//! `loopback`, then every plugin of the node's `.conflist` (Debian's
//! `bridge`, then lattice-cni as the agent chained it); the app runs and
//! calls Lattice at once; only then does the API show the pod Running.
//! The service is the botocore verifier on 169.254.171.33 in the node's
//! namespace, which answers 403 to anything unsigned.

use std::{collections::VecDeque, time::Duration};

use lattice_tests::{
    Bpffs,
    node::{NodePod, PodSpec, random_uuid},
    node_agent::{Cluster, IRSA_VOLUME, NodeAgent, PodObject, first_call, sts_url, unsigned_under},
    reliability::Record,
    require_root,
    verifier::Verifier,
};
use serde_json::Value;

const ROLE: &str = "arn:aws:iam::123456789012:role/start";
/// Pod starts with the plugin chained.
const STARTS: usize = 200;
/// Pod starts without it: what the plugin prevents must show here.
const CONTROL_STARTS: usize = 20;
/// Pods kept running at once; older ones are deleted (CNI DEL) as new ones
/// start, as a busy node's do.
const WINDOW: usize = 20;
/// A refused connect must come back at once, not after a timeout.
const REFUSED_FAST: Duration = Duration::from_millis(100);

/// What a set of pod starts saw.
#[derive(Debug, Default)]
struct Starts {
    signed: u64,
    refused: u64,
    /// Anything else: a reply other than 200, a reset, a timeout.
    failed: Vec<String>,
    slowest_refusal_us: u64,
    call_us: Vec<u64>,
}

impl Starts {
    fn attempted(&self) -> u64 {
        self.signed + self.refused + self.failed.len() as u64
    }

    fn p(&mut self, q: f64) -> f64 {
        self.call_us.sort_unstable();
        let n = self.call_us.len();
        if n == 0 {
            return 0.0;
        }
        self.call_us[((n as f64 * q).ceil() as usize).clamp(1, n) - 1] as f64 / 1e3
    }
}

/// Starts `count` annotated IRSA pods named `<prefix>-<i>`, each app
/// calling `/<prefix>/<i>` first thing.
fn start_pods(cluster: &Cluster, prefix: &str, count: usize) -> Starts {
    let mut starts = Starts::default();
    let mut running: VecDeque<(NodePod, String)> = VecDeque::new();
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        let uid = random_uuid();
        let object = |o: PodObject| {
            o.annotated()
                .service_account("start")
                .irsa_env(ROLE, "us-west-2")
        };
        cluster.apply(&object(PodObject::pending(
            "shop",
            &name,
            &uid,
            cluster.node.name(),
        )));
        let pod = cluster
            .node
            .add_pod(PodSpec::new("shop", &name).uid(&uid).projected(
                IRSA_VOLUME,
                "token",
                "token",
            ));
        let call = first_call(&pod, &format!("/{prefix}/{i}"));
        let total = call["total_us"].as_u64().unwrap_or_default();
        match (call["outcome"].as_str(), call["status"].as_u64()) {
            (Some("reply"), Some(200)) => {
                starts.signed += 1;
                starts.call_us.push(total);
            }
            (Some("refused"), _) => {
                starts.refused += 1;
                starts.slowest_refusal_us = starts.slowest_refusal_us.max(total);
            }
            _ => starts.failed.push(format!("{name}: {call}")),
        }
        // The kubelet reports the pod running after its containers started.
        cluster.apply(&object(PodObject::new(&pod, cluster.node.name())));
        running.push_back((pod, name));
        if running.len() > WINDOW {
            let (old, old_name) = running.pop_front().expect("a running pod");
            drop(old);
            cluster.api.delete_pod("shop", &old_name);
        }
    }
    starts
}

/// Requests under `/<prefix>/` the verifier refused as unsigned.
fn unsigned(verifier: &Verifier, prefix: &str) -> Vec<String> {
    unsigned_under(verifier, &format!("/{prefix}/"))
}

#[test]
fn pods_calling_lattice_at_their_first_instruction_are_never_unsigned() {
    if !require_root("pods_calling_lattice_at_their_first_instruction_are_never_unsigned") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let bpffs = Bpffs::new();
    let pin = bpffs.path().join("lattice-node");
    let pin_arg = pin.to_str().unwrap().to_owned();
    let sts = sts_url();
    let env = [("AWS_ENDPOINT_URL_STS", sts.as_str())];

    // Without the plugin: a pod is enrolled once the API shows it running,
    // too late for an app that calls at once.
    let mut agent = NodeAgent::start(&cluster, cluster.agent_command(["--pin", &pin_arg]), &env);
    let control = start_pods(&cluster, "control", CONTROL_STARTS);
    let control_unsigned = unsigned(&verifier, "control");
    agent.stop();

    let mut args = vec!["--pin".into(), pin_arg.clone().into()];
    args.extend(cluster.cni_args());
    let mut agent = NodeAgent::start(&cluster, cluster.agent_command(args), &env);
    let conflist = chained_conflist(&cluster);
    let mut with_plugin = start_pods(&cluster, "start", STARTS);
    let start_unsigned = unsigned(&verifier, "start");

    let record = Record {
        id: "pod-start",
        fault: "pod start: the app calls Lattice at its first instruction, before the API shows the pod running".into(),
        load: format!("{STARTS} pod starts (CNI chain loopback, bridge, lattice-cni), one call each"),
        attempted: with_plugin.attempted(),
        failed: with_plugin.refused + with_plugin.failed.len() as u64,
        unsigned: start_unsigned.len() as u64,
        recovery_ms: None,
        notes: format!(
            "first call p50 {:.1} ms / p99 {:.1} ms (includes fetching the pod's credentials); without the plugin {} of {CONTROL_STARTS} first calls left unsigned",
            with_plugin.p(0.5),
            with_plugin.p(0.99),
            control_unsigned.len(),
        ),
    };
    record.save();
    assert!(
        !control_unsigned.is_empty(),
        "without the plugin every first call was signed: the test no longer sees the race it guards against ({control:?})"
    );
    assert!(
        start_unsigned.is_empty(),
        "requests reached the service unsigned: {start_unsigned:?}\n{}",
        agent.log()
    );
    assert!(
        with_plugin.failed.is_empty(),
        "first calls neither signed nor refused: {:?}",
        with_plugin.failed
    );
    assert!(
        with_plugin.slowest_refusal_us < REFUSED_FAST.as_micros() as u64,
        "a refusal took {} µs",
        with_plugin.slowest_refusal_us
    );

    // An agent leaving for good (not in a DaemonSet here) takes the plugin
    // out of the chain.
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log());
    let after: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert!(
        !after.to_string().contains("lattice-cni"),
        "plugin left in {}: {after}",
        conflist.display()
    );
}

/// The node's configuration list, once the agent has chained the plugin
/// last in it.
fn chained_conflist(cluster: &Cluster) -> std::path::PathBuf {
    let file = cluster.node.cni_conflist().to_owned();
    let list: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let plugins = list["plugins"].as_array().expect("plugins");
    assert_eq!(
        plugins
            .iter()
            .map(|p| p["type"].clone())
            .collect::<Vec<_>>(),
        ["bridge", "lattice-cni"],
        "{list}"
    );
    assert!(cluster.node.cni_bin_dir().join("lattice-cni").is_file());
    file
}

/// The chain is kept and the plugin fails closed: the runtime rewriting its
/// configuration drops the plugin, and the agent chains it again; while no
/// agent serves the socket (killed: a crash leaves the chain as it is), a
/// pod's sandbox fails with an error naming the cause (failurePolicy
/// fail, the default) while pods of an exempt namespace (kube-system)
/// start; once an agent serves again, pods start enrolled.
#[test]
fn the_chain_is_kept_and_sandboxes_wait_for_the_agent() {
    if !require_root("the_chain_is_kept_and_sandboxes_wait_for_the_agent") {
        return;
    }
    let cluster = Cluster::new();
    let verifier = cluster.lattice_service(&[]);
    let sts = sts_url();
    let env = [("AWS_ENDPOINT_URL_STS", sts.as_str())];
    let start = || NodeAgent::start(&cluster, cluster.agent_command(cluster.cni_args()), &env);
    let mut agent = start();
    let conflist = chained_conflist(&cluster);

    // The primary CNI writes its file again, without the plugin.
    let mut list: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "lattice-cni");
    std::fs::write(&conflist, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    let rewritten = std::time::Instant::now();
    while !std::fs::read_to_string(&conflist)
        .unwrap()
        .contains("lattice-cni")
    {
        assert!(
            rewritten.elapsed() < Duration::from_secs(10),
            "the plugin was not chained again:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("chained again after {:?}", rewritten.elapsed());
    chained_conflist(&cluster);

    agent.kill();
    let err = match cluster.node.try_add_pod(PodSpec::new("shop", "no-agent-0")) {
        Ok(pod) => panic!("{} started while no agent served the plugin", pod.uid()),
        Err(e) => e,
    };
    assert!(
        err.contains("lattice node agent unreachable") && err.contains("failurePolicy fail"),
        "{err}"
    );
    let exempt = cluster
        .node
        .try_add_pod(PodSpec::new("kube-system", "dns-0"))
        .unwrap_or_else(|e| panic!("an exempt pod failed to start: {e}"));
    drop(exempt);

    let _agent = start();
    let back = start_pods(&cluster, "back", 3);
    assert!(back.failed.is_empty() && back.signed > 0, "{back:?}");
    assert!(unsigned(&verifier, "back").is_empty());
}

/// Run by a DaemonSet (`POD_NAME`, `POD_NAMESPACE` from the downward API),
/// an agent that exits keeps the plugin in the chain while its DaemonSet
/// stands (a restart or an upgrade: new pods wait for the next agent rather
/// than start un-intercepted), and takes it out once the DaemonSet is being
/// deleted (lattice uninstalled).
#[test]
fn the_plugin_leaves_the_chain_only_with_the_daemonset() {
    if !require_root("the_plugin_leaves_the_chain_only_with_the_daemonset") {
        return;
    }
    let cluster = Cluster::new();
    let daemonset = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": { "name": "lattice-agent", "namespace": "lattice-system" },
        "spec": { "selector": { "matchLabels": { "app": "lattice-agent" } } },
    });
    let ds = cluster.api.apply_daemonset(daemonset.clone());
    cluster.api.apply_pod(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "lattice-agent-x7k2p",
            "namespace": "lattice-system",
            "labels": { "app": "lattice-agent" },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "lattice-agent",
                "uid": ds["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": { "containers": [{ "name": "agent", "image": "lattice-agent" }] },
    }));
    let env = [
        ("POD_NAME", "lattice-agent-x7k2p"),
        ("POD_NAMESPACE", "lattice-system"),
    ];
    let start = || NodeAgent::start(&cluster, cluster.agent_command(cluster.cni_args()), &env);

    let mut agent = start();
    let conflist = chained_conflist(&cluster);
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(
        std::fs::read_to_string(&conflist)
            .unwrap()
            .contains("lattice-cni"),
        "the plugin left the chain while the DaemonSet stands:\n{}",
        agent.log()
    );

    let mut agent = start();
    chained_conflist(&cluster);
    let mut deleting = daemonset;
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
    cluster.api.apply_daemonset(deleting);
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log());
    let after = std::fs::read_to_string(&conflist).unwrap();
    assert!(
        !after.contains("lattice-cni"),
        "the plugin stayed after the DaemonSet went:\n{after}\n{}",
        agent.log()
    );
}
