//! Groups in the session layer (docs/PROTOCOL.md, "Groups"): the group
//! frames of a member's connection, the requests and messages a group's
//! home shard orders, the fan-out to the members' shards, the members'
//! copies and the batched receipts back to the sender.
//!
//! Durability rides on the store's commit: every answer and fan-out goes
//! into `replies`, which leave only after the commit, and the shard makes
//! the staged group log records durable right before it commits
//! ([`Sessions::take_group_records`]), so nothing is answered before its
//! change is on disk.

use std::sync::Arc;

use foldhash::HashMap;

use crate::group::envelope::{Envelope, GROUP_SENDER};
use crate::group::{Change, Groups, Sent};
use crate::io::ConnId;
use crate::proto::group::{entry_len, put_entry, GROUP_BODY_ROOM_BYTES};
use crate::proto::{self, put_varint, varint_len, ErrorCode, Frame, GroupFrame, ReceiptKind};
use crate::shard::{home_shard, ConnRef, GroupAnswer, GroupOp, Msg};
use crate::store::devices::Out;
use crate::store::groups::Record;
use crate::store::{Origin, PushError, Stored};

use super::{Action, Env, Flow, Now, Sessions};

/// Most bytes of a GROUP_LIST or GROUP_RECEIPT frame besides its list:
/// the type byte and three varints.
const LIST_HEAD_BYTES_MAX: usize = 1 + 3 * proto::LEN_PREFIX_BYTES_MAX;

/// The groups homed on a shard and what their changes left to do.
pub(super) struct GroupState {
    /// Members, admins and order of the groups homed here.
    pub(super) home: Groups,
    /// Group log records staged since the last [`Sessions::take_group_records`].
    records: Vec<Record>,
    /// Some staged record is a change or a message (not only `FannedOut`
    /// marks, which need no sync: a lost one only repeats a fan-out).
    urgent: bool,
    /// Messages ordered here that some shard has not confirmed holding,
    /// by (group, msg): kept to send again to a shard that restarted
    /// before its commit.
    pending: HashMap<(u64, u64), Fan>,
}

/// A message ordered here on its way to its recipients' shards.
struct Fan {
    from: u64,
    time_ms: u64,
    client_id: u64,
    event: Option<proto::GroupEvent>,
    subject: u64,
    body: Arc<[u8]>,
    /// Per shard, the recipients homed there.
    lists: Vec<Arc<[u64]>>,
    /// Shards that have not confirmed their copies yet.
    owed: u32,
}

impl GroupState {
    /// No groups, for shard `id` of `shards`.
    pub(super) fn new(id: usize, shards: usize, members_max: usize, per_user_max: usize) -> Self {
        GroupState {
            home: Groups::new(id, shards, members_max, per_user_max),
            records: Vec::new(),
            urgent: false,
            pending: HashMap::default(),
        }
    }
}

/// The key READs of a group message are checked by in the guard's
/// delivered list: the group and the message's number, mixed so that two
/// groups' numbers do not meet (the guard holds it with the sender).
fn read_key(group: u64, msg: u64) -> u64 {
    // splitmix64's finaliser on the group, then the number.
    let mut z = group.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) ^ msg
}

