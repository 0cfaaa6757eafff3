//! `--workers N` (N > 1) for one workload: N threads, each a
//! single-threaded runtime. The accept loop hands each new connection to
//! the next thread in turn, and the connection lives there to its end: its
//! requests, their upstream connections (each thread has a pool of its own,
//! see [`super::upstream::Upstream`]) and their timers, so a request never
//! wakes another thread. A work-stealing runtime instead moves a
//! connection's tasks between threads and pays cross-thread wake-ups on
//! every request; one thread per connection keeps the cost of one worker
//! while using N cores.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    thread::JoinHandle,
};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The worker threads; stopped (and joined) when dropped.
pub struct WorkerPool {
    workers: Vec<Worker>,
    next: AtomicUsize,
    stop: CancellationToken,
}

struct Worker {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl WorkerPool {
    /// Starts `n` worker threads, `lattice-wrk-<i>` (short enough for the
    /// kernel's 15-byte thread names, so `top` and `/proc` show them whole).
    pub fn start(n: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("lattice-wrk-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            workers.push(Worker {
                handle,
                thread: Some(thread),
            });
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The next worker in turn: its index and its runtime.
    pub fn next(&self) -> (usize, &Handle) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        (i, &self.workers[i].handle)
    }

    /// Runs `fut` on worker `i`.
    pub fn spawn_on<F>(&self, i: usize, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.workers[i].handle.spawn(fut)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop.cancel();
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                // A worker dropped from within itself cannot join itself.
                if t.thread().id() != std::thread::current().id() {
                    let _ = t.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_in_turn_each_on_its_own_thread() {
        let pool = WorkerPool::start(2).unwrap();
        let name = |i| {
            let (tx, rx) = std::sync::mpsc::channel();
            pool.spawn_on(i, async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
            });
            rx.recv().unwrap().unwrap()
        };
        assert_eq!(name(0), "lattice-wrk-0");
        assert_eq!(name(1), "lattice-wrk-1");
        let order: Vec<usize> = (0..4).map(|_| pool.next().0).collect();
        assert_eq!(order, [0, 1, 0, 1]);
        drop(pool);
    }
}
