//! Starting processes inside a pod: in its network namespace, in its cgroup,
//! as a given UID; and guards that never leave one running.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Builder for a process placed in a pod. Defaults: inside the netns,
/// inside the cgroup, as root.
#[derive(Debug, Clone)]
pub struct PodCommand {
    program: PathBuf,
    args: Vec<OsString>,
    netns: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    in_netns: bool,
    in_cgroup: bool,
    uid: Option<u32>,
    envs: Vec<(OsString, OsString)>,
}

impl PodCommand {
    /// `program` in the network namespace at `netns` (a /run/netns path)
    /// and the cgroup directory `cgroup`.
    pub fn new(program: impl AsRef<Path>, netns: &Path, cgroup: &Path) -> Self {
        Self::host(program).netns(netns).cgroup(cgroup)
    }

    /// `program` where this process is (its namespace and cgroup), until
    /// [`PodCommand::netns`] or [`PodCommand::cgroup`] place it.
    pub fn host(program: impl AsRef<Path>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            netns: None,
            cgroup: None,
            in_netns: false,
            in_cgroup: false,
            uid: None,
            envs: Vec::new(),
        }
    }

    /// Enter the network namespace at `path` (a /run/netns path).
    pub fn netns(mut self, path: &Path) -> Self {
        self.netns = Some(path.to_owned());
        self.in_netns = true;
        self
    }

    /// Join the cgroup directory `path`, also instead of the one the
    /// command was made for (e.g. a node agent placed in a pod's container
    /// cgroup, as a DaemonSet runs).
    pub fn cgroup(mut self, path: impl AsRef<Path>) -> Self {
        self.cgroup = Some(path.as_ref().to_owned());
        self.in_cgroup = true;
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable (on top of the inherited environment).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Run as this UID (and the GID of the same number, no supplementary
    /// groups): the interceptor decides by UID.
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Join the pod cgroup (default true): only its members are intercepted.
    pub fn in_cgroup(mut self, yes: bool) -> Self {
        self.in_cgroup = yes && self.cgroup.is_some();
        self
    }

    /// Enter the pod network namespace (default true).
    pub fn in_netns(mut self, yes: bool) -> Self {
        self.in_netns = yes && self.netns.is_some();
        self
    }

    /// A `Command` that starts placed as configured (stdin from /dev/null).
    ///
    /// The namespace and `cgroup.procs` are opened here, before fork: the
    /// child of a multi-threaded process may only make async-signal-safe
    /// calls, so `pre_exec` does nothing but raw syscalls on these fds.
    pub fn build(&self) -> Command {
        let netns_path = self.netns.as_ref().filter(|_| self.in_netns);
        let netns = netns_path.map(|path| {
            File::open(path).unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()))
        });
        let procs = self
            .cgroup
            .as_ref()
            .filter(|_| self.in_cgroup)
            .map(|cgroup| {
                let path = cgroup.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
            });
        let uid = self.uid;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(path) = netns_path {
            // Tells lattice-test-client which namespace the kit made for it.
            cmd.env("LATTICE_TEST_NETNS", path);
        }
        // SAFETY: the closure only calls async-signal-safe syscalls on fds
        // it owns and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // setns first: it needs CAP_SYS_ADMIN, which setuid drops.
                if let Some(ns) = &netns
                    && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                if let Some(procs) = &procs
                    && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(uid) = uid
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(uid, uid, uid) != 0
                        || libc::setresuid(uid, uid, uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Belt and braces should the test process die without
                // running destructors. Set last: a UID change clears it.
                // Note: it fires when the *thread* that spawned exits, so
                // spawn from the test's own thread, not a short-lived one.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd
    }

    fn describe(&self) -> String {
        let name = self
            .program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let args: Vec<_> = self.args.iter().map(|a| a.to_string_lossy()).collect();
        format!("{name} {}", args.join(" "))
    }

    /// Starts the process with stdout and stderr captured.
    pub fn spawn(&self) -> ChildGuard {
        ChildGuard::spawn(self.build(), self.describe())
    }

    /// Runs the process to completion; panics (after killing it) if it
    /// takes longer than `timeout`, so a test never hangs.
    pub fn run(&self, timeout: Duration) -> Output {
        let mut child = self.spawn();
        match child.wait_timeout(timeout) {
            Some(status) => child.output(status),
            None => panic!(
                "`{}` still running after {timeout:?}; output so far:\n{}",
                child.name,
                child.captured()
            ),
        }
    }
}

