//! Groups across cluster nodes (docs/CLUSTER.md, "Groups across nodes:
//! the design"): a group homed by one node's partition, members served by
//! both nodes, messages from a member of the other node; every member
//! gets every message in the group's order, the sender gets receipts
//! naming the members, an offline member gets them at login.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use tern::cluster::ClusterConfig;
use tern::proto::group::list_users;
use tern::proto::{ErrorCode, Frame, GroupEvent, GroupFrame, OwnedFrame, ReceiptKind};
use tern_client::{Client, ClientError};

use super::faults::Node;
use super::nats::{free_port, Nats};
use super::{login_v2, login_v2_here, reachable_node, retry_unavailable, settle, settle_halves};

const PARTITIONS: u32 = 16;

/// Two users served by each node (by where a LOGIN at `a` ends up).
fn two_on_each(a: SocketAddr) -> ([u64; 2], [u64; 2]) {
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for user in 1..=64u64 {
        match retry_unavailable(|| login_v2_here(a, user)) {
            Ok(_) => on_a.push(user),
            Err(ClientError::Redirected { .. }) => on_b.push(user),
            Err(e) => panic!("user {user} at a: {e}"),
        }
    }
    assert!(on_a.len() >= 2 && on_b.len() >= 2, "{on_a:?} {on_b:?}");
    ([on_a[0], on_a[1]], [on_b[0], on_b[1]])
}

/// One copy seen: its number, `None` for a message or the event and its
/// subject, the sender (actor), the body.
type Copy = (u64, Option<(GroupEvent, u64)>, u64, Vec<u8>);

/// What a member has seen of the group: its messages and events in order.
#[derive(Default)]
pub(super) struct Member {
    seen: Vec<Copy>,
    /// Receipts got: (kind, msg, member).
    pub(super) receipts: HashSet<(ReceiptKind, u64, u64)>,
}

impl Member {
    /// Takes one frame: a copy (answered DELIVERED) or a receipt; false
    /// for anything else.
    pub(super) fn take(&mut self, c: &mut Client, f: &OwnedFrame) -> bool {
        match f {
            OwnedFrame::Group(GroupFrame::Deliver {
                server_id,
                msg,
                from,
                body,
                ..
            }) => {
                c.send_delivered(*server_id).unwrap();
                self.seen.push((*msg, None, *from, body.clone()));
            }
            OwnedFrame::Group(GroupFrame::Event {
                server_id,
                msg,
                actor,
                event,
                subject,
                ..
            }) => {
                c.send_delivered(*server_id).unwrap();
                self.seen
                    .push((*msg, Some((*event, *subject)), *actor, Vec::new()));
            }
            OwnedFrame::Group(GroupFrame::Receipt {
                kind, msg, members, ..
            }) => {
                for m in list_users(members) {
                    self.receipts.insert((*kind, *msg, m));
                }
            }
            _ => return false,
        }
        true
    }

    /// The next frame that is not a copy or a receipt.
    fn answer(&mut self, c: &mut Client) -> OwnedFrame {
        loop {
            let f = c.recv().expect("a frame");
            if !self.take(c, &f) {
                return f;
            }
        }
    }

    /// Frames until `done` holds.
    fn until(&mut self, c: &mut Client, mut done: impl FnMut(&Member) -> bool) {
        while !done(self) {
            let f = c.recv().expect("a frame");
            assert!(self.take(c, &f), "unexpected {f:?}");
        }
    }

    /// The numbers of the messages (not events) seen, in order.
    pub(super) fn messages(&self) -> Vec<(u64, u64, Vec<u8>)> {
        self.seen
            .iter()
            .filter(|s| s.1.is_none())
            .map(|s| (s.0, s.2, s.3.clone()))
            .collect()
    }
}

/// Sends group frame `g`.
pub(super) fn send(c: &mut Client, g: GroupFrame<&[u8]>) {
    c.send_frame(&Frame::Group(g)).unwrap();
}

/// The GROUP_OK answering `req` (copies and receipts before it taken):
/// its group.
pub(super) fn ok(c: &mut Client, m: &mut Member, req: u64) -> u64 {
    match m.answer(c) {
        OwnedFrame::Group(GroupFrame::Ok { req: r, group }) if r == req => group,
        other => panic!("expected GROUP_OK({req}), got {other:?}"),
    }
}

