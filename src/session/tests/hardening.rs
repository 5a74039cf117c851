//! The session layer's defences against abusive clients (`guard.rs`):
//! per-user rates, repeat offenders, and READ/DELIVERED only for messages
//! delivered to that connection.

use super::*;

fn harness(tweak: impl FnOnce(&mut Config)) -> Harness {
    let mut c = Config::default();
    tweak(&mut c);
    Harness::new(c, 0, 1)
}

fn error_codes(frames: &[&OwnedFrame]) -> Vec<(ErrorCode, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Error {
                code, client_id, ..
            } => Some((*code, *client_id)),
            _ => None,
        })
        .collect()
}

/// User 1 on A sends user 2 on B one message; returns its server id.
fn deliver_one(h: &mut Harness, client_id: u64) -> u64 {
    h.send(0, client_id, 2, b"m");
    let out = h.commit(&[]);
    deliver_ids(&out.to(B))[0]
}

#[test]
fn a_send_over_the_rate_is_refused_with_its_client_id_and_not_taken() {
    let mut h = harness(|c| {
        c.sends_per_s_max = 1;
        c.sends_burst_max = 2;
        c.rate_refusals_max = 0;
    });
    h.login(0, 1);
    h.login(1, 2);
    h.login(2, 3);
    h.send(0, 1, 2, b"a");
    h.send(0, 2, 2, b"b");
    let out = h.send(0, 3, 2, b"c");
    assert_eq!(out.flow, Some(Flow::Next), "the connection goes on");
    assert_eq!(error_codes(&out.to(A)), [(ErrorCode::RateLimited, 3)]);
    assert!(out.routes().is_empty());
    // Another user is not affected.
    h.send(2, 9, 2, b"d");
    let out = h.commit(&[]);
    assert_eq!(deliver_ids(&out.to(B)).len(), 3, "a, b and d: {out:?}");
    assert_eq!(h.s.store().len(2), 3);
    assert_eq!(h.s.stats.limited_sends.get(), 1);
    // A second later a token is back.
    h.now.unix_ms += 1000;
    h.send(0, 4, 2, b"e");
    let out = h.commit(&[]);
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::Ack { client_id: 4, .. }]),
        "{out:?}"
    );
}

#[test]
fn a_ping_over_the_rate_gets_no_pong() {
    let mut h = harness(|c| {
        c.pings_per_s_max = 1;
        c.pings_burst_max = 1;
    });
    h.login(0, 1);
    let out = h.frame(A, Frame::Ping { nonce: 1 });
    assert!(matches!(out.to(A)[..], [OwnedFrame::Pong { nonce: 1 }]));
    let out = h.frame(A, Frame::Ping { nonce: 2 });
    assert_eq!(error_codes(&out.to(A)), [(ErrorCode::RateLimited, 0)]);
    assert_eq!(out.to(A).len(), 1, "no PONG: {out:?}");
    assert_eq!(h.s.stats.limited_pings.get(), 1);
}

#[test]
fn receipts_have_their_own_rate() {
    let mut h = harness(|c| {
        c.receipts_per_s_max = 1;
        c.receipts_burst_max = 1;
    });
    h.login(0, 1);
    h.login(1, 2);
    let first = deliver_one(&mut h, 1);
    let second = deliver_one(&mut h, 2);
    h.frame(B, Frame::Delivered { server_id: first });
    let out = h.frame(B, Frame::Delivered { server_id: second });
    assert_eq!(error_codes(&out.to(B)), [(ErrorCode::RateLimited, 0)]);
    assert_eq!(
        h.s.store().len(2),
        1,
        "the refused DELIVERED removed nothing"
    );
    assert_eq!(h.s.stats.limited_receipts.get(), 1);
}

#[test]
fn a_repeat_offender_is_closed_with_bye() {
    let mut h = harness(|c| {
        c.pings_per_s_max = 1;
        c.pings_burst_max = 1;
        c.rate_refusals_max = 3;
    });
    h.login(0, 1);
    for nonce in 0..4 {
        let out = h.frame(A, Frame::Ping { nonce });
        assert_eq!(out.flow, Some(Flow::Next));
    }
    let out = h.frame(A, Frame::Ping { nonce: 9 });
    assert_eq!(out.flow, Some(Flow::Stop));
    assert!(
        matches!(
            out.to(A)[..],
            [
                OwnedFrame::Error {
                    code: ErrorCode::RateLimited,
                    ..
                },
                OwnedFrame::Bye {
                    reason: ByeReason::RateLimited
                }
            ]
        ),
        "{out:?}"
    );
    assert!(out.closes_after_flush(A));
    assert_eq!(h.s.stats.limited_closes.get(), 1);
}

