//! Closing: cancel what is in flight, CLOSE the slot, free the zombie once
//! its last completion came; and at drop, quiesce every ring before any
//! buffer the kernel may touch is freed (see "Closing and handing off"
//! in the module docs).

use super::*;

impl Io {
    /// Closes the connection: its ConnId is the shard's no more.
    pub fn close(&mut self, conn: ConnId) {
        let key = conn.0;
        self.peer_ips.remove(&key);
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return;
        };
        c.clear(flag::VISIBLE);
        c.held = None;
        let gen = c.gen;
        self.visible -= 1;
        match c.state {
            State::Live => self.start_close(key),
            State::Moving => c.set(flag::CLOSE_REQUESTED),
            State::AwaitingFd => {
                let id = self.handoffs_in.iter().find_map(|(id, h)| match *h {
                    HandoffIn::Attached { key: k, gen: g } if k == key && g == gen => Some(*id),
                    _ => None,
                });
                if let Some(id) = id {
                    self.handoffs_in.insert(id, HandoffIn::Abandoned);
                }
                c.state = State::Closing;
                self.maybe_free(key);
            }
            State::Detaching | State::Closing => unreachable!("a zombie is never visible"),
        }
    }

    /// Cancels the connection's receive and send, then CLOSEs its slot; the
    /// cancels go first in the ring's order. The slot is reused only after
    /// the CLOSE. With a SHUTDOWN in flight all of this waits for its
    /// completion: it may run in the kernel's worker pool, which looks the
    /// fixed slot up only when it runs, so a CLOSE before it let the slot's
    /// next connection (the next accept takes the lowest free slot) be shut
    /// down instead, its LOGIN answered by a bare FIN (issue 15).
    ///
    /// Cancels name the operations by user_data, not the slot: the kernel
    /// matches a cancel by file by walking every armed request of the ring,
    /// which made closing n idle connections cost O(n^2) (33k connections
    /// took 20 s to close at shutdown).
    pub(super) fn start_close(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.state = State::Closing;
        c.held = None;
        if c.slot == NO_SLOT {
            self.maybe_free(key);
            return;
        }
        if c.has(flag::SHUTDOWN_INFLIGHT) {
            c.set(flag::CLOSE_AFTER_SHUTDOWN);
            return;
        }
        let (ring, gen, slot) = (c.ring as usize, c.gen, c.slot);
        let mut cancels = Vec::new();
        if c.has(flag::RECV_ARMED) && !c.has(flag::RECV_CANCELLING) {
            c.set(flag::RECV_CANCELLING);
            cancels.push(Tag::new(Op::Recv, ring, key, gen).encode());
        }
        if c.has(flag::SEND_INFLIGHT) {
            cancels.push(Tag::new(Op::Send, ring, key, gen).encode());
        }
        for target in cancels {
            self.push_conn_op(key, opcode::AsyncCancel::new(target).build(), Op::Cancel);
        }
        self.push_conn_op(
            key,
            opcode::Close::new(types::Fixed(slot)).build(),
            Op::Close,
        );
    }

    /// CLOSEs a slot that has no connection.
    pub(super) fn close_raw(&mut self, ring: usize, slot: u32) {
        let entry = opcode::Close::new(types::Fixed(slot))
            .build()
            .user_data(Tag::new(Op::CloseRaw, ring, slot, 0).encode());
        // SAFETY: CLOSE names no memory.
        unsafe { self.rings[ring].push(Chain::One(entry)) };
    }

    pub(super) fn on_close(&mut self, ring: usize, t: Tag, res: i32) {
        if res >= 0 {
            self.slot_closed(ring);
        } else {
            // EBADF: the slot was empty (our count was wrong). Count it freed
            // anyway: the slot is empty now either way.
            log::error!(
                "shard {}: close of a connection slot: errno {}",
                self.shard,
                -res
            );
            self.slot_closed(ring);
        }
        if let Some(c) = self.conn_of(t) {
            c.slot = NO_SLOT;
        }
        self.op_done(t);
    }

    /// The CLOSE linked after a MSG_RING: done if the MSG_RING succeeded,
    /// cancelled (the slot is still ours) if it failed.
    pub(super) fn on_source_close(&mut self, ring: usize, t: Tag, res: i32) {
        if res >= 0 {
            self.slot_closed(ring);
            if let Some(c) = self.conn_of(t) {
                if c.state == State::Detaching && c.ring as usize == ring {
                    // Handed off: nothing of it is left here.
                    c.slot = NO_SLOT;
                    c.state = State::Closing;
                    self.handoffs_out.remove(&t.key);
                }
            }
        } else if res != -libc::ECANCELED {
            log::error!("shard {}: close after MSG_RING: errno {}", self.shard, -res);
        }
        self.op_done(t);
    }

    /// Cancels everything and waits (bounded) until no operation is in
    /// flight, so the kernel never writes a freed receive buffer or reads a
    /// freed send buffer. True when quiet.
    ///
    /// Each cancel names one operation by user_data. A cancel-any (or
    /// cancel-by-file) makes the kernel rescan every armed request from the
    /// start for each one it cancels: O(n^2), 3.3 s for 16.7k connections.
    fn quiesce(&mut self) -> bool {
        let mut targets: Vec<(usize, u64)> = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            let (ring, key) = (c.ring as usize, key as u32);
            if c.has(flag::RECV_ARMED) && !c.has(flag::RECV_CANCELLING) {
                c.set(flag::RECV_CANCELLING);
                targets.push((ring, Tag::new(Op::Recv, ring, key, c.gen).encode()));
            }
            if c.has(flag::SEND_INFLIGHT) {
                targets.push((ring, Tag::new(Op::Send, ring, key, c.gen).encode()));
            }
        }
        for (i, accept) in self.accept.iter().enumerate() {
            if accept.armed && !accept.cancelling {
                targets.push((0, accept_tag(i)));
            }
        }
        if self.wake_armed {
            let w = self.wait_ring();
            targets.push((w, Tag::ring(Op::WakeRead, w).encode()));
        }
        for (ring, target) in targets {
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(Tag::ring(Op::Misc, ring).encode());
            // SAFETY: a cancel names no memory.
            unsafe { self.rings[ring].push(Chain::One(entry)) };
        }
        let mut cqes = Vec::new();
        for _ in 0..DROP_ROUNDS_MAX {
            let mut busy = false;
            for ring in &mut self.rings {
                if ring.ops_inflight == 0 && ring.unqueued_len() == 0 {
                    continue;
                }
                busy = true;
                let _ = ring.submit();
                cqes.clear();
                let _ = ring.reap(&mut cqes);
                for &(user_data, _, flags) in &cqes {
                    let here = tag::op_of(user_data).is_some_and(|op| op.submitted_here());
                    if here && !cqueue::more(flags) {
                        ring.ops_inflight = ring.ops_inflight.saturating_sub(1);
                    }
                }
            }
            if !busy {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        let t0 = Instant::now();
        let quiet = self.quiesce();
        log::debug!(
            "shard {}: io_uring quiesced={quiet} in {:?}, ops left {:?}",
            self.shard,
            t0.elapsed(),
            self.rings
                .iter()
                .map(|r| r.ops_inflight)
                .collect::<Vec<_>>()
        );
        if quiet {
            for ring in &mut self.rings {
                if let Some(mut bufs) = ring.bufs.take() {
                    bufs.unregister(&ring.submitter());
                }
            }
        } else {
            log::error!(
                "shard {}: io_uring operations still in flight at drop; leaking their buffers",
                self.shard
            );
            // The kernel may still use these: never free them.
            for ring in &mut self.rings {
                std::mem::forget(ring.bufs.take());
            }
            std::mem::forget(std::mem::take(&mut self.conns));
            std::mem::forget(std::mem::take(&mut self.installs));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}
