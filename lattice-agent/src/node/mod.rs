//! Node mode: one agent serves every enrolled pod of its node.
//!
//! The agent watches the pods scheduled on its node and all namespaces
//! ([`watch`]) and reconciles after every change and every few seconds:
//! pods that ask for signing and run with an IP are enrolled (see
//! [`enroll`]), pods that stop asking or go away are unenrolled, failures
//! are retried with backoff, and a pod whose processes left the namespace
//! it is served in (its sandbox was recreated) is enrolled in its new one.
//! Pods already running when the agent starts are enrolled from the first
//! list; none needs a restart.
//!
//! With the CNI plugin chained (`--cni-conf-dir`), a pod is enrolled
//! earlier: while its sandbox starts, before any of its containers runs
//! ([`cni`] receives the plugin's calls, [`cni_calls`] acts on them); the
//! API watch then only confirms it.
//!
//! Everything the agent knows about a pod lives in one entry of the pod
//! table ([`state`]), changed only by its transitions; this loop makes the
//! observations they take and carries out the effects they return.
//! [`pod_spec`] decides from the API object, [`identity`] holds each pod's
//! AWS identity, [`events`] tells `kubectl describe pod`, [`handover`]
//! passes the pods' listeners from an agent to the one replacing it,
//! [`report`] serves `/pods`.

pub mod cni;
mod cni_calls;
pub mod enroll;
pub mod events;
pub mod handover;
pub mod identity;
pub mod pod_spec;
pub mod report;
pub mod state;
pub mod watch;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use kube::runtime::reflector::ObjectRef;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use self::report::NodeReport;
use self::{
    cni::{CniCall, CniSettings},
    enroll::{NodeContext, Served},
    events::{EventPublisher, Kind, PodRef},
    handover::HandedPod,
    pod_spec::{Decision, IdentityPlan, PodPlan},
    state::{Effects, Leaving, Notice, Seen, Want},
    watch::{Stores, Watches},
};
use crate::{admin::Readiness, netns::NetNs};

/// Reconciles at least this often, so a pod whose sandbox was recreated
/// is found even when nothing in the API changes.
const RESYNC: Duration = Duration::from_secs(10);

/// The node agent's pod table.
pub type PodTable = state::PodTable<Served, HandedPod>;
type PodEffects = Effects<Served, HandedPod>;

/// An agent taking over asks this agent's loop for the served pods'
/// sockets through this.
type HandoverRequest = oneshot::Sender<Vec<(String, handover::ServedPod)>>;

/// The node agent: its pods and the loop that keeps them in line with the
/// API, the CNI plugin and the kernel.
pub struct NodeAgent {
    ctx: NodeContext,
    events: EventPublisher,
    stores: Stores,
    table: PodTable,
    report: Arc<NodeReport>,
    /// The agent this one replaces, until told it has taken over.
    predecessor: Option<handover::Predecessor>,
    client: kube::Client,
    /// The CNI plugin's socket (served once ready) and settings.
    cni: Option<(std::os::unix::net::UnixListener, Arc<CniSettings>)>,
    /// Served once this agent is ready.
    control: Option<std::os::unix::net::UnixListener>,
    handover_requests: mpsc::Receiver<HandoverRequest>,
    handover_sender: mpsc::Sender<HandoverRequest>,
    /// Cancelled once a successor has taken this agent's pods over.
    replaced: CancellationToken,
    readiness: Arc<Readiness>,
}

/// What [`NodeAgent::new`] needs besides the node context.
pub struct Startup {
    pub client: kube::Client,
    pub node_name: String,
    /// The agent being replaced, when one handed its listeners over.
    pub predecessor: Option<handover::Predecessor>,
    /// What it handed over, by pod UID: the table starts from it.
    pub handed_over: handover::HandedOver,
    /// The control socket, bound, for the agent that will replace this one.
    pub control: std::os::unix::net::UnixListener,
    /// The CNI plugin's socket, bound, and the plugin's settings.
    pub cni: Option<(std::os::unix::net::UnixListener, Arc<CniSettings>)>,
    pub readiness: Arc<Readiness>,
}

