//! The `floor` of `cargo xtask bench`: the cheapest user-space proxy on
//! lattice's path. It takes the same eBPF redirect as the agent (the agent
//! runs with `--intercept-only`), learns each connection's original
//! destination with `SO_ORIGINAL_DST` (answered by the cgroup/getsockopt
//! program, so it must run inside the intercepted cgroup, as the exempt
//! UID), connects there and copies bytes both ways: no HTTP parsing, no
//! signing, one thread. Its CPU per request and the latency it adds are
//! what the two extra loopback hops cost any proxy on this path.
//!
//! Usage: lattice-bench-relay PORT
//! Listens on 127.0.0.1:PORT and prints `listening`; on SIGTERM or SIGINT
//! prints `relayed N connections` and exits.

use std::{
    cell::Cell,
    net::{Ipv4Addr, SocketAddr},
    process::ExitCode,
    rc::Rc,
};

use lattice_tests::orig_dst::original_dst;
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    task::LocalSet,
};

fn main() -> ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: lattice-bench-relay PORT");
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
    match LocalSet::new().block_on(&runtime, serve(port)) {
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
async fn serve(port: u16) -> std::io::Result<u64> {
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
                    relay(client, upstream).await;
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
