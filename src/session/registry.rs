//! The device registry (issue 11): the devices registered to each user
//! homed here, which of them answered DELIVERED for a message others still
//! owe (marks), and receipts waiting for devices that are offline. Made
//! durable by the shard in its device log (`store::devices`), from the
//! records staged here ([`Sessions::take_device_records`]).
//!
//! A device is registered at its first login and stays registered, online
//! or not, until it is removed (DEVICE_REMOVE, `device remove`) or has not
//! been online for `device_idle_days_max`. A message leaves its recipient's
//! queue once every registered device answered DELIVERED: its body is kept
//! once, and only a message some devices answered and others not has a
//! mark (a 32-bit mask of the lanes that answered).
//!
//! Cost: a user online with one registered device has no entry here (its
//! device and lane are in its session); a user offline, or with several
//! registered devices, has one `devices` entry (a `Vec` of 16-byte
//! [`Dev`]s). Marks and waiting receipts exist only while something waits.

use std::collections::BTreeMap;

use foldhash::HashMap;

use crate::io::ConnId;
use crate::proto::{self, Frame, ReceiptKind};
use crate::shard::Msg;
use crate::store::devices::{Dev, Kept, KeptGroup, Record, State, GROUP_KEPT_MEMBERS_MAX, LANES};

use super::{Action, Env, Now, Sessions};

/// The registry of one shard's users.
#[derive(Default)]
pub(super) struct Registry {
    /// Users with several registered devices, or offline with one.
    pub(super) devices: HashMap<u64, Vec<Dev>>,
    /// Per user, per message still queued: the lanes that answered it
    /// (never 0, never all the registered ones).
    pub(super) marks: HashMap<u64, BTreeMap<u64, u32>>,
    /// Per user: receipts waiting for some of its devices, in order.
    pub(super) receipts: HashMap<u64, Vec<Kept>>,
    /// Per user: group receipts waiting for some of its devices, in order.
    pub(super) group_receipts: HashMap<u64, Vec<KeptGroup>>,
    /// Receipts waiting, all users: those in `receipts` and the members
    /// named in `group_receipts` (one receipt each).
    pub(super) receipts_len: usize,
    /// The receipt outbox (`outbox.rs`): receipts this shard took on their
    /// way to their users' home shards, by number.
    pub(super) outbox: super::outbox::Outbox,
    /// The highest outbox number handed out; kept across a crash's replay
    /// (a late answer to a number lost with the crash must not match a
    /// new receipt).
    pub(super) out_seq: u64,
    /// Changes not yet handed to the device log.
    pub(super) records: Vec<Record>,
    /// Where the next expiry pass starts in `devices`' iteration order.
    pub(super) cursor: usize,
}

/// The lanes of `devs`.
fn mask(devs: &[Dev]) -> u32 {
    devs.iter().fold(0, |m, d| m | 1 << d.lane)
}

/// The lowest lane not in `taken`.
fn free_lane(taken: u32) -> u8 {
    let lane = (!taken).trailing_zeros() as u8;
    debug_assert!((lane as usize) < LANES, "every lane taken");
    lane
}

