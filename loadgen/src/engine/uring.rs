//! The io_uring engine (Linux): direct descriptors, so one process holds far
//! more connections than its open-files limit.
//!
//! Connection slot `conn` lives in ring `conn / slots_per_ring`, fixed-file
//! slot `conn % slots_per_ring`: the slot allocator is the arithmetic, and no
//! ring's table ever fills by surprise (a full table makes the kernel drop
//! the connection, BOX-FACTS). A connect is one linked chain:
//!
//! ```text
//! SOCKET(slot) -> SETSOCKOPT(IP_BIND_ADDRESS_NO_PORT) -> SETSOCKOPT(SO_LINGER {1,0})
//!   -> SETSOCKOPT(TCP_NODELAY) -> BIND(source) -> CONNECT(server) -> LINK_TIMEOUT
//! ```
//!
//! with CQE_SKIP_SUCCESS on all but CONNECT, so a good connect costs one
//! completion. Receives are multishot from a provided-buffer ring per ring;
//! bytes are copied to the caller's scratch and the buffer goes back to the
//! kernel in the same pass. One send is in flight per connection (two sends on
//! one socket may complete out of order); later bytes wait in a per-connection
//! buffer that exists only while there are such bytes.
//!
//! One eventfd is registered on every ring of the thread, so the thread sleeps
//! in one `ppoll` however many rings it has.

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;
use socket2::SockAddr;

use super::{Engine, EngineConfig, EngineStats, Event};

mod ring;

pub use ring::probe;
pub(crate) use ring::{EventFd, Ring};

// Operation kinds, in the top byte of user_data.
const K_SOCKET: u8 = 1;
const K_OPT: u8 = 2;
const K_BIND: u8 = 3;
const K_CONNECT: u8 = 4;
const K_TIMEOUT: u8 = 5;
const K_RECV: u8 = 6;
const K_SEND: u8 = 7;
const K_CANCEL: u8 = 8;
const K_CLOSE: u8 = 9;
/// Used by the sink: a multishot accept (low bits: listener index).
pub(crate) const K_ACCEPT: u8 = 10;

/// `kind << 56 | gen << 32 | conn`.
pub(crate) fn ud(kind: u8, gen: u16, conn: u32) -> u64 {
    (kind as u64) << 56 | (gen as u64) << 32 | conn as u64
}

/// The parts of a user_data built by [`ud`].
pub(crate) fn ud_parts(u: u64) -> (u8, u16, u32) {
    ((u >> 56) as u8, (u >> 32) as u16, u as u32)
}

/// Most entries of one linked chain (a connect is 7).
const CHAIN_MAX: usize = 8;
/// Chains a ring may hold back before `open` reports WouldBlock.
const BACKLOG_OPENS_MAX: usize = 64;
/// Completions handled per ring per reap pass; bounds one pass's work.
const REAP_BATCH: usize = 4096;
/// Reap passes per `poll` that look for flushed overflow completions.
const OVERFLOW_PASSES_MAX: usize = 4;
/// Spare send buffers kept for reuse.
const FREE_VECS_MAX: usize = 1024;
/// Send buffers larger than this are not kept for reuse.
const FREE_VEC_BYTES_MAX: usize = 4096;

/// Connection states.
const S_IDLE: u8 = 0;
const S_CONNECTING: u8 = 1;
const S_OPEN: u8 = 2;
/// Closing after a user `close`; ends in `Released`.
const S_CLOSING: u8 = 3;
/// Closing the slot after a failed connect; ends in `ConnectFailed`.
const S_FAILING: u8 = 4;

/// Flag: a multishot receive is armed.
const F_RECV: u8 = 1 << 0;
/// Flag: a send is in flight.
const F_SEND: u8 = 1 << 1;
/// Flag: `close` was asked while connecting.
const F_CLOSE_PENDING: u8 = 1 << 2;
/// Flag: `PeerClosed` was reported.
const F_REPORTED: u8 = 1 << 3;

