//! Accepting: each listener's multishot accept on ring 0, armed only while
//! ring 0 has room for one burst, paused after resource errors.

use super::*;

/// One listener's multishot accept.
#[derive(Default)]
pub(super) struct Accept {
    pub(super) armed: bool,
    pub(super) cancelling: bool,
    /// Re-arm no earlier than this (after a resource error).
    pub(super) retry_at: Option<Instant>,
}

impl Io {
    /// Stops accepting: cancels the accepts and closes the listeners.
    pub fn stop_accepting(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].take().is_some()
                && self.accept[i].armed
                && !self.accept[i].cancelling
            {
                self.cancel_accept(i);
            }
        }
    }

    /// Arms, pauses (by cancelling) or leaves each listener's multishot
    /// accept, by ring 0's free slots: one arming may accept up to a CQ-full
    /// of connections, and the margin holds one such burst per listener.
    pub(super) fn check_accept(&mut self) {
        for i in 0..self.listeners.len() {
            self.check_accept_of(i);
        }
    }

    fn check_accept_of(&mut self, i: usize) {
        let Some(listener) = self.listeners[i].as_ref() else {
            return;
        };
        let free = self.rings[0].slots_free();
        let accept = &mut self.accept[i];
        if accept.armed {
            if free < self.accept_margin_slots && !accept.cancelling {
                self.cancel_accept(i);
            }
            return;
        }
        if free < self.accept_margin_slots || accept.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        accept.retry_at = None;
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(accept_tag(i));
        // SAFETY: the accept names no memory (no address out-parameters).
        unsafe { self.rings[0].push(Chain::One(entry)) };
        self.accept[i].armed = true;
    }

    fn cancel_accept(&mut self, i: usize) {
        let entry = opcode::AsyncCancel::new(accept_tag(i))
            .build()
            .user_data(Tag::ring(Op::Misc, 0).encode());
        // SAFETY: a cancel names no memory.
        unsafe { self.rings[0].push(Chain::One(entry)) };
        self.accept[i].cancelling = true;
    }

    /// A completion of listener `i`'s multishot accept.
    pub(super) fn on_accept(&mut self, i: usize, res: i32, flags: u32) {
        debug_assert!(i < self.listeners.len(), "accept tag names listener {i}");
        if !cqueue::more(flags) {
            self.accept[i].armed = false;
            self.accept[i].cancelling = false;
        }
        if res >= 0 {
            let slot = res as u32;
            self.rings[0].slots_used += 1;
            if self.listeners[i].is_none() {
                self.close_raw(0, slot); // accepted while stop_accepting's cancel was on its way
                return;
            }
            let mut flags = flag::FROM_ACCEPT;
            if i == Listener::Tls.index() {
                flags |= flag::FROM_TLS;
            } else if i == Listener::Ws.index() {
                flags |= flag::FROM_WS;
            } else if i == Listener::Mqtt.index() {
                flags |= flag::FROM_MQTT;
            } else if i == Listener::MqttTls.index() {
                flags |= flag::FROM_MQTT | flag::FROM_TLS;
            }
            let key = self.new_conn(0, slot, flags, State::Live);
            self.make_home(key);
            // React within the burst if ring 0 runs low.
            for j in 0..self.accept.len() {
                if self.accept[j].armed
                    && !self.accept[j].cancelling
                    && self.rings[0].slots_free() < self.accept_margin_slots
                {
                    self.cancel_accept(j);
                }
            }
            return;
        }
        match -res {
            // Our cancel: stop_accepting, or ring 0 ran low on slots.
            libc::ECANCELED => {}
            // The peer gave up while in the backlog; a transient failure.
            libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPERM => {}
            // The fixed table was full and the kernel closed the connection
            // it accepted. The margin exists so this never happens.
            libc::ENFILE => log::error!(
                "shard {}: accept found ring 0's fixed-file table full; a connection was lost",
                self.shard
            ),
            // Out of a resource: the connection stays in the backlog; pause.
            libc::EMFILE | libc::ENOMEM | libc::ENOBUFS => {
                log::warn!(
                    "shard {}: accept: errno {}; pausing accepts for {ACCEPT_RETRY:?}",
                    self.shard,
                    -res
                );
                self.accept[i].retry_at = Some(Instant::now() + ACCEPT_RETRY);
            }
            // The listener is unusable: stop accepting on this shard.
            libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP => {
                log::error!(
                    "shard {}: accept: errno {}; listener dropped",
                    self.shard,
                    -res
                );
                self.listeners[i] = None;
            }
            e => {
                log::warn!("shard {}: accept: errno {e}; retrying", self.shard);
                self.accept[i].retry_at = Some(Instant::now() + ACCEPT_RETRY);
            }
        }
    }
}

/// The `user_data` of listener `i`'s multishot accept: the key says which.
pub(super) fn accept_tag(i: usize) -> u64 {
    Tag::new(Op::Accept, 0, i as u32, 0).encode()
}
