//! Routing between shards: what travels ([`Msg`]), where a user lives
//! ([`home_shard`]), how a reply finds its connection ([`ConnRef`]), the
//! outboxes that hold messages a full ring did not take, and whether a peer
//! shard is up.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::io::{ConnId, Detached};
use crate::proto::{ErrorCode, GroupEvent, PresenceState, ReceiptKind};
use crate::ring::Links;
use crate::stats::ShardStats;
use crate::store::{Origin, Stored};
use crate::supervisor::ShardState;
use crate::tls::TlsConn;

/// Messages an emptied outbox keeps room for.
const OUTBOX_KEEP_CAPACITY: usize = 1024;

/// The shard that owns `user`: a fixed hash of the id, so every shard agrees.
pub fn home_shard(user: u64, shards: usize) -> usize {
    // splitmix64 finaliser: sequential ids spread evenly.
    let mut z = user.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % shards as u64) as usize
}

/// A connection on a given shard, valid while its generation matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub(crate) shard: u16,
    pub(crate) conn: ConnId,
    pub(crate) gen: u32,
}

/// What travels between shards.
#[derive(Debug)]
pub enum Msg {
    /// A connection whose LOGIN was verified, moving to its user's home shard
    /// with the bytes that followed the LOGIN frame.
    Handoff {
        /// The socket.
        conn: Detached,
        /// The user its token proved.
        user: u64,
        /// The user's device its token named.
        device: u32,
        /// The protocol version its LOGIN asked for.
        version: u8,
        /// Input after the LOGIN frame, not yet decoded.
        leftover: Vec<u8>,
        /// TLS connections: their TLS state.
        tls: Option<Box<TlsConn>>,
        /// The connection is an upgraded WebSocket one.
        ws: bool,
        /// WebSocket connections with a partial frame: their receive
        /// state (`None` when idle, the usual case: no allocation).
        ws_rx: Option<Box<crate::ws::WsRx>>,
        /// MQTT connections: their state after the CONNECT (`leftover` is
        /// then the MQTT input that followed it).
        mqtt: Option<crate::mqtt::bridge::Mode>,
        /// TLS connections: records not yet sent (e.g. session tickets
        /// that rode with the LOGIN's handshake flight).
        out: Vec<u8>,
    },
    /// A message for a user homed on the receiving shard.
    Send {
        /// Sender's user id.
        from: u64,
        /// The sender's connection, for the ACK.
        reply: ConnRef,
        /// The sender's id for the message.
        client_id: u64,
        /// The sender spoke protocol v2: the SEND is idempotent per
        /// (sender, device, client_id); `None` for v1.
        origin: Option<Origin>,
        /// Recipient's user id.
        to: u64,
        /// Message body (shared, as the store keeps it).
        body: Arc<[u8]>,
        /// When the SEND was decoded ([`Now::mono_ns`](crate::session::Now)), for
        /// the latency histograms.
        sent_ns: u64,
    },
    /// The recipient's shard took the message: one tick for the sender.
    Ack {
        /// The sender's connection.
        reply: ConnRef,
        /// The sender's id for the message.
        client_id: u64,
        /// Server id of the stored message.
        server_id: u64,
        /// When it was stored.
        time_ms: u64,
        /// When the SEND was decoded ([`Now::mono_ns`](crate::session::Now)), for
        /// the latency histograms.
        sent_ns: u64,
    },
    /// The recipient's shard refused the message.
    Reject {
        /// The sender's connection.
        reply: ConnRef,
        /// The sender's id for the message.
        client_id: u64,
        /// Why.
        code: ErrorCode,
    },
    /// A delivery or read receipt for `user`, homed on the receiving shard.
    Receipt {
        /// Who gets the receipt (the original sender).
        user: u64,
        /// Delivered or read.
        kind: ReceiptKind,
        /// The message it is about.
        server_id: u64,
        /// Who received or read it.
        peer: u64,
        /// The shard whose receipt outbox holds it (the one that took the
        /// DELIVERED or READ), to answer [`Msg::ReceiptsTaken`].
        src: u16,
        /// Its number in that outbox, 0 if not kept there. In a cluster,
        /// from the bridge: the bridge's number for the JetStream record
        /// ([`crate::session::BridgeReceipt`]).
        seq: u64,
    },
    /// The receipts `seqs` of the receiving shard's receipt outbox reached
    /// their user's home shard (written to its online devices, or kept
    /// durably for its offline ones): they leave the outbox. In a cluster,
    /// shard to bridge: the receipt records `seqs` were written to every
    /// device of their users, to be acked in JetStream.
    ReceiptsTaken {
        /// Their numbers in the outbox.
        seqs: Vec<u64>,
    },
    /// Shard `shard` restarted after a crash and may have lost receipts it
    /// had taken but not yet made durable: the receiving shard sends it
    /// again every receipt of its outbox for a user homed there. In a
    /// cluster, shard to bridge: the receipt records it took and did not
    /// answer are lost, for JetStream to bring again.
    ReceiptsResend {
        /// The shard that restarted.
        shard: u16,
    },
    /// Cluster, bridge to shard: a message consumed from JetStream for
    /// `to`, homed on the receiving shard; its server id is its stream
    /// sequence. Already durable: no answer goes back.
    Incoming {
        /// Recipient.
        to: u64,
        /// The message.
        msg: Stored,
    },
    /// Presence: the connection `sub` watches `user`, homed on the
    /// receiving shard; answered with a [`Msg::Presence`] of its state now.
    Watch {
        /// The watched user.
        user: u64,
        /// The subscriber's connection.
        sub: ConnRef,
    },
    /// Presence: `sub` stops watching `user` (UNSUBSCRIBE, or `sub` closed).
    Unwatch {
        /// The watched user.
        user: u64,
        /// The subscriber's connection.
        sub: ConnRef,
    },
    /// Presence: `user`'s state, for the subscriber connection `sub` on the
    /// receiving shard (written as a PRESENCE frame if `sub` is still live).
    Presence {
        /// The subscriber's connection.
        sub: ConnRef,
        /// The watched user.
        user: u64,
        /// Online, offline or hidden.
        state: PresenceState,
        /// Offline: last seen, ms since the Unix epoch (0: never); else 0.
        last_seen_ms: u64,
    },
    /// `from` is typing to `to`, homed on the receiving shard; never stored.
    Typing {
        /// The typist.
        from: u64,
        /// The peer.
        to: u64,
    },
    /// Groups: a request about `group` for its home shard (the receiving
    /// one), from `actor`'s connection `reply`.
    GroupOp {
        /// The requester's connection, for the answer.
        reply: ConnRef,
        /// Who asks.
        actor: u64,
        /// The request's id, echoed in the answer.
        req: u64,
        /// What is asked.
        op: GroupOp,
    },
    /// Groups: a GROUP_SEND for the group's home shard (the receiving one).
    GroupSend {
        /// The sender's connection, for the ACK.
        reply: ConnRef,
        /// The sender.
        from: u64,
        /// The sender's device and its id for the message: what a retry
        /// is known by.
        origin: Origin,
        /// The group.
        group: u64,
        /// The body.
        body: Box<[u8]>,
        /// When the GROUP_SEND was decoded, for the latency histograms.
        sent_ns: u64,
    },
    /// Groups: the answer to a group request, for the requester's shard
    /// (the receiving one), once the change is durable.
    GroupDone {
        /// The requester's connection.
        reply: ConnRef,
        /// The answer.
        answer: GroupAnswer,
    },
    /// Groups: a message (or event) the home shard `home` ordered, for the
    /// members homed on the receiving shard: one ring message per shard
    /// and message, whatever the number of members there.
    GroupFan {
        /// The group's home shard, told once the copies are durable.
        home: u16,
        /// The group.
        group: u64,
        /// Its number in the group's order.
        msg: u64,
        /// The sender (an event's actor).
        from: u64,
        /// When the home shard took it.
        time_ms: u64,
        /// The sender's client_id (0 for an event).
        client_id: u64,
        /// `None`: a message; else a membership event.
        event: Option<GroupEvent>,
        /// An event's subject.
        subject: u64,
        /// The body, shared by every shard's copy of this message.
        body: Arc<[u8]>,
        /// The recipients homed on the receiving shard.
        members: Arc<[u64]>,
    },
    /// Groups: the receiving shard (the group's home) learns that shard
    /// `shard` holds its copies of `msg` durably, or (`stored` false) that
    /// it restarted before it did: the home sends them again.
    GroupStored {
        /// The group.
        group: u64,
        /// The message.
        msg: u64,
        /// The members' shard.
        shard: u16,
        /// Durable there; `false`: send again.
        stored: bool,
    },
    /// Groups: members `peers` got (or read) `msg` of `group`, sent by
    /// `user`, homed on the receiving shard; batched.
    GroupReceipt {
        /// The sender, who gets the receipt.
        user: u64,
        /// Delivered or read.
        kind: ReceiptKind,
        /// The group.
        group: u64,
        /// The message.
        msg: u64,
        /// The members it is about.
        peers: Vec<u64>,
        /// The shard whose receipt outbox holds them (the members' shard).
        src: u16,
        /// Their numbers in that outbox (one per member; none for a
        /// receipt not kept there). In a cluster, from the bridge: the
        /// bridge's number for the JetStream record.
        seqs: Vec<u64>,
    },
    /// Cluster, bridge to `user`'s home shard (the receiving one): the
    /// connection `sub` on another node, known to the bridge as node
    /// number `node`, starts (`on`) or stops watching `user`.
    RemoteWatch {
        /// The watched user.
        user: u64,
        /// The subscriber's node, as the bridge numbers nodes.
        node: u16,
        /// The subscriber's connection on its node.
        sub: ConnRef,
        /// Starts (else stops) watching.
        on: bool,
    },
    /// Cluster, home shard to bridge: `user`'s state for the connection
    /// `sub` of node number `node` ([`Msg::RemoteWatch`]).
    RemotePresence {
        /// The subscriber's node, as the bridge numbers nodes.
        node: u16,
        /// The subscriber's connection on its node.
        sub: ConnRef,
        /// The watched user.
        user: u64,
        /// Online, offline or hidden.
        state: PresenceState,
        /// Offline: last seen, ms since the Unix epoch (0: never); else 0.
        last_seen_ms: u64,
    },
    /// Cluster, shard to bridge: `user`'s device acknowledged `server_id`,
    /// so JetStream may delete it.
    Done {
        /// The recipient.
        user: u64,
        /// The message.
        server_id: u64,
    },
    /// Cluster, home shard to bridge: `user`'s state changed; `bytes` is
    /// its whole state ([`crate::cluster::state::UserState::encode`]),
    /// published to its state subject.
    State {
        /// The user.
        user: u64,
        /// Its encoded state.
        bytes: Vec<u8>,
        /// The bridge's numbers of the receipt records this state keeps:
        /// acked in JetStream once it is stored.
        receipts: Vec<u64>,
    },
    /// Cluster, bridge to `user`'s home shard (the receiving one): the
    /// state a partition's previous owner left for `user`, replayed on
    /// claim before this node answers a LOGIN for the partition.
    Restore {
        /// The user.
        user: u64,
        /// Its state.
        state: Box<crate::cluster::state::UserState>,
    },
    /// Cluster: the end of a replay. Bridge to every shard after the
    /// replay's [`Msg::Restore`]s; each shard sends it back once it applied
    /// them (ring order), and the bridge serves the partitions once every
    /// shard answered.
    Replayed {
        /// The replay.
        token: u64,
    },
}

