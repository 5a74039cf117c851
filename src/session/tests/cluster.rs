//! The session layer in a cluster: REDIRECT at LOGIN, every SEND handed to
//! the bridge, messages from JetStream held and delivered, DELIVERED acked
//! to the bridge, BYE(moved) once a partition is lost.

use super::*;
use crate::cluster::{partition_of, ClusterConfig, Owners};
use crate::proto::PresenceState;
use crate::store::Stored;

/// Two partitions: 0 here, 1 on node "b" at `B_ADDR`.
const B_ADDR: &str = "10.0.0.2:7333";

fn clustered() -> Harness {
    let config = Config {
        cluster: Some(ClusterConfig {
            node_id: "a".into(),
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            public_addr: "10.0.0.1:7333".into(),
            partitions: 2,
            lease_s: 10,
            stream_replicas: 3,
        }),
        ..Config::default()
    };
    let mut h = Harness::new(config, 0, 1);
    let owners = Owners::new(2);
    owners.set_here(0);
    let b = owners.node_index("b", B_ADDR).unwrap();
    owners.set_other(1, Some(b));
    h.env.owners = Some(owners);
    h
}

/// The first user of partition `p` (of 2).
fn user_in(p: u32) -> u64 {
    (1..).find(|&u| partition_of(u, 2) == p).unwrap()
}

fn login_frame(h: &mut Harness, conn: ConnId, user: u64, version: u8) -> Out {
    h.step(Event::Opened(conn));
    let token = h.token(user);
    h.frame(
        conn,
        Frame::Login {
            version,
            token: token.as_bytes(),
        },
    )
}

#[test]
fn a_v2_login_for_another_nodes_user_is_redirected_there() {
    let mut h = clustered();
    let out = login_frame(&mut h, A, user_in(1), proto::VERSION_2);
    assert_eq!(
        out.to(A)[..],
        [&OwnedFrame::Redirect {
            addr: B_ADDR.into()
        }]
    );
    assert!(out.closes_after_flush(A));
    assert_eq!(h.s.user_of(A), None);
    assert_eq!(h.s.stats.redirects.get(), 1);
}

#[test]
fn a_v1_login_for_another_nodes_user_gets_other_node_naming_it() {
    let mut h = clustered();
    let out = login_frame(&mut h, A, user_in(1), proto::VERSION);
    match out.to(A)[..] {
        [OwnedFrame::LoginErr { code, text }] => {
            assert_eq!(*code, ErrorCode::OtherNode);
            assert!(text.contains("node b") && text.contains(B_ADDR), "{text}");
        }
        ref other => panic!("{other:?}"),
    }
    assert!(out.closes_after_flush(A));
}

#[test]
fn a_login_for_an_unowned_partition_is_unavailable() {
    let mut h = clustered();
    h.env.owners.as_ref().unwrap().set_other(1, None);
    let out = login_frame(&mut h, A, user_in(1), proto::VERSION_2);
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::LoginErr {
                code: ErrorCode::Unavailable,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn a_login_for_this_nodes_user_is_served() {
    let mut h = clustered();
    let user = user_in(0);
    let out = login_frame(&mut h, A, user, proto::VERSION_2);
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::LoginOk { .. }]),
        "{out:?}"
    );
    assert_eq!(h.s.user_of(A), Some(user));
}

/// What the session asked the bridge to do in `out`.
fn to_bridge(out: &Out) -> Vec<&Msg> {
    out.others
        .iter()
        .filter_map(|a| match a {
            Action::Cluster(m) => Some(m),
            _ => None,
        })
        .collect()
}

#[test]
fn every_send_goes_to_the_bridge_whoever_serves_the_recipient() {
    let mut h = clustered();
    let from = user_in(0);
    login_frame(&mut h, A, from, proto::VERSION_2);
    for (client_id, to) in [(9, user_in(1)), (10, user_in(0))] {
        let out = h.send(0, client_id, to, b"hi");
        assert!(
            out.to(A).is_empty(),
            "no answer before the publish: {out:?}"
        );
        match to_bridge(&out)[..] {
            [Msg::Send {
                from: f,
                client_id: c,
                to: t,
                origin: Some(o),
                body,
                ..
            }] => {
                assert_eq!((*f, *c, *t, o.client_id), (from, client_id, to, client_id));
                assert_eq!(&body[..], b"hi");
            }
            ref other => panic!("{other:?}"),
        }
        assert_eq!(h.s.store().len(to), 0, "JetStream holds it, not this shard");
    }
}