/// The frame that delivers the queued `m` to a connection of protocol
/// `version`, handed to `f`. A group copy goes as GROUP_DELIVER or
/// GROUP_EVENT to a version 2 connection; a version 1 one gets it as a
/// plain DELIVER from its sender (an event as an empty one from its actor),
/// so it stays answerable with the frames version 1 knows.
pub(super) fn with_delivery<R>(version: u8, m: &Stored, f: impl FnOnce(&Frame<'_>) -> R) -> R {
    fn plain<'b>(m: &Stored, from: u64, body: &'b [u8], client_id: Option<u64>) -> Frame<'b> {
        Frame::Deliver {
            server_id: m.server_id,
            from,
            server_time_ms: m.time_ms,
            client_id,
            body,
        }
    }
    if m.from != GROUP_SENDER {
        let client_id = super::dedupe::deliver_client_id(version, m);
        return f(&plain(m, m.from, &m.body, client_id));
    }
    let Some(e) = Envelope::decode(&m.body) else {
        // Never: only `fan_in` queues copies from user 0.
        debug_assert!(false, "a group copy without its envelope");
        return f(&plain(m, m.from, &m.body, None));
    };
    if version < proto::VERSION_2 {
        return f(&plain(m, e.from, e.body, None));
    }
    let frame = match e.event {
        None => GroupFrame::Deliver {
            server_id: m.server_id,
            group: e.group,
            msg: e.msg,
            from: e.from,
            server_time_ms: m.time_ms,
            client_id: e.client_id,
            body: e.body,
        },
        Some(event) => GroupFrame::Event {
            server_id: m.server_id,
            group: e.group,
            msg: e.msg,
            actor: e.from,
            server_time_ms: m.time_ms,
            event,
            subject: e.subject,
        },
    };
    f(&Frame::Group(frame))
}

impl Sessions {
    /// A group frame from logged-in `conn` of `user`: `Flow::Stop` when
    /// the connection is closed for it, `Flow::Blocked` when the group's
    /// home shard's ring is full (the frame is tried again later).
    pub(super) fn on_group_frame(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        user: u64,
        g: GroupFrame<&[u8]>,
    ) -> Flow {
        let s = self.slots[conn.index()];
        if s.version < proto::VERSION_2 {
            // Exactly what a version 1 server answered: an unknown type.
            self.stats.protocol_errors.inc();
            let ty = Frame::Group(g).type_byte();
            let text = proto::DecodeError::UnknownType(ty).to_string();
            self.fail(now, conn, ErrorCode::UnknownType, 0, &text);
            return Flow::Stop;
        }
        let reply = ConnRef {
            shard: self.id as u16,
            conn,
            gen: s.gen,
        };
        let cluster = self.config.cluster.is_some();
        let (group, msg) = match g {
            // A cluster's group is homed by a partition's owner: the
            // bridge publishes the request there (docs/CLUSTER.md,
            // "Groups across nodes").
            GroupFrame::Create { req } if cluster => op_msg(reply, user, req, GroupOp::Create),
            GroupFrame::Create { req } => {
                let mut records = Vec::new();
                let answer = match self.groups.home.create(user, &mut records) {
                    Ok(change) => {
                        let group = change.group;
                        self.group_changed(now, change, records);
                        GroupAnswer::Ok { req, group }
                    }
                    Err((code, text)) => GroupAnswer::Refused {
                        code,
                        id: req,
                        text,
                    },
                };
                self.replies
                    .push((self.id, Msg::GroupDone { reply, answer }));
                return Flow::Next;
            }
            GroupFrame::Add {
                req,
                group,
                user: u,
            } => op_msg(reply, user, req, GroupOp::Add { group, user: u }),
            GroupFrame::Remove {
                req,
                group,
                user: u,
            } => op_msg(reply, user, req, GroupOp::Remove { group, user: u }),
            GroupFrame::Leave { req, group } => op_msg(reply, user, req, GroupOp::Leave { group }),
            GroupFrame::Admin {
                req,
                group,
                user: u,
                admin,
            } => op_msg(
                reply,
                user,
                req,
                GroupOp::Admin {
                    group,
                    user: u,
                    admin,
                },
            ),
            GroupFrame::Members { req, group } => {
                op_msg(reply, user, req, GroupOp::Members { group })
            }
            GroupFrame::Send {
                client_id,
                group,
                body,
            } => (
                group,
                Msg::GroupSend {
                    reply,
                    from: user,
                    origin: Origin {
                        device: s.device,
                        client_id,
                    },
                    group,
                    body: body.into(),
                    sent_ns: now.mono_ns,
                },
            ),
            GroupFrame::Read { group, msg, from } => {
                if !self
                    .guard
                    .was_delivered(conn, read_key(group, msg), Some(from))
                {
                    self.unknown_message(conn, "GROUP_READ");
                    return Flow::Next;
                }
                // Behind the delivery receipts, which wait for a commit.
                self.group_receipt_out(from, ReceiptKind::Read, group, msg, user);
                return Flow::Next;
            }
            other @ (GroupFrame::Ok { .. }
            | GroupFrame::List { .. }
            | GroupFrame::Deliver { .. }
            | GroupFrame::Event { .. }
            | GroupFrame::Receipt { .. }) => {
                self.stats.protocol_errors.inc();
                let text = format!("{} is not valid here", other.name());
                self.fail(now, conn, ErrorCode::BadState, 0, &text);
                return Flow::Stop;
            }
        };
        if cluster {
            if !env.bridge_has_room() {
                return Flow::Blocked;
            }
            if matches!(msg, Msg::GroupSend { .. }) {
                self.stats.msgs_in.inc();
            }
            self.actions.push(Action::Cluster(msg));
            return Flow::Next;
        }
        let dst = home_shard(group, self.shards);
        if !env.up(dst) {
            self.stats.unavailable.inc();
            let id = match msg {
                Msg::GroupSend { origin, .. } => origin.client_id,
                Msg::GroupOp { req, .. } => req,
                _ => 0,
            };
            self.write(
                conn,
                &Frame::Error {
                    code: ErrorCode::Unavailable,
                    client_id: id,
                    text: "the group's shard is restarting, retry later",
                },
            );
            return Flow::Next;
        }
        if dst != self.id && !env.has_room(dst) {
            return Flow::Blocked;
        }
        if matches!(msg, Msg::GroupSend { .. }) {
            self.stats.msgs_in.inc();
        }
        self.route(now, env, dst, msg);
        Flow::Next
    }

