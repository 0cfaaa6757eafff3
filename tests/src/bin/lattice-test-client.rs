//! An application in a test pod: connects where it is told and prints what
//! it got, so tests can tell where a connection really ended up.
//!
//! Usage:
//!   lattice-test-client tcp ADDR:PORT          connect, read to EOF, print it
//!   lattice-test-client tcp-mapped A.B.C.D:PORT  same, AF_INET6 socket to ::ffff:A.B.C.D
//!   lattice-test-client udp ADDR:PORT          send "ping", print the reply (2 s)
//!   lattice-test-client many ADDR:PORT N       N sequential connections
//!   lattice-test-client http ADDR:PORT         one HTTP/1.1 GET, print the body
//!   lattice-test-client http-mapped A.B.C.D:PORT  same over an AF_INET6 socket
//!   lattice-test-client many-http ADDR:PORT N  N sequential GETs, one connection each
//!                                              (also counts replies that saw no signature)
//!   lattice-test-client flood ADDR:PORT HOLD ACTIVE SECS
//!       HOLD connections that send a request head one byte a second and
//!       never finish it (slowloris), plus ACTIVE connections sending
//!       keep-alive GETs back to back, for SECS seconds; prints
//!       `flood held=<n> refused=<n> requests=<n> errors=<n>`
//!   lattice-test-client load ADDR:PORT SECS HOST
//!       for SECS seconds, GETs back to back, a new connection each
//!       (`Host: HOST`), retrying refused connects after 5 ms as an app
//!       would; prints one JSON line: `ok` (status 200), `refused`,
//!       `failed` (anything else, with the first few reasons), and
//!       CLOCK_MONOTONIC ns of the first and last refusal and of the first
//!       200 after the last refusal or failure (`recovered_ns`), the 200s'
//!       p50/p99/max latency (µs)
//!   lattice-test-client load-keepalive ADDR:PORT SECS HOST
//!       the same on one kept-alive connection at a time, as an HTTP
//!       client library would: a request whose reused connection closes
//!       before any reply is sent again once on a new connection (counted
//!       as `retried`, as Go's net/http does for idempotent requests);
//!       `connections` counts the connections opened
//!   lattice-test-client first-call ADDR:PORT HOST PATH
//!       what an app does at its first instruction: one GET (`Host: HOST`),
//!       no retry; prints one JSON line: `outcome` (`reply` with `status`,
//!       `refused`, or `error` with `reason`) and `connect_us`, `total_us`
//!   lattice-test-client wait-signed ADDR:PORT SECS
//!       prints `polling`, then GETs every millisecond (a new connection
//!       each) until a reply from lattice-test-service shows the request
//!       arrived signed; prints `signed <CLOCK_MONOTONIC ns>` (comparable
//!       across processes) and exits 0, or exits 1 after SECS
//!
//!   lattice-test-client idle ADDR:PORT N SECS
//!       N keep-alive connections, each sending one GET (`Host: idle`) and
//!       then nothing (the answers are not read), held open for SECS
//!       seconds; prints `holding opened=<n> failed=<n>` once all are
//!       opened, `idle closed=<n>` (connections the other end closed) at
//!       the end
//!   lattice-test-client script ADDR:PORT STEP...
//!       a scripted exchange for protocols that are not HTTP (steps as in
//!       the kit's `script` module: send:HEX, send-random:N, expect:N,
//!       shut, rest); prints `sent=<len>:<hash> received=<len>:<hash>`
//!       and `head=<hex>` (the first bytes received); I/O errors exit 2
//!
//! `tcp` and `http` also print `client local=<addr> peer=<addr>` to stderr,
//! `http` then `http-status=<code>`; a status other than 200 exits 4.
//! Connect errors print `error: <ErrorKind>: <message>` and exit 2.
//!
//! Safety net: it refuses (exit 3) to send anything to an address that is
//! neither loopback nor one of the current network namespace's own
//! addresses, unless it runs inside the namespace the test kit created and
//! named in `LATTICE_TEST_NETNS` (a test node's pods, whose only routes lead
//! to other test namespaces). Run anywhere else by mistake, a Lattice
//! address could leave the machine.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["tcp", addr] => with_addr(addr, |a| tcp_once(a, false)),
        ["tcp-mapped", addr] => with_addr(addr, |a| tcp_once(a, true)),
        ["udp", addr] => with_addr(addr, udp),
        ["many", addr, n] => match n.parse() {
            Ok(n) => with_addr(addr, |a| many(a, n, false)),
            Err(_) => usage(),
        },
        ["http", addr] => with_addr(addr, |a| http_once(a, false)),
        ["http-mapped", addr] => with_addr(addr, |a| http_once(a, true)),
        ["many-http", addr, n] => match n.parse() {
            Ok(n) => with_addr(addr, |a| many(a, n, true)),
            Err(_) => usage(),
        },
        ["load", addr, secs, host] => match secs.parse() {
            Ok(secs) => with_addr(addr, |a| load(a, Duration::from_secs(secs), host)),
            Err(_) => usage(),
        },
        ["load-keepalive", addr, secs, host] => match secs.parse() {
            Ok(secs) => with_addr(addr, |a| load_keepalive(a, Duration::from_secs(secs), host)),
            Err(_) => usage(),
        },
        ["first-call", addr, host, path] => with_addr(addr, |a| first_call(a, host, path)),
        ["idle", addr, n, secs] => match (n.parse(), secs.parse()) {
            (Ok(n), Ok(secs)) => with_addr(addr, |a| idle(a, n, Duration::from_secs(secs))),
            _ => usage(),
        },
        ["script", addr, steps @ ..] => {
            match steps
                .iter()
                .map(|s| lattice_tests::script::Step::parse(s))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(steps) => with_addr(addr, |a| script(a, &steps)),
                Err(e) => {
                    eprintln!("{e}");
                    usage()
                }
            }
        }
        ["wait-signed", addr, secs] => match secs.parse() {
            Ok(secs) => with_addr(addr, |a| wait_signed(a, Duration::from_secs(secs))),
            Err(_) => usage(),
        },
        ["flood", addr, hold, active, secs] => match (hold.parse(), active.parse(), secs.parse()) {
            (Ok(hold), Ok(active), Ok(secs)) => {
                with_addr(addr, |a| flood(a, hold, active, Duration::from_secs(secs)))
            }
            _ => usage(),
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: lattice-test-client tcp|tcp-mapped|udp|http|http-mapped ADDR:PORT \
         | many|many-http ADDR:PORT N | flood ADDR:PORT HOLD ACTIVE SECS \
         | wait-signed ADDR:PORT SECS | load|load-keepalive ADDR:PORT SECS HOST \
         | first-call ADDR:PORT HOST PATH | idle ADDR:PORT N SECS | script ADDR:PORT STEP..."
    );
    ExitCode::from(64)
}

