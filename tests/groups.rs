//! Groups (protocol v2) over real sockets: a server on a loopback port,
//! real clients, real bytes (docs/PROTOCOL.md, "Groups").

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::child::{serve_command, TernChild};
use common::*;
use tern::proto::group::{list_entries, list_users};
use tern::proto::{ErrorCode, Frame, GroupEvent, GroupFrame, OwnedFrame, ReceiptKind, VERSION_2};
use tern_client::Client;

/// What a member saw of a group: (msg, Some(event, actor, subject)) for
/// an event, (msg, None) for a message, with the message's sender and body.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Event {
        msg: u64,
        event: GroupEvent,
        actor: u64,
        subject: u64,
    },
    Message {
        msg: u64,
        from: u64,
        body: Vec<u8>,
    },
}

impl Seen {
    fn msg(&self) -> u64 {
        match self {
            Seen::Event { msg, .. } | Seen::Message { msg, .. } => *msg,
        }
    }
}

fn login2(addr: std::net::SocketAddr, user: u64) -> Client {
    Client::login_version(addr, &token(user), VERSION_2)
        .unwrap_or_else(|e| panic!("v2 login of {user} failed: {e}"))
        .0
}

fn send(c: &mut Client, g: GroupFrame<&[u8]>) {
    c.send_frame(&Frame::Group(g)).unwrap();
}

/// The next frame that is not a group copy or receipt (copies are
/// answered and kept in `seen`, per group; receipts are skipped).
fn next_answer(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>) -> OwnedFrame {
    loop {
        let f = c.recv().expect("a frame");
        if !take_copy(c, &f, seen) && !matches!(f, OwnedFrame::Group(GroupFrame::Receipt { .. })) {
            return f;
        }
    }
}

/// Answers a group copy with DELIVERED and records it; false if `f` is
/// not one.
fn take_copy(c: &mut Client, f: &OwnedFrame, seen: &mut HashMap<u64, Vec<Seen>>) -> bool {
    let (server_id, group, s) = match f {
        OwnedFrame::Group(GroupFrame::Deliver {
            server_id,
            group,
            msg,
            from,
            body,
            ..
        }) => (
            *server_id,
            *group,
            Seen::Message {
                msg: *msg,
                from: *from,
                body: body.clone(),
            },
        ),
        OwnedFrame::Group(GroupFrame::Event {
            server_id,
            group,
            msg,
            actor,
            event,
            subject,
            ..
        }) => (
            *server_id,
            *group,
            Seen::Event {
                msg: *msg,
                event: *event,
                actor: *actor,
                subject: *subject,
            },
        ),
        _ => return false,
    };
    c.send_delivered(server_id).unwrap();
    seen.entry(group).or_default().push(s);
    true
}

/// Group copies until the connection is quiet: a PING answered, the PONG
/// after everything sent before it.
fn drain(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>) {
    c.send_frame(&Frame::Ping { nonce: 77 }).unwrap();
    loop {
        let f = c.recv().expect("a frame");
        if let OwnedFrame::Pong { nonce: 77 } = f {
            return;
        }
        let receipt = matches!(f, OwnedFrame::Group(GroupFrame::Receipt { .. }));
        assert!(receipt || take_copy(c, &f, seen), "unexpected {f:?}");
    }
}

/// Copies of `group` until `n` are seen in all.
fn wait_copies(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, group: u64, n: usize) {
    while seen.get(&group).map_or(0, Vec::len) < n {
        let f = c.recv().expect("a frame");
        let receipt = matches!(f, OwnedFrame::Group(GroupFrame::Receipt { .. }));
        assert!(receipt || take_copy(c, &f, seen), "unexpected {f:?}");
    }
}

fn ok(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, req: u64) -> u64 {
    match next_answer(c, seen) {
        OwnedFrame::Group(GroupFrame::Ok { req: r, group }) if r == req => group,
        other => panic!("expected GROUP_OK({req}), got {other:?}"),
    }
}

fn refused(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, id: u64, code: ErrorCode) {
    match next_answer(c, seen) {
        OwnedFrame::Error {
            code: got,
            client_id,
            ..
        } if (got, client_id) == (code, id) => {}
        other => panic!("expected ERROR({code}, {id}), got {other:?}"),
    }
}

fn acked(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, client_id: u64) -> u64 {
    match next_answer(c, seen) {
        OwnedFrame::Ack {
            client_id: id,
            server_id,
            ..
        } if id == client_id => server_id,
        other => panic!("expected ACK({client_id}), got {other:?}"),
    }
}

