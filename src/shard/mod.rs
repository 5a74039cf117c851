//! One core's event loop: its connections, its users and their queues.
//!
//! A shard owns everything it touches. Other shards reach it only through the
//! SPSC rings of [`crate::ring`], carrying [`Msg`]s. A user lives on its home
//! shard ([`home_shard`]); after LOGIN the connection moves there, so a
//! message crosses at most one ring on its way to the recipient (and its
//! ACK and receipts at most one on the way back).
//!
//! Session handling never reads or writes a socket: frames are decoded from
//! bytes the [`Io`] handed out, and answers are appended to the connection's
//! output buffer, which the loop flushes once per iteration.
//!
//! A connection from the TLS listener carries a boxed [`TlsConn`]: its
//! ciphertext is decrypted before the frame processing, and its output is
//! written as plaintext and encrypted at flush (one batch of records per
//! iteration). Plaintext connections pay 8 bytes for the empty box.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::io::{Completion, ConnId, Io, Listener};
use crate::proto::{self, ByeReason, ErrorCode, Frame, ReceiptKind};
use crate::ring::Links;
use crate::stats::{LoopTimer, ShardStats};
use crate::store::{shard_dir, Durability, LogStore, PushError, Store, StoreError, Stored};
use crate::supervisor::{Fatal, Intensity, ShardState, EXIT_SHARD_DOWN};
use crate::timer::{self, Entry, Tick, Wheel};
use crate::tls::{TlsConn, TlsContext};
use crate::token;

mod route;

pub use route::{home_shard, ConnRef, Msg};

/// Bytes read from a socket at once into the shard's scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// After an error or BYE, how long a closing connection may take to read
/// what we sent before it is closed anyway.
const LINGER: Duration = Duration::from_secs(2);
/// Messages an emptied outbox keeps room for.
const OUTBOX_KEEP_CAPACITY: usize = 1024;
/// Session slots added at least when the table grows.
const SESSIONS_GROWTH_MIN: usize = 1024;
/// Poll timeout while an outbox waits for ring space.
const OUTBOX_RETRY: Duration = Duration::from_millis(1);

/// In debug builds, a SEND to this user panics inside the session handler, so
/// tests can check that a panic closes only that connection.
#[cfg(debug_assertions)]
pub const PANIC_USER: u64 = u64::MAX;

/// In debug builds, a SEND to this user crashes the whole shard (outside any
/// one connection's handling), so tests can check the supervisor: the shard
/// restarts, replays its log, and the other shards go on.
#[cfg(debug_assertions)]
pub const CRASH_USER: u64 = u64::MAX - 1;

/// Opens shard `shard`'s store under the configured data directory,
/// replaying its log.
pub fn open_store(config: &Config, shard: usize) -> Result<Box<dyn Store + Send>, StoreError> {
    let (store, recovery) =
        LogStore::open(shard_dir(&config.data_dir, shard), config.log_options())?;
    if config.durability != Durability::Memory {
        log::info!("shard {shard}: store recovered: {recovery}");
    }
    Ok(Box::new(store))
}


/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}



#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum State {
    /// Slot unused.
    #[default]
    Free,
    /// Connected, LOGIN not seen yet.
    Login,
    /// Logged in, on its home shard.
    Active,
    /// Flushing a last ERROR or BYE; input is discarded.
    Closing,
}

/// Buffers of one connection; allocated only while a frame is partial or
/// output is pending, freed when drained.
#[derive(Default)]
struct Bufs {
    inp: Vec<u8>,
    out: Vec<u8>,
    /// TLS connections: plaintext written since the last flush; encrypted
    /// into `out` by the flush. Always empty on plaintext connections.
    plain: Vec<u8>,
    /// Bytes of `out` already sent.
    out_sent: usize,
}

/// The fixed per-connection slot. Kept small: an idle connection is this
/// plus one timer entry plus (when logged in) one `online` map entry.
#[derive(Default)]
struct Session {
    /// Generation of the connection in this slot; 0 when free.
    gen: u32,
    state: State,
    /// Set when the write side was shut down after the last output.
    write_closed: bool,
    /// Queued in `Shard::dirty`.
    dirty: bool,
    /// Logged-in user, 0 before LOGIN.
    user: u64,
    /// Tick of the last frame received (for Closing: when closing began).
    last_rx: Tick,
    bufs: Option<Box<Bufs>>,
    /// TLS state of a connection from the TLS listener.
    tls: Option<Box<TlsConn>>,
}

impl Session {
    fn out_pending(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b.out.len() - b.out_sent + b.plain.len())
    }
}

/// A logged-in user on its home shard.
struct Online {
    conn: ConnId,
    /// Highest server id already sent as DELIVER on this connection.
    sent_upto: u64,
    /// DELIVERs sent on this connection and not yet answered.
    inflight: u32,
    /// Their encoded bytes, at most `deliver_inflight_bytes_max` (but one
    /// DELIVER always goes). Sits in `Online`'s padding: no idle cost.
    inflight_bytes: u32,
    /// Queued messages were left unsent by the last pump (in-flight cap or
    /// output budget): the connection is catching up on a backlog.
    held: bool,
}

// The delivery window's counters fit in what an online user cost before.
const _: () = assert!(std::mem::size_of::<Online>() <= 24);

/// A delivery or read receipt waiting for its (offline) recipient.
#[derive(Clone, Copy, Debug)]
struct PendingReceipt {
    kind: ReceiptKind,
    server_id: u64,
    peer: u64,
}

/// Result of handling one frame.
enum Flow {
    /// Go on with the next frame.
    Next,
    /// Back-pressure: keep this frame and the rest, stop reading.
    Blocked,
    /// Stop: the connection was closed or moved, or the rest of the input
    /// was already handled by a nested call.
    Stop,
}

/// Everything a shard needs at start.
pub struct ShardParts {
    /// The shard's I/O backend, with its listener.
    pub io: Io,
    /// Its ends of the ring mesh.
    pub links: Links<Msg>,
    /// Its counters.
    pub stats: Arc<ShardStats>,
    /// Set to begin graceful shutdown.
    pub stop: Arc<AtomicBool>,
    /// The configuration.
    pub config: Arc<Config>,
    /// Its message store, already recovered.
    pub store: Box<dyn Store + Send>,
    /// TLS settings, when the server has a TLS listener.
    pub tls: Option<Arc<TlsContext>>,
    /// Every shard's counters, by shard id: their `state` says whether a
    /// peer takes messages.
    pub peers: Arc<[Arc<ShardStats>]>,
    /// Set when a shard gives up past its restart intensity.
    pub fatal: Arc<Fatal>,
}

