//! The receipt outbox (issue 11, "receipts are durable"): a DELIVERED or
//! READ is taken on the recipient's (or member's) home shard, and its
//! receipt goes to the sender's home shard over a ring, which is memory.
//! So the taking shard keeps each receipt in its own device log (an
//! `Outbox` record, staged with the removal and written before the
//! iteration's message batch) until the sender's shard says it has it
//! ([`Msg::ReceiptsTaken`], sent once the receipt is written to every
//! online device of the sender or kept in that shard's device log); then
//! an `OutboxDone` record drops it. What is still there after a restart
//! goes again; a shard that restarts after a crash asks every other shard
//! to send again what its users may have lost ([`Msg::ReceiptsResend`]).
//! The sender's shard drops a copy it already keeps (same message, kind
//! and peer); one written to a device online again is a duplicate, as a
//! redelivered message is (at-least-once, documented).
//!
//! Cost: one `Outbox` record (50 bytes) and one `OutboxDone` record (17
//! bytes) in the device log per receipt, and a 56-byte entry in the
//! [`Outbox`] queue while it is on its way; nothing at all while no
//! receipt is: an idle shard writes nothing.
//!
//! In a cluster JetStream is the outbox: a receipt is a record in the
//! sender's partition's stream, and the sender's node acks it only once it
//! is written to the sender's online devices or its user's state (which
//! keeps it for the offline ones) is stored in JetStream
//! ([`BridgeReceipt`]; docs/CLUSTER.md, "Per-user state across nodes").

use std::collections::{BTreeMap, VecDeque};

use crate::proto::ReceiptKind;
use crate::shard::{home_shard, Msg};
use crate::store::devices::{Out, Record};

use super::Sessions;

/// The receipts of the outbox by number. Numbers only grow, so they sit
/// in a queue in number order; an answered one leaves a hole until the
/// holes before it are gone (or, behind one that waits long, a sweep
/// drops them). Its capacity stays between bursts: a busy shard
/// allocates nothing per receipt (a `BTreeMap` allocated and freed its
/// nodes as it filled and emptied with every batch).
#[derive(Default)]
pub(super) struct Outbox {
    /// (number, the receipt or `None` once answered), numbers increasing.
    entries: VecDeque<(u64, Option<Out>)>,
    /// The entries not yet answered.
    live: usize,
}

impl Outbox {
    /// Adds `out` as number `seq`, above every number held.
    fn insert(&mut self, seq: u64, out: Out) {
        debug_assert!(self.entries.back().is_none_or(|&(last, _)| last < seq));
        self.entries.push_back((seq, Some(out)));
        self.live += 1;
    }

    /// Drops number `seq`; false if it is not held (answered already).
    fn remove(&mut self, seq: u64) -> bool {
        let Ok(at) = self.entries.binary_search_by_key(&seq, |&(s, _)| s) else {
            return false;
        };
        if self.entries[at].1.take().is_none() {
            return false;
        }
        self.live -= 1;
        while self.entries.front().is_some_and(|(_, out)| out.is_none()) {
            self.entries.pop_front();
        }
        if self.entries.len() > 2 * self.live + 64 {
            self.entries.retain(|(_, out)| out.is_some());
        }
        true
    }

    /// The receipts held, by number.
    fn iter(&self) -> impl Iterator<Item = (u64, &Out)> {
        self.entries
            .iter()
            .filter_map(|(seq, out)| out.as_ref().map(|out| (*seq, out)))
    }

    /// How many receipts are held.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Gives back capacity past what it holds (at a memory release).
    pub(super) fn trim(&mut self) {
        crate::memory::shrink_deque(&mut self.entries);
    }
}

impl From<BTreeMap<u64, Out>> for Outbox {
    fn from(map: BTreeMap<u64, Out>) -> Outbox {
        Outbox {
            live: map.len(),
            entries: map.into_iter().map(|(seq, out)| (seq, Some(out))).collect(),
        }
    }
}

/// Cluster: a receipt record from JetStream (numbered `token` by the
/// bridge) was taken for `user`. With `held`, some registered device of
/// the user is offline, so the receipt is kept in (or was already in) the
/// user's state: the record may be acked once that state is stored in
/// JetStream. Without, it was written to every device of the user: it may
/// be acked at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeReceipt {
    /// The user the receipt is for (the original sender).
    pub user: u64,
    /// The bridge's number for the record.
    pub token: u64,
    /// Whether the user's state holds it.
    pub held: bool,
}

impl Sessions {
    /// Cluster: receipt records `tokens` for `user` were taken (written to
    /// its online devices, kept for its offline ones).
    pub(super) fn bridge_receipts_taken(&mut self, user: u64, tokens: &[u64]) {
        let held = self.waiting_lanes(user) != 0;
        self.bridge_receipts
            .extend(
                tokens
                    .iter()
                    .map(|&token| BridgeReceipt { user, token, held }),
            );
    }

