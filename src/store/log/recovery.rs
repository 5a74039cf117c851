//! Recovery: [`LogStore::open`] replays the segments, cuts a torn tail,
//! and with `repair` skips damaged records and rewrites their files (see
//! "Recovery" in the module docs). [`Recovery`] is what it reports.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::meta::read_meta;
use super::*;
use crate::store::files;
use crate::store::record::Record;
use crate::store::segment::{self, Scanner, Step};
use crate::store::window::Taken;
use crate::store::Stored;

/// Bytes recovery skipped in `repair` mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The segment file.
    pub file: PathBuf,
    /// Where the skipped bytes start.
    pub offset: u64,
    /// How many bytes were skipped.
    pub bytes: u64,
    /// Why the first record there was rejected.
    pub reason: &'static str,
}

/// What [`LogStore::open`] found and did; its `Display` is the log line.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Segment files replayed.
    pub segments: usize,
    /// Bytes read.
    pub bytes_read: u64,
    /// Valid records replayed.
    pub records: u64,
    /// Messages queued after replay.
    pub messages: usize,
    /// What [`Store::max_server_id`] returns: continue the ids after it.
    pub max_server_id: u64,
    /// Bytes of torn tail cut from the last segment.
    pub bytes_cut: u64,
    /// The file and offset where the tail was cut, if it was.
    pub cut_at: Option<(PathBuf, u64)>,
    /// Damaged stretches skipped (only with `repair`).
    pub skipped: Vec<Skipped>,
    /// Group copies dropped because their shared body was not found (only
    /// after a `repair` skipped it).
    pub copies_lost: usize,
    /// `meta` was missing and was written anew (only with `repair`).
    pub meta_recreated: bool,
    /// Wall time of the whole `open`.
    pub elapsed: Duration,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replayed {} segments ({} bytes, {} records) in {} ms: {} messages queued, \
             ids continue after {}",
            self.segments,
            self.bytes_read,
            self.records,
            self.elapsed.as_millis(),
            self.messages,
            self.max_server_id
        )?;
        if self.copies_lost > 0 {
            write!(
                f,
                "; dropped {} group copies whose body was skipped",
                self.copies_lost
            )?;
        }
        if let Some((file, offset)) = &self.cut_at {
            write!(
                f,
                "; cut a torn tail of {} bytes from {} at offset {offset}",
                self.bytes_cut,
                file.display()
            )?;
        }
        for s in &self.skipped {
            write!(
                f,
                "; repair skipped {} bytes of {} at offset {} ({})",
                s.bytes,
                s.file.display(),
                s.offset,
                s.reason
            )?;
        }
        if self.meta_recreated {
            f.write_str("; repair wrote a new meta file")?;
        }
        Ok(())
    }
}

