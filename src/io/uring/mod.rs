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
//! wake-up of a small shard.) Only the wait ring defers its completion work;
//! the rings with the eventfd run it plainly (why: `Ring::new`), so they are
//! entered only to submit or to flush an overflow, never to look.
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
//! Close cancels everything on the slot, then CLOSEs it; with a SHUTDOWN in
//! flight it waits for that first (the worker pool resolves a fixed slot
//! only when the SHUTDOWN runs, so a slot closed and reused before then
//! would shut down its next connection). The connection's
//! slab entry stays as a zombie until every completion of it has come, so a
//! key is reused only once nothing in flight names it (user_data also
//! carries a generation, checked on every completion). A handoff sends the
//! fixed file to the peer shard's ring 0 with MSG_RING (linked with a CLOSE
//! of the source slot; a failed send cancels the CLOSE and is retried a few
//! times). The arrival and the shard-level `attach` come in either order and
//! are paired by a handoff id.
//!
//! # Code layout
//!
//! This file holds the limits, the state ([`Io`], its connections and their
//! flags), the loop ([`Io::wait`], [`Io::next`]) and the completion
//! dispatch; the rest is split by concept: `setup` (kernel checks, table
//! sizes, building the rings), `wake` (the eventfd), `accept`, `peer` (the
//! source address of an accepted connection), `recv`,
//! `send`, `close` (and teardown at drop), `layout` (data rings, moving
//! connections between rings, MSG_RING retries), `handoff` (to and from
//! other shards), `carry` (live upgrade: connections out as process
//! descriptors, in from a predecessor), over `ring` (one io_uring
//! instance), `bufs` (its provided buffers) and `tag` (what a completion's
//! user_data says).

mod accept;
mod bufs;
mod carry;
mod close;
mod handoff;
mod layout;
mod peer;
mod recv;
mod ring;
mod send;
mod setup;
mod tag;
mod wake;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;

use super::{Completion, ConnId, IoGauges, IoOptions, Listener, Listeners, LISTENERS};
use ring::{Chain, Cqe, Ring};
use tag::{Op, Tag};

use accept::{accept_tag, Accept};
use carry::Install;
pub use carry::Kept;
pub use handoff::{Detached, PeerInfo};
use handoff::{HandoffIn, HandoffOut};
use send::SendBuf;
pub use wake::WakeHandle;

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
/// connection's receives). One enter can complete a receive on every
/// connection with input, each taking a buffer before we hand any back: with
/// 512, a chat load over 2,000 connections ended ~65,000 receives a second
/// with ENOBUFS (each then re-armed), 20 % of the server's CPU per message.
/// 4,096 × 2 KiB = 8 MiB per shard.
const RECV_BUFS_SINGLE_RING: u16 = 4096;
/// Receive buffers of each data ring (up to `RLIMIT_NOFILE` connections
/// each): 256 × 2 KiB = 512 KiB. Data rings exist only for many mostly idle
/// connections, and their count grows with them: 1,024 per ring took the
/// 2,000,000-connection run (104 rings) from ~213 to 301 B of userspace
/// per idle connection; 256 costs 26 B per connection at 20,000 per ring.
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
    /// A SHUTDOWN is in flight: the slot must not be CLOSEd (and reused)
    /// before it completes.
    pub const SHUTDOWN_INFLIGHT: u32 = 1 << 16;
    /// Closed while a SHUTDOWN was in flight: cancel and CLOSE once it is done.
    pub const CLOSE_AFTER_SHUTDOWN: u32 = 1 << 17;
    /// Accepted from the WebSocket listener (kept for the connection's life).
    pub const FROM_WS: u32 = 1 << 18;
    /// Kept for a successor process (live upgrade): invisible, in its ring
    /// until `carry_fds`; bytes that still arrive are held.
    pub const KEPT: u32 = 1 << 19;
    /// Accepted from the MQTT listener (kept for the connection's life);
    /// with `FROM_TLS`, from the MQTT-over-TLS one.
    pub const FROM_MQTT: u32 = 1 << 20;
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
    /// The listener the connection was accepted from.
    fn listener(&self) -> Listener {
        if self.has(flag::FROM_TLS) && self.has(flag::FROM_MQTT) {
            Listener::MqttTls
        } else if self.has(flag::FROM_TLS) {
            Listener::Tls
        } else if self.has(flag::FROM_WS) {
            Listener::Ws
        } else if self.has(flag::FROM_MQTT) {
            Listener::Mqtt
        } else {
            Listener::Plain
        }
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
    listeners: [Option<TcpListener>; LISTENERS],
    /// Each listener's multishot accept, by [`Listener::index`].
    accept: [Accept; LISTENERS],
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
    /// Whether accepted connections' source addresses are asked for (off
    /// after the kernel refused once: older than Linux 6.7).
    peer_query: bool,
    /// Bytes of the listener's socket address, by [`Listener::index`]: what
    /// getsockopt(SO_PEERNAME) is asked for.
    peer_lens: [u32; LISTENERS],
    /// Source addresses of accepted connections, until [`Io::peer_ip`]
    /// takes them (right after Accepted).
    peer_ips: HashMap<u32, std::net::IpAddr>,
    /// Multishot receives ended by ENOBUFS (for [`Io::gauges`]).
    recv_no_buffers: u64,
    /// Send buffers whose SEND completed, kept for the next `send` (at most
    /// `send::SPARE_SENDS_MAX`): steady traffic does not allocate per send.
    // Boxed: a connection holds its buffer as `Box<SendBuf>`, and reusing
    // the box saves its allocation too.
    #[allow(clippy::vec_box)]
    spare_sends: Vec<Box<SendBuf>>,
    /// Whether the kernel has FIXED_FD_INSTALL and FILES_UPDATE: live
    /// upgrade carries connections (`carry.rs`).
    carry_ops: bool,
    /// Kept connections whose FIXED_FD_INSTALL is in flight (`None`) or
    /// done (the descriptor or -errno), by key.
    installed: HashMap<u32, Option<i32>>,
    /// Adopted connections whose FILES_UPDATE is in flight, by key.
    installs: HashMap<u32, Install>,
}

impl Io {
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
                        let which = c.listener();
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
            Op::Shutdown => self.on_shutdown(t),
            Op::Cancel => self.op_done(t),
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
            Op::Peer => self.on_peer(t, res),
            Op::FdInstall => self.on_fd_install(t, res),
            Op::FilesUpdate => self.on_files_update(ring, t, res),
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
}

#[cfg(test)]
mod tests;
