//! Removing a device in the session layer: DEVICE_REMOVE and the
//! operator's [`Event::RemoveDevice`] close the device with
//! BYE(`device_removed`), tell the other v2 devices, refuse an unknown
//! device with `unknown_device`, and leave version 1 unchanged.

use super::*;
use crate::proto::ByeReason;

/// Opens `conn` and logs device `device` of `user` in with `version`.
fn login_device(h: &mut Harness, conn: ConnId, user: u64, device: u32, version: u8) {
    h.step(Event::Opened(conn));
    let t = token::mint_device(
        h.config.token_secret.as_bytes(),
        user,
        device,
        T0_MS / 1000 + 3600,
    );
    let out = h.frame(
        conn,
        Frame::Login {
            version,
            token: t.as_bytes(),
        },
    );
    assert_eq!(h.s.user_of(conn), Some(user), "{out:?}");
}

const C: ConnId = ConnId(2);
const V2: u8 = proto::VERSION_2;

#[test]
fn a_device_removes_another_which_gets_bye_and_the_rest_a_notice() {
    let mut h = Harness::one();
    login_device(&mut h, A, 1, 0, V2);
    login_device(&mut h, B, 1, 1, V2);
    login_device(&mut h, C, 1, 2, proto::VERSION);
    assert_eq!(h.s.device_conn(1, 1), Some(B));
    let out = h.frame(A, Frame::DeviceRemove { device: 1 });
    assert_eq!(out.flow, Some(Flow::Next));
    assert_eq!(
        out.to(B),
        [&OwnedFrame::Bye {
            reason: ByeReason::DeviceRemoved
        }]
    );
    assert!(out.closes_after_flush(B));
    assert_eq!(out.to(A), [&OwnedFrame::DeviceRemoved { device: 1 }]);
    // A version 1 device hears nothing new.
    assert!(out.to(C).is_empty(), "{out:?}");
    assert_eq!(h.s.device_conn(1, 1), None);
    assert_eq!(h.s.sessions_online(), 2);
    assert_eq!(h.s.stats.devices_removed.get(), 1);
}

#[test]
fn a_device_may_remove_itself() {
    let mut h = Harness::one();
    login_device(&mut h, A, 1, 4, V2);
    login_device(&mut h, B, 1, 5, V2);
    let out = h.frame(A, Frame::DeviceRemove { device: 4 });
    assert_eq!(out.flow, Some(Flow::Stop));
    assert_eq!(
        out.to(A),
        [&OwnedFrame::Bye {
            reason: ByeReason::DeviceRemoved
        }]
    );
    assert_eq!(out.to(B), [&OwnedFrame::DeviceRemoved { device: 4 }]);
}

#[test]
fn an_unknown_device_is_refused_and_the_connection_stays() {
    let mut h = Harness::one();
    login_device(&mut h, A, 1, 0, V2);
    // Another user's device 1 is online: not this user's.
    login_device(&mut h, B, 2, 1, V2);
    for device in [1, 9, u64::MAX] {
        let out = h.frame(A, Frame::DeviceRemove { device });
        assert_eq!(out.flow, Some(Flow::Next));
        assert!(
            matches!(
                out.to(A)[..],
                [OwnedFrame::Error { code: ErrorCode::UnknownDevice, client_id, .. }]
                    if *client_id == device
            ),
            "{out:?}"
        );
        assert!(!out.closes_after_flush(A));
        assert!(out.to(B).is_empty());
    }
    assert_eq!(h.s.user_of(A), Some(1));
    assert_eq!(h.s.stats.devices_removed.get(), 0);
}

#[test]
fn a_version_1_session_gets_unknown_type_as_before() {
    let mut h = Harness::one();
    login_device(&mut h, A, 1, 0, proto::VERSION);
    login_device(&mut h, B, 1, 1, V2);
    let out = h.frame(A, Frame::DeviceRemove { device: 1 });
    assert_eq!(out.flow, Some(Flow::Stop));
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::UnknownType,
                client_id: 0,
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(out.to(B).is_empty());
    assert_eq!(h.s.user_of(B), Some(1));
}

#[test]
fn device_removed_from_a_client_is_bad_state() {
    let mut h = Harness::one();
    login_device(&mut h, A, 1, 0, V2);
    let out = h.frame(A, Frame::DeviceRemoved { device: 0 });
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::BadState,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn the_operator_removes_a_device_and_what_is_queued_stays() {
    let mut h = Harness::one();
    login_device(&mut h, A, 1, 0, V2);
    login_device(&mut h, B, 1, 1, V2);
    login_device(&mut h, C, 2, 0, V2);
    h.send(2, 1, 1, b"m");
    h.commit(&[]);
    let out = h.step(Event::RemoveDevice { user: 1, device: 0 });
    assert_eq!(
        out.to(A),
        [&OwnedFrame::Bye {
            reason: ByeReason::DeviceRemoved
        }]
    );
    assert_eq!(out.to(B), [&OwnedFrame::DeviceRemoved { device: 0 }]);
    // B has not answered its DELIVER: the message is still queued.
    assert_eq!(h.s.store().len(1), 1);
    // Not online: nothing happens.
    let out = h.step(Event::RemoveDevice { user: 1, device: 0 });
    assert!(out.frames.is_empty() && out.others.is_empty(), "{out:?}");
}
