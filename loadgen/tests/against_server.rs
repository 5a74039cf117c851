//! Runs the `tern-loadgen` binary against a real Tern server started in this
//! process and checks its JSON report. No timings are asserted: only counts.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

struct TestServer {
    server: Option<Server>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: 2,
            stats_socket: dir.path().join("tern.sock"),
            data_dir: dir.path().join("data"),
            ..Default::default()
        })
        .expect("server starts");
        TestServer {
            server: Some(server),
            _dir: dir,
        }
    }

    fn addr(&self) -> String {
        self.server.as_ref().unwrap().local_addr().to_string()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.join();
        }
    }
}

/// Runs the load generator with `args` plus a JSON path; returns the exit
/// status and the parsed report.
fn loadgen(args: &[&str], json: &Path) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(args)
        .args([
            "--secret",
            DEV_TOKEN_SECRET,
            "--source",
            "127.0.0.1",
            "--quiet",
        ])
        .arg("--json")
        .arg(json)
        .output()
        .expect("tern-loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("no report ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    let v: Value = serde_json::from_str(&text).expect("report is JSON");
    let status = out.status.code().unwrap_or(-1);
    if status != 0 {
        eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    }
    (status, v)
}

fn engines() -> Vec<&'static str> {
    if cfg!(target_os = "linux") {
        vec!["uring", "poll"]
    } else {
        vec!["poll"]
    }
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