fn with_addr(addr: &str, f: impl FnOnce(SocketAddr) -> ExitCode) -> ExitCode {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("bad address {addr:?}");
        return ExitCode::from(64);
    };
    if !addr.ip().is_loopback() && !is_local_address(addr.ip()) && !in_test_netns() {
        println!(
            "error: refusing to connect to {addr}: not an address of this network namespace, \
             which is not a test namespace (LATTICE_TEST_NETNS)"
        );
        return ExitCode::from(3);
    }
    f(addr)
}

/// True when this process is in the network namespace the test kit named
/// in `LATTICE_TEST_NETNS` (it sets it for every process it places in a
/// namespace of its own).
fn in_test_netns() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = |path: &std::path::Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let Some(declared) = std::env::var_os("LATTICE_TEST_NETNS") else {
        return false;
    };
    matches!(
        (id("/proc/self/ns/net".as_ref()), id(declared.as_ref())),
        (Some(own), Some(test)) if own == test
    )
}

/// True when `ip` is assigned in this network namespace, so traffic to it
/// (redirected or not) stays on the machine. Binding to an address succeeds
/// only for local ones, unless ip_nonlocal_bind is on: then we cannot tell,
/// and refusing is the safe answer. (Binding sends nothing.)
fn is_local_address(ip: IpAddr) -> bool {
    let sysctl = match ip {
        IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_nonlocal_bind",
        IpAddr::V6(_) => "/proc/sys/net/ipv6/ip_nonlocal_bind",
    };
    let nonlocal_bind = std::fs::read_to_string(sysctl).map_or(true, |v| v.trim() != "0");
    !nonlocal_bind && UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn connect(addr: SocketAddr, mapped: bool) -> std::io::Result<TcpStream> {
    let target = match (addr, mapped) {
        // std opens an AF_INET6 socket for a V6 address: that is the point.
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (a, _) => a,
    };
    let stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Connects; with `request`, sends it first; reads to EOF.
fn exchange(
    addr: SocketAddr,
    mapped: bool,
    verbose: bool,
    request: Option<&[u8]>,
) -> std::io::Result<String> {
    let mut stream = connect(addr, mapped)?;
    if verbose {
        // Lets a test match this connection with what the service saw: a
        // different port there means something (the relay) sat in between.
        if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) {
            eprintln!("client local={local} peer={peer}");
        }
    }
    if let Some(request) = request {
        stream.write_all(request)?;
    }
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn read_all(addr: SocketAddr, mapped: bool, verbose: bool) -> std::io::Result<String> {
    exchange(addr, mapped, verbose, None)
}

/// A GET for `/lattice-test` with the destination as Host, asking the
/// server to close afterwards (the reply then ends at EOF).
fn http_request(addr: SocketAddr) -> Vec<u8> {
    let host = match (addr.ip(), addr.port()) {
        (IpAddr::V4(ip), 80) => ip.to_string(),
        (IpAddr::V6(ip), 80) => format!("[{ip}]"),
        _ => addr.to_string(),
    };
    format!(
        "GET /lattice-test HTTP/1.1\r\nhost: {host}\r\nuser-agent: lattice-test-client\r\n\
         connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Status code and body of an HTTP/1.1 response read to EOF.
fn parse_response(text: &str) -> Option<(u16, &str)> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body))
}

fn http_get(addr: SocketAddr, mapped: bool, verbose: bool) -> Result<(u16, String), String> {
    let text = exchange(addr, mapped, verbose, Some(&http_request(addr)))
        .map_err(|e| format!("{:?}: {e}", e.kind()))?;
    let (status, body) =
        parse_response(&text).ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    Ok((status, body.to_owned()))
}

fn http_once(addr: SocketAddr, mapped: bool) -> ExitCode {
    if mapped && !matches!(addr, SocketAddr::V4(_)) {
        eprintln!("http-mapped takes an IPv4 address");
        return ExitCode::from(64);
    }
    match http_get(addr, mapped, true) {
        Ok((status, body)) => {
            eprintln!("http-status={status}");
            print!("{body}");
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            }
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn idle(addr: SocketAddr, n: usize, secs: Duration) -> ExitCode {
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0usize;
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(mut s) => match s.write_all(b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n") {
                Ok(()) => conns.push(s),
                Err(_) => failed += 1,
            },
            Err(_) => failed += 1,
        }
    }
    println!("holding opened={} failed={failed}", conns.len());
    let _ = std::io::stdout().flush();
    std::thread::sleep(secs);
    // Closed by the other end: a read sees the end of the stream (after
    // any answer) or an error, instead of blocking.
    let closed = conns
        .iter_mut()
        .filter(|s| {
            let mut s: &TcpStream = s;
            let _ = s.set_nonblocking(true);
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
                }
            }
        })
        .count();
    println!("idle closed={closed}");
    ExitCode::SUCCESS
}

