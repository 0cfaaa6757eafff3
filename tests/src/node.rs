//! The node fixture: a Kubernetes node in miniature for `lattice-agent
//! node`, with pods added the way the kubelet and a CRI runtime add them.
//!
//! A [`Node`] is
//! - a network namespace of its own standing in for the node's host
//!   network, with the VPC Lattice service address ([`LATTICE_V4`]) and the
//!   EKS Pod Identity Agent address ([`POD_IDENTITY_V4`]) on its `lo`, and a
//!   Linux bridge that Debian's CNI `bridge` plugin creates (with
//!   `host-local` IPAM on [`POD_SUBNET`]) when the first pod joins;
//! - a kubelet-like cgroup tree under a test-owned directory of the cgroup2
//!   mount ([`Node::cgroup_root`], what the agent gets as `--cgroup-root`);
//! - a kubelet root directory with `pods/` ([`Node::kubelet_root`]).
//!
//! A [`NodePod`] has a network namespace wired by the CNI `loopback` and
//! `bridge` plugins (real CNI protocol, ADD on creation and DEL on drop;
//! like containerd, the kit runs `loopback` itself, then every plugin of
//! the first configuration list in [`Node::cni_conf_dir`], chaining each
//! one's result into the next as `prevResult`, so a plugin a test chains
//! there, such as lattice-cni, runs as on a node),
//! so its `eth0` has an address in [`POD_SUBNET`] and a default route via
//! the bridge: what it sends to an address of the node arrives with the
//! pod's IP as source. The node namespace has no route beyond the bridge,
//! so nothing a pod sends can leave the machine. The pod's cgroup sits
//! where the kubelet puts it for the pod's cgroup driver and QoS class
//! (see `lattice-agent/src/pod_cgroup.rs`), with a pause container running
//! `sleep infinity` as UID 65535 (like the pause image) and an app
//! container for [`NodePod::command`]. Projected volumes are written like
//! the kubelet's atomic writer does ([`NodePod::write_projected`]).
//!
//! Dropping a pod kills its processes, runs CNI DEL, deletes its namespace,
//! cgroup directories and kubelet directory. Dropping the node first does
//! the same for every pod still there (a [`NodePod`] handle may outlive its
//! node: its drop is then a no-op), then deletes the bridge, the namespace,
//! the cgroup tree and the temporary directories.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

pub use crate::pod::LATTICE_V4;
pub use crate::random::random_uuid;
use crate::{
    cgroup::{self, CgroupTree, cgroup2_mount},
    netns::{self, Netns},
    random::{random_bytes, random_hex},
    spawn::{ChildGuard, PodCommand},
    tempdir::TempDir,
    time::{unix_now, utc},
    unique_name,
};

/// The EKS Pod Identity Agent's address, on every node's `lo`.
pub const POD_IDENTITY_V4: &str = "169.254.170.23";
/// Where the `host-local` IPAM plugin takes pod IPs from: link-local, clear
/// of 169.254.169.254 (IMDS), 169.254.170.x (Pod Identity) and
/// 169.254.171.x (VPC Lattice).
pub const POD_SUBNET: &str = "169.254.64.0/20";
/// The bridge's address, the pods' default gateway (first of the subnet).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 64, 1);
/// The pause process's UID and GID (the pause image runs as 65535).
pub const PAUSE_UID: u32 = 65535;
/// The CNI spec version of the configurations (Debian's plugins 1.1
/// support up to 1.0.0).
pub const CNI_VERSION: &str = "1.0.0";

/// How long killing the processes of a cgroup tree may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A pod's QoS class, which decides its level in the kubepods tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Qos {
    /// Directly under the kubepods cgroup.
    Guaranteed,
    #[default]
    Burstable,
    BestEffort,
}

impl Qos {
    /// The name of the QoS level (None for Guaranteed, which has none).
    fn level(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// The kubelet's `--cgroup-driver`, which decides how cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`,
    /// containers `cri-containerd-<id>.scope` (the EKS AMI default).
    #[default]
    Systemd,
    /// `kubepods/<qos>/pod<uid>`, containers `<id>`.
    Cgroupfs,
}

/// What the kubelet knows about a pod before it starts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; a random version 4 UUID when None.
    pub uid: Option<String>,
    pub qos: Qos,
    pub driver: CgroupDriver,
    /// False: IPv6 is disabled in the pod's namespace (sysctl
    /// `disable_ipv6`), so not even `[::1]` exists, as with CNIs that turn
    /// IPv6 off in IPv4 clusters. True (the kernel's default): `lo` has
    /// `::1` and `eth0` a link-local IPv6 address.
    pub ipv6: bool,
    /// Projected-volume files `(volume, file, contents)` the kubelet writes
    /// before it creates the sandbox (service-account tokens).
    pub projected: Vec<(String, String, Vec<u8>)>,
}

