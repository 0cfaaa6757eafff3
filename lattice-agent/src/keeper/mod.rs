//! Node mode's parent: a small, long-lived process that holds what must
//! outlive a crash and runs one worker (the same executable) that does
//! everything else.
//!
//! ```text
//!   parent (this module)                      worker (crate::node)
//!   ─────────────────────                     ────────────────────
//!   attached programs and pins                the pod table, API watches
//!   the gate and orig-dst maps   ── fds ──►   enrollment, each pod's proxy
//!   admin, CNI, control sockets  ── fds ──►   admin endpoints, CNI calls
//!   every pod's listeners and    ◄─ hold ──   (hands each pod it serves
//!   namespace, and its state     ── next ─►    back to the parent; takes
//!                                              them all when it starts)
//!   waitpid: a dead worker is replaced at once
//! ```
//!
//! The parent allocates little and reads nothing a pod or the network
//! controls: its worker's requests (see [`protocol`]) and an agent taking
//! over on the control socket (root or the agent's own UID, see
//! [`crate::node::peer`]). When the worker dies (a crash, an OOM kill, a
//! SIGKILL) the pods' listening sockets stay open in the parent: connects
//! keep landing in their backlogs, recorded by the programs with their
//! original destinations (keyed by the client's address, which does not
//! change), and the next worker, started at once, takes the sockets and
//! each pod's namespace and state, serves them before it lists anything
//! from the API, and reconciles against the API in the background. Only
//! the requests the dead worker was serving are lost. A CNI ADD meanwhile
//! waits in the CNI socket's backlog for the next worker.
//!
//! Workers that keep dying are given up on (see [`restarts`]): the parent
//! exits and the kubelet restarts the container with its back-off; the
//! programs stay pinned, so the pods' Lattice connects are refused
//! meanwhile, never sent unsigned. If the parent itself dies, its worker
//! dies with it (`PR_SET_PDEATHSIG`) and the same holds until the next
//! agent takes the pins over.

mod control;
mod held;
pub mod protocol;
mod restarts;
mod setup_pages;
mod worker;

use std::{
    collections::VecDeque,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lattice_cni::frame;
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, Signal, kill},
        signalfd::{SfdFlags, SignalFd},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use self::{
    control::Notices,
    held::HeldPods,
    protocol::{Ack, Request, SharedAnswer},
    restarts::{AfterDeath, Restarts},
};
pub use self::{restarts::RestartLimits, worker::WorkerCommand};
use crate::{
    bpf::Interceptor,
    node::handover::{
        self, Batch, BatchError, Conn, HandedOver, HandoverError, MAX_STATE, Predecessor,
        ProtocolError, ServedPod,
    },
};

/// The longest pod UID a worker may hold sockets for (Kubernetes UIDs are
/// 36 characters).
const MAX_UID: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("handling signals")]
    Signals(#[source] nix::Error),
    #[error("waiting for the worker and the control socket")]
    Poll(#[source] nix::Error),
    #[error(
        "the worker died {deaths} times within {window:?} (--worker-crash-limit, --worker-crash-window): \
         exiting for the kubelet to restart the agent; the programs stay pinned, so the pods' \
         VPC Lattice connects are refused meanwhile"
    )]
    CrashLoop { deaths: usize, window: Duration },
}

/// What every worker is given.
pub struct SharedFds {
    pub orig_dst: OwnedFd,
    /// The original-destination map the programs this agent replaced
    /// recorded into, and until when it is read: connections they
    /// redirected may still wait in a backlog. Dropped then.
    pub previous_orig_dst: Option<(OwnedFd, Instant)>,
    pub gate: OwnedFd,
    pub gate_capacity: u32,
    pub admin: OwnedFd,
    pub cni: Option<OwnedFd>,
    pub log_program: Option<u32>,
}

/// The parent, bound and attached, its privileges dropped.
pub struct Keeper {
    /// The programs (and their links, when not pinned).
    interceptor: Interceptor,
    shared: SharedFds,
    held: Arc<Mutex<HeldPods>>,
    /// The agent this one replaces, told once the first worker serves.
    predecessor: Option<Predecessor>,
    control: UnixListener,
    command: WorkerCommand,
    restarts: Restarts,
    limits: RestartLimits,
    notices: Arc<Notices>,
}

