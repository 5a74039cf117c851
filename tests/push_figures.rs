//! Push figures for `results/push/` (ignored: run by hand, preferably with
//! `--release`):
//!
//! ```text
//! cargo test --release -p tern --test push_figures -- --ignored --nocapture --test-threads 1
//! ```
//!
//! One in-process server with one shard and the in-memory store (so the
//! figure is the loop's work, not fsync's), one sender, and
//! `TERN_FIG_MSGS` (default 20,000) messages, each to a different offline
//! user, sent in pipelined windows of 256; with push on, the test's own
//! gateway (tests/common/gateway.rs: one connection per POST) takes every
//! POST. Figures, medians of `TERN_FIG_RUNS` (default 5) runs per setting:
//! the shard thread's CPU per message (from `/proc/self/task/*/schedstat`)
//! with push off and on, the push thread's CPU per notice, and device
//! notices per second from the first SEND to the last notice received.

mod common;

use std::time::{Duration, Instant};

use common::gateway::Gateway;
use common::*;
use tern::proto::OwnedFrame;

/// Messages per run.
fn msgs() -> u64 {
    std::env::var("TERN_FIG_MSGS").map_or(20_000, |v| v.parse().unwrap())
}

/// Runs per setting.
fn runs() -> usize {
    std::env::var("TERN_FIG_RUNS").map_or(5, |v| v.parse().unwrap())
}

/// On-CPU nanoseconds of this process's thread named `name`. A new thread
/// names itself once it first runs, so it is looked for until [`WAIT`].
fn thread_cpu_ns(name: &str) -> u64 {
    let mut found = None;
    let named = wait_for(|| {
        found = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .map(|task| task.path())
            .find(|dir| std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name));
        found.is_some()
    });
    assert!(named, "no thread {name}");
    let stat = std::fs::read_to_string(found.unwrap().join("schedstat")).unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

/// One run's figures.
struct Run {
    shard_ns_per_msg: f64,
    push_ns_per_notice: f64,
    notices_per_s: f64,
    posts: u64,
}

fn run(push: bool, batch_max: usize, n: u64) -> Run {
    let gateway = Gateway::start();
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.durability = tern::store::Durability::Memory;
        c.sends_per_s_max = 0;
        c.receipts_per_s_max = 0;
        if push {
            c.push_url = Some(gateway.url());
            c.push_secret = Some("push-secret-0123456789".into());
            c.push_interval_ms = 60_000;
            c.push_batch_max = batch_max;
            c.push_queue_len_max = 65_536;
        }
    });
    let mut alice = srv.login(1);
    let (shard0, push0) = (
        thread_cpu_ns("tern-shard-0"),
        push.then(|| thread_cpu_ns("tern-push")),
    );
    let start = Instant::now();
    let window = 256;
    let mut sent = 0;
    let mut acked = 0;
    while acked < n {
        while sent < n && sent - acked < window {
            sent += 1;
            alice.send_msg(sent, 1_000_000 + sent, b"fig").unwrap();
        }
        match alice.recv().unwrap() {
            OwnedFrame::Ack { .. } => acked += 1,
            other => panic!("expected ACK, got {other:?}"),
        }
    }
    let shard_ns = thread_cpu_ns("tern-shard-0") - shard0;
    let mut notices = 0;
    let mut posts = 0;
    if push {
        while notices < n {
            notices += gateway.next().notices().len() as u64;
            posts += 1;
        }
    }
    let elapsed = start.elapsed();
    let push_ns = push0.map_or(0, |p0| thread_cpu_ns("tern-push") - p0);
    srv.wait_info("Queued", |q| q == n);
    if push {
        srv.wait_info("Push_sent", |s| s == n);
        assert_eq!(srv.info_u64("Push_queue_full"), 0);
    }
    Run {
        shard_ns_per_msg: shard_ns as f64 / n as f64,
        push_ns_per_notice: push_ns as f64 / n as f64,
        notices_per_s: notices as f64 / elapsed.max(Duration::from_nanos(1)).as_secs_f64(),
        posts,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore]
fn shard_cost_and_push_rate() {
    println!(
        "{} messages to as many offline users, {} runs per setting, backend {:?}",
        msgs(),
        runs(),
        test_backend()
    );
    // One POST per notice opens one connection each (and leaves as many in
    // TIME_WAIT): a tenth of the messages there.
    for (label, push, batch, n) in [
        ("push off", false, 0, msgs()),
        ("push on, push_batch_max 100", true, 100, msgs()),
        ("push off", false, 0, msgs() / 10),
        ("push on, push_batch_max 1", true, 1, msgs() / 10),
    ] {
        let rs: Vec<Run> = (0..runs()).map(|_| run(push, batch, n)).collect();
        for r in &rs {
            println!(
                "  {label}: shard {:.0} ns/msg, push thread {:.0} ns/notice, {:.0} notices/s, {} POSTs",
                r.shard_ns_per_msg, r.push_ns_per_notice, r.notices_per_s, r.posts
            );
        }
        println!(
            "{label} ({n} messages): median shard CPU {:.0} ns/msg; push thread {:.0} ns/notice; {:.0} notices/s",
            median(rs.iter().map(|r| r.shard_ns_per_msg).collect()),
            median(rs.iter().map(|r| r.push_ns_per_notice).collect()),
            median(rs.iter().map(|r| r.notices_per_s).collect()),
        );
    }
}
