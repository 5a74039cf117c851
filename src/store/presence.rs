//! The presence log: each user's last seen and privacy setting, durable,
//! one small append-only file per shard next to its message log.
//!
//! ```text
//! <data_dir>/shard-<N>/presence.rec      records, appended
//! <data_dir>/shard-<N>/presence.rec.new  a rewrite in progress (renamed over it)
//! ```
//!
//! A record is framed like a message log record (`record.rs`): `len` u32
//! LE (bytes from `kind` on), `crc32c` u32 LE of those bytes, then:
//!
//! ```text
//! LastSeen (kind 8), len = 17:   user u64 LE, last_seen_ms u64 LE
//! Privacy  (kind 9), len = 10:   user u64 LE, hidden u8 (0 or 1)
//! ```
//!
//! Kinds 8 and 9 are the presence share of the store's record kinds; they
//! never appear in a message segment, nor message kinds here.
//!
//! Replay applies the records in order: the last of each kind per user
//! wins. A bad record (torn by a crash during an append, or damaged) ends
//! the replay there; what followed it is lost and the next flush rewrites
//! the file whole. Last seen is a hint, written at most once per
//! `last_seen_write_s`, so losing the tail costs at most that much of it.
//!
//! The file grows by one record per change; once it holds more than twice
//! what the current state needs (and at least [`REWRITE_BYTES_MIN`]), a
//! flush rewrites it: the whole state to `presence.rec.new`, fsync,
//! rename over `presence.rec`, fsync of the directory.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::files;

/// File name of the presence log inside a shard's directory.
pub const FILE_NAME: &str = "presence.rec";
/// A rewrite in progress; left by a crash before its rename, it is ignored
/// (and replaced by the next rewrite).
const NEW_NAME: &str = "presence.rec.new";
/// The file is never rewritten below this size.
pub const REWRITE_BYTES_MIN: u64 = 64 * 1024;

const HEADER_BYTES: usize = 8;
const KIND_LAST_SEEN: u8 = 8;
const KIND_PRIVACY: u8 = 9;
const LAST_SEEN_LEN: usize = 1 + 8 + 8;
const PRIVACY_LEN: usize = 1 + 8 + 1;

/// One user's durable presence state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// When the user was last online, ms since the Unix epoch; 0 = never
    /// seen offline by this server.
    pub last_seen_ms: u64,
    /// The user hides its presence and last seen (PRIVACY).
    pub hidden: bool,
}

/// One presence record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Kind 8: `user` was last online at `last_seen_ms`.
    LastSeen {
        /// The user.
        user: u64,
        /// Ms since the Unix epoch.
        last_seen_ms: u64,
    },
    /// Kind 9: `user` hides (or shows) its presence.
    Privacy {
        /// The user.
        user: u64,
        /// Hidden from subscribers.
        hidden: bool,
    },
}

impl Record {
    /// Encoded size, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + match self {
                Record::LastSeen { .. } => LAST_SEEN_LEN,
                Record::Privacy { .. } => PRIVACY_LEN,
            }
    }

    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&((self.encoded_len() - HEADER_BYTES) as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        match *self {
            Record::LastSeen { user, last_seen_ms } => {
                out.push(KIND_LAST_SEEN);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&last_seen_ms.to_le_bytes());
            }
            Record::Privacy { user, hidden } => {
                out.push(KIND_PRIVACY);
                out.extend_from_slice(&user.to_le_bytes());
                out.push(u8::from(hidden));
            }
        }
        let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(decode(&out[start..]), Some((*self, self.encoded_len())));
    }

    /// The record's user.
    fn user(&self) -> u64 {
        match *self {
            Record::LastSeen { user, .. } | Record::Privacy { user, .. } => user,
        }
    }
}

