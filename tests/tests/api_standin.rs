//! Self-test of the Kubernetes API stand-in with real clients: kubectl (as
//! a child process, against a kubeconfig from `write_kubeconfig`) and a
//! small raw HTTP/1.1 client for what kubectl does not show (the 410 ERROR
//! event, bookmarks, `timeoutSeconds`, keep-alive, connection teardown).
//! Everything runs on loopback; each test has its own server.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lattice_tests::{
    ApiServer, ChildGuard, Output, TempDir,
    apiserver::{namespace_manifest, pod_manifest},
    netns::Netns,
    require_root, unique_name,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Fixtures: kubectl, a raw HTTP client.

/// kubectl with a kubeconfig for one stand-in and a discovery cache of its
/// own (the cache is keyed by host:port, which later runs reuse).
struct Kubectl {
    dir: TempDir,
    netns: Option<PathBuf>,
}

impl Kubectl {
    fn new(server: &ApiServer) -> Self {
        // Not installable from Debian bookworm: the machine image ships it.
        let found = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "kubectl is missing from PATH: these tests need it (the test machines' image ships \
             the `kubectl` package)"
        );
        let dir = TempDir::new("kubectl");
        server.write_kubeconfig(&dir.path().join("kubeconfig"));
        Self { dir, netns: None }
    }

    /// Runs kubectl inside a network namespace (`nsenter --net`).
    fn in_netns(mut self, path: &Path) -> Self {
        self.netns = Some(path.to_owned());
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg("kubectl");
                cmd
            }
            None => Command::new("kubectl"),
        };
        cmd.arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args);
        cmd
    }

    fn spawn(&self, args: &[&str]) -> ChildGuard {
        ChildGuard::spawn(self.command(args), format!("kubectl {}", args.join(" ")))
    }

    /// Runs to completion (killed and failed after `T`).
    fn run(&self, args: &[&str]) -> Output {
        let mut child = self.spawn(args);
        match child.wait_timeout(T) {
            Some(status) => child.output(status),
            None => panic!(
                "`{}` still running after {T:?}:\n{}",
                child.name(),
                child.captured()
            ),
        }
    }

    /// Runs, expects success, parses stdout as JSON.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(out.success(), "kubectl {args:?} failed: {out}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: stdout is not JSON ({e}): {out}"))
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// `namespace/name` of each item of a list.
fn names(list: &Value) -> BTreeSet<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| {
            let meta = &i["metadata"];
            match meta["namespace"].as_str() {
                Some(ns) => format!("{ns}/{}", meta["name"].as_str().unwrap()),
                None => meta["name"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A response read by [`Raw`].
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A raw HTTP/1.1 client connection: requests with `Content-Length`
/// responses, one after the other on the same socket.
struct Raw {
    reader: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(T)).unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: kube\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
    }

    /// Status line and headers.
    fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header has a colon");
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        (status, headers)
    }

    fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.send(method, target, headers, body);
        let (status, headers) = self.read_head();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or_else(|| panic!("{method} {target}: no Content-Length in {headers:?}"));
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        Response {
            status,
            headers,
            body,
        }
    }

    fn get(&mut self, target: &str) -> Response {
        self.request("GET", target, &[], b"")
    }
}

/// A watch over a raw connection: a thread decodes the chunked body into
/// lines; dropping it shuts the socket and joins the thread.
struct Watch {
    status: u16,
    headers: Vec<(String, String)>,
    lines: mpsc::Receiver<Option<String>>,
    socket: TcpStream,
    reader: Option<JoinHandle<()>>,
}

/// What a watch saw next.
#[derive(Debug)]
enum Next {
    Event(Value),
    /// The response ended cleanly (the terminating chunk).
    End,
    Nothing,
}

