//! Sending: one SEND in flight per connection from a buffer the backend
//! owns, short sends resubmitted, Writable when it drains, SHUTDOWN after
//! it (see "Sends" in the module docs).

use super::*;

/// Most completed send buffers kept for reuse per shard.
pub(super) const SPARE_SENDS_MAX: usize = 32;
/// Largest capacity of a send buffer kept for reuse, bytes (so the spares
/// hold at most 1 MiB per shard).
const SPARE_SEND_BYTES_MAX: usize = 32 * 1024;

/// Bytes taken by `send`, owned here while the kernel reads them.
pub(super) struct SendBuf {
    bytes: Vec<u8>,
    /// Bytes already sent, `0..bytes.len()`.
    sent: usize,
}

impl SendBuf {
    /// A zeroed buffer of `len` bytes for the kernel to fill (the source
    /// address of a connection not reported yet: no SEND can use `out`).
    pub(super) fn zeroed(len: usize) -> SendBuf {
        SendBuf {
            bytes: vec![0; len],
            sent: 0,
        }
    }

    /// The bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the kernel may write them.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.bytes.as_mut_ptr()
    }
}

impl Io {
    /// Takes up to [`SEND_BYTES_MAX`] of `bytes` into a SEND; 0 while one is
    /// already in flight or the descriptor has not arrived (Writable follows).
    pub fn send(&mut self, conn: ConnId, bytes: &[u8]) -> io::Result<usize> {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if c.has(flag::BROKEN) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if bytes.is_empty() {
            return Ok(0);
        }
        if c.state != State::Live || c.has(flag::SEND_INFLIGHT) || c.out.is_some() {
            c.set(flag::WANT_WRITE);
            return Ok(0);
        }
        let n = bytes.len().min(SEND_BYTES_MAX);
        let mut out = self.spare_sends.pop().unwrap_or_else(|| {
            Box::new(SendBuf {
                bytes: Vec::new(),
                sent: 0,
            })
        });
        debug_assert!(out.bytes.is_empty() && out.sent == 0);
        out.bytes.extend_from_slice(&bytes[..n]);
        c.out = Some(out);
        if n < bytes.len() {
            c.set(flag::WANT_WRITE);
        }
        self.submit_send(key);
        Ok(n)
    }

    /// Half-closes the sending side once the send in flight is out.
    pub fn shutdown_write(&mut self, conn: ConnId) {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return;
        };
        if c.state == State::Live && !c.has(flag::SEND_INFLIGHT) {
            self.submit_shutdown(key);
        } else {
            c.set(flag::SHUT_WR_PENDING);
        }
    }

    fn submit_send(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let out = c.out.as_ref().expect("send with a buffer");
        let rest = &out.bytes[out.sent..];
        let entry = opcode::Send::new(types::Fixed(c.slot), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        c.set(flag::SEND_INFLIGHT);
        // The buffer is `c.out`, kept until this SEND's completion.
        self.push_conn_op(key, entry, Op::Send);
    }

    pub(super) fn submit_shutdown(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.clear(flag::SHUT_WR_PENDING);
        c.set(flag::SHUTDOWN_INFLIGHT);
        let entry = opcode::Shutdown::new(types::Fixed(c.slot), libc::SHUT_WR).build();
        self.push_conn_op(key, entry, Op::Shutdown);
    }

    /// A SHUTDOWN completed (its result does not matter: the peer may be
    /// gone); a close that waited for it goes on now.
    pub(super) fn on_shutdown(&mut self, t: Tag) {
        if let Some(c) = self.conn_of(t) {
            c.clear(flag::SHUTDOWN_INFLIGHT);
            if c.has(flag::CLOSE_AFTER_SHUTDOWN) {
                c.clear(flag::CLOSE_AFTER_SHUTDOWN);
                self.start_close(t.key);
            }
        }
        self.op_done(t);
    }

    pub(super) fn on_send(&mut self, t: Tag, res: i32) {
        let Some(c) = self.conn_of(t) else {
            return;
        };
        c.clear(flag::SEND_INFLIGHT);
        c.ops = c.ops.saturating_sub(1);
        let key = t.key;
        if c.state != State::Live {
            c.out = None; // closing or moving away: nothing more goes out
            self.maybe_free(key);
            return;
        }
        let gen = c.gen;
        if res > 0 {
            let out = c.out.as_mut().expect("a SEND has its buffer");
            out.sent += res as usize;
            if out.sent < out.bytes.len() {
                self.submit_send(key); // short send: the rest goes next
            } else {
                let done = c.out.take().expect("a SEND has its buffer");
                self.recycle_send(done);
                self.send_drained(key);
            }
            return;
        }
        match -res {
            // No room or no memory for now: send the rest again.
            libc::EAGAIN | libc::ENOBUFS | libc::EINTR => self.submit_send(key),
            // Cancelled by a close under way.
            libc::ECANCELED => c.out = None,
            // 0 bytes for a non-empty send, EPIPE, ECONNRESET, ...: broken.
            _ => {
                c.out = None;
                c.set(flag::BROKEN | flag::PEER_CLOSED);
                if c.has(flag::VISIBLE) {
                    self.events.push_back(Event::Closed(key, gen));
                }
            }
        }
    }

    /// Keeps a sent buffer for the next `send`, unless the spares are full
    /// or it is large (a burst's buffer is freed, not kept).
    fn recycle_send(&mut self, mut done: Box<SendBuf>) {
        if self.spare_sends.len() < SPARE_SENDS_MAX && done.bytes.capacity() <= SPARE_SEND_BYTES_MAX
        {
            done.bytes.clear();
            done.sent = 0;
            self.spare_sends.push(done);
        }
    }

    /// The send buffer is empty: shut down if asked, report Writable if the
    /// shard was told 0.
    fn send_drained(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let gen = c.gen;
        if c.has(flag::SHUT_WR_PENDING) {
            self.submit_shutdown(key);
        }
        let c = &mut self.conns[key as usize];
        if c.has(flag::WANT_WRITE) {
            c.clear(flag::WANT_WRITE);
            self.events.push_back(Event::Writable(key, gen));
        }
    }
}
