//! The device registry in the session layer (`registry.rs`): offline
//! devices keep their copies, receipts wait per device, the records rebuild
//! the registry, marks and receipts, and `device_idle_days_max` expires a
//! device by the clock it is given (no sleeping).

use super::*;
use crate::store::devices::{Record, State};

const C: ConnId = ConnId(2);

/// The records staged so far, applied to `state`.
fn replay(h: &mut Harness, state: &mut State) -> Vec<Record> {
    let mut records = Vec::new();
    h.s.take_device_records(&mut records);
    for r in &records {
        state.apply(r.clone());
    }
    records
}

fn receipts(frames: &[&OwnedFrame]) -> Vec<(ReceiptKind, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Receipt {
                kind, server_id, ..
            } => Some((*kind, *server_id)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_single_device_user_online_has_no_registry_entry() {
    let mut h = Harness::one();
    h.login(0, 7);
    assert!(h.s.registry.devices.is_empty());
    let mut state = State::default();
    let records = replay(&mut h, &mut state);
    assert!(
        matches!(
            records[..],
            [Record::Registered {
                user: 7,
                device: 0,
                lane: 0,
                ..
            }]
        ),
        "{records:?}"
    );
    // Offline, it has one; back online, none again.
    h.step(Event::Closed(A));
    assert_eq!(h.s.registry.devices.len(), 1);
    assert_eq!(h.s.registered_devices(7), [0]);
    h.login(1, 7);
    assert!(h.s.registry.devices.is_empty());
    assert_eq!(h.s.registered_devices(7), [0]);
}

#[test]
fn marks_and_receipts_come_back_from_the_records() {
    let mut h = Harness::one();
    let mut state = State::default();
    login_device(&mut h, 0, 7, 1);
    login_device(&mut h, 1, 7, 2);
    // The sender, 9, has two devices; device 2 goes offline.
    login_device(&mut h, 2, 9, 1);
    login_device(&mut h, 3, 9, 2);
    h.step(Event::Closed(B));
    h.step(Event::Closed(ConnId(3)));
    h.send(2, 1, 7, b"one");
    let id = deliver_ids(&h.commit(&[]).to(A))[0];
    h.frame(A, Frame::Delivered { server_id: id });
    let out = h.commit(&[]);
    // Device 1 of 9 is online: it gets the receipt now; device 2 later.
    assert_eq!(receipts(&out.to(C)), [(ReceiptKind::Delivered, id)]);
    assert_eq!(h.s.receipts_kept(9), 1);
    assert_eq!(h.s.store().len(7), 1, "device 2 of 7 owes it");
    replay(&mut h, &mut state);

    // A crash with the store kept: the registry comes back from its
    // records alone.
    h.s.reset(h.now, &h.env, true);
    h.s.restore_devices(state.clone());
    assert_eq!(h.s.registered_devices(7), [1, 2]);
    assert_eq!(h.s.registered_devices(9), [1, 2]);
    assert_eq!(h.s.receipts_kept(9), 1);
    // Device 1 of 7 answered it: not sent again; device 2 gets it.
    let out = login_device(&mut h, 4, 7, 1);
    assert!(deliver_ids(&out.to(ConnId(4))).is_empty(), "{out:?}");
    let out = login_device(&mut h, 5, 7, 2);
    assert_eq!(deliver_ids(&out.to(ConnId(5))), [id]);
    h.frame(ConnId(5), Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 0);
    assert!(h.commit(&[]).to(ConnId(5)).is_empty());
    // Device 1 of 9 had its receipt; device 2 gets it at its login, once.
    let out = login_device(&mut h, 6, 9, 1);
    assert!(receipts(&out.to(ConnId(6))).is_empty(), "{out:?}");
    let out = login_device(&mut h, 7, 9, 2);
    assert_eq!(receipts(&out.to(ConnId(7))), [(ReceiptKind::Delivered, id)]);
    assert_eq!(h.s.receipts_kept(9), 0);
    replay(&mut h, &mut state);
    assert!(state.receipts.is_empty());
    // The mark of the message that left stays in the records until a
    // rewrite; a restore drops it.
    assert_eq!(state.marks.len(), 1);
    h.s.reset(h.now, &h.env, true);
    h.s.restore_devices(state);
    assert!(h.s.registry.marks.is_empty());
}

#[test]
fn removing_the_last_device_drops_the_queue() {
    let mut h = Harness::one();
    h.login(0, 7);
    h.login(1, 9);
    h.step(Event::Closed(A));
    for client_id in 1..=3 {
        h.send(1, client_id, 7, b"x");
    }
    h.commit(&[]);
    assert_eq!(h.s.store().len(7), 3);
    h.step(Event::RemoveDevice { user: 7, device: 0 });
    assert_eq!(h.s.store().len(7), 0);
    assert!(h.s.registered_devices(7).is_empty());
    assert_eq!(h.s.stats.devices_removed.get(), 1);
    // Not registered any more: a second removal does nothing.
    h.step(Event::RemoveDevice { user: 7, device: 0 });
    assert_eq!(h.s.stats.devices_removed.get(), 1);
}

#[test]
fn an_idle_device_expires_by_the_clock() {
    let mut h = Harness::new(
        Config {
            device_idle_days_max: 1.0,
            ..Config::default()
        },
        0,
        1,
    );
    login_device(&mut h, 0, 7, 1);
    login_device(&mut h, 1, 7, 2);
    h.login(2, 9);
    h.step(Event::Closed(B));
    h.send(2, 1, 7, b"one");
    let id = deliver_ids(&h.commit(&[]).to(A))[0];
    h.frame(A, Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 1);
    // A day exactly is not past the limit.
    h.now.unix_ms += 86_400_000;
    assert!(h.step(Event::ExpireDevices(10)).to(A).is_empty());
    assert_eq!(h.s.store().len(7), 1);
    h.now.unix_ms += 1;
    let out = h.step(Event::ExpireDevices(10));
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::DeviceRemoved { device: 2 }]),
        "{out:?}"
    );
    assert_eq!(h.s.store().len(7), 0, "its copy went with it");
    assert_eq!(h.s.stats.devices_expired.get(), 1);
    // Online devices never expire, however long they stay.
    h.now.unix_ms += 10 * 86_400_000;
    h.step(Event::ExpireDevices(10));
    assert_eq!(h.s.registered_devices(7), [1]);
    assert_eq!(h.s.stats.devices_expired.get(), 1);
    // Offline, device 1 expires too: user 7 has nothing left.
    h.step(Event::Closed(A));
    h.now.unix_ms += 86_400_001;
    h.step(Event::ExpireDevices(10));
    assert!(h.s.registered_devices(7).is_empty());
    assert_eq!(h.s.stats.devices_expired.get(), 2);
}

#[test]
fn a_pass_looks_at_a_bounded_slice() {
    let mut h = Harness::new(
        Config {
            device_idle_days_max: 1.0,
            ..Config::default()
        },
        0,
        1,
    );
    for user in 1..=10u32 {
        h.login(user, user.into());
        h.step(Event::Closed(ConnId(user)));
    }
    h.now.unix_ms += 2 * 86_400_000;
    let mut passes = 0;
    while h.s.stats.devices_expired.get() < 10 {
        h.step(Event::ExpireDevices(3));
        passes += 1;
        assert!(passes <= 10, "expiry does not move on");
    }
    assert!(passes >= 4, "at most 3 users per pass: {passes} passes");
    assert!(h.s.registry.devices.is_empty());
}
