//! `tern-loadgen group`: one sender, one group of `--members` members
//! (protocol v2), `--msgs` GROUP_SENDs with at most `--window` unACKed;
//! the members' connections are read by one mio thread that answers every
//! copy with DELIVERED. With `--one-to-one` the sender sends plain SENDs to
//! one recipient instead, the baseline. Reports msgs/s, copies/s, delivery
//! p50/p99 (SEND to the copy's arrival, the body carries the send time)
//! and, with `--server-pid`, the server's CPU time per delivered copy
//! (from `/proc/<pid>/stat`, Linux). Bounded in count and time.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tern::proto::{self, Frame, GroupFrame, Limits, OwnedFrame};
use tern_client::Client;

/// Options of the group scenario.
#[derive(Args, Debug)]
pub struct GroupArgs {
    /// The server's client address.
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// The server's token secret.
    #[arg(long, env = "TERN_TOKEN_SECRET", hide_env_values = true)]
    secret: String,
    /// Members of the group, the sender included.
    #[arg(long, default_value_t = 10)]
    members: u64,
    /// Messages the sender sends.
    #[arg(long, default_value_t = 1000)]
    msgs: u64,
    /// Messages sent and not yet ACKed, at most.
    #[arg(long, default_value_t = 16)]
    window: u64,
    /// Body bytes per message (at least 8: the send time).
    #[arg(long, default_value_t = 32)]
    body_bytes: usize,
    /// First user id; the run uses this one and the next `--members`.
    #[arg(long, default_value_t = 1_000_000)]
    user_base: u64,
    /// Plain SENDs to one recipient instead of a group (the 1:1 baseline).
    #[arg(long)]
    one_to_one: bool,
    /// The server's process id, to read its CPU time (Linux).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = crate::sched::parse_duration)]
    timeout: Duration,
}

fn token(secret: &str, user: u64) -> String {
    tern::token::mint(secret.as_bytes(), user, tern::token::now_unix_s() + 3600)
}

/// User plus system CPU time of process `pid`, in clock ticks converted to
/// seconds (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Logs `user` in with protocol v2 on a blocking client.
fn login(addr: SocketAddr, secret: &str, user: u64) -> Result<Client, String> {
    Client::login_version(addr, &token(secret, user), proto::VERSION_2)
        .map(|(c, _)| c)
        .map_err(|e| format!("login of {user}: {e}"))
}

