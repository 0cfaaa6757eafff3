//! The agent's typed configuration, built once from the parsed command
//! line. Flags stop here: every module below takes these types, none of
//! them knows clap or a flag's spelling, and every error that names a flag
//! is raised here.

pub mod units;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{
    bpf::{self, AgentExemption, BpfError, InterceptConfig},
    cli::{self, CniFailurePolicy, Command, InterceptArgs, Pin, ProxyArgs, TelemetryArgs},
    credentials::CredentialsConfig,
    node::cni::CniSettings,
    pod_cgroup::{self, PodCgroupError},
    proxy::{
        ProxyConfig,
        tls_rules::{TlsRuleError, TlsRules},
        upstream::{TlsConfigError, TlsConfigs},
    },
    sign::{Algorithm, SigningConfig},
    telemetry::{LogFormat, TelemetryConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cidr: at least one prefix is required")]
    NoPrefixes,
    #[error("--{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error("--ca-file")]
    CaFile(#[source] TlsConfigError),
    #[error(transparent)]
    TlsRule(#[from] TlsRuleError),
    #[error(
        "--intercept-only: node mode serves a proxy per pod; use `run` for a proxy of your own"
    )]
    InterceptOnlyInNodeMode,
    #[error("--role-arn: node mode signs with each pod's own identity (IRSA or EKS Pod Identity)")]
    RoleArnInNodeMode,
    #[error(
        "--sign-payload: VPC Lattice does not support payload signing, and buffering \
         every body would let one pod hold the node agent's memory"
    )]
    SignPayloadInNodeMode,
    #[error(
        "--cgroup-root {}: no kubelet pod tree under it (looked for {} and {}); \
         is it the host's cgroup v2 tree (hostPath /sys/fs/cgroup)?",
        root.display(), root.join("kubepods.slice").display(), root.join("kubepods").display()
    )]
    NoKubepods { root: PathBuf },
    #[error(
        "--pin {}{}: cannot pin there; mount a bpf filesystem there (the host's /sys/fs/bpf, \
         as the DaemonSet's hostPath does) or pass --pin none to run unpinned, accepting that \
         enrolled pods' requests to VPC Lattice leave unsigned while no agent runs",
        path.display(),
        if *default { " (node mode's default)" } else { "" }
    )]
    Pin {
        path: PathBuf,
        default: bool,
        #[source]
        source: Box<BpfError>,
    },
    #[error("--cgroup-root: finding this agent's own cgroup")]
    OwnCgroup(#[source] BpfError),
    #[error("--{flag} {}: is not a directory", path.display())]
    NotADirectory { flag: &'static str, path: PathBuf },
    #[error("--{flag} {}", path.display())]
    Dir {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no --kubeconfig and no in-cluster configuration (is this running in a pod with a service account?)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("--cni-plugin: locating this executable, beside which lattice-cni is")]
    CurrentExe(#[source] std::io::Error),
    #[error("--pod-uid {pod_uid}: finding the pod's cgroup under --cgroup-root")]
    OwnPodCgroup {
        pod_uid: String,
        #[source]
        source: PodCgroupError,
    },
    #[error("--log {filter:?}")]
    LogFilter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// What the process is to do.
#[derive(Debug)]
pub enum AgentConfig {
    /// `run` and `sidecar`: one workload, the process's own.
    Single(Box<SingleConfig>),
    /// `node`: every enrolled pod of the node.
    Node(Box<NodeConfig>),
    /// `self-check`: known-answer checks of this binary, no privileges.
    SelfCheck,
}

/// `run` and `sidecar`.
#[derive(Debug)]
pub struct SingleConfig {
    pub intercept: InterceptConfig,
    /// The signing proxy; `None` under `--intercept-only`, where a proxy of
    /// the user's own serves the port.
    pub serve: Option<ServeConfig>,
    /// Stay root after attaching (tests that need root afterwards).
    pub keep_privileges: bool,
}

/// One workload's signing proxy and what surrounds it.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The signing region may still be empty: the credential chain's
    /// region completes it.
    pub proxy: ProxyConfig,
    pub credentials: CredentialsConfig,
    pub admin_addr: SocketAddr,
    /// Proxy threads (`1`: the runtime's own thread).
    pub workers: u16,
}

/// `node`.
#[derive(Debug)]
pub struct NodeConfig {
    /// Attached once to the kubelet's pod tree, gated by network namespace.
    pub intercept: InterceptConfig,
    /// Every pod's proxy settings; the signing region is set per pod.
    pub proxy: ProxyConfig,
    pub admin_addr: SocketAddr,
    pub workers: u16,
    pub node_name: String,
    /// The Kubernetes API client's configuration, read while privileged.
    pub kube: kube::Config,
    pub cgroup_root: PathBuf,
    pub kubelet_root: PathBuf,
    pub proc_root: PathBuf,
    pub run_dir: PathBuf,
    /// The CNI plugin, when `--cni-conf-dir` asks for it.
    pub cni: Option<CniSettings>,
    /// The region of pods that set none: `--region`, else the agent's
    /// `AWS_REGION` / `AWS_DEFAULT_REGION`.
    pub default_region: Option<String>,
    pub keep_privileges: bool,
}

/// Logging, from the global flags.
pub fn telemetry(args: &TelemetryArgs) -> Result<TelemetryConfig, ConfigError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).map_err(|source| {
        ConfigError::LogFilter {
            filter: args.log.clone(),
            source,
        }
    })?;
    Ok(TelemetryConfig {
        filter,
        format: match args.log_format {
            cli::LogFormat::Text => LogFormat::Text,
            cli::LogFormat::Json => LogFormat::Json,
        },
    })
}

