//! The lattice-cni binary run as a container runtime runs a chained
//! plugin: `CNI_*` variables, the network configuration on stdin, then a
//! result or an error (JSON on stdout) and the exit status.
//!
//! The node agent's end of the plugin's socket is played by the test
//! itself with `lattice_cni::protocol`, so it can check what the plugin
//! sends: the request's fields and, as the pod's network namespace, the
//! very file the test named in `CNI_NETNS` (a plain temporary file: opening
//! it needs no root). Nothing here needs root or sends network traffic;
//! each test works in its own temporary directory.

use std::{
    fs,
    io::Write as _,
    os::{
        fd::OwnedFd,
        unix::{fs::MetadataExt as _, net::UnixListener},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use lattice_cni::protocol::{self, Reply, Request};
use lattice_tests::agent::cni_plugin_bin;
use serde_json::{Value, json};

const CONTAINER_ID: &str = "6f1c0ad3e9b84d2a";
const POD_UID: &str = "8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d";
/// How long the fake agent waits for the plugin to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// A test's directory: the agent's socket path (nothing listens unless the
/// test serves it) and a file standing in for the pod's network namespace.
struct Scratch {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    netns: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lat-cni-")
            .tempdir()
            .expect("temp dir");
        let netns = dir.path().join("netns");
        fs::write(&netns, "stands in for /var/run/netns/cni-…").expect("netns file");
        Self {
            socket: dir.path().join("cni.sock"),
            netns,
            _dir: dir,
        }
    }

    /// The plugin's configuration as the runtime passes it: the entry the
    /// agent writes, the list's `cniVersion` and `name`, and `prevResult`.
    fn conf(&self, policy: &str, prev: Option<Value>) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "aws-cni",
            "type": "lattice-cni",
            "socket": self.socket,
            "failurePolicy": policy,
            "exemptNamespaces": ["kube-system", "lattice-system"],
            "timeoutSeconds": 5
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        conf
    }

    /// ADD, CHECK and DEL's variables for pod `namespace`/cart-0, as
    /// containerd sets them.
    fn pod_vars(&self, namespace: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_CONTAINERID".into(), CONTAINER_ID.into()),
            ("CNI_NETNS".into(), self.netns.display().to_string()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), "/opt/cni/bin".into()),
            (
                "CNI_ARGS".into(),
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=cart-0;\
                     K8S_POD_INFRA_CONTAINER_ID={CONTAINER_ID};K8S_POD_UID={POD_UID}"
                ),
            ),
        ]
    }

    /// The request the agent should receive for `command` on pod shop/cart-0.
    fn expected_request(&self, command: protocol::Command, netns: &str) -> Request {
        Request {
            command,
            container_id: CONTAINER_ID.into(),
            netns: netns.into(),
            pod_namespace: "shop".into(),
            pod_name: "cart-0".into(),
            pod_uid: POD_UID.into(),
        }
    }
}

/// The previous plugin's result, as the VPC CNI returns it (trimmed), in
/// an older version than the configuration's: the plugin must rewrite it.
fn prev_result() -> Value {
    json!({
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "eni3f1c0ad3e9b", "mac": "0e:7d:2c:11:aa:01"},
            {"name": "eth0", "mac": "0e:7d:2c:11:aa:02", "sandbox": "/var/run/netns/cni-1"}
        ],
        "ips": [{"version": "4", "address": "192.168.12.34/32", "interface": 1}],
        "dns": {}
    })
}

/// `prev_result()` as the plugin must print it: in the config's version.
fn passed_through() -> Value {
    let mut out = prev_result();
    out["cniVersion"] = json!("1.0.0");
    out
}

