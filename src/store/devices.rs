//! The device log: each user's registered devices, which of them answered
//! DELIVERED for a message others still owe, and receipts waiting for
//! devices that are offline. Durable, one small append-only file per shard
//! next to its message log (issue 11; docs/ARCHITECTURE.md, "Devices").
//!
//! ```text
//! <data_dir>/shard-<N>/devices.rec      records, appended
//! <data_dir>/shard-<N>/devices.rec.new  a rewrite in progress (renamed over it)
//! ```
//!
//! A record is framed like a message log record (`record.rs`): `len` u32
//! LE (bytes from `kind` on), `crc32c` u32 LE of those bytes, then (all
//! integers little-endian):
//!
//! ```text
//! Registered  (kind 5),  len 22: user u64, device u32, lane u8, at_ms u64
//! Removed     (kind 6),  len 14: user u64, device u32, lane u8
//! Seen        (kind 7),  len 18: user u64, lane u8, at_ms u64
//! Delivered   (kind 10), len 18: user u64, server_id u64, lane u8
//! Receipt     (kind 11), len 30: user u64, kind u8, server_id u64, peer u64, lanes u32
//! ReceiptsGot (kind 12), len 10: user u64, lane u8
//! GroupKept   (kind 15), len 30 + 8 n: user u64, kind u8, group u64, msg u64, lanes u32,
//!                        n members u64 (1 <= n <= GROUP_KEPT_MEMBERS_MAX)
//! Outbox      (kind 24), len 42: seq u64, user u64, kind u8, group u64, id u64, peer u64
//! OutboxDone  (kind 25), len 9:  seq u64
//! ```
//!
//! Kinds 5–7, 10–12, 15, 24 and 25 are the device registry's share of the
//! store's record kinds; they never appear in a message segment, nor
//! message kinds here.
//!
//! `Outbox` and `OutboxDone` are the receipt outbox of the shard that took
//! a DELIVERED or READ (the recipient's home): a receipt on its way to its
//! user's home shard, kept until that shard says it has it (written to
//! every online device, or kept here in its own device log), and sent
//! again after a restart (docs/ARCHITECTURE.md, "Durable receipts").
//!
//! A device's *lane* (0..32) is its bit in the masks: a message's marks
//! (lanes that answered DELIVERED) and a receipt's lanes (devices that have
//! not got it). A lane is free again once its device is removed, and the
//! removal clears it everywhere, so a device registered later on the same
//! lane inherits nothing.
//!
//! The file is written by its shard's thread at the end of each loop
//! iteration that changed something, before that iteration's message batch
//! (so no message removal is ever on disk before the registration or the
//! marks that decided it), and fsynced with `durability = "fsync"`. Replay
//! applies the records in order. A bad record (torn by a crash during an
//! append, or damaged) ends the replay there and the file is rewritten
//! whole. Once the file holds more than twice what it held after its last
//! rewrite (and at least [`REWRITE_BYTES_MIN`]), it is rewritten from its
//! own replay, without the marks of messages no longer queued.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::files;

/// File name of the device log inside a shard's directory.
pub const FILE_NAME: &str = "devices.rec";
/// A rewrite in progress; left by a crash before its rename, it is ignored.
const NEW_NAME: &str = "devices.rec.new";
/// The file is never rewritten below this size. Every receipt passes
/// through the outbox (67 bytes), so a busy shard gets there every 1000 or
/// so receipts: a rewrite (a read of the file, a synced write of what is
/// live, small then) that often, against a smaller file on a small disk.
pub const REWRITE_BYTES_MIN: u64 = 64 * 1024;
/// Lanes per user: the width of the masks.
pub const LANES: usize = 32;

const HEADER_BYTES: usize = 8;
const KIND_REGISTERED: u8 = 5;
const KIND_REMOVED: u8 = 6;
const KIND_SEEN: u8 = 7;
const KIND_DELIVERED: u8 = 10;
const KIND_RECEIPT: u8 = 11;
const KIND_RECEIPTS_GOT: u8 = 12;
const KIND_GROUP_KEPT: u8 = 15;
const KIND_OUTBOX: u8 = 24;
const KIND_OUTBOX_DONE: u8 = 25;
const REGISTERED_LEN: usize = 1 + 8 + 4 + 1 + 8;
const REMOVED_LEN: usize = 1 + 8 + 4 + 1;
const SEEN_LEN: usize = 1 + 8 + 1 + 8;
const DELIVERED_LEN: usize = 1 + 8 + 8 + 1;
const RECEIPT_LEN: usize = 1 + 8 + 1 + 8 + 8 + 4;
const RECEIPTS_GOT_LEN: usize = 1 + 8 + 1;
/// A `GroupKept` record without its members.
const GROUP_KEPT_HEAD_LEN: usize = 1 + 8 + 1 + 8 + 8 + 4;
/// Most members one `GroupKept` record names (a longer list is kept as
/// several): keeps a record under 33 KiB.
pub const GROUP_KEPT_MEMBERS_MAX: usize = 4096;
const GROUP_KEPT_LEN_MAX: usize = GROUP_KEPT_HEAD_LEN + 8 * GROUP_KEPT_MEMBERS_MAX;
const OUTBOX_LEN: usize = 1 + 8 + 8 + 1 + 8 + 8 + 8;
const OUTBOX_DONE_LEN: usize = 1 + 8;

