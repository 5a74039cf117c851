//! `sink`: accepts TCP connections and holds them, nothing else. It is the
//! far end for "one load-generator process opens 1,000,000 connections".
//!
//! Linux: each worker thread has one SO_REUSEPORT listener per address and a
//! list of io_uring rings. A multishot accept into kernel-allocated direct
//! descriptors (IORING_FILE_INDEX_ALLOC) is armed on one ring at a time; when
//! that ring's table is within `margin` of full, the accept is cancelled and
//! armed on the next ring, so no table ever fills (the kernel would drop the
//! connection being accepted: BOX-FACTS). Pending connections wait in the
//! listen backlog meanwhile. Accepted sockets inherit SO_LINGER {1, 0} from
//! the listener, so the sink's exit leaves no TIME_WAIT either.
//!
//! Elsewhere it falls back to plain accept() with ordinary descriptors,
//! bounded by the open-files limit.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

use crate::sysinfo::{self, fmt_bytes};
use crate::{addr, run::shell_join, EXIT_OK};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `sink` options.
#[derive(Args, Debug)]
pub struct SinkArgs {
    /// Addresses to listen on: ADDR:PORT[,ADDR:PORT...] or ADDR:PORT-PORT.
    #[arg(long, default_value = "127.0.0.1:5222")]
    pub listen: String,
    /// Worker threads (0 = one per core), each with its own listeners.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Stop accepting after this many connections in total.
    #[arg(long, default_value_t = 1_100_000)]
    pub conns_max: u64,
    /// Exit after this long.
    #[arg(long, default_value = "10m", value_parser = crate::duration)]
    pub duration: Duration,
    /// listen(2) backlog.
    #[arg(long, default_value_t = 4096)]
    pub backlog: i32,
    /// Fixed-file slots per ring (0 = RLIMIT_NOFILE - 64).
    #[arg(long, default_value_t = 0)]
    pub ring_slots: u32,
    /// Stop accepting when MemAvailable falls below this.
    #[arg(long, default_value = "3GiB", value_parser = crate::bytes)]
    pub mem_floor: u64,
    /// Write a JSON report here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// No per-second progress lines.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Counters shared by the sink's workers.
#[derive(Default)]
struct SinkStats {
    accepted: AtomicU64,
    /// Accepts that failed (by the kernel: ENFILE means the connection was dropped).
    accept_errors: AtomicU64,
    enfile: AtomicU64,
    rings: AtomicU64,
    cq_overflow_flushes: AtomicU64,
}

fn listener(addr: SocketAddr, backlog: i32) -> Res<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    #[cfg(not(target_os = "freebsd"))]
    s.set_reuse_port(true)?;
    #[cfg(target_os = "freebsd")]
    s.set_reuse_port_lb(true)?;
    // Inherited by accepted sockets: closing them resets, no TIME_WAIT.
    s.set_linger(Some(Duration::ZERO))?;
    s.bind(&addr.into())
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// Runs the sink until `--duration` passes or SIGINT/SIGTERM.
pub fn run(a: SinkArgs, argv: &[String]) -> Res<i32> {
    let addrs = addr::parse_servers(&a.listen).map_err(|e| format!("--listen: {e}"))?;
    let workers = match a.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let nofile = sysinfo::nofile_limit()?;
    let slots = match a.ring_slots {
        0 => nofile.saturating_sub(64).max(16),
        n => n as u64,
    }
    .min(nofile) as u32;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let accepting = Arc::new(AtomicBool::new(true));
    let stats = Arc::new(SinkStats::default());
    let per_worker_max = a.conns_max.div_ceil(workers as u64);

    // Listeners are bound here so a busy port fails before anything starts.
    let mut per_worker = Vec::new();
    for _ in 0..workers {
        let ls = addrs
            .iter()
            .map(|&ad| listener(ad, a.backlog))
            .collect::<Res<Vec<_>>>()?;
        per_worker.push(ls);
    }

    #[cfg(target_os = "linux")]
    let uring = match crate::engine::uring::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "io_uring unavailable ({e}); sink falls back to accept() with ordinary descriptors"
            );
            false
        }
    };
    #[cfg(not(target_os = "linux"))]
    let uring = false;

    eprintln!(
        "tern-loadgen sink: listening on {} | {workers} workers | {} | up to {} connections",
        a.listen,
        if uring {
            format!("io_uring, {slots} slots per ring")
        } else {
            "accept() fallback".to_string()
        },
        a.conns_max
    );
    let started = Instant::now();
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut handles = Vec::new();
    for (w, ls) in per_worker.into_iter().enumerate() {
        let (stop, accepting, stats) = (stop.clone(), accepting.clone(), stats.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("sink-{w}"))
                .spawn(move || {
                    #[cfg(target_os = "linux")]
                    if uring {
                        if let Err(e) =
                            uring_worker(ls, slots, per_worker_max, &stop, &accepting, &stats)
                        {
                            eprintln!("sink worker {w}: {e}");
                        }
                        return;
                    }
                    let _ = uring;
                    plain_worker(ls, per_worker_max, &stop, &accepting, &stats);
                })?,
        );
    }

    let deadline = started + a.duration;
    let mut last = (Instant::now(), 0u64);
    let mut peak_rate = 0.0f64;
    let mut timeline = Vec::new();
    let mut floor_hit = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let mem = sysinfo::mem_available_bytes();
        let acc = stats.accepted.load(Ordering::Relaxed);
        if let Some(m) = mem {
            if m < a.mem_floor && floor_hit.is_none() {
                accepting.store(false, Ordering::Relaxed);
                floor_hit = Some(acc);
                eprintln!(
                    "MemAvailable {} is below --mem-floor {}: stopped accepting at {acc}",
                    fmt_bytes(m),
                    fmt_bytes(a.mem_floor)
                );
            }
        }
        if last.0.elapsed() >= Duration::from_secs(1) {
            let dt = last.0.elapsed().as_secs_f64();
            let rate = (acc - last.1) as f64 / dt;
            peak_rate = peak_rate.max(rate);
            let t = started.elapsed().as_secs_f64();
            if !a.quiet {
                eprintln!(
                    "[{t:>6.1}s] held {acc:>8} ({rate:+.0}/s) errors {} rings {}{}",
                    stats.accept_errors.load(Ordering::Relaxed),
                    stats.rings.load(Ordering::Relaxed),
                    mem.map_or(String::new(), |m| format!(" | mem {}", fmt_bytes(m)))
                );
            }
            if timeline.len() < 6 * 3600 {
                timeline.push(json!({"t_s": (t * 10.0).round() / 10.0, "held": acc,
                                     "accepted_per_s": rate.round(), "mem_available_bytes": mem}));
            }
            last = (Instant::now(), acc);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let acc = stats.accepted.load(Ordering::Relaxed);
    println!(
        "== tern-loadgen sink: held {acc} connections at most, peak {peak_rate:.0} accepts/s, \
         {} accept errors ({} ENFILE), {} rings, {:.1}s",
        stats.accept_errors.load(Ordering::Relaxed),
        stats.enfile.load(Ordering::Relaxed),
        stats.rings.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &a.json {
        let doc = json!({
            "tool": "tern-loadgen", "version": env!("CARGO_PKG_VERSION"), "scenario": "sink",
            "command_line": shell_join(argv), "argv": argv, "started_unix_ms": started_unix_ms,
            "elapsed_s": started.elapsed().as_secs_f64(), "engine": if uring { "uring" } else { "accept" },
            "workers": workers, "slots_per_ring": slots, "accepted": acc,
            "accept_errors": stats.accept_errors.load(Ordering::Relaxed),
            "enfile": stats.enfile.load(Ordering::Relaxed),
            "rings": stats.rings.load(Ordering::Relaxed),
            "cq_overflow_flushes": stats.cq_overflow_flushes.load(Ordering::Relaxed),
            "peak_accepts_per_s": peak_rate, "mem_floor_bytes": a.mem_floor,
            "accepted_when_floor_hit": floor_hit, "timeline": timeline,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        println!("report written to {}", path.display());
    }
    Ok(EXIT_OK)
}

/// Plain accept() loop; holds the sockets in a Vec. Bounded by RLIMIT_NOFILE.
fn plain_worker(
    ls: Vec<TcpListener>,
    max: u64,
    stop: &AtomicBool,
    accepting: &AtomicBool,
    stats: &SinkStats,
) {
    let mut held = Vec::new();
    for l in &ls {
        let _ = l.set_nonblocking(true);
    }
    stats.rings.fetch_add(1, Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        if accepting.load(Ordering::Relaxed) && (held.len() as u64) < max {
            for l in &ls {
                match l.accept() {
                    Ok((s, _)) => {
                        held.push(s);
                        stats.accepted.fetch_add(1, Ordering::Relaxed);
                        got = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if !got {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(target_os = "linux")]
fn uring_worker(
    ls: Vec<TcpListener>,
    slots: u32,
    max: u64,
    stop: &AtomicBool,
    accepting: &AtomicBool,
    stats: &SinkStats,
) -> Res<()> {
    use crate::engine::uring::{ud, ud_parts, EventFd, Ring, K_ACCEPT};
    use io_uring::{cqueue, opcode, types};
    use std::os::fd::AsRawFd;

    /// Kind of the cancel that moves the accept off a full ring.
    const K_CANCEL_ACCEPT: u8 = 11;
    // Leave room for accepts that complete after we decide to move on.
    let margin = (slots / 4).clamp(1, 4096);
    let usable = (slots - margin).max(1) as u64;
    let efd = EventFd::new()?;
    let mut rings: Vec<Ring> = Vec::new();
    let mut used: Vec<u64> = Vec::new();
    let mut total: u64 = 0;
    let mut cur: Option<usize> = None;
    let mut cqes = Vec::new();
    let mut overflow_flushes = 0;

    let arm = |ring: &mut Ring, idx: usize, l: &TcpListener| {
        let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(ud(K_ACCEPT, 0, idx as u32));
        ring.push(&[e]);
    };
    while !stop.load(Ordering::Relaxed) {
        let want = accepting.load(Ordering::Relaxed) && total < max;
        // Move to a ring with room, or stop accepting.
        let full = cur.is_some_and(|r| used[r] >= usable);
        if cur.is_some() && (full || !want) {
            let r = cur.take().expect("checked");
            for i in 0..ls.len() {
                let c = opcode::AsyncCancel::new(ud(K_ACCEPT, 0, i as u32))
                    .build()
                    .user_data(ud(K_CANCEL_ACCEPT, 0, i as u32));
                rings[r].push(&[c]);
            }
        }
        if cur.is_none() && want {
            let r = match used.iter().position(|&u| u < usable) {
                Some(r) => r,
                None => {
                    rings.push(Ring::new(256, slots, &efd, None)?);
                    used.push(0);
                    stats.rings.fetch_add(1, Ordering::Relaxed);
                    rings.len() - 1
                }
            };
            for (i, l) in ls.iter().enumerate() {
                arm(&mut rings[r], i, l);
            }
            cur = Some(r);
        }
        for ring in rings.iter_mut() {
            ring.flush()?;
        }
        efd.drain();
        let mut handled = 0;
        for r in 0..rings.len() {
            cqes.clear();
            rings[r].reap(&mut cqes, 8192, &mut overflow_flushes);
            handled += cqes.len();
            for &(u, res, flags) in &cqes {
                let (kind, _, idx) = ud_parts(u);
                if kind != K_ACCEPT {
                    continue;
                }
                if res >= 0 {
                    used[r] += 1;
                    total += 1;
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                } else if res != -libc::ECANCELED {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if res == -libc::ENFILE {
                        // The table was full; the kernel closed this connection.
                        stats.enfile.fetch_add(1, Ordering::Relaxed);
                        used[r] = usable;
                    }
                }
                if !cqueue::more(flags)
                    && cur == Some(r)
                    && res != -libc::ECANCELED
                    && used[r] < usable
                {
                    arm(&mut rings[r], idx as usize, &ls[idx as usize]);
                }
            }
        }
        stats
            .cq_overflow_flushes
            .store(overflow_flushes, Ordering::Relaxed);
        if handled == 0 {
            efd.wait(Duration::from_millis(100));
        }
    }
    Ok(())
}
