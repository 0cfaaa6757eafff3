//! Node mode: one agent serves every enrolled pod of its node.
//!
//! The agent watches the pods scheduled on its node (field selector
//! `spec.nodeName`) and all namespaces (for the enrollment label) through
//! kube-rs reflectors, and reconciles after every change: pods that ask
//! for signing and run with an IP are enrolled (see [`enroll`]), pods that
//! stop asking or go away are unenrolled, failures are retried with
//! backoff. Pods already running when the agent starts are enrolled from
//! the first list; none needs a restart.
//!
//! With the CNI plugin chained (`--cni-conf-dir`), a pod is enrolled
//! earlier: while its sandbox starts, before any of its containers runs
//! (see [`cni`]); the API watch then only confirms it.
//!
//! Modules: [`pod_spec`] decides from the API object, [`identity`] holds
//! each pod's AWS identity, [`enroll`] does the work on the node,
//! [`events`] tells `kubectl describe pod`, [`handover`] passes the pods'
//! listeners from an agent to the one replacing it, [`cni`] answers the
//! CNI plugin and keeps it chained.

pub mod cni;
pub mod enroll;
pub mod events;
pub mod handover;
pub mod identity;
pub mod pod_spec;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use lattice_cni::protocol::{Command, Reply};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use self::{
    cni::{CniCall, CniSettings, PodLookup},
    enroll::{EnrolledPod, NodeContext},
    events::{EventPublisher, Kind, PodRef},
    pod_spec::{Decision, IdentityPlan, PodPlan},
};
use crate::{
    admin::{PodsReport, Readiness},
    metrics::Counts,
    netns::NetNs,
};

/// First retry of a failed enrollment; doubles up to [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The node agent's pods and the loop that keeps them in line with the API.
pub struct NodeAgent {
    ctx: NodeContext,
    events: EventPublisher,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    state: HashMap<String, PodState>,
    report: Arc<NodeReport>,
    /// The listening sockets of the pods served, for a successor.
    served: Arc<ServedListeners>,
    /// The agent this one replaces, until told it has taken over.
    predecessor: Option<handover::Predecessor>,
    client: kube::Client,
    /// The CNI plugin's socket (served once ready) and settings.
    cni: Option<(std::os::unix::net::UnixListener, Arc<CniSettings>)>,
    /// Pods whose sandbox the runtime deleted (CNI DEL): not enrolled again
    /// through a process of theirs until a new sandbox is added.
    sandbox_deleted: HashSet<String>,
    /// Served once this agent is ready.
    control: Option<std::os::unix::net::UnixListener>,
    readiness: Arc<Readiness>,
}

/// A served pod's listening sockets (second descriptors) and namespace.
type ServedPod = (Vec<OwnedFd>, Arc<NetNs>);

/// Second descriptors of every served pod's listening sockets, with its
/// network namespace, and the signal that a successor has taken them over.
#[derive(Default)]
struct ServedListeners {
    pods: Mutex<HashMap<String, ServedPod>>,
    replaced: CancellationToken,
}

impl ServedListeners {
    fn insert(&self, uid: &str, fds: Vec<OwnedFd>, netns: Arc<NetNs>) {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_owned(), (fds, netns));
    }

    fn remove(&self, uid: &str) {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }
}

impl handover::Listeners for ServedListeners {
    fn listeners(&self) -> Vec<(String, handover::ServedPod)> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.iter()
            .filter_map(|(uid, (fds, netns))| {
                let dups = || -> std::io::Result<handover::ServedPod> {
                    Ok(handover::ServedPod {
                        listeners: fds
                            .iter()
                            .map(OwnedFd::try_clone)
                            .collect::<std::io::Result<Vec<_>>>()?,
                        netns: Some(netns.duplicate()?),
                    })
                };
                match dups() {
                    Ok(d) => Some((uid.clone(), d)),
                    Err(e) => {
                        tracing::warn!(pod_uid = %uid, error = %e, "cannot hand a pod's listeners over");
                        None
                    }
                }
            })
            .collect()
    }

    fn handed_over(&self) {
        self.replaced.cancel();
    }
}

enum PodState {
    Enrolled(Box<EnrolledPod>),
    Failed {
        plan: PodPlan,
        reason: String,
        attempts: u32,
        retry_at: Instant,
    },
    Refused {
        pod: PodRef,
        reason: String,
    },
}

