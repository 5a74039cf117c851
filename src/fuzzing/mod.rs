//! Oracles for the fuzz targets in `fuzz/` (not an API: hidden from the
//! docs, may change at any time).
//!
//! Each function takes arbitrary bytes, runs one decoder or the store's
//! recovery on them and panics if an invariant breaks. The fuzz targets are
//! one-line calls into here, and `tests/fuzz_corpus.rs` replays the
//! committed seeds and every crash ever found through the same functions on
//! stable, so a regression shows up in the normal test suite. They live in
//! the crate because the log record decoder and the segment scanner are
//! private to it, and the session target reads crate-private routing state.
//! The session target's oracle is [`session`] (module `session.rs`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::{self, DecodeError, Frame, Limits};
use crate::store::record::{self, Decoded, HEADER_BYTES, PAYLOAD_BYTES_MAX};
use crate::store::segment::{has_zero_sector, Scanner, Step};
use crate::store::{Durability, LogOptions, LogStore, Store, StoreError, Stored};

mod mqtt;
mod session;

pub use mqtt::mqtt;
pub use session::{session, session_tally, SessionInput};

/// Most prefixes of one frame or record checked for consistency, so one
/// large input costs linear, not quadratic, time.
const PREFIXES_CHECKED_MAX: usize = 512;

/// The protocol decoder: decodes every frame of `data` as a connection's
/// byte stream, under the default limits and under small ones.
///
/// Checks: never panics; a decoded frame re-encodes to exactly its bytes
/// (minimal varints make the encoding canonical) and survives
/// `to_owned`/`as_frame`; the outcome on every prefix of the stream is
/// "incomplete" until the bytes decide it, and the same outcome after (a
/// frame never turns into an error, nor an error into a frame, as bytes
/// arrive); each error is consistent with the limits and has a message.
pub fn frame(data: &[u8]) {
    let small = Limits {
        frame_bytes_max: 64,
        body_bytes_max: 16,
    };
    for limits in [Limits::default(), small] {
        let mut rest = data;
        // Each frame consumes at least 2 bytes: bounded by the input.
        for _ in 0..=data.len() / 2 {
            let outcome = proto::decode(rest, &limits);
            check_frame_prefixes(rest, &limits, &outcome);
            match outcome {
                Ok(Some((frame, consumed))) => {
                    check_frame(&rest[..consumed], &frame, &limits);
                    rest = &rest[consumed..];
                }
                Ok(None) => break,
                Err(e) => {
                    check_decode_error(&e, &limits);
                    break;
                }
            }
        }
    }
}

fn check_frame(bytes: &[u8], frame: &Frame<'_>, limits: &Limits) {
    let mut again = Vec::new();
    proto::encode(frame, &mut again);
    assert_eq!(again, bytes, "{frame:?} does not re-encode to its bytes");
    assert_eq!(proto::encoded_len(frame), bytes.len());
    assert_eq!(frame.to_owned().as_frame(), *frame);
    assert!(!frame.name().is_empty());
    if let Frame::Send { body, .. } | Frame::Deliver { body, .. } = frame {
        assert!(body.len() <= limits.body_bytes_max);
    }
    assert!(
        bytes.len() <= proto::varint_len(limits.frame_bytes_max as u64) + limits.frame_bytes_max
    );
}

fn check_decode_error(e: &DecodeError, limits: &Limits) {
    match *e {
        DecodeError::TooLarge { len } => assert!(len > limits.frame_bytes_max as u64),
        // A group message body has `GROUP_BODY_ROOM_BYTES` less room.
        DecodeError::BodyTooLarge { len } => assert!(
            len > limits
                .body_bytes_max
                .saturating_sub(proto::group::GROUP_BODY_ROOM_BYTES)
        ),
        // 0x01..=0x0D are the types of protocol v1.
        DecodeError::UnknownType(t) => assert!(t == 0 || t > 0x0D, "type {t:#04x}"),
        DecodeError::Malformed(reason) => assert!(!reason.is_empty()),
    }
    assert!(!e.to_string().is_empty());
    assert_ne!(e.code().as_str(), "");
}

type FrameOutcome<'a> = Result<Option<(Frame<'a>, usize)>, DecodeError>;

