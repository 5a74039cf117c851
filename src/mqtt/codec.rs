//! The MQTT 3.1.1 / 5.0 packet codec: the subset docs/MQTT.md maps onto
//! Tern (CONNECT, CONNACK, PUBLISH QoS 0 and 1, PUBACK, SUBSCRIBE, SUBACK,
//! UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT), both directions.
//!
//! Pure and zero-copy: a decoded [`Packet`] borrows the input. `Ok(None)`
//! (incomplete) is kept apart from [`Error`] (the packet is refused), and
//! the remaining length is checked against the limit before anything else,
//! as soon as its first bytes allow. MQTT 5 properties stay as their
//! encoded bytes ([`Props`]), validated at decode: every property known,
//! allowed in its packet, well formed, not repeated (user properties
//! excepted).

use std::fmt;

/// The protocol level a connection speaks, from its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Version {
    /// The CONNECT's protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// Largest remaining length the encoding can carry (4 bytes of varint).
pub const REMAINING_BYTES_MAX: usize = 268_435_455;
/// Longest topic name or filter taken, bytes (`u/<u64>/receipts` is 30).
pub const TOPIC_BYTES_MAX: usize = 64;
/// Most filters in one SUBSCRIBE or UNSUBSCRIBE.
pub const FILTERS_MAX: usize = 8;
/// Longest client identifier taken, bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 256;