impl PodSpec {
    /// A Burstable pod under the systemd driver, random UID, IPv6 enabled.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: None,
            qos: Qos::default(),
            driver: CgroupDriver::default(),
            ipv6: true,
            projected: Vec::new(),
        }
    }

    /// A projected-volume file written before the sandbox starts.
    pub fn projected(mut self, volume: &str, file: &str, contents: impl AsRef<[u8]>) -> Self {
        self.projected.push((
            volume.to_owned(),
            file.to_owned(),
            contents.as_ref().to_vec(),
        ));
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_owned());
        self
    }

    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    pub fn driver(mut self, driver: CgroupDriver) -> Self {
        self.driver = driver;
        self
    }

    pub fn ipv6(mut self, enabled: bool) -> Self {
        self.ipv6 = enabled;
        self
    }
}

/// The pod cgroup's path relative to the cgroup root, as the kubelet names
/// it (`<uid_>`: the UID with `_` for `-`, systemd reserves `-`).
pub fn pod_cgroup_relative(driver: CgroupDriver, qos: Qos, uid: &str) -> PathBuf {
    let uid_ = uid.replace('-', "_");
    PathBuf::from(match (driver, qos.level()) {
        (CgroupDriver::Systemd, Some(q)) => {
            format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid_}.slice")
        }
        (CgroupDriver::Systemd, None) => format!("kubepods.slice/kubepods-pod{uid_}.slice"),
        (CgroupDriver::Cgroupfs, Some(q)) => format!("kubepods/{q}/pod{uid}"),
        (CgroupDriver::Cgroupfs, None) => format!("kubepods/pod{uid}"),
    })
}

/// A container's cgroup name inside its pod cgroup, as containerd's CRI
/// plugin names it under each driver.
pub fn container_cgroup_name(driver: CgroupDriver, container_id: &str) -> String {
    match driver {
        CgroupDriver::Systemd => format!("cri-containerd-{container_id}.scope"),
        CgroupDriver::Cgroupfs => container_id.to_owned(),
    }
}

/// A test node. See the module docs.
///
/// Fields drop in declaration order, after [`Drop::drop`] has torn down the
/// pods and the bridge: the namespace (killing what runs in it), the cgroup
/// tree, the temporary directories.
pub struct Node {
    pods: Arc<PodTable>,
    cni: Arc<Cni>,
    netns: Netns,
    cgroups: CgroupTree,
    temp: TempDir,
    name: String,
    kubelet_root: PathBuf,
}

impl Node {
    pub fn new() -> Self {
        let name = unique_name();
        // The bridge carries the node's name: it must fit IFNAMSIZ.
        assert!(
            name.len() <= 15,
            "node name {name} too long for an interface name"
        );
        let temp = TempDir::at(std::env::temp_dir().join(format!("{name}-node")));

        // /var/lib/kubelet and its pods/ are 0750 root (kubelet
        // setupDataDirs), so only root or CAP_DAC_READ_SEARCH gets in.
        let kubelet_root = temp.path().join("kubelet");
        mkdir_mode(&kubelet_root, 0o750);
        mkdir_mode(&kubelet_root.join("pods"), 0o750);

        let cni_dir = temp.path().join("cni");
        mkdir_mode(&cni_dir, 0o755);
        let cni = Arc::new(Cni::new(&name, &cni_dir));

        let cgroups = CgroupTree::new(cgroup2_mount().join(&name));
        // Where processes of the node that are not pods run (the agent, the
        // services): outside kubepods, but inside the tree, so dropping the
        // node kills them too.
        mkdir_mode(&cgroups.path().join("system.slice"), 0o755);

        let netns = Netns::new(&name);
        for addr in [LATTICE_V4, POD_IDENTITY_V4] {
            netns.add_lo_addr(&format!("{addr}/32"));
        }
        Self {
            pods: Arc::new(PodTable::default()),
            cni,
            netns,
            cgroups,
            temp,
            name,
            kubelet_root,
        }
    }

