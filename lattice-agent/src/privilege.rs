//! Dropping privileges after the programs are attached.
//!
//! Must run while the process is single-threaded: the capability bounding
//! set is per thread, so threads started earlier would keep theirs.

use caps::CapSet;
use nix::unistd::{Gid, Uid, getuid, setgroups, setresgid, setresuid};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("switching to UID {uid} (--exempt-uid)")]
    Switch {
        uid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("dropping capabilities: {0}")]
    Caps(String),
    #[error("capabilities still held after dropping them: {0:?}")]
    StillPrivileged(caps::CapsHashSet),
}

/// Becomes `uid` (and the group of the same number) with no capabilities
/// and no way to regain them. From then on the agent's own connections are
/// exempt from interception, and a compromise of the proxy gains nothing.
pub fn drop_to(uid: u32) -> Result<(), PrivilegeError> {
    let caps_err = |e: caps::errors::CapsError| PrivilegeError::Caps(e.to_string());
    // No setuid binary or file capability can hand privileges back.
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::Caps(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).map_err(caps_err)? {
        for cap in caps::all() {
            caps::drop(None, CapSet::Bounding, cap).map_err(caps_err)?;
        }
    }
    if getuid().as_raw() != uid {
        let switch = |source| PrivilegeError::Switch { uid, source };
        setgroups(&[]).map_err(switch)?;
        let gid = Gid::from_raw(uid);
        setresgid(gid, gid, gid).map_err(switch)?;
        let uid_ = Uid::from_raw(uid);
        setresuid(uid_, uid_, uid_).map_err(switch)?;
    }
    // A UID change from 0 clears them already; a non-root start may not.
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).map_err(caps_err)?;
    }
    let left = caps::read(None, CapSet::Permitted).map_err(caps_err)?;
    if !left.is_empty() {
        return Err(PrivilegeError::StillPrivileged(left));
    }
    tracing::info!(
        uid,
        "dropped privileges: running as the exempt UID with no capabilities"
    );
    Ok(())
}
