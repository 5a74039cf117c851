//! The portable engine: mio (epoll on Linux, kqueue on FreeBSD) and ordinary
//! non-blocking sockets. Readiness is turned into the completion-shaped
//! contract of [`Engine`]: the engine reads and writes itself and retries
//! `WouldBlock`. Each connection costs a file descriptor, so one process holds
//! at most its open-files limit.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::{Engine, EngineConfig, EngineStats, Event};

/// Readiness events handled per `poll` call.
const EVENTS_MAX: usize = 1024;
/// Bytes read per `read` call.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes read from one connection per readiness event before moving on (the
/// rest is read on the next `poll`: mio registrations here are level-aware
/// because we re-check `pending_read`).
const READ_PER_EVENT_MAX: usize = 256 * 1024;

const S_IDLE: u8 = 0;
const S_CONNECTING: u8 = 1;
const S_OPEN: u8 = 2;

/// Per-connection state.
struct PConn {
    stream: Option<TcpStream>,
    /// Bytes not yet taken by the socket; allocated only while non-empty.
    // Boxed on purpose: 8 bytes per connection while empty, not 24.
    #[allow(clippy::box_collection)]
    out: Option<Box<Vec<u8>>>,
    state: u8,
    /// `PeerClosed` was reported.
    reported: bool,
    /// Generation, to match connect deadlines to the right connection.
    gen: u16,
}

/// The poll engine of one worker thread.
pub struct PollEngine {
    cfg: EngineConfig,
    poll: Poll,
    events: Events,
    conns: Vec<PConn>,
    /// Events produced outside readiness (close, immediate connect failure).
    ready: VecDeque<Event>,
    /// Connect deadlines in open order (all share one timeout, so in time order).
    deadlines: VecDeque<(Instant, u32, u16)>,
    /// Connections with unread bytes left after `READ_PER_EVENT_MAX`.
    pending_read: Vec<u32>,
    /// Servers given in the config; the rest of `cfg.servers` were added
    /// by [`Engine::server_index`].
    servers_configured: usize,
    stats: EngineStats,
}

impl PollEngine {
    /// An engine for `cfg.conns` slots.
    pub fn new(cfg: EngineConfig) -> io::Result<PollEngine> {
        let servers_configured = cfg.servers.len();
        let conns = (0..cfg.conns)
            .map(|_| PConn {
                stream: None,
                out: None,
                state: S_IDLE,
                reported: false,
                gen: 0,
            })
            .collect();
        Ok(PollEngine {
            cfg,
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS_MAX),
            conns,
            ready: VecDeque::new(),
            deadlines: VecDeque::new(),
            pending_read: Vec::new(),
            servers_configured,
            stats: EngineStats {
                rings: 1,
                ..EngineStats::default()
            },
        })
    }

    fn connect_socket(&self, src: usize, dst: usize) -> io::Result<TcpStream> {
        let server: SocketAddr = self.cfg.servers[dst];
        let socket = Socket::new(
            Domain::for_address(server),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        set_bind_no_port(&socket)?;
        socket.bind(&SocketAddr::new(self.cfg.sources[src], 0).into())?;
        match socket.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(StdTcpStream::from(socket)))
    }

    fn report_closed(&mut self, conn: u32, errno: i32) {
        let c = &mut self.conns[conn as usize];
        if !c.reported {
            c.reported = true;
            self.ready.push_back(Event::PeerClosed(conn, errno));
        }
    }

    /// Drops the socket with a reset (SO_LINGER {1, 0}).
    fn drop_socket(&mut self, conn: u32) {
        let c = &mut self.conns[conn as usize];
        if let Some(mut s) = c.stream.take() {
            let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.out = None;
        c.state = S_IDLE;
        c.reported = false;
    }

    fn flush_out(&mut self, conn: u32) {
        let c = &mut self.conns[conn as usize];
        let (Some(stream), Some(out)) = (c.stream.as_mut(), c.out.as_mut()) else {
            return;
        };
        let mut sent = 0;
        let mut err = None;
        while sent < out.len() {
            match stream.write(&out[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    err = Some(e.raw_os_error().unwrap_or(libc::EIO));
                    break;
                }
            }
        }
        out.drain(..sent);
        if out.is_empty() {
            c.out = None;
        }
        if let Some(errno) = err {
            self.report_closed(conn, errno);
        }
    }

    /// Reads what is available, up to `READ_PER_EVENT_MAX`.
    fn read_some(&mut self, conn: u32, events: &mut Vec<Event>, scratch: &mut Vec<u8>) {
        let mut total = 0;
        loop {
            let c = &mut self.conns[conn as usize];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            if total >= READ_PER_EVENT_MAX {
                self.pending_read.push(conn);
                return;
            }
            let start = scratch.len();
            scratch.resize(start + READ_CHUNK, 0);
            let r = stream.read(&mut scratch[start..]);
            match r {
                Ok(0) => {
                    scratch.truncate(start);
                    self.report_closed(conn, 0);
                    return;
                }
                Ok(n) => {
                    scratch.truncate(start + n);
                    events.push(Event::Recv(conn, start, n));
                    total += n;
                }
                Err(e) => {
                    scratch.truncate(start);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return,
                        io::ErrorKind::Interrupted => {}
                        _ => {
                            self.report_closed(conn, e.raw_os_error().unwrap_or(libc::EIO));
                            return;
                        }
                    }
                }
            }
        }
    }

    fn on_ready(
        &mut self,
        conn: u32,
        readable: bool,
        writable: bool,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) {
        let Some(c) = self.conns.get_mut(conn as usize) else {
            return;
        };
        if c.state == S_CONNECTING {
            let stream = c.stream.as_ref().expect("connecting slot has a socket");
            match stream.take_error() {
                Ok(Some(e)) | Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    self.drop_socket(conn);
                    self.ready.push_back(Event::ConnectFailed(conn, errno));
                    return;
                }
                Ok(None) => {}
            }
            match stream.peer_addr() {
                Ok(_) => {
                    c.state = S_OPEN;
                    events.push(Event::Connected(conn));
                }
                // Not connected yet (spurious wake-up).
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    self.drop_socket(conn);
                    self.ready.push_back(Event::ConnectFailed(conn, errno));
                    return;
                }
            }
        }
        if self.conns[conn as usize].state != S_OPEN {
            return;
        }
        if writable {
            self.flush_out(conn);
        }
        if readable {
            self.read_some(conn, events, scratch);
        }
    }
}