#[test]
fn a_send_waits_while_the_bridge_ring_is_full() {
    let mut h = clustered();
    login_frame(&mut h, A, user_in(0), proto::VERSION_2);
    h.env.room.set(false);
    let out = h.send(0, 1, user_in(1), b"hi");
    assert_eq!(out.flow, Some(Flow::Blocked));
    assert!(to_bridge(&out).is_empty());
}

#[test]
fn a_message_from_jetstream_is_delivered_once_and_acked_to_the_bridge_on_delivered() {
    let mut h = clustered();
    let (to, from) = (user_in(0), user_in(1));
    login_frame(&mut h, A, to, proto::VERSION_2);
    let incoming = |server_id| {
        Event::Msg(Msg::Incoming {
            to,
            msg: Stored {
                server_id,
                from,
                time_ms: T0_MS,
                origin: Some(crate::store::Origin {
                    device: 0,
                    client_id: 4,
                }),
                body: b"yo".to_vec().into(),
            },
        })
    };
    h.step(incoming(77));
    let out = h.commit(&[]);
    assert_eq!(deliver_ids(&out.to(A)), vec![77]);
    // The consumer started over: the copy is dropped.
    h.step(incoming(77));
    assert!(h.commit(&[]).to(A).is_empty());
    assert_eq!(h.s.store().len(to), 1);

    let out = h.frame(A, Frame::Delivered { server_id: 77 });
    assert!(
        matches!(to_bridge(&out)[..], [Msg::Done { user, server_id: 77 }] if *user == to),
        "{out:?}"
    );
    assert_eq!(h.s.store().len(to), 0);
    // The delivery receipt goes to the sender's node through JetStream.
    let out = h.commit(&[]);
    assert!(
        matches!(
            to_bridge(&out)[..],
            [Msg::Receipt { user, kind: ReceiptKind::Delivered, server_id: 77, peer, .. }] if *user == from && *peer == to
        ),
        "{out:?}"
    );
}

#[test]
fn losing_a_partition_closes_its_users_with_moved_and_no_one_else() {
    let mut h = clustered();
    let owners = h.env.owners.as_ref().unwrap();
    owners.set_here(1);
    let (stays, goes) = (user_in(0), user_in(1));
    login_frame(&mut h, A, stays, proto::VERSION_2);
    login_frame(&mut h, B, goes, proto::VERSION);
    let owners = h.env.owners.as_ref().unwrap();
    let b = owners.node_index("b", B_ADDR).unwrap();
    owners.set_other(1, Some(b));
    assert_eq!(owners.losses(), 1);
    let out = h.step(Event::Moved);
    assert_eq!(
        out.to(B)[..],
        [&OwnedFrame::Bye {
            reason: ByeReason::Moved
        }]
    );
    assert!(out.to(A).is_empty());
    assert_eq!(h.s.stats.moved_closes.get(), 1);
}

#[test]
fn once_this_nodes_leases_go_unproven_it_takes_and_delivers_nothing_for_them() {
    let mut h = clustered();
    let (user, from) = (user_in(0), user_in(1));
    login_frame(&mut h, A, user, proto::VERSION_2);
    // The proof ran out (a pause longer than the lease) before the bridge
    // could tell the shards anything.
    let owners = h.env.owners.as_ref().unwrap();
    owners.prove_until(std::time::Instant::now());
    h.step(Event::Msg(Msg::Incoming {
        to: user,
        msg: Stored {
            server_id: 5,
            from,
            time_ms: T0_MS,
            origin: None,
            body: b"late".to_vec().into(),
        },
    }));
    assert!(h.commit(&[]).to(A).is_empty(), "nothing delivered");
    let out = h.send(0, 1, from, b"hi");
    assert!(to_bridge(&out).is_empty(), "nothing published: {out:?}");
    assert_eq!(
        out.to(A)[..],
        [&OwnedFrame::Bye {
            reason: ByeReason::Moved
        }]
    );
}

