//! Unit tests of the log, in one file: they share the invariant checker
//! (`LogStore::check`) and the helpers, and each test crosses several of
//! the parts (commit, recovery, compaction, free space).

use std::fs;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::*;
use crate::store::segment::{Scanner, Step};

/// A 200-byte body gives a 241-byte record.
const REC: u64 = 241;

fn opts(durability: Durability) -> LogOptions {
    LogOptions {
        durability,
        ..LogOptions::default()
    }
}

fn tiny(segment_bytes_max: u64) -> LogOptions {
    LogOptions {
        segment_bytes_max,
        ..opts(Durability::Fsync)
    }
}

fn msg(id: u64, body_len: usize) -> Stored {
    Stored {
        server_id: id,
        from: 100 + id % 7,
        time_ms: 1_700_000_000_000 + id,
        origin: None,
        body: vec![(id % 251) as u8; body_len].into(),
    }
}

fn open(dir: &Path, o: &LogOptions) -> (LogStore, Recovery) {
    let (s, r) = LogStore::open(dir, o.clone()).unwrap();
    s.check();
    (s, r)
}

fn reopen(dir: &Path, o: &LogOptions) -> LogStore {
    open(dir, o).0
}

fn snapshot(s: &LogStore) -> BTreeMap<u64, Vec<Stored>> {
    s.queues
        .iter()
        .map(|(u, q)| (*u, q.iter().map(|e| e.msg.clone()).collect()))
        .collect()
}

/// `(number, bytes)` of the segment files in `dir`.
fn files(dir: &Path) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let n = segment::parse_file_name(e.file_name().to_str()?)?;
            Some((n, e.metadata().unwrap().len()))
        })
        .collect();
    v.sort_unstable();
    v
}

fn seg_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(segment::file_name(n))
}

impl LogStore {
    /// Every invariant the bookkeeping relies on, recomputed from scratch.
    fn check(&self) {
        let mut shape = Shape::default();
        for (&user, q) in &self.queues {
            shape.update(user, (0, None), queue_state(Some(q), |e| &e.msg));
        }
        assert_eq!(self.shape, shape, "the stats' shape follows the queues");
        let mut total = 0;
        let mut live: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let mut copies: BTreeMap<u64, u32> = BTreeMap::new();
        assert!(self.unresolved.is_empty());
        for (user, q) in &self.queues {
            assert!(!q.is_empty(), "user {user} has an empty queue");
            total += q.len();
            for pair in q.iter().collect::<Vec<_>>().windows(2) {
                assert!(pair[0].msg.server_id < pair[1].msg.server_id);
            }
            for e in q {
                let server_id = e.msg.server_id;
                let shared = self
                    .bodies
                    .get(&server_id)
                    .filter(|_| !self.clashes.contains(&(*user, server_id)));
                if let Some(b) = shared {
                    *copies.entry(server_id).or_default() += 1;
                    assert_eq!(b.msg, e.msg, "a copy is its body's message");
                }
                match e.loc {
                    Loc::Memory => assert_eq!(self.opts.durability, Durability::Memory),
                    Loc::Staged(i) => assert_eq!(
                        self.staged[i as usize],
                        if shared.is_some() {
                            Staged::Member {
                                user: *user,
                                server_id,
                            }
                        } else {
                            Staged::Queued {
                                user: *user,
                                server_id,
                            }
                        }
                    ),
                    Loc::Segment(n) => {
                        let l = live.entry(n).or_default();
                        l.0 += 1;
                        l.1 += if shared.is_some() {
                            MEMBER_BYTES
                        } else {
                            queued_bytes(&e.msg)
                        };
                        assert!(self.segments[&n].index.contains(&(*user, server_id)));
                    }
                }
            }
        }
        assert_eq!(total, self.total);
        // A body lives exactly while copies name it, and counts once.
        for (&server_id, b) in &self.bodies {
            assert_eq!(b.refs, copies.remove(&server_id).unwrap_or(0));
            assert!(b.refs > 0, "body {server_id} without copies");
            match b.loc {
                Loc::Memory => panic!("body {server_id} in memory only"),
                Loc::Staged(i) => {
                    assert_eq!(self.staged[i as usize], Staged::Body { server_id })
                }
                Loc::Segment(n) => {
                    let l = live.entry(n).or_default();
                    l.0 += 1;
                    l.1 += body_bytes(&b.msg);
                    assert!(self.segments[&n].body_index.contains(&server_id));
                }
            }
        }
        assert!(copies.is_empty());
        for &(user, server_id) in &self.clashes {
            assert!(self.bodies.contains_key(&server_id));
            assert!(lookup(&self.queues, user, server_id).is_some());
        }
        // Window entries whose message is gone count in their segment.
        let mut refs: BTreeMap<u32, u64> = BTreeMap::new();
        for (from, origin, t) in self.windows.iter() {
            match t.loc {
                WLoc {
                    loc: Loc::Segment(n),
                    orphan: true,
                } => {
                    *refs.entry(n).or_default() += 1;
                    let l = live.entry(n).or_default();
                    l.1 += TAKEN_BYTES;
                    assert!(self.segments[&n].orphans.contains(&(from, origin)));
                }
                WLoc {
                    loc: Loc::Staged(i),
                    orphan: true,
                } => assert_eq!(self.staged[i as usize], Staged::Taken { from, origin }),
                _ => {}
            }
        }
        let records = self
            .staged
            .iter()
            .filter(|s| **s != Staged::Cancelled)
            .count();
        assert_eq!(records, self.staged_records);
        for (n, seg) in &self.segments {
            assert_eq!(
                (seg.live, seg.live_bytes),
                live.remove(n).unwrap_or_default(),
                "live count of segment {n}"
            );
            assert_eq!(seg.refs, refs.remove(n).unwrap_or_default(), "refs of {n}");
            assert!(seg.live_bytes <= seg.bytes);
            for p in &seg.pins {
                assert!(p < n && self.segments.contains_key(p), "pin {p} of {n}");
            }
        }
        assert!(live.is_empty(), "messages in unknown segments: {live:?}");
        assert!(
            refs.is_empty(),
            "window entries in unknown segments: {refs:?}"
        );
        assert_eq!(
            self.disk_bytes,
            self.segments.values().map(|s| s.bytes).sum::<u64>()
        );
        if let Some(n) = self.active_number() {
            assert_eq!(self.segments.keys().last(), Some(&n));
        }
        if self.opts.durability != Durability::Memory && !self.failed {
            let on_disk: Vec<(u32, u64)> =
                self.segments.iter().map(|(n, s)| (*n, s.bytes)).collect();
            assert_eq!(files(&self.dir), on_disk);
            assert!(self.id_watermark >= self.server_id_max);
        }
    }
}

