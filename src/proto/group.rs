//! The group frames of protocol v2 (types `0x20`..`0x2C`,
//! docs/PROTOCOL.md "Groups"): their fields, decode, encode and length.
//!
//! One generic type serves both the borrowed frame a decode returns
//! (`GroupFrame<&[u8]>`, inside [`Frame::Group`](super::Frame::Group)) and
//! the owned one kept past the buffer (`GroupFrame<Vec<u8>>`), so the two
//! cannot drift. The rest fields that are lists (GROUP_LIST entries,
//! GROUP_RECEIPT members) stay encoded bytes: decode checks them whole and
//! never allocates, [`list_entries`] and [`list_users`] walk them.

use super::{put_varint, read_varint, varint_len, DecodeError, Fields, Head, Limits, ReceiptKind};
use super::{Varint, LEN_PREFIX_BYTES_MAX};

pub(super) const TYPE_GROUP_CREATE: u8 = 0x20;
pub(super) const TYPE_GROUP_ADD: u8 = 0x21;
pub(super) const TYPE_GROUP_REMOVE: u8 = 0x22;
pub(super) const TYPE_GROUP_LEAVE: u8 = 0x23;
pub(super) const TYPE_GROUP_ADMIN: u8 = 0x24;
pub(super) const TYPE_GROUP_MEMBERS: u8 = 0x25;
pub(super) const TYPE_GROUP_OK: u8 = 0x26;
pub(super) const TYPE_GROUP_LIST: u8 = 0x27;
pub(super) const TYPE_GROUP_SEND: u8 = 0x28;
pub(super) const TYPE_GROUP_DELIVER: u8 = 0x29;
pub(super) const TYPE_GROUP_EVENT: u8 = 0x2A;
pub(super) const TYPE_GROUP_READ: u8 = 0x2B;
pub(super) const TYPE_GROUP_RECEIPT: u8 = 0x2C;

/// Whether `type_byte` is a group frame type.
pub(super) fn is_group_type(type_byte: u8) -> bool {
    (TYPE_GROUP_CREATE..=TYPE_GROUP_RECEIPT).contains(&type_byte)
}

/// How much smaller than `body_bytes_max` a GROUP_SEND body must be: the
/// two varints GROUP_DELIVER has beyond a v2 DELIVER (group, msg), so a
/// body that is taken always fits in the GROUP_DELIVER that carries it.
pub const GROUP_BODY_ROOM_BYTES: usize = 2 * LEN_PREFIX_BYTES_MAX;

/// A membership change, as GROUP_EVENT announces it. The numbers are part
/// of the wire format and of the group log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GroupEvent {
    /// 1: `actor` created the group (`subject` = actor).
    Created = 1,
    /// 2: `actor` added `subject`.
    Added = 2,
    /// 3: `actor` removed `subject`.
    Removed = 3,
    /// 4: `subject` left (`actor` = subject).
    Left = 4,
    /// 5: `actor` made `subject` an admin.
    Admin = 5,
    /// 6: `actor` revoked `subject`'s admin role.
    Unadmin = 6,
}

impl GroupEvent {
    /// The event numbered `v`, if any.
    pub fn from_u64(v: u64) -> Option<GroupEvent> {
        Some(match v {
            1 => GroupEvent::Created,
            2 => GroupEvent::Added,
            3 => GroupEvent::Removed,
            4 => GroupEvent::Left,
            5 => GroupEvent::Admin,
            6 => GroupEvent::Unadmin,
            _ => return None,
        })
    }

    /// The event's name in docs/PROTOCOL.md, e.g. `"added"`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupEvent::Created => "created",
            GroupEvent::Added => "added",
            GroupEvent::Removed => "removed",
            GroupEvent::Left => "left",
            GroupEvent::Admin => "admin",
            GroupEvent::Unadmin => "unadmin",
        }
    }
}

