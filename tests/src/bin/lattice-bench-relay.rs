//! The `floor` of `cargo xtask bench`: the cheapest user-space proxy on
//! lattice's path. It takes the same eBPF redirect as the agent (the agent
//! runs with `--intercept-only`), learns each connection's original
//! destination with `SO_ORIGINAL_DST` (answered by the cgroup/getsockopt
//! program, so it must run inside the intercepted cgroup, as the exempt
//! UID), connects there and copies bytes both ways: no HTTP parsing, no
//! signing, one thread. Its CPU per request and the latency it adds are
//! what the two extra loopback hops cost any proxy on this path.
//!
//! With `--http` (the bench's `http-floor`) each connection is HTTP/1.1
//! through hyper instead, built as the agent is (hyper's server and client
//! on one current-thread runtime, one upstream connection per client
//! connection, each message written with one send(2)), but forwarding
//! requests unchanged: no signing, no header rules, no metrics. What it
//! costs above the byte relay is what parsing and writing HTTP/1 on both
//! hops costs with hyper; what the agent costs above it is the agent's own.
//!
//! Usage: lattice-bench-relay [--http] PORT
//! Listens on 127.0.0.1:PORT and prints `listening`; on SIGTERM or SIGINT
//! prints `relayed N connections` and exits.

use std::{
    cell::Cell,
    net::{Ipv4Addr, SocketAddr},
    process::ExitCode,
    rc::Rc,
};

use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::TokioIo;
use lattice_tests::orig_dst::original_dst;
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    task::LocalSet,
};

/// What is relayed: bytes, or HTTP/1.1 messages through hyper.
#[derive(Clone, Copy)]
enum Mode {
    Bytes,
    Http,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, port) = match args.as_slice() {
        [port] => (Mode::Bytes, port),
        [flag, port] if flag == "--http" => (Mode::Http, port),
        _ => {
            eprintln!("usage: lattice-bench-relay [--http] PORT");
            return ExitCode::from(64);
        }
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("lattice-bench-relay: PORT: not a port number: {port}");
        return ExitCode::from(64);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lattice-bench-relay: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match LocalSet::new().block_on(&runtime, serve(mode, port)) {
        Ok(relayed) => {
            println!("relayed {relayed} connections");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lattice-bench-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Relays until SIGTERM/SIGINT; returns how many connections it took.
async fn serve(mode: Mode, port: u16) -> std::io::Result<u64> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    println!("listening");
    let relayed = Rc::new(Cell::new(0u64));
    loop {
        let (client, peer) = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("lattice-bench-relay: accept: {e}");
                    continue;
                }
            },
        };
        let relayed = Rc::clone(&relayed);
        tokio::task::spawn_local(async move {
            match connect(&client, peer).await {
                Ok(upstream) => {
                    relayed.set(relayed.get() + 1);
                    match mode {
                        Mode::Bytes => relay(client, upstream).await,
                        Mode::Http => relay_http(client, upstream).await,
                    }
                }
                Err(e) => eprintln!("lattice-bench-relay: {peer}: {e}"),
            }
        });
    }
    Ok(relayed.get())
}

/// Connects to where `client` was going.
async fn connect(client: &TcpStream, peer: SocketAddr) -> std::io::Result<TcpStream> {
    let dst = original_dst(client, peer)
        .map_err(|e| std::io::Error::other(format!("SO_ORIGINAL_DST: {e}")))?;
    let upstream = TcpStream::connect(dst).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    Ok(upstream)
}

/// Copies both ways until both sides are done. A reset when the load
/// generator stops is how a run ends, not an error worth a line.
async fn relay(mut client: TcpStream, mut upstream: TcpStream) {
    let _ = copy_bidirectional(&mut client, &mut upstream).await;
}

/// Serves `client`'s requests with hyper, each sent on over `upstream`
/// and answered with the upstream's response, unchanged.
async fn relay_http(client: TcpStream, upstream: TcpStream) {
    let (sender, upstream_conn) = match hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake::<_, Incoming>(TokioIo::new(upstream))
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("lattice-bench-relay: upstream handshake: {e}");
            return;
        }
    };
    tokio::task::spawn_local(async move {
        let _ = upstream_conn.await;
    });
    // hyper's HTTP/1 server calls the service for one request at a time,
    // so the sender is taken for a request and put back once its response
    // head is in.
    let sender: Rc<Cell<Option<SendRequest<Incoming>>>> = Rc::new(Cell::new(Some(sender)));
    let service = service_fn(move |req| {
        let sender = Rc::clone(&sender);
        async move {
            let mut s = sender
                .take()
                .ok_or_else(|| std::io::Error::other("upstream connection lost"))?;
            let resp = s.send_request(req).await.map_err(std::io::Error::other)?;
            sender.set(Some(s));
            Ok::<_, std::io::Error>(resp)
        }
    });
    // A reset when the load generator stops ends the connection: no line.
    let _ = hyper::server::conn::http1::Builder::new()
        .writev(false)
        .keep_alive(true)
        .serve_connection(TokioIo::new(client), service)
        .await;
}
