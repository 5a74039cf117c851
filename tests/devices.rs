//! Device tokens (issue 11, first part), end to end over real sockets:
//!
//! - a `v2.<user>.<device>.<expiry>.<mac>` token logs in with protocol 1
//!   and 2; a v1 token still does, as device 0; a device token with a
//!   forged device or an out-of-range one gets LOGIN_ERR(`bad_token`);
//! - `tern token --device N` mints a token the server takes;
//! - each device of a user has its own idempotent-SEND window: a second
//!   device's low client ids are new messages, not `stale_client_id`, and
//!   each device's retry gets its own original ACK, also after kill -9 of
//!   the real binary;
//! - several devices of a user are online at once: a LOGIN of the same
//!   device replaces its session with BYE(`replaced`), another device
//!   joins, up to `devices_per_user_max` (then LOGIN_ERR
//!   `too_many_devices`); every online device gets every message and
//!   answers it on its own; the message stays queued until each
//!   registered device answered, also one that left; the sender's devices
//!   all get the receipts, the delivery receipt once, at the first
//!   DELIVERED;
//! - a v1 client is unchanged: the same LOGIN_OK and DELIVER bytes.
//!
//! Every wait has a generous bound; nothing asserts how fast anything was.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use common::child::{serve_command, TernChild};
use common::*;
use tern::proto::{self, ByeReason, ErrorCode, Frame, OwnedFrame, ReceiptKind};
use tern_client::Client;

/// Logs `device` of `user` in with protocol version 2.
fn login_device(addr: SocketAddr, user: u64, device: u32) -> Client {
    Client::login_version(addr, &device_token(user, device), proto::VERSION_2)
        .unwrap_or_else(|e| panic!("v2 login of user {user} device {device}: {e}"))
        .0
}

/// The ACK (server id, time) for `client_id`, or the refusal's code.
fn ack(client: &mut Client, client_id: u64) -> Result<(u64, u64), ErrorCode> {
    let f = client
        .recv_until(|f| {
            matches!(f, OwnedFrame::Ack { client_id: c, .. } | OwnedFrame::Error { client_id: c, .. } if *c == client_id)
        })
        .unwrap_or_else(|e| panic!("no answer for client_id {client_id}: {e}"));
    match f {
        OwnedFrame::Ack {
            server_id,
            server_time_ms,
            ..
        } => Ok((server_id, server_time_ms)),
        OwnedFrame::Error { code, .. } => Err(code),
        _ => unreachable!(),
    }
}

#[test]
fn device_tokens_log_in_and_v1_tokens_are_device_0() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    for version in [proto::VERSION, proto::VERSION_2] {
        let (mut c, _) = Client::login_version(srv.addr, &device_token(a, 3), version)
            .unwrap_or_else(|e| panic!("device token, protocol {version}: {e}"));
        c.ping(7).expect("the session answers PING");
    }
    // A v1 token is device 0; its messages reach a device-token recipient.
    let mut bc = login_device(srv.addr, b, 1);
    let mut ac = srv.login(a);
    ac.send_msg(5, b, b"from v1").unwrap();
    let sid = recv_ack(&mut ac, 5);
    assert_eq!(recv_deliver(&mut bc).server_id, sid);

    // Forged: device 3's MAC under device 4. Out of range: one past u32.
    let good = device_token(a, 3);
    let forged = good.replacen(&format!("v2.{a}.3."), &format!("v2.{a}.4."), 1);
    let expiry = tern::token::now_unix_s() + 3600;
    let wide = format!(
        "v2.{a}.4294967296.{expiry}.{}",
        good.rsplit('.').next().unwrap()
    );
    for bad in [forged, wide] {
        let err = Client::login_version(srv.addr, &bad, proto::VERSION_2)
            .err()
            .unwrap_or_else(|| panic!("{bad} logged in"));
        assert!(
            err.to_string().contains("token"),
            "{bad}: not refused for its token: {err}"
        );
    }
    assert_eq!(srv.metric_sum("tern_logins_failed_total"), 2);
}

