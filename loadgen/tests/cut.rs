//! `chat --cut-rate` against a real Tern server started in this process:
//! connections are cut at random while messages flow, and the per-user
//! session logic (tern_client::session_state) must still deliver every
//! message once to the app. Only counts are asserted, no timings.

use std::process::Command;

use serde_json::Value;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

mod common;
use common::{engines, test_backend, u};

#[test]
fn chat_with_cuts_loses_nothing_and_shows_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let io = test_backend();
    let server = Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        stats_socket: dir.path().join("tern.sock"),
        data_dir: dir.path().join("data"),
        io,
        ..Default::default()
    })
    .expect("server starts");
    let addr = server.local_addr().to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("cut-{engine}.json"));
        let base = (20_000_000 + i * 1_000_000).to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
            .args(["chat", "--server", &addr, "--engine", engine])
            .args(["--conns", "100", "--rate", "2000/s"])
            .args(["--msg-rate", "500/s", "--duration", "2s"])
            .args(["--cut-rate", "40/s", "--drain", "5s"])
            .args(["--user-base", &base, "--secret", DEV_TOKEN_SECRET])
            .args(["--source", "127.0.0.1", "--quiet", "--json"])
            .arg(&json)
            .output()
            .expect("tern-loadgen runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
            let stderr = String::from_utf8_lossy(&out.stderr);
            panic!("no report ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}")
        });
        let r: Value = serde_json::from_str(&text).expect("report is JSON");
        assert_eq!(out.status.code(), Some(0), "{engine}: {stdout}\n{r:#}");
        assert_eq!(r["chat"]["cut_rate_per_s"], 40.0);
        let cuts = u(&r, &["messages", "cuts"]);
        assert!(cuts > 0, "{engine}: no cut made: {r:#}");
        assert_eq!(u(&r, &["counters", "cuts"]), cuts);
        // Cut connections came back: more logins than connections.
        assert!(u(&r, &["counters", "login_ok"]) > 100, "{engine}: {r:#}");
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert_eq!(scheduled, 1000);
        // With sessions no message is skipped: a cut sender's outbox keeps it.
        assert_eq!(u(&r, &["messages", "sent"]), scheduled, "{engine}: {r:#}");
        assert_eq!(u(&r, &["messages", "skipped"]), 0);
        assert_eq!(u(&r, &["messages", "lost"]), 0, "{engine}: {r:#}");
        assert_eq!(
            u(&r, &["messages", "duplicates_seen_by_app"]),
            0,
            "{engine}: {r:#}"
        );
        assert_eq!(u(&r, &["messages", "foreign"]), 0);
        assert!(stdout.contains("cuts "), "{stdout}");
    }
    server.shutdown();
    server.join();
}
