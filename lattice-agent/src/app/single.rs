//! `run` and `sidecar`: one workload for the whole process. Bind the
//! proxy's listeners, attach the interceptor, drop privileges; then serve
//! until stopped, drain, detach.

use std::sync::Arc;

use anyhow::Context as _;

use super::{AppError, BoundAddrs, ShutdownHandle};
use crate::{
    admin,
    bpf::{Interceptor, NetnsOrigDst},
    config::{ServeConfig, SingleConfig},
    credentials::{self, CredentialsCache, WorkloadCredentials},
    metrics::{IdentityLabel, Metrics, WorkloadLabels},
    nat_orig_dst::WithNatFallback,
    netns::SocketFactory,
    orig_dst::OriginalDestination,
    privilege, process,
    proxy::{WorkloadProxy, workers::WorkerPool},
    telemetry,
    workload::{Listeners, Workload, bind_loopback},
};

/// A bound single-workload agent.
pub(super) struct Bound {
    runtime: tokio::runtime::Runtime,
    /// `None` without interception (the proxy-only entry).
    interceptor: Option<Interceptor>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    proxy_port: u16,
    /// `None` under `--intercept-only`.
    serving: Option<Serving>,
}

/// The proxy's half: bound, not yet serving.
struct Serving {
    cfg: ServeConfig,
    listeners: Listeners,
    admin: std::net::TcpListener,
    destinations: Arc<dyn OriginalDestination>,
    credentials: Option<aws_credential_types::Credentials>,
}

pub(super) fn build(cfg: SingleConfig) -> anyhow::Result<Bound> {
    // Bind before attaching: interception without a working proxy would
    // make every Lattice connection fail. Doing it while still privileged
    // also lets the admin endpoint use a low port.
    let bound = match &cfg.serve {
        None => None,
        Some(serve) => Some(bind(serve, cfg.intercept.proxy_port)?),
    };
    let mut interceptor = Interceptor::attach(&cfg.intercept).map_err(AppError::Attach)?;
    let logger = interceptor.take_logger();
    if !cfg.keep_privileges {
        privilege::drop_to(cfg.intercept.exempt_uid, &[]).map_err(AppError::Privileges)?;
    }
    // The app's namespace may still hold the iptables setup's REDIRECT
    // rules (a migration): served too.
    let destinations: Arc<dyn OriginalDestination> = Arc::new(WithNatFallback(NetnsOrigDst {
        map: interceptor.orig_dst(),
        netns: 0,
    }));
    let serving = cfg
        .serve
        .zip(bound)
        .map(|(cfg, (listeners, admin))| Serving {
            cfg,
            listeners,
            admin,
            destinations: Arc::clone(&destinations),
            credentials: None,
        });
    finish(Some(interceptor), logger, cfg.intercept.proxy_port, serving)
}

pub(super) fn build_proxy_only(
    cfg: ServeConfig,
    proxy_port: u16,
    destinations: Arc<dyn OriginalDestination>,
    credentials: Option<aws_credential_types::Credentials>,
) -> anyhow::Result<Bound> {
    let (listeners, admin) = bind(&cfg, proxy_port)?;
    finish(
        None,
        None,
        proxy_port,
        Some(Serving {
            cfg,
            listeners,
            admin,
            destinations,
            credentials,
        }),
    )
}

fn bind(cfg: &ServeConfig, port: u16) -> anyhow::Result<(Listeners, std::net::TcpListener)> {
    let admin = process::bind_admin(cfg.admin_addr).map_err(AppError::Admin)?;
    let listeners =
        bind_loopback(port, &SocketFactory::Current, false).map_err(AppError::Listen)?;
    Ok((listeners, admin))
}

