//! Map key and value types shared by the lattice eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields so the byte layout
//! is identical on both sides and padding is always zeroed (hash map keys are
//! compared bytewise by the kernel).
#![no_std]

/// Names of the maps and programs in the eBPF object; both sides use these.
pub mod names {
    pub const CONFIG: &str = "CONFIG";
    pub const V4_PREFIXES: &str = "V4_PREFIXES";
    pub const V6_PREFIXES: &str = "V6_PREFIXES";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_PEER: &str = "ORIG_DST_BY_PEER";
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";

    pub const PROG_CONNECT4: &str = "lattice_connect4";
    pub const PROG_CONNECT6: &str = "lattice_connect6";
    pub const PROG_SOCK_OPS: &str = "lattice_sock_ops";
    pub const PROG_GETSOCKOPT: &str = "lattice_getsockopt";

    /// All maps the agent pins with `--pin`, in a stable order.
    pub const PINNED_MAPS: [&str; 6] = [
        CONFIG,
        V4_PREFIXES,
        V6_PREFIXES,
        ORIG_DST_BY_COOKIE,
        ORIG_DST_BY_PEER,
        ENROLLED_NETNS,
    ];
}

/// Capacity of the original-destination maps. Both are LRU maps, so a burst of
/// connections that are never accepted cannot grow them without bound.
pub const ORIG_DST_CAPACITY: u32 = 65_536;
/// Capacity of each prefix trie.
pub const PREFIX_CAPACITY: u32 = 64;
/// Network namespaces (pods) one node agent can serve; far above the
/// kubelet's pods-per-node limits.
pub const ENROLLED_CAPACITY: u32 = 4096;

/// Value of a prefix-trie entry whose addresses are redirected.
pub const PREFIX_INTERCEPT: u8 = 1;
/// Value of a prefix-trie entry whose addresses are never redirected, even
/// inside a shorter intercepted prefix (the longest match wins).
pub const PREFIX_EXEMPT: u8 = 0;

/// Addresses never intercepted whatever prefixes are configured: the EKS
/// Pod Identity Agent, which the credential chain of every pod (and the
/// agent's own) must reach directly.
pub const NEVER_INTERCEPTED_V4: [[u8; 4]; 1] = [[169, 254, 170, 23]];
/// `fd00:ec2::23`, the Pod Identity Agent's IPv6 address.
pub const NEVER_INTERCEPTED_V6: [[u8; 16]; 1] =
    [[0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x23]];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Runtime configuration, the single entry of the `CONFIG` array map.
///
/// A map (rather than read-only globals) so a restarted agent can reconcile
/// the configuration of programs it finds pinned without reattaching them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Loopback port of the signing proxy, host byte order. 0 = disabled.
    pub proxy_port: u16,
    /// `CONFIG_*` bits.
    pub flags: u16,
    /// With [`CONFIG_EXEMPT_UID`]: connects made by this UID (initial user
    /// namespace) are never redirected.
    pub exempt_uid: u32,
    /// Connects made by a task of these cgroups (v2 ids) are never
    /// redirected; 0: none. The node agent's own container cgroup (it
    /// holds every thread and process of the agent, and no pod can move a
    /// process into it), then the one of the agent it replaced, which
    /// still drains its connections during an update.
    pub exempt_cgroups: [u64; 2],
}

/// [`Config::flags`]: redirect only connects made in a network namespace
/// listed in `ENROLLED_NETNS` (node mode: programs attached once above
/// every pod, one agent serving the enrolled pods). Without it every
/// connect in the attached cgroup is redirected (`run`, `sidecar`).
pub const CONFIG_GATE_BY_NETNS: u16 = 1;

/// [`Config::flags`]: [`Config::exempt_uid`] is exempt (`run`, `sidecar`:
/// the agent runs as that UID, the iptables setup's contract). Node mode
/// leaves it out: there the UID is shared with processes in pods (101 is
/// the default user of common images), and [`Config::exempt_cgroups`]
/// exempts the agent instead.
pub const CONFIG_EXEMPT_UID: u16 = 2;

