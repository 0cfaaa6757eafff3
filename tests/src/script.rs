//! Scripted byte exchanges over TCP, for protocols that are not HTTP: the
//! app side (`lattice-test-client script`) and the server side (a thread
//! in the test, listening in the pod's namespace) each follow a list of
//! steps, and report how many bytes they sent and received and a hash of
//! each, so a test can check that what one side sent is exactly what the
//! other received, both ways.
//!
//! Steps, as written on a command line: `send:HEX`, `send-random:N`,
//! `expect:N` (read exactly N bytes), `sleep:MS`, `shut` (half-close: no
//! more writes), `rest` (read to the end of the stream).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread::JoinHandle,
    time::Duration,
};

/// One step of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send(Vec<u8>),
    SendRandom(usize),
    Expect(usize),
    Sleep(u64),
    Shut,
    Rest,
}

impl Step {
    pub fn parse(s: &str) -> Result<Self, String> {
        let number = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| format!("{s:?}: not a byte count"))
        };
        match s.split_once(':') {
            Some(("send", hex)) => decode_hex(hex).map(Self::Send),
            Some(("send-random", n)) => number(n).map(Self::SendRandom),
            Some(("expect", n)) => number(n).map(Self::Expect),
            Some(("sleep", ms)) => number(ms).map(|ms| Self::Sleep(ms as u64)),
            None if s == "shut" => Ok(Self::Shut),
            None if s == "rest" => Ok(Self::Rest),
            _ => Err(format!(
                "{s:?}: not a step (send:HEX, send-random:N, expect:N, shut, rest)"
            )),
        }
    }

    /// The command-line form.
    pub fn to_arg(&self) -> String {
        match self {
            Self::Send(bytes) => format!("send:{}", encode_hex(bytes)),
            Self::SendRandom(n) => format!("send-random:{n}"),
            Self::Expect(n) => format!("expect:{n}"),
            Self::Sleep(ms) => format!("sleep:{ms}"),
            Self::Shut => "shut".into(),
            Self::Rest => "rest".into(),
        }
    }
}

/// What one side sent and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    pub sent: Digest,
    pub received: Digest,
}

impl Transcript {
    /// `sent=<len>:<hash> received=<len>:<hash>`.
    pub fn line(&self) -> String {
        format!("sent={} received={}", self.sent, self.received)
    }

    /// Parses [`Transcript::line`] out of a program's output.
    pub fn find(text: &str) -> Option<Self> {
        let line = text.lines().find(|l| l.starts_with("sent="))?;
        let mut sent = None;
        let mut received = None;
        for field in line.split_whitespace() {
            match field.split_once('=') {
                Some(("sent", d)) => sent = Digest::parse(d),
                Some(("received", d)) => received = Digest::parse(d),
                _ => {}
            }
        }
        Some(Self {
            sent: sent?,
            received: received?,
        })
    }
}

/// Length and FNV-1a hash of a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub hash: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Digest {
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    fn parse(s: &str) -> Option<Self> {
        let (len, hash) = s.split_once(':')?;
        Some(Self {
            len: len.parse().ok()?,
            hash: u64::from_str_radix(hash, 16).ok()?,
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{:016x}", self.len, self.hash)
    }
}

/// Follows `steps` on `stream`; also returns the first bytes received
/// (up to 64), for tests that look at them.
pub fn run(stream: &mut TcpStream, steps: &[Step]) -> io::Result<(Transcript, Vec<u8>)> {
    let mut t = Transcript {
        sent: Digest::default(),
        received: Digest::default(),
    };
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut rng = crate::random::random_bytes::<8>();
    let mut received = |t: &mut Transcript, bytes: &[u8]| {
        t.received.update(bytes);
        let room = 64usize.saturating_sub(head.len());
        head.extend_from_slice(&bytes[..room.min(bytes.len())]);
    };
    for step in steps {
        match step {
            Step::Send(bytes) => {
                stream.write_all(bytes)?;
                t.sent.update(bytes);
            }
            Step::SendRandom(n) => {
                let mut left = *n;
                while left > 0 {
                    let chunk = left.min(buf.len());
                    fill_random(&mut rng, &mut buf[..chunk]);
                    stream.write_all(&buf[..chunk])?;
                    t.sent.update(&buf[..chunk]);
                    left -= chunk;
                }
            }
            Step::Expect(n) => {
                let mut left = *n;
                while left > 0 {
                    let chunk = left.min(buf.len());
                    stream.read_exact(&mut buf[..chunk])?;
                    received(&mut t, &buf[..chunk]);
                    left -= chunk;
                }
            }
            Step::Sleep(ms) => std::thread::sleep(Duration::from_millis(*ms)),
            Step::Shut => stream.shutdown(Shutdown::Write)?,
            Step::Rest => loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                received(&mut t, &buf[..n]);
            },
        }
    }
    Ok((t, head))
}

/// What the server side of an exchange saw.
#[derive(Debug, Clone)]
pub struct Served {
    pub transcript: Transcript,
    /// The first bytes received (up to 64).
    pub head: Vec<u8>,
    /// Where the connection came from.
    pub peer: SocketAddr,
}

/// Serves one connection on `listener` (in a thread) by `steps`.
pub fn serve_once(listener: TcpListener, steps: Vec<Step>) -> JoinHandle<io::Result<Served>> {
    std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let (transcript, head) = run(&mut stream, &steps)?;
        Ok(Served {
            transcript,
            head,
            peer,
        })
    })
}

/// xorshift64 over a random seed: fast filler, not cryptography.
fn fill_random(state: &mut [u8; 8], out: &mut [u8]) {
    let mut x = u64::from_le_bytes(*state) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    *state = x.to_le_bytes();
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("{hex:?}: odd number of hex digits"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| format!("{hex:?}: not hex")))
        .collect()
}

pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_transcripts_parse() {
        for s in [
            "send:00ff10",
            "send-random:1048576",
            "expect:8",
            "shut",
            "rest",
        ] {
            assert_eq!(Step::parse(s).unwrap().to_arg(), s);
        }
        assert!(Step::parse("send:abc").is_err());
        assert!(Step::parse("wait").is_err());
        let mut d = Digest::default();
        d.update(b"abc");
        let t = Transcript {
            sent: d,
            received: Digest::default(),
        };
        assert_eq!(Transcript::find(&format!("x\n{}\n", t.line())), Some(t));
    }
}
