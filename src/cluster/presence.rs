//! Presence across nodes (docs/CLUSTER.md, "Presence across nodes"): a
//! SUBSCRIBE to a user another node serves. Presence is never stored in
//! JetStream: it is a state, not a message, so it travels on plain NATS
//! subjects, one per node (`ternp.<node_id>`), and a lost record is made
//! good by the next change or the next SUBSCRIBE.
//!
//! The subscriber's node (its bridge) keeps every remote subscription of
//! its connections ([`Watches`]) and sends each to the watched user's
//! owner, which registers it on the user's home shard next to its local
//! subscribers: the home shard answers the state now and every change, as
//! for a local subscriber, through its bridge. When the watched user's
//! partition changes owner, the subscriber's bridge sends the
//! subscriptions again to the new owner (or to its own home shard when the
//! partition came here); while nobody serves it, subscribers of a user last
//! seen online get `offline`. TYPING to a user another node serves takes
//! the same subjects.

use std::collections::HashMap;

use crate::io::ConnId;
use crate::proto::{put_varint, PresenceState};
use crate::shard::{home_shard, ConnRef, Msg};

use super::owners::Owner;

const KIND_WATCH: u8 = 1;
const KIND_UNWATCH: u8 = 2;
const KIND_STATE: u8 = 3;
const KIND_TYPING: u8 = 4;

/// The plain NATS subject node `node` reads presence records on. Not
/// under `tern.`: the single stream of the layout before split streams
/// captured `tern.>`.
pub fn subject(node: &str) -> String {
    format!("ternp.{node}")
}

/// One presence record between nodes. `node` is the sender's node id;
/// `sub` a subscriber connection on the subscriber's node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Subscriber node `node` asks the owner for `user`'s state now and
    /// every change, for `sub`.
    Watch {
        /// The watched user.
        user: u64,
        /// The subscriber's connection.
        sub: ConnRef,
        /// The subscriber's node.
        node: String,
    },
    /// `sub` on node `node` stops watching `user`.
    Unwatch {
        /// The watched user.
        user: u64,
        /// The subscriber's connection.
        sub: ConnRef,
        /// The subscriber's node.
        node: String,
    },
    /// Owner node `node` tells `sub` the state of `user`.
    State {
        /// The watched user.
        user: u64,
        /// The subscriber's connection.
        sub: ConnRef,
        /// Online, offline or hidden.
        state: PresenceState,
        /// Offline: last seen, ms since the Unix epoch; else 0.
        last_seen_ms: u64,
        /// The owner's node.
        node: String,
    },
    /// `from`, on node `node`, is typing to `to`, whom the receiving node
    /// serves. Never stored.
    Typing {
        /// The peer.
        to: u64,
        /// The typist.
        from: u64,
        /// The typist's node.
        node: String,
    },
}

