//! Every message's fate: sent, acknowledged, delivered (how often, in what
//! order), receipted. The loss, duplicate and order counts of the report
//! come from here.
//!
//! A message not delivered when the drain window closes is not lost yet: it
//! may still wait in its recipient's queue on the server. It is marked
//! [`OVERDUE`], its recipient logs in again and drains its queue to empty
//! (the final drain, `run.rs`), and only then does the tally call it lost.
//!
//! Message `n` of a run is the n-th entry of the send schedule; its sender
//! and recipient are functions of `n` (see `plan`), and its body carries `n`,
//! so no per-message table is needed beyond two bytes of state here. The
//! ledger is shared by all workers: the sender's worker marks sent and ACKed,
//! the recipient's worker counts deliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// The send was attempted (a SEND frame went out).
pub const SENT: u8 = 1 << 0;
/// The server ACKed it: it took responsibility.
pub const ACKED: u8 = 1 << 1;
/// The server refused it with ERROR (e.g. `queue_full`); it is not owed.
pub const REFUSED: u8 = 1 << 2;
/// A delivered RECEIPT came back to the sender.
pub const RECEIPTED: u8 = 1 << 3;
/// It was not sent because the sender was not logged in at its time.
pub const SKIPPED: u8 = 1 << 4;
/// ACKed but not delivered when the drain window closed (set by
/// [`Ledger::mark_overdue`]); its recipient is checked in the final drain.
pub const OVERDUE: u8 = 1 << 5;

/// Per-message state, `total` messages.
pub struct Ledger {
    /// Bit set of `SENT | ACKED | ...` per message.
    state: Box<[AtomicU8]>,
    /// Deliveries seen per message, saturating at 255.
    deliveries: Box<[AtomicU8]>,
    /// The server id of each message's first delivery (0: none yet), for
    /// the app's duplicate filter.
    server_ids: Box<[AtomicU64]>,
}

/// What a delivery was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The first delivery of this message.
    First,
    /// A repeat: it was delivered before.
    Duplicate,
    /// `n` is outside the schedule (a corrupt or foreign body).
    Unknown,
}

/// The outcome of a run, from the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Messages in the schedule.
    pub scheduled: u64,
    /// SEND frames written.
    pub sent: u64,
    /// Not sent: the sender was down at the message's time.
    pub skipped: u64,
    /// ACKed by the server.
    pub acked: u64,
    /// Refused by the server (ERROR in answer to the SEND).
    pub refused: u64,
    /// Sent but neither ACKed nor refused by the end.
    pub unanswered: u64,
    /// Delivered at least once (within the drain window or in the final drain).
    pub delivered: u64,
    /// Of `delivered`: overdue when the drain window closed, delivered only in
    /// the final drain (late, not lost).
    pub late: u64,
    /// ACKed and never delivered although its recipient logged in again after
    /// the ACK and drained its queue to empty: lost.
    pub lost: u64,
    /// ACKed and never delivered, but its recipient's queue was not drained
    /// to empty (the final drain timed out, failed, or was skipped): not
    /// delivered within the drain window, fate unknown, not counted as lost.
    pub unverified: u64,
    /// Deliveries beyond the first of a message.
    pub duplicates: u64,
    /// Delivered without having been ACKed (allowed: the ACK may be in flight).
    pub delivered_unacked: u64,
    /// ACKed messages whose delivered RECEIPT came back.
    pub receipted: u64,
}

impl Ledger {
    /// A ledger for messages `0..total`.
    pub fn new(total: u64) -> Ledger {
        let n = usize::try_from(total).expect("message count fits in memory");
        Ledger {
            state: (0..n).map(|_| AtomicU8::new(0)).collect(),
            deliveries: (0..n).map(|_| AtomicU8::new(0)).collect(),
            server_ids: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Messages in the ledger.
    pub fn len(&self) -> u64 {
        self.state.len() as u64
    }

    /// Sets `flag` on message `n`; returns whether it was already set.
    pub fn mark(&self, n: u64, flag: u8) -> bool {
        match self.state.get(n as usize) {
            Some(s) => s.fetch_or(flag, Ordering::Relaxed) & flag != 0,
            None => false,
        }
    }

    /// The flags of message `n` (0 when out of range).
    pub fn flags(&self, n: u64) -> u8 {
        self.state
            .get(n as usize)
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Counts one delivery of message `n`.
    pub fn delivered(&self, n: u64) -> Delivery {
        let Some(d) = self.deliveries.get(n as usize) else {
            return Delivery::Unknown;
        };
        let before = d
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(1))
            })
            .expect("closure always returns Some");
        if before == 0 {
            Delivery::First
        } else {
            Delivery::Duplicate
        }
    }

