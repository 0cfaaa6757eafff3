//! What the kernel says, via bpftool's JSON output: the agent's own
//! account of what it attached is not evidence.

use std::{
    ffi::{OsStr, OsString},
    path::Path,
    process::Command,
};

use serde_json::Value;

use crate::{require_tool, spawn::run_ok};

/// Runs bpftool with `args`; its stdout. Panics unless it exits 0.
fn bpftool<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    require_tool("bpftool", "bpftool");
    run_ok(Command::new("bpftool").args(args))
}

fn bpftool_json(args: &[&OsStr]) -> Value {
    let out = bpftool(std::iter::once(OsStr::new("-j")).chain(args.iter().copied()));
    // bpftool prints nothing at all (not `[]`) for some empty listings.
    if out.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bpftool {args:?}: unparsable JSON ({e}): {out}"))
}

/// `(attach_type, program name)` of every program attached directly to the
/// cgroup, e.g. `("cgroup_inet4_connect", "lattice_connect4")`, sorted.
pub fn attached_programs(cgroup: &Path) -> Vec<(String, String)> {
    let json = bpftool_json(&["cgroup".as_ref(), "show".as_ref(), cgroup.as_os_str()]);
    let mut progs: Vec<(String, String)> = json
        .as_array()
        .unwrap_or_else(|| panic!("bpftool cgroup show: expected an array, got {json}"))
        .iter()
        .map(|p| {
            let field = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            (field("attach_type"), field("name"))
        })
        .collect();
    progs.sort();
    progs
}

/// How many entries the map pinned at `pinned` holds.
pub fn map_entries(pinned: &Path) -> usize {
    let json = bpftool_json(&[
        "map".as_ref(),
        "dump".as_ref(),
        "pinned".as_ref(),
        pinned.as_os_str(),
    ]);
    json.as_array()
        .unwrap_or_else(|| panic!("bpftool map dump: expected an array, got {json}"))
        .len()
}

/// Sets `key` to `value` (bytes, as the map's key and value types lay
/// them out) in the map pinned at `pinned`: an entry someone else left.
pub fn map_update(pinned: &Path, key: &[u8], value: &[u8]) {
    let hex =
        |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("0x{b:02x}")).collect() };
    let mut args = vec![
        "map".into(),
        "update".into(),
        "pinned".into(),
        pinned.into(),
    ];
    args.push("key".into());
    args.extend(hex(key).into_iter().map(OsString::from));
    args.push("value".into());
    args.extend(hex(value).into_iter().map(OsString::from));
    bpftool(args);
}

/// `(program name, program id)` of every program attached directly to the
/// cgroup.
pub fn attached_program_ids(cgroup: &Path) -> Vec<(String, u64)> {
    let json = bpftool_json(&["cgroup".as_ref(), "show".as_ref(), cgroup.as_os_str()]);
    json.as_array()
        .unwrap_or_else(|| panic!("bpftool cgroup show: expected an array, got {json}"))
        .iter()
        .filter_map(|p| Some((p.get("name")?.as_str()?.to_owned(), p.get("id")?.as_u64()?)))
        .collect()
}

/// `(run_time_ns, run_cnt)` of program `id`: the kernel's statistics,
/// counted while `kernel.bpf_stats_enabled` is 1 (else both stay 0).
pub fn prog_run_stats(id: u64) -> (u64, u64) {
    let id = id.to_string();
    let json = bpftool_json(&["prog".as_ref(), "show".as_ref(), "id".as_ref(), id.as_ref()]);
    let field = |k: &str| json.get(k).and_then(Value::as_u64).unwrap_or(0);
    (field("run_time_ns"), field("run_cnt"))
}

/// What the interceptor attaches to a cgroup, as bpftool names the types.
pub const INTERCEPTOR: [&str; 4] = [
    "cgroup_getsockopt",
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_sock_ops",
];

/// The attach types bpftool lists for `cgroup`, sorted. (Only the types:
/// program names are empty when the agent ran without CAP_PERFMON, because
/// aya probes name support by loading a tracepoint program.)
pub fn attach_types(cgroup: &Path) -> Vec<String> {
    let mut types: Vec<String> = attached_programs(cgroup)
        .into_iter()
        .map(|(attach_type, _name)| attach_type)
        .collect();
    types.sort();
    types
}

