//! The store's file layer: every file operation of the log goes through one
//! of these functions, which create files private (0600, directories 0700)
//! and pass each call through its failpoint ([`fault::hit`]).
//!
//! On a thread running the deterministic simulator, each call also tells
//! the simulated disk ([`crate::sim::disk`]) what happened, and passes its
//! faults; it keeps which bytes an fsync made durable (a simulated crash
//! loses the rest) and takes the place of the real fsyncs. Elsewhere that
//! is one thread-local read per call.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::fault::{self, Op};
use crate::sim::disk;

/// The failpoint's fault, then the simulated disk's.
fn hit(path: &Path, op: Op) -> io::Result<()> {
    fault::hit(path, op)?;
    disk::hit(path, op)
}

/// Mode of every file the store creates: the owner's only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents, mode 0700.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    hit(dir, Op::Create)?;
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Creates (or truncates) `path` for writing.
pub fn create(path: &Path) -> io::Result<File> {
    hit(path, Op::Create)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    disk::created(path);
    Ok(file)
}

/// Creates `path`, which must not exist, for appending.
pub fn create_new_append(path: &Path) -> io::Result<File> {
    hit(path, Op::Create)?;
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    disk::created(path);
    Ok(file)
}

/// Opens the existing `path` for appending.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().append(true).open(path)?;
    disk::opened(path, file.metadata()?.len());
    Ok(file)
}

/// Writes all of `buf` to `file` (named `path`).
pub fn write(mut file: &File, path: &Path, buf: &[u8]) -> io::Result<()> {
    if let Err(e) = hit(path, Op::Write) {
        if fault::is_no_space(&e) {
            // A disk that fills mid-write leaves part of the buffer behind.
            file.write_all(&buf[..buf.len() / 2])?;
            disk::wrote(path, buf.len() / 2);
        }
        return Err(e);
    }
    file.write_all(buf)?;
    disk::wrote(path, buf.len());
    Ok(())
}

/// `fdatasync` (`data_only`) or `fsync` of `file` (named `path`).
pub fn sync(file: &File, path: &Path, data_only: bool) -> io::Result<()> {
    hit(path, Op::Sync)?;
    if disk::synced(path) {
        return Ok(());
    }
    if data_only {
        file.sync_data()
    } else {
        file.sync_all()
    }
}

/// `fsync` of the directory `dir`, making its entries durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    hit(dir, Op::Sync)?;
    if disk::synced(dir) {
        return Ok(());
    }
    File::open(dir)?.sync_all()
}

/// Cuts `file` (named `path`) to `len` bytes.
pub fn truncate(file: &File, path: &Path, len: u64) -> io::Result<()> {
    hit(path, Op::Truncate)?;
    file.set_len(len)?;
    disk::truncated(path, len);
    Ok(())
}

/// Renames `from` over `to`.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    hit(to, Op::Rename)?;
    fs::rename(from, to)?;
    disk::renamed(from, to);
    Ok(())
}

/// Deletes `path`.
pub fn remove(path: &Path) -> io::Result<()> {
    hit(path, Op::Remove)?;
    fs::remove_file(path)?;
    disk::removed(path);
    Ok(())
}

/// Free bytes (for an unprivileged user) and total bytes of the filesystem
/// holding `path`, or `None` when `statvfs` fails.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    if let Some(space) = disk::space() {
        return Some(space);
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a writable
    // statvfs that the call fills; both outlive the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}
