//! Whole streams per node (issue 15): with at least as many message streams
//! `TERN_<g>` as nodes, each node claims and keeps whole streams of 64
//! partitions and reads each with one JetStream consumer, not one per
//! partition (each consumer is a Raft group on a NATS cluster). On three
//! nats-servers keeping 3 copies: two then three nodes with every tick, and
//! `kill -9` of a node under chat load, after which the survivors hold its
//! stream whole again and everything ACKed was delivered.

use super::chat::Chat;
use super::common::TestServer;
use super::faults::{Node, PER_USER, USERS};
use super::nats::Nats;
use super::replicated::chat_across;
use super::{replicated_node, settle, settle_whole_streams};

/// Three streams of 64: one per node once three nodes run.
const PARTITIONS: u32 = 192;

fn state(nodes: &[&TestServer]) -> Vec<(u64, u64, u64)> {
    nodes
        .iter()
        .map(|n| {
            (
                n.info_u64("Cluster_partitions_owned"),
                n.info_u64("Cluster_partitions_unowned"),
                n.info_u64("Cluster_consumers"),
            )
        })
        .collect()
}

#[test]
fn nodes_hold_whole_streams_with_one_consumer_each() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start_cluster() else {
        return;
    };
    let a = replicated_node(&nats, "a", PARTITIONS, 3);
    let b = replicated_node(&nats, "b", PARTITIONS, 3);
    // Three streams on two nodes: two and one.
    let held = settle_whole_streams(PARTITIONS.into(), || state(&[&a, &b]));
    let mut owned: Vec<u64> = held.iter().map(|s| s.0).collect();
    owned.sort_unstable();
    assert_eq!(owned, [64, 128]);
    assert_eq!(
        a.metric_sum("tern_cluster_consumers") + b.metric_sum("tern_cluster_consumers"),
        3
    );
    chat_across(&[&a, &b], 1..200);

    let c = replicated_node(&nats, "c", PARTITIONS, 3);
    let held = settle_whole_streams(PARTITIONS.into(), || state(&[&a, &b, &c]));
    assert_eq!(held, [(64, 0, 1); 3]);
    chat_across(&[&a, &b, &c], 1000..1200);
    // Handing a stream over is a release, not a loss.
    for n in [&a, &b, &c] {
        assert_eq!(n.info_u64("Cluster_leases_lost"), 0);
    }

    // Every record was acked by the stream consumers, on every server.
    let mut records = Vec::new();
    let emptied = settle(|| {
        records = nats.message_records();
        records.iter().all(|r| *r == Some(0))
    });
    assert!(emptied, "records left per NATS server: {records:?}");
}

/// `kill -9` of one of three nodes, each holding one stream, under chat
/// load: the two survivors both want the dead node's stream; whichever
/// part each claims, they end with whole streams (two and one), one
/// consumer each, and every ACKed message delivered in per-sender order.
#[test]
fn a_killed_node_s_stream_is_taken_over_whole() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start_cluster() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let partitions = u64::from(PARTITIONS);
    let a = Node::start_with(&nats, dir.path(), "a", 3, partitions);
    let b = Node::start_with(&nats, dir.path(), "b", 3, partitions);
    let c = Node::start_with(&nats, dir.path(), "c", 3, partitions);
    let node_state = |nodes: &[&Node]| -> Vec<(u64, u64, u64)> {
        nodes
            .iter()
            .map(|n| {
                (
                    n.info("Cluster_partitions_owned"),
                    n.info("Cluster_partitions_unowned"),
                    n.info("Cluster_consumers"),
                )
            })
            .collect()
    };
    let held = settle_whole_streams(partitions, || node_state(&[&a, &b, &c]));
    assert_eq!(held, [(64, 0, 1); 3]);
    let entries = [a.child.addr, b.child.addr, c.child.addr];
    let chat = Chat::start(&entries, 1, USERS, PER_USER);
    chat.wait_acked(USERS as u64 * PER_USER / 3);
    a.child.kill9();
    let outcome = chat.finish();
    let (acked, duplicates, unavailable, relogins) = outcome.check();
    eprintln!(
        "{acked} ACKed and delivered, {duplicates} duplicates, {unavailable} SENDs retried \
         after unavailable, {relogins} logins again"
    );
    assert_eq!(acked, USERS * PER_USER as usize);
    let held = settle_whole_streams(partitions, || node_state(&[&b, &c]));
    let mut owned: Vec<u64> = held.iter().map(|s| s.0).collect();
    owned.sort_unstable();
    assert_eq!(owned, [64, 128]);
}