/// Decodes the record at the start of `buf`: `None` if the bytes there are
/// not a whole valid record. Never panics.
pub fn decode(buf: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    if len != LAST_SEEN_LEN && len != PRIVACY_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let payload = buf.get(HEADER_BYTES..HEADER_BYTES + len)?;
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
    let record = match (payload[0], len) {
        (KIND_LAST_SEEN, LAST_SEEN_LEN) => Record::LastSeen {
            user: u64_at(1),
            last_seen_ms: u64_at(9),
        },
        (KIND_PRIVACY, PRIVACY_LEN) if payload[9] <= 1 => Record::Privacy {
            user: u64_at(1),
            hidden: payload[9] == 1,
        },
        _ => return None,
    };
    Some((record, HEADER_BYTES + len))
}

/// Applies `record` to `state`.
pub fn apply(state: &mut HashMap<u64, Seen>, record: Record) {
    let seen = state.entry(record.user()).or_default();
    match record {
        Record::LastSeen { last_seen_ms, .. } => seen.last_seen_ms = last_seen_ms,
        Record::Privacy { hidden, .. } => seen.hidden = hidden,
    }
    if *seen == Seen::default() {
        state.remove(&record.user());
    }
}

/// Replays the presence log of shard directory `dir` without changing it:
/// the state, the bytes of valid records, and whether the file was valid
/// to its end (a missing file is an empty, whole one).
pub fn read(dir: &Path) -> io::Result<(HashMap<u64, Seen>, u64, bool)> {
    let path = dir.join(FILE_NAME);
    let mut state = HashMap::new();
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut at = 0;
    while at < data.len() {
        let Some((record, len)) = decode(&data[at..]) else {
            log::warn!(
                "{}: bad record at offset {at} of {}: the rest is dropped",
                path.display(),
                data.len()
            );
            break;
        };
        apply(&mut state, record);
        at += len;
    }
    Ok((state, at as u64, at == data.len()))
}

/// Bytes the records of `state` take when written whole.
fn state_bytes(state: &HashMap<u64, Seen>) -> u64 {
    state
        .values()
        .map(|s| {
            let mut b = 0;
            if s.last_seen_ms != 0 {
                b += HEADER_BYTES + LAST_SEEN_LEN;
            }
            if s.hidden {
                b += HEADER_BYTES + PRIVACY_LEN;
            }
            b as u64
        })
        .sum()
}

/// One shard's presence log, open for appending.
pub struct PresenceLog {
    dir: PathBuf,
    path: PathBuf,
    /// `None` after a failed write: the next flush rewrites the file whole.
    file: Option<File>,
    /// Bytes in the file.
    bytes: u64,
    fsync: bool,
    buf: Vec<u8>,
}