fn script(addr: SocketAddr, steps: &[lattice_tests::script::Step]) -> ExitCode {
    let result = connect(addr, false).and_then(|mut stream| {
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        lattice_tests::script::run(&mut stream, steps)
    });
    match result {
        Ok((transcript, head)) => {
            println!("{}", transcript.line());
            println!("head={}", lattice_tests::script::encode_hex(&head));
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {:?}: {e}", e.kind());
            ExitCode::from(2)
        }
    }
}

fn tcp_once(addr: SocketAddr, mapped: bool) -> ExitCode {
    if mapped && !matches!(addr, SocketAddr::V4(_)) {
        eprintln!("tcp-mapped takes an IPv4 address");
        return ExitCode::from(64);
    }
    match read_all(addr, mapped, true) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {:?}: {e}", e.kind());
            ExitCode::from(2)
        }
    }
}

fn udp(addr: SocketAddr) -> ExitCode {
    let local: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => SocketAddrV4::new([0, 0, 0, 0].into(), 0).into(),
        IpAddr::V6(_) => SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0).into(),
    };
    let result = (|| {
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    })();
    match result {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            println!("error: timeout");
            ExitCode::from(2)
        }
        Err(e) => {
            println!("error: {:?}: {e}", e.kind());
            ExitCode::from(2)
        }
    }
}

