//! The relay's part in groups across nodes (docs/CLUSTER.md, "Groups
//! across nodes"): publishes its actors' requests to their
//! groups' home partitions and its members' receipts to their senders'
//! partitions; as a home, takes each group's requests one at a time
//! through `group_home::Home` and does what it says (write the state with
//! its revision, publish the copies, answer, ack); hands answers and
//! receipts that arrive to the shards.

use std::collections::{HashMap, HashSet, VecDeque};

use async_nats::jetstream::{self, kv, message::Acker};
use futures_util::TryStreamExt;

use super::{acked, unix_ms, Relay, Report};
use crate::cluster::group_home::{Answer, Home, Outcome};
use crate::cluster::groups::{
    copy_for, copy_msg_id, group_id, home_of, reply_subject, state_key, Op, Receipt, Reply,
    Request, State, BUCKET, RECEIPT_PEERS_MAX,
};
use crate::cluster::owners::Owner;
use crate::cluster::partition::partition_of;
use crate::cluster::streams::message_subject;
use crate::io::ConnId;
use crate::proto::{ErrorCode, ReceiptKind};
use crate::shard::{home_shard, ConnRef, GroupAnswer, GroupOp, Msg};

/// A stream sequence inside a server id (`g × 2^48 + sequence`).
const SEQ_MASK: u64 = (1 << 48) - 1;

/// Leases an actor's node waits for a home's answer before it answers the
/// request `unavailable` itself: a takeover of the home (about a lease)
/// fits, with room.
const ANSWER_WAIT_LEASES: u32 = 5;

/// A request of one of this node's connections: its connection (shard,
/// slot, generation) and its `req` or client_id.
type Asked = (u16, u32, u32, u64);

/// A group's state as read: the bucket, and the state with its key's
/// revision if the key exists.
pub(super) type Loaded = (kv::Store, Option<(State, u64)>);

/// A partition's group states as read: the bucket, and per group its
/// state and its key's revision.
pub(super) type PartitionStates = (kv::Store, Vec<(u64, State, u64)>);

/// A request waiting for its group's turn.
pub(super) struct Waiting {
    partition: u32,
    seq: u64,
    op: Op,
    acker: Box<Acker>,
}

/// The groups this node homes, and what waits for them.
pub(super) struct GroupHomes {
    members_max: usize,
    per_user_max: usize,
    /// Per partition held, its groups loaded so far.
    homes: HashMap<u32, Home>,
    /// Groups whose state is loaded (or known to be missing), with the
    /// revision of their key (`None`: no key yet).
    loaded: HashMap<u64, Option<u64>>,
    /// Groups with a load or a step under way.
    busy: HashSet<u64>,
    /// Partitions whose groups are being read (see [`load_partition`]).
    loading: HashSet<u32>,
    /// Per group, its requests in stream order.
    queues: HashMap<u64, VecDeque<Waiting>>,
    kv: Option<kv::Store>,
    /// This node's requests waiting for their answer, since when.
    asked: HashMap<Asked, std::time::Instant>,
    /// How long an answer is waited for.
    answer_wait: std::time::Duration,
}

impl GroupHomes {
    /// None yet, with the limits `group_members_max` and
    /// `groups_per_user_max`, on a cluster with leases of `lease`.
    pub(super) fn new(
        members_max: usize,
        per_user_max: usize,
        lease: std::time::Duration,
    ) -> GroupHomes {
        GroupHomes {
            asked: HashMap::new(),
            answer_wait: lease * ANSWER_WAIT_LEASES,
            members_max,
            per_user_max,
            homes: HashMap::new(),
            loaded: HashMap::new(),
            busy: HashSet::new(),
            loading: HashSet::new(),
            queues: HashMap::new(),
            kv: None,
        }
    }

    /// Forgets partition `p`'s groups: their requests stay unacked in
    /// JetStream for the partition's next owner (or for this node again,
    /// which reloads their states).
    fn forget(&mut self, p: u32, partitions: u32) {
        self.unload(p, partitions);
        self.queues.retain(|&g, _| home_of(g, partitions) != p);
    }

    /// Forgets partition `p`'s states in memory: read again, group by
    /// group, before their next requests.
    fn unload(&mut self, p: u32, partitions: u32) {
        self.homes.remove(&p);
        self.loaded.retain(|&g, _| home_of(g, partitions) != p);
    }
}

