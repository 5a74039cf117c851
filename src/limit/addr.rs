//! Per-source-address limits, kept by each shard for the connections it
//! accepts:
//!
//! - **failed logins:** more than `logins_failed_max` within a minute and
//!   the address is refused for `ban_ms`;
//! - **connection rate:** at most `conns_per_s_max` new connections per
//!   second from one address;
//! - **not logged in:** at most `pending_max` connections from one address
//!   that have not completed LOGIN.
//!
//! The table is bounded (`addrs_max` entries): an entry with nothing to
//! remember is dropped at once, and when the table is full, new addresses
//! are refused rather than tracked (a flood from many addresses must not
//! grow memory), which the caller counts and logs. Time comes in as
//! milliseconds on the caller's clock.

use std::collections::HashMap;
use std::net::IpAddr;

/// The limits, from the configuration. A 0 turns that limit off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrLimits {
    /// Failed logins per address per minute before it is refused.
    pub logins_failed_max: u32,
    /// How long a refused address stays refused, ms.
    pub ban_ms: u64,
    /// New connections per address per second.
    pub conns_per_s_max: u32,
    /// Connections per address that have not logged in yet.
    pub pending_max: u32,
    /// Addresses tracked at most.
    pub addrs_max: usize,
}

/// Why a connection from an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed logins recently; refused until the ban ends.
    Banned,
    /// Too many new connections this second.
    Rate,
    /// Too many connections from it not logged in yet.
    Pending,
    /// The table of addresses is full.
    Table,
}

impl Refusal {
    /// Its name in logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Banned => "banned after failed logins",
            Refusal::Rate => "connection rate",
            Refusal::Pending => "connections not logged in",
            Refusal::Table => "address table full",
        }
    }
}

const MINUTE_MS: u64 = 60_000;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// Failed logins in the minute that began at `fail_window_ms`.
    fails: u32,
    fail_window_ms: u64,
    /// Refused until then (0 = not refused).
    banned_until_ms: u64,
    /// Connections accepted in the second that began at `conn_window_ms`.
    conns: u32,
    conn_window_ms: u64,
    /// Connections open and not logged in.
    pending: u32,
}

impl Entry {
    /// Nothing left worth remembering at `now_ms`.
    fn is_idle(&self, now_ms: u64) -> bool {
        self.pending == 0
            && self.banned_until_ms <= now_ms
            && (self.fails == 0 || now_ms >= self.fail_window_ms + MINUTE_MS)
            && (self.conns == 0 || now_ms >= self.conn_window_ms + 1000)
    }
}

/// The per-address table of one shard.
#[derive(Debug)]
pub struct AddrTable {
    limits: AddrLimits,
    entries: HashMap<IpAddr, Entry>,
}

