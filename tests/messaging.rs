//! Message flow over real loopback sockets: ACK, DELIVER, receipts, order,
//! offline queues, redelivery, full queues and ring back-pressure.

mod common;

use common::*;
use tern::proto::{ErrorCode, Frame, OwnedFrame, ReceiptKind};
use tern_client::Client;

/// SEND → ACK → DELIVER → DELIVERED → RECEIPT(delivered) → READ → RECEIPT(read).
fn full_exchange(srv: &TestServer, a: u64, b: u64) {
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);

    alice.send_msg(42, b, b"hello bob").unwrap();
    let (server_id, ack_time) = match alice
        .recv_until(|f| matches!(f, OwnedFrame::Ack { .. } | OwnedFrame::Error { .. }))
    {
        Ok(OwnedFrame::Ack {
            client_id: 42,
            server_id,
            server_time_ms,
        }) => (server_id, server_time_ms),
        other => panic!("expected ACK(42), got {other:?}"),
    };

    let d = recv_deliver(&mut bob);
    assert_eq!(
        d,
        Delivered {
            server_id,
            from: a,
            server_time_ms: ack_time,
            body: b"hello bob".to_vec(),
        }
    );

    bob.send_delivered(server_id).unwrap();
    match alice.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. })) {
        Ok(OwnedFrame::Receipt {
            kind: ReceiptKind::Delivered,
            server_id: sid,
            peer,
        }) => {
            assert_eq!(sid, server_id);
            assert_eq!(peer, b);
        }
        other => panic!("expected RECEIPT(delivered), got {other:?}"),
    }

    bob.send_read(server_id, a).unwrap();
    match alice.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. })) {
        Ok(OwnedFrame::Receipt {
            kind: ReceiptKind::Read,
            server_id: sid,
            peer,
        }) => {
            assert_eq!(sid, server_id);
            assert_eq!(peer, b);
        }
        other => panic!("expected RECEIPT(read), got {other:?}"),
    }

    // Nothing else is pending on either side: no duplicate DELIVER or receipt.
    alice.ping(1).unwrap();
    bob.ping(2).unwrap();
    assert_eq!(alice.backlog_len(), 0, "alice got extra frames");
    assert_eq!(bob.backlog_len(), 0, "bob got extra frames");
}

#[test]
fn send_ack_deliver_receipts_across_shards() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    assert_ne!(
        tern::shard::home_shard(a, SHARDS),
        tern::shard::home_shard(b, SHARDS)
    );
    full_exchange(&srv, a, b);
}

#[test]
fn send_ack_deliver_receipts_on_one_shard() {
    let srv = TestServer::start();
    let (a, b) = same_pair();
    assert_eq!(
        tern::shard::home_shard(a, SHARDS),
        tern::shard::home_shard(b, SHARDS)
    );
    full_exchange(&srv, a, b);
}

/// Pipelines `n` SENDs from `alice` to `b` in one write; `bob` answers every
/// DELIVER with DELIVERED. Checks that the ACKs come back in order with
/// growing server ids and that the DELIVERs carry the same ids and bodies in
/// the same order.
fn ordered_burst(alice: &mut Client, bob: &mut Client, a: u64, b: u64, n: u64) {
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| indexed_body(i, 16)).collect();
    let frames: Vec<Frame<'_>> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| Frame::Send {
            client_id: i as u64 + 1,
            to: b,
            body,
        })
        .collect();
    alice.send_raw(&encode_all(&frames)).unwrap();

    let mut delivered = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let d = recv_deliver(bob);
        assert_eq!(d.from, a);
        bob.send_delivered(d.server_id).unwrap();
        delivered.push(d);
    }

    let mut acked = Vec::with_capacity(n as usize);
    let mut receipts = 0;
    while acked.len() < n as usize || receipts < n {
        match alice.recv() {
            Ok(OwnedFrame::Ack {
                client_id,
                server_id,
                ..
            }) => {
                assert_eq!(client_id, acked.len() as u64 + 1, "ACKs out of order");
                acked.push(server_id);
            }
            Ok(OwnedFrame::Receipt {
                kind: ReceiptKind::Delivered,
                ..
            }) => receipts += 1,
            other => panic!(
                "after {} ACKs and {receipts} receipts: unexpected {other:?}",
                acked.len()
            ),
        }
    }
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "server ids not growing"
    );
    let indices: Vec<u64> = delivered.iter().map(|d| body_index(&d.body)).collect();
    assert_eq!(indices, (0..n).collect::<Vec<_>>(), "DELIVERs out of order");
    let ids: Vec<u64> = delivered.iter().map(|d| d.server_id).collect();
    assert_eq!(ids, acked, "DELIVER ids differ from ACK ids");
}

#[test]
fn thousand_messages_across_shards_arrive_in_order() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);
    ordered_burst(&mut alice, &mut bob, a, b, 1000);
    assert_eq!(srv.info_u64("Msgs_in"), 1000);
}

