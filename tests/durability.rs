//! Durable store-and-forward (issue 5), end to end over real sockets:
//!
//! - `kill -9` at random moments under chat load: every ACKed message is
//!   delivered at least once, in order per sender (the real binary);
//! - the shard supervisor: a crashed shard restarts and replays its log while
//!   the other shard goes on (debug builds: `CRASH_USER`), and SENDs from
//!   the other shard caught in the crash are refused, not left unanswered;
//! - a graceful restart keeps the queues, ids and order; DELIVERED sticks;
//! - one process per data directory;
//! - a corrupt record in the middle of a log stops start-up, `repair` skips it;
//! - a full disk budget refuses with ERROR(storage_full) and drops nothing.
//!
//! At the end, an ignored helper writes the data directory behind the
//! recovery-time figure in `results/durability/`.
//!
//! Every wait has a generous bound and fails only if the expected event never
//! happens; nothing asserts how fast anything happened.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use tern::config::Config;
use tern::proto::{ErrorCode, OwnedFrame};
use tern::server::Server;
use tern_client::{Client, ClientError};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

// ---- helpers ----------------------------------------------------------------

/// splitmix64: a tiny seeded generator, so a failing run can be repeated
/// with `TERN_CRASH_SEED=<seed>` (the kill moments still race the load).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo);
        lo + self.next() % (hi - lo)
    }
}

/// The seed of the crash test: `TERN_CRASH_SEED` if set, else the clock.
fn crash_seed() -> u64 {
    match std::env::var("TERN_CRASH_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("TERN_CRASH_SEED={s:?} is not a u64")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// A server on `data` (stats socket in `dir`), changed by `tweak`.
fn start_on(
    dir: &Path,
    data: &Path,
    tweak: impl FnOnce(&mut Config),
) -> Result<Server, Box<dyn std::error::Error>> {
    let mut config = test_config(dir);
    config.data_dir = data.to_path_buf();
    tweak(&mut config);
    Server::start(config)
}

/// Sends `count` indexed messages (`first..`) from `client` to `to`, each
/// waited for; returns their server ids.
fn send_acked(client: &mut Client, to: u64, first: u64, count: u64, body_len: usize) -> Vec<u64> {
    (first..first + count)
        .map(|i| {
            client.send_msg(i, to, &indexed_body(i, body_len)).unwrap();
            recv_ack(client, i)
        })
        .collect()
}

/// Receives `n` DELIVERs without answering them.
fn recv_delivers(client: &mut Client, n: usize) -> Vec<Delivered> {
    (0..n).map(|_| recv_deliver(client)).collect()
}

/// Answers DELIVERED for each, then PINGs: the PONG proves the server has
/// handled (and committed) every DELIVERED before it.
fn answer_all(client: &mut Client, delivered: &[Delivered]) {
    for d in delivered {
        client.send_delivered(d.server_id).unwrap();
    }
    client.ping(0xd0e).unwrap();
}

/// The segment files of a data directory with their sizes, sorted.
fn segment_files(data: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(data).unwrap() {
        let shard = shard.unwrap().path();
        let is_shard_dir = shard
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("shard-"));
        if !is_shard_dir {
            continue;
        }
        for f in std::fs::read_dir(&shard).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().into_string().unwrap();
            if name.starts_with("0000000") && name.ends_with(".log") {
                files.push((f.path(), f.metadata().unwrap().len()));
            }
        }
    }
    files.sort();
    files
}

// ---- 1. kill -9 under chat load -------------------------------------------

/// Senders and recipients of the crash test.
/// Senders of the crash test, two homed on each shard.
const CRASH_SENDERS: usize = 4;
/// Recipients that stay online (logging in again after every kill), one
/// homed on each shard. A further recipient stays offline until the end,
/// so its messages pile up in the log: segments roll, mixed live and dead
/// records get compacted, and every restart replays many segments.
const CRASH_RECIPIENTS: usize = 2;
/// SENDs a crash-test sender has in flight (sent, not yet ACKed) at most.
const CRASH_WINDOW: usize = 8;
/// SIGKILL rounds.
const CRASH_ROUNDS: usize = 8;
/// New ACKs each round waits for before it picks its kill moment, so every
/// kill hits a server under load.
const CRASH_ACKS_PER_ROUND: u64 = 50;
/// Bound on the whole crash test, for any one loop in it.
const CRASH_BOUND: Duration = Duration::from_secs(120);
/// How long a client's receive waits before it looks at the flags again.
const POLL: Duration = Duration::from_millis(20);

