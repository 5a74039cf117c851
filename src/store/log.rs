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
//! Two kinds: `Queued { user, server_id, from, time_ms, body }` when a message
//! is stored, and `Delivered { user, server_id }`, its tombstone. `meta` holds
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
//! Any other error from `commit` leaves the store *failed*: it never writes
//! again and every later `commit` returns an error. After a failed `write`
//! or `fsync` the state of the file is unknown (the page cache may have
//! dropped the dirty pages), so the only safe way on is to drop the store and
//! open it again, which replays what really is on disk. The shard does that
//! by crashing.
//!
//! Files are created with mode 0600 and directories with 0700: queued
//! messages are private. Every file operation passes through
//! [`fault::hit`](super::fault::hit), where tests inject errors.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fault;
use super::files;
use super::record::{Record, BODY_BYTES_MAX};
use super::segment::{self, Scanner, Step};
use super::{PushError, Space, Store, Stored};

mod bulk;

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

/// What a `commit` waits for, and so what an acknowledged message survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Write, then `fdatasync`: an acknowledged message survives a crash of
    /// the process and of the machine (power loss, kernel panic). Costs one
    /// disk flush per loop iteration that stored anything, shared by every
    /// message of the iteration.
    #[default]
    Fsync,
    /// Write only: an acknowledged message survives a crash or `kill -9` of
    /// the process (the kernel has the data), but a power loss or kernel
    /// panic loses what the kernel had not yet written back, by default up to
    /// about 30 seconds of messages, and recovery then cuts the torn tail.
    Os,
    /// Nothing is written and the data directory is neither read nor
    /// written: like `MemStore`, every queued message is lost when the
    /// process stops. An old log left in the directory stays as it is and is
    /// replayed if a later start uses `fsync` or `os` again.
    Memory,
}

impl Durability {
    /// The config name: `"fsync"`, `"os"` or `"memory"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Os => "os",
            Durability::Memory => "memory",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "os" => Ok(Durability::Os),
            "memory" => Ok(Durability::Memory),
            _ => Err(format!(
                "unknown durability {s:?}: expected \"fsync\", \"os\" or \"memory\""
            )),
        }
    }
}

/// How a [`LogStore`] behaves. [`LogOptions::validate`] checks the relations.
#[derive(Clone, Debug, PartialEq)]
pub struct LogOptions {
    /// What `commit` waits for. Default [`Durability::Fsync`].
    pub durability: Durability,
    /// Messages one user's queue holds at most; at least 1. Default 1000.
    /// A queue recovered longer than this (the limit was lowered) keeps its
    /// messages and refuses pushes until it is shorter.
    pub queue_len_max: usize,
    /// Size at which the active segment is sealed and a new one started, in
    /// bytes. Default 64 MiB; 1 to [`SEGMENT_BYTES_MAX_LIMIT`].
    pub segment_bytes_max: u64,
    /// Bound on the bytes of all segment files; pushes are refused past it.
    /// Default 0 = unlimited; otherwise at least `2 * segment_bytes_max`
    /// (compaction copies a segment before deleting it).
    pub disk_bytes_max: u64,
    /// Free space to leave on the filesystem, in bytes: pushes that would
    /// take it lower are refused. 0 = auto ([`AUTO_FLOOR_PERCENT`] of the
    /// filesystem, at most [`AUTO_FLOOR_BYTES_MAX`]). Default 0.
    pub disk_free_bytes_min: u64,
    /// Dead share of a sealed segment's bytes (0.0 to 1.0) past which it is
    /// compacted. Default 0.5: at most half of the log is garbage, and a
    /// compaction copies at most as many bytes as it frees. 1.0 = only
    /// delete fully dead segments.
    pub compact_dead_ratio: f64,
    /// Skip corrupt records found during recovery instead of failing (the
    /// `--repair` flag). Default false.
    pub repair: bool,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            durability: Durability::Fsync,
            queue_len_max: 1000,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            disk_bytes_max: 0,
            disk_free_bytes_min: 0,
            compact_dead_ratio: 0.5,
            repair: false,
        }
    }
}

impl LogOptions {
    /// Checks every option and the relations between them.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |field, reason: &str| {
            Err(StoreError::Options {
                field,
                reason: reason.to_string(),
            })
        };
        if self.queue_len_max == 0 {
            return bad("queue_len_max", "must be at least 1");
        }
        if !(1..=SEGMENT_BYTES_MAX_LIMIT).contains(&self.segment_bytes_max) {
            return bad(
                "segment_bytes_max",
                "must be between 1 and 1073741824 (recovery reads a segment into memory)",
            );
        }
        if self.disk_bytes_max != 0 && self.disk_bytes_max < 2 * self.segment_bytes_max {
            return bad(
                "disk_bytes_max",
                "must be 0 (unlimited) or at least 2 * segment_bytes_max, so compaction has room",
            );
        }
        if !(0.0..=1.0).contains(&self.compact_dead_ratio) {
            return bad("compact_dead_ratio", "must be between 0.0 and 1.0");
        }
        Ok(())
    }
}

/// Why a [`LogStore`] could not open (or, inside `commit`, write).
#[derive(Debug)]
pub enum StoreError {
    /// A file operation failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What we were doing, e.g. "read segment".
        op: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// A record in the middle of the log is damaged; recovery stopped.
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the damaged record in it.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The `meta` file is missing, unreadable or of another format version.
    Meta {
        /// The `meta` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An option is out of range.
    Options {
        /// The option's name.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { path, op, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            StoreError::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "corrupt record in {} at byte offset {offset} ({reason}); it is not the torn \
                 tail of the last write, so acknowledged messages may be damaged. Start with \
                 --repair to skip the bad bytes and keep the rest (messages in them are lost)",
                file.display()
            ),
            StoreError::Meta { path, reason } => {
                write!(f, "message log meta file {}: {reason}", path.display())
            }
            StoreError::Options { field, reason } => write!(f, "store option {field}: {reason}"),
        }
    }
}

