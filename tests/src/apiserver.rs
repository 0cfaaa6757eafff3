//! The Kubernetes API stand-in: an in-process server speaking the wire
//! protocol of the real kube-apiserver for the few resources lattice's node
//! mode uses, so that real clients (kube-rs, kubectl) run against it
//! unchanged. No real API server can run on the test machines; this is the
//! one allowed stand-in for it.
//!
//! # What it implements
//!
//! Plain HTTP/1.1 (no TLS, no authentication, no authorisation) with
//! keep-alive, on a listener the caller may create inside a network
//! namespace ([`ApiServer::start_on`]).
//!
//! - Resources: `pods` and `namespaces` (read, list, watch; their state is
//!   set by the test through [`ApiServer::apply_pod`] and friends), `v1`
//!   `events` and `events.k8s.io/v1` `events` (also create and patch, so
//!   clients can post Events; [`ApiServer::events`] returns them), and
//!   `apps/v1` `daemonsets` (read, list, watch; set by the test through
//!   [`ApiServer::apply_daemonset`]).
//! - Objects are the real JSON shape. One global resourceVersion counter
//!   orders every change (as etcd's revision does); the server assigns
//!   `metadata.uid`, `resourceVersion` and `creationTimestamp`, and a name
//!   from `generateName`.
//! - Lists (`PodList`, ...): items without `apiVersion`/`kind`, as the real
//!   server sends them; `labelSelector` (`=`, `==`, `!=`, exists, `!k`,
//!   `in`, `notin`), `fieldSelector` (`=`, `==`, `!=` over the field labels
//!   the real server supports per kind, e.g. `spec.nodeName`,
//!   `metadata.name`, `metadata.namespace`, `status.phase`); `limit` and
//!   `continue` paging from a consistent snapshot (every item exactly once,
//!   `remainingItemCount` when no selector is given); `resourceVersion` with
//!   `resourceVersionMatch` `NotOlderThan` (the current state) or `Exact`
//!   (the state at that version, rebuilt from the history). A continue
//!   token or an `Exact` version older than the history answers HTTP 410
//!   `Expired`.
//! - Watches (`watch=true|1`): a chunked `200` response of newline-delimited
//!   `{"type":..,"object":..}` events. Without a resourceVersion (or with
//!   `0`) it starts with an `ADDED` per current object; with one it replays
//!   the history after it. An object that starts or stops matching the
//!   selectors is sent as `ADDED` or `DELETED` (the latter with its previous
//!   state and the event's resourceVersion), as the real watch cache does.
//!   `allowWatchBookmarks=true` adds a `BOOKMARK` (an empty object of the
//!   kind with only `metadata.resourceVersion`) every
//!   [`ApiServer::set_bookmark_interval`]; `sendInitialEvents=true` (the
//!   streaming list, with `resourceVersionMatch=NotOlderThan`) ends the
//!   initial events with a bookmark annotated `k8s.io/initial-events-end`.
//!   `timeoutSeconds` ends the stream (default 30 minutes).
//! - Expiry as on the real server: a watch from a resourceVersion older than
//!   the history ([`ApiServer::compact`]) gets HTTP `200` and one `ERROR`
//!   event holding a `Status` with `reason: Expired`, `code: 410`, then the
//!   stream ends. (kube-rs's `watcher` relists on exactly that event; an
//!   HTTP 410 at watch start would make it retry the same version.)
//! - `Accept` negotiation for `as=Table` (what `kubectl get` prints, with the
//!   real server's main columns for pods and namespaces) and `as=PartialObjectMetadata`
//!   (kube-rs's metadata watches); JSON otherwise.
//! - Discovery: `/version`, `/api`, `/api/v1`, `/apis`,
//!   `/apis/apps[/v1]`, `/apis/events.k8s.io[/v1]` (the legacy documents; a client asking for
//!   aggregated discovery falls back to them as with an older server),
//!   `/healthz`, `/livez`, `/readyz`; and an OpenAPI v3 index and
//!   group-version documents without schemas that only declare the
//!   `fieldValidation` parameter: `kubectl create` then leaves validation
//!   to the server, as it does with a real one (the stand-in validates no
//!   fields).
//! - Errors are `Status` objects with the real reasons and codes (404
//!   `NotFound` also for unknown paths, 400, 405, 409, 410, 415, 422).
//!
//! # What it does not
//!
//! Other resources; creating, replacing or deleting pods and namespaces
//! through the API (405: the test owns them); `PUT`; JSON patch (415);
//! strategic merge of lists (merge, strategic merge and apply patches are
//! all applied as RFC 7386 merge patches of a JSON body); schemas
//! (`/openapi/v2` is 404, so is client-side validation); protobuf;
//! HTTP/2; conversion between the two Event APIs; validation and
//! admission beyond names and namespaces; graceful deletion (a delete is
//! immediate, without `deletionTimestamp`); deleting a namespace's pods
//! with it; subresources (`status`, `log`, ...); the "resourceVersion too
//! large" wait (a future version is accepted as is); the `/api/v1/watch/`
//! paths.
//!
//! # Why hyper on a runtime of its own
//!
//! It serves with hyper 1 on a single-threaded tokio runtime owned by one
//! thread: hyper does the HTTP/1.1 framing real clients rely on (keep-alive,
//! pipelining, chunked bodies both ways) rather than a hand-written parser;
//! a watch is a task, not a thread, so any number of concurrent watchers
//! cost nothing; and dropping the runtime cancels every task, which closes
//! every connection at once. The crates are in the workspace's dependency
//! graph already (the agent uses them). The runtime is its own so the
//! stand-in works from plain `#[test]` functions and never competes with a
//! runtime of the code under test.

