//! Defences against abusive logged-in clients (docs/HARDENING.md):
//!
//! - **rates per user:** token buckets for SEND, for the frames that make
//!   receipts (READ, DELIVERED), for PING and for the presence frames
//!   (SUBSCRIBE, UNSUBSCRIBE, PRIVACY, TYPING). A frame over its rate is
//!   answered `ERROR(rate_limited)` and not taken; a connection refused more
//!   than `rate_refusals_max` times within `rate_refusals_window_ms` is
//!   closed with `BYE(rate_limited)`.
//! - **receipts only for what was delivered:** the last
//!   `delivered_recent_max` messages sent as DELIVER to each session (one
//!   device's connection; server id and sender). A READ is relayed only for
//!   one of them, from that connection (and only to the sender named); a
//!   DELIVERED removes a message
//!   only if it is in the user's queue and was already sent to this
//!   connection. Anything else is `ERROR(unknown_message)`: nothing is
//!   relayed or removed.
//!
//! Both tables hold entries only for users who did something recently, so
//! an idle connection pays nothing here: a user's buckets exist only after
//! it sent a limited frame, and are dropped once full again (at its idle
//! timer, or when the table has doubled since the last sweep); its
//! delivered messages exist only after a DELIVER, and are dropped when its
//! connection closes.

use std::collections::VecDeque;

// foldhash, not std's SipHash: looked up for every frame (see users.rs).
use foldhash::HashMap;

use crate::config::Config;
use crate::io::ConnId;
use crate::limit::bucket::{Bucket, Rate};
use crate::proto::{ByeReason, ErrorCode, Frame, GroupFrame};

use super::{Env, Flow, Now, Sessions};

/// Entries a table holds before its first sweep.
const SWEEP_MIN: usize = 1024;

/// What a frame is counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Send,
    Receipt,
    Ping,
    /// SUBSCRIBE, UNSUBSCRIBE, PRIVACY, TYPING (protocol v2).
    Presence,
}

/// The rate buckets of one user, and its recent refusals (40 bytes).
#[derive(Clone, Copy, Debug)]
struct Rates {
    send: Bucket,
    receipt: Bucket,
    ping: Bucket,
    presence: Bucket,
    /// Refusals in the window that began at `window_ms`.
    refusals: u32,
    /// When the refusal window began, ms (wrapping).
    window_ms: u32,
}

/// The last messages delivered to one session: (server id, sender),
/// oldest first, at most `delivered_recent_max`.
#[derive(Debug, Default)]
struct Recent(VecDeque<(u64, u64)>);

/// The guard's configuration and tables.
pub(super) struct Guard {
    send: Rate,
    receipt: Rate,
    ping: Rate,
    presence: Rate,
    refusals_max: u32,
    window_ms: u64,
    recent_max: usize,
    rates: HashMap<u64, Rates>,
    /// Size of `rates` after its last sweep.
    rates_swept: usize,
    /// Per connection, not per user: a device may answer only for what
    /// it was sent itself.
    recent: HashMap<ConnId, Recent>,
}

/// What to do with a frame that may be over its rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Take it.
    Pass,
    /// Refuse it with `ERROR(rate_limited)`.
    Refuse,
    /// Refuse it and close the connection: a repeat offender.
    Close,
}

impl Guard {
    pub(super) fn new(c: &Config) -> Guard {
        Guard {
            send: Rate {
                per_s: c.sends_per_s_max,
                burst: c.sends_burst_max,
            },
            receipt: Rate {
                per_s: c.receipts_per_s_max,
                burst: c.receipts_burst_max,
            },
            ping: Rate {
                per_s: c.pings_per_s_max,
                burst: c.pings_burst_max,
            },
            presence: Rate {
                per_s: c.presence_frames_per_s_max,
                burst: c.presence_frames_burst_max,
            },
            refusals_max: c.rate_refusals_max,
            window_ms: c.rate_refusals_window_ms,
            recent_max: c.delivered_recent_max,
            rates: HashMap::default(),
            rates_swept: 0,
            recent: HashMap::default(),
        }
    }

