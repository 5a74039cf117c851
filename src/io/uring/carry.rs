//! Live upgrade: connections leave for a successor process as process
//! descriptors, and arrive from a predecessor into a fixed-file table.
//!
//! Leaving ([`Io::keep`], then [`Io::carry_fds`] batch by batch): a kept
//! connection is out of the shard's hands but still in its ring; its send
//! in flight finishes and the cancel of its receive lands (bytes that were
//! on their way are held, never dropped), then IORING_OP_FIXED_FD_INSTALL
//! makes a process descriptor of the slot (Linux 6.8), and the slot is
//! closed. The caller sends the descriptor and closes it, so the process
//! holds about one batch of them at a time, whatever the connection count.
//!
//! Arriving ([`Io::adopt`]): IORING_OP_FILES_UPDATE with
//! `IORING_FILE_INDEX_ALLOC` puts the descriptor into a free slot of the
//! data ring with the most room (ring 0 in the one-ring layout), chosen by
//! the kernel like an accept's; the descriptor is closed once the slot
//! holds the socket. The connection is `Moving` meanwhile, as after an
//! accept: sends wait, a close is done on arrival.

use super::*;

/// A connection kept for a successor process: invisible to the shard,
/// still in its ring until [`Io::carry_fds`].
#[derive(Debug)]
pub struct Kept {
    key: u32,
    gen: u32,
}

/// How long [`Io::carry_fds`] waits for a batch's sends and receive
/// cancels to end, and then for its installs. A connection whose peer
/// reads nothing keeps its send in flight: past this it is closed, not
/// carried (its backlog is in the store).
const CARRY_WAIT: Duration = Duration::from_secs(5);

/// FILES_UPDATE's offset meaning "any free slot, written back"
/// (`IORING_FILE_INDEX_ALLOC`, `~0U`; the kernel reads the low 32 bits).
const FILE_INDEX_ALLOC: i32 = -1;

/// A descriptor on its way into a fixed-file table: kept open until the
/// FILES_UPDATE completes; the kernel writes the slot it chose into `slot`.
pub(super) struct Install {
    _fd: OwnedFd,
    slot: Box<RawFd>,
}

impl Io {
    /// Whether this kernel can carry connections across a live upgrade
    /// (FIXED_FD_INSTALL, Linux 6.8, and FILES_UPDATE).
    pub fn carries(&self) -> bool {
        self.carry_ops
    }

    /// Takes a logged-in connection out of the shard's hands for a
    /// successor (see the module docs). Its receive must be paused.
    pub fn keep(&mut self, conn: ConnId) -> io::Result<Kept> {
        let key = conn.0;
        let c = self
            .conns
            .get_mut(key as usize)
            .filter(|c| c.has(flag::VISIBLE))
            .ok_or(io::ErrorKind::NotConnected)?;
        let gone =
            flag::BROKEN | flag::PEER_CLOSED | flag::CLOSE_REQUESTED | flag::SHUTDOWN_INFLIGHT;
        if c.state != State::Live || c.slot == NO_SLOT || c.has(gone) {
            return Err(io::Error::other("connection closing or not in a ring"));
        }
        debug_assert!(c.has(flag::PAUSED), "a kept connection reads nothing more");
        c.clear(flag::VISIBLE | flag::WANT_WRITE);
        c.set(flag::KEPT);
        self.visible -= 1;
        self.peer_ips.remove(&key);
        Ok(Kept { key, gen: c.gen })
    }

    /// Makes process descriptors of kept connections, in order: each with
    /// the bytes that arrived after its receive was paused. The slots are
    /// closed; an error means that connection is closed and not carried.
    pub fn carry_fds(&mut self, kept: Vec<Kept>) -> Vec<io::Result<(OwnedFd, Vec<u8>)>> {
        let mine = |io: &Io, k: &Kept| {
            io.conns
                .get(k.key as usize)
                .is_some_and(|c| c.gen == k.gen && c.has(flag::KEPT) && c.state == State::Live)
        };
        // Sends finish and receive cancels land first: nothing of this
        // process may touch the socket once the successor has it.
        let deadline = Instant::now() + CARRY_WAIT;
        while Instant::now() < deadline {
            let busy = kept.iter().any(|k| {
                mine(self, k)
                    && self.conns[k.key as usize].has(flag::SEND_INFLIGHT | flag::RECV_ARMED)
            });
            if !busy || self.wait(Some(Duration::from_millis(1))).is_err() {
                break;
            }
            self.events.clear();
        }
        for k in &kept {
            if !mine(self, k) {
                continue;
            }
            let c = &self.conns[k.key as usize];
            if c.has(flag::SEND_INFLIGHT | flag::RECV_ARMED | flag::BROKEN) {
                continue; // closed below
            }
            let entry = opcode::FixedFdInstall::new(types::Fixed(c.slot), 0).build();
            self.push_conn_op(k.key, entry, Op::FdInstall);
            self.installed.insert(k.key, None);
        }
        let deadline = Instant::now() + CARRY_WAIT;
        while self.installed.values().any(Option::is_none) && Instant::now() < deadline {
            if self.wait(Some(Duration::from_millis(1))).is_err() {
                break;
            }
            self.events.clear();
        }
        let mut out = Vec::with_capacity(kept.len());
        for k in kept {
            let result = match self.installed.remove(&k.key).flatten() {
                Some(fd) if fd >= 0 => {
                    // SAFETY: FIXED_FD_INSTALL returned a new descriptor of
                    // this process that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let held = self.conns[k.key as usize]
                        .held
                        .take()
                        .map_or_else(Vec::new, |h| *h);
                    Ok((fd, held))
                }
                Some(e) => Err(io::Error::from_raw_os_error(-e)),
                None => Err(io::Error::other(
                    "busy (a send the peer does not read) or not installed in time",
                )),
            };
            if mine(self, &k) {
                self.conns[k.key as usize].clear(flag::KEPT);
                self.start_close(k.key);
            }
            out.push(result);
        }
        out
    }