impl LogStore {
    pub(super) fn recover(&mut self, rec: &mut Recovery) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        match fs::metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                files::create_dir(&dir).map_err(io_at(&dir, "create directory"))?;
                let parent = match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                self.sync_dir(&parent)?;
            }
            Err(e) => return Err(io_at(&dir, "inspect directory")(e)),
        }

        let mut numbers = Vec::new();
        let mut meta_found = false;
        for entry in fs::read_dir(&dir).map_err(io_at(&dir, "list directory"))? {
            let entry = entry.map_err(io_at(&dir, "list directory"))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == META {
                meta_found = true;
            } else if name == META_TMP || name.ends_with(TMP_SUFFIX) {
                // Left by a crash before its rename; the original is intact.
                let path = entry.path();
                files::remove(&path).map_err(io_at(&path, "remove leftover"))?;
            } else if let Some(n) = segment::parse_file_name(name) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();

        let meta_path = dir.join(META);
        let watermark = if meta_found {
            read_meta(&meta_path)?
        } else if numbers.is_empty() {
            0
        } else if self.opts.repair {
            rec.meta_recreated = true;
            0
        } else {
            return Err(StoreError::Meta {
                path: meta_path,
                reason: "missing although segment files exist; start with --repair to \
                         write a new one (ids continue after the highest id in the log)"
                    .to_string(),
            });
        };

        for (i, &n) in numbers.iter().enumerate() {
            self.replay_segment(n, i + 1 == numbers.len(), rec)?;
        }
        rec.segments = numbers.len();
        rec.copies_lost = self.resolve_bodies();
        self.account_windows();
        self.size_after_replay();
        if let (Some(&last), true) = (numbers.last(), self.fsync()) {
            // After a failed fsync (a shard restart), the end of the last
            // segment was read back from the page cache but may not be on
            // disk. If that segment is full it is never synced again, and a
            // power cut would tear a segment that is no longer the last,
            // which the next start refuses as corrupt (simulator seed
            // 500301). Make what was replayed durable before building on it.
            let path = self.segment_path(last);
            let file = fs::File::open(&path).map_err(io_at(&path, "open segment"))?;
            files::sync(&file, &path, true).map_err(io_at(&path, "sync"))?;
            self.syncs += 1;
        }

        if let Some(&last) = numbers.last() {
            self.next_segment = last.checked_add(1).ok_or_else(|| StoreError::Meta {
                path: self.segment_path(last),
                reason: "segment numbers are used up".to_string(),
            })?;
            if self.segments[&last].bytes < self.opts.segment_bytes_max {
                let path = self.segment_path(last);
                let file = files::open_append(&path).map_err(io_at(&path, "open segment"))?;
                self.active = Some((last, Arc::new(file)));
            }
        }

        self.server_id_max = self.server_id_max.max(watermark);
        // New ids continue after the old watermark; until a higher one is on
        // disk, pushes are refused (see "Disk full").
        self.id_watermark = watermark;
        self.reserve_bytes = fs::metadata(dir.join(RESERVE)).map_or(0, |m| m.len());
        let mut meta = self.write_meta(self.server_id_max.saturating_add(ID_RESERVE));
        if meta.as_ref().is_err_and(StoreError::is_no_space) && self.release_reserve() {
            meta = self.write_meta(self.server_id_max.saturating_add(ID_RESERVE));
        }
        match meta {
            Ok(()) => {}
            Err(e) if e.is_no_space() => {
                log::warn!(
                    "store {}: {e}: starting on a full disk; queued messages are served, new \
                     ones are refused until space is freed",
                    self.dir.display()
                );
                self.meta_retry_at = Some(self.clock.now() + SPACE_CHECK_SHORT_EVERY);
            }
            Err(e) => return Err(e),
        }
        self.maintenance = true;
        Ok(())
    }

    fn replay_segment(&mut self, n: u32, last: bool, rec: &mut Recovery) -> Result<(), StoreError> {
        let path = self.segment_path(n);
        let data = fs::read(&path).map_err(io_at(&path, "read segment"))?;
        rec.bytes_read += data.len() as u64;
        self.segments.insert(n, Segment::default());
        // Byte ranges of the valid records, kept for a repair rewrite.
        let mut good: Vec<(usize, usize)> = Vec::new();
        let mut damaged = false;
        let mut cut_at = None;
        for step in Scanner::new(&data) {
            match step {
                Step::Record {
                    offset,
                    len,
                    record,
                } => {
                    self.replay_record(n, record, len as u64);
                    rec.records += 1;
                    if self.opts.repair {
                        good.push((offset, offset + len));
                    }
                }
                Step::Bad {
                    offset,
                    reason,
                    resume,
                    zero_sector,
                } => {
                    if last && (resume.is_none() || zero_sector) {
                        cut_at = Some(offset);
                        break;
                    }
                    if !self.opts.repair {
                        return Err(StoreError::Corrupt {
                            file: path,
                            offset: offset as u64,
                            reason,
                        });
                    }
                    damaged = true;
                    rec.skipped.push(Skipped {
                        file: path.clone(),
                        offset: offset as u64,
                        bytes: (resume.unwrap_or(data.len()) - offset) as u64,
                        reason,
                    });
                }
            }
        }
        if let Some(offset) = cut_at {
            rec.bytes_cut += (data.len() - offset) as u64;
            rec.cut_at = Some((path.clone(), offset as u64));
        }
        let bytes = if damaged {
            // Rewrite without the bad bytes (and without a cut tail), so the
            // next start needs no repair.
            let mut clean = Vec::with_capacity(data.len());
            for &(from, to) in &good {
                clean.extend_from_slice(&data[from..to]);
            }
            let tmp = self.dir.join(format!("{}.tmp", segment::file_name(n)));
            let file = files::create(&tmp).map_err(io_at(&tmp, "create"))?;
            files::write(&file, &tmp, &clean).map_err(io_at(&tmp, "write"))?;
            if self.fsync() {
                files::sync(&file, &tmp, true).map_err(io_at(&tmp, "sync"))?;
                self.syncs += 1;
            }
            files::rename(&tmp, &path).map_err(io_at(&path, "replace segment"))?;
            let dir = self.dir.clone();
            self.sync_dir(&dir)?;
            clean.len()
        } else if let Some(offset) = cut_at {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_at(&path, "open segment"))?;
            files::truncate(&file, &path, offset as u64)
                .map_err(io_at(&path, "truncate torn tail"))?;
            // The cut must be durable before new records follow it.
            if self.fsync() {
                files::sync(&file, &path, false).map_err(io_at(&path, "sync"))?;
                self.syncs += 1;
            }
            offset
        } else {
            data.len()
        };
        let seg = self.segments.get_mut(&n).expect("inserted above");
        seg.bytes = bytes as u64;
        debug_assert!(seg.live_bytes <= seg.bytes);
        self.disk_bytes += bytes as u64;
        Ok(())
    }

    fn replay_record(&mut self, n: u32, record: Record<'_>, len: u64) {
        match record {
            Record::Queued {
                user,
                server_id,
                from,
                time_ms,
                origin,
                body,
            } => {
                self.server_id_max = self.server_id_max.max(server_id);
                if self.replay_members.contains(&(user, server_id)) {
                    // Only a damaged log holds a message where a copy is:
                    // the later record is the current one.
                    self.replaced(n, user, server_id, true);
                }
                if let Some(origin) = origin {
                    let t = Taken {
                        client_id: origin.client_id,
                        server_id,
                        time_ms,
                        loc: WLoc {
                            loc: Loc::Segment(n),
                            orphan: false,
                        },
                    };
                    self.windows.insert(from, origin, t);
                    // Pruned as it goes, or a sender's whole history in the
                    // log would be held until the end of the replay. The
                    // result is the same: pruning depends only on the
                    // highest client_id, which never goes down.
                    self.windows.prune(from, origin.device, |_| {});
                }
                let queue = self.queues.entry(user).or_default();
                match find(queue, server_id) {
                    Ok(at) => {
                        // A compaction copy whose original was not deleted
                        // yet (a crash in between): the later copy is the
                        // current one, and must outlive the original. Only
                        // a damaged log holds copies that differ, or two in
                        // one file: each segment gives up the bytes it held.
                        let entry = &mut queue[at];
                        let old_bytes = queued_bytes(&entry.msg);
                        entry.msg = Stored {
                            server_id,
                            from,
                            time_ms,
                            origin,
                            body: body.into(),
                        };
                        let old = std::mem::replace(&mut entry.loc, Loc::Segment(n));
                        if let Loc::Segment(o) = old {
                            let from_seg = self.segments.get_mut(&o).expect("replayed");
                            from_seg.live -= 1;
                            from_seg.live_bytes -= old_bytes;
                            let seg = self.segments.get_mut(&n).expect("replaying");
                            seg.live += 1;
                            seg.live_bytes += len;
                            if o != n {
                                seg.pins.insert(o);
                            }
                        }
                    }
                    Err(at) => {
                        let msg = Stored {
                            server_id,
                            from,
                            time_ms,
                            origin,
                            body: body.into(),
                        };
                        queue.insert(
                            at,
                            Entry {
                                msg,
                                loc: Loc::Segment(n),
                            },
                        );
                        self.total += 1;
                        let seg = self.segments.get_mut(&n).expect("replaying");
                        seg.live += 1;
                        seg.live_bytes += len;
                    }
                }
                let seg = self.segments.get_mut(&n).expect("replaying");
                seg.index.push((user, server_id));
            }
            Record::Body {
                server_id,
                from,
                time_ms,
                body,
            } => {
                let msg = Stored {
                    server_id,
                    from,
                    time_ms,
                    origin: None,
                    body: body.into(),
                };
                self.replay_body(n, msg, len);
            }
            Record::Member { user, server_id } => self.replay_member(n, user, server_id),
            Record::Delivered { user, server_id } => {
                let Some(queue) = self.queues.get_mut(&user) else {
                    return; // Its Queued record went with a deleted segment.
                };
                let Ok(at) = find(queue, server_id) else {
                    return;
                };
                let entry = queue.remove(at).expect("found");
                self.total -= 1;
                if queue.is_empty() {
                    self.queues.remove(&user);
                }
                if let Some(origin) = entry.msg.origin {
                    // Its window entry outlives it, in the same record.
                    if let Some(t) = self.windows.get_mut(entry.msg.from, origin) {
                        if t.loc.loc == entry.loc {
                            t.loc.orphan = true;
                        }
                    }
                }
                let shared = self.replay_members.remove(&(user, server_id));
                if let Loc::Segment(o) = entry.loc {
                    let from_seg = self.segments.get_mut(&o).expect("replayed");
                    from_seg.live -= 1;
                    from_seg.live_bytes -= if shared {
                        MEMBER_BYTES
                    } else {
                        queued_bytes(&entry.msg)
                    };
                    if o != n {
                        let seg = self.segments.get_mut(&n).expect("replaying");
                        seg.pins.insert(o);
                    }
                }
                if shared {
                    self.replay_member_gone(server_id);
                }
            }
            Record::Taken {
                from,
                origin,
                server_id,
                time_ms,
            } => {
                // A copy made while its message was still queued is only
                // in a damaged log: the message's record stays the one.
                let queued = self
                    .windows
                    .get(from, origin)
                    .is_some_and(|t| !t.loc.orphan);
                if !queued {
                    let t = Taken {
                        client_id: origin.client_id,
                        server_id,
                        time_ms,
                        loc: WLoc {
                            loc: Loc::Segment(n),
                            orphan: true,
                        },
                    };
                    self.windows.insert(from, origin, t);
                    self.windows.prune(from, origin.device, |_| {});
                }
            }
        }
    }

    /// After the replay: gives back what replaying grew beyond the queued
    /// messages. Each queue is cut to its length (a replay inserts every
    /// record of a user's history, and capacity doubles), the map of
    /// queues to its entries, and each segment's index to the messages
    /// still live in it (the replay listed every `Queued` record, delivered
    /// or not; compaction skips the dead ones anyway).
    fn size_after_replay(&mut self) {
        for queue in self.queues.values_mut() {
            queue.shrink_to_fit();
        }
        self.queues.shrink_to_fit();
        let queues = &self.queues;
        for (&n, seg) in self.segments.iter_mut() {
            seg.index.retain(|&(user, server_id)| {
                lookup(queues, user, server_id).is_some_and(|e| e.loc == Loc::Segment(n))
            });
            seg.index.shrink_to_fit();
            let bodies = &self.bodies;
            seg.body_index
                .retain(|id| bodies.get(id).is_some_and(|b| b.loc == Loc::Segment(n)));
            seg.body_index.shrink_to_fit();
        }
    }

    /// After the replay: prunes the windows, and makes the segments that
    /// keep a window entry whose message is gone count it.
    fn account_windows(&mut self) {
        self.windows.prune_all(|_| {});
        for (from, origin, t) in self.windows.iter() {
            if let WLoc {
                loc: Loc::Segment(n),
                orphan: true,
            } = t.loc
            {
                let seg = self.segments.get_mut(&n).expect("replayed");
                seg.refs += 1;
                seg.live_bytes += TAKEN_BYTES;
                seg.orphans.push((from, origin));
            }
        }
    }
}
