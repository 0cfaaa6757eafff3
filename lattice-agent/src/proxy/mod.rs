//! The signing proxy. One connection: accept (server) → original
//! destination → what it speaks (sniff, classify): HTTP is served request
//! by request, anything else is passed through unchanged (splice). One
//! request, top to bottom ([`handle`]): credentials → sign → forward
//! (upstream) → respond.

pub mod body;
pub mod classify;
mod conns;
pub mod errors;
pub mod headers;
pub mod server;
mod sniff;
mod splice;
pub mod tls_rules;
pub mod upstream;
pub mod workers;

use std::{
    borrow::Cow,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::future::Either;
use http::{HeaderValue, Request, Response, Uri, Version, header::HOST};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::{
    body::{Guarded, ProxyBody, boxed},
    errors::{BadRequest, RequestError},
    server::ConnCtx,
    tls_rules::TlsRules,
    upstream::{TlsConfigs, Upstream, UpstreamConfig},
};
use crate::{
    credentials::WorkloadCredentials,
    metrics::WorkloadMetrics,
    netns::SocketFactory,
    orig_dst::OriginalDestination,
    query,
    sign::{self, Payload, RequestToSign, Signer, SigningConfig},
};

/// The proxy's settings (built by `config`).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub signing: SigningConfig,
    pub sign_payload: bool,
    pub max_signed_body: u64,
    /// Which requests go over TLS, and to which port (`--upstream-tls`,
    /// `--upstream-tls-rule`; in node mode a pod's annotation).
    pub tls_rules: Arc<TlsRules>,
    /// Trust (webpki roots and `--ca-file`) and ALPN for those.
    pub tls: TlsConfigs,
    pub connect_timeout: Duration,
    /// `None`: no limit.
    pub request_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    /// How long a silent new connection waits before the proxy connects
    /// to its destination, for a server-first protocol to greet.
    pub server_first_wait: Duration,
    pub drain_timeout: Duration,
    pub max_header_bytes: u64,
    pub log_signing: bool,
    /// Open client connections per workload; at the limit the oldest idle
    /// one is closed to admit a new one (see `conns`).
    pub max_connections: usize,
    /// `--workers` threads connections are spread over; `None` serves
    /// them on the runtime the proxy runs on.
    pub workers: Option<Arc<workers::WorkerPool>>,
}

/// What one served workload (a pod) brings to the proxy: everything a
/// request of that workload may use, and nothing of any other.
pub struct WorkloadProxy {
    pub cfg: Arc<ProxyConfig>,
    /// Where upstream sockets are created: the pod's network namespace,
    /// so connections leave from the pod's address.
    pub sockets: SocketFactory,
    /// Original destinations of this workload's connections only.
    pub orig_dst: Arc<dyn OriginalDestination>,
    pub creds: WorkloadCredentials,
    pub metrics: WorkloadMetrics,
}

/// State shared by every connection of one workload.
pub(crate) struct Shared {
    cfg: Arc<ProxyConfig>,
    /// Keeps the workload's signing key between requests.
    signer: Signer,
    upstream: Upstream,
    creds: WorkloadCredentials,
    metrics: WorkloadMetrics,
}

/// Serves one workload's proxy on `listeners` until `shutdown` is
/// cancelled, then stops accepting, drains in-flight requests for up to
/// `--drain-timeout`, and returns.
pub async fn serve(
    workload: WorkloadProxy,
    listeners: Vec<TcpListener>,
    shutdown: CancellationToken,
) {
    let WorkloadProxy {
        cfg,
        sockets,
        orig_dst,
        creds,
        metrics,
    } = workload;
    let upstream = Upstream::new(UpstreamConfig {
        tls_rules: Arc::clone(&cfg.tls_rules),
        tls: cfg.tls.clone(),
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.idle_timeout,
        sockets,
    });
    let shared = Arc::new(Shared {
        signer: Signer::new(cfg.signing.clone()),
        cfg,
        upstream,
        creds,
        metrics,
    });
    for l in &listeners {
        if let Ok(addr) = l.local_addr() {
            tracing::debug!(%addr, "signing proxy listening");
        }
    }
    server::run(shared, listeners, orig_dst, shutdown).await;
}

/// Answers one request: forwarded and signed, or a `lattice-agent:` error.
async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let busy = conn.activity.begin();
    let method = req.method().clone();
    let client_version = req.version();
    // Boxed once, with the guard: the busy mark lasts until the body ends.
    let (mut resp, own_error) = match forward(&shared, &conn, req).await {
        Ok(r) => (r.map(|b| boxed(Guarded::new(b, busy))), false),
        Err(e) => {
            tracing::debug!(peer = %conn.peer, error = %crate::error_chain(&e), "request not forwarded");
            (
                e.into_response().map(|b| boxed(Guarded::new(b, busy))),
                true,
            )
        }
    };
    shared
        .metrics
        .count_request(&method, resp.status(), own_error);
    *resp.version_mut() = if client_version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    resp
}

