//! MQTT 3.1.1 over any [`Engine`] (`--protocol mqtt`): the driver keeps
//! speaking Tern frames, and this layer turns them into MQTT packets and
//! the broker's packets back into Tern frames, so every scenario, counter
//! and latency histogram works unchanged against Tern's MQTT listener or a
//! plain MQTT broker (mosquitto).
//!
//! The mapping (client side of docs/MQTT.md):
//!
//! | driver writes                 | on the wire                                   |
//! |-------------------------------|-----------------------------------------------|
//! | LOGIN(token)                  | CONNECT (clean session, keepalive, client id `tl-<user>`; [`Broker::Tern`]: user name = user id, password = token), then SUBSCRIBE `u/<user>` QoS 1 after the CONNACK |
//! | SEND(client id, to, body)     | PUBLISH QoS 1 to `u/<to>`, a packet id of this connection |
//! | DELIVERED(server id)          | PUBACK(server id), the packet id of the PUBLISH it answers |
//! | PING                          | PINGREQ                                       |
//!
//! | broker sends                  | driver reads                                  |
//! |-------------------------------|-----------------------------------------------|
//! | CONNACK refusal               | LOGIN_ERR (0x04 `bad_token`, 0x05 `banned`, else `unavailable`) |
//! | SUBACK                        | LOGIN_OK (offline count 0; 0x80: LOGIN_ERR `bad_state`) |
//! | PUBACK(packet id)             | ACK(the SEND's client id, server id 0)        |
//! | PUBLISH on `u/<me>`           | DELIVER(server id = packet id, from = the sender in the body) |
//! | PINGRESP                      | PONG                                          |
//!
//! MQTT 3.1.1 carries no sender, server id or receipt, so the sender is read
//! from the body the driver wrote (bytes 12..20, `driver::BODY_HEADER_BYTES`)
//! and no receipts are measured. A packet the broker sends that breaks the
//! 3.1.1 layout is [`Event::PeerClosed`] with `EPROTO`.
//!
//! Memory: one byte per slot; the user id only while the CONNECT and
//! SUBSCRIBE are answered, the packet ids of un-PUBACKed PUBLISHes and a
//! partial packet only while they exist (maps by slot, so idle connections
//! own nothing more).

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use tern::mqtt::codec::{
    self, Ack, ConnAck, Connect, Filters, Packet, Props, PubAck, Publish, Subscribe, Version,
};
use tern::proto::{self, ErrorCode, Frame, Limits};

use super::{Engine, EngineStats, Event};

/// Largest packet taken from the broker; a longer one breaks the connection.
const PACKET_BYTES_MAX: usize = 1 << 20;
/// The SUBSCRIBE's packet id (the only one a connection sends).
const SUBSCRIBE_PID: u16 = 1;
/// Where the sender's user id sits in a body the driver wrote.
const BODY_SENDER: std::ops::Range<usize> = 12..20;

/// Slot phases.
const P_IDLE: u8 = 0;
/// TCP connected, `Connected` reported; waiting for the driver's LOGIN.
const P_TCP: u8 = 1;
/// CONNECT sent, CONNACK not yet here.
const P_CONNECTING: u8 = 2;
/// SUBSCRIBE sent, SUBACK not yet here.
const P_SUBSCRIBING: u8 = 3;
/// Subscribed; `LOGIN_OK` reported.
const P_OPEN: u8 = 4;
/// Refused (LOGIN_ERR reported): the broker closes next.
const P_REFUSED: u8 = 5;
/// Broken (`PeerClosed` reported): nothing more is read or sent.
const P_DONE: u8 = 6;

/// Which broker is on the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    /// Tern's MQTT listener: user name = user id, password = login token.
    Tern,
    /// Any MQTT 3.1.1 broker with authentication off (mosquitto with
    /// `allow_anonymous true`): no user name or password in the CONNECT.
    /// The topics are the same (`u/<id>`), so the same load runs on both.
    Generic,
}

