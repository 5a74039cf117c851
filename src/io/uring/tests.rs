//! Backend tests without a shard: a plain TCP client on one side, the `Io`
//! driven by hand on the other. Each skips (with a printed reason) where
//! io_uring is unavailable, or fails there when `TERN_REQUIRE_URING=1`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::setup::prev_power_of_two;
use super::*;
use crate::io::Backend;

const WAIT: Duration = Duration::from_secs(10);

fn options(conns_max: usize, ring_slots_max: usize) -> IoOptions {
    IoOptions {
        backend: Backend::Uring,
        shard: 0,
        conns_max,
        ring_slots_max,
        batch_wait: Duration::ZERO,
    }
}

/// A backend on a fresh loopback listener, or `None` (skip) without io_uring.
fn backend(conns_max: usize, ring_slots_max: usize) -> Option<(Io, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    match Io::new(
        Listeners::plain(listener),
        &options(conns_max, ring_slots_max),
    ) {
        Ok(io) => Some((io, addr)),
        Err(e) => {
            crate::io::uring_unavailable(&e);
            None
        }
    }
}

/// What a driven backend reported, per connection.
#[derive(Default)]
struct Seen {
    accepted: Vec<ConnId>,
    /// The accepted connections that came from the TLS listener.
    accepted_tls: Vec<ConnId>,
    bytes: HashMap<ConnId, Vec<u8>>,
    writable: Vec<ConnId>,
    closed: Vec<ConnId>,
    woken: usize,
}

/// One loop iteration: wait, then drain completions.
fn step(io: &mut Io, seen: &mut Seen) {
    let mut scratch = vec![0u8; 64 * 1024];
    io.wait(Some(Duration::from_millis(5))).unwrap();
    while let Some(c) = io.next(&mut scratch) {
        match c {
            Completion::Accepted(id, which) => {
                seen.accepted.push(id);
                if which == Listener::Tls {
                    seen.accepted_tls.push(id);
                }
            }
            Completion::Recv(id, n) => {
                assert!(n > 0);
                seen.bytes
                    .entry(id)
                    .or_default()
                    .extend_from_slice(&scratch[..n]);
            }
            Completion::Writable(id) => seen.writable.push(id),
            Completion::Closed(id) => seen.closed.push(id),
            Completion::Woken => seen.woken += 1,
        }
    }
}

/// Steps until `done` or panics after [`WAIT`].
fn run_until(io: &mut Io, seen: &mut Seen, mut done: impl FnMut(&Seen) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done(seen) {
        assert!(Instant::now() < deadline, "timed out");
        step(io, seen);
    }
}

fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// With a second (TLS) listener, each accept says which listener it came
/// from, on one ring and with the several-rings layout.
#[test]
fn two_listeners_tag_their_accepts() {
    for ring_slots_max in [0, 64] {
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let tls = TcpListener::bind("127.0.0.1:0").unwrap();
        let (plain_addr, tls_addr) = (plain.local_addr().unwrap(), tls.local_addr().unwrap());
        let listeners = Listeners {
            plain,
            tls: Some(tls),
            ws: None,
            mqtt: None,
            mqtt_tls: None,
        };
        let mut io = match Io::new(listeners, &options(200, ring_slots_max)) {
            Ok(io) => io,
            Err(e) => {
                crate::io::uring_unavailable(&e);
                return;
            }
        };
        let mut seen = Seen::default();
        let _p: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(plain_addr).unwrap())
            .collect();
        let _t: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(tls_addr).unwrap())
            .collect();
        run_until(&mut io, &mut seen, |s| s.accepted.len() == 5);
        assert_eq!(seen.accepted_tls.len(), 2, "slots {ring_slots_max}");
        io.stop_accepting();
        for id in seen.accepted.clone() {
            io.close(id);
        }
    }
}

