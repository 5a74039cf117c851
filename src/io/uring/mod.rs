//! io_uring backend: completion I/O on direct descriptors, past the
//! open-files ceiling.
//!
//! # Rings
//! A shard owns one ring when its connection budget fits one fixed-file
//! table (at most RLIMIT_NOFILE slots), which is the case on a tuned box.
//! Otherwise it owns a control ring (ring 0) plus data rings, created on
//! demand up to `ceil(conns_max / slots) + 1`, each with its own table.
//! Ring 0 holds each listener's one multishot accept (direct descriptors,
//! kernel-allocated slots; the plaintext listener and, when configured, the
//! TLS one, told apart by the tag's key) and receives handoffs from other
//! shards. In the several-rings layout every connection that lands in ring 0
//! is moved at once with MSG_RING to the data ring with the most free slots
//! (linked with a CLOSE of its ring-0 slot), before anything is armed on it.
//!
//! The thread blocks on one ring, the wait ring: ring 0 alone, or the first
//! data ring, which carries the traffic of a small shard. The wait ring holds
//! the READ of the shard's eventfd; every other ring has the eventfd
//! registered, so a completion on any ring wakes the thread. (Blocking on
//! ring 0 put an eventfd signal, a READ and its re-arm on the path of every
//! wake-up of a small shard.)
//!
//! A table must never fill: the kernel closes the connection being accepted
//! when it does (ENFILE). Slot counts are exact (incremented by the
//! completions that install a file, decremented by those of CLOSE), moves
//! reserve their target slot, and the accept is only armed while ring 0 has
//! room for the largest burst one arming can accept (one per CQ entry, plus
//! the final one). When every data ring is full new connections are refused.
//!
//! # Receives
//! Provided-buffer rings (one group per ring, small buffers, few of them), so
//! no buffer belongs to an idle connection. Before [`Io::established`] a
//! connection has at most one single-shot receive in flight, re-armed in
//! [`Io::wait`] only if it is still here: the shard may detach it right
//! after the LOGIN it carries. After, a multishot receive stays armed and is
//! re-armed whenever a completion ends it (e.g. ENOBUFS once the buffers ran
//! dry: by then they were handed back). [`Io::next`] copies a buffer into
//! the caller's scratch and returns it to the kernel at once. Pausing
//! ([`Io::set_recv`]) cancels the multishot receive; bytes that were already
//! on their way are kept per connection and handed out after the resume.
//!
//! # Sends
//! At most one SEND in flight per connection, from a buffer the backend owns
//! while it is in flight. A short send resubmits the rest; when it drains and
//! the shard was told 0 meanwhile, [`Completion::Writable`] follows.
//!
//! # Closing and handing off
//! Close cancels everything on the slot, then CLOSEs it. The connection's
//! slab entry stays as a zombie until every completion of it has come, so a
//! key is reused only once nothing in flight names it (user_data also
//! carries a generation, checked on every completion). A handoff sends the
//! fixed file to the peer shard's ring 0 with MSG_RING (linked with a CLOSE
//! of the source slot; a failed send cancels the CLOSE and is retried a few
//! times). The arrival and the shard-level `attach` come in either order and
//! are paired by a handoff id.

mod bufs;
mod ring;
mod tag;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;

use super::{Completion, ConnId, IoGauges, IoOptions, Listener, Listeners};
use ring::{Chain, Cqe, Ring};
use tag::{Op, Tag};

/// Backend name for `show info`.
pub const BACKEND_NAME: &str = "uring";

/// Submission-queue entries per ring (a full SQ is submitted and refilled).
const SQ_ENTRIES: u32 = 1024;
/// Completion-queue entries of a data ring: large, so overflow is rare (it
/// is still flushed when it happens).
const DATA_CQ_ENTRIES: u32 = 8192;
/// Completion-queue entries of ring 0 at most. Ring 0's CQ size also bounds
/// one accept burst, hence the free slots ring 0 keeps ([`Io::accept_margin_slots`]).
const CONTROL_CQ_ENTRIES_MAX: u32 = 4096;
/// Ring 0's CQ at least, even with a tiny fixed-file table.
const CONTROL_CQ_ENTRIES_MIN: u32 = 8;
/// Bytes of one provided receive buffer.
const RECV_BUF_BYTES: u32 = 2048;
/// Receive buffers of ring 0 when it is the only ring (it carries every
/// connection's receives).
const RECV_BUFS_SINGLE_RING: u16 = 512;
/// Receive buffers of each data ring.
const RECV_BUFS_DATA_RING: u16 = 256;
/// The kernel's cap on a fixed-file table (IORING_MAX_FIXED_FILES).
const SLOTS_PER_RING_KERNEL_MAX: u64 = 1 << 20;
/// A table smaller than this leaves no room for the accept margin.
const SLOTS_PER_RING_MIN: u32 = 16;
/// Bytes taken from the shard by one [`Io::send`] at most. The backend
/// cannot see a socket's free space before the SEND runs, so it takes about
/// what a loopback socket's send buffer holds (tcp_wmem's max is 4 MiB) and
/// more: the shard's slow-reader cap then sees what it sees with poll, where
/// that much goes into the socket at once. Further sends take 0 until this
/// one is out.
const SEND_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The wait ring in the several-rings layout: the first data ring, created
/// with the backend.
const WAIT_RING_SEVERAL: usize = 1;
/// Completions in one wake from which the next wait batches (with
/// `uring_batch_wait_us`): fewer means the shard is not busy enough to gather.
const BATCH_BUSY_CQES: usize = 4;
/// Retries of a MSG_RING (move or handoff) whose target was full, spaced by
/// [`RETRY_INTERVAL`], before the connection is closed.
const MSG_RING_RETRIES_MAX: u8 = 50;
/// Pause before retrying failed MSG_RINGs.
const RETRY_INTERVAL: Duration = Duration::from_millis(2);
/// After EMFILE/ENOMEM/ENOBUFS on accept, wait this long before re-arming.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Reap rounds per ring per `wait` (each drains the CQ once); more waits in
/// the CQ for the next iteration, so one ring cannot starve the loop.
const REAP_ROUNDS_MAX: usize = 4;
/// While dropping: rounds of 1 ms spent waiting for cancelled operations.
const DROP_ROUNDS_MAX: usize = 2000;
/// `slot` of a connection whose descriptor is not (or no longer) here.
const NO_SLOT: u32 = u32::MAX;
/// Refusals logged at most once per this many.
const REFUSED_LOG_EVERY: u64 = 1024;

// Relations between the limits above, checked at compile time.
const _: () = {
    assert!(RECV_BUFS_SINGLE_RING.is_power_of_two());
    assert!(RECV_BUFS_DATA_RING.is_power_of_two());
    assert!(RECV_BUFS_SINGLE_RING <= bufs::BUFS_PER_RING_MAX);
    assert!(RECV_BUFS_DATA_RING <= bufs::BUFS_PER_RING_MAX);
    // The kernel wants CQ >= SQ.
    assert!(SQ_ENTRIES <= DATA_CQ_ENTRIES);
    assert!(CONTROL_CQ_ENTRIES_MIN <= CONTROL_CQ_ENTRIES_MAX);
    assert!(CONTROL_CQ_ENTRIES_MIN.is_power_of_two());
    assert!(CONTROL_CQ_ENTRIES_MAX.is_power_of_two());
    // Ring 0's accept margin (CQ + 1) must fit the smallest table.
    assert!(2 * CONTROL_CQ_ENTRIES_MIN < SLOTS_PER_RING_MIN + 1);
    // A send is one SQE length (u32).
    assert!(SEND_BYTES_MAX <= u32::MAX as usize);
};

/// A connection handed to another shard: the id pairing the MSG_RING
/// arrival with the shard-level attach.
#[derive(Debug)]
pub struct Detached {
    id: u64,
}

/// Wakes the ring's owner: an eventfd whose READ ring 0 keeps armed.
#[derive(Clone, Debug)]
pub struct WakeHandle(Arc<OwnedFd>);

impl WakeHandle {
    /// Interrupts the owner's `wait`. A failure is logged: a lost wake-up is
    /// recovered by the owner's next timer tick.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The counter is at its maximum: a wake-up is pending anyway.
                Some(libc::EAGAIN) => {}
                _ => log::warn!("wake failed: {e}"),
            }
        }
    }
}

/// What other shards need to hand connections over: ring 0's file.
///
/// Lifetime: this holds a duplicate of the ring's descriptor, so the ring's
/// file stays open for as long as any shard holds this, even when its owner
/// has already stopped (shards stop at different times). A MSG_RING sent to
/// a stopped shard then fails cleanly (EOWNERDEAD) or lands in a table that
/// is released with the ring, and never reaches a reused fd number.
#[derive(Clone, Debug)]
pub struct PeerInfo(Arc<OwnedFd>);

