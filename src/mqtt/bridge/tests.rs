use super::*;
use crate::mqtt::codec::{decode, Filters, Subscribe, Unsubscribe};

const CTX: Ctx = Ctx {
    user: 7,
    device: 0,
    body_bytes_max: 100,
    packet_bytes_max: 65536,
    idle_timeout_ms: 300_000,
};

fn connect_packet(v: Version, clean: bool, username: Option<&'static str>) -> Connect<'static> {
    Connect {
        version: v,
        clean,
        keepalive_s: 10,
        props: Props::default(),
        client_id: "c",
        will: None,
        username,
        password: Some(b"v1.7.99.mac"),
    }
}

/// Decodes every packet in `out`.
fn packets(out: &[u8], v: Version) -> Vec<Packet<'_>> {
    let mut at = 0;
    let mut all = Vec::new();
    while at < out.len() {
        let (p, n) = decode(&out[at..], Some(v), usize::MAX).unwrap().unwrap();
        all.push(p);
        at += n;
    }
    all
}

fn frames(tern: &[u8]) -> Vec<Frame<'_>> {
    let limits = proto::Limits {
        frame_bytes_max: 65536,
        body_bytes_max: 65000,
    };
    let mut at = 0;
    let mut all = Vec::new();
    while at < tern.len() {
        let (f, n) = proto::decode(&tern[at..], &limits).unwrap().unwrap();
        all.push(f);
        at += n;
    }
    all
}

/// A connected mode for `v` (the LOGIN taken).
fn connected(v: Version, clean: bool) -> Mode {
    let mut mode = Mode::accepted();
    let (mut tern, mut out) = (Vec::new(), Vec::new());
    let c = connect_packet(v, clean, Some("7"));
    let step = on_packet(
        &mut mode,
        &mut Inflight::default(),
        Packet::Connect(c),
        &CTX,
        &mut tern,
        &mut out,
    );
    assert_eq!(step, Step::Next);
    assert!(out.is_empty());
    assert_eq!(
        frames(&tern),
        [Frame::Login {
            version: 1,
            token: b"v1.7.99.mac"
        }]
    );
    mode
}

fn packet(mode: &mut Mode, inflight: &mut Inflight, p: Packet<'_>) -> (Step, Vec<u8>, Vec<u8>) {
    let (mut tern, mut out) = (Vec::new(), Vec::new());
    let step = on_packet(mode, inflight, p, &CTX, &mut tern, &mut out);
    (step, tern, out)
}

fn frame(mode: Mode, inflight: &mut Inflight, f: Frame<'_>) -> (Step, Vec<u8>) {
    let mut out = Vec::new();
    let step = on_frame(mode, inflight, &f, &CTX, &mut out);
    (step, out)
}

#[test]
fn connect_is_a_login_and_login_ok_a_connack() {
    for (v, clean, present) in [
        (Version::V311, true, false),
        (Version::V311, false, true),
        (Version::V5, true, false),
    ] {
        let mode = connected(v, clean);
        assert_eq!(mode.inbox(), present);
        let (_, out) = frame(
            mode,
            &mut Inflight::default(),
            Frame::LoginOk {
                server_time_ms: 1,
                offline_count: 0,
            },
        );
        let p = packets(&out, v);
        let [Packet::ConnAck(ack)] = p[..] else {
            panic!("{p:?}")
        };
        assert_eq!((ack.code, ack.session_present), (0, present));
        if v == Version::V5 {
            assert_eq!(ack.props.int(prop::MAXIMUM_QOS), Some(1));
            assert_eq!(ack.props.int(prop::MAXIMUM_PACKET_SIZE), Some(65536));
        }
    }
}

#[test]
fn a_5_0_persistent_session_needs_a_session_expiry() {
    let mut pb = PropsBuf::default();
    pb.u32(prop::SESSION_EXPIRY, 3600);
    for (props, persistent) in [(Props::default(), false), (pb.props(), true)] {
        let mut mode = Mode::accepted();
        let mut c = connect_packet(Version::V5, false, None);
        c.props = props;
        let (step, tern, _) = packet(&mut mode, &mut Inflight::default(), Packet::Connect(c));
        assert_eq!((step, tern.is_empty()), (Step::Next, false));
        assert_eq!(mode.inbox(), persistent);
    }
}