/// A running worker.
struct Running {
    pid: Pid,
    conn: Conn,
    /// The channel is open (false after its end of file: the worker is
    /// going; its exit follows).
    open: bool,
    /// It said it serves the pods it was handed.
    started: bool,
    /// Its end of the events socket, until sent on `shared`.
    events: Option<UnixStream>,
    /// The pods being sent on `next`, until the last answer.
    snapshot: Option<Snapshot>,
}

/// Duplicates of the held pods and the answers cut from them.
struct Snapshot {
    _pods: Vec<(String, ServedPod)>,
    answers: VecDeque<(Batch, Vec<RawFd>)>,
}

impl Keeper {
    pub fn new(
        interceptor: Interceptor,
        shared: SharedFds,
        handed: Option<(Predecessor, HandedOver)>,
        control: UnixListener,
        command: WorkerCommand,
        limits: RestartLimits,
    ) -> Self {
        let (predecessor, handed) = match handed {
            Some((p, pods)) => (Some(p), pods),
            None => (None, HandedOver::new()),
        };
        let held = HeldPods::new(handed.into_iter().map(|(uid, pod)| (uid, pod.into())));
        Self {
            interceptor,
            shared,
            held: Arc::new(Mutex::new(held)),
            predecessor,
            control,
            command,
            restarts: Restarts::new(limits),
            limits,
            notices: Arc::new(Notices::default()),
        }
    }

    /// Runs workers until SIGTERM or SIGINT (forwarded to the worker, whose
    /// exit this waits for) or until they keep dying; then leaves the
    /// programs as the interceptor says (pinned ones stay).
    pub fn run(mut self) -> Result<(), KeeperError> {
        let result = self.serve();
        self.interceptor.detach();
        result
    }

