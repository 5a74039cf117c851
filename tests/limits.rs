//! Protocol violations, limits and fault isolation over real loopback
//! sockets: malformed frames, slow readers, panics in a session handler.

mod common;

use std::net::SocketAddr;

use common::*;
use tern::proto::{self, ByeReason, ErrorCode, Frame, OwnedFrame};
use tern_client::{Client, ClientError, LoginInfo};

/// One bad input: whether to log in first, the bytes, and the expected code.
struct Case {
    name: &'static str,
    login: bool,
    bytes: Vec<u8>,
    code: ErrorCode,
}

fn malformed_cases() -> Vec<Case> {
    let enc = |f: Frame<'_>| encode_all(&[f]);
    let mut http = b"GET / HTTP/1.1\r\nHost: tern.example\r\nUser-Agent: probe/1.0\r\n".to_vec();
    http.extend_from_slice(b"Accept: */*\r\nConnection: close\r\n\r\n");
    assert!(http.len() > 72, "the garbage must hold a whole 'frame'");
    let big_body = vec![b'b'; 65_001];
    vec![
        Case {
            name: "unknown type 0x13",
            login: true,
            bytes: vec![0x01, 0x13],
            code: ErrorCode::UnknownType,
        },
        Case {
            name: "unknown type 0x2d (after the group types)",
            login: true,
            bytes: vec![0x01, 0x2d],
            code: ErrorCode::UnknownType,
        },
        Case {
            name: "GROUP_RECEIPT with no member (malformed list)",
            login: true,
            bytes: vec![0x04, 0x2c, 0x01, 0x01, 0x01],
            code: ErrorCode::Malformed,
        },
        Case {
            name: "unknown type 0x00",
            login: true,
            bytes: vec![0x02, 0x00, 0x00],
            code: ErrorCode::UnknownType,
        },
        Case {
            name: "non-minimal varint in a field",
            login: true,
            bytes: vec![0x03, 0x0a, 0x80, 0x00],
            code: ErrorCode::Malformed,
        },
        Case {
            name: "varint overflowing u64 in a field",
            login: true,
            bytes: [
                &[0x0b, 0x0a][..],
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            ]
            .concat(),
            code: ErrorCode::Malformed,
        },
        Case {
            name: "trailing bytes",
            login: true,
            bytes: vec![0x03, 0x0a, 0x01, 0x02],
            code: ErrorCode::Malformed,
        },
        Case {
            name: "truncated field",
            login: true,
            bytes: vec![0x02, 0x04, 0x01],
            code: ErrorCode::Malformed,
        },
        Case {
            // Only the prefix is sent: the server must not wait for 70000 bytes.
            name: "length prefix 70000 > frame_bytes_max",
            login: true,
            bytes: vec![0xf0, 0xa2, 0x04],
            code: ErrorCode::TooLarge,
        },
        Case {
            name: "incomplete length prefix that can only end too large",
            login: true,
            bytes: vec![0x80, 0x80, 0x80],
            code: ErrorCode::TooLarge,
        },
        Case {
            name: "body over body_bytes_max in a frame within frame_bytes_max",
            login: true,
            bytes: enc(Frame::Send {
                client_id: 1,
                to: 2,
                body: &big_body,
            }),
            code: ErrorCode::TooLarge,
        },
        Case {
            name: "PING before LOGIN",
            login: false,
            bytes: enc(Frame::Ping { nonce: 1 }),
            code: ErrorCode::NotLoggedIn,
        },
        Case {
            name: "SEND before LOGIN",
            login: false,
            bytes: enc(Frame::Send {
                client_id: 1,
                to: 2,
                body: b"hi",
            }),
            code: ErrorCode::NotLoggedIn,
        },
        Case {
            name: "ACK from a client",
            login: true,
            bytes: enc(Frame::Ack {
                client_id: 1,
                server_id: 2,
                server_time_ms: 3,
            }),
            code: ErrorCode::BadState,
        },
        Case {
            name: "DELIVER from a client",
            login: true,
            bytes: enc(Frame::Deliver {
                server_id: 1,
                from: 2,
                server_time_ms: 3,
                client_id: None,
                body: b"x",
            }),
            code: ErrorCode::BadState,
        },
        Case {
            name: "LOGIN_OK from a client",
            login: true,
            bytes: enc(Frame::LoginOk {
                server_time_ms: 1,
                offline_count: 0,
            }),
            code: ErrorCode::BadState,
        },
        Case {
            name: "second LOGIN",
            login: true,
            bytes: enc(Frame::Login {
                version: proto::VERSION,
                token: token(77).as_bytes(),
            }),
            code: ErrorCode::AlreadyLoggedIn,
        },
        Case {
            name: "HTTP request (garbage bytes)",
            login: false,
            bytes: http,
            code: ErrorCode::UnknownType,
        },
        Case {
            name: "empty frame",
            login: true,
            bytes: vec![0x00],
            code: ErrorCode::Malformed,
        },
    ]
}

