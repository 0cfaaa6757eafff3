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
//! This runs in node mode's worker process; its parent ([`crate::keeper`])
//! holds every served pod's listening sockets and namespace: the agent
//! hands each pod to it once served and tells it when the pod goes, and
//! a worker started after another died takes them all back and serves
//! them at once, from the state it kept with them ([`resume`]), before the
//! API is listed.
//!
//! Everything the agent knows about a pod lives in one entry of the pod
//! table ([`state`]), changed only by its transitions; this loop makes the
//! observations they take and carries out the effects they return.
//! [`effects`] carries out their effects; [`pod_spec`] decides from the API
//! object, [`identity`] holds each pod's AWS identity, [`events`] tells
//! `kubectl describe pod`, [`handover`] passes the pods' listeners from an
//! agent to the one replacing it (and between the parent and its worker),
//! [`report`] serves `/pods`; [`peer`] admits only root and the agent's own
//! UID to the control and CNI sockets.

pub mod cni;
mod cni_calls;
mod effects;
pub mod enroll;
pub mod events;
pub mod handover;
pub mod identity;
pub mod peer;
pub mod pod_spec;
pub mod report;
pub mod resume;
pub mod state;
pub mod watch;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::report::NodeReport;
use self::{
    cni::{CniCall, CniSettings},
    enroll::{NodeContext, Served},
    events::{EventPublisher, PodRef},
    handover::HandedPod,
    pod_spec::Decision,
    resume::Resume,
    state::{Effects, Seen, Want},
    watch::{Stores, Watches},
};
use crate::{admin::Readiness, keeper::protocol::WorkerLink};

/// Reconciles at least this often, so a pod whose sandbox was recreated
/// is found even when nothing in the API changes.
const RESYNC: Duration = Duration::from_secs(10);

/// The node agent's pod table.
pub type PodTable = state::PodTable<Served, HandedPod>;
type PodEffects = Effects<Served, HandedPod>;

/// The node agent: its pods and the loop that keeps them in line with the
/// API, the CNI plugin and the kernel.
pub struct NodeAgent {
    ctx: NodeContext,
    events: EventPublisher,
    stores: Stores,
    table: PodTable,
    report: Arc<NodeReport>,
    /// Pods handed over with their state, to serve at once.
    resume: Vec<(String, Resume)>,
    /// The parent: it holds each served pod's sockets.
    keeper: Arc<WorkerLink>,
    client: kube::Client,
    /// `--node-name`.
    node_name: String,
    /// The CNI plugin's socket (served once ready) and settings.
    cni: Option<(std::os::unix::net::UnixListener, Arc<CniSettings>)>,
    /// Cancelled once a successor has taken this agent's pods over.
    replaced: CancellationToken,
    readiness: Arc<Readiness>,
}

