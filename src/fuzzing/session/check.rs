//! One event on one shard: its actions executed as the shard would, and
//! every invariant checked against the model.

use std::collections::BTreeMap;

use crate::group::envelope::{Envelope, GROUP_SENDER};
use crate::io::ConnId;
use crate::proto::{self, ByeReason, ErrorCode, Frame, GroupFrame, ReceiptKind};
use crate::session::{Action, Event, Flow, State};
use crate::shard::{home_shard, Msg};
use crate::token;

use super::{Client, Note, Ring, Sim, SimEnv, ANSWER_BYTES_MAX, CLIENTS, SECRET};

impl Sim {
    /// Runs `event` on shard `s`, executes its actions and checks the
    /// invariants.
    pub(super) fn event(&mut self, s: usize, event: Event<'_>) -> Flow {
        let note = self.note(s, &event);
        let conn = match event {
            Event::Frame { conn, .. } => Some(conn),
            _ => None,
        };
        if let (Note::Login(claim, version), Some(conn)) = (&note, conn) {
            // Recorded at once: the session may establish or hand off the
            // connection in this very event.
            let client = self.shards[s].owner[&conn.0];
            if let Some(c) = self.conn_mut(client) {
                c.claim = *claim;
                c.version = *version;
            }
        }
        let counts = matches!(
            event,
            Event::Frame { .. } | Event::Msg(_) | Event::HandedOver { .. }
        );
        let env = SimEnv {
            room: self.shards[s].room,
            pending: self.clients_of(s),
        };
        let flow = self.shards[s].sessions.on_event(self.now, &env, event);
        if counts {
            self.shards[s].events_since_commit += 1;
        }
        let mut actions = std::mem::take(&mut self.actions);
        let mut wire = std::mem::take(&mut self.wire);
        self.shards[s]
            .sessions
            .take_actions(&mut actions, &mut wire);
        // A frame refused (over its rate, or naming a message not delivered
        // here) is not taken: the model learns nothing from it.
        let refused = conn.is_some_and(|conn| self.refused(s, conn, &actions, &wire));
        if flow != Flow::Blocked && !refused {
            self.apply(note);
        }
        let mut acks = Vec::new();
        let mut answers = [0usize; CLIENTS];
        for action in actions.drain(..) {
            self.execute(s, action, &wire, &mut acks, &mut answers);
        }
        self.actions = actions;
        self.wire = wire;
        self.check_store(s);
        for (client, client_id, server_id) in acks {
            self.check_ack(client, client_id, server_id);
        }
        let bound = 2 + self.config.queue_len_max + self.shards[s].events_since_commit;
        for (client, &n) in answers.iter().enumerate() {
            assert!(
                n <= bound,
                "client {client} got {n} answers in one event (bound {bound})"
            );
        }
        self.check_conns(s);
        self.delivered_now.clear();
        flow
    }

    /// Whether this event's writes to `conn` refuse its frame:
    /// `ERROR(rate_limited)`, `ERROR(unknown_message)` or `BYE(rate_limited)`.
    fn refused(&self, s: usize, conn: ConnId, actions: &[Action], wire: &[u8]) -> bool {
        let limits = *self.shards[s].sessions.limits();
        actions.iter().any(|action| {
            let Action::Write { conn: c, bytes } = action else {
                return false;
            };
            let mut at = bytes.start;
            let mut refusal = false;
            while *c == conn && at < bytes.end {
                let Ok(Some((frame, used))) = proto::decode(&wire[at..bytes.end], &limits) else {
                    break; // reported by `execute`
                };
                at += used;
                refusal |= matches!(
                    frame,
                    Frame::Error {
                        code: ErrorCode::RateLimited | ErrorCode::UnknownMessage,
                        ..
                    } | Frame::Bye {
                        reason: ByeReason::RateLimited
                    }
                );
            }
            refusal
        })
    }

