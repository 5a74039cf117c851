//! The durable device registry (issue 11), end to end over real sockets,
//! on the backend `TERN_TEST_IO` picks:
//!
//! - a device registered at its first login gets its own copy of every
//!   message while it is offline: the message stays queued after another
//!   device answered it (the sender has its delivery receipt at that
//!   first DELIVERED) and leaves once the offline device, back, answers
//!   too; a device is not sent again what it answered;
//! - kill -9 of the real binary with several devices, marks and receipts
//!   waiting for offline devices: after the restart each device gets what
//!   it had not answered, in order, and each of the sender's devices gets
//!   every receipt; the same after a graceful restart;
//! - `devices_per_user_max` counts registered devices: one more is refused
//!   while the others are offline, and gets in once one is removed;
//! - an offline device is removed by DEVICE_REMOVE or by the operator:
//!   what only it owed leaves the queue; removing a user's last device
//!   drops its queue;
//! - `device_idle_days_max`: a device offline for longer is dropped with
//!   its copies, counted in `tern_devices_expired_total`, and the user's
//!   online version 2 devices get DEVICE_REMOVED.
//!
//! Every wait has a generous bound; nothing asserts how fast anything was.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::child::{serve_command, TernChild};
use common::*;
use tern::proto::{self, ErrorCode, Frame, OwnedFrame, ReceiptKind};
use tern_client::{Client, LoginInfo};

/// Logs `device` of `user` in with protocol version 2.
fn login_device(addr: SocketAddr, user: u64, device: u32) -> (Client, LoginInfo) {
    Client::login_version(addr, &device_token(user, device), proto::VERSION_2)
        .unwrap_or_else(|e| panic!("v2 login of user {user} device {device}: {e}"))
}

/// No frame other than PONG(`nonce`) comes before it.
fn nothing_before_pong(c: &mut Client, nonce: u64) {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    match c.recv_until(|_| true) {
        Ok(OwnedFrame::Pong { nonce: n }) if n == nonce => {}
        other => panic!("expected only PONG({nonce}), got {other:?}"),
    }
}

/// Waits until `user` has no session online (its last connection closed).
fn wait_offline(srv: &TestServer, user: u64) {
    let online = || parse_info(&srv.query(&format!("show user {user}")))["Online"].clone();
    assert!(wait_for(|| online() == "no"), "user {user} stays online");
}

/// The next frame on `c` is DEVICE_REMOVED(`device`).
fn expect_removed(c: &mut Client, device: u64) {
    match c.recv_until(|_| true) {
        Ok(OwnedFrame::DeviceRemoved { device: d }) if d == device => {}
        other => panic!("expected DEVICE_REMOVED({device}), got {other:?}"),
    }
}

#[test]
fn an_offline_device_gets_its_copy_after_another_answered() {
    let srv = TestServer::start();
    // Four users, none in both passes (registrations outlive a pass).
    let on_0 = users_on(0, SHARDS, 3);
    for (a, b) in [cross_pair(), (on_0[1], on_0[2])] {
        // Both devices register at their first login; the laptop leaves.
        let (mut phone, _) = login_device(srv.addr, a, 1);
        let (laptop, _) = login_device(srv.addr, a, 2);
        drop(laptop);
        let registered =
            || parse_info(&srv.query(&format!("show user {a}")))["Devices_online"].clone();
        assert!(wait_for(|| registered() == "1"), "{}", registered());
        let shown = parse_info(&srv.query(&format!("show user {a}")));
        assert_eq!(shown["Devices_registered"], "1 2", "{shown:?}");

        let mut bc = srv.login(b);
        bc.send_msg(1, a, b"for both").unwrap();
        let sid = recv_ack(&mut bc, 1);
        assert_eq!(recv_deliver(&mut phone).server_id, sid);
        phone.send_delivered(sid).unwrap();
        expect_receipt(&mut bc, ReceiptKind::Delivered, sid, a);
        // The laptop still owes it: it stays queued.
        nothing_before_pong(&mut phone, 1);
        assert_eq!(srv.wait_info("Queued", |n| n == 1), 1);

        // Back, the laptop gets it (counted in its LOGIN_OK); no second
        // delivery receipt when it answers, and the message is gone.
        let (mut laptop, info) = login_device(srv.addr, a, 2);
        assert_eq!(info.offline_count, 1);
        let got = recv_deliver(&mut laptop);
        assert_eq!((got.server_id, &got.body[..]), (sid, &b"for both"[..]));
        laptop.send_delivered(sid).unwrap();
        assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
        nothing_before_pong(&mut bc, 2);

        // A device is not sent again what it answered: the phone, back
        // after a message only it answered, gets nothing old.
        drop(laptop);
        wait_offline_device(&srv, a, 2);
        bc.send_msg(2, a, b"second").unwrap();
        let sid2 = recv_ack(&mut bc, 2);
        assert_eq!(recv_deliver(&mut phone).server_id, sid2);
        phone.send_delivered(sid2).unwrap();
        expect_receipt(&mut bc, ReceiptKind::Delivered, sid2, a);
        nothing_before_pong(&mut phone, 3);
        drop(phone);
        wait_offline(&srv, a);
        let (mut phone, info) = login_device(srv.addr, a, 1);
        assert_eq!(info.offline_count, 0);
        nothing_before_pong(&mut phone, 4);
        let (mut laptop, info) = login_device(srv.addr, a, 2);
        assert_eq!(info.offline_count, 1);
        assert_eq!(recv_deliver(&mut laptop).server_id, sid2);
        laptop.send_delivered(sid2).unwrap();
        assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
    }
}

