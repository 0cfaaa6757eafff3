//! What an agent does with what an earlier agent pinned: pure decisions
//! over what the kernel reports, unit-tested without a kernel. The kernel
//! calls that gather the facts and carry the decisions out are in
//! `pins.rs` and `mod.rs`.
//!
//! - A **map** is reused when its definition (type, key and value size,
//!   capacity, flags) is the one the embedded object declares; otherwise
//!   a new map takes its place (see [`MapPlan`]).
//! - A **program** is kept when the one the pinned link runs is the same
//!   as the embedded one (see [`ProgramView::change_to`]); otherwise the
//!   link is updated to the new program in one step.

use std::{collections::BTreeSet, fmt};

use lattice_common::names;

/// `enum bpf_map_type` values the object uses, for log lines.
const MAP_TYPE_NAMES: [(u32, &str); 5] = [
    (1, "hash"),
    (2, "array"),
    (9, "lru_hash"),
    (11, "lpm_trie"),
    (27, "ringbuf"),
];

/// What a map is, as far as the programs that read it are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for MapDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match MAP_TYPE_NAMES.iter().find(|(t, _)| *t == self.map_type) {
            Some((_, name)) => write!(f, "{name}")?,
            None => write!(f, "type {}", self.map_type)?,
        }
        write!(
            f,
            " key {} B value {} B, {} entries, flags {:#x}",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

impl MapDef {
    /// Whether programs built for `self` can use a map defined as `have`.
    /// The gate's capacity is the exception: `--max-pods` sizes it when
    /// it is created, and a pinned gate at least that large is kept (a
    /// smaller one is grown: replaced by one of `--max-pods`, its
    /// namespaces carried over; a larger one is not shrunk, which could
    /// not hold what it holds).
    pub fn accepts(&self, name: &str, have: &MapDef) -> bool {
        let entries_fit = if name == names::ENROLLED_NETNS {
            have.max_entries >= self.max_entries
        } else {
            have.max_entries == self.max_entries
        };
        self.map_type == have.map_type
            && self.key_size == have.key_size
            && self.value_size == have.value_size
            && self.flags == have.flags
            && entries_fit
    }
}

/// `enum bpf_map_type`: BPF_MAP_TYPE_RINGBUF.
const RINGBUF: u32 = 27;

/// The definition of every map in `object` as the loader creates it: the
/// gate sized `gate_capacity`, ring buffers rounded up to a power-of-two
/// number of pages (with no value size), as aya does.
pub fn object_maps(
    object: &[u8],
    gate_capacity: u32,
    page_size: u32,
) -> Result<Vec<(String, MapDef)>, super::BpfError> {
    let obj = aya_obj::Object::parse(object).map_err(super::BpfError::Object)?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let mut def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            if name == names::ENROLLED_NETNS {
                def.max_entries = gate_capacity;
            }
            if def.map_type == RINGBUF {
                def.value_size = 0;
                def.max_entries = ring_size(def.max_entries, page_size);
            }
            (name.clone(), def)
        })
        .collect())
}

/// A ring buffer's size as the loader rounds it (aya, as libbpf).
fn ring_size(bytes: u32, page_size: u32) -> u32 {
    if bytes == 0 || page_size == 0 {
        return bytes;
    }
    page_size * bytes.div_ceil(page_size).next_power_of_two()
}

/// What becomes of one of the object's pinned maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapPlan {
    /// Nothing of that name is pinned or in use: created and pinned.
    Create,
    /// The pinned map fits: used as it is, with what it holds.
    Reuse,
    /// Not pinned, but the attached programs read a map of that name that
    /// fits (its pin was removed): pinned again and used.
    Repin { id: u32 },
    /// What is there does not fit: a new map is created, filled, read by
    /// the new programs, then pinned in place of the old one.
    Replace { old: MapDef },
}

impl MapPlan {
    /// `pinned`: the definition of the map pinned under the name; `in_use`:
    /// a map of that name the attached programs read (used when nothing
    /// is pinned).
    pub fn decide(
        name: &str,
        wanted: &MapDef,
        pinned: Option<&MapDef>,
        in_use: Option<(u32, &MapDef)>,
    ) -> Self {
        match (pinned, in_use) {
            (Some(have), _) if wanted.accepts(name, have) => Self::Reuse,
            (Some(have), _) => Self::Replace { old: *have },
            (None, Some((id, have))) if wanted.accepts(name, have) => Self::Repin { id },
            (None, Some((_, have))) => Self::Replace { old: *have },
            (None, None) => Self::Create,
        }
    }
}

