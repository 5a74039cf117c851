//! Catching up on a backlog over a slow link (a delaying proxy): every
//! queued message arrives, in order, and the server never has more
//! DELIVERs (or DELIVER bytes) unanswered than its window.
//!
//! The catch-up figure of `results/slow-link/` comes from the ignored test
//! `catch_up_figure`:
//!
//! ```text
//! cargo test --release -p tern --test slow_link -- --ignored --nocapture catch_up_figure
//! ```

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxy::DelayProxy;
use common::*;
use tern::proto::{Frame, OwnedFrame};
use tern_client::Client;

/// Messages queued for the user who comes back.
const BACKLOG: u64 = 10_000;
/// Body length of each, bytes (a short chat message).
const BODY_BYTES: usize = 100;
/// SENDs written before their ACKs are read, while queueing.
const SEND_BATCH: u64 = 500;

/// Queues `n` messages from `from` to the offline `to`, all ACKed.
fn queue(addr: SocketAddr, from: u64, to: u64, n: u64) {
    let mut sender = Client::login(addr, &token(from)).unwrap().0;
    let mut next = 0;
    while next < n {
        let end = (next + SEND_BATCH).min(n);
        let bodies: Vec<Vec<u8>> = (next..end).map(|i| indexed_body(i, BODY_BYTES)).collect();
        let frames: Vec<Frame<'_>> = (next..end)
            .zip(&bodies)
            .map(|(i, body)| Frame::Send {
                client_id: i,
                to,
                body,
            })
            .collect();
        sender.send_raw(&encode_all(&frames)).unwrap();
        for i in next..end {
            recv_ack(&mut sender, i);
        }
        next = end;
    }
}

/// The delivery window under test.
#[derive(Clone, Copy, Debug)]
struct Window {
    count: usize,
    bytes: usize,
}

/// What a catch-up saw.
struct CatchUp {
    /// From the start of the connect to the last DELIVER.
    took: Duration,
    /// Most DELIVERs, and DELIVER bytes, unanswered at once as the client saw it.
    most_unanswered: (usize, usize),
}

/// The client's view of the DELIVERs: checks order and the window.
struct Tracker {
    window: Window,
    /// Index of the next body expected.
    next: u64,
    last_id: u64,
    /// Received, not yet answered: (server id, encoded bytes).
    unanswered: Vec<(u64, usize)>,
    /// Most DELIVERs, and DELIVER bytes, unanswered at once.
    most: (usize, usize),
}

impl Tracker {
    fn take(&mut self, frame: OwnedFrame) {
        let OwnedFrame::Deliver {
            server_id,
            from,
            server_time_ms,
            ref body,
            ..
        } = frame
        else {
            panic!("expected DELIVER, got {frame:?}");
        };
        assert_eq!(body_index(body), self.next, "out of order or lost");
        assert!(server_id > self.last_id, "server ids not increasing");
        self.next += 1;
        self.last_id = server_id;
        let len = tern::proto::encoded_len(&Frame::Deliver {
            server_id,
            from,
            server_time_ms,
            client_id: None,
            body,
        });
        self.unanswered.push((server_id, len));
        let (count, bytes) = self.unanswered_now();
        assert!(
            count <= self.window.count,
            "{count} DELIVERs unanswered, window {:?}",
            self.window
        );
        assert!(
            bytes <= self.window.bytes || count == 1,
            "{bytes} DELIVER bytes unanswered, window {:?}",
            self.window
        );
        self.most = self.most.max((count, bytes));
    }

    fn unanswered_now(&self) -> (usize, usize) {
        let bytes = self.unanswered.iter().map(|u| u.1).sum();
        (self.unanswered.len(), bytes)
    }
}

/// Logs `user` in through `addr` and receives `n` queued messages the way a
/// client should: whatever has arrived is answered with one write of
/// DELIVEREDs. Checks that they come in order (`msg-0`, `msg-1`, …), none
/// missing, and never more unanswered than `window`. With `probe_first`,
/// answers nothing until a PING's PONG is back and checks that exactly a
/// full window came before it.
fn catch_up(addr: SocketAddr, user: u64, n: u64, window: Window, probe_first: bool) -> CatchUp {
    let started = Instant::now();
    let (mut client, info) = Client::login(addr, &token(user)).unwrap();
    assert_eq!(info.offline_count, n);
    let mut t = Tracker {
        window,
        next: 0,
        last_id: 0,
        unanswered: Vec::new(),
        most: (0, 0),
    };
    if probe_first {
        client.send_frame(&Frame::Ping { nonce: 7 }).unwrap();
        loop {
            match client.recv().unwrap() {
                OwnedFrame::Pong { nonce: 7 } => break,
                frame => t.take(frame),
            }
        }
        // The window is full: by count, or no further DELIVER of this size
        // fits in the bytes.
        let (count, bytes) = t.unanswered_now();
        let largest = t.unanswered.iter().map(|u| u.1).max().unwrap();
        assert!(
            count == window.count || bytes + largest > window.bytes,
            "only {count} DELIVERs ({bytes} bytes) before PONG, window {window:?}"
        );
    }
    let mut took = Duration::ZERO;
    while t.next < n {
        if t.unanswered.is_empty() {
            t.take(client.recv().unwrap());
        }
        // Everything that has arrived, then one write of answers.
        while let Some(frame) = client.recv_timeout(Duration::ZERO).unwrap() {
            t.take(frame);
        }
        if t.next == n {
            took = started.elapsed();
        }
        let answers: Vec<Frame<'_>> = t
            .unanswered
            .drain(..)
            .map(|(server_id, _)| Frame::Delivered { server_id })
            .collect();
        client.send_raw(&encode_all(&answers)).unwrap();
    }
    // Nothing more than the backlog.
    client.ping(8).unwrap();
    assert_eq!(client.backlog_len(), 0);
    CatchUp {
        took,
        most_unanswered: t.most,
    }
}