/// Waits (up to 5 s) until nothing is attached to `cgroup` any more and
/// panics otherwise. The kernel releases a BPF link whose last reference
/// was a removed pin from a workqueue, not synchronously.
pub fn wait_detached(cgroup: &Path, context: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left = attach_types(cgroup);
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still attached to {}: {left:?}\n{context}",
            cgroup.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `bpftool OBJECT show pinned PATH` (`link` or `map`), and a reader of
/// its number fields.
fn show_pinned(object: &str, pinned: &Path) -> (Value, impl Fn(&Value, &str) -> u64) {
    let json = bpftool_json(&[
        object.as_ref(),
        "show".as_ref(),
        "pinned".as_ref(),
        pinned.as_os_str(),
    ]);
    let object = object.to_owned();
    let field = move |json: &Value, k: &str| {
        json.get(k)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("bpftool {object} show: no {k} in {json}"))
    };
    (json, field)
}

/// `(link id, program id)` of the link pinned at `pinned`.
pub fn pinned_link(pinned: &Path) -> (u64, u64) {
    let (json, field) = show_pinned("link", pinned);
    (field(&json, "id"), field(&json, "prog_id"))
}

/// The kernel's tag of program `id` (hex): the hash of its instructions.
pub fn prog_tag(id: u64) -> String {
    let id = id.to_string();
    let json = bpftool_json(&["prog".as_ref(), "show".as_ref(), "id".as_ref(), id.as_ref()]);
    json.get("tag")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("bpftool prog show: no tag in {json}"))
        .to_owned()
}

/// What `bpftool map show` says of the map pinned at `pinned`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFacts {
    pub id: u64,
    pub map_type: String,
    pub key_size: u64,
    pub value_size: u64,
    pub max_entries: u64,
}

pub fn pinned_map(pinned: &Path) -> MapFacts {
    let (json, field) = show_pinned("map", pinned);
    let field = |k: &str| field(&json, k);
    MapFacts {
        id: field("id"),
        map_type: json
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        key_size: field("bytes_key"),
        value_size: field("bytes_value"),
        max_entries: field("max_entries"),
    }
}

/// The keys of the map pinned at `pinned`, read as native-endian u64s
/// (the gate's network-namespace cookies).
pub fn map_keys_u64(pinned: &Path) -> Vec<u64> {
    let json = bpftool_json(&[
        "map".as_ref(),
        "dump".as_ref(),
        "pinned".as_ref(),
        pinned.as_os_str(),
    ]);
    let mut keys: Vec<u64> = json
        .as_array()
        .unwrap_or_else(|| panic!("bpftool map dump: expected an array, got {json}"))
        .iter()
        .map(|entry| {
            let bytes: Vec<u8> = entry["key"]
                .as_array()
                .unwrap_or_else(|| panic!("bpftool map dump: no key in {entry}"))
                .iter()
                .map(|b| {
                    let hex = b.as_str().unwrap_or_default().trim_start_matches("0x");
                    u8::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("key byte {b}: {e}"))
                })
                .collect();
            u64::from_ne_bytes(
                bytes
                    .try_into()
                    .unwrap_or_else(|k| panic!("not an 8-byte key: {k:?}")),
            )
        })
        .collect();
    keys.sort_unstable();
    keys
}

/// Creates a map pinned at `pinned` (`bpftool map create`), e.g. one laid
/// out as an older agent's.
pub fn map_create(pinned: &Path, map_type: &str, key: u32, value: u32, entries: u32, name: &str) {
    let (key, value, entries) = (key.to_string(), value.to_string(), entries.to_string());
    let mut args = vec![OsStr::new("map"), OsStr::new("create"), pinned.as_os_str()];
    args.extend(
        [
            "type", map_type, "key", &key, "value", &value, "entries", &entries, "name", name,
        ]
        .map(OsStr::new),
    );
    bpftool(args);
}