    /// Records `server_id` as message `n`'s if it is the first one seen;
    /// returns whether `server_id` is the first one (an app that filters
    /// by server id drops the repeat).
    pub fn same_server_id(&self, n: u64, server_id: u64) -> bool {
        let Some(s) = self.server_ids.get(n as usize) else {
            return false;
        };
        match s.compare_exchange(0, server_id, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => true,
            Err(first) => first == server_id,
        }
    }

    /// Deliveries of message `n` so far.
    pub fn deliveries(&self, n: u64) -> u8 {
        self.deliveries
            .get(n as usize)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Marks every message that is ACKed and not yet delivered [`OVERDUE`]
    /// (called when the drain window closes), calls `each` with its number
    /// and returns how many there are. Messages whose ACK has not arrived yet
    /// are not marked: their recipient may log in again before the server
    /// queued them, so the final drain cannot judge them.
    pub fn mark_overdue(&self, mut each: impl FnMut(u64)) -> u64 {
        let mut count = 0;
        for n in 0..self.len() {
            if self.flags(n) & ACKED != 0 && self.deliveries(n) == 0 {
                self.mark(n, OVERDUE);
                each(n);
                count += 1;
            }
        }
        count
    }

    /// Counts every message's fate. `recipient_drained(n)` says whether the
    /// recipient of message `n` logged in again after the drain window and
    /// received its whole queue (the final drain), which decides whether an
    /// overdue message that never arrived is lost or unverified.
    pub fn tally(&self, mut recipient_drained: impl FnMut(u64) -> bool) -> Tally {
        let mut t = Tally {
            scheduled: self.len(),
            ..Tally::default()
        };
        for n in 0..self.len() {
            let f = self.flags(n);
            let d = self.deliveries(n) as u64;
            if f & SENT != 0 {
                t.sent += 1;
            }
            if f & SKIPPED != 0 {
                t.skipped += 1;
            }
            if f & ACKED != 0 {
                t.acked += 1;
            }
            if f & REFUSED != 0 {
                t.refused += 1;
            }
            if f & SENT != 0 && f & (ACKED | REFUSED) == 0 {
                t.unanswered += 1;
            }
            if f & RECEIPTED != 0 {
                t.receipted += 1;
            }
            if d > 0 {
                t.delivered += 1;
                t.duplicates += d - 1;
                if f & ACKED == 0 {
                    t.delivered_unacked += 1;
                }
                if f & OVERDUE != 0 {
                    t.late += 1;
                }
            } else if f & ACKED != 0 {
                if f & OVERDUE != 0 && recipient_drained(n) {
                    t.lost += 1;
                } else {
                    t.unverified += 1;
                }
            }
        }
        t
    }
}

impl Tally {
    /// ACKed messages not delivered within the drain window: late ones and
    /// unverified ones (not the lost ones).
    pub fn not_delivered_within_drain(&self) -> u64 {
        self.late + self.unverified
    }
}

/// Checks that messages from one sender reach one recipient in the order they
/// were sent (the server's ordering guarantee). Message numbers of one sender
/// increase with send time, so a delivery with a smaller `n` than the last one
/// seen on that (recipient, sender) pair is out of order. Duplicates must be
/// filtered out before (a redelivery after a reconnect legitimately repeats an
/// old `n`).
#[derive(Default)]
pub struct OrderCheck {
    /// Highest `n` delivered per (recipient, sender).
    last: HashMap<(u64, u64), u64>,
    /// Deliveries that came after a later message of the same pair.
    pub out_of_order: u64,
}

impl OrderCheck {
    /// Records first delivery of `n` from `sender` to `recipient`; returns
    /// false if it is out of order.
    pub fn observe(&mut self, recipient: u64, sender: u64, n: u64) -> bool {
        match self.last.entry((recipient, sender)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(n);
                true
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if n > *o.get() {
                    o.insert(n);
                    true
                } else {
                    self.out_of_order += 1;
                    false
                }
            }
        }
    }

