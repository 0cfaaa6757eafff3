//! A TLS listener in front of a plaintext service, as an HTTPS listener
//! of VPC Lattice is in front of its targets: it completes the handshake
//! with its certificate (rustls), offers the ALPN protocols it is given,
//! and copies the decrypted bytes to the backend and back. The backend
//! (the botocore verifier) serves HTTP/1.1 and h2c, so whichever protocol
//! the client and this listener agreed on reaches it unchanged.
//!
//! Usage: lattice-test-tls-front LISTEN_ADDR:PORT CERT.pem KEY.pem
//!        BACKEND_ADDR:PORT [ALPN,...]
//! Prints `listening` once bound, and one line per connection:
//! `tls-front sni=<name> alpn=<protocol>` (`none` for either when absent),
//! or `tls-front handshake failed: <reason>`.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use rustls::{ServerConfig, pki_types::CertificateDer, pki_types::PrivateKeyDer};
use rustls_pki_types::pem::PemObject as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, cert, key, backend, alpn) = match args.as_slice() {
        [l, c, k, b] => (l, c, k, b, "h2,http/1.1"),
        [l, c, k, b, a] => (l, c, k, b, a.as_str()),
        _ => {
            eprintln!(
                "usage: lattice-test-tls-front LISTEN_ADDR:PORT CERT.pem KEY.pem BACKEND_ADDR:PORT [ALPN,...]"
            );
            return ExitCode::from(64);
        }
    };
    let (Ok(listen), Ok(backend)) = (listen.parse::<SocketAddr>(), backend.parse::<SocketAddr>())
    else {
        eprintln!("lattice-test-tls-front: bad address");
        return ExitCode::from(64);
    };
    let config = match server_config(cert, key, alpn) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lattice-test-tls-front: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(serve(listen, backend, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice-test-tls-front: {e}");
            ExitCode::FAILURE
        }
    }
}

fn server_config(cert: &str, key: &str, alpn: &str) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(Arc::new(config))
}

async fn serve(
    listen: SocketAddr,
    backend: SocketAddr,
    config: Arc<ServerConfig>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let acceptor = TlsAcceptor::from(config);
    println!("listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    println!("tls-front handshake failed: {e}");
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            println!(
                "tls-front sni={} alpn={}",
                session.server_name().unwrap_or("none"),
                session
                    .alpn_protocol()
                    .map_or("none".into(), |p| String::from_utf8_lossy(p).into_owned())
            );
            match TcpStream::connect(backend).await {
                Ok(mut plain) => {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
                Err(e) => println!("tls-front backend {backend}: {e}"),
            }
        });
    }
}
