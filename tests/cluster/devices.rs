//! Per-user state across nodes (docs/CLUSTER.md, "Per-user state across
//! nodes"): registered devices, receipts waiting for an all-offline
//! sender, last seen and privacy are kept in JetStream and replayed by a
//! partition's new owner before it serves the partition.

use std::collections::HashSet;
use std::net::SocketAddr;

use async_nats::jetstream::{consumer, stream};
use tern::cluster::streams::{self, stream_of};
use tern::cluster::{partition_of, state, ClusterConfig};
use tern::config::Config;
use tern::proto::{Frame, GroupFrame, OwnedFrame, PresenceState, ReceiptKind, VERSION_2};
use tern_client::{Client, ClientError};

use super::common::gateway::Gateway;
use super::common::{device_token, expect_receipt, recv_ack, recv_deliver, TestServer};
use super::groups::{acked, ok, send, Member};
use super::nats::{free_port, Nats};
use super::scale::with_jetstream;
use super::{login_v2, retry_unavailable, settle, settle_halves};

const PARTITIONS: u32 = 16;

/// A reachable node that writes last seen at once (`last_seen_write_s`
/// 0), so the test need not wait a period for it.
fn node(nats: &Nats, id: &str) -> TestServer {
    node_with(nats, id, |_| {})
}

