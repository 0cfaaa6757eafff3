//! Enrolling one pod: find its network namespace, create the proxy's
//! listeners inside it, start the pod's proxy with the pod's own
//! credentials, then, and only then, let the eBPF programs redirect that
//! namespace's Lattice connects.
//!
//! The namespace is given (by the CNI plugin as the pod's sandbox starts,
//! or by the agent this one replaces), or found for a running pod: its
//! cgroup, a process in it, that process's namespace, checked to hold the
//! pod's IP.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    handover::{HandedOver, HandedPod},
    identity::{IdentityError, IdentityLease, IdentityStore},
    pod_spec::PodPlan,
};
use crate::{
    bpf::{BpfError, NetnsGate, NetnsOrigDst, OrigDstMap},
    credentials::WorkloadCredentials,
    metrics::{Counts, Metrics, WorkloadLabels, WorkloadMetrics},
    netns::{NetNs, NetnsError, SocketFactory, local_addresses},
    pod_cgroup::{self, PodCgroupError},
    proxy::{ProxyConfig, WorkloadProxy},
    workload::{ListenError, Listeners, Workload, bind_loopback},
};

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
    /// Listeners the agent this one replaces handed over, by pod UID,
    /// until their pods are enrolled on them.
    pub handed_over: std::sync::Mutex<HandedOver>,
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
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("starting the pod's proxy")]
    Start(#[source] io::Error),
    #[error("enrolling the pod's network namespace in the interceptor")]
    Gate(#[source] BpfError),
}

/// A served pod. [`EnrolledPod::unenroll`] undoes it.
pub struct EnrolledPod {
    pub plan: PodPlan,
    /// Second descriptors of its listening sockets, to hand them over.
    pub listener_fds: Vec<std::os::fd::OwnedFd>,
    pub netns: Arc<NetNs>,
    /// The namespace was given rather than found through the pod's IP:
    /// the pod is served whether or not the API shows an IP yet.
    pub netns_given: bool,
    workload: Workload,
    /// Holds the pod's identity alive (and its token file in use).
    lease: Option<IdentityLease>,
    metrics: WorkloadMetrics,
    /// Why requests get 503, when the pod has no usable identity.
    pub missing_identity: Option<String>,
}

impl EnrolledPod {
    pub fn netns_cookie(&self) -> u64 {
        self.workload.netns_cookie()
    }

    pub fn counts(&self) -> Arc<Counts> {
        Arc::clone(&self.metrics.counts)
    }

    /// Stops redirecting the pod's connects, then stops its proxy (in the
    /// background: in-flight requests drain for up to `--drain-timeout`).
    pub fn unenroll(self, ctx: &NodeContext) -> tokio::task::JoinHandle<()> {
        if let Err(e) = ctx.gate.unenroll(self.netns_cookie()) {
            tracing::warn!(pod = %self.plan.display_name(), error = %e, "could not remove the pod from the interceptor");
        }
        self.stop(ctx)
    }

    /// Stops the proxy but leaves the namespace enrolled: its Lattice
    /// connects are then refused (no listener) rather than sent unsigned.
    pub fn stop(self, ctx: &NodeContext) -> tokio::task::JoinHandle<()> {
        let Self {
            plan,
            workload,
            lease,
            metrics,
            ..
        } = self;
        let all = Arc::clone(&ctx.metrics);
        tokio::spawn(async move {
            if let Err(e) = workload.stop().await {
                tracing::warn!(pod = %plan.display_name(), error = %e, "pod proxy stopped with an error");
            }
            all.forget_workload(&metrics);
            drop(lease);
        })
    }
}

/// Enrolls `plan`'s running pod, in the namespace the agent it replaces
/// handed over or else the one found through its cgroup; nothing is left
/// behind on error.
pub fn enroll(ctx: &NodeContext, plan: PodPlan) -> Result<EnrolledPod, EnrollError> {
    match take_handed_over(ctx, &plan.uid) {
        Some(HandedPod {
            listeners,
            netns: Some(fd),
        }) => {
            let netns = NetNs::from_fd(fd, format!("handed over for pod {}", plan.uid))?;
            serve(ctx, plan, Arc::new(netns), Some(listeners), true)
        }
        handed => {
            let netns = find_netns(ctx, &plan)?;
            serve(ctx, plan, netns, handed.map(|h| h.listeners), false)
        }
    }
}

/// Enrolls `plan`'s pod in `netns`, the namespace the CNI plugin passed as
/// the pod's sandbox starts (before the API shows an IP).
pub fn enroll_in(
    ctx: &NodeContext,
    plan: PodPlan,
    netns: NetNs,
) -> Result<EnrolledPod, EnrollError> {
    let handed = take_handed_over(ctx, &plan.uid).map(|h| h.listeners);
    serve(ctx, plan, Arc::new(netns), handed, true)
}

fn take_handed_over(ctx: &NodeContext, uid: &str) -> Option<HandedPod> {
    ctx.handed_over
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(uid)
}

/// The namespace of a process in the pod's cgroup, if it holds the pod's IP.
fn find_netns(ctx: &NodeContext, plan: &PodPlan) -> Result<Arc<NetNs>, EnrollError> {
    let cgroup = pod_cgroup::find_pod_cgroup(&ctx.cgroup_root, &plan.uid, "")?;
    let pid = first_process(&cgroup)?;
    let netns = Arc::new(NetNs::of_process(&ctx.proc_root, pid)?);
    let found =
        netns
            .run(&ctx.home, local_addresses)?
            .map_err(|source| EnrollError::Addresses {
                netns: netns.path().to_owned(),
                source,
            })?;
    if !plan.ips.iter().any(|ip| found.contains(ip)) {
        return Err(EnrollError::WrongNetns {
            pid,
            cgroup,
            expected: plan.ips.clone(),
            found,
        });
    }
    Ok(netns)
}

/// Listeners (handed over, if they are in `netns`, else new ones), the
/// pod's proxy, and last the interceptor's redirect.
fn serve(
    ctx: &NodeContext,
    plan: PodPlan,
    netns: Arc<NetNs>,
    handed: Option<Vec<std::net::TcpListener>>,
    netns_given: bool,
) -> Result<EnrolledPod, EnrollError> {
    let sockets = SocketFactory::In {
        netns: Arc::clone(&netns),
        home: Arc::clone(&ctx.home),
    };
    let listeners = match adopt_listeners(&plan, handed, &sockets)? {
        Some(l) => l,
        None => bind_loopback(ctx.proxy_port, &sockets, true)?,
    };
    let listener_fds = listeners.duplicates().map_err(EnrollError::Start)?;
    let netns_cookie = listeners.netns_cookie;

    let (creds, lease, region) = credentials(&ctx.identities, &plan, &ctx.kubelet_root);
    let missing_identity = match &creds {
        WorkloadCredentials::Missing(why) => Some(why.to_string()),
        WorkloadCredentials::Cache(_) => None,
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
    .map_err(EnrollError::Start)?;
    let pod = EnrolledPod {
        plan,
        listener_fds,
        netns,
        netns_given,
        workload,
        lease,
        metrics,
        missing_identity,
    };
    // Last: the listeners are up, so a redirected connect finds them.
    if let Err(e) = ctx.gate.enroll(netns_cookie) {
        drop(pod.stop(ctx));
        return Err(EnrollError::Gate(e));
    }
    Ok(pod)
}

/// The listening sockets the replaced agent served the pod with, if they
/// are in the pod's namespace.
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
        tracing::warn!(pod = %plan.display_name(), "handed-over listeners are not in the pod's network namespace; binding new ones");
        return Ok(None);
    }
    tracing::debug!(pod = %plan.display_name(), "serving on the listeners the replaced agent handed over");
    Ok(Some(listeners))
}