/// Accept, receive, send, peer close, close: one ring and several rings.
fn echo_round(conns_max: usize, ring_slots_max: usize, clients: usize) {
    let Some((mut io, addr)) = backend(conns_max, ring_slots_max) else {
        return;
    };
    let mut seen = Seen::default();
    let mut streams: Vec<TcpStream> = (0..clients)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    run_until(&mut io, &mut seen, |s| s.accepted.len() == clients);
    assert_eq!(io.conn_count(), clients);
    if ring_slots_max > 0 {
        let data_rings = io.rings.len() - 1;
        assert!(
            data_rings * ring_slots_max >= clients,
            "{data_rings} data rings"
        );
    }
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_all(format!("hello {i:04}").as_bytes()).unwrap();
    }
    run_until(&mut io, &mut seen, |s| {
        s.bytes.values().filter(|b| b.len() == 10).count() == clients
    });
    // Answer each with what it said, reversed; match clients by content.
    let ids: Vec<ConnId> = seen.accepted.clone();
    for id in &ids {
        let mut answer = seen.bytes[id].clone();
        answer.reverse();
        assert_eq!(io.send(*id, &answer).unwrap(), answer.len());
    }
    step(&mut io, &mut seen);
    for (i, s) in streams.iter_mut().enumerate() {
        let mut want = format!("hello {i:04}").into_bytes();
        want.reverse();
        assert_eq!(read_exact_timeout(s, 10), want);
    }
    drop(streams);
    run_until(&mut io, &mut seen, |s| s.closed.len() == clients);
    for id in ids {
        io.close(id);
    }
    assert_eq!(io.conn_count(), 0);
    // Zombies drain: every slot comes back.
    let deadline = Instant::now() + WAIT;
    while !io.conns.is_empty() {
        assert!(
            Instant::now() < deadline,
            "zombies left: {}",
            io.conns.len()
        );
        step(&mut io, &mut seen);
    }
    for (r, ring) in io.rings.iter().enumerate() {
        assert_eq!(ring.slots_used, 0, "ring {r}");
        assert_eq!(ring.slots_reserved, 0, "ring {r}");
    }
}

#[test]
fn echo_on_one_ring() {
    echo_round(100, 0, 20);
}

/// Input on more connections than the old 512 receive buffers, all ready
/// at once on one ring: no multishot receive ends with ENOBUFS (each would
/// be re-armed an iteration later; in chat that was 2-3 per message).
#[test]
fn burst_on_one_ring_does_not_run_out_of_buffers() {
    const CLIENTS: usize = 1000;
    let Some((mut io, addr)) = backend(CLIENTS + 100, 0) else {
        return;
    };
    assert_eq!(io.rings.len(), 1);
    let mut seen = Seen::default();
    // In groups, accepting between them: the listen backlog is smaller.
    let mut streams = Vec::new();
    for _ in 0..CLIENTS / 100 {
        streams.extend((0..100).map(|_| TcpStream::connect(addr).unwrap()));
        let n = streams.len();
        run_until(&mut io, &mut seen, |s| s.accepted.len() == n);
    }
    for s in &mut streams {
        s.write_all(b"ping").unwrap();
    }
    run_until(&mut io, &mut seen, |s| {
        s.bytes.values().filter(|b| b.len() == 4).count() == CLIENTS
    });
    assert_eq!(io.gauges().recv_no_buffers, 0);
}

#[test]
fn echo_on_several_rings() {
    // 16-slot tables: 40 connections need at least 3 data rings.
    echo_round(100, 16, 40);
}

/// On one ring, the accept pauses while fewer slots are free than one
/// accept burst may take, so the table never fills (a full table makes the
/// kernel close the connection it accepts). Waiting connections stay in the
/// backlog and are accepted once slots come back: none is lost.
#[test]
fn accept_pauses_before_the_table_fills() {
    // 32 slots: ring 0's CQ is 16, so the accept needs 17 free slots.
    let Some((mut io, addr)) = backend(15, 32) else {
        return;
    };
    assert_eq!(io.data_rings_max, 0, "one ring expected");
    let mut seen = Seen::default();
    let clients: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for _ in 0..50 {
        step(&mut io, &mut seen);
        assert!(io.rings[0].slots_used <= io.rings[0].slots_total);
    }
    let first = seen.accepted.len();
    assert!((15..40).contains(&first), "accepted {first}");
    // Free slots by closing what was accepted; the rest comes in.
    let mut closed = 0;
    let deadline = Instant::now() + WAIT;
    while closed < 40 {
        assert!(
            Instant::now() < deadline,
            "only {} accepted",
            seen.accepted.len()
        );
        for id in seen.accepted.drain(..) {
            io.close(id);
            closed += 1;
        }
        step(&mut io, &mut seen);
    }
    drop(clients);
}