/// Why a packet was refused; each maps to the 5.0 reason code a server
/// sends in its DISCONNECT ([`Error::reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The packet breaks its layout.
    Malformed(&'static str),
    /// A well-formed packet this side may not send or this server does not
    /// speak (PUBREC, PUBREL, PUBCOMP, AUTH, reserved types).
    Protocol(&'static str),
    /// The remaining length is over the limit.
    TooLarge,
    /// A PUBLISH with QoS 2.
    QosNotSupported,
    /// A CONNECT with a protocol level other than 4 or 5 (answered CONNACK
    /// 0x01 in the 3.1.1 layout).
    BadLevel(u8),
    /// A CONNECT whose protocol name is not `MQTT` (closed unanswered).
    BadProtocolName,
}

impl Error {
    /// The MQTT 5 DISCONNECT reason code for this error.
    pub fn reason(self) -> u8 {
        match self {
            Error::Malformed(_) | Error::BadLevel(_) | Error::BadProtocolName => reason::MALFORMED,
            Error::Protocol(_) => reason::PROTOCOL_ERROR,
            Error::TooLarge => reason::PACKET_TOO_LARGE,
            Error::QosNotSupported => reason::QOS_NOT_SUPPORTED,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Malformed(why) => write!(f, "malformed packet: {why}"),
            Error::Protocol(why) => write!(f, "protocol error: {why}"),
            Error::TooLarge => f.write_str("packet too large"),
            Error::QosNotSupported => f.write_str("QoS 2 is not supported"),
            Error::BadLevel(l) => write!(f, "protocol level {l} is not 4 or 5"),
            Error::BadProtocolName => f.write_str("protocol name is not MQTT"),
        }
    }
}

/// MQTT 5 reason codes used here (and the 3.1.1 CONNACK return codes).
pub mod reason {
    /// Success / granted QoS 0 / normal disconnection.
    pub const SUCCESS: u8 = 0x00;
    /// SUBACK: granted QoS 1.
    pub const GRANTED_QOS1: u8 = 0x01;
    /// UNSUBACK: no subscription existed.
    pub const NO_SUBSCRIPTION: u8 = 0x11;
    /// Unspecified error (3.1.1 SUBACK failure has the same value).
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Unsupported protocol version (5.0 CONNACK).
    pub const UNSUPPORTED_VERSION: u8 = 0x84;
    /// Client identifier not valid (5.0 CONNACK).
    pub const CLIENT_ID_INVALID: u8 = 0x85;
    /// Bad user name or password.
    pub const BAD_LOGIN: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// Banned.
    pub const BANNED: u8 = 0x8A;
    /// Server shutting down.
    pub const SHUTTING_DOWN: u8 = 0x8B;
    /// Keep alive timeout.
    pub const KEEPALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over.
    pub const TAKEN_OVER: u8 = 0x8E;
    /// Bad authentication method (5.0 CONNACK).
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    /// Topic name invalid.
    pub const TOPIC_INVALID: u8 = 0x90;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Message rate too high.
    pub const RATE_TOO_HIGH: u8 = 0x96;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Administrative action.
    pub const ADMINISTRATIVE: u8 = 0x98;
    /// QoS not supported.
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    /// Use another server.
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    /// Connection rate exceeded.
    pub const CONNECTION_RATE: u8 = 0x9F;
}

/// 3.1.1 CONNACK return codes.
pub mod connack311 {
    /// Connection accepted.
    pub const ACCEPTED: u8 = 0x00;
    /// Unacceptable protocol version.
    pub const BAD_VERSION: u8 = 0x01;
    /// Identifier rejected.
    pub const ID_REJECTED: u8 = 0x02;
    /// Server unavailable.
    pub const UNAVAILABLE: u8 = 0x03;
    /// Bad user name or password.
    pub const BAD_LOGIN: u8 = 0x04;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// MQTT 5 property identifiers used here.
pub mod prop {
    /// Session Expiry Interval, u32 seconds.
    pub const SESSION_EXPIRY: u8 = 0x11;
    /// Assigned Client Identifier, string.
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    /// Server Keep Alive, u16 seconds.
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    /// Authentication Method, string.
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    /// Reason String, string.
    pub const REASON_STRING: u8 = 0x1F;
    /// Receive Maximum, u16.
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    /// Topic Alias Maximum, u16.
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    /// Topic Alias, u16.
    pub const TOPIC_ALIAS: u8 = 0x23;
    /// Maximum QoS, byte.
    pub const MAXIMUM_QOS: u8 = 0x24;
    /// Retain Available, byte.
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    /// User Property, string pair.
    pub const USER_PROPERTY: u8 = 0x26;
    /// Maximum Packet Size, u32.
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    /// Wildcard Subscription Available, byte.
    pub const WILDCARD_AVAILABLE: u8 = 0x28;
    /// Subscription Identifier Available, byte.
    pub const SUB_ID_AVAILABLE: u8 = 0x29;
    /// Shared Subscription Available, byte.
    pub const SHARED_AVAILABLE: u8 = 0x2A;
}

/// Packet kinds, for which properties each may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubAck,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PropType {
    Byte,
    U16,
    U32,
    Varint,
    Str,
    Bin,
    Pair,
}

/// A property's type and the packets that may carry it (MQTT 5 §2.2.2.2).
fn prop_spec(id: u8) -> Option<(PropType, &'static [Kind])> {
    use Kind::*;
    use PropType::*;
    Some(match id {
        0x01 => (Byte, &[Publish, Will]),
        0x02 => (U32, &[Publish, Will]),
        0x03 | 0x08 => (Str, &[Publish, Will]),
        0x09 => (Bin, &[Publish, Will]),
        0x0B => (Varint, &[Publish, Subscribe]),
        0x11 => (U32, &[Connect, ConnAck, Disconnect]),
        0x12 | 0x1A => (Str, &[ConnAck]),
        0x13 => (U16, &[ConnAck]),
        0x15 => (Str, &[Connect, ConnAck]),
        0x16 => (Bin, &[Connect, ConnAck]),
        0x17 | 0x19 => (Byte, &[Connect]),
        0x18 => (U32, &[Will]),
        0x1C => (Str, &[ConnAck, Disconnect]),
        0x1F => (Str, &[ConnAck, PubAck, SubAck, UnsubAck, Disconnect]),
        0x21 | 0x22 => (U16, &[Connect, ConnAck]),
        0x23 => (U16, &[Publish]),
        0x24 | 0x25 | 0x28 | 0x29 | 0x2A => (Byte, &[ConnAck]),
        0x26 => (
            Pair,
            &[
                Connect,
                Will,
                ConnAck,
                Publish,
                PubAck,
                Subscribe,
                SubAck,
                Unsubscribe,
                UnsubAck,
                Disconnect,
            ],
        ),
        0x27 => (U32, &[Connect, ConnAck]),
        _ => return None,
    })
}

/// MQTT 5 properties of a packet, as their encoded bytes (without the
/// length). Empty for 3.1.1 packets. Validated when decoded; built with
/// [`PropsBuf`] to encode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Props<'a>(pub &'a [u8]);

/// One decoded property value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropValue<'a> {
    /// A byte, two- or four-byte integer, or variable byte integer.
    Int(u32),
    /// A UTF-8 string.
    Str(&'a str),
    /// Binary data.
    Bin(&'a [u8]),
    /// A user property (name, value).
    Pair(&'a str, &'a str),
}

impl<'a> Props<'a> {
    /// Every property in order. Only call on validated properties (decoded
    /// or built): a broken one ends the walk.
    pub fn iter(&self) -> impl Iterator<Item = (u8, PropValue<'a>)> + 'a {
        let mut r = Reader { buf: self.0, at: 0 };
        std::iter::from_fn(move || {
            if r.at >= r.buf.len() {
                return None;
            }
            read_prop(&mut r).ok()
        })
    }

    /// The integer property `id`, if present.
    pub fn int(&self, id: u8) -> Option<u32> {
        self.iter().find_map(|(i, v)| match v {
            PropValue::Int(n) if i == id => Some(n),
            _ => None,
        })
    }

    /// The string property `id`, if present.
    pub fn str(&self, id: u8) -> Option<&'a str> {
        self.iter().find_map(|(i, v)| match v {
            PropValue::Str(s) if i == id => Some(s),
            _ => None,
        })
    }

    /// The value of the first user property named `name`.
    pub fn user(&self, name: &str) -> Option<&'a str> {
        self.iter().find_map(|(_, v)| match v {
            PropValue::Pair(k, v) if k == name => Some(v),
            _ => None,
        })
    }

    /// Whether property `id` is present.
    pub fn has(&self, id: u8) -> bool {
        self.iter().any(|(i, _)| i == id)
    }
}

/// Builds MQTT 5 properties to encode.
#[derive(Debug, Default)]
pub struct PropsBuf(pub Vec<u8>);

impl PropsBuf {
    /// A byte property.
    pub fn byte(&mut self, id: u8, v: u8) -> &mut Self {
        self.0.extend_from_slice(&[id, v]);
        self
    }
    /// A two-byte integer property.
    pub fn u16(&mut self, id: u8, v: u16) -> &mut Self {
        self.0.push(id);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A four-byte integer property.
    pub fn u32(&mut self, id: u8, v: u32) -> &mut Self {
        self.0.push(id);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A string property.
    pub fn str(&mut self, id: u8, v: &str) -> &mut Self {
        self.0.push(id);
        put_str(&mut self.0, v);
        self
    }
    /// A user property.
    pub fn user(&mut self, name: &str, value: &str) -> &mut Self {
        self.0.push(prop::USER_PROPERTY);
        put_str(&mut self.0, name);
        put_str(&mut self.0, value);
        self
    }
    /// The properties built so far.
    pub fn props(&self) -> Props<'_> {
        Props(&self.0)
    }
}

/// A CONNECT's will (accepted, never published).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Will<'a> {
    /// Will properties (5.0).
    pub props: Props<'a>,
    /// Will topic.
    pub topic: &'a str,
    /// Will payload.
    pub payload: &'a [u8],
    /// Will QoS, 0..=2.
    pub qos: u8,
    /// Will retain flag.
    pub retain: bool,
}

/// CONNECT (client to server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect<'a> {
    /// The protocol level asked for.
    pub version: Version,
    /// Clean session (3.1.1) / clean start (5.0).
    pub clean: bool,
    /// Keepalive, seconds; 0 = none.
    pub keepalive_s: u16,
    /// Properties (5.0).
    pub props: Props<'a>,
    /// Client identifier, possibly empty.
    pub client_id: &'a str,
    /// The will, if any.
    pub will: Option<Will<'a>>,
    /// User name.
    pub username: Option<&'a str>,
    /// Password.
    pub password: Option<&'a [u8]>,
}