#[test]
fn connect_refusals_answer_connack_and_close() {
    // User name not the token's user; no password; empty id without clean session.
    let no_password = Connect {
        password: None,
        ..connect_packet(Version::V311, true, Some("7"))
    };
    let empty_id = Connect {
        client_id: "",
        ..connect_packet(Version::V311, false, None)
    };
    for (c, code) in [
        (connect_packet(Version::V311, true, Some("8")), 0x04),
        (connect_packet(Version::V311, true, Some("07")), 0x04),
        (no_password, 0x04),
        (empty_id, 0x02),
        (
            connect_packet(Version::V5, true, Some("8")),
            reason::BAD_LOGIN,
        ),
    ] {
        let mut mode = Mode::accepted();
        let v = c.version;
        let (step, tern, out) = packet(&mut mode, &mut Inflight::default(), Packet::Connect(c));
        assert_eq!(step, Step::Close);
        assert!(tern.is_empty());
        let p = packets(&out, v);
        assert!(
            matches!(p[..], [Packet::ConnAck(ConnAck { code: c, .. })] if c == code),
            "{p:?}"
        );
    }
}

#[test]
fn packets_before_connect_close_unanswered() {
    let mut mode = Mode::accepted();
    let (step, tern, out) = packet(&mut mode, &mut Inflight::default(), Packet::PingReq);
    assert_eq!((step, tern.len(), out.len()), (Step::Close, 0, 0));
}

#[test]
fn login_err_is_a_connack_refusal() {
    for (v, code) in [(Version::V311, 0x04), (Version::V5, reason::BAD_LOGIN)] {
        let mode = connected(v, true);
        let f = Frame::LoginErr {
            code: ErrorCode::TokenExpired,
            text: "expired",
        };
        let (_, out) = frame(mode, &mut Inflight::default(), f);
        let p = packets(&out, v);
        assert!(
            matches!(p[..], [Packet::ConnAck(ConnAck { code: c, session_present: false, .. })] if c == code)
        );
    }
}

fn publish(topic: &str, qos: u8, pid: u16) -> Packet<'_> {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        pid,
        props: Props::default(),
        payload: b"hi",
    })
}

#[test]
fn publish_to_another_inbox_is_a_send_and_its_ack_a_puback() {
    for v in [Version::V311, Version::V5] {
        let mut mode = connected(v, true);
        let mut inflight = Inflight::default();
        let (step, tern, out) = packet(&mut mode, &mut inflight, publish("u/42", 1, 9));
        assert_eq!((step, out.len()), (Step::Next, 0));
        assert_eq!(
            frames(&tern),
            [Frame::Send {
                client_id: 9,
                to: 42,
                body: b"hi"
            }]
        );
        let ack = Frame::Ack {
            client_id: 9,
            server_id: 1025,
            server_time_ms: 5,
        };
        let (_, out) = frame(mode, &mut inflight, ack);
        let p = packets(&out, v);
        let [Packet::PubAck(a)] = p[..] else {
            panic!("{p:?}")
        };
        assert_eq!((a.pid, a.code), (9, 0));
        if v == Version::V5 {
            assert_eq!(a.props.user("server_id"), Some("1025"));
        }
        // QoS 0: a SEND with client id 0, whose ACK is not answered.
        let (_, tern, _) = packet(&mut mode, &mut inflight, publish("u/42", 0, 0));
        assert!(matches!(
            frames(&tern)[..],
            [Frame::Send { client_id: 0, .. }]
        ));
        let ack0 = Frame::Ack {
            client_id: 0,
            server_id: 1026,
            server_time_ms: 5,
        };
        assert_eq!(frame(mode, &mut inflight, ack0).1.len(), 0);
    }
}

#[test]
fn publish_anywhere_else_is_refused() {
    for topic in ["u/7", "u/7/receipts", "u/42/receipts", "u/042", "x", "u/0"] {
        // 3.1.1: closed, nothing taken.
        let mut mode = connected(Version::V311, true);
        let (step, tern, _) = packet(&mut mode, &mut Inflight::default(), publish(topic, 1, 3));
        assert_eq!((step, tern.len()), (Step::Close, 0), "{topic}");
        // 5.0: PUBACK with a refusal, connection stays.
        let mut mode = connected(Version::V5, true);
        let (step, tern, out) = packet(&mut mode, &mut Inflight::default(), publish(topic, 1, 3));
        assert_eq!((step, tern.len()), (Step::Next, 0), "{topic}");
        let p = packets(&out, Version::V5);
        let [Packet::PubAck(a)] = p[..] else {
            panic!("{p:?}")
        };
        assert!(a.code == reason::NOT_AUTHORIZED || a.code == reason::TOPIC_INVALID);
        // 5.0 QoS 0: dropped.
        let (step, tern, out) = packet(&mut mode, &mut Inflight::default(), publish(topic, 0, 0));
        assert_eq!((step, tern.len(), out.len()), (Step::Next, 0, 0));
    }
}

