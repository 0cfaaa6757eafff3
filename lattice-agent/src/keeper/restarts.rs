//! When to start the next worker, and when to stop trying.
//!
//! A worker that was serving (it said it serves the pods it was handed)
//! is replaced at once: its pods' connections wait in their listeners'
//! backlogs meanwhile. A worker that dies before it serves is a crash
//! loop in the making: the next one waits, 100 ms doubling up to 5 s. And
//! after `limit` deaths within `window`, whatever their kind, the parent
//! gives up and exits: the kubelet then sees the container fail and
//! restarts it with its own back-off (`CrashLoopBackOff`), while the
//! pinned programs keep the pods' Lattice connects refused (fail closed).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The first wait after a worker died before serving; doubles up to
/// [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// `--worker-crash-limit` and `--worker-crash-window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimits {
    pub limit: u32,
    pub window: Duration,
}

/// What to do after a worker died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDeath {
    /// Start the next one after this long.
    Restart(Duration),
    /// The limit is reached: exit (with this many deaths in the window).
    GiveUp(usize),
}

/// The deaths seen, and the policy.
#[derive(Debug)]
pub struct Restarts {
    limits: RestartLimits,
    /// Deaths within the window, oldest first.
    deaths: VecDeque<Instant>,
    /// Workers in a row that died before serving.
    unserved: u32,
}

impl Restarts {
    pub fn new(limits: RestartLimits) -> Self {
        Self {
            limits,
            deaths: VecDeque::new(),
            unserved: 0,
        }
    }

    /// A worker died at `now`; `served`: it had said it serves.
    pub fn on_death(&mut self, now: Instant, served: bool) -> AfterDeath {
        self.deaths.push_back(now);
        while self
            .deaths
            .front()
            .is_some_and(|d| now.duration_since(*d) >= self.limits.window)
        {
            self.deaths.pop_front();
        }
        if self.deaths.len() >= self.limits.limit as usize {
            return AfterDeath::GiveUp(self.deaths.len());
        }
        if served {
            self.unserved = 0;
            return AfterDeath::Restart(Duration::ZERO);
        }
        self.unserved = self.unserved.saturating_add(1);
        let factor = 1u32 << (self.unserved - 1).min(16);
        AfterDeath::Restart((BACKOFF_START * factor).min(BACKOFF_MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(limit: u32, window_s: u64) -> RestartLimits {
        RestartLimits {
            limit,
            window: Duration::from_secs(window_s),
        }
    }

    #[test]
    fn a_serving_worker_is_replaced_at_once() {
        let mut r = Restarts::new(limits(10, 60));
        let t = Instant::now();
        for i in 0..5 {
            assert_eq!(
                r.on_death(t + Duration::from_secs(i), true),
                AfterDeath::Restart(Duration::ZERO)
            );
        }
    }

    #[test]
    fn workers_dying_before_serving_back_off() {
        let mut r = Restarts::new(limits(100, 60));
        let t = Instant::now();
        let waits: Vec<_> = (0..8)
            .map(|_| match r.on_death(t, false) {
                AfterDeath::Restart(d) => d.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // One that serves resets the back-off.
        assert_eq!(r.on_death(t, true), AfterDeath::Restart(Duration::ZERO));
        assert_eq!(
            r.on_death(t, false),
            AfterDeath::Restart(Duration::from_millis(100))
        );
    }

    #[test]
    fn the_limit_within_the_window_gives_up() {
        let mut r = Restarts::new(limits(3, 60));
        let t = Instant::now();
        assert!(matches!(r.on_death(t, true), AfterDeath::Restart(_)));
        assert!(matches!(
            r.on_death(t + Duration::from_secs(1), true),
            AfterDeath::Restart(_)
        ));
        assert_eq!(
            r.on_death(t + Duration::from_secs(2), true),
            AfterDeath::GiveUp(3)
        );
    }

    #[test]
    fn deaths_older_than_the_window_do_not_count() {
        let mut r = Restarts::new(limits(3, 10));
        let t = Instant::now();
        for i in 0..20 {
            assert!(
                matches!(
                    r.on_death(t + Duration::from_secs(6 * i), true),
                    AfterDeath::Restart(_)
                ),
                "death {i}"
            );
        }
    }
}
