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
//! bytes) in the device log per receipt, and an entry in `outbox` (a
//! `BTreeMap` of 8-byte keys and 40-byte [`Out`]s) while it is on its
//! way; nothing at all while no receipt is: an idle shard writes nothing.

use crate::proto::ReceiptKind;
use crate::shard::{home_shard, Msg};
use crate::store::devices::{Out, Record};

use super::Sessions;

impl Sessions {
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
            if r.outbox.remove(&seq).is_some() {
                r.records.push(Record::OutboxDone { seq });
            }
        }
    }

    /// A receipt of shard `src`'s outbox, numbered `seq`, is written or
    /// kept here: `src` hears it after this iteration's device records are
    /// written (its own outbox at once, in the same records).
    pub(super) fn receipt_taken(&mut self, src: usize, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if src == self.id {
            self.outbox_taken(&seqs);
        } else {
            self.replies.push((src, Msg::ReceiptsTaken { seqs }));
        }
    }

    /// Sends again the receipts of the outbox for users homed on `shard`
    /// (`None`: every one), after a restart of this shard or of `shard`.
    /// They leave after the next commit, like any receipt.
    pub(super) fn outbox_resend(&mut self, shard: Option<usize>) {
        let src = self.id as u16;
        for (&seq, out) in &self.registry.outbox {
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