/// One run of the plugin.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }

    /// Exit status 1 and a CNI error object with `code`.
    fn error(&self, code: u64) -> Value {
        assert_eq!(self.code, 1, "{self}");
        let err = self.json();
        assert_eq!(err["code"], code, "{self}");
        assert!(err["msg"].is_string(), "{self}");
        err
    }

    /// Exit status 0, nothing on stdout.
    fn silent_success(&self) {
        assert_eq!((self.code, self.stdout.as_str()), (0, ""), "{self}");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the plugin with only `CNI_COMMAND` and `vars` in its environment
/// and `stdin` as its input.
fn plugin(command: &str, vars: &[(String, String)], stdin: &[u8]) -> Run {
    let mut child = Command::new(cni_plugin_bin())
        .env_clear()
        .env("CNI_COMMAND", command)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lattice-cni");
    // VERSION does not read its input: a closed pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    let out = child.wait_with_output().expect("wait for lattice-cni");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn bytes(conf: &Value) -> Vec<u8> {
    serde_json::to_vec(conf).unwrap()
}

/// What the fake agent got: the request, and the descriptor sent with it
/// as (device, inode, opened read-only).
#[derive(Debug)]
struct Received {
    request: Request,
    fd: Option<(u64, u64, bool)>,
}

/// How the fake agent treats the one connection it accepts.
enum Behaviour {
    Answer(Reply),
    /// Reads the request and never answers (until the plugin hangs up).
    Silent,
    /// Closes the connection without reading.
    HangUp,
}

/// The agent's end of the socket, for one connection.
fn serve_once(socket: &Path, behaviour: Behaviour) -> JoinHandle<Option<Received>> {
    let listener = UnixListener::bind(socket).expect("bind the agent socket");
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + CONNECT_WAIT;
        let conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the plugin never connected");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(CONNECT_WAIT)).unwrap();
        if let Behaviour::HangUp = behaviour {
            return None;
        }
        let (request, fd): (Request, Option<OwnedFd>) =
            protocol::receive(&conn).expect("a request from the plugin");
        let fd = fd.map(|fd| {
            let stat = nix::sys::stat::fstat(&fd).expect("fstat the received fd");
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
            let read_only = nix::fcntl::OFlag::from_bits_truncate(flags)
                & nix::fcntl::OFlag::O_ACCMODE
                == nix::fcntl::OFlag::O_RDONLY;
            (stat.st_dev, stat.st_ino, read_only)
        });
        match behaviour {
            Behaviour::Answer(reply) => protocol::send(&conn, &reply, None).expect("reply"),
            // Wait for the plugin to give up (EOF) or the read timeout.
            Behaviour::Silent => drop(protocol::receive::<Request>(&conn)),
            Behaviour::HangUp => unreachable!(),
        }
        Some(Received { request, fd })
    })
}

/// `path`'s (device, inode), to compare with a received descriptor.
fn identity(path: &Path) -> (u64, u64) {
    let meta = fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

fn enrolled() -> Behaviour {
    Behaviour::Answer(Reply {
        enrolled: true,
        error: None,
    })
}

#[test]
fn version_lists_the_supported_versions() {
    let run = plugin("VERSION", &[], br#"{"cniVersion": "1.1.0"}"#);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(
        run.json(),
        json!({
            "cniVersion": "1.1.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        })
    );
    assert_eq!(run.stderr, "");
}

#[test]
fn add_in_an_exempt_namespace_passes_the_result_on_without_the_agent() {
    let s = Scratch::new();
    // failurePolicy fail and no socket: only not asking the agent passes.
    let run = plugin(
        "ADD",
        &s.pod_vars("kube-system"),
        &bytes(&s.conf("fail", Some(prev_result()))),
    );
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json(), passed_through());
    assert_eq!(run.stderr, "");
}

#[test]
fn add_for_a_container_that_is_no_kubernetes_pod_passes_through() {
    let s = Scratch::new();
    let mut vars = s.pod_vars("shop");
    vars.retain(|(k, _)| k != "CNI_ARGS");
    let run = plugin("ADD", &vars, &bytes(&s.conf("fail", Some(prev_result()))));
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json(), passed_through());
}

#[test]
fn add_without_an_agent_fails_under_failure_policy_fail() {
    let s = Scratch::new();
    let run = plugin(
        "ADD",
        &s.pod_vars("shop"),
        &bytes(&s.conf("fail", Some(prev_result()))),
    );
    let err = run.error(11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains(&s.socket.display().to_string()) && msg.contains("No such file"),
        "names the socket and the error: {run}"
    );
    assert_eq!(err["cniVersion"], "1.0.0");
    let details = err["details"].as_str().unwrap();
    assert!(
        details.contains("failurePolicy fail") && details.contains("un-intercepted"),
        "{run}"
    );
}

#[test]
fn add_without_an_agent_passes_through_under_failure_policy_ignore() {
    let s = Scratch::new();
    let run = plugin(
        "ADD",
        &s.pod_vars("shop"),
        &bytes(&s.conf("ignore", Some(prev_result()))),
    );
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json(), passed_through());
    assert!(
        run.stderr.starts_with("lattice-cni: ADD shop/cart-0: ")
            && run.stderr.contains(&s.socket.display().to_string()),
        "a warning for the runtime's log: {run}"
    );
}