/// A group frame. `B` is the type of its rest field: `&[u8]` when
/// borrowed from the decode buffer, `Vec<u8>` when owned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupFrame<B> {
    /// 0x20, client to server: create a group; the caller is its first
    /// admin. Answered with GROUP_OK naming the new group.
    Create {
        /// Client-chosen request id, echoed in the answer.
        req: u64,
    },
    /// 0x21, client to server, admins only: add `user` to `group`.
    Add {
        /// Request id.
        req: u64,
        /// The group.
        group: u64,
        /// The user added.
        user: u64,
    },
    /// 0x22, client to server, admins only: remove `user` from `group`.
    Remove {
        /// Request id.
        req: u64,
        /// The group.
        group: u64,
        /// The user removed.
        user: u64,
    },
    /// 0x23, client to server: leave `group`.
    Leave {
        /// Request id.
        req: u64,
        /// The group.
        group: u64,
    },
    /// 0x24, client to server, admins only: make (or revoke) `user` an admin.
    Admin {
        /// Request id.
        req: u64,
        /// The group.
        group: u64,
        /// A member.
        user: u64,
        /// `true`: make admin; `false`: revoke.
        admin: bool,
    },
    /// 0x25, client to server, members only: fetch the member list,
    /// answered with one or more GROUP_LIST frames.
    Members {
        /// Request id.
        req: u64,
        /// The group.
        group: u64,
    },
    /// 0x26, server to client: the request `req` about `group` was done
    /// (durably).
    Ok {
        /// The request's id.
        req: u64,
        /// The group (for GROUP_CREATE: the new one).
        group: u64,
    },
    /// 0x27, server to client: part of `group`'s member list.
    List {
        /// The GROUP_MEMBERS' request id.
        req: u64,
        /// The group.
        group: u64,
        /// Entries still to come in later GROUP_LIST frames; 0 on the last.
        left: u64,
        /// Encoded entries (rest of the frame): user varint, role varint
        /// (0 member, 1 admin); walk them with [`list_entries`].
        entries: B,
    },
    /// 0x28, client to server, members only: a message for the group.
    Send {
        /// Client-chosen message id, echoed in ACK and ERROR.
        client_id: u64,
        /// The group.
        group: u64,
        /// Message body (rest of the frame), at most `body_bytes_max -`
        /// [`GROUP_BODY_ROOM_BYTES`].
        body: B,
    },
    /// 0x29, server to client: a group message.
    Deliver {
        /// This member's copy's id in its queue (what DELIVERED names).
        server_id: u64,
        /// The group.
        group: u64,
        /// The group's id for the message (the sender's ACK's server_id),
        /// the same at every member and increasing in the group's order.
        msg: u64,
        /// The sender.
        from: u64,
        /// When the group's home shard took it, ms since the Unix epoch.
        server_time_ms: u64,
        /// The sender's client_id.
        client_id: u64,
        /// Message body (rest of the frame).
        body: B,
    },
    /// 0x2A, server to client: a membership change, in the group's order.
    Event {
        /// This member's copy's id in its queue (what DELIVERED names).
        server_id: u64,
        /// The group.
        group: u64,
        /// The change's place in the group's order.
        msg: u64,
        /// Who made the change.
        actor: u64,
        /// When, ms since the Unix epoch.
        server_time_ms: u64,
        /// What changed.
        event: GroupEvent,
        /// Whom it is about.
        subject: u64,
    },
    /// 0x2B, client to server: this member read `from`'s message `msg`.
    Read {
        /// The group.
        group: u64,
        /// The GROUP_DELIVER's `msg`.
        msg: u64,
        /// The GROUP_DELIVER's `from`.
        from: u64,
    },
    /// 0x2C, server to client: members who got (or read) the sender's
    /// message `msg`, batched.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The group.
        group: u64,
        /// The message (as in the sender's ACK).
        msg: u64,
        /// Encoded user varints (rest of the frame), at least one; walk
        /// them with [`list_users`].
        members: B,
    },
}

