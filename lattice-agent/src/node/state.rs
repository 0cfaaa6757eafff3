//! The node agent's table of pods: one entry per pod, owning everything
//! about it, changed only by the transitions below.
//!
//! ```text
//!                   seed (sockets an agent handed over)
//!                                  │
//!                            ┌─────▼──────┐
//!                            │ HandedOver │
//!                            └─────┬──────┘
//!                                  │ asks (API) or CNI ADD
//!   (new) ── asks (API), CNI ADD ──┤
//!   Refused ── asks ───────────────┤
//!                            ┌─────▼──────┐  fails   ┌────────┐
//!                      ┌────►│ Enrolling  ├─────────►│ Failed │
//!                      │     └─────┬──────┘◄─────────┴────────┘
//!                      │           │ ok       retry due, or new facts
//!                      │     ┌─────▼──────┐ CNI DEL  ┌────────────────┐
//!                      └─────┤  Enrolled  ├─────────►│ SandboxDeleted │
//!   new facts (IPs); its     └────────────┘          └───────┬────────┘
//!   processes left its namespace;                            │ CNI ADD
//!   CNI ADD in another namespace                             ▼
//!                                                        Enrolling
//!
//!   any ── refused (API) ──► Refused
//!   any ── not asking, or gone from the API ──► removed
//! ```
//!
//! Transitions are pure: they take what the caller observed (the pod's
//! decision from the API, where its processes are, a CNI call, the
//! outcome of an enrollment) and return what the caller must do
//! ([`Effects`]): put namespaces into the interceptor's gate or take them
//! out, stop a proxy, close handed-over sockets, tell the pod's Events, attempt an
//! enrollment. Sockets, namespaces and the gate map are the caller's; here
//! they are data. `S` is what serves an enrolled pod (its proxy, its
//! listeners and their duplicates, its identity lease and counters:
//! `enroll::Served`), `H` what an agent handed over for a pod; the unit
//! tests use plain values for both.
//!
//! The gate: each entry names the network namespaces (cookies) it keeps
//! enrolled in the kernel's gate, so that whatever leaves the table leaves
//! the gate, and [`PodTable::gate_keep`] is exactly what the gate must
//! hold (an agent starting after a crash, or taking over, removes the
//! rest). A pod whose enrollment fails keeps its namespace in the gate:
//! its connects are refused (nothing listens), never sent unsigned.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    enroll::EnrollError,
    events::PodRef,
    identity::IdentityError,
    pod_spec::{PodPlan, Refusal},
};

/// First retry of a failed enrollment; doubles up to [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a pod enrolled through the CNI plugin, which the API watch
/// has not shown yet, is kept although the API store lacks it.
const API_GRACE: Duration = Duration::from_secs(30);

/// A network namespace's device and inode: equal exactly when two handles
/// name the same namespace (see `NetNs::id`).
pub type NetnsId = (u64, u64);

/// A served pod.
#[derive(Debug)]
pub struct Enrolled<S> {
    pub plan: PodPlan,
    /// The namespace it is served in.
    pub netns: NetnsId,
    /// That namespace's cookie, as the gate knows it.
    pub cookie: u64,
    /// The namespace was given (by the CNI plugin, or with the sockets an
    /// agent handed over) rather than found through the pod's IP: the pod
    /// is served whatever IPs the API shows.
    pub given: bool,
    /// The CNI sandbox (container ID) it was enrolled for, if by CNI ADD:
    /// a DEL for another sandbox of the pod leaves it be.
    pub sandbox: Option<String>,
    /// Why its requests get 503, when it has no usable identity.
    pub missing_identity: Option<Arc<IdentityError>>,
    pub served: S,
}

/// A failed enrollment, retried with backoff.
#[derive(Debug, Clone)]
pub struct Failed {
    pub plan: PodPlan,
    /// Why the last attempt failed (shared with its Event and `/pods`).
    pub error: Arc<EnrollError>,
    pub attempts: u32,
    pub retry_at: Instant,
}

#[derive(Debug)]
pub enum Phase<S, H> {
    /// Sockets an agent handed over, not yet served by this one.
    HandedOver {
        handed: H,
        /// The pod's namespace came with them.
        netns: bool,
    },
    /// An enrollment is under way (between [`Effects::attempt`] and
    /// [`PodTable::on_enrolled`] or [`PodTable::on_failed`]).
    Enrolling {
        plan: PodPlan,
        attempts: u32,
        last_error: Option<Arc<EnrollError>>,
        sandbox: Option<String>,
    },
    Enrolled(Enrolled<S>),
    Failed(Failed),
    /// Asks for signing, but cannot be served.
    Refused {
        pod: PodRef,
        reason: Refusal,
    },
    /// The runtime deleted its sandbox (CNI DEL): not enrolled again from
    /// the API (which may still show it running) until a new sandbox is
    /// added.
    SandboxDeleted,
}

