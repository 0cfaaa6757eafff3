//! Enrolling one pod: find its network namespace, create the proxy's
//! listeners inside it, start the pod's proxy with the pod's own
//! credentials, then, and only then, let the eBPF programs redirect that
//! namespace's Lattice connects.
//!
//! The namespace is given (by the CNI plugin as the pod's sandbox starts,
//! or by the agent this one replaces), or found for a running pod: its
//! cgroup, a process in it, that process's namespace, checked to hold the
//! pod's IP. What enrolling makes is a [`Served`], which the pod's entry
//! in the table ([`super::state`]) owns until it stops.

use std::{
    fs, io,
    net::IpAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    handover::{HandedPod, ServedPod},
    identity::{IdentityError, IdentityLease, IdentityStore},
    pod_spec::PodPlan,
    state::{self, NetnsId, Seen},
};
use crate::{
    bpf::{BpfError, NetnsGate, NetnsOrigDst, OrigDstMap},
    credentials::{NoIdentity, WorkloadCredentials},
    metrics::{Counts, Metrics, WorkloadLabels, WorkloadMetrics},
    netns::{NetNs, NetnsError, SocketFactory, local_addresses},
    pod_cgroup::{self, PodCgroupError},
    proxy::{ProxyConfig, WorkloadProxy},
    workload::{ListenError, Listeners, Workload, bind_loopback},
};

/// Processes of a pod looked at to tell whether it still lives in the
/// namespace it is served in (the first one usually does).
const PROCESSES_CHECKED: usize = 64;

/// What every enrollment on this node shares.
pub struct NodeContext {
    /// The proxy settings; the signing region is set per pod.
    pub proxy: ProxyConfig,
    pub proxy_port: u16,
    pub cgroup_root: PathBuf,
    pub kubelet_root: PathBuf,
    pub proc_root: PathBuf,
    /// The agent's own network namespace, where its threads return.
    pub home: Arc<NetNs>,
    pub gate: NetnsGate,
    pub orig_dst: Arc<OrigDstMap>,
    pub metrics: Arc<Metrics>,
    pub identities: IdentityStore,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Cgroup(#[from] PodCgroupError),
    #[error("no process in the pod's cgroup {} yet", cgroup.display())]
    NoProcess { cgroup: PathBuf },
    #[error("reading the processes of {}", cgroup.display())]
    Processes {
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listing the addresses in {}", netns.display())]
    Addresses {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the network namespace of process {pid} in {} does not hold the pod's IP {expected:?} (it has {found:?})",
        cgroup.display()
    )]
    WrongNetns {
        pid: u32,
        cgroup: PathBuf,
        expected: Vec<IpAddr>,
        found: Vec<IpAddr>,
    },
    #[error(
        "process {pid} in {} is in the node's network namespace, not a pod's",
        cgroup.display()
    )]
    NodeNetns { pid: u32, cgroup: PathBuf },
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("starting the pod's proxy")]
    Start(#[source] io::Error),
    #[error("enrolling the pod's network namespace in the interceptor")]
    Gate(#[source] BpfError),
}

/// A failed enrollment, and the namespace (cookie) a process of the pod
/// was found in, if any: it stays in the gate while the pod fails.
#[derive(Debug)]
pub struct Failure {
    pub error: EnrollError,
    pub netns_cookie: Option<u64>,
}

impl Failure {
    fn before_netns(error: impl Into<EnrollError>) -> Self {
        Self {
            error: error.into(),
            netns_cookie: None,
        }
    }

    /// `error` for a pod whose processes live in `netns`.
    fn in_netns(ctx: &NodeContext, netns: &Arc<NetNs>, error: impl Into<EnrollError>) -> Self {
        Self {
            error: error.into(),
            netns_cookie: cookie_of(ctx, netns),
        }
    }
}

/// An enrolled pod, as its table entry holds it.
pub type Enrolled = state::Enrolled<Served>;

/// What serves an enrolled pod: its proxy on its listeners, second
/// descriptors of those listeners (to hand them on), its namespace, its
/// identity lease and its series. [`Served::stop`] undoes it all but the
/// gate entry, which is the table's.
pub struct Served {
    /// `namespace/name`, for logs.
    pod: String,
    listener_fds: Vec<OwnedFd>,
    netns: Arc<NetNs>,
    workload: Workload,
    /// Holds the pod's identity alive (and its token file in use).
    lease: Option<IdentityLease>,
    metrics: WorkloadMetrics,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("pod", &self.pod)
            .field("netns", &self.netns.path())
            .field("netns_cookie", &self.workload.netns_cookie())
            .finish_non_exhaustive()
    }
}