#[test]
fn chat_loses_nothing() {
    let server = TestServer::start();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-{engine}.json"));
        // Distinct users per engine so the two runs never share a queue.
        let base = (10_000_000 + i * 1_000_000).to_string();
        let (status, r) = loadgen(
            &[
                "chat",
                "--server",
                &addr,
                "--engine",
                engine,
                "--conns",
                "300",
                "--rate",
                "3000/s",
                "--msg-rate",
                "400/s",
                "--duration",
                "1500ms",
                "--drain",
                "20s",
                "--user-base",
                &base,
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: exit status");
        assert_eq!(r["scenario"], "chat");
        assert_eq!(r["engine"]["kind"], engine);
        assert!(r["command_line"].as_str().unwrap().contains("chat"));
        assert_eq!(u(&r, &["connections", "failed"]), 0, "{engine}: {r:#}");
        assert_eq!(u(&r, &["connections", "up_max"]), 300);
        assert_eq!(u(&r, &["counters", "login_ok"]), 300);
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert_eq!(scheduled, 600);
        assert_eq!(u(&r, &["messages", "sent"]), scheduled);
        assert_eq!(u(&r, &["messages", "acked"]), scheduled);
        assert_eq!(u(&r, &["messages", "delivered"]), scheduled);
        assert_eq!(u(&r, &["messages", "receipted"]), scheduled);
        assert_eq!(u(&r, &["messages", "lost"]), 0);
        assert_eq!(u(&r, &["messages", "duplicates"]), 0);
        assert_eq!(u(&r, &["messages", "out_of_order"]), 0);
        assert_eq!(u(&r, &["messages", "foreign"]), 0);
        for h in ["ack", "deliver", "receipt"] {
            assert_eq!(u(&r, &["latency_us", h, "count"]), scheduled, "{h}");
            assert!(!r["latency_us"][h]["spectrum"]
                .as_array()
                .unwrap()
                .is_empty());
        }
        assert_eq!(u(&r, &["latency_us", "login", "count"]), 300);
    }
}

#[test]
fn offline_messages_arrive_in_order() {
    let server = TestServer::start();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("offline.json");
    let (status, r) = loadgen(
        &[
            "offline",
            "--server",
            &addr,
            "--conns",
            "40",
            "--per-user",
            "5",
            "--msg-rate",
            "1000/s",
            "--user-base",
            "30000000",
        ],
        &json,
    );
    assert_eq!(status, 0);
    assert_eq!(u(&r, &["connections", "failed"]), 0, "{r:#}");
    assert_eq!(u(&r, &["messages", "scheduled"]), 200);
    assert_eq!(u(&r, &["messages", "acked"]), 200);
    assert_eq!(u(&r, &["messages", "delivered"]), 200);
    assert_eq!(u(&r, &["messages", "lost"]), 0);
    assert_eq!(u(&r, &["messages", "out_of_order"]), 0);
    // The receivers were told how many messages waited for them.
    assert_eq!(u(&r, &["offline", "login_ok_offline_count_sum"]), 200);
}

#[test]
fn storm_recovers_and_closes_cleanly() {
    let server = TestServer::start();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("storm.json");
    let (status, r) = loadgen(
        &[
            "storm",
            "--server",
            &addr,
            "--conns",
            "200",
            "--rate",
            "2000/s",
            "--hold",
            "200ms",
            "--jitter",
            "300ms",
            "--rounds",
            "2",
            "--user-base",
            "40000000",
        ],
        &json,
    );
    assert_eq!(status, 0, "{r:#}");
    let rounds = r["storm"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert_eq!(round["recovered"], true);
        assert_eq!(u(round, &["up"]), 200);
    }
    // 200 at the ramp and 200 after each storm.
    assert_eq!(u(&r, &["counters", "login_ok"]), 600);
    assert_eq!(u(&r, &["counters", "closed_by_us"]), 600);
}

#[test]
fn connect_fails_cleanly_without_a_server() {
    // Port 1 (tcpmux): nothing listens there. A freed ephemeral port would
    // not do: a server of a test running beside this one may get it.
    let server = "127.0.0.1:1".to_string();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("refused.json");
    let (status, r) = loadgen(
        &[
            "connect", "--server", &server, "--conns", "20", "--hold", "0",
        ],
        &json,
    );
    assert_eq!(status, 3, "connection failures give exit status 3: {r:#}");
    assert_eq!(u(&r, &["connections", "failed"]), 20, "{r:#}");
    assert_eq!(
        u(&r, &["connections", "failures", "connect:ECONNREFUSED"]),
        20
    );
}

/// `--tls`: the same chat over TLS 1.3, both engines, with a CA made here.
#[test]
fn chat_over_tls_loses_nothing() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "loadgen test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let (cert_path, key_path, ca_path) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    // The server refuses a private key others can read.
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let server = Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: cert_path,
        tls_key: key_path,
        shards: 2,
        stats_socket: dir.path().join("tern.sock"),
        data_dir: dir.path().join("data"),
        ..Default::default()
    })
    .expect("server starts");
    let tls_addr = server.tls_addr().unwrap().to_string();
    let ca_arg = ca_path.to_str().unwrap().to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-tls-{engine}.json"));
        let base = (20_000_000 + i * 1_000_000).to_string();
        let (status, r) = loadgen(
            &[
                "chat",
                "--server",
                &tls_addr,
                "--tls",
                "--tls-ca",
                &ca_arg,
                "--engine",
                engine,
                "--conns",
                "100",
                "--rate",
                "2000/s",
                "--msg-rate",
                "200/s",
                "--duration",
                "1000ms",
                "--drain",
                "20s",
                "--user-base",
                &base,
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: exit status");
        assert_eq!(u(&r, &["connections", "failed"]), 0, "{engine}: {r:#}");
        assert_eq!(u(&r, &["counters", "login_ok"]), 100);
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert!(scheduled > 0);
        assert_eq!(u(&r, &["messages", "delivered"]), scheduled);
        assert_eq!(u(&r, &["messages", "receipted"]), scheduled);
        assert_eq!(u(&r, &["messages", "lost"]), 0);
        assert_eq!(u(&r, &["messages", "out_of_order"]), 0);
    }
    // Without --tls-ca or --tls-insecure the run refuses to start.
    let json = dir.path().join("bad.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(["chat", "--server", &tls_addr, "--tls", "--conns", "1"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    server.shutdown();
    server.join();
}
