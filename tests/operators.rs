//! The operators' runtime commands over a real stats socket: `show user`,
//! `kick user`, `ban user` / `unban user` / `show bans` (across kill -9),
//! `trace user`, `set log level` and `drain`, with real clients on loopback. Kick, ban
//! and drain must lose no queued message: every message ACKed to a sender
//! is still there for its recipient afterwards.

mod common;

use std::collections::BTreeSet;

use common::child::{serve_command, TernChild};
use common::*;
use tern::proto::{ByeReason, ErrorCode, OwnedFrame};
use tern_client::{Client, ClientError};

/// Sends `n` messages from `sender` to `to` and returns their server ids.
fn send_acked(sender: &mut Client, to: u64, n: u64) -> BTreeSet<u64> {
    (0..n)
        .map(|i| {
            sender.send_msg(i + 1, to, &indexed_body(i, 16)).unwrap();
            recv_ack(sender, i + 1)
        })
        .collect()
}

/// Logs `user` in and reads DELIVERs until every id of `want` came,
/// answering each with DELIVERED; returns the client.
fn receive_all(addr: std::net::SocketAddr, user: u64, want: &BTreeSet<u64>) -> Client {
    let (mut client, info) = Client::login(addr, &token(user)).unwrap();
    assert_eq!(info.offline_count, want.len() as u64);
    let mut got = BTreeSet::new();
    while got.len() < want.len() {
        let d = recv_deliver(&mut client);
        client.send_delivered(d.server_id).unwrap();
        got.insert(d.server_id);
    }
    assert_eq!(&got, want);
    client
}

/// A `Key: value` answer as a map.
fn fields(text: &str) -> std::collections::HashMap<String, String> {
    parse_info(text)
}