/// A `tern serve` child process on a fixed data directory; killed when
/// dropped.
struct Serve {
    child: Child,
    addr: SocketAddr,
    /// Its stderr, line by line (the reader thread appends to the end).
    log: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    fn spawn(dir: &Path) -> Serve {
        let mut child = Command::new(TERN)
            .env_remove("TERN_TOKEN_SECRET")
            .env("RUST_LOG", "info")
            .args(["serve", "--listen", "127.0.0.1:0", "--shards", "2"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--stats-socket")
            .arg(dir.join("s.sock"))
            .args(["--token-secret", SECRET, "--durability", "fsync"])
            // Small segments: rolls, deletions and compactions happen
            // between the kills too.
            .args(["--segment-bytes-max", "16384"])
            // Recipients reconnect after every kill; never refuse a SEND
            // for a queue that grew meanwhile.
            .args(["--queue-len-max", "100000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        // Read stderr to the end so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, rest)) = line.split_once("listening on ") {
                    let addr = rest.split_once(": ").map_or(rest, |(a, _)| a);
                    let _ = tx.send(addr.trim().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(WAIT) {
            Ok(addr) => addr
                .parse()
                .unwrap_or_else(|e| panic!("bad address {addr:?}: {e}")),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tern serve never said `listening on` ({e}); its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Serve { child, addr, log }
    }

    /// SIGKILL, and reap it.
    fn kill9(mut self) -> Vec<String> {
        self.child.kill().expect("SIGKILL tern serve");
        self.child.wait().expect("reap tern serve");
        std::mem::take(&mut *self.log.lock().unwrap())
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

/// What the crash test's client threads share.
struct Load {
    /// The current server's address; changes at every restart.
    addr: Mutex<SocketAddr>,
    /// Senders send nothing new, finish what is in flight and stop.
    stop_sending: AtomicBool,
    /// Recipients stop (after a PING that proves their DELIVEREDs landed).
    stop_receiving: AtomicBool,
    /// A thread failed: everyone stops.
    abort: AtomicBool,
    /// ACKs received by all senders.
    acks: AtomicU64,
    deadline: Instant,
    seed: u64,
}

impl Load {
    /// Logs `user` in, retrying while the server is down or restarting.
    /// `None` once `stop` is set (or the test aborts).
    fn connect(&self, user: u64, stop: &AtomicBool) -> Option<Client> {
        let token = token(user);
        loop {
            if stop.load(Ordering::Relaxed) || self.abort.load(Ordering::Relaxed) {
                return None;
            }
            assert!(
                Instant::now() < self.deadline,
                "user {user} could not log in again (seed {})",
                self.seed
            );
            let addr = *self.addr.lock().unwrap();
            match Client::login(addr, &token) {
                Ok((mut client, _)) => {
                    client.set_read_timeout(WAIT);
                    return Some(client);
                }
                Err(ClientError::LoginRejected { code, text }) => {
                    panic!("login of {user} rejected: {code} {text}")
                }
                // Refused, reset, closed: the server is down; retry.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// Sets `abort` if the thread panics, so the others stop too.
struct AbortOnPanic<'a>(&'a AtomicBool);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Body of a crash-test message: sender, its sequence number, recipient.
fn crash_body(from: u64, seq: u64, to: u64) -> Vec<u8> {
    format!("{from}:{seq}:{to}:").into_bytes()
}

fn parse_crash_body(body: &[u8]) -> (u64, u64, u64) {
    let text = std::str::from_utf8(body).expect("utf-8 body");
    let mut parts = text.split(':').map(|p| p.parse::<u64>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(from)), Some(Ok(seq)), Some(Ok(to))) => (from, seq, to),
        _ => panic!("not a crash-test body: {text:?}"),
    }
}

/// What a sender saw.
#[derive(Default)]
struct SenderLog {
    /// `(seq, to, server_id)` of every ACK, in arrival order.
    acked: Vec<(u64, u64, u64)>,
    /// Sequence numbers sent more than once (in flight at a disconnect).
    resent: HashSet<u64>,
}

/// Sends numbered messages round-robin to `recipients`, at most
/// `CRASH_WINDOW` unACKed; after a disconnect it logs in again and resends
/// every unACKed message, in order, with the same number (its client id).
fn run_sender(load: &Load, user: u64, recipients: &[u64]) -> SenderLog {
    let _guard = AbortOnPanic(&load.abort);
    let never = AtomicBool::new(false);
    let mut log = SenderLog::default();
    // (seq, to), oldest first.
    let mut unacked: VecDeque<(u64, u64)> = VecDeque::new();
    let mut next_seq = 1u64;
    let mut client: Option<Client> = None;
    loop {
        assert!(
            Instant::now() < load.deadline,
            "sender {user} did not finish (seed {})",
            load.seed
        );
        if load.abort.load(Ordering::Relaxed) {
            return log;
        }
        let stopping = load.stop_sending.load(Ordering::Relaxed);
        if stopping && unacked.is_empty() {
            return log;
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => {
                let Some(mut c) = load.connect(user, &never) else {
                    return log;
                };
                let resent = unacked.iter().all(|&(seq, to)| {
                    log.resent.insert(seq);
                    c.send_msg(seq, to, &crash_body(user, seq, to)).is_ok()
                });
                if !resent {
                    continue;
                }
                client.insert(c)
            }
        };
        if !stopping && unacked.len() < CRASH_WINDOW {
            let to = recipients[next_seq as usize % recipients.len()];
            // In flight from here on: if the write fails it is resent.
            unacked.push_back((next_seq, to));
            let sent = c.send_msg(next_seq, to, &crash_body(user, next_seq, to));
            next_seq += 1;
            if sent.is_err() {
                client = None;
            }
            continue;
        }
        match c.recv_timeout(POLL) {
            Ok(Some(OwnedFrame::Ack {
                client_id,
                server_id,
                ..
            })) => {
                let at = unacked
                    .iter()
                    .position(|&(seq, _)| seq == client_id)
                    .unwrap_or_else(|| {
                        panic!("sender {user}: ACK for {client_id}, which is not in flight")
                    });
                let (seq, to) = unacked.remove(at).unwrap();
                log.acked.push((seq, to, server_id));
                load.acks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(OwnedFrame::Error {
                code,
                client_id,
                text,
            })) => panic!("sender {user}: ERROR({code}) for {client_id}: {text}"),
            Ok(Some(_)) | Ok(None) => {} // receipts; nothing yet
            Err(_) => client = None,     // the server went away
        }
    }
}

/// One DELIVER a recipient saw.
#[derive(Clone, Copy, Debug)]
struct Got {
    /// Which of the recipient's connections (0, 1, ...) it came on.
    conn: u32,
    server_id: u64,
    from: u64,
    seq: u64,
}

/// Stays logged in (again after every kill), records every DELIVER and
/// answers DELIVERED. On `stop_receiving` it PINGs, so every DELIVERED it
/// sent has been handled, and leaves.
fn run_recipient(load: &Load, user: u64) -> Vec<Got> {
    let _guard = AbortOnPanic(&load.abort);
    let mut got = Vec::new();
    let mut conn = 0;
    let mut client: Option<Client> = None;
    loop {
        assert!(
            Instant::now() < load.deadline,
            "recipient {user} did not finish (seed {})",
            load.seed
        );
        if load.abort.load(Ordering::Relaxed) {
            return got;
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => {
                let Some(c) = load.connect(user, &load.stop_receiving) else {
                    return got;
                };
                conn += 1;
                client.insert(c)
            }
        };
        if load.stop_receiving.load(Ordering::Relaxed) {
            // Senders are done, so no kill comes any more: this must work.
            c.ping(u64::from(conn))
                .unwrap_or_else(|e| panic!("recipient {user}: final PING: {e}"));
            // Any DELIVER that came before the PONG is in the backlog.
            while let Ok(Some(frame)) = c.recv_timeout(Duration::ZERO) {
                if let OwnedFrame::Deliver {
                    server_id, body, ..
                } = frame
                {
                    let (from, seq, to) = parse_crash_body(&body);
                    assert_eq!(to, user, "DELIVER for another user");
                    got.push(Got {
                        conn,
                        server_id,
                        from,
                        seq,
                    });
                }
            }
            return got;
        }
        match c.recv_timeout(POLL) {
            Ok(Some(OwnedFrame::Deliver {
                server_id,
                from,
                body,
                ..
            })) => {
                let (body_from, seq, to) = parse_crash_body(&body);
                assert_eq!((body_from, to), (from, user), "DELIVER fields disagree");
                got.push(Got {
                    conn,
                    server_id,
                    from,
                    seq,
                });
                if c.send_delivered(server_id).is_err() {
                    client = None;
                }
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(_) => client = None,
        }
    }
}

/// Logs `user` in once more after the load, takes every queued message
/// (answering DELIVERED) and checks the queue is then empty.
fn final_drain(addr: SocketAddr, user: u64, conn: u32) -> Vec<Got> {
    let (mut client, info) = Client::login(addr, &token(user)).expect("final login");
    let mut got = Vec::new();
    for _ in 0..info.offline_count {
        let d = recv_deliver(&mut client);
        let (from, seq, to) = parse_crash_body(&d.body);
        assert_eq!((from, to), (d.from, user));
        got.push(Got {
            conn,
            server_id: d.server_id,
            from,
            seq,
        });
        client.send_delivered(d.server_id).unwrap();
    }
    client.ping(1).unwrap();
    drop(client);
    let (mut again, info) = Client::login(addr, &token(user)).expect("login after the drain");
    assert_eq!(
        info.offline_count, 0,
        "user {user}: queue not empty after the drain"
    );
    again.ping(2).unwrap();
    assert_eq!(
        again.backlog_len(),
        0,
        "user {user}: frames after the drain"
    );
    got
}

/// The crash test's verdict on one recipient's DELIVERs. Returns
/// `(server-id duplicates, payload duplicates)`.
fn check_recipient(
    seed: u64,
    user: u64,
    got: &[Got],
    senders: &HashMap<u64, SenderLog>,
) -> (usize, usize) {
    // Same server id twice: only on different connections (a DELIVERED
    // in flight at a kill, or a DELIVER never answered before it).
    let mut by_id: HashMap<u64, Got> = HashMap::new();
    let mut first_copies = Vec::new();
    let mut id_dups = 0;
    for g in got {
        match by_id.get(&g.server_id) {
            None => {
                by_id.insert(g.server_id, *g);
                first_copies.push(*g);
            }
            Some(first) => {
                id_dups += 1;
                assert_ne!(
                    first.conn, g.conn,
                    "seed {seed}: recipient {user} got server id {} twice on one connection",
                    g.server_id
                );
                assert_eq!(
                    (first.from, first.seq),
                    (g.from, g.seq),
                    "seed {seed}: server id {} with two payloads",
                    g.server_id
                );
            }
        }
    }
    // Same payload under two server ids: only for a message its sender
    // resent (its ACK was in flight at a kill). Per sender, the first
    // copies come in increasing order.
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut payload_dups = 0;
    for g in &first_copies {
        if !seen.insert((g.from, g.seq)) {
            payload_dups += 1;
            assert!(
                senders[&g.from].resent.contains(&g.seq),
                "seed {seed}: recipient {user} got {}:{} under two server ids, but it was \
                 sent only once",
                g.from,
                g.seq
            );
            continue;
        }
        let last = last_seq.entry(g.from).or_insert(0);
        assert!(
            g.seq > *last,
            "seed {seed}: recipient {user} got {}:{} after {}:{}: out of order",
            g.from,
            g.seq,
            g.from,
            last
        );
        *last = g.seq;
    }
    // Every ACKed message to this recipient arrived, under its ACKed id.
    for (&from, log) in senders {
        for &(seq, to, server_id) in &log.acked {
            if to != user {
                continue;
            }
            let g = by_id.get(&server_id).unwrap_or_else(|| {
                panic!(
                    "seed {seed}: {from}:{seq} was ACKed as server id {server_id} but never \
                     delivered to {user}"
                )
            });
            assert_eq!(
                (g.from, g.seq),
                (from, seq),
                "seed {seed}: ACKed id, other payload"
            );
        }
    }
    (id_dups, payload_dups)
}

/// `kill -9` at random moments under chat load, restart on the same data
/// directory, clients reconnect: every ACKed message is delivered at least
/// once and, per sender, in order.
#[test]
fn kill_9_under_load_loses_no_acked_message() {
    let seed = crash_seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::spawn(dir.path());
    let load = Arc::new(Load {
        addr: Mutex::new(serve.addr),
        stop_sending: AtomicBool::new(false),
        stop_receiving: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        acks: AtomicU64::new(0),
        deadline: Instant::now() + CRASH_BOUND,
        seed,
    });
    // If this thread fails, the client threads stop too.
    let _abort = AbortOnPanic(&load.abort);
    // Senders and recipients spread over both shards.
    let per_shard = (CRASH_SENDERS + CRASH_RECIPIENTS) / SHARDS;
    let (mut senders, mut recipients) = (Vec::new(), Vec::new());
    for shard in 0..SHARDS {
        let users = users_on(shard, SHARDS, per_shard + 1);
        recipients.extend_from_slice(&users[..CRASH_RECIPIENTS / SHARDS]);
        senders.extend_from_slice(&users[CRASH_RECIPIENTS / SHARDS..per_shard]);
    }
    assert_eq!(
        (senders.len(), recipients.len()),
        (CRASH_SENDERS, CRASH_RECIPIENTS)
    );
    let offline = users_on(1, SHARDS, per_shard + 1)[per_shard];
    let mut all_recipients = recipients.clone();
    all_recipients.push(offline);
    let recipient_threads: Vec<_> = recipients
        .iter()
        .map(|&r| {
            let load = load.clone();
            std::thread::spawn(move || (r, run_recipient(&load, r)))
        })
        .collect();
    let sender_threads: Vec<_> = senders
        .iter()
        .map(|&s| {
            let load = load.clone();
            let to = all_recipients.clone();
            std::thread::spawn(move || (s, run_sender(&load, s, &to)))
        })
        .collect();

    let mut recoveries = Vec::new();
    for round in 0..CRASH_ROUNDS {
        let target = load.acks.load(Ordering::Relaxed) + CRASH_ACKS_PER_ROUND;
        let loaded = wait_for(|| {
            load.acks.load(Ordering::Relaxed) >= target || load.abort.load(Ordering::Relaxed)
        });
        assert!(loaded, "seed {seed}: round {round}: no ACKs came");
        if load.abort.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 700)));
        serve.kill9();
        // Sometimes restart at once, sometimes let the clients fail a while.
        std::thread::sleep(Duration::from_millis(rng.range(0, 200)));
        serve = Serve::spawn(dir.path());
        recoveries.extend(
            serve
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("store recovered:"))
                .cloned(),
        );
        *load.addr.lock().unwrap() = serve.addr;
    }
    // Some load on the last server too, then finish.
    let target = load.acks.load(Ordering::Relaxed) + CRASH_ACKS_PER_ROUND;
    wait_for(|| load.acks.load(Ordering::Relaxed) >= target || load.abort.load(Ordering::Relaxed));
    load.stop_sending.store(true, Ordering::Relaxed);
    let mut logs = HashMap::new();
    let mut failed = None;
    for t in sender_threads {
        match t.join() {
            Ok((s, log)) => {
                logs.insert(s, log);
            }
            Err(panic) => failed = Some(panic),
        }
    }
    load.stop_receiving.store(true, Ordering::Relaxed);
    let mut received = HashMap::new();
    received.insert(offline, Vec::new());
    for t in recipient_threads {
        match t.join() {
            Ok((r, got)) => {
                received.insert(r, got);
            }
            Err(panic) => failed = Some(panic),
        }
    }
    if let Some(panic) = failed {
        eprintln!(
            "seed {seed}; server log:\n{}",
            serve.log.lock().unwrap().join("\n")
        );
        std::panic::resume_unwind(panic);
    }

    let mut summary = Vec::new();
    for (&r, got) in received.iter_mut() {
        let last_conn = got.iter().map(|g| g.conn).max().unwrap_or(0);
        got.extend(final_drain(serve.addr, r, last_conn + 1));
        let (id_dups, payload_dups) = check_recipient(seed, r, got, &logs);
        summary.push(format!(
            "recipient {r}: {} DELIVERs, {id_dups} redelivered, {payload_dups} resent copies",
            got.len()
        ));
    }
    let acked: usize = logs.values().map(|l| l.acked.len()).sum();
    let resent: usize = logs.values().map(|l| l.resent.len()).sum();
    assert!(acked > 0, "seed {seed}: nothing was ACKed");
    eprintln!(
        "kill -9 test, seed {seed}: {CRASH_ROUNDS} kills, {acked} ACKed, {resent} resent; {}\n{}",
        summary.join("; "),
        recoveries.join("\n")
    );
    let _ = serve.kill9();
}

// ---- 2. the shard supervisor ------------------------------------------------

/// A SEND to `CRASH_USER` crashes its shard outside any connection's
/// handling: the supervisor restarts it (`Restarts: 1`), its connections
/// drop, its log is replayed, and the other shard's clients never notice.
#[cfg(debug_assertions)]
#[test]
fn crashed_shard_restarts_replays_its_log_and_spares_the_other() {
    let srv = TestServer::start();
    let crashed = users_on(1, SHARDS, 3);
    let (offline, online, crasher) = (crashed[0], crashed[1], crashed[2]);
    let spared = users_on(0, SHARDS, 2);
    let (x, y) = (spared[0], spared[1]);
    let mut xc = srv.login(x);
    let mut yc = srv.login(y);

    // Queued for `offline` (homed on the shard about to crash), ACKed.
    let ids = send_acked(&mut xc, offline, 1, 5, 40);
    // `offline` comes online and gets them, but answers nothing: at the
    // crash they are between ACK and DELIVERED.
    let mut oc = srv.login(offline);
    let first = recv_delivers(&mut oc, 5);
    assert_eq!(first.iter().map(|d| d.server_id).collect::<Vec<_>>(), ids);
    let mut wc = srv.login(online);
    wc.ping(1).unwrap();
    let mut cc = srv.login(crasher);
    cc.ping(1).unwrap();
    assert_eq!(srv.info_u64("Restarts"), 0);

    cc.send_msg(1, tern::shard::CRASH_USER, b"crash").unwrap();
    srv.wait_info("Restarts", |n| n == 1);

    // Every connection of the crashed shard dropped.
    for (who, c) in [
        ("crasher", &mut cc),
        ("online", &mut wc),
        ("offline", &mut oc),
    ] {
        let rest = c
            .wait_closed(WAIT)
            .unwrap_or_else(|e| panic!("{who}'s connection stayed open: {e}"));
        assert!(
            rest.iter().all(|f| !matches!(f, OwnedFrame::Ack { .. })),
            "{who}: {rest:?}"
        );
    }
    // The other shard's clients kept their connections and go on.
    xc.ping(2).unwrap();
    yc.ping(2).unwrap();
    xc.send_msg(100, y, b"still here").unwrap();
    recv_ack(&mut xc, 100);
    let d = recv_deliver(&mut yc);
    assert_eq!(d.body, b"still here");
    yc.send_delivered(d.server_id).unwrap();
    assert_eq!(
        srv.info_u64("Panics"),
        0,
        "the crash is not a connection panic"
    );

    // The restart follows a backoff, during which logins get unavailable.
    assert!(wait_for(|| !srv
        .query("show shards")
        .contains("restarting")));
    // The replayed log gives `offline` the same messages, ids and order.
    let (mut oc, info) = srv.login_info(offline);
    assert_eq!(info.offline_count, 5);
    let again = recv_delivers(&mut oc, 5);
    assert_eq!(again, first, "replayed messages differ");
    answer_all(&mut oc, &again);
    // The restarted shard serves: new ids follow the replayed ones.
    let mut wc = srv.login(online);
    let new_id = send_acked(&mut xc, online, 200, 1, 10)[0];
    assert!(
        new_id > *ids.last().unwrap(),
        "id {new_id} reused after restart"
    );
    let d = recv_deliver(&mut wc);
    assert_eq!(d.server_id, new_id);
    wc.send_delivered(d.server_id).unwrap();
    wc.ping(3).unwrap();
    assert_eq!(srv.info_u64("Restarts"), 1);
}

/// The answers a sender got: ACKs, ERROR(internal) (taken but not stored
/// when the shard crashed) and ERROR(unavailable) (sent while it was
/// restarting), nothing else.
#[derive(Default)]
struct Tally {
    /// Client ids answered this round.
    answered: HashSet<u64>,
    /// Server ids of the ACKs, in arrival order.
    acked: Vec<u64>,
    refused: u64,
}

impl Tally {
    /// Waits (up to the read timeout) for the next answer and counts it.
    fn take(&mut self, client: &mut Client) {
        let client_id = match client.recv() {
            Ok(OwnedFrame::Ack {
                client_id,
                server_id,
                ..
            }) => {
                self.acked.push(server_id);
                client_id
            }
            Ok(OwnedFrame::Error {
                code: ErrorCode::Internal | ErrorCode::Unavailable,
                client_id,
                ..
            }) => {
                self.refused += 1;
                client_id
            }
            other => panic!("expected ACK or ERROR(internal|unavailable), got {other:?}"),
        };
        assert!(
            self.answered.insert(client_id),
            "two answers for {client_id}"
        );
    }
}

/// SENDs from the spared shard that the crashing shard had taken but not yet
/// committed are answered ERROR(internal) (not stored: resend), never left
/// without an answer on a connection that stays open; every ACKed one, and
/// only those, is delivered, in order.
#[cfg(debug_assertions)]
#[test]
fn sends_caught_in_a_shard_crash_are_refused_not_forgotten() {
    /// SENDs per write of the streaming sender.
    const CHUNK: u64 = 50;
    /// Bound on the SENDs of one round.
    const ROUND_SENDS_MAX: u64 = 50_000;
    /// ACKs seen before the crash, so the stream is flowing.
    const ACKS_BEFORE_CRASH: usize = 200;
    /// Crashes tried until one catches SENDs in flight (nearly always the
    /// first: the stream keeps the ring to the crashing shard busy).
    const ROUNDS_MAX: u64 = 3;
    // The stream outruns the per-user SEND limit on a quick box; the test
    // is about the crash, not the limit.
    let srv = TestServer::start_with(|c| {
        c.queue_len_max = 1_000_000;
        c.sends_per_s_max = 0;
    });
    let crashed = users_on(1, SHARDS, 2);
    let (offline, crasher) = (crashed[0], crashed[1]);
    let x = users_on(0, SHARDS, 1)[0];
    let mut xc = srv.login(x);
    let mut tally = Tally::default();
    let mut first = 1;
    for round in 1..=ROUNDS_MAX {
        // Logins wait for the restart's backoff (they get unavailable meanwhile).
        assert!(wait_for(|| !srv
            .query("show shards")
            .contains("restarting")));
        let mut cc = srv.login(crasher);
        let stop = Arc::new(AtomicBool::new(false));
        let mut writer = xc.try_clone_stream().unwrap();
        let streaming = stop.clone();
        // Streams SENDs first.. until told to stop; returns the next id.
        let stream = std::thread::spawn(move || {
            use std::io::Write;
            let mut next = first;
            while !streaming.load(Ordering::Relaxed) && next < first + ROUND_SENDS_MAX {
                let frames: Vec<_> = (next..next + CHUNK)
                    .map(|i| tern::proto::Frame::Send {
                        client_id: i,
                        to: offline,
                        body: b"m",
                    })
                    .collect();
                writer.write_all(&encode_all(&frames)).unwrap();
                next += CHUNK;
                std::thread::sleep(Duration::from_micros(200));
            }
            next
        });
        tally.answered.clear();
        for _ in 0..ACKS_BEFORE_CRASH {
            tally.take(&mut xc);
        }
        cc.send_msg(1, tern::shard::CRASH_USER, b"crash").unwrap();
        srv.wait_info("Restarts", |n| n == round);
        stop.store(true, Ordering::Relaxed);
        let next = stream.join().unwrap();
        // Every SEND gets its answer (`recv` fails after WAIT otherwise).
        while (tally.answered.len() as u64) < next - first {
            tally.take(&mut xc);
        }
        cc.wait_closed(WAIT)
            .expect("the crasher's connection dropped");
        first = next;
        if tally.refused > 0 {
            break;
        }
    }
    let Tally { acked, refused, .. } = tally;
    eprintln!(
        "{} ACKed, {refused} refused with ERROR(internal)",
        acked.len()
    );

    // Exactly the ACKed messages are stored, in the order of their ACKs.
    assert!(wait_for(|| !srv
        .query("show shards")
        .contains("restarting")));
    let (mut oc, info) = srv.login_info(offline);
    assert_eq!(info.offline_count, acked.len() as u64);
    // More than `deliver_inflight_max`: answer as they come.
    let got: Vec<u64> = (0..acked.len())
        .map(|_| {
            let d = recv_deliver(&mut oc);
            oc.send_delivered(d.server_id).unwrap();
            d.server_id
        })
        .collect();
    assert_eq!(got, acked);
    oc.ping(1).unwrap();
    assert_eq!(oc.backlog_len(), 0, "a refused message was stored");
}

// ---- 3. graceful restart ----------------------------------------------------

/// Queued messages survive a graceful restart with their ids and order; a
/// message answered with DELIVERED never comes back.
#[test]
fn restart_replays_queued_messages_and_forgets_delivered_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (x, offline) = cross_pair();
    let (_, same_shard) = same_pair();
    let fsync = |c: &mut Config| c.durability = tern::store::Durability::Fsync;

    let mut ids = HashMap::new();
    {
        let srv = TestServer::start_with(|c| {
            fsync(c);
            c.data_dir = data.clone();
        });
        let mut xc = srv.login(x);
        ids.insert(offline, send_acked(&mut xc, offline, 1, 20, 100));
        ids.insert(same_shard, send_acked(&mut xc, same_shard, 21, 3, 0));
        // Delivered and answered before the restart: must not come back.
        let mut sc = srv.login(same_shard);
        let d = recv_delivers(&mut sc, 3);
        answer_all(&mut sc, &d[..1]);
        ids.get_mut(&same_shard).unwrap().remove(0);
    }
    {
        let srv = TestServer::start_with(|c| {
            fsync(c);
            c.data_dir = data.clone();
        });
        let (mut oc, info) = srv.login_info(offline);
        assert_eq!(info.offline_count, 20);
        let got = recv_delivers(&mut oc, 20);
        assert_eq!(
            got.iter().map(|d| d.server_id).collect::<Vec<_>>(),
            ids[&offline],
            "ids or order changed across the restart"
        );
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.from, x);
            assert_eq!(d.body, indexed_body(i as u64 + 1, 100));
        }
        answer_all(&mut oc, &got);

        let (mut sc, info) = srv.login_info(same_shard);
        assert_eq!(info.offline_count, 2, "a DELIVERED message came back");
        let got_s = recv_delivers(&mut sc, 2);
        assert_eq!(
            got_s.iter().map(|d| d.server_id).collect::<Vec<_>>(),
            ids[&same_shard]
        );
        answer_all(&mut sc, &got_s);
        // Ids continue after the replayed ones.
        let mut xc = srv.login(x);
        let new_id = send_acked(&mut xc, same_shard, 100, 1, 0)[0];
        assert!(new_id > *ids[&same_shard].last().unwrap());
        let d = recv_deliver(&mut sc);
        answer_all(&mut sc, &[d]);
    }
    // Everything was answered: nothing is delivered again.
    let srv = TestServer::start_with(|c| {
        fsync(c);
        c.data_dir = data.clone();
    });
    for user in [offline, same_shard] {
        let (mut c, info) = srv.login_info(user);
        assert_eq!(
            info.offline_count, 0,
            "user {user}: delivered messages came back"
        );
        // DELIVERs would be written at login, before the PONG.
        c.ping(7).unwrap();
        assert_eq!(c.backlog_len(), 0, "user {user}: redelivered");
    }
}

// ---- 4. one process per data directory --------------------------------------

/// A second server on a data directory in use refuses to start, and says
/// which directory; once the first is gone the directory is free again.
#[test]
fn second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = start_on(dir.path(), &data, |_| {}).expect("first server starts");

    let other = tempfile::tempdir().unwrap();
    let err = match start_on(other.path(), &data, |_| {}) {
        Ok(second) => {
            second.shutdown();
            second.join();
            panic!("a second server started on {}", data.display());
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&data.display().to_string()), "{err}");
    assert!(err.contains("in use"), "{err}");

    // The real binary says the same on stderr and exits non-zero.
    let mut child = Command::new(TERN)
        .env_remove("TERN_TOKEN_SECRET")
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--stats-socket")
        .arg(other.path().join("bin.sock"))
        .args(["--token-secret", SECRET])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern serve");
    let exited = wait_for(|| child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a second tern serve kept running on {}", data.display());
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&data.display().to_string()) && stderr.contains("in use"),
        "{stderr}"
    );

    first.shutdown();
    first.join();
    let again = start_on(dir.path(), &data, |_| {}).expect("the lock is released at exit");
    again.shutdown();
    again.join();
}

// ---- 5. corrupt log -----------------------------------------------------------

/// Garbage in the middle of a segment stops start-up with an error naming
/// the file and the record's offset; `repair` skips that record and keeps
/// the rest, and the next start needs no repair.
#[test]
fn corrupt_record_in_the_middle_is_refused_unless_repair() {
    const MSGS: u64 = 10;
    const BAD: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (x, offline) = cross_pair();
    let ids = {
        let srv = TestServer::start_with(|c| c.data_dir = data.clone());
        let mut xc = srv.login(x);
        send_acked(&mut xc, offline, 1, MSGS, 64)
    };
    let files: Vec<_> = segment_files(&data)
        .into_iter()
        .filter(|(_, len)| *len > 0)
        .collect();
    assert_eq!(files.len(), 1, "one segment holds the messages: {files:?}");
    let (path, len) = files[0].clone();
    // Only Queued records, all of one size.
    assert_eq!(len % MSGS, 0, "{len} bytes for {MSGS} records");
    let record = len / MSGS;
    let at = BAD * record;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(at + record / 2)).unwrap();
        f.write_all(&[0xa5; 8]).unwrap();
    }

    let err = match start_on(dir.path(), &data, |_| {}) {
        Ok(srv) => {
            srv.shutdown();
            srv.join();
            panic!("started on a log with a corrupt record");
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains(&format!("offset {at}")), "{err}");

    let expected: Vec<u64> = ids
        .iter()
        .enumerate()
        .filter(|&(i, _)| i as u64 != BAD)
        .map(|(_, &id)| id)
        .collect();
    {
        let srv = TestServer::start_with(|c| {
            c.data_dir = data.clone();
            c.repair = true;
        });
        let (mut oc, info) = srv.login_info(offline);
        assert_eq!(info.offline_count, MSGS - 1);
        let got = recv_delivers(&mut oc, (MSGS - 1) as usize);
        assert_eq!(
            got.iter().map(|d| d.server_id).collect::<Vec<_>>(),
            expected
        );
    }
    // Repaired on disk: a plain start works and keeps the same queue.
    let srv = TestServer::start_with(|c| c.data_dir = data.clone());
    let (mut oc, info) = srv.login_info(offline);
    assert_eq!(info.offline_count, MSGS - 1);
    let got = recv_delivers(&mut oc, (MSGS - 1) as usize);
    assert_eq!(
        got.iter().map(|d| d.server_id).collect::<Vec<_>>(),
        expected
    );
}

