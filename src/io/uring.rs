//! io_uring backend (not yet built: creation fails, so `auto` uses poll).

use std::io;
use std::net::TcpListener;
use std::time::Duration;

use super::{Completion, ConnId, IoOptions};

/// Backend name for `show info`.
pub const BACKEND_NAME: &str = "uring";

/// A connection handed to another shard.
#[derive(Debug)]
pub struct Detached;

/// Wakes the ring's owner.
#[derive(Clone, Debug)]
pub struct WakeHandle;

impl WakeHandle {
    /// Wakes the owner.
    pub fn wake(&self) {}
}

/// What other shards need to hand connections over.
#[derive(Clone, Debug)]
pub struct PeerInfo;

/// The io_uring backend.
pub struct Io;

fn unsupported<T>() -> io::Result<T> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the io_uring backend is not built yet",
    ))
}

#[allow(missing_docs, clippy::missing_errors_doc)]
impl Io {
    pub fn new(_listener: TcpListener, _options: &IoOptions) -> io::Result<Io> {
        unsupported()
    }
    pub fn wake_handle(&self) -> WakeHandle {
        WakeHandle
    }
    pub fn peer_info(&self) -> PeerInfo {
        PeerInfo
    }
    pub fn set_peers(&mut self, _peers: Vec<PeerInfo>) {}
    pub fn wait(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        unsupported()
    }
    pub fn next(&mut self, _scratch: &mut [u8]) -> Option<Completion> {
        None
    }
    pub fn send(&mut self, _conn: ConnId, _bytes: &[u8]) -> io::Result<usize> {
        unsupported()
    }
    pub fn set_recv(&mut self, _conn: ConnId, _on: bool) {}
    pub fn established(&mut self, _conn: ConnId) {}
    pub fn shutdown_write(&mut self, _conn: ConnId) {}
    pub fn close(&mut self, _conn: ConnId) {}
    pub fn detach(&mut self, _conn: ConnId, _dst: usize) -> io::Result<Detached> {
        unsupported()
    }
    pub fn attach(&mut self, _d: Detached) -> io::Result<ConnId> {
        unsupported()
    }
    pub fn stop_accepting(&mut self) {}
    pub fn conn_count(&self) -> usize {
        0
    }
}
