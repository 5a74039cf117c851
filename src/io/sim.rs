//! Simulated backend: connections that exist only in memory, for the
//! deterministic simulator ([`crate::sim`]).
//!
//! A [`Net`] holds every simulated socket of a run: the bytes each side has
//! written and the other not yet read, and who closed or reset it. Clients
//! (the simulator's) connect to a shard's backlog and write and read
//! through the `Net`; each shard's [`Io`] meets the same completion-shaped
//! contract as poll and io_uring over it. Faults come from the `Net`'s
//! seeded PRNG: reads and sends that take only part of the bytes, a
//! per-socket output buffer of random size (so output backs up), and
//! sockets stalled until a simulated time. Resets are made by the
//! simulator ([`Net::reset`]). Everything runs on one thread and in a fixed
//! order, so a seed replays exactly.
//!
//! Waits never block: the simulator steps each shard and moves the clock.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;

use super::{Completion, ConnId, Listener};
use crate::clock::SimTime;

/// The backend's name, for `show info`.
pub const BACKEND_NAME: &str = "sim";
/// Connections accepted per iteration at most, as the real backends do.
const ACCEPT_BATCH_MAX: usize = 256;

/// A simulated socket's id, unique within a [`Net`] (never reused).
pub type SockId = u64;

/// How the network misbehaves; chosen per seed by the simulator.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetFaults {
    /// Per million reads and sends: take a random part of the bytes only.
    pub partial_per_million: u32,
    /// Smallest and largest per-socket output buffer, bytes (the server's
    /// sends stop there until the client reads). Both 0: 256 KiB.
    pub out_buffer_bytes: (usize, usize),
    /// Per million reads: stall the socket (no bytes handed to the server)
    /// for up to `stall_ms_max` simulated milliseconds.
    pub stall_per_million: u32,
    /// Longest stall, simulated milliseconds.
    pub stall_ms_max: u64,
}

/// What a client's read found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadState {
    /// The connection is open (bytes may or may not have been read).
    Open,
    /// The server closed its sending side and everything has been read.
    Eof,
    /// The connection was reset or is gone.
    Reset,
}

struct Socket {
    /// The client that owns the other end (its index in the simulator).
    client: u32,
    /// The shard and connection holding the server end; `None` while in a
    /// backlog or travelling between shards.
    owner: Option<(usize, ConnId)>,
    /// Client to server.
    up: VecDeque<u8>,
    /// Server to client.
    down: VecDeque<u8>,
    /// Most bytes `down` takes.
    down_cap: usize,
    client_fin: bool,
    server_fin: bool,
    server_closed: bool,
    reset: bool,
    /// Simulated nanoseconds until which the server reads nothing.
    stalled_until_ns: u64,
}

/// Every simulated socket of a run, shared by the shards' backends and the
/// simulator's clients. Cheap to clone (one `Rc`).
#[derive(Clone)]
pub struct Net(Rc<RefCell<NetState>>);

struct NetState {
    time: Arc<SimTime>,
    rng: fastrand::Rng,
    faults: NetFaults,
    sockets: HashMap<SockId, Socket>,
    next_sock: SockId,
    /// Per shard: sockets waiting to be accepted.
    backlog: Vec<VecDeque<SockId>>,
    /// Per shard: sockets with news for the server end (bytes, FIN, reset,
    /// room to write).
    server_news: Vec<Vec<SockId>>,
    /// Clients with news (bytes, FIN, reset), with the socket.
    client_news: Vec<(u32, SockId)>,
}

impl Net {
    /// A network of `shards` shards with no sockets, faults drawn from a
    /// PRNG seeded with `seed`, time read from `time`.
    pub fn new(shards: usize, seed: u64, faults: NetFaults, time: Arc<SimTime>) -> Net {
        Net(Rc::new(RefCell::new(NetState {
            time,
            rng: fastrand::Rng::with_seed(seed),
            faults,
            sockets: HashMap::new(),
            next_sock: 1,
            backlog: (0..shards).map(|_| VecDeque::new()).collect(),
            server_news: (0..shards).map(|_| Vec::new()).collect(),
            client_news: Vec::new(),
        })))
    }

    /// A socket's state, for a failure report.
    pub fn describe(&self, sock: SockId) -> String {
        let n = self.0.borrow();
        match n.sockets.get(&sock) {
            None => format!("socket {sock} gone"),
            Some(s) => format!(
                "socket {sock}: server end {:?}, {} bytes up, {} down (of {}), client FIN {}, \
                 server FIN {}, closed {}, reset {}, in a backlog {}",
                s.owner,
                s.up.len(),
                s.down.len(),
                s.down_cap,
                s.client_fin,
                s.server_fin,
                s.server_closed,
                s.reset,
                n.backlog.iter().any(|b| b.contains(&sock))
            ),
        }
    }