/// The name the kernel keeps for a map or program (15 bytes at most).
pub fn kernel_name(name: &str) -> &str {
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A map a program reads, as the kernel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapInUse {
    pub id: u32,
    /// The kernel's name for it (see [`kernel_name`]).
    pub name: String,
    pub def: MapDef,
}

/// A loaded program as far as deciding to keep or swap it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramView {
    pub id: u32,
    /// The kernel's tag: a hash of the instructions with map references
    /// left out, so the same code has the same tag whatever maps it uses.
    pub tag: [u8; 8],
    pub maps: Vec<MapInUse>,
    /// The bytes of its read-only data (`.rodata`: the loader's settings,
    /// such as the eBPF log level), which the tag does not cover.
    pub settings: Vec<u8>,
}

/// Why a pinned program is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgramChange {
    /// Other instructions: another build of the programs.
    Code { old_tag: String, new_tag: String },
    /// The same code reading other maps (some were replaced).
    Maps(Vec<String>),
    /// The same code and maps, other load-time settings.
    Settings,
    /// The pinned program could not be read (no CAP_SYS_ADMIN).
    Unknown,
}

impl fmt::Display for ProgramChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code { old_tag, new_tag } => write!(f, "code (tag {old_tag} -> {new_tag})"),
            Self::Maps(names) => write!(f, "maps ({})", names.join(", ")),
            Self::Settings => write!(f, "load settings (.rodata)"),
            Self::Unknown => write!(f, "unknown program replaced"),
        }
    }
}

pub fn tag_hex(tag: &[u8; 8]) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

impl ProgramView {
    /// Ids of the maps named `name` (kernel name) it reads.
    fn map_ids(&self, name: &str) -> BTreeSet<u32> {
        self.maps
            .iter()
            .filter(|m| m.name == name)
            .map(|m| m.id)
            .collect()
    }

    /// What differs when `new` replaces this program, or None when the
    /// pinned one is the same: same tag, the same maps of every name in
    /// `shared` (the pinned ones), the same settings. Maps private to a
    /// load (aya-log's buffers, `.rodata` itself) differ every load and
    /// are not compared.
    pub fn change_to(&self, new: &ProgramView, shared: &[&str]) -> Option<ProgramChange> {
        if self.tag != new.tag {
            return Some(ProgramChange::Code {
                old_tag: tag_hex(&self.tag),
                new_tag: tag_hex(&new.tag),
            });
        }
        let moved: Vec<String> = shared
            .iter()
            .map(|name| kernel_name(name))
            .filter(|name| self.map_ids(name) != new.map_ids(name))
            .map(str::to_owned)
            .collect();
        if !moved.is_empty() {
            return Some(ProgramChange::Maps(moved));
        }
        (self.settings != new.settings).then_some(ProgramChange::Settings)
    }

