//! Where a shard's loop reads the time: the real clock, or a simulated one
//! that only moves when the simulator ([`crate::sim`]) moves it.
//!
//! The shard asks its [`Clock`] instead of calling `Instant::now()`, so one
//! thread can run many shards in simulated time and replay a run exactly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A shard's source of time.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The operating system's clocks.
    #[default]
    Real,
    /// Time set by a simulator; see [`SimTime`].
    Sim(Arc<SimTime>),
}

impl Clock {
    /// The monotonic time now.
    pub fn now(&self) -> Instant {
        match self {
            Clock::Real => Instant::now(),
            Clock::Sim(t) => t.instant(),
        }
    }

    /// Monotonic nanoseconds since a fixed origin shared by every shard of
    /// the process (simulated: since simulated time zero), so a value taken
    /// on one shard can be subtracted from one taken on another.
    pub fn mono_ns(&self) -> u64 {
        match self {
            Clock::Real => {
                static ORIGIN: OnceLock<Instant> = OnceLock::new();
                let origin = *ORIGIN.get_or_init(Instant::now);
                Instant::now().saturating_duration_since(origin).as_nanos() as u64
            }
            Clock::Sim(t) => t.elapsed().as_nanos() as u64,
        }
    }

    /// Wall-clock milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        match self {
            Clock::Real => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            Clock::Sim(t) => t.unix_ms(),
        }
    }
}

/// Simulated time: a fixed origin plus an offset that only [`SimTime::advance`]
/// moves. Read and moved by the simulator's one thread; atomic only so a
/// store holding the clock stays `Send`.
#[derive(Debug)]
pub struct SimTime {
    /// The `Instant` that stands for simulated time zero. Only differences
    /// of instants are ever used, so its real value does not matter.
    origin: Instant,
    /// The wall clock at simulated time zero, milliseconds since the epoch.
    origin_unix_ms: u64,
    /// Simulated time since the origin, nanoseconds.
    elapsed_ns: AtomicU64,
}

impl SimTime {
    /// Simulated time zero, whose wall clock reads `origin_unix_ms`.
    pub fn new(origin_unix_ms: u64) -> SimTime {
        SimTime {
            origin: Instant::now(),
            origin_unix_ms,
            elapsed_ns: AtomicU64::new(0),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.elapsed_ns
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Simulated time since zero.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::Relaxed))
    }

    fn instant(&self) -> Instant {
        self.origin + self.elapsed()
    }

    fn unix_ms(&self) -> u64 {
        self.origin_unix_ms + self.elapsed().as_millis() as u64
    }
}
