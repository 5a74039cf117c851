//! What the cluster bridge reports, read by the stats socket: apart from
//! the bridge (`bridge.rs`) so that a build without the `cluster` feature
//! still has the type the stats view names.

use crate::stats::{Counter, Histogram};

/// What the bridge reports, read by the stats socket.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Partitions this node holds a lease on now.
    pub partitions_owned: Counter,
    /// Partitions this node's table showed no owner for at the last lease
    /// round.
    pub partitions_unowned: Counter,
    /// Nodes with a live heartbeat in the last listing, this one included.
    pub live_nodes: Counter,
    /// Leases lost since start: a renewal failed on its revision, or NATS
    /// was out of reach for a whole lease.
    pub leases_lost: Counter,
    /// 1 while the last lease round reached NATS, else 0.
    pub nats_up: Counter,
    /// SENDs published to JetStream.
    pub published: Counter,
    /// SENDs whose publish failed (refused with `unavailable`).
    pub publish_failures: Counter,
    /// Receipts whose publish failed (the sender never gets them).
    pub receipts_lost: Counter,
    /// Messages handed to their recipients here, not yet DELIVERED (their
    /// JetStream acks wait).
    pub pending_acks: Counter,
    /// JetStream consumers running: one per message stream held whole, one
    /// per partition held of a stream shared with other nodes.
    pub consumers: Counter,
    /// Publishes (SENDs and receipts) sent to JetStream whose publish ack
    /// has not come back yet.
    pub publishes_in_flight: Counter,
    /// From a SEND or receipt taken off its shard's ring by the bridge to
    /// JetStream's publish ack (or failure) for it. Written by the relay
    /// task only (the bridge's runtime has one thread).
    pub publish_latency: Histogram,
    /// Copies JetStream keeps of the message streams `TERN_<g>` (the
    /// fewest of any): `stream_replicas`, or 1 against a NATS server
    /// without clustering; 0 until first reached.
    pub stream_replicas: Counter,
    /// Presence subscriptions of this node's connections to users other
    /// nodes serve (or nobody, for now).
    pub presence_watches: Counter,
    /// Milliseconds the last successful lease round took (heartbeat,
    /// renewals, listing, claims); 0 until one succeeded.
    pub lease_round_ms: Counter,
    /// User states published to the state streams `TERNS_<g>` and
    /// acknowledged there.
    pub states_published: Counter,
    /// User states published whose publish ack (or failure) has not come
    /// back yet.
    pub states_in_flight: Counter,
    /// User states not kept: the publish failed, or the user's partition
    /// was no longer this node's.
    pub state_publish_failures: Counter,
    /// User states read from the state streams on claims.
    pub states_replayed: Counter,
}
