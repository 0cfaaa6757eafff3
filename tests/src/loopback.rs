//! HTTP on 127.0.0.1 for the signing proxy's loopback tests (no
//! namespaces, no root): clients that connect to an explicit address and
//! never resolve a name, and small in-process upstreams — an h2c upstream
//! replaying what it got to the verifier over HTTP/1.1, a slow one, a TLS
//! one, one that shows each TCP connection, and a container-credentials
//! endpoint handing out short-lived keys.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::time::format_rfc3339;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

// ---------------------------------------------------------------- clients

/// A collected response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub async fn collect(resp: Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("response body");
    let trailers = collected.trailers().cloned();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// One HTTP/1.1 connection to `addr`.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    send
}

/// One HTTP/2 prior-knowledge (h2c) connection to `addr`.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Sends `req` on an open HTTP/1.1 connection once it is ready.
pub async fn send_on(
    s: &mut hyper::client::conn::http1::SendRequest<Body>,
    req: Request<Body>,
) -> Resp {
    s.ready().await.expect("connection ready");
    collect(s.send_request(req).await.expect("request")).await
}

/// Sends one request on a fresh HTTP/1.1 connection.
pub async fn send1(addr: SocketAddr, req: Request<Body>) -> Resp {
    let mut s = h1(addr).await;
    collect(s.send_request(req).await.expect("request")).await
}

/// `GET path` with `Host: host`, on a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    send1(
        addr,
        Request::get(path)
            .header("host", host)
            .body(empty())
            .unwrap(),
    )
    .await
}

/// A free loopback port nobody listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// -------------------------------------------------------------- upstreams

/// A listener on 127.0.0.1 whose every connection `on_connection` serves
/// in a task of its own; returns the address.
async fn accept_loop<F, Fut>(on_connection: F) -> SocketAddr
where
    F: Fn(TcpStream, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            n += 1;
            tokio::spawn(on_connection(stream, n));
        }
    });
    addr
}

/// An HTTP server (HTTP/2 only or HTTP/1.1 only) answering with `handler`.
async fn serve<F, Fut>(http2_only: bool, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    accept_loop(move |stream, _| {
        let handler = handler.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if http2_only {
                b = b.http2_only();
            } else {
                b = b.http1_only();
            }
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        }
    })
    .await
}

/// h2c-only upstream: checks it was spoken to over HTTP/2, then replays the
/// request (`:authority` as Host) to the verifier over HTTP/1.1 and returns
/// the verifier's answer, with `x-upstream-version` and, when the request
/// asked with `te: trailers`, a `grpc-status: 0` trailer.
pub async fn h2_replay_upstream(verifier: SocketAddr) -> SocketAddr {
    serve(true, move |req: Request<Incoming>| async move {
        assert_eq!(req.version(), Version::HTTP_2);
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let authority = parts.uri.authority().expect(":authority").to_string();
        let mut replay = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.path_and_query().unwrap().as_str())
            .header("host", authority);
        for (k, v) in &parts.headers {
            if k != "te" {
                replay = replay.header(k, v);
            }
        }
        let replay = replay
            .header("content-length", body.len())
            .body(full(body))
            .unwrap();
        let mut s = h1(verifier).await;
        let resp = s.send_request(replay).await.unwrap();
        let status = resp.status();
        let data = resp.into_body().collect().await.unwrap().to_bytes();
        let want_trailers = parts
            .headers
            .get("te")
            .is_some_and(|v| v.as_bytes() == b"trailers");
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(data))];
        if want_trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(t)));
        }
        let mut r =
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync());
        *r.status_mut() = status;
        r.headers_mut()
            .insert("x-upstream-version", HeaderValue::from_static("HTTP/2.0"));
        r
    })
    .await
}

/// HTTP/1.1 upstream answering 200 `slow` after `delay`.
pub async fn slow_upstream(delay: Duration) -> SocketAddr {
    serve(false, move |_req| async move {
        tokio::time::sleep(delay).await;
        Response::new(full("slow"))
    })
    .await
}

/// What the credentials endpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredsMode {
    Fail,
    Serve,
}

/// One key handed out.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_key: String,
    pub expiry_unix: u64,
}

/// A container-credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`)
/// issuing a fresh key per call, valid for `lifetime`; every key is also
/// written to `keys_file` for the verifier (`--keys-file`).
pub struct CredsServer {
    pub addr: SocketAddr,
    pub token: String,
    state: Arc<Mutex<CredsState>>,
}

struct CredsState {
    mode: CredsMode,
    lifetime: Duration,
    issued: Vec<Issued>,
    keys: serde_json::Map<String, serde_json::Value>,
    keys_file: PathBuf,
}