#[test]
fn token_cli_mints_device_tokens() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .env_remove("TERN_TOKEN_SECRET")
        .args(["token", "--user", "42", "--device", "2", "--ttl", "1h"])
        .args(["--token-secret", SECRET])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(minted.starts_with("v2.42.2."), "{minted}");
    assert_eq!(
        tern::token::verify_device(
            SECRET.as_bytes(),
            minted.as_bytes(),
            tern::token::now_unix_s()
        ),
        Ok(tern::token::Claims {
            user: 42,
            device: 2
        })
    );
    let srv = TestServer::start();
    Client::login_version(srv.addr, &minted, proto::VERSION_2).expect("the minted token logs in");
}

/// Device 1 sends client ids 100..=140, then device 2 (a fresh counter)
/// sends 5 and 6 to the same recipient. Returns the ACKs of 140 (device 1)
/// and 5 (device 2).
fn two_devices_send(addr: SocketAddr, a: u64, b: u64) -> ((u64, u64), (u64, u64)) {
    let mut d1 = login_device(addr, a, 1);
    let mut last = None;
    for cid in 100..=140 {
        d1.send_msg(cid, b, b"from device 1").unwrap();
        last = Some(ack(&mut d1, cid).expect("device 1's SEND taken"));
    }
    drop(d1);
    let mut d2 = login_device(addr, a, 2);
    d2.send_msg(5, b, b"from device 2").unwrap();
    let five = ack(&mut d2, 5).expect("device 2's low client id is new, not stale");
    d2.send_msg(6, b, b"from device 2").unwrap();
    ack(&mut d2, 6).expect("device 2 goes on");
    (last.unwrap(), five)
}

#[test]
fn each_device_has_its_own_send_window() {
    let srv = TestServer::start();
    for (a, b) in [cross_pair(), same_pair()] {
        let (d1_140, d2_5) = two_devices_send(srv.addr, a, b);
        // Each device's retry gets its own original ACK.
        let mut d2 = login_device(srv.addr, a, 2);
        d2.send_msg(5, b, b"from device 2").unwrap();
        assert_eq!(ack(&mut d2, 5), Ok(d2_5));
        drop(d2);
        let mut d1 = login_device(srv.addr, a, 1);
        d1.send_msg(140, b, b"from device 1").unwrap();
        assert_eq!(ack(&mut d1, 140), Ok(d1_140));
        // Device 1's own window still refuses its old ids.
        d1.send_msg(5, b, b"from device 1").unwrap();
        assert_eq!(ack(&mut d1, 5), Err(ErrorCode::StaleClientId));
        drop(d1);
        // The recipient got each message once: 41 + 2.
        let mut bc = Client::login_version(srv.addr, &device_token(b, 0), proto::VERSION_2)
            .unwrap()
            .0;
        let mut bodies = Vec::new();
        for _ in 0..43 {
            let d = recv_deliver(&mut bc);
            bc.send_delivered(d.server_id).unwrap();
            bodies.push(d.body);
        }
        assert_eq!(
            bodies
                .iter()
                .filter(|b| b.as_slice() == b"from device 2")
                .count(),
            2
        );
        // Nothing more: a fresh message is the next DELIVER.
        let mut ac = srv.login(a);
        ac.send_msg(1, b, b"fresh").unwrap();
        recv_ack(&mut ac, 1);
        assert_eq!(recv_deliver(&mut bc).body, b"fresh");
    }
}

/// No frame other than PONG(`nonce`) comes before it: nothing else was
/// pending for `c` (the server writes in order).
fn nothing_before_pong(c: &mut Client, nonce: u64) {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    match c.recv_until(|_| true) {
        Ok(OwnedFrame::Pong { nonce: n }) if n == nonce => {}
        other => panic!("expected only PONG({nonce}), got {other:?}"),
    }
}