    /// `lat-<pid>-<n>`: the node's namespace, cgroup root directory, CNI
    /// network and bridge are named after it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's network namespace (its "host network").
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// The bridge the CNI plugin creates in the node namespace.
    pub fn bridge(&self) -> &str {
        &self.name
    }

    /// The test-owned directory in the cgroup2 mount holding the kubelet
    /// tree: the agent's `--cgroup-root`.
    pub fn cgroup_root(&self) -> &Path {
        self.cgroups.path()
    }

    /// The kubelet root directory (like /var/lib/kubelet): the agent's
    /// `--kubelet-root`.
    pub fn kubelet_root(&self) -> &Path {
        &self.kubelet_root
    }

    /// The fixture's temporary directory (kubelet root, CNI configuration
    /// and IPAM state); removed on drop.
    pub fn temp_dir(&self) -> &Path {
        self.temp.path()
    }

    /// A writable CNI plugin directory, searched before the system's (the
    /// runtime's `CNI_PATH`): where a node agent installs lattice-cni.
    pub fn cni_bin_dir(&self) -> &Path {
        &self.cni.bin_dirs[0]
    }

    /// The CNI configuration directory holding the node's network
    /// configurations (the plugins get them on stdin; these files are for
    /// reading).
    pub fn cni_conf_dir(&self) -> &Path {
        &self.cni.conf_dir
    }

    /// The node's network configuration list (in [`Node::cni_conf_dir`]):
    /// the runtime's network, where the agent chains lattice-cni.
    pub fn cni_conflist(&self) -> &Path {
        &self.cni.conflist
    }

    /// Adds an address on the node namespace's `lo`.
    pub fn add_lo_addr(&self, cidr: &str) {
        self.netns.add_lo_addr(cidr);
    }

    /// Runs a setup command in the node namespace; panics if it fails.
    pub fn exec(&self, argv: &[&str]) {
        self.netns.exec(argv);
    }

