//! `run` and `sidecar`: one workload for the whole process. Bind the
//! proxy's listeners, attach the interceptor, drop privileges, serve until
//! SIGTERM/SIGINT, drain, detach.

use std::sync::Arc;

use anyhow::Context as _;

use crate::{
    admin,
    bpf::{Interceptor, NetnsOrigDst},
    config::RunConfig,
    credentials::{self, CredentialsCache, CredentialsConfig, WorkloadCredentials},
    metrics::{IdentityLabel, Metrics, WorkloadLabels},
    nat_orig_dst::WithNatFallback,
    netns::SocketFactory,
    privilege, process,
    proxy::{ProxyConfig, WorkloadProxy, workers::WorkerPool},
    telemetry,
    workload::{Listeners, Workload, bind_loopback},
};

/// Binds, attaches, drops privileges, then serves until SIGTERM/SIGINT:
/// stop accepting, drain, detach.
pub fn serve(cfg: RunConfig) -> anyhow::Result<()> {
    // Check the proxy's flags and bind before attaching: interception
    // without a working proxy would make every Lattice connection fail.
    // Doing it while still privileged also lets --admin-addr use a low port
    // and --ca-file be readable by root only.
    let serving = if cfg.intercept_only {
        None
    } else {
        let proxy = ProxyConfig::from_args(&cfg.proxy)?;
        let admin = process::bind_admin(&cfg.proxy)?;
        let listeners = bind_loopback(cfg.intercept.proxy_port, &SocketFactory::Current, false)?;
        Some((proxy, listeners, admin))
    };
    let mut interceptor = Interceptor::attach(&cfg.intercept)?;
    let logger = interceptor.take_logger();
    if !cfg.keep_privileges {
        privilege::drop_to(cfg.intercept.exempt_uid, &[])?;
    }

    // Built only now, so every runtime thread starts unprivileged. With
    // `--workers N`, connections are spread over N threads of their own
    // (proxy::workers); the main thread accepts, and serves the admin
    // endpoints and the credential refreshes.
    let runtime = process::runtime(1)?;
    let serving = match serving {
        Some((mut proxy, listeners, admin)) if cfg.proxy.workers > 1 => {
            let pool = WorkerPool::start(usize::from(cfg.proxy.workers))
                .context("starting the --workers threads")?;
            proxy.workers = Some(Arc::new(pool));
            Some((proxy, listeners, admin))
        }
        serving => serving,
    };
    let orig_dst = NetnsOrigDst {
        map: interceptor.orig_dst(),
        netns: 0,
    };
    let served = runtime.block_on(async {
        if let Some(logger) = logger {
            telemetry::spawn_ebpf_log_forwarder(logger);
        }
        match serving {
            None => {
                tracing::info!(
                    proxy_port = cfg.intercept.proxy_port,
                    "lattice-agent ready (intercept only)"
                );
                let signal = process::shutdown_signal().await?;
                tracing::info!(signal, "shutting down");
                Ok(())
            }
            Some((proxy, listeners, admin)) => {
                serve_proxy(&cfg, proxy, listeners, admin, orig_dst).await
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    interceptor.detach();
    served
}

/// The signing proxy and the admin server, until a signal and the drain.
async fn serve_proxy(
    cfg: &RunConfig,
    mut proxy_cfg: ProxyConfig,
    listeners: Listeners,
    admin: std::net::TcpListener,
    orig_dst: NetnsOrigDst,
) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let aws = credentials::default_chain(&CredentialsConfig {
        region: cfg.proxy.region.clone(),
        role_arn: cfg.proxy.role_arn.clone(),
        role_session_name: Some(cfg.proxy.role_session_name.clone()),
    })
    .await;
    proxy_cfg.resolve_region(aws.region)?;
    let creds = WorkloadCredentials::Cache(CredentialsCache::spawn(
        aws.provider,
        metrics.credentials(IdentityLabel::default()),
        shutdown.clone(),
    ));

    let readiness = Arc::new(admin::Readiness::single(creds.clone()));
    readiness.set_attached(true);
    let admin_task = process::serve_admin(
        admin,
        Arc::clone(&readiness),
        Arc::clone(&metrics),
        None,
        shutdown.clone(),
    )?;

    for l in &listeners.sockets {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "signing proxy listening");
        }
    }
    let workload = Workload::start(
        WorkloadProxy {
            cfg: Arc::new(proxy_cfg),
            sockets: SocketFactory::Current,
            // The app's namespace may still hold the iptables setup's
            // REDIRECT rules (a migration): served too.
            orig_dst: Arc::new(WithNatFallback(orig_dst)),
            creds,
            metrics: metrics.workload(WorkloadLabels::default()),
        },
        listeners,
    )
    .context("registering listeners")?;
    readiness.set_listening(true);
    tracing::info!(
        proxy_port = cfg.intercept.proxy_port,
        admin_addr = %cfg.proxy.admin_addr,
        "lattice-agent ready"
    );

    let signal = process::shutdown_signal().await?;
    tracing::info!(signal, "shutting down: draining in-flight requests");
    readiness.set_listening(false);
    workload.stop().await.context("proxy")?;
    shutdown.cancel();
    admin_task.await.context("admin task")?;
    Ok(())
}
