//! Agent replacement without a failed request: the running agent hands its
//! pods' listening sockets to its successor.
//!
//! During a DaemonSet rollout (`maxSurge: 1`) the new agent starts while the
//! old one still serves. It connects to the old one's control socket
//! (`<run dir>/agent.sock`) and asks for the listeners; they arrive as file
//! descriptors (SCM_RIGHTS), the very sockets the pods' redirected connects
//! land on, each pod's with its network namespace (so a pod that has no IP
//! in the API yet, enrolled by the CNI plugin, is served on at once). Both agents then accept from the same sockets, so no connection
//! waiting in an accept queue is lost (a fresh `SO_REUSEPORT` socket beside
//! the old one would lose those when the old one closes, unless every pod's
//! namespace had `net.ipv4.tcp_migrate_req` set). Once the new agent serves
//! every pod it knows, it says so (`TAKEN`); the old agent stops accepting,
//! drains its connections and leaves the shared state (pinned programs and
//! maps, enrolled namespaces) alone from then on: the new agent owns it.
//!
//! The exchange is line-based JSON over a Unix stream socket, in lockstep
//! (one request, one answer) so each answer's descriptors stay with it.
//! Every frame is capped ([`lattice_cni::frame`]): a line longer than
//! [`MAX_FRAME`] or more descriptors than one message can carry end the
//! exchange with an error, whichever agent sends them.
//!
//! ```text
//! new → old: {"op":"next"}                  (repeated until "last")
//! old → new: {"pods":[{"uid":..,"sockets":2,"netns":true},..],"last":false}
//!            + descriptors: each pod's sockets, then its namespace
//! new → old: {"op":"taken"}
//! old → new: {"ok":true}
//! ```

use std::{
    collections::HashMap,
    io::{self, IoSlice, Write as _},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use lattice_cni::frame::{self, FrameError, Lines};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize};

/// Pods per answer: two sockets and a namespace each, within the kernel's
/// 253 descriptors per SCM_RIGHTS message.
pub const PODS_PER_BATCH: usize = 80;
/// The longest line either agent sends or accepts: an answer of
/// [`PODS_PER_BATCH`] pods is a few KiB.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket in the agents' shared run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.sock")
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("control socket {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}", path.display())]
    Protocol {
        path: PathBuf,
        #[source]
        problem: ProtocolError,
    },
}