    /// Whether a group frame must wait: its group's home is another shard,
    /// up, whose ring and outbox are full.
    pub(super) fn group_blocks(&self, env: &dyn Env, g: &GroupFrame<&[u8]>) -> bool {
        let group = match *g {
            GroupFrame::Add { group, .. }
            | GroupFrame::Remove { group, .. }
            | GroupFrame::Leave { group, .. }
            | GroupFrame::Admin { group, .. }
            | GroupFrame::Members { group, .. }
            | GroupFrame::Send { group, .. } => group,
            GroupFrame::Create { .. } => 0,
            _ => return false,
        };
        if self.config.cluster.is_some() {
            return !env.bridge_has_room();
        }
        if matches!(g, GroupFrame::Create { .. }) {
            return false;
        }
        let dst = home_shard(group, self.shards);
        dst != self.id && env.up(dst) && !env.has_room(dst)
    }

    /// A group message for this shard.
    pub(super) fn on_group_msg(&mut self, now: Now, msg: Msg) {
        match msg {
            Msg::GroupOp {
                reply,
                actor,
                req,
                op,
            } => self.group_op(now, reply, actor, req, op),
            Msg::GroupSend {
                reply,
                from,
                origin,
                group,
                body,
                sent_ns,
            } => {
                let answer = self.group_send(now, from, origin, group, body.into(), sent_ns);
                self.replies
                    .push((reply.shard as usize, Msg::GroupDone { reply, answer }));
            }
            Msg::GroupDone { reply, answer } => self.group_answer(now, reply, answer),
            Msg::GroupFan {
                home,
                group,
                msg,
                from,
                time_ms,
                client_id,
                event,
                subject,
                body,
                members,
            } => {
                let e = Envelope {
                    group,
                    msg,
                    from,
                    client_id,
                    event,
                    subject,
                    body: &body,
                };
                self.fan_in(&e, time_ms, &members);
                // Told once this shard's commit holds the copies.
                let stored = Msg::GroupStored {
                    group,
                    msg,
                    shard: self.id as u16,
                    stored: true,
                };
                self.replies.push((home as usize, stored));
            }
            Msg::GroupStored {
                group,
                msg,
                shard,
                stored,
            } => {
                let Some(fan) = self.groups.pending.get_mut(&(group, msg)) else {
                    return; // a repeated fan-out after a restart
                };
                if !stored {
                    let m = Self::fan_msg(self.id, group, msg, fan, shard as usize);
                    self.replies.push((shard as usize, m));
                    return;
                }
                fan.owed -= 1;
                if fan.owed == 0 {
                    self.groups.pending.remove(&(group, msg));
                    self.groups.records.push(Record::FannedOut { group, msg });
                }
            }
            Msg::GroupReceipt {
                user,
                kind,
                group,
                msg,
                peers,
                src,
                seqs,
            } => {
                self.group_receipt(user, kind, group, msg, &peers);
                if self.config.cluster.is_some() {
                    self.bridge_receipts_taken(user, &seqs);
                } else {
                    self.receipt_taken(src.into(), &seqs);
                }
            }
            other => unreachable!("not a group message: {other:?}"),
        }
    }