    /// The unsent output of shard `s`'s connections.
    pub(super) fn clients_of(&self, s: usize) -> Vec<(ConnId, usize)> {
        self.clients
            .iter()
            .filter_map(|c| match c {
                Client::On(c) if c.shard == s => Some((c.id, c.out_pending)),
                _ => None,
            })
            .collect()
    }

    /// What `event` tells the model, learnt before the session handles it.
    pub(super) fn note(&self, s: usize, event: &Event<'_>) -> Note {
        let Event::Frame { conn, frame, .. } = event else {
            return Note::None;
        };
        let sessions = &self.shards[s].sessions;
        match (sessions.state(*conn), frame) {
            (State::Login, Frame::Login { version, token }) => Note::Login(
                (proto::VERSION..=proto::VERSION_MAX)
                    .contains(version)
                    .then(|| {
                        token::verify_device(SECRET.as_bytes(), token, self.now.unix_ms / 1000).ok()
                    })
                    .flatten(),
                *version,
            ),
            (State::Active, frame) => {
                // The user the model saw the token prove, not the session's
                // own idea of it (checked equal after every event).
                let client = self.shards[s].owner[&conn.0];
                let c = self.conn(client).expect("an active connection");
                let user = c.user.expect("an active connection's proven user");
                let here = c.delivered_here.get(&frame_id(frame)).copied();
                match *frame {
                    Frame::Send {
                        client_id,
                        to,
                        body,
                    } => Note::Send {
                        client,
                        user,
                        client_id,
                        v2: c.version >= proto::VERSION_2,
                        to,
                        body: body.into(),
                    },
                    Frame::Delivered { server_id } => Note::Delivered {
                        client,
                        user,
                        server_id,
                        known: here.is_some(),
                    },
                    Frame::Read { server_id, from } => Note::Read {
                        user,
                        server_id,
                        from,
                        known: here == Some(from),
                    },
                    Frame::Group(GroupFrame::Send { client_id, .. }) => {
                        Note::GroupSend { client, client_id }
                    }
                    Frame::DeviceRemove { .. } => Note::DeviceRemove { user },
                    Frame::Group(GroupFrame::Create { .. }) => Note::GroupUser(user),
                    Frame::Group(GroupFrame::Add { user, .. }) => Note::GroupUser(user),
                    _ => Note::None,
                }
            }
            _ => Note::None,
        }
    }

    pub(super) fn apply(&mut self, note: Note) {
        match note {
            Note::None | Note::Login(..) => {}
            Note::Send {
                client,
                user,
                client_id,
                v2,
                to,
                body,
            } => {
                if let Some(c) = self.conn_mut(client) {
                    c.sends.push(client_id);
                }
                self.recipients.insert(to);
                self.sends.push((user, to, body, v2.then_some(client_id)));
            }
            Note::Delivered {
                client,
                user,
                server_id,
                known,
            } => {
                if let Some(c) = self.conn_mut(client) {
                    c.outstanding.remove(&server_id);
                }
                // Only a DELIVERED of a message delivered here may remove it;
                // the first device's DELIVERED is what its delivery receipt
                // follows (other devices may still owe it).
                if known {
                    self.delivered_now.push((user, server_id));
                    self.delivered.insert(server_id);
                }
            }
            Note::DeviceRemove { user } => self.removed_now.push(user),
            Note::GroupSend { client, client_id } => {
                if let Some(c) = self.conn_mut(client) {
                    c.groups.sends.push(client_id);
                }
            }
            // Walked by `check_store`: its group copies are counted there.
            Note::GroupUser(user) => {
                self.recipients.insert(user);
            }
            Note::Read {
                user,
                server_id,
                from,
                known,
            } => {
                // Only a READ of a message delivered here, naming its
                // sender, may be relayed.
                if known {
                    self.reads.insert((user, server_id, from));
                }
            }
        }
    }