impl NodeAgent {
    /// Starts the watches; returns the agent (to [`NodeAgent::run`]) and
    /// the watches' signals.
    pub fn new(
        ctx: NodeContext,
        startup: Startup,
        shutdown: &CancellationToken,
    ) -> (Self, Watches) {
        let Startup {
            client,
            node_name,
            predecessor,
            handed_over,
            control,
            cni,
            readiness,
        } = startup;
        let (stores, watches) = watch::start(&client, &node_name, shutdown);
        let mut table = PodTable::default();
        for (uid, pod) in handed_over {
            // The namespace the handed sockets are in, which the agent
            // handing them over kept in the gate.
            let cookie = pod
                .listeners
                .first()
                .and_then(|l| crate::netns::netns_cookie(l).ok());
            let netns = pod.netns.is_some();
            table.seed(uid, pod, netns, cookie);
        }
        let (handover_sender, handover_requests) = mpsc::channel(4);
        let agent = Self {
            ctx,
            events: EventPublisher::new(client.clone(), &node_name),
            stores,
            table,
            report: Arc::new(NodeReport::default()),
            predecessor,
            client,
            cni,
            control: Some(control),
            handover_requests,
            handover_sender,
            replaced: CancellationToken::new(),
            readiness,
        };
        (agent, watches)
    }

    pub fn report(&self) -> Arc<NodeReport> {
        Arc::clone(&self.report)
    }

