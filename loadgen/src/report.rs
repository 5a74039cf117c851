//! Counters shared by the workers, latency histograms, the one-line progress
//! report and the final summary and JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded, in µs (one hour); larger values are clamped.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

macro_rules! counters {
    ($($name:ident: $doc:literal,)*) => {
        /// Monotonic event counters, summed over workers.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum C { $(#[doc = $doc] $name,)* }
        impl C {
            /// Every counter, in report order.
            pub const ALL: &'static [C] = &[$(C::$name,)*];
            /// The counter's name in the JSON report.
            pub fn name(self) -> &'static str {
                match self { $(C::$name => stringify!($name),)* }
            }
        }
    };
}

counters! {
    opened: "Connects started.",
    connected: "Connects that completed.",
    connect_failed: "Connects that failed (see failures).",
    login_ok: "LOGIN_OK received.",
    login_failed: "Logins that failed (see failures).",
    redirects: "REDIRECTs followed: the connection closed and opened again to the cluster node the REDIRECT named, and logged in there.",
    closed_by_server: "Logged-in connections the server closed or reset.",
    closed_by_us: "Connections we closed.",
    pings: "PINGs sent.",
    pongs: "PONGs received.",
    subscribes: "SUBSCRIBEs sent (--subscribe).",
    presences: "PRESENCE frames received.",
    msgs_sent: "Messages sent: SEND frames written (with --cut-rate: messages handed to a user's session, written now or at its next login).",
    msgs_skipped: "Messages not sent: their sender was not logged in.",
    msgs_late: "Messages sent more than 1 ms after their intended time.",
    acks: "ACKs received (with --cut-rate: ACKs that took a message out of a user's outbox; a repeated ACK for a resent SEND is not counted).",
    send_errors: "ERROR frames answering a SEND.",
    delivers: "DELIVER frames received (duplicates included).",
    delivers_dup: "DELIVERs of a message already delivered.",
    delivers_dup_app: "Duplicates seen by the app: DELIVERs of a message already delivered that an app's filters let through (without --cut-rate: a new server id, and no client id: a v1 DELIVER; with it: what the user's session filter showed).",
    delivers_foreign: "DELIVERs whose body is not from this run.",
    out_of_order: "First deliveries that came after a later message of the same sender.",
    receipts: "Delivered RECEIPTs matched to a message.",
    receipts_unmatched: "Delivered RECEIPTs for no known message.",
    offline_expected: "Sum of LOGIN_OK offline_count (final-drain logins not included).",
    final_drain_logins: "Recipients of overdue messages logged in again for the final drain.",
    final_drain_backlog: "Sum of LOGIN_OK offline_count of the final-drain logins.",
    final_drain_drained: "Final-drain recipients that received their whole queue.",
    cuts: "Connections cut by --cut-rate (reset with SO_LINGER 0).",
    resends: "SEND frames written at a login for messages not ACKed yet (with --cut-rate), with their original client ids.",
    final_drain_failed: "Final-drain recipients whose connect or login failed or that were dropped.",
}

/// State shared by the main thread and the workers.
pub struct Shared {
    counters: Vec<AtomicU64>,
    /// Connections logged in (raw mode: connected) right now.
    pub up: AtomicI64,
    /// Connections connecting or logging in right now.
    pub inflight: AtomicI64,
    /// Connections a worker still has to start in the current open command.
    pub open_pending: AtomicI64,
    /// Failures by reason.
    failures: Mutex<BTreeMap<String, u64>>,
    /// Latencies since the main thread last took them (for the progress line).
    pub interval: Mutex<Hists>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            counters: C::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            up: AtomicI64::new(0),
            inflight: AtomicI64::new(0),
            open_pending: AtomicI64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            interval: Mutex::new(Hists::new()),
        }
    }
}

impl Shared {
    /// Adds `v` to counter `c`.
    pub fn add(&self, c: C, v: u64) {
        self.counters[c as usize].fetch_add(v, Ordering::Relaxed);
    }

    /// Counter `c`.
    pub fn get(&self, c: C) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    /// Counts one failure with `reason` (e.g. `connect:ECONNREFUSED`).
    pub fn fail(&self, reason: &str) {
        let mut f = self.failures.lock().expect("failures lock");
        *f.entry(reason.to_string()).or_default() += 1;
    }

    /// Failures by reason.
    pub fn failures(&self) -> BTreeMap<String, u64> {
        self.failures.lock().expect("failures lock").clone()
    }

    /// All failures.
    pub fn failures_total(&self) -> u64 {
        self.failures.lock().expect("failures lock").values().sum()
    }

    /// Every counter by name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        C::ALL.iter().map(|&c| (c.name(), self.get(c))).collect()
    }
}