impl Served {
    pub fn counts(&self) -> Arc<Counts> {
        Arc::clone(&self.metrics.counts)
    }

    /// Duplicates of its listening sockets and namespace, for an agent
    /// taking over.
    pub fn handover(&self) -> io::Result<ServedPod> {
        Ok(ServedPod {
            listeners: self
                .listener_fds
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<io::Result<Vec<_>>>()?,
            netns: Some(self.netns.duplicate()?),
        })
    }

    /// Its listening sockets (second descriptors), for the pod's next
    /// enrollment to serve on if it is in the same namespace: connects
    /// queued on them are then served, not reset. Taken, they close with
    /// that enrollment (or its failure), no longer with [`Served::stop`].
    pub fn take_listeners(&mut self) -> Vec<std::net::TcpListener> {
        std::mem::take(&mut self.listener_fds)
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect()
    }

    /// Stops the proxy (in the background: in-flight requests drain for up
    /// to `--drain-timeout`). Its listeners close at once, duplicates too:
    /// while the pod's namespace stays in the gate its Lattice connects
    /// are refused, neither sent unsigned nor left waiting in a backlog no
    /// one accepts from.
    pub fn stop(self, ctx: &NodeContext) -> tokio::task::JoinHandle<()> {
        let Self {
            pod,
            listener_fds,
            netns,
            workload,
            lease,
            metrics,
        } = self;
        drop(listener_fds);
        let all = Arc::clone(&ctx.metrics);
        tokio::spawn(async move {
            workload.stop().await;
            tracing::debug!(%pod, "pod proxy stopped");
            drop(netns);
            all.forget_workload(&metrics);
            drop(lease);
        })
    }
}

/// Enrolls `plan`'s pod: in `given` (the sandbox's namespace, from the CNI
/// plugin), else in the namespace the replaced agent `handed` over with
/// its sockets, else in the one found through its cgroup. Listeners
/// `handed` over (or the pod's own from before it was enrolled anew) are
/// served on if they are in that namespace; nothing is left behind on
/// error but the failure's namespace (see [`Failure`]).
pub fn enroll(
    ctx: &NodeContext,
    plan: PodPlan,
    handed: Option<HandedPod>,
    given: Option<NetNs>,
) -> Result<Enrolled, Failure> {
    let (netns, listeners, is_given) = match (given, handed) {
        (Some(netns), handed) => (Arc::new(netns), handed.map(|h| h.listeners), true),
        (
            None,
            Some(HandedPod {
                listeners,
                netns: Some(fd),
            }),
        ) => {
            let netns = NetNs::from_fd(fd, format!("handed over for pod {}", plan.uid))
                .map_err(Failure::before_netns)?;
            (Arc::new(netns), Some(listeners), true)
        }
        (None, handed) => (find_netns(ctx, &plan)?, handed.map(|h| h.listeners), false),
    };
    serve(ctx, plan, netns, listeners, is_given)
}

/// The namespace of a process in the pod's cgroup, if it holds the pod's IP.
fn find_netns(ctx: &NodeContext, plan: &PodPlan) -> Result<Arc<NetNs>, Failure> {
    let cgroup = pod_cgroup::find_pod_cgroup(&ctx.cgroup_root, &plan.uid, "")
        .map_err(Failure::before_netns)?;
    let pid = first_process(&cgroup).map_err(Failure::before_netns)?;
    let netns = Arc::new(NetNs::of_process(&ctx.proc_root, pid).map_err(Failure::before_netns)?);
    if is_home(ctx, &netns) {
        return Err(Failure::before_netns(EnrollError::NodeNetns {
            pid,
            cgroup,
        }));
    }
    let found = netns
        .run(&ctx.home, local_addresses)
        .map_err(|e| Failure::in_netns(ctx, &netns, e))?
        .map_err(|source| {
            let error = EnrollError::Addresses {
                netns: netns.path().to_owned(),
                source,
            };
            Failure::in_netns(ctx, &netns, error)
        })?;
    if !plan.ips.iter().any(|ip| found.contains(ip)) {
        let error = EnrollError::WrongNetns {
            pid,
            cgroup,
            expected: plan.ips.clone(),
            found,
        };
        return Err(Failure::in_netns(ctx, &netns, error));
    }
    Ok(netns)
}

