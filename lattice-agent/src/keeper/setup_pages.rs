//! The parent's resident set once it is set up. Setting up (parsing flags,
//! loading and attaching the eBPF programs, taking pods over from another
//! agent) runs most of this executable's code once; every code page it
//! touched stays mapped, and counted in the parent's RSS, although its loop
//! needs a small part of them. [`release`] drops the read-only pages of the
//! executable and its shared libraries from this process's page tables:
//! they stay in the page cache (the worker runs the same files and maps
//! them itself), and a page the parent needs again is mapped back from the
//! file on its next access, unchanged. Only segments the program never
//! writes are dropped: a read-only `PT_LOAD` holds exactly what the file
//! holds, unless it was written before being made read-only
//! (`PT_GNU_RELRO`), which is skipped; so is the vDSO, which is no file.
//! With glibc it also gives back the heap memory set-up freed, which glibc
//! keeps for later allocations (musl's allocator returns it by itself).

use std::ops::Range;

/// What [`release`] dropped: the read-only segments (bytes), and the
/// process's RSS before and after (KiB, from /proc/self/status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub segments_bytes: usize,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
}

/// Drops the read-only pages of the executable and its libraries from the
/// page tables, and with glibc trims the heap (see the module's comment).
/// Safe to call at any time, from any thread: other threads running that
/// code fault it back in.
pub fn release() -> std::io::Result<Released> {
    let rss_before_kib = rss_kib();
    let page = page_size();
    let mut segments_bytes = 0;
    for range in read_only_segments() {
        let Some(range) = whole_pages(range, page) else {
            continue;
        };
        let len = range.end - range.start;
        // SAFETY: the range lies in a read-only segment of this executable,
        // mapped privately from its file and never written (RELRO ranges
        // are left out): MADV_DONTNEED only unmaps its pages, to be mapped
        // again on the next access with the file's (identical) contents.
        let rc =
            unsafe { libc::madvise(range.start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        segments_bytes += len;
    }
    // SAFETY: malloc_trim has no preconditions; it only returns free heap
    // memory to the kernel.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(Released {
        segments_bytes,
        rss_before_kib,
        rss_after_kib: rss_kib(),
    })
}

/// The address ranges of the read-only `PT_LOAD` segments of the
/// executable and its shared libraries (the vDSO left out) that no
/// `PT_GNU_RELRO` range overlaps.
fn read_only_segments() -> Vec<Range<usize>> {
    let mut found = Segments::default();
    // SAFETY: the callback only reads the program headers it is given, for
    // the duration of the call, and writes into `found` through the
    // pointer passed alongside, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(each_object), (&raw mut found).cast());
    }
    found
        .read_only
        .into_iter()
        .filter(|seg| !found.relro.iter().any(|r| overlaps(seg, r)))
        .collect()
}

#[derive(Default)]
struct Segments {
    read_only: Vec<Range<usize>>,
    relro: Vec<Range<usize>>,
}

/// `dl_iterate_phdr`'s callback, for each loaded object (the executable
/// first); returning 0 goes on to the next.
unsafe extern "C" fn each_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid info for the duration of the
    // call, and `data` is the `Segments` given to it.
    let (info, found) = unsafe { (&*info, &mut *data.cast::<Segments>()) };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: dlpi_phdr points to dlpi_phnum program headers.
    let headers =
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    let range = |vaddr: usize, memsz: usize| {
        let start = (info.dlpi_addr as usize).wrapping_add(vaddr);
        start..start.saturating_add(memsz)
    };
    // SAFETY: getauxval has no preconditions (0 when there is no vDSO).
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    let is_vdso = headers.iter().any(|h| {
        h.p_type == libc::PT_LOAD && range(h.p_vaddr as usize, h.p_memsz as usize).contains(&vdso)
    });
    if is_vdso {
        return 0;
    }
    for h in headers {
        let segment = range(h.p_vaddr as usize, h.p_memsz as usize);
        match h.p_type {
            libc::PT_LOAD if h.p_flags & libc::PF_W == 0 => found.read_only.push(segment),
            libc::PT_GNU_RELRO => found.relro.push(segment),
            _ => {}
        }
    }
    0
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The whole pages inside `range` (its partial first and last pages may
/// hold another segment's bytes), if any.
fn whole_pages(range: Range<usize>, page: usize) -> Option<Range<usize>> {
    let start = range.start.checked_add(page - 1)? & !(page - 1);
    let end = range.end & !(page - 1);
    (start < end).then_some(start..end)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// `VmRSS` of /proc/self/status, in KiB.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_pages_rounds_inwards() {
        assert_eq!(whole_pages(0x1000..0x3000, 0x1000), Some(0x1000..0x3000));
        assert_eq!(whole_pages(0x1001..0x3fff, 0x1000), Some(0x2000..0x3000));
        assert_eq!(whole_pages(0x1001..0x1fff, 0x1000), None);
        assert_eq!(whole_pages(0x1001..0x2000, 0x1000), None);
    }

    #[test]
    fn finds_the_executables_and_libcs_text_and_no_relro_nor_vdso() {
        let segments = read_only_segments();
        let here = finds_the_executables_and_libcs_text_and_no_relro_nor_vdso as *const () as usize;
        assert!(
            segments.iter().any(|s| s.contains(&here)),
            "no read-only segment holds this function ({here:#x}): {segments:x?}"
        );
        #[cfg(target_env = "gnu")]
        {
            let in_libc = libc::getpid as *const () as usize;
            assert!(
                segments.iter().any(|s| s.contains(&in_libc)),
                "no read-only segment holds libc's getpid ({in_libc:#x}): {segments:x?}"
            );
        }
        // SAFETY: getauxval has no preconditions.
        let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
        assert!(
            vdso == 0 || !segments.iter().any(|s| s.contains(&vdso)),
            "the vDSO ({vdso:#x}) is among the segments: {segments:x?}"
        );
        let mut found = Segments::default();
        // SAFETY: as in read_only_segments.
        unsafe { libc::dl_iterate_phdr(Some(each_object), (&raw mut found).cast()) };
        for s in &segments {
            assert!(
                !found.relro.iter().any(|r| overlaps(s, r)),
                "{s:x?} is RELRO"
            );
        }
    }

    /// Dropping the pages loses nothing: code and constants read the same
    /// afterwards, and the resident set shrinks.
    #[test]
    fn released_pages_come_back_unchanged() {
        const TEXT: &str = "a constant the executable's read-only data holds";
        let digest = |s: &str| {
            s.bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        };
        let before = digest(TEXT);
        let released = release().expect("madvise");
        assert!(released.segments_bytes > 0, "{released:?}");
        assert_eq!(digest(TEXT), before);
        assert_eq!(
            format!("{:?}", std::hint::black_box(vec![1u8, 2, 3])),
            "[1, 2, 3]"
        );
        let (Some(rss_before), Some(rss_after)) = (released.rss_before_kib, released.rss_after_kib)
        else {
            panic!("no VmRSS: {released:?}");
        };
        assert!(rss_after < rss_before, "{released:?}");
    }
}
