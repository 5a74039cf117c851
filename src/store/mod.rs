//! Store-and-forward queues: every message between ACK and DELIVERED.
//!
//! A message is pushed on its recipient's home shard when the server takes
//! responsibility for it (that is when the sender gets its ACK) and removed
//! only when the recipient's device answers DELIVERED. While the recipient is
//! online the same queue feeds its connection, so a connection that drops
//! before acknowledging leaves the message queued for the next login.
//!
//! [`Store`] is the interface a shard uses; [`MemStore`] keeps the queues in
//! memory, [`LogStore`] keeps the same queues and also appends every change to
//! a per-shard log on disk, so that a restart replays them (see [`log`]).
//!
//! The contract, for any implementation:
//! - `push` and `remove` change the in-memory queues at once and only *stage*
//!   the change; [`Store::commit`] makes every staged change durable (as far
//!   as the store's durability setting goes). The shard sends the ACK of a
//!   pushed message only after the `commit` that follows the push returned
//!   `Ok`.
//! - `len` and `total` see staged changes; `next_after` sees staged
//!   removals but not staged pushes: a message is handed to a device only
//!   once it is durable, so no DELIVER can leave before the commit that
//!   holds it (and a push the commit rolls back was never shown to anyone).
//! - A push refused with [`PushError`] changed nothing.
//! - [`Store::begin_commit`] is the same commit split in two: it writes the
//!   batch and hands back the [`SyncJob`] that makes it durable, which the
//!   caller runs off its loop (another thread) while pushes and removes go
//!   on; [`Store::synced`] then reports the outcome. Only after that may the
//!   ACKs of the batch go, and only then does `next_after` show its pushes.
//! - A commit that finds the disk full (ENOSPC, EDQUOT) is not an error: it
//!   rolls back the pushes of its batch (their ids are handed back, their
//!   SENDs are refused with `storage_full`) and keeps the removals for the
//!   next commit.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub mod devices;
pub mod fault;
mod files;
pub mod groups;
pub mod log;
// Crate-visible for the fuzzing oracles (src/fuzzing.rs).
pub mod presence;
pub(crate) mod record;
pub(crate) mod segment;
pub mod shape;
pub mod window;

pub use self::log::{shard_dir, Durability, LogOptions, LogStore, Recovery, Skipped, StoreError};
pub use self::record::BODY_BYTES_MAX;
pub use self::shape::{Shape, QUEUE_LEN_BUCKETS};
pub use self::window::{Seen, WINDOW};
use self::window::{Taken, Windows};

/// Where a protocol v2 SEND came from, besides its sender: the key of
/// idempotent SEND (see [`window`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The sender's device; 0 until devices exist.
    pub device: u32,
    /// The sender's id for the message, increasing per sender device.
    pub client_id: u64,
}

/// A message held for its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Server-assigned id, increasing within one recipient's queue.
    pub server_id: u64,
    /// Sender's user id.
    pub from: u64,
    /// When the server accepted it, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// For a protocol v2 sender: its device and client_id (DELIVER v2
    /// carries the client_id; the store's dedupe window keeps the pair).
    /// `None` for a v1 sender.
    pub origin: Option<Origin>,
    /// The opaque message body.
    pub body: std::sync::Arc<[u8]>,
}

/// Why [`Store::push`] refused a message; each variant hands the message
/// back, and nothing was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The recipient's queue holds `queue_len_max` messages already.
    QueueFull(Stored),
    /// Storing it would take the log past `disk_bytes_max`. Messages already
    /// stored are kept; the space comes back as they are delivered.
    StorageFull(Stored),
}

impl PushError {
    /// The refused message.
    pub fn into_inner(self) -> Stored {
        match self {
            PushError::QueueFull(msg) | PushError::StorageFull(msg) => msg,
        }
    }
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::QueueFull(_) => f.write_str("recipient's queue is full"),
            PushError::StorageFull(_) => f.write_str("message storage is full"),
        }
    }
}

impl std::error::Error for PushError {}

/// Disk space as a store sees it (for the stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    /// Free bytes on the store's filesystem as last seen; `None` when the
    /// store keeps nothing on disk or could not tell.
    pub free_bytes: Option<u64>,
    /// Pushes are refused for lack of space right now.
    pub short: bool,
}

