//! The deterministic simulator (docs/SIMULATION.md): whole-server runs in
//! one thread over a simulated network, clock and disk, with seeded faults.
//! Every run is bounded in simulated time (traffic plus the drain limit)
//! and every loop over seeds in count.

use std::time::Duration;

use tern::sim::{self, Faults, Options, Planted};

#[path = "common/pass.rs"]
mod pass;

/// Why the README's second pass does not repeat these tests.
const NO_BACKEND: &str = "the simulator has its own simulated network and no I/O backend";

fn small(seed: u64) -> Options {
    Options {
        clients: 40,
        traffic: Duration::from_secs(20),
        ..Options::new(seed)
    }
}

fn assert_clean(opts: &Options) {
    let report = sim::run(opts);
    assert!(report.failure.is_none(), "{report}");
    assert!(report.acked > 0, "{report}");
}

#[test]
fn swarm_seeds_run_clean() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    for seed in 1000..1012 {
        assert_clean(&small(seed));
    }
}

#[test]
fn same_seed_same_run() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let a = sim::run(&small(77));
    let b = sim::run(&small(77));
    assert_eq!(a.trace, b.trace, "{a}\n{b}");
    assert_eq!(
        (a.sent, a.acked, a.delivers, a.receipts, a.crashes, a.resets, a.disk),
        (b.sent, b.acked, b.delivers, b.receipts, b.crashes, b.resets, b.disk)
    );
    assert_eq!(a.sim_time, b.sim_time);
    let c = sim::run(&small(78));
    assert_ne!(a.trace, c.trace, "another seed, another run");
}

#[test]
fn every_fault_at_once_runs_clean() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let mut faults = Faults::swarm(5);
    faults.net.partial_per_million = 300_000;
    faults.net.out_buffer_bytes = (256, 4096);
    faults.net.stall_per_million = 10_000;
    faults.disk.write_enospc_per_million = 50_000;
    faults.disk.write_eio_per_million = 10_000;
    faults.disk.sync_eio_per_million = 10_000;
    faults.reset_every = Some(Duration::from_millis(300));
    faults.crash_every = Some(Duration::from_secs(4));
    for seed in [1, 2, 3] {
        let opts = Options {
            faults: Some(faults),
            ..small(seed)
        };
        let report = sim::run(&opts);
        assert!(report.failure.is_none(), "{report}");
        assert!(report.crashes > 0 && report.resets > 0, "{report}");
        assert!(report.disk.write_enospc > 0, "{report}");
    }
}

/// A simulator that cannot fail is no simulator: with the fsync before the
/// ACK skipped, a crash loses ACKed data, and some seed of the first few
/// shows it.
#[test]
fn planted_skip_fsync_is_found() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let mut found = None;
    for seed in 1..=10 {
        // Whatever else the seed's swarm mix has, the process crashes.
        let mut faults = Faults::swarm(seed);
        faults.crash_every = Some(Duration::from_secs(3));
        let opts = Options {
            planted: Planted::SkipFsync,
            faults: Some(faults),
            ..small(seed)
        };
        let report = sim::run(&opts);
        if let Some((_, why)) = &report.failure {
            found = Some((seed, why.clone()));
            break;
        }
    }
    let (seed, why) = found.expect("the planted bug went unnoticed for 10 seeds");
    // Lost at the crash: either the ACKed messages themselves, or the
    // unsynced end of a sealed segment, which recovery cannot take for a
    // torn tail (it is not the last segment) and refuses as corrupt (or,
    // where the simulation repairs, skips as a record cut short).
    assert!(
        why.contains("never delivered")
            || why.contains("corrupt record")
            || why.contains("runs past the end of the file"),
        "seed {seed}: {why}"
    );
    // And the same seed without the bug is clean.
    let mut faults = Faults::swarm(seed);
    faults.crash_every = Some(Duration::from_secs(3));
    assert_clean(&Options {
        faults: Some(faults),
        ..small(seed)
    });
}

