//! Live upgrade: a new binary takes over the listening sockets and the data
//! directory without a refused connect or a lost message.
//!
//! What is handed over: the listening sockets, the data directory, and
//! every logged-in plaintext connection with its session state ([`state`]),
//! on either backend. The old process starts the successor
//! (`tern serve` with the same arguments, from the same path re-read from
//! disk or another `--binary`) with one end of a hand-over socket
//! ([`channel`]); then, in this order:
//!
//! 1. The successor loads and validates its configuration and says
//!    `Hello` with its hand-over format ([`wire`]). A successor that exits
//!    first (bad configuration, a binary that does not start) or speaks a
//!    format this process does not know ends the upgrade here: the old
//!    process never stopped serving, and logs why.
//! 2. The old process sends every listening socket (one per shard, plain
//!    and TLS). From now on a connect waits in the listen backlog at worst;
//!    it is never refused, because the successor holds the sockets too.
//! 3. The old process shuts down like a graceful stop, except that its
//!    logged-in plaintext connections (Tern, WebSocket, MQTT) are frozen
//!    (no more input read) and kept once the shards agree nothing is in
//!    flight between them; every other connection gets `BYE(upgrade)` (TLS
//!    ones with close_notify after it, wss ones with a close frame before
//!    that). Its last answers are
//!    committed and flushed, its logs closed, the data directory's lock and
//!    the stats socket released. Then it says `Released`.
//! 4. The successor takes the lock, replays the logs (nothing acknowledged
//!    is lost, no server id is reused) and starts its shards on the
//!    inherited listeners. Meanwhile the old process sends the kept
//!    connections in batches (io_uring: each batch's direct descriptors
//!    installed as process descriptors just before, closed just after, so
//!    a million connections pass an open-files limit of 20,000), then
//!    `Carried` with their count. The successor installs each on its
//!    user's home shard as it comes (same socket, same session, no second
//!    LOGIN_OK) and, once all came, says `Serving`; the old process exits
//!    0. Clients that got BYE reconnect (the client library does at once)
//!    and find their queues.
//! 5. A successor that fails after `Released` (its store, its stats
//!    socket, a crash) or stays silent past [`SERVING_WAIT`]: the old
//!    process kills it if needed and starts serving again on its own copies
//!    of the listeners (roll back), and logs why. Carried connections are
//!    lost then (their clients reconnect).
//!
//! See docs/OPERATIONS.md.

pub mod channel;
pub mod state;
pub mod wire;

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use crate::io::{Listener, Listeners, LISTENERS};
use crate::ticket::TicketKeys;
use channel::Channel;
use state::Carried;
use wire::{Message, FORMAT_VERSION};

/// The environment variable naming the successor's end of the hand-over
/// socket (a descriptor number).
pub const ENV_FD: &str = "TERN_UPGRADE_FD";

/// How long the old process waits for the successor's `Hello` (its
/// configuration checked).
pub const HELLO_WAIT: Duration = Duration::from_secs(30);
/// How long either side waits for the other's next step of the hand-over
/// itself (descriptors, `Released`).
pub const STEP_WAIT: Duration = Duration::from_secs(120);
/// How long the old process waits for `Serving` after `Released`: the
/// successor replays the logs in this time.
pub const SERVING_WAIT: Duration = Duration::from_secs(600);

/// Where an upgrade stands, for the stats socket and the signal handler.
#[derive(Debug)]
enum Phase {
    /// Nothing running.
    Idle,
    /// Asked for on the stats socket; SIGUSR2 is on its way.
    Requested(Option<PathBuf>),
    /// The main thread is running one.
    Running,
}

/// The process's upgrade state: its generation, the last upgrade's
/// outcome, and the one upgrade that may run at a time.
#[derive(Debug)]
pub struct UpgradeInfo {
    /// This process's id.
    pub pid: u32,
    /// 0 for a process started fresh; one more than its predecessor's for
    /// a process that took over.
    pub generation: u64,
    /// When this process took over (unix ms), 0 if it started fresh.
    pub upgraded_unix_ms: u64,
    phase: Mutex<Phase>,
    /// The last upgrade's outcome, in words (`none` before any).
    last: Mutex<String>,
    /// Whether `tern serve` listens for SIGUSR2 (an in-process server in a
    /// test does not: the stats command then refuses).
    signal_ready: std::sync::atomic::AtomicBool,
}

impl UpgradeInfo {
    /// A process started fresh: generation 0.
    pub fn fresh() -> UpgradeInfo {
        UpgradeInfo::taken_over(0, 0, "none".to_string())
    }

