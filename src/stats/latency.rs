//! Server-side latency histograms: SEND decoded to ACK written, SEND
//! decoded to DELIVER written, the durable store's `fdatasync` calls and the
//! shard's event-loop iterations.
//!
//! A fixed array of power-of-two buckets rather than an `hdrhistogram`:
//! recording is one `leading_zeros` and three single-writer counter
//! updates, with no allocation and no lock, and the stats thread reads the
//! buckets while the shard writes them (an `hdrhistogram` would need a
//! lock or a copy per shard). Measured on the development box (release, 20M
//! values, a multiply and modulo per value included): 5-8 ns per record
//! here against 10-12 ns for an `hdrhistogram` with 2 significant digits
//! (about 30 KB each). Two buckets per octave would halve the error; one is
//! enough to split latency between server and load generator.

use super::counters::Counter;

/// Buckets with a finite bound: bucket `i` counts values of at most
/// `2^i` µs (1 µs up to 2^24 µs = 16.8 s); one more bucket takes the rest.
pub const LATENCY_BUCKETS: usize = 25;

/// One latency distribution, written by its shard only.
#[derive(Default, Debug)]
pub struct Histogram {
    /// Non-cumulative counts; the last one is the overflow (`+Inf`) bucket.
    buckets: [Counter; LATENCY_BUCKETS + 1],
    /// Sum of the values, nanoseconds.
    sum_ns: Counter,
    /// Values recorded.
    count: Counter,
}

impl Histogram {
    /// Records one value of `ns` nanoseconds.
    #[inline]
    pub fn record(&self, ns: u64) {
        let us = ns.div_ceil(1000);
        // The smallest i with us <= 2^i.
        let i = if us <= 1 {
            0
        } else {
            (64 - (us - 1).leading_zeros()) as usize
        };
        self.buckets[i.min(LATENCY_BUCKETS)].inc();
        self.sum_ns.add(ns);
        self.count.inc();
    }
}

/// The upper bound of finite bucket `i`, in seconds.
pub fn bucket_le_seconds(i: usize) -> f64 {
    (1u64 << i) as f64 / 1e6
}

/// Several shards' [`Histogram`]s added up, as read by the stats thread.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merged {
    /// Non-cumulative counts per bucket; the last is `+Inf`.
    pub buckets: [u64; LATENCY_BUCKETS + 1],
    /// Sum of the values, nanoseconds.
    pub sum_ns: u64,
    /// Values recorded. Read after the buckets, so it may be a little ahead
    /// of their total while a shard writes; renderers use the buckets' total.
    pub count: u64,
}

impl Merged {
    /// Adds `h` in.
    pub fn add(&mut self, h: &Histogram) {
        for (m, b) in self.buckets.iter_mut().zip(&h.buckets) {
            *m += b.get();
        }
        self.sum_ns += h.sum_ns.get();
        self.count += h.count.get();
    }

    /// Values in the buckets.
    pub fn total(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound, in microseconds, of the bucket holding quantile `q`
    /// (0 < q <= 1); `None` when empty, `u64::MAX` when in the overflow.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= rank {
                return Some(if i < LATENCY_BUCKETS {
                    1 << i
                } else {
                    u64::MAX
                });
            }
        }
        Some(u64::MAX)
    }
}

/// A shard's latency histograms.
#[derive(Default, Debug)]
pub struct Latency {
    /// From a SEND decoded to its ACK written, on the sender's shard.
    pub send_to_ack: Histogram,
    /// From a SEND decoded to its DELIVER written to an online recipient,
    /// for messages delivered right after their commit.
    pub send_to_deliver: Histogram,
    /// Each group commit's `fdatasync` of its segment (`durability = fsync`
    /// only): from the call to its return.
    pub fsync: Histogram,
    /// Each event-loop iteration, from waking up to going back to wait
    /// (the work, not the wait).
    pub loop_iteration: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(h: &Histogram) -> Merged {
        let mut m = Merged::default();
        m.add(h);
        m
    }

    #[test]
    fn values_land_in_the_smallest_bucket_that_holds_them() {
        let h = Histogram::default();
        for ns in [0, 1000, 1001, 2000, 2001, 4000, 1 << 40] {
            h.record(ns);
        }
        let m = merged(&h);
        assert_eq!(m.buckets[0], 2); // 0 and 1 µs
        assert_eq!(m.buckets[1], 2); // 1.001 and 2 µs
        assert_eq!(m.buckets[2], 2); // 2.001 and 4 µs
        assert_eq!(m.buckets[LATENCY_BUCKETS], 1); // ~18 min
        assert_eq!(m.count, 7);
        assert_eq!(m.total(), 7);
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Histogram::default();
        assert_eq!(merged(&h).quantile_us(0.5), None);
        for _ in 0..99 {
            h.record(3_000);
        }
        h.record(100_000);
        let m = merged(&h);
        assert_eq!(m.quantile_us(0.5), Some(4));
        assert_eq!(m.quantile_us(0.99), Some(4));
        assert_eq!(m.quantile_us(1.0), Some(128));
        assert_eq!(m.sum_ns, 99 * 3_000 + 100_000);
    }
}
