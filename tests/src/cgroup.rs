//! A cgroup v2 directory of the test's own (the "pod cgroup" the agent
//! attaches to), and where cgroup v2 is mounted.

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
