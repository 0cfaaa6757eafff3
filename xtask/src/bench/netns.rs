//! A network namespace of the bench's own. All traffic of a scenario stays
//! inside it: nginx listens on its `lo`, the iptables rules live in it, and
//! it is deleted (taking rules and addresses along) on drop.
//!
//! Commands enter it with `nsenter --net=PATH`; `ip netns exec` would
//! remount /sys and hide the cgroup2 mount.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::cmd;

pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates the namespace with `lo` up and `addrs` on it.
    pub fn new(name: &str, addrs: &[&str]) -> Result<Self> {
        cmd::read(Command::new("ip").args(["netns", "add", name]))?;
        // The guard exists from here on: a failure below still deletes it.
        let ns = Self {
            name: name.to_owned(),
            path: Path::new("/run/netns").join(name),
        };
        cmd::read(ns.command("ip").args(["link", "set", "lo", "up"]))?;
        for addr in addrs {
            cmd::read(ns.command("ip").args(["addr", "add", addr, "dev", "lo"]))?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// `program` run inside the namespace and, from its first instruction,
    /// in the cgroup `cgroup` (the shell moves itself there, then execs, so
    /// the pid we get is the program's own).
    pub fn command_in_cgroup(&self, cgroup: &Path, program: &str) -> Command {
        let mut cmd = self.command("sh");
        cmd.args([
            "-c",
            r#"echo 0 > "$1/cgroup.procs" && shift && exec "$@""#,
            "sh",
        ])
        .arg(cgroup)
        .arg(program);
        cmd
    }

    /// True while /run/netns/NAME exists.
    pub fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd::read(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("bench: {e:#}");
        }
    }
}
