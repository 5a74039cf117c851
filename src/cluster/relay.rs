//! Messages between the shards and JetStream (docs/CLUSTER.md, "Cross-node
//! messages"): one task on the bridge's runtime owns the bridge's ring ends.
//! It publishes what shards send (SENDs, receipts) and answers each SEND
//! with the publish's ACK; it runs one consumer per message stream this
//! node owns whole (one per partition of a stream it shares with other
//! nodes), hands what they bring to the home shards, and acks a message in
//! JetStream once its recipient's device acknowledged it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, message::Acker};
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::groups::reply_subject;
use super::link::BridgeEnds;
use super::owners::{Owner, Owners, NODES_MAX};
use super::partition::partition_of;
use super::presence::{self, Watches};
use super::state::{self, UserState};
use super::stats::ClusterStats;
use super::streams::{
    message_subject, partition_filter, partition_of_subject, receipt_subject, server_id,
    stream_count, stream_filter, stream_name, stream_of, PARTITIONS_PER_STREAM,
};
use super::wire::Record;
use crate::proto::ErrorCode;

mod groups;
use crate::shard::{home_shard, ConnRef, Msg};
use crate::store::{Origin, Stored};

/// How often ownership is compared with the running consumers, and full
/// rings towards shards are retried.
const RECONCILE: Duration = Duration::from_millis(100);

/// A consumer waits this long for an ack before JetStream redelivers: far
/// longer than anything, because redelivery comes from recreating the
/// consumer (on claim), never from a timeout.
const ACK_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long a consumer goes without a record before it asks JetStream
/// whether a delivery went missing; doubled after each quiet check up to
/// [`GAP_CHECK_MAX`], so idle consumers cost NATS little.
const GAP_CHECK: Duration = Duration::from_secs(2);

/// Longest wait between two checks of a quiet consumer.
const GAP_CHECK_MAX: Duration = Duration::from_secs(64);

/// How long after a failed state publish that kept receipt records their
/// consumer starts over to bring them again.
const START_OVER_AFTER: Duration = Duration::from_secs(1);

/// What the relay's helper tasks report.
enum Report {
    /// A SEND's publish was acknowledged (`Ok(server id)`) or failed.
    Published {
        reply: ConnRef,
        client_id: u64,
        time_ms: u64,
        sent_ns: u64,
        /// When the bridge took the SEND off its shard's ring.
        taken: Instant,
        result: Result<u64, String>,
    },
    /// A receipt's publish was acknowledged (`Ok`) or failed.
    ReceiptPublished {
        user: u64,
        /// When the bridge took the receipt off its shard's ring.
        taken: Instant,
        result: Result<(), String>,
    },
    /// A user's state, keeping receipt records not acked, was not stored.
    StateFailed {
        /// The user's partition.
        partition: u32,
    },
    /// A presence record arrived on this node's subject.
    Presence(Box<[u8]>),
    /// A group request's publish was acknowledged (`Ok`) or failed.
    GroupPublished {
        reply: ConnRef,
        id: u64,
        taken: Instant,
        result: Result<(), String>,
    },
    /// A group's state was read from the bucket (or not).
    GroupLoaded {
        partition: u32,
        group: u64,
        // Boxed: a bucket handle is far larger than the other reports.
        result: Result<Box<groups::Loaded>, String>,
    },
    /// A group's request was done (its key's new revision, if written),
    /// or failed part way (the request, to take again).
    GroupStepped {
        group: u64,
        partition: u32,
        result: Result<Option<u64>, (String, Option<groups::Waiting>)>,
    },
    /// A group home's answer arrived on this node's subject.
    GroupReply(Box<[u8]>),
    /// Every group state of a partition was read (or not).
    PartitionLoaded {
        partition: u32,
        result: Result<Box<groups::PartitionStates>, String>,
    },
    /// A consumer brought a record.
    Consumed {
        /// The partition it is for (from its subject).
        partition: u32,
        /// Its server id ([`server_id`]).
        sequence: u64,
        // Boxed: a NATS message and its acker are far larger than a
        // publish result.
        message: Box<async_nats::Message>,
        acker: Box<Acker>,
    },
    /// The states of a replay's partitions were read (or not).
    StatesRead {
        result: Result<Vec<(u64, UserState)>, String>,
        done: oneshot::Sender<()>,
    },
}