impl CredsServer {
    pub async fn start(mode: CredsMode, lifetime: Duration, keys_file: PathBuf) -> Self {
        std::fs::write(&keys_file, "{}").unwrap();
        let token = "container-auth-token-0123".to_owned();
        let state = Arc::new(Mutex::new(CredsState {
            mode,
            lifetime,
            issued: Vec::new(),
            keys: serde_json::Map::new(),
            keys_file,
        }));
        let st = Arc::clone(&state);
        let expected = token.clone();
        let addr = serve(false, move |req: Request<Incoming>| {
            let st = Arc::clone(&st);
            let expected = expected.clone();
            async move {
                let auth_ok = req
                    .headers()
                    .get("authorization")
                    .is_some_and(|v| v.as_bytes() == expected.as_bytes());
                if !auth_ok {
                    let mut r = Response::new(full("bad authorization"));
                    *r.status_mut() = StatusCode::FORBIDDEN;
                    return r;
                }
                let mut s = st.lock().unwrap();
                if s.mode == CredsMode::Fail {
                    let mut r = Response::new(full("credentials temporarily unavailable"));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    return r;
                }
                let n = s.issued.len();
                let ak = format!("ASIATEST{n:06}");
                let sk = format!("container/secret/{n}/abcdefghijklmnopqrstuvwxyz");
                let tok = format!("container-session-token-{n}-0123456789");
                let expiry_unix = (SystemTime::now() + s.lifetime)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                s.keys
                    .insert(ak.clone(), serde_json::json!({"secret": sk, "token": tok}));
                let tmp = s.keys_file.with_extension("tmp");
                std::fs::write(&tmp, serde_json::Value::Object(s.keys.clone()).to_string())
                    .unwrap();
                std::fs::rename(&tmp, &s.keys_file).unwrap();
                s.issued.push(Issued {
                    access_key: ak.clone(),
                    expiry_unix,
                });
                let body = serde_json::json!({
                    "AccessKeyId": ak,
                    "SecretAccessKey": sk,
                    "Token": tok,
                    "Expiration": format_rfc3339(expiry_unix),
                });
                let mut r = Response::new(full(body.to_string()));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                r
            }
        })
        .await;
        Self { addr, token, state }
    }

    pub fn set_mode(&self, mode: CredsMode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn issued(&self) -> Vec<Issued> {
        self.state.lock().unwrap().issued.clone()
    }

    /// Secret values handed out so far (for log scans).
    pub fn secrets(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.keys
            .values()
            .flat_map(|v| {
                [
                    v["secret"].as_str().unwrap().to_owned(),
                    v["token"].as_str().unwrap().to_owned(),
                ]
            })
            .collect()
    }
}

/// TLS upstream (ALPN h2 and http/1.1) with a certificate from
/// [`crate::tls::TestCa`], answering
/// `sni=<SNI> alpn=<ALPN> version=<HTTP version> authority=<Host or :authority>`.
pub async fn tls_upstream(cert: &Path, key: &Path) -> SocketAddr {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    accept_loop(move |tcp, _| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let (_, session) = tls.get_ref();
            let sni = session.server_name().unwrap_or("-").to_owned();
            let alpn = session
                .alpn_protocol()
                .map_or("-".to_owned(), |a| String::from_utf8_lossy(a).into_owned());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| {
                        req.headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap().to_owned())
                    })
                    .unwrap_or_default();
                let text = format!(
                    "sni={sni} alpn={alpn} version={:?} authority={authority}",
                    req.version()
                );
                async move { Ok::<_, Infallible>(Response::new(full(text))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        }
    })
    .await
}

/// What [`ConnUpstream`] does with a connection after a response.
#[derive(Debug, Clone, Copy)]
pub enum AfterResponse {
    /// Waits for the next request.
    KeepAlive,
    /// Answers with `Connection: close` and closes.
    Close,
    /// Closes, without notice, once no request came for this long (as
    /// servers with a keep-alive timeout do).
    CloseWhenIdle(Duration),
}

/// A plain HTTP/1.1 upstream (tokio sockets, no HTTP library: the tests
/// see each TCP connection) answering every request with
/// `conn=<n> host=<Host>`, n counting its connections from 1, and keeping
/// when each connection was closed by the other side.
pub struct ConnUpstream {
    pub addr: SocketAddr,
    closed: Arc<Mutex<Vec<(u64, Instant)>>>,
}

impl ConnUpstream {
    pub async fn start(after: AfterResponse) -> Self {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let closed_by_peer = Arc::clone(&closed);
        let addr =
            accept_loop(move |tcp, n| serve_counted(tcp, n, after, Arc::clone(&closed_by_peer)))
                .await;
        Self { addr, closed }
    }

    /// Connections the other side has closed: (n, when).
    pub fn closed(&self) -> Vec<(u64, Instant)> {
        self.closed.lock().unwrap().clone()
    }
}

/// [`ConnUpstream`]'s connection `n`.
async fn serve_counted(
    mut tcp: TcpStream,
    n: u64,
    after: AfterResponse,
    closed: Arc<Mutex<Vec<(u64, Instant)>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let read = match after {
                AfterResponse::CloseWhenIdle(idle) if buf.is_empty() => {
                    match tokio::time::timeout(idle, tcp.read(&mut chunk)).await {
                        Ok(r) => r,
                        // Idle too long: close without a word.
                        Err(_) => return,
                    }
                }
                _ => tcp.read(&mut chunk).await,
            };
            match read {
                Ok(0) | Err(_) => {
                    closed.lock().unwrap().push((n, Instant::now()));
                    return;
                }
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let host = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("host").then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        let body = format!("conn={n} host={host}");
        let close = matches!(after, AfterResponse::Close);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if tcp.write_all(resp.as_bytes()).await.is_err() || close {
            return;
        }
    }
}
