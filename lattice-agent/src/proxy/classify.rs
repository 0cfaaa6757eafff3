//! What a client connection speaks, told from its first bytes: pure, so
//! every rule is tested without a socket.
//!
//! - A request line's method (an upper-case token followed by a space):
//!   HTTP/1.x, or HTTP/2 with prior knowledge (h2c) when the method is
//!   `PRI`, the first word of the HTTP/2 connection preface. These are
//!   signed; whatever follows the method is left to the HTTP parser, so
//!   malformed HTTP still gets its 4xx.
//! - A TLS handshake record (`16 03 0x`): the app's own TLS, passed
//!   through untouched.
//! - Anything else (binary protocols, a lower-case first word as in
//!   memcached's text protocol): passed through untouched.
//!
//! Registered HTTP methods are upper case and at most 17 characters long
//! (`UPDATEREDIRECTREF`); methods are case-sensitive, so `get` is not
//! `GET`.

/// How a client connection is handled, by what it sent first (or, for
/// [`Kind::ServerFirst`], by the server speaking first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// HTTP/1.x: signed.
    Http1,
    /// HTTP/2 with prior knowledge: signed.
    H2c,
    /// The app's own TLS: passed through.
    Tls,
    /// Any other client-first protocol: passed through.
    Opaque,
    /// The server spoke before the client: passed through.
    ServerFirst,
}

impl Kind {
    pub const ALL: [Self; 5] = [
        Self::Http1,
        Self::H2c,
        Self::Tls,
        Self::Opaque,
        Self::ServerFirst,
    ];

    /// The `kind` label and `/pods` key.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
            Self::Tls => "tls",
            Self::Opaque => "opaque",
            Self::ServerFirst => "server-first",
        }
    }

    /// Position in [`Kind::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Self::Http1 => 0,
            Self::H2c => 1,
            Self::Tls => 2,
            Self::Opaque => 3,
            Self::ServerFirst => 4,
        }
    }

    /// Served by the signing proxy (else spliced byte for byte).
    pub const fn is_http(self) -> bool {
        matches!(self, Self::Http1 | Self::H2c)
    }
}

/// Longest method taken for HTTP: a longer upper-case word is not one.
pub const MAX_METHOD: usize = 20;

/// Bytes that always suffice to classify: a method of [`MAX_METHOD`]
/// characters and its space.
pub const ENOUGH: usize = MAX_METHOD + 1;

/// The kind of a connection whose client sent `first` (what arrived so
/// far); `None` while more bytes are needed to tell.
pub fn classify(first: &[u8]) -> Option<Kind> {
    match first {
        [] => None,
        [0x16, rest @ ..] => tls_record(rest),
        _ => method(first),
    }
}

/// After a handshake content type: the record's major version 3 and a
/// minor version up to 4 (SSL 3.0 to TLS 1.3 record layers).
fn tls_record(rest: &[u8]) -> Option<Kind> {
    match rest {
        [] | [0x03] => None,
        [0x03, 0x00..=0x04, ..] => Some(Kind::Tls),
        _ => Some(Kind::Opaque),
    }
}

fn method(first: &[u8]) -> Option<Kind> {
    for (i, &b) in first.iter().enumerate() {
        match b {
            b' ' if i > 0 => {
                return Some(if &first[..i] == b"PRI" {
                    Kind::H2c
                } else {
                    Kind::Http1
                });
            }
            b'A'..=b'Z' if i < MAX_METHOD => {}
            b'0'..=b'9' | b'-' | b'_' if i > 0 && i < MAX_METHOD => {}
            _ => return Some(Kind::Opaque),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(bytes: &[u8]) -> Option<Kind> {
        classify(bytes)
    }

    #[test]
    fn request_lines_are_http() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x HTTP/1.0\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"UPDATEREDIRECTREF /r HTTP/1.1\r\n",
            b"DELETE ",
        ] {
            assert_eq!(kind(line), Some(Kind::Http1), "{line:?}");
        }
        assert_eq!(kind(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Kind::H2c));
    }

    /// Malformed HTTP stays HTTP: the parser answers it with a 4xx.
    #[test]
    fn malformed_requests_after_a_method_stay_http() {
        for line in [
            &b"NOT HTTP AT ALL\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET  HTTP/9\r\n",
            b"GET \x00\x01\x02",
            b"PRI garbage",
        ] {
            assert!(kind(line).is_some_and(Kind::is_http), "{line:?}");
        }
    }

    #[test]
    fn a_method_arriving_in_pieces_waits_for_its_space() {
        assert_eq!(kind(b""), None);
        assert_eq!(kind(b"G"), None);
        assert_eq!(kind(b"GE"), None);
        assert_eq!(kind(b"GET"), None);
        assert_eq!(kind(b"GET "), Some(Kind::Http1));
        assert_eq!(kind(b"PR"), None);
        assert_eq!(kind(&[b'A'; MAX_METHOD]), None);
    }

    #[test]
    fn tls_handshake_records_are_tls() {
        // A TLS 1.2/1.3 ClientHello record header, and the 1.0 one.
        assert_eq!(kind(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(Kind::Tls));
        assert_eq!(kind(&[0x16, 0x03, 0x03]), Some(Kind::Tls));
        assert_eq!(kind(&[0x16]), None);
        assert_eq!(kind(&[0x16, 0x03]), None);
        // Not a TLS version: some other binary protocol.
        assert_eq!(kind(&[0x16, 0x03, 0x09]), Some(Kind::Opaque));
        assert_eq!(kind(&[0x16, 0x01]), Some(Kind::Opaque));
    }

    /// A ClientHello-looking prefix decides, whatever follows: the bytes
    /// are passed through, never parsed as HTTP and signed.
    #[test]
    fn a_tls_prefix_before_http_is_tls() {
        let mut bytes = vec![0x16, 0x03, 0x01];
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(kind(&bytes), Some(Kind::Tls));
    }

    #[test]
    fn other_protocols_are_opaque() {
        for first in [
            // Postgres SSLRequest and StartupMessage.
            &[0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f][..],
            &[0x00, 0x00, 0x00, 0x54, 0x00, 0x03, 0x00, 0x00],
            // Redis (RESP array), memcached and redis inline commands.
            b"*1\r\n$4\r\nPING\r\n",
            b"get key\r\n",
            b"PING\r\n",
            // AMQP and STOMP headers.
            b"AMQP\x00\x00\x09\x01",
            b"CONNECT\naccept-version:1.2\n",
            // SSLv2-compatible hello, a space first, a digit first.
            &[0x80, 0x2e, 0x01],
            b" GET / HTTP/1.1",
            b"1GET ",
        ] {
            assert_eq!(kind(first), Some(Kind::Opaque), "{first:?}");
        }
        // An upper-case word longer than any method.
        let mut long = vec![b'A'; MAX_METHOD + 1];
        long.push(b' ');
        assert_eq!(kind(&long), Some(Kind::Opaque));
        assert!(kind(&long[..ENOUGH]).is_some());
    }

    #[test]
    fn names_and_indices_follow_all() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        let names: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["http1", "h2c", "tls", "opaque", "server-first"]);
    }
}
