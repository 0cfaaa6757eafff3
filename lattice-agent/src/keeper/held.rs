//! The pods' descriptors the parent holds: per pod, its listening sockets,
//! its network namespace and the worker's opaque state, as the worker
//! last handed them (or the agent this one replaced).

use std::collections::BTreeMap;

use crate::node::handover::ServedPod;

/// Every held pod, by UID.
#[derive(Debug, Default)]
pub struct HeldPods {
    pods: BTreeMap<String, ServedPod>,
}

impl HeldPods {
    pub fn new(pods: impl IntoIterator<Item = (String, ServedPod)>) -> Self {
        Self {
            pods: pods.into_iter().collect(),
        }
    }

    /// Holds `pod` for `uid`, closing what was held for it before.
    pub fn hold(&mut self, uid: String, pod: ServedPod) {
        self.pods.insert(uid, pod);
    }

    /// Closes what is held for `uid`; false when nothing was.
    pub fn release(&mut self, uid: &str) -> bool {
        self.pods.remove(uid).is_some()
    }

    /// Closes everything.
    pub fn clear(&mut self) {
        self.pods.clear();
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Duplicates of every pod's descriptors (with its state), to send to
    /// another process. A pod whose descriptors cannot be duplicated (out
    /// of descriptors) is left out, and said so.
    pub fn duplicates(&self) -> Vec<(String, ServedPod)> {
        self.pods
            .iter()
            .filter_map(|(uid, pod)| match pod.try_clone() {
                Ok(copy) => Some((uid.clone(), copy)),
                Err(e) => {
                    tracing::warn!(pod_uid = %uid, error = %e, "cannot duplicate a held pod's sockets");
                    None
                }
            })
            .collect()
    }

    /// Descriptors held, for the log.
    pub fn descriptors(&self) -> usize {
        self.pods
            .values()
            .map(|p| p.listeners.len() + usize::from(p.netns.is_some()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    /// Whether a pipe's write end was closed everywhere (its read end sees
    /// EOF): how these tests see a descriptor closed.
    fn at_eof(read: &std::fs::File) -> bool {
        use std::io::Read as _;
        let mut buf = [0u8; 1];
        matches!((&*read).read(&mut buf), Ok(0))
    }

    /// A pipe: its read end, and its write end standing in for a socket.
    fn pipe() -> (std::fs::File, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (std::fs::File::from(r), w)
    }

    fn pod(fd: OwnedFd, state: &str) -> ServedPod {
        ServedPod {
            listeners: vec![fd],
            netns: None,
            state: Some(state.to_owned()),
        }
    }

    #[test]
    fn holding_anew_closes_what_was_held() {
        let mut held = HeldPods::default();
        let (first_r, first_w) = pipe();
        let (second_r, second_w) = pipe();
        held.hold("a".into(), pod(first_w, "1"));
        held.hold("a".into(), pod(second_w, "2"));
        assert!(at_eof(&first_r), "the first sockets were closed");
        assert_eq!(held.len(), 1);
        let copies = held.duplicates();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].1.state.as_deref(), Some("2"));
        drop(copies);
        assert!(held.release("a"));
        assert!(!held.release("a"));
        assert!(at_eof(&second_r), "released sockets are closed");
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn duplicates_outlive_the_table() {
        let (r, w) = pipe();
        let mut held = HeldPods::new([("a".to_owned(), pod(w, "s"))]);
        let copies = held.duplicates();
        held.clear();
        // A copy still writes into the pipe.
        let copy = std::fs::File::from(copies.into_iter().next().unwrap().1.listeners.remove(0));
        use std::io::Write as _;
        (&copy).write_all(b"x").unwrap();
        drop(copy);
        use std::io::Read as _;
        let mut got = Vec::new();
        (&r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"x");
    }
}