/// CONNACK (server to client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnAck<'a> {
    /// Session present flag.
    pub session_present: bool,
    /// Return code (3.1.1) or reason code (5.0).
    pub code: u8,
    /// Properties (5.0).
    pub props: Props<'a>,
}

/// PUBLISH (both ways), QoS 0 or 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    /// DUP flag (a retransmission).
    pub dup: bool,
    /// 0 or 1.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name.
    pub topic: &'a str,
    /// Packet identifier, 0 for QoS 0.
    pub pid: u16,
    /// Properties (5.0).
    pub props: Props<'a>,
    /// Application message.
    pub payload: &'a [u8],
}

/// PUBACK (both ways).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PubAck<'a> {
    /// Packet identifier.
    pub pid: u16,
    /// Reason code (5.0; 0 in 3.1.1).
    pub code: u8,
    /// Properties (5.0).
    pub props: Props<'a>,
}

/// Topic filters of a SUBSCRIBE (with their options byte) or UNSUBSCRIBE,
/// as their validated encoded bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filters<'a> {
    raw: &'a [u8],
    with_options: bool,
}

impl<'a> Filters<'a> {
    /// Every (filter, options) pair; options are 0 for UNSUBSCRIBE.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, u8)> + 'a {
        let mut r = Reader {
            buf: self.raw,
            at: 0,
        };
        let with_options = self.with_options;
        std::iter::from_fn(move || {
            if r.at >= r.buf.len() {
                return None;
            }
            let f = r.str().ok()?;
            let o = if with_options { r.u8().ok()? } else { 0 };
            Some((f, o))
        })
    }

    /// Number of filters.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there is no filter (never, once decoded).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Encodes SUBSCRIBE filters (with options) or UNSUBSCRIBE ones.
    pub fn build(filters: &[(&str, u8)], with_options: bool, out: &'a mut Vec<u8>) -> Filters<'a> {
        out.clear();
        for (f, o) in filters {
            put_str(out, f);
            if with_options {
                out.push(*o);
            }
        }
        Filters {
            raw: out,
            with_options,
        }
    }
}

