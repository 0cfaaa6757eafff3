//! Dropping privileges after the programs are attached.
//!
//! Must run while the process is single-threaded: capability sets are per
//! thread, so threads started earlier would keep theirs.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, getuid, setgroups, setresgid, setresuid};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("switching to UID {uid} (--exempt-uid)")]
    Switch {
        uid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("dropping capabilities")]
    Caps(#[source] caps::errors::CapsError),
    #[error("prctl({option})")]
    Prctl {
        option: libc::c_int,
        #[source]
        source: std::io::Error,
    },
    #[error("capabilities {0:?} are needed after the privilege drop but were not granted")]
    NotGranted(Vec<Capability>),
    #[error("capabilities still held after dropping them: {0:?}")]
    StillPrivileged(CapsHashSet),
}

/// Becomes `uid` (and the group of the same number), keeping only the
/// capabilities in `keep` (none for `run` and `sidecar`; node mode keeps
/// what it needs to serve pods that arrive later) and no way to regain any
/// other. From then on the agent's own connections are exempt from
/// interception, and a compromise of the proxy gains only `keep`.
pub fn drop_to(uid: u32, keep: &[Capability]) -> Result<(), PrivilegeError> {
    let caps_err = PrivilegeError::Caps;
    let keep: CapsHashSet = keep.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err)?;
    let missing: Vec<Capability> = keep.difference(&permitted).copied().collect();
    if !missing.is_empty() {
        return Err(PrivilegeError::NotGranted(missing));
    }
    // No setuid binary or file capability can hand privileges back.
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(caps_err)? {
        for cap in caps::all().difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(caps_err)?;
        }
    }
    if getuid().as_raw() != uid {
        // Keeps the permitted set across the switch from root; the
        // effective set is cleared by it and raised again below.
        prctl(libc::PR_SET_KEEPCAPS, u64::from(!keep.is_empty()))?;
        let switch = |source| PrivilegeError::Switch { uid, source };
        setgroups(&[]).map_err(switch)?;
        let gid = Gid::from_raw(uid);
        setresgid(gid, gid, gid).map_err(switch)?;
        let uid_ = Uid::from_raw(uid);
        setresuid(uid_, uid_, uid_).map_err(switch)?;
        prctl(libc::PR_SET_KEEPCAPS, 0)?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(caps_err)?;
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err)?;
    let left = caps::read(None, CapSet::Permitted).map_err(caps_err)?;
    if left != keep {
        return Err(PrivilegeError::StillPrivileged(left));
    }
    if keep.is_empty() {
        tracing::info!(
            uid,
            "dropped privileges: running as the exempt UID with no capabilities"
        );
    } else {
        let mut kept: Vec<String> = keep.iter().map(ToString::to_string).collect();
        kept.sort();
        tracing::info!(
            uid,
            kept = %kept.join(","),
            "dropped privileges: running as the exempt UID with only the capabilities still needed"
        );
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: u64) -> Result<(), PrivilegeError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, arg, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::Prctl {
            option,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
