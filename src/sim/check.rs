//! What the simulator checks, as the clients see the server.
//!
//! Every SEND a client makes is recorded; every DELIVER, ACK and RECEIPT a
//! client receives is checked against that record at once, and the end of
//! a run checks that every ACKed message reached its recipient.

use std::collections::{HashMap, HashSet};

use crate::proto::ReceiptKind;

/// A message body as the simulated clients write it: who sent it, to whom,
/// and the sender's sequence number (24 bytes, little-endian).
pub fn body(from: u64, to: u64, seq: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&from.to_le_bytes());
    b[8..16].copy_from_slice(&to.to_le_bytes());
    b[16..].copy_from_slice(&seq.to_le_bytes());
    b
}

fn parse(body: &[u8]) -> Option<(u64, u64, u64)> {
    if body.len() != 24 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(body[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some((word(0), word(1), word(2)))
}

/// The record of a run and the checks on it. A failed check returns the
/// reason, which ends the run.
#[derive(Default)]
pub struct Checker {
    /// Every SEND made: (sender, sequence) -> recipient.
    sent: HashMap<(u64, u64), u64>,
    /// The senders that speak protocol v2 (idempotent SEND).
    v2: HashSet<u64>,
    /// A v2 sender's (sender, client_id) -> the one server id the server
    /// gave it, from its first ACK or DELIVER: every later ACK and DELIVER
    /// of that SEND must name the same (exactly-once, docs/PROTOCOL.md).
    taken: HashMap<(u64, u64), u64>,
    /// (sender, client_id) whose dedupe entry a repair skipped after a
    /// flipped byte: a retry of it may be stored again.
    forgotten: HashSet<(u64, u64)>,
    /// Every ACK: (sender, sequence), with the server id.
    acked: Vec<(u64, u64, u64)>,
    /// What each recipient saw: (recipient, server id) -> (sender, sequence).
    delivered: HashMap<(u64, u64), (u64, u64)>,
    /// (recipient, sender, sequence) seen at least once.
    seen: HashSet<(u64, u64, u64)>,
    /// Per recipient, the highest server id seen so far.
    last_id: HashMap<u64, u64>,
    /// (recipient, server id) answered DELIVERED / READ.
    answered: HashSet<(u64, u64)>,
    read: HashSet<(u64, u64)>,
    /// (recipient, server id) of messages whose only stored record a
    /// repair skipped after a flipped byte: the one documented loss.
    corrupted: HashSet<(u64, u64)>,
    /// Counters for the report.
    pub(super) delivers: u64,
    pub(super) duplicates: u64,
    pub(super) receipts: u64,
    pub(super) forged: u64,
    /// SENDs written again with the same client_id (after a dropped
    /// connection or a temporary refusal).
    pub(super) retries: u64,
    /// Hostile misdeeds (bad bytes written, floods).
    pub(super) hostile: u64,
    /// Fatal ERRORs received as documented, after bad bytes.
    pub(super) fatal: u64,
    /// BYE(`slow`) and BYE(`rate_limited`) received.
    pub(super) slow_byes: u64,
    pub(super) rate_byes: u64,
    /// Shard restarts in place so far: a restart closes its connections
    /// without a frame.
    pub(super) restarts: u64,
}

impl Checker {
    /// `from` sends its message `seq` to `to`.
    pub fn sent(&mut self, from: u64, to: u64, seq: u64) {
        self.sent.insert((from, seq), to);
    }

    /// `user` logs in with protocol v2: its SENDs are idempotent, and their
    /// client_id is their sequence number.
    pub fn speaks_v2(&mut self, user: u64) {
        self.v2.insert(user);
    }

    /// A v2 SEND (`from`, `client_id`) is `server_id`, as an ACK or a
    /// DELIVER says: it must be the server id every earlier one named.
    fn one_id(
        &mut self,
        from: u64,
        client_id: u64,
        server_id: u64,
        what: &str,
    ) -> Result<(), String> {
        if !self.v2.contains(&from) || self.forgotten.contains(&(from, client_id)) {
            return Ok(());
        }
        match *self.taken.entry((from, client_id)).or_insert(server_id) {
            first if first != server_id => Err(format!(
                "v2 SEND {client_id} of user {from} stored twice: {what} names server id \
                 {server_id}, it was {first} before"
            )),
            _ => Ok(()),
        }
    }

    /// A repair skipped the record holding `from`'s dedupe entry for
    /// `client_id`: a retry of that SEND may be taken again.
    pub fn lost_dedupe(&mut self, from: u64, client_id: u64) {
        self.forgotten.insert((from, client_id));
    }

    /// Clients that speak protocol v2.
    pub fn v2_count(&self) -> u32 {
        self.v2.len() as u32
    }

    /// Messages ACKed so far (with duplicates from resends).
    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }

    /// The server ACKed `from`'s message `seq` with `server_id`; for a v2
    /// sender, the same server id as every earlier ACK or DELIVER of it.
    pub fn acked(&mut self, from: u64, seq: u64, server_id: u64) -> Result<(), String> {
        self.acked.push((from, seq, server_id));
        self.one_id(from, seq, server_id, "an ACK")
    }

    /// `to` received DELIVER(`server_id`, `from`, `client_id`, `body`).
    /// Checks it was sent, to this user, by that sender, that new messages
    /// come in the order of their server ids (the recipient's queue order,
    /// which is each sender's order), that a v2 DELIVER (`client_id` set)
    /// carries the sender's client_id (0 from a v1 sender), and that a v2
    /// sender's SEND has one server id however often it was retried.
    pub fn delivered(
        &mut self,
        to: u64,
        server_id: u64,
        from: u64,
        client_id: Option<u64>,
        body: &[u8],
    ) -> Result<(), String> {
        self.delivers += 1;
        let Some((b_from, b_to, seq)) = parse(body) else {
            return Err(format!(
                "user {to} got DELIVER {server_id} with a body never sent: {body:?}"
            ));
        };
        if b_from != from || b_to != to || self.sent.get(&(from, seq)) != Some(&to) {
            return Err(format!(
                "user {to} got DELIVER {server_id} from {from} of message {seq} by {b_from} to {b_to}, \
                 which was never sent so"
            ));
        }
        let v2 = self.v2.contains(&from);
        if let Some(cid) = client_id.filter(|&c| c != if v2 { seq } else { 0 }) {
            return Err(format!(
                "user {to} got v2 DELIVER {server_id} of message {seq} from {from} (v2 {v2}) \
                 with client_id {cid}"
            ));
        }
        self.one_id(from, seq, server_id, &format!("DELIVER to {to}"))?;
        match self.delivered.insert((to, server_id), (from, seq)) {
            Some(before) if before != (from, seq) => {
                return Err(format!(
                    "user {to}: server id {server_id} names two messages, {before:?} and {:?}",
                    (from, seq)
                ))
            }
            Some(_) => {
                self.duplicates += 1;
                return Ok(());
            }
            None => {}
        }
        let last = self.last_id.entry(to).or_insert(0);
        if server_id <= *last && !self.seen.contains(&(to, from, seq)) {
            return Err(format!(
                "user {to}: new message {server_id} (from {from}, seq {seq}) after {last}: out of order"
            ));
        }
        *last = (*last).max(server_id);
        self.seen.insert((to, from, seq));
        Ok(())
    }

    /// `user` answered DELIVERED (`read` false) or READ for `server_id`.
    pub fn answered(&mut self, user: u64, server_id: u64, read: bool) {
        if read {
            self.read.insert((user, server_id));
        } else {
            self.answered.insert((user, server_id));
        }
    }

    /// `to` received RECEIPT(`kind`, `server_id`, `peer`): `peer` must have
    /// received that message from `to` and answered it so.
    pub fn receipt(
        &mut self,
        to: u64,
        kind: ReceiptKind,
        server_id: u64,
        peer: u64,
    ) -> Result<(), String> {
        self.receipts += 1;
        let real = self
            .delivered
            .get(&(peer, server_id))
            .is_some_and(|&(from, _)| from == to);
        let answered = match kind {
            ReceiptKind::Delivered => self.answered.contains(&(peer, server_id)),
            ReceiptKind::Read => self.read.contains(&(peer, server_id)),
        };
        if !real || !answered {
            return Err(format!(
                "user {to} got a {kind} receipt for {server_id} from {peer}, which {}",
                if real {
                    "was never answered so"
                } else {
                    "is not a message it sent to that peer"
                }
            ));
        }
        Ok(())
    }

    /// A server id and sender for `user` to forge a receipt with, picked by
    /// `roll`: an ACKed message to another user, or (when that is not at
    /// hand) an id no message has. Never a message `user` received, so the
    /// server must refuse the receipt.
    pub fn forgeable(&self, user: u64, roll: u64) -> (u64, u64) {
        if !self.acked.is_empty() {
            let (from, seq, id) = self.acked[(roll % self.acked.len() as u64) as usize];
            if self.sent[&(from, seq)] != user && !self.delivered.contains_key(&(user, id)) {
                return (id, from);
            }
        }
        // Server ids are a shard's sequence << 10: no run gets near 2^62.
        ((1 << 62) | (roll >> 2), roll % 1000 + 1)
    }

    /// A repair skipped the Queued record of `server_id` for `user`: that
    /// message may go undelivered (it may also have been delivered before,
    /// or have another copy from a compaction).
    pub fn lost_to_corruption(&mut self, user: u64, server_id: u64) {
        self.corrupted.insert((user, server_id));
    }

    /// At the end: every ACKed message reached its recipient, but for those
    /// a repair skipped.
    pub fn all_acked_delivered(&self) -> Result<(), String> {
        let lost: Vec<_> = self
            .acked
            .iter()
            .filter(|&&(from, seq, id)| {
                let to = self.sent[&(from, seq)];
                !self.seen.contains(&(to, from, seq)) && !self.corrupted.contains(&(to, id))
            })
            .collect();
        match lost.first() {
            None => Ok(()),
            Some((from, seq, id)) => Err(format!(
                "{} ACKed messages never delivered, e.g. message {seq} of user {from} (server id {id})",
                lost.len()
            )),
        }
    }
}
