//! bpf(2) commands aya 0.14 does not expose for objects it did not load:
//! a program by id, what the kernel says about it (its tag, the maps it
//! reads), and maps read byte-wise whatever their key and value types.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Calls bpf(2) with `attr`, a `union bpf_attr` member laid out in full
/// (unused tail zeroed).
pub(super) fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised repr(C) struct of the given size;
    // pointers inside it point to buffers that outlive the call.
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

/// The leading fields of `struct bpf_prog_info` (the kernel fills as much
/// as the caller's size asks for).
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

/// The leading fields of `struct bpf_link_info`.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// A loaded program as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ProgFacts {
    pub id: u32,
    /// SHA-1 prefix of the program's instructions as loaded, with map
    /// references zeroed: equal for the same code, whatever maps it uses.
    pub tag: [u8; 8],
    pub map_ids: Vec<u32>,
}

/// A descriptor of the object (map, program, link) pinned at `path`.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `(link id, id of the program it runs)` of the link behind `link`.
pub(super) fn link_ids(link: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut info = LinkInfo::default();
    let attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok((info.id, info.prog_id))
}

/// A descriptor of the loaded program with this id.
pub(super) fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn prog_info(prog: BorrowedFd<'_>, info: &mut ProgInfo) -> io::Result<()> {
    let attr = InfoByFdAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: info as *mut ProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr).map(drop)
}

/// What the kernel says about the program behind `prog`.
pub(super) fn prog_facts(prog: BorrowedFd<'_>) -> io::Result<ProgFacts> {
    let mut info = ProgInfo::default();
    prog_info(prog, &mut info)?;
    let mut map_ids = vec![0u32; info.nr_map_ids as usize];
    if !map_ids.is_empty() {
        let count = map_ids.len() as u32;
        info = ProgInfo {
            nr_map_ids: count,
            map_ids: map_ids.as_mut_ptr() as u64,
            ..Default::default()
        };
        prog_info(prog, &mut info)?;
        map_ids.truncate(info.nr_map_ids.min(count) as usize);
    }
    Ok(ProgFacts {
        id: info.id,
        tag: info.tag,
        map_ids,
    })
}

/// The value under `key` (`value_size` bytes), or None.
pub(super) fn map_lookup(
    map: BorrowedFd<'_>,
    key: &[u8],
    value_size: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; value_size];
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value_or_next_key: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The keys of a hash map whose keys are `key_size` bytes, at most
/// `limit` of them (one syscall per key). A walk of a map being written
/// may yield a key twice or miss one added meanwhile (the kernel starts
/// over when the key it continues from was deleted), as any BPF map walk.
pub(super) fn map_keys(
    map: BorrowedFd<'_>,
    key_size: usize,
    limit: usize,
) -> io::Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    while keys.len() < limit {
        let mut next = vec![0u8; key_size];
        let attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            // Null: the first key.
            key: keys.last().map_or(0, |k| k.as_ptr() as u64),
            value_or_next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &attr) {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
    Ok(keys)
}