#[test]
fn help_documents_every_operator_command() {
    let server = TestServer::start();
    let help = server.query("help");
    for command in [
        "show user U",
        "show conns [sort by queue|age|bytes] [limit N]",
        "kick user U",
        "ban user U [for DURATION]",
        "unban user U",
        "show bans",
        "trace user U [for DURATION] [bodies]",
        "set log level LEVEL",
        "drain [for DURATION]",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
    assert!(server
        .query("show user nobody")
        .starts_with("Not a user id"));
    assert!(server.query("drain for ever").starts_with("Not a duration"));
}

#[test]
fn show_user_then_kick_loses_nothing() {
    let server = TestServer::start();
    let (sender, recipient) = cross_pair();
    let offline = fields(&server.query(&format!("show user {recipient}")));
    assert_eq!(offline["Online"], "no");
    assert_eq!(offline["Queued"], "0");
    assert_eq!(offline["Shard"], "1");

    let mut to = server.login(recipient);
    let mut from = server.login(sender);
    let acked = send_acked(&mut from, recipient, 20);
    // Every DELIVER reaches the recipient, none is answered: all 20 are in
    // flight when the kick comes.
    for _ in 0..20 {
        recv_deliver(&mut to);
    }
    let online = fields(&server.query(&format!("show user {recipient}")));
    assert_eq!(online["Online"], "yes", "{online:?}");
    assert_eq!(online["Delivers_in_flight"], "20");
    assert_eq!(online["Queued"], "20");
    assert_eq!(online["Tls"], "no");
    assert_eq!(online["Banned"], "no");
    // One Session line per device online: the poll backend names the
    // client's address, io_uring keeps none ("-").
    let session = &online["Session"];
    assert!(
        session.starts_with("device=0 conn=") && session.contains(" transport=tcp "),
        "{session}"
    );
    assert!(
        session.ends_with(" delivers_in_flight=20 out_pending_bytes=0"),
        "{session}"
    );
    let peer = session
        .split(' ')
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap();
    match server.info()["Backend"].as_str() {
        b if b.starts_with("poll") => assert!(peer.starts_with("127.0.0.1:"), "{session}"),
        _ => assert_eq!(peer, "-", "{session}"),
    }
    assert!(!online.contains_key("Last_seen_unix_ms"), "{online:?}");

    // show conns: the recipient's 20 waiting messages put it first.
    let conns = server.query("show conns sort by queue limit 1");
    let lines: Vec<&str> = conns.lines().collect();
    assert_eq!(lines[0], "Conns: 1 of 2 logged in, by queue", "{conns}");
    assert_eq!(
        lines[1],
        "shard conn user queued oldest_age_ms inflight out_pending_bytes"
    );
    let row: Vec<&str> = lines[2].split(' ').collect();
    assert_eq!(
        (row[0], row[2], row[3], row[5]),
        ("1", &*recipient.to_string(), "20", "20")
    );
    let by_bytes = server.query("show conns sort by bytes");
    assert!(
        by_bytes.starts_with("Conns: 2 of 2 logged in, by bytes\n"),
        "{by_bytes}"
    );
    assert!(server.query("show conns limit 5000").starts_with("Usage"));

    let kicked = server.query(&format!("kick user {recipient} support ticket 12"));
    assert_eq!(
        kicked,
        format!("User {recipient} closed with BYE(kicked).\n")
    );
    expect_bye_then_close(&mut to, ByeReason::Kicked);
    assert_eq!(
        server.query(&format!("kick user {recipient}")),
        format!("User {recipient} is not online.\n")
    );
    // Offline now: when it left is its last seen.
    let kicked_at = tern::token::now_unix_s() * 1000;
    let gone = fields(&server.query(&format!("show user {recipient}")));
    assert!(!gone.contains_key("Session"), "{gone:?}");
    let seen: u64 = gone["Last_seen_unix_ms"].parse().unwrap();
    assert!(
        seen + 60_000 > kicked_at && seen <= kicked_at + 1000,
        "{gone:?}"
    );
    // The sender is untouched, and the recipient gets all 20 again.
    let _to = receive_all(server.addr, recipient, &acked);
    from.send_msg(99, recipient, b"still here").unwrap();
    recv_ack(&mut from, 99);
}

#[test]
fn ban_refuses_logins_kicks_and_unban_lifts_it() {
    let server = TestServer::start();
    let (sender, recipient) = same_pair();
    let mut to = server.login(recipient);
    let mut from = server.login(sender);
    let answer = server.query(&format!("ban user {recipient} for 1h"));
    assert!(
        answer.starts_with(&format!("User {recipient} banned for 3600 s.")),
        "{answer}"
    );
    expect_bye_then_close(&mut to, ByeReason::Kicked);
    match Client::login(server.addr, &token(recipient)) {
        Err(ClientError::LoginRejected { code, text }) => {
            assert_eq!(code, ErrorCode::Banned);
            assert!(text.contains("banned"), "{text}");
        }
        other => panic!("a banned user logged in: {:?}", other.map(|c| c.1)),
    }
    // Messages to a banned user are still taken and kept.
    let acked = send_acked(&mut from, recipient, 5);
    let bans = server.query("show bans");
    assert!(bans.starts_with("Bans: 1 (at most 100000)\n"), "{bans}");
    assert_eq!(server.info()["Bans"], "1");
    let metrics = server.query("show metrics");
    assert!(metrics.contains("\ntern_bans 1\n"), "{metrics}");
    assert!(metrics.contains("\ntern_draining 0\n"), "{metrics}");
    assert!(
        bans.contains(&format!("\n{recipient} 3600 s left\n")),
        "{bans}"
    );
    assert_eq!(
        fields(&server.query(&format!("show user {recipient}")))["Banned"],
        "yes"
    );
    assert_eq!(
        server.query(&format!("unban user {recipient}")),
        format!("User {recipient} unbanned.\n")
    );
    assert!(server.query("show bans").starts_with("Bans: 0 "));
    assert_eq!(server.info()["Bans"], "0");
    let _to = receive_all(server.addr, recipient, &acked);
}

#[test]
fn a_ban_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("{:?}", test_backend()).to_lowercase();
    let command = || {
        let mut cmd =
            serve_command(&["--listen", "127.0.0.1:0", "--shards", "2", "--io", &backend]);
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--stats-socket")
            .arg(dir.path().join("tern.sock"));
        cmd
    };
    let user = 4242;
    let server = TernChild::expect_start(command());
    let sock = dir.path().join("tern.sock");
    let answer = tern::stats::query(&sock, &format!("ban user {user}")).unwrap();
    assert!(
        answer.starts_with(&format!("User {user} banned until unbanned.")),
        "{answer}"
    );
    server.kill9();
    let server = TernChild::expect_start(command());
    match Client::login(server.addr, &token(user)) {
        Err(ClientError::LoginRejected { code, .. }) => assert_eq!(code, ErrorCode::Banned),
        other => panic!("the ban was lost across kill -9: {:?}", other.map(|c| c.1)),
    }
    let bans = tern::stats::query(&sock, "show bans").unwrap();
    assert_eq!(bans, format!("Bans: 1 (at most 100000)\n{user} forever\n"));
    // Another user is not affected.
    Client::login(server.addr, &token(user + 1)).unwrap();
}