/// The ACK of `client_id` (copies and receipts before it taken): its
/// server id.
pub(super) fn acked(c: &mut Client, m: &mut Member, client_id: u64) -> u64 {
    match m.answer(c) {
        OwnedFrame::Ack {
            client_id: id,
            server_id,
            ..
        } if id == client_id => server_id,
        other => panic!("expected ACK({client_id}), got {other:?}"),
    }
}

#[test]
fn a_group_spans_nodes_in_one_order_with_receipts_and_offline_members() {
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", PARTITIONS);
    let b = reachable_node(&nats, "b", PARTITIONS);
    settle_halves(&a, &b, PARTITIONS.into());
    let ([a1, a2], [b1, b2]) = two_on_each(a.addr);
    let mut ca1 = login_v2(a.addr, a1);
    let mut ca2 = login_v2(a.addr, a2);
    let mut cb1 = login_v2(b.addr, b1);
    let [mut ma1, mut ma2, mut mb1, mut mb2] = [(); 4].map(|()| Member::default());
    let (ma1, ma2, mb1, mb2) = (&mut ma1, &mut ma2, &mut mb1, &mut mb2);

    // Created on a; members served by both nodes; b2 offline.
    send(&mut ca1, GroupFrame::Create { req: 1 });
    let group = ok(&mut ca1, ma1, 1);
    for (req, user) in [(2, a2), (3, b1), (4, b2)] {
        send(&mut ca1, GroupFrame::Add { req, group, user });
        assert_eq!(ok(&mut ca1, ma1, req), group);
    }
    // Messages from b1 (served by b) and a1, each ACKed with its number.
    let mut numbers = Vec::new();
    for (client_id, body) in [(1, &b"one"[..]), (2, b"two"), (3, b"three")] {
        send(
            &mut cb1,
            GroupFrame::Send {
                client_id,
                group,
                body,
            },
        );
        numbers.push(acked(&mut cb1, mb1, client_id));
    }
    send(
        &mut ca1,
        GroupFrame::Send {
            client_id: 9,
            group,
            body: b"four",
        },
    );
    let four = acked(&mut ca1, ma1, 9);
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    assert!(four > numbers[2]);

    // Every online member gets the four messages in one order.
    let expected: Vec<(u64, u64, Vec<u8>)> = numbers
        .iter()
        .zip([b"one".to_vec(), b"two".to_vec(), b"three".to_vec()])
        .map(|(&n, body)| (n, b1, body))
        .chain([(four, a1, b"four".to_vec())])
        .collect();
    for (c, m) in [
        (&mut ca1, &mut *ma1),
        (&mut ca2, &mut *ma2),
        (&mut cb1, &mut *mb1),
    ] {
        m.until(c, |m| m.messages().len() >= 4);
        assert_eq!(m.messages(), expected);
    }
    // a1 saw the group made and its three members added, in order, first.
    let events: Vec<_> = ma1.seen.iter().filter_map(|s| s.1).collect();
    assert_eq!(
        events,
        [
            (GroupEvent::Created, a1),
            (GroupEvent::Added, a2),
            (GroupEvent::Added, b1),
            (GroupEvent::Added, b2)
        ]
    );
    // b1 hears that a1 and a2 got each of its messages (b2 is offline).
    let wanted: HashSet<_> = numbers
        .iter()
        .flat_map(|&n| [a1, a2].map(|u| (ReceiptKind::Delivered, n, u)))
        .collect();
    mb1.until(&mut cb1, |m| wanted.is_subset(&m.receipts));

    // b2 logs in (at a, redirected to b) and gets what was ordered after
    // it was added, in the same order.
    let mut cb2 = login_v2(a.addr, b2);
    mb2.until(&mut cb2, |m| m.messages().len() >= 4);
    assert_eq!(mb2.messages(), expected);
    assert_eq!(mb2.seen[0].1, Some((GroupEvent::Added, b2)));
    // And b1 hears it.
    mb1.until(&mut cb1, |m| {
        numbers
            .iter()
            .all(|&n| m.receipts.contains(&(ReceiptKind::Delivered, n, b2)))
    });

    // a2 (on a) reads b1's first message: b1 (on b) hears it.
    send(
        &mut ca2,
        GroupFrame::Read {
            group,
            msg: numbers[0],
            from: b1,
        },
    );
    mb1.until(&mut cb1, |m| {
        m.receipts.contains(&(ReceiptKind::Read, numbers[0], a2))
    });

    // The member list, asked on b, is the one a made.
    let mut want = vec![(a1, true), (a2, false), (b1, false), (b2, false)];
    want.sort_unstable();
    assert_eq!(members(&mut cb1, mb1, 5, group), want);

    // A retried GROUP_SEND (same client_id) gets its first ACK and no
    // member a second copy: the next message follows the four directly.
    send(
        &mut cb1,
        GroupFrame::Send {
            client_id: 1,
            group,
            body: b"one",
        },
    );
    assert_eq!(acked(&mut cb1, mb1, 1), numbers[0]);
    send(
        &mut ca1,
        GroupFrame::Send {
            client_id: 10,
            group,
            body: b"five",
        },
    );
    let five = acked(&mut ca1, ma1, 10);
    let mut expected = expected;
    expected.push((five, a1, b"five".to_vec()));
    for (c, m) in [
        (&mut ca1, &mut *ma1),
        (&mut ca2, &mut *ma2),
        (&mut cb1, &mut *mb1),
        (&mut cb2, &mut *mb2),
    ] {
        m.until(c, |m| m.messages().len() >= 5);
        assert_eq!(m.messages(), expected);
    }

    // a2 (on a) removed, then a message from b1, then a2 added back and
    // another: a2 gets its removal, not the message ordered while it was
    // out, then its addition and the next one.
    send(
        &mut ca1,
        GroupFrame::Remove {
            req: 20,
            group,
            user: a2,
        },
    );
    assert_eq!(ok(&mut ca1, ma1, 20), group);
    let mut bodies = Vec::new();
    for (client_id, body) in [(20, &b"six"[..]), (21, b"seven")] {
        send(
            &mut cb1,
            GroupFrame::Send {
                client_id,
                group,
                body,
            },
        );
        bodies.push((acked(&mut cb1, mb1, client_id), b1, body.to_vec()));
        if client_id == 20 {
            send(
                &mut ca1,
                GroupFrame::Add {
                    req: 21,
                    group,
                    user: a2,
                },
            );
            assert_eq!(ok(&mut ca1, ma1, 21), group);
        }
    }
    ma2.until(&mut ca2, |m| m.messages().len() >= 6);
    let mut wanted = expected.clone();
    wanted.push(bodies[1].clone());
    assert_eq!(
        ma2.messages(),
        wanted,
        "a2 got only what was ordered while a member"
    );
    let tail: Vec<_> = ma2.seen.iter().rev().take(3).filter_map(|s| s.1).collect();
    assert_eq!(tail, [(GroupEvent::Added, a2), (GroupEvent::Removed, a2)]);
    let mut all = expected;
    all.extend(bodies);
    mb2.until(&mut cb2, |m| m.messages().len() >= 7);
    assert_eq!(mb2.messages(), all);
}

