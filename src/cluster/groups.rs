//! Groups across cluster nodes (docs/CLUSTER.md, "Groups across nodes"):
//! the records, ids and keys, with no NATS in them (the relay publishes
//! and consumes them, `relay/groups.rs`; the home's step is
//! `group_home`).
//!
//! - **Ids.** A group hashes to a partition like a user, its *home*; the
//!   owner of that partition orders the group. A cluster-wide unique id
//!   needs no coordination: the GROUP_CREATE is published to the home
//!   partition's subject, and the id is `stream sequence × partitions +
//!   partition` ([`group_id`]), so the home is `id % partitions`
//!   ([`home_of`]) and two creates never meet (one stream numbers the
//!   records of all its partitions).
//! - **Requests** ([`Op`], record kind 3) go to the home partition's
//!   message subject, so a group's changes and messages are consumed by
//!   its home in one stream order.
//! - **State** of one group, the store of record, is a value of the KV
//!   bucket [`BUCKET`] under [`state_key`], written by the home with the
//!   revision it read (a home that lost its lease cannot overwrite its
//!   successor's writes): the group log records that rebuild the group
//!   (`store::groups`: `Created`, `Added`, `Admin`, `Order`, `Sent`) and
//!   the stream sequence of the last request applied ([`State`]).
//! - **Copies.** Each member's copy is an ordinary message record for the
//!   member from user 0 whose body is the group envelope, as a copy sits
//!   in a member's queue on one node, published to the member's partition
//!   with the id [`copy_msg_id`]: a home that crashed after ordering a
//!   message and publishes its copies again is deduplicated by JetStream.
//! - **Answers** go to the actor's node over plain NATS as a [`Reply`]
//!   (kind 5, [`reply_subject`]).
//! - **Receipts** of members flow back to the sender's partition as one
//!   [`Receipt`] record (kind 4) per batch of members.

use crate::group::envelope::{Envelope, GROUP_SENDER};
use crate::proto::{put_varint, ErrorCode, GroupEvent, ReceiptKind};
use crate::store::groups::{self as log, Record as LogRecord};

use super::group_home::Answer;
use super::wire::{self, varint};

/// The JetStream KV bucket holding every group's state.
pub const BUCKET: &str = "tern_groups";

/// Record kind of a group request on the home partition's subject.
const KIND_OP: u8 = 3;
/// Record kind of a batch of group receipts on the sender's partition's
/// receipt subject.
const KIND_RECEIPT: u8 = 4;
/// Record kind of a home's answer on the actor's node's subject.
const KIND_REPLY: u8 = 5;
/// First byte of a [`State`] value: its layout's version.
const STATE_VERSION: u8 = 1;
/// Most members one [`Receipt`] names (a bound on what a decoder takes).
pub const RECEIPT_PEERS_MAX: usize = 4096;

/// The id of the group created by the record at `seq` of its stream,
/// published to partition `home` of `partitions`; `None` past `u64`
/// (never with JetStream's sequences below 2^48 and at most 65536
/// partitions).
pub fn group_id(home: u32, seq: u64, partitions: u32) -> Option<u64> {
    seq.checked_mul(u64::from(partitions))?
        .checked_add(u64::from(home))
}

/// The home partition of `group`.
pub fn home_of(group: u64, partitions: u32) -> u32 {
    (group % u64::from(partitions.max(1))) as u32
}

/// The key of `group`'s state in [`BUCKET`], among `partitions`:
/// `g.<home>.<group>`, so the node claiming a partition lists the groups
/// it homes with one key filter (`g.<home>.*`).
pub fn state_key(group: u64, partitions: u32) -> String {
    format!("g.{}.{group}", home_of(group, partitions))
}

/// The plain NATS subject on which `node` takes the answers to its
/// actors' group requests.
pub fn reply_subject(node: &str) -> String {
    format!("terng.{node}")
}