/// SUBSCRIBE (client to server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscribe<'a> {
    /// Packet identifier.
    pub pid: u16,
    /// Properties (5.0).
    pub props: Props<'a>,
    /// Filters with their subscription options (QoS in bits 0..2).
    pub filters: Filters<'a>,
}

/// SUBACK or UNSUBACK (server to client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack<'a> {
    /// Packet identifier.
    pub pid: u16,
    /// Properties (5.0).
    pub props: Props<'a>,
    /// One code per filter (a 3.1.1 UNSUBACK has none).
    pub codes: &'a [u8],
}

/// UNSUBSCRIBE (client to server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    /// Packet identifier.
    pub pid: u16,
    /// Properties (5.0).
    pub props: Props<'a>,
    /// Filters.
    pub filters: Filters<'a>,
}

/// DISCONNECT (both ways in 5.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disconnect<'a> {
    /// Reason code (5.0; 0 in 3.1.1).
    pub code: u8,
    /// Properties (5.0).
    pub props: Props<'a>,
}

/// One MQTT control packet of the subset Tern speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// CONNECT.
    Connect(Connect<'a>),
    /// CONNACK.
    ConnAck(ConnAck<'a>),
    /// PUBLISH.
    Publish(Publish<'a>),
    /// PUBACK.
    PubAck(PubAck<'a>),
    /// SUBSCRIBE.
    Subscribe(Subscribe<'a>),
    /// SUBACK.
    SubAck(Ack<'a>),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe<'a>),
    /// UNSUBACK.
    UnsubAck(Ack<'a>),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect(Disconnect<'a>),
}

impl Packet<'_> {
    /// The packet's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
        }
    }
}

// ---- decoding -----------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

const SHORT: Error = Error::Malformed("truncated field");

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.left() < n {
            return Err(SHORT);
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bin(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    /// A UTF-8 string: valid UTF-8 without U+0000 (MQTT-1.5.3-1, -2).
    fn str(&mut self) -> Result<&'a str, Error> {
        let b = self.bin()?;
        let s = std::str::from_utf8(b).map_err(|_| Error::Malformed("invalid UTF-8"))?;
        if s.contains('\0') {
            return Err(Error::Malformed("U+0000 in a string"));
        }
        Ok(s)
    }
    fn varint(&mut self) -> Result<u32, Error> {
        match read_varint(&self.buf[self.at..])? {
            Some((v, n)) => {
                self.at += n;
                Ok(v)
            }
            None => Err(SHORT),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.at..];
        self.at = self.buf.len();
        s
    }
}

/// A variable byte integer: `Ok(None)` when `buf` ends inside it.
fn read_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, Error> {
    let mut v: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        v |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(Error::Malformed("non-minimal variable byte integer"));
            }
            return Ok(Some((v, i + 1)));
        }
    }
    Err(Error::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

fn read_prop<'a>(r: &mut Reader<'a>) -> Result<(u8, PropValue<'a>), Error> {
    let id = r.u8()?;
    let Some((ty, _)) = prop_spec(id) else {
        return Err(Error::Malformed("unknown property"));
    };
    let v = match ty {
        PropType::Byte => PropValue::Int(r.u8()?.into()),
        PropType::U16 => PropValue::Int(r.u16()?.into()),
        PropType::U32 => PropValue::Int(r.u32()?),
        PropType::Varint => PropValue::Int(r.varint()?),
        PropType::Str => PropValue::Str(r.str()?),
        PropType::Bin => PropValue::Bin(r.bin()?),
        PropType::Pair => PropValue::Pair(r.str()?, r.str()?),
    };
    Ok((id, v))
}

