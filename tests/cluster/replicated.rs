//! Tern nodes on a cluster of three nats-servers with 3 stream replicas
//! (issue 15): messages with every tick, REDIRECT on LOGIN and offline
//! delivery across two, then three nodes; the replica count of an existing
//! stream follows the configuration.

use tern::proto::ReceiptKind;

use super::common::{expect_receipt, indexed_body, recv_ack, recv_deliver, TestServer};
use super::nats::Nats;
use super::{login_v2, login_v2_here, replicated_node, retry_unavailable, settle};
use tern_client::ClientError;

/// Waits until the nodes share `partitions` evenly, each with its
/// consumers running and an owner known for every partition.
fn settle_even(nodes: &[&TestServer], partitions: u64) {
    let share = partitions / nodes.len() as u64;
    let mut last = Vec::new();
    let even = settle(|| {
        last = nodes
            .iter()
            .map(|n| {
                (
                    n.info_u64("Cluster_partitions_owned"),
                    n.info_u64("Cluster_partitions_unowned"),
                    n.info_u64("Cluster_consumers"),
                )
            })
            .collect();
        last.iter().all(|&s| s == (share, 0, share))
    });
    assert!(even, "(owned, unowned, consumers) per node stayed {last:?}");
}

/// One user served by each node, from `users`: where a LOGIN at the first
/// node is answered (LOGIN_OK there, or REDIRECT naming the owner).
fn user_per_node(nodes: &[&TestServer], users: std::ops::Range<u64>) -> Vec<u64> {
    let mut found = vec![None; nodes.len()];
    for user in users {
        let at = match retry_unavailable(|| login_v2_here(nodes[0].addr, user)) {
            Ok(_) => nodes[0].addr.to_string(),
            Err(ClientError::Redirected { addr }) => addr,
            Err(e) => panic!("user {user} at {}: {e}", nodes[0].addr),
        };
        let i = nodes
            .iter()
            .position(|n| n.addr.to_string() == at)
            .unwrap_or_else(|| panic!("user {user} sent to {at}, no node of this test"));
        found[i] = found[i].or(Some(user));
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found
        .into_iter()
        .map(|u| u.expect("every node serves someone"))
        .collect()
}

/// Between every two nodes: LOGIN through the first node lands at the
/// owner (REDIRECT followed); a message gets ACK, DELIVER with the ACK's
/// server id, delivery and read receipts; messages to a user gone offline
/// wait in JetStream and arrive in send order at its next login, made
/// through another node.
pub(super) fn chat_across(nodes: &[&TestServer], users: std::ops::Range<u64>) {
    let owners = user_per_node(nodes, users);
    let mut clients: Vec<_> = owners
        .iter()
        .zip(nodes)
        .map(|(&user, node)| {
            let client = login_v2(nodes[0].addr, user);
            assert_eq!(client.peer_addr().expect("peer"), node.addr, "user {user}");
            client
        })
        .collect();
    let mut client_id = 0;
    for i in 0..nodes.len() {
        for j in (0..nodes.len()).filter(|&j| j != i) {
            let (x, y) = (owners[i], owners[j]);
            client_id += 1;
            clients[i].send_msg(client_id, y, b"tick").expect("send");
            let id = recv_ack(&mut clients[i], client_id);
            let got = recv_deliver(&mut clients[j]);
            assert_eq!(
                (got.server_id, got.from, &got.body[..]),
                (id, x, &b"tick"[..])
            );
            clients[j].send_delivered(id).expect("delivered");
            expect_receipt(&mut clients[i], ReceiptKind::Delivered, id, y);
            clients[j].send_read(id, x).expect("read");
            expect_receipt(&mut clients[i], ReceiptKind::Read, id, y);
        }
    }
    // The last node's user goes offline; every other user writes to it.
    let last = nodes.len() - 1;
    let y = owners[last];
    drop(clients.pop());
    let mut sent = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        for k in 1..=3 {
            client_id += 1;
            let body = indexed_body(k, 0);
            client.send_msg(client_id, y, &body).expect("send");
            sent.push((recv_ack(client, client_id), owners[i], body));
        }
    }
    let mut cy = login_v2(nodes[0].addr, y);
    assert_eq!(cy.peer_addr().expect("peer"), nodes[last].addr);
    for (id, from, body) in &sent {
        let got = recv_deliver(&mut cy);
        assert_eq!((got.server_id, got.from, &got.body), (*id, *from, body));
        cy.send_delivered(*id).expect("delivered");
    }
    for (i, client) in clients.iter_mut().enumerate() {
        for (id, _, _) in sent.iter().filter(|s| s.1 == owners[i]) {
            expect_receipt(client, ReceiptKind::Delivered, *id, y);
        }
    }
}

/// Two nodes, then a third joining, on one cluster of three nats-servers
/// keeping 3 copies of everything.
#[test]
fn two_then_three_nodes_chat_across_three_nats_servers() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start_cluster() else {
        return;
    };
    let partitions = 12;
    let a = replicated_node(&nats, "a", partitions, 3);
    let b = replicated_node(&nats, "b", partitions, 3);
    settle_even(&[&a, &b], partitions.into());
    assert_eq!(a.info_u64("Cluster_stream_replicas"), 3);
    chat_across(&[&a, &b], 1..200);

    let c = replicated_node(&nats, "c", partitions, 3);
    settle_even(&[&a, &b, &c], partitions.into());
    chat_across(&[&a, &b, &c], 1000..1200);

    // Every message and receipt was delivered and acked: no server keeps a
    // record of them (each of the three copies drops it).
    let mut records = Vec::new();
    let emptied = settle(|| {
        records = nats.message_records();
        records.iter().all(|r| *r == Some(0))
    });
    assert!(emptied, "records left per NATS server: {records:?}");
}

/// A stream created with one copy gets the configured three when the next
/// node starts; the count a node configures is what it reports.
#[test]
fn an_existing_stream_is_brought_to_the_configured_replicas() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start_cluster() else {
        return;
    };
    let one = replicated_node(&nats, "one", 4, 1);
    one.wait_info("Cluster_partitions_owned", |n| n == 4);
    assert_eq!(one.info_u64("Cluster_stream_replicas"), 1);
    drop(one);
    let three = replicated_node(&nats, "three", 4, 3);
    three.wait_info("Cluster_stream_replicas", |n| n == 3);
}
