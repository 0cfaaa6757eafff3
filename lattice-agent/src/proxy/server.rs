//! Accepting client connections and serving each one: HTTP/1.1 with
//! keep-alive, or HTTP/2 with prior knowledge (h2c), signed; anything else
//! (the app's own TLS, other protocols, server-first protocols) passed
//! through to the original destination unchanged. What a connection
//! speaks is told by its first bytes (see `sniff`).
//!
//! At most `--max-connections` are open per workload, so one pod cannot
//! take every task and file descriptor from the others; at the limit the
//! oldest idle connection makes room for a new one, and with none idle new
//! ones wait in the kernel's backlog (see `conns`). Graceful shutdown:
//! stop accepting, let open connections finish their requests (passed-
//! through ones their streams) for up to `--drain-timeout`, then drop
//! them.

use std::{
    convert::Infallible,
    future::Future as _,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

use super::{
    ProxyConfig, Shared,
    classify::Kind,
    conns::{Conns, Open, Phase},
    sniff::{self, First, Opening, Prefixed},
    splice,
    upstream::StickyH1,
};
use crate::orig_dst::OriginalDestination;

/// One accepted client connection.
pub(super) struct ConnCtx {
    pub peer: SocketAddr,
    /// The `--workers` thread serving it (0 without a worker pool): the
    /// upstream pool it uses.
    pub worker: usize,
    /// Where the client was connecting to; `None` answers every request 421.
    pub dst: Option<SocketAddr>,
    pub activity: Arc<Activity>,
    /// The HTTP/1.1 upstream connection this connection's requests use.
    pub upstream: StickyH1,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    orig_dst: Arc<dyn OriginalDestination>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let builder = Arc::new(http_builder(&shared.cfg));
    let conns = Conns::new(shared.cfg.max_connections);
    let mut accepts = JoinSet::new();
    for listener in listeners {
        accepts.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            Arc::clone(&builder),
            Arc::clone(&orig_dst),
            Arc::clone(&conns),
            tracker.clone(),
            shutdown.clone(),
            hard_stop.clone(),
        ));
    }
    let sweep = tokio::spawn(close_idle_upstreams(Arc::clone(&shared), shutdown.clone()));
    while accepts.join_next().await.is_some() {}

    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(
            open,
            drain_timeout_s = shared.cfg.drain_timeout.as_secs(),
            "draining connections"
        );
    }
    if tokio::time::timeout(shared.cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout reached; closing remaining connections"
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
    sweep.abort();
}

/// Closes pooled upstream connections once idle for `--idle-timeout`,
/// checking a few times per timeout, until shutdown.
async fn close_idle_upstreams(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = idle_checks(shared.cfg.idle_timeout);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => shared.upstream.close_idle(),
        }
    }
}

fn http_builder(cfg: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let head_limit = usize::try_from(cfg.max_header_bytes)
        .unwrap_or(usize::MAX)
        .max(8192);
    // No header read timer: it would cost a timer per request, and
    // `serve_connection` closes a connection once no request has been in
    // flight for --idle-timeout, which includes a request head trickling
    // in.
    // One buffer and send(2), not writev(2), as for the upstream.
    b.http1()
        .timer(TokioTimer::new())
        .writev(false)
        .keep_alive(true)
        .max_buf_size(head_limit)
        .header_read_timeout(None);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    b
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    orig_dst: Arc<dyn OriginalDestination>,
    conns: Arc<Conns>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off a little.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // No eBPF record: the connection may have been steered by the
        // iptables setup's NAT rules instead, where the workload serves them.
        let dst = orig_dst
            .original_destination(peer)
            .or_else(|| orig_dst.untracked_destination(std::os::fd::AsFd::as_fd(&stream)));
        match dst {
            Some(_) => {
                shared.metrics.redirected.inc();
            }
            None => {
                shared.metrics.unknown_destination.inc();
                tracing::warn!(%peer, "connection without an original destination; answering 421");
            }
        };
        // A slot: at the limit, the oldest idle connection makes room
        // (see `conns`); with none idle, this one waits for a slot.
        let Some(slot) = conns
            .admit(&shutdown, || {
                shared.metrics.closed_for_room.inc();
            })
            .await
        else {
            return;
        };
        let open = conns.register(slot, Arc::new(Activity::new()));
        let ctx = |worker| ConnCtx {
            peer,
            dst,
            worker,
            activity: Arc::clone(&open.conn.activity),
            upstream: shared.upstream.sticky(dst, worker),
        };
        match shared.cfg.workers.as_deref() {
            None => {
                let ctx = ctx(0);
                tracker.spawn(serve_connection(
                    Arc::clone(&shared),
                    Arc::clone(&builder),
                    stream,
                    ctx,
                    open,
                    shutdown.clone(),
                    hard_stop.clone(),
                ));
            }
            Some(pool) => {
                // The socket moves to the worker's own event loop.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "handing the connection to a worker");
                        continue;
                    }
                };
                let (worker, _) = pool.next();
                let (shared, builder) = (Arc::clone(&shared), Arc::clone(&builder));
                let ctx = ctx(worker);
                let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
                pool.spawn_on(
                    worker,
                    tracker.track_future(async move {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => {
                                serve_connection(
                                    shared, builder, stream, ctx, open, shutdown, hard_stop,
                                )
                                .await;
                            }
                            Err(e) => {
                                tracing::warn!(peer = %ctx.peer, error = %e, "registering the connection with its worker");
                            }
                        }
                    }),
                );
            }
        }
    }
}

