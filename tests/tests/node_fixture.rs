//! Self-test of the node fixture (no agent): pods get addresses from the CNI
//! bridge and reach the node from them, their cgroups sit where the kubelet
//! puts them, the pause process is placed like a real one, IPv6 can be
//! switched off, projected volumes rotate atomically, and dropping pods or
//! the node leaves nothing behind.

use std::{
    fs,
    io::{Read, Seek, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lattice_tests::{
    CgroupDriver, Node, NodePod, PodSpec, Qos,
    cgroup::cgroup2_mount,
    netns,
    node::{LATTICE_V4, POD_GATEWAY, POD_IDENTITY_V4},
    require_root,
};

const T: Duration = Duration::from_secs(30);

fn netns_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn alive(pid: i32) -> bool {
    // Reap first in case it is a forgotten child of ours (a zombie still
    // has /proc/PID).
    // SAFETY: waitpid with WNOHANG; not our child is a harmless ECHILD.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Links of the namespace at `netns` (`ip -o link` names, without `@peer`).
fn links_in(netns: &Path) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ip", "-o", "link", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .collect()
}

fn in_subnet(ip: Ipv4Addr) -> bool {
    // 169.254.64.0/20
    u32::from(ip) & 0xffff_f000 == u32::from(Ipv4Addr::new(169, 254, 64, 0))
}

/// Accepts one connection, failing after `timeout` instead of hanging.
fn accept_within(listener: &TcpListener, timeout: Duration) -> (std::net::TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects from an app process of `pod` to `addr` (bash's /dev/tcp) and
/// returns (what the server saw as peer, what the client printed).
fn connect_from(pod: &NodePod, listener: &TcpListener, uid: u32) -> (SocketAddr, String) {
    let addr = listener.local_addr().unwrap();
    let mut client = pod
        .command("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/{}/{} && cat <&3",
            addr.ip(),
            addr.port()
        ))
        .uid(uid)
        .spawn();
    let (mut stream, peer) = accept_within(listener, T);
    writeln!(stream, "seen-from={}", peer.ip()).unwrap();
    drop(stream);
    let status = client.wait_timeout(T).expect("client still running");
    let out = client.output(status);
    assert!(out.success(), "{out}");
    (peer, out.stdout)
}

#[test]
fn pods_get_bridge_addresses_and_reach_the_node_from_them() {
    if !require_root("pods_get_bridge_addresses_and_reach_the_node_from_them") {
        return;
    }
    let node = Node::new();
    let a = node.add_pod(PodSpec::new("default", "a"));
    let b = node.add_pod(PodSpec::new("other", "b").driver(CgroupDriver::Cgroupfs));
    assert_ne!(a.ip(), b.ip());
    for pod in [&a, &b] {
        assert!(in_subnet(pod.ip()), "{} outside the pod subnet", pod.ip());
        assert_ne!(pod.ip(), POD_GATEWAY);
    }

    // The bridge is in the node namespace, not in the host's.
    assert!(links_in(node.netns_path()).contains(&node.bridge().to_owned()));
    assert!(
        !Command::new("ip")
            .args(["link", "show", "dev", node.bridge()])
            .output()
            .unwrap()
            .status
            .success(),
        "bridge {} in the host namespace",
        node.bridge()
    );

    // eth0 with the IPAM address and a default route via the bridge.
    for pod in [&a, &b] {
        let out = pod
            .command("ip")
            .args(["-4", "-o", "addr", "show", "dev", "eth0"])
            .run(T);
        assert!(
            out.stdout.contains(&format!(" {}/20 ", pod.ip())),
            "{}",
            out
        );
        let out = pod.command("ip").args(["-4", "route", "show"]).run(T);
        assert!(
            out.stdout
                .contains(&format!("default via {POD_GATEWAY} dev eth0")),
            "{out}"
        );
    }

    // Each pod's connection to the node's service addresses arrives from
    // the pod's own IP.
    for service in [LATTICE_V4, POD_IDENTITY_V4] {
        let listener = node
            .listen_tcp(format!("{service}:0").parse().unwrap())
            .unwrap();
        for (pod, uid) in [(&a, 0), (&b, 1000)] {
            let (peer, printed) = connect_from(pod, &listener, uid);
            assert_eq!(peer.ip(), std::net::IpAddr::V4(pod.ip()), "{service}");
            assert_eq!(printed.trim(), format!("seen-from={}", pod.ip()));
        }
    }

    // An address added later answers as well.
    node.add_lo_addr("169.254.171.34/32");
    let listener = node
        .listen_tcp("169.254.171.34:0".parse().unwrap())
        .unwrap();
    let (peer, _) = connect_from(&a, &listener, 0);
    assert_eq!(peer.ip(), std::net::IpAddr::V4(a.ip()));

    // Nothing beyond the bridge: the node namespace has no route off it.
    let out = node.command("ip").args(["-4", "route", "show"]).run(T);
    assert!(!out.stdout.contains("default"), "{out}");
    let out = node
        .command("ip")
        .args(["route", "get", "192.0.2.1"])
        .run(T);
    assert!(!out.success(), "node namespace routes off-box: {out}");
}

#[test]
fn pod_cgroups_follow_the_kubelet_layouts() {
    if !require_root("pod_cgroups_follow_the_kubelet_layouts") {
        return;
    }
    let node = Node::new();
    let root = node.cgroup_root().to_owned();
    assert_eq!(root.parent().unwrap(), cgroup2_mount());
    assert!(root.join("cgroup.procs").is_file());
    assert!(root.join("system.slice").is_dir());

    let uid = "8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d";
    let uid_ = "8a1d4b5c_2f3e_4a6b_9c7d_0e1f2a3b4c5d";
    let cases = [
        (
            CgroupDriver::Systemd,
            Qos::Burstable,
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"),
        ),
        (
            CgroupDriver::Systemd,
            Qos::BestEffort,
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice"),
        ),
        (
            CgroupDriver::Systemd,
            Qos::Guaranteed,
            format!("kubepods.slice/kubepods-pod{uid_}.slice"),
        ),
        (
            CgroupDriver::Cgroupfs,
            Qos::Burstable,
            format!("kubepods/burstable/pod{uid}"),
        ),
        (
            CgroupDriver::Cgroupfs,
            Qos::BestEffort,
            format!("kubepods/besteffort/pod{uid}"),
        ),
        (
            CgroupDriver::Cgroupfs,
            Qos::Guaranteed,
            format!("kubepods/pod{uid}"),
        ),
    ];
    let mount = cgroup2_mount();
    for (driver, qos, relative) in cases {
        let what = format!("{driver:?}/{qos:?}");
        // The same UID each time: one pod at a time, as a re-created pod.
        let pod = node.add_pod(
            PodSpec::new("default", "p")
                .uid(uid)
                .driver(driver)
                .qos(qos),
        );
        assert_eq!(pod.uid(), uid);
        assert_eq!(pod.cgroup_path(), root.join(&relative), "{what}");
        assert!(pod.cgroup_path().is_dir(), "{what}");

        // Pause and app containers, named as containerd names them.
        for container in [pod.pause_cgroup(), pod.app_cgroup()] {
            assert_eq!(container.parent().unwrap(), pod.cgroup_path(), "{what}");
            let name = container.file_name().unwrap().to_str().unwrap();
            let id = match driver {
                CgroupDriver::Systemd => name
                    .strip_prefix("cri-containerd-")
                    .and_then(|n| n.strip_suffix(".scope"))
                    .unwrap_or_else(|| panic!("{what}: container cgroup {name}")),
                CgroupDriver::Cgroupfs => name,
            };
            assert!(
                id.len() == 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{what}: container id {id}"
            );
        }
        assert_ne!(pod.pause_cgroup(), pod.app_cgroup());

        // The pause process is in the pause container, as /proc tells.
        let procs = fs::read_to_string(pod.pause_cgroup().join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pod.pause_pid().to_string(), "{what}");
        let own = fs::read_to_string(format!("/proc/{}/cgroup", pod.pause_pid())).unwrap();
        let want = format!(
            "0::/{}",
            pod.pause_cgroup().strip_prefix(&mount).unwrap().display()
        );
        assert!(own.lines().any(|l| l == want), "{what}: {own} lacks {want}");
        // Nothing directly in the pod level (cgroup v2: processes in leaves).
        let procs = fs::read_to_string(pod.cgroup_path().join("cgroup.procs")).unwrap();
        assert!(procs.trim().is_empty(), "{what}: {procs}");

        // App processes: the app container by default, or a new one.
        let mut app = pod.command("sleep").arg("1000").spawn();
        let extra = pod.add_container();
        let mut other = pod.command_in(&extra, "sleep").arg("1000").spawn();
        let procs = fs::read_to_string(pod.app_cgroup().join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), app.pid().to_string(), "{what}");
        let procs = fs::read_to_string(extra.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), other.pid().to_string(), "{what}");
        app.kill();
        other.kill();

        let pod_dir = pod.cgroup_path().to_owned();
        drop(pod);
        assert!(!pod_dir.exists(), "{what}: {} left", pod_dir.display());
        // The QoS level stays, as the kubelet's does.
        assert!(pod_dir.parent().unwrap().is_dir(), "{what}");
    }
}

#[test]
fn pause_process_is_in_the_pod_netns_as_65535() {
    if !require_root("pause_process_is_in_the_pod_netns_as_65535") {
        return;
    }
    let node = Node::new();
    let pod = node.add_pod(PodSpec::new("default", "pause"));
    let pid = pod.pause_pid();
    let ns = |path: &Path| fs::metadata(path).unwrap().ino();
    let pause_ns = ns(Path::new(&format!("/proc/{pid}/ns/net")));
    assert_eq!(pause_ns, ns(pod.netns_path()));
    assert_ne!(pause_ns, ns(node.netns_path()));
    assert_ne!(pause_ns, ns(Path::new("/proc/self/ns/net")));

    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for key in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        assert!(
            line.split_whitespace().skip(1).all(|id| id == "65535"),
            "{line}"
        );
    }
    let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(cmdline, "sleep\0infinity\0");

    // Why the UID matters: opening its netns takes root or CAP_SYS_PTRACE.
    let link = format!("/proc/{pid}/ns/net");
    let out = node.command("readlink").arg(&link).run(T);
    assert!(out.success() && out.stdout.starts_with("net:["), "{out}");
    let out = node.command("readlink").arg(&link).uid(1000).run(T);
    assert!(!out.success(), "a plain UID read {link}: {out}");

    // The node's own processes are in system.slice, not in any pod.
    let mut svc = node.command("sleep").arg("1000").spawn();
    let procs = fs::read_to_string(node.cgroup_root().join("system.slice/cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), svc.pid().to_string());
    assert_eq!(
        ns(Path::new(&format!("/proc/{}/ns/net", svc.pid()))),
        ns(node.netns_path())
    );
    svc.kill();
}

#[test]
fn ipv6_can_be_disabled_in_the_pod() {
    if !require_root("ipv6_can_be_disabled_in_the_pod") {
        return;
    }
    let node = Node::new();
    let v4only = node.add_pod(PodSpec::new("default", "v4").ipv6(false));
    let dual = node.add_pod(PodSpec::new("default", "v6").ipv6(true));

    let err = v4only
        .listen_tcp("[::1]:0".parse().unwrap())
        .expect_err("[::1] bound with IPv6 disabled");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{err}");
    assert!(v4only.listen_tcp("127.0.0.1:0".parse().unwrap()).is_ok());
    let out = v4only
        .command("cat")
        .arg("/proc/sys/net/ipv6/conf/eth0/disable_ipv6")
        .run(T);
    assert_eq!(out.stdout.trim(), "1", "{out}");

    assert!(dual.listen_tcp("[::1]:0".parse().unwrap()).is_ok());
    let out = dual.command("ip").args(["-6", "-o", "addr"]).run(T);
    assert!(out.stdout.contains("::1/128"), "{out}");

    // IPv4 works either way.
    let listener = node
        .listen_tcp(format!("{LATTICE_V4}:0").parse().unwrap())
        .unwrap();
    for pod in [&v4only, &dual] {
        let (peer, _) = connect_from(pod, &listener, 0);
        assert_eq!(peer.ip(), std::net::IpAddr::V4(pod.ip()));
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn projected_volumes_rotate_atomically() {
    if !require_root("projected_volumes_rotate_atomically") {
        return;
    }
    let node = Node::new();
    let pod = node.add_pod(PodSpec::new("default", "tokens"));
    let vol = "eks-pod-identity-token";
    let token = pod.write_projected(vol, "eks-pod-identity-token", "one");
    pod.write_projected(vol, "namespace", "default");
    assert_eq!(
        token,
        node.kubelet_root().join(format!(
            "pods/{}/volumes/kubernetes.io~projected/{vol}/eks-pod-identity-token",
            pod.uid()
        ))
    );
    assert_eq!(token, pod.projected_path(vol, "eks-pod-identity-token"));
    assert_eq!(fs::read_to_string(&token).unwrap(), "one");

    // The kubelet's layout and modes.
    let dir = pod.volume_path(vol);
    assert_eq!(
        fs::read_link(&token).unwrap(),
        Path::new("..data/eks-pod-identity-token")
    );
    let ts = fs::read_link(dir.join("..data")).unwrap();
    let ts_name = ts.to_str().unwrap();
    assert!(
        ts_name.starts_with("..20") && ts_name.len() > 22,
        "{ts_name}"
    );
    assert_eq!(mode(&dir.join(&ts)), 0o755);
    assert_eq!(mode(&token), 0o644);
    assert_eq!(fs::metadata(&token).unwrap().uid(), 0);
    assert_eq!(mode(&dir), 0o1777);
    for (path, want) in [
        (node.kubelet_root().to_owned(), 0o750),
        (node.kubelet_root().join("pods"), 0o750),
        (pod.kubelet_dir().to_owned(), 0o750),
        (pod.kubelet_dir().join("volumes"), 0o750),
    ] {
        assert_eq!(mode(&path), want, "{}", path.display());
    }

    // A reader holding the file open across a rotation keeps the old one;
    // the path reads the new one; the old timestamped directory is gone.
    let mut held = fs::File::open(&token).unwrap();
    let rotated = pod.write_projected(vol, "eks-pod-identity-token", "two");
    assert_eq!(rotated, token);
    assert_eq!(fs::read_to_string(&token).unwrap(), "two");
    let mut old = String::new();
    held.read_to_string(&mut old).unwrap();
    assert_eq!(old, "one");
    held.rewind().unwrap();
    old.clear();
    held.read_to_string(&mut old).unwrap();
    assert_eq!(old, "one");
    let new_ts = fs::read_link(dir.join("..data")).unwrap();
    assert_ne!(new_ts, ts);
    assert!(!dir.join(&ts).exists(), "old {} left", ts.display());
    // The other file of the volume was carried over.
    assert_eq!(
        fs::read_to_string(pod.projected_path(vol, "namespace")).unwrap(),
        "default"
    );
    let mut entries: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            new_ts.to_str().unwrap(),
            "..data",
            "eks-pod-identity-token",
            "namespace"
        ],
    );

    // Readers that resolve the path on every read (what an agent does)
    // never see a partial or mixed file during rotations. (They may get
    // ENOENT if they resolved `..data` just before the old directory was
    // removed: the kubelet's writer has the same window.)
    pod.write_projected(vol, "eks-pod-identity-token", "token-init");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, token) = (stop.clone(), token.clone());
        std::thread::spawn(move || {
            let (mut reads, mut missing) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match fs::read_to_string(&token) {
                    Ok(got) => {
                        assert!(got.starts_with("token-") && got.len() == 10, "{got:?}");
                        reads += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing += 1,
                    Err(e) => panic!("reading {}: {e}", token.display()),
                }
            }
            eprintln!("rotation reader: {reads} reads, {missing} ENOENT");
            reads
        })
    };
    for i in 0..200 {
        pod.write_projected(vol, "eks-pod-identity-token", format!("token-{i:04}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw a torn rotation");
    assert!(reads > 0);
    assert_eq!(fs::read_to_string(&token).unwrap(), "token-0199");
    let ts_dirs = fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("..") && name != "..data"
        })
        .count();
    assert_eq!(ts_dirs, 1);

    let kubelet_dir = pod.kubelet_dir().to_owned();
    drop(pod);
    assert!(!kubelet_dir.exists());
}

