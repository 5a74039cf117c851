//! The deterministic simulator: the real shards, session layer, rings and
//! store of a whole server, run by one thread over a simulated network
//! ([`crate::io::sim`]), clock ([`crate::clock::SimTime`]) and disk
//! ([`disk`]), with thousands of simulated clients ([`client`]) and faults
//! drawn from one seed. The same seed gives the same run, bit for bit;
//! [`Report::trace`] is a checksum of everything the clients received.
//!
//! A run has two phases. During `traffic`, clients log in, send, answer
//! and leave, while the seed's faults hit: partial reads and writes,
//! stalls, connection resets, ENOSPC and EIO on the disk (EIO crashes the
//! shard, which restarts in place), and process crashes (every shard
//! dropped, the disk cut back to what was fsynced, shards rebuilt and their
//! logs recovered). Then faults stop, clients stop sending and come back
//! online, and the `drain` phase must end with every client settled and
//! every ACKed message delivered. See docs/SIMULATION.md.
//!
//! Over 800 lines: the world's loop, its fault injection and the repair
//! check all touch the same `World` fields; splitting them would pass most
//! of the struct around. Client behaviour, checks and the disk live apart.

pub mod check;
pub mod client;
pub mod disk;
pub mod hostile;

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SimTime};
use crate::config::Config;
use crate::io::sim::{Net, NetFaults, SockId};
use crate::io::Io;
use crate::ring;
use crate::shard::{open_store, Shard, ShardParts};
use crate::stats::ShardStats;
use crate::store::{shard_dir, LogStore, Store, StoreError};
use crate::supervisor::{Fatal, ShardState};
use check::Checker;
use client::{Behaviour, Client};
use disk::{DiskCounts, DiskFaults};

/// A bug planted on purpose, to show the simulator finds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Planted {
    /// No bug.
    #[default]
    None,
    /// The store skips the fsync of a commit before its ACKs go out, so a
    /// crash can lose ACKed messages.
    SkipFsync,
    /// Recovery skips the record checksum, so a flipped byte in a sealed
    /// segment is replayed as if it were sound.
    SkipChecksum,
    /// The session relays a READ without checking that the message was
    /// delivered to that connection, so a forged READ reaches the sender.
    RelayForgedRead,
    /// The session ignores the v2 dedupe window, so a retried SEND is
    /// stored (and delivered) again under a new server id.
    DedupeOff,
}

thread_local! {
    static PLANTED: Cell<Planted> = const { Cell::new(Planted::None) };
}

/// Whether `bug` is planted on this thread (only a simulation plants one).
pub fn planted(bug: Planted) -> bool {
    bug != Planted::None && PLANTED.with(Cell::get) == bug
}

/// Simulated wall clock at time zero (2030-03-17): fixed, so tokens and
/// server timestamps are the same in every run.
const ORIGIN_UNIX_MS: u64 = 1_900_000_000_000;
/// Shortest and longest step of simulated time while bytes are in flight.
const STEP_NS: (u64, u64) = (10_000, 1_000_000);
/// The simulated server's `frame_bytes_max` (the smallest
/// `conn_out_bytes_max` is this plus 16): small, so a slow reader's
/// output passes `conn_out_bytes_max` (BYE(`slow`)) within a run. The
/// bodies are 24 bytes.
const FRAME_BYTES_MAX: usize = 4096;

/// The simulated server's `sends_per_s_max`: low, so a flood passes it.
const SENDS_PER_S_MAX: u32 = 20;
/// Longest step of simulated time when the network is quiet (one timer tick).
const IDLE_STEP_NS: u64 = 100_000_000;