/// Reads and validates the properties of a `kind` packet (5.0 only).
fn read_props<'a>(r: &mut Reader<'a>, version: Version, kind: Kind) -> Result<Props<'a>, Error> {
    if version == Version::V311 {
        return Ok(Props::default());
    }
    let len = r.varint()? as usize;
    let raw = r.take(len)?;
    let mut p = Reader { buf: raw, at: 0 };
    // Seen property ids, as a bitmap: ids are below 0x2B.
    let mut seen: u64 = 0;
    while p.left() > 0 {
        let (id, v) = read_prop(&mut p)?;
        let (_, kinds) = prop_spec(id).ok_or(Error::Malformed("unknown property"))?;
        if !kinds.contains(&kind) {
            return Err(Error::Malformed("property not allowed in this packet"));
        }
        let repeatable = id == prop::USER_PROPERTY || (id == 0x0B && kind == Kind::Publish);
        if seen & (1 << id) != 0 && !repeatable {
            return Err(Error::Malformed("property repeated"));
        }
        seen |= 1 << id;
        let bad_byte = |v| matches!(v, PropValue::Int(n) if n > 1);
        let bad = match id {
            0x01 | 0x17 | 0x19 | 0x25 | 0x24 | 0x28 | 0x29 | 0x2A => bad_byte(v),
            0x0B => v == PropValue::Int(0),
            0x21 | 0x27 => v == PropValue::Int(0),
            _ => false,
        };
        if bad {
            return Err(Error::Malformed("property value out of range"));
        }
    }
    Ok(Props(raw))
}

fn pid(r: &mut Reader<'_>) -> Result<u16, Error> {
    match r.u16()? {
        0 => Err(Error::Malformed("packet identifier 0")),
        id => Ok(id),
    }
}

