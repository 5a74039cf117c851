//! The one boundary between a shard and the operating system.
//!
//! A shard owns one [`Io`]. The contract is completion-shaped on every OS so
//! that the session logic above it is written once:
//!
//! - [`Io::wait`] blocks until something happened (or the timeout passed).
//! - [`Io::next`] hands out one [`Completion`] at a time: a connection was
//!   accepted (saying from which [`Listener`]: plaintext, TLS or WebSocket;
//!   a shard may have all three), bytes arrived (copied into the caller's scratch buffer), a
//!   connection can take more output, a connection was closed by the peer, or
//!   another shard woke us. It never calls back into the shard: the shard
//!   drains completions in its own loop (no re-entrancy, bounded stack).
//! - [`Io::send`] takes as many bytes as the connection accepts now and says
//!   how many; for the rest the shard keeps its own buffer and waits for
//!   [`Completion::Writable`].
//! - [`Io::close`] releases a connection. A [`ConnId`] stays valid (and is not
//!   reused) until the shard closes it, even after [`Completion::Closed`].
//! - [`Io::detach`] / [`Io::attach`] move a connection to another shard;
//!   [`Io::established`] says a connection stays on this shard for good (a
//!   completion backend may then arm long-lived receives on it).
//!
//! The readiness backend ([`poll`], epoll/kqueue through mio) reads and
//! retries `WouldBlock` itself, so it looks like a completion backend. A
//! completion backend (io_uring) fits the same face: its provided-buffer
//! receives are copied into the scratch buffer and the buffer is returned to
//! the kernel at once.
//!
//! A third backend, [`sim`], has no operating system under it: its
//! connections live in a simulated network driven by the deterministic
//! simulator ([`crate::sim`]). It is never chosen by configuration; the
//! simulator builds it with [`Io::Sim`].

pub mod poll;
pub mod sim;
#[cfg(target_os = "linux")]
pub mod uring;

use std::io;
use std::net::{IpAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A connection slot in one shard's [`Io`]. Dense: ids are reused after close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u32);

impl ConnId {
    /// The slot as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Which listening socket a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Listener {
    /// The plaintext listener (`listen`).
    Plain,
    /// The TLS listener (`tls_listen`): the shard runs a TLS handshake first.
    Tls,
    /// The WebSocket listener (`ws_listen`): the shard reads an HTTP
    /// upgrade first.
    Ws,
    /// The MQTT listener (`mqtt_listen`): the shard speaks MQTT
    /// (docs/MQTT.md).
    Mqtt,
    /// The MQTT-over-TLS listener (`mqtt_tls_listen`): a TLS handshake
    /// first, then MQTT.
    MqttTls,
}

/// How many kinds of listener there are.
pub const LISTENERS: usize = 5;

impl Listener {
    /// Every kind, in index order (`Plain` = 0, `Tls` = 1, `Ws` = 2,
    /// `Mqtt` = 3, `MqttTls` = 4).
    pub const ALL: [Listener; LISTENERS] = [
        Listener::Plain,
        Listener::Tls,
        Listener::Ws,
        Listener::Mqtt,
        Listener::MqttTls,
    ];

    /// The listener's index in per-listener arrays, `0..LISTENERS`.
    pub fn index(self) -> usize {
        match self {
            Listener::Plain => 0,
            Listener::Tls => 1,
            Listener::Ws => 2,
            Listener::Mqtt => 3,
            Listener::MqttTls => 4,
        }
    }
}

/// The bound, listening sockets a shard accepts from.
#[derive(Debug)]
pub struct Listeners {
    /// The plaintext listener.
    pub plain: TcpListener,
    /// The TLS listener, when `tls_listen` is configured.
    pub tls: Option<TcpListener>,
    /// The WebSocket listener, when `ws_listen` is configured.
    pub ws: Option<TcpListener>,
    /// The MQTT listener, when `mqtt_listen` is configured.
    pub mqtt: Option<TcpListener>,
    /// The MQTT-over-TLS listener, when `mqtt_tls_listen` is configured.
    pub mqtt_tls: Option<TcpListener>,
}

impl Listeners {
    /// Only a plaintext listener.
    pub fn plain(listener: TcpListener) -> Listeners {
        Listeners {
            plain: listener,
            tls: None,
            ws: None,
            mqtt: None,
            mqtt_tls: None,
        }
    }

    /// Duplicates the descriptors (the `auto` backend may fall back).
    pub fn try_clone(&self) -> io::Result<Listeners> {
        Ok(Listeners {
            plain: self.plain.try_clone()?,
            tls: self.tls.as_ref().map(TcpListener::try_clone).transpose()?,
            ws: self.ws.as_ref().map(TcpListener::try_clone).transpose()?,
            mqtt: self.mqtt.as_ref().map(TcpListener::try_clone).transpose()?,
            mqtt_tls: self
                .mqtt_tls
                .as_ref()
                .map(TcpListener::try_clone)
                .transpose()?,
        })
    }

    /// The listener of kind `kind`, if there is one.
    pub fn get(&self, kind: Listener) -> Option<&TcpListener> {
        match kind {
            Listener::Plain => Some(&self.plain),
            Listener::Tls => self.tls.as_ref(),
            Listener::Ws => self.ws.as_ref(),
            Listener::Mqtt => self.mqtt.as_ref(),
            Listener::MqttTls => self.mqtt_tls.as_ref(),
        }
    }

    /// As an array indexed by [`Listener::index`].
    pub fn into_array(self) -> [Option<TcpListener>; LISTENERS] {
        [
            Some(self.plain),
            self.tls,
            self.ws,
            self.mqtt,
            self.mqtt_tls,
        ]
    }
}

/// Something that happened, handed out by [`Io::next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// A new connection from the given listener.
    Accepted(ConnId, Listener),
    /// `len` bytes from the connection are in the scratch buffer, `scratch[..len]`.
    Recv(ConnId, usize),
    /// The connection can take more output after a short [`Io::send`].
    Writable(ConnId),
    /// The peer closed the connection or it failed; the shard must [`Io::close`] it.
    Closed(ConnId),
    /// Another shard called [`WakeHandle::wake`].
    Woken,
}