/// Per-connection state: 16 bytes.
struct UConn {
    /// Bytes waiting behind the in-flight send; allocated only while non-empty.
    // Boxed on purpose: 8 bytes per connection while empty, not 24.
    #[allow(clippy::box_collection)]
    out: Option<Box<Vec<u8>>>,
    /// Bumped on every open and close; completions of older ops are ignored.
    gen: u16,
    state: u8,
    flags: u8,
    /// Slab index of the in-flight send (valid while `F_SEND`).
    send_idx: u32,
}

/// An in-flight send's buffer, owned here until its completion arrives (even
/// if the connection was closed meanwhile).
struct SendBuf {
    conn: u32,
    gen: u16,
    buf: Vec<u8>,
    /// Bytes already sent, `0..=buf.len()`.
    off: usize,
}

/// Socket option values; boxed so their addresses stay put while SETSOCKOPT
/// operations are in flight.
struct Consts {
    one: libc::c_int,
    linger: libc::linger,
}

/// The io_uring engine of one worker thread.
pub struct UringEngine {
    cfg: EngineConfig,
    rings: Vec<Ring>,
    conns: Vec<UConn>,
    sends: Slab<SendBuf>,
    free_vecs: Vec<Vec<u8>>,
    sources: Box<[SockAddr]>,
    /// One box per server: a connect chain waiting in a ring's backlog
    /// points into it, so an address must not move when servers are added
    /// ([`Engine::server_index`]).
    #[allow(clippy::vec_box)]
    servers: Vec<Box<SockAddr>>,
    /// Servers given in the config; the rest were added.
    servers_configured: usize,
    consts: Box<Consts>,
    timeout: Box<types::Timespec>,
    /// The errno of the first failed step of a connecting or failing slot.
    step_errno: HashMap<u32, i32>,
    /// Slots whose multishot receive ended and must be re-armed.
    rearm: Vec<u32>,
    efd: EventFd,
    cqes: Vec<(u64, i32, u32)>,
    stats: EngineStats,
}

impl UringEngine {
    /// Builds the rings: `ceil(conns / slots_per_ring)` of them.
    pub fn new(cfg: EngineConfig) -> io::Result<UringEngine> {
        assert!(cfg.slots_per_ring > 0);
        // A connect chain must fit in the submission queue in one piece.
        assert!(
            cfg.sq_entries as usize >= CHAIN_MAX,
            "sq_entries below {CHAIN_MAX}"
        );
        let rings_n = cfg.conns.div_ceil(cfg.slots_per_ring).max(1);
        let efd = EventFd::new()?;
        let mut rings = Vec::with_capacity(rings_n as usize);
        for r in 0..rings_n {
            let slots = cfg
                .slots_per_ring
                .min(cfg.conns.saturating_sub(r * cfg.slots_per_ring))
                .max(1);
            let bufs = cfg.recv.then_some((cfg.bufs_per_ring, cfg.buf_bytes));
            rings.push(Ring::new(cfg.sq_entries, slots, &efd, bufs)?);
        }
        let sources: Box<[SockAddr]> = cfg
            .sources
            .iter()
            .map(|ip| SockAddr::from(std::net::SocketAddr::new(*ip, 0)))
            .collect();
        let servers: Vec<Box<SockAddr>> = cfg
            .servers
            .iter()
            .map(|a| Box::new(SockAddr::from(*a)))
            .collect();
        let timeout = Box::new(
            types::Timespec::new()
                .sec(cfg.connect_timeout.as_secs())
                .nsec(cfg.connect_timeout.subsec_nanos()),
        );
        let conns = (0..cfg.conns)
            .map(|_| UConn {
                out: None,
                gen: 0,
                state: S_IDLE,
                flags: 0,
                send_idx: 0,
            })
            .collect();
        Ok(UringEngine {
            stats: EngineStats {
                rings: rings.len() as u64,
                ..EngineStats::default()
            },
            cfg,
            rings,
            conns,
            sends: Slab::new(),
            free_vecs: Vec::new(),
            sources,
            servers_configured: servers.len(),
            servers,
            consts: Box::new(Consts {
                one: 1,
                linger: libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            }),
            timeout,
            step_errno: HashMap::new(),
            rearm: Vec::new(),
            efd,
            cqes: Vec::new(),
        })
    }