impl Sessions {
    /// Installs the state replayed from the shard's device log (at start,
    /// or after a crash, with every user offline). Marks of messages no
    /// longer queued are dropped; a message every registered device
    /// answered (the removal of the last one that owed it did not reach
    /// the message log) leaves the queue now.
    pub fn restore_devices(&mut self, state: State) {
        debug_assert_eq!(self.users.len(), 0, "restored with users online");
        let State {
            devices,
            marks,
            receipts,
            group_receipts,
            outbox,
            out_seq,
        } = state;
        let r = &mut self.registry;
        r.devices = devices.into_iter().collect();
        r.receipts_len = receipts.values().map(Vec::len).sum::<usize>()
            + group_receipts
                .values()
                .flatten()
                .map(|k| k.members.len())
                .sum::<usize>();
        r.receipts = receipts.into_iter().collect();
        r.group_receipts = group_receipts.into_iter().collect();
        r.outbox = outbox.into();
        r.out_seq = r.out_seq.max(out_seq);
        r.records.clear();
        r.cursor = 0;
        r.marks.clear();
        let mut done = Vec::new();
        for (user, marks) in marks {
            let all = r.devices.get(&user).map_or(0, |d| mask(d));
            let mut kept = BTreeMap::new();
            for (id, m) in marks {
                let m = m & all;
                let queued = self
                    .store
                    .next_after(user, id.saturating_sub(1))
                    .is_some_and(|msg| msg.server_id == id);
                if m == 0 || !queued {
                    continue;
                }
                if m == all {
                    done.push((user, id));
                } else {
                    kept.insert(id, m);
                }
            }
            if !kept.is_empty() {
                r.marks.insert(user, kept);
            }
        }
        for (user, id) in done {
            self.store.remove(user, id);
        }
        self.stats
            .receipts_waiting
            .set(self.registry.receipts_len as u64);
        // Receipts the crash (or stop) caught on their way go again.
        self.outbox_resend(None);
    }

    /// Moves the device log records staged since the last call into `out`.
    pub fn take_device_records(&mut self, out: &mut Vec<Record>) {
        out.clear();
        out.append(&mut self.registry.records);
    }

    /// Counts `n` device log records made durable, and publishes the
    /// receipts waiting (durable from now on).
    pub fn count_device_records(&mut self, n: usize) {
        self.stats.device_records.add(n as u64);
        self.stats
            .receipts_waiting
            .set(self.registry.receipts_len as u64);
    }

    /// The device ids registered to `user` here, online or not, sorted.
    pub fn registered_devices(&self, user: u64) -> Vec<u32> {
        let mut ids: Vec<u32> = match self.registry.devices.get(&user) {
            Some(devs) => devs.iter().map(|d| d.device).collect(),
            None => self.devices_of(user),
        };
        ids.sort_unstable();
        ids
    }

    /// Receipts waiting for some device of `user` (a group receipt counts
    /// once per member it names).
    pub fn receipts_kept(&self, user: u64) -> usize {
        self.registry.receipts.get(&user).map_or(0, Vec::len) + self.group_receipts_kept(user)
    }

    /// Members named by the group receipts waiting for `user`.
    fn group_receipts_kept(&self, user: u64) -> usize {
        self.registry
            .group_receipts
            .get(&user)
            .map_or(0, |g| g.iter().map(|k| k.members.len()).sum())
    }

    /// The lanes of `user`'s registered devices.
    pub(super) fn registered(&self, user: u64) -> u32 {
        match self.registry.devices.get(&user) {
            Some(devs) => mask(devs),
            // At most one, and online if any.
            None => self.users.lanes(user),
        }
    }

    /// The lane of `device` of `user` logging in, registering it if it is
    /// new; `Err(registered)` when the user has `devices_per_user_max`
    /// other devices registered. A device of the same id online was
    /// replaced (taken offline) before.
    pub(super) fn login_lane(&mut self, user: u64, device: u32) -> Result<u8, usize> {
        let at_ms = self.now_ms;
        let max = self.config.devices_per_user_max;
        let r = &mut self.registry;
        if let Some(devs) = r.devices.get_mut(&user) {
            if let Some(d) = devs.iter_mut().find(|d| d.device == device) {
                d.last_ms = at_ms;
                let lane = d.lane;
                r.records.push(Record::Seen { user, lane, at_ms });
                if devs.len() == 1 {
                    // Online alone: its session holds what the entry did.
                    r.devices.remove(&user);
                    crate::memory::shrink_map(&mut r.devices);
                }
                return Ok(lane);
            }
            if devs.len() >= max {
                return Err(devs.len());
            }
            let lane = free_lane(mask(devs));
            devs.reserve_exact(1);
            devs.push(Dev {
                device,
                lane,
                last_ms: at_ms,
            });
            r.records.push(Record::Registered {
                user,
                device,
                lane,
                at_ms,
            });
            return Ok(lane);
        }
        let lane = match self.users.first(user) {
            // The user's first device: no entry while it is online alone.
            None => 0,
            Some(on) => {
                if max <= 1 {
                    return Err(1);
                }
                let other = Dev {
                    device: self.slots[on.conn.index()].device,
                    lane: on.lane,
                    last_ms: at_ms,
                };
                debug_assert_ne!(other.device, device, "the same device was replaced");
                let lane = free_lane(1 << on.lane);
                let devs = vec![
                    other,
                    Dev {
                        device,
                        lane,
                        last_ms: at_ms,
                    },
                ];
                r.devices.insert(user, devs);
                lane
            }
        };
        r.records.push(Record::Registered {
            user,
            device,
            lane,
            at_ms,
        });
        Ok(lane)
    }