/// Seeds that once failed, kept as regressions (see results/sim/README.md).
#[test]
fn regression_seeds() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    // 2: a send cut short with room left never became writable again (a
    // bug of the simulated backend), leaving LOGIN_OK unsent.
    // 3: the end-of-run gauge check returned before the gauges were due.
    // 103158, 103799: a client's DELIVERED sat in a stalled socket while
    // the run counted as settled (the check now looks at every socket).
    // 500301: after a failed fsync restarted a shard, recovery sealed a
    // full last segment whose end was never synced; a crash tore it and
    // the next start refused it as corrupt (recovery now syncs it).
    // 622157: a sim client refused by the accept rate while logging in
    // (ERROR rate_limited, client id 0) failed the run; with that fixed, each
    // dropped connection gave its client a second chain of turns, so clients
    // sent ever faster, injected EIOs (a rate per write) restarted shards
    // ever more often and every restart redelivered the unanswered window:
    // a redelivery storm (a bug of the simulator, not the server).
    // 701013, 708043, 719337: two neighbouring records flipped; the repair
    // skipped them as one span, which the checker wanted as one span per
    // record (a checker too strict, not a store bug). Replayed bit for bit
    // only by the code they ran on (branch sim18, before the pipelined
    // group commit); now they make varied runs with flips and repairs.
    // Found while adding hostile clients (branch simv2), all bugs of the
    // simulator, not the server:
    // 123: a forger that had just written garbage got ERROR(unknown_message)
    // for its forged receipt first, and took it for the wrong fatal code.
    // 163, 165: a client closed with BYE(rate_limited) came straight back
    // while draining and was closed again at once, in a loop (it now stays
    // away for the refusal window).
    // 81: a flooder resent its whole outbox at once, passed
    // rate_refusals_max before any ACK came back, and never made progress
    // (resends are now paced, 16 a turn).
    // 281, 357: a shard restart (injected EIO) closed a connection whose
    // client had written bad bytes, before the server read them; the client
    // took the close for a missing ERROR.
    // 1256514 (the 100k swarm; branch simfix): two flooders with ~600
    // messages each retried 16 SENDs at every turn (tens of ms apart),
    // far faster than the 20/s the bucket refills, so each reconnect passed
    // rate_refusals_max within a second and got BYE(rate_limited) again:
    // ~4 ACKs a second, not drained in 120 s. The server kept its documented
    // limits (a bug of the simulator); after ERROR(rate_limited, client_id)
    // the client now waits 1 s before resending, as the library backs off.
    // 7247: a shard crashed by an EIO could not open its device log again
    // (EIO once more), and that reopen panicked outside the shard's
    // supervisor, taking the run (and, on a server, the shard's thread)
    // down; the reopen's error now goes to the supervisor like the store's.
    for seed in [
        2, 3, 81, 123, 163, 165, 281, 357, 7247, 103158, 103799, 500301, 622157, 701013, 708043,
        719337, 1256514,
    ] {
        assert_clean(&Options::new(seed));
    }
}

/// A run past its DELIVER budget ends as a clear failure instead of
/// running on, so a runaway seed cannot hang a swarm.
#[test]
fn a_runaway_seed_fails_at_its_deliver_budget() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let report = sim::run(&Options {
        delivers_max: 50,
        ..small(1)
    });
    let (_, why) = report.failure.expect("50 DELIVERs is too few for a run");
    assert!(why.contains("seed exceeded 50 DELIVERs"), "{why}");
}

fn flipping(seed: u64) -> Faults {
    let mut faults = Faults::swarm(seed);
    faults.flip_every = Some(Duration::from_millis(700));
    faults.crash_every = Some(Duration::from_secs(3));
    faults
}

/// A byte flipped in a sealed segment stops the next recovery; the
/// simulated operator starts again with `--repair`, which must skip exactly
/// the flipped records, and only the messages those queued may be lost.
#[test]
fn flipped_bytes_are_detected_and_repaired() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let mut repairs = 0;
    for seed in 1..=10 {
        let report = sim::run(&Options {
            faults: Some(flipping(seed)),
            ..small(seed)
        });
        assert!(report.failure.is_none(), "{report}");
        repairs += report.repairs;
        if repairs >= 2 {
            return;
        }
    }
    panic!("10 seeds flipping bytes every 0.7 s made {repairs} repairs");
}

