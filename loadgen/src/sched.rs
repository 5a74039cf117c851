//! Time: when each connection opens and when each message is sent.
//!
//! Both schedules are fixed in advance and never depend on how fast the
//! server answers: the n-th event is due at `begin + n * interval` (plus a
//! bounded jitter for connection opens). A sender that falls behind sends
//! what is due at once, and latency is measured from the *intended* time, so
//! a stall shows up in the percentiles instead of being hidden (coordinated
//! omission, as in wrk2).

use std::time::Duration;

/// Nanoseconds per second.
pub const NS_PER_S: u64 = 1_000_000_000;

/// splitmix64: a tiny, fast, well-mixed generator; also used as a hash so the
/// n-th message's sender and recipient can be recomputed from `n` alone.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n`; `n` must be > 0. (Modulo bias is below 2^-32 for
    /// the ranges used here.)
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }
}

/// The splitmix64 finaliser: a bijective mix of 64 bits.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fixed-rate schedule: event `n` is due at `begin_ns + n / rate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// When event 0 is due, ns since the run's epoch.
    pub begin_ns: u64,
    /// Events per second; > 0.
    pub rate_per_s: u64,
    /// Events in the schedule; events `0..total`.
    pub total: u64,
}

impl Schedule {
    /// When event `n` is due, ns since the run's epoch.
    pub fn intended_ns(&self, n: u64) -> u64 {
        debug_assert!(self.rate_per_s > 0);
        self.begin_ns + (n as u128 * NS_PER_S as u128 / self.rate_per_s as u128) as u64
    }

    /// How many events are due at `now_ns` (events `0..due` are), at most `total`.
    pub fn due(&self, now_ns: u64) -> u64 {
        if now_ns < self.begin_ns {
            return 0;
        }
        let elapsed = (now_ns - self.begin_ns) as u128;
        // Event n is due when n * NS_PER_S / rate <= elapsed (integer division
        // as in `intended_ns`), i.e. n < ceil((elapsed + 1) * rate / NS_PER_S).
        let due = ((elapsed + 1) * self.rate_per_s as u128).div_ceil(NS_PER_S as u128);
        (due as u64).min(self.total)
    }

    /// When the last event is due (`begin_ns` for an empty schedule).
    pub fn end_ns(&self) -> u64 {
        if self.total == 0 {
            self.begin_ns
        } else {
            self.intended_ns(self.total - 1)
        }
    }
}

/// Paces connection opens at a rate, with jitter: open `k` is due at
/// `begin + (k + u_k) * interval` with `u_k` uniform in `[0, 1)`, so opens
/// never bunch on the tick but the average rate is exact and at most one open
/// is ever ahead of the plain schedule.
#[derive(Clone, Debug)]
pub struct Pacer {
    begin_ns: u64,
    /// ns between opens; 0 = no limit.
    interval_ns: u64,
    /// Opens issued so far.
    issued: u64,
    /// Jitter of the next open, ns in `0..interval_ns` (0 without jitter).
    jitter_ns: u64,
    rng: Option<Rng>,
}

impl Pacer {
    /// A pacer starting at `begin_ns` with `rate_per_s` opens per second
    /// (0 = unlimited); `jitter_seed` = `None` disables jitter.
    pub fn new(begin_ns: u64, rate_per_s: f64, jitter_seed: Option<u64>) -> Pacer {
        let interval_ns = if rate_per_s > 0.0 {
            ((NS_PER_S as f64 / rate_per_s) as u64).max(1)
        } else {
            0
        };
        let mut pacer = Pacer {
            begin_ns,
            interval_ns,
            issued: 0,
            jitter_ns: 0,
            rng: jitter_seed.map(Rng::new),
        };
        pacer.draw_jitter();
        pacer
    }

    fn draw_jitter(&mut self) {
        self.jitter_ns = match (&mut self.rng, self.interval_ns) {
            (Some(rng), i) if i > 0 => rng.below(i),
            _ => 0,
        };
    }

    /// When the next open is due, ns since the epoch.
    pub fn next_ns(&self) -> u64 {
        self.begin_ns + self.issued * self.interval_ns + self.jitter_ns
    }

    /// True if the next open is due at `now_ns`.
    pub fn is_due(&self, now_ns: u64) -> bool {
        self.next_ns() <= now_ns
    }

    /// Marks the next open as issued.
    pub fn advance(&mut self) {
        self.issued += 1;
        self.draw_jitter();
    }

    /// Opens issued so far.
    #[cfg(test)]
    pub fn issued(&self) -> u64 {
        self.issued
    }
}

/// Parses a rate: `50000`, `50000/s`, `3000/min`, `0.5/s`. Returns events per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, per) = s.split_once('/').unwrap_or((s, "s"));
    let num: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected a rate like 50000/s"))?;
    let secs = match per.trim() {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("`{s}`: unknown period `{other}`")),
    };
    if !num.is_finite() || num < 0.0 {
        return Err(format!("`{s}`: must be a non-negative rate"));
    }
    Ok(num / secs)
}

