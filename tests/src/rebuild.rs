//! Pins as an agent of another build leaves them: programs with other
//! instructions (another kernel tag) in the pinned links, reading the
//! pinned maps or maps laid out otherwise.
//!
//! [`rebuilt`] makes the other build from the agent's own eBPF object:
//! in each program, the final `r0 = 1` (the programs' "allow") encoded as
//! a 32-bit move, which sets r0 to the same value. The programs behave
//! exactly as before, so traffic keeps being redirected and served while
//! they are attached, but the kernel computes another tag for each, as it
//! would for a build from changed sources or another compiler.
//! [`swap_pinned_links`] loads such an object against the pinned maps
//! and makes each pinned link run its programs (BPF_LINK_UPDATE), which is
//! what a node shows after an agent of that build attached there.

use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{EbpfLoader, programs::Program};
use lattice_common::names;
use object::{Object as _, ObjectSection as _};

/// Sections of the object's programs.
const PROGRAM_SECTIONS: [&str; 4] = [
    "cgroup/connect4",
    "cgroup/connect6",
    "sockops",
    "cgroup/getsockopt",
];
const PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_SOCK_OPS,
    names::PROG_GETSOCKOPT,
];

/// `r0 = 1`: BPF_ALU64 | BPF_MOV | BPF_K, dst r0, immediate 1.
const MOV64_R0_1: [u8; 8] = [0xb7, 0, 0, 0, 1, 0, 0, 0];
/// `w0 = 1`: the same with BPF_ALU (32-bit; the upper half is zeroed).
const MOV32: u8 = 0xb4;

/// `object` with the last `r0 = 1` of every program encoded as `w0 = 1`.
pub fn rebuilt(object: &[u8]) -> Vec<u8> {
    let elf = object::File::parse(object).expect("the agent's eBPF object is an ELF file");
    let mut out = object.to_vec();
    for name in PROGRAM_SECTIONS {
        let section = elf
            .section_by_name(name)
            .unwrap_or_else(|| panic!("no section {name} in the eBPF object"));
        let (offset, size) = section
            .file_range()
            .unwrap_or_else(|| panic!("section {name} has no data"));
        let (offset, size) = (offset as usize, size as usize);
        let at = (0..size / 8)
            .rev()
            .map(|i| offset + 8 * i)
            .find(|&at| out[at..at + 8] == MOV64_R0_1)
            .unwrap_or_else(|| panic!("no `r0 = 1` in {name}"));
        out[at] = MOV32;
    }
    out
}

/// Loads `object`'s programs against the maps pinned in `pin_dir` (or,
/// for the names in `maps`, the map pinned at the path given there) and
/// makes the link pinned there for each program run it, in one step.
/// Returns `(program, new program id)`.
pub fn swap_pinned_links(
    object: &[u8],
    pin_dir: &Path,
    maps: &[(&str, &Path)],
) -> Vec<(&'static str, u32)> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = names::PINNED_MAPS
        .iter()
        .chain(std::iter::once(&"AYA_LOGS"))
        .map(|name| {
            let path = maps
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.to_path_buf())
                .unwrap_or_else(|| pin_dir.join(format!("map_{name}")));
            (*name, path)
        })
        .collect();
    for (name, path) in &paths {
        assert!(path.exists(), "{} is not pinned", path.display());
        loader.map_pin_path(name, path.as_path());
    }
    let level: u8 = 3;
    loader.override_global("AYA_LOG_LEVEL", &level, false);
    let mut ebpf = loader.load(object).expect("load the rebuilt eBPF object");
    PROGRAMS
        .iter()
        .map(|&name| {
            let program = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name}"));
            match program {
                Program::CgroupSockAddr(p) => p.load(),
                Program::SockOps(p) => p.load(),
                Program::CgroupSockopt(p) => p.load(),
                _ => panic!("{name}: unexpected program type"),
            }
            .unwrap_or_else(|e| panic!("load {name}: {e:?}"));
            let link_path = pin_dir.join(format!("link_{name}"));
            let link = obj_get(&link_path);
            let fd = program.fd().expect("a loaded program has a descriptor");
            link_update(link.as_fd(), fd.as_fd())
                .unwrap_or_else(|e| panic!("BPF_LINK_UPDATE {}: {e}", link_path.display()));
            (name, program.info().expect("program info").id())
        })
        .collect()
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a valid repr(C) bpf_attr member of the given size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn obj_get(path: &Path) -> OwnedFd {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    let attr = Attr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(7 /* BPF_OBJ_GET */, &attr)
        .unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", path.display()));
    // SAFETY: the kernel returned a new descriptor that we now own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn link_update(
    link: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
        _zero: [u64; 6],
    }
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
        _zero: [0; 6],
    };
    bpf(29 /* BPF_LINK_UPDATE */, &attr).map(drop)
}