impl Record {
    /// The bytes published: kind, user, the subscriber's shard, connection
    /// and generation as varints, for a state its state and last seen,
    /// then the node id (the rest). Typing: kind, peer, typist, node id.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        let (kind, user, sub, node) = match self {
            Record::Watch { user, sub, node } => (KIND_WATCH, user, sub, node),
            Record::Unwatch { user, sub, node } => (KIND_UNWATCH, user, sub, node),
            Record::State {
                user, sub, node, ..
            } => (KIND_STATE, user, sub, node),
            Record::Typing { to, from, node } => {
                out.push(KIND_TYPING);
                put_varint(*to, &mut out);
                put_varint(*from, &mut out);
                out.extend_from_slice(node.as_bytes());
                return out;
            }
        };
        out.push(kind);
        for v in [
            *user,
            u64::from(sub.shard),
            u64::from(sub.conn.0),
            u64::from(sub.gen),
        ] {
            put_varint(v, &mut out);
        }
        if let Record::State {
            state,
            last_seen_ms,
            ..
        } = self
        {
            put_varint(*state as u64, &mut out);
            put_varint(*last_seen_ms, &mut out);
        }
        out.extend_from_slice(node.as_bytes());
        out
    }

    /// Parses a record; `None` for anything else (garbage published on a
    /// node's subject, or a record of a newer version).
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let (&kind, mut rest) = bytes.split_first()?;
        let mut next = || -> Option<u64> {
            let (v, used) = super::wire::varint(rest)?;
            rest = &rest[used..];
            Some(v)
        };
        let user = next()?;
        if kind == KIND_TYPING {
            let from = next()?;
            let node = std::str::from_utf8(rest).ok()?.to_owned();
            return super::config::valid_node_id(&node).then_some(Record::Typing {
                to: user,
                from,
                node,
            });
        }
        let sub = ConnRef {
            shard: u16::try_from(next()?).ok()?,
            conn: ConnId(u32::try_from(next()?).ok()?),
            gen: u32::try_from(next()?).ok()?,
        };
        let state = if kind == KIND_STATE {
            Some((PresenceState::from_u64(next()?)?, next()?))
        } else {
            None
        };
        let node = std::str::from_utf8(rest).ok()?.to_owned();
        if !super::config::valid_node_id(&node) {
            return None;
        }
        match (kind, state) {
            (KIND_WATCH, None) => Some(Record::Watch { user, sub, node }),
            (KIND_UNWATCH, None) => Some(Record::Unwatch { user, sub, node }),
            (KIND_STATE, Some((state, last_seen_ms))) => Some(Record::State {
                user,
                sub,
                state,
                last_seen_ms,
                node,
            }),
            _ => None,
        }
    }
}

/// What [`Watches`] asks the relay to do.
#[derive(Debug)]
pub enum Out {
    /// Publish `record` on node `node`'s subject.
    Publish {
        /// The node it is for.
        node: String,
        /// What.
        record: Record,
    },
    /// Hand `msg` to local shard `dst`.
    Shard {
        /// The shard.
        dst: usize,
        /// What.
        msg: Msg,
    },
}

/// One watched user served by another node, as the subscriber's node
/// keeps it.
#[derive(Debug)]
struct Watched {
    /// Local subscriber connections.
    subs: Vec<ConnRef>,
    /// The node the subscriptions were sent to; `None` while nobody
    /// serves the user.
    target: Option<String>,
    /// The last state the owner reported was `online`.
    online: bool,
}

/// The remote subscriptions of this node's connections, by watched user.
/// Bounded by the connections' own `presence_subs_max`.
#[derive(Debug, Default)]
pub struct Watches {
    users: HashMap<u64, Watched>,
    subs: usize,
}

impl Watches {
    /// Subscriptions held (one per subscriber connection and watched user).
    pub fn len(&self) -> usize {
        self.subs
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.subs == 0
    }

    /// `sub` (on this node) watches `user`, served by `owner`; `me` is this
    /// node's id. A user served here goes to its home shard.
    pub fn watch(
        &mut self,
        me: &str,
        shards: usize,
        user: u64,
        sub: ConnRef,
        owner: Owner<'_>,
        out: &mut Vec<Out>,
    ) {
        let node = match owner {
            Owner::Here => {
                // The partition came here since the session looked.
                let dst = home_shard(user, shards);
                out.push(Out::Shard {
                    dst,
                    msg: Msg::Watch { user, sub },
                });
                return;
            }
            Owner::Elsewhere { node, .. } => Some(node.to_owned()),
            Owner::Nobody => None,
        };
        let w = self.users.entry(user).or_insert_with(|| Watched {
            subs: Vec::new(),
            target: node.clone(),
            online: false,
        });
        if !w.subs.contains(&sub) {
            w.subs.push(sub);
            self.subs += 1;
        }
        // While nobody serves the user, the answer waits for its next
        // owner ([`Watches::reconcile`]).
        if let Some(node) = &w.target {
            out.push(Out::Publish {
                node: node.clone(),
                record: Record::Watch {
                    user,
                    sub,
                    node: me.to_owned(),
                },
            });
        }
    }

