//! The control socket, served by the parent: an agent taking over (a
//! rolling update) gets every pod the parent holds, with its state, over
//! the upgrade handover ([`crate::node::handover`]), whether or not a
//! worker runs at that moment. Once it serves them it says so; this
//! parent then tells its worker to stop accepting and drain, closes what
//! it holds and starts no more workers.

use std::{
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::{
    held::HeldPods,
    protocol::{self, Event},
};
use crate::node::{handover, peer};

/// What the parent's loop and the control connections share.
#[derive(Default)]
pub struct Notices {
    replaced: AtomicBool,
    /// The running worker's events socket.
    events: Mutex<Option<UnixStream>>,
}

impl Notices {
    pub fn replaced(&self) -> bool {
        self.replaced.load(Ordering::SeqCst)
    }

    /// The events socket of a worker just started; it learns at once if
    /// this agent was replaced meanwhile.
    pub fn set_worker(&self, events: Option<UnixStream>) {
        let mut slot = self.events.lock().unwrap_or_else(|p| p.into_inner());
        *slot = events;
        if self.replaced() {
            Self::tell(slot.as_ref());
        }
    }

    fn set_replaced(&self) {
        let slot = self.events.lock().unwrap_or_else(|p| p.into_inner());
        self.replaced.store(true, Ordering::SeqCst);
        Self::tell(slot.as_ref());
    }

    fn tell(events: Option<&UnixStream>) {
        if let Some(events) = events
            && let Err(e) = protocol::send_event(events, Event::Replaced)
        {
            tracing::warn!(error = %e, "cannot tell the worker it was replaced");
        }
    }
}

/// Accepts every connection waiting on the control socket (non-blocking),
/// serving each allowed one on a thread of its own.
pub fn accept(listener: &UnixListener, held: &Arc<Mutex<HeldPods>>, notices: &Arc<Notices>) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(std::path::Path::to_owned))
        .unwrap_or_default();
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                return;
            }
        };
        if !peer::allowed(&stream, "control") {
            continue;
        }
        let source = HeldSource {
            held: Arc::clone(held),
            notices: Arc::clone(notices),
        };
        let path: PathBuf = path.clone();
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let handed = stream
                    .set_nonblocking(false)
                    .map_err(|source| handover::HandoverError::Io {
                        path: path.clone(),
                        source,
                    })
                    .and_then(|()| handover::serve_successor(stream, &path, &source));
                if let Err(e) = handed {
                    tracing::warn!(error = %crate::error_chain(&e), "handing the listeners over failed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve a control connection");
        }
    }
}

/// The control socket's view of the parent.
struct HeldSource {
    held: Arc<Mutex<HeldPods>>,
    notices: Arc<Notices>,
}

impl handover::Listeners for HeldSource {
    fn listeners(&self) -> Vec<(String, handover::ServedPod)> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .duplicates()
    }

    fn handed_over(&self) {
        tracing::info!(
            "a new agent took the pods over: this one's worker stops accepting and drains; no more workers start"
        );
        self.notices.set_replaced();
        // The new agent holds its own descriptors: a pod it stops serving
        // must not stay reachable through this one's.
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