/// What [`NodeAgent::new`] needs besides the node context.
pub struct Startup {
    pub client: kube::Client,
    pub node_name: String,
    /// The pods the parent holds (served by the worker before this one,
    /// or by the agent this one replaces), by UID: the table starts from
    /// them.
    pub handed_over: handover::HandedOver,
    pub keeper: Arc<WorkerLink>,
    /// Cancelled when a newer agent serves the pods (the parent says so).
    pub replaced: CancellationToken,
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
            handed_over,
            keeper,
            replaced,
            cni,
            readiness,
        } = startup;
        let (stores, watches) = watch::start(&client, &node_name, shutdown);
        let mut table = PodTable::default();
        let mut resume = Vec::new();
        for (uid, mut pod) in handed_over {
            // The namespace the handed sockets are in, which the agent
            // handing them over kept in the gate.
            let cookie = pod
                .listeners
                .first()
                .and_then(|l| crate::netns::netns_cookie(l).ok());
            let netns = pod.netns.is_some();
            if let Some(state) = pod.state.take().as_deref().and_then(Resume::decode) {
                resume.push((uid.clone(), state));
            }
            table.seed(uid, pod, netns, cookie);
        }
        let agent = Self {
            ctx,
            events: EventPublisher::new(client.clone(), &node_name),
            stores,
            table,
            report: Arc::new(NodeReport::default()),
            resume,
            keeper,
            client,
            node_name,
            cni,
            replaced,
            readiness,
        };
        (agent, watches)
    }

    pub fn report(&self) -> Arc<NodeReport> {
        Arc::clone(&self.report)
    }

    /// Serves the pods handed over with their state at once; then, once
    /// the API is listed, reconciles on every change and retry until
    /// `shutdown`; then stops every pod's proxy, leaving their namespaces
    /// enrolled and their sockets with the parent (with pinned programs
    /// their Lattice connects wait in the listeners' backlogs, or are
    /// refused once no agent holds them: never sent unsigned). Ready once
    /// the first list is served (and, replacing an agent, taken over from
    /// it) and the gate holds only the namespaces of pods that ask for
    /// signing. When a newer agent takes the pods over, it stops serving
    /// and leaves the shared state to it.
    pub async fn run(mut self, watches: Watches, shutdown: CancellationToken) {
        self.resume_handed();
        let keeper = Arc::clone(&self.keeper);
        if let Err(e) = keeper.started() {
            tracing::warn!(error = %crate::error_chain(&e), "cannot tell the parent this worker serves");
        }
        // Until the API answers, the handed-over pods are served; a stop
        // meanwhile (the API down at shutdown) must not wait for it.
        tokio::select! {
            () = watches.listed.cancelled() => {}
            () = shutdown.cancelled() => {
                self.stop_all().await;
                return;
            }
        }
        let mut wake = self.reconcile();
        // The parent tells the agent this one replaces, if any, that this
        // one serves every pod now.
        match tokio::task::spawn_blocking(move || keeper.serving()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error_chain(&e), "the parent did not confirm the takeover")
            }
            Err(e) => tracing::warn!(error = %e, "takeover task failed"),
        }
        // The agent before this one crashed, or handed its pods over and
        // leaves the shared state alone from now on: either way the gate
        // may hold namespaces no pod asks for any more.
        self.reconcile_gate();
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
                () = replaced.cancelled() => {
                    tracing::info!("a new agent took the pods over: not accepting any more; draining");
                    self.readiness.set_listening(false);
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

    /// Serves again, at once, each pod handed over with its state: on its
    /// sockets, in its namespace, with its plan.
    fn resume_handed(&mut self) {
        let resume = std::mem::take(&mut self.resume);
        if resume.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut served = 0;
        for (uid, state) in resume {
            let effects = self.table.on_resume(&uid, state.plan, state.sandbox);
            if let Some(Ok(())) = self.apply(&uid, effects, None, "restart") {
                served += 1;
            }
        }
        self.publish_state();
        tracing::info!(
            pods = served,
            took_ms = started.elapsed().as_millis() as u64,
            "serving the pods the parent held, before listing the API"
        );
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
                let effects = self.table.on_gone(&uid, now);
                self.apply(&uid, effects, None, "API");
            }
        }
        for pod in &pods {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            let labels = self.stores.namespace_labels(pod);
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
}

/// The next CNI call, or never when the plugin is not served.
async fn recv(calls: &mut Option<mpsc::Receiver<CniCall>>) -> Option<CniCall> {
    match calls {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Accepts on a unix socket until `shutdown`, giving each connection (a
/// std stream, still non-blocking) whose peer may be served (see
/// [`peer`]) to `on_connection`, which is called on the runtime and must
/// not block. `what` names the socket in logs.
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
                Ok(stream) if peer::allowed(&stream, what) => on_connection(stream),
                Ok(_refused) => {}
                Err(e) => tracing::warn!(error = %e, socket = what, "unix socket accept failed"),
            }
        }
    });
    Ok(())
}
