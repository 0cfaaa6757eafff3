//! `node`: attach the interceptor once above every pod (gated by network
//! namespace), drop to the exempt UID keeping only what serving new pods
//! needs, then enroll and serve pods as the Kubernetes API reports them,
//! until SIGTERM/SIGINT.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use caps::Capability;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;

use crate::{
    admin,
    bpf::Interceptor,
    cli::{CniFailurePolicy, NodeArgs},
    config::RunConfig,
    metrics::Metrics,
    netns::NetNs,
    node::{
        NodeAgent, Startup,
        cni::{self, CniSettings},
        enroll::NodeContext,
        handover,
        identity::IdentityStore,
    },
    privilege, process,
    proxy::ProxyConfig,
    telemetry,
};

/// Flags of the single-workload modes that make no sense, or no safe
/// sense, when one agent serves every pod of the node.
fn refuse_flags(args: &NodeArgs) -> Result<(), NodeSetupError> {
    if args.intercept.intercept_only {
        return Err(NodeSetupError::InterceptOnly);
    }
    if args.proxy.role_arn.is_some() {
        return Err(NodeSetupError::RoleArn);
    }
    if args.proxy.sign_payload {
        return Err(NodeSetupError::SignPayload);
    }
    Ok(())
}

/// Capabilities the node agent keeps after attaching, to serve pods that
/// arrive later (measured: tests/tests/node_privilege.rs shows each is
/// needed): entering a pod's network namespace (`setns`) to create its
/// sockets, opening `/proc/<pid>/ns/net` of a pod's process (another
/// user's), and reading the kubelet's pod directories (root-only) for
/// projected tokens.
pub const KEPT_CAPABILITIES: [Capability; 3] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Kept as well with the CNI plugin (`--cni-conf-dir`): putting the plugin
/// back into the runtime's configuration when the node's CNI rewrites it
/// (a root-owned directory and file, replaced by a new file given back to
/// its owner).
pub const KEPT_FOR_CNI: [Capability; 2] = [Capability::CAP_DAC_OVERRIDE, Capability::CAP_CHOWN];

