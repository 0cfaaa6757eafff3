//! Loads the eBPF interceptor, configures it, attaches it to a cgroup and
//! (optionally) pins it, and exposes the original-destination map.
//!
//! Over the pins of an earlier agent (a restart, an upgrade), maps that
//! fit are reused and the others replaced, and each pinned link is kept,
//! made to run the embedded program in one step when its own differs
//! (`upgrade.rs` decides, `pins.rs` reads the pin directory). The order
//! keeps every enrolled pod's connects redirected throughout: new maps
//! are filled (the gate with every namespace the attached programs
//! redirect) before any link is swapped, and take the old maps' pins only
//! once the programs read them.

mod checks;
mod gate;
mod orig_dst_map;
mod own_cgroup;
mod pins;
mod raw_link;
mod sys;
mod upgrade;

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapError, lpm_trie::Key},
    programs::{CgroupAttachMode, ProgramError, links::FdLink},
};
pub use checks::{CgroupDirError, PinDirError};
pub use gate::NetnsGate;
use ipnet::{Ipv4Net, Ipv6Net};
use lattice_common::{
    CONFIG_EXEMPT_UID, CONFIG_GATE_BY_NETNS, Config, NEVER_INTERCEPTED_V4, NEVER_INTERCEPTED_V6,
    PREFIX_EXEMPT, PREFIX_INTERCEPT, names,
};
pub use orig_dst_map::{NetnsOrigDst, OrigDstMap};
pub use own_cgroup::own_cgroup_id;
use upgrade::{MapDef, MapPlan, ProgramChange};

/// The eBPF object built by build.rs from the lattice-ebpf crate.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lattice-ebpf"));

/// aya-log's ring buffer; pinned with the other maps so a restarted agent
/// still receives the log lines of programs it did not load itself.
const AYA_LOGS: &str = "AYA_LOGS";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("--cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        problem: CgroupDirError,
    },
    #[error("--pin {}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        problem: PinDirError,
    },
    #[error("reading this process's capabilities")]
    Capabilities(#[source] caps::errors::CapsError),
    /// `needed_for`: what the kernel needs it for, and how to grant it.
    #[error("missing capability {capability}: {needed_for}")]
    Capability {
        capability: &'static str,
        needed_for: &'static str,
    },
    #[error("too many prefixes in --cidr: {count} {family} prefixes, at most {max}")]
    TooManyPrefixes {
        family: &'static str,
        count: usize,
        max: u32,
    },
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("reading the embedded eBPF object's map definitions")]
    Object(#[source] aya_obj::ParseError),
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
    #[error("pinning {}", path.display())]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// Putting a pinned file (a staged map, the marker) in place.
    #[error("pinning {}", path.display())]
    PinFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("the table of enrolled network namespaces is full: it holds {capacity} (--max-pods)")]
    GateFull { capacity: u32 },
    #[error("reading what is pinned at {}", path.display())]
    Survey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the map pinned at {}", path.display())]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("putting the new {name} program in place of the one the link pinned at {} runs", path.display())]
    Swap {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot carry the enrolled network namespaces over: the table in use has {key_size}-byte keys, not 8-byte namespace cookies"
    )]
    GateLayout { key_size: u32 },
    #[error("reading the enrolled network namespaces of map {id}")]
    GateRead {
        id: u32,
        #[source]
        source: std::io::Error,
    },
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
    /// pinned map at least that large is kept; a smaller one is replaced
    /// by one this large, its namespaces carried over).
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

        // What an earlier agent pinned, and which of its maps fit.
        let mut survey = match &cfg.pin {
            Some(dir) => Some(pins::Survey::take(dir, &PROGRAM_NAMES, &SHARED_MAPS)?),
            None => None,
        };
        let plans = match &survey {
            Some(survey) => plan_maps(survey, cfg)?,
            None => Vec::new(),
        };
        let mut ebpf = load(cfg, &plans)?;
        let replaced: Vec<(&'static str, MapDef)> = plans
            .iter()
            .filter_map(|(name, plan)| match plan {
                MapPlan::Replace { old } => Some((*name, *old)),
                _ => None,
            })
            .collect();
        if let Some(survey) = &survey {
            for (name, _) in &replaced {
                let map = ebpf.map(name).ok_or(BpfError::MissingMap(name))?;
                survey.stage_map(name, map)?;
            }
        }
        write_config(&mut ebpf, cfg)?;
        let gate = match cfg.gate_by_netns {
            true => Some(NetnsGate::new(&mut ebpf, cfg.gate_capacity)?),
            false => None,
        };
        // Before any program is swapped, the gate the new programs read
        // holds every namespace the attached ones redirect.
        let carried = match (&gate, &survey) {
            (Some(gate), Some(survey)) => {
                gate.carry_over(&survey.replaced_ids(names::ENROLLED_NETNS, gate.id()))?
            }
            _ => Vec::new(),
        };
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
            problem: CgroupDirError::Open(e),
        })?;
        let attached = attach_all(&mut ebpf, &cgroup, cfg, survey.as_mut())?;
        // The programs read the new maps now: these take the old ones' pins.
        if let Some(survey) = &survey {
            for (name, _) in &replaced {
                survey.commit_map(name)?;
            }
        }
        let carried_count = carried.iter().map(|(_, c)| c.len()).sum();
        if let Some(gate) = &gate {
            gate.follow(carried);
        }

        let peer_map = ebpf
            .take_map(names::ORIG_DST_BY_PEER)
            .ok_or(BpfError::MissingMap(names::ORIG_DST_BY_PEER))?;
        let peer_map_id = match &peer_map {
            aya::maps::Map::LruHashMap(data) => data.info().map_or(0, |i| i.id()),
            _ => 0,
        };
        let orig_dst = OrigDstMap::new(peer_map).map_err(|source| BpfError::Map {
            name: names::ORIG_DST_BY_PEER,
            source,
        })?;
        if let Some(survey) = &survey {
            read_replaced_records(&orig_dst, survey, peer_map_id);
            Summary {
                survey,
                swapped: &attached.swapped,
                replaced: &replaced,
                carried: carried_count,
            }
            .log();
            if let Err(e) = survey.write_marker(&object_marker()) {
                tracing::warn!(error = %crate::error_chain(&e), "cannot update the pin directory's version marker");
            }
        }
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
            pinned: attached.pinned,
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

