//! Where an intercepted connection was originally going.

use std::net::SocketAddr;

/// Answers "where was the connection accepted from `peer` going?".
///
/// Implemented by the eBPF map handle (`bpf::OrigDstMap`). A record is
/// consumed by the lookup: each accepted connection asks exactly once.
pub trait OriginalDestination: Send + Sync + 'static {
    fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr>;
}