    /// A GROUP_SEND to `group`, homed here: ordered, staged and fanned
    /// out if new; a retry's answer is the original ACK (behind the same
    /// commit as the first copy's, if that one waits for it still).
    fn group_send(
        &mut self,
        now: Now,
        from: u64,
        origin: Origin,
        group: u64,
        body: Arc<[u8]>,
        sent_ns: u64,
    ) -> GroupAnswer {
        let client_id = origin.client_id;
        let mut records = Vec::new();
        let time_ms = now.unix_ms;
        let sent = self
            .groups
            .home
            .send(group, from, origin, time_ms, body.clone(), &mut records);
        match sent {
            Ok(Sent::New { msg }) => {
                records.into_iter().for_each(|r| self.stage_group(r));
                let lists = self
                    .groups
                    .home
                    .get_mut(group)
                    .expect("ordered: exists")
                    .by_shard(self.shards)
                    .to_vec();
                let fan = Fan {
                    from,
                    time_ms,
                    client_id,
                    event: None,
                    subject: 0,
                    body,
                    lists,
                    owed: 0,
                };
                self.fan_out(group, msg, fan);
                GroupAnswer::Ack {
                    client_id,
                    msg,
                    time_ms,
                    sent_ns,
                }
            }
            Ok(Sent::Again { msg, time_ms }) => {
                self.stats.sends_deduped.inc();
                GroupAnswer::Ack {
                    client_id,
                    msg,
                    time_ms,
                    sent_ns,
                }
            }
            Err((code, text)) => {
                if code == ErrorCode::StaleClientId {
                    self.stats.stale_client_ids.inc();
                }
                GroupAnswer::Refused {
                    code,
                    id: client_id,
                    text,
                }
            }
        }
    }

    /// A request about a group homed here.
    fn group_op(&mut self, now: Now, reply: ConnRef, actor: u64, req: u64, op: GroupOp) {
        let mut records = Vec::new();
        let home = &mut self.groups.home;
        let done = match op {
            GroupOp::Create => home.create(actor, &mut records),
            GroupOp::Add { group, user } => home.add(group, actor, user, &mut records),
            GroupOp::Remove { group, user } => home.remove(group, actor, user, &mut records),
            GroupOp::Leave { group } => home.leave(group, actor, &mut records),
            GroupOp::Admin { group, user, admin } => {
                home.set_admin(group, actor, user, admin, &mut records)
            }
            GroupOp::Members { group } => {
                let answer = match home.members_for(group, actor) {
                    Ok(g) => GroupAnswer::List {
                        req,
                        group,
                        members: g.members().collect(),
                    },
                    Err((code, text)) => GroupAnswer::Refused {
                        code,
                        id: req,
                        text,
                    },
                };
                self.replies
                    .push((reply.shard as usize, Msg::GroupDone { reply, answer }));
                return;
            }
        };
        let answer = match done {
            Ok(change) => {
                let group = change.group;
                self.group_changed(now, change, records);
                GroupAnswer::Ok { req, group }
            }
            Err((code, text)) => GroupAnswer::Refused {
                code,
                id: req,
                text,
            },
        };
        self.replies
            .push((reply.shard as usize, Msg::GroupDone { reply, answer }));
    }