    /// `device` of `user`, on `lane`, went offline: it stays registered
    /// (an entry is made if it was online alone) and owes what it owed.
    pub(super) fn registry_offline(&mut self, user: u64, device: u32, lane: u8) {
        let at_ms = self.now_ms;
        let r = &mut self.registry;
        r.records.push(Record::Seen { user, lane, at_ms });
        match r.devices.get_mut(&user) {
            Some(devs) => {
                if let Some(d) = devs.iter_mut().find(|d| d.lane == lane) {
                    d.last_ms = at_ms;
                }
            }
            None => {
                r.devices.insert(
                    user,
                    vec![Dev {
                        device,
                        lane,
                        last_ms: at_ms,
                    }],
                );
            }
        }
    }

    /// Before a crash reset with an in-memory store (nothing is replayed):
    /// the users online alone get their entry, as if they went offline.
    pub(super) fn registry_keep_online(&mut self) {
        let mut alone = Vec::new();
        for (user, conn, lane) in self.users.firsts() {
            if !self.registry.devices.contains_key(&user) {
                alone.push((user, self.slots[conn.index()].device, lane));
            }
        }
        for (user, device, lane) in alone {
            self.registry_offline(user, device, lane);
        }
    }

    /// Takes `device` of `user` out of the registry (removed or expired):
    /// its lane is cleared from the user's marks and receipts, and what
    /// only it still owed leaves the queue (all of it, if it was the last
    /// device). `None` if it is not registered. Its session, if any, was
    /// closed before.
    pub(super) fn unregister(&mut self, user: u64, device: u64) -> Option<u8> {
        let r = &mut self.registry;
        let devs = r.devices.get_mut(&user)?;
        let at = devs.iter().position(|d| u64::from(d.device) == device)?;
        let gone = devs.swap_remove(at);
        let left = mask(devs);
        if devs.is_empty() || devs.len() == 1 && self.users.count(user) == 1 {
            r.devices.remove(&user);
            crate::memory::shrink_map(&mut r.devices);
        }
        r.records.push(Record::Removed {
            user,
            device: gone.device,
            lane: gone.lane,
        });
        let bit = 1u32 << gone.lane;
        if let Some(mut kept) = r.receipts.remove(&user) {
            let before = kept.len();
            kept.retain_mut(|k| {
                k.lanes &= !bit;
                k.lanes != 0
            });
            r.receipts_len -= before - kept.len();
            if !kept.is_empty() {
                r.receipts.insert(user, kept);
            }
        }
        if let Some(mut kept) = r.group_receipts.remove(&user) {
            kept.retain_mut(|k| {
                k.lanes &= !bit;
                if k.lanes == 0 {
                    r.receipts_len -= k.members.len();
                }
                k.lanes != 0
            });
            if !kept.is_empty() {
                r.group_receipts.insert(user, kept);
            }
        }
        let mut done = std::mem::take(&mut self.done_ids);
        done.clear();
        if left == 0 {
            // Nobody left to deliver to: what waited was for it alone.
            r.marks.remove(&user);
            self.store.each_after(user, 0, &mut |m| {
                done.push(m.server_id);
                true
            });
        } else if let Some(marks) = r.marks.get_mut(&user) {
            marks.retain(|&id, m| {
                *m &= !bit;
                if *m & left == left {
                    done.push(id);
                }
                *m != 0 && *m & left != left
            });
            if marks.is_empty() {
                r.marks.remove(&user);
            }
        }
        crate::memory::shrink_map(&mut r.marks);
        for &server_id in &done {
            self.store.remove(user, server_id);
            if self.config.cluster.is_some() {
                self.actions
                    .push(Action::Cluster(Msg::Done { user, server_id }));
            }
        }
        done.clear();
        self.done_ids = done;
        Some(gone.lane)
    }

