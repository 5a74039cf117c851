//! Readiness backend: epoll on Linux, kqueue on FreeBSD and macOS, through mio.
//!
//! mio registrations are edge-triggered, so an idle connection costs one
//! kernel registration and no syscalls. A connection is registered for
//! reading only; write interest is added when a send comes up short and
//! removed once a send drains the backlog. On kqueue each interest is its own
//! knote (~150 bytes of kernel memory), so an idle connection holds one, not
//! two; on epoll it is one registration either way, and the cost is one
//! `epoll_ctl` when a connection starts and stops being congested.
//! Readiness is turned into completions
//! here: a readable connection is read once per [`Io::next`] call into the
//! shard's scratch buffer; one that filled the buffer is read again on the
//! next loop iteration (so one busy peer cannot starve the others). A short
//! read normally means the receive queue is empty and the next edge re-arms;
//! but the peer's close (FIN, RST) is reported once, often in the same event
//! as its last bytes, so after such an event the connection is read on until
//! the end of stream or error is seen and [`Completion::Closed`] handed out.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::{Completion, ConnId, Listener, Listeners, LISTENERS};

/// Backend name for `show info`.
#[cfg(target_os = "linux")]
pub const BACKEND_NAME: &str = "poll (epoll)";
/// Backend name for `show info`.
#[cfg(not(target_os = "linux"))]
pub const BACKEND_NAME: &str = "poll (kqueue)";

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const TLS_LISTENER: Token = Token(usize::MAX - 3);
const WS_LISTENER: Token = Token(usize::MAX - 4);
const MQTT_LISTENER: Token = Token(usize::MAX - 5);
const MQTT_TLS_LISTENER: Token = Token(usize::MAX - 6);
/// The token of each listener, by [`Listener::index`].
const LISTENER_TOKENS: [Token; LISTENERS] = [
    LISTENER,
    TLS_LISTENER,
    WS_LISTENER,
    MQTT_LISTENER,
    MQTT_TLS_LISTENER,
];
/// Connections accepted per loop iteration at most, so a connection storm
/// cannot starve established connections.
const ACCEPT_BATCH_MAX: usize = 256;
/// Connection slots added at least when the table grows.
const CONNS_GROWTH_MIN: usize = 1024;
/// mio events handled per `wait` at most.
const EVENTS_MAX: usize = 1024;
/// After EMFILE/ENFILE/ENOMEM on accept, wait this long before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Connection state kept by the backend: the socket and three flags.
struct Conn {
    stream: TcpStream,
    /// The kernel said readable and we have not yet seen `WouldBlock`.
    readable: bool,
    /// The kernel reported the peer's end of stream (FIN, RST) or an error.
    /// That is reported once, edge-triggered, often in the same event as the
    /// last bytes: reading goes on past a short read until the end is read.
    ended: bool,
    /// The shard asked us not to read (back-pressure).
    paused: bool,
    /// A send came up short; report the next writable edge.
    want_write: bool,
    /// Write interest is registered: set by a short send, cleared (and the
    /// interest removed) by the next send that writes everything.
    write_armed: bool,
    /// Queued in `ready` or `ready_next`.
    queued: bool,
}

/// A connection taken out of one shard's [`Io`], on its way to another.
#[derive(Debug)]
pub struct Detached {
    stream: TcpStream,
}

impl Detached {
    /// The socket as a process descriptor (live upgrade).
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: into_raw_fd gives up the stream's descriptor, open and
        // now owned by nobody else.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(self.stream.into_raw_fd()) }
    }

    /// A socket from a predecessor process, made non-blocking.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Detached {
        let stream = std::net::TcpStream::from(fd);
        // The old process's sockets were non-blocking; the flag travels
        // with the open file, so this only guards a foreign sender.
        let _ = stream.set_nonblocking(true);
        Detached {
            stream: TcpStream::from_std(stream),
        }
    }
}

/// Wakes a shard's [`Io::wait`] from another thread.
#[derive(Clone, Debug)]
pub struct WakeHandle(Arc<Waker>);

impl WakeHandle {
    /// Interrupts the owner's `wait`. Errors are logged: a lost wake-up is
    /// recovered by the owner's next timer tick.
    pub fn wake(&self) {
        if let Err(e) = self.0.wake() {
            log::warn!("wake failed: {e}");
        }
    }
}