    /// Reconciles on every change and retry until `shutdown`; then stops
    /// every pod's proxy, leaving their namespaces enrolled (with pinned
    /// programs their Lattice connects are refused until an agent serves
    /// them again: never sent unsigned). Ready once the first list is
    /// served (and, replacing an agent, taken over from it) and the gate
    /// holds only the namespaces of pods that ask for signing. When a
    /// newer agent takes this one's listeners over, it stops serving and
    /// leaves the shared state to it.
    pub async fn run(mut self, watches: Watches, shutdown: CancellationToken) {
        watches.listed.cancelled().await;
        let mut wake = self.reconcile();
        if let Some(predecessor) = self.predecessor.take() {
            match tokio::task::spawn_blocking(move || predecessor.taken()).await {
                Ok(Ok(())) => tracing::info!("took over from the agent this one replaces"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::credentials::error_chain(&e), "the replaced agent did not confirm the takeover")
                }
                Err(e) => tracing::warn!(error = %e, "takeover task failed"),
            }
        }
        // The agent before this one crashed, or handed its pods over and
        // leaves the shared state alone from now on: either way the gate
        // may hold namespaces no pod asks for any more.
        self.reconcile_gate();
        if let Err(e) = self.serve_control(&shutdown) {
            tracing::warn!(error = %crate::credentials::error_chain(&e), "no control socket: a new agent will not be able to take over without losing connections");
        }
        let (mut cni_calls, cni_settings) = self.serve_cni(&shutdown);
        self.readiness.set_pods_listed(true);
        tracing::info!("lattice-agent ready (node mode)");
        let replaced = self.replaced.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(call) = recv(&mut cni_calls) => {
                    self.handle_cni(call);
                    continue;
                }
                Some(request) = self.handover_requests.recv() => {
                    let _ = request.send(self.handover());
                    continue;
                }
                () = replaced.cancelled() => {
                    tracing::info!("a new agent took the pods over: not accepting any more; draining");
                    self.readiness.set_listening(false);
                    self.handover_requests.close();
                    self.stop_all().await;
                    shutdown.cancelled().await;
                    return;
                }
                () = watches.changed.notified() => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            wake = self.reconcile();
        }
        self.stop_all().await;
        if let Some(settings) = cni_settings
            && cni::leaving_for_good(&self.client).await
        {
            cni::uninstall(&settings);
        }
    }

    /// Brings the table in line with the stores; returns when to
    /// reconcile again (a retry falling due, or the resync).
    fn reconcile(&mut self) -> Instant {
        let now = Instant::now();
        let pods = self.stores.pods.state();
        let present: HashSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        // Leaving first: their gate entries make room for new ones.
        for uid in self.table.uids() {
            if !present.contains(uid.as_str()) {
                let effects = self.table.on_gone(&uid);
                self.apply(&uid, effects, None, "API");
            }
        }
        for pod in &pods {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            let labels = pod
                .metadata
                .namespace
                .as_deref()
                .and_then(|ns| self.stores.namespaces.get(&ObjectRef::new(ns)))
                .and_then(|ns| ns.metadata.labels.clone());
            let mut decision = pod_spec::decide(pod, labels.as_ref());
            if decision == Decision::Ignore && self.table.netns_known(uid) {
                decision = pod_spec::decide_at_start(pod, labels.as_ref());
            }
            let want = match decision {
                Decision::Ignore => Want::Nothing,
                Decision::Refuse(reason) => Want::Refuse {
                    pod: PodRef {
                        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                        name: pod.metadata.name.clone().unwrap_or_default(),
                        uid: uid.to_owned(),
                    },
                    reason,
                },
                Decision::Enroll(plan) => Want::Enroll(*plan),
            };
            let seen = match self.table.served_netns(uid) {
                Some(served) => enroll::where_processes_are(&self.ctx, uid, served),
                None => Seen::Unknown,
            };
            let effects = self.table.on_api(uid, want, seen, now);
            self.apply(uid, effects, None, "API");
        }
        self.publish_state();
        let resync = now + RESYNC;
        self.table
            .next_retry()
            .map_or(resync, |retry| retry.min(resync))
    }

    /// Carries out a transition's effects (see [`Effects`]); an enrollment
    /// it asks for is made at once, in `given` when the CNI plugin passed
    /// the sandbox's namespace, and its outcome recorded. Returns that
    /// outcome, if there was an attempt.
    fn apply(
        &mut self,
        uid: &str,
        effects: PodEffects,
        given: Option<NetNs>,
        via: &'static str,
    ) -> Option<Result<(), String>> {
        let Effects {
            ungate,
            stop,
            close,
            notice,
            attempt,
        } = effects;
        for cookie in ungate {
            if let Err(e) = self.ctx.gate.unenroll(cookie) {
                tracing::warn!(pod_uid = %uid, error = %crate::credentials::error_chain(&e), "could not remove a network namespace from the interceptor");
            }
        }
        let mut attempt = attempt;
        if let Some(mut served) = stop {
            // Served anew: its next proxy serves on the same sockets if they
            // are in the namespace it is enrolled in.
            if let Some(attempt) = attempt.as_mut()
                && attempt.handed.is_none()
            {
                attempt.handed = Some(HandedPod {
                    listeners: served.take_listeners(),
                    netns: None,
                });
            }
            drop(served.stop(&self.ctx));
        }
        drop(close);
        if let Some(notice) = notice {
            self.tell(notice, via);
        }
        let attempt = attempt?;
        let started = Instant::now();
        let (effects, outcome) = match enroll::enroll(
            &self.ctx,
            attempt.plan,
            attempt.handed,
            given,
        ) {
            Ok(enrolled) => {
                self.ctx.metrics.count_enrollment(true);
                let name = enrolled.plan.display_name();
                tracing::info!(
                    pod = %name,
                    identity = enrolled.plan.identity.kind(),
                    via,
                    took_ms = started.elapsed().as_millis() as u64,
                    "pod enrolled"
                );
                if let Some(why) = &enrolled.missing_identity {
                    tracing::warn!(pod = %name, reason = %why, "pod enrolled without credentials: its requests get 503");
                }
                self.events.publish(
                    &state::pod_ref(&enrolled.plan),
                    Kind::Normal,
                    "Enrolled",
                    "Enroll",
                    enrolled_note(&enrolled.plan, enrolled.missing_identity.as_deref()),
                );
                (self.table.on_enrolled(uid, enrolled), Ok(()))
            }
            Err(failure) => {
                self.ctx.metrics.count_enrollment(false);
                let reason = crate::credentials::error_chain(&failure.error);
                let effects =
                    self.table
                        .on_failed(uid, reason.clone(), failure.netns_cookie, Instant::now());
                (effects, Err(reason))
            }
        };
        // Recording an outcome never asks for another attempt.
        let _ = self.apply(uid, effects, None, via);
        Some(outcome)
    }

    /// Logs a transition's notice and tells the pod's Events.
    fn tell(&self, notice: Notice, via: &'static str) {
        match notice {
            Notice::Unenrolled {
                pod,
                why: Leaving::SandboxDeleted,
            } => {
                tracing::info!(pod = %pod_name(&pod), "pod unenrolled: its sandbox was deleted");
            }
            Notice::Unenrolled { pod, .. } => {
                tracing::info!(pod = %pod_name(&pod), "unenrolling pod");
                self.events.publish(
                    &pod,
                    Kind::Normal,
                    "Unenrolled",
                    "Unenroll",
                    "lattice-agent no longer signs this pod's requests to VPC Lattice".to_owned(),
                );
            }
            Notice::Refused { pod, reason } => {
                tracing::warn!(pod = %pod_name(&pod), %reason, "not enrolling pod");
                self.events
                    .publish(&pod, Kind::Warning, "EnrollmentRefused", "Enroll", reason);
            }
            Notice::Failed {
                pod,
                reason,
                repeated,
                retry_in,
            } => {
                tracing::warn!(pod = %pod_name(&pod), %reason, via, retry_in_ms = retry_in.as_millis() as u64, "pod enrollment failed");
                if !repeated {
                    self.events.publish(
                        &pod,
                        Kind::Warning,
                        "EnrollmentFailed",
                        "Enroll",
                        format!("lattice-agent could not enroll the pod: {reason}"),
                    );
                }
            }
            Notice::SandboxReplaced { pod } => {
                tracing::info!(pod = %pod_name(&pod), "the pod's processes left the network namespace it was served in (a new sandbox): enrolling its new one");
            }
        }
    }

    /// Takes out of the gate every namespace no pod asks for: the table's
    /// own (served pods, failing ones), and those of pods that ask for
    /// signing but are not in the table yet (started through the CNI
    /// plugin, not shown running by the API yet), whose connects stay
    /// refused rather than unsigned until they are served.
    fn reconcile_gate(&self) {
        let mut keep = self.table.gate_keep();
        for pod in self.stores.pods.state() {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            if self.table.get(uid).is_some_and(|e| !e.gated().is_empty()) {
                continue;
            }
            let labels = pod
                .metadata
                .namespace
                .as_deref()
                .and_then(|ns| self.stores.namespaces.get(&ObjectRef::new(ns)))
                .and_then(|ns| ns.metadata.labels.clone());
            if let Decision::Enroll(_) = pod_spec::decide_at_start(&pod, labels.as_ref())
                && let Some(cookie) = enroll::process_netns_cookie(&self.ctx, uid)
            {
                keep.insert(cookie);
            }
        }
        let cookies = match self.ctx.gate.cookies() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %crate::credentials::error_chain(&e), "cannot list the interceptor's enrolled network namespaces");
                return;
            }
        };
        let stale: Vec<u64> = cookies.into_iter().filter(|c| !keep.contains(c)).collect();
        if stale.is_empty() {
            return;
        }
        for cookie in &stale {
            if let Err(e) = self.ctx.gate.unenroll(*cookie) {
                tracing::warn!(error = %crate::credentials::error_chain(&e), "could not remove a network namespace from the interceptor");
            }
        }
        tracing::info!(
            namespaces = stale.len(),
            "removed network namespaces from the interceptor that no pod asks for any more"
        );
    }

    /// Duplicates of every served pod's sockets and namespace, for an
    /// agent taking over.
    fn handover(&self) -> Vec<(String, handover::ServedPod)> {
        self.table
            .served()
            .filter_map(|(uid, pod)| match pod.served.handover() {
                Ok(sockets) => Some((uid.to_owned(), sockets)),
                Err(e) => {
                    tracing::warn!(pod_uid = %uid, error = %e, "cannot hand a pod's listeners over");
                    None
                }
            })
            .collect()
    }

    /// The enrolled-pods gauge and `/pods`, after a change.
    fn publish_state(&self) {
        self.ctx
            .metrics
            .enrolled_pods
            .set(i64::try_from(self.table.enrolled_count()).unwrap_or(i64::MAX));
        self.report.update(&self.table);
    }

    /// Stops every pod's proxy (draining), leaving the shared state alone.
    async fn stop_all(&mut self) {
        let stopping: Vec<_> = self
            .table
            .drain()
            .into_iter()
            .map(|served| served.stop(&self.ctx))
            .collect();
        for stopped in stopping {
            let _ = stopped.await;
        }
        self.publish_state();
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
        let source = Arc::new(HandoverSource {
            requests: self.handover_sender.clone(),
            replaced: self.replaced.clone(),
        });
        spawn_unix_accept(listener, "control", shutdown.clone(), move |stream| {
            let (source, path) = (Arc::clone(&source), path.clone());
            tokio::task::spawn_blocking(move || {
                let handed = stream
                    .set_nonblocking(false)
                    .map_err(|source| handover::HandoverError::Io {
                        path: path.clone(),
                        source,
                    })
                    .and_then(|()| handover::serve_successor(stream, &path, &*source));
                if let Err(e) = handed {
                    tracing::warn!(error = %crate::credentials::error_chain(&e), "handing the listeners over failed");
                }
            });
        })
    }
}

/// The control socket's view of the agent: the served pods' sockets come
/// from the loop that owns the table.
struct HandoverSource {
    requests: mpsc::Sender<HandoverRequest>,
    replaced: CancellationToken,
}

impl handover::Listeners for HandoverSource {
    fn listeners(&self) -> Vec<(String, handover::ServedPod)> {
        let (tx, rx) = oneshot::channel();
        if self.requests.blocking_send(tx).is_err() {
            return Vec::new();
        }
        rx.blocking_recv().unwrap_or_default()
    }

    fn handed_over(&self) {
        self.replaced.cancel();
    }
}

/// The next CNI call, or never when the plugin is not served.
async fn recv(calls: &mut Option<mpsc::Receiver<CniCall>>) -> Option<CniCall> {
    match calls {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn pod_name(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn enrolled_note(plan: &PodPlan, missing_identity: Option<&str>) -> String {
    match (&plan.identity, missing_identity) {
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
