//! Session life cycle over real loopback sockets: login, login errors,
//! pipelined input after LOGIN, replaced sessions, timeouts and the
//! connection limit.

mod common;

use std::time::Duration;

use common::*;
use tern::proto::{self, ByeReason, ErrorCode, Frame, OwnedFrame};
use tern_client::{Client, ClientError};

#[test]
fn login_ok_with_nothing_waiting() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    for user in [a, b] {
        let (mut client, info) = srv.login_info(user);
        assert_eq!(info.offline_count, 0);
        assert!(info.server_time_ms > 0);
        client.ping(7).expect("a logged-in connection answers PING");
    }
}

/// Sends LOGIN with `version` and `token` and expects LOGIN_ERR(`code`) and
/// then the server closing the connection.
fn expect_login_err(srv: &TestServer, version: u8, token: &[u8], code: ErrorCode) {
    let mut client = Client::connect(srv.addr).unwrap();
    client.send_frame(&Frame::Login { version, token }).unwrap();
    let frames = client
        .wait_closed(WAIT)
        .unwrap_or_else(|e| panic!("expected LOGIN_ERR({code}) then close: {e}"));
    match frames.as_slice() {
        [OwnedFrame::LoginErr { code: got, .. }] if *got == code => {}
        other => panic!("expected LOGIN_ERR({code}) then close, got {other:?}"),
    }
}

#[test]
fn bad_token_is_refused_and_closed() {
    let srv = TestServer::start();
    // Not a token at all.
    expect_login_err(&srv, proto::VERSION, b"hello", ErrorCode::BadToken);
    // Right shape, minted with another secret.
    let forged = tern::token::mint(
        b"some-other-secret-0123456789",
        5,
        tern::token::now_unix_s() + 3600,
    );
    expect_login_err(&srv, proto::VERSION, forged.as_bytes(), ErrorCode::BadToken);
    // A genuine token with its user id changed.
    let genuine = token(5);
    let tampered = genuine.replacen("v1.5.", "v1.6.", 1);
    assert_ne!(genuine, tampered);
    expect_login_err(
        &srv,
        proto::VERSION,
        tampered.as_bytes(),
        ErrorCode::BadToken,
    );
    // The client library reports it as a rejection.
    match Client::login(srv.addr, "v1.1.1.x") {
        Err(ClientError::LoginRejected {
            code: ErrorCode::BadToken,
            ..
        }) => {}
        other => panic!("expected bad_token, got {other:?}"),
    }
}

#[test]
fn expired_token_is_refused_and_closed() {
    let srv = TestServer::start();
    let expired = tern::token::mint(SECRET.as_bytes(), 5, tern::token::now_unix_s() - 10);
    expect_login_err(
        &srv,
        proto::VERSION,
        expired.as_bytes(),
        ErrorCode::TokenExpired,
    );
}

#[test]
fn wrong_version_is_refused_and_closed() {
    let srv = TestServer::start();
    let token = token(5);
    for version in [0, 3, 255] {
        expect_login_err(&srv, version, token.as_bytes(), ErrorCode::BadVersion);
    }
}

/// LOGIN, SEND and PING in one write, for many users: the kernel spreads the
/// connections over both shards, so some are accepted by the shard that is
/// not their home and move there with the SEND and PING still undecoded.
#[test]
fn bytes_pipelined_after_login_are_processed_on_any_shard() {
    let srv = TestServer::start();
    let (recipient, _) = cross_pair();
    let mut inbox = srv.login(recipient);
    const SENDERS: u64 = 32;
    let senders: Vec<u64> = (1..)
        .filter(|&u| u != recipient)
        .take(SENDERS as usize)
        .collect();
    let mut clients = Vec::new();
    for (i, &user) in senders.iter().enumerate() {
        let i = i as u64;
        let token = token(user);
        let body = indexed_body(i, 20);
        let bytes = encode_all(&[
            Frame::Login {
                version: proto::VERSION,
                token: token.as_bytes(),
            },
            Frame::Send {
                client_id: 100 + i,
                to: recipient,
                body: &body,
            },
            Frame::Ping { nonce: 1000 + i },
        ]);
        let mut client = Client::connect(srv.addr).unwrap();
        client.send_raw(&bytes).unwrap();
        clients.push(client);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let i = i as u64;
        match client.recv() {
            Ok(OwnedFrame::LoginOk { offline_count, .. }) => assert_eq!(offline_count, 0),
            other => panic!("sender {i}: expected LOGIN_OK, got {other:?}"),
        }
        recv_ack(client, 100 + i);
        client
            .recv_until(|f| matches!(f, OwnedFrame::Pong { nonce } if *nonce == 1000 + i))
            .unwrap_or_else(|e| panic!("sender {i}: no PONG: {e}"));
    }
    let mut got: Vec<(u64, u64)> = (0..SENDERS)
        .map(|_| {
            let d = recv_deliver(&mut inbox);
            inbox.send_delivered(d.server_id).unwrap();
            (d.from, body_index(&d.body))
        })
        .collect();
    got.sort();
    let mut want: Vec<(u64, u64)> = senders
        .iter()
        .enumerate()
        .map(|(i, &u)| (u, i as u64))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // Some logins did travel to the other shard (2^-32 chance otherwise).
    assert!(
        srv.metric_sum("tern_handoffs_in_total") > 0,
        "no connection was accepted away from its home shard"
    );
}