/// One pod.
#[derive(Debug)]
pub struct Entry<S, H> {
    pub phase: Phase<S, H>,
    /// Cookies of the namespaces it keeps in the gate: the one it is
    /// served in or, while it fails, those its connects are refused in.
    gated: BTreeSet<u64>,
    /// Since when it is known from a CNI call alone (the plugin's lookup
    /// found the pod ahead of the watch): until the API store shows it, or
    /// for [`API_GRACE`], its absence from the store is not its departure.
    unseen_since: Option<Instant>,
}

impl<S, H> Entry<S, H> {
    fn new(phase: Phase<S, H>) -> Self {
        Self {
            phase,
            gated: BTreeSet::new(),
            unseen_since: None,
        }
    }

    pub fn gated(&self) -> &BTreeSet<u64> {
        &self.gated
    }
}

/// What the API says of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Not asking for signing (or not running with an IP yet).
    Nothing,
    Refuse {
        pod: PodRef,
        reason: Refusal,
    },
    Enroll(PodPlan),
}

/// Where an enrolled pod's processes are, against its served namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// At least one is in it.
    Served,
    /// None is, and some are elsewhere: the runtime gave the pod a new
    /// sandbox.
    Elsewhere,
    /// No process to tell (starting, stopping, or not looked at).
    Unknown,
}

/// Why a pod is served no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// Gone from the API.
    Gone,
    /// It stopped asking for signing.
    NotAsking,
    /// The runtime deleted its sandbox.
    SandboxDeleted,
}

/// What the caller tells (log lines, the pod's Events).
#[derive(Debug, Clone)]
pub enum Notice {
    Unenrolled {
        pod: PodRef,
        why: Leaving,
    },
    Refused {
        pod: PodRef,
        reason: Refusal,
    },
    /// `repeated`: for the same reason as the attempt before (one Event
    /// per reason, not one per retry).
    Failed {
        pod: PodRef,
        error: Arc<EnrollError>,
        repeated: bool,
        retry_in: Duration,
    },
    /// Its processes left the namespace it was served in.
    SandboxReplaced {
        pod: PodRef,
    },
}

/// An enrollment for the caller to make, then report with
/// [`PodTable::on_enrolled`] or [`PodTable::on_failed`].
#[derive(Debug)]
pub struct Attempt<H> {
    pub plan: PodPlan,
    /// What an agent handed over for the pod, to serve it on.
    pub handed: Option<H>,
}

/// What the caller does after a transition, in this order: put namespaces
/// into the gate (a failing pod's: its connects are refused, never sent
/// unsigned), take namespaces out of it (so a leaving pod's new connects
/// go straight out rather than to a proxy that stops), stop the proxy (its
/// listeners close with it, so a namespace still gated refuses connects),
/// close handed-over sockets, tell, then attempt.
#[derive(Debug)]
#[must_use]
pub struct Effects<S, H> {
    pub gate: Vec<u64>,
    pub ungate: Vec<u64>,
    pub stop: Option<S>,
    pub close: Option<H>,
    pub notice: Option<Notice>,
    pub attempt: Option<Attempt<H>>,
}

impl<S, H> Default for Effects<S, H> {
    fn default() -> Self {
        Self {
            gate: Vec::new(),
            ungate: Vec::new(),
            stop: None,
            close: None,
            notice: None,
            attempt: None,
        }
    }
}

impl<S, H> Effects<S, H> {
    pub fn is_empty(&self) -> bool {
        self.gate.is_empty()
            && self.ungate.is_empty()
            && self.stop.is_none()
            && self.close.is_none()
            && self.notice.is_none()
            && self.attempt.is_none()
    }
}

/// Every pod the node agent knows, by UID.
#[derive(Debug)]
pub struct PodTable<S, H> {
    pods: BTreeMap<String, Entry<S, H>>,
}

impl<S, H> Default for PodTable<S, H> {
    fn default() -> Self {
        Self {
            pods: BTreeMap::new(),
        }
    }
}

impl<S, H> PodTable<S, H> {
    /// A pod's sockets an agent handed over (and, with `cookie`, the
    /// namespace they are in, which that agent kept in the gate).
    pub fn seed(&mut self, uid: String, handed: H, netns: bool, cookie: Option<u64>) {
        let mut entry = Entry::new(Phase::HandedOver { handed, netns });
        entry.gated.extend(cookie);
        self.pods.insert(uid, entry);
    }