    /// Counts a `kind` frame of `user` at `now_ms` against its rate.
    pub(super) fn admit(&mut self, user: u64, kind: Kind, now_ms: u64) -> Verdict {
        let rate = self.rate(kind);
        if !rate.is_limited() {
            return Verdict::Pass;
        }
        if self.rates.len() >= (2 * self.rates_swept).max(SWEEP_MIN) {
            self.sweep(now_ms);
        }
        let (send, receipt, ping, presence) = (self.send, self.receipt, self.ping, self.presence);
        let r = self.rates.entry(user).or_insert_with(|| Rates {
            send: send.full(now_ms),
            receipt: receipt.full(now_ms),
            ping: ping.full(now_ms),
            presence: presence.full(now_ms),
            refusals: 0,
            window_ms: now_ms as u32,
        });
        let bucket = match kind {
            Kind::Send => &mut r.send,
            Kind::Receipt => &mut r.receipt,
            Kind::Ping => &mut r.ping,
            Kind::Presence => &mut r.presence,
        };
        if bucket.take(rate, now_ms) {
            return Verdict::Pass;
        }
        if u64::from((now_ms as u32).wrapping_sub(r.window_ms)) >= self.window_ms {
            r.window_ms = now_ms as u32;
            r.refusals = 0;
        }
        r.refusals = r.refusals.saturating_add(1);
        if self.refusals_max > 0 && r.refusals > self.refusals_max {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }

    fn rate(&self, kind: Kind) -> Rate {
        match kind {
            Kind::Send => self.send,
            Kind::Receipt => self.receipt,
            Kind::Ping => self.ping,
            Kind::Presence => self.presence,
        }
    }

    /// Forgets `user`'s buckets if they are full again (it has been quiet).
    pub(super) fn settle(&mut self, user: u64, now_ms: u64) {
        let quiet = self.quiet(now_ms);
        if self.rates.get_mut(&user).is_some_and(quiet) {
            self.rates.remove(&user);
            crate::memory::shrink_map(&mut self.rates);
        }
    }

    /// Whether an entry is as good as none at `now_ms`: every bucket full,
    /// and no refusal in the current window.
    fn quiet(&self, now_ms: u64) -> impl Fn(&mut Rates) -> bool {
        let (send, receipt, ping, window_ms) = (self.send, self.receipt, self.ping, self.window_ms);
        let presence = self.presence;
        move |r| {
            let window_over = r.refusals == 0
                || u64::from((now_ms as u32).wrapping_sub(r.window_ms)) >= window_ms;
            window_over
                && r.send.is_full(send, now_ms)
                && r.receipt.is_full(receipt, now_ms)
                && r.ping.is_full(ping, now_ms)
                && r.presence.is_full(presence, now_ms)
        }
    }

    fn sweep(&mut self, now_ms: u64) {
        let quiet = self.quiet(now_ms);
        self.rates.retain(|_, r| !quiet(r));
        crate::memory::shrink_map(&mut self.rates);
        self.rates_swept = self.rates.len();
    }

    /// A DELIVER of `server_id` from `from` was written to `conn`.
    pub(super) fn delivered(&mut self, conn: ConnId, server_id: u64, from: u64) {
        if self.recent_max == 0 {
            return;
        }
        let recent = &mut self.recent.entry(conn).or_default().0;
        if recent.len() >= self.recent_max {
            recent.pop_front();
        }
        recent.push_back((server_id, from));
    }

    /// Whether `server_id` (from `from`, if given) is among the last
    /// messages delivered to the session on `conn`. Always true with the
    /// check off (`delivered_recent_max = 0`).
    pub(super) fn was_delivered(&self, conn: ConnId, server_id: u64, from: Option<u64>) -> bool {
        if self.recent_max == 0 {
            return true;
        }
        self.recent.get(&conn).is_some_and(|r| {
            r.0.iter()
                .rev()
                .any(|&(id, f)| id == server_id && from.is_none_or(|from| from == f))
        })
    }

    /// The session on `conn` ended: what was delivered to it is forgotten
    /// (the slot may serve another user next).
    pub(super) fn forget(&mut self, conn: ConnId) {
        self.recent.remove(&conn);
        crate::memory::shrink_map(&mut self.recent);
    }

    /// Users with rate buckets, and users with delivered messages
    /// remembered (for tests and measurements).
    pub(super) fn sizes(&self) -> (usize, usize) {
        (self.rates.len(), self.recent.len())
    }

    /// Forgets everything (after a crash).
    pub(super) fn clear(&mut self) {
        self.rates.clear();
        self.rates_swept = 0;
        self.recent.clear();
    }
}

impl Sessions {
    /// Applies the per-user rates to a frame of logged-in `user` on `conn`:
    /// `None` to go on with it, or the flow after refusing it.
    pub(super) fn limit(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        user: u64,
        frame: &Frame<'_>,
    ) -> Option<Flow> {
        let (kind, client_id) = match *frame {
            // A SEND that will wait for ring space comes back later: it is
            // counted then, not at every try.
            Frame::Send { to, .. } if self.send_blocks(env, to) => return None,
            Frame::Send { client_id, .. } => (Kind::Send, client_id),
            Frame::Read { .. } | Frame::Delivered { .. } => (Kind::Receipt, 0),
            Frame::Ping { .. } => (Kind::Ping, 0),
            Frame::Subscribe { .. }
            | Frame::Unsubscribe { .. }
            | Frame::Privacy { .. }
            | Frame::Typing { .. } => (Kind::Presence, 0),
            // Group requests and GROUP_SEND count as SENDs (GROUP_READ as a
            // receipt), once: one that will wait for ring space is counted
            // when it goes.
            Frame::Group(ref g) if self.group_blocks(env, g) => return None,
            Frame::Group(GroupFrame::Read { .. }) => (Kind::Receipt, 0),
            Frame::Group(
                GroupFrame::Create { req }
                | GroupFrame::Add { req, .. }
                | GroupFrame::Remove { req, .. }
                | GroupFrame::Leave { req, .. }
                | GroupFrame::Admin { req, .. }
                | GroupFrame::Members { req, .. },
            ) => (Kind::Send, req),
            Frame::Group(GroupFrame::Send { client_id, .. }) => (Kind::Send, client_id),
            _ => return None,
        };
        let verdict = self.guard.admit(user, kind, now.unix_ms);
        if verdict == Verdict::Pass {
            return None;
        }
        let (counter, text) = match kind {
            Kind::Send => (&self.stats.limited_sends, "too many SENDs, slow down"),
            Kind::Receipt => (
                &self.stats.limited_receipts,
                "too many READs and DELIVEREDs, slow down",
            ),
            Kind::Ping => (&self.stats.limited_pings, "too many PINGs, slow down"),
            Kind::Presence => (
                &self.stats.limited_presence,
                "too many SUBSCRIBE, UNSUBSCRIBE, PRIVACY and TYPING frames, slow down",
            ),
        };
        counter.inc();
        self.write(
            conn,
            &Frame::Error {
                code: ErrorCode::RateLimited,
                client_id,
                text,
            },
        );
        if verdict == Verdict::Close {
            self.stats.limited_closes.inc();
            log::info!(
                "shard {}: closing user {user}: over its rate limits too often",
                self.id
            );
            self.bye(now, conn, ByeReason::RateLimited);
            return Some(Flow::Stop);
        }
        Some(Flow::Next)
    }

