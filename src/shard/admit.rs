//! Admission of new connections by source address, and the cap on
//! connections not logged in yet (docs/HARDENING.md).
//!
//! Each shard keeps its own [`AddrTable`] for the connections it accepts
//! (failed logins, connections per second, connections not logged in per
//! address), and its share of `pending_max`. At that cap the connection
//! that has waited longest for its LOGIN is closed to make room: a real
//! client logs in within a round trip of connecting, so a swarm of silent
//! connections (slowloris) only ever pushes out its own members.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use crate::config::Config;
use crate::io::ConnId;
use crate::limit::addr::{AddrTable, Refusal};

/// Connections of this shard that have not logged in yet, and their
/// addresses' state.
pub(super) struct Admission {
    table: AddrTable,
    /// Connection -> (its place in `order`, source address if known).
    pending: HashMap<ConnId, (u64, Option<IpAddr>)>,
    /// Pending connections, oldest first. Holds stale entries (logged in
    /// or closed since) until they reach the front or a compaction.
    order: VecDeque<(ConnId, u64)>,
    next_seq: u64,
    /// This shard's share of `pending_max`; 0 = no cap.
    pending_max: usize,
}

impl Admission {
    pub(super) fn new(config: &Config, shards: usize) -> Admission {
        Admission {
            table: AddrTable::new(config.addr_limits()),
            pending: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            pending_max: config.pending_max.div_ceil(shards),
        }
    }

    /// A connection from `ip` is being accepted: its address may be
    /// refused. Taken, it counts as pending at its address until
    /// [`Admission::end`].
    pub(super) fn check(&mut self, ip: Option<IpAddr>, now_ms: u64) -> Result<(), Refusal> {
        match ip {
            Some(ip) => self.table.on_connect(ip, now_ms),
            None => Ok(()),
        }
    }

    /// A connection taken by [`Admission::check`] was not opened after all.
    pub(super) fn cancel(&mut self, ip: Option<IpAddr>, now_ms: u64) {
        if let Some(ip) = ip {
            self.table.on_pending_end(ip, now_ms);
        }
    }

    /// The oldest connection not logged in, to close when the shard's
    /// share of `pending_max` is reached; it is no longer pending.
    pub(super) fn evict(&mut self, now_ms: u64) -> Option<ConnId> {
        if self.pending_max == 0 || self.pending.len() < self.pending_max {
            return None;
        }
        while let Some((conn, seq)) = self.order.pop_front() {
            if self.pending.get(&conn).is_some_and(|&(s, _)| s == seq) {
                self.end(conn, now_ms);
                return Some(conn);
            }
        }
        None
    }

    /// `conn`, from `ip` and taken by [`Admission::check`], waits for its
    /// LOGIN.
    pub(super) fn pending(&mut self, conn: ConnId, ip: Option<IpAddr>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(conn, (seq, ip));
        self.order.push_back((conn, seq));
        // Stale entries come from connections that logged in or closed;
        // drop them once they outnumber the live ones.
        if self.order.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.order
                .retain(|(c, s)| pending.get(c).is_some_and(|&(seq, _)| seq == *s));
            crate::memory::shrink_deque(&mut self.order);
        }
    }

    /// `conn` logged in, moved to another shard, or closed: it is no longer
    /// pending (nothing if it was not).
    pub(super) fn end(&mut self, conn: ConnId, now_ms: u64) {
        if let Some((_, Some(ip))) = self.pending.remove(&conn) {
            self.table.on_pending_end(ip, now_ms);
        }
        crate::memory::shrink_map(&mut self.pending);
    }

    /// A LOGIN on `conn` failed: counted against its address. Returns the
    /// address if this failure got it banned.
    pub(super) fn login_failed(&mut self, conn: ConnId, now_ms: u64) -> Option<IpAddr> {
        let &(_, ip) = self.pending.get(&conn)?;
        let ip = ip?;
        self.table.on_login_failed(ip, now_ms).then_some(ip)
    }

    /// Connections pending now.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Addresses tracked now.
    pub(super) fn addrs(&self) -> usize {
        self.table.len()
    }

    /// Forgets addresses with nothing left to remember (once a second).
    pub(super) fn sweep(&mut self, now_ms: u64) {
        self.table.sweep(now_ms);
    }

    /// Forgets every connection (after a crash); bans and rates stay.
    pub(super) fn clear(&mut self, now_ms: u64) {
        for (_, (_, ip)) in self.pending.drain() {
            if let Some(ip) = ip {
                self.table.on_pending_end(ip, now_ms);
            }
        }
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, n]))
    }

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let config = Config {
            pending_max: 4,
            ..Config::default()
        };
        let mut a = Admission::new(&config, 2); // 2 per shard
        assert_eq!(a.evict(0), None);
        a.pending(ConnId(1), ip(1));
        a.pending(ConnId(2), None);
        a.end(ConnId(1), 0); // logged in
        assert_eq!(a.evict(0), None, "one pending, room for two");
        a.pending(ConnId(3), ip(2));
        assert_eq!(a.evict(0), Some(ConnId(2)), "the oldest still pending");
        assert_eq!(a.len(), 1);
        // A reused id is not mistaken for its stale entry.
        a.pending(ConnId(1), ip(1));
        a.end(ConnId(3), 0);
        a.pending(ConnId(3), ip(3));
        assert_eq!(a.evict(0), Some(ConnId(1)));
    }

    #[test]
    fn stale_entries_are_bounded() {
        let mut a = Admission::new(&Config::default(), 1);
        for i in 0..10_000 {
            a.pending(ConnId(i % 7), ip(1));
            a.end(ConnId(i % 7), 0);
        }
        assert!(a.order.len() <= 64 + 1, "{}", a.order.len());
        assert_eq!(a.addrs(), 0, "nothing left to remember at the address");
    }

    #[test]
    fn failed_logins_count_against_the_address_of_the_connection() {
        let config = Config {
            addr_logins_failed_max: 1,
            ..Config::default()
        };
        let mut a = Admission::new(&config, 1);
        for c in 0..2 {
            assert_eq!(a.check(ip(9), 0), Ok(()));
            a.pending(ConnId(c), ip(9));
        }
        assert_eq!(a.login_failed(ConnId(0), 0), None);
        assert_eq!(a.login_failed(ConnId(1), 0), ip(9), "the second one bans");
        assert_eq!(a.check(ip(9), 1), Err(Refusal::Banned));
        assert_eq!(a.check(ip(8), 1), Ok(()));
        assert_eq!(
            a.check(None, 1),
            Ok(()),
            "unknown addresses are not tracked"
        );
    }
}
