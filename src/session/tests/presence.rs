//! Presence in the session layer: subscriptions on the watched user's home
//! shard, pushes on every change, the limit, privacy, typing, last seen
//! records, and version 1 sessions unchanged.

use super::*;
use crate::proto::PresenceState;
use crate::store::presence::Record;

fn login_v2(h: &mut Harness, conn: ConnId, user: u64) -> Out {
    h.step(Event::Opened(conn));
    let token = h.token(user);
    h.frame(
        conn,
        Frame::Login {
            version: proto::VERSION_2,
            token: token.as_bytes(),
        },
    )
}

fn presence(user: u64, state: PresenceState, last_seen_ms: u64) -> OwnedFrame {
    OwnedFrame::Presence {
        user,
        state,
        last_seen_ms,
    }
}

#[test]
fn a_subscriber_gets_the_state_now_then_online_and_offline() {
    let mut h = Harness::one();
    login_v2(&mut h, A, 1);
    let out = h.frame(A, Frame::Subscribe { user: 2 });
    assert_eq!(out.to(A), [&presence(2, PresenceState::Offline, 0)]);
    let out = h.login(1, 2);
    assert_eq!(out.to(A), [&presence(2, PresenceState::Online, 0)]);
    h.now.unix_ms += 5000;
    let out = h.step(Event::Closed(B));
    assert_eq!(
        out.to(A),
        [&presence(2, PresenceState::Offline, T0_MS + 5000)]
    );
    let mut records = Vec::new();
    assert_eq!(h.s.presence_pending(), (true, false));
    h.s.take_presence_records(&mut records);
    assert_eq!(
        records,
        [Record::LastSeen {
            user: 2,
            last_seen_ms: T0_MS + 5000
        }]
    );
    assert_eq!(h.s.presence_pending(), (false, false));
}

#[test]
fn a_replaced_session_stays_online_without_a_push() {
    let mut h = Harness::one();
    login_v2(&mut h, A, 1);
    h.frame(A, Frame::Subscribe { user: 2 });
    h.login(1, 2);
    let out = h.login(2, 2);
    assert!(out.to(A).is_empty(), "{out:?}");
    assert_eq!(h.s.presence_pending(), (false, false));
}

#[test]
fn subscriptions_of_a_closed_connection_end_on_every_shard() {
    // Shard 0 of 2: the watched user is homed on shard 1.
    let mut h = Harness::new(Config::default(), 0, 2);
    let here = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let there = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    login_v2(&mut h, A, here);
    let out = h.frame(A, Frame::Subscribe { user: there });
    assert!(
        matches!(out.routes()[..], [(1, Msg::Watch { user, sub })] if *user == there && sub.conn == A),
        "{out:?}"
    );
    let out = h.step(Event::Closed(A));
    assert!(
        matches!(out.routes()[..], [(1, Msg::Unwatch { user, sub })] if *user == there && sub.conn == A),
        "{out:?}"
    );
}

#[test]
fn a_push_for_a_gone_subscriber_undoes_its_subscription() {
    let mut h = Harness::new(Config::default(), 0, 2);
    let there = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    let sub = ConnRef {
        shard: 0,
        conn: A,
        gen: 99,
    };
    let out = h.step(Event::Msg(Msg::Presence {
        sub,
        user: there,
        state: PresenceState::Online,
        last_seen_ms: 0,
    }));
    assert!(out.frames.is_empty());
    assert!(
        matches!(out.routes()[..], [(1, Msg::Unwatch { user, sub: s })] if *user == there && *s == sub),
        "{out:?}"
    );
}

#[test]
fn the_limit_refuses_one_more_and_keeps_the_connection() {
    let mut h = Harness::new(
        Config {
            presence_subs_max: 1,
            ..Config::default()
        },
        0,
        1,
    );
    login_v2(&mut h, A, 1);
    h.frame(A, Frame::Subscribe { user: 2 });
    let out = h.frame(A, Frame::Subscribe { user: 3 });
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::PresenceSubsFull,
                client_id: 3,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(out.flow, Some(Flow::Next));
    assert!(!out.closes_after_flush(A));
    // Zero turns presence off.
    let mut h = Harness::new(
        Config {
            presence_subs_max: 0,
            ..Config::default()
        },
        0,
        1,
    );
    login_v2(&mut h, A, 1);
    let out = h.frame(A, Frame::Subscribe { user: 2 });
    assert!(matches!(
        out.to(A)[..],
        [OwnedFrame::Error {
            code: ErrorCode::PresenceSubsFull,
            ..
        }]
    ));
}