/// The configuration of the subcommand. Checks every flag, reads the files
/// they name (`--ca-file`, `--kubeconfig`) and, for `sidecar`, finds the
/// pod's cgroup: called first, while still privileged, so a bad flag never
/// leaves interception attached without a proxy, and root-only files stay
/// readable.
pub fn agent(command: &Command) -> Result<AgentConfig, ConfigError> {
    match command {
        Command::Run(args) => single(args.cgroup.clone(), &args.intercept, &args.proxy, false)
            .map(|c| AgentConfig::Single(Box::new(c))),
        Command::Sidecar(args) => {
            let cgroup = pod_cgroup::find_own_pod_cgroup(&args.cgroup_root, &args.pod_uid)
                .map_err(|source| ConfigError::OwnPodCgroup {
                    pod_uid: args.pod_uid.clone(),
                    source,
                })?;
            tracing::info!(cgroup = %cgroup.display(), pod_uid = %args.pod_uid, "found the pod's cgroup");
            // A sidecar restarted by the kubelet finds its programs still
            // attached and replaces them: no window where the pod's
            // requests leave unsigned.
            single(cgroup, &args.intercept, &args.proxy, !args.detach_on_exit)
                .map(|c| AgentConfig::Single(Box::new(c)))
        }
        Command::Node(args) => node(args).map(|n| AgentConfig::Node(Box::new(n))),
        Command::SelfCheck => Ok(AgentConfig::SelfCheck),
    }
}

fn single(
    cgroup: PathBuf,
    intercept: &InterceptArgs,
    proxy: &ProxyArgs,
    held_by_cgroup: bool,
) -> Result<SingleConfig, ConfigError> {
    let mut intercept_cfg = intercept_config(cgroup, intercept)?;
    intercept_cfg.held_by_cgroup = held_by_cgroup;
    let serve = if intercept.intercept_only {
        None
    } else {
        Some(serve_config(proxy)?)
    };
    Ok(SingleConfig {
        intercept: intercept_cfg,
        serve,
        keep_privileges: intercept.keep_privileges,
    })
}

fn node(args: &cli::NodeArgs) -> Result<NodeConfig, ConfigError> {
    if args.intercept.intercept_only {
        return Err(ConfigError::InterceptOnlyInNodeMode);
    }
    if args.proxy.role_arn.is_some() {
        return Err(ConfigError::RoleArnInNodeMode);
    }
    if args.proxy.sign_payload {
        return Err(ConfigError::SignPayloadInNodeMode);
    }
    let proxy = proxy_config(&args.proxy)?;
    check_dir("kubelet-root", &args.kubelet_root)?;
    check_dir("proc-root", &args.proc_root.join("self"))?;
    let kube = kube_config(args.kubeconfig.as_deref())?;
    let mut intercept = intercept_config(kubepods_root(&args.cgroup_root)?, &args.intercept)?;
    intercept.gate_by_netns = true;
    // The agent's UID (101) is also the default user of common images:
    // the agent's own upstream connects, made in pods' namespaces, are
    // told apart by its cgroup, which no pod can join.
    intercept.exempt = AgentExemption::Cgroup(
        bpf::own_cgroup_id(&args.cgroup_root).map_err(ConfigError::OwnCgroup)?,
    );
    intercept.pin = node_pin_dir(args.intercept.pin.as_ref())?;
    intercept.gate_capacity = args.max_pods;
    let default_region = args
        .proxy
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .filter(|r| !r.is_empty());
    Ok(NodeConfig {
        intercept,
        proxy,
        admin_addr: args.proxy.admin_addr,
        workers: args.proxy.workers,
        node_name: args.node_name.clone(),
        kube,
        cgroup_root: args.cgroup_root.clone(),
        kubelet_root: args.kubelet_root.clone(),
        proc_root: args.proc_root.clone(),
        run_dir: args.run_dir.clone(),
        cni: cni_settings(args)?,
        default_region,
        keep_privileges: args.intercept.keep_privileges,
    })
}

