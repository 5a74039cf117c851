//! Push notices from the session layer (`session/push.rs`), on the harness
//! of `session/tests.rs`: one notice per commit per offline recipient,
//! with the queue's counts, and none for a recipient online.

use std::sync::mpsc::Receiver;

use super::*;
use crate::push::{Notice, Notices, PushStats};

/// A harness whose notices land in the returned queue of `len_max`.
fn with_push(len_max: usize) -> (Harness, Receiver<Notice>, Arc<PushStats>) {
    let mut h = Harness::one();
    let stats = Arc::new(PushStats::default());
    let (notices, rx) = Notices::channel(len_max, stats.clone());
    h.s.set_push(Some(notices));
    (h, rx, stats)
}

#[test]
fn a_message_for_an_offline_user_makes_one_notice_per_commit() {
    let (mut h, rx, _) = with_push(8);
    h.login(1, 10);
    h.send(1, 1, 20, b"a");
    // Nothing before the commit: the message is not durable yet.
    assert!(rx.try_recv().is_err());
    h.commit(&[]);
    let first = rx.try_recv().expect("a notice");
    assert_eq!(
        first,
        Notice {
            user: 20,
            device: 0,
            waiting: 1,
            oldest_ms: T0_MS,
        }
    );
    // Two more in one commit: one notice, counting all three.
    h.now.unix_ms += 5;
    h.send(1, 2, 20, b"b");
    h.send(1, 3, 20, b"c");
    h.commit(&[]);
    let second = rx.try_recv().expect("a notice");
    assert_eq!((second.waiting, second.oldest_ms), (3, T0_MS));
    assert!(rx.try_recv().is_err(), "one notice per commit");
}

#[test]
fn no_notice_for_an_online_recipient_or_without_a_gateway() {
    let (mut h, rx, _) = with_push(8);
    h.login(1, 10);
    h.login(2, 20);
    h.send(1, 1, 20, b"a");
    let out = h.commit(&[]);
    assert_eq!(deliver_ids(&out.to(ConnId(2))).len(), 1);
    assert!(rx.try_recv().is_err());

    let mut plain = Harness::one();
    plain.login(1, 10);
    plain.send(1, 1, 20, b"a");
    plain.commit(&[]);
    assert_eq!(plain.s.store.len(20), 1, "queued all the same");
}

#[test]
fn a_full_push_queue_drops_notices_never_messages() {
    let (mut h, rx, stats) = with_push(1);
    h.login(1, 10);
    for (i, to) in [20, 21, 22].into_iter().enumerate() {
        h.send(1, i as u64 + 1, to, b"x");
    }
    let out = h.commit(&[]);
    let acks = out
        .to(ConnId(1))
        .iter()
        .filter(|f| matches!(f, OwnedFrame::Ack { .. }))
        .count();
    assert_eq!(acks, 3, "every message taken: {out:?}");
    assert_eq!(rx.try_iter().map(|n| n.user).collect::<Vec<_>>(), [20]);
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((get(&stats.queued), get(&stats.queue_full)), (1, 2));
    for to in [20, 21, 22] {
        assert_eq!(h.s.store.len(to), 1);
    }
}
