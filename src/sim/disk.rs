//! The simulated disk: what the store's file layer ([`crate::store::files`])
//! consults on a thread that runs a simulation.
//!
//! The files themselves are real (in a temporary directory), so the store's
//! reads and listings run unchanged; this layer keeps, per file, how long
//! it is and how much of it an fsync made durable, skips the real fsyncs,
//! and injects faults from a seeded PRNG: ENOSPC on a write (half the
//! buffer is written first, as a disk that fills mid-write), EIO on a write
//! or an fsync. [`crash`] is a power cut: every file is cut back to its
//! durable length plus a random part of what followed (a torn last write).
//! [`flip_cold`] is bit rot: one byte of a record in a sealed segment (not
//! the newest of its directory) changes; the flips not yet read back are
//! kept ([`flips`]) so the simulator can check the store detected each.
//! Directory operations (create, rename, remove) count as durable at once;
//! the store syncs the directory after each anyway.
//!
//! The state is thread-local: only the thread that [`install`]ed a disk is
//! affected, so a simulation and the real server (or other tests) can run
//! in one process. Without an installed disk every hook is one
//! thread-local read that finds nothing.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::store::fault::Op;

/// Size the simulated filesystem reports, bytes. Constant, so the store's
/// space checks (made on a real timer) find the same answer whenever they
/// run; a full disk is simulated by ENOSPC on writes instead.
const REPORTED_BYTES: u64 = 1 << 40;

/// Which disk faults are on, per million operations of the kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskFaults {
    /// Writes that fail with ENOSPC after writing half their bytes.
    pub write_enospc_per_million: u32,
    /// Writes that fail with EIO, writing nothing.
    pub write_eio_per_million: u32,
    /// fsyncs (of files and directories) that fail with EIO.
    pub sync_eio_per_million: u32,
}

/// Faults injected so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounts {
    /// ENOSPC on a write.
    pub write_enospc: u64,
    /// EIO on a write.
    pub write_eio: u64,
    /// EIO on an fsync.
    pub sync_eio: u64,
    /// Files cut at a crash (bytes that were not durable were lost).
    pub torn: u64,
    /// Bytes flipped in sealed segments.
    pub flipped: u64,
}

/// One flipped byte and the record it damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flip {
    /// The segment file.
    pub path: PathBuf,
    /// The damaged record's byte range in the file.
    pub record: (u64, u64),
    /// (recipient, server id) of the message the record queued, if it was
    /// a Queued record: the one message a repair may lose with it.
    pub queued: Option<(u64, u64)>,
    /// (sender, client_id) of the v2 dedupe entry the record held (a
    /// Queued record with an origin, or a Taken record): a repair that
    /// skips it forgets that the SEND was taken, so a retry is stored anew.
    pub origin: Option<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, Default)]
struct FileState {
    len: u64,
    durable: u64,
}

struct Disk {
    rng: fastrand::Rng,
    faults: DiskFaults,
    on: bool,
    counts: DiskCounts,
    /// Sorted by path, so a crash cuts files in a reproducible order.
    files: BTreeMap<PathBuf, FileState>,
    /// Flips in files that have not been rewritten or removed since.
    flips: Vec<Flip>,
}

thread_local! {
    static DISK: RefCell<Option<Disk>> = const { RefCell::new(None) };
}

fn with<R>(f: impl FnOnce(&mut Disk) -> R) -> Option<R> {
    DISK.with(|d| d.borrow_mut().as_mut().map(f))
}

/// Installs a simulated disk on this thread, faults drawn from `seed`.
/// Replaces any disk installed before.
pub fn install(seed: u64, faults: DiskFaults) {
    DISK.with(|d| {
        *d.borrow_mut() = Some(Disk {
            rng: fastrand::Rng::with_seed(seed),
            faults,
            on: true,
            counts: DiskCounts::default(),
            files: BTreeMap::new(),
            flips: Vec::new(),
        })
    });
}

/// Removes this thread's simulated disk; returns the faults it injected.
pub fn uninstall() -> DiskCounts {
    DISK.with(|d| d.borrow_mut().take().map(|d| d.counts).unwrap_or_default())
}

/// Turns fault injection on or off (off: the disk only keeps durability).
pub fn set_faults(on: bool) {
    with(|d| d.on = on);
}

/// The faults injected so far.
pub fn counts() -> DiskCounts {
    with(|d| d.counts).unwrap_or_default()
}