/// A shard's state. Created on, and used by, its own thread.
pub struct Shard {
    id: usize,
    shards: usize,
    config: Arc<Config>,
    limits: proto::Limits,
    io: Io,
    links: Links<Msg>,
    /// Messages waiting for ring space, per destination shard.
    outbox: Vec<VecDeque<Msg>>,
    sessions: Vec<Session>,
    online: HashMap<u64, Online>,
    /// Receipts for users who were offline when they came, sent at login.
    receipts: HashMap<u64, Vec<PendingReceipt>>,
    store: Box<dyn Store + Send>,
    /// Answers (ACK, refusals) to messages stored in this iteration, and
    /// receipts for messages removed in it: they leave only once the store
    /// committed them.
    replies: Vec<(usize, Msg)>,
    /// Users who got new messages this iteration: their connections are
    /// sent them once the commit made them durable.
    fresh: Vec<u64>,
    /// Server ids of pushes a commit rolled back (disk full); reused.
    refused: Vec<u64>,
    peers: Arc<[Arc<ShardStats>]>,
    fatal: Arc<Fatal>,
    /// Set by the debug crash hook; the loop panics outside connection handling.
    crash: bool,
    wheel: Wheel,
    /// Connections with output to flush this iteration.
    dirty: Vec<ConnId>,
    /// Connections stopped by back-pressure, retried each iteration.
    blocked: Vec<ConnId>,
    next_gen: u32,
    next_seq: u64,
    stats: Arc<ShardStats>,
    stop: Arc<AtomicBool>,
    /// When graceful shutdown must end, once begun.
    stop_deadline: Option<Instant>,
    scratch: Vec<u8>,
    frame_buf: Vec<u8>,
    /// TLS: decrypted input of one read (reused).
    tls_plain: Vec<u8>,
    tls: Option<Arc<TlsContext>>,
    conns_max: usize,
    accept_window: (Instant, u32),
    loop_timer: LoopTimer,
    idle_ticks: Tick,
    login_ticks: Tick,
    linger_ticks: Tick,
}

impl Shard {
    /// Builds shard `links.id()` from its parts.
    pub fn new(parts: ShardParts) -> Shard {
        let ShardParts {
            io,
            links,
            stats,
            stop,
            config,
            store,
            tls,
            peers,
            fatal,
        } = parts;
        let id = links.id();
        let shards = links.shards();
        Shard {
            id,
            shards,
            limits: proto::Limits {
                frame_bytes_max: config.frame_bytes_max,
                body_bytes_max: config.body_bytes_max,
            },
            io,
            links,
            outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            sessions: Vec::new(),
            online: HashMap::new(),
            receipts: HashMap::new(),
            replies: Vec::new(),
            fresh: Vec::new(),
            refused: Vec::new(),
            peers,
            fatal,
            crash: false,
            wheel: Wheel::new(),
            dirty: Vec::new(),
            blocked: Vec::new(),
            next_gen: 1,
            next_seq: (store.max_server_id() >> 10) + 1,
            store,
            stats,
            stop,
            stop_deadline: None,
            scratch: vec![0; SCRATCH_BYTES],
            frame_buf: Vec::new(),
            tls_plain: Vec::new(),
            tls,
            conns_max: config.conns_max.div_ceil(shards),
            accept_window: (Instant::now(), 0),
            loop_timer: LoopTimer::new(Instant::now()),
            idle_ticks: timer::ticks(config.idle_timeout()),
            login_ticks: timer::ticks(config.login_timeout()),
            linger_ticks: timer::ticks(LINGER),
            config,
        }
    }

    /// Runs the event loop until graceful shutdown completes.
    ///
    /// Let it crash: a panic outside one connection's handling (a bug, or a
    /// store that cannot commit) restarts the shard in place, supervised as
    /// in OTP (see [`crate::supervisor`]). Its connections drop (clients
    /// reconnect), and after a backoff its store is reopened and its log
    /// replayed, so nothing acknowledged is lost; other shards go on, and the
    /// rings and listener stay as they are. A reopen that fails is retried
    /// after the next backoff. Past `shard_restarts_max` restarts within
    /// `shard_restart_period_ms` the shard gives up: its state becomes down,
    /// the process-wide [`Fatal`] is set, and this returns an error.
    pub fn run(mut self) -> std::io::Result<()> {
        let mut intensity = Intensity::new(
            self.config.shard_restarts_max,
            Duration::from_millis(self.config.shard_restart_period_ms),
        );
        loop {
            let panic = match catch_unwind(AssertUnwindSafe(|| self.serve())) {
                Ok(result) => return result,
                Err(panic) => panic,
            };
            // The state first: whoever sees the restart counted sees it too.
            self.set_state(ShardState::Restarting);
            self.stats.restarts.inc();
            self.reset();
            let mut why = format!("crashed: {}", panic_text(&*panic));
            loop {
                let Some(n) = intensity.record(Instant::now()) else {
                    return Err(self.give_up(&why));
                };
                let delay = self.config.shard_restart_delay(n);
                log::error!(
                    "shard {} {why}; restart {n} of at most {} within {} ms, in {} ms",
                    self.id,
                    self.config.shard_restarts_max,
                    self.config.shard_restart_period_ms,
                    delay.as_millis()
                );
                std::thread::sleep(delay);
                match self.reopen() {
                    Ok(()) => break,
                    Err(e) => why = format!("cannot reopen its store: {e}"),
                }
            }
            self.set_state(ShardState::Up);
            log::info!("shard {} restarted", self.id);
        }
    }

    fn set_state(&self, state: ShardState) {
        self.stats.state.set(state as u64);
    }

    /// Whether shard `dst` takes messages (it is this one, or up).
    fn peer_up(&self, dst: usize) -> bool {
        dst == self.id || ShardState::from_u64(self.peers[dst].state.get()) == ShardState::Up
    }

    /// Past the restart intensity: marks the shard down and tells the
    /// process to exit non-zero.
    fn give_up(&mut self, why: &str) -> std::io::Error {
        self.set_state(ShardState::Down);
        let reason = format!(
            "shard {} {why}; more than {} restarts within {} ms (shard_restarts_max): giving \
             up, the process exits with status {EXIT_SHARD_DOWN} so the service manager can act",
            self.id, self.config.shard_restarts_max, self.config.shard_restart_period_ms
        );
        log::error!("{reason}");
        self.fatal.set(reason.clone());
        std::io::Error::other(reason)
    }