    /// Executes one action as the shard would, checking it.
    pub(super) fn execute(
        &mut self,
        s: usize,
        action: Action,
        wire: &[u8],
        acks: &mut Vec<(usize, u64, u64)>,
        answers: &mut [usize; CLIENTS],
    ) {
        let n = self.n();
        let owner = |sim: &Sim, conn: ConnId| -> usize {
            *sim.shards[s]
                .owner
                .get(&conn.0)
                .unwrap_or_else(|| panic!("action on slot {} of shard {s}, not open", conn.0))
        };
        match action {
            Action::Cluster(_) => panic!("a standalone session asked for the cluster bridge"),
            // The shard counts a failed login against the address; the
            // model has no addresses.
            Action::LoginFailed(conn) => {
                owner(self, conn);
            }
            Action::Write { conn, bytes } => {
                let client = owner(self, conn);
                let limits = *self.shards[s].sessions.limits();
                let mut at = bytes.start;
                while at < bytes.end {
                    let (frame, used) = proto::decode(&wire[at..bytes.end], &limits)
                        .unwrap_or_else(|e| {
                            panic!(
                                "the session wrote a bad frame: {e}: {:02x?}",
                                &wire[at..bytes.end]
                            )
                        })
                        .expect("the session writes whole frames");
                    at += used;
                    self.check_write(s, client, &frame, used, acks, answers);
                }
                let c = self.conn_mut(client).expect("an open connection");
                assert!(!c.closing, "write to a connection already closing");
                c.out_pending += bytes.len();
            }
            Action::Route { dst, msg } => {
                assert!(dst < n && dst != s, "route from {s} to {dst}");
                if let Msg::Send { from, reply, .. } = &msg {
                    assert_eq!(usize::from(reply.shard), s);
                    let client = owner(self, reply.conn);
                    assert_eq!(reply.gen, self.shards[s].sessions.gen(reply.conn));
                    let user = self.conn(client).and_then(|c| c.user);
                    assert_eq!(user, Some(*from), "a SEND routed as another user");
                }
                if let Msg::Send {
                    reply,
                    origin: Some(origin),
                    ..
                } = &msg
                {
                    let claim = self.conn(owner(self, reply.conn)).and_then(|c| c.claim);
                    assert_eq!(
                        claim.map(|c| c.device),
                        Some(origin.device),
                        "a v2 SEND known by a device its token did not name"
                    );
                }
                assert!(!matches!(msg, Msg::Handoff { .. }));
                self.rings[dst][s].push_back(Ring::Msg(msg));
            }
            Action::Handoff {
                conn,
                user,
                device,
                version,
                home,
            } => {
                let client = owner(self, conn);
                let claim = self.conn(client).and_then(|c| c.claim);
                assert_eq!(
                    claim,
                    Some(token::Claims { user, device }),
                    "handoff as a user or device the token did not prove"
                );
                assert_eq!(home, home_shard(user, n));
                assert_ne!(home, s);
                assert_eq!(self.shards[s].sessions.state(conn), State::Free);
                self.shards[s].owner.remove(&conn.0);
                self.clients[client] = Client::Moving;
                assert!(self
                    .handoff
                    .replace((client, user, device, version, home))
                    .is_none());
            }
            Action::Arm { entry, deadline } => {
                owner(self, ConnId(entry.key));
                assert_eq!(entry.gen, self.shards[s].sessions.gen(ConnId(entry.key)));
                assert!(deadline >= self.now.tick);
                self.shards[s]
                    .timers
                    .insert(entry.key, (entry.gen, deadline));
            }
            Action::Established(conn) => {
                let client = owner(self, conn);
                let user = self.shards[s].sessions.user_of(conn);
                let c = self.conn_mut(client).expect("an open connection");
                assert!(
                    user.is_some() && c.claim.map(|c| c.user) == user,
                    "logged in as {user:?}, token proved {:?}",
                    c.claim
                );
                assert_eq!(home_shard(user.expect("checked"), n), s);
                c.user = user;
            }
            Action::CloseAfterFlush(conn) => {
                let client = owner(self, conn);
                let c = self.conn_mut(client).expect("an open connection");
                c.closing = true;
                c.blocked = false;
                c.inp.clear();
            }
            Action::CloseNow(conn) => {
                let client = owner(self, conn);
                assert_eq!(self.shards[s].sessions.state(conn), State::Free);
                self.shards[s].owner.remove(&conn.0);
                self.clients[client] = Client::Gone;
            }
        }
    }