/// Waits until device `device` of `user` is not online.
fn wait_offline_device(srv: &TestServer, user: u64, device: u32) {
    let online = || parse_info(&srv.query(&format!("show user {user}")))["Devices_online"].clone();
    assert!(
        wait_for(|| !online().split(' ').any(|d| d == device.to_string())),
        "device {device} of {user} stays online"
    );
}

#[test]
fn the_device_limit_counts_registered_devices() {
    let srv = TestServer::start_with(|c| c.devices_per_user_max = 2);
    let (a, _) = cross_pair();
    let (d1, _) = login_device(srv.addr, a, 1);
    let (d2, _) = login_device(srv.addr, a, 2);
    drop((d1, d2));
    wait_offline(&srv, a);
    // Both are offline, and still registered: a third is refused.
    match Client::login_version(srv.addr, &device_token(a, 3), proto::VERSION_2) {
        Err(tern_client::ClientError::LoginRejected { code, .. }) => {
            assert_eq!(code, ErrorCode::TooManyDevices)
        }
        other => panic!("a third device: {:?}", other.map(|_| ())),
    }
    let answer = srv.query(&format!("device remove {a} 1"));
    assert!(
        answer.starts_with(&format!("Device 1 of user {a} removed (it was offline)")),
        "{answer}"
    );
    let (_d3, _) = login_device(srv.addr, a, 3);
    let shown = parse_info(&srv.query(&format!("show user {a}")));
    assert_eq!(shown["Devices_registered"], "2 3", "{shown:?}");
}

#[test]
fn an_offline_device_is_removed_with_its_copies() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let (mut d1, _) = login_device(srv.addr, a, 1);
    for device in [2, 3] {
        drop(login_device(srv.addr, a, device).0);
        wait_offline_device(&srv, a, device);
    }
    let mut bc = srv.login(b);
    bc.send_msg(1, a, b"one").unwrap();
    let sid = recv_ack(&mut bc, 1);
    assert_eq!(recv_deliver(&mut d1).server_id, sid);
    d1.send_delivered(sid).unwrap();
    expect_receipt(&mut bc, ReceiptKind::Delivered, sid, a);
    // Devices 2 and 3 owe it. Device 1 removes device 3 (offline): it gets
    // DEVICE_REMOVED as its confirmation; the message stays for device 2.
    d1.send_frame(&Frame::DeviceRemove { device: 3 }).unwrap();
    expect_removed(&mut d1, 3);
    assert_eq!(srv.wait_info("Queued", |n| n == 1), 1);
    // The operator removes device 2: nobody owes it any more.
    let answer = srv.query(&format!("device remove {a} 2"));
    assert!(answer.contains("removed (it was offline)"), "{answer}");
    expect_removed(&mut d1, 2);
    assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
    let answer = srv.query(&format!("device remove {a} 2"));
    assert!(answer.contains("not registered"), "{answer}");
    let shown = parse_info(&srv.query(&format!("show user {a}")));
    assert_eq!(shown["Devices_registered"], "1", "{shown:?}");
    assert_eq!(srv.metric_sum("tern_devices_removed_total"), 2);

    // Removing a user's last device drops what waited for it.
    d1.send_msg(2, b, b"to b").unwrap();
    let waiting = recv_ack(&mut d1, 2);
    drop(bc);
    wait_offline(&srv, b);
    d1.send_msg(3, b, b"again").unwrap();
    recv_ack(&mut d1, 3);
    let queued = || parse_info(&srv.query(&format!("show user {b}")))["Queued"].clone();
    assert!(wait_for(|| queued() == "2"), "{}", queued());
    let answer = srv.query(&format!("device remove {b} 0"));
    assert!(answer.contains("removed (it was offline)"), "{answer}");
    assert!(wait_for(|| queued() == "0"), "{}", queued());
    // b's next login is a first one: nothing waits.
    let (mut bc, info) = Client::login(srv.addr, &token(b)).unwrap();
    assert_eq!(info.offline_count, 0, "message {waiting} was dropped");
    nothing_before_pong(&mut bc, 1);
}

