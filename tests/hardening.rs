//! Abusive clients over real loopback sockets (docs/HARDENING.md): floods
//! past the per-user rates, repeat offenders, forged READ and DELIVERED,
//! failed-login bans, connection rates and connections that never log in.
//! Small limits keep each test short; every loop is bounded.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use socket2::{Domain, Socket, Type};
use tern::proto::{ByeReason, ErrorCode, Frame, OwnedFrame, ReceiptKind};
use tern_client::Client;

/// Connects to `addr` from source address `ip` (any 127.x.y.z works on
/// loopback).
fn connect_from(ip: [u8; 4], addr: SocketAddr) -> Client {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((IpAddr::from(ip), 0)).into())
        .expect("bind the source address");
    socket.connect(&addr.into()).expect("connect");
    Client::from_stream(socket.into()).expect("client")
}

/// Sends LOGIN with `token` and returns everything up to the close, or
/// `None` if LOGIN_OK came (still open).
fn try_login(client: &mut Client, token: &str) -> Option<Vec<OwnedFrame>> {
    client
        .send_frame(&Frame::Login {
            version: tern::proto::VERSION,
            token: token.as_bytes(),
        })
        .ok()?;
    match client.recv() {
        Ok(OwnedFrame::LoginOk { .. }) => None,
        Ok(frame) => {
            let mut frames = vec![frame];
            frames.extend(client.wait_closed(WAIT).unwrap_or_default());
            Some(frames)
        }
        Err(_) => Some(Vec::new()),
    }
}

fn is_error(frames: &[OwnedFrame], code: ErrorCode) -> bool {
    matches!(frames, [OwnedFrame::Error { code: c, client_id: 0, .. }] if *c == code)
}

/// Waits for the ERROR about `client_id`, or its ACK.
fn answer(client: &mut Client, client_id: u64) -> Result<u64, ErrorCode> {
    ack_or_error(client, client_id)
}

#[test]
fn a_send_flood_is_rate_limited_and_nothing_acked_is_lost() {
    let srv = TestServer::start_with(|c| {
        c.sends_per_s_max = 1;
        c.sends_burst_max = 5;
        c.rate_refusals_max = 0;
    });
    let (flooder, victim) = cross_pair();
    let bystander = users_on(0, SHARDS, 3)[2];
    let mut a = srv.login(flooder);
    let mut b = srv.login(victim);
    let mut c = srv.login(bystander);
    let frames: Vec<Frame<'_>> = (1..=100)
        .map(|i| Frame::Send {
            client_id: i,
            to: victim,
            body: b"flood",
        })
        .collect();
    a.send_raw(&encode_all(&frames)).unwrap();
    let mut acked = Vec::new();
    let mut limited = 0;
    for i in 1..=100 {
        match answer(&mut a, i) {
            Ok(server_id) => acked.push(server_id),
            Err(ErrorCode::RateLimited) => limited += 1,
            Err(other) => panic!("SEND {i}: {other}"),
        }
    }
    assert!(limited > 0 && !acked.is_empty(), "{limited} limited");
    assert!(srv.metric_sum("tern_limited_sends_total") >= limited);
    // Another user is not disturbed.
    c.send_msg(1, victim, b"hello").unwrap();
    let from_c = recv_ack(&mut c, 1);
    // Every acknowledged message reaches the victim, and nothing else.
    let mut got = Vec::new();
    while got.len() < acked.len() + 1 {
        let d = recv_deliver(&mut b);
        b.send_delivered(d.server_id).unwrap();
        got.push(d.server_id);
    }
    acked.push(from_c);
    got.sort_unstable();
    acked.sort_unstable();
    assert_eq!(got, acked);
    // The flooder's connection still works once its bucket refills.
    a.ping(7).unwrap();
}