impl Watch {
    fn open(addr: SocketAddr, target: &str) -> Self {
        let mut raw = Raw::connect(addr);
        raw.send("GET", target, &[], b"");
        let (status, headers) = raw.read_head();
        let socket = raw.reader.get_ref().try_clone().unwrap();
        let (tx, lines) = mpsc::channel();
        let chunked = headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
        let reader = std::thread::spawn(move || {
            let mut reader = raw.reader;
            let mut pending = Vec::new();
            loop {
                // One chunk: size line, data, CRLF.
                let mut size = String::new();
                if !chunked || reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return; // cut without the terminating chunk: no End
                }
                let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
                    return;
                };
                if size == 0 {
                    let _ = tx.send(None);
                    return;
                }
                let mut data = vec![0; size + 2];
                if reader.read_exact(&mut data).is_err() {
                    return;
                }
                pending.extend_from_slice(&data[..size]);
                while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    let _ = tx.send(Some(String::from_utf8_lossy(&line).trim().to_owned()));
                }
            }
        });
        Self {
            status,
            headers,
            lines,
            socket,
            reader: Some(reader),
        }
    }

    fn next(&self, timeout: Duration) -> Next {
        match self.lines.recv_timeout(timeout) {
            Ok(Some(line)) => Next::Event(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("watch line {line:?}: {e}")),
            ),
            Ok(None) => Next::End,
            Err(mpsc::RecvTimeoutError::Timeout) => Next::Nothing,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("watch connection cut without the terminating chunk")
            }
        }
    }

    /// The next event; panics on anything else.
    fn event(&self) -> Value {
        match self.next(T) {
            Next::Event(e) => e,
            other => panic!("expected a watch event, got {other:?}"),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn typ(event: &Value) -> &str {
    event["type"]
        .as_str()
        .unwrap_or_else(|| panic!("no type: {event}"))
}

fn name(event: &Value) -> &str {
    event["object"]["metadata"]["name"].as_str().unwrap_or("")
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion: {object}"))
}

// ---------------------------------------------------------------------------
// kubectl

#[test]
fn kubectl_lists_what_was_applied() {
    let server = ApiServer::start();
    server.apply_namespace(namespace_manifest("a"));
    server.apply_namespace(namespace_manifest("b"));
    let p1 = server.apply_pod(pod_manifest("a", "p1", "n1"));
    server.apply_pod(pod_manifest("a", "p2", "n2"));
    server.apply_pod(pod_manifest("b", "p3", "n1"));
    let kubectl = Kubectl::new(&server);

    let all = kubectl.json(&["get", "pods", "-A", "-o", "json"]);
    assert_eq!(names(&all), set(&["a/p1", "a/p2", "b/p3"]), "{all}");
    let in_a = kubectl.json(&["get", "pods", "-n", "a", "-o", "json"]);
    assert_eq!(names(&in_a), set(&["a/p1", "a/p2"]));
    let namespaces = kubectl.json(&["get", "namespaces", "-o", "json"]);
    assert_eq!(names(&namespaces), set(&["a", "b"]));
    assert_eq!(
        namespaces["items"][0]["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "a"
    );

    let one = kubectl.json(&["get", "pod", "p1", "-n", "a", "-o", "json"]);
    assert_eq!(one["kind"], "Pod");
    assert_eq!(one["metadata"]["uid"], p1["metadata"]["uid"]);
    assert_eq!(
        one["metadata"]["resourceVersion"],
        p1["metadata"]["resourceVersion"]
    );

    // Human output: the server-side Table.
    let table = kubectl.run(&["get", "pods", "-A"]);
    assert!(table.success(), "{table}");
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{table}"
    );
    assert!(
        table.stdout.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells[..5] == ["b", "p3", "1/1", "Running", "0"]
        }),
        "{table}"
    );

    let missing = kubectl.run(&["get", "pod", "nope", "-n", "a"]);
    assert!(!missing.success());
    assert!(
        missing.stderr.contains("pods \"nope\" not found"),
        "{missing}"
    );
}

