//! The mapping of docs/MQTT.md: MQTT packets from a client become the Tern
//! frames the session layer takes ([`on_packet`]), and the frames the
//! session layer writes become MQTT packets ([`on_frame`]).
//!
//! Pure: the caller keeps each connection's [`Mode`] (4 bytes, every MQTT
//! connection) and [`Inflight`] (only while deliveries wait for their
//! PUBACK), feeds the Tern bytes to the session layer, writes the MQTT
//! bytes, and carries out the [`Step`].

use super::codec::{
    self, connack311, prop, reason, Ack, ConnAck, Connect, Disconnect, Packet, Props, PropsBuf,
    PubAck, Publish, Version,
};
use crate::proto::{self, ByeReason, ErrorCode, Frame, ReceiptKind};

/// A connection's MQTT state: what its CONNECT and SUBSCRIBEs said. The
/// default is "not an MQTT connection"; [`Mode::accepted`] is one whose
/// CONNECT has not come yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    flags: u8,
    /// Keepalive the server holds the client to, seconds; 0 = the
    /// server's idle timeout.
    keepalive_s: u16,
    /// 5.0 Receive Maximum: most PUBLISHes unanswered; 0 = no limit of
    /// its own.
    receive_max: u16,
}

/// Bytes of [`Mode`]: what MQTT adds per connection.
pub const MODE_BYTES: usize = std::mem::size_of::<Mode>();
const _: () = assert!(MODE_BYTES <= 6);

mod flag {
    /// The CONNECT was taken (a LOGIN went to the session layer).
    pub const CONNECTED: u8 = 1;
    /// The connection speaks MQTT 5.0.
    pub const V5: u8 = 1 << 1;
    /// A persistent session: the inbox subscription is remembered.
    pub const PERSISTENT: u8 = 1 << 2;
    /// The CONNECT's client identifier was empty (5.0: assign one).
    pub const EMPTY_ID: u8 = 1 << 3;
    /// Subscribed to `u/<me>`: deliveries flow.
    pub const INBOX: u8 = 1 << 4;
    /// Subscribed to `u/<me>/receipts`.
    pub const RECEIPTS: u8 = 1 << 5;
    /// The server keepalive differs from the client's (5.0: tell it).
    pub const SERVER_KEEPALIVE: u8 = 1 << 6;
    /// An MQTT connection at all (set from accept on).
    pub const MQTT: u8 = 1 << 7;
}

impl Mode {
    /// A connection from the MQTT listener, its CONNECT not yet taken.
    pub fn accepted() -> Mode {
        Mode {
            flags: flag::MQTT,
            ..Mode::default()
        }
    }

    /// Whether this is an MQTT connection.
    pub fn is_mqtt(self) -> bool {
        self.has(flag::MQTT)
    }

    fn has(self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// The most deliveries the client takes unanswered (5.0 Receive
    /// Maximum), when it said.
    pub fn inflight_max(self) -> Option<usize> {
        (self.receive_max > 0).then_some(usize::from(self.receive_max))
    }

    /// The connection's protocol level, once its CONNECT was taken.
    pub fn version(self) -> Option<Version> {
        match (self.has(flag::CONNECTED), self.has(flag::V5)) {
            (false, _) => None,
            (true, false) => Some(Version::V311),
            (true, true) => Some(Version::V5),
        }
    }

    /// Whether deliveries flow (the inbox is subscribed, or remembered by
    /// a persistent session).
    pub fn inbox(self) -> bool {
        self.has(flag::INBOX)
    }

    /// How long the connection may stay silent, milliseconds: 1.5 times
    /// its keepalive, `None` for the server's idle timeout.
    pub fn silence_ms_max(self) -> Option<u64> {
        (self.keepalive_s > 0).then(|| u64::from(self.keepalive_s) * 1500)
    }

    /// Live upgrade: the state as [`MODE_WIRE_BYTES`] bytes, `flags`,
    /// `keepalive_s` and `receive_max` (little-endian).
    pub fn to_bytes(self) -> [u8; MODE_WIRE_BYTES] {
        let [k0, k1] = self.keepalive_s.to_le_bytes();
        let [r0, r1] = self.receive_max.to_le_bytes();
        [self.flags, k0, k1, r0, r1]
    }

    /// Live upgrade: the state of [`Mode::to_bytes`], `None` unless it is
    /// an MQTT connection whose CONNECT was taken (only those are carried).
    pub fn from_bytes(b: [u8; MODE_WIRE_BYTES]) -> Option<Mode> {
        let mode = Mode {
            flags: b[0],
            keepalive_s: u16::from_le_bytes([b[1], b[2]]),
            receive_max: u16::from_le_bytes([b[3], b[4]]),
        };
        (mode.is_mqtt() && mode.has(flag::CONNECTED)).then_some(mode)
    }
}

/// Bytes of a [`Mode`] carried by a live upgrade.
pub const MODE_WIRE_BYTES: usize = 5;

/// Deliveries sent and not yet PUBACKed: (packet id, server id), oldest
/// first. At most `deliver_inflight_max` entries (the session layer's
/// window), so a packet id is free again long before it wraps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inflight(Vec<(u16, u64)>);

impl Inflight {
    /// Whether nothing waits for a PUBACK.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Live upgrade: the (packet id, server id) pairs, oldest first.
    pub fn entries(&self) -> &[(u16, u64)] {
        &self.0
    }

