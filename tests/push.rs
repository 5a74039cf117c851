//! Push notices for offline devices (issue 11, docs/OPERATIONS.md "Push for
//! offline devices"), against a real HTTP gateway this test runs on
//! loopback: the notice's fields and signature, spacing and folding per
//! device, batches, a full queue, a gateway that fails or is gone, and
//! delivery that never waits on any of it.
//!
//! The server runs one shard, so the order of SENDs is the order of their
//! notices; an ACK comes after its message's notice was offered, so once a
//! test holds the ACKs, the notices are in the push queue.

mod common;

use std::net::TcpListener;
use std::sync::mpsc;

use common::gateway::{Answer, Gateway};
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tern::config::Config;
use tern_client::Client;

/// The push secret of these tests.
const PUSH_SECRET: &str = "push-secret-0123456789";

/// A one-shard server pushing to `url`, changed by `tweak`.
fn server(url: String, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.shards = 1;
        c.push_url = Some(url);
        c.push_secret = Some(PUSH_SECRET.into());
        c.push_interval_ms = 60_000;
        c.push_retry_backoff_ms = 10;
        c.push_timeout_ms = 30_000;
        tweak(c);
    })
}

/// Sends one message from `client` and waits for its ACK; returns the
/// server time of the ACK.
fn send_acked(client: &mut Client, client_id: u64, to: u64, body: &[u8]) -> u64 {
    client.send_msg(client_id, to, body).unwrap();
    match client.recv_until(
        |f| matches!(f, tern::proto::OwnedFrame::Ack { client_id: c, .. } if *c == client_id),
    ) {
        Ok(tern::proto::OwnedFrame::Ack { server_time_ms, .. }) => server_time_ms,
        other => panic!("expected ACK {client_id}, got {other:?}"),
    }
}

/// Hex HMAC-SHA256 of `body`, computed here, not by the server's code.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(PUSH_SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

#[test]
fn a_message_for_an_offline_user_posts_a_signed_notice_without_the_body() {
    let gateway = Gateway::start();
    let srv = server(gateway.url(), |_| {});
    let mut alice = srv.login(1);
    let time_ms = send_acked(&mut alice, 1, 2, b"the secret body");
    let r = gateway.next();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/push"));
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-tern-signature"], expected_signature(&r.body));
    assert_eq!(r.notices(), [(2, 0, 1, time_ms)]);
    assert!(r.json()["sent_ms"].as_u64().unwrap() >= time_ms);
    let body = String::from_utf8(r.body.clone()).unwrap();
    assert!(!body.contains("secret"), "the body leaked: {body}");
    // The message itself waits as ever.
    let mut bob = srv.login(2);
    assert_eq!(recv_deliver(&mut bob).body, b"the secret body");
    srv.wait_info("Push_sent", |n| n == 1);
    assert_eq!(srv.info_u64("Push_posts"), 1);
    assert_eq!(srv.metric_sum("tern_push_sent_total"), 1);
}

#[test]
fn one_post_per_device_per_interval_later_messages_fold_into_the_next() {
    let gateway = Gateway::start();
    let srv = server(gateway.url(), |_| {});
    let mut alice = srv.login(1);
    for i in 1..=5 {
        send_acked(&mut alice, i, 2, b"x");
    }
    // A notice for user 3 after them: once it is POSTed, the four later
    // notices for user 2 were taken, and folded (user 2 is spaced for 60 s).
    send_acked(&mut alice, 6, 3, b"x");
    let seen = gateway.until_user(3);
    let for_2: Vec<_> = seen.iter().filter(|r| r.users().contains(&2)).collect();
    assert_eq!(for_2.len(), 1, "{seen:?}");
    // What that one POST said: a push thread slower than the five ACKs
    // (a busy box) folds them all into it; else the later ones wait.
    let posted = for_2[0].notices().iter().find(|n| n.0 == 2).unwrap().2;
    if posted == 5 {
        assert_eq!(srv.info_u64("Push_pending"), 0);
    } else {
        srv.wait_info("Push_pending", |n| n == 1);
    }

    // With a short interval the folded count arrives in a later POST.
    drop(srv);
    let srv = server(gateway.url(), |c| c.push_interval_ms = 200);
    let mut alice = srv.login(1);
    for i in 1..=5 {
        send_acked(&mut alice, i, 2, b"x");
    }
    let mut waiting = Vec::new();
    while waiting.last() != Some(&5) {
        let r = gateway.next();
        waiting.extend(r.notices().iter().map(|n| n.2));
    }
    assert!(waiting.windows(2).all(|w| w[0] < w[1]), "{waiting:?}");
}

