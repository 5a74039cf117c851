//! Receiving: single-shot receives before [`Io::established`], multishot
//! after, provided buffers copied out in [`Io::next`], pausing with bytes
//! held per connection (see "Receives" in the module docs).

use super::*;

impl Io {
    /// Copies one buffer (and the buffers of the same connection right
    /// behind it, as they fit) into `scratch`, giving each back to the
    /// kernel at once. `None` when nothing is handed out now (stale, or kept
    /// in `held` while paused).
    pub(super) fn hand_out(
        &mut self,
        key: u32,
        gen: u32,
        ring: u16,
        bid: u16,
        len: usize,
        scratch: &mut [u8],
    ) -> Option<usize> {
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.gen == gen && c.has(flag::VISIBLE) && c.state == State::Live)
        else {
            self.recycle(ring, bid);
            return None;
        };
        let bufs = self.rings[ring as usize]
            .bufs
            .as_mut()
            .expect("data came from a ring with buffers");
        let bytes = bufs.bytes(bid, len);
        if c.has(flag::PAUSED) || c.held.is_some() || len > scratch.len() {
            let held = c.held.get_or_insert_with(Box::default);
            held.extend_from_slice(bytes);
            bufs.recycle(bid);
            if !c.has(flag::PAUSED) {
                // Only a scratch smaller than one buffer gets here unpaused.
                self.events.push_front(Event::Held(key, gen));
            }
            return None;
        }
        scratch[..len].copy_from_slice(bytes);
        bufs.recycle(bid);
        let mut n = len;
        while let Some(&Event::Data {
            key: k,
            gen: g,
            ring: r,
            bid: b,
            len: l,
        }) = self.events.front()
        {
            let l = l as usize;
            if k != key || g != gen || n + l > scratch.len() {
                break;
            }
            self.events.pop_front();
            let bufs = self.rings[r as usize]
                .bufs
                .as_mut()
                .expect("data came from a ring with buffers");
            scratch[n..n + l].copy_from_slice(bufs.bytes(b, l));
            bufs.recycle(b);
            n += l;
        }
        if !c.has(flag::ESTABLISHED) {
            // Single-shot: the next receive is armed in `wait`, once the
            // shard handled these bytes (and perhaps detached the connection).
            self.queue_rearm(key);
        }
        Some(n)
    }

    /// Copies held bytes into `scratch`; when they are all out, reports a
    /// pending close or re-arms the receive.
    pub(super) fn hand_out_held(
        &mut self,
        key: u32,
        gen: u32,
        scratch: &mut [u8],
    ) -> Option<usize> {
        let c = self.visible_conn(key, gen)?;
        if c.has(flag::PAUSED) || scratch.is_empty() {
            return None;
        }
        let held = c.held.as_mut()?;
        let n = held.len().min(scratch.len());
        scratch[..n].copy_from_slice(&held[..n]);
        held.drain(..n);
        if held.is_empty() {
            c.held = None;
            if c.has(flag::PEER_CLOSED) {
                self.events.push_front(Event::Closed(key, gen));
            } else {
                self.queue_rearm(key);
            }
        } else {
            self.events.push_front(Event::Held(key, gen));
        }
        (n > 0).then_some(n)
    }

    /// Stops (`false`) or resumes (`true`) handing out bytes of `conn`.
    pub fn set_recv(&mut self, conn: ConnId, on: bool) {
        let key = conn.0;
        let Some(c) = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
        else {
            return;
        };
        let gen = c.gen;
        if !on {
            if c.has(flag::PAUSED) {
                return;
            }
            c.set(flag::PAUSED);
            // A single-shot receive ends by itself (its bytes go to `held`);
            // a multishot one is cancelled.
            if c.has(flag::RECV_ARMED) && c.has(flag::RECV_MULTI) && !c.has(flag::RECV_CANCELLING) {
                c.set(flag::RECV_CANCELLING);
                let recv = Tag::new(Op::Recv, c.ring as usize, key, gen).encode();
                self.push_conn_op(key, opcode::AsyncCancel::new(recv).build(), Op::Cancel);
            }
            return;
        }
        if !c.has(flag::PAUSED) {
            return;
        }
        c.clear(flag::PAUSED);
        if c.held.is_some() {
            self.events.push_back(Event::Held(key, gen));
        } else if c.has(flag::PEER_CLOSED) && !c.has(flag::CLOSED_REPORTED) {
            self.events.push_back(Event::Closed(key, gen));
        } else {
            self.queue_rearm(key);
        }
    }

    /// `conn` is logged in here and stays: from now on its receive is multishot.
    pub fn established(&mut self, conn: ConnId) {
        let key = conn.0;
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.set(flag::ESTABLISHED);
            self.queue_rearm(key);
        }
    }

    /// Arms the connection's receive: multishot once established, else one
    /// single-shot receive.
    pub(super) fn arm_recv(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        debug_assert_eq!(c.state, State::Live);
        let ring = c.ring as usize;
        let Some(bufs) = self.rings[ring].bufs.as_ref() else {
            // Only a connection that could not leave ring 0 is here, and it
            // was reported closed: nothing to receive.
            debug_assert!(false, "receive armed on a ring without buffers");
            return;
        };
        let fd = types::Fixed(c.slot);
        let multi = c.has(flag::ESTABLISHED);
        let entry = if multi {
            opcode::RecvMulti::new(fd, bufs.bgid()).build()
        } else {
            opcode::Recv::new(fd, std::ptr::null_mut(), bufs.buf_bytes())
                .buf_group(bufs.bgid())
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        };
        c.set(flag::RECV_ARMED);
        if multi {
            c.set(flag::RECV_MULTI);
        } else {
            c.clear(flag::RECV_MULTI);
        }
        // Receives name no memory of ours: the kernel picks a provided buffer.
        self.push_conn_op(key, entry, Op::Recv);
    }

    pub(super) fn queue_rearm(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            if !c.has(flag::REARM_QUEUED) {
                c.set(flag::REARM_QUEUED);
                self.rearm.push(key);
            }
        }
    }

    pub(super) fn on_recv(&mut self, ring: usize, t: Tag, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(c) = self.conn_of(t) else {
            if let Some(bid) = bid {
                self.recycle(ring as u16, bid);
            }
            return;
        };
        if !more {
            c.clear(flag::RECV_ARMED | flag::RECV_MULTI | flag::RECV_CANCELLING);
            c.ops = c.ops.saturating_sub(1);
        }
        let live = c.state == State::Live && c.has(flag::VISIBLE);
        let kept = c.state == State::Live && c.has(flag::KEPT);
        let established = c.has(flag::ESTABLISHED);
        let (key, gen) = (t.key, c.gen);
        if res > 0 {
            let bid = bid.expect("a receive with buffer select names its buffer");
            if kept {
                self.hold_kept(ring, key, bid, res as usize);
            } else if live {
                self.events.push_back(Event::Data {
                    key,
                    gen,
                    ring: ring as u16,
                    bid,
                    len: res as u32,
                });
                if !more && established {
                    // A multishot receive ended with data (the kernel's retry
                    // limit, a buffer ring running dry): arm it again.
                    // Single-shot ones are re-armed by `next`.
                    self.queue_rearm(key);
                }
            } else {
                self.recycle(ring as u16, bid);
            }
            self.maybe_free(key);
            return;
        }
        if let Some(bid) = bid {
            self.recycle(ring as u16, bid);
        }
        let closed = match -res {
            // End of stream: the peer closed its side.
            0 => true,
            // The buffer ring ran dry: by the next `wait` the buffers handed
            // out in `next` are back; arm again then.
            libc::ENOBUFS => {
                self.recv_no_buffers += 1;
                false
            }
            // Our cancel (pause or close); if resumed meanwhile, arm again.
            libc::ECANCELED => false,
            // Transient: arm again.
            libc::EINTR | libc::EAGAIN => false,
            // ECONNRESET, ETIMEDOUT, EPIPE, ENOTCONN, ...: the connection is gone.
            _ => true,
        };
        if live {
            if closed {
                self.conns[key as usize].set(flag::PEER_CLOSED);
                self.events.push_back(Event::Closed(key, gen));
            } else if !more {
                self.queue_rearm(key);
            }
        }
        self.maybe_free(key);
    }

    fn recycle(&mut self, ring: u16, bid: u16) {
        if let Some(bufs) = self.rings[ring as usize].bufs.as_mut() {
            bufs.recycle(bid);
        }
    }
}