/// What to intercept and where to send it; `cgroup` is where the programs
/// attach.
fn intercept_config(cgroup: PathBuf, i: &InterceptArgs) -> Result<InterceptConfig, ConfigError> {
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
    Ok(InterceptConfig {
        cgroup,
        v4_prefixes,
        v6_prefixes,
        proxy_port: i.proxy_port,
        exempt_uid: i.exempt_uid,
        exempt: AgentExemption::Uid,
        // Node mode has a default of its own (see node_pin_dir).
        pin: match &i.pin {
            Some(Pin::Dir(dir)) => Some(dir.clone()),
            Some(Pin::Off) | None => None,
        },
        held_by_cgroup: false,
        gate_by_netns: false,
        gate_capacity: lattice_common::ENROLLED_CAPACITY,
    })
}

/// One workload's signing proxy, its credential chain and admin endpoint.
pub fn serve_config(proxy: &ProxyArgs) -> Result<ServeConfig, ConfigError> {
    Ok(ServeConfig {
        proxy: proxy_config(proxy)?,
        credentials: CredentialsConfig {
            region: proxy.region.clone(),
            role_arn: proxy.role_arn.clone(),
            role_session_name: Some(proxy.role_session_name.clone()),
        },
        admin_addr: proxy.admin_addr,
        workers: proxy.workers,
    })
}

/// `--pin` when not given in node mode: on the node's bpffs (the
/// DaemonSet mounts the host's /sys/fs/bpf there), so a crashed agent
/// leaves its pods failing closed, never unsigned.
pub const NODE_DEFAULT_PIN: &str = "/sys/fs/bpf/lattice-node";

/// Where node mode pins: `--pin`, else [`NODE_DEFAULT_PIN`]; checked (and
/// created) now, so an unusable one stops the agent naming the ways out.
/// None with `--pin none`.
fn node_pin_dir(pin: Option<&Pin>) -> Result<Option<PathBuf>, ConfigError> {
    let (dir, default) = match pin {
        Some(Pin::Off) => return Ok(None),
        Some(Pin::Dir(dir)) => (dir.clone(), false),
        None => (PathBuf::from(NODE_DEFAULT_PIN), true),
    };
    bpf::check_pin_dir(&dir).map_err(|source| ConfigError::Pin {
        path: dir.clone(),
        default,
        source: Box::new(source),
    })?;
    Ok(Some(dir))
}

/// The proxy's settings. The signing region is `--region` here, possibly
/// empty: the credential chain or each pod completes it.
fn proxy_config(args: &ProxyArgs) -> Result<ProxyConfig, ConfigError> {
    for (flag, zero) in [
        ("connect-timeout", args.connect_timeout.is_zero()),
        ("idle-timeout", args.idle_timeout.is_zero()),
        ("server-first-wait", args.server_first_wait.is_zero()),
        ("max-header-bytes", args.max_header_bytes == 0),
    ] {
        if zero {
            return Err(ConfigError::Zero { flag });
        }
    }
    if let Some(warning) = payload_signing_warning(args) {
        tracing::warn!("{warning}");
    }
    // `--upstream-tls` is the rule `*`, after any of the others.
    let mut tls_rules = TlsRules::parse(&args.upstream_tls_rules, "--upstream-tls-rule")?;
    if args.upstream_tls {
        tls_rules = tls_rules.then(TlsRules::everything());
    }
    // Built whatever the rules: in node mode a pod may bring its own.
    let tls = TlsConfigs::new(args.ca_file.as_deref()).map_err(ConfigError::CaFile)?;
    Ok(ProxyConfig {
        signing: SigningConfig {
            service: args.service.clone(),
            region: args.region.clone().unwrap_or_default(),
            algorithm: if args.sigv4a {
                Algorithm::SigV4a
            } else {
                Algorithm::SigV4
            },
        },
        sign_payload: args.sign_payload,
        max_signed_body: args.max_signed_body,
        tls_rules: Arc::new(tls_rules),
        tls,
        connect_timeout: args.connect_timeout,
        request_timeout: nonzero(args.request_timeout),
        idle_timeout: args.idle_timeout,
        server_first_wait: args.server_first_wait,
        drain_timeout: args.drain_timeout,
        max_header_bytes: args.max_header_bytes,
        log_signing: args.log_signing,
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        workers: None,
    })
}

