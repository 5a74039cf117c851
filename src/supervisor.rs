//! Shard supervision in the manner of an OTP supervisor: a crashed shard is
//! restarted in place, with a growing delay, at most `shard_restarts_max`
//! times within `shard_restart_period_ms`; one more and the shard gives up
//! and the whole process exits non-zero ([`EXIT_SHARD_DOWN`]), so the failure
//! climbs to the service manager instead of looping or leaving a server
//! that is up but dead.
//!
//! The pieces here are the bookkeeping ([`Intensity`]), the state other
//! shards and the stats read ([`ShardState`]), and the process-wide signal
//! that a shard gave up ([`Fatal`]). The restart itself is
//! [`Shard::run`](crate::shard::Shard::run).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status of a process whose shard gave up (EX_SOFTWARE).
pub const EXIT_SHARD_DOWN: u8 = 70;

/// A shard's supervisor state, published in its `state` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardState {
    /// Serving.
    Up = 0,
    /// Crashed: waiting out its backoff, or reopening its store.
    Restarting = 1,
    /// Gave up past the restart intensity; the process is exiting.
    Down = 2,
}

impl ShardState {
    /// The state a gauge value stands for (unknown values read as down).
    pub fn from_u64(v: u64) -> ShardState {
        match v {
            0 => ShardState::Up,
            1 => ShardState::Restarting,
            _ => ShardState::Down,
        }
    }

    /// Its name in `show shards` and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Up => "up",
            ShardState::Restarting => "restarting",
            ShardState::Down => "down",
        }
    }
}

/// The restarts of one shard within the sliding period.
#[derive(Debug)]
pub struct Intensity {
    max: u32,
    period: Duration,
    /// Times of the restarts still inside the period, oldest first; at most
    /// `max + 1` entries.
    recent: VecDeque<Instant>,
}

impl Intensity {
    /// At most `max` restarts within `period`.
    pub fn new(max: u32, period: Duration) -> Intensity {
        Intensity {
            max,
            period,
            recent: VecDeque::new(),
        }
    }

    /// Counts a restart at `now`. Returns its number within the period
    /// (1-based) when it is allowed, `None` when it passes the intensity.
    pub fn record(&mut self, now: Instant) -> Option<u32> {
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) >= self.period)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let n = self.recent.len() as u32;
        (n <= self.max).then_some(n)
    }
}

/// Process-wide: set once when a shard gives up. The owner of the process
/// (`tern serve`) registers a callback that ends its wait, then exits with
/// [`EXIT_SHARD_DOWN`].
#[derive(Default)]
pub struct Fatal {
    inner: Mutex<FatalInner>,
}

type Notify = Box<dyn Fn() + Send>;

#[derive(Default)]
struct FatalInner {
    reason: Option<String>,
    notify: Option<Notify>,
}

impl Fatal {
    /// A new, unset signal.
    pub fn new() -> Arc<Fatal> {
        Arc::default()
    }

    /// Records why the process must exit (the first reason wins) and calls
    /// the callback.
    pub fn set(&self, reason: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.reason.is_none() {
            inner.reason = Some(reason);
        }
        if let Some(notify) = &inner.notify {
            notify();
        }
    }

    /// The reason, once set.
    pub fn reason(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reason
            .clone()
    }

    /// Calls `notify` when the signal is set (at once if it already is).
    pub fn on_set(&self, notify: impl Fn() + Send + 'static) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.reason.is_some() {
            notify();
        }
        inner.notify = Some(Box::new(notify));
    }
}

impl std::fmt::Debug for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fatal")
            .field("reason", &self.reason())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intensity_allows_max_within_the_period_then_refuses() {
        let t0 = Instant::now();
        let mut i = Intensity::new(3, Duration::from_secs(60));
        let s = Duration::from_secs(1);
        assert_eq!(i.record(t0), Some(1));
        assert_eq!(i.record(t0 + s), Some(2));
        assert_eq!(i.record(t0 + 2 * s), Some(3));
        assert_eq!(i.record(t0 + 3 * s), None);
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let t0 = Instant::now();
        let mut i = Intensity::new(2, Duration::from_secs(10));
        assert_eq!(i.record(t0), Some(1));
        assert_eq!(i.record(t0 + Duration::from_secs(5)), Some(2));
        // The first is 10 s old: out of the window.
        assert_eq!(i.record(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(i.record(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn zero_max_gives_up_at_the_first_crash() {
        let mut i = Intensity::new(0, Duration::from_secs(1));
        assert_eq!(i.record(Instant::now()), None);
    }

    #[test]
    fn fatal_calls_back_once_set_even_if_registered_late() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let f = Fatal::new();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        f.on_set(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(f.reason(), None);
        f.set("shard 1 gave up".into());
        f.set("later".into());
        assert_eq!(f.reason().as_deref(), Some("shard 1 gave up"));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        let g = Fatal::new();
        g.set("x".into());
        let c = calls.clone();
        g.on_set(move || {
            c.fetch_add(10, Ordering::Relaxed);
        });
        assert_eq!(calls.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn states_round_trip() {
        for s in [ShardState::Up, ShardState::Restarting, ShardState::Down] {
            assert_eq!(ShardState::from_u64(s as u64), s);
        }
        assert_eq!(ShardState::Restarting.as_str(), "restarting");
    }
}
