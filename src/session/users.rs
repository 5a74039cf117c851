//! The users logged in on this, their home shard: the session of each of
//! their online devices (which connection, its delivery window). What
//! outlives a session (registered devices, marks, receipts waiting for a
//! device) is the registry's (`registry.rs`).

// foldhash, not std's SipHash: these maps are looked up for every frame,
// and SipHash was ~13 % of a pipelined message's CPU
// (results/saturation/profile/). Only authenticated logins insert keys.
use foldhash::HashMap;

use crate::io::ConnId;

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
    /// This session's device's lane (0..32) in its user's registry: its
    /// bit in the masks of marks and receipts. Also in the padding.
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

/// Who is online on this shard.
///
/// A user with one device online costs one `online` entry, as before
/// devices; only users with several online have a `more` entry.
#[derive(Default)]
pub(super) struct Users {
    /// Each online user's first session.
    online: HashMap<u64, Online>,
    /// The sessions of further devices, for users with several online (at
    /// most `devices_per_user_max - 1` each).
    more: HashMap<u64, Vec<Online>>,
    /// Sessions online: `online` plus every `more` entry.
    sessions: usize,
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

    /// The lanes of `user`'s online sessions.
    pub(super) fn lanes(&self, user: u64) -> u32 {
        self.online
            .get(&user)
            .into_iter()
            .chain(self.more.get(&user).into_iter().flatten())
            .fold(0, |m, o| m | 1 << o.lane)
    }

    /// Adds `conn` as a session of `user`, its device registered on `lane`
    /// (the caller checked the device limit and replaced a session of the
    /// same device).
    pub(super) fn go_online(&mut self, user: u64, conn: ConnId, lane: u8) {
        self.sessions += 1;
        let taken = self.lanes(user);
        debug_assert!(
            taken & (1 << lane) == 0,
            "lane {lane} of {user} online twice"
        );
        if taken == 0 {
            self.online.insert(user, Online::new(conn, lane));
        } else {
            // Exactly as long as needed: a first push would reserve 4
            // sessions (96 bytes) for the usual second device.
            let more = self.more.entry(user).or_default();
            more.reserve_exact(1);
            more.push(Online::new(conn, lane));
        }
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

    /// Every online user with its first session's connection and lane.
    pub(super) fn firsts(&self) -> impl Iterator<Item = (u64, ConnId, u8)> + '_ {
        self.online.iter().map(|(&u, o)| (u, o.conn, o.lane))
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

    /// Forgets everyone (after a crash).
    pub(super) fn clear(&mut self) {
        self.online.clear();
        self.more.clear();
        self.sessions = 0;
    }
}