/// With the record checksum skipped, a flipped byte is replayed as sound
/// and the checker sees what a client would: a wrong body, a message never
/// sent, or one lost without a repair.
/// Hostile clients forge DELIVERED and READ for messages they never
/// received, and LOGIN tokens that claim another user; the server refuses
/// each (`unknown_message`, `bad_token`) and relays no receipt.
#[test]
fn forged_receipts_are_refused() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let mut faults = Faults::swarm(5);
    faults.forgers_per_million = 300_000;
    let report = sim::run(&Options {
        faults: Some(faults),
        ..small(5)
    });
    assert!(report.failure.is_none(), "{report}");
    assert!(report.forged > 0, "{report}");
}

/// Every client speaks protocol v2, connections reset every 50 ms on
/// average and the process crashes every 3 s, so many SENDs lose their ACK
/// and are retried with the same client_id.
fn v2_retrying(seed: u64) -> Options {
    let mut faults = Faults::swarm(seed);
    faults.v2_per_million = 1_000_000;
    faults.reset_every = Some(Duration::from_millis(50));
    faults.crash_every = Some(Duration::from_secs(3));
    Options {
        faults: Some(faults),
        ..small(seed)
    }
}

/// Retried v2 SENDs are stored once: every ACK and DELIVER of a
/// (sender, client_id) names one server id.
#[test]
fn v2_retries_are_stored_once() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    let report = sim::run(&v2_retrying(3));
    assert!(report.failure.is_none(), "{report}");
    assert_eq!(report.v2_clients, 40, "{report}");
    assert!(report.retries > 0, "{report}");
}

/// `Planted::DedupeOff`: the session ignores the v2 dedupe window, so a
/// SEND retried after its ACK was lost is stored again under a new server
/// id, which the checker sees on the second ACK or DELIVER.
#[test]
fn planted_dedupe_off_is_found() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    for seed in 1..=10 {
        let report = sim::run(&Options {
            planted: Planted::DedupeOff,
            ..v2_retrying(seed)
        });
        if let Some((_, why)) = &report.failure {
            assert!(why.contains("stored twice"), "{report}");
            return;
        }
    }
    panic!("the planted bug went unnoticed for 10 seeds");
}

/// Hostile clients of every kind (garbage, malformed frames, oversized
/// length prefixes, SEND floods, slow readers): each gets its documented
/// answer, the server never panics, and everyone's ACKed messages are
/// still delivered.
#[test]
fn hostile_clients_get_their_documented_answers() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    for seed in [5, 6] {
        let mut faults = Faults::swarm(seed);
        faults.hostile_per_million = 300_000;
        faults.hostile_kinds = 0b1_1111;
        let report = sim::run(&Options {
            faults: Some(faults),
            ..small(seed)
        });
        assert!(report.failure.is_none(), "{report}");
        assert!(report.hostile > 0 && report.fatal_errors > 0, "{report}");
    }
}

/// `Planted::RelayForgedRead`: the session relays a READ it never checked,
/// so a forger's READ for another user's message reaches that message's
/// sender as a read receipt the recipient did not send.
#[test]
fn planted_relay_forged_read_is_found() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    for seed in 1..=10 {
        let mut faults = Faults::swarm(seed);
        faults.forgers_per_million = 300_000;
        let report = sim::run(&Options {
            planted: Planted::RelayForgedRead,
            faults: Some(faults),
            ..small(seed)
        });
        if let Some((_, why)) = &report.failure {
            assert!(why.contains("read receipt"), "{report}");
            return;
        }
    }
    panic!("the planted bug went unnoticed for 10 seeds");
}

#[test]
fn planted_skip_checksum_is_found() {
    if pass::first_pass_only(NO_BACKEND) {
        return;
    }
    for seed in 1..=10 {
        let report = sim::run(&Options {
            planted: Planted::SkipChecksum,
            faults: Some(flipping(seed)),
            ..small(seed)
        });
        if report.failure.is_some() {
            // The same seed without the bug: clean (repairs included), so
            // the failure is the bug's. (A seed may also repair a flip the
            // decoder still refuses, a broken length: seed 8 does since
            // v2 clients joined the mix.)
            assert_clean(&Options {
                faults: Some(flipping(seed)),
                ..small(seed)
            });
            return;
        }
    }
    panic!("the planted bug went unnoticed for 10 seeds");
}