/// The programs, in the order they are attached, with their attach types.
const PROGRAMS: [(&str, u32); 4] = [
    (names::PROG_CONNECT4, raw_link::BPF_CGROUP_INET4_CONNECT),
    (names::PROG_CONNECT6, raw_link::BPF_CGROUP_INET6_CONNECT),
    (names::PROG_SOCK_OPS, raw_link::BPF_CGROUP_SOCK_OPS),
    (names::PROG_GETSOCKOPT, raw_link::BPF_CGROUP_GETSOCKOPT),
];
const PROGRAM_NAMES: [&str; 4] = [PROGRAMS[0].0, PROGRAMS[1].0, PROGRAMS[2].0, PROGRAMS[3].0];

/// The maps shared through the pin directory: the programs' own, and
/// aya-log's ring buffer.
const SHARED_MAPS: [&str; 7] = [
    names::PINNED_MAPS[0],
    names::PINNED_MAPS[1],
    names::PINNED_MAPS[2],
    names::PINNED_MAPS[3],
    names::PINNED_MAPS[4],
    names::PINNED_MAPS[5],
    AYA_LOGS,
];

/// Decides, for each shared map, whether the one pinned (or in use) fits
/// the embedded object; pins again a map in use whose pin was removed.
fn plan_maps(
    survey: &pins::Survey,
    cfg: &InterceptConfig,
) -> Result<Vec<(&'static str, MapPlan)>, BpfError> {
    let wanted = upgrade::object_maps(EBPF_OBJECT, cfg.gate_capacity, page_size())?;
    let mut plans = Vec::new();
    for name in SHARED_MAPS {
        let want = wanted
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| *d)
            .ok_or(BpfError::MissingMap(name))?;
        let pinned = survey.pinned(name).map(|(_, def)| def);
        let in_use = survey.in_use(name);
        let plan = MapPlan::decide(
            name,
            &want,
            pinned.as_ref(),
            in_use.first().map(|m| (m.id, &m.def)),
        );
        if let MapPlan::Repin { id } = plan {
            tracing::warn!(
                map = name,
                map_id = id,
                "the pin of a map the attached programs read was removed: pinning it again"
            );
            survey.repin(name, id)?;
        }
        plans.push((name, plan));
    }
    Ok(plans)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

