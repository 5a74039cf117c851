//! Durable receipts over real sockets (docs/PROTOCOL.md, "Receipts are
//! durable"): group receipts wait for a sender with no device online, and
//! a receipt on its way between two shards when the process is killed
//! still arrives (the receipt outbox, docs/ARCHITECTURE.md). The server is
//! the real binary, so it can be killed with SIGKILL.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use common::child::{serve_command, TernChild, TERN};
use common::*;
use tern::proto::group::list_users;
use tern::proto::{Frame, GroupFrame, OwnedFrame, ReceiptKind, VERSION_2};
use tern_client::Client;

/// `tern serve` on `dir` with `shards` shards, fsync durability and the
/// suite's I/O backend.
fn spawn(dir: &Path, shards: usize) -> TernChild {
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0"]);
    cmd.args(["--shards", &shards.to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(["--durability", "fsync"]);
    TernChild::expect_start(cmd)
}

fn login2(addr: std::net::SocketAddr, user: u64) -> Client {
    Client::login_version(addr, &token(user), VERSION_2)
        .unwrap_or_else(|e| panic!("v2 login of {user} failed: {e}"))
        .0
}

fn group(c: &mut Client, g: GroupFrame<&[u8]>) {
    c.send_frame(&Frame::Group(g)).unwrap();
}

/// `show user U` of the server on `dir`, as a map.
fn show_user(dir: &Path, user: u64) -> HashMap<String, String> {
    let text = tern::stats::query(&dir.join("s.sock"), &format!("show user {user}"))
        .unwrap_or_else(|e| panic!("show user {user}: {e}"));
    parse_info(&text)
}

/// Waits until `user` has no device online and `pending` receipts wait
/// for it.
fn wait_offline_with(dir: &Path, user: u64, pending: u64) {
    let mut last = HashMap::new();
    let ok = wait_for(|| {
        last = show_user(dir, user);
        last.get("Devices_online").is_some_and(|d| d.is_empty())
            && last.get("Receipts_pending").and_then(|p| p.parse().ok()) == Some(pending)
    });
    assert!(
        ok,
        "user {user} never offline with {pending} receipts: {last:?}"
    );
}

/// The next frame other than a group copy, which is answered DELIVERED
/// (the group's number of each message copy, not event, put in `msgs`).
fn next_not_copy(c: &mut Client, msgs: &mut Vec<u64>) -> OwnedFrame {
    loop {
        match c.recv().expect("a frame") {
            OwnedFrame::Group(GroupFrame::Deliver { server_id, msg, .. }) => {
                c.send_delivered(server_id).unwrap();
                msgs.push(msg);
            }
            OwnedFrame::Group(GroupFrame::Event { server_id, .. }) => {
                c.send_delivered(server_id).unwrap();
            }
            f => return f,
        }
    }
}

/// Reads (answering copies) until the copy of message `msg` came.
fn until_copy(c: &mut Client, msg: u64) {
    let mut msgs = Vec::new();
    let mut nonce = 100;
    while !msgs.contains(&msg) {
        nonce += 1;
        c.send_frame(&Frame::Ping { nonce }).unwrap();
        match next_not_copy(c, &mut msgs) {
            OwnedFrame::Pong { nonce: n } if n == nonce => {}
            f => panic!("unexpected {f:?}"),
        }
        if !msgs.contains(&msg) {
            // Not there yet: it crosses a ring.
            std::thread::yield_now();
        }
    }
}

/// Sends a PING and reads up to its PONG; the GROUP_RECEIPT frames read
/// on the way, as (kind, group, msg, members).
fn receipts_until_pong(c: &mut Client, nonce: u64) -> Vec<(ReceiptKind, u64, u64, Vec<u64>)> {
    receipts_and_copies(c, nonce, &mut Vec::new())
}

/// [`receipts_until_pong`], putting the group's numbers of the message
/// copies read on the way in `msgs`.
fn receipts_and_copies(
    c: &mut Client,
    nonce: u64,
    msgs: &mut Vec<u64>,
) -> Vec<(ReceiptKind, u64, u64, Vec<u64>)> {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    let mut out = Vec::new();
    loop {
        match next_not_copy(c, msgs) {
            OwnedFrame::Pong { nonce: n } if n == nonce => return out,
            OwnedFrame::Group(GroupFrame::Receipt {
                kind,
                group,
                msg,
                members,
            }) => out.push((kind, group, msg, list_users(&members).collect())),
            // 1:1 receipts: not what these callers count.
            OwnedFrame::Receipt { .. } => {}
            f => panic!("unexpected {f:?}"),
        }
    }
}

#[test]
fn group_receipts_wait_for_an_offline_sender_through_kill_9_and_reshard() {
    let dir = tempfile::tempdir().unwrap();
    // The sender on shard 0, members on both shards.
    let a = users_on(0, 2, 2);
    let b = users_on(1, 2, 2);
    let (sender, members) = (a[0], [b[0], a[1], b[1]]);
    let child = spawn(dir.path(), 2);
    let mut ca = login2(child.addr, sender);
    let mut copies = Vec::new();
    group(&mut ca, GroupFrame::Create { req: 1 });
    let g = match next_not_copy(&mut ca, &mut copies) {
        OwnedFrame::Group(GroupFrame::Ok { req: 1, group }) => group,
        f => panic!("{f:?}"),
    };
    for (i, &u) in members.iter().enumerate() {
        let req = 2 + i as u64;
        group(
            &mut ca,
            GroupFrame::Add {
                req,
                group: g,
                user: u,
            },
        );
        match next_not_copy(&mut ca, &mut copies) {
            OwnedFrame::Group(GroupFrame::Ok { req: r, .. }) if r == req => {}
            f => panic!("{f:?}"),
        }
    }
    group(
        &mut ca,
        GroupFrame::Send {
            client_id: 10,
            group: g,
            body: b"while you were away",
        },
    );
    match next_not_copy(&mut ca, &mut copies) {
        OwnedFrame::Ack { client_id: 10, .. } => {}
        f => panic!("{f:?}"),
    }
    // Its own copy carries the group's number of the message.
    while copies.is_empty() {
        assert!(receipts_and_copies(&mut ca, 1, &mut copies).is_empty());
    }
    let msg = copies[0];
    drop(ca);
    wait_offline_with(dir.path(), sender, 0);

    // Each member takes the message (DELIVERED) and reads it, while the
    // sender has no device online.
    for &u in &members {
        let mut cu = login2(child.addr, u);
        until_copy(&mut cu, msg);
        group(
            &mut cu,
            GroupFrame::Read {
                group: g,
                msg,
                from: sender,
            },
        );
        assert!(receipts_until_pong(&mut cu, 2).is_empty());
    }
    // Three members, delivered and read: six receipts wait, durably.
    wait_offline_with(dir.path(), sender, 6);
    child.kill9();

    // Moved to 3 shards on the way: the receipts move with their user.
    let status = Command::new(TERN)
        .args(["store", "reshard", "--shards", "3", "--data-dir"])
        .arg(dir.path().join("data"))
        .status()
        .expect("run tern store reshard");
    assert!(status.success(), "reshard failed: {status}");
    let child = spawn(dir.path(), 3);
    let mut ca = login2(child.addr, sender);
    // Right after LOGIN_OK, once, batched: a frame per kind naming all
    // three members.
    let got = receipts_until_pong(&mut ca, 3);
    let mut want: Vec<u64> = members.to_vec();
    want.sort_unstable();
    assert!(got.len() >= 2, "{got:?}");
    let mut first = got[..2].to_vec();
    first.sort_by_key(|r| r.0 as u8);
    for (r, kind) in first
        .iter_mut()
        .zip([ReceiptKind::Delivered, ReceiptKind::Read])
    {
        r.3.sort_unstable();
        assert_eq!(*r, (kind, g, msg, want.clone()));
    }
    // Later ones can only be repeats an outbox sent again at the start
    // (the kill may have come before it heard they arrived).
    for r in &got[2..] {
        assert!(
            (r.1, r.2) == (g, msg) && r.3.iter().all(|m| want.contains(m)),
            "{r:?}"
        );
    }
    drop(ca);
    wait_offline_with(dir.path(), sender, 0);
    let mut ca = login2(child.addr, sender);
    assert!(receipts_until_pong(&mut ca, 4).is_empty(), "given once");
}

/// Delivery receipts for `sender` read from `c` until a PONG, into `got`
/// (the server ids).
fn delivery_receipts(c: &mut Client, nonce: u64, got: &mut BTreeSet<u64>) {
    c.send_frame(&Frame::Ping { nonce }).unwrap();
    loop {
        match c.recv().expect("a frame") {
            OwnedFrame::Pong { nonce: n } if n == nonce => return,
            OwnedFrame::Receipt {
                kind: ReceiptKind::Delivered,
                server_id,
                ..
            } => {
                got.insert(server_id);
            }
            f => panic!("unexpected {f:?}"),
        }
    }
}

/// The ACK of `client_id` (its server id), the delivery receipts read
/// before it put in `got`.
fn ack_keeping_receipts(c: &mut Client, client_id: u64, got: &mut BTreeSet<u64>) -> u64 {
    loop {
        match c.recv().expect("a frame") {
            OwnedFrame::Ack {
                client_id: id,
                server_id,
                ..
            } if id == client_id => return server_id,
            OwnedFrame::Receipt {
                kind: ReceiptKind::Delivered,
                server_id,
                ..
            } => {
                got.insert(server_id);
            }
            f => panic!("expected ACK({client_id}), got {f:?}"),
        }
    }
}

#[test]
fn receipts_crossing_shards_at_a_kill_9_still_arrive() {
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    // The sender on shard 0, the recipient on shard 1: every receipt
    // crosses a ring.
    let (a, b) = cross_pair();
    let mut sent = BTreeSet::new();
    let mut got = BTreeSet::new();
    let mut child = spawn(dir.path(), 2);
    for round in 0..ROUNDS {
        // The sender gets what waited, sends a batch, and goes offline.
        let mut ca = login2(child.addr, a);
        delivery_receipts(&mut ca, 1, &mut got);
        for k in 0..PER_ROUND {
            let client_id = round * PER_ROUND + k + 1;
            ca.send_msg(client_id, b, &client_id.to_be_bytes()).unwrap();
        }
        // Receipts an outbox sent again at the start may come among the
        // ACKs: they count.
        let this_round: BTreeSet<u64> = (0..PER_ROUND)
            .map(|k| ack_keeping_receipts(&mut ca, round * PER_ROUND + k + 1, &mut got))
            .collect();
        sent.extend(&this_round);
        drop(ca);
        assert!(wait_for(|| show_user(dir.path(), a)
            .get("Devices_online")
            .is_some_and(|d| d.is_empty())));
        // The recipient answers everything it gets, and the server is
        // killed right after the last DELIVERED is written: some receipts
        // are on their way from shard 1 to shard 0.
        let mut cb = login2(child.addr, b);
        let mut left: BTreeSet<u64> = this_round;
        while !left.is_empty() {
            let d = recv_deliver(&mut cb);
            cb.send_delivered(d.server_id).unwrap();
            left.remove(&d.server_id);
        }
        child.kill9();
        child = spawn(dir.path(), 2);
    }
    // Whatever was not answered before a kill comes again: answered now.
    let mut cb = login2(child.addr, b);
    cb.send_frame(&Frame::Ping { nonce: 9 }).unwrap();
    loop {
        match cb.recv().expect("a frame") {
            OwnedFrame::Pong { nonce: 9 } => break,
            OwnedFrame::Deliver { server_id, .. } => cb.send_delivered(server_id).unwrap(),
            f => panic!("unexpected {f:?}"),
        }
    }
    // Every message has its delivery receipt (duplicates allowed): those
    // that waited come after LOGIN_OK, those sent again by an outbox at the
    // start as they arrive.
    let mut ca = login2(child.addr, a);
    while !sent.is_subset(&got) {
        match ca.recv_timeout(WAIT) {
            Ok(Some(OwnedFrame::Receipt {
                kind: ReceiptKind::Delivered,
                server_id,
                ..
            })) => {
                got.insert(server_id);
            }
            Ok(Some(f)) => panic!("unexpected {f:?}"),
            Ok(None) | Err(_) => {
                let lost: Vec<_> = sent.difference(&got).collect();
                panic!("{} receipts lost: {lost:?}", lost.len());
            }
        }
    }
}

/// Frames from the sender `c` up to the ACK of `client_id` (its `msg`):
/// own copies answered, GROUP_RECEIPT(delivered) members `peer` put in
/// `got` by msg.
fn group_ack_keeping_receipts(
    c: &mut Client,
    client_id: u64,
    peer: u64,
    got: &mut BTreeSet<u64>,
) -> u64 {
    let mut msgs = Vec::new();
    loop {
        match next_not_copy(c, &mut msgs) {
            OwnedFrame::Ack {
                client_id: id,
                server_id,
                ..
            } if id == client_id => return server_id,
            OwnedFrame::Group(GroupFrame::Receipt {
                kind: ReceiptKind::Delivered,
                msg,
                members,
                ..
            }) => {
                if list_users(&members).any(|m| m == peer) {
                    got.insert(msg);
                }
            }
            f => panic!("expected ACK({client_id}), got {f:?}"),
        }
    }
}

#[test]
fn group_receipts_crossing_shards_at_a_kill_9_still_arrive() {
    const ROUNDS: u64 = 3;
    const PER_ROUND: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    // The sender (and the group's home) on shard 0, the member on shard 1.
    let (a, b) = cross_pair();
    let mut child = spawn(dir.path(), 2);
    let mut ca = login2(child.addr, a);
    let mut msgs = Vec::new();
    group(&mut ca, GroupFrame::Create { req: 1 });
    let g = match next_not_copy(&mut ca, &mut msgs) {
        OwnedFrame::Group(GroupFrame::Ok { req: 1, group }) => group,
        f => panic!("{f:?}"),
    };
    group(
        &mut ca,
        GroupFrame::Add {
            req: 2,
            group: g,
            user: b,
        },
    );
    match next_not_copy(&mut ca, &mut msgs) {
        OwnedFrame::Group(GroupFrame::Ok { req: 2, .. }) => {}
        f => panic!("{f:?}"),
    }
    drop(ca);
    let mut sent = BTreeSet::new();
    let mut got = BTreeSet::new();
    for round in 0..ROUNDS {
        let mut ca = login2(child.addr, a);
        let mut this_round = BTreeSet::new();
        for k in 0..PER_ROUND {
            let client_id = round * PER_ROUND + k + 1;
            group(
                &mut ca,
                GroupFrame::Send {
                    client_id,
                    group: g,
                    body: &client_id.to_be_bytes(),
                },
            );
            this_round.insert(group_ack_keeping_receipts(&mut ca, client_id, b, &mut got));
        }
        sent.extend(&this_round);
        drop(ca);
        assert!(wait_for(|| show_user(dir.path(), a)
            .get("Devices_online")
            .is_some_and(|d| d.is_empty())));
        // The member answers its copies; killed right after the last
        // DELIVERED is written.
        let mut cb = login2(child.addr, b);
        let mut left = this_round;
        while !left.is_empty() {
            match cb.recv().expect("a frame") {
                OwnedFrame::Group(GroupFrame::Deliver { server_id, msg, .. }) => {
                    cb.send_delivered(server_id).unwrap();
                    left.remove(&msg);
                }
                OwnedFrame::Group(GroupFrame::Event { server_id, .. }) => {
                    cb.send_delivered(server_id).unwrap();
                }
                f => panic!("unexpected {f:?}"),
            }
        }
        child.kill9();
        child = spawn(dir.path(), 2);
    }
    // Whatever was not answered before a kill comes again: answered now.
    let mut cb = login2(child.addr, b);
    assert!(receipts_until_pong(&mut cb, 9).is_empty());
    // Every message has its receipt naming the member (repeats allowed).
    let mut ca = login2(child.addr, a);
    while !sent.is_subset(&got) {
        match ca.recv_timeout(WAIT) {
            Ok(Some(OwnedFrame::Group(GroupFrame::Receipt {
                kind: ReceiptKind::Delivered,
                msg,
                members,
                ..
            }))) => {
                if list_users(&members).any(|m| m == b) {
                    got.insert(msg);
                }
            }
            // Its own copies, not answered before a kill.
            Ok(Some(OwnedFrame::Group(GroupFrame::Deliver { server_id, .. }))) => {
                ca.send_delivered(server_id).unwrap();
            }
            Ok(Some(f)) => panic!("unexpected {f:?}"),
            Ok(None) | Err(_) => {
                let lost: Vec<_> = sent.difference(&got).collect();
                panic!("{} group receipts lost: {lost:?}", lost.len());
            }
        }
    }
}

/// Bytes of each shard's device log under `dir` once it stopped growing
/// (sampled until two reads agree). A figure, not a test: no assertion
/// rests on the wait.
fn settled_device_logs(dir: &Path, shards: usize) -> Vec<u64> {
    let read = || -> Vec<u64> {
        (0..shards)
            .map(|k| {
                let path = dir
                    .join("data")
                    .join(format!("shard-{k}"))
                    .join("devices.rec");
                std::fs::metadata(path).map_or(0, |m| m.len())
            })
            .collect()
    };
    let mut last = read();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The figures in results/receipts/README.md: device log bytes per
/// receipt waiting for an offline sender (on the sender's shard) and per
/// receipt that went through the outbox (on the recipient's shard), for
/// 1:1 receipts and for group receipts, members answering one at a time
/// and all online at once. Run with
/// `cargo test -p tern --test receipts log_bytes -- --ignored --nocapture`.
#[test]
#[ignore]
fn log_bytes_per_waiting_receipt() {
    const N: u64 = 200;
    const MEMBERS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let child = spawn(dir.path(), 2);
    let (a, b) = cross_pair();
    // 1:1: N messages from a (then offline) to b, delivered and read.
    let mut ca = login2(child.addr, a);
    for k in 1..=N {
        ca.send_msg(k, b, b"x").unwrap();
        recv_ack(&mut ca, k);
    }
    drop(ca);
    wait_offline_with(dir.path(), a, 0);
    let before = settled_device_logs(dir.path(), 2);
    let mut cb = login2(child.addr, b);
    for _ in 0..N {
        let d = recv_deliver(&mut cb);
        cb.send_delivered(d.server_id).unwrap();
        cb.send_read(d.server_id, a).unwrap();
    }
    wait_offline_with(dir.path(), a, 2 * N);
    let after = settled_device_logs(dir.path(), 2);
    println!(
        "1:1 receipts={} sender_shard_bytes_per_receipt={:.1} recipient_shard_outbox_bytes_per_receipt={:.1}",
        2 * N,
        (after[0] - before[0]) as f64 / (2 * N) as f64,
        (after[1] - before[1]) as f64 / (2 * N) as f64
    );
    drop(cb);
    // Groups: MEMBERS members on shard 1, answering one after another
    // (each receipt alone), then all online when the message comes.
    let members = users_on(1, 2, MEMBERS + 1)[1..].to_vec();
    let mut ca = login2(child.addr, a);
    // What waited from the 1:1 part, handed out.
    receipts_until_pong(&mut ca, 4);
    let mut msgs = Vec::new();
    group(&mut ca, GroupFrame::Create { req: 1 });
    let g = match next_not_copy(&mut ca, &mut msgs) {
        OwnedFrame::Group(GroupFrame::Ok { req: 1, group }) => group,
        f => panic!("{f:?}"),
    };
    for (i, &u) in members.iter().enumerate() {
        let req = 2 + i as u64;
        group(
            &mut ca,
            GroupFrame::Add {
                req,
                group: g,
                user: u,
            },
        );
        match next_not_copy(&mut ca, &mut msgs) {
            OwnedFrame::Group(GroupFrame::Ok { req: r, .. }) if r == req => {}
            f => panic!("{f:?}"),
        }
    }
    drop(ca);
    let mut clients: Vec<Client> = Vec::new();
    for (round, online) in [(1u64, false), (2, true)] {
        if online {
            clients = members.iter().map(|&u| login2(child.addr, u)).collect();
            for c in &mut clients {
                receipts_until_pong(c, 5);
            }
        }
        let mut ca = login2(child.addr, a);
        receipts_until_pong(&mut ca, 4);
        let client_id = 100 + round;
        group(
            &mut ca,
            GroupFrame::Send {
                client_id,
                group: g,
                body: b"x",
            },
        );
        match next_not_copy(&mut ca, &mut msgs) {
            OwnedFrame::Ack { client_id: id, .. } if id == client_id => {}
            f => panic!("{f:?}"),
        }
        msgs.clear();
        while msgs.is_empty() {
            receipts_and_copies(&mut ca, 6, &mut msgs);
        }
        let msg = msgs[0];
        drop(ca);
        wait_offline_with(dir.path(), a, 0);
        let before = settled_device_logs(dir.path(), 2);
        if online {
            for c in &mut clients {
                until_copy(c, msg);
            }
            for c in &mut clients {
                group(
                    c,
                    GroupFrame::Read {
                        group: g,
                        msg,
                        from: a,
                    },
                );
            }
        } else {
            for &u in &members {
                let mut c = login2(child.addr, u);
                until_copy(&mut c, msg);
                group(
                    &mut c,
                    GroupFrame::Read {
                        group: g,
                        msg,
                        from: a,
                    },
                );
                receipts_until_pong(&mut c, 7);
            }
        }
        wait_offline_with(dir.path(), a, 2 * MEMBERS as u64);
        let after = settled_device_logs(dir.path(), 2);
        println!(
            "group members={MEMBERS} answering={} receipts={} sender_shard_bytes_per_receipt={:.1} member_shard_outbox_bytes_per_receipt={:.1}",
            if online { "together" } else { "one_at_a_time" },
            2 * MEMBERS,
            (after[0] - before[0]) as f64 / (2 * MEMBERS) as f64,
            (after[1] - before[1]) as f64 / (2 * MEMBERS) as f64
        );
    }
}