impl<B: AsRef<[u8]>> GroupFrame<B> {
    /// The frame borrowing this one's rest field.
    pub fn as_ref(&self) -> GroupFrame<&[u8]> {
        self.map(|b| b.as_ref())
    }

    /// The frame owning a copy of this one's rest field.
    pub fn to_vec(&self) -> GroupFrame<Vec<u8>> {
        self.map(|b| b.as_ref().to_vec())
    }

    /// The same frame with its rest field passed through `f`.
    fn map<'s, C>(&'s self, f: impl FnOnce(&'s B) -> C) -> GroupFrame<C> {
        match *self {
            GroupFrame::Create { req } => GroupFrame::Create { req },
            GroupFrame::Add { req, group, user } => GroupFrame::Add { req, group, user },
            GroupFrame::Remove { req, group, user } => GroupFrame::Remove { req, group, user },
            GroupFrame::Leave { req, group } => GroupFrame::Leave { req, group },
            GroupFrame::Admin {
                req,
                group,
                user,
                admin,
            } => GroupFrame::Admin {
                req,
                group,
                user,
                admin,
            },
            GroupFrame::Members { req, group } => GroupFrame::Members { req, group },
            GroupFrame::Ok { req, group } => GroupFrame::Ok { req, group },
            GroupFrame::List {
                req,
                group,
                left,
                ref entries,
            } => GroupFrame::List {
                req,
                group,
                left,
                entries: f(entries),
            },
            GroupFrame::Send {
                client_id,
                group,
                ref body,
            } => GroupFrame::Send {
                client_id,
                group,
                body: f(body),
            },
            GroupFrame::Deliver {
                server_id,
                group,
                msg,
                from,
                server_time_ms,
                client_id,
                ref body,
            } => GroupFrame::Deliver {
                server_id,
                group,
                msg,
                from,
                server_time_ms,
                client_id,
                body: f(body),
            },
            GroupFrame::Event {
                server_id,
                group,
                msg,
                actor,
                server_time_ms,
                event,
                subject,
            } => GroupFrame::Event {
                server_id,
                group,
                msg,
                actor,
                server_time_ms,
                event,
                subject,
            },
            GroupFrame::Read { group, msg, from } => GroupFrame::Read { group, msg, from },
            GroupFrame::Receipt {
                kind,
                group,
                msg,
                ref members,
            } => GroupFrame::Receipt {
                kind,
                group,
                msg,
                members: f(members),
            },
        }
    }