// ---- 6. storage full ----------------------------------------------------------

/// With a tiny disk budget, SENDs to an offline user end in
/// ERROR(storage_full) carrying their client id; everything ACKed before is
/// delivered, and delivering frees the space again.
#[test]
fn full_disk_budget_refuses_new_messages_and_keeps_the_old() {
    const SEGMENT: u64 = 4096;
    const BODY: usize = 200;
    // Each message takes ~250 bytes of the 8 KiB budget: ~32 fit.
    const TRIES: u64 = 1000;
    let (x, offline) = cross_pair();
    let srv = TestServer::start_with(|c| {
        c.segment_bytes_max = SEGMENT;
        c.disk_bytes_max = 2 * SEGMENT;
    });
    let mut xc = srv.login(x);
    let mut acked = Vec::new();
    let mut refused_at = None;
    for i in 1..=TRIES {
        xc.send_msg(i, offline, &indexed_body(i, BODY)).unwrap();
        match ack_or_error(&mut xc, i) {
            Ok(id) => acked.push(id),
            Err(code) => {
                assert_eq!(code, ErrorCode::StorageFull, "client id {i}");
                refused_at = Some(i);
                break;
            }
        }
    }
    let refused_at = refused_at.expect("the disk budget never ran out");
    assert!(!acked.is_empty(), "the first message was refused");
    // Still full: the next ones are refused too, each with its own id.
    for i in refused_at + 1..refused_at + 3 {
        xc.send_msg(i, offline, &indexed_body(i, BODY)).unwrap();
        assert_eq!(ack_or_error(&mut xc, i), Err(ErrorCode::StorageFull));
    }
    srv.wait_metric("tern_storage_full_total", |n| n == 3);

    // Nothing ACKed was dropped.
    let (mut oc, info) = srv.login_info(offline);
    assert_eq!(info.offline_count, acked.len() as u64);
    let got = recv_delivers(&mut oc, acked.len());
    assert_eq!(got.iter().map(|d| d.server_id).collect::<Vec<_>>(), acked);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.body, indexed_body(i as u64 + 1, BODY));
    }
    answer_all(&mut oc, &got);
    drop(oc);

    // Delivered messages give their space back.
    let mut next = refused_at + 10;
    let accepted = wait_for(|| {
        next += 1;
        xc.send_msg(next, offline, &indexed_body(next, BODY))
            .unwrap();
        ack_or_error(&mut xc, next).is_ok()
    });
    assert!(
        accepted,
        "still storage_full after every message was delivered"
    );
}