impl Relay {
    /// A shard's group request or GROUP_SEND: published to the group's
    /// home partition (a create: to the actor's own).
    pub(super) async fn group_request(&mut self, msg: Msg) {
        let partitions = self.owners.partitions();
        let (reply, actor, device, group, id, sent_ns, request) = match msg {
            Msg::GroupOp {
                reply,
                actor,
                req,
                op,
            } => {
                let (group, request) = match op {
                    GroupOp::Create => (0, Request::Create),
                    GroupOp::Add { group, user } => (group, Request::Add { user }),
                    GroupOp::Remove { group, user } => (group, Request::Remove { user }),
                    GroupOp::Leave { group } => (group, Request::Leave),
                    GroupOp::Admin { group, user, admin } => {
                        (group, Request::Admin { user, admin })
                    }
                    GroupOp::Members { group } => (group, Request::Members),
                };
                (reply, actor, 0, group, req, 0, request)
            }
            Msg::GroupSend {
                reply,
                from,
                origin,
                group,
                body,
                sent_ns,
            } => (
                reply,
                from,
                origin.device,
                group,
                origin.client_id,
                sent_ns,
                Request::Send { body },
            ),
            _ => return,
        };
        let refuse = |code, text| Msg::GroupDone {
            reply,
            answer: GroupAnswer::Refused { code, id, text },
        };
        if group == 0 && request != Request::Create {
            let msg = refuse(ErrorCode::UnknownGroup, "no such group");
            self.backlog[reply.shard as usize].push_back(msg);
            return;
        }
        let home = if group == 0 {
            partition_of(actor, partitions)
        } else {
            home_of(group, partitions)
        };
        let op = Op {
            actor,
            device,
            group,
            id,
            reply: (reply.shard, reply.conn.0, reply.gen),
            sent_ns,
            node: self.me.as_str().into(),
            request,
        };
        self.groups.asked.insert(
            (reply.shard, reply.conn.0, reply.gen, id),
            std::time::Instant::now(),
        );
        let published = self
            .js
            .publish(message_subject(home), op.encode().into())
            .await;
        let tx = self.tx.clone();
        self.stats.publishes_in_flight.inc();
        let taken = std::time::Instant::now();
        tokio::spawn(async move {
            let result = acked(published).await.map(|_| ());
            let _ = tx.send(Report::GroupPublished {
                reply,
                id,
                taken,
                result,
            });
        });
    }

    /// A group request's publish failed: the actor retries.
    pub(super) fn group_publish_failed(&mut self, reply: ConnRef, id: u64, e: &str) {
        let asked = (reply.shard, reply.conn.0, reply.gen, id);
        if self.groups.asked.remove(&asked).is_none() {
            return; // answered `unavailable` already
        }
        self.stats.publish_failures.inc();
        log::warn!("cluster relay: group request not published: {e}");
        self.backlog[reply.shard as usize].push_back(Msg::GroupDone {
            reply,
            answer: GroupAnswer::Refused {
                code: ErrorCode::Unavailable,
                id,
                text: "the group's home is out of reach, retry later",
            },
        });
    }

    /// Receipts of this node's members for a sender: to its partition, in
    /// records of at most [`RECEIPT_PEERS_MAX`] members.
    pub(super) async fn group_receipt_out(
        &mut self,
        user: u64,
        kind: ReceiptKind,
        group: u64,
        msg: u64,
        peers: Vec<u64>,
    ) {
        let taken = std::time::Instant::now();
        for chunk in peers.chunks(RECEIPT_PEERS_MAX) {
            let record = Receipt {
                sender: user,
                kind,
                group,
                msg,
                peers: chunk.to_vec(),
            };
            self.publish_receipt(user, record.encode(), taken).await;
        }
    }

