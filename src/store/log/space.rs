//! Free space: the `statvfs`-driven look at the filesystem, the floor under
//! which pushes are refused, and the `reserve` file that lets deliveries
//! free space on a full disk (see "Free-space floor" and "Disk full" in
//! the module docs).

use std::fs;
use std::time::Instant;

use super::*;
use crate::store::files;

impl LogStore {
    /// Re-reads the filesystem's free space if it is due (see "Free-space
    /// floor" in the module docs), and logs when pushes stop or resume.
    pub(super) fn check_space(&mut self, now: Instant) {
        let every = if self.short {
            SPACE_CHECK_SHORT_EVERY
        } else {
            SPACE_CHECK_EVERY
        };
        let margin = self.free_bytes.saturating_sub(self.floor);
        let due = match self.space_checked {
            None => true,
            Some(at) => now.duration_since(at) >= every || self.written_since_check > margin / 2,
        };
        if !due {
            return;
        }
        self.space_checked = Some(now);
        self.written_since_check = 0;
        let Some((free, size)) = files::space(&self.dir) else {
            self.free_bytes = u64::MAX;
            return;
        };
        self.free_bytes = free;
        self.segment_bytes = self
            .opts
            .segment_bytes_max
            .min((size / SEGMENT_FS_SHARE).max(SEGMENT_FS_BYTES_MIN));
        if self.opts.disk_free_bytes_min == 0 {
            self.floor = (size / 100 * AUTO_FLOOR_PERCENT).min(AUTO_FLOOR_BYTES_MAX);
        }
        self.set_short(free < self.floor);
        self.keep_reserve();
    }

    /// Writes the reserve file when it is missing and there is room for it
    /// above the floor.
    pub(super) fn keep_reserve(&mut self) {
        let want = (self.floor / 4).min(RESERVE_BYTES_MAX);
        if self.reserve_bytes > 0 || self.short || want == 0 || !self.fits_above_floor(want) {
            return;
        }
        let path = self.dir.join(RESERVE);
        let written = files::create(&path).and_then(|file| {
            // A pattern, not zeros: a compressing filesystem (ZFS) would
            // keep zeros in no space at all.
            let chunk = [0x5au8; 64 * 1024];
            let mut left = want;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                files::write(&file, &path, &chunk[..n])?;
                left -= n as u64;
            }
            if self.fsync() {
                files::sync(&file, &path, true)?;
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                self.reserve_bytes = want;
                self.written_since_check += want;
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                log::debug!("store {}: no reserve file: {e}", self.dir.display());
            }
        }
    }

    /// Deletes the reserve file (the disk is full): its space goes to
    /// delivery records and compaction copies, which free more. Whether
    /// there was one.
    pub(super) fn release_reserve(&mut self) -> bool {
        if self.reserve_bytes == 0 {
            return false;
        }
        let path = self.dir.join(RESERVE);
        if let Err(e) = files::remove(&path) {
            log::warn!(
                "store {}: cannot release the reserve: {e}",
                self.dir.display()
            );
            return false;
        }
        log::warn!(
            "store {}: disk full: released the {}-byte reserve for delivery records and \
             compaction; it is written again once space is back",
            self.dir.display(),
            self.reserve_bytes
        );
        self.reserve_bytes = 0;
        self.space_checked = None;
        true
    }

    pub(super) fn set_short(&mut self, short: bool) {
        if short == self.short {
            return;
        }
        self.short = short;
        let free = self.free_bytes().unwrap_or(0);
        if short {
            log::warn!(
                "store {}: disk space short ({free} bytes free, floor {} bytes): new messages \
                 are refused with storage_full; deliveries go on and free space",
                self.dir.display(),
                self.floor
            );
        } else {
            log::info!(
                "store {}: disk space back ({free} bytes free, floor {} bytes): taking new \
                 messages again",
                self.dir.display(),
                self.floor
            );
        }
    }

    /// Whether the free space, less `extra` bytes about to be written, stays
    /// at or above the floor.
    pub(super) fn fits_above_floor(&self, extra: u64) -> bool {
        match self.free_bytes() {
            None => true,
            Some(free) => free >= extra.saturating_add(self.floor),
        }
    }
}
