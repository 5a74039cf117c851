// Kept whole past 800 lines: frame table, decoder, encoder and tests mirror each other per variant.
//! Protocol v1 codec: bytes in, frames out. No I/O, no state, no allocation
//! on the decode path.
//!
//! Every frame is a LEB128 length prefix `L` followed by `L` bytes: one type
//! byte, then the fields. Integer fields are minimal LEB128 varints (`u64`);
//! the last bytes field of a frame (body, token or text) takes the rest of the
//! frame and carries no length of its own. `docs/PROTOCOL.md` is the full
//! wire reference, with byte layouts and hex examples.
//!
//! [`decode`] keeps "need more bytes" (`Ok(None)`) apart from "these bytes are
//! bad" (`Err`), checks the length prefix against [`Limits`] before it looks
//! at anything else, and borrows the variable-length fields from the input, so
//! it can be fed arbitrary bytes (fuzzed) and never holds half-decoded state.
//!
//! ```
//! use tern::proto::{decode, encode, Frame, Limits};
//!
//! let mut wire = Vec::new();
//! encode(&Frame::Send { client_id: 7, to: 42, body: b"hello" }, &mut wire);
//! assert_eq!(wire, [0x08, 0x04, 0x07, 0x2a, b'h', b'e', b'l', b'l', b'o']);
//!
//! let limits = Limits::default();
//! // A strict prefix is incomplete, not an error: keep the bytes, read more.
//! assert_eq!(decode(&wire[..4], &limits), Ok(None));
//! let (frame, consumed) = decode(&wire, &limits).unwrap().unwrap();
//! assert_eq!(frame, Frame::Send { client_id: 7, to: 42, body: b"hello" });
//! assert_eq!(consumed, wire.len());
//! ```

use std::fmt;

pub mod group;

pub use group::{GroupEvent, GroupFrame};

/// Protocol version a client puts in LOGIN. The codec decodes any version
/// byte; rejecting other versions (`bad_version`) is the session's job.
pub const VERSION: u8 = 1;
/// Protocol version 2 (docs/PROTOCOL.md, "Version 2"): SEND is idempotent
/// per (sender, client_id), DELIVER carries the sender's client_id (type
/// `0x0E`), `stale_client_id` refuses a client_id below the window.
pub const VERSION_2: u8 = 2;
/// The highest version the server speaks; it speaks every one from 1 up.
pub const VERSION_MAX: u8 = VERSION_2;

/// Most bytes a LEB128 varint may take: `ceil(64 / 7)`. This bounds both the
/// frame length prefix and every integer field.
pub const LEN_PREFIX_BYTES_MAX: usize = 10;

// Type bytes; values are part of the wire format (docs/PROTOCOL.md).
const TYPE_LOGIN: u8 = 0x01;
const TYPE_LOGIN_OK: u8 = 0x02;
const TYPE_LOGIN_ERR: u8 = 0x03;
const TYPE_SEND: u8 = 0x04;
const TYPE_ACK: u8 = 0x05;
const TYPE_DELIVER: u8 = 0x06;
const TYPE_DELIVERED: u8 = 0x07;
const TYPE_READ: u8 = 0x08;
const TYPE_RECEIPT: u8 = 0x09;
const TYPE_PING: u8 = 0x0A;
const TYPE_PONG: u8 = 0x0B;
const TYPE_ERROR: u8 = 0x0C;
const TYPE_BYE: u8 = 0x0D;
const TYPE_DELIVER_V2: u8 = 0x0E;
const TYPE_REDIRECT: u8 = 0x0F;
// 0x10..=0x17 are device frames; presence uses 0x18..=0x1F; groups
// 0x20..=0x2F (`group.rs`).
const TYPE_DEVICE_REMOVE: u8 = 0x10;
const TYPE_DEVICE_REMOVED: u8 = 0x11;
const TYPE_SUBSCRIBE: u8 = 0x18;
const TYPE_UNSUBSCRIBE: u8 = 0x19;
const TYPE_PRESENCE: u8 = 0x1A;
const TYPE_PRIVACY: u8 = 0x1B;
const TYPE_TYPING: u8 = 0x1C;
const TYPE_SENT: u8 = 0x12;

/// Size limits the decoder enforces. Built from `Config`, which checks at
/// start-up that a largest body plus its fields fits in a largest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, in bytes, length prefix excluded (the value of
    /// the prefix, `L`). Default 65536.
    pub frame_bytes_max: usize,
    /// Largest SEND or DELIVER body accepted, in bytes. Default 65000.
    pub body_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: 65536,
            body_bytes_max: 65000,
        }
    }
}

/// Error codes carried by LOGIN_ERR and ERROR. The numbers are part of the
/// wire format and never change; new codes only get new numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// 1: a frame broke the wire format (bad varint, trailing bytes, ...).
    Malformed = 1,
    /// 2: a frame had a type byte this version does not know.
    UnknownType = 2,
    /// 3: a frame exceeded `frame_bytes_max` or a body `body_bytes_max`.
    TooLarge = 3,
    /// 4: a frame other than LOGIN arrived before LOGIN_OK.
    NotLoggedIn = 4,
    /// 5: the recipient's queue is full; the SEND was not accepted.
    QueueFull = 5,
    /// 6: LOGIN carried a protocol version the server does not speak.
    BadVersion = 6,
    /// 7: the login token is malformed or its MAC does not verify.
    BadToken = 7,
    /// 8: the login token verified but its expiry has passed.
    TokenExpired = 8,
    /// 9: the client is sending faster than allowed.
    RateLimited = 9,
    /// 10: the server failed; not the client's fault.
    Internal = 10,
    /// 11: a second LOGIN arrived on a logged-in connection.
    AlreadyLoggedIn = 11,
    /// 12: the SEND names a user id that cannot receive messages.
    BadRecipient = 12,
    /// 13: the server holds as many sessions as it may.
    ServerFull = 13,
    /// 14: the frame is valid but not allowed in the connection's current
    /// state or direction.
    BadState = 14,
    /// The server's message store is out of its disk budget; retry later.
    StorageFull = 15,
    /// 16: the shard that serves this user (the recipient of a SEND, or the
    /// user logging in) is restarting or down; retry later.
    Unavailable = 16,
    /// 17: a READ or DELIVERED names a message that was not delivered to
    /// this connection (in this login); nothing is done with it.
    UnknownMessage = 17,
    /// 18 (protocol v2): the SEND's client_id is 32 or more below the
    /// highest one the server took from this sender device (for this
    /// recipient): it cannot tell whether it took that SEND. Not taken now.
    StaleClientId = 18,
    /// 19 (cluster): the user (LOGIN, to a version 1 client) or the
    /// recipient (SEND) is served by another node; the text names it.
    OtherNode = 19,
    /// 20 (LOGIN_ERR): the user already has `devices_per_user_max` other
    /// devices online; this device is not logged in. A LOGIN of a device
    /// that is online replaces its session instead.
    TooManyDevices = 20,
    /// 21 (protocol v2): a DEVICE_REMOVE names a device of the user that
    /// is not online. The ERROR's `client_id` field carries that device id.
    UnknownDevice = 21,
    /// 25 (protocol v2): a SUBSCRIBE over `presence_subs_max`; not taken.
    /// The ERROR's `client_id` field carries the refused user id.
    PresenceSubsFull = 25,
    /// 30: an operator banned this user (`ban user` on the stats socket);
    /// the login is refused even with a valid token, until unbanned or the
    /// ban's time is up.
    Banned = 30,
    /// 40 (protocol v2, groups): the group named does not exist (never created, or its last member left).
    UnknownGroup = 40,
    /// 41 (protocol v2, groups): the caller is not a member of the group.
    NotMember = 41,
    /// 42 (protocol v2, groups): a change only an admin of the group may make.
    NotAdmin = 42,
    /// 43 (protocol v2, groups): a GROUP_ADD past `group_members_max` members.
    GroupFull = 43,
    /// 44 (protocol v2, groups): the user would be in more than `groups_per_user_max` groups homed on one shard.
    TooManyGroups = 44,
    /// 45 (protocol v2, groups): GROUP_REMOVE or GROUP_ADMIN names a user who is not a member.
    NoSuchMember = 45,
    /// 46 (protocol v2, groups): the group's last admin may not leave (others remain) or step down.
    LastAdmin = 46,
}

impl ErrorCode {
    /// The code for wire number `v`, or `None` if `v` names no code.
    pub fn from_u64(v: u64) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnknownType,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::NotLoggedIn,
            5 => ErrorCode::QueueFull,
            6 => ErrorCode::BadVersion,
            7 => ErrorCode::BadToken,
            8 => ErrorCode::TokenExpired,
            9 => ErrorCode::RateLimited,
            10 => ErrorCode::Internal,
            11 => ErrorCode::AlreadyLoggedIn,
            12 => ErrorCode::BadRecipient,
            13 => ErrorCode::ServerFull,
            14 => ErrorCode::BadState,
            15 => ErrorCode::StorageFull,
            16 => ErrorCode::Unavailable,
            17 => ErrorCode::UnknownMessage,
            18 => ErrorCode::StaleClientId,
            19 => ErrorCode::OtherNode,
            25 => ErrorCode::PresenceSubsFull,
            20 => ErrorCode::TooManyDevices,
            21 => ErrorCode::UnknownDevice,
            30 => ErrorCode::Banned,
            40 => ErrorCode::UnknownGroup,
            41 => ErrorCode::NotMember,
            42 => ErrorCode::NotAdmin,
            43 => ErrorCode::GroupFull,
            44 => ErrorCode::TooManyGroups,
            45 => ErrorCode::NoSuchMember,
            46 => ErrorCode::LastAdmin,
            _ => return None,
        })
    }

    /// The snake_case name, e.g. `"queue_full"`; stable, used in logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::AlreadyLoggedIn => "already_logged_in",
            ErrorCode::BadRecipient => "bad_recipient",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::BadState => "bad_state",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::StaleClientId => "stale_client_id",
            ErrorCode::OtherNode => "other_node",
            ErrorCode::PresenceSubsFull => "presence_subs_full",
            ErrorCode::TooManyDevices => "too_many_devices",
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::Banned => "banned",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotAdmin => "not_admin",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::TooManyGroups => "too_many_groups",
            ErrorCode::NoSuchMember => "no_such_member",
            ErrorCode::LastAdmin => "last_admin",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a RECEIPT reports. The numbers are part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReceiptKind {
    /// 1: the recipient's device acknowledged the DELIVER (DELIVERED).
    Delivered = 1,
    /// 2: the recipient marked the message read (READ).
    Read = 2,
}

impl ReceiptKind {
    /// The kind for wire number `v`, or `None` if `v` names no kind.
    pub fn from_u64(v: u64) -> Option<ReceiptKind> {
        match v {
            1 => Some(ReceiptKind::Delivered),
            2 => Some(ReceiptKind::Read),
            _ => None,
        }
    }

    /// The snake_case name: `"delivered"` or `"read"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptKind::Delivered => "delivered",
            ReceiptKind::Read => "read",
        }
    }
}

