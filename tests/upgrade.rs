//! Live upgrade (issue 14) with the real binary, over real sockets, on the
//! suite's backend:
//!
//! - chatting clients (the self-healing client library) and 2,000 more
//!   logged-in connections chatting in rounds, across three upgrades in a
//!   row to the same binary: every message sent is shown once, in each
//!   sender's order, nothing is refused at connect, the port stays the same
//!   and the generation counts up, and no client connection ever drops
//!   (carried: same socket, no BYE), on both backends;
//! - an upgrade to a successor on the other backend and back: the
//!   connections stay (the socket goes as a process descriptor either way);
//! - a successor that speaks an unknown hand-over format is refused;
//! - a successor that exits at once (`/bin/false`) and one with a bad
//!   configuration: the old process never stops serving, its connections
//!   stay open and chat on, and it says why;
//! - TLS clients get BYE(upgrade), and the successor serves TLS on the
//!   handed-over port and resumes their sessions (the ticket keys were
//!   handed over);
//! - a successor that fails after the old one released the data directory
//!   (its metrics port is taken): the old process starts again on the same
//!   listeners, and what was queued is still there (the carried
//!   connections died with the successor: their clients reconnect);
//! - an upgrade during a reconnect storm (clients connecting, logging in,
//!   sending and resetting over and over): no connect refused, every
//!   ACKed message delivered once and in order;
//! - a second upgrade while one runs is refused, and so is one under
//!   systemd (the shipped unit would stop the successor).
//!
//! Every wait has a generous bound; nothing asserts how fast anything was.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::{serve_command, TernChild, TERN};
use common::paho::{self, Paho};
use common::ws::{client_frame, tern_bytes, WsClient};
use common::*;
use tern::mqtt::codec::{self, Connect, Packet, Props, Publish, Version};
use tern::proto::{ByeReason, Frame, OwnedFrame};
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
    // The crowd below logs in 2,000 connections from one address at once.
    cmd.args(["--addr-conns-per-s-max", "0"]);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(extra)
        // A test run from a systemd unit (a CI runner) is not under
        // tern.service: the refusal below is tested on its own.
        .env_remove("INVOCATION_ID");
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

/// What one sender's thread did: messages sent, disconnects seen, and how
/// many of them had read the BYE(upgrade).
struct Sent {
    count: u64,
    drops: u64,
    byes: u64,
}

/// Sends to `to`, a few in flight, until `done`; then until all are ACKed.
/// Each client runs on its own thread, as real clients do: one blocked in a
/// login (the successor not serving yet) never keeps another from closing
/// on its BYE.
fn sender(addr: SocketAddr, user: u64, to: u64, done: Arc<AtomicBool>) -> Sent {
    let mut s = session(addr, user);
    let mut sent = Sent {
        count: 0,
        drops: 0,
        byes: 0,
    };
    let deadline = Instant::now() + WAIT * 6;
    loop {
        assert!(Instant::now() < deadline, "sender {user} stuck");
        let upgrading = !done.load(Ordering::Acquire);
        if upgrading && s.outbox_len() < 3 {
            s.send(to, &sent.count.to_le_bytes()).unwrap();
            sent.count += 1;
        }
        match s.poll(Duration::from_millis(1)).unwrap() {
            Some(Event::Refused { code, text, .. }) => panic!("refused: {code} {text}"),
            // A sender writing when the BYE came may see the write fail
            // before it reads the BYE.
            Some(Event::Disconnected { reason }) => {
                sent.drops += 1;
                sent.byes += u64::from(reason.contains("BYE(upgrade)"));
            }
            _ => {}
        }
        if !upgrading && s.outbox_len() == 0 {
            return sent;
        }
    }
}

/// The bodies (indices) shown from `from`, until `want` says how many to
/// expect and they all came; and how many times the connection dropped.
fn recipient(addr: SocketAddr, user: u64, from: u64, want: Arc<AtomicU64>) -> (Vec<u64>, u64) {
    let mut r = session(addr, user);
    let mut shown = Vec::new();
    let mut drops = 0;
    let deadline = Instant::now() + WAIT * 6;
    while (shown.len() as u64) < want.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "recipient {user} stuck: {shown:?}"
        );
        match r.poll(Duration::from_millis(1)).unwrap() {
            Some(Event::Message {
                server_id,
                from: f,
                body,
                ..
            }) => {
                assert_eq!(f, from);
                shown.push(u64::from_le_bytes(body.try_into().unwrap()));
                r.accept(server_id).unwrap();
            }
            Some(Event::Disconnected { .. }) => drops += 1,
            _ => {}
        }
    }
    (shown, drops)
}

/// Logged-in raw connections chatting in rounds around the upgrades:
/// before each upgrade every sender sends its next message and nobody
/// reads; after it each sender reads its ACK and each recipient its
/// DELIVER, on the same sockets.
struct Crowd {
    /// (sender, its client, recipient, its client, server ids seen).
    pairs: Vec<(u64, Client, u64, Client, HashSet<u64>)>,
    /// Rounds sent so far.
    rounds: u64,
}

