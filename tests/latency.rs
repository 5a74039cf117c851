//! Server-side latency histograms over real sockets: after N messages the
//! counts match, the buckets are cumulative and monotone, and messages
//! delivered later from the store stay out of the online figure.

mod common;

use common::*;
use tern::proto::OwnedFrame;

/// One histogram family read from `show metrics`.
#[derive(Debug)]
struct Family {
    /// `(le, cumulative count)`, in order; the last `le` is `+Inf`.
    buckets: Vec<(String, u64)>,
    sum: f64,
    count: u64,
}

fn family(metrics: &str, name: &str) -> Family {
    let mut f = Family {
        buckets: Vec::new(),
        sum: -1.0,
        count: u64::MAX,
    };
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        if let Some(labels) = series.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            let le = labels.strip_suffix("\"}").unwrap().to_string();
            f.buckets.push((le, value.parse().unwrap()));
        } else if series == format!("{name}_sum") {
            f.sum = value.parse().unwrap();
        } else if series == format!("{name}_count") {
            f.count = value.parse().unwrap();
        }
    }
    f
}

/// Checks the shape of a family and returns its count.
fn checked_count(metrics: &str, name: &str) -> u64 {
    let f = family(metrics, name);
    assert_eq!(f.buckets.len(), 26, "{name}: {f:?}");
    assert_eq!(f.buckets.last().unwrap().0, "+Inf", "{name}");
    assert!(
        f.buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name} buckets not monotone: {f:?}"
    );
    let bounds: Vec<f64> = f.buckets[..25]
        .iter()
        .map(|(le, _)| le.parse().unwrap())
        .collect();
    assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{name}: {bounds:?}");
    assert_eq!(bounds[0], 0.000001);
    assert_eq!(f.buckets.last().unwrap().1, f.count, "{name}");
    assert!(f.sum >= 0.0, "{name}");
    f.count
}

/// `show latency`'s count column for `name`.
fn latency_count(srv: &TestServer, name: &str) -> u64 {
    let text = srv.query("show latency");
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    row.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends `n` messages from `a` to online `b`, one at a time: SEND, ACK,
/// DELIVER, DELIVERED.
fn exchange(srv: &TestServer, a: u64, b: u64, n: u64) {
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);
    for i in 1..=n {
        alice.send_msg(i, b, &indexed_body(i, 16)).unwrap();
        recv_ack(&mut alice, i);
        let d = recv_deliver(&mut bob);
        bob.send_delivered(d.server_id).unwrap();
    }
}

fn counts_match(a: u64, b: u64) {
    const N: u64 = 40;
    let srv = TestServer::start();
    exchange(&srv, a, b, N);
    // Counted before the frames are written, so already there.
    let metrics = srv.query("show metrics");
    assert_eq!(checked_count(&metrics, "tern_send_to_ack_seconds"), N);
    assert_eq!(checked_count(&metrics, "tern_send_to_deliver_seconds"), N);
    assert_eq!(latency_count(&srv, "send_to_ack"), N);
    assert_eq!(latency_count(&srv, "send_to_deliver"), N);
}

#[test]
fn counts_match_messages_across_shards() {
    let (a, b) = cross_pair();
    counts_match(a, b);
}

#[test]
fn counts_match_messages_on_one_shard() {
    let (a, b) = same_pair();
    counts_match(a, b);
}

/// Messages for an offline recipient are ACKed (counted) but delivered
/// later from the store: not in the send-to-deliver histogram.
#[test]
fn messages_delivered_from_the_store_are_not_counted() {
    const N: u64 = 10;
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    for i in 1..=N {
        alice.send_msg(i, b, &indexed_body(i, 16)).unwrap();
        recv_ack(&mut alice, i);
    }
    let mut bob = srv.login(b);
    for _ in 0..N {
        let d = recv_deliver(&mut bob);
        bob.send_delivered(d.server_id).unwrap();
    }
    // The receipts come back, so the server handled everything bob sent.
    for _ in 0..N {
        let r = alice.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. }));
        assert!(r.is_ok(), "{r:?}");
    }
    let metrics = srv.query("show metrics");
    assert_eq!(checked_count(&metrics, "tern_send_to_ack_seconds"), N);
    assert_eq!(checked_count(&metrics, "tern_send_to_deliver_seconds"), 0);
    assert_eq!(latency_count(&srv, "send_to_deliver"), 0);
}