mod select;
mod store;
mod wire;

use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ACCEPT, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use select::{FieldSelector, Filter, LabelSelector, Query};
use store::{Change, ChangeType, Kind, Store};
use wire::{ApiError, Render};

/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK,
/// unless [`ApiServer::set_bookmark_interval`] says otherwise.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);
/// How long a watch without `timeoutSeconds` lasts (the real server picks
/// 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// The largest request body accepted (the real server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// One request the stand-in answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    /// Path and query as sent (still percent-encoded).
    pub uri: String,
    /// The response status (a watch logs its `200` when it starts).
    pub status: u16,
}

impl Logged {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split_once('?').map_or(&self.uri, |(p, _)| p)
    }

    /// A query parameter, decoded (`None` if absent or empty).
    pub fn param(&self, key: &str) -> Option<String> {
        Query::parse(self.uri.split_once('?').map(|(_, q)| q))
            .get(key)
            .map(str::to_owned)
    }

    /// True for a watch request (`watch=true` or `1`).
    pub fn is_watch(&self) -> bool {
        Query::parse(self.uri.split_once('?').map(|(_, q)| q)).flag("watch")
    }
}

/// State shared by the test's handle and the server's tasks.
struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion, sent after every change: watches wait
    /// on it.
    changed: watch::Sender<u64>,
    /// Bumped by [`ApiServer::close_watches`] and on drop: ends every watch.
    close: watch::Sender<u64>,
    /// True while [`ApiServer::hold_watches`]'s guard lives: new watch
    /// requests wait.
    held: watch::Sender<bool>,
    /// True while [`ApiServer::hold_lists`]'s guard lives: new list
    /// requests wait.
    lists_held: watch::Sender<bool>,
    bookmark_interval: Mutex<Duration>,
    log: Mutex<Vec<Logged>>,
    open_watches: AtomicUsize,
    /// `host:port` for `/api`'s `serverAddressByClientCIDRs`.
    address: String,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves the store consistent
        // enough for a test's failure message: ignore poisoning.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, rv: u64) {
        self.changed.send_replace(rv);
    }

    /// Returns once no [`WatchHold`] lives.
    async fn unheld(&self) {
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
    }

    /// Returns once no [`ListHold`] lives.
    async fn lists_unheld(&self) {
        let mut held = self.lists_held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
    }
}

/// While it lives, new watch requests wait (unanswered) and open streams
/// go on: with [`ApiServer::close_watches`], a test makes clients miss
/// changes, as a client cut off from the real server does.
pub struct WatchHold {
    shared: Arc<Shared>,
}

impl Drop for WatchHold {
    fn drop(&mut self) {
        self.shared.held.send_replace(false);
    }
}

/// While it lives, new list requests wait (unanswered): a client's first
/// list takes as long as the test wants, as against a slow or distant
/// real server.
pub struct ListHold {
    shared: Arc<Shared>,
}

