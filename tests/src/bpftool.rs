//! What the kernel says, via bpftool's JSON output: the agent's own
//! account of what it attached is not evidence.

use std::{path::Path, process::Command};

use serde_json::Value;

fn bpftool_json(args: &[&std::ffi::OsStr]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool (Debian package bpftool): {e}"));
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // bpftool prints nothing at all (not `[]`) for some empty listings.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(Vec::new());
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool {args:?}: unparsable JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
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
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(pinned)
        .arg("key")
        .args(hex(key))
        .arg("value")
        .args(hex(value))
        .output()
        .unwrap_or_else(|e| panic!("running bpftool (Debian package bpftool): {e}"));
    assert!(
        out.status.success(),
        "bpftool map update {}: {}: {}",
        pinned.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
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
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pinned)
        .args(["type", map_type, "key"])
        .arg(key.to_string())
        .arg("value")
        .arg(value.to_string())
        .arg("entries")
        .arg(entries.to_string())
        .args(["name", name])
        .output()
        .unwrap_or_else(|e| panic!("running bpftool (Debian package bpftool): {e}"));
    assert!(
        out.status.success(),
        "bpftool map create {}: {}: {}",
        pinned.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
