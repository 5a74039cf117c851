//! Unit tests of the session layer: no sockets, no clock, no rings. Each
//! test drives [`Sessions`] with events and checks the actions it returns
//! (frames decoded back from the wire bytes) and its state.
//!
//! Over 800 lines for a reason: one short test per protocol path, all on
//! the one harness below; split by topic (login, delivery, routing) when
//! new features add theirs.

use std::cell::Cell;

mod cluster;
mod dedupe;
mod presence;
mod push;
mod registry;
mod remove;

use super::*;
use crate::proto::{OwnedFrame, ReceiptKind};
use crate::shard::ConnRef;
use crate::store::devices::Record;
use crate::store::{MemStore, Origin};

/// Wall clock of the tests: any fixed time works, tokens are minted for it.
const T0_MS: u64 = 1_700_000_000_000;

/// An [`Env`] the tests can turn: shards up or down, outboxes full.
struct TestEnv {
    down: Cell<Option<usize>>,
    room: Cell<bool>,
    /// Cluster tests: the partition table; `None` is standalone.
    owners: Option<crate::cluster::Owners>,
    /// Every connection's silence limit and window, when set (as the
    /// MQTT listener sets them).
    silence_ms: Cell<Option<u64>>,
    inflight: Cell<Option<usize>>,
}

impl Env for TestEnv {
    fn up(&self, shard: usize) -> bool {
        self.down.get() != Some(shard)
    }
    fn has_room(&self, _shard: usize) -> bool {
        self.room.get()
    }
    fn out_pending(&self, _conn: ConnId) -> usize {
        0
    }
    fn owner(&self, user: u64) -> Owner<'_> {
        self.owners
            .as_ref()
            .map_or(Owner::Here, |o| o.of_user(user))
    }
    fn bridge_has_room(&self) -> bool {
        self.room.get()
    }
    fn silence_ms_max(&self, _conn: ConnId) -> Option<u64> {
        self.silence_ms.get()
    }
    fn inflight_max(&self, _conn: ConnId) -> Option<usize> {
        self.inflight.get()
    }
}

/// One step's outcome, owned: frames decoded, other actions kept.
#[derive(Debug, Default)]
struct Out {
    flow: Option<Flow>,
    frames: Vec<(ConnId, OwnedFrame)>,
    others: Vec<Action>,
}

impl Out {
    fn to(&self, conn: ConnId) -> Vec<&OwnedFrame> {
        self.frames
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, f)| f)
            .collect()
    }
    fn closes_after_flush(&self, conn: ConnId) -> bool {
        self.others
            .iter()
            .any(|a| matches!(a, Action::CloseAfterFlush(c) if *c == conn))
    }
    fn closes_now(&self, conn: ConnId) -> bool {
        self.others
            .iter()
            .any(|a| matches!(a, Action::CloseNow(c) if *c == conn))
    }
    fn routes(&self) -> Vec<(usize, &Msg)> {
        self.others
            .iter()
            .filter_map(|a| match a {
                Action::Route { dst, msg } => Some((*dst, msg)),
                _ => None,
            })
            .collect()
    }
}

struct Harness {
    s: Sessions,
    env: TestEnv,
    now: Now,
    config: Arc<Config>,
}

impl Harness {
    fn new(config: Config, id: usize, shards: usize) -> Harness {
        let config = Arc::new(config);
        let store = Box::new(MemStore::new(config.queue_len_max));
        let s = Sessions::new(
            config.clone(),
            id,
            shards,
            store,
            Arc::new(ShardStats::default()),
        );
        Harness {
            s,
            env: TestEnv {
                down: Cell::new(None),
                room: Cell::new(true),
                owners: None,
                silence_ms: Cell::new(None),
                inflight: Cell::new(None),
            },
            now: Now {
                tick: 0,
                unix_ms: T0_MS,
                mono_ns: 0,
            },
            config,
        }
    }

    fn one() -> Harness {
        Harness::new(Config::default(), 0, 1)
    }

    fn step(&mut self, event: Event<'_>) -> Out {
        let flow = self.s.on_event(self.now, &self.env, event);
        let mut out = Out {
            flow: Some(flow),
            ..Out::default()
        };
        let (mut actions, mut wire) = (Vec::new(), Vec::new());
        self.s.take_actions(&mut actions, &mut wire);
        for a in actions {
            match a {
                Action::Write { conn, bytes } => {
                    let mut at = bytes.start;
                    while at < bytes.end {
                        let (frame, used) = proto::decode(&wire[at..bytes.end], self.s.limits())
                            .expect("the session layer writes valid frames")
                            .expect("whole frames");
                        out.frames.push((conn, frame.to_owned()));
                        at += used;
                    }
                }
                other => out.others.push(other),
            }
        }
        out
    }

