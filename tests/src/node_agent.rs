//! `lattice-agent node` on a test [`Node`], and the API objects of its pods.
//!
//! A [`Cluster`] is a node plus the Kubernetes API stand-in, listening on
//! the node's loopback (the agent reaches it as a DaemonSet pod reaches the
//! API server), and a bpffs of its own where its agents pin (as the
//! DaemonSet's do on the node's). [`NodeAgent`] runs the real agent binary
//! in the node's network namespace (outside every pod's cgroup unless
//! placed in one, see [`Cluster::agent_container_cgroup`]), as root with a
//! cleared environment: it must find every pod's identity in the pod,
//! never in its own environment. [`PodObject`] builds the pod as the API shows it: the
//! agent-inject annotation, and the environment and projected volumes the
//! EKS IRSA and Pod Identity webhooks add.

use std::{
    ffi::{OsStr, OsString},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    agent::agent_bin,
    apiserver::ApiServer,
    bpffs::Bpffs,
    node::{Node, NodePod},
    random::{random_hex, random_uuid},
    spawn::{ChildGuard, Output, PodCommand, Stream},
};

/// The annotation (and namespace label) that asks for signing.
pub const INJECT: &str = "vpc-lattices-svcs.amazonaws.com/agent-inject";
/// The agent's admin listener in the node's namespace (its default).
/// The first agent's admin port on the node's loopback; each agent started
/// in a test process gets the next one, so an agent and its replacement
/// (both in the node's namespace here, in pods of their own on a real
/// node) each answer for themselves.
const FIRST_ADMIN_PORT: u16 = 15090;
static NEXT_ADMIN_PORT: std::sync::atomic::AtomicU16 =
    std::sync::atomic::AtomicU16::new(FIRST_ADMIN_PORT);
/// Logged once the first lists from the API are in.
pub const READY_LINE: &str = "lattice-agent ready (node mode)";
/// The application's UID: neither root nor the exempt UID 101.
pub const APP_UID: u32 = 1000;
/// Where the IRSA webhook mounts the web identity token, and its volume.
pub const IRSA_TOKEN_DIR: &str = "/var/run/secrets/eks.amazonaws.com/serviceaccount";
pub const IRSA_VOLUME: &str = "aws-iam-token";
/// Where the Pod Identity webhook mounts its token, and its volume.
pub const POD_IDENTITY_TOKEN_DIR: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount";
pub const POD_IDENTITY_VOLUME: &str = "eks-pod-identity-token";
pub const POD_IDENTITY_TOKEN_FILE: &str = "eks-pod-identity-token";

/// What the node agent starts with (deploy/node's `capabilities.add`, as
/// root): measured by tests/tests/node_privilege.rs, each one needed.
/// CAP_SYS_ADMIN, which `setns` needs anyway, also stands in for CAP_BPF
/// and CAP_NET_ADMIN when loading and attaching the programs.
pub const NODE_START_CAPS: [&str; 5] = [
    "sys_admin",
    "sys_ptrace",
    "dac_read_search",
    "setuid",
    "setgid",
];
/// What it keeps once it runs as UID 101, to serve pods that arrive later.
pub const NODE_KEPT_CAPS: [&str; 3] = ["sys_admin", "sys_ptrace", "dac_read_search"];
/// Added to both sets when it chains the CNI plugin (deploy/node does):
/// putting the plugin back into the runtime's root-owned configuration
/// whenever the node's CNI rewrites it, as UID 101, and giving the new
/// file back to its owner.
pub const NODE_CNI_CAPS: [&str; 2] = ["dac_override", "chown"];

/// moto's STS, on the node's loopback, served by the Lattice-like service
/// ([`Cluster::lattice_service`]).
pub const MOTO_PORT: &str = "5000";

/// `AWS_ENDPOINT_URL_STS` for node agents: moto's STS on the node's
/// loopback.
pub fn sts_url() -> String {
    format!("http://127.0.0.1:{MOTO_PORT}")
}