    /// A TCP listener bound in the node namespace.
    pub fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        self.netns.listen_tcp(addr)
    }

    /// A process of the node (the agent, a service): in the node namespace,
    /// in the cgroup `<cgroup root>/system.slice` (no pod's), as root unless
    /// changed.
    pub fn command(&self, program: impl AsRef<Path>) -> PodCommand {
        PodCommand::new(
            program,
            self.netns.path(),
            &self.cgroups.path().join("system.slice"),
        )
    }

    /// Number of pods on the node.
    pub fn pod_count(&self) -> usize {
        self.pods.pods.lock().unwrap().len()
    }

    /// Starts a pod: kubelet directories, cgroups, network namespace with
    /// CNI, pause process. Panics (after cleaning up what it made) if any
    /// step fails.
    ///
    /// Like every process the kit starts, the pause process gets SIGKILL
    /// when the thread that started it exits (`PR_SET_PDEATHSIG`): add pods
    /// from the test's own thread, not from a short-lived one.
    pub fn add_pod(&self, spec: PodSpec) -> NodePod {
        self.try_add_pod(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Node::add_pod`], but a failed CNI ADD is returned (after the DEL
    /// the runtime sends then, and the clean-up), as the kubelet sees it.
    pub fn try_add_pod(&self, spec: PodSpec) -> Result<NodePod, String> {
        let uid = spec.uid.clone().unwrap_or_else(random_uuid);
        assert!(
            !uid.is_empty()
                && uid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "pod UID {uid:?}: letters, digits, '-' and '_' only"
        );
        let sandbox_id = random_hex(32);
        let label = format!("{}/{} ({uid})", spec.namespace, spec.name);
        let mut state = PodState::new(label, self.cni.clone());

        // kubelet makePodDataDirs: pods/<uid>/{volumes,plugins}, all 0750.
        let kubelet_dir = self.kubelet_root.join("pods").join(&uid);
        mkdir_mode(&kubelet_dir, 0o750);
        state.kubelet_dir = Some(kubelet_dir.clone());
        mkdir_mode(&kubelet_dir.join("volumes"), 0o750);
        mkdir_mode(&kubelet_dir.join("plugins"), 0o750);
        // Volumes before the sandbox, as the kubelet's syncPod does.
        for (volume, file, contents) in &spec.projected {
            write_projected_files(
                &kubelet_dir,
                volume,
                &[(file.as_str(), contents.as_slice())],
            );
        }

        // The QoS levels are shared by the node's pods and stay until the
        // node goes, as the kubelet's do.
        let cgroup = self
            .cgroups
            .path()
            .join(pod_cgroup_relative(spec.driver, spec.qos, &uid));
        let parent = cgroup.parent().expect("pod cgroup has a parent");
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        mkdir_mode(&cgroup, 0o755);
        state.cgroup = Some(cgroup.clone());
        let pause_cgroup = cgroup.join(container_cgroup_name(spec.driver, &sandbox_id));
        mkdir_mode(&pause_cgroup, 0o755);
        let app_cgroup = cgroup.join(container_cgroup_name(spec.driver, &random_hex(32)));
        mkdir_mode(&app_cgroup, 0o755);

        let (netns_path, ip, pause_pid) =
            start_sandbox(&mut state, &spec, &uid, &sandbox_id, &pause_cgroup, None)?;

        let key = self.pods.next.fetch_add(1, Ordering::Relaxed);
        self.pods.pods.lock().unwrap().insert(key, state);
        Ok(NodePod {
            pods: self.pods.clone(),
            key,
            spec,
            uid,
            ip,
            netns: netns_path,
            cgroup,
            pause_cgroup,
            app_cgroup,
            pause_pid,
            kubelet_dir,
            projecting: Mutex::new(()),
        })
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut *self.pods.pods.lock().unwrap_or_else(|e| e.into_inner()));
        drop(pods);
        // Per-pod DELs leave the bridge (the plugin never deletes it).
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .args(["--", "ip", "link", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            // No pod ever joined: there is no bridge.
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("Cannot find device") => {}
            Ok(o) => eprintln!(
                "lattice-tests: node {}: ip link del: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("lattice-tests: node {}: ip link del: {e}", self.name),
        }
    }
}

/// A pod on a [`Node`]. Drop tears it down (unless the node went first).
pub struct NodePod {
    pods: Arc<PodTable>,
    key: u64,
    spec: PodSpec,
    uid: String,
    ip: Ipv4Addr,
    netns: PathBuf,
    cgroup: PathBuf,
    pause_cgroup: PathBuf,
    app_cgroup: PathBuf,
    pause_pid: i32,
    kubelet_dir: PathBuf,
    /// Serializes projected-volume writes (the atomic writer assumes one
    /// writer, the kubelet's volume manager).
    projecting: Mutex<()>,
}

impl NodePod {
    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// `metadata.uid`, with dashes.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The IPv4 address of the pod's `eth0`, from the IPAM result.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's network namespace (/run/netns/lat-<pid>-<n>).
    pub fn netns_path(&self) -> &Path {
        &self.netns
    }

    /// The pod-level cgroup directory (what the agent attaches to).
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// The pause container's cgroup (holds the pause process).
    pub fn pause_cgroup(&self) -> &Path {
        &self.pause_cgroup
    }

    /// The app container's cgroup, where [`NodePod::command`] puts
    /// processes.
    pub fn app_cgroup(&self) -> &Path {
        &self.app_cgroup
    }

    /// The pause process: in the pod namespace and the pause container's
    /// cgroup, as UID/GID 65535.
    pub fn pause_pid(&self) -> i32 {
        self.pause_pid
    }

    /// `<kubelet root>/pods/<uid>`.
    pub fn kubelet_dir(&self) -> &Path {
        &self.kubelet_dir
    }

    /// An app process: in the pod namespace and the app container's cgroup,
    /// as root unless `.uid(..)` is given.
    pub fn command(&self, program: impl AsRef<Path>) -> PodCommand {
        PodCommand::new(program, &self.netns, &self.app_cgroup)
    }

    /// A new container cgroup in the pod (named as under the pod's driver),
    /// for [`NodePod::command_in`]. Removed with the pod.
    pub fn add_container(&self) -> PathBuf {
        let path = self
            .cgroup
            .join(container_cgroup_name(self.spec.driver, &random_hex(32)));
        mkdir_mode(&path, 0o755);
        path
    }

    /// A process in the pod namespace and in `container` (a cgroup from
    /// [`NodePod::add_container`] or one of the pod's own).
    pub fn command_in(&self, container: &Path, program: impl AsRef<Path>) -> PodCommand {
        assert!(
            container.starts_with(&self.cgroup),
            "{} is not a cgroup of pod {}",
            container.display(),
            self.uid
        );
        PodCommand::new(program, &self.netns, container)
    }

    /// Runs a setup command in the pod namespace; panics if it fails.
    pub fn exec(&self, argv: &[&str]) {
        netns::exec_in(&self.netns, argv);
    }

    /// A TCP listener bound in the pod namespace.
    pub fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        netns::listen_tcp_in(&self.netns, addr)
    }

    /// `<kubelet dir>/volumes/kubernetes.io~projected/<volume>`.
    pub fn volume_path(&self, volume: &str) -> PathBuf {
        self.kubelet_dir
            .join("volumes/kubernetes.io~projected")
            .join(volume)
    }

    /// The path a node agent reads: `<volume path>/<file>` (a symlink to
    /// `..data/<file>`).
    pub fn projected_path(&self, volume: &str, file: &str) -> PathBuf {
        self.volume_path(volume).join(file)
    }

    /// Writes (or rotates) one file of a projected volume, keeping the
    /// volume's other files; returns [`NodePod::projected_path`].
    pub fn write_projected(&self, volume: &str, file: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        self.write_projected_files(volume, &[(file, contents.as_ref())]);
        self.projected_path(volume, file)
    }

    /// Writes (or rotates) files of a projected volume in one atomic step,
    /// as the kubelet's AtomicWriter does (pkg/volume/util/atomic_writer.go):
    /// the whole payload (the volume's current files with these replaced or
    /// added) goes to a new `..<UTC timestamp>.<random>` directory (0755,
    /// files 0644: the projected volume's default mode), a `..data_tmp`
    /// symlink to it is renamed over `..data` (the atomic swap), missing
    /// `<file> -> ..data/<file>` links are added, and the previous
    /// timestamped directory is removed. A reader that opened a file before
    /// keeps the old contents.
    ///
    /// The volume directory is 1777, the mode of the tmpfs root the kubelet
    /// mounts there (no tmpfs here); its parent `kubernetes.io~projected`
    /// 0755 (created with 0777 under the kubelet's umask 022).
    pub fn write_projected_files(&self, volume: &str, files: &[(&str, &[u8])]) {
        let _writer = self.projecting.lock().unwrap_or_else(|e| e.into_inner());
        write_projected_files(&self.kubelet_dir, volume, files);
    }
}

impl NodePod {
    /// The runtime recreates the pod's sandbox, as after its pause
    /// container died: every process of the pod is killed, CNI DEL, the
    /// network namespace deleted; then a new namespace, CNI ADD asking for
    /// the pod's IP again (as with CNIs that keep a pod's address), and a
    /// new pause process. The pod keeps its UID, cgroups, IP and kubelet
    /// directory: only its network namespace is new.
    pub fn recreate_sandbox(&mut self) {
        let mut pods = self.pods.pods.lock().unwrap_or_else(|e| e.into_inner());
        let state = pods
            .get_mut(&self.key)
            .expect("the pod's node is still there");
        cgroup::kill_tree(&self.cgroup, KILL_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        drop(state.pause.take());
        if let Some(attachment) = state.attachment.take() {
            state.cni.del(&attachment);
        }
        drop(state.netns.take());
        let (netns, ip, pause_pid) = start_sandbox(
            state,
            &self.spec,
            &self.uid,
            &random_hex(32),
            &self.pause_cgroup,
            Some(self.ip),
        )
        .unwrap_or_else(|e| panic!("recreating the sandbox of pod {}: {e}", self.uid));
        assert_eq!(ip, self.ip, "host-local gave the pod another address");
        self.netns = netns;
        self.pause_pid = pause_pid;
    }
}

impl Drop for NodePod {
    fn drop(&mut self) {
        let state = self
            .pods
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        // Outside the lock: teardown takes a while.
        drop(state);
    }
}

/// A pod sandbox as a CRI runtime starts it: a network namespace (its `lo`
/// down), CNI ADD through the node's chain with `CNI_ARGS` as containerd
/// passes them for a Kubernetes sandbox (plus `IP=`, which `host-local`
/// honours, when `ip` asks for a given address), then the pause process.
/// Everything is recorded in `state` as it is made, so a failure half way
/// is cleaned up with the pod. Returns the namespace's path, the pod's IP
/// and the pause process's PID.
fn start_sandbox(
    state: &mut PodState,
    spec: &PodSpec,
    uid: &str,
    sandbox_id: &str,
    pause_cgroup: &Path,
    ip: Option<Ipv4Addr>,
) -> Result<(PathBuf, Ipv4Addr, i32), String> {
    let netns = state.netns.insert(Netns::new_down(&unique_name()));
    let netns_path = netns.path().to_owned();
    if !spec.ipv6 {
        // Before CNI: `default` covers eth0, which arrives later.
        netns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
    }

    // Recorded before ADD: the CNI spec wants a DEL after a failed ADD.
    let mut args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
         K8S_POD_INFRA_CONTAINER_ID={sandbox_id};K8S_POD_UID={uid}",
        spec.namespace, spec.name,
    );
    if let Some(ip) = ip {
        args.push_str(&format!(";IP={ip}"));
    }
    let attachment = Attachment {
        args,
        container_id: sandbox_id.to_owned(),
        netns: netns_path.clone(),
    };
    state.attachment = Some(attachment.clone());
    let result = state.cni.add(&attachment)?;
    let ip = pod_ip(&result)
        .ok_or_else(|| format!("no IPv4 address in the chain's result: {result}"))?;

    let pause = state.pause.insert(
        PodCommand::new("sleep", &netns_path, pause_cgroup)
            .arg("infinity")
            .uid(PAUSE_UID)
            .spawn(),
    );
    Ok((netns_path, ip, pause.pid()))
}

/// [`NodePod::write_projected_files`] in the pod directory `kubelet_dir`
/// (one writer at a time).
fn write_projected_files(kubelet_dir: &Path, volume: &str, files: &[(&str, &[u8])]) {
    for name in std::iter::once(volume).chain(files.iter().map(|(f, _)| *f)) {
        assert!(
            !name.is_empty() && !name.contains('/') && !name.starts_with(".."),
            "projected volume or file name {name:?}: one path element, not starting with '..'"
        );
    }
    let plugin_dir = kubelet_dir.join("volumes/kubernetes.io~projected");
    if !plugin_dir.exists() {
        mkdir_mode(&plugin_dir, 0o755);
    }
    let dir = plugin_dir.join(volume);
    if !dir.exists() {
        mkdir_mode(&dir, 0o1777);
    }
    let data = dir.join("..data");
    let old_ts = fs::read_link(&data).ok();

    let mut payload: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if let Some(old) = &old_ts {
        let old = dir.join(old);
        for entry in fs::read_dir(&old)
            .unwrap_or_else(|e| panic!("read {}: {e}", old.display()))
            .flatten()
        {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let contents = fs::read(entry.path())
                    .unwrap_or_else(|e| panic!("read {}: {e}", entry.path().display()));
                payload.insert(entry.file_name().to_string_lossy().into_owned(), contents);
            }
        }
    }
    for (file, contents) in files {
        payload.insert((*file).to_owned(), contents.to_vec());
    }

    let ts_name = new_timestamp_dir(&dir);
    let ts = dir.join(&ts_name);
    for (file, contents) in &payload {
        let path = ts.join(file);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        chmod(&path, 0o644);
    }
    let tmp = dir.join("..data_tmp");
    symlink(&ts_name, &tmp).unwrap_or_else(|e| panic!("symlink {}: {e}", tmp.display()));
    fs::rename(&tmp, &data).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
    for file in payload.keys() {
        let link = dir.join(file);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(file), &link)
                .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
        }
    }
    if let Some(old) = old_ts {
        let old = dir.join(old);
        fs::remove_dir_all(&old).unwrap_or_else(|e| panic!("rm -r {}: {e}", old.display()));
    }
}

/// The pods of a node, shared with their handles so that whichever of
/// node and handle goes first tears the pod down.
#[derive(Default)]
struct PodTable {
    pods: Mutex<BTreeMap<u64, PodState>>,
    next: AtomicU64,
}

/// What a pod owns, filled in as it is created so that a failure half way
/// still cleans up what exists.
struct PodState {
    label: String,
    cni: Arc<Cni>,
    kubelet_dir: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    netns: Option<Netns>,
    attachment: Option<Attachment>,
    pause: Option<ChildGuard>,
}

impl PodState {
    fn new(label: String, cni: Arc<Cni>) -> Self {
        Self {
            label,
            cni,
            kubelet_dir: None,
            cgroup: None,
            netns: None,
            attachment: None,
            pause: None,
        }
    }
}

impl Drop for PodState {
    fn drop(&mut self) {
        // Processes first (cgroup.kill on the pod level reaches every
        // container), then the network, the cgroup directories, the files.
        if let Some(cgroup) = &self.cgroup
            && let Err(e) = cgroup::kill_tree(cgroup, KILL_TIMEOUT)
        {
            eprintln!("lattice-tests: pod {}: {e}", self.label);
        }
        drop(self.pause.take());
        if let Some(attachment) = self.attachment.take() {
            self.cni.del(&attachment);
        }
        drop(self.netns.take());
        if let Some(cgroup) = &self.cgroup
            && let Err(e) = cgroup::remove_tree(cgroup, KILL_TIMEOUT)
        {
            eprintln!("lattice-tests: pod {}: {e}", self.label);
        }
        if let Some(dir) = &self.kubelet_dir
            && let Err(e) = fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("lattice-tests: rm -r {}: {e}", dir.display());
        }
    }
}

/// One pod's attachment to the node network, as the runtime passes it to
/// every plugin call.
#[derive(Debug, Clone)]
struct Attachment {
    container_id: String,
    netns: PathBuf,
    args: String,
}

/// Calls the CNI plugins for a node, from inside the node namespace (where
/// the runtime runs them on a real node, so the bridge and the host ends
/// of the veths land there).
struct Cni {
    /// `CNI_PATH`: the node's writable plugin directory, then the system's.
    bin_dirs: Vec<PathBuf>,
    node_netns: PathBuf,
    conf_dir: PathBuf,
    /// The node's network configuration list in `conf_dir`.
    conflist: PathBuf,
    loopback_conf: Value,
}

impl Cni {
    /// Writes the node's network configuration list (Debian's `bridge`
    /// with `host-local` IPAM) as `<dir>/net.d/10-<node>.conflist`; IPAM
    /// state goes to `<dir>/ipam`, installed plugins to `<dir>/bin`.
    fn new(node: &str, dir: &Path) -> Self {
        let conf_dir = dir.join("net.d");
        mkdir_mode(&conf_dir, 0o755);
        let bin_dir = dir.join("bin");
        mkdir_mode(&bin_dir, 0o755);
        let list = json!({
            "cniVersion": CNI_VERSION,
            "name": node,
            "plugins": [{
                "type": "bridge",
                "bridge": node,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [[{ "subnet": POD_SUBNET, "gateway": POD_GATEWAY.to_string() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                },
            }],
        });
        let path = conf_dir.join(format!("10-{node}.conflist"));
        fs::write(&path, serde_json::to_vec_pretty(&list).expect("serialize"))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        Self {
            bin_dirs: vec![bin_dir, system_cni_bin_dir()],
            node_netns: PathBuf::from("/run/netns").join(node),
            conf_dir,
            conflist: path,
            loopback_conf: json!({
                "cniVersion": CNI_VERSION,
                "name": "cni-loopback",
                "type": "loopback",
            }),
        }
    }

    /// The runtime's network: the first configuration file by name (as
    /// lattice-cni finds it), read at each call (containerd reloads it when
    /// it changes).
    fn network(&self) -> Result<(Value, PathBuf), String> {
        let file =
            lattice_cni::conf::runtime_config_file(&self.conf_dir).map_err(|e| e.to_string())?;
        let bytes = fs::read(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
        let conf = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not JSON: {e}", file.display()))?;
        Ok((conf, file))
    }

    /// The list's plugins, each with the list's `cniVersion` and `name`.
    fn chain(&self) -> Result<Vec<Value>, String> {
        let (list, file) = self.network()?;
        let plugins = list["plugins"]
            .as_array()
            .ok_or_else(|| format!("{}: no plugin list", file.display()))?;
        Ok(plugins
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p["cniVersion"] = list["cniVersion"].clone();
                p["name"] = list["name"].clone();
                p
            })
            .collect())
    }

    /// CNI ADD: `loopback`, then the chain, each plugin's result passed to
    /// the next. On failure, DEL (as the spec asks of a runtime) and the
    /// failing plugin's error.
    fn add(&self, a: &Attachment) -> Result<Value, String> {
        let added = (|| {
            self.call(&self.loopback_conf, "lo", "ADD", a)?;
            let mut result = None;
            for mut plugin in self.chain()? {
                if let Some(prev) = result.take() {
                    plugin["prevResult"] = prev;
                }
                let out = self.call(&plugin, "eth0", "ADD", a)?;
                result = Some(serde_json::from_slice(&out).map_err(|e| {
                    format!(
                        "CNI {} ADD: result is not JSON ({e}): {}",
                        plugin["type"],
                        String::from_utf8_lossy(&out)
                    )
                })?);
            }
            result.ok_or_else(|| "the CNI configuration list is empty".to_owned())
        })();
        if added.is_err() {
            self.del(a);
        }
        added
    }

    /// CNI DEL: the chain in reverse, then `loopback`; failures are
    /// reported, not raised (it runs from Drop).
    fn del(&self, a: &Attachment) {
        let chain = self.chain().unwrap_or_else(|e| {
            eprintln!("lattice-tests: CNI DEL: {e}");
            Vec::new()
        });
        for plugin in chain
            .iter()
            .rev()
            .chain(std::iter::once(&self.loopback_conf))
        {
            let ifname = if plugin["type"] == "loopback" {
                "lo"
            } else {
                "eth0"
            };
            if let Err(e) = self.call(plugin, ifname, "DEL", a) {
                eprintln!("lattice-tests: {e}");
            }
        }
    }

    /// The plugin named by `conf`'s `type`, found in `CNI_PATH`.
    fn call(
        &self,
        conf: &Value,
        ifname: &str,
        command: &str,
        a: &Attachment,
    ) -> Result<Vec<u8>, String> {
        let program = conf["type"].as_str().unwrap_or_default().to_owned();
        let binary = self
            .bin_dirs
            .iter()
            .map(|d| d.join(&program))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("CNI plugin {program:?} not found in {:?}", self.bin_dirs))?;
        let cni_path = std::env::join_paths(&self.bin_dirs).expect("CNI_PATH");
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.node_netns.display()))
            .arg("--")
            .arg(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", &a.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("CNI {program} {command}: spawn: {e}"))?;
        // A few KiB at most: fits the pipe, no deadlock before reading.
        let written = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(&serde_json::to_vec(conf).expect("serialize"))
            .map_err(|e| format!("CNI {program} {command}: writing the config: {e}"));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("CNI {program} {command}: {e}"))?;
        written?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            // Plugins report errors as JSON on stdout.
            Err(format!(
                "CNI {program} {command} (container {}, netns {}): {}: {} {}",
                a.container_id,
                a.netns.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// The first IPv4 address of a CNI 1.0 result (`ips[].address`, a CIDR).
fn pod_ip(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split_once('/')
            .and_then(|(addr, _)| addr.parse().ok())
    })
}

/// Where the system's CNI plugins are: `$LATTICE_CNI_PATH`, else Debian's
/// /usr/lib/cni, else the upstream default /opt/cni/bin.
fn system_cni_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LATTICE_CNI_PATH") {
        return PathBuf::from(dir);
    }
    ["/usr/lib/cni", "/opt/cni/bin"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("bridge").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no CNI plugins in /usr/lib/cni or /opt/cni/bin: \
                 apt-get install containernetworking-plugins (or set LATTICE_CNI_PATH)"
            )
        })
}

/// mkdir (the parent must exist, the directory must not) with exactly
/// `mode`, whatever the umask.
fn mkdir_mode(path: &Path, mode: u32) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    chmod(path, mode);
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Creates `..YYYY_MM_DD_HH_MM_SS.<random>` (UTC) in `dir` with mode 0755,
/// like the atomic writer's `os.MkdirTemp`; returns its name.
fn new_timestamp_dir(dir: &Path) -> String {
    let (y, m, d, hh, mm, ss) = utc(unix_now());
    let stamp = format!("..{y:04}_{m:02}_{d:02}_{hh:02}_{mm:02}_{ss:02}.");
    loop {
        let suffix = u32::from_le_bytes(random_bytes::<4>());
        let name = format!("{stamp}{suffix}");
        match fs::create_dir(dir.join(&name)) {
            Ok(()) => {
                chmod(&dir.join(&name), 0o755);
                return name;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("mkdir {}/{name}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_cgroup_names() {
        let uid = "8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d";
        assert_eq!(
            pod_cgroup_relative(CgroupDriver::Systemd, Qos::BestEffort, uid),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod8a1d4b5c_2f3e_4a6b_9c7d_0e1f2a3b4c5d.slice"
            )
        );
        assert_eq!(
            pod_cgroup_relative(CgroupDriver::Cgroupfs, Qos::Guaranteed, uid),
            Path::new("kubepods/pod8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d")
        );
        assert_eq!(
            container_cgroup_name(CgroupDriver::Systemd, "ab"),
            "cri-containerd-ab.scope"
        );
    }
}
