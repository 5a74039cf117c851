//! A message's way through the session layer: SEND, storing it on the
//! recipient's home shard, the ACK, DELIVER within the delivery window,
//! DELIVERED, and the receipts; and what the commit lets go.

use crate::io::ConnId;
use crate::proto::{self, ErrorCode, Frame, ReceiptKind};
use crate::shard::{home_shard, ConnRef, Msg};
use crate::store::devices::Out;
use crate::store::{Origin, PushError, Stored};

use super::groups::with_delivery;

/// Whether `msg` waits for a shard that is down (in the outbox towards it)
/// rather than being dropped: SENDs (refused before they get here when the
/// shard is down, so only those queued earlier), a group's acknowledged
/// fan-out, and the receipts of a receipt outbox and their answers, which
/// their outbox sends again anyway but need not.
fn waits_for_shard(msg: &Msg) -> bool {
    match msg {
        Msg::Send { .. } | Msg::GroupFan { .. } | Msg::ReceiptsTaken { .. } => true,
        Msg::Receipt { seq, .. } => *seq != 0,
        Msg::GroupReceipt { seqs, .. } => !seqs.is_empty(),
        _ => false,
    }
}
use super::{Action, Env, Flow, Now, Sessions};
use crate::cluster::Owner;
use crate::group::envelope::GROUP_SENDER;

impl Sessions {
    pub(super) fn on_send(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        client_id: u64,
        to: u64,
        body: &[u8],
    ) -> Flow {
        #[cfg(debug_assertions)]
        if to == super::PANIC_USER {
            panic!("injected panic: SEND to PANIC_USER");
        }
        #[cfg(debug_assertions)]
        if to == super::CRASH_USER {
            self.crash = true;
            return Flow::Next;
        }
        if self.config.cluster.is_some() && env.owner(self.slots[conn.index()].user) != Owner::Here
        {
            // Fencing: this node no longer serves the sender (its leases
            // went unproven, e.g. through a pause): nothing is taken, and
            // the client logs in again where the partition is served now.
            self.stats.moved_closes.inc();
            self.bye(now, conn, proto::ByeReason::Moved);
            return Flow::Next;
        }
        if to == 0 {
            self.refuse_send(
                conn,
                client_id,
                ErrorCode::BadRecipient,
                "user 0 does not exist",
            );
            return Flow::Next;
        }
        if env.owner(to) == Owner::Nobody {
            self.stats.unavailable.inc();
            self.refuse_send(
                conn,
                client_id,
                ErrorCode::Unavailable,
                "no node serves the recipient right now, retry later",
            );
            return Flow::Next;
        }
        if self.config.cluster.is_some() {
            return self.publish(now, env, conn, client_id, to, body);
        }
        let dst = home_shard(to, self.shards);
        if !env.up(dst) {
            self.stats.unavailable.inc();
            self.refuse_send(
                conn,
                client_id,
                ErrorCode::Unavailable,
                "the recipient's shard is restarting, retry later",
            );
            return Flow::Next;
        }
        if self.send_blocks(env, to) {
            // The ring and the outbox are full: stop reading this sender.
            return Flow::Blocked;
        }
        let msg = self.send_msg(now, conn, client_id, to, body);
        self.stats.msgs_in.inc();
        self.keep_copy(conn, client_id, to, body);
        self.route(now, env, dst, msg);
        Flow::Next
    }

    /// Keeps a copy of a version 2 SEND from `conn` while its user has
    /// another version 2 device online: once the SEND is ACKed, that copy
    /// goes to the other devices as SENT. Bounded by the SENDs in flight
    /// (each gets one ACK or refusal back, which takes the copy).
    fn keep_copy(&mut self, conn: ConnId, client_id: u64, to: u64, body: &[u8]) {
        let s = self.slots[conn.index()];
        if s.version < proto::VERSION_2 || self.users.count(s.user) < 2 {
            return;
        }
        let other_v2 = (0..self.users.count(s.user)).any(|i| {
            let c = self.users.nth_conn(s.user, i);
            c != conn && self.slots[c.index()].version >= proto::VERSION_2
        });
        if other_v2 {
            self.copies
                .insert((conn, s.gen, client_id), (s.user, to, body.into()));
        }
    }

