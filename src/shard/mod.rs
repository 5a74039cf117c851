//! One core's event loop, executing what the session layer decides.
//!
//! A shard owns everything it touches. Other shards reach it only through the
//! SPSC rings of [`crate::ring`], carrying [`Msg`]s. A user lives on its home
//! shard ([`home_shard`]); after LOGIN the connection moves there, so a
//! message crosses at most one ring on its way to the recipient (and its
//! ACK and receipts at most one on the way back).
//!
//! The protocol is decided by the pure session layer ([`crate::session`]):
//! the shard turns I/O completions, ring messages, timers and commits into
//! its [`Event`]s and executes the [`Action`]s it returns. This module holds
//! the loop, the commit and the supervisor; `conns.rs` the connections'
//! buffers, TLS, decoding and flushing; `route.rs` the messages between
//! shards and their outboxes.
//!
//! A connection from the TLS listener carries a boxed [`crate::tls::TlsConn`]: its
//! ciphertext is decrypted before the frame processing, and its output is
//! written as plaintext and encrypted at flush (one batch of records per
//! iteration). Plaintext connections pay 8 bytes for the empty box.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::cluster::{Owner, Owners, ShardLink};

use crate::config::Config;
use crate::io::{Completion, ConnId, Io};
use crate::ops::{Ops, Request, Trace};
use crate::proto::ByeReason;
use crate::ring::Links;
use crate::session::{Action, BridgeReceipt, Env, Event, Flow, Now, Sessions, State};
use crate::stats::{LoopTimer, ShardStats};
use crate::store::{shard_dir, Durability, LogStore, Store, StoreError};
use crate::supervisor::{Fatal, Intensity, ShardState, EXIT_SHARD_DOWN};
use crate::timer::Wheel;
use crate::tls::TlsContext;
use crate::upgrade::state::Carried;

mod admit;
mod carry;
mod conns;
mod devices;
mod groups;
mod mqtt;
mod operate;
mod presence;
mod route;
mod sync;

#[cfg(debug_assertions)]
pub use crate::session::{CRASH_USER, PANIC_USER};
pub use carry::{Adopt, Carry, Next, Outgoing, ADOPT_QUEUED_MAX, HELD_FDS_MAX};
pub use groups::{open_group_log, OpenedGroupLog};
pub use route::{home_shard, ConnRef, GroupAnswer, GroupOp, Msg};

use admit::Admission;
use conns::Conns;
use devices::DeviceWriter;
use groups::GroupWriter;
use presence::PresenceWriter;
use route::{Outboxes, Peers};
use sync::Syncer;

/// Bytes read from a socket at once into the shard's scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// What a buffer reused across loop iterations keeps of its capacity at
/// each `memory_release_ms`, in bytes (a quiet iteration needs far less).
const REUSED_KEEP_BYTES: usize = 1024;
/// Users of the device registry one `device_idle_days_max` pass looks at
/// (about once a second): a million registered users are all checked
/// within about four minutes, at a few microseconds per pass.
const EXPIRE_USERS_PER_PASS: usize = 4096;
/// Poll timeout while an outbox waits for ring space.
const OUTBOX_RETRY: Duration = Duration::from_millis(1);

