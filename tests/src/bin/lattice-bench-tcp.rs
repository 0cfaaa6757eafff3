//! The `passthrough` scenario's TCP server and load of `cargo xtask
//! bench`: traffic that is not HTTP, which lattice passes through
//! unchanged. Every payload starts with a zero byte, as binary protocols'
//! messages do, so the agent classifies the connection as such at once.
//!
//! Usage:
//!   lattice-bench-tcp echo ADDR:PORT
//!       echoes every connection's bytes back until it closes; prints
//!       `listening` once bound
//!   lattice-bench-tcp pingpong ADDR:PORT SECS
//!       one connection, 64-byte messages echoed back one at a time for
//!       SECS seconds
//!   lattice-bench-tcp stream ADDR:PORT MIB
//!       one connection: MIB MiB sent while the echo is read back
//!   lattice-bench-tcp conns ADDR:PORT SECS C
//!       C threads, each opening connections one after another for SECS
//!       seconds: connect, one 64-byte message echoed back, close
//! Each load prints one JSON line: `round_trips`, `connections`, `bytes`
//! (both ways), `seconds`, `errors` and for pingpong `p50_us`/`p99_us`.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

const MESSAGE: usize = 64;
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed = |addr: &str| addr.parse::<SocketAddr>().ok();
    match args.as_slice() {
        ["echo", addr] => match parsed(addr) {
            Some(a) => echo(a),
            None => usage(),
        },
        ["pingpong", addr, secs] => match (parsed(addr), secs.parse()) {
            (Some(a), Ok(s)) => report(pingpong(a, Duration::from_secs(s))),
            _ => usage(),
        },
        ["stream", addr, mib] => match (parsed(addr), mib.parse()) {
            (Some(a), Ok(m)) => report(stream(a, m)),
            _ => usage(),
        },
        ["conns", addr, secs, c] => match (parsed(addr), secs.parse(), c.parse()) {
            (Some(a), Ok(s), Ok(c)) => report(conns(a, Duration::from_secs(s), c)),
            _ => usage(),
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: lattice-bench-tcp echo ADDR:PORT | pingpong ADDR:PORT SECS \
         | stream ADDR:PORT MIB | conns ADDR:PORT SECS C"
    );
    ExitCode::from(64)
}

fn report(result: std::io::Result<serde_json::Value>) -> ExitCode {
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lattice-bench-tcp: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One thread, epoll: the same upstream cost in every scenario.
fn echo(addr: SocketAddr) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening");
        let _ = std::io::stdout().flush();
        loop {
            let (mut conn, _) = listener.accept().await?;
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice-bench-tcp echo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// A binary message: a zero byte first.
fn message() -> [u8; MESSAGE] {
    let mut m = [0x5au8; MESSAGE];
    m[0] = 0;
    m
}

fn pingpong(addr: SocketAddr, secs: Duration) -> std::io::Result<serde_json::Value> {
    let mut s = connect(addr)?;
    let msg = message();
    let mut back = [0u8; MESSAGE];
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < secs {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let seconds = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    Ok(serde_json::json!({
        "round_trips": times.len(),
        "bytes": times.len() * MESSAGE * 2,
        "seconds": seconds,
        "errors": 0,
        "p50_us": at(0.5),
        "p99_us": at(0.99),
    }))
}

fn stream(addr: SocketAddr, mib: u64) -> std::io::Result<serde_json::Value> {
    let s = connect(addr)?;
    let mut reader = s.try_clone()?;
    let mut writer = s;
    let total = mib << 20;
    let started = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0xa5u8; 64 << 10];
        chunk[0] = 0;
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            writer.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    sender
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))??;
    if got != total {
        return Err(std::io::Error::other(format!(
            "sent {total} bytes, {got} came back"
        )));
    }
    Ok(serde_json::json!({
        "bytes": total * 2,
        "seconds": started.elapsed().as_secs_f64(),
        "errors": 0,
    }))
}

fn conns(addr: SocketAddr, secs: Duration, c: usize) -> std::io::Result<serde_json::Value> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..c.max(1))
        .map(|_| {
            let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
            std::thread::spawn(move || {
                let msg = message();
                let mut back = [0u8; MESSAGE];
                while started.elapsed() < secs {
                    let ok = connect(addr).and_then(|mut s| {
                        s.write_all(&msg)?;
                        s.read_exact(&mut back)
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Relaxed),
                        Err(_) => errors.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let n = done.load(Relaxed);
    Ok(serde_json::json!({
        "connections": n,
        "bytes": n * MESSAGE as u64 * 2,
        "seconds": started.elapsed().as_secs_f64(),
        "errors": errors.load(Relaxed),
    }))
}