/// Runs the scenario; exit status 0, or an error.
pub fn run(a: GroupArgs) -> Result<i32, Box<dyn std::error::Error>> {
    if a.body_bytes < 8 || a.members < 2 && !a.one_to_one {
        return Err("--body-bytes must be at least 8 and --members at least 2".into());
    }
    let sender = a.user_base;
    let members: Vec<u64> = if a.one_to_one {
        vec![a.user_base + 1]
    } else {
        (1..a.members).map(|i| a.user_base + i).collect()
    };
    let deadline = Instant::now() + a.timeout;
    let mut s = login(a.addr, &a.secret, sender)?;
    // Members first, so nothing waits offline.
    let mut conns = Vec::new();
    for &u in &members {
        let c = login(a.addr, &a.secret, u)?;
        conns.push(c);
    }
    // The members' side: one thread, every connection non-blocking,
    // answering from the start (the membership events too, so no queue
    // fills while the group is built).
    let epoch = Instant::now();
    let expected = a.msgs * members.len() as u64;
    let streams: Vec<std::net::TcpStream> = conns.into_iter().map(Client::into_stream).collect();
    let reader = std::thread::spawn(move || read_copies(streams, expected, epoch, deadline));
    let group = if a.one_to_one {
        0
    } else {
        let g = s
            .group_request(GroupFrame::Create { req: 1 })
            .map_err(|e| format!("GROUP_CREATE: {e}"))?;
        for (i, &u) in members.iter().enumerate() {
            s.send_group(GroupFrame::Add {
                req: 2 + i as u64,
                group: g,
                user: u,
            })?;
        }
        let mut oks = 0;
        while oks < members.len() {
            match s.recv()? {
                OwnedFrame::Group(GroupFrame::Ok { .. }) => oks += 1,
                OwnedFrame::Error { code, .. } => return Err(format!("GROUP_ADD: {code}").into()),
                OwnedFrame::Group(GroupFrame::Event { server_id, .. }) => {
                    s.send_delivered(server_id)?;
                }
                _ => {}
            }
        }
        g
    };
    // Let the membership events' fan-out finish first: measured is the
    // messages' cost alone (the server's CPU time stops moving, bounded).
    if let Some(pid) = a.server_pid {
        let mut last = cpu_s(pid);
        for _ in 0..150 {
            std::thread::sleep(Duration::from_millis(200));
            let now = cpu_s(pid);
            if now == last {
                break;
            }
            last = now;
        }
    }
    let cpu0 = a.server_pid.and_then(cpu_s);
    let started = Instant::now();
    let mut body = vec![0u8; a.body_bytes];
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < a.msgs {
        if Instant::now() > deadline {
            return Err(format!("timed out with {acked} of {} ACKed", a.msgs).into());
        }
        while sent < a.msgs && sent - acked < a.window {
            let ns = epoch.elapsed().as_nanos() as u64;
            body[..8].copy_from_slice(&ns.to_le_bytes());
            sent += 1;
            if a.one_to_one {
                s.send_msg(sent, members[0], &body)?;
            } else {
                s.group_send(sent, group, &body)?;
            }
        }
        match s.recv()? {
            OwnedFrame::Ack { .. } => acked += 1,
            OwnedFrame::Error {
                code, client_id, ..
            } => return Err(format!("message {client_id} refused: {code}").into()),
            // The sender's own copies, receipts: answered or dropped.
            OwnedFrame::Group(GroupFrame::Deliver { server_id, .. })
            | OwnedFrame::Group(GroupFrame::Event { server_id, .. }) => {
                s.send_delivered(server_id)?;
            }
            _ => {}
        }
    }
    let (copies, hist, last) = reader.join().map_err(|_| "reader thread panicked")??;
    let took = last
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-9);
    let cpu1 = a.server_pid.and_then(cpu_s);
    let mode = if a.one_to_one { "1:1" } else { "group" };
    println!(
        "mode={mode} members={} msgs={} copies={copies} took_s={took:.3} msgs_per_s={:.0} \
         copies_per_s={:.0} deliver_p50_us={} deliver_p99_us={}",
        members.len() + usize::from(!a.one_to_one),
        a.msgs,
        a.msgs as f64 / took,
        copies as f64 / took,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
    );
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        println!(
            "server_cpu_s={:.3} server_cpu_us_per_copy={:.3}",
            c1 - c0,
            (c1 - c0) * 1e6 / copies as f64
        );
    }
    Ok(0)
}

type Copies = (u64, Histogram<u64>, Instant);

/// Reads every member's copies until `expected` arrived, answering each
/// with DELIVERED; the histogram holds each copy's delivery time, µs.
fn read_copies(
    streams: Vec<std::net::TcpStream>,
    expected: u64,
    epoch: Instant,
    deadline: Instant,
) -> Result<Copies, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut m = TcpStream::from_std(s);
        poll.registry()
            .register(&mut m, Token(i), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        conns.push((m, Vec::new()));
    }
    let limits = Limits {
        frame_bytes_max: 1 << 20,
        body_bytes_max: 1 << 20,
    };
    let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 1 << 16];
    let mut copies = 0;
    let mut seen: HashMap<usize, u64> = HashMap::new();
    while copies < expected {
        if Instant::now() > deadline {
            return Err(format!("timed out with {copies} of {expected} copies"));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0;
            let (stream, inp) = &mut conns[i];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Err(format!("member {i} closed")),
                    Ok(n) => inp.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
            let mut out = Vec::new();
            let mut at = 0;
            let now_ns = epoch.elapsed().as_nanos() as u64;
            while let Ok(Some((frame, used))) = proto::decode(&inp[at..], &limits) {
                at += used;
                let (server_id, body) = match frame {
                    Frame::Group(GroupFrame::Deliver {
                        server_id, body, ..
                    })
                    | Frame::Deliver {
                        server_id, body, ..
                    } => (server_id, Some(body)),
                    Frame::Group(GroupFrame::Event { server_id, .. }) => (server_id, None),
                    _ => continue,
                };
                proto::encode(&Frame::Delivered { server_id }, &mut out);
                if let Some(body) = body.filter(|b| b.len() >= 8) {
                    let sent = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                    let _ = hist.record(now_ns.saturating_sub(sent) / 1000);
                    copies += 1;
                    *seen.entry(i).or_default() += 1;
                }
            }
            inp.drain(..at);
            // Small answers on a socket with room: a short write is retried.
            let mut w = &out[..];
            while !w.is_empty() {
                match stream.write(w) {
                    Ok(n) => w = &w[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    }
    Ok((copies, hist, Instant::now()))
}
