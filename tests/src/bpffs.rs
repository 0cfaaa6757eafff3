//! A private bpffs mount for `--pin`, so pins of one test never meet
//! another's. Unmounting it releases whatever is pinned there, which also
//! detaches pinned links the test left behind.
//!
//! [`MountNs`]: a mount namespace of the test's own whose `/sys/fs/bpf`
//! is a fresh bpffs (as on a node) or not a bpffs at all, for the node
//! agent's default `--pin` (`/sys/fs/bpf/lattice-node`), without touching
//! the machine's own `/sys/fs/bpf`.

use std::{
    ffi::OsString,
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

/// What [`MountNs`] mounts at `/sys/fs/bpf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysFsBpf {
    /// A fresh bpffs, as a node mounts it (and the DaemonSet's hostPath).
    Bpffs,
    /// A tmpfs: no bpffs there, as on a machine that never mounted one.
    NotBpffs,
}

/// A mount namespace of the test's own, kept alive by a bind mount of its
/// namespace file (so an agent killed and started again finds the same
/// bpffs, as on a node), with [`SysFsBpf`] at `/sys/fs/bpf`. Processes
/// enter it through [`MountNs::command_prefix`]. Dropping it unmounts the
/// namespace file: the namespace, and its bpffs with whatever is pinned
/// there, goes once no process is left in it.
pub struct MountNs {
    dir: PathBuf,
    /// `dir` is bind-mounted onto itself (private).
    bound: bool,
    /// `dir/mnt` holds the namespace.
    held: bool,
}

impl MountNs {
    pub fn new(sys_fs_bpf: SysFsBpf) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-mntns", unique_name()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut guard = Self {
            dir,
            bound: false,
            held: false,
        };
        // A namespace file can only be bound on a mount that does not
        // propagate: a private bind of the directory onto itself.
        crate::netns::run(
            Command::new("mount")
                .arg("--bind")
                .arg(&guard.dir)
                .arg(&guard.dir),
        );
        guard.bound = true;
        crate::netns::run(Command::new("mount").arg("--make-private").arg(&guard.dir));
        let file = guard.file();
        fs::write(&file, b"").unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
        let fstype = match sys_fs_bpf {
            SysFsBpf::Bpffs => "bpf",
            SysFsBpf::NotBpffs => "tmpfs",
        };
        crate::netns::run(
            Command::new("unshare")
                .arg(format!("--mount={}", file.display()))
                .args([
                    "--propagation",
                    "private",
                    "--",
                    "mount",
                    "-t",
                    fstype,
                    fstype,
                ])
                .arg("/sys/fs/bpf"),
        );
        guard.held = true;
        guard
    }

    fn file(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    /// `nsenter --mount=<namespace> --`: put before a command to run it
    /// in the namespace (its network namespace and cgroup stay as set).
    pub fn command_prefix(&self) -> Vec<OsString> {
        vec![
            "nsenter".into(),
            format!("--mount={}", self.file().display()).into(),
            "--".into(),
        ]
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        for (mounted, path) in [(self.held, self.file()), (self.bound, self.dir.clone())] {
            if mounted
                && umount2(&path, MntFlags::empty()).is_err()
                && let Err(e) = umount2(&path, MntFlags::MNT_DETACH)
            {
                eprintln!("lattice-tests: umount {}: {e}", path.display());
                return;
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lattice-tests: rm -r {}: {e}", self.dir.display());
        }
    }
}