/// Two bystanders on different shards exchange a message and a PING.
fn bystanders_still_work(x: &mut Client, y: &mut Client, xu: u64, yu: u64, round: u64) {
    x.send_msg(round, yu, b"still here").unwrap();
    recv_ack(x, round);
    let d = recv_deliver(y);
    assert_eq!(d.from, xu);
    y.send_delivered(d.server_id).unwrap();
    x.ping(round).unwrap();
    y.ping(round).unwrap();
}

#[test]
fn malformed_frames_get_an_error_and_a_clean_close() {
    let srv = TestServer::start();
    let (xu, yu) = cross_pair();
    let mut x = srv.login(xu);
    let mut y = srv.login(yu);
    let cases = malformed_cases();
    for (i, case) in cases.iter().enumerate() {
        // Victims on both shards, alternately.
        let user = users_on(i % SHARDS, SHARDS, 10)[5 + i / SHARDS % 5];
        let mut client = if case.login {
            srv.login(user)
        } else {
            Client::connect(srv.addr).unwrap()
        };
        client.send_raw(&case.bytes).unwrap();
        let frames = client
            .wait_closed(WAIT)
            .unwrap_or_else(|e| panic!("{}: expected ERROR then close, got {e}", case.name));
        match frames.as_slice() {
            [OwnedFrame::Error {
                code, client_id: 0, ..
            }] if *code == case.code => {}
            other => panic!(
                "{}: expected ERROR({}) then close, got {other:?}",
                case.name, case.code
            ),
        }
        bystanders_still_work(&mut x, &mut y, xu, yu, i as u64 + 1);
    }
    srv.wait_metric("tern_protocol_errors_total", |n| n == cases.len() as u64);
}

/// A SEND to `PANIC_USER` panics inside the session handler (debug builds):
/// only that connection is closed, and the panic is counted.
#[cfg(debug_assertions)]
#[test]
fn panic_in_one_session_closes_only_that_connection() {
    let srv = TestServer::start();
    let same = users_on(0, SHARDS, 2);
    let (victim, neighbour) = (same[0], same[1]);
    let other = users_on(1, SHARDS, 1)[0];
    let mut v = srv.login(victim);
    let mut n = srv.login(neighbour);
    let mut o = srv.login(other);

    v.send_msg(1, tern::shard::PANIC_USER, b"boom").unwrap();
    let frames = v
        .wait_closed(WAIT)
        .unwrap_or_else(|e| panic!("the panicking connection was not closed: {e}"));
    assert!(frames.is_empty(), "unexpected frames: {frames:?}");

    // The neighbour on the same shard, and the other shard, carry on.
    n.ping(1).unwrap();
    n.send_msg(2, other, b"after the panic").unwrap();
    recv_ack(&mut n, 2);
    assert_eq!(recv_deliver(&mut o).body, b"after the panic");
    o.send_msg(3, neighbour, b"and back").unwrap();
    recv_ack(&mut o, 3);
    assert_eq!(recv_deliver(&mut n).body, b"and back");

    assert_eq!(srv.info_u64("Panics"), 1);
    // The victim's user can log in again.
    let mut again = srv.login(victim);
    again.ping(4).unwrap();
}

