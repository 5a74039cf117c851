//! The group log: the groups a shard homes (members, admins, order) and
//! the group messages it ordered but has not yet seen stored by every
//! member's shard, durable, one append-only file per shard next to its
//! message log (docs/PROTOCOL.md, "The group log").
//!
//! ```text
//! <data_dir>/shard-<N>/groups.rec      records, appended
//! <data_dir>/shard-<N>/groups.rec.new  a rewrite in progress (renamed over it)
//! ```
//!
//! A record is framed like the presence log's: `len` u32 LE (bytes from
//! `kind` on), `crc32c` u32 LE of those bytes, then (integers u64 LE):
//!
//! ```text
//! Created   (16), len 17: group, creator
//! Added     (17), len 17: group, user
//! Removed   (18), len 17: group, user
//! Admin     (19), len 18: group, user, admin u8 (0 or 1)
//! Message   (20), len 50 + body: group, msg, from, time_ms, client_id,
//!                 event u8 (0: a message), subject, body
//! FannedOut (21), len 17: group, msg
//! Order     (22), len 17: group, last_msg
//! Sent      (23), len 45: group, msg, from, time_ms, client_id, device u32
//! ```
//!
//! Replay applies the records in order, so the members when a `Message`
//! was ordered are the members replayed up to it. A bad record (torn by a
//! crash during an append) ends the replay there; nothing after it was
//! answered, since every answer waits for its append. The file is
//! rewritten whole (from the state) once it is more than twice what the
//! state needs and no message is waiting for its fan-out.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files;
use crate::proto::GroupEvent;

/// File name of the group log inside a shard's directory.
pub const FILE_NAME: &str = "groups.rec";
/// A rewrite in progress; left by a crash before its rename, it is ignored.
const NEW_NAME: &str = "groups.rec.new";
/// The file is never rewritten below this size.
pub const REWRITE_BYTES_MIN: u64 = 64 * 1024;

const HEADER_BYTES: usize = 8;
const KIND_CREATED: u8 = 16;
const KIND_ADDED: u8 = 17;
const KIND_REMOVED: u8 = 18;
const KIND_ADMIN: u8 = 19;
const KIND_MESSAGE: u8 = 20;
const KIND_FANNED_OUT: u8 = 21;
const KIND_ORDER: u8 = 22;
const KIND_SENT: u8 = 23;
const PAIR_LEN: usize = 1 + 16;
const ADMIN_LEN: usize = PAIR_LEN + 1;
const MESSAGE_FIXED_LEN: usize = 1 + 5 * 8 + 1 + 8;
const SENT_LEN: usize = 1 + 5 * 8 + 4;
/// Largest body a `Message` holds (as the message log's).
const BODY_BYTES_MAX: usize = super::record::BODY_BYTES_MAX;

/// One group log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Kind 16: `creator` created `group` (its first admin).
    Created {
        /// The group.
        group: u64,
        /// Its creator.
        creator: u64,
    },
    /// Kind 17: `user` became a member.
    Added {
        /// The group.
        group: u64,
        /// The member.
        user: u64,
    },
    /// Kind 18: `user` was removed, or left.
    Removed {
        /// The group.
        group: u64,
        /// The former member.
        user: u64,
    },
    /// Kind 19: `user` became an admin, or stopped being one.
    Admin {
        /// The group.
        group: u64,
        /// The member.
        user: u64,
        /// Admin now.
        admin: bool,
    },
    /// Kind 20: the group ordered message (or event) `msg`; it goes to the
    /// members of that moment.
    Message {
        /// The group.
        group: u64,
        /// Its number in the group's order.
        msg: u64,
        /// The sender (an event's actor).
        from: u64,
        /// When, ms since the Unix epoch.
        time_ms: u64,
        /// The sender's client_id (0 for an event).
        client_id: u64,
        /// `None`: a message; else a membership event.
        event: Option<GroupEvent>,
        /// An event's subject (0 for a message).
        subject: u64,
        /// A message's body (empty for an event).
        body: Arc<[u8]>,
    },
    /// Kind 21: every shard homing a recipient of `msg` holds it durably.
    FannedOut {
        /// The group.
        group: u64,
        /// The message.
        msg: u64,
    },
    /// Kind 22 (written by a rewrite): `group`'s order had reached
    /// `last_msg`; for a group that no longer exists, only that its id was
    /// given.
    Order {
        /// The group.
        group: u64,
        /// The last number of its order given.
        last_msg: u64,
    },
    /// Kind 23: GROUP_SEND `client_id` of `from`'s `device` was taken as
    /// message `msg` of `group` at `time_ms`: an entry of the sender
    /// device's dedupe window (written right after the message's
    /// `Message`, and for each window entry by a rewrite).
    Sent {
        /// The group.
        group: u64,
        /// The message's number in the group's order.
        msg: u64,
        /// The sender.
        from: u64,
        /// When it was taken (the ACK's time), ms since the Unix epoch.
        time_ms: u64,
        /// The sender's client_id.
        client_id: u64,
        /// The sender's device.
        device: u32,
    },
}

