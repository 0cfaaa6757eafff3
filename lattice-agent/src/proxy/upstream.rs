//! Forwarding to the original destination: pooled keep-alive connections
//! (HTTP/1.1, or HTTP/2 for h2c clients), optionally over TLS.
//!
//! Where to connect is only ever the original destination's IP and port.
//! The request URI carries the client's authority (for the pool key, the
//! HTTP/2 `:authority`, and TLS SNI/certificate name), never an address: each
//! original destination has clients of its own whose connector dials that
//! destination whatever the URI says.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
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

use super::{body::ProxyBody, errors::RequestError};
use crate::{credentials::error_chain, netns::SocketFactory};

/// Upstream protocol, following the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Client TLS settings for `--upstream-tls`, one per ALPN protocol.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("--ca-file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsConfigs {
    /// webpki roots plus the PEM certificates in `ca_file`; ring provider
    /// (the one aws-config's HTTPS client uses too).
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let ca_err = |reason: String| TlsConfigError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(ca_err("no PEM certificates found".into()));
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
        http2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            http1: Arc::new(http1),
            http2: Arc::new(http2),
        })
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub tls: Option<TlsConfigs>,
    pub connect_timeout: Duration,
    /// Pooled connections idle this long are closed.
    pub idle_timeout: Duration,
    /// Where the upstream sockets are created (the workload's netns).
    pub sockets: SocketFactory,
}

type HttpClient = Client<Connector, ProxyBody>;

/// Beyond this many distinct (destination, protocol, worker) keys the
/// client map is reset (their pooled connections close when idle).
const MAX_CLIENTS: usize = 4096;

pub struct Upstream {
    cfg: UpstreamConfig,
    /// One client (and connection pool) per destination, protocol and
    /// `--workers` thread: a thread only reuses connections its own event
    /// loop drives.
    clients: Mutex<HashMap<(SocketAddr, Protocol, usize), HttpClient>>,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Self {
        Self {
            cfg,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// URI scheme for requests sent upstream.
    pub fn scheme(&self) -> &'static str {
        if self.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn client(&self, dst: SocketAddr, proto: Protocol, worker: usize) -> HttpClient {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&(dst, proto, worker)) {
            return c.clone();
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let tls = self.cfg.tls.as_ref().map(|t| match proto {
            Protocol::Http1 => Arc::clone(&t.http1),
            Protocol::Http2 => Arc::clone(&t.http2),
        });
        let connector = Connector {
            dst,
            tls,
            connect_timeout: self.cfg.connect_timeout,
            sockets: self.cfg.sockets.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.cfg.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(proto == Protocol::Http2)
            .build(connector);
        clients.insert((dst, proto, worker), client.clone());
        client
    }

    /// Sends `req` (absolute URI with the client's authority) to `dst`,
    /// over a connection of `worker`'s pool.
    pub async fn send(
        &self,
        dst: SocketAddr,
        proto: Protocol,
        worker: usize,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, RequestError> {
        let client = self.client(dst, proto, worker);
        client
            .request(req)
            .await
            .map_err(|e| classify(dst, self.cfg.connect_timeout, &e))
    }
}

/// Maps a client error to the client-facing error.
fn classify(
    dst: SocketAddr,
    connect_timeout: Duration,
    e: &hyper_util::client::legacy::Error,
) -> RequestError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(ce) = s.downcast_ref::<ConnectError>() {
            return match ce {
                ConnectError::Timeout => RequestError::UpstreamConnectTimeout {
                    dst,
                    after: connect_timeout,
                },
                ConnectError::Io(io) => RequestError::UpstreamUnreachable {
                    dst,
                    reason: io_reason(io),
                },
                ConnectError::Tls(reason) => RequestError::UpstreamUnreachable {
                    dst,
                    reason: format!("TLS: {reason}"),
                },
            };
        }
        source = s.source();
    }
    RequestError::Upstream {
        dst,
        reason: error_chain(e),
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => format!("connect: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Dials one fixed destination; the URI only names the TLS server.
#[derive(Clone)]
struct Connector {
    dst: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
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
        Box::pin(async move {
            tokio::time::timeout(this.connect_timeout, this.connect(&uri))
                .await
                .map_err(|_| ConnectError::Timeout)?
        })
    }
}

impl Connector {
    async fn connect(&self, uri: &Uri) -> Result<Conn, ConnectError> {
        let socket = self.sockets.tcp_socket(&self.dst)?;
        let tcp = TcpSocket::from_std_stream(socket.into())
            .connect(self.dst)
            .await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Conn::Plain(TokioIo::new(tcp)));
        };
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| ConnectError::Tls(format!("invalid server name {host:?}")))?;
        let stream = TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Tls(error_chain(&e)))?;
        Ok(Conn::Tls(Box::new(TokioIo::new(stream))))
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
