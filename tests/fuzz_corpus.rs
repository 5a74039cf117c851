//! The fuzzers' seed corpus (`fuzz/seeds/`): real traffic and real log files,
//! captured here, and replayed through the fuzz oracles on stable.
//!
//! `capture_seeds` runs a real session through a recording proxy (login,
//! send, ack, deliver, delivered, both receipts, ping, errors, bye) and
//! writes real segment files with a real `LogStore`; the clients' reads,
//! in the order they came, become inputs of the `session` target (its
//! simulated server answers them with the same kinds of frames). It checks
//! that the captured bytes pass the oracles, and with
//! `TERN_FUZZ_SEEDS=write` it replaces the committed seeds with them:
//!
//! ```text
//! TERN_FUZZ_SEEDS=write cargo test -p tern --test fuzz_corpus capture_seeds
//! ```
//!
//! `committed_seeds_pass_the_oracles` runs every committed seed, and every
//! crash input in `fuzz/regressions/`, through `tern::fuzzing`, the same
//! checks the fuzz targets run.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::{expect_bye_then_close, expect_receipt, recv_ack, recv_deliver, TestServer, WAIT};
use tern::proto::{self, ByeReason, ErrorCode, Frame, Limits, OwnedFrame, ReceiptKind};
use tern::store::{Durability, LogOptions, LogStore, Store, Stored};
use tern_client::Client;

/// The fuzz targets, each with a folder of seeds.
const TARGETS: [&str; 6] = ["frame", "record", "scan", "recovery", "session", "mqtt"];

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// What one proxied connection carried, each direction as one byte stream.
#[derive(Default)]
struct Recording {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// What every client sent, read by read, in the order the proxy read it
/// across connections: (connection, bytes).
type Reads = Vec<(usize, Vec<u8>)>;
/// [`Reads`] as the proxy's pumps fill them.
type Arrivals = Arc<Mutex<Reads>>;

/// A loopback proxy that records the bytes of each connection it relays.
struct RecordingProxy {
    addr: SocketAddr,
    recordings: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>>,
    arrivals: Arrivals,
    accepter: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl RecordingProxy {
    /// Relays exactly `connections` connections to `upstream`.
    fn start(upstream: SocketAddr, connections: usize) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let recordings: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>> = Arc::default();
        let all = Arc::clone(&recordings);
        let arrivals: Arrivals = Arc::default();
        let order = Arc::clone(&arrivals);
        let accepter = std::thread::spawn(move || {
            let mut pumps = Vec::new();
            for i in 0..connections {
                let (client, _) = listener.accept().expect("proxy accept");
                let server = TcpStream::connect(upstream).expect("proxy connect");
                let rec = Arc::new(Mutex::new(Recording::default()));
                all.lock().unwrap().push(Arc::clone(&rec));
                for to_server in [true, false] {
                    let (from, to) = if to_server {
                        (client.try_clone().unwrap(), server.try_clone().unwrap())
                    } else {
                        (server.try_clone().unwrap(), client.try_clone().unwrap())
                    };
                    let rec = Arc::clone(&rec);
                    let order = to_server.then(|| (i, Arc::clone(&order)));
                    pumps.push(std::thread::spawn(move || pump(from, to, &rec, order)));
                }
            }
            pumps
        });
        RecordingProxy {
            addr,
            recordings,
            arrivals,
            accepter: Some(accepter),
        }
    }