/// Starts the watches; returns the agent (to [`NodeAgent::run`]), a
/// notification that fires on every change, and a token cancelled once
/// both first lists are in.
pub struct Watches {
    pub changed: Arc<Notify>,
    pub listed: CancellationToken,
}

/// What [`NodeAgent::new`] needs besides the node context.
pub struct Startup {
    pub client: kube::Client,
    pub node_name: String,
    /// The agent being replaced, when one handed its listeners over.
    pub predecessor: Option<handover::Predecessor>,
    /// The control socket, bound, for the agent that will replace this one.
    pub control: std::os::unix::net::UnixListener,
    /// The CNI plugin's socket, bound, and the plugin's settings.
    pub cni: Option<(std::os::unix::net::UnixListener, Arc<CniSettings>)>,
    pub readiness: Arc<Readiness>,
}

impl NodeAgent {
    pub fn new(
        ctx: NodeContext,
        startup: Startup,
        shutdown: &CancellationToken,
    ) -> (Self, Watches) {
        let Startup {
            client,
            node_name,
            predecessor,
            control,
            cni,
            readiness,
        } = startup;
        let changed = Arc::new(Notify::new());
        let listed = CancellationToken::new();
        let pods_api: Api<Pod> = Api::all(client.clone());
        let pods_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let (pods, pods_listed) = spawn_reflector(pods_api, pods_cfg, &changed, shutdown, "pods");
        let ns_api: Api<Namespace> = Api::all(client.clone());
        let (namespaces, ns_listed) = spawn_reflector(
            ns_api,
            watcher::Config::default(),
            &changed,
            shutdown,
            "namespaces",
        );
        {
            let listed = listed.clone();
            tokio::spawn(async move {
                pods_listed.cancelled().await;
                ns_listed.cancelled().await;
                listed.cancel();
            });
        }
        let agent = Self {
            ctx,
            events: EventPublisher::new(client.clone(), &node_name),
            pods,
            namespaces,
            state: HashMap::new(),
            report: Arc::new(NodeReport::default()),
            served: Arc::default(),
            predecessor,
            client,
            cni,
            sandbox_deleted: HashSet::new(),
            control: Some(control),
            readiness,
        };
        (agent, Watches { changed, listed })
    }

    pub fn report(&self) -> Arc<NodeReport> {
        Arc::clone(&self.report)
    }

