//! A token bucket: `rate` tokens per second, at most `burst` banked.
//!
//! Eight bytes of state. A full bucket that has not been touched is the same
//! as no bucket at all, so a caller can keep buckets only for connections
//! that were active recently and drop the rest (idle connections pay
//! nothing).

/// One bucket's state. Tokens are kept in thousandths so that rates below
/// one per second work with integer arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Banked tokens, in thousandths; `0..=burst * 1000`.
    milli: u32,
    /// When `milli` was last brought up to date, ms (wrapping).
    at_ms: u32,
}

/// A rate and a burst: the configuration of a kind of bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second; 0 = unlimited (every take succeeds).
    pub per_s: u32,
    /// Most tokens banked (the burst); at least 1 when `per_s > 0`.
    pub burst: u32,
}

impl Rate {
    /// Whether this rate limits anything.
    pub fn is_limited(self) -> bool {
        self.per_s > 0
    }

    /// A full bucket at `now_ms`.
    pub fn full(self, now_ms: u64) -> Bucket {
        Bucket {
            milli: self.burst.saturating_mul(1000),
            at_ms: now_ms as u32,
        }
    }
}

impl Bucket {
    /// Takes one token at `now_ms` if there is one. With an unlimited rate
    /// it always succeeds.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> bool {
        if !rate.is_limited() {
            return true;
        }
        self.refill(rate, now_ms);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again at `now_ms` (it can be forgotten).
    pub fn is_full(&mut self, rate: Rate, now_ms: u64) -> bool {
        self.refill(rate, now_ms);
        self.milli >= rate.burst.saturating_mul(1000)
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        let now = now_ms as u32;
        // Wrapping: a bucket untouched for more than 49 days reads as a
        // short gap; it was refilled long before anyway.
        let elapsed = u64::from(now.wrapping_sub(self.at_ms));
        let cap = u64::from(rate.burst) * 1000;
        // per_s tokens per 1000 ms = per_s milli-tokens per ms.
        let add = elapsed * u64::from(rate.per_s);
        self.milli = (u64::from(self.milli) + add).min(cap) as u32;
        self.at_ms = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Rate = Rate {
        per_s: 10,
        burst: 3,
    };

    #[test]
    fn burst_then_the_rate() {
        let mut b = R.full(0);
        assert!(b.take(R, 0) && b.take(R, 0) && b.take(R, 0));
        assert!(!b.take(R, 0), "the burst is spent");
        assert!(!b.take(R, 99), "a token takes 100 ms at 10/s");
        assert!(b.take(R, 100));
        assert!(!b.take(R, 100));
        // A long pause refills to the burst, not beyond.
        assert!(b.is_full(R, 10_000));
        let taken = (0..10).filter(|_| b.take(R, 10_000)).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn unlimited_always_passes() {
        let r = Rate { per_s: 0, burst: 0 };
        let mut b = r.full(0);
        assert!((0..1000).all(|_| b.take(r, 0)));
    }

    #[test]
    fn slow_rates_and_clock_wrap() {
        let r = Rate { per_s: 1, burst: 1 };
        let mut b = r.full(u64::from(u32::MAX) - 10);
        assert!(b.take(r, u64::from(u32::MAX) - 10));
        assert!(!b.take(r, u64::from(u32::MAX) + 500));
        assert!(b.take(r, u64::from(u32::MAX) + 1000));
    }

    #[test]
    fn state_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 8);
    }
}
