// Kept whole past 800 lines: phases, progress, summary and report all read one `Run`'s totals.
//! The main thread of a client run: starts the workers, walks the scenario's
//! phases, prints one progress line per second, enforces the memory floor and
//! the time limits, and writes the summary and the JSON report.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tern::proto::Limits;

use crate::addr;
use crate::driver::{Cmd, Pairing, Plan, SendPlan, Worker, WorkerResult, BODY_HEADER_BYTES};
use crate::engine::{poll::PollEngine, EngineConfig, EngineStats};
use crate::ledger::{Ledger, Tally};
use crate::report::{fmt_us, p50_p99, HistReport, Hists, Shared, C};
use crate::sched::{Schedule, NS_PER_S};
use crate::sysinfo::{self, fmt_bytes};
use crate::{
    parse_jitter, ChatArgs, Common, ConnectArgs, EngineKind, OfflineArgs, Protocol, StormArgs,
    EXIT_CONN_FAILED, EXIT_LOST, EXIT_OK,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// How often the main thread checks memory, limits and progress.
const TICK: Duration = Duration::from_millis(100);
/// How long closing everything may take at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Fixed-file slots kept below RLIMIT_NOFILE per ring.
const RING_SLOTS_MARGIN: u64 = 64;
/// Progress samples kept for the JSON timeline (one per second: 6 hours).
const TIMELINE_MAX: usize = 6 * 3600;

/// Why a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waited {
    /// The condition became true.
    Done,
    /// The wait's own timeout passed.
    Timeout,
    /// --max-time passed or SIGINT/SIGTERM arrived.
    Aborted,
}

/// One progress sample.
#[derive(Clone, Copy, Default)]
struct Sample {
    at_s: f64,
    up: i64,
    inflight: i64,
    failed: u64,
    opened: u64,
    sent: u64,
    acks: u64,
    delivers: u64,
}

/// A running set of workers and the bookkeeping around them.
struct Run {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    txs: Vec<Sender<Cmd>>,
    handles: Vec<JoinHandle<WorkerResult>>,
    engine: EngineKind,
    slots_per_ring: u32,
    common: Common,
    started: Instant,
    started_unix_ms: u64,
    deadline: Instant,
    stop_signal: Arc<AtomicBool>,
    mem_floor_hit: Option<(u64, i64)>,
    mem_available_min: Option<u64>,
    last_print: Instant,
    last: Sample,
    timeline: Vec<Value>,
    phases: Vec<Value>,
    up_max: i64,
}