/// The `Nats-Msg-Id` of `member`'s copy of message `msg` of `group`: the
/// same however often the home publishes it, so JetStream keeps one.
pub fn copy_msg_id(group: u64, msg: u64, member: u64) -> String {
    format!("g:{group}:{msg}:{member}")
}

/// What a group message or event is, as the home ordered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ordered {
    /// The group.
    pub group: u64,
    /// Its number in the group's order.
    pub msg: u64,
    /// The sender (the actor, for an event).
    pub from: u64,
    /// When the home ordered it, ms since the Unix epoch.
    pub time_ms: u64,
    /// The sender's client_id (0 for an event).
    pub client_id: u64,
    /// `None`: a message; else a membership event.
    pub event: Option<GroupEvent>,
    /// The event's subject (0 for a message).
    pub subject: u64,
    /// A message's body (empty for an event).
    pub body: Box<[u8]>,
}

/// `member`'s copy of `m`: the message record published to the member's
/// partition, its sender user 0 and its body the group envelope (what the
/// member's shard delivers as GROUP_DELIVER or GROUP_EVENT).
pub fn copy_for(member: u64, m: &Ordered) -> wire::Record {
    let envelope = Envelope {
        group: m.group,
        msg: m.msg,
        from: m.from,
        client_id: m.client_id,
        event: m.event,
        subject: m.subject,
        body: &m.body,
    };
    let mut body = Vec::with_capacity(envelope.encoded_len());
    envelope.encode(&mut body);
    wire::Record::Message {
        to: member,
        from: GROUP_SENDER,
        time_ms: m.time_ms,
        client_id: 0,
        body: body.into(),
    }
}

/// What a group request asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// GROUP_CREATE (the group's id is the record's, [`group_id`]).
    Create,
    /// GROUP_ADD of `user`.
    Add {
        /// The user added.
        user: u64,
    },
    /// GROUP_REMOVE of `user`.
    Remove {
        /// The user removed.
        user: u64,
    },
    /// GROUP_LEAVE.
    Leave,
    /// GROUP_ADMIN: make `user` an admin, or revoke it.
    Admin {
        /// The member.
        user: u64,
        /// Make (or revoke).
        admin: bool,
    },
    /// GROUP_SEND of `body`.
    Send {
        /// The message's body.
        body: Box<[u8]>,
    },
    /// GROUP_MEMBERS: answered from the home's state in the group's
    /// order, so a member list never shows a change before its event.
    Members,
}

impl Request {
    fn code(&self) -> u8 {
        match self {
            Request::Create => 1,
            Request::Add { .. } => 2,
            Request::Remove { .. } => 3,
            Request::Leave => 4,
            Request::Admin { admin: false, .. } => 5,
            Request::Admin { admin: true, .. } => 6,
            Request::Send { .. } => 7,
            Request::Members => 8,
        }
    }
}

/// A group request on its way to the group's home (record kind 3):
///
/// ```text
/// 03 actor device group id reply_shard reply_conn reply_gen sent_ns code
///    [user: codes 2, 3, 5, 6] node_len node [body: code 7, rest]
/// ```
///
/// Codes: 1 create, 2 add, 3 remove, 4 leave, 5 revoke admin, 6 make
/// admin, 7 send, 8 members.
///
/// `id` is the request's `req`, or a GROUP_SEND's client_id; `group` is 0
/// for a create. The reply fields name the actor's connection on the node
/// `node`, which the home answers over plain NATS (an answer lost there
/// is recovered by the client's retry: a GROUP_SEND's client_id is in the
/// group's dedupe window, a change made again changes nothing or is
/// refused for its state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Who asks.
    pub actor: u64,
    /// The actor's device.
    pub device: u32,
    /// The group (0 for a create).
    pub group: u64,
    /// The request's `req`, or a GROUP_SEND's client_id.
    pub id: u64,
    /// The actor's connection on its node: shard, connection slot and
    /// generation, echoed in the answer.
    pub reply: (u16, u32, u32),
    /// When the actor's node decoded the request (its monotonic clock),
    /// echoed in the answer for its latency figures.
    pub sent_ns: u64,
    /// The actor's node id (`[cluster] node_id`).
    pub node: Box<str>,
    /// What it asks.
    pub request: Request,
}