impl PeerInfo {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Attached; the descriptor has not arrived from the other shard.
    AwaitingFd,
    /// In ring 0, MSG_RING to data ring `dst_ring` in flight.
    Moving,
    /// In its ring; receives and sends may run.
    Live,
    /// MSG_RING to another shard in flight. Zombie: the shard let go of it.
    Detaching,
    /// Cancel and CLOSE submitted (or nothing to close). Zombie, freed once
    /// its last operation completed.
    Closing,
}

/// Connection flags.
mod flag {
    /// The shard holds the ConnId (accepted and reported, or attached).
    pub const VISIBLE: u32 = 1 << 0;
    /// Came from the listener: report Accepted once it is live.
    pub const FROM_ACCEPT: u32 = 1 << 1;
    /// Logged in and staying: multishot receives.
    pub const ESTABLISHED: u32 = 1 << 2;
    /// The shard asked for no more bytes for now.
    pub const PAUSED: u32 = 1 << 3;
    /// A receive is in flight.
    pub const RECV_ARMED: u32 = 1 << 4;
    /// The receive in flight is multishot.
    pub const RECV_MULTI: u32 = 1 << 5;
    /// A cancel of the receive in flight was submitted (pause).
    pub const RECV_CANCELLING: u32 = 1 << 6;
    /// Queued in `Io::rearm`.
    pub const REARM_QUEUED: u32 = 1 << 7;
    /// A SEND is in flight.
    pub const SEND_INFLIGHT: u32 = 1 << 8;
    /// `send` returned less than asked: report Writable when room comes.
    pub const WANT_WRITE: u32 = 1 << 9;
    /// shutdown_write was asked; SHUTDOWN goes after the send in flight.
    pub const SHUT_WR_PENDING: u32 = 1 << 10;
    /// The peer closed or the connection failed; Closed reported or pending.
    pub const PEER_CLOSED: u32 = 1 << 11;
    /// Closed was handed to the shard.
    pub const CLOSED_REPORTED: u32 = 1 << 12;
    /// The shard closed it while it was moving; close it where it lands.
    pub const CLOSE_REQUESTED: u32 = 1 << 13;
    /// A send failed: further sends fail.
    pub const BROKEN: u32 = 1 << 14;
    /// Accepted from the TLS listener (kept for the connection's life).
    pub const FROM_TLS: u32 = 1 << 15;
}

/// Bytes taken by `send`, owned here while the kernel reads them.
struct SendBuf {
    bytes: Vec<u8>,
    /// Bytes already sent, `0..bytes.len()`.
    sent: usize,
}

/// One connection. Kept small: an idle connection costs this plus its slab
/// slot (no buffers).
struct Conn {
    /// Generation of this slab key, `1..=GEN_MASK`.
    gen: u32,
    /// Fixed-file slot in `ring`, or `NO_SLOT`.
    slot: u32,
    /// The ring holding `slot`.
    ring: u16,
    /// `Moving`: the data ring the descriptor is on its way to.
    dst_ring: u16,
    state: State,
    /// MSG_RING retries so far (moves and handoffs).
    retries: u8,
    /// Operations submitted for this connection whose final CQE has not come.
    ops: u16,
    flags: u32,
    /// The send in flight.
    out: Option<Box<SendBuf>>,
    /// Bytes received while paused (or after a short scratch), in order;
    /// never `Some` and empty. Boxed: 8 bytes on an idle connection, not 24.
    #[allow(clippy::box_collection)]
    held: Option<Box<Vec<u8>>>,
}

impl Conn {
    fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }
    fn set(&mut self, f: u32) {
        self.flags |= f;
    }
    fn clear(&mut self, f: u32) {
        self.flags &= !f;
    }
}

/// What `next` hands out, in arrival order.
#[derive(Clone, Copy, Debug)]
enum Event {
    Accepted(u32, u32),
    /// Buffer `bid` of ring `ring` holds `len` bytes for connection (key, gen).
    Data {
        key: u32,
        gen: u32,
        ring: u16,
        bid: u16,
        len: u32,
    },
    /// The connection's held bytes can be handed out.
    Held(u32, u32),
    Writable(u32, u32),
    Closed(u32, u32),
    Woken,
}

/// The target side of a handoff, keyed by handoff id.
#[derive(Clone, Copy, Debug)]
enum HandoffIn {
    /// The descriptor arrived in ring 0's `slot`; attach has not come.
    Arrived { slot: u32 },
    /// Attached as connection (key, gen); the descriptor has not arrived.
    Attached { key: u32, gen: u32 },
    /// Attached and closed before the descriptor arrived: close it on arrival.
    Abandoned,
    /// The source gave up; attach must report the connection closed.
    Failed,
}

/// The source side of a handoff in flight.
#[derive(Clone, Copy, Debug)]
struct HandoffOut {
    dst: usize,
    id: u64,
}

/// One listener's multishot accept.
#[derive(Default)]
struct Accept {
    armed: bool,
    cancelling: bool,
    /// Re-arm no earlier than this (after a resource error).
    retry_at: Option<Instant>,
}

/// The io_uring backend of one shard.
pub struct Io {
    shard: usize,
    /// `[0]` is the control ring (the only one in the one-ring layout).
    rings: Vec<Ring>,
    /// How long completions may gather before a busy wait returns (zero: off).
    batch_wait: Duration,
    /// Completions the last `wait` reaped: batching starts at [`BATCH_BUSY_CQES`].
    last_reaped: usize,
    /// Data rings this shard may create; 0 in the one-ring layout.
    data_rings_max: usize,
    /// Slots in each ring's fixed-file table.
    slots_per_ring: u32,
    /// Ring 0 arms the accepts only with at least this many free slots
    /// (one burst per listener).
    accept_margin_slots: u32,
    /// The listeners by [`Listener::index`]; `None` when not configured or
    /// after `stop_accepting`.
    listeners: [Option<TcpListener>; 2],
    /// Each listener's multishot accept, by [`Listener::index`].
    accept: [Accept; 2],
    wake: WakeHandle,
    /// The eventfd READ lands here (kept at a stable address while in flight).
    wake_buf: Box<u64>,
    wake_armed: bool,
    me: PeerInfo,
    peers: Vec<PeerInfo>,
    conns: Slab<Conn>,
    /// Connections the shard holds (`conn_count`).
    visible: usize,
    next_gen: u32,
    events: VecDeque<Event>,
    /// Connections whose receive `wait` should (re-)arm.
    rearm: Vec<u32>,
    /// Connections whose failed MSG_RING `wait` should retry, with their gen.
    retry: Vec<(u32, u32)>,
    retry_at: Option<Instant>,
    handoffs_in: HashMap<u64, HandoffIn>,
    handoffs_out: HashMap<u32, HandoffOut>,
    /// Low 40 bits of the next handoff id (the shard id is above).
    handoff_seq: u64,
    cqes: Vec<Cqe>,
    refused: u64,
    /// Multishot receives ended by ENOBUFS (for [`Io::gauges`]).
    recv_no_buffers: u64,
}