    /// Changes the faults from now on.
    pub fn set_faults(&self, faults: NetFaults) {
        self.0.borrow_mut().faults = faults;
    }

    /// Client `client` connects to shard `shard` (as if the kernel's
    /// `SO_REUSEPORT` had picked it); the socket waits in its backlog.
    pub fn connect(&self, shard: usize, client: u32) -> SockId {
        let mut n = self.0.borrow_mut();
        let id = n.next_sock;
        n.next_sock += 1;
        let (lo, hi) = match n.faults.out_buffer_bytes {
            (0, 0) => (256 * 1024, 256 * 1024),
            range => range,
        };
        let down_cap = if hi > lo { n.rng.usize(lo..=hi) } else { lo };
        n.sockets.insert(
            id,
            Socket {
                client,
                owner: None,
                up: VecDeque::new(),
                down: VecDeque::new(),
                down_cap,
                client_fin: false,
                server_fin: false,
                server_closed: false,
                reset: false,
                stalled_until_ns: 0,
            },
        );
        n.backlog[shard].push_back(id);
        id
    }

    /// The client writes `bytes`; `false` when the connection is gone.
    pub fn write(&self, sock: SockId, bytes: &[u8]) -> bool {
        let mut n = self.0.borrow_mut();
        let Some(s) = n.sockets.get_mut(&sock) else {
            return false;
        };
        if s.reset || s.server_closed || s.client_fin {
            return !s.reset && !s.client_fin;
        }
        s.up.extend(bytes);
        let owner = s.owner;
        if let Some((shard, _)) = owner {
            n.server_news[shard].push(sock);
        }
        true
    }

    /// The client reads what the server sent (all of it, or a random part
    /// under the partial-I/O fault) into `out`.
    pub fn read(&self, sock: SockId, out: &mut Vec<u8>) -> ReadState {
        let mut n = self.0.borrow_mut();
        let partial = n.faults.partial_per_million;
        let cut = partial > 0 && n.rng.u32(..1_000_000) < partial;
        let roll = n.rng.usize(1..=4096);
        let Some(s) = n.sockets.get_mut(&sock) else {
            return ReadState::Reset;
        };
        if s.reset {
            return ReadState::Reset;
        }
        let take = if cut {
            s.down.len().min(roll)
        } else {
            s.down.len()
        };
        let was_full = s.down.len() >= s.down_cap;
        out.extend(s.down.drain(..take));
        let state = if s.down.is_empty() && (s.server_fin || s.server_closed) {
            ReadState::Eof
        } else {
            ReadState::Open
        };
        let more = !s.down.is_empty();
        let (owner, client) = (s.owner, s.client);
        if take > 0 && was_full {
            if let Some((shard, _)) = owner {
                n.server_news[shard].push(sock);
            }
        }
        if more {
            n.client_news.push((client, sock));
        }
        state
    }

    /// The client closes its end (FIN, and it reads no more).
    pub fn close(&self, sock: SockId) {
        let mut n = self.0.borrow_mut();
        let Some(s) = n.sockets.get_mut(&sock) else {
            return;
        };
        s.client_fin = true;
        match s.owner {
            Some((shard, _)) => n.server_news[shard].push(sock),
            None if s.server_closed => {
                n.sockets.remove(&sock);
            }
            None => {}
        }
    }

    /// Resets the connection: both ends see it fail.
    pub fn reset(&self, sock: SockId) {
        let mut n = self.0.borrow_mut();
        let Some(s) = n.sockets.get_mut(&sock) else {
            return;
        };
        s.reset = true;
        s.up.clear();
        s.down.clear();
        let (owner, client) = (s.owner, s.client);
        if let Some((shard, _)) = owner {
            n.server_news[shard].push(sock);
        }
        n.client_news.push((client, sock));
    }

    /// Stops the server end from reading `sock` for `for_` of simulated time.
    pub fn stall(&self, sock: SockId, for_: Duration) {
        let mut n = self.0.borrow_mut();
        let until = n.time.elapsed().as_nanos() as u64 + for_.as_nanos() as u64;
        if let Some(s) = n.sockets.get_mut(&sock) {
            s.stalled_until_ns = until;
        }
    }

    /// Moves the clients with news (bytes to read, FIN, reset) into `out`.
    pub fn take_client_news(&self, out: &mut Vec<(u32, SockId)>) {
        out.append(&mut self.0.borrow_mut().client_news);
    }

    /// Whether either side has news the other has not taken yet (bytes,
    /// FIN, reset, a connection to accept); `false` when the network is quiet.
    pub fn in_flight(&self) -> bool {
        let n = self.0.borrow();
        n.backlog.iter().any(|b| !b.is_empty())
            || n.server_news.iter().any(|b| !b.is_empty())
            || !n.client_news.is_empty()
    }

