//! Handing connections to other shards: the descriptor goes to the peer's
//! ring 0 with MSG_RING, the session with the shard-level attach, paired by
//! a handoff id whichever comes first (see "Closing and handing off" in
//! the module docs).

use super::*;

/// A connection handed to another shard: the id pairing the MSG_RING
/// arrival with the shard-level attach.
#[derive(Debug)]
pub struct Detached {
    id: u64,
}

/// What other shards need to hand connections over: ring 0's file.
///
/// Lifetime: this holds a duplicate of the ring's descriptor, so the ring's
/// file stays open for as long as any shard holds this, even when its owner
/// has already stopped (shards stop at different times). A MSG_RING sent to
/// a stopped shard then fails cleanly (EOWNERDEAD) or lands in a table that
/// is released with the ring, and never reaches a reused fd number.
#[derive(Clone, Debug)]
pub struct PeerInfo(pub(super) Arc<OwnedFd>);

impl PeerInfo {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The target side of a handoff, keyed by handoff id.
#[derive(Clone, Copy, Debug)]
pub(super) enum HandoffIn {
    /// The descriptor arrived in ring 0's `slot`; attach has not come.
    Arrived { slot: u32 },
    /// Attached as connection (key, gen); the descriptor has not arrived.
    Attached { key: u32, gen: u32 },
    /// Attached and closed before the descriptor arrived: close it on arrival.
    Abandoned,
    /// The source gave up; attach must report the connection closed.
    Failed,
}

/// The source side of a handoff in flight.
#[derive(Clone, Copy, Debug)]
pub(super) struct HandoffOut {
    dst: usize,
    id: u64,
}

impl Io {
    /// Sends `conn`'s descriptor to shard `dst` (MSG_RING into its ring 0).
    /// The connection must have no receive in flight: it is not established.
    pub fn detach(&mut self, conn: ConnId, dst: usize) -> io::Result<Detached> {
        let key = conn.0;
        if dst == self.shard || dst >= self.peers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot hand off to shard {dst}"),
            ));
        }
        let c = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
            .ok_or(io::ErrorKind::NotConnected)?;
        let busy =
            c.has(flag::RECV_ARMED | flag::SEND_INFLIGHT) || c.out.is_some() || c.held.is_some();
        if c.state != State::Live || busy {
            // Not a state the shard detaches in; closing is the safe answer
            // (a receive in flight could swallow bytes of the moving session).
            debug_assert!(false, "detach of a busy connection");
            self.close(conn);
            return Err(io::Error::other(
                "connection busy or not here; closed instead of handed off",
            ));
        }
        c.clear(flag::VISIBLE);
        c.state = State::Detaching;
        c.retries = 0;
        self.visible -= 1;
        let id = ((self.shard as u64) << 40) | (self.handoff_seq & ((1 << 40) - 1));
        self.handoff_seq += 1;
        debug_assert!(id < tag::HANDOFF_ID_LIMIT);
        self.handoffs_out.insert(key, HandoffOut { dst, id });
        self.submit_handoff(key);
        Ok(Detached { id })
    }

    /// Adopts a connection detached by another shard; its descriptor may
    /// have arrived already or come later (sends wait until then).
    pub fn attach(&mut self, detached: Detached) -> io::Result<ConnId> {
        let id = detached.id;
        match self.handoffs_in.remove(&id) {
            Some(HandoffIn::Arrived { slot }) => {
                let key = self.new_conn(0, slot, flag::VISIBLE, State::AwaitingFd);
                self.visible += 1;
                self.make_home(key);
                Ok(ConnId(key))
            }
            Some(HandoffIn::Failed) => {
                let key =
                    self.new_conn(0, NO_SLOT, flag::VISIBLE | flag::BROKEN, State::AwaitingFd);
                self.visible += 1;
                let gen = self.conns[key as usize].gen;
                self.events.push_back(Event::Closed(key, gen));
                Ok(ConnId(key))
            }
            None => {
                let key = self.new_conn(0, NO_SLOT, flag::VISIBLE, State::AwaitingFd);
                self.visible += 1;
                let gen = self.conns[key as usize].gen;
                self.handoffs_in
                    .insert(id, HandoffIn::Attached { key, gen });
                Ok(ConnId(key))
            }
            Some(other) => {
                self.handoffs_in.insert(id, other);
                Err(io::Error::other(format!("handoff {id:#x} attached twice")))
            }
        }
    }

    pub(super) fn submit_handoff(&mut self, key: u32) {
        let h = self.handoffs_out[&key];
        let target = self.peers[h.dst].fd();
        self.push_msg_ring(
            key,
            target,
            tag::id_tag(Op::HandoffIn, h.id),
            Op::HandoffOut,
        );
    }

    pub(super) fn on_handoff_out(&mut self, t: Tag, res: i32) {
        if res < 0 {
            let gen = t.gen;
            match -res {
                // The target's CQ is full (EOVERFLOW), its table is full
                // (ENFILE), or memory is short: the slot is still ours (the
                // linked CLOSE was cancelled); retry soon.
                libc::EOVERFLOW | libc::ENFILE | libc::EAGAIN | libc::EBUSY | libc::ENOMEM => {
                    if self.conn_of(t).is_some() {
                        self.schedule_retry(t.key, gen);
                    }
                }
                // EOWNERDEAD: the target shard's thread has exited; EBADFD:
                // its ring is gone or disabled; anything else: give up.
                e => {
                    log::warn!("shard {}: handoff failed: errno {e}", self.shard);
                    if self.conn_of(t).is_some() {
                        self.give_up_handoff(t.key);
                    }
                }
            }
        }
        self.op_done(t);
    }

    /// Closes a connection whose handoff failed for good, and tells the
    /// target (best effort) so its attached session is closed too.
    pub(super) fn give_up_handoff(&mut self, key: u32) {
        if let Some(h) = self.handoffs_out.remove(&key) {
            let ring = self.conns[key as usize].ring as usize;
            let entry = opcode::MsgRingData::new(
                types::Fd(self.peers[h.dst].fd()),
                0,
                tag::id_tag(Op::HandoffFail, h.id),
                None,
            )
            .build()
            .user_data(Tag::ring(Op::Misc, ring).encode());
            // SAFETY: MSG_RING data names no memory.
            unsafe { self.rings[ring].push(Chain::One(entry)) };
        }
        self.start_close(key);
    }

    /// Another shard's descriptor arrived in ring 0's slot `res`.
    pub(super) fn on_handoff_in(&mut self, id: u64, res: i32) {
        if res < 0 {
            log::error!("shard {}: handoff arrival: errno {}", self.shard, -res);
            return;
        }
        let slot = res as u32;
        self.rings[0].slots_used += 1;
        match self.handoffs_in.remove(&id) {
            None => {
                self.handoffs_in.insert(id, HandoffIn::Arrived { slot });
            }
            Some(HandoffIn::Attached { key, gen }) => {
                let ok = self
                    .conns
                    .get(key as usize)
                    .is_some_and(|c| c.gen == gen && c.state == State::AwaitingFd);
                if ok {
                    let c = &mut self.conns[key as usize];
                    c.ring = 0;
                    c.slot = slot;
                    self.make_home(key);
                } else {
                    self.close_raw(0, slot);
                }
            }
            Some(HandoffIn::Abandoned) => self.close_raw(0, slot),
            Some(other) => {
                log::error!(
                    "shard {}: handoff {id:#x} arrived twice ({other:?})",
                    self.shard
                );
                self.handoffs_in.insert(id, other);
                self.close_raw(0, slot);
            }
        }
    }

    /// The source of handoff `id` gave up.
    pub(super) fn on_handoff_fail(&mut self, id: u64) {
        match self.handoffs_in.remove(&id) {
            None => {
                self.handoffs_in.insert(id, HandoffIn::Failed);
            }
            Some(HandoffIn::Attached { key, gen }) => {
                if let Some(c) = self.visible_conn(key, gen) {
                    c.set(flag::BROKEN | flag::PEER_CLOSED);
                    self.events.push_back(Event::Closed(key, gen));
                }
            }
            Some(HandoffIn::Abandoned) => {}
            Some(other) => {
                self.handoffs_in.insert(id, other);
            }
        }
    }
}