/// Serves one client connection: what it speaks decides whether it is
/// served as HTTP (signed) or passed through to its destination.
async fn serve_connection(
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stream: tokio::net::TcpStream,
    ctx: ConnCtx,
    open: Open,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let gauge = shared.metrics.open_connections.clone();
    gauge.inc();
    let _open = scopeguard(move || {
        gauge.dec();
    });
    let (peer, dst) = (ctx.peer, ctx.dst);
    let cfg = &shared.cfg;
    // Nothing is in flight yet: shutdown, or making room for a new
    // connection, closes it at once.
    let opening = tokio::select! {
        o = sniff::sniff(&mut stream, cfg.server_first_wait, cfg.idle_timeout, || {
            connect_for_greeting(&shared, dst, peer)
        }) => o,
        () = shutdown.cancelled() => return,
        () = open.conn.close_requested().cancelled() => {
            tracing::debug!(%peer, "closing a connection that has not spoken, to make room");
            return;
        }
    };
    let (kind, first, upstream) = match opening {
        Opening::Gone => {
            tracing::debug!(%peer, "client connection closed before it said what it speaks");
            return;
        }
        Opening::Client {
            kind,
            first,
            upstream,
        } => (kind, first, upstream),
        Opening::Server { upstream } => (Kind::ServerFirst, First::default(), Some(upstream)),
    };
    shared.metrics.count_connection(kind);
    tracing::debug!(%peer, dst = ?dst, kind = kind.as_str(), "client connection");
    let client = Prefixed::new(first, stream);
    if kind.is_http() {
        // An upstream connection opened while the client was silent is
        // not used: requests take the upstream pool's connections.
        drop(upstream);
        open.conn.set_phase(Phase::Http);
        let close = open.conn.close_requested().clone();
        return serve_http(shared, builder, client, ctx, shutdown, close, hard_stop).await;
    }
    open.conn.set_phase(Phase::PassedThrough);
    let Some(dst) = dst else {
        tracing::warn!(%peer, kind = kind.as_str(), "no original destination to pass the connection through to; closing it");
        return;
    };
    let upstream = match upstream {
        Some(u) => u,
        None => match shared.upstream.connect_tcp(dst).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, %dst, error = %crate::error_chain(&e), "passing the connection through: upstream unreachable; closing it");
                return;
            }
        },
    };
    // Passed through until either side is done, or the drain ends.
    tokio::select! {
        r = splice::splice(client, upstream) => match r {
            Ok((up, down)) => tracing::debug!(%peer, %dst, up, down, "passed-through connection closed"),
            Err(e) => tracing::debug!(%peer, %dst, error = %e, "passed-through connection ended with an error"),
        },
        () = hard_stop.cancelled() => {
            tracing::debug!(%peer, %dst, "drain timeout: closing a passed-through connection");
        }
    }
}

/// The connection a silent client's server-first protocol may greet
/// through: `None` without a destination or when it cannot be reached
/// (the client alone then decides).
async fn connect_for_greeting(
    shared: &Shared,
    dst: Option<SocketAddr>,
    peer: SocketAddr,
) -> Option<tokio::net::TcpStream> {
    let dst = dst?;
    match shared.upstream.connect_tcp(dst).await {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::debug!(%peer, %dst, error = %crate::error_chain(&e), "silent client: could not connect to its destination");
            None
        }
    }
}

