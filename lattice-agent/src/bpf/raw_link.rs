//! A pinnable cgroup link for the getsockopt program.
//!
//! aya 0.14 cannot turn a `CgroupSockoptLink` into an `FdLink`, so it cannot
//! be pinned. This creates the link with BPF_LINK_CREATE directly and pins it
//! with BPF_OBJ_PIN; aya's `PinnedLink` then handles it like the others.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_GETSOCKOPT.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    // The kernel requires the unused tail of the attr union to be zero.
    _zero: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised repr(C) struct of the given size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches `prog` to `cgroup` as a bpf_link and pins the link at `path`.
pub fn attach_and_pin(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    path: &Path,
) -> io::Result<()> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let pin = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &pin)?;
    // Dropping our fd is fine: the pin keeps the link (and attachment) alive.
    Ok(())
}
