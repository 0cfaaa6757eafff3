//! Process concerns every mode shares: the async runtime, the admin
//! listener, and waiting for SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::{admin, metrics::Metrics};

/// The runtime, built after the privilege drop so every thread starts with
/// the reduced set. One worker (the default) is a current-thread runtime:
/// no cross-thread wake-ups, the lowest CPU and tail latency per request.
pub fn runtime(workers: u16) -> std::io::Result<tokio::runtime::Runtime> {
    match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
    }
    .enable_all()
    .build()
}

/// Binds the admin listener (before attaching, while still privileged, so
/// a low port works and a port in use is reported before anything else).
pub fn bind_admin(
    addr: std::net::SocketAddr,
) -> Result<std::net::TcpListener, admin::AdminBindError> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| admin::AdminBindError { addr, source })
}

/// Serves the admin endpoints on the listener [`bind_admin`] made, on the
/// current runtime, until `shutdown`.
pub fn serve_admin(
    listener: std::net::TcpListener,
    readiness: Arc<admin::Readiness>,
    metrics: Arc<Metrics>,
    pods: Option<Arc<dyn admin::PodsReport>>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering --admin-addr")?;
    Ok(tokio::spawn(admin::serve(
        listener, readiness, metrics, pods, shutdown,
    )))
}

pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