/// GROUP_MEMBERS of `group`, sorted.
fn members(c: &mut Client, m: &mut Member, req: u64, group: u64) -> Vec<(u64, bool)> {
    send(c, GroupFrame::Members { req, group });
    let mut listed = Vec::new();
    loop {
        match m.answer(c) {
            OwnedFrame::Group(GroupFrame::List {
                req: r,
                left,
                entries,
                ..
            }) if r == req => {
                listed.extend(tern::proto::group::list_entries(&entries));
                if left == 0 {
                    break;
                }
            }
            other => panic!("expected GROUP_LIST({req}), got {other:?}"),
        }
    }
    listed.sort_unstable();
    listed
}

/// `kill -9` of the node that homes a group: once the other node took its
/// partitions over, the membership is intact (read from JetStream, the
/// store of record), every message ACKed before the kill reaches every
/// member, the killed node's members included, and the group goes on.
#[test]
fn the_group_s_home_killed_loses_no_member_and_no_acked_message() {
    let Some(nats) = Nats::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Node::start_with(&nats, dir.path(), "a", 3, PARTITIONS.into());
    let b = Node::start_with(&nats, dir.path(), "b", 3, PARTITIONS.into());
    let half = u64::from(PARTITIONS) / 2;
    let split = settle(|| {
        [&a, &b].iter().all(|n| {
            (
                n.info("Cluster_partitions_owned"),
                n.info("Cluster_partitions_unowned"),
            ) == (half, 0)
        })
    });
    assert!(split, "the nodes never split the partitions");
    let ([a1, a2], [b1, b2]) = two_on_each(a.child.addr);
    let mut ca1 = login_v2(a.child.addr, a1);
    let mut cb1 = login_v2(b.child.addr, b1);
    let [mut ma1, mut mb1, mut ma2, mut mb2] = [(); 4].map(|()| Member::default());
    // Homed by a's partition (its creator's).
    send(&mut ca1, GroupFrame::Create { req: 1 });
    let group = ok(&mut ca1, &mut ma1, 1);
    for (req, user) in [(2, a2), (3, b1), (4, b2)] {
        send(&mut ca1, GroupFrame::Add { req, group, user });
        assert_eq!(ok(&mut ca1, &mut ma1, req), group);
    }
    let mut numbers = Vec::new();
    for (client_id, body) in [(1, &b"one"[..]), (2, b"two")] {
        send(
            &mut cb1,
            GroupFrame::Send {
                client_id,
                group,
                body,
            },
        );
        numbers.push(acked(&mut cb1, &mut mb1, client_id));
    }
    a.child.kill9();
    drop(ca1);

    // b takes a's partitions over; the request waits in JetStream for it.
    cb1.set_read_timeout(Duration::from_secs(40));
    let mut want = vec![(a1, true), (a2, false), (b1, false), (b2, false)];
    want.sort_unstable();
    assert_eq!(members(&mut cb1, &mut mb1, 5, group), want);
    // The group goes on, ordered by its new home.
    send(
        &mut cb1,
        GroupFrame::Send {
            client_id: 3,
            group,
            body: b"three",
        },
    );
    numbers.push(acked(&mut cb1, &mut mb1, 3));
    let expected: Vec<(u64, u64, Vec<u8>)> = numbers
        .iter()
        .zip([b"one".to_vec(), b"two".to_vec(), b"three".to_vec()])
        .map(|(&n, body)| (n, b1, body))
        .collect();
    // a2 (served by a, offline through the kill) and b2 (offline) log in
    // at b and get all three in order; so does a1.
    for (user, m) in [(a2, &mut ma2), (b2, &mut mb2), (a1, &mut ma1)] {
        let mut c = login_v2(b.child.addr, user);
        m.until(&mut c, |m| m.messages().len() >= 3);
        assert_eq!(m.messages(), expected, "user {user}");
    }
}

