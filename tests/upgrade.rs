//! Live upgrade (issue 14, first step: listeners and data directory) with
//! the real binary, over real sockets, on the suite's backend:
//!
//! - chatting clients (the self-healing client library) across three
//!   upgrades in a row to the same binary: every message sent is shown
//!   once, in each sender's order, nothing is refused at connect, the port
//!   stays the same and the generation counts up;
//! - a successor that exits at once (`/bin/false`) and one with a bad
//!   configuration: the old process never stops serving, its connections
//!   stay open and chat on, and it says why;
//! - TLS clients get BYE(upgrade), and the successor serves TLS on the
//!   handed-over port;
//! - a successor that fails after the old one released the data directory
//!   (its metrics port is taken): the old process starts again on the same
//!   listeners, and what was queued is still there.
//!
//! Every wait has a generous bound; nothing asserts how fast anything was.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::{serve_command, TernChild, TERN};
use common::*;
use tern::proto::ByeReason;
use tern_client::session::{Event, Session, SessionConfig};
use tern_client::Client;

fn io_flag() -> String {
    match test_backend() {
        tern::io::Backend::Auto => "auto",
        tern::io::Backend::Uring => "uring",
        tern::io::Backend::Poll => "poll",
    }
    .to_string()
}

/// `tern serve` on a fresh port with its data and stats socket in `dir`,
/// plus `extra` arguments.
fn start(dir: &Path, extra: &[&str]) -> TernChild {
    let io = io_flag();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2", "--io", &io]);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(extra);
    TernChild::expect_start(cmd)
}

/// `show info` as a map.
fn info(sock: &Path) -> HashMap<String, String> {
    parse_info(&tern::stats::query(sock, "show info").expect("show info"))
}