#[test]
fn second_login_replaces_the_first_session() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut sender = srv.login(a);
    let mut first = srv.login(b);
    let mut second = srv.login(b);
    let before = expect_bye_then_close(&mut first, ByeReason::Replaced);
    assert!(
        before.is_empty(),
        "unexpected frames before BYE: {before:?}"
    );

    sender.send_msg(1, b, b"for the new session").unwrap();
    let server_id = recv_ack(&mut sender, 1);
    let d = recv_deliver(&mut second);
    assert_eq!(d.server_id, server_id);
    assert_eq!(d.from, a);
    assert_eq!(d.body, b"for the new session");
    second.ping(1).unwrap();
}

#[test]
fn idle_logged_in_connection_gets_bye_idle() {
    // A login timeout far beyond the idle timeout: the idle deadline must
    // not wait for the login deadline.
    let srv = TestServer::start_with(|c| {
        c.idle_timeout_ms = 1000;
        c.login_timeout_ms = 60_000;
    });
    let (a, _) = cross_pair();
    let mut client = srv.login(a);
    let before = expect_bye_then_close(&mut client, ByeReason::Idle);
    assert!(
        before.is_empty(),
        "unexpected frames before BYE: {before:?}"
    );
}

#[test]
fn pinging_connection_outlives_the_idle_timeout() {
    // A login timeout far beyond the idle timeout: the idle deadline must
    // not wait for the login deadline.
    let srv = TestServer::start_with(|c| {
        c.idle_timeout_ms = 1000;
        c.login_timeout_ms = 60_000;
    });
    let (a, b) = cross_pair();
    let mut pinger = srv.login(a);
    // A silent connection beside it, to show the timeout is really armed.
    let mut silent = srv.login(b);
    let mut silent_frames = None;
    // PING every 300 ms for at least 3 s (three idle timeouts), and on until
    // the silent connection has been closed (bounded: 40 rounds).
    for nonce in 0..40 {
        std::thread::sleep(Duration::from_millis(300));
        pinger
            .ping(nonce)
            .unwrap_or_else(|e| panic!("PING {nonce} not answered: {e}"));
        if silent_frames.is_none() {
            match silent.wait_closed(Duration::ZERO) {
                Ok(frames) => silent_frames = Some(frames),
                Err(ClientError::Timeout) => {}
                Err(e) => panic!("silent connection: {e}"),
            }
        }
        if nonce >= 10 && silent_frames.is_some() {
            break;
        }
    }
    match silent_frames.as_deref() {
        Some(
            [OwnedFrame::Bye {
                reason: ByeReason::Idle,
            }],
        ) => {}
        other => panic!("silent connection: expected BYE(idle) then close, got {other:?}"),
    }
    assert!(!pinger.is_closed());
}

#[test]
fn connection_without_login_is_closed_after_login_timeout() {
    let srv = TestServer::start_with(|c| c.login_timeout_ms = 500);
    let mut silent = Client::connect(srv.addr).unwrap();
    // Half a LOGIN frame does not count as logging in.
    let mut trickler = Client::connect(srv.addr).unwrap();
    let login = encode_all(&[Frame::Login {
        version: proto::VERSION,
        token: token(3).as_bytes(),
    }]);
    trickler.send_raw(&login[..login.len() / 2]).unwrap();
    for client in [&mut silent, &mut trickler] {
        let frames = client
            .wait_closed(WAIT)
            .unwrap_or_else(|e| panic!("not closed after the login timeout: {e}"));
        assert!(frames.is_empty(), "unexpected frames: {frames:?}");
    }
    // A login that completes in time is not affected.
    let mut ok = srv.login(3);
    std::thread::sleep(Duration::from_millis(800));
    ok.ping(1)
        .expect("logged-in connection outlives login_timeout_ms");
}

#[test]
fn connection_over_conns_max_gets_server_full() {
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.conns_max = 2;
    });
    let mut one = srv.login(1);
    let mut two = srv.login(2);
    let mut third = Client::connect(srv.addr).unwrap();
    expect_error_then_close(&mut third, ErrorCode::ServerFull);
    one.ping(1).unwrap();
    two.ping(2).unwrap();
    one.send_msg(5, 2, b"still working").unwrap();
    recv_ack(&mut one, 5);
    assert_eq!(recv_deliver(&mut two).body, b"still working");
}