impl Drop for ListHold {
    fn drop(&mut self) {
        self.shared.lists_held.send_replace(false);
    }
}

/// The Kubernetes API stand-in, serving until dropped. Dropping it ends
/// every watch, closes every connection and joins its thread.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on 127.0.0.1 (a free port) in the current network namespace.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("API stand-in: bind 127.0.0.1:0: {e}"));
        Self::start_on(listener)
    }

    /// Serves on a listener the caller created, e.g. inside a test network
    /// namespace with [`crate::netns::Netns::listen_tcp`].
    pub fn start_on(listener: TcpListener) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("API stand-in: listener address: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("API stand-in: nonblocking listener: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("API stand-in: tokio runtime: {e}"));
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .unwrap_or_else(|e| panic!("API stand-in: register listener: {e}"))
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            changed: watch::Sender::new(0),
            close: watch::Sender::new(0),
            held: watch::Sender::new(false),
            lists_held: watch::Sender::new(false),
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            log: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            address: addr.to_string(),
        });
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kube-api-standin".to_owned())
            .spawn({
                let shared = shared.clone();
                move || {
                    runtime.block_on(accept_loop(listener, shared, stop));
                    // Cancels the connection and watch tasks: every socket
                    // closes here.
                    runtime.shutdown_timeout(Duration::from_secs(2));
                }
            })
            .unwrap_or_else(|e| panic!("API stand-in: spawn server thread: {e}"));
        Self {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig naming this server (cluster, context and a user
    /// without credentials; namespace `default`) as its current context.
    pub fn write_kubeconfig(&self, path: &Path) {
        let config = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: lattice-standin\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: lattice-standin\n  context:\n    cluster: lattice-standin\n    \
             user: lattice-standin\n    namespace: default\n\
             current-context: lattice-standin\n\
             users:\n\
             - name: lattice-standin\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, config)
            .unwrap_or_else(|e| panic!("writing kubeconfig {}: {e}", path.display()));
    }

    /// Creates or replaces a pod (namespace `default` if none): `ADDED` or
    /// `MODIFIED` for watchers. Assigns the next resourceVersion, and `uid`
    /// and `creationTimestamp` if missing (kept from the replaced pod; a
    /// given `uid` is kept as given). Returns the stored pod. The namespace
    /// need not exist.
    pub fn apply_pod(&self, pod: Value) -> Value {
        self.apply(Kind::Pod, pod)
    }

    /// Deletes a pod: `DELETED` with its last state. Returns that state, or
    /// `None` if there was no such pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.delete(Kind::Pod, &store::key(namespace, name))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .store()
            .get(Kind::Pod, &store::key(namespace, name))
            .cloned()
    }

    /// Creates or replaces a namespace, as [`ApiServer::apply_pod`]; adds the
    /// `kubernetes.io/metadata.name` label the real server sets.
    pub fn apply_namespace(&self, namespace: Value) -> Value {
        self.apply(Kind::Namespace, namespace)
    }

    /// Deletes a namespace (not its pods).
    pub fn delete_namespace(&self, name: &str) -> Option<Value> {
        self.delete(Kind::Namespace, name)
    }

    pub fn namespace(&self, name: &str) -> Option<Value> {
        self.shared.store().get(Kind::Namespace, name).cloned()
    }

    /// Creates or replaces a DaemonSet (`apps/v1`), as
    /// [`ApiServer::apply_pod`]. A `metadata.deletionTimestamp` in it marks
    /// it as being deleted (the stand-in has no graceful deletion itself).
    pub fn apply_daemonset(&self, daemonset: Value) -> Value {
        self.apply(Kind::DaemonSet, daemonset)
    }

    /// Deletes a DaemonSet (not its pods).
    pub fn delete_daemonset(&self, namespace: &str, name: &str) -> Option<Value> {
        self.delete(Kind::DaemonSet, &store::key(namespace, name))
    }

    /// The Events clients created (both APIs), in order of creation, each
    /// in its current state (after any patch).
    pub fn events(&self) -> Vec<Value> {
        self.shared.store().events()
    }

    /// The last resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Forgets the history of changes, as etcd's compaction does: a watch
    /// from an older resourceVersion gets the `410 Expired` ERROR event, an
    /// older list page or `Exact` list HTTP 410.
    pub fn compact(&self) {
        let rv = {
            let mut store = self.shared.store();
            store.compact();
            store.rv()
        };
        self.shared.notify(rv);
    }

    /// Ends every open watch stream (a clean end of the chunked response,
    /// as the real server does at `timeoutSeconds`); clients resume from
    /// their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared.close.send_modify(|generation| *generation += 1);
    }

    /// Holds new watch requests until the guard is dropped (see
    /// [`WatchHold`]).
    pub fn hold_watches(&self) -> WatchHold {
        self.shared.held.send_replace(true);
        WatchHold {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Holds new list requests until the guard is dropped (see
    /// [`ListHold`]).
    pub fn hold_lists(&self) -> ListHold {
        self.shared.lists_held.send_replace(true);
        ListHold {
            shared: Arc::clone(&self.shared),
        }
    }

    /// How often watches that allow bookmarks get one (watches started
    /// from now on).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = interval;
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a request matching `pred` was answered and returns the
    /// first such; panics with `what` and the request log after `timeout`.
    pub fn wait_for_request(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Logged) -> bool,
    ) -> Logged {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.requests();
            if let Some(found) = log.iter().find(|l| pred(l)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "API stand-in: no request {what} within {timeout:?}; requests:\n{}",
                format_log(&log)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until at least `n` watch streams are open; panics after
    /// `timeout` with the request log.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.open_watches() < n {
            assert!(
                Instant::now() < deadline,
                "API stand-in: {} watches open, not {n}, after {timeout:?}; requests:\n{}",
                self.open_watches(),
                format_log(&self.requests())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn apply(&self, kind: Kind, mut object: Value) -> Value {
        normalize(kind, &mut object);
        let (stored, rv) = {
            let mut store = self.shared.store();
            let (stored, _) = store.put(kind, object);
            (stored, store.rv())
        };
        self.shared.notify(rv);
        stored
    }

    fn delete(&self, kind: Kind, key: &str) -> Option<Value> {
        let (last, rv) = {
            let mut store = self.shared.store();
            (store.remove(kind, key), store.rv())
        };
        self.shared.notify(rv);
        last
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.close_watches();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("lattice-tests: the API stand-in's server thread panicked");
        }
    }
}

fn format_log(log: &[Logged]) -> String {
    log.iter()
        .map(|l| format!("  {} {} -> {}\n", l.method, l.uri, l.status))
        .collect()
}

/// Fills in what the test left out of an object it applies (`apiVersion`,
/// `kind`, the `default` namespace) and checks what it gave.
fn normalize(kind: Kind, object: &mut Value) {
    assert!(
        object.is_object() && object["metadata"]["name"].is_string(),
        "API stand-in: a {} needs metadata.name: {object}",
        kind.kind()
    );
    for (field, want) in [("apiVersion", kind.api_version()), ("kind", kind.kind())] {
        match &object[field] {
            Value::Null => object[field] = json!(want),
            have => assert!(
                have == want,
                "API stand-in: applying a {} with {field} {have}",
                kind.kind()
            ),
        }
    }
    let meta = &mut object["metadata"];
    if kind.namespaced() {
        if !meta["namespace"].is_string() {
            meta["namespace"] = json!("default");
        }
    } else if let Some(map) = meta.as_object_mut() {
        map.remove("namespace");
    }
    if kind == Kind::Namespace {
        let name = meta["name"].clone();
        if !meta["labels"].is_object() {
            meta["labels"] = json!({});
        }
        meta["labels"]["kubernetes.io/metadata.name"] = name;
    }
}

/// A minimal running pod on `node`: one ready container, phase `Running`.
/// Tests add labels, annotations, IPs as they need.
pub fn pod_manifest(namespace: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
        },
        "status": {
            "phase": "Running",
            "conditions": [{ "type": "Ready", "status": "True" }],
            "containerStatuses": [{
                "name": "app",
                "image": "registry.invalid/app:1",
                "imageID": "",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": { "running": {} },
            }],
        },
    })
}