/// Kills whichever process answers on the stats socket at the end: the
/// successors are not the test's children (their parent exited).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(text) = tern::stats::query(&self.0, "show info") {
            if let Some(pid) = parse_info(&text).get("Pid").and_then(|p| p.parse().ok()) {
                if pid != std::process::id() as i32 {
                    // SAFETY: kill with a pid and a valid signal number.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Runs `tern upgrade` against `sock`: (exit status 0?, stdout + stderr).
fn upgrade(sock: &Path, binary: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(TERN);
    cmd.arg("upgrade").arg("--socket").arg(sock);
    if let Some(binary) = binary {
        cmd.arg("--binary").arg(binary);
    }
    let out = cmd.output().expect("run tern upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn session(addr: SocketAddr, user: u64) -> Session {
    let mut c = SessionConfig::new(addr, &token(user));
    c.backoff_min = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(50);
    Session::new(c)
}

#[test]
fn chatting_clients_survive_three_upgrades() {
    const PAIRS: u64 = 8;
    const UPGRADES: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    let addr = old.addr;
    let first_pid = info(&sock)["Pid"].clone();

    // Senders 1..=PAIRS write to recipients 1001..; each body is its index.
    let mut senders: Vec<Session> = (1..=PAIRS).map(|u| session(addr, u)).collect();
    let mut recipients: Vec<Session> = (1..=PAIRS).map(|u| session(addr, 1000 + u)).collect();
    let mut sent = vec![0u64; PAIRS as usize];
    let mut shown: Vec<Vec<u64>> = vec![Vec::new(); PAIRS as usize];

    // Upgrades run beside the chat; a prober connects all along.
    let done = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let upgrader = {
        let sock = sock.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            for _ in 0..UPGRADES {
                // Let some messages flow first (pacing, not a measurement).
                std::thread::sleep(Duration::from_millis(300));
                outcomes.push(upgrade(&sock, None));
            }
            done.store(true, Ordering::Release);
            outcomes
        })
    };
    let prober = {
        let (done, refused, probes) = (done.clone(), refused.clone(), probes.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                match TcpStream::connect_timeout(&addr, WAIT) {
                    Ok(_) => probes.fetch_add(1, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let deadline = Instant::now() + WAIT * 6;
    let mut byes = 0u64;
    let mut drops = vec![0u64; PAIRS as usize];
    loop {
        assert!(
            Instant::now() < deadline,
            "stuck: sent {sent:?}, shown {:?}; log:\n{}",
            shown.iter().map(Vec::len).collect::<Vec<_>>(),
            old.log_text()
        );
        let upgrading = !done.load(Ordering::Acquire);
        for (i, s) in senders.iter_mut().enumerate() {
            // Keep a few in flight while the upgrades run, then stop.
            if upgrading && s.outbox_len() < 3 {
                s.send(1000 + i as u64 + 1, &sent[i].to_le_bytes()).unwrap();
                sent[i] += 1;
            }
            match s.poll(Duration::from_millis(1)).unwrap() {
                Some(Event::Refused { code, text, .. }) => panic!("refused: {code} {text}"),
                // A sender writing when the BYE came may see the write
                // fail before it reads the BYE.
                Some(Event::Disconnected { reason }) => {
                    drops[i] += 1;
                    byes += u64::from(reason.contains("BYE(upgrade)"));
                }
                _ => {}
            }
        }
        for (i, r) in recipients.iter_mut().enumerate() {
            if let Some(Event::Message {
                server_id,
                from,
                body,
                ..
            }) = r.poll(Duration::from_millis(1)).unwrap()
            {
                assert_eq!(from, i as u64 + 1);
                shown[i].push(u64::from_le_bytes(body.try_into().unwrap()));
                r.accept(server_id).unwrap();
            }
        }
        let all_acked = senders.iter().all(|s| s.outbox_len() == 0);
        let all_shown = (0..PAIRS as usize).all(|i| shown[i].len() as u64 >= sent[i]);
        if !upgrading && all_acked && all_shown {
            break;
        }
    }
    let outcomes = upgrader.join().unwrap();
    prober.join().unwrap();
    for (ok, text) in &outcomes {
        assert!(ok, "tern upgrade failed: {text}\nlog:\n{}", old.log_text());
        assert!(text.starts_with("upgraded: pid"), "{text}");
    }
    eprintln!(
        "sent per sender {sent:?}; disconnects {drops:?}, {byes} read BYE(upgrade); {} \
         connects, none refused",
        probes.load(Ordering::Relaxed)
    );
    // Once each, in each sender's order: no loss, no duplicate shown.
    for i in 0..PAIRS as usize {
        let want: Vec<u64> = (0..sent[i]).collect();
        assert_eq!(shown[i], want, "sender {}", i + 1);
    }
    // Each upgrade ended every sender's connection once.
    assert!(drops.iter().all(|&d| d >= UPGRADES), "{drops:?}");
    assert!(byes > 0, "no sender read BYE(upgrade)");
    assert_eq!(refused.load(Ordering::Relaxed), 0, "a connect was refused");
    assert!(probes.load(Ordering::Relaxed) > 0);
    // Three successors in a row, on the same port.
    let now = info(&sock);
    assert_eq!(now["Generation"], UPGRADES.to_string());
    assert_ne!(now["Pid"], first_pid);
    assert!(
        now["Last_upgrade"].starts_with("took over from pid"),
        "{now:?}"
    );
    assert!(now["Upgraded_unix_ms"].parse::<u64>().unwrap() > 0);
    Client::login(addr, &token(77)).expect("the same port serves");
}

/// A client logged in on the old process, and its partner: both stay
/// connected and chat on after the failed upgrade.
fn chat_survives(addr: SocketAddr, run: impl FnOnce()) {
    let (a, b) = cross_pair();
    let (mut alice, _) = Client::login(addr, &token(a)).unwrap();
    let (mut bob, _) = Client::login(addr, &token(b)).unwrap();
    run();
    alice.send_msg(1, b, b"still here").unwrap();
    recv_ack(&mut alice, 1);
    let d = recv_deliver(&mut bob);
    assert_eq!(d.body, b"still here");
}

#[test]
fn a_successor_that_exits_at_once_leaves_the_old_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let pid = info(&sock)["Pid"].clone();
    chat_survives(old.addr, || {
        let (ok, text) = upgrade(&sock, Some(Path::new("/bin/false")));
        assert!(!ok, "{text}");
        assert!(text.contains("serves on"), "{text}");
        assert!(text.contains("exit status: 1"), "{text}");
    });
    let now = info(&sock);
    assert_eq!(now["Pid"], pid);
    assert_eq!(now["Generation"], "0");
    assert!(now["Last_upgrade"].starts_with("failed: "), "{now:?}");
    assert!(old.log_text().contains("upgrade to /bin/false failed"));
}

#[test]
fn a_successor_with_a_bad_config_leaves_the_old_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, "frame_bytes_max = 65536\n").unwrap();
    let old = start(dir.path(), &["--config", config.to_str().unwrap()]);
    let pid = info(&sock)["Pid"].clone();
    chat_survives(old.addr, || {
        // The file now names a key no version knows: the successor refuses it.
        std::fs::write(&config, "frame_bytes_max = 65536\nno_such_key = 1\n").unwrap();
        let (ok, text) = upgrade(&sock, None);
        assert!(!ok, "{text}");
        assert!(text.contains("no Hello"), "{text}");
    });
    assert_eq!(info(&sock)["Pid"], pid);
    // The successor's own complaint is in the (shared) log.
    assert!(old.log_text().contains("no_such_key"), "{}", old.log_text());
}

#[test]
fn a_successor_failing_after_the_release_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    // The successor starts with a metrics port someone holds: it fails
    // after taking the data directory, so the old process must restart.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let script = dir.path().join("successor.sh");
    let mut f = std::fs::File::create(&script).unwrap();
    writeln!(
        f,
        "#!/bin/sh\nexec {TERN} \"$@\" --metrics-listen {}",
        taken.local_addr().unwrap()
    )
    .unwrap();
    drop(f);
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let (a, b) = cross_pair();
    let (mut alice, _) = Client::login(old.addr, &token(a)).unwrap();
    let (mut bob, _) = Client::login(old.addr, &token(b)).unwrap();
    drop(bob);
    alice.send_msg(1, b, b"queued").unwrap();
    recv_ack(&mut alice, 1);

    let (ok, text) = upgrade(&sock, Some(&script));
    assert!(!ok, "{text}");
    assert!(text.contains("no Serving"), "{text}");
    // The old process said BYE(upgrade), then came back on the same port.
    expect_bye_then_close(&mut alice, ByeReason::Upgrade);
    let now = info(&sock);
    assert_eq!(now["Pid"], old.pid().to_string());
    assert!(now["Last_upgrade"].starts_with("failed: "), "{now:?}");
    bob = Client::login(old.addr, &token(b)).unwrap().0;
    assert_eq!(recv_deliver(&mut bob).body, b"queued");
    assert!(old
        .log_text()
        .contains("starting again on the same listeners"));
}

/// A self-signed certificate for `localhost`: (cert PEM path, key PEM path),
/// written into `dir`; the certificate is also the client's root.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    // The server refuses a private key others can read.
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    (cert_path, key_path)
}