/// The Host the tests' requests to the VPC Lattice service carry.
pub const LATTICE_HOST: &str = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws";
/// The region test pods sign for.
pub const REGION: &str = "us-west-2";

/// An IAM role moto's STS lets a pod assume.
pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::123456789012:role/{name}")
}

/// A web identity token as the kubelet projects it (moto does not check
/// it); `n` tells pods' tokens apart.
pub fn irsa_token(n: usize) -> String {
    format!("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6{n}In0.c2ln")
}

/// `lattice-agent node` on `cluster` with `args`, its STS moto's.
pub fn start_agent(cluster: &Cluster, args: &[&str]) -> NodeAgent {
    start_agent_with(cluster, &agent_bin(), args)
}

/// [`start_agent`] with another agent binary (e.g.
/// [`crate::agent::release_agent_bin`] for timed tests).
pub fn start_agent_with(cluster: &Cluster, binary: &Path, args: &[&str]) -> NodeAgent {
    NodeAgent::start(
        cluster,
        cluster.agent_command_with(binary, args),
        &[("AWS_ENDPOINT_URL_STS", &sts_url())],
    )
}

/// `pod` as the API shows it, annotated, with IRSA for service account
/// `sa` (role `sa`, token `n`, [`REGION`]); not applied yet.
pub fn irsa_pod(cluster: &Cluster, pod: &NodePod, sa: &str, n: usize) -> PodObject {
    PodObject::new(pod, cluster.node.name())
        .annotated()
        .service_account(sa)
        .irsa(pod, &role_arn(sa), REGION, &irsa_token(n))
}

/// [`irsa_pod`], applied; returns its object.
pub fn apply_irsa_pod(cluster: &Cluster, pod: &NodePod, sa: &str, n: usize) -> PodObject {
    let obj = irsa_pod(cluster, pod, sa, n);
    cluster.apply(&obj);
    obj
}

/// An app's load on the VPC Lattice service from `pod`, as UID 1000, for
/// `seconds`: `lattice-test-client MODE`, `load` (a new connection per
/// request, back to back, refused connects retried) or `load-keepalive`.
/// Its summary comes from [`load_result`].
pub fn start_load(pod: &NodePod, mode: &str, seconds: u64) -> ChildGuard {
    start_load_with(pod, mode, seconds, &[])
}

/// [`start_load`] with `extra` arguments after the client's own (e.g.
/// `timeline`: the times of each failure and recovery).
pub fn start_load_with(pod: &NodePod, mode: &str, seconds: u64, extra: &[&str]) -> ChildGuard {
    pod.command(crate::pod::test_bin("lattice-test-client"))
        .uid(1000)
        .args([
            mode,
            &format!("{}:80", crate::node::LATTICE_V4),
            &seconds.to_string(),
            LATTICE_HOST,
        ])
        .args(extra)
        .spawn()
}

/// The app's first call to the VPC Lattice service from `pod`
/// (`lattice-test-client first-call`, as UID 1000, `Host:`
/// [`LATTICE_HOST`]): a new connection and one GET of `path`, timed; its
/// JSON (`outcome`: `reply`, `refused`...; `status`, `total_us`).
pub fn first_call(pod: &NodePod, path: &str) -> Value {
    let out = pod
        .command(crate::pod::test_bin("lattice-test-client"))
        .uid(1000)
        .args([
            "first-call",
            &format!("{}:80", crate::node::LATTICE_V4),
            LATTICE_HOST,
            path,
        ])
        .run(Duration::from_secs(30));
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{}: first-call output ({e}): {out}", pod.name()))
}

/// The summary a load prints when it ends (`ok`, `failed`, `refused`,
/// `recovered_ns`, ...); panics, naming the load, if it does not end
/// within `timeout` or fails.
pub fn load_result(mut load: ChildGuard, timeout: Duration) -> Value {
    let name = load.name().to_owned();
    let status = load
        .wait_timeout(timeout)
        .unwrap_or_else(|| panic!("{name}: the load did not end"));
    let out = load.output(status);
    assert!(out.success(), "{name}: {out}");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{name}: load output ({e}): {out}"))
}