/// One registered device of a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dev {
    /// The device id its token names.
    pub device: u32,
    /// Its bit in the user's masks, below [`LANES`].
    pub lane: u8,
    /// When it was last online (logged in or left), ms since the Unix
    /// epoch: what `device_idle_days_max` is counted from.
    pub last_ms: u64,
}

/// A receipt waiting for some of its user's devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The receipt's kind as on the wire (1 delivered, 2 read).
    pub kind: u8,
    /// The message it is about.
    pub server_id: u64,
    /// The user that delivered or read it.
    pub peer: u64,
    /// The lanes of the devices that have not got it yet; never 0.
    pub lanes: u32,
}

/// A group receipt waiting for some of its user's devices: members
/// `members` got (or read) message `msg` of `group`, which the user sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptGroup {
    /// The receipt's kind as on the wire (1 delivered, 2 read).
    pub kind: u8,
    /// The lanes of the devices that have not got it yet; never 0.
    pub lanes: u32,
    /// The group.
    pub group: u64,
    /// The group's number of the message.
    pub msg: u64,
    /// The members it names, 1 to [`GROUP_KEPT_MEMBERS_MAX`].
    pub members: Box<[u64]>,
}

/// A receipt on its way from the shard that took the DELIVERED or READ to
/// its user's home shard (the outbox; see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Out {
    /// Who gets the receipt (the message's sender).
    pub user: u64,
    /// The receipt's kind as on the wire (1 delivered, 2 read).
    pub kind: u8,
    /// The group, for a group receipt; 0 for a 1:1 one (group ids start at 1).
    pub group: u64,
    /// The message: its server id (1:1), or its number in the group.
    pub id: u64,
    /// Who got or read it.
    pub peer: u64,
}

/// One device log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Kind 5: `device` of `user` is registered on `lane`.
    Registered {
        /// The user.
        user: u64,
        /// The device.
        device: u32,
        /// Its lane.
        lane: u8,
        /// When, ms since the Unix epoch (its last online time).
        at_ms: u64,
    },
    /// Kind 6: `device` of `user` is no longer registered (removed or
    /// expired); its lane is cleared from every mask of the user.
    Removed {
        /// The user.
        user: u64,
        /// The device.
        device: u32,
        /// Its lane.
        lane: u8,
    },
    /// Kind 7: the device on `lane` of `user` was online at `at_ms`.
    Seen {
        /// The user.
        user: u64,
        /// The device's lane.
        lane: u8,
        /// Ms since the Unix epoch.
        at_ms: u64,
    },
    /// Kind 10: the device on `lane` answered DELIVERED for `server_id`,
    /// which other devices of `user` still owe.
    Delivered {
        /// The recipient.
        user: u64,
        /// The message.
        server_id: u64,
        /// The device's lane.
        lane: u8,
    },
    /// Kind 11: a receipt for `user` waits for the devices on `kept.lanes`.
    Receipt {
        /// The receipt's recipient (the message's sender).
        user: u64,
        /// The receipt.
        kept: Kept,
    },
    /// Kind 12: the device on `lane` of `user` got every receipt (1:1 and
    /// group) that waited for it.
    ReceiptsGot {
        /// The user.
        user: u64,
        /// The device's lane.
        lane: u8,
    },
    /// Kind 15: a group receipt for `user` waits for the devices on
    /// `kept.lanes`.
    GroupKept {
        /// The receipt's recipient (the message's sender).
        user: u64,
        /// The receipt.
        kept: KeptGroup,
    },
    /// Kind 24: receipt number `seq` of this shard's outbox is on its way.
    Outbox {
        /// Its number, unique in this shard's log, never 0.
        seq: u64,
        /// The receipt.
        out: Out,
    },
    /// Kind 25: the receipt `seq` of the outbox arrived (its user's shard
    /// has it); also the highest number handed out, after a rewrite.
    OutboxDone {
        /// Its number.
        seq: u64,
    },
}

