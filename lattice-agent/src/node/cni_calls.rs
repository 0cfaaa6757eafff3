//! The CNI plugin's calls, handled by the node agent's loop (which owns
//! the pod table): `ADD` enrolls a pod in its sandbox's namespace before
//! any of its containers runs, `CHECK` says whether it is served there,
//! `DEL` lets it go until its next sandbox. [`super::cni`] receives the
//! calls and resolves their pods.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use lattice_cni::protocol::{Command, Reply, Request};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    NodeAgent,
    cni::{self, CniCall, CniSettings, PodLookup},
    pod_spec::{self, Decision},
};
use crate::netns::NetNs;

impl NodeAgent {
    /// Starts answering the CNI plugin and keeping it chained, if
    /// configured; returns the calls to handle and the settings.
    pub(super) fn serve_cni(
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
            pods: self.stores.pods.clone(),
            namespaces: self.stores.namespaces.clone(),
            client: self.client.clone(),
            node_name: self.node_name.clone(),
        };
        if let Err(e) = cni::serve(listener, lookup, tx, shutdown.clone()) {
            tracing::warn!(error = %e, "cannot serve the CNI plugin's socket: new pods are enrolled once the API shows them running");
            return (None, Some(settings));
        }
        (Some(rx), Some(settings))
    }

    /// A CNI plugin call, for a pod whose sandbox the runtime is setting
    /// up (`ADD`), checking (`CHECK`) or tearing down (`DEL`).
    pub(super) fn handle_cni(&mut self, call: CniCall) {
        let CniCall {
            request,
            pod,
            netns,
            reply,
        } = call;
        let answer = match (request.command, pod, netns) {
            (Command::Add, Some((pod, labels)), Some(netns)) => {
                self.cni_add(&request, &pod, labels.as_ref(), netns)
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
        request: &Request,
        pod: &Pod,
        labels: Option<&BTreeMap<String, String>>,
        netns: NetNs,
    ) -> Reply {
        let plan = match pod_spec::decide_at_start(pod, labels) {
            Decision::Enroll(plan) => *plan,
            Decision::Ignore => return reply(false, None),
            Decision::Refuse(reason) => {
                tracing::warn!(reason = %crate::error_chain(&reason), "not enrolling pod");
                return reply(false, None);
            }
        };
        let id = match netns.id() {
            Ok(id) => id,
            Err(e) => {
                return reply(
                    false,
                    Some(format!(
                        "lattice-agent could not read pod {}'s network namespace: {e}",
                        plan.display_name()
                    )),
                );
            }
        };
        let uid = plan.uid.clone();
        let name = plan.display_name();
        let Some(effects) =
            self.table
                .on_cni_add(&uid, plan, id, &request.container_id, Instant::now())
        else {
            // The runtime retried an ADD that succeeded.
            return reply(true, None);
        };
        match self.apply(&uid, effects, Some(netns), "CNI ADD") {
            Some(Err(error)) => reply(
                false,
                Some(format!(
                    "lattice-agent could not enroll pod {name}: {}",
                    crate::error_chain(&*error)
                )),
            ),
            _ => reply(true, None),
        }
    }

    fn cni_check(
        &self,
        pod: &Pod,
        labels: Option<&BTreeMap<String, String>>,
        netns: &NetNs,
    ) -> Reply {
        let Decision::Enroll(plan) = pod_spec::decide_at_start(pod, labels) else {
            return reply(false, None);
        };
        match netns.id() {
            Ok(id) if self.table.is_served_in(&plan.uid, id) => reply(true, None),
            _ => reply(
                false,
                Some(format!(
                    "pod {} asks for signing but its network namespace is not enrolled",
                    plan.display_name()
                )),
            ),
        }
    }

    fn cni_del(&mut self, request: &Request) -> Reply {
        let uid = if request.pod_uid.is_empty() {
            self.table
                .uid_by_name(&request.pod_namespace, &request.pod_name)
        } else {
            Some(request.pod_uid.clone())
        };
        if let Some(uid) = uid {
            let effects = self.table.on_cni_del(&uid, &request.container_id);
            self.apply(&uid, effects, None, "CNI DEL");
        }
        reply(false, None)
    }
}

fn reply(enrolled: bool, error: Option<String>) -> Reply {
    Reply { enrolled, error }
}
