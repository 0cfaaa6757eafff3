//! `ENROLLED_NETNS`: the network namespaces whose connects are redirected
//! when interception is gated by netns, and carrying them over when a new
//! map replaces the one the programs read.

use std::{
    collections::BTreeSet,
    os::fd::AsFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};
use lattice_common::names;

use super::{BpfError, sys};

type GateMap = BpfHashMap<MapData, u64, u32>;

/// A replaced gate's map id and the namespaces it held when last read.
type Held = (u32, BTreeSet<u64>);

/// How often a replaced gate is looked at for namespaces an older agent
/// still adds to it (see [`NetnsGate::follow`]).
const FOLLOW_EVERY: Duration = Duration::from_millis(10);
/// For how long at most: far longer than a rolling update's handover.
const FOLLOW_FOR: Duration = Duration::from_secs(300);

/// The set of enrolled network namespaces. A namespace is added once its
/// proxy listens and removed before its proxy stops, so an enrolled pod's
/// Lattice connects always find a listener (or, with no agent at all,
/// fail fast with "connection refused": never unsigned).
pub struct NetnsGate {
    // Updates are rare (pod enrollment); a mutex keeps `&self` methods.
    map: Arc<Mutex<GateMap>>,
    /// The map's id, to tell it from maps it replaces.
    id: u32,
    /// Namespaces the map holds at most.
    capacity: u32,
    /// Replaced gates to follow (see [`NetnsGate::follow`]), until the
    /// follower starts (see [`NetnsGate::start_following`]).
    to_follow: Mutex<Option<Vec<Held>>>,
    /// Copies what an older agent adds to replaced gates; stops on drop.
    follower: Mutex<Option<Follower>>,
}

impl NetnsGate {
    pub(super) fn new(ebpf: &mut Ebpf, wanted: u32) -> Result<Self, BpfError> {
        let name = names::ENROLLED_NETNS;
        let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
        let info = match &map {
            aya::maps::Map::HashMap(data) => data.info().ok(),
            _ => None,
        };
        let capacity = info.as_ref().map_or(wanted, |i| i.max_entries());
        if capacity != wanted {
            tracing::warn!(
                capacity,
                max_pods = wanted,
                "the pinned table of enrolled network namespaces is larger than --max-pods: it keeps its size (a pinned table grows to a larger --max-pods, it is never shrunk)"
            );
        }
        let map = BpfHashMap::try_from(map).map_err(|source| BpfError::Map { name, source })?;
        Ok(Self {
            map: Arc::new(Mutex::new(map)),
            id: info.map_or(0, |i| i.id()),
            capacity,
            to_follow: Mutex::new(None),
            follower: Mutex::new(None),
        })
    }

