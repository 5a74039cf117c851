//! Compaction and deletion: picking a victim (pins first), copying its live
//! messages over a few commits, and deleting segments nothing needs any
//! more (see "Segments, deletion and compaction" in the module docs).

use super::*;
use crate::store::files;

impl LogStore {
    /// Bytes a compaction may copy now: the free space less half the floor
    /// (the other half stays for tombstones). Unlimited when unknown.
    pub(super) fn compact_budget(&self) -> u64 {
        self.free_bytes()
            .map_or(u64::MAX, |free| free.saturating_sub(self.floor / 2))
    }

    /// The next segment to compact (or just delete, if it has no live
    /// message): a reclaimable sealed segment without pins, fully dead ones
    /// first, oldest first; else the oldest segment a pinned reclaimable one
    /// waits for. Segments whose live bytes do not fit in the free space
    /// wait (see "Free-space floor").
    pub(super) fn pick_victim(&self) -> Option<u32> {
        let budget = self.compact_budget();
        let pick = self.pick_victim_unbounded()?;
        (self.segments[&pick].live_bytes <= budget).then_some(pick)
    }

    fn pick_victim_unbounded(&self) -> Option<u32> {
        let active = self.active_number();
        let sealed = || {
            self.segments
                .iter()
                .filter(move |(n, _)| Some(**n) != active)
        };
        let over = |s: &Segment| s.dead_ratio() > self.opts.compact_dead_ratio;
        if let Some((&n, _)) = sealed().find(|(_, s)| s.holds_nothing() && s.pins.is_empty()) {
            return Some(n);
        }
        if let Some((&n, _)) = sealed().find(|(_, s)| over(s) && s.pins.is_empty()) {
            return Some(n);
        }
        let (&blocked, _) = sealed().find(|(_, s)| s.holds_nothing() || over(s))?;
        // Pins point strictly to older segments, so this ends, at a segment
        // without pins (the oldest has none).
        let mut at = blocked;
        for _ in 0..self.segments.len() {
            match self.segments[&at].pins.first() {
                Some(&older) => at = older,
                None => return Some(at),
            }
        }
        unreachable!("pins form a cycle at segment {blocked}")
    }

    /// Encodes the next slice of the victim's live messages into `buf` and
    /// lists them in `moves`; once they are all copied, also the window
    /// entries it keeps (`orphan_moves`, all at once: at most [`WINDOW`]
    /// per sender device). Returns the cursor to store once written.
    ///
    /// [`WINDOW`]: crate::store::WINDOW
    pub(super) fn plan_moves(&mut self) -> Option<usize> {
        self.moves.clear();
        self.orphan_moves.clear();
        self.body_moves.clear();
        let c = self.compacting?;
        let seg = &self.segments[&c.segment];
        // The cursor walks `index`, then `body_index`.
        let len = seg.index.len() + seg.body_index.len();
        let end = len.min(c.cursor + COMPACT_ENTRIES_PER_COMMIT);
        let mut cursor = if seg.live == 0 { len } else { c.cursor };
        let mut copied = 0;
        while cursor < end && copied < self.compact_bytes_per_commit {
            let at = cursor;
            cursor += 1;
            if let Some(&(user, server_id)) = seg.index.get(at) {
                let Some(entry) = lookup(&self.queues, user, server_id) else {
                    continue; // delivered
                };
                if entry.loc != Loc::Segment(c.segment) {
                    continue; // a later copy is the current one
                }
                let record = self.entry_record(user, &entry.msg);
                record.encode(&mut self.buf);
                copied += record.encoded_len() as u64;
                self.moves.push((user, server_id));
            } else {
                let server_id = seg.body_index[at - seg.index.len()];
                let Some(body) = self.bodies.get(&server_id) else {
                    continue; // its last copy went
                };
                if body.loc != Loc::Segment(c.segment) {
                    continue;
                }
                body_record(&body.msg).encode(&mut self.buf);
                copied += body_bytes(&body.msg);
                self.body_moves.push(server_id);
            }
        }
        if cursor == len && seg.refs > 0 {
            let here = WLoc {
                loc: Loc::Segment(c.segment),
                orphan: true,
            };
            for &(from, origin) in &seg.orphans {
                match self.windows.get(from, origin) {
                    Some(t) if t.loc == here => {
                        taken_record(from, origin, t).encode(&mut self.buf);
                        self.orphan_moves.push((from, origin));
                    }
                    _ => {} // pruned, or copied on since
                }
            }
        }
        Some(cursor)
    }

