//! The agent's typed configuration, built once from the command line.

use ipnet::IpNet;

use std::path::PathBuf;

use crate::{
    bpf::{AgentExemption, InterceptConfig},
    cli::{InterceptArgs, Pin, ProxyArgs},
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cidr: at least one prefix is required")]
    NoPrefixes,
}

#[derive(Debug)]
pub struct RunConfig {
    pub intercept: InterceptConfig,
    /// Signing-proxy flags; resolved into `ProxyConfig` once the credential
    /// chain has told us the region.
    pub proxy: ProxyArgs,
    /// Attach only; a proxy of the user's own serves the port.
    pub intercept_only: bool,
    /// Skip the switch to the exempt UID (tests that need root afterwards).
    pub keep_privileges: bool,
}

impl RunConfig {
    /// `cgroup` comes from `run --cgroup` or from the sidecar's discovery.
    pub fn new(cgroup: PathBuf, i: &InterceptArgs, proxy: &ProxyArgs) -> Result<Self, ConfigError> {
        if i.cidrs.is_empty() {
            return Err(ConfigError::NoPrefixes);
        }
        let mut v4_prefixes = Vec::new();
        let mut v6_prefixes = Vec::new();
        for net in &i.cidrs {
            // Host bits set (10.0.0.1/8) mean the network they belong to.
            match net.trunc() {
                IpNet::V4(n) if !v4_prefixes.contains(&n) => v4_prefixes.push(n),
                IpNet::V6(n) if !v6_prefixes.contains(&n) => v6_prefixes.push(n),
                _ => {}
            }
        }
        Ok(Self {
            intercept: InterceptConfig {
                cgroup,
                v4_prefixes,
                v6_prefixes,
                proxy_port: i.proxy_port,
                exempt_uid: i.exempt_uid,
                exempt: AgentExemption::Uid,
                // Node mode has a default of its own (mode::node).
                pin: match &i.pin {
                    Some(Pin::Dir(dir)) => Some(dir.clone()),
                    Some(Pin::Off) | None => None,
                },
                held_by_cgroup: false,
                gate_by_netns: false,
            },
            proxy: proxy.clone(),
            intercept_only: i.intercept_only,
            keep_privileges: i.keep_privileges,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn run_config(args: &[&str]) -> RunConfig {
        let cli = Cli::try_parse_from(args).expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not `run`")
        };
        RunConfig::new(run.cgroup, &run.intercept, &run.proxy).expect("valid")
    }

    #[test]
    fn defaults_match_the_lattice_ranges() {
        let cfg = run_config(&["lattice-agent", "run", "--cgroup", "/cg"]);
        assert_eq!(cfg.intercept.proxy_port, 15080);
        assert_eq!(cfg.intercept.exempt_uid, 101);
        assert_eq!(
            cfg.intercept.v4_prefixes,
            vec!["169.254.171.0/24".parse().unwrap()]
        );
        assert_eq!(
            cfg.intercept.v6_prefixes,
            vec!["fd00:ec2:80::/64".parse().unwrap()]
        );
    }

    #[test]
    fn cidrs_are_split_by_family_and_truncated() {
        let cfg = run_config(&[
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--cidr",
            "10.1.2.3/8",
            "--cidr",
            "10.0.0.0/8",
            "--cidr",
            "fd00::1/64",
        ]);
        assert_eq!(
            cfg.intercept.v4_prefixes,
            vec!["10.0.0.0/8".parse().unwrap()]
        );
        assert_eq!(
            cfg.intercept.v6_prefixes,
            vec!["fd00::/64".parse().unwrap()]
        );
    }

    #[test]
    fn malformed_cidr_names_the_flag() {
        let err = Cli::try_parse_from([
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--cidr",
            "300.1.1.1/8",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--cidr"), "{err}");
    }

    #[test]
    fn pin_takes_a_directory_or_none() {
        let cfg = run_config(&["lattice-agent", "run", "--cgroup", "/cg"]);
        assert_eq!(cfg.intercept.pin, None);
        let cfg = run_config(&[
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--pin",
            "/sys/fs/bpf/x",
        ]);
        assert_eq!(cfg.intercept.pin, Some(PathBuf::from("/sys/fs/bpf/x")));
        let cfg = run_config(&["lattice-agent", "run", "--cgroup", "/cg", "--pin", "none"]);
        assert_eq!(cfg.intercept.pin, None);
        let err = Cli::try_parse_from(["lattice-agent", "run", "--cgroup", "/cg", "--pin", ""])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pin"), "{err}");
    }

    #[test]
    fn port_zero_is_rejected_naming_the_flag() {
        let err = Cli::try_parse_from([
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--proxy-port",
            "0",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--proxy-port"), "{err}");
    }
}