#[test]
fn an_idle_device_expires_with_its_copies() {
    // 0.00005 days is 4.32 s.
    let srv = TestServer::start_with(|c| c.device_idle_days_max = 0.00005);
    let (a, b) = cross_pair();
    let mut bc = srv.login(b);
    let (mut phone, _) = login_device(srv.addr, a, 1);
    drop(login_device(srv.addr, a, 2).0);
    wait_offline_device(&srv, a, 2);
    bc.send_msg(1, a, b"hello").unwrap();
    let sid = recv_ack(&mut bc, 1);
    assert_eq!(recv_deliver(&mut phone).server_id, sid);
    phone.send_delivered(sid).unwrap();
    expect_receipt(&mut bc, ReceiptKind::Delivered, sid, a);
    // The tablet is gone for good: expired, and its copy with it. The
    // devices online (the phone, the sender) never expire.
    expect_removed(&mut phone, 2);
    assert_eq!(srv.wait_metric("tern_devices_expired_total", |n| n >= 1), 1);
    assert_eq!(srv.wait_info("Queued", |n| n == 0), 0);
    assert_eq!(srv.info_u64("Devices_expired"), 1);
    let shown = parse_info(&srv.query(&format!("show user {a}")));
    assert_eq!(shown["Devices_registered"], "1", "{shown:?}");
    nothing_before_pong(&mut phone, 1);
    nothing_before_pong(&mut bc, 2);
}

fn spawn(dir: &Path) -> TernChild {
    let backend = format!("{:?}", test_backend()).to_lowercase();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2", "--io", &backend]);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(["--durability", "fsync"]);
    TernChild::expect_start(cmd)
}

/// Sum of metric `name` on the stats socket in `dir`.
fn child_metric(dir: &Path, name: &str) -> u64 {
    let text = tern::stats::query(&dir.join("s.sock"), "show metrics").unwrap();
    metric_sum(&text, name)
}

/// The DELIVERs `c` gets until PONG(`nonce`): their server ids, in order.
fn delivers_before_pong(c: &mut Client, nonce: u64) -> Vec<u64> {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    let mut ids = Vec::new();
    loop {
        match c.recv_until(|_| true) {
            Ok(OwnedFrame::Pong { nonce: n }) if n == nonce => return ids,
            Ok(OwnedFrame::Deliver { server_id, .. }) => ids.push(server_id),
            other => panic!("expected DELIVER or PONG({nonce}), got {other:?}"),
        }
    }
}

/// The receipts `c` gets until PONG(`nonce`), in order.
fn receipts_before_pong(c: &mut Client, nonce: u64) -> Vec<(ReceiptKind, u64, u64)> {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    let mut got = Vec::new();
    loop {
        match c.recv_until(|_| true) {
            Ok(OwnedFrame::Pong { nonce: n }) if n == nonce => return got,
            Ok(OwnedFrame::Receipt {
                kind,
                server_id,
                peer,
            }) => got.push((kind, server_id, peer)),
            other => panic!("expected RECEIPT or PONG({nonce}), got {other:?}"),
        }
    }
}