    /// Live upgrade: the map of [`Inflight::entries`]; `None` when a
    /// packet id is 0 or repeats, or a server id is 0.
    pub fn from_entries(entries: Vec<(u16, u64)>) -> Option<Inflight> {
        let mut pids: Vec<u16> = entries.iter().map(|&(p, _)| p).collect();
        pids.sort_unstable();
        let unique = pids.windows(2).all(|w| w[0] != w[1]);
        let valid = entries.iter().all(|&(p, s)| p != 0 && s != 0);
        (unique && valid).then_some(Inflight(entries))
    }

    /// Picks a packet id for `server_id`: the one it already has when it
    /// is in flight (sent again after a live upgrade: the same id, DUP
    /// set; true), else the one after the newest in flight, skipping 0 and
    /// ids still in flight.
    fn add(&mut self, server_id: u64) -> (u16, bool) {
        if let Some(&(pid, _)) = self.0.iter().find(|&&(_, s)| s == server_id) {
            return (pid, true);
        }
        let mut pid = self.0.last().map_or(1, |&(p, _)| p.wrapping_add(1));
        // Bounded: fewer entries than ids (the window is below 65535).
        while pid == 0 || self.0.iter().any(|&(p, _)| p == pid) {
            pid = pid.wrapping_add(1);
        }
        self.0.push((pid, server_id));
        (pid, false)
    }

    /// The server id sent under `pid`, if it is in flight (taken out).
    fn take(&mut self, pid: u16) -> Option<u64> {
        let at = self.0.iter().position(|&(p, _)| p == pid)?;
        Some(self.0.remove(at).1)
    }
}

/// What the caller does after a packet or a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Go on.
    Next,
    /// The inbox was subscribed: deliveries may flow now.
    Resume,
    /// The inbox was unsubscribed: no new deliveries.
    Pause,
    /// Write what was written, then close the connection.
    Close,
}

/// What the mapping needs from the server.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// The logged-in user (0 before the LOGIN is taken).
    pub user: u64,
    /// The user's device (for an assigned client identifier).
    pub device: u32,
    /// `body_bytes_max`: the largest PUBLISH payload.
    pub body_bytes_max: usize,
    /// `frame_bytes_max`: the largest packet (5.0 Maximum Packet Size).
    pub packet_bytes_max: usize,
    /// `idle_timeout_ms`: the silence allowed with keepalive 0.
    pub idle_timeout_ms: u64,
}

/// The user of the canonical inbox topic `u/<id>` (id not 0).
pub fn inbox_user(topic: &str) -> Option<u64> {
    let digits = topic.strip_prefix("u/")?;
    canonical_u64(digits)
}

fn canonical_u64(s: &str) -> Option<u64> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    ok.then(|| s.parse().ok()).flatten()
}

/// The user a Tern token names (`v1.<user>.…` or `v2.<user>.…`), read
/// without verifying it: the LOGIN verifies.
fn token_user(token: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(token).ok()?;
    let mut parts = s.split('.');
    match parts.next()? {
        "v1" | "v2" => canonical_u64(parts.next()?),
        _ => None,
    }
}

