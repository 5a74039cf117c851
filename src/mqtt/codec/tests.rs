use super::*;

const MAX: usize = 65536;

fn dec(buf: &[u8], v: Option<Version>) -> Result<Option<(Packet<'_>, usize)>, Error> {
    decode(buf, v, MAX)
}

/// Encodes `p`, checks it decodes back to itself from the whole buffer and
/// is incomplete at every shorter prefix; returns the bytes.
fn round(p: &Packet<'_>, v: Version) -> Vec<u8> {
    let mut out = Vec::new();
    encode(p, v, &mut out);
    let (back, used) = dec(&out, Some(v)).unwrap().unwrap();
    assert_eq!(used, out.len());
    assert_eq!(&back, p, "{v:?}");
    for n in 0..out.len() {
        assert_eq!(
            dec(&out[..n], Some(v)),
            Ok(None),
            "prefix {n} of {out:02x?}"
        );
    }
    out
}

fn connect(v: Version) -> Connect<'static> {
    Connect {
        version: v,
        clean: true,
        keepalive_s: 60,
        props: Props::default(),
        client_id: "c1",
        will: None,
        username: Some("42"),
        password: Some(b"v1.42.1.mac"),
    }
}

#[test]
fn connect_3_1_1_bytes_are_the_specs() {
    let mut out = Vec::new();
    let c = Connect {
        username: None,
        password: None,
        ..connect(Version::V311)
    };
    encode(&Packet::Connect(c), Version::V311, &mut out);
    // Fixed header 10 0e, "MQTT", level 4, flags 02 (clean), keepalive 60,
    // client id "c1".
    assert_eq!(
        out,
        [0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1']
    );
    assert_eq!(round(&Packet::Connect(c), Version::V311), out);
}

#[test]
fn every_packet_round_trips_in_both_versions() {
    let mut pb = PropsBuf::default();
    pb.str(prop::REASON_STRING, "ok").user("from", "17");
    let mut fbuf = Vec::new();
    let subs = Filters::build(&[("u/42", 1), ("u/42/receipts", 0)], true, &mut fbuf);
    let mut ubuf = Vec::new();
    let unsubs = Filters::build(&[("u/42", 0)], false, &mut ubuf);
    for v in [Version::V311, Version::V5] {
        let props = if v == Version::V5 {
            pb.props()
        } else {
            Props::default()
        };
        let mut will_props = PropsBuf::default();
        if v == Version::V5 {
            will_props.user("k", "v");
        }
        round(&Packet::Connect(connect(v)), v);
        let mut c = connect(v);
        c.will = Some(Will {
            props: will_props.props(),
            topic: "w",
            payload: b"gone",
            qos: 1,
            retain: true,
        });
        round(&Packet::Connect(c), v);
        let mut ack_props = PropsBuf::default();
        if v == Version::V5 {
            ack_props
                .byte(prop::MAXIMUM_QOS, 1)
                .u16(prop::SERVER_KEEP_ALIVE, 30);
        }
        round(
            &Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
                props: ack_props.props(),
            }),
            v,
        );
        for (qos, pid) in [(0, 0), (1, 7)] {
            let mut pp = PropsBuf::default();
            if v == Version::V5 {
                pp.user("from", "17").user("server_id", "1025");
            }
            round(
                &Packet::Publish(Publish {
                    dup: qos == 1,
                    qos,
                    retain: false,
                    topic: "u/42",
                    pid,
                    props: pp.props(),
                    payload: b"hello",
                }),
                v,
            );
        }
        round(
            &Packet::PubAck(PubAck {
                pid: 9,
                code: 0,
                props: Props::default(),
            }),
            v,
        );
        round(
            &Packet::Subscribe(Subscribe {
                pid: 3,
                props: Props::default(),
                filters: subs,
            }),
            v,
        );
        round(
            &Packet::SubAck(Ack {
                pid: 3,
                props,
                codes: &[1, 0x80],
            }),
            v,
        );
        round(
            &Packet::Unsubscribe(Unsubscribe {
                pid: 4,
                props: Props::default(),
                filters: unsubs,
            }),
            v,
        );
        let codes: &[u8] = if v == Version::V5 { &[0] } else { &[] };
        round(
            &Packet::UnsubAck(Ack {
                pid: 4,
                props,
                codes,
            }),
            v,
        );
        assert_eq!(round(&Packet::PingReq, v), [0xC0, 0]);
        assert_eq!(round(&Packet::PingResp, v), [0xD0, 0]);
        round(
            &Packet::Disconnect(Disconnect {
                code: 0,
                props: Props::default(),
            }),
            v,
        );
    }
    // 5.0 only: reason codes and properties on PUBACK and DISCONNECT.
    let mut rs = PropsBuf::default();
    rs.str(prop::REASON_STRING, "queue_full");
    round(
        &Packet::PubAck(PubAck {
            pid: 9,
            code: reason::QUOTA_EXCEEDED,
            props: rs.props(),
        }),
        Version::V5,
    );
    round(
        &Packet::Disconnect(Disconnect {
            code: reason::KEEPALIVE_TIMEOUT,
            props: Props::default(),
        }),
        Version::V5,
    );
}