#[test]
fn privacy_hides_and_is_recorded_at_once() {
    let mut h = Harness::one();
    login_v2(&mut h, A, 1);
    h.frame(A, Frame::Subscribe { user: 2 });
    login_v2(&mut h, B, 2);
    let out = h.frame(B, Frame::Privacy { hidden: true });
    assert_eq!(out.to(A), [&presence(2, PresenceState::Hidden, 0)]);
    assert_eq!(h.s.presence_pending(), (true, true));
    // The same setting again changes nothing.
    let out = h.frame(B, Frame::Privacy { hidden: true });
    assert!(out.to(A).is_empty());
    // Going offline while hidden: last seen kept, nothing pushed.
    let out = h.step(Event::Closed(B));
    assert!(out.to(A).is_empty());
    let mut records = Vec::new();
    h.s.take_presence_records(&mut records);
    assert_eq!(
        records,
        [
            Record::Privacy {
                user: 2,
                hidden: true
            },
            Record::LastSeen {
                user: 2,
                last_seen_ms: T0_MS
            }
        ]
    );
}

#[test]
fn typing_goes_to_an_online_v2_peer_and_nowhere_else() {
    let mut h = Harness::one();
    login_v2(&mut h, A, 1);
    let out = h.frame(A, Frame::Typing { user: 2 });
    assert!(out.frames.is_empty() && out.routes().is_empty());
    login_v2(&mut h, B, 2);
    let out = h.frame(A, Frame::Typing { user: 2 });
    assert_eq!(out.to(B), [&OwnedFrame::Typing { user: 1 }]);
    // To oneself: dropped.
    let out = h.frame(A, Frame::Typing { user: 1 });
    assert!(out.frames.is_empty());
}

#[test]
fn a_v1_session_gets_unknown_type_and_is_closed() {
    let mut h = Harness::one();
    h.login(0, 1);
    let out = h.frame(A, Frame::Subscribe { user: 2 });
    assert_eq!(out.flow, Some(Flow::Stop));
    assert!(out.closes_after_flush(A));
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::Error { code: ErrorCode::UnknownType, client_id: 0, text }] if text == "unknown frame type 0x18"),
        "{out:?}"
    );
}

#[test]
fn presence_from_a_client_is_bad_state() {
    let mut h = Harness::one();
    login_v2(&mut h, A, 1);
    let out = h.frame(
        A,
        Frame::Presence {
            user: 2,
            state: PresenceState::Online,
            last_seen_ms: 0,
        },
    );
    assert_eq!(out.flow, Some(Flow::Stop));
    assert!(matches!(
        out.to(A)[..],
        [OwnedFrame::Error {
            code: ErrorCode::BadState,
            ..
        }]
    ));
}

#[test]
fn presence_frames_have_their_own_rate() {
    let mut h = Harness::new(
        Config {
            presence_frames_per_s_max: 1,
            presence_frames_burst_max: 2,
            ..Config::default()
        },
        0,
        1,
    );
    login_v2(&mut h, A, 1);
    h.frame(A, Frame::Subscribe { user: 2 });
    h.frame(A, Frame::Typing { user: 2 });
    // The third within the second is refused and not taken; PINGs are not
    // counted against it.
    let out = h.frame(A, Frame::Subscribe { user: 3 });
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::RateLimited,
                client_id: 0,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.s.stats.limited_presence.get(), 1);
    let out = h.frame(A, Frame::Ping { nonce: 1 });
    assert_eq!(out.to(A), [&OwnedFrame::Pong { nonce: 1 }]);
    // A second later there is room again.
    h.now.unix_ms += 1000;
    let out = h.frame(A, Frame::Subscribe { user: 3 });
    assert_eq!(out.to(A), [&presence(3, PresenceState::Offline, 0)]);
}
