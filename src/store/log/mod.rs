//! The durable store: one append-only log per shard, replayed at start.
//!
//! [`LogStore`] keeps the same in-memory queues as [`MemStore`](super::MemStore)
//! and also records every change in segment files under the shard's own
//! directory (`<data_dir>/shard-<N>/`, see [`shard_dir`]). Only the shard's
//! thread touches it, so there are no locks.
//!
//! # On disk
//!
//! ```text
//! <dir>/meta           "tern store log\nversion 1\nserver_id_max <n>\n"
//! <dir>/00000001.log   records, appended; the highest number is the active one
//! <dir>/00000002.log
//! ```
//!
//! A segment is a plain sequence of records (format in `record.rs`: `len` u32
//! LE, `crc32c` u32 LE over the rest, `kind` u8, fixed-width LE fields, body).
//! Kinds: `Queued { user, server_id, from, time_ms, origin, body }` when a
//! message is stored (kind 3 with a v2 sender's origin, else kind 1),
//! `Delivered { user, server_id }`, its tombstone, and `Taken`, a dedupe
//! window entry that outlived its message (see "Dedupe windows"), and for
//! group messages `Body` and `Member` (see "Shared bodies"). `meta` holds
//! the format version and the id watermark (below); it is replaced atomically
//! (write `meta.tmp`, rename).
//!
//! # Group commit
//!
//! `push` and `remove` change the queues at once and only *stage* a record.
//! [`commit`](Store::commit) encodes the whole batch, writes it to the active
//! segment with one `write`, then (with [`Durability::Fsync`]) calls
//! `fdatasync` once. The shard sends the ACKs of the batch after `commit`
//! returned `Ok`, so an ACK always means "durable".
//!
//! **Pipelined.** The shard does not wait for the `fdatasync` on its loop:
//! [`begin_commit`](Store::begin_commit) does everything `commit` does but
//! the sync, which it hands back as a [`SyncJob`] (its own handle on the
//! segment, so a roll does not matter) for another thread to run, and
//! [`synced`](Store::synced) takes the outcome. In between, pushes and
//! removes stage the *next* batch; it is written only after the sync (one
//! batch between write and sync at a time). The bookkeeping (where each
//! message is, segment counts, pins, window pruning) is updated at the
//! write, as if durable, but three things wait for `synced`:
//!
//! - visibility: `next_after` shows no push above `durable_id` (ids grow
//!   with each push, so the pushes of the batch being synced and of the
//!   one staged are exactly those above it); nothing is delivered, so
//!   nothing removed, before it is durable;
//! - deleting files: the compaction victim whose copies the batch holds,
//!   and fully dead segments, go only once the batch is durable. A segment
//!   may lose its last live message to a remove whose tombstone is still
//!   staged; deleting it then is safe, as the message was delivered and the
//!   pins keep any older copy of it from outliving the file;
//! - the ACKs, which the shard releases only after `synced` returned `Ok`.
//!
//! A failed sync leaves the store failed (see "Errors"): the shard crashes
//! and replays. The skip rule below is unchanged: it applies to pushes
//! still staged (never written).
//!
//! **The skip rule:** a message pushed and then removed before the next
//! `commit` (delivered to an online recipient and acknowledged by its device
//! within one loop iteration) writes nothing at all: its staged `Queued`
//! record is cancelled and no tombstone is needed. Such a message never
//! touches the disk. This is safe because the sender's ACK waits for the
//! commit anyway, and a message that is already delivered needs no
//! persistence.
//!
//! # Segments, deletion and compaction
//!
//! The active segment rolls (the next `commit` starts `000000NN+1.log`) once
//! it holds `segment_bytes_max` bytes; a batch is never split, so a segment
//! may end up to one batch longer. Every segment counts its *live* messages
//! (messages whose current `Queued` record is in it) and their bytes.
//!
//! - A sealed segment with no live message is deleted.
//! - A sealed segment whose dead share (`1 - live_bytes / bytes`) passes
//!   `compact_dead_ratio` is compacted: its live messages are appended again
//!   to the active segment (same ids, same fields), and the old file is
//!   deleted once those copies are durable. The work is spread over commits,
//!   about [`COMPACT_BYTES_PER_COMMIT`] of copies per commit (the last copy
//!   may pass it by one message), so a loop iteration stays short.
//!
//! **Pins.** A tombstone only matters while the `Queued` record it cancels is
//! still on disk: if the segment holding the tombstone went first, the next
//! replay would bring the message back. So each segment keeps the set of
//! older segments it must outlive: the segments its tombstones point into,
//! and the segments its compaction copies came from (while both the original
//! and the copy exist, the copy must not go first, or a later tombstone
//! aimed at the copy would be lost with it). A segment is deleted only once
//! that set is empty. When a reclaimable segment is held up by pins, the
//! oldest segment it waits for is compacted, whatever its dead share. The
//! oldest segment never has pins, so this always makes progress.
//!
//! # Dedupe windows
//!
//! The store keeps the dedupe windows of protocol v2 senders
//! (`store::window`): an entry is created by the push of a message with an
//! origin and lives in that message's record while the message is queued.
//! When the message goes, the entry may still be in its window: its record
//! (or, for a message removed before its commit, a `Taken` record written
//! instead of nothing) then counts in its segment's `refs`, which keeps the
//! segment from being deleted; compaction copies such entries as `Taken`
//! records (all of a victim's at once, after its messages). Windows are
//! pruned after each commit (never before: a rolled-back batch must not have
//! evicted entries), and an entry pruned frees its segment. Recovery
//! rebuilds the windows from the `Queued` (kind 3) and `Taken` records, then
//! prunes them and counts the refs.
//!
//! # Shared bodies
//!
//! A group message reaches a shard once for all its members homed there,
//! every copy under one server id and one body ([`Store::push_shared`]).
//! The log writes that body once, as a `Body` record (kind 13), and per
//! member a 25-byte `Member` record (kind 14) naming it; a member's copy
//! is tombstoned by a `Delivered` record like any message. In memory the
//! store keeps, per such id, the body's location and how many member
//! copies are queued (`bodies`): a copy is a group copy exactly when its
//! id is there.
//!
//! - A `Member` record is a message for the segment bookkeeping (live
//!   count, bytes, index, pins by its tombstone); the `Body` record counts
//!   as one more live record of its segment as long as any member copy is
//!   queued, so its file outlives every live `Member` record naming it.
//! - When the last copy goes, the body needs no record: a `Body` no queued
//!   copy names is dropped by the replay. Nothing comes back, since each
//!   member's copy has its own tombstone, pinned as any other.
//! - Staged and removed before the commit (the skip rule), a copy writes
//!   nothing; the body is not written when all its copies went so.
//! - Compaction copies live `Member` records and then live `Body` records,
//!   so after a compaction a `Member` may come before its `Body` in the
//!   replay order: the replay counts copies by id and fills in their body
//!   once the segments are read. A copy whose `Body` is not found (lost
//!   to a repair) is dropped and reported in the log line.
//! - A rolled back batch takes its bodies and copies out again.
//! - The replay keeps every body it read until its end (what it makes of
//!   a record must not depend on older segments, which may be deleted
//!   first), so it holds the log's delivered bodies for a while too.
//! - Only a damaged log gives a message and a copy one id: for each user
//!   the later record is the current one, and a message left under a
//!   body's id is kept as a message (`clashes`).
//!
//! # Recovery
//!
//! [`LogStore::open`] replays the segments in order: `Queued` inserts (a
//! second copy of an id left by a compaction that was cut short replaces the
//! first), `Delivered` removes. Then:
//!
//! - **The tail of the last segment** may be torn by a crash during a write.
//!   Everything from the first bad record on is cut (the file is truncated)
//!   when either no valid record follows it, or the damaged stretch holds an
//!   aligned all-zero 512-byte sector: the mark of a write that a power loss
//!   cut short, whose later pages may have landed while earlier ones did not.
//!   That write was never synced, so nothing in it was acknowledged.
//!   [`Recovery`] says how many bytes were cut.
//! - **Any other bad record** (in a sealed segment, or followed by valid
//!   records without such a zero sector) is damage to acknowledged data:
//!   `open` fails with [`StoreError::Corrupt`], naming the file and offset.
//!   With `repair`, it skips to the next valid record instead (found by
//!   trying every byte offset), reports what it skipped, and rewrites the
//!   damaged file without the bad bytes so the next start is clean. Messages
//!   in skipped bytes are lost, and tombstones in them may bring delivered
//!   messages back (delivered twice).
//!
//! Recovery reads one segment at a time into memory.
//!
//! # Server ids
//!
//! The shard numbers its messages and continues after
//! [`max_server_id`](Store::max_server_id) on restart. Because a message
//! delivered within its batch never reaches a segment, and segments are
//! deleted, the ids on disk do not show how far the sequence went. So `meta`
//! keeps a watermark that is always at least [`ID_RESERVE`]` / 2` above every
//! id accepted so far: `open` raises it to the recovered maximum plus
//! [`ID_RESERVE`], and `commit` raises it again before it could be passed.
//! Each restart skips at most `ID_RESERVE` ids (2^20 sequence numbers of a
//! shard); an id is never handed out twice.
//!
//! # Disk bound
//!
//! With `disk_bytes_max > 0`, a push that would take the segment bytes
//! (written plus staged) past it is refused with
//! [`PushError::StorageFull`]; nothing stored is dropped. Tombstones and
//! compaction copies are never refused, so the files may pass the bound by the
//! tombstones of one batch and by one segment being compacted; the bound
//! must leave room for two segments.
//!
//! # Free-space floor
//!
//! Whatever the budget, the filesystem itself can fill (other files, other
//! shards, a small disk). The store keeps the free space of its filesystem
//! (`statvfs`, re-read at least once a second, every 100 ms while short, and
//! whenever the bytes written since the last look could have used up half
//! of the margin) and refuses pushes with [`PushError::StorageFull`] once
//! they would take it below `disk_free_bytes_min`. The space under the floor
//! is kept for what frees space: tombstones, and compaction copies (a
//! segment is compacted only when its live bytes fit in the free space).
//! While the free space is under twice the floor, a mostly dead *active*
//! segment is sealed too, so that it can be compacted and deleted. And a
//! segment is sealed at 1/64 of the filesystem's size at most (whatever
//! `segment_bytes_max` says, and not below 64 KiB): on a small disk, a
//! 64 MiB segment would hold every message, and compacting it would need as
//! much free space as its live messages take. Pushes are taken again by
//! themselves once space is back above the floor.
//!
//! # Disk full
//!
//! A write or file creation that fails with ENOSPC or EDQUOT (the floor is
//! an estimate, and other processes share the disk) is the world's error,
//! not a reason to crash: the partial write is truncated away, the batch's
//! pushes are rolled back (taken out of their queues, their ids handed back
//! to the caller so the senders hear `storage_full` instead of an ACK), its
//! tombstones stay staged for the next commit, and its compaction copies are
//! dropped. A `meta` rewrite that finds the disk full is retried later; while
//! the watermark on disk is not above a new id, pushes are refused (so a
//! start on a full disk serves the backlog and takes nothing new).
//!
//! So that delivering can free space even when something else filled the
//! disk to the last byte, each store keeps a `reserve` file (a quarter of the
//! floor, at most 1 MiB), written while there is room above the floor. The
//! first write or `meta` rewrite that finds the disk full deletes it: its
//! space takes the delivery records, whose commits let fully delivered
//! segments be deleted. It is written again once free space is back above
//! the floor plus its size.
//!
//! # Errors
//!
//! Any other error from `commit` (or from `begin_commit`, or a failed
//! [`SyncJob`] reported to `synced`) leaves the store *failed*: it never writes
//! again and every later `commit` returns an error. After a failed `write`
//! or `fsync` the state of the file is unknown (the page cache may have
//! dropped the dirty pages), so the only safe way on is to drop the store and
//! open it again, which replays what really is on disk. The shard does that
//! by crashing.
//!
//! Files are created with mode 0600 and directories with 0700: queued
//! messages are private. Every file operation passes through
//! [`fault::hit`](super::fault::hit), where tests inject errors.
//!
//! # Code layout
//!
//! This file holds the types, [`LogStore::open`] and the [`Store`] face
//! (staging pushes and removals); the rest is split by concept: `options`
//! ([`LogOptions`], [`Durability`]), `error` ([`StoreError`]), `recovery`
//! (replay, torn tail, repair), `commit` (the batch, its write, roll back on
//! a full disk), `compact` (victims, pins, copies, deletion), `space` (the
//! free-space floor and the reserve file), `meta` (the `meta` file) and
//! `bulk` (what offline tools need). The file passes 800 lines because the
//! [`Store`] face (push, remove, the commit split in two) belongs with the
//! types it changes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