#[test]
fn puback_and_disconnect_short_forms_of_5_0() {
    // PUBACK with only a packet id is success; DISCONNECT with nothing is normal.
    let (p, _) = dec(&[0x40, 2, 0, 5], Some(Version::V5)).unwrap().unwrap();
    assert_eq!(
        p,
        Packet::PubAck(PubAck {
            pid: 5,
            code: 0,
            props: Props::default()
        })
    );
    let (p, _) = dec(&[0x40, 3, 0, 5, 0x10], Some(Version::V5))
        .unwrap()
        .unwrap();
    assert!(matches!(p, Packet::PubAck(PubAck { code: 0x10, .. })));
    let (p, _) = dec(&[0xE0, 0], Some(Version::V5)).unwrap().unwrap();
    assert!(matches!(p, Packet::Disconnect(Disconnect { code: 0, .. })));
}

#[test]
fn properties_are_read_back() {
    let mut pb = PropsBuf::default();
    pb.u32(prop::SESSION_EXPIRY, 300)
        .u16(prop::RECEIVE_MAXIMUM, 10)
        .user("a", "1")
        .user("from", "17");
    let p = pb.props();
    assert_eq!(p.int(prop::SESSION_EXPIRY), Some(300));
    assert_eq!(p.int(prop::RECEIVE_MAXIMUM), Some(10));
    assert_eq!(p.user("from"), Some("17"));
    assert_eq!(p.user("nope"), None);
    assert!(!p.has(prop::TOPIC_ALIAS));
}

#[test]
fn remaining_length_is_checked_before_the_bytes_arrive() {
    // 0x30 with remaining length 70000 (f0 a2 04): refused from the header.
    assert_eq!(dec(&[0x30, 0xF0, 0xA2, 0x04], None), Err(Error::TooLarge));
    // Two continuation bytes can only end at 2^14 or more... and 3 at 2^21.
    assert_eq!(dec(&[0x30, 0x80, 0x80, 0x80], None), Err(Error::TooLarge));
    assert_eq!(
        decode(&[0x30, 0x80, 0x80], None, 1000),
        Err(Error::TooLarge)
    );
    assert_eq!(decode(&[0x30, 0x80], None, 1000), Ok(None));
    // A fifth length byte is malformed, as is a non-minimal length.
    assert_eq!(
        decode(
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            None,
            REMAINING_BYTES_MAX
        ),
        Err(Error::Malformed(
            "variable byte integer longer than 4 bytes"
        ))
    );
    assert!(matches!(
        dec(&[0xC0, 0x80, 0x00], None),
        Err(Error::Malformed(_))
    ));
    assert_eq!(dec(&[], None), Ok(None));
    assert_eq!(dec(&[0xC0], None), Ok(None));
}

#[test]
fn connect_refusals() {
    let mut out = Vec::new();
    encode(
        &Packet::Connect(connect(Version::V311)),
        Version::V311,
        &mut out,
    );
    // Protocol level 3 and 6: BadLevel (answered CONNACK 0x01).
    for level in [3u8, 6] {
        let mut b = out.clone();
        b[8] = level;
        assert_eq!(dec(&b, None), Err(Error::BadLevel(level)));
    }
    let mut b = out.clone();
    b[4] = b'X';
    assert_eq!(dec(&b, None), Err(Error::BadProtocolName));
    // Reserved flag bit 0.
    let mut b = out.clone();
    b[9] |= 1;
    assert!(matches!(dec(&b, None), Err(Error::Malformed(_))));
    // 3.1.1: password without user name.
    let c = Connect {
        username: None,
        ..connect(Version::V311)
    };
    let mut b = Vec::new();
    encode(&Packet::Connect(c), Version::V311, &mut b);
    assert_eq!(
        dec(&b, None),
        Err(Error::Malformed("password without user name"))
    );
    // Will QoS without the will flag.
    let mut b = out.clone();
    b[9] |= 0b1000;
    assert!(matches!(dec(&b, None), Err(Error::Malformed(_))));
    // Trailing byte after the password.
    let mut b = out.clone();
    b.push(0);
    b[1] += 1;
    assert_eq!(dec(&b, None), Err(Error::Malformed("trailing bytes")));
    // Truncated: the remaining length says less than the fields need.
    let mut b = out.clone();
    b.pop();
    b[1] -= 1;
    assert_eq!(dec(&b, None), Err(Error::Malformed("truncated field")));
}