/// The faults of one run; [`Faults::swarm`] picks a mix per seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Network: partial I/O, small output buffers, stalls.
    pub net: NetFaults,
    /// Disk: ENOSPC, EIO.
    pub disk: DiskFaults,
    /// Mean time between connection resets (one random client's), if any.
    pub reset_every: Option<Duration>,
    /// Mean time between process crashes, if any.
    pub crash_every: Option<Duration>,
    /// Mean time between byte flips in sealed segments, if any.
    pub flip_every: Option<Duration>,
    /// Per million clients: hostile ones that also forge DELIVERED and
    /// READ for messages they never received.
    pub forgers_per_million: u32,
    /// Per million clients: the ones that log in with protocol v2
    /// (idempotent SEND); the others speak v1. Not a fault, but part of the
    /// seed's mix.
    pub v2_per_million: u32,
    /// Per million clients: hostile ones of the kinds in `hostile_kinds`
    /// (garbage, malformed frames, oversized prefixes, SEND floods, slow
    /// readers; see [`hostile`]).
    pub hostile_per_million: u32,
    /// Which hostile kinds are on: bit `i` for [`hostile::KINDS`]`[i]`.
    pub hostile_kinds: u8,
}

impl Faults {
    /// No faults.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Swarm testing: each fault on or off, and how often, drawn from
    /// `seed`, so rare mixes get explored across seeds.
    pub fn swarm(seed: u64) -> Faults {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_fa17);
        let mut maybe = |p_on: u32, max: u32| {
            if rng.u32(..100) < p_on {
                rng.u32(1..=max)
            } else {
                0
            }
        };
        let net = NetFaults {
            partial_per_million: maybe(50, 500_000),
            out_buffer_bytes: if maybe(50, 1) > 0 {
                (256, 16 * 1024)
            } else {
                (0, 0)
            },
            stall_per_million: maybe(30, 20_000),
            stall_ms_max: 3_000,
        };
        let disk = DiskFaults {
            write_enospc_per_million: maybe(25, 100_000),
            write_eio_per_million: maybe(20, 20_000),
            sync_eio_per_million: maybe(20, 20_000),
        };
        let reset = maybe(50, 2_000);
        let crash = maybe(50, 20_000);
        // Drawn last, so the other faults of a seed are what they were
        // before flips existed.
        let flip = maybe(30, 10_000);
        // Drawn after flips, for the same reason.
        let forgers = maybe(30, 300_000);
        // Drawn after forgers, for the same reason.
        let v2 = maybe(70, 1_000_000);
        // Drawn after v2, for the same reason.
        let hostile = maybe(40, 200_000);
        let kinds = rng.u8(1..1 << hostile::KINDS.len());
        Faults {
            net,
            disk,
            reset_every: (reset > 0).then(|| Duration::from_millis(reset.into())),
            crash_every: (crash > 0).then(|| Duration::from_millis(2_000 + u64::from(crash))),
            flip_every: (flip > 0).then(|| Duration::from_millis(1_000 + u64::from(flip))),
            forgers_per_million: forgers,
            v2_per_million: v2,
            hostile_per_million: hostile,
            hostile_kinds: kinds,
        }
    }
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Options {
    /// The seed of every random choice.
    pub seed: u64,
    /// Shards of the simulated server.
    pub shards: usize,
    /// Simulated clients, one user each (users 1..=clients).
    pub clients: u32,
    /// Simulated time with traffic and faults.
    pub traffic: Duration,
    /// Longest simulated time for everything to settle afterwards.
    pub drain: Duration,
    /// The faults; `None`: [`Faults::swarm`] of the seed.
    pub faults: Option<Faults>,
    /// A bug to plant.
    pub planted: Planted,
    /// Most DELIVERs the clients may receive in the run; past it the seed
    /// fails ("seed exceeded N DELIVERs"), so a runaway (a redelivery
    /// storm) ends instead of running for hours. 0: 100,000 per client.
    pub delivers_max: u64,
}

impl Options {
    /// Defaults for `seed`: 3 shards, 100 clients, 30 s of traffic, up to
    /// 120 s to drain, swarm faults, no planted bug, 100,000 DELIVERs per
    /// client at most.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            shards: 3,
            clients: 100,
            traffic: Duration::from_secs(30),
            drain: Duration::from_secs(120),
            faults: None,
            planted: Planted::None,
            delivers_max: 0,
        }
    }
}