impl Io {
    /// Creates the backend around a bound, listening socket. Call it on the
    /// shard's thread: the rings are single-issuer. Fails with a clear error
    /// when the kernel lacks something we need.
    pub fn new(listeners: Listeners, options: &IoOptions) -> io::Result<Io> {
        check_kernel()?;
        let mut slots = nofile_limit()?.min(SLOTS_PER_RING_KERNEL_MAX);
        if options.ring_slots_max > 0 {
            slots = slots.min(options.ring_slots_max as u64);
        }
        let slots = slots as u32;
        if slots < SLOTS_PER_RING_MIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fixed-file tables of {slots} slots are too small (RLIMIT_NOFILE?)"),
            ));
        }
        let listeners = listeners.into_array();
        let listener_count = listeners.iter().flatten().count() as u32;
        // Ring 0's CQ bounds one accept burst; the bursts of all listeners
        // together take at most half the table.
        let control_cq = prev_power_of_two(slots / (2 * listener_count))
            .clamp(CONTROL_CQ_ENTRIES_MIN, CONTROL_CQ_ENTRIES_MAX);
        let accept_margin_slots = listener_count * (control_cq + 1);
        if accept_margin_slots > slots {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fixed-file tables of {slots} slots are too small for {listener_count} listeners (RLIMIT_NOFILE?)"),
            ));
        }
        let conns_max = options.conns_max.max(1) as u64;
        let one_ring = conns_max + accept_margin_slots as u64 <= slots as u64;
        let data_rings_max = if one_ring {
            0
        } else {
            // One spare: handoffs bring more than a shard's share, and closing
            // connections hold their slots for a moment.
            (conns_max.div_ceil(slots as u64) as usize + 1).min(tag::RINGS_MAX - 1)
        };

        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(ring::with_context(io::Error::last_os_error(), "eventfd"));
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let bufs = if one_ring { RECV_BUFS_SINGLE_RING } else { 0 };
        let ring0 = Ring::new(
            SQ_ENTRIES.min(control_cq),
            control_cq,
            slots,
            bufs,
            RECV_BUF_BYTES,
            (!one_ring).then(|| efd.as_raw_fd()),
        )?;
        probe(&ring0)?;
        let batch_wait = if options.batch_wait.is_zero() || ring0.has_min_wait() {
            options.batch_wait
        } else {
            if options.shard == 0 {
                log::warn!("uring_batch_wait_us ignored: this kernel has no io_uring min-wait (Linux 6.12+)");
            }
            Duration::ZERO
        };
        for listener in listeners.iter().flatten() {
            set_nodelay(listener);
        }
        // SAFETY: plain syscall on the ring's live descriptor; checked below.
        let dup = unsafe { libc::fcntl(ring0.fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(ring::with_context(
                io::Error::last_os_error(),
                "dup ring fd",
            ));
        }
        // SAFETY: `dup` is a fresh descriptor nobody else owns.
        let me = PeerInfo(Arc::new(unsafe { OwnedFd::from_raw_fd(dup) }));
        if options.shard == 0 {
            log::info!(
                "io_uring: {:?} task running, {} slots per ring, {}",
                ring0.taskrun(),
                slots,
                if one_ring {
                    "one ring per shard".to_string()
                } else {
                    format!("up to {data_rings_max} data rings per shard")
                }
            );
        }
        let mut io = Io {
            shard: options.shard,
            rings: vec![ring0],
            batch_wait,
            last_reaped: 0,
            data_rings_max,
            slots_per_ring: slots,
            accept_margin_slots,
            listeners,
            accept: Default::default(),
            wake: WakeHandle(Arc::new(efd)),
            wake_buf: Box::new(0),
            wake_armed: false,
            me,
            peers: Vec::new(),
            conns: Slab::new(),
            visible: 0,
            next_gen: 1,
            events: VecDeque::new(),
            rearm: Vec::new(),
            retry: Vec::new(),
            retry_at: None,
            handoffs_in: HashMap::new(),
            handoffs_out: HashMap::new(),
            handoff_seq: 0,
            cqes: Vec::new(),
            refused: 0,
            recv_no_buffers: 0,
        };
        if !one_ring {
            // One data ring up front: fail now rather than on the first accept.
            io.add_data_ring()?;
        }
        Ok(io)
    }

    /// A handle other threads use to wake this backend.
    pub fn wake_handle(&self) -> WakeHandle {
        self.wake.clone()
    }

    /// What other shards need to hand connections to this one.
    pub fn peer_info(&self) -> PeerInfo {
        self.me.clone()
    }

    /// Every shard's [`PeerInfo`], index = shard id.
    pub fn set_peers(&mut self, peers: Vec<PeerInfo>) {
        self.peers = peers;
    }

    /// Rings, fixed-file slots and receive-buffer shortages, for the stats socket.
    pub fn gauges(&self) -> IoGauges {
        IoGauges {
            rings: self.rings.len() as u64,
            slots_used: self.rings.iter().map(|r| u64::from(r.slots_used)).sum(),
            slots_total: self.rings.iter().map(|r| u64::from(r.slots_total)).sum(),
            recv_no_buffers: self.recv_no_buffers,
        }
    }

    /// Open connections the shard holds.
    pub fn conn_count(&self) -> usize {
        self.visible
    }

    // ---- the loop ------------------------------------------------------

    /// Arms what this iteration left to arm, submits every ring, blocks on
    /// ring 0 until a completion or `timeout`, then reaps every ring.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.prepare();
        let w = self.wait_ring();
        for r in (0..self.rings.len()).filter(|&r| r != w) {
            self.rings[r].submit()?;
        }
        let now = Instant::now();
        let mut timeout = timeout;
        let mut clamp = |until: Option<Instant>| {
            if let Some(at) = until {
                let left = at.saturating_duration_since(now);
                timeout = Some(timeout.map_or(left, |t| t.min(left)));
            }
        };
        for i in 0..self.listeners.len() {
            if self.listeners[i].is_some() && !self.accept[i].armed {
                clamp(self.accept[i].retry_at);
            }
        }
        if !self.retry.is_empty() {
            clamp(self.retry_at.or(Some(now)));
        }
        // Sleep only with nothing to hand out, reap or submit.
        let ready = !self.events.is_empty()
            || self
                .rings
                .iter_mut()
                .any(|r| r.has_completions() || r.unqueued_len() > 0);
        if ready {
            timeout = Some(Duration::ZERO);
        }
        // Batch only after a busy wake: a quiet shard would pay the
        // min-wait timer on every wait and gather nothing.
        let batch = if self.last_reaped >= BATCH_BUSY_CQES {
            self.batch_wait
        } else {
            Duration::ZERO
        };
        self.rings[w].submit_and_wait(timeout, batch)?;
        self.last_reaped = 0;
        for r in 0..self.rings.len() {
            self.last_reaped += self.reap(r)?;
        }
        Ok(())
    }

    /// Handles up to [`REAP_ROUNDS_MAX`] CQ-fulls of ring `r`; returns how
    /// many completions it handled.
    fn reap(&mut self, r: usize) -> io::Result<usize> {
        let mut handled = 0;
        for _ in 0..REAP_ROUNDS_MAX {
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.clear();
            let reaped = self.rings[r].reap(&mut cqes);
            for &(user_data, res, flags) in &cqes {
                self.on_cqe(r, user_data, res, flags);
            }
            let empty = cqes.is_empty();
            handled += cqes.len();
            self.cqes = cqes;
            reaped?;
            if empty {
                break;
            }
        }
        Ok(handled)
    }

    /// Queues the submissions left for this iteration: the eventfd READ, the
    /// accept (or its pause), MSG_RING retries and receive (re-)arms.
    fn prepare(&mut self) {
        if !self.wake_armed {
            self.arm_wake_read();
        }
        self.check_accept();
        if !self.retry.is_empty() && self.retry_at.is_none_or(|at| Instant::now() >= at) {
            self.retry_at = None;
            for (key, gen) in std::mem::take(&mut self.retry) {
                self.retry_msg_ring(key, gen);
            }
        }
        for key in std::mem::take(&mut self.rearm) {
            let Some(c) = self.conns.get_mut(key as usize) else {
                continue;
            };
            c.clear(flag::REARM_QUEUED);
            let wanted = c.state == State::Live
                && c.has(flag::VISIBLE)
                && !c.has(
                    flag::RECV_ARMED | flag::PAUSED | flag::PEER_CLOSED | flag::CLOSE_REQUESTED,
                )
                && c.held.is_none();
            if wanted {
                self.arm_recv(key);
            }
        }
    }

    /// Hands out the next completion, copying received bytes into `scratch`.
    /// `None` when this iteration's work is done.
    pub fn next(&mut self, scratch: &mut [u8]) -> Option<Completion> {
        while let Some(event) = self.events.pop_front() {
            match event {
                Event::Woken => return Some(Completion::Woken),
                Event::Accepted(key, gen) => {
                    if let Some(c) = self.visible_conn(key, gen) {
                        let which = if c.has(flag::FROM_TLS) {
                            Listener::Tls
                        } else {
                            Listener::Plain
                        };
                        return Some(Completion::Accepted(ConnId(key), which));
                    }
                }
                Event::Writable(key, gen) => {
                    if self
                        .visible_conn(key, gen)
                        .is_some_and(|c| !c.has(flag::BROKEN | flag::CLOSED_REPORTED))
                    {
                        return Some(Completion::Writable(ConnId(key)));
                    }
                }
                Event::Closed(key, gen) => {
                    let Some(c) = self.visible_conn(key, gen) else {
                        continue;
                    };
                    if c.has(flag::CLOSED_REPORTED) {
                        continue;
                    }
                    c.set(flag::PEER_CLOSED);
                    if c.has(flag::PAUSED) || c.held.is_some() {
                        continue; // reported after the held bytes, on resume
                    }
                    c.set(flag::CLOSED_REPORTED);
                    return Some(Completion::Closed(ConnId(key)));
                }
                Event::Data {
                    key,
                    gen,
                    ring,
                    bid,
                    len,
                } => {
                    if let Some(n) = self.hand_out(key, gen, ring, bid, len as usize, scratch) {
                        return Some(Completion::Recv(ConnId(key), n));
                    }
                }
                Event::Held(key, gen) => {
                    if let Some(n) = self.hand_out_held(key, gen, scratch) {
                        return Some(Completion::Recv(ConnId(key), n));
                    }
                }
            }
        }
        None
    }

    /// Copies one buffer (and the buffers of the same connection right
    /// behind it, as they fit) into `scratch`, giving each back to the
    /// kernel at once. `None` when nothing is handed out now (stale, or kept
    /// in `held` while paused).
    fn hand_out(
        &mut self,
        key: u32,
        gen: u32,
        ring: u16,
        bid: u16,
        len: usize,
        scratch: &mut [u8],
    ) -> Option<usize> {
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.gen == gen && c.has(flag::VISIBLE) && c.state == State::Live)
        else {
            self.recycle(ring, bid);
            return None;
        };
        let bufs = self.rings[ring as usize]
            .bufs
            .as_mut()
            .expect("data came from a ring with buffers");
        let bytes = bufs.bytes(bid, len);
        if c.has(flag::PAUSED) || c.held.is_some() || len > scratch.len() {
            let held = c.held.get_or_insert_with(Box::default);
            held.extend_from_slice(bytes);
            bufs.recycle(bid);
            if !c.has(flag::PAUSED) {
                // Only a scratch smaller than one buffer gets here unpaused.
                self.events.push_front(Event::Held(key, gen));
            }
            return None;
        }
        scratch[..len].copy_from_slice(bytes);
        bufs.recycle(bid);
        let mut n = len;
        while let Some(&Event::Data {
            key: k,
            gen: g,
            ring: r,
            bid: b,
            len: l,
        }) = self.events.front()
        {
            let l = l as usize;
            if k != key || g != gen || n + l > scratch.len() {
                break;
            }
            self.events.pop_front();
            let bufs = self.rings[r as usize]
                .bufs
                .as_mut()
                .expect("data came from a ring with buffers");
            scratch[n..n + l].copy_from_slice(bufs.bytes(b, l));
            bufs.recycle(b);
            n += l;
        }
        if !c.has(flag::ESTABLISHED) {
            // Single-shot: the next receive is armed in `wait`, once the
            // shard handled these bytes (and perhaps detached the connection).
            self.queue_rearm(key);
        }
        Some(n)
    }

    /// Copies held bytes into `scratch`; when they are all out, reports a
    /// pending close or re-arms the receive.
    fn hand_out_held(&mut self, key: u32, gen: u32, scratch: &mut [u8]) -> Option<usize> {
        let c = self.visible_conn(key, gen)?;
        if c.has(flag::PAUSED) || scratch.is_empty() {
            return None;
        }
        let held = c.held.as_mut()?;
        let n = held.len().min(scratch.len());
        scratch[..n].copy_from_slice(&held[..n]);
        held.drain(..n);
        if held.is_empty() {
            c.held = None;
            if c.has(flag::PEER_CLOSED) {
                self.events.push_front(Event::Closed(key, gen));
            } else {
                self.queue_rearm(key);
            }
        } else {
            self.events.push_front(Event::Held(key, gen));
        }
        (n > 0).then_some(n)
    }

    // ---- the shard's calls ---------------------------------------------

    /// Takes up to [`SEND_BYTES_MAX`] of `bytes` into a SEND; 0 while one is
    /// already in flight or the descriptor has not arrived (Writable follows).
    pub fn send(&mut self, conn: ConnId, bytes: &[u8]) -> io::Result<usize> {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if c.has(flag::BROKEN) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if bytes.is_empty() {
            return Ok(0);
        }
        if c.state != State::Live || c.has(flag::SEND_INFLIGHT) || c.out.is_some() {
            c.set(flag::WANT_WRITE);
            return Ok(0);
        }
        let n = bytes.len().min(SEND_BYTES_MAX);
        c.out = Some(Box::new(SendBuf {
            bytes: bytes[..n].to_vec(),
            sent: 0,
        }));
        if n < bytes.len() {
            c.set(flag::WANT_WRITE);
        }
        self.submit_send(key);
        Ok(n)
    }

    /// Stops (`false`) or resumes (`true`) handing out bytes of `conn`.
    pub fn set_recv(&mut self, conn: ConnId, on: bool) {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return;
        };
        let gen = c.gen;
        if !on {
            if c.has(flag::PAUSED) {
                return;
            }
            c.set(flag::PAUSED);
            // A single-shot receive ends by itself (its bytes go to `held`);
            // a multishot one is cancelled.
            if c.has(flag::RECV_ARMED) && c.has(flag::RECV_MULTI) && !c.has(flag::RECV_CANCELLING) {
                c.set(flag::RECV_CANCELLING);
                let recv = Tag::new(Op::Recv, c.ring as usize, key, gen).encode();
                self.push_conn_op(key, opcode::AsyncCancel::new(recv).build(), Op::Cancel);
            }
            return;
        }
        if !c.has(flag::PAUSED) {
            return;
        }
        c.clear(flag::PAUSED);
        if c.held.is_some() {
            self.events.push_back(Event::Held(key, gen));
        } else if c.has(flag::PEER_CLOSED) && !c.has(flag::CLOSED_REPORTED) {
            self.events.push_back(Event::Closed(key, gen));
        } else {
            self.queue_rearm(key);
        }
    }

    /// `conn` is logged in here and stays: from now on its receive is multishot.
    pub fn established(&mut self, conn: ConnId) {
        let key = conn.0;
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.set(flag::ESTABLISHED);
            self.queue_rearm(key);
        }
    }

    /// Half-closes the sending side once the send in flight is out.
    pub fn shutdown_write(&mut self, conn: ConnId) {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return;
        };
        if c.state == State::Live && !c.has(flag::SEND_INFLIGHT) {
            self.submit_shutdown(key);
        } else {
            c.set(flag::SHUT_WR_PENDING);
        }
    }

    /// Closes the connection: its ConnId is the shard's no more.
    pub fn close(&mut self, conn: ConnId) {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return;
        };
        c.clear(flag::VISIBLE);
        c.held = None;
        let gen = c.gen;
        self.visible -= 1;
        match c.state {
            State::Live => self.start_close(key),
            State::Moving => c.set(flag::CLOSE_REQUESTED),
            State::AwaitingFd => {
                let id = self.handoffs_in.iter().find_map(|(id, h)| match *h {
                    HandoffIn::Attached { key: k, gen: g } if k == key && g == gen => Some(*id),
                    _ => None,
                });
                if let Some(id) = id {
                    self.handoffs_in.insert(id, HandoffIn::Abandoned);
                }
                c.state = State::Closing;
                self.maybe_free(key);
            }
            State::Detaching | State::Closing => unreachable!("a zombie is never visible"),
        }
    }

    /// Sends `conn`'s descriptor to shard `dst` (MSG_RING into its ring 0).
    /// The connection must have no receive in flight: it is not established.
    pub fn detach(&mut self, conn: ConnId, dst: usize) -> io::Result<Detached> {
        let key = conn.0;
        if dst == self.shard || dst >= self.peers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot hand off to shard {dst}"),
            ));
        }
        let c = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
            .ok_or(io::ErrorKind::NotConnected)?;
        let busy =
            c.has(flag::RECV_ARMED | flag::SEND_INFLIGHT) || c.out.is_some() || c.held.is_some();
        if c.state != State::Live || busy {
            // Not a state the shard detaches in; closing is the safe answer
            // (a receive in flight could swallow bytes of the moving session).
            debug_assert!(false, "detach of a busy connection");
            self.close(conn);
            return Err(io::Error::other(
                "connection busy or not here; closed instead of handed off",
            ));
        }
        c.clear(flag::VISIBLE);
        c.state = State::Detaching;
        c.retries = 0;
        self.visible -= 1;
        let id = ((self.shard as u64) << 40) | (self.handoff_seq & ((1 << 40) - 1));
        self.handoff_seq += 1;
        debug_assert!(id < tag::HANDOFF_ID_LIMIT);
        self.handoffs_out.insert(key, HandoffOut { dst, id });
        self.submit_handoff(key);
        Ok(Detached { id })
    }

    /// Adopts a connection detached by another shard; its descriptor may
    /// have arrived already or come later (sends wait until then).
    pub fn attach(&mut self, detached: Detached) -> io::Result<ConnId> {
        let id = detached.id;
        match self.handoffs_in.remove(&id) {
            Some(HandoffIn::Arrived { slot }) => {
                let key = self.new_conn(0, slot, flag::VISIBLE, State::AwaitingFd);
                self.visible += 1;
                self.make_home(key);
                Ok(ConnId(key))
            }
            Some(HandoffIn::Failed) => {
                let key =
                    self.new_conn(0, NO_SLOT, flag::VISIBLE | flag::BROKEN, State::AwaitingFd);
                self.visible += 1;
                let gen = self.conns[key as usize].gen;
                self.events.push_back(Event::Closed(key, gen));
                Ok(ConnId(key))
            }
            None => {
                let key = self.new_conn(0, NO_SLOT, flag::VISIBLE, State::AwaitingFd);
                self.visible += 1;
                let gen = self.conns[key as usize].gen;
                self.handoffs_in
                    .insert(id, HandoffIn::Attached { key, gen });
                Ok(ConnId(key))
            }
            Some(other) => {
                self.handoffs_in.insert(id, other);
                Err(io::Error::other(format!("handoff {id:#x} attached twice")))
            }
        }
    }

    /// Stops accepting: cancels the accepts and closes the listeners.
    pub fn stop_accepting(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].take().is_some()
                && self.accept[i].armed
                && !self.accept[i].cancelling
            {
                self.cancel_accept(i);
            }
        }
    }

    // ---- submissions ---------------------------------------------------

    /// Queues an SQE about connection `key` on its ring, tagged `op`.
    fn push_conn_op(&mut self, key: u32, entry: squeue::Entry, op: Op) {
        let c = &mut self.conns[key as usize];
        c.ops += 1;
        let ring = c.ring as usize;
        let entry = entry.user_data(Tag::new(op, ring, key, c.gen).encode());
        // SAFETY: callers pass entries naming no memory, or (SEND) a buffer
        // owned by the connection's `out`, which is kept until the SEND's
        // final completion (zombies keep it too).
        unsafe { self.rings[ring].push(Chain::One(entry)) };
    }

    fn arm_wake_read(&mut self) {
        let w = self.wait_ring();
        let entry = opcode::Read::new(
            types::Fd(self.wake.0.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(Tag::ring(Op::WakeRead, w).encode());
        // SAFETY: `wake_buf` is a Box owned by `self`, not read while the
        // READ is in flight, and freed only after `Drop` quiesced the rings.
        unsafe { self.rings[w].push(Chain::One(entry)) };
        self.wake_armed = true;
    }

    /// Arms, pauses (by cancelling) or leaves each listener's multishot
    /// accept, by ring 0's free slots: one arming may accept up to a CQ-full
    /// of connections, and the margin holds one such burst per listener.
    fn check_accept(&mut self) {
        for i in 0..self.listeners.len() {
            self.check_accept_of(i);
        }
    }

    fn check_accept_of(&mut self, i: usize) {
        let Some(listener) = self.listeners[i].as_ref() else {
            return;
        };
        let free = self.rings[0].slots_free();
        let accept = &mut self.accept[i];
        if accept.armed {
            if free < self.accept_margin_slots && !accept.cancelling {
                self.cancel_accept(i);
            }
            return;
        }
        if free < self.accept_margin_slots || accept.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        accept.retry_at = None;
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(accept_tag(i));
        // SAFETY: the accept names no memory (no address out-parameters).
        unsafe { self.rings[0].push(Chain::One(entry)) };
        self.accept[i].armed = true;
    }

    fn cancel_accept(&mut self, i: usize) {
        let entry = opcode::AsyncCancel::new(accept_tag(i))
            .build()
            .user_data(Tag::ring(Op::Misc, 0).encode());
        // SAFETY: a cancel names no memory.
        unsafe { self.rings[0].push(Chain::One(entry)) };
        self.accept[i].cancelling = true;
    }

    /// Arms the connection's receive: multishot once established, else one
    /// single-shot receive.
    fn arm_recv(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        debug_assert_eq!(c.state, State::Live);
        let ring = c.ring as usize;
        let Some(bufs) = self.rings[ring].bufs.as_ref() else {
            // Only a connection that could not leave ring 0 is here, and it
            // was reported closed: nothing to receive.
            debug_assert!(false, "receive armed on a ring without buffers");
            return;
        };
        let fd = types::Fixed(c.slot);
        let multi = c.has(flag::ESTABLISHED);
        let entry = if multi {
            opcode::RecvMulti::new(fd, bufs.bgid()).build()
        } else {
            opcode::Recv::new(fd, std::ptr::null_mut(), bufs.buf_bytes())
                .buf_group(bufs.bgid())
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        };
        c.set(flag::RECV_ARMED);
        if multi {
            c.set(flag::RECV_MULTI);
        } else {
            c.clear(flag::RECV_MULTI);
        }
        // Receives name no memory of ours: the kernel picks a provided buffer.
        self.push_conn_op(key, entry, Op::Recv);
    }

    fn queue_rearm(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            if !c.has(flag::REARM_QUEUED) {
                c.set(flag::REARM_QUEUED);
                self.rearm.push(key);
            }
        }
    }

    fn submit_send(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let out = c.out.as_ref().expect("send with a buffer");
        let rest = &out.bytes[out.sent..];
        let entry = opcode::Send::new(types::Fixed(c.slot), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        c.set(flag::SEND_INFLIGHT);
        // The buffer is `c.out`, kept until this SEND's completion.
        self.push_conn_op(key, entry, Op::Send);
    }

    fn submit_shutdown(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.clear(flag::SHUT_WR_PENDING);
        let entry = opcode::Shutdown::new(types::Fixed(c.slot), libc::SHUT_WR).build();
        self.push_conn_op(key, entry, Op::Shutdown);
    }

    /// Cancels the connection's receive and send, then CLOSEs its slot; the
    /// cancels go first in the ring's order. The slot is reused only after
    /// the CLOSE. A SHUTDOWN in flight is left to finish (it runs in the
    /// kernel's worker pool and completes by itself).
    ///
    /// Cancels name the operations by user_data, not the slot: the kernel
    /// matches a cancel by file by walking every armed request of the ring,
    /// which made closing n idle connections cost O(n^2) (33k connections
    /// took 20 s to close at shutdown).
    fn start_close(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.state = State::Closing;
        c.held = None;
        if c.slot == NO_SLOT {
            self.maybe_free(key);
            return;
        }
        let (ring, gen, slot) = (c.ring as usize, c.gen, c.slot);
        let mut cancels = Vec::new();
        if c.has(flag::RECV_ARMED) && !c.has(flag::RECV_CANCELLING) {
            c.set(flag::RECV_CANCELLING);
            cancels.push(Tag::new(Op::Recv, ring, key, gen).encode());
        }
        if c.has(flag::SEND_INFLIGHT) {
            cancels.push(Tag::new(Op::Send, ring, key, gen).encode());
        }
        for target in cancels {
            self.push_conn_op(key, opcode::AsyncCancel::new(target).build(), Op::Cancel);
        }
        self.push_conn_op(
            key,
            opcode::Close::new(types::Fixed(slot)).build(),
            Op::Close,
        );
    }

    /// CLOSEs a slot that has no connection.
    fn close_raw(&mut self, ring: usize, slot: u32) {
        let entry = opcode::Close::new(types::Fixed(slot))
            .build()
            .user_data(Tag::new(Op::CloseRaw, ring, slot, 0).encode());
        // SAFETY: CLOSE names no memory.
        unsafe { self.rings[ring].push(Chain::One(entry)) };
    }

    /// Pushes MSG_RING(send fd) of the connection's slot, linked with a CLOSE
    /// of that slot (cancelled by the kernel if the MSG_RING fails).
    fn push_msg_ring(&mut self, key: u32, target_fd: RawFd, target_user_data: u64, op: Op) {
        let c = &mut self.conns[key as usize];
        let ring = c.ring as usize;
        let msg = opcode::MsgRingSendFd::new(
            types::Fd(target_fd),
            types::Fixed(c.slot),
            types::DestinationSlot::auto_target(),
            target_user_data,
        )
        .build()
        .user_data(Tag::new(op, ring, key, c.gen).encode())
        .flags(squeue::Flags::IO_LINK);
        let close = opcode::Close::new(types::Fixed(c.slot))
            .build()
            .user_data(Tag::new(Op::SourceClose, ring, key, c.gen).encode());
        c.ops += 2;
        // SAFETY: MSG_RING and CLOSE name no memory; `target_fd` is a ring
        // of ours or a peer's ring kept open by the `PeerInfo` we hold.
        unsafe { self.rings[ring].push(Chain::Linked(msg, close)) };
    }

    fn submit_handoff(&mut self, key: u32) {
        let h = self.handoffs_out[&key];
        let target = self.peers[h.dst].fd();
        self.push_msg_ring(
            key,
            target,
            tag::id_tag(Op::HandoffIn, h.id),
            Op::HandoffOut,
        );
    }

    /// Starts moving a connection from ring 0 to data ring `k`.
    fn start_move(&mut self, key: u32, k: usize) {
        let c = &mut self.conns[key as usize];
        debug_assert_eq!(c.ring, 0);
        c.state = State::Moving;
        c.dst_ring = k as u16;
        let gen = c.gen;
        self.rings[k].slots_reserved += 1;
        let target = self.rings[k].fd();
        let arrive = Tag::new(Op::Arrive, k, key, gen).encode();
        self.push_msg_ring(key, target, arrive, Op::Move);
    }

    // ---- connections ---------------------------------------------------

    fn new_conn(&mut self, ring: usize, slot: u32, flags: u32, state: State) -> u32 {
        let gen = self.next_gen;
        self.next_gen = if self.next_gen >= tag::GEN_MASK {
            1
        } else {
            self.next_gen + 1
        };
        let key = self.conns.insert(Conn {
            gen,
            slot,
            ring: ring as u16,
            dst_ring: 0,
            state,
            retries: 0,
            ops: 0,
            flags,
            out: None,
            held: None,
        });
        u32::try_from(key).expect("fewer than 2^32 connections")
    }

    fn visible_conn(&mut self, key: u32, gen: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(key as usize)
            .filter(|c| c.gen == gen && c.has(flag::VISIBLE))
    }

    /// Frees a zombie whose last operation completed.
    fn maybe_free(&mut self, key: u32) {
        if let Some(c) = self.conns.get(key as usize) {
            if c.state == State::Closing && c.ops == 0 && c.slot == NO_SLOT {
                self.conns.remove(key as usize);
            }
        }
    }

    /// A connection whose descriptor is in ring 0 goes where it will live:
    /// stays (one ring) or moves to the data ring with the most free slots.
    fn make_home(&mut self, key: u32) {
        if self.data_rings_max == 0 {
            self.on_live(key);
            return;
        }
        match self.pick_data_ring() {
            Some(k) => self.start_move(key, k),
            None => self.give_up_move(key),
        }
    }

    /// The data ring with the most free slots, creating one if all are full
    /// and the budget allows.
    fn pick_data_ring(&mut self) -> Option<usize> {
        let best = (1..self.rings.len())
            .filter(|&r| self.rings[r].slots_free() > 0)
            .max_by_key(|&r| self.rings[r].slots_free());
        if best.is_some() {
            return best;
        }
        if self.rings.len() > self.data_rings_max {
            return None;
        }
        match self.add_data_ring() {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("shard {}: cannot create a data ring: {e}", self.shard);
                None
            }
        }
    }

    /// The ring the thread blocks on (see the module docs).
    fn wait_ring(&self) -> usize {
        if self.data_rings_max == 0 {
            0
        } else {
            WAIT_RING_SEVERAL
        }
    }

    fn add_data_ring(&mut self) -> io::Result<usize> {
        let r = self.rings.len();
        debug_assert!(r < tag::RINGS_MAX);
        let ring = Ring::new(
            SQ_ENTRIES,
            DATA_CQ_ENTRIES,
            self.slots_per_ring,
            RECV_BUFS_DATA_RING,
            RECV_BUF_BYTES,
            // The wait ring reads the eventfd the others signal.
            (r != WAIT_RING_SEVERAL).then(|| self.wake.0.as_raw_fd()),
        )?;
        self.rings.push(ring);
        log::debug!("shard {}: data ring {r} created", self.shard);
        Ok(r)
    }

    /// A move could not happen. A connection the shard holds stays in ring
    /// 0 and is reported closed; one it does not know yet is closed.
    fn give_up_move(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.state = State::Live;
        if c.has(flag::VISIBLE) && !c.has(flag::CLOSE_REQUESTED) {
            c.set(flag::BROKEN | flag::PEER_CLOSED);
            let gen = c.gen;
            self.events.push_back(Event::Closed(key, gen));
        } else {
            self.refused += 1;
            if self.refused % REFUSED_LOG_EVERY == 1 {
                log::warn!(
                    "shard {}: every fixed-file table is full; refusing connections ({} so far)",
                    self.shard,
                    self.refused
                );
            }
            self.start_close(key);
        }
    }

    /// The descriptor is in its final ring: report, flush and arm.
    fn on_live(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.state = State::Live;
        c.retries = 0;
        if c.has(flag::CLOSE_REQUESTED) {
            self.start_close(key);
            return;
        }
        let gen = c.gen;
        if c.has(flag::FROM_ACCEPT) {
            c.clear(flag::FROM_ACCEPT);
            c.set(flag::VISIBLE);
            self.visible += 1;
            self.events.push_back(Event::Accepted(key, gen));
        }
        if c.has(flag::WANT_WRITE) {
            c.clear(flag::WANT_WRITE);
            self.events.push_back(Event::Writable(key, gen));
        }
        if c.has(flag::SHUT_WR_PENDING) {
            self.submit_shutdown(key);
        }
        self.queue_rearm(key);
    }

    // ---- completions ---------------------------------------------------

    fn on_cqe(&mut self, ring: usize, user_data: u64, res: i32, flags: u32) {
        let Some(op) = tag::op_of(user_data) else {
            log::error!(
                "shard {}: completion with unknown user_data {user_data:#x}",
                self.shard
            );
            return;
        };
        if op.submitted_here() && !cqueue::more(flags) {
            let r = &mut self.rings[ring];
            debug_assert!(
                r.ops_inflight > 0,
                "ring {ring}: more completions than submissions"
            );
            r.ops_inflight = r.ops_inflight.saturating_sub(1);
        }
        match op {
            Op::HandoffIn => return self.on_handoff_in(tag::id_of(user_data), res),
            Op::HandoffFail => return self.on_handoff_fail(tag::id_of(user_data)),
            _ => {}
        }
        let t = Tag::decode(user_data).expect("conn tag");
        match t.op {
            Op::Accept => self.on_accept(t.key as usize, res, flags),
            Op::WakeRead => self.on_wake_read(res),
            Op::Recv => self.on_recv(ring, t, res, flags),
            Op::Send => self.on_send(t, res),
            Op::Shutdown | Op::Cancel => self.op_done(t),
            Op::Close => self.on_close(ring, t, res),
            Op::Move => self.on_move(t, res),
            Op::Arrive => self.on_arrive(ring, t, res),
            Op::HandoffOut => self.on_handoff_out(t, res),
            Op::SourceClose => self.on_source_close(ring, t, res),
            Op::CloseRaw => {
                if res >= 0 {
                    self.slot_closed(ring);
                } else {
                    log::error!(
                        "shard {}: close of slot {}: errno {}",
                        self.shard,
                        t.key,
                        -res
                    );
                }
            }
            Op::Misc => {}
            Op::HandoffIn | Op::HandoffFail => unreachable!(),
        }
    }

    fn slot_closed(&mut self, ring: usize) {
        let r = &mut self.rings[ring];
        debug_assert!(r.slots_used > 0);
        r.slots_used = r.slots_used.saturating_sub(1);
    }

    /// The connection of tag `t`, if it is still that one.
    fn conn_of(&mut self, t: Tag) -> Option<&mut Conn> {
        let c = self.conns.get_mut(t.key as usize)?;
        if c.gen != t.gen {
            debug_assert!(false, "completion for a reused key: {t:?}");
            return None;
        }
        Some(c)
    }

    /// One of the connection's operations completed for good.
    fn op_done(&mut self, t: Tag) {
        if let Some(c) = self.conn_of(t) {
            debug_assert!(c.ops > 0);
            c.ops = c.ops.saturating_sub(1);
            self.maybe_free(t.key);
        }
    }

    fn on_wake_read(&mut self, res: i32) {
        self.wake_armed = false;
        if res >= 0 {
            if !matches!(self.events.back(), Some(Event::Woken)) {
                self.events.push_back(Event::Woken);
            }
            return;
        }
        match -res {
            // Cancelled while dropping: stays unarmed.
            libc::ECANCELED => self.wake_armed = true,
            // Nothing to read after all (spurious readiness): re-armed in prepare.
            libc::EAGAIN | libc::EINTR => {}
            e => log::warn!("shard {}: eventfd read: errno {e}", self.shard),
        }
    }

    /// A completion of listener `i`'s multishot accept.
    fn on_accept(&mut self, i: usize, res: i32, flags: u32) {
        debug_assert!(i < self.listeners.len(), "accept tag names listener {i}");
        if !cqueue::more(flags) {
            self.accept[i].armed = false;
            self.accept[i].cancelling = false;
        }
        if res >= 0 {
            let slot = res as u32;
            self.rings[0].slots_used += 1;
            if self.listeners[i].is_none() {
                self.close_raw(0, slot); // accepted while stop_accepting's cancel was on its way
                return;
            }
            let mut flags = flag::FROM_ACCEPT;
            if i == Listener::Tls.index() {
                flags |= flag::FROM_TLS;
            }
            let key = self.new_conn(0, slot, flags, State::Live);
            self.make_home(key);
            // React within the burst if ring 0 runs low.
            for j in 0..self.accept.len() {
                if self.accept[j].armed
                    && !self.accept[j].cancelling
                    && self.rings[0].slots_free() < self.accept_margin_slots
                {
                    self.cancel_accept(j);
                }
            }
            return;
        }
        match -res {
            // Our cancel: stop_accepting, or ring 0 ran low on slots.
            libc::ECANCELED => {}
            // The peer gave up while in the backlog; a transient failure.
            libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPERM => {}
            // The fixed table was full and the kernel closed the connection
            // it accepted. The margin exists so this never happens.
            libc::ENFILE => log::error!(
                "shard {}: accept found ring 0's fixed-file table full; a connection was lost",
                self.shard
            ),
            // Out of a resource: the connection stays in the backlog; pause.
            libc::EMFILE | libc::ENOMEM | libc::ENOBUFS => {
                log::warn!(
                    "shard {}: accept: errno {}; pausing accepts for {ACCEPT_RETRY:?}",
                    self.shard,
                    -res
                );
                self.accept[i].retry_at = Some(Instant::now() + ACCEPT_RETRY);
            }
            // The listener is unusable: stop accepting on this shard.
            libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP => {
                log::error!(
                    "shard {}: accept: errno {}; listener dropped",
                    self.shard,
                    -res
                );
                self.listeners[i] = None;
            }
            e => {
                log::warn!("shard {}: accept: errno {e}; retrying", self.shard);
                self.accept[i].retry_at = Some(Instant::now() + ACCEPT_RETRY);
            }
        }
    }

    fn on_recv(&mut self, ring: usize, t: Tag, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(c) = self.conn_of(t) else {
            if let Some(bid) = bid {
                self.recycle(ring as u16, bid);
            }
            return;
        };
        if !more {
            c.clear(flag::RECV_ARMED | flag::RECV_MULTI | flag::RECV_CANCELLING);
            c.ops = c.ops.saturating_sub(1);
        }
        let live = c.state == State::Live && c.has(flag::VISIBLE);
        let established = c.has(flag::ESTABLISHED);
        let (key, gen) = (t.key, c.gen);
        if res > 0 {
            let bid = bid.expect("a receive with buffer select names its buffer");
            if live {
                self.events.push_back(Event::Data {
                    key,
                    gen,
                    ring: ring as u16,
                    bid,
                    len: res as u32,
                });
                if !more && established {
                    // A multishot receive ended with data (the kernel's retry
                    // limit, a buffer ring running dry): arm it again.
                    // Single-shot ones are re-armed by `next`.
                    self.queue_rearm(key);
                }
            } else {
                self.recycle(ring as u16, bid);
            }
            self.maybe_free(key);
            return;
        }
        if let Some(bid) = bid {
            self.recycle(ring as u16, bid);
        }
        let closed = match -res {
            // End of stream: the peer closed its side.
            0 => true,
            // The buffer ring ran dry: by the next `wait` the buffers handed
            // out in `next` are back; arm again then.
            libc::ENOBUFS => {
                self.recv_no_buffers += 1;
                false
            }
            // Our cancel (pause or close); if resumed meanwhile, arm again.
            libc::ECANCELED => false,
            // Transient: arm again.
            libc::EINTR | libc::EAGAIN => false,
            // ECONNRESET, ETIMEDOUT, EPIPE, ENOTCONN, ...: the connection is gone.
            _ => true,
        };
        if live {
            if closed {
                self.conns[key as usize].set(flag::PEER_CLOSED);
                self.events.push_back(Event::Closed(key, gen));
            } else if !more {
                self.queue_rearm(key);
            }
        }
        self.maybe_free(key);
    }

    fn on_send(&mut self, t: Tag, res: i32) {
        let Some(c) = self.conn_of(t) else {
            return;
        };
        c.clear(flag::SEND_INFLIGHT);
        c.ops = c.ops.saturating_sub(1);
        let key = t.key;
        if c.state != State::Live {
            c.out = None; // closing or moving away: nothing more goes out
            self.maybe_free(key);
            return;
        }
        let gen = c.gen;
        if res > 0 {
            let out = c.out.as_mut().expect("a SEND has its buffer");
            out.sent += res as usize;
            if out.sent < out.bytes.len() {
                self.submit_send(key); // short send: the rest goes next
            } else {
                c.out = None;
                self.send_drained(key);
            }
            return;
        }
        match -res {
            // No room or no memory for now: send the rest again.
            libc::EAGAIN | libc::ENOBUFS | libc::EINTR => self.submit_send(key),
            // Cancelled by a close under way.
            libc::ECANCELED => c.out = None,
            // 0 bytes for a non-empty send, EPIPE, ECONNRESET, ...: broken.
            _ => {
                c.out = None;
                c.set(flag::BROKEN | flag::PEER_CLOSED);
                if c.has(flag::VISIBLE) {
                    self.events.push_back(Event::Closed(key, gen));
                }
            }
        }
    }

    /// The send buffer is empty: shut down if asked, report Writable if the
    /// shard was told 0.
    fn send_drained(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let gen = c.gen;
        if c.has(flag::SHUT_WR_PENDING) {
            self.submit_shutdown(key);
        }
        let c = &mut self.conns[key as usize];
        if c.has(flag::WANT_WRITE) {
            c.clear(flag::WANT_WRITE);
            self.events.push_back(Event::Writable(key, gen));
        }
    }

    fn on_close(&mut self, ring: usize, t: Tag, res: i32) {
        if res >= 0 {
            self.slot_closed(ring);
        } else {
            // EBADF: the slot was empty (our count was wrong). Count it freed
            // anyway: the slot is empty now either way.
            log::error!(
                "shard {}: close of a connection slot: errno {}",
                self.shard,
                -res
            );
            self.slot_closed(ring);
        }
        if let Some(c) = self.conn_of(t) {
            c.slot = NO_SLOT;
        }
        self.op_done(t);
    }

    /// The CLOSE linked after a MSG_RING: done if the MSG_RING succeeded,
    /// cancelled (the slot is still ours) if it failed.
    fn on_source_close(&mut self, ring: usize, t: Tag, res: i32) {
        if res >= 0 {
            self.slot_closed(ring);
            if let Some(c) = self.conn_of(t) {
                if c.state == State::Detaching && c.ring as usize == ring {
                    // Handed off: nothing of it is left here.
                    c.slot = NO_SLOT;
                    c.state = State::Closing;
                    self.handoffs_out.remove(&t.key);
                }
            }
        } else if res != -libc::ECANCELED {
            log::error!("shard {}: close after MSG_RING: errno {}", self.shard, -res);
        }
        self.op_done(t);
    }

    fn on_move(&mut self, t: Tag, res: i32) {
        if res < 0 {
            if let Some(c) = self.conn_of(t) {
                let k = c.dst_ring as usize;
                let gen = c.gen;
                let rings = &mut self.rings;
                rings[k].slots_reserved = rings[k].slots_reserved.saturating_sub(1);
                match -res {
                    // The target CQ is full, or its table (our count was
                    // off), or memory is short: the slot is still ours
                    // (the linked CLOSE was cancelled); retry soon.
                    libc::EOVERFLOW | libc::ENFILE | libc::EAGAIN | libc::EBUSY | libc::ENOMEM => {
                        self.schedule_retry(t.key, gen)
                    }
                    e => {
                        log::error!("shard {}: move to data ring {k}: errno {e}", self.shard);
                        self.give_up_move(t.key);
                    }
                }
            }
        }
        self.op_done(t);
    }

    fn schedule_retry(&mut self, key: u32, gen: u32) {
        let c = &mut self.conns[key as usize];
        c.retries = c.retries.saturating_add(1);
        if c.retries > MSG_RING_RETRIES_MAX {
            match c.state {
                State::Moving => self.give_up_move(key),
                State::Detaching => self.give_up_handoff(key),
                _ => {}
            }
            return;
        }
        self.retry.push((key, gen));
        self.retry_at
            .get_or_insert_with(|| Instant::now() + RETRY_INTERVAL);
    }

    fn retry_msg_ring(&mut self, key: u32, gen: u32) {
        let Some(c) = self.conns.get(key as usize).filter(|c| c.gen == gen) else {
            return;
        };
        match c.state {
            State::Moving if c.has(flag::CLOSE_REQUESTED) => self.start_close(key),
            State::Moving => match self.pick_data_ring() {
                Some(k) => self.start_move(key, k),
                None => self.give_up_move(key),
            },
            State::Detaching => self.submit_handoff(key),
            _ => {}
        }
    }

    /// A data ring got the descriptor of a moving connection.
    fn on_arrive(&mut self, ring: usize, t: Tag, res: i32) {
        if res < 0 {
            log::error!(
                "shard {}: arrival on ring {ring}: errno {}",
                self.shard,
                -res
            );
            return;
        }
        let slot = res as u32;
        self.rings[ring].slots_used += 1;
        let ok = self.conns.get(t.key as usize).is_some_and(|c| {
            c.gen == t.gen && c.state == State::Moving && c.dst_ring as usize == ring
        });
        if !ok {
            debug_assert!(false, "arrival for no moving connection: {t:?}");
            self.close_raw(ring, slot);
            return;
        }
        self.rings[ring].slots_reserved = self.rings[ring].slots_reserved.saturating_sub(1);
        let c = &mut self.conns[t.key as usize];
        c.ring = ring as u16;
        c.slot = slot;
        self.on_live(t.key);
    }

    fn on_handoff_out(&mut self, t: Tag, res: i32) {
        if res < 0 {
            let gen = t.gen;
            match -res {
                // The target's CQ is full (EOVERFLOW), its table is full
                // (ENFILE), or memory is short: the slot is still ours (the
                // linked CLOSE was cancelled); retry soon.
                libc::EOVERFLOW | libc::ENFILE | libc::EAGAIN | libc::EBUSY | libc::ENOMEM => {
                    if self.conn_of(t).is_some() {
                        self.schedule_retry(t.key, gen);
                    }
                }
                // EOWNERDEAD: the target shard's thread has exited; EBADFD:
                // its ring is gone or disabled; anything else: give up.
                e => {
                    log::warn!("shard {}: handoff failed: errno {e}", self.shard);
                    if self.conn_of(t).is_some() {
                        self.give_up_handoff(t.key);
                    }
                }
            }
        }
        self.op_done(t);
    }

    /// Closes a connection whose handoff failed for good, and tells the
    /// target (best effort) so its attached session is closed too.
    fn give_up_handoff(&mut self, key: u32) {
        if let Some(h) = self.handoffs_out.remove(&key) {
            let ring = self.conns[key as usize].ring as usize;
            let entry = opcode::MsgRingData::new(
                types::Fd(self.peers[h.dst].fd()),
                0,
                tag::id_tag(Op::HandoffFail, h.id),
                None,
            )
            .build()
            .user_data(Tag::ring(Op::Misc, ring).encode());
            // SAFETY: MSG_RING data names no memory.
            unsafe { self.rings[ring].push(Chain::One(entry)) };
        }
        self.start_close(key);
    }

    /// Another shard's descriptor arrived in ring 0's slot `res`.
    fn on_handoff_in(&mut self, id: u64, res: i32) {
        if res < 0 {
            log::error!("shard {}: handoff arrival: errno {}", self.shard, -res);
            return;
        }
        let slot = res as u32;
        self.rings[0].slots_used += 1;
        match self.handoffs_in.remove(&id) {
            None => {
                self.handoffs_in.insert(id, HandoffIn::Arrived { slot });
            }
            Some(HandoffIn::Attached { key, gen }) => {
                let ok = self
                    .conns
                    .get(key as usize)
                    .is_some_and(|c| c.gen == gen && c.state == State::AwaitingFd);
                if ok {
                    let c = &mut self.conns[key as usize];
                    c.ring = 0;
                    c.slot = slot;
                    self.make_home(key);
                } else {
                    self.close_raw(0, slot);
                }
            }
            Some(HandoffIn::Abandoned) => self.close_raw(0, slot),
            Some(other) => {
                log::error!(
                    "shard {}: handoff {id:#x} arrived twice ({other:?})",
                    self.shard
                );
                self.handoffs_in.insert(id, other);
                self.close_raw(0, slot);
            }
        }
    }

    /// The source of handoff `id` gave up.
    fn on_handoff_fail(&mut self, id: u64) {
        match self.handoffs_in.remove(&id) {
            None => {
                self.handoffs_in.insert(id, HandoffIn::Failed);
            }
            Some(HandoffIn::Attached { key, gen }) => {
                if let Some(c) = self.visible_conn(key, gen) {
                    c.set(flag::BROKEN | flag::PEER_CLOSED);
                    self.events.push_back(Event::Closed(key, gen));
                }
            }
            Some(HandoffIn::Abandoned) => {}
            Some(other) => {
                self.handoffs_in.insert(id, other);
            }
        }
    }

    fn recycle(&mut self, ring: u16, bid: u16) {
        if let Some(bufs) = self.rings[ring as usize].bufs.as_mut() {
            bufs.recycle(bid);
        }
    }

    // ---- teardown ------------------------------------------------------

    /// Cancels everything and waits (bounded) until no operation is in
    /// flight, so the kernel never writes a freed receive buffer or reads a
    /// freed send buffer. True when quiet.
    ///
    /// Each cancel names one operation by user_data. A cancel-any (or
    /// cancel-by-file) makes the kernel rescan every armed request from the
    /// start for each one it cancels: O(n^2), 3.3 s for 16.7k connections.
    fn quiesce(&mut self) -> bool {
        let mut targets: Vec<(usize, u64)> = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            let (ring, key) = (c.ring as usize, key as u32);
            if c.has(flag::RECV_ARMED) && !c.has(flag::RECV_CANCELLING) {
                c.set(flag::RECV_CANCELLING);
                targets.push((ring, Tag::new(Op::Recv, ring, key, c.gen).encode()));
            }
            if c.has(flag::SEND_INFLIGHT) {
                targets.push((ring, Tag::new(Op::Send, ring, key, c.gen).encode()));
            }
        }
        for (i, accept) in self.accept.iter().enumerate() {
            if accept.armed && !accept.cancelling {
                targets.push((0, accept_tag(i)));
            }
        }
        if self.wake_armed {
            let w = self.wait_ring();
            targets.push((w, Tag::ring(Op::WakeRead, w).encode()));
        }
        for (ring, target) in targets {
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(Tag::ring(Op::Misc, ring).encode());
            // SAFETY: a cancel names no memory.
            unsafe { self.rings[ring].push(Chain::One(entry)) };
        }
        let mut cqes = Vec::new();
        for _ in 0..DROP_ROUNDS_MAX {
            let mut busy = false;
            for ring in &mut self.rings {
                if ring.ops_inflight == 0 && ring.unqueued_len() == 0 {
                    continue;
                }
                busy = true;
                let _ = ring.submit();
                cqes.clear();
                let _ = ring.reap(&mut cqes);
                for &(user_data, _, flags) in &cqes {
                    let here = tag::op_of(user_data).is_some_and(|op| op.submitted_here());
                    if here && !cqueue::more(flags) {
                        ring.ops_inflight = ring.ops_inflight.saturating_sub(1);
                    }
                }
            }
            if !busy {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        let t0 = Instant::now();
        let quiet = self.quiesce();
        log::debug!(
            "shard {}: io_uring quiesced={quiet} in {:?}, ops left {:?}",
            self.shard,
            t0.elapsed(),
            self.rings
                .iter()
                .map(|r| r.ops_inflight)
                .collect::<Vec<_>>()
        );
        if quiet {
            for ring in &mut self.rings {
                if let Some(mut bufs) = ring.bufs.take() {
                    bufs.unregister(&ring.submitter());
                }
            }
        } else {
            log::error!(
                "shard {}: io_uring operations still in flight at drop; leaking their buffers",
                self.shard
            );
            // The kernel may still use these: never free them.
            for ring in &mut self.rings {
                std::mem::forget(ring.bufs.take());
            }
            std::mem::forget(std::mem::take(&mut self.conns));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}

/// The `user_data` of listener `i`'s multishot accept: the key says which.
fn accept_tag(i: usize) -> u64 {
    Tag::new(Op::Accept, 0, i as u32, 0).encode()
}

#[cfg(test)]
mod tests;

/// The largest power of two <= `n` (1 for 0).
fn prev_power_of_two(n: u32) -> u32 {
    if n == 0 {
        1
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// RLIMIT_NOFILE's soft limit: the most slots one fixed-file table may have.
fn nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(ring::with_context(io::Error::last_os_error(), "getrlimit"));
    }
    Ok(lim.rlim_cur)
}

/// Multishot receive and MSG_RING fd passing need Linux 6.0.
fn check_kernel() -> io::Result<()> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we pass.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(ring::with_context(io::Error::last_os_error(), "uname"));
    }
    let release: String = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if (major, minor) < (6, 0) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("kernel {release} is older than 6.0 (multishot receive, MSG_RING fd passing)"),
        ));
    }
    Ok(())
}

/// Checks that ring 0's kernel knows every opcode we use.
fn probe(ring: &Ring) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| ring::with_context(e, "io_uring probe"))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Read::CODE, "READ"),
        (opcode::Close::CODE, "CLOSE"),
        (opcode::Shutdown::CODE, "SHUTDOWN"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::MsgRingSendFd::CODE, "MSG_RING"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    Ok(())
}

/// TCP_NODELAY on the listener: accepted sockets inherit it (small frames,
/// latency matters more than packet count).
fn set_nodelay(listener: &TcpListener) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::warn!(
            "TCP_NODELAY on the listener: {}",
            io::Error::last_os_error()
        );
    }
}