fn load(cfg: &InterceptConfig, plans: &[(&'static str, MapPlan)]) -> Result<Ebpf, BpfError> {
    let mut loader = EbpfLoader::new();
    if let Some(dir) = &cfg.pin {
        for (name, plan) in plans {
            // A map to replace is created unpinned, and pinned in place of
            // the old one once the programs read it.
            if !matches!(plan, MapPlan::Replace { .. }) {
                // Reuses the map pinned there by an earlier agent, or
                // creates and pins it.
                loader.map_pin_path(name, pins::map_path(dir, name));
            }
        }
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

/// Keeps reading the original-destination records the replaced programs
/// made (connections they redirected may wait in a backlog), when their
/// map is another with the same key and value types.
fn read_replaced_records(orig_dst: &OrigDstMap, survey: &pins::Survey, new_id: u32) {
    let Some(&old_id) = survey.replaced_ids(names::ORIG_DST_BY_PEER, new_id).first() else {
        return;
    };
    // Gone already: nothing is left to read.
    let Ok(previous) = aya::maps::MapData::from_id(old_id) else {
        return;
    };
    if let Err(e) = orig_dst.read_previous(previous) {
        tracing::warn!(
            map_id = old_id,
            error = %e,
            "the replaced programs' original-destination records have another layout: connections they redirected that still wait to be accepted find no record"
        );
    }
}

/// What the pin directory's marker says of this agent: its version and
/// the SHA-256 of its eBPF object.
fn object_marker() -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(EBPF_OBJECT);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "lattice-agent {} ebpf sha256:{hex}",
        env!("CARGO_PKG_VERSION")
    )
}

/// What changed in the pin directory, for one log line.
struct Summary<'a> {
    survey: &'a pins::Survey,
    swapped: &'a [Swapped],
    replaced: &'a [(&'static str, MapDef)],
    carried: usize,
}

impl Summary<'_> {
    fn log(&self) {
        let previous = self
            .survey
            .marker
            .as_deref()
            .unwrap_or("unknown (no marker)");
        if self.swapped.is_empty() && self.replaced.is_empty() {
            if !self.survey.had_links {
                return;
            }
            tracing::info!(
                pins = %self.survey.dir.display(),
                object = %object_marker(),
                "the pinned programs are this agent's: reusing them"
            );
            return;
        }
        let programs: Vec<String> = self
            .swapped
            .iter()
            .map(|s| format!("{} (link {}: {})", s.program, s.link_id, s.change))
            .collect();
        let maps: Vec<String> = self
            .replaced
            .iter()
            .map(|(name, old)| format!("{name} (was {old})"))
            .collect();
        tracing::info!(
            pins = %self.survey.dir.display(),
            previous,
            object = %object_marker(),
            programs = %programs.join("; "),
            maps = %maps.join("; "),
            gated_namespaces_carried = self.carried,
            "upgraded the pinned eBPF programs in place"
        );
    }
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

    let v4 = prefix_entries(&cfg.v4_prefixes, &NEVER_INTERCEPTED_V4);
    let v6 = prefix_entries(&cfg.v6_prefixes, &NEVER_INTERCEPTED_V6);
    replace_prefixes(ebpf, names::V4_PREFIXES, &v4)?;
    replace_prefixes(ebpf, names::V6_PREFIXES, &v6)
}