impl Record {
    fn payload_len(&self) -> usize {
        match self {
            Record::Registered { .. } => REGISTERED_LEN,
            Record::Removed { .. } => REMOVED_LEN,
            Record::Seen { .. } => SEEN_LEN,
            Record::Delivered { .. } => DELIVERED_LEN,
            Record::Receipt { .. } => RECEIPT_LEN,
            Record::ReceiptsGot { .. } => RECEIPTS_GOT_LEN,
            Record::GroupKept { kept, .. } => GROUP_KEPT_HEAD_LEN + 8 * kept.members.len(),
            Record::Outbox { .. } => OUTBOX_LEN,
            Record::OutboxDone { .. } => OUTBOX_DONE_LEN,
        }
    }

    /// Encoded size, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.payload_len()
    }

    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&(self.payload_len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        match self {
            Record::Registered {
                user,
                device,
                lane,
                at_ms,
            } => {
                out.push(KIND_REGISTERED);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&device.to_le_bytes());
                out.push(*lane);
                out.extend_from_slice(&at_ms.to_le_bytes());
            }
            Record::Removed { user, device, lane } => {
                out.push(KIND_REMOVED);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&device.to_le_bytes());
                out.push(*lane);
            }
            Record::Seen { user, lane, at_ms } => {
                out.push(KIND_SEEN);
                out.extend_from_slice(&user.to_le_bytes());
                out.push(*lane);
                out.extend_from_slice(&at_ms.to_le_bytes());
            }
            Record::Delivered {
                user,
                server_id,
                lane,
            } => {
                out.push(KIND_DELIVERED);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&server_id.to_le_bytes());
                out.push(*lane);
            }
            Record::Receipt { user, kept } => {
                out.push(KIND_RECEIPT);
                out.extend_from_slice(&user.to_le_bytes());
                out.push(kept.kind);
                out.extend_from_slice(&kept.server_id.to_le_bytes());
                out.extend_from_slice(&kept.peer.to_le_bytes());
                out.extend_from_slice(&kept.lanes.to_le_bytes());
            }
            Record::ReceiptsGot { user, lane } => {
                out.push(KIND_RECEIPTS_GOT);
                out.extend_from_slice(&user.to_le_bytes());
                out.push(*lane);
            }
            Record::GroupKept { user, kept } => {
                debug_assert!((1..=GROUP_KEPT_MEMBERS_MAX).contains(&kept.members.len()));
                out.push(KIND_GROUP_KEPT);
                out.extend_from_slice(&user.to_le_bytes());
                out.push(kept.kind);
                out.extend_from_slice(&kept.group.to_le_bytes());
                out.extend_from_slice(&kept.msg.to_le_bytes());
                out.extend_from_slice(&kept.lanes.to_le_bytes());
                for m in kept.members.iter() {
                    out.extend_from_slice(&m.to_le_bytes());
                }
            }
            Record::Outbox { seq, out: o } => {
                out.push(KIND_OUTBOX);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&o.user.to_le_bytes());
                out.push(o.kind);
                out.extend_from_slice(&o.group.to_le_bytes());
                out.extend_from_slice(&o.id.to_le_bytes());
                out.extend_from_slice(&o.peer.to_le_bytes());
            }
            Record::OutboxDone { seq } => {
                out.push(KIND_OUTBOX_DONE);
                out.extend_from_slice(&seq.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(
            decode(&out[start..]),
            Some((self.clone(), self.encoded_len()))
        );
    }
}