async fn forward(
    shared: &Shared,
    conn: &ConnCtx,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, RequestError> {
    let cfg = &shared.cfg;

    // Original destination: the only place we ever connect to.
    let dst = conn
        .dst
        .ok_or(RequestError::NoOriginalDestination { peer: conn.peer })?;

    // Request head: limits, authority, header hygiene.
    let (mut parts, body) = req.into_parts();
    if headers::head_size(&parts) > cfg.max_header_bytes {
        return Err(RequestError::HeadersTooLarge {
            limit: cfg.max_header_bytes,
        });
    }
    let authority = headers::authority(&parts)?;
    headers::remove_hop_by_hop(&mut parts.headers);
    headers::remove_client_signing(&mut parts.headers);

    // Credentials: from the cache only (a pod's first requests may wait
    // for its identity's first fetch).
    let creds = shared
        .creds
        .wait_current(crate::credentials::FIRST_FETCH_WAIT)
        .await
        .map_err(RequestError::NoCredentials)?;

    // Body: streamed, or buffered and hashed under --sign-payload.
    let (body, payload) = if cfg.sign_payload {
        let content_length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        body::buffer_for_signing(body, content_length, cfg.max_signed_body).await?
    } else {
        (boxed(body), Payload::Unsigned)
    };

    // Sign the request target as it will be forwarded: the path as sent,
    // the query in the app's order with ambiguous pairs normalised.
    let query = parts.uri.query().map(query::wire_query).transpose()?;
    let to_sign = RequestToSign {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: query.as_deref(),
        host: authority.as_str(),
        payload: &payload,
    };
    let signed = shared
        .signer
        .sign(&to_sign, &creds, SystemTime::now())
        .map_err(|e| {
            shared.metrics.signing_failures.inc();
            RequestError::Signing(e)
        })?;
    if cfg.log_signing
        && let Some(t) = sign::trace(&to_sign, &signed)
    {
        tracing::info!(
            canonical_request = %t.canonical_request,
            string_to_sign = %t.string_to_sign,
            signature = "REDACTED",
            authorization = "REDACTED",
            "signed request"
        );
    }
    // The request target as forwarded, where it differs from the app's:
    // a normalised query, or an absolute-form target.
    let target = match &query {
        Some(Cow::Owned(q)) if q.is_empty() => Some(parts.uri.path().to_owned()),
        Some(Cow::Owned(q)) => Some(format!("{}?{q}", parts.uri.path())),
        _ if parts.uri.authority().is_some() => Some(origin_form(&parts.uri)),
        _ => None,
    };
    drop(query);
    for (name, value) in signed.headers {
        parts.headers.insert(name, value);
    }

    // Forward to the original destination, with the client's authority.
    let sent = if parts.version == Version::HTTP_2 {
        // hyper-util's client takes an absolute URI; it sends the
        // authority as `:authority`.
        let target = target.unwrap_or_else(|| origin_form(&parts.uri));
        parts.uri = Uri::builder()
            .scheme(shared.upstream.scheme(dst, authority.as_str()))
            .authority(authority)
            .path_and_query(target)
            .build()
            .map_err(BadRequest::Target)?;
        parts.headers.remove(HOST);
        Either::Left(
            shared
                .upstream
                .send_h2(dst, conn.worker, Request::from_parts(parts, body)),
        )
    } else {
        // Origin form, and the authority in `Host`.
        if let Some(target) = target {
            parts.uri = Uri::try_from(target).map_err(|e| BadRequest::Target(e.into()))?;
        }
        parts.version = Version::HTTP_11;
        if parts.headers.get(HOST).map(HeaderValue::as_bytes) != Some(authority.as_str().as_bytes())
        {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(BadRequest::AuthorityNotAHeader)?;
            parts.headers.insert(HOST, host);
        }
        Either::Right(shared.upstream.send_h1(
            &conn.upstream,
            dst,
            authority.as_str(),
            Request::from_parts(parts, body),
        ))
    };
    let started = tokio::time::Instant::now();
    let mut resp = match cfg.request_timeout {
        Some(limit) => tokio::time::timeout_at(started + limit, sent)
            .await
            .map_err(|_| RequestError::UpstreamTimeout { dst, after: limit })??,
        None => sent.await?,
    };
    shared
        .metrics
        .upstream_duration()
        .observe(started.elapsed().as_secs_f64());

    // Respond: the upstream's response as is, minus hop-by-hop headers.
    headers::remove_hop_by_hop(resp.headers_mut());
    Ok(resp)
}

/// The path and query of `uri` (`/` when it has none).
fn origin_form(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned()
}
