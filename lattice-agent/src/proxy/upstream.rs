//! Forwarding to the original destination over keep-alive connections
//! (HTTP/1.1, or HTTP/2 for h2c clients), over TLS where the rules say
//! (see [`super::tls_rules`]).
//!
//! Where to connect is only ever the original destination's IP, and its
//! port unless a TLS rule names another. The client's authority (the
//! `Host` header, or the HTTP/2 `:authority`) only names the TLS server
//! (SNI, and the name its certificate must carry), never an address:
//! connections are kept per original destination and authority (so a TLS
//! connection is only reused for the name it was verified for) and dial
//! that destination whatever the authority says.
//!
//! TLS: ALPN offers `http/1.1` for HTTP/1.1 clients, whose requests stay
//! HTTP/1.1 (one upstream connection per client connection, as for plain
//! HTTP), and `h2` then `http/1.1` for h2c clients, whose requests need a
//! listener that chooses h2 (else 502 naming what it chose). Sessions are
//! resumed from rustls' cache.
//!
//! HTTP/1.1: a client connection keeps the upstream connection its last
//! request used ([`StickyH1`]), so a request costs no pool lookup; closed
//! client connections leave theirs in an idle pool per destination and
//! worker. HTTP/2: one multiplexing client (hyper-util's pool) per
//! destination and worker.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    body::ProxyBody,
    errors::{RequestError, UpstreamError},
    tls_rules::TlsRules,
};
use crate::{error_chain, netns::SocketFactory};

/// Upstream protocol, following the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Client TLS settings, one per client protocol (their ALPN offers).
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{}", path.display())]
    CaPem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: a certificate", path.display())]
    CaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: no PEM certificates found", path.display())]
    NoCertificates { path: PathBuf },
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
}