/// A reachable node (16 partitions, 3 s leases) whose users may be in at
/// most 2 groups of one partition.
fn limited_node(nats: &Nats, id: &str) -> super::TestServer {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let cluster = ClusterConfig {
        node_id: id.into(),
        nats_urls: nats.urls(),
        public_addr: addr.to_string(),
        partitions: PARTITIONS,
        lease_s: 3,
        stream_replicas: 1,
    };
    super::TestServer::start_with(|c| {
        c.listen = addr;
        c.groups_per_user_max = 2;
        c.cluster = Some(cluster);
    })
}

fn too_many(c: &mut Client, m: &mut Member, req: u64) {
    match m.answer(c) {
        OwnedFrame::Error {
            code: ErrorCode::TooManyGroups,
            client_id,
            ..
        } if client_id == req => {}
        other => panic!("expected ERROR(too_many_groups, {req}), got {other:?}"),
    }
}

/// `groups_per_user_max` still holds after the groups' home moved to
/// another node: the new home reads every group of the partition before
/// its first request, not only the group asked about.
#[test]
fn the_per_user_group_limit_holds_after_a_takeover() {
    let Some(nats) = Nats::start() else { return };
    let a = limited_node(&nats, "a");
    let b = limited_node(&nats, "b");
    settle_halves(&a, &b, PARTITIONS.into());
    let ([a1, _], _) = two_on_each(a.addr);
    let mut c = login_v2(a.addr, a1);
    let mut m = Member::default();
    let mut groups = Vec::new();
    for req in [1, 2] {
        send(&mut c, GroupFrame::Create { req });
        groups.push(ok(&mut c, &mut m, req));
    }
    send(&mut c, GroupFrame::Create { req: 3 });
    too_many(&mut c, &mut m, 3);
    drop(c);
    let b_addr = b.addr;
    drop(a);
    let took = settle(|| b.info_u64("Cluster_partitions_owned") == u64::from(PARTITIONS));
    assert!(took, "b never took a's partitions over");
    let mut c = login_v2(b_addr, a1);
    c.set_read_timeout(Duration::from_secs(40));
    send(&mut c, GroupFrame::Create { req: 4 });
    too_many(&mut c, &mut m, 4);
    // Leaving one makes room again.
    send(
        &mut c,
        GroupFrame::Leave {
            req: 5,
            group: groups[0],
        },
    );
    assert_eq!(ok(&mut c, &mut m, 5), groups[0]);
    send(&mut c, GroupFrame::Create { req: 6 });
    ok(&mut c, &mut m, 6);
}