#[test]
fn devices_join_and_each_gets_every_message() {
    let srv = TestServer::start();
    for (a, b) in [cross_pair(), same_pair()] {
        // Device 0 (a v1 token) and two device tokens: three sessions.
        let mut d0 = srv.login(a);
        let mut d1 = login_device(srv.addr, a, 1);
        let mut d2 = login_device(srv.addr, a, 2);
        let mut bc = srv.login(b);
        assert_eq!(srv.wait_info("Sessions_online", |n| n == 4), 4);
        assert_eq!(srv.info_u64("Users_online"), 2);

        bc.send_msg(1, a, b"to every device").unwrap();
        let sid = recv_ack(&mut bc, 1);
        let mut devices = [&mut d0, &mut d1, &mut d2];
        for d in devices.iter_mut() {
            let got = recv_deliver(d);
            assert_eq!((got.server_id, got.from), (sid, b));
            assert_eq!(got.body, b"to every device");
        }
        // The first DELIVERED brings the receipt; the others none.
        d1.send_delivered(sid).unwrap();
        expect_receipt(&mut bc, ReceiptKind::Delivered, sid, a);
        // Still queued: devices 0 and 2 owe it.
        assert_eq!(srv.wait_info("Queued", |n| n == 1), 1);
        d0.send_delivered(sid).unwrap();
        d2.send_delivered(sid).unwrap();
        // A repeat from a device that answered is harmless.
        d2.send_delivered(sid).unwrap();
        nothing_before_pong(&mut d2, 11);
        assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
        nothing_before_pong(&mut bc, 12);
        // READ on any device reaches the sender.
        d2.send_read(sid, b).unwrap();
        expect_receipt(&mut bc, ReceiptKind::Read, sid, a);

        // A device that leaves still owes it (it is registered): device 1
        // answers, device 2 leaves without answering, and the message
        // waits for device 2 (tests/device_registry.rs has more).
        bc.send_msg(2, a, b"second").unwrap();
        let sid2 = recv_ack(&mut bc, 2);
        for d in [&mut d0, &mut d1, &mut d2] {
            assert_eq!(recv_deliver(d).server_id, sid2);
        }
        d1.send_delivered(sid2).unwrap();
        expect_receipt(&mut bc, ReceiptKind::Delivered, sid2, a);
        drop(d2);
        d0.send_delivered(sid2).unwrap();
        assert_eq!(srv.wait_info("Sessions_online", |n| n == 3), 3);
        assert_eq!(srv.wait_info("Queued", |n| n == 1), 1);
        assert_eq!(srv.info_u64("Users_online"), 2);
        let mut d2 = login_device(srv.addr, a, 2);
        assert_eq!(recv_deliver(&mut d2).server_id, sid2);
        d2.send_delivered(sid2).unwrap();
        assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
        nothing_before_pong(&mut bc, 13);
        drop(d2);
        drop((d0, d1, bc));
        assert_eq!(srv.wait_info("Sessions_online", |n| n == 0), 0);
        assert_eq!(srv.info_u64("Users_online"), 0);
    }
}

#[test]
fn a_joining_device_gets_what_is_still_queued() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut d1 = login_device(srv.addr, a, 1);
    let mut bc = srv.login(b);
    bc.send_msg(1, a, b"before the second device").unwrap();
    let sid = recv_ack(&mut bc, 1);
    assert_eq!(recv_deliver(&mut d1).server_id, sid);
    // Device 2 joins while device 1 has not answered: both owe it.
    let mut d2 = login_device(srv.addr, a, 2);
    assert_eq!(recv_deliver(&mut d2).server_id, sid);
    d2.send_delivered(sid).unwrap();
    expect_receipt(&mut bc, ReceiptKind::Delivered, sid, a);
    assert_eq!(srv.wait_info("Queued", |n| n == 1), 1);
    d1.send_delivered(sid).unwrap();
    assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
    nothing_before_pong(&mut bc, 1);
}

#[test]
fn the_same_device_replaces_its_session() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut d1 = login_device(srv.addr, a, 1);
    let mut d2 = login_device(srv.addr, a, 2);
    let mut d1_again = login_device(srv.addr, a, 1);
    expect_bye_then_close(&mut d1, ByeReason::Replaced);
    let mut bc = srv.login(b);
    bc.send_msg(1, a, b"to a").unwrap();
    let sid = recv_ack(&mut bc, 1);
    assert_eq!(recv_deliver(&mut d1_again).server_id, sid);
    assert_eq!(recv_deliver(&mut d2).server_id, sid);
    assert_eq!(srv.wait_info("Sessions_online", |n| n == 3), 3);
    assert_eq!(srv.info_u64("Users_online"), 2);
}

