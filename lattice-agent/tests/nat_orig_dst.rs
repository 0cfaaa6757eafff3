//! The iptables-compatible original destination: a connection redirected by
//! the seed setup's NAT rule (`-j REDIRECT`) reports where it was going.
//! Runs in a network namespace of its own (unshared by one thread, so the
//! rules and addresses vanish with it).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
};

use lattice_agent::nat_orig_dst::nat_original_destination;

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: privileged tests must not be skipped under CI (run as root)");
    }
    eprintln!("\n*** SKIPPED (needs root): {test} ***\n");
    false
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In a fresh network namespace (this thread only): `lo` with `addr`, a
/// listener on `proxy`, and the seed's REDIRECT rule for `prefix`; then a
/// client connects to `target` and the accepted socket is asked.
fn redirected(iptables: &str, addr: &str, prefix: &str, proxy: &str, target: &str) {
    let (addr, prefix, proxy, target) = (
        addr.to_owned(),
        prefix.to_owned(),
        proxy.to_owned(),
        target.to_owned(),
    );
    let iptables = iptables.to_owned();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        // Children forked from this thread share its namespace.
        run(&["ip", "link", "set", "lo", "up"]);
        let mut add = vec!["ip", "addr", "add", &addr, "dev", "lo"];
        if addr.contains(':') {
            add.push("nodad");
        }
        run(&add);
        let listener = TcpListener::bind(&proxy).unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        run(&[
            &iptables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &prefix,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]);
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
    if !root_or_skip("ipv4_redirect_reports_original_destination") {
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
    if !root_or_skip("ipv6_redirect_reports_original_destination") {
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