/// With established, idle connections and nothing to do, `wait` sleeps
/// for its timeout instead of returning at once (a loop that never sleeps
/// burns a core while holding idle connections).
#[test]
fn idle_wait_sleeps() {
    let Some((mut io, addr)) = backend(100, 16) else {
        return;
    };
    let mut seen = Seen::default();
    let mut clients: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    run_until(&mut io, &mut seen, |s| s.accepted.len() == 40);
    for id in seen.accepted.clone() {
        io.established(id);
    }
    for c in clients.iter_mut() {
        c.write_all(b"x").unwrap();
    }
    run_until(&mut io, &mut seen, |s| s.bytes.len() == 40);
    for _ in 0..5 {
        step(&mut io, &mut seen);
    }
    let mut scratch = vec![0u8; 1024];
    let mut slept = 0;
    for _ in 0..5 {
        let t = Instant::now();
        io.wait(Some(Duration::from_millis(50))).unwrap();
        while io.next(&mut scratch).is_some() {}
        if t.elapsed() >= Duration::from_millis(40) {
            slept += 1;
        }
    }
    assert!(slept >= 4, "wait returned early {} times of 5", 5 - slept);
}

#[test]
fn wake_from_another_thread() {
    let Some((mut io, _addr)) = backend(10, 0) else {
        return;
    };
    let mut seen = Seen::default();
    let wake = io.wake_handle();
    std::thread::spawn(move || wake.wake()).join().unwrap();
    run_until(&mut io, &mut seen, |s| s.woken > 0);
}

/// A paused, established connection keeps what arrives and hands it out
/// in order after the resume.
#[test]
fn pause_keeps_bytes_in_order() {
    let Some((mut io, addr)) = backend(10, 0) else {
        return;
    };
    let mut seen = Seen::default();
    let mut client = TcpStream::connect(addr).unwrap();
    run_until(&mut io, &mut seen, |s| s.accepted.len() == 1);
    let id = seen.accepted[0];
    io.established(id);
    client.write_all(b"first").unwrap();
    run_until(&mut io, &mut seen, |s| {
        s.bytes.get(&id).is_some_and(|b| b.len() == 5)
    });
    io.set_recv(id, false);
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut c = client.try_clone().unwrap();
        let p = payload.clone();
        std::thread::spawn(move || c.write_all(&p).unwrap())
    };
    // While paused, nothing is handed out.
    for _ in 0..20 {
        step(&mut io, &mut seen);
    }
    let during = seen.bytes[&id].len();
    assert_eq!(during, 5, "bytes handed out while paused");
    io.set_recv(id, true);
    run_until(&mut io, &mut seen, |s| {
        s.bytes[&id].len() == 5 + payload.len()
    });
    writer.join().unwrap();
    assert_eq!(&seen.bytes[&id][5..], &payload[..]);
}

