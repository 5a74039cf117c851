//! Operating the server: graceful shutdown of the real binary on SIGTERM,
//! the stats socket, and the `tern` command-line tools.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tern::config::Config;
use tern::proto::{ByeReason, OwnedFrame};
use tern_client::Client;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// `tern` with a clean environment for the variables it reads.
fn tern() -> Command {
    let mut cmd = Command::new(TERN);
    cmd.env_remove("TERN_TOKEN_SECRET").env("RUST_LOG", "info");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `tern serve` child process, killed if the test fails before it exits.
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Serve {
    fn spawn(stats_socket: &Path) -> Serve {
        let mut child = tern()
            .args(["serve", "--listen", "127.0.0.1:0", "--shards", "2"])
            .arg("--stats-socket")
            .arg(stats_socket)
            .arg("--data-dir")
            .arg(stats_socket.with_file_name("data"))
            .arg("--io")
            .arg(format!("{:?}", test_backend()).to_lowercase())
            .args(["--token-secret", SECRET, "--shutdown-grace-ms", "5000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern serve");
        // Read stderr on a thread, to the end, so the child never blocks on
        // a full pipe; the first `listening on ADDR` line gives the port.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, rest)) = line.split_once("listening on ") {
                    let addr = rest.split_once(": ").map_or(rest, |(a, _)| a);
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(WAIT) {
            Ok(addr) => addr
                .parse()
                .unwrap_or_else(|e| panic!("bad address {addr:?}: {e}")),
            Err(e) => {
                let _ = child.kill();
                panic!("tern serve never said `listening on`: {e}");
            }
        };
        Serve { child, addr }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) has no memory preconditions; the pid is our own
        // child, which has not been reaped yet (we hold its `Child`).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (bounded) for the process to exit and returns its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "tern serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, WAIT) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

#[test]
fn sigterm_says_bye_to_everyone_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::spawn(&dir.path().join("tern.sock"));
    let (a, b) = cross_pair();
    let (mut alice, _) = Client::login(serve.addr, &token(a)).unwrap();
    let (mut bob, _) = Client::login(serve.addr, &token(b)).unwrap();
    alice.ping(1).unwrap();
    bob.ping(2).unwrap();

    serve.signal(libc::SIGTERM);
    for client in [&mut alice, &mut bob] {
        match client.recv() {
            Ok(OwnedFrame::Bye {
                reason: ByeReason::Shutdown,
            }) => {}
            other => panic!("expected BYE(shutdown), got {other:?}"),
        }
    }
    // Both shards have begun shutting down (each sent a BYE), so neither
    // accepts any more, although the process still waits for its clients.
    assert!(
        refused(serve.addr),
        "a connect succeeded during graceful shutdown"
    );
    for client in [&mut alice, &mut bob] {
        let rest = client.wait_closed(WAIT).expect("closed after BYE");
        assert!(rest.is_empty(), "frames after BYE: {rest:?}");
    }
    drop((alice, bob));
    let status = serve.wait_exit();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(refused(serve.addr), "a connect succeeded after exit");
    assert!(
        !dir.path().join("tern.sock").exists(),
        "the stats socket was left behind"
    );
}

#[test]
fn stats_socket_reports_connections_messages_and_commands() {
    let srv = TestServer::start();
    let (a, b) = cross_pair();
    let mut alice = srv.login(a);
    let mut bob = srv.login(b);
    for i in 1..=3 {
        alice.send_msg(i, b, b"counted").unwrap();
        recv_ack(&mut alice, i);
    }
    for _ in 0..3 {
        let d = recv_deliver(&mut bob);
        bob.send_delivered(d.server_id).unwrap();
    }

    // show info
    srv.wait_info("Conns", |n| n == 2);
    srv.wait_info("Users_online", |n| n == 2);
    srv.wait_info("Msgs_in", |n| n == 3);
    srv.wait_info("Msgs_out", |n| n == 3);
    let info = srv.info();
    assert_eq!(
        info.get("Shards").map(String::as_str),
        Some("2"),
        "{info:?}"
    );
    assert_eq!(
        info.get("Panics").map(String::as_str),
        Some("0"),
        "{info:?}"
    );
    assert_eq!(
        info.get("Version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );

    // show shards: a header and one row per shard.
    let table = srv.query("show shards");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "header + 2 rows:\n{table}");
    assert_eq!(rows[0][0], "shard");
    assert_eq!(rows[1][0], "0");
    assert_eq!(rows[2][0], "1");
    let col = |name: &str| {
        rows[0]
            .iter()
            .position(|&h| h == name)
            .unwrap_or_else(|| panic!("no column {name}:\n{table}"))
    };
    let sum = |name: &str| -> u64 {
        let c = col(name);
        rows[1..].iter().map(|r| r[c].parse::<u64>().unwrap()).sum()
    };
    assert_eq!(sum("conns"), 2, "{table}");
    assert_eq!(sum("users"), 2, "{table}");
    assert_eq!(sum("msgs_in"), 3, "{table}");
    col("ring_full");

    // show metrics
    let metrics = srv.query("show metrics");
    for shard in 0..SHARDS {
        let series = format!("tern_msgs_in_total{{shard=\"{shard}\"}}");
        assert!(metrics.contains(&series), "no {series}:\n{metrics}");
    }
    assert!(metrics.contains("# TYPE tern_msgs_in_total counter"));
    assert_eq!(metric_sum(&metrics, "tern_msgs_in_total"), 3);
    assert_eq!(metric_sum(&metrics, "tern_users_online"), 2);

    // help and an unknown command
    let help = srv.query("help");
    for command in ["help", "show info", "show shards", "show metrics"] {
        assert!(help.contains(command), "help lacks {command}:\n{help}");
    }
    let unknown = srv.query("show everything");
    assert!(unknown.starts_with("Unknown command"), "{unknown}");

    // The same answers through `tern stats`.
    let out = run(tern().arg("stats").arg("--socket").arg(&srv.stats));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = parse_info(&text(&out.stdout));
    assert_eq!(info.get("Users_online").map(String::as_str), Some("2"));
    let out = run(tern()
        .arg("stats")
        .arg("--socket")
        .arg(&srv.stats)
        .args(["show", "shards"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 3);
}

#[test]
fn stats_cli_without_a_server_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(tern()
        .arg("stats")
        .arg("--socket")
        .arg(dir.path().join("nobody.sock")));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nobody.sock"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_accepts_good_files_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "queue_len_max = 10\nshards = 2\n").unwrap();
    let out = run(tern().arg("check-config").arg(&good));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let cases = [
        ("unknown.toml", "queu_len_max = 10\n", "queu_len_max"),
        ("zero.toml", "queue_len_max = 0\n", "queue_len_max"),
        (
            "relation.toml",
            "frame_bytes_max = 1000\nbody_bytes_max = 990\nconn_out_bytes_max = 100000\n",
            "body_bytes_max",
        ),
    ];
    for (file, body, key) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, body).unwrap();
        let out = run(tern().arg("check-config").arg(&path));
        assert!(!out.status.success(), "{file} passed the check");
        let err = text(&out.stderr);
        assert!(
            err.contains(key),
            "{file}: the error does not name {key}: {err}"
        );
    }
    let out = run(tern()
        .arg("check-config")
        .arg(dir.path().join("missing.toml")));
    assert!(!out.status.success());
}

/// A value of the wrong type is a bad key too: the error must say which.
#[test]
fn check_config_names_the_key_of_a_wrongly_typed_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("type.toml");
    std::fs::write(&path, "shards = 2\nidle_timeout_ms = \"soon\"\n").unwrap();
    let out = run(tern().arg("check-config").arg(&path));
    assert!(
        !out.status.success(),
        "a string idle_timeout_ms passed the check"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("idle_timeout_ms"),
        "the error does not name idle_timeout_ms: {err}"
    );
}

#[test]
fn token_cli_mints_tokens_the_server_accepts() {
    let out = run(tern().args([
        "token",
        "--user",
        "42",
        "--ttl",
        "1h",
        "--token-secret",
        SECRET,
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let minted = text(&out.stdout).trim().to_string();
    let now = tern::token::now_unix_s();
    assert_eq!(
        tern::token::verify(SECRET.as_bytes(), minted.as_bytes(), now),
        Ok(42)
    );
    // It expires about an hour from now, not a day.
    assert_eq!(
        tern::token::verify(SECRET.as_bytes(), minted.as_bytes(), now + 2 * 3600),
        Err(tern::token::TokenError::Expired)
    );
    // And a server with that secret lets user 42 in.
    let srv = TestServer::start();
    let (mut client, _) = Client::login(srv.addr, &minted).unwrap();
    client.ping(1).unwrap();

    let out = run(tern().args(["token", "--user", "0", "--token-secret", SECRET]));
    assert!(!out.status.success(), "user 0 got a token");
}

#[test]
fn print_config_prints_toml_that_parses_back() {
    let out = run(tern().args([
        "serve",
        "--print-config",
        "--token-secret",
        SECRET,
        "--queue-len-max",
        "77",
        "--shards",
        "3",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let config = Config::from_toml(&printed)
        .unwrap_or_else(|e| panic!("printed config does not parse: {e}\n{printed}"));
    assert_eq!(config.queue_len_max, 77);
    assert_eq!(config.shards, 3);
    assert_eq!(config.token_secret, SECRET);
    assert_eq!(
        Config {
            queue_len_max: 77,
            shards: 3,
            token_secret: SECRET.into(),
            ..Config::default()
        },
        config
    );

    // A bad flag value is refused like a bad file.
    let out = run(tern().args(["serve", "--print-config", "--ring-slots", "1"]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ring_slots"),
        "{}",
        text(&out.stderr)
    );
}

/// A second server on a port already served is refused: SO_REUSEPORT must
/// not let it silently take half of the first one's connections.
#[test]
fn second_server_on_the_same_port_is_refused() {
    let first = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.listen = first.addr;
    let err = match tern::server::Server::start(config) {
        Ok(_) => panic!("a second server started on {}", first.addr),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot listen on"), "{err}");
    // The first one still serves.
    let (a, b) = cross_pair();
    let mut alice = first.login(a);
    let _bob = first.login(b);
    alice.send_msg(1, b, b"still here").unwrap();
    recv_ack(&mut alice, 1);
}

/// The backend's own gauges: io_uring reports its rings and the fixed-file
/// slots its connections hold (and gives them back on close); poll reports
/// none of them.
#[test]
fn stats_socket_reports_the_backends_rings_and_slots() {
    let srv = TestServer::start();
    let users: Vec<u64> = (1..=10).map(|u| 90_000 + u).collect();
    let clients: Vec<_> = users.iter().map(|&u| srv.login(u)).collect();
    srv.wait_info("Users_online", |n| n == 10);
    let backend = srv.info().get("Backend").cloned().unwrap_or_default();
    if backend == "uring" {
        srv.wait_metric("tern_io_slots_used", |n| n >= 10);
        assert!(srv.metric_sum("tern_io_rings") >= SHARDS as u64);
        assert!(srv.metric_sum("tern_io_slots") >= srv.metric_sum("tern_io_slots_used"));
        drop(clients);
        srv.wait_metric("tern_io_slots_used", |n| n == 0);
    } else {
        assert!(backend.starts_with("poll"), "{backend}");
        for name in ["tern_io_rings", "tern_io_slots_used", "tern_io_slots"] {
            assert_eq!(srv.metric_sum(name), 0, "{name}");
        }
        assert_eq!(srv.metric_sum("tern_io_recv_no_buffers_total"), 0);
    }
}