/// A counter of a load's summary.
pub fn load_count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {summary}"))
}

/// Requests the service refused because they were not signed (each one
/// printed).
pub fn unsigned_requests(verifier: &crate::verifier::Verifier) -> u64 {
    let refused = unsigned_under(verifier, "/");
    for r in &refused {
        eprintln!("not accepted: {r}");
    }
    refused.len() as u64
}

/// The requests with a path under `prefix` that the service refused
/// because they were not signed, as the verifier recorded them.
pub fn unsigned_under(verifier: &crate::verifier::Verifier, prefix: &str) -> Vec<String> {
    verifier
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(prefix) && r.status != 200)
        .map(|r| format!("{r:?}"))
        .collect()
}

/// The app's GET of `path` on the VPC Lattice service, from `pod`.
pub fn lattice_get(pod: &NodePod, path: &str) -> AppReply {
    app_request(
        pod,
        &[
            "-H",
            &format!("Host: {LATTICE_HOST}"),
            &format!("http://{}{path}", crate::node::LATTICE_V4),
        ],
    )
}

/// A node and the API stand-in, reachable on the node's loopback.
pub struct Cluster {
    // Dropped first: the stand-in's listener lives in the node's netns.
    pub api: ApiServer,
    pub node: Node,
    kubeconfig: PathBuf,
    /// The agents' shared `--run-dir` (their control socket).
    run_dir: PathBuf,
    /// The node's bpffs: agents pin under it (see [`Cluster::pin_dir`]).
    bpffs: Bpffs,
}

