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
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::bridge::ClusterStats;
use super::link::BridgeEnds;
use super::owners::{Owner, Owners, NODES_MAX};
use super::partition::partition_of;
use super::presence::{self, Watches};
use super::streams::{
    message_subject, partition_filter, partition_of_subject, receipt_subject, server_id,
    stream_count, stream_filter, stream_name, stream_of, PARTITIONS_PER_STREAM,
};
use super::wire::Record;
use crate::proto::ErrorCode;
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
    /// A presence record arrived on this node's subject.
    Presence(Box<[u8]>),
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
}

impl Relay {
    /// A relay over `ends`, publishing with `js`, consuming the partitions
    /// `owners` says are here.
    pub fn new(
        me: String,
        ends: BridgeEnds,
        js: jetstream::Context,
        owners: Arc<Owners>,
        stats: Arc<ClusterStats>,
    ) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        let here = vec![false; owners.partitions() as usize];
        Relay {
            backlog: ends.to_shards.iter().map(|_| VecDeque::new()).collect(),
            ends,
            js,
            owners,
            stats,
            pending: HashMap::new(),
            consumers: HashMap::new(),
            here,
            tx,
            me,
            watches: Watches::default(),
            owners_seen: (0, 0),
            nodes: Vec::new(),
            rx: Some(rx),
        }
    }

    /// Runs until `stop` is raised.
    pub async fn run(mut self, stop: Arc<AtomicBool>) {
        let notify = self.ends.notify.clone();
        let mut rx = self.rx.take().expect("run once");
        let mut tick = tokio::time::interval(RECONCILE);
        let listen = tokio::spawn(listen_presence(
            self.js.client(),
            presence::subject(&self.me),
            self.tx.clone(),
        ));
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                () = notify.notified() => self.take_from_shards().await,
                Some(report) = rx.recv() => self.on_report(report).await,
                _ = tick.tick() => self.reconcile().await,
            }
            self.flush_to_shards();
        }
        for (_, task) in self.consumers.drain() {
            task.abort();
        }
        listen.abort();
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
                    let result = match published {
                        Ok(ack) => ack
                            .await
                            .map(|a| server_id(partition, a.sequence))
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
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
                let subject = receipt_subject(partition_of(user, self.owners.partitions()));
                let published = self.js.publish(subject, record.encode().into()).await;
                let tx = self.tx.clone();
                self.stats.publishes_in_flight.inc();
                tokio::spawn(async move {
                    let result = match published {
                        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = tx.send(Report::ReceiptPublished {
                        user,
                        taken,
                        result,
                    });
                });
            }
            Msg::Done { server_id, .. } => {
                if let Some((_, acker)) = self.pending.remove(&server_id) {
                    self.stats.pending_acks.set(self.pending.len() as u64);
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
            other => log::error!("cluster relay: shards never send {other:?}"),
        }
        self.stats.presence_watches.set(self.watches.len() as u64);
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
            } => match Record::decode(&message.payload) {
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
                    self.stats.pending_acks.set(self.pending.len() as u64);
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
                    // JetStream holds it: no outbox to answer.
                    self.backlog[dst].push_back(Msg::Receipt {
                        user,
                        kind,
                        server_id,
                        peer,
                        src: 0,
                        seq: 0,
                    });
                    tokio::spawn(async move {
                        let _ = acker.ack().await;
                    });
                }
                None => {
                    log::warn!("cluster relay: record {sequence} is not ours, dropped");
                    tokio::spawn(async move {
                        let _ = acker.ack().await;
                    });
                }
            },
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
            self.stats.pending_acks.set(self.pending.len() as u64);
        }
        self.stats.consumers.set(self.consumers.len() as u64);
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

/// Reads this node's presence subject and reports every record. Starts
/// over after an error; ends with the runtime.
async fn listen_presence(
    client: async_nats::Client,
    subject: String,
    tx: mpsc::UnboundedSender<Report>,
) {
    loop {
        match client.subscribe(subject.clone()).await {
            Ok(mut records) => {
                while let Some(m) = records.next().await {
                    if tx
                        .send(Report::Presence(m.payload.to_vec().into()))
                        .is_err()
                    {
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
