//! Admin server (`--admin-addr`, loopback by default): `/healthz` (the
//! process answers), `/readyz` (attached, listening, credentials resolved),
//! `/metrics` (Prometheus text).

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

use crate::{credentials::CredentialsCache, metrics::Metrics};

/// What `/readyz` checks. The lead's orchestration sets `attached` and
/// `listening`; credentials are read from the cache.
#[derive(Debug)]
pub struct Readiness {
    attached: AtomicBool,
    listening: AtomicBool,
    credentials: Arc<CredentialsCache>,
}

impl Readiness {
    pub fn new(credentials: Arc<CredentialsCache>) -> Self {
        Self {
            attached: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            credentials,
        }
    }

    pub fn set_attached(&self, v: bool) {
        self.attached.store(v, Ordering::Release);
    }

    pub fn set_listening(&self, v: bool) {
        self.listening.store(v, Ordering::Release);
    }

    /// `Ok` when ready, else the reasons (one per line).
    pub fn check(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if !self.attached.load(Ordering::Acquire) {
            why.push("interceptor not attached".to_owned());
        }
        if !self.listening.load(Ordering::Acquire) {
            why.push("proxy not listening".to_owned());
        }
        if let Err(e) = self.credentials.current() {
            why.push(format!("no credentials: {e}"));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("\n"))
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("--admin-addr {addr}: {source}")]
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
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&req, &readiness, &metrics);
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
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready\n{why}\n"),
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
