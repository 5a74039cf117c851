//! The users logged in on this, their home shard: the session of each of
//! their online devices (which connection, its delivery window), the
//! messages several devices still owe a DELIVERED for, and receipts waiting
//! for users who are offline.

use std::collections::BTreeMap;

// foldhash, not std's SipHash: these maps are looked up for every frame,
// and SipHash was ~13 % of a pipelined message's CPU
// (results/saturation/profile/). Only authenticated logins insert keys.
use foldhash::HashMap;

use crate::io::ConnId;
use crate::proto::ReceiptKind;

/// One online device of a user on its home shard: its session.
#[derive(Debug)]
pub(super) struct Online {
    pub(super) conn: ConnId,
    /// Highest server id already sent as DELIVER on this connection.
    pub(super) sent_upto: u64,
    /// DELIVERs sent on this connection and not yet answered.
    pub(super) inflight: u32,
    /// Their encoded bytes, at most `deliver_inflight_bytes_max` (but one
    /// DELIVER always goes). Sits in `Online`'s padding: no idle cost.
    pub(super) inflight_bytes: u32,
    /// Queued messages were left unsent by the last pump (in-flight cap or
    /// output budget): the connection is catching up on a backlog.
    pub(super) held: bool,
    /// This session's bit (0..32) among its user's online devices: the
    /// devices that still owe a DELIVERED for a message are a mask of them.
    /// Also in the padding.
    pub(super) lane: u8,
}

// The delivery window's counters fit in what an online user cost before.
const _: () = assert!(std::mem::size_of::<Online>() <= 24);

impl Online {
    /// A fresh session of a device: nothing sent yet.
    fn new(conn: ConnId, lane: u8) -> Online {
        Online {
            conn,
            sent_upto: 0,
            inflight: 0,
            inflight_bytes: 0,
            held: false,
            lane,
        }
    }
}

/// A message sent to several online devices of its user and not yet
/// answered by all of them: it stays queued until it is.
#[derive(Clone, Copy, Debug)]
pub(super) struct Owed {
    /// Lanes of the online devices that still owe its DELIVERED.
    pub(super) lanes: u32,
    /// A device answered it: the delivery receipt has gone to the sender.
    pub(super) delivered: bool,
}

/// A delivery or read receipt waiting for its (offline) recipient.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingReceipt {
    pub(super) kind: ReceiptKind,
    pub(super) server_id: u64,
    pub(super) peer: u64,
}

/// Who is online on this shard, and what waits for those who are not.
///
/// A user with one device online costs one `online` entry, as before
/// devices; only users with several online have `more` and `owed` entries.
#[derive(Default)]
pub(super) struct Users {
    /// Each online user's first session.
    online: HashMap<u64, Online>,
    /// The sessions of further devices, for users with several online (at
    /// most `devices_per_user_max - 1` each).
    more: HashMap<u64, Vec<Online>>,
    /// Per user: messages sent to several of its devices that some still
    /// owe a DELIVERED for, by server id.
    owed: HashMap<u64, BTreeMap<u64, Owed>>,
    /// Sessions online: `online` plus every `more` entry.
    sessions: usize,
    /// Receipts for users who were offline when they came, sent at login.
    receipts: HashMap<u64, Vec<PendingReceipt>>,
}

impl Users {
    /// The connection of `user`'s first session here, if online.
    pub(super) fn conn_of(&self, user: u64) -> Option<ConnId> {
        self.online.get(&user).map(|o| o.conn)
    }

    /// Sessions (devices) `user` has online here.
    pub(super) fn count(&self, user: u64) -> usize {
        match self.online.get(&user) {
            None => 0,
            Some(_) => 1 + self.more.get(&user).map_or(0, Vec::len),
        }
    }

    /// The connection of `user`'s session number `i` (below `count`).
    pub(super) fn nth_conn(&self, user: u64, i: usize) -> ConnId {
        match i {
            0 => self.online[&user].conn,
            _ => self.more[&user][i - 1].conn,
        }
    }

    /// `user`'s session on `conn`, if it is one of its sessions.
    pub(super) fn get_mut(&mut self, user: u64, conn: ConnId) -> Option<&mut Online> {
        let first = self.online.get_mut(&user)?;
        if first.conn == conn {
            return Some(first);
        }
        self.more
            .get_mut(&user)?
            .iter_mut()
            .find(|o| o.conn == conn)
    }

    /// `user`'s session on `conn`, if it is one of its sessions.
    pub(super) fn get(&self, user: u64, conn: ConnId) -> Option<&Online> {
        let first = self.online.get(&user)?;
        if first.conn == conn {
            return Some(first);
        }
        self.more.get(&user)?.iter().find(|o| o.conn == conn)
    }

