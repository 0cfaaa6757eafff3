//! Passing a connection through: bytes copied both ways between the
//! client and the original destination, unchanged, until both sides have
//! closed. A side's end of stream is passed on as a half-close, so
//! protocols that half-close keep working.

use std::io;

use tokio::net::TcpStream;

use super::sniff::Prefixed;

/// Bytes copied each way per read and write.
const BUF: usize = 16 << 10;

/// Copies both ways; returns the bytes sent to the upstream and back.
pub async fn splice(
    mut client: Prefixed<TcpStream>,
    mut upstream: TcpStream,
) -> io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await
}