#[test]
fn trace_logs_a_users_frames() {
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("{:?}", test_backend()).to_lowercase();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2", "--io", &backend]);
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--stats-socket")
        .arg(dir.path().join("tern.sock"));
    let server = TernChild::expect_start(cmd);
    let sock = dir.path().join("tern.sock");
    let (traced, other) = cross_pair();
    let mut a = Client::login(server.addr, &token(traced)).unwrap().0;
    let mut b = Client::login(server.addr, &token(other)).unwrap().0;
    let answer = tern::stats::query(&sock, &format!("trace user {traced} for 1h bodies")).unwrap();
    assert_eq!(
        answer,
        format!("Tracing user {traced} for 3600 s: its frames and bodies go to the log.\n")
    );
    // Once a PING of the user shows in the log, its shard traces it.
    let mut nonce = 0;
    assert!(wait_for(|| {
        nonce += 1;
        a.send_frame(&tern::proto::Frame::Ping { nonce }).unwrap();
        server.log_text().contains(&format!("trace user {traced} "))
    }));
    a.send_msg(1, other, b"secret plans").unwrap();
    recv_ack(&mut a, 1);
    recv_deliver(&mut b);
    let send = format!("in SEND client_id=1 to={other} body=12 B \"secret plans\"");
    assert!(
        wait_for(|| {
            let log = server.log_text();
            log.contains(&send) && log.contains("out ACK Ack { client_id: 1")
        }),
        "{}",
        server.log_text()
    );
    // The other user is not traced, and a stopped trace logs no more.
    assert!(!server.log_text().contains(&format!("trace user {other} ")));
    let stopped = tern::stats::query(&sock, &format!("trace user {traced} for 0s")).unwrap();
    assert_eq!(stopped, format!("User {traced} is not traced.\n"));
}

#[test]
fn set_log_level() {
    let server = TestServer::start();
    assert_eq!(
        server.query("set log level warn"),
        "Log level set to WARN.\n"
    );
    assert_eq!(log::max_level(), log::LevelFilter::Warn);
    assert_eq!(
        server.query("set log level info"),
        "Log level set to INFO.\n"
    );
    assert!(server
        .query("set log level chatty")
        .starts_with("Unknown log level"));
}

