//! Shared bodies: a group message's body written once per shard, each
//! member's copy a `Member` record naming it (see "Shared bodies" in the
//! module docs): sizes and records, dropping a body with its last copy,
//! and the replay's side.

use super::*;

/// Encoded size of a `Member` record.
pub(super) const MEMBER_BYTES: u64 = Record::member_bytes() as u64;

/// Encoded size of the `Body` record of `msg`.
pub(super) fn body_bytes(msg: &Stored) -> u64 {
    Record::body_bytes(msg.body.len()) as u64
}

/// The `Body` record of `msg`.
pub(super) fn body_record(msg: &Stored) -> Record<'_> {
    Record::Body {
        server_id: msg.server_id,
        from: msg.from,
        time_ms: msg.time_ms,
        body: &msg.body,
    }
}

impl LogStore {
    /// Whether `user`'s queued `server_id` is a copy of a shared body.
    pub(super) fn is_copy(&self, user: u64, server_id: u64) -> bool {
        self.bodies.contains_key(&server_id) && !self.clashes.contains(&(user, server_id))
    }

    /// The record of `user`'s queued `msg`: a `Member` for a copy of a
    /// shared body, else a `Queued`.
    pub(super) fn entry_record<'a>(&self, user: u64, msg: &'a Stored) -> Record<'a> {
        if self.is_copy(user, msg.server_id) {
            Record::Member {
                user,
                server_id: msg.server_id,
            }
        } else {
            queued_record(user, msg)
        }
    }

    /// A member's copy of body `server_id` left its queue: the body goes
    /// with its last copy (no record: the replay drops a `Body` no copy
    /// names), cancelled if it was still staged.
    pub(super) fn drop_member(&mut self, server_id: u64) {
        let body = self.bodies.get_mut(&server_id).expect("a copy's body");
        body.refs -= 1;
        if body.refs > 0 {
            return;
        }
        let body = self.bodies.remove(&server_id).expect("found");
        crate::memory::shrink_map(&mut self.bodies);
        let bytes = body_bytes(&body.msg);
        match body.loc {
            Loc::Memory => {}
            Loc::Staged(i) => {
                let slot = &mut self.staged[i as usize];
                debug_assert_eq!(*slot, Staged::Body { server_id });
                *slot = Staged::Cancelled;
                self.staged_records -= 1;
                self.staged_bytes -= bytes;
            }
            Loc::Segment(n) => self.body_gone(n, bytes),
        }
    }

    /// A live `Body` record of `bytes` in segment `n` is dead now.
    pub(super) fn body_gone(&mut self, n: u32, bytes: u64) {
        let compacting = self.compacting.is_some_and(|c| c.segment == n);
        let seg = self.segments.get_mut(&n).expect("a live body's segment");
        seg.live -= 1;
        seg.live_bytes -= bytes;
        if seg.live == 0 && !compacting {
            seg.index = Vec::new();
            seg.body_index = Vec::new();
        }
        if self.active_number() != Some(n) {
            self.maintenance = true;
        }
    }

    /// Replays a `Body` record of `len` bytes in segment `n`.
    pub(super) fn replay_body(&mut self, n: u32, msg: Stored, len: u64) {
        let server_id = msg.server_id;
        self.server_id_max = self.server_id_max.max(server_id);
        let body = self.bodies.entry(server_id).or_insert(Body {
            msg: msg.clone(),
            loc: Loc::Memory,
            refs: 0,
        });
        let old = std::mem::replace(&mut body.loc, Loc::Segment(n));
        let old_bytes = body_bytes(&body.msg);
        body.msg = msg;
        if let Loc::Segment(o) = old {
            // A compaction copy whose original was not deleted yet: the
            // later one is current and must outlive the original.
            let from_seg = self.segments.get_mut(&o).expect("replayed");
            from_seg.live -= 1;
            from_seg.live_bytes -= old_bytes;
            if o != n {
                self.segments.get_mut(&n).expect("replaying").pins.insert(o);
            }
        }
        let seg = self.segments.get_mut(&n).expect("replaying");
        seg.live += 1;
        seg.live_bytes += len;
        seg.body_index.push(server_id);
    }

    /// Replays a `Member` record in segment `n` (its bytes are
    /// [`MEMBER_BYTES`]).
    pub(super) fn replay_member(&mut self, n: u32, user: u64, server_id: u64) {
        self.server_id_max = self.server_id_max.max(server_id);
        let plain = self
            .queues
            .get(&user)
            .is_some_and(|q| find(q, server_id).is_ok())
            && !self.replay_members.contains(&(user, server_id));
        if plain {
            // Only a damaged log holds a copy where a message is: the
            // later record is the current one.
            self.replaced(n, user, server_id, false);
        }
        let queue = self.queues.entry(user).or_default();
        match find(queue, server_id) {
            Ok(at) => {
                // A compaction copy (see `replay_record`).
                let old = std::mem::replace(&mut queue[at].loc, Loc::Segment(n));
                if let Loc::Segment(o) = old {
                    let from_seg = self.segments.get_mut(&o).expect("replayed");
                    from_seg.live -= 1;
                    from_seg.live_bytes -= MEMBER_BYTES;
                    if o != n {
                        self.segments.get_mut(&n).expect("replaying").pins.insert(o);
                    }
                }
            }
            Err(at) => {
                let body = self.bodies.entry(server_id).or_insert_with(|| Body {
                    // Filled in by its `Body` record, later in the replay.
                    msg: Stored {
                        server_id,
                        from: 0,
                        time_ms: 0,
                        origin: None,
                        body: Arc::from(&[][..]),
                    },
                    loc: Loc::Memory,
                    refs: 0,
                });
                body.refs += 1;
                self.replay_members.insert((user, server_id));
                if body.loc == Loc::Memory {
                    self.unresolved.push((user, server_id));
                }
                let msg = body.msg.clone();
                queue.insert(
                    at,
                    Entry {
                        msg,
                        loc: Loc::Segment(n),
                    },
                );
                self.total += 1;
            }
        }
        let seg = self.segments.get_mut(&n).expect("replaying");
        seg.live += 1;
        seg.live_bytes += MEMBER_BYTES;
        seg.index.push((user, server_id));
    }

    /// After the replay: gives the copies read before their `Body` record
    /// their body, drops the copies whose body is nowhere (lost to a
    /// repair; returns how many) and the bodies no copy names.
    pub(super) fn resolve_bodies(&mut self) -> usize {
        let mut lost = 0;
        for (user, server_id) in std::mem::take(&mut self.unresolved) {
            let Some(body) = self.bodies.get(&server_id) else {
                continue; // every copy was delivered
            };
            let Some(queue) = self.queues.get_mut(&user) else {
                continue;
            };
            let Ok(at) = find(queue, server_id) else {
                continue;
            };
            if !self.replay_members.contains(&(user, server_id)) {
                continue; // a message took its place
            }
            if body.loc != Loc::Memory {
                queue[at].msg = body.msg.clone();
                continue;
            }
            let entry = queue.remove(at).expect("found");
            if queue.is_empty() {
                self.queues.remove(&user);
            }
            self.total -= 1;
            lost += 1;
            self.replay_members.remove(&(user, server_id));
            if let Loc::Segment(o) = entry.loc {
                let seg = self.segments.get_mut(&o).expect("replayed");
                seg.live -= 1;
                seg.live_bytes -= MEMBER_BYTES;
            }
            self.bodies.get_mut(&server_id).expect("found").refs -= 1;
        }
        let dead: Vec<u64> = self
            .bodies
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(&id, _)| id)
            .collect();
        for server_id in dead {
            let body = self.bodies.remove(&server_id).expect("listed");
            if let Loc::Segment(n) = body.loc {
                let seg = self.segments.get_mut(&n).expect("replayed");
                seg.live -= 1;
                seg.live_bytes -= body_bytes(&body.msg);
            }
        }
        self.note_clashes();
        self.bodies.shrink_to_fit();
        self.unresolved = Vec::new();
        self.replay_members = Default::default();
        lost
    }

    /// Takes `user`'s entry `server_id` out during the replay because a
    /// record of the other kind (`copy`: the entry is a copy) came later
    /// for it, in segment `n`: as a compaction copy would, the later one
    /// must outlive the earlier (a pin).
    pub(super) fn replaced(&mut self, n: u32, user: u64, server_id: u64, copy: bool) {
        let queue = self.queues.get_mut(&user).expect("replayed");
        let at = find(queue, server_id).expect("replayed");
        let entry = queue.remove(at).expect("found");
        if queue.is_empty() {
            self.queues.remove(&user);
        }
        self.total -= 1;
        if let Some(origin) = entry.msg.origin {
            // As a delivery: its window entry outlives it.
            if let Some(t) = self.windows.get_mut(entry.msg.from, origin) {
                if t.loc.loc == entry.loc {
                    t.loc.orphan = true;
                }
            }
        }
        if let Loc::Segment(o) = entry.loc {
            let seg = self.segments.get_mut(&o).expect("replayed");
            seg.live -= 1;
            seg.live_bytes -= if copy {
                MEMBER_BYTES
            } else {
                queued_bytes(&entry.msg)
            };
            if o != n {
                self.segments.get_mut(&n).expect("replaying").pins.insert(o);
            }
        }
        if copy {
            self.replay_members.remove(&(user, server_id));
            self.replay_member_gone(server_id);
        }
    }

    /// After the replay: the messages queued under the id of a body that
    /// are not copies of it (a damaged log) go to `clashes`.
    fn note_clashes(&mut self) {
        if self.bodies.is_empty() {
            return;
        }
        for (&user, queue) in &self.queues {
            for e in queue {
                let id = e.msg.server_id;
                if self.bodies.contains_key(&id) && !self.replay_members.contains(&(user, id)) {
                    self.clashes.insert((user, id));
                }
            }
        }
    }

    /// Replays the tombstone of a member's copy of body `server_id`. The
    /// body stays until the end of the replay even with no copy left: a
    /// damaged log may name it again later, and what the replay makes of
    /// a record must not depend on older segments, which may be deleted
    /// first. So a replay holds the bodies of the log's delivered group
    /// messages until it ends (at most the log's dead share).
    pub(super) fn replay_member_gone(&mut self, server_id: u64) {
        let body = self.bodies.get_mut(&server_id).expect("a copy's body");
        body.refs -= 1;
    }
}