    /// Reconciles on every change and retry until `shutdown`; then stops
    /// every pod's proxy, leaving their namespaces enrolled (with pinned
    /// programs their Lattice connects are refused until an agent serves
    /// them again: never sent unsigned). Ready once the first list is
    /// served (and, replacing an agent, taken over from it). When a newer
    /// agent takes this one's listeners over, it stops serving and leaves
    /// the shared state to it.
    pub async fn run(mut self, watches: Watches, shutdown: CancellationToken) {
        watches.listed.cancelled().await;
        let mut next_retry = self.reconcile();
        if let Some(predecessor) = self.predecessor.take() {
            match tokio::task::spawn_blocking(move || predecessor.taken()).await {
                Ok(Ok(())) => tracing::info!("took over from the agent this one replaces"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::credentials::error_chain(&e), "the replaced agent did not confirm the takeover")
                }
                Err(e) => tracing::warn!(error = %e, "takeover task failed"),
            }
        }
        let leftover = std::mem::take(
            &mut *self
                .ctx
                .handed_over
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if !leftover.is_empty() {
            tracing::info!(
                pods = leftover.len(),
                "closing listeners handed over for pods not served any more"
            );
        }
        if let Err(e) = self.serve_control(&shutdown) {
            tracing::warn!(error = %crate::credentials::error_chain(&e), "no control socket: a new agent will not be able to take over without losing connections");
        }
        let (mut cni_calls, cni_settings) = self.serve_cni(&shutdown);
        self.readiness.set_pods_listed(true);
        tracing::info!("lattice-agent ready (node mode)");
        let replaced = self.served.replaced.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(call) = recv(&mut cni_calls) => {
                    self.handle_cni(call);
                    continue;
                }
                () = replaced.cancelled() => {
                    tracing::info!("a new agent took the pods over: not accepting any more; draining");
                    self.readiness.set_listening(false);
                    self.stop_all().await;
                    shutdown.cancelled().await;
                    return;
                }
                () = watches.changed.notified() => {}
                () = sleep_until(next_retry) => {}
            }
            next_retry = self.reconcile();
        }
        self.stop_all().await;
        if let Some(settings) = cni_settings
            && cni::leaving_for_good(&self.client).await
        {
            cni::uninstall(&settings);
        }
    }

    /// Starts answering the CNI plugin and keeping it chained, if
    /// configured; returns the calls to handle and the settings.
    fn serve_cni(
        &mut self,
        shutdown: &CancellationToken,
    ) -> (Option<mpsc::Receiver<CniCall>>, Option<Arc<CniSettings>>) {
        let Some((listener, settings)) = self.cni.take() else {
            return (None, None);
        };
        cni::spawn_keeper(
            Arc::clone(&settings),
            Arc::clone(&self.readiness),
            shutdown.clone(),
        );
        let (tx, rx) = mpsc::channel(64);
        let lookup = PodLookup {
            pods: self.pods.clone(),
            namespaces: self.namespaces.clone(),
            client: self.client.clone(),
        };
        if let Err(e) = cni::serve(listener, lookup, tx, shutdown.clone()) {
            tracing::warn!(error = %e, "cannot serve the CNI plugin's socket: new pods are enrolled once the API shows them running");
            return (None, Some(settings));
        }
        (Some(rx), Some(settings))
    }

    /// A CNI plugin call, for a pod whose sandbox the runtime is setting
    /// up (`ADD`), checking (`CHECK`) or tearing down (`DEL`).
    fn handle_cni(&mut self, call: CniCall) {
        let CniCall {
            request,
            pod,
            netns,
            reply,
        } = call;
        let answer = match (request.command, pod, netns) {
            (Command::Add, Some((pod, labels)), Some(netns)) => {
                self.cni_add(&pod, labels.as_ref(), netns)
            }
            (Command::Check, Some((pod, labels)), Some(netns)) => {
                self.cni_check(&pod, labels.as_ref(), &netns)
            }
            (Command::Del, ..) => self.cni_del(&request),
            _ => Reply {
                enrolled: false,
                error: Some("incomplete CNI call".into()),
            },
        };
        self.publish_state();
        let _ = reply.send(answer);
    }

    fn cni_add(
        &mut self,
        pod: &Pod,
        labels: Option<&BTreeMap<String, String>>,
        netns: NetNs,
    ) -> Reply {
        let not_enrolled = Reply {
            enrolled: false,
            error: None,
        };
        let plan = match pod_spec::decide_at_start(pod, labels) {
            Decision::Enroll(plan) => *plan,
            Decision::Ignore => return not_enrolled,
            Decision::Refuse(reason) => {
                tracing::warn!(%reason, "not enrolling pod");
                return not_enrolled;
            }
        };
        let uid = plan.uid.clone();
        self.sandbox_deleted.remove(&uid);
        if let Some(PodState::Enrolled(known)) = self.state.get(&uid)
            && same_netns(&known.netns, &netns)
        {
            // The runtime retried an ADD that succeeded.
            return Reply {
                enrolled: true,
                error: None,
            };
        }
        // A new sandbox for a pod served before (or a failed attempt).
        if let Some(PodState::Enrolled(old)) = self.state.remove(&uid) {
            self.served.remove(&uid);
            drop(old.unenroll(&self.ctx));
        }
        let name = plan.display_name();
        let started = Instant::now();
        match enroll::enroll_in(&self.ctx, plan, netns) {
            Ok(pod) => {
                self.record_enrolled(uid, pod, started, "CNI ADD");
                Reply {
                    enrolled: true,
                    error: None,
                }
            }
            Err(e) => {
                self.ctx.metrics.count_enrollment(false);
                let reason = crate::credentials::error_chain(&e);
                tracing::warn!(pod = %name, %reason, "pod enrollment failed (CNI ADD); the runtime will retry");
                Reply {
                    enrolled: false,
                    error: Some(format!(
                        "lattice-agent could not enroll pod {name}: {reason}"
                    )),
                }
            }
        }
    }

    fn cni_check(
        &mut self,
        pod: &Pod,
        labels: Option<&BTreeMap<String, String>>,
        netns: &NetNs,
    ) -> Reply {
        let Decision::Enroll(plan) = pod_spec::decide_at_start(pod, labels) else {
            return Reply {
                enrolled: false,
                error: None,
            };
        };
        match self.state.get(&plan.uid) {
            Some(PodState::Enrolled(known)) if same_netns(&known.netns, netns) => Reply {
                enrolled: true,
                error: None,
            },
            _ => Reply {
                enrolled: false,
                error: Some(format!(
                    "pod {} asks for signing but its network namespace is not enrolled",
                    plan.display_name()
                )),
            },
        }
    }

    fn cni_del(&mut self, request: &lattice_cni::protocol::Request) -> Reply {
        let uid = if request.pod_uid.is_empty() {
            self.state.iter().find_map(|(uid, s)| {
                let plan = match s {
                    PodState::Enrolled(p) => &p.plan,
                    PodState::Failed { plan, .. } => plan,
                    PodState::Refused { .. } => return None,
                };
                (plan.namespace == request.pod_namespace && plan.name == request.pod_name)
                    .then(|| uid.clone())
            })
        } else {
            Some(request.pod_uid.clone())
        };
        if let Some(uid) = uid {
            self.served.remove(&uid);
            if let Some(PodState::Enrolled(pod)) = self.state.remove(&uid) {
                tracing::info!(pod = %pod.plan.display_name(), "pod unenrolled: its sandbox was deleted");
                drop(pod.unenroll(&self.ctx));
            }
            self.sandbox_deleted.insert(uid);
        }
        Reply {
            enrolled: false,
            error: None,
        }
    }

    /// The enrolled-pods gauge and `/pods`, after a change.
    fn publish_state(&self) {
        self.ctx.metrics.enrolled_pods.set(
            i64::try_from(
                self.state
                    .values()
                    .filter(|s| matches!(s, PodState::Enrolled(_)))
                    .count(),
            )
            .unwrap_or(i64::MAX),
        );
        self.report.update(&self.state);
    }

    /// Whether the pod's namespace is known without its IP: enrolled from
    /// a CNI call, or handed over with its namespace.
    fn netns_known(&self, uid: &str) -> bool {
        match self.state.get(uid) {
            Some(PodState::Enrolled(pod)) => pod.netns_given,
            _ => self
                .ctx
                .handed_over
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(uid)
                .is_some_and(|h| h.netns.is_some()),
        }
    }

    /// Stops every pod's proxy (draining), leaving the shared state alone.
    async fn stop_all(&mut self) {
        self.served
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let stopping: Vec<_> = self
            .state
            .drain()
            .filter_map(|(_, state)| match state {
                PodState::Enrolled(pod) => Some(pod.stop(&self.ctx)),
                _ => None,
            })
            .collect();
        for stopped in stopping {
            let _ = stopped.await;
        }
        self.ctx.metrics.enrolled_pods.set(0);
        self.report.update(&self.state);
    }

    /// Answers the agent that will replace this one on the control socket
    /// (see [`handover`]).
    fn serve_control(&mut self, shutdown: &CancellationToken) -> std::io::Result<()> {
        let Some(listener) = self.control.take() else {
            return Ok(());
        };
        let path = listener
            .local_addr()?
            .as_pathname()
            .map(std::path::Path::to_owned)
            .unwrap_or_default();
        let served = Arc::clone(&self.served);
        spawn_unix_accept(listener, "control", shutdown.clone(), move |stream| {
            let (served, path) = (Arc::clone(&served), path.clone());
            tokio::task::spawn_blocking(move || {
                let handed = stream
                    .set_nonblocking(false)
                    .map_err(|source| handover::HandoverError::Io {
                        path: path.clone(),
                        source,
                    })
                    .and_then(|()| handover::serve_successor(stream, &path, &*served));
                if let Err(e) = handed {
                    tracing::warn!(error = %crate::credentials::error_chain(&e), "handing the listeners over failed");
                }
            });
        })
    }

    /// Brings the served pods in line with the stores; returns when the
    /// next retry is due.
    fn reconcile(&mut self) -> Option<Instant> {
        let mut wanted: HashMap<String, Decision> = HashMap::new();
        let mut present: HashSet<String> = HashSet::new();
        for pod in self.pods.state() {
            let labels = pod
                .metadata
                .namespace
                .as_deref()
                .and_then(|ns| self.namespaces.get(&ObjectRef::new(ns)))
                .and_then(|ns| ns.metadata.labels.clone());
            let Some(uid) = &pod.metadata.uid else {
                continue;
            };
            if self.sandbox_deleted.contains(uid) {
                continue;
            }
            let mut decision = pod_spec::decide(&pod, labels.as_ref());
            if decision == Decision::Ignore && self.netns_known(uid) {
                decision = pod_spec::decide_at_start(&pod, labels.as_ref());
            }
            if decision != Decision::Ignore {
                wanted.insert(uid.clone(), decision);
            }
            present.insert(uid.clone());
        }
        self.sandbox_deleted.retain(|uid| present.contains(uid));

        // Gone, or no longer asking.
        let leaving: Vec<String> = self
            .state
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in leaving {
            self.served.remove(&uid);
            if let Some(PodState::Enrolled(pod)) = self.state.remove(&uid) {
                tracing::info!(pod = %pod.plan.display_name(), "unenrolling pod");
                self.events.publish(
                    &pod_ref(&pod.plan),
                    Kind::Normal,
                    "Unenrolled",
                    "Unenroll",
                    "lattice-agent no longer signs this pod's requests to VPC Lattice".to_owned(),
                );
                drop(pod.unenroll(&self.ctx));
            }
        }

        let now = Instant::now();
        for (uid, decision) in wanted {
            match decision {
                Decision::Ignore => {}
                Decision::Refuse(reason) => self.refuse(uid, reason),
                Decision::Enroll(plan) => self.ensure_enrolled(uid, *plan, now),
            }
        }
        self.publish_state();
        self.state
            .values()
            .filter_map(|s| match s {
                PodState::Failed { retry_at, .. } => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    fn refuse(&mut self, uid: String, reason: String) {
        if let Some(PodState::Refused { reason: known, .. }) = self.state.get(&uid)
            && *known == reason
        {
            return;
        }
        self.served.remove(&uid);
        if let Some(PodState::Enrolled(pod)) = self.state.remove(&uid) {
            drop(pod.unenroll(&self.ctx));
        }
        let Some(api_pod) = self
            .pods
            .state()
            .into_iter()
            .find(|p| p.metadata.uid.as_deref() == Some(&uid))
        else {
            return;
        };
        let pod = PodRef {
            namespace: api_pod.metadata.namespace.clone().unwrap_or_default(),
            name: api_pod.metadata.name.clone().unwrap_or_default(),
            uid: uid.clone(),
        };
        tracing::warn!(%reason, "not enrolling pod");
        self.events.publish(
            &pod,
            Kind::Warning,
            "EnrollmentRefused",
            "Enroll",
            reason.clone(),
        );
        self.state.insert(uid, PodState::Refused { pod, reason });
    }

    fn ensure_enrolled(&mut self, uid: String, plan: PodPlan, now: Instant) {
        let (attempts, previous_reason) = match self.state.remove(&uid) {
            Some(PodState::Enrolled(mut pod))
                if pod.plan == plan || (pod.netns_given && pod.plan.same_but_ips(&plan)) =>
            {
                // Served in the namespace it was given: an IP appearing in
                // the API changes nothing.
                pod.plan.ips = plan.ips;
                self.state.insert(uid, PodState::Enrolled(pod));
                return;
            }
            Some(PodState::Enrolled(pod)) => {
                // Same pod, new facts (IPs, identity): serve it anew. Its
                // namespace stays enrolled meanwhile (refused, not unsigned).
                drop(pod.stop(&self.ctx));
                (0, None)
            }
            Some(PodState::Failed {
                plan: failed,
                reason,
                attempts,
                retry_at,
            }) if failed == plan && now < retry_at => {
                self.state.insert(
                    uid,
                    PodState::Failed {
                        plan: failed,
                        reason,
                        attempts,
                        retry_at,
                    },
                );
                return;
            }
            Some(PodState::Failed {
                attempts, reason, ..
            }) => (attempts, Some(reason)),
            Some(PodState::Refused { .. }) | None => (0, None),
        };
        let name = plan.display_name();
        let started = Instant::now();
        match enroll::enroll(&self.ctx, plan.clone()) {
            Ok(pod) => self.record_enrolled(uid, pod, started, "API"),
            Err(e) => {
                self.ctx.metrics.count_enrollment(false);
                let reason = crate::credentials::error_chain(&e);
                let attempts = attempts.saturating_add(1);
                let delay = retry_delay(attempts);
                // One Event per failure reason, not one per retry.
                let repeated = previous_reason.as_deref() == Some(reason.as_str());
                tracing::warn!(pod = %name, %reason, retry_in_ms = delay.as_millis() as u64, "pod enrollment failed");
                if !repeated {
                    self.events.publish(
                        &pod_ref(&plan),
                        Kind::Warning,
                        "EnrollmentFailed",
                        "Enroll",
                        format!("lattice-agent could not enroll the pod: {reason}"),
                    );
                }
                self.state.insert(
                    uid,
                    PodState::Failed {
                        plan,
                        reason,
                        attempts,
                        retry_at: now + delay,
                    },
                );
            }
        }
    }
}

impl NodeAgent {
    /// Keeps a newly enrolled pod: for a successor, in `/pods`, in the log
    /// and as an Event.
    fn record_enrolled(
        &mut self,
        uid: String,
        mut pod: EnrolledPod,
        started: Instant,
        via: &'static str,
    ) {
        let fds = std::mem::take(&mut pod.listener_fds);
        self.served.insert(&uid, fds, Arc::clone(&pod.netns));
        self.ctx.metrics.count_enrollment(true);
        let name = pod.plan.display_name();
        tracing::info!(
            pod = %name,
            identity = pod.plan.identity.kind(),
            via,
            took_ms = started.elapsed().as_millis() as u64,
            "pod enrolled"
        );
        if let Some(why) = &pod.missing_identity {
            tracing::warn!(pod = %name, reason = %why, "pod enrolled without credentials: its requests get 503");
        }
        self.events.publish(
            &pod_ref(&pod.plan),
            Kind::Normal,
            "Enrolled",
            "Enroll",
            enrolled_note(&pod),
        );
        for why in &pod.plan.options.warnings {
            tracing::warn!(pod = %name, reason = %why, "pod annotation ignored");
            self.events.publish(
                &pod_ref(&pod.plan),
                Kind::Warning,
                "BadAnnotation",
                "Enroll",
                why.clone(),
            );
        }
        self.state.insert(uid, PodState::Enrolled(Box::new(pod)));
    }
}

/// Two handles on the same network namespace.
fn same_netns(a: &NetNs, b: &NetNs) -> bool {
    matches!((a.id(), b.id()), (Ok(x), Ok(y)) if x == y)
}

/// The next CNI call, or never when the plugin is not served.
async fn recv(calls: &mut Option<mpsc::Receiver<CniCall>>) -> Option<CniCall> {
    match calls {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn retry_delay(attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    (RETRY_START * factor).min(RETRY_MAX)
}

fn pod_ref(plan: &PodPlan) -> PodRef {
    PodRef {
        namespace: plan.namespace.clone(),
        name: plan.name.clone(),
        uid: plan.uid.clone(),
    }
}

fn enrolled_note(pod: &EnrolledPod) -> String {
    match (&pod.plan.identity, &pod.missing_identity) {
        (_, Some(why)) => format!(
            "lattice-agent intercepts this pod's VPC Lattice traffic, but cannot sign it: {why}"
        ),
        (IdentityPlan::Irsa { role_arn, .. }, None) => {
            format!("lattice-agent signs this pod's requests to VPC Lattice as {role_arn} (IRSA)")
        }
        (
            IdentityPlan::PodIdentity {
                service_account, ..
            },
            None,
        ) => format!(
            "lattice-agent signs this pod's requests to VPC Lattice with the EKS Pod Identity of service account {service_account}"
        ),
        (IdentityPlan::Missing(why), None) => why.clone(),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A reflector store kept by a watch; `changed` fires on every event, the
/// returned token is cancelled once the first list is complete.
fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: &Arc<Notify>,
    shutdown: &CancellationToken,
    what: &'static str,
) -> (Store<K>, CancellationToken)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let listed = CancellationToken::new();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    let changed = Arc::clone(changed);
    let shutdown = shutdown.clone();
    let done = listed.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                Some(Ok(watcher::Event::InitDone)) => {
                    done.cancel();
                    changed.notify_one();
                }
                Some(Ok(_)) => changed.notify_one(),
                Some(Err(e)) => {
                    tracing::warn!(what, error = %e, "Kubernetes watch failed; retrying");
                }
                None => return,
            }
        }
    });
    (store, listed)
}

