//! Carrying out the pod table's effects on the node: namespaces in and
//! out of the interceptor's gate, proxies stopped, enrollments made (and
//! their outcomes recorded), log lines and the pods' Events; and, when an
//! agent starts or takes over, the gate brought in line with the pods that
//! ask for signing.

use std::{sync::Arc, time::Instant};

use super::{
    NodeAgent, PodEffects,
    enroll::{self, EnrollError},
    events::{Kind, PodRef},
    handover::HandedPod,
    identity::IdentityError,
    pod_spec::{self, Decision, IdentityPlan, PodPlan},
    state::{self, Effects, Leaving, Notice},
};
use crate::{error_chain, netns::NetNs};

impl NodeAgent {
    /// Carries out a transition's effects (see [`Effects`]); an enrollment
    /// it asks for is made at once, in `given` when the CNI plugin passed
    /// the sandbox's namespace, and its outcome recorded. Returns that
    /// outcome, if there was an attempt.
    pub(super) fn apply(
        &mut self,
        uid: &str,
        effects: PodEffects,
        given: Option<NetNs>,
        via: &'static str,
    ) -> Option<Result<(), Arc<EnrollError>>> {
        let Effects {
            gate,
            ungate,
            stop,
            close,
            notice,
            attempt,
        } = effects;
        for cookie in gate {
            if let Err(e) = self.ctx.gate.enroll(cookie) {
                tracing::warn!(pod_uid = %uid, error = %crate::error_chain(&e), "could not keep a failing pod's network namespace in the interceptor");
            }
        }
        for cookie in ungate {
            if let Err(e) = self.ctx.gate.unenroll(cookie) {
                tracing::warn!(pod_uid = %uid, error = %crate::error_chain(&e), "could not remove a network namespace from the interceptor");
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
                    tracing::warn!(pod = %name, reason = %error_chain(&**why), "pod enrolled without credentials: its requests get 503");
                }
                // Without usable credentials (an identity the pod spec
                // gets wrong) every request gets 503: a Warning, naming
                // the problem.
                let kind = match enrolled.missing_identity {
                    Some(_) => Kind::Warning,
                    None => Kind::Normal,
                };
                self.events.publish(
                    &state::pod_ref(&enrolled.plan),
                    kind,
                    "Enrolled",
                    "Enroll",
                    enrolled_note(&enrolled.plan, enrolled.missing_identity.as_deref()),
                );
                for problem in &enrolled.plan.options.warnings {
                    let why = error_chain(problem);
                    tracing::warn!(pod = %name, reason = %why, "pod annotation ignored");
                    self.events.publish(
                        &state::pod_ref(&enrolled.plan),
                        Kind::Warning,
                        "BadAnnotation",
                        "Enroll",
                        why,
                    );
                }
                (self.table.on_enrolled(uid, enrolled), Ok(()))
            }
            Err(failure) => {
                self.ctx.metrics.count_enrollment(false);
                let error = Arc::new(failure.error);
                let effects = self.table.on_failed(
                    uid,
                    Arc::clone(&error),
                    failure.netns_cookie,
                    Instant::now(),
                );
                (effects, Err(error))
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
                let reason = error_chain(&reason);
                tracing::warn!(pod = %pod_name(&pod), %reason, "not enrolling pod");
                self.events
                    .publish(&pod, Kind::Warning, "EnrollmentRefused", "Enroll", reason);
            }
            Notice::Failed {
                pod,
                error,
                repeated,
                retry_in,
            } => {
                let reason = error_chain(&*error);
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
    pub(super) fn reconcile_gate(&self) {
        let mut keep = self.table.gate_keep();
        for pod in self.stores.pods.state() {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            if self.table.get(uid).is_some_and(|e| !e.gated().is_empty()) {
                continue;
            }
            let labels = self.stores.namespace_labels(&pod);
            if let Decision::Enroll(_) = pod_spec::decide_at_start(&pod, labels.as_ref())
                && let Some(cookie) = enroll::process_netns_cookie(&self.ctx, uid)
            {
                keep.insert(cookie);
            }
        }
        let cookies = match self.ctx.gate.cookies() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot list the interceptor's enrolled network namespaces");
                return;
            }
        };
        let stale: Vec<u64> = cookies.into_iter().filter(|c| !keep.contains(c)).collect();
        if stale.is_empty() {
            return;
        }
        for cookie in &stale {
            if let Err(e) = self.ctx.gate.unenroll(*cookie) {
                tracing::warn!(error = %crate::error_chain(&e), "could not remove a network namespace from the interceptor");
            }
        }
        tracing::info!(
            namespaces = stale.len(),
            "removed network namespaces from the interceptor that no pod asks for any more"
        );
    }
}

fn pod_name(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn enrolled_note(plan: &PodPlan, missing_identity: Option<&IdentityError>) -> String {
    match (&plan.identity, missing_identity) {
        (_, Some(why)) => format!(
            "lattice-agent intercepts this pod's VPC Lattice traffic, but cannot sign it: {}",
            error_chain(why)
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
        (IdentityPlan::Missing(why), None) => error_chain(why),
    }
}