#[test]
fn a_device_over_the_limit_is_refused() {
    let srv = TestServer::start_with(|c| c.devices_per_user_max = 2);
    let (a, _) = cross_pair();
    let _d1 = login_device(srv.addr, a, 1);
    let mut d2 = login_device(srv.addr, a, 2);
    for version in [proto::VERSION, proto::VERSION_2] {
        match Client::login_version(srv.addr, &device_token(a, 3), version) {
            Err(tern_client::ClientError::LoginRejected { code, .. }) => {
                assert_eq!(code, ErrorCode::TooManyDevices)
            }
            other => panic!("a third device: {:?}", other.map(|_| ())),
        }
    }
    // An online device logging in again is a replacement, not one more.
    let _d2_again = login_device(srv.addr, a, 2);
    expect_bye_then_close(&mut d2, ByeReason::Replaced);
    assert_eq!(srv.wait_info("Sessions_online", |n| n == 2), 2);
    assert_eq!(srv.metric_sum("tern_logins_failed_total"), 2);
}

#[test]
fn receipts_go_to_every_device_of_the_sender() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut a1 = login_device(srv.addr, a, 1);
    let mut a2 = login_device(srv.addr, a, 2);
    let mut bc = srv.login(b);
    a1.send_msg(1, b, b"from device 1").unwrap();
    let sid = ack(&mut a1, 1).unwrap().0;
    assert_eq!(recv_deliver(&mut bc).server_id, sid);
    bc.send_delivered(sid).unwrap();
    bc.send_read(sid, a).unwrap();
    for d in [&mut a1, &mut a2] {
        expect_receipt(d, ReceiptKind::Delivered, sid, b);
        expect_receipt(d, ReceiptKind::Read, sid, b);
    }
}

#[test]
fn the_senders_other_v2_devices_get_a_sent_copy() {
    let srv = TestServer::start();
    for (a, b) in [cross_pair(), same_pair()] {
        let mut a1 = login_device(srv.addr, a, 1);
        let mut a2 = login_device(srv.addr, a, 2);
        // Device 0 with protocol 1: gets no new frame.
        let mut a0 = srv.login(a);
        let mut bc = srv.login(b);
        a1.send_msg(100, b, b"from device 1").unwrap();
        let (sid, time) = ack(&mut a1, 100).unwrap();
        match a2.recv_until(|f| matches!(f, OwnedFrame::Sent { .. })) {
            Ok(OwnedFrame::Sent {
                server_id,
                to,
                server_time_ms,
                client_id,
                body,
            }) => {
                assert_eq!(
                    (server_id, to, server_time_ms, client_id),
                    (sid, b, time, 100)
                );
                assert_eq!(body, b"from device 1");
            }
            other => panic!("expected SENT, got {other:?}"),
        }
        assert_eq!(recv_deliver(&mut bc).server_id, sid);
        bc.send_delivered(sid).unwrap();
        // Every device gets the receipt; the v1 one and the sender no SENT.
        for d in [&mut a0, &mut a1, &mut a2] {
            expect_receipt(d, ReceiptKind::Delivered, sid, b);
        }
        nothing_before_pong(&mut a0, 1);
        nothing_before_pong(&mut a1, 2);
        // A refused SEND (user 0) makes no copy.
        a1.send_msg(101, 0, b"nobody").unwrap();
        assert_eq!(ack(&mut a1, 101), Err(ErrorCode::BadRecipient));
        nothing_before_pong(&mut a2, 3);
    }
}

fn spawn(dir: &Path) -> TernChild {
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2"]);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(["--durability", "fsync"]);
    TernChild::expect_start(cmd)
}