fn create(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, req: u64) -> u64 {
    send(c, GroupFrame::Create { req });
    ok(c, seen, req)
}

fn add(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, req: u64, group: u64, user: u64) {
    send(c, GroupFrame::Add { req, group, user });
    assert_eq!(ok(c, seen, req), group);
}

fn members(
    c: &mut Client,
    seen: &mut HashMap<u64, Vec<Seen>>,
    req: u64,
    group: u64,
) -> Vec<(u64, bool)> {
    send(c, GroupFrame::Members { req, group });
    let mut out = Vec::new();
    loop {
        match next_answer(c, seen) {
            OwnedFrame::Group(GroupFrame::List {
                req: r,
                group: g,
                left,
                entries,
            }) if (r, g) == (req, group) => {
                out.extend(list_entries(&entries));
                if left == 0 {
                    return out;
                }
            }
            other => panic!("expected GROUP_LIST, got {other:?}"),
        }
    }
}

fn group_send(c: &mut Client, client_id: u64, group: u64, body: &[u8]) {
    send(
        c,
        GroupFrame::Send {
            client_id,
            group,
            body,
        },
    );
}

/// Members on both shards of the default 2-shard server: 2 on shard 0, 2
/// on shard 1, the first on shard 0.
fn four_users() -> [u64; 4] {
    let a = users_on(0, SHARDS, 2);
    let b = users_on(1, SHARDS, 2);
    [a[0], b[0], a[1], b[1]]
}

