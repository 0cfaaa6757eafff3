//! Ctrl-C and SIGTERM: instead of dying with namespaces, cgroups and
//! processes left behind, the bench notices the signal at its next wait,
//! returns an error, and the guards clean up as the stack unwinds.

use std::{
    process::{Child, ExitStatus},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&flag))
                .context("installing the Ctrl-C handler")?;
        }
        Ok(Self(flag))
    }

    /// Fails once a signal has arrived.
    pub fn check(&self) -> Result<()> {
        if self.0.load(Ordering::Relaxed) {
            bail!("interrupted; cleaning up");
        }
        Ok(())
    }

    /// Sleeps, waking early (with an error) on a signal.
    pub fn sleep(&self, total: Duration) -> Result<()> {
        let end = Instant::now() + total;
        loop {
            self.check()?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// Waits for `child` for up to `limit`; on a signal or timeout the child
    /// is killed and reaped before the error returns.
    pub fn wait(&self, child: &mut Child, limit: Duration, what: &str) -> Result<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {what}"))?
            {
                return Ok(status);
            }
            let stop = if self.0.load(Ordering::Relaxed) {
                Some("interrupted; cleaning up".to_owned())
            } else if Instant::now() >= end {
                Some(format!("{what} did not finish within {}s", limit.as_secs()))
            } else {
                None
            };
            if let Some(reason) = stop {
                let _ = child.kill();
                let _ = child.wait();
                bail!(reason);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