    /// Waits until every connection ended in both directions and returns
    /// the recordings in the order the connections were accepted, and the
    /// clients' reads in the order they came.
    fn finish(mut self) -> (Vec<Recording>, Reads) {
        let pumps = self.accepter.take().unwrap().join().expect("accepter");
        for pump in pumps {
            pump.join().expect("pump");
        }
        let recordings = std::mem::take(&mut *self.recordings.lock().unwrap());
        let recordings = recordings
            .into_iter()
            .map(|r| std::mem::take(&mut *r.lock().unwrap()))
            .collect();
        let arrivals = std::mem::take(&mut *self.arrivals.lock().unwrap());
        (recordings, arrivals)
    }
}

/// Copies `from` to `to` until EOF or an error, recording the bytes (and,
/// towards the server, each read in `order` as connection `n`'s). Every
/// read waits at most [`WAIT`], so a pump ends even if a peer never closes.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    rec: &Mutex<Recording>,
    order: Option<(usize, Arrivals)>,
) {
    let to_server = order.is_some();
    from.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut r = rec.lock().unwrap();
        let stream = if to_server {
            &mut r.to_server
        } else {
            &mut r.to_client
        };
        stream.extend_from_slice(&buf[..n]);
        drop(r);
        if let Some((conn, arrivals)) = &order {
            // Recorded before it is relayed: a read's answer cannot come
            // back (and cause a later read) ahead of it in the list.
            arrivals.lock().unwrap().push((*conn, buf[..n].to_vec()));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// The frames of a recorded stream, up to a bad frame (a test sends one on
/// purpose); the stream must not end inside a frame.
fn frames_of(stream: &[u8]) -> Vec<OwnedFrame> {
    let limits = Limits::default();
    let mut rest = stream;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        match proto::decode(rest, &limits) {
            Ok(Some((frame, n))) => {
                frames.push(frame.to_owned());
                rest = &rest[n..];
            }
            Ok(None) => panic!("recorded stream ends inside a frame"),
            Err(_) => break,
        }
    }
    frames
}

/// A file of a `tern::fuzzing::recovery` input: tag, u16 LE length, bytes.
fn recovery_file(input: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("a seed file under 64 KiB");
    input.push(tag);
    input.extend_from_slice(&len.to_le_bytes());
    input.extend_from_slice(bytes);
}

/// A recovery input (flags 0) holding the `meta` and segment files of `dir`.
fn recovery_input(dir: &Path) -> Vec<u8> {
    let mut input = vec![0];
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for name in names {
        let tag = if name == "meta" {
            0
        } else if let Some(n) = name.strip_suffix(".log").and_then(|n| n.parse::<u8>().ok()) {
            assert!((1..=6).contains(&n), "segment {name} has no tag");
            n
        } else {
            continue; // the reserve file
        };
        recovery_file(&mut input, tag, &fs::read(dir.join(&name)).unwrap());
    }
    input
}

/// The segment files of `dir`, in order.
fn segments(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    names.sort();
    names.into_iter().map(|p| fs::read(p).unwrap()).collect()
}

/// The records of a segment, one slice each (a record's first 4 bytes are
/// its length after the 8-byte header).
fn records(segment: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = segment;
    while rest.len() >= 8 {
        let len = 8 + u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    assert!(rest.is_empty(), "a segment ends inside a record");
    out
}

/// What [`record_session`] captured.
struct Captured {
    /// Each connection's bytes.
    recordings: Vec<Recording>,
    /// The clients' reads, in order.
    reads: Reads,
    /// Recovery inputs of the shards whose log holds records: (shard, input).
    stores: Vec<(usize, Vec<u8>)>,
}

/// A real session through the proxy.
fn record_session() -> Captured {
    let server = TestServer::start();
    let (a, b) = common::cross_pair();
    let proxy = RecordingProxy::start(server.addr, 6);
    let tok = common::token;

    // 1. A sends to B while B is offline: ACK.
    let (mut alice, _) = Client::login(proxy.addr, &tok(a)).expect("login A");
    alice.send_msg(1, b, b"hello, are you there?").unwrap();
    let sid = recv_ack(&mut alice, 1);
    // 2. B logs in: LOGIN_OK with one offline message, DELIVER; DELIVERED
    // and READ come back to A as receipts. Pings both ways.
    let (mut bob, info) = Client::login(proxy.addr, &tok(b)).expect("login B");
    assert_eq!(info.offline_count, 1);
    let msg = recv_deliver(&mut bob);
    assert_eq!((msg.server_id, msg.from), (sid, a));
    bob.send_delivered(sid).unwrap();
    expect_receipt(&mut alice, ReceiptKind::Delivered, sid, b);
    bob.send_read(sid, a).unwrap();
    expect_receipt(&mut alice, ReceiptKind::Read, sid, b);
    alice.ping(7).unwrap();
    bob.ping(1 << 40).unwrap();
    // A message to an online user, and one to user 0: ERROR(bad_recipient).
    alice.send_msg(2, b, "ünïcödé body".as_bytes()).unwrap();
    let sid2 = recv_ack(&mut alice, 2);
    assert_eq!(recv_deliver(&mut bob).server_id, sid2);
    bob.send_delivered(sid2).unwrap();
    expect_receipt(&mut alice, ReceiptKind::Delivered, sid2, b);
    alice.send_msg(3, 0, b"nobody").unwrap();
    match alice.recv_until(|f| matches!(f, OwnedFrame::Error { .. })) {
        Ok(OwnedFrame::Error { code, .. }) => assert_eq!(code, ErrorCode::BadRecipient),
        other => panic!("expected ERROR(bad_recipient), got {other:?}"),
    }
    // A message B never acknowledges, so it stays on disk.
    alice.send_msg(4, b, b"still queued").unwrap();
    recv_ack(&mut alice, 4);
    recv_deliver(&mut bob);

    // 3. A bad token: LOGIN_ERR.
    let mut bad = Client::connect(proxy.addr).unwrap();
    bad.send_frame(&Frame::Login {
        version: proto::VERSION,
        token: b"v1.1.2.not-a-mac",
    })
    .unwrap();
    let frames = bad.wait_closed(WAIT).unwrap();
    assert!(
        matches!(frames[..], [OwnedFrame::LoginErr { .. }]),
        "{frames:?}"
    );
    // 4. A SEND before LOGIN: ERROR(not_logged_in).
    let mut early = Client::connect(proxy.addr).unwrap();
    early.send_msg(1, a, b"early").unwrap();
    common::expect_error_then_close(&mut early, ErrorCode::NotLoggedIn);
    // 5. B again elsewhere: the first connection gets BYE(replaced).
    let (mut bob2, _) = Client::login(proxy.addr, &tok(b)).expect("login B again");
    expect_bye_then_close(&mut bob, ByeReason::Replaced);
    // 6. Garbage: ERROR(unknown_type) and close.
    let mut junk = Client::connect(proxy.addr).unwrap();
    junk.send_raw(&[0x03, 0x7f, 0x01, 0x02]).unwrap();
    common::expect_error_then_close(&mut junk, ErrorCode::UnknownType);
    // 7. A second LOGIN on A's connection: ERROR(already_logged_in).
    alice
        .send_frame(&Frame::Login {
            version: proto::VERSION,
            token: tok(a).as_bytes(),
        })
        .unwrap();
    common::expect_error_then_close(&mut alice, ErrorCode::AlreadyLoggedIn);

    // The store as the server left it: every shard's files.
    let data = server.dir().join("data");
    let mut stores = Vec::new();
    for shard in 0..common::SHARDS {
        let dir = tern::store::shard_dir(&data, shard);
        if segments(&dir).iter().any(|s| !s.is_empty()) {
            stores.push((shard, recovery_input(&dir)));
        }
    }
    // 8. Shutdown: B's second connection gets BYE(shutdown).
    drop(server);
    expect_bye_then_close(&mut bob2, ByeReason::Shutdown);
    drop((alice, bob, bob2, bad, early, junk));
    let (recordings, reads) = proxy.finish();
    Captured {
        recordings,
        reads,
        stores,
    }
}

/// Real segment files of a `LogStore` with small segments: queued messages,
/// tombstones, sealed segments, compaction copies. Returns its directory's
/// recovery input and its segments.
fn real_log(dir: &Path) -> (Vec<u8>, Vec<Vec<u8>>) {
    let options = LogOptions {
        durability: Durability::Os,
        segment_bytes_max: 400,
        compact_dead_ratio: 0.3,
        ..LogOptions::default()
    };
    let (mut store, _) = LogStore::open(dir, options).expect("open the log");
    let mut refused = Vec::new();
    let mut id = 0;
    for round in 0..6u64 {
        for user in [3u64, 1 << 33, 12345] {
            id += 1;
            let body = format!("round {round} for {user}").into_bytes();
            let msg = Stored {
                server_id: id << 10,
                from: round + 1,
                time_ms: 1_750_000_000_000 + id,
                origin: None,
                body: body.into(),
            };
            store.push(user, msg).expect("push");
        }
        store.commit(&mut refused).expect("commit");
        // Deliver every other message of user 3 a round later.
        if round % 2 == 1 {
            let first = store.next_after(3, 0).expect("queued").server_id;
            store.remove(3, first).expect("remove");
            store.commit(&mut refused).expect("commit");
        }
    }
    assert!(refused.is_empty());
    assert!(store.segments() >= 2, "{} segments", store.segments());
    drop(store);
    (recovery_input(dir), segments(dir))
}

#[test]
fn capture_seeds() {
    let Captured {
        recordings,
        reads,
        stores,
    } = record_session();
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut types = BTreeSet::new();
    for (i, rec) in recordings.iter().enumerate() {
        for (dir, stream) in [("c2s", &rec.to_server), ("s2c", &rec.to_client)] {
            assert!(!stream.is_empty(), "connection {i} {dir} carried nothing");
            tern::fuzzing::frame(stream);
            types.extend(frames_of(stream).iter().map(|f| f.as_frame().name()));
            seeds.push(("frame", format!("session-{i}-{dir}"), stream.clone()));
        }
    }
    let all = [
        "LOGIN",
        "LOGIN_OK",
        "LOGIN_ERR",
        "SEND",
        "ACK",
        "DELIVER",
        "DELIVERED",
        "READ",
        "RECEIPT",
        "PING",
        "PONG",
        "ERROR",
        "BYE",
    ];
    assert_eq!(types, BTreeSet::from(all), "frame types in the session");

    // The session's reads replayed into the simulated shards of the
    // session target, in the order they came, a loop iteration after each:
    // with 1, 2 and 3 shards, and with tight limits.
    for (shards, tight, name) in [
        (1, false, "real-session-1-shard"),
        (2, false, "real-session-2-shards"),
        (3, false, "real-session-3-shards"),
        (2, true, "real-session-tight"),
    ] {
        let mut input = tern::fuzzing::SessionInput::new(shards, tight);
        let mut opened = BTreeSet::new();
        for (conn, bytes) in &reads {
            let client = u8::try_from(*conn).unwrap();
            if opened.insert(client) {
                input.open(client, client % shards as u8);
            }
            input.bytes(client, bytes).iteration();
        }
        for &client in &opened {
            input.close(client);
        }
        input.time(40).iteration();
        let input = input.into_bytes();
        let tally = tern::fuzzing::session_tally(&input);
        // The replayed DELIVERED and READ frames carry the real server's
        // ids, `(seq << 10) | home shard` under 2 shards: with another shard
        // count a recipient's home shard, so the id, may differ, and the
        // server then refuses them (`unknown_message`, docs/HARDENING.md)
        // instead of relaying a RECEIPT; tight limits change which messages
        // are delivered when, so the same holds for them.
        let receipts = shards == 2 && !tight;
        for frame in [
            "LOGIN_OK",
            "LOGIN_ERR",
            "ACK",
            "DELIVER",
            "RECEIPT",
            "PONG",
            "ERROR",
            "BYE",
        ] {
            if frame == "RECEIPT" && !receipts {
                continue;
            }
            assert!(tally.contains_key(frame), "{name}: no {frame} in {tally:?}");
        }
        seeds.push(("session", name.into(), input));
    }

    assert!(!stores.is_empty(), "the server wrote no segment");
    for (shard, input) in &stores {
        tern::fuzzing::recovery(input);
        seeds.push(("recovery", format!("server-shard-{shard}"), input.clone()));
    }

    let dir = tempfile::tempdir().unwrap();
    let (input, segs) = real_log(dir.path());
    tern::fuzzing::recovery(&input);
    seeds.push(("recovery", "log".into(), input.clone()));
    // The same log with small segments and fsync, with a torn tail, with a
    // damaged record in a sealed segment (open fails, repair skips it), and
    // without its meta file (open fails, repair writes one).
    let mut flagged = input.clone();
    flagged[0] = 3;
    seeds.push(("recovery", "log-fsync-small".into(), flagged));
    let meta = fs::read(dir.path().join("meta")).unwrap();
    let mut torn = vec![0];
    recovery_file(&mut torn, 0, &meta);
    let mut damaged = torn.clone();
    let mut no_meta = vec![0];
    let last = segs.len() - 1;
    for (n, seg) in segs.iter().enumerate() {
        let tag = n as u8 + 1;
        let torn_seg = if n == last {
            &seg[..seg.len() - 5]
        } else {
            seg
        };
        recovery_file(&mut torn, tag, torn_seg);
        let mut bad = seg.clone();
        if n == 0 {
            bad[20] ^= 0x10;
        }
        recovery_file(&mut damaged, tag, &bad);
        recovery_file(&mut no_meta, tag, seg);
    }
    for input in [&torn, &damaged, &no_meta] {
        tern::fuzzing::recovery(input);
    }
    seeds.push(("recovery", "log-torn-tail".into(), torn));
    seeds.push(("recovery", "log-damaged".into(), damaged));
    seeds.push(("recovery", "log-no-meta".into(), no_meta));

    for (n, seg) in segs.iter().enumerate() {
        tern::fuzzing::scan(seg);
        seeds.push(("scan", format!("log-segment-{}", n + 1), seg.clone()));
    }
    let mut kinds = BTreeSet::new();
    for seg in &segs {
        for rec in records(seg) {
            // Kind byte 1 = queued, 2 = delivered: one seed of each.
            if kinds.insert(rec[8]) {
                tern::fuzzing::record(rec);
                seeds.push(("record", format!("log-kind-{}", rec[8]), rec.to_vec()));
            }
        }
    }
    assert_eq!(kinds, BTreeSet::from([1, 2]));

    if std::env::var("TERN_FUZZ_SEEDS").is_ok_and(|v| v == "write") {
        // The mqtt seeds are real clients' bytes, captured by hand
        // (fuzz/README.md); they are kept.
        for target in TARGETS.iter().filter(|&&t| t != "mqtt") {
            let dir = seeds_dir().join(target);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
        }
        for (target, name, bytes) in &seeds {
            fs::write(seeds_dir().join(target).join(name), bytes).unwrap();
        }
    }
}

#[test]
fn committed_seeds_pass_the_oracles() {
    for target in TARGETS {
        let dir = seeds_dir().join(target);
        let mut n = 0;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            oracle(target)(&bytes);
            n += 1;
        }
        assert!(n >= 2, "{}: {n} seeds", dir.display());
    }
    // Every crash found so far (minimized); each also has a unit test.
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for target in fs::read_dir(&regressions).unwrap() {
        let target = target.unwrap();
        let name = target.file_name().into_string().unwrap();
        assert!(TARGETS.contains(&name.as_str()), "regressions for {name}?");
        for entry in fs::read_dir(target.path()).unwrap() {
            oracle(&name)(&fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
    }
    assert!(n >= 2, "{}: {n} regression inputs", regressions.display());
}

/// The oracle of fuzz target `target`.
fn oracle(target: &str) -> fn(&[u8]) {
    match target {
        "frame" => tern::fuzzing::frame,
        "record" => tern::fuzzing::record,
        "scan" => tern::fuzzing::scan,
        "recovery" => tern::fuzzing::recovery,
        "session" => tern::fuzzing::session,
        "mqtt" => tern::fuzzing::mqtt,
        other => panic!("no fuzz target {other}"),
    }
}