#[test]
fn check_without_an_agent_follows_the_failure_policy() {
    let s = Scratch::new();
    let vars = s.pod_vars("shop");
    let fail = plugin("CHECK", &vars, &bytes(&s.conf("fail", Some(prev_result()))));
    let err = fail.error(11);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains(&s.socket.display().to_string()),
        "{fail}"
    );
    let ignore = plugin(
        "CHECK",
        &vars,
        &bytes(&s.conf("ignore", Some(prev_result()))),
    );
    ignore.silent_success();
}

#[test]
fn add_without_prev_result_is_an_invalid_configuration() {
    let s = Scratch::new();
    let run = plugin("ADD", &s.pod_vars("shop"), &bytes(&s.conf("fail", None)));
    let err = run.error(7);
    assert!(
        err["msg"].as_str().unwrap().contains("chained after"),
        "{run}"
    );
    let check = plugin("CHECK", &s.pod_vars("shop"), &bytes(&s.conf("fail", None)));
    check.error(7);
}

#[test]
fn unknown_or_missing_command_is_an_environment_error() {
    let s = Scratch::new();
    let stdin = bytes(&s.conf("fail", Some(prev_result())));
    let run = plugin("REMOVE", &s.pod_vars("shop"), &stdin);
    let err = run.error(4);
    assert!(err["msg"].as_str().unwrap().contains("REMOVE"), "{run}");

    let mut vars = s.pod_vars("shop");
    vars.retain(|(k, _)| k != "CNI_NETNS");
    let run = plugin("ADD", &vars, &stdin);
    assert_eq!(run.error(4)["msg"], "CNI_NETNS is not set", "{run}");
}

#[test]
fn bad_input_gets_the_spec_error_codes() {
    let s = Scratch::new();
    let vars = s.pod_vars("shop");
    // Before the configuration is read, errors are in the newest version.
    let err = plugin("ADD", &vars, b"").error(6);
    assert_eq!(err["msg"], "no network configuration on stdin", "{err}");
    assert_eq!(err["cniVersion"], "1.1.0", "{err}");
    let err = plugin("ADD", &vars, b"{oops").error(6);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .starts_with("the network configuration on stdin is not JSON"),
        "{err}"
    );
    assert_eq!(err["cniVersion"], "1.1.0", "{err}");

    let mut unversioned = s.conf("fail", Some(prev_result()));
    unversioned.as_object_mut().unwrap().remove("cniVersion");
    let err = plugin("ADD", &vars, &bytes(&unversioned)).error(7);
    assert_eq!(err["msg"], "the network configuration has no cniVersion");

    let mut no_socket = s.conf("fail", Some(prev_result()));
    no_socket.as_object_mut().unwrap().remove("socket");
    let err = plugin("ADD", &vars, &bytes(&no_socket)).error(7);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("missing field `socket`"),
        "{err}"
    );
    assert_eq!(err["cniVersion"], "1.0.0", "{err}");

    let bad_policy = s.conf("sometimes", Some(prev_result()));
    let err = plugin("ADD", &vars, &bytes(&bad_policy)).error(7);
    assert!(err["msg"].as_str().unwrap().contains("sometimes"), "{err}");

    let mut old = s.conf("fail", Some(prev_result()));
    old["cniVersion"] = json!("0.2.0");
    let err = plugin("ADD", &vars, &bytes(&old)).error(1);
    assert_eq!(err["cniVersion"], "0.2.0");
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .starts_with("CNI version 0.2.0 is not supported"),
        "{err}"
    );

    let mut missing_file = vars.clone();
    missing_file[1].1 = s.netns.with_extension("gone").display().to_string();
    let run = plugin(
        "ADD",
        &missing_file,
        &bytes(&s.conf("ignore", Some(prev_result()))),
    );
    assert!(
        run.error(5)["msg"].as_str().unwrap().contains("CNI_NETNS"),
        "{run}"
    );
}

#[test]
fn del_without_an_agent_succeeds_silently() {
    let s = Scratch::new();
    let mut vars = s.pod_vars("shop");
    plugin("DEL", &vars, &bytes(&s.conf("fail", Some(prev_result())))).silent_success();
    // The namespace already gone, no prevResult, even unreadable input.
    vars.retain(|(k, _)| k != "CNI_NETNS");
    plugin("DEL", &vars, &bytes(&s.conf("fail", None))).silent_success();
    plugin("DEL", &vars, b"{oops").silent_success();
}