/// DaemonSets (`apps/v1`, read only): kubectl finds the group by
/// discovery, gets one, sees it gone once deleted.
#[test]
fn kubectl_gets_daemonsets_of_the_apps_group() {
    let server = ApiServer::start();
    server.apply_namespace(namespace_manifest("lattice-system"));
    let applied = server.apply_daemonset(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": { "name": "lattice-agent", "namespace": "lattice-system" },
        "spec": { "selector": { "matchLabels": { "app": "lattice-agent" } } },
    }));
    let kubectl = Kubectl::new(&server);
    let one = kubectl.json(&[
        "get",
        "ds",
        "lattice-agent",
        "-n",
        "lattice-system",
        "-o",
        "json",
    ]);
    assert_eq!(one["apiVersion"], "apps/v1");
    assert_eq!(one["kind"], "DaemonSet");
    assert_eq!(one["metadata"]["uid"], applied["metadata"]["uid"]);
    let table = kubectl.run(&["get", "daemonsets", "-A"]);
    assert!(
        table.success() && table.stdout.contains("lattice-agent"),
        "{table}"
    );

    assert!(
        server
            .delete_daemonset("lattice-system", "lattice-agent")
            .is_some()
    );
    let missing = kubectl.run(&["get", "daemonset", "lattice-agent", "-n", "lattice-system"]);
    assert!(!missing.success());
    assert!(
        missing
            .stderr
            .contains("daemonsets.apps \"lattice-agent\" not found"),
        "{missing}"
    );
}

#[test]
fn kubectl_selectors_filter() {
    let server = ApiServer::start();
    let mut web = pod_manifest("a", "web", "n1");
    web["metadata"]["labels"] = json!({ "app": "web" });
    server.apply_pod(web);
    server.apply_pod(pod_manifest("a", "db", "n2"));
    server.apply_pod(pod_manifest("b", "batch", "n1"));
    let kubectl = Kubectl::new(&server);

    let on_n1 = kubectl.json(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=n1",
        "-o",
        "json",
    ]);
    assert_eq!(names(&on_n1), set(&["a/web", "b/batch"]));
    let mine = server.wait_for_request("with the field selector", T, |l| {
        l.param("fieldSelector").as_deref() == Some("spec.nodeName=n1")
    });
    assert_eq!(mine.path(), "/api/v1/pods");

    let not_n1 = kubectl.json(&[
        "get",
        "pods",
        "-n",
        "a",
        "--field-selector",
        "spec.nodeName!=n1",
        "-o",
        "json",
    ]);
    assert_eq!(names(&not_n1), set(&["a/db"]));
    let labelled = kubectl.json(&["get", "pods", "-A", "-l", "app=web", "-o", "json"]);
    assert_eq!(names(&labelled), set(&["a/web"]));
    let unlabelled = kubectl.json(&["get", "pods", "-A", "-l", "!app", "-o", "json"]);
    assert_eq!(names(&unlabelled), set(&["a/db", "b/batch"]));

    let bad = kubectl.run(&["get", "pods", "-A", "--field-selector", "spec.bogus=1"]);
    assert!(!bad.success());
    assert!(
        bad.stderr.contains("field label not supported: spec.bogus"),
        "{bad}"
    );
}

/// The events kubectl printed so far: `(type, name)` of each JSON document
/// on stdout (`--output-watch-events` prints one per event).
fn printed_events(stdout: &str) -> Vec<(String, String)> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .map(|e| (typ(&e).to_owned(), name(&e).to_owned()))
        .collect()
}