/// The runtime, built only now so every thread starts unprivileged. With
/// `workers` > 1, connections are spread over threads of their own
/// (proxy::workers); the runtime's thread accepts, and serves the admin
/// endpoints and the credential refreshes.
fn finish(
    interceptor: Option<Interceptor>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    proxy_port: u16,
    mut serving: Option<Serving>,
) -> anyhow::Result<Bound> {
    let runtime = process::runtime(1).map_err(AppError::Runtime)?;
    if let Some(serving) = serving.as_mut()
        && serving.cfg.workers > 1
    {
        let pool =
            WorkerPool::start(usize::from(serving.cfg.workers)).map_err(AppError::Workers)?;
        serving.cfg.proxy.workers = Some(Arc::new(pool));
    }
    Ok(Bound {
        runtime,
        interceptor,
        logger,
        proxy_port,
        serving,
    })
}

impl Bound {
    pub(super) fn addrs(&self) -> BoundAddrs {
        match &self.serving {
            None => BoundAddrs {
                proxy: Vec::new(),
                admin: None,
            },
            Some(s) => BoundAddrs {
                proxy: s
                    .listeners
                    .sockets
                    .iter()
                    .filter_map(|l| l.local_addr().ok())
                    .collect(),
                admin: s.admin.local_addr().ok(),
            },
        }
    }

    pub(super) fn serve(self, shutdown: ShutdownHandle) -> anyhow::Result<()> {
        let Self {
            runtime,
            interceptor,
            logger,
            proxy_port,
            serving,
        } = self;
        let served = runtime.block_on(async {
            if let Some(logger) = logger {
                telemetry::spawn_ebpf_log_forwarder(logger);
            }
            match serving {
                None => {
                    tracing::info!(proxy_port, "lattice-agent ready (intercept only)");
                    let why = shutdown.wait().await?;
                    tracing::info!(signal = why, "shutting down");
                    Ok(())
                }
                Some(serving) => serving.serve(proxy_port, shutdown).await,
            }
        });
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        if let Some(interceptor) = interceptor {
            interceptor.detach();
        }
        served
    }
}

impl Serving {
    /// The signing proxy and the admin server, until stopped and drained.
    async fn serve(self, proxy_port: u16, shutdown: ShutdownHandle) -> anyhow::Result<()> {
        let Self {
            cfg,
            listeners,
            admin,
            destinations,
            credentials,
        } = self;
        let ServeConfig {
            mut proxy,
            credentials: chain,
            admin_addr,
            ..
        } = cfg;
        let stop = tokio_util::sync::CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let cache = match credentials {
            Some(fixed) => CredentialsCache::fixed(fixed),
            None => {
                let aws = credentials::default_chain(&chain).await;
                if proxy.signing.region.is_empty() {
                    proxy.signing.region = aws
                        .region
                        .filter(|r| !r.is_empty())
                        .ok_or(AppError::NoRegion)?;
                }
                CredentialsCache::spawn(
                    aws.provider,
                    metrics.credentials(IdentityLabel::default()),
                    stop.clone(),
                )
            }
        };
        if proxy.signing.region.is_empty() {
            return Err(AppError::NoRegion.into());
        }
        let creds = WorkloadCredentials::Cache(cache);

        let readiness = Arc::new(admin::Readiness::single(creds.clone()));
        readiness.set_attached(true);
        let admin_task = process::serve_admin(
            admin,
            Arc::clone(&readiness),
            Arc::clone(&metrics),
            None,
            stop.clone(),
        )?;

        for l in &listeners.sockets {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "signing proxy listening");
            }
        }
        let workload = Workload::start(
            WorkloadProxy {
                cfg: Arc::new(proxy),
                sockets: SocketFactory::Current,
                orig_dst: destinations,
                creds,
                metrics: metrics.workload(WorkloadLabels::default()),
            },
            listeners,
        )
        .context("registering listeners")?;
        readiness.set_listening(true);
        tracing::info!(proxy_port, admin_addr = %admin_addr, "lattice-agent ready");

        let why = shutdown.wait().await?;
        tracing::info!(signal = why, "shutting down: draining in-flight requests");
        readiness.set_listening(false);
        workload.stop().await;
        stop.cancel();
        admin_task.await.context("admin task")?;
        Ok(())
    }
}