#[test]
fn oversized_payload_closes() {
    let mut mode = connected(Version::V5, true);
    let body = [0u8; 101];
    let p = Packet::Publish(Publish {
        dup: false,
        qos: 1,
        retain: false,
        topic: "u/42",
        pid: 1,
        props: Props::default(),
        payload: &body,
    });
    let (step, tern, out) = packet(&mut mode, &mut Inflight::default(), p);
    assert_eq!((step, tern.len()), (Step::Close, 0));
    assert!(matches!(
        packets(&out, Version::V5)[..],
        [Packet::Disconnect(Disconnect {
            code: reason::PACKET_TOO_LARGE,
            ..
        })]
    ));
}

#[test]
fn refused_send_is_a_negative_puback_in_5_0_and_a_close_in_3_1_1() {
    let err = Frame::Error {
        code: ErrorCode::QueueFull,
        client_id: 9,
        text: "queue full",
    };
    let (step, out) = frame(
        connected(Version::V311, true),
        &mut Inflight::default(),
        err,
    );
    assert_eq!((step, out.len()), (Step::Close, 0));
    let (step, out) = frame(connected(Version::V5, true), &mut Inflight::default(), err);
    assert_eq!(step, Step::Next);
    let p = packets(&out, Version::V5);
    let [Packet::PubAck(a)] = p[..] else {
        panic!("{p:?}")
    };
    assert_eq!((a.pid, a.code), (9, reason::QUOTA_EXCEEDED));
    assert_eq!(a.props.str(prop::REASON_STRING), Some("queue_full"));
}

#[test]
fn deliver_is_a_qos1_publish_and_its_puback_delivered() {
    for v in [Version::V311, Version::V5] {
        let mut mode = connected(v, false);
        let mut inflight = Inflight::default();
        for (server_id, pid) in [(1025u64, 1u16), (1026, 2)] {
            let d = Frame::Deliver {
                server_id,
                from: 42,
                server_time_ms: 5,
                client_id: None,
                body: b"yo",
            };
            let (_, out) = frame(mode, &mut inflight, d);
            let p = packets(&out, v);
            let [Packet::Publish(pb)] = p[..] else {
                panic!("{p:?}")
            };
            assert_eq!(
                (pb.topic, pb.qos, pb.pid, pb.payload),
                ("u/7", 1, pid, &b"yo"[..])
            );
            if v == Version::V5 {
                assert_eq!(pb.props.user("from"), Some("42"));
                assert_eq!(pb.props.user("server_id"), Some(&*server_id.to_string()));
            }
        }
        // Answered out of order; a repeat is ignored.
        for (pid, server_id) in [(2u16, 1026u64), (1, 1025)] {
            let ack = Packet::PubAck(PubAck {
                pid,
                code: 0,
                props: Props::default(),
            });
            let (_, tern, _) = packet(&mut mode, &mut inflight, ack);
            assert_eq!(frames(&tern), [Frame::Delivered { server_id }]);
            let (_, tern, _) = packet(&mut mode, &mut inflight, ack);
            assert!(tern.is_empty());
        }
        assert!(inflight.is_empty());
    }
}

#[test]
fn packet_ids_skip_zero_and_ids_in_flight() {
    let mut f = Inflight::default();
    f.0.push((65535, 1));
    f.0.push((1, 2));
    f.0.push((2, 3));
    // After 2 comes 3; after 65535 wraps past 0 and the ids in flight.
    assert_eq!(f.add(4), (3, false));
    let mut g = Inflight(vec![(2, 9), (65535, 1)]);
    assert_eq!(g.add(5), (1, false));
    assert_eq!(g.add(6), (3, false));
    // A server id still in flight (sent again after a live upgrade) keeps
    // its packet id, as a DUP.
    assert_eq!(g.add(9), (2, true));
    assert_eq!(g.0.len(), 4);
}

