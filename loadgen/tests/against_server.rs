//! Runs the `tern-loadgen` binary against a real Tern server started in this
//! process and checks its JSON report. No timings are asserted: only counts.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

mod common;
use common::{engines, loadgen, loadgen_out, server_config, start_server, test_backend, u};

struct TestServer {
    server: Option<Server>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let server = start_server(server_config(dir.path()));
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
        assert_eq!(u(&r, &["messages", "duplicates_seen_by_app"]), 0);
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

/// Two chat runs with the same users against one server: the second run's
/// client ids start above the first's (a v2 server keeps them across runs),
/// so none of its SENDs is taken for a retry of the first run's or refused
/// `stale_client_id`; everything is delivered.
#[test]
fn a_second_run_with_the_same_users_loses_nothing() {
    let server = TestServer::start();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    for run in 0..2 {
        let json = dir.path().join(format!("run-{run}.json"));
        let (status, r) = loadgen(
            &[
                "chat",
                "--server",
                &addr,
                "--conns",
                "20",
                "--rate",
                "2000/s",
                "--msg-rate",
                "400/s",
                "--duration",
                "1s",
                "--drain",
                "20s",
                "--user-base",
                "30000000",
            ],
            &json,
        );
        assert_eq!(status, 0, "run {run}: exit status: {r:#}");
        assert_eq!(u(&r, &["connections", "failed"]), 0, "run {run}: {r:#}");
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert_eq!(u(&r, &["messages", "acked"]), scheduled, "run {run}");
        assert_eq!(u(&r, &["messages", "delivered"]), scheduled, "run {run}");
        assert_eq!(u(&r, &["messages", "lost"]), 0, "run {run}");
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

/// Receivers that stay offline for the whole run: no message can arrive
/// within the drain window. They are reported as not delivered within it
/// (late: the final drain logs the receivers in and takes them), never as
/// lost, and the exit status is 0. With the final drain skipped they are
/// unverified, still not lost.
#[test]
fn messages_missing_when_the_drain_window_closes_are_not_lost() {
    let server = TestServer::start();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    for (final_drain, base) in [("30s", "31000000"), ("0", "32000000")] {
        let json = dir.path().join(format!("late-{base}.json"));
        let (status, r, out) = loadgen_out(
            &[
                "offline",
                "--server",
                &addr,
                "--conns",
                "20",
                "--per-user",
                "5",
                "--msg-rate",
                "1000/s",
                "--login-receivers",
                "0",
                "--drain",
                "1s",
                "--final-drain",
                final_drain,
                "--user-base",
                base,
            ],
            &json,
        );
        assert_eq!(status, 0, "--final-drain {final_drain}: {out}\n{r:#}");
        let m = &r["messages"];
        assert_eq!(u(m, &["acked"]), 100, "{r:#}");
        assert_eq!(u(m, &["lost"]), 0, "{r:#}");
        assert_eq!(u(m, &["not_delivered_within_drain"]), 100, "{r:#}");
        assert!(
            out.contains("not delivered within the drain window"),
            "{out}"
        );
        assert!(out.contains("Rerun with a longer --drain."), "{out}");
        if final_drain == "0" {
            assert_eq!(u(m, &["unverified"]), 100, "{r:#}");
            assert_eq!(u(m, &["delivered_late"]), 0);
            assert_eq!(u(m, &["delivered"]), 0);
            assert_eq!(u(&r, &["counters", "final_drain_logins"]), 0);
        } else {
            assert_eq!(u(m, &["delivered_late"]), 100, "{r:#}");
            assert_eq!(u(m, &["unverified"]), 0, "{r:#}");
            assert_eq!(u(m, &["delivered"]), 100);
            assert_eq!(u(m, &["out_of_order"]), 0);
            assert_eq!(u(&r, &["counters", "final_drain_logins"]), 20);
            assert_eq!(u(&r, &["counters", "final_drain_drained"]), 20);
            assert_eq!(u(&r, &["counters", "final_drain_backlog"]), 100);
        }
    }
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

/// `connect --devices 2`: every connection logs in as one device of a
/// user shared with the next one, and all stay online (none replaced); with
/// one device more than the server's limit (4), the fifth of each user is
/// refused with `too_many_devices`.
#[test]
fn connect_with_devices_keeps_every_device_online() {
    let server = TestServer::start();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    for (devices, refused) in [("2", 0), ("5", 8)] {
        let json = dir.path().join(format!("devices-{devices}.json"));
        let (_, r) = loadgen(
            &[
                "connect",
                "--server",
                &addr,
                "--conns",
                "40",
                "--devices",
                devices,
                "--rate",
                "0",
                "--hold",
                "0",
                "--user-base",
                "41000000",
            ],
            &json,
        );
        assert_eq!(u(&r, &["counters", "login_ok"]), 40 - refused, "{r:#}");
        assert_eq!(u(&r, &["counters", "closed_by_server"]), 0, "{r:#}");
        assert_eq!(u(&r, &["connections", "failed"]), refused, "{r:#}");
        if refused > 0 {
            assert_eq!(
                u(&r, &["connections", "failures", "login:too_many_devices"]),
                refused,
                "{r:#}"
            );
        }
    }
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
    // The server refuses a private key that group or others can read.
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let server = start_server(Config {
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: cert_path,
        tls_key: key_path,
        ..server_config(dir.path())
    });
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

/// What the scripted server ([`FakeServer`]) does with the messages it ACKs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fake {
    /// Queues them and delivers nothing to a logged-in recipient; a login
    /// announces the queue and delivers it (a server slower than the window).
    DeliverOnLogin,
    /// Queues them; a login announces the queue but delivers nothing (a
    /// final drain that cannot finish).
    Stall,
    /// Forgets them: a login announces an empty queue (real loss).
    Forget,
}

/// A scripted server on a loopback port, speaking Tern's protocol with the
/// real codec: it accepts any token, ACKs every SEND and treats the message
/// as [`Fake`] says. It stops when dropped (every loop is bounded in time).
struct FakeServer {
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

/// Messages queued per user: (server_id, from, body).
type Queues = std::collections::HashMap<u64, Vec<(u64, u64, Vec<u8>)>>;

/// Longest a fake server or one of its connections lives.
const FAKE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);

impl FakeServer {
    fn start(mode: Fake) -> FakeServer {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let queues = Arc::new(Mutex::new(Queues::new()));
        let next_id = Arc::new(AtomicU64::new(1));
        let stop2 = stop.clone();
        let accept = std::thread::spawn(move || {
            let until = std::time::Instant::now() + FAKE_LIFETIME;
            let mut conns = Vec::new();
            while !stop2.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (stop, queues, next_id) =
                            (stop2.clone(), queues.clone(), next_id.clone());
                        conns.push(std::thread::spawn(move || {
                            fake_conn(sock, mode, &stop, &queues, &next_id)
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("fake server accept: {e}"),
                }
            }
            stop2.store(true, Ordering::Relaxed);
            for c in conns {
                let _ = c.join();
            }
        });
        FakeServer {
            addr,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// One connection of the fake server, until EOF, an error, or stop.
fn fake_conn(
    mut sock: std::net::TcpStream,
    mode: Fake,
    stop: &std::sync::atomic::AtomicBool,
    queues: &std::sync::Mutex<Queues>,
    next_id: &std::sync::atomic::AtomicU64,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    use tern::proto::{self, Frame, Limits};
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    let until = std::time::Instant::now() + FAKE_LIFETIME;
    let limits = Limits::default();
    let mut user = 0u64;
    let mut inbuf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
        match sock.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return,
        }
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = proto::decode(&inbuf[at..], &limits).expect("valid frames")
        {
            at += used;
            match frame {
                Frame::Login { token, .. } => {
                    // "v1.<user>.<expiry>.<mac>": the user is all we need.
                    let token = std::str::from_utf8(token).unwrap();
                    user = token.split('.').nth(1).unwrap().parse().unwrap();
                    let queued = match mode {
                        Fake::DeliverOnLogin => {
                            queues.lock().unwrap().remove(&user).unwrap_or_default()
                        }
                        Fake::Stall | Fake::Forget => Vec::new(),
                    };
                    let offline_count = match mode {
                        Fake::Stall => queues.lock().unwrap().get(&user).map_or(0, |q| q.len()),
                        _ => queued.len(),
                    } as u64;
                    proto::encode(
                        &Frame::LoginOk {
                            server_time_ms: 0,
                            offline_count,
                        },
                        &mut out,
                    );
                    for (server_id, from, body) in &queued {
                        proto::encode(
                            &Frame::Deliver {
                                server_id: *server_id,
                                from: *from,
                                server_time_ms: 0,
                                client_id: None,
                                body,
                            },
                            &mut out,
                        );
                    }
                }
                Frame::Send {
                    client_id,
                    to,
                    body,
                } => {
                    let server_id = next_id.fetch_add(1, Ordering::Relaxed);
                    if mode != Fake::Forget {
                        queues.lock().unwrap().entry(to).or_default().push((
                            server_id,
                            user,
                            body.to_vec(),
                        ));
                    }
                    proto::encode(
                        &Frame::Ack {
                            client_id,
                            server_id,
                            server_time_ms: 0,
                        },
                        &mut out,
                    );
                }
                Frame::Ping { nonce } => proto::encode(&Frame::Pong { nonce }, &mut out),
                _ => {}
            }
        }
        inbuf.drain(..at);
        if sock.write_all(&out).is_err() {
            return;
        }
    }
}

/// A chat whose messages the server holds back until their recipients log in
/// again: every one is missing when the drain window closes, the final drain
/// (recipients close their connection, log in again, take their queue)
/// delivers them all: late, not lost, exit status 0. Both engines.
#[test]
fn chat_messages_held_past_the_window_arrive_late_in_the_final_drain() {
    let server = FakeServer::start(Fake::DeliverOnLogin);
    let dir = tempfile::tempdir().unwrap();
    for engine in engines() {
        let json = dir.path().join(format!("held-{engine}.json"));
        let (status, r, out) = loadgen_out(
            &[
                "chat",
                "--server",
                &server.addr,
                "--engine",
                engine,
                "--conns",
                "6",
                "--msg-rate",
                "100/s",
                "--duration",
                "300ms",
                "--drain",
                "300ms",
                "--final-drain",
                "30s",
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: {out}\n{r:#}");
        let m = &r["messages"];
        let acked = u(m, &["acked"]);
        assert_eq!(acked, 30, "{engine}: {r:#}");
        assert_eq!(u(m, &["delivered_late"]), acked, "{engine}: {r:#}");
        assert_eq!(u(m, &["delivered"]), acked);
        assert_eq!(u(m, &["lost"]), 0);
        assert_eq!(u(m, &["unverified"]), 0);
        assert_eq!(u(m, &["not_delivered_within_drain"]), acked);
        assert_eq!(u(m, &["out_of_order"]), 0);
        assert_eq!(u(&r, &["counters", "final_drain_backlog"]), acked);
        assert!(out.contains("Rerun with a longer --drain."), "{out}");
        assert!(!out.contains("LOST"), "{out}");
    }
}

/// A final drain that cannot finish (the server announces a backlog and
/// never delivers it) leaves the messages unverified, not lost: exit 0.
#[test]
fn a_final_drain_that_times_out_leaves_messages_unverified() {
    let server = FakeServer::start(Fake::Stall);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stall.json");
    let (status, r, out) = loadgen_out(
        &[
            "chat",
            "--server",
            &server.addr,
            "--engine",
            "poll",
            "--conns",
            "4",
            "--msg-rate",
            "100/s",
            "--duration",
            "200ms",
            "--drain",
            "200ms",
            "--final-drain",
            "500ms",
        ],
        &json,
    );
    assert_eq!(status, 0, "{out}\n{r:#}");
    let m = &r["messages"];
    assert_eq!(u(m, &["acked"]), 20, "{r:#}");
    assert_eq!(u(m, &["unverified"]), 20, "{r:#}");
    assert_eq!(u(m, &["lost"]), 0);
    assert_eq!(u(m, &["delivered_late"]), 0);
    assert_eq!(u(&r, &["counters", "final_drain_drained"]), 0);
    assert!(out.contains("20 unverified"), "{out}");
}

/// A server that ACKs and then forgets: the recipients log in again, are told
/// their queue is empty, and the messages are reported lost (exit status 1).
#[test]
fn messages_acked_and_forgotten_are_lost() {
    let server = FakeServer::start(Fake::Forget);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("forget.json");
    let (status, r, out) = loadgen_out(
        &[
            "chat",
            "--server",
            &server.addr,
            "--engine",
            "poll",
            "--conns",
            "4",
            "--msg-rate",
            "100/s",
            "--duration",
            "200ms",
            "--drain",
            "200ms",
            "--final-drain",
            "30s",
        ],
        &json,
    );
    assert_eq!(status, 1, "{out}\n{r:#}");
    let m = &r["messages"];
    assert_eq!(u(m, &["acked"]), 20, "{r:#}");
    assert_eq!(u(m, &["lost"]), 20, "{r:#}");
    assert_eq!(u(m, &["unverified"]), 0);
    assert_eq!(u(m, &["delivered_late"]), 0);
    assert_eq!(u(&r, &["exit_status"]), 1);
    assert!(out.contains("LOST: 20 messages"), "{out}");
}

/// Environment of [`memory_server_child`]: the address to listen on.
const CHILD_LISTEN_ENV: &str = "LOADGEN_TEST_CHILD_LISTEN";
/// Environment of [`memory_server_child`]: the directory for its stats socket.
const CHILD_DIR_ENV: &str = "LOADGEN_TEST_CHILD_DIR";

/// Not a test: the server process of
/// [`kill_9_of_a_memory_server_after_its_acks_is_reported_as_loss`], which
/// runs this test binary again with only this function. It starts a server
/// with `durability = "memory"`, prints its address and waits to be killed.
#[test]
#[ignore = "helper process, started by kill_9_of_a_memory_server_after_its_acks_is_reported_as_loss"]
fn memory_server_child() {
    let (Ok(listen), Some(dir)) = (
        std::env::var(CHILD_LISTEN_ENV),
        std::env::var_os(CHILD_DIR_ENV),
    ) else {
        eprintln!("memory_server_child runs only as the child of the kill -9 test");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let server = Server::start(Config {
        listen: listen.parse().unwrap(),
        shards: 2,
        stats_socket: dir.join(format!("tern-{}.sock", std::process::id())),
        data_dir: dir.join("data"),
        durability: tern::store::Durability::Memory,
        io: test_backend(),
        ..Default::default()
    })
    .expect("server starts");
    println!("LISTENING {}", server.local_addr());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    // The parent kills this process; if it never does, end anyway.
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// A [`memory_server_child`] process; SIGKILLed when dropped.
struct ChildServer {
    child: std::process::Child,
    addr: String,
}

impl ChildServer {
    /// Starts one listening on `listen` and waits (bounded) for its address.
    fn start(listen: &str, dir: &Path) -> ChildServer {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "memory_server_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_LISTEN_ENV, listen)
            .env(CHILD_DIR_ENV, dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the test binary runs again");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                // The harness may print "test NAME ... " on the same line.
                if let Some((_, a)) = line.split_once("LISTENING ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let mut server = ChildServer {
            child,
            addr: String::new(),
        };
        server.addr = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the child server starts listening");
        server
    }

    /// SIGKILL, then reap.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Real loss: a server with `durability = "memory"` ACKs messages for
/// offline receivers and is then killed with SIGKILL and restarted on the
/// same port. The receivers log in to it in the final drain, are told their
/// queue is empty, and every ACKed message is reported lost (exit status 1),
/// not as merely late.
#[test]
fn kill_9_of_a_memory_server_after_its_acks_is_reported_as_loss() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start("127.0.0.1:0", dir.path());
    let addr = server.addr.clone();
    let json = dir.path().join("kill9.json");
    let mut lg = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args([
            "offline",
            "--server",
            &addr,
            "--conns",
            "10",
            "--per-user",
            "3",
            "--msg-rate",
            "1000/s",
            "--login-receivers",
            "0",
            // The window in which the server is killed and restarted.
            "--drain",
            "5s",
            "--final-drain",
            "30s",
            "--max-time",
            "90s",
            "--user-base",
            "50000000",
            "--secret",
            DEV_TOKEN_SECRET,
            "--source",
            "127.0.0.1",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tern-loadgen runs");
    let stdout = lg.stdout.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let stderr = lg.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            // Printed once every SEND is answered, before the drain window.
            if line.contains("receivers stay offline") {
                let _ = tx.send(());
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let acked = rx.recv_timeout(std::time::Duration::from_secs(60));
    if acked.is_ok() {
        server.kill9();
        server = ChildServer::start(&addr, dir.path());
        assert_eq!(server.addr, addr);
    }
    let status = lg.wait().unwrap().code().unwrap_or(-1);
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        acked.is_ok(),
        "the loadgen never got its ACKs:\n{out}\n{err}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(status, 1, "lost messages give exit status 1:\n{out}\n{err}");
    let m = &r["messages"];
    assert_eq!(u(m, &["acked"]), 30, "{r:#}");
    assert_eq!(u(m, &["lost"]), 30, "{out}\n{err}\n{r:#}");
    assert_eq!(u(m, &["delivered_late"]), 0);
    assert_eq!(u(m, &["unverified"]), 0);
    assert_eq!(u(m, &["delivered"]), 0);
    assert_eq!(u(&r, &["counters", "final_drain_drained"]), 10);
    assert!(out.contains("LOST: 30 messages"), "{out}");
    drop(server);
}
