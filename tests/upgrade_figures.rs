//! Live-upgrade figures for `results/upgrade/` (ignored: run by hand, with
//! `--release`):
//!
//! ```text
//! TERN_TEST_IO=poll TERN_UPGRADE_CONNS=19000 TERN_UPGRADE_RUNS=5 \
//!   cargo test --release -p tern --test upgrade_figures -- --ignored --nocapture
//! ```
//!
//! A `tern serve` child holds `TERN_UPGRADE_CONNS` idle logged-in
//! connections (plain sockets in this process: both processes stay under
//! RLIMIT_NOFILE) and one chatting pair (the self-healing client library,
//! one message every 2 ms). Each run upgrades to the same binary and
//! reports: the hand-over time the old process logs (`tern upgrade` asked
//! to successor serving), when `tern upgrade` returned, and the longest
//! pause between two messages the chatting recipient saw. Every idle
//! connection is carried (both backends): the run checks each is still
//! open and got no byte.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::{serve_command, TernChild, TERN};
use common::*;
use tern::proto::{self, Frame, Limits};
use tern_client::session::{Event, Session, SessionConfig};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A new connection for `user`, logged in (LOGIN_OK read), non-blocking.
fn login(addr: SocketAddr, user: u64) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let token = token(user);
    let mut out = Vec::new();
    proto::encode(
        &Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        },
        &mut out,
    );
    stream.write_all(&out).expect("LOGIN");
    let limits = Limits {
        frame_bytes_max: 65536,
        body_bytes_max: 65536,
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Ok(Some((frame, _))) = proto::decode(&buf, &limits) {
            assert!(matches!(frame, Frame::LoginOk { .. }), "{frame:?}");
            break;
        }
        let n = stream.read(&mut chunk).expect("LOGIN_OK");
        assert!(n > 0, "closed before LOGIN_OK");
        buf.extend_from_slice(&chunk[..n]);
    }
    stream.set_nonblocking(true).unwrap();
    stream
}

/// The hand-over time the old process of upgrade `run` (from 1) logged.
fn handover_ms_of(log: &str, run: u64) -> f64 {
    log.lines()
        .filter_map(|l| {
            l.split_once("hand-over to pid ")?
                .1
                .split_once(" took ")?
                .1
                .split_once(" ms")
        })
        .map(|(ms, _)| ms.parse().unwrap())
        .nth(run as usize - 1)
        .expect("the old process's hand-over line")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore]
fn upgrade_figures() {
    let conns = env_u64("TERN_UPGRADE_CONNS", 1000);
    let runs = env_u64("TERN_UPGRADE_RUNS", 3);
    let io = match test_backend() {
        tern::io::Backend::Poll => "poll",
        tern::io::Backend::Uring => "uring",
        tern::io::Backend::Auto => "auto",
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--shards", "2", "--io", io]);
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--stats-socket")
        .arg(&sock)
        .args([
            "--accept-rate-per-s-max",
            "0",
            "--addr-conns-per-s-max",
            "0",
        ])
        .args(["--addr-pending-max", "0", "--idle-timeout-ms", "3600000"])
        .env_remove("INVOCATION_ID");
    let old = TernChild::expect_start(cmd);
    let addr = old.addr;

    let began = Instant::now();
    let mut idle: Vec<TcpStream> = (0..conns).map(|i| login(addr, 100_000 + i)).collect();
    eprintln!(
        "{conns} idle connections logged in in {} ms",
        began.elapsed().as_millis()
    );

    // The chatting pair: arrival times at the recipient.
    let stop = Arc::new(AtomicBool::new(false));
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    // One thread per client: a client blocked in a login (the successor
    // not serving yet) must not keep the other from closing on its BYE.
    let session = move |user| {
        let mut c = SessionConfig::new(addr, &token(user));
        c.backoff_min = Duration::from_millis(1);
        c.backoff_max = Duration::from_millis(20);
        Session::new(c)
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut a = session(1);
            let mut next = Instant::now();
            while !stop.load(Ordering::Acquire) {
                if Instant::now() >= next && a.outbox_len() < 100 {
                    a.send(2, b"tick").unwrap();
                    next += Duration::from_millis(2);
                }
                let _ = a.poll(Duration::from_micros(500)).unwrap();
            }
        })
    };
    let recipient = {
        let (stop, arrivals) = (stop.clone(), arrivals.clone());
        std::thread::spawn(move || {
            let mut b = session(2);
            while !stop.load(Ordering::Acquire) {
                if let Some(Event::Message { server_id, .. }) =
                    b.poll(Duration::from_millis(1)).unwrap()
                {
                    arrivals.lock().unwrap().push(Instant::now());
                    b.accept(server_id).unwrap();
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    let (mut handover_ms, mut back_ms, mut pause_ms) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let t0 = Instant::now();
        let upgrader = {
            let sock = sock.clone();
            std::thread::spawn(move || upgrade(&sock))
        };
        // Carried: every idle connection stays open, nothing arrives.
        let (ok, text) = upgrader.join().unwrap();
        assert!(ok, "{text}\n{}", old.log_text());
        let back = t0.elapsed();
        let mut byte = [0u8; 64];
        let mut dropped = 0;
        for s in idle.iter_mut() {
            match s.read(&mut byte) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                _ => dropped += 1,
            }
        }
        assert_eq!(dropped, 0, "idle connections dropped or written to");
        std::thread::sleep(Duration::from_millis(500));
        let window_end = Instant::now();
        let pause = {
            let times = arrivals.lock().unwrap();
            times
                .windows(2)
                .filter(|w| w[1] >= t0 && w[0] <= window_end)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        };
        let took = handover_ms_of(&old.log_text(), run);
        eprintln!(
            "run {run}: hand-over {took} ms, {conns} idle connections carried (0 dropped), \
             upgrade done after {} ms, longest chat pause {} ms",
            back.as_millis(),
            pause.as_millis()
        );
        handover_ms.push(took);
        back_ms.push(back.as_secs_f64() * 1000.0);
        pause_ms.push(pause.as_secs_f64() * 1000.0);
    }
    stop.store(true, Ordering::Release);
    sender.join().unwrap();
    recipient.join().unwrap();
    eprintln!(
        "median of {runs} ({io}, {conns} idle connections, all carried): hand-over {:.0} ms, \
         upgrade done after {:.0} ms, longest chat pause {:.0} ms",
        median(&mut handover_ms),
        median(&mut back_ms),
        median(&mut pause_ms)
    );
    // The last successor is not our child: stop it.
    if let Ok(text) = tern::stats::query(&sock, "show info") {
        if let Some(pid) = parse_info(&text).get("Pid").and_then(|p| p.parse().ok()) {
            // SAFETY: kill with a pid and a valid signal number.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn upgrade(sock: &Path) -> (bool, String) {
    let out = Command::new(TERN)
        .arg("upgrade")
        .arg("--socket")
        .arg(sock)
        .output()
        .expect("run tern upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