    fn token(&self, user: u64) -> String {
        token::mint(
            self.config.token_secret.as_bytes(),
            user,
            T0_MS / 1000 + 3600,
        )
    }

    fn frame(&mut self, conn: ConnId, frame: Frame<'_>) -> Out {
        self.step(Event::Frame {
            conn,
            frame,
            rest: &[],
        })
    }

    /// Opens connection `conn` and logs it in as `user` (homed here).
    fn login(&mut self, conn: u32, user: u64) -> Out {
        let conn = ConnId(conn);
        self.step(Event::Opened(conn));
        let token = self.token(user);
        let out = self.frame(
            conn,
            Frame::Login {
                version: proto::VERSION,
                token: token.as_bytes(),
            },
        );
        assert_eq!(self.s.user_of(conn), Some(user), "{out:?}");
        out
    }

    fn send(&mut self, conn: u32, client_id: u64, to: u64, body: &[u8]) -> Out {
        self.frame(
            ConnId(conn),
            Frame::Send {
                client_id,
                to,
                body,
            },
        )
    }

    fn commit(&mut self, refused: &[u64]) -> Out {
        self.step(Event::Committed { refused })
    }
}

fn deliver_ids(frames: &[&OwnedFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Deliver { server_id, .. } => Some(*server_id),
            _ => None,
        })
        .collect()
}

const A: ConnId = ConnId(0);
const B: ConnId = ConnId(1);

#[test]
fn opening_arms_the_login_timer() {
    let mut h = Harness::one();
    let out = h.step(Event::Opened(A));
    assert_eq!(h.s.state(A), State::Login);
    assert_eq!(h.s.user_of(A), None);
    let deadline = h.s.login_ticks.min(h.s.idle_ticks);
    assert!(
        matches!(out.others[..], [Action::Arm { entry, deadline: d }] if entry.key == 0 && entry.gen == h.s.gen(A) && d == deadline),
        "{out:?}"
    );
}

#[test]
fn login_answers_login_ok_and_marks_the_user_online() {
    let mut h = Harness::one();
    let out = h.login(0, 7);
    assert_eq!(out.flow, Some(Flow::Next));
    assert!(
        matches!(out.others[..], [Action::Established(A)]),
        "{out:?}"
    );
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::LoginOk {
                server_time_ms: T0_MS,
                offline_count: 0
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.s.conn_of(7), Some(A));
    assert_eq!(h.s.users_online(), 1);
    assert_eq!(h.s.stats.logins_ok.get(), 1);
}