    /// `sub` stops watching `user` (UNSUBSCRIBE or closed).
    pub fn unwatch(&mut self, me: &str, user: u64, sub: ConnRef, out: &mut Vec<Out>) {
        let Some(w) = self.users.get_mut(&user) else {
            return;
        };
        let Some(at) = w.subs.iter().position(|&s| s == sub) else {
            return;
        };
        w.subs.swap_remove(at);
        self.subs -= 1;
        if let Some(node) = &w.target {
            out.push(Out::Publish {
                node: node.clone(),
                record: Record::Unwatch {
                    user,
                    sub,
                    node: me.to_owned(),
                },
            });
        }
        if w.subs.is_empty() {
            self.users.remove(&user);
        }
    }

    /// A state from an owner node: handed to the subscriber's shard if the
    /// subscription is held here (and sent to that node), else answered
    /// with an Unwatch so the owner forgets it (a subscription this node
    /// no longer has, e.g. from before a restart).
    pub fn state(
        &mut self,
        me: &str,
        from: &str,
        user: u64,
        sub: ConnRef,
        (state, last_seen_ms): (PresenceState, u64),
        out: &mut Vec<Out>,
    ) {
        let held = self
            .users
            .get_mut(&user)
            .filter(|w| w.subs.contains(&sub) && w.target.as_deref() == Some(from));
        match held {
            Some(w) => {
                w.online = state == PresenceState::Online;
                out.push(Out::Shard {
                    dst: sub.shard as usize,
                    msg: Msg::Presence {
                        sub,
                        user,
                        state,
                        last_seen_ms,
                    },
                });
            }
            None => out.push(Out::Publish {
                node: from.to_owned(),
                record: Record::Unwatch {
                    user,
                    sub,
                    node: me.to_owned(),
                },
            }),
        }
    }

