//! `Session` against a real server over real sockets: an outbox that waits
//! out a server that is down, and a link that a proxy cuts at random points
//! (before, in the middle of, and after frames) many times over.
//!
//! Every wait is bounded; nothing asserts how fast anything happened.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tern::config::Config;
use tern::server::Server;
use tern_client::session::{Event, Session, SessionConfig};

// The server crate's cutting proxy, shared rather than copied.
#[path = "../../tests/common/cut.rs"]
mod cut;
use cut::CuttingProxy;

const SECRET: &str = "session-test-secret-0123456789";
/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(30);

fn token(user: u64) -> String {
    tern::token::mint(SECRET.as_bytes(), user, tern::token::now_unix_s() + 3600)
}

fn config(dir: &std::path::Path, listen: SocketAddr) -> Config {
    Config {
        listen,
        shards: 2,
        stats_socket: dir.join("tern.sock"),
        data_dir: dir.join("data"),
        token_secret: SECRET.into(),
        shutdown_grace_ms: 200,
        ..Config::default()
    }
}

fn session(addr: SocketAddr, user: u64) -> Session {
    let mut c = SessionConfig::new(addr, &token(user));
    c.backoff_min = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(50);
    Session::new(c)
}

/// The sum of a Prometheus counter over the shards.
fn metric(server: &Server, name: &str) -> u64 {
    let text = tern::stats::query(server.stats_socket(), "show metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn outbox_waits_for_a_server_that_is_down_then_delivers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let mut alice = session(addr, 1);
    // No server yet: the messages wait in the outbox.
    let ids: Vec<u64> = (0..10)
        .map(|i| alice.send(2, format!("m{i}").as_bytes()).unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "client ids increase");
    let ev = alice.poll(Duration::from_millis(50)).unwrap();
    assert!(
        matches!(ev, Some(Event::Disconnected { .. })),
        "connect to a closed port: {ev:?}"
    );
    assert_eq!(alice.outbox_len(), 10);

    let server = Server::start(config(dir.path(), addr)).unwrap();
    let mut acked = Vec::new();
    let deadline = Instant::now() + WAIT;
    while acked.len() < 10 && Instant::now() < deadline {
        if let Some(Event::Acked { client_id, .. }) =
            alice.poll(Duration::from_millis(100)).unwrap()
        {
            acked.push(client_id);
        }
    }
    assert_eq!(acked, ids, "every message ACKed once, in order");
    assert_eq!(alice.outbox_len(), 0);

    let mut bob = session(addr, 2);
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 10 && Instant::now() < deadline {
        if let Some(Event::Message {
            server_id, body, ..
        }) = bob.poll(Duration::from_millis(100)).unwrap()
        {
            got.push(String::from_utf8(body).unwrap());
            bob.accept(server_id).unwrap();
        }
    }
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    drop((alice, bob));
    server.shutdown();
    server.join();
}

/// `name` from the environment, else `default`: the bigger runs in
/// results/exactly-once/ set them.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Exactly once: every message the app handed to the sending session is
/// shown to the receiving app once, in order, across random cuts (lost
/// ACKs are resent and answered with their original ACK by the v2 server;
/// re-deliveries are filtered). `TERN_CHAOS_MESSAGES` and `TERN_CHAOS_CUTS`
/// set the size (default 1000 and 200).
#[test]
fn random_cuts_deliver_every_message_exactly_once_in_order() {
    let messages = env_u64("TERN_CHAOS_MESSAGES", 1000);
    let cuts_max = env_u64("TERN_CHAOS_CUTS", 200);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let seed = std::env::var("TERN_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("TERN_CUT_SEED={seed}");
    let proxy = CuttingProxy::start(server.local_addr(), seed, cuts_max);
    let mut alice = session(proxy.addr, 11);
    let mut bob = session(proxy.addr, 12);

    let mut sent = 0u64;
    let mut acked = HashSet::new();
    let mut shown_ids = HashSet::new();
    let mut first_seen: Vec<u64> = Vec::new();
    let mut seen_bodies: HashMap<u64, u32> = HashMap::new();
    let deadline = Instant::now() + WAIT * 4 + Duration::from_millis(messages + cuts_max * 20);
    while (acked.len() as u64) < messages || (seen_bodies.len() as u64) < messages {
        assert!(
            Instant::now() < deadline,
            "stuck: {} sent, {} ACKed, {} received, {} cuts (seed {seed})",
            sent,
            acked.len(),
            seen_bodies.len(),
            proxy.cuts.load(Ordering::Relaxed)
        );
        if sent < messages && alice.outbox_len() < 20 {
            alice.send(12, &sent.to_le_bytes()).unwrap();
            sent += 1;
        }
        if let Some(Event::Acked { client_id, .. }) = alice.poll(Duration::from_millis(1)).unwrap()
        {
            acked.insert(client_id);
        }
        if let Some(Event::Message {
            server_id, body, ..
        }) = bob.poll(Duration::from_millis(1)).unwrap()
        {
            assert!(
                shown_ids.insert(server_id),
                "server id {server_id} shown twice"
            );
            let i = u64::from_le_bytes(body.try_into().unwrap());
            let n = seen_bodies.entry(i).or_default();
            if *n == 0 {
                first_seen.push(i);
            }
            *n += 1;
            bob.accept(server_id).unwrap();
        }
    }
    // Nothing lost, and in order.
    assert_eq!(first_seen, (0..messages).collect::<Vec<_>>(), "seed {seed}");
    assert!(
        proxy.cuts.load(Ordering::Relaxed) >= cuts_max / 2,
        "too few cuts to mean anything"
    );
    let duplicates: u32 = seen_bodies.values().map(|&n| n - 1).sum();
    let deduped = metric(&server, "tern_sends_deduped_total");
    eprintln!(
        "{messages} messages, {} cuts, {deduped} resent SENDs answered with their original ACK, \
         duplicates seen by the app: {duplicates} (seed {seed})",
        proxy.cuts.load(Ordering::Relaxed),
    );
    assert_eq!(duplicates, 0, "the app saw duplicates (seed {seed})");
    drop((alice, bob, proxy));
    server.shutdown();
    server.join();
}