impl TlsConfigs {
    /// webpki roots plus the PEM certificates in `ca_file`; ring provider
    /// (the one aws-config's HTTPS client uses too).
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let pem_err = |source| TlsConfigError::CaPem {
                path: path.to_owned(),
                source,
            };
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(pem_err)? {
                roots.add(cert.map_err(pem_err)?).map_err(|source| {
                    TlsConfigError::CaCertificate {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(TlsConfigError::NoCertificates {
                    path: path.to_owned(),
                });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let base = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http1 = base.clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut http2 = base;
        http2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            http1: Arc::new(http1),
            http2: Arc::new(http2),
        })
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Which requests go over TLS, and to which port.
    pub tls_rules: Arc<TlsRules>,
    pub tls: TlsConfigs,
    pub connect_timeout: Duration,
    /// Pooled connections idle this long are closed.
    pub idle_timeout: Duration,
    /// Where the upstream sockets are created (the workload's netns).
    pub sockets: SocketFactory,
}

type HttpClient = Client<Connector, ProxyBody>;
type H1Sender = hyper::client::conn::http1::SendRequest<ProxyBody>;

/// Beyond this many distinct (destination, worker) keys the HTTP/2 client
/// map is reset (their pooled connections close when idle).
const MAX_CLIENTS: usize = 4096;

/// A destination as seen from one `--workers` thread (a thread only uses
/// connections its own event loop drives).
type Key = (SocketAddr, usize);

/// Idle HTTP/1.1 connections are also kept apart by the authority they
/// were opened for: with TLS it is the server name the certificate was
/// checked against.
type IdleKey = (SocketAddr, usize, String);

pub struct Upstream {
    cfg: UpstreamConfig,
    h1: hyper::client::conn::http1::Builder,
    /// HTTP/1.1 connections no client connection holds.
    idle_h1: Arc<IdleH1>,
    /// HTTP/2 (h2c clients): one multiplexing client per destination and
    /// worker.
    h2_clients: Mutex<HashMap<Key, HttpClient>>,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Self {
        Self {
            idle_h1: Arc::new(IdleH1 {
                idle_timeout: cfg.idle_timeout,
                conns: Mutex::new(HashMap::new()),
            }),
            h1: {
                let mut b = hyper::client::conn::http1::Builder::new();
                // One buffer and send(2), not writev(2): the vectored path
                // costs the kernel more per call than copying a small
                // head and body together.
                b.writev(false);
                b
            },
            cfg,
            h2_clients: Mutex::new(HashMap::new()),
        }
    }

    /// The URI scheme of a request to `dst` for `authority`: `https`
    /// where a TLS rule matches.
    pub fn scheme(&self, dst: SocketAddr, authority: &str) -> &'static str {
        match self.cfg.tls_rules.tls_port(dst, host_of(authority)) {
            Some(_) => "https",
            None => "http",
        }
    }

    /// The HTTP/1.1 upstream slot of a new client connection to `dst`.
    pub fn sticky(&self, dst: Option<SocketAddr>, worker: usize) -> StickyH1 {
        StickyH1 {
            held: Mutex::new(Held::default()),
            home: dst.map(|dst| (Arc::clone(&self.idle_h1), (dst, worker))),
        }
    }

    /// Closes pooled HTTP/1.1 connections idle longer than the idle
    /// timeout; run now and then.
    pub fn close_idle(&self) {
        self.idle_h1.close_expired();
    }

    /// Sends `req` (origin-form URI, `Host: authority`) to `dst` over the
    /// client connection's own upstream connection for `authority`, else
    /// one from its worker's idle pool, else a new one. A request that a
    /// reused connection closed before taking it is sent again on another.
    pub async fn send_h1(
        &self,
        sticky: &StickyH1,
        dst: SocketAddr,
        authority: &str,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, RequestError> {
        let Some((_, (_, worker))) = &sticky.home else {
            return Err(RequestError::Upstream {
                dst,
                source: UpstreamError::NoConnection,
            });
        };
        loop {
            let reused = sticky
                .take(authority)
                .or_else(|| self.idle_h1.take((dst, *worker, authority.to_owned())));
            let (mut sender, was_reused) = match reused {
                Some(s) => (s, true),
                None => (self.connect_h1(dst, authority).await?, false),
            };
            if let Err(e) = sender.ready().await {
                if was_reused {
                    continue;
                }
                return Err(RequestError::Upstream {
                    dst,
                    source: e.into(),
                });
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    sticky.put(authority, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if was_reused => req = unsent,
                    _ => {
                        return Err(RequestError::Upstream {
                            dst,
                            source: e.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// A plain TCP connection to `dst` from the workload's network
    /// namespace, within `--connect-timeout`: for connections passed
    /// through.
    pub async fn connect_tcp(&self, dst: SocketAddr) -> Result<TcpStream, ConnectError> {
        tokio::time::timeout(self.cfg.connect_timeout, dial_tcp(&self.cfg.sockets, dst))
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(|e| ConnectError::Unreachable(e.into()))
    }

    /// A new HTTP/1.1 connection to `dst` (`host`: the client's authority,
    /// the TLS server name); its connection task runs on the calling
    /// thread's runtime.
    async fn connect_h1(&self, dst: SocketAddr, host: &str) -> Result<H1Sender, RequestError> {
        let connector = self.connector(dst, Protocol::Http1);
        let conn = connector
            .connect(host)
            .await
            .map_err(|e| connect_error(dst, self.cfg.connect_timeout, e))?;
        let (sender, connection) =
            self.h1
                .handshake(conn)
                .await
                .map_err(|e| RequestError::Upstream {
                    dst,
                    source: e.into(),
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%dst, error = %error_chain(&e), "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn connector(&self, dst: SocketAddr, proto: Protocol) -> Connector {
        let tls = match proto {
            Protocol::Http1 => Arc::clone(&self.cfg.tls.http1),
            Protocol::Http2 => Arc::clone(&self.cfg.tls.http2),
        };
        Connector {
            dst,
            proto,
            rules: Arc::clone(&self.cfg.tls_rules),
            tls,
            connect_timeout: self.cfg.connect_timeout,
            sockets: self.cfg.sockets.clone(),
        }
    }

    fn h2_client(&self, dst: SocketAddr, worker: usize) -> HttpClient {
        let mut clients = self.h2_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&(dst, worker)) {
            return c.clone();
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.cfg.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .build(self.connector(dst, Protocol::Http2));
        clients.insert((dst, worker), client.clone());
        client
    }

    /// Sends `req` (absolute URI with the client's authority) to `dst`
    /// over HTTP/2, on a connection of `worker`'s pool.
    pub async fn send_h2(
        &self,
        dst: SocketAddr,
        worker: usize,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, RequestError> {
        let client = self.h2_client(dst, worker);
        client
            .request(req)
            .await
            .map_err(|e| classify(dst, self.cfg.connect_timeout, e))
    }
}

/// The HTTP/1.1 upstream connection of one client connection. Its
/// requests come one after another, so the connection that carried one
/// carries the next without a pool lookup; when the client connection
/// closes, the upstream connection goes to its worker's idle pool for the
/// next client connection to the same destination and authority.
pub struct StickyH1 {
    held: Mutex<Held>,
    home: Option<(Arc<IdleH1>, Key)>,
}

/// A connection held between requests, and the authority it is for
/// (kept while the connection is lent to a request, so the next request
/// for the same authority costs no allocation).
#[derive(Default)]
struct Held {
    authority: String,
    sender: Option<H1Sender>,
}

impl StickyH1 {
    fn take(&self, authority: &str) -> Option<H1Sender> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.authority == authority {
            held.sender.take()
        } else {
            None
        }
    }

    /// Keeps `sender` for the next request; one it replaces (requests
    /// that overlapped, or another authority) goes to the idle pool.
    fn put(&self, authority: &str, sender: H1Sender) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let spare = if held.authority == authority {
            held.sender
                .replace(sender)
                .map(|s| (authority.to_owned(), s))
        } else {
            let old = std::mem::replace(
                &mut *held,
                Held {
                    authority: authority.to_owned(),
                    sender: Some(sender),
                },
            );
            old.sender.map(|s| (old.authority, s))
        };
        drop(held);
        if let (Some((authority, spare)), Some((pool, (dst, worker)))) = (spare, &self.home) {
            pool.put((*dst, *worker, authority), spare);
        }
    }
}

impl Drop for StickyH1 {
    fn drop(&mut self) {
        let held = std::mem::take(self.held.get_mut().unwrap_or_else(|e| e.into_inner()));
        if let (Some(sender), Some((pool, (dst, worker)))) = (held.sender, &self.home) {
            pool.put((*dst, *worker, held.authority), sender);
        }
    }
}

/// Idle HTTP/1.1 upstream connections by destination, worker and
/// authority, most recently used last.
struct IdleH1 {
    idle_timeout: Duration,
    conns: Mutex<HashMap<IdleKey, Vec<(H1Sender, Instant)>>>,
}

impl IdleH1 {
    fn put(&self, key: IdleKey, sender: H1Sender) {
        if sender.is_closed() {
            return;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= MAX_CLIENTS && !conns.contains_key(&key) {
            // Dropped: its connection closes.
            return;
        }
        conns.entry(key).or_default().push((sender, Instant::now()));
    }

    fn take(&self, key: IdleKey) -> Option<H1Sender> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let idle = conns.get_mut(&key)?;
        let mut found = None;
        while let Some((sender, since)) = idle.pop() {
            if self.usable(&sender, since) {
                found = Some(sender);
                break;
            }
        }
        if idle.is_empty() {
            conns.remove(&key);
        }
        found
    }

    /// Open, and idle for less than the idle timeout.
    fn usable(&self, sender: &H1Sender, idle_since: Instant) -> bool {
        !sender.is_closed() && idle_since.elapsed() < self.idle_timeout
    }

    fn close_expired(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, idle| {
            idle.retain(|(sender, since)| self.usable(sender, *since));
            !idle.is_empty()
        });
    }
}

fn connect_error(dst: SocketAddr, connect_timeout: Duration, e: ConnectError) -> RequestError {
    match e {
        ConnectError::Timeout => RequestError::UpstreamConnectTimeout {
            dst,
            after: connect_timeout,
        },
        ConnectError::Unreachable(source) => RequestError::UpstreamUnreachable { dst, source },
        ConnectError::Tls { to, name, failure } => RequestError::UpstreamTls {
            dst: to,
            name,
            failure,
        },
    }
}

/// Maps a client error to the client-facing error: a failed connect
/// (found among its causes) as such, else the client's error.
fn classify(
    dst: SocketAddr,
    connect_timeout: Duration,
    e: hyper_util::client::legacy::Error,
) -> RequestError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(ce) = s.downcast_ref::<ConnectError>() {
            return connect_error(dst, connect_timeout, ce.clone());
        }
        source = s.source();
    }
    RequestError::Upstream {
        dst,
        source: e.into(),
    }
}

/// Why a connection to an upstream failed. Its causes are shared, so the
/// error can be taken out of the HTTP client's error, which holds it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    #[error("TLS with {to} ({name})")]
    Tls {
        /// Where the TLS connection went (the rule's port).
        to: SocketAddr,
        name: String,
        #[source]
        failure: TlsFailure,
    },
}

/// Why a TCP connect to an upstream failed: the common cases by name (the
/// OS error adds nothing to them), any other with its OS error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unreachable {
    #[error("connection refused")]
    Refused,
    #[error("connection reset")]
    Reset,
    #[error("host unreachable")]
    HostUnreachable,
    #[error("network unreachable")]
    NetworkUnreachable,
    #[error("connect")]
    Io(#[source] Arc<io::Error>),
}

impl From<io::Error> for Unreachable {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::ConnectionReset => Self::Reset,
            io::ErrorKind::HostUnreachable => Self::HostUnreachable,
            io::ErrorKind::NetworkUnreachable => Self::NetworkUnreachable,
            _ => Self::Io(Arc::new(e)),
        }
    }
}

/// Why a TLS handshake to an upstream failed, as the client is told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsFailure {
    #[error("certificate expired")]
    Expired,
    #[error("certificate not valid yet")]
    NotYetValid,
    #[error("certificate not valid for this name{}", presented_names(.0))]
    WrongName(Vec<String>),
    #[error("certificate issued by an unknown CA (trusted: the webpki roots and --ca-file)")]
    UnknownIssuer,
    #[error("the server chose {} instead of h2 for an HTTP/2 request", alpn_name(.alpn.as_deref()))]
    NotH2 {
        /// The protocol it chose (ALPN), if any.
        alpn: Option<Vec<u8>>,
    },
    #[error("not a valid TLS server name")]
    InvalidName,
    /// Any other failure rustls names (its text says what).
    #[error(transparent)]
    Rustls(rustls::Error),
    /// The handshake failed below TLS (the connection reset or closed).
    #[error(transparent)]
    Io(Arc<io::Error>),
}

fn alpn_name(alpn: Option<&[u8]>) -> String {
    match alpn {
        Some(p) => String::from_utf8_lossy(p).into_owned(),
        None => "no protocol (ALPN)".to_owned(),
    }
}

/// A certificate's name as rustls reports it (`DnsName("a.example")`,
/// `IpAddress(192.0.2.1)`), without the wrapping.
fn plain_name(reported: &str) -> String {
    let inner = reported
        .strip_prefix("DnsName(")
        .or_else(|| reported.strip_prefix("IpAddress("))
        .and_then(|r| r.strip_suffix(')'));
    match inner {
        Some(n) => n.trim_matches('"').to_owned(),
        None => reported.to_owned(),
    }
}

fn presented_names(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (it is for {})", names.join(", "))
    }
}

impl TlsFailure {
    /// The failure of a handshake that ended with `e`.
    fn of(e: io::Error) -> Self {
        use rustls::CertificateError as C;
        let rustls_error = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let Some(rustls_error) = rustls_error else {
            return Self::Io(Arc::new(e));
        };
        match rustls_error {
            rustls::Error::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => Self::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Self::NotYetValid,
                C::NotValidForName => Self::WrongName(Vec::new()),
                C::NotValidForNameContext { presented, .. } => {
                    Self::WrongName(presented.iter().map(|n| plain_name(n)).collect())
                }
                C::UnknownIssuer => Self::UnknownIssuer,
                _ => Self::Rustls(rustls_error.clone()),
            },
            other => Self::Rustls(other.clone()),
        }
    }
}

/// Dials one original destination: over TLS to the port the rules give
/// for the URI's host, else as it is; the URI only names the TLS server.
#[derive(Clone)]
struct Connector {
    dst: SocketAddr,
    proto: Protocol,
    rules: Arc<TlsRules>,
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    sockets: SocketFactory,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri.host().unwrap_or_default()).await })
    }
}

