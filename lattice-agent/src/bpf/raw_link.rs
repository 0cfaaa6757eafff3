//! Cgroup attachments aya 0.14 does not make.
//!
//! - A pinnable link for the getsockopt program: aya cannot turn a
//!   `CgroupSockoptLink` into an `FdLink`, so it cannot be pinned. This
//!   creates the link with BPF_LINK_CREATE directly and pins it with
//!   BPF_OBJ_PIN; aya's `PinnedLink` then handles it like the others.
//! - A cgroup-held attachment (BPF_PROG_ATTACH, no link, no flags): the
//!   cgroup holds the program, not a file descriptor, so it stays attached
//!   when the agent exits (or crashes) and goes away with the cgroup.
//!   Attaching another program of the same type to the same cgroup the
//!   same way replaces it atomically.
//! - Swapping the program of a pinned link (BPF_LINK_UPDATE): the cgroup
//!   runs the old program or the new one, never neither.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use super::sys::bpf;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// BPF_LINK_UPDATE: only if the link still runs `old_prog_fd`'s program.
const BPF_F_REPLACE: u32 = 4;
/// `enum bpf_attach_type` values of the programs.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    // The kernel requires the unused tail of the attr union to be zero.
    _zero: [u32; 5],
}

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
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
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

/// Attaches `prog` to `cgroup` held by the cgroup itself (no link, no
/// flags), replacing a program of the same type attached the same way.
pub fn attach_held_by_cgroup(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &attr).map(drop)
}

/// Makes `link` run `new_prog` in one step; with `old_prog`, only in
/// place of that program (EPERM if the link runs another by then: another
/// agent swapped it meanwhile).
pub fn update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: old_prog.map_or(0, |_| BPF_F_REPLACE),
        old_prog_fd: old_prog.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}
