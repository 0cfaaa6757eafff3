//! Command line. Every flag can also be set from a `LATTICE_…` env var.

use std::{path::PathBuf, time::Duration};

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
    /// Kubernetes sidecar: find this pod's cgroup, then behave as `run`.
    Sidecar(SidecarArgs),
    /// Kubernetes node agent (DaemonSet): serve every annotated pod of this
    /// node, each with its own AWS identity.
    Node(NodeArgs),
    /// Check this binary on this machine without privileges: SigV4 and TLS
    /// crypto against known answers, the embedded eBPF object intact.
    SelfCheck,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes are intercepted (e.g. the pod's cgroup).
    #[arg(long, env = "LATTICE_CGROUP")]
    pub cgroup: PathBuf,
    #[command(flatten)]
    pub intercept: InterceptArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// UID of this pod (downward API `metadata.uid`).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: String,

    /// Where the node's cgroup v2 tree is mounted in this container (a
    /// hostPath mount of /sys/fs/cgroup).
    #[arg(long, env = "LATTICE_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// Detach the programs when the agent exits, crashes included: the
    /// pod's Lattice requests then leave unsigned until it is back. By
    /// default the pod's cgroup holds them, so they fail closed instead
    /// (refused) and go away with the pod.
    #[arg(long, env = "LATTICE_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
    #[command(flatten)]
    pub intercept: InterceptArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This node's name (downward API `spec.nodeName`): only pods scheduled
    /// here are served.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// kubeconfig file for the Kubernetes API; without it, the in-cluster
    /// configuration (the pod's service account).
    #[arg(long, env = "LATTICE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Where the node's cgroup v2 tree is mounted in this container (a
    /// hostPath mount of /sys/fs/cgroup). The programs attach once to the
    /// kubelet's pod tree under it (kubepods.slice or kubepods).
    #[arg(long, env = "LATTICE_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// The kubelet's root directory on the node (hostPath, read-only): pods'
    /// projected service-account tokens are read from <root>/pods/<uid>/volumes.
    #[arg(long, env = "LATTICE_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,

    /// The host's /proc (the container needs hostPID): a pod's network
    /// namespace is found through a process in its cgroup.
    #[arg(long, env = "LATTICE_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// A host directory the node's agents share (hostPath, mounted at the
    /// same path): the control socket through which a new agent takes the
    /// pods' listeners over from the one it replaces, and the socket the
    /// CNI plugin calls. Created if missing.
    #[arg(long, env = "LATTICE_RUN_DIR", default_value = "/var/run/lattice")]
    pub run_dir: PathBuf,

    /// The node's CNI configuration directory (hostPath of /etc/cni/net.d).
    /// When given, the agent chains its CNI plugin last into the runtime's
    /// plugin list there, so a pod is enrolled while its sandbox starts,
    /// before its first container runs; without it, once the API shows the
    /// pod running.
    #[arg(long, env = "LATTICE_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,

    /// Where the runtime looks for CNI plugins (hostPath of /opt/cni/bin);
    /// the plugin binary is copied there.
    #[arg(long, env = "LATTICE_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// The plugin binary to install [default: lattice-cni beside this
    /// executable, as in the image].
    #[arg(long, env = "LATTICE_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,

    /// What the plugin does when it cannot reach this agent (down,
    /// restarting): `fail` the pod's sandbox, which the kubelet retries, so
    /// no pod that may call VPC Lattice starts un-intercepted; or `ignore`,
    /// starting the pod, whose Lattice requests then leave unsigned until
    /// the agent enrolls it from the API.
    #[arg(long, env = "LATTICE_CNI_FAILURE_POLICY", value_enum, default_value_t = CniFailurePolicy::Fail)]
    pub cni_failure_policy: CniFailurePolicy,

    /// Namespaces whose pods start without asking the agent (comma
    /// separated): the system's, which must run for the agent to. The
    /// agent's own namespace (POD_NAMESPACE) is always exempt.
    #[arg(
        long,
        env = "LATTICE_CNI_EXEMPT_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub cni_exempt_namespaces: Vec<String>,

    /// Pods this agent can serve at once: the size of the kernel's table
    /// of enrolled network namespaces, fixed when that table is created
    /// (with --pin, on the agent's first start on the node). The default
    /// is far above the kubelet's pods-per-node limits.
    #[arg(long, env = "LATTICE_MAX_PODS", default_value_t = lattice_common::ENROLLED_CAPACITY, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_pods: u32,

    #[command(flatten)]
    pub intercept: InterceptArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Args)]
