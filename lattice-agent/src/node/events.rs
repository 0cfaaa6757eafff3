//! Kubernetes Events on pods: enrolled, enrollment failed (with the
//! reason), refused, unenrolled. `kubectl describe pod` shows them.
//!
//! Each Event is created once (`events.k8s.io/v1`, verb `create` only: no
//! patching of event series, so the ClusterRole needs no more). The caller
//! publishes on state changes, not on every retry. Publishing never blocks
//! enrollment: it runs as a task, and a failure is only logged.

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::api::{Api, PostParams};

/// `reportingController` of every Event the agent creates.
pub const CONTROLLER: &str = "vpc-lattices-svcs.amazonaws.com/lattice-agent";

/// The pod an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

#[derive(Clone)]
pub struct EventPublisher {
    client: kube::Client,
    /// `reportingInstance`: this node's agent.
    instance: String,
}

impl EventPublisher {
    pub fn new(client: kube::Client, node_name: &str) -> Self {
        Self {
            client,
            instance: format!("lattice-agent-{node_name}"),
        }
    }

    /// Creates an Event on `pod` in the background.
    pub fn publish(
        &self,
        pod: &PodRef,
        kind: Kind,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) {
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            reporting_controller: Some(CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            action: Some(action.to_owned()),
            reason: Some(reason.to_owned()),
            // The API refuses notes over 1 kB.
            note: Some(truncate(note, 1024)),
            type_: Some(
                match kind {
                    Kind::Normal => "Normal",
                    Kind::Warning => "Warning",
                }
                .to_owned(),
            ),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        let pod = pod.clone();
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::warn!(
                    pod = %format!("{}/{}", pod.namespace, pod.name),
                    reason,
                    error = %e,
                    "could not create a Kubernetes Event (RBAC: create on events)"
                );
            }
        });
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn notes_are_cut_on_a_char_boundary() {
        assert_eq!(truncate("abc".into(), 1024), "abc");
        assert_eq!(truncate("é".repeat(600), 1024).len(), 1024);
        assert_eq!(truncate(format!("a{}", "é".repeat(600)), 1024).len(), 1023);
    }
}