    fn ring_slot(&self, conn: u32) -> (usize, u32) {
        (
            (conn / self.cfg.slots_per_ring) as usize,
            conn % self.cfg.slots_per_ring,
        )
    }

    fn arm_recv(&mut self, conn: u32) {
        let (r, slot) = self.ring_slot(conn);
        let c = &mut self.conns[conn as usize];
        debug_assert_eq!(c.state, S_OPEN);
        c.flags |= F_RECV;
        let e = opcode::RecvMulti::new(types::Fixed(slot), 0)
            .build()
            .user_data(ud(K_RECV, c.gen, conn));
        self.rings[r].push(&[e]);
    }

    fn submit_send(&mut self, conn: u32, buf: Vec<u8>) {
        let (r, slot) = self.ring_slot(conn);
        let c = &mut self.conns[conn as usize];
        c.flags |= F_SEND;
        let idx = self.sends.insert(SendBuf {
            conn,
            gen: c.gen,
            buf,
            off: 0,
        });
        c.send_idx = idx as u32;
        self.push_send(r, slot, idx);
    }

    fn push_send(&mut self, r: usize, slot: u32, idx: usize) {
        let sb = &self.sends[idx];
        let rest = &sb.buf[sb.off..];
        let e = opcode::Send::new(types::Fixed(slot), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(K_SEND, 0, idx as u32));
        self.rings[r].push(&[e]);
    }

    /// Starts closing an open slot: cancel its receive and send, then close.
    fn start_close(&mut self, conn: u32) {
        let (r, slot) = self.ring_slot(conn);
        let c = &mut self.conns[conn as usize];
        // Cancel by user_data (a hash lookup), not by file: cancelling by
        // file walks every pending request of the ring, which made closing
        // 100k connections take 20 s of kernel time.
        // HARDLINK: the close runs even when a cancel finds nothing (-ENOENT).
        let cancel = |target: u64| {
            opcode::AsyncCancel::new(target)
                .build()
                .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
                .user_data(ud(K_CANCEL, 0, conn))
        };
        let mut chain: [Option<squeue::Entry>; 3] = Default::default();
        let mut n = 0;
        if c.flags & F_RECV != 0 {
            // A multishot receive holds a reference to the socket: closing
            // the slot alone would not close the socket.
            chain[n] = Some(cancel(ud(K_RECV, c.gen, conn)));
            n += 1;
        }
        if c.flags & F_SEND != 0 {
            // A send blocked on a peer that does not read would do the same.
            chain[n] = Some(cancel(ud(K_SEND, 0, c.send_idx)));
            n += 1;
        }
        c.gen = c.gen.wrapping_add(1);
        c.state = S_CLOSING;
        c.flags = 0;
        c.out = None;
        chain[n] = Some(
            opcode::Close::new(types::Fixed(slot))
                .build()
                .user_data(ud(K_CLOSE, c.gen, conn)),
        );
        n += 1;
        let entries: Vec<squeue::Entry> = chain[..n]
            .iter_mut()
            .map(|e| e.take().expect("filled above"))
            .collect();
        self.rings[r].push(&entries);
    }

    fn take_vec(&mut self) -> Vec<u8> {
        self.free_vecs.pop().unwrap_or_default()
    }

    fn give_vec(&mut self, mut v: Vec<u8>) {
        if self.free_vecs.len() < FREE_VECS_MAX && v.capacity() <= FREE_VEC_BYTES_MAX {
            v.clear();
            self.free_vecs.push(v);
        }
    }