/// A request of the lease round: replay the states of `partitions`, just
/// claimed, into the shards; `done` is answered once every shard holds
/// them (dropped if they could not be read).
pub struct Replay {
    /// The partitions.
    pub partitions: Vec<u32>,
    /// Answered when the shards hold the states.
    pub done: oneshot::Sender<()>,
}

/// The relay task's state.
pub struct Relay {
    ends: BridgeEnds,
    js: jetstream::Context,
    owners: Arc<Owners>,
    stats: Arc<ClusterStats>,
    /// Messages for shards whose ring was full, in order.
    backlog: Vec<VecDeque<Msg>>,
    /// Messages handed to their recipients' shards, not yet DELIVERED, by
    /// server id, with their partition: acked in JetStream on [`Msg::Done`].
    pending: HashMap<u64, (u32, Box<Acker>)>,
    /// Receipt records handed to their users' shards, by this relay's
    /// number for them (the shard's token), with their partition: acked
    /// in JetStream once written to every device of their user
    /// ([`Msg::ReceiptsTaken`]) or once the user's state that keeps them is
    /// stored ([`Msg::State`]).
    receipts: HashMap<u64, (u32, Box<Acker>)>,
    /// The next receipt record's number (never 0: 0 means "no token").
    receipt_next: u64,
    consumers: HashMap<Scope, JoinHandle<()>>,
    /// Per partition: whether it was this node's at the last reconcile.
    here: Vec<bool>,
    tx: mpsc::UnboundedSender<Report>,
    /// This node's id.
    me: String,
    /// Remote presence subscriptions of this node's connections.
    watches: Watches,
    /// [`Owners::changes`] and [`Owners::fencing`] when the watches last
    /// followed their users (this node's own partitions read as nobody's
    /// while its leases are unproven, with no entry changed).
    owners_seen: (u64, u64),
    /// Other nodes that watch users served here, numbered for the shards
    /// ([`Msg::RemoteWatch`]); append-only, at most [`NODES_MAX`].
    nodes: Vec<String>,
    /// Taken by [`Relay::run`].
    rx: Option<mpsc::UnboundedReceiver<Report>>,
    /// Replays asked by the lease round; taken by [`Relay::run`].
    replay_rx: Option<mpsc::UnboundedReceiver<Replay>>,
    /// Where the lease round asks for them ([`Relay::replays`]).
    replay_tx: mpsc::UnboundedSender<Replay>,
    /// Replays whose end went to the shards: shards yet to answer, and
    /// whom to tell then.
    replays: HashMap<u64, (usize, oneshot::Sender<()>)>,
    /// The next replay's token.
    replay_next: u64,
    /// The groups homed by this node's partitions.
    groups: groups::GroupHomes,
}