/// The service name VPC Lattice verifies signatures for.
const LATTICE_SERVICE: &str = "vpc-lattice-svcs";

/// Why `--sign-payload` is likely a mistake for these flags, if it is.
fn payload_signing_warning(args: &ProxyArgs) -> Option<&'static str> {
    (args.sign_payload && args.service == LATTICE_SERVICE).then_some(
        "--sign-payload with service vpc-lattice-svcs: VPC Lattice does not support payload \
         signing (requests are signed with UNSIGNED-PAYLOAD); each request body is buffered \
         (up to --max-signed-body) only to be hashed",
    )
}

/// `0` means no limit.
fn nonzero(d: Duration) -> Option<Duration> {
    Some(d).filter(|d| !d.is_zero())
}

/// The CNI plugin's settings, when `--cni-conf-dir` asks for it.
fn cni_settings(args: &cli::NodeArgs) -> Result<Option<CniSettings>, ConfigError> {
    let Some(conf_dir) = &args.cni_conf_dir else {
        return Ok(None);
    };
    check_dir("cni-conf-dir", conf_dir)?;
    check_dir("cni-bin-dir", &args.cni_bin_dir)?;
    let plugin = match &args.cni_plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(ConfigError::CurrentExe)?
            .with_file_name(lattice_cni::conf::PLUGIN_TYPE),
    };
    let mut exempt = args.cni_exempt_namespaces.clone();
    if let Ok(own) = std::env::var("POD_NAMESPACE")
        && !own.is_empty()
        && !exempt.contains(&own)
    {
        exempt.push(own);
    }
    let policy = match args.cni_failure_policy {
        CniFailurePolicy::Fail => lattice_cni::conf::FailurePolicy::Fail,
        CniFailurePolicy::Ignore => lattice_cni::conf::FailurePolicy::Ignore,
    };
    Ok(Some(CniSettings {
        conf_dir: conf_dir.clone(),
        bin_dir: args.cni_bin_dir.clone(),
        plugin,
        entry: lattice_cni::conf::PluginConf::new(
            args.run_dir.join(lattice_cni::protocol::SOCKET_NAME),
            policy,
            exempt,
        ),
    }))
}

/// The kubelet's pod tree: `kubepods.slice` (systemd driver) or `kubepods`
/// (cgroupfs), where the programs attach once for every pod.
fn kubepods_root(cgroup_root: &Path) -> Result<PathBuf, ConfigError> {
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|d| cgroup_root.join(d))
        .find(|p| p.is_dir())
        .ok_or_else(|| ConfigError::NoKubepods {
            root: cgroup_root.to_owned(),
        })
}

fn check_dir(flag: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ConfigError::NotADirectory {
            flag,
            path: path.to_owned(),
        }),
        Err(source) => Err(ConfigError::Dir {
            flag,
            path: path.to_owned(),
            source,
        }),
    }
}

/// `--kubeconfig`, else the in-cluster service account. Read now, while
/// the files are readable; the client starts on the runtime.
fn kube_config(path: Option<&Path>) -> Result<kube::Config, ConfigError> {
    match path {
        Some(path) => {
            let err = |source| ConfigError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
            // A synchronous conversion: no exec plugins or refreshes needed
            // for a token or client-certificate kubeconfig.
            run_to_completion(kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &KubeConfigOptions::default(),
            ))
            .map_err(err)
        }
        None => kube::Config::incluster().map_err(ConfigError::InCluster),
    }
}