#[test]
fn devices_due_together_share_a_post_and_delivery_never_waits_for_it() {
    let gateway = Gateway::start();
    let (release, held) = mpsc::channel();
    gateway.then(Answer::Hold(held));
    let srv = server(gateway.url(), |_| {});
    let mut alice = srv.login(1);
    let mut carol = srv.login(9);
    send_acked(&mut alice, 1, 2, b"x");
    // The push thread is stuck in this POST...
    assert_eq!(gateway.next().users(), [2]);
    for (i, to) in [3, 4, 5].into_iter().enumerate() {
        send_acked(&mut alice, 10 + i as u64, to, b"x");
    }
    // ...and messages still flow to who is online.
    send_acked(&mut alice, 20, 9, b"live");
    assert_eq!(recv_deliver(&mut carol).body, b"live");
    release.send(()).unwrap();
    assert_eq!(gateway.next().users(), [3, 4, 5]);
    srv.wait_info("Push_sent", |n| n == 4);
    assert_eq!(srv.info_u64("Push_posts"), 2);
}

#[test]
fn a_full_push_queue_drops_notices_and_counts_them_never_messages() {
    let gateway = Gateway::start();
    let (release, held) = mpsc::channel();
    gateway.then(Answer::Hold(held));
    let srv = server(gateway.url(), |c| c.push_queue_len_max = 1);
    let mut alice = srv.login(1);
    send_acked(&mut alice, 1, 2, b"x");
    assert_eq!(gateway.next().users(), [2]);
    // The thread waits on the gateway: one notice fits in the queue, the
    // other four are dropped.
    for (i, to) in [3, 4, 5, 6, 7].into_iter().enumerate() {
        send_acked(&mut alice, 10 + i as u64, to, b"x");
    }
    assert_eq!(srv.info_u64("Push_queue_full"), 4);
    assert_eq!(srv.metric_sum("tern_push_queue_full_total"), 4);
    release.send(()).unwrap();
    assert_eq!(gateway.next().users(), [3]);
    // Every message is kept all the same.
    for user in [4, 7] {
        let mut c = srv.login(user);
        assert_eq!(recv_deliver(&mut c).from, 1);
    }
}

#[test]
fn a_full_device_table_drops_notices_for_new_devices() {
    let gateway = Gateway::start();
    let srv = server(gateway.url(), |c| c.push_devices_max = 1);
    let mut alice = srv.login(1);
    send_acked(&mut alice, 1, 2, b"x");
    assert_eq!(gateway.next().users(), [2]);
    // User 2 is kept, spaced for 60 s: no room for user 3.
    send_acked(&mut alice, 2, 3, b"x");
    srv.wait_info("Push_table_full", |n| n == 1);
    assert_eq!(srv.metric_sum("tern_push_table_full_total"), 1);
    let mut carol = srv.login(3);
    assert_eq!(recv_deliver(&mut carol).from, 1);
}