impl Crowd {
    /// `n` pairs (`2n` connections), users from 100,001 up.
    fn login(addr: SocketAddr, n: u64) -> Crowd {
        let pairs = (0..n)
            .map(|i| {
                let (from, to) = (100_001 + 2 * i, 100_002 + 2 * i);
                let a = Client::login(addr, &token(from)).expect("crowd login").0;
                let b = Client::login(addr, &token(to)).expect("crowd login").0;
                (from, a, to, b, HashSet::new())
            })
            .collect();
        Crowd { pairs, rounds: 0 }
    }

    /// Every sender sends round `rounds` (left unread).
    fn send(&mut self) {
        for (_, a, to, _, _) in &mut self.pairs {
            a.send_msg(self.rounds + 1, *to, &self.rounds.to_le_bytes())
                .expect("the crowd's socket is open");
        }
        self.rounds += 1;
    }

    /// Every sender gets its ACK and every recipient the round's message:
    /// the next one in order; a DELIVER seen before (its DELIVERED was not
    /// in yet when the connection moved) is the only duplicate allowed, and
    /// only with its server id.
    fn read(&mut self) {
        let round = self.rounds - 1;
        for (from, a, _, b, seen) in &mut self.pairs {
            recv_ack(a, round + 1);
            loop {
                let d = recv_deliver(b);
                assert_eq!(d.from, *from);
                if !seen.insert(d.server_id) {
                    continue; // re-delivered: the protocol's duplicate
                }
                assert_eq!(d.body, round.to_le_bytes(), "user {from}'s round {round}");
                b.send_delivered(d.server_id).unwrap();
                break;
            }
        }
    }
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
    let mut crowd = Crowd::login(addr, 1000);

    // Senders 1..=PAIRS write to recipients 1001..; each body is its index.
    let done = Arc::new(AtomicBool::new(false));
    let wants: Vec<Arc<AtomicU64>> = (0..PAIRS)
        .map(|_| Arc::new(AtomicU64::new(u64::MAX)))
        .collect();
    let senders: Vec<_> = (1..=PAIRS)
        .map(|u| {
            let done = done.clone();
            std::thread::spawn(move || sender(addr, u, 1000 + u, done))
        })
        .collect();
    let recipients: Vec<_> = (1..=PAIRS)
        .zip(&wants)
        .map(|(u, want)| {
            let want = want.clone();
            std::thread::spawn(move || recipient(addr, 1000 + u, u, want))
        })
        .collect();

    // A prober connects all along: no connect may be refused.
    let refused = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
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
    for _ in 0..UPGRADES {
        // Let some messages flow first (pacing, not a measurement).
        std::thread::sleep(Duration::from_millis(300));
        crowd.send();
        let (ok, text) = upgrade(&sock, None);
        assert!(ok, "tern upgrade failed: {text}\nlog:\n{}", old.log_text());
        assert!(text.starts_with("upgraded: pid"), "{text}");
        crowd.read();
    }
    std::thread::sleep(Duration::from_millis(300));
    // One more round on the third successor, over the same 2,000 sockets.
    crowd.send();
    crowd.read();
    done.store(true, Ordering::Release);
    prober.join().unwrap();
    let sent: Vec<Sent> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    for (want, s) in wants.iter().zip(&sent) {
        want.store(s.count, Ordering::Release);
    }
    let (shown, recipient_drops): (Vec<Vec<u64>>, Vec<u64>) =
        recipients.into_iter().map(|t| t.join().unwrap()).unzip();
    eprintln!(
        "sent per sender {:?}; disconnects {:?} (recipients {recipient_drops:?}), {} read \
         BYE(upgrade); {} connects, none refused",
        sent.iter().map(|s| s.count).collect::<Vec<_>>(),
        sent.iter().map(|s| s.drops).collect::<Vec<_>>(),
        sent.iter().map(|s| s.byes).sum::<u64>(),
        probes.load(Ordering::Relaxed)
    );
    // Once each, in each sender's order: no loss, no duplicate shown.
    for (i, (s, got)) in sent.iter().zip(&shown).enumerate() {
        let want: Vec<u64> = (0..s.count).collect();
        assert_eq!(got, &want, "sender {}", i + 1);
    }
    // Every connection was carried, three times: the same socket all
    // along, no BYE, no reconnect.
    assert!(sent.iter().all(|s| s.drops == 0 && s.byes == 0));
    assert!(recipient_drops.iter().all(|&d| d == 0));
    // Each old process carried at least the crowd (the log is shared: the
    // successors inherit it).
    let log = old.log_text();
    let carried = carried_counts(&log);
    assert_eq!(carried.len() as u64, UPGRADES, "{log}");
    assert!(carried.iter().all(|&n| n >= 2000), "{carried:?}");
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

/// How many connections each successor took, from the shared log
/// (`upgrade: N connections carried`), in order.
fn carried_counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            l.split("upgrade: ")
                .nth(1)?
                .strip_suffix(" connections carried")?
                .parse()
                .ok()
        })
        .collect()
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
    // It died while its connections came, or after: either way the old
    // process saw it go.
    assert!(text.contains("(successor exit status: 1)"), "{text}");
    // Alice's socket was kept for the successor, which died with it (or
    // the old process closed it when the successor failed): a close
    // without BYE; her client reconnects (to the old process).
    let frames = alice.wait_closed(WAIT).expect("closed");
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, tern::proto::OwnedFrame::Bye { .. })),
        "{frames:?}"
    );
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
fn tls_clients_get_bye_upgrade_and_resume_on_the_same_port() {
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
    assert_eq!(
        alice.tls_handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    // The successor took the TLS listener: the same port; and the ticket
    // keys, so the client resumes with the old process's ticket.
    let mut alice = Client::login_tls(tls_addr, "localhost", &config, &token(a))
        .unwrap()
        .0;
    assert_eq!(
        alice.tls_handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the ticket from the old process did not resume"
    );
    let mut bob = Client::login(old.addr, &token(b)).unwrap().0;
    alice.send_msg(1, b, b"over tls").unwrap();
    recv_ack(&mut alice, 1);
    assert_eq!(recv_deliver(&mut bob).body, b"over tls");
    assert_eq!(info(&sock)["Generation"], "1");
}

/// While one upgrade runs (its successor held at a gate), a second is
/// refused; once the gate opens the first completes.
#[test]
fn a_second_upgrade_while_one_runs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    let gate = dir.path().join("gate");
    let script = dir.path().join("gated.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.02; done\nexec {TERN} \"$@\"\n",
            gate.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let first = tern::stats::query(&sock, &format!("upgrade {}", script.display())).unwrap();
    assert!(first.starts_with("upgrade started"), "{first}");
    let second = tern::stats::query(&sock, "upgrade").unwrap();
    assert!(
        second.starts_with("refused: an upgrade is already in progress"),
        "{second}"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(
        wait_for(|| tern::stats::query(&sock, "show info")
            .is_ok_and(|t| parse_info(&t).get("Generation").map(String::as_str) == Some("1"))),
        "the first upgrade did not complete:\n{}",
        old.log_text()
    );
    // The successor started through the script serves the same port.
    Client::login(old.addr, &token(5)).expect("the same port serves");
}

/// Under systemd (INVOCATION_ID set) the upgrade is refused: the shipped
/// Type=simple unit would stop the successor with the old process.
#[test]
fn under_systemd_the_upgrade_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let io = io_flag();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "1", "--io", &io]);
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--stats-socket")
        .arg(&sock)
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
    let old = TernChild::expect_start(cmd);
    let pid = info(&sock)["Pid"].clone();
    chat_survives(old.addr, || {
        let (ok, text) = upgrade(&sock, None);
        assert!(!ok, "{text}");
        assert!(text.contains("refused under systemd"), "{text}");
    });
    assert_eq!(info(&sock)["Pid"], pid);
}