impl Cluster {
    pub fn new() -> Self {
        let node = Node::new();
        let listener = node
            .listen_tcp("127.0.0.1:0".parse().expect("address"))
            .expect("stand-in listener in the node's namespace");
        let api = ApiServer::start_on(listener);
        let kubeconfig = node.temp_dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        // The systemd driver's pod tree, as on EKS nodes: the agent attaches
        // there even before the first pod.
        fs::create_dir_all(node.cgroup_root().join("kubepods.slice"))
            .expect("create kubepods.slice");
        let run_dir = node.temp_dir().join("run");
        Self {
            api,
            node,
            kubeconfig,
            run_dir,
            bpffs: Bpffs::new(),
        }
    }

    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// The agents' `--run-dir`: their control socket and the CNI plugin's.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Where this node's agents pin their programs and maps (given as
    /// `LATTICE_PIN`, see [`AgentPin::Cluster`]): `lattice-node` on the
    /// cluster's bpffs, as the DaemonSet's `/sys/fs/bpf/lattice-node`.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.path().join("lattice-node")
    }

    /// [`clean_env`] plus `LATTICE_PIN` = [`Cluster::pin_dir`]: what an
    /// agent of this node starts with (pinned, as the DaemonSet's).
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        let mut env = clean_env();
        env.push(("LATTICE_PIN", self.pin_dir().display().to_string()));
        env
    }

    /// A new container cgroup in a pod cgroup of the kubelet's tree, as the
    /// agent's DaemonSet pod has on a node (`kubepods-besteffort-pod<uid>
    /// .slice/cri-containerd-<id>.scope`): an agent placed there (see
    /// [`PodCommand::cgroup`]) makes its connects where the programs see
    /// them, as on a node. Removed with the node.
    pub fn agent_container_cgroup(&self) -> PathBuf {
        let uid_ = random_uuid().replace('-', "_");
        let path = self.node.cgroup_root().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{}.scope",
            random_hex(32)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
        path
    }

    /// `lattice-agent node` (the debug build next to the tests) for this
    /// node, placed in its namespace.
    pub fn agent_command<I, S>(&self, args: I) -> PodCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.agent_command_with(agent_bin(), args)
    }

    /// [`Cluster::agent_command`] with another agent binary (e.g.
    /// [`crate::agent::release_agent_bin`] for timed tests).
    pub fn agent_command_with<I, S>(
        &self,
        binary: impl AsRef<std::path::Path>,
        args: I,
    ) -> PodCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.node.command(binary).args(self.agent_args()).args(args)
    }

    /// [`Cluster::agent_command`] run through `prefix` (e.g.
    /// [`crate::bpffs::MountNs::command_prefix`]): `prefix.. <agent> node ..`.
    pub fn agent_command_via<I, S>(&self, prefix: &[OsString], args: I) -> PodCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (program, rest) = prefix.split_first().expect("a command prefix");
        self.node
            .command(program)
            .args(rest)
            .arg(agent_bin())
            .args(self.agent_args())
            .args(args)
    }

    /// `node --node-name .. --kubeconfig .. --cgroup-root .. --kubelet-root
    /// .. --proc-root /proc --run-dir ..`: the agent's arguments for this
    /// node.
    pub fn agent_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["node".into(), "--node-name".into(), self.node.name().into()];
        for (flag, value) in [
            ("--kubeconfig", self.kubeconfig.as_path()),
            ("--cgroup-root", self.node.cgroup_root()),
            ("--kubelet-root", self.node.kubelet_root()),
            ("--proc-root", std::path::Path::new("/proc")),
            ("--run-dir", self.run_dir.as_path()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        args
    }

    /// `--cni-conf-dir`, `--cni-bin-dir`, `--cni-plugin`: the agent chains
    /// lattice-cni into this node's CNI configuration.
    pub fn cni_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--cni-conf-dir".into(),
            self.node.cni_conf_dir().into(),
            "--cni-bin-dir".into(),
            self.node.cni_bin_dir().into(),
            "--cni-plugin".into(),
            crate::agent::cni_plugin_bin().into(),
        ]
    }

    /// The Lattice-like service: the botocore verifier on
    /// [`LATTICE_V4`](crate::node::LATTICE_V4):80 in the node's namespace,
    /// accepting the keys its in-process moto STS ([`MOTO_PORT`]) issues,
    /// with `extra` verifier arguments (e.g. a container-credentials
    /// endpoint).
    pub fn lattice_service(&self, extra: &[&str]) -> crate::verifier::Verifier {
        let python = crate::verifier::python().unwrap_or_else(|m| panic!("{m}"));
        let mut args = vec!["--moto-sts-port", MOTO_PORT];
        args.extend_from_slice(extra);
        crate::verifier::Verifier::start_as(
            self.node.command(python),
            crate::node::LATTICE_V4,
            80,
            &crate::verifier::UNUSED_KEY,
            &args,
        )
    }

    /// Applies `pod`'s API object.
    pub fn apply(&self, pod: &PodObject) -> Value {
        self.api.apply_pod(pod.json.clone())
    }

    /// Waits up to 10 s for an Event `matches` accepts (`what` names it
    /// in the failure); returns it.
    pub fn wait_event_where(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.api.events().into_iter().find(&matches) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} event: {:?}",
                self.api.events()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to 10 s for an Event with `reason` about the pod `uid`.
    pub fn wait_event(&self, uid: &str, reason: &str) -> Value {
        self.wait_event_where(&format!("{reason} for {uid}"), |e| {
            e["reason"] == reason && e["regarding"]["uid"] == uid
        })
    }

    /// `lattice-test-service --keep-alive` on port 80 of each of `addrs`,
    /// added to the node's `lo`: services beside the verifier, listening.
    pub fn keep_alive_services(&self, addrs: &[&str]) -> Vec<ChildGuard> {
        addrs
            .iter()
            .map(|addr| {
                self.node.add_lo_addr(&format!("{addr}/32"));
                let mut service = self
                    .node
                    .command(crate::pod::test_bin("lattice-test-service"))
                    .args(["--keep-alive", &format!("tcp:{addr}:80")])
                    .spawn();
                service.wait_for(Stream::Stdout, "listening", Duration::from_secs(10));
                service
            })
            .collect()
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// The environment every test agent starts with: nothing from the test
/// process, no IMDS, no profile files, no AWS credentials of its own.
pub fn clean_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        (
            "AWS_CONFIG_FILE",
            "/nonexistent/lattice-node/config".to_owned(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/lattice-node/credentials".to_owned(),
        ),
        ("HOME", "/nonexistent/lattice-node".to_owned()),
        ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
    ]
}