#[test]
fn publish_refusals() {
    let v = Some(Version::V311);
    // QoS 2 and 3.
    assert_eq!(
        dec(&[0x34, 5, 0, 1, b'a', 0, 1], v),
        Err(Error::QosNotSupported)
    );
    assert!(matches!(
        dec(&[0x36, 5, 0, 1, b'a', 0, 1], v),
        Err(Error::Malformed(_))
    ));
    // QoS 1 with packet id 0; DUP on QoS 0; wildcards; empty topic.
    assert_eq!(
        dec(&[0x32, 5, 0, 1, b'a', 0, 0], v),
        Err(Error::Malformed("packet identifier 0"))
    );
    assert!(matches!(
        dec(&[0x38, 3, 0, 1, b'a'], v),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        dec(&[0x30, 3, 0, 1, b'#'], v),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        dec(&[0x30, 3, 0, 1, b'+'], v),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(dec(&[0x30, 2, 0, 0], v), Err(Error::Malformed(_))));
    // Invalid UTF-8 and U+0000 in the topic.
    assert_eq!(
        dec(&[0x30, 3, 0, 1, 0xFF], v),
        Err(Error::Malformed("invalid UTF-8"))
    );
    assert!(matches!(
        dec(&[0x30, 3, 0, 1, 0], v),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn property_refusals() {
    let v5 = Some(Version::V5);
    // PUBLISH "a" QoS 0 with properties: unknown id 0x7F.
    assert_eq!(
        dec(&[0x30, 5, 0, 1, b'a', 1, 0x7F], v5),
        Err(Error::Malformed("unknown property"))
    );
    // Session expiry is not a PUBLISH property.
    assert_eq!(
        dec(&[0x30, 9, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1], v5),
        Err(Error::Malformed("property not allowed in this packet"))
    );
    // Topic alias twice.
    assert_eq!(
        dec(&[0x30, 10, 0, 1, b'a', 6, 0x23, 0, 1, 0x23, 0, 1], v5),
        Err(Error::Malformed("property repeated"))
    );
    // Properties longer than the packet.
    assert_eq!(
        dec(&[0x30, 5, 0, 1, b'a', 9, 0x23], v5),
        Err(Error::Malformed("truncated field"))
    );
    // Payload format indicator 2.
    assert_eq!(
        dec(&[0x30, 6, 0, 1, b'a', 2, 0x01, 2], v5),
        Err(Error::Malformed("property value out of range"))
    );
}

#[test]
fn subscribe_refusals() {
    let v = Some(Version::V311);
    // Wrong fixed-header flags (must be 0010).
    assert!(matches!(
        dec(&[0x80, 6, 0, 1, 0, 1, b'a', 1], v),
        Err(Error::Malformed("reserved fixed header flags"))
    ));
    // No filter.
    assert_eq!(
        dec(&[0x82, 2, 0, 1], v),
        Err(Error::Malformed("no topic filter"))
    );
    // QoS 3 and reserved option bits.
    assert!(matches!(
        dec(&[0x82, 6, 0, 1, 0, 1, b'a', 3], v),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        dec(&[0x82, 6, 0, 1, 0, 1, b'a', 4], v),
        Err(Error::Malformed(_))
    ));
    // Nine filters.
    let mut b = vec![0x82, 0, 0, 1];
    for _ in 0..9 {
        b.extend_from_slice(&[0, 1, b'a', 1]);
    }
    b[1] = (b.len() - 2) as u8;
    assert_eq!(dec(&b, v), Err(Error::Malformed("too many topic filters")));
}

#[test]
fn unsupported_packet_types() {
    for first in [0x50u8, 0x62, 0x70, 0xF0] {
        assert!(matches!(
            dec(&[first, 2, 0, 1], None),
            Err(Error::Protocol(_))
        ));
    }
    assert!(matches!(dec(&[0x00, 0], None), Err(Error::Malformed(_))));
    // PINGREQ with a body.
    assert_eq!(
        dec(&[0xC0, 1, 0], None),
        Err(Error::Malformed("trailing bytes"))
    );
}

#[test]
fn filters_iterate_in_order() {
    let mut buf = Vec::new();
    let f = Filters::build(&[("u/1", 1), ("x", 0)], true, &mut buf);
    assert_eq!(f.iter().collect::<Vec<_>>(), [("u/1", 1), ("x", 0)]);
    assert_eq!(f.len(), 2);
}
