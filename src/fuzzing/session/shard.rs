//! The shard's part of the simulation: what `crate::shard` does around
//! the session layer (slots, input decoding, rings, commits, flushes,
//! timers), executed over the model.

use crate::io::ConnId;
use crate::proto;
use crate::session::{Event, Flow, State};
use crate::timer::{Entry, Tick, TICK};
use crate::token::Claims;

use super::{is_crash_hook, Client, Conn, Ring, Sim, CLIENTS, T0_MS};

impl Sim {
    /// Takes `client` into the lowest free slot of shard `s`.
    pub(super) fn attach(&mut self, s: usize, client: usize, user: Option<(Claims, u8)>) -> ConnId {
        let owner = &self.shards[s].owner;
        let slot = (0..).find(|i| !owner.contains_key(i)).expect("a free slot");
        let id = ConnId(slot);
        self.shards[s].owner.insert(slot, client);
        self.clients[client] = Client::On(Conn::new(s, id, user));
        self.event(s, Event::Opened(id));
        id
    }

    /// Bytes arrive from `client`, as `Shard::on_bytes` takes them.
    pub(super) fn on_bytes(&mut self, client: usize, data: &[u8]) {
        let Some(c) = self.conn(client) else {
            return;
        };
        let (s, id) = (c.shard, c.id);
        if self.event(s, Event::Received(id)) == Flow::Stop {
            return; // closing or gone: read and dropped
        }
        let Some(c) = self.conn_mut(client) else {
            return;
        };
        c.inp.extend_from_slice(data);
        if !c.blocked {
            self.process(client);
        }
    }

    /// Hands the frames of `client`'s input to its session, as
    /// `Shard::process` does.
    pub(super) fn process(&mut self, client: usize) {
        let Some(c) = self.conn_mut(client) else {
            return;
        };
        let (s, id) = (c.shard, c.id);
        let inp = std::mem::take(&mut c.inp);
        let gen = self.shards[s].sessions.gen(id);
        let limits = *self.shards[s].sessions.limits();
        let mut at = 0;
        // Each frame takes at least 2 bytes.
        for _ in 0..=inp.len() / 2 {
            let (frame, used) = match proto::decode(&inp[at..], &limits) {
                Ok(None) => break,
                Ok(Some(decoded)) => decoded,
                Err(error) => {
                    self.event(s, Event::Undecodable { conn: id, error });
                    return;
                }
            };
            if is_crash_hook(&frame) {
                at += used;
                continue;
            }
            let rest = &inp[at + used..];
            match self.event(
                s,
                Event::Frame {
                    conn: id,
                    frame,
                    rest,
                },
            ) {
                Flow::Next => at += used,
                Flow::Blocked => {
                    if let Some(c) = self.conn_mut(client) {
                        c.blocked = true;
                    }
                    break;
                }
                Flow::Stop => {
                    if let Some((moving, user, device, version, home)) = self.handoff.take() {
                        assert_eq!(moving, client);
                        self.rings[home][s].push_back(Ring::Handoff {
                            client,
                            user,
                            device,
                            version,
                            leftover: rest.to_vec(),
                        });
                    }
                    return;
                }
            }
            let sessions = &self.shards[s].sessions;
            if sessions.gen(id) != gen || sessions.state(id).is_closing() {
                return;
            }
        }
        if let Some(c) = self.conn_mut(client) {
            if c.id == id && c.shard == s && !c.closing {
                debug_assert!(c.inp.is_empty());
                c.inp = inp[at..].to_vec();
            }
        }
    }

    /// A ring item arrives at shard `dst`.
    pub(super) fn on_ring(&mut self, dst: usize, item: Ring) {
        match item {
            Ring::Msg(msg) => {
                self.event(dst, Event::Msg(msg));
            }
            Ring::Handoff {
                client,
                user,
                device,
                version,
                leftover,
            } => {
                assert!(matches!(self.clients[client], Client::Moving));
                let id = self.attach(dst, client, Some((Claims { user, device }, version)));
                self.event(
                    dst,
                    Event::HandedOver {
                        conn: id,
                        user,
                        device,
                        version,
                        resumed: false,
                    },
                );
                if !leftover.is_empty() {
                    self.on_bytes(client, &leftover);
                }
            }
        }
    }

    pub(super) fn commit(&mut self, s: usize) {
        let mut refused = Vec::new();
        self.shards[s]
            .sessions
            .store_mut()
            .commit(&mut refused)
            .expect("a memory store commits");
        assert!(refused.is_empty(), "a memory store refuses nothing");
        self.event(s, Event::Committed { refused: &refused });
        self.shards[s].events_since_commit = 0;
    }

    /// Every shard's loop iteration: the rings (what is in them now), the
    /// commit, blocked senders retried; then every output flushed.
    pub(super) fn iteration(&mut self) {
        for dst in 0..self.n() {
            for src in 0..self.n() {
                for _ in 0..self.rings[dst][src].len() {
                    if let Some(item) = self.rings[dst][src].pop_front() {
                        self.on_ring(dst, item);
                    }
                }
            }
            self.commit(dst);
            self.retry_blocked(dst);
        }
        for client in 0..CLIENTS {
            self.drain(client);
        }
    }

    pub(super) fn retry_blocked(&mut self, s: usize) {
        if !self.shards[s].room {
            return;
        }
        for client in 0..CLIENTS {
            let Some(c) = self.conn_mut(client) else {
                continue;
            };
            if c.shard == s && c.blocked {
                c.blocked = false;
                let id = c.id;
                if self.shards[s].sessions.state(id) == State::Active {
                    self.process(client);
                }
            }
        }
    }

    /// `client`'s output is flushed; a closing connection's write side
    /// shuts.
    pub(super) fn drain(&mut self, client: usize) {
        let Some(c) = self.conn_mut(client) else {
            return;
        };
        c.out_pending = 0;
        let (s, id) = (c.shard, c.id);
        if self.shards[s].sessions.state(id) == State::Closing {
            self.event(s, Event::WriteShut(id));
        }
    }

    /// Time advances by `ticks`; due timers fire, in deadline order.
    pub(super) fn advance(&mut self, ticks: Tick) {
        self.now.tick += ticks;
        self.now.unix_ms = T0_MS + u64::from(self.now.tick) * TICK.as_millis() as u64;
        for s in 0..self.n() {
            let mut due: Vec<(Tick, u32, u32)> = self.shards[s]
                .timers
                .iter()
                .filter(|(_, &(_, deadline))| deadline <= self.now.tick)
                .map(|(&key, &(gen, deadline))| (deadline, key, gen))
                .collect();
            due.sort_unstable();
            for (_, key, gen) in due {
                self.shards[s].timers.remove(&key);
                self.event(s, Event::Timer(Entry { key, gen }));
            }
        }
    }

    /// After a step: a connection whose unsent output passed the budget is
    /// reported slow, as the shard does after a flush.
    pub(super) fn settle(&mut self) {
        for client in 0..CLIENTS {
            let Some(c) = self.conn(client) else {
                continue;
            };
            let (s, id) = (c.shard, c.id);
            if c.out_pending > self.config.conn_out_bytes_max
                && self.shards[s].sessions.state(id) == State::Active
            {
                self.event(s, Event::Slow(id));
            }
        }
    }
}