/// Where a test agent pins, unless its flags say (`--pin` wins over the
/// environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentPin {
    /// `LATTICE_PIN` = [`Cluster::pin_dir`]: pinned, as the DaemonSet's
    /// agents are.
    #[default]
    Cluster,
    /// No `LATTICE_PIN`: the agent's own default.
    Default,
}

/// How [`NodeAgent::start_with`] starts an agent.
#[derive(Debug, Clone)]
pub struct AgentStart<'a> {
    /// Set on top of [`clean_env`].
    pub env: &'a [(&'a str, &'a str)],
    pub pin: AgentPin,
    /// The address `--admin-addr` binds (its port is picked per agent):
    /// loopback by default, `0.0.0.0` as the DaemonSet binds it.
    pub admin_ip: Ipv4Addr,
}

impl Default for AgentStart<'_> {
    fn default() -> Self {
        Self {
            env: &[],
            pin: AgentPin::default(),
            admin_ip: Ipv4Addr::LOCALHOST,
        }
    }
}

/// A running node agent; dropping it kills it.
pub struct NodeAgent {
    child: ChildGuard,
    node_netns: PathBuf,
    admin: String,
}

impl NodeAgent {
    /// Starts the agent (`cmd` from [`Cluster::agent_command`]) with
    /// [`clean_env`] plus `env`, pinned under [`Cluster::pin_dir`] unless
    /// `cmd` says otherwise, and waits for its ready line.
    pub fn start(cluster: &Cluster, cmd: PodCommand, env: &[(&str, &str)]) -> Self {
        Self::start_with(
            cluster,
            cmd,
            &AgentStart {
                env,
                ..AgentStart::default()
            },
        )
    }

    /// [`NodeAgent::start`] as `how` says.
    pub fn start_with(cluster: &Cluster, cmd: PodCommand, how: &AgentStart<'_>) -> Self {
        Self::start_until(cluster, cmd, how, READY_LINE)
    }