    /// Compares each watched user's owner now (`owner_of`) with the node
    /// its subscriptions went to. A new owner gets them all again (it
    /// answers each with the state now); a user nobody serves any more, last
    /// reported online, is reported offline at `now_ms` (its sessions ended
    /// with its node); a user served here now goes to its home shard.
    pub fn reconcile<'a>(
        &mut self,
        me: &str,
        shards: usize,
        now_ms: u64,
        owner_of: impl Fn(u64) -> Owner<'a>,
        out: &mut Vec<Out>,
    ) {
        let mut here = Vec::new();
        for (&user, w) in &mut self.users {
            let owner = owner_of(user);
            let now = match owner {
                Owner::Here => {
                    here.push(user);
                    continue;
                }
                Owner::Elsewhere { node, .. } => Some(node),
                Owner::Nobody => None,
            };
            if w.target.as_deref() == now {
                continue;
            }
            w.target = now.map(str::to_owned);
            match now {
                Some(node) => {
                    for &sub in &w.subs {
                        out.push(Out::Publish {
                            node: node.to_owned(),
                            record: Record::Watch {
                                user,
                                sub,
                                node: me.to_owned(),
                            },
                        });
                    }
                }
                None if w.online => {
                    w.online = false;
                    for &sub in &w.subs {
                        out.push(Out::Shard {
                            dst: sub.shard as usize,
                            msg: Msg::Presence {
                                sub,
                                user,
                                state: PresenceState::Offline,
                                last_seen_ms: now_ms,
                            },
                        });
                    }
                }
                None => {}
            }
        }
        for user in here {
            let w = self.users.remove(&user).expect("listed above");
            self.subs -= w.subs.len();
            for sub in w.subs {
                out.push(Out::Shard {
                    dst: home_shard(user, shards),
                    msg: Msg::Watch { user, sub },
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(shard: u16, conn: u32) -> ConnRef {
        ConnRef {
            shard,
            conn: ConnId(conn),
            gen: 7,
        }
    }

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Watch {
                user: 42,
                sub: sub(1, 300),
                node: "a".into(),
            },
            Record::Unwatch {
                user: u64::MAX,
                sub: sub(0, 0),
                node: "node-b_2".into(),
            },
            Record::State {
                user: 9,
                sub: sub(3, 1 << 20),
                state: PresenceState::Offline,
                last_seen_ms: 1_767_225_600_000,
                node: "c".into(),
            },
            Record::Typing {
                to: 1,
                from: 1 << 40,
                node: "d".into(),
            },
        ];
        for r in records {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(Record::decode(b""), None);
        // No node id.
        assert_eq!(Record::decode(&[KIND_WATCH, 1, 0, 0, 0]), None);
        assert_eq!(Record::decode(&[KIND_TYPING, 1, 2]), None);
        // Not a node id (a subject wildcard).
        assert_eq!(Record::decode(&[KIND_WATCH, 1, 0, 0, 0, b'>']), None);
        // Unknown kind, unknown state, shard out of range.
        assert_eq!(Record::decode(&[9, 1, 0, 0, 0, b'a']), None);
        assert_eq!(Record::decode(&[KIND_STATE, 1, 0, 0, 0, 9, 0, b'a']), None);
        assert_eq!(
            Record::decode(&[KIND_WATCH, 1, 0x80, 0x80, 0x04, 0, 0, b'a']),
            None
        );
    }

    fn elsewhere(node: &str) -> Owner<'_> {
        Owner::Elsewhere { node, addr: "x:1" }
    }

    #[test]
    fn a_subscription_follows_its_user_from_node_to_node() {
        let mut w = Watches::default();
        let mut out = Vec::new();
        let s = sub(1, 5);
        w.watch("me", 2, 42, s, elsewhere("o"), &mut out);
        assert!(matches!(
            &std::mem::take(&mut out)[..],
            [Out::Publish {
                node,
                record: Record::Watch { user: 42, sub: got, node: me },
            }] if node == "o" && *got == s && me == "me"
        ));
        // Online from the owner: handed to the subscriber's shard.
        w.state("me", "o", 42, s, (PresenceState::Online, 0), &mut out);
        assert!(matches!(
            out.drain(..).next(),
            Some(Out::Shard {
                dst: 1,
                msg: Msg::Presence {
                    state: PresenceState::Online,
                    ..
                }
            })
        ));
        // The owner died: offline at the time noticed.
        w.reconcile("me", 2, 1000, |_| Owner::Nobody, &mut out);
        assert!(matches!(
            out.drain(..).next(),
            Some(Out::Shard {
                msg: Msg::Presence {
                    state: PresenceState::Offline,
                    last_seen_ms: 1000,
                    ..
                },
                ..
            })
        ));
        // Nothing more while nobody serves it.
        w.reconcile("me", 2, 2000, |_| Owner::Nobody, &mut out);
        assert!(out.is_empty());
        // A new owner gets the subscription again.
        w.reconcile("me", 2, 3000, |_| elsewhere("n"), &mut out);
        assert!(matches!(
            out.drain(..).next(),
            Some(Out::Publish { node, record: Record::Watch { .. } }) if node == "n"
        ));
        // A state from the old owner is not passed on: it is told to forget.
        w.state("me", "o", 42, s, (PresenceState::Online, 0), &mut out);
        assert!(matches!(
            out.drain(..).next(),
            Some(Out::Publish { node, record: Record::Unwatch { .. } }) if node == "o"
        ));
        // Served here now: to the home shard, no longer held.
        w.reconcile("me", 2, 4000, |_| Owner::Here, &mut out);
        assert!(matches!(
            out.drain(..).next(),
            Some(Out::Shard {
                msg: Msg::Watch { user: 42, .. },
                ..
            })
        ));
        assert!(w.is_empty());
    }

    #[test]
    fn unwatch_tells_the_owner_and_forgets() {
        let mut w = Watches::default();
        let mut out = Vec::new();
        w.watch("me", 2, 42, sub(0, 1), elsewhere("o"), &mut out);
        w.watch("me", 2, 42, sub(0, 2), elsewhere("o"), &mut out);
        w.watch("me", 2, 42, sub(0, 2), elsewhere("o"), &mut out);
        assert_eq!(w.len(), 2);
        out.clear();
        w.unwatch("me", 42, sub(0, 1), &mut out);
        w.unwatch("me", 42, sub(0, 1), &mut out);
        assert_eq!(out.len(), 1, "one Unwatch for one subscription: {out:?}");
        w.unwatch("me", 42, sub(0, 2), &mut out);
        assert!(w.is_empty());
    }
}