impl Run {
    /// Validates the common options and starts the workers.
    fn start(common: &Common, conns: u64, devices: u64, login: bool, recv: bool) -> Res<Run> {
        let sources = addr::parse_sources(&common.source).map_err(|e| format!("--source: {e}"))?;
        let servers = addr::parse_servers(&common.server).map_err(|e| format!("--server: {e}"))?;
        check_families(&sources, &servers)?;
        if conns == 0 {
            return Err("--conns must be at least 1".into());
        }
        let workers = match common.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(conns as usize)
        .max(1);
        let per_pair = addr::conns_per_pair_max(conns, sources.len(), servers.len());
        if per_pair > 16_000 {
            eprintln!(
                "warning: {per_pair} connections per (source, server) pair; above ~30-50% of the \
                 ephemeral port range connects slow down and fail (add --source addresses or servers)"
            );
        }
        let nofile = sysinfo::nofile_limit()?;
        let slots_per_ring = match common.ring_slots {
            0 => nofile.saturating_sub(RING_SLOTS_MARGIN).max(1),
            n => n as u64,
        }
        .min(u32::MAX as u64) as u32;
        if slots_per_ring as u64 > nofile {
            return Err(format!(
                "--ring-slots {slots_per_ring} is above RLIMIT_NOFILE {nofile}: the kernel refuses such a table"
            )
            .into());
        }
        if !common.recv_bufs.is_power_of_two() {
            return Err("--recv-bufs must be a power of two".into());
        }
        let mut engine = common.engine;
        if engine == EngineKind::Uring {
            #[cfg(target_os = "linux")]
            if let Err(e) = crate::engine::uring::probe() {
                eprintln!("io_uring unavailable ({e}); falling back to --engine poll");
                engine = EngineKind::Poll;
            }
            #[cfg(not(target_os = "linux"))]
            {
                eprintln!("io_uring is Linux only; using --engine poll");
                engine = EngineKind::Poll;
            }
        }
        if engine == EngineKind::Poll && conns + 64 > nofile {
            eprintln!(
                "warning: the poll engine needs one file per connection; {conns} connections \
                 exceed RLIMIT_NOFILE {nofile} (expect EMFILE failures)"
            );
        }

        let stop_opening = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let plan = Arc::new(Plan {
            conns,
            workers,
            user_base: common.user_base,
            devices: devices.max(1),
            secret: common.secret.as_bytes().to_vec(),
            token_expiry_s: tern::token::now_unix_s() + 7 * 24 * 3600,
            login,
            sources: sources.len(),
            servers: servers.len(),
            ping_every: common.ping_every,
            subscribe: common.subscribe,
            receipts: common.protocol == Protocol::Tern,
            inflight_max: common.inflight_max.max(1),
            run_id: (crate::sched::mix(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ std::process::id() as u64,
            ) >> 32) as u32,
            client_id_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            epoch,
            stop_opening,
            limits: Limits::default(),
        });
        let shared = Arc::new(Shared::default());
        let stop_signal = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop_signal.clone())?;
        }

        let (tls_on, ws_on) = (common.tls || common.wss, common.ws || common.wss);
        let tls = if tls_on {
            let config =
                crate::engine::tls::client_config(common.tls_ca.as_deref(), common.tls_insecure)?;
            let name = rustls::pki_types::ServerName::try_from(common.tls_server_name.clone())
                .map_err(|e| format!("--tls-server-name: {e}"))?;
            Some((config, name))
        } else {
            None
        };
        if ws_on && !login {
            return Err("--ws needs logins (not --raw)".into());
        }
        if common.ws_origin.is_some() && !ws_on {
            return Err("--ws-origin needs --ws or --wss".into());
        }
        let mqtt = common.protocol == Protocol::Mqtt;
        if mqtt {
            if !login {
                return Err("--protocol mqtt needs logins (not --raw)".into());
            }
            if ws_on {
                return Err("--protocol mqtt does not take --ws".into());
            }
            if devices > 1 {
                return Err("--protocol mqtt takes one connection per user (no --devices)".into());
            }
            if common.subscribe > 0 {
                return Err("--protocol mqtt has no presence (no --subscribe)".into());
            }
        }
        let mqtt = mqtt.then(|| crate::engine::mqtt::MqttSettings {
            broker: common.broker,
            // Twice the PING interval: a broker closes after 1.5 times it.
            keepalive_s: (common.ping_every.as_secs_f64() * 2.0).ceil().min(65535.0) as u16,
        });
        let ws = ws_on.then(|| crate::engine::ws::WsSettings {
            host: common
                .server
                .split(',')
                .next()
                .unwrap_or_default()
                .to_string(),
            origin: common.ws_origin.clone(),
        });
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        for w in 0..workers {
            let (tx, rx) = mpsc::channel();
            txs.push(tx);
            let cfg = EngineConfig {
                conns: plan.local_conns(w),
                sources: sources.clone(),
                servers: servers.clone(),
                recv,
                connect_timeout: common.connect_timeout,
                slots_per_ring,
                bufs_per_ring: common.recv_bufs,
                buf_bytes: common.recv_buf_bytes,
                sq_entries: 1024,
            };
            let (plan, shared, ready) = (plan.clone(), shared.clone(), ready_tx.clone());
            let (tls, ws) = (tls.clone(), ws.clone());
            let wrap = Wrap { tls, ws, mqtt };
            let h = std::thread::Builder::new()
                .name(format!("loadgen-{w}"))
                .spawn(move || worker_main(w, engine, cfg, wrap, plan, shared, rx, ready))?;
            handles.push(h);
        }
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("engine setup failed: {e}").into()),
                Err(_) => return Err("a worker died during setup".into()),
            }
        }
        let rings = match engine {
            EngineKind::Uring => plan.local_conns(0).div_ceil(slots_per_ring).max(1),
            EngineKind::Poll => 1,
        };
        eprintln!(
            "tern-loadgen: engine {} | {workers} workers x {rings} rings ({} slots each) | {conns} \
             connections over {} sources x {} servers | rate {}/s | mem floor {}",
            engine_name(engine),
            if engine == EngineKind::Uring { slots_per_ring } else { 0 },
            sources.len(),
            servers.len(),
            common.rate,
            fmt_bytes(common.mem_floor),
        );
        let now = Instant::now();
        Ok(Run {
            plan,
            shared,
            txs,
            handles,
            engine,
            slots_per_ring,
            common: common.clone(),
            started: now,
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            deadline: now + common.max_time,
            stop_signal,
            mem_floor_hit: None,
            mem_available_min: None,
            last_print: now,
            last: Sample::default(),
            timeline: Vec::new(),
            phases: Vec::new(),
            up_max: 0,
        })
    }

    fn broadcast(&self, mut cmd: impl FnMut() -> Cmd) {
        for tx in &self.txs {
            let _ = tx.send(cmd());
        }
    }

    fn aborted(&self) -> bool {
        self.stop_signal.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// Waits until `cond` holds, `timeout` passes, or the run is aborted;
    /// meanwhile checks memory and prints progress.
    fn wait(&mut self, timeout: Duration, mut cond: impl FnMut(&Shared) -> bool) -> Waited {
        let until = Instant::now() + timeout;
        loop {
            self.tick();
            if cond(&self.shared) {
                return Waited::Done;
            }
            if self.aborted() {
                return Waited::Aborted;
            }
            if Instant::now() >= until {
                return Waited::Timeout;
            }
            std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// Sleeps for `d` (or until aborted) while ticking.
    fn hold(&mut self, d: Duration) -> Waited {
        match self.wait(d, |_| false) {
            Waited::Timeout => Waited::Done,
            w => w,
        }
    }

    fn tick(&mut self) {
        let up = self.shared.up.load(Ordering::Relaxed);
        self.up_max = self.up_max.max(up);
        if let Some(avail) = sysinfo::mem_available_bytes() {
            self.mem_available_min = Some(self.mem_available_min.map_or(avail, |m| m.min(avail)));
            if avail < self.common.mem_floor && self.mem_floor_hit.is_none() {
                self.plan.stop_opening.store(true, Ordering::Relaxed);
                self.mem_floor_hit = Some((avail, up));
                eprintln!(
                    "MemAvailable {} is below --mem-floor {}: stopped opening connections at {up} up",
                    fmt_bytes(avail),
                    fmt_bytes(self.common.mem_floor)
                );
            }
        }
        if self.last_print.elapsed() >= Duration::from_secs(1) {
            self.progress();
        }
    }

    fn sample(&self) -> Sample {
        let s = &self.shared;
        Sample {
            at_s: self.started.elapsed().as_secs_f64(),
            up: s.up.load(Ordering::Relaxed),
            inflight: s.inflight.load(Ordering::Relaxed),
            failed: s.failures_total(),
            opened: s.get(C::opened),
            sent: s.get(C::msgs_sent),
            acks: s.get(C::acks),
            delivers: s.get(C::delivers),
        }
    }

    fn progress(&mut self) {
        let now = self.sample();
        let dt = (now.at_s - self.last.at_s).max(1e-3);
        let per_s = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt;
        let ivl = {
            let mut h = self.shared.interval.lock().expect("interval lock");
            let c = h.clone();
            h.reset();
            c
        };
        let mem = sysinfo::mem_available_bytes();
        if !self.common.quiet {
            let mut line = format!(
                "[{:>6.1}s] up {:>8} ({:+.0}/s) inflight {:>6} failed {:>6}",
                now.at_s,
                now.up,
                (now.up - self.last.up) as f64 / dt,
                now.inflight,
                now.failed,
            );
            if !ivl.login.is_empty() {
                line += &format!(" login {}", p50_p99(&ivl.login));
            }
            if now.sent > 0 || now.delivers > 0 {
                line += &format!(
                    " | msgs/s sent {:.0} ack {:.0} dlv {:.0} | ack {} dlv {} rcpt {}",
                    per_s(now.sent, self.last.sent),
                    per_s(now.acks, self.last.acks),
                    per_s(now.delivers, self.last.delivers),
                    p50_p99(&ivl.ack),
                    p50_p99(&ivl.deliver),
                    p50_p99(&ivl.receipt),
                );
            }
            if let Some(m) = mem {
                line += &format!(" | mem {}", fmt_bytes(m));
            }
            eprintln!("{line}");
        }
        if self.timeline.len() < TIMELINE_MAX {
            self.timeline.push(json!({
                "t_s": (now.at_s * 10.0).round() / 10.0,
                "up": now.up,
                "inflight": now.inflight,
                "failed": now.failed,
                "opened_per_s": per_s(now.opened, self.last.opened).round(),
                "sent_per_s": per_s(now.sent, self.last.sent).round(),
                "delivered_per_s": per_s(now.delivers, self.last.delivers).round(),
                "ack_p50_us": ivl.ack.value_at_quantile(0.5),
                "ack_p99_us": ivl.ack.value_at_quantile(0.99),
                "deliver_p50_us": ivl.deliver.value_at_quantile(0.5),
                "deliver_p99_us": ivl.deliver.value_at_quantile(0.99),
                "mem_available_bytes": mem,
            }));
        }
        self.last = now;
        self.last_print = Instant::now();
    }

    fn phase(&mut self, name: &str, started: Instant, extra: Value) {
        let mut v = json!({
            "phase": name,
            "start_s": (started - self.started).as_secs_f64(),
            "seconds": started.elapsed().as_secs_f64(),
            "up_at_end": self.shared.up.load(Ordering::Relaxed),
        });
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        self.phases.push(v);
    }

    /// Opens connections `lo..hi` at the configured rate and waits until every
    /// one has logged in or failed.
    fn ramp(&mut self, name: &str, lo: u64, hi: u64) -> Waited {
        let t0 = Instant::now();
        let per_worker = self.common.rate / self.plan.workers as f64;
        let jitter = !self.common.no_jitter;
        let opened0 = self.shared.get(C::opened);
        let count: u64 = (0..self.plan.workers)
            .map(|w| {
                let (a, b) = self.plan.local_range(w, lo, hi);
                (b - a) as u64
            })
            .sum();
        self.shared
            .open_pending
            .fetch_add(count as i64, Ordering::Relaxed);
        for tx in &self.txs {
            let _ = tx.send(Cmd::Open {
                lo,
                hi,
                rate_per_s: per_worker,
                jitter,
            });
        }
        let n = hi - lo;
        let timeout = if self.common.ramp_timeout.is_zero() {
            let secs = if self.common.rate > 0.0 {
                n as f64 / self.common.rate
            } else {
                0.0
            };
            Duration::from_secs_f64(2.0 * secs + 60.0)
        } else {
            self.common.ramp_timeout
        };
        let w = self.wait(timeout, |s| {
            s.open_pending.load(Ordering::Relaxed) <= 0 && s.inflight.load(Ordering::Relaxed) <= 0
        });
        let secs = t0.elapsed().as_secs_f64();
        let opened = self.shared.get(C::opened) - opened0;
        let up = self.shared.up.load(Ordering::Relaxed);
        eprintln!(
            "{name}: {up} up after {secs:.1}s ({:.0} opens/s){}",
            opened as f64 / secs.max(1e-3),
            match w {
                Waited::Done => "",
                Waited::Timeout => " -- ramp timed out",
                Waited::Aborted => " -- aborted",
            }
        );
        self.phase(
            name,
            t0,
            json!({"opened": opened, "opens_per_s": opened as f64 / secs.max(1e-3),
                   "timed_out": w == Waited::Timeout}),
        );
        w
    }

    /// Closes everything, stops the workers and collects their results.
    fn finish(mut self) -> Finished {
        let t0 = Instant::now();
        self.broadcast(|| Cmd::CloseAll);
        let w = self.wait(CLOSE_TIMEOUT, |s| {
            s.up.load(Ordering::Relaxed) <= 0 && s.inflight.load(Ordering::Relaxed) <= 0
        });
        let deadline_ns = self.plan.now_ns() + 5 * NS_PER_S;
        self.broadcast(|| Cmd::Stop { deadline_ns });
        let mut results = Vec::new();
        for h in std::mem::take(&mut self.handles) {
            match h.join() {
                Ok(r) => results.push(r),
                Err(_) => eprintln!("a worker panicked"),
            }
        }
        self.progress();
        self.phase("close", t0, json!({"timed_out": w == Waited::Timeout}));
        let mut hists = Hists::new();
        let mut engine = EngineStats::default();
        let mut order_pairs = 0;
        for r in &results {
            hists.add(&r.hists);
            engine.rings += r.engine.rings;
            engine.cq_overflow_flushes += r.engine.cq_overflow_flushes;
            engine.sq_full += r.engine.sq_full;
            engine.recv_enobufs += r.engine.recv_enobufs;
            engine.recv_rearms += r.engine.recv_rearms;
            engine.send_retries += r.engine.send_retries;
            order_pairs += r.order_pairs;
        }
        let workers = self.plan.workers as u64;
        let drained = results
            .iter()
            .enumerate()
            .flat_map(|(w, r)| {
                r.drained
                    .iter()
                    .map(move |&l| l as u64 * workers + w as u64)
            })
            .collect();
        Finished {
            drained,
            hists,
            engine,
            order_pairs,
            run: self,
        }
    }
}

struct Finished {
    run: Run,
    /// Connections (global indices) that received their whole queue in the
    /// final drain.
    drained: HashSet<u64>,
    hists: Hists,
    engine: EngineStats,
    order_pairs: usize,
}

impl Finished {
    /// Whether connection `g` received its whole queue in the final drain.
    fn drained(&self, g: u64) -> bool {
        self.drained.contains(&g)
    }

    /// The message tally of `plan` (`None` if sending never started).
    fn tally(&self, plan: Option<&Arc<SendPlan>>) -> Option<Tally> {
        plan.map(|p| p.ledger.tally(|n| self.drained(p.recipient(n))))
    }

    /// Prints the summary, writes the JSON, returns the exit status.
    /// `messages` is the tally and the drain window it was taken with.
    fn report(
        &self,
        scenario: &str,
        argv: &[String],
        messages: Option<(&Tally, Duration)>,
        extra: Value,
    ) -> i32 {
        let run = &self.run;
        let s = &run.shared;
        let failures = s.failures();
        let failed: u64 = failures.values().sum();
        let elapsed = run.started.elapsed().as_secs_f64();
        let lost = messages.map_or(0, |(t, _)| t.lost);
        let ooo = s.get(C::out_of_order);
        let foreign = s.get(C::delivers_foreign);

        // Human summary.
        println!(
            "== tern-loadgen {scenario}: {elapsed:.1}s, engine {}",
            engine_name(run.engine)
        );
        println!(
            "connections: target {} | up max {} | opened {} connected {} logged in {} | \
             redirects {} | failed {failed}",
            run.plan.conns,
            run.up_max,
            s.get(C::opened),
            s.get(C::connected),
            s.get(C::login_ok),
            s.get(C::redirects),
        );
        for (reason, n) in &failures {
            println!("  failure {reason}: {n}");
        }
        if let Some((avail, up)) = run.mem_floor_hit {
            println!(
                "memory floor: MemAvailable {} < {} at {up} up; stopped opening",
                fmt_bytes(avail),
                fmt_bytes(run.common.mem_floor)
            );
        }
        if let Some((t, drain)) = messages {
            println!(
                "messages: scheduled {} sent {} skipped {} acked {} refused {} unanswered {} | \
                 delivered {} (late {}) lost {} duplicates {} (seen by the app {}) \
                 out-of-order {ooo} | receipts {}",
                t.scheduled,
                t.sent,
                t.skipped,
                t.acked,
                t.refused,
                t.unanswered,
                t.delivered,
                t.late,
                t.lost,
                t.duplicates,
                s.get(C::delivers_dup_app),
                t.receipted,
            );
            if s.get(C::cuts) > 0 || s.get(C::resends) > 0 {
                println!(
                    "cuts {} resends {} (duplicates {}, seen by the app {})",
                    s.get(C::cuts),
                    s.get(C::resends),
                    t.duplicates,
                    s.get(C::delivers_dup_app),
                );
            }
            if t.not_delivered_within_drain() > 0 {
                println!(
                    "not delivered within the drain window ({}): {} ({} late: delivered in the \
                     final drain; {} unverified: the final drain did not finish for their \
                     recipients); these are not lost. Rerun with a longer --drain.",
                    fmt_us(drain.as_micros() as u64),
                    t.not_delivered_within_drain(),
                    t.late,
                    t.unverified,
                );
            }
            if t.lost > 0 {
                println!(
                    "LOST: {} messages were ACKed and never delivered, although their \
                     recipients logged in again and drained their queues to empty",
                    t.lost
                );
            }
            if foreign > 0 {
                println!(
                    "  {foreign} deliveries were not from this run (foreign or corrupt bodies)"
                );
            }
        }
        for (name, h) in self.hists.named() {
            if h.is_empty() {
                continue;
            }
            println!(
                "latency {name:<8} n={:<9} p50 {:<8} p90 {:<8} p99 {:<8} p99.9 {:<8} max {}",
                h.len(),
                fmt_us(h.value_at_quantile(0.5)),
                fmt_us(h.value_at_quantile(0.9)),
                fmt_us(h.value_at_quantile(0.99)),
                fmt_us(h.value_at_quantile(0.999)),
                fmt_us(h.max()),
            );
        }

        let mut status = EXIT_OK;
        if failed > 0 {
            status = EXIT_CONN_FAILED;
        }
        if lost > 0 || ooo > 0 || foreign > 0 {
            status = EXIT_LOST;
        }
        if let Some(st) = extra.get("status").and_then(Value::as_i64) {
            if status == EXIT_OK {
                status = st as i32;
            }
        }

        if let Some(path) = &run.common.json {
            let latency: BTreeMap<&str, HistReport> = self
                .hists
                .named()
                .into_iter()
                .map(|(n, h)| (n, HistReport::of(h)))
                .collect();
            let mut doc = json!({
                "tool": "tern-loadgen",
                "version": env!("CARGO_PKG_VERSION"),
                "scenario": scenario,
                "command_line": shell_join(argv),
                "argv": argv,
                "started_unix_ms": run.started_unix_ms,
                "elapsed_s": elapsed,
                "engine": {
                    "kind": engine_name(run.engine),
                    "workers": run.plan.workers,
                    "slots_per_ring": run.slots_per_ring,
                    "stats": self.engine,
                },
                "settings": {
                    "conns": run.plan.conns,
                    "rate_per_s": run.common.rate,
                    "jitter": !run.common.no_jitter,
                    "servers": run.common.server,
                    "sources": run.common.source,
                    "source_count": run.plan.sources,
                    "server_count": run.plan.servers,
                    "user_base": run.plan.user_base,
                    "devices_per_user": run.plan.devices,
                    "login": run.plan.login,
                    "ping_every_s": run.common.ping_every.as_secs_f64(),
                    "inflight_max_per_worker": run.plan.inflight_max,
                    "connect_timeout_s": run.common.connect_timeout.as_secs_f64(),
                    "mem_floor_bytes": run.common.mem_floor,
                    "max_time_s": run.common.max_time.as_secs_f64(),
                },
                "connections": {
                    "target": run.plan.conns,
                    "up_max": run.up_max,
                    "failed": failed,
                    "failures": failures,
                },
                "memory": {
                    "floor_bytes": run.common.mem_floor,
                    "floor_hit": run.mem_floor_hit.is_some(),
                    "up_when_floor_hit": run.mem_floor_hit.map(|(_, up)| up),
                    "mem_available_min_bytes": run.mem_available_min,
                },
                "counters": s.counters(),
                "messages": messages.map(|(t, drain)| json!({
                    "scheduled": t.scheduled, "sent": t.sent, "skipped": t.skipped,
                    "acked": t.acked, "refused": t.refused, "unanswered": t.unanswered,
                    "delivered": t.delivered, "delivered_late": t.late, "lost": t.lost,
                    "unverified": t.unverified,
                    "not_delivered_within_drain": t.not_delivered_within_drain(),
                    "drain_s": drain.as_secs_f64(),
                    "duplicates": t.duplicates,
                    "duplicates_seen_by_app": s.get(C::delivers_dup_app),
                    "cuts": s.get(C::cuts), "resends": s.get(C::resends),
                    "out_of_order": ooo, "foreign": foreign,
                    "delivered_before_ack": t.delivered_unacked, "receipted": t.receipted,
                    "order_pairs_checked": self.order_pairs,
                })),
                "latency_us": latency,
                "phases": run.phases,
                "timeline": run.timeline,
                "exit_status": status,
            });
            if let (Value::Object(m), Value::Object(e)) = (&mut doc, extra) {
                m.extend(e);
            }
            match std::fs::write(path, serde_json::to_vec_pretty(&doc).expect("json")) {
                Ok(()) => println!("report written to {}", path.display()),
                Err(e) => eprintln!("cannot write {}: {e}", path.display()),
            }
        }
        status
    }
}

/// TLS settings of a `--tls` run: client config and the server's name.
type TlsSettings = (
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

/// The layers over a worker's engine: TLS, then WebSocket or MQTT.
struct Wrap {
    tls: Option<TlsSettings>,
    ws: Option<crate::engine::ws::WsSettings>,
    mqtt: Option<crate::engine::mqtt::MqttSettings>,
}

#[allow(clippy::too_many_arguments)]
fn worker_main(
    w: usize,
    engine: EngineKind,
    cfg: EngineConfig,
    wrap: Wrap,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    ready: Sender<Result<(), String>>,
) -> WorkerResult {
    let conns = cfg.conns;
    macro_rules! go {
        ($e:expr) => {
            match $e {
                Ok(engine) => {
                    let _ = ready.send(Ok(()));
                    // `--ws` and `--protocol mqtt` exclude each other.
                    let Wrap { tls, ws, mqtt } = wrap;
                    let seed = (u64::from(plan.run_id) << 16) ^ w as u64;
                    match (tls, ws, mqtt) {
                        (Some((config, name)), _, Some(m)) => {
                            let engine =
                                crate::engine::tls::TlsEngine::new(engine, conns, config, name);
                            let engine = crate::engine::mqtt::MqttEngine::new(engine, conns, m);
                            Worker::new(w, plan, shared, rx, engine).run()
                        }
                        (None, _, Some(m)) => {
                            let engine = crate::engine::mqtt::MqttEngine::new(engine, conns, m);
                            Worker::new(w, plan, shared, rx, engine).run()
                        }
                        // `--wss`: WebSocket on top of TLS on top of TCP.
                        (Some((config, name)), Some(ws), None) => {
                            let engine =
                                crate::engine::tls::TlsEngine::new(engine, conns, config, name);
                            let engine = crate::engine::ws::WsEngine::new(engine, conns, ws, seed);
                            Worker::new(w, plan, shared, rx, engine).run()
                        }
                        (Some((config, name)), None, None) => {
                            let engine =
                                crate::engine::tls::TlsEngine::new(engine, conns, config, name);
                            Worker::new(w, plan, shared, rx, engine).run()
                        }
                        (None, Some(ws), None) => {
                            let engine = crate::engine::ws::WsEngine::new(engine, conns, ws, seed);
                            Worker::new(w, plan, shared, rx, engine).run()
                        }
                        (None, None, None) => Worker::new(w, plan, shared, rx, engine).run(),
                    }
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    WorkerResult {
                        hists: Hists::new(),
                        drained: Vec::new(),
                        engine: EngineStats::default(),
                        order_pairs: 0,
                    }
                }
            }
        };
    }
    match engine {
        #[cfg(target_os = "linux")]
        EngineKind::Uring => go!(crate::engine::uring::UringEngine::new(cfg)),
        #[cfg(not(target_os = "linux"))]
        EngineKind::Uring => go!(PollEngine::new(cfg)),
        EngineKind::Poll => go!(PollEngine::new(cfg)),
    }
}

fn engine_name(e: EngineKind) -> &'static str {
    match e {
        EngineKind::Uring => "uring",
        EngineKind::Poll => "poll",
    }
}

fn check_families(sources: &[IpAddr], servers: &[SocketAddr]) -> Res<()> {
    let v4 = |ip: &IpAddr| ip.is_ipv4();
    let src_v4 = sources.iter().all(v4);
    let src_v6 = sources.iter().all(|ip| !v4(ip));
    let dst_v4 = servers.iter().all(|a| a.is_ipv4());
    let dst_v6 = servers.iter().all(|a| a.is_ipv6());
    if !((src_v4 && dst_v4) || (src_v6 && dst_v6)) {
        return Err("--source and --server must all be IPv4 or all IPv6".into());
    }
    Ok(())
}

/// The command line as one shell-quoted string.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:,=+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `connect`: ramp, hold, close.
pub fn connect(a: ConnectArgs, argv: &[String]) -> Res<i32> {
    if a.devices == 0 || a.devices > 32 {
        return Err("--devices must be 1 to 32 (the server's devices_per_user_max at most)".into());
    }
    let mut run = Run::start(&a.common, a.common.conns, a.devices, !a.raw, !a.raw)?;
    let n = a.common.conns;
    let w = run.ramp("ramp", 0, n);
    if w != Waited::Aborted {
        let t0 = Instant::now();
        let up = run.shared.up.load(Ordering::Relaxed);
        eprintln!("holding {up} connections for {:.0}s", a.hold.as_secs_f64());
        run.hold(a.hold);
        run.phase("hold", t0, json!({"up_at_start": up}));
    }
    let fin = run.finish();
    Ok(fin.report(
        if a.raw { "connect-raw" } else { "connect" },
        argv,
        None,
        json!({}),
    ))
}

fn check_body(body_bytes: usize) -> Res<()> {
    if body_bytes < BODY_HEADER_BYTES {
        return Err(format!("--body-bytes must be at least {BODY_HEADER_BYTES}").into());
    }
    if body_bytes > 65_000 {
        return Err("--body-bytes must be at most 65000 (the server's body_bytes_max)".into());
    }
    Ok(())
}

/// Waits for the messages of a send plan to be answered: every SEND ACKed
/// or refused, and (when `deliveries`) every ACKed message delivered and
/// receipted. Delivered counts only messages to logged-in users, so with
/// offline recipients this waits the full `timeout`.
fn drain(run: &mut Run, plan: &SendPlan, timeout: Duration, deliveries: bool) -> Waited {
    let total = plan.sched.total;
    let receipts = run.plan.receipts;
    run.wait(timeout, move |s| {
        // Every worker has worked through the schedule (a loaded worker may
        // still be sending when the schedule's last time has passed).
        if s.get(C::msgs_sent) + s.get(C::msgs_skipped) < total {
            return false;
        }
        let sent = s.get(C::msgs_sent);
        let answered = s.get(C::acks) + s.get(C::send_errors);
        if answered < sent {
            return false;
        }
        if !deliveries {
            return true;
        }
        let firsts = s.get(C::delivers) - s.get(C::delivers_dup) - s.get(C::delivers_foreign);
        firsts >= s.get(C::acks) && (!receipts || s.get(C::receipts) >= s.get(C::acks))
    })
}

/// The final drain, once the drain window has closed: marks every ACKed and
/// undelivered message overdue, and has each of their recipients log in again
/// on a fresh connection and take its whole queue (as many DELIVERs as its
/// LOGIN_OK announces), for at most `timeout` (zero: skipped). Overdue
/// messages that arrive now are late; those still missing once their
/// recipient has drained are lost; the rest are unverified.
fn final_drain(run: &mut Run, plan: &SendPlan, timeout: Duration) {
    let t0 = Instant::now();
    let workers = run.plan.workers as u64;
    // Local slots per worker: memory bounded by the connections, not the messages.
    let mut slots = vec![BTreeSet::new(); run.plan.workers];
    let overdue = plan.ledger.mark_overdue(|n| {
        let g = plan.recipient(n);
        slots[(g % workers) as usize].insert((g / workers) as u32);
    });
    if overdue == 0 {
        return;
    }
    let recipients: u64 = slots.iter().map(|s| s.len() as u64).sum();
    eprintln!(
        "final drain: {overdue} ACKed messages not delivered within the drain window; their \
         {recipients} recipients log in again and drain their queues (--final-drain {:.1}s)",
        timeout.as_secs_f64(),
    );
    let mut complete = false;
    if !timeout.is_zero() {
        for (tx, s) in run.txs.iter().zip(slots) {
            let _ = tx.send(Cmd::FinalDrain {
                slots: s.into_iter().collect(),
            });
        }
        complete = run.wait(timeout, |s| {
            s.get(C::final_drain_drained) + s.get(C::final_drain_failed) >= recipients
        }) == Waited::Done;
    }
    run.phase(
        "final-drain",
        t0,
        json!({"overdue": overdue, "recipients": recipients, "complete": complete}),
    );
}

/// `chat`: ramp, then messages between random pairs on a fixed schedule.
pub fn chat(a: ChatArgs, argv: &[String]) -> Res<i32> {
    check_body(a.body_bytes)?;
    if a.common.conns < 2 {
        return Err("chat needs --conns of at least 2".into());
    }
    let rate = a.msg_rate.round() as u64;
    if rate == 0 {
        return Err("--msg-rate must be at least 1/s".into());
    }
    let total = ((a.msg_rate * a.duration.as_secs_f64()).round() as u64).min(a.msgs_max);
    let mqtt = a.common.protocol == Protocol::Mqtt;
    if mqtt && a.cut_rate > 0.0 {
        return Err("--protocol mqtt does not take --cut-rate".into());
    }
    // MQTT has no LOGIN_OK offline count, so a recipient cannot tell when
    // it has drained its queue: no final drain; what the drain window did
    // not see delivered is reported unverified, never lost.
    let final_drain_time = if mqtt { Duration::ZERO } else { a.final_drain };
    let mut run = Run::start(&a.common, a.common.conns, 1, true, true)?;
    let n = a.common.conns;
    let mut plan = None;
    if run.ramp("ramp", 0, n) != Waited::Aborted && run.hold(a.settle) != Waited::Aborted {
        let t0 = Instant::now();
        let begin_ns = run.plan.now_ns() + 100_000_000;
        let p = Arc::new(SendPlan {
            sched: Schedule {
                begin_ns,
                rate_per_s: rate,
                total,
            },
            pairing: Pairing::Random {
                seed: run.plan.run_id as u64,
            },
            body_bytes: a.body_bytes,
            ledger: Arc::new(Ledger::new(total)),
            conns: n,
            cut_rate_per_s: a.cut_rate,
        });
        eprintln!(
            "chat: {total} messages at {rate}/s between random pairs of {} up, {} body bytes",
            run.shared.up.load(Ordering::Relaxed),
            a.body_bytes
        );
        run.broadcast(|| Cmd::Send(p.clone()));
        let send_time = Duration::from_nanos(p.sched.end_ns().saturating_sub(run.plan.now_ns()));
        let w = run.hold(send_time + Duration::from_millis(10));
        run.phase("chat", t0, json!({"messages": total, "rate_per_s": rate}));
        if w != Waited::Aborted {
            let t1 = Instant::now();
            let d = drain(&mut run, &p, a.drain, true);
            run.phase("drain", t1, json!({"complete": d == Waited::Done}));
            if d != Waited::Aborted {
                final_drain(&mut run, &p, final_drain_time);
            }
        }
        plan = Some(p);
    }
    let fin = run.finish();
    let tally = fin.tally(plan.as_ref());
    Ok(fin.report(
        "chat",
        argv,
        tally.as_ref().map(|t| (t, a.drain)),
        json!({"chat": {"msg_rate_per_s": rate, "duration_s": a.duration.as_secs_f64(),
                        "body_bytes": a.body_bytes, "cut_rate_per_s": a.cut_rate}}),
    ))
}

/// `offline`: senders send to offline receivers, who then log in; every
/// message must arrive, in order.
pub fn offline(a: OfflineArgs, argv: &[String]) -> Res<i32> {
    check_body(a.body_bytes)?;
    let senders = a.common.conns;
    let rate = a.msg_rate.round() as u64;
    if rate == 0 || a.per_user == 0 {
        return Err("--msg-rate and --per-user must be at least 1".into());
    }
    let total = senders * a.per_user;
    if a.common.protocol == Protocol::Mqtt {
        // A clean-session subscriber that never connected has no queue on
        // a plain broker, and MQTT has no offline count to check.
        return Err("offline does not take --protocol mqtt".into());
    }
    let mut run = Run::start(&a.common, 2 * senders, 1, true, true)?;
    let mut plan = None;
    let mut expected_offline = 0;
    if run.ramp("ramp-senders", 0, senders) != Waited::Aborted {
        let t0 = Instant::now();
        let p = Arc::new(SendPlan {
            sched: Schedule {
                begin_ns: run.plan.now_ns() + 100_000_000,
                rate_per_s: rate,
                total,
            },
            pairing: Pairing::Offline { senders },
            body_bytes: a.body_bytes,
            ledger: Arc::new(Ledger::new(total)),
            conns: 2 * senders,
            cut_rate_per_s: 0.0,
        });
        eprintln!("offline: {total} messages from {senders} senders to {senders} offline users");
        run.broadcast(|| Cmd::Send(p.clone()));
        let send_time = Duration::from_nanos(p.sched.end_ns().saturating_sub(run.plan.now_ns()));
        let mut w = run.hold(send_time + Duration::from_millis(10));
        if w != Waited::Aborted {
            w = drain(&mut run, &p, a.drain, false);
        }
        expected_offline = run.shared.get(C::acks);
        run.phase(
            "send-to-offline",
            t0,
            json!({"messages": total, "acked": expected_offline}),
        );
        let online = a.login_receivers.unwrap_or(senders).min(senders);
        if online < senders {
            eprintln!(
                "offline: {} receivers stay offline; their messages wait for the final drain",
                senders - online
            );
        }
        if w != Waited::Aborted
            && run.ramp("login-receivers", senders, senders + online) != Waited::Aborted
        {
            let t1 = Instant::now();
            let d = drain(&mut run, &p, a.drain, true);
            run.phase(
                "deliver-backlog",
                t1,
                json!({"complete": d == Waited::Done}),
            );
            if d != Waited::Aborted {
                final_drain(&mut run, &p, a.final_drain);
            }
        }
        plan = Some(p);
    }
    let fin = run.finish();
    let tally = fin.tally(plan.as_ref());
    let announced = fin.run.shared.get(C::offline_expected);
    Ok(fin.report(
        "offline",
        argv,
        tally.as_ref().map(|t| (t, a.drain)),
        json!({"offline": {"senders": senders, "per_user": a.per_user,
                           "acked_while_offline": expected_offline,
                           "login_ok_offline_count_sum": announced}}),
    ))
}

/// `storm`: ramp, hold, then reset everything at once and time the recovery.
pub fn storm(a: StormArgs, argv: &[String]) -> Res<i32> {
    let jitter = parse_jitter(&a.jitter).map_err(|e| format!("--jitter: {e}"))?;
    let mut run = Run::start(&a.common, a.common.conns, 1, true, true)?;
    let n = a.common.conns;
    let mut rounds = Vec::new();
    let mut status = EXIT_OK;
    if run.ramp("ramp", 0, n) != Waited::Aborted {
        let target = run.shared.up.load(Ordering::Relaxed);
        for round in 1..=a.rounds {
            if run.hold(a.hold) == Waited::Aborted {
                break;
            }
            let t0 = Instant::now();
            let closed0 = run.shared.get(C::closed_by_us);
            let failed0 = run.shared.failures_total();
            let logins0 = run.shared.get(C::login_ok);
            eprintln!(
                "storm {round}: resetting {target} connections, reconnect jitter {:.1}s",
                jitter.as_secs_f64()
            );
            let jitter_ns = jitter.as_nanos() as u64;
            run.broadcast(|| Cmd::Storm { jitter_ns });
            let w = run.wait(a.storm_timeout, |s| {
                s.get(C::closed_by_us) - closed0 >= target as u64
                    && s.up.load(Ordering::Relaxed) >= target
            });
            let secs = t0.elapsed().as_secs_f64();
            let up = run.shared.up.load(Ordering::Relaxed);
            let logins = run.shared.get(C::login_ok) - logins0;
            eprintln!(
                "storm {round}: {up}/{target} back after {secs:.2}s ({logins} logins, {:.0}/s){}",
                logins as f64 / secs.max(1e-3),
                if w == Waited::Done {
                    ""
                } else {
                    " -- NOT recovered"
                }
            );
            if w != Waited::Done {
                status = EXIT_CONN_FAILED;
            }
            let r = json!({
                "round": round, "target": target, "recovered": w == Waited::Done,
                "recovery_s": secs, "up": up, "logins": logins,
                "logins_per_s": logins as f64 / secs.max(1e-3),
                "failures": run.shared.failures_total() - failed0,
            });
            run.phase("storm", t0, r.clone());
            rounds.push(r);
            if w == Waited::Aborted {
                break;
            }
        }
    }
    let fin = run.finish();
    Ok(fin.report(
        "storm",
        argv,
        None,
        json!({"storm": {"jitter_s": jitter.as_secs_f64(), "rounds": rounds}, "status": status}),
    ))
}
