//! One io_uring instance: its submission batching (with an overflow queue for
//! a full SQ), its fixed-file slot accounting, its receive buffers, and the
//! reaping of its completions (flushing CQ overflow and deferred task work).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{squeue, types, IoUring};

use super::bufs::BufRing;

/// How the ring runs completion work, best first. The kernel refuses the
/// flags it does not know with EINVAL and we try the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TaskRun {
    /// SINGLE_ISSUER | DEFER_TASKRUN (6.1): completion work runs only when we
    /// enter with GETEVENTS, in batches, on our thread.
    Defer,
    /// COOP_TASKRUN (5.19): no IPI to interrupt us for completion work.
    Coop,
    /// Neither.
    Plain,
}

/// One or two SQEs that must reach the kernel in the same submission (the
/// first of a pair is IO_LINKed to the second).
pub(super) enum Chain {
    One(squeue::Entry),
    Linked(squeue::Entry, squeue::Entry),
}

impl Chain {
    fn len(&self) -> u32 {
        match self {
            Chain::One(_) => 1,
            Chain::Linked(..) => 2,
        }
    }
}

/// A raw completion: (user_data, result, flags).
pub(super) type Cqe = (u64, i32, u32);

/// The buffer group of every ring's provided buffers (groups are per ring).
const BGID: u16 = 0;
/// Deferred completions the kernel runs per GETEVENTS enter that asks
/// for none (IO_LOCAL_TW_DEFAULT_MAX); asking for more runs more.
const LOCAL_WORK_PER_ENTER: usize = 20;
/// Completions that end a batching wait early ([`Ring::submit_and_wait`]).
const BATCH_WAKE_CQES: usize = 32;
/// The general timeout of a batching wait that was given none.
const BATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Enter rounds spent making room in a full SQ before queueing in `unqueued`.
const FLUSH_ROUNDS_MAX: usize = 4;

/// One ring and what we know of its fixed-file table.
pub(super) struct Ring {
    uring: IoUring,
    taskrun: TaskRun,
    /// SQEs that found the SQ full, oldest first. They go before any newer
    /// SQE (order matters: a CLOSE must follow the operations on its slot).
    unqueued: VecDeque<Chain>,
    /// Slots in the fixed-file table (at most RLIMIT_NOFILE).
    pub slots_total: u32,
    /// Slots holding a file as far as our completions tell: +1 on accept or
    /// arrival, -1 when a CLOSE of the slot completes.
    pub slots_used: u32,
    /// Slots promised to connections moving here (MSG_RING in flight).
    pub slots_reserved: u32,
    /// Operations submitted here whose final completion has not come.
    pub ops_inflight: u32,
    /// Receive buffers (none on a control ring that arms no receives).
    pub bufs: Option<BufRing>,
    /// The last reap may have left deferred completion work behind (it
    /// filled the CQ): reap again before sleeping.
    maybe_more: bool,
}