/// `/pods`: the pods this agent serves or tried to, no secrets.
#[derive(Default)]
pub struct NodeReport {
    rows: Mutex<Vec<ReportRow>>,
}

struct ReportRow {
    row: PodRow,
    counts: Option<Arc<Counts>>,
}

#[derive(Serialize, Clone)]
struct PodRow {
    namespace: String,
    name: String,
    uid: String,
    /// `enrolled`, `failed` (retried) or `refused`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// `irsa`, `pod-identity` or `none`.
    identity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
    ips: Vec<String>,
    requests: u64,
    errors: u64,
    /// Client connections by kind (`http1`, `h2c`: signed; `tls`,
    /// `opaque`, `server-first`: passed through).
    connections: BTreeMap<&'static str, u64>,
}

impl NodeReport {
    fn update(&self, state: &HashMap<String, PodState>) {
        let mut rows: Vec<ReportRow> = state
            .iter()
            .map(|(uid, s)| match s {
                PodState::Enrolled(pod) => ReportRow {
                    row: plan_row(&pod.plan, "enrolled", pod.missing_identity.clone()),
                    counts: Some(pod.counts()),
                },
                PodState::Failed { plan, reason, .. } => ReportRow {
                    row: plan_row(plan, "failed", Some(reason.clone())),
                    counts: None,
                },
                PodState::Refused { pod, reason } => ReportRow {
                    row: PodRow {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: uid.clone(),
                        state: "refused",
                        reason: Some(reason.clone()),
                        identity: "none",
                        role_arn: None,
                        service_account: None,
                        ips: Vec::new(),
                        requests: 0,
                        errors: 0,
                        connections: BTreeMap::new(),
                    },
                    counts: None,
                },
            })
            .collect();
        rows.sort_by(|a, b| (&a.row.namespace, &a.row.name).cmp(&(&b.row.namespace, &b.row.name)));
        *self.rows.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }
}