/// A send larger than the socket takes completes in several SENDs (short
/// sends resubmitted); a send while one is in flight takes 0, and Writable
/// follows once it is out.
#[test]
fn big_send_and_writable() {
    let Some((mut io, addr)) = backend(10, 0) else {
        return;
    };
    let mut seen = Seen::default();
    let mut client = TcpStream::connect(addr).unwrap();
    run_until(&mut io, &mut seen, |s| s.accepted.len() == 1);
    let id = seen.accepted[0];
    const TOTAL: usize = 12 * 1024 * 1024;
    let data: Vec<u8> = (0..TOTAL as u32).map(|i| (i % 253) as u8).collect();
    let half = TOTAL / 2;
    assert_eq!(io.send(id, &data[..half]).unwrap(), half);
    assert_eq!(
        io.send(id, &data[half..]).unwrap(),
        0,
        "one SEND in flight at most"
    );
    // Nobody reads yet: 6 MiB cannot fit the socket, so the SEND comes back short.
    for _ in 0..20 {
        step(&mut io, &mut seen);
    }
    assert!(seen.writable.is_empty(), "Writable before the send drained");
    let reader = std::thread::spawn(move || read_exact_timeout(&mut client, TOTAL));
    run_until(&mut io, &mut seen, |s| s.writable.len() == 1);
    assert_eq!(io.send(id, &data[half..]).unwrap(), TOTAL - half);
    let deadline = Instant::now() + WAIT;
    while !reader.is_finished() {
        assert!(Instant::now() < deadline);
        step(&mut io, &mut seen);
    }
    assert_eq!(reader.join().unwrap(), data);
}

/// A connection handed from one backend to another (two shards on one
/// thread), with the attach before and after the descriptor's arrival.
#[test]
fn handoff_between_backends() {
    for several_rings in [false, true] {
        let slots = if several_rings { 16 } else { 0 };
        let Some((mut a, addr)) = backend(100, slots) else {
            return;
        };
        let (mut b, _) = backend(100, slots).unwrap();
        b.shard = 1;
        let peers = vec![a.peer_info(), b.peer_info()];
        a.set_peers(peers.clone());
        b.set_peers(peers);
        let mut sa = Seen::default();
        let mut sb = Seen::default();
        let mut clients: Vec<TcpStream> =
            (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        run_until(&mut a, &mut sa, |s| s.accepted.len() == 2);
        for (i, c) in clients.iter_mut().enumerate() {
            c.write_all(format!("login{i}").as_bytes()).unwrap();
        }
        run_until(&mut a, &mut sa, |s| s.bytes.len() == 2);
        let mut moved = Vec::new();
        for id in sa.accepted.clone() {
            moved.push(a.detach(id, 1).unwrap());
        }
        assert_eq!(a.conn_count(), 0);
        // First: attach before the descriptor can have arrived (a has not
        // submitted the MSG_RING yet). Second: attach after it arrived.
        let first = b.attach(moved.remove(0)).unwrap();
        b.established(first);
        step(&mut a, &mut sa);
        step(&mut b, &mut sb);
        let second = b.attach(moved.remove(0)).unwrap();
        b.established(second);
        let ids = [first, second];
        let mut pending: Vec<&[u8]> = vec![b"welcome0", b"welcome1"];
        let deadline = Instant::now() + WAIT;
        while !pending.is_empty() {
            assert!(Instant::now() < deadline, "writes never went out");
            step(&mut a, &mut sa);
            step(&mut b, &mut sb);
            let id = ids[2 - pending.len()];
            if b.send(id, pending[0]).unwrap() == pending[0].len() {
                pending.remove(0);
            }
        }
        let mut got = Vec::new();
        for c in clients.iter_mut() {
            c.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 64];
            let mut all = Vec::new();
            let deadline = Instant::now() + WAIT;
            while !String::from_utf8_lossy(&all).contains("welcome") {
                assert!(Instant::now() < deadline);
                step(&mut a, &mut sa);
                step(&mut b, &mut sb);
                if let Ok(n) = c.read(&mut buf) {
                    all.extend_from_slice(&buf[..n]);
                }
            }
            got.push(String::from_utf8_lossy(&all).to_string());
        }
        assert!(got.iter().any(|g| g.contains("welcome0")), "{got:?}");
        assert!(got.iter().any(|g| g.contains("welcome1")), "{got:?}");
        // Bytes sent after the handoff arrive at b.
        for c in clients.iter_mut() {
            c.write_all(b"after").unwrap();
        }
        let deadline = Instant::now() + WAIT;
        while ids
            .iter()
            .any(|id| !sb.bytes.get(id).is_some_and(|b| b.ends_with(b"after")))
        {
            assert!(Instant::now() < deadline, "no bytes after the handoff");
            step(&mut a, &mut sa);
            step(&mut b, &mut sb);
        }
        for id in ids {
            b.close(id);
        }
        let deadline = Instant::now() + WAIT;
        while !a.conns.is_empty() || !b.conns.is_empty() {
            assert!(Instant::now() < deadline, "zombies left");
            step(&mut a, &mut sa);
            step(&mut b, &mut sb);
        }
        for io in [&a, &b] {
            for (r, ring) in io.rings.iter().enumerate() {
                assert_eq!(ring.slots_used, 0, "ring {r}");
            }
        }
    }
}

