//! Live upgrade: what the shards share while they carry their connections
//! to a successor (old process) or adopt them from a predecessor (the
//! successor), and how they agree that nothing is in flight between them
//! first.
//!
//! Frozen shards read no client input, but work may still travel: a SEND
//! read just before the freeze goes to the recipient's home shard, whose
//! ACK comes back. A shard that left before that ACK arrived would lose
//! it. So a shard keeps its connections only once every shard is idle
//! (nothing to commit, nothing waiting for ring room, no connection but the
//! frozen ones) and every message pushed onto a ring has been taken off:
//! the four-counter method (Mattern), two waves of the same counts in a
//! row.
//!
//! Then each shard closes its store and streams its kept connections to
//! the process in batches ([`Carry::stream`]), holding at most
//! [`HELD_FDS_MAX`] of them as process descriptors together (io_uring's
//! are direct descriptors until then), while the main thread sends them.
//! The successor's main thread queues what it receives per home shard
//! ([`Adopt`]), at most [`ADOPT_QUEUED_MAX`] at once.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::io::{Io, Kept, WakeHandle};
use crate::upgrade::state::{self, Carried, Transport};
use crate::upgrade::wire::{CARRIED_PACKET_BYTES_MAX, FDS_PER_MESSAGE_MAX};

/// Carried connections the old process holds at most as process
/// descriptors at once, over all shards (installed, not yet sent): far
/// under an open-files limit of 20,000, with room for what the Unix socket
/// holds in flight (its buffer: a few thousand) and the successor's own.
pub const HELD_FDS_MAX: usize = 2048;

/// Carried connections the successor holds at most as process descriptors
/// at once (received, not yet in a shard's backend).
pub const ADOPT_QUEUED_MAX: usize = 2048;

const _: () = assert!(FDS_PER_MESSAGE_MAX <= HELD_FDS_MAX);

/// One shard's published counts (written only by that shard).
#[derive(Debug, Default)]
struct Counts {
    /// Messages it pushed to other shards' outboxes, ever.
    pushed: AtomicU64,
    /// Messages it took off its rings and handled, ever.
    popped: AtomicU64,
    /// Whether it was idle when it last published.
    idle: AtomicBool,
}

/// The batches on their way from the shards to the main thread.
#[derive(Debug, Default)]
struct Queue {
    /// Batches ready to send, in order per shard.
    batches: VecDeque<Vec<(OwnedFd, Carried)>>,
    /// Descriptors in `batches` or being installed, `0..=HELD_FDS_MAX`
    /// (a poll shard's may exceed it: they are process descriptors
    /// already).
    held: usize,
    /// Shards whose store is closed (streaming or done).
    released: usize,
    /// Shards with nothing more to queue.
    done: usize,
    /// The main thread gave up (the successor failed): queue nothing more.
    aborted: bool,
}

/// What the main thread gets next from [`Carry::next`].
#[derive(Debug)]
pub enum Next {
    /// A batch to send; [`Carry::sent`] once it went.
    Batch(Vec<(OwnedFd, Carried)>),
    /// Every shard is done and every batch was taken.
    Done,
    /// Nothing came in time.
    TimedOut,
}

/// What an upgrading shard leaves once its loop ended: its backend, still
/// holding the kept connections, and their session states.
pub struct Outgoing {
    /// The shard's backend.
    pub io: Io,
    /// The kept connections, with their states.
    pub kept: Vec<(Kept, Carried)>,
    /// The shard's id, for the log.
    pub shard: usize,
    /// `frame_bytes_max`: a connection whose input grew past it (bytes
    /// that arrived after the pause) is closed, not carried.
    pub input_bytes_max: usize,
}

/// Shared by every shard of one server.
#[derive(Debug, Default)]
pub struct Carry {
    counts: Vec<Counts>,
    /// The previous wave's sums (pushed, popped), all idle; detector only.
    last: Mutex<Option<(u64, u64)>>,
    /// Set once quiet: every shard keeps its connections and stops.
    quiet: AtomicBool,
    queue: Mutex<Queue>,
    /// Signalled on every change of `queue`.
    changed: Condvar,
}

impl Carry {
    /// For `shards` shards.
    pub fn new(shards: usize) -> Carry {
        Carry {
            counts: (0..shards).map(|_| Counts::default()).collect(),
            ..Carry::default()
        }
    }

    /// Shard `id` publishes its counts and whether it is idle.
    pub fn publish(&self, id: usize, pushed: u64, popped: u64, idle: bool) {
        let c = &self.counts[id];
        c.pushed.store(pushed, Ordering::Release);
        c.popped.store(popped, Ordering::Release);
        c.idle.store(idle, Ordering::Release);
    }

