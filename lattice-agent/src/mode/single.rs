//! `run` and `sidecar`: bind the proxy's listeners, attach the
//! interceptor, drop privileges, serve until SIGTERM/SIGINT, drain, detach.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use anyhow::Context as _;

use tokio_util::sync::CancellationToken;

use crate::{
    admin,
    bpf::Interceptor,
    cli::{RunArgs, SidecarArgs},
    config::RunConfig,
    credentials::{self, CredentialsCache, CredentialsConfig},
    metrics::Metrics,
    orig_dst::OriginalDestination,
    pod_cgroup, privilege,
    proxy::{self, ProxyConfig},
    telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("--proxy-port {port}: port already in use on {addr}")]
    PortInUse { port: u16, addr: SocketAddr },
    #[error("--proxy-port {port}: binding {addr}")]
    Bind {
        port: u16,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// `run`: the interceptor on `--cgroup`.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    serve(RunConfig::new(
        args.cgroup.clone(),
        &args.intercept,
        &args.proxy,
    )?)
}

/// `sidecar`: the interceptor on this pod's own cgroup.
pub fn sidecar(args: &SidecarArgs) -> anyhow::Result<()> {
    let cgroup = pod_cgroup::find_own_pod_cgroup(&args.cgroup_root, &args.pod_uid)?;
    tracing::info!(cgroup = %cgroup.display(), pod_uid = %args.pod_uid, "found the pod's cgroup");
    serve(RunConfig::new(cgroup, &args.intercept, &args.proxy)?)
}

/// Binds, attaches, drops privileges, then serves until SIGTERM/SIGINT:
/// stop accepting, drain, detach.
fn serve(cfg: RunConfig) -> anyhow::Result<()> {
    // Check the proxy's flags and bind before attaching: interception
    // without a working proxy would make every Lattice connection fail.
    // Doing it while still privileged also lets --admin-addr use a low port
    // and --ca-file be readable by root only.
    let (proxy, listeners, admin) = if cfg.intercept_only {
        (None, Vec::new(), None)
    } else {
        let proxy = ProxyConfig::from_args(&cfg.proxy)?;
        let admin = std::net::TcpListener::bind(cfg.proxy.admin_addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| admin::AdminBindError {
                addr: cfg.proxy.admin_addr,
                source,
            })?;
        (
            Some(proxy),
            bind_loopback(cfg.intercept.proxy_port)?,
            Some(admin),
        )
    };
    let mut interceptor = Interceptor::attach(&cfg.intercept)?;
    let logger = interceptor.take_logger();
    if !cfg.keep_privileges {
        privilege::drop_to(cfg.intercept.exempt_uid)?;
    }

    // Built only now, so every runtime thread starts unprivileged.
    let runtime = match cfg.proxy.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    let orig_dst = interceptor.orig_dst();
    let served = runtime.block_on(async {
        if let Some(logger) = logger {
            telemetry::spawn_ebpf_log_forwarder(logger);
        }
        match proxy.zip(admin) {
            None => {
                tracing::info!(
                    proxy_port = cfg.intercept.proxy_port,
                    "lattice-agent ready (intercept only)"
                );
                let signal = shutdown_signal().await?;
                tracing::info!(signal, "shutting down");
                Ok(())
            }
            Some((proxy, admin)) => serve_proxy(&cfg, proxy, listeners, admin, orig_dst).await,
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
    listeners: Vec<std::net::TcpListener>,
    admin: std::net::TcpListener,
    orig_dst: Arc<dyn OriginalDestination>,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let aws = credentials::default_chain(&CredentialsConfig {
        region: cfg.proxy.region.clone(),
        role_arn: cfg.proxy.role_arn.clone(),
        role_session_name: Some(cfg.proxy.role_session_name.clone()),
    })
    .await;
    proxy_cfg.resolve_region(aws.region)?;
    let proxy_cfg = Arc::new(proxy_cfg);
    let creds = CredentialsCache::spawn(aws.provider, Arc::clone(&metrics), shutdown.clone());

    let readiness = Arc::new(admin::Readiness::new(Arc::clone(&creds)));
    readiness.set_attached(true);
    let admin = tokio::net::TcpListener::from_std(admin).context("registering --admin-addr")?;
    let admin_task = tokio::spawn(admin::serve(
        admin,
        Arc::clone(&readiness),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));

    let listeners = listeners
        .into_iter()
        .map(tokio::net::TcpListener::from_std)
        .collect::<io::Result<Vec<_>>>()
        .context("registering listeners")?;
    let proxy = tokio::spawn(proxy::serve(
        proxy_cfg,
        listeners,
        orig_dst,
        creds,
        metrics,
        shutdown.clone(),
    ));
    readiness.set_listening(true);
    tracing::info!(
        proxy_port = cfg.intercept.proxy_port,
        admin_addr = %cfg.proxy.admin_addr,
        "lattice-agent ready"
    );

    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down: draining in-flight requests");
    readiness.set_listening(false);
    shutdown.cancel();
    proxy.await.context("proxy task")??;
    admin_task.await.context("admin task")?;
    Ok(())
}

/// Binds 127.0.0.1:port and [::1]:port (the latter only where IPv6 exists).
fn bind_loopback(port: u16) -> Result<Vec<std::net::TcpListener>, ListenError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let mut listeners = vec![bind(v4, port)?];
    match bind(v6, port) {
        Ok(l) => listeners.push(l),
        Err(ListenError::Bind { source, .. })
            if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
        {
            tracing::warn!("IPv6 loopback unavailable; serving IPv4 only");
        }
        Err(e) => return Err(e),
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr, port: u16) -> Result<std::net::TcpListener, ListenError> {
    use socket2::{Domain, Socket, Type};
    let err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenError::PortInUse { port, addr }
        } else {
            ListenError::Bind { port, addr, source }
        }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    Ok(socket.into())
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
