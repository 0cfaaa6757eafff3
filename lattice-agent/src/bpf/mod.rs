//! Loads the eBPF interceptor, configures it, attaches it to a cgroup and
//! (optionally) pins it, and exposes the original-destination map.

mod checks;
mod orig_dst_map;
mod own_cgroup;
mod raw_link;

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
    programs::{
        CgroupAttachMode, ProgramError,
        links::{FdLink, PinnedLink},
    },
};
use ipnet::{Ipv4Net, Ipv6Net};
use lattice_common::{CONFIG_EXEMPT_UID, CONFIG_GATE_BY_NETNS, Config, names};
pub use orig_dst_map::{NetnsOrigDst, OrigDstMap};
pub use own_cgroup::own_cgroup_id;

/// The eBPF object built by build.rs from the lattice-ebpf crate.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lattice-ebpf"));

/// aya-log's ring buffer; pinned with the other maps so a restarted agent
/// still receives the log lines of programs it did not load itself.
const AYA_LOGS: &str = "AYA_LOGS";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("--cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("--pin {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error("missing capability {capability}: {detail}")]
    Capability {
        capability: &'static str,
        detail: String,
    },
    #[error("too many prefixes in --cidr: {count} {family} prefixes, at most {max}")]
    TooManyPrefixes {
        family: &'static str,
        count: usize,
        max: u32,
    },
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "attaching {name} to {cgroup} (the kernel needs CONFIG_CGROUP_BPF, Linux >= 5.8, and CAP_NET_ADMIN)"
    )]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("the table of enrolled network namespaces is full: it holds {capacity} (--max-pods)")]
    GateFull { capacity: u32 },
    #[error("finding this agent's own cgroup under --cgroup-root {}", root.display())]
    OwnCgroup {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the programs tell the agent's own connects (never redirected) from
/// the workloads'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExemption {
    /// By `exempt_uid` (`run`, `sidecar`), as the iptables setup did: any
    /// other process of that UID in the cgroup passes too.
    Uid,
    /// By the agent's own cgroup (node mode; see [`own_cgroup_id`]). None:
    /// the agent runs outside the tree the programs attach to, where its
    /// connects are not seen at all.
    Cgroup(Option<u64>),
}

/// What to intercept and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    pub cgroup: PathBuf,
    pub v4_prefixes: Vec<Ipv4Net>,
    pub v6_prefixes: Vec<Ipv6Net>,
    pub proxy_port: u16,
    /// The UID the agent runs as once attached.
    pub exempt_uid: u32,
    pub exempt: AgentExemption,
    pub pin: Option<PathBuf>,
    /// Attach held by the cgroup rather than by the agent's process (when
    /// not pinned): the programs stay when the agent exits or crashes, so
    /// the cgroup's Lattice connects fail closed until an agent serves
    /// them again, whose attach replaces them; they go with the cgroup.
    pub held_by_cgroup: bool,
    /// Redirect only connects from enrolled network namespaces (node mode,
    /// see [`NetnsGate`]); otherwise every connect in the cgroup.
    pub gate_by_netns: bool,
    /// Network namespaces the gate holds at most (node mode's
    /// `--max-pods`): its map's size, set when the map is created (a
    /// pinned map keeps the size it was created with).
    pub gate_capacity: u32,
}

/// The attached interceptor. Dropping it detaches the programs, unless they
/// are pinned: pinned interception outlives the agent and fails closed.
pub struct Interceptor {
    /// Owns the programs and their unpinned links.
    ebpf: Ebpf,
    /// Links found or created in the pin directory; held only for logging.
    pinned: Vec<&'static str>,
    /// Attached held by the cgroup: nothing detaches when this drops.
    held_by_cgroup: bool,
    orig_dst: std::sync::Arc<OrigDstMap>,
    gate: Option<NetnsGate>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Checks that `dir` can hold pins: a directory on a bpf filesystem,
/// created when missing and its parent is one.
pub fn check_pin_dir(dir: &Path) -> Result<(), BpfError> {
    checks::bpffs_dir(dir)
}

impl Interceptor {
    pub fn attach(cfg: &InterceptConfig) -> Result<Self, BpfError> {
        checks::cgroup_v2_dir(&cfg.cgroup)?;
        if let Some(dir) = &cfg.pin {
            checks::bpffs_dir(dir)?;
        }
        checks::capabilities()?;
        checks::raise_memlock_rlimit();

        let mut ebpf = load(cfg)?;
        write_config(&mut ebpf, cfg)?;
        // Before attaching, so the first redirect's log line is not lost.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF logs unavailable");
                None
            }
        };
        let cgroup = File::open(&cfg.cgroup).map_err(|e| BpfError::Cgroup {
            path: cfg.cgroup.clone(),
            reason: e.to_string(),
        })?;
        let pinned = attach_all(&mut ebpf, &cgroup, cfg)?;