    fn handle(
        &mut self,
        ring: usize,
        (u, res, flags): (u64, i32, u32),
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) {
        let (kind, gen, conn) = ud_parts(u);
        if kind == K_SEND {
            self.handle_send(conn as usize, res, events);
            return;
        }
        if kind == K_RECV {
            // The buffer goes back whatever became of the connection.
            if let Some(bid) = cqueue::buffer_select(flags) {
                let bufs = self.rings[ring]
                    .bufs
                    .as_mut()
                    .expect("recv implies buffers");
                let c = &self.conns[conn as usize];
                if res > 0 && c.gen == gen && c.state == S_OPEN {
                    let start = scratch.len();
                    scratch.extend_from_slice(bufs.buf(bid, res as usize));
                    events.push(Event::Recv(conn, start, res as usize));
                }
                bufs.recycle(bid);
            }
        }
        let Some(c) = self.conns.get_mut(conn as usize) else {
            debug_assert!(false, "completion for unknown slot {conn}");
            return;
        };
        if c.gen != gen {
            return; // An operation of an earlier connection in this slot.
        }
        match kind {
            K_SOCKET | K_OPT | K_BIND => {
                // Only failures arrive (CQE_SKIP_SUCCESS). A failed step with
                // CQE_SKIP_SUCCESS also suppresses the completions of the
                // links it cancels (CONNECT, LINK_TIMEOUT), so the chain ends
                // here. ECANCELED would mean an earlier link failed.
                if res < 0 && res != -libc::ECANCELED && c.state == S_CONNECTING {
                    self.fail_connect(conn, gen, -res);
                }
            }
            K_TIMEOUT | K_CANCEL => {
                // Link timeout: -ETIME if it fired (the connect then completes
                // with -ECANCELED), -ECANCELED if the connect won. Cancel:
                // -ENOENT when nothing was armed. Neither needs action.
            }
            K_CONNECT => {
                if c.state != S_CONNECTING {
                    return; // The chain already failed at an earlier step.
                }
                if res == 0 {
                    if c.flags & F_CLOSE_PENDING != 0 {
                        self.start_close(conn);
                    } else {
                        c.state = S_OPEN;
                        c.flags = 0;
                        if self.cfg.recv {
                            self.arm_recv(conn);
                        }
                        events.push(Event::Connected(conn));
                    }
                } else {
                    // -ECANCELED: the link timeout fired.
                    let errno = if res == -libc::ECANCELED {
                        libc::ETIMEDOUT
                    } else {
                        -res
                    };
                    self.fail_connect(conn, gen, errno);
                }
            }
            K_CLOSE => {
                // -EBADF: the SOCKET step had failed and the slot was empty.
                let was = c.state;
                c.state = S_IDLE;
                c.flags = 0;
                match was {
                    S_FAILING => {
                        let errno = self.step_errno.remove(&conn).unwrap_or(libc::EIO);
                        events.push(Event::ConnectFailed(conn, errno));
                    }
                    S_CLOSING => events.push(Event::Released(conn)),
                    other => debug_assert!(false, "close completed in state {other}"),
                }
            }
            K_RECV => {
                if cqueue::more(flags) || c.state != S_OPEN {
                    return;
                }
                c.flags &= !F_RECV;
                if res == -libc::ENOBUFS {
                    // Out of provided buffers: the data waits in the socket;
                    // re-arm once this pass has recycled buffers.
                    self.stats.recv_enobufs += 1;
                    self.rearm.push(conn);
                } else if res > 0 {
                    self.rearm.push(conn);
                } else if c.flags & F_REPORTED == 0 {
                    c.flags |= F_REPORTED;
                    events.push(Event::PeerClosed(conn, -res));
                }
            }
            _ => debug_assert!(false, "unknown completion kind {kind}"),
        }
    }

    /// The connect chain of `conn` failed with `errno`: close the slot (the
    /// SOCKET step may have filled it), then report `ConnectFailed`.
    fn fail_connect(&mut self, conn: u32, gen: u16, errno: i32) {
        self.step_errno.insert(conn, errno);
        self.conns[conn as usize].state = S_FAILING;
        let (r, slot) = self.ring_slot(conn);
        let close = opcode::Close::new(types::Fixed(slot))
            .build()
            .user_data(ud(K_CLOSE, gen, conn));
        self.rings[r].push(&[close]);
    }