pub struct InterceptArgs {
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

    /// UID the agent switches to after attaching. With `run` and `sidecar`
    /// its connections are never intercepted (the iptables setup's
    /// contract), so the agent's own upstream connections pass, and so do
    /// an app's running as this UID. Node mode exempts the agent by its
    /// cgroup instead and intercepts this UID in pods like any other.
    #[arg(long, env = "LATTICE_EXEMPT_UID", default_value_t = 101)]
    pub exempt_uid: u32,

    /// bpffs directory to pin programs' links and maps in, or `none`:
    /// pinned, interception survives an agent crash (enrolled connects are
    /// refused until an agent serves again, never sent unsigned) and a
    /// restarted agent takes the pins over. Node mode pins by default, at
    /// /sys/fs/bpf/lattice-node (created; its parent must be a bpffs), and
    /// `none` is a choice it warns about; `run` and `sidecar` do not pin by
    /// default (see --detach-on-exit for the sidecar).
    #[arg(long, env = "LATTICE_PIN", value_parser = parse_pin)]
    pub pin: Option<Pin>,

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
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// SigV4 service name to sign for.
    #[arg(long, env = "LATTICE_SERVICE", default_value = "vpc-lattice-svcs")]
    pub service: String,

    /// Region to sign for; defaults to AWS_REGION / the AWS config's region.
    #[arg(long, env = "LATTICE_REGION")]
    pub region: Option<String>,

    /// Sign with SigV4A (ECDSA, region set `*`) instead of SigV4.
    #[arg(long, env = "LATTICE_SIGV4A")]
    pub sigv4a: bool,

    /// Assume this IAM role (STS AssumeRole) on top of the default credential chain.
    #[arg(long, env = "LATTICE_ROLE_ARN")]
    pub role_arn: Option<String>,