fn many(addr: SocketAddr, n: usize, http: bool) -> ExitCode {
    let mut ok = 0usize;
    let mut failed = 0usize;
    let mut first_error = None;
    // HTTP replies of lattice-test-service --http that saw no signature.
    let mut unsigned = 0usize;
    for _ in 0..n {
        let result = if http {
            match http_get(addr, false, false) {
                Ok((200, body)) => Ok(body),
                Ok((status, body)) => Err(format!("status {status}: {}", body.trim())),
                Err(e) => Err(e),
            }
        } else {
            read_all(addr, false, false).map_err(|e| format!("{:?}: {e}", e.kind()))
        };
        match result {
            Ok(text) if !text.is_empty() => {
                ok += 1;
                unsigned += usize::from(text.contains("credential=none"));
            }
            Ok(_) => {
                failed += 1;
                first_error.get_or_insert_with(|| "empty reply".to_owned());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if http {
        println!("ok={ok} failed={failed} unsigned={unsigned}");
    } else {
        println!("ok={ok} failed={failed}");
    }
    if let Some(e) = first_error {
        println!("first error: {e}");
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Slowloris holders and back-to-back keep-alive GETs, for `secs`.
fn flood(addr: SocketAddr, hold: usize, active: usize, secs: Duration) -> ExitCode {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    };
    let deadline = std::time::Instant::now() + secs;
    let (held, refused, requests, errors) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    // Holders: a few threads each keep many connections, trickling bytes.
    let mut threads = Vec::new();
    let per_thread = hold.div_ceil(50).max(1);
    for chunk in 0..hold.div_ceil(per_thread) {
        let n = per_thread.min(hold - chunk * per_thread);
        let (held, refused) = (Arc::clone(&held), Arc::clone(&refused));
        threads.push(std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = (0..n)
                .filter_map(|_| match TcpStream::connect_timeout(&addr, TIMEOUT) {
                    Ok(mut s) => {
                        let _ = s.write_all(b"GET /slow HTTP/1.1\r\nHost: flood\r\nX-Slow: ");
                        held.fetch_add(1, Relaxed);
                        Some(s)
                    }
                    Err(_) => {
                        refused.fetch_add(1, Relaxed);
                        None
                    }
                })
                .collect();
            while std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_secs(1));
                conns.retain_mut(|s| s.write_all(b"a").is_ok());
            }
        }));
    }
    for _ in 0..active {
        let (requests, errors) = (Arc::clone(&requests), Arc::clone(&errors));
        threads.push(std::thread::spawn(move || {
            while std::time::Instant::now() < deadline {
                let Ok(mut s) = TcpStream::connect_timeout(&addr, TIMEOUT) else {
                    errors.fetch_add(1, Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = s.set_read_timeout(Some(TIMEOUT));
                while std::time::Instant::now() < deadline {
                    let sent = s.write_all(b"GET /flood HTTP/1.1\r\nHost: flood\r\n\r\n");
                    let answer = match sent {
                        Ok(()) => read_response(&mut s),
                        Err(e) => Err(format!("write: {e}")),
                    };
                    if let Err(why) = answer {
                        if errors.fetch_add(1, Relaxed) < 3 {
                            eprintln!("flood: {why}");
                        }
                        break;
                    }
                    requests.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    println!(
        "flood held={} refused={} requests={} errors={}",
        held.load(Relaxed),
        refused.load(Relaxed),
        requests.load(Relaxed),
        errors.load(Relaxed)
    );
    ExitCode::SUCCESS
}

/// Reads one HTTP/1.1 `200` response with a Content-Length body; an error
/// names what else happened (status, EOF, the server closing).
fn read_response(s: &mut TcpStream) -> Result<(), String> {
    let reply = read_reply(s).map_err(|e| e.to_string())?;
    if reply.status != 200 {
        return Err(format!("status {}: {}", reply.status, reply.body.trim()));
    }
    if reply.close {
        return Err("server closed the connection".into());
    }
    Ok(())
}

/// One HTTP/1.1 response read off a kept-alive connection.
struct Reply {
    status: u16,
    body: String,
    /// The server said `Connection: close`.
    close: bool,
}

#[derive(Debug)]
enum ReplyError {
    /// The connection ended before the first byte of a response: on a
    /// reused connection, the server closed it as the request went out.
    ClosedBeforeReply,
    Io(std::io::Error),
    Malformed(String),
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClosedBeforeReply => f.write_str("connection closed before a reply"),
            Self::Io(e) => write!(f, "{:?}: {e}", e.kind()),
            Self::Malformed(m) => write!(f, "malformed reply: {m}"),
        }
    }
}

/// Reads a response whose body has a Content-Length or is chunked.
fn read_reply(s: &mut TcpStream) -> Result<Reply, ReplyError> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) if head.is_empty() => return Err(ReplyError::ClosedBeforeReply),
            Err(e) if head.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(ReplyError::ClosedBeforeReply);
            }
            Ok(_) => {
                return Err(ReplyError::Malformed(format!(
                    "EOF after {} bytes of the head",
                    head.len()
                )));
            }
            Err(e) => return Err(ReplyError::Io(e)),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ReplyError::Malformed(head.lines().next().unwrap_or_default().into()))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let body = if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        read_chunked(s)?
    } else {
        let len: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).map_err(ReplyError::Io)?;
        body
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close: header("connection:").is_some_and(|v| v == "close"),
    })
}

