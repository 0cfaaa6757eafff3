//! The assembly entry: one place that turns a configuration into a running
//! agent, for `main`, every mode and the tests.
//!
//! [`build`] does everything that needs privileges or can fail before
//! serving — binds the proxy and admin listeners, attaches the
//! interceptor, drops privileges, starts the runtime — and returns a
//! [`Bound`] agent: the addresses it listens on and a handle to stop it.
//! [`Bound::serve`] then serves until SIGTERM/SIGINT or the handle, drains
//! and detaches.

mod node;
mod single;

use std::{net::SocketAddr, sync::Arc};

use tokio_util::sync::CancellationToken;

use crate::{
    admin::AdminBindError,
    bpf::BpfError,
    config::{AgentConfig, ServeConfig},
    netns::NetnsError,
    node::cni::CniError,
    orig_dst::OriginalDestination,
    privilege::PrivilegeError,
    workload::ListenError,
};

pub use self::node::{KEPT_CAPABILITIES, KEPT_FOR_CNI};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("--proxy-port: the proxy's listeners")]
    Listen(#[source] ListenError),
    #[error("--admin-addr")]
    Admin(#[source] AdminBindError),
    #[error("attaching the interceptor")]
    Attach(#[source] BpfError),
    #[error("dropping privileges after attaching")]
    Privileges(#[source] PrivilegeError),
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("starting the --workers threads")]
    Workers(#[source] std::io::Error),
    #[error("--run-dir {}", path.display())]
    RunDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CNI plugin")]
    Cni(#[source] CniError),
    #[error("the agent's own network namespace")]
    HomeNetns(#[source] NetnsError),
    #[error("the interceptor was attached without its network-namespace gate")]
    NoGate,
    #[error("no AWS region: pass --region (LATTICE_REGION) or set AWS_REGION / a profile region")]
    NoRegion,
}

/// Where a built agent listens.
#[derive(Debug, Clone)]
pub struct BoundAddrs {
    /// The signing proxy's loopback listeners (none in node mode, where
    /// each pod has its own, nor under `--intercept-only`).
    pub proxy: Vec<SocketAddr>,
    /// `/healthz`, `/readyz`, `/metrics`; none under `--intercept-only`.
    pub admin: Option<SocketAddr>,
}

/// Stops a [`Bound`] agent as SIGTERM would: stop accepting, drain, detach.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.cancel();
    }

    /// A signal (SIGTERM, SIGINT) or [`Self::shutdown`], whichever first;
    /// names what stopped the agent.
    async fn wait(&self) -> anyhow::Result<&'static str> {
        tokio::select! {
            () = self.0.cancelled() => Ok("shutdown requested"),
            signal = crate::process::shutdown_signal() => signal,
        }
    }
}

/// An agent that has bound, attached and dropped its privileges, ready to
/// serve.
pub struct Bound {
    addrs: BoundAddrs,
    shutdown: ShutdownHandle,
    serving: Serving,
}

enum Serving {
    Single(Box<single::Bound>),
    Node(Box<node::Bound>),
}

/// Binds, attaches and drops privileges as `cfg` says. `SelfCheck` binds
/// nothing: `main` runs it without building.
pub fn build(cfg: AgentConfig) -> anyhow::Result<Bound> {
    let shutdown = ShutdownHandle::default();
    let (addrs, serving) = match cfg {
        AgentConfig::Single(cfg) => {
            let bound = single::build(*cfg)?;
            (bound.addrs(), Serving::Single(Box::new(bound)))
        }
        AgentConfig::Node(cfg) => {
            let bound = node::build(*cfg)?;
            (bound.addrs(), Serving::Node(Box::new(bound)))
        }
        AgentConfig::SelfCheck => {
            anyhow::bail!("self-check binds nothing: run it with self_check::report")
        }
    };
    Ok(Bound {
        addrs,
        shutdown,
        serving,
    })
}

/// One workload's signing proxy without interception or privilege
/// changes: every connection's original destination comes from
/// `destinations`, and the listeners bind `127.0.0.1` and `::1` at the
/// configured proxy port (`0`: any free port). The loopback tests and the
/// bench's proxy run the agent this way, unprivileged; `credentials`, when
/// given, replace the credential chain.
pub fn build_proxy_only(
    cfg: ServeConfig,
    proxy_port: u16,
    destinations: Arc<dyn OriginalDestination>,
    credentials: Option<aws_credential_types::Credentials>,
) -> anyhow::Result<Bound> {
    let bound = single::build_proxy_only(cfg, proxy_port, destinations, credentials)?;
    Ok(Bound {
        addrs: bound.addrs(),
        shutdown: ShutdownHandle::default(),
        serving: Serving::Single(Box::new(bound)),
    })
}

impl Bound {
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until a signal or the shutdown handle; then stops accepting,
    /// drains in-flight requests and detaches (unless pinned or held by
    /// the cgroup).
    pub fn serve(self) -> anyhow::Result<()> {
        match self.serving {
            Serving::Single(bound) => bound.serve(self.shutdown),
            Serving::Node(bound) => bound.serve(self.shutdown),
        }
    }
}