fn put_frame(frame: &Frame<'_>, tern: &mut Vec<u8>) {
    proto::encode(frame, tern);
}

fn put(packet: &Packet<'_>, version: Version, out: &mut Vec<u8>) {
    codec::encode(packet, version, out);
}

/// 5.0: DISCONNECT with `code` and a reason string; 3.1.1: nothing (the
/// close says it).
pub fn disconnect(version: Option<Version>, code: u8, why: &str, out: &mut Vec<u8>) {
    if version == Some(Version::V5) {
        let mut p = PropsBuf::default();
        p.str(prop::REASON_STRING, why);
        let d = Disconnect {
            code,
            props: p.props(),
        };
        put(&Packet::Disconnect(d), Version::V5, out);
    }
}

/// The answer to a packet the codec refused: 5.0 DISCONNECT after the
/// CONNECT, CONNACK 0x01 for a protocol level not spoken; the caller
/// closes after it.
pub fn refused(mode: Mode, error: codec::Error, out: &mut Vec<u8>) {
    match error {
        codec::Error::BadLevel(_) if mode.version().is_none() => {
            let ack = ConnAck {
                session_present: false,
                code: connack311::BAD_VERSION,
                props: Props::default(),
            };
            put(&Packet::ConnAck(ack), Version::V311, out);
        }
        _ => disconnect(mode.version(), error.reason(), &error.to_string(), out),
    }
}

fn connack_refusal(version: Version, code311: u8, code5: u8, why: &str, out: &mut Vec<u8>) {
    let mut p = PropsBuf::default();
    let code = match version {
        Version::V311 => code311,
        Version::V5 => {
            p.str(prop::REASON_STRING, why);
            code5
        }
    };
    let ack = ConnAck {
        session_present: false,
        code,
        props: p.props(),
    };
    put(&Packet::ConnAck(ack), version, out);
}

/// A packet from the client. Tern frames for the session layer go to
/// `tern`, direct answers (SUBACK, UNSUBACK, refusals) to `out`.
pub fn on_packet(
    mode: &mut Mode,
    inflight: &mut Inflight,
    packet: Packet<'_>,
    ctx: &Ctx,
    tern: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Step {
    let Some(v) = mode.version() else {
        return match packet {
            Packet::Connect(c) => on_connect(mode, c, ctx, tern, out),
            _ => Step::Close, // MQTT-3.1.0-1: the first packet is CONNECT
        };
    };
    match packet {
        Packet::Connect(_) => {
            disconnect(Some(v), reason::PROTOCOL_ERROR, "second CONNECT", out);
            Step::Close
        }
        Packet::Publish(p) => on_publish(v, p, ctx, tern, out),
        Packet::PubAck(a) => {
            // A PUBACK for nothing in flight (a repeat) is ignored.
            if let Some(server_id) = inflight.take(a.pid) {
                put_frame(&Frame::Delivered { server_id }, tern);
            }
            Step::Next
        }
        Packet::Subscribe(s) => {
            let mut codes = [0u8; codec::FILTERS_MAX];
            let mut n = 0;
            let mut step = Step::Next;
            for (filter, _options) in s.filters.iter() {
                codes[n] = if inbox_user(filter) == Some(ctx.user) {
                    mode.flags |= flag::INBOX;
                    step = Step::Resume;
                    reason::GRANTED_QOS1
                } else if filter.strip_suffix("/receipts").and_then(inbox_user) == Some(ctx.user) {
                    mode.flags |= flag::RECEIPTS;
                    reason::SUCCESS
                } else if v == Version::V5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::UNSPECIFIED
                };
                n += 1;
            }
            let ack = Ack {
                pid: s.pid,
                props: Props::default(),
                codes: &codes[..n],
            };
            put(&Packet::SubAck(ack), v, out);
            step
        }
        Packet::Unsubscribe(u) => {
            let mut codes = [0u8; codec::FILTERS_MAX];
            let mut n = 0;
            let mut step = Step::Next;
            for (filter, _) in u.filters.iter() {
                let bit = if inbox_user(filter) == Some(ctx.user) {
                    flag::INBOX
                } else if filter.strip_suffix("/receipts").and_then(inbox_user) == Some(ctx.user) {
                    flag::RECEIPTS
                } else {
                    0
                };
                codes[n] = if mode.flags & bit != 0 {
                    reason::SUCCESS
                } else {
                    reason::NO_SUBSCRIPTION
                };
                if bit == flag::INBOX && mode.inbox() {
                    step = Step::Pause;
                }
                mode.flags &= !bit;
                n += 1;
            }
            let ack = Ack {
                pid: u.pid,
                props: Props::default(),
                codes: &codes[..n],
            };
            put(&Packet::UnsubAck(ack), v, out);
            step
        }
        Packet::PingReq => {
            put_frame(&Frame::Ping { nonce: 0 }, tern);
            Step::Next
        }
        Packet::Disconnect(_) => Step::Close,
        other @ (Packet::ConnAck(_)
        | Packet::SubAck(_)
        | Packet::UnsubAck(_)
        | Packet::PingResp) => {
            let why = format!("{} from a client", other.name());
            disconnect(Some(v), reason::PROTOCOL_ERROR, &why, out);
            Step::Close
        }
    }
}