#[cfg(target_os = "linux")]
fn set_bind_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: valid socket, option value is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_bind_no_port(_socket: &Socket) -> io::Result<()> {
    // No IP_BIND_ADDRESS_NO_PORT: bind picks the port; spread over more
    // source addresses to stay within the port range.
    Ok(())
}

impl Engine for PollEngine {
    fn open(&mut self, conn: u32, src: usize, dst: usize) -> io::Result<()> {
        assert_eq!(
            self.conns[conn as usize].state, S_IDLE,
            "open of a busy slot {conn}"
        );
        let mut stream = match self.connect_socket(src, dst) {
            Ok(s) => s,
            Err(e) => {
                self.ready.push_back(Event::ConnectFailed(
                    conn,
                    e.raw_os_error().unwrap_or(libc::EIO),
                ));
                return Ok(());
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(conn as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.ready.push_back(Event::ConnectFailed(
                conn,
                e.raw_os_error().unwrap_or(libc::EIO),
            ));
            return Ok(());
        }
        let c = &mut self.conns[conn as usize];
        c.stream = Some(stream);
        c.state = S_CONNECTING;
        c.reported = false;
        c.gen = c.gen.wrapping_add(1);
        if !self.cfg.connect_timeout.is_zero() {
            self.deadlines
                .push_back((Instant::now() + self.cfg.connect_timeout, conn, c.gen));
        }
        Ok(())
    }

    fn send(&mut self, conn: u32, bytes: &[u8]) {
        let c = &mut self.conns[conn as usize];
        if c.state != S_OPEN || c.reported || bytes.is_empty() {
            return;
        }
        c.out
            .get_or_insert_with(Default::default)
            .extend_from_slice(bytes);
        self.flush_out(conn);
    }

    fn close(&mut self, conn: u32) {
        if self.conns[conn as usize].state == S_IDLE {
            return;
        }
        self.drop_socket(conn);
        self.ready.push_back(Event::Released(conn));
    }

    fn poll(
        &mut self,
        timeout: Duration,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let now = Instant::now();
        while let Some(&(at, conn, gen)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let c = &self.conns[conn as usize];
            if c.state == S_CONNECTING && c.gen == gen {
                self.drop_socket(conn);
                self.ready
                    .push_back(Event::ConnectFailed(conn, libc::ETIMEDOUT));
            }
        }
        for conn in std::mem::take(&mut self.pending_read) {
            self.read_some(conn, events, scratch);
        }
        let busy = !self.ready.is_empty() || !events.is_empty() || !self.pending_read.is_empty();
        let wait = if busy { Duration::ZERO } else { timeout };
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let ready: Vec<(u32, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token().0 as u32,
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable() || e.is_error(),
                )
            })
            .collect();
        for (conn, r, w) in ready {
            self.on_ready(conn, r, w, events, scratch);
        }
        events.extend(self.ready.drain(..));
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        self.stats
    }

    fn server_index(&mut self, addr: SocketAddr) -> Option<usize> {
        super::index_or_add(&mut self.cfg.servers, self.servers_configured, addr)
    }
}