/// A client whose socket receives at most a few KiB, for a reader that
/// falls behind quickly.
fn login_with_small_rcvbuf(addr: SocketAddr, user: u64) -> (Client, LoginInfo) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut client = Client::from_stream(socket.into()).unwrap();
    let info = client.login_here(&token(user)).unwrap();
    (client, info)
}

#[test]
fn slow_reader_is_closed_and_loses_nothing() {
    const BODY: usize = 4000;
    const MESSAGES_MAX: u64 = 5000;
    const BATCH: u64 = 20;
    let srv = TestServer::start_with(|c| {
        c.frame_bytes_max = 4096;
        c.body_bytes_max = BODY;
        c.conn_out_bytes_max = 8192;
        c.queue_len_max = 100_000;
        // No delivery window: the output budget is what stops Bob.
        c.deliver_inflight_max = 100_000;
        c.deliver_inflight_bytes_max = 1 << 30;
    });
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let (mut slow, _) = login_with_small_rcvbuf(srv.addr, b);

    // Alice sends until the server gives up on Bob, reading her ACKs as she
    // goes so she is never the slow one.
    let mut acked: Vec<u64> = Vec::new();
    let mut closed = false;
    while !closed && (acked.len() as u64) < MESSAGES_MAX {
        let first = acked.len() as u64;
        for i in first..first + BATCH {
            alice.send_msg(i + 1, b, &indexed_body(i, BODY)).unwrap();
        }
        for i in first..first + BATCH {
            acked.push(recv_ack(&mut alice, i + 1));
        }
        closed = srv.metric_sum("tern_slow_closes_total") > 0;
    }
    assert!(
        closed,
        "bob never read and was not closed after {} messages",
        acked.len()
    );

    // What Bob's old connection did get is in order; it ends with BYE(slow)
    // or is cut off once the linger time is over.
    let mut seen = 0;
    loop {
        match slow.recv() {
            Ok(OwnedFrame::Deliver { server_id, .. }) => {
                assert_eq!(server_id, acked[seen], "old connection: out of order");
                seen += 1;
            }
            Ok(OwnedFrame::Bye {
                reason: ByeReason::Slow,
            }) => {
                slow.wait_closed(WAIT).expect("closed after BYE(slow)");
                break;
            }
            Err(ClientError::Closed | ClientError::Decode(_)) => break,
            other => panic!("old connection: unexpected {other:?}"),
        }
    }
    drop(slow);

    // Bob comes back and reads properly, through a small receive buffer
    // again, so the backlog cannot leave in one socket write: he gets every
    // ACKed message, in order, exactly once, and catches up in this one
    // session without being taken for a slow reader.
    let (mut bob, info) = login_with_small_rcvbuf(srv.addr, b);
    assert_eq!(info.offline_count, acked.len() as u64);
    for (i, &server_id) in acked.iter().enumerate() {
        match bob.recv() {
            Ok(OwnedFrame::Deliver {
                server_id: got,
                from,
                body,
                ..
            }) => {
                assert_eq!(got, server_id, "message {i}: out of order");
                assert_eq!(from, a);
                assert_eq!(body_index(&body), i as u64);
                bob.send_delivered(got).unwrap();
            }
            other => panic!(
                "message {i} of {}: expected DELIVER, got {other:?}",
                acked.len()
            ),
        }
    }
    bob.ping(1).expect("bob, reading, stays connected");
    assert_eq!(bob.backlog_len(), 0, "more DELIVERs than messages");
    assert_eq!(srv.metric_sum("tern_slow_closes_total"), 1);
    drop(bob);
    // Nothing is left queued once Bob acknowledged everything.
    srv.wait_info("Users_online", |n| n == 1);
    let (_bob, info) = srv.login_info(b);
    assert_eq!(
        info.offline_count, 0,
        "acknowledged messages are still queued"
    );
}