    /// A process that took over as generation `generation` at
    /// `upgraded_unix_ms`; `last` says from whom.
    pub fn taken_over(generation: u64, upgraded_unix_ms: u64, last: String) -> UpgradeInfo {
        UpgradeInfo {
            pid: std::process::id(),
            generation,
            upgraded_unix_ms,
            phase: Mutex::new(Phase::Idle),
            last: Mutex::new(last),
            signal_ready: Default::default(),
        }
    }

    /// Says SIGUSR2 starts an upgrade in this process (`tern serve` calls
    /// it once its handler is installed).
    pub fn enable_signal(&self) {
        self.signal_ready
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The stats command `upgrade [BINARY]`: starts an upgrade (by raising
    /// SIGUSR2 in this process, the one path for both) unless one runs.
    pub fn request(&self, binary: Option<PathBuf>) -> Result<String, String> {
        if !self.signal_ready.load(std::sync::atomic::Ordering::Acquire) {
            return Err("live upgrade needs `tern serve` (no SIGUSR2 handler here)".to_string());
        }
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*phase, Phase::Idle) {
            return Err("refused: an upgrade is already in progress".to_string());
        }
        *phase = Phase::Requested(binary);
        drop(phase);
        // SAFETY: kill with our own pid and a valid signal number.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGUSR2);
        }
        Ok("upgrade started: watch Last_upgrade and Pid in `show info`".to_string())
    }

    /// The main thread begins an upgrade (SIGUSR2): the binary the stats
    /// command asked for, if it did.
    pub fn begin(&self) -> Option<PathBuf> {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let binary = match std::mem::replace(&mut *phase, Phase::Running) {
            Phase::Requested(binary) => binary,
            Phase::Idle | Phase::Running => None,
        };
        drop(phase);
        self.set_last("in progress".to_string());
        binary
    }

    /// The upgrade ended in this process (it failed, or was refused): `why`.
    pub fn end(&self, why: String) {
        self.set_last(why);
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = Phase::Idle;
    }

