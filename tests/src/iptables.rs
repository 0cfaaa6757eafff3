//! The iptables setup lattice replaces: the init container's NAT rules
//! that send a pod's TCP connects to the VPC Lattice range to the sigv4
//! proxy's port, except those of the proxy's own UID. The benches measure
//! it as a baseline and the tests check what proxies written for it rely on
//! (`SO_ORIGINAL_DST`). Only ever applied inside a network namespace the
//! caller created: the rules go with it.

use std::process::Command;

use crate::spawn::run_ok;

/// The init container's rules, for one address family.
#[derive(Debug, Clone)]
pub struct EgressProxyRules<'a> {
    /// `iptables` or `ip6tables`.
    pub program: &'a str,
    /// The destination range, e.g. `169.254.171.0/24`.
    pub prefix: &'a str,
    /// The proxy's port (`--to-ports`; 8080 in the iptables setup).
    pub to_port: u16,
    /// The proxy's UID, whose connects are left alone (101).
    pub exempt_uid: u32,
}

impl EgressProxyRules<'_> {
    /// The arguments of each `iptables` call, in order:
    ///
    /// ```text
    /// -t nat -N EGRESS_PROXY
    /// -t nat -A OUTPUT -p tcp -d <prefix> -j EGRESS_PROXY
    /// -t nat -A EGRESS_PROXY -m owner --uid-owner <uid> -j RETURN
    /// -t nat -A EGRESS_PROXY -p tcp -j REDIRECT --to-ports <port>
    /// ```
    pub fn args(&self) -> Vec<Vec<String>> {
        let uid = self.exempt_uid.to_string();
        let port = self.to_port.to_string();
        let rules: [&[&str]; 4] = [
            &["-t", "nat", "-N", "EGRESS_PROXY"],
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                self.prefix,
                "-j",
                "EGRESS_PROXY",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "EGRESS_PROXY",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-j",
                "RETURN",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "EGRESS_PROXY",
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ],
        ];
        rules
            .iter()
            .map(|rule| rule.iter().map(|a| (*a).to_owned()).collect())
            .collect()
    }

    /// Applies the rules in the calling thread's network namespace (one
    /// that thread unshared: children inherit it), panicking on failure.
    pub fn apply_here(&self) {
        for args in self.args() {
            run_ok(Command::new(self.program).args(&args));
        }
    }
}