    /// The SEND `client_id` from `reply` was taken as `server_id`: its
    /// kept copy (if any) goes as SENT to the user's other version 2
    /// devices online now.
    fn send_copies(&mut self, reply: ConnRef, client_id: u64, server_id: u64, time_ms: u64) {
        let Some((user, to, body)) = self.copies.remove(&(reply.conn, reply.gen, client_id)) else {
            return;
        };
        for i in 0..self.users.count(user) {
            let c = self.users.nth_conn(user, i);
            if c != reply.conn && self.slots[c.index()].version >= proto::VERSION_2 {
                self.write(
                    c,
                    &Frame::Sent {
                        server_id,
                        to,
                        server_time_ms: time_ms,
                        client_id,
                        body: &body,
                    },
                );
            }
        }
    }

    /// The [`Msg::Send`] of a SEND from `conn`, with its reply address and,
    /// for a version 2 sender, the origin its retries are known by.
    fn send_msg(&self, now: Now, conn: ConnId, client_id: u64, to: u64, body: &[u8]) -> Msg {
        let s = &self.slots[conn.index()];
        // Each device counts its own client ids: its own dedupe window.
        let origin = (s.version >= proto::VERSION_2).then_some(Origin {
            device: s.device,
            client_id,
        });
        Msg::Send {
            from: s.user,
            reply: ConnRef {
                shard: self.id as u16,
                conn,
                gen: s.gen,
            },
            client_id,
            origin,
            to,
            body: body.into(),
            sent_ns: now.mono_ns,
        }
    }

    /// Cluster: every SEND goes to JetStream through the bridge, whoever
    /// serves the recipient (docs/CLUSTER.md, "Cross-node messages"); the
    /// ACK comes back from the bridge once the publish is acknowledged.
    fn publish(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        client_id: u64,
        to: u64,
        body: &[u8],
    ) -> Flow {
        if !env.bridge_has_room() {
            return Flow::Blocked;
        }
        let msg = self.send_msg(now, conn, client_id, to, body);
        self.stats.msgs_in.inc();
        self.keep_copy(conn, client_id, to, body);
        self.actions.push(Action::Cluster(msg));
        Flow::Next
    }

    /// ERROR(`code`) for the SEND `client_id` on `conn`; the connection stays.
    fn refuse_send(&mut self, conn: ConnId, client_id: u64, code: ErrorCode, text: &str) {
        self.write(
            conn,
            &Frame::Error {
                code,
                client_id,
                text,
            },
        );
    }

    /// Whether a SEND to `to` must wait: its home is another shard, which is
    /// up, and the ring and outbox towards it are full (in a cluster: the
    /// ring to the bridge is).
    pub(super) fn send_blocks(&self, env: &dyn Env, to: u64) -> bool {
        if self.config.cluster.is_some() {
            return !env.bridge_has_room();
        }
        let dst = home_shard(to, self.shards);
        dst != self.id && env.up(dst) && !env.has_room(dst)
    }

    /// READ from `user`: relayed to the sender as a read receipt, if the
    /// message was delivered to this connection (see `guard.rs`).
    pub(super) fn on_read(&mut self, conn: ConnId, user: u64, server_id: u64, from: u64) {
        // A planted bug only a simulation sets: skip the check.
        let unchecked = crate::sim::planted(crate::sim::Planted::RelayForgedRead);
        if !unchecked && !self.guard.was_delivered(conn, server_id, Some(from)) {
            self.unknown_message(conn, "READ");
            return;
        }
        if from != 0 {
            // Behind the delivery receipt, which waits for a commit.
            self.receipt_out(from, ReceiptKind::Read, server_id, user);
        }
    }