impl AddrTable {
    /// An empty table.
    pub fn new(limits: AddrLimits) -> AddrTable {
        AddrTable {
            limits,
            entries: HashMap::new(),
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A new connection from `ip`: counted as pending (not logged in) when
    /// taken, or refused.
    pub fn on_connect(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), Refusal> {
        let l = self.limits;
        if !self.entries.contains_key(&ip) && self.entries.len() >= l.addrs_max {
            self.sweep(now_ms);
            if self.entries.len() >= l.addrs_max {
                return Err(Refusal::Table);
            }
        }
        let e = self.entries.entry(ip).or_default();
        if e.banned_until_ms > now_ms {
            return Err(Refusal::Banned);
        }
        if now_ms >= e.conn_window_ms + 1000 {
            e.conn_window_ms = now_ms;
            e.conns = 0;
        }
        if l.conns_per_s_max > 0 && e.conns >= l.conns_per_s_max {
            return Err(Refusal::Rate);
        }
        if l.pending_max > 0 && e.pending >= l.pending_max {
            return Err(Refusal::Pending);
        }
        e.conns += 1;
        e.pending += 1;
        Ok(())
    }

    /// A connection from `ip` taken by [`on_connect`](Self::on_connect)
    /// logged in, or closed before it did.
    pub fn on_pending_end(&mut self, ip: IpAddr, now_ms: u64) {
        if let Some(e) = self.entries.get_mut(&ip) {
            e.pending = e.pending.saturating_sub(1);
            if e.is_idle(now_ms) {
                self.entries.remove(&ip);
            }
        }
    }

    /// A LOGIN from `ip` failed (bad or expired token). Returns true when
    /// this failure made the address banned.
    pub fn on_login_failed(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        let l = self.limits;
        if l.logins_failed_max == 0 {
            return false;
        }
        let e = self.entries.entry(ip).or_default();
        if now_ms >= e.fail_window_ms + MINUTE_MS {
            e.fail_window_ms = now_ms;
            e.fails = 0;
        }
        e.fails += 1;
        if e.fails > l.logins_failed_max && e.banned_until_ms <= now_ms {
            e.banned_until_ms = now_ms + l.ban_ms;
            return true;
        }
        false
    }

    /// Drops the entries with nothing left to remember; call now and then
    /// (e.g. once a second). Bounded by the table size.
    pub fn sweep(&mut self, now_ms: u64) {
        self.entries.retain(|_, e| !e.is_idle(now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: AddrLimits = AddrLimits {
        logins_failed_max: 3,
        ban_ms: 10_000,
        conns_per_s_max: 5,
        pending_max: 2,
        addrs_max: 4,
    };

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn failed_logins_ban_the_address_for_a_while() {
        let mut t = AddrTable::new(L);
        for _ in 0..3 {
            assert!(!t.on_login_failed(ip(1), 0));
        }
        assert!(t.on_login_failed(ip(1), 0), "the fourth failure bans");
        assert_eq!(t.on_connect(ip(1), 1), Err(Refusal::Banned));
        assert_eq!(t.on_connect(ip(2), 1), Ok(()), "others are not affected");
        assert_eq!(t.on_connect(ip(1), 10_000), Ok(()), "the ban ends");
    }

    #[test]
    fn failures_spread_over_minutes_do_not_ban() {
        let mut t = AddrTable::new(L);
        for minute in 0..10 {
            for _ in 0..3 {
                assert!(!t.on_login_failed(ip(1), minute * 60_000));
            }
        }
    }

    #[test]
    fn connection_rate_per_second() {
        let l = AddrLimits {
            pending_max: 0,
            ..L
        };
        let mut t = AddrTable::new(l);
        for _ in 0..5 {
            assert_eq!(t.on_connect(ip(1), 0), Ok(()));
        }
        assert_eq!(t.on_connect(ip(1), 999), Err(Refusal::Rate));
        assert_eq!(t.on_connect(ip(1), 1000), Ok(()));
    }

    #[test]
    fn pending_connections_per_address() {
        let mut t = AddrTable::new(L);
        assert_eq!(t.on_connect(ip(1), 0), Ok(()));
        assert_eq!(t.on_connect(ip(1), 0), Ok(()));
        assert_eq!(t.on_connect(ip(1), 0), Err(Refusal::Pending));
        t.on_pending_end(ip(1), 0);
        assert_eq!(t.on_connect(ip(1), 0), Ok(()));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_addresses() {
        let mut t = AddrTable::new(L);
        for n in 1..=4 {
            assert_eq!(t.on_connect(ip(n), 0), Ok(()));
        }
        assert_eq!(t.on_connect(ip(5), 0), Err(Refusal::Table));
        for n in 1..=4 {
            t.on_pending_end(ip(n), 2000);
        }
        assert!(t.is_empty(), "logged-in addresses with nothing to remember");
        assert_eq!(t.on_connect(ip(5), 2000), Ok(()));
    }

    #[test]
    fn zero_turns_each_limit_off() {
        let l = AddrLimits {
            logins_failed_max: 0,
            ban_ms: 0,
            conns_per_s_max: 0,
            pending_max: 0,
            addrs_max: 1000,
        };
        let mut t = AddrTable::new(l);
        for _ in 0..100 {
            assert_eq!(t.on_connect(ip(1), 0), Ok(()));
            assert!(!t.on_login_failed(ip(1), 0));
        }
    }
}
