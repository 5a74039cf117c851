//! Per-user state across nodes (docs/CLUSTER.md, "Per-user state across
//! nodes"): registered devices, receipts waiting for an all-offline
//! sender, last seen and privacy are kept in JetStream and replayed by a
//! partition's new owner before it serves the partition.

use std::net::SocketAddr;

use tern::cluster::ClusterConfig;
use tern::proto::{Frame, OwnedFrame, PresenceState, ReceiptKind, VERSION_2};
use tern_client::{Client, ClientError};

use super::common::{device_token, expect_receipt, recv_ack, recv_deliver, TestServer};
use super::nats::{free_port, Nats};
use super::{login_v2, retry_unavailable, settle, settle_halves};

const PARTITIONS: u32 = 16;

/// A reachable node that writes last seen at once (`last_seen_write_s`
/// 0), so the test need not wait a period for it.
fn node(nats: &Nats, id: &str) -> TestServer {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let cluster = ClusterConfig {
        node_id: id.into(),
        nats_urls: nats.urls(),
        public_addr: addr.to_string(),
        partitions: PARTITIONS,
        lease_s: 3,
        stream_replicas: 3,
    };
    TestServer::start_with(|c| {
        c.listen = addr;
        c.last_seen_write_s = 0;
        c.cluster = Some(cluster);
    })
}

/// `device` of `user` logged in through `addr`, redirects followed.
fn login_device(addr: SocketAddr, user: u64, device: u32) -> Client {
    retry_unavailable(|| Client::login_version(addr, &device_token(user, device), VERSION_2))
        .unwrap_or_else(|e| panic!("user {user} device {device} through {addr}: {e}"))
        .0
}

/// The first users (of 1..=64) node `a` serves and the first it redirects
/// elsewhere, `n` of each.
fn users_by_node(a: &TestServer, n: usize) -> (Vec<u64>, Vec<u64>) {
    let (mut here, mut there) = (Vec::new(), Vec::new());
    for user in 1..=64u64 {
        let login = || {
            let mut c = Client::connect(a.addr).expect("connect");
            c.login_here_version(&device_token(user, 0), VERSION_2)
        };
        match retry_unavailable(login) {
            Ok(_) => here.push(user),
            Err(ClientError::Redirected { .. }) => there.push(user),
            Err(e) => panic!("user {user} at a: {e}"),
        }
    }
    here.truncate(n);
    there.truncate(n);
    assert_eq!((here.len(), there.len()), (n, n), "users on each node");
    (here, there)
}

/// The next PRESENCE on `c` (other frames skipped).
fn presence(c: &mut Client) -> (u64, PresenceState, u64) {
    match c.recv_until(|f| matches!(f, OwnedFrame::Presence { .. })) {
        Ok(OwnedFrame::Presence {
            user,
            state,
            last_seen_ms,
        }) => (user, state, last_seen_ms),
        other => panic!("expected PRESENCE, got {other:?}"),
    }
}

/// Waits until every user state `node`'s shards handed to its bridge is
/// stored in JetStream (none failed, none in flight).
fn states_kept(node: &TestServer) {
    let mut last = (0, 0, 0);
    let kept = settle(|| {
        let handed = node.metric_sum("tern_states_handed_total");
        last = (
            handed,
            node.info_u64("Cluster_states_published"),
            node.info_u64("Cluster_state_publish_failures"),
        );
        last.0 > 0 && last.0 == last.1 && node.info_u64("Cluster_states_in_flight") == 0
    });
    assert!(
        kept,
        "(handed, published, failed) states stayed at {last:?}"
    );
}

/// A user of node b with two registered devices, one offline, a receipt
/// waiting for it (all its devices offline), hidden presence, and another
/// user's last seen: b stops, a takes its partitions over, and all of it
/// is there on a.
#[test]
fn devices_receipts_last_seen_and_privacy_move_with_the_partition() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats, "a");
    let b = node(&nats, "b");
    settle_halves(&a, &b, u64::from(PARTITIONS));
    let (on_a, on_b) = users_by_node(&a, 2);
    let (x, watcher) = (on_a[0], on_a[1]);
    let (y, w) = (on_b[0], on_b[1]);
    let mut cx = login_v2(a.addr, x);

    // y's device 1 sends to x, then goes offline; x holds its DELIVERED.
    let mut y1 = login_device(a.addr, y, 1);
    assert_eq!(y1.peer_addr().expect("peer"), b.addr, "y is served by b");
    y1.send_msg(1, x, b"from y").expect("send");
    let s1 = recv_ack(&mut y1, 1);
    assert_eq!(recv_deliver(&mut cx).server_id, s1);
    drop(y1);

    // y's device 2 hides y, takes a message device 1 still owes, leaves.
    let mut y2 = login_device(a.addr, y, 2);
    y2.send_frame(&Frame::Privacy { hidden: true })
        .expect("privacy");
    cx.send_msg(1, y, b"to y").expect("send");
    let m2 = recv_ack(&mut cx, 1);
    assert_eq!(recv_deliver(&mut y2).server_id, m2);
    y2.send_delivered(m2).expect("delivered");
    expect_receipt(&mut cx, ReceiptKind::Delivered, m2, y);
    drop(y2);

    // w is seen, then leaves: its last seen, as a subscriber on a sees it.
    drop(login_device(a.addr, w, 0));
    let mut cw = login_v2(a.addr, watcher);
    cw.send_frame(&Frame::Subscribe { user: w })
        .expect("subscribe");
    let (_, state, seen) = presence(&mut cw);
    assert_eq!(state, PresenceState::Offline);
    assert!(seen > 0, "w's last seen");
    drop(cw);

    // x's DELIVERED: the receipt waits on b for y, all of whose devices
    // are offline.
    cx.send_delivered(s1).expect("delivered");
    b.wait_metric("tern_receipts_waiting", |n| n == 1);
    states_kept(&b);

    // b stops; a takes its partitions over and replays their states.
    drop(b);
    let all = settle(|| a.info_u64("Cluster_partitions_owned") == u64::from(PARTITIONS));
    assert!(all, "a never took b's partitions over");

    // Last seen survived, and y stays hidden, to a new subscriber on a.
    let mut cw = login_v2(a.addr, watcher);
    cw.send_frame(&Frame::Subscribe { user: w })
        .expect("subscribe");
    assert_eq!(presence(&mut cw), (w, PresenceState::Offline, seen));
    cw.send_frame(&Frame::Subscribe { user: y })
        .expect("subscribe");
    assert_eq!(presence(&mut cw), (y, PresenceState::Hidden, 0));

    // Device 1, offline through the move, still gets what device 2 took,
    // and the receipt that waited for y.
    let mut y1 = login_device(a.addr, y, 1);
    assert_eq!(
        y1.peer_addr().expect("peer"),
        a.addr,
        "y is served by a now"
    );
    let (mut receipt, mut deliver) = (None, None);
    while receipt.is_none() || deliver.is_none() {
        match y1.recv() {
            Ok(OwnedFrame::Receipt {
                kind,
                server_id,
                peer,
            }) => receipt = Some((kind, server_id, peer)),
            Ok(OwnedFrame::Deliver {
                server_id, from, ..
            }) => deliver = Some((server_id, from)),
            Ok(_) => {}
            Err(e) => panic!("y's device 1 after the move: {e}"),
        }
    }
    assert_eq!(receipt, Some((ReceiptKind::Delivered, s1, x)));
    assert_eq!(deliver, Some((m2, x)));
    assert!(
        a.info_u64("Cluster_states_replayed") >= 2,
        "y's and w's states"
    );
}
