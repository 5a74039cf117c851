//! The operators' `kick user` and `drain` (issue 24) under chat load, checked
//! by the load generator's loss accounting: every message the server ACKed
//! reaches its recipient once, whatever the operator closed meanwhile.
//! `--cut-rate` puts every user in session mode (a closed connection
//! reconnects, resends its outbox, filters duplicates), as a real client
//! would after `BYE(kicked)` or `BYE(moving)`. Only counts are asserted.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

mod common;
use common::{engines, test_backend, u};

/// Chat users per run.
const CONNS: u64 = 60;

fn config(dir: &Path, listen: &str) -> Config {
    Config {
        listen: listen.parse().unwrap(),
        shards: 2,
        stats_socket: dir.join("tern.sock"),
        data_dir: dir.join("data"),
        io: test_backend(),
        ..Default::default()
    }
}

/// Starts `tern-loadgen chat` on `engine` for `CONNS` users from `base`, writing its
/// report to `json`.
fn chat(addr: &str, engine: &str, base: u64, duration: &str, json: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(["chat", "--server", addr, "--engine", engine])
        .args(["--conns", &CONNS.to_string(), "--rate", "2000/s"])
        .args(["--msg-rate", "300/s", "--duration", duration])
        // The smallest cut rate that turns session mode on; the closes
        // this test is about come from the operator.
        .args(["--cut-rate", "1/s", "--drain", "10s"])
        .args([
            "--user-base",
            &base.to_string(),
            "--secret",
            DEV_TOKEN_SECRET,
        ])
        .args(["--source", "127.0.0.1", "--quiet", "--json"])
        .arg(json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern-loadgen starts")
}

/// Waits for the load generator and returns its report.
fn report(child: Child, json: &Path) -> (Output, Value) {
    let out = child.wait_with_output().expect("tern-loadgen ends");
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "no report ({e})\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, serde_json::from_str(&text).expect("report is JSON"))
}

/// Waits (bounded) until `show info` on `sock` reports at least `conns`
/// connections, so the operator acts on logged-in users.
fn wait_for_conns(sock: &Path, conns: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = tern::stats::query(sock, "show info").unwrap_or_default();
        let have = info
            .lines()
            .find_map(|l| l.strip_prefix("Conns: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if have >= conns {
            return;
        }
        assert!(Instant::now() < deadline, "only {have} connections: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The report's failures: reason → count.
fn failures(r: &Value) -> BTreeMap<String, u64> {
    let map = r["connections"]["failures"]
        .as_object()
        .unwrap_or_else(|| panic!("no connections.failures in {r:#}"));
    map.iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

fn assert_nothing_lost(r: &Value) {
    assert_eq!(u(r, &["messages", "lost"]), 0, "{r:#}");
    assert_eq!(u(r, &["messages", "duplicates_seen_by_app"]), 0, "{r:#}");
    assert_eq!(u(r, &["messages", "foreign"]), 0, "{r:#}");
    let scheduled = u(r, &["messages", "scheduled"]);
    assert!(scheduled > 0, "{r:#}");
    // Session mode skips nothing: a closed sender's outbox keeps it.
    assert_eq!(u(r, &["messages", "sent"]), scheduled, "{r:#}");
}

#[test]
fn kicks_under_chat_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), "127.0.0.1:0")).expect("server starts");
    let sock = dir.path().join("tern.sock");
    let json = dir.path().join("kick.json");
    let base = 31_000_000;
    // The first engine (io_uring on Linux) here, the last (poll) below.
    let child = chat(
        &server.local_addr().to_string(),
        engines()[0],
        base,
        "3s",
        &json,
    );
    wait_for_conns(&sock, CONNS);
    // Kick a third of the users, a few at a time, while they chat.
    let mut kicked = 0;
    for user in (base..base + CONNS).step_by(3) {
        let answer = tern::stats::query(&sock, &format!("kick user {user} test")).unwrap();
        if answer.contains("closed with BYE(kicked)") {
            kicked += 1;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let (_, r) = report(child, &json);
    assert!(kicked > 0, "no kick took: {r:#}");
    // The only closes the run saw are the kicks, each explained by its BYE.
    assert_eq!(
        failures(&r),
        [("dropped:bye:kicked".to_string(), kicked)].into(),
        "{r:#}"
    );
    assert_nothing_lost(&r);
    server.shutdown();
    server.join();
}

#[test]
fn a_drain_then_restart_under_chat_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), "127.0.0.1:0")).expect("server starts");
    let addr = server.local_addr().to_string();
    let sock = dir.path().join("tern.sock");
    let json = dir.path().join("drain.json");
    let engine = *engines().last().unwrap();
    let child = chat(&addr, engine, 32_000_000, "4s", &json);
    wait_for_conns(&sock, CONNS);
    std::thread::sleep(Duration::from_millis(500));
    // Take the box out of service as an operator would: drain, wait until
    // every session is closed, stop it, start it again on the same store.
    let answer = tern::stats::query(&sock, "drain for 1s").unwrap();
    assert!(answer.starts_with("Draining"), "{answer}");
    wait_for(&sock, "Conns: 0");
    server.shutdown();
    server.join();
    let server = Server::start(config(dir.path(), &addr)).expect("server starts again");
    let (_, r) = report(child, &json);
    // Every session was closed with BYE(moving); while the box was out,
    // reconnects were refused (BYE(moving), or no listener during the
    // restart). No ACKed message may be lost for them.
    let failures = failures(&r);
    assert!(failures["dropped:bye:moving"] >= CONNS / 2, "{r:#}");
    let expected = [
        "dropped:bye:moving",
        "login:bye:moving",
        "connect:",
        "login:closed:",
    ];
    for why in failures.keys() {
        assert!(expected.iter().any(|e| why.starts_with(e)), "{why}: {r:#}");
    }
    assert_nothing_lost(&r);
    server.shutdown();
    server.join();
}

/// Waits (bounded) until `show info` holds `line`.
fn wait_for(sock: &Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = tern::stats::query(sock, "show info").unwrap_or_default();
        if info.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