fn plan_row(plan: &PodPlan, state: &'static str, reason: Option<String>) -> PodRow {
    let (role_arn, service_account) = match &plan.identity {
        IdentityPlan::Irsa {
            role_arn,
            service_account,
            ..
        } => (Some(role_arn.clone()), Some(service_account.clone())),
        IdentityPlan::PodIdentity {
            service_account, ..
        } => (None, Some(service_account.clone())),
        IdentityPlan::Missing(_) => (None, None),
    };
    PodRow {
        namespace: plan.namespace.clone(),
        name: plan.name.clone(),
        uid: plan.uid.clone(),
        state,
        reason,
        identity: plan.identity.kind(),
        role_arn,
        service_account,
        ips: plan.ips.iter().map(ToString::to_string).collect(),
        requests: 0,
        errors: 0,
        connections: BTreeMap::new(),
    }
}

impl PodsReport for NodeReport {
    fn pods_json(&self) -> String {
        use std::sync::atomic::Ordering;
        let rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let pods: Vec<PodRow> = rows
            .iter()
            .map(|r| {
                let mut row = r.row.clone();
                if let Some(c) = &r.counts {
                    row.requests = c.requests.load(Ordering::Relaxed);
                    row.errors = c.errors.load(Ordering::Relaxed);
                    row.connections = crate::proxy::classify::Kind::ALL
                        .iter()
                        .map(|k| (k.as_str(), c.connections[k.index()].load(Ordering::Relaxed)))
                        .collect();
                }
                row
            })
            .collect();
        let mut out =
            serde_json::to_string_pretty(&BTreeMap::from([("pods", pods)])).unwrap_or_default();
        out.push('\n');
        out
    }
}

/// Accepts on a unix socket until `shutdown`, giving each connection (a
/// std stream, still non-blocking) to `on_connection`, which is called on
/// the runtime and must not block. `what` names the socket in logs.
pub(crate) fn spawn_unix_accept(
    listener: std::os::unix::net::UnixListener,
    what: &'static str,
    shutdown: CancellationToken,
    mut on_connection: impl FnMut(std::os::unix::net::UnixStream) + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted.and_then(|(s, _)| s.into_std()) {
                Ok(stream) => on_connection(stream),
                Err(e) => tracing::warn!(error = %e, socket = what, "unix socket accept failed"),
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let ms: Vec<u128> = (1..=10).map(|a| retry_delay(a).as_millis()).collect();
        assert_eq!(
            ms,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(30));
    }
}