#[test]
fn bad_tokens_and_versions_are_refused_and_close() {
    let mut h = Harness::one();
    let cases: [(&[u8], u8, ErrorCode); 4] = [
        (b"v1.7.99.forged", proto::VERSION, ErrorCode::BadToken),
        (b"whatever", proto::VERSION_MAX + 1, ErrorCode::BadVersion),
        (b"whatever", 0, ErrorCode::BadVersion),
        (b"", proto::VERSION, ErrorCode::BadToken),
    ];
    for (i, (token, version, code)) in cases.into_iter().enumerate() {
        let conn = ConnId(i as u32);
        h.step(Event::Opened(conn));
        let out = h.frame(conn, Frame::Login { version, token });
        assert_eq!(out.flow, Some(Flow::Stop));
        assert!(
            matches!(out.to(conn)[..], [OwnedFrame::LoginErr { code: c, .. }] if *c == code),
            "{out:?}"
        );
        assert!(out.closes_after_flush(conn));
        assert_eq!(h.s.state(conn), State::Closing);
        assert_eq!(h.s.user_of(conn), None);
    }
    // An expired token, signed right.
    let expired = token::mint(h.config.token_secret.as_bytes(), 7, T0_MS / 1000 - 1);
    h.step(Event::Opened(ConnId(9)));
    let out = h.frame(
        ConnId(9),
        Frame::Login {
            version: proto::VERSION,
            token: expired.as_bytes(),
        },
    );
    assert!(
        matches!(
            out.to(ConnId(9))[..],
            [OwnedFrame::LoginErr {
                code: ErrorCode::TokenExpired,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.s.stats.logins_failed.get(), 5);
    assert_eq!(h.s.users_online(), 0);
}

#[test]
fn frames_before_login_and_a_second_login_are_errors() {
    let mut h = Harness::one();
    h.step(Event::Opened(A));
    let out = h.send(0, 5, 2, b"hi");
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::NotLoggedIn,
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(out.closes_after_flush(A));
    // Input of a closing connection is dropped.
    assert_eq!(h.step(Event::Received(A)).flow, Some(Flow::Stop));

    h.login(1, 7);
    let token = h.token(7);
    let out = h.frame(
        B,
        Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        },
    );
    assert!(
        matches!(
            out.to(B)[..],
            [OwnedFrame::Error {
                code: ErrorCode::AlreadyLoggedIn,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.s.conn_of(7), None, "a closing session is offline");
}

#[test]
fn undecodable_input_is_an_error_and_a_close() {
    let mut h = Harness::one();
    h.step(Event::Opened(A));
    let out = h.step(Event::Undecodable {
        conn: A,
        error: proto::DecodeError::UnknownType(0x7f),
    });
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
    assert!(out.closes_after_flush(A));
    assert_eq!(h.s.stats.protocol_errors.get(), 1);
}

#[test]
fn ping_pong_and_bye() {
    let mut h = Harness::one();
    h.login(0, 7);
    let out = h.frame(A, Frame::Ping { nonce: 42 });
    assert!(matches!(out.to(A)[..], [OwnedFrame::Pong { nonce: 42 }]));
    let out = h.frame(
        A,
        Frame::Bye {
            reason: ByeReason::Shutdown,
        },
    );
    assert!(out.closes_now(A));
    assert_eq!(h.s.state(A), State::Free);
    assert_eq!(h.s.conn_of(7), None);
}

#[test]
fn send_ack_deliver_delivered_and_receipts_wait_for_the_commit() {
    let mut h = Harness::one();
    h.login(0, 1);
    h.login(1, 2);
    let out = h.send(0, 11, 2, b"hello");
    assert_eq!(out.flow, Some(Flow::Next));
    assert!(out.frames.is_empty(), "nothing before the commit: {out:?}");

    let out = h.commit(&[]);
    let server_id = match out.to(A)[..] {
        [OwnedFrame::Ack {
            client_id: 11,
            server_id,
            server_time_ms: T0_MS,
        }] => *server_id,
        _ => panic!("{out:?}"),
    };
    assert!(
        matches!(out.to(B)[..], [OwnedFrame::Deliver { server_id: s, from: 1, body, .. }] if *s == server_id && body == b"hello"),
        "{out:?}"
    );

    // DELIVERED removes it; the delivery receipt waits for the commit.
    let out = h.frame(B, Frame::Delivered { server_id });
    assert!(out.frames.is_empty(), "{out:?}");
    assert_eq!(h.s.store().len(2), 0);
    let out = h.commit(&[]);
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::Receipt { kind: ReceiptKind::Delivered, server_id: s, peer: 2 }] if *s == server_id),
        "{out:?}"
    );
    // A second DELIVERED is a no-op.
    h.frame(B, Frame::Delivered { server_id });
    assert!(h.commit(&[]).frames.is_empty());

    let out = h.frame(B, Frame::Read { server_id, from: 1 });
    assert!(out.frames.is_empty());
    let out = h.commit(&[]);
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::Receipt { kind: ReceiptKind::Read, server_id: s, peer: 2 }] if *s == server_id),
        "{out:?}"
    );
}

#[test]
fn a_push_the_commit_rolled_back_is_storage_full() {
    let mut h = Harness::one();
    h.login(0, 1);
    h.send(0, 11, 2, b"x");
    // The first id of an empty store's shard 0.
    let server_id = 1 << 10;
    let out = h.commit(&[server_id]);
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::StorageFull,
                client_id: 11,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.s.stats.storage_full.get(), 1);
}

