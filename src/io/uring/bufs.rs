//! A provided-buffer ring (IORING_REGISTER_PBUF_RING): receive buffers the
//! kernel picks from when data arrives, so no buffer is tied to an idle
//! connection.
//!
//! The shared ring is an array of `{addr, len, bid}` descriptors; the tail
//! (written by us, read by the kernel) overlays the reserved field of entry
//! 0. We hand a buffer back by writing its descriptor at the tail and
//! publishing the new tail with a release store.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;

/// The shared descriptor, `struct io_uring_buf` of the kernel ABI.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    /// Entry 0's is the ring tail.
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<RawBuf>() == 16);

/// The kernel requires the ring to be page aligned.
const RING_ALIGN_BYTES: usize = 4096;
/// The kernel's limit on descriptors per buffer ring.
pub(super) const BUFS_PER_RING_MAX: u16 = 32768;

/// One buffer group's ring and the buffers it hands out.
pub(super) struct BufRing {
    /// `entries` descriptors shared with the kernel.
    ring: NonNull<RawBuf>,
    ring_layout: Layout,
    /// `entries * buf_bytes` bytes of buffers.
    bufs: NonNull<u8>,
    bufs_layout: Layout,
    /// Descriptors in the ring, a power of two in `1..=BUFS_PER_RING_MAX`.
    entries: u16,
    /// Bytes of each buffer.
    buf_bytes: u32,
    /// Our tail; the kernel sees it once published.
    tail: u16,
    /// The group id the ring is registered under.
    bgid: u16,
    /// Still registered with the kernel: the memory must not be freed.
    registered: bool,
}

// SAFETY: the ring and buffers are plain memory owned by this value alone;
// nothing about them is tied to the creating thread. (The io_uring the
// group is registered with is single-issuer, which the kernel enforces.)
unsafe impl Send for BufRing {}

impl BufRing {
    /// Allocates `entries` buffers of `buf_bytes`, registers them as group
    /// `bgid` of the ring behind `submitter` and hands them all to the kernel.
    pub fn new(
        submitter: &Submitter<'_>,
        bgid: u16,
        entries: u16,
        buf_bytes: u32,
    ) -> io::Result<BufRing> {
        assert!(
            entries.is_power_of_two() && entries <= BUFS_PER_RING_MAX,
            "buffer ring entries must be a power of two up to {BUFS_PER_RING_MAX}"
        );
        assert!(buf_bytes > 0);
        let ring_layout = Layout::from_size_align(
            entries as usize * std::mem::size_of::<RawBuf>(),
            RING_ALIGN_BYTES,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bufs_layout = Layout::from_size_align(entries as usize * buf_bytes as usize, 64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size (entries >= 1, buf_bytes >= 1).
        let ring = NonNull::new(unsafe { alloc::alloc_zeroed(ring_layout) }.cast::<RawBuf>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: as above. Zeroed so that no byte we ever read is uninitialised.
        let Some(bufs) = NonNull::new(unsafe { alloc::alloc_zeroed(bufs_layout) }) else {
            // SAFETY: `ring` was allocated just above with `ring_layout`.
            unsafe { alloc::dealloc(ring.as_ptr().cast(), ring_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        let mut this = BufRing {
            ring,
            ring_layout,
            bufs,
            bufs_layout,
            entries,
            buf_bytes,
            tail: 0,
            bgid,
            registered: false,
        };
        // SAFETY: the ring memory is page aligned, holds `entries`
        // descriptors and stays allocated until it is unregistered (`Drop`
        // leaks it if unregistering did not happen).
        unsafe {
            submitter.register_buf_ring_with_flags(ring.as_ptr() as u64, entries, bgid, 0)?;
        }
        this.registered = true;
        for bid in 0..entries {
            this.put(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The group id to name in receives.
    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Bytes of each buffer.
    pub fn buf_bytes(&self) -> u32 {
        self.buf_bytes
    }

    /// The first `len` bytes of buffer `bid`, which a completion handed us.
    pub fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        assert!(
            len <= self.buf_bytes as usize,
            "length {len} beyond the buffer"
        );
        // SAFETY: in bounds (checked above). The kernel wrote this buffer
        // before posting the completion that gave it to us and does not touch
        // it again until `recycle` hands it back, so nothing writes it while
        // the returned borrow (tied to `&self`) lives.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .as_ptr()
                    .add(bid as usize * self.buf_bytes as usize),
                len,
            )
        }
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        self.put(bid);
        self.publish();
    }

    fn put(&mut self, bid: u16) {
        let index = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `index < entries`, inside the ring allocation. The kernel
        // only reads descriptors before the published tail, and this one is
        // at the tail, so it is ours to write. Fields are written one by one
        // through raw pointers so entry 0's `resv` (the tail) is not touched.
        unsafe {
            let entry = self.ring.as_ptr().add(index);
            std::ptr::addr_of_mut!((*entry).addr).write(
                self.bufs
                    .as_ptr()
                    .add(bid as usize * self.buf_bytes as usize) as u64,
            );
            std::ptr::addr_of_mut!((*entry).len).write(self.buf_bytes);
            std::ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: entry 0's `resv` is the ring tail in the kernel ABI: a u16
        // at a 2-aligned address inside our allocation, which the kernel only
        // reads. The release store makes the descriptors written before it
        // visible first.
        let tail =
            unsafe { &*(std::ptr::addr_of_mut!((*self.ring.as_ptr()).resv) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Unregisters the group so the memory may be freed; call only when no
    /// receive that selects from it is in flight.
    pub fn unregister(&mut self, submitter: &Submitter<'_>) {
        if self.registered {
            match submitter.unregister_buf_ring(self.bgid) {
                Ok(()) => self.registered = false,
                Err(e) => log::warn!("unregister buffer ring {}: {e}", self.bgid),
            }
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // The kernel may still hold the ring and pick buffers: leaking is
            // the safe choice (this only happens if quiescing failed).
            log::warn!("buffer ring {} still registered: leaking it", self.bgid);
            return;
        }
        // SAFETY: both were allocated in `new` with these layouts, and the
        // kernel no longer knows the ring (unregistered), so nothing uses them.
        unsafe {
            alloc::dealloc(self.ring.as_ptr().cast(), self.ring_layout);
            alloc::dealloc(self.bufs.as_ptr(), self.bufs_layout);
        }
    }
}