/// Where the pod's processes are, against `served`: whether any of them
/// (the first [`PROCESSES_CHECKED`]) still lives in that namespace.
pub fn where_processes_are(ctx: &NodeContext, uid: &str, served: NetnsId) -> Seen {
    let Ok(cgroup) = pod_cgroup::find_pod_cgroup(&ctx.cgroup_root, uid, "") else {
        return Seen::Unknown;
    };
    let mut any = false;
    for pid in processes(&cgroup).take(PROCESSES_CHECKED) {
        // The process may have exited since it was listed.
        let Ok(meta) = fs::metadata(ctx.proc_root.join(pid.to_string()).join("ns/net")) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt as _;
        if (meta.dev(), meta.ino()) == served {
            return Seen::Served;
        }
        any = true;
    }
    if any { Seen::Elsewhere } else { Seen::Unknown }
}

/// The cookie of the namespace a process of the pod lives in, if it has
/// one (and it is not the node's): for a pod that asks for signing but is
/// not served yet, that namespace must stay in the gate.
pub fn process_netns_cookie(ctx: &NodeContext, uid: &str) -> Option<u64> {
    let cgroup = pod_cgroup::find_pod_cgroup(&ctx.cgroup_root, uid, "").ok()?;
    let pid = first_process(&cgroup).ok()?;
    let netns = Arc::new(NetNs::of_process(&ctx.proc_root, pid).ok()?);
    cookie_of(ctx, &netns)
}