    /// A consumed record of kind 3 or 4; gives it back if it is neither.
    pub(super) fn group_consumed(
        &mut self,
        partition: u32,
        sequence: u64,
        payload: &[u8],
        acker: Box<Acker>,
    ) -> Option<Box<Acker>> {
        if let Some(op) = Op::decode(payload) {
            let seq = sequence & SEQ_MASK;
            let partitions = self.owners.partitions();
            let group = if op.request == Request::Create {
                group_id(partition, seq, partitions).unwrap_or(0)
            } else {
                op.group
            };
            self.groups
                .queues
                .entry(group)
                .or_default()
                .push_back(Waiting {
                    partition,
                    seq,
                    op,
                    acker,
                });
            self.group_next(group);
            return None;
        }
        if let Some(r) = Receipt::decode(payload) {
            let dst = home_shard(r.sender, self.shards());
            let token = self.hold_receipt(partition, acker);
            self.backlog[dst].push_back(Msg::GroupReceipt {
                user: r.sender,
                kind: r.kind,
                group: r.group,
                msg: r.msg,
                peers: r.peers,
                src: 0,
                seqs: vec![token],
            });
            return None;
        }
        Some(acker)
    }

    /// Starts `group`'s next request if none is under way: loads its
    /// state first if needed.
    pub(super) fn group_next(&mut self, group: u64) {
        let gh = &mut self.groups;
        if gh.busy.contains(&group) {
            return;
        }
        let Some(queue) = gh.queues.get_mut(&group) else {
            return;
        };
        let Some(front) = queue.front() else {
            gh.queues.remove(&group);
            return;
        };
        let partition = front.partition;
        if self.owners.of(partition) != Owner::Here {
            // Left for the partition's owner: unacked, it stays.
            gh.queues.remove(&group);
            return;
        }
        let partitions = self.owners.partitions();
        let kv = gh.kv.clone();
        let js = self.js.clone();
        let tx = self.tx.clone();
        if !gh.homes.contains_key(&partition) {
            // Every group of the partition first, so that a user's groups
            // there count against `groups_per_user_max` after a takeover.
            if gh.loading.insert(partition) {
                tokio::spawn(async move {
                    let result = load_partition(&js, kv, partition, partitions)
                        .await
                        .map(Box::new);
                    let _ = tx.send(Report::PartitionLoaded { partition, result });
                });
            }
            return;
        }
        gh.busy.insert(group);
        if !gh.loaded.contains_key(&group) {
            tokio::spawn(async move {
                let result = load(&js, kv, group, partitions).await.map(Box::new);
                let _ = tx.send(Report::GroupLoaded {
                    partition,
                    group,
                    result,
                });
            });
            return;
        }
        let w = queue.pop_front().expect("looked at");
        let home = gh
            .homes
            .entry(partition)
            .or_insert_with(|| Home::new(partition, partitions, gh.members_max, gh.per_user_max));
        let outcome = home.request(w.seq, &w.op, unix_ms());
        let revision = gh.loaded.get(&group).copied().flatten();
        let kv = kv.expect("loaded with the bucket");
        tokio::spawn(async move {
            let result = step(&js, &kv, partitions, revision, outcome, &w.op).await;
            let retry = match result {
                Ok(_) => {
                    let _ = w.acker.ack().await;
                    None
                }
                Err(_) => Some(w),
            };
            let _ = tx.send(Report::GroupStepped {
                group,
                partition,
                result: result.map_err(|e| (e, retry)),
            });
        });
    }

    /// Every group of `partition` was read (or not).
    pub(super) fn partition_loaded(
        &mut self,
        partition: u32,
        result: Result<Box<PartitionStates>, String>,
    ) {
        let gh = &mut self.groups;
        gh.loading.remove(&partition);
        let (kv, states) = match result {
            Ok(loaded) => *loaded,
            Err(e) => {
                // Tried again at the next reconcile.
                log::warn!("cluster relay: groups of partition {partition} not read: {e}");
                return;
            }
        };
        if self.owners.of(partition) != Owner::Here {
            return;
        }
        gh.kv = Some(kv);
        let partitions = self.owners.partitions();
        let mut home = Home::new(partition, partitions, gh.members_max, gh.per_user_max);
        for (group, state, revision) in &states {
            home.load(*group, state);
            if home.has(*group) {
                gh.loaded.insert(*group, Some(*revision));
            }
        }
        gh.homes.insert(partition, home);
        let waiting: Vec<u64> = gh
            .queues
            .keys()
            .copied()
            .filter(|&g| home_of(g, partitions) == partition)
            .collect();
        for group in waiting {
            self.group_next(group);
        }
    }