    pub fn get(&self, uid: &str) -> Option<&Entry<S, H>> {
        self.pods.get(uid)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry<S, H>)> {
        self.pods.iter().map(|(uid, e)| (uid.as_str(), e))
    }

    pub fn uids(&self) -> Vec<String> {
        self.pods.keys().cloned().collect()
    }

    /// Served pods, with what serves them: what an agent replacing this
    /// one must be handed.
    pub fn served(&self) -> impl Iterator<Item = (&str, &Enrolled<S>)> {
        self.pods.iter().filter_map(|(uid, e)| match &e.phase {
            Phase::Enrolled(enrolled) => Some((uid.as_str(), enrolled)),
            _ => None,
        })
    }

    pub fn enrolled_count(&self) -> usize {
        self.served().count()
    }

    /// Whether the pod's namespace is known without its IP (given by the
    /// CNI plugin, or handed over with it): the API's view of the pod as
    /// it starts is then enough to serve it.
    pub fn netns_known(&self, uid: &str) -> bool {
        self.pods.get(uid).is_some_and(|e| match &e.phase {
            Phase::Enrolled(enrolled) => enrolled.given,
            Phase::HandedOver { netns, .. } => *netns,
            _ => false,
        })
    }

    /// The namespace the pod is served in, to see where its processes are.
    pub fn served_netns(&self, uid: &str) -> Option<NetnsId> {
        match &self.pods.get(uid)?.phase {
            Phase::Enrolled(enrolled) => Some(enrolled.netns),
            _ => None,
        }
    }

    /// Whether the pod is served in the namespace `netns` (CNI CHECK).
    pub fn is_served_in(&self, uid: &str, netns: NetnsId) -> bool {
        self.served_netns(uid) == Some(netns)
    }

    /// The pod named `namespace/name` (a CNI DEL without a pod UID).
    pub fn uid_by_name(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods.iter().find_map(|(uid, e)| {
            let plan = match &e.phase {
                Phase::Enrolled(enrolled) => &enrolled.plan,
                Phase::Failed(failed) => &failed.plan,
                Phase::Enrolling { plan, .. } => plan,
                _ => return None,
            };
            (plan.namespace == namespace && plan.name == name).then(|| uid.clone())
        })
    }

    /// When the next failed enrollment is due to be retried.
    pub fn next_retry(&self) -> Option<Instant> {
        self.pods
            .values()
            .filter_map(|e| match &e.phase {
                Phase::Failed(failed) => Some(failed.retry_at),
                _ => None,
            })
            .min()
    }

    /// Every namespace some pod keeps in the gate: what the gate must hold.
    pub fn gate_keep(&self) -> BTreeSet<u64> {
        self.pods
            .values()
            .flat_map(|e| e.gated.iter().copied())
            .collect()
    }

    /// The API's view of a present pod, and where its processes are
    /// (`seen`, for a served pod).
    pub fn on_api(&mut self, uid: &str, want: Want, seen: Seen, now: Instant) -> Effects<S, H> {
        if let Some(entry) = self.pods.get_mut(uid) {
            entry.unseen_since = None;
            if let Phase::SandboxDeleted = entry.phase {
                return Effects::default();
            }
        }
        match want {
            Want::Nothing => self.remove(uid, Leaving::NotAsking),
            Want::Refuse { pod, reason } => self.refuse(uid, pod, reason),
            Want::Enroll(plan) => self.want_enrolled(uid, plan, seen, now),
        }
    }

    /// The pod is not in the API store: gone, unless it came through the
    /// CNI plugin a moment ago and the watch has yet to show it.
    pub fn on_gone(&mut self, uid: &str, now: Instant) -> Effects<S, H> {
        if let Some(Entry {
            unseen_since: Some(since),
            ..
        }) = self.pods.get(uid)
            && now < *since + API_GRACE
        {
            return Effects::default();
        }
        self.remove(uid, Leaving::Gone)
    }

    /// CNI ADD: the pod's sandbox `sandbox` starts in namespace `netns`.
    /// `None` when the pod is served in that namespace already (the
    /// runtime retried an ADD that succeeded).
    pub fn on_cni_add(
        &mut self,
        uid: &str,
        plan: PodPlan,
        netns: NetnsId,
        sandbox: &str,
        now: Instant,
    ) -> Option<Effects<S, H>> {
        if self.is_served_in(uid, netns) {
            return None;
        }
        let mut entry = self.pods.remove(uid).unwrap_or_else(|| {
            let mut entry = Entry::new(Phase::SandboxDeleted);
            entry.unseen_since = Some(now);
            entry
        });
        let mut effects = Effects::default();
        let handed = match std::mem::replace(&mut entry.phase, Phase::SandboxDeleted) {
            // A new sandbox: the old namespace leaves the gate once the
            // new one is served (on_enrolled).
            Phase::Enrolled(old) => {
                effects.stop = Some(old.served);
                None
            }
            Phase::HandedOver { handed, .. } => Some(handed),
            _ => None,
        };
        entry.phase = Phase::Enrolling {
            plan: plan.clone(),
            attempts: 0,
            last_error: None,
            sandbox: Some(sandbox.to_owned()),
        };
        self.pods.insert(uid.to_owned(), entry);
        effects.attempt = Some(Attempt { plan, handed });
        Some(effects)
    }