fn on_connect(
    mode: &mut Mode,
    c: Connect<'_>,
    ctx: &Ctx,
    tern: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Step {
    let v = c.version;
    if v == Version::V311 && c.client_id.is_empty() && !c.clean {
        connack_refusal(
            v,
            connack311::ID_REJECTED,
            reason::CLIENT_ID_INVALID,
            "empty client identifier",
            out,
        );
        return Step::Close;
    }
    if v == Version::V5 && c.props.has(prop::AUTHENTICATION_METHOD) {
        connack_refusal(
            v,
            connack311::NOT_AUTHORIZED,
            reason::BAD_AUTH_METHOD,
            "no enhanced authentication",
            out,
        );
        return Step::Close;
    }
    let Some(token) = c.password else {
        connack_refusal(
            v,
            connack311::BAD_LOGIN,
            reason::BAD_LOGIN,
            "the password is a Tern token",
            out,
        );
        return Step::Close;
    };
    if let Some(name) = c.username {
        if canonical_u64(name).is_none_or(|u| token_user(token) != Some(u)) {
            let why = "the user name is not the token's user";
            connack_refusal(v, connack311::BAD_LOGIN, reason::BAD_LOGIN, why, out);
            return Step::Close;
        }
    }
    let persistent = match v {
        Version::V311 => !c.clean,
        Version::V5 => !c.clean && c.props.int(prop::SESSION_EXPIRY).unwrap_or(0) > 0,
    };
    let mut flags = flag::MQTT | flag::CONNECTED;
    if v == Version::V5 {
        flags |= flag::V5;
    }
    if persistent {
        flags |= flag::PERSISTENT | flag::INBOX;
    }
    if c.client_id.is_empty() {
        flags |= flag::EMPTY_ID;
    }
    let mut keepalive_s = c.keepalive_s;
    let too_long = u64::from(keepalive_s) * 1500 > ctx.idle_timeout_ms;
    if v == Version::V5 && (keepalive_s == 0 || too_long) {
        flags |= flag::SERVER_KEEPALIVE;
        keepalive_s = u16::try_from(ctx.idle_timeout_ms / 1500)
            .unwrap_or(u16::MAX)
            .max(1);
    }
    let receive_max = c
        .props
        .int(prop::RECEIVE_MAXIMUM)
        .map_or(0, |n| u16::try_from(n).unwrap_or(u16::MAX));
    *mode = Mode {
        flags,
        keepalive_s,
        receive_max,
    };
    put_frame(&Frame::Login { version: 1, token }, tern);
    Step::Next
}

fn on_publish(
    v: Version,
    p: Publish<'_>,
    ctx: &Ctx,
    tern: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Step {
    if p.props.has(prop::TOPIC_ALIAS) {
        disconnect(
            Some(v),
            reason::TOPIC_ALIAS_INVALID,
            "topic aliases are not used",
            out,
        );
        return Step::Close;
    }
    if p.payload.len() > ctx.body_bytes_max {
        disconnect(
            Some(v),
            reason::PACKET_TOO_LARGE,
            "payload over body_bytes_max",
            out,
        );
        return Step::Close;
    }
    let to = inbox_user(p.topic).filter(|&to| to != ctx.user);
    let Some(to) = to else {
        if v == Version::V311 {
            return Step::Close; // MQTT-3.3.5-2: no negative PUBACK in 3.1.1
        }
        if p.qos == 1 {
            let own = inbox_user(p.topic).is_some()
                || p.topic
                    .strip_suffix("/receipts")
                    .and_then(inbox_user)
                    .is_some();
            let code = if own {
                reason::NOT_AUTHORIZED
            } else {
                reason::TOPIC_INVALID
            };
            let mut props = PropsBuf::default();
            props.str(prop::REASON_STRING, "publish only to u/<other user>");
            let ack = PubAck {
                pid: p.pid,
                code,
                props: props.props(),
            };
            put(&Packet::PubAck(ack), v, out);
        }
        return Step::Next;
    };
    put_frame(
        &Frame::Send {
            client_id: u64::from(p.pid),
            to,
            body: p.payload,
        },
        tern,
    );
    Step::Next
}

/// The 5.0 DISCONNECT reason for a BYE.
fn bye_reason(r: ByeReason) -> u8 {
    match r {
        ByeReason::Shutdown => reason::SHUTTING_DOWN,
        ByeReason::Replaced => reason::TAKEN_OVER,
        ByeReason::Slow => reason::QUOTA_EXCEEDED,
        ByeReason::Idle => reason::KEEPALIVE_TIMEOUT,
        ByeReason::RateLimited => reason::RATE_TOO_HIGH,
        ByeReason::Moved | ByeReason::Moving | ByeReason::Upgrade => reason::USE_ANOTHER_SERVER,
        ByeReason::Kicked | ByeReason::DeviceRemoved => reason::ADMINISTRATIVE,
        _ => reason::PROTOCOL_ERROR,
    }
}

/// Whether the session layer closes the connection after this ERROR.
fn fatal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Malformed
            | ErrorCode::UnknownType
            | ErrorCode::TooLarge
            | ErrorCode::NotLoggedIn
            | ErrorCode::AlreadyLoggedIn
            | ErrorCode::BadState
    )
}

