//! The one boundary between a shard and the operating system.
//!
//! A shard owns one [`Io`]. The contract is completion-shaped on every OS so
//! that the session logic above it is written once:
//!
//! - [`Io::wait`] blocks until something happened (or the timeout passed).
//! - [`Io::next`] hands out one [`Completion`] at a time: a connection was
//!   accepted, bytes arrived (copied into the caller's scratch buffer), a
//!   connection can take more output, a connection was closed by the peer, or
//!   another shard woke us. It never calls back into the shard: the shard
//!   drains completions in its own loop (no re-entrancy, bounded stack).
//! - [`Io::send`] takes as many bytes as the connection accepts now and says
//!   how many; for the rest the shard keeps its own buffer and waits for
//!   [`Completion::Writable`].
//! - [`Io::close`] releases a connection. A [`ConnId`] stays valid (and is not
//!   reused) until the shard closes it, even after [`Completion::Closed`].
//! - [`Io::detach`] / [`Io::attach`] move a connection to another shard.
//!
//! The readiness backend ([`poll`], epoll/kqueue through mio) reads and
//! retries `WouldBlock` itself, so it looks like a completion backend. A
//! completion backend (io_uring) fits the same face: its provided-buffer
//! receives are copied into the scratch buffer and the buffer is returned to
//! the kernel at once.

pub mod poll;

pub use poll::{Detached, Io, WakeHandle};

/// A connection slot in one shard's [`Io`]. Dense: ids are reused after close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u32);

impl ConnId {
    /// The slot as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Something that happened, handed out by [`Io::next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// A new connection from the listener.
    Accepted(ConnId),
    /// `len` bytes from the connection are in the scratch buffer, `scratch[..len]`.
    Recv(ConnId, usize),
    /// The connection can take more output after a short [`Io::send`].
    Writable(ConnId),
    /// The peer closed the connection or it failed; the shard must [`Io::close`] it.
    Closed(ConnId),
    /// Another shard called [`WakeHandle::wake`].
    Woken,
}

/// Name of the backend compiled for this OS, for `show info`.
pub const BACKEND_NAME: &str = poll::BACKEND_NAME;