#[test]
fn a_subscription_to_another_nodes_user_goes_to_the_bridge_and_its_end_too() {
    let mut h = clustered();
    login_frame(&mut h, A, user_in(0), proto::VERSION_2);
    let watched = user_in(1);
    let out = h.frame(A, Frame::Subscribe { user: watched });
    assert!(out.to(A).is_empty(), "answered by the owner: {out:?}");
    let sub = match to_bridge(&out)[..] {
        [Msg::Watch { user, sub }] if *user == watched => *sub,
        ref other => panic!("{other:?}"),
    };
    // The owner's state comes back through the bridge as a PRESENCE.
    let out = h.step(Event::Msg(Msg::Presence {
        sub,
        user: watched,
        state: PresenceState::Online,
        last_seen_ms: 0,
    }));
    assert_eq!(
        out.to(A)[..],
        [&OwnedFrame::Presence {
            user: watched,
            state: PresenceState::Online,
            last_seen_ms: 0
        }]
    );
    let out = h.frame(A, Frame::Unsubscribe { user: watched });
    assert!(
        matches!(to_bridge(&out)[..], [Msg::Unwatch { user, .. }] if *user == watched),
        "{out:?}"
    );
}

#[test]
fn a_subscription_to_a_user_nobody_serves_is_unavailable() {
    let mut h = clustered();
    login_frame(&mut h, A, user_in(0), proto::VERSION_2);
    h.env.owners.as_ref().unwrap().set_other(1, None);
    let watched = user_in(1);
    let out = h.frame(A, Frame::Subscribe { user: watched });
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error { code: ErrorCode::Unavailable, client_id, .. }] if *client_id == watched
        ),
        "{out:?}"
    );
    assert!(to_bridge(&out).is_empty());
}

#[test]
fn another_nodes_subscriber_gets_the_state_now_and_every_change() {
    let mut h = clustered();
    let watched = user_in(0);
    let sub = ConnRef {
        shard: 3,
        conn: ConnId(9),
        gen: 2,
    };
    let on = |on| {
        Event::Msg(Msg::RemoteWatch {
            user: watched,
            node: 4,
            sub,
            on,
        })
    };
    let states = |out: &Out| -> Vec<(u16, PresenceState)> {
        to_bridge(out)
            .into_iter()
            .filter_map(|m| match m {
                Msg::RemotePresence {
                    node,
                    sub: s,
                    user,
                    state,
                    ..
                } if *s == sub && *user == watched => Some((*node, *state)),
                _ => None,
            })
            .collect()
    };
    let out = h.step(on(true));
    assert_eq!(states(&out), [(4, PresenceState::Offline)]);
    let out = login_frame(&mut h, A, watched, proto::VERSION_2);
    assert_eq!(states(&out), [(4, PresenceState::Online)]);
    h.step(on(false));
    let out = h.step(Event::Closed(A));
    assert!(states(&out).is_empty(), "unwatched: {out:?}");
}

#[test]
fn a_lost_partition_hands_its_local_subscriptions_to_the_bridge() {
    let mut h = clustered();
    let owners = h.env.owners.as_ref().unwrap();
    owners.set_here(1);
    let (subscriber, watched) = (user_in(0), user_in(1));
    login_frame(&mut h, A, subscriber, proto::VERSION_2);
    let out = h.frame(A, Frame::Subscribe { user: watched });
    assert!(to_bridge(&out).is_empty(), "served here: {out:?}");
    let owners = h.env.owners.as_ref().unwrap();
    let b = owners.node_index("b", B_ADDR).unwrap();
    owners.set_other(1, Some(b));
    let out = h.step(Event::Moved);
    assert!(
        matches!(to_bridge(&out)[..], [Msg::Watch { user, .. }] if *user == watched),
        "{out:?}"
    );
}

#[test]
fn typing_to_another_nodes_user_goes_to_the_bridge() {
    let mut h = clustered();
    let (typist, peer) = (user_in(0), user_in(1));
    login_frame(&mut h, A, typist, proto::VERSION_2);
    let out = h.frame(A, Frame::Typing { user: peer });
    assert!(
        matches!(to_bridge(&out)[..], [Msg::Typing { from, to }] if *from == typist && *to == peer),
        "{out:?}"
    );
}