/// An active namespace.
pub fn namespace_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| handle(shared.clone(), req));
                        // A client closing mid-request is no error of ours.
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    eprintln!("lattice-tests: API stand-in accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => return,
        }
    }
}

/// A response body: a whole document, or a watch stream fed by its task.
enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

fn respond(status: u16, content_type: &str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status code");
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("valid content type"),
    );
    response
}

fn json_response(status: u16, content_type: &str, value: &Value) -> Response<Body> {
    let body = Bytes::from(serde_json::to_vec(value).expect("JSON serialises"));
    respond(status, content_type, Body::Full(Some(body)))
}

fn error_response(error: ApiError) -> Response<Body> {
    json_response(error.code, "application/json", &error.status())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let response = route(&shared, req).await.unwrap_or_else(error_response);
    shared
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Logged {
            method,
            uri,
            status: response.status().as_u16(),
        });
    Ok(response)
}

/// What a resource path names.
enum Target {
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
}

fn parse_target(segments: &[&str]) -> Option<Target> {
    let (kinds, rest): (&[Kind], &[&str]) = match segments {
        ["api", "v1", rest @ ..] => (&[Kind::Pod, Kind::Namespace, Kind::Event], rest),
        ["apis", "events.k8s.io", "v1", rest @ ..] => (&[Kind::EventV1], rest),
        ["apis", "apps", "v1", rest @ ..] => (&[Kind::DaemonSet], rest),
        _ => return None,
    };
    let kind_of = |plural: &str| {
        kinds
            .iter()
            .copied()
            .find(|k| k.plural() == plural)
            .filter(|_| kinds != [Kind::EventV1] || plural == "events")
    };
    let owned = |s: &str| Some(s.to_owned());
    match rest {
        [plural] => Some(Target::Collection {
            kind: kind_of(plural)?,
            namespace: None,
        }),
        ["namespaces", name] if kinds.contains(&Kind::Namespace) => Some(Target::Object {
            kind: Kind::Namespace,
            namespace: None,
            name: (*name).to_owned(),
        }),
        ["namespaces", ns, plural] => {
            let kind = kind_of(plural).filter(|k| k.namespaced())?;
            Some(Target::Collection {
                kind,
                namespace: owned(ns),
            })
        }
        ["namespaces", ns, plural, name] => {
            let kind = kind_of(plural).filter(|k| k.namespaced())?;
            Some(Target::Object {
                kind,
                namespace: owned(ns),
                name: (*name).to_owned(),
            })
        }
        _ => None,
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query = Query::parse(req.uri().query());
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = req.method() == Method::GET;
    let discovery = |doc: Value| Ok(json_response(200, "application/json", &doc));
    match segments.as_slice() {
        ["version"] if get => return discovery(wire::version()),
        ["api"] if get => return discovery(wire::core_versions(&shared.address)),
        ["api", "v1"] if get => return discovery(wire::core_resources()),
        ["apis"] if get => return discovery(wire::group_list()),
        ["apis", "events.k8s.io"] if get => return discovery(wire::events_group_doc()),
        ["apis", "apps"] if get => return discovery(wire::apps_group_doc()),
        ["apis", "apps", "v1"] if get => return discovery(wire::apps_resources()),
        ["apis", "events.k8s.io", "v1"] if get => return discovery(wire::events_resources()),
        ["openapi", "v3"] if get => return discovery(wire::openapi_v3_root()),
        ["openapi", "v3", "api", "v1"] if get => {
            return discovery(wire::openapi_v3(&[Kind::Pod, Kind::Namespace, Kind::Event]));
        }
        ["openapi", "v3", "apis", "events.k8s.io", "v1"] if get => {
            return discovery(wire::openapi_v3(&[Kind::EventV1]));
        }
        ["openapi", "v3", "apis", "apps", "v1"] if get => {
            return discovery(wire::openapi_v3(&[Kind::DaemonSet]));
        }
        ["healthz" | "livez" | "readyz"] if get => {
            return Ok(respond(
                200,
                "text/plain; charset=utf-8",
                Body::Full(Some(Bytes::from_static(b"ok"))),
            ));
        }
        _ => {}
    }
    let target = parse_target(&segments).ok_or_else(ApiError::no_route)?;
    let accept = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let render = Render::from_accept(accept, query.get("includeObject"));
    let method = req.method().clone();
    match (method, target) {
        (Method::GET, Target::Collection { kind, namespace }) => {
            let filter = filter(kind, namespace, None, &query)?;
            if query.flag("watch") {
                shared.unheld().await;
                start_watch(shared, kind, filter, render, &query)
            } else {
                shared.lists_unheld().await;
                list(shared, kind, &filter, render, &query)
            }
        }
        (
            Method::GET,
            Target::Object {
                kind,
                namespace,
                name,
            },
        ) => {
            if query.flag("watch") {
                let filter = filter(kind, namespace, Some(name), &query)?;
                shared.unheld().await;
                return start_watch(shared, kind, filter, render, &query);
            }
            let key = store::key(namespace.as_deref().unwrap_or(""), &name);
            let object = shared.store().get(kind, &key).cloned();
            let object = object.ok_or_else(|| ApiError::not_found(kind, &name))?;
            Ok(json_response(
                200,
                render.content_type(false),
                &render.object(kind, &object),
            ))
        }
        (Method::POST, Target::Collection { kind, namespace }) if is_event(kind) => {
            let namespace = namespace.ok_or_else(ApiError::method_not_allowed)?;
            let body = read_json(req).await?;
            create(shared, kind, &namespace, body, &query)
        }
        (
            Method::PATCH,
            Target::Object {
                kind,
                namespace: Some(ns),
                name,
            },
        ) if is_event(kind) => {
            let content_type = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = read_json(req).await?;
            patch(shared, kind, &ns, &name, &content_type, body)
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn is_event(kind: Kind) -> bool {
    matches!(kind, Kind::Event | Kind::EventV1)
}

fn filter(
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    query: &Query,
) -> Result<Filter, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), kind)
        .map_err(ApiError::bad_request)?;
    Ok(Filter {
        namespace,
        name,
        labels,
        fields,
    })
}

fn parse_rv(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {text:?}")))
}

fn list(
    shared: &Shared,
    kind: Kind,
    filter: &Filter,
    render: Render,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let limit = match query.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
        )
        .filter(|l| *l > 0),
        None => None,
    };
    let store = shared.store();
    // Which snapshot, and where in it to start.
    let (at, start) = if let Some(token) = query.get("continue") {
        let (rv, start) = wire::parse_continue(token)
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        (rv, Some(start))
    } else {
        let rv = query.get("resourceVersion").map(parse_rv).transpose()?;
        match (query.get("resourceVersionMatch"), rv) {
            (Some("Exact"), Some(rv)) if rv > 0 => (rv, None),
            (Some("Exact"), _) => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: resourceVersionMatch \"Exact\" needs a \
                     non-zero resourceVersion",
                ));
            }
            (Some("NotOlderThan") | None, _) => (store.rv(), None),
            (Some(other), _) => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!("resourceVersionMatch: Unsupported value: {other:?}"),
                ));
            }
        }
    };
    let snapshot = store.snapshot(kind, Some(at)).map_err(|e| {
        if start.is_some() {
            ApiError::continue_expired()
        } else {
            ApiError::too_old(e.requested, e.oldest)
        }
    })?;
    drop(store);
    let mut matching = snapshot
        .into_iter()
        .filter(|(key, _)| start.as_deref().is_none_or(|s| key.as_str() >= s))
        .filter(|(_, object)| filter.matches(object));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, object) in matching.by_ref() {
        items.push(object);
        last_key = Some(key);
        if limit.is_some_and(|l| items.len() >= l) {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({ "resourceVersion": at.to_string() });
    if remaining > 0 {
        let last = last_key.expect("a page with more after it is not empty");
        metadata["continue"] = json!(wire::continue_token(at, &last));
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    Ok(json_response(
        200,
        render.content_type(true),
        &render.list(kind, &items, metadata),
    ))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, "RequestEntityTooLarge", e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("couldn't decode the request body as JSON: {e}"))
    })
}