    /// One wave (shard 0 calls it each iteration): true once two waves in
    /// a row found every shard idle and the same sums, pushed == popped.
    pub fn detect(&self) -> bool {
        if self.quiet.load(Ordering::Acquire) {
            return true;
        }
        let mut pushed = 0;
        let mut popped = 0;
        let mut idle = true;
        for c in &self.counts {
            idle &= c.idle.load(Ordering::Acquire);
            pushed += c.pushed.load(Ordering::Acquire);
            popped += c.popped.load(Ordering::Acquire);
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let wave = (idle && pushed == popped).then_some((pushed, popped));
        let quiet = wave.is_some() && *last == wave;
        *last = wave;
        if quiet {
            self.quiet.store(true, Ordering::Release);
        }
        quiet
    }

    /// Whether the shards agreed nothing is in flight.
    pub fn quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on `changed` until `until` (a bounded wait in steps, so a
    /// missed notification costs at most one step).
    fn wait<'a>(&self, q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        self.changed
            .wait_timeout(q, Duration::from_millis(50))
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// A shard thread that carries nothing has ended (or failed): its
    /// store is closed and it queues nothing.
    pub fn leave(&self) {
        let mut q = self.lock();
        q.released += 1;
        q.done += 1;
        self.changed.notify_all();
    }

    /// Runs on an upgrading shard's thread once its loop ended and its
    /// store is closed: installs the kept connections as process
    /// descriptors a batch at a time (never more than [`HELD_FDS_MAX`]
    /// held over all shards) and queues them for the main thread. What is
    /// left when the main thread gives up closes with the backend.
    pub fn stream(&self, out: Outgoing) {
        let Outgoing {
            mut io,
            kept,
            shard,
            input_bytes_max,
        } = out;
        {
            let mut q = self.lock();
            q.released += 1;
            self.changed.notify_all();
        }
        let total = kept.len();
        let mut queued = 0;
        let mut rest = kept.into_iter().peekable();
        while rest.peek().is_some() {
            let want = FDS_PER_MESSAGE_MAX;
            let granted = {
                let mut q = self.lock();
                while !q.aborted && q.held + want > HELD_FDS_MAX && q.held > 0 {
                    q = self.wait(q);
                }
                if q.aborted {
                    break;
                }
                q.held += want;
                want
            };
            let chunk: Vec<(Kept, Carried)> = rest.by_ref().take(granted).collect();
            let (keys, states): (Vec<Kept>, Vec<Carried>) = chunk.into_iter().unzip();
            let mut batch = Vec::with_capacity(keys.len());
            for (result, mut c) in io.carry_fds(keys).into_iter().zip(states) {
                match result {
                    Ok((fd, held)) => {
                        // Socket bytes: a WebSocket or MQTT connection's
                        // go through that layer first.
                        match c.transport {
                            Transport::Tern => c.input.extend_from_slice(&held),
                            _ => c.raw.extend_from_slice(&held),
                        }
                        if c.input.len() > input_bytes_max
                            || c.raw.len() > input_bytes_max + state::RAW_SLACK_BYTES
                            || state::packet_bytes(&c) > CARRIED_PACKET_BYTES_MAX
                        {
                            log::info!(
                                "shard {shard}: upgrade: user {} has {} bytes of input pending, \
                                 closed not carried",
                                c.user,
                                c.input.len() + c.raw.len()
                            );
                            continue;
                        }
                        batch.push((fd, c));
                    }
                    Err(e) => log::info!(
                        "shard {shard}: upgrade: user {} closed not carried: {e}",
                        c.user
                    ),
                }
            }
            queued += batch.len();
            let mut q = self.lock();
            // Saturating: an abort meanwhile reset the count.
            q.held = q.held.saturating_sub(granted - batch.len());
            if q.aborted {
                q.held = q.held.saturating_sub(batch.len());
                break;
            }
            if !batch.is_empty() {
                q.batches.push_back(batch);
            }
            self.changed.notify_all();
        }
        log::info!("shard {shard}: upgrade: {queued} of {total} connections carried");
        let mut q = self.lock();
        q.done += 1;
        self.changed.notify_all();
        drop(q);
        // The backend closes here what was not carried.
        drop(io);
    }

    /// Main thread: waits until every one of `shards` shards has closed
    /// its store (the data directory may go to the successor).
    pub fn wait_released(&self, shards: usize) {
        let mut q = self.lock();
        while q.released < shards {
            q = self.wait(q);
        }
    }

    /// Main thread: the next batch to send, waiting up to `timeout`.
    pub fn next(&self, shards: usize, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        loop {
            if let Some(batch) = q.batches.pop_front() {
                return Next::Batch(batch);
            }
            if q.done >= shards {
                return Next::Done;
            }
            if Instant::now() >= deadline {
                return Next::TimedOut;
            }
            q = self.wait(q);
        }
    }

    /// Main thread: a batch of `n` went (and its descriptors are closed).
    pub fn sent(&self, n: usize) {
        let mut q = self.lock();
        q.held = q.held.saturating_sub(n);
        self.changed.notify_all();
    }

    /// Main thread: the successor failed; the shards stop streaming and
    /// what is queued closes.
    pub fn abort(&self) {
        let mut q = self.lock();
        q.aborted = true;
        q.batches.clear();
        q.held = 0;
        self.changed.notify_all();
    }
}

/// The successor's carried connections on their way to their home shards'
/// backends: queued by the main thread as they arrive, taken by each shard
/// in its loop.
#[derive(Debug)]
pub struct Adopt {
    queues: Vec<Mutex<Vec<(OwnedFd, Carried)>>>,
    /// Connections in `queues`, `0..=ADOPT_QUEUED_MAX`.
    queued: Mutex<usize>,
    /// Signalled when a shard took some.
    taken: Condvar,
    /// The shards' wake handles, set once they run.
    wakers: OnceLock<Vec<WakeHandle>>,
}

impl Adopt {
    /// For `shards` shards.
    pub fn new(shards: usize) -> Adopt {
        Adopt {
            queues: (0..shards).map(|_| Mutex::default()).collect(),
            queued: Mutex::new(0),
            taken: Condvar::new(),
            wakers: OnceLock::new(),
        }
    }

    /// The shards' wake handles, once they run.
    pub fn set_wakers(&self, wakers: Vec<WakeHandle>) {
        let _ = self.wakers.set(wakers);
    }

    /// Main thread: queues a connection for shard `shard`, first waiting
    /// while [`ADOPT_QUEUED_MAX`] are queued.
    pub fn push(&self, shard: usize, fd: OwnedFd, carried: Carried) {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        while *queued >= ADOPT_QUEUED_MAX {
            queued = self
                .taken
                .wait_timeout(queued, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *queued += 1;
        drop(queued);
        let mut q = self.queues[shard].lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = q.is_empty();
        q.push((fd, carried));
        drop(q);
        if was_empty {
            if let Some(w) = self.wakers.get().and_then(|w| w.get(shard)) {
                w.wake();
            }
        }
    }

    /// Shard `shard`: takes up to `max` queued connections.
    pub fn take(&self, shard: usize, max: usize) -> Vec<(OwnedFd, Carried)> {
        let mut q = self.queues[shard].lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            return Vec::new();
        }
        let n = q.len().min(max);
        let taken: Vec<_> = q.drain(..n).collect();
        drop(q);
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        *queued -= taken.len();
        self.taken.notify_all();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_takes_two_equal_idle_waves() {
        let c = Carry::new(2);
        c.publish(0, 5, 3, true);
        c.publish(1, 3, 5, true);
        assert!(!c.detect(), "first wave");
        assert!(!c.quiet());
        // A message in flight (pushed 9, popped 8): never quiet.
        c.publish(0, 6, 3, true);
        assert!(!c.detect());
        assert!(!c.detect());
        // Taken off and handled, but shard 1 is busy (its commit).
        c.publish(1, 3, 6, false);
        assert!(!c.detect());
        c.publish(1, 3, 6, true);
        assert!(!c.detect(), "one idle wave is not enough");
        assert!(c.detect());
        assert!(c.quiet());
    }

    #[test]
    fn counts_that_move_between_waves_start_over() {
        let c = Carry::new(2);
        c.publish(0, 1, 1, true);
        c.publish(1, 1, 1, true);
        assert!(!c.detect());
        // Work happened between the waves (and ended): not quiet yet.
        c.publish(0, 2, 2, true);
        assert!(!c.detect());
        assert!(c.detect());
    }

    fn carried(user: u64) -> (OwnedFd, Carried) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = Carried {
            user,
            device: 0,
            version: 1,
            input: Vec::new(),
            output: Vec::new(),
            transport: Transport::Tern,
            raw: Vec::new(),
        };
        (a.into(), c)
    }

    #[test]
    fn shards_that_leave_release_the_directory_and_end_the_stream() {
        let c = Carry::new(2);
        c.leave();
        assert!(matches!(
            c.next(2, Duration::from_millis(10)),
            Next::TimedOut
        ));
        c.leave();
        c.wait_released(2);
        assert!(matches!(c.next(2, Duration::from_secs(1)), Next::Done));
    }

    #[test]
    fn the_adoption_queue_is_bounded_and_per_shard() {
        let adopt = std::sync::Arc::new(Adopt::new(2));
        for user in 0..ADOPT_QUEUED_MAX as u64 {
            let (fd, c) = carried(user + 1);
            adopt.push((user % 2) as usize, fd, c);
        }
        // Full: the next push waits until a shard takes some.
        let pusher = {
            let adopt = adopt.clone();
            std::thread::spawn(move || {
                let (fd, c) = carried(u64::MAX);
                adopt.push(1, fd, c);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!pusher.is_finished());
        let taken = adopt.take(0, 10);
        assert_eq!(taken.len(), 10);
        assert!(taken.iter().all(|(_, c)| c.user % 2 == 1));
        pusher.join().unwrap();
        let rest = adopt.take(1, usize::MAX);
        assert_eq!(rest.len(), ADOPT_QUEUED_MAX / 2 + 1);
        assert_eq!(rest.last().unwrap().1.user, u64::MAX);
        assert!(adopt.take(1, 1).is_empty());
    }
}
