//! Presence, last seen and typing (protocol v2; docs/PROTOCOL.md,
//! "Presence").
//!
//! A subscription has two halves. The subscriber's home shard keeps the
//! list of users each of its online users watches (bounded by
//! `presence_subs_max`), so it can count them and undo them when the
//! connection ends. The watched user's home shard keeps, per watched user,
//! the subscriber connections ([`ConnRef`]s, on any shard), and pushes
//! PRESENCE to them when the user comes online, goes offline or changes
//! its privacy. Both halves exist only for users who subscribed or are
//! watched: an idle connection without subscriptions pays nothing here.
//!
//! Last seen and the privacy setting of the users homed here are kept in
//! `seen` (only for users seen offline at least once, or hidden) and made
//! durable by the shard (`store::presence`): it takes the changed records
//! with [`Sessions::take_presence_records`].

use foldhash::HashMap;

use crate::cluster::Owner;
use crate::io::ConnId;
use crate::proto::{ErrorCode, Frame, PresenceState};
use crate::shard::{home_shard, ConnRef, Msg};
use crate::store::presence::{Record, Seen};

use super::{Action, Env, Now, Sessions, State};

/// The presence state of one shard.
#[derive(Default)]
pub(super) struct Presence {
    /// Watched users homed here: the connections watching each.
    watchers: HashMap<u64, Vec<ConnRef>>,
    /// Cluster: watched users homed here, the connections of other nodes
    /// watching each, with their node as the bridge numbers nodes.
    remote: HashMap<u64, Vec<(u16, ConnRef)>>,
    /// Entries of `watchers` and `remote`, all users.
    watchers_len: usize,
    /// Sessions here: the users each watches (its subscriptions), at most
    /// `presence_subs_max`. Per connection, not per user: each device of a
    /// user has its own.
    subs: HashMap<ConnId, Vec<u64>>,
    /// Users homed here seen offline at least once, or hidden.
    pub(super) seen: std::collections::HashMap<u64, Seen>,
    /// Records changed since the last [`Sessions::take_presence_records`].
    dirty: Vec<Record>,
    /// A privacy change is among `dirty`: flush it without waiting for
    /// `last_seen_write_s`.
    urgent: bool,
    /// Connections that left in this event, with their user: their
    /// subscriptions end and their user may have gone offline (settled at
    /// the end of the event, once a replacing login is in place).
    gone: Vec<(u64, ConnRef)>,
}

impl Presence {
    /// Forgets the subscriptions (a shard restart: every connection here is
    /// gone). Last seen and privacy are kept: they are not per connection.
    pub(super) fn clear(&mut self) {
        self.watchers.clear();
        self.remote.clear();
        self.watchers_len = 0;
        self.subs.clear();
        self.gone.clear();
    }
}

impl Sessions {
    /// Installs the last seen and privacy state replayed from the shard's
    /// presence log.
    pub fn restore_presence(&mut self, seen: std::collections::HashMap<u64, Seen>) {
        self.presence.seen = seen;
    }

    /// The durable presence state: last seen and privacy per user.
    pub fn presence_state(&self) -> &std::collections::HashMap<u64, Seen> {
        &self.presence.seen
    }

    /// Whether records wait to be written, and whether one of them should
    /// not wait for `last_seen_write_s` (a privacy change).
    pub fn presence_pending(&self) -> (bool, bool) {
        (!self.presence.dirty.is_empty(), self.presence.urgent)
    }

    /// Moves the records changed since the last call into `out`.
    pub fn take_presence_records(&mut self, out: &mut Vec<Record>) {
        out.clear();
        out.append(&mut self.presence.dirty);
        self.presence.urgent = false;
    }

    /// Counts `n` presence records made durable.
    pub fn count_presence_records(&mut self, n: usize) {
        self.stats.presence_records.add(n as u64);
    }

