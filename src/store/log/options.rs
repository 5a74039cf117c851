//! How a [`LogStore`](super::LogStore) is configured: its [`Durability`]
//! and the [`LogOptions`] limits, with the checks of their relations.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{StoreError, SEGMENT_BYTES_MAX_DEFAULT, SEGMENT_BYTES_MAX_LIMIT};

/// What a `commit` waits for, and so what an acknowledged message survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Write, then `fdatasync`: an acknowledged message survives a crash of
    /// the process and of the machine (power loss, kernel panic). Costs one
    /// disk flush per loop iteration that stored anything, shared by every
    /// message of the iteration.
    #[default]
    Fsync,
    /// Write only: an acknowledged message survives a crash or `kill -9` of
    /// the process (the kernel has the data), but a power loss or kernel
    /// panic loses what the kernel had not yet written back, by default up to
    /// about 30 seconds of messages, and recovery then cuts the torn tail.
    Os,
    /// Nothing is written and the data directory is neither read nor
    /// written: like `MemStore`, every queued message is lost when the
    /// process stops. An old log left in the directory stays as it is and is
    /// replayed if a later start uses `fsync` or `os` again.
    Memory,
}

impl Durability {
    /// The config name: `"fsync"`, `"os"` or `"memory"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Os => "os",
            Durability::Memory => "memory",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "os" => Ok(Durability::Os),
            "memory" => Ok(Durability::Memory),
            _ => Err(format!(
                "unknown durability {s:?}: expected \"fsync\", \"os\" or \"memory\""
            )),
        }
    }
}

/// How a [`LogStore`](super::LogStore) behaves. [`LogOptions::validate`]
/// checks the relations.
#[derive(Clone, Debug, PartialEq)]
pub struct LogOptions {
    /// What `commit` waits for. Default [`Durability::Fsync`].
    pub durability: Durability,
    /// Messages one user's queue holds at most; at least 1. Default 1000.
    /// A queue recovered longer than this (the limit was lowered) keeps its
    /// messages and refuses pushes until it is shorter.
    pub queue_len_max: usize,
    /// Size at which the active segment is sealed and a new one started, in
    /// bytes. Default 64 MiB; 1 to [`SEGMENT_BYTES_MAX_LIMIT`].
    pub segment_bytes_max: u64,
    /// Bound on the bytes of all segment files; pushes are refused past it.
    /// Default 0 = unlimited; otherwise at least `2 * segment_bytes_max`
    /// (compaction copies a segment before deleting it).
    pub disk_bytes_max: u64,
    /// Free space to leave on the filesystem, in bytes: pushes that would
    /// take it lower are refused. 0 = auto
    /// ([`AUTO_FLOOR_PERCENT`](super::AUTO_FLOOR_PERCENT) of the filesystem,
    /// at most [`AUTO_FLOOR_BYTES_MAX`](super::AUTO_FLOOR_BYTES_MAX)).
    /// Default 0.
    pub disk_free_bytes_min: u64,
    /// Dead share of a sealed segment's bytes (0.0 to 1.0) past which it is
    /// compacted. Default 0.5: at most half of the log is garbage, and a
    /// compaction copies at most as many bytes as it frees. 1.0 = only
    /// delete fully dead segments.
    pub compact_dead_ratio: f64,
    /// Skip corrupt records found during recovery instead of failing (the
    /// `--repair` flag). Default false.
    pub repair: bool,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            durability: Durability::Fsync,
            queue_len_max: 1000,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            disk_bytes_max: 0,
            disk_free_bytes_min: 0,
            compact_dead_ratio: 0.5,
            repair: false,
        }
    }
}

impl LogOptions {
    /// Checks every option and the relations between them.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |field, reason: &str| {
            Err(StoreError::Options {
                field,
                reason: reason.to_string(),
            })
        };
        if self.queue_len_max == 0 {
            return bad("queue_len_max", "must be at least 1");
        }
        if !(1..=SEGMENT_BYTES_MAX_LIMIT).contains(&self.segment_bytes_max) {
            return bad(
                "segment_bytes_max",
                "must be between 1 and 1073741824 (recovery reads a segment into memory)",
            );
        }
        if self.disk_bytes_max != 0 && self.disk_bytes_max < 2 * self.segment_bytes_max {
            return bad(
                "disk_bytes_max",
                "must be 0 (unlimited) or at least 2 * segment_bytes_max, so compaction has room",
            );
        }
        if !(0.0..=1.0).contains(&self.compact_dead_ratio) {
            return bad("compact_dead_ratio", "must be between 0.0 and 1.0");
        }
        Ok(())
    }
}