impl Connector {
    /// Connects to the destination within `--connect-timeout` (TCP and
    /// TLS); `host` (an authority or host) names the TLS server.
    async fn connect(&self, host: &str) -> Result<Conn, ConnectError> {
        tokio::time::timeout(self.connect_timeout, self.dial(host))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    /// [`Self::connect`] without its time limit.
    async fn dial(&self, host: &str) -> Result<Conn, ConnectError> {
        let host = host_of(host);
        let Some(port) = self.rules.tls_port(self.dst, host) else {
            let tcp = dial_tcp(&self.sockets, self.dst)
                .await
                .map_err(|e| ConnectError::Unreachable(e.into()))?;
            return Ok(Conn::Plain(TokioIo::new(tcp)));
        };
        let to = SocketAddr::new(self.dst.ip(), port);
        let tls_error = |failure| ConnectError::Tls {
            to,
            name: host.to_owned(),
            failure,
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| tls_error(TlsFailure::InvalidName))?;
        let tcp = dial_tcp(&self.sockets, to)
            .await
            .map_err(|e| ConnectError::Unreachable(e.into()))?;
        let stream = TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(TlsFailure::of(e)))?;
        if self.proto == Protocol::Http2 {
            let (_, session) = stream.get_ref();
            if session.alpn_protocol() != Some(b"h2") {
                let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                return Err(tls_error(TlsFailure::NotH2 { alpn }));
            }
        }
        Ok(Conn::Tls(Box::new(TokioIo::new(stream))))
    }
}