/// With every data ring full, new connections are refused, never lost to a
/// full table; closing some makes room again.
#[test]
fn full_tables_refuse_then_recover() {
    // 16 slots, conns_max 16: one data ring at most (+1 spare) = 32 slots.
    let Some((mut io, addr)) = backend(16, 16) else {
        return;
    };
    let capacity = 16 * io.data_rings_max;
    let mut seen = Seen::default();
    let clients: Vec<TcpStream> = (0..capacity + 8)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    run_until(&mut io, &mut seen, |s| s.accepted.len() == capacity);
    for _ in 0..20 {
        step(&mut io, &mut seen);
    }
    assert_eq!(seen.accepted.len(), capacity);
    assert!(io.refused >= 1, "no refusal counted");
    for id in seen.accepted.drain(..4).collect::<Vec<_>>() {
        io.close(id);
    }
    drop(clients);
    let more: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    run_until(&mut io, &mut seen, |s| s.accepted.len() >= 4);
    drop(more);
}

#[test]
fn prev_power_of_two_edges() {
    assert_eq!(prev_power_of_two(0), 1);
    assert_eq!(prev_power_of_two(1), 1);
    assert_eq!(prev_power_of_two(2), 2);
    assert_eq!(prev_power_of_two(3), 2);
    assert_eq!(prev_power_of_two(10_000), 8192);
    assert_eq!(prev_power_of_two(u32::MAX), 1 << 31);
}

#[test]
fn conn_slot_is_small() {
    // Part of the 256-byte budget per idle connection.
    assert!(
        std::mem::size_of::<Conn>() <= 48,
        "{}",
        std::mem::size_of::<Conn>()
    );
}

/// With batching on, a wait is still ended by one lone completion: the
/// kernel's min-wait must not hold it until a whole batch has gathered (here
/// that would be the 60 s timeout, for each of the steps).
#[test]
fn batching_wait_returns_for_one_completion() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut options = options(16, 0);
    options.batch_wait = Duration::from_millis(2);
    let mut io = match Io::new(Listeners::plain(listener), &options) {
        Ok(io) => io,
        Err(e) => return crate::io::uring_unavailable(&e),
    };
    if io.batch_wait.is_zero() {
        return eprintln!("skipping: this kernel has no io_uring min-wait");
    }
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).unwrap();
    let mut seen = Seen::default();
    let mut scratch = vec![0u8; 4096];
    let mut wait_one = |io: &mut Io, seen: &mut Seen| {
        io.wait(Some(Duration::from_secs(60))).unwrap();
        while let Some(c) = io.next(&mut scratch) {
            match c {
                Completion::Accepted(id, _) => seen.accepted.push(id),
                Completion::Recv(id, n) => seen
                    .bytes
                    .entry(id)
                    .or_default()
                    .extend_from_slice(&scratch[..n]),
                _ => {}
            }
        }
    };
    while seen.accepted.is_empty() {
        wait_one(&mut io, &mut seen);
    }
    let id = seen.accepted[0];
    for round in 0..3u8 {
        // As after a busy wake, so that this wait batches.
        io.last_reaped = BATCH_BUSY_CQES;
        client.write_all(&[round]).unwrap();
        while seen.bytes.get(&id).map_or(0, Vec::len) <= round as usize {
            wait_one(&mut io, &mut seen);
        }
    }
    assert!(
        started.elapsed() < WAIT,
        "a lone completion waited for a batch"
    );
    io.close(id);
}