#[test]
fn dropping_a_pod_cleans_up_and_frees_its_address() {
    if !require_root("dropping_a_pod_cleans_up_and_frees_its_address") {
        return;
    }
    let node = Node::new();
    let keep = node.add_pod(PodSpec::new("default", "keep"));
    let links_before = links_in(node.netns_path());
    let pod = node.add_pod(PodSpec::new("default", "gone").qos(Qos::BestEffort));
    assert_eq!(links_in(node.netns_path()).len(), links_before.len() + 1);
    let ipam = node
        .temp_dir()
        .join("cni/ipam")
        .join(node.name())
        .join(pod.ip().to_string());
    assert!(ipam.is_file(), "{} missing", ipam.display());
    let app = pod.command("sleep").arg("1000").uid(1000).spawn();
    let (app_pid, pause_pid) = (app.pid(), pod.pause_pid());
    let netns = netns_name(pod.netns_path());
    let cgroup = pod.cgroup_path().to_owned();
    let kubelet_dir = pod.kubelet_dir().to_owned();
    assert!(netns::listed(&netns));
    assert_eq!(node.pod_count(), 2);

    // The pod's drop must cope with a process whose guard was leaked.
    std::mem::forget(app);
    drop(pod);
    assert!(!netns::listed(&netns), "netns {netns} left");
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(cgroup.parent().unwrap().is_dir(), "QoS level removed");
    assert!(!kubelet_dir.exists(), "{} left", kubelet_dir.display());
    assert!(!ipam.exists(), "address not released: {}", ipam.display());
    assert_eq!(links_in(node.netns_path()), links_before, "veth left");
    assert!(!alive(app_pid), "app {app_pid} survived");
    assert!(!alive(pause_pid), "pause {pause_pid} survived");
    assert_eq!(node.pod_count(), 1);

    // The other pod is untouched.
    let listener = node
        .listen_tcp(format!("{LATTICE_V4}:0").parse().unwrap())
        .unwrap();
    let (peer, _) = connect_from(&keep, &listener, 0);
    assert_eq!(peer.ip(), std::net::IpAddr::V4(keep.ip()));
}

