//! Presence, last seen, privacy and typing (protocol v2) over real
//! sockets: a server on a loopback port, real clients, real bytes
//! (docs/PROTOCOL.md, "Presence").

mod common;

use std::path::Path;

use common::child::{serve_command, TernChild};
use common::*;
use tern::proto::{ErrorCode, Frame, OwnedFrame, PresenceState, VERSION_2};
use tern_client::Client;

/// Logs `user` in with protocol version 2.
fn login2(srv: &TestServer, user: u64) -> Client {
    login2_at(srv.addr, user)
}

fn login2_at(addr: std::net::SocketAddr, user: u64) -> Client {
    Client::login_version(addr, &token(user), VERSION_2)
        .unwrap_or_else(|e| panic!("v2 login of {user} failed: {e}"))
        .0
}

fn subscribe(c: &mut Client, user: u64) {
    c.send_frame(&Frame::Subscribe { user }).unwrap();
}

/// The next frame, which must be a PRESENCE: (user, state, last_seen_ms).
fn presence(c: &mut Client) -> (u64, PresenceState, u64) {
    match c.recv() {
        Ok(OwnedFrame::Presence {
            user,
            state,
            last_seen_ms,
        }) => (user, state, last_seen_ms),
        other => panic!("expected PRESENCE, got {other:?}"),
    }
}

/// The connection is still open and has nothing else queued before the
/// PONG: a PING answered next.
fn pong_next(c: &mut Client, nonce: u64) {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    match c.recv() {
        Ok(OwnedFrame::Pong { nonce: n }) if n == nonce => {}
        other => panic!("expected PONG({nonce}), got {other:?}"),
    }
}

#[test]
fn subscribers_get_the_state_now_then_every_change() {
    let srv = TestServer::start();
    // Watched user on the subscriber's shard, and on the other one.
    let (w_same, sub_user) = same_pair();
    let w_other = users_on(0, SHARDS, 1)[0];
    let mut sub = login2(&srv, sub_user);
    for watched in [w_same, w_other] {
        subscribe(&mut sub, watched);
        assert_eq!(presence(&mut sub), (watched, PresenceState::Offline, 0));
        // A v1 session counts as online as well.
        let before = tern::token::now_unix_s() * 1000;
        let w = srv.login(watched);
        assert_eq!(presence(&mut sub), (watched, PresenceState::Online, 0));
        // Logging in again replaces the session: still online, no push.
        let w2 = srv.login(watched);
        drop(w);
        pong_next(&mut sub, watched);
        drop(w2);
        let (u, state, last_seen_ms) = presence(&mut sub);
        assert_eq!((u, state), (watched, PresenceState::Offline));
        assert!(last_seen_ms >= before, "{last_seen_ms} < {before}");
        // A second SUBSCRIBE is answered again with the state now.
        subscribe(&mut sub, watched);
        assert_eq!(
            presence(&mut sub),
            (watched, PresenceState::Offline, last_seen_ms)
        );
    }
    // The watched side counts the two subscriptions until the subscriber
    // leaves.
    srv.wait_metric("tern_presence_subs", |n| n == 2);
    drop(sub);
    srv.wait_metric("tern_presence_subs", |n| n == 0);
}

#[test]
fn subscribing_to_an_online_user_says_online() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut bc = login2(&srv, b);
    let mut ac = login2(&srv, a);
    subscribe(&mut ac, b);
    assert_eq!(presence(&mut ac), (b, PresenceState::Online, 0));
    // Both directions at once.
    subscribe(&mut bc, a);
    assert_eq!(presence(&mut bc), (a, PresenceState::Online, 0));
}

#[test]
fn unsubscribed_users_are_not_pushed() {
    let srv = TestServer::start();
    // Two watched users on one shard: its pushes reach the subscriber in
    // order, so a push for the first would come before the second's.
    let watched = users_on(0, SHARDS, 2);
    let sub_user = users_on(1, SHARDS, 1)[0];
    let mut sub = login2(&srv, sub_user);
    for &w in &watched {
        subscribe(&mut sub, w);
        assert_eq!(presence(&mut sub).0, w);
    }
    sub.send_frame(&Frame::Unsubscribe { user: watched[0] })
        .unwrap();
    // Unknown users are ignored.
    sub.send_frame(&Frame::Unsubscribe { user: 999_999 })
        .unwrap();
    pong_next(&mut sub, 1);
    let _w0 = srv.login(watched[0]);
    let _w1 = srv.login(watched[1]);
    assert_eq!(presence(&mut sub), (watched[1], PresenceState::Online, 0));
    srv.wait_metric("tern_presence_subs", |n| n == 1);
}