/// A message from v2 sender `from` with client_id `cid`.
fn v2(id: u64, from: u64, cid: u64) -> Stored {
    Stored {
        from,
        origin: Some(Origin {
            device: 0,
            client_id: cid,
        }),
        ..msg(id, 50)
    }
}

#[test]
fn dedupe_windows_outlive_messages_segments_and_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(2048);
    let mut s = reopen(tmp.path(), &o);
    let origin = |cid| Origin {
        device: 0,
        client_id: cid,
    };
    // Sender 7: 100 messages, each delivered; the skip rule hits every
    // other one (removed before its commit).
    for cid in 1..=100u64 {
        s.push(9, v2(cid, 7, cid)).unwrap();
        assert!(
            matches!(s.seen(7, origin(cid)), Seen::Taken { server_id, .. } if server_id == cid)
        );
        if cid % 2 == 0 {
            s.commit(&mut Vec::new()).unwrap();
        }
        s.remove(9, cid).unwrap();
        s.commit(&mut Vec::new()).unwrap();
        s.check();
    }
    // Sender 8 keeps one queued message; the segments roll and go.
    s.push(9, v2(1000, 8, 5)).unwrap();
    for i in 0..200 {
        s.push(10, msg(2000 + i, 100)).unwrap();
        s.commit(&mut Vec::new()).unwrap();
        s.remove(10, 2000 + i).unwrap();
        s.commit(&mut Vec::new()).unwrap();
    }
    for _ in 0..50 {
        s.commit(&mut Vec::new()).unwrap();
    }
    s.check();
    assert!(s.segments() < 10, "{} segments left", s.segments());
    let expect = |s: &LogStore| {
        for cid in 1..=68 {
            assert_eq!(
                s.seen(7, origin(cid)),
                Seen::Stale { highest: 100 },
                "{cid}"
            );
        }
        for cid in 69..=100 {
            assert_eq!(
                s.seen(7, origin(cid)),
                Seen::Taken {
                    server_id: cid,
                    time_ms: msg(cid, 0).time_ms
                }
            );
        }
        assert_eq!(s.seen(7, origin(101)), Seen::New);
        assert!(matches!(
            s.seen(8, origin(5)),
            Seen::Taken {
                server_id: 1000,
                ..
            }
        ));
        assert_eq!(s.seen(8, origin(4)), Seen::New);
    };
    expect(&s);
    drop(s);
    let s = reopen(tmp.path(), &o);
    expect(&s);
    assert_eq!(s.len(9), 1);
}