impl PresenceLog {
    /// Opens (creating if needed) the presence log in shard directory
    /// `dir` and replays it; `fsync`: make each flush durable against a
    /// power loss, not only a process crash.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<(PresenceLog, HashMap<u64, Seen>)> {
        files::create_dir(dir)?;
        let (state, valid, whole) = read(dir)?;
        let mut log = PresenceLog {
            dir: dir.to_path_buf(),
            path: dir.join(FILE_NAME),
            file: None,
            bytes: valid,
            fsync,
            buf: Vec::new(),
        };
        if whole && valid > 0 {
            log.file = Some(files::open_append(&log.path)?);
        } else {
            // New, or cut short: start over from the state replayed.
            log.rewrite(&state)?;
        }
        Ok((log, state))
    }

    /// Writes `state` as the whole presence log of shard directory `dir`
    /// (a reshard, or a start with another shard count, moving users to
    /// their new home shards).
    pub fn create(dir: &Path, state: &HashMap<u64, Seen>) -> io::Result<()> {
        files::create_dir(dir)?;
        let mut log = PresenceLog {
            dir: dir.to_path_buf(),
            path: dir.join(FILE_NAME),
            file: None,
            bytes: 0,
            fsync: true,
            buf: Vec::new(),
        };
        log.rewrite(state)
    }

    /// Makes `records` durable (appended, or the file rewritten from
    /// `state`, which already holds them, when it has grown past twice
    /// what `state` needs or a write failed before).
    pub fn flush(&mut self, records: &[Record], state: &HashMap<u64, Seen>) -> io::Result<()> {
        let live = state_bytes(state);
        if self.file.is_none() || self.bytes > (2 * live).max(REWRITE_BYTES_MIN) {
            return self.rewrite(state);
        }
        self.buf.clear();
        for r in records {
            r.encode(&mut self.buf);
        }
        let file = self.file.as_ref().expect("checked above");
        let written =
            files::write(file, &self.path, &self.buf).and_then(|()| self.sync(file, &self.path));
        match written {
            Ok(()) => {
                self.bytes += self.buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                Err(e)
            }
        }
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn sync(&self, file: &File, path: &Path) -> io::Result<()> {
        if self.fsync {
            files::sync(file, path, true)
        } else {
            Ok(())
        }
    }

    /// Writes `state` whole to the new file, then renames it over the log.
    fn rewrite(&mut self, state: &HashMap<u64, Seen>) -> io::Result<()> {
        self.file = None;
        self.buf.clear();
        for (&user, seen) in state {
            if seen.last_seen_ms != 0 {
                Record::LastSeen {
                    user,
                    last_seen_ms: seen.last_seen_ms,
                }
                .encode(&mut self.buf);
            }
            if seen.hidden {
                Record::Privacy { user, hidden: true }.encode(&mut self.buf);
            }
        }
        let new = self.dir.join(NEW_NAME);
        let file = files::create(&new)?;
        files::write(&file, &new, &self.buf)?;
        // Always synced before the rename: a rename that lands before the
        // data would leave an empty file in place of the old state.
        files::sync(&file, &new, true)?;
        drop(file);
        files::rename(&new, &self.path)?;
        files::sync_dir(&self.dir)?;
        self.bytes = self.buf.len() as u64;
        self.file = Some(files::open_append(&self.path)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_damage() {
        let records = [
            Record::LastSeen {
                user: 42,
                last_seen_ms: 1_767_225_600_000,
            },
            Record::Privacy {
                user: 42,
                hidden: true,
            },
        ];
        for r in records {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            assert_eq!(buf.len(), r.encoded_len());
            assert_eq!(decode(&buf), Some((r, buf.len())));
            // Every strict prefix and every flipped byte is refused.
            for cut in 0..buf.len() {
                assert_eq!(decode(&buf[..cut]), None);
            }
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x40;
                assert_eq!(decode(&bad), None, "byte {i}");
            }
        }
    }

    #[test]
    fn replay_keeps_the_last_state_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut state) = PresenceLog::open(dir.path(), false).unwrap();
        assert!(state.is_empty());
        let records = [
            Record::LastSeen {
                user: 1,
                last_seen_ms: 10,
            },
            Record::Privacy {
                user: 2,
                hidden: true,
            },
            Record::LastSeen {
                user: 1,
                last_seen_ms: 20,
            },
        ];
        for r in records {
            apply(&mut state, r);
        }
        log.flush(&records, &state).unwrap();
        drop(log);
        // A torn append: half a record at the end.
        let path = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&path).unwrap();
        let mut extra = Vec::new();
        Record::LastSeen {
            user: 3,
            last_seen_ms: 30,
        }
        .encode(&mut extra);
        data.extend_from_slice(&extra[..extra.len() / 2]);
        std::fs::write(&path, &data).unwrap();

        let (log, again) = PresenceLog::open(dir.path(), false).unwrap();
        assert_eq!(again, state);
        assert_eq!(again[&1].last_seen_ms, 20);
        assert!(again[&2].hidden);
        // Rewritten whole: the torn half is gone.
        assert_eq!(log.bytes(), std::fs::metadata(&path).unwrap().len());
        assert_eq!(log.bytes(), state_bytes(&state));
    }
}