fn read_chunked(s: &mut TcpStream) -> Result<Vec<u8>, ReplyError> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut byte).map_err(ReplyError::Io)?;
            line.push(byte[0]);
        }
        let size = std::str::from_utf8(&line[..line.len() - 2])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| ReplyError::Malformed("chunk size".into()))?;
        let mut chunk = vec![0u8; size + 2];
        s.read_exact(&mut chunk).map_err(ReplyError::Io)?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

/// One GET, no retry (see the usage); prints what happened.
fn first_call(addr: SocketAddr, host: &str, path: &str) -> ExitCode {
    let started = std::time::Instant::now();
    let us =
        |since: std::time::Instant| u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    let line = match connect(addr, false) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => serde_json::json!({
            "outcome": "refused", "connect_us": us(started), "total_us": us(started),
        }),
        Err(e) => serde_json::json!({
            "outcome": "error", "reason": format!("connect: {:?}: {e}", e.kind()),
            "connect_us": us(started), "total_us": us(started),
        }),
        Ok(mut stream) => {
            let connect_us = us(started);
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let answer = stream
                .write_all(request.as_bytes())
                .map_err(ReplyError::Io)
                .and_then(|()| read_reply(&mut stream));
            match answer {
                Ok(reply) => serde_json::json!({
                    "outcome": "reply", "status": reply.status,
                    "connect_us": connect_us, "total_us": us(started),
                }),
                Err(e) => serde_json::json!({
                    "outcome": "error", "reason": e.to_string(),
                    "connect_us": connect_us, "total_us": us(started),
                }),
            }
        }
    };
    println!("{line}");
    ExitCode::SUCCESS
}