    /// Session name for --role-arn.
    #[arg(
        long,
        env = "LATTICE_ROLE_SESSION_NAME",
        default_value = "lattice-agent"
    )]
    pub role_session_name: String,

    /// Sign the body's SHA-256 instead of UNSIGNED-PAYLOAD. Buffers each
    /// request body, up to --max-signed-body (larger ones get 413).
    #[arg(long, env = "LATTICE_SIGN_PAYLOAD")]
    pub sign_payload: bool,

    /// Largest body buffered under --sign-payload (bytes; KiB/MiB/GiB suffixes allowed).
    #[arg(long, env = "LATTICE_MAX_SIGNED_BODY", default_value = "10MiB", value_parser = crate::config::units::parse_bytes)]
    pub max_signed_body: u64,

    /// Send every signed request over TLS to its original destination (the
    /// rule `*`, after any --upstream-tls-rule); SNI and the certificate
    /// name come from the request's Host.
    #[arg(long, env = "LATTICE_UPSTREAM_TLS")]
    pub upstream_tls: bool,

    /// Send matching signed requests over TLS: `SELECTOR[ => PORT]`, where
    /// SELECTOR is `*`, `port:N`, `cidr:PREFIX` or `host:NAME` (`host:*.SUFFIX`
    /// for any name ending in .SUFFIX), and PORT the upstream port (default:
    /// the one the app called). Repeat or separate with commas; the first
    /// match decides; no match: plain HTTP. E.g.
    /// `host:*.vpc-lattice-svcs.us-west-2.on.aws => 443`.
    #[arg(
        long = "upstream-tls-rule",
        env = "LATTICE_UPSTREAM_TLS_RULES",
        value_delimiter = ','
    )]
    pub upstream_tls_rules: Vec<String>,

    /// Extra PEM CA certificates trusted for TLS to upstreams (besides the
    /// webpki roots), e.g. an ACM Private CA's.
    #[arg(long, env = "LATTICE_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Upper bound on connecting (and TLS handshake) to the original destination.
    #[arg(long, env = "LATTICE_CONNECT_TIMEOUT", default_value = "5s", value_parser = crate::config::units::parse_duration)]
    pub connect_timeout: Duration,

    /// Upper bound from forwarding a request to its response headers (0 = none).
    #[arg(long, env = "LATTICE_REQUEST_TIMEOUT", default_value = "60s", value_parser = crate::config::units::parse_duration)]
    pub request_timeout: Duration,

    /// Close client and pooled upstream connections idle this long (HTTP:
    /// connections passed through are never closed for idleness).
    #[arg(long, env = "LATTICE_IDLE_TIMEOUT", default_value = "90s", value_parser = crate::config::units::parse_duration)]
    pub idle_timeout: Duration,

    /// How long a new connection may stay silent before the proxy connects
    /// to its destination, so that a server-first protocol (databases,
    /// SMTP) can greet. Whichever side then speaks first decides: the
    /// server makes it a pass-through, the client's first bytes are
    /// classified as always (HTTP is signed).
    #[arg(long, env = "LATTICE_SERVER_FIRST_WAIT", default_value = "50ms", value_parser = crate::config::units::parse_duration)]
    pub server_first_wait: Duration,

    /// On shutdown, how long in-flight requests may take to finish.
    #[arg(long, env = "LATTICE_DRAIN_TIMEOUT", default_value = "20s", value_parser = crate::config::units::parse_duration)]
    pub drain_timeout: Duration,

    /// Largest request head (request line and headers) accepted; larger gets 431.
    #[arg(long, env = "LATTICE_MAX_HEADER_BYTES", default_value = "64KiB", value_parser = crate::config::units::parse_bytes)]
    pub max_header_bytes: u64,

    /// Log each canonical request and string-to-sign (signature, security
    /// token and Authorization redacted).
    #[arg(long, env = "LATTICE_LOG_SIGNING")]
    pub log_signing: bool,

    /// Proxy worker threads. One (the default) serves a pod's traffic on a
    /// single thread, which keeps CPU per request lowest; raise it for pods
    /// that push more than one core's worth of requests. With `run` and
    /// `sidecar`, each connection is then served start to end by one of N
    /// single-threaded workers (handed out in turn), so requests still
    /// never wake another thread.
    #[arg(long, env = "LATTICE_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,

    /// Open client connections per pod (per workload). At the limit a new
    /// connection closes the oldest idle one (an HTTP connection with no
    /// request in flight, or one that has not sent a whole request head);
    /// only when none is idle does it wait, in the listen backlog.
    /// Connections passed through (TLS and other protocols) are never idle.
    #[arg(long, env = "LATTICE_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Address of the admin server: /healthz, /readyz, /metrics.
    #[arg(long, env = "LATTICE_ADMIN_ADDR", default_value = "127.0.0.1:15090")]
    pub admin_addr: std::net::SocketAddr,
}

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

/// `--pin`: a directory, or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    Dir(PathBuf),
    /// `--pin none`: not pinned.
    Off,
}

/// An empty `--pin`.
#[derive(Debug, thiserror::Error)]
#[error("a bpffs directory, or `none`")]
pub struct EmptyPin;

fn parse_pin(value: &str) -> Result<Pin, EmptyPin> {
    match value {
        "" => Err(EmptyPin),
        "none" => Ok(Pin::Off),
        dir => Ok(Pin::Dir(PathBuf::from(dir))),
    }
}

/// `--cni-failure-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CniFailurePolicy {
    Fail,
    Ignore,
}