impl Relay {
    /// A relay over `ends`, publishing with `js`, consuming the partitions
    /// `owners` says are here; the groups it homes have the limits
    /// `group_members_max` and `groups_per_user_max` of `group_limits`;
    /// leases last `lease`.
    pub fn new(
        me: String,
        ends: BridgeEnds,
        js: jetstream::Context,
        owners: Arc<Owners>,
        stats: Arc<ClusterStats>,
        group_limits: (usize, usize),
        lease: Duration,
    ) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        let (replay_tx, replay_rx) = mpsc::unbounded_channel();
        let here = vec![false; owners.partitions() as usize];
        Relay {
            backlog: ends.to_shards.iter().map(|_| VecDeque::new()).collect(),
            ends,
            js,
            owners,
            stats,
            pending: HashMap::new(),
            receipts: HashMap::new(),
            receipt_next: 0,
            consumers: HashMap::new(),
            here,
            tx,
            me,
            watches: Watches::default(),
            owners_seen: (0, 0),
            nodes: Vec::new(),
            rx: Some(rx),
            replay_rx: Some(replay_rx),
            replay_tx,
            replays: HashMap::new(),
            replay_next: 0,
            groups: groups::GroupHomes::new(group_limits.0, group_limits.1, lease),
        }
    }

    /// Where the lease round asks for the states of claimed partitions to
    /// be replayed into the shards.
    pub fn replays(&self) -> mpsc::UnboundedSender<Replay> {
        self.replay_tx.clone()
    }

    /// Runs until `stop` is raised.
    pub async fn run(mut self, stop: Arc<AtomicBool>) {
        let notify = self.ends.notify.clone();
        let mut rx = self.rx.take().expect("run once");
        let mut replay_rx = self.replay_rx.take().expect("run once");
        let mut tick = tokio::time::interval(RECONCILE);
        let presence = tokio::spawn(listen(
            self.js.client(),
            presence::subject(&self.me),
            self.tx.clone(),
            |record: Vec<u8>| Report::Presence(record.into()),
        ));
        let replies = tokio::spawn(listen(
            self.js.client(),
            reply_subject(&self.me),
            self.tx.clone(),
            |record: Vec<u8>| Report::GroupReply(record.into()),
        ));
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                () = notify.notified() => self.take_from_shards().await,
                Some(report) = rx.recv() => self.on_report(report).await,
                Some(replay) = replay_rx.recv() => self.read_states(replay),
                _ = tick.tick() => self.reconcile().await,
            }
            self.flush_to_shards();
        }
        for (_, task) in self.consumers.drain() {
            task.abort();
        }
        presence.abort();
        replies.abort();
    }

    fn shards(&self) -> usize {
        self.ends.to_shards.len()
    }

    /// Everything the shards sent.
    async fn take_from_shards(&mut self) {
        for i in 0..self.ends.from_shards.len() {
            while let Ok(msg) = self.ends.from_shards[i].pop() {
                self.take_from_shard(msg).await;
            }
        }
    }

    async fn take_from_shard(&mut self, msg: Msg) {
        let taken = Instant::now();
        match msg {
            Msg::Send {
                from,
                reply,
                client_id,
                origin,
                to,
                body,
                sent_ns,
            } => {
                let time_ms = unix_ms();
                let record = Record::Message {
                    to,
                    from,
                    time_ms,
                    client_id: origin.map_or(0, |o| o.client_id),
                    body: body.to_vec().into_boxed_slice(),
                };
                let mut headers = async_nats::HeaderMap::new();
                if let Some(o) = origin {
                    // JetStream drops a retry inside its duplicate window
                    // and answers with the first copy's sequence.
                    let id = format!("{from}:{}:{}", o.device, o.client_id);
                    headers.insert("Nats-Msg-Id", id.as_str());
                }
                let partition = partition_of(to, self.owners.partitions());
                let subject = message_subject(partition);
                let published = self
                    .js
                    .publish_with_headers(subject, headers, record.encode().into())
                    .await;
                let tx = self.tx.clone();
                self.stats.published.inc();
                self.stats.publishes_in_flight.inc();
                tokio::spawn(async move {
                    let result = acked(published)
                        .await
                        .map(|a| server_id(partition, a.sequence));
                    let _ = tx.send(Report::Published {
                        reply,
                        client_id,
                        time_ms,
                        sent_ns,
                        taken,
                        result,
                    });
                });
            }
            Msg::Receipt {
                user,
                kind,
                server_id,
                peer,
                ..
            } => {
                let record = Record::Receipt {
                    user,
                    kind,
                    server_id,
                    peer,
                };
                self.publish_receipt(user, record.encode(), taken).await;
            }
            msg @ (Msg::GroupOp { .. } | Msg::GroupSend { .. }) => self.group_request(msg).await,
            // No outbox in a cluster (src, seqs): JetStream carries it.
            Msg::GroupReceipt {
                user,
                kind,
                group,
                msg,
                peers,
                ..
            } => self.group_receipt_out(user, kind, group, msg, peers).await,
            Msg::Done { server_id, .. } => {
                if let Some((_, acker)) = self.pending.remove(&server_id) {
                    self.count_pending();
                    tokio::spawn(async move {
                        if let Err(e) = acker.ack().await {
                            // It stays in JetStream: delivered once more
                            // after a takeover, with the same id.
                            log::warn!("cluster relay: ack of {server_id} failed: {e}");
                        }
                    });
                }
            }
            Msg::Watch { user, sub } => {
                let mut out = Vec::new();
                let owner = self.owners.of_user(user);
                let shards = self.shards();
                self.watches
                    .watch(&self.me, shards, user, sub, owner, &mut out);
                self.presence_out(out).await;
            }
            Msg::Unwatch { user, sub } => {
                let mut out = Vec::new();
                self.watches.unwatch(&self.me, user, sub, &mut out);
                self.presence_out(out).await;
            }
            Msg::Typing { from, to } => {
                if let Owner::Elsewhere { node, .. } = self.owners.of_user(to) {
                    let record = presence::Record::Typing {
                        to,
                        from,
                        node: self.me.clone(),
                    };
                    let node = node.to_owned();
                    self.publish_presence(&node, &record).await;
                }
            }
            Msg::RemotePresence {
                node,
                sub,
                user,
                state,
                last_seen_ms,
            } => {
                if let Some(to) = self.nodes.get(node as usize) {
                    let record = presence::Record::State {
                        user,
                        sub,
                        state,
                        last_seen_ms,
                        node: self.me.clone(),
                    };
                    let to = to.clone();
                    self.publish_presence(&to, &record).await;
                }
            }
            Msg::State {
                user,
                bytes,
                receipts,
            } => self.publish_state(user, bytes, &receipts).await,
            Msg::ReceiptsResend { shard } => {
                // Which records that shard held is not known here: every
                // consumer starts over, and what the shards hold comes as
                // copies (a receipt held already makes its state go again).
                log::warn!("cluster relay: shard {shard} restarted, consumers start over");
                self.receipts.clear();
                self.count_pending();
                for (_, task) in self.consumers.drain() {
                    task.abort();
                }
            }
            Msg::ReceiptsTaken { seqs } => {
                for token in seqs {
                    if let Some((_, acker)) = self.receipts.remove(&token) {
                        tokio::spawn(async move {
                            let _ = acker.ack().await;
                        });
                    }
                }
                self.count_pending();
            }
            Msg::Replayed { token } => {
                if let Some((left, _)) = self.replays.get_mut(&token) {
                    *left -= 1;
                    if *left == 0 {
                        let (_, done) = self.replays.remove(&token).expect("just seen");
                        let _ = done.send(());
                    }
                }
            }
            other => log::error!("cluster relay: shards never send {other:?}"),
        }
        self.stats.presence_watches.set(self.watches.len() as u64);
    }

    /// Keeps `user`'s state (`bytes`) in its state stream, while this node
    /// serves its partition (a node that lost it must not overwrite what
    /// the new owner writes; the shard checked too, this catches a loss in
    /// between), then acks the receipt records it keeps (`receipts`). The
    /// publish is not waited for: a failure is counted and logged, and the
    /// user's next change writes it whole; the records it kept are not
    /// acked, and their consumer starts over so they come again (each
    /// makes its user's state go again).
    async fn publish_state(&mut self, user: u64, bytes: Vec<u8>, receipts: &[u64]) {
        let partition = partition_of(user, self.owners.partitions());
        let ackers: Vec<Box<Acker>> = receipts
            .iter()
            .filter_map(|token| self.receipts.remove(token))
            .map(|(_, acker)| acker)
            .collect();
        self.count_pending();
        if self.owners.of(partition) != Owner::Here {
            // Not acked: the new owner's consumer brings them.
            self.stats.state_publish_failures.inc();
            return;
        }
        let published = self
            .js
            .publish(state::subject(partition, user), bytes.into())
            .await;
        self.stats.states_in_flight.inc();
        let stats = self.stats.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = acked(published).await.map(|_| ());
            match result {
                Ok(()) => {
                    stats.states_published.inc();
                    for acker in ackers {
                        let _ = acker.ack().await;
                    }
                }
                Err(e) => {
                    stats.state_publish_failures.inc();
                    log::warn!("cluster relay: state of user {user} not kept: {e}");
                    if !ackers.is_empty() {
                        // Not at once: a stream that refuses every write
                        // would have the consumer start over in a loop.
                        tokio::time::sleep(START_OVER_AFTER).await;
                        let _ = tx.send(Report::StateFailed { partition });
                    }
                }
            }
            stats.states_in_flight.sub(1);
        });
    }

    /// Publishes a receipt record (`bytes`) for `user`, taken off a shard's
    /// ring at `taken`, to its partition's receipt subject; a failure is
    /// counted ([`Report::ReceiptPublished`]).
    async fn publish_receipt(&mut self, user: u64, bytes: Vec<u8>, taken: Instant) {
        let subject = receipt_subject(partition_of(user, self.owners.partitions()));
        let published = self.js.publish(subject, bytes.into()).await;
        let tx = self.tx.clone();
        self.stats.publishes_in_flight.inc();
        tokio::spawn(async move {
            let result = acked(published).await.map(|_| ());
            let _ = tx.send(Report::ReceiptPublished {
                user,
                taken,
                result,
            });
        });
    }

    /// Numbers a receipt record of `partition` handed to a shard; its
    /// `acker` waits for the shard's word ([`Relay::receipts`]).
    fn hold_receipt(&mut self, partition: u32, acker: Box<Acker>) -> u64 {
        self.receipt_next += 1;
        let token = self.receipt_next;
        self.receipts.insert(token, (partition, acker));
        self.count_pending();
        token
    }

    /// Records handed to shards whose JetStream acks wait.
    fn count_pending(&self) {
        let n = self.pending.len() + self.receipts.len();
        self.stats.pending_acks.set(n as u64);
    }

    /// Reads the states of a replay's partitions in a task of its own (the
    /// relay goes on carrying messages meanwhile).
    fn read_states(&mut self, replay: Replay) {
        let js = self.js.clone();
        let tx = self.tx.clone();
        let total = self.owners.partitions();
        tokio::spawn(async move {
            let result = state::replay(&js, &replay.partitions, total)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Report::StatesRead {
                result,
                done: replay.done,
            });
        });
    }

    /// Hands the states read to their users' home shards, then the
    /// replay's end to every shard.
    fn states_read(&mut self, states: Vec<(u64, UserState)>, done: oneshot::Sender<()>) {
        let shards = self.shards();
        self.stats.states_replayed.add(states.len() as u64);
        for (user, state) in states {
            self.backlog[home_shard(user, shards)].push_back(Msg::Restore {
                user,
                state: Box::new(state),
            });
        }
        let token = self.replay_next;
        self.replay_next += 1;
        for backlog in &mut self.backlog {
            backlog.push_back(Msg::Replayed { token });
        }
        self.replays.insert(token, (shards, done));
    }

    /// Does what [`Watches`] asked.
    async fn presence_out(&mut self, out: Vec<presence::Out>) {
        for o in out {
            match o {
                presence::Out::Publish { node, record } => {
                    self.publish_presence(&node, &record).await;
                }
                presence::Out::Shard { dst, msg } => self.backlog[dst].push_back(msg),
            }
        }
    }

    /// Publishes `record` on node `node`'s presence subject: plain NATS,
    /// no JetStream, so nothing waits for an answer; a record lost with a
    /// connection is made good by the next change or SUBSCRIBE.
    async fn publish_presence(&mut self, node: &str, record: &presence::Record) {
        let client = self.js.client();
        if let Err(e) = client
            .publish(presence::subject(node), record.encode().into())
            .await
        {
            log::warn!("cluster relay: presence record for node {node} not sent: {e}");
        }
    }

    /// A presence record from another node.
    async fn on_presence(&mut self, bytes: &[u8]) {
        let Some(record) = presence::Record::decode(bytes) else {
            log::warn!("cluster relay: a presence record that is not ours, dropped");
            return;
        };
        let shards = self.shards();
        match record {
            presence::Record::Watch { user, sub, node } => {
                // Not served here (any more): the subscriber's node sends
                // it to the new owner once it knows.
                if self.owners.of_user(user) != Owner::Here {
                    return;
                }
                let Some(node) = self.node_number(&node) else {
                    return;
                };
                self.backlog[home_shard(user, shards)].push_back(Msg::RemoteWatch {
                    user,
                    node,
                    sub,
                    on: true,
                });
            }
            presence::Record::Unwatch { user, sub, node } => {
                if let Some(node) = self.nodes.iter().position(|n| *n == node) {
                    self.backlog[home_shard(user, shards)].push_back(Msg::RemoteWatch {
                        user,
                        node: node as u16,
                        sub,
                        on: false,
                    });
                }
            }
            presence::Record::Typing { to, from, .. } => {
                if self.owners.of_user(to) == Owner::Here {
                    self.backlog[home_shard(to, shards)].push_back(Msg::Typing { from, to });
                }
            }
            presence::Record::State {
                user,
                sub,
                state,
                last_seen_ms,
                node,
            } => {
                let mut out = Vec::new();
                self.watches
                    .state(&self.me, &node, user, sub, (state, last_seen_ms), &mut out);
                self.presence_out(out).await;
            }
        }
    }

    /// `node`'s number for the shards, given one if new (`None` past
    /// [`NODES_MAX`] nodes: its subscriptions are not served).
    fn node_number(&mut self, node: &str) -> Option<u16> {
        if let Some(i) = self.nodes.iter().position(|n| n == node) {
            return Some(i as u16);
        }
        if self.nodes.len() >= NODES_MAX {
            log::error!("cluster relay: more than {NODES_MAX} nodes watch presence here");
            return None;
        }
        self.nodes.push(node.to_owned());
        Some((self.nodes.len() - 1) as u16)
    }

    async fn on_report(&mut self, report: Report) {
        match report {
            Report::Presence(bytes) => self.on_presence(&bytes).await,
            Report::StateFailed { partition } => self.start_over(partition),
            Report::StatesRead { result, done } => match result {
                Ok(states) => self.states_read(states, done),
                Err(e) => log::warn!("cluster relay: states not read, claim retried: {e}"),
            },
            Report::GroupPublished {
                reply,
                id,
                taken,
                result,
            } => {
                self.publish_answered(taken);
                if let Err(e) = result {
                    self.group_publish_failed(reply, id, &e);
                }
            }
            Report::GroupLoaded {
                partition,
                group,
                result,
            } => self.group_loaded(partition, group, result),
            Report::GroupStepped {
                group,
                partition,
                result,
            } => self.group_stepped(group, partition, result),
            Report::GroupReply(bytes) => self.group_reply(&bytes),
            Report::PartitionLoaded { partition, result } => {
                self.partition_loaded(partition, result)
            }
            Report::Published {
                reply,
                client_id,
                time_ms,
                sent_ns,
                taken,
                result,
            } => {
                self.publish_answered(taken);
                let answer = match result {
                    Ok(sequence) => Msg::Ack {
                        reply,
                        client_id,
                        server_id: sequence,
                        time_ms,
                        sent_ns,
                    },
                    Err(e) => {
                        self.stats.publish_failures.inc();
                        log::warn!("cluster relay: publish failed: {e}");
                        Msg::Reject {
                            reply,
                            client_id,
                            code: ErrorCode::Unavailable,
                        }
                    }
                };
                self.backlog[reply.shard as usize].push_back(answer);
            }
            Report::ReceiptPublished {
                user,
                taken,
                result,
            } => {
                self.publish_answered(taken);
                if let Err(e) = result {
                    self.stats.receipts_lost.inc();
                    log::warn!("cluster relay: receipt for {user} not published: {e}");
                }
            }
            Report::Consumed {
                partition,
                sequence,
                message,
                acker,
            } => {
                let Some(acker) = self.group_consumed(partition, sequence, &message.payload, acker)
                else {
                    return;
                };
                self.on_record(partition, sequence, &message, acker)
            }
        }
    }

    /// A consumed message or receipt record (kinds 1 and 2).
    fn on_record(
        &mut self,
        partition: u32,
        sequence: u64,
        message: &async_nats::Message,
        acker: Box<Acker>,
    ) {
        match Record::decode(&message.payload) {
            Some(Record::Message {
                to,
                from,
                time_ms,
                client_id,
                body,
            }) => {
                let msg = Stored {
                    server_id: sequence,
                    from,
                    time_ms,
                    origin: (client_id != 0).then_some(Origin {
                        device: 0,
                        client_id,
                    }),
                    body: body.into(),
                };
                self.pending.insert(sequence, (partition, acker));
                self.count_pending();
                let dst = home_shard(to, self.shards());
                self.backlog[dst].push_back(Msg::Incoming { to, msg });
            }
            Some(Record::Receipt {
                user,
                kind,
                server_id,
                peer,
            }) => {
                let dst = home_shard(user, self.shards());
                let seq = self.hold_receipt(partition, acker);
                self.backlog[dst].push_back(Msg::Receipt {
                    user,
                    kind,
                    server_id,
                    peer,
                    src: 0,
                    seq,
                });
            }
            None => {
                log::warn!("cluster relay: record {sequence} is not ours, dropped");
                tokio::spawn(async move {
                    let _ = acker.ack().await;
                });
            }
        }
    }

    /// A publish taken from a shard at `taken` was answered (acked or
    /// failed): one fewer in flight, and its latency recorded.
    fn publish_answered(&self, taken: Instant) {
        self.stats.publishes_in_flight.sub(1);
        let ns = u64::try_from(taken.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.publish_latency.record(ns);
    }

    /// Pushes the backlog into the shards' rings as far as they have room,
    /// and wakes the shards pushed to.
    fn flush_to_shards(&mut self) {
        for dst in 0..self.backlog.len() {
            let mut pushed = false;
            while let Some(msg) = self.backlog[dst].pop_front() {
                if let Err(rtrb::PushError::Full(msg)) = self.ends.to_shards[dst].push(msg) {
                    self.backlog[dst].push_front(msg);
                    break;
                }
                pushed = true;
            }
            if pushed {
                self.ends.wakers[dst].wake();
            }
        }
    }

    /// Stops the consumer that reads `partition` (its stream's, or its
    /// own); the next reconcile starts it again, from the oldest record
    /// not acked, so receipt records whose state was not stored come
    /// again (what the shards hold comes as copies, dropped).
    fn start_over(&mut self, partition: u32) {
        for scope in [
            Scope::Stream(stream_of(partition)),
            Scope::Partition(partition),
        ] {
            if let Some(task) = self.consumers.remove(&scope) {
                task.abort();
                log::info!("cluster relay: consumer {} starts over", scope.name());
            }
        }
    }

    /// Starts the consumers this node's partitions need now and stops the
    /// others: one per stream held whole, one per partition held of a
    /// stream shared with other nodes. Forgets the pending acks of the
    /// partitions no longer here: their messages stay in JetStream for the
    /// new owner.
    async fn reconcile(&mut self) {
        let partitions = self.owners.partitions();
        let mut lost = false;
        for p in 0..partitions {
            let here = self.owners.of(p) == Owner::Here;
            lost |= self.here[p as usize] && !here;
            self.here[p as usize] = here;
        }
        let mut wanted = HashSet::new();
        for g in 0..stream_count(partitions) {
            let first = g * PARTITIONS_PER_STREAM;
            let parts = first..(first + PARTITIONS_PER_STREAM).min(partitions);
            if parts.clone().all(|p| self.here[p as usize]) {
                wanted.insert(Scope::Stream(g));
            } else {
                wanted.extend(
                    parts
                        .filter(|&p| self.here[p as usize])
                        .map(Scope::Partition),
                );
            }
        }
        // Stopped before any is started: a stream's consumer replaces its
        // partitions' (and the other way round), and a work-queue stream
        // refuses consumers whose filters overlap.
        self.consumers.retain(|scope, task| {
            let keep = wanted.contains(scope);
            if !keep {
                task.abort();
            }
            keep
        });
        for scope in wanted {
            if !self.consumers.contains_key(&scope) {
                let task = tokio::spawn(consume(self.js.clone(), scope, self.tx.clone()));
                self.consumers.insert(scope, task);
            }
        }
        if lost {
            let here = &self.here;
            self.pending.retain(|_, (p, _)| here[*p as usize]);
            self.receipts.retain(|_, (p, _)| here[*p as usize]);
            self.count_pending();
        }
        self.stats.consumers.set(self.consumers.len() as u64);
        self.groups_reconcile();
        // Read before the pass: a change during it is looked at next time.
        let changes = (self.owners.changes(), self.owners.fencing());
        if changes == self.owners_seen {
            return;
        }
        self.owners_seen = changes;
        let mut out = Vec::new();
        let shards = self.shards();
        let owners = &self.owners;
        self.watches.reconcile(
            &self.me,
            shards,
            unix_ms(),
            |user| owners.of_user(user),
            &mut out,
        );
        self.presence_out(out).await;
        self.stats.presence_watches.set(self.watches.len() as u64);
    }
}