/// Connects to `dst` with a socket made by `sockets`, without delay
/// (Nagle off).
async fn dial_tcp(sockets: &SocketFactory, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = sockets.tcp_socket(&dst)?;
    let tcp = TcpSocket::from_std_stream(socket.into())
        .connect(dst)
        .await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`), without
/// brackets.
pub fn host_of(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

/// An upstream connection.
enum Conn {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(_) => Connected::new(),
            Self::Tls(s) => {
                let (_, session) = s.inner().get_ref();
                if session.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_read_plainly() {
        assert_eq!(plain_name("DnsName(\"a.example\")"), "a.example");
        assert_eq!(plain_name("IpAddress(192.0.2.1)"), "192.0.2.1");
        assert_eq!(plain_name("DirectoryName"), "DirectoryName");
        assert_eq!(
            TlsFailure::WrongName(vec!["a.example".into(), "b.example".into()]).to_string(),
            "certificate not valid for this name (it is for a.example, b.example)"
        );
        assert_eq!(
            TlsFailure::NotH2 {
                alpn: Some(b"http/1.1".to_vec())
            }
            .to_string(),
            "the server chose http/1.1 instead of h2 for an HTTP/2 request"
        );
        assert_eq!(
            TlsFailure::NotH2 { alpn: None }.to_string(),
            "the server chose no protocol (ALPN) instead of h2 for an HTTP/2 request"
        );
        assert_eq!(host_of("[fd00::1]:80"), "fd00::1");
        assert_eq!(host_of("svc.example:8080"), "svc.example");
        assert_eq!(host_of("svc.example"), "svc.example");
    }
}
