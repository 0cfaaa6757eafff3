//! The bench's cgroup v2 tree: `<mount>/lat-bench-…/{app,agent,upstream,empty}`.
//! `app` is the pod cgroup the load generator runs in; `empty` is where the
//! iptables scenario's agent attaches, so its programs see no traffic.
//! On drop every process in the tree is killed and the directories removed.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

const CHILDREN: [&str; 4] = ["app", "agent", "upstream", "empty"];

pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    pub fn new(name: &str) -> Result<Self> {
        let root = cgroup2_mount()?.join(name);
        fs::create_dir(&root).with_context(|| format!("mkdir {}", root.display()))?;
        let tree = Self { root };
        for child in CHILDREN {
            let dir = tree.root.join(child);
            fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        Ok(tree)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn app(&self) -> PathBuf {
        self.root.join("app")
    }
    pub fn agent(&self) -> PathBuf {
        self.root.join("agent")
    }
    pub fn upstream(&self) -> PathBuf {
        self.root.join("upstream")
    }
    pub fn empty(&self) -> PathBuf {
        self.root.join("empty")
    }

    fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in CHILDREN {
            let dir = self.root.join(child);
            // cgroup.kill (Linux >= 5.14) also catches processes forked while
            // we look; without it, SIGKILL each listed pid until empty.
            let atomic = fs::write(dir.join("cgroup.kill"), "1").is_ok();
            loop {
                let pids = pids(&dir);
                if pids.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("processes {pids:?} still in {}", dir.display());
                }
                if !atomic {
                    for pid in pids {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            eprintln!("bench: {e:#}");
        }
        for child in CHILDREN {
            let _ = fs::remove_dir(self.root.join(child));
        }
        if let Err(e) = fs::remove_dir(&self.root) {
            eprintln!("bench: rmdir {}: {e}", self.root.display());
        }
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// hybrid hosts), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo: the bench needs cgroup v2")
}