    /// [`NodeAgent::start_with`], waiting for `line` in its log rather
    /// than its ready line (an agent that cannot be ready yet).
    pub fn start_until(
        cluster: &Cluster,
        cmd: PodCommand,
        how: &AgentStart<'_>,
        line: &str,
    ) -> Self {
        let (mut child, port) = Self::spawn(cluster, cmd, how);
        child.wait_for(Stream::Stderr, line, Duration::from_secs(30));
        Self {
            child,
            node_netns: cluster.node.netns_path().to_owned(),
            admin: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs an agent `how` says until it exits (one that must refuse to
    /// start); panics if it is still running after `timeout`.
    pub fn run_to_exit(
        cluster: &Cluster,
        cmd: PodCommand,
        how: &AgentStart<'_>,
        timeout: Duration,
    ) -> Output {
        let (mut child, _) = Self::spawn(cluster, cmd, how);
        match child.wait_timeout(timeout) {
            Some(status) => child.output(status),
            None => panic!(
                "the agent still runs after {timeout:?}:\n{}",
                child.captured()
            ),
        }
    }

    /// The agent's process, and its admin port.
    fn spawn(cluster: &Cluster, cmd: PodCommand, how: &AgentStart<'_>) -> (ChildGuard, u16) {
        let port = NEXT_ADMIN_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let admin = format!("{}:{port}", how.admin_ip);
        let mut command = cmd.args(["--admin-addr", &admin]).build();
        command.env_clear().envs(match how.pin {
            AgentPin::Cluster => cluster.agent_env(),
            AgentPin::Default => clean_env(),
        });
        command.envs(how.env.iter().copied());
        (
            ChildGuard::spawn(command, "lattice-agent node".to_owned()),
            port,
        )
    }

    /// The admin port (on every address `--admin-addr` binds).
    pub fn admin_port(&self) -> u16 {
        self.admin
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("admin URL with a port")
    }

    /// The parent's pid (node mode runs a parent and one worker).
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// The worker's pid (the parent's child), if one runs.
    pub fn worker_pid(&self) -> Option<i32> {
        children(self.pid()).into_iter().next()
    }

    /// Waits until a worker other than `not` says it serves the pods its
    /// parent handed it (the parent's `worker serving` line: the agent's
    /// `--log` must let `lattice_agent::keeper` info through); returns its
    /// pid.
    pub fn wait_worker(&self, not: Option<i32>, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = self.worker_pid().filter(|p| Some(*p) != not)
                && self.log().contains(&format!("worker serving pid={pid}"))
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no worker (other than {not:?}) serving after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILLs the worker (its parent starts another); returns its pid.
    pub fn kill_worker(&self) -> i32 {
        let pid = self
            .worker_pid()
            .unwrap_or_else(|| panic!("no worker to kill:\n{}", self.log()));
        // SAFETY: kill(2) on a pid just read as our child's child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        pid
    }

    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// Waits until the agent's log holds `needle` (its lines are read by
    /// another thread, which may lag behind the agent's state).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the agent's log after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET <admin><path>` from the node's namespace: (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        let out = curl_in(&self.node_netns, &[&format!("{}{path}", self.admin)]);
        split_status(&out)
    }

    /// `/pods` as JSON.
    pub fn pods(&self) -> Value {
        let (status, body) = self.admin("/pods");
        assert_eq!(status, 200, "/pods: {body}\n{}", self.log());
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/pods is not JSON ({e}): {body}"))
    }

    /// The `/pods` row of the pod with `uid`, if any.
    pub fn pod_row(&self, uid: &str) -> Option<Value> {
        self.pods()["pods"]
            .as_array()?
            .iter()
            .find(|p| p["uid"] == uid)
            .cloned()
    }

    /// Waits until the pod with `uid` is in `state` (`enrolled`, `failed`,
    /// `refused`) on `/pods`, or absent (`None`); returns its row.
    pub fn wait_pod(&self, uid: &str, state: Option<&str>, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.pod_row(uid);
            let now = row
                .as_ref()
                .and_then(|r| r["state"].as_str().map(str::to_owned));
            if now.as_deref() == state {
                return row;
            }
            assert!(
                Instant::now() < deadline,
                "pod {uid} is {now:?} after {timeout:?}, expected {state:?}; /pods: {}\nagent log:\n{}",
                self.pods(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; panics if it does not exit within 30 s.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_within(Duration::from_secs(30))
    }

    /// SIGTERM and wait; panics if it does not exit within `timeout`.
    pub fn stop_within(&mut self, timeout: Duration) -> ExitStatus {
        self.child.signal(libc::SIGTERM);
        match self.child.wait_timeout(timeout) {
            Some(status) => {
                self.child.output(status);
                status
            }
            None => panic!(
                "node agent still runs {timeout:?} after SIGTERM:\n{}",
                self.log()
            ),
        }
    }

    /// SIGKILLs the parent; returns once its worker, which dies with it,
    /// is gone too.
    pub fn kill(&mut self) -> ExitStatus {
        let worker = self.worker_pid();
        let status = self.child.kill();
        if let Some(pid) = worker {
            wait_gone(pid, Duration::from_secs(10));
        }
        status
    }

    /// Waits up to `timeout` for the parent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self.child.wait_timeout(timeout)?;
        self.child.output(status);
        Some(status)
    }
}

/// The children of `pid`, from `/proc/*/stat`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces and parens.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Waits until process `pid` is gone (or a zombie); panics after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned));
        if matches!(state.as_deref(), None | Some("Z")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// curl in a network namespace (not in any cgroup), as root; stdout ends
/// with `\nSTATUS <code>`.
fn curl_in(netns: &std::path::Path, args: &[&str]) -> Output {
    PodCommand::new("curl", netns, std::path::Path::new("/"))
        .in_cgroup(false)
        .args(["-q", "-sS", "--noproxy", "*", "--max-time", "10"])
        .args(["-w", "\nSTATUS %{http_code}"])
        .args(args)
        .run(Duration::from_secs(20))
}

fn split_status(out: &Output) -> (u16, String) {
    let (body, status) = out
        .stdout
        .rsplit_once("\nSTATUS ")
        .unwrap_or_else(|| panic!("curl printed no status:\n{out}"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// What an app's request got: status (0 when the connection failed) and
/// body, plus curl's stderr.
#[derive(Debug, Clone)]
pub struct AppReply {
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

impl AppReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// What one app saw over `n` sequential GETs on one kept-alive connection.
pub struct SequentialGets {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers other than 200.
    pub failed: u64,
    /// Answers showing the request reached the service without SigV4.
    pub unsigned: u64,
}

/// `n` sequential GETs on one connection from `pod` (as UID 1000), each
/// timed by curl, against lattice-test-service (whose answer says whether
/// the request arrived signed).
pub fn sequential_gets(pod: &NodePod, url: &str, n: usize) -> SequentialGets {
    let out = pod
        .command("curl")
        .uid(APP_UID)
        .args(["-q", "-sS", "--noproxy", "*"])
        .args(["-w", "\\n%{http_code} %{time_total}\\n"])
        .arg(format!("{url}/r[1-{n}]"))
        .run(Duration::from_secs(120));
    let (mut failed, mut unsigned) = (0, 0);
    let mut times = Vec::new();
    for line in out.stdout.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("service ") {
            unsigned += u64::from(line.contains("credential=none"));
            continue;
        }
        let (status, t) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("status and time: {line:?}\n{out}"));
        failed += u64::from(status != "200");
        times.push(t.parse::<f64>().unwrap());
    }
    assert_eq!(times.len(), n, "{out}");
    times.sort_by(f64::total_cmp);
    let ms = |i: usize| times[i] * 1000.0;
    SequentialGets {
        p50_ms: ms(n / 2),
        p99_ms: ms(n * 99 / 100),
        failed,
        unsigned,
    }
}

/// The app's curl in `pod` (its netns and app container cgroup) as
/// [`APP_UID`], plain HTTP, never a proxy.
pub fn app_request(pod: &NodePod, args: &[&str]) -> AppReply {
    app_request_as(pod, APP_UID, args)
}

/// [`app_request`] as `uid` (and the GID of the same number).
pub fn app_request_as(pod: &NodePod, uid: u32, args: &[&str]) -> AppReply {
    let out = pod
        .command("curl")
        .uid(uid)
        .args(["-q", "-sS", "--noproxy", "*", "--max-time", "15", "-g"])
        .args(["-w", "\nSTATUS %{http_code}"])
        .args(args)
        .run(Duration::from_secs(30));
    let (status, body) = split_status(&out);
    AppReply {
        status,
        body,
        stderr: out.stderr,
    }
}

/// The API object of a test pod on a node.
#[derive(Debug, Clone)]
pub struct PodObject {
    pub json: Value,
}

impl PodObject {
    /// `pod` as the API shows it running on `node_name`: one container
    /// `app`, its IP in the status, service account `default`, no
    /// annotation yet.
    pub fn new(pod: &NodePod, node_name: &str) -> Self {
        Self::pending(pod.namespace(), pod.name(), pod.uid(), node_name).running(pod)
    }

    /// A pod bound to `node_name` whose sandbox the kubelet has yet to
    /// start: phase Pending, no IP.
    pub fn pending(namespace: &str, name: &str, uid: &str, node_name: &str) -> Self {
        Self {
            json: json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": uid,
                    "annotations": {},
                    "labels": {"app": name},
                },
                "spec": {
                    "nodeName": node_name,
                    "serviceAccountName": "default",
                    "containers": [{"name": "app", "image": "app:1", "env": [], "volumeMounts": []}],
                    "volumes": [],
                },
                "status": {"phase": "Pending", "hostIP": "169.254.64.1"},
            }),
        }
    }

    /// The status the kubelet reports once `pod` runs: phase Running, its IP.
    pub fn running(mut self, pod: &NodePod) -> Self {
        let ip = pod.ip().to_string();
        self.json["status"] = json!({
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "169.254.64.1",
        });
        self
    }

    pub fn annotated(self) -> Self {
        self.annotation(INJECT, "true")
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.json["metadata"]["annotations"][key] = value.into();
        self
    }

    pub fn without_annotation(mut self, key: &str) -> Self {
        if let Some(a) = self.json["metadata"]["annotations"].as_object_mut() {
            a.remove(key);
        }
        self
    }

    pub fn service_account(mut self, name: &str) -> Self {
        self.json["spec"]["serviceAccountName"] = name.into();
        self
    }

    pub fn host_network(mut self) -> Self {
        self.json["spec"]["hostNetwork"] = true.into();
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.container()["env"]
            .as_array_mut()
            .expect("env array")
            .push(json!({"name": name, "value": value}));
        self
    }

    /// What the EKS IRSA webhook adds, with the token file written on the
    /// node like the kubelet writes it.
    pub fn irsa(self, pod: &NodePod, role_arn: &str, region: &str, token: &str) -> Self {
        pod.write_projected(IRSA_VOLUME, "token", token);
        self.irsa_env(role_arn, region)
    }

    /// What the EKS IRSA webhook adds, the token file left to the caller
    /// (e.g. [`crate::node::PodSpec::projected`] with [`IRSA_VOLUME`] and
    /// `token`, written before the sandbox starts).
    pub fn irsa_env(mut self, role_arn: &str, region: &str) -> Self {
        self = self
            .env("AWS_STS_REGIONAL_ENDPOINTS", "regional")
            .env("AWS_DEFAULT_REGION", region)
            .env("AWS_REGION", region)
            .env("AWS_ROLE_ARN", role_arn)
            .env(
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                &format!("{IRSA_TOKEN_DIR}/token"),
            );
        self.mount(
            IRSA_VOLUME,
            IRSA_TOKEN_DIR,
            service_account_token("sts.amazonaws.com", "token"),
        )
    }

    /// What the EKS Pod Identity webhook adds (endpoint at the Pod Identity
    /// Agent's address), with the token file written on the node.
    pub fn pod_identity(self, pod: &NodePod, region: &str, token: &str) -> Self {
        pod.write_projected(POD_IDENTITY_VOLUME, POD_IDENTITY_TOKEN_FILE, token);
        self.pod_identity_from(
            region,
            service_account_token("pods.eks.amazonaws.com", POD_IDENTITY_TOKEN_FILE),
        )
    }

    /// The Pod Identity webhook's environment, with a token volume projected
    /// from `source` (a `serviceAccountToken`, or anything else a pod may
    /// put there); the token file is the test's to write.
    pub fn pod_identity_from(mut self, region: &str, source: Value) -> Self {
        self = self
            .env("AWS_REGION", region)
            .env(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            )
            .env(
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                &format!("{POD_IDENTITY_TOKEN_DIR}/{POD_IDENTITY_TOKEN_FILE}"),
            );
        self.mount(POD_IDENTITY_VOLUME, POD_IDENTITY_TOKEN_DIR, source)
    }

    /// Mounts `volume` at `dir`, projected from `source`.
    fn mount(mut self, volume: &str, dir: &str, source: Value) -> Self {
        self.container()["volumeMounts"]
            .as_array_mut()
            .expect("volumeMounts array")
            .push(json!({"name": volume, "mountPath": dir, "readOnly": true}));
        self.json["spec"]["volumes"]
            .as_array_mut()
            .expect("volumes array")
            .push(json!({"name": volume, "projected": {"sources": [source]}}));
        self
    }

    fn container(&mut self) -> &mut Value {
        &mut self.json["spec"]["containers"][0]
    }
}

/// A projected volume source: the pod's service-account token for
/// `audience`, as the file `path`.
pub fn service_account_token(audience: &str, path: &str) -> Value {
    json!({"serviceAccountToken": {"audience": audience, "expirationSeconds": 86400, "path": path}})
}