#[derive(Debug, thiserror::Error)]
pub enum NodeSetupError {
    #[error(
        "--intercept-only: node mode serves a proxy per pod; use `run` for a proxy of your own"
    )]
    InterceptOnly,
    #[error("--role-arn: node mode signs with each pod's own identity (IRSA or EKS Pod Identity)")]
    RoleArn,
    #[error(
        "--sign-payload: VPC Lattice does not support payload signing, and buffering \
         every body would let one pod hold the node agent's memory"
    )]
    SignPayload,
    #[error(
        "--cgroup-root {}: no kubelet pod tree under it (looked for {} and {}); \
         is it the host's cgroup v2 tree (hostPath /sys/fs/cgroup)?",
        root.display(), root.join("kubepods.slice").display(), root.join("kubepods").display()
    )]
    NoKubepods { root: PathBuf },
    #[error("--{flag} {}: {reason}", path.display())]
    Dir {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--run-dir {}", path.display())]
    RunDir {
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
}

pub fn serve(args: &NodeArgs) -> anyhow::Result<()> {
    refuse_flags(args)?;
    // Everything that can be checked is checked before attaching, while
    // still privileged (the kubeconfig may be readable by root only).
    let proxy = ProxyConfig::from_args(&args.proxy)?;
    check_dir("kubelet-root", &args.kubelet_root)?;
    check_dir("proc-root", &args.proc_root.join("self"))?;
    let kube_config = kube_config(args.kubeconfig.as_deref())?;
    prepare_run_dir(&args.run_dir)?;
    let admin = process::bind_admin(&args.proxy)?;
    let mut run = RunConfig::new(
        kubepods_root(&args.cgroup_root)?,
        &args.intercept,
        &args.proxy,
    )?;
    run.intercept.gate_by_netns = true;
    let home = Arc::new(NetNs::current()?);

    let mut interceptor = Interceptor::attach(&run.intercept)?;
    let logger = interceptor.take_logger();
    let gate = interceptor
        .take_gate()
        .context("the interceptor was attached without its netns gate")?;
    // A running agent (a rollout surges a new one beside it) hands over
    // the pods' listening sockets; none answers on a first start or after
    // a crash. Then this agent's own control socket takes the name, for
    // the agent that will replace it. Both as root: the run directory is
    // root's alone.
    let (predecessor, handed_over) = match handover::take_listeners(&args.run_dir) {
        Ok(Some((p, listeners))) => {
            tracing::info!(pods = listeners.len(), "taking over from the running agent");
            (Some(p), listeners)
        }
        Ok(None) => (None, handover::HandedOver::new()),
        Err(e) => {
            tracing::warn!(error = %crate::credentials::error_chain(&e), "could not take over from the running agent; binding new listeners beside its own");
            (None, handover::HandedOver::new())
        }
    };
    let control =
        handover::bind_control(&args.run_dir).map_err(|source| NodeSetupError::RunDir {
            path: args.run_dir.clone(),
            source,
        })?;
    let readiness = Arc::new(admin::Readiness::node());
    readiness.set_attached(true);
    let cni = match cni_settings(args)? {
        Some(settings) => {
            cni::install(&settings, &readiness)?;
            Some((cni::bind_socket(&args.run_dir)?, Arc::new(settings)))
        }
        None => None,
    };
    if !run.keep_privileges {
        let mut kept = KEPT_CAPABILITIES.to_vec();
        if cni.is_some() {
            kept.extend(KEPT_FOR_CNI);
        }
        privilege::drop_to(run.intercept.exempt_uid, &kept)?;
    }

    let runtime = process::runtime(args.proxy.workers)?;
    let served = runtime.block_on(async {
        if let Some(logger) = logger {
            telemetry::spawn_ebpf_log_forwarder(logger);
        }
        let client = kube::Client::try_from(kube_config).context("Kubernetes API client")?;
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let sts_http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let default_region = args
            .proxy
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| !r.is_empty());
        let ctx = NodeContext {
            proxy,
            proxy_port: run.intercept.proxy_port,
            cgroup_root: args.cgroup_root.clone(),
            kubelet_root: args.kubelet_root.clone(),
            proc_root: args.proc_root.clone(),
            home,
            gate,
            orig_dst: interceptor.orig_dst(),
            metrics: Arc::clone(&metrics),
            identities: IdentityStore::new(
                default_region,
                sts_http,
                Arc::clone(&metrics),
                shutdown.child_token(),
            ),
            handed_over: std::sync::Mutex::new(handed_over),
        };
        let (agent, watches) = NodeAgent::new(
            ctx,
            Startup {
                client,
                node_name: args.node_name.clone(),
                predecessor,
                control,
                cni,
                readiness: Arc::clone(&readiness),
            },
            &shutdown,
        );
        let admin_task = process::serve_admin(
            admin,
            Arc::clone(&readiness),
            Arc::clone(&metrics),
            Some(agent.report()),
            shutdown.clone(),
        )?;
        let agent_task = tokio::spawn(agent.run(watches, shutdown.clone()));

        let signal = process::shutdown_signal().await?;
        tracing::info!(
            signal,
            "shutting down: draining every pod's in-flight requests"
        );
        readiness.set_listening(false);
        shutdown.cancel();
        agent_task.await.context("node agent task")?;
        admin_task.await.context("admin task")?;
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    interceptor.detach();
    served
}

/// Creates `--run-dir` if missing, for root alone: only agents (root
/// until they have set up) talk through it.
fn prepare_run_dir(path: &Path) -> Result<(), NodeSetupError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| NodeSetupError::RunDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// The CNI plugin's settings, when `--cni-conf-dir` asks for it.
fn cni_settings(args: &NodeArgs) -> anyhow::Result<Option<CniSettings>> {
    let Some(conf_dir) = &args.cni_conf_dir else {
        return Ok(None);
    };
    check_dir("cni-conf-dir", conf_dir)?;
    check_dir("cni-bin-dir", &args.cni_bin_dir)?;
    let plugin = match &args.cni_plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context(
                "locating this executable, beside which lattice-cni is (or give --cni-plugin)",
            )?
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
fn kubepods_root(cgroup_root: &Path) -> Result<PathBuf, NodeSetupError> {
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|d| cgroup_root.join(d))
        .find(|p| p.is_dir())
        .ok_or_else(|| NodeSetupError::NoKubepods {
            root: cgroup_root.to_owned(),
        })
}

fn check_dir(flag: &'static str, path: &Path) -> Result<(), NodeSetupError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(NodeSetupError::Dir {
            flag,
            path: path.to_owned(),
            reason: "is not a directory".into(),
        }),
        Err(e) => Err(NodeSetupError::Dir {
            flag,
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// `--kubeconfig`, else the in-cluster service account. Read now, while
/// the files are readable; the client starts on the runtime.
fn kube_config(path: Option<&Path>) -> Result<kube::Config, NodeSetupError> {
    match path {
        Some(path) => {
            let err = |source| NodeSetupError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
            // A synchronous conversion: no exec plugins or refreshes needed
            // for a token or client-certificate kubeconfig.
            futures_executor(kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &KubeConfigOptions::default(),
            ))
            .map_err(err)
        }
        None => kube::Config::incluster().map_err(NodeSetupError::InCluster),
    }
}

/// Runs a future that does no I/O to completion on a throwaway runtime.
fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a bare current-thread runtime")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn node_args(flags: &[&str]) -> NodeArgs {
        let argv = [&["lattice-agent", "node", "--node-name", "n1"], flags].concat();
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Node(args) => args,
            _ => panic!("not `node`"),
        }
    }

    /// Each refused flag is named in the error, before anything is set up.
    #[test]
    fn single_workload_flags_are_refused_by_name() {
        assert!(refuse_flags(&node_args(&[])).is_ok());
        for (flag, extra) in [
            ("--intercept-only", &[][..]),
            ("--role-arn", &["arn:aws:iam::111122223333:role/r"][..]),
            ("--sign-payload", &[][..]),
        ] {
            let args = node_args(&[&[flag], extra].concat());
            let err = refuse_flags(&args).expect_err(flag).to_string();
            assert!(err.starts_with(&format!("{flag}:")), "{flag}: {err}");
        }
    }
}
