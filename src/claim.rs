//! Claiming a listen address at start-up, and telling a live listener from
//! the leftover of a killed one.
//!
//! The shards share the port through `SO_REUSEPORT`, which would also let a
//! second tern (or anything else of the same user) join silently and take
//! part of the connections. So a plain bind comes first: EADDRINUSE means
//! somebody listens there, and the start is refused.
//!
//! Not everybody who listens is alive, though. After `kill -9` of an
//! io_uring server, the dead process's ring keeps its listening sockets
//! (the ring's pending accepts hold them) until the kernel has torn the ring
//! down, which takes up to about a second: the sockets are still in LISTEN
//! state, but no process holds them. A restart in that window is retried
//! (for up to `listen_retry_ms`, with one log line) instead of failing.
//!
//! The rule, on Linux: an address in use is retried while every socket
//! listening on its port is one of our user's (or we are root) and is open
//! in no process (no `/proc/PID/fd` entry names it): a socket nobody can
//! accept on is on its way out. A listener open in any process, or one of
//! another user that we cannot look into, is live: refused at once. A port
//! in use with no listening socket on it (it was released in between, or a
//! plain bound socket holds it) is retried too, within the same bound.
//! Elsewhere nothing is retried.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Pause between two binds while waiting for a dead listener to go.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Who holds a port that a bind found in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A listening socket is open in this live process.
    Live(u32),
    /// A listening socket belongs to another user, whose processes we
    /// cannot inspect: taken as live.
    OtherUser,
    /// Every listening socket on the port is open in no process: a killed
    /// process's, still being released.
    Dying,
    /// No socket listens on the port.
    Nobody,
    /// This OS cannot tell: taken as live.
    Unknown,
}

/// Binds `addr` plainly (no `SO_REUSEPORT`) to check that nobody listens on
/// it, and returns it with port 0 resolved. While the port is held only by
/// dying listeners (see the module doc), retries for up to `retry`, saying
/// so in one log line; `what` names the address's key in messages.
///
/// # Errors
///
/// EADDRINUSE at once when a live process listens there, or once `retry`
/// has passed; the message names the holder or the wait. Other bind errors
/// as they come.
pub fn claim(addr: SocketAddr, retry: Duration, what: &str) -> io::Result<SocketAddr> {
    let started = Instant::now();
    let mut logged = false;
    loop {
        let err = match probe(addr) {
            Ok(bound) => return Ok(bound),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => e,
            Err(e) => return Err(e),
        };
        match holder(addr.port()) {
            Holder::Live(pid) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("{err}: process {pid} listens there"),
                ))
            }
            Holder::OtherUser => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("{err}: another user's process listens there"),
                ))
            }
            Holder::Unknown => return Err(err),
            Holder::Dying | Holder::Nobody => {}
        }
        if started.elapsed() >= retry {
            let waited = if retry.is_zero() {
                String::new()
            } else {
                format!(
                    "; still in use after retrying for {} ms (listen_retry_ms)",
                    retry.as_millis()
                )
            };
            return Err(io::Error::new(err.kind(), format!("{err}{waited}")));
        }
        if !logged {
            logged = true;
            log::warn!(
                "{what} {addr}: address in use by no live listener (a killed server's sockets being released); retrying for up to {} ms",
                retry.as_millis()
            );
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
}

/// One plain bind of `addr`; the socket is closed again at once.
fn probe(addr: SocketAddr) -> io::Result<SocketAddr> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // TIME_WAIT leftovers of an earlier run are fine; a listener is not.
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    let bound = probe.local_addr()?.as_socket();
    bound.ok_or_else(|| io::Error::other("not an IP address"))
}

/// Who holds TCP `port` (see [`Holder`]).
#[cfg(target_os = "linux")]
pub fn holder(port: u16) -> Holder {
    let mut listeners = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // A missing table (no IPv6) has no listeners.
        if let Ok(text) = std::fs::read_to_string(table) {
            listeners.extend(listening_on(&text, port));
        }
    }
    if listeners.is_empty() {
        return Holder::Nobody;
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && listeners.iter().any(|l| l.uid != euid) {
        return Holder::OtherUser;
    }
    match open_in(&listeners) {
        Some(pid) => Holder::Live(pid),
        None => Holder::Dying,
    }
}

/// Who holds TCP `port`: this OS cannot tell, so nothing is retried.
#[cfg(not(target_os = "linux"))]
pub fn holder(_port: u16) -> Holder {
    Holder::Unknown
}

/// A listening socket from `/proc/net/tcp{,6}`.
#[cfg(any(target_os = "linux", test))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Listening {
    uid: u32,
    inode: u64,
}

/// The sockets in LISTEN state on `port` in a `/proc/net/tcp` or `tcp6`
/// table (any local address: all of them conflict with some bind).
#[cfg(any(target_os = "linux", test))]
fn listening_on(table: &str, port: u16) -> Vec<Listening> {
    /// `st` of a listening socket (`TCP_LISTEN`).
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            if u16::from_str_radix(local_port, 16).ok()? != port || *f.get(3)? != LISTEN {
                return None;
            }
            Some(Listening {
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The first process with one of `listeners` among its open files.
#[cfg(target_os = "linux")]
fn open_in(listeners: &[Listening]) -> Option<u32> {
    let names: Vec<String> = listeners
        .iter()
        .map(|l| format!("socket:[{}]", l.inode))
        .collect();
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile, or one we may not look into
        // (another user's: ruled out above unless we are root), has no
        // entries for us.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if names.iter().any(|n| target.as_os_str() == n.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1466 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 37572 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1466 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 37580 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1467 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 37590 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn finds_only_listeners_on_the_port() {
        assert_eq!(
            listening_on(TABLE, 0x1466),
            vec![Listening {
                uid: 0,
                inode: 37572
            }]
        );
        assert_eq!(
            listening_on(TABLE, 0x1467),
            vec![Listening {
                uid: 1000,
                inode: 37590
            }]
        );
        assert!(listening_on(TABLE, 0x1468).is_empty());
        assert!(listening_on("", 0x1466).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_listener_we_hold_is_live_and_a_free_port_is_nobodys() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(holder(port), Holder::Live(std::process::id()));
        let err = claim(
            listener.local_addr().unwrap(),
            Duration::from_secs(60),
            "listen",
        )
        .unwrap_err();
        assert!(err.to_string().contains("listens there"), "{err}");
        drop(listener);
        assert_eq!(holder(port), Holder::Nobody);
    }
}