/// The `fdatasync` that makes one written batch durable, to run on any
/// thread (see [`Store::begin_commit`]). It holds its own handle on the
/// segment file, so a roll or a crash of its store does not invalidate it.
#[derive(Debug)]
pub struct SyncJob {
    file: Arc<File>,
    path: PathBuf,
}

impl SyncJob {
    /// Calls `fdatasync` on the batch's segment. An error leaves the file in
    /// an unknown state (see "Errors" in [`log`]).
    pub fn run(&self) -> io::Result<()> {
        // The simulator's planted bug skips this fsync (see crate::sim); a
        // simulation runs its jobs on its own thread.
        if crate::sim::planted(crate::sim::Planted::SkipFsync) {
            return Ok(());
        }
        files::sync(&self.file, &self.path, true).map_err(|source| {
            io::Error::from(StoreError::Io {
                path: self.path.clone(),
                op: "sync segment",
                source,
            })
        })
    }
}

/// The queues of the users homed on one shard.
pub trait Store {
    /// Appends `msg` to `user`'s queue and stages it for the next
    /// [`commit`](Store::commit). Hands it back when the queue is full or the
    /// disk budget is spent. Ids must increase within a queue. A message
    /// with an [`Origin`] also enters its sender's dedupe window (the
    /// caller asked [`seen`](Store::seen) first and got [`Seen::New`]);
    /// the window outlives the message, durably.
    fn push(&mut self, user: u64, msg: Stored) -> Result<(), PushError>;
    /// [`push`](Store::push) of one copy of a message many users of this
    /// store get (a group message): every copy with this `server_id` is
    /// pushed this way, with the same sender, time and body and no
    /// [`Origin`], and all within one batch. A store may keep the body
    /// once for all of them (the log writes one Body record and a small
    /// Member record per copy). Each copy is still removed on its own.
    /// Default: `push`.
    fn push_shared(&mut self, user: u64, msg: Stored) -> Result<(), PushError> {
        self.push(user, msg)
    }
    /// Whether `from`'s v2 SEND `origin` was taken already (staged pushes
    /// included: a retry that overtakes the commit sees its first copy).
    fn seen(&self, from: u64, origin: Origin) -> Seen;
    /// Removes the message `server_id` from `user`'s queue (DELIVERED) and
    /// stages the removal.
    fn remove(&mut self, user: u64, server_id: u64) -> Option<Stored>;
    /// The first message of `user` with an id greater than `after`.
    fn next_after(&self, user: u64, after: u64) -> Option<&Stored>;
    /// Calls `f` with the messages [`next_after`](Store::next_after) would
    /// give one after the other from `after`, in order, until `f` returns
    /// false or there is none left. One queue lookup for a whole DELIVER
    /// burst instead of one per message (the lookup was ~10 % of a
    /// pipelined message's CPU). Default: `next_after` in a loop.
    fn each_after(&self, user: u64, after: u64, f: &mut dyn FnMut(&Stored) -> bool) {
        let mut after = after;
        while let Some(m) = self.next_after(user, after) {
            if !f(m) {
                return;
            }
            after = m.server_id;
        }
    }
    /// Messages queued for `user`.
    fn len(&self, user: u64) -> usize;
    /// Messages queued on this shard.
    fn total(&self) -> usize;
    /// Makes every staged push and remove durable. ACKs for the pushes staged
    /// before this call may be sent once it returned `Ok`, except for the
    /// pushes whose server ids it appended to `refused`: the disk was full,
    /// those messages were taken out of their queues again, and their senders
    /// must hear `storage_full`. Cheap when nothing is staged; call it once
    /// per loop iteration. An `Err` means the files are in an unknown state:
    /// drop the store and open it again.
    fn commit(&mut self, refused: &mut Vec<u64>) -> io::Result<()>;
    /// [`commit`](Store::commit) without its wait: writes the staged batch
    /// and returns the [`SyncJob`] that makes it durable, or `None` when
    /// there is nothing to wait for (the commit is complete as `commit`'s
    /// would be, `refused` included). With a job out, pushes and removes may
    /// go on (they stage the next batch), but no other `begin_commit` or
    /// `commit` until [`synced`](Store::synced) reported the job's outcome;
    /// only then may the ACKs of the batch go. Default: `commit`, no job.
    fn begin_commit(&mut self, refused: &mut Vec<u64>) -> io::Result<Option<SyncJob>> {
        self.commit(refused).map(|()| None)
    }
    /// The outcome of the [`SyncJob`] of the last
    /// [`begin_commit`](Store::begin_commit). `Ok`: the batch is durable (its
    /// pushes become visible to `next_after`). An `Err` (passed on) means
    /// the files are in an unknown state: drop the store and open it again.
    fn synced(&mut self, result: io::Result<()>) -> io::Result<()> {
        result
    }
    /// Whether a [`commit`](Store::commit) has anything to make durable.
    fn has_uncommitted(&self) -> bool;
    /// No server id this store has accepted, now or before a restart, is
    /// greater than this. The shard continues its id sequence after it.
    fn max_server_id(&self) -> u64;
    /// Gives back buffers a burst grew beyond `keep_bytes` each (a big
    /// batch's encoding and staging), when nothing is staged. Called now
    /// and then by the shard (`memory_release_ms`), not per commit, so a
    /// busy shard does not regrow them each time. Default: nothing to do.
    fn trim(&mut self, _keep_bytes: usize) {}
    /// Disk space as last seen. Default: nothing on disk.
    fn space(&self) -> Space {
        Space::default()
    }
    /// Queue lengths by user and the oldest queued message, kept current
    /// by every change to the queues (never a walk over them).
    fn shape(&self) -> &Shape;
}