/// Runs a future that does no I/O to completion on a throwaway runtime.
fn run_to_completion<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a bare current-thread runtime")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn run_config(args: &[&str]) -> SingleConfig {
        let cli = Cli::try_parse_from(args).expect("parses");
        match agent(&cli.command).expect("valid") {
            AgentConfig::Single(cfg) => *cfg,
            other => panic!("not `run`: {other:?}"),
        }
    }

    fn config_error(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(args).expect("parses");
        crate::error_chain(&agent(&cli.command).unwrap_err())
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
        let serve = cfg.serve.expect("serves a proxy");
        assert_eq!(serve.admin_addr, "127.0.0.1:15090".parse().unwrap());
        assert_eq!(serve.workers, 1);
        assert_eq!(serve.proxy.signing.service, "vpc-lattice-svcs");
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
    fn intercept_only_serves_nothing() {
        let cfg = run_config(&[
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--intercept-only",
        ]);
        assert!(cfg.serve.is_none());
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

    #[test]
    fn zero_durations_and_sizes_name_their_flag() {
        for (flag, value) in [
            ("--connect-timeout", "0s"),
            ("--idle-timeout", "0"),
            ("--max-header-bytes", "0"),
        ] {
            let err = config_error(&["lattice-agent", "run", "--cgroup", "/cg", flag, value]);
            assert_eq!(err, format!("{flag} must be greater than zero"));
        }
    }

    #[test]
    fn a_missing_ca_file_names_the_flag() {
        let err = config_error(&[
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--upstream-tls",
            "--ca-file",
            "/nonexistent/ca.pem",
        ]);
        assert!(
            err.starts_with("--ca-file: /nonexistent/ca.pem: ") && err.contains("No such file"),
            "{err}"
        );
    }

    #[test]
    fn node_mode_refuses_flags_it_cannot_honour() {
        let node = ["lattice-agent", "node", "--node-name", "n1"];
        let with = |extra: &[&str]| {
            let mut args = node.to_vec();
            args.extend_from_slice(extra);
            config_error(&args)
        };
        assert!(with(&["--intercept-only"]).starts_with("--intercept-only:"));
        assert!(with(&["--role-arn", "arn:aws:iam::1:role/r"]).starts_with("--role-arn:"));
        assert!(with(&["--sign-payload"]).starts_with("--sign-payload:"));
    }

    /// What building the configuration of `run` with `flags` logs.
    fn logged_at_start(flags: &[&str]) -> String {
        use std::sync::{Arc, Mutex};

        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let out = Arc::clone(&out);
            move || Captured(Arc::clone(&out))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        let argv = [&["lattice-agent", "run", "--cgroup", "/cg"], flags].concat();
        tracing::subscriber::with_default(subscriber, || {
            run_config(&argv);
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn payload_signing_for_lattice_is_warned_about_at_start() {
        let log = logged_at_start(&["--sign-payload"]);
        assert!(
            log.contains("WARN") && log.contains("--sign-payload with service vpc-lattice-svcs"),
            "{log}"
        );
        // Another service may verify body hashes; without the flag there
        // is nothing to warn about.
        for flags in [&["--sign-payload", "--service", "execute-api"][..], &[]] {
            let log = logged_at_start(flags);
            assert!(!log.contains("WARN"), "{flags:?}: {log}");
        }
    }

    #[test]
    fn a_bad_log_filter_names_the_flag() {
        let cli = Cli::try_parse_from(["lattice-agent", "--log", "lattice=loud", "self-check"])
            .expect("parses");
        let err = telemetry(&cli.telemetry).unwrap_err().to_string();
        assert_eq!(err, "--log \"lattice=loud\"");
    }

    #[test]
    fn tls_rules_from_flags_and_upstream_tls_as_the_last_rule() {
        let run = |flags: &[&str]| {
            let mut argv = vec!["lattice-agent", "run", "--cgroup", "/cg"];
            argv.extend_from_slice(flags);
            run_config(&argv).serve.expect("serves a proxy").proxy
        };
        let cfg = run(&[
            "--upstream-tls-rule",
            "port:80 => 443,host:a.example",
            "--upstream-tls",
        ]);
        let lattice = |port| SocketAddr::from(([169, 254, 171, 33], port));
        assert_eq!(cfg.tls_rules.tls_port(lattice(80), "b.example"), Some(443));
        assert_eq!(cfg.tls_rules.tls_port(lattice(81), "b.example"), Some(81));
        assert!(run(&[]).tls_rules.is_empty());
    }

    #[test]
    fn a_bad_tls_rule_names_the_flag() {
        let err = config_error(&[
            "lattice-agent",
            "run",
            "--cgroup",
            "/cg",
            "--upstream-tls-rule",
            "https://svc",
        ]);
        assert!(
            err.starts_with("--upstream-tls-rule \"https://svc\": unknown selector"),
            "{err}"
        );
    }
}