/// Everything a node made, to check after it is gone.
struct Traces {
    netns: Vec<String>,
    paths: Vec<PathBuf>,
    pids: Vec<i32>,
    bridge: String,
}

impl Traces {
    fn assert_gone(&self) {
        for name in &self.netns {
            assert!(!netns::listed(name), "netns {name} left");
            assert!(!Path::new("/run/netns").join(name).exists());
        }
        for path in &self.paths {
            assert!(!path.exists(), "{} left", path.display());
        }
        for pid in &self.pids {
            assert!(!alive(*pid), "process {pid} survived");
        }
        assert!(
            !Command::new("ip")
                .args(["link", "show", "dev", &self.bridge])
                .output()
                .unwrap()
                .status
                .success(),
            "bridge {} exists in the host namespace",
            self.bridge
        );
    }
}

/// A node with two pods (both drivers), a node process, app processes and
/// a projected volume; returns the node, pods and what to check later.
fn busy_node() -> (Node, Vec<NodePod>, Traces) {
    let node = Node::new();
    let pods = vec![
        node.add_pod(PodSpec::new("default", "a")),
        node.add_pod(
            PodSpec::new("default", "b")
                .driver(CgroupDriver::Cgroupfs)
                .qos(Qos::Guaranteed)
                .ipv6(false),
        ),
    ];
    let mut traces = Traces {
        netns: vec![node.name().to_owned()],
        paths: vec![
            node.cgroup_root().to_owned(),
            node.kubelet_root().to_owned(),
            node.temp_dir().to_owned(),
        ],
        pids: Vec::new(),
        bridge: node.bridge().to_owned(),
    };
    assert!(links_in(node.netns_path()).contains(&traces.bridge));
    let service = node.command("sleep").arg("1000").spawn();
    traces.pids.push(service.pid());
    // Leaked on purpose: the node must kill it.
    std::mem::forget(service);
    for pod in &pods {
        traces.netns.push(netns_name(pod.netns_path()));
        traces.pids.push(pod.pause_pid());
        pod.write_projected("kube-api-access", "token", "t");
        let app = pod.command("sleep").arg("1000").uid(1000).spawn();
        traces.pids.push(app.pid());
        std::mem::forget(app);
    }
    for name in &traces.netns {
        assert!(netns::listed(name), "netns {name} missing");
    }
    (node, pods, traces)
}