    /// Reopens the store (replaying its log) after a crash.
    fn reopen(&mut self) -> Result<(), StoreError> {
        // An in-memory store has nothing to replay: keep it as it is.
        if self.config.durability != Durability::Memory {
            self.store = open_store(&self.config, self.id)?;
            self.next_seq = self.next_seq.max((self.store.max_server_id() >> 10) + 1);
        }
        Ok(())
    }

    /// Drops every connection and per-connection state after a crash.
    fn reset(&mut self) {
        for i in 0..self.sessions.len() {
            if self.sessions[i].state != State::Free {
                self.io.close(ConnId(i as u32));
            }
        }
        self.sessions.clear();
        self.online.clear();
        self.receipts.clear();
        self.blocked.clear();
        self.dirty.clear();
        // Answers that waited for a commit that never came: not stored, so
        // not acknowledged. Senders on this shard lose their connection and
        // resend anyway; senders on other shards keep theirs and would wait
        // forever, so they hear it was not stored: ERROR(internal), resend
        // (a duplicate if a failed commit did write it). An in-memory store
        // is kept below, pushes and all, so its answers stand.
        let kept = self.config.durability == Durability::Memory;
        for (dst, msg) in std::mem::take(&mut self.replies) {
            if dst == self.id {
                continue;
            }
            let msg = match msg {
                Msg::Ack {
                    reply, client_id, ..
                } if !kept => Msg::Reject {
                    reply,
                    client_id,
                    code: ErrorCode::Internal,
                },
                other => other,
            };
            self.route(dst, msg);
        }
        self.crash = false;
        self.wheel = Wheel::new();
        // The panic may have unwound while the scratch buffer was lent out.
        self.scratch.resize(SCRATCH_BYTES, 0);
        self.stats.conns.set(0);
        self.stats.users_online.set(0);
        self.fresh.clear();
    }

    fn serve(&mut self) -> std::io::Result<()> {
        let mut fired = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) && self.stop_deadline.is_none() {
                self.begin_shutdown();
            }
            if let Some(deadline) = self.stop_deadline {
                if self.io.is_empty() || Instant::now() >= deadline {
                    self.close_all();
                    return Ok(());
                }
            }
            let mut timeout = self.wheel.until_next_tick();
            if self.outbox.iter().any(|o| !o.is_empty()) {
                timeout = timeout.min(OUTBOX_RETRY);
            }
            if !self.links.prepare_sleep() {
                timeout = Duration::ZERO;
            }
            let waited = self.io.wait(Some(timeout));
            self.links.awake();
            waited?;
            let started = Instant::now();

            self.drain_io();
            self.drain_rings();
            self.wheel.expire(&mut fired);
            for entry in fired.drain(..) {
                self.on_timer(entry);
            }
            self.retry_blocked();
            if self.crash {
                panic!("injected shard crash (debug hook)");
            }
            self.commit();
            self.flush_outboxes();
            self.flush_output();

