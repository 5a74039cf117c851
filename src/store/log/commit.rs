//! The commit path: one batch encoded, written with one `write` and synced
//! once, then applied to the bookkeeping; a batch that finds the disk full
//! is rolled back (see "Group commit" and "Disk full" in the module docs).

use std::time::Instant;

use super::*;
use crate::store::fault;
use crate::store::files;
use crate::store::record::Record;
use crate::store::segment;

impl LogStore {
    pub(super) fn commit_inner(
        &mut self,
        refused: &mut Vec<u64>,
        now: Instant,
    ) -> Result<(), StoreError> {
        if self.watermark_due() && self.meta_retry_at.is_none_or(|at| now >= at) {
            // The batch's ids are all below the watermark on disk (pushes
            // past it are refused), so a full disk here only delays it.
            match self.write_meta(self.server_id_max.saturating_add(ID_RESERVE)) {
                Ok(()) => self.meta_retry_at = None,
                Err(e) if e.is_no_space() => {
                    self.meta_retry_at = Some(now + SPACE_CHECK_SHORT_EVERY);
                    let watermark = self.id_watermark;
                    let beyond = self.staged.iter().any(|s| {
                        matches!(s, Staged::Queued { server_id, .. } | Staged::Body { server_id }
                            if *server_id >= watermark)
                    });
                    if beyond {
                        self.roll_back(refused, &e);
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }

        // 1. The batch: staged records, encoded from the queues.
        self.buf.clear();
        for staged in &self.staged {
            match *staged {
                Staged::Queued { user, server_id } => {
                    let entry = lookup(&self.queues, user, server_id)
                        .expect("a staged message is still queued (else it was cancelled)");
                    queued_record(user, &entry.msg).encode(&mut self.buf);
                }
                Staged::Body { server_id } => {
                    let body = &self.bodies[&server_id];
                    body_record(&body.msg).encode(&mut self.buf);
                }
                Staged::Member { user, server_id } => {
                    Record::Member { user, server_id }.encode(&mut self.buf);
                }
                Staged::Delivered {
                    user, server_id, ..
                } => Record::Delivered { user, server_id }.encode(&mut self.buf),
                Staged::Taken { from, origin } => {
                    let t = self
                        .windows
                        .get_mut(from, origin)
                        .expect("a staged window entry is in its window");
                    taken_record(from, origin, t).encode(&mut self.buf);
                }
                Staged::Cancelled => {}
            }
        }
        debug_assert_eq!(self.buf.len() as u64, self.staged_bytes);

        // 2. Compaction copies, in the same write.
        if self.compacting.is_none() && self.maintenance {
            self.compacting = self
                .pick_victim()
                .map(|segment| Compaction { segment, cursor: 0 });
            if self.compacting.is_none() {
                self.maintenance = false;
            }
        }
        let cursor = self.plan_moves();

        // 3. One write, one sync.
        if !self.buf.is_empty() {
            if let Err(e) = self.append() {
                if !e.is_no_space() {
                    return Err(e);
                }
                self.roll_back(refused, &e);
                // The delivery records go again at the next commit, into
                // the reserve's space.
                self.release_reserve();
                return Ok(());
            }
        }

        // 4. The records are durable: update where things are.
        self.apply_staged();
        if let Some(cursor) = cursor {
            self.apply_moves(cursor)?;
        }
        if let Some(n) = self.active_number() {
            let seg = &self.segments[&n];
            // Short of space, a mostly dead active segment is sealed so it
            // can be compacted and deleted (see "Free-space floor"); not
            // before it holds a quarter of the floor, so that one of
            // tombstones alone does not roll at every commit.
            let reclaim = !self.fits_above_floor(self.floor)
                && seg.bytes >= (self.floor / 4).max(4096)
                && seg.dead_ratio() > self.opts.compact_dead_ratio
                && seg.live_bytes <= self.compact_budget();
            if seg.bytes >= self.segment_bytes || reclaim {
                self.active = None; // sealed; the next write starts a new one
                self.maintenance = true;
            }
        }
        if !self.sync_due() {
            self.after_sync()?;
        }
        Ok(())
    }

    /// What waits for the batch to be durable: deleting the segments it
    /// made unnecessary (the compaction victim its copies emptied, fully
    /// dead ones).
    pub(super) fn after_sync(&mut self) -> Result<(), StoreError> {
        if let Some(victim) = self.victim_done.take() {
            if self.segments.get(&victim).is_some_and(|s| {
                s.holds_nothing() && s.pins.is_empty() && self.active_number() != Some(victim)
            }) {
                self.delete_segment(victim)?;
            }
        }
        if self.maintenance {
            self.delete_dead()?;
        }
        Ok(())
    }

    /// Takes the pushes of the batch that found the disk full back out of
    /// their queues (their ids go to `refused`), keeps its tombstones staged
    /// for the next commit and drops its compaction copies.
    pub(super) fn roll_back(&mut self, refused: &mut Vec<u64>, cause: &StoreError) {
        self.rollbacks += 1;
        let before = refused.len();
        self.staged_bytes = 0;
        for staged in std::mem::take(&mut self.staged) {
            match staged {
                Staged::Body { server_id } => {
                    // Its copies are all in this batch (`push_shared`),
                    // after it: they follow it out.
                    let body = self.bodies.remove(&server_id).expect("a staged body");
                    debug_assert!(matches!(body.loc, Loc::Staged(_)));
                    refused.push(server_id);
                }
                Staged::Member { user, server_id } | Staged::Queued { user, server_id } => {
                    let queue = self.queues.get_mut(&user).expect("a staged push is queued");
                    let at = find(queue, server_id).expect("a staged push is queued");
                    let before = queue_state(Some(queue), |e| &e.msg);
                    let entry = queue.remove(at).expect("found");
                    self.shape
                        .update(user, before, queue_state(Some(queue), |e| &e.msg));
                    debug_assert!(matches!(entry.loc, Loc::Staged(_)));
                    if let Some(origin) = entry.msg.origin {
                        // Not taken after all: a retry is new again.
                        let t = self.windows.remove(entry.msg.from, origin);
                        debug_assert!(t.is_some_and(|t| t.loc.loc == entry.loc));
                    }
                    if queue.is_empty() {
                        self.queues.remove(&user);
                    }
                    self.total -= 1;
                    if matches!(staged, Staged::Queued { .. }) {
                        refused.push(server_id);
                    } else if self.bodies.contains_key(&server_id) {
                        // A copy of a body from an earlier batch.
                        self.drop_member(server_id);
                    }
                }
                Staged::Delivered { .. } => {
                    self.staged.push(staged);
                    self.staged_bytes += Record::delivered_bytes() as u64;
                }
                Staged::Taken { from, origin } => {
                    // Its message was answered (ACKed) already; the window
                    // entry goes again with the next commit.
                    let at = self.staged.len() as u32;
                    let t = self.windows.get_mut(from, origin).expect("staged entry");
                    t.loc.loc = Loc::Staged(at);
                    self.staged.push(staged);
                    self.staged_bytes += TAKEN_BYTES;
                }
                Staged::Cancelled => {}
            }
        }
        self.staged_records = self.staged.len();
        self.moves.clear();
        self.orphan_moves.clear();
        self.buf.clear();
        // The disk is full whatever the last look said: refuse pushes until
        // the next look (due at once) finds space above the floor.
        self.free_bytes = 0;
        self.written_since_check = 0;
        self.space_checked = None;
        self.set_short(true);
        log::warn!(
            "store {}: {cause}: rolled back {} new messages (refused with storage_full) and \
             kept {} delivery records for the next write",
            self.dir.display(),
            refused.len() - before,
            self.staged.len()
        );
    }

    fn append(&mut self) -> Result<(), StoreError> {
        if self.active.is_none() {
            let n = self.next_segment;
            let path = self.segment_path(n);
            self.next_segment = n.checked_add(1).ok_or_else(|| StoreError::Meta {
                path: path.clone(),
                reason: "segment numbers are used up".to_string(),
            })?;
            let file = files::create_new_append(&path).map_err(io_at(&path, "create segment"))?;
            let dir = self.dir.clone();
            self.sync_dir(&dir)?;
            self.segments.insert(n, Segment::default());
            self.active = Some((n, Arc::new(file)));
        }
        let fsync = self.fsync();
        let (n, file) = self.active.as_ref().expect("created above");
        let n = *n;
        let path = self.dir.join(segment::file_name(n));
        if let Err(e) = files::write(file, &path, &self.buf) {
            if !fault::is_no_space(&e) {
                return Err(io_at(&path, "append to segment")(e));
            }
            // Cut what part of the batch made it, so the next batch follows
            // the last good record. If that fails too, the file's end is
            // unknown: a failed store, replayed at restart.
            let good = self.segments[&n].bytes;
            files::truncate(file, &path, good).map_err(io_at(&path, "truncate a partial write"))?;
            return Err(io_at(&path, "append to segment")(e));
        }
        if fsync {
            // Synced by the SyncJob `begin_commit` hands out.
            self.unsynced = Some((Arc::clone(file), path));
        }
        let len = self.buf.len() as u64;
        self.written_since_check += len;
        self.segments.get_mut(&n).expect("active").bytes += len;
        self.disk_bytes += len;
        Ok(())
    }

    fn apply_staged(&mut self) {
        if self.staged_records == 0 {
            self.staged.clear();
            return;
        }
        let n = self.active_number().expect("a batch was written");
        // Sender devices whose windows took entries: pruned once durable.
        let mut touched: Vec<(u64, u32)> = Vec::new();
        for i in 0..self.staged.len() {
            match self.staged[i] {
                Staged::Body { server_id } => {
                    let body = self.bodies.get_mut(&server_id).expect("a staged body");
                    debug_assert_eq!(body.loc, Loc::Staged(i as u32));
                    body.loc = Loc::Segment(n);
                    let bytes = body_bytes(&body.msg);
                    let seg = self.segments.get_mut(&n).expect("active");
                    seg.live += 1;
                    seg.live_bytes += bytes;
                    seg.body_index.push(server_id);
                }
                Staged::Member { user, server_id } => {
                    let entry = lookup_mut(&mut self.queues, user, server_id).expect("staged");
                    debug_assert_eq!(entry.loc, Loc::Staged(i as u32));
                    entry.loc = Loc::Segment(n);
                    let seg = self.segments.get_mut(&n).expect("active");
                    seg.live += 1;
                    seg.live_bytes += MEMBER_BYTES;
                    seg.index.push((user, server_id));
                }
                Staged::Queued { user, server_id } => {
                    let entry = lookup_mut(&mut self.queues, user, server_id).expect("staged");
                    debug_assert_eq!(entry.loc, Loc::Staged(i as u32));
                    entry.loc = Loc::Segment(n);
                    let bytes = queued_bytes(&entry.msg);
                    if let Some(origin) = entry.msg.origin {
                        let from = entry.msg.from;
                        if let Some(t) = self.windows.get_mut(from, origin) {
                            if t.loc.loc == Loc::Staged(i as u32) {
                                t.loc.loc = Loc::Segment(n);
                            }
                        }
                        touched.push((from, origin.device));
                    }
                    let seg = self.segments.get_mut(&n).expect("active");
                    seg.live += 1;
                    seg.live_bytes += bytes;
                    seg.index.push((user, server_id));
                }
                Staged::Taken { from, origin } => {
                    let t = self.windows.get_mut(from, origin).expect("staged entry");
                    debug_assert_eq!(
                        t.loc,
                        WLoc {
                            loc: Loc::Staged(i as u32),
                            orphan: true
                        }
                    );
                    t.loc.loc = Loc::Segment(n);
                    let seg = self.segments.get_mut(&n).expect("active");
                    seg.refs += 1;
                    seg.live_bytes += TAKEN_BYTES;
                    seg.orphans.push((from, origin));
                    touched.push((from, origin.device));
                }
                Staged::Delivered { target, .. } => {
                    if target != n && self.segments.contains_key(&target) {
                        let seg = self.segments.get_mut(&n).expect("active");
                        seg.pins.insert(target);
                    }
                }
                Staged::Cancelled => {}
            }
        }
        self.staged.clear();
        self.staged_records = 0;
        self.staged_bytes = 0;
        touched.sort_unstable();
        touched.dedup();
        for (from, device) in touched {
            self.prune_window(from, device);
        }
    }

    /// Drops the entries of a window that fell below it; the segments that
    /// kept them for it may go.
    pub(super) fn prune_window(&mut self, from: u64, device: u32) {
        let segments = &mut self.segments;
        let mut freed = false;
        self.windows.prune(from, device, |t| {
            if let WLoc {
                loc: Loc::Segment(m),
                orphan: true,
            } = t.loc
            {
                let seg = segments.get_mut(&m).expect("a window entry's segment");
                seg.refs -= 1;
                seg.live_bytes -= TAKEN_BYTES;
                freed = true;
            }
        });
        self.maintenance |= freed;
    }
}
