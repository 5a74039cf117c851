//! The several-rings layout: data rings created on demand, each new
//! connection moved from ring 0 to the data ring with the most free slots
//! by a MSG_RING linked with a CLOSE of its ring-0 slot, and the retries of
//! a MSG_RING (move or handoff) whose target was full (see "Rings" in the
//! module docs).

use super::*;

impl Io {
    /// A connection whose descriptor is in ring 0 goes where it will live:
    /// stays (one ring) or moves to the data ring with the most free slots.
    pub(super) fn make_home(&mut self, key: u32) {
        if self.data_rings_max == 0 {
            self.on_live(key);
            return;
        }
        match self.pick_data_ring() {
            Some(k) => self.start_move(key, k),
            None => self.give_up_move(key),
        }
    }

    /// The data ring with the most free slots, creating one if all are full
    /// and the budget allows.
    pub(super) fn pick_data_ring(&mut self) -> Option<usize> {
        let best = (1..self.rings.len())
            .filter(|&r| self.rings[r].slots_free() > 0)
            .max_by_key(|&r| self.rings[r].slots_free());
        if best.is_some() {
            return best;
        }
        if self.rings.len() > self.data_rings_max {
            return None;
        }
        match self.add_data_ring() {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("shard {}: cannot create a data ring: {e}", self.shard);
                None
            }
        }
    }

    /// The ring the thread blocks on (see the module docs).
    pub(super) fn wait_ring(&self) -> usize {
        if self.data_rings_max == 0 {
            0
        } else {
            WAIT_RING_SEVERAL
        }
    }

    pub(super) fn add_data_ring(&mut self) -> io::Result<usize> {
        let r = self.rings.len();
        debug_assert!(r < tag::RINGS_MAX);
        let ring = Ring::new(
            SQ_ENTRIES,
            DATA_CQ_ENTRIES,
            self.slots_per_ring,
            RECV_BUFS_DATA_RING,
            RECV_BUF_BYTES,
            // The wait ring reads the eventfd the others signal.
            (r != WAIT_RING_SEVERAL).then(|| self.wake.0.as_raw_fd()),
        )?;
        self.rings.push(ring);
        log::debug!("shard {}: data ring {r} created", self.shard);
        Ok(r)
    }

    /// Starts moving a connection from ring 0 to data ring `k`.
    fn start_move(&mut self, key: u32, k: usize) {
        let c = &mut self.conns[key as usize];
        debug_assert_eq!(c.ring, 0);
        c.state = State::Moving;
        c.dst_ring = k as u16;
        let gen = c.gen;
        self.rings[k].slots_reserved += 1;
        let target = self.rings[k].fd();
        let arrive = Tag::new(Op::Arrive, k, key, gen).encode();
        self.push_msg_ring(key, target, arrive, Op::Move);
    }

    /// A move could not happen. A connection the shard holds stays in ring
    /// 0 and is reported closed; one it does not know yet is closed.
    fn give_up_move(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.state = State::Live;
        if c.has(flag::VISIBLE) && !c.has(flag::CLOSE_REQUESTED) {
            c.set(flag::BROKEN | flag::PEER_CLOSED);
            let gen = c.gen;
            self.events.push_back(Event::Closed(key, gen));
        } else {
            self.refused += 1;
            if self.refused % REFUSED_LOG_EVERY == 1 {
                log::warn!(
                    "shard {}: every fixed-file table is full; refusing connections ({} so far)",
                    self.shard,
                    self.refused
                );
            }
            self.start_close(key);
        }
    }

    /// The descriptor is in its final ring: report, flush and arm.
    pub(super) fn on_live(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.state = State::Live;
        c.retries = 0;
        if c.has(flag::CLOSE_REQUESTED) {
            self.start_close(key);
            return;
        }
        if c.has(flag::FROM_ACCEPT) {
            if self.peer_query {
                // Reported once its source address is known (`peer.rs`).
                self.submit_peer(key);
                return;
            }
            self.report_accepted(key);
        }
        let c = &mut self.conns[key as usize];
        let gen = c.gen;
        if c.has(flag::WANT_WRITE) {
            c.clear(flag::WANT_WRITE);
            self.events.push_back(Event::Writable(key, gen));
        }
        if c.has(flag::SHUT_WR_PENDING) {
            self.submit_shutdown(key);
        }
        self.queue_rearm(key);
    }

    pub(super) fn on_move(&mut self, t: Tag, res: i32) {
        if res < 0 {
            if let Some(c) = self.conn_of(t) {
                let k = c.dst_ring as usize;
                let gen = c.gen;
                let rings = &mut self.rings;
                rings[k].slots_reserved = rings[k].slots_reserved.saturating_sub(1);
                match -res {
                    // The target CQ is full, or its table (our count was
                    // off), or memory is short: the slot is still ours
                    // (the linked CLOSE was cancelled); retry soon.
                    libc::EOVERFLOW | libc::ENFILE | libc::EAGAIN | libc::EBUSY | libc::ENOMEM => {
                        self.schedule_retry(t.key, gen)
                    }
                    e => {
                        log::error!("shard {}: move to data ring {k}: errno {e}", self.shard);
                        self.give_up_move(t.key);
                    }
                }
            }
        }
        self.op_done(t);
    }

    /// A data ring got the descriptor of a moving connection.
    pub(super) fn on_arrive(&mut self, ring: usize, t: Tag, res: i32) {
        if res < 0 {
            log::error!(
                "shard {}: arrival on ring {ring}: errno {}",
                self.shard,
                -res
            );
            return;
        }
        let slot = res as u32;
        self.rings[ring].slots_used += 1;
        let ok = self.conns.get(t.key as usize).is_some_and(|c| {
            c.gen == t.gen && c.state == State::Moving && c.dst_ring as usize == ring
        });
        if !ok {
            debug_assert!(false, "arrival for no moving connection: {t:?}");
            self.close_raw(ring, slot);
            return;
        }
        self.rings[ring].slots_reserved = self.rings[ring].slots_reserved.saturating_sub(1);
        let c = &mut self.conns[t.key as usize];
        c.ring = ring as u16;
        c.slot = slot;
        self.on_live(t.key);
    }

    /// Pushes MSG_RING(send fd) of the connection's slot, linked with a CLOSE
    /// of that slot (cancelled by the kernel if the MSG_RING fails).
    pub(super) fn push_msg_ring(
        &mut self,
        key: u32,
        target_fd: RawFd,
        target_user_data: u64,
        op: Op,
    ) {
        let c = &mut self.conns[key as usize];
        let ring = c.ring as usize;
        let msg = opcode::MsgRingSendFd::new(
            types::Fd(target_fd),
            types::Fixed(c.slot),
            types::DestinationSlot::auto_target(),
            target_user_data,
        )
        .build()
        .user_data(Tag::new(op, ring, key, c.gen).encode())
        .flags(squeue::Flags::IO_LINK);
        let close = opcode::Close::new(types::Fixed(c.slot))
            .build()
            .user_data(Tag::new(Op::SourceClose, ring, key, c.gen).encode());
        c.ops += 2;
        // SAFETY: MSG_RING and CLOSE name no memory; `target_fd` is a ring
        // of ours or a peer's ring kept open by the `PeerInfo` we hold.
        unsafe { self.rings[ring].push(Chain::Linked(msg, close)) };
    }

    pub(super) fn schedule_retry(&mut self, key: u32, gen: u32) {
        let c = &mut self.conns[key as usize];
        c.retries = c.retries.saturating_add(1);
        if c.retries > MSG_RING_RETRIES_MAX {
            match c.state {
                State::Moving => self.give_up_move(key),
                State::Detaching => self.give_up_handoff(key),
                _ => {}
            }
            return;
        }
        self.retry.push((key, gen));
        self.retry_at
            .get_or_insert_with(|| Instant::now() + RETRY_INTERVAL);
    }

    pub(super) fn retry_msg_ring(&mut self, key: u32, gen: u32) {
        let Some(c) = self.conns.get(key as usize).filter(|c| c.gen == gen) else {
            return;
        };
        match c.state {
            State::Moving if c.has(flag::CLOSE_REQUESTED) => self.start_close(key),
            State::Moving => match self.pick_data_ring() {
                Some(k) => self.start_move(key, k),
                None => self.give_up_move(key),
            },
            State::Detaching => self.submit_handoff(key),
            _ => {}
        }
    }
}