// foldhash, not std's SipHash: a queue is looked up for every push, DELIVER
// and DELIVERED (the session's maps made the same change).
use foldhash::HashMap;

use super::files;
use super::record::{Record, BODY_BYTES_MAX};
use super::segment;
use super::window::{Taken, Windows};
use super::{queue_state, Origin, PushError, Seen, Shape, Space, Store, Stored, SyncJob};
use crate::clock::Clock;

mod bulk;
mod commit;
mod compact;
mod error;
mod meta;
mod options;
mod recovery;
mod shared;
mod space;

use self::error::io_at;
pub use self::error::StoreError;
pub use self::options::{Durability, LogOptions};
pub use self::recovery::{Recovery, Skipped};
use self::shared::{body_bytes, body_record, MEMBER_BYTES};

/// On-disk format version written to and expected in `meta`.
pub const FORMAT_VERSION: u32 = 1;
/// Default for [`LogOptions::segment_bytes_max`]: 64 MiB.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Largest [`LogOptions::segment_bytes_max`]: 1 GiB, because recovery reads
/// one segment at a time into memory.
pub const SEGMENT_BYTES_MAX_LIMIT: u64 = 1024 * 1024 * 1024;
/// Most bytes of compaction copies one `commit` writes: 1 MiB, a few
/// milliseconds of disk bandwidth added to one loop iteration.
pub const COMPACT_BYTES_PER_COMMIT: u64 = 1024 * 1024;
/// Stale entries a segment's `orphans` may hold beyond twice its live ones
/// before they are dropped (amortizes the walk).
const ORPHANS_SLACK: usize = 1024;
/// Most index entries (live or dead `Queued` records of the segment being
/// compacted) one `commit` looks at, bounding the CPU part of the same work.
pub const COMPACT_ENTRIES_PER_COMMIT: usize = 64 * 1024;
/// Most fully-dead segments one `commit` deletes besides its compaction
/// victim (each costs an `unlink` and, with `fsync`, a directory sync).
pub const DELETES_PER_COMMIT: usize = 4;
/// The free-space floor when `disk_free_bytes_min` is 0 (auto): this
/// percentage of the filesystem's size, at most [`AUTO_FLOOR_BYTES_MAX`].
pub const AUTO_FLOOR_PERCENT: u64 = 5;
/// Cap of the automatic free-space floor: 64 MiB.
pub const AUTO_FLOOR_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A segment is sealed at 1/64 of its filesystem at most, so that
/// compacting one never needs more free space than the floor keeps.
const SEGMENT_FS_SHARE: u64 = 64;
/// ... but not below 64 KiB.
const SEGMENT_FS_BYTES_MIN: u64 = 64 * 1024;
/// How often the free space is re-read at least, normally.
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often it is re-read while space is short.
const SPACE_CHECK_SHORT_EVERY: Duration = Duration::from_millis(100);
/// How far the id watermark in `meta` runs ahead of the ids accepted:
/// 2^30 ids = 2^20 sequence numbers of one shard (ids are `seq << 10 | shard`).
pub const ID_RESERVE: u64 = 1 << 30;

