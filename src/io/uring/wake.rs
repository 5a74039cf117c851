//! Waking the thread: the eventfd other threads write ([`WakeHandle`]),
//! whose READ the wait ring keeps armed (see "Rings" in the module docs).

use super::*;

/// Wakes the ring's owner: an eventfd whose READ ring 0 keeps armed.
#[derive(Clone, Debug)]
pub struct WakeHandle(pub(super) Arc<OwnedFd>);

impl WakeHandle {
    /// Interrupts the owner's `wait`. A failure is logged: a lost wake-up is
    /// recovered by the owner's next timer tick.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The counter is at its maximum: a wake-up is pending anyway.
                Some(libc::EAGAIN) => {}
                _ => log::warn!("wake failed: {e}"),
            }
        }
    }
}

impl Io {
    pub(super) fn arm_wake_read(&mut self) {
        let w = self.wait_ring();
        let entry = opcode::Read::new(
            types::Fd(self.wake.0.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(Tag::ring(Op::WakeRead, w).encode());
        // SAFETY: `wake_buf` is a Box owned by `self`, not read while the
        // READ is in flight, and freed only after `Drop` quiesced the rings.
        unsafe { self.rings[w].push(Chain::One(entry)) };
        self.wake_armed = true;
    }

    pub(super) fn on_wake_read(&mut self, res: i32) {
        self.wake_armed = false;
        if res >= 0 {
            if !matches!(self.events.back(), Some(Event::Woken)) {
                self.events.push_back(Event::Woken);
            }
            return;
        }
        match -res {
            // Cancelled while dropping: stays unarmed.
            libc::ECANCELED => self.wake_armed = true,
            // Nothing to read after all (spurious readiness): re-armed in prepare.
            libc::EAGAIN | libc::EINTR => {}
            e => log::warn!("shard {}: eventfd read: errno {e}", self.shard),
        }
    }
}