/// A frame the session layer wrote to the connection, as MQTT packets in
/// `out`.
pub fn on_frame(
    mode: Mode,
    inflight: &mut Inflight,
    frame: &Frame<'_>,
    ctx: &Ctx,
    out: &mut Vec<u8>,
) -> Step {
    let Some(v) = mode.version() else {
        return Step::Next; // ERROR before CONNECT (admission): the close says it
    };
    match *frame {
        Frame::LoginOk { .. } => {
            let mut p = PropsBuf::default();
            if v == Version::V5 {
                p.byte(prop::MAXIMUM_QOS, 1)
                    .byte(prop::RETAIN_AVAILABLE, 0)
                    .byte(prop::WILDCARD_AVAILABLE, 0)
                    .byte(prop::SUB_ID_AVAILABLE, 0)
                    .byte(prop::SHARED_AVAILABLE, 0)
                    .u32(
                        prop::MAXIMUM_PACKET_SIZE,
                        u32::try_from(ctx.packet_bytes_max).unwrap_or(u32::MAX),
                    );
                if mode.has(flag::SERVER_KEEPALIVE) {
                    p.u16(prop::SERVER_KEEP_ALIVE, mode.keepalive_s);
                }
                if mode.has(flag::EMPTY_ID) {
                    let id = format!("tern-{}-{}", ctx.user, ctx.device);
                    p.str(prop::ASSIGNED_CLIENT_ID, &id);
                }
            }
            let ack = ConnAck {
                session_present: mode.has(flag::PERSISTENT),
                code: 0,
                props: p.props(),
            };
            put(&Packet::ConnAck(ack), v, out);
            Step::Next
        }
        Frame::LoginErr { code, text } => {
            let (c311, c5) = match code {
                ErrorCode::BadToken | ErrorCode::TokenExpired => {
                    (connack311::BAD_LOGIN, reason::BAD_LOGIN)
                }
                ErrorCode::Banned => (connack311::NOT_AUTHORIZED, reason::BANNED),
                ErrorCode::ServerFull | ErrorCode::TooManyDevices => {
                    (connack311::UNAVAILABLE, reason::SERVER_BUSY)
                }
                ErrorCode::RateLimited => (connack311::UNAVAILABLE, reason::CONNECTION_RATE),
                _ => (connack311::UNAVAILABLE, reason::SERVER_UNAVAILABLE),
            };
            connack_refusal(v, c311, c5, text, out);
            Step::Next
        }
        Frame::Ack {
            client_id,
            server_id,
            ..
        } => {
            // client_id 0: a QoS 0 PUBLISH, which gets no answer.
            if let Ok(pid @ 1..) = u16::try_from(client_id) {
                let mut p = PropsBuf::default();
                if v == Version::V5 {
                    p.user("server_id", &server_id.to_string());
                }
                let ack = PubAck {
                    pid,
                    code: 0,
                    props: p.props(),
                };
                put(&Packet::PubAck(ack), v, out);
            }
            Step::Next
        }
        Frame::Error {
            code,
            client_id,
            text,
        } => {
            if fatal(code) {
                let c = match code {
                    ErrorCode::Malformed => reason::MALFORMED,
                    ErrorCode::TooLarge => reason::PACKET_TOO_LARGE,
                    _ => reason::PROTOCOL_ERROR,
                };
                disconnect(Some(v), c, text, out);
                return Step::Next;
            }
            let Ok(pid @ 1..) = u16::try_from(client_id) else {
                return Step::Next; // a QoS 0 PUBLISH, a PUBACK or PINGREQ refused: dropped
            };
            if v == Version::V311 {
                return Step::Close; // no negative PUBACK: the client resends on reconnect
            }
            let c = match code {
                ErrorCode::QueueFull | ErrorCode::StorageFull | ErrorCode::RateLimited => {
                    reason::QUOTA_EXCEEDED
                }
                ErrorCode::BadRecipient => reason::TOPIC_INVALID,
                _ => reason::UNSPECIFIED,
            };
            let mut p = PropsBuf::default();
            p.str(prop::REASON_STRING, code.as_str());
            let ack = PubAck {
                pid,
                code: c,
                props: p.props(),
            };
            put(&Packet::PubAck(ack), v, out);
            Step::Next
        }
        Frame::Deliver {
            server_id,
            from,
            server_time_ms,
            body,
            ..
        } => {
            let (pid, dup) = inflight.add(server_id);
            let mut p = PropsBuf::default();
            if v == Version::V5 {
                p.user("from", &from.to_string())
                    .user("server_id", &server_id.to_string())
                    .user("time_ms", &server_time_ms.to_string());
            }
            let topic = format!("u/{}", ctx.user);
            let publish = Publish {
                dup,
                qos: 1,
                retain: false,
                topic: &topic,
                pid,
                props: p.props(),
                payload: body,
            };
            put(&Packet::Publish(publish), v, out);
            Step::Next
        }
        Frame::Receipt {
            kind,
            server_id,
            peer,
        } => {
            if mode.has(flag::RECEIPTS) {
                let word = match kind {
                    ReceiptKind::Delivered => "delivered",
                    ReceiptKind::Read => "read",
                };
                let topic = format!("u/{}/receipts", ctx.user);
                let payload = format!("{word} {server_id} {peer}");
                let publish = Publish {
                    dup: false,
                    qos: 0,
                    retain: false,
                    topic: &topic,
                    pid: 0,
                    props: Props::default(),
                    payload: payload.as_bytes(),
                };
                put(&Packet::Publish(publish), v, out);
            }
            Step::Next
        }
        Frame::Pong { .. } => {
            put(&Packet::PingResp, v, out);
            Step::Next
        }
        Frame::Bye { reason } => {
            disconnect(Some(v), bye_reason(reason), reason.as_str(), out);
            Step::Next
        }
        // Version 2 frames (presence, SENT, REDIRECT, ...) never go to a
        // version 1 session; PING from the server is not sent.
        _ => Step::Next,
    }
}

#[cfg(test)]
mod tests;
