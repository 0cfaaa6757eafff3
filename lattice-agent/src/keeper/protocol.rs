//! The parent and its worker talk over a Unix stream socket pair, in the
//! upgrade handover's framing ([`crate::node::handover`]: JSON lines,
//! descriptors alongside, one request and its answer at a time). The
//! worker asks; the parent answers:
//!
//! ```text
//! worker → parent: {"op":"shared"}
//! parent → worker: {"gate_capacity":4096,"log_program":12,"cni":true,"previous_orig_dst_ms":..}
//!                  + descriptors: the orig-dst map, the gate map, the
//!                    admin listener, the events socket[, the CNI
//!                    listener][, the replaced orig-dst map]
//! worker → parent: {"op":"next"}            (repeated until "last", as in
//! parent → worker: {"pods":[..],"last":..}   the handover) + descriptors
//! worker → parent: {"op":"started"}         it serves the pods it was handed
//! worker → parent: {"op":"hold","uid":..,"sockets":2,"netns":true,"state":".."}
//!                  + descriptors: the pod's sockets, then its namespace
//! worker → parent: {"op":"release","uid":..}
//! worker → parent: {"op":"serving"}         it serves every pod it knows:
//!                                           the agent it replaces may stop
//! parent → worker: {"ok":true}              (to each of the last four)
//! ```
//!
//! `state` is the worker's (see `node::resume`): the parent stores it and
//! hands it back without reading it. On the events socket the parent tells
//! the worker, unasked, one line per event: `{"event":"replaced"}` (a newer
//! agent serves the pods: stop accepting, drain). Its end of file means
//! the parent is gone.

use std::{
    io::{self, Read as _},
    net::TcpListener,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::Mutex,
};

use lattice_cni::frame::{self, Lines};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::node::handover::{
    Conn, HandedOver, HandoverError, MAX_STATE, PodSockets, ProtocolError, ServedPod,
};

/// A worker's request.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Shared,
    Next,
    Started,
    Hold(PodSockets),
    Release { uid: String },
    Serving,
}

impl Request {
    /// Its `op`, for errors.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Next => "next",
            Self::Started => "started",
            Self::Hold(_) => "hold",
            Self::Release { .. } => "release",
            Self::Serving => "serving",
        }
    }
}

/// The answer to `shared`; its descriptors follow in the order the
/// module's docs give.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedAnswer {
    pub gate_capacity: u32,
    /// A program whose eBPF log lines the worker forwards.
    pub log_program: Option<u32>,
    /// The CNI plugin's listener follows the events socket.
    pub cni: bool,
    /// The original-destination map of the programs this agent replaced
    /// comes last, to be read for this many more milliseconds (see
    /// `OrigDstMap::read_previous`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_orig_dst_ms: Option<u64>,
}

impl SharedAnswer {
    pub fn descriptors(&self) -> usize {
        4 + usize::from(self.cni) + usize::from(self.previous_orig_dst_ms.is_some())
    }
}

/// An event on the events socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Replaced,
}

/// The longest event line.
const MAX_EVENT: usize = 1024;

/// The acknowledgement of `started`, `hold`, `release` and `serving`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ack {
    pub ok: bool,
}

/// What the parent gives every worker it starts.
pub struct Shared {
    pub orig_dst: OwnedFd,
    pub gate: OwnedFd,
    pub gate_capacity: u32,
    pub admin: TcpListener,
    /// Parent → worker events (see [`watch_events`]).
    pub events: UnixStream,
    pub cni: Option<UnixListener>,
    pub log_program: Option<u32>,
    /// The replaced programs' original-destination map, and for how long
    /// to read it.
    pub previous_orig_dst: Option<(OwnedFd, std::time::Duration)>,
}

/// How errors name the channel.
fn channel_name(fd: i32) -> PathBuf {
    PathBuf::from(format!("the node agent's worker channel (fd {fd})"))
}

/// The worker's end of the channel.
pub struct WorkerLink {
    conn: Mutex<Conn>,
}