/// Serves a client connection's HTTP requests (HTTP/1.1 keep-alive or
/// h2c) until it closes, goes idle, or shutdown.
async fn serve_http(
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    client: Prefixed<tokio::net::TcpStream>,
    ctx: ConnCtx,
    shutdown: CancellationToken,
    make_room: CancellationToken,
    hard_stop: CancellationToken,
) {
    let idle_timeout = shared.cfg.idle_timeout;
    let activity = Arc::clone(&ctx.activity);
    let mut quiet = QuietSince::new(Instant::now());
    let peer = ctx.peer;
    let ctx = Arc::new(ctx);
    let svc_shared = Arc::clone(&shared);
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let shared = Arc::clone(&svc_shared);
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(super::handle(shared, ctx, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(client), svc);
    tokio::pin!(conn);
    let mut tick = idle_checks(idle_timeout);
    let mut shutdown = CancelWatch::new(shutdown);
    let mut make_room = CancelWatch::new(make_room);
    let mut hard_stop = CancelWatch::new(hard_stop);
    let mut closing = Closing::No;
    let mut room_grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Polled by hand rather than with `select!`, which would poll every
    // branch (taking each token's lock) on every wake-up of a request.
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
            return Poll::Ready(());
        }
        if hard_stop.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut close = closing == Closing::No && shutdown.poll(cx).is_ready();
        if close {
            closing = Closing::Shutdown;
        }
        // Asked to make room for a new connection: closed gracefully (at
        // once when idle, after the request in flight otherwise), and
        // without a request in flight shortly after, even with a head
        // trickling in.
        if matches!(closing, Closing::No | Closing::Idle) && make_room.poll(cx).is_ready() {
            tracing::debug!(%peer, "closing an idle client connection to make room for a new one");
            closing = Closing::Room;
            close = true;
            room_grace = Some(Box::pin(tokio::time::sleep(ROOM_GRACE)));
        }
        if let Some(grace) = room_grace.as_mut()
            && grace.as_mut().poll(cx).is_ready()
            && !activity.busy()
        {
            return Poll::Ready(());
        }
        // Until it is pending, so the next tick is armed.
        while !matches!(closing, Closing::Shutdown | Closing::Room) && tick.poll_tick(cx).is_ready()
        {
            let idle_for = quiet.idle_for(&activity, Instant::now());
            match closing {
                Closing::No if idle_for >= idle_timeout => {
                    tracing::debug!(%peer, "closing idle client connection");
                    closing = Closing::Idle;
                    close = true;
                }
                // A graceful close waits for a request being read; with
                // none in flight for that long, a head still arriving is
                // trickling in: the connection goes.
                Closing::Idle if idle_for >= idle_timeout => return Poll::Ready(()),
                _ => {}
            }
        }
        if close {
            conn.as_mut().graceful_shutdown();
            // The connection has to be polled to act on it.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await;
}

/// When idleness is checked: four times per `idle_timeout`, at most
/// every 100 ms.
fn idle_checks(idle_timeout: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Why a connection is being closed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closing {
    No,
    /// Draining for shutdown: bounded by --drain-timeout (`hard_stop`).
    Shutdown,
    /// Idle for --idle-timeout: dropped a tick later if still open.
    Idle,
    /// Making room for a new connection at --max-connections: dropped
    /// after [`ROOM_GRACE`] without a request in flight.
    Room,
}

/// How long a connection closing to make room may take to finish writing
/// before it is dropped.
const ROOM_GRACE: Duration = Duration::from_millis(20);

/// A cancellation token watched from one task's poll: its future takes a
/// lock when polled, so it is polled once to register the task and then
/// only once the token is cancelled (an atomic load), not on every
/// wake-up of the task.
struct CancelWatch {
    token: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: bool,
}

impl CancelWatch {
    fn new(token: CancellationToken) -> Self {
        Self {
            cancelled: Box::pin(token.clone().cancelled_owned()),
            token,
            registered: false,
        }
    }

    /// Must be called from the same task every time (the waker
    /// registered first is the one woken).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered && !self.token.is_cancelled() {
            return Poll::Pending;
        }
        self.registered = true;
        self.cancelled.as_mut().poll(cx)
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Requests in flight on a connection and how many have finished: enough
/// for the connection's idle checks to tell whether it was busy since the
/// last check, without a clock read or a lock per request.
pub(super) struct Activity {
    in_flight: AtomicUsize,
    finished: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// A request is in flight.
    pub(super) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Marks a request busy until the guard (held by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(Arc::clone(self))
    }
}

pub(super) struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The idle checks' view of one connection's [`Activity`]: since when no
/// request was in flight or finished, as seen at the checks (at most one
/// check late, so a connection closes within `idle_timeout` plus one
/// check of its last request).
struct QuietSince {
    finished: u64,
    since: Instant,
}

impl QuietSince {
    fn new(now: Instant) -> Self {
        Self {
            finished: 0,
            since: now,
        }
    }

    fn idle_for(&mut self, activity: &Activity, now: Instant) -> Duration {
        let finished = activity.finished.load(Ordering::Acquire);
        if activity.in_flight.load(Ordering::Acquire) > 0 || finished != self.finished {
            self.finished = finished;
            self.since = now;
            return Duration::ZERO;
        }
        now.saturating_duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_time_counts_from_the_first_check_without_activity() {
        let activity = Arc::new(Activity::new());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut quiet = QuietSince::new(t0);
        assert_eq!(quiet.idle_for(&activity, at(5)), Duration::from_secs(5));

        // In flight across checks: never idle.
        let busy = activity.begin();
        assert_eq!(quiet.idle_for(&activity, at(10)), Duration::ZERO);
        assert_eq!(quiet.idle_for(&activity, at(20)), Duration::ZERO);
        drop(busy);
        // Finished since the last check: busy then, quiet from now on.
        assert_eq!(quiet.idle_for(&activity, at(21)), Duration::ZERO);
        assert_eq!(quiet.idle_for(&activity, at(24)), Duration::from_secs(3));

        // A request begun and finished between two checks counts too.
        drop(activity.begin());
        assert_eq!(quiet.idle_for(&activity, at(30)), Duration::ZERO);
        assert_eq!(quiet.idle_for(&activity, at(31)), Duration::from_secs(1));
    }
}