/// What a run did, and whether it failed.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The faults it ran with.
    pub faults: Faults,
    /// Simulated time run.
    pub sim_time: Duration,
    /// Clients.
    pub clients: u32,
    /// CPU time of the thread that ran it.
    pub cpu: Duration,
    /// Messages sent (SENDs made, resends not counted) and ACKed.
    pub sent: u64,
    /// ACKs received.
    pub acked: u64,
    /// Clients that spoke protocol v2.
    pub v2_clients: u32,
    /// SENDs written again with the same client_id (after a dropped
    /// connection or a temporary refusal), by v1 and v2 clients.
    pub retries: u64,
    /// Misdeeds of hostile clients: bytes that break the wire format, and
    /// SEND floods.
    pub hostile: u64,
    /// The documented fatal ERRORs hostile clients got for their bad bytes.
    pub fatal_errors: u64,
    /// BYE(`slow`) received (slow readers).
    pub slow_byes: u64,
    /// BYE(`rate_limited`) received (floods).
    pub rate_byes: u64,
    /// DELIVERs received, and how many of them were repeats.
    pub delivers: u64,
    /// DELIVERs of a server id the recipient had seen.
    pub duplicates: u64,
    /// RECEIPTs received.
    pub receipts: u64,
    /// Receipts forged by hostile clients (each refused, none relayed).
    pub forged: u64,
    /// Process crashes, shard restarts, connection resets made.
    pub crashes: u64,
    /// Restarts that found a flipped byte and ran a repair, and the records
    /// the repairs skipped.
    pub repairs: u64,
    /// Records skipped by repairs.
    pub repaired_records: u64,
    /// Shard restarts (after an injected EIO).
    pub shard_restarts: u64,
    /// Connection resets.
    pub resets: u64,
    /// Disk faults injected.
    pub disk: DiskCounts,
    /// Checksum of every frame the clients received, in order.
    pub trace: u32,
    /// The first check that failed, and when.
    pub failure: Option<(Duration, String)>,
}

impl Report {
    /// Simulated client-seconds per CPU second.
    pub fn speed(&self) -> f64 {
        self.clients as f64 * self.sim_time.as_secs_f64() / self.cpu.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} {}: {:.1} s simulated, {} clients, {:.2} s CPU ({:.0} client-s/CPU-s); \
             v2 {} sent {} retried {} acked {} delivered {} (dup {}) receipts {} forged {} hostile {} (fatal {}, bye slow {}, bye rate {}); crashes {} shard restarts {} \
             resets {} repairs {} ({} records) disk {:?}; trace {:08x}",
            self.seed,
            if self.failure.is_some() {
                "FAILED"
            } else {
                "ok"
            },
            self.sim_time.as_secs_f64(),
            self.clients,
            self.cpu.as_secs_f64(),
            self.speed(),
            self.v2_clients,
            self.sent,
            self.retries,
            self.acked,
            self.delivers,
            self.duplicates,
            self.receipts,
            self.forged,
            self.hostile,
            self.fatal_errors,
            self.slow_byes,
            self.rate_byes,
            self.crashes,
            self.shard_restarts,
            self.resets,
            self.repairs,
            self.repaired_records,
            self.disk,
            self.trace,
        )?;
        if let Some((at, why)) = &self.failure {
            write!(f, "\n  at {:.3} s: {why}", at.as_secs_f64())?;
        }
        Ok(())
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs one simulation and reports it. Deterministic in `opts`.
pub fn run(opts: &Options) -> Report {
    let started = thread_cpu();
    let faults = opts.faults.unwrap_or_else(|| Faults::swarm(opts.seed));
    PLANTED.with(|p| p.set(opts.planted));
    disk::install(opts.seed ^ 0xd15c, faults.disk);
    let mut world = World::new(opts, faults);
    let result = world.run();
    let mut report = world.report();
    report.disk = disk::uninstall();
    PLANTED.with(|p| p.set(Planted::None));
    if let Err(why) = result {
        report.failure = Some((world.time.elapsed(), why));
    }
    drop(world);
    report.cpu = thread_cpu().saturating_sub(started);
    report
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Clients act freely and faults hit.
    Traffic,
    /// No faults, no new messages: until everything settles.
    Drain,
    /// Settled: time runs on so the shards publish their gauges.
    Quiet,
}