/// The cookie of `netns` (what the gate keys it by), unless it is the
/// node's own namespace, which is never gated.
fn cookie_of(ctx: &NodeContext, netns: &Arc<NetNs>) -> Option<u64> {
    if is_home(ctx, netns) {
        return None;
    }
    let sockets = SocketFactory::In {
        netns: Arc::clone(netns),
        home: Arc::clone(&ctx.home),
    };
    let probe = sockets
        .tcp_socket(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .ok()?;
    crate::netns::netns_cookie(&probe).ok()
}

fn is_home(ctx: &NodeContext, netns: &NetNs) -> bool {
    matches!((netns.id(), ctx.home.id()), (Ok(a), Ok(b)) if a == b)
}

/// Listeners (handed over, if they are in `netns`, else new ones), the
/// pod's proxy, and last the interceptor's redirect.
fn serve(
    ctx: &NodeContext,
    plan: PodPlan,
    netns: Arc<NetNs>,
    handed: Option<Vec<std::net::TcpListener>>,
    given: bool,
) -> Result<Enrolled, Failure> {
    let netns_id = netns
        .id()
        .map_err(|e| Failure::in_netns(ctx, &netns, EnrollError::Start(e)))?;
    let sockets = SocketFactory::In {
        netns: Arc::clone(&netns),
        home: Arc::clone(&ctx.home),
    };
    let fail = |error: EnrollError| Failure::in_netns(ctx, &netns, error);
    let listeners = match adopt_listeners(&plan, handed, &sockets).map_err(fail)? {
        Some(l) => l,
        None => bind_loopback(ctx.proxy_port, &sockets, true).map_err(|e| fail(e.into()))?,
    };
    let listener_fds = listeners
        .duplicates()
        .map_err(|e| fail(EnrollError::Start(e)))?;
    let netns_cookie = listeners.netns_cookie;

    let (lease, region) = identity(&ctx.identities, &plan, &ctx.kubelet_root);
    let (creds, lease, missing_identity) = match lease {
        Ok(lease) => (lease.credentials(), Some(lease), None),
        Err(why) => (
            WorkloadCredentials::Missing(Arc::clone(&why) as NoIdentity),
            None,
            Some(why),
        ),
    };
    let mut cfg = ctx.proxy.clone();
    cfg.signing.region = region.unwrap_or_default();
    if let Some(rules) = &plan.options.upstream_tls {
        cfg.tls_rules = Arc::clone(rules);
    }
    let metrics = ctx
        .metrics
        .workload(WorkloadLabels::pod(&plan.namespace, &plan.name));
    let workload = Workload::start(
        WorkloadProxy {
            cfg: Arc::new(cfg),
            sockets,
            orig_dst: Arc::new(NetnsOrigDst {
                map: Arc::clone(&ctx.orig_dst),
                netns: netns_cookie,
            }),
            creds,
            metrics: metrics.clone(),
        },
        listeners,
    )
    .map_err(|e| {
        ctx.metrics.forget_workload(&metrics);
        fail(EnrollError::Start(e))
    })?;
    let served = Served {
        pod: plan.display_name(),
        listener_fds,
        netns,
        workload,
        lease,
        metrics,
    };
    // Last: the listeners are up, so a redirected connect finds them.
    if let Err(e) = ctx.gate.enroll(netns_cookie) {
        drop(served.stop(ctx));
        return Err(Failure {
            error: EnrollError::Gate(e),
            netns_cookie: Some(netns_cookie),
        });
    }
    Ok(state::Enrolled {
        plan,
        netns: netns_id,
        cookie: netns_cookie,
        given,
        sandbox: None,
        missing_identity,
        served,
    })
}

/// The listening sockets the pod was served on (by the replaced agent, or
/// by this one before it was enrolled anew), if they are in its namespace.
fn adopt_listeners(
    plan: &PodPlan,
    handed: Option<Vec<std::net::TcpListener>>,
    sockets: &SocketFactory,
) -> Result<Option<Listeners>, EnrollError> {
    let Some(handed) = handed else {
        return Ok(None);
    };
    let listeners = Listeners::adopt(handed)?;
    let probe = sockets
        .tcp_socket(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(EnrollError::Start)?;
    let pod_netns = crate::netns::netns_cookie(&probe).map_err(EnrollError::Start)?;
    if pod_netns != listeners.netns_cookie {
        tracing::info!(pod = %plan.display_name(), "the listeners the pod was served on are in another network namespace than its own; binding new ones");
        return Ok(None);
    }
    tracing::debug!(pod = %plan.display_name(), "serving on the listeners the pod was served on");
    Ok(Some(listeners))
}

/// A lease on the pod's identity, or why it has none (shared: its
/// requests, its row in `/pods` and its Event tell it); and its signing
/// region.
fn identity(
    identities: &IdentityStore,
    plan: &PodPlan,
    kubelet_root: &Path,
) -> (Result<IdentityLease, Arc<IdentityError>>, Option<String>) {
    let region = match identities.region_of(plan) {
        Ok(r) => r,
        Err(e) => return (Err(Arc::new(e)), None),
    };
    let lease = identities
        .lease(plan, &region, kubelet_root)
        .map_err(Arc::new);
    (lease, Some(region))
}

/// A process in the pod's cgroup or below (containers have cgroups of
/// their own under the pod's).
fn first_process(cgroup: &Path) -> Result<u32, EnrollError> {
    // Unreadable cgroups are an error here, not an empty pod.
    fs::read_dir(cgroup).map_err(|source| EnrollError::Processes {
        cgroup: cgroup.to_owned(),
        source,
    })?;
    processes(cgroup)
        .next()
        .ok_or_else(|| EnrollError::NoProcess {
            cgroup: cgroup.to_owned(),
        })
}

/// The processes in the pod's cgroup and below, depth first, read as
/// they are needed.
fn processes(cgroup: &Path) -> impl Iterator<Item = u32> {
    let mut dirs = vec![cgroup.to_owned()];
    let mut pids: std::vec::IntoIter<u32> = Vec::new().into_iter();
    std::iter::from_fn(move || {
        loop {
            if let Some(pid) = pids.next() {
                return Some(pid);
            }
            let dir = dirs.pop()?;
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids = procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
                    .into_iter();
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    })
}