    /// A group's state was read (or not).
    pub(super) fn group_loaded(
        &mut self,
        partition: u32,
        group: u64,
        result: Result<Box<Loaded>, String>,
    ) {
        let gh = &mut self.groups;
        gh.busy.remove(&group);
        match result {
            Ok(loaded) => {
                let (kv, state) = *loaded;
                gh.kv = Some(kv);
                let partitions = self.owners.partitions();
                let home = gh.homes.entry(partition).or_insert_with(|| {
                    Home::new(partition, partitions, gh.members_max, gh.per_user_max)
                });
                let revision = state.map(|(state, revision)| {
                    home.load(group, &state);
                    revision
                });
                gh.loaded.insert(group, revision);
                self.group_next(group);
            }
            // Tried again at the next reconcile.
            Err(e) => log::warn!("cluster relay: state of group {group} not read: {e}"),
        }
    }

    /// A group's request was done (or failed part way: it is taken again
    /// from a fresh read of the state, which says how far it got).
    pub(super) fn group_stepped(
        &mut self,
        group: u64,
        partition: u32,
        result: Result<Option<u64>, (String, Option<Waiting>)>,
    ) {
        let partitions = self.owners.partitions();
        let gh = &mut self.groups;
        gh.busy.remove(&group);
        match result {
            Ok(revision) => {
                if let Some(r) = revision {
                    gh.loaded.insert(group, Some(r));
                }
                let homed = gh.homes.get(&partition).is_some_and(|h| h.has(group));
                if !homed {
                    // Never made, or deleted: not kept in memory (requests
                    // naming made-up ids would grow it), read again if
                    // asked again.
                    gh.loaded.remove(&group);
                }
                self.group_next(group);
            }
            Err((e, retry)) => {
                log::warn!("cluster relay: group {group} request not done, reading it again: {e}");
                // The partition's states in memory may be ahead of the
                // bucket: read again, group by group.
                gh.unload(partition, partitions);
                if let Some(w) = retry {
                    gh.queues.entry(group).or_default().push_front(w);
                }
            }
        }
    }

    /// At every reconcile: forgets the groups of partitions no longer
    /// here, and starts what waits (after a failed read or step).
    pub(super) fn groups_reconcile(&mut self) {
        let partitions = self.owners.partitions();
        let gone: Vec<u32> = self
            .groups
            .homes
            .keys()
            .copied()
            .filter(|&p| !self.here[p as usize])
            .collect();
        for p in gone {
            self.groups.forget(p, partitions);
        }
        let waiting: Vec<u64> = self.groups.queues.keys().copied().collect();
        for group in waiting {
            self.group_next(group);
        }
        // Requests whose answer did not come (lost with a NATS server, or
        // a home stuck): answered here, so every request is; a later
        // answer is dropped. A retry finds what the state says.
        let wait = self.groups.answer_wait;
        let late: Vec<Asked> = self
            .groups
            .asked
            .iter()
            .filter(|(_, since)| since.elapsed() >= wait)
            .map(|(&k, _)| k)
            .collect();
        for (shard, conn, gen, id) in late {
            self.groups.asked.remove(&(shard, conn, gen, id));
            let reply = ConnRef {
                shard,
                conn: ConnId(conn),
                gen,
            };
            self.backlog[shard as usize].push_back(Msg::GroupDone {
                reply,
                answer: GroupAnswer::Refused {
                    code: ErrorCode::Unavailable,
                    id,
                    text: "no answer from the group's home in time, retry later",
                },
            });
        }
    }

    /// An answer from a group's home for one of this node's connections.
    pub(super) fn group_reply(&mut self, bytes: &[u8]) {
        let Some(r) = Reply::decode(bytes) else {
            log::warn!("cluster relay: a group answer that is not ours, dropped");
            return;
        };
        let (shard, conn, gen) = r.reply;
        if self
            .groups
            .asked
            .remove(&(shard, conn, gen, r.id))
            .is_none()
        {
            // Answered already: a request done again after a crash of its
            // home, or one given up on.
            return;
        }
        let reply = ConnRef {
            shard,
            conn: ConnId(conn),
            gen,
        };
        let answer = match r.answer {
            Answer::Ok { group } => GroupAnswer::Ok { req: r.id, group },
            Answer::Ack { msg, time_ms } => GroupAnswer::Ack {
                client_id: r.id,
                msg,
                time_ms,
                sent_ns: r.sent_ns,
            },
            Answer::Refused { code, text } => GroupAnswer::Refused {
                code,
                id: r.id,
                text,
            },
            Answer::List { group, members } => GroupAnswer::List {
                req: r.id,
                group,
                members,
            },
        };
        self.backlog[shard as usize].push_back(Msg::GroupDone { reply, answer });
    }
}