        let peer_map = ebpf
            .take_map(names::ORIG_DST_BY_PEER)
            .ok_or(BpfError::MissingMap(names::ORIG_DST_BY_PEER))?;
        let orig_dst = OrigDstMap::new(peer_map).map_err(|source| BpfError::Map {
            name: names::ORIG_DST_BY_PEER,
            source,
        })?;
        let gate = match cfg.gate_by_netns {
            true => Some(NetnsGate::new(&mut ebpf, cfg.gate_capacity)?),
            false => None,
        };
        tracing::info!(
            cgroup = %cfg.cgroup.display(),
            proxy_port = cfg.proxy_port,
            exempt_uid = cfg.exempt_uid,
            exempt = ?cfg.exempt,
            v4 = ?cfg.v4_prefixes,
            v6 = ?cfg.v6_prefixes,
            pinned = ?cfg.pin,
            gate_by_netns = cfg.gate_by_netns,
            "interceptor attached"
        );
        Ok(Self {
            ebpf,
            pinned,
            held_by_cgroup: cfg.held_by_cgroup && cfg.pin.is_none(),
            orig_dst: std::sync::Arc::new(orig_dst),
            gate,
            logger,
        })
    }

    /// The set of enrolled network namespaces (only when gated by netns).
    pub fn take_gate(&mut self) -> Option<NetnsGate> {
        self.gate.take()
    }

    /// Lookup of original destinations for the proxy.
    pub fn orig_dst(&self) -> std::sync::Arc<OrigDstMap> {
        self.orig_dst.clone()
    }

    /// The eBPF log reader, to be polled on the runtime (see `telemetry`).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Detaches the programs the agent's process holds; pinned ones and
    /// ones held by the cgroup stay, by design.
    pub fn detach(self) {
        let Self {
            ebpf,
            pinned,
            held_by_cgroup,
            ..
        } = self;
        drop(ebpf);
        if held_by_cgroup {
            tracing::info!(
                "agent stopped; interception stays attached to the cgroup (until it goes)"
            );
        } else if pinned.is_empty() {
            tracing::info!("interceptor detached");
        } else {
            tracing::info!(links = ?pinned, "agent stopped; pinned interception stays attached");
        }
    }
}

fn load(cfg: &InterceptConfig) -> Result<Ebpf, BpfError> {
    let mut loader = EbpfLoader::new();
    let pin_paths: Vec<(&'static str, PathBuf)> = match &cfg.pin {
        Some(dir) => names::PINNED_MAPS
            .iter()
            .chain(std::iter::once(&AYA_LOGS))
            .map(|name| (*name, map_pin_path(dir, name)))
            .collect(),
        None => Vec::new(),
    };
    for (name, path) in &pin_paths {
        // Reuses the map pinned there by an earlier agent, or creates and pins it.
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(names::ENROLLED_NETNS, cfg.gate_capacity);
    // Debug lines cost a ring-buffer write per connection: only emit them
    // from the kernel when someone will read them.
    let level: u8 = if tracing::enabled!(target: "lattice_ebpf", tracing::Level::DEBUG) {
        4
    } else {
        3
    };
    loader.override_global("AYA_LOG_LEVEL", &level, false);
    Ok(loader.load(EBPF_OBJECT)?)
}

fn map_pin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("map_{name}"))
}

fn link_pin_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