#[test]
fn offline_messages_wait_and_arrive_in_order_at_login() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    const N: u64 = 50;
    let mut acked = Vec::new();
    for i in 0..N {
        alice.send_msg(i + 1, b, &indexed_body(i, 16)).unwrap();
        acked.push(recv_ack(&mut alice, i + 1));
    }
    let (mut bob, info) = srv.login_info(b);
    assert_eq!(info.offline_count, N);
    for (i, &server_id) in acked.iter().enumerate() {
        let d = recv_deliver(&mut bob);
        assert_eq!(d.server_id, server_id);
        assert_eq!(d.from, a);
        assert_eq!(body_index(&d.body), i as u64);
        bob.send_delivered(d.server_id).unwrap();
    }
    bob.ping(1).unwrap();
    assert_eq!(bob.backlog_len(), 0, "more DELIVERs than messages sent");
    // Every message was acknowledged: nothing is waiting any more.
    drop(bob);
    srv.wait_info("Users_online", |n| n == 1);
    let (_bob, info) = srv.login_info(b);
    assert_eq!(info.offline_count, 0);
}

#[test]
fn undelivered_message_is_sent_again_after_reconnect() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);
    alice.send_msg(9, b, b"are you there?").unwrap();
    let server_id = recv_ack(&mut alice, 9);
    let first = recv_deliver(&mut bob);
    assert_eq!(first.server_id, server_id);
    // Gone before DELIVERED.
    drop(bob);

    let (mut bob, info) = srv.login_info(b);
    assert_eq!(info.offline_count, 1);
    let again = recv_deliver(&mut bob);
    assert_eq!(again, first, "redelivery must carry the same message");
    bob.send_delivered(server_id).unwrap();
    expect_receipt(&mut alice, ReceiptKind::Delivered, server_id, b);
}

#[test]
fn send_to_full_queue_gets_queue_full_and_connection_stays_usable() {
    let srv = TestServer::start_with(|c| c.queue_len_max = 3);
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let frames: Vec<Frame<'_>> = (101..=104)
        .map(|client_id| Frame::Send {
            client_id,
            to: b,
            body: b"x",
        })
        .collect();
    alice.send_raw(&encode_all(&frames)).unwrap();
    for client_id in 101..=103 {
        recv_ack(&mut alice, client_id);
    }
    match alice.recv_until(|f| {
        matches!(
            f,
            OwnedFrame::Ack { client_id: 104, .. } | OwnedFrame::Error { .. }
        )
    }) {
        Ok(OwnedFrame::Error {
            code: ErrorCode::QueueFull,
            client_id: 104,
            ..
        }) => {}
        other => panic!("expected ERROR(queue_full, 104), got {other:?}"),
    }
    alice
        .ping(5)
        .expect("connection stays usable after queue_full");
    assert!(!alice.is_closed());

    // Bob gets exactly the three accepted messages.
    let (mut bob, info) = srv.login_info(b);
    assert_eq!(info.offline_count, 3);
    for _ in 0..3 {
        let d = recv_deliver(&mut bob);
        bob.send_delivered(d.server_id).unwrap();
    }
    bob.ping(1).unwrap();
    assert_eq!(bob.backlog_len(), 0);
    // With room again, the refused message can be retried.
    alice.send_msg(104, b, b"x").unwrap();
    recv_ack(&mut alice, 104);
}

/// Two-slot rings force the outbox and the sender's back-pressure path.
#[test]
fn tiny_rings_apply_back_pressure_without_losing_order() {
    let srv = TestServer::start_with(|c| {
        c.ring_slots = 2;
        c.queue_len_max = 5000;
    });
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);
    ordered_burst(&mut alice, &mut bob, a, b, 2000);
    let ring_full = srv.metric_sum("tern_ring_full_total");
    assert!(ring_full > 0, "the 2-slot ring never filled");
    let table = srv.query("show shards");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let col = header.iter().position(|&h| h == "ring_full").unwrap();
    let shown: u64 = table
        .lines()
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .nth(col)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(shown > 0, "show shards ring_full is 0:\n{table}");
}

/// Receipts for a sender who went offline wait for its next login.
#[test]
fn receipts_wait_for_an_offline_sender() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);
    alice.send_msg(7, b, b"see you later").unwrap();
    let server_id = recv_ack(&mut alice, 7);
    drop(alice);
    // Alice's session is gone before Bob answers.
    assert!(wait_for(|| srv.info_u64("Users_online") == 1));

    let d = recv_deliver(&mut bob);
    assert_eq!(d.server_id, server_id);
    bob.send_delivered(server_id).unwrap();
    bob.send_read(server_id, a).unwrap();
    // Bob's frames are handled in order: a PONG means both were.
    assert_eq!(bob.ping(1).ok(), Some(()), "bob still connected");

    let mut alice = srv.login(a);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        match alice.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. })) {
            Ok(OwnedFrame::Receipt {
                kind,
                server_id: sid,
                peer,
            }) => {
                assert_eq!((sid, peer), (server_id, b));
                kinds.push(kind);
            }
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    assert_eq!(kinds, vec![ReceiptKind::Delivered, ReceiptKind::Read]);
}