/// Every prefix of `buf` is incomplete, or already has the outcome of the
/// whole `buf` (a too-large prefix may name a smaller length than the whole:
/// it is the least its completion could declare).
fn check_frame_prefixes(buf: &[u8], limits: &Limits, whole: &FrameOutcome<'_>) {
    // A decoded frame's bytes end at `consumed`: longer prefixes look at
    // exactly the same bytes.
    let end = match whole {
        Ok(Some((_, consumed))) => (consumed + 1).min(buf.len()),
        _ => buf.len(),
    };
    let mut decided = false;
    for cut in 0..end.min(PREFIXES_CHECKED_MAX) {
        let part = proto::decode(&buf[..cut], limits);
        let same = match (&part, whole) {
            (Ok(None), _) => {
                assert!(
                    !decided,
                    "prefix of {cut} bytes is incomplete after a decided one"
                );
                continue;
            }
            (Ok(Some(a)), Ok(Some(b))) => a == b,
            (Err(DecodeError::TooLarge { len: a }), Err(DecodeError::TooLarge { len: b })) => {
                a <= b
            }
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        assert!(
            same,
            "prefix of {cut} bytes decodes to {part:?}, all {} bytes to {whole:?}",
            buf.len()
        );
        decided = true;
    }
}

/// The log record decoder, on `data` as it is and with its checksum made
/// right (so the fuzzer gets past the crc to the length and kind checks).
///
/// Checks: never panics; a record re-encodes to exactly its bytes, is one
/// the store may write, and every strict prefix of it is incomplete; an
/// incomplete result means the header or the declared payload is cut; a
/// malformed result stays malformed for the same reason whatever follows.
pub fn record(data: &[u8]) {
    check_record(data);
    if data.len() >= HEADER_BYTES {
        let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
        if let Some(payload) = data.get(HEADER_BYTES..HEADER_BYTES.saturating_add(len)) {
            let mut fixed = data.to_vec();
            fixed[4..8].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            check_record(&fixed);
        }
    }
}

fn check_record(data: &[u8]) {
    match record::decode(data) {
        Decoded::Record(rec, len) => {
            assert!(rec.is_valid());
            assert_eq!(len, rec.encoded_len());
            let mut again = Vec::new();
            rec.encode(&mut again);
            assert_eq!(
                again,
                &data[..len],
                "{rec:?} does not re-encode to its bytes"
            );
            for cut in (0..len).take(PREFIXES_CHECKED_MAX) {
                assert_eq!(
                    record::decode(&data[..cut]),
                    Decoded::Incomplete,
                    "cut {cut}"
                );
            }
        }
        Decoded::Incomplete => {
            if data.len() >= HEADER_BYTES {
                let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
                assert!(
                    len <= PAYLOAD_BYTES_MAX,
                    "length {len} out of range is incomplete"
                );
                assert!(data.len() < HEADER_BYTES + len);
            }
        }
        Decoded::Malformed(reason) => {
            assert!(!reason.is_empty());
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0xa5; 64]);
            assert_eq!(record::decode(&longer), Decoded::Malformed(reason));
        }
    }
}

/// The segment scanner recovery runs over a segment file's bytes.
///
/// Checks: never panics; the steps tile the bytes from 0 to the end with no
/// gap or overlap; each record step is what the decoder finds at its
/// offset; a bad stretch ends where the next valid record starts (none in
/// between) or at the end, is never followed by another bad stretch, and
/// reports a zero sector exactly when it holds one.
pub fn scan(data: &[u8]) {
    let mut at = 0;
    let mut after_bad = false;
    for step in Scanner::new(data) {
        assert!(at < data.len(), "a step after the end");
        match step {
            Step::Record {
                offset,
                len,
                record,
            } => {
                assert_eq!(offset, at);
                assert_eq!(
                    record::decode(&data[offset..]),
                    Decoded::Record(record, len)
                );
                at += len;
                after_bad = false;
            }
            Step::Bad {
                offset,
                reason,
                resume,
                zero_sector,
            } => {
                assert_eq!(offset, at);
                assert!(!after_bad, "two bad stretches in a row at {offset}");
                assert!(!reason.is_empty());
                let end = resume.unwrap_or(data.len());
                assert!(end > offset && end <= data.len());
                if let Some(r) = resume {
                    assert!(matches!(record::decode(&data[r..]), Decoded::Record(..)));
                }
                for skipped in offset + 1..end {
                    assert!(
                        !matches!(record::decode(&data[skipped..]), Decoded::Record(..)),
                        "a valid record at {skipped} was skipped"
                    );
                }
                assert_eq!(zero_sector, has_zero_sector(data, offset, end));
                at = end;
                after_bad = true;
            }
        }
    }
    assert_eq!(at, data.len(), "the steps end before the bytes");
}