/// `POST` of an Event.
fn create(
    shared: &Shared,
    kind: Kind,
    namespace: &str,
    mut object: Value,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "the request body is not a JSON object",
        ));
    }
    for (field, want) in [("apiVersion", kind.api_version()), ("kind", kind.kind())] {
        match object[field].as_str() {
            None => object[field] = json!(want),
            Some(have) if have == want => {}
            Some(have) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} in the data ({have}) does not match the expected {field} ({want})"
                )));
            }
        }
    }
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    let meta = &mut object["metadata"];
    match meta["namespace"].as_str() {
        None | Some("") => meta["namespace"] = json!(namespace),
        Some(ns) if ns == namespace => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    let mut store = shared.store();
    let meta = &mut object["metadata"];
    if meta["name"].as_str().is_none_or(str::is_empty) {
        let Some(prefix) = meta["generateName"].as_str().filter(|p| !p.is_empty()) else {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    kind.kind()
                ),
            ));
        };
        let prefix = prefix.to_owned();
        let name = loop {
            let name = format!("{prefix}{}", wire::name_suffix());
            if store.get(kind, &store::key(namespace, &name)).is_none() {
                break name;
            }
        };
        meta["name"] = json!(name);
    }
    let name = meta["name"].as_str().expect("name set").to_owned();
    if store.get(kind, &store::key(namespace, &name)).is_some() {
        return Err(ApiError::already_exists(kind, &name));
    }
    for field in ["uid", "resourceVersion", "creationTimestamp"] {
        if let Some(map) = meta.as_object_mut() {
            map.remove(field);
        }
    }
    if query.get("dryRun").is_some() {
        return Ok(json_response(201, "application/json", &object));
    }
    let (stored, _) = store.put(kind, object);
    let rv = store.rv();
    drop(store);
    shared.notify(rv);
    Ok(json_response(201, "application/json", &stored))
}