/// Decodes the record at the start of `buf`: `None` if the bytes there are
/// not a whole valid record. Never panics.
pub fn decode(buf: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    if len > GROUP_KEPT_LEN_MAX {
        return None;
    }
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let p = buf.get(HEADER_BYTES..HEADER_BYTES + len)?;
    if len == 0 || crc32c::crc32c(p) != crc {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"));
    let lane_ok = |lane: u8| (lane as usize) < LANES;
    let record = match (p[0], len) {
        (KIND_REGISTERED, REGISTERED_LEN) if lane_ok(p[13]) => Record::Registered {
            user: u64_at(1),
            device: u32_at(9),
            lane: p[13],
            at_ms: u64_at(14),
        },
        (KIND_REMOVED, REMOVED_LEN) if lane_ok(p[13]) => Record::Removed {
            user: u64_at(1),
            device: u32_at(9),
            lane: p[13],
        },
        (KIND_SEEN, SEEN_LEN) if lane_ok(p[9]) => Record::Seen {
            user: u64_at(1),
            lane: p[9],
            at_ms: u64_at(10),
        },
        (KIND_DELIVERED, DELIVERED_LEN) if lane_ok(p[17]) => Record::Delivered {
            user: u64_at(1),
            server_id: u64_at(9),
            lane: p[17],
        },
        (KIND_RECEIPT, RECEIPT_LEN) if matches!(p[9], 1 | 2) && u32_at(26) != 0 => {
            Record::Receipt {
                user: u64_at(1),
                kept: Kept {
                    kind: p[9],
                    server_id: u64_at(10),
                    peer: u64_at(18),
                    lanes: u32_at(26),
                },
            }
        }
        (KIND_RECEIPTS_GOT, RECEIPTS_GOT_LEN) if lane_ok(p[9]) => Record::ReceiptsGot {
            user: u64_at(1),
            lane: p[9],
        },
        (KIND_GROUP_KEPT, _)
            if len > GROUP_KEPT_HEAD_LEN
                && (len - GROUP_KEPT_HEAD_LEN) % 8 == 0
                && matches!(p[9], 1 | 2)
                && u32_at(26) != 0 =>
        {
            Record::GroupKept {
                user: u64_at(1),
                kept: KeptGroup {
                    kind: p[9],
                    group: u64_at(10),
                    msg: u64_at(18),
                    lanes: u32_at(26),
                    members: (GROUP_KEPT_HEAD_LEN..len).step_by(8).map(u64_at).collect(),
                },
            }
        }
        (KIND_OUTBOX, OUTBOX_LEN) if matches!(p[17], 1 | 2) && u64_at(1) != 0 => Record::Outbox {
            seq: u64_at(1),
            out: Out {
                user: u64_at(9),
                kind: p[17],
                group: u64_at(18),
                id: u64_at(26),
                peer: u64_at(34),
            },
        },
        (KIND_OUTBOX_DONE, OUTBOX_DONE_LEN) => Record::OutboxDone { seq: u64_at(1) },
        _ => return None,
    };
    Some((record, HEADER_BYTES + len))
}

/// The durable device state of one shard's users, as replayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Registered devices, per user with at least one.
    pub devices: HashMap<u64, Vec<Dev>>,
    /// Per user, per message: the lanes that answered DELIVERED (never 0).
    pub marks: HashMap<u64, BTreeMap<u64, u32>>,
    /// Per user: receipts waiting for some of its devices, in arrival order.
    pub receipts: HashMap<u64, Vec<Kept>>,
    /// Per user: group receipts waiting for some of its devices, in
    /// arrival order.
    pub group_receipts: HashMap<u64, Vec<KeptGroup>>,
    /// The receipt outbox: receipts on their way to their user's home
    /// shard, by number.
    pub outbox: BTreeMap<u64, Out>,
    /// The highest outbox number handed out (0: none): the next is above.
    pub out_seq: u64,
}

/// Clears `lane` of `user` from `receipts` and `group_receipts`, dropping
/// those no device waits for.
fn clear_receipts(state: &mut State, user: u64, lane: u8) {
    if let Some(kept) = state.receipts.get_mut(&user) {
        kept.retain_mut(|k| {
            k.lanes &= !(1 << lane);
            k.lanes != 0
        });
        if kept.is_empty() {
            state.receipts.remove(&user);
        }
    }
    if let Some(kept) = state.group_receipts.get_mut(&user) {
        kept.retain_mut(|k| {
            k.lanes &= !(1 << lane);
            k.lanes != 0
        });
        if kept.is_empty() {
            state.group_receipts.remove(&user);
        }
    }
}