#[test]
fn a_full_queue_refuses_and_user_zero_does_not_exist() {
    let mut h = Harness::new(
        Config {
            queue_len_max: 1,
            ..Config::default()
        },
        0,
        1,
    );
    h.login(0, 1);
    h.send(0, 1, 2, b"a");
    h.send(0, 2, 2, b"b");
    let out = h.commit(&[]);
    let frames = out.to(A);
    assert!(
        matches!(
            frames[..],
            [
                OwnedFrame::Ack { client_id: 1, .. },
                OwnedFrame::Error {
                    code: ErrorCode::QueueFull,
                    client_id: 2,
                    ..
                }
            ]
        ),
        "{out:?}"
    );
    let out = h.send(0, 3, 0, b"c");
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::BadRecipient,
                client_id: 3,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn the_delivery_window_holds_by_count_and_by_bytes() {
    let mut h = Harness::new(
        Config {
            deliver_inflight_max: 2,
            ..Config::default()
        },
        0,
        1,
    );
    h.login(0, 1);
    for i in 0..3 {
        h.send(0, i, 2, b"m");
    }
    h.commit(&[]);
    let out = h.login(1, 2);
    assert!(
        matches!(
            out.to(B)[0],
            OwnedFrame::LoginOk {
                offline_count: 3,
                ..
            }
        ),
        "{out:?}"
    );
    let sent = deliver_ids(&out.to(B));
    assert_eq!(sent.len(), 2, "{out:?}");
    assert!(matches!(h.s.window(2), Some((2, bytes)) if bytes > 0));
    let out = h.frame(B, Frame::Delivered { server_id: sent[0] });
    assert_eq!(deliver_ids(&out.to(B)).len(), 1, "one answered, one more");

    // By bytes: a window smaller than two DELIVERs lets one through at a time.
    let mut h = Harness::new(
        Config {
            deliver_inflight_bytes_max: 20,
            ..Config::default()
        },
        0,
        1,
    );
    h.login(0, 1);
    for i in 0..3 {
        h.send(0, i, 2, b"0123456789");
    }
    h.commit(&[]);
    let out = h.login(1, 2);
    let sent = deliver_ids(&out.to(B));
    assert_eq!(sent.len(), 1, "{out:?}");
    let out = h.frame(B, Frame::Delivered { server_id: sent[0] });
    assert_eq!(deliver_ids(&out.to(B)).len(), 1);
}

#[test]
fn receipts_for_an_offline_sender_wait_for_its_login() {
    let mut h = Harness::one();
    h.login(0, 1);
    h.login(1, 2);
    h.send(0, 1, 2, b"m");
    let server_id = deliver_ids(&h.commit(&[]).to(B))[0];
    h.step(Event::Closed(A));
    assert_eq!(h.s.conn_of(1), None);
    h.frame(B, Frame::Delivered { server_id });
    h.commit(&[]);
    assert_eq!(h.s.receipts_kept(1), 1);
    let out = h.login(2, 1);
    assert!(
        matches!(out.to(ConnId(2))[..], [OwnedFrame::LoginOk { .. }, OwnedFrame::Receipt { kind: ReceiptKind::Delivered, server_id: s, peer: 2 }] if *s == server_id),
        "{out:?}"
    );
    assert_eq!(h.s.receipts_kept(1), 0);
}

#[test]
fn a_second_login_replaces_the_first() {
    let mut h = Harness::one();
    h.login(0, 7);
    let out = h.login(1, 7);
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Bye {
                reason: ByeReason::Replaced
            }]
        ),
        "{out:?}"
    );
    assert!(out.closes_after_flush(A));
    assert_eq!(h.s.conn_of(7), Some(B));
    assert_eq!(h.s.user_of(A), None);
    // The old connection's close does not take the new one offline.
    h.step(Event::Closed(A));
    assert_eq!(h.s.conn_of(7), Some(B));
}

#[test]
fn timers_expire_login_idle_and_linger() {
    let mut h = Harness::one();
    h.step(Event::Opened(A));
    let entry = Entry {
        key: A.0,
        gen: h.s.gen(A),
    };
    // Early: re-armed at the real deadline.
    h.now.tick = 1;
    let out = h.step(Event::Timer(entry));
    assert!(
        matches!(out.others[..], [Action::Arm { deadline, .. }] if deadline == h.s.login_ticks),
        "{out:?}"
    );
    h.now.tick = h.s.login_ticks;
    let out = h.step(Event::Timer(entry));
    assert!(out.closes_now(A), "{out:?}");
    // A stale entry (the slot reused) does nothing.
    h.login(0, 7);
    assert!(h.step(Event::Timer(entry)).others.is_empty());

    let entry = Entry {
        key: A.0,
        gen: h.s.gen(A),
    };
    h.now.tick += h.s.idle_ticks;
    let out = h.step(Event::Timer(entry));
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Bye {
                reason: ByeReason::Idle
            }]
        ),
        "{out:?}"
    );
    assert!(out.closes_after_flush(A));
    h.step(Event::WriteShut(A));
    assert_eq!(h.s.state(A), State::Shut);
    h.now.tick += h.s.linger_ticks;
    assert!(h.step(Event::Timer(entry)).closes_now(A));
    assert_eq!(h.s.state(A), State::Free);
}