    /// A change made: its records are staged, its event ordered and sent
    /// to its audience.
    fn group_changed(&mut self, now: Now, change: Change, records: Vec<Record>) {
        records.into_iter().for_each(|r| self.stage_group(r));
        let Some((event, msg)) = change.event else {
            return;
        };
        let body: Arc<[u8]> = Arc::from(&[][..]);
        self.stage_group(Record::Message {
            group: change.group,
            msg,
            from: change.actor,
            time_ms: now.unix_ms,
            client_id: 0,
            event: Some(event),
            subject: change.subject,
            body: body.clone(),
        });
        let fan = Fan {
            from: change.actor,
            time_ms: now.unix_ms,
            client_id: 0,
            event: Some(event),
            subject: change.subject,
            body,
            lists: self.by_shard(&change.audience),
            owed: 0,
        };
        self.fan_out(change.group, msg, fan);
    }

    /// `users` split by home shard.
    fn by_shard(&self, users: &[u64]) -> Vec<Arc<[u64]>> {
        let mut lists = vec![Vec::new(); self.shards];
        for &u in users {
            lists[home_shard(u, self.shards)].push(u);
        }
        lists.into_iter().map(Arc::from).collect()
    }

    fn stage_group(&mut self, record: Record) {
        self.groups.urgent = true;
        self.groups.records.push(record);
    }

    /// Sends message `msg` of `group` to every shard with a recipient in
    /// its lists, once per shard, after the commit; it stays pending here
    /// until each has it durably.
    fn fan_out(&mut self, group: u64, msg: u64, mut fan: Fan) {
        for shard in 0..fan.lists.len() {
            if fan.lists[shard].is_empty() {
                continue;
            }
            fan.owed += 1;
            if shard == self.id {
                // Members homed here: their copies are staged now, in the
                // batch this commit makes durable, and counted once it did
                // (handling them in `on_committed` would stage work while
                // a batch is being let go).
                let e = Envelope {
                    group,
                    msg,
                    from: fan.from,
                    client_id: fan.client_id,
                    event: fan.event,
                    subject: fan.subject,
                    body: &fan.body,
                };
                let members = fan.lists[shard].clone();
                self.fan_in(&e, fan.time_ms, &members);
                let stored = Msg::GroupStored {
                    group,
                    msg,
                    shard: shard as u16,
                    stored: true,
                };
                self.replies.push((shard, stored));
                continue;
            }
            let m = Self::fan_msg(self.id, group, msg, &fan, shard);
            self.replies.push((shard, m));
        }
        if fan.owed == 0 {
            self.groups.records.push(Record::FannedOut { group, msg });
        } else {
            self.groups.pending.insert((group, msg), fan);
        }
    }

    /// The [`Msg::GroupFan`] of `fan` for `shard`.
    fn fan_msg(home: usize, group: u64, msg: u64, fan: &Fan, shard: usize) -> Msg {
        Msg::GroupFan {
            home: home as u16,
            group,
            msg,
            from: fan.from,
            time_ms: fan.time_ms,
            client_id: fan.client_id,
            event: fan.event,
            subject: fan.subject,
            body: fan.body.clone(),
            members: fan.lists[shard].clone(),
        }
    }