/// TLS sessions cannot move: they get BYE(upgrade) over TLS and the end of
/// the stream, and the successor serves TLS on the same (handed-over) port.
#[test]
fn tls_clients_get_bye_upgrade_and_the_tls_port_stays() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let (cert, key) = self_signed(dir.path());
    let old = start(
        dir.path(),
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let _reaper = Reaper(sock.clone());
    // Logged right after the plaintext listener's line.
    wait_for(|| old.log_text().contains("TLS 1.3 listening on "));
    let log = old.log_text();
    let tls_addr: SocketAddr = log
        .lines()
        .find_map(|l| {
            l.split_once("TLS 1.3 listening on ")?
                .1
                .split_whitespace()
                .next()
        })
        .unwrap_or_else(|| panic!("no TLS listener in:\n{log}"))
        .parse()
        .unwrap();
    let config = tern_client::tls_config(&cert).unwrap();
    let (a, b) = cross_pair();
    let mut alice = Client::login_tls(tls_addr, "localhost", &config, &token(a))
        .unwrap()
        .0;

    let (ok, text) = upgrade(&sock, None);
    assert!(ok, "{text}\n{}", old.log_text());
    let frames = alice.wait_closed(WAIT).expect("closed by the server");
    assert!(
        frames.iter().any(|f| matches!(
            f,
            tern::proto::OwnedFrame::Bye {
                reason: ByeReason::Upgrade
            }
        )),
        "{frames:?}"
    );
    // The successor took the TLS listener: the same port, a new handshake.
    let mut alice = Client::login_tls(tls_addr, "localhost", &config, &token(a))
        .unwrap()
        .0;
    let mut bob = Client::login(old.addr, &token(b)).unwrap().0;
    alice.send_msg(1, b, b"over tls").unwrap();
    recv_ack(&mut alice, 1);
    assert_eq!(recv_deliver(&mut bob).body, b"over tls");
    assert_eq!(info(&sock)["Generation"], "1");
}