    /// `user`'s first session, if online.
    pub(super) fn first(&self, user: u64) -> Option<&Online> {
        self.online.get(&user)
    }

    /// Whether any session of `user` was sent `server_id` already.
    pub(super) fn any_sent(&self, user: u64, server_id: u64) -> bool {
        self.online
            .get(&user)
            .into_iter()
            .chain(self.more.get(&user).into_iter().flatten())
            .any(|o| o.sent_upto >= server_id)
    }

    /// The lanes of `user`'s online sessions.
    pub(super) fn lanes(&self, user: u64) -> u32 {
        self.online
            .get(&user)
            .into_iter()
            .chain(self.more.get(&user).into_iter().flatten())
            .fold(0, |m, o| m | 1 << o.lane)
    }

    /// Adds `conn` as a session of `user` (the caller checked the device
    /// limit and replaced a session of the same device); returns its lane.
    pub(super) fn go_online(&mut self, user: u64, conn: ConnId) -> u8 {
        self.sessions += 1;
        let taken = self.lanes(user);
        let lane = (!taken).trailing_zeros() as u8;
        debug_assert!(lane < 32, "user {user} has 32 sessions");
        if taken == 0 {
            self.online.insert(user, Online::new(conn, lane));
        } else {
            // Exactly as long as needed: a first push would reserve 4
            // sessions (96 bytes) for the usual second device.
            let more = self.more.entry(user).or_default();
            more.reserve_exact(1);
            more.push(Online::new(conn, lane));
        }
        lane
    }

    /// Takes `conn`'s session of `user` offline; returns its lane if `conn`
    /// was one of `user`'s sessions.
    pub(super) fn go_offline(&mut self, user: u64, conn: ConnId) -> Option<u8> {
        let first = self.online.get(&user)?;
        let lane = if first.conn == conn {
            let lane = first.lane;
            // The next device's session (if any) becomes the first.
            match self.more.get_mut(&user).and_then(Vec::pop) {
                Some(next) => {
                    self.online.insert(user, next);
                }
                None => {
                    self.online.remove(&user);
                    crate::memory::shrink_map(&mut self.online);
                }
            }
            lane
        } else {
            let more = self.more.get_mut(&user)?;
            let at = more.iter().position(|o| o.conn == conn)?;
            more.swap_remove(at).lane
        };
        if self.more.get(&user).is_some_and(Vec::is_empty) {
            self.more.remove(&user);
            crate::memory::shrink_map(&mut self.more);
        }
        self.sessions -= 1;
        Some(lane)
    }

    /// The messages several of `user`'s devices were sent and some still
    /// owe a DELIVERED for, if any.
    pub(super) fn owed_mut(&mut self, user: u64) -> Option<&mut BTreeMap<u64, Owed>> {
        self.owed.get_mut(&user)
    }

    /// `user`'s owed messages, made if it has none.
    pub(super) fn owed_entry(&mut self, user: u64) -> &mut BTreeMap<u64, Owed> {
        self.owed.entry(user).or_default()
    }

    /// Forgets `user`'s owed messages if none is left.
    pub(super) fn owed_tidy(&mut self, user: u64) {
        if self.owed.get(&user).is_some_and(BTreeMap::is_empty) {
            self.owed.remove(&user);
            crate::memory::shrink_map(&mut self.owed);
        }
    }

    /// The first session's DELIVERs in flight and their bytes, if online.
    pub(super) fn window(&self, user: u64) -> Option<(u32, u32)> {
        self.online
            .get(&user)
            .map(|o| (o.inflight, o.inflight_bytes))
    }

    /// Users online.
    pub(super) fn len(&self) -> usize {
        self.online.len()
    }

    /// Sessions online: every online device of every user.
    pub(super) fn sessions(&self) -> usize {
        self.sessions
    }

    /// The receipts kept for `user` while it was offline.
    pub(super) fn take_receipts(&mut self, user: u64) -> Vec<PendingReceipt> {
        let taken = self.receipts.remove(&user).unwrap_or_default();
        crate::memory::shrink_map(&mut self.receipts);
        taken
    }

    /// Keeps a receipt for offline `user`, at most `len_max` of them;
    /// returns false (dropped) past that.
    pub(super) fn keep_receipt(&mut self, user: u64, r: PendingReceipt, len_max: usize) -> bool {
        let pending = self.receipts.entry(user).or_default();
        if pending.len() < len_max {
            pending.push(r);
            return true;
        }
        false
    }

    /// Receipts kept for `user`.
    pub(super) fn receipts_of(&self, user: u64) -> usize {
        self.receipts.get(&user).map_or(0, Vec::len)
    }

    /// Forgets everyone (after a crash).
    pub(super) fn clear(&mut self) {
        self.online.clear();
        self.more.clear();
        self.owed.clear();
        self.sessions = 0;
        self.receipts.clear();
    }
}