    pub(super) fn apply_moves(&mut self, cursor: usize) -> Result<(), StoreError> {
        let c = self.compacting.expect("planned");
        if !self.moves.is_empty() || !self.body_moves.is_empty() {
            let n = self.active_number().expect("copies were written");
            let mut moved_bytes = 0;
            let mut moved = 0;
            for &server_id in &self.body_moves {
                let body = self.bodies.get_mut(&server_id).expect("planned");
                if body.loc != Loc::Segment(c.segment) {
                    continue; // listed twice (a damaged log)
                }
                body.loc = Loc::Segment(n);
                moved += 1;
                moved_bytes += body_bytes(&body.msg);
                let seg = self.segments.get_mut(&n).expect("active");
                seg.body_index.push(server_id);
            }
            for &(user, server_id) in &self.moves {
                let entry = lookup_mut(&mut self.queues, user, server_id).expect("planned");
                if entry.loc != Loc::Segment(c.segment) {
                    // Moved already: the victim's index lists it twice,
                    // which only the replay of a damaged log (two Queued
                    // records of one message in one file) does. The extra
                    // copy written is dead bytes.
                    continue;
                }
                entry.loc = Loc::Segment(n);
                moved += 1;
                let copy = self.bodies.contains_key(&server_id)
                    && !self.clashes.contains(&(user, server_id));
                moved_bytes += if copy {
                    MEMBER_BYTES
                } else {
                    queued_bytes(&entry.msg)
                };
                if let Some(origin) = entry.msg.origin {
                    // The window entry lives in the message's record.
                    if let Some(t) = self.windows.get_mut(entry.msg.from, origin) {
                        let old = WLoc {
                            loc: Loc::Segment(c.segment),
                            orphan: false,
                        };
                        if t.loc == old {
                            t.loc.loc = Loc::Segment(n);
                        }
                    }
                }
                self.segments
                    .get_mut(&n)
                    .expect("active")
                    .index
                    .push((user, server_id));
            }
            let victim = self.segments.get_mut(&c.segment).expect("victim");
            victim.live -= moved;
            victim.live_bytes -= moved_bytes;
            let seg = self.segments.get_mut(&n).expect("active");
            seg.live += moved;
            seg.live_bytes += moved_bytes;
            seg.pins.insert(c.segment);
            self.rewritten_bytes += moved_bytes;
        }
        if !self.orphan_moves.is_empty() {
            let n = self.active_number().expect("copies were written");
            let mut copied = 0;
            for &(from, origin) in &self.orphan_moves {
                // Pruned by this very commit (its batch pushed newer
                // entries): the copy written is dead bytes.
                let Some(t) = self.windows.get_mut(from, origin) else {
                    continue;
                };
                // Listed twice only by a damaged log; the extra copy is dead.
                if t.loc.loc == Loc::Segment(c.segment) {
                    t.loc.loc = Loc::Segment(n);
                    copied += 1;
                    let seg = self.segments.get_mut(&n).expect("active");
                    seg.orphans.push((from, origin));
                }
            }
            let victim = self.segments.get_mut(&c.segment).expect("victim");
            victim.refs -= copied;
            victim.live_bytes -= copied * TAKEN_BYTES;
            let seg = self.segments.get_mut(&n).expect("active");
            seg.refs += copied;
            seg.live_bytes += copied * TAKEN_BYTES;
            self.rewritten_bytes += copied * TAKEN_BYTES;
        }
        let victim = &self.segments[&c.segment];
        if victim.holds_nothing() {
            debug_assert!(victim.pins.is_empty());
            // Gone once its copies are durable (`after_sync`).
            self.compacting = None;
            self.victim_done = Some(c.segment);
        } else {
            debug_assert!(cursor < victim.index.len() + victim.body_index.len() || victim.refs > 0);
            self.compacting = Some(Compaction {
                segment: c.segment,
                cursor,
            });
        }
        Ok(())
    }

    /// Deletes up to [`DELETES_PER_COMMIT`] sealed segments that have no
    /// live message and no pins, oldest first.
    pub(super) fn delete_dead(&mut self) -> Result<(), StoreError> {
        let active = self.active_number();
        let mut deleted = 0;
        let mut at = 0;
        while deleted < DELETES_PER_COMMIT {
            // Re-find each time: a deletion may unpin a newer segment.
            let Some(n) = self
                .segments
                .range(at..)
                .find(|(n, s)| Some(**n) != active && s.holds_nothing() && s.pins.is_empty())
                .map(|(n, _)| *n)
            else {
                break;
            };
            self.delete_segment(n)?;
            deleted += 1;
            at = n;
        }
        Ok(())
    }

    pub(super) fn delete_segment(&mut self, n: u32) -> Result<(), StoreError> {
        debug_assert_ne!(Some(n), self.active_number());
        debug_assert!(self.segments[&n].holds_nothing());
        debug_assert!(self.segments[&n].pins.is_empty());
        let path = self.segment_path(n);
        files::remove(&path).map_err(io_at(&path, "delete segment"))?;
        // Durable before any segment it pinned may go: otherwise a crash
        // could keep this file and lose the tombstones that cancel it.
        let dir = self.dir.clone();
        self.sync_dir(&dir)?;
        let seg = self.segments.remove(&n).expect("exists");
        self.disk_bytes -= seg.bytes;
        for other in self.segments.values_mut() {
            other.pins.remove(&n);
        }
        if self.compacting.is_some_and(|c| c.segment == n) {
            self.compacting = None;
        }
        self.maintenance = true;
        Ok(())
    }
}