impl Config {
    /// Whether a task of cgroup `id` is exempt.
    pub const fn exempts_cgroup(&self, id: u64) -> bool {
        id != 0 && (id == self.exempt_cgroups[0] || id == self.exempt_cgroups[1])
    }

    /// The exempt cgroups once the agent of cgroup `own` takes over from
    /// the one this config names first: `own`, then that one (the older
    /// is gone by then).
    pub const fn with_agent_cgroup(mut self, own: u64) -> Self {
        if self.exempt_cgroups[0] != own {
            self.exempt_cgroups = [own, self.exempt_cgroups[0]];
        }
        self
    }

    pub const fn gated_by_netns(&self) -> bool {
        self.flags & CONFIG_GATE_BY_NETNS != 0
    }

    pub const fn exempts_uid(&self) -> bool {
        self.flags & CONFIG_EXEMPT_UID != 0
    }
}

/// A client address qualified by its network namespace: two pods' clients
/// may both be `127.0.0.1:40000`, each on its own loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Network namespace cookie of the client; 0 when not gated by netns
    /// (one agent per network namespace: the address alone is unique).
    pub netns: u64,
    /// The client's address, as [`SockAddr::peer_key`].
    pub addr: SockAddr,
    pub _pad: u32,
}

impl PeerKey {
    pub const fn new(netns: u64, addr: SockAddr) -> Self {
        Self {
            netns,
            addr: addr.peer_key(),
            _pad: 0,
        }
    }
}

/// What `connect4`/`connect6` record per socket cookie until the
/// connection is established: where it was going, and from which netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingConnect {
    /// The [`PeerKey::netns`] the connection will be keyed under.
    pub netns: u64,
    pub orig: SockAddr,
    pub _pad: u32,
}

/// An IP address and TCP port. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one key type serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAddr {
    /// Address bytes in network order.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the application used.
    pub family: u16,
}

impl SockAddr {
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        // `::ffff:a.b.c.d` built from one integer, not a byte array literal:
        // the literal's ten zero bytes compile to a call to aya-ebpf's
        // `memset` loop, whose variable-offset stack stores the verifier only
        // accepts with CAP_PERFMON. This way CAP_BPF + CAP_NET_ADMIN suffice
        // (tests/tests/least_privilege.rs guards it).
        let mapped = (0xffff_u128 << 32) | u32::from_be_bytes(addr) as u128;
        Self {
            addr: mapped.to_be_bytes(),
            port,
            family: AF_INET,
        }
    }

    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            family: AF_INET6,
        }
    }

    /// The key under which a client's address is stored: family-independent,
    /// so a v4 client seen by a dual-stack listener matches too.
    pub const fn peer_key(mut self) -> Self {
        if is_v4_mapped(&self.addr) {
            self.family = AF_INET;
        } else {
            self.family = AF_INET6;
        }
        self
    }
}

impl From<core::net::SocketAddr> for SockAddr {
    fn from(sa: core::net::SocketAddr) -> Self {
        match sa {
            core::net::SocketAddr::V4(v4) => Self::v4(v4.ip().octets(), v4.port()),
            core::net::SocketAddr::V6(v6) => Self::v6(v6.ip().octets(), v6.port()),
        }
    }
}

impl SockAddr {
    /// The address as the application named it: IPv4 when it was an IPv4
    /// (or IPv4-mapped) destination, IPv6 otherwise.
    pub fn to_socket_addr(&self) -> core::net::SocketAddr {
        let ip6 = core::net::Ipv6Addr::from(self.addr);
        match ip6.to_ipv4_mapped() {
            Some(v4) => core::net::SocketAddr::new(v4.into(), self.port),
            None => core::net::SocketAddr::new(ip6.into(), self.port),
        }
    }
}