#[test]
fn deliveries_turned_off_wait_until_turned_on() {
    let mut h = Harness::one();
    h.login(0, 1);
    // B is paused from its accept, as an MQTT connection is.
    h.step(Event::Opened(B));
    h.step(Event::Deliveries { conn: B, on: false });
    let token = h.token(2);
    let out = h.frame(
        B,
        Frame::Login {
            version: 1,
            token: token.as_bytes(),
        },
    );
    assert!(
        matches!(out.to(B)[..], [OwnedFrame::LoginOk { .. }]),
        "{out:?}"
    );
    h.send(0, 1, 2, b"one");
    let out = h.commit(&[]);
    assert!(out.to(B).is_empty(), "paused: {out:?}");
    // Turned on: what waits is sent, in order; new messages follow.
    let out = h.step(Event::Deliveries { conn: B, on: true });
    assert!(
        matches!(out.to(B)[..], [OwnedFrame::Deliver { body, .. }] if body == b"one"),
        "{out:?}"
    );
    h.send(0, 2, 2, b"two");
    let out = h.commit(&[]);
    assert!(
        matches!(out.to(B)[..], [OwnedFrame::Deliver { body, .. }] if body == b"two"),
        "{out:?}"
    );
    // Off again: the next one waits; on twice sends it once.
    h.step(Event::Deliveries { conn: B, on: false });
    h.send(0, 3, 2, b"three");
    assert!(h.commit(&[]).to(B).is_empty());
    let out = h.step(Event::Deliveries { conn: B, on: true });
    assert_eq!(out.to(B).len(), 1, "{out:?}");
    assert!(h
        .step(Event::Deliveries { conn: B, on: true })
        .to(B)
        .is_empty());
}