#[test]
fn subscriptions_past_the_limit_get_presence_subs_full() {
    let srv = TestServer::start_with(|c| c.presence_subs_max = 2);
    let users = users_on(0, SHARDS, 4);
    let mut sub = login2(&srv, users[0]);
    for &w in &users[1..3] {
        subscribe(&mut sub, w);
        assert_eq!(presence(&mut sub).0, w);
    }
    // One more is refused, naming the user; the connection stays.
    subscribe(&mut sub, users[3]);
    match sub.recv() {
        Ok(OwnedFrame::Error {
            code: ErrorCode::PresenceSubsFull,
            client_id,
            ..
        }) => assert_eq!(client_id, users[3]),
        other => panic!("expected ERROR(presence_subs_full), got {other:?}"),
    }
    // A user already watched is not one more.
    subscribe(&mut sub, users[1]);
    assert_eq!(presence(&mut sub).0, users[1]);
    // After an UNSUBSCRIBE there is room again.
    sub.send_frame(&Frame::Unsubscribe { user: users[2] })
        .unwrap();
    subscribe(&mut sub, users[3]);
    assert_eq!(presence(&mut sub), (users[3], PresenceState::Offline, 0));
    assert_eq!(srv.metric_sum("tern_presence_subs_refused_total"), 1);
}

#[test]
fn a_hidden_user_shows_hidden_and_no_changes() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let c = users_on(0, SHARDS, 2)[1];
    let mut sub = login2(&srv, a);
    subscribe(&mut sub, b);
    assert_eq!(presence(&mut sub), (b, PresenceState::Offline, 0));
    let mut bc = login2(&srv, b);
    assert_eq!(presence(&mut sub), (b, PresenceState::Online, 0));
    bc.send_frame(&Frame::Privacy { hidden: true }).unwrap();
    assert_eq!(presence(&mut sub), (b, PresenceState::Hidden, 0));
    // Logging out and in again shows nothing; a new subscriber sees hidden.
    drop(bc);
    let mut bc = login2(&srv, b);
    let mut sub2 = login2(&srv, c);
    subscribe(&mut sub2, b);
    assert_eq!(presence(&mut sub2), (b, PresenceState::Hidden, 0));
    // Showing again pushes the real state.
    bc.send_frame(&Frame::Privacy { hidden: false }).unwrap();
    assert_eq!(presence(&mut sub), (b, PresenceState::Online, 0));
    assert_eq!(presence(&mut sub2), (b, PresenceState::Online, 0));
}

#[test]
fn typing_reaches_an_online_v2_peer_only() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut ac = login2(&srv, a);
    // Offline peer: dropped, nothing comes back.
    ac.send_frame(&Frame::Typing { user: b }).unwrap();
    pong_next(&mut ac, 1);
    let mut bc = login2(&srv, b);
    ac.send_frame(&Frame::Typing { user: b }).unwrap();
    match bc.recv() {
        Ok(OwnedFrame::Typing { user }) => assert_eq!(user, a),
        other => panic!("expected TYPING, got {other:?}"),
    }
    // A version 1 peer gets nothing.
    drop(bc);
    let mut bc1 = srv.login(b);
    ac.send_frame(&Frame::Typing { user: b }).unwrap();
    srv.wait_metric("tern_typing_relayed_total", |n| n == 1);
    pong_next(&mut ac, 2);
    pong_next(&mut bc1, 3);
}

#[test]
fn presence_frames_are_unknown_types_to_a_v1_session() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let frames = [
        Frame::Subscribe { user: b },
        Frame::Unsubscribe { user: b },
        Frame::Privacy { hidden: true },
        Frame::Typing { user: b },
    ];
    for frame in frames {
        let mut c = srv.login(a);
        c.send_frame(&frame).unwrap();
        let closed = c.wait_closed(WAIT).unwrap();
        // Byte for byte what a server without presence answered.
        let ty = encode_all(&[frame])[1];
        let text = format!("unknown frame type 0x{ty:02x}");
        match closed.as_slice() {
            [OwnedFrame::Error {
                code: ErrorCode::UnknownType,
                client_id: 0,
                text: got,
            }] => assert_eq!(*got, text),
            other => panic!(
                "{}: expected ERROR(unknown_type), got {other:?}",
                frame.name()
            ),
        }
    }
    // And its messaging is unchanged.
    let mut ac = srv.login(a);
    let mut bc = srv.login(b);
    ac.send_msg(1, b, b"hi").unwrap();
    recv_ack(&mut ac, 1);
    assert_eq!(recv_deliver(&mut bc).body, b"hi");
}

fn spawn(dir: &Path) -> TernChild {
    spawn_shards(dir, 2)
}

fn spawn_shards(dir: &Path, shards: usize) -> TernChild {
    let config = dir.join("tern.toml");
    // Last seen written at the next loop iteration: the test waits for the
    // write, then kills.
    std::fs::write(&config, "last_seen_write_s = 0\n").unwrap();
    let shards = shards.to_string();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", &shards]);
    cmd.arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(["--durability", "fsync"]);
    TernChild::expect_start(cmd)
}

fn records_written(dir: &Path) -> u64 {
    let text = tern::stats::query(&dir.join("s.sock"), "show metrics").unwrap();
    metric_sum(&text, "tern_presence_records_total")
}

