//! `tern-sim`: runs the deterministic simulator (see docs/SIMULATION.md).
//!
//! `tern-sim --seed S` replays one seed; `tern-sim --seeds N` runs N seeds
//! from `--first` (default: a seed drawn from the clock, printed), stopping
//! at the first failure or after `--time-limit-s`. Exit status 1 when a seed
//! failed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tern::sim::{self, Options, Planted};

/// Deterministic simulation of a whole Tern server under seeded faults.
#[derive(Parser, Debug)]
#[command(name = "tern-sim", version)]
struct Args {
    /// Run (or replay) exactly this seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds, one after the other.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// First seed of `--seeds` (default: drawn from the clock).
    #[arg(long)]
    first: Option<u64>,
    /// Shards of the simulated server.
    #[arg(long, default_value_t = 3)]
    shards: usize,
    /// Simulated clients (one user each).
    #[arg(long, default_value_t = 100)]
    clients: u32,
    /// Simulated seconds of traffic with faults.
    #[arg(long, default_value_t = 30)]
    traffic_s: u64,
    /// Longest simulated seconds to settle after the faults stop.
    #[arg(long, default_value_t = 120)]
    drain_s: u64,
    /// Plant a bug on purpose: `skip-fsync`, `skip-checksum`,
    /// `relay-forged-read` or `dedupe-off`.
    #[arg(long)]
    plant: Option<String>,
    /// Most DELIVERs the clients may receive in one seed before it fails as
    /// a runaway (0 = 100,000 per client).
    #[arg(long, default_value_t = 0)]
    delivers_max: u64,
    /// Stop starting seeds after this many real seconds (0 = no limit).
    #[arg(long, default_value_t = 0)]
    time_limit_s: u64,
    /// Print only failures and the summary.
    #[arg(long)]
    quiet: bool,
    /// Go on after a failed seed (the exit status still says one failed).
    #[arg(long)]
    keep_going: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // RUST_LOG=debug shows what the shards log during a replay.
    env_logger::init();
    let planted = match args.plant.as_deref() {
        None => Planted::None,
        Some("skip-fsync") => Planted::SkipFsync,
        Some("skip-checksum") => Planted::SkipChecksum,
        Some("relay-forged-read") => Planted::RelayForgedRead,
        Some("dedupe-off") => Planted::DedupeOff,
        Some(other) => {
            eprintln!("tern-sim: unknown --plant {other} (expected skip-fsync, skip-checksum, relay-forged-read or dedupe-off)");
            return ExitCode::from(2);
        }
    };
    // Shard crashes from injected EIO are expected; their panic messages
    // would drown the report (the simulator checks each one).
    std::panic::set_hook(Box::new(|_| {}));
    let (first, count) = match args.seed {
        Some(seed) => (seed, 1),
        None => {
            let first = args.first.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            (first, args.seeds)
        }
    };
    println!(
        "tern-sim: seeds {first}..{} ({count}), {} shards, {} clients, {} s traffic",
        first.wrapping_add(count),
        args.shards,
        args.clients,
        args.traffic_s
    );
    let started = Instant::now();
    let limit = (args.time_limit_s > 0).then(|| Duration::from_secs(args.time_limit_s));
    let (mut ran, mut failed, mut client_s, mut cpu) = (0u64, 0u64, 0f64, Duration::ZERO);
    // Faults injected over all seeds: crashes, shard restarts, resets,
    // ENOSPC, EIO (writes and fsyncs), torn files, flipped bytes, repairs.
    let mut injected = [0u64; 8];
    // The command that runs `seed` again with these options.
    let replay = |seed: u64| {
        format!(
            "replay: tern-sim --seed {seed} --shards {} --clients {} --traffic-s {} --drain-s {}{}{}",
            args.shards,
            args.clients,
            args.traffic_s,
            args.drain_s,
            if args.delivers_max > 0 {
                format!(" --delivers-max {}", args.delivers_max)
            } else {
                String::new()
            },
            args.plant
                .as_deref()
                .map(|p| format!(" --plant {p}"))
                .unwrap_or_default()
        )
    };
    for i in 0..count {
        if limit.is_some_and(|l| started.elapsed() >= l) {
            break;
        }
        let seed = first.wrapping_add(i);
        let opts = Options {
            shards: args.shards,
            clients: args.clients,
            traffic: Duration::from_secs(args.traffic_s),
            drain: Duration::from_secs(args.drain_s),
            planted,
            delivers_max: args.delivers_max,
            ..Options::new(seed)
        };
        ran += 1;
        // A panic that escapes the run (not a shard's, which its simulated
        // supervisor restarts) fails the seed with its message: the hook
        // above keeps every panic quiet.
        let report =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim::run(&opts))) {
                Ok(report) => report,
                Err(panic) => {
                    failed += 1;
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    println!("seed {seed} FAILED: a panic escaped the simulation: {text}");
                    println!("{}", replay(seed));
                    if !args.keep_going {
                        break;
                    }
                    continue;
                }
            };
        client_s += f64::from(report.clients) * report.sim_time.as_secs_f64();
        cpu += report.cpu;
        let d = report.disk;
        for (sum, n) in injected.iter_mut().zip([
            report.crashes,
            report.shard_restarts,
            report.resets,
            d.write_enospc,
            d.write_eio + d.sync_eio,
            d.torn,
            d.flipped,
            report.repairs,
        ]) {
            *sum += n;
        }
        if report.failure.is_some() {
            failed += 1;
            println!("{report}");
            println!("{}", replay(seed));
            if !args.keep_going {
                break;
            }
        } else if !args.quiet {
            println!("{report}");
        }
    }
    let [crashes, restarts, resets, enospc, eio, torn, flipped, repairs] = injected;
    println!(
        "summary: {ran} seeds run, {failed} failed; {:.0} simulated client-seconds in {:.2} CPU \
         seconds ({:.0} client-s per CPU-s); injected: {crashes} process crashes, {restarts} \
         shard restarts, {resets} resets, {enospc} ENOSPC, {eio} EIO, {torn} torn files, \
         {flipped} flipped bytes, {repairs} repairs",
        client_s,
        cpu.as_secs_f64(),
        client_s / cpu.as_secs_f64().max(1e-9)
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