#[test]
fn a_ping_flood_gets_rate_limited_without_pongs() {
    let srv = TestServer::start_with(|c| {
        c.pings_per_s_max = 1;
        c.pings_burst_max = 3;
        c.rate_refusals_max = 0;
    });
    let mut a = srv.login(users_on(0, SHARDS, 1)[0]);
    let frames: Vec<Frame<'_>> = (0..50).map(|nonce| Frame::Ping { nonce }).collect();
    a.send_raw(&encode_all(&frames)).unwrap();
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 50 {
        match a.recv().unwrap() {
            OwnedFrame::Pong { .. } => pongs += 1,
            OwnedFrame::Error {
                code: ErrorCode::RateLimited,
                client_id: 0,
                ..
            } => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        limited > 0 && pongs >= 3,
        "{pongs} pongs, {limited} limited"
    );
    assert_eq!(srv.metric_sum("tern_limited_pings_total"), limited);
    // Still logged in: a SEND goes through.
    a.send_msg(1, users_on(1, SHARDS, 1)[0], b"still here")
        .unwrap();
    recv_ack(&mut a, 1);
}

#[test]
fn a_repeat_offender_is_closed_with_bye_rate_limited() {
    let srv = TestServer::start_with(|c| {
        c.pings_per_s_max = 1;
        c.pings_burst_max = 1;
        c.rate_refusals_max = 5;
    });
    let mut a = srv.login(users_on(0, SHARDS, 1)[0]);
    let mut other = srv.login(users_on(1, SHARDS, 1)[0]);
    let frames: Vec<Frame<'_>> = (0..100).map(|nonce| Frame::Ping { nonce }).collect();
    a.send_raw(&encode_all(&frames)).unwrap();
    let before = expect_bye_then_close(&mut a, ByeReason::RateLimited);
    let limited = before
        .iter()
        .filter(|f| {
            matches!(
                f,
                OwnedFrame::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
            )
        })
        .count();
    assert_eq!(limited, 6, "closed at the sixth refusal: {before:?}");
    srv.wait_metric("tern_limited_closes_total", |n| n == 1);
    other.ping(1).unwrap();
}

#[test]
fn a_forged_read_is_refused_and_never_relayed() {
    let srv = TestServer::start();
    let (sender, reader) = cross_pair();
    let forger = users_on(0, SHARDS, 3)[2];
    let mut a = srv.login(sender);
    let mut b = srv.login(reader);
    let mut f = srv.login(forger);
    a.send_msg(1, reader, b"secret").unwrap();
    let server_id = recv_ack(&mut a, 1);
    // The forger never got it; the reader names the wrong sender.
    f.send_read(server_id, sender).unwrap();
    let d = recv_deliver(&mut b);
    assert_eq!(d.server_id, server_id);
    b.send_read(server_id, forger).unwrap();
    for client in [&mut f, &mut b] {
        match client.recv_until(|fr| matches!(fr, OwnedFrame::Error { .. })) {
            Ok(OwnedFrame::Error {
                code: ErrorCode::UnknownMessage,
                client_id: 0,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    // The real READ goes through, and it is the only receipt the sender sees.
    b.send_read(server_id, sender).unwrap();
    expect_receipt(&mut a, ReceiptKind::Read, server_id, reader);
    assert!(srv.metric_sum("tern_unknown_message_refusals_total") >= 2);
    // Nothing was relayed to the forger either.
    f.ping(9).unwrap();
    assert!(f.backlog_len() == 0, "the forger got something");
}

#[test]
fn a_delivered_for_someone_elses_message_removes_nothing() {
    let srv = TestServer::start();
    let (sender, recipient) = cross_pair();
    let thief = users_on(0, SHARDS, 3)[2];
    let mut a = srv.login(sender);
    a.send_msg(1, recipient, b"for you").unwrap();
    let server_id = recv_ack(&mut a, 1);
    let mut t = srv.login(thief);
    t.send_delivered(server_id).unwrap();
    match t.recv().unwrap() {
        OwnedFrame::Error {
            code: ErrorCode::UnknownMessage,
            client_id: 0,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    // The recipient logs in later and still gets it; the sender's only
    // receipt is the recipient's.
    let (mut b, info) = srv.login_info(recipient);
    assert_eq!(info.offline_count, 1);
    let d = recv_deliver(&mut b);
    assert_eq!(
        (d.server_id, d.body.as_slice()),
        (server_id, &b"for you"[..])
    );
    b.send_delivered(server_id).unwrap();
    expect_receipt(&mut a, ReceiptKind::Delivered, server_id, recipient);
}

#[test]
fn failed_logins_get_the_address_refused_for_a_while() {
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.addr_logins_failed_max = 2;
        c.addr_ban_ms = 600_000;
    });
    let bad = "v1.7.99999999999.forged";
    for _ in 0..3 {
        let mut c = connect_from([127, 0, 0, 5], srv.addr);
        let frames = try_login(&mut c, bad).expect("refused");
        assert!(
            matches!(
                frames[..],
                [OwnedFrame::LoginErr {
                    code: ErrorCode::BadToken,
                    ..
                }]
            ),
            "{frames:?}"
        );
    }
    srv.wait_metric("tern_addr_bans_total", |n| n == 1);
    // Even a good token from that address is refused now, at connect.
    let mut c = connect_from([127, 0, 0, 5], srv.addr);
    let frames = c.wait_closed(WAIT).expect("closed at once");
    assert!(is_error(&frames, ErrorCode::RateLimited), "{frames:?}");
    assert_eq!(srv.metric_sum("tern_addr_refused_banned_total"), 1);
    // The same counts on the stats socket, per shard.
    let limits = srv.query("show limits");
    let rows: Vec<Vec<&str>> = limits
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let col = |name: &str| rows[0].iter().position(|c| *c == name).unwrap();
    assert_eq!(rows[1][col("bans")], "1", "{limits}");
    assert_eq!(rows[1][col("refused_banned")], "1", "{limits}");
    // Another address is not affected.
    let mut ok = connect_from([127, 0, 0, 6], srv.addr);
    assert!(try_login(&mut ok, &token(42)).is_none());
}

#[test]
fn new_connections_per_second_are_limited_per_address() {
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.addr_conns_per_s_max = 3;
        c.addr_pending_max = 0;
    });
    let mut clients: Vec<Client> = (0..20)
        .map(|_| connect_from([127, 0, 0, 7], srv.addr))
        .collect();
    let mut refused = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        let user = 100 + i as u64;
        match try_login(c, &token(user)) {
            None => {}
            Some(frames) => {
                assert!(is_error(&frames, ErrorCode::RateLimited), "{frames:?}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0);
    assert_eq!(srv.metric_sum("tern_addr_refused_rate_total"), refused);
    let mut other = connect_from([127, 0, 0, 8], srv.addr);
    assert!(try_login(&mut other, &token(99)).is_none());
}

#[test]
fn connections_not_logged_in_are_capped_per_address() {
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.addr_pending_max = 2;
    });
    let _silent: Vec<Client> = (0..2)
        .map(|_| connect_from([127, 0, 0, 9], srv.addr))
        .collect();
    srv.wait_metric("tern_pending", |n| n == 2);
    let mut third = connect_from([127, 0, 0, 9], srv.addr);
    let frames = third.wait_closed(WAIT).expect("closed at once");
    assert!(is_error(&frames, ErrorCode::RateLimited), "{frames:?}");
    assert_eq!(srv.metric_sum("tern_addr_refused_pending_total"), 1);
    let mut other = connect_from([127, 0, 0, 10], srv.addr);
    assert!(try_login(&mut other, &token(5)).is_none());
}

#[test]
fn a_slowloris_swarm_does_not_keep_a_real_client_from_logging_in() {
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.pending_max = 8;
        c.addr_pending_max = 0;
        c.login_timeout_ms = 60_000;
    });
    // 40 silent connections from 40 addresses, far past the cap, each
    // accepted before the next connects (so "oldest" is well defined).
    let mut swarm: Vec<Client> = (0..40u64)
        .map(|i| {
            let c = connect_from([127, 0, 1, 1 + i as u8], srv.addr);
            srv.wait_metric("tern_accepted_total", |n| n == i + 1);
            c
        })
        .collect();
    srv.wait_metric("tern_pending_evicted_total", |n| n >= 40 - 8);
    assert!(srv.metric_sum("tern_pending") <= 8);
    // A real client logs in at once.
    let (mut real, _) = srv.login_info(77);
    real.ping(1).unwrap();
    // The oldest silent connections were told why, and closed.
    let frames = swarm[0].wait_closed(WAIT).expect("evicted");
    assert!(is_error(&frames, ErrorCode::ServerFull), "{frames:?}");
}