fn wait_printed(child: &mut ChildGuard, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(t, n)| ((*t).to_owned(), (*n).to_owned()))
        .collect();
    let deadline = Instant::now() + T;
    loop {
        let seen = printed_events(&child.stdout());
        if seen == want {
            return;
        }
        assert!(
            seen.len() < want.len() && seen[..] == want[..seen.len()],
            "kubectl printed {seen:?}, expected {want:?}:\n{}",
            child.captured()
        );
        assert!(
            child.try_wait().is_none(),
            "kubectl exited:\n{}",
            child.captured()
        );
        assert!(
            Instant::now() < deadline,
            "kubectl printed {seen:?}, not {want:?}, within {T:?}:\n{}",
            child.captured()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kubectl_watch_sees_added_modified_deleted() {
    let server = ApiServer::start();
    server.apply_pod(pod_manifest("a", "before", "n1"));
    let kubectl = Kubectl::new(&server);
    let mut watch = kubectl.spawn(&[
        "get",
        "pods",
        "-A",
        "--watch",
        "-o",
        "json",
        "--output-watch-events",
    ]);
    wait_printed(&mut watch, &[("ADDED", "before")]);
    server.wait_for_watches(1, T);

    let mut pod = server.apply_pod(pod_manifest("a", "w1", "n1"));
    wait_printed(&mut watch, &[("ADDED", "before"), ("ADDED", "w1")]);
    pod["metadata"]["labels"] = json!({ "changed": "yes" });
    server.apply_pod(pod);
    server.delete_pod("a", "w1").expect("w1 exists");
    let all = [
        ("ADDED", "before"),
        ("ADDED", "w1"),
        ("MODIFIED", "w1"),
        ("DELETED", "w1"),
    ];
    wait_printed(&mut watch, &all);

    // kubectl lists, then watches from the list's resourceVersion.
    let log = server.requests();
    let list = log
        .iter()
        .find(|l| l.path() == "/api/v1/pods" && !l.is_watch())
        .expect("a list");
    let watch_req = log.iter().find(|l| l.is_watch()).expect("a watch");
    assert_eq!(list.status, 200);
    assert!(
        watch_req.param("resourceVersion").is_some(),
        "{watch_req:?}"
    );
    let events = printed_events(&watch.stdout());
    assert_eq!(events.len(), all.len());
}

#[test]
fn kubectl_chunk_size_pages_through_every_item_once() {
    let server = ApiServer::start();
    let pods = ["a/p1", "a/p2", "b/p1", "b/p3", "c/p0"];
    for key in pods {
        let (ns, name) = key.split_once('/').unwrap();
        server.apply_pod(pod_manifest(ns, name, "n1"));
    }
    let kubectl = Kubectl::new(&server);
    let list = kubectl.json(&["get", "pods", "-A", "--chunk-size=1", "-o", "json"]);
    let items: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["metadata"]["namespace"].as_str().unwrap(),
                i["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(items, pods, "every pod once, in key order");

    let pages: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|l| l.path() == "/api/v1/pods" && l.param("limit").as_deref() == Some("1"))
        .collect();
    assert_eq!(pages.len(), pods.len(), "{pages:#?}");
    assert!(pages[0].param("continue").is_none());
    assert!(
        pages[1..].iter().all(|p| p.param("continue").is_some()),
        "{pages:#?}"
    );
}

#[test]
fn kubectl_create_and_patch_events_are_recorded() {
    let server = ApiServer::start();
    let kubectl = Kubectl::new(&server);
    let core = kubectl.write(
        "core-event.yaml",
        "apiVersion: v1\nkind: Event\nmetadata:\n  generateName: p1-\n  namespace: default\n\
         involvedObject:\n  kind: Pod\n  name: p1\n  namespace: default\n\
         reason: Signed\nmessage: hello\ntype: Normal\n",
    );
    let out = kubectl.run(&["create", "-f", core.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    let v1 = kubectl.write(
        "v1-event.yaml",
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata:\n  name: p1.abc\n  namespace: default\n\
         eventTime: \"2025-01-01T00:00:00.000000Z\"\nreportingController: lattice\n\
         reportingInstance: node-1\naction: Sign\nreason: Signed\ntype: Normal\nnote: hi\n\
         regarding:\n  kind: Pod\n  name: p1\n  namespace: default\n",
    );
    let out = kubectl.run(&["create", "-f", v1.to_str().unwrap()]);
    assert!(out.success(), "{out}");

    let events = server.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let core = &events[0];
    assert_eq!(core["apiVersion"], "v1");
    assert_eq!(core["message"], "hello");
    let name = core["metadata"]["name"].as_str().unwrap();
    assert!(
        name.starts_with("p1-") && name.len() == "p1-".len() + 5,
        "{name}"
    );
    assert!(
        core["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(rv_of(core) > 1);
    assert_eq!(events[1]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(events[1]["metadata"]["name"], "p1.abc");
    // kubectl found the OpenAPI v3 `fieldValidation` parameter: it left
    // validation to the server.
    let posts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|l| l.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2, "{posts:#?}");
    assert_eq!(posts[0].path(), "/api/v1/namespaces/default/events");
    assert_eq!(
        posts[1].path(),
        "/apis/events.k8s.io/v1/namespaces/default/events"
    );
    assert!(
        posts
            .iter()
            .all(|p| p.status == 201 && p.param("fieldValidation").as_deref() == Some("Strict")),
        "{posts:#?}"
    );

    // A second create of the same name: 409 AlreadyExists.
    let again = kubectl.run(&["create", "-f", v1.to_str().unwrap()]);
    assert!(!again.success());
    assert!(
        again.stderr.contains("AlreadyExists") || again.stderr.contains("already exists"),
        "{again}"
    );

    // A series update as a merge patch.
    let out = kubectl.run(&[
        "patch",
        "events.v1.events.k8s.io",
        "p1.abc",
        "--type=merge",
        "-p",
        r#"{"series":{"count":2,"lastObservedTime":"2025-01-01T00:01:00.000000Z"}}"#,
    ]);
    assert!(out.success(), "{out}");
    let patched = &server.events()[1];
    assert_eq!(patched["series"]["count"], 2);
    assert_eq!(patched["note"], "hi");
    assert!(rv_of(patched) > rv_of(&events[1]));
    assert!(
        server
            .requests()
            .iter()
            .any(|l| l.method == "PATCH" && l.status == 200)
    );
}

#[test]
fn serves_inside_a_network_namespace() {
    if !require_root("serves_inside_a_network_namespace") {
        return;
    }
    let ns = Netns::new(&unique_name());
    let listener = ns
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .expect("listen in the netns");
    let server = ApiServer::start_on(listener);
    server.apply_pod(pod_manifest("a", "inside", "n1"));
    let kubectl = Kubectl::new(&server).in_netns(ns.path());
    let list = kubectl.json(&["get", "pods", "-A", "-o", "json"]);
    assert_eq!(names(&list), set(&["a/inside"]));
}

// ---------------------------------------------------------------------------
// The protocol, with the raw client

#[test]
fn watch_from_a_compacted_version_gets_the_410_error_event() {
    let server = ApiServer::start();
    let first = server.apply_pod(pod_manifest("a", "p1", "n1"));
    server.apply_pod(pod_manifest("a", "p2", "n1"));
    let old = rv_of(&first);

    // Before compaction the history replays.
    let replay = Watch::open(
        server.addr(),
        &format!("/api/v1/pods?watch=true&resourceVersion={old}"),
    );
    let event = replay.event();
    assert_eq!((typ(&event), name(&event)), ("ADDED", "p2"));
    drop(replay);

    server.compact();
    let expired = Watch::open(
        server.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={old}&allowWatchBookmarks=true"),
    );
    assert_eq!(
        expired.status, 200,
        "the real server answers 200, then the ERROR event"
    );
    let error = expired.event();
    assert_eq!(typ(&error), "ERROR", "{error}");
    let status = &error["object"];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["apiVersion"], "v1");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "Expired");
    assert_eq!(status["code"], 410);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("too old resource version"),
        "{status}"
    );
    assert!(
        matches!(expired.next(T), Next::End),
        "the stream ends after the error"
    );

    // From the current version all is well.
    let now = server.resource_version();
    let fresh = Watch::open(
        server.addr(),
        &format!("/api/v1/pods?watch=true&resourceVersion={now}"),
    );
    assert!(matches!(
        fresh.next(Duration::from_millis(300)),
        Next::Nothing
    ));
    server.apply_pod(pod_manifest("a", "p3", "n1"));
    let event = fresh.event();
    assert_eq!((typ(&event), name(&event)), ("ADDED", "p3"));
    assert_eq!(
        event["object"]["kind"], "Pod",
        "watch objects carry their kind"
    );

    // Lists at an expired exact version: HTTP 410.
    let mut raw = Raw::connect(server.addr());
    let gone = raw.get(&format!(
        "/api/v1/pods?resourceVersion={old}&resourceVersionMatch=Exact"
    ));
    assert_eq!(gone.status, 410);
    assert_eq!(gone.json()["reason"], "Expired");
}

#[test]
fn bookmarks_arrive_when_allowed() {
    let server = ApiServer::start();
    server.set_bookmark_interval(Duration::from_millis(100));
    server.apply_pod(pod_manifest("a", "p1", "n1"));
    let rv = server.resource_version();

    let with = Watch::open(
        server.addr(),
        &format!(
            "/api/v1/namespaces/a/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
        ),
    );
    let bookmark = with.event();
    assert_eq!(typ(&bookmark), "BOOKMARK", "{bookmark}");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        rv.to_string()
    );
    // Later bookmarks carry later versions.
    server.apply_namespace(namespace_manifest("elsewhere"));
    let later = server.resource_version();
    let deadline = Instant::now() + T;
    loop {
        let event = with.event();
        assert_eq!(typ(&event), "BOOKMARK", "the namespace is no pod: {event}");
        if rv_of(&event["object"]) == later {
            break;
        }
        assert!(Instant::now() < deadline, "no bookmark at {later}");
    }

    let without = Watch::open(
        server.addr(),
        &format!("/api/v1/pods?watch=true&resourceVersion={rv}"),
    );
    assert!(matches!(
        without.next(Duration::from_millis(500)),
        Next::Nothing
    ));

    // The streaming list: initial ADDEDs, then the annotated bookmark.
    server.apply_pod(pod_manifest("a", "p2", "n1"));
    let rv = server.resource_version();
    let streaming = Watch::open(
        server.addr(),
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
         &allowWatchBookmarks=true&resourceVersion=0",
    );
    let added: Vec<_> = (0..2).map(|_| streaming.event()).collect();
    assert_eq!(
        added.iter().map(|e| (typ(e), name(e))).collect::<Vec<_>>(),
        [("ADDED", "p1"), ("ADDED", "p2")]
    );
    let end = streaming.event();
    assert_eq!(typ(&end), "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(rv_of(&end["object"]), rv);
}

#[test]
fn timeout_seconds_ends_the_stream() {
    let server = ApiServer::start();
    let started = Instant::now();
    let watch = Watch::open(server.addr(), "/api/v1/pods?watch=true&timeoutSeconds=1");
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("transfer-encoding"), Some("chunked"));
    assert!(matches!(watch.next(Duration::from_secs(5)), Next::End));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let deadline = Instant::now() + T;
    while server.open_watches() != 0 {
        assert!(Instant::now() < deadline, "watch still counted open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Watch {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[test]
fn keep_alive_serves_requests_on_one_connection() {
    let server = ApiServer::start();
    server.apply_pod(pod_manifest("a", "p1", "n1"));
    let mut raw = Raw::connect(server.addr());
    let list = raw.get("/api/v1/pods");
    assert_eq!(list.status, 200);
    assert_eq!(list.header("content-type"), Some("application/json"));
    let list = list.json();
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    assert!(
        list["items"][0].get("kind").is_none(),
        "list items carry no kind: {list}"
    );
    let version = raw.get("/version");
    assert_eq!(version.status, 200);
    assert_eq!(version.json()["major"], "1");
    let pod = raw.get("/api/v1/namespaces/a/pods/p1");
    assert_eq!(pod.json()["kind"], "Pod");
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn list_pages_are_a_consistent_snapshot() {
    let server = ApiServer::start();
    for name in ["a", "b", "c"] {
        server.apply_pod(pod_manifest("ns", name, "n1"));
    }
    let mut raw = Raw::connect(server.addr());
    let first = raw.get("/api/v1/namespaces/ns/pods?limit=1").json();
    assert_eq!(names(&first), set(&["ns/a"]));
    assert_eq!(first["metadata"]["remainingItemCount"], 2);
    let at = first["metadata"]["resourceVersion"].clone();
    // Changes between pages do not show in later pages.
    server.apply_pod(pod_manifest("ns", "d", "n1"));
    server.delete_pod("ns", "c");
    let mut seen = vec!["ns/a".to_owned()];
    let mut token = first["metadata"]["continue"].as_str().unwrap().to_owned();
    loop {
        let page = raw
            .get(&format!(
                "/api/v1/namespaces/ns/pods?limit=1&continue={token}"
            ))
            .json();
        assert_eq!(
            page["metadata"]["resourceVersion"], at,
            "pages share the snapshot"
        );
        seen.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(next) => token = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ["ns/a", "ns/b", "ns/c"]);

    // A selector: no remainingItemCount.
    let selected = raw
        .get("/api/v1/pods?limit=1&fieldSelector=spec.nodeName%3Dn1")
        .json();
    assert!(selected["metadata"]["continue"].is_string());
    assert!(selected["metadata"].get("remainingItemCount").is_none());

    // A continue token from before a compaction: 410.
    let token = selected["metadata"]["continue"]
        .as_str()
        .unwrap()
        .to_owned();
    server.apply_pod(pod_manifest("ns", "e", "n1"));
    server.compact();
    let gone = raw.get(&format!("/api/v1/pods?limit=1&continue={token}"));
    assert_eq!(gone.status, 410);
    assert_eq!(gone.json()["reason"], "Expired");
}

#[test]
fn an_object_leaving_the_selection_is_deleted() {
    let server = ApiServer::start();
    let mut pod = server.apply_pod(pod_manifest("a", "mover", "n1"));
    let rv = server.resource_version();
    let watch = Watch::open(
        server.addr(),
        &format!("/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dn1"),
    );
    server.apply_pod(pod_manifest("a", "other-node", "n2"));
    pod["spec"]["nodeName"] = json!("n2");
    let moved = server.apply_pod(pod.clone());
    let deleted = watch.event();
    assert_eq!((typ(&deleted), name(&deleted)), ("DELETED", "mover"));
    assert_eq!(
        deleted["object"]["spec"]["nodeName"], "n1",
        "the last state that matched"
    );
    assert_eq!(rv_of(&deleted["object"]), rv_of(&moved));
    pod["spec"]["nodeName"] = json!("n1");
    server.apply_pod(pod);
    let back = watch.event();
    assert_eq!((typ(&back), name(&back)), ("ADDED", "mover"));
    server.delete_pod("a", "mover");
    let gone = watch.event();
    assert_eq!((typ(&gone), name(&gone)), ("DELETED", "mover"));
    assert!(rv_of(&gone["object"]) == server.resource_version());
}

#[test]
fn close_watches_ends_every_stream() {
    let server = ApiServer::start();
    let rv = server.resource_version();
    let watches: Vec<Watch> = (0..3)
        .map(|i| {
            let path = if i == 0 {
                "/api/v1/pods"
            } else {
                "/api/v1/namespaces/a/pods"
            };
            Watch::open(
                server.addr(),
                &format!("{path}?watch=true&resourceVersion={rv}"),
            )
        })
        .collect();
    server.wait_for_watches(3, T);
    server.apply_pod(pod_manifest("a", "p1", "n1"));
    for watch in &watches {
        let event = watch.event();
        assert_eq!((typ(&event), name(&event)), ("ADDED", "p1"));
    }
    server.close_watches();
    for watch in &watches {
        assert!(matches!(watch.next(T), Next::End));
    }
    // A client resumes from its last version and misses nothing.
    server.apply_pod(pod_manifest("a", "p2", "n1"));
    let resumed = Watch::open(
        server.addr(),
        &format!("/api/v1/pods?watch=true&resourceVersion={}", rv + 1),
    );
    let event = resumed.event();
    assert_eq!((typ(&event), name(&event)), ("ADDED", "p2"));
}

#[test]
fn errors_are_status_objects() {
    let server = ApiServer::start();
    let mut raw = Raw::connect(server.addr());
    let check = |resp: Response, code: u16, reason: &str| {
        assert_eq!(resp.status, code, "{resp:?}");
        let status = resp.json();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["apiVersion"], "v1");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], reason);
        assert_eq!(status["code"], code);
        status
    };
    check(raw.get("/api/v1/secrets"), 404, "NotFound");
    check(raw.get("/nothing/here"), 404, "NotFound");
    let missing = check(raw.get("/api/v1/namespaces/a/pods/nope"), 404, "NotFound");
    assert_eq!(missing["message"], "pods \"nope\" not found");
    assert_eq!(missing["details"]["name"], "nope");
    check(
        raw.get("/api/v1/pods?labelSelector=a%20b%3Dc"),
        400,
        "BadRequest",
    );
    check(
        raw.request("DELETE", "/api/v1/namespaces/a/pods/p", &[], b""),
        405,
        "MethodNotAllowed",
    );
    check(
        raw.request(
            "POST",
            "/api/v1/namespaces/a/events",
            &[("Content-Type", "application/json")],
            b"{\"metadata\":{}}",
        ),
        422,
        "Invalid",
    );
    check(
        raw.request(
            "PATCH",
            "/api/v1/namespaces/a/events/e",
            &[("Content-Type", "application/json-patch+json")],
            b"[]",
        ),
        415,
        "UnsupportedMediaType",
    );
    // The connection survived every error.
    assert_eq!(raw.get("/api").status, 200);
}

#[test]
fn events_post_and_patch_as_kube_rs_recorder_does() {
    let server = ApiServer::start();
    let mut raw = Raw::connect(server.addr());
    let json_ct = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
    ];
    // The Recorder names its Events itself and creates them...
    let event = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": { "name": "p1.17f0", "namespace": "team" },
        "eventTime": "2025-01-01T00:00:00.000000Z",
        "action": "Sign", "reason": "Signed", "type": "Normal",
        "reportingController": "lattice", "reportingInstance": "node-1",
        "regarding": { "kind": "Pod", "name": "p1", "namespace": "team" },
    });
    let created = raw.request(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/team/events?",
        &json_ct,
        event.to_string().as_bytes(),
    );
    assert_eq!(created.status, 201, "{created:?}");
    let created = created.json();
    assert_eq!(created["metadata"]["name"], "p1.17f0");
    // ...and patches a repeat into a series.
    let mut series = event.clone();
    series["series"] = json!({ "count": 2, "lastObservedTime": "2025-01-01T00:00:05.000000Z" });
    let patched = raw.request(
        "PATCH",
        "/apis/events.k8s.io/v1/namespaces/team/events/p1.17f0?",
        &[
            ("Content-Type", "application/merge-patch+json"),
            ("Accept", "application/json"),
        ],
        series.to_string().as_bytes(),
    );
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(patched.json()["series"]["count"], 2);
    let events = server.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["series"]["count"], 2);
    assert_eq!(events[0]["metadata"]["uid"], created["metadata"]["uid"]);
    // generateName, and a namespace that contradicts the path.
    let generated = raw
        .request(
            "POST",
            "/api/v1/namespaces/team/events",
            &json_ct,
            br#"{"metadata":{"generateName":"agent-"}}"#,
        )
        .json();
    assert!(
        generated["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("agent-")
    );
    assert_eq!(generated["kind"], "Event");
    let wrong = raw.request(
        "POST",
        "/api/v1/namespaces/team/events",
        &json_ct,
        br#"{"metadata":{"name":"x","namespace":"other"}}"#,
    );
    assert_eq!(wrong.status, 400);
    assert_eq!(server.events().len(), 2);
}

#[test]
fn dropping_the_server_closes_every_connection() {
    let server = ApiServer::start();
    let addr = server.addr();
    let watch = Watch::open(addr, "/api/v1/pods?watch=true&allowWatchBookmarks=true");
    let mut idle = Raw::connect(addr);
    assert_eq!(idle.get("/version").status, 200);
    server.wait_for_watches(1, T);
    drop(server);
    // The watch ends (cleanly, or cut by the runtime's teardown).
    match watch.lines.recv_timeout(Duration::from_secs(5)) {
        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        other => panic!("watch still open after drop: {other:?}"),
    }
    let mut buf = [0; 1];
    let n = idle.reader.get_mut().read(&mut buf);
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "idle connection not closed: {n:?}"
    );
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}