    /// One frame written to `client`.
    pub(super) fn check_write(
        &mut self,
        s: usize,
        client: usize,
        frame: &Frame<'_>,
        len: usize,
        acks: &mut Vec<(usize, u64, u64)>,
        answers: &mut [usize; CLIENTS],
    ) {
        *self.tally.entry(frame.name()).or_default() += 1;
        let user = self.conn(client).and_then(|c| c.user);
        if self.group_copy(s, client, frame, len) {
            return;
        }
        if let Frame::Deliver {
            server_id,
            from,
            body,
            client_id,
            ..
        } = *frame
        {
            let user = user.expect("a DELIVER to a connection not logged in");
            let queued = self.shards[s]
                .sessions
                .store()
                .next_after(user, server_id - 1)
                .filter(|m| m.server_id == server_id)
                .unwrap_or_else(|| panic!("DELIVER {server_id} to user {user}: not in its queue"));
            assert_eq!((queued.from, &*queued.body), (from, body));
            let origin = queued.origin.map_or(0, |o| o.client_id);
            let c = self.conn_mut(client).expect("an open connection");
            // A v2 DELIVER (0x0E) exactly on a v2 connection, with the
            // sender's v2 client_id (0 for a v1 sender).
            let want = (c.version >= proto::VERSION_2).then_some(origin);
            assert_eq!(
                client_id, want,
                "DELIVER {server_id} on a v{} connection",
                c.version
            );
            assert!(
                c.outstanding.insert(server_id, len).is_none(),
                "DELIVER {server_id} twice on one connection"
            );
            c.delivered_here.insert(server_id, from);
            return;
        }
        // A SENT carries the body of a message, as a DELIVER does.
        if !matches!(frame, Frame::Sent { .. }) {
            assert!(len <= ANSWER_BYTES_MAX, "{len}-byte {}", frame.name());
        }
        answers[client] += 1;
        // A GROUP_SEND's ACK: its number is the group's, not a queue's.
        // Raw bytes may give a SEND and a GROUP_SEND the same client id:
        // then an ACK naming a stored message of this client id is the
        // SEND's.
        let group_ack = match *frame {
            Frame::Ack {
                client_id,
                server_id,
                ..
            } => self.conn(client).is_some_and(|c| {
                let device = c.claim.map_or(0, |c| c.device);
                c.groups.sends.contains(&client_id)
                    && !(c.sends.contains(&client_id)
                        && self.messages.contains_key(&server_id)
                        && (c.version < proto::VERSION_2
                            || self.origins.get(&server_id) == Some(&(device, client_id))))
            }),
            _ => false,
        };
        match *frame {
            Frame::Ack { client_id, .. } if group_ack => {
                let c = self.conn_mut(client).expect("an ACK to an open connection");
                let at = c
                    .groups
                    .sends
                    .iter()
                    .position(|&id| id == client_id)
                    .unwrap_or_else(|| panic!("ACK for group client id {client_id}, never sent"));
                c.groups.sends.swap_remove(at);
            }
            Frame::Ack {
                client_id,
                server_id,
                ..
            } => acks.push((client, client_id, server_id)),
            Frame::Receipt {
                kind,
                server_id,
                peer,
            } => {
                let user = user.expect("a RECEIPT to a connection not logged in");
                match kind {
                    ReceiptKind::Delivered => {
                        assert_eq!(self.messages.get(&server_id), Some(&(peer, user)));
                        assert!(self.delivered.contains(&server_id));
                    }
                    ReceiptKind::Read => {
                        assert!(self.reads.contains(&(peer, server_id, user)));
                    }
                }
            }
            Frame::LoginOk { .. } | Frame::Pong { .. } => assert!(user.is_some()),
            _ => {}
        }
    }