    /// Pairs tracked.
    pub fn pairs(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_run_has_no_loss() {
        let l = Ledger::new(3);
        for n in 0..3 {
            l.mark(n, SENT);
            l.mark(n, ACKED);
            assert_eq!(l.delivered(n), Delivery::First);
            l.mark(n, RECEIPTED);
        }
        let t = l.tally(|_| true);
        assert_eq!(
            t,
            Tally {
                scheduled: 3,
                sent: 3,
                acked: 3,
                delivered: 3,
                receipted: 3,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn loss_late_unverified_and_duplicates_are_told_apart() {
        let l = Ledger::new(8);
        for n in 0..7 {
            l.mark(n, SENT);
        }
        l.mark(7, SKIPPED);
        // 0: acked, delivered twice within the window -> one duplicate.
        l.mark(0, ACKED);
        assert_eq!(l.delivered(0), Delivery::First);
        assert_eq!(l.delivered(0), Delivery::Duplicate);
        // 1: acked, never delivered, recipient drained its queue -> lost.
        l.mark(1, ACKED);
        // 2: acked, never delivered, recipient's final drain incomplete -> unverified.
        l.mark(2, ACKED);
        // 3: refused by the server -> not owed.
        l.mark(3, REFUSED);
        // 4: sent, no answer at all; delivered anyway (ACK still in flight).
        assert_eq!(l.delivered(4), Delivery::First);
        // 5: acked, delivered only after the window closed -> late.
        l.mark(5, ACKED);
        // The drain window closes here.
        let mut overdue = Vec::new();
        assert_eq!(l.mark_overdue(|n| overdue.push(n)), 3);
        assert_eq!(overdue, [1, 2, 5]);
        assert_eq!(l.delivered(5), Delivery::First);
        // 6: ACKed only after the window closed, never delivered: its
        // recipient may have drained before the server queued it, so it is
        // unverified even when that recipient drained.
        l.mark(6, ACKED);
        let t = l.tally(|n| n != 2);
        assert_eq!(t.scheduled, 8);
        assert_eq!(t.sent, 7);
        assert_eq!(t.skipped, 1);
        assert_eq!(t.acked, 5);
        assert_eq!(t.refused, 1);
        assert_eq!(t.unanswered, 1);
        assert_eq!(t.delivered, 3);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.late, 1);
        assert_eq!(t.lost, 1);
        assert_eq!(t.unverified, 2);
        assert_eq!(t.not_delivered_within_drain(), 3);
        assert_eq!(t.delivered_unacked, 1);
    }

    #[test]
    fn undelivered_without_a_final_drain_is_never_lost() {
        // The window closed with a message missing and nobody drained (e.g.
        // --final-drain 0): not delivered within the window, not lost.
        let l = Ledger::new(2);
        for n in 0..2 {
            l.mark(n, SENT);
            l.mark(n, ACKED);
        }
        assert_eq!(l.delivered(0), Delivery::First);
        assert_eq!(l.mark_overdue(|n| assert_eq!(n, 1)), 1);
        let t = l.tally(|_| false);
        assert_eq!((t.lost, t.unverified, t.late), (0, 1, 0));
        // Never marked overdue (the run was aborted before the window
        // closed): unverified too, whatever the drained answer.
        let l = Ledger::new(1);
        l.mark(0, SENT);
        l.mark(0, ACKED);
        let t = l.tally(|_| true);
        assert_eq!((t.lost, t.unverified), (0, 1));
    }

    #[test]
    fn out_of_range_is_unknown_not_a_panic() {
        let l = Ledger::new(1);
        assert_eq!(l.delivered(1), Delivery::Unknown);
        assert_eq!(l.delivered(u64::MAX), Delivery::Unknown);
        assert!(!l.mark(7, SENT));
        assert_eq!(l.flags(7), 0);
        let empty = Ledger::new(0);
        assert_eq!(empty.tally(|_| true), Tally::default());
    }

    #[test]
    fn deliveries_saturate() {
        let l = Ledger::new(1);
        for _ in 0..300 {
            l.delivered(0);
        }
        assert_eq!(l.deliveries(0), 255);
        assert_eq!(l.tally(|_| true).duplicates, 254);
    }

    #[test]
    fn mark_reports_repeat() {
        let l = Ledger::new(1);
        assert!(!l.mark(0, ACKED));
        assert!(l.mark(0, ACKED));
    }

    #[test]
    fn order_per_pair() {
        let mut o = OrderCheck::default();
        assert!(o.observe(10, 1, 5));
        assert!(o.observe(10, 1, 7));
        // Another sender's older message is not a violation.
        assert!(o.observe(10, 2, 3));
        // Another recipient neither.
        assert!(o.observe(11, 1, 1));
        assert!(!o.observe(10, 1, 6));
        assert_eq!(o.out_of_order, 1);
        // After a violation the pair keeps its highest mark.
        assert!(o.observe(10, 1, 8));
        assert_eq!(o.pairs(), 3);
    }
}