/// What the other agent sent (or this one would send) that the exchange
/// does not allow.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("closed by the other agent")]
    Closed,
    #[error(transparent)]
    Frame(FrameError),
    #[error("{count} descriptors with a message that carries {max}")]
    TooManyFds { count: usize, max: usize },
    #[error("message of {len} bytes, longer than {MAX_FRAME}")]
    TooLong { len: usize },
    #[error("encoding a message")]
    Encode(#[source] serde_json::Error),
    #[error("not a message of the exchange: {}", String::from_utf8_lossy(line))]
    Decode {
        line: Vec<u8>,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// An answer to `next` that does not hold what it says.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("not an answer")]
    Json(#[source] serde_json::Error),
    #[error("{count} pods in one answer, at most {PODS_PER_BATCH}")]
    TooManyPods { count: usize },
    #[error("more descriptors announced than one answer carries")]
    TooManyAnnounced,
    #[error("{announced} sockets announced, {received} received")]
    Mismatch { announced: usize, received: usize },
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Next,
    Taken,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSockets {
    pub uid: String,
    pub sockets: usize,
    /// Its network namespace follows its sockets.
    #[serde(default)]
    pub netns: bool,
}

/// What a running agent hands over for one pod.
pub struct ServedPod {
    pub listeners: Vec<OwnedFd>,
    pub netns: Option<OwnedFd>,
}

/// What the new agent receives for one pod.
pub struct HandedPod {
    pub listeners: Vec<std::net::TcpListener>,
    pub netns: Option<OwnedFd>,
}

/// One answer to `next`: pods and the descriptors that came with it.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub pods: Vec<PodSockets>,
    pub last: bool,
}

impl Batch {
    /// An answer from its line and the number of descriptors that came
    /// with it: at most [`PODS_PER_BATCH`] pods, each descriptor announced.
    pub fn decode(line: &[u8], fds: usize) -> Result<Self, BatchError> {
        let batch: Self = serde_json::from_slice(line).map_err(BatchError::Json)?;
        if batch.pods.len() > PODS_PER_BATCH {
            return Err(BatchError::TooManyPods {
                count: batch.pods.len(),
            });
        }
        let wanted = batch
            .pods
            .iter()
            .try_fold(0usize, |n, p| {
                n.checked_add(p.sockets)?.checked_add(usize::from(p.netns))
            })
            .filter(|n| *n <= frame::MAX_FDS)
            .ok_or(BatchError::TooManyAnnounced)?;
        if wanted != fds {
            return Err(BatchError::Mismatch {
                announced: wanted,
                received: fds,
            });
        }
        Ok(batch)
    }
}

/// Binds the control socket at [`socket_path`], taking the name over from
/// the agent being replaced (whose listener, already connected to, stays
/// open, unnamed) or from a crashed agent's stale file.
pub fn bind_control(run_dir: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let path = socket_path(run_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::net::UnixListener::bind(&path)
}

/// What an old agent handed over, by pod UID.
pub type HandedOver = HashMap<String, HandedPod>;

/// The successor's side: connects to a running agent, if any, and takes
/// its pods' listeners. `Ok(None)` when no agent answers (first start, or
/// the previous one crashed: a stale socket file is no agent).
pub fn take_listeners(run_dir: &Path) -> Result<Option<(Predecessor, HandedOver)>, HandoverError> {
    let path = socket_path(run_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => return Err(HandoverError::Io { path, source }),
    };
    let io_err = |source| HandoverError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut conn = Conn::new(stream, path.clone());
    let mut handed = HandedOver::new();
    loop {
        conn.send(&Request::Next, &[])?;
        let (line, fds) = conn.receive_frame()?;
        let batch = Batch::decode(&line, fds.len()).map_err(|e| conn.protocol(e.into()))?;
        let mut fds = fds.into_iter();
        for pod in batch.pods {
            let listeners = fds
                .by_ref()
                .take(pod.sockets)
                .map(std::net::TcpListener::from)
                .collect();
            let netns = if pod.netns { fds.next() } else { None };
            handed.insert(pod.uid, HandedPod { listeners, netns });
        }
        if batch.last {
            break;
        }
    }
    Ok(Some((Predecessor { conn }, handed)))
}

/// The connection to the agent being replaced, until it is told.
pub struct Predecessor {
    conn: Conn,
}

impl Predecessor {
    /// Tells the old agent its successor serves every pod now.
    pub fn taken(mut self) -> Result<(), HandoverError> {
        self.conn.send(&Request::Taken, &[])?;
        let (_ok, _): (serde_json::Value, Vec<OwnedFd>) = self.conn.receive(0)?;
        Ok(())
    }
}

/// What the old agent's side needs from the running agent.
pub trait Listeners: Send + Sync {
    /// Duplicates of every enrolled pod's listening sockets and network
    /// namespace, by pod UID.
    fn listeners(&self) -> Vec<(String, ServedPod)>;
    /// The successor serves every pod: stop accepting, drain, stay away
    /// from the shared state.
    fn handed_over(&self);
}

/// The old agent's side of one successor's connection (blocking).
pub fn serve_successor(
    stream: UnixStream,
    path: &Path,
    agent: &dyn Listeners,
) -> Result<(), HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: path.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut conn = Conn::new(stream, path.to_owned());
    let pods = agent.listeners();
    let mut batches = pods.chunks(PODS_PER_BATCH).peekable();
    loop {
        let (request, _): (Request, Vec<OwnedFd>) = conn.receive(0)?;
        match request {
            Request::Next => {
                let batch = batches.next().unwrap_or(&[]);
                let fds: Vec<RawFd> = batch
                    .iter()
                    .flat_map(|(_, pod)| pod.listeners.iter().chain(pod.netns.as_ref()))
                    .map(AsRawFd::as_raw_fd)
                    .collect();
                let answer = Batch {
                    pods: batch
                        .iter()
                        .map(|(uid, pod)| PodSockets {
                            uid: uid.clone(),
                            sockets: pod.listeners.len(),
                            netns: pod.netns.is_some(),
                        })
                        .collect(),
                    last: batches.peek().is_none(),
                };
                conn.send(&answer, &fds)?;
            }
            Request::Taken => {
                agent.handed_over();
                conn.send(&serde_json::json!({"ok": true}), &[])?;
                return Ok(());
            }
        }
    }
}

/// One side of the control connection: JSON lines, descriptors alongside.
struct Conn {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes read past the last line.
    lines: Lines,
}

impl Conn {
    fn new(stream: UnixStream, path: PathBuf) -> Self {
        Self {
            stream,
            path,
            lines: Lines::new(MAX_FRAME),
        }
    }

    fn protocol(&self, problem: ProtocolError) -> HandoverError {
        HandoverError::Protocol {
            path: self.path.clone(),
            problem,
        }
    }

    fn io(&self, source: io::Error) -> HandoverError {
        HandoverError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn send(&mut self, message: &impl Serialize, fds: &[RawFd]) -> Result<(), HandoverError> {
        let mut line =
            serde_json::to_vec(message).map_err(|e| self.protocol(ProtocolError::Encode(e)))?;
        if line.len() > MAX_FRAME {
            return Err(self.protocol(ProtocolError::TooLong { len: line.len() }));
        }
        line.push(b'\n');
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(&line)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| self.io(e.into()))?;
        // The descriptors went with the first bytes; the rest is plain data.
        if sent < line.len() {
            self.stream
                .write_all(&line[sent..])
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// The next line and the descriptors that came with it (at most one
    /// message's worth).
    fn receive_frame(&mut self) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoverError> {
        frame::read_frame(&self.stream, &mut self.lines, frame::MAX_FDS).map_err(|e| match e {
            FrameError::Io(source) => self.io(source),
            FrameError::Closed => self.protocol(ProtocolError::Closed),
            e => self.protocol(ProtocolError::Frame(e)),
        })
    }

    /// The next message, with at most `max_fds` descriptors.
    fn receive<T: for<'de> Deserialize<'de>>(
        &mut self,
        max_fds: usize,
    ) -> Result<(T, Vec<OwnedFd>), HandoverError> {
        let (line, fds) = self.receive_frame()?;
        if fds.len() > max_fds {
            return Err(self.protocol(ProtocolError::TooManyFds {
                count: fds.len(),
                max: max_fds,
            }));
        }
        let value = serde_json::from_slice(&line).map_err(|source| {
            self.protocol(ProtocolError::Decode {
                line: line.clone(),
                source,
            })
        })?;
        Ok((value, fds))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    struct Old {
        sockets: Vec<(String, Vec<std::net::TcpListener>)>,
        handed: Arc<AtomicBool>,
    }

    impl Listeners for Old {
        fn listeners(&self) -> Vec<(String, ServedPod)> {
            self.sockets
                .iter()
                .enumerate()
                .map(|(i, (uid, ls))| {
                    let pod = ServedPod {
                        listeners: ls
                            .iter()
                            .map(|l| OwnedFd::from(l.try_clone().unwrap()))
                            .collect(),
                        // Every other pod with a namespace (any open file
                        // stands in for one here).
                        netns: i.is_multiple_of(2).then(|| {
                            OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap())
                        }),
                    };
                    (uid.clone(), pod)
                })
                .collect()
        }

        fn handed_over(&self) {
            self.handed.store(true, Ordering::SeqCst);
        }
    }

    /// 150 pods (two batches): each listener arrives as the same socket,
    /// still accepting the connection queued on it before the handover.
    #[test]
    fn listeners_move_to_the_successor_with_their_queued_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let server = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut sockets = Vec::new();
        let mut queued = Vec::new();
        for i in 0..150 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            if i % 50 == 0 {
                queued.push((
                    format!("pod-{i}"),
                    std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap(),
                ));
            }
            sockets.push((format!("pod-{i}"), vec![l]));
        }
        let addrs: HashMap<String, std::net::SocketAddr> = sockets
            .iter()
            .map(|(u, l)| (u.clone(), l[0].local_addr().unwrap()))
            .collect();
        let handed = Arc::new(AtomicBool::new(false));
        let old = Old {
            sockets,
            handed: Arc::clone(&handed),
        };
        let served = Arc::new(Mutex::new(None));
        let thread = {
            let served = Arc::clone(&served);
            let path = path.clone();
            std::thread::spawn(move || {
                let (stream, _) = server.accept().unwrap();
                *served.lock().unwrap() =
                    Some(serve_successor(stream, &path, &old).map_err(|e| crate::error_chain(&e)));
            })
        };
        let (predecessor, taken) = take_listeners(dir.path())
            .unwrap()
            .expect("an agent answered");
        assert_eq!(taken.len(), 150);
        for (uid, addr) in &addrs {
            assert_eq!(
                taken[uid].listeners[0].local_addr().unwrap(),
                *addr,
                "{uid}"
            );
            let i: usize = uid.strip_prefix("pod-").unwrap().parse().unwrap();
            assert_eq!(taken[uid].netns.is_some(), i.is_multiple_of(2), "{uid}");
        }
        for (uid, _client) in &queued {
            let (conn, _) = taken[uid].listeners[0].accept().unwrap();
            drop(conn);
        }
        assert!(!handed.load(Ordering::SeqCst));
        predecessor.taken().unwrap();
        thread.join().unwrap();
        assert!(handed.load(Ordering::SeqCst));
        assert_eq!(served.lock().unwrap().take(), Some(Ok(())));
    }

    #[test]
    fn no_agent_means_nothing_to_take() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take_listeners(dir.path()).unwrap().is_none());
        // A stale socket file from a crashed agent: no one listens on it.
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap());
        assert!(take_listeners(dir.path()).unwrap().is_none());
    }

    /// Writes a line that never ends until the reader hangs up (at most
    /// 64 MiB); returns how much it wrote.
    fn flood(stream: UnixStream) -> usize {
        let chunk = [b'x'; 4096];
        let mut sent = 0;
        while sent < 64 << 20 {
            match (&stream).write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    }

    fn assert_refused_early(err: &HandoverError, sent: usize) {
        let text = crate::error_chain(err);
        assert!(
            text.starts_with("control socket ")
                && text.ends_with(": message longer than 65536 bytes"),
            "{text}"
        );
        assert!(sent < 64 << 20, "{sent} bytes were read and buffered");
    }

    /// The successor stops reading an answer that never ends.
    #[test]
    fn an_endless_answer_is_refused_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let server = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        let feeder = std::thread::spawn(move || flood(server.accept().unwrap().0));
        let err = match take_listeners(dir.path()) {
            Err(e) => e,
            Ok(_) => panic!("an endless answer was accepted"),
        };
        assert_refused_early(&err, feeder.join().unwrap());
    }

    /// The running agent stops reading a request that never ends.
    #[test]
    fn an_endless_request_is_refused_not_buffered() {
        let (old_side, new_side) = UnixStream::pair().unwrap();
        let feeder = std::thread::spawn(move || flood(new_side));
        let old = Old {
            sockets: Vec::new(),
            handed: Arc::new(AtomicBool::new(false)),
        };
        let err = serve_successor(old_side, Path::new("agent.sock"), &old).unwrap_err();
        assert_refused_early(&err, feeder.join().unwrap());
        assert!(!old.handed.load(Ordering::SeqCst));
    }

    #[test]
    fn answers_must_announce_what_they_carry() {
        let ok = br#"{"pods":[{"uid":"a","sockets":2,"netns":true}],"last":true}"#;
        assert_eq!(Batch::decode(ok, 3).unwrap().pods.len(), 1);
        assert_eq!(
            Batch::decode(ok, 2).unwrap_err().to_string(),
            "3 sockets announced, 2 received"
        );
        // Counts that overflow, or exceed what one message can carry.
        let huge = format!(
            r#"{{"pods":[{{"uid":"a","sockets":{},"netns":true}}],"last":true}}"#,
            usize::MAX
        );
        assert_eq!(
            Batch::decode(huge.as_bytes(), 0).unwrap_err().to_string(),
            "more descriptors announced than one answer carries"
        );
        let many = serde_json::to_vec(&Batch {
            pods: (0..=PODS_PER_BATCH)
                .map(|i| PodSockets {
                    uid: i.to_string(),
                    sockets: 0,
                    netns: false,
                })
                .collect(),
            last: false,
        })
        .unwrap();
        assert_eq!(
            Batch::decode(&many, 0).unwrap_err().to_string(),
            "81 pods in one answer, at most 80"
        );
        let not_json = Batch::decode(b"{\"pods\":", 0).unwrap_err();
        assert!(
            crate::error_chain(&not_json).starts_with("not an answer: EOF while parsing"),
            "{not_json:?}"
        );
    }
}