/// Frames from `client` until `want` of them matched `done`; panics on a
/// BYE or a second LOGIN_OK (a carried session gets neither).
fn frames_until(
    client: &mut Client,
    want: usize,
    done: impl Fn(&tern::proto::OwnedFrame) -> bool,
) -> Vec<tern::proto::OwnedFrame> {
    let mut got = Vec::new();
    while got.iter().filter(|f| done(f)).count() < want {
        let f = client.recv().expect("the carried connection stays open");
        assert!(
            !matches!(
                f,
                tern::proto::OwnedFrame::Bye { .. } | tern::proto::OwnedFrame::LoginOk { .. }
            ),
            "{f:?} after {got:?}"
        );
        got.push(f);
    }
    got
}

#[test]
fn a_carried_connection_keeps_its_partial_frame_and_undelivered_messages() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    let (a, b) = cross_pair();
    let (mut alice, _) = Client::login(old.addr, &token(a)).unwrap();
    let (mut bob, _) = Client::login(old.addr, &token(b)).unwrap();
    // Bob has "first" and does not say DELIVERED before the upgrade.
    alice.send_msg(1, b, b"first").unwrap();
    recv_ack(&mut alice, 1);
    let first = recv_deliver(&mut bob);
    // Alice's next SEND is cut in half across the upgrade.
    let mut frame = Vec::new();
    tern::proto::encode(
        &tern::proto::Frame::Send {
            client_id: 2,
            to: b,
            body: b"second",
        },
        &mut frame,
    );
    let half = frame.len() / 2;
    alice.send_raw(&frame[..half]).unwrap();
    let (ok, text) = upgrade(&sock, None);
    assert!(ok, "{text}\n{}", old.log_text());
    assert_eq!(info(&sock)["Generation"], "1");
    alice.send_raw(&frame[half..]).unwrap();
    frames_until(&mut alice, 1, |f| {
        matches!(f, tern::proto::OwnedFrame::Ack { client_id: 2, .. })
    });
    // The same sockets: Bob gets "first" again with its server id (it
    // was not DELIVERED), then "second".
    let frames = frames_until(&mut bob, 2, |f| {
        matches!(f, tern::proto::OwnedFrame::Deliver { .. })
    });
    let bodies: Vec<(u64, &[u8])> = frames
        .iter()
        .filter_map(|f| match f {
            tern::proto::OwnedFrame::Deliver {
                server_id, body, ..
            } => Some((*server_id, &body[..])),
            _ => None,
        })
        .collect();
    assert_eq!(bodies[0], (first.server_id, &b"first"[..]));
    assert_eq!(bodies[1].1, b"second");
}