const META: &str = "meta";
/// Space set aside for a full disk (see "Disk full" in the module docs).
const RESERVE: &str = "reserve";
/// The reserve file is a quarter of the floor, at most this: 1 MiB (room
/// for some 30,000 delivery records).
const RESERVE_BYTES_MAX: u64 = 1024 * 1024;
const META_TMP: &str = "meta.tmp";
const META_MAGIC: &str = "tern store log";
const TMP_SUFFIX: &str = ".log.tmp";

/// The directory of shard `shard`'s log: `<data_dir>/shard-<shard>`.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// Where a queued message's current `Queued` record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    /// `Durability::Memory`: nowhere.
    Memory,
    /// Not written yet: index into `LogStore::staged`.
    Staged(u32),
    /// In this segment.
    Segment(u32),
}

#[derive(Debug)]
struct Entry {
    msg: Stored,
    loc: Loc,
}

/// A group message's body, kept once for its member copies on this shard
/// (see "Shared bodies").
#[derive(Debug)]
struct Body {
    /// The fields every copy has (its `server_id`, sender, time, body).
    msg: Stored,
    /// Where its `Body` record is; during a replay, `Memory` until that
    /// record is read.
    loc: Loc,
    /// Member copies queued.
    refs: u32,
}

/// Where a dedupe window entry's durable copy is: its message's record
/// while the message is queued (`orphan` false, same `loc`), else a record
/// of its own (`orphan`: a `Queued` record whose message is gone, or a
/// `Taken` record), which its segment must keep (`Segment::refs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WLoc {
    loc: Loc,
    orphan: bool,
}