/// The name a file of a [`recovery`] input gets, by its tag byte (mod 12).
fn recovery_file(tag: u8) -> (&'static str, bool) {
    const NAMES: [&str; 12] = [
        "meta",
        "00000001.log",
        "00000002.log",
        "00000003.log",
        "00000004.log",
        "00000005.log",
        "00000006.log",
        "meta.tmp",
        "00000001.log.tmp",
        "4294967295.log",
        "reserve",
        "00000007.log",
    ];
    let i = usize::from(tag) % NAMES.len();
    // The last one is made a directory: a segment that cannot be read.
    (NAMES[i], i == NAMES.len() - 1)
}

/// Recovery: the files of a store directory, built from `data`, then
/// [`LogStore::open`] on them.
///
/// `data` is a flags byte (bit 0: `fsync` durability instead of `os`;
/// bit 1: a 4 KiB `segment_bytes_max`) and then files, each a tag byte
/// naming it (tag mod 12: `meta`, segments 1 to 6, `meta.tmp`,
/// `00000001.log.tmp`, segment 4294967295, `reserve`, and a directory
/// named like segment 7), a u16 LE length and that many bytes (fewer if
/// the input ends). A name given twice gets both contents, appended.
///
/// Checks: `open` never panics; it fails only with a corrupt record or a
/// bad or missing `meta` (then `repair` is tried and fails only for `meta`
/// or an unreadable file), each with a message; an open store is
/// consistent (`total`, `len`, `next_after` and the replayed messages
/// agree, ids increase per user, `max_server_id` is above them all); the
/// next start needs no repair and finds the same messages; and after a
/// delivery, a push and a commit, the next start finds exactly the
/// expected messages.
pub fn recovery(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let dir = TempDir::new();
    let store_dir = dir.0.join("store");
    fs::create_dir(&store_dir).expect("create the store directory");
    while let Some((&tag, after)) = rest.split_first() {
        let len = match after {
            [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        let body = after.get(2..).unwrap_or(&[]);
        let body = &body[..len.min(body.len())];
        rest = &after[(2 + body.len()).min(after.len())..];
        let (name, is_dir) = recovery_file(tag);
        let path = store_dir.join(name);
        if is_dir {
            fs::create_dir_all(&path).expect("create a directory");
            continue;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(body))
            .expect("write an input file");
    }

    let options = |repair| LogOptions {
        durability: if flags & 1 != 0 {
            Durability::Fsync
        } else {
            Durability::Os
        },
        segment_bytes_max: if flags & 2 != 0 { 4096 } else { 1 << 20 },
        // A tiny floor keeps the reserve file at one byte: no megabyte
        // written per input.
        disk_free_bytes_min: 4,
        repair,
        ..LogOptions::default()
    };

    let (store, rec) = match LogStore::open(&store_dir, options(false)) {
        Ok(opened) => opened,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(
                matches!(
                    e,
                    StoreError::Corrupt { .. } | StoreError::Meta { .. } | StoreError::Io { .. }
                ),
                "{e}"
            );
            match LogStore::open(&store_dir, options(true)) {
                Ok(opened) => opened,
                Err(e) => {
                    assert!(
                        matches!(e, StoreError::Meta { .. } | StoreError::Io { .. }),
                        "repair failed with {e}"
                    );
                    assert!(!e.to_string().is_empty());
                    return;
                }
            }
        }
    };
    let messages = check_store(&store);
    assert_eq!(rec.messages, messages.len());
    assert_eq!(rec.max_server_id, store.max_server_id());
    drop(store);

    // The next start is clean and finds the same messages.
    let (mut store, rec) = LogStore::open(&store_dir, options(false))
        .unwrap_or_else(|e| panic!("the start after a recovery fails: {e}"));
    assert_eq!(rec.bytes_cut, 0, "{rec}");
    assert!(rec.skipped.is_empty() && !rec.meta_recreated, "{rec}");
    assert_eq!(check_store(&store), messages);

    // Deliver each user's first message, push one more, commit.
    let mut expected = messages;
    let mut firsts = Vec::new();
    for (i, (user, msg)) in expected.iter().enumerate() {
        if i == 0 || expected[i - 1].0 != *user {
            firsts.push((*user, msg.server_id));
        }
    }
    for &(user, server_id) in &firsts {
        assert!(store.remove(user, server_id).is_some());
    }
    expected.retain(|(user, msg)| !firsts.contains(&(*user, msg.server_id)));
    if let Some(server_id) = store.max_server_id().checked_add(1) {
        let msg = Stored {
            server_id,
            from: 2,
            time_ms: 3,
            origin: None,
            body: std::sync::Arc::from(&b"fuzz"[..]),
        };
        if store.push(1, msg.clone()).is_ok() {
            expected.push((1, msg));
        }
    }
    let mut refused = Vec::new();
    store
        .commit(&mut refused)
        .unwrap_or_else(|e| panic!("commit after recovery fails: {e}"));
    expected.retain(|(_, msg)| !refused.contains(&msg.server_id));
    expected.sort_by_key(|(user, msg)| (*user, msg.server_id));
    let max_server_id = store.max_server_id();
    drop(store);
    let (store, _) = LogStore::open(&store_dir, options(false))
        .unwrap_or_else(|e| panic!("the start after a commit fails: {e}"));
    assert_eq!(check_store(&store), expected);
    assert!(store.max_server_id() >= max_server_id);
}

/// Checks that an open store agrees with itself; returns its messages by
/// user, then id.
fn check_store(store: &LogStore) -> Vec<(u64, Stored)> {
    let mut messages: Vec<(u64, Stored)> = store
        .queued()
        .map(|(user, msg)| (user, msg.clone()))
        .collect();
    assert_eq!(messages.len(), store.total());
    messages.sort_by_key(|(user, msg)| (*user, msg.server_id));
    let mut start = 0;
    while start < messages.len() {
        let user = messages[start].0;
        let end = start + messages[start..].partition_point(|(u, _)| *u == user);
        assert_eq!(store.len(user), end - start);
        // Id 0 is never handed out (`next_after(user, 0)` starts above
        // it); only a crafted record with a valid checksum holds one.
        let mut after = 0;
        for (_, msg) in messages[start..end].iter().filter(|(_, m)| m.server_id > 0) {
            let next = store.next_after(user, after).expect("a next message");
            assert_eq!(next, msg);
            assert!(msg.server_id <= store.max_server_id());
            after = msg.server_id;
        }
        assert!(store.next_after(user, after).is_none());
        start = end;
    }
    messages
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tern-fuzz-{}-{n}", std::process::id()));
        // A leftover of a crashed earlier run with this pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Crashes the fuzzers found, as unit tests: the input bytes (committed in
/// `fuzz/regressions/<target>/`, minimized with `cargo fuzz tmin`) and a
/// readable input built for the same bug.
#[cfg(test)]
mod regressions {
    use super::*;
    use crate::store::record::Record;

    /// A recovery input: `flags`, a valid `meta`, then `segments` (tags 1..).
    fn input(flags: u8, segments: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![flags];
        let mut file = |tag: u8, bytes: &[u8]| {
            out.push(tag);
            out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        file(0, b"tern store log\nversion 1\nserver_id_max 0\n");
        for (i, seg) in segments.iter().enumerate() {
            file(i as u8 + 1, seg);
        }
        out
    }

    fn queued(records: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(user, server_id, body) in records {
            Record::Queued {
                user,
                server_id,
                from: 2,
                time_ms: 3,
                origin: None,
                body,
            }
            .encode(&mut out);
        }
        out
    }

    fn open(dir: &std::path::Path) -> LogStore {
        let options = LogOptions {
            durability: Durability::Os,
            ..LogOptions::default()
        };
        LogStore::open(dir, options).expect("open").0
    }

    /// Found by `recovery` (debug assertion in `apply_moves`): a segment
    /// with two Queued records of one message was compacted, the message
    /// planned twice and its move counted twice.
    #[test]
    fn duplicate_record_in_a_compacted_segment() {
        recovery(include_bytes!(
            "../../fuzz/regressions/recovery/duplicate-in-compacted-segment"
        ));
        // The same bug, readable: segment 1 holds message 5 twice and is
        // sealed (segment 2 is active); delivering message 4 leaves it
        // mostly dead, so the next commit compacts it.
        let seg1 = queued(&[(1, 4, b"four"), (1, 5, b"five"), (1, 5, b"five")]);
        recovery(&input(0, &[seg1.clone(), Vec::new()]));

        let dir = TempDir::new();
        fs::write(
            dir.0.join("meta"),
            b"tern store log\nversion 1\nserver_id_max 0\n",
        )
        .unwrap();
        fs::write(dir.0.join("00000001.log"), &seg1).unwrap();
        fs::write(dir.0.join("00000002.log"), b"").unwrap();
        let mut store = open(&dir.0);
        assert_eq!(store.total(), 2);
        store.remove(1, 4).unwrap();
        store.commit(&mut Vec::new()).unwrap();
        // Compacted: message 5 moved to segment 2 and segment 1 is gone.
        assert_eq!(store.segments(), 1);
        drop(store);
        let store = open(&dir.0);
        assert_eq!(store.total(), 1);
        assert_eq!(&*store.next_after(1, 0).unwrap().body, b"five");
    }

    /// Found by `session` ("write to a connection already closing"): a
    /// shutdown of one connection that was closing already wrote a second
    /// BYE after its last frame.
    #[test]
    fn shutdown_of_a_closing_connection() {
        session(include_bytes!(
            "../../fuzz/regressions/session/shutdown-of-a-closing-connection"
        ));

        use crate::config::Config;
        use crate::io::ConnId;
        use crate::session::{Action, Event, Now, OpenEnv, Sessions, State};
        use crate::stats::ShardStats;
        use crate::store::MemStore;
        use std::sync::Arc;
        let mut s = Sessions::new(
            Arc::new(Config::default()),
            0,
            1,
            Box::new(MemStore::new(4)),
            Arc::new(ShardStats::default()),
        );
        let now = Now {
            tick: 0,
            unix_ms: 0,
            mono_ns: 0,
        };
        let conn = ConnId(0);
        s.on_event(now, &OpenEnv, Event::Opened(conn));
        s.on_event(now, &OpenEnv, Event::Shutdown(Some(conn)));
        assert_eq!(s.state(conn), State::Closing);
        s.on_event(now, &OpenEnv, Event::Shutdown(Some(conn)));
        assert!(
            !s.actions()
                .iter()
                .any(|a| matches!(a, Action::Write { .. })),
            "{:?}",
            s.actions()
        );
    }

    /// Group bodies and copies (kinds 13, 14) under ids that a damaged
    /// log also gives messages, in every order and across segments: the
    /// replay keeps one kind per id and queue, and the oracle's restarts,
    /// deliveries and commits find the same messages each time.
    #[test]
    fn group_records_clashing_with_messages() {
        let rec = |r: Record<'_>| {
            let mut out = Vec::new();
            r.encode(&mut out);
            out
        };
        let body = rec(Record::Body {
            server_id: 5,
            from: 0,
            time_ms: 3,
            body: b"shared",
        });
        let member = |user| rec(Record::Member { user, server_id: 5 });
        let gone = |user| rec(Record::Delivered { user, server_id: 5 });
        let plain = queued(&[(1, 5, b"plain")]);
        let parts = [body, member(1), member(2), plain, gone(1), gone(2)];
        // Orders of the six records (every 11th of the 720, to keep the
        // test short) in one segment, and split over two.
        let mut order: Vec<usize> = (0..parts.len()).collect();
        for round in (0..720).step_by(11) {
            let mut k = round;
            for i in (1..order.len()).rev() {
                order.swap(i, k % (i + 1));
                k /= i + 1;
            }
            let seg: Vec<u8> = order.iter().flat_map(|&i| parts[i].clone()).collect();
            recovery(&input(0, std::slice::from_ref(&seg)));
            let cut = parts[order[0]].len() + parts[order[1]].len();
            recovery(&input(0, &[seg[..cut].to_vec(), seg[cut..].to_vec()]));
            recovery(&input(
                0,
                &[seg[..cut].to_vec(), seg[cut..].to_vec(), Vec::new()],
            ));
        }
    }

    /// Found while writing the `recovery` oracle (and an overflow in
    /// `replay_record` under it): a later copy of a message with a longer
    /// body took the copy's length off the earlier segment's live bytes,
    /// which held the shorter one. The later copy is the current one.
    #[test]
    fn later_copy_with_a_longer_body() {
        let a = queued(&[(1, 5, b"a")]);
        let b = queued(&[(1, 5, b"a much longer body")]);
        recovery(&input(0, &[a.clone(), b.clone()]));
        recovery(&input(0, &[b, a]));

        let dir = TempDir::new();
        fs::write(
            dir.0.join("meta"),
            b"tern store log\nversion 1\nserver_id_max 0\n",
        )
        .unwrap();
        fs::write(dir.0.join("00000001.log"), queued(&[(1, 5, b"a")])).unwrap();
        fs::write(
            dir.0.join("00000002.log"),
            queued(&[(1, 5, b"a much longer body")]),
        )
        .unwrap();
        let mut store = open(&dir.0);
        assert_eq!(
            &*store.next_after(1, 0).unwrap().body,
            b"a much longer body"
        );
        // Delivered: both segments hold nothing live and go.
        store.remove(1, 5).unwrap();
        store.commit(&mut Vec::new()).unwrap();
        assert_eq!(store.total(), 0);
    }
}
