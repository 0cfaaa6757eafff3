//! The cgroup the agent runs in, which node mode exempts from interception
//! (`lattice_common::Config::exempt_cgroups`) in place of its UID: a pod
//! may run processes as any UID, but cannot move one into the agent's
//! cgroup. Every thread of the agent is in it, and so would be any other
//! process started in the agent's container.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::BpfError;

/// How deep below `--cgroup-root` the agent's cgroup is looked for (a
/// kubelet's container cgroup is at depth 4 under the systemd driver).
const MAX_DEPTH: usize = 8;

/// The cgroup v2 id of this process's cgroup, found under `cgroup_root`
/// (the node's cgroup v2 tree as mounted here), or None when this process
/// is not under it (then its connects never meet the programs).
///
/// `/proc/self/cgroup` names the cgroup relative to this process's cgroup
/// namespace, which a container usually has of its own; the directory is
/// therefore the one under `cgroup_root` ending with that path whose
/// `cgroup.procs` lists this process, or, under a private cgroup
/// namespace (where the path is `/`), the one found listing it.
pub fn own_cgroup_id(cgroup_root: &Path) -> Result<Option<u64>, BpfError> {
    let err = |source| BpfError::OwnCgroup {
        root: cgroup_root.to_owned(),
        source,
    };
    let proc_self_cgroup = fs::read_to_string("/proc/self/cgroup").map_err(err)?;
    let pid = std::process::id();
    let dir = match own_path(&proc_self_cgroup) {
        Some(relative) => by_suffix(cgroup_root, &relative, pid),
        None => None,
    }
    .or_else(|| search(cgroup_root, pid));
    match dir {
        Some(dir) => {
            // A cgroup's id is its directory's inode number on cgroup2
            // (64-bit kernfs inodes), what bpf_get_current_cgroup_id gives.
            let id = fs::metadata(&dir).map_err(err)?.ino();
            tracing::debug!(cgroup = %dir.display(), id, "the agent's own cgroup");
            Ok(Some(id))
        }
        None => Ok(None),
    }
}

/// The cgroup v2 path (`0::<path>`) of `/proc/self/cgroup`, relative.
fn own_path(proc_self_cgroup: &str) -> Option<PathBuf> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    Some(PathBuf::from(path.trim_start_matches('/')))
}

/// `cgroup_root/<a trailing part of relative>`, longest first, that holds
/// `pid` (`cgroup_root` may be mounted from anywhere in the hierarchy).
fn by_suffix(cgroup_root: &Path, relative: &Path, pid: u32) -> Option<PathBuf> {
    let parts: Vec<_> = relative.components().collect();
    (0..parts.len())
        .map(|skip| cgroup_root.join(parts[skip..].iter().collect::<PathBuf>()))
        .find(|dir| holds(dir, pid))
}

/// Breadth first under `cgroup_root`, to [`MAX_DEPTH`].
fn search(cgroup_root: &Path, pid: u32) -> Option<PathBuf> {
    let mut level = vec![cgroup_root.to_owned()];
    for _ in 0..=MAX_DEPTH {
        if let Some(found) = level.iter().find(|d| holds(d, pid)) {
            return Some(found.clone());
        }
        level = level
            .iter()
            .flat_map(|d| subdirs(d).unwrap_or_default())
            .collect();
    }
    None
}

fn subdirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Whether `dir/cgroup.procs` lists `pid` (in this process's PID
/// namespace, as the kernel translates it for the reader).
fn holds(dir: &Path, pid: u32) -> bool {
    fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_line_gives_the_path() {
        let v1_and_v2 = "12:pids:/x\n1:name=systemd:/y\n0::/kubepods.slice/a.scope\n";
        assert_eq!(
            own_path(v1_and_v2),
            Some(PathBuf::from("kubepods.slice/a.scope"))
        );
        assert_eq!(own_path("0::/\n"), Some(PathBuf::new()));
        assert_eq!(own_path("3:cpu:/x\n"), None);
    }

    /// A tree laid out like cgroupfs (plain files stand in for
    /// `cgroup.procs`): found by the trailing part of the path, else by
    /// looking for the directory listing the process.
    #[test]
    fn found_by_suffix_or_by_search() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("kubepods.slice/pod_a.slice/c.scope");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(root.path().join("cgroup.procs"), "1\n").unwrap();
        fs::write(leaf.join("cgroup.procs"), "7\n42\n").unwrap();
        let mounted_higher = Path::new("node-x/kubepods.slice/pod_a.slice/c.scope");
        assert_eq!(
            by_suffix(root.path(), mounted_higher, 42),
            Some(leaf.clone())
        );
        assert_eq!(by_suffix(root.path(), mounted_higher, 43), None);
        assert_eq!(search(root.path(), 42), Some(leaf));
        assert_eq!(search(root.path(), 1), Some(root.path().to_owned()));
        assert_eq!(search(root.path(), 43), None);
    }

    /// This test process, in whatever cgroup it runs: the id of the
    /// directory holding it, searched from the cgroup2 mount.
    #[test]
    fn this_process_has_a_cgroup_id() {
        let Some(mount) = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        else {
            eprintln!("no cgroup2 mount: skipped");
            return;
        };
        let id = own_cgroup_id(&mount)
            .unwrap()
            .expect("this process's cgroup");
        assert_ne!(id, 0);
    }
}