/// One shard's event loop backend.
pub struct Io {
    poll: Poll,
    events: Events,
    waker: WakeHandle,
    /// The listeners by [`Listener::index`]; `None` when not configured or
    /// after `stop_accepting`.
    listeners: [Option<TcpListener>; LISTENERS],
    /// The listener has connections waiting, by [`Listener::index`].
    accept_ready: [bool; LISTENERS],
    /// Accepting failed for lack of resources; retry after a pause.
    accept_backoff: bool,
    conns: Slab<Conn>,
    /// Connections to read in this iteration.
    ready: VecDeque<ConnId>,
    /// Connections that filled the scratch buffer: read again next iteration.
    ready_next: Vec<ConnId>,
    /// Completions waiting to be handed out.
    pending: VecDeque<Completion>,
    accepted_this_round: usize,
}

impl Io {
    /// Creates the backend around already bound, listening sockets.
    pub fn new(listeners: Listeners) -> io::Result<Io> {
        let poll = Poll::new()?;
        let waker = WakeHandle(Arc::new(Waker::new(poll.registry(), WAKER)?));
        let mut registered: [Option<TcpListener>; LISTENERS] = Default::default();
        for (i, listener) in listeners.into_array().into_iter().enumerate() {
            let Some(listener) = listener else { continue };
            listener.set_nonblocking(true)?;
            let mut listener = TcpListener::from_std(listener);
            poll.registry()
                .register(&mut listener, LISTENER_TOKENS[i], Interest::READABLE)?;
            registered[i] = Some(listener);
        }
        Ok(Io {
            poll,
            events: Events::with_capacity(EVENTS_MAX),
            waker,
            accept_ready: registered.each_ref().map(Option::is_some),
            listeners: registered,
            accept_backoff: false,
            conns: Slab::new(),
            ready: VecDeque::new(),
            ready_next: Vec::new(),
            pending: VecDeque::new(),
            accepted_this_round: 0,
        })
    }

    /// A handle other threads use to wake this backend.
    pub fn wake_handle(&self) -> WakeHandle {
        self.waker.clone()
    }