            self.stats.loop_iterations.inc();
            let now = Instant::now();
            if self.loop_timer.record(now - started, now, &self.stats) {
                self.publish_gauges();
            }
        }
    }

    /// Makes this iteration's stores durable (one write and one fdatasync for
    /// all of them), then lets their answers go and sends the new messages
    /// to their recipients' connections. Pushes the commit rolled back (disk
    /// full) are answered `storage_full` instead of ACK. A store that cannot
    /// commit otherwise crashes the shard: the restart replays what is
    /// really on disk.
    fn commit(&mut self) {
        let mut refused = std::mem::take(&mut self.refused);
        if let Err(e) = self.store.commit(&mut refused) {
            panic!("store commit failed: {e}");
        }
        if !refused.is_empty() {
            self.stats.store_rollbacks.inc();
        }
        for (dst, mut msg) in std::mem::take(&mut self.replies) {
            if let Msg::Ack {
                reply,
                client_id,
                server_id,
                ..
            } = msg
            {
                if refused.contains(&server_id) {
                    self.stats.storage_full.inc();
                    msg = Msg::Reject {
                        reply,
                        client_id,
                        code: ErrorCode::StorageFull,
                    };
                }
            }
            self.route(dst, msg);
        }
        refused.clear();
        self.refused = refused;
        let mut fresh = std::mem::take(&mut self.fresh);
        fresh.sort_unstable();
        fresh.dedup();
        for user in fresh.drain(..) {
            self.pump(user, true);
        }
        self.fresh = fresh;
    }

    /// Gauges that are cheaper to sample than to track (once a second).
    fn publish_gauges(&self) {
        let s = &self.stats;
        s.queued.set(self.store.total() as u64);
        let space = self.store.space();
        s.disk_free_bytes.set(space.free_bytes.unwrap_or(0));
        s.disk_short.set(space.short.into());
        s.ring_in_depth.set(self.links.in_depth() as u64);
        s.ring_out_depth
            .set(self.outbox.iter().map(VecDeque::len).sum::<usize>() as u64);
        let io = self.io.gauges();
        s.io_rings.set(io.rings);
        s.io_slots_used.set(io.slots_used);
        s.io_slots.set(io.slots_total);
        // A running total kept by the backend, which outlives shard restarts.
        s.io_recv_no_buffers.set(io.recv_no_buffers);
    }

    // ---- I/O completions -------------------------------------------------

    fn drain_io(&mut self) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(c) = self.io.next(&mut scratch) {
            match c {
                Completion::Accepted(conn, which) => self.on_accept(conn, which),
                Completion::Recv(conn, len) => {
                    self.stats.bytes_in.add(len as u64);
                    self.guarded(conn, |shard| shard.on_recv(conn, &scratch[..len]));
                }
                Completion::Writable(conn) => self.flush_conn(conn),
                Completion::Closed(conn) => self.close_now(conn),
                Completion::Woken => {}
            }
        }
        self.scratch = scratch;
    }

    /// Runs one connection's handling; a panic closes that connection only.
    fn guarded(&mut self, conn: ConnId, f: impl FnOnce(&mut Shard)) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(self))) {
            let what = panic_text(&*panic);
            log::error!(
                "shard {}: panic handling connection {}: {what}",
                self.id,
                conn.0
            );
            self.stats.panics.inc();
            if self.sessions.get(conn.index()).is_some_and(|s| s.gen != 0) {
                self.close_now(conn);
            }
        }
    }

    fn on_accept(&mut self, conn: ConnId, which: Listener) {
        self.stats.accepted.inc();
        let now = Instant::now();
        if now.duration_since(self.accept_window.0) >= Duration::from_secs(1) {
            self.accept_window = (now, 0);
        }
        self.accept_window.1 += 1;
        let rate_max = self.config.accept_rate_per_s_max;
        let refuse = if self.io.len() > self.conns_max {
            Some((ErrorCode::ServerFull, "server is at its connection limit"))
        } else if rate_max != 0 && self.accept_window.1 > rate_max {
            Some((
                ErrorCode::RateLimited,
                "too many new connections, retry later",
            ))
        } else {
            None
        };
        if let Some((code, text)) = refuse {
            self.stats.rejected.inc();
            if which == Listener::Tls {
                // A plaintext ERROR means nothing to a TLS client.
                self.io.close(conn);
                return;
            }
            self.frame_buf.clear();
            proto::encode(
                &Frame::Error {
                    code,
                    client_id: 0,
                    text,
                },
                &mut self.frame_buf,
            );
            let _ = self.io.send(conn, &self.frame_buf);
            self.io.close(conn);
            return;
        }
        let tls = match which {
            Listener::Plain => None,
            Listener::Tls => match self.tls.as_ref().map(|t| t.accept()) {
                Some(Ok(tls)) => Some(Box::new(tls)),
                other => {
                    log::warn!(
                        "shard {}: TLS connection refused: {:?}",
                        self.id,
                        other.map(|r| r.err())
                    );
                    self.stats.tls_failures.inc();
                    self.io.close(conn);
                    return;
                }
            },
        };
        self.open_session(conn, State::Login);
        self.sessions[conn.index()].tls = tls;
    }

    /// Bytes arrived for `conn`: TLS connections decrypt them first.
    fn on_recv(&mut self, conn: ConnId, data: &[u8]) {
        let tls = self
            .sessions
            .get_mut(conn.index())
            .and_then(|s| s.tls.take());
        match tls {
            None => self.on_bytes(conn, data),
            Some(tls) => self.on_tls_bytes(conn, tls, data),
        }
    }

    /// Ciphertext arrived on a TLS connection: handshake records are
    /// answered, application data goes to [`Shard::on_bytes`]. The TLS state
    /// is back in the session before any frame is handled (a LOGIN may hand
    /// the connection, TLS state and all, to another shard).
    fn on_tls_bytes(&mut self, conn: ConnId, mut tls: Box<TlsConn>, data: &[u8]) {
        let s = &mut self.sessions[conn.index()];
        if s.state == State::Closing || s.state == State::Free {
            s.tls = Some(tls);
            return; // read and drop what a closing peer still sends
        }
        let gen = s.gen;
        let was_handshaken = tls.is_handshaken();
        let mut plain = std::mem::take(&mut self.tls_plain);
        plain.clear();
        let mut records = Vec::new();
        let result = tls.read(data, &mut plain, &mut records);
        self.sessions[conn.index()].tls = Some(tls);
        if !records.is_empty() {
            self.write_records(conn, &records);
        }
        match result {
            Err(e) => {
                self.stats.protocol_errors.inc();
                self.stats.tls_failures.inc();
                log::debug!(
                    "shard {}: TLS error on connection {} ({}): {e}",
                    self.id,
                    conn.0,
                    if was_handshaken {
                        "after the handshake"
                    } else {
                        "handshake"
                    }
                );
                // Whatever rustls queued (an alert) goes out, then FIN.
                self.close_after_flush(conn);
            }
            Ok(outcome) => {
                if outcome.handshake_done {
                    self.stats.tls_handshakes.inc();
                }
                if !plain.is_empty() {
                    self.on_bytes(conn, &plain);
                }
                if outcome.peer_closed {
                    let s = &self.sessions[conn.index()];
                    if s.gen == gen && s.state != State::Free {
                        self.close_now(conn);
                    }
                }
            }
        }
        self.tls_plain = plain;
    }

    fn open_session(&mut self, conn: ConnId, state: State) {
        if self.sessions.len() <= conn.index() {
            // Grow by an eighth rather than doubling: the slot table is most
            // of an idle connection's cost, and doubling leaves up to half of
            // it unused.
            let want = conn.index() + 1;
            if want > self.sessions.capacity() {
                let extra = (want / 8).max(SESSIONS_GROWTH_MIN);
                self.sessions
                    .reserve_exact(want - self.sessions.len() + extra);
            }
            self.sessions.resize_with(want, Session::default);
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen.checked_add(1).unwrap_or(1);
        let now = self.wheel.now();
        let s = &mut self.sessions[conn.index()];
        debug_assert_eq!(s.gen, 0, "slot reused while open");
        *s = Session {
            gen,
            state,
            last_rx: now,
            ..Session::default()
        };
        // The one timer entry must fire by whichever deadline can come
        // first: the login deadline now, or the idle deadline if the LOGIN
        // succeeds. `on_timer` re-arms it at the real deadline of the state
        // it finds, so firing early is harmless but firing late is not.
        let deadline = now + self.login_ticks.min(self.idle_ticks);
        self.wheel.insert(Entry { key: conn.0, gen }, deadline);
        self.stats.conns.inc();
    }

    /// Bytes arrived for `conn`.
    fn on_bytes(&mut self, conn: ConnId, data: &[u8]) {
        let now = self.wheel.now();
        let s = &mut self.sessions[conn.index()];
        match s.state {
            State::Free => return,
            // Read and drop what a closing peer still sends.
            State::Closing => return,
            // The login timeout runs from the accept: trickling bytes does not extend it.
            State::Login => {}
            State::Active => s.last_rx = now,
        }
        let gen = s.gen;
        match s.bufs.as_mut() {
            Some(b) if !b.inp.is_empty() => {
                b.inp.extend_from_slice(data);
                self.process_buffered(conn);
            }
            _ => {
                let consumed = match self.process(conn, gen, data) {
                    Some(n) => n,
                    None => return,
                };
                if consumed < data.len() {
                    let s = &mut self.sessions[conn.index()];
                    s.bufs
                        .get_or_insert_with(Box::default)
                        .inp
                        .extend_from_slice(&data[consumed..]);
                }
            }
        }
    }

    /// Decodes what is in the connection's input buffer.
    fn process_buffered(&mut self, conn: ConnId) {
        let s = &mut self.sessions[conn.index()];
        let gen = s.gen;
        let Some(bufs) = s.bufs.as_mut() else {
            return;
        };
        let inp = std::mem::take(&mut bufs.inp);
        let consumed = self.process(conn, gen, &inp);
        if let Some(consumed) = consumed {
            let s = &mut self.sessions[conn.index()];
            let bufs = s.bufs.get_or_insert_with(Box::default);
            debug_assert!(bufs.inp.is_empty());
            bufs.inp = inp;
            bufs.inp.drain(..consumed);
        }
    }

    /// Handles the frames in `data`; returns how many bytes were consumed, or
    /// `None` when the connection is gone.
    fn process(&mut self, conn: ConnId, gen: u32, data: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            let frame = match proto::decode(&data[at..], &self.limits) {
                Ok(None) => return Some(at),
                Ok(Some((frame, used))) => (frame, used),
                Err(e) => {
                    self.stats.protocol_errors.inc();
                    let text = e.to_string();
                    self.fail(conn, e.code(), 0, &text);
                    return None;
                }
            };
            let (frame, used) = frame;
            match self.on_frame(conn, frame, &data[at + used..]) {
                Flow::Next => at += used,
                Flow::Blocked => {
                    self.io.set_recv(conn, false);
                    self.blocked.push(conn);
                    return Some(at);
                }
                Flow::Stop => return None,
            }
            let s = &self.sessions[conn.index()];
            if s.gen != gen || s.state == State::Closing {
                return None;
            }
        }
    }

    fn on_frame(&mut self, conn: ConnId, frame: Frame<'_>, rest: &[u8]) -> Flow {
        let s = &self.sessions[conn.index()];
        let (state, user) = (s.state, s.user);
        match (state, frame) {
            (State::Login, Frame::Login { version, token }) => {
                self.on_login(conn, version, token, rest)
            }
            (State::Login, other) => {
                self.stats.protocol_errors.inc();
                let text = format!("{} before LOGIN", other.name());
                self.fail(conn, ErrorCode::NotLoggedIn, 0, &text);
                Flow::Stop
            }
            (
                State::Active,
                Frame::Send {
                    client_id,
                    to,
                    body,
                },
            ) => self.on_send(conn, client_id, to, body),
            (State::Active, Frame::Delivered { server_id }) => {
                self.on_delivered(user, server_id);
                Flow::Next
            }
            (State::Active, Frame::Read { server_id, from }) => {
                let peer = user;
                if from != 0 {
                    // Behind the delivery receipt, which waits for a commit.
                    self.replies.push((
                        home_shard(from, self.shards),
                        Msg::Receipt {
                            user: from,
                            kind: ReceiptKind::Read,
                            server_id,
                            peer,
                        },
                    ));
                }
                Flow::Next
            }
            (State::Active, Frame::Ping { nonce }) => {
                self.write(conn, &Frame::Pong { nonce });
                Flow::Next
            }
            (State::Active, Frame::Pong { .. }) => Flow::Next,
            (State::Active, Frame::Login { .. }) => {
                self.stats.protocol_errors.inc();
                self.fail(conn, ErrorCode::AlreadyLoggedIn, 0, "already logged in");
                Flow::Stop
            }
            (State::Active, Frame::Bye { .. }) => {
                self.close_now(conn);
                Flow::Stop
            }
            (_, other) => {
                self.stats.protocol_errors.inc();
                let text = format!("{} is not valid here", other.name());
                self.fail(conn, ErrorCode::BadState, 0, &text);
                Flow::Stop
            }
        }
    }

    fn on_login(&mut self, conn: ConnId, version: u8, token: &[u8], rest: &[u8]) -> Flow {
        if version != proto::VERSION {
            self.stats.logins_failed.inc();
            let text = format!(
                "protocol version {version} not supported, this server speaks {}",
                proto::VERSION
            );
            self.login_err(conn, ErrorCode::BadVersion, &text);
            return Flow::Stop;
        }
        let user = match token::verify(
            self.config.token_secret.as_bytes(),
            token,
            token::now_unix_s(),
        ) {
            Ok(user) => user,
            Err(e) => {
                self.stats.logins_failed.inc();
                let code = match e {
                    token::TokenError::Expired => ErrorCode::TokenExpired,
                    _ => ErrorCode::BadToken,
                };
                self.login_err(conn, code, &e.to_string());
                return Flow::Stop;
            }
        };
        let home = home_shard(user, self.shards);
        if !self.peer_up(home) {
            self.stats.unavailable.inc();
            self.login_err(
                conn,
                ErrorCode::Unavailable,
                "your home shard is restarting, retry later",
            );
            return Flow::Stop;
        }
        if home == self.id {
            let leftover = rest.to_vec();
            self.install(conn, user);
            if !leftover.is_empty() {
                self.on_bytes(conn, &leftover);
            }
            return Flow::Stop;
        }
        // The socket moves home with whatever followed the LOGIN frame.
        let leftover = rest.to_vec();
        let mut s = std::mem::take(&mut self.sessions[conn.index()]);
        // TLS records (session tickets) may wait to be sent; frames may not.
        debug_assert!(
            s.bufs.as_ref().is_none_or(|b| b.plain.is_empty()),
            "nothing is written before LOGIN_OK"
        );
        debug_assert!(s.tls.is_some() || s.out_pending() == 0);
        let out = s
            .bufs
            .take()
            .map(|b| b.out[b.out_sent..].to_vec())
            .unwrap_or_default();
        let tls = s.tls.take();
        self.stats.conns.sub(1);
        self.stats.handoffs_out.inc();
        match self.io.detach(conn, home) {
            Ok(detached) => self.route(
                home,
                Msg::Handoff {
                    conn: detached,
                    user,
                    leftover,
                    tls,
                    out,
                },
            ),
            Err(e) => log::warn!("shard {}: detach for handoff failed: {e}", self.id),
        }
        Flow::Stop
    }

    /// Makes `conn` the session of `user` on this, its home shard.
    fn install(&mut self, conn: ConnId, user: u64) {
        if let Some(old) = self.online.get(&user).map(|o| o.conn) {
            self.write(
                old,
                &Frame::Bye {
                    reason: ByeReason::Replaced,
                },
            );
            self.close_after_flush(old);
        }
        self.stats.logins_ok.inc();
        self.io.established(conn);
        let s = &mut self.sessions[conn.index()];
        s.user = user;
        s.state = State::Active;
        self.online.insert(
            user,
            Online {
                conn,
                sent_upto: 0,
                inflight: 0,
                inflight_bytes: 0,
                held: false,
            },
        );
        self.stats.users_online.set(self.online.len() as u64);
        let offline_count = self.store.len(user) as u64;
        self.write(
            conn,
            &Frame::LoginOk {
                server_time_ms: now_ms(),
                offline_count,
            },
        );
        for receipt in self.receipts.remove(&user).unwrap_or_default() {
            self.write_receipt(conn, receipt);
        }
        self.pump(user, false);
    }

    fn on_send(&mut self, conn: ConnId, client_id: u64, to: u64, body: &[u8]) -> Flow {
        #[cfg(debug_assertions)]
        if to == PANIC_USER {
            panic!("injected panic: SEND to PANIC_USER");
        }
        #[cfg(debug_assertions)]
        if to == CRASH_USER {
            self.crash = true;
            return Flow::Next;
        }
        if to == 0 {
            self.write(
                conn,
                &Frame::Error {
                    code: ErrorCode::BadRecipient,
                    client_id,
                    text: "user 0 does not exist",
                },
            );
            return Flow::Next;
        }
        let dst = home_shard(to, self.shards);
        if !self.peer_up(dst) {
            self.stats.unavailable.inc();
            self.write(
                conn,
                &Frame::Error {
                    code: ErrorCode::Unavailable,
                    client_id,
                    text: "the recipient's shard is restarting, retry later",
                },
            );
            return Flow::Next;
        }
        if dst != self.id && self.outbox[dst].len() >= self.config.ring_slots {
            // The ring and the outbox are full: stop reading this sender.
            return Flow::Blocked;
        }
        let s = &self.sessions[conn.index()];
        let msg = Msg::Send {
            from: s.user,
            reply: ConnRef {
                shard: self.id as u16,
                conn,
                gen: s.gen,
            },
            client_id,
            to,
            body: body.into(),
        };
        self.stats.msgs_in.inc();
        self.route(dst, msg);
        Flow::Next
    }

    fn on_delivered(&mut self, user: u64, server_id: u64) {
        let Some(msg) = self.store.remove(user, server_id) else {
            return; // a duplicate or unknown id: DELIVERED is idempotent
        };
        if let Some(on) = self.online.get_mut(&user) {
            if server_id <= on.sent_upto {
                let frame = Frame::Deliver {
                    server_id,
                    from: msg.from,
                    server_time_ms: msg.time_ms,
                    body: &msg.body,
                };
                on.inflight = on.inflight.saturating_sub(1);
                on.inflight_bytes = on
                    .inflight_bytes
                    .saturating_sub(proto::encoded_len(&frame) as u32);
            }
        }
        // The receipt waits for the commit that holds the tombstone.
        self.replies.push((
            home_shard(msg.from, self.shards),
            Msg::Receipt {
                user: msg.from,
                kind: ReceiptKind::Delivered,
                server_id,
                peer: user,
            },
        ));
        self.pump(user, false);
    }

    /// Sends queued messages to `user`'s connection, up to the delivery
    /// window: `deliver_inflight_max` DELIVERs and
    /// `deliver_inflight_bytes_max` bytes unanswered.
    ///
    /// A backlog (at login, or while catching up) is sent only as far as the
    /// output budget `conn_out_bytes_max`, and continued as DELIVEREDs come
    /// back. The burst is the server's own doing: judged as a slow reader, a
    /// client with more backlog than one socket write takes would get
    /// BYE(slow) at every login before it could answer a single DELIVER, and
    /// never catch up. `live` (a message just arrived) to a caught-up
    /// connection is sent regardless, so a reader that cannot keep up with
    /// live traffic still passes the budget and is closed as slow.
    fn pump(&mut self, user: u64, live: bool) {
        let Some(on) = self.online.get_mut(&user) else {
            return;
        };
        let budget = !live || on.held;
        let pending = self.sessions[on.conn.index()].out_pending();
        let mut out = std::mem::take(&mut self.frame_buf);
        out.clear();
        let mut sent = 0;
        while (on.inflight as usize) < self.config.deliver_inflight_max {
            let Some(m) = self.store.next_after(user, on.sent_upto) else {
                break;
            };
            let frame = Frame::Deliver {
                server_id: m.server_id,
                from: m.from,
                server_time_ms: m.time_ms,
                body: &m.body,
            };
            let len = proto::encoded_len(&frame);
            // With nothing in flight one DELIVER always goes, so a DELIVERED
            // will come back to continue.
            if on.inflight > 0
                && (on.inflight_bytes as usize + len > self.config.deliver_inflight_bytes_max
                    || budget && pending + out.len() + len > self.config.conn_out_bytes_max)
            {
                break;
            }
            proto::encode(&frame, &mut out);
            on.sent_upto = m.server_id;
            on.inflight += 1;
            on.inflight_bytes += len as u32;
            sent += 1;
        }
        on.held = self.store.next_after(user, on.sent_upto).is_some();
        let conn = on.conn;
        if sent > 0 {
            self.stats.msgs_out.add(sent);
            self.write_bytes(conn, &out);
        }
        self.frame_buf = out;
    }

    // ---- cross-shard messages --------------------------------------------

    /// Delivers `msg` to shard `dst`: handled at once when local, else queued
    /// for the ring.
    fn route(&mut self, dst: usize, msg: Msg) {
        if dst == self.id {
            self.on_msg(msg);
        } else if self.peer_up(dst) || matches!(msg, Msg::Handoff { .. } | Msg::Send { .. }) {
            // Handoffs and SENDs to a shard that is not up are refused
            // before they get here (those queued earlier wait, bounded);
            // the rest would pile up for connections that are gone.
            self.outbox[dst].push_back(msg);
        } else if matches!(msg, Msg::Receipt { .. }) {
            self.stats.receipts_dropped.inc();
        }
    }

    fn drain_rings(&mut self) {
        for src in 0..self.shards {
            if src == self.id {
                continue;
            }
            // At most one ring's worth per source per iteration.
            for _ in 0..self.config.ring_slots {
                match self.links.pop(src) {
                    Some(msg) => self.on_msg(msg),
                    None => break,
                }
            }
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Handoff {
                conn,
                user,
                leftover,
                tls,
                out,
            } => match self.io.attach(conn) {
                Ok(id) => {
                    self.stats.handoffs_in.inc();
                    self.open_session(id, State::Login);
                    self.sessions[id.index()].tls = tls;
                    if !out.is_empty() {
                        self.write_records(id, &out);
                    }
                    self.guarded(id, |shard| {
                        shard.install(id, user);
                        if !leftover.is_empty() {
                            shard.on_bytes(id, &leftover);
                        }
                    });
                    if self.stop_deadline.is_some() {
                        self.bye(id, ByeReason::Shutdown);
                    }
                }
                Err(e) => log::warn!("shard {}: attach failed: {e}", self.id),
            },
            Msg::Send {
                from,
                reply,
                client_id,
                to,
                body,
            } => {
                let server_id = (self.next_seq << 10) | self.id as u64;
                let time_ms = now_ms();
                let stored = Stored {
                    server_id,
                    from,
                    time_ms,
                    body,
                };
                let answer = match self.store.push(to, stored) {
                    Ok(()) => {
                        self.next_seq += 1;
                        // Sent once durable: see `commit`.
                        self.fresh.push(to);
                        Msg::Ack {
                            reply,
                            client_id,
                            server_id,
                            time_ms,
                        }
                    }
                    Err(PushError::QueueFull(_)) => {
                        self.stats.queue_full.inc();
                        Msg::Reject {
                            reply,
                            client_id,
                            code: ErrorCode::QueueFull,
                        }
                    }
                    Err(PushError::StorageFull(_)) => {
                        self.stats.storage_full.inc();
                        Msg::Reject {
                            reply,
                            client_id,
                            code: ErrorCode::StorageFull,
                        }
                    }
                };
                // Answers keep their order and wait for the commit.
                self.replies.push((reply.shard as usize, answer));
            }
            Msg::Ack {
                reply,
                client_id,
                server_id,
                time_ms,
            } => {
                if let Some(conn) = self.live(reply) {
                    self.stats.acks.inc();
                    self.write(
                        conn,
                        &Frame::Ack {
                            client_id,
                            server_id,
                            server_time_ms: time_ms,
                        },
                    );
                }
            }
            Msg::Reject {
                reply,
                client_id,
                code,
            } => {
                if let Some(conn) = self.live(reply) {
                    let text = match code {
                        ErrorCode::QueueFull => "recipient's queue is full, retry later",
                        ErrorCode::StorageFull => "server storage is full, retry later",
                        ErrorCode::Internal => {
                            "the recipient's shard restarted before storing it, resend"
                        }
                        _ => "message refused",
                    };
                    self.write(
                        conn,
                        &Frame::Error {
                            code,
                            client_id,
                            text,
                        },
                    );
                }
            }
            Msg::Receipt {
                user,
                kind,
                server_id,
                peer,
            } => {
                let receipt = PendingReceipt {
                    kind,
                    server_id,
                    peer,
                };
                match self.online.get(&user).map(|o| o.conn) {
                    Some(conn) => self.write_receipt(conn, receipt),
                    None => {
                        // Kept for the sender's next login, within the queue limit.
                        let pending = self.receipts.entry(user).or_default();
                        if pending.len() < self.config.queue_len_max {
                            pending.push(receipt);
                        } else {
                            self.stats.receipts_dropped.inc();
                        }
                    }
                }
            }
        }
    }

    fn write_receipt(&mut self, conn: ConnId, r: PendingReceipt) {
        self.stats.receipts.inc();
        self.write(
            conn,
            &Frame::Receipt {
                kind: r.kind,
                server_id: r.server_id,
                peer: r.peer,
            },
        );
    }

    /// The connection `r` names, if it is still the same one and open.
    fn live(&self, r: ConnRef) -> Option<ConnId> {
        debug_assert_eq!(r.shard as usize, self.id);
        let s = self.sessions.get(r.conn.index())?;
        (s.gen == r.gen && s.state == State::Active).then_some(r.conn)
    }

    fn flush_outboxes(&mut self) {
        for dst in 0..self.shards {
            while let Some(msg) = self.outbox[dst].pop_front() {
                if let Err(msg) = self.links.try_push(dst, msg) {
                    self.outbox[dst].push_front(msg);
                    self.stats.ring_full.inc();
                    break;
                }
            }
            // A login storm can leave an outbox holding a large allocation
            // for ever; give it back once drained.
            let outbox = &mut self.outbox[dst];
            if outbox.is_empty() && outbox.capacity() > OUTBOX_KEEP_CAPACITY {
                outbox.shrink_to(OUTBOX_KEEP_CAPACITY);
            }
        }
        self.links.notify();
    }

    fn retry_blocked(&mut self) {
        if self.blocked.is_empty() {
            return;
        }
        for conn in std::mem::take(&mut self.blocked) {
            if self
                .sessions
                .get(conn.index())
                .is_some_and(|s| s.state == State::Active)
            {
                self.io.set_recv(conn, true);
                self.guarded(conn, |shard| shard.process_buffered(conn));
            }
        }
    }

    // ---- output ------------------------------------------------------------

    fn write(&mut self, conn: ConnId, frame: &Frame<'_>) {
        let mut buf = std::mem::take(&mut self.frame_buf);
        buf.clear();
        proto::encode(frame, &mut buf);
        self.write_bytes(conn, &buf);
        self.frame_buf = buf;
    }

    /// Queues encoded frames; on a TLS connection they are encrypted at flush.
    fn write_bytes(&mut self, conn: ConnId, bytes: &[u8]) {
        let s = &mut self.sessions[conn.index()];
        if s.state == State::Free || s.write_closed {
            return;
        }
        let bufs = s.bufs.get_or_insert_with(Box::default);
        if s.tls.is_some() {
            bufs.plain.extend_from_slice(bytes);
        } else {
            bufs.out.extend_from_slice(bytes);
        }
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(conn);
        }
    }

    /// Queues TLS records (handshake, tickets, alerts) as they are.
    fn write_records(&mut self, conn: ConnId, records: &[u8]) {
        let s = &mut self.sessions[conn.index()];
        if s.state == State::Free || s.write_closed {
            return;
        }
        s.bufs
            .get_or_insert_with(Box::default)
            .out
            .extend_from_slice(records);
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(conn);
        }
    }

    fn flush_output(&mut self) {
        for conn in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.sessions.get_mut(conn.index()) {
                s.dirty = false;
            }
            self.flush_conn(conn);
        }
    }

    /// Sends what the connection has pending; closes it when it will not
    /// drain (slow reader) or failed.
    fn flush_conn(&mut self, conn: ConnId) {
        let Some(s) = self.sessions.get_mut(conn.index()) else {
            return;
        };
        if s.state == State::Free {
            return;
        }
        let Some(bufs) = s.bufs.as_mut() else {
            if s.state == State::Closing && !s.write_closed {
                s.write_closed = true;
                self.io.shutdown_write(conn);
            }
            return;
        };
        if !bufs.plain.is_empty() {
            match s.tls.as_mut() {
                Some(tls) if tls.is_handshaken() => {
                    let Bufs { plain, out, .. } = &mut **bufs;
                    if let Err(e) = tls.encrypt(plain, out) {
                        log::debug!("shard {}: TLS encrypt: {e}", self.id);
                        self.stats.tls_failures.inc();
                        self.close_now(conn);
                        return;
                    }
                }
                // Frames for a TLS connection whose handshake did not finish
                // (a BYE at shutdown): nothing can carry them.
                _ => {}
            }
            bufs.plain.clear();
        }
        if s.state == State::Closing && !s.write_closed {
            // Last frames are encrypted above; the TLS stream ends before the FIN.
            if let Some(tls) = s.tls.as_mut() {
                tls.close_notify(&mut bufs.out);
            }
        }
        if bufs.out_sent < bufs.out.len() {
            match self.io.send(conn, &bufs.out[bufs.out_sent..]) {
                Ok(n) => {
                    bufs.out_sent += n;
                    self.stats.bytes_out.add(n as u64);
                }
                Err(_) => {
                    self.close_now(conn);
                    return;
                }
            }
        }
        let pending = bufs.out.len() - bufs.out_sent;
        if pending == 0 {
            bufs.out.clear();
            bufs.out_sent = 0;
            if bufs.inp.is_empty() {
                s.bufs = None; // idle again: no buffers
            }
            if s.state == State::Closing && !s.write_closed {
                s.write_closed = true;
                self.io.shutdown_write(conn);
            }
        } else if bufs.out_sent > bufs.out.len() / 2 {
            bufs.out.drain(..bufs.out_sent);
            bufs.out_sent = 0;
        }
        if pending > self.config.conn_out_bytes_max && s.state == State::Active {
            // Undelivered messages stay queued; nothing more is written here.
            self.stats.slow_closes.inc();
            log::info!("shard {}: closing slow reader (user {})", self.id, s.user);
            self.bye(conn, ByeReason::Slow);
        }
    }

    // ---- closing -----------------------------------------------------------

    /// Sends ERROR and closes once it is flushed.
    fn fail(&mut self, conn: ConnId, code: ErrorCode, client_id: u64, text: &str) {
        self.write(
            conn,
            &Frame::Error {
                code,
                client_id,
                text,
            },
        );
        self.close_after_flush(conn);
    }

    fn login_err(&mut self, conn: ConnId, code: ErrorCode, text: &str) {
        self.write(conn, &Frame::LoginErr { code, text });
        self.close_after_flush(conn);
    }

    fn bye(&mut self, conn: ConnId, reason: ByeReason) {
        self.write(conn, &Frame::Bye { reason });
        self.close_after_flush(conn);
    }

    /// Leaves the session: no more frames are handled or messages delivered;
    /// pending output is flushed, then the write side is shut down and the
    /// peer gets `LINGER` to close before we do.
    fn close_after_flush(&mut self, conn: ConnId) {
        self.go_offline(conn);
        let now = self.wheel.now();
        let s = &mut self.sessions[conn.index()];
        if s.state == State::Free || s.state == State::Closing {
            return;
        }
        s.state = State::Closing;
        s.last_rx = now;
        if let Some(b) = s.bufs.as_mut() {
            b.inp = Vec::new();
        }
        let gen = s.gen;
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(conn);
        }
        self.io.set_recv(conn, true);
        self.wheel
            .insert(Entry { key: conn.0, gen }, now + self.linger_ticks);
    }

    /// Removes `conn`'s user from the online map if `conn` is its session.
    fn go_offline(&mut self, conn: ConnId) {
        let user = self.sessions[conn.index()].user;
        if user != 0 && self.online.get(&user).is_some_and(|o| o.conn == conn) {
            self.online.remove(&user);
            self.stats.users_online.set(self.online.len() as u64);
        }
    }

    /// Closes at once and frees the slot.
    fn close_now(&mut self, conn: ConnId) {
        if self
            .sessions
            .get(conn.index())
            .is_none_or(|s| s.state == State::Free)
        {
            return;
        }
        self.go_offline(conn);
        self.sessions[conn.index()] = Session::default();
        self.io.close(conn);
        self.stats.conns.sub(1);
        self.stats.closed.inc();
    }

    fn on_timer(&mut self, entry: Entry) {
        let conn = ConnId(entry.key);
        let Some(s) = self.sessions.get(conn.index()) else {
            return;
        };
        if s.gen != entry.gen {
            return; // the connection is gone; its slot may be reused
        }
        let (ticks, state) = match s.state {
            State::Free => return,
            State::Login => (self.login_ticks, State::Login),
            State::Active => (self.idle_ticks, State::Active),
            State::Closing => (self.linger_ticks, State::Closing),
        };
        let deadline = s.last_rx + ticks;
        if deadline > self.wheel.now() {
            self.wheel.insert(entry, deadline);
            return;
        }
        match state {
            State::Active => {
                self.stats.idle_closes.inc();
                self.bye(conn, ByeReason::Idle);
            }
            _ => self.close_now(conn),
        }
    }

    fn begin_shutdown(&mut self) {
        log::info!(
            "shard {}: shutting down, {} connections",
            self.id,
            self.io.len()
        );
        self.stop_deadline =
            Some(Instant::now() + Duration::from_millis(self.config.shutdown_grace_ms));
        self.io.stop_accepting();
        for i in 0..self.sessions.len() {
            match self.sessions[i].state {
                State::Login | State::Active => self.bye(ConnId(i as u32), ByeReason::Shutdown),
                State::Free | State::Closing => {}
            }
        }
    }

    fn close_all(&mut self) {
        self.flush_output();
        for i in 0..self.sessions.len() {
            self.close_now(ConnId(i as u32));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    fn session_slot_is_small() {
        // The per-connection budget is 256 bytes, all structures included.
        assert!(
            std::mem::size_of::<Session>() <= 40,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
