//! Userspace side of `ORIG_DST_BY_PEER`.

use std::{net::SocketAddr, sync::Mutex};

use aya::maps::{HashMap, Map, MapData, MapError};
use lattice_common::SockAddr;

use crate::orig_dst::OriginalDestination;

/// Original destinations recorded by the eBPF programs, keyed by the client
/// address the proxy sees on `accept()`.
pub struct OrigDstMap {
    // aya's remove() needs &mut; lookups are one syscall each, so a plain
    // mutex costs nothing next to the accept it serves.
    map: Mutex<HashMap<MapData, SockAddr, SockAddr>>,
}

impl OrigDstMap {
    pub(super) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: Mutex::new(HashMap::try_from(map)?),
        })
    }

    /// Entries currently held (for tests and diagnostics; walks the map).
    pub fn len(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl OriginalDestination for OrigDstMap {
    fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let key = SockAddr::from(peer).peer_key();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = map.get(&key, 0).ok()?;
        // Consumed: the next connection from this port is a new one.
        let _ = map.remove(&key);
        Some(orig.to_socket_addr())
    }
}
