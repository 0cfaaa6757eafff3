//! The open client connections of one workload, at most
//! `--max-connections`, and making room for a new one at that limit.
//!
//! At the limit a new connection closes the oldest idle one, as nginx
//! does when it runs out of connections, instead of waiting behind it:
//! idle is an HTTP connection with no request in flight (between
//! requests, or a request head still trickling in) and a connection that
//! has not yet said what it speaks. A connection passed through is never
//! idle: a byte stream has no request boundaries, so a quiet database
//! session cannot be told from a busy one, and closing it would break a
//! connection that works without the agent. Only when no connection is
//! idle does a new one wait, until one closes or goes idle.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use super::server::Activity;

/// How often a connection waiting at the limit looks again for an idle
/// one to close (a request may have finished meanwhile).
const RECHECK: Duration = Duration::from_millis(10);

/// What a connection is doing, as far as closing it for room goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not yet said what it speaks: idle.
    Opening = 0,
    /// Served as HTTP: idle when no request is in flight.
    Http = 1,
    /// Passed through: never idle.
    PassedThrough = 2,
}

/// One open client connection, as the table sees it.
pub struct Conn {
    pub activity: Arc<Activity>,
    phase: AtomicU8,
    /// Cancelled to ask the connection to close to make room.
    close: CancellationToken,
    asked: AtomicBool,
}

impl Conn {
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Cancelled when the connection is asked to close to make room.
    pub fn close_requested(&self) -> &CancellationToken {
        &self.close
    }

    fn idle(&self) -> bool {
        match self.phase.load(Ordering::Acquire) {
            p if p == Phase::Opening as u8 => true,
            p if p == Phase::Http as u8 => !self.activity.busy(),
            _ => false,
        }
    }

    /// Asked to close and still idle: its slot comes back soon.
    fn closing(&self) -> bool {
        self.asked.load(Ordering::Acquire) && self.idle()
    }
}

/// The workload's open connections, oldest first.
pub struct Conns {
    slots: Arc<Semaphore>,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next: AtomicU64,
}

impl Conns {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max)),
            open: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// A slot for a new connection: a free one, else one the oldest idle
    /// connection gives up; `None` at shutdown. `on_close` is told of
    /// each connection asked to close.
    pub async fn admit(
        &self,
        shutdown: &CancellationToken,
        on_close: impl Fn(),
    ) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => return Some(slot),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        loop {
            if self.close_oldest_idle() {
                on_close();
            }
            tokio::select! {
                slot = Arc::clone(&self.slots).acquire_owned() => return slot.ok(),
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Registers an admitted connection; it leaves the table (and gives
    /// its slot back) when the returned guard drops.
    pub fn register(self: &Arc<Self>, slot: OwnedSemaphorePermit, activity: Arc<Activity>) -> Open {
        let conn = Arc::new(Conn {
            activity,
            phase: AtomicU8::new(Phase::Opening as u8),
            close: CancellationToken::new(),
            asked: AtomicBool::new(false),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Arc::clone(&conn));
        Open {
            conns: Arc::clone(self),
            id,
            conn,
            _slot: slot,
        }
    }

    /// Asks the oldest idle connection to close, unless one asked before
    /// is still closing; true when it asked one now.
    fn close_oldest_idle(&self) -> bool {
        let open = self.lock();
        if open.values().any(|c| c.closing()) {
            return false;
        }
        let Some(oldest) = open
            .values()
            .find(|c| !c.asked.load(Ordering::Acquire) && c.idle())
        else {
            return false;
        };
        oldest.asked.store(true, Ordering::Release);
        oldest.close.cancel();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An open connection's place in the table and its slot.
pub struct Open {
    conns: Arc<Conns>,
    id: u64,
    pub conn: Arc<Conn>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(conns: &Arc<Conns>) -> Open {
        let slot = Arc::clone(&conns.slots)
            .try_acquire_owned()
            .expect("a slot");
        conns.register(slot, Arc::new(Activity::new()))
    }

    #[tokio::test]
    async fn at_the_limit_the_oldest_idle_connection_makes_room() {
        let conns = Conns::new(3);
        let shutdown = CancellationToken::new();
        let (a, b, c) = (open(&conns), open(&conns), open(&conns));
        // a: busy HTTP; b: passed through; c: idle HTTP.
        a.conn.set_phase(Phase::Http);
        let busy = a.conn.activity.begin();
        b.conn.set_phase(Phase::PassedThrough);
        c.conn.set_phase(Phase::Http);
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let admit = conns.admit(&shutdown, || {
            asked.fetch_add(1, Ordering::Relaxed);
        });
        tokio::pin!(admit);
        // Not admitted until the idle one closes.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), admit.as_mut())
                .await
                .is_err()
        );
        assert!(c.conn.close_requested().is_cancelled());
        assert!(!a.conn.close_requested().is_cancelled());
        assert!(!b.conn.close_requested().is_cancelled());
        assert_eq!(asked.load(Ordering::Relaxed), 1, "asked once while closing");
        drop(c);
        let slot = admit.await.expect("admitted");
        drop(slot);

        // Nothing idle: wait until a request finishes, then close that one.
        let d = open(&conns);
        d.conn.set_phase(Phase::PassedThrough);
        let admit = conns.admit(&shutdown, || {});
        tokio::pin!(admit);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), admit.as_mut())
                .await
                .is_err()
        );
        assert!(!a.conn.close_requested().is_cancelled());
        drop(busy);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), admit.as_mut())
                .await
                .is_err()
        );
        assert!(a.conn.close_requested().is_cancelled());
        drop(a);
        assert!(admit.await.is_some());
    }

    #[tokio::test]
    async fn opening_connections_are_idle_oldest_first_and_shutdown_stops_waiting() {
        let conns = Conns::new(2);
        let shutdown = CancellationToken::new();
        let (first, second) = (open(&conns), open(&conns));
        let admit = conns.admit(&shutdown, || {});
        tokio::pin!(admit);
        assert!(
            tokio::time::timeout(Duration::from_millis(30), admit.as_mut())
                .await
                .is_err()
        );
        assert!(first.conn.close_requested().is_cancelled());
        assert!(!second.conn.close_requested().is_cancelled());
        shutdown.cancel();
        assert!(admit.await.is_none());
    }
}