/// A user's state replayed on claim (docs/CLUSTER.md, "Per-user state
/// across nodes"): its devices, waiting receipts, last seen and privacy
/// are in place, read back whole for the next publish, and the replay's
/// end goes back to the bridge.
#[test]
fn a_replayed_user_state_is_installed_and_read_back_whole() {
    use crate::cluster::state::UserState;
    use crate::store::devices::{Dev, Kept, KeptGroup};
    use crate::store::presence::Seen;

    let mut h = clustered();
    let user = user_in(0);
    let state = UserState {
        devices: vec![
            Dev {
                device: 1,
                lane: 0,
                last_ms: T0_MS - 5,
            },
            Dev {
                device: 2,
                lane: 1,
                last_ms: T0_MS - 9,
            },
        ],
        receipts: vec![Kept {
            kind: 1,
            server_id: 40,
            peer: 3,
            lanes: 0b11,
        }],
        group_receipts: vec![KeptGroup {
            kind: 2,
            lanes: 0b10,
            group: 9,
            msg: 4,
            members: vec![3, 5].into(),
        }],
        seen: Seen {
            last_seen_ms: T0_MS - 5,
            hidden: true,
        },
    };
    h.step(Event::Msg(Msg::Restore {
        user,
        state: Box::new(state.clone()),
    }));
    assert_eq!(h.s.registered_devices(user), vec![1, 2]);
    // One 1:1 receipt and a group receipt naming two members.
    assert_eq!(h.s.receipts_kept(user), 3);
    assert_eq!(h.s.user_state(user), state);
    assert_eq!(h.s.stats.receipts_waiting.get(), 3);
    let out = h.step(Event::Msg(Msg::Replayed { token: 5 }));
    assert!(
        matches!(to_bridge(&out)[..], [Msg::Replayed { token: 5 }]),
        "{out:?}"
    );
    // Device 1 gets the receipt that waited for it at its login.
    let out = super::login_device(&mut h, 1, user, 1);
    assert!(
        out.to(ConnId(1)).iter().any(|f| matches!(
            f,
            OwnedFrame::Receipt {
                kind: ReceiptKind::Delivered,
                server_id: 40,
                peer: 3
            }
        )),
        "{out:?}"
    );
    // Replayed again (the partition came back), with nothing: forgotten.
    h.step(Event::Closed(ConnId(1)));
    h.step(Event::Msg(Msg::Restore {
        user,
        state: Box::default(),
    }));
    assert_eq!(h.s.registered_devices(user), Vec::<u32>::new());
    assert_eq!(h.s.receipts_kept(user), 0);
    assert_eq!(h.s.user_state(user), UserState::default());
}

/// A receipt record from JetStream for `user`, numbered
/// `token` by the bridge.
fn bridge_receipt(user: u64, token: u64) -> Event<'static> {
    Event::Msg(Msg::Receipt {
        user,
        kind: ReceiptKind::Delivered,
        server_id: 1024,
        peer: 9,
        src: 0,
        seq: token,
    })
}

#[test]
fn a_receipt_record_is_acked_when_written_or_once_its_state_is_kept() {
    let mut h = clustered();
    let user = user_in(0);
    login_device(&mut h, 1, user, 0);
    login_device(&mut h, 2, user, 1);
    let mut taken = Vec::new();

    // Every device online: written to both, the record may go at once.
    let out = h.step(bridge_receipt(user, 11));
    assert_eq!(out.to(ConnId(1)).len() + out.to(ConnId(2)).len(), 2);
    h.s.take_bridge_receipts(&mut taken);
    let written = BridgeReceipt {
        user,
        token: 11,
        held: false,
    };
    assert_eq!(taken, [written]);

    // Device 1 offline: the receipt is kept for it, so the record waits
    // for the user's state; the same record again (a failed state publish
    // had its consumer start over) is still held, so the state goes again.
    h.step(Event::Closed(ConnId(2)));
    taken.clear();
    h.step(bridge_receipt(user, 12));
    h.step(bridge_receipt(user, 13));
    h.s.take_bridge_receipts(&mut taken);
    let held = |token| BridgeReceipt {
        user,
        token,
        held: true,
    };
    assert_eq!(taken, [held(12), held(13)]);
    assert_eq!(h.s.receipts_kept(user), 1, "the copy is not kept twice");

    // A group receipt likewise.
    taken.clear();
    h.step(Event::Msg(Msg::GroupReceipt {
        user,
        kind: ReceiptKind::Read,
        group: 5,
        msg: 3,
        peers: vec![7],
        src: 0,
        seqs: vec![14],
    }));
    h.s.take_bridge_receipts(&mut taken);
    assert_eq!(taken, [held(14)]);
    // Nothing goes to an outbox in a cluster.
    assert_eq!(h.s.outbox_len(), 0);

    // A shard crash loses what it took and did not answer: the bridge
    // hears it, to have JetStream bring those records again.
    h.step(bridge_receipt(user, 15));
    h.s.reset(h.now, &h.env, true);
    let (mut actions, mut wire) = (Vec::new(), Vec::new());
    h.s.take_actions(&mut actions, &mut wire);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Cluster(Msg::ReceiptsResend { shard: 0 }))),
        "{actions:?}"
    );
    taken.clear();
    h.s.take_bridge_receipts(&mut taken);
    assert_eq!(taken, []);
}