/// What every connection's CONNECT looks like.
#[derive(Clone, Copy, Debug)]
pub struct MqttSettings {
    /// Which broker (what the CONNECT carries).
    pub broker: Broker,
    /// CONNECT keepalive, seconds (0: none).
    pub keepalive_s: u16,
}

/// PUBLISHes a connection sent and the broker has not PUBACKed.
#[derive(Default)]
struct Outbox {
    /// The next packet id to try (never 0).
    next: u16,
    /// Packet id -> the SEND's client id.
    ids: HashMap<u16, u64>,
}

/// Wraps an engine with MQTT 3.1.1; see the module docs.
pub struct MqttEngine<E> {
    inner: E,
    settings: MqttSettings,
    phase: Vec<u8>,
    /// User ids of slots between LOGIN and SUBACK.
    user: HashMap<u32, u64>,
    /// Un-PUBACKed PUBLISHes by slot.
    outbox: HashMap<u32, Outbox>,
    /// Partial broker packets by slot.
    partial: HashMap<u32, Vec<u8>>,
    inner_events: Vec<Event>,
    inner_scratch: Vec<u8>,
    out: Vec<u8>,
    filters: Vec<u8>,
    /// Tern ERROR frames for SENDs refused here, reported at the next poll.
    refused: Vec<(u32, Vec<u8>)>,
}

/// The user id a Tern token names (`v1.<user>.…` or `v2.<user>.…`).
fn token_user(token: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(token).ok()?;
    let mut parts = s.split('.');
    match parts.next()? {
        "v1" | "v2" => parts.next()?.parse().ok(),
        _ => None,
    }
}

/// The Tern code a 3.1.1 CONNACK refusal stands for.
fn refusal(code: u8) -> ErrorCode {
    match code {
        codec::connack311::BAD_LOGIN => ErrorCode::BadToken,
        codec::connack311::NOT_AUTHORIZED => ErrorCode::Banned,
        _ => ErrorCode::Unavailable,
    }
}