impl fmt::Display for ReceiptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A watched user's state in a PRESENCE frame. The numbers are part of the
/// wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PresenceState {
    /// 1: the user has a session now.
    Online = 1,
    /// 2: the user has no session; `last_seen_ms` says since when (0:
    /// never seen by this server).
    Offline = 2,
    /// 3: the user hides its presence (PRIVACY); `last_seen_ms` is 0.
    Hidden = 3,
}

impl PresenceState {
    /// The state for wire number `v`, or `None` if `v` names no state.
    pub fn from_u64(v: u64) -> Option<PresenceState> {
        match v {
            1 => Some(PresenceState::Online),
            2 => Some(PresenceState::Offline),
            3 => Some(PresenceState::Hidden),
            _ => None,
        }
    }

    /// The snake_case name: `"online"`, `"offline"` or `"hidden"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Offline => "offline",
            PresenceState::Hidden => "hidden",
        }
    }
}

impl fmt::Display for PresenceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the server ends a connection with BYE. The numbers are part of the
/// wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ByeReason {
    /// 1: the server is shutting down; reconnect later.
    Shutdown = 1,
    /// 2: the same user logged in on a newer connection.
    Replaced = 2,
    /// 3: the client read too slowly; its unsent output passed the limit.
    Slow = 3,
    /// 4: the connection sent nothing for the idle timeout.
    Idle = 4,
    /// 5: the connection is closed because of a protocol error.
    Error = 5,
    /// 6: the connection kept sending past its rate limits
    /// (`rate_refusals_max` refusals within `rate_refusals_window_ms`).
    RateLimited = 6,
    /// 7 (cluster): this node no longer serves the user (its partition
    /// moved to another node); log in again, through any node.
    Moved = 7,
    /// 8: this device was removed from its user (DEVICE_REMOVE from another
    /// of its devices, or `device remove` by an operator).
    DeviceRemoved = 8,
    /// 10: an operator closed this connection (`kick user`, or `ban user`
    /// while it was online); nothing queued for the user is lost.
    Kicked = 10,
    /// 11: the server is draining (taken out of service): connect to
    /// another server, or to this one later.
    Moving = 11,
    /// 13: the server hands its listeners and store to a new binary (live
    /// upgrade, `tern upgrade`); reconnect at once, the same address serves.
    Upgrade = 13,
}

impl ByeReason {
    /// The reason for wire number `v`, or `None` if `v` names no reason.
    pub fn from_u64(v: u64) -> Option<ByeReason> {
        match v {
            1 => Some(ByeReason::Shutdown),
            2 => Some(ByeReason::Replaced),
            3 => Some(ByeReason::Slow),
            4 => Some(ByeReason::Idle),
            5 => Some(ByeReason::Error),
            6 => Some(ByeReason::RateLimited),
            7 => Some(ByeReason::Moved),
            8 => Some(ByeReason::DeviceRemoved),
            10 => Some(ByeReason::Kicked),
            11 => Some(ByeReason::Moving),
            13 => Some(ByeReason::Upgrade),
            _ => None,
        }
    }

    /// The snake_case name, e.g. `"shutdown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ByeReason::Shutdown => "shutdown",
            ByeReason::Replaced => "replaced",
            ByeReason::Slow => "slow",
            ByeReason::Idle => "idle",
            ByeReason::Error => "error",
            ByeReason::RateLimited => "rate_limited",
            ByeReason::Moved => "moved",
            ByeReason::DeviceRemoved => "device_removed",
            ByeReason::Kicked => "kicked",
            ByeReason::Moving => "moving",
            ByeReason::Upgrade => "upgrade",
        }
    }
}

impl fmt::Display for ByeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decoded frame. Byte and text fields borrow from the decode buffer, so
/// decoding never allocates; use [`Frame::to_owned`] to keep a frame past
/// the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// 0x01, client to server, must be the first frame of a connection.
    Login {
        /// Protocol version, one raw byte; [`VERSION`] today.
        version: u8,
        /// Login token (rest of the frame), see docs/PROTOCOL.md.
        token: &'a [u8],
    },
    /// 0x02, server to client: the login succeeded.
    LoginOk {
        /// Server wall clock, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// Messages waiting for this user, delivered next as DELIVER frames.
        offline_count: u64,
    },
    /// 0x03, server to client: the login failed; the server closes.
    LoginErr {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail (rest of the frame), may be empty.
        text: &'a str,
    },
    /// 0x04, client to server: a message for another user.
    Send {
        /// Client-chosen message id, echoed in ACK and ERROR.
        client_id: u64,
        /// Recipient user id.
        to: u64,
        /// Message body (rest of the frame), at most `body_bytes_max`.
        body: &'a [u8],
    },
    /// 0x05, server to client: the server took responsibility for a SEND.
    Ack {
        /// The SEND's `client_id`.
        client_id: u64,
        /// Server-assigned message id, unique per recipient.
        server_id: u64,
        /// When the server accepted it, milliseconds since the Unix epoch.
        server_time_ms: u64,
    },
    /// 0x06, server to client: a message for this user. With `client_id`
    /// (protocol v2) it is type 0x0E, the client_id after the time.
    Deliver {
        /// Server-assigned message id; duplicates carry the same id.
        server_id: u64,
        /// Sender user id.
        from: u64,
        /// When the server accepted it, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// Protocol v2 only: the sender's client_id (0 when the sender
        /// spoke v1). `None`: a v1 DELIVER (type 0x06).
        client_id: Option<u64>,
        /// Message body (rest of the frame), at most `body_bytes_max`.
        body: &'a [u8],
    },
    /// 0x07, client to server: the device stored the DELIVERed message.
    Delivered {
        /// The DELIVER's `server_id`.
        server_id: u64,
    },
    /// 0x08, client to server: the user read a message.
    Read {
        /// The DELIVER's `server_id`.
        server_id: u64,
        /// The original sender's user id (the DELIVER's `from`).
        from: u64,
    },
    /// 0x09, server to client: a message this user sent was delivered or read.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The message's `server_id` (as in the sender's ACK).
        server_id: u64,
        /// The user who received or read it.
        peer: u64,
    },
    /// 0x0A, either direction: keepalive; the peer answers PONG.
    Ping {
        /// Opaque value echoed in the PONG.
        nonce: u64,
    },
    /// 0x0B, either direction: answer to PING.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
    /// 0x0C, server to client: a request failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// The `client_id` of the SEND it refers to; 0 = none.
        client_id: u64,
        /// Human-readable detail (rest of the frame), may be empty.
        text: &'a str,
    },
    /// 0x0D, server to client: the server is closing the connection.
    Bye {
        /// Why.
        reason: ByeReason,
    },
    /// 0x0F, server to client, protocol v2, instead of LOGIN_OK: another
    /// node serves this user; log in there. The server closes.
    Redirect {
        /// The node's client address, `host:port` (rest of the frame).
        addr: &'a str,
    },
    /// 0x18, client to server, protocol v2: watch `user`'s presence; the
    /// server answers with its current PRESENCE, then one per change.
    Subscribe {
        /// The watched user.
        user: u64,
    },
    /// 0x19, client to server, protocol v2: stop watching `user`.
    Unsubscribe {
        /// The watched user.
        user: u64,
    },
    /// 0x1A, server to client, protocol v2: a watched user's presence.
    Presence {
        /// The watched user.
        user: u64,
        /// Online, offline or hidden.
        state: PresenceState,
        /// Offline: when the user was last online, ms since the Unix epoch
        /// (0: never seen). Online and hidden: 0.
        last_seen_ms: u64,
    },
    /// 0x1B, client to server, protocol v2: hide (or show again) this
    /// user's presence and last seen from its subscribers. Kept durably.
    Privacy {
        /// `true`: subscribers see `hidden`.
        hidden: bool,
    },
    /// 0x1C, protocol v2, both directions: client to server, "I am typing
    /// to `user`"; server to client, "`user` is typing to you". Never stored.
    Typing {
        /// Client to server: the peer; server to client: the typist.
        user: u64,
    },
    /// 0x10, client to server, protocol v2: remove device `device` of
    /// this user; its session (if online) is closed with
    /// BYE(`device_removed`).
    DeviceRemove {
        /// The device id its token names.
        device: u64,
    },
    /// 0x11, server to client, protocol v2: device `device` of this user
    /// was removed.
    DeviceRemoved {
        /// The removed device's id.
        device: u64,
    },
    /// 0x12, server to client, protocol v2: a copy of a message another
    /// device of the same user sent and the server took (sent with its
    /// ACK), so every device shows the whole conversation.
    Sent {
        /// Server id of the stored message (as in its ACK).
        server_id: u64,
        /// Its recipient.
        to: u64,
        /// When the server took it, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// The sending device's id for it.
        client_id: u64,
        /// Message body (rest of the frame).
        body: &'a [u8],
    },
    /// 0x20..=0x2C, protocol v2: a group frame (docs/PROTOCOL.md, "Groups").
    Group(GroupFrame<&'a [u8]>),
}

