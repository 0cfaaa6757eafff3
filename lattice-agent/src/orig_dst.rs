//! Where an intercepted connection was originally going.

use std::{net::SocketAddr, os::fd::BorrowedFd};

/// Answers "where was the connection accepted from `peer` going?".
///
/// Implemented by the eBPF map handle (`bpf::NetnsOrigDst`), and by
/// `nat_orig_dst::WithNatFallback` around it where the iptables setup's
/// NAT redirect is also served (`run`, `sidecar`). A record is consumed by
/// the lookup: each accepted connection asks exactly once.
pub trait OriginalDestination: Send + Sync + 'static {
    fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr>;

    /// Where a connection the programs have no record of was going, asked
    /// of the accepted `socket` itself (conntrack). None unless the
    /// workload serves NAT-redirected connections: in node mode a pod that
    /// can DNAT would otherwise have the proxy sign for any address.
    fn untracked_destination(&self, _socket: BorrowedFd<'_>) -> Option<SocketAddr> {
        None
    }
}