struct World {
    opts: Options,
    faults: Faults,
    time: Arc<SimTime>,
    rng: fastrand::Rng,
    net: Net,
    config: Arc<Config>,
    shards: Vec<Shard>,
    stats: Vec<Arc<ShardStats>>,
    clients: Vec<Client>,
    behaviour: Behaviour,
    turns: BinaryHeap<Reverse<(u64, u32)>>,
    /// Per client, the time of its one pending turn; a heap entry with
    /// another time is stale and skipped. Without it every reschedule (a
    /// dropped connection, the drain) started a second chain of turns, and
    /// a client acted (and sent) that many times more often: seed 622157.
    turn_at: Vec<u64>,
    /// `Options::delivers_max`, resolved.
    delivers_max: u64,
    checker: Checker,
    news: Vec<(u32, SockId)>,
    trace: u32,
    crashes: u64,
    repairs: u64,
    repaired_records: u64,
    restarts: u64,
    resets: u64,
    next_reset_ns: u64,
    next_crash_ns: u64,
    next_flip_ns: u64,
    /// Per shard, when the per-connection output bound is next checked.
    next_bounds_ns: Vec<u64>,
    dir: PathBuf,
}

impl World {
    fn new(opts: &Options, faults: Faults) -> World {
        let time = Arc::new(SimTime::new(ORIGIN_UNIX_MS));
        let mut rng = fastrand::Rng::with_seed(opts.seed);
        let net = Net::new(opts.shards, rng.u64(..), faults.net, time.clone());
        // Unique per run in this process: runs on other threads (tests) may
        // use the same seed. The name plays no part in the run.
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tern-sim-{}-{}-{}",
            std::process::id(),
            opts.seed,
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let config = Config {
            shards: opts.shards,
            data_dir: dir.clone(),
            // Small: the reserve file is written for real.
            disk_free_bytes_min: 64 * 1024,
            // Small, so segments are sealed (and compacted, and flipped)
            // within a run.
            segment_bytes_max: 8 * 1024,
            // Low, so a flood (`hostile::FLOOD_SENDS`) goes past the burst
            // and the refusals add up to BYE(rate_limited) within a run.
            sends_per_s_max: SENDS_PER_S_MAX,
            sends_burst_max: 40,
            frame_bytes_max: FRAME_BYTES_MAX,
            body_bytes_max: FRAME_BYTES_MAX - 41,
            conn_out_bytes_max: FRAME_BYTES_MAX + 16,
            ..Config::default()
        };
        let secret = config.token_secret.clone();
        let expires = ORIGIN_UNIX_MS / 1000 + 365 * 86_400;
        // Its own PRNG: a seed without forgers runs as it did before they
        // existed.
        let mut hostile = fastrand::Rng::with_seed(opts.seed ^ 0x4057_11e5);
        // Its own PRNG too, for the same reason.
        let mut versions = fastrand::Rng::with_seed(opts.seed ^ 0x0002_0002);
        // And for hostile clients.
        let mut rogues = fastrand::Rng::with_seed(opts.seed ^ 0x0bad_c11e);
        let kinds: Vec<hostile::Kind> = (0..hostile::KINDS.len())
            .filter(|i| faults.hostile_kinds & (1 << i) != 0)
            .map(|i| hostile::KINDS[i])
            .collect();
        let mut checker = Checker::default();
        let clients = (0..opts.clients)
            .map(|i| {
                let user = u64::from(i) + 1;
                let forge = (faults.forgers_per_million > 0
                    && hostile.u32(..1_000_000) < faults.forgers_per_million)
                    .then(|| hostile.fork());
                let version = if versions.u32(..1_000_000) < faults.v2_per_million {
                    checker.speaks_v2(user);
                    crate::proto::VERSION_2
                } else {
                    crate::proto::VERSION
                };
                let rogue = (!kinds.is_empty()
                    && rogues.u32(..1_000_000) < faults.hostile_per_million)
                    .then(|| hostile::Hostile {
                        kind: kinds[rogues.usize(..kinds.len())],
                        read_every_turns: rogues.u32(..=8),
                        rng: rogues.fork(),
                    });
                Client::new(
                    i,
                    user,
                    version,
                    crate::token::mint(secret.as_bytes(), user, expires),
                    forge,
                    rogue,
                )
            })
            .collect();
        let behaviour = Behaviour {
            think: Duration::from_millis(rng.u64(50..=1_500)),
            send_per_million: rng.u32(100_000..=600_000),
            leave_per_million: rng.u32(0..=50_000),
            offline_max: Duration::from_millis(rng.u64(100..=10_000)),
            answer_max: Duration::from_millis(rng.u64(1..=3_000)),
            read_per_million: rng.u32(0..=500_000),
        };
        let mut turns = BinaryHeap::new();
        let mut turn_at = Vec::with_capacity(opts.clients as usize);
        for i in 0..opts.clients {
            let at = rng.u64(0..1_000_000_000);
            turns.push(Reverse((at, i)));
            turn_at.push(at);
        }
        let mut world = World {
            opts: opts.clone(),
            faults,
            time,
            net,
            config: Arc::new(config),
            shards: Vec::new(),
            stats: Vec::new(),
            clients,
            behaviour,
            turns,
            turn_at,
            delivers_max: match opts.delivers_max {
                0 => u64::from(opts.clients) * 100_000,
                n => n,
            },
            checker,
            news: Vec::new(),
            trace: 0,
            crashes: 0,
            repairs: 0,
            repaired_records: 0,
            restarts: 0,
            resets: 0,
            next_reset_ns: 0,
            next_crash_ns: 0,
            next_flip_ns: 0,
            next_bounds_ns: vec![0; opts.shards],
            dir,
            rng,
        };
        world.next_reset_ns = world.after(faults.reset_every);
        world.next_crash_ns = world.after(faults.crash_every);
        world.next_flip_ns = world.after(faults.flip_every);
        world
    }