impl Frame<'_> {
    /// Copies the borrowed fields into an [`OwnedFrame`].
    // Inherent methods win method resolution, so `frame.to_owned()` calls
    // this rather than the blanket `ToOwned::to_owned` (which, `Frame` being
    // `Clone`, would only return another borrowed `Frame`).
    pub fn to_owned(&self) -> OwnedFrame {
        match *self {
            Frame::Login { version, token } => OwnedFrame::Login {
                version,
                token: token.to_vec(),
            },
            Frame::LoginOk {
                server_time_ms,
                offline_count,
            } => OwnedFrame::LoginOk {
                server_time_ms,
                offline_count,
            },
            Frame::LoginErr { code, text } => OwnedFrame::LoginErr {
                code,
                text: text.to_string(),
            },
            Frame::Send {
                client_id,
                to,
                body,
            } => OwnedFrame::Send {
                client_id,
                to,
                body: body.to_vec(),
            },
            Frame::Ack {
                client_id,
                server_id,
                server_time_ms,
            } => OwnedFrame::Ack {
                client_id,
                server_id,
                server_time_ms,
            },
            Frame::Deliver {
                server_id,
                from,
                server_time_ms,
                client_id,
                body,
            } => OwnedFrame::Deliver {
                server_id,
                from,
                server_time_ms,
                client_id,
                body: body.to_vec(),
            },
            Frame::Delivered { server_id } => OwnedFrame::Delivered { server_id },
            Frame::Read { server_id, from } => OwnedFrame::Read { server_id, from },
            Frame::Receipt {
                kind,
                server_id,
                peer,
            } => OwnedFrame::Receipt {
                kind,
                server_id,
                peer,
            },
            Frame::Ping { nonce } => OwnedFrame::Ping { nonce },
            Frame::Pong { nonce } => OwnedFrame::Pong { nonce },
            Frame::Error {
                code,
                client_id,
                text,
            } => OwnedFrame::Error {
                code,
                client_id,
                text: text.to_string(),
            },
            Frame::Bye { reason } => OwnedFrame::Bye { reason },
            Frame::Redirect { addr } => OwnedFrame::Redirect {
                addr: addr.to_string(),
            },
            Frame::Subscribe { user } => OwnedFrame::Subscribe { user },
            Frame::Unsubscribe { user } => OwnedFrame::Unsubscribe { user },
            Frame::Presence {
                user,
                state,
                last_seen_ms,
            } => OwnedFrame::Presence {
                user,
                state,
                last_seen_ms,
            },
            Frame::Privacy { hidden } => OwnedFrame::Privacy { hidden },
            Frame::Typing { user } => OwnedFrame::Typing { user },
            Frame::DeviceRemove { device } => OwnedFrame::DeviceRemove { device },
            Frame::DeviceRemoved { device } => OwnedFrame::DeviceRemoved { device },
            Frame::Sent {
                server_id,
                to,
                server_time_ms,
                client_id,
                body,
            } => OwnedFrame::Sent {
                server_id,
                to,
                server_time_ms,
                client_id,
                body: body.to_vec(),
            },
            Frame::Group(ref g) => OwnedFrame::Group(g.to_vec()),
        }
    }

    /// The frame type's wire name, e.g. `"SEND"`, `"LOGIN_OK"`.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Login { .. } => "LOGIN",
            Frame::LoginOk { .. } => "LOGIN_OK",
            Frame::LoginErr { .. } => "LOGIN_ERR",
            Frame::Send { .. } => "SEND",
            Frame::Ack { .. } => "ACK",
            Frame::Deliver { .. } => "DELIVER",
            Frame::Delivered { .. } => "DELIVERED",
            Frame::Read { .. } => "READ",
            Frame::Receipt { .. } => "RECEIPT",
            Frame::Ping { .. } => "PING",
            Frame::Pong { .. } => "PONG",
            Frame::Error { .. } => "ERROR",
            Frame::Bye { .. } => "BYE",
            Frame::Redirect { .. } => "REDIRECT",
            Frame::Subscribe { .. } => "SUBSCRIBE",
            Frame::Unsubscribe { .. } => "UNSUBSCRIBE",
            Frame::Presence { .. } => "PRESENCE",
            Frame::Privacy { .. } => "PRIVACY",
            Frame::Typing { .. } => "TYPING",
            Frame::Sent { .. } => "SENT",
            Frame::DeviceRemove { .. } => "DEVICE_REMOVE",
            Frame::DeviceRemoved { .. } => "DEVICE_REMOVED",
            Frame::Group(g) => g.name(),
        }
    }

    /// The type byte that starts the frame's payload.
    pub fn type_byte(&self) -> u8 {
        match self {
            Frame::Login { .. } => TYPE_LOGIN,
            Frame::LoginOk { .. } => TYPE_LOGIN_OK,
            Frame::LoginErr { .. } => TYPE_LOGIN_ERR,
            Frame::Send { .. } => TYPE_SEND,
            Frame::Ack { .. } => TYPE_ACK,
            Frame::Deliver {
                client_id: None, ..
            } => TYPE_DELIVER,
            Frame::Deliver {
                client_id: Some(_), ..
            } => TYPE_DELIVER_V2,
            Frame::Delivered { .. } => TYPE_DELIVERED,
            Frame::Read { .. } => TYPE_READ,
            Frame::Receipt { .. } => TYPE_RECEIPT,
            Frame::Ping { .. } => TYPE_PING,
            Frame::Pong { .. } => TYPE_PONG,
            Frame::Error { .. } => TYPE_ERROR,
            Frame::Bye { .. } => TYPE_BYE,
            Frame::Redirect { .. } => TYPE_REDIRECT,
            Frame::Subscribe { .. } => TYPE_SUBSCRIBE,
            Frame::Unsubscribe { .. } => TYPE_UNSUBSCRIBE,
            Frame::Presence { .. } => TYPE_PRESENCE,
            Frame::Privacy { .. } => TYPE_PRIVACY,
            Frame::Typing { .. } => TYPE_TYPING,
            Frame::Sent { .. } => TYPE_SENT,
            Frame::DeviceRemove { .. } => TYPE_DEVICE_REMOVE,
            Frame::DeviceRemoved { .. } => TYPE_DEVICE_REMOVED,
            Frame::Group(g) => g.type_byte(),
        }
    }

    /// `L`: type byte plus fields, the value of the length prefix.
    pub fn payload_len(&self) -> usize {
        let fields = match *self {
            Frame::Login { token, .. } => 1 + token.len(),
            Frame::LoginOk {
                server_time_ms,
                offline_count,
            } => varint_len(server_time_ms) + varint_len(offline_count),
            Frame::LoginErr { code, text } => varint_len(code as u64) + text.len(),
            Frame::Send {
                client_id,
                to,
                body,
            } => varint_len(client_id) + varint_len(to) + body.len(),
            Frame::Ack {
                client_id,
                server_id,
                server_time_ms,
            } => varint_len(client_id) + varint_len(server_id) + varint_len(server_time_ms),
            Frame::Deliver {
                server_id,
                from,
                server_time_ms,
                client_id,
                body,
            } => {
                varint_len(server_id)
                    + varint_len(from)
                    + varint_len(server_time_ms)
                    + client_id.map_or(0, varint_len)
                    + body.len()
            }
            Frame::Delivered { server_id } => varint_len(server_id),
            Frame::Read { server_id, from } => varint_len(server_id) + varint_len(from),
            Frame::Receipt {
                kind,
                server_id,
                peer,
            } => varint_len(kind as u64) + varint_len(server_id) + varint_len(peer),
            Frame::Ping { nonce } | Frame::Pong { nonce } => varint_len(nonce),
            Frame::Error {
                code,
                client_id,
                text,
            } => varint_len(code as u64) + varint_len(client_id) + text.len(),
            Frame::Bye { reason } => varint_len(reason as u64),
            Frame::Redirect { addr } => addr.len(),
            Frame::Subscribe { user } | Frame::Unsubscribe { user } | Frame::Typing { user } => {
                varint_len(user)
            }
            Frame::Presence {
                user,
                state,
                last_seen_ms,
            } => varint_len(user) + varint_len(state as u64) + varint_len(last_seen_ms),
            Frame::Privacy { .. } => 1,
            Frame::DeviceRemove { device } | Frame::DeviceRemoved { device } => varint_len(device),
            Frame::Sent {
                server_id,
                to,
                server_time_ms,
                client_id,
                body,
            } => {
                varint_len(server_id)
                    + varint_len(to)
                    + varint_len(server_time_ms)
                    + varint_len(client_id)
                    + body.len()
            }
            Frame::Group(ref g) => g.fields_len(),
        };
        1 + fields
    }
}

/// A [`Frame`] that owns its byte and text fields, for keeping past the
/// decode buffer (queues, tests, the client library).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedFrame {
    /// See [`Frame::Login`].
    Login {
        /// Protocol version.
        version: u8,
        /// Login token.
        token: Vec<u8>,
    },
    /// See [`Frame::LoginOk`].
    LoginOk {
        /// Server wall clock, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// Messages waiting for this user.
        offline_count: u64,
    },
    /// See [`Frame::LoginErr`].
    LoginErr {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        text: String,
    },
    /// See [`Frame::Send`].
    Send {
        /// Client-chosen message id.
        client_id: u64,
        /// Recipient user id.
        to: u64,
        /// Message body.
        body: Vec<u8>,
    },
    /// See [`Frame::Ack`].
    Ack {
        /// The SEND's `client_id`.
        client_id: u64,
        /// Server-assigned message id.
        server_id: u64,
        /// Acceptance time, milliseconds since the Unix epoch.
        server_time_ms: u64,
    },
    /// See [`Frame::Deliver`].
    Deliver {
        /// Server-assigned message id.
        server_id: u64,
        /// Sender user id.
        from: u64,
        /// Acceptance time, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// The sender's client_id (protocol v2 DELIVER, type 0x0E).
        client_id: Option<u64>,
        /// Message body.
        body: Vec<u8>,
    },
    /// See [`Frame::Delivered`].
    Delivered {
        /// The DELIVER's `server_id`.
        server_id: u64,
    },
    /// See [`Frame::Read`].
    Read {
        /// The DELIVER's `server_id`.
        server_id: u64,
        /// The original sender's user id.
        from: u64,
    },
    /// See [`Frame::Receipt`].
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The message's `server_id`.
        server_id: u64,
        /// The user who received or read it.
        peer: u64,
    },
    /// See [`Frame::Ping`].
    Ping {
        /// Opaque value echoed in the PONG.
        nonce: u64,
    },
    /// See [`Frame::Pong`].
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
    /// See [`Frame::Error`].
    Error {
        /// Why.
        code: ErrorCode,
        /// The SEND's `client_id`; 0 = none.
        client_id: u64,
        /// Human-readable detail.
        text: String,
    },
    /// See [`Frame::Bye`].
    Bye {
        /// Why.
        reason: ByeReason,
    },
    /// See [`Frame::Redirect`].
    Redirect {
        /// The node's client address, `host:port`.
        addr: String,
    },
    /// See [`Frame::Subscribe`].
    Subscribe {
        /// The watched user.
        user: u64,
    },
    /// See [`Frame::Unsubscribe`].
    Unsubscribe {
        /// The watched user.
        user: u64,
    },
    /// See [`Frame::Presence`].
    Presence {
        /// The watched user.
        user: u64,
        /// Online, offline or hidden.
        state: PresenceState,
        /// Offline: last online, ms since the Unix epoch (0: never); else 0.
        last_seen_ms: u64,
    },
    /// See [`Frame::Privacy`].
    Privacy {
        /// `true`: subscribers see `hidden`.
        hidden: bool,
    },
    /// See [`Frame::Typing`].
    Typing {
        /// The peer (client to server) or the typist (server to client).
        user: u64,
    },
    /// See [`Frame::DeviceRemove`].
    DeviceRemove {
        /// The device to remove.
        device: u64,
    },
    /// See [`Frame::DeviceRemoved`].
    DeviceRemoved {
        /// The removed device.
        device: u64,
    },
    /// See [`Frame::Sent`].
    Sent {
        /// Server id of the stored message.
        server_id: u64,
        /// Its recipient.
        to: u64,
        /// When the server took it, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// The sending device's id for it.
        client_id: u64,
        /// Message body.
        body: Vec<u8>,
    },
    /// See [`Frame::Group`].
    Group(GroupFrame<Vec<u8>>),
}

