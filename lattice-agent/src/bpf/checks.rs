//! Preconditions checked before touching the kernel, so failures name their
//! cause (a path, a capability) instead of surfacing as a bare errno.

use std::path::Path;

use caps::{CapSet, Capability};
use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

use super::BpfError;

/// `BPF_FS_MAGIC` from linux/magic.h (nix does not export it).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn cgroup_v2_dir(path: &Path) -> Result<(), BpfError> {
    let stat = statfs(path).map_err(|errno| BpfError::Cgroup {
        path: path.to_owned(),
        reason: match errno {
            nix::errno::Errno::ENOENT => "does not exist".to_owned(),
            other => other.desc().to_owned(),
        },
    })?;
    if !path.is_dir() {
        return Err(BpfError::Cgroup {
            path: path.to_owned(),
            reason: "is not a directory".to_owned(),
        });
    }
    let fs_type = stat.filesystem_type();
    if fs_type == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else if fs_type == CGROUP_SUPER_MAGIC {
        Err(BpfError::Cgroup {
            path: path.to_owned(),
            reason: "is a cgroup v1 hierarchy; cgroup BPF needs cgroup v2 (find it with `mount -t cgroup2`)".to_owned(),
        })
    } else {
        Err(BpfError::Cgroup {
            path: path.to_owned(),
            reason: "is not on a cgroup v2 filesystem".to_owned(),
        })
    }
}

/// `path` is a directory on a bpf filesystem; created when missing and its
/// parent is one (e.g. `/sys/fs/bpf/lattice-node` on a node's bpffs).
pub fn bpffs_dir(path: &Path) -> Result<(), BpfError> {
    if !path.exists()
        && let Some(parent) = path.parent()
        && is_bpffs(parent)
    {
        std::fs::create_dir(path).map_err(|e| BpfError::PinDir {
            path: path.to_owned(),
            reason: format!("creating it: {e}"),
        })?;
    }
    let stat = statfs(path).map_err(|errno| BpfError::PinDir {
        path: path.to_owned(),
        reason: errno.desc().to_owned(),
    })?;
    if !on_bpffs(&stat) {
        return Err(BpfError::PinDir {
            path: path.to_owned(),
            reason: "is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`)".to_owned(),
        });
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
    let effective = caps::read(None, CapSet::Effective).map_err(|e| BpfError::Capability {
        capability: "CAP_BPF",
        detail: format!("cannot read capabilities: {e}"),
    })?;
    let has = |cap| effective.contains(&cap);
    if !has(Capability::CAP_BPF) && !has(Capability::CAP_SYS_ADMIN) {
        return Err(BpfError::Capability {
            capability: "CAP_BPF",
            detail: "needed to load eBPF programs; run as root or grant CAP_BPF and CAP_NET_ADMIN"
                .to_owned(),
        });
    }
    if !has(Capability::CAP_NET_ADMIN) && !has(Capability::CAP_SYS_ADMIN) {
        return Err(BpfError::Capability {
            capability: "CAP_NET_ADMIN",
            detail: "needed to attach cgroup socket programs; run as root or grant CAP_NET_ADMIN"
                .to_owned(),
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
