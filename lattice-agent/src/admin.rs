//! Admin server (`--admin-addr`, loopback by default): `/healthz` (the
//! process answers), `/readyz` (attached, listening, credentials resolved;
//! in node mode: attached and the pods listed from the API; warnings about
//! how the agent runs follow either answer), `/metrics` (Prometheus
//! text), and in node mode `/pods` (the pods served, JSON), on loopback
//! only: it names every enrolled pod's role (so its account), service
//! account and IPs, while probes and Prometheus reach the rest on the
//! address `--admin-addr` binds.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use lattice_cni::conf::ConfError;

use crate::{
    credentials::{CredentialsUnavailable, WorkloadCredentials},
    error_chain,
    metrics::Metrics,
};

/// What `/readyz` checks.
#[derive(Debug)]
pub struct Readiness {
    attached: AtomicBool,
    listening: AtomicBool,
    /// `run`/`sidecar`: the one workload's credentials must be usable.
    credentials: Option<WorkloadCredentials>,
    /// Node mode: the first list of pods from the API has been processed.
    pods_listed: Option<AtomicBool>,
    /// Node mode with the CNI plugin: why it is not in the chain, if not.
    cni: std::sync::Mutex<Option<Arc<ConfError>>>,
    /// How the agent runs that its operators should know (e.g. unpinned):
    /// shown with either answer, never making it unready.
    warnings: std::sync::Mutex<Vec<String>>,
}

impl Readiness {
    /// One workload (`run`, `sidecar`): attached, listening, credentials.
    pub fn single(credentials: WorkloadCredentials) -> Self {
        Self {
            attached: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            credentials: Some(credentials),
            pods_listed: None,
            cni: std::sync::Mutex::new(None),
            warnings: std::sync::Mutex::default(),
        }
    }

    /// Node mode: attached and the pods listed. A pod's own credentials do
    /// not make the node agent unready (its requests get 503 naming it).
    pub fn node() -> Self {
        Self {
            attached: AtomicBool::new(false),
            listening: AtomicBool::new(true),
            credentials: None,
            pods_listed: Some(AtomicBool::new(false)),
            cni: std::sync::Mutex::new(None),
            warnings: std::sync::Mutex::default(),
        }
    }

    pub fn set_attached(&self, v: bool) {
        self.attached.store(v, Ordering::Release);
    }

    pub fn set_listening(&self, v: bool) {
        self.listening.store(v, Ordering::Release);
    }

    pub fn set_pods_listed(&self, v: bool) {
        if let Some(listed) = &self.pods_listed {
            listed.store(v, Ordering::Release);
        }
    }

    /// Whether the CNI plugin is in the runtime's chain (`Err`: why not).
    pub fn set_cni(&self, state: Result<(), Arc<ConfError>>) {
        *self.cni.lock().unwrap_or_else(|p| p.into_inner()) = state.err();
    }

    /// Adds a line to `/readyz`'s answer (`warning: <text>`).
    pub fn add_warning(&self, text: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text);
    }

    /// `warning: ..` lines, each ending with a newline.
    fn warning_lines(&self) -> String {
        let warnings = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
        warnings.iter().map(|w| format!("warning: {w}\n")).collect()
    }

    /// `Ok` when ready, else every reason why not.
    pub fn check(&self) -> Result<(), Vec<NotReady>> {
        let mut why = Vec::new();
        if !self.attached.load(Ordering::Acquire) {
            why.push(NotReady::NotAttached);
        }
        if !self.listening.load(Ordering::Acquire) {
            why.push(NotReady::NotListening);
        }
        if let Some(listed) = &self.pods_listed
            && !listed.load(Ordering::Acquire)
        {
            why.push(NotReady::PodsNotListed);
        }
        if let Some(cni) = &*self.cni.lock().unwrap_or_else(|p| p.into_inner()) {
            why.push(NotReady::CniNotChained(Arc::clone(cni)));
        }
        if let Some(Err(e)) = self.credentials.as_ref().map(|c| c.current()) {
            why.push(NotReady::NoCredentials(e));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

/// Why the agent is not ready: each is one line of `/readyz`.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("interceptor not attached")]
    NotAttached,
    #[error("proxy not listening")]
    NotListening,
    #[error("pods not listed from the Kubernetes API yet")]
    PodsNotListed,
    #[error("CNI plugin not in the runtime's chain")]
    CniNotChained(#[source] Arc<ConfError>),
    #[error("no credentials")]
    NoCredentials(#[source] CredentialsUnavailable),
}

/// `/readyz`'s lines for `why`.
fn not_ready_lines(why: &[NotReady]) -> String {
    why.iter().map(|w| error_chain(w) + "\n").collect()
}

/// The `/pods` listing (node mode): a JSON document, no secrets.
pub trait PodsReport: Send + Sync {
    fn pods_json(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
#[error("binding the admin endpoint on {addr}")]
pub struct AdminBindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminBindError { addr, source })
}

/// Serves the admin endpoints until `shutdown`; open admin connections are
/// dropped then.
pub async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    pods: Option<Arc<dyn PodsReport>>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let readiness = Arc::clone(&readiness);
        let metrics = Arc::clone(&metrics);
        let pods = pods.clone();
        let shutdown = shutdown.clone();
        // Reached on a loopback address: from inside the agent's own
        // network namespace (`kubectl port-forward` ends there).
        let on_loopback = stream
            .local_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&req, &readiness, &metrics, pods.as_deref(), on_loopback);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http1_only()
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn route(
    req: &Request<Incoming>,
    readiness: &Readiness,
    metrics: &Metrics,
    pods: Option<&dyn PodsReport>,
    on_loopback: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => text(
                StatusCode::OK,
                format!("ready\n{}", readiness.warning_lines()),
            ),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready\n{}{}",
                    not_ready_lines(&why),
                    readiness.warning_lines()
                ),
            ),
        },
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/pods" if pods.is_some() && !on_loopback => text(
            StatusCode::FORBIDDEN,
            "/pods is served on loopback only (kubectl port-forward to the agent's pod \
             reaches it): it names every enrolled pod's role ARN, service account and IPs\n"
                .into(),
        ),
        "/pods" if pods.is_some() => {
            let body = pods.map(|p| p.pods_json()).unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_names_every_reason_with_its_causes() {
        let no_identity = std::io::Error::other("pod shop/a has no AWS identity");
        let r = Readiness::single(WorkloadCredentials::Missing(Arc::new(no_identity)));
        r.set_listening(true);
        r.set_cni(Err(Arc::new(ConfError::NoConfig {
            dir: "/etc/cni/net.d".into(),
        })));
        let why = r.check().unwrap_err();
        assert_eq!(
            not_ready_lines(&why),
            "interceptor not attached\n\
             CNI plugin not in the runtime's chain: no CNI configuration in /etc/cni/net.d \
             yet (is the node's CNI installed?)\n\
             no credentials: pod shop/a has no AWS identity\n"
        );
        r.set_attached(true);
        r.set_cni(Ok(()));
        assert_eq!(r.check().unwrap_err().len(), 1);
    }
}
