//! A cgroup v2 directory of the test's own (the "pod cgroup" the agent
//! attaches to), where cgroup v2 is mounted, and killing and removing a
//! whole subtree (the node fixture's kubelet-like tree).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The cgroup2 mount point, read from /proc/self/mountinfo: it is
/// /sys/fs/cgroup on most nodes but /sys/fs/cgroup/unified on hybrid
/// hosts like the dev VM, so it is never assumed.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo")
}

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/<name>`.
    pub fn new(name: &str) -> Self {
        let path = cgroup2_mount().join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// PIDs in the cgroup (not in sub-cgroups; the tests create none).
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills everything in the cgroup and waits until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), String> {
        // cgroup.kill (Linux >= 5.14) kills atomically, including processes
        // forked while we look; older kernels get one SIGKILL per listed pid.
        let kill_file = self.path.join("cgroup.kill");
        let atomic = kill_file.exists() && fs::write(&kill_file, "1").is_ok();
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("processes {pids:?} still in the cgroup"));
            }
            if !atomic {
                for pid in &pids {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all(Duration::from_secs(5)) {
            eprintln!("lattice-tests: cgroup {}: {e}", self.path.display());
        }
        // rmdir fails with EBUSY for a moment after the last process exits
        // (the cgroup is "populated" until the zombies are released): retry.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("lattice-tests: rmdir {}: {e}", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// A tree of cgroups the test owns: Drop kills every process in it and
/// removes its directories, leaves first.
pub struct CgroupTree {
    root: PathBuf,
    /// False when the root existed before (another guard's cgroup, such as
    /// a pod's): then only what was created below it is removed.
    owns_root: bool,
}

impl CgroupTree {
    /// Creates the cgroup `root` (its parent must exist).
    pub fn new(root: PathBuf) -> Self {
        fs::create_dir(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        Self {
            root,
            owns_root: true,
        }
    }

    /// The cgroups created below the existing cgroup `root` (e.g. a
    /// fixture pod's), so its owner can remove `root` itself afterwards.
    pub fn below(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            owns_root: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates `relative` (and its parents) below the root: real cgroups,
    /// since mkdir on cgroupfs creates one.
    pub fn mkdir(&self, relative: impl AsRef<Path>) -> PathBuf {
        let path = self.root.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let trees = if self.owns_root {
            vec![self.root.clone()]
        } else {
            fs::read_dir(&self.root)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        };
        for tree in trees {
            if let Err(e) = remove_tree(&tree, Duration::from_secs(5)) {
                eprintln!("lattice-tests: cgroup tree {}: {e}", tree.display());
            }
        }
    }
}

/// True while any process is in the cgroup at `path` or below it (the
/// `populated` key of `cgroup.events`). A cgroup that is gone is empty.
pub fn is_populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process in the cgroup at `path` and its descendants, and
/// waits until the subtree is empty.
pub fn kill_tree(path: &Path, timeout: Duration) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    // cgroup.kill kills the whole subtree at once, including processes
    // forked meanwhile; without it (Linux < 5.14) every listed pid is
    // signalled, again on each round.
    let atomic = fs::write(path.join("cgroup.kill"), "1").is_ok();
    let deadline = Instant::now() + timeout;
    loop {
        if !is_populated(path) {
            return Ok(());
        }
        let pids = tree_pids(path);
        if Instant::now() > deadline {
            return Err(format!(
                "{}: processes {pids:?} still in the subtree",
                path.display()
            ));
        }
        if !atomic {
            for pid in pids {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills everything in the subtree at `path`, then removes its directories
/// leaves first. Returns the first failure; the rest is still attempted.
pub fn remove_tree(path: &Path, timeout: Duration) -> Result<(), String> {
    let killed = kill_tree(path, timeout);
    let mut dirs = Vec::new();
    collect_dirs(path, &mut dirs);
    let deadline = Instant::now() + timeout;
    let mut result = killed;
    // Post-order: every child precedes its parent.
    for dir in dirs {
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // EBUSY for a moment after the last process of the cgroup
                // exited: retry.
                Err(e) if Instant::now() > deadline => {
                    if result.is_ok() {
                        result = Err(format!("rmdir {}: {e}", dir.display()));
                    }
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    result
}

/// `path` and every cgroup directory below it, children before parents.
fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    if path.is_dir() {
        out.push(path.to_owned());
    }
}

/// PIDs anywhere in the subtree at `path`.
fn tree_pids(path: &Path) -> Vec<i32> {
    let mut dirs = Vec::new();
    collect_dirs(path, &mut dirs);
    dirs.iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}