    /// True when no socket holds bytes one side wrote and the other has not
    /// read (a stalled socket's included). Looks at every socket.
    pub fn drained(&self) -> bool {
        self.0
            .borrow()
            .sockets
            .values()
            .all(|s| s.up.is_empty() && s.down.is_empty())
    }

    /// Drops every socket: the process died. Clients holding one see a reset.
    pub fn kill_all(&self) {
        let mut n = self.0.borrow_mut();
        let mut ids: Vec<(u32, SockId)> = n.sockets.iter().map(|(&id, s)| (s.client, id)).collect();
        // A fixed order: the map's own order is not reproducible.
        ids.sort_unstable();
        n.sockets.clear();
        for b in &mut n.backlog {
            b.clear();
        }
        for b in &mut n.server_news {
            b.clear();
        }
        n.client_news.extend(ids);
    }
}

/// A connection on its way from one shard to another: the socket's id.
#[derive(Debug)]
pub struct Detached {
    sock: SockId,
}

/// Wakes nothing: simulated shards are stepped, never asleep.
#[derive(Clone, Debug)]
pub struct WakeHandle;

impl WakeHandle {
    /// Does nothing (see the type).
    pub fn wake(&self) {}
}

struct Conn {
    sock: SockId,
    paused: bool,
    want_write: bool,
    /// `Closed` was handed out; no more completions.
    closed: bool,
}

/// One shard's simulated backend.
pub struct Io {
    shard: usize,
    net: Net,
    conns: Slab<Conn>,
    accepting: bool,
    pending: VecDeque<Completion>,
    ready: VecDeque<ConnId>,
    /// Connections with more input than one read took, served next wait.
    ready_next: Vec<ConnId>,
    /// Stalled connections, checked at every wait.
    stalled: Vec<ConnId>,
    accepted_this_round: usize,
}

impl Io {
    /// Shard `shard`'s backend on `net`.
    pub fn new(net: Net, shard: usize) -> Io {
        Io {
            shard,
            net,
            conns: Slab::new(),
            accepting: true,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            ready_next: Vec::new(),
            stalled: Vec::new(),
            accepted_this_round: 0,
        }
    }

    /// A handle that wakes nothing.
    pub fn wake_handle(&self) -> WakeHandle {
        WakeHandle
    }

    /// Never blocks: gathers what the clients did since the last wait.
    pub fn wait(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        self.accepted_this_round = 0;
        self.ready.extend(self.ready_next.drain(..));
        let stalled = std::mem::take(&mut self.stalled);
        self.ready.extend(stalled);
        let news = std::mem::take(&mut self.net.0.borrow_mut().server_news[self.shard]);
        let n = self.net.0.borrow();
        for sock in news {
            let Some(s) = n.sockets.get(&sock) else {
                continue;
            };
            let Some((shard, id)) = s.owner else { continue };
            if shard != self.shard {
                continue;
            }
            let Some(conn) = self.conns.get_mut(id.index()) else {
                continue;
            };
            if conn.want_write && (s.down.len() < s.down_cap || s.reset) {
                conn.want_write = false;
                self.pending.push_back(Completion::Writable(id));
            }
            self.ready.push_back(id);
        }
        Ok(())
    }

    /// The next completion, reading into `scratch`.
    pub fn next(&mut self, scratch: &mut [u8]) -> Option<Completion> {
        if let Some(c) = self.pending.pop_front() {
            return Some(c);
        }
        if let Some(c) = self.accept() {
            return Some(c);
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(id.index()) else {
                continue;
            };
            if conn.paused || conn.closed {
                continue;
            }
            let mut guard = self.net.0.borrow_mut();
            let n = &mut *guard;
            let now_ns = n.time.elapsed().as_nanos() as u64;
            let (partial, stall) = (n.faults.partial_per_million, n.faults.stall_per_million);
            let cut = partial > 0 && n.rng.u32(..1_000_000) < partial;
            let stall_now = stall > 0 && n.rng.u32(..1_000_000) < stall;
            let stall_ms_max = n.faults.stall_ms_max.max(1);
            let stall_ms = n.rng.u64(1..=stall_ms_max);
            let roll = n.rng.usize(1..=scratch.len());
            let Some(s) = n.sockets.get_mut(&conn.sock) else {
                conn.closed = true;
                return Some(Completion::Closed(id));
            };
            if s.reset {
                conn.closed = true;
                return Some(Completion::Closed(id));
            }
            if s.up.is_empty() {
                if s.client_fin {
                    conn.closed = true;
                    return Some(Completion::Closed(id));
                }
                continue;
            }
            if s.stalled_until_ns > now_ns {
                self.stalled.push(id);
                continue;
            }
            if stall_now {
                s.stalled_until_ns = now_ns + stall_ms * 1_000_000;
                self.stalled.push(id);
                continue;
            }
            let mut len = s.up.len().min(scratch.len());
            if cut {
                len = len.min(roll);
            }
            for (dst, b) in scratch.iter_mut().zip(s.up.drain(..len)) {
                *dst = b;
            }
            if !s.up.is_empty() || s.client_fin {
                self.ready_next.push(id);
            }
            return Some(Completion::Recv(id, len));
        }
        None
    }