impl State {
    /// Applies `record`.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Registered {
                user,
                device,
                lane,
                at_ms,
            } => {
                let devs = self.devices.entry(user).or_default();
                devs.retain(|d| d.device != device && d.lane != lane);
                devs.push(Dev {
                    device,
                    lane,
                    last_ms: at_ms,
                });
            }
            Record::Removed { user, device, lane } => {
                if let Some(devs) = self.devices.get_mut(&user) {
                    devs.retain(|d| d.device != device);
                    if devs.is_empty() {
                        self.devices.remove(&user);
                    }
                }
                if let Some(marks) = self.marks.get_mut(&user) {
                    marks.retain(|_, m| {
                        *m &= !(1 << lane);
                        *m != 0
                    });
                    if marks.is_empty() {
                        self.marks.remove(&user);
                    }
                }
                clear_receipts(self, user, lane);
            }
            Record::Seen { user, lane, at_ms } => {
                if let Some(d) = self
                    .devices
                    .get_mut(&user)
                    .and_then(|devs| devs.iter_mut().find(|d| d.lane == lane))
                {
                    d.last_ms = at_ms;
                }
            }
            Record::Delivered {
                user,
                server_id,
                lane,
            } => {
                *self
                    .marks
                    .entry(user)
                    .or_default()
                    .entry(server_id)
                    .or_default() |= 1 << lane;
            }
            Record::Receipt { user, kept } => self.receipts.entry(user).or_default().push(kept),
            Record::ReceiptsGot { user, lane } => clear_receipts(self, user, lane),
            Record::GroupKept { user, kept } => {
                self.group_receipts.entry(user).or_default().push(kept)
            }
            Record::Outbox { seq, out } => {
                self.outbox.insert(seq, out);
                self.out_seq = self.out_seq.max(seq);
            }
            Record::OutboxDone { seq } => {
                self.outbox.remove(&seq);
                self.out_seq = self.out_seq.max(seq);
            }
        }
    }

    /// The records that rebuild this state.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let devices = self.devices.iter().flat_map(|(&user, devs)| {
            devs.iter().map(move |d| Record::Registered {
                user,
                device: d.device,
                lane: d.lane,
                at_ms: d.last_ms,
            })
        });
        let marks = self.marks.iter().flat_map(|(&user, marks)| {
            marks.iter().flat_map(move |(&server_id, &m)| {
                (0..LANES as u8)
                    .filter(move |l| m & (1 << l) != 0)
                    .map(move |lane| Record::Delivered {
                        user,
                        server_id,
                        lane,
                    })
            })
        });
        let receipts = self
            .receipts
            .iter()
            .flat_map(|(&user, kept)| kept.iter().map(move |&kept| Record::Receipt { user, kept }));
        let group_receipts = self.group_receipts.iter().flat_map(|(&user, kept)| {
            kept.iter().map(move |kept| Record::GroupKept {
                user,
                kept: kept.clone(),
            })
        });
        let outbox = self
            .outbox
            .iter()
            .map(|(&seq, &out)| Record::Outbox { seq, out });
        // The highest number stays known, so no number is handed out twice
        // (a late answer for an old one must not match a new one).
        let last = (self.out_seq > self.outbox.keys().next_back().copied().unwrap_or(0))
            .then_some(Record::OutboxDone { seq: self.out_seq });
        devices
            .chain(marks)
            .chain(receipts)
            .chain(group_receipts)
            .chain(outbox)
            .chain(last)
    }

    /// Moves every user's state into `homed[home(user)]` (a change of the
    /// shard count: users move to new home shards). A user found in
    /// several states (stranded by an earlier change) keeps the last.
    pub fn rehome(self, homed: &mut [State], home: impl Fn(u64) -> usize) {
        for (user, devs) in self.devices {
            homed[home(user)].devices.insert(user, devs);
        }
        for (user, marks) in self.marks {
            homed[home(user)].marks.insert(user, marks);
        }
        for (user, kept) in self.receipts {
            homed[home(user)].receipts.insert(user, kept);
        }
        for (user, kept) in self.group_receipts {
            homed[home(user)].group_receipts.insert(user, kept);
        }
        // Receipts still on their way go to their user's new home shard,
        // numbered there (delivered locally at its start).
        for out in self.outbox.into_values() {
            let to = &mut homed[home(out.user)];
            to.out_seq += 1;
            to.outbox.insert(to.out_seq, out);
        }
    }

    /// Whether no user has anything here.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.marks.is_empty()
            && self.receipts.is_empty()
            && self.group_receipts.is_empty()
            && self.outbox.is_empty()
    }
}

/// Replays the device log of shard directory `dir` without changing it: the
/// state, the bytes of valid records, and whether the file was valid to its
/// end (a missing file is an empty, whole one).
pub fn read(dir: &Path) -> io::Result<(State, u64, bool)> {
    let path = dir.join(FILE_NAME);
    let mut state = State::default();
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
        state.apply(record);
        at += len;
    }
    Ok((state, at as u64, at == data.len()))
}

/// One shard's device log, open for appending.
pub struct DeviceLog {
    dir: PathBuf,
    path: PathBuf,
    /// `None` after a failed write: the next append rewrites the file whole.
    file: Option<File>,
    /// Bytes in the file.
    bytes: u64,
    /// Bytes right after the last rewrite: twice this (at least
    /// [`REWRITE_BYTES_MIN`]) triggers the next.
    rewritten: u64,
    fsync: bool,
    buf: Vec<u8>,
}

impl DeviceLog {
    /// Gives back what a large append or a rewrite grew the encoding
    /// buffer to, keeping at most `keep_bytes`.
    pub fn trim(&mut self, keep_bytes: usize) {
        crate::memory::trim_vec(&mut self.buf, keep_bytes);
    }

