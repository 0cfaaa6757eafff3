//! A private bpffs mount for `--pin`, so pins of one test never meet
//! another's. Unmounting it releases whatever is pinned there, which also
//! detaches pinned links the test left behind.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use nix::mount::{MntFlags, umount2};

use crate::unique_name;

pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    /// Mounts a fresh bpffs at `<tmp>/lat-<pid>-<n>-bpffs`.
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("{}-bpffs", unique_name()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let guard = Self { path };
        crate::spawn::run_ok(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&guard.path),
        );
        guard
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Busy (an agent still has it open): detach lazily; the kernel
        // finishes once the last user is gone.
        let mounted = is_mount_point(&self.path);
        if mounted
            && umount2(&self.path, MntFlags::empty()).is_err()
            && let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH)
        {
            eprintln!("lattice-tests: umount {}: {e}", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("lattice-tests: rmdir {}: {e}", self.path.display());
        }
    }
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return true; // try to unmount anyway
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(wanted.as_ref()))
}
