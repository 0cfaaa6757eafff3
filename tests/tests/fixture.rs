//! Self-test of the pod fixture (no agent): the test addresses answer inside
//! the pod, processes land where asked, and dropping the pod leaves nothing
//! behind (no namespace, no cgroup, no process).

use std::{path::Path, process::Command, time::Duration};

use lattice_tests::{Pod, netns, require_root, test_bin};

const T: Duration = Duration::from_secs(30);

fn alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; ours are always reaped by their guard.
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn pod_serves_its_addresses_and_cleans_up() {
    if !require_root("pod_serves_its_addresses_and_cleans_up") {
        return;
    }
    let pod = Pod::new();
    let name = pod.name().to_owned();
    let cgroup = pod.cgroup_path().to_owned();
    assert!(netns::listed(&name), "netns {name} not listed");
    assert!(pod.netns_path().exists());
    assert!(cgroup.join("cgroup.procs").is_file());

    let _service = pod.start_service();
    for (args, want) in [
        (
            ["tcp", "169.254.171.33:80"],
            "service local=169.254.171.33:80",
        ),
        (
            ["tcp", "169.254.172.33:80"],
            "service local=169.254.172.33:80",
        ),
        (
            ["tcp", "[fd00:ec2:80::33]:80"],
            "service local=[fd00:ec2:80::33]:80",
        ),
        (
            ["tcp", "[fd00:ec2:81::33]:80"],
            "service local=[fd00:ec2:81::33]:80",
        ),
        (["tcp-mapped", "169.254.171.33:80"], "service local="),
        (["udp", "169.254.171.33:5353"], "udp-service ping"),
    ] {
        let out = pod.client(args).uid(1000).run(T);
        assert!(
            out.success() && out.stdout.starts_with(want),
            "{args:?}: {out}"
        );
    }
    let out = pod.client(["many", "169.254.171.33:80", "50"]).run(T);
    assert!(
        out.success() && out.stdout.contains("ok=50 failed=0"),
        "{out}"
    );
    // The pod has no route off-box: an address not on its lo is unreachable.
    let out = pod.client(["tcp", "192.0.2.1:80"]).run(T);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stdout.contains("NetworkUnreachable"), "{out}");
    // The client's safety net: outside a namespace the kit made, an address
    // that is neither loopback nor local is refused before any packet leaves.
    let out = Command::new(test_bin("lattice-test-client"))
        .args(["tcp", "192.0.2.1:80"])
        .env_remove("LATTICE_TEST_NETNS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("refusing"), "{stdout}");
    let out = pod.client(["tcp", "169.254.171.33:81"]).run(T);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stdout.contains("error: ConnectionRefused"), "{out}");

    // Without the interceptor (or netfilter) there is no original
    // destination: the proxy reports the errno instead of making one up.
    let mut proxy = pod
        .command(test_bin("lattice-test-origdst-proxy"))
        .arg("15081")
        .uid(101)
        .spawn();
    proxy.wait_for(lattice_tests::spawn::Stream::Stdout, "listening", T);
    let out = pod.client(["tcp", "127.0.0.1:15081"]).run(T);
    assert!(out.stdout.starts_with("orig-error="), "{out}");
    let out = pod.client(["tcp", "[::1]:15081"]).run(T);
    assert!(out.stdout.starts_with("orig-error="), "{out}");

    // Placement: in the cgroup (or not), with the asked UID.
    let sleeper = pod.command("sleep").arg("1000").uid(1000).spawn();
    let outside = pod.command("sleep").arg("1000").in_cgroup(false).spawn();
    std::thread::sleep(Duration::from_millis(100));
    let pids = pod.cgroup_pids();
    assert!(pids.contains(&sleeper.pid()), "{pids:?}");
    assert!(pids.contains(&proxy.pid()), "{pids:?}");
    assert!(!pids.contains(&outside.pid()), "{pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", sleeper.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().skip(1).all(|u| u == "1000")),
        "{status}"
    );

    // Leak the guards on purpose: the pod itself must clean up.
    let pids = [sleeper.pid(), outside.pid(), proxy.pid()];
    std::mem::forget(sleeper);
    std::mem::forget(outside);
    std::mem::forget(proxy);
    drop(pod);
    assert!(!netns::listed(&name), "netns {name} left behind");
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
    std::thread::sleep(Duration::from_millis(100));
    for pid in pids {
        // Forgotten children are zombies until reaped: reap, then check.
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        assert!(!alive(pid), "process {pid} survived the pod");
    }
}

#[test]
fn bpffs_guard_mounts_and_unmounts() {
    if !require_root("bpffs_guard_mounts_and_unmounts") {
        return;
    }
    let fs = lattice_tests::Bpffs::new();
    let path = fs.path().to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.contains(&format!(" {} ", path.display())),
        "not mounted"
    );
    drop(fs);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", path.display())),
        "still mounted"
    );
    assert!(!path.exists());
}

#[test]
fn test_binaries_exist() {
    for bin in [
        "lattice-test-service",
        "lattice-test-client",
        "lattice-test-origdst-proxy",
    ] {
        assert!(test_bin(bin).is_file());
    }
}

#[test]
fn pod_cleans_up_when_the_test_panics() {
    if !require_root("pod_cleans_up_when_the_test_panics") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let pod = Pod::new();
        let _service = pod.start_service();
        let sleeper = pod.command("sleep").arg("1000").uid(1000).spawn();
        tx.send((
            pod.name().to_owned(),
            pod.cgroup_path().to_owned(),
            sleeper.pid(),
        ))
        .unwrap();
        panic!("deliberate panic: the guards must still clean up");
    });
    assert!(result.is_err());
    let (name, cgroup, pid) = rx.recv().unwrap();
    assert!(!netns::listed(&name), "netns {name} left behind");
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
    assert!(!alive(pid), "process {pid} survived");
}