    /// What subscribers of `user` (homed here) see now.
    fn presence_of(&self, user: u64) -> (PresenceState, u64) {
        let seen = self.presence.seen.get(&user).copied().unwrap_or_default();
        if seen.hidden {
            (PresenceState::Hidden, 0)
        } else if self.users.conn_of(user).is_some() {
            (PresenceState::Online, 0)
        } else {
            (PresenceState::Offline, seen.last_seen_ms)
        }
    }

    /// Sends `user`'s state now to every connection watching it.
    fn push_presence(&mut self, now: Now, env: &dyn Env, user: u64) {
        let (state, last_seen_ms) = self.presence_of(user);
        if let Some(remote) = self.presence.remote.get(&user) {
            for &(node, sub) in remote {
                self.actions.push(Action::Cluster(Msg::RemotePresence {
                    node,
                    sub,
                    user,
                    state,
                    last_seen_ms,
                }));
            }
        }
        let Some(subs) = self.presence.watchers.get(&user) else {
            return;
        };
        let subs = subs.clone();
        for sub in subs {
            let msg = Msg::Presence {
                sub,
                user,
                state,
                last_seen_ms,
            };
            self.route(now, env, sub.shard as usize, msg);
        }
    }

    /// `user` (homed here) has a session again, not replacing one.
    pub(super) fn presence_online(&mut self, now: Now, env: &dyn Env, user: u64) {
        if !self.is_hidden(user) {
            self.push_presence(now, env, user);
        }
    }

    fn is_hidden(&self, user: u64) -> bool {
        self.presence.seen.get(&user).is_some_and(|s| s.hidden)
    }

    /// Notes that `conn` of `user` left; settled by [`Sessions::settle_presence`].
    pub(super) fn presence_gone(&mut self, user: u64, conn: ConnId, gen: u32) {
        let sub = ConnRef {
            shard: self.id as u16,
            conn,
            gen,
        };
        self.presence.gone.push((user, sub));
    }

    /// At the end of each event: the connections that left end their
    /// subscriptions, and their users, unless logged in again meanwhile
    /// (a replacing login), go offline: last seen is now.
    pub(super) fn settle_presence(&mut self, now: Now, env: &dyn Env) {
        if self.presence.gone.is_empty() {
            return;
        }
        for (user, sub) in std::mem::take(&mut self.presence.gone) {
            for watched in self.presence.subs.remove(&sub.conn).unwrap_or_default() {
                self.unwatch(now, env, watched, sub);
            }
            if self.users.count(user) > 0 {
                continue; // replaced, or another device: still online
            }
            let seen = self.presence.seen.entry(user).or_default();
            seen.last_seen_ms = now.unix_ms;
            self.presence.dirty.push(Record::LastSeen {
                user,
                last_seen_ms: now.unix_ms,
            });
            if !self.is_hidden(user) {
                self.push_presence(now, env, user);
            }
        }
    }

    /// The reply to a presence frame a version 1 session sent: exactly what
    /// a version 1 server answered (the type was unknown to it).
    fn presence_v1(&mut self, now: Now, conn: ConnId, frame: &Frame<'_>) {
        self.stats.protocol_errors.inc();
        let ty = match frame {
            Frame::Subscribe { .. } => 0x18,
            Frame::Unsubscribe { .. } => 0x19,
            Frame::Presence { .. } => 0x1a,
            Frame::Privacy { .. } => 0x1b,
            _ => 0x1c,
        };
        let text = crate::proto::DecodeError::UnknownType(ty).to_string();
        self.fail(now, conn, ErrorCode::UnknownType, 0, &text);
    }