/// [`node`], changed by `tweak`.
fn node_with(nats: &Nats, id: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
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
        tweak(c);
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

/// Makes every state publish to state stream `TERNS_<g>` fail, as a
/// stream gone or out of reach would: its subjects are moved off
/// `terns.<g>.>` (JetStream then answers such a publish with "no
/// responders"), its records kept. Returns the configuration to put back
/// with [`restore_state_stream`].
fn break_state_stream(nats: &Nats, g: u32) -> stream::Config {
    with_jetstream(&nats.url(), async |js| {
        let name = state::stream_name(g);
        let mut found = js.get_stream(&name).await.expect("state stream");
        let kept = found.info().await.expect("stream info").config.clone();
        let broken = stream::Config {
            subjects: vec![format!("fault.{name}")],
            ..kept.clone()
        };
        js.update_stream(&broken).await.expect("subjects moved");
        kept
    })
}

/// Puts back a state stream's configuration kept by
/// [`break_state_stream`].
fn restore_state_stream(nats: &Nats, kept: &stream::Config) {
    with_jetstream(&nats.url(), async |js| {
        js.update_stream(kept).await.expect("subjects restored");
    });
}

/// Whether b's consumer of partition `p` (16 partitions split 8/8: one
/// consumer per partition, `p<p>`) has delivered every record of it that
/// JetStream holds.
fn all_delivered(nats: &Nats, p: u32) -> bool {
    with_jetstream(&nats.url(), async |js| {
        let Ok(stream) = js.get_stream(streams::stream_name(stream_of(p))).await else {
            return false;
        };
        let consumer = stream
            .get_consumer::<consumer::pull::Config>(&format!("p{p}"))
            .await;
        // Missing while the relay recreates it.
        consumer.is_ok_and(|c| c.cached_info().num_pending == 0)
    })
}

/// What reached the sender y at the end: its RECEIPTs, sorted, and its
/// group receipts.
type Got = (Vec<(ReceiptKind, u64, u64)>, Vec<(ReceiptKind, u64, u64)>);

/// Frames on `c` until `n` RECEIPTs and `want_group` group receipts came
/// (copies and events answered DELIVERED); what came if a read fails (a
/// timeout), with the error.
fn receipts(
    c: &mut Client,
    n: usize,
    want_group: &HashSet<(ReceiptKind, u64, u64)>,
) -> Result<Got, (Got, ClientError)> {
    let mut member = Member::default();
    let mut got = Vec::new();
    let sorted = |got: &[(ReceiptKind, u64, u64)], member: &Member| {
        let mut got = got.to_vec();
        got.sort_by_key(|&(kind, id, peer)| (kind as u8, id, peer));
        let mut group: Vec<_> = member.receipts.iter().copied().collect();
        group.sort_by_key(|&(kind, id, peer)| (kind as u8, id, peer));
        (got, group)
    };
    while got.len() < n || !want_group.is_subset(&member.receipts) {
        match c.recv() {
            Ok(OwnedFrame::Receipt {
                kind,
                server_id,
                peer,
            }) => got.push((kind, server_id, peer)),
            Ok(f) => {
                member.take(c, &f);
            }
            Err(e) => return Err((sorted(&got, &member), e)),
        }
    }
    Ok(sorted(&got, &member))
}

/// Receipts consumed from JetStream whose state publish failed are not
/// lost with their node (README, issue 11; docs/CLUSTER.md, "Receipts are
/// acked only once kept"): y, served by b, sends to x on a, and to a group
/// of the two, and goes offline; x's DELIVERED and READ of both travel to
/// b as records, b keeps them for y, but publishing y's state fails (the
/// state stream takes no publish). b stops so, the state stream comes
/// back, a takes the partitions over: y, logging in at a, gets every
/// receipt.
#[test]
fn a_receipt_whose_state_publish_failed_survives_the_node() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats, "a");
    let b = node(&nats, "b");
    settle_halves(&a, &b, u64::from(PARTITIONS));
    let (on_a, on_b) = users_by_node(&a, 1);
    let (x, y) = (on_a[0], on_b[0]);
    let p = partition_of(y, PARTITIONS);

    // y's device 1 makes a group with x, sends to x and to the group, and
    // goes offline; x is offline. y's state (the device, its last seen) is
    // kept before the fault.
    let mut y1 = login_device(a.addr, y, 1);
    assert_eq!(y1.peer_addr().expect("peer"), b.addr, "y is served by b");
    let mut my = Member::default();
    send(&mut y1, GroupFrame::Create { req: 1 });
    let group = ok(&mut y1, &mut my, 1);
    send(
        &mut y1,
        GroupFrame::Add {
            req: 2,
            group,
            user: x,
        },
    );
    assert_eq!(ok(&mut y1, &mut my, 2), group);
    y1.send_msg(1, x, b"from y").expect("send");
    let id = acked(&mut y1, &mut my, 1);
    send(
        &mut y1,
        GroupFrame::Send {
            client_id: 2,
            group,
            body: b"to the group",
        },
    );
    let n = acked(&mut y1, &mut my, 2);
    states_kept(&b);
    let handed = b.metric_sum("tern_states_handed_total");
    drop(y1);
    b.wait_info("Users_online", |n| n == 0);
    // The logout writes y's last seen.
    b.wait_metric("tern_states_handed_total", |n| n > handed);
    states_kept(&b);
    a.wait_info("Cluster_publishes_in_flight", |n| n == 0);
    let published = super::publish_count(&a);

    let kept = break_state_stream(&nats, stream_of(p));
    let failures = b.info_u64("Cluster_state_publish_failures");

    // x reads both: four receipt records (DELIVERED and READ, one to one
    // and group) reach b, which keeps them for y and fails to publish
    // y's state.
    let mut cx = login_device(a.addr, x, 0);
    assert_eq!(cx.peer_addr().expect("peer"), a.addr, "x is served by a");
    let mut mx = Member::default();
    let mut delivered = false;
    while !delivered || mx.messages().is_empty() {
        match cx.recv().expect("x's copies") {
            OwnedFrame::Deliver { server_id, .. } => {
                assert_eq!(server_id, id);
                delivered = true;
            }
            // The group copy answered DELIVERED.
            f => assert!(mx.take(&mut cx, &f), "x got {f:?}"),
        }
    }
    assert_eq!(mx.messages(), [(n, y, b"to the group".to_vec())]);
    cx.send_delivered(id).expect("delivered");
    cx.send_read(id, y).expect("read");
    send(
        &mut cx,
        GroupFrame::Read {
            group,
            msg: n,
            from: y,
        },
    );
    let mut last = (0, 0, 0, 0, false);
    let failed = settle(|| {
        last = (
            super::publish_count(&a) - published,
            b.metric_sum("tern_receipts_waiting"),
            b.info_u64("Cluster_state_publish_failures"),
            b.info_u64("Cluster_states_in_flight"),
            all_delivered(&nats, p),
        );
        last.0 == 4 && last.1 == 4 && last.2 > failures && last.3 == 0 && last.4
    });
    assert!(
        failed,
        "(receipts published by a, receipts waiting on b (a group receipt counts per member), state publish failures on b, states \
         in flight on b, all delivered to b) stayed at {last:?}, {failures} failures before the \
         fault"
    );
    let records = nats.message_records();

    // b stops with the receipts kept only in its memory; the state stream
    // comes back before a takes b's partitions over (a lease later).
    drop(b);
    restore_state_stream(&nats, &kept);
    let all = settle(|| {
        a.info_u64("Cluster_partitions_owned") == u64::from(PARTITIONS)
            && a.info_u64("Cluster_partitions_unowned") == 0
    });
    assert!(all, "a never took b's partitions over");

    let mut y1 = login_device(a.addr, y, 1);
    assert_eq!(
        y1.peer_addr().expect("peer"),
        a.addr,
        "y is served by a now"
    );
    let want = [(ReceiptKind::Delivered, id, x), (ReceiptKind::Read, id, x)];
    let want_group = [(ReceiptKind::Delivered, n, x), (ReceiptKind::Read, n, x)];
    let got = receipts(&mut y1, 2, &want_group.into()).unwrap_or_else(|(got, e)| {
        panic!(
            "y got only (receipts, group receipts) {got:?} after b stopped ({e}), not \
             {want:?}, {want_group:?}: the rest was kept only in b's memory (records left in \
             the message streams when b failed to keep them: {records:?})"
        )
    });
    assert_eq!(got, (want.to_vec(), want_group.to_vec()));
}