/// Parses a duration: `30s`, `500ms`, `10m`, `1h`, `1.5s`, `0`. A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a duration like 30s"))?;
    let secs = match unit.trim() {
        "" | "s" => num,
        "ms" => num / 1e3,
        "us" => num / 1e6,
        "m" | "min" => num * 60.0,
        "h" => num * 3600.0,
        other => return Err(format!("`{s}`: unknown unit `{other}`")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}`: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_intended_and_due_agree() {
        for rate in [1, 3, 7, 1000, 333_333, 1_000_000_000] {
            let s = Schedule {
                begin_ns: 5_000,
                rate_per_s: rate,
                total: 1_000,
            };
            assert_eq!(s.due(4_999), 0);
            for n in [0u64, 1, 2, 10, 998, 999] {
                let t = s.intended_ns(n);
                // At its intended time event n is due, one ns earlier it is not.
                assert_eq!(s.due(t), (n + 1).min(s.total), "rate {rate} n {n}");
                if t > s.begin_ns && s.intended_ns(n - 1) < t {
                    assert_eq!(s.due(t - 1), n, "rate {rate} n {n}");
                }
            }
            assert_eq!(s.due(u64::MAX / 2), 1000);
        }
    }

    #[test]
    fn schedule_is_exact_over_long_runs() {
        // 1000 msgs/s for an hour: the last intended time is exact, no drift.
        let s = Schedule {
            begin_ns: 0,
            rate_per_s: 1000,
            total: 3_600_000,
        };
        assert_eq!(s.intended_ns(3_599_999), 3_599_999_000_000);
        assert_eq!(s.due(3_600 * NS_PER_S), 3_600_000);
        assert_eq!(s.end_ns(), 3_599_999_000_000);
        let rate3 = Schedule {
            begin_ns: 0,
            rate_per_s: 3,
            total: 10,
        };
        assert_eq!(rate3.intended_ns(3), NS_PER_S);
        assert_eq!(rate3.intended_ns(1), 333_333_333);
    }

    #[test]
    fn empty_schedule() {
        let s = Schedule {
            begin_ns: 7,
            rate_per_s: 10,
            total: 0,
        };
        assert_eq!(s.due(u64::MAX / 2), 0);
        assert_eq!(s.end_ns(), 7);
    }

    /// Counts the opens a pacer lets through if polled every `step_ns` up to `until_ns`.
    fn run_pacer(p: &mut Pacer, step_ns: u64, until_ns: u64) -> Vec<u64> {
        let mut at = Vec::new();
        let mut now = 0;
        while now <= until_ns {
            while p.is_due(now) {
                at.push(p.next_ns());
                p.advance();
            }
            now += step_ns;
        }
        at
    }

    #[test]
    fn pacer_rate_is_exact_with_and_without_jitter() {
        for seed in [None, Some(1), Some(42)] {
            let mut p = Pacer::new(0, 1000.0, seed);
            let at = run_pacer(&mut p, 100_000, 2 * NS_PER_S);
            // 2 s at 1000/s: 2000 or 2001 opens (the one at t = 2 s exactly).
            assert!((2000..=2001).contains(&at.len()), "{seed:?}: {}", at.len());
            // Non-decreasing intended times, each within its own interval.
            for (k, w) in at.windows(2).enumerate() {
                assert!(w[0] <= w[1]);
                assert!(w[0] >= k as u64 * 1_000_000 && w[0] < (k as u64 + 1) * 1_000_000);
            }
            // Never ahead of the plain schedule by a whole interval.
            for (k, t) in at.iter().enumerate() {
                assert!(*t >= k as u64 * 1_000_000);
            }
        }
    }

    #[test]
    fn pacer_jitter_spreads_within_interval() {
        let mut p = Pacer::new(0, 10.0, Some(7));
        let at = run_pacer(&mut p, 1_000_000, NS_PER_S);
        let offsets: Vec<u64> = at
            .iter()
            .enumerate()
            .map(|(k, t)| t - k as u64 * 100_000_000)
            .collect();
        assert!(offsets.iter().all(|&o| o < 100_000_000));
        // Not all on the tick.
        assert!(offsets.iter().any(|&o| o > 0));
    }

    #[test]
    fn pacer_unlimited() {
        let mut p = Pacer::new(10, 0.0, Some(1));
        assert!(!p.is_due(9));
        for _ in 0..1000 {
            assert!(p.is_due(10));
            p.advance();
        }
        assert_eq!(p.issued(), 1000);
    }

    #[test]
    fn rng_below_in_range_and_deterministic() {
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        for _ in 0..1000 {
            let x = a.below(7);
            assert!(x < 7);
            assert_eq!(x, b.below(7));
        }
        assert_eq!(Rng::new(1).below(1), 0);
    }

    #[test]
    fn parse_rates_and_durations() {
        assert_eq!(parse_rate("50000/s").unwrap(), 50000.0);
        assert_eq!(parse_rate("50000").unwrap(), 50000.0);
        assert_eq!(parse_rate("120/min").unwrap(), 2.0);
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("5/week").is_err());
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5 parsecs").is_err());
    }
}