    /// A presence frame from logged-in `conn` of `user`: `false` when the
    /// connection is closed for it.
    pub(super) fn on_presence_frame(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        user: u64,
        frame: Frame<'_>,
    ) -> bool {
        let s = self.slots[conn.index()];
        if s.version < crate::proto::VERSION_2 {
            self.presence_v1(now, conn, &frame);
            return false;
        }
        match frame {
            Frame::Subscribe { user: watched } => self.subscribe(now, env, conn, watched),
            Frame::Unsubscribe { user: watched } => {
                let list = self.presence.subs.entry(conn).or_default();
                if let Some(at) = list.iter().position(|&w| w == watched) {
                    list.swap_remove(at);
                    if list.is_empty() {
                        self.presence.subs.remove(&conn);
                    }
                    let sub = ConnRef {
                        shard: self.id as u16,
                        conn,
                        gen: s.gen,
                    };
                    self.unwatch(now, env, watched, sub);
                } else if list.is_empty() {
                    self.presence.subs.remove(&conn);
                }
            }
            Frame::Privacy { hidden } => {
                let seen = self.presence.seen.entry(user).or_default();
                if seen.hidden != hidden {
                    seen.hidden = hidden;
                    if *seen == Seen::default() {
                        self.presence.seen.remove(&user);
                    }
                    self.presence.dirty.push(Record::Privacy { user, hidden });
                    self.presence.urgent = true;
                    self.push_presence(now, env, user);
                }
            }
            Frame::Typing { user: to } => match env.owner(to) {
                _ if to == user => {}
                Owner::Here => {
                    let dst = home_shard(to, self.shards);
                    self.route(now, env, dst, Msg::Typing { from: user, to });
                }
                // Through the bridge to the peer's node.
                Owner::Elsewhere { .. } => {
                    self.actions
                        .push(Action::Cluster(Msg::Typing { from: user, to }));
                }
                Owner::Nobody => {}
            },
            _ => {
                // PRESENCE goes from server to client only.
                self.stats.protocol_errors.inc();
                let text = format!("{} is not valid here", frame.name());
                self.fail(now, conn, ErrorCode::BadState, 0, &text);
                return false;
            }
        }
        true
    }

    fn subscribe(&mut self, now: Now, env: &dyn Env, conn: ConnId, watched: u64) {
        let home = home_shard(watched, self.shards);
        let list_len = self.presence.subs.get(&conn).map_or(0, Vec::len);
        let known = self
            .presence
            .subs
            .get(&conn)
            .is_some_and(|l| l.contains(&watched));
        let owner = env.owner(watched);
        let refused = if owner == Owner::Nobody {
            Some((
                ErrorCode::Unavailable,
                "no node serves the watched user right now, retry later",
            ))
        } else if owner == Owner::Here && !env.up(home) {
            Some((
                ErrorCode::Unavailable,
                "the watched user's home shard is restarting, retry later",
            ))
        } else if !known && list_len >= self.config.presence_subs_max {
            self.stats.presence_subs_refused.inc();
            Some((
                ErrorCode::PresenceSubsFull,
                "presence_subs_max users watched already; UNSUBSCRIBE one first",
            ))
        } else {
            None
        };
        if let Some((code, text)) = refused {
            self.write(
                conn,
                &Frame::Error {
                    code,
                    client_id: watched,
                    text,
                },
            );
            return;
        }
        if !known {
            self.presence.subs.entry(conn).or_default().push(watched);
        }
        let sub = ConnRef {
            shard: self.id as u16,
            conn,
            gen: self.slots[conn.index()].gen,
        };
        // Also when known: the answer is the state now, as for the first.
        let msg = Msg::Watch { user: watched, sub };
        if owner == Owner::Here {
            self.route(now, env, home, msg);
        } else {
            // Served by another node: through the bridge, which sends it
            // to the owner and follows the user from node to node.
            self.actions.push(Action::Cluster(msg));
        }
    }

    /// `sub` stops watching `user`. In a cluster also the bridge is told:
    /// the subscription went there if another node served the user when
    /// it was made, or when this node lost the user's partition since.
    fn unwatch(&mut self, now: Now, env: &dyn Env, user: u64, sub: ConnRef) {
        let msg = Msg::Unwatch { user, sub };
        if self.config.cluster.is_some() {
            self.actions
                .push(Action::Cluster(Msg::Unwatch { user, sub }));
        }
        self.route(now, env, home_shard(user, self.shards), msg);
    }