    /// The last upgrade's outcome, in words.
    pub fn last(&self) -> String {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_last(&self, text: String) {
        // One line: `show info` is `Key: value` per line.
        let text = text.replace('\n', " ");
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }
}

impl Default for UpgradeInfo {
    fn default() -> UpgradeInfo {
        UpgradeInfo::fresh()
    }
}

/// The listening sockets one process hands to the next, per shard.
pub fn listener_fds(listeners: &[Listeners]) -> [Vec<BorrowedFd<'_>>; LISTENERS] {
    Listener::ALL.map(|kind| {
        listeners
            .iter()
            .filter_map(|l| l.get(kind).map(AsFd::as_fd))
            .collect()
    })
}

/// The old process's side: the successor it started.
#[derive(Debug)]
pub struct Successor {
    child: Child,
    channel: Channel,
    /// The successor's pid, from its `Hello`.
    pub pid: u32,
}

impl Successor {
    /// Starts `binary` with `args` and the hand-over socket, and waits for
    /// its `Hello`. An error says why in words (and the child is reaped).
    pub fn start(binary: &Path, args: &[OsString]) -> Result<Successor, String> {
        let (ours, theirs) = Channel::pair().map_err(|e| format!("socketpair: {e}"))?;
        let theirs_fd = theirs.as_fd().as_raw_fd();
        let mut command = Command::new(binary);
        command.args(args).env(ENV_FD, theirs_fd.to_string());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl, which is async-signal-safe; it clears close-on-exec
        // on the one descriptor the successor must inherit.
        unsafe {
            command.pre_exec(move || {
                let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        // Only the child holds its end now: its exit is our EOF.
        drop(theirs);
        let mut successor = Successor {
            child,
            channel: ours,
            pid: 0,
        };
        match successor.channel.recv(HELLO_WAIT) {
            Ok((Message::Hello { format, pid }, _)) if format == FORMAT_VERSION => {
                successor.pid = pid;
                Ok(successor)
            }
            Ok((Message::Hello { format, .. }, _)) => Err(successor.abandon(format!(
                "the successor speaks hand-over format {format}, this process only \
                 {FORMAT_VERSION}"
            ))),
            Ok((other, _)) => Err(successor.abandon(format!("expected Hello, got {other:?}"))),
            Err(e) => Err(successor.abandon(format!("no Hello: {e}"))),
        }
    }

    /// Sends the listening sockets and the TLS ticket keys (step 2).
    pub fn send_listeners(
        &self,
        generation: u64,
        listeners: &[Listeners],
        tickets: Option<TicketKeys>,
    ) -> Result<(), String> {
        let fds = listener_fds(listeners);
        let message = Message::Listeners {
            format: FORMAT_VERSION,
            generation,
            counts: fds.each_ref().map(|kind| kind.len() as u16),
        };
        let sent = self
            .channel
            .send(message, &[])
            .and_then(|()| fds.iter().try_for_each(|kind| self.channel.send_fds(kind)));
        sent.and_then(|()| self.channel.send(Message::Tickets { keys: tickets }, &[]))
            .map_err(|e| format!("sending the listeners: {e}"))
    }

    /// Says the data directory is free (step 3): the successor opens it and
    /// starts serving while the carried connections follow.
    pub fn release(&self) -> Result<(), String> {
        self.channel
            .send(Message::Released, &[])
            .map_err(|e| format!("sending Released: {e}"))
    }

    /// Sends carried connections (after [`Successor::release`]): their
    /// sockets and session states. An error means they did not all go;
    /// the caller rolls back (and those clients reconnect).
    pub fn send_carried(&self, carried: &[(OwnedFd, Carried)]) -> Result<(), String> {
        self.channel
            .send_carried(carried)
            .map_err(|e| format!("sending carried connections: {e}"))
    }

    /// Says the carried connections are over (`count` of them, step 4),
    /// then waits for `Serving`. An error means the successor failed: it
    /// has been killed (if it still ran) and reaped; the caller rolls back.
    pub fn finish(mut self, count: u32) -> Result<u32, String> {
        let result = self
            .channel
            .send(Message::Carried { count }, &[])
            .map_err(|e| format!("sending Carried: {e}"))
            .and_then(|()| match self.channel.recv(SERVING_WAIT) {
                Ok((Message::Serving { pid }, _)) => Ok(pid),
                Ok((other, _)) => Err(format!("expected Serving, got {other:?}")),
                Err(e) => Err(format!("no Serving: {e}")),
            });
        match result {
            Ok(pid) => Ok(pid),
            Err(why) => Err(self.abandon(why)),
        }
    }

    /// Gives up on the successor: kills it if it still runs, reaps it, and
    /// says why with its exit status.
    pub fn abandon(&mut self, why: String) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            _ => {
                // A short grace: a successor that just failed exits by itself.
                std::thread::sleep(Duration::from_millis(100));
                match self.child.try_wait() {
                    Ok(Some(status)) => status,
                    _ => {
                        let _ = self.child.kill();
                        match self.child.wait() {
                            Ok(status) => status,
                            Err(e) => return format!("{why}; reaping it: {e}"),
                        }
                    }
                }
            }
        };
        format!("{why} (successor {status})")
    }
}

/// The successor's side: what it was handed.
#[derive(Debug)]
pub struct Taker {
    channel: Channel,
}

impl Taker {
    /// `Some` when this process was started by `tern upgrade`: adopts the
    /// descriptor named by [`ENV_FD`] (and clears the variable, so its own
    /// children do not see it).
    pub fn from_env() -> Result<Option<Taker>, String> {
        let Some(value) = std::env::var_os(ENV_FD) else {
            return Ok(None);
        };
        // Called early in start-up, before any thread that reads the
        // environment runs.
        std::env::remove_var(ENV_FD);
        let fd: i32 = value
            .to_str()
            .and_then(|s| s.parse().ok())
            .filter(|&fd| fd > 2)
            .ok_or_else(|| format!("{ENV_FD}={value:?} is not a descriptor number"))?;
        // SAFETY: the old process put this descriptor number in our
        // environment and cleared close-on-exec on it: it is open and ours.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Close-on-exec again: our own successors get a fresh pair.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        Ok(Some(Taker {
            channel: Channel::from_fd(owned),
        }))
    }

    /// Step 1: the configuration is valid; receives the listeners (step
    /// 2): the old process's generation, one [`Listeners`] per shard it
    /// ran, and its TLS ticket keys (if it had TLS).
    pub fn hello(&self) -> Result<(u64, Vec<Listeners>, Option<TicketKeys>), String> {
        let hello = Message::Hello {
            format: FORMAT_VERSION,
            pid: std::process::id(),
        };
        self.channel
            .send(hello, &[])
            .map_err(|e| format!("hand-over: sending Hello: {e}"))?;
        let (generation, counts) = match self.channel.recv(STEP_WAIT) {
            Ok((
                Message::Listeners {
                    format,
                    generation,
                    counts,
                },
                _,
            )) => {
                if format != FORMAT_VERSION {
                    return Err(format!(
                        "hand-over: the old process speaks format {format}, this binary only \
                         {FORMAT_VERSION}"
                    ));
                }
                (generation, counts)
            }
            Ok((other, _)) => return Err(format!("hand-over: expected Listeners, got {other:?}")),
            Err(e) => return Err(format!("hand-over: no listeners: {e}")),
        };
        // Kind after kind: one per shard of each configured listener.
        let mut kinds = Vec::with_capacity(LISTENERS);
        for (kind, count) in Listener::ALL.into_iter().zip(counts) {
            let fds = self
                .channel
                .recv_fds(usize::from(count), STEP_WAIT)
                .map_err(|e| format!("hand-over: receiving {kind:?} listeners: {e}"))?;
            kinds.push(fds.into_iter().map(TcpListener::from));
        }
        let [plain, tls, ws, mqtt, mqtt_tls]: [_; LISTENERS] =
            kinds.try_into().expect("one per kind");
        let (mut tls, mut ws, mut mqtt, mut mqtt_tls) = (tls, ws, mqtt, mqtt_tls);
        let listeners = plain
            .map(|plain| Listeners {
                plain,
                tls: tls.next(),
                ws: ws.next(),
                mqtt: mqtt.next(),
                mqtt_tls: mqtt_tls.next(),
            })
            .collect();
        let tickets = match self.channel.recv(STEP_WAIT) {
            Ok((Message::Tickets { keys }, _)) => keys,
            Ok((other, _)) => return Err(format!("hand-over: expected Tickets, got {other:?}")),
            Err(e) => return Err(format!("hand-over: no ticket keys: {e}")),
        };
        Ok((generation, listeners, tickets))
    }

    /// Step 3: waits until the old process has released the data
    /// directory.
    pub fn released(&self) -> Result<(), String> {
        match self.channel.recv(SERVING_WAIT) {
            Ok((Message::Released, _)) => Ok(()),
            Ok((other, _)) => Err(format!("hand-over: expected Released, got {other:?}")),
            Err(e) => Err(format!("hand-over: the old process did not release: {e}")),
        }
    }

    /// Step 4, once this process serves: receives the carried connections
    /// (their partial input at most `input_bytes_max`, this process's
    /// `frame_bytes_max`) and gives each to `adopt`, which may block until
    /// there is room for more. Returns how many came; an error says why the
    /// rest did not (their clients reconnect).
    pub fn take_carried(
        &self,
        input_bytes_max: usize,
        mut adopt: impl FnMut(OwnedFd, Carried),
    ) -> Result<u32, String> {
        let mut taken: u32 = 0;
        loop {
            match self.channel.recv_carried(input_bytes_max, STEP_WAIT) {
                Ok(Ok(batch)) => {
                    for (fd, state) in batch {
                        taken = taken.saturating_add(1);
                        adopt(fd, state);
                    }
                }
                Ok(Err(count)) if count == taken => return Ok(taken),
                Ok(Err(count)) => {
                    return Err(format!(
                        "hand-over: {taken} connections came, the old process sent {count}"
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "hand-over: receiving carried connections ({taken} so far): {e}"
                    ))
                }
            }
        }
    }

    /// Step 4: this process serves; the old one may exit.
    pub fn serving(self) -> Result<(), String> {
        self.channel
            .send(
                Message::Serving {
                    pid: std::process::id(),
                },
                &[],
            )
            .map_err(|e| format!("hand-over: sending Serving: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::state::Transport;

    #[test]
    fn the_successor_refuses_an_old_process_of_another_format() {
        let (old, new) = Channel::pair().unwrap();
        let taker = Taker { channel: new };
        let old = std::thread::spawn(move || {
            let (hello, _) = old.recv(STEP_WAIT).unwrap();
            assert!(matches!(
                hello,
                Message::Hello {
                    format: FORMAT_VERSION,
                    ..
                }
            ));
            // An old process of format 3 (whose carried connections
            // have no transport).
            let listeners = Message::Listeners {
                format: 3,
                generation: 0,
                counts: [0; LISTENERS],
            };
            old.send(listeners, &[]).unwrap();
            old
        });
        let err = taker.hello().unwrap_err();
        assert!(
            err.contains("the old process speaks format 3, this binary only 4"),
            "{err}"
        );
        drop(old.join().unwrap());
    }

    #[test]
    fn a_wrong_carried_count_is_an_error() {
        let (old, new) = Channel::pair().unwrap();
        let taker = Taker { channel: new };
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        let state = Carried {
            user: 7,
            device: 0,
            version: 1,
            input: Vec::new(),
            output: Vec::new(),
            transport: Transport::Tern,
            raw: Vec::new(),
        };
        old.send_carried(&[(x.into(), state.clone())]).unwrap();
        old.send(Message::Carried { count: 2 }, &[]).unwrap();
        let mut got = Vec::new();
        let err = taker.take_carried(16, |_, c| got.push(c)).unwrap_err();
        assert_eq!(got, [state]);
        assert!(
            err.contains("1 connections came, the old process sent 2"),
            "{err}"
        );
    }
}