    /// A FIXED_FD_INSTALL completed: `res` is the new descriptor or -errno.
    pub(super) fn on_fd_install(&mut self, t: Tag, res: i32) {
        if let Some(done) = self.installed.get_mut(&t.key) {
            *done = Some(res);
        } else if res >= 0 {
            // Nobody waits for it (cannot happen: carry_fds waits for each).
            // SAFETY: a new descriptor of this process that nothing owns.
            drop(unsafe { OwnedFd::from_raw_fd(res) });
        }
        self.op_done(t);
    }

    /// Bytes that arrived for a kept connection after its pause: held for
    /// the successor, never dropped.
    pub(super) fn hold_kept(&mut self, ring: usize, key: u32, bid: u16, len: usize) {
        let Some(bufs) = self.rings[ring].bufs.as_mut() else {
            return;
        };
        let bytes = bufs.bytes(bid, len);
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.held
                .get_or_insert_with(Box::default)
                .extend_from_slice(bytes);
        }
        bufs.recycle(bid);
    }

    /// Installs a connection carried from a predecessor process (its socket
    /// as a process descriptor); it is read once its slot is known.
    pub fn adopt(&mut self, fd: OwnedFd) -> io::Result<ConnId> {
        // A predecessor on the poll backend left the socket non-blocking;
        // this backend's sockets block (the kernel waits for data in the
        // ring, not in the caller).
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let ring = if self.data_rings_max == 0 {
            // One ring: it keeps the accept's margin, as for a handoff.
            if self.rings[0].slots_free() <= self.accept_margin_slots {
                return Err(io::Error::other("the fixed-file table is full"));
            }
            0
        } else {
            self.pick_data_ring()
                .ok_or_else(|| io::Error::other("every fixed-file table is full"))?
        };
        self.rings[ring].slots_reserved += 1;
        let key = self.new_conn(ring, NO_SLOT, flag::VISIBLE, State::Moving);
        self.conns[key as usize].dst_ring = ring as u16;
        self.visible += 1;
        let mut slot = Box::new(fd.as_raw_fd());
        let entry = opcode::FilesUpdate::new(&mut *slot as *mut RawFd as *const RawFd, 1)
            .offset(FILE_INDEX_ALLOC)
            .build();
        self.installs.insert(key, Install { _fd: fd, slot });
        self.push_conn_op(key, entry, Op::FilesUpdate);
        Ok(ConnId(key))
    }

    /// An adopted descriptor's FILES_UPDATE completed: `res` is 1 with the
    /// slot written back, or -errno.
    pub(super) fn on_files_update(&mut self, ring: usize, t: Tag, res: i32) {
        // The descriptor closes here: the table holds the socket now (or
        // the install failed).
        let install = self.installs.remove(&t.key);
        let r = &mut self.rings[ring];
        r.slots_reserved = r.slots_reserved.saturating_sub(1);
        let ok = self.conn_of(t).is_some_and(|c| c.state == State::Moving);
        match (res, install) {
            (1, Some(install)) if ok => {
                self.rings[ring].slots_used += 1;
                let c = &mut self.conns[t.key as usize];
                c.ring = ring as u16;
                c.slot = *install.slot as u32;
                self.on_live(t.key);
            }
            (1, Some(install)) => {
                self.rings[ring].slots_used += 1;
                self.close_raw(ring, *install.slot as u32);
            }
            _ => {
                log::warn!(
                    "shard {}: a carried connection could not be installed: errno {}",
                    self.shard,
                    -res
                );
                if ok {
                    let c = &mut self.conns[t.key as usize];
                    c.state = State::Live;
                    if c.has(flag::VISIBLE) {
                        c.set(flag::BROKEN | flag::PEER_CLOSED);
                        let gen = c.gen;
                        self.events.push_back(Event::Closed(t.key, gen));
                    } else {
                        self.start_close(t.key);
                    }
                }
            }
        }
        self.op_done(t);
    }
}