    /// Cluster, after this node stopped serving some users (`Event::Moved`,
    /// their sessions closed and their subscribers told `offline`): local
    /// subscriptions to them go to the bridge, which sends them to the new
    /// owner; other nodes' subscriptions are forgotten (their nodes send
    /// them to the new owner).
    pub(super) fn presence_moved(&mut self, env: &dyn Env) {
        let gone: Vec<u64> = self
            .presence
            .watchers
            .keys()
            .chain(self.presence.remote.keys())
            .copied()
            .filter(|&user| env.owner(user) != Owner::Here)
            .collect();
        for user in gone {
            if let Some(remote) = self.presence.remote.remove(&user) {
                self.presence.watchers_len -= remote.len();
            }
            for sub in self.presence.watchers.remove(&user).unwrap_or_default() {
                self.presence.watchers_len -= 1;
                self.actions.push(Action::Cluster(Msg::Watch { user, sub }));
            }
        }
        self.stats
            .presence_subs
            .set(self.presence.watchers_len as u64);
    }

    /// A presence message from a shard (or this one).
    pub(super) fn on_presence_msg(&mut self, now: Now, env: &dyn Env, msg: Msg) {
        match msg {
            Msg::Watch { user, sub } => {
                let list = self.presence.watchers.entry(user).or_default();
                if !list.contains(&sub) {
                    list.push(sub);
                    self.presence.watchers_len += 1;
                    self.stats
                        .presence_subs
                        .set(self.presence.watchers_len as u64);
                }
                let (state, last_seen_ms) = self.presence_of(user);
                let msg = Msg::Presence {
                    sub,
                    user,
                    state,
                    last_seen_ms,
                };
                self.route(now, env, sub.shard as usize, msg);
            }
            Msg::RemoteWatch {
                user,
                node,
                sub,
                on,
            } => {
                let list = self.presence.remote.entry(user).or_default();
                let at = list.iter().position(|&r| r == (node, sub));
                match (on, at) {
                    (true, None) => {
                        list.push((node, sub));
                        self.presence.watchers_len += 1;
                    }
                    (false, Some(at)) => {
                        list.swap_remove(at);
                        self.presence.watchers_len -= 1;
                    }
                    _ => {}
                }
                if list.is_empty() {
                    self.presence.remote.remove(&user);
                }
                self.stats
                    .presence_subs
                    .set(self.presence.watchers_len as u64);
                // A user this node no longer serves is the new owner's to
                // answer (the subscriber's node sends it there).
                if on && env.owner(user) == Owner::Here {
                    let (state, last_seen_ms) = self.presence_of(user);
                    self.actions.push(Action::Cluster(Msg::RemotePresence {
                        node,
                        sub,
                        user,
                        state,
                        last_seen_ms,
                    }));
                }
            }
            Msg::Unwatch { user, sub } => {
                if let Some(list) = self.presence.watchers.get_mut(&user) {
                    if let Some(at) = list.iter().position(|&s| s == sub) {
                        list.swap_remove(at);
                        self.presence.watchers_len -= 1;
                        self.stats
                            .presence_subs
                            .set(self.presence.watchers_len as u64);
                    }
                    if list.is_empty() {
                        self.presence.watchers.remove(&user);
                    }
                }
            }
            Msg::Presence {
                sub,
                user,
                state,
                last_seen_ms,
            } => match self.live(sub) {
                Some(conn) => {
                    self.stats.presence_pushes.inc();
                    self.write(
                        conn,
                        &Frame::Presence {
                            user,
                            state,
                            last_seen_ms,
                        },
                    );
                }
                // Gone without its Unwatch (its shard restarted): undo the
                // subscription from this side.
                None => self.unwatch(now, env, user, sub),
            },
            Msg::Typing { from, to } => {
                // Every online version 2 device of the peer.
                for i in 0..self.users.count(to) {
                    let conn = self.users.nth_conn(to, i);
                    let s = self.slots[conn.index()];
                    if s.state == State::Active && s.version >= crate::proto::VERSION_2 {
                        self.stats.typing_relayed.inc();
                        self.write(conn, &Frame::Typing { user: from });
                    }
                }
            }
            other => debug_assert!(false, "not a presence message: {other:?}"),
        }
    }
}
