// Kept whole past 800 lines: one worker's state machine; every handler acts on `Worker`'s state.
//! One worker thread: its share of the connections, the protocol spoken on
//! them, and the commands of the main thread (open, send, storm, close).
//!
//! Connection `g` (global) belongs to worker `g % workers` as local slot
//! `g / workers`; its user id is `user_base + g` (with `devices` above 1:
//! `user_base + g / devices`, as device `g % devices`). Message `n` of a send plan
//! is sent by the worker that owns its sender. The worker never blocks on a
//! socket: it hands everything to its [`Engine`] and reacts to the events.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::proto::{self, Frame, Limits, ReceiptKind};
use tern_client::dedupe::Incoming;
use tern_client::session_state::{Refusal, SessionState};

use crate::addr;
use crate::engine::{errno_name, Engine, EngineStats, Event};
use crate::ledger::{Delivery, Ledger, OrderCheck, ACKED, RECEIPTED, REFUSED, SENT, SKIPPED};
use crate::report::{record, Hists, Shared, C};
use crate::sched::{mix, Pacer, Rng, Schedule};

/// Body bytes that identify a message: run id (4), message number (8),
/// sender user (8). Bodies are at least this long.
pub const BODY_HEADER_BYTES: usize = 20;
/// A send later than this after its intended time counts as late.
const LATE_NS: u64 = 1_000_000;
/// Most messages one loop iteration sends; the rest wait for the next one.
const SENDS_PER_TICK_MAX: u64 = 4096;
/// Most opens one loop iteration starts.
const OPENS_PER_TICK_MAX: u32 = 1024;
/// Longest sleep in `poll`.
const WAIT_MAX: Duration = Duration::from_millis(20);
/// How often the worker publishes latencies for the progress line.
const PUBLISH_EVERY_NS: u64 = 200_000_000;
/// Ping sweep step: every step pings the next `conns * step / ping_every` slots.
/// Short, so a million connections' keepalives go out as a steady trickle
/// (about 170 PINGs per 10 ms at 60 s), not as one burst per second.
const PING_STEP_NS: u64 = 10_000_000;
/// In reconnect mode, wait this long (plus jitter) before retrying a failed connect.
const RETRY_NS: u64 = 1_000_000_000;
/// Receipts that arrived before their ACK, kept at most.
const EARLY_RECEIPTS_MAX: usize = 100_000;
/// Cut kinds ([`Worker::cut_due`]).
const CUT_NOW: u8 = 0;
const CUT_AFTER_SEND: u8 = 1;
const CUT_BEFORE_DELIVERED: u8 = 2;
/// With cuts: a cut connection reconnects after a random wait up to this.
const CUT_BACKOFF_NS: u64 = 100_000_000;
/// With cuts: messages each user's duplicate filter remembers. A redelivery
/// follows its first copy within a reconnect; a user gets a few messages a
/// second, so 256 covers minutes. Its maps grow with use: about 30 KiB once
/// a user has received 256 messages, nothing before the first.
pub const DEDUPE_WINDOW: usize = 256;

const S_IDLE: u8 = 0;
const S_CONNECTING: u8 = 1;
const S_LOGGING_IN: u8 = 2;
const S_UP: u8 = 3;
const S_CLOSING: u8 = 4;
/// Closing after a REDIRECT, or closed and waiting for room to open again
/// towards the node it named; counted as in flight, like a login.
const S_REDIRECTING: u8 = 5;

/// REDIRECTs followed in a row for one connection before its login counts
/// as failed (`login:redirect_loop`): as many as the client library takes.
const REDIRECTS_IN_A_ROW_MAX: u8 = 3;

/// Flag: a BYE or LOGIN_ERR explained why the server closes.
const F_EXPLAINED: u8 = 1 << 0;
/// Flag: open again once released (reconnect mode).
const F_REOPEN: u8 = 1 << 1;

/// Settings every worker shares; fixed for the run.
pub struct Plan {
    /// Connections over all workers (global indices `0..conns`).
    pub conns: u64,
    /// Worker threads.
    pub workers: usize,
    /// User id of connection 0.
    pub user_base: u64,
    /// Connections per user, each as one of its devices (`connect` only;
    /// 1: every connection is its own user, with a `v1.` token).
    pub devices: u64,
    /// Token secret.
    pub secret: Vec<u8>,
    /// Token expiry, unix seconds.
    pub token_expiry_s: u64,
    /// Send LOGIN after connecting (false: raw TCP connections).
    pub login: bool,
    /// Source addresses.
    pub sources: usize,
    /// Server addresses.
    pub servers: usize,
    /// PING each logged-in connection this often (zero: never).
    pub ping_every: Duration,
    /// SUBSCRIBEs each connection sends after LOGIN_OK: the next this many
    /// users of the run (wrapping).
    pub subscribe: u32,
    /// Connects and logins in progress per worker, at most.
    pub inflight_max: u32,
    /// The server sends delivery receipts (Tern protocol; not MQTT 3.1.1,
    /// whose PUBACK names no message): ACKed messages wait for one.
    pub receipts: bool,
    /// Identifies this run's message bodies.
    pub run_id: u32,
    /// Message `n` of this run is sent with client id `client_id_base + n +
    /// 1`. A version 2 server keeps each sender's highest client id across
    /// connections and runs (client ids increase across app restarts,
    /// docs/PROTOCOL.md), so a run that reuses users must start above the
    /// last one: the run's start in microseconds since the Unix epoch.
    pub client_id_base: u64,
    /// Time zero of the run; all `_ns` times count from it.
    pub epoch: Instant,
    /// Set by the main thread when MemAvailable fell below the floor.
    pub stop_opening: Arc<AtomicBool>,
    /// Codec limits for the server's frames.
    pub limits: Limits,
}

impl Plan {
    /// User id of global connection `g`.
    pub fn user(&self, g: u64) -> u64 {
        self.user_base + g / self.devices
    }

    /// The login token of global connection `g`: a device token (device
    /// `g % devices`) when users have several devices.
    fn token(&self, g: u64) -> String {
        let user = self.user(g);
        if self.devices > 1 {
            let device = (g % self.devices) as u32;
            tern::token::mint_device(&self.secret, user, device, self.token_expiry_s)
        } else {
            tern::token::mint(&self.secret, user, self.token_expiry_s)
        }
    }

    /// Local slots of worker `w`.
    pub fn local_conns(&self, w: usize) -> u32 {
        let w = w as u64;
        let n = if self.conns > w {
            (self.conns - w).div_ceil(self.workers as u64)
        } else {
            0
        };
        u32::try_from(n).expect("at most 2^32 connections per worker")
    }

