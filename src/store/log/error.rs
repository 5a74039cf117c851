//! [`StoreError`]: why a [`LogStore`](super::LogStore) could not open or
//! write (see "Errors" and "Disk full" in the module docs).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::store::fault;

/// Why a [`LogStore`](super::LogStore) could not open (or, inside `commit`,
/// write).
#[derive(Debug)]
pub enum StoreError {
    /// A file operation failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What we were doing, e.g. "read segment".
        op: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// A record in the middle of the log is damaged; recovery stopped.
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the damaged record in it.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The `meta` file is missing, unreadable or of another format version.
    Meta {
        /// The `meta` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An option is out of range.
    Options {
        /// The option's name.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { path, op, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            StoreError::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "corrupt record in {} at byte offset {offset} ({reason}); it is not the torn \
                 tail of the last write, so acknowledged messages may be damaged. Start with \
                 --repair to skip the bad bytes and keep the rest (messages in them are lost)",
                file.display()
            ),
            StoreError::Meta { path, reason } => {
                write!(f, "message log meta file {}: {reason}", path.display())
            }
            StoreError::Options { field, reason } => write!(f, "store option {field}: {reason}"),
        }
    }
}

impl StoreError {
    /// Whether this is the filesystem being full (ENOSPC, EDQUOT): refused
    /// work, not a failed store.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if fault::is_no_space(source))
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        let kind = match &e {
            StoreError::Io { source, .. } => source.kind(),
            StoreError::Corrupt { .. } | StoreError::Meta { .. } => io::ErrorKind::InvalidData,
            StoreError::Options { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e.to_string())
    }
}

pub(super) fn io_at(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}