/// Decodes one packet from the start of `buf`: `Ok(None)` while it is
/// incomplete, else the packet and the bytes it took. `version` is the
/// connection's (`None` before its CONNECT: then only the CONNECT's own
/// layout is known; other packets decode as 3.1.1 and the caller refuses
/// them). `remaining_bytes_max` bounds the remaining length; it is checked
/// before the packet's bytes arrive.
pub fn decode(
    buf: &[u8],
    version: Option<Version>,
    remaining_bytes_max: usize,
) -> Result<Option<(Packet<'_>, usize)>, Error> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let (len, n) = match read_varint(&buf[1..])? {
        Some((len, n)) => (len as usize, n),
        None => {
            // The smallest value the bytes so far can still end with.
            let partial = &buf[1..];
            let floor = partial
                .iter()
                .enumerate()
                .fold(0usize, |acc, (i, b)| acc | usize::from(b & 0x7F) << (7 * i))
                + (1usize << (7 * partial.len()));
            if !partial.is_empty() && floor > remaining_bytes_max {
                return Err(Error::TooLarge);
            }
            return Ok(None);
        }
    };
    if len > remaining_bytes_max {
        return Err(Error::TooLarge);
    }
    let head = 1 + n;
    if buf.len() < head + len {
        return Ok(None);
    }
    let body = &buf[head..head + len];
    let packet = decode_body(first, body, version)?;
    Ok(Some((packet, head + len)))
}

fn decode_body(first: u8, body: &[u8], version: Option<Version>) -> Result<Packet<'_>, Error> {
    let ty = first >> 4;
    let flags = first & 0x0F;
    let mut r = Reader { buf: body, at: 0 };
    let v = version.unwrap_or(Version::V311);
    let want_flags = match ty {
        3 => flags, // PUBLISH: checked below
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != want_flags {
        return Err(Error::Malformed("reserved fixed header flags"));
    }
    let packet = match ty {
        1 => Packet::Connect(connect(&mut r)?),
        2 => {
            let ack = r.u8()?;
            if ack & 0xFE != 0 {
                return Err(Error::Malformed("reserved CONNACK flags"));
            }
            let code = r.u8()?;
            let props = if v == Version::V5 {
                read_props(&mut r, v, Kind::ConnAck)?
            } else {
                Props::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack == 1,
                code,
                props,
            })
        }
        3 => {
            let qos = (flags >> 1) & 0b11;
            let dup = flags & 0b1000 != 0;
            match qos {
                3 => return Err(Error::Malformed("QoS 3")),
                2 => return Err(Error::QosNotSupported),
                0 if dup => return Err(Error::Malformed("DUP set on a QoS 0 PUBLISH")),
                _ => {}
            }
            let topic = r.str()?;
            if topic.len() > TOPIC_BYTES_MAX {
                return Err(Error::Malformed("topic name too long"));
            }
            if topic.contains(['+', '#']) {
                return Err(Error::Malformed("wildcard in a topic name"));
            }
            let pid = if qos > 0 { pid(&mut r)? } else { 0 };
            let props = read_props(&mut r, v, Kind::Publish)?;
            if topic.is_empty() {
                return Err(Error::Malformed("empty topic name"));
            }
            Packet::Publish(Publish {
                dup,
                qos,
                retain: flags & 1 != 0,
                topic,
                pid,
                props,
                payload: r.rest(),
            })
        }
        4 => {
            let pid = pid(&mut r)?;
            let (code, props) = if v == Version::V5 && r.left() > 0 {
                let code = r.u8()?;
                let props = if r.left() > 0 {
                    read_props(&mut r, v, Kind::PubAck)?
                } else {
                    Props::default()
                };
                (code, props)
            } else {
                (0, Props::default())
            };
            Packet::PubAck(PubAck { pid, code, props })
        }
        8 => {
            let pid = pid(&mut r)?;
            let props = read_props(&mut r, v, Kind::Subscribe)?;
            let filters = filters(&mut r, v, true)?;
            Packet::Subscribe(Subscribe {
                pid,
                props,
                filters,
            })
        }
        9 | 11 => {
            let pid = pid(&mut r)?;
            let kind = if ty == 9 {
                Kind::SubAck
            } else {
                Kind::UnsubAck
            };
            let props = read_props(&mut r, v, kind)?;
            // A 3.1.1 UNSUBACK is the packet id alone.
            let codes = if ty == 11 && v == Version::V311 {
                &[]
            } else {
                r.rest()
            };
            if ty == 9 && codes.is_empty() {
                return Err(Error::Malformed("SUBACK without codes"));
            }
            let ack = Ack { pid, props, codes };
            if ty == 9 {
                Packet::SubAck(ack)
            } else {
                Packet::UnsubAck(ack)
            }
        }
        10 => {
            let pid = pid(&mut r)?;
            let props = read_props(&mut r, v, Kind::Unsubscribe)?;
            let filters = filters(&mut r, v, false)?;
            Packet::Unsubscribe(Unsubscribe {
                pid,
                props,
                filters,
            })
        }
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => {
            let (code, props) = if v == Version::V5 && r.left() > 0 {
                let code = r.u8()?;
                let props = if r.left() > 0 {
                    read_props(&mut r, v, Kind::Disconnect)?
                } else {
                    Props::default()
                };
                (code, props)
            } else {
                (0, Props::default())
            };
            Packet::Disconnect(Disconnect { code, props })
        }
        5..=7 => return Err(Error::Protocol("QoS 2 packets are not supported")),
        15 => return Err(Error::Protocol("AUTH is not supported")),
        _ => return Err(Error::Malformed("reserved packet type")),
    };
    if r.left() > 0 {
        return Err(Error::Malformed("trailing bytes"));
    }
    Ok(packet)
}

