//! Per-shard counters: single-writer atomics, one cache-line-aligned block per shard.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::latency::Latency;
use crate::store::QUEUE_LEN_BUCKETS;

/// One value written by a single thread (its shard) and read by the stats thread.
///
/// Writes are a relaxed load plus a relaxed store, never a lock-prefixed
/// read-modify-write: the owning shard is the only writer, so no update can
/// be lost, and the hot path pays for a plain `mov`. A second writer thread
/// *would* lose updates; that is a bug in the caller.
///
/// Readers see each value whole (no torn reads) but possibly a little stale,
/// and values of different counters are not a consistent snapshot.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one. Wraps at `u64::MAX` (centuries away at any real rate).
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`. Wraps at `u64::MAX`.
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts `n`, stopping at 0 (gauges). A gauge that would go below
    /// zero is a miscount, but a stats miscount is not worth stopping a shard.
    #[inline]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.saturating_sub(n), Ordering::Relaxed);
    }

    /// Replaces the value (sampled gauges such as ring depths).
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value, as last written by the owning thread.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// Whether a [`ShardStats`] field only grows or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A level (connections open, queue depth): rendered as a Prometheus `gauge`.
    Gauge,
    /// A running total of events: a Prometheus `counter`, named with `_total`.
    Counter,
    /// A level computed over the last [`LOOP_WINDOW`] (a percentile), shown
    /// by `show shards` only: per-shard percentiles cannot be added up over
    /// shards or boxes, so Prometheus gets a histogram instead.
    Window,
    /// A counter that is one label value of a family (login failures by
    /// reason): rendered with its siblings as `tern_<family>_total{reason=…}`
    /// by the stats renderer's table of labelled families.
    Labelled,
}

/// Description of one [`ShardStats`] field, so renderers can list every field
/// without naming each one (and cannot forget a new one).
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// The field's name in Rust, e.g. `msgs_in`.
    pub name: &'static str,
    /// Gauge or counter.
    pub kind: Kind,
    /// One-line description: the field's doc comment.
    pub help: &'static str,
    /// Reads the field from one shard's block.
    pub get: fn(&ShardStats) -> &Counter,
}

/// Declares [`ShardStats`] and its [`ShardStats::FIELDS`] table from one list,
/// so the doc comment of each field is also its Prometheus `# HELP` text.
macro_rules! shard_stats {
    (
        $(#[$meta:meta])*
        pub struct $ty:ident {
            $( #[doc = $doc:literal] $kind:ident $name:ident, )+
        }
    ) => {
        $(#[$meta])*
        pub struct $ty {
            $( #[doc = $doc] pub $name: Counter, )+
            /// Server-side latency histograms (not in [`Self::FIELDS`]:
            /// rendered as histograms, not one value per shard).
            pub latency: Latency,
            /// Users with queued messages by queue length, as last
            /// published: non-cumulative, bucket `i` for lengths up to
            /// `2^i`, the last one `+Inf` ([`crate::store::Shape`]). Not in
            /// [`Self::FIELDS`]: rendered as one histogram over shards.
            pub user_queues: [Counter; QUEUE_LEN_BUCKETS + 1],
        }

        impl $ty {
            /// Every field, in declaration order.
            pub const FIELDS: &'static [Field] = &[
                $( Field {
                    name: stringify!($name),
                    kind: Kind::$kind,
                    help: $doc.trim_ascii(),
                    get: |s| &s.$name,
                }, )+
            ];
        }
    };
}

shard_stats! {
    /// Counters of one shard. Aligned to 128 bytes so two shards never share
    /// a cache line (128 rather than 64: adjacent-line prefetch pulls pairs).
    ///
    /// Every field is written only by the owning shard thread and read by the
    /// stats thread. Gauges are levels; counters only grow.
    #[repr(align(128))]
    #[derive(Default, Debug)]
    pub struct ShardStats {
        /// Open client connections on this shard (logged in or not).
        Gauge conns,
        /// Users homed on this shard with at least one device logged in.
        Gauge users_online,
        /// Logged-in sessions homed on this shard: every online device of every user (`users_online` counts a user once).
        Gauge sessions_online,
        /// Supervisor state of the shard: 0 = up, 1 = restarting (crashed; waiting out its backoff or reopening its store), 2 = down (gave up past the restart intensity; the process exits).
        Gauge state,
        /// Messages held in this shard's store-and-forward queues.
        Gauge queued,
        /// Age in seconds of the oldest message queued on this shard (0 with none queued), as of the last second.
        Gauge queue_oldest_age_seconds,
        /// Connections accepted here that have not logged in yet.
        Gauge pending,
        /// Addresses in this shard's per-address table (sampled each second).
        Gauge addrs_tracked,
        /// Items waiting in the rings into this shard (sampled each loop).
        Gauge ring_in_depth,
        /// Items waiting in this shard's outboxes to other shards (not yet in a ring).
        Gauge ring_out_depth,
        /// Median event-loop iteration time over the last window, in microseconds (`show shards`; Prometheus has tern_loop_iteration_seconds).
        Window loop_p50_us,
        /// 99th percentile event-loop iteration time over the last window, in microseconds (`show shards`; Prometheus has tern_loop_iteration_seconds).
        Window loop_p99_us,
        /// io_uring instances this shard runs (0 on the poll backend).
        Gauge io_rings,
        /// io_uring fixed-file slots holding a descriptor, over this shard's rings.
        Gauge io_slots_used,
        /// io_uring fixed-file slots over this shard's rings; new connections are refused before they run out.
        Gauge io_slots,
        /// Client connections accepted.
        Counter accepted,
        /// Client connections closed, for any reason.
        Counter closed,
        /// Connections refused at accept (over the connection limit or the accept rate).
        Counter rejected,
        /// Successful logins.
        Counter logins_ok,
        /// Failed logins (bad, expired or malformed token, or an unsupported protocol version).
        Counter logins_failed,
        /// Failed logins with a malformed token or a bad signature (reason bad_token).
        Labelled login_failures_bad_token,
        /// Failed logins with a genuine token past its expiry (reason token_expired).
        Labelled login_failures_token_expired,
        /// Failed logins asking for a protocol version this server does not speak (reason bad_version).
        Labelled login_failures_bad_version,
        /// Failed logins of a user the operator banned (reason banned).
        Labelled login_failures_banned,
        /// Failed logins past devices_per_user_max devices online (reason too_many_devices).
        Labelled login_failures_too_many_devices,
        /// SEND frames accepted.
        Counter msgs_in,
        /// DELIVER frames written.
        Counter msgs_out,
        /// ACK frames sent to senders (the server took responsibility).
        Counter acks,
        /// Delivery and read receipts written to senders.
        Counter receipts,
        /// Receipts for an offline sender dropped because its pending list was full.
        Counter receipts_dropped,
        /// Free bytes on the filesystem of the shard's store, as last seen (0 with durability memory).
        Gauge disk_free_bytes,
        /// 1 while the shard refuses SENDs for lack of disk space (free space under disk_free_bytes_min, or a write found the disk full), else 0.
        Gauge disk_short,
        /// Messages refused because the store's disk budget was used up or the disk was full.
        Counter storage_full,
        /// Store writes that found the disk full (ENOSPC, EDQUOT) and were rolled back.
        Counter store_rollbacks,
        /// Loop iterations that ran (reading, delivering, accepting, staging the next batch) while a group commit's fdatasync was in flight off the loop (durability fsync).
        Counter sync_overlaps,
        /// SENDs and logins refused with unavailable because the target shard was restarting or down.
        Counter unavailable,
        /// Times the shard crashed and was restarted by its supervisor.
        Counter restarts,
        /// Messages refused because the recipient's queue was full.
        Counter queue_full,
        /// Protocol v2 SENDs that were retries of a SEND already taken: answered with the original ACK, not stored again.
        Counter sends_deduped,
        /// Protocol v2 SENDs refused with stale_client_id (client_id below the sender's window).
        Counter stale_client_ids,
        /// Pushes that found a cross-shard ring full (back-pressure).
        Counter ring_full,
        /// Cluster: logins answered with REDIRECT (or LOGIN_ERR other_node to a v1 client) because another node serves the user.
        Counter redirects,
        /// Cluster: sessions closed with BYE(moved) because this node lost the user's partition.
        Counter moved_closes,
        /// Devices removed (DEVICE_REMOVE from another device of the user, or `device remove` on the stats socket): their sessions closed with BYE(device_removed).
        Counter devices_removed,
        /// Registered devices dropped with their copies after device_idle_days_max offline.
        Counter devices_expired,
        /// Device log records made durable (registrations, last online times, marks of messages some devices answered, receipts kept and handed out).
        Counter device_records,
        /// Receipts waiting (durably) for a device of their user that is offline.
        Gauge receipts_waiting,
        /// Cluster: user states (registered devices, waiting receipts, last seen, privacy) handed to the bridge for the state streams TERNS_<g>.
        Counter states_handed,
        /// Sessions an operator closed with BYE(kicked): `kick user`, or `ban user` while online.
        Counter kicks,
        /// Logged-in connections moved here from the shard that accepted them.
        Counter handoffs_in,
        /// Logged-in connections moved from here to their user's home shard.
        Counter handoffs_out,
        /// Connections closed because their unsent output grew too large.
        Counter slow_closes,
        /// Connections closed for idleness or a login timeout.
        Counter idle_closes,
        /// Connections closed for a protocol violation.
        Counter protocol_errors,
        /// TLS handshakes completed (full or resumed).
        Counter tls_handshakes,
        /// TLS connections that failed: bad handshake, not TLS at all, or a record that does not decrypt.
        Counter tls_failures,
        /// Panics caught on this shard.
        Counter panics,
        /// SENDs refused with rate_limited (over sends_per_s_max); not taken.
        Counter limited_sends,
        /// READ and DELIVERED frames refused with rate_limited (over receipts_per_s_max); not taken.
        Counter limited_receipts,
        /// PINGs refused with rate_limited (over pings_per_s_max); no PONG.
        Counter limited_pings,
        /// SUBSCRIBE, UNSUBSCRIBE, PRIVACY and TYPING frames refused with rate_limited (over presence_frames_per_s_max); not taken.
        Counter limited_presence,
        /// Presence subscriptions held on this shard (watched users homed here, one per watching connection).
        Gauge presence_subs,
        /// PRESENCE frames written to subscribers.
        Counter presence_pushes,
        /// SUBSCRIBEs refused with presence_subs_full.
        Counter presence_subs_refused,
        /// Last-seen and privacy records written to the shard's presence log.
        Counter presence_records,
        /// TYPING frames relayed to an online peer (a peer offline gets nothing).
        Counter typing_relayed,
        /// Connections closed with BYE(rate_limited): more than rate_refusals_max refusals within rate_refusals_window_ms.
        Counter limited_closes,
        /// READ and DELIVERED frames refused with unknown_message: the message was not delivered to that connection in this login; nothing relayed or removed.
        Counter unknown_message_refusals,
        /// Connections refused at accept because their address is banned after too many failed logins.
        Counter addr_refused_banned,
        /// Connections refused at accept because their address opened more than addr_conns_per_s_max this second.
        Counter addr_refused_rate,
        /// Connections refused at accept because their address holds addr_pending_max connections not logged in.
        Counter addr_refused_pending,
        /// Connections refused at accept because the address table (addr_table_max) is full.
        Counter addr_refused_table,
        /// Addresses banned after more than addr_logins_failed_max failed logins within a minute.
        Counter addr_bans,
        /// Connections not logged in closed to make room for a new one (the shard's share of pending_max was reached).
        Counter pending_evicted,
        /// Bytes read from client sockets.
        Counter bytes_in,
        /// Bytes written to client sockets.
        Counter bytes_out,
        /// io_uring multishot receives ended because the provided buffers ran dry (re-armed; nothing lost).
        Counter io_recv_no_buffers,
        /// Event-loop iterations.
        Counter loop_iterations,
    }
}

/// How often [`LoopTimer`] publishes `loop_p50_us` and `loop_p99_us`.
pub const LOOP_WINDOW: Duration = Duration::from_secs(1);

/// Longest loop iteration [`LoopTimer`] tells apart, in microseconds (60 s).
/// Longer iterations are recorded as this value.
pub const LOOP_US_MAX: u64 = 60_000_000;

/// Significant decimal digits kept by [`LoopTimer`]: values are exact to 1 %,
/// which is plenty for a latency gauge and keeps the histogram small.
const LOOP_SIGFIG: u8 = 2;

/// Event-loop iteration times of one shard, published to
/// [`ShardStats::loop_p50_us`] and [`ShardStats::loop_p99_us`] once per
/// [`LOOP_WINDOW`]. Owned by the shard thread; never shared.
///
/// It does not count iterations: that is [`ShardStats::loop_iterations`].
pub struct LoopTimer {
    histogram: Histogram<u64>,
    /// When the current window began (the last publication, or creation).
    window_start: Instant,
}

impl LoopTimer {
    /// A timer whose first window starts at `now`.
    pub fn new(now: Instant) -> LoopTimer {
        let histogram = Histogram::new_with_bounds(1, LOOP_US_MAX, LOOP_SIGFIG)
            .expect("constant histogram bounds are valid");
        LoopTimer {
            histogram,
            window_start: now,
        }
    }

    /// Records one iteration that took `elapsed` (also in the shard's
    /// `loop_iteration` histogram). When `now` is at least
    /// [`LOOP_WINDOW`] past the start of the window, publishes the window's
    /// p50 and p99 to `stats`, starts a new window and returns true.
    ///
    /// A window with no iterations publishes nothing (the gauges keep their
    /// last values); one cannot happen here since this call records one.
    pub fn record(&mut self, elapsed: Duration, now: Instant, stats: &ShardStats) -> bool {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Exported (tern_loop_iteration_seconds): unlike the windowed
        // percentiles below, bucket counts add up over shards and boxes.
        stats.latency.loop_iteration.record(ns);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.min(LOOP_US_MAX));
        if now.saturating_duration_since(self.window_start) < LOOP_WINDOW {
            return false;
        }
        debug_assert!(!self.histogram.is_empty());
        stats
            .loop_p50_us
            .set(self.histogram.value_at_quantile(0.50));
        stats
            .loop_p99_us
            .set(self.histogram.value_at_quantile(0.99));
        self.histogram.reset();
        self.window_start = now;
        true
    }
}

impl fmt::Debug for LoopTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopTimer")
            .field("samples", &self.histogram.len())
            .field("window_start", &self.window_start)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn counter_ops() {
        let c = Counter::default();
        assert_eq!(c.get(), 0);
        c.inc();
        c.add(10);
        assert_eq!(c.get(), 11);
        c.sub(1);
        assert_eq!(c.get(), 10);
        c.set(u64::MAX);
        c.inc();
        assert_eq!(c.get(), 0, "add wraps");
        assert_eq!(format!("{c:?}"), "0");
    }

    #[test]
    fn counter_sub_saturates() {
        let c = Counter::default();
        c.set(2);
        c.sub(5);
        assert_eq!(c.get(), 0);
    }

    #[test]
    fn shard_stats_layout() {
        assert_eq!(std::mem::align_of::<ShardStats>(), 128);
        assert_eq!(std::mem::size_of::<ShardStats>() % 128, 0);
        // Every field is in the table: the struct holds nothing but
        // counters and the latency histograms.
        let bytes =
            (ShardStats::FIELDS.len() + QUEUE_LEN_BUCKETS + 1) * 8 + std::mem::size_of::<Latency>();
        let size = std::mem::size_of::<ShardStats>();
        assert!(bytes <= size && bytes > size - 128);
    }

    #[test]
    fn fields_table_is_complete_and_distinct() {
        let s = ShardStats::default();
        let mut names = HashSet::new();
        for (i, f) in ShardStats::FIELDS.iter().enumerate() {
            assert!(names.insert(f.name), "duplicate {}", f.name);
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
            (f.get)(&s).set(i as u64 + 1);
        }
        // Each accessor reaches its own field: all values are still distinct.
        let values: HashSet<u64> = ShardStats::FIELDS
            .iter()
            .map(|f| (f.get)(&s).get())
            .collect();
        assert_eq!(values.len(), ShardStats::FIELDS.len());
        assert_eq!(s.conns.get(), 1);
        assert_eq!(s.loop_iterations.get(), ShardStats::FIELDS.len() as u64);
        assert_eq!(
            ShardStats::FIELDS[0].help,
            "Open client connections on this shard (logged in or not)."
        );
    }

    #[test]
    fn single_writer_is_seen_by_reader() {
        const N: u64 = 100_000;
        let s = Arc::new(ShardStats::default());
        let writer = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for _ in 0..N {
                    s.msgs_in.inc();
                }
            })
        };
        let mut last = 0;
        while last < N {
            let v = s.msgs_in.get();
            assert!(v >= last, "went backwards: {v} < {last}");
            last = v;
            if writer.is_finished() {
                last = s.msgs_in.get();
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(s.msgs_in.get(), N);
        assert!(last <= N);
    }

    #[test]
    fn loop_timer_publishes_once_per_window() {
        let stats = ShardStats::default();
        let t0 = Instant::now();
        let mut timer = LoopTimer::new(t0);
        for i in 0..99 {
            let now = t0 + Duration::from_millis(i);
            assert!(!timer.record(Duration::from_micros(100), now, &stats));
        }
        assert_eq!(
            stats.loop_p50_us.get(),
            0,
            "nothing published inside the window"
        );
        // One slow iteration closes the window: 100 samples, 1 % of them slow.
        assert!(timer.record(Duration::from_secs(120), t0 + LOOP_WINDOW, &stats));
        let p50 = stats.loop_p50_us.get();
        assert!((99..=101).contains(&p50), "p50 {p50}");
        let p99 = stats.loop_p99_us.get();
        assert!((99..=101).contains(&p99), "p99 {p99}");
        // The next window starts empty: a lone slow iteration is its p99.
        assert!(!timer.record(Duration::from_secs(120), t0 + LOOP_WINDOW, &stats));
        assert!(timer.record(Duration::ZERO, t0 + 2 * LOOP_WINDOW, &stats));
        assert!(stats.loop_p99_us.get() >= LOOP_US_MAX * 99 / 100);
        assert_eq!(stats.loop_p50_us.get(), 0);
        // Every iteration is also in the exported histogram, never reset.
        let mut m = crate::stats::Merged::default();
        m.add(&stats.latency.loop_iteration);
        assert_eq!(m.total(), 102);
        assert_eq!(
            m.quantile_us(0.5),
            Some(128),
            "100 µs is in the 128 µs bucket"
        );
    }
}