// A window entry with its location: 40 bytes (results/exactly-once/).
const _: () = assert!(std::mem::size_of::<Taken<WLoc>>() <= 40);

/// A record waiting for the next commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Staged {
    /// Encoded from the queue entry at commit time.
    Queued { user: u64, server_id: u64 },
    /// The tombstone of a message whose `Queued` record is in `target`.
    Delivered {
        user: u64,
        server_id: u64,
        target: u32,
    },
    /// A `Queued` record whose message was removed before the commit: the
    /// skip rule, nothing is written.
    Cancelled,
    /// The same for a message with an origin: its dedupe window entry is
    /// written as a `Taken` record instead.
    Taken { from: u64, origin: Origin },
    /// A shared body, encoded from `LogStore::bodies` at commit time.
    Body { server_id: u64 },
    /// A member's copy of a shared body.
    Member { user: u64, server_id: u64 },
}

#[derive(Debug, Default)]
struct Segment {
    /// File length.
    bytes: u64,
    /// Messages whose current `Queued` record is here.
    live: u64,
    /// Encoded bytes of those records; `<= bytes`.
    live_bytes: u64,
    /// `(user, server_id)` of every `Queued` record in the file, in file
    /// order, live or not: what compaction walks. 16 bytes per record, freed
    /// with the segment.
    index: Vec<(u64, u64)>,
    /// `server_id` of every `Body` record in the file, in file order, live
    /// or not: what compaction walks after `index`.
    body_index: Vec<u64>,
    /// Older segments that must be deleted before this one (see the module
    /// docs). Never contains this segment's own number.
    pins: BTreeSet<u32>,
    /// Dedupe window entries whose durable copy is here and outlived its
    /// message (each counts a `Taken` record's bytes in `live_bytes`).
    refs: u64,
    /// Sender and origin of every such entry placed here, kept until the
    /// segment goes (stale ones are skipped): what compaction copies.
    orphans: Vec<(u64, Origin)>,
}

impl Segment {
    /// No live message and no window entry needs it.
    fn holds_nothing(&self) -> bool {
        self.live == 0 && self.refs == 0
    }

    fn dead_ratio(&self) -> f64 {
        if self.bytes == 0 {
            return 0.0;
        }
        1.0 - self.live_bytes as f64 / self.bytes as f64
    }
}

/// The segment being compacted and how far its index has been walked.
#[derive(Clone, Copy, Debug)]
struct Compaction {
    segment: u32,
    /// Index entries before this one are done; `0..=index.len()`.
    cursor: usize,
}

/// Encoded size of the `Queued` record of `msg`.
fn queued_bytes(msg: &Stored) -> u64 {
    queued_record(0, msg).encoded_len() as u64
}

/// Encoded size of a `Taken` record.
const TAKEN_BYTES: u64 = Record::taken_bytes() as u64;

fn queued_record(user: u64, msg: &Stored) -> Record<'_> {
    Record::Queued {
        user,
        server_id: msg.server_id,
        from: msg.from,
        time_ms: msg.time_ms,
        origin: msg.origin,
        body: &msg.body,
    }
}

fn taken_record(from: u64, origin: Origin, t: &Taken<WLoc>) -> Record<'static> {
    Record::Taken {
        from,
        origin,
        server_id: t.server_id,
        time_ms: t.time_ms,
    }
}

fn find(queue: &VecDeque<Entry>, server_id: u64) -> Result<usize, usize> {
    // Most lookups are for the newest message (a replayed or staged push);
    // check it before bisecting.
    match queue.back() {
        Some(last) if last.msg.server_id < server_id => Err(queue.len()),
        Some(last) if last.msg.server_id == server_id => Ok(queue.len() - 1),
        _ => queue.binary_search_by_key(&server_id, |e| e.msg.server_id),
    }
}

fn lookup(queues: &HashMap<u64, VecDeque<Entry>>, user: u64, server_id: u64) -> Option<&Entry> {
    let queue = queues.get(&user)?;
    queue.get(find(queue, server_id).ok()?)
}

fn lookup_mut(
    queues: &mut HashMap<u64, VecDeque<Entry>>,
    user: u64,
    server_id: u64,
) -> Option<&mut Entry> {
    let queue = queues.get_mut(&user)?;
    let at = find(queue, server_id).ok()?;
    queue.get_mut(at)
}

