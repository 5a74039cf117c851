//! Push notices for offline devices (issue 11; docs/OPERATIONS.md, "Push
//! for offline devices").
//!
//! When a message is queued for a device that is offline, its home shard
//! offers a [`Notice`] (user, device, messages waiting, oldest waiting
//! time; never the body) to the push thread through [`Notices`], a bounded
//! queue: a full queue drops the notice and counts it, so a shard never
//! waits. The push thread ([`Pusher`]) folds notices per device
//! (`table.rs`), POSTs at most one notice per device per
//! `push_interval_ms`, several devices per POST, to `push_url`, signed with
//! HMAC-SHA256 (`wire.rs`), and retries a failed POST with a doubling
//! backoff up to `push_retries_max` times before dropping it (counted).
//! Messages themselves never depend on a push: they wait in the store.
//!
//! The push thread and its HTTP client are built with the `push` feature
//! only (Cargo.toml, on by default). Without it, `absent::Pusher` stands
//! in: it starts only when no `push_url` is set (and then is `None`), and a
//! `push_url` is refused when the configuration is validated.

#[cfg(not(feature = "push"))]
pub mod absent;
#[cfg(feature = "push")]
mod gateway;
#[cfg(feature = "push")]
mod table;
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

#[cfg(not(feature = "push"))]
pub use absent::Pusher;
#[cfg(feature = "push")]
pub use gateway::Pusher;
pub use wire::{body_json, signature, SIGNATURE_HEADER};

/// Why a build without the `push` feature refuses a `push_url`.
pub const NO_PUSH: &str = "this build has no push support: rebuild with --features push";

/// What a POST says about one device: the messages waiting for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The user the messages are for.
    pub user: u64,
    /// The device of `user` that is offline (0 until devices land).
    pub device: u32,
    /// Messages waiting for the device when the notice was made.
    pub waiting: u32,
    /// Server time of the oldest waiting message, Unix ms.
    pub oldest_ms: u64,
}

/// Counters of the push path, process-wide: shown by `show info` as
/// `Push_*` and by `show metrics` as `tern_push_*`.
///
/// Unlike a [`ShardStats`](crate::stats::ShardStats) block these have
/// several writers (every shard offers notices), so they are updated with
/// `fetch_add`; a notice costs one, next to the queue's own atomics.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Notices handed to the push thread.
    pub queued: AtomicU64,
    /// Notices dropped because the push queue was full (or the push thread
    /// was gone).
    pub queue_full: AtomicU64,
    /// Notices dropped because the push thread's device table was full.
    pub table_full: AtomicU64,
    /// POSTs the push gateway answered with 2xx.
    pub posts: AtomicU64,
    /// POST attempts that failed: no connection, timeout, or not 2xx.
    pub post_failures: AtomicU64,
    /// Device notices the push gateway took (summed over POSTs).
    pub sent: AtomicU64,
    /// Device notices dropped after `push_retries_max` failed retries.
    pub given_up: AtomicU64,
    /// Devices with a notice waiting for its POST (a gauge).
    pub pending: AtomicU64,
}

/// One row of [`PushStats::rows`]: `show info` key, help text, whether it
/// is a counter (else a gauge), value.
pub type StatRow = (&'static str, &'static str, bool, u64);

impl PushStats {
    /// Every counter with its `show info` key and help text, in one place so
    /// `show info` and `show metrics` list the same.
    pub fn rows(&self) -> [StatRow; 8] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "Push_queued",
                "Push notices handed to the push thread.",
                true,
                get(&self.queued),
            ),
            (
                "Push_queue_full",
                "Push notices dropped because the push queue (push_queue_len_max) was full.",
                true,
                get(&self.queue_full),
            ),
            (
                "Push_table_full",
                "Push notices dropped because the push thread's device table (push_devices_max) was full.",
                true,
                get(&self.table_full),
            ),
            (
                "Push_posts",
                "POSTs the push gateway answered with 2xx.",
                true,
                get(&self.posts),
            ),
            (
                "Push_post_failures",
                "POST attempts to the push gateway that failed (no connection, timeout, or not 2xx).",
                true,
                get(&self.post_failures),
            ),
            (
                "Push_sent",
                "Device notices the push gateway took.",
                true,
                get(&self.sent),
            ),
            (
                "Push_given_up",
                "Device notices dropped after push_retries_max failed retries.",
                true,
                get(&self.given_up),
            ),
            (
                "Push_pending",
                "Devices with a push notice waiting for its POST.",
                false,
                get(&self.pending),
            ),
        ]
    }
}

/// A shard's end of the push queue. Cloned once per shard.
#[derive(Clone, Debug)]
pub struct Notices {
    tx: SyncSender<Notice>,
    stats: Arc<PushStats>,
}

impl Notices {
    /// A queue of at most `len_max` notices counting into `stats`: the
    /// shards' end, and the push thread's (or a test's).
    pub fn channel(len_max: usize, stats: Arc<PushStats>) -> (Notices, Receiver<Notice>) {
        let (tx, rx) = mpsc::sync_channel(len_max);
        (Notices { tx, stats }, rx)
    }

    /// Hands `notice` to the push thread, or drops it (counted) when the
    /// queue is full; never blocks. Returns whether it was queued.
    pub fn offer(&self, notice: Notice) -> bool {
        match self.tx.try_send(notice) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            // Disconnected: the push thread is gone (it only ends when
            // every shard has): the same drop as a full queue.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}