    /// DELIVERED from the device on `lane` of `user`, for a message other
    /// registered devices (`all`, lanes) also owe: marked, and removed
    /// once every one answered. The delivery receipt goes at the first.
    pub(super) fn delivered_marked(
        &mut self,
        env: &dyn Env,
        conn: ConnId,
        user: u64,
        server_id: u64,
        lane: u8,
        all: u32,
    ) {
        let msg = match self.store.next_after(user, server_id.saturating_sub(1)) {
            Some(m) if m.server_id == server_id => m.clone(),
            _ => {
                if !self.guard.was_delivered(conn, server_id, None) {
                    self.unknown_message(conn, "DELIVERED");
                }
                return;
            }
        };
        let bit = 1u32 << lane;
        let before = self
            .registry
            .marks
            .get(&user)
            .and_then(|m| m.get(&server_id))
            .copied()
            .unwrap_or(0);
        if before & bit != 0 {
            return; // this device answered it already
        }
        let marks = before | bit;
        self.answered(conn, user, &msg);
        if before == 0 {
            self.delivery_receipt(user, &msg);
        }
        if marks & all == all {
            self.forget_mark(user, server_id);
            self.store.remove(user, server_id);
            if self.config.cluster.is_some() {
                self.actions
                    .push(Action::Cluster(Msg::Done { user, server_id }));
            }
        } else {
            self.registry
                .marks
                .entry(user)
                .or_default()
                .insert(server_id, marks);
            self.registry.records.push(Record::Delivered {
                user,
                server_id,
                lane,
            });
        }
        self.pump_one(env, user, conn, false, None);
    }

    /// Drops the mark of `server_id` of `user`, if any (it leaves the queue).
    pub(super) fn forget_mark(&mut self, user: u64, server_id: u64) {
        if let Some(marks) = self.registry.marks.get_mut(&user) {
            marks.remove(&server_id);
            if marks.is_empty() {
                self.registry.marks.remove(&user);
                crate::memory::shrink_map(&mut self.registry.marks);
            }
        }
    }

    /// A receipt for `user` (homed here): written to its online devices,
    /// kept (durably) for its registered devices that are offline.
    /// The lanes of `user`'s registered devices that are offline: those a
    /// receipt for it waits for. Nobody registered (a registration lost
    /// with its log, or every device removed): lane 0, which the next
    /// device to register takes.
    pub(super) fn waiting_lanes(&self, user: u64) -> u32 {
        match self.registered(user) {
            0 => 1,
            all => all & !self.users.lanes(user),
        }
    }

    pub(super) fn on_receipt(&mut self, user: u64, kind: ReceiptKind, server_id: u64, peer: u64) {
        let n = self.users.count(user);
        for i in 0..n {
            let conn = self.users.nth_conn(user, i);
            self.write_receipt(conn, kind, server_id, peer);
        }
        let lanes = self.waiting_lanes(user);
        if lanes == 0 {
            return;
        }
        let k = Kept {
            kind: kind as u8,
            server_id,
            peer,
            lanes,
        };
        let groups = self.group_receipts_kept(user);
        let r = &mut self.registry;
        let kept = r.receipts.entry(user).or_default();
        if kept
            .iter()
            .any(|h| (h.kind, h.server_id, h.peer) == (k.kind, server_id, peer))
        {
            return; // sent again by its outbox: held already
        }
        if kept.len() + groups >= self.config.queue_len_max {
            self.stats.receipts_dropped.inc();
            if kept.is_empty() {
                r.receipts.remove(&user);
            }
            return;
        }
        kept.push(k);
        r.receipts_len += 1;
        r.records.push(Record::Receipt { user, kept: k });
    }