#[test]
fn a_connections_own_silence_limit_and_window() {
    let mut h = Harness::one();
    h.env.silence_ms.set(Some(1500));
    h.env.inflight.set(Some(1));
    h.login(0, 1);
    h.login(1, 2);
    for i in 1..=2 {
        h.send(0, i, 2, b"m");
    }
    let out = h.commit(&[]);
    assert_eq!(deliver_ids(&out.to(B)).len(), 1, "a window of 1: {out:?}");
    // Silent for 1.5 s (not idle_timeout_ms): BYE(idle).
    let entry = Entry {
        key: B.0,
        gen: h.s.gen(B),
    };
    h.now.tick += timer::ticks(Duration::from_millis(1500));
    let out = h.step(Event::Timer(entry));
    assert!(
        matches!(
            out.to(B)[..],
            [OwnedFrame::Bye {
                reason: ByeReason::Idle
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn slow_readers_and_shutdown_get_bye() {
    let mut h = Harness::one();
    h.login(0, 7);
    h.step(Event::Opened(B));
    let out = h.step(Event::Slow(A));
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Bye {
                reason: ByeReason::Slow
            }]
        ),
        "{out:?}"
    );
    let out = h.step(Event::Shutdown(None));
    assert!(out.to(A).is_empty(), "already closing");
    assert!(
        matches!(
            out.to(B)[..],
            [OwnedFrame::Bye {
                reason: ByeReason::Shutdown
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn an_upgrade_shutdown_says_bye_upgrade_to_logged_in_and_new_connections() {
    let mut h = Harness::one();
    h.login(0, 7);
    h.step(Event::Opened(B));
    h.s.set_shutdown_reason(ByeReason::Upgrade);
    let out = h.step(Event::Shutdown(None));
    for conn in [A, B] {
        assert!(
            matches!(
                out.to(conn)[..],
                [OwnedFrame::Bye {
                    reason: ByeReason::Upgrade
                }]
            ),
            "{out:?}"
        );
        assert!(out.closes_after_flush(conn));
    }
}

#[test]
fn a_login_for_another_home_hands_the_connection_off() {
    let mut h = Harness::new(Config::default(), 0, 2);
    let user = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    h.step(Event::Opened(A));
    let token = h.token(user);
    let out = h.frame(
        A,
        Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        },
    );
    assert_eq!(out.flow, Some(Flow::Stop));
    assert!(
        matches!(out.others[..], [Action::Handoff { conn: A, user: u, home: 1, .. }] if u == user),
        "{out:?}"
    );
    assert_eq!(h.s.state(A), State::Free);
    assert_eq!(h.s.stats.handoffs_out.get(), 1);

    // Its home shard down: refused.
    h.env.down.set(Some(1));
    h.step(Event::Opened(B));
    let out = h.frame(
        B,
        Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        },
    );
    assert!(
        matches!(
            out.to(B)[..],
            [OwnedFrame::LoginErr {
                code: ErrorCode::Unavailable,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn a_device_token_names_the_sends_origin_and_travels_with_a_handoff() {
    let mut h = Harness::new(Config::default(), 0, 2);
    let here = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let there = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    let secret = h.config.token_secret.clone();
    let device_token = |user| token::mint_device(secret.as_bytes(), user, 3, T0_MS / 1000 + 60);

    // Homed elsewhere: the handoff carries the device.
    h.step(Event::Opened(A));
    let t = device_token(there);
    let out = h.frame(
        A,
        Frame::Login {
            version: proto::VERSION_2,
            token: t.as_bytes(),
        },
    );
    assert!(
        matches!(
            out.others[..],
            [Action::Handoff {
                device: 3,
                home: 1,
                ..
            }]
        ),
        "{out:?}"
    );

    // Homed here: its v2 SENDs are known by (device 3, client_id).
    h.step(Event::Opened(B));
    let t = device_token(here);
    h.frame(
        B,
        Frame::Login {
            version: proto::VERSION_2,
            token: t.as_bytes(),
        },
    );
    assert_eq!(h.s.user_of(B), Some(here));
    let out = h.send(B.0, 9, there, b"x");
    assert!(
        matches!(
            out.routes()[..],
            [(
                1,
                Msg::Send {
                    origin: Some(Origin {
                        device: 3,
                        client_id: 9
                    }),
                    ..
                }
            )]
        ),
        "{out:?}"
    );

    // A handed-over device keeps its device.
    let c = ConnId(2);
    h.step(Event::Opened(c));
    h.step(Event::HandedOver {
        conn: c,
        user: (here + 1..).find(|&u| home_shard(u, 2) == 0).unwrap(),
        device: 7,
        version: proto::VERSION_2,
        resumed: false,
    });
    let out = h.send(c.0, 4, there, b"y");
    assert!(
        matches!(
            out.routes()[..],
            [(
                1,
                Msg::Send {
                    origin: Some(Origin { device: 7, .. }),
                    ..
                }
            )]
        ),
        "{out:?}"
    );
}

#[test]
fn sends_to_another_shard_are_routed_blocked_or_refused() {
    let mut h = Harness::new(Config::default(), 0, 2);
    let me = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let them = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    h.login(0, me);
    let out = h.send(0, 1, them, b"x");
    assert!(
        matches!(out.routes()[..], [(1, Msg::Send { from, to, client_id: 1, .. })] if *from == me && *to == them),
        "{out:?}"
    );
    h.env.room.set(false);
    let out = h.send(0, 2, them, b"y");
    assert_eq!(out.flow, Some(Flow::Blocked));
    assert!(out.others.is_empty() && out.frames.is_empty());
    h.env.room.set(true);
    h.env.down.set(Some(1));
    let out = h.send(0, 3, them, b"z");
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::Error {
                code: ErrorCode::Unavailable,
                client_id: 3,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn a_send_from_another_shard_is_acked_there_after_the_commit() {
    let mut h = Harness::new(Config::default(), 0, 2);
    let to = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let reply = ConnRef {
        shard: 1,
        conn: ConnId(5),
        gen: 3,
    };
    let send = |client_id| {
        Event::Msg(Msg::Send {
            from: 99,
            reply,
            client_id,
            origin: None,
            to,
            body: b"b".to_vec().into(),
            sent_ns: 0,
        })
    };
    let out = h.step(send(1));
    assert!(out.others.is_empty(), "{out:?}");
    let out = h.commit(&[]);
    assert!(
        matches!(out.routes()[..], [(1, Msg::Ack { client_id: 1, .. })]),
        "{out:?}"
    );

    // A crash before the commit: the answer goes anyway, as ERROR(internal).
    h.step(send(2));
    h.s.reset(h.now, &h.env, false);
    let routes: Vec<_> = h.s.actions().iter().collect();
    assert!(
        matches!(
            routes[..],
            [
                Action::Route {
                    dst: 1,
                    msg: Msg::Reject {
                        client_id: 2,
                        code: ErrorCode::Internal,
                        ..
                    }
                },
                // Receipts taken and lost with the crash come again.
                Action::Route {
                    dst: 1,
                    msg: Msg::ReceiptsResend { shard: 0 }
                }
            ]
        ),
        "{routes:?}"
    );
}

#[test]
fn receipts_to_a_down_shard_wait_in_the_outbox_until_taken() {
    // A READ of a message never delivered: the check is off here.
    let config = Config {
        delivered_recent_max: 0,
        ..Config::default()
    };
    let mut h = Harness::new(config, 0, 2);
    let me = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let them = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    h.login(0, me);
    h.frame(
        A,
        Frame::Read {
            server_id: 1,
            from: them,
        },
    );
    h.env.down.set(Some(1));
    let out = h.commit(&[]);
    let seq = match out.routes()[..] {
        [(1, Msg::Receipt { src: 0, seq, .. })] => *seq,
        _ => panic!("{out:?}"),
    };
    assert_eq!(h.s.stats.receipts_dropped.get(), 0);
    assert_eq!(h.s.outbox_len(), 1);
    let mut records = Vec::new();
    h.s.take_device_records(&mut records);
    assert!(
        matches!(records[..], [.., Record::Outbox { seq: s, .. }] if s == seq),
        "{records:?}"
    );
    // Its shard has it: it leaves the outbox, once.
    for _ in 0..2 {
        h.step(Event::Msg(Msg::ReceiptsTaken { seqs: vec![seq] }));
    }
    assert_eq!(h.s.outbox_len(), 0);
    h.s.take_device_records(&mut records);
    assert!(matches!(records[..], [Record::OutboxDone { seq: s }] if s == seq));
}

#[cfg(debug_assertions)]
#[test]
fn the_crash_hook_is_flagged_not_thrown() {
    let mut h = Harness::one();
    h.login(0, 7);
    h.send(0, 1, CRASH_USER, b"x");
    assert!(h.s.crash_requested());
    h.s.reset(h.now, &h.env, true);
    assert!(!h.s.crash_requested());
    assert_eq!(h.s.users_online(), 0);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "PANIC_USER")]
fn the_panic_hook_panics_in_the_handler() {
    let mut h = Harness::one();
    h.login(0, 7);
    h.send(0, 1, PANIC_USER, b"x");
}

#[test]
fn events_for_connections_never_opened_do_nothing() {
    let mut h = Harness::one();
    let ghost = ConnId(77);
    for out in [
        h.frame(ghost, Frame::Ping { nonce: 1 }),
        h.step(Event::Received(ghost)),
        h.step(Event::Closed(ghost)),
        h.step(Event::Slow(ghost)),
        h.step(Event::Failed(ghost)),
        h.step(Event::Timer(Entry { key: 77, gen: 1 })),
    ] {
        assert!(out.frames.is_empty() && out.others.is_empty(), "{out:?}");
    }
    assert_eq!(h.s.state(ghost), State::Free);
}

/// The defences against abusive clients (`guard.rs`).
mod hardening;

/// Logs `conn` in as `device` of `user` with protocol 2.
fn login_device(h: &mut Harness, conn: u32, user: u64, device: u32) -> Out {
    let conn = ConnId(conn);
    h.step(Event::Opened(conn));
    let t = token::mint_device(
        h.config.token_secret.as_bytes(),
        user,
        device,
        T0_MS / 1000 + 3600,
    );
    h.frame(
        conn,
        Frame::Login {
            version: proto::VERSION_2,
            token: t.as_bytes(),
        },
    )
}

#[test]
fn a_message_to_two_devices_stays_until_both_answered() {
    let mut h = Harness::one();
    login_device(&mut h, 0, 7, 1);
    login_device(&mut h, 1, 7, 2);
    h.login(2, 9);
    assert_eq!((h.s.users_online(), h.s.sessions_online()), (2, 3));
    assert_eq!(h.s.conns_of(7), [A, B]);
    const C: ConnId = ConnId(2);

    h.send(2, 1, 7, b"one");
    let out = h.commit(&[]);
    let id = deliver_ids(&out.to(A))[0];
    assert_eq!(deliver_ids(&out.to(B)), [id]);
    // The first DELIVERED: the receipt, once committed; still queued.
    h.frame(A, Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 1);
    let out = h.commit(&[]);
    assert!(
        matches!(out.to(C)[..], [OwnedFrame::Receipt { kind: ReceiptKind::Delivered, server_id, peer: 7 }] if *server_id == id),
        "{out:?}"
    );
    // A repeat from A changes nothing; B's answer lets it go, no receipt.
    h.frame(A, Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 1);
    h.frame(B, Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 0);
    assert!(h.commit(&[]).to(C).is_empty());
    assert_eq!(h.s.window_of(7, A), Some((0, 0)));
    assert_eq!(h.s.window_of(7, B), Some((0, 0)));

    // B leaves owing a message A answered: it stays for B, registered.
    h.send(2, 2, 7, b"two");
    let out = h.commit(&[]);
    let two = deliver_ids(&out.to(A))[0];
    h.frame(A, Frame::Delivered { server_id: two });
    assert_eq!(h.s.store().len(7), 1);
    h.step(Event::Closed(B));
    assert_eq!(h.s.store().len(7), 1);
    assert_eq!((h.s.users_online(), h.s.sessions_online()), (2, 2));
    assert_eq!(h.s.registered_devices(7), [1, 2]);
    // Back on another connection, B gets it, and its answer lets it go.
    let out = login_device(&mut h, 3, 7, 2);
    assert_eq!(deliver_ids(&out.to(ConnId(3))), [two]);
    h.frame(ConnId(3), Frame::Delivered { server_id: two });
    assert_eq!(h.s.store().len(7), 0);

    // A device registering while A has one in flight owes it too.
    h.send(2, 3, 7, b"three");
    let out = h.commit(&[]);
    let id = deliver_ids(&out.to(A))[0];
    assert_eq!(deliver_ids(&out.to(ConnId(3))), [id]);
    let out = login_device(&mut h, 4, 7, 5);
    assert_eq!(deliver_ids(&out.to(ConnId(4))), [id]);
    h.frame(A, Frame::Delivered { server_id: id });
    h.frame(ConnId(3), Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 1);
    h.frame(ConnId(4), Frame::Delivered { server_id: id });
    assert_eq!(h.s.store().len(7), 0);
}

#[test]
fn a_device_over_the_limit_gets_too_many_devices() {
    let mut h = Harness::new(
        Config {
            devices_per_user_max: 2,
            ..Config::default()
        },
        0,
        1,
    );
    login_device(&mut h, 0, 7, 1);
    login_device(&mut h, 1, 7, 2);
    let out = login_device(&mut h, 2, 7, 3);
    assert!(
        matches!(
            out.to(ConnId(2))[..],
            [OwnedFrame::LoginErr {
                code: ErrorCode::TooManyDevices,
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(out.closes_after_flush(ConnId(2)));
    assert_eq!(h.s.sessions_online(), 2);
    // The same device again replaces its session.
    let out = login_device(&mut h, 3, 7, 2);
    assert!(
        matches!(
            out.to(B)[..],
            [OwnedFrame::Bye {
                reason: ByeReason::Replaced
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.s.conns_of(7), [A, ConnId(3)]);
}

#[test]
fn group_receipts_for_an_offline_sender_wait_and_come_merged_at_login() {
    let mut h = Harness::one();
    let receipt = |kind, peers: &[u64]| {
        Event::Msg(Msg::GroupReceipt {
            user: 1,
            kind,
            group: 5,
            msg: 3,
            peers: peers.to_vec(),
            src: 0,
            seqs: Vec::new(),
        })
    };
    h.step(receipt(ReceiptKind::Delivered, &[7, 8]));
    h.step(Event::Msg(Msg::Receipt {
        user: 1,
        kind: ReceiptKind::Delivered,
        server_id: 1024,
        peer: 9,
        src: 0,
        seq: 0,
    }));
    h.step(receipt(ReceiptKind::Read, &[7]));
    // Sent again by an outbox: member 8 is kept already.
    h.step(receipt(ReceiptKind::Delivered, &[9, 8]));
    assert_eq!(h.s.receipts_kept(1), 5);
    let mut records = Vec::new();
    h.s.take_device_records(&mut records);
    assert_eq!(
        records
            .iter()
            .filter(|r| matches!(r, Record::GroupKept { .. }))
            .count(),
        3,
        "{records:?}"
    );
    h.step(Event::Opened(A));
    let token = h.token(1);
    let out = h.frame(
        A,
        Frame::Login {
            version: proto::VERSION_2,
            token: token.as_bytes(),
        },
    );
    let group = |kind, members: &[u64]| {
        let mut list = Vec::new();
        for &m in members {
            proto::put_varint(m, &mut list);
        }
        OwnedFrame::Group(proto::GroupFrame::Receipt {
            kind,
            group: 5,
            msg: 3,
            members: list,
        })
    };
    let want = [
        &OwnedFrame::Receipt {
            kind: ReceiptKind::Delivered,
            server_id: 1024,
            peer: 9,
        },
        &group(ReceiptKind::Delivered, &[7, 8, 9]),
        &group(ReceiptKind::Read, &[7]),
    ];
    let got = out.to(A);
    assert!(matches!(got[0], OwnedFrame::LoginOk { .. }), "{got:?}");
    assert_eq!(
        got[1..],
        want,
        "1:1 first, then merged per message and kind"
    );
    assert_eq!(h.s.receipts_kept(1), 0);
    h.s.take_device_records(&mut records);
    assert!(records.contains(&Record::ReceiptsGot { user: 1, lane: 0 }));
}

#[test]
fn a_restarted_shard_gets_the_outbox_for_its_users_again() {
    let config = Config {
        delivered_recent_max: 0,
        ..Config::default()
    };
    let mut h = Harness::new(config, 0, 2);
    let me = (1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    let there = (1..).find(|&u| home_shard(u, 2) == 1).unwrap();
    let here = (me + 1..).find(|&u| home_shard(u, 2) == 0).unwrap();
    h.login(0, me);
    for from in [there, here] {
        h.frame(A, Frame::Read { server_id: 1, from });
    }
    let out = h.commit(&[]);
    // The receipt for a user homed here is taken here at once.
    assert!(
        matches!(out.routes()[..], [(1, Msg::Receipt { seq: 1, .. })]),
        "{out:?}"
    );
    assert_eq!(h.s.outbox_len(), 1);
    // Shard 1 crashed and came back: its receipt goes again, nothing else.
    h.step(Event::Msg(Msg::ReceiptsResend { shard: 1 }));
    let out = h.commit(&[]);
    assert!(
        matches!(out.routes()[..], [(1, Msg::Receipt { seq: 1, user, .. })] if *user == there),
        "{out:?}"
    );
}