    /// The maps it reads whose kernel name is `name`'s.
    pub fn maps_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a MapInUse> + 'a {
        let name = kernel_name(name);
        self.maps.iter().filter(move |m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATE: MapDef = MapDef {
        map_type: 1,
        key_size: 8,
        value_size: 4,
        max_entries: 4096,
        flags: 0,
    };
    const CONFIG: MapDef = MapDef {
        map_type: 2,
        key_size: 4,
        value_size: 24,
        max_entries: 1,
        flags: 0,
    };

    #[test]
    fn a_map_is_reused_only_when_its_definition_fits() {
        let old_config = MapDef {
            value_size: 8,
            ..CONFIG
        };
        assert_eq!(
            MapPlan::decide("CONFIG", &CONFIG, Some(&CONFIG), None),
            MapPlan::Reuse
        );
        assert_eq!(
            MapPlan::decide("CONFIG", &CONFIG, Some(&old_config), None),
            MapPlan::Replace { old: old_config }
        );
        let other_flags = MapDef { flags: 1, ..GATE };
        assert_eq!(
            MapPlan::decide(names::ENROLLED_NETNS, &GATE, Some(&other_flags), None),
            MapPlan::Replace { old: other_flags }
        );
        let bigger = MapDef {
            max_entries: 2,
            ..CONFIG
        };
        assert_eq!(
            MapPlan::decide("CONFIG", &CONFIG, Some(&bigger), None),
            MapPlan::Replace { old: bigger }
        );
    }

    /// `--max-pods` sizes the gate when it is created; a pinned gate
    /// smaller than that is grown, a larger one kept (the agent warns).
    #[test]
    fn the_gate_grows_but_never_shrinks() {
        let small = MapDef {
            max_entries: 6,
            ..GATE
        };
        assert_eq!(
            MapPlan::decide(names::ENROLLED_NETNS, &GATE, Some(&small), None),
            MapPlan::Replace { old: small }
        );
        let large = MapDef {
            max_entries: 8192,
            ..GATE
        };
        assert_eq!(
            MapPlan::decide(names::ENROLLED_NETNS, &GATE, Some(&large), None),
            MapPlan::Reuse
        );
    }

    /// A pin removed while the programs still read the map: the map the
    /// programs read is pinned again rather than a new, empty one made
    /// (for the gate, an empty one would let every enrolled pod's
    /// connects through).
    #[test]
    fn a_map_in_use_without_a_pin_is_pinned_again() {
        assert_eq!(
            MapPlan::decide(names::ENROLLED_NETNS, &GATE, None, Some((7, &GATE))),
            MapPlan::Repin { id: 7 }
        );
        let old = MapDef {
            value_size: 8,
            ..GATE
        };
        assert_eq!(
            MapPlan::decide(names::ENROLLED_NETNS, &GATE, None, Some((7, &old))),
            MapPlan::Replace { old }
        );
        assert_eq!(
            MapPlan::decide(names::ENROLLED_NETNS, &GATE, None, None),
            MapPlan::Create
        );
    }

    /// The embedded object declares every map the agent pins, as the
    /// programs need them.
    #[test]
    fn the_object_declares_the_pinned_maps() {
        let maps = object_maps(crate::bpf::EBPF_OBJECT, 6, 4096).unwrap();
        let def = |name: &str| {
            maps.iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| *d)
                .unwrap_or_else(|| panic!("{name} missing: {maps:?}"))
        };
        for name in names::PINNED_MAPS {
            def(name);
        }
        assert_eq!(def(names::ENROLLED_NETNS).max_entries, 6);
        assert_eq!(
            def(names::CONFIG).value_size as usize,
            std::mem::size_of::<lattice_common::Config>()
        );
        let logs = def("AYA_LOGS");
        assert_eq!((logs.map_type, logs.value_size), (RINGBUF, 0));
        assert_eq!(ring_size(1 << 17, 4096), 1 << 17);
        assert_eq!(ring_size(5000, 4096), 8192);
        assert_eq!(ring_size(3 * 4096, 4096), 4 * 4096);
    }

    #[test]
    fn kernel_names_are_cut_to_fifteen_bytes() {
        assert_eq!(kernel_name("ORIG_DST_BY_COOKIE"), "ORIG_DST_BY_COO");
        assert_eq!(kernel_name("ORIG_DST_BY_PEER"), "ORIG_DST_BY_PEE");
        assert_eq!(kernel_name("CONFIG"), "CONFIG");
    }

    fn view(id: u32, tag: u8, gate: u32, settings: u8) -> ProgramView {
        ProgramView {
            id,
            tag: [tag; 8],
            maps: vec![
                MapInUse {
                    id: gate,
                    name: "ENROLLED_NETNS".into(),
                    def: GATE,
                },
                // Private to each load: never compared.
                MapInUse {
                    id: id + 1000,
                    name: "AYA_LOG_BUF".into(),
                    def: CONFIG,
                },
            ],
            settings: vec![settings],
        }
    }

    #[test]
    fn a_program_is_kept_only_when_code_maps_and_settings_are_the_same() {
        let shared = [names::ENROLLED_NETNS, names::CONFIG];
        let pinned = view(1, 0xaa, 10, 3);
        assert_eq!(pinned.change_to(&view(2, 0xaa, 10, 3), &shared), None);
        assert_eq!(
            pinned.change_to(&view(2, 0xbb, 10, 3), &shared),
            Some(ProgramChange::Code {
                old_tag: "aaaaaaaaaaaaaaaa".into(),
                new_tag: "bbbbbbbbbbbbbbbb".into()
            })
        );
        assert_eq!(
            pinned.change_to(&view(2, 0xaa, 11, 3), &shared),
            Some(ProgramChange::Maps(vec!["ENROLLED_NETNS".into()]))
        );
        assert_eq!(
            pinned.change_to(&view(2, 0xaa, 10, 4), &shared),
            Some(ProgramChange::Settings)
        );
    }
}