    /// The device on `lane` of `user` logged in on `conn`: it gets the
    /// receipts that waited for it.
    pub(super) fn give_receipts(&mut self, user: u64, conn: ConnId, lane: u8) {
        let bit = 1u32 << lane;
        let mut got = false;
        if let Some(mut kept) = self.registry.receipts.remove(&user) {
            let before = kept.len();
            for k in kept.iter_mut().filter(|k| k.lanes & bit != 0) {
                got = true;
                k.lanes &= !bit;
                let kind = ReceiptKind::from_u64(k.kind.into()).expect("checked when kept");
                self.write_receipt(conn, kind, k.server_id, k.peer);
            }
            kept.retain(|k| k.lanes != 0);
            let r = &mut self.registry;
            r.receipts_len -= before - kept.len();
            if kept.is_empty() {
                crate::memory::shrink_map(&mut r.receipts);
            } else {
                r.receipts.insert(user, kept);
            }
        }
        got |= self.give_group_receipts(user, conn, bit);
        if got {
            self.registry
                .records
                .push(Record::ReceiptsGot { user, lane });
        }
    }

    /// The group receipts waiting for the device with lane mask `bit` of
    /// `user`, now on `conn`: merged per message and kind (in the order of
    /// each one's first receipt) into GROUP_RECEIPT frames of as many
    /// members as fit. A version 1 device cannot take them: they are
    /// dropped for it. Whether any waited for it.
    fn give_group_receipts(&mut self, user: u64, conn: ConnId, bit: u32) -> bool {
        let Some(mut kept) = self.registry.group_receipts.remove(&user) else {
            return false;
        };
        let v2 = self.slots[conn.index()].version >= proto::VERSION_2;
        let mut merged: Vec<((u8, u64, u64), Vec<u64>)> = Vec::new();
        let mut got = false;
        for k in kept.iter_mut().filter(|k| k.lanes & bit != 0) {
            got = true;
            k.lanes &= !bit;
            if !v2 {
                continue;
            }
            let key = (k.kind, k.group, k.msg);
            match merged.iter_mut().find(|(m, _)| *m == key) {
                Some((_, members)) => members.extend_from_slice(&k.members),
                None => merged.push((key, k.members.to_vec())),
            }
        }
        let r = &mut self.registry;
        kept.retain(|k| {
            if k.lanes == 0 {
                r.receipts_len -= k.members.len();
            }
            k.lanes != 0
        });
        if kept.is_empty() {
            crate::memory::shrink_map(&mut r.group_receipts);
        } else {
            r.group_receipts.insert(user, kept);
        }
        for ((kind, group, msg), members) in merged {
            let kind = ReceiptKind::from_u64(kind.into()).expect("checked when kept");
            self.write_group_receipts(conn, kind, group, msg, &members);
        }
        got
    }

    /// A group receipt for `user` (homed here) naming `peers`, already
    /// written to its version 2 devices online: kept (durably) for its
    /// registered devices that are offline, up to `queue_len_max` receipts
    /// (one per member) per user with the 1:1 ones. Members kept already
    /// for the same message and kind (sent again by an outbox) are not
    /// kept twice.
    pub(super) fn keep_group_receipt(
        &mut self,
        user: u64,
        kind: ReceiptKind,
        group: u64,
        msg: u64,
        peers: &[u64],
    ) {
        let lanes = self.waiting_lanes(user);
        if lanes == 0 || peers.is_empty() {
            return;
        }
        let held = self.receipts_kept(user);
        let kind = kind as u8;
        let r = &mut self.registry;
        let kept = r.group_receipts.entry(user).or_default();
        let same: Vec<&KeptGroup> = kept
            .iter()
            .filter(|k| (k.kind, k.group, k.msg) == (kind, group, msg))
            .collect();
        let mut fresh: Vec<u64> = if same.is_empty() {
            peers.to_vec()
        } else {
            let had: std::collections::HashSet<u64> = same
                .iter()
                .flat_map(|k| k.members.iter().copied())
                .collect();
            peers.iter().copied().filter(|p| !had.contains(p)).collect()
        };
        let room = self.config.queue_len_max.saturating_sub(held);
        if fresh.len() > room {
            self.stats.receipts_dropped.add((fresh.len() - room) as u64);
            fresh.truncate(room);
        }
        for members in fresh.chunks(GROUP_KEPT_MEMBERS_MAX) {
            let k = KeptGroup {
                kind,
                lanes,
                group,
                msg,
                members: members.into(),
            };
            r.receipts_len += members.len();
            r.records.push(Record::GroupKept {
                user,
                kept: k.clone(),
            });
            kept.push(k);
        }
        if kept.is_empty() {
            r.group_receipts.remove(&user);
        }
    }