    /// The frame type's wire name, e.g. `"GROUP_SEND"`.
    pub fn name(&self) -> &'static str {
        match self {
            GroupFrame::Create { .. } => "GROUP_CREATE",
            GroupFrame::Add { .. } => "GROUP_ADD",
            GroupFrame::Remove { .. } => "GROUP_REMOVE",
            GroupFrame::Leave { .. } => "GROUP_LEAVE",
            GroupFrame::Admin { .. } => "GROUP_ADMIN",
            GroupFrame::Members { .. } => "GROUP_MEMBERS",
            GroupFrame::Ok { .. } => "GROUP_OK",
            GroupFrame::List { .. } => "GROUP_LIST",
            GroupFrame::Send { .. } => "GROUP_SEND",
            GroupFrame::Deliver { .. } => "GROUP_DELIVER",
            GroupFrame::Event { .. } => "GROUP_EVENT",
            GroupFrame::Read { .. } => "GROUP_READ",
            GroupFrame::Receipt { .. } => "GROUP_RECEIPT",
        }
    }

    /// The frame's type byte.
    pub(super) fn type_byte(&self) -> u8 {
        match self {
            GroupFrame::Create { .. } => TYPE_GROUP_CREATE,
            GroupFrame::Add { .. } => TYPE_GROUP_ADD,
            GroupFrame::Remove { .. } => TYPE_GROUP_REMOVE,
            GroupFrame::Leave { .. } => TYPE_GROUP_LEAVE,
            GroupFrame::Admin { .. } => TYPE_GROUP_ADMIN,
            GroupFrame::Members { .. } => TYPE_GROUP_MEMBERS,
            GroupFrame::Ok { .. } => TYPE_GROUP_OK,
            GroupFrame::List { .. } => TYPE_GROUP_LIST,
            GroupFrame::Send { .. } => TYPE_GROUP_SEND,
            GroupFrame::Deliver { .. } => TYPE_GROUP_DELIVER,
            GroupFrame::Event { .. } => TYPE_GROUP_EVENT,
            GroupFrame::Read { .. } => TYPE_GROUP_READ,
            GroupFrame::Receipt { .. } => TYPE_GROUP_RECEIPT,
        }
    }

    /// Writes the fields before the rest field into `head`; returns the
    /// rest field (empty for frames without one).
    pub(super) fn encode_head(&self, head: &mut Head) -> &[u8] {
        let mut put = |vs: &[u64]| vs.iter().for_each(|&v| head.varint(v));
        match self {
            GroupFrame::Create { req } => put(&[*req]),
            GroupFrame::Add { req, group, user } | GroupFrame::Remove { req, group, user } => {
                put(&[*req, *group, *user])
            }
            GroupFrame::Leave { req, group }
            | GroupFrame::Members { req, group }
            | GroupFrame::Ok { req, group } => put(&[*req, *group]),
            GroupFrame::Admin {
                req,
                group,
                user,
                admin,
            } => put(&[*req, *group, *user, u64::from(*admin)]),
            GroupFrame::List {
                req,
                group,
                left,
                entries,
            } => {
                put(&[*req, *group, *left]);
                return entries.as_ref();
            }
            GroupFrame::Send {
                client_id,
                group,
                body,
            } => {
                put(&[*client_id, *group]);
                return body.as_ref();
            }
            GroupFrame::Deliver {
                server_id,
                group,
                msg,
                from,
                server_time_ms,
                client_id,
                body,
            } => {
                put(&[*server_id, *group, *msg, *from, *server_time_ms, *client_id]);
                return body.as_ref();
            }
            GroupFrame::Event {
                server_id,
                group,
                msg,
                actor,
                server_time_ms,
                event,
                subject,
            } => put(&[
                *server_id,
                *group,
                *msg,
                *actor,
                *server_time_ms,
                *event as u64,
                *subject,
            ]),
            GroupFrame::Read { group, msg, from } => put(&[*group, *msg, *from]),
            GroupFrame::Receipt {
                kind,
                group,
                msg,
                members,
            } => {
                put(&[*kind as u64, *group, *msg]);
                return members.as_ref();
            }
        }
        &[]
    }

    /// Bytes of the fields (type byte excluded).
    pub(super) fn fields_len(&self) -> usize {
        let sum = |vs: &[u64]| vs.iter().map(|&v| varint_len(v)).sum::<usize>();
        match self {
            GroupFrame::Create { req } => sum(&[*req]),
            GroupFrame::Add { req, group, user } | GroupFrame::Remove { req, group, user } => {
                sum(&[*req, *group, *user])
            }
            GroupFrame::Leave { req, group }
            | GroupFrame::Members { req, group }
            | GroupFrame::Ok { req, group } => sum(&[*req, *group]),
            GroupFrame::Admin {
                req, group, user, ..
            } => sum(&[*req, *group, *user]) + 1,
            GroupFrame::List {
                req,
                group,
                left,
                entries,
            } => sum(&[*req, *group, *left]) + entries.as_ref().len(),
            GroupFrame::Send {
                client_id,
                group,
                body,
            } => sum(&[*client_id, *group]) + body.as_ref().len(),
            GroupFrame::Deliver {
                server_id,
                group,
                msg,
                from,
                server_time_ms,
                client_id,
                body,
            } => {
                sum(&[*server_id, *group, *msg, *from, *server_time_ms, *client_id])
                    + body.as_ref().len()
            }
            GroupFrame::Event {
                server_id,
                group,
                msg,
                actor,
                server_time_ms,
                subject,
                ..
            } => sum(&[*server_id, *group, *msg, *actor, *server_time_ms, *subject]) + 1,
            GroupFrame::Read { group, msg, from } => sum(&[*group, *msg, *from]),
            GroupFrame::Receipt {
                kind,
                group,
                msg,
                members,
            } => sum(&[*kind as u64, *group, *msg]) + members.as_ref().len(),
        }
    }
}