#[test]
fn create_add_remove_leave_and_admin_follow_the_rules() {
    let srv = TestServer::start();
    let [a, b, c, d] = four_users();
    let mut s: [HashMap<u64, Vec<Seen>>; 4] = Default::default();
    let mut ca = login2(srv.addr, a);
    let mut cb = login2(srv.addr, b);
    let mut cd = login2(srv.addr, d);
    let g = create(&mut ca, &mut s[0], 1);
    assert_ne!(g, 0);
    add(&mut ca, &mut s[0], 2, g, b);
    add(&mut ca, &mut s[0], 3, g, c);
    // Adding again changes nothing.
    add(&mut ca, &mut s[0], 4, g, c);
    assert_eq!(
        members(&mut cb, &mut s[1], 5, g),
        [(a, true), (b, false), (c, false)]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    // A member who is not an admin changes nothing.
    send(
        &mut cb,
        GroupFrame::Add {
            req: 6,
            group: g,
            user: d,
        },
    );
    refused(&mut cb, &mut s[1], 6, ErrorCode::NotAdmin);
    send(
        &mut cb,
        GroupFrame::Remove {
            req: 7,
            group: g,
            user: c,
        },
    );
    refused(&mut cb, &mut s[1], 7, ErrorCode::NotAdmin);
    send(
        &mut cb,
        GroupFrame::Admin {
            req: 8,
            group: g,
            user: b,
            admin: true,
        },
    );
    refused(&mut cb, &mut s[1], 8, ErrorCode::NotAdmin);
    // A non-member neither: not even the list or a message.
    send(&mut cd, GroupFrame::Members { req: 9, group: g });
    refused(&mut cd, &mut s[3], 9, ErrorCode::NotMember);
    group_send(&mut cd, 10, g, b"let me in");
    refused(&mut cd, &mut s[3], 10, ErrorCode::NotMember);
    send(&mut cd, GroupFrame::Leave { req: 11, group: g });
    refused(&mut cd, &mut s[3], 11, ErrorCode::NotMember);
    // Unknown groups; members who are not there.
    send(
        &mut cd,
        GroupFrame::Add {
            req: 12,
            group: g + 1_000_000,
            user: d,
        },
    );
    refused(&mut cd, &mut s[3], 12, ErrorCode::UnknownGroup);
    send(
        &mut ca,
        GroupFrame::Remove {
            req: 13,
            group: g,
            user: d,
        },
    );
    refused(&mut ca, &mut s[0], 13, ErrorCode::NoSuchMember);
    // The last admin stays while others remain.
    send(&mut ca, GroupFrame::Leave { req: 14, group: g });
    refused(&mut ca, &mut s[0], 14, ErrorCode::LastAdmin);
    // b made admin may change things; a leaves.
    send(
        &mut ca,
        GroupFrame::Admin {
            req: 15,
            group: g,
            user: b,
            admin: true,
        },
    );
    ok(&mut ca, &mut s[0], 15);
    send(
        &mut cb,
        GroupFrame::Remove {
            req: 16,
            group: g,
            user: c,
        },
    );
    ok(&mut cb, &mut s[1], 16);
    send(&mut ca, GroupFrame::Leave { req: 17, group: g });
    ok(&mut ca, &mut s[0], 17);
    assert_eq!(members(&mut cb, &mut s[1], 18, g), [(b, true)]);
    // Every change was announced in order, to the members of its time
    // and to whoever left: a saw everything up to its leave.
    wait_copies(&mut ca, &mut s[0], g, 6);
    drain(&mut ca, &mut s[0]);
    let events: Vec<(GroupEvent, u64, u64)> = s[0][&g]
        .iter()
        .map(|e| match e {
            Seen::Event {
                event,
                actor,
                subject,
                ..
            } => (*event, *actor, *subject),
            other => panic!("no message was sent: {other:?}"),
        })
        .collect();
    assert_eq!(
        events,
        [
            (GroupEvent::Created, a, a),
            (GroupEvent::Added, a, b),
            (GroupEvent::Added, a, c),
            (GroupEvent::Admin, a, b),
            (GroupEvent::Removed, b, c),
            (GroupEvent::Left, a, a),
        ]
    );
    let msgs: Vec<u64> = s[0][&g].iter().map(Seen::msg).collect();
    assert_eq!(msgs, [1, 2, 3, 4, 5, 6]);
    // b joined at 2: it saw 2.. (its own addition too).
    wait_copies(&mut cb, &mut s[1], g, 5);
    drain(&mut cb, &mut s[1]);
    let b_msgs: Vec<u64> = s[1][&g].iter().map(Seen::msg).collect();
    assert_eq!(b_msgs, [2, 3, 4, 5, 6]);
    // c, offline all along, gets at login what happened from its
    // addition to its removal.
    let mut cc = login2(srv.addr, c);
    let mut sc = HashMap::new();
    wait_copies(&mut cc, &mut sc, g, 3);
    drain(&mut cc, &mut sc);
    let c_msgs: Vec<u64> = sc[&g].iter().map(Seen::msg).collect();
    assert_eq!(c_msgs, [3, 4, 5]);
    // The last member leaving deletes the group.
    send(&mut cb, GroupFrame::Leave { req: 19, group: g });
    ok(&mut cb, &mut s[1], 19);
    send(&mut cb, GroupFrame::Members { req: 20, group: g });
    refused(&mut cb, &mut s[1], 20, ErrorCode::UnknownGroup);
    // d was never disturbed: nothing came to it.
    drain(&mut cd, &mut s[3]);
    assert!(s[3].is_empty());
}

#[test]
fn every_member_gets_every_message_in_the_same_order_across_shards() {
    let srv = TestServer::start();
    let users = four_users();
    let mut cs: Vec<Client> = users.iter().map(|&u| login2(srv.addr, u)).collect();
    let mut s: Vec<HashMap<u64, Vec<Seen>>> = vec![HashMap::new(); 4];
    let g = create(&mut cs[0], &mut s[0], 1);
    for (i, &u) in users.iter().enumerate().skip(1) {
        add(&mut cs[0], &mut s[0], 1 + i as u64, g, u);
    }
    // Every member sends 20, pipelined, all at once.
    const EACH: u64 = 20;
    for (i, c) in cs.iter_mut().enumerate() {
        for k in 1..=EACH {
            group_send(c, 100 + k, g, format!("{i}:{k}").as_bytes());
        }
    }
    let mut acks = Vec::new();
    for i in 0..4 {
        for k in 1..=EACH {
            let (c, seen) = (&mut cs[i], &mut s[i]);
            acks.push(acked(c, seen, 100 + k));
        }
    }
    acks.sort_unstable();
    acks.dedup();
    assert_eq!(acks.len(), 4 * EACH as usize, "one number per message");
    let total = 1 + 3 + 4 * EACH as usize; // created, 3 added, messages
    for i in 0..4 {
        let want = if i == 0 { total } else { total - i };
        wait_copies(&mut cs[i], &mut s[i], g, want);
        drain(&mut cs[i], &mut s[i]);
    }
    // The same messages in the same order everywhere: the tail after the
    // last addition is identical, and numbers increase.
    let tail = |seen: &Vec<Seen>| seen[seen.len() - 4 * EACH as usize..].to_vec();
    let first = tail(&s[0][&g]);
    for seen in &s {
        let mine = &seen[&g];
        assert!(mine.windows(2).all(|w| w[0].msg() < w[1].msg()));
        assert_eq!(tail(mine), first);
    }
    // Each sender's messages keep the order it sent them in.
    for (i, &u) in users.iter().enumerate() {
        let ks: Vec<u64> = first
            .iter()
            .filter_map(|m| match m {
                Seen::Message { from, body, .. } if *from == u => {
                    let text = String::from_utf8(body.clone()).unwrap();
                    let (who, k) = text.split_once(':').unwrap();
                    assert_eq!(who, i.to_string());
                    Some(k.parse().unwrap())
                }
                _ => None,
            })
            .collect();
        assert_eq!(ks, (1..=EACH).collect::<Vec<_>>());
    }
}

#[test]
fn members_are_those_at_ordering_time_through_add_and_remove_races() {
    let srv = TestServer::start();
    let [a, b, c, d] = four_users();
    let mut ca = login2(srv.addr, a);
    let mut cb = login2(srv.addr, b);
    let mut cd = login2(srv.addr, d);
    let (mut sa, mut sb, mut sd) = (HashMap::new(), HashMap::new(), HashMap::new());
    let g = create(&mut ca, &mut sa, 1);
    add(&mut ca, &mut sa, 2, g, b);
    add(&mut ca, &mut sa, 3, g, c);
    // b sends a stream while a adds d and later removes c and d, all
    // pipelined: the home shard's order decides who gets what.
    for k in 1..=30u64 {
        group_send(&mut cb, k, g, &k.to_be_bytes());
        if k == 10 {
            send(
                &mut ca,
                GroupFrame::Add {
                    req: 4,
                    group: g,
                    user: d,
                },
            );
        }
        if k == 20 {
            send(
                &mut ca,
                GroupFrame::Remove {
                    req: 5,
                    group: g,
                    user: d,
                },
            );
            send(
                &mut ca,
                GroupFrame::Remove {
                    req: 6,
                    group: g,
                    user: c,
                },
            );
        }
    }
    for k in 1..=30 {
        acked(&mut cb, &mut sb, k);
    }
    for req in 4..=6 {
        ok(&mut ca, &mut sa, req);
    }
    drain(&mut ca, &mut sa);
    let all = &sa[&g];
    let at = |want: GroupEvent, who: u64| {
        all.iter()
            .find_map(|e| match e {
                Seen::Event {
                    msg,
                    event,
                    subject,
                    ..
                } if *event == want && *subject == who => Some(*msg),
                _ => None,
            })
            .unwrap()
    };
    let (d_in, d_out, c_out) = (
        at(GroupEvent::Added, d),
        at(GroupEvent::Removed, d),
        at(GroupEvent::Removed, c),
    );
    // d gets exactly what was ordered while it was a member. Its copies
    // come over a ring from the group's home shard, so a PING to d's own
    // shard proves nothing until they are all in.
    let want: Vec<u64> = all
        .iter()
        .map(Seen::msg)
        .filter(|&m| (d_in..=d_out).contains(&m))
        .collect();
    wait_copies(&mut cd, &mut sd, g, want.len());
    drain(&mut cd, &mut sd);
    let got: Vec<u64> = sd[&g].iter().map(Seen::msg).collect();
    assert_eq!(got, want);
    // c (offline) gets everything from its addition to its removal.
    let mut cc = login2(srv.addr, c);
    let mut sc = HashMap::new();
    let c_in = at(GroupEvent::Added, c);
    let want: Vec<u64> = all
        .iter()
        .map(Seen::msg)
        .filter(|&m| (c_in..=c_out).contains(&m))
        .collect();
    wait_copies(&mut cc, &mut sc, g, want.len());
    drain(&mut cc, &mut sc);
    let got: Vec<u64> = sc[&g].iter().map(Seen::msg).collect();
    assert_eq!(got, want);
}

#[test]
fn receipts_name_the_members_and_come_batched() {
    let srv = TestServer::start();
    let [a, b, c, d] = four_users();
    let mut ca = login2(srv.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    for (i, u) in [b, c, d].into_iter().enumerate() {
        add(&mut ca, &mut sa, 2 + i as u64, g, u);
    }
    drain(&mut ca, &mut sa);
    group_send(&mut ca, 10, g, b"hi all");
    let msg = acked(&mut ca, &mut sa, 10);
    // The members log in and answer (take_copy sends DELIVERED) and READ.
    let mut others = Vec::new();
    for u in [b, c, d] {
        let mut cu = login2(srv.addr, u);
        let mut su = HashMap::new();
        wait_copies(&mut cu, &mut su, g, 1);
        while !su[&g].iter().any(|x| x.msg() == msg) {
            let f = cu.recv().unwrap();
            assert!(take_copy(&mut cu, &f, &mut su), "{f:?}");
        }
        send(
            &mut cu,
            GroupFrame::Read {
                group: g,
                msg,
                from: a,
            },
        );
        others.push((cu, su));
    }
    // A READ of something never delivered is refused.
    let (cu, su) = &mut others[0];
    send(
        cu,
        GroupFrame::Read {
            group: g,
            msg: msg + 100,
            from: a,
        },
    );
    refused(cu, su, 0, ErrorCode::UnknownMessage);
    let mut delivered = Vec::new();
    let mut read = Vec::new();
    while delivered.len() < 3 || read.len() < 3 {
        match ca.recv().unwrap() {
            OwnedFrame::Group(GroupFrame::Receipt {
                kind,
                group,
                msg: m,
                members,
            }) => {
                assert_eq!((group, m), (g, msg));
                let who: Vec<u64> = list_users(&members).collect();
                assert!(!who.is_empty());
                match kind {
                    ReceiptKind::Delivered => delivered.extend(who),
                    ReceiptKind::Read => read.extend(who),
                }
            }
            f => assert!(take_copy(&mut ca, &f, &mut sa), "{f:?}"),
        }
    }
    delivered.sort_unstable();
    read.sort_unstable();
    let mut want = vec![b, c, d];
    want.sort_unstable();
    assert_eq!(delivered, want);
    assert_eq!(read, want);
}

#[test]
fn limits_refuse_with_their_error_and_disturb_nothing() {
    let srv = TestServer::start_with(|c| {
        c.group_members_max = 3;
        c.groups_per_user_max = 2;
    });
    let [a, b, c, d] = four_users();
    let mut ca = login2(srv.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    add(&mut ca, &mut sa, 2, g, b);
    add(&mut ca, &mut sa, 3, g, c);
    send(
        &mut ca,
        GroupFrame::Add {
            req: 4,
            group: g,
            user: d,
        },
    );
    refused(&mut ca, &mut sa, 4, ErrorCode::GroupFull);
    // Two groups per user per shard: a third is refused.
    create(&mut ca, &mut sa, 5);
    send(&mut ca, GroupFrame::Create { req: 6 });
    refused(&mut ca, &mut sa, 6, ErrorCode::TooManyGroups);
    // The group works as before.
    group_send(&mut ca, 7, g, b"still here");
    acked(&mut ca, &mut sa, 7);
    assert_eq!(members(&mut ca, &mut sa, 8, g).len(), 3);
}

#[test]
fn version_1_and_malformed_group_frames_close_with_a_clear_error() {
    let srv = TestServer::start();
    let [a, b, ..] = four_users();
    // Version 1: the types are unknown, as before groups.
    let mut c1 = srv.login(a);
    send(&mut c1, GroupFrame::Create { req: 1 });
    expect_error_then_close(&mut c1, ErrorCode::UnknownType);
    // Version 2: GROUP_ADMIN with admin 2 breaks the format.
    let mut c2 = login2(srv.addr, a);
    c2.send_raw(&[0x05, 0x24, 0x01, 0x02, 0x03, 0x02]).unwrap();
    expect_error_then_close(&mut c2, ErrorCode::Malformed);
    // A server-to-client group frame from a client is bad_state.
    let mut c3 = login2(srv.addr, b);
    send(&mut c3, GroupFrame::Ok { req: 1, group: 2 });
    expect_error_then_close(&mut c3, ErrorCode::BadState);
    // A GROUP_SEND body past body_bytes_max - 20 is too_large.
    let mut c4 = login2(srv.addr, b);
    let body = vec![0u8; 65000 - 19];
    group_send(&mut c4, 1, 1, &body);
    expect_error_then_close(&mut c4, ErrorCode::TooLarge);
}

fn spawn(dir: &Path) -> TernChild {
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2"]);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(["--durability", "fsync"]);
    TernChild::expect_start(cmd)
}

#[test]
fn membership_and_acknowledged_messages_survive_kill_9_during_fan_out() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c, d] = four_users();
    let child = spawn(dir.path());
    let mut ca = login2(child.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    for (i, u) in [b, c, d].into_iter().enumerate() {
        add(&mut ca, &mut sa, 2 + i as u64, g, u);
    }
    // A burst of messages; killed as soon as the last ACK is read, while
    // the fan-out is under way.
    const N: u64 = 200;
    for k in 1..=N {
        group_send(&mut ca, k, g, &k.to_be_bytes());
    }
    let mut acked_msgs = Vec::new();
    for k in 1..=N {
        acked_msgs.push(acked(&mut ca, &mut sa, k));
    }
    drop(ca);
    child.kill9();

    let child = spawn(dir.path());
    let mut ca = login2(child.addr, a);
    let mut sa2 = HashMap::new();
    // The membership is there.
    let mut m = members(&mut ca, &mut sa2, 100, g);
    m.sort_unstable();
    let mut want = vec![(a, true), (b, false), (c, false), (d, false)];
    want.sort_unstable();
    assert_eq!(m, want);
    // Every member gets every acknowledged message: duplicates only as
    // documented (same group and msg).
    for u in [b, c, d] {
        let mut cu = login2(child.addr, u);
        let mut su = HashMap::new();
        let mut got = std::collections::BTreeSet::new();
        while !acked_msgs.iter().all(|m| got.contains(m)) {
            let f = cu.recv().unwrap();
            assert!(take_copy(&mut cu, &f, &mut su), "{f:?}");
            for s in &su[&g] {
                if let Seen::Message { msg, from, body } = s {
                    assert_eq!(*from, a);
                    assert_eq!(body.len(), 8);
                    got.insert(*msg);
                }
            }
        }
    }
    // New changes go on after the restart.
    send(
        &mut ca,
        GroupFrame::Remove {
            req: 101,
            group: g,
            user: d,
        },
    );
    ok(&mut ca, &mut sa2, 101);
    assert_eq!(members(&mut ca, &mut sa2, 102, g).len(), 3);
}

/// Bytes of the message log's segment files of each shard under `dir`.
fn segment_bytes(dir: &Path) -> [u64; 2] {
    let mut out = [0; 2];
    for (shard, bytes) in out.iter_mut().enumerate() {
        let shard_dir = dir.join("data").join(format!("shard-{shard}"));
        for e in std::fs::read_dir(&shard_dir).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().ends_with(".log") {
                *bytes += e.metadata().unwrap().len();
            }
        }
    }
    out
}

/// A message to 40 offline members on both shards is stored with its body
/// once per shard (docs/PROTOCOL.md, "Groups": a small record per member),
/// and every member still gets it, body and all, after a kill -9.
#[test]
fn a_group_body_is_stored_once_per_shard_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn(dir.path());
    let a = users_on(0, SHARDS, 1)[0];
    let offline: Vec<u64> = users_on(0, SHARDS, 21)[1..]
        .iter()
        .chain(&users_on(1, SHARDS, 20))
        .copied()
        .collect();
    let mut ca = login2(child.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    for (i, &u) in offline.iter().enumerate() {
        add(&mut ca, &mut sa, 2 + i as u64, g, u);
    }
    const BODY: usize = 4000;
    let body: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
    group_send(&mut ca, 1, g, &body);
    let msg = acked(&mut ca, &mut sa, 1);
    // Each shard's copy of the body reaches its log with its member
    // records (one write): wait for both.
    while segment_bytes(dir.path()).iter().any(|&b| b < BODY as u64) {
        std::thread::yield_now();
    }
    // Written per member, the body alone would take 40 * 4000 bytes; once
    // per shard plus the membership events' copies it is far below half.
    let total: u64 = segment_bytes(dir.path()).iter().sum();
    assert!(
        total < (offline.len() * BODY / 2) as u64,
        "{total} bytes of log for a {BODY}-byte body to {} members",
        offline.len()
    );
    drop(ca);
    child.kill9();

    let child = spawn(dir.path());
    for &u in &offline {
        let mut cu = login2(child.addr, u);
        let mut su = HashMap::new();
        loop {
            let f = cu.recv().unwrap();
            assert!(take_copy(&mut cu, &f, &mut su), "{f:?}");
            let got = su[&g].iter().find_map(|s| match s {
                Seen::Message { msg: m, from, body } if *m == msg => Some((*from, body.clone())),
                _ => None,
            });
            if let Some((from, got)) = got {
                assert_eq!((from, got), (a, body.clone()), "member {u}");
                break;
            }
        }
    }
}

/// Segment bytes once they stopped changing for 300 ms (the fan-outs of
/// the last request are all written). A figure, not a test: no assertion
/// rests on the wait.
fn settled_segment_bytes(dir: &Path) -> u64 {
    let mut last = u64::MAX;
    loop {
        let now: u64 = segment_bytes(dir).iter().sum();
        if now == last {
            return now;
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// Messages queued on the server (`Queued` of `show info`).
fn queued(dir: &Path) -> u64 {
    let text = tern::stats::query(&dir.join("s.sock"), "show info").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Queued:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

/// The figure in results/groups/README.md ("Disk bytes per copy"): log
/// bytes a message to a 1000-member group adds, per member copy, with the
/// members offline (nothing delivered, nothing deleted). Run with
/// `cargo test -p tern --test groups disk_bytes_per_copy -- --ignored --nocapture`.
#[test]
#[ignore]
fn disk_bytes_per_copy_of_a_1000_member_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2"]);
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--stats-socket")
        .arg(dir.path().join("s.sock"))
        .args(["--durability", "fsync", "--queue-len-max", "100000"]);
    let child = TernChild::expect_start(cmd);
    let a = users_on(0, SHARDS, 1)[0];
    let offline: Vec<u64> = users_on(0, SHARDS, 500)[1..]
        .iter()
        .chain(&users_on(1, SHARDS, 500))
        .copied()
        .collect();
    let mut ca = login2(child.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    for (i, &u) in offline.iter().enumerate() {
        add(&mut ca, &mut sa, 2 + i as u64, g, u);
    }
    const MSGS: u64 = 20;
    let mut client_id = 0;
    for size in [100usize, 1000, 10000] {
        let before = settled_segment_bytes(dir.path());
        let queued_before = queued(dir.path());
        for _ in 0..MSGS {
            client_id += 1;
            group_send(&mut ca, client_id, g, &vec![7u8; size]);
            acked(&mut ca, &mut sa, client_id);
        }
        let copies = MSGS * offline.len() as u64;
        // Every copy queued (a shard's copies are in one batch), then written.
        while queued(dir.path()) < queued_before + copies {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let after = settled_segment_bytes(dir.path());
        println!(
            "body={size} msgs={MSGS} members={} copies={copies} log_bytes={} bytes_per_copy={:.1}",
            offline.len() + 1,
            after - before,
            (after - before) as f64 / copies as f64
        );
    }
    drop(ca);
    drop(child);
}

#[test]
fn the_client_library_speaks_groups() {
    let srv = TestServer::start();
    let [a, b, ..] = four_users();
    let mut ca = login2(srv.addr, a);
    let mut cb = login2(srv.addr, b);
    let g = ca.group_request(GroupFrame::Create { req: 1 }).unwrap();
    let added = ca
        .group_request(GroupFrame::Add {
            req: 2,
            group: g,
            user: b,
        })
        .unwrap();
    assert_eq!(added, g);
    let mut m = cb.group_members(3, g).unwrap();
    m.sort_unstable();
    let mut want = vec![(a, true), (b, false)];
    want.sort_unstable();
    assert_eq!(m, want);
    // A refusal comes back as the ERROR naming the request.
    match cb.group_request(GroupFrame::Remove {
        req: 4,
        group: g,
        user: a,
    }) {
        Err(tern_client::ClientError::Unexpected(OwnedFrame::Error {
            code: ErrorCode::NotAdmin,
            client_id: 4,
            ..
        })) => {}
        other => panic!("expected ERROR(not_admin, 4), got {other:?}"),
    }
    cb.group_send(5, g, b"from b").unwrap();
    let ack = cb
        .recv_until(|f| matches!(f, OwnedFrame::Ack { client_id: 5, .. }))
        .unwrap();
    let OwnedFrame::Ack { server_id: msg, .. } = ack else {
        unreachable!()
    };
    let copy = ca
        .recv_until(
            |f| matches!(f, OwnedFrame::Group(GroupFrame::Deliver { msg: m, .. }) if *m == msg),
        )
        .unwrap();
    let OwnedFrame::Group(GroupFrame::Deliver { from, body, .. }) = copy else {
        unreachable!()
    };
    assert_eq!((from, &body[..]), (b, &b"from b"[..]));
}

/// The ACK of GROUP_SEND `client_id`: (server_id, server_time_ms).
fn ack_of(c: &mut Client, seen: &mut HashMap<u64, Vec<Seen>>, client_id: u64) -> (u64, u64) {
    match next_answer(c, seen) {
        OwnedFrame::Ack {
            client_id: id,
            server_id,
            server_time_ms,
        } if id == client_id => (server_id, server_time_ms),
        other => panic!("expected ACK({client_id}), got {other:?}"),
    }
}

/// The group's messages `c` got up to and including the one whose body
/// is `last` (a group's messages come in order), as (msg, body).
fn messages_until(
    c: &mut Client,
    seen: &mut HashMap<u64, Vec<Seen>>,
    group: u64,
    last: &[u8],
) -> Vec<(u64, Vec<u8>)> {
    let got = |seen: &HashMap<u64, Vec<Seen>>| -> Vec<(u64, Vec<u8>)> {
        seen.get(&group)
            .into_iter()
            .flatten()
            .filter_map(|s| match s {
                Seen::Message { msg, body, .. } => Some((*msg, body.clone())),
                Seen::Event { .. } => None,
            })
            .collect()
    };
    while !got(seen).iter().any(|(_, b)| b == last) {
        let f = c.recv().expect("a frame");
        let receipt = matches!(f, OwnedFrame::Group(GroupFrame::Receipt { .. }));
        assert!(receipt || take_copy(c, &f, seen), "unexpected {f:?}");
    }
    got(seen)
}

#[test]
fn a_retried_group_send_is_taken_once_and_answered_with_its_first_ack() {
    let srv = TestServer::start();
    let [a, b, c, _] = four_users();
    let mut ca = login2(srv.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    add(&mut ca, &mut sa, 2, g, b);
    add(&mut ca, &mut sa, 3, g, c);
    let g2 = create(&mut ca, &mut sa, 4);

    // A retry on the same connection, after the ACK.
    group_send(&mut ca, 10, g, b"ten");
    let first = ack_of(&mut ca, &mut sa, 10);
    group_send(&mut ca, 10, g, b"ten");
    assert_eq!(ack_of(&mut ca, &mut sa, 10), first);
    // A retry right behind the first, before its commit: the same ACK.
    group_send(&mut ca, 11, g, b"eleven");
    group_send(&mut ca, 11, g, b"eleven");
    let eleven = ack_of(&mut ca, &mut sa, 11);
    assert_eq!(ack_of(&mut ca, &mut sa, 11), eleven);
    assert!(eleven.0 > first.0);
    // A retry after a reconnect (the first connection gone).
    drop(ca);
    let mut ca = login2(srv.addr, a);
    group_send(&mut ca, 10, g, b"ten");
    assert_eq!(ack_of(&mut ca, &mut sa, 10), first);
    // The same client_id for another group is refused, not taken.
    group_send(&mut ca, 11, g2, b"eleven");
    refused(&mut ca, &mut sa, 11, ErrorCode::StaleClientId);
    // 32 or more below the highest taken: stale; the connection stays.
    group_send(&mut ca, 60, g, b"sixty");
    let sixty = ack_of(&mut ca, &mut sa, 60);
    group_send(&mut ca, 11, g, b"eleven");
    refused(&mut ca, &mut sa, 11, ErrorCode::StaleClientId);
    group_send(&mut ca, 61, g, b"last");
    let last = ack_of(&mut ca, &mut sa, 61);

    // Every member (the sender too) got each message once.
    let want = vec![
        (first.0, b"ten".to_vec()),
        (eleven.0, b"eleven".to_vec()),
        (sixty.0, b"sixty".to_vec()),
        (last.0, b"last".to_vec()),
    ];
    for u in [b, c] {
        let mut cu = login2(srv.addr, u);
        let mut su = HashMap::new();
        assert_eq!(messages_until(&mut cu, &mut su, g, b"last"), want, "{u}");
    }
    assert_eq!(messages_until(&mut ca, &mut sa, g, b"last"), want);
    assert!(!sa.contains_key(&g2) || messages_until_none(&sa, g2));
}

/// Whether `group` had no message in `seen` (events only).
fn messages_until_none(seen: &HashMap<u64, Vec<Seen>>, group: u64) -> bool {
    seen[&group].iter().all(|s| matches!(s, Seen::Event { .. }))
}

#[test]
fn a_group_send_retried_after_kill_9_gets_its_original_ack() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, _, _] = four_users();
    let child = spawn(dir.path());
    let mut ca = login2(child.addr, a);
    let mut sa = HashMap::new();
    let g = create(&mut ca, &mut sa, 1);
    add(&mut ca, &mut sa, 2, g, b);
    group_send(&mut ca, 5, g, b"five");
    let five = ack_of(&mut ca, &mut sa, 5);
    drop(ca);
    child.kill9();

    let child = spawn(dir.path());
    let mut ca = login2(child.addr, a);
    let mut sa = HashMap::new();
    group_send(&mut ca, 5, g, b"five");
    assert_eq!(ack_of(&mut ca, &mut sa, 5), five);
    group_send(&mut ca, 40, g, b"forty");
    let forty = ack_of(&mut ca, &mut sa, 40);
    assert!(forty.0 > five.0);
    group_send(&mut ca, 5, g, b"five");
    refused(&mut ca, &mut sa, 5, ErrorCode::StaleClientId);
    // The member got "five" under one number only (a copy sent again
    // after the restart is the same message), and nothing else but
    // "forty".
    let mut cb = login2(child.addr, b);
    let mut sb = HashMap::new();
    let mut got = messages_until(&mut cb, &mut sb, g, b"forty");
    got.dedup();
    assert_eq!(
        got,
        [(five.0, b"five".to_vec()), (forty.0, b"forty".to_vec())]
    );
}
