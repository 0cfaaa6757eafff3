//! Preconditions checked before touching the kernel, so failures name their
//! cause (a path, a capability) instead of surfacing as a bare errno.

use std::path::Path;

use caps::{CapSet, Capability};
use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

use super::BpfError;

/// Why `--cgroup` is not a cgroup v2 directory.
#[derive(Debug, thiserror::Error)]
pub enum CgroupDirError {
    #[error("does not exist")]
    Missing,
    #[error("statfs")]
    Stat(#[source] nix::errno::Errno),
    #[error("is not a directory")]
    NotADirectory,
    #[error(
        "is a cgroup v1 hierarchy; cgroup BPF needs cgroup v2 (find it with `mount -t cgroup2`)"
    )]
    CgroupV1,
    #[error("is not on a cgroup v2 filesystem")]
    NotCgroupV2,
    #[error("opening it")]
    Open(#[source] std::io::Error),
}

/// Why `--pin` is not a directory on a bpf filesystem.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error("creating it")]
    Create(#[source] std::io::Error),
    #[error("statfs")]
    Stat(#[source] nix::errno::Errno),
    #[error("is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`)")]
    NotBpffs,
}

/// `BPF_FS_MAGIC` from linux/magic.h (nix does not export it).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn cgroup_v2_dir(path: &Path) -> Result<(), BpfError> {
    let err = |problem| BpfError::Cgroup {
        path: path.to_owned(),
        problem,
    };
    let stat = statfs(path).map_err(|errno| match errno {
        nix::errno::Errno::ENOENT => err(CgroupDirError::Missing),
        other => err(CgroupDirError::Stat(other)),
    })?;
    if !path.is_dir() {
        return Err(err(CgroupDirError::NotADirectory));
    }
    let fs_type = stat.filesystem_type();
    if fs_type == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else if fs_type == CGROUP_SUPER_MAGIC {
        Err(err(CgroupDirError::CgroupV1))
    } else {
        Err(err(CgroupDirError::NotCgroupV2))
    }
}

/// `path` is a directory on a bpf filesystem; created when missing and its
/// parent is one (e.g. `/sys/fs/bpf/lattice-node` on a node's bpffs).
pub fn bpffs_dir(path: &Path) -> Result<(), BpfError> {
    let err = |problem| BpfError::PinDir {
        path: path.to_owned(),
        problem,
    };
    if !path.exists()
        && let Some(parent) = path.parent()
        && is_bpffs(parent)
    {
        std::fs::create_dir(path).map_err(|e| err(PinDirError::Create(e)))?;
    }
    let stat = statfs(path).map_err(|errno| err(PinDirError::Stat(errno)))?;
    if !on_bpffs(&stat) {
        return Err(err(PinDirError::NotBpffs));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| on_bpffs(&s))
}

// The field is i64 with glibc and u64 with musl: the cast is needed for one.
#[allow(clippy::unnecessary_cast)]
fn on_bpffs(stat: &nix::sys::statfs::Statfs) -> bool {
    stat.filesystem_type().0 as i64 == BPF_FS_MAGIC
}

/// Loading cgroup programs needs CAP_BPF, attaching them and loading
/// networking program types needs CAP_NET_ADMIN; the kernel accepts
/// CAP_SYS_ADMIN in place of either (node mode holds it anyway, for setns).
pub fn capabilities() -> Result<(), BpfError> {
    let effective = caps::read(None, CapSet::Effective).map_err(BpfError::Capabilities)?;
    let has = |cap| effective.contains(&cap);
    if !has(Capability::CAP_BPF) && !has(Capability::CAP_SYS_ADMIN) {
        return Err(BpfError::Capability {
            capability: "CAP_BPF",
            needed_for: "needed to load eBPF programs; run as root or grant CAP_BPF and \
                         CAP_NET_ADMIN",
        });
    }
    if !has(Capability::CAP_NET_ADMIN) && !has(Capability::CAP_SYS_ADMIN) {
        return Err(BpfError::Capability {
            capability: "CAP_NET_ADMIN",
            needed_for: "needed to attach cgroup socket programs; run as root or grant \
                         CAP_NET_ADMIN",
        });
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it where we may.
pub fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;

    /// The flag, the path, and what is wrong with it.
    #[test]
    fn a_cgroup_that_is_not_one_is_named_with_its_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert_eq!(
            error_chain(&cgroup_v2_dir(&missing).unwrap_err()),
            format!("--cgroup {}: does not exist", missing.display())
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            error_chain(&cgroup_v2_dir(&file).unwrap_err()),
            format!("--cgroup {}: is not a directory", file.display())
        );
        let not_bpffs = bpffs_dir(dir.path()).unwrap_err();
        assert_eq!(
            error_chain(&not_bpffs),
            format!(
                "--pin {}: is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`)",
                dir.path().display()
            )
        );
    }
}