/// The latencies the load generator measures, in µs.
#[derive(Clone)]
pub struct Hists {
    /// Open -> TCP connected.
    pub connect: Histogram<u64>,
    /// Open -> LOGIN_OK.
    pub login: Histogram<u64>,
    /// Intended send time -> ACK.
    pub ack: Histogram<u64>,
    /// Intended send time -> DELIVER at the recipient.
    pub deliver: Histogram<u64>,
    /// Intended send time -> delivered RECEIPT at the sender.
    pub receipt: Histogram<u64>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

impl Default for Hists {
    fn default() -> Self {
        Hists::new()
    }
}

impl Hists {
    /// Empty histograms.
    pub fn new() -> Hists {
        Hists {
            connect: hist(),
            login: hist(),
            ack: hist(),
            deliver: hist(),
            receipt: hist(),
        }
    }

    /// Adds every value of `other`.
    pub fn add(&mut self, other: &Hists) {
        for (a, b) in self.each_mut().into_iter().zip(other.each()) {
            a.add(b).expect("same bounds");
        }
    }

    /// Empties all.
    pub fn reset(&mut self) {
        for h in self.each_mut() {
            h.reset();
        }
    }

    fn each(&self) -> [&Histogram<u64>; 5] {
        [
            &self.connect,
            &self.login,
            &self.ack,
            &self.deliver,
            &self.receipt,
        ]
    }

    fn each_mut(&mut self) -> [&mut Histogram<u64>; 5] {
        [
            &mut self.connect,
            &mut self.login,
            &mut self.ack,
            &mut self.deliver,
            &mut self.receipt,
        ]
    }

    /// Name and histogram, in report order.
    pub fn named(&self) -> [(&'static str, &Histogram<u64>); 5] {
        [
            ("connect", &self.connect),
            ("login", &self.login),
            ("ack", &self.ack),
            ("deliver", &self.deliver),
            ("receipt", &self.receipt),
        ]
    }
}

/// Records `us` into `h`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

/// Formats µs for humans: `850us`, `12.3ms`, `4.20s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// One point of a percentile spectrum.
#[derive(Serialize)]
pub struct SpectrumPoint {
    /// Percentile, 0..=100.
    pub percentile: f64,
    /// Latency at that percentile, µs.
    pub value_us: u64,
    /// Values recorded up to this point.
    pub count: u64,
}

/// A histogram's summary and full spectrum for the JSON report.
#[derive(Serialize)]
pub struct HistReport {
    /// Values recorded.
    pub count: u64,
    /// Smallest, µs.
    pub min_us: u64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Percentiles, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// 99.99th percentile, µs.
    pub p9999_us: u64,
    /// Largest, µs.
    pub max_us: u64,
    /// The whole distribution (HdrHistogram `iter_quantiles(1)`).
    pub spectrum: Vec<SpectrumPoint>,
}

impl HistReport {
    /// Summarises `h`.
    pub fn of(h: &Histogram<u64>) -> HistReport {
        let spectrum = if h.is_empty() {
            Vec::new()
        } else {
            h.iter_quantiles(1)
                .map(|v| SpectrumPoint {
                    percentile: v.percentile(),
                    value_us: v.value_iterated_to(),
                    count: v.count_since_last_iteration(),
                })
                .collect()
        };
        HistReport {
            count: h.len(),
            min_us: if h.is_empty() { 0 } else { h.min() },
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            p9999_us: h.value_at_quantile(0.9999),
            max_us: h.max(),
            spectrum,
        }
    }
}

/// `p50/p99` of a histogram for the progress line, or `-` when empty.
pub fn p50_p99(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        format!(
            "{}/{}",
            fmt_us(h.value_at_quantile(0.5)),
            fmt_us(h.value_at_quantile(0.99))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectrum_covers_all_values() {
        let mut h = hist();
        for v in 1..=1000 {
            record(&mut h, v);
        }
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        let r = HistReport::of(&h);
        assert_eq!(r.count, 1002);
        assert_eq!(r.min_us, 1);
        assert!(r.max_us >= LATENCY_US_MAX);
        let counted: u64 = r.spectrum.iter().map(|p| p.count).sum();
        assert_eq!(counted, 1002);
        assert!(r.spectrum.last().unwrap().percentile >= 100.0 - 1e-9);
        let empty = HistReport::of(&hist());
        assert_eq!(empty.count, 0);
        assert!(empty.spectrum.is_empty());
    }

    #[test]
    fn counters_and_failures() {
        let s = Shared::default();
        s.add(C::opened, 3);
        s.fail("connect:ECONNREFUSED");
        s.fail("connect:ECONNREFUSED");
        s.fail("login_err:bad_token");
        assert_eq!(s.get(C::opened), 3);
        assert_eq!(s.failures_total(), 3);
        assert_eq!(s.failures()["connect:ECONNREFUSED"], 2);
        assert_eq!(s.counters()["opened"], 3);
    }

    #[test]
    fn human_units() {
        assert_eq!(fmt_us(850), "850us");
        assert_eq!(fmt_us(12_345), "12.3ms");
        assert_eq!(fmt_us(4_200_000), "4.20s");
    }
}