    /// Local slots `first..end` of worker `w` whose global index is in `lo..hi`.
    pub fn local_range(&self, w: usize, lo: u64, hi: u64) -> (u32, u32) {
        let (w, workers) = (w as u64, self.workers as u64);
        let first = if lo > w {
            (lo - w).div_ceil(workers)
        } else {
            0
        };
        let end = if hi > w {
            (hi - w).div_ceil(workers)
        } else {
            0
        };
        let end = end.min(self.local_conns(w as usize) as u64) as u32;
        ((first as u32).min(end), end)
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Who sends message `n` to whom.
#[derive(Clone, Copy, Debug)]
pub enum Pairing {
    /// Random pairs among all connections (deterministic in `n` and `seed`).
    Random {
        /// Mixed into the choice.
        seed: u64,
    },
    /// Sender `n % senders` sends to connection `senders + n % senders`.
    Offline {
        /// Connections `0..senders` send; `senders..2*senders` receive.
        senders: u64,
    },
}

/// A schedule of messages, shared by all workers.
pub struct SendPlan {
    /// When message `n` is due.
    pub sched: Schedule,
    /// Sender and recipient of each message.
    pub pairing: Pairing,
    /// Body size, at least [`BODY_HEADER_BYTES`].
    pub body_bytes: usize,
    /// Every message's fate.
    pub ledger: Arc<Ledger>,
    /// Connections in the run (for random pairs).
    pub conns: u64,
    /// Cuts per second over all connections while the schedule runs (0 =
    /// none). With cuts, every user keeps a [`SessionState`]: un-ACKed
    /// messages are resent after reconnects, DELIVERs go through its filter.
    pub cut_rate_per_s: f64,
}

impl SendPlan {
    /// Global index of the sender of message `n`.
    pub fn sender(&self, n: u64) -> u64 {
        match self.pairing {
            Pairing::Random { seed } => mix(seed ^ n.wrapping_mul(2)) % self.conns,
            Pairing::Offline { senders } => n % senders,
        }
    }

    /// Global index of the recipient of message `n` (never its sender).
    pub fn recipient(&self, n: u64) -> u64 {
        match self.pairing {
            Pairing::Random { seed } => {
                debug_assert!(self.conns >= 2);
                let s = self.sender(n);
                let r = mix(seed ^ n.wrapping_mul(2).wrapping_add(1)) % (self.conns - 1);
                if r >= s {
                    r + 1
                } else {
                    r
                }
            }
            Pairing::Offline { senders } => senders + n % senders,
        }
    }
}

/// What the main thread tells a worker.
pub enum Cmd {
    /// Open the worker's connections whose global index is in `lo..hi`, at
    /// `rate_per_s` (this worker's share; 0 = as fast as allowed).
    Open {
        /// First global index.
        lo: u64,
        /// One past the last global index.
        hi: u64,
        /// Opens per second for this worker.
        rate_per_s: f64,
        /// Jitter each open within its interval.
        jitter: bool,
    },
    /// Send the worker's messages of the plan on schedule.
    Send(Arc<SendPlan>),
    /// Reset every connection at once and reconnect each after a random delay
    /// in `0..=jitter_ns`; keep reconnecting failures until `CloseAll`.
    Storm {
        /// Largest reconnect delay.
        jitter_ns: u64,
    },
    /// The final drain: log these local slots (recipients of overdue
    /// messages) in again on a fresh connection and take their whole queue.
    /// A slot is drained once it has received as many DELIVERs as its
    /// LOGIN_OK's `offline_count` announced.
    FinalDrain {
        /// Local slots, each at most once.
        slots: Vec<u32>,
    },
    /// Close every connection; stop opening and reconnecting.
    CloseAll,
    /// Close everything and exit once all slots are idle (or at `deadline_ns`).
    Stop {
        /// Exit by then even if closes are outstanding.
        deadline_ns: u64,
    },
}

/// What a worker hands back when it exits.
pub struct WorkerResult {
    /// All latencies it recorded.
    pub hists: Hists,
    /// Local slots that logged in again in the final drain and received their
    /// whole queue.
    pub drained: Vec<u32>,
    /// The engine's counters.
    pub engine: EngineStats,
    /// (recipient, sender) pairs the order check tracked.
    pub order_pairs: usize,
}

/// Per-connection state: 16 bytes.
struct Conn {
    /// Bytes of a partial frame; allocated only while a frame is partial.
    // Boxed on purpose: 8 bytes per connection while empty, not 24.
    #[allow(clippy::box_collection)]
    inbuf: Option<Box<Vec<u8>>>,
    /// When the current open started, µs since the epoch, modulo 2^32 (so
    /// durations up to 71 minutes come out right).
    t_open_us: u32,
    state: u8,
    flags: u8,
}

/// Where a REDIRECT sent a connection: it opens there from now on.
#[derive(Clone, Copy, Debug)]
struct Redirected {
    /// The engine's index of the named node.
    server: u32,
    /// REDIRECTs since its last LOGIN_OK.
    in_a_row: u8,
}

/// Where a slot of the final drain is ([`Cmd::FinalDrain`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recheck {
    /// Its old connection is closing; it reopens once released.
    Closing,
    /// Connecting or logging in again.
    Opening,
    /// Logged in; `got` of the `expected` queued DELIVERs have arrived.
    Draining {
        /// LOGIN_OK's `offline_count`.
        expected: u64,
        /// DELIVERs received on this connection.
        got: u64,
    },
    /// Received its whole queue.
    Drained,
    /// The connect or login failed, or the server closed it while draining.
    Failed,
}

/// One worker.
pub struct Worker<E: Engine> {
    id: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    engine: E,
    conns: Vec<Conn>,
    // Opening.
    open_next: u32,
    open_end: u32,
    pacer: Pacer,
    inflight: u32,
    /// Slots not idle.
    busy: u32,
    reopen: BinaryHeap<Reverse<(u64, u32)>>,
    reconnect: bool,
    storm_jitter_ns: u64,
    rng: Rng,
    // Sending.
    send: Option<Arc<SendPlan>>,
    /// The latest send plan, kept after its schedule ends: ACKs, deliveries
    /// and receipts still arrive during the drain.
    last_plan: Option<Arc<SendPlan>>,
    send_next: u64,
    /// (recipient user, server_id) -> message number, between ACK and RECEIPT.
    awaiting_receipt: HashMap<(u64, u64), u64>,
    /// (peer user, server_id) of receipts that beat their ACK.
    early_receipts: HashMap<(u64, u64), u64>,
    order: OrderCheck,
    /// Slots of the final drain (at most this worker's connections).
    recheck: HashMap<u32, Recheck>,
    // Clusters (docs/CLUSTER.md): only redirected slots have an entry.
    /// Slots a REDIRECT sent to another node.
    redirected: HashMap<u32, Redirected>,
    /// REDIRECT addresses seen, with the engine's index (`None`: could not
    /// be resolved or too many nodes), so each is resolved once.
    redirect_servers: HashMap<Box<str>, Option<u32>>,
    /// Redirected slots closed and idle in the engine, waiting for room to
    /// open towards their node.
    redirect_wait: Vec<u32>,
    // Cuts (`SendPlan::cut_rate_per_s`).
    /// Per local slot, allocated at its first use; empty without cuts.
    sessions: Vec<Option<Box<SessionState>>>,
    /// First client id of every user's session: unix µs at the send command.
    first_client_id: u64,
    /// Next cut, while the schedule runs.
    cut_pacer: Option<Pacer>,
    /// Where the due cut goes, once it is due: `CUT_NOW` (a random slot),
    /// `CUT_AFTER_SEND`, `CUT_BEFORE_DELIVERED`.
    cut_kind: u8,
    /// Reconnect cut or dropped connections (until `CloseAll`).
    cut_reopen: bool,
    // Keepalive.
    ping_cursor: u32,
    ping_next_ns: u64,
    ping_last_ns: u64,
    /// ns x slots of pinging owed, carried between sweeps.
    ping_owed: u128,
    ping_nonce: u64,
    // Output.
    hists: Hists,
    ivl: Hists,
    publish_next_ns: u64,
    stop_deadline_ns: Option<u64>,
    wbuf: Vec<u8>,
    body: Vec<u8>,
}

impl<E: Engine> Worker<E> {
    /// A worker with its engine, ready to `run`.
    pub fn new(
        id: usize,
        plan: Arc<Plan>,
        shared: Arc<Shared>,
        rx: Receiver<Cmd>,
        engine: E,
    ) -> Self {
        let n = plan.local_conns(id);
        let conns = (0..n)
            .map(|_| Conn {
                inbuf: None,
                t_open_us: 0,
                state: S_IDLE,
                flags: 0,
            })
            .collect();
        let seed = mix(plan.run_id as u64 ^ (id as u64) << 32);
        Worker {
            id,
            shared,
            rx,
            engine,
            conns,
            open_next: 0,
            open_end: 0,
            pacer: Pacer::new(0, 0.0, None),
            inflight: 0,
            busy: 0,
            reopen: BinaryHeap::new(),
            reconnect: false,
            storm_jitter_ns: 0,
            rng: Rng::new(seed),
            send: None,
            last_plan: None,
            send_next: 0,
            awaiting_receipt: HashMap::new(),
            early_receipts: HashMap::new(),
            order: OrderCheck::default(),
            recheck: HashMap::new(),
            redirected: HashMap::new(),
            redirect_servers: HashMap::new(),
            redirect_wait: Vec::new(),
            sessions: Vec::new(),
            first_client_id: 0,
            cut_pacer: None,
            cut_kind: CUT_NOW,
            cut_reopen: false,
            ping_cursor: 0,
            ping_next_ns: 0,
            ping_last_ns: 0,
            ping_owed: 0,
            ping_nonce: 0,
            hists: Hists::new(),
            ivl: Hists::new(),
            publish_next_ns: 0,
            stop_deadline_ns: None,
            wbuf: Vec::with_capacity(256),
            body: Vec::new(),
            plan,
        }
    }