/// GETs until one arrives signed (see the usage); prints when.
fn wait_signed(addr: SocketAddr, limit: Duration) -> ExitCode {
    println!("polling");
    let _ = std::io::stdout().flush();
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(body) = exchange(
            addr,
            false,
            false,
            Some(b"GET /enroll-probe HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"),
        ) && body.contains("credential=")
            && !body.contains("credential=none")
        {
            println!("signed {}", lattice_tests::time::monotonic_ns());
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("error: no signed reply within {limit:?}");
    ExitCode::from(1)
}

/// What a load run saw; printed as one JSON line.
#[derive(Default)]
struct LoadStats {
    ok: u64,
    refused: u64,
    failed: u64,
    /// Requests sent again on a new connection because the reused one
    /// closed before answering (as Go's net/http does for idempotent ones).
    retried: u64,
    connections: u64,
    reasons: Vec<String>,
    first_refused: Option<u128>,
    last_refused: Option<u128>,
    /// The last refusal or failure: an outage as the app sees it.
    last_bad: Option<u128>,
    /// The first 200 after `last_bad`.
    recovered: Option<u128>,
    /// Request latencies of the 200s, microseconds.
    latencies_us: Vec<u64>,
}

impl LoadStats {
    fn ok(&mut self, started: std::time::Instant) {
        self.ok += 1;
        self.latencies_us
            .push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        if self.last_bad.is_some() && self.recovered.is_none() {
            self.recovered = Some(lattice_tests::time::monotonic_ns());
        }
    }

    fn refused(&mut self) {
        self.refused += 1;
        let now = lattice_tests::time::monotonic_ns();
        self.first_refused.get_or_insert(now);
        self.last_refused = Some(now);
        self.last_bad = Some(now);
        self.recovered = None;
        std::thread::sleep(Duration::from_millis(5));
    }

    fn failed(&mut self, reason: String) {
        self.failed += 1;
        self.last_bad = Some(lattice_tests::time::monotonic_ns());
        self.recovered = None;
        if self.reasons.len() < 5 {
            self.reasons.push(reason);
        }
    }

    fn print(mut self) {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> Option<u64> {
            let n = self.latencies_us.len();
            (n > 0).then(|| self.latencies_us[((n as f64 * p).ceil() as usize).clamp(1, n) - 1])
        };
        let line = serde_json::json!({
            "ok": self.ok,
            "refused": self.refused,
            "failed": self.failed,
            "retried": self.retried,
            "connections": self.connections,
            "reasons": self.reasons,
            "first_refused_ns": self.first_refused.map(ns_u64),
            "last_refused_ns": self.last_refused.map(ns_u64),
            "recovered_ns": self.recovered.map(ns_u64),
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "max_us": self.latencies_us.last(),
        });
        println!("{line}");
    }
}

/// CLOCK_MONOTONIC nanoseconds fit a JSON integer for centuries of uptime.
fn ns_u64(ns: u128) -> u64 {
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Requests back to back for `secs` (see the usage); prints the counts.
fn load(addr: SocketAddr, secs: Duration, host: &str) -> ExitCode {
    let deadline = std::time::Instant::now() + secs;
    let mut stats = LoadStats::default();
    let mut n = 0u64;
    while std::time::Instant::now() < deadline {
        n += 1;
        let request =
            format!("GET /load/{n} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let started = std::time::Instant::now();
        stats.connections += 1;
        match exchange(addr, false, false, Some(request.as_bytes())) {
            Ok(reply) if reply.starts_with("HTTP/1.1 200 ") => stats.ok(started),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => stats.refused(),
            Ok(reply) => stats.failed(reply.lines().next().unwrap_or_default().to_owned()),
            Err(e) => stats.failed(format!("{:?}: {e}", e.kind())),
        }
    }
    stats.print();
    ExitCode::SUCCESS
}

/// Requests back to back for `secs` on one kept-alive connection at a
/// time (see the usage); prints the counts.
fn load_keepalive(addr: SocketAddr, secs: Duration, host: &str) -> ExitCode {
    let deadline = std::time::Instant::now() + secs;
    let mut stats = LoadStats::default();
    let mut conn: Option<TcpStream> = None;
    let mut n = 0u64;
    while std::time::Instant::now() < deadline {
        n += 1;
        let request = format!("GET /load/{n} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let started = std::time::Instant::now();
        // Once on the connection in hand, and once more on a new one if a
        // reused connection closed before answering.
        let mut retried = false;
        loop {
            let reused = conn.is_some();
            let stream = match conn.take() {
                Some(s) => s,
                None => match connect(addr, false) {
                    Ok(s) => {
                        stats.connections += 1;
                        s
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        stats.refused();
                        break;
                    }
                    Err(e) => {
                        stats.failed(format!("connect: {:?}: {e}", e.kind()));
                        break;
                    }
                },
            };
            let mut stream = stream;
            let answer = match stream.write_all(request.as_bytes()) {
                Ok(()) => read_reply(&mut stream),
                Err(_) if reused => Err(ReplyError::ClosedBeforeReply),
                Err(e) => Err(ReplyError::Io(e)),
            };
            match answer {
                Ok(reply) if reply.status == 200 => {
                    stats.ok(started);
                    if !reply.close {
                        conn = Some(stream);
                    }
                }
                Ok(reply) => {
                    stats.failed(format!("status {}: {}", reply.status, reply.body.trim()))
                }
                Err(ReplyError::ClosedBeforeReply) if reused && !retried => {
                    retried = true;
                    stats.retried += 1;
                    continue;
                }
                Err(e) => stats.failed(e.to_string()),
            }
            break;
        }
    }
    stats.print();
    ExitCode::SUCCESS
}