impl StoreError {
    /// Whether this is the filesystem being full (ENOSPC, EDQUOT): refused
    /// work, not a failed store.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if fault::is_no_space(source))
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        let kind = match &e {
            StoreError::Io { source, .. } => source.kind(),
            StoreError::Corrupt { .. } | StoreError::Meta { .. } => io::ErrorKind::InvalidData,
            StoreError::Options { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e.to_string())
    }
}

fn io_at(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

/// Bytes recovery skipped in `repair` mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The segment file.
    pub file: PathBuf,
    /// Where the skipped bytes start.
    pub offset: u64,
    /// How many bytes were skipped.
    pub bytes: u64,
    /// Why the first record there was rejected.
    pub reason: &'static str,
}

/// What [`LogStore::open`] found and did; its `Display` is the log line.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Segment files replayed.
    pub segments: usize,
    /// Bytes read.
    pub bytes_read: u64,
    /// Valid records replayed.
    pub records: u64,
    /// Messages queued after replay.
    pub messages: usize,
    /// What [`Store::max_server_id`] returns: continue the ids after it.
    pub max_server_id: u64,
    /// Bytes of torn tail cut from the last segment.
    pub bytes_cut: u64,
    /// The file and offset where the tail was cut, if it was.
    pub cut_at: Option<(PathBuf, u64)>,
    /// Damaged stretches skipped (only with `repair`).
    pub skipped: Vec<Skipped>,
    /// `meta` was missing and was written anew (only with `repair`).
    pub meta_recreated: bool,
    /// Wall time of the whole `open`.
    pub elapsed: Duration,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replayed {} segments ({} bytes, {} records) in {} ms: {} messages queued, \
             ids continue after {}",
            self.segments,
            self.bytes_read,
            self.records,
            self.elapsed.as_millis(),
            self.messages,
            self.max_server_id
        )?;
        if let Some((file, offset)) = &self.cut_at {
            write!(
                f,
                "; cut a torn tail of {} bytes from {} at offset {offset}",
                self.bytes_cut,
                file.display()
            )?;
        }
        for s in &self.skipped {
            write!(
                f,
                "; repair skipped {} bytes of {} at offset {} ({})",
                s.bytes,
                s.file.display(),
                s.offset,
                s.reason
            )?;
        }
        if self.meta_recreated {
            f.write_str("; repair wrote a new meta file")?;
        }
        Ok(())
    }
}

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
    /// Older segments that must be deleted before this one (see the module
    /// docs). Never contains this segment's own number.
    pins: BTreeSet<u32>,
}

impl Segment {
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
    Record::queued_bytes(msg.body.len()) as u64
}

