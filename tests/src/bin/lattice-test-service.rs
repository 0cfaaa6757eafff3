//! Plays the VPC Lattice services inside a test pod's network namespace.
//!
//! Every TCP connection gets one line naming both ends, so a test sees
//! which address the connection really reached (`local=`) and from where
//! (`peer=`: the relay's address when the agent relayed it). UDP datagrams
//! are echoed with a prefix. Prints `listening` once everything is bound.
//!
//! Usage: lattice-test-service [tcp:ADDR:PORT | udp:ADDR:PORT]...
//! (default: the pod fixture's addresses, TCP port 80, UDP 5353).

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, UdpSocket},
    process::ExitCode,
};

const DEFAULT: [&str; 5] = [
    "tcp:169.254.171.33:80",
    "tcp:169.254.172.33:80",
    "tcp:[fd00:ec2:80::33]:80",
    "tcp:[fd00:ec2:81::33]:80",
    "udp:169.254.171.33:5353",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
                Ok(l) => threads.push(std::thread::spawn(move || serve_tcp(l))),
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

fn serve_tcp(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let line = match (conn.local_addr(), conn.peer_addr()) {
            (Ok(local), Ok(peer)) => format!("service local={local} peer={peer}\n"),
            (l, p) => format!("service local={l:?} peer={p:?}\n"),
        };
        // Closing right after writing: the client reads to EOF.
        let _ = conn.write_all(line.as_bytes());
    }
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