/// The durable per-shard store. See the module docs.
pub struct LogStore {
    opts: LogOptions,
    dir: PathBuf,
    queues: HashMap<u64, VecDeque<Entry>>,
    /// The shared bodies of group copies, by server id (see "Shared
    /// bodies"); empty with `Durability::Memory`.
    bodies: HashMap<u64, Body>,
    /// Replay only: member copies read before their `Body` record.
    unresolved: Vec<(u64, u64)>,
    /// Replay only: `(user, server_id)` of the queued copies that came from
    /// `Member` records, so that a damaged log mixing kinds under one id
    /// never has a copy taken for a message or the other way round.
    replay_members: foldhash::HashSet<(u64, u64)>,
    /// `(user, server_id)` of the messages queued under the id of a body
    /// that are not copies of it: left by the replay of a damaged log that
    /// mixed kinds under one id; empty otherwise.
    clashes: foldhash::HashSet<(u64, u64)>,
    /// The dedupe windows of v2 senders (see `store::window`), pruned at
    /// commit (a batch rolled back must not have evicted anything).
    windows: Windows<WLoc>,
    /// Messages in `queues`.
    total: usize,
    /// Lengths and heads of `queues`, for the stats; rebuilt after recovery.
    shape: Shape,
    /// Every segment file, by number.
    segments: BTreeMap<u32, Segment>,
    /// The segment appended to, opened for append; `None` before the first
    /// write and right after a roll (the next write creates one). Shared
    /// with the [`SyncJob`] of a batch written to it.
    active: Option<(u32, Arc<File>)>,
    /// Number for the next segment file; above every number ever used.
    next_segment: u32,
    /// Bytes of all segment files.
    disk_bytes: u64,
    /// Records for the next commit, in order.
    staged: Vec<Staged>,
    /// `staged` entries other than `Cancelled`.
    staged_records: usize,
    /// Encoded bytes of those.
    staged_bytes: u64,
    /// The batch being written; kept for its capacity.
    buf: Vec<u8>,
    /// Messages copied by the current commit's compaction step.
    moves: Vec<(u64, u64)>,
    /// Window entries copied by it (as `Taken` records).
    orphan_moves: Vec<(u64, Origin)>,
    /// Shared bodies copied by it.
    body_moves: Vec<u64>,
    compacting: Option<Compaction>,
    /// Something may have become deletable or compactable since the last
    /// look (a sealed segment lost a live message, a roll, a deletion).
    maintenance: bool,
    /// Highest server id accepted or replayed (or the recovered watermark).
    server_id_max: u64,
    /// Every push with an id up to this one is durable (or was cancelled
    /// or refused): `next_after` shows no message above it.
    durable_id: u64,
    /// A batch was written and not synced yet: its segment, for the
    /// [`SyncJob`] that `begin_commit` hands out.
    unsynced: Option<(Arc<File>, PathBuf)>,
    /// A [`SyncJob`] is out: `durable_id` becomes this once it succeeds.
    syncing_upto: Option<u64>,
    /// A compaction victim whose messages were all copied by the batch
    /// being synced: deleted once the copies are durable.
    victim_done: Option<u32>,
    /// The watermark `meta` holds on disk.
    id_watermark: u64,
    /// `fdatasync`/`fsync` calls, data and directories.
    syncs: u64,
    /// Bytes of compaction copies written.
    rewritten_bytes: u64,
    /// Copy budget of one commit; [`COMPACT_BYTES_PER_COMMIT`] except in
    /// tests.
    compact_bytes_per_commit: u64,
    /// A commit failed; nothing is written any more.
    failed: bool,
    /// Free bytes of the filesystem at the last look (`statvfs`, for an
    /// unprivileged process); `u64::MAX` when unknown or `Memory`.
    free_bytes: u64,
    /// Bytes appended since that look: the estimate is `free_bytes` minus
    /// this.
    written_since_check: u64,
    /// When the free space was last read; `None` = read it at the next
    /// chance.
    space_checked: Option<Instant>,
    /// A `meta` rewrite found the disk full: when to try again.
    meta_retry_at: Option<Instant>,
    /// The free-space floor in bytes (`disk_free_bytes_min`, or auto).
    floor: u64,
    /// Size at which the active segment is sealed: `segment_bytes_max`, at
    /// most 1/64 of the filesystem (see "Free-space floor").
    segment_bytes: u64,
    /// Pushes are being refused for lack of space (for the log lines on
    /// each change and for stats).
    short: bool,
    /// Batches rolled back because the disk was full.
    rollbacks: u64,
    /// Bytes of the `reserve` file on disk; 0 = none.
    reserve_bytes: u64,
    /// Where the space checks and retries read the time.
    clock: Clock,
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.dir)
            .field("durability", &self.opts.durability)
            .field("messages", &self.total)
            .field("segments", &self.segments.len())
            .field("disk_bytes", &self.disk_bytes)
            .field("staged_records", &self.staged_records)
            .field("failed", &self.failed)
            .finish()
    }
}

impl LogStore {
    /// Opens (creating if missing) the log in `dir` and replays it. With
    /// [`Durability::Memory`] the directory is not touched.
    pub fn open(
        dir: impl AsRef<Path>,
        options: LogOptions,
    ) -> Result<(LogStore, Recovery), StoreError> {
        LogStore::open_with_clock(dir, options, Clock::Real)
    }