    /// Blocks until there is work or `timeout` passes. With work already
    /// queued it only collects new events.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.ready.extend(self.ready_next.drain(..));
        self.accepted_this_round = 0;
        let mut timeout = if self.has_work() {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        if self.accept_backoff {
            timeout = Some(timeout.map_or(ACCEPT_RETRY, |t| t.min(ACCEPT_RETRY)));
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        if self.accept_backoff {
            self.accept_backoff = false;
            self.accept_ready = [true; LISTENERS];
        }
        for event in self.events.iter() {
            match event.token() {
                LISTENER => self.accept_ready[0] = true,
                TLS_LISTENER => self.accept_ready[1] = true,
                WS_LISTENER => self.accept_ready[2] = true,
                MQTT_LISTENER => self.accept_ready[3] = true,
                MQTT_TLS_LISTENER => self.accept_ready[4] = true,
                WAKER => self.pending.push_back(Completion::Woken),
                Token(key) => {
                    let Some(conn) = self.conns.get_mut(key) else {
                        continue;
                    };
                    let id = ConnId(key as u32);
                    if event.is_read_closed() || event.is_error() {
                        conn.ended = true;
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        conn.readable = true;
                        if !conn.paused && !conn.queued {
                            conn.queued = true;
                            self.ready.push_back(id);
                        }
                    }
                    if event.is_writable() && conn.want_write {
                        conn.want_write = false;
                        self.pending.push_back(Completion::Writable(id));
                    }
                }
            }
        }
        Ok(())
    }

    fn has_work(&self) -> bool {
        !self.pending.is_empty()
            || !self.ready.is_empty()
            || (0..LISTENERS).any(|i| self.accept_ready[i] && self.listeners[i].is_some())
    }

    /// Hands out the next completion, reading into `scratch` for
    /// [`Completion::Recv`]. `None` when this iteration's work is done.
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
            conn.queued = false;
            if conn.paused || !conn.readable {
                continue;
            }
            loop {
                match conn.stream.read(scratch) {
                    Ok(0) => {
                        conn.readable = false;
                        return Some(Completion::Closed(id));
                    }
                    Ok(n) => {
                        if n == scratch.len() {
                            // Probably more waiting: read again next iteration.
                            conn.queued = true;
                            self.ready_next.push(id);
                        } else if conn.ended {
                            // The end came with these bytes and no further
                            // edge will tell: read it in this iteration.
                            conn.queued = true;
                            self.ready.push_back(id);
                        } else {
                            // A short read on a stream socket means the
                            // receive queue is drained; the next edge re-arms.
                            conn.readable = false;
                        }
                        return Some(Completion::Recv(id, n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ECONNRESET, ETIMEDOUT, ...: the connection is gone.
                    Err(_) => {
                        conn.readable = false;
                        return Some(Completion::Closed(id));
                    }
                }
            }
        }
        None
    }

    /// Accepts from the first listener with connections waiting (plain
    /// first; the batch limit is shared).
    fn accept(&mut self) -> Option<Completion> {
        for which in Listener::ALL {
            if let Some(c) = self.accept_from(which) {
                return Some(c);
            }
        }
        None
    }

    fn accept_from(&mut self, which: Listener) -> Option<Completion> {
        let i = which.index();
        if !self.accept_ready[i] || self.accepted_this_round >= ACCEPT_BATCH_MAX {
            return None;
        }
        loop {
            match self.listeners[i].as_ref()?.accept() {
                Ok((stream, _peer)) => {
                    self.accepted_this_round += 1;
                    // Small frames, latency matters more than packet count.
                    let _ = stream.set_nodelay(true);
                    match self.insert(stream) {
                        Ok(id) => return Some(Completion::Accepted(id, which)),
                        Err(e) => log::warn!("register accepted connection: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_ready[i] = false;
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ECONNABORTED: the peer gave up while in the backlog.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS/ENOMEM: out of a resource. The
                    // connection stays in the backlog; pause and retry.
                    log::warn!("accept: {e}; pausing accepts for {ACCEPT_RETRY:?}");
                    self.accept_ready = [false; LISTENERS];
                    self.accept_backoff = true;
                    return None;
                }
            }
        }
    }

    /// Writes as much of `bytes` as the connection takes now. A short count
    /// arms [`Completion::Writable`]. Errors mean the connection is broken.
    pub fn send(&mut self, id: ConnId, bytes: &[u8]) -> io::Result<usize> {
        let conn = self
            .conns
            .get_mut(id.index())
            .expect("send on a closed connection");
        let mut sent = 0;
        while sent < bytes.len() {
            match conn.stream.write(&bytes[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.want_write = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Registering write interest on a socket that is already writable
        // reports it at once (epoll_ctl and kevent both check the state), so
        // adding it after the WouldBlock loses no edge.
        let want = conn.want_write;
        if want != conn.write_armed {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll
                .registry()
                .reregister(&mut conn.stream, Token(id.index()), interest)?;
            conn.write_armed = want;
        }
        Ok(sent)
    }

    /// Write interest is registered for the connection (tests).
    #[cfg(test)]
    fn write_armed(&self, id: ConnId) -> bool {
        self.conns[id.index()].write_armed
    }

    /// Stops (`false`) or resumes (`true`) reading from a connection.
    pub fn set_recv(&mut self, id: ConnId, on: bool) {
        let Some(conn) = self.conns.get_mut(id.index()) else {
            return;
        };
        conn.paused = !on;
        if on && conn.readable && !conn.queued {
            conn.queued = true;
            self.ready.push_back(id);
        }
    }

    /// Half-closes the sending side (FIN after queued bytes); reads go on.
    pub fn shutdown_write(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get(id.index()) {
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
    }

    /// Closes the connection and frees its id.
    pub fn close(&mut self, id: ConnId) {
        if self.conns.contains(id.index()) {
            let mut conn = self.conns.remove(id.index());
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }

    /// Takes a connection out of this backend to hand it to another shard.
    pub fn detach(&mut self, id: ConnId) -> io::Result<Detached> {
        let mut conn = self.conns.remove(id.index());
        self.poll.registry().deregister(&mut conn.stream)?;
        Ok(Detached {
            stream: conn.stream,
        })
    }

    /// Adopts a connection detached from another shard. It is read at once,
    /// since bytes may have arrived while it moved.
    pub fn attach(&mut self, detached: Detached) -> io::Result<ConnId> {
        self.insert(detached.stream)
    }

    /// Registers a new connection and queues it for reading: bytes may
    /// already be there (a login in the first packet, or sent while it moved).
    fn insert(&mut self, mut stream: TcpStream) -> io::Result<ConnId> {
        if self.conns.len() == self.conns.capacity() {
            // Grow by an eighth, not double: see the shard's session table.
            self.conns
                .reserve_exact((self.conns.len() / 8).max(CONNS_GROWTH_MIN));
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // Read interest only: write interest comes with the first short send.
        self.poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)?;
        entry.insert(Conn {
            stream,
            readable: true,
            ended: false,
            paused: false,
            want_write: false,
            write_armed: false,
            queued: true,
        });
        let id = ConnId(key as u32);
        self.ready.push_back(id);
        Ok(id)
    }

    /// Stops accepting: the listeners are closed (for graceful shutdown).
    pub fn stop_accepting(&mut self) {
        for slot in &mut self.listeners {
            if let Some(mut listener) = slot.take() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
        }
        self.accept_ready = [false; LISTENERS];
    }

    /// Open connections held by this backend.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Nothing to do: a readiness backend arms nothing per connection.
    pub fn established(&mut self, _conn: ConnId) {}

    /// The remote address of `id`, asked of its descriptor.
    pub fn peer_addr(&self, id: ConnId) -> Option<std::net::SocketAddr> {
        self.conns.get(id.index())?.stream.peer_addr().ok()
    }

    /// The source address of `id` (IPv4-mapped addresses as IPv4).
    pub fn peer_ip(&mut self, id: ConnId) -> Option<IpAddr> {
        let conn = self.conns.get(id.index())?;
        conn.stream.peer_addr().ok().map(|a| a.ip().to_canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A bound, listening, non-blocking socket on loopback.
    fn listener() -> std::net::TcpListener {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        l
    }

    /// A backend on a fresh listener, a client connected to it, the
    /// accepted connection's id and a scratch buffer.
    fn accepted() -> (Io, std::net::TcpStream, ConnId, Vec<u8>) {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let mut io = Io::new(Listeners::plain(l)).unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let mut scratch = vec![0u8; 4096];
        let Completion::Accepted(id, Listener::Plain) = next_event(&mut io, &mut scratch) else {
            panic!("expected an accept");
        };
        (io, client, id, scratch)
    }

    /// Waits (bounded) for the next completion other than `Recv`/`Woken`.
    fn next_event(io: &mut Io, scratch: &mut [u8]) -> Completion {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no completion within 10 s");
            io.wait(Some(Duration::from_millis(100))).unwrap();
            while let Some(c) = io.next(scratch) {
                match c {
                    Completion::Recv(..) | Completion::Woken => {}
                    other => return other,
                }
            }
        }
    }

    /// Write interest appears with a short send and goes once a send drains
    /// the backlog; the writable edge in between is reported.
    #[test]
    fn write_interest_only_while_congested() {
        let (mut io, mut client, id, mut scratch) = accepted();
        assert!(!io.write_armed(id), "registered for reading only");

        // Nobody reads: fill the send buffer and the peer's receive buffer.
        let chunk = vec![7u8; 1 << 20];
        let mut queued = 0usize;
        let mut short = false;
        for _ in 0..256 {
            let n = io.send(id, &chunk).unwrap();
            queued += n;
            if n < chunk.len() {
                short = true;
                break;
            }
        }
        assert!(short, "256 MiB went out without a short send");
        assert!(io.write_armed(id), "a short send adds write interest");

        // The peer drains everything; the backend reports the writable edge.
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            while got < queued {
                let n = client.read(&mut buf).unwrap();
                assert!(n > 0, "closed after {got} of {queued} bytes");
                got += n;
            }
            client
        });
        assert_eq!(next_event(&mut io, &mut scratch), Completion::Writable(id));
        let _client = reader.join().unwrap();
        assert_eq!(io.send(id, b"drained").unwrap(), 7);
        assert!(!io.write_armed(id), "a full send removes write interest");
    }

    /// Bytes and the peer's FIN reported in one event: after the short read
    /// of the bytes the end of stream is still read and reported, though no
    /// further edge comes.
    #[test]
    fn end_of_stream_behind_the_last_bytes_is_reported() {
        let (mut io, mut client, id, mut scratch) = accepted();
        // The first read found nothing; now bytes and FIN arrive together.
        while io.next(&mut scratch).is_some() {}
        client.write_all(b"last words").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(next_event(&mut io, &mut scratch), Completion::Closed(id));
    }
}