/// A request about a group, for its home shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOp {
    /// GROUP_CREATE (on a cluster node, for the bridge; one box creates
    /// in the requester's shard).
    Create,
    /// GROUP_ADD.
    Add {
        /// The group.
        group: u64,
        /// The user added.
        user: u64,
    },
    /// GROUP_REMOVE.
    Remove {
        /// The group.
        group: u64,
        /// The user removed.
        user: u64,
    },
    /// GROUP_LEAVE.
    Leave {
        /// The group.
        group: u64,
    },
    /// GROUP_ADMIN.
    Admin {
        /// The group.
        group: u64,
        /// The member.
        user: u64,
        /// Make (or revoke).
        admin: bool,
    },
    /// GROUP_MEMBERS.
    Members {
        /// The group.
        group: u64,
    },
}

/// The answer to a group request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupAnswer {
    /// GROUP_OK(`req`, `group`).
    Ok {
        /// The request's id.
        req: u64,
        /// The group.
        group: u64,
    },
    /// ACK of a GROUP_SEND: `msg` is the message's number in the group.
    Ack {
        /// The GROUP_SEND's client_id.
        client_id: u64,
        /// The message's number in the group's order.
        msg: u64,
        /// When the home shard took it.
        time_ms: u64,
        /// When the GROUP_SEND was decoded.
        sent_ns: u64,
    },
    /// ERROR(`code`, `id`): `id` is the request's `req` or the
    /// GROUP_SEND's `client_id`.
    Refused {
        /// Why.
        code: ErrorCode,
        /// The request's id.
        id: u64,
        /// The ERROR's text.
        text: &'static str,
    },
    /// The member list, for GROUP_LIST frames.
    List {
        /// The request's id.
        req: u64,
        /// The group.
        group: u64,
        /// Members and their admin flag.
        members: Vec<(u64, bool)>,
    },
}