    fn now_ns(&self) -> u64 {
        self.time.elapsed().as_nanos() as u64
    }

    /// A random time around `mean` from now; never without a mean.
    fn after(&mut self, mean: Option<Duration>) -> u64 {
        match mean {
            Some(mean) => self.now_ns() + self.rng.u64(1..=2 * mean.as_nanos() as u64),
            None => u64::MAX,
        }
    }

    /// Builds every shard over the simulated network and disk, recovering
    /// its log (with disk faults off: a start that fails is not the case
    /// being tested).
    fn build_shards(&mut self) -> Result<(), String> {
        disk::set_faults(false);
        let n = self.opts.shards;
        self.stats = (0..n).map(|_| Arc::default()).collect();
        let peers: Arc<[Arc<ShardStats>]> = self.stats.clone().into();
        let fatal = Fatal::new();
        let stop = Arc::new(AtomicBool::new(false));
        let adopt = Arc::new(crate::shard::Adopt::new(n));
        let ios: Vec<Io> = (0..n)
            .map(|i| Io::Sim(crate::io::sim::Io::new(self.net.clone(), i)))
            .collect();
        let wakers = ios.iter().map(Io::wake_handle).collect();
        let links = ring::mesh(self.config.ring_slots, wakers);
        let clock = Clock::Sim(self.time.clone());
        for (id, (io, links)) in ios.into_iter().zip(links).enumerate() {
            let store = match open_store(&self.config, id, clock.clone()) {
                Ok(store) => store,
                // What the operator does (docs/OPERATIONS.md): start again
                // with --repair.
                Err(e @ StoreError::Corrupt { .. }) => self.repair(id, clock.clone(), &e)?,
                Err(e) => return Err(format!("shard {id}: recovery failed: {e}")),
            };
            let groups = crate::shard::open_group_log(&self.config, id)
                .map_err(|e| format!("shard {id}: group log not opened: {e}"))?;
            self.shards.push(Shard::new(ShardParts {
                push: None,
                groups,
                io,
                links,
                stats: self.stats[id].clone(),
                stop: stop.clone(),
                upgrade: Default::default(),
                config: self.config.clone(),
                store,
                tls: None,
                peers: peers.clone(),
                fatal: fatal.clone(),
                clock: clock.clone(),
                owners: None,
                bridge: None,
                ops: None,
                carry: Default::default(),
                adopt: adopt.clone(),
            }));
        }
        disk::set_faults(true);
        Ok(())
    }