#[test]
fn a_rolled_back_push_leaves_its_window_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = reopen(tmp.path(), &opts(Durability::Fsync));
    let origin = |cid| Origin {
        device: 0,
        client_id: cid,
    };
    for cid in 1..=3 {
        s.push(9, v2(cid, 7, cid)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    // A jump far ahead, rolled back: nothing was evicted.
    s.push(9, v2(4, 7, 1000)).unwrap();
    assert_eq!(s.seen(7, origin(0)), Seen::Stale { highest: 1000 });
    let mut refused = Vec::new();
    s.roll_back(
        &mut refused,
        &StoreError::Corrupt {
            file: tmp.path().into(),
            offset: 0,
            reason: "test",
        },
    );
    assert_eq!(refused, [4]);
    assert_eq!(s.seen(7, origin(1000)), Seen::New);
    assert!(matches!(
        s.seen(7, origin(1)),
        Seen::Taken { server_id: 1, .. }
    ));
    assert_eq!(s.seen(7, origin(0)), Seen::New);
    s.check();
}

/// A drained queue, its segment's index and orphan list, and the batch
/// buffers give their memory back; a replay holds only what is queued.
#[test]
fn drained_structures_give_memory_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-0");
    const N: u64 = 3000;
    let o = LogOptions {
        queue_len_max: N as usize,
        ..opts(Durability::Fsync)
    };
    let (mut s, _) = open(&dir, &o);
    for id in 1..=N {
        s.push(1, v2(id << 10, 7, id)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    let seg = *s.segments.keys().next().unwrap();
    assert_eq!(s.segments[&seg].index.len(), N as usize);
    assert!(
        s.queues[&1].capacity() < N as usize * 5 / 4 + 8,
        "grown by quarters"
    );
    // Drain to 10 messages: the queue gives capacity back as it goes.
    for id in 1..=N - 10 {
        s.remove(1, id << 10).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert!(s.queues[&1].capacity() <= 40, "{}", s.queues[&1].capacity());
    let segment = &s.segments[&seg];
    assert!(segment.refs <= crate::store::WINDOW);
    assert!(
        segment.orphans.len() <= 2 * segment.refs as usize + ORPHANS_SLACK,
        "stale orphans dropped: {} for {} refs",
        segment.orphans.len(),
        segment.refs
    );
    // A replay keeps the live messages' index entries only, and queues
    // cut to their length.
    drop(s);
    let (mut s, _) = open(&dir, &o);
    assert_eq!(s.segments[&seg].index.len(), 10);
    assert_eq!(s.queues[&1].capacity(), 10);
    for id in N - 9..=N {
        s.remove(1, id << 10).unwrap();
    }
    assert!(s.queues.is_empty());
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert_eq!(
        s.segments[&seg].index.capacity(),
        0,
        "no live message, no index"
    );
    s.trim(1024);
    assert!(s.buf.capacity() <= 1024 && s.staged.capacity() <= 1024 / 16);
}

#[test]
fn push_commit_reopen_keeps_messages_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-3");
    let o = opts(Durability::Fsync);
    let (mut s, r) = open(&dir, &o);
    assert_eq!((r.segments, r.records, r.messages), (0, 0, 0));
    for id in 1..=20 {
        s.push(id % 3, msg(id << 10, id as usize * 10)).unwrap();
    }
    assert!(s.has_uncommitted());
    s.commit(&mut Vec::new()).unwrap();
    assert!(!s.has_uncommitted());
    s.check();
    let before = snapshot(&s);
    drop(s);
    let (s, r) = open(&dir, &o);
    assert_eq!(snapshot(&s), before);
    assert_eq!((r.segments, r.records, r.messages), (1, 20, 20));
    assert_eq!(r.bytes_cut, 0);
    assert_eq!(s.total(), 20);
    assert_eq!(s.next_after(1, 0).unwrap().server_id, 1 << 10);
    assert_eq!(s.next_after(1, 1 << 10).unwrap().server_id, 4 << 10);
}

#[test]
fn remove_commit_reopen_drops_them() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=6 {
        s.push(7, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.remove(7, 2), Some(msg(2, 200)));
    assert_eq!(s.remove(7, 5), Some(msg(5, 200)));
    assert_eq!(s.remove(7, 5), None);
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    drop(s);
    let (s, r) = open(tmp.path(), &o);
    let ids: Vec<u64> = snapshot(&s)[&7].iter().map(|m| m.server_id).collect();
    assert_eq!(ids, [1, 3, 4, 6]);
    assert_eq!(r.records, 8, "6 queued + 2 tombstones");
}

/// A group message for 1000 members: one `Body` record and a 25-byte
/// `Member` record per member, not the body 1000 times.
#[test]
fn group_copies_share_one_body_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let mut s = reopen(tmp.path(), &o);
    let m = msg(5 << 10, 1000);
    for user in 0..1000 {
        s.push_shared(user, m.clone()).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    let body = Record::body_bytes(1000) as u64;
    assert_eq!(s.disk_bytes(), body + 1000 * MEMBER_BYTES);
    assert_eq!(MEMBER_BYTES, 25);
    drop(s);
    let (mut s, r) = open(tmp.path(), &o);
    assert_eq!((r.records, r.messages), (1001, 1000));
    for user in 0..1000 {
        assert_eq!(s.next_after(user, 0), Some(&m));
    }
    // Half delivered: the body stays for the other half.
    for user in 0..500 {
        assert_eq!(s.remove(user, m.server_id), Some(m.clone()));
    }
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    drop(s);
    let mut s = reopen(tmp.path(), &o);
    assert_eq!(s.total(), 500);
    assert_eq!(s.next_after(999, 0), Some(&m));
    for user in 500..1000 {
        s.remove(user, m.server_id).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert!(s.bodies.is_empty(), "the body went with its last copy");
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!(s.total(), 0, "nothing comes back");
    assert!(s.bodies.is_empty());
}

#[test]
fn group_copies_delivered_before_their_commit_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(1, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    let size = files(tmp.path());
    let m = msg(2, 300);
    for user in 10..13 {
        s.push_shared(user, m.clone()).unwrap();
    }
    s.remove(11, 2).unwrap();
    s.check();
    // Two copies left: the body and their records are still staged.
    assert!(s.has_uncommitted());
    s.remove(10, 2).unwrap();
    s.remove(12, 2).unwrap();
    s.check();
    assert!(!s.has_uncommitted(), "the body went with its last copy");
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(files(tmp.path()), size);
    drop(s);
    assert_eq!(reopen(tmp.path(), &o).total(), 1);
}

/// Tiny segments and a copy budget of one record per commit: the member
/// copies move before their body, into other segments, and the original
/// goes; the replay meets the copies before the body and still gives each
/// member its message, and no delivered copy comes back.
#[test]
fn compaction_moves_copies_and_body_apart_and_replay_joins_them() {
    let tmp = tempfile::tempdir().unwrap();
    let o = LogOptions {
        compact_dead_ratio: 0.0,
        ..tiny(300)
    };
    let mut s = reopen(tmp.path(), &o);
    s.compact_bytes_per_commit = 1;
    let m = msg(1 << 10, 250);
    for user in 0..6 {
        s.push_shared(user, m.clone()).unwrap();
    }
    s.push(50, msg(2 << 10, 10)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    let first = files(tmp.path())[0].0;
    s.remove(0, m.server_id).unwrap();
    for i in 0..40 {
        // Filler that rolls segments and is delivered, so the first one
        // is mostly dead and gets compacted.
        let id = (3 + i) << 10;
        s.push(60, msg(id, 100)).unwrap();
        s.commit(&mut Vec::new()).unwrap();
        s.remove(60, id).unwrap();
        s.commit(&mut Vec::new()).unwrap();
        s.check();
    }
    assert!(
        files(tmp.path()).iter().all(|&(n, _)| n != first),
        "the first segment was compacted away: {:?}",
        files(tmp.path())
    );
    s.remove(3, m.server_id).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    let before = snapshot(&s);
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!(snapshot(&s), before);
    assert_eq!(s.len(0) + s.len(3), 0, "delivered copies stay delivered");
    for user in [1, 2, 4, 5] {
        assert_eq!(s.next_after(user, 0), Some(&m));
    }
}

#[test]
fn push_then_remove_in_one_batch_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(1, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    let size = files(tmp.path());
    let syncs = s.syncs();
    // Delivered and acknowledged within one loop iteration.
    s.push(2, msg(2, 200)).unwrap();
    s.push(2, msg(3, 200)).unwrap();
    assert_eq!(s.remove(2, 2), Some(msg(2, 200)));
    assert_eq!(s.remove(2, 3), Some(msg(3, 200)));
    assert!(!s.has_uncommitted(), "nothing left to make durable");
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(files(tmp.path()), size, "file size unchanged");
    assert_eq!(s.syncs(), syncs, "no write, no sync");
    s.check();
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!(s.total(), 1);
    assert_eq!(s.len(2), 0);
}

#[test]
fn torn_tail_at_every_offset_inside_the_last_record() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Os);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=4 {
        s.push(1, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.remove(1, 2).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.push(1, msg(5, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    drop(s);
    let path = seg_path(tmp.path(), 1);
    let full = fs::read(&path).unwrap();
    let last = full.len() - REC as usize;
    for cut in last..full.len() {
        fs::write(&path, &full[..cut]).unwrap();
        let (s, r) = open(tmp.path(), &o);
        let ids: Vec<u64> = snapshot(&s)[&1].iter().map(|m| m.server_id).collect();
        assert_eq!(ids, [1, 3, 4], "cut at {cut}");
        assert_eq!(r.bytes_cut, (cut - last) as u64);
        if cut > last {
            assert_eq!(r.cut_at, Some((path.clone(), last as u64)));
            assert!(r.to_string().contains("cut a torn tail"), "{r}");
        }
        assert_eq!(fs::metadata(&path).unwrap().len(), last as u64);
        drop(s);
    }
    // The cut file takes appends again.
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(9, 10)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    drop(s);
    assert_eq!(reopen(tmp.path(), &o).len(1), 4);
}

#[test]
fn power_loss_hole_in_the_last_batch_is_cut_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=3 {
        s.push(1, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    let batch = files(tmp.path())[0].1 as usize;
    for id in 4..=30 {
        s.push(2, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    drop(s);
    // A page of the last, unsynced write never reached the disk: it
    // reads back as zeros while later pages did land.
    let path = seg_path(tmp.path(), 1);
    let mut data = fs::read(&path).unwrap();
    let hole = 2048;
    assert!(hole > batch && hole + 2048 < data.len());
    data[hole..hole + 512].fill(0);
    fs::write(&path, &data).unwrap();
    let first_bad = batch + (hole - batch) / REC as usize * REC as usize;
    let (s, r) = open(tmp.path(), &o);
    assert_eq!(r.cut_at, Some((path, first_bad as u64)));
    assert_eq!(r.bytes_cut, (data.len() - first_bad) as u64);
    assert_eq!(s.len(1), 3, "the synced batch is intact");
    assert_eq!(s.len(2), (first_bad - batch) / REC as usize);
}

fn five_records(dir: &Path, o: &LogOptions) -> PathBuf {
    let mut s = reopen(dir, o);
    for id in 1..=5 {
        s.push(1, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    seg_path(dir, 1)
}

#[test]
fn corrupt_record_in_the_middle_names_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let path = five_records(tmp.path(), &o);
    let mut data = fs::read(&path).unwrap();
    data[2 * REC as usize + 100] ^= 0x10; // the body of the third record
    fs::write(&path, &data).unwrap();
    let err = LogStore::open(tmp.path(), o.clone()).unwrap_err();
    let StoreError::Corrupt {
        file,
        offset,
        reason,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(file, &path);
    assert_eq!(*offset, 2 * REC);
    assert_eq!(*reason, "checksum mismatch");
    let text = err.to_string();
    assert!(text.contains("00000001.log"), "{text}");
    assert!(text.contains("offset 482"), "{text}");
    assert!(text.contains("--repair"), "{text}");
    assert_eq!(
        fs::read(&path).unwrap(),
        data,
        "a failed open changes nothing"
    );
}

#[test]
fn repair_skips_the_corrupt_record_and_cleans_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let path = five_records(tmp.path(), &o);
    let mut data = fs::read(&path).unwrap();
    data[2 * REC as usize + 100] ^= 0x10;
    fs::write(&path, &data).unwrap();
    let repair = LogOptions {
        repair: true,
        ..o.clone()
    };
    let (s, r) = open(tmp.path(), &repair);
    let ids: Vec<u64> = snapshot(&s)[&1].iter().map(|m| m.server_id).collect();
    assert_eq!(ids, [1, 2, 4, 5]);
    assert_eq!(
        r.skipped,
        [Skipped {
            file: path.clone(),
            offset: 2 * REC,
            bytes: REC,
            reason: "checksum mismatch",
        }]
    );
    assert!(r.to_string().contains("repair skipped 241 bytes"), "{r}");
    drop(s);
    assert_eq!(fs::metadata(&path).unwrap().len(), 4 * REC);
    // Clean now: no repair needed.
    let s = reopen(tmp.path(), &o);
    assert_eq!(s.len(1), 4);
}

/// Seeds 701013, 708043 and 719337 of the simulator: two neighbouring
/// damaged records are skipped as one span (the scanner resumes at the next
/// valid record), which covers exactly the two and nothing after them.
#[test]
fn repair_skips_two_neighbouring_corrupt_records_as_one_span() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let path = five_records(tmp.path(), &o);
    let mut data = fs::read(&path).unwrap();
    data[REC as usize + 100] ^= 0x10; // the second record's body
    data[2 * REC as usize + 7] ^= 0x01; // the third record's header
    fs::write(&path, &data).unwrap();
    let repair = LogOptions {
        repair: true,
        ..o.clone()
    };
    let (s, r) = open(tmp.path(), &repair);
    let ids: Vec<u64> = snapshot(&s)[&1].iter().map(|m| m.server_id).collect();
    assert_eq!(ids, [1, 4, 5]);
    assert_eq!(r.skipped.len(), 1, "{r}");
    assert_eq!((r.skipped[0].offset, r.skipped[0].bytes), (REC, 2 * REC));
    drop(s);
    assert_eq!(fs::metadata(&path).unwrap().len(), 3 * REC);
    let s = reopen(tmp.path(), &o);
    assert_eq!(s.len(1), 3);
}

#[test]
fn damaged_end_of_a_sealed_segment_is_not_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(500);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=4 {
        s.push(1, msg(id, 200)).unwrap();
        s.commit(&mut Vec::new()).unwrap();
    }
    assert_eq!(files(tmp.path()), [(1, 3 * REC), (2, REC)]);
    drop(s);
    let path = seg_path(tmp.path(), 1);
    let data = fs::read(&path).unwrap();
    fs::write(&path, &data[..data.len() - 3]).unwrap();
    match LogStore::open(tmp.path(), o.clone()) {
        Err(StoreError::Corrupt {
            file,
            offset,
            reason,
        }) => {
            assert_eq!(file, path);
            assert_eq!(offset, 2 * REC);
            assert_eq!(reason, "record runs past the end of the file");
        }
        other => panic!("{other:?}"),
    }
    let repair = LogOptions { repair: true, ..o };
    let (s, r) = open(tmp.path(), &repair);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(s.len(1), 3);
}

#[test]
fn segments_roll_at_a_tiny_size() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(500);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=7 {
        s.push(1, msg(id, 200)).unwrap();
        s.commit(&mut Vec::new()).unwrap();
        s.check();
    }
    // Sealed once past 500 bytes: three 241-byte records each.
    assert_eq!(files(tmp.path()), [(1, 723), (2, 723), (3, 241)]);
    assert_eq!(s.segments(), 3);
    assert_eq!(s.disk_bytes(), 7 * REC);
    // A batch is never split across segments.
    for id in 8..=12 {
        s.push(1, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(files(tmp.path())[2], (3, 6 * REC));
    drop(s);
    let (s, r) = open(tmp.path(), &o);
    assert_eq!(r.segments, 3);
    assert_eq!(s.len(1), 12);
    assert!(s.active.is_none(), "the last segment is full: sealed");
}

#[test]
fn fully_dead_sealed_segment_is_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(500);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=3 {
        s.push(1, msg(id, 200)).unwrap();
        s.commit(&mut Vec::new()).unwrap();
    }
    s.push(2, msg(4, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.segments(), 2);
    for id in 1..=3 {
        s.remove(1, id).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert!(!seg_path(tmp.path(), 1).exists());
    assert_eq!(files(tmp.path()), [(2, REC + 3 * 25)]);
    assert_eq!(s.disk_bytes(), REC + 75);
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!(s.total(), 1);
    assert_eq!(s.len(2), 1);
}

#[test]
fn compaction_keeps_live_messages_ids_and_order() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(2000);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=9 {
        s.push(id % 3, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.segments(), 1);
    assert!(s.active.is_none(), "2169 bytes: sealed");
    // Deliver 6 of 9: dead share 2/3 > 0.5. Keep 2, 5 and 8 (user 2).
    for id in [1, 3, 4, 6, 7, 9] {
        s.remove(id % 3, id).unwrap();
    }
    let want = snapshot(&s);
    assert_eq!(want.len(), 1);
    // One copy per commit, to see the work spread over commits.
    s.compact_bytes_per_commit = 1;
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert_eq!(s.rewritten_bytes(), REC);
    assert!(seg_path(tmp.path(), 1).exists(), "not drained yet");
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.rewritten_bytes(), 2 * REC);
    assert!(seg_path(tmp.path(), 1).exists());
    // A restart now sees originals and copies of 2 and 5: one each.
    drop(s);
    let (mut s, r) = open(tmp.path(), &o);
    assert_eq!(snapshot(&s), want);
    assert_eq!(r.messages, 3);
    assert_eq!(s.segments[&1].live, 1, "only 8 is current in segment 1");
    s.compact_bytes_per_commit = 1;
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert!(!seg_path(tmp.path(), 1).exists(), "drained and deleted");
    assert_eq!(files(tmp.path()).len(), 1);
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!(snapshot(&s), want);
    let ids: Vec<u64> = want[&2].iter().map(|m| m.server_id).collect();
    assert_eq!(ids, [2, 5, 8]);
}

#[test]
fn tombstones_keep_their_target_segment_from_coming_back() {
    let tmp = tempfile::tempdir().unwrap();
    let o = LogOptions {
        compact_dead_ratio: 1.0, // never by ratio: only the pin rule moves
        ..tiny(500)
    };
    let mut s = reopen(tmp.path(), &o);
    // Segment 1: A(1), B(2), C(3).
    for id in 1..=3 {
        s.push(id, msg(id, 200)).unwrap();
        s.commit(&mut Vec::new()).unwrap();
    }
    // Segment 2: tombstone of B, D(4), E(5).
    s.remove(2, 2).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.push(4, msg(4, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.push(5, msg(5, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(files(tmp.path()).len(), 2);
    assert_eq!(s.segments[&2].pins, BTreeSet::from([1]));
    // Segment 2 dies, but its tombstone still cancels B in segment 1.
    s.remove(4, 4).unwrap();
    s.remove(5, 5).unwrap();
    s.compact_bytes_per_commit = 1;
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    // Segment 1 is being compacted to free it (one copy so far), and
    // segment 2 must wait for it.
    assert!(seg_path(tmp.path(), 1).exists());
    assert!(
        seg_path(tmp.path(), 2).exists(),
        "deleted before its target"
    );
    drop(s); // a crash here must not bring B back
    let mut s = reopen(tmp.path(), &o);
    assert_eq!(s.total(), 2);
    assert_eq!(s.len(2), 0, "B stays delivered");
    for _ in 0..4 {
        s.commit(&mut Vec::new()).unwrap();
        s.check();
    }
    assert_eq!(files(tmp.path()).len(), 1, "both freed in order");
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!((s.len(1), s.len(2), s.len(3)), (1, 0, 1));
}

#[test]
fn lost_unlink_after_compaction_is_harmless() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(1000);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=5 {
        s.push(1, msg(id, 200)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    let original = fs::read(seg_path(tmp.path(), 1)).unwrap();
    for id in [1, 2, 4] {
        s.remove(1, id).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    assert!(!seg_path(tmp.path(), 1).exists(), "compacted");
    drop(s);
    // The crash lost the unlink: the old segment is back.
    fs::write(seg_path(tmp.path(), 1), &original).unwrap();
    let mut s = reopen(tmp.path(), &o);
    let ids: Vec<u64> = snapshot(&s)[&1].iter().map(|m| m.server_id).collect();
    assert_eq!(ids, [3, 5], "no duplicates, delivered ones stay gone");
    assert_eq!(s.segments[&2].pins, BTreeSet::from([1]));
    s.remove(1, 3).unwrap();
    s.remove(1, 5).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    drop(s);
    assert_eq!(reopen(tmp.path(), &o).total(), 0);
}

#[test]
fn disk_bound_refuses_with_storage_full_and_drops_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let o = LogOptions {
        disk_bytes_max: 1010,
        ..tiny(500)
    };
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=4 {
        s.push(1, msg(id, 200)).unwrap();
    }
    // Staged bytes count: 5 * 241 > 1010.
    assert_eq!(
        s.push(1, msg(5, 200)),
        Err(PushError::StorageFull(msg(5, 200)))
    );
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(
        s.push(2, msg(6, 200)),
        Err(PushError::StorageFull(msg(6, 200)))
    );
    assert!(!s.queues.contains_key(&2), "no empty queue left behind");
    // A small one still fits: 4 * 241 + 41 <= 1010.
    s.push(2, msg(7, 0)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    drop(s);
    let mut s = reopen(tmp.path(), &o);
    assert_eq!((s.len(1), s.len(2)), (4, 1), "nothing lost");
    // Deliveries free the space again.
    for id in 1..=4 {
        s.remove(1, id).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert!(s.disk_bytes() < 500, "{}", s.disk_bytes());
    s.push(1, msg(8, 200)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
}

#[test]
fn queue_limit_gives_queue_full() {
    let tmp = tempfile::tempdir().unwrap();
    let o = LogOptions {
        queue_len_max: 1,
        ..opts(Durability::Fsync)
    };
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(1, 5)).unwrap();
    assert_eq!(s.push(1, msg(2, 5)), Err(PushError::QueueFull(msg(2, 5))));
    s.push(2, msg(3, 5)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    drop(s);
    // A longer limit, then a shorter one: recovered queues keep every
    // message and refuse pushes.
    let long = LogOptions {
        queue_len_max: 3,
        ..o.clone()
    };
    let mut s = reopen(tmp.path(), &long);
    s.push(1, msg(4, 5)).unwrap();
    s.push(1, msg(5, 5)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    drop(s);
    let mut s = reopen(tmp.path(), &o);
    assert_eq!(s.len(1), 3);
    assert!(matches!(s.push(1, msg(6, 5)), Err(PushError::QueueFull(_))));
}

#[test]
fn max_server_id_survives_reopen_even_for_skipped_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let (mut s, r) = open(tmp.path(), &o);
    assert_eq!(r.max_server_id, 0);
    s.push(1, msg(5000, 1)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    // Delivered within the batch: never on disk.
    s.push(1, msg(7000, 1)).unwrap();
    s.remove(1, 7000).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    // Handed out, never committed.
    s.push(1, msg(9000, 1)).unwrap();
    drop(s);
    let (mut s, r) = open(tmp.path(), &o);
    assert!(r.max_server_id >= 9000);
    assert_eq!(s.max_server_id(), r.max_server_id);
    // A jump past the reserve is made durable by the next commit.
    let far = r.max_server_id + ID_RESERVE;
    s.push(2, msg(far, 1)).unwrap();
    s.remove(2, far).unwrap();
    assert!(s.has_uncommitted(), "the watermark must move first");
    s.commit(&mut Vec::new()).unwrap();
    assert!(!s.has_uncommitted());
    drop(s);
    assert!(reopen(tmp.path(), &o).max_server_id() >= far);
}

#[test]
fn memory_durability_writes_no_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-0");
    let o = opts(Durability::Memory);
    let (mut s, r) = open(&dir, &o);
    assert_eq!(r.records, 0);
    for id in 1..=5 {
        s.push(1, msg(id, 10)).unwrap();
    }
    s.remove(1, 2).unwrap();
    assert!(!s.has_uncommitted());
    s.commit(&mut Vec::new()).unwrap();
    s.check();
    assert_eq!(s.len(1), 4);
    assert_eq!(s.max_server_id(), 5);
    assert_eq!((s.syncs(), s.disk_bytes(), s.segments()), (0, 0, 0));
    assert!(!dir.exists());
    drop(s);
    assert_eq!(reopen(&dir, &o).total(), 0);
    assert!(!dir.exists());
}

#[test]
fn os_durability_writes_without_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Os);
    let mut s = reopen(tmp.path(), &o);
    for id in 1..=3 {
        s.push(9, msg(id, 30)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    s.remove(9, 1).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.syncs(), 0);
    // In the file already, while the store is still open.
    let data = fs::read(seg_path(tmp.path(), 1)).unwrap();
    let records: Vec<Record> = Scanner::new(&data)
        .map(|step| match step {
            Step::Record { record, .. } => record,
            bad => panic!("{bad:?}"),
        })
        .collect();
    let m = msg(2, 30);
    assert_eq!(records.len(), 4);
    assert_eq!(
        records[1],
        Record::Queued {
            user: 9,
            server_id: 2,
            from: m.from,
            time_ms: m.time_ms,
            origin: None,
            body: &m.body
        }
    );
    assert_eq!(
        records[3],
        Record::Delivered {
            user: 9,
            server_id: 1
        }
    );
    drop(s);
}

#[test]
fn fsync_durability_syncs_once_per_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = reopen(tmp.path(), &opts(Durability::Fsync));
    let at_open = s.syncs();
    assert!(at_open >= 2, "meta and its directory");
    for id in 1..=100 {
        s.push(id % 10, msg(id, 50)).unwrap();
    }
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(
        s.syncs(),
        at_open + 2,
        "the new segment's directory entry + one data sync"
    );
    for id in 101..=200 {
        s.push(id % 10, msg(id, 50)).unwrap();
    }
    s.remove(1, 1).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.syncs(), at_open + 3, "100 pushes and a remove: one sync");
    s.commit(&mut Vec::new()).unwrap();
    assert_eq!(s.syncs(), at_open + 3, "nothing staged: no sync");
}

#[test]
fn options_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            LogOptions {
                queue_len_max: 0,
                ..LogOptions::default()
            },
            "queue_len_max",
        ),
        (
            LogOptions {
                segment_bytes_max: 0,
                ..LogOptions::default()
            },
            "segment_bytes_max",
        ),
        (
            LogOptions {
                segment_bytes_max: SEGMENT_BYTES_MAX_LIMIT + 1,
                ..LogOptions::default()
            },
            "segment_bytes_max",
        ),
        (
            LogOptions {
                disk_bytes_max: 2 * SEGMENT_BYTES_MAX_DEFAULT - 1,
                ..LogOptions::default()
            },
            "disk_bytes_max",
        ),
        (
            LogOptions {
                compact_dead_ratio: f64::NAN,
                ..LogOptions::default()
            },
            "compact_dead_ratio",
        ),
        (
            LogOptions {
                compact_dead_ratio: 1.5,
                ..LogOptions::default()
            },
            "compact_dead_ratio",
        ),
    ];
    for (o, field) in cases {
        match LogStore::open(tmp.path(), o) {
            Err(e @ StoreError::Options { .. }) => {
                assert!(e.to_string().contains(field), "{e}")
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(LogOptions::default().validate().is_ok());
    let edge = LogOptions {
        segment_bytes_max: 1,
        disk_bytes_max: 2,
        compact_dead_ratio: 0.0,
        ..LogOptions::default()
    };
    assert!(edge.validate().is_ok());
}

#[test]
fn durability_names() {
    #[derive(Deserialize, Serialize)]
    struct C {
        durability: Durability,
    }
    for d in [Durability::Fsync, Durability::Os, Durability::Memory] {
        let text = toml::to_string(&C { durability: d }).unwrap();
        assert_eq!(text.trim(), format!("durability = \"{d}\""));
        assert_eq!(toml::from_str::<C>(&text).unwrap().durability, d);
        assert_eq!(d.as_str().parse::<Durability>(), Ok(d));
    }
    assert_eq!(Durability::default(), Durability::Fsync);
    assert!(toml::from_str::<C>("durability = \"FSYNC\"").is_err());
    assert!("sometimes".parse::<Durability>().is_err());
}

#[test]
fn meta_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    five_records(tmp.path(), &o);
    let meta = tmp.path().join(META);
    let good = fs::read_to_string(&meta).unwrap();
    fs::write(&meta, good.replace("version 1", "version 2")).unwrap();
    let e = LogStore::open(tmp.path(), o.clone()).unwrap_err();
    assert!(
        matches!(e, StoreError::Meta { .. }) && e.to_string().contains("version 2"),
        "{e}"
    );
    fs::remove_file(&meta).unwrap();
    let e = LogStore::open(tmp.path(), o.clone()).unwrap_err();
    assert!(e.to_string().contains("--repair"), "{e}");
    let repair = LogOptions { repair: true, ..o };
    let (s, r) = open(tmp.path(), &repair);
    assert!(r.meta_recreated);
    assert_eq!(s.total(), 5);
    assert!(s.max_server_id() >= 5);
    // Leftovers of an interrupted replace are cleaned up.
    fs::write(tmp.path().join(META_TMP), "junk").unwrap();
    fs::write(tmp.path().join("00000001.log.tmp"), "junk").unwrap();
    drop(s);
    let _ = reopen(tmp.path(), &repair);
    assert!(!tmp.path().join("00000001.log.tmp").exists());
}

#[test]
fn a_failed_commit_fails_every_later_one() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(Durability::Fsync);
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(1, 10)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    // Swap the active file for a read-only handle: the write fails.
    let path = seg_path(tmp.path(), 1);
    s.active.as_mut().unwrap().1 = File::open(&path).unwrap().into();
    s.push(1, msg(2, 10)).unwrap();
    let e = s.commit(&mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("append to segment"), "{e}");
    assert!(s.failed());
    assert!(s.has_uncommitted());
    s.push(1, msg(3, 10)).unwrap();
    assert!(s
        .commit(&mut Vec::new())
        .unwrap_err()
        .to_string()
        .contains("failed earlier"));
    drop(s);
    let s = reopen(tmp.path(), &o);
    assert_eq!(s.len(1), 1, "only what was committed");
}

#[derive(Clone, Debug)]
enum Op {
    Push(u8, u8),
    /// One shared copy for each user in the mask (a group message).
    Group(u8, u8),
    Remove(u8, u8),
    Commit,
    /// Commit, drop, open.
    Reopen,
    /// Drop without committing, open.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..4, any::<u8>()).prop_map(|(u, b)| Op::Push(u, b)),
        2 => (1u8..16, any::<u8>()).prop_map(|(m, b)| Op::Group(m, b)),
        4 => (0u8..4, any::<u8>()).prop_map(|(u, n)| Op::Remove(u, n)),
        3 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random pushes, removes, commits, restarts and crashes against a
    /// plain model, with segments small enough to roll, delete and
    /// compact all the time.
    #[test]
    fn behaves_like_the_model(
        ops in prop::collection::vec(op(), 1..250),
        ratio in 0.0f64..=1.0,
        budget in 1u64..800,
        segment_bytes_max in 150u64..700,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let o = LogOptions {
            durability: Durability::Os,
            queue_len_max: 4,
            segment_bytes_max,
            disk_bytes_max: 0,
            disk_free_bytes_min: 0,
            compact_dead_ratio: ratio,
            repair: false,
        };
        let mut s = reopen(tmp.path(), &o);
        s.compact_bytes_per_commit = budget;
        let mut model: BTreeMap<u64, Vec<Stored>> = BTreeMap::new();
        let mut committed = model.clone();
        let mut next_id = 1;
        for op in ops {
            match op {
                Op::Push(u, b) => {
                    let user = u as u64;
                    let m = msg(next_id, b as usize % 60);
                    next_id += 1;
                    let result = s.push(user, m.clone());
                    if model.get(&user).map_or(0, Vec::len) >= 4 {
                        prop_assert_eq!(result, Err(PushError::QueueFull(m)));
                    } else {
                        prop_assert_eq!(result, Ok(()));
                        model.entry(user).or_default().push(m);
                    }
                }
                Op::Group(mask, b) => {
                    let m = msg(next_id, b as usize % 90);
                    next_id += 1;
                    for user in (0..4u64).filter(|u| mask & (1 << u) != 0) {
                        let result = s.push_shared(user, m.clone());
                        if model.get(&user).map_or(0, Vec::len) >= 4 {
                            prop_assert_eq!(result, Err(PushError::QueueFull(m.clone())));
                        } else {
                            prop_assert_eq!(result, Ok(()));
                            model.entry(user).or_default().push(m.clone());
                        }
                    }
                }
                Op::Remove(u, n) => {
                    let user = u as u64;
                    match model.get_mut(&user) {
                        Some(q) => {
                            let m = q.remove(n as usize % q.len());
                            if q.is_empty() {
                                model.remove(&user);
                            }
                            prop_assert_eq!(s.remove(user, m.server_id), Some(m));
                        }
                        None => prop_assert_eq!(s.remove(user, 1), None),
                    }
                }
                Op::Commit => {
                    s.commit(&mut Vec::new()).unwrap();
                    committed = model.clone();
                }
                Op::Reopen | Op::Crash => {
                    if matches!(op, Op::Reopen) {
                        s.commit(&mut Vec::new()).unwrap();
                        committed = model.clone();
                    }
                    drop(s);
                    s = reopen(tmp.path(), &o);
                    s.compact_bytes_per_commit = budget;
                    model = committed.clone();
                    // No id is ever handed out twice.
                    prop_assert!(s.max_server_id() >= next_id - 1);
                    next_id = s.max_server_id() + 1;
                }
            }
            s.check();
            prop_assert_eq!(&snapshot(&s), &model);
        }
    }
}

/// Random pushes of v2 messages (client ids increasing per sender),
/// removals in and out of their batch, commits, reopens, tiny segments:
/// the invariants hold, and the windows survive every reopen.
#[test]
fn dedupe_windows_under_random_churn() {
    for seed in [0x5eed_u64, 1, 2, 3, 4, 5] {
        churn(seed);
    }
}

fn churn(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(1024);
    let mut s = reopen(tmp.path(), &o);
    let mut rng = seed;
    let mut next = || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut id = 0;
    let mut cid = [0u64; 4];
    let mut queued: Vec<(u64, u64)> = Vec::new();
    for step in 0..1500 {
        match next() % 10 {
            0..=4 => {
                let from = next() % 4;
                cid[from as usize] += 1 + next() % 3;
                id += 1;
                let user = 10 + next() % 3;
                s.push(user, v2(id, from, cid[from as usize])).unwrap();
                queued.push((user, id));
            }
            5..=7 if !queued.is_empty() => {
                let at = (next() % queued.len() as u64) as usize;
                let (user, sid) = queued.swap_remove(at);
                s.remove(user, sid).unwrap();
            }
            8 => {
                s.commit(&mut Vec::new()).unwrap();
                s.check();
            }
            _ if step % 50 == 0 => {
                s.commit(&mut Vec::new()).unwrap();
                let before: Vec<_> = (0..4u64)
                    .flat_map(|f| (0..=cid[f as usize]).map(move |c| (f, c)))
                    .map(|(f, c)| {
                        let o = Origin {
                            device: 0,
                            client_id: c,
                        };
                        s.seen(f, o)
                    })
                    .collect();
                drop(s);
                s = reopen(tmp.path(), &o);
                let after: Vec<_> = (0..4u64)
                    .flat_map(|f| (0..=cid[f as usize]).map(move |c| (f, c)))
                    .map(|(f, c)| {
                        let o = Origin {
                            device: 0,
                            client_id: c,
                        };
                        s.seen(f, o)
                    })
                    .collect();
                assert_eq!(
                    before, after,
                    "windows changed across a reopen at step {step}"
                );
            }
            _ => {}
        }
    }
    s.commit(&mut Vec::new()).unwrap();
    s.check();
}

/// A restart after a failed fsync replays the last segment's end from the
/// page cache. Recovery must sync it: once full, that segment is sealed and
/// never synced again, and a power cut would tear a segment that is no
/// longer the last, which the next start refuses as corrupt (simulator
/// seed 500301).
#[test]
fn recovery_syncs_the_last_segment_after_a_failed_fsync() {
    use crate::sim::disk::{self, DiskFaults};
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny(200);
    disk::install(
        1,
        DiskFaults {
            sync_eio_per_million: 1_000_000,
            ..DiskFaults::default()
        },
    );
    disk::set_faults(false);
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(1, 10)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    // Fills segment 1 past its 200 bytes; its fsync fails.
    s.push(1, msg(2, 300)).unwrap();
    disk::set_faults(true);
    assert!(s.commit(&mut Vec::new()).is_err());
    drop(s);
    disk::set_faults(false);
    // The restart; the next push starts segment 2.
    let mut s = reopen(tmp.path(), &o);
    s.push(1, msg(3, 10)).unwrap();
    s.commit(&mut Vec::new()).unwrap();
    drop(s);
    disk::crash().unwrap();
    let opened = LogStore::open(tmp.path(), o.clone());
    disk::uninstall();
    let (s, r) = opened.expect("a power cut tore no sealed segment");
    assert!(r.skipped.is_empty(), "{r}");
    assert_eq!(s.len(1), 3);
}