/// The trie entries for `prefixes`: each intercepted, plus an exempt host
/// entry for every address of `never` one of them covers (the longest
/// match wins, so those addresses are never redirected).
fn prefix_entries<N: IpPrefix>(prefixes: &[N], never: &[N::Bytes]) -> Vec<(Key<N::Bytes>, u8)>
where
    N::Bytes: aya::Pod + PartialEq,
{
    let mut entries: Vec<(Key<N::Bytes>, u8)> = prefixes
        .iter()
        .map(|n| (Key::new(n.len(), n.network_bytes()), PREFIX_INTERCEPT))
        .collect();
    for &addr in never {
        if let Some(cover) = prefixes.iter().find(|n| n.holds(addr)) {
            tracing::info!(
                prefix = %cover,
                address = %N::show(addr),
                "the EKS Pod Identity Agent's address is never intercepted, though --cidr covers it"
            );
            entries.retain(|(k, _)| !(k.prefix_len() == N::BITS && k.data() == addr));
            entries.push((Key::new(N::BITS, addr), PREFIX_EXEMPT));
        }
    }
    entries
}

/// What [`prefix_entries`] needs of an IPv4 or IPv6 prefix.
trait IpPrefix: std::fmt::Display {
    type Bytes: aya::Pod + PartialEq;
    const BITS: u32;
    fn len(&self) -> u32;
    fn network_bytes(&self) -> Self::Bytes;
    fn holds(&self, addr: Self::Bytes) -> bool;
    fn show(addr: Self::Bytes) -> String;
}

impl IpPrefix for Ipv4Net {
    type Bytes = [u8; 4];
    const BITS: u32 = 32;
    fn len(&self) -> u32 {
        u32::from(self.prefix_len())
    }
    fn network_bytes(&self) -> [u8; 4] {
        self.network().octets()
    }
    fn holds(&self, addr: [u8; 4]) -> bool {
        self.contains(&std::net::Ipv4Addr::from(addr))
    }
    fn show(addr: [u8; 4]) -> String {
        std::net::Ipv4Addr::from(addr).to_string()
    }
}

impl IpPrefix for Ipv6Net {
    type Bytes = [u8; 16];
    const BITS: u32 = 128;
    fn len(&self) -> u32 {
        u32::from(self.prefix_len())
    }
    fn network_bytes(&self) -> [u8; 16] {
        self.network().octets()
    }
    fn holds(&self, addr: [u8; 16]) -> bool {
        self.contains(&std::net::Ipv6Addr::from(addr))
    }
    fn show(addr: [u8; 16]) -> String {
        std::net::Ipv6Addr::from(addr).to_string()
    }
}

fn replace_prefixes<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: &[(Key<[u8; N]>, u8)],
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
            .any(|(w, _)| w.prefix_len() == key.prefix_len() && w.data() == key.data());
        if !keep {
            trie.remove(&key).map_err(map_err)?;
        }
    }
    for (key, value) in wanted {
        trie.insert(key, value, 0).map_err(map_err)?;
    }
    Ok(())
}

/// What attaching did.
#[derive(Default)]
struct Attached {
    /// Links found or created in the pin directory.
    pinned: Vec<&'static str>,
    /// Pinned links now running the embedded programs.
    swapped: Vec<Swapped>,
}

/// A pinned link moved to the embedded program.
struct Swapped {
    program: &'static str,
    link_id: u32,
    change: ProgramChange,
}

/// Loads and attaches every program; with `survey`, links pinned by an
/// earlier agent are kept, their programs swapped when they differ.
///
/// Every program is loaded (verified) before any link changes, so a
/// program the kernel refuses leaves what is attached as it was; a swap
/// that fails puts the programs of the links swapped before it back, so
/// they read the maps the agent being replaced writes (the gate it
/// enrolls pods in) until a start completes.
fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cfg: &InterceptConfig,
    survey: Option<&mut pins::Survey>,
) -> Result<Attached, BpfError> {
    for (name, _) in PROGRAMS {
        load_program(program_mut(ebpf, name)?, name)?;
    }
    let mut undo = Vec::new();
    let attached = attach_loaded(ebpf, cgroup, cfg, survey, &mut undo);
    if attached.is_err() {
        undo_swaps(undo);
    }
    attached
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, BpfError> {
    ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })
}