/// Decodes the fields of a group frame of type `type_byte` (one of
/// [`is_group_type`]); the caller checks that nothing is left after.
pub(super) fn decode<'a>(
    type_byte: u8,
    r: &mut Fields<'a>,
    limits: &Limits,
) -> Result<GroupFrame<&'a [u8]>, DecodeError> {
    debug_assert!(is_group_type(type_byte));
    Ok(match type_byte {
        TYPE_GROUP_CREATE => GroupFrame::Create { req: r.varint()? },
        TYPE_GROUP_ADD => GroupFrame::Add {
            req: r.varint()?,
            group: r.varint()?,
            user: r.varint()?,
        },
        TYPE_GROUP_REMOVE => GroupFrame::Remove {
            req: r.varint()?,
            group: r.varint()?,
            user: r.varint()?,
        },
        TYPE_GROUP_LEAVE => GroupFrame::Leave {
            req: r.varint()?,
            group: r.varint()?,
        },
        TYPE_GROUP_ADMIN => GroupFrame::Admin {
            req: r.varint()?,
            group: r.varint()?,
            user: r.varint()?,
            admin: flag(r.varint()?).ok_or(DecodeError::Malformed("unknown admin flag"))?,
        },
        TYPE_GROUP_MEMBERS => GroupFrame::Members {
            req: r.varint()?,
            group: r.varint()?,
        },
        TYPE_GROUP_OK => GroupFrame::Ok {
            req: r.varint()?,
            group: r.varint()?,
        },
        TYPE_GROUP_LIST => GroupFrame::List {
            req: r.varint()?,
            group: r.varint()?,
            left: r.varint()?,
            entries: check_entries(r.rest())?,
        },
        TYPE_GROUP_SEND => {
            let client_id = r.varint()?;
            let group = r.varint()?;
            let body = r.rest();
            if body.len() > limits.body_bytes_max.saturating_sub(GROUP_BODY_ROOM_BYTES) {
                return Err(DecodeError::BodyTooLarge { len: body.len() });
            }
            GroupFrame::Send {
                client_id,
                group,
                body,
            }
        }
        TYPE_GROUP_DELIVER => GroupFrame::Deliver {
            server_id: r.varint()?,
            group: r.varint()?,
            msg: r.varint()?,
            from: r.varint()?,
            server_time_ms: r.varint()?,
            client_id: r.varint()?,
            body: r.body(limits)?,
        },
        TYPE_GROUP_EVENT => GroupFrame::Event {
            server_id: r.varint()?,
            group: r.varint()?,
            msg: r.varint()?,
            actor: r.varint()?,
            server_time_ms: r.varint()?,
            event: GroupEvent::from_u64(r.varint()?)
                .ok_or(DecodeError::Malformed("unknown group event"))?,
            subject: r.varint()?,
        },
        TYPE_GROUP_READ => GroupFrame::Read {
            group: r.varint()?,
            msg: r.varint()?,
            from: r.varint()?,
        },
        _ => {
            debug_assert_eq!(type_byte, TYPE_GROUP_RECEIPT);
            GroupFrame::Receipt {
                kind: ReceiptKind::from_u64(r.varint()?)
                    .ok_or(DecodeError::Malformed("unknown receipt kind"))?,
                group: r.varint()?,
                msg: r.varint()?,
                members: check_users(r.rest())?,
            }
        }
    })
}