// ---- figures helper -----------------------------------------------------------

/// Not a test: writes a data directory for the recovery-time figure
/// (`results/durability/README.md`), as a 2-shard server would have left it.
///
/// `TERN_FILL_DIR` (required) is the data directory, `TERN_FILL_MIB` the
/// log bytes over both shards (default 1024), `TERN_FILL_BODY_BYTES` the
/// body size (default 200), `TERN_FILL_DELIVERED_PCT` the share of messages
/// delivered again (tombstoned) while filling (default 0: all queued).
#[test]
#[ignore = "writes a GiB; run explicitly, in release, for the figures"]
fn fill_data_dir_for_recovery_figure() {
    use tern::store::{shard_dir, Durability, LogOptions, LogStore, Store, Stored};
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
            .unwrap_or(default)
    };
    let data = PathBuf::from(std::env::var_os("TERN_FILL_DIR").expect("TERN_FILL_DIR"));
    let bytes_per_shard = (env("TERN_FILL_MIB", 1024) << 20) / SHARDS as u64;
    let body_bytes = env("TERN_FILL_BODY_BYTES", 200) as usize;
    let delivered_pct = env("TERN_FILL_DELIVERED_PCT", 0);
    assert!(delivered_pct < 100);
    /// Users per shard: queues of a few thousand messages each at most.
    const USERS: usize = 10_000;
    /// Messages per commit.
    const BATCH: u64 = 4096;
    let options = LogOptions {
        durability: Durability::Os,
        queue_len_max: 1_000_000,
        ..LogOptions::default()
    };
    let started = Instant::now();
    let mut messages = 0u64;
    for shard in 0..SHARDS {
        let users = users_on(shard, SHARDS, USERS);
        let (mut store, _) = LogStore::open(shard_dir(&data, shard), options.clone()).unwrap();
        let mut rng = Rng(shard as u64 + 1);
        let mut seq = (store.max_server_id() >> 10) + 1;
        let mut live: VecDeque<(u64, u64)> = VecDeque::new();
        while store.disk_bytes() < bytes_per_shard {
            for _ in 0..BATCH {
                let user = users[rng.range(0, USERS as u64) as usize];
                let server_id = seq << 10 | shard as u64;
                seq += 1;
                let msg = Stored {
                    server_id,
                    from: rng.range(1, 1 << 20),
                    time_ms: 1_700_000_000_000 + seq,
                    origin: None,
                    body: vec![b'a' + (seq % 26) as u8; body_bytes].into(),
                };
                store.push(user, msg).unwrap();
                live.push_back((user, server_id));
                messages += 1;
                // Deliver the oldest messages at the chosen rate.
                if rng.range(0, 100) < delivered_pct {
                    let (user, id) = live.pop_front().unwrap();
                    store.remove(user, id).unwrap();
                }
            }
            store.commit(&mut Vec::new()).unwrap();
        }
        println!(
            "shard {shard}: {} MiB in {} segments, {} messages queued",
            store.disk_bytes() >> 20,
            store.segments(),
            store.total()
        );
    }
    println!(
        "wrote {messages} messages of {body_bytes} bytes to {} in {:.1} s",
        data.display(),
        started.elapsed().as_secs_f64()
    );
}