/// True for `::ffff:a.b.c.d`.
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), every bit pattern valid, padding explicit.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PendingConnect {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_stored_mapped() {
        let a = SockAddr::v4([169, 254, 171, 33], 80);
        assert!(is_v4_mapped(&a.addr));
        assert_eq!(&a.addr[12..], &[169, 254, 171, 33]);
        assert_eq!(a.family, AF_INET);
    }

    #[test]
    fn peer_key_ignores_socket_family() {
        let mut from_v6_socket = SockAddr::v4([127, 0, 0, 1], 40000);
        from_v6_socket.family = AF_INET6;
        assert_eq!(
            from_v6_socket.peer_key(),
            SockAddr::v4([127, 0, 0, 1], 40000).peer_key()
        );
        let v6 = SockAddr::v6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 1);
        assert_eq!(v6.peer_key().family, AF_INET6);
    }

    #[test]
    fn peer_keys_differ_by_netns_only_when_gated() {
        let a = SockAddr::v4([127, 0, 0, 1], 40000);
        assert_eq!(PeerKey::new(0, a), PeerKey::new(0, a));
        assert_ne!(PeerKey::new(7, a), PeerKey::new(8, a));
        let mut from_v6_socket = a;
        from_v6_socket.family = AF_INET6;
        assert_eq!(PeerKey::new(7, from_v6_socket), PeerKey::new(7, a));
    }

    /// A new agent keeps the one it replaces exempt (it still drains) and
    /// lets the one before go; an agent restarted in its own cgroup
    /// changes nothing.
    #[test]
    fn exempt_cgroups_follow_agent_updates() {
        let none = Config {
            proxy_port: 15080,
            flags: 0,
            exempt_uid: 101,
            exempt_cgroups: [0, 0],
        };
        assert!(!none.exempts_cgroup(0));
        let a = none.with_agent_cgroup(7);
        assert_eq!(a.exempt_cgroups, [7, 0]);
        assert!(a.exempts_cgroup(7) && !a.exempts_cgroup(0));
        let b = a.with_agent_cgroup(9);
        assert_eq!(b.exempt_cgroups, [9, 7]);
        assert_eq!(b.with_agent_cgroup(9), b);
        let c = b.with_agent_cgroup(11);
        assert_eq!(c.exempt_cgroups, [11, 9]);
        assert!(!c.exempts_cgroup(7));
    }

    #[test]
    fn socket_addr_round_trip() {
        let v4: core::net::SocketAddr = "169.254.171.33:80".parse().unwrap();
        assert_eq!(SockAddr::from(v4).to_socket_addr(), v4);
        let v6: core::net::SocketAddr = "[fd00:ec2:80::33]:443".parse().unwrap();
        assert_eq!(SockAddr::from(v6).to_socket_addr(), v6);
        let mapped: core::net::SocketAddr = "[::ffff:169.254.171.33]:80".parse().unwrap();
        assert_eq!(SockAddr::from(mapped).to_socket_addr(), v4);
        assert_eq!(
            SockAddr::from(mapped).peer_key(),
            SockAddr::from(v4).peer_key()
        );
    }

    #[test]
    fn never_intercepted_addresses_are_the_pod_identity_agent() {
        let v4 = core::net::Ipv4Addr::from(NEVER_INTERCEPTED_V4[0]);
        assert_eq!(v4, core::net::Ipv4Addr::new(169, 254, 170, 23));
        let v6 = core::net::Ipv6Addr::from(NEVER_INTERCEPTED_V6[0]);
        assert_eq!(v6, "fd00:ec2::23".parse::<core::net::Ipv6Addr>().unwrap());
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<SockAddr>(), 20);
        assert_eq!(core::mem::size_of::<Config>(), 24);
        // netns (8) + addr (20) + explicit pad (4): no hidden tail padding.
        assert_eq!(core::mem::size_of::<PeerKey>(), 32);
        assert_eq!(core::mem::size_of::<PendingConnect>(), 32);
    }
}