#[test]
fn marks_and_receipts_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = cross_pair();
    let child = spawn(dir.path());
    // b (the sender) and a (the recipient) each register two devices.
    for (user, device) in [(a, 1), (a, 2), (b, 1), (b, 2)] {
        drop(login_device(child.addr, user, device).0);
    }
    let (mut b1, _) = login_device(child.addr, b, 1);
    let mut sids = Vec::new();
    for (i, body) in [&b"m1"[..], b"m2", b"m3"].into_iter().enumerate() {
        b1.send_msg(10 + i as u64, a, body).unwrap();
        sids.push(recv_ack(&mut b1, 10 + i as u64));
    }
    drop(b1);
    // Device 1 of a answers m1 and m2 and reads m1; device 2 stays away.
    let (mut a1, info) = login_device(child.addr, a, 1);
    assert_eq!(info.offline_count, 3);
    assert_eq!(delivers_before_pong(&mut a1, 1).len(), 3);
    a1.send_delivered(sids[0]).unwrap();
    a1.send_delivered(sids[1]).unwrap();
    a1.send_read(sids[0], b).unwrap();
    nothing_before_pong(&mut a1, 2);
    drop(a1);
    // Three receipts wait (durably) for both of b's devices, written after
    // the marks that caused them.
    let waiting = || child_metric(dir.path(), "tern_receipts_waiting");
    assert!(
        wait_for(|| waiting() == 3),
        "receipts waiting: {}",
        waiting()
    );
    child.kill9();

    let child = spawn(dir.path());
    // The shards replay their logs after the stats socket answers: wait
    // for the gauge rather than read it once.
    let waiting = || child_metric(dir.path(), "tern_receipts_waiting");
    assert!(
        wait_for(|| waiting() == 3),
        "receipts waiting after kill -9: {}",
        waiting()
    );
    // Each of a's devices gets what it has not answered, in order.
    let (mut a1, info) = login_device(child.addr, a, 1);
    assert_eq!(info.offline_count, 1);
    assert_eq!(delivers_before_pong(&mut a1, 3), [sids[2]]);
    let (mut a2, info) = login_device(child.addr, a, 2);
    assert_eq!(info.offline_count, 3);
    assert_eq!(delivers_before_pong(&mut a2, 4), sids);
    // Each of b's devices gets every receipt, once, in order.
    let expected = vec![
        (ReceiptKind::Delivered, sids[0], a),
        (ReceiptKind::Delivered, sids[1], a),
        (ReceiptKind::Read, sids[0], a),
    ];
    for device in [1, 2] {
        let (mut bd, _) = login_device(child.addr, b, device);
        assert_eq!(
            receipts_before_pong(&mut bd, 5),
            expected,
            "device {device}"
        );
        drop(bd);
        let (mut bd, _) = login_device(child.addr, b, device);
        assert_eq!(
            receipts_before_pong(&mut bd, 6),
            [],
            "device {device} again"
        );
    }
    let waiting = || child_metric(dir.path(), "tern_receipts_waiting");
    assert!(
        wait_for(|| waiting() == 0),
        "receipts waiting: {}",
        waiting()
    );
    // Everything answered by both: the queue empties, with one delivery
    // receipt for m3 (its first DELIVERED).
    let (mut b1, _) = login_device(child.addr, b, 1);
    for sid in &sids {
        a2.send_delivered(*sid).unwrap();
    }
    a1.send_delivered(sids[2]).unwrap();
    nothing_before_pong(&mut a1, 7);
    nothing_before_pong(&mut a2, 8);
    expect_receipt(&mut b1, ReceiptKind::Delivered, sids[2], a);
    let queued = || child_metric(dir.path(), "tern_queued");
    assert!(wait_for(|| queued() == 0), "queued: {}", queued());
    nothing_before_pong(&mut b1, 9);
}

#[test]
fn the_registry_and_waiting_receipts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = || tern::server::Server::start(test_config(dir.path())).expect("server starts");
    let query = |srv: &tern::server::Server, command: &str| {
        tern::stats::query(srv.stats_socket(), command).unwrap()
    };
    let (a, b) = cross_pair();
    let srv = start();
    let addr = srv.local_addr();
    let (mut a1, _) = login_device(addr, a, 1);
    drop(login_device(addr, a, 2).0);
    let (mut bc, _) = Client::login(addr, &token(b)).unwrap();
    bc.send_msg(1, a, b"kept for device 2").unwrap();
    let sid = recv_ack(&mut bc, 1);
    drop(bc);
    assert_eq!(recv_deliver(&mut a1).server_id, sid);
    a1.send_delivered(sid).unwrap();
    a1.send_read(sid, b).unwrap();
    nothing_before_pong(&mut a1, 1);
    let waiting = || metric_sum(&query(&srv, "show metrics"), "tern_receipts_waiting");
    assert!(
        wait_for(|| waiting() == 2),
        "receipts waiting: {}",
        waiting()
    );
    drop(a1);
    srv.shutdown();
    srv.join();

    let srv = start();
    let addr = srv.local_addr();
    let shown = parse_info(&query(&srv, &format!("show user {a}")));
    assert_eq!(shown["Devices_registered"], "1 2", "{shown:?}");
    assert_eq!(shown["Queued"], "1", "{shown:?}");
    let (mut a1, info) = login_device(addr, a, 1);
    assert_eq!(info.offline_count, 0);
    nothing_before_pong(&mut a1, 2);
    let (mut a2, info) = login_device(addr, a, 2);
    assert_eq!(info.offline_count, 1);
    assert_eq!(delivers_before_pong(&mut a2, 3), [sid]);
    let (mut bc, _) = Client::login(addr, &token(b)).unwrap();
    assert_eq!(
        receipts_before_pong(&mut bc, 4),
        [
            (ReceiptKind::Delivered, sid, a),
            (ReceiptKind::Read, sid, a)
        ]
    );
    drop((a1, a2, bc));
    srv.shutdown();
    srv.join();
}