fn queued_record(user: u64, msg: &Stored) -> Record<'_> {
    Record::Queued {
        user,
        server_id: msg.server_id,
        from: msg.from,
        time_ms: msg.time_ms,
        body: &msg.body,
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
    /// Messages in `queues`.
    total: usize,
    /// Every segment file, by number.
    segments: BTreeMap<u32, Segment>,
    /// The segment appended to, opened for append; `None` before the first
    /// write and right after a roll (the next write creates one).
    active: Option<(u32, File)>,
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
    compacting: Option<Compaction>,
    /// Something may have become deletable or compactable since the last
    /// look (a sealed segment lost a live message, a roll, a deletion).
    maintenance: bool,
    /// Highest server id accepted or replayed (or the recovered watermark).
    server_id_max: u64,
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
        options.validate()?;
        let started = Instant::now();
        let mut store = LogStore {
            dir: dir.as_ref().to_path_buf(),
            queues: HashMap::new(),
            total: 0,
            segments: BTreeMap::new(),
            active: None,
            next_segment: 1,
            disk_bytes: 0,
            staged: Vec::new(),
            staged_records: 0,
            staged_bytes: 0,
            buf: Vec::new(),
            moves: Vec::new(),
            compacting: None,
            maintenance: true,
            server_id_max: 0,
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
        };
        let mut recovery = Recovery::default();
        if store.opts.durability != Durability::Memory {
            store.recover(&mut recovery)?;
            store.check_space(Instant::now());
            store.keep_reserve();
        }
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

    /// Re-reads the filesystem's free space if it is due (see "Free-space
    /// floor" in the module docs), and logs when pushes stop or resume.
    fn check_space(&mut self, now: Instant) {
        let every = if self.short {
            SPACE_CHECK_SHORT_EVERY
        } else {
            SPACE_CHECK_EVERY
        };
        let margin = self.free_bytes.saturating_sub(self.floor);
        let due = match self.space_checked {
            None => true,
            Some(at) => now.duration_since(at) >= every || self.written_since_check > margin / 2,
        };
        if !due {
            return;
        }
        self.space_checked = Some(now);
        self.written_since_check = 0;
        let Some((free, size)) = files::space(&self.dir) else {
            self.free_bytes = u64::MAX;
            return;
        };
        self.free_bytes = free;
        self.segment_bytes = self
            .opts
            .segment_bytes_max
            .min((size / SEGMENT_FS_SHARE).max(SEGMENT_FS_BYTES_MIN));
        if self.opts.disk_free_bytes_min == 0 {
            self.floor = (size / 100 * AUTO_FLOOR_PERCENT).min(AUTO_FLOOR_BYTES_MAX);
        }
        self.set_short(free < self.floor);
        self.keep_reserve();
    }

    /// Writes the reserve file when it is missing and there is room for it
    /// above the floor.
    fn keep_reserve(&mut self) {
        let want = (self.floor / 4).min(RESERVE_BYTES_MAX);
        if self.reserve_bytes > 0 || self.short || want == 0 || !self.fits_above_floor(want) {
            return;
        }
        let path = self.dir.join(RESERVE);
        let written = files::create(&path).and_then(|mut file| {
            // A pattern, not zeros: a compressing filesystem (ZFS) would
            // keep zeros in no space at all.
            let chunk = [0x5au8; 64 * 1024];
            let mut left = want;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                files::write(&mut file, &path, &chunk[..n])?;
                left -= n as u64;
            }
            if self.fsync() {
                files::sync(&file, &path, true)?;
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                self.reserve_bytes = want;
                self.written_since_check += want;
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                log::debug!("store {}: no reserve file: {e}", self.dir.display());
            }
        }
    }

    /// Deletes the reserve file (the disk is full): its space goes to
    /// delivery records and compaction copies, which free more. Whether
    /// there was one.
    fn release_reserve(&mut self) -> bool {
        if self.reserve_bytes == 0 {
            return false;
        }
        let path = self.dir.join(RESERVE);
        if let Err(e) = files::remove(&path) {
            log::warn!(
                "store {}: cannot release the reserve: {e}",
                self.dir.display()
            );
            return false;
        }
        log::warn!(
            "store {}: disk full: released the {}-byte reserve for delivery records and \
             compaction; it is written again once space is back",
            self.dir.display(),
            self.reserve_bytes
        );
        self.reserve_bytes = 0;
        self.space_checked = None;
        true
    }

    fn set_short(&mut self, short: bool) {
        if short == self.short {
            return;
        }
        self.short = short;
        let free = self.free_bytes().unwrap_or(0);
        if short {
            log::warn!(
                "store {}: disk space short ({free} bytes free, floor {} bytes): new messages \
                 are refused with storage_full; deliveries go on and free space",
                self.dir.display(),
                self.floor
            );
        } else {
            log::info!(
                "store {}: disk space back ({free} bytes free, floor {} bytes): taking new \
                 messages again",
                self.dir.display(),
                self.floor
            );
        }
    }

    /// Whether the free space, less `extra` bytes about to be written, stays
    /// at or above the floor.
    fn fits_above_floor(&self, extra: u64) -> bool {
        match self.free_bytes() {
            None => true,
            Some(free) => free >= extra.saturating_add(self.floor),
        }
    }

    fn fsync(&self) -> bool {
        self.opts.durability == Durability::Fsync
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

    fn recover(&mut self, rec: &mut Recovery) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        match fs::metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                files::create_dir(&dir).map_err(io_at(&dir, "create directory"))?;
                let parent = match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                self.sync_dir(&parent)?;
            }
            Err(e) => return Err(io_at(&dir, "inspect directory")(e)),
        }

        let mut numbers = Vec::new();
        let mut meta_found = false;
        for entry in fs::read_dir(&dir).map_err(io_at(&dir, "list directory"))? {
            let entry = entry.map_err(io_at(&dir, "list directory"))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == META {
                meta_found = true;
            } else if name == META_TMP || name.ends_with(TMP_SUFFIX) {
                // Left by a crash before its rename; the original is intact.
                let path = entry.path();
                files::remove(&path).map_err(io_at(&path, "remove leftover"))?;
            } else if let Some(n) = segment::parse_file_name(name) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();

        let meta_path = dir.join(META);
        let watermark = if meta_found {
            read_meta(&meta_path)?
        } else if numbers.is_empty() {
            0
        } else if self.opts.repair {
            rec.meta_recreated = true;
            0
        } else {
            return Err(StoreError::Meta {
                path: meta_path,
                reason: "missing although segment files exist; start with --repair to \
                         write a new one (ids continue after the highest id in the log)"
                    .to_string(),
            });
        };

        for (i, &n) in numbers.iter().enumerate() {
            self.replay_segment(n, i + 1 == numbers.len(), rec)?;
        }
        rec.segments = numbers.len();

        if let Some(&last) = numbers.last() {
            self.next_segment = last.checked_add(1).ok_or_else(|| StoreError::Meta {
                path: self.segment_path(last),
                reason: "segment numbers are used up".to_string(),
            })?;
            if self.segments[&last].bytes < self.opts.segment_bytes_max {
                let path = self.segment_path(last);
                let file = files::open_append(&path).map_err(io_at(&path, "open segment"))?;
                self.active = Some((last, file));
            }
        }

        self.server_id_max = self.server_id_max.max(watermark);
        // New ids continue after the old watermark; until a higher one is on
        // disk, pushes are refused (see "Disk full").
        self.id_watermark = watermark;
        self.reserve_bytes = fs::metadata(dir.join(RESERVE)).map_or(0, |m| m.len());
        let mut meta = self.write_meta(self.server_id_max.saturating_add(ID_RESERVE));
        if meta.as_ref().is_err_and(StoreError::is_no_space) && self.release_reserve() {
            meta = self.write_meta(self.server_id_max.saturating_add(ID_RESERVE));
        }
        match meta {
            Ok(()) => {}
            Err(e) if e.is_no_space() => {
                log::warn!(
                    "store {}: {e}: starting on a full disk; queued messages are served, new \
                     ones are refused until space is freed",
                    self.dir.display()
                );
                self.meta_retry_at = Some(Instant::now() + SPACE_CHECK_SHORT_EVERY);
            }
            Err(e) => return Err(e),
        }
        self.maintenance = true;
        Ok(())
    }

    fn replay_segment(&mut self, n: u32, last: bool, rec: &mut Recovery) -> Result<(), StoreError> {
        let path = self.segment_path(n);
        let data = fs::read(&path).map_err(io_at(&path, "read segment"))?;
        rec.bytes_read += data.len() as u64;
        self.segments.insert(n, Segment::default());
        // Byte ranges of the valid records, kept for a repair rewrite.
        let mut good: Vec<(usize, usize)> = Vec::new();
        let mut damaged = false;
        let mut cut_at = None;
        for step in Scanner::new(&data) {
            match step {
                Step::Record {
                    offset,
                    len,
                    record,
                } => {
                    self.replay_record(n, record, len as u64);
                    rec.records += 1;
                    if self.opts.repair {
                        good.push((offset, offset + len));
                    }
                }
                Step::Bad {
                    offset,
                    reason,
                    resume,
                    zero_sector,
                } => {
                    if last && (resume.is_none() || zero_sector) {
                        cut_at = Some(offset);
                        break;
                    }
                    if !self.opts.repair {
                        return Err(StoreError::Corrupt {
                            file: path,
                            offset: offset as u64,
                            reason,
                        });
                    }
                    damaged = true;
                    rec.skipped.push(Skipped {
                        file: path.clone(),
                        offset: offset as u64,
                        bytes: (resume.unwrap_or(data.len()) - offset) as u64,
                        reason,
                    });
                }
            }
        }
        if let Some(offset) = cut_at {
            rec.bytes_cut += (data.len() - offset) as u64;
            rec.cut_at = Some((path.clone(), offset as u64));
        }
        let bytes = if damaged {
            // Rewrite without the bad bytes (and without a cut tail), so the
            // next start needs no repair.
            let mut clean = Vec::with_capacity(data.len());
            for &(from, to) in &good {
                clean.extend_from_slice(&data[from..to]);
            }
            let tmp = self.dir.join(format!("{}.tmp", segment::file_name(n)));
            let mut file = files::create(&tmp).map_err(io_at(&tmp, "create"))?;
            files::write(&mut file, &tmp, &clean).map_err(io_at(&tmp, "write"))?;
            if self.fsync() {
                files::sync(&file, &tmp, true).map_err(io_at(&tmp, "sync"))?;
                self.syncs += 1;
            }
            files::rename(&tmp, &path).map_err(io_at(&path, "replace segment"))?;
            let dir = self.dir.clone();
            self.sync_dir(&dir)?;
            clean.len()
        } else if let Some(offset) = cut_at {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_at(&path, "open segment"))?;
            files::truncate(&file, &path, offset as u64)
                .map_err(io_at(&path, "truncate torn tail"))?;
            // The cut must be durable before new records follow it.
            if self.fsync() {
                files::sync(&file, &path, false).map_err(io_at(&path, "sync"))?;
                self.syncs += 1;
            }
            offset
        } else {
            data.len()
        };
        let seg = self.segments.get_mut(&n).expect("inserted above");
        seg.bytes = bytes as u64;
        debug_assert!(seg.live_bytes <= seg.bytes);
        self.disk_bytes += bytes as u64;
        Ok(())
    }

    fn replay_record(&mut self, n: u32, record: Record<'_>, len: u64) {
        match record {
            Record::Queued {
                user,
                server_id,
                from,
                time_ms,
                body,
            } => {
                self.server_id_max = self.server_id_max.max(server_id);
                let queue = self.queues.entry(user).or_default();
                match find(queue, server_id) {
                    Ok(at) => {
                        // A compaction copy whose original was not deleted
                        // yet (a crash in between): the later copy is the
                        // current one, and must outlive the original. Only
                        // a damaged log holds copies that differ, or two in
                        // one file: each segment gives up the bytes it held.
                        let entry = &mut queue[at];
                        let old_bytes = queued_bytes(&entry.msg);
                        entry.msg = Stored {
                            server_id,
                            from,
                            time_ms,
                            body: body.into(),
                        };
                        let old = std::mem::replace(&mut entry.loc, Loc::Segment(n));
                        if let Loc::Segment(o) = old {
                            let from_seg = self.segments.get_mut(&o).expect("replayed");
                            from_seg.live -= 1;
                            from_seg.live_bytes -= old_bytes;
                            let seg = self.segments.get_mut(&n).expect("replaying");
                            seg.live += 1;
                            seg.live_bytes += len;
                            if o != n {
                                seg.pins.insert(o);
                            }
                        }
                    }
                    Err(at) => {
                        let msg = Stored {
                            server_id,
                            from,
                            time_ms,
                            body: body.into(),
                        };
                        queue.insert(
                            at,
                            Entry {
                                msg,
                                loc: Loc::Segment(n),
                            },
                        );
                        self.total += 1;
                        let seg = self.segments.get_mut(&n).expect("replaying");
                        seg.live += 1;
                        seg.live_bytes += len;
                    }
                }
                let seg = self.segments.get_mut(&n).expect("replaying");
                seg.index.push((user, server_id));
            }
            Record::Delivered { user, server_id } => {
                let Some(queue) = self.queues.get_mut(&user) else {
                    return; // Its Queued record went with a deleted segment.
                };
                let Ok(at) = find(queue, server_id) else {
                    return;
                };
                let entry = queue.remove(at).expect("found");
                self.total -= 1;
                if queue.is_empty() {
                    self.queues.remove(&user);
                }
                if let Loc::Segment(o) = entry.loc {
                    let from_seg = self.segments.get_mut(&o).expect("replayed");
                    from_seg.live -= 1;
                    from_seg.live_bytes -= queued_bytes(&entry.msg);
                    if o != n {
                        let seg = self.segments.get_mut(&n).expect("replaying");
                        seg.pins.insert(o);
                    }
                }
            }
        }
    }

    /// Replaces `meta` with one holding `watermark`.
    fn write_meta(&mut self, watermark: u64) -> Result<(), StoreError> {
        let tmp = self.dir.join(META_TMP);
        let text = format!("{META_MAGIC}\nversion {FORMAT_VERSION}\nserver_id_max {watermark}\n");
        let written = files::create(&tmp).and_then(|mut file| {
            files::write(&mut file, &tmp, text.as_bytes())?;
            if self.fsync() {
                files::sync(&file, &tmp, false)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            // A partial meta.tmp would only take space; the old meta stands.
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&tmp, "write")(e));
        }
        if self.fsync() {
            self.syncs += 1;
        }
        let path = self.dir.join(META);
        files::rename(&tmp, &path).map_err(io_at(&path, "replace"))?;
        let dir = self.dir.clone();
        self.sync_dir(&dir)?;
        self.id_watermark = watermark;
        Ok(())
    }

    fn watermark_due(&self) -> bool {
        self.server_id_max.saturating_add(ID_RESERVE / 2) > self.id_watermark
    }

    fn commit_inner(&mut self, refused: &mut Vec<u64>, now: Instant) -> Result<(), StoreError> {
        if self.watermark_due() && self.meta_retry_at.is_none_or(|at| now >= at) {
            // The batch's ids are all below the watermark on disk (pushes
            // past it are refused), so a full disk here only delays it.
            match self.write_meta(self.server_id_max.saturating_add(ID_RESERVE)) {
                Ok(()) => self.meta_retry_at = None,
                Err(e) if e.is_no_space() => {
                    self.meta_retry_at = Some(now + SPACE_CHECK_SHORT_EVERY);
                    let watermark = self.id_watermark;
                    let beyond = self.staged.iter().any(|s| {
                        matches!(s, Staged::Queued { server_id, .. } if *server_id >= watermark)
                    });
                    if beyond {
                        self.roll_back(refused, &e);
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }

        // 1. The batch: staged records, encoded from the queues.
        self.buf.clear();
        for staged in &self.staged {
            match *staged {
                Staged::Queued { user, server_id } => {
                    let entry = lookup(&self.queues, user, server_id)
                        .expect("a staged message is still queued (else it was cancelled)");
                    queued_record(user, &entry.msg).encode(&mut self.buf);
                }
                Staged::Delivered {
                    user, server_id, ..
                } => Record::Delivered { user, server_id }.encode(&mut self.buf),
                Staged::Cancelled => {}
            }
        }
        debug_assert_eq!(self.buf.len() as u64, self.staged_bytes);

        // 2. Compaction copies, in the same write.
        if self.compacting.is_none() && self.maintenance {
            self.compacting = self
                .pick_victim()
                .map(|segment| Compaction { segment, cursor: 0 });
            if self.compacting.is_none() {
                self.maintenance = false;
            }
        }
        let cursor = self.plan_moves();

        // 3. One write, one sync.
        if !self.buf.is_empty() {
            if let Err(e) = self.append() {
                if !e.is_no_space() {
                    return Err(e);
                }
                self.roll_back(refused, &e);
                // The delivery records go again at the next commit, into
                // the reserve's space.
                self.release_reserve();
                return Ok(());
            }
        }

        // 4. The records are durable: update where things are.
        self.apply_staged();
        if let Some(cursor) = cursor {
            self.apply_moves(cursor)?;
        }
        if let Some(n) = self.active_number() {
            let seg = &self.segments[&n];
            // Short of space, a mostly dead active segment is sealed so it
            // can be compacted and deleted (see "Free-space floor"); not
            // before it holds a quarter of the floor, so that one of
            // tombstones alone does not roll at every commit.
            let reclaim = !self.fits_above_floor(self.floor)
                && seg.bytes >= (self.floor / 4).max(4096)
                && seg.dead_ratio() > self.opts.compact_dead_ratio
                && seg.live_bytes <= self.compact_budget();
            if seg.bytes >= self.segment_bytes || reclaim {
                self.active = None; // sealed; the next write starts a new one
                self.maintenance = true;
            }
        }
        if self.maintenance {
            self.delete_dead()?;
        }
        Ok(())
    }

    /// Takes the pushes of the batch that found the disk full back out of
    /// their queues (their ids go to `refused`), keeps its tombstones staged
    /// for the next commit and drops its compaction copies.
    fn roll_back(&mut self, refused: &mut Vec<u64>, cause: &StoreError) {
        self.rollbacks += 1;
        let before = refused.len();
        for staged in std::mem::take(&mut self.staged) {
            match staged {
                Staged::Queued { user, server_id } => {
                    let queue = self.queues.get_mut(&user).expect("a staged push is queued");
                    let at = find(queue, server_id).expect("a staged push is queued");
                    let entry = queue.remove(at).expect("found");
                    debug_assert!(matches!(entry.loc, Loc::Staged(_)));
                    if queue.is_empty() {
                        self.queues.remove(&user);
                    }
                    self.total -= 1;
                    refused.push(server_id);
                }
                Staged::Delivered { .. } => self.staged.push(staged),
                Staged::Cancelled => {}
            }
        }
        self.staged_records = self.staged.len();
        self.staged_bytes = self.staged.len() as u64 * Record::delivered_bytes() as u64;
        self.moves.clear();
        self.buf.clear();
        // The disk is full whatever the last look said: refuse pushes until
        // the next look (due at once) finds space above the floor.
        self.free_bytes = 0;
        self.written_since_check = 0;
        self.space_checked = None;
        self.set_short(true);
        log::warn!(
            "store {}: {cause}: rolled back {} new messages (refused with storage_full) and \
             kept {} delivery records for the next write",
            self.dir.display(),
            refused.len() - before,
            self.staged.len()
        );
    }

    /// Bytes a compaction may copy now: the free space less half the floor
    /// (the other half stays for tombstones). Unlimited when unknown.
    fn compact_budget(&self) -> u64 {
        self.free_bytes()
            .map_or(u64::MAX, |free| free.saturating_sub(self.floor / 2))
    }

    /// The next segment to compact (or just delete, if it has no live
    /// message): a reclaimable sealed segment without pins, fully dead ones
    /// first, oldest first; else the oldest segment a pinned reclaimable one
    /// waits for. Segments whose live bytes do not fit in the free space
    /// wait (see "Free-space floor").
    fn pick_victim(&self) -> Option<u32> {
        let budget = self.compact_budget();
        let pick = self.pick_victim_unbounded()?;
        (self.segments[&pick].live_bytes <= budget).then_some(pick)
    }

    fn pick_victim_unbounded(&self) -> Option<u32> {
        let active = self.active_number();
        let sealed = || {
            self.segments
                .iter()
                .filter(move |(n, _)| Some(**n) != active)
        };
        let over = |s: &Segment| s.dead_ratio() > self.opts.compact_dead_ratio;
        if let Some((&n, _)) = sealed().find(|(_, s)| s.live == 0 && s.pins.is_empty()) {
            return Some(n);
        }
        if let Some((&n, _)) = sealed().find(|(_, s)| over(s) && s.pins.is_empty()) {
            return Some(n);
        }
        let (&blocked, _) = sealed().find(|(_, s)| s.live == 0 || over(s))?;
        // Pins point strictly to older segments, so this ends, at a segment
        // without pins (the oldest has none).
        let mut at = blocked;
        for _ in 0..self.segments.len() {
            match self.segments[&at].pins.first() {
                Some(&older) => at = older,
                None => return Some(at),
            }
        }
        unreachable!("pins form a cycle at segment {blocked}")
    }

    /// Encodes the next slice of the victim's live messages into `buf` and
    /// lists them in `moves`. Returns the cursor to store once written.
    fn plan_moves(&mut self) -> Option<usize> {
        self.moves.clear();
        let c = self.compacting?;
        let seg = &self.segments[&c.segment];
        if seg.live == 0 {
            return Some(seg.index.len());
        }
        let end = seg.index.len().min(c.cursor + COMPACT_ENTRIES_PER_COMMIT);
        let mut cursor = c.cursor;
        let mut copied = 0;
        while cursor < end && copied < self.compact_bytes_per_commit {
            let (user, server_id) = seg.index[cursor];
            cursor += 1;
            let Some(entry) = lookup(&self.queues, user, server_id) else {
                continue; // delivered
            };
            if entry.loc != Loc::Segment(c.segment) {
                continue; // a later copy is the current one
            }
            queued_record(user, &entry.msg).encode(&mut self.buf);
            copied += queued_bytes(&entry.msg);
            self.moves.push((user, server_id));
        }
        Some(cursor)
    }

    fn append(&mut self) -> Result<(), StoreError> {
        if self.active.is_none() {
            let n = self.next_segment;
            let path = self.segment_path(n);
            self.next_segment = n.checked_add(1).ok_or_else(|| StoreError::Meta {
                path: path.clone(),
                reason: "segment numbers are used up".to_string(),
            })?;
            let file = files::create_new_append(&path).map_err(io_at(&path, "create segment"))?;
            let dir = self.dir.clone();
            self.sync_dir(&dir)?;
            self.segments.insert(n, Segment::default());
            self.active = Some((n, file));
        }
        let fsync = self.fsync();
        let (n, file) = self.active.as_mut().expect("created above");
        let n = *n;
        let path = self.dir.join(segment::file_name(n));
        if let Err(e) = files::write(file, &path, &self.buf) {
            if !fault::is_no_space(&e) {
                return Err(io_at(&path, "append to segment")(e));
            }
            // Cut what part of the batch made it, so the next batch follows
            // the last good record. If that fails too, the file's end is
            // unknown: a failed store, replayed at restart.
            let good = self.segments[&n].bytes;
            files::truncate(file, &path, good).map_err(io_at(&path, "truncate a partial write"))?;
            return Err(io_at(&path, "append to segment")(e));
        }
        if fsync {
            files::sync(file, &path, true).map_err(io_at(&path, "sync segment"))?;
            self.syncs += 1;
        }
        let len = self.buf.len() as u64;
        self.written_since_check += len;
        self.segments.get_mut(&n).expect("active").bytes += len;
        self.disk_bytes += len;
        Ok(())
    }

    fn apply_staged(&mut self) {
        if self.staged_records == 0 {
            self.staged.clear();
            return;
        }
        let n = self.active_number().expect("a batch was written");
        for i in 0..self.staged.len() {
            match self.staged[i] {
                Staged::Queued { user, server_id } => {
                    let entry = lookup_mut(&mut self.queues, user, server_id).expect("staged");
                    debug_assert_eq!(entry.loc, Loc::Staged(i as u32));
                    entry.loc = Loc::Segment(n);
                    let bytes = queued_bytes(&entry.msg);
                    let seg = self.segments.get_mut(&n).expect("active");
                    seg.live += 1;
                    seg.live_bytes += bytes;
                    seg.index.push((user, server_id));
                }
                Staged::Delivered { target, .. } => {
                    if target != n && self.segments.contains_key(&target) {
                        let seg = self.segments.get_mut(&n).expect("active");
                        seg.pins.insert(target);
                    }
                }
                Staged::Cancelled => {}
            }
        }
        self.staged.clear();
        self.staged_records = 0;
        self.staged_bytes = 0;
    }

    fn apply_moves(&mut self, cursor: usize) -> Result<(), StoreError> {
        let c = self.compacting.expect("planned");
        if !self.moves.is_empty() {
            let n = self.active_number().expect("copies were written");
            let mut moved_bytes = 0;
            let mut moved = 0;
            for &(user, server_id) in &self.moves {
                let entry = lookup_mut(&mut self.queues, user, server_id).expect("planned");
                if entry.loc != Loc::Segment(c.segment) {
                    // Moved already: the victim's index lists it twice,
                    // which only the replay of a damaged log (two Queued
                    // records of one message in one file) does. The extra
                    // copy written is dead bytes.
                    continue;
                }
                entry.loc = Loc::Segment(n);
                moved += 1;
                moved_bytes += queued_bytes(&entry.msg);
                self.segments
                    .get_mut(&n)
                    .expect("active")
                    .index
                    .push((user, server_id));
            }
            let victim = self.segments.get_mut(&c.segment).expect("victim");
            victim.live -= moved;
            victim.live_bytes -= moved_bytes;
            let seg = self.segments.get_mut(&n).expect("active");
            seg.live += moved;
            seg.live_bytes += moved_bytes;
            seg.pins.insert(c.segment);
            self.rewritten_bytes += moved_bytes;
        }
        let victim = &self.segments[&c.segment];
        if victim.live == 0 {
            debug_assert!(victim.pins.is_empty());
            self.delete_segment(c.segment)?;
        } else {
            debug_assert!(cursor < victim.index.len());
            self.compacting = Some(Compaction {
                segment: c.segment,
                cursor,
            });
        }
        Ok(())
    }

    /// Deletes up to [`DELETES_PER_COMMIT`] sealed segments that have no
    /// live message and no pins, oldest first.
    fn delete_dead(&mut self) -> Result<(), StoreError> {
        let active = self.active_number();
        let mut deleted = 0;
        let mut at = 0;
        while deleted < DELETES_PER_COMMIT {
            // Re-find each time: a deletion may unpin a newer segment.
            let Some(n) = self
                .segments
                .range(at..)
                .find(|(n, s)| Some(**n) != active && s.live == 0 && s.pins.is_empty())
                .map(|(n, _)| *n)
            else {
                break;
            };
            self.delete_segment(n)?;
            deleted += 1;
            at = n;
        }
        Ok(())
    }

    fn delete_segment(&mut self, n: u32) -> Result<(), StoreError> {
        debug_assert_ne!(Some(n), self.active_number());
        debug_assert_eq!(self.segments[&n].live, 0);
        debug_assert!(self.segments[&n].pins.is_empty());
        let path = self.segment_path(n);
        files::remove(&path).map_err(io_at(&path, "delete segment"))?;
        // Durable before any segment it pinned may go: otherwise a crash
        // could keep this file and lose the tombstones that cancel it.
        let dir = self.dir.clone();
        self.sync_dir(&dir)?;
        let seg = self.segments.remove(&n).expect("exists");
        self.disk_bytes -= seg.bytes;
        for other in self.segments.values_mut() {
            other.pins.remove(&n);
        }
        if self.compacting.is_some_and(|c| c.segment == n) {
            self.compacting = None;
        }
        self.maintenance = true;
        Ok(())
    }
}

fn read_meta(path: &Path) -> Result<u64, StoreError> {
    let text = fs::read_to_string(path).map_err(io_at(path, "read"))?;
    let bad = |reason: String| StoreError::Meta {
        path: path.to_path_buf(),
        reason,
    };
    let mut lines = text.lines();
    if lines.next() != Some(META_MAGIC) {
        return Err(bad(format!("does not start with {META_MAGIC:?}")));
    }
    let version = lines
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| bad("no version line".to_string()))?;
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, this build reads version {FORMAT_VERSION}"
        )));
    }
    lines
        .next()
        .and_then(|l| l.strip_prefix("server_id_max "))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| bad("no server_id_max line".to_string()))
}