/// Writes the config entry and makes the prefix tries hold exactly the
/// configured prefixes (pinned maps may hold a previous agent's set).
fn write_config(ebpf: &mut Ebpf, cfg: &InterceptConfig) -> Result<(), BpfError> {
    let map_err = |name| move |source| BpfError::Map { name, source };
    let mut config: Array<_, Config> = ebpf
        .map_mut(names::CONFIG)
        .ok_or(BpfError::MissingMap(names::CONFIG))?
        .try_into()
        .map_err(map_err(names::CONFIG))?;
    let mut flags = 0;
    if cfg.gate_by_netns {
        flags |= CONFIG_GATE_BY_NETNS;
    }
    let mut entry = Config {
        proxy_port: cfg.proxy_port,
        flags,
        exempt_uid: cfg.exempt_uid,
        exempt_cgroups: [0, 0],
    };
    match cfg.exempt {
        AgentExemption::Uid => entry.flags |= CONFIG_EXEMPT_UID,
        // A pinned entry names the agent this one replaces (during an
        // update it still drains, making upstream connects): it stays
        // exempt beside this one.
        AgentExemption::Cgroup(Some(own)) => {
            let previous = config.get(&0, 0).map_err(map_err(names::CONFIG))?;
            entry.exempt_cgroups = previous.exempt_cgroups;
            entry = entry.with_agent_cgroup(own);
        }
        AgentExemption::Cgroup(None) => {}
    }
    config.set(0, entry, 0).map_err(map_err(names::CONFIG))?;

    let v4: Vec<Key<[u8; 4]>> = cfg
        .v4_prefixes
        .iter()
        .map(|n| Key::new(u32::from(n.prefix_len()), n.network().octets()))
        .collect();
    let v6: Vec<Key<[u8; 16]>> = cfg
        .v6_prefixes
        .iter()
        .map(|n| Key::new(u32::from(n.prefix_len()), n.network().octets()))
        .collect();
    replace_prefixes(ebpf, names::V4_PREFIXES, &v4)?;
    replace_prefixes(ebpf, names::V6_PREFIXES, &v6)
}

fn replace_prefixes<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: &[Key<[u8; N]>],
) -> Result<(), BpfError>
where
    [u8; N]: aya::Pod,
{
    let map_err = |source| BpfError::Map { name, source };
    let mut trie: LpmTrie<_, [u8; N], u8> = ebpf
        .map_mut(name)
        .ok_or(BpfError::MissingMap(name))?
        .try_into()
        .map_err(map_err)?;
    if wanted.len() > lattice_common::PREFIX_CAPACITY as usize {
        return Err(BpfError::TooManyPrefixes {
            family: if N == 4 { "IPv4" } else { "IPv6" },
            count: wanted.len(),
            max: lattice_common::PREFIX_CAPACITY,
        });
    }
    let existing: Vec<Key<[u8; N]>> = trie.keys().collect::<Result<_, _>>().map_err(map_err)?;
    for key in existing {
        let keep = wanted
            .iter()
            .any(|w| w.prefix_len() == key.prefix_len() && w.data() == key.data());
        if !keep {
            trie.remove(&key).map_err(map_err)?;
        }
    }
    for key in wanted {
        trie.insert(key, 1, 0).map_err(map_err)?;
    }
    Ok(())
}