/// Figure, not a check (results/cluster-groups/README.md): ACK latency of
/// a GROUP_SEND from a member served by one node to a group of
/// `TERN_FIG_MEMBERS` (default 10) homed by the other, members offline
/// (their copies wait in JetStream), against a 1:1 SEND between the same
/// two nodes, `TERN_FIG_MSGS` (default 200) of each, one at a time.
#[test]
#[ignore = "a figure: cargo test --release -p tern --test cluster group_ack_figure -- --ignored --nocapture"]
fn group_ack_figure() {
    let Some(nats) = Nats::start() else { return };
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (members_n, msgs) = (
        env("TERN_FIG_MEMBERS", 10),
        env("TERN_FIG_MSGS", 200) as u64,
    );
    let a = reachable_node(&nats, "a", PARTITIONS);
    let b = reachable_node(&nats, "b", PARTITIONS);
    settle_halves(&a, &b, PARTITIONS.into());
    let ([a1, _], [b1, _]) = two_on_each(a.addr);
    let mut ca1 = login_v2(a.addr, a1);
    let mut cb1 = login_v2(b.addr, b1);
    let mut m = Member::default();
    send(&mut ca1, GroupFrame::Create { req: 1 });
    let group = ok(&mut ca1, &mut m, 1);
    send(
        &mut ca1,
        GroupFrame::Add {
            req: 2,
            group,
            user: b1,
        },
    );
    ok(&mut ca1, &mut m, 2);
    // Offline members, served by either node.
    for (i, user) in (1000u64..).take(members_n.saturating_sub(2)).enumerate() {
        let req = 3 + i as u64;
        send(&mut ca1, GroupFrame::Add { req, group, user });
        ok(&mut ca1, &mut m, req);
    }
    let pct = |mut v: Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let mut group_ms = Vec::new();
    for client_id in 1..=msgs {
        let t = std::time::Instant::now();
        send(
            &mut cb1,
            GroupFrame::Send {
                client_id,
                group,
                body: &[7u8; 100],
            },
        );
        acked(&mut cb1, &mut m, client_id);
        group_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // 1:1 to an offline user served by a.
    drop(ca1);
    let mut one_ms = Vec::new();
    for i in 0..msgs {
        let client_id = msgs + 1 + i;
        let t = std::time::Instant::now();
        cb1.send_msg(client_id, a1, &[7u8; 100]).unwrap();
        acked(&mut cb1, &mut m, client_id);
        one_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "group of {members_n} across nodes: ACK p50 {:.2} ms p99 {:.2} ms; \
         1:1 across nodes: ACK p50 {:.2} ms p99 {:.2} ms ({msgs} each)",
        pct(group_ms.clone(), 0.5),
        pct(group_ms, 0.99),
        pct(one_ms.clone(), 0.5),
        pct(one_ms, 0.99)
    );
}