    /// [`LogStore::open`] with the time of its space checks and retries
    /// read from `clock` (the simulator's, in a simulation).
    pub fn open_with_clock(
        dir: impl AsRef<Path>,
        options: LogOptions,
        clock: Clock,
    ) -> Result<(LogStore, Recovery), StoreError> {
        options.validate()?;
        let started = Instant::now();
        let mut store = LogStore {
            dir: dir.as_ref().to_path_buf(),
            queues: HashMap::default(),
            bodies: HashMap::default(),
            unresolved: Vec::new(),
            replay_members: Default::default(),
            clashes: Default::default(),
            windows: Windows::default(),
            total: 0,
            shape: Shape::default(),
            segments: BTreeMap::new(),
            active: None,
            next_segment: 1,
            disk_bytes: 0,
            staged: Vec::new(),
            staged_records: 0,
            staged_bytes: 0,
            buf: Vec::new(),
            moves: Vec::new(),
            orphan_moves: Vec::new(),
            body_moves: Vec::new(),
            compacting: None,
            maintenance: true,
            server_id_max: 0,
            durable_id: 0,
            unsynced: None,
            syncing_upto: None,
            victim_done: None,
            id_watermark: 0,
            syncs: 0,
            rewritten_bytes: 0,
            compact_bytes_per_commit: COMPACT_BYTES_PER_COMMIT,
            failed: false,
            free_bytes: u64::MAX,
            written_since_check: 0,
            space_checked: None,
            meta_retry_at: None,
            floor: options.disk_free_bytes_min,
            segment_bytes: options.segment_bytes_max,
            short: false,
            rollbacks: 0,
            reserve_bytes: 0,
            opts: options,
            clock,
        };
        let mut recovery = Recovery::default();
        if store.opts.durability != Durability::Memory {
            store.recover(&mut recovery)?;
            store.check_space(store.clock.now());
            store.keep_reserve();
        }
        // Replay moves queues around freely; one walk at start-up is cheap
        // next to the replay itself.
        for (&user, queue) in &store.queues {
            store
                .shape
                .update(user, (0, None), queue_state(Some(queue), |e| &e.msg));
        }
        store.durable_id = store.server_id_max;
        recovery.messages = store.total;
        recovery.max_server_id = store.server_id_max;
        recovery.elapsed = started.elapsed();
        Ok((store, recovery))
    }

    /// The options it was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.opts
    }

    /// Bytes of all segment files (not counting what is staged).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Segment files.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// `fdatasync`/`fsync` calls made since open, on data and directories.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Bytes of compaction copies written since open (write amplification).
    pub fn rewritten_bytes(&self) -> u64 {
        self.rewritten_bytes
    }

    /// Whether a commit failed; see "Errors" in the module docs.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Free bytes of the filesystem as last seen, less what was written
    /// since; `None` with `Memory` or when `statvfs` failed.
    pub fn free_bytes(&self) -> Option<u64> {
        (self.free_bytes != u64::MAX)
            .then(|| self.free_bytes.saturating_sub(self.written_since_check))
    }

    /// The free-space floor in bytes (configured, or the automatic one).
    pub fn floor_bytes(&self) -> u64 {
        self.floor
    }

    /// Whether pushes are being refused for lack of disk space right now.
    pub fn space_short(&self) -> bool {
        self.short
    }

    /// Batches rolled back since open because the disk was full.
    pub fn rollbacks(&self) -> u64 {
        self.rollbacks
    }

    fn fsync(&self) -> bool {
        self.opts.durability == Durability::Fsync
    }

    /// Whether a written batch awaits its sync (no file may be deleted on
    /// its strength yet).
    fn sync_due(&self) -> bool {
        self.unsynced.is_some() || self.syncing_upto.is_some()
    }

    fn failed_error(&self) -> io::Error {
        io::Error::other(format!(
            "message log in {} failed earlier; reopen it to replay what is on disk",
            self.dir.display()
        ))
    }

    /// Drops the entries of segment `n`'s `orphans` that no longer name a
    /// window entry kept there (pruned from its window, or copied on),
    /// once they outnumber the live ones: a busy segment gets one per
    /// message delivered within its commit, and would otherwise hold 24
    /// bytes for each until it is deleted, which the active one never is.
    fn prune_orphans(&mut self, n: u32) {
        let Some(seg) = self.segments.get_mut(&n) else {
            return;
        };
        if seg.orphans.len() <= 2 * seg.refs as usize + ORPHANS_SLACK {
            return;
        }
        let here = WLoc {
            loc: Loc::Segment(n),
            orphan: true,
        };
        let windows = &self.windows;
        seg.orphans
            .retain(|&(from, origin)| windows.get(from, origin).is_some_and(|t| t.loc == here));
        seg.orphans.shrink_to(seg.orphans.len() * 2);
    }

    fn segment_path(&self, number: u32) -> PathBuf {
        self.dir.join(segment::file_name(number))
    }

    fn active_number(&self) -> Option<u32> {
        self.active.as_ref().map(|(n, _)| *n)
    }

    /// Makes the directory entries (created, renamed or removed files)
    /// durable.
    fn sync_dir(&mut self, dir: &Path) -> Result<(), StoreError> {
        if self.fsync() {
            files::sync_dir(dir).map_err(io_at(dir, "sync directory"))?;
            self.syncs += 1;
        }
        Ok(())
    }
}