impl OwnedFrame {
    /// Borrows this frame as a [`Frame`], e.g. to [`encode`] it.
    pub fn as_frame(&self) -> Frame<'_> {
        match *self {
            OwnedFrame::Login { version, ref token } => Frame::Login { version, token },
            OwnedFrame::LoginOk {
                server_time_ms,
                offline_count,
            } => Frame::LoginOk {
                server_time_ms,
                offline_count,
            },
            OwnedFrame::LoginErr { code, ref text } => Frame::LoginErr { code, text },
            OwnedFrame::Send {
                client_id,
                to,
                ref body,
            } => Frame::Send {
                client_id,
                to,
                body,
            },
            OwnedFrame::Ack {
                client_id,
                server_id,
                server_time_ms,
            } => Frame::Ack {
                client_id,
                server_id,
                server_time_ms,
            },
            OwnedFrame::Deliver {
                server_id,
                from,
                server_time_ms,
                client_id,
                ref body,
            } => Frame::Deliver {
                server_id,
                from,
                server_time_ms,
                client_id,
                body,
            },
            OwnedFrame::Delivered { server_id } => Frame::Delivered { server_id },
            OwnedFrame::Read { server_id, from } => Frame::Read { server_id, from },
            OwnedFrame::Receipt {
                kind,
                server_id,
                peer,
            } => Frame::Receipt {
                kind,
                server_id,
                peer,
            },
            OwnedFrame::Ping { nonce } => Frame::Ping { nonce },
            OwnedFrame::Pong { nonce } => Frame::Pong { nonce },
            OwnedFrame::Error {
                code,
                client_id,
                ref text,
            } => Frame::Error {
                code,
                client_id,
                text,
            },
            OwnedFrame::Bye { reason } => Frame::Bye { reason },
            OwnedFrame::Redirect { ref addr } => Frame::Redirect { addr },
            OwnedFrame::Subscribe { user } => Frame::Subscribe { user },
            OwnedFrame::Unsubscribe { user } => Frame::Unsubscribe { user },
            OwnedFrame::Presence {
                user,
                state,
                last_seen_ms,
            } => Frame::Presence {
                user,
                state,
                last_seen_ms,
            },
            OwnedFrame::Privacy { hidden } => Frame::Privacy { hidden },
            OwnedFrame::Typing { user } => Frame::Typing { user },
            OwnedFrame::DeviceRemove { device } => Frame::DeviceRemove { device },
            OwnedFrame::DeviceRemoved { device } => Frame::DeviceRemoved { device },
            OwnedFrame::Sent {
                server_id,
                to,
                server_time_ms,
                client_id,
                ref body,
            } => Frame::Sent {
                server_id,
                to,
                server_time_ms,
                client_id,
                body,
            },
            OwnedFrame::Group(ref g) => Frame::Group(g.as_ref()),
        }
    }
}

/// Why bytes could not be decoded. Every variant is fatal for the
/// connection: the stream position after a bad frame cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix exceeds `frame_bytes_max`. Reported as soon as the
    /// prefix bytes seen so far force that, before the frame's bytes arrive.
    TooLarge {
        /// The declared frame length; if the prefix was still incomplete, the
        /// smallest length its minimal completion could declare.
        len: u64,
    },
    /// A SEND or DELIVER body exceeds `body_bytes_max`.
    BodyTooLarge {
        /// The body's length in bytes.
        len: usize,
    },
    /// The type byte names no frame type of this version.
    UnknownType(u8),
    /// The frame breaks the wire format; the reason is a static phrase such
    /// as `"non-minimal varint"`, `"trailing bytes"` or `"invalid utf-8"`.
    Malformed(&'static str),
}

impl DecodeError {
    /// The [`ErrorCode`] to report to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } | DecodeError::BodyTooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len } => {
                write!(f, "frame of {len} bytes exceeds frame_bytes_max")
            }
            DecodeError::BodyTooLarge { len } => {
                write!(f, "message body of {len} bytes exceeds body_bytes_max")
            }
            DecodeError::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            DecodeError::Malformed(reason) => write!(f, "malformed frame: {reason}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes the first frame in `buf`.
///
/// - `Ok(None)`: `buf` holds only part of a frame (possibly part of the
///   length prefix). Nothing is consumed; keep the bytes and call again with
///   more appended.
/// - `Ok(Some((frame, consumed)))`: `consumed` = prefix bytes + `L`; the
///   bytes after that are the next frame and are not looked at.
/// - `Err(_)`: the stream is bad; report [`DecodeError::code`] and close.
///
/// The length prefix is checked against `limits.frame_bytes_max` byte by byte,
/// before anything else: a prefix that cannot end at or below the limit is
/// [`DecodeError::TooLarge`] at once, without waiting for the frame's bytes.
/// Never panics and never allocates, whatever the input.
pub fn decode<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Frame<'a>, usize)>, DecodeError> {
    let frame_bytes_max = u64::try_from(limits.frame_bytes_max).unwrap_or(u64::MAX);
    let (len, prefix_len) = match read_varint(buf, frame_bytes_max) {
        Varint::Done { value, len } => (value, len),
        Varint::Incomplete => return Ok(None),
        Varint::TooLarge { value_min } => return Err(DecodeError::TooLarge { len: value_min }),
        Varint::Malformed(reason) => return Err(DecodeError::Malformed(reason)),
    };
    if len == 0 {
        return Err(DecodeError::Malformed("empty frame"));
    }
    // Lossless: read_varint checked len <= frame_bytes_max, a usize.
    let len = len as usize;
    let after_prefix = &buf[prefix_len..];
    if after_prefix.len() < len {
        return Ok(None);
    }
    let frame = decode_payload(&after_prefix[..len], limits)?;
    debug_assert_eq!(encoded_len(&frame), prefix_len + len);
    Ok(Some((frame, prefix_len + len)))
}

/// Decodes one complete payload (type byte and fields, `payload.len() >= 1`).
fn decode_payload<'a>(payload: &'a [u8], limits: &Limits) -> Result<Frame<'a>, DecodeError> {
    debug_assert!(!payload.is_empty());
    let Some((&type_byte, fields)) = payload.split_first() else {
        return Err(DecodeError::Malformed("empty frame"));
    };
    let mut r = Fields { buf: fields };
    let frame = match type_byte {
        TYPE_LOGIN => {
            let version = r
                .byte()
                .ok_or(DecodeError::Malformed("missing version byte"))?;
            Frame::Login {
                version,
                token: r.rest(),
            }
        }
        TYPE_LOGIN_OK => Frame::LoginOk {
            server_time_ms: r.varint()?,
            offline_count: r.varint()?,
        },
        TYPE_LOGIN_ERR => Frame::LoginErr {
            code: r.error_code()?,
            text: r.text()?,
        },
        TYPE_SEND => Frame::Send {
            client_id: r.varint()?,
            to: r.varint()?,
            body: r.body(limits)?,
        },
        TYPE_ACK => Frame::Ack {
            client_id: r.varint()?,
            server_id: r.varint()?,
            server_time_ms: r.varint()?,
        },
        TYPE_DELIVER => Frame::Deliver {
            server_id: r.varint()?,
            from: r.varint()?,
            server_time_ms: r.varint()?,
            client_id: None,
            body: r.body(limits)?,
        },
        TYPE_SENT => Frame::Sent {
            server_id: r.varint()?,
            to: r.varint()?,
            server_time_ms: r.varint()?,
            client_id: r.varint()?,
            body: r.body(limits)?,
        },
        TYPE_DELIVER_V2 => Frame::Deliver {
            server_id: r.varint()?,
            from: r.varint()?,
            server_time_ms: r.varint()?,
            client_id: Some(r.varint()?),
            body: r.body(limits)?,
        },
        TYPE_DELIVERED => Frame::Delivered {
            server_id: r.varint()?,
        },
        TYPE_READ => Frame::Read {
            server_id: r.varint()?,
            from: r.varint()?,
        },
        TYPE_RECEIPT => Frame::Receipt {
            kind: ReceiptKind::from_u64(r.varint()?)
                .ok_or(DecodeError::Malformed("unknown receipt kind"))?,
            server_id: r.varint()?,
            peer: r.varint()?,
        },
        TYPE_PING => Frame::Ping { nonce: r.varint()? },
        TYPE_PONG => Frame::Pong { nonce: r.varint()? },
        TYPE_ERROR => Frame::Error {
            code: r.error_code()?,
            client_id: r.varint()?,
            text: r.text()?,
        },
        TYPE_BYE => Frame::Bye {
            reason: ByeReason::from_u64(r.varint()?)
                .ok_or(DecodeError::Malformed("unknown bye reason"))?,
        },
        TYPE_REDIRECT => Frame::Redirect { addr: r.text()? },
        TYPE_SUBSCRIBE => Frame::Subscribe { user: r.varint()? },
        TYPE_UNSUBSCRIBE => Frame::Unsubscribe { user: r.varint()? },
        TYPE_PRESENCE => Frame::Presence {
            user: r.varint()?,
            state: PresenceState::from_u64(r.varint()?)
                .ok_or(DecodeError::Malformed("unknown presence state"))?,
            last_seen_ms: r.varint()?,
        },
        TYPE_PRIVACY => Frame::Privacy {
            hidden: match r.varint()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Malformed("unknown privacy mode")),
            },
        },
        TYPE_TYPING => Frame::Typing { user: r.varint()? },
        TYPE_DEVICE_REMOVE => Frame::DeviceRemove {
            device: r.varint()?,
        },
        TYPE_DEVICE_REMOVED => Frame::DeviceRemoved {
            device: r.varint()?,
        },
        t if group::is_group_type(t) => Frame::Group(group::decode(t, &mut r, limits)?),
        other => return Err(DecodeError::UnknownType(other)),
    };
    // Frames ending in a rest field have consumed everything already.
    if !r.buf.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(frame)
}

/// Cursor over the fields of one complete payload. Running out of bytes here
/// is Malformed, never incomplete: the length prefix said the frame ends.
struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        match read_varint(self.buf, u64::MAX) {
            Varint::Done { value, len } => {
                self.buf = &self.buf[len..];
                Ok(value)
            }
            Varint::Incomplete => Err(DecodeError::Malformed("truncated field")),
            // Cannot happen with a bound of u64::MAX; mapped rather than
            // asserted so no input can panic the decoder.
            Varint::TooLarge { .. } => Err(DecodeError::Malformed("varint overflows u64")),
            Varint::Malformed(reason) => Err(DecodeError::Malformed(reason)),
        }
    }

    fn error_code(&mut self) -> Result<ErrorCode, DecodeError> {
        ErrorCode::from_u64(self.varint()?).ok_or(DecodeError::Malformed("unknown error code"))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn text(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.rest()).map_err(|_| DecodeError::Malformed("invalid utf-8"))
    }

    fn body(&mut self, limits: &Limits) -> Result<&'a [u8], DecodeError> {
        let body = self.rest();
        if body.len() > limits.body_bytes_max {
            return Err(DecodeError::BodyTooLarge { len: body.len() });
        }
        Ok(body)
    }
}

/// Outcome of reading one varint from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Varint {
    /// A minimal encoding of `value`, `len` bytes long.
    Done { value: u64, len: usize },
    /// The buffer ends inside the varint.
    Incomplete,
    /// Any minimal completion of the bytes seen is at least `value_min`,
    /// which exceeds the caller's bound.
    TooLarge { value_min: u64 },
    /// Non-minimal, longer than 10 bytes, or above `u64::MAX`.
    Malformed(&'static str),
}