    fn handle_send(&mut self, idx: usize, res: i32, events: &mut Vec<Event>) {
        let Some(sb) = self.sends.get_mut(idx) else {
            debug_assert!(false, "send completion for unknown buffer {idx}");
            return;
        };
        let conn = sb.conn;
        let c = &mut self.conns[conn as usize];
        let live = c.gen == sb.gen && c.state == S_OPEN;
        if res >= 0 {
            sb.off += res as usize;
        }
        let retry = live
            && ((res >= 0 && sb.off < sb.buf.len()) || res == -libc::EAGAIN || res == -libc::EINTR);
        if retry {
            self.stats.send_retries += 1;
            let (r, slot) = self.ring_slot(conn);
            self.push_send(r, slot, idx);
            return;
        }
        let sb = self.sends.remove(idx);
        self.give_vec(sb.buf);
        if !live {
            return;
        }
        let c = &mut self.conns[conn as usize];
        c.flags &= !F_SEND;
        if res < 0 {
            if c.flags & F_REPORTED == 0 {
                c.flags |= F_REPORTED;
                events.push(Event::PeerClosed(conn, -res));
            }
            return;
        }
        if let Some(out) = c.out.take() {
            self.submit_send(conn, *out);
        }
    }

    fn reap_all(&mut self, events: &mut Vec<Event>, scratch: &mut Vec<u8>) -> usize {
        let mut handled = 0;
        for r in 0..self.rings.len() {
            for _ in 0..OVERFLOW_PASSES_MAX {
                let mut cqes = std::mem::take(&mut self.cqes);
                cqes.clear();
                self.rings[r].reap(&mut cqes, REAP_BATCH, &mut self.stats.cq_overflow_flushes);
                let n = cqes.len();
                for &cqe in &cqes {
                    self.handle(r, cqe, events, scratch);
                }
                self.cqes = cqes;
                handled += n;
                if let Some(b) = &self.rings[r].bufs {
                    b.publish();
                }
                if n < REAP_BATCH && !self.rings[r].ring.submission().cq_overflow() {
                    break;
                }
            }
        }
        let rearm = std::mem::take(&mut self.rearm);
        for &conn in &rearm {
            let c = &self.conns[conn as usize];
            if c.state == S_OPEN && c.flags & F_RECV == 0 {
                self.stats.recv_rearms += 1;
                self.arm_recv(conn);
            }
        }
        self.rearm = rearm;
        self.rearm.clear();
        handled
    }

    fn flush_all(&mut self) -> io::Result<()> {
        for ring in &mut self.rings {
            if ring.flush()? {
                self.stats.sq_full += 1;
            }
        }
        Ok(())
    }
}

