//! The load generator's boundary to the operating system: opening, feeding
//! and closing many client connections from one thread.
//!
//! Two engines implement [`Engine`] with the same completion-shaped contract:
//!
//! - `uring` (Linux): io_uring with direct descriptors, so the process fd
//!   table (and its RLIMIT_NOFILE) is not used: a linked chain SOCKET (into a
//!   fixed slot) -> SETSOCKOPT x3 -> BIND -> CONNECT (+ link timeout) per
//!   connection, several rings per thread, multishot receives from provided
//!   buffer rings.
//! - `poll` (everywhere, `--engine poll`): mio (epoll/kqueue) and ordinary
//!   non-blocking sockets; bounded by the open-files limit.
//!
//! The contract, for connection slot `conn` in `0..conns`:
//!
//! - [`Engine::open`] starts a connect from source `src` to server `dst`. The
//!   slot must be idle. The result comes later as [`Event::Connected`] or
//!   [`Event::ConnectFailed`] (after which the slot is idle again).
//! - [`Engine::send`] queues bytes on an open connection; they go out in
//!   order, whatever the socket takes at once.
//! - [`Engine::close`] ends the connection with a reset (SO_LINGER {1, 0}, so
//!   no TIME_WAIT). Valid while connecting or open; [`Event::Released`] says
//!   when the slot is idle again. Closing an idle or closing slot does nothing.
//! - [`Engine::poll`] waits up to `timeout` and appends what happened to
//!   `events`; received bytes are copied into `scratch` (the engine returns
//!   its buffers to the kernel at once). It never calls back into the caller.
//! - When the peer closes or the socket fails, [`Event::PeerClosed`] is
//!   reported once; the caller must then [`Engine::close`] the slot.
//! - [`Engine::server_index`] gives the `dst` of a server address, adding
//!   it to the engine's servers if it is new (a cluster node named in a
//!   REDIRECT); indices already handed out never change.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub mod mqtt;
pub mod poll;
pub mod tls;
#[cfg(target_os = "linux")]
pub mod uring;
pub mod ws;

/// Something that happened to a connection slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The TCP connect completed; the connection is open.
    Connected(u32),
    /// The connect failed with this errno; the slot is idle again.
    ConnectFailed(u32, i32),
    /// `scratch[start..start + len]` arrived on the connection.
    Recv(u32, usize, usize),
    /// The peer closed (errno 0) or the socket failed (errno); call `close`.
    PeerClosed(u32, i32),
    /// A `close` finished; the slot is idle again.
    Released(u32),
}

/// What an engine is built with.
// `recv` and the ring sizes are read by the io_uring engine only, which
// exists on Linux only.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Connection slots, `0..conns`.
    pub conns: u32,
    /// Source addresses (bound with IP_BIND_ADDRESS_NO_PORT where available).
    pub sources: Vec<IpAddr>,
    /// Server addresses.
    pub servers: Vec<SocketAddr>,
    /// Receive on connections (false for raw connects to a sink: saves the
    /// kernel ~0.87 KB per armed multishot receive).
    pub recv: bool,
    /// Give up a connect after this long.
    pub connect_timeout: Duration,
    /// uring: fixed-file slots per ring (at most RLIMIT_NOFILE).
    pub slots_per_ring: u32,
    /// uring: provided receive buffers per ring (a power of two).
    pub bufs_per_ring: u16,
    /// uring: bytes per provided receive buffer.
    pub buf_bytes: u32,
    /// uring: submission queue entries per ring.
    pub sq_entries: u32,
}

/// Counters an engine keeps about itself.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    /// Rings (uring) or pollers (poll) in use.
    pub rings: u64,
    /// Times a completion queue had overflowed and was flushed by entering the kernel.
    pub cq_overflow_flushes: u64,
    /// Times the submission queue was full and entries waited in the backlog.
    pub sq_full: u64,
    /// Multishot receives that ended for lack of buffers (-ENOBUFS) and were re-armed.
    pub recv_enobufs: u64,
    /// Multishot receives re-armed for any reason.
    pub recv_rearms: u64,
    /// Sends resubmitted after a short send or -EAGAIN.
    pub send_retries: u64,
}

