//! Clustering on NATS JetStream (docs/CLUSTER.md) against a real
//! `nats-server` with JetStream, started on a free loopback port in a
//! temporary directory. Skipped, with a message, only when `nats-server` is
//! not on PATH (CI installs it, .ci/run).

#[path = "cluster/chat.rs"]
mod chat;
mod common;
#[path = "cluster/devices.rs"]
mod devices;
#[path = "cluster/faults.rs"]
mod faults;
#[path = "cluster/groups.rs"]
mod groups;
#[path = "cluster/nats.rs"]
mod nats;
#[path = "cluster/presence.rs"]
mod presence;
#[path = "cluster/replicated.rs"]
mod replicated;
#[path = "cluster/scale.rs"]
mod scale;
#[path = "cluster/streams.rs"]
mod streams;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::child::{serve_command, TernChild};
use common::{expect_receipt, indexed_body, recv_ack, recv_deliver, token, TestServer};
use tern::cluster::ClusterConfig;
use tern::proto::{ByeReason, ErrorCode, OwnedFrame, ReceiptKind, VERSION, VERSION_2};
use tern_client::{Client, ClientError};

use nats::{free_port, Nats};

/// Why the README's second (poll) pass runs only a named subset of this
/// binary: leases, partitions, streams, replicas and NATS faults are the
/// cluster layer's, above the I/O backend (the nodes killed or paused are
/// child processes on the default backend anyway). The second pass keeps
/// the tests where cluster answers reach clients through the backend:
/// `standalone_shows_no_cluster_and_needs_no_nats`,
/// `a_login_at_the_wrong_node_is_redirected_to_the_owner`,
/// `users_of_a_partition_given_up_are_told_moved`,
/// `messages_cross_nodes_with_every_tick_and_wait_for_offline_users`,
/// `presence::a_user_of_another_node_is_watched_like_a_local_one` and
/// `groups::group_frames_on_a_cluster_are_unavailable_and_the_connection_stays`.
const ABOVE_THE_BACKEND: &str =
    "the cluster layer's leases, streams and NATS faults sit above the I/O backend";

/// Upper bound for lease rounds to settle: a release waits a whole lease
/// (3 s here) before the key expires and another node may claim it.
const SETTLE: Duration = Duration::from_secs(40);

fn node(nats: &Nats, id: &str, partitions: u32) -> TestServer {
    let cluster = ClusterConfig {
        node_id: id.into(),
        nats_urls: nats.urls(),
        public_addr: format!("{id}.test:5222"),
        partitions,
        lease_s: 3,
        stream_replicas: 3,
    };
    TestServer::start_with(|c| c.cluster = Some(cluster))
}

/// A node whose `public_addr` is its real client address, so a REDIRECT
/// naming it can be followed.
fn reachable_node(nats: &Nats, id: &str, partitions: u32) -> TestServer {
    replicated_node(nats, id, partitions, 3)
}

/// A reachable node on every server of `nats`, keeping `replicas` copies.
fn replicated_node(nats: &Nats, id: &str, partitions: u32, replicas: u32) -> TestServer {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let cluster = ClusterConfig {
        node_id: id.into(),
        nats_urls: nats.urls(),
        public_addr: addr.to_string(),
        partitions,
        lease_s: 3,
        stream_replicas: replicas,
    };
    TestServer::start_with(|c| {
        c.listen = addr;
        c.cluster = Some(cluster);
    })
}

/// A version 2 LOGIN of `user` at `addr`, redirects not followed.
fn login_v2_here(addr: SocketAddr, user: u64) -> Result<Client, ClientError> {
    let mut client = Client::connect(addr).expect("connect");
    client.login_here_version(&token(user), VERSION_2)?;
    Ok(client)
}

/// Tries `login` again while it answers `unavailable` (a partition between
/// owners), as a real client would: every 100 ms, up to [`SETTLE`]. A close
/// with no answer is not retried: every LOGIN is answered (issue 15).
fn retry_unavailable<T>(
    mut login: impl FnMut() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match login() {
            Err(ClientError::LoginRejected {
                code: ErrorCode::Unavailable,
                ..
            }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => return other,
        }
    }
}