/// Reads a LEB128 varint, rejecting values above `value_max` as early as the
/// bytes seen allow.
fn read_varint(buf: &[u8], value_max: u64) -> Varint {
    let mut value: u64 = 0;
    for i in 0..LEN_PREFIX_BYTES_MAX {
        let Some(&byte) = buf.get(i) else {
            return Varint::Incomplete;
        };
        let more = byte & 0x80 != 0;
        let bits = u64::from(byte & 0x7f);
        if i == LEN_PREFIX_BYTES_MAX - 1 {
            // The tenth byte holds bit 63 only.
            if more {
                break;
            }
            if bits > 1 {
                return Varint::Malformed("varint overflows u64");
            }
        }
        value |= bits << (7 * i);
        if !more {
            // A zero final byte adds nothing: a shorter encoding exists.
            if byte == 0 && i > 0 {
                return Varint::Malformed("non-minimal varint");
            }
            if value > value_max {
                return Varint::TooLarge { value_min: value };
            }
            return Varint::Done { value, len: i + 1 };
        }
        // More bytes follow, and a minimal encoding ends in a non-zero byte,
        // so the value is at least this. No overflow: i <= 8 here, so
        // value < 2^63 and the shift is at most 63.
        let value_min = value + (1u64 << (7 * (i + 1)));
        if value_min > value_max {
            return Varint::TooLarge { value_min };
        }
    }
    Varint::Malformed("varint longer than 10 bytes")
}

/// Longest part of a frame before its rest field (body, token or text): the
/// type byte and at most seven varints (GROUP_EVENT) of up to 10 bytes.
const HEAD_BYTES_MAX: usize = 1 + 7 * LEN_PREFIX_BYTES_MAX;

/// The type byte and fixed fields of one frame, written once on the stack so
/// that the length prefix can be computed from what was written instead of in
/// a pass of its own over the fields.
struct Head {
    buf: [u8; HEAD_BYTES_MAX],
    /// Bytes used: `1..=HEAD_BYTES_MAX` once the type byte is in.
    len: usize,
}

impl Head {
    fn new(type_byte: u8) -> Self {
        let mut buf = [0; HEAD_BYTES_MAX];
        buf[0] = type_byte;
        Head { buf, len: 1 }
    }

    fn byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn varint(&mut self, v: u64) {
        self.len += write_varint(v, &mut self.buf[self.len..]);
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Writes the minimal LEB128 encoding of `v` at the start of `out` and
/// returns its length (1 to 10). `out` must have room for it.
fn write_varint(mut v: u64, out: &mut [u8]) -> usize {
    // Bounded: each round drops 7 bits, so at most 10 rounds.
    for (i, slot) in out.iter_mut().take(LEN_PREFIX_BYTES_MAX).enumerate() {
        if v < 0x80 {
            *slot = v as u8;
            return i + 1;
        }
        *slot = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
    }
    unreachable!("no room for a varint of up to {LEN_PREFIX_BYTES_MAX} bytes");
}

/// Appends the encoded frame, length prefix included ([`encoded_len`]
/// bytes), to `out`. Never fails and checks no [`Limits`]: the sender is
/// responsible for staying within the peer's limits (a body within
/// `body_bytes_max` always fits).
///
/// One pass over the fields: they are written to a stack buffer first, and
/// `L` is that buffer's length plus the rest field's.
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>) {
    let mut head = Head::new(frame.type_byte());
    let rest: &[u8] = match *frame {
        Frame::Login { version, token } => {
            head.byte(version);
            token
        }
        Frame::LoginOk {
            server_time_ms,
            offline_count,
        } => {
            head.varint(server_time_ms);
            head.varint(offline_count);
            &[]
        }
        Frame::LoginErr { code, text } => {
            head.varint(code as u64);
            text.as_bytes()
        }
        Frame::Send {
            client_id,
            to,
            body,
        } => {
            head.varint(client_id);
            head.varint(to);
            body
        }
        Frame::Ack {
            client_id,
            server_id,
            server_time_ms,
        } => {
            head.varint(client_id);
            head.varint(server_id);
            head.varint(server_time_ms);
            &[]
        }
        Frame::Deliver {
            server_id,
            from,
            server_time_ms,
            client_id,
            body,
        } => {
            head.varint(server_id);
            head.varint(from);
            head.varint(server_time_ms);
            if let Some(client_id) = client_id {
                head.varint(client_id);
            }
            body
        }
        Frame::Delivered { server_id } => {
            head.varint(server_id);
            &[]
        }
        Frame::Read { server_id, from } => {
            head.varint(server_id);
            head.varint(from);
            &[]
        }
        Frame::Receipt {
            kind,
            server_id,
            peer,
        } => {
            head.varint(kind as u64);
            head.varint(server_id);
            head.varint(peer);
            &[]
        }
        Frame::Ping { nonce } | Frame::Pong { nonce } => {
            head.varint(nonce);
            &[]
        }
        Frame::Error {
            code,
            client_id,
            text,
        } => {
            head.varint(code as u64);
            head.varint(client_id);
            text.as_bytes()
        }
        Frame::Bye { reason } => {
            head.varint(reason as u64);
            &[]
        }
        Frame::Redirect { addr } => addr.as_bytes(),
        Frame::Subscribe { user } | Frame::Unsubscribe { user } | Frame::Typing { user } => {
            head.varint(user);
            &[]
        }
        Frame::Presence {
            user,
            state,
            last_seen_ms,
        } => {
            head.varint(user);
            head.varint(state as u64);
            head.varint(last_seen_ms);
            &[]
        }
        Frame::Privacy { hidden } => {
            head.varint(u64::from(hidden));
            &[]
        }
        Frame::DeviceRemove { device } | Frame::DeviceRemoved { device } => {
            head.varint(device);
            &[]
        }
        Frame::Sent {
            server_id,
            to,
            server_time_ms,
            client_id,
            body,
        } => {
            head.varint(server_id);
            head.varint(to);
            head.varint(server_time_ms);
            head.varint(client_id);
            body
        }
        Frame::Group(ref g) => g.encode_head(&mut head),
    };
    let payload_len = head.len + rest.len();
    let mut prefix = [0; LEN_PREFIX_BYTES_MAX];
    let prefix_len = write_varint(payload_len as u64, &mut prefix);
    out.reserve(prefix_len + payload_len);
    out.extend_from_slice(&prefix[..prefix_len]);
    out.extend_from_slice(head.bytes());
    out.extend_from_slice(rest);
    debug_assert_eq!(prefix_len + payload_len, encoded_len(frame));
}

/// Exact number of bytes [`encode`] appends for `frame`: the length prefix
/// plus `L`.
pub fn encoded_len(frame: &Frame<'_>) -> usize {
    let payload_len = frame.payload_len();
    varint_len(payload_len as u64) + payload_len
}

/// Appends the minimal LEB128 encoding of `v` (1 to 10 bytes) to `out`.
pub fn put_varint(v: u64, out: &mut Vec<u8>) {
    let mut buf = [0; LEN_PREFIX_BYTES_MAX];
    let len = write_varint(v, &mut buf);
    out.extend_from_slice(&buf[..len]);
}

/// Number of bytes [`put_varint`] appends for `v`: 1 for `v < 128`, up to 10.
pub fn varint_len(v: u64) -> usize {
    // Significant bits, at least 1 so that 0 takes one byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOC: &str = include_str!("../docs/PROTOCOL.md");

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
        decode(bytes, &Limits::default())
    }

