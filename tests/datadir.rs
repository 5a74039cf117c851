//! The data directory as a whole (issue 21), over real sockets and with the
//! real binary:
//!
//! - it is created 0700, and a start is refused when group or others can
//!   access it; a TLS key others can read is refused too;
//! - it records its shard count: an explicit other count is refused while
//!   messages are queued, `--shards 0` takes the recorded count (also on a
//!   process allowed one core), an empty directory takes the new count;
//! - `tern store reshard` re-homes every queued message (2 → 1 → 3), each is
//!   delivered exactly once with its id, sender, time and body, in order;
//!   killed with SIGKILL at every one of its steps and run again, it still
//!   loses and duplicates nothing; it is refused while a server runs;
//! - a data directory on tmpfs or under /tmp is warned about at start.
//!
//! Every wait has a generous bound and fails only if the expected event
//! never happens.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use common::*;
use tern::config::Config;
use tern::proto::OwnedFrame;
use tern::server::Server;
use tern_client::Client;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

// ---- helpers ----------------------------------------------------------------

/// A server on `data` with `shards` (0 = recorded / cores), its stats socket
/// fresh in `dir`.
fn start_on(
    dir: &Path,
    data: &Path,
    shards: usize,
    tweak: impl FnOnce(&mut Config),
) -> Result<Server, Box<dyn std::error::Error>> {
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let mut config = test_config(dir);
    config.data_dir = data.to_path_buf();
    config.shards = shards;
    config.stats_socket = dir.join(format!("s{}.sock", STARTS.fetch_add(1, Ordering::Relaxed)));
    tweak(&mut config);
    Server::start(config)
}

fn stop(server: Server) {
    server.shutdown();
    server.join();
}

