//! What /proc says about a process: its status fields, memory and CPU
//! time, for the tests' assertions and the benches' figures.

use std::{fs, io};

/// `/proc/<pid>/status`.
pub fn status(pid: i32) -> io::Result<String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
}

/// `/proc/<pid>/task/<tid>/status` of every thread of `pid` (at least one).
pub fn thread_statuses(pid: i32) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        match fs::read_to_string(entry?.path().join("status")) {
            Ok(status) => out.push(status),
            // A thread that ended between the listing and the read.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {}
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(io::Error::other(format!(
            "/proc/{pid}/task lists no thread"
        )));
    }
    Ok(out)
}

/// One `Name:` field of a status file, trimmed; None when absent.
pub fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// [`field`], panicking when it is absent.
pub fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    field(status, name).unwrap_or_else(|| panic!("{name} missing from status"))
}

fn kib(pid: i32, name: &str) -> io::Result<u64> {
    kib_field(&status(pid)?, name, &format!("/proc/{pid}/status"))
}

/// A `Name:   N kB` field of `text` (read from `path`, for the error).
fn kib_field(text: &str, name: &str, path: &str) -> io::Result<u64> {
    field(text, name)
        .and_then(|v| v.strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {name} in {path}")))
}

/// Memory only `pid` maps, bytes (`Private_Clean` + `Private_Dirty` of
/// `/proc/<pid>/smaps_rollup`): its RSS less the pages another process
/// maps too (the same executable's, say).
pub fn private_memory(pid: i32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path)?;
    Ok(
        (kib_field(&text, "Private_Clean", &path)? + kib_field(&text, "Private_Dirty", &path)?)
            * 1024,
    )
}

/// Resident set size now, bytes (`VmRSS`).
pub fn rss(pid: i32) -> io::Result<u64> {
    Ok(kib(pid, "VmRSS")? * 1024)
}

/// Peak resident set size, bytes (`VmHWM`): since the start, or since the
/// last [`reset_peak_rss`].
pub fn peak_rss(pid: i32) -> io::Result<u64> {
    Ok(kib(pid, "VmHWM")? * 1024)
}

/// Restarts the peak (VmHWM) from the current RSS (proc(5), clear_refs 5).
pub fn reset_peak_rss(pid: i32) -> io::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// Bytes as MiB, for figures.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// CPU time of all threads of `pid`, seconds: (user, system).
pub fn cpu_seconds(pid: i32) -> io::Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path)?;
    let malformed = || io::Error::other(format!("malformed {path}"));
    // The command name may hold spaces and parentheses: fields are counted
    // from the last ')'. After it come field 3 (state) onwards; utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').ok_or_else(malformed)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> io::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .ok_or_else(malformed)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        return Err(io::Error::other("sysconf(_SC_CLK_TCK) failed"));
    }
    let per_second = per_second as f64;
    Ok((tick(11)? / per_second, tick(12)? / per_second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        let text = status(me).unwrap();
        assert_eq!(field(&text, "Pid"), Some(me.to_string().as_str()));
        assert_eq!(field(&text, "NoSuchField"), None);
        let now = rss(me).unwrap();
        assert!(now > 0);
        // The peak is the highest RSS so far: at least what it was before.
        assert!(peak_rss(me).unwrap() >= now);
        let (user, system) = cpu_seconds(me).unwrap();
        assert!(user >= 0.0 && system >= 0.0);
        assert!(!thread_statuses(me).unwrap().is_empty());
        // Its heap and stack are its own: some private memory, never more
        // than it maps in all (give or take what other tests' threads
        // allocate or free between the two reads).
        let private = private_memory(me).unwrap();
        assert!(
            private > 0 && private <= rss(me).unwrap() + (64 << 20),
            "{private}"
        );
    }
}