#[test]
fn a_forged_read_is_refused_and_never_relayed() {
    let mut h = Harness::one();
    h.login(0, 1);
    h.login(1, 2);
    h.login(2, 3);
    let server_id = deliver_one(&mut h, 1);
    // User 3 never got it; user 2 names the wrong sender.
    for (conn, from) in [(ConnId(2), 1), (B, 3)] {
        let out = h.frame(conn, Frame::Read { server_id, from });
        assert_eq!(error_codes(&out.to(conn)), [(ErrorCode::UnknownMessage, 0)]);
        assert_eq!(out.flow, Some(Flow::Next));
    }
    let out = h.commit(&[]);
    assert!(out.frames.is_empty() && out.routes().is_empty(), "{out:?}");
    assert_eq!(h.s.stats.unknown_message_refusals.get(), 2);
    // The real reader's READ goes through.
    h.frame(B, Frame::Read { server_id, from: 1 });
    let out = h.commit(&[]);
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Receipt {
                kind: ReceiptKind::Read,
                peer: 2,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn a_read_after_the_next_login_is_refused() {
    let mut h = Harness::one();
    h.login(0, 1);
    h.login(1, 2);
    let server_id = deliver_one(&mut h, 1);
    h.frame(B, Frame::Delivered { server_id });
    h.commit(&[]);
    h.step(Event::Closed(B));
    assert_eq!(h.s.guard_sizes().1, 0, "forgotten at logout");
    h.login(1, 2);
    let out = h.frame(B, Frame::Read { server_id, from: 1 });
    assert_eq!(error_codes(&out.to(B)), [(ErrorCode::UnknownMessage, 0)]);
}

#[test]
fn delivered_acts_only_on_messages_sent_to_this_connection() {
    let mut h = harness(|c| c.deliver_inflight_max = 1);
    h.login(0, 1);
    h.login(1, 2);
    h.login(2, 3);
    let first = deliver_one(&mut h, 1);
    // The second waits behind the window: queued, not sent yet.
    h.send(0, 2, 2, b"n");
    assert!(deliver_ids(&h.commit(&[]).to(B)).is_empty());
    let second = first + (1 << 10);
    assert_eq!(h.s.store().len(2), 2);
    // Someone else's DELIVERED, and one for a message not sent yet.
    for (conn, id) in [(ConnId(2), first), (B, second)] {
        let out = h.frame(conn, Frame::Delivered { server_id: id });
        assert_eq!(error_codes(&out.to(conn)), [(ErrorCode::UnknownMessage, 0)]);
    }
    assert!(h.commit(&[]).frames.is_empty(), "no receipt");
    assert_eq!(h.s.store().len(2), 2, "nothing removed");
    // The real one removes and continues the window; a repeat is ignored.
    let out = h.frame(B, Frame::Delivered { server_id: first });
    assert_eq!(deliver_ids(&out.to(B)), [second]);
    let out = h.frame(B, Frame::Delivered { server_id: first });
    assert!(out.frames.is_empty(), "{out:?}");
    assert_eq!(h.s.store().len(2), 1);
}

#[test]
fn failed_logins_are_reported_for_the_address() {
    let mut h = Harness::one();
    h.step(Event::Opened(A));
    let out = h.frame(
        A,
        Frame::Login {
            version: proto::VERSION,
            token: b"v1.7.99.forged",
        },
    );
    assert!(out
        .others
        .iter()
        .any(|a| matches!(a, Action::LoginFailed(c) if *c == A)));
}

#[test]
fn idle_connections_keep_nothing_in_the_guard() {
    let mut h = harness(|c| c.idle_timeout_ms = 1000);
    h.login(0, 1);
    h.login(1, 2);
    assert_eq!(h.s.guard_sizes(), (0, 0), "logged in, nothing sent");
    h.frame(A, Frame::Ping { nonce: 1 });
    assert_eq!(h.s.guard_sizes(), (1, 0));
    // At its idle timer a full bucket is dropped.
    h.now.unix_ms += 1000;
    h.now.tick += 5;
    let gen = h.s.gen(A);
    h.step(Event::Timer(Entry { key: A.0, gen }));
    assert_eq!(h.s.guard_sizes().0, 0);
}

#[test]
fn a_send_waiting_for_ring_space_is_counted_once() {
    let c = Config {
        sends_per_s_max: 1,
        sends_burst_max: 1,
        ..Config::default()
    };
    let mut h = Harness::new(c, 0, 2);
    let me = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let them = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    h.login(0, me);
    h.env.room.set(false);
    for _ in 0..10 {
        let out = h.send(0, 1, them, b"m");
        assert_eq!(out.flow, Some(Flow::Blocked), "{out:?}");
    }
    h.env.room.set(true);
    let out = h.send(0, 1, them, b"m");
    assert_eq!(out.routes().len(), 1, "taken: {out:?}");
    let out = h.send(0, 2, them, b"m");
    assert_eq!(error_codes(&out.to(A)), [(ErrorCode::RateLimited, 2)]);
}

#[test]
fn an_error_text_is_cut_to_fit_the_smallest_frame_limit() {
    // At 64 bytes the unknown_message text does not fit whole; the frame
    // must still be one the peer accepts (the harness decodes with these
    // limits, and panics on a frame over them).
    let mut h = harness(|c| {
        c.frame_bytes_max = 64;
        c.body_bytes_max = 64 - crate::config::FRAME_OVERHEAD_BYTES_MAX;
    });
    h.login(0, 1);
    let out = h.frame(A, Frame::Delivered { server_id: 99 });
    match out.to(A)[..] {
        [OwnedFrame::Error {
            code: ErrorCode::UnknownMessage,
            text,
            ..
        }] => assert!(text.starts_with("DELIVERED names a message"), "{text}"),
        ref other => panic!("{other:?}"),
    }
}