    /// Opens shard `id`'s store with `repair`, after `corrupt` refused the
    /// plain start. The repair must skip exactly the records the disk
    /// flipped in that shard's files; the messages they queued are the only
    /// ones the checker then lets go undelivered.
    fn repair(
        &mut self,
        id: usize,
        clock: Clock,
        corrupt: &StoreError,
    ) -> Result<Box<dyn Store + Send>, String> {
        let dir = shard_dir(&self.config.data_dir, id);
        let flips: Vec<disk::Flip> = disk::flips()
            .into_iter()
            .filter(|f| f.path.parent() == Some(dir.as_path()))
            .collect();
        if flips.is_empty() {
            return Err(format!(
                "shard {id}: {corrupt}, but no byte was flipped there"
            ));
        }
        let opts = crate::store::LogOptions {
            repair: true,
            ..self.config.log_options()
        };
        let (store, recovery) = LogStore::open_with_clock(dir, opts, clock)
            .map_err(|e| format!("shard {id}: repair failed: {e}"))?;
        for s in &recovery.skipped {
            if !disk::is_flipped_run(&flips, &s.file, s.offset, s.offset + s.bytes) {
                return Err(format!(
                    "shard {id}: repair skipped {} bytes at {} in {} ({}), not a run of flipped records",
                    s.bytes,
                    s.offset,
                    s.file.display(),
                    s.reason
                ));
            }
        }
        for f in &flips {
            let found = recovery.skipped.iter().any(|s| {
                f.path == s.file && s.offset <= f.record.0 && f.record.1 <= s.offset + s.bytes
            });
            if !found {
                return Err(format!(
                    "shard {id}: the byte flipped in the record at {}..{} of {} went undetected",
                    f.record.0,
                    f.record.1,
                    f.path.display()
                ));
            }
            if let Some((user, server_id)) = f.queued {
                self.checker.lost_to_corruption(user, server_id);
            }
            if let Some((from, client_id)) = f.origin {
                self.checker.lost_dedupe(from, client_id);
            }
        }
        self.repairs += 1;
        // Records, not spans: one span can hold several flipped records.
        let mut records: Vec<(&PathBuf, (u64, u64))> =
            flips.iter().map(|f| (&f.path, f.record)).collect();
        records.sort_unstable();
        records.dedup();
        self.repaired_records += records.len() as u64;
        Ok(Box::new(store))
    }

    /// A process crash: all memory goes, the disk keeps what was fsynced
    /// (and a torn last write), and the shards start again from it.
    fn crash(&mut self) -> Result<(), String> {
        self.crashes += 1;
        self.restarts += self.stats.iter().map(|s| s.restarts.get()).sum::<u64>();
        self.shards.clear();
        self.net.kill_all();
        disk::crash().map_err(|e| format!("simulated crash: {e}"))?;
        self.build_shards()
    }