/// A queue's `(length, first message's time_ms)`, as [`Shape::update`]
/// takes it; `(0, None)` for no queue.
fn queue_state<'a, T: 'a>(
    queue: Option<&'a VecDeque<T>>,
    msg: impl Fn(&T) -> &Stored,
) -> (usize, Option<u64>) {
    queue.map_or((0, None), |q| (q.len(), q.front().map(|e| msg(e).time_ms)))
}

/// In-memory queues. A user with an empty queue has no entry at all.
pub struct MemStore {
    queues: HashMap<u64, VecDeque<Stored>>,
    windows: Windows<()>,
    len_max: usize,
    total: usize,
    /// Highest id pushed so far; 0 = none.
    server_id_max: u64,
    shape: Shape,
}

impl MemStore {
    /// Empty store holding at most `len_max` messages per user.
    pub fn new(len_max: usize) -> MemStore {
        assert!(len_max >= 1);
        MemStore {
            queues: HashMap::new(),
            windows: Windows::default(),
            len_max,
            total: 0,
            server_id_max: 0,
            shape: Shape::default(),
        }
    }
}

impl Store for MemStore {
    fn push(&mut self, user: u64, msg: Stored) -> Result<(), PushError> {
        let queue = self.queues.entry(user).or_default();
        if queue.len() >= self.len_max {
            // Not empty (len_max >= 1), so no empty entry is left behind.
            return Err(PushError::QueueFull(msg));
        }
        let before = queue_state(Some(queue), |m| m);
        debug_assert!(queue
            .back()
            .is_none_or(|last| last.server_id < msg.server_id));
        self.server_id_max = self.server_id_max.max(msg.server_id);
        if let Some(origin) = msg.origin {
            let taken = Taken {
                client_id: origin.client_id,
                server_id: msg.server_id,
                time_ms: msg.time_ms,
                loc: (),
            };
            self.windows.insert(msg.from, origin, taken);
            self.windows.prune(msg.from, origin.device, |_| {});
        }
        crate::memory::reserve_one(queue);
        queue.push_back(msg);
        self.shape
            .update(user, before, queue_state(Some(queue), |m| m));
        self.total += 1;
        Ok(())
    }

    fn seen(&self, from: u64, origin: Origin) -> Seen {
        self.windows.seen(from, origin)
    }

    fn remove(&mut self, user: u64, server_id: u64) -> Option<Stored> {
        let queue = self.queues.get_mut(&user)?;
        let at = queue
            .binary_search_by_key(&server_id, |m| m.server_id)
            .ok()?;
        let before = queue_state(Some(queue), |m| m);
        let msg = queue.remove(at)?;
        self.shape
            .update(user, before, queue_state(Some(queue), |m| m));
        self.total -= 1;
        if queue.is_empty() {
            self.queues.remove(&user);
            crate::memory::shrink_map(&mut self.queues);
        } else {
            crate::memory::shrink_deque(queue);
        }
        Some(msg)
    }