impl Op {
    /// The bytes published.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![KIND_OP];
        let (shard, conn, gen) = self.reply;
        for v in [
            self.actor,
            u64::from(self.device),
            self.group,
            self.id,
            u64::from(shard),
            u64::from(conn),
            u64::from(gen),
            self.sent_ns,
            u64::from(self.request.code()),
        ] {
            put_varint(v, &mut out);
        }
        match &self.request {
            Request::Add { user } | Request::Remove { user } | Request::Admin { user, .. } => {
                put_varint(*user, &mut out)
            }
            Request::Create | Request::Leave | Request::Send { .. } | Request::Members => {}
        }
        put_varint(self.node.len() as u64, &mut out);
        out.extend_from_slice(self.node.as_bytes());
        if let Request::Send { body } = &self.request {
            out.extend_from_slice(body);
        }
        out
    }

    /// Parses a record of kind 3; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Op> {
        let (&KIND_OP, mut rest) = bytes.split_first()? else {
            return None;
        };
        let mut next = || -> Option<u64> {
            let (v, used) = varint(rest)?;
            rest = &rest[used..];
            Some(v)
        };
        let actor = next()?;
        let device = u32::try_from(next()?).ok()?;
        let (group, id) = (next()?, next()?);
        let shard = u16::try_from(next()?).ok()?;
        let conn = u32::try_from(next()?).ok()?;
        let gen = u32::try_from(next()?).ok()?;
        let sent_ns = next()?;
        let code = next()?;
        let request = match code {
            1 => Request::Create,
            2 => Request::Add { user: next()? },
            3 => Request::Remove { user: next()? },
            4 => Request::Leave,
            5 | 6 => Request::Admin {
                user: next()?,
                admin: code == 6,
            },
            7 => Request::Send { body: Box::new([]) },
            8 => Request::Members,
            _ => return None,
        };
        let node_len = usize::try_from(next()?).ok()?;
        if node_len == 0 || node_len > rest.len() {
            return None;
        }
        let (node, rest) = rest.split_at(node_len);
        let node: Box<str> = std::str::from_utf8(node).ok()?.into();
        let request = match request {
            Request::Send { .. } => Request::Send { body: rest.into() },
            other if rest.is_empty() => other,
            _ => return None,
        };
        // A create names no group; every other request names one.
        if (request == Request::Create) != (group == 0) {
            return None;
        }
        Some(Op {
            actor,
            device,
            group,
            id,
            reply: (shard, conn, gen),
            sent_ns,
            node,
            request,
        })
    }
}

/// Receipts of several members for one group message, on their way to
/// its sender (record kind 4, on the sender's partition's receipt
/// subject):
///
/// ```text
/// 04 sender kind group msg count peer...
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Who sent the message (gets the receipts).
    pub sender: u64,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The group.
    pub group: u64,
    /// The message's number in the group's order.
    pub msg: u64,
    /// The members who received or read it (1 to [`RECEIPT_PEERS_MAX`]).
    pub peers: Vec<u64>,
}

impl Receipt {
    /// The bytes published.
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!((1..=RECEIPT_PEERS_MAX).contains(&self.peers.len()));
        let mut out = vec![KIND_RECEIPT];
        for v in [
            self.sender,
            self.kind as u64,
            self.group,
            self.msg,
            self.peers.len() as u64,
        ] {
            put_varint(v, &mut out);
        }
        for &p in &self.peers {
            put_varint(p, &mut out);
        }
        out
    }

    /// Parses a record of kind 4; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Receipt> {
        let (&KIND_RECEIPT, mut rest) = bytes.split_first()? else {
            return None;
        };
        let mut next = || -> Option<u64> {
            let (v, used) = varint(rest)?;
            rest = &rest[used..];
            Some(v)
        };
        let sender = next()?;
        let kind = ReceiptKind::from_u64(next()?)?;
        let (group, msg) = (next()?, next()?);
        let count = usize::try_from(next()?).ok()?;
        if !(1..=RECEIPT_PEERS_MAX).contains(&count) {
            return None;
        }
        let peers = (0..count).map(|_| next()).collect::<Option<Vec<u64>>>()?;
        rest.is_empty().then_some(Receipt {
            sender,
            kind,
            group,
            msg,
            peers,
        })
    }
}