    /// Opens (creating if needed) the device log in shard directory `dir`
    /// and replays it; `fsync`: make each append durable against a power
    /// loss, not only a process crash.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<(DeviceLog, State)> {
        files::create_dir(dir)?;
        let (state, valid, whole) = read(dir)?;
        let mut log = DeviceLog {
            dir: dir.to_path_buf(),
            path: dir.join(FILE_NAME),
            file: None,
            bytes: valid,
            rewritten: valid,
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

    /// Writes `state` as the whole device log of shard directory `dir`.
    pub fn create(dir: &Path, state: &State) -> io::Result<()> {
        files::create_dir(dir)?;
        let mut log = DeviceLog {
            dir: dir.to_path_buf(),
            path: dir.join(FILE_NAME),
            file: None,
            bytes: 0,
            rewritten: 0,
            fsync: true,
            buf: Vec::new(),
        };
        log.rewrite(state)
    }

    /// Appends `records`, and makes them durable as configured unless
    /// `sync` is false (last online times only: they ride the next sync,
    /// and a power loss before it makes a device look idle since its
    /// previous one).
    pub fn append(&mut self, records: &[Record], sync: bool) -> io::Result<()> {
        self.buf.clear();
        for r in records {
            r.encode(&mut self.buf);
        }
        let Some(file) = self.file.as_ref() else {
            return Err(io::Error::other("device log needs a rewrite"));
        };
        let written = files::write(file, &self.path, &self.buf).and_then(|()| {
            if self.fsync && sync {
                files::sync(file, &self.path, true)
            } else {
                Ok(())
            }
        });
        let len = self.buf.len() as u64;
        // Emptied after use so that `trim` can give back what a burst grew
        // it to (it keeps a buffer that holds anything).
        self.buf.clear();
        match written {
            Ok(()) => {
                self.bytes += len;
                Ok(())
            }
            Err(e) => {
                // A partial write (a full disk writes part of it) is cut
                // away, so the same records can be appended again; if even
                // that fails, the next append rewrites the file first.
                if files::truncate(file, &self.path, self.bytes).is_err() {
                    self.file = None;
                }
                Err(e)
            }
        }
    }

    /// Whether the file must be rewritten before the next append (a write
    /// failed and could not be cut back).
    pub fn broken(&self) -> bool {
        self.file.is_none()
    }

    /// Whether the file should be rewritten: it grew past twice its size
    /// after the last rewrite, or it is [`broken`](DeviceLog::broken).
    pub fn wants_rewrite(&self) -> bool {
        self.file.is_none() || self.bytes > (2 * self.rewritten).max(REWRITE_BYTES_MIN)
    }

    /// Rewrites the file from its own replay, without the marks for which
    /// `queued(user, server_id)` is false (messages that left the queue).
    /// Records not yet appended are lost: call it right after an append.
    pub fn compact(&mut self, queued: impl Fn(u64, u64) -> bool) -> io::Result<()> {
        let (mut state, ..) = read(&self.dir)?;
        state.marks.retain(|&user, marks| {
            marks.retain(|&id, _| queued(user, id));
            !marks.is_empty()
        });
        self.rewrite(&state)
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `state` whole to the new file, then renames it over the log.
    pub fn rewrite(&mut self, state: &State) -> io::Result<()> {
        self.file = None;
        self.buf.clear();
        for r in state.records() {
            r.encode(&mut self.buf);
        }
        let len = self.buf.len() as u64;
        let new = self.dir.join(NEW_NAME);
        let written = files::create(&new).and_then(|file| {
            files::write(&file, &new, &self.buf)?;
            // Always synced before the rename: a rename that lands before
            // the data would leave an empty file in place of the old state.
            files::sync(&file, &new, true)
        });
        self.buf.clear();
        written?;
        files::rename(&new, &self.path)?;
        files::sync_dir(&self.dir)?;
        self.bytes = len;
        self.rewritten = self.bytes;
        self.file = Some(files::open_append(&self.path)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> [Record; 9] {
        [
            Record::Registered {
                user: 42,
                device: 7,
                lane: 1,
                at_ms: 1_767_225_600_000,
            },
            Record::Removed {
                user: 42,
                device: 7,
                lane: 1,
            },
            Record::Seen {
                user: 42,
                lane: 31,
                at_ms: 5,
            },
            Record::Delivered {
                user: 42,
                server_id: 1025,
                lane: 0,
            },
            Record::Receipt {
                user: 42,
                kept: Kept {
                    kind: 2,
                    server_id: 2049,
                    peer: 9,
                    lanes: 0b101,
                },
            },
            Record::ReceiptsGot { user: 42, lane: 2 },
            Record::GroupKept {
                user: 42,
                kept: KeptGroup {
                    kind: 1,
                    lanes: 0b10,
                    group: 1025,
                    msg: 3073,
                    members: vec![42, 43, 300].into(),
                },
            },
            Record::Outbox {
                seq: 3,
                out: Out {
                    user: 42,
                    kind: 2,
                    group: 0,
                    id: 2049,
                    peer: 9,
                },
            },
            Record::OutboxDone { seq: 3 },
        ]
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        for r in all_kinds() {
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
    }

    #[test]
    fn removal_clears_the_lane_everywhere() {
        let mut s = State::default();
        for (device, lane) in [(3, 0), (8, 1)] {
            s.apply(Record::Registered {
                user: 1,
                device,
                lane,
                at_ms: 10,
            });
        }
        s.apply(Record::Seen {
            user: 1,
            lane: 1,
            at_ms: 20,
        });
        s.apply(Record::Delivered {
            user: 1,
            server_id: 99,
            lane: 1,
        });
        let kept = Kept {
            kind: 1,
            server_id: 5,
            peer: 2,
            lanes: 0b11,
        };
        s.apply(Record::Receipt { user: 1, kept });
        s.apply(Record::ReceiptsGot { user: 1, lane: 0 });
        assert_eq!(s.receipts[&1][0].lanes, 0b10);
        assert_eq!(s.devices[&1][1].last_ms, 20);
        // The rewrite's records rebuild the same state.
        let mut again = State::default();
        for r in s.records() {
            again.apply(r);
        }
        assert_eq!(again, s);
        s.apply(Record::Removed {
            user: 1,
            device: 8,
            lane: 1,
        });
        assert_eq!(s.devices[&1].len(), 1);
        assert!(s.marks.is_empty() && s.receipts.is_empty());
    }

    /// Arbitrary records of the receipt kinds (15, 11, 12, 24, 25) and
    /// removals, for one of a few users and lanes.
    fn arb_receipt_record() -> impl proptest::strategy::Strategy<Value = Record> {
        use proptest::prelude::*;
        let user = 1u64..4;
        let lane = 0u8..3;
        prop_oneof![
            (user.clone(), 1u8..3, 1u64..5, 0u64..4, 1u32..8).prop_map(
                |(user, kind, server_id, peer, lanes)| Record::Receipt {
                    user,
                    kept: Kept {
                        kind,
                        server_id,
                        peer,
                        lanes,
                    },
                }
            ),
            (
                user.clone(),
                1u8..3,
                1u32..8,
                prop::collection::vec(any::<u64>(), 1..40)
            )
                .prop_map(|(user, kind, lanes, members)| Record::GroupKept {
                    user,
                    kept: KeptGroup {
                        kind,
                        lanes,
                        group: 9,
                        msg: 3,
                        members: members.into(),
                    },
                }),
            (user.clone(), lane.clone())
                .prop_map(|(user, lane)| Record::ReceiptsGot { user, lane }),
            (user.clone(), lane).prop_map(|(user, lane)| Record::Removed {
                user,
                device: lane.into(),
                lane,
            }),
            (1u64..20, user, 1u8..3, 0u64..3, any::<u64>()).prop_map(
                |(seq, user, kind, group, id)| Record::Outbox {
                    seq,
                    out: Out {
                        user,
                        kind,
                        group,
                        id,
                        peer: 7,
                    },
                }
            ),
            (1u64..20).prop_map(|seq| Record::OutboxDone { seq }),
        ]
    }

    proptest::proptest! {
        /// Every record decodes to itself and no prefix decodes; the
        /// records a state rewrites to (compaction, a reshard's new files)
        /// rebuild that state, outbox numbers and all.
        #[test]
        fn receipt_records_round_trip_and_a_rewrite_keeps_the_state(
            records in proptest::collection::vec(arb_receipt_record(), 0..40)
        ) {
            let mut state = State::default();
            for r in &records {
                let mut buf = Vec::new();
                r.encode(&mut buf);
                proptest::prop_assert_eq!(decode(&buf), Some((r.clone(), buf.len())));
                proptest::prop_assert_eq!(decode(&buf[..buf.len() - 1]), None);
                state.apply(r.clone());
            }
            let mut again = State::default();
            for r in state.records() {
                again.apply(r);
            }
            proptest::prop_assert_eq!(again, state);
        }
    }

    #[test]
    fn waiting_receipts_cost_what_the_docs_say() {
        // docs/ARCHITECTURE.md, "Durable receipts"; results/receipts/.
        assert_eq!(std::mem::size_of::<Kept>(), 24);
        assert_eq!(std::mem::size_of::<KeptGroup>(), 40);
        assert_eq!(std::mem::size_of::<Out>(), 40);
    }

    #[test]
    fn group_receipts_and_the_outbox_replay_rewrite_and_rehome() {
        let kept = |lanes, members: &[u64]| KeptGroup {
            kind: 2,
            lanes,
            group: 7,
            msg: 3,
            members: members.into(),
        };
        let out = |user| Out {
            user,
            kind: 1,
            group: 0,
            id: 1025,
            peer: 5,
        };
        let mut s = State::default();
        s.apply(Record::GroupKept {
            user: 1,
            kept: kept(0b11, &[4, 5]),
        });
        s.apply(Record::GroupKept {
            user: 2,
            kept: kept(0b1, &[6]),
        });
        for seq in 1..=3 {
            s.apply(Record::Outbox {
                seq,
                out: out(seq + 10),
            });
        }
        s.apply(Record::OutboxDone { seq: 2 });
        s.apply(Record::ReceiptsGot { user: 1, lane: 0 });
        s.apply(Record::Removed {
            user: 2,
            device: 0,
            lane: 0,
        });
        assert_eq!(s.group_receipts[&1], [kept(0b10, &[4, 5])]);
        assert!(!s.group_receipts.contains_key(&2));
        assert_eq!(s.outbox.keys().collect::<Vec<_>>(), [&1, &3]);
        assert_eq!(s.out_seq, 3);
        // Every receipt done: the rewrite still knows the highest number.
        s.apply(Record::OutboxDone { seq: 1 });
        s.apply(Record::OutboxDone { seq: 3 });
        let mut again = State::default();
        for r in s.records() {
            again.apply(r);
        }
        assert_eq!(again, s);
        assert_eq!(again.out_seq, 3);
        // A change of the shard count: each waiting receipt goes to its
        // user's new home, numbered there.
        s.apply(Record::Outbox {
            seq: 4,
            out: out(11),
        });
        s.apply(Record::Outbox {
            seq: 5,
            out: out(12),
        });
        let mut homed = vec![State::default(), State::default()];
        s.rehome(&mut homed, |user| (user % 2) as usize);
        assert_eq!(homed[1].outbox.values().collect::<Vec<_>>(), [&out(11)]);
        assert_eq!(homed[0].outbox.values().collect::<Vec<_>>(), [&out(12)]);
        assert_eq!(homed[1].group_receipts[&1], [kept(0b10, &[4, 5])]);
        assert!(homed.iter().all(|h| h.out_seq == 1));
    }

    #[cfg(any(debug_assertions, feature = "failpoints"))]
    #[test]
    fn a_full_disk_cuts_the_partial_append_away() {
        use crate::store::fault::{self, Op, Rule};
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = DeviceLog::open(dir.path(), false).unwrap();
        let records = all_kinds();
        log.append(&records[..1], true).unwrap();
        // The tempdir's unique name keeps the rule to this test.
        let name = dir.path().to_str().unwrap().to_string();
        fault::inject(Rule {
            path_contains: name.clone(),
            op: Op::Write,
            skip: 0,
            times: 1,
            errno: libc::ENOSPC,
        });
        // Half of it was written, then cut away: the same records again
        // leave no copy behind (a receipt twice would be handed out twice).
        let full = log.append(&records[4..], true).unwrap_err();
        assert!(fault::is_no_space(&full), "{full}");
        assert!(!log.broken());
        log.append(&records[4..], true).unwrap();
        fault::clear(&name);
        drop(log);
        let (_, state) = DeviceLog::open(dir.path(), false).unwrap();
        assert_eq!(state.receipts[&42].len(), 1, "{state:?}");
    }

    #[test]
    fn replay_survives_a_torn_tail_and_compaction_drops_dead_marks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, state) = DeviceLog::open(dir.path(), false).unwrap();
        assert_eq!(state, State::default());
        let records = all_kinds();
        log.append(&records[..4], true).unwrap();
        log.append(
            &[Record::Delivered {
                user: 5,
                server_id: 7,
                lane: 3,
            }],
            false,
        )
        .unwrap();
        drop(log);
        let path = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&path).unwrap();
        let mut extra = Vec::new();
        records[4].encode(&mut extra);
        data.extend_from_slice(&extra[..extra.len() - 1]);
        std::fs::write(&path, &data).unwrap();
        let (mut log, state) = DeviceLog::open(dir.path(), false).unwrap();
        assert!(state.receipts.is_empty(), "the torn receipt is dropped");
        assert_eq!(state.marks.len(), 2);
        assert_eq!(log.bytes(), std::fs::metadata(&path).unwrap().len());
        log.compact(|user, _| user == 5).unwrap();
        let (_, state) = DeviceLog::open(dir.path(), false).unwrap();
        assert_eq!(state.marks.keys().collect::<Vec<_>>(), [&5]);
    }
}