    /// DELIVERED from `user`'s device on `conn`: removes the message from
    /// its queue and relays a delivery receipt, if it was sent to this
    /// connection. A message for a user with several registered devices
    /// leaves the queue when the last of them answers, and the receipt goes
    /// at the first (`registry.rs`). A repeat for a message delivered
    /// recently is ignored (idempotent); anything else is refused and
    /// removes nothing.
    pub(super) fn on_delivered(&mut self, env: &dyn Env, conn: ConnId, user: u64, server_id: u64) {
        let (sent, lane) = self
            .users
            .get_mut(user, conn)
            .map_or((false, 0), |on| (server_id <= on.sent_upto, on.lane));
        if sent {
            let all = self.registered(user);
            if all & !(1 << lane) != 0 {
                self.delivered_marked(env, conn, user, server_id, lane, all);
                return;
            }
        }
        let removed = if sent {
            self.store.remove(user, server_id)
        } else {
            None
        };
        let Some(msg) = removed else {
            if !self.guard.was_delivered(conn, server_id, None) {
                self.unknown_message(conn, "DELIVERED");
            }
            return;
        };
        self.forget_mark(user, server_id);
        self.answered(conn, user, &msg);
        if self.config.cluster.is_some() {
            // JetStream may delete it now.
            self.actions
                .push(Action::Cluster(Msg::Done { user, server_id }));
        }
        // The receipt waits for the commit that holds the tombstone.
        self.delivery_receipt(user, &msg);
        self.pump_one(env, user, conn, false, None);
    }

    /// `msg`, sent to `user`'s device on `conn`, was answered: it leaves
    /// that device's delivery window.
    pub(super) fn answered(&mut self, conn: ConnId, user: u64, msg: &Stored) {
        let version = self.slots[conn.index()].version;
        if let Some(on) = self.users.get_mut(user, conn) {
            if msg.server_id <= on.sent_upto {
                let len = with_delivery(version, msg, proto::encoded_len);
                on.inflight = on.inflight.saturating_sub(1);
                on.inflight_bytes = on.inflight_bytes.saturating_sub(len as u32);
            }
        }
    }

    /// RECEIPT(delivered) of `msg` for its sender, after the next commit
    /// (a group copy's goes as a group receipt).
    pub(super) fn delivery_receipt(&mut self, user: u64, msg: &Stored) {
        if msg.from == crate::group::envelope::GROUP_SENDER {
            self.group_delivery_receipt(user, msg);
            return;
        }
        self.receipt_out(msg.from, ReceiptKind::Delivered, msg.server_id, user);
    }

    /// A receipt for `to` (the sender of `server_id`) from `peer`: kept in
    /// the outbox (`outbox.rs`) and sent after the next commit.
    fn receipt_out(&mut self, to: u64, kind: ReceiptKind, server_id: u64, peer: u64) {
        let seq = self.outbox_keep(Out {
            user: to,
            kind: kind as u8,
            group: 0,
            id: server_id,
            peer,
        });
        self.replies.push((
            home_shard(to, self.shards),
            Msg::Receipt {
                user: to,
                kind,
                server_id,
                peer,
                src: self.id as u16,
                seq,
            },
        ));
    }

