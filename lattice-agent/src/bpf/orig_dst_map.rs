//! Userspace side of `ORIG_DST_BY_PEER`.

use std::{net::SocketAddr, sync::Mutex};

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
}

impl OrigDstMap {
    pub(super) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: Mutex::new(HashMap::try_from(map)?),
        })
    }

    /// The map of another process, from a descriptor of it (see
    /// [`OrigDstMap::try_clone_fd`]).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Self, MapError> {
        Self::new(Map::from_map_data(MapData::from_fd(fd)?)?)
    }

    /// A second descriptor of the map, to hand to another process.
    pub fn try_clone_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;

        use aya::maps::IterableMap as _;
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.map().fd().as_fd().try_clone_to_owned()
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
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig.to_socket_addr())
    }
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
