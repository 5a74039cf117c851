//! The service manager's readiness protocol (systemd's `sd_notify`): one
//! datagram of `KEY=value` lines to the Unix socket named by
//! `$NOTIFY_SOCKET`, which systemd sets for a `Type=notify` unit.
//!
//! Tern says `READY=1` once it serves, `STOPPING=1` when it begins to stop,
//! and, as the successor of a live upgrade, `MAINPID=<its pid>` with
//! `READY=1` before its predecessor exits: so systemd follows the service
//! to the new process instead of taking the old one's exit for the
//! service's end (this needs `NotifyAccess=all`: the successor is not the
//! process systemd started). Without `$NOTIFY_SOCKET` nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` unit.
pub const ENV_SOCKET: &str = "NOTIFY_SOCKET";

/// Whether a service manager listens (`$NOTIFY_SOCKET` is set).
pub fn listening() -> bool {
    std::env::var_os(ENV_SOCKET).is_some_and(|s| !s.is_empty())
}

/// Sends `state` (newline-separated `KEY=value` lines) to the service
/// manager. `Ok(false)` when none listens; an error when the socket is
/// named but cannot take the datagram.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(ENV_SOCKET).filter(|s| !s.is_empty()) {
        Some(path) => send(&path, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the socket `path` (a file, or `@name` in the abstract
/// namespace).
fn send(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => send_abstract(&socket, name, state),
        None => socket
            .send_to(state.as_bytes(), std::path::Path::new(path))
            .map(|_| ()),
    }
}

/// A socket in Linux's abstract namespace (`@name`).
#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

/// Abstract Unix sockets exist only on Linux (and so does systemd).
#[cfg(not(target_os = "linux"))]
fn send_abstract(_socket: &UnixDatagram, _name: &[u8], _state: &str) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract NOTIFY_SOCKET outside Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("tern-notify-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
            send(format!("@{name}").as_ref(), "MAINPID=42\nREADY=1").unwrap();
            let n = abstract_listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"MAINPID=42\nREADY=1");
        }

        // Named but gone: an error, not silence.
        assert!(send(dir.path().join("gone").as_os_str(), "READY=1").is_err());
    }
}