    /// Sends queued messages to `user`'s device on `conn`, up to its
    /// delivery window: `deliver_inflight_max` DELIVERs and
    /// `deliver_inflight_bytes_max` bytes unanswered.
    ///
    /// A backlog (at login, or while catching up) is sent only as far as the
    /// output budget `conn_out_bytes_max`, and continued as DELIVEREDs come
    /// back. The burst is the server's own doing: judged as a slow reader, a
    /// client with more backlog than one socket write takes would get
    /// BYE(slow) at every login before it could answer a single DELIVER, and
    /// never catch up. `live` (a message just arrived) to a caught-up
    /// connection is sent regardless, so a reader that cannot keep up with
    /// live traffic still passes the budget and is closed as slow.
    ///
    /// Only committed messages are sent: the store's `next_after` skips
    /// staged pushes, which are pumped after the commit (`fresh`).
    ///
    /// `written`: what this event already wrote to the connection, when the
    /// caller knows it (else the event's actions are counted).
    ///
    /// A message this device answered already (while others of its user
    /// have not: a mark) is skipped.
    pub(super) fn pump_one(
        &mut self,
        env: &dyn Env,
        user: u64,
        conn: ConnId,
        live: bool,
        written: Option<usize>,
    ) {
        // Fencing: nothing goes to a user of a partition this node no
        // longer serves; the sweep (`Event::Moved`) closes the session.
        if env.owner(user) != Owner::Here {
            return;
        }
        if self.slots[conn.index()].paused {
            return;
        }
        let written = written.unwrap_or_else(|| self.written(conn));
        let pending = env.out_pending(conn) + written;
        let version = self.slots[conn.index()].version;
        let marks = self.registry.marks.get(&user);
        let inflight_max = env
            .inflight_max(conn)
            .map_or(self.config.deliver_inflight_max, |n| {
                n.min(self.config.deliver_inflight_max)
            });
        let Some(on) = self.users.get_mut(user, conn) else {
            return;
        };
        let bit = 1u32 << on.lane;
        let budget = !live || on.held;
        let at = self.wire.len();
        let mut sent = 0;
        // Whether a committed message is left unsent when the walk stops.
        let mut held = false;
        let (config, wire, guard) = (&self.config, &mut self.wire, &mut self.guard);
        self.store.each_after(user, on.sent_upto, &mut |m| {
            if marks.is_some_and(|mk| mk.get(&m.server_id).is_some_and(|&b| b & bit != 0)) {
                // Answered by this device: not sent again.
                on.sent_upto = m.server_id;
                return true;
            }
            if on.inflight as usize >= inflight_max {
                held = true;
                return false;
            }
            // Encoded first and taken back if over a limit: one pass over
            // the fields per DELIVER sent, and the rare refusal pays a copy.
            let out = wire.len() - at;
            with_delivery(version, m, |frame| proto::encode(frame, wire));
            let len = wire.len() - at - out;
            // With nothing in flight one DELIVER always goes, so a DELIVERED
            // will come back to continue.
            if on.inflight > 0
                && (on.inflight_bytes as usize + len > config.deliver_inflight_bytes_max
                    || budget && pending + out + len > config.conn_out_bytes_max)
            {
                wire.truncate(at + out);
                held = true;
                return false;
            }
            guard.delivered(conn, m.server_id, m.from);
            if m.from == GROUP_SENDER {
                Sessions::group_delivered(guard, conn, m);
            }
            on.sent_upto = m.server_id;
            on.inflight += 1;
            on.inflight_bytes += len as u32;
            sent += 1;
            true
        });
        on.held = held;
        if sent > 0 {
            self.stats.msgs_out.add(sent);
            self.actions.push(Action::Write {
                conn,
                bytes: at..self.wire.len(),
            });
        }
    }

    /// Delivers `msg` to shard `dst`: handled at once when local, else
    /// left as an [`Action::Route`].
    pub(super) fn route(&mut self, now: Now, env: &dyn Env, dst: usize, msg: Msg) {
        debug_assert!(!matches!(msg, Msg::Handoff { .. }));
        if self.config.cluster.is_some()
            && matches!(msg, Msg::Receipt { .. } | Msg::GroupReceipt { .. })
        {
            // To the sender's node, through JetStream.
            self.actions.push(Action::Cluster(msg));
        } else if dst == self.id {
            self.on_msg(now, env, msg);
        } else if env.up(dst) || waits_for_shard(&msg) {
            // SENDs to a shard that is not up are refused before they get
            // here (those queued earlier wait, bounded), and a group's
            // acknowledged fan-out and the receipts of the outbox (and
            // their answers) wait for the shard to come back; the rest
            // would pile up for connections that are gone.
            self.actions.push(Action::Route { dst, msg });
        } else if matches!(msg, Msg::Receipt { .. }) {
            self.stats.receipts_dropped.inc();
        }
    }