/// Loads and attaches every program. Returns the names of pinned links.
fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cfg: &InterceptConfig,
) -> Result<Vec<&'static str>, BpfError> {
    let mut pinned = Vec::new();
    for (name, attach_type) in [
        (names::PROG_CONNECT4, raw_link::BPF_CGROUP_INET4_CONNECT),
        (names::PROG_CONNECT6, raw_link::BPF_CGROUP_INET6_CONNECT),
        (names::PROG_SOCK_OPS, raw_link::BPF_CGROUP_SOCK_OPS),
        (names::PROG_GETSOCKOPT, raw_link::BPF_CGROUP_GETSOCKOPT),
    ] {
        let program = ebpf.program_mut(name).ok_or(BpfError::Program {
            name,
            source: ProgramError::UnexpectedProgramType,
        })?;
        let prog_err = |source| BpfError::Program { name, source };
        if cfg.held_by_cgroup && cfg.pin.is_none() {
            attach_held_by_cgroup(program, cgroup, attach_type, name, cfg)?;
            tracing::debug!(program = name, "attached, held by the cgroup");
            continue;
        }
        let link_path = cfg.pin.as_deref().map(|dir| link_pin_path(dir, name));
        if let Some(path) = &link_path
            && path.exists()
        {
            // A previous agent's link: the program it holds stays attached
            // and shares our (pinned) maps. Attaching again would run both.
            PinnedLink::from_pin(path).map_err(|e| BpfError::Pin {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            tracing::info!(program = name, path = %path.display(), "reusing pinned link");
            pinned.push(name);
            continue;
        }
        let attach_err = |source: ProgramError| BpfError::Attach {
            name,
            cgroup: cfg.cgroup.clone(),
            source: std::io::Error::other(source),
        };
        match program {
            aya::programs::Program::CgroupSockAddr(p) => {
                p.load().map_err(prog_err)?;
                let id = p
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                if let Some(path) = &link_path {
                    pin_link(p.take_link(id).map_err(prog_err)?, path)?;
                }
            }
            aya::programs::Program::SockOps(p) => {
                p.load().map_err(prog_err)?;
                let id = p
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                if let Some(path) = &link_path {
                    pin_link(p.take_link(id).map_err(prog_err)?, path)?;
                }
            }
            aya::programs::Program::CgroupSockopt(p) => {
                p.load().map_err(prog_err)?;
                match &link_path {
                    Some(path) => {
                        let prog_fd = p.fd().map_err(prog_err)?;
                        raw_link::attach_and_pin(
                            prog_fd.as_fd(),
                            cgroup.as_fd(),
                            raw_link::BPF_CGROUP_GETSOCKOPT,
                            path,
                        )
                        .map_err(|source| BpfError::Attach {
                            name,
                            cgroup: cfg.cgroup.clone(),
                            source,
                        })?;
                    }
                    None => {
                        p.attach(cgroup, CgroupAttachMode::Single)
                            .map_err(attach_err)?;
                    }
                }
            }
            _ => {
                return Err(BpfError::Program {
                    name,
                    source: ProgramError::UnexpectedProgramType,
                });
            }
        }
        if link_path.is_some() {
            pinned.push(name);
        }
        tracing::debug!(program = name, "attached");
    }
    Ok(pinned)
}

/// Loads `program` and attaches it held by the cgroup (see
/// [`InterceptConfig::held_by_cgroup`]), replacing what an earlier agent
/// attached the same way.
fn attach_held_by_cgroup(
    program: &mut aya::programs::Program,
    cgroup: &File,
    attach_type: u32,
    name: &'static str,
    cfg: &InterceptConfig,
) -> Result<(), BpfError> {
    let prog_err = |source| BpfError::Program { name, source };
    match program {
        aya::programs::Program::CgroupSockAddr(p) => p.load().map_err(prog_err)?,
        aya::programs::Program::SockOps(p) => p.load().map_err(prog_err)?,
        aya::programs::Program::CgroupSockopt(p) => p.load().map_err(prog_err)?,
        _ => return Err(prog_err(ProgramError::UnexpectedProgramType)),
    }
    let prog_fd = program.fd().map_err(prog_err)?;
    raw_link::attach_held_by_cgroup(prog_fd.as_fd(), cgroup.as_fd(), attach_type).map_err(
        |source| BpfError::Attach {
            name,
            cgroup: cfg.cgroup.clone(),
            source,
        },
    )
}

/// Pins a link the agent owns (taken from its program) at `path`.
fn pin_link<L>(link: L, path: &Path) -> Result<(), BpfError>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    let pin_err = |detail: String| BpfError::Pin {
        path: path.to_owned(),
        detail,
    };
    let link: FdLink = link.try_into().map_err(|e| pin_err(e.to_string()))?;
    link.pin(path).map_err(|e| pin_err(e.to_string()))?;
    Ok(())
}

/// `ENROLLED_NETNS`: the network namespaces whose connects are redirected
/// when interception is gated by netns. A namespace is added once its
/// proxy listens and removed before its proxy stops, so an enrolled pod's
/// Lattice connects always find a listener (or, with no agent at all,
/// fail fast with "connection refused": never unsigned).
pub struct NetnsGate {
    // Updates are rare (pod enrollment); a mutex keeps `&self` methods.
    map: std::sync::Mutex<BpfHashMap<MapData, u64, u32>>,
    /// Namespaces the map holds at most.
    capacity: u32,
}

impl NetnsGate {
    fn new(ebpf: &mut Ebpf, wanted: u32) -> Result<Self, BpfError> {
        let name = names::ENROLLED_NETNS;
        let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
        let capacity = match &map {
            aya::maps::Map::HashMap(data) => data.info().map_or(wanted, |i| i.max_entries()),
            _ => wanted,
        };
        if capacity != wanted {
            tracing::warn!(
                capacity,
                max_pods = wanted,
                "the pinned table of enrolled network namespaces keeps the size it was created with, not --max-pods (remove its pin to resize it)"
            );
        }
        let map = BpfHashMap::try_from(map).map_err(|source| BpfError::Map { name, source })?;
        Ok(Self {
            map: std::sync::Mutex::new(map),
            capacity,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BpfHashMap<MapData, u64, u32>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts redirecting connects made in the netns with this cookie.
    pub fn enroll(&self, netns_cookie: u64) -> Result<(), BpfError> {
        match self.lock().insert(netns_cookie, 1, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Err(BpfError::GateFull {
                    capacity: self.capacity,
                })
            }
            Err(source) => Err(BpfError::Map {
                name: names::ENROLLED_NETNS,
                source,
            }),
        }
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
}