    /// An ACK answers a SEND of the connection and names a message its
    /// user sent, still queued or delivered.
    /// A group copy written to `client` (GROUP_DELIVER, GROUP_EVENT, or a
    /// plain DELIVER of one to a version 1 connection): it is in the
    /// user's queue as the envelope says, and joins the connection's
    /// delivery window. False for any other frame.
    fn group_copy(&mut self, s: usize, client: usize, frame: &Frame<'_>, len: usize) -> bool {
        let (server_id, shown) = match *frame {
            Frame::Group(GroupFrame::Deliver {
                server_id,
                group,
                msg,
                from,
                body,
                ..
            }) => (server_id, Some((group, msg, from, body))),
            Frame::Group(GroupFrame::Event { server_id, .. })
            | Frame::Deliver { server_id, .. } => (server_id, None),
            _ => return false,
        };
        let user = self
            .conn(client)
            .and_then(|c| c.user)
            .expect("a copy to a connection not logged in");
        let Some(queued) = self.shards[s]
            .sessions
            .store()
            .next_after(user, server_id - 1)
            .filter(|m| m.server_id == server_id && m.from == GROUP_SENDER)
        else {
            // Not a group copy: a DELIVER of a message, checked by the caller.
            assert!(
                !matches!(frame, Frame::Group(_)),
                "{} {server_id}: not queued",
                frame.name()
            );
            return false;
        };
        let e = Envelope::decode(&queued.body).expect("a group copy's envelope");
        if let Some((group, msg, from, body)) = shown {
            assert_eq!((e.group, e.msg, e.from, e.body), (group, msg, from, body));
        }
        let (group, msg, from, event) = (e.group, e.msg, e.from, e.event);
        let c = self.conn_mut(client).expect("an open connection");
        assert!(
            c.outstanding.insert(server_id, len).is_none(),
            "group copy {server_id} twice on one connection"
        );
        c.delivered_here.insert(server_id, GROUP_SENDER);
        if event.is_none() {
            c.groups.here.insert((group, msg), from);
        }
        true
    }

    pub(super) fn check_ack(&mut self, client: usize, client_id: u64, server_id: u64) {
        let c = self.conn_mut(client).expect("an ACK to an open connection");
        let user = c.user;
        let device = c.claim.map_or(0, |c| c.device);
        let at = c
            .sends
            .iter()
            .position(|&id| id == client_id)
            .unwrap_or_else(|| panic!("ACK for client id {client_id}, never sent"));
        c.sends.swap_remove(at);
        let v2 = c.version >= proto::VERSION_2;
        if v2 {
            // The message stored for this client_id of this device: a
            // retry's ACK repeats the original server id.
            assert_eq!(
                self.origins.get(&server_id),
                Some(&(device, client_id)),
                "v2 ACK for client id {client_id} names message {server_id}"
            );
        }
        let (_, from) = self
            .messages
            .get(&server_id)
            .unwrap_or_else(|| panic!("ACK for message {server_id}, never stored"));
        assert_eq!(Some(*from), user, "ACK of another user's message");
        let queued = self
            .shards
            .iter()
            .any(|sh| sh.stored.contains_key(&server_id));
        // Both, while other devices of the recipient still owe it.
        assert!(
            queued || self.delivered.contains(&server_id),
            "ACKed message {server_id} neither queued nor delivered"
        );
    }

