//! The control socket: an agent taking over gets the served pods'
//! sockets and namespaces (see [`super::handover`]), duplicated by the
//! loop that owns the pod table, and tells this agent when it serves them.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{NodeAgent, handover, spawn_unix_accept};

/// How the control socket asks the agent's loop for the served pods'
/// sockets.
pub(super) type HandoverRequest = oneshot::Sender<Vec<(String, handover::ServedPod)>>;

impl NodeAgent {
    /// Duplicates of every served pod's sockets and namespace, for an
    /// agent taking over.
    pub(super) fn handover(&self) -> Vec<(String, handover::ServedPod)> {
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

    /// Answers the agent that will replace this one on the control socket
    /// (see [`handover`]).
    pub(super) fn serve_control(&mut self, shutdown: &CancellationToken) -> std::io::Result<()> {
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
                    tracing::warn!(error = %crate::error_chain(&e), "handing the listeners over failed");
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