impl Store for LogStore {
    fn push(&mut self, user: u64, msg: Stored) -> Result<(), PushError> {
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
        let bytes = queued_bytes(&msg);
        if durable
            && self.opts.disk_bytes_max > 0
            && self.disk_bytes + self.staged_bytes + bytes > self.opts.disk_bytes_max
        {
            return Err(PushError::StorageFull(msg));
        }
        if durable && !self.fits_above_floor(self.staged_bytes + bytes) {
            // The estimate may be stale: look again (at most every 100 ms
            // while short) before refusing.
            self.check_space(Instant::now());
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
        debug_assert!(queue
            .back()
            .is_none_or(|last| last.msg.server_id < msg.server_id));
        debug_assert!(queued_record(user, &msg).is_valid());
        self.server_id_max = self.server_id_max.max(msg.server_id);
        let loc = if durable {
            let at = u32::try_from(self.staged.len()).expect("a batch under 2^32 records");
            self.staged.push(Staged::Queued {
                user,
                server_id: msg.server_id,
            });
            self.staged_records += 1;
            self.staged_bytes += bytes;
            Loc::Staged(at)
        } else {
            Loc::Memory
        };
        queue.push_back(Entry { msg, loc });
        self.total += 1;
        Ok(())
    }

    fn remove(&mut self, user: u64, server_id: u64) -> Option<Stored> {
        let queue = self.queues.get_mut(&user)?;
        let at = find(queue, server_id).ok()?;
        let entry = queue.remove(at)?;
        self.total -= 1;
        if queue.is_empty() {
            self.queues.remove(&user);
        }
        let bytes = queued_bytes(&entry.msg);
        match entry.loc {
            Loc::Memory => {}
            Loc::Staged(i) => {
                // The skip rule: never written, so nothing to write now.
                let slot = &mut self.staged[i as usize];
                debug_assert_eq!(*slot, Staged::Queued { user, server_id });
                *slot = Staged::Cancelled;
                self.staged_records -= 1;
                self.staged_bytes -= bytes;
            }
            Loc::Segment(n) => {
                let seg = self.segments.get_mut(&n).expect("a live message's segment");
                seg.live -= 1;
                seg.live_bytes -= bytes;
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
        Some(entry.msg)
    }

    fn next_after(&self, user: u64, after: u64) -> Option<&Stored> {
        let queue = self.queues.get(&user)?;
        let at = queue.partition_point(|e| e.msg.server_id <= after);
        // Staged pushes are the newest of a queue; they are not durable yet.
        queue
            .get(at)
            .filter(|e| !matches!(e.loc, Loc::Staged(_)))
            .map(|e| &e.msg)
    }

    fn len(&self, user: u64) -> usize {
        self.queues.get(&user).map_or(0, VecDeque::len)
    }

    fn total(&self) -> usize {
        self.total
    }

    fn commit(&mut self, refused: &mut Vec<u64>) -> io::Result<()> {
        if self.opts.durability == Durability::Memory {
            return Ok(());
        }
        let now = Instant::now();
        self.check_space(now);
        if self.failed {
            return Err(io::Error::other(format!(
                "message log in {} failed earlier; reopen it to replay what is on disk",
                self.dir.display()
            )));
        }
        if self.staged.is_empty()
            && !self.maintenance
            && self.compacting.is_none()
            && (!self.watermark_due() || self.meta_retry_at.is_some_and(|at| now < at))
        {
            return Ok(());
        }
        self.commit_inner(refused, now).map_err(|e| {
            self.failed = true;
            io::Error::from(e)
        })
    }

    fn has_uncommitted(&self) -> bool {
        self.opts.durability != Durability::Memory
            && (self.staged_records > 0 || self.watermark_due())
    }

    fn max_server_id(&self) -> u64 {
        self.server_id_max
    }

    fn space(&self) -> Space {
        Space {
            free_bytes: self.free_bytes(),
            short: self.short,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::segment::{Scanner, Step};
    use proptest::prelude::*;

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
            let mut total = 0;
            let mut live: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
            for (user, q) in &self.queues {
                assert!(!q.is_empty(), "user {user} has an empty queue");
                total += q.len();
                for pair in q.iter().collect::<Vec<_>>().windows(2) {
                    assert!(pair[0].msg.server_id < pair[1].msg.server_id);
                }
                for e in q {
                    match e.loc {
                        Loc::Memory => assert_eq!(self.opts.durability, Durability::Memory),
                        Loc::Staged(i) => assert_eq!(
                            self.staged[i as usize],
                            Staged::Queued {
                                user: *user,
                                server_id: e.msg.server_id
                            }
                        ),
                        Loc::Segment(n) => {
                            let l = live.entry(n).or_default();
                            l.0 += 1;
                            l.1 += queued_bytes(&e.msg);
                        }
                    }
                }
            }
            assert_eq!(total, self.total);
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
                assert!(seg.live_bytes <= seg.bytes);
                for p in &seg.pins {
                    assert!(p < n && self.segments.contains_key(p), "pin {p} of {n}");
                }
            }
            assert!(live.is_empty(), "messages in unknown segments: {live:?}");
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
        s.active.as_mut().unwrap().1 = File::open(&path).unwrap();
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
}

/// Recovery speed. Run with
/// `cargo test --release -p tern --lib store::log::bench -- --ignored --nocapture`;
/// `TERN_BENCH_MIB` sets the log size (default 512), `TERN_BENCH_DIR` where
/// it goes (default the system temp dir), `TERN_BENCH_RUNS` how often the
/// warm recovery is timed (default 1), and `TERN_BENCH_DROP_CACHES=1` also
/// measures a cold page cache (needs root).
#[cfg(test)]
mod bench {
    use super::*;
    use std::env;

    fn recover(dir: &Path, o: &LogOptions) -> Recovery {
        let (store, r) = LogStore::open(dir, o.clone()).unwrap();
        drop(store);
        r
    }

    #[test]
    #[ignore = "writes hundreds of MiB; run explicitly, in release"]
    fn recovery_time_per_gib() {
        let mib: u64 = env::var("TERN_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512);
        let base = env::var_os("TERN_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(env::temp_dir);
        let tmp = tempfile::tempdir_in(base).unwrap();
        let o = LogOptions {
            durability: Durability::Os,
            queue_len_max: 1_000_000,
            ..LogOptions::default()
        };
        let users = 50_000;
        let started = Instant::now();
        let (mut s, _) = LogStore::open(tmp.path(), o.clone()).unwrap();
        let mut id = 0u64;
        while s.disk_bytes() < mib << 20 {
            for _ in 0..4096 {
                id += 1;
                let msg = Stored {
                    server_id: id << 10,
                    from: id % 1000,
                    time_ms: 1_700_000_000_000 + id,
                    body: vec![(id % 251) as u8; 200].into(),
                };
                s.push(id % users, msg).unwrap();
            }
            s.commit(&mut Vec::new()).unwrap();
        }
        let bytes = s.disk_bytes();
        let write_s = started.elapsed().as_secs_f64();
        drop(s);
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let report = |what: &str, r: &Recovery| {
            let secs = r.elapsed.as_secs_f64();
            println!(
                "recovery ({what}): {} MiB, {} segments, {} records, {} messages in {:.3} s \
                 = {:.2} s/GiB ({:.0} MiB/s)",
                bytes >> 20,
                r.segments,
                r.records,
                r.messages,
                secs,
                secs / gib,
                bytes as f64 / (1 << 20) as f64 / secs
            );
        };
        println!(
            "wrote {} MiB ({id} messages of 200 bytes) in {write_s:.2} s",
            bytes >> 20
        );
        let runs: usize = env::var("TERN_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        for _ in 0..runs {
            let warm = recover(tmp.path(), &o);
            assert_eq!(warm.messages as u64, id);
            report("page cache warm", &warm);
        }
        if env::var_os("TERN_BENCH_DROP_CACHES").is_some() {
            let status = std::process::Command::new("sh")
                .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
                .status()
                .unwrap();
            assert!(status.success(), "dropping the page cache needs root");
            report("page cache cold", &recover(tmp.path(), &o));
        }
    }
}