/// Messages waiting for ring space, per destination shard.
pub(super) struct Outboxes {
    queues: Vec<VecDeque<Msg>>,
    /// Messages moved into the rings, ever (for [`super::Carry`]).
    pushed: u64,
}

impl Outboxes {
    /// Empty outboxes towards `shards` shards.
    pub(super) fn new(shards: usize) -> Outboxes {
        Outboxes {
            queues: (0..shards).map(|_| VecDeque::new()).collect(),
            pushed: 0,
        }
    }

    /// Queues `msg` for shard `dst`, after those already waiting.
    pub(super) fn push(&mut self, dst: usize, msg: Msg) {
        self.queues[dst].push_back(msg);
    }

    /// Messages waiting for shard `dst`.
    pub(super) fn len(&self, dst: usize) -> usize {
        self.queues[dst].len()
    }

    /// Messages waiting, all destinations.
    pub(super) fn depth(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Whether any message waits for ring space.
    /// Frees the capacity of every empty outbox (the flush keeps up to
    /// `OUTBOX_KEEP_CAPACITY` while traffic flows).
    pub(super) fn trim(&mut self) {
        for outbox in &mut self.queues {
            if outbox.is_empty() {
                *outbox = VecDeque::new();
            }
        }
    }

    /// Messages moved into the rings, ever.
    pub(super) fn pushed(&self) -> u64 {
        self.pushed
    }

    pub(super) fn waiting(&self) -> bool {
        self.queues.iter().any(|o| !o.is_empty())
    }

    /// Moves what fits into the rings, in order, then wakes the
    /// destinations.
    pub(super) fn flush(&mut self, links: &mut Links<Msg>, stats: &ShardStats) {
        for (dst, outbox) in self.queues.iter_mut().enumerate() {
            while let Some(msg) = outbox.pop_front() {
                if let Err(msg) = links.try_push(dst, msg) {
                    outbox.push_front(msg);
                    stats.ring_full.inc();
                    break;
                }
                self.pushed += 1;
            }
            // A login storm can leave an outbox holding a large allocation
            // for ever; give it back once drained.
            if outbox.is_empty() && outbox.capacity() > OUTBOX_KEEP_CAPACITY {
                outbox.shrink_to(OUTBOX_KEEP_CAPACITY);
            }
        }
        links.notify();
    }
}

/// Whether the other shards take messages, read from their counters.
pub(super) struct Peers {
    id: usize,
    /// Every shard's counters, by shard id.
    stats: Arc<[Arc<ShardStats>]>,
}

impl Peers {
    /// The peers of shard `id`.
    pub(super) fn new(id: usize, stats: Arc<[Arc<ShardStats>]>) -> Peers {
        Peers { id, stats }
    }

    /// Whether shard `dst` takes messages (it is this one, or up).
    pub(super) fn up(&self, dst: usize) -> bool {
        dst == self.id || ShardState::from_u64(self.stats[dst].state.get()) == ShardState::Up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_shard_is_stable_and_spread() {
        let mut counts = [0usize; 4];
        for user in 1..=10_000u64 {
            let h = home_shard(user, 4);
            assert_eq!(h, home_shard(user, 4));
            counts[h] += 1;
        }
        for c in counts {
            assert!(c > 2000, "{counts:?}");
        }
        assert_eq!(home_shard(12345, 1), 0);
    }
}