/// Push for offline devices works across nodes: a message sent through
/// node a for a user served by node b, whose registered device is offline,
/// is queued on b, and b posts the notice (user, device, waiting count,
/// never the body) to its push gateway; a has nothing to post. The device
/// then logs in and gets the message.
#[test]
fn a_message_from_another_node_wakes_the_offline_device_through_push() {
    let Some(nats) = Nats::start() else { return };
    let gateway = Gateway::start();
    let pushing = |c: &mut Config| {
        c.push_url = Some(gateway.url());
        c.push_secret = Some("push-secret-0123456789".into());
        c.push_retry_backoff_ms = 10;
    };
    let a = node_with(&nats, "a", pushing);
    let b = node_with(&nats, "b", pushing);
    settle_halves(&a, &b, u64::from(PARTITIONS));
    let (on_a, on_b) = users_by_node(&a, 1);
    let (x, y) = (on_a[0], on_b[0]);
    // y registers devices 0 and 3 (at b, through a's REDIRECT) and both
    // go offline.
    drop(login_device(a.addr, y, 0));
    drop(login_device(a.addr, y, 3));
    b.wait_info("Users_online", |n| n == 0);
    let mut cx = login_v2(a.addr, x);
    cx.send_msg(1, y, b"a secret body").expect("send");
    let id = recv_ack(&mut cx, 1);

    let mut devices = HashSet::new();
    while devices.len() < 2 {
        let r = gateway.next();
        let body = String::from_utf8(r.body.clone()).expect("UTF-8 JSON");
        assert!(!body.contains("secret"), "the body leaked: {body}");
        for (user, device, waiting, _) in r.notices() {
            assert_eq!((user, waiting), (y, 1), "{body}");
            devices.insert(device);
        }
    }
    assert_eq!(devices, HashSet::from([0, 3]));
    assert_eq!(a.info_u64("Push_posts"), 0, "a queued nothing for y");

    let mut y3 = login_device(a.addr, y, 3);
    assert_eq!(y3.peer_addr().expect("peer"), b.addr, "y is served by b");
    let m = recv_deliver(&mut y3);
    assert_eq!((m.server_id, &m.body[..]), (id, &b"a secret body"[..]));
}