    /// CNI DEL: the runtime deleted the pod's sandbox `sandbox`.
    pub fn on_cni_del(&mut self, uid: &str, sandbox: &str) -> Effects<S, H> {
        if let Some(Entry {
            phase:
                Phase::Enrolled(Enrolled {
                    sandbox: Some(served),
                    ..
                }),
            ..
        }) = self.pods.get(uid)
            && served != sandbox
        {
            // Another (older) sandbox of the pod; the served one stays.
            return Effects::default();
        }
        let effects = self.remove(uid, Leaving::SandboxDeleted);
        self.pods
            .insert(uid.to_owned(), Entry::new(Phase::SandboxDeleted));
        effects
    }

    /// The attempt succeeded: the pod is served, and only its new
    /// namespace stays in the gate.
    pub fn on_enrolled(&mut self, uid: &str, mut enrolled: Enrolled<S>) -> Effects<S, H> {
        let mut entry = self
            .pods
            .remove(uid)
            .unwrap_or_else(|| Entry::new(Phase::SandboxDeleted));
        if let Phase::Enrolling {
            sandbox: Some(sandbox),
            ..
        } = &entry.phase
        {
            enrolled.sandbox.get_or_insert_with(|| sandbox.clone());
        }
        let cookie = enrolled.cookie;
        let ungate = std::mem::take(&mut entry.gated)
            .into_iter()
            .filter(|c| *c != cookie)
            .collect();
        entry.gated.insert(cookie);
        entry.phase = Phase::Enrolled(enrolled);
        self.pods.insert(uid.to_owned(), entry);
        Effects {
            ungate,
            ..Effects::default()
        }
    }

    /// The attempt failed with `error`; `netns_cookie` names the namespace
    /// a process of the pod was found in, which stays in the gate (or goes
    /// into it) so the pod's connects are refused, not sent unsigned,
    /// until it is served.
    pub fn on_failed(
        &mut self,
        uid: &str,
        error: Arc<EnrollError>,
        netns_cookie: Option<u64>,
        now: Instant,
    ) -> Effects<S, H> {
        let Some(entry) = self.pods.get_mut(uid) else {
            return Effects::default();
        };
        let Phase::Enrolling {
            plan,
            attempts,
            last_error,
            ..
        } = std::mem::replace(&mut entry.phase, Phase::SandboxDeleted)
        else {
            debug_assert!(false, "on_failed without an attempt");
            return Effects::default();
        };
        let gate = netns_cookie.filter(|c| entry.gated.insert(*c));
        let attempts = attempts.saturating_add(1);
        let retry_in = retry_delay(attempts);
        let notice = Notice::Failed {
            pod: pod_ref(&plan),
            repeated: last_error.is_some_and(|last| same_reason(&last, &error)),
            error: Arc::clone(&error),
            retry_in,
        };
        entry.phase = Phase::Failed(Failed {
            plan,
            error,
            attempts,
            retry_at: now + retry_in,
        });
        Effects {
            gate: gate.into_iter().collect(),
            notice: Some(notice),
            ..Effects::default()
        }
    }

    /// Every served pod's proxy, to stop (draining) as the agent leaves:
    /// the gate is left as it is, so the pods' Lattice connects are
    /// refused until an agent serves them again, never sent unsigned.
    pub fn drain(&mut self) -> Vec<S> {
        std::mem::take(&mut self.pods)
            .into_values()
            .filter_map(|e| match e.phase {
                Phase::Enrolled(enrolled) => Some(enrolled.served),
                _ => None,
            })
            .collect()
    }

    fn refuse(&mut self, uid: &str, pod: PodRef, reason: Refusal) -> Effects<S, H> {
        if let Some(Entry {
            phase: Phase::Refused { reason: known, .. },
            ..
        }) = self.pods.get(uid)
            && *known == reason
        {
            return Effects::default();
        }
        let mut effects = self.remove(uid, Leaving::NotAsking);
        effects.notice = Some(Notice::Refused {
            pod: pod.clone(),
            reason: reason.clone(),
        });
        self.pods
            .insert(uid.to_owned(), Entry::new(Phase::Refused { pod, reason }));
        effects
    }