    fn accept(&mut self) -> Option<Completion> {
        if !self.accepting || self.accepted_this_round >= ACCEPT_BATCH_MAX {
            return None;
        }
        let sock = self.net.0.borrow_mut().backlog[self.shard].pop_front()?;
        self.accepted_this_round += 1;
        let id = self.insert(sock);
        Some(Completion::Accepted(id, Listener::Plain))
    }

    fn insert(&mut self, sock: SockId) -> ConnId {
        let key = self.conns.insert(Conn {
            sock,
            paused: false,
            want_write: false,
            closed: false,
        });
        let id = ConnId(key as u32);
        if let Some(s) = self.net.0.borrow_mut().sockets.get_mut(&sock) {
            s.owner = Some((self.shard, id));
        }
        self.ready.push_back(id);
        id
    }

    /// Takes what fits in the socket's output buffer (a random part of it
    /// under the partial-I/O fault).
    pub fn send(&mut self, id: ConnId, bytes: &[u8]) -> io::Result<usize> {
        let Some(conn) = self.conns.get_mut(id.index()) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let mut n = self.net.0.borrow_mut();
        let partial = n.faults.partial_per_million;
        let cut = partial > 0 && n.rng.u32(..1_000_000) < partial;
        let roll = n.rng.usize(1..=bytes.len().max(1));
        let Some(s) = n.sockets.get_mut(&conn.sock) else {
            return Err(io::ErrorKind::ConnectionReset.into());
        };
        if s.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if s.client_fin {
            // The client is gone: what it would not read is dropped.
            return Ok(bytes.len());
        }
        let mut len = bytes.len().min(s.down_cap.saturating_sub(s.down.len()));
        if cut {
            len = len.min(roll);
        }
        s.down.extend(&bytes[..len]);
        let client = s.client;
        if len < bytes.len() {
            conn.want_write = true;
            if s.down.len() < s.down_cap {
                // Cut short with room left: writable again at the next wait.
                n.server_news[self.shard].push(conn.sock);
            }
        }
        if len > 0 {
            n.client_news.push((client, conn.sock));
        }
        Ok(len)
    }

    /// Stops or resumes handing out the connection's bytes.
    pub fn set_recv(&mut self, id: ConnId, on: bool) {
        if let Some(conn) = self.conns.get_mut(id.index()) {
            conn.paused = !on;
            if on {
                self.ready.push_back(id);
            }
        }
    }

    /// Nothing to arm.
    pub fn established(&mut self, _conn: ConnId) {}

    /// Simulated clients have no source address: the per-address limits
    /// (tested over real sockets in tests/hardening.rs) skip them.
    pub fn peer_ip(&mut self, _conn: ConnId) -> Option<std::net::IpAddr> {
        None
    }

    /// The client reads EOF after the bytes already sent.
    pub fn shutdown_write(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id.index()) else {
            return;
        };
        let mut n = self.net.0.borrow_mut();
        if let Some(s) = n.sockets.get_mut(&conn.sock) {
            s.server_fin = true;
            let client = s.client;
            n.client_news.push((client, conn.sock));
        }
    }

    /// Releases the connection; the client sees EOF (after what was sent).
    pub fn close(&mut self, id: ConnId) {
        if !self.conns.contains(id.index()) {
            return;
        }
        let conn = self.conns.remove(id.index());
        let mut n = self.net.0.borrow_mut();
        let Some(s) = n.sockets.get_mut(&conn.sock) else {
            return;
        };
        s.server_closed = true;
        s.owner = None;
        s.up.clear();
        let (client, gone) = (s.client, s.client_fin);
        if gone {
            n.sockets.remove(&conn.sock);
        } else {
            n.client_news.push((client, conn.sock));
        }
    }

    /// Takes the connection out to hand it to another shard.
    pub fn detach(&mut self, id: ConnId) -> io::Result<Detached> {
        let conn = self.conns.remove(id.index());
        if let Some(s) = self.net.0.borrow_mut().sockets.get_mut(&conn.sock) {
            s.owner = None;
        }
        Ok(Detached { sock: conn.sock })
    }

    /// Adopts a connection another shard detached.
    pub fn attach(&mut self, detached: Detached) -> io::Result<ConnId> {
        Ok(self.insert(detached.sock))
    }

    /// Accepts no more connections.
    pub fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    /// Open connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }
}