    /// Queues a copy of `e` for each of `members` (homed here), under one
    /// new server id of this shard, all sharing one body in memory and on
    /// disk (`Store::push_shared`); sent once the commit holds them.
    fn fan_in(&mut self, e: &Envelope<'_>, time_ms: u64, members: &[u64]) {
        let server_id = (self.next_seq << 10) | self.id as u64;
        self.next_seq += 1;
        let mut bytes = Vec::with_capacity(e.encoded_len());
        e.encode(&mut bytes);
        let body: Arc<[u8]> = bytes.into();
        for &user in members {
            let copy = Stored {
                server_id,
                from: GROUP_SENDER,
                time_ms,
                origin: None,
                body: body.clone(),
            };
            match self.store.push_shared(user, copy) {
                Ok(()) => self.fresh.push(user),
                // The copy is lost for this member (documented): the
                // message was acknowledged to its sender long before.
                Err(PushError::QueueFull(_)) => self.stats.queue_full.inc(),
                Err(PushError::StorageFull(_)) => self.stats.storage_full.inc(),
            }
        }
    }

    /// The answer to a group request, for `reply`'s connection here.
    fn group_answer(&mut self, now: Now, reply: ConnRef, answer: GroupAnswer) {
        let Some(conn) = self.live(reply) else {
            return;
        };
        match answer {
            GroupAnswer::Ok { req, group } => {
                self.write(conn, &Frame::Group(GroupFrame::Ok { req, group }));
            }
            GroupAnswer::Ack {
                client_id,
                msg,
                time_ms,
                sent_ns,
            } => {
                self.stats.acks.inc();
                let ns = now.mono_ns.saturating_sub(sent_ns);
                self.stats.latency.send_to_ack.record(ns);
                self.write(
                    conn,
                    &Frame::Ack {
                        client_id,
                        server_id: msg,
                        server_time_ms: time_ms,
                    },
                );
            }
            GroupAnswer::Refused { code, id, text } => {
                self.write(
                    conn,
                    &Frame::Error {
                        code,
                        client_id: id,
                        text,
                    },
                );
            }
            GroupAnswer::List {
                req,
                group,
                members,
            } => {
                // As many entries per frame as fit in frame_bytes_max.
                let room = self
                    .config
                    .frame_bytes_max
                    .saturating_sub(LIST_HEAD_BYTES_MAX);
                let mut left = members.len();
                let mut entries = Vec::new();
                let mut rest = members.iter().peekable();
                loop {
                    entries.clear();
                    while let Some(&&(user, admin)) = rest.peek() {
                        if !entries.is_empty() && entries.len() + entry_len(user) > room {
                            break;
                        }
                        put_entry(user, admin, &mut entries);
                        rest.next();
                        left -= 1;
                    }
                    let list = GroupFrame::List {
                        req,
                        group,
                        left: left as u64,
                        entries: &entries[..],
                    };
                    self.write(conn, &Frame::Group(list));
                    if left == 0 {
                        break;
                    }
                }
            }
        }
    }

    /// Receipts for `user`'s message `msg` of `group`: GROUP_RECEIPT frames
    /// (as many members per frame as fit) to each of its version 2
    /// devices online, and kept durably for its registered devices that
    /// are offline (`registry.rs`).
    fn group_receipt(&mut self, user: u64, kind: ReceiptKind, group: u64, msg: u64, peers: &[u64]) {
        let count = self.users.count(user);
        let conns: Vec<ConnId> = (0..count)
            .map(|i| self.users.nth_conn(user, i))
            .filter(|c| self.slots[c.index()].version >= proto::VERSION_2)
            .collect();
        for conn in conns {
            self.write_group_receipts(conn, kind, group, msg, peers);
        }
        self.keep_group_receipt(user, kind, group, msg, peers);
    }

    /// GROUP_RECEIPT frames naming `peers` to `conn`, as many members per
    /// frame as fit in `frame_bytes_max`.
    pub(super) fn write_group_receipts(
        &mut self,
        conn: ConnId,
        kind: ReceiptKind,
        group: u64,
        msg: u64,
        peers: &[u64],
    ) {
        let room = self
            .config
            .frame_bytes_max
            .saturating_sub(LIST_HEAD_BYTES_MAX);
        let mut list = Vec::new();
        let mut at = 0;
        while at < peers.len() {
            list.clear();
            while at < peers.len()
                && (list.is_empty() || list.len() + varint_len(peers[at]) <= room)
            {
                put_varint(peers[at], &mut list);
                at += 1;
            }
            self.stats.receipts.inc();
            let frame = GroupFrame::Receipt {
                kind,
                group,
                msg,
                members: &list[..],
            };
            self.write(conn, &Frame::Group(frame));
        }
    }

