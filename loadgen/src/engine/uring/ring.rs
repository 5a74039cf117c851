//! One io_uring of a worker (the sink uses it too): its fixed-file table,
//! its provided-buffer ring, the chains waiting for room in its submission
//! queue, and reaping with CQ-overflow flushes; the eventfd every ring of a
//! thread signals; and the kernel probe.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::CHAIN_MAX;

/// An eventfd the thread sleeps on; every ring signals it.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn raw(&self) -> i32 {
        self.0.as_raw_fd()
    }

    /// Resets the counter (non-blocking).
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into `v`; EAGAIN (nothing to read) is fine.
        unsafe {
            libc::read(self.raw(), (&mut v as *mut u64).cast(), 8);
        }
    }

    /// Sleeps until the eventfd is signalled or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd and a valid timespec; EINTR just returns early.
        unsafe {
            libc::ppoll(&mut pfd, 1, &ts, std::ptr::null());
        }
    }
}

/// A provided-buffer ring (IORING_REGISTER_PBUF_RING): `entries` buffers of
/// `buf_bytes` each, in anonymous mappings that outlive the io_uring.
pub(crate) struct BufRing {
    /// The ring of buffer descriptors, `entries * 16` bytes, page aligned.
    ring: *mut types::BufRingEntry,
    ring_bytes: usize,
    /// The buffers, `entries * buf_bytes` bytes.
    bufs: *mut u8,
    bufs_bytes: usize,
    buf_bytes: u32,
    entries: u16,
    /// Our copy of the tail, published to the kernel by `publish`.
    tail: u16,
}

fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl BufRing {
    fn new(ring: &IoUring, entries: u16, buf_bytes: u32, bgid: u16) -> io::Result<BufRing> {
        assert!(
            entries.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let ring_bytes = entries as usize * std::mem::size_of::<types::BufRingEntry>();
        let bufs_bytes = entries as usize * buf_bytes as usize;
        let ring_ptr = mmap_anon(ring_bytes)?;
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: unmapping what was just mapped.
                unsafe { libc::munmap(ring_ptr.cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut br = BufRing {
            ring: ring_ptr.cast(),
            ring_bytes,
            bufs,
            bufs_bytes,
            buf_bytes,
            entries,
            tail: 0,
        };
        // SAFETY: the mapping is valid until `Drop`, which runs after the
        // io_uring it is registered with is dropped (field order in `Ring`).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_ptr as u64, entries, bgid, 0)?;
        }
        for bid in 0..entries {
            br.recycle(bid);
        }
        br.publish();
        Ok(br)
    }

    /// The bytes of buffer `bid`, `len` long.
    pub(super) fn buf(&self, bid: u16, len: usize) -> &[u8] {
        debug_assert!(bid < self.entries && len <= self.buf_bytes as usize);
        // SAFETY: bid < entries, so the range lies inside the mapping; the
        // kernel does not write a buffer until it is recycled.
        unsafe {
            std::slice::from_raw_parts(self.bufs.add(bid as usize * self.buf_bytes as usize), len)
        }
    }

    /// Hands buffer `bid` back (visible to the kernel after `publish`).
    pub(super) fn recycle(&mut self, bid: u16) {
        debug_assert!(bid < self.entries);
        let idx = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: idx < entries; the kernel only reads entries between its
        // head and the published tail, and this one is past the tail.
        unsafe {
            let e = &mut *self.ring.add(idx);
            e.set_addr(self.bufs.add(bid as usize * self.buf_bytes as usize) as u64);
            e.set_len(self.buf_bytes);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes recycled buffers to the kernel.
    pub(super) fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the mapping and is
        // only written by us; the kernel reads it with acquire semantics.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `new` and are unmapped once.
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
            libc::munmap(self.bufs.cast(), self.bufs_bytes);
        }
    }
}

/// One io_uring with its fixed-file table, its buffer ring and the chains
/// that did not fit in its submission queue yet.
pub(crate) struct Ring {
    // Dropped first: closing the ring before unmapping its buffers.
    pub(crate) ring: IoUring,
    pub(super) bufs: Option<BufRing>,
    /// Chains waiting for submission-queue space, oldest first.
    backlog: VecDeque<Vec<squeue::Entry>>,
}

impl Ring {
    /// A ring with `slots` fixed-file slots, signalling `efd`.
    pub(crate) fn new(
        sq_entries: u32,
        slots: u32,
        efd: &EventFd,
        bufs: Option<(u16, u32)>,
    ) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_cqsize(sq_entries * 8)
            .setup_submit_all()
            .setup_clamp()
            .build(sq_entries)?;
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::other("io_uring without IORING_FEAT_NODROP"));
        }
        ring.submitter().register_files_sparse(slots)?;
        ring.submitter().register_eventfd(efd.raw())?;
        let bufs = match bufs {
            Some((entries, bytes)) => Some(BufRing::new(&ring, entries, bytes, 0)?),
            None => None,
        };
        Ok(Ring {
            ring,
            bufs,
            backlog: VecDeque::new(),
        })
    }

    /// Queues a linked chain (all entries or none go into one submission).
    /// Returns false if it had to wait in the backlog.
    pub(crate) fn push(&mut self, chain: &[squeue::Entry]) -> bool {
        debug_assert!(!chain.is_empty() && chain.len() <= CHAIN_MAX);
        if self.backlog.is_empty() {
            // SAFETY: every pointer in the entries (addresses, option values,
            // buffers, timespecs) stays valid until the operation completes:
            // they point into boxes owned by the engine or the send slab.
            if unsafe { self.ring.submission().push_multiple(chain) }.is_ok() {
                return true;
            }
            // The submission queue is full: hand it to the kernel and retry
            // once. An error here (EBUSY while the CQ overflows, EAGAIN) leaves
            // the entries queued; `flush` retries them.
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push_multiple(chain) }.is_ok() {
                return true;
            }
        }
        self.backlog.push_back(chain.to_vec());
        false
    }

    /// Chains waiting in the backlog.
    pub(crate) fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Moves backlog into the submission queue and submits. Returns true if
    /// the submission queue had to leave entries behind.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        for _ in 0..4 {
            {
                let mut sq = self.ring.submission();
                while let Some(chain) = self.backlog.front() {
                    if sq.capacity() - sq.len() < chain.len() {
                        break;
                    }
                    // SAFETY: as in `push`.
                    unsafe { sq.push_multiple(chain) }.expect("room was checked");
                    self.backlog.pop_front();
                }
                if sq.is_empty() {
                    return Ok(!self.backlog.is_empty());
                }
            }
            match self.ring.submit() {
                Ok(_) => {}
                // The completion queue is overflowing and the kernel cannot take
                // more: the caller reaps, and we submit again on the next poll.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(true),
                // Kernel out of memory for requests right now; retry next poll.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(false);
            }
        }
        Ok(!self.backlog.is_empty())
    }

    /// Copies up to `max` completions into `out`. If the completion queue had
    /// overflowed, enters the kernel to flush the overflow list first.
    pub(crate) fn reap(
        &mut self,
        out: &mut Vec<(u64, i32, u32)>,
        max: usize,
        overflow_flushes: &mut u64,
    ) {
        if self.ring.submission().cq_overflow() {
            // submit_and_wait(0) enters with GETEVENTS when the overflow flag is
            // set, which moves overflowed completions into the CQ.
            *overflow_flushes += 1;
            let _ = self.ring.submit_and_wait(0);
        }
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in cq.by_ref().take(max) {
            out.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }
}

/// Checks that this kernel has what the engine uses (direct-descriptor
/// SOCKET, BIND, socket commands, provided-buffer rings). `Err` says what is
/// missing; the caller then falls back to the poll engine.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p)?;
    for (code, name) in [
        (opcode::Socket::CODE, "SOCKET"),
        (opcode::Bind::CODE, "BIND"),
        (opcode::SetSockOpt::CODE, "URING_CMD (SETSOCKOPT)"),
        (opcode::Connect::CODE, "CONNECT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Close::CODE, "CLOSE"),
        (opcode::AcceptMulti::CODE, "ACCEPT"),
    ] {
        if !p.is_supported(code) {
            return Err(io::Error::other(format!("io_uring lacks {name}")));
        }
    }
    ring.submitter().register_files_sparse(4)?;
    let efd = EventFd::new()?;
    drop(Ring::new(8, 4, &efd, Some((4, 64)))?);
    Ok(())
}