/// `PATCH` of an Event: merge, strategic merge (applied as a merge) or
/// apply (creates the Event if missing).
fn patch(
    shared: &Shared,
    kind: Kind,
    namespace: &str,
    name: &str,
    content_type: &str,
    patch: Value,
) -> Result<Response<Body>, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let apply = match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" => true,
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (not {media:?})"
                ),
            ));
        }
    };
    let key = store::key(namespace, name);
    let mut store = shared.store();
    let mut object = match store.get(kind, &key) {
        Some(object) => object.clone(),
        None if apply => json!({
            "apiVersion": kind.api_version(),
            "kind": kind.kind(),
            "metadata": { "name": name, "namespace": namespace },
        }),
        None => return Err(ApiError::not_found(kind, name)),
    };
    wire::merge_patch(&mut object, &patch);
    let meta = &object["metadata"];
    if meta["name"] != name || meta["namespace"] != namespace {
        return Err(ApiError::bad_request(
            "the name and namespace of an object cannot be patched",
        ));
    }
    let created = store.get(kind, &key).is_none();
    let (stored, _) = store.put(kind, object);
    let rv = store.rv();
    drop(store);
    shared.notify(rv);
    Ok(json_response(
        if created { 201 } else { 200 },
        "application/json",
        &stored,
    ))
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// An `ADDED` per current object, then changes.
    Initial,
    /// Changes after this resourceVersion.
    After(u64),
    /// Changes from now on.
    Now,
}

