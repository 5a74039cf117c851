//! Idempotent SEND and DELIVER v2 in the session layer (protocol v2), on
//! the harness of `session/tests.rs`.

use super::*;

/// Opens `conn` and logs it in as `user` with protocol version 2.
fn login2(h: &mut Harness, conn: u32, user: u64) {
    let conn = ConnId(conn);
    h.step(Event::Opened(conn));
    let token = h.token(user);
    h.frame(
        conn,
        Frame::Login {
            version: proto::VERSION_2,
            token: token.as_bytes(),
        },
    );
    assert_eq!(h.s.user_of(conn), Some(user));
}

fn ack_of(out: &Out, conn: ConnId) -> (u64, u64) {
    match out.to(conn)[..] {
        [OwnedFrame::Ack {
            server_id,
            server_time_ms,
            ..
        }] => (*server_id, *server_time_ms),
        _ => panic!("expected one ACK: {out:?}"),
    }
}

#[test]
fn a_retry_staged_or_committed_gets_the_original_ack_and_no_deliver() {
    let mut h = Harness::one();
    login2(&mut h, 0, 1);
    login2(&mut h, 1, 2);
    // First copy and a retry before the commit: two equal ACKs, one DELIVER.
    h.send(0, 7, 2, b"hi");
    h.send(0, 7, 2, b"hi");
    let out = h.commit(&[]);
    let acks: Vec<_> = out.to(A);
    assert_eq!(acks.len(), 2, "{out:?}");
    assert_eq!(acks[0], acks[1]);
    assert!(
        matches!(
            out.to(B)[..],
            [OwnedFrame::Deliver {
                client_id: Some(7),
                ..
            }]
        ),
        "{out:?}"
    );
    let first = ack_of(
        &Out {
            frames: vec![(A, acks[0].clone())],
            ..Out::default()
        },
        A,
    );
    // Later, at another time: still the original id and time.
    h.now.unix_ms += 5000;
    h.send(0, 7, 2, b"hi");
    let out = h.commit(&[]);
    assert_eq!(ack_of(&out, A), first);
    assert!(out.to(B).is_empty(), "delivered twice: {out:?}");
    assert_eq!(h.s.store().len(2), 1);
    assert_eq!(h.s.stats.sends_deduped.get(), 2);
}

#[test]
fn a_rolled_back_first_copy_refuses_its_retry_too() {
    let mut h = Harness::one();
    login2(&mut h, 0, 1);
    h.send(0, 7, 2, b"hi");
    h.send(0, 7, 2, b"hi");
    // The store rolled the push back: both answers are storage_full.
    let server_id = (h.s.next_seq - 1) << 10;
    let out = h.commit(&[server_id]);
    assert!(
        out.to(A).iter().all(|f| matches!(
            f,
            OwnedFrame::Error {
                code: ErrorCode::StorageFull,
                client_id: 7,
                ..
            }
        )) && out.to(A).len() == 2,
        "{out:?}"
    );
}

#[test]
fn stale_client_ids_are_refused_and_the_connection_stays() {
    let mut h = Harness::one();
    login2(&mut h, 0, 1);
    h.send(0, 100, 2, b"x");
    h.commit(&[]);
    h.send(0, 68, 2, b"x");
    let out = h.commit(&[]);
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::StaleClientId,
                client_id: 68,
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(!out.closes_after_flush(A));
    // 69 is inside the window and new.
    h.send(0, 69, 2, b"x");
    assert!(matches!(
        h.commit(&[]).to(A)[..],
        [OwnedFrame::Ack { client_id: 69, .. }]
    ));
    assert_eq!(h.s.stats.stale_client_ids.get(), 1);
}

#[test]
fn v1_senders_are_not_deduplicated_and_v1_recipients_get_v1_delivers() {
    let mut h = Harness::one();
    h.login(0, 1); // v1 sender
    login2(&mut h, 1, 2); // v2 recipient
    h.login(2, 3); // v1 recipient
    h.send(0, 7, 2, b"x");
    h.send(0, 7, 2, b"x");
    let out = h.commit(&[]);
    let ids = deliver_ids(&out.to(B));
    assert_eq!(ids.len(), 2, "a v1 retry is taken again: {out:?}");
    assert!(out.to(B).iter().all(|f| matches!(
        f,
        OwnedFrame::Deliver {
            client_id: Some(0),
            ..
        }
    )));
    h.s.slots[0].version = proto::VERSION_2; // the sender speaks v2 now
    h.send(0, 8, 3, b"y");
    let out = h.commit(&[]);
    assert!(
        matches!(
            out.to(ConnId(2))[..],
            [OwnedFrame::Deliver {
                client_id: None,
                ..
            }]
        ),
        "{out:?}"
    );
}