impl Engine for UringEngine {
    fn open(&mut self, conn: u32, src: usize, dst: usize) -> io::Result<()> {
        let (r, slot) = self.ring_slot(conn);
        if self.rings[r].backlog_len() >= BACKLOG_OPENS_MAX {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let c = &mut self.conns[conn as usize];
        assert_eq!(c.state, S_IDLE, "open of a busy slot {conn}");
        c.gen = c.gen.wrapping_add(1);
        c.state = S_CONNECTING;
        c.flags = 0;
        let gen = c.gen;
        let (s, d) = (&self.sources[src], &self.servers[dst]);
        let fixed = types::Fixed(slot);
        let link = squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS;
        let one = (&self.consts.one as *const libc::c_int).cast();
        let int_len = std::mem::size_of::<libc::c_int>() as u32;
        let dest = types::DestinationSlot::try_from_slot_target(slot).expect("slot in range");
        let mut chain: [Option<squeue::Entry>; CHAIN_MAX] = Default::default();
        chain[0] = Some(
            opcode::Socket::new(
                i32::from(d.domain()),
                // No SOCK_CLOEXEC: direct descriptors refuse it (-EINVAL).
                libc::SOCK_STREAM,
                libc::IPPROTO_TCP,
            )
            .file_index(Some(dest))
            .build()
            .flags(link)
            .user_data(ud(K_SOCKET, gen, conn)),
        );
        // Lets many connections share a source port as long as the 4-tuple
        // differs: the port is picked at connect time, not at bind.
        chain[1] = Some(
            opcode::SetSockOpt::new(
                fixed,
                libc::SOL_IP as u32,
                libc::IP_BIND_ADDRESS_NO_PORT as u32,
                one,
                int_len,
            )
            .build()
            .flags(link)
            .user_data(ud(K_OPT, gen, conn)),
        );
        // Close = reset: a million closes leave no TIME_WAIT behind.
        chain[2] = Some(
            opcode::SetSockOpt::new(
                fixed,
                libc::SOL_SOCKET as u32,
                libc::SO_LINGER as u32,
                (&self.consts.linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            )
            .build()
            .flags(link)
            .user_data(ud(K_OPT, gen, conn)),
        );
        // Small frames go out at once (latency is what we measure).
        chain[3] = Some(
            opcode::SetSockOpt::new(
                fixed,
                libc::IPPROTO_TCP as u32,
                libc::TCP_NODELAY as u32,
                one,
                int_len,
            )
            .build()
            .flags(link)
            .user_data(ud(K_OPT, gen, conn)),
        );
        chain[4] = Some(
            opcode::Bind::new(fixed, s.as_ptr(), s.len())
                .build()
                .flags(link)
                .user_data(ud(K_BIND, gen, conn)),
        );
        let with_timeout = !self.cfg.connect_timeout.is_zero();
        let connect = opcode::Connect::new(fixed, d.as_ptr(), d.len())
            .build()
            .user_data(ud(K_CONNECT, gen, conn));
        chain[5] = Some(if with_timeout {
            connect.flags(squeue::Flags::IO_LINK)
        } else {
            connect
        });
        if with_timeout {
            chain[6] = Some(
                opcode::LinkTimeout::new(&*self.timeout)
                    .build()
                    .user_data(ud(K_TIMEOUT, gen, conn)),
            );
        }
        let n = if with_timeout { 7 } else { 6 };
        let entries: Vec<squeue::Entry> =
            chain[..n].iter_mut().map(|e| e.take().unwrap()).collect();
        self.rings[r].push(&entries);
        Ok(())
    }

    fn send(&mut self, conn: u32, bytes: &[u8]) {
        let c = &mut self.conns[conn as usize];
        if c.state != S_OPEN || c.flags & F_REPORTED != 0 || bytes.is_empty() {
            return;
        }
        if c.flags & F_SEND != 0 {
            c.out
                .get_or_insert_with(Default::default)
                .extend_from_slice(bytes);
            return;
        }
        let mut v = self.take_vec();
        v.extend_from_slice(bytes);
        self.submit_send(conn, v);
    }

    fn close(&mut self, conn: u32) {
        let c = &mut self.conns[conn as usize];
        match c.state {
            S_CONNECTING => c.flags |= F_CLOSE_PENDING,
            S_OPEN => self.start_close(conn),
            _ => {}
        }
    }

    fn poll(
        &mut self,
        timeout: Duration,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.flush_all()?;
        self.efd.drain();
        let mut handled = self.reap_all(events, scratch);
        if handled == 0 && !timeout.is_zero() {
            self.efd.wait(timeout);
            self.efd.drain();
            handled = self.reap_all(events, scratch);
        }
        if handled > 0 {
            self.flush_all()?;
        }
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        self.stats
    }

    fn server_index(&mut self, addr: std::net::SocketAddr) -> Option<usize> {
        let i = super::index_or_add(&mut self.cfg.servers, self.servers_configured, addr)?;
        if i == self.servers.len() {
            self.servers.push(Box::new(SockAddr::from(addr)));
        }
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for (k, g, c) in [
            (K_SOCKET, 0, 0),
            (K_CLOSE, u16::MAX, u32::MAX),
            (K_RECV, 7, 123_456),
        ] {
            assert_eq!(ud_parts(ud(k, g, c)), (k, g, c));
        }
    }

    #[test]
    fn uconn_is_small() {
        assert_eq!(std::mem::size_of::<UConn>(), 16);
    }
}
