//! `run`: bind the proxy's listeners, attach the interceptor, drop
//! privileges, serve until SIGTERM/SIGINT, detach.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use anyhow::Context as _;

use crate::{bpf::Interceptor, cli::RunArgs, config::RunConfig, privilege, relay, telemetry};

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

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::from_args(args)?;
    // Bind before attaching: interception without a listener would make
    // every Lattice connection fail.
    let listeners = if cfg.intercept_only {
        Vec::new()
    } else {
        bind_loopback(cfg.intercept.proxy_port)?
    };
    let mut interceptor = Interceptor::attach(&cfg.intercept)?;
    let logger = interceptor.take_logger();
    if !cfg.keep_privileges {
        privilege::drop_to(cfg.intercept.exempt_uid)?;
    }

    // Built only now, so every runtime thread starts unprivileged.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(logger) = logger {
            telemetry::spawn_ebpf_log_forwarder(logger);
        }
        let listeners = listeners
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<io::Result<Vec<_>>>()
            .context("registering listeners")?;
        let orig_dst: Arc<dyn crate::orig_dst::OriginalDestination> = interceptor.orig_dst();
        let serving = tokio::spawn(relay::serve(listeners, orig_dst));
        tracing::info!(
            proxy_port = cfg.intercept.proxy_port,
            intercept_only = cfg.intercept_only,
            "lattice-agent ready"
        );
        let signal = shutdown_signal().await?;
        tracing::info!(signal, "shutting down");
        serving.abort();
        anyhow::Ok(())
    })?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    interceptor.detach();
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