#[test]
fn carried_devices_keep_their_device_and_resend_window() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    let (user, peer) = cross_pair();
    let login = |device| {
        Client::login_version(
            old.addr,
            &device_token(user, device),
            tern::proto::VERSION_2,
        )
        .unwrap()
        .0
    };
    let (mut phone, mut laptop) = (login(1), login(2));
    let (mut other, _) = Client::login(old.addr, &token(peer)).unwrap();
    phone.send_msg(5, peer, b"before").unwrap();
    let acked = frames_until(&mut phone, 1, |f| {
        matches!(f, tern::proto::OwnedFrame::Ack { client_id: 5, .. })
    });
    let Some(tern::proto::OwnedFrame::Ack { server_id, .. }) = acked.last() else {
        panic!("no ACK: {acked:?}");
    };
    let first = *server_id;
    recv_deliver(&mut other);
    let (ok, text) = upgrade(&sock, None);
    assert!(ok, "{text}\n{}", old.log_text());
    // The phone's resend after the upgrade is known by its device's
    // window: the original ACK, no second message.
    phone.send_msg(5, peer, b"before").unwrap();
    let again = frames_until(&mut phone, 1, |f| {
        matches!(f, tern::proto::OwnedFrame::Ack { client_id: 5, .. })
    });
    assert!(
        matches!(again.last(), Some(tern::proto::OwnedFrame::Ack { server_id, .. }) if *server_id == first),
        "{again:?}"
    );
    // Both devices, on the same sockets, get what the peer sends now.
    other.send_msg(1, user, b"after").unwrap();
    for device in [&mut phone, &mut laptop] {
        let got = frames_until(device, 1, |f| {
            matches!(f, tern::proto::OwnedFrame::Deliver { .. })
        });
        assert!(
            matches!(got.last(), Some(tern::proto::OwnedFrame::Deliver { body, .. }) if body == b"after"),
            "{got:?}"
        );
    }
}