    /// The receipt a member's DELIVERED of the group copy `m` makes: to
    /// the sender, after the commit (an event makes none).
    pub(super) fn group_delivery_receipt(&mut self, user: u64, m: &Stored) {
        let Some(e) = Envelope::decode(&m.body) else {
            return;
        };
        if e.event.is_some() || e.from == user {
            return; // nobody to tell, or the sender's own copy
        }
        self.group_receipt_out(e.from, ReceiptKind::Delivered, e.group, e.msg, user);
    }

    /// A receipt for `to`, the sender of `msg` of `group`, naming member
    /// `peer`: kept in the outbox (`outbox.rs`) and sent after the next
    /// commit (merged with the others of the commit for the same message).
    fn group_receipt_out(&mut self, to: u64, kind: ReceiptKind, group: u64, msg: u64, peer: u64) {
        let seq = self.outbox_keep(Out {
            user: to,
            kind: kind as u8,
            group,
            id: msg,
            peer,
        });
        self.replies.push((
            home_shard(to, self.shards),
            Msg::GroupReceipt {
                user: to,
                kind,
                group,
                msg,
                peers: vec![peer],
                src: self.id as u16,
                seqs: if seq == 0 { Vec::new() } else { vec![seq] },
            },
        ));
    }

    /// Records in the guard that the group copy `m` went to `conn`, so a
    /// GROUP_READ of it from there is relayed.
    pub(super) fn group_delivered(guard: &mut super::guard::Guard, conn: ConnId, m: &Stored) {
        if let Some(e) = Envelope::decode(&m.body) {
            if e.event.is_none() {
                guard.delivered(conn, read_key(e.group, e.msg), e.from);
            }
        }
    }

    /// Merges the group receipts waiting in `replies` for the same sender,
    /// message and kind into one (several members' DELIVEREDs in one
    /// commit make one GROUP_RECEIPT).
    pub(super) fn batch_group_receipts(&mut self) {
        if !self
            .replies
            .iter()
            .any(|(_, m)| matches!(m, Msg::GroupReceipt { .. }))
        {
            return;
        }
        let mut at: HashMap<(u64, ReceiptKind, u64, u64), usize> = HashMap::default();
        let mut out: Vec<(usize, Msg)> = Vec::with_capacity(self.replies.len());
        for (dst, msg) in self.replies.drain(..) {
            if let Msg::GroupReceipt {
                user,
                kind,
                group,
                msg: id,
                ref peers,
                ref seqs,
                ..
            } = msg
            {
                if let Some(&i) = at.get(&(user, kind, group, id)) {
                    if let (
                        _,
                        Msg::GroupReceipt {
                            peers: into,
                            seqs: seqs_into,
                            ..
                        },
                    ) = &mut out[i]
                    {
                        into.extend_from_slice(peers);
                        seqs_into.extend_from_slice(seqs);
                    }
                    continue;
                }
                at.insert((user, kind, group, id), out.len());
            }
            out.push((dst, msg));
        }
        self.replies = out;
    }

    /// The group log records staged since the last call, into `out`, and
    /// whether they must be synced before the commit's answers go.
    pub fn take_group_records(&mut self, out: &mut Vec<Record>) -> bool {
        out.append(&mut self.groups.records);
        std::mem::take(&mut self.groups.urgent)
    }

    /// Whether group messages wait for some shard to confirm their copies
    /// (the group log is not rewritten meanwhile: replaying it in order is
    /// what gives their recipients).
    pub fn groups_pending(&self) -> bool {
        !self.groups.pending.is_empty()
    }

    /// The records that rebuild the groups homed here (a rewrite of the
    /// group log).
    pub fn group_snapshot(&self, out: &mut Vec<Record>) {
        self.groups.home.snapshot(out);
    }

