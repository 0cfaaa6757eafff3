//! Micro-benchmarks of the per-connection work of the proxy: finding a
//! connection's original destination — from the eBPF map (lattice) and, on
//! a map miss, from conntrack with SO_ORIGINAL_DST (the iptables setup's
//! NAT). Signing, the per-request work, is in `benches/signing.rs`.
//!
//! The lookups need root: they load and attach the real programs to a
//! cgroup of their own and make real connections, inside a network
//! namespace the bench unshares for itself (nothing reaches the host's
//! network; the namespace, its NAT rule and the cgroup go when it ends).
//! Without root they are skipped with a message.

use std::{
    fs,
    hint::black_box,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use lattice_agent::{
    bpf::{AgentExemption, InterceptConfig, Interceptor},
    nat_orig_dst::nat_original_destination,
};
use lattice_tests::{cgroup::cgroup2_mount, iptables::EgressProxyRules, spawn::run_ok};

/// Address the eBPF programs intercept (→ the listener).
const LATTICE_TARGET: &str = "169.254.171.33:80";
/// Address only the NAT rule redirects (→ the same listener).
const NAT_TARGET: &str = "169.254.172.33:80";

/// A network namespace (this thread's), a cgroup holding this process, and
/// the interceptor attached to it. Undone on drop.
struct Sandbox {
    cgroup: PathBuf,
    home: PathBuf,
    interceptor: Option<Interceptor>,
    listener: TcpListener,
}

impl Sandbox {
    fn new() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("\n*** SKIPPED original-destination benches: they need root ***\n");
            return None;
        }
        // Only this (the bench's main) thread and the commands it starts
        // enter the new namespace.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "169.254.171.33/32", "dev", "lo"],
            &["addr", "add", "169.254.172.33/32", "dev", "lo"],
        ] {
            run_ok(Command::new("ip").args(args));
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        EgressProxyRules {
            program: "iptables",
            prefix: "169.254.172.0/24",
            to_port: port,
            exempt_uid: 101,
        }
        .apply_here();

        let mount = cgroup2_mount();
        let home = mount.join(
            fs::read_to_string("/proc/self/cgroup")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("0::/"))
                .expect("no cgroup v2 entry in /proc/self/cgroup")
                .trim(),
        );
        let cgroup = mount.join(format!("lat-bench-crit-{}", std::process::id()));
        fs::create_dir(&cgroup).expect("mkdir cgroup");
        let mut sandbox = Self {
            cgroup,
            home,
            interceptor: None,
            listener,
        };
        fs::write(sandbox.cgroup.join("cgroup.procs"), "0").expect("join cgroup");
        sandbox.interceptor = Some(
            Interceptor::attach(&InterceptConfig {
                cgroup: sandbox.cgroup.clone(),
                v4_prefixes: vec!["169.254.171.0/24".parse().unwrap()],
                v6_prefixes: vec![],
                proxy_port: port,
                exempt_uid: 101,
                exempt: AgentExemption::Uid,
                pin: None,
                held_by_cgroup: false,
                gate_by_netns: false,
                gate_capacity: lattice_common::ENROLLED_CAPACITY,
            })
            .expect("attach the interceptor"),
        );
        Some(sandbox)
    }

    /// Connects to `target`, accepts, and times only `lookup` on the
    /// accepted connection.
    fn timed(
        &self,
        target: SocketAddr,
        lookup: impl Fn(&TcpStream, SocketAddr) -> Option<SocketAddr>,
    ) -> Duration {
        let client = TcpStream::connect(target).expect("connect");
        // RST on close: no TIME_WAIT, so ports never run out.
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let (accepted, peer) = self.listener.accept().expect("accept");
        let start = Instant::now();
        let found = black_box(lookup(&accepted, peer));
        let took = start.elapsed();
        assert_eq!(
            found,
            Some(target),
            "the lookup must find the original destination"
        );
        took
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(i) = self.interceptor.take() {
            i.detach();
        }
        let _ = fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Err(e) = fs::remove_dir(&self.cgroup) {
            eprintln!("removing {}: {e}", self.cgroup.display());
        }
        // The namespace and its NAT rule end with this thread's last user.
    }
}

fn orig_dst(c: &mut Criterion) {
    let Some(sandbox) = Sandbox::new() else {
        return;
    };
    let map = sandbox.interceptor.as_ref().unwrap().orig_dst();
    let mut group = c.benchmark_group("original_destination");
    // Each iteration makes a connection; keep the count modest.
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("ebpf_map", |b| {
        let target: SocketAddr = LATTICE_TARGET.parse().unwrap();
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| sandbox.timed(target, |_, peer| map.take(0, peer)))
                .sum()
        });
    });
    group.bench_function("map_miss_then_so_original_dst", |b| {
        let target: SocketAddr = NAT_TARGET.parse().unwrap();
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    sandbox.timed(target, |s, peer| {
                        map.take(0, peer).or_else(|| nat_original_destination(s))
                    })
                })
                .sum()
        });
    });
    group.finish();
}

criterion_group!(benches, orig_dst);
criterion_main!(benches);
