//! Logging setup. eBPF log lines (aya-log → `log`) are bridged into tracing.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::{LogFormat, TelemetryArgs};

#[derive(Debug, thiserror::Error)]
#[error("--log {filter:?}")]
pub struct LogFilterError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

pub fn init(args: &TelemetryArgs) -> Result<(), LogFilterError> {
    let filter = EnvFilter::try_new(&args.log).map_err(|source| LogFilterError {
        filter: args.log.clone(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    match args.log_format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
    }
    Ok(())
}

/// Forwards the eBPF programs' log records until the runtime shuts down.
pub fn spawn_ebpf_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd, which stays open and
    // unchanged for as long as the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll eBPF logs");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
