//! Cluster: a user's state as it is kept in JetStream (`cluster::state`,
//! docs/CLUSTER.md "Per-user state across nodes"): read here to publish
//! it, installed here when a partition's new owner replays it.

use crate::cluster::state::UserState;
use crate::shard::Msg;
use crate::store::devices::{Dev, KeptGroup};

use super::{Action, Sessions};

impl Sessions {
    /// `user`'s registered devices, waiting receipts, last seen and
    /// privacy, as the state stream keeps them (marks are not kept: a
    /// device that answered a message may get it again after a move, with
    /// the same server id).
    pub fn user_state(&self, user: u64) -> UserState {
        let devices = match self.registry.devices.get(&user) {
            Some(devs) => devs.clone(),
            // Online alone: its session holds its device and lane.
            None => self
                .users
                .first(user)
                .map(|on| Dev {
                    device: self.slots[on.conn.index()].device,
                    lane: on.lane,
                    last_ms: self.now_ms,
                })
                .into_iter()
                .collect(),
        };
        UserState {
            devices,
            receipts: self
                .registry
                .receipts
                .get(&user)
                .cloned()
                .unwrap_or_default(),
            group_receipts: self
                .registry
                .group_receipts
                .get(&user)
                .cloned()
                .unwrap_or_default(),
            seen: self.presence.seen.get(&user).copied().unwrap_or_default(),
        }
    }

    /// Installs `state` for `user`, replayed by the bridge when this node
    /// claimed its partition. What this shard remembered of the user from
    /// an earlier time it served the partition is replaced; a user online
    /// here already (it cannot be before its partition is served) is left
    /// as it is.
    pub(super) fn restore_user(&mut self, user: u64, state: UserState) {
        if self.users.first(user).is_some() {
            log::warn!("state replayed for user {user}, online here already: kept as it is");
            return;
        }
        let UserState {
            devices,
            receipts,
            group_receipts,
            seen,
        } = state;
        let r = &mut self.registry;
        r.marks.remove(&user);
        if devices.is_empty() {
            r.devices.remove(&user);
        } else {
            r.devices.insert(user, devices);
        }
        let members = |kept: &[KeptGroup]| kept.iter().map(|k| k.members.len()).sum::<usize>();
        let before = r.receipts.get(&user).map_or(0, Vec::len)
            + r.group_receipts.get(&user).map_or(0, |k| members(k));
        r.receipts_len = r.receipts_len - before + receipts.len() + members(&group_receipts);
        if receipts.is_empty() {
            r.receipts.remove(&user);
        } else {
            r.receipts.insert(user, receipts);
        }
        if group_receipts.is_empty() {
            r.group_receipts.remove(&user);
        } else {
            r.group_receipts.insert(user, group_receipts);
        }
        if seen == Default::default() {
            self.presence.seen.remove(&user);
        } else {
            self.presence.seen.insert(user, seen);
        }
        self.stats
            .receipts_waiting
            .set(self.registry.receipts_len as u64);
    }

    /// A replay's end reached this shard: everything it restored before
    /// is in place; tell the bridge.
    pub(super) fn replayed(&mut self, token: u64) {
        self.actions.push(Action::Cluster(Msg::Replayed { token }));
    }
}