/// `show info` value `key` of a running server.
fn info(server: &Server, key: &str) -> String {
    let text = tern::stats::query(server.stats_socket(), "show info").unwrap();
    parse_info(&text)
        .remove(key)
        .unwrap_or_else(|| panic!("show info has no {key}:\n{text}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// One message as its sender's ACK described it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Sent {
    to: u64,
    from: u64,
    server_id: u64,
    time_ms: u64,
    body: Vec<u8>,
}

/// Recipients spread over both shards of 2 (and so over 1 and 3 too).
fn recipients() -> Vec<u64> {
    let mut users = users_on(0, 2, 3);
    users.extend(users_on(1, 2, 3));
    users
}

const SENDERS: [u64; 2] = [90_001, 90_002];

/// Each sender sends `per_pair` messages to each (offline) recipient;
/// returns them as ACKed. `tag` keeps bodies of different rounds apart.
fn queue_messages(addr: SocketAddr, to: &[u64], per_pair: u64, tag: u64) -> Vec<Sent> {
    let mut sent = Vec::new();
    for &from in &SENDERS {
        let mut client = Client::login(addr, &token(from)).unwrap().0;
        let mut client_id = 0;
        for i in 0..per_pair {
            for &to in to {
                client_id += 1;
                let body = format!("round {tag} from {from} to {to} #{i}").into_bytes();
                client.send_msg(client_id, to, &body).unwrap();
                let (server_id, time_ms) = match client.recv_until(|f| {
                    matches!(f, OwnedFrame::Ack { client_id: c, .. } | OwnedFrame::Error { client_id: c, .. } if *c == client_id)
                }) {
                    Ok(OwnedFrame::Ack {
                        server_id,
                        server_time_ms,
                        ..
                    }) => (server_id, server_time_ms),
                    other => panic!("expected ACK of {client_id}, got {other:?}"),
                };
                sent.push(Sent {
                    to,
                    from,
                    server_id,
                    time_ms,
                    body,
                });
            }
        }
    }
    sent
}

/// Logs every recipient in, checks that exactly the messages of `expected`
/// come (count announced at login, ids, senders, times, bodies, and each
/// sender's order), answers DELIVERED, and checks (at a second login) that
/// nothing stays queued.
fn deliver_exactly(server: &Server, expected: &[Sent]) {
    let mut by_user: HashMap<u64, Vec<Sent>> = HashMap::new();
    for s in expected {
        by_user.entry(s.to).or_default().push(s.clone());
    }
    for (user, want) in by_user {
        let (mut client, login) = Client::login(server.local_addr(), &token(user)).unwrap();
        assert_eq!(login.offline_count, want.len() as u64, "user {user}");
        let got: Vec<Sent> = (0..want.len())
            .map(|_| {
                let d = recv_deliver(&mut client);
                Sent {
                    to: user,
                    from: d.from,
                    server_id: d.server_id,
                    time_ms: d.server_time_ms,
                    body: d.body,
                }
            })
            .collect();
        // Each sender's messages in the order they were sent.
        for from in SENDERS {
            let of = |v: &[Sent]| -> Vec<Sent> {
                v.iter().filter(|s| s.from == from).cloned().collect()
            };
            assert_eq!(of(&got), of(&want), "user {user}, sender {from}");
        }
        let mut sorted = got.clone();
        sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(sorted, want_sorted, "user {user}");
        for d in &got {
            client.send_delivered(d.server_id).unwrap();
        }
        // The PONG comes after every DELIVERED was handled.
        client.ping(7).unwrap();
        drop(client);
        // Nothing stays queued: no second copy of anything.
        let (_, again) = Client::login(server.local_addr(), &token(user)).unwrap();
        assert_eq!(again.offline_count, 0, "user {user}: left queued");
    }
}

/// Runs `tern store reshard`; returns (success, stdout, stderr).
fn reshard(data: &Path, shards: usize) -> (bool, String, String) {
    let out = Command::new(TERN)
        .args(["store", "reshard", "--shards", &shards.to_string()])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "info")
        .output()
        .expect("run tern store reshard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn reshard_ok(data: &Path, shards: usize) -> String {
    let (ok, stdout, stderr) = reshard(data, shards);
    assert!(ok, "reshard to {shards} failed:\n{stdout}\n{stderr}");
    stdout
}

/// Runs `tern store reshard` with the debug knob that pauses it at crash
/// point `step`, and SIGKILLs it there. Returns the pause line, or `None`
/// when the job finished (successfully) before that step.
fn reshard_killed_at(data: &Path, shards: usize, step: usize) -> Option<String> {
    let mut child = Command::new(TERN)
        .args([
            "store",
            "reshard",
            "--shards",
            &shards.to_string(),
            "--data-dir",
        ])
        .arg(data)
        .env("TERN_RESHARD_PAUSE_AT", step.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut paused = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains(&format!("paused at crash point {step} ")) {
            child.kill().unwrap(); // SIGKILL
            paused = Some(line);
            break;
        }
    }
    let status = child.wait().unwrap();
    if paused.is_none() {
        assert!(status.success(), "step {step}: reshard failed");
    }
    paused
}

/// `tern serve` as a child process; the stderr lines are collected.
struct Serve {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The first line with `listening on`, if it came.
    listening: Option<String>,
}

impl Serve {
    /// Spawns `tern serve ARGS`, and waits until it listens or exits.
    fn spawn(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Serve {
        let mut command = Command::new(TERN);
        command
            .env_remove("TERN_TOKEN_SECRET")
            .env("RUST_LOG", "info")
            .args(["serve", "--listen", "127.0.0.1:0", "--token-secret", SECRET])
            // The suite's backend (TERN_TEST_IO), as the in-process servers.
            .args([
                "--io",
                &std::env::var("TERN_TEST_IO").unwrap_or("auto".into()),
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        prepare(&mut command);
        let mut child = command.spawn().expect("spawn tern serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening on") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let listening = rx.recv_timeout(WAIT).ok();
        Serve {
            child,
            log,
            listening,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies a data directory (files and 0700 directories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    chmod(to, 0o700);
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A data directory of 2 shards holding `per_pair` messages from each
/// sender to each of [`recipients`]; returns what was queued.
fn queued_under_two_shards(dir: &Path, data: &Path, per_pair: u64) -> Vec<Sent> {
    let server = start_on(dir, data, 2, |_| {}).unwrap();
    let sent = queue_messages(server.local_addr(), &recipients(), per_pair, 1);
    stop(server);
    sent
}

// ---- privacy ----------------------------------------------------------------

#[test]
fn data_dir_is_created_private_and_refused_when_others_can_access_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var/lib/data");
    let server = start_on(dir.path(), &data, 2, |_| {}).unwrap();
    assert_eq!(mode(&data), 0o700);
    for shard in ["shard-0", "shard-1"] {
        assert_eq!(mode(&data.join(shard)), 0o700, "{shard}");
    }
    assert_eq!(mode(&data.join("tern.meta")), 0o600);
    assert_eq!(mode(&data.join("lock")), 0o600);
    stop(server);

    for bad in [0o755, 0o750, 0o701] {
        chmod(&data, bad);
        let err = start_on(dir.path(), &data, 2, |_| {})
            .err()
            .expect("a start on an open data dir is refused")
            .to_string();
        assert!(err.contains(&format!("mode {bad:04o}")), "{err}");
        assert!(
            err.contains(&format!("chmod 700 {}", data.display())),
            "{err}"
        );
    }
    // The binary says the same and exits non-zero.
    let serve = Serve::spawn(&["--data-dir", data.to_str().unwrap()], |c| {
        c.arg("--stats-socket").arg(dir.path().join("bin.sock"));
    });
    assert!(serve.listening.is_none(), "{}", serve.log());
    let mut serve = serve;
    let status = serve.child.wait().unwrap();
    assert!(!status.success());
    assert!(
        wait_for(|| serve
            .log()
            .contains(&format!("chmod 700 {}", data.display()))),
        "{}",
        serve.log()
    );

    chmod(&data, 0o700);
    stop(start_on(dir.path(), &data, 2, |_| {}).expect("0700 starts"));
}

#[test]
fn memory_durability_does_not_touch_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never");
    let server = start_on(dir.path(), &data, 2, |c| {
        c.durability = tern::store::Durability::Memory;
    })
    .unwrap();
    assert!(!data.exists());
    stop(server);
}

#[test]
fn tls_key_readable_by_others_is_refused_at_start_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let tls = |c: &mut Config| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = cert_path.clone();
        c.tls_key = key_path.clone();
    };

    chmod(&key_path, 0o644);
    let err = start_on(dir.path(), &dir.path().join("data"), 2, tls)
        .err()
        .expect("a key others can read is refused")
        .to_string();
    assert!(err.contains("tls_key"), "{err}");
    assert!(err.contains("mode 0644"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", key_path.display())),
        "{err}"
    );

    chmod(&key_path, 0o600);
    let server = start_on(dir.path(), &dir.path().join("data"), 2, tls).expect("0600 starts");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let config = tern_client::tls_config(&ca).unwrap();
    Client::login_tls(server.tls_addr().unwrap(), "localhost", &config, &token(5))
        .expect("TLS login with the 0600 key");
    server.reload_tls().expect("reload with 0600");
    // A key that became readable is not reloaded; the old one stays.
    chmod(&key_path, 0o640);
    let err = server.reload_tls().unwrap_err();
    assert!(err.contains("chmod 600"), "{err}");
    Client::login_tls(server.tls_addr().unwrap(), "localhost", &config, &token(5))
        .expect("TLS still works after the refused reload");
    stop(server);
}

// ---- recorded shard count ---------------------------------------------------

#[test]
fn other_explicit_shard_count_is_refused_while_messages_are_queued() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sent = queued_under_two_shards(dir.path(), &data, 2);
    let meta = std::fs::read_to_string(data.join("tern.meta")).unwrap();
    assert!(meta.contains("\nshards 2\n"), "{meta}");
    assert!(meta.contains("\nstore_format 1\n"), "{meta}");

    let err = start_on(dir.path(), &data, 1, |_| {})
        .err()
        .expect("--shards 1 on a 2-shard data dir with messages is refused")
        .to_string();
    let fix = format!(
        "tern store reshard --data-dir {} --shards 1",
        data.display()
    );
    assert!(err.contains(&fix), "{err}");
    assert!(err.contains("--shards 0"), "{err}");
    assert!(
        err.contains(&format!("{} queued messages", sent.len())),
        "{err}"
    );

    // The binary too.
    let mut serve = Serve::spawn(
        &["--shards", "1", "--data-dir", data.to_str().unwrap()],
        |c| {
            c.arg("--stats-socket").arg(dir.path().join("bin.sock"));
        },
    );
    assert!(serve.listening.is_none(), "{}", serve.log());
    assert!(!serve.child.wait().unwrap().success());
    assert!(wait_for(|| serve.log().contains(&fix)), "{}", serve.log());

    // --shards 0 takes the recorded 2, and everything is there.
    let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
    assert_eq!(info(&server, "Shards"), "2");
    deliver_exactly(&server, &sent);
    stop(server);
}

/// Linux: the process is limited to one CPU with sched_setaffinity, which
/// is what "one per core" counts there.
#[cfg(target_os = "linux")]
#[test]
fn shards_0_on_one_core_uses_the_recorded_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sent = queued_under_two_shards(dir.path(), &data, 1);
    let serve = Serve::spawn(
        &["--shards", "0", "--data-dir", data.to_str().unwrap()],
        |c| {
            c.arg("--stats-socket").arg(dir.path().join("bin.sock"));
            // SAFETY: only sched_setaffinity, async-signal-safe, between
            // fork and exec, on a set built before the fork.
            unsafe {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut one);
                std::os::unix::process::CommandExt::pre_exec(c, move || {
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let line = serve.listening.clone().unwrap_or_else(|| serve.log());
    assert!(line.contains(": 2 shards"), "{line}");
    let log = serve.log();
    assert!(
        log.contains("shards = 0: using the 2 shards recorded in")
            && log.contains("(1 cores available)"),
        "{log}"
    );
    // The queued messages are found where they were.
    let addr: SocketAddr = line
        .split_once("listening on ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .map(|(a, _)| a.trim().parse().unwrap())
        .unwrap();
    for user in recipients() {
        let (_, login) = Client::login(addr, &token(user)).unwrap();
        let want = sent.iter().filter(|s| s.to == user).count() as u64;
        assert_eq!(login.offline_count, want, "user {user}");
    }
}

#[test]
fn empty_data_dir_takes_a_new_explicit_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Users of shard 1 get and acknowledge messages; then a reshard to one
    // shard retires shard 1's log, nothing being queued.
    let users = users_on(1, 2, 2);
    let server = start_on(dir.path(), &data, 2, |_| {}).unwrap();
    let before = queue_messages(server.local_addr(), &users, 2, 0);
    deliver_exactly(&server, &before);
    stop(server);
    reshard_ok(&data, 1);

    let server = start_on(dir.path(), &data, 2, |_| {}).expect("nothing queued: 2 is fine");
    assert_eq!(info(&server, "Shards"), "2");
    let meta = std::fs::read_to_string(data.join("tern.meta")).unwrap();
    assert!(meta.contains("\nshards 2\n"), "{meta}");
    // Shard 1 starts a new log, and still never repeats an id.
    let after = queue_messages(server.local_addr(), &users, 2, 1);
    for m in &after {
        assert!(
            before.iter().all(|b| b.server_id != m.server_id),
            "id {} handed out twice",
            m.server_id
        );
    }
    deliver_exactly(&server, &after);
    stop(server);
}

#[test]
fn old_data_dir_without_meta_records_its_shard_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sent = queued_under_two_shards(dir.path(), &data, 1);
    // As an earlier version left it.
    std::fs::remove_file(data.join("tern.meta")).unwrap();
    let err = start_on(dir.path(), &data, 1, |_| {})
        .err()
        .expect("the inferred 2 shards protect the messages")
        .to_string();
    assert!(err.contains("tern store reshard"), "{err}");
    let meta = std::fs::read_to_string(data.join("tern.meta")).unwrap();
    assert!(meta.contains("\nshards 2\n"), "{meta}");
    let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
    deliver_exactly(&server, &sent);
    stop(server);
}

// ---- reshard ------------------------------------------------------------------

#[test]
fn reshard_2_to_1_to_3_delivers_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start_on(dir.path(), &data, 2, |_| {}).unwrap();
    let mut sent = queue_messages(server.local_addr(), &recipients(), 3, 1);
    // After a restart (each one moves a shard's ids up by a reserve), users
    // of shard 0 get and acknowledge messages: shard 0 handed out ids far
    // above every queued one, which a fresh log must not hand out again.
    stop(server);
    let server = start_on(dir.path(), &data, 2, |_| {}).unwrap();
    let others = users_on(0, 2, 6).split_off(3);
    let delivered = queue_messages(server.local_addr(), &others, 2, 0);
    deliver_exactly(&server, &delivered);
    stop(server);

    let out = reshard_ok(&data, 1);
    assert!(
        out.contains(&format!("re-homed {} messages", sent.len())),
        "{out}"
    );
    let server = start_on(dir.path(), &data, 1, |_| {}).expect("--shards 1 after reshard");
    // New messages continue each queue after the moved ones, and no id is
    // handed out twice (clients drop duplicates by id).
    let mut more = queue_messages(server.local_addr(), &recipients(), 1, 2);
    more.extend(queue_messages(server.local_addr(), &others, 2, 3));
    for m in &more {
        assert!(
            sent.iter()
                .chain(&delivered)
                .all(|s| s.server_id != m.server_id),
            "id {} handed out twice",
            m.server_id
        );
        let last = sent
            .iter()
            .filter(|s| s.to == m.to)
            .map(|s| s.server_id)
            .max();
        assert!(last < Some(m.server_id), "{m:?} not after {last:?}");
    }
    sent.extend(more);
    stop(server);

    reshard_ok(&data, 3);
    let (ok, again, _) = reshard(&data, 3);
    assert!(ok && again.contains("has 3 shards already"), "{again}");
    let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
    assert_eq!(info(&server, "Shards"), "3");
    deliver_exactly(&server, &sent);
    stop(server);
    assert!(!data.join("reshard.new").exists() && !data.join("reshard.old").exists());
}

#[test]
fn reshard_is_refused_while_a_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start_on(dir.path(), &data, 2, |_| {}).unwrap();
    let (ok, _, stderr) = reshard(&data, 1);
    assert!(!ok);
    assert!(stderr.contains("in use"), "{stderr}");
    stop(server);
}

/// A full disk (ENOSPC on a write of the new layout) and a failing fsync
/// (EIO) stop the reshard with an error that says what to do, leave the old
/// layout serving, and a rerun once the fault is gone finishes the job.
#[test]
fn reshard_that_finds_the_disk_full_or_failing_stops_and_reruns() {
    use tern::store::fault::{self, Op, Rule};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sent = queued_under_two_shards(dir.path(), &data, 2);
    let staging = format!("{}/reshard.new", data.display());
    for (op, errno, says) in [
        (Op::Write, libc::ENOSPC, "the disk is full"),
        (Op::Sync, libc::EIO, "Input/output error"),
    ] {
        fault::inject(Rule {
            path_contains: staging.clone(),
            op,
            skip: 0,
            times: u32::MAX,
            errno,
        });
        let err = tern::reshard::reshard(&data, 3, false).unwrap_err();
        fault::clear(&staging);
        assert!(err.contains(says), "{err}");
        assert!(err.contains("The old layout is untouched"), "{err}");
        assert!(err.contains("run the reshard again"), "{err}");
        let meta = std::fs::read_to_string(data.join("tern.meta")).unwrap();
        assert!(
            meta.contains("\nshards 2\n") && !meta.contains("reshard"),
            "{meta}"
        );
        // The old layout still serves everything.
        let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
        assert_eq!(info(&server, "Shards"), "2");
        for user in recipients() {
            let (_, login) = Client::login(server.local_addr(), &token(user)).unwrap();
            let want = sent.iter().filter(|s| s.to == user).count() as u64;
            assert_eq!(login.offline_count, want, "user {user}");
        }
        stop(server);
    }
    let report = tern::reshard::reshard(&data, 3, false).expect("rerun without the fault");
    assert_eq!(
        (report.from, report.to, report.messages),
        (2, 3, sent.len())
    );
    let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
    assert_eq!(info(&server, "Shards"), "3");
    deliver_exactly(&server, &sent);
    stop(server);
}

/// Kills `tern store reshard` with SIGKILL at each of its steps in turn
/// (every message copied, every shard built, the commit point, every
/// rename, the final record), then runs it again: every message is
/// delivered exactly once each time.
#[test]
fn reshard_killed_at_every_step_then_rerun_loses_and_duplicates_nothing() {
    const STEPS_MAX: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template");
    let sent = queued_under_two_shards(dir.path(), &template, 2);
    let mut killed = 0;
    for step in 1..=STEPS_MAX {
        let data = dir.path().join(format!("data-{step}"));
        copy_dir(&template, &data);
        let paused = reshard_killed_at(&data, 3, step).is_some();
        if paused {
            killed += 1;
            let meta = std::fs::read_to_string(data.join("tern.meta")).unwrap();
            if meta.contains("\nreshard 2 3\n") {
                // Past the commit point: serving must wait for the rerun.
                let err = start_on(dir.path(), &data, 0, |_| {})
                    .err()
                    .expect("a start during a reshard is refused")
                    .to_string();
                assert!(
                    err.contains("interrupted")
                        && err.contains(&format!(
                            "tern store reshard --data-dir {} --shards 3",
                            data.display()
                        )),
                    "{err}"
                );
            }
            if !meta.contains("reshard") {
                // Before the commit point the old layout still serves, after
                // the last record the new one; leftovers are removed.
                let recorded = if meta.contains("\nshards 2\n") {
                    "2"
                } else {
                    "3"
                };
                let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
                assert_eq!(info(&server, "Shards"), recorded, "step {step}");
                assert!(!data.join("reshard.new").exists(), "step {step}: leftover");
                assert!(!data.join("reshard.old").exists(), "step {step}: leftover");
                stop(server);
            }
            reshard_ok(&data, 3);
        }
        let server = start_on(dir.path(), &data, 0, |_| {}).unwrap();
        assert_eq!(info(&server, "Shards"), "3", "step {step}");
        deliver_exactly(&server, &sent);
        stop(server);
        std::fs::remove_dir_all(&data).unwrap();
        if !paused {
            break;
        }
        assert!(step < STEPS_MAX, "reshard never finished without a pause");
    }
    // Every message, shard, rename and record is a step.
    assert!(killed > sent.len() + 3 + 5, "only {killed} steps");
}

// ---- volatile places ------------------------------------------------------------

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn data_dir_on_tmpfs_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount (the tests run as root)");
    assert!(
        status.success(),
        "mount -t tmpfs failed (the tests run as root)"
    );
    let _mount = Tmpfs(mnt.clone());
    let data = mnt.join("data");
    let serve = Serve::spawn(&["--data-dir", data.to_str().unwrap()], |c| {
        c.arg("--stats-socket").arg(dir.path().join("bin.sock"));
    });
    assert!(serve.listening.is_some(), "{}", serve.log());
    let log = serve.log();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("data_dir"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains("on tmpfs"), "{warning}");
    assert!(warning.contains("/var/lib/tern"), "{warning}");
    drop(serve);
}

/// A data directory changed by hand in the middle of the switch is not
/// "finished" into something wrong: the rerun stops and says so.
#[test]
fn reshard_rerun_refuses_a_layout_changed_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sent = queued_under_two_shards(dir.path(), &data, 1);
    // Steps: each message, each of 3 new logs built, staged, committed, the
    // 2 old logs moved out, then the first new log moved in.
    let step = sent.len() + 3 + 2 + 2 + 1;
    let line = reshard_killed_at(&data, 3, step).expect("paused");
    assert!(line.contains("(new log moved in)"), "{line}");
    std::fs::remove_dir_all(data.join("reshard.new/shard-2")).unwrap();
    let (ok, _, stderr) = reshard(&data, 3);
    assert!(!ok);
    assert!(
        stderr.contains("was changed while a reshard was switching")
            && stderr.contains("reshard.old"),
        "{stderr}"
    );
}

#[test]
fn registered_devices_and_waiting_receipts_move_with_the_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Users homed on shard 1 of 2: at 3 shards some live elsewhere.
    let users = users_on(1, 2, 4);
    let registered = |server: &Server, user: u64| {
        let text = tern::stats::query(server.stats_socket(), &format!("show user {user}")).unwrap();
        parse_info(&text)["Devices_registered"].clone()
    };
    let server = start_on(dir.path(), &data, 2, |_| {}).unwrap();
    let addr = server.local_addr();
    for &user in &users {
        for device in [1, 2] {
            let token = device_token(user, device);
            drop(Client::login_version(addr, &token, tern::proto::VERSION_2).unwrap());
        }
    }
    for &user in &users {
        assert_eq!(registered(&server, user), "1 2", "user {user}");
    }
    stop(server);

    // A start with another count (nothing queued) moves them ...
    let server = start_on(dir.path(), &data, 3, |_| {}).unwrap();
    for &user in &users {
        assert_eq!(registered(&server, user), "1 2", "user {user}");
    }
    stop(server);
    // ... and so does `tern store reshard`.
    reshard_ok(&data, 1);
    let server = start_on(dir.path(), &data, 1, |_| {}).unwrap();
    for &user in &users {
        assert_eq!(registered(&server, user), "1 2", "user {user}");
    }
    stop(server);
}