/// Reads every group state of `partition` (keys `g.<partition>.*`, listed
/// with one stream info request, as the lease keys are: `kv.keys()` would
/// create a consumer), with the bucket (opened if `kv` is not yet).
async fn load_partition(
    js: &jetstream::Context,
    kv: Option<kv::Store>,
    partition: u32,
    partitions: u32,
) -> Result<PartitionStates, String> {
    let kv = match kv {
        Some(kv) => kv,
        None => js.get_key_value(BUCKET).await.map_err(|e| e.to_string())?,
    };
    let prefix = format!("{}.g.{partition}.", kv.prefix.trim_end_matches('.'));
    let mut groups = Vec::new();
    {
        let mut subjects = kv
            .stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(|e| e.to_string())?;
        while let Some((subject, _)) = subjects.try_next().await.map_err(|e| e.to_string())? {
            if let Some(group) = subject.strip_prefix(&prefix).and_then(|g| g.parse().ok()) {
                groups.push(group);
            }
        }
    }
    let mut states = Vec::with_capacity(groups.len());
    for group in groups {
        if home_of(group, partitions) != partition {
            continue;
        }
        let entry = kv
            .entry(state_key(group, partitions))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) {
            let state = State::decode(&e.value)
                .ok_or_else(|| format!("the state of group {group} is not one"))?;
            states.push((group, state, e.revision));
        }
    }
    Ok((kv, states))
}

/// Reads `group`'s state: the bucket (opened if `kv` is not yet), and the
/// state with its revision if the key exists.
async fn load(
    js: &jetstream::Context,
    kv: Option<kv::Store>,
    group: u64,
    partitions: u32,
) -> Result<Loaded, String> {
    let kv = match kv {
        Some(kv) => kv,
        None => js.get_key_value(BUCKET).await.map_err(|e| e.to_string())?,
    };
    let entry = kv
        .entry(state_key(group, partitions))
        .await
        .map_err(|e| e.to_string())?;
    let state = match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let state = State::decode(&e.value)
                .ok_or_else(|| format!("the state of group {group} is not one"))?;
            Some((state, e.revision))
        }
        _ => None,
    };
    Ok((kv, state))
}

/// Does what `outcome` says for `op`, in order: write, copies, answer.
/// The new revision of the group's key if it was written.
async fn step(
    js: &jetstream::Context,
    kv: &kv::Store,
    partitions: u32,
    revision: Option<u64>,
    outcome: Outcome,
    op: &Op,
) -> Result<Option<u64>, String> {
    let mut written = None;
    if let Some((group, state)) = &outcome.write {
        let key = state_key(*group, partitions);
        let value = state.encode().into();
        let r = match revision {
            Some(r) => kv.update(key, value, r).await.map_err(|e| e.to_string())?,
            None => kv.create(key, value).await.map_err(|e| e.to_string())?,
        };
        written = Some(r);
    }
    if let Some(m) = &outcome.ordered {
        let mut acks = Vec::with_capacity(outcome.audience.len());
        for &member in &outcome.audience {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", copy_msg_id(m.group, m.msg, member).as_str());
            let subject = message_subject(partition_of(member, partitions));
            let record = copy_for(member, m);
            let ack = js
                .publish_with_headers(subject, headers, record.encode().into())
                .await
                .map_err(|e| e.to_string())?;
            acks.push(ack);
        }
        // All published before the first wait: one round trip, not one
        // per member.
        for ack in acks {
            ack.await.map_err(|e| e.to_string())?;
        }
    }
    if let Some(answer) = outcome.answer {
        let bytes = Reply::to(op, answer).encode();
        // Not stored: a lost answer is recovered by the client's retry.
        let _ = js
            .client()
            .publish(reply_subject(&op.node), bytes.into())
            .await;
    }
    Ok(written)
}