/// Opens shard `shard`'s store under the configured data directory,
/// replaying its log; the store reads the time from `clock`.
pub fn open_store(
    config: &Config,
    shard: usize,
    clock: Clock,
) -> Result<Box<dyn Store + Send>, StoreError> {
    let (store, recovery) = LogStore::open_with_clock(
        shard_dir(&config.data_dir, shard),
        config.log_options(),
        clock,
    )?;
    if config.store_durability() != Durability::Memory {
        log::info!("shard {shard}: store recovered: {recovery}");
        // The replay read whole segments and freed them again.
        crate::memory::release(true);
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
    /// Set with `stop` when the process hands over to a new binary: the
    /// shutdown says BYE(upgrade) instead of BYE(shutdown).
    pub upgrade: Arc<AtomicBool>,
    /// The configuration.
    pub config: Arc<Config>,
    /// Its message store, already recovered.
    pub store: Box<dyn Store + Send>,
    /// Its group log, already read ([`open_group_log`]).
    pub groups: OpenedGroupLog,
    /// TLS settings, when the server has a TLS listener.
    pub tls: Option<Arc<TlsContext>>,
    /// Every shard's counters, by shard id: their `state` says whether a
    /// peer takes messages.
    pub peers: Arc<[Arc<ShardStats>]>,
    /// Set when a shard gives up past its restart intensity.
    pub fatal: Arc<Fatal>,
    /// Where the loop reads the time: [`Clock::Real`], or a simulator's.
    pub clock: Clock,
    /// Cluster: who owns which partition (kept by the bridge); `None` on a
    /// standalone server, which serves every user.
    pub owners: Option<Arc<Owners>>,
    /// Cluster: this shard's rings to and from the bridge.
    pub bridge: Option<ShardLink>,
    /// The push queue, with a `push_url` only.
    pub push: Option<crate::push::Notices>,
    /// The operators' commands, bans and drain flag; `None` in the
    /// simulator, which has no stats socket.
    pub ops: Option<Arc<Ops>>,
    /// Live upgrade, old process: where the shard leaves the connections
    /// it carries to the successor (poll backend, plaintext, logged in),
    /// and how the shards agree nothing is in flight first.
    pub carry: Arc<Carry>,
    /// Live upgrade, successor: connections carried from the predecessor,
    /// queued per home shard as they arrive; each shard installs its own.
    pub adopt: Arc<Adopt>,
}

/// A shard's state. Created on, and used by, its own thread.
pub struct Shard {
    id: usize,
    config: Arc<Config>,
    io: Io,
    links: Links<Msg>,
    /// Messages waiting for ring space, per destination shard.
    outboxes: Outboxes,
    /// Whether the other shards are up.
    peers: Peers,
    /// The protocol state of connections and users, and the store.
    sessions: Sessions,
    /// The connections' buffers and TLS state.
    conns: Conns,
    /// Per-address limits and the connections not logged in yet.
    admission: Admission,
    /// Server ids of pushes a commit rolled back (disk full); reused.
    refused: Vec<u64>,
    /// Runs the group commit's `fdatasync` off the loop (see `sync.rs`).
    syncer: Syncer,
    /// Actions being executed, and their frames (reused).
    actions: Vec<Action>,
    wire: Vec<u8>,
    /// The time handed to the session layer, read once per loop phase.
    now: Now,
    fatal: Arc<Fatal>,
    clock: Clock,
    wheel: Wheel,
    /// Timer entries fired this iteration (reused).
    fired: Vec<crate::timer::Entry>,
    stats: Arc<ShardStats>,
    stop: Arc<AtomicBool>,
    /// See [`ShardParts::upgrade`].
    upgrade: Arc<AtomicBool>,
    /// When graceful shutdown must end, once begun.
    stop_deadline: Option<Instant>,
    /// See [`ShardParts::carry`].
    carry: Arc<Carry>,
    /// Messages taken off the rings and handled, for [`Carry`].
    popped: u64,
    /// See [`ShardParts::adopt`].
    adopt: Arc<Adopt>,
    /// Carried connections this shard could not install (closed).
    adopt_failed: u64,
    /// The connections an upgrade's shutdown kept for the successor, with
    /// their states; they leave with the backend in [`Outgoing`].
    kept: Vec<(crate::io::Kept, Carried)>,
    /// An upgrade's shutdown keeps these connections (frozen: not read)
    /// for the successor instead of saying BYE.
    carrying: Vec<ConnId>,
    /// Set when such a shutdown begins (even with nothing to carry: the
    /// shard still takes part in the waves of [`Carry`]).
    carrying_on: bool,
    scratch: Vec<u8>,
    frame_buf: Vec<u8>,
    /// MQTT: the input after a CONNECT, while its LOGIN is handled (a
    /// handoff takes it along).
    mqtt_rest: Vec<u8>,
    /// MQTT: scratch for the packets mapped from the session's frames
    /// and for direct answers.
    mqtt_out: Vec<u8>,
    /// MQTT: scratch for the Tern frames a packet maps to.
    mqtt_tern: Vec<u8>,
    /// MQTT connections to close once the actions are done (generation
    /// checked): refusals 3.1.1 cannot say.
    mqtt_close: Vec<(ConnId, u32)>,
    /// TLS: decrypted input of one read (reused).
    tls_plain: Vec<u8>,
    tls: Option<Arc<TlsContext>>,
    conns_max: usize,
    accept_window: (Instant, u32),
    loop_timer: LoopTimer,
    owners: Option<Arc<Owners>>,
    /// Scratch for [`Shard::publish_states`].
    changed_users: Vec<u64>,
    /// Scratch for [`Shard::publish_states`].
    bridge_receipts: Vec<BridgeReceipt>,
    /// [`Owners::fencing`] as last acted on.
    owner_losses: u64,
    bridge: Option<ShardLink>,
    /// When the shard last gave freed memory back (`memory_release_ms`).
    memory_released: Instant,
    /// Writes last seen and privacy changes to the presence log.
    presence: PresenceWriter,
    /// Writes the device registry's changes to the device log.
    devices: DeviceWriter,
    /// Writes group changes and messages to the group log.
    groups: GroupWriter,
    ops: Option<Arc<Ops>>,
    /// Operator requests being served (reused).
    requests: Vec<Request>,
    /// `show conns` requests in progress.
    scans: Vec<operate::Scan>,
    /// The users traced ([`Ops::traces`] as of `traces_seen`).
    traced: Vec<Trace>,
    traces_seen: usize,
    /// How far this shard's part of a drain has got, once draining.
    drain: Option<operate::Draining>,
}

/// What the session layer may ask of this shard.
struct View<'a> {
    peers: &'a Peers,
    outboxes: &'a Outboxes,
    conns: &'a Conns,
    ring_slots: usize,
    owners: Option<&'a Owners>,
    bridge: Option<&'a ShardLink>,
    ops: Option<&'a Ops>,
}