#[test]
fn add_hands_the_netns_to_the_agent_and_passes_the_result_on() {
    let s = Scratch::new();
    let agent = serve_once(&s.socket, enrolled());
    let run = plugin(
        "ADD",
        &s.pod_vars("shop"),
        &bytes(&s.conf("fail", Some(prev_result()))),
    );
    let got = agent.join().expect("agent thread").expect("a request");
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json(), passed_through());
    assert_eq!(
        got.request,
        s.expected_request(protocol::Command::Add, &s.netns.display().to_string())
    );
    let (dev, ino, read_only) = got.fd.expect("the netns descriptor");
    assert_eq!(
        (dev, ino),
        identity(&s.netns),
        "the file named in CNI_NETNS"
    );
    assert!(read_only, "opened read-only");
}

#[test]
fn add_fails_with_the_agents_error() {
    let s = Scratch::new();
    let agent = serve_once(
        &s.socket,
        Behaviour::Answer(Reply {
            enrolled: false,
            error: Some("no credentials for service account shop/cart".into()),
        }),
    );
    // Even under ignore: the agent was asked and said no.
    let run = plugin(
        "ADD",
        &s.pod_vars("shop"),
        &bytes(&s.conf("ignore", Some(prev_result()))),
    );
    agent.join().expect("agent thread");
    let err = run.error(100);
    assert_eq!(
        err["msg"],
        "lattice node agent: no credentials for service account shop/cart"
    );
    assert_eq!(err["cniVersion"], "1.0.0");
}

#[test]
fn add_gives_up_on_an_agent_that_does_not_answer() {
    let s = Scratch::new();
    let mut conf = s.conf("fail", Some(prev_result()));
    conf["timeoutSeconds"] = json!(1);
    let agent = serve_once(&s.socket, Behaviour::Silent);
    let started = Instant::now();
    let run = plugin("ADD", &s.pod_vars("shop"), &bytes(&conf));
    let took = started.elapsed();
    agent.join().expect("agent thread");
    let err = run.error(11);
    assert!(err["msg"].as_str().unwrap().contains("within 1 s"), "{run}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn add_fails_when_the_agent_hangs_up() {
    let s = Scratch::new();
    let agent = serve_once(&s.socket, Behaviour::HangUp);
    let run = plugin(
        "ADD",
        &s.pod_vars("shop"),
        &bytes(&s.conf("fail", Some(prev_result()))),
    );
    agent.join().expect("agent thread");
    let err = run.error(11);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains(&s.socket.display().to_string()),
        "{run}"
    );
}

#[test]
fn check_and_del_reach_the_agent() {
    let s = Scratch::new();
    let netns = s.netns.display().to_string();

    let agent = serve_once(&s.socket, enrolled());
    plugin(
        "CHECK",
        &s.pod_vars("shop"),
        &bytes(&s.conf("fail", Some(prev_result()))),
    )
    .silent_success();
    let got = agent.join().unwrap().unwrap();
    assert_eq!(
        got.request,
        s.expected_request(protocol::Command::Check, &netns)
    );
    assert_eq!(got.fd.map(|(d, i, _)| (d, i)), Some(identity(&s.netns)));

    fs::remove_file(&s.socket).unwrap();
    let agent = serve_once(
        &s.socket,
        Behaviour::Answer(Reply {
            enrolled: false,
            error: Some("ignored on DEL".into()),
        }),
    );
    let del = plugin(
        "DEL",
        &s.pod_vars("shop"),
        &bytes(&s.conf("fail", Some(prev_result()))),
    );
    del.silent_success();
    let got = agent.join().unwrap().unwrap();
    assert_eq!(
        got.request,
        s.expected_request(protocol::Command::Del, &netns)
    );
    assert!(got.fd.is_none(), "DEL sends no descriptor");
    assert!(del.stderr.contains("ignored on DEL"), "{del}");
}

#[test]
fn status_reports_whether_the_agent_listens() {
    let s = Scratch::new();
    let mut conf = s.conf("fail", None);
    conf["cniVersion"] = json!("1.1.0");
    let err = plugin("STATUS", &[], &bytes(&conf)).error(50);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains(&s.socket.display().to_string()),
        "{err}"
    );
    let mut ignore = conf.clone();
    ignore["failurePolicy"] = json!("ignore");
    plugin("STATUS", &[], &bytes(&ignore)).silent_success();

    let listener = UnixListener::bind(&s.socket).unwrap();
    plugin("STATUS", &[], &bytes(&conf)).silent_success();
    drop(listener);

    plugin("GC", &[], &bytes(&conf)).silent_success();
}