/// Which backend a shard runs (config key `io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// io_uring where the kernel has what we need, otherwise poll.
    #[default]
    Auto,
    /// io_uring (Linux only).
    Uring,
    /// epoll (Linux) or kqueue (FreeBSD) through mio.
    Poll,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" => Ok(Backend::Uring),
            "poll" => Ok(Backend::Poll),
            _ => Err(format!(
                "unknown backend `{s}` (expected auto, uring or poll)"
            )),
        }
    }
}

/// What a backend needs to know at creation.
#[derive(Clone, Debug)]
pub struct IoOptions {
    /// Which backend to run.
    pub backend: Backend,
    /// This shard's id.
    pub shard: usize,
    /// Connections this shard may hold (sizes io_uring's fixed-file tables).
    pub conns_max: usize,
    /// io_uring: slots per fixed-file table at most; 0 means RLIMIT_NOFILE
    /// (the kernel's own cap). Tests set it low to force several rings.
    pub ring_slots_max: usize,
    /// io_uring: how long completions may gather on a busy shard before its
    /// thread wakes (`uring_batch_wait_us`); zero = wake on the first.
    pub batch_wait: Duration,
}

/// One shard's event loop backend; see the module docs for the contract.
// One per shard: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Io {
    /// epoll/kqueue.
    Poll(poll::Io),
    /// io_uring.
    #[cfg(target_os = "linux")]
    Uring(uring::Io),
    /// The simulator's in-memory network.
    Sim(sim::Io),
}

/// A connection on its way from one shard to another.
#[derive(Debug)]
pub enum Detached {
    /// The socket itself.
    Poll(poll::Detached),
    /// A fixed file sent with MSG_RING; the id pairs it with its arrival.
    #[cfg(target_os = "linux")]
    Uring(uring::Detached),
    /// A simulated socket.
    Sim(sim::Detached),
}

/// A connection kept for a successor process ([`Io::keep`]).
#[derive(Debug)]
pub enum Kept {
    /// The socket itself.
    Poll(OwnedFd),
    /// Still a direct descriptor in its ring.
    #[cfg(target_os = "linux")]
    Uring(uring::Kept),
}

/// Wakes a shard's [`Io::wait`] from another thread.
#[derive(Clone, Debug)]
pub enum WakeHandle {
    /// mio's waker.
    Poll(poll::WakeHandle),
    /// An eventfd the ring reads.
    #[cfg(target_os = "linux")]
    Uring(uring::WakeHandle),
    /// Nothing to wake: simulated shards are stepped.
    Sim(sim::WakeHandle),
}