/// A server with room for the backlog and the given window.
fn server(window: Window, tweak: impl FnOnce(&mut tern::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.queue_len_max = BACKLOG as usize;
        c.deliver_inflight_max = window.count;
        c.deliver_inflight_bytes_max = window.bytes;
        tweak(c);
    })
}

/// Window by count: 10,000 queued messages through a 40 ms round trip, the
/// first window exactly full before any answer, all in order.
#[test]
fn backlog_over_a_slow_link_arrives_in_order_within_the_count_window() {
    let window = Window {
        count: 256,
        bytes: 1 << 30,
    };
    let srv = server(window, |_| {});
    let (from, to) = cross_pair();
    queue(srv.addr, from, to, BACKLOG);
    let proxy = DelayProxy::start(srv.addr, Duration::from_millis(40));
    let seen = catch_up(proxy.addr, to, BACKLOG, window, true);
    assert_eq!(seen.most_unanswered.0, window.count);
    srv.wait_info("Queued", |q| q == 0);
}

/// Window by bytes: the same through a byte budget of one largest frame.
#[test]
fn backlog_over_a_slow_link_arrives_in_order_within_the_byte_window() {
    let window = Window {
        count: 1 << 20,
        bytes: 16 * 1024,
    };
    let srv = server(window, |c| {
        c.frame_bytes_max = 16 * 1024;
        c.body_bytes_max = 16 * 1024 - tern::config::FRAME_OVERHEAD_BYTES_MAX;
    });
    let (from, to) = cross_pair();
    queue(srv.addr, from, to, BACKLOG);
    let proxy = DelayProxy::start(srv.addr, Duration::from_millis(40));
    let seen = catch_up(proxy.addr, to, BACKLOG, window, true);
    assert!(seen.most_unanswered.1 <= window.bytes);
    srv.wait_info("Queued", |q| q == 0);
}

/// The figure: catch-up time of 10,000 queued 100-byte messages at a
/// 300 ms round trip (`SLOW_LINK_RTT_MS` to change it), median of 3 runs,
/// with the old window (128 DELIVERs, no byte budget) and the defaults.
#[test]
#[ignore]
fn catch_up_figure() {
    let rtt_ms: u64 = std::env::var("SLOW_LINK_RTT_MS")
        .ok()
        .map_or(300, |v| v.parse().expect("SLOW_LINK_RTT_MS"));
    let rtt = Duration::from_millis(rtt_ms);
    let defaults = tern::config::Config::default();
    let windows = [
        (
            "before: deliver_inflight_max 128, no byte budget",
            Window {
                count: 128,
                bytes: 1 << 30,
            },
        ),
        (
            "after: the defaults",
            Window {
                count: defaults.deliver_inflight_max,
                bytes: defaults.deliver_inflight_bytes_max,
            },
        ),
    ];
    let mut lines = Vec::new();
    for (name, window) in windows {
        let mut runs = Vec::new();
        for _ in 0..3 {
            let srv = server(window, |_| {});
            let (from, to) = cross_pair();
            queue(srv.addr, from, to, BACKLOG);
            let proxy = DelayProxy::start(srv.addr, rtt);
            let seen = catch_up(proxy.addr, to, BACKLOG, window, false);
            eprintln!(
                "{name}: {:.2} s (most unanswered {} DELIVERs, {} bytes)",
                seen.took.as_secs_f64(),
                seen.most_unanswered.0,
                seen.most_unanswered.1
            );
            runs.push(seen.took);
        }
        runs.sort();
        lines.push(format!(
            "| {name} | {} | {} | {:.2} s | {} |",
            window.count,
            window.bytes,
            runs[1].as_secs_f64(),
            runs.iter()
                .map(|r| format!("{:.2}", r.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    println!("RTT {rtt_ms} ms, {BACKLOG} queued messages of {BODY_BYTES} B:");
    println!("| window | deliver_inflight_max | deliver_inflight_bytes_max | median | runs (s) |");
    println!("|---|---|---|---|---|");
    for line in lines {
        println!("{line}");
    }
}