/// [`attach_all`] once the programs are loaded; `undo` gathers what each
/// swap replaced.
fn attach_loaded(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cfg: &InterceptConfig,
    mut survey: Option<&mut pins::Survey>,
    undo: &mut Vec<Undo>,
) -> Result<Attached, BpfError> {
    let mut attached = Attached::default();
    for (name, attach_type) in PROGRAMS {
        let program = program_mut(ebpf, name)?;
        let prog_err = |source| BpfError::Program { name, source };
        if cfg.held_by_cgroup && cfg.pin.is_none() {
            let prog_fd = program.fd().map_err(prog_err)?;
            raw_link::attach_held_by_cgroup(prog_fd.as_fd(), cgroup.as_fd(), attach_type).map_err(
                |source| BpfError::Attach {
                    name,
                    cgroup: cfg.cgroup.clone(),
                    source,
                },
            )?;
            tracing::debug!(program = name, "attached, held by the cgroup");
            continue;
        }
        if let Some(old) = survey.as_deref_mut().and_then(|s| s.take_link(name)) {
            // Attaching again would run both: the pinned link is kept and
            // runs the embedded program from now on.
            attached
                .swapped
                .extend(update_pinned(program, name, old, undo)?);
            attached.pinned.push(name);
            continue;
        }
        let link_path = cfg.pin.as_deref().map(|dir| pins::link_path(dir, name));
        let attach_err = |source: ProgramError| BpfError::Attach {
            name,
            cgroup: cfg.cgroup.clone(),
            source: std::io::Error::other(source),
        };
        match program {
            aya::programs::Program::CgroupSockAddr(p) => {
                let id = p
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                if let Some(path) = &link_path {
                    pin_link(p.take_link(id).map_err(prog_err)?, path)?;
                }
            }
            aya::programs::Program::SockOps(p) => {
                let id = p
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                if let Some(path) = &link_path {
                    pin_link(p.take_link(id).map_err(prog_err)?, path)?;
                }
            }
            aya::programs::Program::CgroupSockopt(p) => match &link_path {
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
            },
            _ => return Err(prog_err(ProgramError::UnexpectedProgramType)),
        }
        if link_path.is_some() {
            attached.pinned.push(name);
        }
        tracing::debug!(program = name, "attached");
    }
    Ok(attached)
}

fn load_program(program: &mut aya::programs::Program, name: &'static str) -> Result<(), BpfError> {
    let prog_err = |source| BpfError::Program { name, source };
    match program {
        aya::programs::Program::CgroupSockAddr(p) => p.load().map_err(prog_err),
        aya::programs::Program::SockOps(p) => p.load().map_err(prog_err),
        aya::programs::Program::CgroupSockopt(p) => p.load().map_err(prog_err),
        _ => Err(prog_err(ProgramError::UnexpectedProgramType)),
    }
}

fn unload_program(
    program: &mut aya::programs::Program,
    name: &'static str,
) -> Result<(), BpfError> {
    let prog_err = |source| BpfError::Program { name, source };
    match program {
        aya::programs::Program::CgroupSockAddr(p) => p.unload().map_err(prog_err),
        aya::programs::Program::SockOps(p) => p.unload().map_err(prog_err),
        aya::programs::Program::CgroupSockopt(p) => p.unload().map_err(prog_err),
        _ => Err(prog_err(ProgramError::UnexpectedProgramType)),
    }
}

/// A swap to take back if the start fails: the link, and the programs it
/// ran and runs.
struct Undo {
    program: &'static str,
    link: std::os::fd::OwnedFd,
    old: std::os::fd::OwnedFd,
    new: std::os::fd::OwnedFd,
}

/// Makes each link swapped by a start that failed run its previous
/// program again (in reverse order, one step each, only if it still runs
/// the program this start put there).
fn undo_swaps(undo: Vec<Undo>) {
    for u in undo.into_iter().rev() {
        match raw_link::update(u.link.as_fd(), u.old.as_fd(), Some(u.new.as_fd())) {
            Ok(()) => tracing::warn!(
                program = u.program,
                "the start failed: the pinned link runs its previous program again"
            ),
            Err(e) => tracing::warn!(
                program = u.program,
                error = %e,
                "the start failed and the pinned link's previous program cannot be put back: the next start replaces it"
            ),
        }
    }
}