/// Texts of the ERRORs a home answers: a reply names one by its place
/// here, and the actor's node writes the same text as one box would.
const TEXTS: [&str; 15] = [
    "no such group",
    "not a member of the group",
    "only an admin may do this",
    "in too many groups",
    "that group id is taken",
    "user 0 does not exist",
    "the group is full (group_members_max)",
    "the user is in too many groups",
    "the user is not a member",
    "the group's last admin stays",
    "the last admin may not leave: make another member admin first",
    "client_id already used for another group's message",
    "client_id is 32 or more below the highest taken from this device",
    "no group id left",
    "the group's home refused it",
];

/// A home's answer to one request, on its way to the actor's node over
/// plain NATS ([`reply_subject`], record kind 5):
///
/// ```text
/// 05 shard conn gen id sent_ns code
///    1 ok: group | 2 ack: msg time_ms | 3 refused: error text_index
///    | 4 list: group count (user admin)...
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The actor's connection, as its request named it.
    pub reply: (u16, u32, u32),
    /// The request's `req`, or a GROUP_SEND's client_id.
    pub id: u64,
    /// As the request carried it.
    pub sent_ns: u64,
    /// The answer.
    pub answer: Answer,
}

impl Reply {
    /// The answer to `op`.
    pub fn to(op: &Op, answer: Answer) -> Reply {
        Reply {
            reply: op.reply,
            id: op.id,
            sent_ns: op.sent_ns,
            answer,
        }
    }

    /// The bytes published.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![KIND_REPLY];
        let (shard, conn, gen) = self.reply;
        for v in [
            u64::from(shard),
            u64::from(conn),
            u64::from(gen),
            self.id,
            self.sent_ns,
        ] {
            put_varint(v, &mut out);
        }
        let mut put = |vs: &[u64]| vs.iter().for_each(|&v| put_varint(v, &mut out));
        match &self.answer {
            Answer::Ok { group } => put(&[1, *group]),
            Answer::Ack { msg, time_ms } => put(&[2, *msg, *time_ms]),
            Answer::Refused { code, text } => {
                let at = TEXTS
                    .iter()
                    .position(|t| t == text)
                    .unwrap_or(TEXTS.len() - 1);
                put(&[3, *code as u64, at as u64]);
            }
            Answer::List { group, members } => {
                put(&[4, *group, members.len() as u64]);
                for &(user, admin) in members {
                    put(&[user, u64::from(admin)]);
                }
            }
        }
        out
    }

    /// Parses a record of kind 5; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Reply> {
        let (&KIND_REPLY, mut rest) = bytes.split_first()? else {
            return None;
        };
        let mut next = || -> Option<u64> {
            let (v, used) = varint(rest)?;
            rest = &rest[used..];
            Some(v)
        };
        let shard = u16::try_from(next()?).ok()?;
        let conn = u32::try_from(next()?).ok()?;
        let gen = u32::try_from(next()?).ok()?;
        let (id, sent_ns) = (next()?, next()?);
        let answer = match next()? {
            1 => Answer::Ok { group: next()? },
            2 => Answer::Ack {
                msg: next()?,
                time_ms: next()?,
            },
            3 => Answer::Refused {
                code: ErrorCode::from_u64(next()?)?,
                text: TEXTS.get(usize::try_from(next()?).ok()?)?,
            },
            4 => {
                let group = next()?;
                let count = usize::try_from(next()?).ok()?;
                // Two bytes at least per member: nothing reserved for more.
                if count > bytes.len() {
                    return None;
                }
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    let user = next()?;
                    let admin = match next()? {
                        0 => false,
                        1 => true,
                        _ => return None,
                    };
                    members.push((user, admin));
                }
                Answer::List { group, members }
            }
            _ => return None,
        };
        rest.is_empty().then_some(Reply {
            reply: (shard, conn, gen),
            id,
            sent_ns,
            answer,
        })
    }
}

