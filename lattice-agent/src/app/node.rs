//! `node`: attach the interceptor once above every pod (gated by network
//! namespace), take the pods' listeners over from a running agent if there
//! is one, drop to the exempt UID keeping only what serving new pods
//! needs; then enroll and serve pods as the Kubernetes API reports them,
//! until stopped.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use caps::Capability;
use tokio_util::sync::CancellationToken;

use super::{AppError, BoundAddrs, ShutdownHandle};
use crate::{
    admin,
    bpf::{Interceptor, NetnsGate},
    config::NodeConfig,
    metrics::Metrics,
    netns::NetNs,
    node::{
        NodeAgent, Startup,
        cni::{self, CniSettings},
        enroll::NodeContext,
        handover,
        identity::IdentityStore,
    },
    privilege, process, telemetry,
};

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

/// Logged at start and shown on `/readyz` with `--pin none`.
const UNPINNED: &str = "--pin none: the programs are not pinned and go with this agent: \
    while no agent runs (a crash, an update), enrolled pods' requests to VPC Lattice \
    leave unsigned; drop --pin none to fail closed instead";

/// A bound node agent: attached, the predecessor's listeners taken, the
/// control and CNI sockets bound, privileges dropped.
pub(super) struct Bound {
    cfg: NodeConfig,
    runtime: tokio::runtime::Runtime,
    interceptor: Interceptor,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    gate: NetnsGate,
    home: Arc<NetNs>,
    admin: std::net::TcpListener,
    readiness: Arc<admin::Readiness>,
    predecessor: Option<handover::Predecessor>,
    handed_over: handover::HandedOver,
    control: std::os::unix::net::UnixListener,
    cni: Option<(std::os::unix::net::UnixListener, Arc<CniSettings>)>,
}

pub(super) fn build(cfg: NodeConfig) -> anyhow::Result<Bound> {
    prepare_run_dir(&cfg.run_dir)?;
    if cfg.intercept.pin.is_none() {
        tracing::warn!("{UNPINNED}");
    }
    let admin = process::bind_admin(cfg.admin_addr).map_err(AppError::Admin)?;
    let home = Arc::new(NetNs::current().map_err(AppError::HomeNetns)?);

    let mut interceptor = Interceptor::attach(&cfg.intercept).map_err(AppError::Attach)?;
    let logger = interceptor.take_logger();
    let gate = interceptor.take_gate().ok_or(AppError::NoGate)?;
    // A running agent (a rollout surges a new one beside it) hands over
    // the pods' listening sockets; none answers on a first start or after
    // a crash. Then this agent's own control socket takes the name, for
    // the agent that will replace it. Both as root: the run directory is
    // root's alone.
    let (predecessor, handed_over) = match handover::take_listeners(&cfg.run_dir) {
        Ok(Some((p, listeners))) => {
            tracing::info!(pods = listeners.len(), "taking over from the running agent");
            (Some(p), listeners)
        }
        Ok(None) => (None, handover::HandedOver::new()),
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "could not take over from the running agent; binding new listeners beside its own");
            (None, handover::HandedOver::new())
        }
    };
    let control = handover::bind_control(&cfg.run_dir).map_err(|source| AppError::RunDir {
        path: cfg.run_dir.clone(),
        source,
    })?;
    let readiness = Arc::new(admin::Readiness::node());
    readiness.set_attached(true);
    if cfg.intercept.pin.is_none() {
        readiness.add_warning(UNPINNED.to_owned());
    }
    let cni = match &cfg.cni {
        Some(settings) => {
            cni::install(settings, &readiness).map_err(AppError::Cni)?;
            let socket = cni::bind_socket(&cfg.run_dir).map_err(AppError::Cni)?;
            Some((socket, Arc::new(settings.clone())))
        }
        None => None,
    };
    if !cfg.keep_privileges {
        let mut kept = KEPT_CAPABILITIES.to_vec();
        if cni.is_some() {
            kept.extend(KEPT_FOR_CNI);
        }
        privilege::drop_to(cfg.intercept.exempt_uid, &kept).map_err(AppError::Privileges)?;
    }
    // A gate the attach replaced may still gain namespaces from the agent
    // being replaced: copied from now on, not from the first enrollment.
    gate.start_following();
    let runtime = process::runtime(cfg.workers).map_err(AppError::Runtime)?;
    Ok(Bound {
        cfg,
        runtime,
        interceptor,
        logger,
        gate,
        home,
        admin,
        readiness,
        predecessor,
        handed_over,
        control,
        cni,
    })
}

impl Bound {
    pub(super) fn addrs(&self) -> BoundAddrs {
        BoundAddrs {
            proxy: Vec::new(),
            admin: self.admin.local_addr().ok(),
        }
    }

    pub(super) fn serve(self, stop: ShutdownHandle) -> anyhow::Result<()> {
        let Self {
            cfg,
            runtime,
            interceptor,
            logger,
            gate,
            home,
            admin,
            readiness,
            predecessor,
            handed_over,
            control,
            cni,
        } = self;
        let orig_dst = interceptor.orig_dst();
        let served = runtime.block_on(async {
            if let Some(logger) = logger {
                telemetry::spawn_ebpf_log_forwarder(logger);
            }
            let client =
                kube::Client::try_from(cfg.kube.clone()).context("Kubernetes API client")?;
            let shutdown = CancellationToken::new();
            let metrics = Arc::new(Metrics::new());
            let sts_http = aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https();
            let ctx = NodeContext {
                proxy: cfg.proxy.clone(),
                proxy_port: cfg.intercept.proxy_port,
                cgroup_root: cfg.cgroup_root.clone(),
                kubelet_root: cfg.kubelet_root.clone(),
                proc_root: cfg.proc_root.clone(),
                home,
                gate,
                orig_dst,
                metrics: Arc::clone(&metrics),
                identities: IdentityStore::new(
                    cfg.default_region.clone(),
                    sts_http,
                    Arc::clone(&metrics),
                    shutdown.child_token(),
                ),
            };
            let (agent, watches) = NodeAgent::new(
                ctx,
                Startup {
                    client,
                    node_name: cfg.node_name.clone(),
                    predecessor,
                    handed_over,
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

            let why = stop.wait().await?;
            tracing::info!(
                signal = why,
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
}

/// Creates the run directory if missing, for root alone: only agents
/// (root until they have set up) talk through it.
fn prepare_run_dir(path: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| AppError::RunDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}