    fn run(&mut self) -> Result<(), String> {
        self.build_shards()?;
        let traffic_end = self.opts.traffic.as_nanos() as u64;
        self.phase(traffic_end, Phase::Traffic)?;
        // Faults stop; clients stop sending and leaving, and come back.
        disk::set_faults(false);
        self.net.set_faults(NetFaults::default());
        for c in &mut self.clients {
            c.calm = true;
        }
        let now = self.now_ns();
        for i in 0..self.clients.len() as u32 {
            self.turn_sooner(i, now);
        }
        let drain_end = now + self.opts.drain.as_nanos() as u64;
        if !self.phase(drain_end, Phase::Drain)? {
            let unsettled: Vec<&Client> = self.clients.iter().filter(|c| !c.settled()).collect();
            self.checker.all_acked_delivered()?;
            return Err(format!(
                "not drained within {:?} after faults stopped: {} clients unsettled, e.g. {}",
                self.opts.drain,
                unsettled.len(),
                unsettled
                    .iter()
                    .map(|c| format!(
                        "{}; {}",
                        c.describe(),
                        c.sock()
                            .map_or("no socket".into(), |s| self.net.describe(s))
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        // Let the gauges be published (once a simulated second), then the
        // queues must be empty.
        let until = self.now_ns() + 2_000_000_000;
        self.phase(until, Phase::Quiet)?;
        for (id, s) in self.stats.iter().enumerate() {
            if s.queued.get() != 0 {
                return Err(format!(
                    "shard {id}: {} messages left queued",
                    s.queued.get()
                ));
            }
        }
        Ok(())
    }

    /// Runs until `end_ns`; draining, returns `true` as soon as everything
    /// has settled.
    fn phase(&mut self, end_ns: u64, phase: Phase) -> Result<bool, String> {
        let mut next_settle_check = 0;
        loop {
            let now = self.now_ns();
            if now >= end_ns {
                return Ok(false);
            }
            self.client_turns(now);
            self.pump_news(now)?;
            if self.checker.delivers > self.delivers_max {
                return Err(format!(
                    "seed exceeded {} DELIVERs (a runaway; --delivers-max)",
                    self.delivers_max
                ));
            }
            for _ in 0..2 {
                self.step_shards()?;
                self.pump_news(now)?;
            }
            if phase == Phase::Traffic {
                self.faults(now)?;
            }
            let busy = self.net.in_flight();
            if phase == Phase::Drain && !busy && now >= next_settle_check {
                next_settle_check = now + 1_000_000_000;
                if self.clients.iter().all(Client::settled)
                    && self.net.drained()
                    && self.checker.all_acked_delivered().is_ok()
                {
                    return Ok(true);
                }
            }
            let dt = if busy {
                self.rng.u64(STEP_NS.0..=STEP_NS.1)
            } else {
                let next = self.turns.peek().map_or(u64::MAX, |t| t.0 .0);
                next.saturating_sub(now).clamp(STEP_NS.0, IDLE_STEP_NS)
            };
            self.time.advance(Duration::from_nanos(dt));
        }
    }

    fn client_turns(&mut self, now: u64) {
        let shards = self.opts.shards;
        let users = u64::from(self.opts.clients);
        while let Some(&Reverse((at, i))) = self.turns.peek() {
            if at > now {
                break;
            }
            self.turns.pop();
            if self.turn_at[i as usize] != at {
                continue; // replaced by a sooner turn
            }
            let next = self.clients[i as usize].act(
                &self.net,
                shards,
                users,
                now,
                &self.behaviour,
                &mut self.rng,
                &mut self.checker,
            );
            if self.clients[i as usize].reads_at_turn() {
                // A slow reader reads what it left unread until now.
                if let Some(sock) = self.clients[i as usize].sock() {
                    self.news.push((i, sock));
                }
            }
            let at = next.wake_ns.max(now + 1);
            self.turns.push(Reverse((at, i)));
            self.turn_at[i as usize] = at;
        }
    }

    /// Moves client `i`'s pending turn to `at` if that is sooner.
    fn turn_sooner(&mut self, i: u32, at: u64) {
        if at < self.turn_at[i as usize] {
            self.turns.push(Reverse((at, i)));
            self.turn_at[i as usize] = at;
        }
    }

    fn pump_news(&mut self, now: u64) -> Result<(), String> {
        loop {
            self.net.take_client_news(&mut self.news);
            if self.news.is_empty() {
                return Ok(());
            }
            for (i, sock) in std::mem::take(&mut self.news) {
                let c = &mut self.clients[i as usize];
                let was_online = c.sock().is_some();
                c.on_news(
                    sock,
                    &self.net,
                    now,
                    &self.behaviour,
                    &mut self.rng,
                    &mut self.checker,
                    &mut self.trace,
                )?;
                let due = c.answer_due_ns();
                if was_online && c.sock().is_none() {
                    // Dropped: its next turn is when it comes back.
                    self.turn_sooner(i, now + 1);
                } else if let Some(due) = due {
                    // A DELIVER came: answer it on time.
                    self.turn_sooner(i, due.max(now + 1));
                }
            }
        }
    }

    fn step_shards(&mut self) -> Result<(), String> {
        let mut stuck = false;
        for (id, shard) in self.shards.iter_mut().enumerate() {
            let eio_before = {
                let c = disk::counts();
                c.write_eio + c.sync_eio
            };
            let restarts_before = self.stats[id].restarts.get();
            if let Some(done) = shard.step() {
                return Err(format!("shard {id} stopped: {done:?}"));
            }
            let c = disk::counts();
            if self.stats[id].restarts.get() != restarts_before {
                if c.write_eio + c.sync_eio == eio_before {
                    return Err(format!("shard {id} crashed without an injected I/O error"));
                }
                self.checker.restarts += 1;
            }
            if self.stats[id].panics.get() != 0 {
                return Err(format!("shard {id}: a panic handling a connection"));
            }
            stuck |= self.stats[id].state.get() == ShardState::Restarting as u64;
        }
        for id in 0..self.shards.len() {
            self.bounds(id)?;
        }
        if stuck && !disk::flips().is_empty() {
            // A restart that keeps failing on a corrupt record: the real
            // process gives up after `shard_restarts_max` and exits; the
            // operator starts it again with --repair (see `repair`).
            self.crash()?;
        }
        Ok(())
    }

    /// The configured bounds hold after every step of shard `id`: its
    /// connections not logged in within its share of `pending_max`, its
    /// queued messages within `queue_len_max` per user, and (once per
    /// simulated 10 ms, as it walks every connection) each logged-in
    /// connection's unsent output within `conn_out_bytes_max`.
    fn bounds(&mut self, id: usize) -> Result<(), String> {
        let c = &self.config;
        let s = &self.stats[id];
        let pending_max = c.pending_max.div_ceil(c.shards) as u64;
        if s.pending.get() > pending_max {
            return Err(format!(
                "shard {id}: {} connections pending login, over its share {pending_max} of pending_max",
                s.pending.get()
            ));
        }
        let queued_max = c.queue_len_max as u64 * u64::from(self.opts.clients);
        if s.queued.get() > queued_max {
            return Err(format!(
                "shard {id}: {} messages queued, over queue_len_max for every user",
                s.queued.get()
            ));
        }
        let now = self.now_ns();
        if now >= self.next_bounds_ns[id] {
            self.next_bounds_ns[id] = now + 10_000_000;
            let out = self.shards[id].out_pending_max();
            if out > c.conn_out_bytes_max {
                return Err(format!(
                    "shard {id}: a logged-in connection holds {out} unsent bytes, over \
                     conn_out_bytes_max {}",
                    c.conn_out_bytes_max
                ));
            }
        }
        Ok(())
    }

    fn faults(&mut self, now: u64) -> Result<(), String> {
        if now >= self.next_reset_ns {
            self.next_reset_ns = self.after(self.faults.reset_every);
            let i = self.rng.usize(..self.clients.len());
            if let Some(sock) = self.clients[i].sock() {
                self.resets += 1;
                self.net.reset(sock);
            }
        }
        if now >= self.next_crash_ns {
            self.next_crash_ns = self.after(self.faults.crash_every);
            self.crash()?;
        }
        if now >= self.next_flip_ns {
            self.next_flip_ns = self.after(self.faults.flip_every);
            disk::flip_cold().map_err(|e| format!("flipping a byte: {e}"))?;
        }
        Ok(())
    }

    fn report(&self) -> Report {
        Report {
            seed: self.opts.seed,
            faults: self.faults,
            sim_time: self.time.elapsed(),
            clients: self.opts.clients,
            sent: self.clients.iter().map(Client::sent).sum(),
            acked: self.checker.acked_count() as u64,
            v2_clients: self.checker.v2_count(),
            retries: self.checker.retries,
            hostile: self.checker.hostile,
            fatal_errors: self.checker.fatal,
            slow_byes: self.checker.slow_byes,
            rate_byes: self.checker.rate_byes,
            delivers: self.checker.delivers,
            duplicates: self.checker.duplicates,
            receipts: self.checker.receipts,
            forged: self.checker.forged,
            crashes: self.crashes,
            repairs: self.repairs,
            repaired_records: self.repaired_records,
            shard_restarts: self.restarts
                + self.stats.iter().map(|s| s.restarts.get()).sum::<u64>(),
            resets: self.resets,
            trace: self.trace,
            ..Report::default()
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shards.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