#[test]
fn last_seen_and_privacy_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // b and c on one shard: their answers come in order.
    let a = users_on(0, SHARDS, 1)[0];
    let [b, c] = users_on(1, SHARDS, 2)[..] else {
        unreachable!()
    };
    let child = spawn(dir.path());
    let mut sub = login2_at(child.addr, a);
    subscribe(&mut sub, b);
    subscribe(&mut sub, c);
    assert_eq!(presence(&mut sub).0, b);
    assert_eq!(presence(&mut sub).0, c);
    // b logs in and out: last seen; c hides itself.
    drop(login2_at(child.addr, b));
    assert_eq!(presence(&mut sub).0, b); // online
    let (_, state, last_seen_ms) = presence(&mut sub);
    assert_eq!(state, PresenceState::Offline);
    assert!(last_seen_ms > 0);
    let mut cc = login2_at(child.addr, c);
    assert_eq!(presence(&mut sub), (c, PresenceState::Online, 0));
    cc.send_frame(&Frame::Privacy { hidden: true }).unwrap();
    assert_eq!(presence(&mut sub), (c, PresenceState::Hidden, 0));
    assert!(wait_for(|| records_written(dir.path()) >= 2));
    drop((sub, cc));
    child.kill9();

    let child = spawn(dir.path());
    let mut sub = login2_at(child.addr, a);
    subscribe(&mut sub, b);
    assert_eq!(
        presence(&mut sub),
        (b, PresenceState::Offline, last_seen_ms)
    );
    subscribe(&mut sub, c);
    assert_eq!(presence(&mut sub), (c, PresenceState::Hidden, 0));
    // An idle server writes nothing.
    pong_next(&mut sub, 1);
    assert_eq!(records_written(dir.path()), 0);
}

#[test]
fn last_seen_and_privacy_move_with_their_users_to_another_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let watched: Vec<u64> = (1..=6).collect();
    let child = spawn(dir.path());
    let mut sub = login2_at(child.addr, 100);
    for &w in &watched {
        subscribe(&mut sub, w);
        assert_eq!(presence(&mut sub).1, PresenceState::Offline);
    }
    // Each logs in and out (the last one hides first): its last seen, as
    // its subscriber saw it.
    let mut last_seen = std::collections::HashMap::new();
    for &w in &watched {
        let mut c = login2_at(child.addr, w);
        assert_eq!(presence(&mut sub), (w, PresenceState::Online, 0));
        if w == 6 {
            c.send_frame(&Frame::Privacy { hidden: true }).unwrap();
            assert_eq!(presence(&mut sub), (w, PresenceState::Hidden, 0));
        }
        drop(c);
        if w != 6 {
            let (u, state, ms) = presence(&mut sub);
            assert_eq!((u, state), (w, PresenceState::Offline));
            last_seen.insert(w, ms);
        }
    }
    // Five last seen, one last seen and one privacy record.
    assert!(wait_for(|| records_written(dir.path()) >= 7));
    drop(sub);
    child.kill9();

    let out = std::process::Command::new(common::child::TERN)
        .args(["store", "reshard", "--shards", "3", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let check = |child: &TernChild| {
        let mut sub = login2_at(child.addr, 100);
        for &w in &watched {
            subscribe(&mut sub, w);
            let want = match last_seen.get(&w) {
                Some(&ms) => (w, PresenceState::Offline, ms),
                None => (w, PresenceState::Hidden, 0),
            };
            assert_eq!(presence(&mut sub), want);
        }
    };
    let child = spawn_shards(dir.path(), 3);
    check(&child);
    child.kill9();
    // A start with another count (nothing queued) moves them as well: a
    // hidden user stays hidden.
    let child = spawn_shards(dir.path(), 2);
    let log = child.log_text();
    assert!(
        log.contains("users moved to their home shards of 2"),
        "{log}"
    );
    check(&child);
}

#[test]
fn each_device_has_its_own_subscriptions() {
    let srv = TestServer::start();
    let watched = users_on(0, SHARDS, 2);
    let user = users_on(1, SHARDS, 1)[0];
    let login = |device| {
        Client::login_version(srv.addr, &device_token(user, device), VERSION_2)
            .unwrap()
            .0
    };
    let (mut phone, mut laptop) = (login(1), login(2));
    for device in [&mut phone, &mut laptop] {
        subscribe(device, watched[0]);
        assert_eq!(presence(device).0, watched[0]);
    }
    subscribe(&mut laptop, watched[1]);
    assert_eq!(presence(&mut laptop).0, watched[1]);
    // The phone leaving ends its subscriptions, not the laptop's; the
    // laptop's UNSUBSCRIBE then ends its own.
    drop(phone);
    srv.wait_metric("tern_presence_subs", |n| n == 2);
    laptop
        .send_frame(&Frame::Unsubscribe { user: watched[0] })
        .unwrap();
    pong_next(&mut laptop, 1);
    srv.wait_metric("tern_presence_subs", |n| n == 1);
    // Pushes from one shard arrive in order: none for the first.
    let _w0 = srv.login(watched[0]);
    let _w1 = srv.login(watched[1]);
    assert_eq!(
        presence(&mut laptop),
        (watched[1], PresenceState::Online, 0)
    );
}