/// Runs `cmd` to completion (stdin from /dev/null) and returns its stdout;
/// panics with its stderr unless it exits 0. For set-up commands (`ip`,
/// `iptables`, `openssl`) whose failure means the test cannot mean anything.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies the program `from` to `to`, to be run from there. By `cp`, not
/// `fs::copy`: a process another test thread forks while this process holds
/// the copy open for writing would keep that descriptor until its exec, and
/// running the copy would then fail with ETXTBSY ("Text file busy").
pub fn copy_program(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg(from).arg(to));
}

/// What a finished process printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A running child. Drop kills (SIGKILL) and reaps it; stdout and stderr
/// are drained into buffers by threads (a full pipe would block the child)
/// and printed if the test is failing.
pub struct ChildGuard {
    child: Child,
    name: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command, name: String) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `{name}`: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            drain(child.stdout.take().expect("piped stdout"), stdout.clone()),
            drain(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Self {
            child,
            name,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Both streams, for failure messages.
    pub fn captured(&self) -> String {
        format!(
            "--- stdout of `{}` ---\n{}--- stderr ---\n{}",
            self.name,
            self.stdout(),
            self.stderr()
        )
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `stream` contains `needle`; panics with the output if the
    /// process exits first or `timeout` passes.
    pub fn wait_for(&mut self, stream: Stream, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = match stream {
                Stream::Stdout => self.stdout(),
                Stream::Stderr => self.stderr(),
            };
            if text.contains(needle) {
                return;
            }
            if let Some(status) = self.try_wait() {
                self.join_readers();
                panic!(
                    "`{}` exited ({status}) before printing {needle:?}:\n{}",
                    self.name,
                    self.captured()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{}` did not print {needle:?} within {timeout:?}:\n{}",
                self.name,
                self.captured()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a line of `stream` contains `needle` and returns that
    /// line from `needle` on (something else may have printed before it on
    /// the same line, e.g. libtest's `test name ... `). Panics as
    /// [`ChildGuard::wait_for`] does.
    pub fn wait_line(&mut self, stream: Stream, needle: &str, timeout: Duration) -> String {
        self.wait_for(stream, needle, timeout);
        // A line is complete once its newline arrived: wait for that too.
        let deadline = Instant::now() + timeout;
        loop {
            let text = match stream {
                Stream::Stdout => self.stdout(),
                Stream::Stderr => self.stderr(),
            };
            let start = text.find(needle).expect("seen above");
            if let Some(len) = text[start..].find('\n') {
                return text[start..start + len].to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "`{}` never ended its line {:?}:\n{}",
                self.name,
                &text[start..],
                self.captured()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes the child's stdin, if the command piped it: processes that
    /// stop gracefully at end of input (the verifier, the proxy child) stop.
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Sends `sig` and waits up to `grace` for the exit; then SIGKILL.
    /// Returns the exit status and whether the process exited in time.
    pub fn stop(&mut self, sig: i32, grace: Duration) -> (ExitStatus, bool) {
        self.signal(sig);
        match self.wait_timeout(grace) {
            Some(status) => {
                self.join_readers();
                (status, true)
            }
            None => (self.kill(), false),
        }
    }

    /// Sends a signal (the process may have exited already: ignored).
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: plain kill(2) on our own, not yet reaped, child: the pid
            // cannot have been reused.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for killed child");
        self.status = Some(status);
        self.join_readers();
        status
    }

    /// The collected output of an exited process (waits for the pipes to
    /// close so nothing printed last is lost).
    pub fn output(&mut self, status: ExitStatus) -> Output {
        self.join_readers();
        Output {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    fn join_readers(&mut self) {
        // The pipes close when the process and everything it forked have
        // exited; a grandchild keeping them open must not block us forever.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            match self.child.wait() {
                Ok(status) => self.status = Some(status),
                Err(e) => eprintln!("lattice-tests: waiting for `{}`: {e}", self.name),
            }
        }
        if std::thread::panicking() {
            self.join_readers();
            eprintln!("{}", self.captured());
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

fn drain(pipe: impl Read + Send + 'static, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        // Line by line, so waiters see output as soon as it is printed.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    })
}