    fn next_after(&self, user: u64, after: u64) -> Option<&Stored> {
        let queue = self.queues.get(&user)?;
        let at = queue.partition_point(|m| m.server_id <= after);
        queue.get(at)
    }

    fn len(&self, user: u64) -> usize {
        self.queues.get(&user).map_or(0, VecDeque::len)
    }

    fn total(&self) -> usize {
        self.total
    }

    /// Nothing to make durable: the queues live and die with the process.
    fn commit(&mut self, _refused: &mut Vec<u64>) -> io::Result<()> {
        Ok(())
    }

    fn has_uncommitted(&self) -> bool {
        false
    }

    /// The highest id pushed since this store was created (0 = none).
    fn max_server_id(&self) -> u64 {
        self.server_id_max
    }

    fn shape(&self) -> &Shape {
        &self.shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64) -> Stored {
        Stored {
            server_id: id,
            from: 9,
            time_ms: 0,
            origin: None,
            body: std::sync::Arc::from(&[id as u8][..]),
        }
    }

    #[test]
    fn mem_store_keeps_its_shape() {
        let mut s = MemStore::new(10);
        for id in 1..=3 {
            s.push(
                1,
                Stored {
                    time_ms: id * 1000,
                    ..msg(id)
                },
            )
            .unwrap();
        }
        s.push(
            2,
            Stored {
                time_ms: 500,
                ..msg(4)
            },
        )
        .unwrap();
        assert_eq!(&s.shape().users()[..3], &[1, 0, 1]);
        assert_eq!(s.shape().oldest_ms(), Some(500));
        s.remove(2, 4).unwrap();
        s.remove(1, 1).unwrap();
        assert_eq!(&s.shape().users()[..3], &[0, 1, 0]);
        assert_eq!(s.shape().oldest_ms(), Some(2000));
        s.remove(1, 3).unwrap();
        s.remove(1, 2).unwrap();
        assert_eq!(s.shape(), &Shape::default());
    }

    #[test]
    fn full_queue_hands_message_back() {
        let mut s = MemStore::new(1);
        s.push(1, msg(1)).unwrap();
        assert_eq!(s.push(1, msg(2)), Err(PushError::QueueFull(msg(2))));
        // Other users are not affected.
        s.push(2, msg(3)).unwrap();
        assert_eq!(s.total(), 2);
    }

    #[test]
    fn remove_and_iterate_in_order() {
        let mut s = MemStore::new(10);
        for id in [3, 5, 8] {
            s.push(7, msg(id)).unwrap();
        }
        assert_eq!(s.next_after(7, 0).unwrap().server_id, 3);
        assert_eq!(s.next_after(7, 3).unwrap().server_id, 5);
        assert_eq!(s.next_after(7, 4).unwrap().server_id, 5);
        assert!(s.next_after(7, 8).is_none());
        assert_eq!(s.remove(7, 5), Some(msg(5)));
        assert_eq!(s.remove(7, 5), None);
        assert_eq!(s.next_after(7, 3).unwrap().server_id, 8);
        assert_eq!(s.len(7), 2);
        s.remove(7, 3).unwrap();
        s.remove(7, 8).unwrap();
        assert_eq!(s.len(7), 0);
        assert_eq!(s.total(), 0);
        assert!(s.queues.is_empty(), "empty queues are dropped");
    }

    #[test]
    fn commit_is_a_no_op_and_ids_are_tracked() {
        let mut s = MemStore::new(10);
        assert_eq!(s.max_server_id(), 0);
        s.push(1, msg(4)).unwrap();
        s.push(2, msg(2)).unwrap();
        assert!(!s.has_uncommitted());
        s.commit(&mut Vec::new()).unwrap();
        assert_eq!(s.max_server_id(), 4);
        assert_eq!(
            PushError::StorageFull(msg(3)).into_inner(),
            msg(3),
            "both variants hand the message back"
        );
    }

    #[test]
    fn unknown_user_or_id() {
        let mut s = MemStore::new(10);
        assert_eq!(s.remove(1, 1), None);
        assert!(s.next_after(1, 0).is_none());
        assert_eq!(s.len(1), 0);
    }
}