/// One thread's connections.
pub trait Engine {
    /// Starts connecting slot `conn` from `sources[src]` to `servers[dst]`.
    /// `Err(WouldBlock)` means "no room to submit now, try again later".
    fn open(&mut self, conn: u32, src: usize, dst: usize) -> io::Result<()>;
    /// Queues `bytes` on open connection `conn`; ignored if it is not open.
    fn send(&mut self, conn: u32, bytes: &[u8]);
    /// Resets connection `conn` (see the module docs).
    fn close(&mut self, conn: u32);
    /// Submits what is queued, waits up to `timeout` for something to happen
    /// and appends it to `events` (bytes into `scratch`).
    fn poll(
        &mut self,
        timeout: Duration,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()>;
    /// The engine's own counters.
    fn stats(&self) -> EngineStats;
    /// The `dst` of server `addr` for [`Engine::open`]: its index among the
    /// servers, added at the end if new. `None` once [`ADDED_SERVERS_MAX`]
    /// servers were added.
    fn server_index(&mut self, addr: SocketAddr) -> Option<usize>;
}

/// Most servers an engine adds to its configured ones ([`Engine::server_index`]):
/// the nodes of a cluster that REDIRECTs name. Bounds a list a misbehaving
/// server could otherwise grow without end.
pub const ADDED_SERVERS_MAX: usize = 1024;

/// Index of `addr` in `servers`, pushed if new, for engines that keep their
/// servers as a list that started with `configured` entries.
fn index_or_add(
    servers: &mut Vec<SocketAddr>,
    configured: usize,
    addr: SocketAddr,
) -> Option<usize> {
    if let Some(i) = servers.iter().position(|s| *s == addr) {
        return Some(i);
    }
    if servers.len() - configured >= ADDED_SERVERS_MAX {
        return None;
    }
    servers.push(addr);
    Some(servers.len() - 1)
}

/// A short, stable name for an errno, for failure reasons ("ECONNREFUSED").
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        0 => "EOF",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOMEM => "ENOMEM",
        libc::EPIPE => "EPIPE",
        libc::ECANCELED => "ECANCELED",
        libc::EAGAIN => "EAGAIN",
        libc::EINVAL => "EINVAL",
        libc::EBADF => "EBADF",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOTCONN => "ENOTCONN",
        libc::EPROTO => "EPROTO",
        _ => return format!("errno{errno}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    //! One contract test, run against every engine: connect, echo, peer
    //! close, our close, and connect failure, with a tiny submission queue
    //! so the full-queue and overflow paths run too.

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Instant;

    /// An echo server for `conns` connections: echoes until `quit_after`
    /// bytes were seen on a connection, then closes it.
    fn echo_server(quit_after: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 256];
                    let mut seen = 0;
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        seen += n;
                        if seen >= quit_after {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn config(conns: u32, servers: Vec<SocketAddr>) -> EngineConfig {
        EngineConfig {
            conns,
            sources: vec!["127.0.0.1".parse().unwrap()],
            servers,
            recv: true,
            connect_timeout: Duration::from_secs(5),
            // Two rings for 40 slots: the slot arithmetic crosses a ring.
            slots_per_ring: 24,
            bufs_per_ring: 4,
            buf_bytes: 64,
            // The smallest queue that holds a connect chain.
            sq_entries: 8,
        }
    }

    /// Polls until `want` events matching `pred` arrived (or 10 s passed).
    fn collect(
        e: &mut dyn Engine,
        want: usize,
        mut pred: impl FnMut(&Event, &[u8]) -> bool,
    ) -> Vec<(Event, Vec<u8>)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < want && Instant::now() < deadline {
            let (mut evs, mut scratch) = (Vec::new(), Vec::new());
            e.poll(Duration::from_millis(10), &mut evs, &mut scratch)
                .unwrap();
            for ev in evs {
                let bytes = match ev {
                    Event::Recv(_, s, n) => scratch[s..s + n].to_vec(),
                    _ => Vec::new(),
                };
                if pred(&ev, &bytes) {
                    got.push((ev, bytes));
                }
            }
        }
        got
    }

    fn contract(e: &mut dyn Engine, conns: u32) {
        // Connect everything.
        for c in 0..conns {
            while e.open(c, 0, 0).is_err() {
                e.poll(Duration::ZERO, &mut Vec::new(), &mut Vec::new())
                    .unwrap();
            }
        }
        let up = collect(e, conns as usize, |ev, _| matches!(ev, Event::Connected(_)));
        assert_eq!(up.len(), conns as usize, "all connect");
        // Each sends 3 x 50 bytes (more than one receive buffer in total);
        // the echo comes back whole and in order.
        let msg = |c: u32, i: u8| -> Vec<u8> { (0..50).map(|k| (c as u8) ^ i ^ k).collect() };
        for i in 0..3 {
            for c in 0..conns {
                e.send(c, &msg(c, i));
            }
        }
        let mut echoed = vec![Vec::new(); conns as usize];
        let mut closed = vec![false; conns as usize];
        let mut released = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while released < conns && Instant::now() < deadline {
            let (mut evs, mut scratch) = (Vec::new(), Vec::new());
            e.poll(Duration::from_millis(10), &mut evs, &mut scratch)
                .unwrap();
            for ev in evs {
                match ev {
                    Event::Recv(c, s, n) => {
                        echoed[c as usize].extend_from_slice(&scratch[s..s + n])
                    }
                    // The server closes after 150 bytes.
                    Event::PeerClosed(c, _) => {
                        closed[c as usize] = true;
                        e.close(c);
                    }
                    Event::Released(_) => released += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        for c in 0..conns {
            let want: Vec<u8> = (0..3).flat_map(|i| msg(c, i)).collect();
            assert_eq!(echoed[c as usize], want, "conn {c}");
        }
        assert!(closed.iter().all(|c| *c), "peer closes reported");
        // Reopen and close them ourselves: every slot comes back Released.
        for c in 0..conns {
            while e.open(c, 0, 0).is_err() {
                e.poll(Duration::ZERO, &mut Vec::new(), &mut Vec::new())
                    .unwrap();
            }
        }
        let up = collect(e, conns as usize, |ev, _| matches!(ev, Event::Connected(_)));
        assert_eq!(up.len(), conns as usize, "all reconnect");
        for c in 0..conns {
            e.close(c);
        }
        let rel = collect(e, conns as usize, |ev, _| matches!(ev, Event::Released(_)));
        assert_eq!(rel.len(), conns as usize);
    }

    fn refused(e: &mut dyn Engine) {
        e.open(0, 0, 0).unwrap();
        let f = collect(e, 1, |ev, _| matches!(ev, Event::ConnectFailed(..)));
        assert_eq!(f[0].0, Event::ConnectFailed(0, libc::ECONNREFUSED));
    }

    fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// A server added after start (a REDIRECT's node) gets the next index,
    /// once, and a connection opens to it.
    fn added_server<E: Engine>(e: &mut E, configured: SocketAddr) {
        let added = echo_server(usize::MAX);
        assert_eq!(e.server_index(configured), Some(0));
        assert_eq!(e.server_index(added), Some(1));
        assert_eq!(e.server_index(added), Some(1));
        e.open(0, 0, 1).unwrap();
        let (mut events, mut scratch) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        while events.is_empty() && Instant::now() < deadline {
            e.poll(Duration::from_millis(50), &mut events, &mut scratch)
                .unwrap();
        }
        assert_eq!(events, [Event::Connected(0)]);
    }

    #[test]
    fn added_servers_are_bounded() {
        let first: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut servers = vec![first];
        for port in 2..2 + ADDED_SERVERS_MAX as u16 {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            assert_eq!(index_or_add(&mut servers, 1, addr), Some(port as usize - 1));
        }
        let one_more = SocketAddr::from(([127, 0, 0, 2], 1));
        assert_eq!(index_or_add(&mut servers, 1, one_more), None);
        // Known ones are still found.
        assert_eq!(index_or_add(&mut servers, 1, first), Some(0));
    }

    #[test]
    fn poll_engine_contract() {
        let mut e = poll::PollEngine::new(config(40, vec![echo_server(150)])).unwrap();
        contract(&mut e, 40);
        let mut e = poll::PollEngine::new(config(1, vec![closed_port()])).unwrap();
        refused(&mut e);
        let port = closed_port();
        let mut e = poll::PollEngine::new(config(1, vec![port])).unwrap();
        added_server(&mut e, port);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn uring_engine_contract() {
        if let Err(e) = uring::probe() {
            tern::io::uring_unavailable(&e);
            return;
        }
        let mut e = uring::UringEngine::new(config(40, vec![echo_server(150)])).unwrap();
        contract(&mut e, 40);
        let mut e = uring::UringEngine::new(config(1, vec![closed_port()])).unwrap();
        refused(&mut e);
        let port = closed_port();
        let mut e = uring::UringEngine::new(config(1, vec![port])).unwrap();
        added_server(&mut e, port);
    }
}