    /// The registered devices of `user` that are offline, with their
    /// lanes: `(device, lane)`. A user nobody is registered to is named as
    /// device 0 on lane 0 when it is offline.
    pub(super) fn offline_devices(&self, user: u64) -> Vec<(u32, u8)> {
        let online = self.users.lanes(user);
        match self.registry.devices.get(&user) {
            Some(devs) => devs
                .iter()
                .filter(|d| online & (1 << d.lane) == 0)
                .map(|d| (d.device, d.lane))
                .collect(),
            None if online == 0 => vec![(0, 0)],
            None => Vec::new(),
        }
    }

    /// What waits in `user`'s queue for the device on `lane`: the number
    /// of messages it has not answered and the oldest one's time.
    pub(super) fn waiting_for(&self, user: u64, lane: u8) -> Option<(usize, u64)> {
        let bit = 1u32 << lane;
        let marks = self.registry.marks.get(&user);
        let answered = |id: u64| marks.and_then(|m| m.get(&id)).is_some_and(|m| m & bit != 0);
        let mut oldest = None;
        self.store.each_after(user, 0, &mut |m| {
            if answered(m.server_id) {
                return true;
            }
            oldest = Some(m.time_ms);
            false
        });
        let done = marks.map_or(0, |m| m.values().filter(|&&m| m & bit != 0).count());
        oldest.map(|t| (self.store.len(user).saturating_sub(done), t))
    }

    /// One bounded pass of the idle expiry: looks at up to `budget` users
    /// of the registry and drops their devices not online for longer than
    /// `device_idle_days_max`, as a removal does (their copies go with
    /// them). The next pass goes on where this one stopped.
    pub(super) fn expire_devices(&mut self, now: Now, budget: usize) {
        let idle_ms = self.config.device_idle_ms();
        let len = self.registry.devices.len();
        if idle_ms == 0 || len == 0 {
            return;
        }
        if self.registry.cursor >= len {
            self.registry.cursor = 0;
        }
        let mut due = Vec::new();
        for (&user, devs) in self
            .registry
            .devices
            .iter()
            .skip(self.registry.cursor)
            .take(budget)
        {
            let online = self.users.lanes(user);
            for d in devs {
                if online & (1 << d.lane) == 0 && now.unix_ms.saturating_sub(d.last_ms) > idle_ms {
                    due.push((user, d.device));
                }
            }
        }
        self.registry.cursor += budget;
        for (user, device) in due {
            if self.unregister(user, device.into()).is_some() {
                log::info!(
                    "shard {}: device {device} of user {user} expired (not online for {} days, \
                     device_idle_days_max)",
                    self.id,
                    self.config.device_idle_days_max
                );
                self.stats.devices_expired.inc();
                self.tell_removed(user, device.into());
            }
        }
    }

    /// DEVICE_REMOVED(`device`) to the user's version 2 devices online.
    pub(super) fn tell_removed(&mut self, user: u64, device: u64) {
        for conn in self.conns_of(user) {
            if self.slots[conn.index()].version >= proto::VERSION_2 {
                self.write(conn, &Frame::DeviceRemoved { device });
            }
        }
    }
}
