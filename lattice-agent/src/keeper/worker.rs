//! Starting a worker: this same executable, with this process's flags and
//! environment and one more flag, `--worker-channel <fd>`, naming its end
//! of the channel to the parent (see [`super::protocol`]).

use std::{
    ffi::OsString,
    io,
    os::{
        fd::AsRawFd,
        unix::{net::UnixStream, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Command, Stdio},
};

use nix::unistd::Pid;

use crate::privilege::AmbientCaps;

/// How workers are started.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// This executable (`/proc/self/exe`: the very file this process runs,
    /// even if its path was replaced since).
    exe: PathBuf,
    argv0: OsString,
    /// This process's arguments (its configuration comes from the same
    /// flags and environment).
    args: Vec<OsString>,
    /// Raised as ambient capabilities in the worker, which starts as the
    /// parent's UID with exactly these (none when the parent stayed root).
    ambient: AmbientCaps,
}

/// A worker just started.
pub struct Spawned {
    pub pid: Pid,
    /// The parent's end of the channel.
    pub channel: UnixStream,
    /// The parent's end of the events socket.
    pub events: UnixStream,
    /// The worker's end of it, sent on its `shared`.
    pub worker_events: UnixStream,
}

impl WorkerCommand {
    /// Workers of this process: same executable, same arguments.
    pub fn of_this_process(ambient: AmbientCaps) -> Self {
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| "lattice-agent".into());
        Self {
            exe: PathBuf::from("/proc/self/exe"),
            argv0,
            args: args.collect(),
            ambient,
        }
    }

    /// Starts a worker. It dies with this process (`PR_SET_PDEATHSIG`,
    /// SIGKILL): a worker never serves without a parent holding its pods'
    /// sockets.
    pub fn spawn(&self) -> io::Result<Spawned> {
        let (channel, worker_channel) = UnixStream::pair()?;
        let (events, worker_events) = UnixStream::pair()?;
        let fd = worker_channel.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        let ambient = self.ambient.clone();
        // The parent blocks the signals it reads from a signalfd; a child
        // inherits that mask, and the worker handles SIGTERM itself.
        let mut unblocked = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given.
        let unblocked = unsafe {
            libc::sigemptyset(unblocked.as_mut_ptr());
            unblocked.assume_init()
        };
        let mut cmd = Command::new(&self.exe);
        cmd.arg0(&self.argv0)
            .args(&self.args)
            .arg("--worker-channel")
            .arg(fd.to_string())
            .stdin(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (sigprocmask, prctl, getppid, fcntl), nothing allocated.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sigprocmask(libc::SIG_SETMASK, &unblocked, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died before the line above: nothing would
                // ever kill this worker.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                ambient.raise()
            });
        }
        let child = cmd.spawn()?;
        drop(worker_channel);
        Ok(Spawned {
            pid: Pid::from_raw(child.id() as i32),
            channel,
            events,
            worker_events,
        })
    }
}