    /// Builds a frame from a payload (type byte and fields) with a correct prefix.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn malformed(payload: &[u8]) -> &'static str {
        match dec(&framed(payload)) {
            Err(DecodeError::Malformed(reason)) => reason,
            other => panic!("payload {payload:02x?}: expected Malformed, got {other:?}"),
        }
    }

    const ALL_ERROR_CODES: [ErrorCode; 30] = [
        ErrorCode::Malformed,
        ErrorCode::UnknownType,
        ErrorCode::TooLarge,
        ErrorCode::NotLoggedIn,
        ErrorCode::QueueFull,
        ErrorCode::BadVersion,
        ErrorCode::BadToken,
        ErrorCode::TokenExpired,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
        ErrorCode::AlreadyLoggedIn,
        ErrorCode::BadRecipient,
        ErrorCode::ServerFull,
        ErrorCode::BadState,
        ErrorCode::StorageFull,
        ErrorCode::Unavailable,
        ErrorCode::UnknownMessage,
        ErrorCode::StaleClientId,
        ErrorCode::OtherNode,
        ErrorCode::TooManyDevices,
        ErrorCode::UnknownDevice,
        ErrorCode::PresenceSubsFull,
        ErrorCode::Banned,
        ErrorCode::UnknownGroup,
        ErrorCode::NotMember,
        ErrorCode::NotAdmin,
        ErrorCode::GroupFull,
        ErrorCode::TooManyGroups,
        ErrorCode::NoSuchMember,
        ErrorCode::LastAdmin,
    ];
    const ALL_PRESENCE_STATES: [PresenceState; 3] = [
        PresenceState::Online,
        PresenceState::Offline,
        PresenceState::Hidden,
    ];
    const ALL_RECEIPT_KINDS: [ReceiptKind; 2] = [ReceiptKind::Delivered, ReceiptKind::Read];
    const ALL_BYE_REASONS: [ByeReason; 11] = [
        ByeReason::Shutdown,
        ByeReason::Replaced,
        ByeReason::Slow,
        ByeReason::Idle,
        ByeReason::Error,
        ByeReason::RateLimited,
        ByeReason::Moved,
        ByeReason::DeviceRemoved,
        ByeReason::Kicked,
        ByeReason::Moving,
        ByeReason::Upgrade,
    ];

    /// The examples in docs/PROTOCOL.md, one per frame type.
    fn doc_examples() -> Vec<Frame<'static>> {
        vec![
            Frame::Login {
                version: VERSION,
                token: b"v1.42.1767225600.MAC",
            },
            Frame::LoginOk {
                server_time_ms: 1_767_225_600_000,
                offline_count: 3,
            },
            Frame::LoginErr {
                code: ErrorCode::TokenExpired,
                text: "expired",
            },
            Frame::Send {
                client_id: 7,
                to: 42,
                body: b"hello",
            },
            Frame::Ack {
                client_id: 7,
                server_id: 1001,
                server_time_ms: 1_767_225_600_123,
            },
            Frame::Deliver {
                server_id: 1001,
                from: 17,
                server_time_ms: 1_767_225_600_123,
                client_id: None,
                body: b"hello",
            },
            Frame::Delivered { server_id: 1001 },
            Frame::Read {
                server_id: 1001,
                from: 17,
            },
            Frame::Receipt {
                kind: ReceiptKind::Read,
                server_id: 1001,
                peer: 42,
            },
            Frame::Ping { nonce: 300 },
            Frame::Pong { nonce: 300 },
            Frame::Error {
                code: ErrorCode::QueueFull,
                client_id: 7,
                text: "queue full",
            },
            Frame::Bye {
                reason: ByeReason::Idle,
            },
            Frame::Deliver {
                server_id: 1001,
                from: 17,
                server_time_ms: 1_767_225_600_123,
                client_id: Some(7),
                body: b"hello",
            },
            Frame::Redirect {
                addr: "10.0.0.2:7333",
            },
            Frame::Subscribe { user: 42 },
            Frame::Unsubscribe { user: 42 },
            Frame::Presence {
                user: 42,
                state: PresenceState::Offline,
                last_seen_ms: 1_767_225_600_000,
            },
            Frame::Privacy { hidden: true },
            Frame::Typing { user: 42 },
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        let names = [
            "LOGIN",
            "LOGIN_OK",
            "LOGIN_ERR",
            "SEND",
            "ACK",
            "DELIVER",
            "DELIVERED",
            "READ",
            "RECEIPT",
            "PING",
            "PONG",
            "ERROR",
            "BYE",
            "DELIVER",
            "REDIRECT",
            "SUBSCRIBE",
            "UNSUBSCRIBE",
            "PRESENCE",
            "PRIVACY",
            "TYPING",
        ];
        let frames = doc_examples();
        assert_eq!(frames.len(), names.len());
        for (i, frame) in frames.iter().enumerate() {
            let bytes = enc(frame);
            assert_eq!(bytes.len(), encoded_len(frame));
            // Type bytes are 0x01..=0x0F, then 0x18.. (presence), in
            // declaration order.
            let want = if i < 15 { i + 1 } else { i - 15 + 0x18 };
            assert_eq!(usize::from(bytes[1]), want, "{}", frame.name());
            assert_eq!(frame.name(), names[i]);
            assert_eq!(dec(&bytes), Ok(Some((*frame, bytes.len()))));
            let owned = frame.to_owned();
            assert_eq!(owned.as_frame(), *frame);
            assert_eq!(enc(&owned.as_frame()), bytes);
        }
    }

    #[test]
    fn exact_bytes() {
        assert_eq!(enc(&Frame::Ping { nonce: 0 }), [0x02, 0x0a, 0x00]);
        assert_eq!(
            enc(&Frame::Bye {
                reason: ByeReason::Slow
            }),
            [0x02, 0x0d, 0x03]
        );
        assert_eq!(
            enc(&Frame::Login {
                version: 1,
                token: b"t"
            }),
            [0x03, 0x01, 0x01, b't']
        );
        assert_eq!(
            enc(&Frame::Send {
                client_id: 1,
                to: 2,
                body: b"hi"
            }),
            [0x05, 0x04, 0x01, 0x02, b'h', b'i']
        );
        // Multi-byte varints: 300 = ac 02, 2^14 = 80 80 01.
        assert_eq!(
            enc(&Frame::Ack {
                client_id: 300,
                server_id: 1 << 14,
                server_time_ms: 0
            }),
            [0x07, 0x05, 0xac, 0x02, 0x80, 0x80, 0x01, 0x00]
        );
        assert_eq!(
            enc(&Frame::Error {
                code: ErrorCode::Malformed,
                client_id: 0,
                text: ""
            }),
            [0x03, 0x0c, 0x01, 0x00]
        );
        // Empty rest fields are allowed.
        assert_eq!(
            dec(&[0x02, 0x01, 0x01]),
            Ok(Some((
                Frame::Login {
                    version: 1,
                    token: b""
                },
                3
            )))
        );
    }

    #[test]
    fn doc_examples_match_protocol_md() {
        for frame in doc_examples() {
            let h = hex(&enc(&frame));
            assert!(
                DOC.contains(&h),
                "docs/PROTOCOL.md lacks the {} example `{h}`",
                frame.name()
            );
        }
        let send20 = Frame::Send {
            client_id: 1000,
            to: 123_456_789,
            body: b"twenty bytes of text",
        };
        assert!(DOC.contains(&hex(&enc(&send20))));
        // docs/PROTOCOL.md, "Several devices".
        let sent = Frame::Sent {
            server_id: 1025,
            to: 7,
            server_time_ms: 1_767_225_600_000,
            client_id: 5,
            body: b"hi",
        };
        assert_eq!(
            hex(&enc(&sent)),
            "0d 12 81 08 07 80 d0 ea b6 b7 33 05 68 69"
        );
        assert!(DOC.contains(&hex(&enc(&sent))));
        let too_many = Frame::LoginErr {
            code: ErrorCode::TooManyDevices,
            text: "devices",
        };
        assert_eq!(hex(&enc(&too_many)), "09 03 14 64 65 76 69 63 65 73");
        assert!(DOC.contains(&hex(&enc(&too_many))));
        // docs/PROTOCOL.md, "Removing a device".
        let examples = [
            (Frame::DeviceRemove { device: 2 }, "02 10 02"),
            (Frame::DeviceRemoved { device: 300 }, "03 11 ac 02"),
            (
                Frame::Error {
                    code: ErrorCode::UnknownDevice,
                    client_id: 2,
                    text: "device",
                },
                "09 0c 15 02 64 65 76 69 63 65",
            ),
            (
                Frame::Bye {
                    reason: ByeReason::DeviceRemoved,
                },
                "02 0d 08",
            ),
        ];
        for (frame, want) in examples {
            assert_eq!(hex(&enc(&frame)), want, "{}", frame.name());
            assert!(DOC.contains(want), "docs/PROTOCOL.md lacks `{want}`");
            assert_eq!(dec(&enc(&frame)), Ok(Some((frame, want.len().div_ceil(3)))));
        }
    }

    #[test]
    fn varint_known_values() {
        let cases: [(u64, &[u8]); 8] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (v, bytes) in cases {
            let mut out = Vec::new();
            put_varint(v, &mut out);
            assert_eq!(out, bytes, "{v}");
            assert_eq!(varint_len(v), bytes.len(), "{v}");
            assert_eq!(
                read_varint(bytes, u64::MAX),
                Varint::Done {
                    value: v,
                    len: bytes.len()
                }
            );
        }
        // Every length boundary.
        for k in 1..64 {
            let v = 1u64 << k;
            assert_eq!(varint_len(v - 1), (k as usize).div_ceil(7));
            assert_eq!(varint_len(v), (k as usize + 1).div_ceil(7));
        }
    }

    #[test]
    fn empty_input_and_partial_prefix_are_incomplete() {
        assert_eq!(dec(&[]), Ok(None));
        assert_eq!(dec(&[0x80]), Ok(None));
        // 80 80 could still become 2^14 = 16384 <= 65536.
        assert_eq!(dec(&[0x80, 0x80]), Ok(None));
        // Prefix says 5 bytes, 4 present.
        assert_eq!(dec(&[0x05, 0x04, 0x01, 0x02, b'h']), Ok(None));
    }

    #[test]
    fn empty_frame_is_malformed() {
        assert_eq!(dec(&[0x00]), Err(DecodeError::Malformed("empty frame")));
        // Even with bytes after it, and even with a zero limit.
        let zero = Limits {
            frame_bytes_max: 0,
            body_bytes_max: 0,
        };
        assert_eq!(
            decode(&[0x00, 0x0a], &zero),
            Err(DecodeError::Malformed("empty frame"))
        );
    }

    #[test]
    fn unknown_type() {
        for t in [0x00, 0x13, 0x17, 0x1d, 0x1f, 0x2d, 0x7f, 0xff] {
            assert_eq!(dec(&framed(&[t])), Err(DecodeError::UnknownType(t)));
            assert_eq!(
                dec(&framed(&[t, 1, 2, 3])),
                Err(DecodeError::UnknownType(t))
            );
        }
        assert_eq!(
            DecodeError::UnknownType(0x0e).code(),
            ErrorCode::UnknownType
        );
    }

    #[test]
    fn presence_fields_checked() {
        // State 0 and 4 name nothing; PRIVACY takes only 0 and 1.
        assert_eq!(
            malformed(&[TYPE_PRESENCE, 42, 0, 0]),
            "unknown presence state"
        );
        assert_eq!(
            malformed(&[TYPE_PRESENCE, 42, 4, 0]),
            "unknown presence state"
        );
        assert_eq!(malformed(&[TYPE_PRIVACY, 2]), "unknown privacy mode");
        assert_eq!(malformed(&[TYPE_PRIVACY]), "truncated field");
        assert_eq!(malformed(&[TYPE_SUBSCRIBE, 42, 0]), "trailing bytes");
        assert_eq!(
            enc(&Frame::Privacy { hidden: false }),
            [0x02, TYPE_PRIVACY, 0x00]
        );
    }

    #[test]
    fn bad_varints() {
        // Longer than 10 bytes.
        let mut p = vec![TYPE_PING];
        p.extend_from_slice(&[0xff; 10]);
        p.push(0x01);
        assert_eq!(malformed(&p), "varint longer than 10 bytes");
        // Ten bytes but above u64::MAX (tenth byte > 1).
        let mut p = vec![TYPE_PING];
        p.extend_from_slice(&[0xff; 9]);
        p.push(0x02);
        assert_eq!(malformed(&p), "varint overflows u64");
        // Ten bytes with tenth byte 1 is u64::MAX, fine.
        let mut p = vec![TYPE_PING];
        p.extend_from_slice(&[0xff; 9]);
        p.push(0x01);
        assert_eq!(
            dec(&framed(&p)),
            Ok(Some((Frame::Ping { nonce: u64::MAX }, 12)))
        );
        // In the length prefix, with a limit that lets it get that far.
        let huge = Limits {
            frame_bytes_max: usize::MAX,
            body_bytes_max: usize::MAX,
        };
        let mut b = vec![0xff; 10];
        b.push(0x01);
        assert_eq!(
            decode(&b, &huge),
            Err(DecodeError::Malformed("varint longer than 10 bytes"))
        );
        let mut b = vec![0xff; 9];
        b.push(0x02);
        assert_eq!(
            decode(&b, &huge),
            Err(DecodeError::Malformed("varint overflows u64"))
        );
    }

    #[test]
    fn non_minimal_varints() {
        assert_eq!(malformed(&[TYPE_PING, 0x80, 0x00]), "non-minimal varint");
        assert_eq!(
            malformed(&[TYPE_PING, 0x81, 0x80, 0x00]),
            "non-minimal varint"
        );
        assert_eq!(
            malformed(&[TYPE_READ, 0x01, 0xff, 0x00]),
            "non-minimal varint"
        );
        let mut p = vec![TYPE_PING];
        p.extend_from_slice(&[0x80; 9]);
        p.push(0x00);
        assert_eq!(malformed(&p), "non-minimal varint");
        // In the length prefix: 81 00 would mean 1.
        assert_eq!(
            dec(&[0x81, 0x00, TYPE_PING]),
            Err(DecodeError::Malformed("non-minimal varint"))
        );
        // A lone 0x00 prefix is minimal (and an empty frame).
        assert_eq!(dec(&[0x00]), Err(DecodeError::Malformed("empty frame")));
    }

    #[test]
    fn trailing_bytes() {
        assert_eq!(malformed(&[TYPE_PING, 0x01, 0x00]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_PONG, 0x01, 0x01]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_DELIVERED, 0x05, 0x05]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_LOGIN_OK, 1, 2, 3]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_ACK, 1, 2, 3, 4]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_READ, 1, 2, 3]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_RECEIPT, 1, 2, 3, 4]), "trailing bytes");
        assert_eq!(malformed(&[TYPE_BYE, 1, 0]), "trailing bytes");
    }

    #[test]
    fn truncated_fields() {
        let cases: [&[u8]; 12] = [
            &[TYPE_LOGIN_OK],
            &[TYPE_LOGIN_OK, 0x01],
            &[TYPE_LOGIN_ERR],
            &[TYPE_SEND, 0x01],
            &[TYPE_ACK, 0x01, 0x02],
            &[TYPE_DELIVER, 0x01, 0x02],
            &[TYPE_DELIVERED],
            &[TYPE_READ, 0x01],
            &[TYPE_RECEIPT, 0x01, 0x02],
            &[TYPE_PING],
            &[TYPE_ERROR, 0x01],
            &[TYPE_BYE],
        ];
        for p in cases {
            assert_eq!(malformed(p), "truncated field", "{p:02x?}");
        }
        // A varint cut off by the end of the frame, not of the buffer: the
        // bytes after the frame must not be read as part of it.
        assert_eq!(
            dec(&[0x02, TYPE_PING, 0x80, 0x01]),
            Err(DecodeError::Malformed("truncated field"))
        );
    }

    #[test]
    fn version_byte_missing() {
        assert_eq!(malformed(&[TYPE_LOGIN]), "missing version byte");
        // Any version byte decodes; checking it is the session's job.
        assert_eq!(
            dec(&framed(&[TYPE_LOGIN, 0xff, b'x'])),
            Ok(Some((
                Frame::Login {
                    version: 0xff,
                    token: b"x"
                },
                4
            )))
        );
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(malformed(&[TYPE_LOGIN_ERR, 0x07, 0xff]), "invalid utf-8");
        assert_eq!(
            malformed(&[TYPE_ERROR, 0x05, 0x00, b'o', b'k', 0xc3]),
            "invalid utf-8"
        );
        // Non-ASCII but valid: fine.
        let frame = Frame::Error {
            code: ErrorCode::Internal,
            client_id: 0,
            text: "ça va ✓",
        };
        assert_eq!(dec(&enc(&frame)).unwrap().unwrap().0, frame);
        // Tokens and bodies are raw bytes, not text.
        assert!(dec(&framed(&[TYPE_LOGIN, 1, 0xff])).unwrap().is_some());
        assert!(dec(&framed(&[TYPE_SEND, 1, 2, 0xff])).unwrap().is_some());
    }

    #[test]
    fn unknown_code_kind_reason() {
        for v in [0u8, 35, 0x7f] {
            assert_eq!(malformed(&[TYPE_LOGIN_ERR, v]), "unknown error code");
            assert_eq!(malformed(&[TYPE_ERROR, v, 0x00]), "unknown error code");
        }
        for v in [0u8, 3, 0x7f] {
            assert_eq!(malformed(&[TYPE_RECEIPT, v, 1, 1]), "unknown receipt kind");
        }
        for v in [0u8, 9, 0x7f] {
            assert_eq!(malformed(&[TYPE_BYE, v]), "unknown bye reason");
        }
        // A large code number is still just unknown.
        assert_eq!(malformed(&[TYPE_BYE, 0x80, 0x01]), "unknown bye reason");
    }

    #[test]
    fn too_large_prefix_reported_before_body_arrives() {
        let limits = Limits::default();
        // 70000 = f0 a2 04; only the prefix is here, not the 70000 bytes.
        let mut b = Vec::new();
        put_varint(70_000, &mut b);
        assert_eq!(b, [0xf0, 0xa2, 0x04]);
        assert_eq!(
            decode(&b, &limits),
            Err(DecodeError::TooLarge { len: 70_000 })
        );
        // The first two bytes could still be <= 65536: incomplete.
        assert_eq!(decode(&b[..2], &limits), Ok(None));
        // 80 80 80 can only complete to >= 2^21: rejected without waiting.
        assert_eq!(
            decode(&[0x80, 0x80, 0x80], &limits),
            Err(DecodeError::TooLarge { len: 1 << 21 })
        );
        // Limit + 1 rejected, limit accepted (waits for the bytes).
        let mut b = Vec::new();
        put_varint(65_537, &mut b);
        assert_eq!(
            decode(&b, &limits),
            Err(DecodeError::TooLarge { len: 65_537 })
        );
        let mut b = Vec::new();
        put_varint(65_536, &mut b);
        assert_eq!(decode(&b, &limits), Ok(None));
        let err = DecodeError::TooLarge { len: 70_000 };
        assert_eq!(err.code(), ErrorCode::TooLarge);
        assert_eq!(
            err.to_string(),
            "frame of 70000 bytes exceeds frame_bytes_max"
        );
    }

    #[test]
    fn frame_limit_edges() {
        // A frame of exactly frame_bytes_max decodes; one more byte does not.
        let limits = Limits {
            frame_bytes_max: 3,
            body_bytes_max: 3,
        };
        let ok = enc(&Frame::Ping { nonce: 300 }); // L = 3
        assert_eq!(
            decode(&ok, &limits),
            Ok(Some((Frame::Ping { nonce: 300 }, 4)))
        );
        let big = enc(&Frame::Ping { nonce: 1 << 14 }); // L = 4
        assert_eq!(decode(&big, &limits), Err(DecodeError::TooLarge { len: 4 }));
        // frame_bytes_max 0: every non-empty frame is too large.
        let zero = Limits {
            frame_bytes_max: 0,
            body_bytes_max: 0,
        };
        assert_eq!(
            decode(&[0x01], &zero),
            Err(DecodeError::TooLarge { len: 1 })
        );
        // A lone continuation byte can only mean >= 128.
        assert_eq!(
            decode(&[0x80], &zero),
            Err(DecodeError::TooLarge { len: 128 })
        );
        // frame_bytes_max 1: no frame type fits, but the size check passes
        // and the payload is judged on its own.
        let one = Limits {
            frame_bytes_max: 1,
            body_bytes_max: 0,
        };
        assert_eq!(
            decode(&[0x01, TYPE_PING], &one),
            Err(DecodeError::Malformed("truncated field"))
        );
    }

    #[test]
    fn body_too_large() {
        let limits = Limits::default();
        let body = vec![0xab; limits.body_bytes_max + 1];
        for frame in [
            Frame::Send {
                client_id: 1,
                to: 2,
                body: &body,
            },
            Frame::Deliver {
                server_id: 1,
                from: 2,
                server_time_ms: 3,
                client_id: None,
                body: &body,
            },
        ] {
            let bytes = enc(&frame);
            assert_eq!(
                decode(&bytes, &limits),
                Err(DecodeError::BodyTooLarge { len: 65_001 })
            );
        }
        // Exactly body_bytes_max is fine, even with the largest other fields.
        let body = &body[..limits.body_bytes_max];
        let frame = Frame::Deliver {
            server_id: u64::MAX,
            from: u64::MAX,
            server_time_ms: u64::MAX,
            client_id: None,
            body,
        };
        let bytes = enc(&frame);
        assert_eq!(decode(&bytes, &limits), Ok(Some((frame, bytes.len()))));
        // Tokens and texts are bounded by the frame limit only.
        let token = vec![b'a'; 65_000];
        let frame = Frame::Login {
            version: 1,
            token: &token,
        };
        assert!(decode(&enc(&frame), &limits).unwrap().is_some());
        let err = DecodeError::BodyTooLarge { len: 65_001 };
        assert_eq!(err.code(), ErrorCode::TooLarge);
        assert_eq!(
            err.to_string(),
            "message body of 65001 bytes exceeds body_bytes_max"
        );
    }

    #[test]
    fn send_overhead_of_20_byte_body() {
        let body = [b'x'; 20];
        for client_id in [0, 1, 127, 128, (1 << 14) - 1] {
            for to in [1, 127, 1 << 21, (1u64 << 35) - 1] {
                let frame = Frame::Send {
                    client_id,
                    to,
                    body: &body,
                };
                let overhead = encoded_len(&frame) - body.len();
                assert!(overhead <= 16, "{client_id} {to}: {overhead}");
            }
        }
        // The worst case of that range is 1 + 1 + 2 + 5 = 9 bytes.
        let worst = Frame::Send {
            client_id: (1 << 14) - 1,
            to: (1 << 35) - 1,
            body: &body,
        };
        assert_eq!(encoded_len(&worst) - body.len(), 9);
    }

    #[test]
    fn stream_fed_one_byte_at_a_time() {
        let frames = doc_examples();
        let mut wire = Vec::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        for &b in &wire {
            buf.push(b);
            if let Some((frame, consumed)) = dec(&buf).unwrap() {
                assert_eq!(consumed, buf.len());
                got.push(frame.to_owned());
                buf.clear();
            }
        }
        assert!(buf.is_empty());
        let got: Vec<Frame<'_>> = got.iter().map(OwnedFrame::as_frame).collect();
        assert_eq!(got, frames);
    }

    #[test]
    fn enums_from_u64_as_str_display() {
        // 1..=19 in order, then the ops range from 30.
        for (i, code) in ALL_ERROR_CODES.iter().enumerate() {
            // 1..=19, then devices' 20 and 21, presence's 25, ops' 30,
            // groups' 40..=46.
            let want = match i {
                0..=20 => i as u64 + 1,
                21 => 25,
                22 => 30,
                _ => i as u64 + 17,
            };
            assert_eq!(*code as u64, want);
            assert_eq!(ErrorCode::from_u64(*code as u64), Some(*code));
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!(ErrorCode::QueueFull.as_str(), "queue_full");
        assert_eq!(ErrorCode::from_u64(0), None);
        // 22..=24 and 26..=34 are reserved for other issue 11 and ops work.
        assert_eq!(ErrorCode::from_u64(22), None);
        assert_eq!(ErrorCode::from_u64(26), None);
        for (i, state) in ALL_PRESENCE_STATES.iter().enumerate() {
            assert_eq!(*state as u64, i as u64 + 1);
            assert_eq!(PresenceState::from_u64(*state as u64), Some(*state));
            assert_eq!(state.to_string(), state.as_str());
            assert!(DOC.contains(&format!("`{}`", state.as_str())), "{state}");
        }
        assert_eq!(PresenceState::from_u64(0), None);
        assert_eq!(PresenceState::from_u64(4), None);
        assert_eq!(ErrorCode::from_u64(29), None);
        assert_eq!(ErrorCode::from_u64(31), None);
        assert_eq!(ErrorCode::from_u64(35), None);
        assert_eq!(ErrorCode::from_u64(u64::MAX), None);
        for (i, kind) in ALL_RECEIPT_KINDS.iter().enumerate() {
            assert_eq!(*kind as u64, i as u64 + 1);
            assert_eq!(ReceiptKind::from_u64(*kind as u64), Some(*kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!(ReceiptKind::from_u64(0), None);
        assert_eq!(ReceiptKind::from_u64(3), None);
        // 1..=7 in order, devices' 8, then the ops range from 10, then
        // upgrade's 13.
        for (i, reason) in ALL_BYE_REASONS.iter().enumerate() {
            let number = match i {
                0..=7 => i + 1,
                8 | 9 => i - 8 + 10,
                _ => 13,
            };
            assert_eq!(*reason as u64, number as u64);
            assert_eq!(ByeReason::from_u64(*reason as u64), Some(*reason));
            assert_eq!(reason.to_string(), reason.as_str());
        }
        assert_eq!(ByeReason::from_u64(0), None);
        assert_eq!(ByeReason::from_u64(9), None);
        assert_eq!(ByeReason::from_u64(12), None);
        assert_eq!(ByeReason::from_u64(14), None);
        // Names are unique and snake_case.
        let mut names: Vec<&str> = ALL_ERROR_CODES.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL_ERROR_CODES.len());
        for n in names {
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
        }
        // Every name appears in the documentation.
        for code in ALL_ERROR_CODES {
            assert!(DOC.contains(&format!("`{}`", code.as_str())), "{code}");
        }
        for reason in ALL_BYE_REASONS {
            assert!(DOC.contains(&format!("`{}`", reason.as_str())), "{reason}");
        }
    }

    #[test]
    fn decode_error_codes_and_text() {
        assert_eq!(
            DecodeError::Malformed("trailing bytes").code(),
            ErrorCode::Malformed
        );
        assert_eq!(
            DecodeError::Malformed("trailing bytes").to_string(),
            "malformed frame: trailing bytes"
        );
        assert_eq!(
            DecodeError::UnknownType(0x0e).to_string(),
            "unknown frame type 0x0e"
        );
        let boxed: Box<dyn std::error::Error> = Box::new(DecodeError::UnknownType(1));
        assert!(!boxed.to_string().is_empty());
    }

    // ---- property tests ----

    fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
        proptest::sample::select(ALL_ERROR_CODES.to_vec())
    }

    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..300)
    }

    /// Integers biased towards varint length boundaries.
    fn arb_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            (0u32..64).prop_map(|k| 1u64 << k),
            (1u32..64).prop_map(|k| (1u64 << k) - 1),
            0u64..300,
        ]
    }

    fn arb_frame() -> impl Strategy<Value = OwnedFrame> {
        prop_oneof![
            (any::<u8>(), arb_bytes())
                .prop_map(|(version, token)| OwnedFrame::Login { version, token }),
            (arb_u64(), arb_u64()).prop_map(|(server_time_ms, offline_count)| {
                OwnedFrame::LoginOk {
                    server_time_ms,
                    offline_count,
                }
            }),
            (arb_error_code(), any::<String>())
                .prop_map(|(code, text)| OwnedFrame::LoginErr { code, text }),
            (arb_u64(), arb_u64(), arb_bytes()).prop_map(|(client_id, to, body)| {
                OwnedFrame::Send {
                    client_id,
                    to,
                    body,
                }
            }),
            (arb_u64(), arb_u64(), arb_u64()).prop_map(|(client_id, server_id, server_time_ms)| {
                OwnedFrame::Ack {
                    client_id,
                    server_id,
                    server_time_ms,
                }
            }),
            (
                arb_u64(),
                arb_u64(),
                arb_u64(),
                prop::option::of(arb_u64()),
                arb_bytes()
            )
                .prop_map(|(server_id, from, server_time_ms, client_id, body)| {
                    OwnedFrame::Deliver {
                        server_id,
                        from,
                        server_time_ms,
                        client_id,
                        body,
                    }
                }),
            arb_u64().prop_map(|server_id| OwnedFrame::Delivered { server_id }),
            (arb_u64(), arb_u64())
                .prop_map(|(server_id, from)| OwnedFrame::Read { server_id, from }),
            (
                proptest::sample::select(ALL_RECEIPT_KINDS.to_vec()),
                arb_u64(),
                arb_u64()
            )
                .prop_map(|(kind, server_id, peer)| OwnedFrame::Receipt {
                    kind,
                    server_id,
                    peer,
                }),
            arb_u64().prop_map(|nonce| OwnedFrame::Ping { nonce }),
            arb_u64().prop_map(|nonce| OwnedFrame::Pong { nonce }),
            (arb_error_code(), arb_u64(), any::<String>()).prop_map(|(code, client_id, text)| {
                OwnedFrame::Error {
                    code,
                    client_id,
                    text,
                }
            }),
            proptest::sample::select(ALL_BYE_REASONS.to_vec())
                .prop_map(|reason| OwnedFrame::Bye { reason }),
            any::<String>().prop_map(|addr| OwnedFrame::Redirect { addr }),
            arb_u64().prop_map(|user| OwnedFrame::Subscribe { user }),
            arb_u64().prop_map(|user| OwnedFrame::Unsubscribe { user }),
            (
                arb_u64(),
                proptest::sample::select(ALL_PRESENCE_STATES.to_vec()),
                arb_u64()
            )
                .prop_map(|(user, state, last_seen_ms)| OwnedFrame::Presence {
                    user,
                    state,
                    last_seen_ms,
                }),
            any::<bool>().prop_map(|hidden| OwnedFrame::Privacy { hidden }),
            arb_u64().prop_map(|user| OwnedFrame::Typing { user }),
            arb_u64().prop_map(|device| OwnedFrame::DeviceRemove { device }),
            arb_u64().prop_map(|device| OwnedFrame::DeviceRemoved { device }),
            (arb_u64(), arb_u64(), arb_u64(), arb_u64(), arb_bytes()).prop_map(
                |(server_id, to, server_time_ms, client_id, body)| OwnedFrame::Sent {
                    server_id,
                    to,
                    server_time_ms,
                    client_id,
                    body,
                }
            ),
            arb_group_frame().prop_map(OwnedFrame::Group),
        ]
    }

    fn arb_group_frame() -> impl Strategy<Value = GroupFrame<Vec<u8>>> {
        let users = prop::collection::vec(arb_u64(), 1..4).prop_map(|us| {
            let mut out = Vec::new();
            us.iter().for_each(|&u| put_varint(u, &mut out));
            out
        });
        let entries = prop::collection::vec((arb_u64(), any::<bool>()), 0..4).prop_map(|es| {
            let mut out = Vec::new();
            es.iter()
                .for_each(|&(u, a)| group::put_entry(u, a, &mut out));
            out
        });
        let (u, b) = (arb_u64, arb_bytes);
        prop_oneof![
            u().prop_map(|req| GroupFrame::Create { req }),
            (u(), u(), u()).prop_map(|(req, group, user)| GroupFrame::Add { req, group, user }),
            (u(), u(), u()).prop_map(|(req, group, user)| GroupFrame::Remove { req, group, user }),
            (u(), u()).prop_map(|(req, group)| GroupFrame::Leave { req, group }),
            (u(), u(), u(), any::<bool>()).prop_map(|(req, group, user, admin)| {
                GroupFrame::Admin {
                    req,
                    group,
                    user,
                    admin,
                }
            }),
            (u(), u()).prop_map(|(req, group)| GroupFrame::Members { req, group }),
            (u(), u()).prop_map(|(req, group)| GroupFrame::Ok { req, group }),
            (u(), u(), u(), entries).prop_map(|(req, group, left, entries)| GroupFrame::List {
                req,
                group,
                left,
                entries,
            }),
            (u(), u(), b()).prop_map(|(client_id, group, body)| GroupFrame::Send {
                client_id,
                group,
                body,
            }),
            (u(), u(), u(), u(), u(), u(), b()).prop_map(
                |(server_id, group, msg, from, server_time_ms, client_id, body)| {
                    GroupFrame::Deliver {
                        server_id,
                        group,
                        msg,
                        from,
                        server_time_ms,
                        client_id,
                        body,
                    }
                }
            ),
            (u(), u(), u(), u(), u(), 1u64..=6, u()).prop_map(
                |(server_id, group, msg, actor, server_time_ms, event, subject)| {
                    GroupFrame::Event {
                        server_id,
                        group,
                        msg,
                        actor,
                        server_time_ms,
                        event: GroupEvent::from_u64(event).expect("1..=6"),
                        subject,
                    }
                }
            ),
            (u(), u(), u()).prop_map(|(group, msg, from)| GroupFrame::Read { group, msg, from }),
            (1u64..=2, u(), u(), users).prop_map(|(kind, group, msg, members)| {
                GroupFrame::Receipt {
                    kind: ReceiptKind::from_u64(kind).expect("1..=2"),
                    group,
                    msg,
                    members,
                }
            }),
        ]
    }

    fn arb_limits() -> impl Strategy<Value = Limits> {
        prop_oneof![
            Just(Limits::default()),
            (0usize..400, 0usize..400).prop_map(|(frame_bytes_max, body_bytes_max)| Limits {
                frame_bytes_max,
                body_bytes_max,
            }),
            Just(Limits {
                frame_bytes_max: usize::MAX,
                body_bytes_max: usize::MAX,
            }),
        ]
    }

    proptest! {
        #[test]
        fn prop_round_trip(owned in arb_frame()) {
            let frame = owned.as_frame();
            let bytes = enc(&frame);
            prop_assert_eq!(bytes.len(), encoded_len(&frame));
            let (got, consumed) = dec(&bytes).unwrap().unwrap();
            prop_assert_eq!(got, frame);
            prop_assert_eq!(consumed, encoded_len(&frame));
            prop_assert_eq!(got.to_owned(), owned);
        }

        #[test]
        fn prop_random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            limits in arb_limits(),
        ) {
            check_decode_result(&bytes, &limits)?;
        }

        #[test]
        fn prop_random_payload_never_panics(
            type_byte in 0u8..16,
            fields in proptest::collection::vec(any::<u8>(), 0..40),
            limits in arb_limits(),
        ) {
            // A valid prefix and type, so the field decoders see random input.
            let mut payload = vec![type_byte];
            payload.extend_from_slice(&fields);
            check_decode_result(&framed(&payload), &limits)?;
        }

        #[test]
        fn prop_strict_prefix_is_incomplete(owned in arb_frame(), cut in any::<prop::sample::Index>()) {
            let bytes = enc(&owned.as_frame());
            let cut = cut.index(bytes.len());
            prop_assert_eq!(dec(&bytes[..cut]), Ok(None));
        }

        #[test]
        fn prop_two_frames_back_to_back(a in arb_frame(), b in arb_frame()) {
            let mut bytes = enc(&a.as_frame());
            let a_len = bytes.len();
            encode(&b.as_frame(), &mut bytes);
            let (first, consumed) = dec(&bytes).unwrap().unwrap();
            prop_assert_eq!(first, a.as_frame());
            prop_assert_eq!(consumed, a_len);
            let (second, consumed) = dec(&bytes[a_len..]).unwrap().unwrap();
            prop_assert_eq!(second, b.as_frame());
            prop_assert_eq!(consumed, bytes.len() - a_len);
        }
    }

    /// Whatever `decode` returns for arbitrary input must be self-consistent.
    fn check_decode_result(bytes: &[u8], limits: &Limits) -> Result<(), TestCaseError> {
        match decode(bytes, limits) {
            Ok(Some((frame, consumed))) => {
                prop_assert!(consumed <= bytes.len());
                prop_assert_eq!(consumed, encoded_len(&frame));
                // Minimal varints make the encoding canonical.
                prop_assert_eq!(enc(&frame), &bytes[..consumed]);
            }
            Ok(None) => {}
            Err(DecodeError::TooLarge { len }) => {
                prop_assert!(len > limits.frame_bytes_max as u64);
            }
            Err(DecodeError::BodyTooLarge { len }) => {
                prop_assert!(len > limits.body_bytes_max);
            }
            Err(DecodeError::UnknownType(t)) => {
                prop_assert!(t == 0 || t > TYPE_BYE);
            }
            Err(DecodeError::Malformed(reason)) => prop_assert!(!reason.is_empty()),
        }
        Ok(())
    }
}