impl Env for View<'_> {
    fn up(&self, shard: usize) -> bool {
        self.peers.up(shard)
    }
    fn has_room(&self, shard: usize) -> bool {
        self.outboxes.len(shard) < self.ring_slots
    }
    fn out_pending(&self, conn: ConnId) -> usize {
        self.conns.out_pending(conn)
    }
    fn owner(&self, user: u64) -> Owner<'_> {
        self.owners.map_or(Owner::Here, |o| o.of_user(user))
    }
    fn bridge_has_room(&self) -> bool {
        self.bridge.is_none_or(ShardLink::has_room)
    }
    fn banned(&self, user: u64, now_ms: u64) -> bool {
        self.ops.is_some_and(|ops| ops.banned(user, now_ms))
    }
    fn silence_ms_max(&self, conn: ConnId) -> Option<u64> {
        self.conns.mqtt_mode(conn)?.silence_ms_max()
    }
    fn inflight_max(&self, conn: ConnId) -> Option<usize> {
        self.conns.mqtt_mode(conn)?.inflight_max()
    }
}

impl Shard {
    /// Builds shard `links.id()` from its parts.
    pub fn new(parts: ShardParts) -> Shard {
        let ShardParts {
            io,
            links,
            stats,
            stop,
            upgrade,
            config,
            store,
            groups,
            tls,
            peers,
            fatal,
            clock,
            owners,
            bridge,
            push,
            ops,
            carry,
            adopt,
        } = parts;
        let id = links.id();
        let shards = links.shards();
        let wheel = Wheel::new(clock.clone());
        let mut sessions = Sessions::new(config.clone(), id, shards, store, stats.clone());
        sessions.set_push(push);
        let presence = PresenceWriter::open(&config, id, &mut sessions, clock.now());
        let devices = DeviceWriter::open(&config, id, &mut sessions);
        let groups = GroupWriter::open(groups, &mut sessions);
        Shard {
            id,
            syncer: Syncer::new(&io, id),
            io,
            links,
            outboxes: Outboxes::new(shards),
            peers: Peers::new(id, peers),
            sessions,
            presence,
            devices,
            groups,
            conns: Conns::default(),
            admission: Admission::new(&config, shards),
            refused: Vec::new(),
            actions: Vec::new(),
            wire: Vec::new(),
            now: Now {
                tick: wheel.now(),
                unix_ms: clock.unix_ms(),
                mono_ns: clock.mono_ns(),
            },
            fatal,
            wheel,
            fired: Vec::new(),
            stats,
            stop,
            upgrade,
            stop_deadline: None,
            carry,
            popped: 0,
            adopt,
            adopt_failed: 0,
            kept: Vec::new(),
            carrying: Vec::new(),
            carrying_on: false,
            scratch: vec![0; SCRATCH_BYTES],
            frame_buf: Vec::new(),
            mqtt_rest: Vec::new(),
            mqtt_out: Vec::new(),
            mqtt_tern: Vec::new(),
            mqtt_close: Vec::new(),
            tls_plain: Vec::new(),
            tls,
            conns_max: config.conns_max.div_ceil(shards),
            accept_window: (clock.now(), 0),
            loop_timer: LoopTimer::new(clock.now()),
            owner_losses: owners.as_ref().map_or(0, |o| o.fencing()),
            changed_users: Vec::new(),
            bridge_receipts: Vec::new(),
            owners,
            bridge,
            memory_released: clock.now(),
            ops,
            requests: Vec::new(),
            scans: Vec::new(),
            traced: Vec::new(),
            traces_seen: 0,
            drain: None,
            clock,
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
    ///
    /// After an upgrade's shutdown that kept connections for the successor
    /// it returns the backend holding them ([`Outgoing`]); everything else
    /// of the shard, its store first, is closed by then.
    pub fn run(mut self) -> std::io::Result<Option<Outgoing>> {
        let mut intensity = Intensity::new(
            self.config.shard_restarts_max,
            Duration::from_millis(self.config.shard_restart_period_ms),
        );
        loop {
            let panic = match catch_unwind(AssertUnwindSafe(|| self.serve())) {
                Ok(result) => return result.map(|()| self.outgoing()),
                Err(panic) => panic,
            };
            // The state first: whoever sees the restart counted sees it too.
            self.set_state(ShardState::Restarting);
            self.stats.restarts.inc();
            self.reset();
            let mut why = format!("crashed: {}", panic_text(&*panic));
            loop {
                let Some(n) = intensity.record(self.clock.now()) else {
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
        if self.config.store_durability() != Durability::Memory {
            let store = open_store(&self.config, self.id, self.clock.clone())?;
            self.sessions.replace_store(store);
            self.devices
                .reopen(&self.config, self.id, &mut self.sessions)
                .map_err(|source| StoreError::Io {
                    path: shard_dir(&self.config.data_dir, self.id),
                    op: "open device log",
                    source,
                })?;
        }
        self.groups
            .reopen(&self.config, self.id, &mut self.sessions)
            .map_err(|source| StoreError::Io {
                path: shard_dir(&self.config.data_dir, self.id),
                op: "open group log",
                source,
            })?;
        Ok(())
    }

    /// Drops every connection and per-connection state after a crash.
    fn reset(&mut self) {
        // A sync in flight belongs to the store being dropped: let it end.
        // If it made its batch durable, the batch's answers are true and go
        // (the reopened store replays it); if not, its ACKs become errors
        // below, as for a commit that never came.
        if let Some((Ok(()), _)) = self.syncer.poll(true) {
            self.tick();
            self.event(Event::Committed { refused: &[] });
        }
        for i in 0..self.sessions.slots() {
            let conn = ConnId(i as u32);
            if self.sessions.state(conn) != State::Free {
                self.io.close(conn);
            }
        }
        self.conns.clear();
        self.admission.clear(self.now.unix_ms);
        self.stats.pending.set(0);
        // Answers that waited for a commit that never came go anyway (see
        // `Sessions::reset`). An in-memory store is kept below, pushes and
        // all, so its answers stand.
        let kept = self.config.store_durability() == Durability::Memory;
        self.tick();
        let env = View {
            peers: &self.peers,
            outboxes: &self.outboxes,
            conns: &self.conns,
            ring_slots: self.config.ring_slots,
            owners: self.owners.as_deref(),
            bridge: self.bridge.as_ref(),
            ops: self.ops.as_deref(),
        };
        self.sessions.reset(self.now, &env, kept);
        // Requests a panic interrupted: their senders time out.
        self.requests.clear();
        self.scans.clear();
        self.execute(&[]);
        self.wheel = Wheel::new(self.clock.clone());
        // The panic may have unwound while the scratch buffer was lent out.
        self.scratch.resize(SCRATCH_BYTES, 0);
    }

    /// What the shard leaves for the successor, if it kept connections;
    /// the rest of it (its store, its links) is dropped here.
    fn outgoing(self) -> Option<Outgoing> {
        if !self.carrying_on {
            return None;
        }
        let Shard {
            io,
            kept,
            id,
            config,
            ..
        } = self;
        Some(Outgoing {
            io,
            kept,
            shard: id,
            input_bytes_max: config.frame_bytes_max,
        })
    }

    fn serve(&mut self) -> std::io::Result<()> {
        loop {
            if let Some(done) = self.iterate() {
                return done;
            }
        }
    }

    /// The most unsent output any logged-in connection holds, in bytes.
    /// Between iterations it is at most `conn_out_bytes_max`: a flush that
    /// finds more closes the connection as slow. For the simulator's bound
    /// checks; O(connections).
    pub fn out_pending_max(&self) -> usize {
        (0..self.sessions.slots())
            .map(|i| ConnId(i as u32))
            .filter(|&c| self.sessions.state(c) == State::Active)
            .map(|c| self.conns.out_pending(c))
            .max()
            .unwrap_or(0)
    }

    /// Runs one iteration of the loop (for a simulator driving several
    /// shards from one thread, over [`crate::io::sim`] and a simulated
    /// [`Clock`], whose waits never block). A panic restarts the shard in
    /// place as [`Shard::run`] does, but at once, without backoff or
    /// intensity: the simulator decides what a crash means. A store that
    /// cannot be reopened is tried again at the next step. `Some` when
    /// graceful shutdown has completed.
    pub fn step(&mut self) -> Option<std::io::Result<()>> {
        if self.stats.state.get() == ShardState::Restarting as u64 {
            if self.reopen().is_err() {
                return None;
            }
            self.set_state(ShardState::Up);
        }
        match catch_unwind(AssertUnwindSafe(|| self.iterate())) {
            Ok(done) => done,
            Err(panic) => {
                log::warn!("shard {} crashed: {}", self.id, panic_text(&*panic));
                self.set_state(ShardState::Restarting);
                self.stats.restarts.inc();
                self.reset();
                if self.reopen().is_ok() {
                    self.set_state(ShardState::Up);
                }
                None
            }
        }
    }

    /// One loop iteration; `Some` when graceful shutdown has completed.
    fn iterate(&mut self) -> Option<std::io::Result<()>> {
        self.tick();
        if self.stop.load(Ordering::Relaxed) && self.stop_deadline.is_none() {
            self.begin_shutdown();
        }
        if let Some(deadline) = self.stop_deadline {
            let quiet = self.carrying_quiet();
            if !quiet && self.carrying_on && self.clock.now() >= deadline {
                log::warn!(
                    "shard {}: upgrade: the shards did not agree nothing is in flight within \
                     shutdown_grace_ms; keeping the connections anyway",
                    self.id
                );
            }
            if quiet || self.clock.now() >= deadline {
                // Drain: the batch in flight, and the one staged behind it,
                // are made durable (and answered where a connection is
                // left) before the shard exits.
                while let Some(done) = self.syncer.poll(true) {
                    self.synced(done);
                    self.devices.flush(&mut self.sessions);
                    self.commit();
                }
                self.devices.flush(&mut self.sessions);
                self.carry_out();
                self.close_all();
                // The last online times of the sessions just closed.
                self.devices.flush(&mut self.sessions);
                let now = self.clock.now();
                self.presence.flush(&mut self.sessions, now, true);
                // Cluster: the last seen of the sessions just closed, for
                // the partitions' next owner (the bridge stops after the
                // shards).
                self.publish_states();
                if let Some(bridge) = &mut self.bridge {
                    bridge.flush();
                }
                return Some(Ok(()));
            }
        }
        let mut timeout = self.wheel.until_next_tick();
        if self.outboxes.waiting() {
            timeout = timeout.min(OUTBOX_RETRY);
        }
        if !self.links.prepare_sleep() || !self.scans.is_empty() {
            timeout = Duration::ZERO;
        }
        let waited = self.io.wait(Some(timeout));
        self.links.awake();
        if let Err(e) = waited {
            return Some(Err(e));
        }
        let started = self.clock.now();

        self.tick();
        self.drain_io();
        self.drain_rings();
        self.adopt_carried();
        self.fence();
        self.serve_ops();
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(&mut fired);
        self.tick();
        for entry in fired.drain(..) {
            self.event(Event::Timer(entry));
        }
        self.fired = fired;
        self.retry_blocked();
        if self.sessions.crash_requested() {
            panic!("injected shard crash (debug hook)");
        }
        self.devices.flush(&mut self.sessions);
        self.commit();
        self.presence
            .flush(&mut self.sessions, self.clock.now(), false);
        self.publish_states();
        self.outboxes.flush(&mut self.links, &self.stats);
        if let Some(bridge) = &mut self.bridge {
            bridge.flush();
        }
        self.flush_output();

        self.stats.loop_iterations.inc();
        let now = self.clock.now();
        if self.loop_timer.record(now - started, now, &self.stats) {
            self.admission.sweep(self.now.unix_ms);
            self.event(Event::ExpireDevices(EXPIRE_USERS_PER_PASS));
            self.publish_gauges();
            self.release_memory(now);
        }
        None
    }

    /// Cluster: hands the state of every user whose registry, last seen or
    /// privacy changed in this iteration to the bridge, which keeps it in
    /// JetStream (docs/CLUSTER.md, "Per-user state across nodes"), with
    /// the receipt records it keeps; the records of receipts written to
    /// every device of their user are acked at once.
    fn publish_states(&mut self) {
        let Some(bridge) = &mut self.bridge else {
            return;
        };
        let mut users = std::mem::take(&mut self.changed_users);
        let mut taken = std::mem::take(&mut self.bridge_receipts);
        self.devices.take_changed(&mut users);
        self.presence.take_changed(&mut users);
        self.sessions.take_bridge_receipts(&mut taken);
        let written: Vec<u64> = taken.iter().filter(|r| !r.held).map(|r| r.token).collect();
        if !written.is_empty() {
            bridge.send(Msg::ReceiptsTaken { seqs: written });
        }
        // A held receipt's user goes even if nothing changed: a record that
        // came again (its first state publish failed) finds the receipt
        // held already, and only a stored state lets it be acked.
        taken.retain(|r| r.held);
        taken.sort_unstable_by_key(|r| r.user);
        users.extend(taken.iter().map(|r| r.user));
        users.sort_unstable();
        users.dedup();
        let owners = self.owners.as_deref();
        let mut at = 0;
        for user in users.drain(..) {
            let n = taken[at..].iter().take_while(|r| r.user == user).count();
            let receipts: Vec<u64> = taken[at..at + n].iter().map(|r| r.token).collect();
            at += n;
            // Users of a partition this node gave up (their sessions just
            // closed with BYE(moved)): the new owner keeps their state now,
            // and takes their receipt records, unacked, from JetStream.
            if owners.is_some_and(|o| o.of_user(user) != Owner::Here) {
                continue;
            }
            let bytes = self.sessions.user_state(user).encode(user);
            bridge.send(Msg::State {
                user,
                bytes,
                receipts,
            });
            self.stats.states_handed.inc();
        }
        taken.clear();
        self.bridge_receipts = taken;
        self.changed_users = users;
    }

    /// Cluster: once the bridge reports lost partitions, or this node's
    /// leases go unproven, closes the sessions of users this node no longer
    /// serves (fencing).
    fn fence(&mut self) {
        let Some(losses) = self.owners.as_ref().map(|o| o.fencing()) else {
            return;
        };
        if losses != self.owner_losses {
            self.owner_losses = losses;
            self.event(Event::Moved);
        }
    }

    /// Reads the time the session layer is given next (once per loop
    /// phase, not per event: the wheel's tick is 100 ms).
    fn tick(&mut self) {
        self.now = Now {
            tick: self.wheel.now(),
            unix_ms: self.clock.unix_ms(),
            mono_ns: self.clock.mono_ns(),
        };
    }

    /// Hands `event` to the session layer and executes what it decides.
    fn event(&mut self, event: Event<'_>) -> Flow {
        self.event_with_rest(event, &[])
    }

    /// [`Shard::event`] for a frame followed by `rest` (what a handoff
    /// takes along).
    fn event_with_rest(&mut self, event: Event<'_>, rest: &[u8]) -> Flow {
        let env = View {
            peers: &self.peers,
            outboxes: &self.outboxes,
            conns: &self.conns,
            ring_slots: self.config.ring_slots,
            owners: self.owners.as_deref(),
            bridge: self.bridge.as_ref(),
            ops: self.ops.as_deref(),
        };
        let flow = self.sessions.on_event(self.now, &env, event);
        self.execute(rest);
        flow
    }

    /// Executes the session layer's last actions, in order.
    fn execute(&mut self, rest: &[u8]) {
        let mut actions = std::mem::take(&mut self.actions);
        let mut wire = std::mem::take(&mut self.wire);
        self.sessions.take_actions(&mut actions, &mut wire);
        for action in actions.drain(..) {
            match action {
                Action::Write { conn, bytes } => self.write_bytes(conn, &wire[bytes]),
                Action::Route { dst, msg } => self.outboxes.push(dst, msg),
                Action::Cluster(msg) => self
                    .bridge
                    .as_mut()
                    .expect("only a clustered session asks for the bridge")
                    .send(msg),
                Action::Handoff {
                    conn,
                    user,
                    device,
                    version,
                    home,
                } => {
                    self.pending_end(conn);
                    self.hand_off(conn, user, device, version, home, rest)
                }
                Action::Arm { entry, deadline } => self.wheel.insert(entry, deadline),
                Action::Established(conn) => {
                    self.pending_end(conn);
                    self.io.established(conn)
                }
                Action::CloseAfterFlush(conn) => self.closing(conn),
                Action::CloseNow(conn) => self.close_conn(conn),
                Action::LoginFailed(conn) => {
                    if let Some(ip) = self.admission.login_failed(conn, self.now.unix_ms) {
                        self.stats.addr_bans.inc();
                        log::info!(
                            "shard {}: {ip} refused for {} ms after more than {} failed logins \
                             within a minute",
                            self.id,
                            self.config.addr_ban_ms,
                            self.config.addr_logins_failed_max
                        );
                    }
                }
            }
        }
        self.actions = actions;
        self.wire = wire;
        if !self.mqtt_close.is_empty() {
            self.mqtt_settle();
        }
    }

    /// The group commit, pipelined: once the batch in flight is synced, its
    /// answers go and its new messages are sent to their recipients'
    /// connections; then the next batch (everything staged since) is
    /// written with one write, and its `fdatasync` handed to the syncer,
    /// while the loop goes on. With a sync still running, this iteration's
    /// changes stay staged for the next batch. Pushes a commit rolled back
    /// (disk full) are answered `storage_full` instead of ACK. A store that
    /// cannot commit otherwise (a failed write or sync) crashes the shard:
    /// the restart replays what is really on disk.
    fn commit(&mut self) {
        // Group changes first: their answers wait for this commit.
        self.groups.flush(&mut self.sessions);
        if self.syncer.busy() {
            match self.syncer.poll(false) {
                Some(done) => self.synced(done),
                None => {
                    self.stats.sync_overlaps.inc();
                    return;
                }
            }
        }
        let mut refused = std::mem::take(&mut self.refused);
        let job = match self.sessions.store_mut().begin_commit(&mut refused) {
            Ok(job) => job,
            Err(e) => panic!("store commit failed: {e}"),
        };
        if !refused.is_empty() {
            self.stats.store_rollbacks.inc();
        }
        match job {
            Some(job) => {
                debug_assert!(
                    refused.is_empty(),
                    "a batch rolled back has nothing to sync"
                );
                self.event(Event::Sealed);
                self.syncer.start(job);
            }
            None => {
                self.tick();
                self.event(Event::Committed { refused: &refused });
            }
        }
        refused.clear();
        self.refused = refused;
    }

    /// The sync of the batch in flight ended: tells the store, and lets the
    /// batch's answers go. A failed sync crashes the shard (never an ACK).
    fn synced(&mut self, (result, took): sync::Done) {
        self.stats.latency.fsync.record(took.as_nanos() as u64);
        if let Err(e) = self.sessions.store_mut().synced(result) {
            panic!("store commit failed: {e}");
        }
        self.tick();
        self.event(Event::Committed { refused: &[] });
    }

    /// Gauges that are cheaper to sample than to track (once a second).
    /// Gives back what the buffers reused across iterations grew to in a
    /// burst (a busy iteration's frames and actions, the outboxes);
    /// called every `memory_release_ms`, so a burst in progress regrows
    /// them at most that often.
    fn trim_buffers(&mut self) {
        use crate::memory::trim_vec;
        trim_vec(&mut self.wire, REUSED_KEEP_BYTES);
        trim_vec(&mut self.actions, REUSED_KEEP_BYTES);
        trim_vec(&mut self.fired, REUSED_KEEP_BYTES);
        trim_vec(&mut self.refused, REUSED_KEEP_BYTES);
        self.conns.trim(REUSED_KEEP_BYTES);
        self.outboxes.trim();
        self.sessions.trim(REUSED_KEEP_BYTES);
        self.devices.trim(REUSED_KEEP_BYTES);
        self.groups.trim(REUSED_KEEP_BYTES);
    }

    /// Every `memory_release_ms`: the allocator returns what this shard
    /// freed (see [`crate::memory`]).
    fn release_memory(&mut self, now: Instant) {
        let every = Duration::from_millis(self.config.memory_release_ms);
        if !every.is_zero() && now.saturating_duration_since(self.memory_released) >= every {
            self.trim_buffers();
            crate::memory::release(false);
            self.memory_released = now;
        }
    }

    fn publish_gauges(&self) {
        let s = &self.stats;
        s.queued.set(self.sessions.store().total() as u64);
        let shape = self.sessions.store().shape();
        let oldest_age_ms = shape
            .oldest_ms()
            .map_or(0, |t| self.now.unix_ms.saturating_sub(t));
        s.queue_oldest_age_seconds.set(oldest_age_ms / 1000);
        for (c, &users) in s.user_queues.iter().zip(shape.users()) {
            c.set(users);
        }
        s.addrs_tracked.set(self.admission.addrs() as u64);
        let space = self.sessions.store().space();
        s.disk_free_bytes.set(space.free_bytes.unwrap_or(0));
        s.disk_short.set(space.short.into());
        s.ring_in_depth.set(self.links.in_depth() as u64);
        s.ring_out_depth.set(self.outboxes.depth() as u64);
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
                Completion::Closed(conn) => {
                    self.event(Event::Closed(conn));
                }
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
            // What the session layer decided before the panic still happens,
            // as when its effects were immediate.
            self.execute(&[]);
            if self.sessions.gen(conn) != 0 {
                self.event(Event::Closed(conn));
            }
        }
    }

    // ---- cross-shard messages --------------------------------------------

    fn drain_rings(&mut self) {
        for src in 0..self.links.shards() {
            if src == self.id {
                continue;
            }
            // At most one ring's worth per source per iteration.
            for _ in 0..self.config.ring_slots {
                match self.links.pop(src) {
                    Some(msg) => {
                        self.on_msg(msg);
                        self.popped += 1;
                    }
                    None => break,
                }
            }
        }
        for _ in 0..self.config.ring_slots {
            match self.bridge.as_mut().and_then(ShardLink::pop) {
                Some(msg) => {
                    self.event(Event::Msg(msg));
                }
                None => break,
            }
        }
    }

    /// A message from another shard: a handoff is attached here, the rest
    /// go to the session layer.
    fn on_msg(&mut self, msg: Msg) {
        let Msg::Handoff {
            conn,
            user,
            device,
            version,
            leftover,
            tls,
            ws,
            ws_rx,
            mqtt,
            out,
        } = msg
        else {
            self.event(Event::Msg(msg));
            return;
        };
        match self.io.attach(conn) {
            Ok(id) => {
                self.stats.handoffs_in.inc();
                let ws_mode = match ws {
                    true => conns::WsMode::Open,
                    false => conns::WsMode::No,
                };
                self.open_conn(id, tls, ws_mode, mqtt.unwrap_or_default());
                if let Some(rx) = ws_rx {
                    self.conns.set_rx(id, *rx);
                }
                if !out.is_empty() {
                    self.write_records(id, &out);
                }
                self.guarded(id, |shard| {
                    shard.event(Event::HandedOver {
                        conn: id,
                        user,
                        device,
                        version,
                        resumed: false,
                    });
                    if mqtt.is_some() {
                        if !leftover.is_empty() {
                            shard.on_mqtt_bytes(id, &leftover);
                        }
                    } else if !leftover.is_empty() {
                        shard.on_bytes(id, &leftover);
                    }
                });
                if self.stop_deadline.is_some() {
                    self.event(Event::Shutdown(Some(id)));
                } else if self.drain.is_some() {
                    self.event(Event::Bye {
                        conn: id,
                        reason: ByeReason::Moving,
                    });
                } else if self
                    .ops
                    .as_ref()
                    .is_some_and(|o| o.banned(user, self.now.unix_ms))
                {
                    // Banned while its handoff was on the way here.
                    self.event(Event::Bye {
                        conn: id,
                        reason: ByeReason::Kicked,
                    });
                }
            }
            Err(e) => log::warn!("shard {}: attach failed: {e}", self.id),
        }
    }

    // ---- shutdown ----------------------------------------------------------

    /// Whether a stopping shard is done: every connection closed, or (an
    /// upgrade that carries connections) only frozen ones left and every
    /// shard agreed nothing is in flight between them (see [`Carry`]).
    fn carrying_quiet(&mut self) -> bool {
        if !self.carrying_on {
            return self.io.is_empty();
        }
        let idle =
            self.sessions.only_active_left() && !self.syncer.busy() && !self.outboxes.waiting();
        self.carry
            .publish(self.id, self.outboxes.pushed(), self.popped, idle);
        // Shard 0 runs the waves; the others see their outcome.
        let quiet = if self.id == 0 {
            self.carry.detect()
        } else {
            self.carry.quiet()
        };
        quiet && idle
    }

    fn begin_shutdown(&mut self) {
        log::info!(
            "shard {}: shutting down, {} connections",
            self.id,
            self.io.len()
        );
        self.stop_deadline =
            Some(self.clock.now() + Duration::from_millis(self.config.shutdown_grace_ms));
        self.io.stop_accepting();
        if self.upgrade.load(Ordering::Relaxed) {
            self.sessions
                .set_shutdown_reason(crate::proto::ByeReason::Upgrade);
            if self.io.carries() {
                self.freeze_carried();
                // The grace counts from the freeze's end: freezing 500,000
                // connections took seconds, and a deadline already past
                // would keep them before the shards agree nothing is in
                // flight (SENDs read just before would go unanswered).
                self.stop_deadline =
                    Some(self.clock.now() + Duration::from_millis(self.config.shutdown_grace_ms));
                return;
            }
        }
        self.event(Event::Shutdown(None));
    }

    fn close_all(&mut self) {
        self.flush_output();
        for i in 0..self.sessions.slots() {
            self.event(Event::Closed(ConnId(i as u32)));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn session_slot_is_small() {
        // The per-connection budget is 256 bytes, all structures included;
        // the two slots together cost what the one slot did (40 bytes).
        let bytes = super::conns::SLOT_BYTES + crate::session::SLOT_BYTES;
        assert!(bytes <= 40, "{bytes}");
        eprintln!(
            "per-connection slots: session {} + shard {} = {bytes} bytes",
            crate::session::SLOT_BYTES,
            super::conns::SLOT_BYTES
        );
    }
}