/// A script that runs tern with `--io` switched to `io`.
fn other_backend_script(dir: &Path, io: &str) -> PathBuf {
    let script = dir.join(format!("successor-{io}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nargs=(); prev=\nfor a in \"$@\"; do\n  if [ \"$prev\" = --io ]; then a={io}; fi\n  \
             args+=(\"$a\"); prev=$a\ndone\nexec {TERN} \"${{args[@]}}\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

#[test]
fn connections_are_carried_to_the_other_backend_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    let first = info(&sock)["Backend"].clone();
    let other = if first == tern::io::poll::BACKEND_NAME {
        "uring"
    } else {
        "poll"
    };
    let (a, b) = cross_pair();
    let (mut alice, _) = Client::login(old.addr, &token(a)).unwrap();
    let (mut bob, _) = Client::login(old.addr, &token(b)).unwrap();
    let mut round = 0u64;
    let mut seen = HashSet::new();
    for io in [other.to_string(), io_flag()] {
        // A message in flight across the switch: sent, not yet read.
        round += 1;
        alice.send_msg(round, b, &round.to_le_bytes()).unwrap();
        let script = other_backend_script(dir.path(), &io);
        let (ok, text) = upgrade(&sock, Some(&script));
        assert!(ok, "{text}\n{}", old.log_text());
        frames_until(
            &mut alice,
            1,
            |f| matches!(f, tern::proto::OwnedFrame::Ack { client_id, .. } if *client_id == round),
        );
        // The message of the round before may come again, with its server
        // id (its DELIVERED had not been handled when the connection
        // moved): the protocol's duplicate.
        loop {
            let got = frames_until(&mut bob, 1, |f| {
                matches!(f, tern::proto::OwnedFrame::Deliver { .. })
            });
            let Some(tern::proto::OwnedFrame::Deliver {
                server_id, body, ..
            }) = got.last()
            else {
                panic!("{got:?}");
            };
            if !seen.insert(*server_id) {
                continue;
            }
            assert_eq!(body, &round.to_le_bytes());
            bob.send_delivered(*server_id).unwrap();
            break;
        }
    }
    // There and back: the backends were the other one, then the first.
    let now = info(&sock);
    assert_eq!(now["Generation"], "2");
    assert_eq!(now["Backend"], first);
}

#[test]
fn a_successor_speaking_an_unknown_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    // A successor whose Hello says format 99 (kind 1, format 99, pid 1),
    // one packet on the hand-over socket; then it waits to be killed.
    let script = dir.path().join("format99.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\nprintf '\\001\\143\\000\\001\\000\\000\\000' >&$TERN_UPGRADE_FD\nexec sleep 30\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pid = info(&sock)["Pid"].clone();
    chat_survives(old.addr, || {
        let (ok, text) = upgrade(&sock, Some(&script));
        assert!(!ok, "{text}");
        assert!(
            text.contains("the successor speaks hand-over format 99, this process only 4"),
            "{text}"
        );
    });
    assert_eq!(info(&sock)["Pid"], pid);
}

/// What one storming client did: messages ACKed (indices `0..acked`),
/// connections made, and connects refused.
struct Stormed {
    acked: u64,
    cycles: u64,
    refused: u64,
}

/// One client of the storm: connects, logs in (protocol v2), sends its
/// next message to `to`, waits for the ACK and resets the connection, over
/// and over until `done` (and at least `min_after` cycles after `upgraded`
/// was set). A connection that ends before its ACK (BYE(upgrade) to a
/// client not logged in yet, a close) is simply made again, and the same
/// message resent under the same client id (the server answers a repeat
/// with its first ACK and stores nothing twice).
fn stormer(
    addr: SocketAddr,
    user: u64,
    to: u64,
    cycles: Arc<AtomicU64>,
    upgraded: Arc<AtomicBool>,
    min_after: u64,
) -> Stormed {
    let mut out = Stormed {
        acked: 0,
        cycles: 0,
        refused: 0,
    };
    let mut after = 0;
    let deadline = Instant::now() + WAIT * 6;
    while !(upgraded.load(Ordering::Acquire) && after >= min_after) {
        assert!(Instant::now() < deadline, "stormer {user} stuck");
        out.cycles += 1;
        cycles.fetch_add(1, Ordering::Relaxed);
        if upgraded.load(Ordering::Acquire) {
            after += 1;
        }
        let mut c = match Client::login_version(addr, &token(user), tern::proto::VERSION_2) {
            Ok((c, _)) => c,
            Err(tern_client::ClientError::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                out.refused += 1;
                continue;
            }
            Err(_) => continue, // closed before LOGIN_OK: again
        };
        // Reset, not FIN: thousands of cycles leave no TIME_WAIT behind.
        let _ = socket2::SockRef::from(c.stream()).set_linger(Some(Duration::ZERO));
        let index = out.acked;
        if c.send_msg(index + 1, to, &index.to_le_bytes()).is_err() {
            continue;
        }
        let acked = c.recv_until(|f| {
            matches!(f, tern::proto::OwnedFrame::Ack { client_id, .. } if *client_id == index + 1)
        });
        if acked.is_ok() {
            out.acked += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    out
}

#[test]
fn an_upgrade_during_a_reconnect_storm_loses_nothing() {
    const STORMERS: u64 = 24;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &[]);
    let _reaper = Reaper(sock.clone());
    let addr = old.addr;
    let cycles = Arc::new(AtomicU64::new(0));
    let upgraded = Arc::new(AtomicBool::new(false));
    // Users 200,001.. storm; each writes to its own offline recipient.
    let threads: Vec<_> = (0..STORMERS)
        .map(|i| {
            let (cycles, upgraded) = (cycles.clone(), upgraded.clone());
            std::thread::spawn(move || {
                stormer(addr, 200_001 + i, 300_001 + i, cycles, upgraded, 20)
            })
        })
        .collect();
    // The storm is on: every client has cycled a few times.
    assert!(wait_for(|| cycles.load(Ordering::Relaxed) >= 10 * STORMERS));
    let during = cycles.load(Ordering::Relaxed);
    let (ok, text) = upgrade(&sock, None);
    assert!(ok, "{text}\n{}", old.log_text());
    upgraded.store(true, Ordering::Release);
    let stormed: Vec<Stormed> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let total: u64 = stormed.iter().map(|s| s.cycles).sum();
    eprintln!(
        "{total} connections ({during} before the upgrade); ACKed per client {:?}",
        stormed.iter().map(|s| s.acked).collect::<Vec<_>>()
    );
    assert_eq!(
        stormed.iter().map(|s| s.refused).sum::<u64>(),
        0,
        "a connect was refused"
    );
    assert_eq!(info(&sock)["Generation"], "1");
    // Every ACKed message is there for its recipient, once, in order; an
    // unACKed last one may have been stored too (its ACK was lost).
    for (i, s) in stormed.iter().enumerate() {
        let (mut r, login) =
            Client::login_version(addr, &token(300_001 + i as u64), tern::proto::VERSION_2)
                .unwrap();
        assert!(
            login.offline_count >= s.acked,
            "{login:?} for {} ACKed",
            s.acked
        );
        let mut seen = HashSet::new();
        let mut next = 0;
        while next < s.acked {
            let d = recv_deliver(&mut r);
            assert_eq!(d.from, 200_001 + i as u64);
            if !seen.insert(d.server_id) {
                continue;
            }
            assert_eq!(d.body, next.to_le_bytes(), "recipient {i}");
            r.send_delivered(d.server_id).unwrap();
            next += 1;
        }
    }
}

/// Under a `Type=notify` unit (`NOTIFY_SOCKET` set, as systemd does) the
/// upgrade runs: the first process says READY=1, its successor says its
/// own pid (MAINPID=) with READY=1 before the old one exits, so systemd
/// follows the service to it. The real unit is tested under systemd by
/// tuning/linux/systemd-test.sh.
#[test]
fn under_a_notify_unit_the_successor_tells_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let io = io_flag();
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2", "--io", &io]);
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--stats-socket")
        .arg(&sock)
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        .env("NOTIFY_SOCKET", &notify_path);
    let old = TernChild::expect_start(cmd);
    let _reaper = Reaper(sock.clone());
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    chat_survives(old.addr, || {
        let (ok, text) = upgrade(&sock, None);
        assert!(ok, "{text}\n{}", old.log_text());
    });
    let now = info(&sock);
    assert_ne!(now["Pid"], old.pid().to_string());
    assert_eq!(next(), format!("MAINPID={}\nREADY=1", now["Pid"]));
}

/// The address a listener's log line gives: the word after `marker`
/// (WebSocket's ends in `/`).
fn logged_addr(child: &TernChild, marker: &str) -> SocketAddr {
    assert!(wait_for(|| child.log_text().contains(marker)), "{marker}");
    let log = child.log_text();
    log.lines()
        .find_map(|l| l.split_once(marker)?.1.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{log}"))
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Tern frames from `ws` until one matches `done`; panics on a BYE, a
/// second LOGIN_OK or an ERROR (a carried session gets none), and on a
/// close (in [`WsClient::recv_with_pongs`]). Pongs go to `pongs`.
fn ws_frames_until(
    ws: &mut WsClient,
    pongs: &mut Vec<Vec<u8>>,
    mut done: impl FnMut(&OwnedFrame) -> bool,
) -> Vec<OwnedFrame> {
    let mut got = Vec::new();
    loop {
        let f = ws.recv_with_pongs(pongs);
        assert!(
            !matches!(
                f,
                OwnedFrame::Bye { .. } | OwnedFrame::LoginOk { .. } | OwnedFrame::Error { .. }
            ),
            "{f:?} after {got:?}"
        );
        let end = done(&f);
        got.push(f);
        if end {
            return got;
        }
    }
}

#[test]
fn websocket_clients_chat_across_three_upgrades_on_the_same_socket() {
    const PER_ROUND: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &["--ws-listen", "127.0.0.1:0"]);
    let _reaper = Reaper(sock.clone());
    let ws_addr = logged_addr(&old, "WebSocket listening at ws://");
    let (a, b) = cross_pair();
    let mut alice = WsClient::upgrade(ws_addr);
    alice.login(&token(a));
    let mut bob = WsClient::upgrade(ws_addr);
    bob.login(&token(b));
    let mut pongs = Vec::new();
    let send = |id: u64| {
        tern_bytes(&[Frame::Send {
            client_id: id,
            to: b,
            body: &indexed_body(id, 8),
        }])
    };
    // Bob's deliveries, each server id once (a message not yet DELIVERED
    // comes again after an upgrade, with the same server id).
    let mut seen = HashSet::new();
    let mut shown = Vec::new();
    let mut take = |frames: Vec<OwnedFrame>, bob: &mut WsClient, ack_last: bool| {
        let sids: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                OwnedFrame::Deliver {
                    server_id, body, ..
                } => {
                    if seen.insert(*server_id) {
                        shown.push(body_index(body));
                    }
                    Some(*server_id)
                }
                _ => None,
            })
            .collect();
        let n = if ack_last { sids.len() } else { sids.len() - 1 };
        for &server_id in &sids[..n] {
            bob.send(&[Frame::Delivered { server_id }]);
        }
    };
    let mut next = 1;
    for round in 1..=3u64 {
        // Whole messages; Bob leaves the last one not DELIVERED.
        for _ in 0..PER_ROUND {
            alice.send_raw(&client_frame(0x82, &send(next)));
            next += 1;
        }
        let last = next - 1;
        ws_frames_until(
            &mut alice,
            &mut pongs,
            |f| matches!(f, OwnedFrame::Ack { client_id, .. } if *client_id == last),
        );
        let mut delivers = 0;
        let frames = ws_frames_until(&mut bob, &mut pongs, |f| {
            delivers += u64::from(matches!(f, OwnedFrame::Deliver { .. }));
            delivers == PER_ROUND
        });
        take(frames, &mut bob, false);
        // Across the upgrade: a fragmented message whose first fragment
        // holds a SEND and half of the next (a partial Tern frame in an
        // open WebSocket message), half of its last fragment (a partial
        // WebSocket frame), and half of a ping from Bob.
        let mut message = send(next);
        message.extend_from_slice(&send(next + 1));
        let cut = send(next).len() + 5;
        alice.send_raw(&client_frame(0x02, &message[..cut]));
        let fin = client_frame(0x80, &message[cut..]);
        alice.send_raw(&fin[..fin.len() / 2]);
        let payload = format!("round {round}");
        let ping = client_frame(0x89, payload.as_bytes());
        bob.send_raw(&ping[..3]);

        let (ok, text) = upgrade(&sock, None);
        assert!(ok, "tern upgrade failed: {text}\nlog:\n{}", old.log_text());
        assert_eq!(info(&sock)["Generation"], round.to_string());

        alice.send_raw(&fin[fin.len() / 2..]);
        bob.send_raw(&ping[3..]);
        let last = next + 1;
        next += 2;
        // The same sockets: Alice's ACKs, Bob's pong and deliveries.
        ws_frames_until(
            &mut alice,
            &mut pongs,
            |f| matches!(f, OwnedFrame::Ack { client_id, .. } if *client_id == last),
        );
        let frames = ws_frames_until(
            &mut bob,
            &mut pongs,
            |f| matches!(f, OwnedFrame::Deliver { body, .. } if body_index(body) == last),
        );
        take(frames, &mut bob, true);
        assert_eq!(pongs, [payload.into_bytes()], "round {round}");
        pongs.clear();
    }
    // Every message once, in Alice's order; both connections carried
    // each time.
    assert_eq!(shown, (1..next).collect::<Vec<u64>>());
    assert_eq!(carried_counts(&old.log_text()), [2, 2, 2]);
    // Still the same connections, on the third successor.
    alice.send_raw(&client_frame(0x82, &send(next)));
    ws_frames_until(
        &mut alice,
        &mut pongs,
        |f| matches!(f, OwnedFrame::Ack { client_id, .. } if *client_id == next),
    );
    // The listener was handed over too: the port 0 the first process got
    // still takes new WebSocket connections (a successor binding its own
    // would have another port).
    let mut carol = WsClient::upgrade(ws_addr);
    carol.login(&token(a + 2));
}

/// A raw MQTT 3.1.1 connection's CONNECT for `user`.
fn mqtt_connect(user: u64) -> Vec<u8> {
    let tok = token(user);
    let name = user.to_string();
    let c = Connect {
        version: Version::V311,
        clean: true,
        keepalive_s: 30,
        props: Props::default(),
        client_id: "raw",
        will: None,
        username: Some(&name),
        password: Some(tok.as_bytes()),
    };
    let mut out = Vec::new();
    codec::encode(&Packet::Connect(c), Version::V311, &mut out);
    out
}

/// A raw MQTT 3.1.1 client: what it read and has not looked at yet.
struct RawMqtt {
    s: TcpStream,
    buf: Vec<u8>,
}

/// What a PUBLISH to a [`RawMqtt`] said: packet id, DUP, payload.
type Delivery = (u16, bool, Vec<u8>);

impl RawMqtt {
    /// Connects as `user`; panics unless the CONNACK accepts.
    fn connect(addr: SocketAddr, user: u64) -> RawMqtt {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut c = RawMqtt { s, buf: Vec::new() };
        c.send(&mqtt_connect(user));
        c.until(|p| matches!(p, Packet::ConnAck(a) if a.code == 0));
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Reads whole packets until `done` says so; returns the PUBLISHes
    /// read meanwhile. Panics at the end of the stream.
    fn until(&mut self, mut done: impl FnMut(&Packet<'_>) -> bool) -> Vec<Delivery> {
        let mut delivered = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut at = 0;
            let mut end = false;
            while let Some((p, used)) = codec::decode(&self.buf[at..], Some(Version::V311), 1 << 20)
                .expect("packets the codec reads")
            {
                at += used;
                if let Packet::Publish(p) = &p {
                    delivered.push((p.pid, p.dup, p.payload.to_vec()));
                }
                if done(&p) {
                    end = true;
                    break;
                }
            }
            self.buf.drain(..at);
            if end {
                return delivered;
            }
            let n = self.s.read(&mut chunk).expect("read within the wait");
            assert!(n > 0, "the carried MQTT connection was closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn mqtt_clients_keep_their_connection_and_subscription_across_an_upgrade() {
    const EACH: u64 = 20;
    if !paho::have_paho() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &["--mqtt-listen", "127.0.0.1:0"]);
    let _reaper = Reaper(sock.clone());
    let addr = logged_addr(&old, "MQTT listening on ");
    let (a, b) = cross_pair();
    // Bob subscribes with MQTT 5.0, Alice publishes with 3.1.1 (and takes
    // her receipts), and Carol (a raw 3.1.1 client) has a delivery in
    // flight and a PUBLISH cut in half across the upgrade.
    let carol = a.max(b) + 1;
    let (mut sub, rc) = Paho::connect(addr, b, 5);
    assert_eq!(rc, 0);
    sub.cmd(&format!("sub u/{b} 1"));
    assert_eq!(sub.next(), ["suback", "1"]);
    let (mut publ, rc) = Paho::connect(addr, a, 311);
    assert_eq!(rc, 0);
    publ.cmd(&format!("sub u/{a}/receipts 0"));
    assert_eq!(publ.next(), ["suback", "0"]);
    let mut raw = RawMqtt::connect(addr, carol);
    // Carol takes a delivery and does not PUBACK it before the upgrade.
    let inbox = format!("u/{carol}");
    let mut fbuf = Vec::new();
    let mut subscribe = Vec::new();
    let s = codec::Subscribe {
        pid: 1,
        props: Props::default(),
        filters: codec::Filters::build(&[(&inbox, 1)], true, &mut fbuf),
    };
    codec::encode(&Packet::Subscribe(s), Version::V311, &mut subscribe);
    raw.send(&subscribe);
    raw.until(|p| matches!(p, Packet::SubAck(_)));
    publ.cmd(&format!("pub {inbox} 1 to-carol"));
    let first = raw.until(|p| matches!(p, Packet::Publish(_)));
    assert_eq!(first.len(), 1);
    let (pid, dup, ref body) = first[0];
    assert_eq!((dup, &body[..]), (false, &b"to-carol"[..]));
    let mut publish = Vec::new();
    let topic = format!("u/{b}");
    let p = Publish {
        dup: false,
        qos: 1,
        retain: false,
        topic: &topic,
        pid: 9,
        props: Props::default(),
        payload: b"raw-half",
    };
    codec::encode(&Packet::Publish(p), Version::V311, &mut publish);

    // Publishing before, during (QoS 1 deliveries in flight) and after.
    for i in 0..EACH {
        publ.cmd(&format!("pub u/{b} 1 m-{i}"));
    }
    raw.send(&publish[..publish.len() / 2]);
    let (ok, text) = upgrade(&sock, None);
    assert!(ok, "tern upgrade failed: {text}\nlog:\n{}", old.log_text());
    assert_eq!(info(&sock)["Generation"], "1");
    raw.send(&publish[publish.len() / 2..]);
    for i in EACH..2 * EACH {
        publ.cmd(&format!("pub u/{b} 1 m-{i}"));
    }
    // Carol's half PUBLISH is answered, and the delivery she did not
    // PUBACK comes again under its packet id, DUP set: her in-flight map
    // came along.
    let (mut acked, mut again) = (false, false);
    let got = raw.until(|p| {
        match p {
            Packet::PubAck(a) if a.pid == 9 => acked = true,
            Packet::Publish(d) if d.payload == b"to-carol" => again = true,
            _ => {}
        }
        acked && again
    });
    assert_eq!(got, [(pid, true, b"to-carol".to_vec())]);
    // Her PUBACK of the old process's PUBLISH is the DELIVERED: Alice
    // gets its receipt.
    let mut puback = Vec::new();
    let ack = codec::PubAck {
        pid,
        code: 0,
        props: Props::default(),
    };
    codec::encode(&Packet::PubAck(ack), Version::V311, &mut puback);
    raw.send(&puback);

    // Every PUBLISH acknowledged with success, and the receipt, no
    // reconnect (a `disconnected` or `connack` line fails here).
    let (mut pubacks, mut receipt) = (0, false);
    while pubacks < 2 * EACH + 1 || !receipt {
        let w = publ.next();
        match w[0].as_str() {
            "puback" => {
                assert!(w.len() == 4 && w[2] == "0", "{w:?}");
                pubacks += 1;
            }
            "msg" if w[1] == format!("u/{a}/receipts") => {
                receipt |= w[3] == "delivered" && w[5] == carol.to_string();
            }
            _ => panic!("{w:?}"),
        }
    }
    // Every message reached the subscriber (QoS 1: a delivery in flight
    // at the upgrade may come twice), on its one connection.
    let mut want: HashSet<String> = (0..2 * EACH).map(|i| format!("m-{i}")).collect();
    want.insert("raw-half".into());
    while !want.is_empty() {
        let w = sub.next();
        assert_eq!(
            w[..3],
            ["msg".to_string(), topic.clone(), "1".into()],
            "{w:?}"
        );
        want.remove(&w[3]);
    }
    assert_eq!(carried_counts(&old.log_text()), [3]);
    // The same connections to the end: the next events are the
    // DISCONNECTs' (a reconnect would have said `connack` first).
    for p in [&mut publ, &mut sub] {
        p.cmd("disconnect");
        loop {
            let w = p.next();
            match w[0].as_str() {
                "disconnected" => break,
                "msg" => continue, // a repeat of a delivery in flight
                _ => panic!("{w:?}"),
            }
        }
    }
}

#[test]
fn mqtt_over_websocket_is_closed_not_carried_and_tern_over_websocket_is_carried() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let old = start(dir.path(), &["--ws-listen", "127.0.0.1:0"]);
    let _reaper = Reaper(sock.clone());
    let ws_addr = logged_addr(&old, "WebSocket listening at ws://");
    let (a, b) = cross_pair();
    let mut tern = WsClient::upgrade(ws_addr);
    tern.login(&token(a));
    let (mut mqtt, head) = WsClient::upgrade_with(ws_addr, "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"),
        "{head}"
    );
    mqtt.send_raw(&client_frame(0x82, &mqtt_connect(b)));
    loop {
        let stream = mqtt.recv_stream();
        if let Some((p, _)) = codec::decode(stream, Some(Version::V311), 1 << 20).unwrap() {
            assert!(matches!(p, Packet::ConnAck(c) if c.code == 0), "{p:?}");
            break;
        }
    }
    let (ok, text) = upgrade(&sock, None);
    assert!(ok, "tern upgrade failed: {text}\nlog:\n{}", old.log_text());
    // MQTT over WebSocket has no hand-over form: a close frame, the end.
    let (op, payload) = mqtt.next().expect("a close frame");
    assert_eq!((op, &payload[..]), (0x8, &1000u16.to_be_bytes()[..]));
    assert_eq!(mqtt.next(), None);
    // The Tern one goes on, on the same socket.
    assert_eq!(carried_counts(&old.log_text()), [1]);
    tern.send(&[Frame::Ping { nonce: 5 }]);
    assert!(matches!(tern.recv(), OwnedFrame::Pong { nonce: 5 }));
}