#[test]
fn carried_state_round_trips_and_bad_state_is_refused() {
    let mut mode = Mode::accepted();
    mode.flags |= flag::CONNECTED | flag::V5 | flag::INBOX;
    mode.keepalive_s = 30;
    mode.receive_max = 7;
    assert_eq!(Mode::from_bytes(mode.to_bytes()), Some(mode));
    // Not MQTT, or no CONNECT taken yet: never carried.
    assert_eq!(Mode::from_bytes(Mode::accepted().to_bytes()), None);
    assert_eq!(Mode::from_bytes([flag::CONNECTED, 0, 0, 0, 0]), None);
    let f = Inflight(vec![(7, 70), (8, 80)]);
    assert_eq!(Inflight::from_entries(f.entries().to_vec()), Some(f));
    assert_eq!(Inflight::from_entries(vec![(7, 70), (7, 80)]), None);
    assert_eq!(Inflight::from_entries(vec![(0, 70)]), None);
    assert_eq!(Inflight::from_entries(vec![(1, 0)]), None);
}

#[test]
fn a_delivery_sent_again_keeps_its_packet_id_with_dup_set() {
    let mut mode = Mode::accepted();
    mode.flags |= flag::CONNECTED | flag::INBOX;
    let mut inflight = Inflight::default();
    let deliver = Frame::Deliver {
        server_id: 42,
        from: 6,
        server_time_ms: 1,
        client_id: None,
        body: b"hi",
    };
    let mut sent = Vec::new();
    for _ in 0..2 {
        let mut out = Vec::new();
        assert_eq!(
            on_frame(mode, &mut inflight, &deliver, &CTX, &mut out),
            Step::Next
        );
        let Ok(Some((Packet::Publish(p), _))) = decode(&out, Some(Version::V311), 4096) else {
            panic!("{out:?}")
        };
        sent.push((p.pid, p.dup));
    }
    assert_eq!(sent, [(1, false), (1, true)]);
    assert_eq!(inflight.entries(), [(1, 42)]);
}

fn subscribe<'a>(filters: &[(&str, u8)], buf: &'a mut Vec<u8>) -> Packet<'a> {
    Packet::Subscribe(Subscribe {
        pid: 5,
        props: Props::default(),
        filters: Filters::build(filters, true, buf),
    })
}

#[test]
fn subscribe_only_to_your_own_topics() {
    for (v, refusal) in [(Version::V311, 0x80), (Version::V5, 0x87)] {
        let mut mode = connected(v, true);
        assert!(!mode.inbox());
        let mut buf = Vec::new();
        let s = subscribe(
            &[
                ("u/8", 1),
                ("u/7", 0),
                ("#", 0),
                ("u/7/receipts", 1),
                ("u/+", 1),
            ],
            &mut buf,
        );
        let (step, tern, out) = packet(&mut mode, &mut Inflight::default(), s);
        assert_eq!((step, tern.len()), (Step::Resume, 0));
        assert!(mode.inbox());
        let p = packets(&out, v);
        let [Packet::SubAck(a)] = p[..] else {
            panic!("{p:?}")
        };
        assert_eq!(
            (a.pid, a.codes),
            (5, &[refusal, 1, refusal, 0, refusal][..])
        );
        // Unsubscribing the inbox pauses deliveries.
        let mut ubuf = Vec::new();
        let u = Packet::Unsubscribe(Unsubscribe {
            pid: 6,
            props: Props::default(),
            filters: Filters::build(&[("u/7", 0), ("u/9", 0)], false, &mut ubuf),
        });
        let (step, _, out) = packet(&mut mode, &mut Inflight::default(), u);
        assert_eq!(step, Step::Pause);
        assert!(!mode.inbox());
        let p = packets(&out, v);
        let [Packet::UnsubAck(a)] = p[..] else {
            panic!("{p:?}")
        };
        let want: &[u8] = if v == Version::V5 { &[0, 0x11] } else { &[] };
        assert_eq!((a.pid, a.codes), (6, want));
    }
}

#[test]
fn receipts_go_only_to_a_subscribed_connection() {
    let r = Frame::Receipt {
        kind: ReceiptKind::Delivered,
        server_id: 1025,
        peer: 42,
    };
    let mut mode = connected(Version::V311, true);
    assert!(frame(mode, &mut Inflight::default(), r).1.is_empty());
    let mut buf = Vec::new();
    let s = subscribe(&[("u/7/receipts", 0)], &mut buf);
    packet(&mut mode, &mut Inflight::default(), s);
    let (_, out) = frame(mode, &mut Inflight::default(), r);
    let p = packets(&out, Version::V311);
    let [Packet::Publish(pb)] = p[..] else {
        panic!("{p:?}")
    };
    assert_eq!(
        (pb.topic, pb.qos, pb.payload),
        ("u/7/receipts", 0, &b"delivered 1025 42"[..])
    );
}