impl Record {
    /// The group the record is about.
    pub fn group(&self) -> u64 {
        match *self {
            Record::Created { group, .. }
            | Record::Added { group, .. }
            | Record::Removed { group, .. }
            | Record::Admin { group, .. }
            | Record::Message { group, .. }
            | Record::FannedOut { group, .. }
            | Record::Order { group, .. }
            | Record::Sent { group, .. } => group,
        }
    }

    /// Encoded size, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + match self {
                Record::Admin { .. } => ADMIN_LEN,
                Record::Message { body, .. } => MESSAGE_FIXED_LEN + body.len(),
                Record::Sent { .. } => SENT_LEN,
                _ => PAIR_LEN,
            }
    }

    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&((self.encoded_len() - HEADER_BYTES) as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let mut put = |kind: u8, vs: &[u64]| {
            out.push(kind);
            vs.iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        };
        match self {
            Record::Created { group, creator } => put(KIND_CREATED, &[*group, *creator]),
            Record::Added { group, user } => put(KIND_ADDED, &[*group, *user]),
            Record::Removed { group, user } => put(KIND_REMOVED, &[*group, *user]),
            Record::Admin { group, user, admin } => {
                put(KIND_ADMIN, &[*group, *user]);
                out.push(u8::from(*admin));
            }
            Record::Message {
                group,
                msg,
                from,
                time_ms,
                client_id,
                event,
                subject,
                body,
            } => {
                put(KIND_MESSAGE, &[*group, *msg, *from, *time_ms, *client_id]);
                out.push(event.map_or(0, |e| e as u8));
                out.extend_from_slice(&subject.to_le_bytes());
                out.extend_from_slice(body);
            }
            Record::FannedOut { group, msg } => put(KIND_FANNED_OUT, &[*group, *msg]),
            Record::Order { group, last_msg } => put(KIND_ORDER, &[*group, *last_msg]),
            Record::Sent {
                group,
                msg,
                from,
                time_ms,
                client_id,
                device,
            } => {
                put(KIND_SENT, &[*group, *msg, *from, *time_ms, *client_id]);
                out.extend_from_slice(&device.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(
            decode(&out[start..]).as_ref(),
            Some(&(self.clone(), self.encoded_len()))
        );
    }
}

/// Decodes the record at the start of `buf`: `None` if the bytes there are
/// not a whole valid record. Never panics.
pub fn decode(buf: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    if !(PAIR_LEN..=MESSAGE_FIXED_LEN + BODY_BYTES_MAX).contains(&len) {
        return None;
    }
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let payload = buf.get(HEADER_BYTES..HEADER_BYTES + len)?;
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(payload[1 + 8 * i..9 + 8 * i].try_into().expect("8"));
    let record = match (payload[0], len) {
        (KIND_CREATED, PAIR_LEN) => Record::Created {
            group: u(0),
            creator: u(1),
        },
        (KIND_ADDED, PAIR_LEN) => Record::Added {
            group: u(0),
            user: u(1),
        },
        (KIND_REMOVED, PAIR_LEN) => Record::Removed {
            group: u(0),
            user: u(1),
        },
        (KIND_ADMIN, ADMIN_LEN) if payload[17] <= 1 => Record::Admin {
            group: u(0),
            user: u(1),
            admin: payload[17] == 1,
        },
        (KIND_MESSAGE, MESSAGE_FIXED_LEN..) => {
            let event = match payload[41] {
                0 => None,
                e => Some(GroupEvent::from_u64(u64::from(e))?),
            };
            Record::Message {
                group: u(0),
                msg: u(1),
                from: u(2),
                time_ms: u(3),
                client_id: u(4),
                event,
                subject: u64::from_le_bytes(payload[42..50].try_into().expect("8")),
                body: payload[MESSAGE_FIXED_LEN..].into(),
            }
        }
        (KIND_FANNED_OUT, PAIR_LEN) => Record::FannedOut {
            group: u(0),
            msg: u(1),
        },
        (KIND_ORDER, PAIR_LEN) => Record::Order {
            group: u(0),
            last_msg: u(1),
        },
        (KIND_SENT, SENT_LEN) => Record::Sent {
            group: u(0),
            msg: u(1),
            from: u(2),
            time_ms: u(3),
            client_id: u(4),
            device: u32::from_le_bytes(payload[41..45].try_into().expect("4")),
        },
        _ => return None,
    };
    Some((record, HEADER_BYTES + len))
}

/// Reads the group log of shard directory `dir` without changing it: its
/// valid records in order, their bytes, and whether the file was valid to
/// its end (a missing file is an empty, whole one).
pub fn read(dir: &Path) -> io::Result<(Vec<Record>, u64, bool)> {
    let path = dir.join(FILE_NAME);
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
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
        records.push(record);
        at += len;
    }
    Ok((records, at as u64, at == data.len()))
}

/// One shard's group log, open for appending.
pub struct GroupLog {
    dir: PathBuf,
    path: PathBuf,
    /// `None` after a failed write: nothing more is appended (the shard
    /// restarts and replays).
    file: Option<File>,
    /// Bytes in the file.
    bytes: u64,
    fsync: bool,
    buf: Vec<u8>,
}

impl GroupLog {
    /// Gives back what a large append or a rewrite grew the encoding
    /// buffer to, keeping at most `keep_bytes`.
    pub fn trim(&mut self, keep_bytes: usize) {
        crate::memory::trim_vec(&mut self.buf, keep_bytes);
    }

    /// Opens (creating if needed) the group log in shard directory `dir`
    /// and reads it; `fsync`: make each append durable against a power
    /// loss, not only a process crash. A file cut short (a torn append) is
    /// rewritten from its valid records.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<(GroupLog, Vec<Record>)> {
        files::create_dir(dir)?;
        let (records, valid, whole) = read(dir)?;
        let mut log = GroupLog {
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
            log.rewrite(&records)?;
        }
        Ok((log, records))
    }

    /// Appends `records`, and (`sync`, with fsync durability) makes them
    /// durable. After an error the log takes nothing more: what was staged
    /// may or may not be on disk, so the caller restarts from a replay.
    pub fn append(&mut self, records: &[Record], sync: bool) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Err(io::Error::other("the group log failed before"));
        };
        self.buf.clear();
        for r in records {
            r.encode(&mut self.buf);
        }
        let written = files::write(file, &self.path, &self.buf).and_then(|()| {
            if self.fsync && sync {
                files::sync(file, &self.path, true)
            } else {
                Ok(())
            }
        });
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

    /// Whether the file holds more than twice `live_bytes` (what it held
    /// after its last rewrite) and at least [`REWRITE_BYTES_MIN`].
    pub fn wants_rewrite(&self, live_bytes: u64) -> bool {
        self.bytes > (2 * live_bytes).max(REWRITE_BYTES_MIN)
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `records` whole to the new file, then renames it over the log.
    pub fn rewrite(&mut self, records: &[Record]) -> io::Result<()> {
        self.file = None;
        self.buf.clear();
        for r in records {
            r.encode(&mut self.buf);
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

/// Writes `records` as the whole group log of shard directory `dir` (a
/// reshard moving groups to their new home shards).
pub fn create(dir: &Path, records: &[Record]) -> io::Result<()> {
    let (mut log, _) = GroupLog::open(dir, true)?;
    log.rewrite(records)
}

/// The group logs of other shard directories, re-homed for `shards`
/// shards: per new shard, the records that rebuild each group homed there
/// (members, admins, order) and then the messages still waiting for their
/// fan-out (sent again, to the members of now, after the start), and a
/// mark of the highest group id ever given, so none is given twice.
pub fn rehome(old: &[Vec<Record>], shards: usize) -> Vec<Vec<Record>> {
    use crate::group::Groups;
    let mut out = vec![Vec::new(); shards];
    let mut id_max = 0;
    for records in old {
        // Limits do not apply to what was accepted before.
        let mut state = Groups::new(0, 1, usize::MAX, usize::MAX);
        let mut waiting: Vec<Record> = Vec::new();
        for r in records {
            state.apply(r);
            id_max = id_max.max(r.group());
            match *r {
                Record::Message { .. } => waiting.push(r.clone()),
                Record::FannedOut { group, msg } => waiting.retain(|w| {
                    !matches!(*w, Record::Message { group: g, msg: m, .. } if (g, m) == (group, msg))
                }),
                _ => {}
            }
        }
        let mut snap = Vec::new();
        state.snapshot(&mut snap);
        for r in snap.into_iter().chain(waiting) {
            let home = crate::shard::home_shard(r.group(), shards);
            out[home].push(r);
        }
    }
    for records in &mut out {
        records.push(Record::Order {
            group: id_max,
            last_msg: 0,
        });
    }
    out
}

/// Bytes `records` take encoded.
pub fn records_bytes(records: &[Record]) -> u64 {
    records.iter().map(|r| r.encoded_len() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::Created {
                group: 3,
                creator: 17,
            },
            Record::Added { group: 3, user: 42 },
            Record::Admin {
                group: 3,
                user: 42,
                admin: true,
            },
            Record::Message {
                group: 3,
                msg: 4,
                from: 42,
                time_ms: 1_767_225_600_123,
                client_id: 7,
                event: None,
                subject: 0,
                body: Arc::from(&b"hello"[..]),
            },
            Record::Message {
                group: 3,
                msg: 5,
                from: 17,
                time_ms: 1,
                client_id: 0,
                event: Some(GroupEvent::Removed),
                subject: 42,
                body: Arc::from(&b""[..]),
            },
            Record::Removed { group: 3, user: 42 },
            Record::FannedOut { group: 3, msg: 4 },
            Record::Order {
                group: 3,
                last_msg: 5,
            },
            Record::Sent {
                group: 3,
                msg: 4,
                from: 42,
                time_ms: 1_767_225_600_123,
                client_id: 7,
                device: 0x0102_0304,
            },
        ]
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        for r in samples() {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            assert_eq!(buf.len(), r.encoded_len());
            assert_eq!(decode(&buf), Some((r.clone(), buf.len())));
            for cut in 0..buf.len() {
                assert_eq!(decode(&buf[..cut]), None);
            }
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x40;
                assert_eq!(decode(&bad), None, "{r:?} byte {i}");
            }
        }
        // Kinds of the message log and the presence log are not ours.
        for kind in [1u8, 8, 24] {
            let mut buf = Vec::new();
            Record::Added { group: 1, user: 2 }.encode(&mut buf);
            buf[8] = kind;
            let crc = crc32c::crc32c(&buf[8..]);
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(decode(&buf), None, "kind {kind}");
        }
    }

    #[test]
    fn appends_replay_in_order_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, records) = GroupLog::open(dir.path(), true).unwrap();
        assert!(records.is_empty());
        let all = samples();
        log.append(&all[..3], true).unwrap();
        log.append(&all[3..], false).unwrap();
        assert_eq!(log.bytes(), records_bytes(&all));
        drop(log);
        let path = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&path).unwrap();
        let mut extra = Vec::new();
        Record::Added { group: 3, user: 99 }.encode(&mut extra);
        data.extend_from_slice(&extra[..extra.len() - 1]);
        std::fs::write(&path, &data).unwrap();

        let (log, again) = GroupLog::open(dir.path(), false).unwrap();
        assert_eq!(again, all);
        // Rewritten from the valid records: the torn half is gone.
        assert_eq!(log.bytes(), std::fs::metadata(&path).unwrap().len());
        assert_eq!(log.bytes(), records_bytes(&all));
    }

    #[test]
    fn rehome_moves_each_group_to_its_new_home_with_what_waits() {
        use crate::group::Groups;
        use crate::shard::home_shard;
        // Two old shards, each homing groups with members; one message of
        // group `a` still waits for its fan-out.
        let mut old = vec![Vec::new(), Vec::new()];
        let mut made = Vec::new();
        for (k, records) in old.iter_mut().enumerate() {
            let mut g = Groups::new(k, 2, 16, 16);
            for creator in [10, 20, 30] {
                let id = g.create(creator, records).unwrap().group;
                g.add(id, creator, creator + 1, records).unwrap();
                made.push((id, creator));
            }
        }
        let (a, a_creator) = made[0];
        old[0].push(Record::Message {
            group: a,
            msg: 9,
            from: a_creator,
            time_ms: 1,
            client_id: 1,
            event: None,
            subject: 0,
            body: Arc::from(&b"waiting"[..]),
        });
        let new = rehome(&old, 3);
        let id_max = made.iter().map(|&(id, _)| id).max().unwrap();
        for (j, records) in new.iter().enumerate() {
            let mut g = Groups::new(j, 3, 16, 16);
            records.iter().for_each(|r| g.apply(r));
            for &(id, creator) in &made {
                let here = g.get(id);
                assert_eq!(here.is_some(), home_shard(id, 3) == j, "group {id}");
                if let Some(grp) = here {
                    let members: Vec<_> = grp.members().collect();
                    assert_eq!(members, [(creator, true), (creator + 1, false)]);
                }
            }
            // No id is given twice.
            assert!(g.create(99, &mut Vec::new()).unwrap().group > id_max);
            let waits = records
                .iter()
                .any(|r| matches!(r, Record::Message { group, .. } if *group == a));
            assert_eq!(waits, home_shard(a, 3) == j);
        }
    }

    #[test]
    fn a_rewrite_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = GroupLog::open(dir.path(), false).unwrap();
        log.append(&samples(), true).unwrap();
        assert!(!log.wants_rewrite(0), "below REWRITE_BYTES_MIN");
        let kept = [Record::Created {
            group: 3,
            creator: 17,
        }];
        log.rewrite(&kept).unwrap();
        log.append(&[Record::Added { group: 3, user: 5 }], true)
            .unwrap();
        drop(log);
        let (_, again) = GroupLog::open(dir.path(), false).unwrap();
        assert_eq!(
            again,
            [kept[0].clone(), Record::Added { group: 3, user: 5 }]
        );
        assert!(!dir.path().join(NEW_NAME).exists());
    }
}