struct WatchSpec {
    kind: Kind,
    filter: Filter,
    render: Render,
    start: Start,
    bookmarks: bool,
    /// `sendInitialEvents=true`: a bookmark marks the end of the initial
    /// events.
    initial_events_end: bool,
    deadline: tokio::time::Instant,
}

fn start_watch(
    shared: &Arc<Shared>,
    kind: Kind,
    filter: Filter,
    render: Render,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let rv = query.get("resourceVersion").map(parse_rv).transpose()?;
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial = query
        .get("sendInitialEvents")
        .map(|_| query.flag("sendInitialEvents"));
    if send_initial == Some(true) {
        if query.get("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::new(
                422,
                "Invalid",
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
                 resourceVersionMatch to NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(ApiError::new(
                422,
                "Invalid",
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires allowWatchBookmarks=true",
            ));
        }
    }
    let start = match (send_initial, rv) {
        (Some(true), _) => Start::Initial,
        (Some(false), None | Some(0)) => Start::Now,
        (_, None | Some(0)) => Start::Initial,
        (_, Some(rv)) => Start::After(rv),
    };
    // As on the real server, 0 means the server's default.
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => t
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?,
        None => 0,
    };
    let timeout = match timeout {
        0 => DEFAULT_WATCH_TIMEOUT,
        secs => Duration::from_secs(secs),
    };
    let spec = WatchSpec {
        kind,
        filter,
        render,
        start,
        bookmarks,
        initial_events_end: send_initial == Some(true),
        deadline: tokio::time::Instant::now() + timeout,
    };
    let (tx, rx) = mpsc::channel(256);
    // Counted here, not in the task, so a client sees it open as soon as
    // the response head is on its way.
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(run_watch(shared.clone(), spec, tx));
    Ok(respond(200, render.content_type(false), Body::Stream(rx)))
}