    /// Groups homed here and their memberships.
    pub fn group_counts(&self) -> (usize, usize) {
        (self.groups.home.len(), self.groups.home.memberships())
    }

    /// Rebuilds the groups homed here from their log, replayed in order
    /// (at start, or after a crash of the shard): messages ordered and not
    /// yet confirmed by every recipient's shard go out again, to the
    /// recipients of their time, after the first commit.
    pub fn restore_groups(&mut self, records: &[Record]) {
        let (members_max, per_user_max) = (
            self.config.group_members_max,
            self.config.groups_per_user_max,
        );
        self.groups = GroupState::new(self.id, self.shards, members_max, per_user_max);
        let mut waiting: Vec<(Record, Vec<Arc<[u64]>>)> = Vec::new();
        for r in records {
            self.groups.home.apply(r);
            match *r {
                Record::Message {
                    group,
                    event,
                    subject,
                    ..
                } => {
                    let mut users: Vec<u64> = self
                        .groups
                        .home
                        .get(group)
                        .map(|g| g.members().map(|(u, _)| u).collect())
                        .unwrap_or_default();
                    // The user a removal or leave was about heard of it too.
                    if matches!(
                        event,
                        Some(proto::GroupEvent::Removed | proto::GroupEvent::Left)
                    ) && !users.contains(&subject)
                    {
                        users.push(subject);
                    }
                    waiting.push((r.clone(), self.by_shard(&users)));
                }
                Record::FannedOut { group, msg } => {
                    waiting.retain(|(w, _)| {
                        !matches!(*w, Record::Message { group: g, msg: m, .. } if (g, m) == (group, msg))
                    });
                }
                _ => {}
            }
        }
        for (r, lists) in waiting {
            if let Record::Message {
                group,
                msg,
                from,
                time_ms,
                client_id,
                event,
                subject,
                body,
            } = r
            {
                let fan = Fan {
                    from,
                    time_ms,
                    client_id,
                    event,
                    subject,
                    body,
                    lists,
                    owed: 0,
                };
                self.fan_out(group, msg, fan);
            }
        }
    }
}

/// Checks at compile time that the largest GROUP_DELIVER fits: its body is
/// `GROUP_BODY_ROOM_BYTES` below `body_bytes_max`, which leaves 41 bytes
/// of the frame for a v2 DELIVER's fields; GROUP_DELIVER has two more
/// varints.
const GROUP_DELIVER_HEAD_BYTES_MAX: usize = 1 + 6 * proto::LEN_PREFIX_BYTES_MAX;
const _: () = assert!(GROUP_DELIVER_HEAD_BYTES_MAX <= 41 + GROUP_BODY_ROOM_BYTES);

/// What becomes of the answer `a` to a group request when its shard
/// restarted before the commit that would have let it go: a change or
/// message may not be durable, so it is refused (`internal`: retry); a
/// refusal or a member list stands.
pub(super) fn lost(a: GroupAnswer) -> GroupAnswer {
    match a {
        GroupAnswer::Ok { req: id, .. } | GroupAnswer::Ack { client_id: id, .. } => {
            GroupAnswer::Refused {
                code: ErrorCode::Internal,
                id,
                text: "the group's shard restarted before this was durable, retry",
            }
        }
        other => other,
    }
}

/// A membership request `op` from `actor` (request id `req`), for the
/// group's home shard: the group and the ring message.
fn op_msg(reply: ConnRef, actor: u64, req: u64, op: GroupOp) -> (u64, Msg) {
    let group = match op {
        GroupOp::Create => 0,
        GroupOp::Add { group, .. }
        | GroupOp::Remove { group, .. }
        | GroupOp::Leave { group }
        | GroupOp::Admin { group, .. }
        | GroupOp::Members { group } => group,
    };
    (
        group,
        Msg::GroupOp {
            reply,
            actor,
            req,
            op,
        },
    )
}