/// The pod's credentials, its identity lease, and its signing region.
fn credentials(
    identities: &IdentityStore,
    plan: &PodPlan,
    kubelet_root: &Path,
) -> (WorkloadCredentials, Option<IdentityLease>, Option<String>) {
    let region = match identities.region_of(plan) {
        Ok(r) => r,
        Err(e @ IdentityError::NoRegion { .. }) => {
            return (
                WorkloadCredentials::Missing(e.to_string().into()),
                None,
                None,
            );
        }
    };
    match identities.lease(plan, &region, kubelet_root) {
        Ok(lease) => (lease.credentials(), Some(lease), Some(region)),
        Err(why) => (WorkloadCredentials::Missing(why.into()), None, Some(region)),
    }
}

/// A process in the pod's cgroup or below (containers have cgroups of
/// their own under the pod's).
fn first_process(cgroup: &Path) -> Result<u32, EnrollError> {
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let err = |source| EnrollError::Processes {
            cgroup: dir.clone(),
            source,
        };
        let procs = fs::read_to_string(dir.join("cgroup.procs")).map_err(err)?;
        if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
            return Ok(pid);
        }
        for entry in fs::read_dir(&dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            if entry.file_type().map_err(err)?.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Err(EnrollError::NoProcess {
        cgroup: cgroup.to_owned(),
    })
}
