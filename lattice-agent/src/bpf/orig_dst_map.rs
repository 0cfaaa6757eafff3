//! Userspace side of `ORIG_DST_BY_PEER`.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use lattice_common::{PeerKey, SockAddr};

use crate::orig_dst::OriginalDestination;

/// Original destinations recorded by the eBPF programs, keyed by the
/// client's network namespace and the client address the proxy sees on
/// `accept()`.
pub struct OrigDstMap {
    // aya's remove() needs &mut; lookups are one syscall each, so a plain
    // mutex costs nothing next to the accept it serves.
    map: Mutex<HashMap<MapData, PeerKey, SockAddr>>,
    /// The map that programs replaced at start recorded into: connections
    /// they redirected may still wait in a listener's backlog.
    previous: Mutex<Option<Previous>>,
}

type PeerMap = HashMap<MapData, PeerKey, SockAddr>;

/// A replaced map, read until it is empty or [`Previous::until`].
struct Previous {
    map: PeerMap,
    until: Instant,
}

/// How long a replaced map is read at most: connections wait in a
/// backlog for far less; what is left by then was never accepted.
const READ_PREVIOUS_FOR: Duration = Duration::from_secs(120);

impl OrigDstMap {
    pub(super) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: Mutex::new(HashMap::try_from(map)?),
            previous: Mutex::new(None),
        })
    }

    /// Also reads `previous` (a map of the same key and value types that
    /// replaced programs recorded into), until it is drained.
    pub(super) fn read_previous(&self, previous: MapData) -> Result<(), MapError> {
        let map = PeerMap::try_from(Map::LruHashMap(previous))?;
        *self.previous.lock().unwrap_or_else(|p| p.into_inner()) = Some(Previous {
            map,
            until: Instant::now() + READ_PREVIOUS_FOR,
        });
        Ok(())
    }

    /// Entries currently held (for tests and diagnostics; walks the map).
    pub fn len(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the connection from `peer` in network namespace `netns` (0:
    /// not gated by netns) was going. The record is consumed: the next
    /// connection from this port is a new one.
    pub fn take(&self, netns: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey::new(netns, SockAddr::from(peer));
        let found = take_from(
            &mut self.map.lock().unwrap_or_else(|p| p.into_inner()),
            &key,
        );
        found
            .or_else(|| self.take_previous(&key))
            .map(|orig| orig.to_socket_addr())
    }

    fn take_previous(&self, key: &PeerKey) -> Option<SockAddr> {
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let p = previous.as_mut()?;
        let found = take_from(&mut p.map, key);
        if p.map.keys().next().is_none() || Instant::now() >= p.until {
            tracing::debug!("no longer reading the replaced original-destination map");
            *previous = None;
        }
        found
    }
}

fn take_from(map: &mut PeerMap, key: &PeerKey) -> Option<SockAddr> {
    let orig = map.get(key, 0).ok()?;
    let _ = map.remove(key);
    Some(orig)
}

/// The records of one network namespace: what one workload's proxy may
/// read. Records of other pods' connections are out of its reach.
#[derive(Clone)]
pub struct NetnsOrigDst {
    pub map: std::sync::Arc<OrigDstMap>,
    /// The workload's netns cookie, or 0 when interception is not gated by
    /// netns (`run`, `sidecar`).
    pub netns: u64,
}

impl OriginalDestination for NetnsOrigDst {
    fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.map.take(self.netns, peer)
    }
}