    /// Cluster: moves the receipt records taken since the last call into
    /// `out`.
    pub fn take_bridge_receipts(&mut self, out: &mut Vec<BridgeReceipt>) {
        out.append(&mut self.bridge_receipts);
    }

    /// Keeps `out` in the outbox until its user's shard has it: its
    /// number there (0 in a cluster, where JetStream keeps receipts).
    pub(super) fn outbox_keep(&mut self, out: Out) -> u64 {
        if self.config.cluster.is_some() {
            return 0;
        }
        let r = &mut self.registry;
        r.out_seq += 1;
        let seq = r.out_seq;
        r.outbox.insert(seq, out);
        r.records.push(Record::Outbox { seq, out });
        seq
    }

    /// The receipts `seqs` of the outbox reached their user's shard.
    pub(super) fn outbox_taken(&mut self, seqs: &[u64]) {
        let r = &mut self.registry;
        for &seq in seqs {
            // A repeat (the receipt went twice) finds nothing.
            if r.outbox.remove(seq) {
                r.records.push(Record::OutboxDone { seq });
            }
        }
    }

    /// A receipt of shard `src`'s outbox, numbered `seq`, is written or
    /// kept here: `src` hears it after this iteration's device records are
    /// written (its own outbox at once, in the same records).
    pub(super) fn receipt_taken(&mut self, src: usize, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        if src == self.id {
            self.outbox_taken(seqs);
            return;
        }
        // Receipts from one shard come in runs (a ring drained at once):
        // one answer for the run, not an allocation per receipt.
        if let Some((dst, Msg::ReceiptsTaken { seqs: run })) = self.replies.last_mut() {
            if *dst == src {
                run.extend_from_slice(seqs);
                return;
            }
        }
        self.replies.push((
            src,
            Msg::ReceiptsTaken {
                seqs: seqs.to_vec(),
            },
        ));
    }

    /// Sends again the receipts of the outbox for users homed on `shard`
    /// (`None`: every one), after a restart of this shard or of `shard`.
    /// They leave after the next commit, like any receipt.
    pub(super) fn outbox_resend(&mut self, shard: Option<usize>) {
        let src = self.id as u16;
        for (seq, out) in self.registry.outbox.iter() {
            let dst = home_shard(out.user, self.shards);
            if shard.is_some_and(|s| s != dst) {
                continue;
            }
            let kind = ReceiptKind::from_u64(out.kind.into()).expect("checked when kept");
            let msg = if out.group == 0 {
                Msg::Receipt {
                    user: out.user,
                    kind,
                    server_id: out.id,
                    peer: out.peer,
                    src,
                    seq,
                }
            } else {
                Msg::GroupReceipt {
                    user: out.user,
                    kind,
                    group: out.group,
                    msg: out.id,
                    peers: vec![out.peer],
                    src,
                    seqs: vec![seq],
                }
            };
            self.replies.push((dst, msg));
        }
    }

    /// Receipts in the outbox (on their way to their users' shards).
    pub fn outbox_len(&self) -> usize {
        self.registry.outbox.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(id: u64) -> Out {
        Out {
            user: 1,
            kind: 1,
            group: 0,
            id,
            peer: 2,
        }
    }

    #[test]
    fn answered_numbers_leave_and_holes_are_swept_behind_one_that_waits() {
        let mut o = Outbox::default();
        for seq in 1..=300 {
            o.insert(seq, out(seq));
        }
        // Number 1 waits (its shard is down); the others are answered, out
        // of order, some twice.
        for seq in (2..=300).rev() {
            assert!(o.remove(seq), "{seq}");
            assert!(!o.remove(seq), "{seq} again");
        }
        assert!(!o.remove(301));
        assert_eq!(o.len(), 1);
        assert_eq!(o.iter().map(|(s, _)| s).collect::<Vec<_>>(), [1]);
        // The holes behind it do not pile up.
        assert!(o.entries.len() <= 2 * o.len() + 64, "{}", o.entries.len());
        o.insert(301, out(301));
        assert!(o.remove(1));
        assert_eq!(
            o.iter().map(|(s, o)| (s, o.id)).collect::<Vec<_>>(),
            [(301, 301)]
        );
        assert!(o.remove(301));
        assert_eq!((o.len(), o.entries.len()), (0, 0));
    }

    #[test]
    fn an_entry_costs_what_the_docs_say() {
        // docs/ARCHITECTURE.md, "Durable receipts"; results/receipts/.
        assert_eq!(std::mem::size_of::<(u64, Option<Out>)>(), 56);
    }

    #[test]
    fn a_replayed_outbox_keeps_its_numbers() {
        let map: BTreeMap<u64, Out> = [(4, out(40)), (9, out(90))].into_iter().collect();
        let mut o = Outbox::from(map);
        assert_eq!(o.len(), 2);
        assert!(o.remove(9));
        assert!(!o.remove(5));
        assert_eq!(
            o.iter().map(|(s, o)| (s, o.id)).collect::<Vec<_>>(),
            [(4, 40)]
        );
    }
}
