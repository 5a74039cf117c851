//! Removing a device (issue 11, second part), end to end over real
//! sockets, on the backend `TERN_TEST_IO` picks:
//!
//! - a version 2 device sends DEVICE_REMOVE: the removed device gets
//!   BYE(`device_removed`) and is closed, the user's other version 2
//!   devices get DEVICE_REMOVED, a version 1 device hears nothing new, and
//!   messages keep reaching the devices that stay;
//! - a device that is not registered (removed already, or never logged
//!   in) is refused with ERROR(`unknown_device`) carrying its id, and the
//!   connection stays (offline devices: tests/device_registry.rs);
//! - the operator's `device remove U D` on the stats socket does the same,
//!   counted in `tern_devices_removed_total`;
//! - a version 1 session that sends type 0x10 gets ERROR(`unknown_type`)
//!   and the close, as before the type existed.
//!
//! Every wait has a generous bound; nothing asserts how fast anything was.

mod common;

use std::net::SocketAddr;

use common::*;
use tern::proto::{self, ByeReason, ErrorCode, Frame, OwnedFrame, ReceiptKind};
use tern_client::Client;

/// Logs `device` of `user` in with protocol `version`.
fn login_device(addr: SocketAddr, user: u64, device: u32, version: u8) -> Client {
    Client::login_version(addr, &device_token(user, device), version)
        .unwrap_or_else(|e| panic!("login of user {user} device {device}: {e}"))
        .0
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

/// The next frame on `c` is DEVICE_REMOVED(`device`).
fn expect_removed(c: &mut Client, device: u64) {
    match c.recv_until(|_| true) {
        Ok(OwnedFrame::DeviceRemoved { device: d }) if d == device => {}
        other => panic!("expected DEVICE_REMOVED({device}), got {other:?}"),
    }
}

#[test]
fn a_device_removes_another() {
    let srv = TestServer::start();
    for (a, b) in [cross_pair(), same_pair()] {
        let mut d1 = login_device(srv.addr, a, 1, proto::VERSION_2);
        let mut d2 = login_device(srv.addr, a, 2, proto::VERSION_2);
        let mut d3 = login_device(srv.addr, a, 3, proto::VERSION);
        d1.send_frame(&Frame::DeviceRemove { device: 2 }).unwrap();
        expect_removed(&mut d1, 2);
        let before = expect_bye_then_close(&mut d2, ByeReason::DeviceRemoved);
        assert!(before.is_empty(), "{before:?}");
        nothing_before_pong(&mut d3, 1);
        // The last pass's sessions may still be closing: look at device 2.
        let devices =
            || parse_info(&srv.query(&format!("show user {a}")))["Devices_online"].clone();
        assert!(
            wait_for(|| !devices().split(' ').any(|d| d == "2")),
            "{}",
            devices()
        );
        // The devices that stay still get every message.
        let mut bc = srv.login(b);
        bc.send_msg(1, a, b"after").unwrap();
        let sid = recv_ack(&mut bc, 1);
        for d in [&mut d1, &mut d3] {
            let m = recv_deliver(d);
            assert_eq!((m.server_id, &m.body[..]), (sid, &b"after"[..]));
            d.send_delivered(sid).unwrap();
        }
        // Taken before `bc` goes: a receipt left waiting would reach the
        // next pass, whose first user is this pass's second.
        expect_receipt(&mut bc, ReceiptKind::Delivered, sid, a);
        // Removed already, or never online: unknown_device, and the
        // connection stays.
        for device in [2, 9] {
            d1.send_frame(&Frame::DeviceRemove { device }).unwrap();
            match d1.recv_until(|_| true) {
                Ok(OwnedFrame::Error {
                    code: ErrorCode::UnknownDevice,
                    client_id,
                    ..
                }) if client_id == device => {}
                other => panic!("expected ERROR(unknown_device, {device}), got {other:?}"),
            }
        }
        nothing_before_pong(&mut d1, 2);
        // A device may remove itself.
        d1.send_frame(&Frame::DeviceRemove { device: 1 }).unwrap();
        expect_bye_then_close(&mut d1, ByeReason::DeviceRemoved);
        nothing_before_pong(&mut d3, 3);
    }
}

#[test]
fn the_operator_removes_a_device() {
    let srv = TestServer::start();
    let (a, _) = cross_pair();
    let mut d0 = login_device(srv.addr, a, 0, proto::VERSION_2);
    let mut d5 = login_device(srv.addr, a, 5, proto::VERSION_2);
    let shown = parse_info(&srv.query(&format!("show user {a}")));
    assert_eq!(shown["Devices_online"], "0 5", "{shown:?}");
    let answer = srv.query(&format!("device remove {a} 5"));
    assert!(
        answer.starts_with(&format!("Device 5 of user {a} removed")),
        "{answer}"
    );
    expect_bye_then_close(&mut d5, ByeReason::DeviceRemoved);
    expect_removed(&mut d0, 5);
    let answer = srv.query(&format!("device remove {a} 5"));
    assert!(answer.contains("not registered"), "{answer}");
    let shown = parse_info(&srv.query(&format!("show user {a}")));
    assert_eq!(shown["Devices_online"], "0", "{shown:?}");
    let answer = srv.query(&format!("device remove {a} five"));
    assert!(answer.starts_with("Not a device id"), "{answer}");
    assert_eq!(srv.metric_sum("tern_devices_removed_total"), 1);
    assert!(srv.query("help").contains("device remove U D"));
    nothing_before_pong(&mut d0, 1);
}

#[test]
fn a_version_1_session_gets_unknown_type_for_device_remove() {
    let srv = TestServer::start();
    let (a, _) = cross_pair();
    let mut v2 = login_device(srv.addr, a, 1, proto::VERSION_2);
    let mut v1 = login_device(srv.addr, a, 0, proto::VERSION);
    // DEVICE_REMOVE(device 1), as raw bytes.
    v1.send_raw(&[0x02, 0x10, 0x01]).unwrap();
    expect_error_then_close(&mut v1, ErrorCode::UnknownType);
    // The version 2 device was not removed and heard nothing.
    nothing_before_pong(&mut v2, 1);
}
