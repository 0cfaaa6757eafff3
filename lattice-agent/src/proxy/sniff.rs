//! Reading a new client connection's first bytes to tell what it speaks
//! (see [`super::classify`]), and giving them back to whoever serves it
//! ([`Prefixed`]).
//!
//! Whichever side speaks first decides. A client that sends nothing for
//! `--server-first-wait` may be waiting for a server-first protocol's
//! greeting (databases, SMTP): the proxy then connects to the original
//! destination and waits for either side. The server speaking first makes
//! the connection a pass-through; the client speaking first is classified
//! as usual (an HTTP client that connected early and sends its request
//! late is still signed; the early upstream connection is then dropped).
//! Nothing but silence is ever decided by a timer, so a slow HTTP client
//! is never mistaken for another protocol.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};

use super::classify::{self, ENOUGH, Kind};

/// How much the first read takes: a whole request head or first message
/// as a rule, so that what follows classification (the HTTP parser, or a
/// pass-through's first write) gets it in one piece, not split after the
/// few bytes classification needs.
const FIRST_READ: usize = 4096;

/// The bytes read to classify a connection, to be served first.
#[derive(Debug, Default)]
pub struct First {
    buf: Vec<u8>,
}

impl First {
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Reads more, up to [`FIRST_READ`] bytes in all; `Ok(0)` at end of
    /// stream. Cancel-safe: only bytes read are kept.
    async fn read_more(&mut self, client: &mut TcpStream) -> io::Result<usize> {
        self.buf
            .reserve(FIRST_READ.saturating_sub(self.buf.len()).max(ENOUGH));
        client.read_buf(&mut self.buf).await
    }
}

/// How a connection opened.
#[derive(Debug)]
pub enum Opening {
    /// The client spoke first; `upstream` is the connection to the
    /// original destination opened while it was silent, if any.
    Client {
        kind: Kind,
        first: First,
        upstream: Option<TcpStream>,
    },
    /// The client stayed silent and the original destination spoke (or
    /// closed) first.
    Server { upstream: TcpStream },
    /// The client closed, failed or stayed silent for the idle timeout
    /// before saying what it speaks: nothing to serve.
    Gone,
}

/// Reads the client's first bytes (at most [`ENOUGH`]) until they tell
/// what it speaks. `connect` opens the upstream connection for a silent
/// client after `server_first_wait` (`None`: no destination, or it failed:
/// the client alone then decides). Gives up after `idle_timeout` without a
/// decision.
pub async fn sniff<F>(
    client: &mut TcpStream,
    server_first_wait: Duration,
    idle_timeout: Duration,
    connect: impl FnOnce() -> F,
) -> Opening
where
    F: std::future::Future<Output = Option<TcpStream>>,
{
    let give_up = Instant::now() + idle_timeout;
    let mut first = First::default();
    let upstream = match tokio::time::timeout(server_first_wait, first.read_more(client)).await {
        Ok(Ok(n)) if n > 0 => None,
        Ok(_) => return Opening::Gone,
        Err(_silent) => match connect().await {
            Some(upstream) => {
                let mut greeting = [0u8; 1];
                tokio::select! {
                    r = first.read_more(client) => match r {
                        Ok(n) if n > 0 => Some(upstream),
                        _ => return Opening::Gone,
                    },
                    // Readiness alone may be spurious: a byte or the end of
                    // the stream must be there.
                    _ = upstream.peek(&mut greeting) => return Opening::Server { upstream },
                    () = tokio::time::sleep_until(give_up) => return Opening::Gone,
                }
            }
            None => match tokio::time::timeout_at(give_up, first.read_more(client)).await {
                Ok(Ok(n)) if n > 0 => None,
                _ => return Opening::Gone,
            },
        },
    };
    loop {
        if let Some(kind) = classify::classify(first.bytes()) {
            return Opening::Client {
                kind,
                first,
                upstream,
            };
        }
        // Part of a method: a request head trickling in, waited for as
        // an idle HTTP connection would be.
        match tokio::time::timeout_at(give_up, first.read_more(client)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed after a few bytes that cannot start a request: passed
            // on as they are (they are not a request to sign).
            Ok(Ok(_)) => {
                return Opening::Client {
                    kind: Kind::Opaque,
                    first,
                    upstream,
                };
            }
            _ => return Opening::Gone,
        }
    }
}

/// A stream whose first bytes were already read: they are read again
/// first, then the stream itself.
pub struct Prefixed<S> {
    first: First,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(first: First, inner: S) -> Self {
        Self {
            first,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rest = &this.first.bytes()[this.pos..];
        if rest.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    const WAIT: Duration = Duration::from_millis(50);
    const IDLE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_request_is_classified_and_read_back_whole() {
        let (mut app, mut server_side) = pair().await;
        app.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let Opening::Client {
            kind,
            first,
            upstream,
        } = sniff(&mut server_side, WAIT, IDLE, || async { None }).await
        else {
            panic!("not the client's")
        };
        assert_eq!(kind, Kind::Http1);
        assert!(upstream.is_none());
        let mut read = Prefixed::new(first, server_side);
        let mut got = vec![0; 28];
        read.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn a_method_in_pieces_waits_and_early_eof_is_opaque() {
        let (mut app, mut server_side) = pair().await;
        let writer = tokio::spawn(async move {
            for b in b"POS" {
                app.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            app.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
            app
        });
        // The pauses exceed the wait: a client that spoke is never
        // handed to the server-first path.
        let opening = sniff(&mut server_side, WAIT, IDLE, || async {
            panic!("connected for a client that spoke")
        })
        .await;
        assert!(matches!(
            opening,
            Opening::Client {
                kind: Kind::Http1,
                ..
            }
        ));
        drop(writer.await.unwrap());

        let (mut app, mut server_side) = pair().await;
        app.write_all(b"AB").await.unwrap();
        app.shutdown().await.unwrap();
        let Opening::Client { kind, first, .. } =
            sniff(&mut server_side, WAIT, IDLE, || async { None }).await
        else {
            panic!()
        };
        assert_eq!((kind, first.bytes()), (Kind::Opaque, &b"AB"[..]));
    }

    #[tokio::test]
    async fn a_silent_client_meets_a_server_that_greets() {
        let (_app, mut server_side) = pair().await;
        let (mut upstream_far, upstream_near) = pair().await;
        upstream_far.write_all(b"220 hello\r\n").await.unwrap();
        let opening = sniff(&mut server_side, WAIT, IDLE, || async {
            Some(upstream_near)
        })
        .await;
        assert!(matches!(opening, Opening::Server { .. }));
    }

    #[tokio::test]
    async fn a_late_client_still_decides_and_silence_gives_up() {
        let (mut app, mut server_side) = pair().await;
        let (_upstream_far, upstream_near) = pair().await;
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            app.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            app
        });
        let opening = sniff(&mut server_side, WAIT, IDLE, || async {
            Some(upstream_near)
        })
        .await;
        assert!(
            matches!(
                opening,
                Opening::Client {
                    kind: Kind::H2c,
                    upstream: Some(_),
                    ..
                }
            ),
            "{opening:?}"
        );
        drop(writer.await.unwrap());

        let (_app, mut server_side) = pair().await;
        let started = Instant::now();
        let opening = sniff(
            &mut server_side,
            WAIT,
            Duration::from_millis(200),
            || async { None },
        )
        .await;
        assert!(matches!(opening, Opening::Gone));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