    /// Shard `s`'s store against the model: messages come only from SENDs,
    /// once, on their recipient's home shard, and leave only by DELIVERED.
    pub(super) fn check_store(&mut self, s: usize) {
        let n = self.n();
        let store = self.shards[s].sessions.store();
        // Unchanged: every push raises the highest id (ids only grow), and
        // a removal without a push lowers the count. The walk below is most
        // of the oracle's time.
        let counters = (store.total(), store.max_server_id());
        // (The count includes group copies, which `stored` leaves out.)
        if counters == (self.shards[s].total_seen, self.shards[s].max_seen) {
            return;
        }
        let mut now: BTreeMap<u64, u64> = BTreeMap::new();
        let mut total = 0;
        for &user in &self.recipients {
            let mut after = 0;
            let mut len = 0;
            while let Some(m) = store.next_after(user, after) {
                if m.from == GROUP_SENDER {
                    // A group copy: the model follows messages of SENDs.
                    after = m.server_id;
                    len += 1;
                    continue;
                }
                assert!(
                    now.insert(m.server_id, user).is_none(),
                    "id {} twice",
                    m.server_id
                );
                if !self.shards[s].stored.contains_key(&m.server_id) {
                    assert!(
                        !self.messages.contains_key(&m.server_id),
                        "id {} reused",
                        m.server_id
                    );
                    assert_eq!(home_shard(user, n), s, "stored away from its home");
                    let device = m.origin.map_or(0, |o| o.device);
                    let origin = m.origin.map(|o| o.client_id);
                    let at = self
                        .sends
                        .iter()
                        .position(|(from, to, body, v2)| {
                            (*from, *to, &**body, *v2) == (m.from, user, &*m.body, origin)
                        })
                        .unwrap_or_else(|| {
                            panic!(
                                "message {} from {} to {user}: nobody sent it",
                                m.server_id, m.from
                            )
                        });
                    self.sends.swap_remove(at);
                    self.messages.insert(m.server_id, (user, m.from));
                    if let Some(client_id) = origin {
                        self.origins.insert(m.server_id, (device, client_id));
                        let key = (s, m.from, device, client_id);
                        let first = self.taken.insert(key, m.server_id);
                        assert!(
                            first.is_none(),
                            "v2 client id {client_id} of {} stored twice: {first:?} and {}",
                            m.from,
                            m.server_id
                        );
                    }
                }
                after = m.server_id;
                len += 1;
            }
            assert_eq!(len, store.len(user));
            assert!(len <= self.config.queue_len_max);
            total += len;
        }
        assert_eq!(total, store.total(), "messages for users nobody sent to");
        for (&server_id, &user) in &self.shards[s].stored {
            if !now.contains_key(&server_id) {
                assert!(
                    self.delivered_now.contains(&(user, server_id))
                        || self.removed_now.contains(&user),
                    "message {server_id} left {user}'s queue without a DELIVERED"
                );
                self.delivered.insert(server_id);
            }
        }
        self.shards[s].stored = now;
        self.shards[s].total_seen = counters.0;
        self.shards[s].max_seen = counters.1;
    }

    /// Shard `s`'s slots and users against the model.
    pub(super) fn check_conns(&self, s: usize) {
        let sh = &self.shards[s];
        let sessions = &sh.sessions;
        for i in 0..sessions.slots().max(sh.owner.len()) {
            let id = ConnId(i as u32);
            assert_eq!(
                sessions.state(id) != State::Free,
                sh.owner.contains_key(&id.0),
                "slot {i} of shard {s}"
            );
        }
        for &client in sh.owner.values() {
            let c = self.conn(client).expect("an owned slot's connection");
            let state = sessions.state(c.id);
            let user = sessions.user_of(c.id);
            if state == State::Active {
                assert!(user.is_some() && user == c.user, "{user:?} vs {:?}", c.user);
            }
            let Some(user) = user else {
                continue;
            };
            assert!(sessions.conns_of(user).contains(&c.id));
            let (count, bytes) = sessions
                .window_of(user, c.id)
                .expect("an online device's window");
            let mine = c.outstanding.values().sum::<usize>();
            assert_eq!(
                (count as usize, bytes as usize),
                (c.outstanding.len(), mine),
                "delivery window of user {user}"
            );
            assert!(c.outstanding.len() <= self.config.deliver_inflight_max);
            assert!(c.outstanding.len() <= 1 || mine <= self.config.deliver_inflight_bytes_max);
        }
    }
}

/// The server id a DELIVERED or READ names (0 for other frames).
fn frame_id(frame: &Frame<'_>) -> u64 {
    match *frame {
        Frame::Delivered { server_id } | Frame::Read { server_id, .. } => server_id,
        _ => 0,
    }
}
