//! Command line. Every flag can also be set from a `LATTICE_…` env var.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "lattice-agent",
    version,
    about = "Transparent SigV4 signing for Amazon VPC Lattice, intercepted with cgroup eBPF"
)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the interceptor to a cgroup and serve the signing proxy.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub intercept: InterceptArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Args)]
pub struct InterceptArgs {
    /// cgroup v2 directory whose processes are intercepted (e.g. the pod's cgroup).
    #[arg(long, env = "LATTICE_CGROUP")]
    pub cgroup: PathBuf,

    /// Destination prefix to intercept, IPv4 or IPv6; repeat for several.
    /// Defaults to the VPC Lattice ranges 169.254.171.0/24 and fd00:ec2:80::/64.
    #[arg(
        long = "cidr",
        env = "LATTICE_CIDRS",
        value_delimiter = ',',
        default_values_t = [
            "169.254.171.0/24".parse::<ipnet::IpNet>().expect("valid default"),
            "fd00:ec2:80::/64".parse::<ipnet::IpNet>().expect("valid default"),
        ]
    )]
    pub cidrs: Vec<ipnet::IpNet>,

    /// Loopback port the proxy listens on; intercepted connects are sent here.
    /// (The iptables setup used 8080, which clashes with many applications.)
    #[arg(long, env = "LATTICE_PROXY_PORT", default_value_t = 15080, value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,

    /// UID whose connections are never intercepted. The agent switches to
    /// this UID after attaching, so its own upstream connections pass.
    #[arg(long, env = "LATTICE_EXEMPT_UID", default_value_t = 101)]
    pub exempt_uid: u32,

    /// bpffs directory to pin programs' links and maps in: interception then
    /// survives an agent crash, and a restarted agent takes the pins over.
    #[arg(long, env = "LATTICE_PIN")]
    pub pin: Option<PathBuf>,

    /// Attach the interceptor but serve no proxy: for a proxy of your own
    /// that asks for the original destination with getsockopt(SO_ORIGINAL_DST).
    #[arg(long, env = "LATTICE_INTERCEPT_ONLY")]
    pub intercept_only: bool,

    /// Stay root after attaching (testing only): by default the agent switches
    /// to --exempt-uid and drops every capability.
    #[arg(long, env = "LATTICE_KEEP_PRIVILEGES", hide = true)]
    pub keep_privileges: bool,
}

/// Signing-proxy flags.
#[derive(Debug, Args)]
pub struct ProxyArgs {}

#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "LATTICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,lattice_agent=debug`).
    #[arg(long, env = "LATTICE_LOG", default_value = "info", global = true)]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