impl LogStore {
    /// `push` and `push_shared`: with `shared` (and a durable store),
    /// the copy's body goes into `bodies` and its record is a `Member`.
    fn push_inner(&mut self, user: u64, msg: Stored, shared: bool) -> Result<(), PushError> {
        if self.queues.get(&user).map_or(0, VecDeque::len) >= self.opts.queue_len_max {
            return Err(PushError::QueueFull(msg));
        }
        // The config keeps bodies far below this; a bigger one could be
        // written but never read back.
        assert!(
            msg.body.len() <= BODY_BYTES_MAX,
            "body of {} bytes exceeds the store's {BODY_BYTES_MAX}",
            msg.body.len()
        );
        let durable = self.opts.durability != Durability::Memory;
        // A group copy is never from a v2 origin; one with an origin (the
        // contract broken) is stored as a plain message.
        let shared = shared && durable && msg.origin.is_none();
        let new_body = shared && !self.bodies.contains_key(&msg.server_id);
        let bytes = match (shared, new_body) {
            (false, _) => queued_bytes(&msg),
            (true, false) => MEMBER_BYTES,
            (true, true) => MEMBER_BYTES + body_bytes(&msg),
        };
        if durable
            && self.opts.disk_bytes_max > 0
            && self.disk_bytes + self.staged_bytes + bytes > self.opts.disk_bytes_max
        {
            return Err(PushError::StorageFull(msg));
        }
        if durable && !self.fits_above_floor(self.staged_bytes + bytes) {
            // The estimate may be stale: look again (at most every 100 ms
            // while short) before refusing.
            self.check_space(self.clock.now());
            if !self.fits_above_floor(self.staged_bytes + bytes) {
                self.set_short(true);
                return Err(PushError::StorageFull(msg));
            }
        }
        if durable && self.meta_retry_at.is_some() && msg.server_id >= self.id_watermark {
            // The watermark could not be raised (disk full): an id past it
            // could be handed out again after a restart.
            return Err(PushError::StorageFull(msg));
        }
        let queue = self.queues.entry(user).or_default();
        let before = queue_state(Some(queue), |e| &e.msg);
        debug_assert!(queue
            .back()
            .is_none_or(|last| last.msg.server_id < msg.server_id));
        debug_assert!(queued_record(user, &msg).is_valid());
        self.server_id_max = self.server_id_max.max(msg.server_id);
        let loc = if durable {
            let server_id = msg.server_id;
            if new_body {
                let at = u32::try_from(self.staged.len()).expect("a batch under 2^32 records");
                self.staged.push(Staged::Body { server_id });
                self.staged_records += 1;
                let body = Body {
                    msg: msg.clone(),
                    loc: Loc::Staged(at),
                    refs: 0,
                };
                self.bodies.insert(server_id, body);
            }
            if let Some(body) = self.bodies.get_mut(&server_id).filter(|_| shared) {
                body.refs += 1;
            }
            let at = u32::try_from(self.staged.len()).expect("a batch under 2^32 records");
            self.staged.push(if shared {
                Staged::Member { user, server_id }
            } else {
                Staged::Queued { user, server_id }
            });
            self.staged_records += 1;
            self.staged_bytes += bytes;
            Loc::Staged(at)
        } else {
            Loc::Memory
        };
        if let Some(origin) = msg.origin {
            let taken = Taken {
                client_id: origin.client_id,
                server_id: msg.server_id,
                time_ms: msg.time_ms,
                loc: WLoc { loc, orphan: false },
            };
            self.windows.insert(msg.from, origin, taken);
            if !durable {
                self.windows.prune(msg.from, origin.device, |_| {});
            }
        }
        crate::memory::reserve_one(queue);
        queue.push_back(Entry { msg, loc });
        self.shape
            .update(user, before, queue_state(Some(queue), |e| &e.msg));
        self.total += 1;
        Ok(())
    }

    /// `remove`, for a message or a member's copy of a shared body.
    fn remove_inner(&mut self, user: u64, server_id: u64) -> Option<Stored> {
        let queue = self.queues.get_mut(&user)?;
        let at = find(queue, server_id).ok()?;
        let before = queue_state(Some(queue), |e| &e.msg);
        let entry = queue.remove(at)?;
        self.shape
            .update(user, before, queue_state(Some(queue), |e| &e.msg));
        self.total -= 1;
        if queue.is_empty() {
            self.queues.remove(&user);
            crate::memory::shrink_map(&mut self.queues);
        } else {
            crate::memory::shrink_deque(queue);
        }
        let shared = self.is_copy(user, server_id);
        self.clashes.remove(&(user, server_id));
        let bytes = if shared {
            MEMBER_BYTES
        } else {
            queued_bytes(&entry.msg)
        };
        // A window entry that lived in this message's record outlives it.
        let from = entry.msg.from;
        let window = entry.msg.origin.and_then(|origin| {
            let t = self.windows.get_mut(from, origin)?;
            (t.loc
                == WLoc {
                    loc: entry.loc,
                    orphan: false,
                })
            .then(|| {
                t.loc.orphan = true;
                origin
            })
        });
        match entry.loc {
            Loc::Memory => {}
            Loc::Staged(i) => {
                // The skip rule: never written, so nothing to write now
                // (but the window entry, if any).
                let slot = &mut self.staged[i as usize];
                debug_assert!(matches!(*slot,
                    Staged::Queued { user: u, server_id: id } | Staged::Member { user: u, server_id: id }
                    if u == user && id == server_id));
                self.staged_bytes -= bytes;
                match window {
                    Some(origin) => {
                        *slot = Staged::Taken { from, origin };
                        self.staged_bytes += TAKEN_BYTES;
                    }
                    None => {
                        *slot = Staged::Cancelled;
                        self.staged_records -= 1;
                    }
                }
            }
            Loc::Segment(n) => {
                let seg = self.segments.get_mut(&n).expect("a live message's segment");
                seg.live -= 1;
                seg.live_bytes -= bytes;
                if seg.live == 0 && self.compacting.is_none_or(|c| c.segment != n) {
                    // Only compaction reads the index, and it has nothing
                    // left to copy here; a drained active segment would
                    // otherwise keep 16 bytes per record it ever took.
                    seg.index = Vec::new();
                    seg.body_index = Vec::new();
                }
                if let Some(origin) = window {
                    seg.refs += 1;
                    seg.live_bytes += TAKEN_BYTES;
                    seg.orphans.push((from, origin));
                }
                self.prune_orphans(n);
                if self.active_number() != Some(n) {
                    self.maintenance = true;
                }
                self.staged.push(Staged::Delivered {
                    user,
                    server_id,
                    target: n,
                });
                self.staged_records += 1;
                self.staged_bytes += Record::delivered_bytes() as u64;
            }
        }
        if shared {
            self.drop_member(server_id);
        }
        Some(entry.msg)
    }
}