    pub(super) fn on_msg(&mut self, now: Now, env: &dyn Env, msg: Msg) {
        match msg {
            Msg::Handoff { .. } => {
                panic!("a handoff is the shard's to attach, not a session event")
            }
            Msg::Done { .. } => panic!("DELIVERED acks go to the bridge, not to shards"),
            Msg::State { .. } => panic!("user states go to the bridge, not to shards"),
            Msg::Restore { user, state } => self.restore_user(user, *state),
            Msg::Replayed { token } => self.replayed(token),
            Msg::Incoming { to, msg } => self.incoming(to, msg),
            msg @ (Msg::Watch { .. }
            | Msg::Unwatch { .. }
            | Msg::Presence { .. }
            | Msg::Typing { .. }
            | Msg::RemoteWatch { .. }) => self.on_presence_msg(now, env, msg),
            Msg::RemotePresence { .. } => {
                panic!("remote presence goes to the bridge, not to shards")
            }
            msg @ (Msg::GroupOp { .. }
            | Msg::GroupSend { .. }
            | Msg::GroupDone { .. }
            | Msg::GroupFan { .. }
            | Msg::GroupStored { .. }
            | Msg::GroupReceipt { .. }) => self.on_group_msg(now, msg),
            Msg::Send {
                from,
                reply,
                client_id,
                origin,
                to,
                body,
                sent_ns,
            } => {
                if let Some(answer) = self.retry_answer(from, reply, origin, sent_ns) {
                    // Behind the answers before it, and after the commit
                    // of the first copy if that is still staged.
                    self.replies.push((reply.shard as usize, answer));
                    return;
                }
                let server_id = (self.next_seq << 10) | self.id as u64;
                let time_ms = now.unix_ms;
                let stored = Stored {
                    server_id,
                    from,
                    time_ms,
                    origin,
                    body,
                };
                let answer = match self.store.push(to, stored) {
                    Ok(()) => {
                        self.next_seq += 1;
                        // Sent once durable: see `on_committed`.
                        self.fresh.push(to);
                        self.fresh_sent.push((to, server_id, sent_ns));
                        Msg::Ack {
                            reply,
                            client_id,
                            server_id,
                            time_ms,
                            sent_ns,
                        }
                    }
                    Err(PushError::QueueFull(_)) => {
                        self.stats.queue_full.inc();
                        Msg::Reject {
                            reply,
                            client_id,
                            code: ErrorCode::QueueFull,
                        }
                    }
                    Err(PushError::StorageFull(_)) => {
                        self.stats.storage_full.inc();
                        Msg::Reject {
                            reply,
                            client_id,
                            code: ErrorCode::StorageFull,
                        }
                    }
                };
                // Answers keep their order and wait for the commit.
                self.replies.push((reply.shard as usize, answer));
            }
            Msg::Ack {
                reply,
                client_id,
                server_id,
                time_ms,
                sent_ns,
            } => {
                self.send_copies(reply, client_id, server_id, time_ms);
                if let Some(conn) = self.live(reply) {
                    self.stats.acks.inc();
                    let ns = now.mono_ns.saturating_sub(sent_ns);
                    self.stats.latency.send_to_ack.record(ns);
                    self.write(
                        conn,
                        &Frame::Ack {
                            client_id,
                            server_id,
                            server_time_ms: time_ms,
                        },
                    );
                }
            }
            Msg::Reject {
                reply,
                client_id,
                code,
            } => {
                self.copies.remove(&(reply.conn, reply.gen, client_id));
                if let Some(conn) = self.live(reply) {
                    let text = match code {
                        ErrorCode::QueueFull => "recipient's queue is full, retry later",
                        ErrorCode::StorageFull => "server storage is full, retry later",
                        ErrorCode::Internal => {
                            "the recipient's shard restarted before storing it, resend"
                        }
                        ErrorCode::StaleClientId => {
                            "client_id is below this sender's dedupe window (32 below the \
                             highest taken): not taken; client_ids must increase"
                        }
                        _ => "message refused",
                    };
                    self.write(
                        conn,
                        &Frame::Error {
                            code,
                            client_id,
                            text,
                        },
                    );
                }
            }
            Msg::Receipt {
                user,
                kind,
                server_id,
                peer,
                src,
                seq,
            } => {
                self.on_receipt(user, kind, server_id, peer);
                if seq != 0 && self.config.cluster.is_some() {
                    self.bridge_receipts_taken(user, &[seq]);
                } else if seq != 0 {
                    self.receipt_taken(src.into(), &[seq]);
                }
            }
            Msg::ReceiptsTaken { seqs } => self.outbox_taken(&seqs),
            Msg::ReceiptsResend { shard } => self.outbox_resend(Some(shard.into())),
        }
    }

