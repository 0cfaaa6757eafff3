//! cgroup eBPF programs that steer TCP connects bound for VPC Lattice to the
//! local signing proxy, and remember where each connection was going.
//!
//! Flow for one connection:
//! 1. `connect4`/`connect6` (caller's context): destination in a configured
//!    prefix, caller not exempt (the agent: by UID in `run`/`sidecar`, by
//!    cgroup in node mode), and (node mode) the caller's network
//!    namespace enrolled → store the original destination and the netns
//!    under the socket cookie, rewrite the destination to loopback:proxy_port
//!    (the loopback of the caller's own netns, where its proxy listens).
//! 2. `sock_ops` at ACTIVE_ESTABLISHED: the client's local address is now
//!    known; move the record to `ORIG_DST_BY_PEER`, keyed by (netns, that
//!    address), which is exactly the peer the proxy sees on `accept()`.
//! 3. The proxy reads (and deletes) the record from userspace, or calls
//!    `getsockopt(SO_ORIGINAL_DST)`, answered by `getsockopt` below.
//!
//! Node mode attaches the programs once above every pod and gates them by
//! network-namespace cookie: one lookup in `ENROLLED_NETNS` per connect to
//! a Lattice address. The host, the agent and pods that are not enrolled
//! are never redirected.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use lattice_common::{
    AF_INET, AF_INET6, Config, ENROLLED_CAPACITY, ORIG_DST_CAPACITY, PREFIX_CAPACITY,
    PREFIX_EXEMPT, PeerKey, PendingConnect, SockAddr, is_v4_mapped,
};