/// One group's durable state, the value under [`state_key`]:
///
/// ```text
/// 01 applied_seq(varint) count(varint) record... (the group log's
///    framing, a crc each; `count` of them, so a cut value is refused)
/// ```
///
/// `applied_seq` is the stream sequence of the last request the home
/// applied: a request redelivered after a crash with a lower sequence was
/// done whole (the home takes a group's next request only once the one
/// before was answered and its copies published) and is only acked; one
/// with this sequence may have published part of its copies, so they are
/// published again (deduplicated by [`copy_msg_id`]) with the members in
/// this state, which are those it was ordered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// The stream sequence of the last request applied.
    pub applied_seq: u64,
    /// The group log records that rebuild the group (`Created`, `Added`,
    /// `Admin`, `Order`, `Sent`).
    pub records: Vec<LogRecord>,
}

impl State {
    /// The value written.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        put_varint(self.applied_seq, &mut out);
        put_varint(self.records.len() as u64, &mut out);
        for r in &self.records {
            r.encode(&mut out);
        }
        out
    }

    /// Parses a value; `None` if any byte of it is not a state (a value
    /// is written whole, so a bad one is refused whole, never half read).
    pub fn decode(bytes: &[u8]) -> Option<State> {
        let (&STATE_VERSION, rest) = bytes.split_first()? else {
            return None;
        };
        let (applied_seq, used) = varint(rest)?;
        let rest = &rest[used..];
        let (count, used) = varint(rest)?;
        let mut rest = &rest[used..];
        // Each record takes at least a header: a count past the bytes
        // left is refused before anything is reserved for it.
        let count = usize::try_from(count).ok().filter(|&n| n <= rest.len())?;
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            let (r, used) = log::decode(rest)?;
            records.push(r);
            rest = &rest[used..];
        }
        rest.is_empty().then_some(State {
            applied_seq,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_name_their_home() {
        let partitions = 4096;
        let mut seen = std::collections::HashSet::new();
        // Records of one stream (partitions 0..64) and of the next.
        for (home, seq) in [(0, 1), (63, 1), (0, 2), (64, 1), (64, 2), (4095, 9)] {
            let id = group_id(home, seq, partitions).unwrap();
            assert_eq!(home_of(id, partitions), home);
            assert!(seen.insert(id), "{home} {seq}");
            assert_ne!(id, 0, "0 is no group");
        }
        // The largest JetStream sequence with the most partitions fits.
        let id = group_id(65_535, (1 << 48) - 1, 65_536).unwrap();
        assert_eq!(home_of(id, 65_536), 65_535);
        assert_eq!(group_id(1, u64::MAX, 2), None);
        assert_eq!(home_of(5, 0), 0);
    }

    #[test]
    fn keys_and_copy_ids() {
        assert_eq!(state_key(4097, 4096), "g.1.4097");
        assert_eq!(state_key(4097, 1), "g.0.4097");
        assert_eq!(copy_msg_id(4097, 3, 12), "g:4097:3:12");
        assert_ne!(copy_msg_id(1, 23, 4), copy_msg_id(1, 2, 34));
    }

    #[test]
    fn a_copy_is_a_message_from_user_0_carrying_the_envelope() {
        let m = Ordered {
            group: 4097,
            msg: 3,
            from: 17,
            time_ms: 1_767_225_600_123,
            client_id: 9,
            event: None,
            subject: 0,
            body: b"hi all".to_vec().into(),
        };
        let record = copy_for(12, &m);
        let wire::Record::Message {
            to,
            from,
            time_ms,
            client_id,
            body,
        } = &record
        else {
            panic!("{record:?}");
        };
        assert_eq!((*to, *from, *time_ms, *client_id), (12, 0, m.time_ms, 0));
        let e = Envelope::decode(body).unwrap();
        assert_eq!(
            (
                e.group,
                e.msg,
                e.from,
                e.client_id,
                e.event,
                e.subject,
                e.body
            ),
            (4097, 3, 17, 9, None, 0, &b"hi all"[..])
        );
        // What is published comes back the same from the stream.
        assert_eq!(wire::Record::decode(&record.encode()), Some(record));
        // An event: no body, its subject.
        let event = Ordered {
            event: Some(GroupEvent::Removed),
            subject: 12,
            client_id: 0,
            body: Box::default(),
            ..m.clone()
        };
        let wire::Record::Message { body, .. } = copy_for(12, &event) else {
            panic!();
        };
        let e = Envelope::decode(&body).unwrap();
        assert_eq!((e.event, e.subject), (Some(GroupEvent::Removed), 12));
    }

    fn op(group: u64, request: Request) -> Op {
        Op {
            actor: 17,
            device: 2,
            group,
            id: 300,
            reply: (1, 70_000, u32::MAX),
            sent_ns: u64::MAX,
            node: "node-a".into(),
            request,
        }
    }

    #[test]
    fn requests_round_trip() {
        let ops = [
            op(0, Request::Create),
            op(4097, Request::Add { user: u64::MAX }),
            op(4097, Request::Remove { user: 5 }),
            op(4097, Request::Leave),
            op(
                4097,
                Request::Admin {
                    user: 5,
                    admin: true,
                },
            ),
            op(
                4097,
                Request::Admin {
                    user: 5,
                    admin: false,
                },
            ),
            op(4097, Request::Send { body: Box::new([]) }),
            op(4097, Request::Members),
            op(
                4097,
                Request::Send {
                    body: b"hello".to_vec().into(),
                },
            ),
        ];
        for o in ops {
            let bytes = o.encode();
            assert_eq!(Op::decode(&bytes), Some(o.clone()), "{o:?}");
            // Not mistaken for the other records on the same subjects.
            assert_eq!(wire::Record::decode(&bytes), None);
            assert_eq!(Receipt::decode(&bytes), None);
        }
    }

    #[test]
    fn bad_requests_are_refused_not_misread() {
        assert_eq!(Op::decode(b""), None);
        let good = op(4097, Request::Leave).encode();
        // Cut anywhere: refused.
        for cut in 0..good.len() {
            assert_eq!(Op::decode(&good[..cut]), None, "{cut}");
        }
        // Trailing bytes on a request without a body.
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Op::decode(&long), None);
        // A create naming a group, a change naming none.
        let mut create = op(0, Request::Create);
        create.group = 5;
        assert_eq!(Op::decode(&create.encode()), None);
        assert_eq!(Op::decode(&op(0, Request::Leave).encode()), None);
        // Unknown request code; a device past u32; an empty node id.
        assert_eq!(
            Op::decode(&[KIND_OP, 1, 0, 1, 1, 0, 0, 0, 9, 1, b'a']),
            None
        );
        assert_eq!(
            Op::decode(&[KIND_OP, 1, 0x80, 0x80, 0x80, 0x80, 0x10, 1, 1, 0, 0, 0, 0, 4, 1, b'a']),
            None
        );
        assert_eq!(Op::decode(&[KIND_OP, 1, 0, 1, 1, 0, 0, 0, 0, 4, 0]), None);
        // A node id that is not UTF-8.
        assert_eq!(
            Op::decode(&[KIND_OP, 1, 0, 1, 1, 0, 0, 0, 4, 1, 0xff]),
            None
        );
    }

    #[test]
    fn replies_round_trip_with_the_texts_of_one_box() {
        let answers = [
            Answer::Ok { group: 4097 },
            Answer::Ack {
                msg: u64::MAX,
                time_ms: 1_767_225_600_123,
            },
            Answer::Refused {
                code: ErrorCode::NotMember,
                text: "not a member of the group",
            },
            Answer::List {
                group: 4097,
                members: vec![(1, true), (u64::MAX, false)],
            },
        ];
        for answer in answers {
            let r = Reply {
                reply: (3, 70_000, 9),
                id: 300,
                sent_ns: 12,
                answer,
            };
            let bytes = r.encode();
            assert_eq!(Reply::decode(&bytes), Some(r.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(Reply::decode(&bytes[..cut]), None, "{cut}");
            }
            assert_eq!(Op::decode(&bytes), None);
        }
        // Every text a home answers with is in the table.
        for text in TEXTS {
            let r = Reply {
                reply: (0, 0, 0),
                id: 1,
                sent_ns: 0,
                answer: Answer::Refused {
                    code: ErrorCode::NotAdmin,
                    text,
                },
            };
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
        // Unknown answer code, text index, admin flag.
        assert_eq!(Reply::decode(&[KIND_REPLY, 0, 0, 0, 1, 0, 9]), None);
        assert_eq!(Reply::decode(&[KIND_REPLY, 0, 0, 0, 1, 0, 3, 1, 99]), None);
        assert_eq!(
            Reply::decode(&[KIND_REPLY, 0, 0, 0, 1, 0, 4, 1, 1, 5, 2]),
            None
        );
    }

    #[test]
    fn receipts_round_trip_and_refuse_garbage() {
        let r = Receipt {
            sender: 17,
            kind: ReceiptKind::Read,
            group: 4097,
            msg: 3,
            peers: vec![1, u64::MAX, 12],
        };
        let bytes = r.encode();
        assert_eq!(Receipt::decode(&bytes), Some(r));
        assert_eq!(wire::Record::decode(&bytes), None);
        assert_eq!(Op::decode(&bytes), None);
        for cut in 0..bytes.len() {
            assert_eq!(Receipt::decode(&bytes[..cut]), None, "{cut}");
        }
        let mut long = bytes.clone();
        long.push(1);
        assert_eq!(Receipt::decode(&long), None);
        // No peer; more peers than a receipt may name; an unknown kind.
        assert_eq!(Receipt::decode(&[KIND_RECEIPT, 1, 1, 1, 1, 0]), None);
        assert_eq!(
            Receipt::decode(&[KIND_RECEIPT, 1, 1, 1, 1, 0x81, 0x20]),
            None
        );
        assert_eq!(Receipt::decode(&[KIND_RECEIPT, 1, 9, 1, 1, 1, 5]), None);
    }

    #[test]
    fn states_round_trip_and_refuse_a_bad_value_whole() {
        let state = State {
            applied_seq: 1 << 40,
            records: vec![
                LogRecord::Created {
                    group: 4097,
                    creator: 17,
                },
                LogRecord::Added {
                    group: 4097,
                    user: 12,
                },
                LogRecord::Admin {
                    group: 4097,
                    user: 12,
                    admin: true,
                },
                LogRecord::Order {
                    group: 4097,
                    last_msg: 3,
                },
                LogRecord::Sent {
                    group: 4097,
                    msg: 3,
                    from: 17,
                    time_ms: 1_767_225_600_123,
                    client_id: 9,
                    device: 2,
                },
            ],
        };
        let bytes = state.encode();
        assert_eq!(State::decode(&bytes), Some(state.clone()));
        let empty = State {
            applied_seq: 0,
            records: Vec::new(),
        };
        assert_eq!(State::decode(&empty.encode()), Some(empty));
        // Cut anywhere, or one byte flipped in a record: refused whole.
        for cut in 0..bytes.len() {
            assert_eq!(State::decode(&bytes[..cut]), None, "{cut}");
        }
        let mut flipped = bytes;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(State::decode(&flipped), None);
        assert_eq!(State::decode(&[2, 0, 0]), None);
        // More records than bytes, trailing bytes.
        assert_eq!(State::decode(&[STATE_VERSION, 0, 0x7f]), None);
        assert_eq!(State::decode(&[STATE_VERSION, 0, 0, 0]), None);
    }
}