impl WorkerLink {
    /// The channel the parent gave this process (`--worker-channel`).
    pub fn new(fd: OwnedFd) -> Result<Self, HandoverError> {
        let name = channel_name(fd.as_raw_fd());
        let conn = Conn::with_timeouts(UnixStream::from(fd), name)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The maps, listeners and events socket every worker serves with.
    pub fn shared(&self) -> Result<Shared, HandoverError> {
        let mut conn = self.conn();
        conn.send(&Request::Shared, &[])?;
        let (answer, fds): (SharedAnswer, _) = conn.receive(frame::MAX_FDS)?;
        if fds.len() != answer.descriptors() {
            return Err(conn.protocol(ProtocolError::SharedMismatch {
                announced: answer.descriptors(),
                received: fds.len(),
            }));
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().expect("counted above");
        Ok(Shared {
            orig_dst: next(),
            gate: next(),
            gate_capacity: answer.gate_capacity,
            admin: TcpListener::from(next()),
            events: UnixStream::from(next()),
            cni: answer.cni.then(|| UnixListener::from(next())),
            log_program: answer.log_program,
            previous_orig_dst: answer
                .previous_orig_dst_ms
                .map(|ms| (next(), std::time::Duration::from_millis(ms))),
        })
    }

    /// Every pod the parent holds.
    pub fn take_pods(&self) -> Result<HandedOver, HandoverError> {
        self.conn().take_pods()
    }

    /// It serves the pods it was handed.
    pub fn started(&self) -> Result<(), HandoverError> {
        self.ask(&Request::Started, &[])
    }

    /// The parent holds `pod`'s descriptors (duplicates; these close once
    /// sent) for `uid`, in place of any it held.
    pub fn hold(&self, uid: &str, pod: ServedPod) -> Result<(), HandoverError> {
        let fds: Vec<i32> = pod
            .listeners
            .iter()
            .chain(pod.netns.as_ref())
            .map(AsRawFd::as_raw_fd)
            .collect();
        let request = Request::Hold(PodSockets {
            uid: uid.to_owned(),
            sockets: pod.listeners.len(),
            netns: pod.netns.is_some(),
            state: pod.state.clone().filter(|s| s.len() <= MAX_STATE),
        });
        self.ask(&request, &fds)
    }

    /// The parent closes what it holds for `uid`.
    pub fn release(&self, uid: &str) -> Result<(), HandoverError> {
        self.ask(
            &Request::Release {
                uid: uid.to_owned(),
            },
            &[],
        )
    }

    /// It serves every pod it knows; returns once the parent has told the
    /// agent it replaces, if any.
    pub fn serving(&self) -> Result<(), HandoverError> {
        self.ask(&Request::Serving, &[])
    }

    fn ask(&self, request: &Request, fds: &[i32]) -> Result<(), HandoverError> {
        let mut conn = self.conn();
        conn.send(request, fds)?;
        let (ack, _): (Ack, _) = conn.receive(0)?;
        if !ack.ok {
            return Err(conn.protocol(ProtocolError::Refused { op: request.op() }));
        }
        Ok(())
    }
}

/// Reads the parent's events until its end of file, on a thread of its
/// own: `replaced` is cancelled at that event; `gone` when the parent is.
pub fn watch_events(
    events: UnixStream,
    replaced: CancellationToken,
    gone: CancellationToken,
) -> io::Result<()> {
    events.set_read_timeout(None)?;
    std::thread::Builder::new()
        .name("keeper-events".into())
        .spawn(move || {
            let mut lines = Lines::new(MAX_EVENT);
            let mut buf = [0u8; 256];
            loop {
                let n = match (&events).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if lines.push(&buf[..n]).is_err() {
                    tracing::warn!("an event line from the node agent's parent is too long");
                    break;
                }
                while let Some(line) = lines.next_line() {
                    match serde_json::from_slice::<Event>(&line) {
                        Ok(Event::Replaced) => replaced.cancel(),
                        Err(e) => {
                            tracing::warn!(error = %e, "unknown event from the node agent's parent")
                        }
                    }
                }
            }
            gone.cancel();
        })
        .map(drop)
}

/// Writes `event` on the events socket.
pub fn send_event(events: &UnixStream, event: Event) -> io::Result<()> {
    use std::io::Write as _;
    let mut line = serde_json::to_vec(&event).map_err(io::Error::other)?;
    line.push(b'\n');
    (&*events).write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        for (line, request) in [
            (r#"{"op":"shared"}"#, Request::Shared),
            (r#"{"op":"next"}"#, Request::Next),
            (r#"{"op":"started"}"#, Request::Started),
            (
                r#"{"op":"hold","uid":"u","sockets":2,"netns":true,"state":"s"}"#,
                Request::Hold(PodSockets {
                    uid: "u".into(),
                    sockets: 2,
                    netns: true,
                    state: Some("s".into()),
                }),
            ),
            (
                r#"{"op":"release","uid":"u"}"#,
                Request::Release { uid: "u".into() },
            ),
            (r#"{"op":"serving"}"#, Request::Serving),
        ] {
            assert_eq!(
                serde_json::from_str::<Request>(line).unwrap(),
                request,
                "{line}"
            );
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
        }
        // The worker's `next` is the handover's.
        assert_eq!(
            serde_json::to_string(&Request::Next).unwrap(),
            serde_json::to_string(&crate::node::handover::Request::Next).unwrap()
        );
    }

    #[test]
    fn events_arrive_until_the_parent_goes() {
        let (parent, worker) = UnixStream::pair().unwrap();
        let (replaced, gone) = (CancellationToken::new(), CancellationToken::new());
        watch_events(worker, replaced.clone(), gone.clone()).unwrap();
        send_event(&parent, Event::Replaced).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !replaced.is_cancelled() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!gone.is_cancelled());
        drop(parent);
        while !gone.is_cancelled() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
