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
//! (one request, one answer) so each answer's descriptors stay with it:
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
    io::{self, IoSlice, IoSliceMut, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// Pods per answer: two sockets and a namespace each, within the kernel's
/// 253 descriptors per SCM_RIGHTS message.
const PODS_PER_BATCH: usize = 80;
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
    #[error("control socket {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Next,
    Taken,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodSockets {
    uid: String,
    sockets: usize,
    /// Its network namespace follows its sockets.
    #[serde(default)]
    netns: bool,
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

#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    pods: Vec<PodSockets>,
    last: bool,
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
        let (batch, fds): (Batch, Vec<OwnedFd>) = conn.receive()?;
        let wanted: usize = batch
            .pods
            .iter()
            .map(|p| p.sockets + usize::from(p.netns))
            .sum();
        if wanted != fds.len() {
            return Err(conn.protocol(format!(
                "{wanted} sockets announced, {} received",
                fds.len()
            )));
        }
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
        let (_ok, _): (serde_json::Value, Vec<OwnedFd>) = self.conn.receive()?;
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
        let (request, _): (Request, Vec<OwnedFd>) = conn.receive()?;
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
    pending: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream, path: PathBuf) -> Self {
        Self {
            stream,
            path,
            pending: Vec::new(),
        }
    }

    fn protocol(&self, detail: String) -> HandoverError {
        HandoverError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }

    fn io(&self, source: io::Error) -> HandoverError {
        HandoverError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn send(&mut self, message: &impl Serialize, fds: &[RawFd]) -> Result<(), HandoverError> {
        let mut line = serde_json::to_vec(message).map_err(|e| self.protocol(e.to_string()))?;
        line.push(b'\n');
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(&line)],
            cmsgs,
            MsgFlags::empty(),
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

    fn receive<T: for<'de> Deserialize<'de>>(
        &mut self,
    ) -> Result<(T, Vec<OwnedFd>), HandoverError> {
        let mut fds = Vec::new();
        while !self.pending.contains(&b'\n') {
            let mut buf = vec![0u8; 64 * 1024];
            let mut space = nix::cmsg_space!([RawFd; 253]);
            let (n, received) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(|e| self.io(e.into()))?;
                let mut received = Vec::new();
                for cmsg in msg.cmsgs().map_err(|e| self.io(e.into()))? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: the kernel just installed these descriptors
                        // in this process for us: we own them.
                        received.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                (msg.bytes, received)
            };
            fds.extend(received);
            if n == 0 {
                return Err(self.protocol("closed by the other agent".into()));
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
        let end = self
            .pending
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or_default();
        let line: Vec<u8> = self.pending.drain(..=end).collect();
        let value = serde_json::from_slice(&line[..end])
            .map_err(|e| self.protocol(format!("{e}: {}", String::from_utf8_lossy(&line))))?;
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
                    Some(serve_successor(stream, &path, &old).map_err(|e| e.to_string()));
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
}