#[test]
fn dropping_the_node_removes_everything() {
    if !require_root("dropping_the_node_removes_everything") {
        return;
    }
    // Pods first, then the node (the usual order).
    let (node, pods, traces) = busy_node();
    drop(pods);
    drop(node);
    traces.assert_gone();

    // The node first, with its pod handles still alive: the node tears
    // them down, their later drop does nothing.
    let (node, pods, traces) = busy_node();
    let pod_cgroup = pods[0].cgroup_path().to_owned();
    drop(node);
    traces.assert_gone();
    assert!(!pod_cgroup.exists());
    drop(pods);
    traces.assert_gone();
}

#[test]
fn an_empty_node_drops_cleanly() {
    if !require_root("an_empty_node_drops_cleanly") {
        return;
    }
    let node = Node::new();
    // The plugin creates the bridge with the first pod.
    assert!(!links_in(node.netns_path()).contains(&node.bridge().to_owned()));
    let out = node
        .command("ip")
        .args(["-4", "-o", "addr", "show", "dev", "lo"])
        .run(T);
    for addr in [LATTICE_V4, POD_IDENTITY_V4] {
        assert!(out.stdout.contains(&format!(" {addr}/32 ")), "{out}");
    }
    let traces = Traces {
        netns: vec![node.name().to_owned()],
        paths: vec![node.cgroup_root().to_owned(), node.temp_dir().to_owned()],
        pids: Vec::new(),
        bridge: node.bridge().to_owned(),
    };
    drop(node);
    traces.assert_gone();
}

#[test]
fn node_cleans_up_when_the_test_panics() {
    if !require_root("node_cleans_up_when_the_test_panics") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let (node, pods, traces) = busy_node();
        let _keep = (&node, &pods);
        tx.send(traces).unwrap();
        panic!("deliberate panic: the guards must still clean up");
    });
    assert!(result.is_err());
    rx.recv().unwrap().assert_gone();
}

#[test]
fn pod_lifecycle_timing() {
    if !require_root("pod_lifecycle_timing") {
        return;
    }
    let started = Instant::now();
    let node = Node::new();
    let node_up = started.elapsed();
    let mut created = Vec::new();
    let mut destroyed = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let pod = node.add_pod(PodSpec::new("default", &format!("t{i}")));
        created.push(t.elapsed());
        let t = Instant::now();
        drop(pod);
        destroyed.push(t.elapsed());
    }
    let t = Instant::now();
    drop(node);
    let node_down = t.elapsed();
    eprintln!(
        "node up {node_up:?}, down {node_down:?}; pod create {created:?}; pod destroy {destroyed:?}"
    );
    for d in created.iter().chain(&destroyed) {
        assert!(*d < Duration::from_secs(10), "{d:?}");
    }
}