    fn want_enrolled(
        &mut self,
        uid: &str,
        plan: PodPlan,
        seen: Seen,
        now: Instant,
    ) -> Effects<S, H> {
        let mut entry = self
            .pods
            .remove(uid)
            .unwrap_or_else(|| Entry::new(Phase::SandboxDeleted));
        let mut effects = Effects::default();
        let (attempts, last_error, handed) =
            match std::mem::replace(&mut entry.phase, Phase::SandboxDeleted) {
                Phase::Enrolled(mut enrolled) if seen == Seen::Elsewhere => {
                    // Served in a namespace none of its processes is in any
                    // more: a new sandbox. The old namespace leaves the gate.
                    effects.notice = Some(Notice::SandboxReplaced {
                        pod: pod_ref(&enrolled.plan),
                    });
                    entry.gated.remove(&enrolled.cookie);
                    effects.ungate.push(enrolled.cookie);
                    enrolled.sandbox = None;
                    effects.stop = Some(enrolled.served);
                    (0, None, None)
                }
                Phase::Enrolled(mut enrolled)
                    if enrolled.plan == plan
                        || (enrolled.given && enrolled.plan.same_but_ips(&plan)) =>
                {
                    // Served in the namespace it was given: an IP appearing
                    // in the API changes nothing.
                    enrolled.plan.ips = plan.ips;
                    entry.phase = Phase::Enrolled(enrolled);
                    self.pods.insert(uid.to_owned(), entry);
                    return effects;
                }
                Phase::Enrolled(enrolled) => {
                    // Same pod, new facts: served anew. Its namespace stays
                    // in the gate meanwhile (refused, not unsigned).
                    effects.stop = Some(enrolled.served);
                    (0, None, None)
                }
                Phase::Failed(failed) if failed.plan == plan && now < failed.retry_at => {
                    entry.phase = Phase::Failed(failed);
                    self.pods.insert(uid.to_owned(), entry);
                    return effects;
                }
                Phase::Failed(failed) => (failed.attempts, Some(failed.error), None),
                Phase::Enrolling {
                    attempts,
                    last_error,
                    ..
                } => (attempts, last_error, None),
                Phase::HandedOver { handed, .. } => (0, None, Some(handed)),
                Phase::Refused { .. } | Phase::SandboxDeleted => (0, None, None),
            };
        entry.phase = Phase::Enrolling {
            plan: plan.clone(),
            attempts,
            last_error,
            sandbox: None,
        };
        self.pods.insert(uid.to_owned(), entry);
        effects.attempt = Some(Attempt { plan, handed });
        effects
    }

    /// Takes the pod out of the table with everything it holds.
    fn remove(&mut self, uid: &str, why: Leaving) -> Effects<S, H> {
        let Some(entry) = self.pods.remove(uid) else {
            return Effects::default();
        };
        let mut effects = Effects {
            ungate: entry.gated.into_iter().collect(),
            ..Effects::default()
        };
        match entry.phase {
            Phase::Enrolled(enrolled) => {
                effects.notice = Some(Notice::Unenrolled {
                    pod: pod_ref(&enrolled.plan),
                    why,
                });
                effects.stop = Some(enrolled.served);
            }
            Phase::HandedOver { handed, .. } => effects.close = Some(handed),
            _ => {}
        }
        effects
    }
}

/// Whether two failures are one reason, told once: they read the same
/// (the text is what the pod's Event says; causes such as I/O errors
/// have no equality of their own).
fn same_reason(a: &EnrollError, b: &EnrollError) -> bool {
    crate::error_chain(a) == crate::error_chain(b)
}

/// How long after its `attempts`-th failure an enrollment is retried.
pub fn retry_delay(attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    (RETRY_START * factor).min(RETRY_MAX)
}