/// A version 2 LOGIN of `user` through `addr`, redirects followed and
/// `unavailable` retried.
fn login_v2(addr: SocketAddr, user: u64) -> Client {
    retry_unavailable(|| Client::login_version(addr, &token(user), VERSION_2))
        .unwrap_or_else(|e| panic!("user {user} through {addr}: {e}"))
        .0
}

/// Polls `cond` every 100 ms until it holds or [`SETTLE`] passes.
fn settle(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn standalone_shows_no_cluster_and_needs_no_nats() {
    let server = TestServer::start();
    let info = server.info();
    assert!(
        !info.keys().any(|k| k.starts_with("Cluster_")),
        "standalone must show no cluster state: {info:?}"
    );
}

#[test]
fn two_nodes_split_the_partitions_evenly() {
    if common::pass::first_pass_only(ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let partitions = 64;
    let a = node(&nats, "a", partitions);
    a.wait_info("Cluster_partitions_owned", |n| n == u64::from(partitions));
    assert_eq!(a.info_u64("Cluster_nats_up"), 1);
    assert_eq!(a.metric_sum("tern_cluster_partitions_owned"), 64);
    // One nats-server without clustering keeps one copy of the default 3.
    assert_eq!(a.info_u64("Cluster_stream_replicas"), 1);

    let b = node(&nats, "b", partitions);
    let mut last = (0, 0);
    let even = settle(|| {
        last = (
            a.info_u64("Cluster_partitions_owned"),
            b.info_u64("Cluster_partitions_owned"),
        );
        last == (32, 32)
    });
    assert!(even, "owned (a, b) stayed at {last:?}");
    assert_eq!(a.info_u64("Cluster_live_nodes"), 2);
    assert_eq!(b.info_u64("Cluster_live_nodes"), 2);
    // `a` let its extra leases lapse: a release, not a loss.
    assert_eq!(a.info_u64("Cluster_leases_lost"), 0);
}

#[test]
fn a_stopped_node_s_partitions_are_taken_over() {
    if common::pass::first_pass_only(ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let partitions = 16;
    let a = node(&nats, "a", partitions);
    let b = node(&nats, "b", partitions);
    let split = settle(|| {
        a.info_u64("Cluster_partitions_owned") == 8 && b.info_u64("Cluster_partitions_owned") == 8
    });
    assert!(split, "the nodes never split 16 partitions 8/8");
    // Stopping leaves the leases to expire; `b` then holds everything.
    drop(a);
    let all = settle(|| b.info_u64("Cluster_partitions_owned") == 16);
    assert!(
        all,
        "b holds {} of 16",
        b.info_u64("Cluster_partitions_owned")
    );
    assert_eq!(b.info_u64("Cluster_live_nodes"), 1);
}

/// One `show info` value of a node running as a child process.
fn child_info(stats: &std::path::Path, key: &str) -> u64 {
    let text = tern::stats::query(stats, "show info").expect("stats socket answers");
    let info = common::parse_info(&text);
    info.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("show info has no number {key}: {info:?}"))
}

/// Sends `signal` to a process this test started.
fn signal(child: &TernChild, signal: i32) {
    // SAFETY: kill(2) on the PID of our own child, which is not reaped yet.
    let rc = unsafe { libc::kill(child.pid() as i32, signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", child.pid());
}

/// Fencing: a node paused past its lease finds, when it resumes, that its
/// renewals are refused on their revision, and drops the partitions. For
/// those partitions it neither acknowledges nor delivers: a user of one,
/// still connected to it, whose SEND waited in the socket through the
/// pause, gets no ACK and no DELIVER (a message for it was sent meanwhile
/// through the new owner), only BYE(moved) and the close.
#[test]
fn a_node_paused_past_its_lease_loses_it_on_resume() {
    if common::pass::first_pass_only(ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = dir.path().join("a.sock");
    let config = dir.path().join("a.toml");
    std::fs::write(
        &config,
        format!(
            "stats_socket = {stats:?}\ndata_dir = {data:?}\n\n[cluster]\nnode_id = \"a\"\n\
             nats_urls = [{url:?}]\npublic_addr = \"a.test:5222\"\npartitions = 16\nlease_s = 3\n",
            data = dir.path().join("data"),
            url = nats.url(),
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path");
    let a = TernChild::expect_start(serve_command(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--config",
        config,
    ]));
    assert!(settle(|| {
        child_info(&stats, "Cluster_partitions_owned") == 16
            // All 16 are one stream, held whole: one consumer.
            && child_info(&stats, "Cluster_consumers") == 1
    }));
    let mut at_a: Vec<(u64, Client)> = (1..=32u64)
        .map(|user| {
            (
                user,
                login_v2_here(a.addr, user).expect("a serves everyone"),
            )
        })
        .collect();

    signal(&a, libc::SIGSTOP);
    let b = reachable_node(&nats, "b", 16);
    let took = settle(|| b.info_u64("Cluster_partitions_owned") >= 8);
    // The users whose partitions b took (b logs them in), while a sleeps.
    let taken: Vec<u64> = at_a
        .iter()
        .map(|(user, _)| *user)
        .filter(|&user| login_v2_here(b.addr, user).is_ok())
        .collect();
    let sender = taken.first().copied();
    for (user, client) in at_a.iter_mut().filter(|(u, _)| taken.contains(u)) {
        client
            .send_msg(1, 1000 + *user, b"sent while a slept")
            .expect("send");
        if let Some(from) = sender.filter(|&s| s != *user) {
            let mut c = login_v2_here(b.addr, from).expect("b serves it");
            c.send_msg(1, *user, b"for the new owner").expect("send");
            recv_ack(&mut c, 1);
        }
    }
    signal(&a, libc::SIGCONT);
    assert!(took, "b never took partitions from the paused node");
    assert!(taken.len() >= 2, "b serves {taken:?}");
    for (user, client) in at_a.iter_mut().filter(|(u, _)| taken.contains(u)) {
        let mut frames = client
            .wait_closed(SETTLE)
            .unwrap_or_else(|e| panic!("user {user}: a kept the session: {e}"));
        assert_eq!(
            frames.pop(),
            Some(OwnedFrame::Bye {
                reason: ByeReason::Moved
            }),
            "user {user}"
        );
        assert_eq!(
            frames,
            [],
            "user {user}: a answered for a partition it lost"
        );
    }
    // Whatever `b` holds, `a` held before the pause: each such renewal is
    // refused (counted as lost), then the two settle on an even split.
    let mut last = (0, 0, 0);
    let fenced = settle(|| {
        let lost = child_info(&stats, "Cluster_leases_lost");
        let (owned_a, owned_b) = (
            child_info(&stats, "Cluster_partitions_owned"),
            b.info_u64("Cluster_partitions_owned"),
        );
        last = (lost, owned_a, owned_b);
        lost >= 8 && owned_a == 8 && owned_b == 8
    });
    assert!(fenced, "(a lost, a owns, b owns) stayed at {last:?}");
    drop(a);
}

/// LOGIN at the wrong node: version 2 gets REDIRECT to the owner's address
/// (the client library follows it), version 1 gets LOGIN_ERR(other_node)
/// naming it.
#[test]
fn a_login_at_the_wrong_node_is_redirected_to_the_owner() {
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    let split = settle(|| {
        a.info_u64("Cluster_partitions_owned") == 8 && b.info_u64("Cluster_partitions_owned") == 8
    });
    assert!(split, "the nodes never split 16 partitions 8/8");

    let (mut here, mut there) = (Vec::new(), Vec::new());
    for user in 1..=40u64 {
        match login_v2_here(a.addr, user) {
            Ok(client) => here.push((user, client)),
            Err(ClientError::Redirected { addr }) => {
                assert_eq!(addr, b.addr.to_string(), "user {user}");
                there.push(user);
            }
            Err(e) => panic!("user {user} at a: {e}"),
        }
    }
    assert!(
        !here.is_empty() && !there.is_empty(),
        "{} here, {there:?} there",
        here.len()
    );
    assert_eq!(a.info_u64("Cluster_redirects"), there.len() as u64);

    // The library follows the redirect and ends up logged in at b.
    let moved = there[0];
    let online = b.info_u64("Users_online");
    let (mut at_b, _) =
        Client::login_version(a.addr, &token(moved), VERSION_2).expect("login through a");
    assert_eq!(at_b.peer_addr().expect("peer"), b.addr);
    assert_eq!(b.info_u64("Users_online"), online + 1);
    at_b.ping(1).expect("served at b");

    // Version 1 cannot follow a REDIRECT: LOGIN_ERR names the node.
    match Client::login_version(a.addr, &token(moved), VERSION) {
        Err(ClientError::LoginRejected { code, text }) => {
            assert_eq!(code, ErrorCode::OtherNode);
            assert!(text.contains(&b.addr.to_string()), "{text}");
        }
        other => panic!("v1 login of user {moved} at a: {other:?}"),
    }
}

/// Fencing of sessions: when a node gives partitions up (here to a node
/// that joined), the users it served in them get BYE(moved), their next
/// LOGIN there is redirected, and everyone else stays connected.
#[test]
fn users_of_a_partition_given_up_are_told_moved() {
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    a.wait_info("Cluster_partitions_owned", |n| n == 16);
    let mut clients: Vec<(u64, Client)> = (1..=24u64)
        .map(|user| {
            (
                user,
                login_v2_here(a.addr, user).expect("a serves everyone"),
            )
        })
        .collect();
    let b = reachable_node(&nats, "b", 16);
    let split = settle(|| {
        a.info_u64("Cluster_partitions_owned") == 8 && b.info_u64("Cluster_partitions_owned") == 8
    });
    assert!(split, "the nodes never split 16 partitions 8/8");

    let mut moved = 0;
    for (user, client) in &mut clients {
        // The BYE left when `a` gave the partition up, a lease earlier.
        match client.recv_timeout(Duration::ZERO) {
            Ok(Some(OwnedFrame::Bye {
                reason: ByeReason::Moved,
            })) => {
                moved += 1;
                match login_v2_here(a.addr, *user) {
                    Err(ClientError::Redirected { addr }) => assert_eq!(addr, b.addr.to_string()),
                    other => panic!(
                        "user {user} was moved, yet a says {:?}",
                        other.map(|_| "ok")
                    ),
                }
            }
            Ok(None) => {
                client
                    .ping(*user)
                    .expect("a user a still serves stays connected");
                assert!(login_v2_here(a.addr, *user).is_ok(), "user {user}");
            }
            other => panic!("user {user}: {other:?}"),
        }
    }
    assert!(
        moved > 0 && moved < clients.len(),
        "{moved} of {} moved",
        clients.len()
    );
    assert_eq!(a.info_u64("Cluster_moved_closes"), moved as u64);
}

/// Two nodes and one user served by each (found by where a LOGIN at `a`
/// ends up).
fn user_on_each(a: &TestServer) -> (u64, u64) {
    let (mut on_a, mut on_b) = (None, None);
    for user in 1..=64u64 {
        match retry_unavailable(|| login_v2_here(a.addr, user)) {
            Ok(_) => on_a = on_a.or(Some(user)),
            Err(ClientError::Redirected { .. }) => on_b = on_b.or(Some(user)),
            Err(e) => panic!("user {user} at a: {e}"),
        }
    }
    (
        on_a.expect("a serves someone"),
        on_b.expect("b serves someone"),
    )
}

/// Waits until `a` and `b` each hold half of `partitions`, with their
/// consumers running, and neither knows a partition without owner: logins
/// before that may answer `unavailable` or redirect to a node about to let
/// go.
fn settle_halves(a: &TestServer, b: &TestServer, partitions: u64) {
    let half = partitions / 2;
    // Two streams or more: each node holds whole streams, one consumer
    // each; else one per partition.
    let consumers = if partitions >= 128 { half / 64 } else { half };
    let keys = [
        "Cluster_partitions_owned",
        "Cluster_partitions_unowned",
        "Cluster_consumers",
    ];
    let mut last = Vec::new();
    let split = settle(|| {
        last = [a, b]
            .iter()
            .map(|n| keys.map(|k| n.info_u64(k)))
            .collect::<Vec<_>>();
        last.iter().all(|v| *v == [half, 0, consumers])
    });
    assert!(
        split,
        "the nodes never split {partitions} partitions evenly with every owner known: \
         {keys:?} of a, b stayed at {last:?}"
    );
}

/// Waits until the nodes, whose (owned, unowned, consumers) `state` reads,
/// hold all of `partitions` between them in whole message streams of 64
/// partitions, each node with one consumer per stream it holds and every
/// owner known; returns that state.
fn settle_whole_streams(
    partitions: u64,
    mut state: impl FnMut() -> Vec<(u64, u64, u64)>,
) -> Vec<(u64, u64, u64)> {
    let mut last = Vec::new();
    let whole = settle(|| {
        last = state();
        last.iter().map(|s| s.0).sum::<u64>() == partitions
            && last.iter().all(|&(owned, unowned, consumers)| {
                owned > 0 && owned % 64 == 0 && unowned == 0 && consumers == owned / 64
            })
    });
    assert!(
        whole,
        "(owned, unowned, consumers) per node never became whole streams of {partitions}: {last:?}"
    );
    last
}

/// The next `n` RECEIPTs on `client`, as (kind, server id, peer), sorted.
fn recv_receipts(client: &mut Client, n: usize) -> Vec<(ReceiptKind, u64, u64)> {
    let mut got: Vec<_> = (0..n)
        .map(
            |_| match client.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. })) {
                Ok(OwnedFrame::Receipt {
                    kind,
                    server_id,
                    peer,
                }) => (kind, server_id, peer),
                other => panic!("expected RECEIPT, got {other:?}"),
            },
        )
        .collect();
    got.sort_by_key(|&(kind, id, peer)| (kind as u8, id, peer));
    got
}

/// N messages from a user of node a to an offline user of node b wait in
/// JetStream; the user logs in through a (redirect followed) and gets all N
/// in send order with the server ids its sender was ACKed; its delivery and
/// read receipts come back to the sender at a.
#[test]
fn offline_messages_across_nodes_arrive_in_send_order_with_receipts() {
    if common::pass::first_pass_only(ABOVE_THE_BACKEND) {
        return;
    }
    const N: u64 = 20;
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    settle_halves(&a, &b, 16);
    let (x, y) = user_on_each(&a);
    let mut cx = login_v2(a.addr, x);
    let ids: Vec<u64> = (1..=N)
        .map(|i| {
            cx.send_msg(i, y, &indexed_body(i, 0)).expect("send");
            recv_ack(&mut cx, i)
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "server ids increase: {ids:?}"
    );

    let mut cy = login_v2(a.addr, y);
    assert_eq!(cy.peer_addr().expect("peer"), b.addr, "redirected to b");
    for (i, &id) in (1..=N).zip(&ids) {
        let got = recv_deliver(&mut cy);
        assert_eq!(
            (got.server_id, got.from, got.body),
            (id, x, indexed_body(i, 0)),
            "message {i} in send order"
        );
        cy.send_delivered(id).expect("delivered");
        cy.send_read(id, x).expect("read");
    }
    let mut want: Vec<_> = ids
        .iter()
        .flat_map(|&id| [(ReceiptKind::Delivered, id, y), (ReceiptKind::Read, id, y)])
        .collect();
    want.sort_by_key(|&(kind, id, peer)| (kind as u8, id, peer));
    assert_eq!(recv_receipts(&mut cx, 2 * N as usize), want);
}

/// A message between users of two nodes, through JetStream: ACK once
/// published, DELIVER at the other node with the same server id, delivery
/// and read receipts back; a retried version 2 SEND is the same message;
/// a message for an offline user waits in JetStream for its login.
#[test]
fn messages_cross_nodes_with_every_tick_and_wait_for_offline_users() {
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    // Logins before both tables know every owner may answer `unavailable`
    // or redirect to a node about to let go: wait for the whole table.
    let split = settle(|| {
        [&a, &b].iter().all(|n| {
            n.info_u64("Cluster_partitions_owned") == 8
                && n.info_u64("Cluster_partitions_unowned") == 0
                && n.info_u64("Cluster_consumers") == 8
        })
    });
    assert!(
        split,
        "the nodes never split 16 partitions 8/8 with every owner known"
    );
    let (x, y) = user_on_each(&a);
    let mut cx = login_v2(a.addr, x);
    let mut cy = login_v2(a.addr, y);
    assert_eq!(cy.peer_addr().expect("peer"), b.addr);

    cx.send_msg(1, y, b"across").expect("send");
    let id = recv_ack(&mut cx, 1);
    let got = recv_deliver(&mut cy);
    assert_eq!(
        (got.server_id, got.from, &got.body[..]),
        (id, x, &b"across"[..])
    );
    cy.send_delivered(id).expect("delivered");
    expect_receipt(&mut cx, ReceiptKind::Delivered, id, y);
    cy.send_read(id, x).expect("read");
    expect_receipt(&mut cx, ReceiptKind::Read, id, y);

    // And back, from b's user to a's.
    cy.send_msg(1, x, b"back").expect("send");
    let back = recv_ack(&mut cy, 1);
    let got = recv_deliver(&mut cx);
    assert_eq!(
        (got.server_id, got.from, &got.body[..]),
        (back, y, &b"back"[..])
    );
    cx.send_delivered(back).expect("delivered");
    expect_receipt(&mut cy, ReceiptKind::Delivered, back, x);

    // A version 2 retry of the same client_id is the same message.
    cx.send_msg(2, y, b"once").expect("send");
    let first = recv_ack(&mut cx, 2);
    cx.send_msg(2, y, b"once").expect("send again");
    assert_eq!(recv_ack(&mut cx, 2), first);
    let got = recv_deliver(&mut cy);
    assert_eq!(got.server_id, first);
    cy.send_delivered(first).expect("delivered");
    expect_receipt(&mut cx, ReceiptKind::Delivered, first, y);

    // y goes offline; x's message waits in JetStream, not in a's memory.
    drop(cy);
    cx.send_msg(3, y, b"later").expect("send");
    let later = recv_ack(&mut cx, 3);
    let (mut cy, info) =
        retry_unavailable(|| Client::login_version(a.addr, &token(y), VERSION_2)).expect("y again");
    let got = recv_deliver(&mut cy);
    assert_eq!((got.server_id, &got.body[..]), (later, &b"later"[..]));
    assert!(info.offline_count <= 1);
    assert!(
        cy.recv_timeout(Duration::from_millis(300))
            .expect("open")
            .is_none(),
        "the retried SEND came twice"
    );
    cy.send_delivered(later).expect("delivered");
    expect_receipt(&mut cx, ReceiptKind::Delivered, later, y);
    let published = a.info_u64("Cluster_published") + b.info_u64("Cluster_published");
    assert_eq!(published, 5, "four SENDs and one retry");
}

// ---- Publish latency and the load generator across nodes (issue 15) ----

/// `show latency`'s `cluster_publish` count at `node`.
fn publish_count(node: &TestServer) -> u64 {
    let text = node.query("show latency");
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cluster_publish"))
        .unwrap_or_else(|| panic!("no cluster_publish row in:\n{text}"));
    row.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One message across nodes and its DELIVERED receipt: the sender's node
/// records one publish (the SEND), the recipient's node one (the receipt),
/// in `show latency` and in Prometheus, and nothing stays in flight.
#[test]
fn publish_latency_moves_after_a_cross_node_message() {
    if common::pass::first_pass_only(ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    settle_halves(&a, &b, 16);
    assert_eq!((publish_count(&a), publish_count(&b)), (0, 0));
    assert_eq!(a.metric_sum("tern_cluster_publish_seconds_count"), 0);
    let (x, y) = user_on_each(&a);
    let mut cx = login_v2(a.addr, x);
    let mut cy = login_v2(a.addr, y);

    cx.send_msg(1, y, b"timed").expect("send");
    let id = recv_ack(&mut cx, 1);
    assert_eq!(recv_deliver(&mut cy).server_id, id);
    cy.send_delivered(id).expect("delivered");
    expect_receipt(&mut cx, ReceiptKind::Delivered, id, y);

    assert_eq!(publish_count(&a), 1, "the SEND");
    assert_eq!(a.metric_sum("tern_cluster_publish_seconds_count"), 1);
    // The receipt's ack may come back a moment after the receipt itself.
    b.wait_metric("tern_cluster_publish_seconds_count", |n| n == 1);
    assert_eq!(publish_count(&b), 1, "the receipt");
    for node in [&a, &b] {
        node.wait_info("Cluster_publishes_in_flight", |n| n == 0);
        assert_eq!(node.metric_sum("tern_cluster_publishes_in_flight"), 0);
    }
    let metrics = a.query("show metrics");
    assert!(metrics.contains("# TYPE tern_cluster_publish_seconds histogram"));
}