    /// Refuses a READ or DELIVERED that names a message not delivered to
    /// this connection.
    pub(super) fn unknown_message(&mut self, conn: ConnId, what: &str) {
        self.stats.unknown_message_refusals.inc();
        let text = format!("{what} names a message not delivered to you in this session");
        self.write(
            conn,
            &Frame::Error {
                code: ErrorCode::UnknownMessage,
                client_id: 0,
                text: &text,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(tweak: impl FnOnce(&mut Config)) -> Guard {
        let mut c = Config::default();
        tweak(&mut c);
        Guard::new(&c)
    }

    #[test]
    fn rates_are_per_user_and_kind() {
        let mut g = guard(|c| {
            c.sends_per_s_max = 10;
            c.sends_burst_max = 2;
            c.rate_refusals_max = 0;
        });
        assert_eq!(g.admit(1, Kind::Send, 0), Verdict::Pass);
        assert_eq!(g.admit(1, Kind::Send, 0), Verdict::Pass);
        assert_eq!(g.admit(1, Kind::Send, 0), Verdict::Refuse);
        assert_eq!(g.admit(2, Kind::Send, 0), Verdict::Pass, "another user");
        assert_eq!(g.admit(1, Kind::Ping, 0), Verdict::Pass, "another kind");
        assert_eq!(g.admit(1, Kind::Send, 100), Verdict::Pass, "refilled");
        for _ in 0..1000 {
            assert_eq!(g.admit(1, Kind::Send, 100), Verdict::Refuse, "never closed");
        }
    }

    #[test]
    fn repeat_offenders_are_closed_within_the_window_only() {
        let mut g = guard(|c| {
            c.pings_per_s_max = 1;
            c.pings_burst_max = 1;
            c.rate_refusals_max = 3;
            c.rate_refusals_window_ms = 1000;
        });
        assert_eq!(g.admit(1, Kind::Ping, 0), Verdict::Pass);
        for _ in 0..3 {
            assert_eq!(g.admit(1, Kind::Ping, 0), Verdict::Refuse);
        }
        // A new window starts the count again.
        assert_eq!(g.admit(1, Kind::Ping, 1000), Verdict::Pass);
        for _ in 0..3 {
            assert_eq!(g.admit(1, Kind::Ping, 1000), Verdict::Refuse);
        }
        assert_eq!(g.admit(1, Kind::Ping, 1000), Verdict::Close);
    }

    #[test]
    fn zero_rates_keep_no_state() {
        let mut g = guard(|c| {
            c.sends_per_s_max = 0;
            c.receipts_per_s_max = 0;
            c.pings_per_s_max = 0;
        });
        for kind in [Kind::Send, Kind::Receipt, Kind::Ping] {
            assert!((0..10_000).all(|_| g.admit(1, kind, 0) == Verdict::Pass));
        }
        assert_eq!(g.sizes(), (0, 0));
    }

    #[test]
    fn quiet_users_are_forgotten() {
        let mut g = guard(|c| {
            c.sends_per_s_max = 10;
            c.sends_burst_max = 10;
        });
        assert_eq!(g.admit(1, Kind::Send, 0), Verdict::Pass);
        g.settle(1, 0);
        assert_eq!(g.sizes().0, 1, "a token is still missing");
        g.settle(1, 100);
        assert_eq!(g.sizes().0, 0);
        // The table is swept as it doubles: bounded by the busy users.
        for user in 0..(10 * SWEEP_MIN as u64) {
            g.admit(user, Kind::Send, user * 1000);
        }
        assert!(g.sizes().0 <= 2 * SWEEP_MIN, "{}", g.sizes().0);
    }

    #[test]
    fn delivered_messages_are_remembered_bounded_and_per_connection() {
        let (c1, c2) = (ConnId(1), ConnId(2));
        let mut g = guard(|c| c.delivered_recent_max = 3);
        assert!(!g.was_delivered(c1, 10, Some(7)));
        for id in 10..15 {
            g.delivered(c1, id, 7);
        }
        assert!(
            !g.was_delivered(c1, 11, Some(7)),
            "pushed out by newer ones"
        );
        assert!(g.was_delivered(c1, 12, Some(7)));
        assert!(g.was_delivered(c1, 14, None));
        assert!(!g.was_delivered(c1, 14, Some(8)), "another sender");
        assert!(
            !g.was_delivered(c2, 14, Some(7)),
            "another connection (another device, or another user)"
        );
        g.forget(c1);
        assert!(!g.was_delivered(c1, 14, Some(7)));
        assert_eq!(g.sizes(), (0, 0));
    }

    #[test]
    fn zero_recent_turns_the_check_off() {
        let mut g = guard(|c| c.delivered_recent_max = 0);
        g.delivered(ConnId(1), 10, 7);
        assert!(g.was_delivered(ConnId(1), 99, Some(3)));
        assert_eq!(g.sizes(), (0, 0));
    }

    #[test]
    fn rates_entry_is_40_bytes() {
        assert_eq!(std::mem::size_of::<Rates>(), 40);
    }
}
