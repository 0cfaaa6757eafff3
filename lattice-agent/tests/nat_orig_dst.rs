//! The iptables-compatible original destination: a connection redirected by
//! the iptables setup's NAT rules (`-j REDIRECT`) reports where it was
//! going. Runs in a network namespace of its own (unshared by one thread,
//! so the rules and addresses vanish with it).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
};

use lattice_agent::nat_orig_dst::nat_original_destination;
use lattice_tests::{iptables::EgressProxyRules, require_root, spawn::run_ok};

/// In a fresh network namespace (this thread only): `lo` with `addr`, a
/// listener on `proxy`, and the iptables setup's rules for `prefix`
/// (`program`: iptables or ip6tables); then a client (root, not the exempt
/// UID) connects to `target` and the accepted socket is asked.
fn redirected(program: &str, addr: &str, prefix: &str, proxy: &str, target: &str) {
    let (program, addr, prefix, proxy, target) = (
        program.to_owned(),
        addr.to_owned(),
        prefix.to_owned(),
        proxy.to_owned(),
        target.to_owned(),
    );
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        // Children forked from this thread share its namespace.
        run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
        let mut add = vec!["addr", "add", &addr, "dev", "lo"];
        if addr.contains(':') {
            add.push("nodad");
        }
        run_ok(Command::new("ip").args(&add));
        let listener = TcpListener::bind(&proxy).unwrap();
        EgressProxyRules {
            program: &program,
            prefix: &prefix,
            to_port: listener.local_addr().unwrap().port(),
            exempt_uid: 101,
        }
        .apply_here();
        let target: SocketAddr = target.parse().unwrap();
        let _client = TcpStream::connect(target).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(nat_original_destination(&accepted), Some(target));

        // A connection made straight to the listener is not a NAT record.
        let _direct = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(nat_original_destination(&accepted), None);
    })
    .join()
    .expect("namespace thread");
}

#[test]
fn ipv4_redirect_reports_original_destination() {
    if !require_root("ipv4_redirect_reports_original_destination") {
        return;
    }
    redirected(
        "iptables",
        "169.254.171.33/32",
        "169.254.171.0/24",
        "127.0.0.1:0",
        "169.254.171.33:80",
    );
}

#[test]
fn ipv6_redirect_reports_original_destination() {
    if !require_root("ipv6_redirect_reports_original_destination") {
        return;
    }
    redirected(
        "ip6tables",
        "fd00:ec2:80::33/128",
        "fd00:ec2:80::/64",
        "[::1]:0",
        "[fd00:ec2:80::33]:8080",
    );
}