impl Store for LogStore {
    fn push(&mut self, user: u64, msg: Stored) -> Result<(), PushError> {
        self.push_inner(user, msg, false)
    }

    fn push_shared(&mut self, user: u64, msg: Stored) -> Result<(), PushError> {
        self.push_inner(user, msg, true)
    }

    fn seen(&self, from: u64, origin: Origin) -> Seen {
        self.windows.seen(from, origin)
    }

    fn remove(&mut self, user: u64, server_id: u64) -> Option<Stored> {
        self.remove_inner(user, server_id)
    }

    fn next_after(&self, user: u64, after: u64) -> Option<&Stored> {
        let queue = self.queues.get(&user)?;
        let at = queue.partition_point(|e| e.msg.server_id <= after);
        // Staged pushes, and those written but not synced yet, are the
        // newest of a queue (ids grow with each push); not durable yet.
        queue
            .get(at)
            .filter(|e| match e.loc {
                Loc::Memory => true,
                Loc::Staged(_) => false,
                Loc::Segment(_) => e.msg.server_id <= self.durable_id,
            })
            .map(|e| &e.msg)
    }

    fn each_after(&self, user: u64, after: u64, f: &mut dyn FnMut(&Stored) -> bool) {
        let Some(queue) = self.queues.get(&user) else {
            return;
        };
        let at = queue.partition_point(|e| e.msg.server_id <= after);
        for e in queue.range(at..) {
            // As `next_after`: the durable prefix only (ids grow with each push).
            let durable = match e.loc {
                Loc::Memory => true,
                Loc::Staged(_) => false,
                Loc::Segment(_) => e.msg.server_id <= self.durable_id,
            };
            if !durable || !f(&e.msg) {
                return;
            }
        }
    }

    fn len(&self, user: u64) -> usize {
        self.queues.get(&user).map_or(0, VecDeque::len)
    }

    fn total(&self) -> usize {
        self.total
    }

    fn shape(&self) -> &Shape {
        &self.shape
    }

    fn commit(&mut self, refused: &mut Vec<u64>) -> io::Result<()> {
        if let Some(job) = self.begin_commit(refused)? {
            let result = job.run();
            self.synced(result)?;
        }
        Ok(())
    }

    fn begin_commit(&mut self, refused: &mut Vec<u64>) -> io::Result<Option<SyncJob>> {
        assert!(
            self.syncing_upto.is_none(),
            "a commit began while the last batch's sync was in flight"
        );
        if self.opts.durability == Durability::Memory {
            return Ok(None);
        }
        let now = self.clock.now();
        self.check_space(now);
        if self.failed {
            return Err(self.failed_error());
        }
        if self.staged.is_empty()
            && !self.maintenance
            && self.compacting.is_none()
            && (!self.watermark_due() || self.meta_retry_at.is_some_and(|at| now < at))
        {
            return Ok(None);
        }
        if let Err(e) = self.commit_inner(refused, now) {
            self.failed = true;
            return Err(io::Error::from(e));
        }
        match self.unsynced.take() {
            Some((file, path)) => {
                self.syncing_upto = Some(self.server_id_max);
                Ok(Some(SyncJob { file, path }))
            }
            None => {
                // Nothing written: every push so far is durable, was
                // cancelled (the skip rule) or was rolled back.
                self.durable_id = self.server_id_max;
                Ok(None)
            }
        }
    }

    fn synced(&mut self, result: io::Result<()>) -> io::Result<()> {
        let upto = self
            .syncing_upto
            .take()
            .expect("synced() without a sync in flight");
        if let Err(e) = result {
            self.failed = true;
            return Err(e);
        }
        self.syncs += 1;
        self.durable_id = upto;
        self.after_sync().map_err(|e| {
            self.failed = true;
            io::Error::from(e)
        })?;
        if let Some(n) = self.active_number() {
            self.prune_orphans(n);
        }
        Ok(())
    }

    fn has_uncommitted(&self) -> bool {
        self.opts.durability != Durability::Memory
            && (self.staged_records > 0 || self.watermark_due())
    }

    fn max_server_id(&self) -> u64 {
        self.server_id_max
    }

    fn trim(&mut self, keep_bytes: usize) {
        if !self.staged.is_empty() {
            return;
        }
        // `buf` still holds the last batch written (the next commit clears
        // it); with nothing staged, nothing needs it.
        if self.buf.capacity() > keep_bytes {
            self.buf = Vec::new();
        }
        let keep = keep_bytes / std::mem::size_of::<Staged>();
        if self.staged.capacity() > keep {
            self.staged = Vec::new();
        }
        if self.moves.is_empty() && self.moves.capacity() > keep {
            self.moves = Vec::new();
        }
    }

    fn space(&self) -> Space {
        Space {
            free_bytes: self.free_bytes(),
            short: self.short,
        }
    }
}

#[cfg(test)]
mod tests;

/// Recovery speed. Run with
/// `cargo test --release -p tern --lib store::log::bench -- --ignored --nocapture`;
/// `TERN_BENCH_MIB` sets the log size (default 512), `TERN_BENCH_DIR` where
/// it goes (default the system temp dir), `TERN_BENCH_RUNS` how often the
/// warm recovery is timed (default 1), and `TERN_BENCH_DROP_CACHES=1` also
/// measures a cold page cache (needs root).
#[cfg(test)]
mod bench;