const IPPROTO_TCP: u32 = 6;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` share the number 80.
const SO_ORIGINAL_DST: i32 = 80;

/// Allow the syscall to proceed (with whatever we rewrote).
const ALLOW: i32 = 1;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Destination prefixes: [`lattice_common::PREFIX_INTERCEPT`] entries are
/// redirected, [`PREFIX_EXEMPT`] entries (longer, inside them) never are.
#[map]
static V4_PREFIXES: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(PREFIX_CAPACITY, BPF_F_NO_PREALLOC);

#[map]
static V6_PREFIXES: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(PREFIX_CAPACITY, BPF_F_NO_PREALLOC);

/// Socket cookie → original destination (and netns), between connect and
/// establishment.
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, PendingConnect> =
    LruHashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// (netns, client local address) → original destination, until read.
#[map]
static ORIG_DST_BY_PEER: LruHashMap<PeerKey, SockAddr> =
    LruHashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// Network namespace cookies whose connects are redirected, when CONFIG
/// says to gate by netns (node mode). The value is unused.
#[map]
static ENROLLED_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(ENROLLED_CAPACITY, 0);

#[cgroup_sock_addr(connect4)]
pub fn lattice_connect4(ctx: SockAddrContext) -> i32 {
    let _ = redirect_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lattice_connect6(ctx: SockAddrContext) -> i32 {
    let _ = redirect_connect6(&ctx);
    ALLOW
}

#[sock_ops]
pub fn lattice_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let _ = rekey_by_peer(&ctx);
    }
    ALLOW as u32
}

#[cgroup_sockopt(getsockopt)]
pub fn lattice_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = answer_original_dst(&ctx);
    ALLOW
}

/// Config and the record's netns when this connect is to be redirected:
/// interception on, the caller not exempt, and (when gated) the caller's
/// network namespace enrolled.
#[inline(always)]
fn active_config(ctx: &SockAddrContext) -> Option<(Config, u64)> {
    let cfg = *CONFIG.get(0)?;
    if cfg.proxy_port == 0 {
        return None;
    }
    // Low 32 bits: UID in the initial user namespace.
    if cfg.exempts_uid() && bpf_get_current_uid_gid() as u32 == cfg.exempt_uid {
        return None;
    }
    // The calling task's cgroup (all threads of a process share it): the
    // node agent's upstream connects, made inside pods' namespaces.
    // SAFETY: a helper without arguments, available to cgroup programs.
    if cfg.exempt_cgroups[0] != 0 && cfg.exempts_cgroup(unsafe { bpf_get_current_cgroup_id() }) {
        return None;
    }
    if !cfg.gated_by_netns() {
        return Some((cfg, 0));
    }
    // SAFETY: valid context pointer for the duration of the program.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is not read.
    unsafe { ENROLLED_NETNS.get(&netns)? };
    Some((cfg, netns))
}

#[inline(always)]
fn redirect_connect4(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    unsafe {
        if (*sa).protocol != IPPROTO_TCP {
            return None;
        }
        let ip = (*sa).user_ip4;
        let octets = ip.to_ne_bytes();
        intercepted_v4(octets)?;
        let (cfg, netns) = active_config(ctx)?;
        let port = u16::from_be((*sa).user_port as u16);
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        let pending = PendingConnect {
            netns,
            orig: SockAddr::v4(octets, port),
            _pad: 0,
        };
        ORIG_DST_BY_COOKIE.insert(&cookie, &pending, 0).ok()?;
        (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        (*sa).user_port = u32::from(cfg.proxy_port.to_be());
        debug!(
            ctx,
            "redirect {:i}:{} -> 127.0.0.1:{}",
            u32::from_be(ip),
            port,
            cfg.proxy_port
        );
    }
    Some(())
}

#[inline(always)]
fn redirect_connect6(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    // SAFETY: as above. user_ip6 is read and written one u32 word at a time:
    // the verifier rejects wider or modified-pointer accesses to it.
    unsafe {
        if (*sa).protocol != IPPROTO_TCP {
            return None;
        }
        let ip6 = addr_of_mut!((*sa).user_ip6) as *mut u32;
        let words = [
            read_volatile(ip6),
            read_volatile(ip6.add(1)),
            read_volatile(ip6.add(2)),
            read_volatile(ip6.add(3)),
        ];
        let bytes = words_to_bytes(words);
        let port = u16::from_be((*sa).user_port as u16);
        let (orig, loopback) = if is_v4_mapped(&bytes) {
            let v4 = [bytes[12], bytes[13], bytes[14], bytes[15]];
            intercepted_v4(v4)?;
            // JVMs and other dual-stack clients: keep the mapped form.
            let lo = [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes([127, 0, 0, 1]),
            ];
            (SockAddr::v4(v4, port), lo)
        } else {
            intercepted_v6(bytes)?;
            (
                SockAddr::v6(bytes, port),
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
            )
        };
        let (cfg, netns) = active_config(ctx)?;
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        let pending = PendingConnect {
            netns,
            orig,
            _pad: 0,
        };
        ORIG_DST_BY_COOKIE.insert(&cookie, &pending, 0).ok()?;
        write_volatile(ip6, loopback[0]);
        write_volatile(ip6.add(1), loopback[1]);
        write_volatile(ip6.add(2), loopback[2]);
        write_volatile(ip6.add(3), loopback[3]);
        (*sa).user_port = u32::from(cfg.proxy_port.to_be());
        debug!(
            ctx,
            "redirect6 {:i}:{} -> loopback:{}", bytes, port, cfg.proxy_port
        );
    }
    Some(())
}

/// `Some` when the longest configured prefix holding `ip` is intercepted.
#[inline(always)]
fn intercepted_v4(ip: [u8; 4]) -> Option<()> {
    (*V4_PREFIXES.get(Key::new(32, ip))? != PREFIX_EXEMPT).then_some(())
}

#[inline(always)]
fn intercepted_v6(ip: [u8; 16]) -> Option<()> {
    (*V6_PREFIXES.get(Key::new(128, ip))? != PREFIX_EXEMPT).then_some(())
}

#[inline(always)]
fn rekey_by_peer(ctx: &SockOpsContext) -> Option<()> {
    // SAFETY: valid context pointer for the duration of the program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before any further map operation.
    let pending = unsafe { *ORIG_DST_BY_COOKIE.get(&cookie)? };
    let local = if ctx.family() == u32::from(AF_INET) {
        SockAddr::v4(ctx.local_ip4().to_ne_bytes(), ctx.local_port() as u16)
    } else {
        let ops = ctx.ops;
        // SAFETY: word-wise volatile reads; see the verifier note in connect6.
        let words = unsafe {
            let p = addr_of!((*ops).local_ip6) as *const u32;
            [
                read_volatile(p),
                read_volatile(p.add(1)),
                read_volatile(p.add(2)),
                read_volatile(p.add(3)),
            ]
        };
        SockAddr::v6(words_to_bytes(words), ctx.local_port() as u16)
    };
    // The netns recorded at connect: the helper is not available to
    // sock_ops programs before Linux 5.15.
    let key = PeerKey::new(pending.netns, local);
    ORIG_DST_BY_PEER.insert(&key, &pending.orig, 0).ok()?;
    let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
    Some(())
}

/// `struct sockaddr_in` as getsockopt(SO_ORIGINAL_DST) returns it.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// `struct sockaddr_in6` as getsockopt(IP6T_SO_ORIGINAL_DST) returns it.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext) -> Option<()> {
    let so = ctx.sockopt;
    // SAFETY: valid context; sk is checked for null; optval is bounds-checked
    // against optval_end before every write, as the verifier requires.
    unsafe {
        if (*so).optname != SO_ORIGINAL_DST {
            return None;
        }
        let level = (*so).level;
        if level != SOL_IP && level != SOL_IPV6 {
            return None;
        }
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        // Every field is read unconditionally, one volatile load each: the
        // verifier rejects arithmetic on a socket pointer, which LLVM
        // otherwise emits to share an address between the two branches.
        let port = u16::from_be(read_volatile(addr_of!((*sk).dst_port)));
        let family = read_volatile(addr_of!((*sk).family));
        let ip4 = read_volatile(addr_of!((*sk).dst_ip4));
        let ip6 = [
            read_volatile(addr_of!((*sk).dst_ip6[0])),
            read_volatile(addr_of!((*sk).dst_ip6[1])),
            read_volatile(addr_of!((*sk).dst_ip6[2])),
            read_volatile(addr_of!((*sk).dst_ip6[3])),
        ];
        let peer = if family == u32::from(AF_INET) {
            SockAddr::v4(ip4.to_ne_bytes(), port)
        } else {
            SockAddr::v6(words_to_bytes(ip6), port)
        };
        // Only records made without netns gating (netns 0): SO_ORIGINAL_DST
        // serves a proxy of one's own in `run`/`sidecar`, not node mode.
        let peer = PeerKey::new(0, peer);
        let orig = *ORIG_DST_BY_PEER.get(&peer)?;

        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if level == SOL_IP {
            // An IPv6 destination has no sockaddr_in form.
            if !is_v4_mapped(&orig.addr) {
                return None;
            }
            if optval.wrapping_add(core::mem::size_of::<SockaddrIn>()) > end {
                return None;
            }
            (optval as *mut SockaddrIn).write_unaligned(SockaddrIn {
                family: AF_INET,
                port_be: orig.port.to_be(),
                addr: [orig.addr[12], orig.addr[13], orig.addr[14], orig.addr[15]],
                zero: [0; 8],
            });
            (*so).optlen = core::mem::size_of::<SockaddrIn>() as i32;
        } else {
            if optval.wrapping_add(core::mem::size_of::<SockaddrIn6>()) > end {
                return None;
            }
            (optval as *mut SockaddrIn6).write_unaligned(SockaddrIn6 {
                family: AF_INET6,
                port_be: orig.port.to_be(),
                flowinfo: 0,
                addr: orig.addr,
                scope_id: 0,
            });
            (*so).optlen = core::mem::size_of::<SockaddrIn6>() as i32;
        }
        (*so).retval = 0;
        // Read once: the record is consumed like the userspace lookup does.
        let _ = ORIG_DST_BY_PEER.remove(&peer);
    }
    Some(())
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