/// Keeps the program the pinned link `old` runs when it is the same as
/// the loaded `program` (unloaded then); otherwise makes the link run
/// `program` in one step, so the cgroup never runs neither, and adds to
/// `undo` what taking that back needs (when the old program could be
/// read).
fn update_pinned(
    program: &mut aya::programs::Program,
    name: &'static str,
    old: pins::PinnedProgram,
    undo: &mut Vec<Undo>,
) -> Result<Option<Swapped>, BpfError> {
    let prog_err = |source| BpfError::Program { name, source };
    let (change, old_prog, new_prog) = match &old.running {
        Some(running) => {
            let new = {
                let fd = program.fd().map_err(prog_err)?;
                pins::view_of(fd.as_fd()).map_err(|source| BpfError::Survey {
                    path: old.path.clone(),
                    source,
                })?
            };
            let Some(change) = running.view.change_to(&new, &SHARED_MAPS) else {
                unload_program(program, name)?;
                tracing::debug!(program = name, link_id = old.link_id, path = %old.path.display(), "the pinned link runs this agent's program already");
                return Ok(None);
            };
            (change, Some(running.view.id), Some(new.id))
        }
        None => (ProgramChange::Unknown, None, None),
    };
    let fd = program.fd().map_err(prog_err)?;
    raw_link::update(
        old.link.as_fd(),
        fd.as_fd(),
        old.running.as_ref().map(|r| r.prog.as_fd()),
    )
    .map_err(|source| BpfError::Swap {
        name,
        path: old.path.clone(),
        source,
    })?;
    if let Some(running) = old.running {
        match fd.as_fd().try_clone_to_owned() {
            Ok(new) => undo.push(Undo {
                program: name,
                link: old.link,
                old: running.prog,
                new,
            }),
            Err(e) => {
                tracing::warn!(program = name, error = %e, "cannot keep what undoing this swap needs")
            }
        }
    }
    tracing::info!(
        program = name,
        link_id = old.link_id,
        old_program = ?old_prog,
        new_program = ?new_prog,
        change = %change,
        "the pinned link runs the new program"
    );
    Ok(Some(Swapped {
        program: name,
        link_id: old.link_id,
        change,
    }))
}

/// Pins a link the agent owns (taken from its program) at `path`.
fn pin_link<L>(link: L, path: &Path) -> Result<(), BpfError>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    let link: FdLink = link.try_into().map_err(|source| BpfError::PinLink {
        path: path.to_owned(),
        source,
    })?;
    link.pin(path).map_err(|source| BpfError::Pin {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(entries: &[(Key<[u8; 4]>, u8)]) -> Vec<(String, u8)> {
        entries
            .iter()
            .map(|(k, v)| {
                let ip = std::net::Ipv4Addr::from(k.data());
                (format!("{ip}/{}", k.prefix_len()), *v)
            })
            .collect()
    }

    #[test]
    fn the_pod_identity_agent_is_exempt_inside_a_covering_prefix() {
        let defaults: Vec<Ipv4Net> = vec!["169.254.171.0/24".parse().unwrap()];
        assert_eq!(
            v4(&prefix_entries(&defaults, &NEVER_INTERCEPTED_V4)),
            [("169.254.171.0/24".to_owned(), PREFIX_INTERCEPT)]
        );
        let wide: Vec<Ipv4Net> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "169.254.0.0/16".parse().unwrap(),
        ];
        assert_eq!(
            v4(&prefix_entries(&wide, &NEVER_INTERCEPTED_V4)),
            [
                ("10.0.0.0/8".to_owned(), PREFIX_INTERCEPT),
                ("169.254.0.0/16".to_owned(), PREFIX_INTERCEPT),
                ("169.254.170.23/32".to_owned(), PREFIX_EXEMPT),
            ]
        );
        // Named exactly: exempt all the same, and listed once.
        let exact: Vec<Ipv4Net> = vec!["169.254.170.23/32".parse().unwrap()];
        assert_eq!(
            v4(&prefix_entries(&exact, &NEVER_INTERCEPTED_V4)),
            [("169.254.170.23/32".to_owned(), PREFIX_EXEMPT)]
        );
        let v6: Vec<Ipv6Net> = vec!["fd00:ec2::/32".parse().unwrap()];
        let entries = prefix_entries(&v6, &NEVER_INTERCEPTED_V6);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].0.prefix_len(), 128);
        assert_eq!(entries[1].1, PREFIX_EXEMPT);
    }
}
