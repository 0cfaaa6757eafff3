//! Plays the VPC Lattice services inside a test pod's network namespace.
//!
//! Every TCP connection gets one line naming both ends, so a test sees
//! which address the connection really reached (`local=`) and from where
//! (`peer=`: the agent's upstream socket when it went through the proxy).
//! UDP datagrams are echoed with a prefix. Prints `listening` once
//! everything is bound.
//!
//! With `--http` the TCP listeners speak HTTP/1.1 instead: one request per
//! connection, answered `200` with that line as the body plus what a test
//! needs to tell whether lattice-agent signed the request:
//! `service local=.. peer=.. method=GET path=/.. credential=<AKID>/<date>/
//! <region>/<service>/aws4_request signed=<names>`, with `none` for both
//! when no SigV4 Authorization header arrived. The signature is never
//! printed.
//!
//! With `--keep-alive` (implies `--http`) a connection serves requests one
//! after another until the client closes it: a cheap upstream for load.
//!
//! Usage: lattice-test-service [--http] [--keep-alive] [tcp:ADDR:PORT | udp:ADDR:PORT]...
//! (default: the pod fixture's addresses, TCP port 80, UDP 5353).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

const DEFAULT: [&str; 5] = [
    "tcp:169.254.171.33:80",
    "tcp:169.254.172.33:80",
    "tcp:[fd00:ec2:80::33]:80",
    "tcp:[fd00:ec2:81::33]:80",
    "udp:169.254.171.33:5353",
];

/// Largest request head accepted in `--http` mode.
const MAX_HEAD: usize = 64 * 1024;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let keep_alive = args.iter().any(|a| a == "--keep-alive");
    let http = keep_alive || args.iter().any(|a| a == "--http");
    args.retain(|a| a != "--http" && a != "--keep-alive");
    let specs: Vec<String> = if args.is_empty() {
        DEFAULT.iter().map(|s| s.to_string()).collect()
    } else {
        args
    };
    let mut threads = Vec::new();
    for spec in &specs {
        let parsed = spec
            .split_once(':')
            .and_then(|(proto, addr)| Some((proto, addr.parse::<SocketAddr>().ok()?)));
        match parsed {
            Some(("tcp", addr)) => match TcpListener::bind(addr) {
                Ok(l) => threads.push(std::thread::spawn(move || serve_tcp(l, http, keep_alive))),
                Err(e) => return fail(&format!("bind tcp {addr}: {e}")),
            },
            Some(("udp", addr)) => match UdpSocket::bind(addr) {
                Ok(s) => threads.push(std::thread::spawn(move || serve_udp(s))),
                Err(e) => return fail(&format!("bind udp {addr}: {e}")),
            },
            _ => {
                return fail(&format!(
                    "bad spec {spec:?}: want tcp:ADDR:PORT or udp:ADDR:PORT"
                ));
            }
        }
    }
    println!("listening");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lattice-test-service: {msg}");
    ExitCode::FAILURE
}

fn serve_tcp(listener: TcpListener, http: bool, keep_alive: bool) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if keep_alive {
            std::thread::spawn(move || serve_keep_alive(conn));
            continue;
        }
        if http {
            // A thread each: an idle connection must not hold up the next.
            std::thread::spawn(move || serve_http(conn));
            continue;
        }
        // Closing right after writing: the client reads to EOF.
        let _ = conn.write_all(format!("{}\n", ends(&conn)).as_bytes());
    }
}

/// `service local=<addr> peer=<addr>`.
fn ends(conn: &TcpStream) -> String {
    match (conn.local_addr(), conn.peer_addr()) {
        (Ok(local), Ok(peer)) => format!("service local={local} peer={peer}"),
        (l, p) => format!("service local={l:?} peer={p:?}"),
    }
}

fn serve_http(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let (status, body) = match read_head(&mut conn) {
        Ok(head) => ("200 OK", format!("{} {}\n", ends(&conn), describe(&head))),
        Err(e) => (
            "400 Bad Request",
            format!("lattice-test-service: bad request: {e}\n"),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

/// Requests one after another on `conn` (GETs: no bodies), until the
/// client closes it or asks to (`Connection: close`).
fn serve_keep_alive(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if pending.len() > MAX_HEAD {
                return;
            }
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head: Vec<u8> = pending.drain(..end).collect();
        let head = String::from_utf8_lossy(&head);
        // The client may ask to close after this response (HTTP/1.1).
        let close = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("connection")
                    && value.trim().eq_ignore_ascii_case("close")
            })
        });
        let body = format!("{} {}\n", ends(&conn), describe(&head));
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if conn.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// The request line and headers, up to the blank line. A body is not read:
/// the tests send none, and the connection closes after one request.
fn read_head(conn: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(format!("head over {MAX_HEAD} bytes"));
        }
        match conn.read(&mut buf) {
            Ok(0) => return Err("connection closed before the end of the head".into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    String::from_utf8(head).map_err(|_| "head is not UTF-8".into())
}

/// `method=.. path=.. credential=.. signed=..` for a request head.
fn describe(head: &str) -> String {
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let method = request.next().unwrap_or_default();
    let path = request.next().unwrap_or_default();
    let authorization = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim())
    });
    // Only the credential scope and the signed header names: the signature
    // stays out of every log.
    let field = |name: &str| {
        authorization
            .and_then(|a| a.split([',', ' ']).find_map(|f| f.strip_prefix(name)))
            .unwrap_or("none")
    };
    format!(
        "method={method} path={path} credential={} signed={}",
        field("Credential="),
        field("SignedHeaders=")
    )
}

fn serve_udp(socket: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = b"udp-service ".to_vec();
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, from);
    }
}