/// A power cut: every file loses what no fsync covered, but for a random
/// prefix of it (the torn last write). The real files are cut to match.
pub fn crash() -> io::Result<()> {
    let cuts = with(|d| {
        let mut cuts = Vec::new();
        for (path, f) in d.files.iter_mut() {
            if f.len > f.durable {
                let keep = f.durable + d.rng.u64(0..=f.len - f.durable);
                d.counts.torn += 1;
                cuts.push((path.clone(), keep));
                f.len = keep;
            }
            f.durable = f.len;
        }
        cuts
    })
    .unwrap_or_default();
    for (path, keep) in cuts {
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => file.set_len(keep)?,
            // Removed outside the file layer (never by the store).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Flips one byte of a random valid record in the durable part of a random
/// sealed segment (a segment file that is not the highest-numbered of its
/// directory, so recovery never takes the damage for a torn tail). `None`
/// when there is no sealed segment with a record yet.
pub fn flip_cold() -> io::Result<Option<Flip>> {
    use crate::store::record::Record;
    use crate::store::segment::{parse_file_name, Scanner, Step};
    use std::os::unix::fs::FileExt;

    let number = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_file_name)
    };
    let Some(pick) = with(|d| {
        let sealed: Vec<(PathBuf, u64)> = d
            .files
            .iter()
            .filter(|(p, f)| {
                let (Some(n), Some(dir)) = (number(p), p.parent()) else {
                    return false;
                };
                f.durable > 0
                    && d.files
                        .keys()
                        .any(|q| q.parent() == Some(dir) && number(q).is_some_and(|m| m > n))
            })
            .map(|(p, f)| (p.clone(), f.durable))
            .collect();
        (!sealed.is_empty()).then(|| (sealed[d.rng.usize(..sealed.len())].clone(), d.rng.u64(..)))
    })
    .flatten() else {
        return Ok(None);
    };
    let ((path, durable), roll) = pick;
    let data = std::fs::read(&path)?;
    let data = &data[..(durable as usize).min(data.len())];
    // (offset, length, the message a Queued record queued, the dedupe
    // entry it held)
    type Found = (usize, usize, Option<(u64, u64)>, Option<(u64, u64)>);
    let records: Vec<Found> = Scanner::new(data)
        .filter_map(|step| match step {
            Step::Record {
                offset,
                len,
                record,
            } => {
                let (queued, origin) = match record {
                    Record::Queued {
                        user,
                        server_id,
                        from,
                        origin,
                        ..
                    } => (Some((user, server_id)), origin.map(|o| (from, o.client_id))),
                    Record::Taken { from, origin, .. } => (None, Some((from, origin.client_id))),
                    Record::Member {
                        user, server_id, ..
                    } => (Some((user, server_id)), None),
                    Record::Delivered { .. } => (None, None),
                    // A shared body takes every copy naming it: not one
                    // message a flip can be charged with.
                    Record::Body { .. } => return None,
                };
                Some((offset, len, queued, origin))
            }
            Step::Bad { .. } => None,
        })
        .collect();
    if records.is_empty() {
        return Ok(None);
    }
    let (offset, len, queued, origin) = records[(roll % records.len() as u64) as usize];
    let (at, mask) = with(|d| (offset + d.rng.usize(..len), d.rng.u8(1..))).expect("installed");
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.write_at(&[data[at] ^ mask], at as u64)?;
    let flip = Flip {
        path,
        record: (offset as u64, (offset + len) as u64),
        queued,
        origin,
    };
    with(|d| {
        d.counts.flipped += 1;
        d.flips.push(flip.clone());
    });
    Ok(Some(flip))
}

/// The flips in files not rewritten or removed since they were made.
pub fn flips() -> Vec<Flip> {
    with(|d| d.flips.clone()).unwrap_or_default()
}

/// Whether `from..to` of `path` is exactly one flipped record or several
/// back to back. A repair resumes at the next valid record after a bad one,
/// so neighbouring flipped records are skipped as one span (seeds 701013,
/// 708043, 719337); a span that starts, ends or passes anywhere else lost
/// bytes no flip explains.
pub fn is_flipped_run(flips: &[Flip], path: &Path, from: u64, to: u64) -> bool {
    let mut at = from;
    // Each step moves `at` past one flipped record, so this ends.
    while at < to {
        match flips
            .iter()
            .find(|f| f.path == path && f.record.0 == at && f.record.1 > at)
        {
            Some(f) => at = f.record.1,
            None => return false,
        }
    }
    from < to && at == to
}