/// Reads one of this node's plain NATS subjects (presence, group
/// answers) and reports every record as `report` makes it. Starts over
/// after an error; ends with the runtime.
async fn listen(
    client: async_nats::Client,
    subject: String,
    tx: mpsc::UnboundedSender<Report>,
    report: fn(Vec<u8>) -> Report,
) {
    loop {
        match client.subscribe(subject.clone()).await {
            Ok(mut records) => {
                while let Some(m) = records.next().await {
                    if tx.send(report(m.payload.to_vec())).is_err() {
                        return;
                    }
                }
            }
            Err(e) => log::warn!("cluster relay: cannot read {subject}: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What one JetStream consumer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Scope {
    /// A whole message stream `TERN_<g>`: every partition of it is here.
    Stream(u32),
    /// One partition, of a stream whose other partitions are (partly)
    /// elsewhere.
    Partition(u32),
}

impl Scope {
    fn stream(self) -> u32 {
        match self {
            Scope::Stream(g) => g,
            Scope::Partition(p) => stream_of(p),
        }
    }

    /// The durable consumer's name: `s<g>` or `p<p>`.
    fn name(self) -> String {
        match self {
            Scope::Stream(g) => format!("s{g}"),
            Scope::Partition(p) => format!("p{p}"),
        }
    }

    fn filter(self) -> String {
        match self {
            Scope::Stream(g) => stream_filter(g),
            Scope::Partition(p) => partition_filter(p),
        }
    }
}

/// The consumer of `scope`: replaces whatever consumer the previous owner
/// left (so this one starts at the oldest undelivered record, in stream
/// order) and reports every record. Starts over after an error.
async fn consume(js: jetstream::Context, scope: Scope, tx: mpsc::UnboundedSender<Report>) {
    loop {
        if let Err(e) = consume_once(&js, scope, &tx).await {
            log::warn!("cluster relay: consumer {}: {e}", scope.name());
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes the consumers of `scope`'s stream whose filters overlap
/// `scope`'s, left by this node's previous layout of the stream or by a
/// previous owner: a work-queue stream refuses overlapping consumers. A
/// stream's consumer overlaps every other consumer of its stream; a
/// partition's overlaps its own and the stream's. Not found is fine.
async fn clear_overlaps(
    stream: &jetstream::stream::Stream,
    scope: Scope,
) -> Result<(), async_nats::Error> {
    let names: Vec<String> = match scope {
        Scope::Stream(_) => stream.consumer_names().try_collect().await?,
        Scope::Partition(p) => vec![
            Scope::Partition(p).name(),
            Scope::Stream(stream_of(p)).name(),
        ],
    };
    for name in names {
        let _ = stream.delete_consumer(&name).await;
    }
    Ok(())
}

async fn consume_once(
    js: &jetstream::Context,
    scope: Scope,
    tx: &mpsc::UnboundedSender<Report>,
) -> Result<(), async_nats::Error> {
    let stream = js.get_stream(stream_name(scope.stream())).await?;
    clear_overlaps(&stream, scope).await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(scope.name()),
            filter_subject: scope.filter(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: -1,
            deliver_policy: consumer::DeliverPolicy::All,
            // As many copies as the stream (the default, 0, inherits): in
            // a replicated work-queue stream each server drops an acked
            // record when its own copy of the consumer applies the ack, so
            // a consumer with one copy left the other servers' records of
            // delivered messages in place (nats-server 2.9). Each copy set
            // is a Raft group in a NATS cluster, which is why a node holds
            // one consumer per whole stream, not per partition. In memory:
            // the consumer is recreated on every claim and start-over
            // anyway, from the oldest record still in the stream.
            memory_storage: true,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    // Consumer sequence of the last record that arrived. JetStream numbers
    // its deliveries 1, 2, ...; a record it delivered that never arrived
    // (lost between NATS servers or on a connection that dropped while a
    // NATS server died) would, with this ack wait, never come again until
    // the consumer is recreated, and then after later records: per-sender
    // order broken (issue 15, kill -9 of a nats-server). So a gap, or a
    // quiet consumer whose server delivered more than arrived, starts the
    // consumer over from the oldest unacked record, in stream order; what
    // the shards already hold comes again with the same server id.
    let mut last = 0;
    let mut quiet = GAP_CHECK;
    loop {
        let message = match tokio::time::timeout(quiet, messages.next()).await {
            Ok(Some(message)) => {
                quiet = GAP_CHECK;
                message?
            }
            Ok(None) => return Ok(()),
            Err(_quiet) => {
                let delivered = consumer.get_info().await?.delivered.consumer_sequence;
                if delivered > last {
                    return Err(format!(
                        "delivered up to {delivered}, only {last} arrived: starting over"
                    )
                    .into());
                }
                quiet = (quiet * 2).min(GAP_CHECK_MAX);
                continue;
            }
        };
        let info = message.info()?;
        if info.consumer_sequence != last + 1 {
            return Err(format!(
                "delivery {} arrived after {last}: starting over",
                info.consumer_sequence
            )
            .into());
        }
        last = info.consumer_sequence;
        let stream_sequence = info.stream_sequence;
        let partition = match scope {
            Scope::Partition(p) => Some(p),
            Scope::Stream(g) => {
                partition_of_subject(&message.subject).filter(|&p| stream_of(p) == g)
            }
        };
        let (message, acker) = message.split();
        let Some(partition) = partition else {
            // Not one of ours: nothing would ever take it off the
            // work-queue stream otherwise.
            log::warn!(
                "cluster relay: record on {} is not ours, dropped",
                message.subject
            );
            tokio::spawn(async move {
                let _ = acker.ack().await;
            });
            continue;
        };
        let sequence = server_id(partition, stream_sequence);
        let report = Report::Consumed {
            partition,
            sequence,
            message: Box::new(message),
            acker: Box::new(acker),
        };
        if tx.send(report).is_err() {
            return Ok(());
        }
    }
}

/// What became of a publish: JetStream's ack, or why there is none.
pub(super) async fn acked(
    published: Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
) -> Result<jetstream::publish::PublishAck, String> {
    match published {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
