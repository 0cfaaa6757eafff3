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