impl WakeHandle {
    /// Interrupts the owner's `wait`. A lost wake-up is recovered by the
    /// owner's next timer tick.
    pub fn wake(&self) {
        match self {
            WakeHandle::Poll(w) => w.wake(),
            #[cfg(target_os = "linux")]
            WakeHandle::Uring(w) => w.wake(),
            WakeHandle::Sim(w) => w.wake(),
        }
    }
}

/// What other shards need to know of this shard's backend (io_uring: the
/// ring that receives handed-off connections).
#[derive(Clone, Debug)]
pub enum PeerInfo {
    /// Nothing: sockets travel by value (poll and sim).
    Poll,
    /// The ring file descriptor handoffs are sent to.
    #[cfg(target_os = "linux")]
    Uring(uring::PeerInfo),
}

macro_rules! each {
    ($self:ident, $io:ident => $e:expr) => {
        match $self {
            Io::Poll($io) => $e,
            #[cfg(target_os = "linux")]
            Io::Uring($io) => $e,
            Io::Sim($io) => $e,
        }
    };
}

impl Io {
    /// Creates the backend chosen by `options` around bound, listening
    /// sockets. Call it on the shard's own thread.
    pub fn new(listener: Listeners, options: &IoOptions) -> io::Result<Io> {
        match options.backend {
            Backend::Poll => Ok(Io::Poll(poll::Io::new(listener)?)),
            #[cfg(target_os = "linux")]
            Backend::Uring => Ok(Io::Uring(uring::Io::new(listener, options)?)),
            #[cfg(target_os = "linux")]
            Backend::Auto => match uring::Io::new(listener.try_clone()?, options) {
                Ok(io) => Ok(Io::Uring(io)),
                Err(e) => {
                    if options.shard == 0 {
                        log::warn!("io_uring unavailable ({e}); using the poll backend");
                    }
                    Ok(Io::Poll(poll::Io::new(listener)?))
                }
            },
            #[cfg(not(target_os = "linux"))]
            Backend::Uring => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring exists only on Linux; use io = \"poll\"",
            )),
            #[cfg(not(target_os = "linux"))]
            Backend::Auto => Ok(Io::Poll(poll::Io::new(listener)?)),
        }
    }

    /// The backend's name, for `show info`.
    pub fn name(&self) -> &'static str {
        match self {
            Io::Poll(_) => poll::BACKEND_NAME,
            #[cfg(target_os = "linux")]
            Io::Uring(_) => uring::BACKEND_NAME,
            Io::Sim(_) => sim::BACKEND_NAME,
        }
    }

    /// A handle other threads use to wake this backend.
    pub fn wake_handle(&self) -> WakeHandle {
        match self {
            Io::Poll(io) => WakeHandle::Poll(io.wake_handle()),
            #[cfg(target_os = "linux")]
            Io::Uring(io) => WakeHandle::Uring(io.wake_handle()),
            Io::Sim(io) => WakeHandle::Sim(io.wake_handle()),
        }
    }

    /// What other shards need to hand connections to this one.
    pub fn peer_info(&self) -> PeerInfo {
        match self {
            Io::Poll(_) | Io::Sim(_) => PeerInfo::Poll,
            #[cfg(target_os = "linux")]
            Io::Uring(io) => PeerInfo::Uring(io.peer_info()),
        }
    }

    /// Tells the backend every shard's [`PeerInfo`] (index = shard id).
    pub fn set_peers(&mut self, peers: Vec<PeerInfo>) {
        #[cfg(target_os = "linux")]
        if let Io::Uring(io) = self {
            io.set_peers(
                peers
                    .into_iter()
                    .map(|p| match p {
                        PeerInfo::Uring(p) => p,
                        PeerInfo::Poll => unreachable!("all shards run one backend"),
                    })
                    .collect(),
            );
        }
        #[cfg(not(target_os = "linux"))]
        let _ = peers;
    }

    /// Blocks until there is work or `timeout` passes.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        each!(self, io => io.wait(timeout))
    }

    /// Hands out the next completion, filling `scratch` for
    /// [`Completion::Recv`]. `None` when this iteration's work is done.
    pub fn next(&mut self, scratch: &mut [u8]) -> Option<Completion> {
        each!(self, io => io.next(scratch))
    }

    /// Takes as much of `bytes` as the connection accepts now; a short count
    /// arms [`Completion::Writable`]. An error means the connection is broken.
    pub fn send(&mut self, conn: ConnId, bytes: &[u8]) -> io::Result<usize> {
        each!(self, io => io.send(conn, bytes))
    }

    /// Stops (`false`) or resumes (`true`) handing out bytes of a connection.
    pub fn set_recv(&mut self, conn: ConnId, on: bool) {
        each!(self, io => io.set_recv(conn, on))
    }

    /// The source address of `conn`, just handed out as
    /// [`Completion::Accepted`], for the per-address limits. Asked once per
    /// accepted connection, before the next [`Io::next`]; `None` when the
    /// backend cannot tell (the limits then skip the connection).
    pub fn peer_ip(&mut self, conn: ConnId) -> Option<IpAddr> {
        each!(self, io => io.peer_ip(conn))
    }

    /// The remote address of open connection `conn`, for `show user`: the
    /// poll backend asks its descriptor; io_uring's direct descriptors
    /// have none and their address is not kept after accept (it would
    /// cost every idle connection 18 bytes), so `None` there.
    pub fn peer_addr(&self, conn: ConnId) -> Option<std::net::SocketAddr> {
        match self {
            Io::Poll(io) => io.peer_addr(conn),
            #[cfg(target_os = "linux")]
            Io::Uring(_) => None,
            Io::Sim(_) => None,
        }
    }

    /// The connection stays on this shard (logged in on its home shard).
    pub fn established(&mut self, conn: ConnId) {
        each!(self, io => io.established(conn))
    }

    /// Half-closes the sending side once queued output is out; reads go on.
    pub fn shutdown_write(&mut self, conn: ConnId) {
        each!(self, io => io.shutdown_write(conn))
    }

    /// Closes the connection and frees its id.
    pub fn close(&mut self, conn: ConnId) {
        each!(self, io => io.close(conn))
    }

    /// Whether connections can be carried to a successor process (live
    /// upgrade): poll always; io_uring where the kernel has
    /// FIXED_FD_INSTALL (Linux 6.8); the simulator never.
    pub fn carries(&self) -> bool {
        match self {
            Io::Poll(_) => true,
            #[cfg(target_os = "linux")]
            Io::Uring(io) => io.carries(),
            Io::Sim(_) => false,
        }
    }

    /// Takes a logged-in connection, its receive paused, out of the
    /// shard's hands for a successor process. Only where [`Io::carries`].
    pub fn keep(&mut self, conn: ConnId) -> io::Result<Kept> {
        match self {
            Io::Poll(io) => io.detach(conn).map(|d| Kept::Poll(d.into_fd())),
            #[cfg(target_os = "linux")]
            Io::Uring(io) => io.keep(conn).map(Kept::Uring),
            Io::Sim(_) => unreachable!("the simulator carries no connections"),
        }
    }

    /// Process descriptors of kept connections, in order, each with the
    /// bytes that arrived after its receive was paused (io_uring installs
    /// them now: call it a batch at a time, so the process holds few).
    /// An error means that connection is closed, not carried.
    pub fn carry_fds(&mut self, kept: Vec<Kept>) -> Vec<io::Result<(OwnedFd, Vec<u8>)>> {
        #[cfg(target_os = "linux")]
        if let Io::Uring(io) = self {
            let keys = kept
                .into_iter()
                .map(|k| match k {
                    Kept::Uring(k) => k,
                    Kept::Poll(_) => unreachable!("kept by this backend"),
                })
                .collect();
            return io.carry_fds(keys);
        }
        kept.into_iter()
            .map(|k| match k {
                Kept::Poll(fd) => Ok((fd, Vec::new())),
                #[cfg(target_os = "linux")]
                Kept::Uring(_) => unreachable!("kept by this backend"),
            })
            .collect()
    }

    /// Adopts a connection carried from a predecessor process (a socket
    /// from [`Io::carry_fds`] of either backend); it is read at once
    /// (io_uring: once its fixed slot is known).
    pub fn adopt_socket(&mut self, fd: OwnedFd) -> io::Result<ConnId> {
        match self {
            Io::Poll(io) => io.attach(poll::Detached::from_fd(fd)),
            #[cfg(target_os = "linux")]
            Io::Uring(io) => io.adopt(fd),
            Io::Sim(_) => unreachable!("the simulator adopts no connections"),
        }
    }

    /// Takes a connection out of this backend to hand it to shard `dst`.
    pub fn detach(&mut self, conn: ConnId, dst: usize) -> io::Result<Detached> {
        // Only io_uring sends to a ring; sockets travel by value.
        #[cfg(not(target_os = "linux"))]
        let _ = dst;
        match self {
            Io::Poll(io) => io.detach(conn).map(Detached::Poll),
            #[cfg(target_os = "linux")]
            Io::Uring(io) => io.detach(conn, dst).map(Detached::Uring),
            Io::Sim(io) => io.detach(conn).map(Detached::Sim),
        }
    }

    /// Adopts a connection detached by another shard.
    pub fn attach(&mut self, detached: Detached) -> io::Result<ConnId> {
        match (self, detached) {
            (Io::Poll(io), Detached::Poll(d)) => io.attach(d),
            #[cfg(target_os = "linux")]
            (Io::Uring(io), Detached::Uring(d)) => io.attach(d),
            (Io::Sim(io), Detached::Sim(d)) => io.attach(d),
            _ => unreachable!("all shards run one backend"),
        }
    }

    /// Stops accepting: the listeners are closed (graceful shutdown).
    pub fn stop_accepting(&mut self) {
        each!(self, io => io.stop_accepting())
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        each!(self, io => io.conn_count())
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the backend itself holds, for the stats socket (all zero on poll).
    pub fn gauges(&self) -> IoGauges {
        match self {
            Io::Poll(_) | Io::Sim(_) => IoGauges::default(),
            #[cfg(target_os = "linux")]
            Io::Uring(io) => io.gauges(),
        }
    }
}