impl Ring {
    /// A ring with `sq_entries`/`cq_entries` queues and a sparse fixed-file
    /// table of `slots` slots; `bufs` provided buffers of `buf_bytes` (0: none);
    /// `eventfd` registered to be signalled on completions.
    ///
    /// A ring with an eventfd runs its completion work the plain way
    /// ([`TaskRun::Plain`]), never deferred: with DEFER_TASKRUN the kernel
    /// signals the eventfd when work is queued, from the softirq that queued
    /// it, and this kernel (6.18) defers that signal to an RCU callback, a
    /// grace period later. Seen with 200,000 connections held: every wake-up
    /// through a data ring came from `rcu_do_batch`, the shard slept ~15 ms
    /// per wait, and chat's end-to-end p50 was 6 ms (results/
    /// 2026-12-06-vm-uring-1m-p99/). Plain work is queued on the thread
    /// itself (TWA_SIGNAL wakes it), which then posts the completions and
    /// signals the eventfd from its own context, at once.
    pub fn new(
        sq_entries: u32,
        cq_entries: u32,
        slots: u32,
        bufs: u16,
        buf_bytes: u32,
        eventfd: Option<RawFd>,
    ) -> io::Result<Ring> {
        let (uring, taskrun) = build(sq_entries, cq_entries, eventfd.is_none())?;
        if !uring.params().is_feature_nodrop() || !uring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_NODROP or IORING_FEAT_EXT_ARG (kernel too old)",
            ));
        }
        uring
            .submitter()
            .register_files_sparse(slots)
            .map_err(|e| with_context(e, "register a sparse fixed-file table"))?;
        if let Some(fd) = eventfd {
            uring
                .submitter()
                .register_eventfd(fd)
                .map_err(|e| with_context(e, "register the eventfd"))?;
        }
        let bufs = if bufs > 0 {
            Some(
                BufRing::new(&uring.submitter(), BGID, bufs, buf_bytes)
                    .map_err(|e| with_context(e, "register a provided-buffer ring"))?,
            )
        } else {
            None
        };
        Ok(Ring {
            uring,
            taskrun,
            unqueued: VecDeque::new(),
            slots_total: slots,
            slots_used: 0,
            slots_reserved: 0,
            ops_inflight: 0,
            bufs,
            maybe_more: false,
        })
    }

    /// The ring's file descriptor (MSG_RING target, probe).
    pub fn fd(&self) -> RawFd {
        self.uring.as_raw_fd()
    }

    /// How completion work runs on this ring.
    pub fn taskrun(&self) -> TaskRun {
        self.taskrun
    }

    /// The kernel's submitter, for registrations and probes.
    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.uring.submitter()
    }

    /// Slots neither used nor promised.
    pub fn slots_free(&self) -> u32 {
        self.slots_total
            .saturating_sub(self.slots_used)
            .saturating_sub(self.slots_reserved)
    }

    /// SQEs waiting for room in the SQ.
    pub fn unqueued_len(&self) -> usize {
        self.unqueued.len()
    }

    /// Queues `chain` for the next submission. Never drops it: when the SQ
    /// is full it submits what is there to make room, and failing that keeps
    /// the chain in `unqueued`, ahead of anything queued later.
    ///
    /// # Safety
    ///
    /// Every buffer or pointer the SQEs name must stay valid (and, for
    /// buffers the kernel writes, unaliased) until their completions arrive.
    pub unsafe fn push(&mut self, chain: Chain) {
        self.ops_inflight += chain.len();
        if self.unqueued.is_empty() {
            if try_push(&mut self.uring, &chain) {
                return;
            }
            // SQ full: hand the kernel what is queued, then try again.
            let _ = self.enter_submit();
            if try_push(&mut self.uring, &chain) {
                return;
            }
        }
        self.unqueued.push_back(chain);
    }

    /// Moves SQEs from `unqueued` into the SQ, submitting to make room.
    fn flush_unqueued(&mut self) {
        let mut rounds = 0;
        while let Some(chain) = self.unqueued.front() {
            if try_push(&mut self.uring, chain) {
                self.unqueued.pop_front();
                continue;
            }
            if rounds == FLUSH_ROUNDS_MAX {
                break;
            }
            rounds += 1;
            if self.enter_submit().is_err() {
                break;
            }
        }
    }

    /// Submits what is queued without waiting. Errors other than transient
    /// ones are returned.
    fn enter_submit(&mut self) -> io::Result<()> {
        tolerate(self.uring.submit().map(drop))
    }

    /// Submits everything queued (unqueued included, as room allows).
    pub fn submit(&mut self) -> io::Result<()> {
        self.flush_unqueued();
        if self.uring.submission().is_empty() {
            return Ok(());
        }
        self.enter_submit()
    }

    /// Submits everything queued and waits up to `timeout` (None: forever)
    /// for at least one completion.
    ///
    /// With a non-zero `batch` shorter than the timeout, the kernel's
    /// min-wait gathers completions: the thread sleeps until
    /// [`BATCH_WAKE_CQES`] of them are ready or `batch` has passed since the
    /// call, and after that returns on the first one. A shard that slept
    /// longer than `batch` before anything came still wakes at once; a busy
    /// one wakes once per batch instead of once per completion.
    pub fn submit_and_wait(
        &mut self,
        timeout: Option<Duration>,
        batch: Duration,
    ) -> io::Result<()> {
        self.flush_unqueued();
        let batching = !batch.is_zero() && timeout.is_none_or(|t| t > batch);
        let result = match timeout {
            Some(t) if t.is_zero() => self.uring.submit(),
            _ if batching => {
                // Without a general timeout the kernel would end the wait
                // when `batch` ran out, even with nothing to report.
                let t = timeout.unwrap_or(BATCH_IDLE_TIMEOUT);
                let ts = timespec(t);
                let args = types::SubmitArgs::new()
                    .timespec(&ts)
                    .min_wait_usec(batch.as_micros().min(u32::MAX.into()) as u32);
                self.uring
                    .submitter()
                    .submit_with_args(BATCH_WAKE_CQES, &args)
            }
            Some(t) => {
                let ts = timespec(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
            None => self.uring.submit_and_wait(1),
        };
        tolerate(result.map(drop))
    }

    /// True when the kernel has min-wait (6.12), which `batch` needs.
    pub fn has_min_wait(&self) -> bool {
        self.uring.params().is_feature_min_timeout()
    }

    /// True when reaping would find something: completions in the CQ,
    /// overflowed completions, or deferred work the last reap left behind.
    ///
    /// The kernel's TASKRUN flag is not used here: it was seen to stay set
    /// with no work that posts completions, and trusting it kept the loop
    /// from ever sleeping (two cores busy holding 200k idle connections).
    /// Work added after a reap wakes us anyway: the wait ring's own work ends
    /// the wait, and another ring's signals the eventfd the wait ring reads.
    pub fn has_completions(&mut self) -> bool {
        self.maybe_more
            || !self.uring.completion().is_empty()
            || self.uring.submission().cq_overflow()
    }

    /// Appends the completions waiting in the CQ to `out`, first running
    /// deferred completion work and flushing overflowed completions into the
    /// CQ when the kernel flags either (a server that did not flush stalled).
    ///
    /// A ring without deferred work is entered only to flush an overflow:
    /// its completion work runs on the thread's way back from any system
    /// call, so its CQ is current without one (entering every data ring on
    /// every loop iteration was 4 of a shard's ~7 system calls per
    /// iteration with 200,000 held, and a shard has 26 at 1,000,000).
    pub fn reap(&mut self, out: &mut Vec<Cqe>) -> io::Result<()> {
        let (overflow, taskrun) = {
            let sq = self.uring.submission();
            (sq.cq_overflow(), sq.taskrun())
        };
        if overflow || taskrun || self.maybe_more {
            self.get_events()?;
        }
        for cqe in self.uring.completion() {
            out.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        Ok(())
    }

    /// io_uring_enter(GETEVENTS) without waiting: submits what is in the SQ,
    /// runs deferred task work and flushes the overflow list.
    ///
    /// With DEFER_TASKRUN one enter runs at most max(20, min_complete)
    /// deferred completions ([`LOCAL_WORK_PER_ENTER`]), so a plain enter
    /// posts at most 20 (a mass close crawled at 20 completions per loop
    /// iteration). When it posted that many, more may wait: a second enter
    /// asks for a CQ-full with a zero timeout, so all that fits runs in one
    /// call. That call costs about 20 us more (it arms a timer and sleeps on
    /// it), so it is made only then.
    fn get_events(&mut self) -> io::Result<()> {
        let before = self.uring.completion().len();
        let to_submit = self.uring.submission().len() as u32;
        // SAFETY: no argument pointer is passed (None); min_complete is 0,
        // so the call never waits.
        let first = unsafe {
            self.uring.submitter().enter::<libc::sigset_t>(
                to_submit,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        tolerate(first.map(drop))?;
        let cq = self.uring.completion();
        let (posted, full) = (cq.len().saturating_sub(before), cq.is_full());
        drop(cq);
        self.maybe_more = full;
        if self.taskrun != TaskRun::Defer || posted < LOCAL_WORK_PER_ENTER || full {
            return Ok(());
        }
        let want = self.uring.params().cq_entries() as usize;
        let ts = types::Timespec::new();
        let args = types::SubmitArgs::new().timespec(&ts);
        let bulk = self.uring.submitter().submit_with_args(want, &args);
        self.maybe_more = self.uring.completion().is_full();
        tolerate(bulk.map(drop))
    }
}

fn timespec(t: Duration) -> types::Timespec {
    types::Timespec::new()
        .sec(t.as_secs())
        .nsec(t.subsec_nanos())
}

/// Copies `chain` into the SQ if it fits whole (a linked pair never
/// straddles two submissions: the link would be lost).
fn try_push(uring: &mut IoUring, chain: &Chain) -> bool {
    let mut sq = uring.submission();
    // SAFETY: only chains that went through `Ring::push` get here, whose
    // caller vouched for the memory the SQEs name; they are copied as they are.
    unsafe {
        match chain {
            Chain::One(e) => sq.push(e).is_ok(),
            Chain::Linked(a, b) => sq.push_multiple(&[a.clone(), b.clone()]).is_ok(),
        }
    }
}

/// Treats the errors that only mean "try again later" as success.
fn tolerate(result: io::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) => match e.raw_os_error() {
            // The wait timed out.
            Some(libc::ETIME) => Ok(()),
            // A signal interrupted the wait.
            Some(libc::EINTR) => Ok(()),
            // CQ overflow not fully flushed, so the kernel refused new SQEs
            // for now: they stay queued and reaping flushes the overflow.
            Some(libc::EBUSY) => Ok(()),
            // The kernel could not allocate request memory: retried next time.
            Some(libc::EAGAIN) => Ok(()),
            _ => Err(e),
        },
    }
}

/// Builds a ring with the best task-running mode the kernel accepts, or a
/// plain one when `defer` is false (see [`Ring::new`]). COOP_TASKRUN is no
/// choice for such a ring either: its work does not wake a sleeping thread.
fn build(sq_entries: u32, cq_entries: u32, defer: bool) -> io::Result<(IoUring, TaskRun)> {
    let mut last = None;
    let modes: &[TaskRun] = if defer {
        &[TaskRun::Defer, TaskRun::Coop, TaskRun::Plain]
    } else {
        &[TaskRun::Plain]
    };
    for &mode in modes {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries);
        match mode {
            TaskRun::Defer => {
                builder
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }
            TaskRun::Coop => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            TaskRun::Plain => {}
        }
        match builder.build(sq_entries) {
            Ok(uring) => return Ok((uring, mode)),
            // EINVAL: a setup flag this kernel does not know; try fewer.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(with_context(e, "io_uring_setup")),
        }
    }
    Err(with_context(
        last.unwrap_or_else(|| io::ErrorKind::Unsupported.into()),
        "io_uring_setup",
    ))
}

/// `e` with what we were doing in front.
pub(super) fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;
    use std::os::fd::FromRawFd;

    fn ring(sq: u32, cq: u32) -> Option<Ring> {
        match Ring::new(sq, cq, 16, 4, 256, None) {
            Ok(r) => Some(r),
            Err(e) => {
                crate::io::uring_unavailable(&e);
                None
            }
        }
    }

    fn drain(ring: &mut Ring, want: usize) -> Vec<Cqe> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            ring.submit_and_wait(Some(Duration::from_millis(10)), Duration::ZERO)
                .unwrap();
            ring.reap(&mut out).unwrap();
            if out.len() >= want {
                break;
            }
        }
        out
    }

    /// A 2-entry SQ forces the submit-to-make-room and `unqueued` paths; no
    /// SQE is lost and order is kept.
    #[test]
    fn full_submission_queue_loses_nothing_and_keeps_order() {
        let Some(mut ring) = ring(2, 4) else { return };
        let n = 50u64;
        for i in 0..n {
            // SAFETY: NOP names no memory.
            unsafe { ring.push(Chain::One(opcode::Nop::new().build().user_data(i))) };
        }
        let got = drain(&mut ring, n as usize);
        let ids: Vec<u64> = got.iter().map(|c| c.0).collect();
        assert_eq!(ids, (0..n).collect::<Vec<_>>());
        assert_eq!(ring.unqueued_len(), 0);
    }

    /// A linked pair never straddles two submissions, even with a 2-entry SQ
    /// whose first slot is taken.
    #[test]
    fn linked_pairs_stay_together() {
        let Some(mut ring) = ring(2, 8) else { return };
        for i in 0..10u64 {
            // SAFETY: NOP names no memory.
            unsafe {
                ring.push(Chain::One(opcode::Nop::new().build().user_data(100 + i)));
                ring.push(Chain::Linked(
                    opcode::Nop::new()
                        .build()
                        .user_data(i * 2)
                        .flags(squeue::Flags::IO_LINK),
                    opcode::Nop::new().build().user_data(i * 2 + 1),
                ));
            }
        }
        let got = drain(&mut ring, 30);
        assert_eq!(got.len(), 30);
        assert!(got.iter().all(|c| c.1 == 0), "{got:?}");
    }

    /// A ring that signals an eventfd never defers its completion work
    /// (the kernel would postpone the signal, see `Ring::new`), and its
    /// completions reach the CQ without entering it: a NOP's completion is
    /// reaped and the eventfd counts it.
    #[test]
    fn ring_with_eventfd_runs_work_plainly_and_signals() {
        // SAFETY: plain eventfd(2) call; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(efd >= 0);
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let efd = unsafe { std::os::fd::OwnedFd::from_raw_fd(efd) };
        let mut ring = match Ring::new(4, 8, 16, 4, 256, Some(efd.as_raw_fd())) {
            Ok(r) => r,
            Err(e) => return crate::io::uring_unavailable(&e),
        };
        assert_eq!(ring.taskrun(), TaskRun::Plain);
        // SAFETY: NOP names no memory.
        unsafe { ring.push(Chain::One(opcode::Nop::new().build().user_data(7))) };
        ring.submit().unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out).unwrap();
        assert_eq!(out.iter().map(|c| c.0).collect::<Vec<_>>(), vec![7]);
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the eventfd we own.
        let n = unsafe { libc::read(efd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        assert!(count >= 1);
    }

    /// Completions beyond the CQ size are kept by the kernel (NODROP) and
    /// flushed when we reap.
    #[test]
    fn cq_overflow_is_flushed() {
        let Some(mut ring) = ring(4, 8) else { return };
        let n = 100u64;
        for i in 0..n {
            // SAFETY: NOP names no memory.
            unsafe { ring.push(Chain::One(opcode::Nop::new().build().user_data(i))) };
        }
        ring.submit().unwrap();
        let mut out = Vec::new();
        for _ in 0..1000 {
            ring.reap(&mut out).unwrap();
            if out.len() as u64 >= n {
                break;
            }
            ring.submit().unwrap();
        }
        assert_eq!(out.len() as u64, n);
    }
}