    fn global(&self, l: u32) -> u64 {
        l as u64 * self.plan.workers as u64 + self.id as u64
    }

    /// Runs until `Cmd::Stop` has closed everything (or its deadline passed),
    /// or the command channel is dropped.
    pub fn run(mut self) -> WorkerResult {
        let mut events = Vec::new();
        let mut scratch = Vec::new();
        loop {
            let now = self.plan.now_ns();
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.command(cmd, now),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.command(Cmd::Stop { deadline_ns: now }, now);
                        break;
                    }
                }
            }
            if let Some(deadline) = self.stop_deadline_ns {
                if self.busy == 0 || now >= deadline {
                    break;
                }
            }
            self.open_due(now);
            self.reopen_due(now);
            self.send_due(now);
            self.cut_due(now);
            self.ping_due(now);
            let timeout = self.next_wake(now);
            if let Err(e) = self.engine.poll(timeout, &mut events, &mut scratch) {
                eprintln!("worker {}: engine failed: {e}", self.id);
                break;
            }
            for ev in events.drain(..) {
                self.on_event(ev, &scratch);
            }
            scratch.clear();
            if now >= self.publish_next_ns {
                self.publish();
                self.publish_next_ns = now + PUBLISH_EVERY_NS;
            }
        }
        self.publish();
        // Whatever is still open at exit leaves the gauges.
        for l in 0..self.conns.len() as u32 {
            self.set_state(l, S_IDLE);
        }
        let drained = self
            .recheck
            .iter()
            .filter(|(_, r)| **r == Recheck::Drained)
            .map(|(&l, _)| l)
            .collect();
        WorkerResult {
            hists: self.hists,
            drained,
            engine: self.engine.stats(),
            order_pairs: self.order.pairs(),
        }
    }

    fn publish(&mut self) {
        self.hists.add(&self.ivl);
        self.shared
            .interval
            .lock()
            .expect("interval lock")
            .add(&self.ivl);
        self.ivl.reset();
        if self.order.out_of_order > 0 {
            self.shared.add(C::out_of_order, self.order.out_of_order);
            self.order.out_of_order = 0;
        }
    }

    fn command(&mut self, cmd: Cmd, now: u64) {
        match cmd {
            Cmd::Open {
                lo,
                hi,
                rate_per_s,
                jitter,
            } => {
                let (first, end) = self.plan.local_range(self.id, lo, hi);
                // Any leftover of an earlier open command is dropped. The
                // main thread already added this command's count to
                // `open_pending` (so a ramp is never seen as done too early).
                let left = self.open_end - self.open_next;
                self.shared
                    .open_pending
                    .fetch_sub(left as i64, Ordering::Relaxed);
                self.open_next = first;
                self.open_end = end;
                let seed = jitter.then(|| self.rng.next_u64());
                self.pacer = Pacer::new(now, rate_per_s, seed);
            }
            Cmd::Send(plan) => {
                if plan.cut_rate_per_s > 0.0 {
                    let share = plan.cut_rate_per_s / self.plan.workers as f64;
                    let seed = self.rng.next_u64();
                    self.cut_pacer = Some(Pacer::new(plan.sched.begin_ns, share, Some(seed)));
                    self.cut_reopen = true;
                    self.sessions = (0..self.conns.len()).map(|_| None).collect();
                    self.first_client_id = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1, |d| d.as_micros() as u64);
                }
                self.send_next = 0;
                self.last_plan = Some(plan.clone());
                self.send = Some(plan);
            }
            Cmd::Storm { jitter_ns } => {
                self.reconnect = true;
                self.storm_jitter_ns = jitter_ns;
                for l in 0..self.conns.len() as u32 {
                    if self.conns[l as usize].state != S_IDLE {
                        self.conns[l as usize].flags |= F_REOPEN;
                        self.close(l);
                    }
                }
            }
            Cmd::FinalDrain { slots } => self.final_drain(slots, now),
            Cmd::CloseAll => self.close_all(),
            Cmd::Stop { deadline_ns } => {
                self.close_all();
                self.stop_deadline_ns = Some(deadline_ns);
            }
        }
    }

    /// Starts the final drain of `slots`: each one's current connection (if
    /// any) is closed first, so the login that follows is new and its
    /// LOGIN_OK counts the whole queue, including DELIVERs the old
    /// connection left unanswered.
    fn final_drain(&mut self, slots: Vec<u32>, now: u64) {
        for l in slots {
            assert!((l as usize) < self.conns.len(), "final drain of slot {l}");
            debug_assert!(!self.recheck.contains_key(&l), "slot {l} drained twice");
            self.conns[l as usize].flags &= !F_REOPEN;
            match self.conns[l as usize].state {
                S_IDLE => {
                    self.recheck.insert(l, Recheck::Opening);
                    self.reopen.push(Reverse((now, l)));
                }
                S_CLOSING => {
                    self.recheck.insert(l, Recheck::Closing);
                }
                _ => {
                    self.recheck.insert(l, Recheck::Closing);
                    self.close(l);
                }
            }
        }
    }

    /// Slot `l`'s final drain ends as `to` (drained or failed), if it is in one
    /// and has not ended yet.
    fn recheck_end(&mut self, l: u32, to: Recheck) {
        debug_assert!(to == Recheck::Drained || to == Recheck::Failed);
        let Some(r) = self.recheck.get_mut(&l) else {
            return;
        };
        if matches!(*r, Recheck::Opening | Recheck::Draining { .. }) {
            *r = to;
            let c = if to == Recheck::Drained {
                C::final_drain_drained
            } else {
                C::final_drain_failed
            };
            self.shared.add(c, 1);
        }
    }

    fn close_all(&mut self) {
        self.reconnect = false;
        self.cut_reopen = false;
        self.cut_pacer = None;
        self.reopen.clear();
        self.send = None;
        let left = self.open_end - self.open_next;
        self.shared
            .open_pending
            .fetch_sub(left as i64, Ordering::Relaxed);
        self.open_next = self.open_end;
        for l in 0..self.conns.len() as u32 {
            self.conns[l as usize].flags &= !F_REOPEN;
            self.close(l);
        }
    }

    /// Moves slot `l` to `to`, keeping the shared gauges right.
    fn set_state(&mut self, l: u32, to: u8) {
        let c = &mut self.conns[l as usize];
        let from = c.state;
        if from == to {
            return;
        }
        c.state = to;
        if from == S_IDLE {
            self.busy += 1;
        } else if to == S_IDLE {
            self.busy -= 1;
        }
        let inflight = |s| s == S_CONNECTING || s == S_LOGGING_IN || s == S_REDIRECTING;
        let (was_inflight, is_inflight) = (inflight(from), inflight(to));
        if was_inflight != is_inflight {
            let d = if is_inflight { 1 } else { -1 };
            self.inflight = (self.inflight as i64 + d) as u32;
            self.shared.inflight.fetch_add(d, Ordering::Relaxed);
        }
        if from == S_UP {
            self.shared.up.fetch_sub(1, Ordering::Relaxed);
        }
        if to == S_UP {
            self.shared.up.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes slot `l` (any state but idle or closing).
    fn close(&mut self, l: u32) {
        let st = self.conns[l as usize].state;
        if st == S_IDLE || st == S_CLOSING {
            return;
        }
        if st == S_UP {
            self.shared.add(C::closed_by_us, 1);
        }
        if let Some(i) = self.redirect_wait.iter().position(|&w| w == l) {
            // The engine released it already: no `Released` will come.
            self.redirect_wait.swap_remove(i);
            self.set_state(l, S_CLOSING);
            self.released(l, self.plan.now_ns());
            return;
        }
        self.conns[l as usize].inbuf = None;
        self.set_state(l, S_CLOSING);
        self.engine.close(l);
    }

    fn start_open(&mut self, l: u32, now: u64) -> bool {
        let g = self.global(l);
        let (src, mut dst) = addr::spread(g, self.plan.sources, self.plan.servers);
        if let Some(r) = self.redirected.get(&l) {
            dst = r.server as usize;
        }
        if self.engine.open(l, src, dst).is_err() {
            return false; // Submission queue full: try again next tick.
        }
        let c = &mut self.conns[l as usize];
        c.t_open_us = (now / 1000) as u32;
        c.flags &= !F_EXPLAINED;
        self.set_state(l, S_CONNECTING);
        self.shared.add(C::opened, 1);
        true
    }

    fn open_due(&mut self, now: u64) {
        if self.open_next >= self.open_end {
            return;
        }
        if self.plan.stop_opening.load(Ordering::Relaxed) {
            let left = self.open_end - self.open_next;
            self.shared
                .open_pending
                .fetch_sub(left as i64, Ordering::Relaxed);
            self.open_next = self.open_end;
            return;
        }
        let mut started = 0;
        while self.open_next < self.open_end
            && started < OPENS_PER_TICK_MAX
            && self.inflight < self.plan.inflight_max
            && self.pacer.is_due(now)
        {
            let l = self.open_next;
            if self.conns[l as usize].state == S_IDLE && !self.start_open(l, now) {
                break;
            }
            self.open_next += 1;
            self.pacer.advance();
            self.shared.open_pending.fetch_sub(1, Ordering::Relaxed);
            started += 1;
        }
    }

    fn reopen_due(&mut self, now: u64) {
        // Redirected slots first: they are counted in flight already.
        while let Some(&l) = self.redirect_wait.last() {
            if !self.start_open(l, now) {
                break;
            }
            self.redirect_wait.pop();
        }
        let mut started = 0;
        while let Some(&Reverse((due, l))) = self.reopen.peek() {
            if due > now || started >= OPENS_PER_TICK_MAX || self.inflight >= self.plan.inflight_max
            {
                break;
            }
            if self.plan.stop_opening.load(Ordering::Relaxed) {
                self.reopen.clear();
                break;
            }
            if self.conns[l as usize].state == S_IDLE {
                if !self.start_open(l, now) {
                    break;
                }
                started += 1;
            }
            self.reopen.pop();
        }
    }

    fn schedule_reopen(&mut self, l: u32, now: u64, base_ns: u64) {
        let jitter = if self.storm_jitter_ns > 0 {
            self.rng.below(self.storm_jitter_ns + 1)
        } else {
            0
        };
        self.reopen.push(Reverse((now + base_ns + jitter, l)));
    }

    fn send_due(&mut self, now: u64) {
        let Some(plan) = self.send.clone() else {
            return;
        };
        let due = plan.sched.due(now);
        let workers = self.plan.workers as u64;
        let mut handled = 0;
        while self.send_next < due && handled < SENDS_PER_TICK_MAX {
            let n = self.send_next;
            self.send_next += 1;
            let s = plan.sender(n);
            if s % workers != self.id as u64 {
                continue;
            }
            handled += 1;
            let l = (s / workers) as u32;
            let sessions = !self.sessions.is_empty();
            if self.conns[l as usize].state != S_UP && !sessions {
                plan.ledger.mark(n, SKIPPED);
                self.shared.add(C::msgs_skipped, 1);
                continue;
            }
            let to = self.plan.user(plan.recipient(n));
            let from = self.plan.user(s);
            self.body.clear();
            self.body.extend_from_slice(&self.plan.run_id.to_le_bytes());
            self.body.extend_from_slice(&n.to_le_bytes());
            self.body.extend_from_slice(&from.to_le_bytes());
            self.body
                .resize(plan.body_bytes.max(BODY_HEADER_BYTES), b'.');
            let client_id = if sessions {
                // Kept until ACKed; written now if logged in, else at the login.
                let body = std::mem::take(&mut self.body);
                let id = self.session(l).send(to, &body).expect("memory outbox");
                self.body = body;
                (self.conns[l as usize].state == S_UP).then_some(id)
            } else {
                Some(self.plan.client_id_base + n + 1)
            };
            if let Some(client_id) = client_id {
                self.wbuf.clear();
                proto::encode(
                    &Frame::Send {
                        client_id,
                        to,
                        body: &self.body,
                    },
                    &mut self.wbuf,
                );
                self.engine.send(l, &self.wbuf);
                if sessions && self.cut_kind == CUT_AFTER_SEND && self.cut_is_due(now) {
                    self.cut_kind = CUT_NOW;
                    self.cut(l);
                }
            }
            plan.ledger.mark(n, SENT);
            self.shared.add(C::msgs_sent, 1);
            if now > plan.sched.intended_ns(n) + LATE_NS {
                self.shared.add(C::msgs_late, 1);
            }
        }
        if self.send_next >= plan.sched.total {
            self.send = None;
        }
    }

    /// Slot `l`'s session, made at its first use.
    fn session(&mut self, l: u32) -> &mut SessionState {
        self.sessions[l as usize].get_or_insert_with(|| {
            Box::new(SessionState::new(
                Default::default(),
                self.first_client_id,
                DEDUPE_WINDOW,
            ))
        })
    }

    fn cut_is_due(&mut self, now: u64) -> bool {
        match &mut self.cut_pacer {
            Some(p) if p.is_due(now) => {
                p.advance();
                true
            }
            _ => false,
        }
    }

    /// Cuts at random: a third of the cuts go to a random logged-in slot
    /// now, a third right after the next SEND (`send_due`), a third right
    /// before the next DELIVERED (`on_frame`).
    fn cut_due(&mut self, now: u64) {
        if self.send.is_none() {
            self.cut_pacer = None;
            return;
        }
        if self.cut_kind != CUT_NOW || self.conns.is_empty() {
            return;
        }
        let Some(p) = &self.cut_pacer else {
            return;
        };
        if !p.is_due(now) {
            return;
        }
        let kind = self.rng.below(3) as u8;
        if kind != CUT_NOW {
            self.cut_kind = kind;
            return;
        }
        // A few tries at finding a logged-in slot; else the cut waits.
        for _ in 0..8 {
            let l = self.rng.below(self.conns.len() as u64) as u32;
            if self.conns[l as usize].state == S_UP {
                self.cut_is_due(now);
                self.cut(l);
                return;
            }
        }
    }

    /// Cuts slot `l`: a reset (the engine closes with SO_LINGER 0), whatever
    /// is in flight either way is lost; it reconnects after a backoff.
    fn cut(&mut self, l: u32) {
        self.shared.add(C::cuts, 1);
        self.conns[l as usize].flags |= F_REOPEN;
        self.close(l);
    }

    fn ping_due(&mut self, now: u64) {
        let every = self.plan.ping_every.as_nanos();
        if every == 0 || !self.plan.login || now < self.ping_next_ns || self.conns.is_empty() {
            return;
        }
        // Each slot is due once per `every`: over `elapsed` ns that is
        // `conns * elapsed / every` pings; the remainder carries over.
        let elapsed = if self.ping_last_ns == 0 {
            0
        } else {
            now - self.ping_last_ns
        };
        self.ping_last_ns = now;
        self.ping_next_ns = now + PING_STEP_NS;
        let n = self.conns.len() as u128;
        self.ping_owed += n * elapsed as u128;
        let step = (self.ping_owed / every).min(n) as u32;
        self.ping_owed -= step as u128 * every;
        self.ping_owed = self.ping_owed.min(every * n);
        for _ in 0..step {
            let l = self.ping_cursor;
            self.ping_cursor = (self.ping_cursor + 1) % n as u32;
            if self.conns[l as usize].state == S_UP {
                self.ping_nonce += 1;
                self.wbuf.clear();
                proto::encode(
                    &Frame::Ping {
                        nonce: self.ping_nonce,
                    },
                    &mut self.wbuf,
                );
                self.engine.send(l, &self.wbuf);
                self.shared.add(C::pings, 1);
            }
        }
    }

    fn next_wake(&self, now: u64) -> Duration {
        let mut wake = now + WAIT_MAX.as_nanos() as u64;
        if self.open_next < self.open_end && self.inflight < self.plan.inflight_max {
            wake = wake.min(self.pacer.next_ns());
        }
        if let Some(Reverse((due, _))) = self.reopen.peek() {
            if self.inflight < self.plan.inflight_max {
                wake = wake.min(*due);
            }
        }
        if let (Some(p), CUT_NOW) = (&self.cut_pacer, self.cut_kind) {
            wake = wake.min(p.next_ns());
        }
        if let Some(plan) = &self.send {
            if self.send_next < plan.sched.total {
                wake = wake.min(plan.sched.intended_ns(self.send_next));
            }
        }
        if !self.plan.ping_every.is_zero() && self.plan.login {
            wake = wake.min(self.ping_next_ns);
        }
        Duration::from_nanos(wake.saturating_sub(now))
    }

    fn on_event(&mut self, ev: Event, scratch: &[u8]) {
        let now = self.plan.now_ns();
        match ev {
            Event::Connected(l) => {
                if self.conns[l as usize].state != S_CONNECTING {
                    return;
                }
                self.shared.add(C::connected, 1);
                let us = self.since_open_us(l, now);
                record(&mut self.ivl.connect, us);
                if self.plan.login {
                    let token = self.plan.token(self.global(l));
                    self.wbuf.clear();
                    proto::encode(
                        // Version 2: idempotent SEND, DELIVERs with the
                        // sender's client id (the app filter below).
                        &Frame::Login {
                            version: proto::VERSION_2,
                            token: token.as_bytes(),
                        },
                        &mut self.wbuf,
                    );
                    self.engine.send(l, &self.wbuf);
                    self.set_state(l, S_LOGGING_IN);
                } else {
                    self.set_state(l, S_UP);
                }
            }
            Event::ConnectFailed(l, errno) => {
                let st = self.conns[l as usize].state;
                // The node a REDIRECT named is gone (killed, say): the next
                // try goes through the configured server again, which
                // names the partition's new owner.
                self.redirected.remove(&l);
                if st == S_CONNECTING {
                    self.shared.add(C::connect_failed, 1);
                    self.shared.fail(&format!("connect:{}", errno_name(errno)));
                }
                self.set_state(l, S_IDLE);
                if st == S_CONNECTING {
                    self.recheck_end(l, Recheck::Failed);
                }
                if self.reconnect && st == S_CONNECTING {
                    self.schedule_reopen(l, now, RETRY_NS);
                } else if self.cut_reopen && st == S_CONNECTING && !self.recheck.contains_key(&l) {
                    let wait = RETRY_NS + self.rng.below(RETRY_NS);
                    self.reopen.push(Reverse((now + wait, l)));
                }
            }
            Event::Recv(l, start, len) => {
                let st = self.conns[l as usize].state;
                if st == S_LOGGING_IN || st == S_UP {
                    self.feed(l, &scratch[start..start + len], now);
                }
            }
            Event::PeerClosed(l, errno) => self.peer_closed(l, errno, None),
            Event::Released(l) => self.released(l, now),
        }
    }

    /// The engine released slot `l`: it is idle now, unless a REDIRECT
    /// sends it to another node.
    fn released(&mut self, l: u32, now: u64) {
        if self.conns[l as usize].state == S_REDIRECTING {
            if !self.start_open(l, now) {
                self.redirect_wait.push(l);
            }
            return;
        }
        let reopen = self.conns[l as usize].flags & F_REOPEN != 0;
        self.conns[l as usize].flags &= !F_REOPEN;
        self.set_state(l, S_IDLE);
        if reopen && self.reconnect {
            self.schedule_reopen(l, now, 0);
        } else if reopen && self.cut_reopen {
            let wait = self.rng.below(CUT_BACKOFF_NS + 1);
            self.reopen.push(Reverse((now + wait, l)));
        }
        // A slot still opening or draining here was closed by us at
        // the end: it stays not drained (unverified), not failed.
        if self.recheck.get(&l) == Some(&Recheck::Closing) {
            self.recheck.insert(l, Recheck::Opening);
            self.reopen.push(Reverse((now, l)));
        }
    }

    fn since_open_us(&self, l: u32, now: u64) -> u64 {
        ((now / 1000) as u32).wrapping_sub(self.conns[l as usize].t_open_us) as u64
    }

    /// The server closed (or reset) slot `l`, or we give up on it because of
    /// `why`. Counts the failure and closes our end.
    fn peer_closed(&mut self, l: u32, errno: i32, why: Option<&str>) {
        let c = &self.conns[l as usize];
        let explained = c.flags & F_EXPLAINED != 0;
        match c.state {
            S_LOGGING_IN => {
                if !explained {
                    self.shared.add(C::login_failed, 1);
                    let reason = match why {
                        Some(w) => format!("login:{w}"),
                        None => format!("login:closed:{}", errno_name(errno)),
                    };
                    self.shared.fail(&reason);
                }
            }
            S_UP => {
                self.shared.add(C::closed_by_server, 1);
                if !explained {
                    let reason = match why {
                        Some(w) => format!("dropped:{w}"),
                        None => format!("dropped:closed:{}", errno_name(errno)),
                    };
                    self.shared.fail(&reason);
                }
            }
            _ => return,
        }
        self.recheck_end(l, Recheck::Failed);
        if self.reconnect || (self.cut_reopen && !self.recheck.contains_key(&l)) {
            self.conns[l as usize].flags |= F_REOPEN;
        }
        self.conns[l as usize].inbuf = None;
        self.set_state(l, S_CLOSING);
        self.engine.close(l);
    }

    /// Decodes the frames in `data` (after any partial frame kept from before).
    fn feed(&mut self, l: u32, data: &[u8], now: u64) {
        let limits = self.plan.limits;
        if let Some(mut buf) = self.conns[l as usize].inbuf.take() {
            buf.extend_from_slice(data);
            let used = self.decode_all(l, &buf, &limits, now);
            let st = self.conns[l as usize].state;
            if let Some(used) = used {
                if used < buf.len() && (st == S_LOGGING_IN || st == S_UP) {
                    buf.drain(..used);
                    self.conns[l as usize].inbuf = Some(buf);
                }
            }
        } else {
            let used = self.decode_all(l, data, &limits, now);
            let st = self.conns[l as usize].state;
            if let Some(used) = used {
                if used < data.len() && (st == S_LOGGING_IN || st == S_UP) {
                    self.conns[l as usize].inbuf = Some(Box::new(data[used..].to_vec()));
                }
            }
        }
    }

    /// Handles every complete frame in `buf`; returns the bytes used, or
    /// `None` if the connection was closed on the way.
    fn decode_all(&mut self, l: u32, buf: &[u8], limits: &Limits, now: u64) -> Option<usize> {
        let mut at = 0;
        loop {
            match proto::decode(&buf[at..], limits) {
                Ok(Some((frame, used))) => {
                    at += used;
                    self.on_frame(l, frame, now);
                    let st = self.conns[l as usize].state;
                    if st != S_LOGGING_IN && st != S_UP {
                        return None;
                    }
                }
                Ok(None) => return Some(at),
                Err(e) => {
                    let why = format!("decode:{}", e.code());
                    self.peer_closed(l, 0, Some(&why));
                    return None;
                }
            }
        }
    }

    fn on_frame(&mut self, l: u32, frame: Frame<'_>, now: u64) {
        match frame {
            Frame::LoginOk { offline_count, .. } => {
                if self.conns[l as usize].state != S_LOGGING_IN {
                    return;
                }
                self.shared.add(C::login_ok, 1);
                if let Some(r) = self.redirected.get_mut(&l) {
                    r.in_a_row = 0;
                }
                let us = self.since_open_us(l, now);
                record(&mut self.ivl.login, us);
                self.set_state(l, S_UP);
                self.subscribe(l);
                if self.recheck.get(&l) == Some(&Recheck::Opening) {
                    self.shared.add(C::final_drain_logins, 1);
                    self.shared.add(C::final_drain_backlog, offline_count);
                    self.recheck.insert(
                        l,
                        Recheck::Draining {
                            expected: offline_count,
                            got: 0,
                        },
                    );
                    if offline_count == 0 {
                        self.recheck_end(l, Recheck::Drained);
                    }
                } else {
                    self.shared.add(C::offline_expected, offline_count);
                }
                self.resend(l);
            }
            Frame::LoginErr { code, .. } => {
                self.shared.add(C::login_failed, 1);
                self.shared.fail(&format!("login:{code}"));
                self.conns[l as usize].flags |= F_EXPLAINED;
                self.peer_closed(l, 0, None);
            }
            Frame::Ack {
                client_id,
                server_id,
                ..
            } => {
                let n = if self.sessions.is_empty() {
                    client_id.wrapping_sub(self.plan.client_id_base + 1)
                } else {
                    // A repeated ACK (for a resent SEND) finds nothing.
                    match self.session(l).on_ack(client_id).expect("memory outbox") {
                        Some(m) => message_number(&m.body),
                        None => return,
                    }
                };
                self.shared.add(C::acks, 1);
                let Some(plan) = self.send_plan() else {
                    return;
                };
                if n >= plan.ledger.len() {
                    return;
                }
                plan.ledger.mark(n, ACKED);
                let intended = plan.sched.intended_ns(n);
                record(&mut self.ivl.ack, now.saturating_sub(intended) / 1000);
                if !self.plan.receipts {
                    return;
                }
                let peer = self.plan.user(plan.recipient(n));
                if let Some(at) = self.early_receipts.remove(&(peer, server_id)) {
                    self.receipt_for(&plan, n, at);
                } else {
                    self.awaiting_receipt.insert((peer, server_id), n);
                }
            }
            Frame::Error {
                code, client_id, ..
            } => {
                if client_id == 0 {
                    // A fatal error for the connection; the server closes next.
                    self.shared.fail(&format!("error:{code}"));
                    self.conns[l as usize].flags |= F_EXPLAINED;
                    return;
                }
                self.shared.add(C::send_errors, 1);
                self.shared.fail(&format!("send:{code}"));
                let n = if self.sessions.is_empty() {
                    client_id.checked_sub(self.plan.client_id_base + 1)
                } else {
                    // A temporary refusal stays in the outbox: resent at
                    // the next login.
                    match self.session(l).on_refused(client_id, code) {
                        Ok(Refusal::Final(Some(m))) => Some(message_number(&m.body)),
                        _ => None,
                    }
                };
                if let (Some(plan), Some(n)) = (self.send_plan(), n) {
                    plan.ledger.mark(n, REFUSED);
                }
            }
            Frame::Deliver {
                server_id,
                from,
                client_id,
                body,
                ..
            } => {
                self.shared.add(C::delivers, 1);
                // The app stores every message it is shown at once, so
                // DELIVERED goes for every DELIVER (`Ignore`, shown and not
                // stored yet, does not come up here).
                let shown = if self.sessions.is_empty() {
                    None
                } else {
                    let s = self.session(l);
                    match s.on_deliver(server_id, from, client_id) {
                        Incoming::Show => {
                            s.accept(server_id);
                            Some(true)
                        }
                        Incoming::AnswerDelivered | Incoming::Ignore => Some(false),
                    }
                };
                self.on_deliver(l, from, (server_id, client_id), shown, body, now);
                // The app stored it, the connection drops before DELIVERED:
                // the server delivers it again after the login.
                if shown.is_some() && self.cut_kind == CUT_BEFORE_DELIVERED && self.cut_is_due(now)
                {
                    self.cut_kind = CUT_NOW;
                    self.cut(l);
                    return;
                }
                self.wbuf.clear();
                proto::encode(&Frame::Delivered { server_id }, &mut self.wbuf);
                self.engine.send(l, &self.wbuf);
                // The queue at login is delivered first, in order, so the
                // first `expected` DELIVERs (whatever they carry) are all of
                // it; anything later was queued after the login.
                if let Some(Recheck::Draining { expected, got }) = self.recheck.get_mut(&l) {
                    *got += 1;
                    if *got >= *expected {
                        self.recheck_end(l, Recheck::Drained);
                    }
                }
            }
            Frame::Receipt {
                kind: ReceiptKind::Delivered,
                server_id,
                peer,
            } => {
                if let Some(n) = self.awaiting_receipt.remove(&(peer, server_id)) {
                    if let Some(plan) = self.send_plan() {
                        self.receipt_for(&plan, n, now);
                    }
                } else if self.early_receipts.len() < EARLY_RECEIPTS_MAX {
                    self.early_receipts.insert((peer, server_id), now);
                } else {
                    self.shared.add(C::receipts_unmatched, 1);
                }
            }
            Frame::Receipt { .. } => {}
            Frame::Ping { nonce } => {
                self.wbuf.clear();
                proto::encode(&Frame::Pong { nonce }, &mut self.wbuf);
                self.engine.send(l, &self.wbuf);
            }
            Frame::Pong { .. } => self.shared.add(C::pongs, 1),
            Frame::Bye { reason } => {
                let why = format!("bye:{}", reason.as_str());
                let st = self.conns[l as usize].state;
                if st == S_UP || st == S_LOGGING_IN {
                    let prefix = if st == S_UP { "dropped" } else { "login" };
                    self.shared.fail(&format!("{prefix}:{why}"));
                    if st == S_LOGGING_IN {
                        self.shared.add(C::login_failed, 1);
                    }
                    self.conns[l as usize].flags |= F_EXPLAINED;
                }
            }
            Frame::Presence { .. } => self.shared.add(C::presences, 1),
            Frame::Typing { .. } => {}
            // Another device of this user sent a message, or was removed:
            // nothing to count.
            Frame::Sent { .. } | Frame::DeviceRemoved { .. } => {}
            // A clustered server serves this user on another node.
            Frame::Redirect { addr } => {
                if self.conns[l as usize].state == S_LOGGING_IN {
                    self.follow_redirect(l, addr);
                }
            }
            // Client-to-server frames never come from a server, and no
            // scenario joins a group.
            Frame::Group(_)
            | Frame::Login { .. }
            | Frame::Send { .. }
            | Frame::Delivered { .. }
            | Frame::Read { .. }
            | Frame::Subscribe { .. }
            | Frame::Unsubscribe { .. }
            | Frame::Privacy { .. }
            | Frame::DeviceRemove { .. } => {
                self.peer_closed(l, 0, Some("unexpected_frame"));
            }
        }
    }

    /// After LOGIN_OK: SUBSCRIBE to the next `plan.subscribe` users of the
    /// run (wrapping), in one write.
    fn subscribe(&mut self, l: u32) {
        let n = u64::from(self.plan.subscribe).min(self.plan.conns.saturating_sub(1));
        if n == 0 {
            return;
        }
        let g = self.global(l);
        self.wbuf.clear();
        for i in 1..=n {
            let user = self.plan.user((g + i) % self.plan.conns);
            proto::encode(&Frame::Subscribe { user }, &mut self.wbuf);
        }
        self.engine.send(l, &self.wbuf);
        self.shared.add(C::subscribes, n);
    }

    /// Slot `l`'s LOGIN was answered with REDIRECT to `addr`: close, and
    /// open again towards `addr` once the engine released the slot
    /// (`Event::Released`). A login fails instead when `addr` is not a
    /// `host:port` that resolves (`login:redirect_addr`), or after
    /// [`REDIRECTS_IN_A_ROW_MAX`] REDIRECTs with no LOGIN_OK
    /// (`login:redirect_loop`).
    fn follow_redirect(&mut self, l: u32, addr: &str) {
        let in_a_row = self.redirected.get(&l).map_or(0, |r| r.in_a_row);
        let server = if in_a_row >= REDIRECTS_IN_A_ROW_MAX {
            Err("login:redirect_loop")
        } else {
            self.redirect_server(addr).ok_or("login:redirect_addr")
        };
        let server = match server {
            Ok(server) => server,
            Err(why) => {
                self.shared.fail(why);
                self.shared.add(C::login_failed, 1);
                self.conns[l as usize].flags |= F_EXPLAINED;
                self.redirected.remove(&l);
                return;
            }
        };
        self.shared.add(C::redirects, 1);
        self.redirected.insert(
            l,
            Redirected {
                server,
                in_a_row: in_a_row + 1,
            },
        );
        self.conns[l as usize].inbuf = None;
        self.set_state(l, S_REDIRECTING);
        self.engine.close(l);
    }

    /// The engine's index of the node a REDIRECT named, resolved once per
    /// address (a name is looked up with the system resolver, blocking this
    /// worker once).
    fn redirect_server(&mut self, addr: &str) -> Option<u32> {
        if let Some(&known) = self.redirect_servers.get(addr) {
            return known;
        }
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .ok()
            .and_then(|mut addrs| addrs.next())
            .and_then(|a| self.engine.server_index(a))
            .and_then(|i| u32::try_from(i).ok());
        self.redirect_servers.insert(addr.into(), resolved);
        resolved
    }

    /// The current send plan, also after its schedule ended (ACKs and
    /// deliveries still arrive during the drain).
    fn send_plan(&self) -> Option<Arc<SendPlan>> {
        self.last_plan.clone()
    }

    fn receipt_for(&mut self, plan: &SendPlan, n: u64, at_ns: u64) {
        if plan.ledger.mark(n, RECEIPTED) {
            return;
        }
        self.shared.add(C::receipts, 1);
        let intended = plan.sched.intended_ns(n);
        record(&mut self.ivl.receipt, at_ns.saturating_sub(intended) / 1000);
    }

    /// After a login with cuts: writes the slot's un-ACKed messages again,
    /// in order, with their original client ids.
    fn resend(&mut self, l: u32) {
        let Some(Some(s)) = self.sessions.get(l as usize) else {
            return;
        };
        let again = s.resend();
        for m in again {
            self.wbuf.clear();
            proto::encode(
                &Frame::Send {
                    client_id: m.client_id,
                    to: m.to,
                    body: &m.body,
                },
                &mut self.wbuf,
            );
            self.engine.send(l, &self.wbuf);
            self.shared.add(C::resends, 1);
        }
    }

    /// A DELIVER of `body` from `from`; `ids`: its server id and, on a v2
    /// connection, the sender's client id; `shown`: whether the user's
    /// session filter let it through to the app (`None`: no session).
    fn on_deliver(
        &mut self,
        l: u32,
        from: u64,
        ids: (u64, Option<u64>),
        shown: Option<bool>,
        body: &[u8],
        now: u64,
    ) {
        let Some(plan) = self.send_plan() else {
            self.shared.add(C::delivers_foreign, 1);
            return;
        };
        if body.len() < BODY_HEADER_BYTES {
            self.shared.add(C::delivers_foreign, 1);
            return;
        }
        let run = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
        let n = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
        let sender = u64::from_le_bytes(body[12..20].try_into().expect("8 bytes"));
        let me = self.plan.user(self.global(l));
        if run != self.plan.run_id
            || sender != from
            || n >= plan.ledger.len()
            || self.plan.user(plan.sender(n)) != from
            || self.plan.user(plan.recipient(n)) != me
        {
            self.shared.add(C::delivers_foreign, 1);
            return;
        }
        let (server_id, client_id) = ids;
        let same_id = plan.ledger.same_server_id(n, server_id);
        match plan.ledger.delivered(n) {
            Delivery::First => {
                let intended = plan.sched.intended_ns(n);
                record(&mut self.ivl.deliver, now.saturating_sub(intended) / 1000);
                self.order.observe(me, from, n);
            }
            Delivery::Duplicate => {
                self.shared.add(C::delivers_dup, 1);
                // An app drops a repeat of a server id it has seen, and
                // (v2) of a (sender, client id) it has seen: each message
                // here has one client id. What passes both, it shows twice.
                let through = match shown {
                    Some(shown) => shown,
                    None => !same_id && client_id.is_none_or(|c| c == 0),
                };
                if through {
                    self.shared.add(C::delivers_dup_app, 1);
                }
            }
            Delivery::Unknown => self.shared.add(C::delivers_foreign, 1),
        }
    }
}

/// The message number in a body of this run (checked by `on_deliver`;
/// bodies are at least [`BODY_HEADER_BYTES`]).
fn message_number(body: &[u8]) -> u64 {
    body.get(4..12).map_or(u64::MAX, |b| {
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_per_user_is_small() {
        // Allocated per user only with cuts, boxed: 8 bytes per slot plus
        // this, until the user sends or receives.
        assert!(std::mem::size_of::<SessionState>() <= 192);
    }

    #[test]
    fn per_connection_state_is_small() {
        // With the engine's 16 bytes: 32 bytes per idle connection.
        assert_eq!(std::mem::size_of::<Conn>(), 16);
    }

    fn plan(pairing: Pairing, conns: u64) -> SendPlan {
        SendPlan {
            sched: Schedule {
                begin_ns: 0,
                rate_per_s: 1,
                total: 10_000,
            },
            pairing,
            body_bytes: BODY_HEADER_BYTES,
            ledger: Arc::new(Ledger::new(0)),
            conns,
            cut_rate_per_s: 0.0,
        }
    }

    #[test]
    fn random_pairs_are_valid_and_spread() {
        let p = plan(Pairing::Random { seed: 7 }, 10);
        let mut senders = [0u32; 10];
        for n in 0..10_000 {
            let (s, r) = (p.sender(n), p.recipient(n));
            assert!(s < 10 && r < 10 && s != r, "n {n}: {s} -> {r}");
            senders[s as usize] += 1;
        }
        assert!(senders.iter().all(|&c| c > 800), "{senders:?}");
        // The smallest run: two connections always talk to each other.
        let p = plan(Pairing::Random { seed: 1 }, 2);
        for n in 0..100 {
            assert_eq!(p.sender(n) + p.recipient(n), 1);
        }
    }

    #[test]
    fn offline_pairs() {
        let p = plan(Pairing::Offline { senders: 3 }, 6);
        let pairs: Vec<(u64, u64)> = (0..6).map(|n| (p.sender(n), p.recipient(n))).collect();
        assert_eq!(pairs, [(0, 3), (1, 4), (2, 5), (0, 3), (1, 4), (2, 5)]);
    }

    #[test]
    fn local_slots_cover_every_connection_once() {
        for (conns, workers) in [(1u64, 1usize), (7, 2), (10, 3), (2, 4)] {
            let p = Plan {
                conns,
                workers,
                user_base: 1,
                devices: 1,
                secret: Vec::new(),
                token_expiry_s: 0,
                login: false,
                sources: 1,
                servers: 1,
                ping_every: Duration::ZERO,
                subscribe: 0,
                inflight_max: 1,
                receipts: true,
                run_id: 0,
                client_id_base: 0,
                epoch: Instant::now(),
                stop_opening: Arc::new(AtomicBool::new(false)),
                limits: Limits::default(),
            };
            let total: u64 = (0..workers).map(|w| p.local_conns(w) as u64).sum();
            assert_eq!(total, conns, "{conns} over {workers}");
            // Every global index in lo..hi lands in exactly one worker's range.
            for (lo, hi) in [(0, conns), (1, conns), (conns / 2, conns), (0, 0)] {
                let mut seen = 0;
                for w in 0..workers {
                    let (a, b) = p.local_range(w, lo, hi);
                    for l in a..b {
                        let g = l as u64 * workers as u64 + w as u64;
                        assert!((lo..hi).contains(&g), "{g} outside {lo}..{hi}");
                        seen += 1;
                    }
                }
                assert_eq!(seen, hi - lo, "{conns} over {workers}, {lo}..{hi}");
            }
        }
    }
}