pub fn pod_ref(plan: &PodPlan) -> PodRef {
    PodRef {
        namespace: plan.namespace.clone(),
        name: plan.name.clone(),
        uid: plan.uid.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::node::pod_spec::{IdentityPlan, MissingIdentity};

    /// What serves a pod here: a name, to see which proxy is stopped.
    type Table = PodTable<&'static str, &'static str>;

    const UID: &str = "uid-1";
    const NS_A: NetnsId = (4, 1001);
    const NS_B: NetnsId = (4, 1002);

    fn plan(ip: &str) -> PodPlan {
        PodPlan {
            uid: UID.into(),
            namespace: "shop".into(),
            name: "cart-0".into(),
            ips: if ip.is_empty() {
                vec![]
            } else {
                vec![ip.parse::<IpAddr>().unwrap()]
            },
            identity: IdentityPlan::Missing(MissingIdentity::Undeclared {
                pod: "shop/cart-0".into(),
                referenced: vec![],
            }),
            region: None,
            options: Default::default(),
        }
    }

    /// A failure whose text names `why`.
    fn failure(why: &str) -> Arc<EnrollError> {
        Arc::new(EnrollError::NoProcess { cgroup: why.into() })
    }

    fn hostnetwork(pod: &str) -> Refusal {
        Refusal::HostNetwork { pod: pod.into() }
    }

    fn enrolled(
        plan: PodPlan,
        netns: NetnsId,
        cookie: u64,
        served: &'static str,
    ) -> Enrolled<&'static str> {
        Enrolled {
            plan,
            netns,
            cookie,
            given: false,
            sandbox: None,
            missing_identity: None,
            served,
        }
    }

    /// Enrolled through the API in namespace A (cookie 11), served by "p1".
    fn table_with_enrolled(now: Instant) -> Table {
        let mut t = Table::default();
        let e = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, now);
        let attempt = e.attempt.expect("an attempt");
        assert_eq!(attempt.plan, plan("10.0.0.1"));
        assert!(
            t.on_enrolled(UID, enrolled(attempt.plan, NS_A, 11, "p1"))
                .is_empty()
        );
        t
    }

    fn phase_name(t: &Table) -> &'static str {
        match t.get(UID).map(|e| &e.phase) {
            None => "none",
            Some(Phase::HandedOver { .. }) => "handed-over",
            Some(Phase::Enrolling { .. }) => "enrolling",
            Some(Phase::Enrolled(_)) => "enrolled",
            Some(Phase::Failed(_)) => "failed",
            Some(Phase::Refused { .. }) => "refused",
            Some(Phase::SandboxDeleted) => "sandbox-deleted",
        }
    }

    #[test]
    fn a_served_pod_with_unchanged_facts_is_left_alone() {
        let now = Instant::now();
        let mut t = table_with_enrolled(now);
        for seen in [Seen::Served, Seen::Unknown] {
            let e = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), seen, now);
            assert!(e.is_empty(), "{e:?}");
        }
        assert_eq!(phase_name(&t), "enrolled");
        assert_eq!(t.gate_keep(), BTreeSet::from([11]));
        assert_eq!(t.enrolled_count(), 1);
    }

    /// The same IP, the same plan, but the pod's processes are in another
    /// namespace (its sandbox was recreated): the old namespace leaves the
    /// gate, its proxy stops, the pod is enrolled anew.
    #[test]
    fn processes_elsewhere_mean_a_new_sandbox_enrolled_anew() {
        let now = Instant::now();
        let mut t = table_with_enrolled(now);
        let e = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Elsewhere, now);
        assert_eq!(e.ungate, [11]);
        assert_eq!(e.stop, Some("p1"));
        assert!(matches!(e.notice, Some(Notice::SandboxReplaced { .. })));
        assert_eq!(e.attempt.unwrap().plan, plan("10.0.0.1"));
        assert!(t.gate_keep().is_empty());
        let e = t.on_enrolled(UID, enrolled(plan("10.0.0.1"), NS_B, 12, "p2"));
        assert!(e.ungate.is_empty());
        assert_eq!(t.served_netns(UID), Some(NS_B));
        assert_eq!(t.gate_keep(), BTreeSet::from([12]));
    }

    /// New facts (another IP) and a failed re-enrollment: the old proxy is
    /// stopped (its listeners, duplicates included, go with it), nothing
    /// serves the pod, its namespace stays in the gate (connects refused),
    /// and the namespace the failure found joins it.
    #[test]
    fn a_failed_re_enrollment_keeps_the_namespace_gated_and_nothing_listening() {
        let now = Instant::now();
        let mut t = table_with_enrolled(now);
        let e = t.on_api(UID, Want::Enroll(plan("10.0.0.9")), Seen::Served, now);
        assert_eq!(e.stop, Some("p1"));
        assert!(e.ungate.is_empty());
        assert!(e.attempt.is_some());
        let e = t.on_failed(UID, failure("wrong netns"), Some(13), now);
        assert_eq!(e.gate, [13]);
        assert!(matches!(
            e.notice,
            Some(Notice::Failed {
                repeated: false,
                ..
            })
        ));
        assert_eq!(phase_name(&t), "failed");
        assert_eq!(t.served().count(), 0);
        assert_eq!(t.gate_keep(), BTreeSet::from([11, 13]));
        // Served again: only the served namespace stays.
        let e = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, now);
        assert!(e.attempt.is_some(), "new facts are tried at once");
        let e = t.on_enrolled(UID, enrolled(plan("10.0.0.1"), NS_A, 11, "p3"));
        assert_eq!(e.ungate, [13]);
        assert_eq!(t.gate_keep(), BTreeSet::from([11]));
    }

    #[test]
    fn failures_back_off_and_are_told_once_per_reason() {
        let now = Instant::now();
        let mut t = Table::default();
        let mut told = Vec::new();
        let mut at = now;
        for (i, reason) in ["a", "a", "b"].into_iter().enumerate() {
            let e = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, at);
            assert!(e.attempt.is_some(), "attempt {i}");
            let e = t.on_failed(UID, failure(reason), Some(11), at);
            assert_eq!(e.gate.len(), usize::from(i == 0), "gated once");
            let Some(Notice::Failed {
                repeated, retry_in, ..
            }) = e.notice
            else {
                panic!("{e:?}")
            };
            told.push((repeated, retry_in.as_millis()));
            // Not before it is due.
            let e = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, at);
            assert!(e.is_empty());
            at = t.next_retry().unwrap();
        }
        assert_eq!(told, [(false, 200), (true, 400), (false, 800)]);
        // New facts are tried at once, whatever the backoff.
        let e = t.on_api(UID, Want::Enroll(plan("10.0.0.2")), Seen::Unknown, now);
        assert!(e.attempt.is_some());
    }

    #[test]
    fn leaving_takes_everything_out() {
        let now = Instant::now();
        for (leave, why) in [(true, Leaving::Gone), (false, Leaving::NotAsking)] {
            let mut t = table_with_enrolled(now);
            let e = if leave {
                t.on_gone(UID, now)
            } else {
                t.on_api(UID, Want::Nothing, Seen::Served, now)
            };
            assert_eq!(e.ungate, [11]);
            assert_eq!(e.stop, Some("p1"));
            assert!(matches!(e.notice, Some(Notice::Unenrolled { why: w, .. }) if w == why));
            assert_eq!(phase_name(&t), "none");
            assert!(t.gate_keep().is_empty());
        }
        // A failed pod leaving takes the namespace it kept gated.
        let mut t = Table::default();
        let _ = t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, now);
        let _ = t.on_failed(UID, failure("x"), Some(21), now);
        let e = t.on_gone(UID, now);
        assert_eq!(e.ungate, [21]);
        assert!(e.notice.is_none());
    }

    #[test]
    fn refused_once_per_reason() {
        let now = Instant::now();
        let mut t = table_with_enrolled(now);
        let pod = pod_ref(&plan(""));
        let refuse = |pod_name: &str| Want::Refuse {
            pod: pod.clone(),
            reason: hostnetwork(pod_name),
        };
        let e = t.on_api(UID, refuse("shop/cart-0"), Seen::Served, now);
        assert_eq!(e.ungate, [11]);
        assert_eq!(e.stop, Some("p1"));
        assert!(matches!(e.notice, Some(Notice::Refused { .. })));
        assert!(
            t.on_api(UID, refuse("shop/cart-0"), Seen::Unknown, now)
                .is_empty()
        );
        assert!(
            t.on_api(UID, refuse("shop/other"), Seen::Unknown, now)
                .notice
                .is_some()
        );
        assert_eq!(phase_name(&t), "refused");
        assert!(
            t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, now)
                .attempt
                .is_some()
        );
    }

    /// CNI: ADD enrolls in the given namespace (a retried ADD changes
    /// nothing), DEL lets the pod go until the next ADD, whatever the API
    /// still shows; a DEL for an older sandbox leaves the new one served.
    #[test]
    fn cni_add_del_and_sandboxes() {
        let now = Instant::now();
        let mut t = Table::default();
        let e = t.on_cni_add(UID, plan(""), NS_A, "sandbox-1", now).unwrap();
        assert!(e.stop.is_none());
        let attempt = e.attempt.unwrap();
        let mut served = enrolled(attempt.plan, NS_A, 11, "p1");
        served.given = true;
        assert!(t.on_enrolled(UID, served).is_empty());
        assert!(t.netns_known(UID));
        assert!(t.is_served_in(UID, NS_A));
        assert!(
            t.on_cni_add(UID, plan(""), NS_A, "sandbox-1", now)
                .is_none()
        );
        // The API shows the IP later: nothing to do.
        assert!(
            t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Served, now)
                .is_empty()
        );
        assert_eq!(t.uid_by_name("shop", "cart-0").as_deref(), Some(UID));

        // A new sandbox in another namespace: the old one leaves the gate
        // once the new one is served.
        let e = t.on_cni_add(UID, plan(""), NS_B, "sandbox-2", now).unwrap();
        assert_eq!(e.stop, Some("p1"));
        assert!(e.ungate.is_empty());
        let mut served = enrolled(e.attempt.unwrap().plan, NS_B, 12, "p2");
        served.given = true;
        assert_eq!(t.on_enrolled(UID, served).ungate, [11]);
        // The runtime deletes the old sandbox late: the new one stays.
        assert!(t.on_cni_del(UID, "sandbox-1").is_empty());
        assert!(t.is_served_in(UID, NS_B));

        let e = t.on_cni_del(UID, "sandbox-2");
        assert_eq!(e.ungate, [12]);
        assert_eq!(e.stop, Some("p2"));
        assert!(matches!(
            e.notice,
            Some(Notice::Unenrolled {
                why: Leaving::SandboxDeleted,
                ..
            })
        ));
        assert_eq!(phase_name(&t), "sandbox-deleted");
        assert!(
            t.on_api(UID, Want::Enroll(plan("10.0.0.1")), Seen::Unknown, now)
                .is_empty()
        );
        assert!(t.on_api(UID, Want::Nothing, Seen::Unknown, now).is_empty());
        assert!(
            t.on_cni_add(UID, plan(""), NS_A, "sandbox-3", now)
                .is_some()
        );
        assert_eq!(phase_name(&t), "enrolling");
        let mut t = Table::default();
        let _ = t.on_cni_del(UID, "sandbox-1");
        assert!(t.on_gone(UID, now).is_empty());
        assert_eq!(phase_name(&t), "none");
    }

    /// A pod enrolled through the CNI plugin before the API watch shows it
    /// is not let go for its absence from the store, for a while.
    #[test]
    fn a_pod_known_from_cni_alone_waits_for_the_watch() {
        let now = Instant::now();
        let mut t = Table::default();
        let e = t.on_cni_add(UID, plan(""), NS_A, "sandbox-1", now).unwrap();
        let _ = t.on_enrolled(UID, enrolled(e.attempt.unwrap().plan, NS_A, 11, "p1"));
        assert!(t.on_gone(UID, now + Duration::from_secs(1)).is_empty());
        assert_eq!(phase_name(&t), "enrolled");
        let e = t.on_gone(UID, now + API_GRACE);
        assert_eq!(e.stop, Some("p1"));
        // Once the API has shown it, its absence is its departure.
        let mut t = Table::default();
        let e = t.on_cni_add(UID, plan(""), NS_A, "sandbox-1", now).unwrap();
        let mut served = enrolled(e.attempt.unwrap().plan, NS_A, 11, "p1");
        served.given = true;
        let _ = t.on_enrolled(UID, served);
        assert!(
            t.on_api(UID, Want::Enroll(plan("")), Seen::Unknown, now)
                .is_empty()
        );
        assert_eq!(t.on_gone(UID, now).ungate, [11]);
    }

    /// What an agent handed over seeds the table: served on those sockets
    /// when the pod asks, closed (and out of the gate) when it does not.
    #[test]
    fn handed_over_sockets_are_served_or_closed() {
        let now = Instant::now();
        let mut t = Table::default();
        t.seed(UID.into(), "sockets-1", true, Some(11));
        t.seed("uid-2".into(), "sockets-2", false, Some(12));
        t.seed("uid-3".into(), "sockets-3", false, None);
        assert!(t.netns_known(UID));
        assert!(!t.netns_known("uid-2"));
        assert_eq!(t.gate_keep(), BTreeSet::from([11, 12]));
        assert_eq!(t.served().count(), 0);

        let e = t.on_api(UID, Want::Enroll(plan("")), Seen::Unknown, now);
        let attempt = e.attempt.unwrap();
        assert_eq!(attempt.handed, Some("sockets-1"));
        let _ = t.on_enrolled(UID, enrolled(attempt.plan, NS_A, 11, "p1"));
        let e = t.on_api("uid-2", Want::Nothing, Seen::Unknown, now);
        assert_eq!(e.close, Some("sockets-2"));
        assert_eq!(e.ungate, [12]);
        assert!(e.notice.is_none());
        let e = t.on_gone("uid-3", now);
        assert_eq!(e.close, Some("sockets-3"));
        assert_eq!(t.gate_keep(), BTreeSet::from([11]));
        assert_eq!(t.served().map(|(uid, _)| uid).collect::<Vec<_>>(), [UID]);
    }

    #[test]
    fn draining_stops_every_proxy_and_leaves_the_gate() {
        let now = Instant::now();
        let mut t = table_with_enrolled(now);
        t.seed("uid-2".into(), "sockets-2", false, Some(12));
        assert_eq!(t.drain(), ["p1"]);
        assert_eq!(t.uids(), Vec::<String>::new());
    }

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