    fn serve(&mut self) -> Result<(), KeeperError> {
        let mut signals = SigSet::empty();
        for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
            signals.add(s);
        }
        signals.thread_block().map_err(KeeperError::Signals)?;
        let signal_fd =
            SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
                .map_err(KeeperError::Signals)?;
        if let Err(e) = self.control.set_nonblocking(true) {
            tracing::warn!(error = %e, "control socket: a new agent will not be able to take over");
        }
        let mut worker: Option<Running> = None;
        let mut start_at = Some(Instant::now());
        let mut stopping: Option<Signal> = None;
        loop {
            if worker.is_none() {
                if stopping.is_some() {
                    return Ok(());
                }
                if self.notices.replaced() {
                    start_at = None;
                }
                if start_at.is_some_and(|at| at <= Instant::now()) {
                    start_at = None;
                    match self.start_worker() {
                        Ok(running) => worker = Some(running),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the worker");
                            start_at = Some(self.after_death(false)?);
                        }
                    }
                }
            }
            if self
                .shared
                .previous_orig_dst
                .as_ref()
                .is_some_and(|(_, until)| *until <= Instant::now())
            {
                self.shared.previous_orig_dst = None;
            }
            let wake = [
                start_at.filter(|_| worker.is_none()),
                self.shared
                    .previous_orig_dst
                    .as_ref()
                    .map(|(_, until)| *until),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = match wake {
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis();
                    PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::NONE)
                }
                None => PollTimeout::NONE,
            };
            let channel = worker
                .as_ref()
                .filter(|w| w.open)
                .map(|w| w.conn.stream().as_fd());
            let mut fds = vec![
                PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(channel) = channel {
                fds.push(PollFd::new(channel, PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(KeeperError::Poll(e)),
            }
            let ready = |fd: &PollFd<'_>| {
                fd.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            };
            let (signalled, control, request) = (
                ready(&fds[0]),
                ready(&fds[1]),
                fds.get(2).is_some_and(ready),
            );
            drop(fds);
            if request && let Some(running) = worker.as_mut() {
                self.answer(running);
            }
            if control {
                control::accept(&self.control, &self.held, &self.notices);
            }
            if !signalled {
                continue;
            }
            while let Ok(Some(info)) = signal_fd.read_signal() {
                if let Ok(s @ (Signal::SIGTERM | Signal::SIGINT)) =
                    Signal::try_from(info.ssi_signo as i32)
                {
                    tracing::info!(signal = %s, "stopping: the worker drains, then the agent exits");
                    stopping = Some(s);
                    if let Some(running) = &worker {
                        let _ = kill(running.pid, Signal::SIGTERM);
                    }
                }
            }
            // SIGCHLD (possibly merged with others): reap every child.
            loop {
                let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => status,
                };
                let Some(pid) = status.pid() else { break };
                if worker.as_ref().is_none_or(|w| w.pid != pid) {
                    continue;
                }
                let dead = worker.take().expect("checked above");
                self.notices.set_worker(None);
                if stopping.is_some() {
                    tracing::info!(status = %describe(status), "worker stopped");
                    continue;
                }
                if self.notices.replaced() {
                    tracing::info!(status = %describe(status), "worker stopped (replaced)");
                    continue;
                }
                let after = self.after_death(dead.started)?;
                tracing::warn!(
                    status = %describe(status),
                    restart_in_ms = after.saturating_duration_since(Instant::now()).as_millis() as u64,
                    held_pods = self.held().len(),
                    "worker died: its pods' connections wait in their listeners' backlogs for the next one"
                );
                start_at = Some(after);
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HeldPods> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When to start the next worker after one died, or the error to exit
    /// with.
    fn after_death(&mut self, served: bool) -> Result<Instant, KeeperError> {
        let now = Instant::now();
        match self.restarts.on_death(now, served) {
            AfterDeath::Restart(wait) => Ok(now + wait),
            AfterDeath::GiveUp(deaths) => Err(KeeperError::CrashLoop {
                deaths,
                window: self.limits.window,
            }),
        }
    }

    fn start_worker(&self) -> std::io::Result<Running> {
        let spawned = self.command.spawn()?;
        let conn =
            match Conn::with_timeouts(spawned.channel, "the node agent's worker channel".into()) {
                Ok(conn) => conn,
                Err(e) => {
                    let _ = kill(spawned.pid, Signal::SIGKILL);
                    return Err(std::io::Error::other(e));
                }
            };
        let held = self.held();
        tracing::info!(
            pid = spawned.pid.as_raw(),
            pods = held.len(),
            descriptors = held.descriptors(),
            "worker started"
        );
        drop(held);
        self.notices.set_worker(Some(spawned.events));
        Ok(Running {
            pid: spawned.pid,
            conn,
            open: true,
            started: false,
            events: Some(spawned.worker_events),
            snapshot: None,
        })
    }

    /// Answers the worker's next request. A worker that breaks the
    /// protocol is killed (and replaced).
    fn answer(&mut self, running: &mut Running) {
        match self.handle(running) {
            Ok(()) => {}
            Err(e) if is_closed(&e) => running.open = false,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "the worker broke the protocol: killing it");
                running.open = false;
                let _ = kill(running.pid, Signal::SIGKILL);
            }
        }
    }

    fn handle(&mut self, running: &mut Running) -> Result<(), HandoverError> {
        let conn = &mut running.conn;
        let (request, fds): (Request, _) = conn.receive(frame::MAX_FDS)?;
        if !matches!(request, Request::Hold(_)) && !fds.is_empty() {
            return Err(conn.protocol(ProtocolError::UnexpectedFds { op: request.op() }));
        }
        let ack = |conn: &mut Conn| conn.send(&Ack { ok: true }, &[]);
        match request {
            Request::Shared => {
                let events = running
                    .events
                    .take()
                    .ok_or_else(|| conn.protocol(ProtocolError::SharedTwice))?;
                let shared = &self.shared;
                let mut out: Vec<RawFd> = vec![
                    shared.orig_dst.as_raw_fd(),
                    shared.gate.as_raw_fd(),
                    shared.admin.as_raw_fd(),
                    events.as_raw_fd(),
                ];
                out.extend(shared.cni.as_ref().map(|c| c.as_raw_fd()));
                let previous = shared
                    .previous_orig_dst
                    .as_ref()
                    .map(|(fd, until)| (fd, until.saturating_duration_since(Instant::now())))
                    .filter(|(_, left)| !left.is_zero());
                out.extend(previous.map(|(fd, _)| fd.as_raw_fd()));
                let answer = SharedAnswer {
                    gate_capacity: shared.gate_capacity,
                    log_program: shared.log_program,
                    cni: shared.cni.is_some(),
                    previous_orig_dst_ms: previous.map(|(_, left)| left.as_millis() as u64),
                };
                conn.send(&answer, &out)
            }
            Request::Next => {
                let snapshot = running.snapshot.get_or_insert_with(|| {
                    let pods = self
                        .held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .duplicates();
                    let answers = handover::batches(&pods).collect();
                    Snapshot {
                        _pods: pods,
                        answers,
                    }
                });
                let (batch, fds) = snapshot.answers.pop_front().unwrap_or_else(|| {
                    (
                        Batch {
                            pods: Vec::new(),
                            last: true,
                        },
                        Vec::new(),
                    )
                });
                let last = batch.last;
                conn.send(&batch, &fds)?;
                if last {
                    running.snapshot = None;
                }
                Ok(())
            }
            Request::Started => {
                running.started = true;
                tracing::info!(pid = running.pid.as_raw(), "worker serving");
                let acked = ack(conn);
                // Setting up, and starting a worker, ran code the loop
                // does not run again until the next worker.
                release_code_pages();
                acked
            }
            Request::Hold(pod) => {
                let wanted = pod.sockets.checked_add(usize::from(pod.netns));
                if wanted != Some(fds.len()) {
                    return Err(conn.protocol(ProtocolError::HoldMismatch {
                        uid: pod.uid,
                        announced: wanted.unwrap_or(usize::MAX),
                        received: fds.len(),
                    }));
                }
                if pod.uid.is_empty() || pod.uid.len() > MAX_UID {
                    return Err(conn.protocol(ProtocolError::HoldUid {
                        len: pod.uid.len(),
                        max: MAX_UID,
                    }));
                }
                if pod.state.as_ref().is_some_and(|s| s.len() > MAX_STATE) {
                    return Err(conn.protocol(BatchError::StateTooLong { uid: pod.uid }.into()));
                }
                let mut fds = fds.into_iter();
                let served = ServedPod {
                    listeners: fds.by_ref().take(pod.sockets).collect(),
                    netns: fds.next(),
                    state: pod.state,
                };
                // Once replaced, the new agent holds the pods.
                if !self.notices.replaced() {
                    self.held().hold(pod.uid, served);
                }
                ack(conn)
            }
            Request::Release { uid } => {
                self.held().release(&uid);
                ack(conn)
            }
            Request::Serving => {
                if let Some(predecessor) = self.predecessor.take() {
                    match predecessor.taken() {
                        Ok(()) => tracing::info!("took over from the agent this one replaces"),
                        Err(e) => {
                            tracing::warn!(error = %crate::error_chain(&e), "the replaced agent did not confirm the takeover")
                        }
                    }
                }
                ack(&mut running.conn)
            }
        }
    }
}

/// Drops the pages of this executable the parent mapped while setting up
/// or starting a worker (see [`setup_pages`]).
fn release_code_pages() {
    match setup_pages::release() {
        Ok(released) => tracing::debug!(
            read_only_bytes = released.segments_bytes,
            rss_before_kib = released.rss_before_kib,
            rss_after_kib = released.rss_after_kib,
            "dropped the executable's pages mapped while starting"
        ),
        Err(e) => {
            tracing::debug!(error = %e, "cannot drop the executable's pages mapped while starting")
        }
    }
}

/// The worker closed its end (it is exiting).
fn is_closed(e: &HandoverError) -> bool {
    match e {
        HandoverError::Protocol {
            problem: ProtocolError::Closed,
            ..
        } => true,
        HandoverError::Protocol { .. } => false,
        HandoverError::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
    }
}

/// `exited with 1`, `killed by SIGKILL`.
fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {signal}"),
        other => format!("{other:?}"),
    }
}