    /// Cluster: a message from JetStream for `to`. Stream order is id
    /// order, so one already held (the bridge's consumer started over after
    /// a takeover or reconnect) is a copy: dropped, not stored twice.
    fn incoming(&mut self, to: u64, msg: Stored) {
        let server_id = msg.server_id;
        let held = self
            .store
            .next_after(to, server_id.saturating_sub(1))
            .is_some_and(|m| m.server_id >= server_id);
        if held {
            return;
        }
        match self.store.push(to, msg) {
            Ok(()) => self.fresh.push(to),
            // A cluster's store has no length or disk limit: JetStream holds
            // the message, and it comes back when the consumer starts over.
            Err(e) => log::error!(
                "shard {}: message {server_id} for {to} not held: {e:?}",
                self.id
            ),
        }
    }

    pub(super) fn write_receipt(
        &mut self,
        conn: ConnId,
        kind: ReceiptKind,
        server_id: u64,
        peer: u64,
    ) {
        self.stats.receipts.inc();
        self.write(
            conn,
            &Frame::Receipt {
                kind,
                server_id,
                peer,
            },
        );
    }

    /// The connection `r` names, if it is still the same one and logged in.
    pub(super) fn live(&self, r: ConnRef) -> Option<ConnId> {
        debug_assert_eq!(r.shard as usize, self.id);
        let s = self.slots.get(r.conn.index())?;
        (s.gen == r.gen && s.state == super::State::Active).then_some(r.conn)
    }

    /// The store made this iteration's records durable: their answers go
    /// (pushes it rolled back answered `storage_full` instead of ACK), and
    /// the new messages are sent to their recipients' connections.
    pub(super) fn on_committed(&mut self, now: Now, env: &dyn Env, refused: &[u64]) {
        self.batch_group_receipts();
        for (dst, mut msg) in std::mem::take(&mut self.replies) {
            if let Msg::Ack {
                reply,
                client_id,
                server_id,
                ..
            } = msg
            {
                if refused.contains(&server_id) {
                    self.stats.storage_full.inc();
                    msg = Msg::Reject {
                        reply,
                        client_id,
                        code: ErrorCode::StorageFull,
                    };
                }
            }
            self.route(now, env, dst, msg);
        }
        let mut fresh = std::mem::take(&mut self.fresh);
        fresh.sort_unstable();
        fresh.dedup();
        // What the answers above wrote, per connection (counted once, not
        // per pump; each user's pump writes only to its own connection).
        let mut written = std::mem::take(&mut self.written);
        written.clear();
        if !fresh.is_empty() {
            for a in &self.actions {
                if let Action::Write { conn, bytes } = a {
                    *written.entry(*conn).or_default() += bytes.len();
                }
            }
        }
        for user in fresh.drain(..) {
            // Registered devices that are offline: woken through their
            // push service, each with what waits for it.
            if self.push.is_some() {
                for (device, lane) in self.offline_devices(user) {
                    if let Some((waiting, oldest_ms)) = self.waiting_for(user, lane) {
                        self.queued_offline(user, device, waiting, oldest_ms);
                    }
                }
            }
            for i in 0..self.users.count(user) {
                let conn = self.users.nth_conn(user, i);
                let w = written.get(&conn).copied().unwrap_or(0);
                self.pump_one(env, user, conn, true, Some(w));
            }
        }
        self.fresh = fresh;
        self.written = written; // keep the allocation
                                // Those just written are in the online figure; those left queued
                                // (recipient offline, or its delivery window full) are not.
        for &(user, server_id, sent_ns) in &self.fresh_sent {
            if self
                .users
                .first(user)
                .is_some_and(|on| on.sent_upto >= server_id)
            {
                let ns = now.mono_ns.saturating_sub(sent_ns);
                self.stats.latency.send_to_deliver.record(ns);
            }
        }
        self.fresh_sent.clear();
    }
}
