//! Where a shard's group commit waits for its `fdatasync`: off the loop.
//!
//! The store writes a batch and hands back its [`SyncJob`]; the shard gives
//! it to its [`Syncer`] and goes on reading, delivering what is already
//! durable and accepting, while the job runs. When it is done the shard
//! tells the store ([`Store::synced`](crate::store::Store::synced)) and the
//! session layer ([`Event::Committed`](crate::session::Event::Committed)):
//! the batch's ACKs leave then, never before.
//!
//! One mechanism on every OS: a per-shard thread that runs the jobs, one
//! at a time, and wakes the shard through the backend's [`WakeHandle`] (the
//! eventfd or mio waker the rings use). io_uring's `IORING_OP_FSYNC` would
//! save the thread on Linux, but needs the segment's fd inside the ring's
//! ops and a new completion in every backend; the thread costs one context
//! switch per batch, against a sync of tens of microseconds or more.
//!
//! A simulated shard ([`Io::Sim`]) runs the job on its own thread at its
//! next poll, that is the shard's next loop iteration: the simulated disk is
//! thread-local, and the simulation stays deterministic while still letting
//! a batch's sync happen after the loop went on with the next one.

use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::io::{Io, WakeHandle};
use crate::store::SyncJob;

/// A finished job: its outcome and how long the `fdatasync` took.
pub(super) type Done = (io::Result<()>, Duration);

/// Runs one [`SyncJob`] at a time for its shard.
pub(super) enum Syncer {
    /// The thread, started with the first job.
    Thread {
        waker: WakeHandle,
        shard: usize,
        thread: Option<SyncThread>,
        /// A job was handed over and its outcome not taken yet.
        busy: bool,
    },
    /// Simulation: the job waits here and runs at the next poll.
    Inline(Option<SyncJob>),
}

/// The per-shard sync thread and its two channels (each holds one item:
/// at most one job is out).
pub(super) struct SyncThread {
    jobs: Option<SyncSender<SyncJob>>,
    done: Receiver<Done>,
    handle: Option<JoinHandle<()>>,
}

impl Syncer {
    /// The syncer for shard `shard` running over `io`.
    pub(super) fn new(io: &Io, shard: usize) -> Syncer {
        match io {
            Io::Sim(_) => Syncer::Inline(None),
            _ => Syncer::Thread {
                waker: io.wake_handle(),
                shard,
                thread: None,
                busy: false,
            },
        }
    }

    /// Whether a job is out.
    pub(super) fn busy(&self) -> bool {
        match self {
            Syncer::Thread { busy, .. } => *busy,
            Syncer::Inline(job) => job.is_some(),
        }
    }

    /// Hands `job` over; none may be out.
    pub(super) fn start(&mut self, job: SyncJob) {
        assert!(!self.busy(), "one sync in flight at a time");
        match self {
            Syncer::Thread {
                waker,
                shard,
                thread,
                busy,
            } => {
                let t = match thread {
                    Some(t) => t,
                    None => thread.insert(SyncThread::spawn(*shard, waker.clone())),
                };
                let jobs = t.jobs.as_ref().expect("open until drop");
                // Room for one, and none is out: never blocks.
                if jobs.send(job).is_err() {
                    panic!("the sync thread is gone");
                }
                *busy = true;
            }
            Syncer::Inline(slot) => *slot = Some(job),
        }
    }

    /// The outcome of the job out, once it is done; with `wait`, waits for
    /// it. `None` when no job is out or (without `wait`) it is still
    /// running.
    pub(super) fn poll(&mut self, wait: bool) -> Option<Done> {
        match self {
            Syncer::Thread { thread, busy, .. } => {
                if !*busy {
                    return None;
                }
                let t = thread.as_ref().expect("a job was handed over");
                let done = if wait {
                    t.done.recv().ok()
                } else {
                    match t.done.try_recv() {
                        Ok(done) => Some(done),
                        Err(TryRecvError::Empty) => return None,
                        Err(TryRecvError::Disconnected) => None,
                    }
                };
                *busy = false;
                // The thread only goes away by panicking: report it as the
                // sync's failure (the shard crashes and replays).
                Some(done.unwrap_or_else(|| {
                    (
                        Err(io::Error::other("the sync thread died")),
                        Duration::ZERO,
                    )
                }))
            }
            Syncer::Inline(slot) => {
                let job = slot.take()?;
                let started = Instant::now();
                let result = job.run();
                Some((result, started.elapsed()))
            }
        }
    }
}

impl SyncThread {
    fn spawn(shard: usize, waker: WakeHandle) -> SyncThread {
        let (jobs, inbox) = mpsc::sync_channel::<SyncJob>(1);
        let (outbox, done) = mpsc::sync_channel::<Done>(1);
        let handle = std::thread::Builder::new()
            .name(format!("tern-sync-{shard}"))
            .spawn(move || {
                // Ends when the shard drops its sender.
                while let Ok(job) = inbox.recv() {
                    let started = Instant::now();
                    let result = job.run();
                    if outbox.send((result, started.elapsed())).is_err() {
                        return;
                    }
                    waker.wake();
                }
            })
            .expect("spawn the shard's sync thread");
        SyncThread {
            jobs: Some(jobs),
            done,
            handle: Some(handle),
        }
    }
}

impl Drop for SyncThread {
    /// Lets a job out finish (its file is synced either way), then ends and
    /// joins the thread: it never outlives its shard.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