fn filters<'a>(
    r: &mut Reader<'a>,
    version: Version,
    with_options: bool,
) -> Result<Filters<'a>, Error> {
    let raw = &r.buf[r.at..];
    let mut count = 0;
    while r.left() > 0 {
        let f = r.str()?;
        if f.is_empty() {
            return Err(Error::Malformed("empty topic filter"));
        }
        if f.len() > TOPIC_BYTES_MAX {
            return Err(Error::Malformed("topic filter too long"));
        }
        if with_options {
            let o = r.u8()?;
            let reserved = match version {
                Version::V311 => o & 0xFC != 0,
                Version::V5 => o & 0xC0 != 0 || (o >> 4) & 0b11 == 3,
            };
            if reserved || o & 0b11 == 3 {
                return Err(Error::Malformed("bad subscription options"));
            }
        }
        count += 1;
        if count > FILTERS_MAX {
            return Err(Error::Malformed("too many topic filters"));
        }
    }
    if count == 0 {
        return Err(Error::Malformed("no topic filter"));
    }
    Ok(Filters { raw, with_options })
}

fn connect<'a>(r: &mut Reader<'a>) -> Result<Connect<'a>, Error> {
    if r.bin()? != b"MQTT" {
        return Err(Error::BadProtocolName);
    }
    let version = match r.u8()? {
        4 => Version::V311,
        5 => Version::V5,
        other => return Err(Error::BadLevel(other)),
    };
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(Error::Malformed("reserved CONNECT flag"));
    }
    let will_flag = flags & 0b100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b10_0000 != 0;
    let has_password = flags & 0b100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(Error::Malformed("bad will flags"));
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(Error::Malformed("password without user name"));
    }
    let keepalive_s = r.u16()?;
    let props = read_props(r, version, Kind::Connect)?;
    let client_id = r.str()?;
    if client_id.len() > CLIENT_ID_BYTES_MAX {
        return Err(Error::Malformed("client identifier too long"));
    }
    let will = if will_flag {
        let props = read_props(r, version, Kind::Will)?;
        let topic = r.str()?;
        let payload = r.bin()?;
        Some(Will {
            props,
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username { Some(r.str()?) } else { None };
    let password = if has_password { Some(r.bin()?) } else { None };
    Ok(Connect {
        version,
        clean: flags & 0b10 != 0,
        keepalive_s,
        props,
        client_id,
        will,
        username,
        password,
    })
}

// ---- encoding -----------------------------------------------------------

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    debug_assert!(
        b.len() <= usize::from(u16::MAX),
        "string of {} bytes",
        b.len()
    );
    put_u16(out, b.len() as u16);
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

/// Appends `v` as a variable byte integer (at most 4 bytes).
pub fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    debug_assert!(v <= REMAINING_BYTES_MAX, "varint {v} over 4 bytes");
    loop {
        let b = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_props(out: &mut Vec<u8>, version: Version, props: Props<'_>) {
    if version == Version::V5 {
        put_varint(out, props.0.len());
        out.extend_from_slice(props.0);
    }
}

/// Appends `packet` in `version`'s layout to `out`. 3.1.1 drops what it
/// cannot carry (properties, PUBACK/DISCONNECT reason codes, UNSUBACK
/// codes).
pub fn encode(packet: &Packet<'_>, version: Version, out: &mut Vec<u8>) {
    let start = out.len();
    // Room for the fixed header's type byte and a 4-byte remaining length;
    // the body is moved down once its length is known.
    out.extend_from_slice(&[0; 5]);
    let first = match packet {
        Packet::Connect(c) => {
            put_str(out, "MQTT");
            out.push(c.version.level());
            let mut flags = 0u8;
            if c.clean {
                flags |= 0b10;
            }
            if let Some(w) = &c.will {
                flags |= 0b100 | (w.qos << 3);
                if w.retain {
                    flags |= 0b10_0000;
                }
            }
            if c.password.is_some() {
                flags |= 0b100_0000;
            }
            if c.username.is_some() {
                flags |= 0b1000_0000;
            }
            out.push(flags);
            put_u16(out, c.keepalive_s);
            put_props(out, c.version, c.props);
            put_str(out, c.client_id);
            if let Some(w) = &c.will {
                put_props(out, c.version, w.props);
                put_str(out, w.topic);
                put_bin(out, w.payload);
            }
            if let Some(u) = c.username {
                put_str(out, u);
            }
            if let Some(p) = c.password {
                put_bin(out, p);
            }
            0x10
        }
        Packet::ConnAck(a) => {
            out.push(u8::from(a.session_present));
            out.push(a.code);
            put_props(out, version, a.props);
            0x20
        }
        Packet::Publish(p) => {
            put_str(out, p.topic);
            if p.qos > 0 {
                put_u16(out, p.pid);
            }
            put_props(out, version, p.props);
            out.extend_from_slice(p.payload);
            0x30 | (u8::from(p.dup) << 3) | (p.qos << 1) | u8::from(p.retain)
        }
        Packet::PubAck(a) => {
            put_u16(out, a.pid);
            if version == Version::V5 && (a.code != 0 || !a.props.0.is_empty()) {
                out.push(a.code);
                if !a.props.0.is_empty() {
                    put_props(out, version, a.props);
                }
            }
            0x40
        }
        Packet::Subscribe(s) => {
            put_u16(out, s.pid);
            put_props(out, version, s.props);
            out.extend_from_slice(s.filters.raw);
            0x82
        }
        Packet::SubAck(a) => {
            put_u16(out, a.pid);
            put_props(out, version, a.props);
            out.extend_from_slice(a.codes);
            0x90
        }
        Packet::Unsubscribe(u) => {
            put_u16(out, u.pid);
            put_props(out, version, u.props);
            out.extend_from_slice(u.filters.raw);
            0xA2
        }
        Packet::UnsubAck(a) => {
            put_u16(out, a.pid);
            if version == Version::V5 {
                put_props(out, version, a.props);
                out.extend_from_slice(a.codes);
            }
            0xB0
        }
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(d) => {
            if version == Version::V5 && (d.code != 0 || !d.props.0.is_empty()) {
                out.push(d.code);
                if !d.props.0.is_empty() {
                    put_props(out, version, d.props);
                }
            }
            0xE0
        }
    };
    let mut body = out.len() - start - 5;
    debug_assert!(body <= REMAINING_BYTES_MAX, "packet of {body} bytes");
    let mut head = [first, 0, 0, 0, 0];
    let mut n = 1;
    loop {
        let b = (body & 0x7F) as u8;
        body >>= 7;
        head[n] = if body == 0 { b } else { b | 0x80 };
        n += 1;
        if body == 0 {
            break;
        }
    }
    out.copy_within(start + 5.., start + n);
    out.truncate(out.len() - (5 - n));
    out[start..start + n].copy_from_slice(&head[..n]);
}

#[cfg(test)]
mod tests;