/// Backend-level levels and totals of one shard ([`Io::gauges`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoGauges {
    /// io_uring instances the shard runs.
    pub rings: u64,
    /// Fixed-file slots holding a descriptor, over all rings.
    pub slots_used: u64,
    /// Fixed-file slots, over all rings.
    pub slots_total: u64,
    /// Multishot receives ended because the provided buffers ran dry (each
    /// re-armed once buffers are back), since the backend started.
    pub recv_no_buffers: u64,
}

/// Environment variable that turns io_uring test skips into failures (CI sets
/// it to `1`, so a runner without io_uring cannot pass the suite silently).
pub const REQUIRE_URING_ENV: &str = "TERN_REQUIRE_URING";

/// Test support, called by a test that needs io_uring where the kernel
/// refused it: prints why and returns (the test then skips), or panics when
/// [`REQUIRE_URING_ENV`] is `1`.
#[doc(hidden)]
pub fn uring_unavailable(why: &dyn std::fmt::Display) {
    if std::env::var_os(REQUIRE_URING_ENV).is_some_and(|v| v == "1") {
        panic!(
            "io_uring unavailable ({why}) and {REQUIRE_URING_ENV}=1: failing instead of skipping"
        );
    }
    eprintln!("skipping: io_uring unavailable: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not run on its own: [`skip_becomes_failure_when_required`] runs it in a
    /// child process with and without the variable.
    #[test]
    #[ignore]
    fn uring_unavailable_child() {
        uring_unavailable(&"injected for the test");
    }

    #[test]
    fn skip_becomes_failure_when_required() {
        let run = |required: Option<&str>| {
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--exact",
                "io::tests::uring_unavailable_child",
                "--ignored",
                "--nocapture",
            ]);
            match required {
                Some(v) => cmd.env(REQUIRE_URING_ENV, v),
                None => cmd.env_remove(REQUIRE_URING_ENV),
            };
            let out = cmd.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                text.contains("1 passed") || text.contains("1 failed"),
                "{text}"
            );
            (out.status.success(), text)
        };
        let (ok, text) = run(None);
        assert!(
            ok && text.contains("skipping: io_uring unavailable"),
            "{text}"
        );
        let (ok, text) = run(Some("0"));
        assert!(ok, "{text}");
        let (ok, text) = run(Some("1"));
        assert!(!ok && text.contains("TERN_REQUIRE_URING=1"), "{text}");
    }
}
