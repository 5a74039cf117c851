//! Faults under chat load on a cluster of three nats-servers keeping 3
//! copies (issue 15): `kill -9` of a Tern node, whose partitions the others
//! take over, and `kill -9` of a nats-server. In both, every ACKed message
//! is delivered, per-sender order holds, and duplicates carry the same
//! server id.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::chat::Chat;
use super::common::child::{serve_command, TernChild};
use super::nats::{free_port, Nats};
use super::{child_info, settle};

/// Partitions in these tests: a multiple of 2 and 3.
const PARTITIONS: u64 = 12;

/// Users of the chat load, and messages each sends.
pub(super) const USERS: usize = 9;
pub(super) const PER_USER: u64 = 40;

/// A Tern node as a process of its own (so it can be killed), on every
/// server of `nats`, lease `lease_s`, 3 copies.
pub(super) struct Node {
    /// The process.
    pub(super) child: TernChild,
    /// Its stats socket.
    stats: PathBuf,
}

impl Node {
    fn start(nats: &Nats, dir: &Path, id: &str, lease_s: u32) -> Node {
        Node::start_with(nats, dir, id, lease_s, PARTITIONS)
    }

    /// A node of a cluster of `partitions`.
    pub(super) fn start_with(
        nats: &Nats,
        dir: &Path,
        id: &str,
        lease_s: u32,
        partitions: u64,
    ) -> Node {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let stats = dir.join(format!("{id}.sock"));
        let config = dir.join(format!("{id}.toml"));
        let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
        std::fs::write(
            &config,
            format!(
                "stats_socket = {stats:?}\ndata_dir = {data:?}\n\n[cluster]\nnode_id = {id:?}\n\
                 nats_urls = [{urls}]\npublic_addr = \"{addr}\"\npartitions = {partitions}\n\
                 lease_s = {lease_s}\nstream_replicas = 3\n",
                data = dir.join(format!("{id}-data")),
                urls = urls.join(", "),
            ),
        )
        .expect("write config");
        let child = TernChild::expect_start(serve_command(&[
            "--listen",
            &addr.to_string(),
            "--shards",
            "2",
            "--config",
            config.to_str().expect("utf-8 path"),
        ]));
        Node { child, stats }
    }

    /// One `show info` value.
    pub(super) fn info(&self, key: &str) -> u64 {
        child_info(&self.stats, key)
    }
}

/// Waits until `nodes` share the partitions evenly with consumers running
/// and every owner known.
fn settle_even(nodes: &[&Node]) {
    let share = PARTITIONS / nodes.len() as u64;
    let mut last = Vec::new();
    let even = settle(|| {
        last = nodes
            .iter()
            .map(|n| {
                (
                    n.info("Cluster_partitions_owned"),
                    n.info("Cluster_partitions_unowned"),
                    n.info("Cluster_consumers"),
                )
            })
            .collect();
        last.iter().all(|&s| s == (share, 0, share))
    });
    assert!(even, "(owned, unowned, consumers) per node stayed {last:?}");
}

/// `kill -9` of one of three Tern nodes while users chat through all
/// three: its partitions are taken over once its leases expire, its users
/// come back through the others (REDIRECT followed), and every ACKed
/// message is delivered in per-sender order.
#[test]
fn a_node_killed_under_load_loses_nothing_acked() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start_cluster() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Node::start(&nats, dir.path(), "a", 3);
    let b = Node::start(&nats, dir.path(), "b", 3);
    let c = Node::start(&nats, dir.path(), "c", 3);
    settle_even(&[&a, &b, &c]);
    let entries = [a.child.addr, b.child.addr, c.child.addr];
    let chat = Chat::start(&entries, 1, USERS, PER_USER);
    chat.wait_acked(USERS as u64 * PER_USER / 3);
    let on_a = a.info("Users_online");
    a.child.kill9();
    let outcome = chat.finish();
    let (acked, duplicates, unavailable, relogins) = outcome.check();
    eprintln!(
        "{on_a} users on the killed node; {acked} ACKed and delivered, {duplicates} duplicates, \
         {unavailable} SENDs retried after unavailable, {relogins} logins again"
    );
    assert_eq!(acked, USERS * PER_USER as usize);
    assert!(on_a > 0, "nobody was on the killed node");
    assert!(relogins >= on_a, "{on_a} users were on the killed node");
    settle_even(&[&b, &c]);
}

/// `kill -9` of one of the three nats-servers while users chat: publishes
/// may fail during the NATS leader election (the SEND is answered
/// `unavailable` and sent again with its client_id), service goes on, and
/// every ACKed message is delivered in per-sender order.
#[test]
fn a_nats_server_killed_under_load_loses_nothing_acked() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(mut nats) = Nats::start_cluster() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Node::start(&nats, dir.path(), "a", 5);
    let b = Node::start(&nats, dir.path(), "b", 5);
    settle_even(&[&a, &b]);
    assert_eq!(a.info("Cluster_stream_replicas"), 3);
    let chat = Chat::start(&[a.child.addr, b.child.addr], 101, USERS, PER_USER);
    chat.wait_acked(USERS as u64 * PER_USER / 3);
    nats.kill9(0);
    let outcome = chat.finish();
    let (acked, duplicates, unavailable, relogins) = outcome.check();
    eprintln!(
        "{acked} ACKed and delivered, {duplicates} duplicates, {unavailable} SENDs retried \
         after unavailable, {relogins} logins again"
    );
    assert_eq!(acked, USERS * PER_USER as usize);
    nats.wait_meta_leader();
}