#[test]
fn device_windows_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = cross_pair();
    let child = spawn(dir.path());
    let (d1_140, d2_5) = two_devices_send(child.addr, a, b);
    child.kill9();
    let child = spawn(dir.path());
    let mut d2 = login_device(child.addr, a, 2);
    d2.send_msg(5, b, b"from device 2").unwrap();
    assert_eq!(ack(&mut d2, 5), Ok(d2_5));
    drop(d2);
    let mut d1 = login_device(child.addr, a, 1);
    d1.send_msg(140, b, b"from device 1").unwrap();
    assert_eq!(ack(&mut d1, 140), Ok(d1_140));
}

/// Reads whole frames from `s` until `n` have arrived; returns their bytes.
fn read_frames(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let limits = proto::Limits::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut at = 0;
        let mut frames = 0;
        while let Ok(Some((_, used))) = proto::decode(&buf[at..], &limits) {
            at += used;
            frames += 1;
        }
        if frames >= n {
            return buf;
        }
        let got = s.read(&mut chunk).expect("frames before the timeout");
        assert!(got > 0, "closed after {frames} frames");
        buf.extend_from_slice(&chunk[..got]);
    }
}

#[test]
fn v1_clients_see_the_same_bytes() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    // b logs in with protocol 1 and a v1 token, by hand: LOGIN_OK is
    // `L 02 time 00`, and a DELIVER from a device-token sender is the v1
    // layout (type 06, no client id).
    let mut raw = TcpStream::connect(srv.addr).unwrap();
    raw.write_all(&encode_all(&[Frame::Login {
        version: proto::VERSION,
        token: token(b).as_bytes(),
    }]))
    .unwrap();
    let login_ok = read_frames(&mut raw, 1);
    assert_eq!(login_ok[1], 0x02);
    assert_eq!(*login_ok.last().unwrap(), 0, "offline_count 0");
    let mut ac = login_device(srv.addr, a, 3);
    ac.send_msg(9, b, b"hi").unwrap();
    let (sid, time) = ack(&mut ac, 9).unwrap();
    let got = read_frames(&mut raw, 1);
    let expected = encode_all(&[Frame::Deliver {
        server_id: sid,
        from: a,
        server_time_ms: time,
        client_id: None,
        body: b"hi",
    }]);
    assert_eq!(got, expected);
    assert_eq!(expected[1], 0x06);

    // With another device of b online beside it, the v1 connection still
    // gets the v1 bytes. The joining device first gets "hi", which the v1
    // connection has not answered: still queued.
    let first = sid;
    let mut b1 = login_device(srv.addr, b, 1);
    assert_eq!(recv_deliver(&mut b1).server_id, first);
    ac.send_msg(10, b, b"again").unwrap();
    let (sid, time) = ack(&mut ac, 10).unwrap();
    let got = read_frames(&mut raw, 1);
    let expected = encode_all(&[Frame::Deliver {
        server_id: sid,
        from: a,
        server_time_ms: time,
        client_id: None,
        body: b"again",
    }]);
    assert_eq!(got, expected);
    assert_eq!(recv_deliver(&mut b1).server_id, sid);
}

#[test]
fn a_device_answers_only_for_what_it_was_sent() {
    let srv = TestServer::start();
    let (sender, user) = cross_pair();
    let mut a = srv.login(sender);
    let mut phone = login_device(srv.addr, user, 1);
    a.send_msg(1, user, b"for the phone").unwrap();
    let server_id = recv_ack(&mut a, 1);
    let d = recv_deliver(&mut phone);
    assert_eq!(d.server_id, server_id);
    phone.send_delivered(server_id).unwrap();
    expect_receipt(&mut a, ReceiptKind::Delivered, server_id, user);
    // The laptop logs in after: the message left the queue, it never got
    // it, so its READ is refused and nothing reaches the sender.
    let mut laptop = login_device(srv.addr, user, 2);
    laptop.send_read(server_id, sender).unwrap();
    match laptop.recv_until(|f| matches!(f, OwnedFrame::Error { .. })) {
        Ok(OwnedFrame::Error {
            code: ErrorCode::UnknownMessage,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // The phone's READ goes through: the only receipt the sender sees.
    phone.send_read(server_id, sender).unwrap();
    expect_receipt(&mut a, ReceiptKind::Read, server_id, user);
}