#[test]
fn ping_pong_bye_and_disconnect() {
    let mut mode = connected(Version::V5, true);
    let (_, tern, _) = packet(&mut mode, &mut Inflight::default(), Packet::PingReq);
    assert_eq!(frames(&tern), [Frame::Ping { nonce: 0 }]);
    let (_, out) = frame(mode, &mut Inflight::default(), Frame::Pong { nonce: 0 });
    assert_eq!(out, [0xD0, 0]);
    let (_, out) = frame(
        mode,
        &mut Inflight::default(),
        Frame::Bye {
            reason: ByeReason::Idle,
        },
    );
    assert!(matches!(
        packets(&out, Version::V5)[..],
        [Packet::Disconnect(Disconnect {
            code: reason::KEEPALIVE_TIMEOUT,
            ..
        })]
    ));
    // 3.1.1 gets no DISCONNECT (the close says it).
    let m311 = connected(Version::V311, true);
    let bye = Frame::Bye {
        reason: ByeReason::Replaced,
    };
    assert!(frame(m311, &mut Inflight::default(), bye).1.is_empty());
    let d = Packet::Disconnect(Disconnect {
        code: 0,
        props: Props::default(),
    });
    assert_eq!(
        packet(&mut mode, &mut Inflight::default(), d).0,
        Step::Close
    );
    // A second CONNECT is a protocol error.
    let c = Packet::Connect(connect_packet(Version::V5, true, None));
    let (step, _, out) = packet(&mut mode, &mut Inflight::default(), c);
    assert_eq!(step, Step::Close);
    assert!(matches!(
        packets(&out, Version::V5)[..],
        [Packet::Disconnect(Disconnect {
            code: reason::PROTOCOL_ERROR,
            ..
        })]
    ));
}

#[test]
fn keepalive_is_one_and_a_half_times_and_5_0_is_told_the_servers() {
    let m = connected(Version::V311, true);
    assert_eq!(m.silence_ms_max(), Some(15_000));
    let mut mode = Mode::accepted();
    let mut c = connect_packet(Version::V311, true, None);
    c.keepalive_s = 0;
    packet(&mut mode, &mut Inflight::default(), Packet::Connect(c));
    assert_eq!(mode.silence_ms_max(), None);
    // 5.0 with keepalive 0 or over the idle timeout: Server Keep Alive.
    for k in [0u16, 65535] {
        let mut mode = Mode::accepted();
        let mut c = connect_packet(Version::V5, true, None);
        c.keepalive_s = k;
        packet(&mut mode, &mut Inflight::default(), Packet::Connect(c));
        assert_eq!(mode.silence_ms_max(), Some(300_000));
        let ok = Frame::LoginOk {
            server_time_ms: 0,
            offline_count: 0,
        };
        let (_, out) = frame(mode, &mut Inflight::default(), ok);
        let p = packets(&out, Version::V5);
        let [Packet::ConnAck(a)] = p[..] else {
            panic!("{p:?}")
        };
        assert_eq!(a.props.int(prop::SERVER_KEEP_ALIVE), Some(200));
    }
}

#[test]
fn bad_level_is_answered_connack_0x01() {
    let mut out = Vec::new();
    refused(Mode::accepted(), codec::Error::BadLevel(3), &mut out);
    assert_eq!(out, [0x20, 2, 0, 1]);
    let mut out = Vec::new();
    refused(Mode::accepted(), codec::Error::BadProtocolName, &mut out);
    assert!(out.is_empty());
}

#[test]
fn inbox_topics_are_canonical() {
    assert_eq!(inbox_user("u/42"), Some(42));
    for t in [
        "u/042",
        "u/",
        "u/0",
        "u/-1",
        "u/4x",
        "v/4",
        "u/18446744073709551616",
    ] {
        assert_eq!(inbox_user(t), None, "{t}");
    }
    assert_eq!(token_user(b"v2.42.3.99.mac"), Some(42));
    assert_eq!(token_user(b"v3.42"), None);
}

#[test]
fn a_5_0_receive_maximum_is_the_connections_window() {
    let mut pb = PropsBuf::default();
    pb.u16(prop::RECEIVE_MAXIMUM, 20);
    let mut mode = Mode::accepted();
    let c = Connect {
        props: pb.props(),
        ..connect_packet(Version::V5, true, None)
    };
    packet(&mut mode, &mut Inflight::default(), Packet::Connect(c));
    assert_eq!(mode.inflight_max(), Some(20));
    assert_eq!(connected(Version::V5, true).inflight_max(), None);
    assert!(mode.is_mqtt() && !Mode::default().is_mqtt());
}