impl<E: Engine> MqttEngine<E> {
    /// Wraps `inner` (slots `0..conns`).
    pub fn new(inner: E, conns: u32, settings: MqttSettings) -> Self {
        MqttEngine {
            inner,
            settings,
            phase: vec![P_IDLE; conns as usize],
            user: HashMap::new(),
            outbox: HashMap::new(),
            partial: HashMap::new(),
            inner_events: Vec::new(),
            inner_scratch: Vec::new(),
            out: Vec::new(),
            filters: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn forget(&mut self, l: u32) {
        self.phase[l as usize] = P_IDLE;
        self.user.remove(&l);
        self.outbox.remove(&l);
        self.partial.remove(&l);
    }

    fn put(&mut self, l: u32, packet: &Packet<'_>) {
        self.out.clear();
        codec::encode(packet, Version::V311, &mut self.out);
        self.inner.send(l, &self.out);
    }

    /// The driver's LOGIN on slot `l`: CONNECT.
    fn connect(&mut self, l: u32, token: &[u8]) {
        let Some(user) = token_user(token) else {
            // Not a token this layer can name a topic for: the driver's bug.
            debug_assert!(false, "LOGIN without a Tern token");
            return;
        };
        let client_id = format!("tl-{user}");
        let username = user.to_string();
        let tern = self.settings.broker == Broker::Tern;
        let packet = Packet::Connect(Connect {
            version: Version::V311,
            clean: true,
            keepalive_s: self.settings.keepalive_s,
            props: Props(&[]),
            client_id: &client_id,
            will: None,
            username: tern.then_some(username.as_str()),
            password: tern.then_some(token),
        });
        self.put(l, &packet);
        self.user.insert(l, user);
        self.phase[l as usize] = P_CONNECTING;
    }

    /// The driver's SEND on slot `l`: PUBLISH QoS 1 under a free packet id.
    fn publish(&mut self, l: u32, client_id: u64, to: u64, body: &[u8]) -> Result<(), ErrorCode> {
        let o = self.outbox.entry(l).or_default();
        if o.ids.len() >= usize::from(u16::MAX) {
            return Err(ErrorCode::QueueFull); // every packet id is in flight
        }
        let mut pid = o.next.max(1);
        while o.ids.contains_key(&pid) {
            pid = pid.checked_add(1).unwrap_or(1);
        }
        o.next = pid.checked_add(1).unwrap_or(1);
        o.ids.insert(pid, client_id);
        let topic = format!("u/{to}");
        self.put(
            l,
            &Packet::Publish(Publish {
                dup: false,
                qos: 1,
                retain: false,
                topic: &topic,
                pid,
                props: Props(&[]),
                payload: body,
            }),
        );
        Ok(())
    }

    /// One broker packet on slot `l`, as Tern frames appended to `scratch`.
    /// `false`: the packet is not one a broker sends here (a broken broker).
    fn on_packet(&mut self, l: u32, packet: Packet<'_>, scratch: &mut Vec<u8>) -> bool {
        let phase = self.phase[l as usize];
        match packet {
            Packet::ConnAck(ConnAck { code, .. }) if phase == P_CONNECTING => {
                if code != 0 {
                    self.phase[l as usize] = P_REFUSED;
                    let f = Frame::LoginErr {
                        code: refusal(code),
                        text: "CONNACK refusal",
                    };
                    proto::encode(&f, scratch);
                    return true;
                }
                let user = self.user.get(&l).copied().unwrap_or_default();
                let topic = format!("u/{user}");
                let mut raw = std::mem::take(&mut self.filters);
                let filters = Filters::build(&[(&topic, 1)], true, &mut raw);
                self.out.clear();
                codec::encode(
                    &Packet::Subscribe(Subscribe {
                        pid: SUBSCRIBE_PID,
                        props: Props(&[]),
                        filters,
                    }),
                    Version::V311,
                    &mut self.out,
                );
                self.filters = raw;
                self.inner.send(l, &self.out);
                self.phase[l as usize] = P_SUBSCRIBING;
                true
            }
            Packet::SubAck(Ack { pid, codes, .. })
                if phase == P_SUBSCRIBING && pid == SUBSCRIBE_PID =>
            {
                self.user.remove(&l);
                if codes.first().is_none_or(|&c| c >= 0x80) {
                    self.phase[l as usize] = P_REFUSED;
                    let f = Frame::LoginErr {
                        code: ErrorCode::BadState,
                        text: "SUBACK refusal",
                    };
                    proto::encode(&f, scratch);
                    return true;
                }
                self.phase[l as usize] = P_OPEN;
                let f = Frame::LoginOk {
                    server_time_ms: 0,
                    offline_count: 0,
                };
                proto::encode(&f, scratch);
                true
            }
            // A broker may deliver before the SUBACK (a persistent session).
            Packet::Publish(p) if phase == P_SUBSCRIBING || phase == P_OPEN => {
                let from = p
                    .payload
                    .get(BODY_SENDER)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                let f = Frame::Deliver {
                    server_id: u64::from(p.pid),
                    from,
                    server_time_ms: 0,
                    client_id: None,
                    body: p.payload,
                };
                proto::encode(&f, scratch);
                true
            }
            Packet::PubAck(PubAck { pid, .. }) if phase == P_OPEN => {
                let Some(o) = self.outbox.get_mut(&l) else {
                    return true; // not ours: ignored, as the broker would
                };
                if let Some(client_id) = o.ids.remove(&pid) {
                    if o.ids.is_empty() {
                        self.outbox.remove(&l);
                    }
                    let f = Frame::Ack {
                        client_id,
                        server_id: 0,
                        server_time_ms: 0,
                    };
                    proto::encode(&f, scratch);
                }
                true
            }
            Packet::PingResp => {
                proto::encode(&Frame::Pong { nonce: 0 }, scratch);
                true
            }
            _ => false,
        }
    }

    /// Broker bytes on slot `l`.
    fn on_bytes(&mut self, l: u32, data: &[u8], events: &mut Vec<Event>, scratch: &mut Vec<u8>) {
        let mut buf = self.partial.remove(&l).unwrap_or_default();
        let bytes: &[u8] = if buf.is_empty() {
            data
        } else {
            buf.extend_from_slice(data);
            &buf
        };
        let start = scratch.len();
        let mut at = 0;
        let mut broken = false;
        while at < bytes.len() {
            match codec::decode(&bytes[at..], Some(Version::V311), PACKET_BYTES_MAX) {
                Ok(Some((packet, used))) => {
                    at += used;
                    if !self.on_packet(l, packet, scratch) {
                        broken = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if scratch.len() > start {
            events.push(Event::Recv(l, start, scratch.len() - start));
        }
        if broken {
            self.phase[l as usize] = P_DONE;
            self.partial.remove(&l);
            events.push(Event::PeerClosed(l, libc::EPROTO));
        } else if at < bytes.len() {
            let rest = bytes[at..].to_vec();
            self.partial.insert(l, rest);
        }
    }
}

impl<E: Engine> Engine for MqttEngine<E> {
    fn open(&mut self, conn: u32, src: usize, dst: usize) -> io::Result<()> {
        self.inner.open(conn, src, dst)
    }

    fn send(&mut self, conn: u32, bytes: &[u8]) {
        let phase = self.phase[conn as usize];
        // The driver writes one whole Tern frame per call.
        let Ok(Some((frame, _))) = proto::decode(bytes, &Limits::default()) else {
            debug_assert!(false, "the driver wrote a partial or bad frame");
            return;
        };
        match frame {
            Frame::Login { token, .. } if phase == P_TCP => self.connect(conn, token),
            Frame::Send {
                client_id,
                to,
                body,
            } if phase == P_OPEN => {
                if let Err(code) = self.publish(conn, client_id, to, body) {
                    // Refused here: the driver reads it as the server's refusal.
                    self.out.clear();
                    let f = Frame::Error {
                        code,
                        client_id,
                        text: "every MQTT packet id in flight",
                    };
                    proto::encode(&f, &mut self.out);
                    self.refused.push((conn, self.out.clone()));
                }
            }
            Frame::Delivered { server_id } if phase == P_OPEN && server_id != 0 => {
                let pid = u16::try_from(server_id).expect("server ids here are packet ids");
                self.put(
                    conn,
                    &Packet::PubAck(PubAck {
                        pid,
                        code: 0,
                        props: Props(&[]),
                    }),
                );
            }
            Frame::Ping { .. } if phase == P_OPEN => self.put(conn, &Packet::PingReq),
            // Nothing else has an MQTT meaning (`run` refuses the options
            // that would write it), or the slot is not open.
            _ => {}
        }
    }

    fn close(&mut self, conn: u32) {
        self.forget(conn);
        self.inner.close(conn);
    }

    fn poll(
        &mut self,
        timeout: Duration,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        for (l, frame) in std::mem::take(&mut self.refused) {
            let start = scratch.len();
            scratch.extend_from_slice(&frame);
            events.push(Event::Recv(l, start, frame.len()));
        }
        let mut inner_events = std::mem::take(&mut self.inner_events);
        let mut inner_scratch = std::mem::take(&mut self.inner_scratch);
        inner_scratch.clear();
        let result = self
            .inner
            .poll(timeout, &mut inner_events, &mut inner_scratch);
        for ev in inner_events.drain(..) {
            match ev {
                Event::Connected(l) => {
                    self.phase[l as usize] = P_TCP;
                    events.push(ev);
                }
                Event::Recv(l, start, len) => {
                    if !matches!(self.phase[l as usize], P_IDLE | P_TCP | P_DONE) {
                        self.on_bytes(l, &inner_scratch[start..start + len], events, scratch);
                    }
                }
                Event::PeerClosed(l, _) => {
                    if self.phase[l as usize] != P_DONE {
                        self.phase[l as usize] = P_DONE;
                        events.push(ev);
                    }
                }
                Event::Released(l) => {
                    self.forget(l);
                    events.push(ev);
                }
                Event::ConnectFailed(..) => events.push(ev),
            }
        }
        self.inner_events = inner_events;
        self.inner_scratch = inner_scratch;
        result
    }

    fn stats(&self) -> EngineStats {
        self.inner.stats()
    }

    fn server_index(&mut self, addr: std::net::SocketAddr) -> Option<usize> {
        self.inner.server_index(addr)
    }
}

#[cfg(test)]
mod tests {
    //! The translation, with a scripted inner engine: no sockets.

    use super::*;

    /// An inner engine that records what is sent and replays queued events.
    #[derive(Default)]
    struct Script {
        sent: Vec<(u32, Vec<u8>)>,
        events: Vec<Event>,
        bytes: Vec<u8>,
    }

    impl Engine for Script {
        fn open(&mut self, _: u32, _: usize, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn send(&mut self, conn: u32, bytes: &[u8]) {
            self.sent.push((conn, bytes.to_vec()));
        }
        fn close(&mut self, conn: u32) {
            self.events.push(Event::Released(conn));
        }
        fn poll(
            &mut self,
            _: Duration,
            events: &mut Vec<Event>,
            scratch: &mut Vec<u8>,
        ) -> io::Result<()> {
            let base = scratch.len();
            scratch.extend_from_slice(&self.bytes);
            self.bytes.clear();
            events.extend(self.events.drain(..).map(|e| match e {
                Event::Recv(l, s, n) => Event::Recv(l, base + s, n),
                e => e,
            }));
            Ok(())
        }
        fn stats(&self) -> EngineStats {
            EngineStats::default()
        }
        fn server_index(&mut self, _: std::net::SocketAddr) -> Option<usize> {
            Some(0)
        }
    }

    fn engine(broker: Broker) -> MqttEngine<Script> {
        let settings = MqttSettings {
            broker,
            keepalive_s: 60,
        };
        MqttEngine::new(Script::default(), 2, settings)
    }

    /// Delivers `bytes` from the broker on slot `l`, `chunk` bytes per
    /// receive; the Tern frames the driver reads, and whether the slot broke.
    fn broker_says(
        e: &mut MqttEngine<Script>,
        l: u32,
        bytes: &[u8],
        chunk: usize,
    ) -> (Vec<proto::OwnedFrame>, bool) {
        let (mut frames, mut broken) = (Vec::new(), false);
        for piece in bytes.chunks(chunk) {
            e.inner.bytes = piece.to_vec();
            e.inner.events.push(Event::Recv(l, 0, piece.len()));
            let (mut events, mut scratch) = (Vec::new(), Vec::new());
            e.poll(Duration::ZERO, &mut events, &mut scratch).unwrap();
            for ev in events {
                match ev {
                    Event::Recv(_, s, n) => {
                        let mut at = s;
                        while at < s + n {
                            let (f, used) = proto::decode(&scratch[at..s + n], &Limits::default())
                                .unwrap()
                                .unwrap();
                            frames.push(f.to_owned());
                            at += used;
                        }
                    }
                    Event::PeerClosed(_, errno) => {
                        assert_eq!(errno, libc::EPROTO);
                        broken = true;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        (frames, broken)
    }

    fn server(p: &Packet<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        codec::encode(p, Version::V311, &mut out);
        out
    }

    /// The packet the wrapper last sent to the broker.
    fn last_sent(e: &MqttEngine<Script>) -> Vec<u8> {
        e.inner.sent.last().expect("something sent").1.clone()
    }

    fn tern(f: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        proto::encode(f, &mut out);
        out
    }

    /// TCP up, LOGIN written, CONNACK and SUBACK answered: LOGIN_OK.
    fn log_in(e: &mut MqttEngine<Script>, l: u32, token: &str) {
        e.inner.events.push(Event::Connected(l));
        let mut evs = Vec::new();
        e.poll(Duration::ZERO, &mut evs, &mut Vec::new()).unwrap();
        assert_eq!(evs, [Event::Connected(l)]);
        e.send(
            l,
            &tern(&Frame::Login {
                version: 2,
                token: token.as_bytes(),
            }),
        );
        let connack = server(&Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            props: Props(&[]),
        }));
        let (frames, _) = broker_says(e, l, &connack, usize::MAX);
        assert!(frames.is_empty());
        let subscribe = last_sent(e);
        let Ok(Some((Packet::Subscribe(s), _))) =
            codec::decode(&subscribe, Some(Version::V311), 1024)
        else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(s.filters.iter().collect::<Vec<_>>(), [("u/42", 1)]);
        let suback = server(&Packet::SubAck(Ack {
            pid: s.pid,
            props: Props(&[]),
            codes: &[1],
        }));
        let (frames, _) = broker_says(e, l, &suback, 1);
        assert!(
            matches!(
                frames[..],
                [proto::OwnedFrame::LoginOk {
                    offline_count: 0,
                    ..
                }]
            ),
            "{frames:?}"
        );
    }

    #[test]
    fn token_users() {
        assert_eq!(token_user(b"v1.42.1700000000.sig"), Some(42));
        assert_eq!(token_user(b"v2.42.3.1700000000.sig"), Some(42));
        assert_eq!(token_user(b"v3.42.1"), None);
        assert_eq!(token_user(b"v1.x.1"), None);
        assert_eq!(token_user(&[0xff, b'.']), None);
    }

    #[test]
    fn the_connect_carries_the_token_only_for_tern() {
        for (broker, creds) in [(Broker::Tern, true), (Broker::Generic, false)] {
            let mut e = engine(broker);
            e.inner.events.push(Event::Connected(1));
            e.poll(Duration::ZERO, &mut Vec::new(), &mut Vec::new())
                .unwrap();
            e.send(
                1,
                &tern(&Frame::Login {
                    version: 2,
                    token: b"v1.42.9.sig",
                }),
            );
            let bytes = last_sent(&e);
            let Ok(Some((Packet::Connect(c), _))) = codec::decode(&bytes, None, 1024) else {
                panic!("not a CONNECT");
            };
            assert_eq!(
                (c.version, c.clean, c.keepalive_s, c.client_id),
                (Version::V311, true, 60, "tl-42")
            );
            assert_eq!(c.username, creds.then_some("42"));
            assert_eq!(c.password, creds.then_some(&b"v1.42.9.sig"[..]));
        }
    }

    #[test]
    fn a_connack_refusal_is_a_login_error() {
        for (code, want) in [
            (4, ErrorCode::BadToken),
            (5, ErrorCode::Banned),
            (3, ErrorCode::Unavailable),
        ] {
            let mut e = engine(Broker::Tern);
            e.inner.events.push(Event::Connected(0));
            e.poll(Duration::ZERO, &mut Vec::new(), &mut Vec::new())
                .unwrap();
            e.send(
                0,
                &tern(&Frame::Login {
                    version: 2,
                    token: b"v1.42.9.sig",
                }),
            );
            let connack = server(&Packet::ConnAck(ConnAck {
                session_present: false,
                code,
                props: Props(&[]),
            }));
            let (frames, broken) = broker_says(&mut e, 0, &connack, usize::MAX);
            assert!(!broken);
            assert!(
                matches!(frames[..], [proto::OwnedFrame::LoginErr { code: c, .. }] if c == want),
                "{frames:?}"
            );
        }
    }

    /// SENDs become PUBLISHes under distinct packet ids; their PUBACKs come
    /// back as ACKs for the right client ids (in any order, split anywhere);
    /// a PUBLISH from the broker is a DELIVER whose DELIVERED is its PUBACK.
    #[test]
    fn messages_both_ways() {
        let mut e = engine(Broker::Tern);
        log_in(&mut e, 1, "v1.42.9.sig");
        let mut pids = Vec::new();
        for (client_id, to) in [(1001u64, 7u64), (1002, 8)] {
            e.send(
                1,
                &tern(&Frame::Send {
                    client_id,
                    to,
                    body: b"hello",
                }),
            );
            let bytes = last_sent(&e);
            let Ok(Some((Packet::Publish(p), _))) =
                codec::decode(&bytes, Some(Version::V311), 1024)
            else {
                panic!("not a PUBLISH");
            };
            assert_eq!(
                (p.qos, p.topic, p.payload),
                (1, format!("u/{to}").as_str(), &b"hello"[..])
            );
            pids.push(p.pid);
        }
        assert_ne!(pids[0], pids[1]);
        let mut acks = server(&Packet::PubAck(PubAck {
            pid: pids[1],
            code: 0,
            props: Props(&[]),
        }));
        acks.extend(server(&Packet::PubAck(PubAck {
            pid: pids[0],
            code: 0,
            props: Props(&[]),
        })));
        // An unknown packet id is ignored.
        acks.extend(server(&Packet::PubAck(PubAck {
            pid: 999,
            code: 0,
            props: Props(&[]),
        })));
        let (frames, broken) = broker_says(&mut e, 1, &acks, 3);
        assert!(!broken);
        let ids: Vec<u64> = frames
            .iter()
            .map(|f| match f {
                proto::OwnedFrame::Ack { client_id, .. } => *client_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [1002, 1001]);
        assert!(e.outbox.is_empty(), "nothing kept once answered");

        let mut body = vec![0u8; 20];
        body[12..20].copy_from_slice(&7u64.to_le_bytes());
        let publish = server(&Packet::Publish(Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: "u/42",
            pid: 33,
            props: Props(&[]),
            payload: &body,
        }));
        let (frames, _) = broker_says(&mut e, 1, &publish, 2);
        match &frames[..] {
            [proto::OwnedFrame::Deliver {
                server_id: 33,
                from: 7,
                body: b,
                ..
            }] => assert_eq!(b, &body),
            other => panic!("{other:?}"),
        }
        e.send(1, &tern(&Frame::Delivered { server_id: 33 }));
        assert_eq!(
            last_sent(&e),
            server(&Packet::PubAck(PubAck {
                pid: 33,
                code: 0,
                props: Props(&[])
            }))
        );
        e.send(1, &tern(&Frame::Ping { nonce: 5 }));
        assert_eq!(last_sent(&e), server(&Packet::PingReq));
        let (frames, _) = broker_says(&mut e, 1, &server(&Packet::PingResp), 1);
        assert!(matches!(frames[..], [proto::OwnedFrame::Pong { .. }]));
    }

    /// Bytes that break MQTT, or a packet a broker does not send (a
    /// CONNECT), end the connection with `EPROTO`, once.
    #[test]
    fn a_broken_broker_closes_the_connection() {
        let connect = server(&Packet::Connect(Connect {
            version: Version::V311,
            clean: true,
            keepalive_s: 0,
            props: Props(&[]),
            client_id: "x",
            will: None,
            username: None,
            password: None,
        }));
        for bad in [
            vec![0x20, 0xff, 0xff, 0xff, 0xff, 0x01],
            vec![0xf0, 0x00],
            connect,
        ] {
            let mut e = engine(Broker::Generic);
            log_in(&mut e, 0, "v1.42.9.sig");
            let (_, broken) = broker_says(&mut e, 0, &bad, usize::MAX);
            assert!(broken, "{bad:?}");
            // The inner engine's own close report is not repeated.
            e.inner.events.push(Event::PeerClosed(0, 0));
            let mut evs = Vec::new();
            e.poll(Duration::ZERO, &mut evs, &mut Vec::new()).unwrap();
            assert!(evs.is_empty());
            e.close(0);
            e.poll(Duration::ZERO, &mut evs, &mut Vec::new()).unwrap();
            assert_eq!(evs, [Event::Released(0)]);
            assert_eq!(e.phase[0], P_IDLE);
        }
    }
}