/// Decrements the open watch count however the watch task ends (also when
/// the runtime cancels it).
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_line(kind_of_event: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind_of_event, "object": object }))
        .expect("JSON serialises");
    line.push(b'\n');
    Bytes::from(line)
}

/// The watch event a change makes for a watcher with `filter`, as the real
/// watch cache decides it: by whether the object matched before and after.
fn convert(change: &Change, spec: &WatchSpec) -> Option<Bytes> {
    let now = change.change != ChangeType::Deleted && spec.filter.matches(&change.object);
    let before = change.prev.as_ref().is_some_and(|p| spec.filter.matches(p));
    let (typ, object) = match (before, now) {
        (false, true) => ("ADDED", change.object.clone()),
        (true, true) => ("MODIFIED", change.object.clone()),
        (true, false) => {
            // The previous state, with the event's resourceVersion.
            let mut prev = change.prev.clone().expect("matched before");
            prev["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", prev)
        }
        (false, false) => return None,
    };
    Some(event_line(typ, spec.render.object(spec.kind, &object)))
}

fn bookmark_line(spec: &WatchSpec, rv: u64, initial_events_end: bool) -> Bytes {
    let object = spec.kind.bookmark(rv, initial_events_end);
    let object = match spec.render {
        Render::Metadata => spec.render.object(spec.kind, &object),
        _ => object,
    };
    event_line("BOOKMARK", object)
}

fn error_line(error: ApiError) -> Bytes {
    event_line("ERROR", error.status())
}

/// Lines to send and whether the stream ends after them.
type Batch = (Vec<Bytes>, bool);

async fn send_all(tx: &mpsc::Sender<Bytes>, lines: Vec<Bytes>) -> bool {
    for line in lines {
        if tx.send(line).await.is_err() {
            return false;
        }
    }
    true
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, tx: mpsc::Sender<Bytes>) {
    let _open = OpenWatch(shared.clone());
    let mut changed = shared.changed.subscribe();
    let mut close = shared.close.subscribe();
    let every = *shared
        .bookmark_interval
        .lock()
        .unwrap_or_else(|e| e.into_inner());

    let (mut cursor, (lines, end)): (u64, Batch) = {
        let store = shared.store();
        match spec.start {
            Start::Initial => {
                let current = store
                    .snapshot(spec.kind, None)
                    .expect("the present is kept");
                let mut lines: Vec<Bytes> = current
                    .iter()
                    .filter(|(_, object)| spec.filter.matches(object))
                    .map(|(_, object)| event_line("ADDED", spec.render.object(spec.kind, object)))
                    .collect();
                if spec.initial_events_end {
                    lines.push(bookmark_line(&spec, store.rv(), true));
                }
                (store.rv(), (lines, false))
            }
            Start::Now => (store.rv(), (Vec::new(), false)),
            Start::After(rv) if rv < store.compacted() => {
                let error = ApiError::too_old(rv, store.compacted());
                (rv, (vec![error_line(error)], true))
            }
            Start::After(rv) => (rv, (Vec::new(), false)),
        }
    };
    if !send_all(&tx, lines).await || end {
        return;
    }

    let mut bookmark = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    bookmark.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep_until(spec.deadline);
    tokio::pin!(deadline);
    loop {
        // Catch up with the history, then wait for the next reason to act.
        let (lines, end): Batch = {
            let store = shared.store();
            match store.changes_since(spec.kind, cursor) {
                Ok(changes) => {
                    cursor = cursor.max(store.rv());
                    (
                        changes.iter().filter_map(|c| convert(c, &spec)).collect(),
                        false,
                    )
                }
                // Compacted before this watcher caught up: the real watch
                // cache ends such a watcher with the same 410.
                Err(e) => (
                    vec![error_line(ApiError::too_old(e.requested, e.oldest))],
                    true,
                ),
            }
        };
        if !send_all(&tx, lines).await || end {
            return;
        }
        tokio::select! {
            result = changed.changed() => if result.is_err() { return },
            _ = bookmark.tick(), if spec.bookmarks => {
                if tx.send(bookmark_line(&spec, cursor, false)).await.is_err() {
                    return;
                }
            }
            _ = &mut deadline => return,
            _ = close.changed() => return,
            _ = tx.closed() => return,
        }
    }
}