/// The fault, if any, for this operation.
pub(crate) fn hit(_path: &Path, op: Op) -> io::Result<()> {
    let err = with(|d| {
        if !d.on {
            return None;
        }
        let f = d.faults;
        let mut roll = |per_million: u32| per_million > 0 && d.rng.u32(..1_000_000) < per_million;
        match op {
            Op::Write if roll(f.write_enospc_per_million) => {
                d.counts.write_enospc += 1;
                Some(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            Op::Write if roll(f.write_eio_per_million) => {
                d.counts.write_eio += 1;
                Some(io::Error::from_raw_os_error(libc::EIO))
            }
            Op::Sync if roll(f.sync_eio_per_million) => {
                d.counts.sync_eio += 1;
                Some(io::Error::from_raw_os_error(libc::EIO))
            }
            _ => None,
        }
    })
    .flatten();
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `path` was created empty (or truncated to empty).
pub(crate) fn created(path: &Path) {
    with(|d| d.files.insert(path.to_path_buf(), FileState::default()));
}

/// `path` was opened for appending; a file this disk has not seen is taken
/// as durable as it is.
pub(crate) fn opened(path: &Path, len: u64) {
    with(|d| {
        d.files
            .entry(path.to_path_buf())
            .or_insert(FileState { len, durable: len });
    });
}

/// `n` bytes were appended to `path`.
pub(crate) fn wrote(path: &Path, n: usize) {
    with(|d| {
        if let Some(f) = d.files.get_mut(path) {
            f.len += n as u64;
        }
    });
}

/// `path` was cut to `len` bytes.
pub(crate) fn truncated(path: &Path, len: u64) {
    with(|d| {
        if let Some(f) = d.files.get_mut(path) {
            f.len = len;
            f.durable = f.durable.min(len);
        }
    });
}

/// An fsync of `path` succeeded. `true` when a simulated disk took it (the
/// real fsync is then skipped: durability is the simulation's).
pub(crate) fn synced(path: &Path) -> bool {
    with(|d| {
        if let Some(f) = d.files.get_mut(path) {
            f.durable = f.len;
        }
    })
    .is_some()
}

/// `from` was renamed over `to`.
pub(crate) fn renamed(from: &Path, to: &Path) {
    with(|d| {
        // A repair rewrites a segment clean under a temporary name.
        d.flips.retain(|f| f.path != to);
        if let Some(f) = d.files.remove(from) {
            d.files.insert(to.to_path_buf(), f);
        }
    });
}

/// `path` was deleted.
pub(crate) fn removed(path: &Path) {
    with(|d| {
        d.flips.retain(|f| f.path != path);
        d.files.remove(path)
    });
}

/// What the simulated filesystem reports as (free, total) bytes, or `None`
/// without a simulated disk.
pub(crate) fn space() -> Option<(u64, u64)> {
    with(|_| (REPORTED_BYTES, REPORTED_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flip(path: &str, from: u64, to: u64) -> Flip {
        Flip {
            path: PathBuf::from(path),
            record: (from, to),
            queued: None,
            origin: None,
        }
    }

    #[test]
    fn a_skipped_span_must_be_flipped_records_back_to_back() {
        let a = Path::new("a.log");
        // Seed 708043: two neighbouring records, listed in either order.
        let flips = [flip("a.log", 6985, 7050), flip("a.log", 6920, 6985)];
        assert!(is_flipped_run(&flips, a, 6920, 6985));
        assert!(is_flipped_run(&flips, a, 6920, 7050));
        assert!(!is_flipped_run(&flips, a, 6920, 7051), "one byte past");
        assert!(!is_flipped_run(&flips, a, 6921, 7050), "starts inside");
        assert!(!is_flipped_run(&flips, a, 6920, 6920), "empty");
        assert!(!is_flipped_run(&flips, Path::new("b.log"), 6920, 6985));
        // A gap (a sound record between two flips) is not one run.
        let gap = [flip("a.log", 0, 10), flip("a.log", 20, 30)];
        assert!(!is_flipped_run(&gap, a, 0, 30));
        // The same record flipped twice.
        let twice = [flip("a.log", 0, 10), flip("a.log", 0, 10)];
        assert!(is_flipped_run(&twice, a, 0, 10));
    }
}