#[test]
fn drain_refuses_new_connections_closes_sessions_and_keeps_messages() {
    let server = TestServer::start();
    let (sender, recipient) = cross_pair();
    let idle: Vec<u64> = users_on(0, SHARDS, 3)
        .into_iter()
        .chain(users_on(1, SHARDS, 3))
        .filter(|&u| u != sender && u != recipient)
        .collect();
    let mut idle: Vec<Client> = idle.iter().map(|&u| server.login(u)).collect();
    let mut to = server.login(recipient);
    let mut from = server.login(sender);
    let acked = send_acked(&mut from, recipient, 10);
    assert_eq!(server.info()["Draining"], "no");

    let answer = server.query("drain for 1s");
    assert!(answer.starts_with("Draining"), "{answer}");
    assert_eq!(server.info()["Draining"], "yes");
    assert_eq!(server.query("drain"), "Already draining.\n");
    // Every session ends with BYE(moving), the unanswered DELIVERs before it.
    let before_bye = expect_bye_then_close(&mut to, ByeReason::Moving);
    assert!(before_bye
        .iter()
        .all(|f| matches!(f, OwnedFrame::Deliver { .. })));
    expect_bye_then_close(&mut from, ByeReason::Moving);
    for client in &mut idle {
        expect_bye_then_close(client, ByeReason::Moving);
    }
    // A new connection is told to go elsewhere.
    let mut fresh = Client::connect(server.addr).unwrap();
    expect_bye_then_close(&mut fresh, ByeReason::Moving);
    // Nothing queued was lost.
    let user = fields(&server.query(&format!("show user {recipient}")));
    assert_eq!(user["Online"], "no");
    assert_eq!(user["Queued"], acked.len().to_string());
}

#[test]
fn drain_closes_idle_sessions_before_busy_ones() {
    let server = TestServer::start();
    let (busy, idle) = same_pair();
    let sender = users_on(0, SHARDS, 1)[0];
    // The busy session logs in first: closing in slot order would take it
    // first.
    let mut busy_client = server.login(busy);
    let mut idle_client = server.login(idle);
    let mut from = server.login(sender);
    // Three DELIVERs to `busy` stay unanswered: it is in the middle of
    // something.
    send_acked(&mut from, busy, 3);
    for _ in 0..3 {
        recv_deliver(&mut busy_client);
    }
    // Over 60 s, one of the two sessions of `busy`'s shard is due at once
    // and the second only after 30 s: the first must be the idle one.
    let answer = server.query("drain for 60s");
    assert!(answer.starts_with("Draining"), "{answer}");
    expect_bye_then_close(&mut idle_client, ByeReason::Moving);
    expect_bye_then_close(&mut from, ByeReason::Moving);
    let user = fields(&server.query(&format!("show user {busy}")));
    assert_eq!(user["Online"], "yes", "{user:?}");
    assert_eq!(user["Delivers_in_flight"], "3", "{user:?}");
}

#[test]
fn a_ban_kicks_every_device_of_the_user() {
    let server = TestServer::start();
    let (user, _) = same_pair();
    let login = |device| {
        Client::login_version(
            server.addr,
            &device_token(user, device),
            tern::proto::VERSION_2,
        )
    };
    let mut phone = login(1).expect("phone logs in").0;
    let mut laptop = login(2).expect("laptop logs in").0;
    let answer = server.query(&format!("ban user {user}"));
    assert!(
        answer.starts_with(&format!("User {user} banned")),
        "{answer}"
    );
    expect_bye_then_close(&mut phone, ByeReason::Kicked);
    expect_bye_then_close(&mut laptop, ByeReason::Kicked);
    match login(3) {
        Err(ClientError::LoginRejected { code, .. }) => assert_eq!(code, ErrorCode::Banned),
        other => panic!("a banned user's device logged in: {:?}", other.map(|c| c.1)),
    }
    // Both kicks and the refused login are counted (docs/OPERATIONS.md).
    let metrics = server.query("show metrics");
    assert_eq!(
        metric_sum(&metrics, "tern_kicks_total{", ""),
        2.0,
        "{metrics}"
    );
    let banned = "tern_login_failures_total{";
    assert_eq!(metric_sum(&metrics, banned, "reason=\"banned\""), 1.0);
}

/// The sum over shards of the samples of `family` (up to its `{`) whose
/// labels contain `label` ("" for all).
fn metric_sum(metrics: &str, family: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