#[test]
fn a_failing_gateway_is_retried_and_a_recovered_one_gets_later_notices() {
    let gateway = Gateway::start();
    gateway.then(Answer::Status(503));
    gateway.then(Answer::Status(500));
    let srv = server(gateway.url(), |c| {
        c.push_retries_max = 2;
        c.push_interval_ms = 100;
    });
    let mut alice = srv.login(1);
    let time_ms = send_acked(&mut alice, 1, 2, b"x");
    // Two failures, then the third attempt is taken.
    for _ in 0..3 {
        assert_eq!(gateway.next().notices(), [(2, 0, 1, time_ms)]);
    }
    srv.wait_info("Push_sent", |n| n == 1);
    assert_eq!(srv.info_u64("Push_post_failures"), 2);

    // Down for longer than the retries: the notice is given up...
    for _ in 0..3 {
        gateway.then(Answer::Status(503));
    }
    send_acked(&mut alice, 2, 3, b"x");
    for _ in 0..3 {
        assert_eq!(gateway.next().users(), [3]);
    }
    srv.wait_info("Push_given_up", |n| n == 1);
    // ...and once it is back, the next message's notice gets through,
    // counting both messages.
    send_acked(&mut alice, 3, 3, b"x");
    assert_eq!(gateway.next().notices()[0].2, 2);
    srv.wait_info("Push_sent", |n| n == 2);
}

#[test]
fn a_gateway_that_is_gone_costs_notices_not_messages() {
    // A port nobody listens on: every attempt is refused at connect.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = server(format!("http://127.0.0.1:{port}/push"), |c| {
        c.push_retries_max = 1;
    });
    let mut alice = srv.login(1);
    send_acked(&mut alice, 1, 2, b"kept");
    srv.wait_info("Push_given_up", |n| n == 1);
    assert_eq!(srv.info_u64("Push_post_failures"), 2);
    assert_eq!(srv.info_u64("Push_sent"), 0);
    let mut bob = srv.login(2);
    assert_eq!(recv_deliver(&mut bob).body, b"kept");
    send_acked(&mut alice, 2, 2, b"live");
    assert_eq!(recv_deliver(&mut bob).body, b"live");
}

#[test]
fn push_keys_are_checked_at_start() {
    let bad = |tweak: fn(&mut Config)| {
        let mut c = Config {
            push_url: Some("http://127.0.0.1:9/push".into()),
            push_secret: Some(PUSH_SECRET.into()),
            ..Config::default()
        };
        tweak(&mut c);
        c.validate().unwrap_err().key
    };
    assert_eq!(bad(|c| c.push_secret = Some("short".into())), "push_secret");
    assert_eq!(bad(|c| c.push_secret = None), "push_secret");
    assert_eq!(bad(|c| c.push_url = Some("ftp://x".into())), "push_url");
    assert_eq!(bad(|c| c.push_queue_len_max = 0), "push_queue_len_max");
    assert_eq!(bad(|c| c.push_batch_max = 0), "push_batch_max");
    assert_eq!(bad(|c| c.push_retries_max = 17), "push_retries_max");
    // Without a URL there is no push thread and no Push_ lines.
    let srv = TestServer::start();
    assert!(!srv.info().contains_key("Push_sent"));
}

#[test]
fn each_registered_offline_device_is_named_while_another_is_online() {
    let gateway = Gateway::start();
    let srv = server(gateway.url(), |_| {});
    let login = |device| {
        Client::login_version(srv.addr, &device_token(2, device), tern::proto::VERSION_2)
            .unwrap()
            .0
    };
    // User 2 registers devices 1, 2 and 3; only device 1 stays online.
    let mut phone = login(1);
    for device in [2, 3] {
        drop(login(device));
    }
    let online = || parse_info(&srv.query("show user 2"))["Devices_online"].clone();
    assert!(wait_for(|| online() == "1"), "{}", online());
    let mut alice = srv.login(1);
    let time_ms = send_acked(&mut alice, 1, 2, b"x");
    let mut named = Vec::new();
    while named.len() < 2 {
        named.extend(gateway.next().notices());
    }
    named.sort_unstable();
    assert_eq!(named, [(2, 2, 1, time_ms), (2, 3, 1, time_ms)]);
    // The online device has its message at once.
    assert_eq!(recv_deliver(&mut phone).body, b"x");
}
