//! `node`, the worker (see [`crate::keeper`]): started by the parent with
//! its channel (`--worker-channel`), it takes from the parent the maps,
//! the admin and CNI listeners and every pod the parent holds, drops to
//! the exempt UID with only the capabilities serving new pods needs, and
//! serves: the held pods at once, then every pod the Kubernetes API
//! reports, until stopped, replaced or left without a parent.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    sync::Arc,
};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::{AppError, BoundAddrs, ShutdownHandle, node::UNPINNED};
use crate::{
    admin,
    bpf::{NetnsGate, OrigDstMap},
    config::NodeConfig,
    keeper::protocol::{self, WorkerLink},
    metrics::Metrics,
    netns::NetNs,
    node::{NodeAgent, Startup, enroll::NodeContext, handover, identity::IdentityStore},
    privilege, process, telemetry,
};

/// A worker, given everything by its parent, its privileges dropped.
pub(super) struct Bound {
    cfg: NodeConfig,
    runtime: tokio::runtime::Runtime,
    keeper: Arc<WorkerLink>,
    gate: NetnsGate,
    orig_dst: Arc<OrigDstMap>,
    log_program: Option<u32>,
    home: Arc<NetNs>,
    admin: std::net::TcpListener,
    events: std::os::unix::net::UnixStream,
    handed_over: handover::HandedOver,
    cni: Option<std::os::unix::net::UnixListener>,
}

pub(super) fn build(cfg: NodeConfig, channel: i32) -> anyhow::Result<Bound> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(channel, libc::F_GETFD) } < 0 {
        return Err(AppError::WorkerChannel(std::io::Error::last_os_error()).into());
    }
    // SAFETY: the descriptor the parent left open for this process
    // (checked open above), owned by nothing else in it.
    let channel = unsafe { OwnedFd::from_raw_fd(channel) };
    let keeper = WorkerLink::new(channel).map_err(AppError::Keeper)?;
    let shared = keeper.shared().map_err(AppError::Keeper)?;
    let handed_over = keeper.take_pods().map_err(AppError::Keeper)?;
    let home = Arc::new(NetNs::current().map_err(AppError::HomeNetns)?);
    if !cfg.keep_privileges {
        privilege::drop_to(
            cfg.intercept.exempt_uid,
            &super::node::kept_capabilities(&cfg),
        )
        .map_err(AppError::Privileges)?;
    }
    // Set again (a change of credentials may clear it): the worker dies
    // with its parent. The parent answered above; if it is gone already,
    // the events socket's end of file stops this worker.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(AppError::DeathSignal(std::io::Error::last_os_error()).into());
    }
    let gate = NetnsGate::from_fd(shared.gate, shared.gate_capacity).map_err(AppError::Attach)?;
    let orig_dst = OrigDstMap::from_fd(shared.orig_dst)
        .map_err(|source| crate::bpf::BpfError::Map {
            name: lattice_common::names::ORIG_DST_BY_PEER,
            source,
        })
        .map_err(AppError::Attach)?;
    if let Some((previous, window)) = shared.previous_orig_dst
        && let Err(e) = orig_dst.read_previous_fd(previous, window)
    {
        tracing::warn!(error = %e, "the replaced programs' original-destination records cannot be read: connections they redirected that still wait to be accepted find no record");
    }
    let runtime = process::runtime(cfg.workers).map_err(AppError::Runtime)?;
    Ok(Bound {
        cfg,
        runtime,
        keeper: Arc::new(keeper),
        gate,
        orig_dst: Arc::new(orig_dst),
        log_program: shared.log_program,
        home,
        admin: shared.admin,
        events: shared.events,
        handed_over,
        cni: shared.cni,
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
            keeper,
            gate,
            orig_dst,
            log_program,
            home,
            admin,
            events,
            handed_over,
            cni,
        } = self;
        let readiness = Arc::new(admin::Readiness::node());
        readiness.set_attached(true);
        if cfg.intercept.pin.is_none() {
            readiness.add_warning(UNPINNED.to_owned());
        }
        let replaced = CancellationToken::new();
        let parent_gone = CancellationToken::new();
        protocol::watch_events(events, replaced.clone(), parent_gone.clone())
            .context("watching the parent's events")?;
        let served = runtime.block_on(async {
            if let Some(id) = log_program {
                match aya_log::EbpfLogger::init_from_id(id) {
                    Ok(logger) => telemetry::spawn_ebpf_log_forwarder(logger),
                    Err(e) => tracing::warn!(error = %e, "eBPF logs unavailable"),
                }
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
            let cni = cni.zip(cfg.cni.clone().map(Arc::new));
            let (agent, watches) = NodeAgent::new(
                ctx,
                Startup {
                    client,
                    node_name: cfg.node_name.clone(),
                    handed_over,
                    keeper,
                    replaced,
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

            let why = tokio::select! {
                why = stop.wait() => why?,
                () = parent_gone.cancelled() => "the parent is gone",
            };
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
        served
    }
}