    pub(super) fn id(&self) -> u32 {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, GateMap> {
        // In case the owner has not started it yet.
        self.start_following();
        lock(&self.map)
    }

    /// Starts redirecting connects made in the netns with this cookie.
    pub fn enroll(&self, netns_cookie: u64) -> Result<(), BpfError> {
        insert(&mut self.lock(), netns_cookie, self.capacity)
    }

    /// Stops redirecting them. Unknown cookies are not an error.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), BpfError> {
        match self.lock().remove(&netns_cookie) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(BpfError::Map {
                name: names::ENROLLED_NETNS,
                source,
            }),
        }
    }

    /// Cookies currently enrolled (a pinned map may hold a previous
    /// agent's).
    pub fn cookies(&self) -> Result<Vec<u64>, BpfError> {
        self.lock()
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| BpfError::Map {
                name: names::ENROLLED_NETNS,
                source,
            })
    }

    /// Enrolls every namespace the gates `replaced` (map ids) hold: those
    /// the programs being replaced redirect. Returns what each held, for
    /// [`NetnsGate::follow`].
    pub(super) fn carry_over(&self, replaced: &[u32]) -> Result<Vec<Held>, BpfError> {
        let mut held = Vec::new();
        for &id in replaced {
            let cookies = gate_cookies(id)?;
            for &cookie in &cookies {
                insert(&mut self.lock(), cookie, self.capacity)?;
            }
            held.push((id, cookies));
        }
        Ok(held)
    }

    /// Keeps enrolling what is added to the replaced gates (`held`: what
    /// each held when carried over) until each is gone (nothing refers to
    /// it any more) or [`FOLLOW_FOR`] has passed. During a rolling update
    /// the agent being replaced writes to the gate it knows until it has
    /// handed its pods over; a namespace it enrolls meanwhile must stay
    /// gated under the new programs. What it removes is not followed: a
    /// namespace left gated only has its connects refused until this
    /// agent reconciles the gate. Starts with
    /// [`NetnsGate::start_following`].
    pub(super) fn follow(&self, held: Vec<Held>) {
        if !held.is_empty() {
            *self.to_follow.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
        }
    }

    /// Starts following the replaced gates, if any: as soon as the agent
    /// has dropped its privileges (capabilities are per thread, so a
    /// thread started before would keep them all), since from the swap
    /// until then a namespace the agent being replaced enrolls is not
    /// gated by the new programs. Also started at the gate's first use.
    pub fn start_following(&self) {
        let Some(held) = self
            .to_follow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (map, capacity, flag) = (Arc::clone(&self.map), self.capacity, Arc::clone(&stop));
        let spawned = std::thread::Builder::new()
            .name("gate-follower".into())
            .spawn(move || follow(held, &map, capacity, &flag));
        match spawned {
            Ok(handle) => {
                *self.follower.lock().unwrap_or_else(|p| p.into_inner()) = Some(Follower {
                    stop,
                    handle: Some(handle),
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot follow the replaced gate"),
        }
    }
}

fn lock(map: &Mutex<GateMap>) -> MutexGuard<'_, GateMap> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

fn insert(map: &mut GateMap, cookie: u64, capacity: u32) -> Result<(), BpfError> {
    match map.insert(cookie, 1, 0) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            Err(BpfError::GateFull { capacity })
        }
        Err(source) => Err(BpfError::Map {
            name: names::ENROLLED_NETNS,
            source,
        }),
    }
}

/// The cookies in the gate with map id `id`, whatever its value type:
/// its keys must be the 8-byte cookies the programs look up.
fn gate_cookies(id: u32) -> Result<BTreeSet<u64>, BpfError> {
    let data = MapData::from_id(id).map_err(|source| BpfError::Map {
        name: names::ENROLLED_NETNS,
        source,
    })?;
    let info = data.info().map_err(|source| BpfError::Map {
        name: names::ENROLLED_NETNS,
        source,
    })?;
    if info.key_size() != 8 {
        return Err(BpfError::GateLayout {
            key_size: info.key_size(),
        });
    }
    let keys = sys::map_keys(data.fd().as_fd(), 8, info.max_entries() as usize + 1)
        .map_err(|source| BpfError::GateRead { id, source })?;
    Ok(keys
        .iter()
        .filter_map(|k| Some(u64::from_ne_bytes(k.as_slice().try_into().ok()?)))
        .collect())
}

struct Follower {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn follow(mut held: Vec<Held>, map: &Mutex<GateMap>, capacity: u32, stop: &AtomicBool) {
    let until = Instant::now() + FOLLOW_FOR;
    while !held.is_empty() && !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(FOLLOW_EVERY);
        held.retain_mut(|(id, seen)| {
            let now = match gate_cookies(*id) {
                Ok(now) => now,
                // Gone once its last holder (the replaced programs, an
                // older agent) is: nothing can be added to it any more.
                Err(e) if is_gone(&e) => {
                    tracing::debug!(map_id = *id, "the replaced gate is gone");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(
                        map_id = *id,
                        error = %crate::error_chain(&e),
                        "cannot read the replaced gate any more: a namespace the agent being replaced enrolls from now on is gated only once this agent enrolls it"
                    );
                    return false;
                }
            };
            for &cookie in now.difference(seen) {
                match insert(&mut lock(map), cookie, capacity) {
                    Ok(()) => tracing::info!(
                        netns_cookie = cookie,
                        "a namespace enrolled by the agent being replaced is gated by the new programs too"
                    ),
                    Err(e) => tracing::warn!(netns_cookie = cookie, error = %e, "cannot gate a namespace the agent being replaced enrolled"),
                }
            }
            *seen = now;
            true
        });
    }
}

/// Whether reading a replaced gate failed because no map has its id any
/// more.
fn is_gone(e: &BpfError) -> bool {
    matches!(
        e,
        BpfError::Map {
            source: MapError::SyscallError(e),
            ..
        } if e.io_error.raw_os_error() == Some(libc::ENOENT)
    )
}