/// `0` and `1` as a flag; anything else is not one.
fn flag(v: u64) -> Option<bool> {
    match v {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// Reads one varint of a list; `None` at its end.
fn next_varint(buf: &mut &[u8]) -> Option<Result<u64, DecodeError>> {
    if buf.is_empty() {
        return None;
    }
    Some(match read_varint(buf, u64::MAX) {
        Varint::Done { value, len } => {
            *buf = &buf[len..];
            Ok(value)
        }
        Varint::Incomplete => Err(DecodeError::Malformed("truncated list")),
        Varint::TooLarge { .. } => Err(DecodeError::Malformed("varint overflows u64")),
        Varint::Malformed(reason) => Err(DecodeError::Malformed(reason)),
    })
}

/// Checks GROUP_LIST entries: whole (user, role) pairs of minimal varints,
/// roles 0 or 1.
fn check_entries(entries: &[u8]) -> Result<&[u8], DecodeError> {
    let mut at = entries;
    while let Some(user) = next_varint(&mut at) {
        user?;
        let role = next_varint(&mut at).ok_or(DecodeError::Malformed("truncated list"))??;
        flag(role).ok_or(DecodeError::Malformed("unknown member role"))?;
    }
    Ok(entries)
}

/// Checks GROUP_RECEIPT members: at least one, minimal varints.
fn check_users(users: &[u8]) -> Result<&[u8], DecodeError> {
    if users.is_empty() {
        return Err(DecodeError::Malformed("empty member list"));
    }
    let mut at = users;
    while let Some(user) = next_varint(&mut at) {
        user?;
    }
    Ok(users)
}

/// The (user, admin) pairs of a decoded GROUP_LIST's `entries`. Stops at
/// the first bad byte (a decoded frame has none).
pub fn list_entries(entries: &[u8]) -> impl Iterator<Item = (u64, bool)> + '_ {
    let mut at = entries;
    std::iter::from_fn(move || {
        let user = next_varint(&mut at)?.ok()?;
        let role = next_varint(&mut at)?.ok()?;
        Some((user, flag(role)?))
    })
}

/// The users of a decoded GROUP_RECEIPT's `members`. Stops at the first
/// bad byte (a decoded frame has none).
pub fn list_users(users: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let mut at = users;
    std::iter::from_fn(move || next_varint(&mut at)?.ok())
}

/// Appends one GROUP_LIST entry to `out`.
pub fn put_entry(user: u64, admin: bool, out: &mut Vec<u8>) {
    put_varint(user, out);
    out.push(u8::from(admin));
}

/// Bytes [`put_entry`] appends.
pub fn entry_len(user: u64) -> usize {
    varint_len(user) + 1
}

#[cfg(test)]
mod tests {
    use super::super::{decode as decode_frame, encode, encoded_len, ErrorCode, Frame};
    use super::*;

    const DOC: &str = include_str!("../../docs/PROTOCOL.md");
    const T: u64 = 1_767_225_600_123;

    fn enc(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out);
        out
    }

    fn hex(bytes: &[u8]) -> String {
        let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        parts.join(" ")
    }

    fn dec(bytes: &[u8]) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
        decode_frame(bytes, &Limits::default())
    }

    /// Frames a payload (type byte and fields) with its length prefix.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// The examples of docs/PROTOCOL.md "Groups", in type order, with the
    /// list fields they carry.
    fn doc_examples(list: &[u8], members: &[u8]) -> Vec<GroupFrame<Vec<u8>>> {
        vec![
            GroupFrame::Create { req: 1 },
            GroupFrame::Add {
                req: 2,
                group: 1025,
                user: 42,
            },
            GroupFrame::Remove {
                req: 3,
                group: 1025,
                user: 42,
            },
            GroupFrame::Leave {
                req: 4,
                group: 1025,
            },
            GroupFrame::Admin {
                req: 5,
                group: 1025,
                user: 42,
                admin: true,
            },
            GroupFrame::Members {
                req: 6,
                group: 1025,
            },
            GroupFrame::Ok {
                req: 1,
                group: 1025,
            },
            GroupFrame::List {
                req: 6,
                group: 1025,
                left: 0,
                entries: list.to_vec(),
            },
            GroupFrame::Send {
                client_id: 7,
                group: 1025,
                body: b"hello".to_vec(),
            },
            GroupFrame::Deliver {
                server_id: 2049,
                group: 1025,
                msg: 3073,
                from: 17,
                server_time_ms: T,
                client_id: 7,
                body: b"hello".to_vec(),
            },
            GroupFrame::Event {
                server_id: 2049,
                group: 1025,
                msg: 3073,
                actor: 17,
                server_time_ms: T,
                event: GroupEvent::Added,
                subject: 42,
            },
            GroupFrame::Read {
                group: 1025,
                msg: 3073,
                from: 17,
            },
            GroupFrame::Receipt {
                kind: ReceiptKind::Read,
                group: 1025,
                msg: 3073,
                members: members.to_vec(),
            },
        ]
    }

    fn example_lists() -> (Vec<u8>, Vec<u8>) {
        let mut list = Vec::new();
        put_entry(17, true, &mut list);
        put_entry(42, false, &mut list);
        let mut members = Vec::new();
        for u in [42, 43, 300] {
            put_varint(u, &mut members);
        }
        (list, members)
    }

    #[test]
    fn doc_examples_match_protocol_md_and_round_trip() {
        let (list, members) = example_lists();
        let frames = doc_examples(&list, &members);
        assert_eq!(frames.len(), 13);
        for (i, g) in frames.iter().enumerate() {
            let frame = Frame::Group(g.as_ref());
            let bytes = enc(&frame);
            assert_eq!(bytes.len(), encoded_len(&frame));
            assert_eq!(usize::from(bytes[1]), 0x20 + i, "{}", g.name());
            assert!(DOC.contains(&hex(&bytes)), "{}: {}", g.name(), hex(&bytes));
            assert!(DOC.contains(&format!("| {} ", g.name())), "{}", g.name());
            assert_eq!(dec(&bytes), Ok(Some((frame, bytes.len()))));
            let owned = frame.to_owned();
            assert_eq!(owned.as_frame(), frame);
            assert_eq!(enc(&owned.as_frame()), bytes);
        }
        // The refusal example: ERROR(not_admin) for req 2.
        let err = Frame::Error {
            code: ErrorCode::NotAdmin,
            client_id: 2,
            text: "admin",
        };
        assert!(DOC.contains(&hex(&enc(&err))));
        assert_eq!(
            list_entries(&list).collect::<Vec<_>>(),
            [(17, true), (42, false)]
        );
        assert_eq!(list_users(&members).collect::<Vec<_>>(), [42, 43, 300]);
        assert_eq!(entry_len(300), 3);
    }

    #[test]
    fn events_are_numbered_and_named_as_documented() {
        for v in 1..=6 {
            let e = GroupEvent::from_u64(v).unwrap();
            assert_eq!(e as u64, v);
            assert!(
                DOC.contains(&format!("| {v}     | `{}`", e.as_str())),
                "{e:?}"
            );
        }
        assert_eq!(GroupEvent::from_u64(0), None);
        assert_eq!(GroupEvent::from_u64(7), None);
    }

    #[test]
    fn malformed_group_frames() {
        let cases: &[(&[u8], &str)] = &[
            // GROUP_ADMIN with admin 2.
            (&[0x24, 1, 2, 3, 2], "unknown admin flag"),
            // GROUP_EVENT with event 0 and 7.
            (&[0x2a, 1, 2, 3, 4, 5, 0, 6], "unknown group event"),
            (&[0x2a, 1, 2, 3, 4, 5, 7, 6], "unknown group event"),
            // GROUP_RECEIPT: kind 3; no members; a member cut short;
            // a non-minimal member.
            (&[0x2c, 3, 1, 1, 42], "unknown receipt kind"),
            (&[0x2c, 1, 1, 1], "empty member list"),
            (&[0x2c, 1, 1, 1, 42, 0x80], "truncated list"),
            (&[0x2c, 1, 1, 1, 0x80, 0x00], "non-minimal varint"),
            // GROUP_LIST: a user without a role; role 2.
            (&[0x27, 1, 1, 0, 42], "truncated list"),
            (&[0x27, 1, 1, 0, 42, 2], "unknown member role"),
            // Fields missing, and bytes after the last field.
            (&[0x21, 1, 2], "truncated field"),
            (&[0x20], "truncated field"),
            (&[0x23, 1, 2, 3], "trailing bytes"),
            (&[0x2b, 1, 2, 3, 4], "trailing bytes"),
        ];
        for &(payload, want) in cases {
            assert_eq!(
                dec(&framed(payload)),
                Err(DecodeError::Malformed(want)),
                "{payload:02x?}"
            );
        }
        // An empty list is a whole GROUP_LIST (a group being deleted).
        assert!(dec(&framed(&[0x27, 1, 1, 0])).unwrap().is_some());
        // 0x2D on is still unknown.
        for t in [0x2d, 0x2f] {
            assert_eq!(dec(&framed(&[t, 1])), Err(DecodeError::UnknownType(t)));
        }
    }

    #[test]
    fn group_send_body_leaves_room_for_group_deliver() {
        let limits = Limits::default();
        let max = limits.body_bytes_max - GROUP_BODY_ROOM_BYTES;
        let body = vec![7u8; max + 1];
        let send = |body: &[u8]| {
            enc(&Frame::Group(GroupFrame::Send {
                client_id: u64::MAX,
                group: u64::MAX,
                body,
            }))
        };
        assert_eq!(
            decode_frame(&send(&body), &limits),
            Err(DecodeError::BodyTooLarge { len: max + 1 })
        );
        assert!(decode_frame(&send(&body[..max]), &limits)
            .unwrap()
            .is_some());
        // The largest body taken fits in the largest GROUP_DELIVER, as a
        // body_bytes_max body fits in a v2 DELIVER (frame limit - 41).
        let deliver = Frame::Group(GroupFrame::Deliver {
            server_id: u64::MAX,
            group: u64::MAX,
            msg: u64::MAX,
            from: u64::MAX,
            server_time_ms: u64::MAX,
            client_id: u64::MAX,
            body: &body[..max],
        });
        assert_eq!(deliver.payload_len(), max + 41 + GROUP_BODY_ROOM_BYTES);
        let deliver_bytes = enc(&deliver);
        assert!(decode_frame(&deliver_bytes, &limits).unwrap().is_some());
    }

    #[test]
    fn largest_fields_encode_and_decode() {
        let (list, members) = example_lists();
        for g in doc_examples(&list, &members) {
            // Every integer at its widest.
            let wide = match g.as_ref() {
                GroupFrame::Event { event, .. } => GroupFrame::Event {
                    server_id: u64::MAX,
                    group: u64::MAX,
                    msg: u64::MAX,
                    actor: u64::MAX,
                    server_time_ms: u64::MAX,
                    event,
                    subject: u64::MAX,
                },
                other => other,
            };
            let frame = Frame::Group(wide);
            let bytes = enc(&frame);
            assert_eq!(dec(&bytes), Ok(Some((frame, bytes.len()))));
            // Any strict prefix is incomplete, never an error.
            for cut in 0..bytes.len() {
                assert_eq!(dec(&bytes[..cut]), Ok(None));
            }
        }
    }
}
