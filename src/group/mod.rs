//! Groups (protocol v2, docs/PROTOCOL.md "Groups"): the state a group's
//! home shard keeps and the rules of every change. Pure: no I/O, no
//! clock; the session layer asks, this answers with what changed (the
//! records to make durable, the event to announce) or why not.
//!
//! A group's home shard is `home_shard(group id)`. It holds the member
//! list (user, admin flag), the group's order counter, and per shard the
//! members homed there (cached, what a fan-out carries across the ring).
//! A user's group count, for `groups_per_user_max`, is kept per shard: the
//! groups homed on this shard the user is in.
//!
//! GROUP_SEND is exactly once: the home shard keeps a dedupe window per
//! sender device, like a 1:1 SEND's (`store::window`, the same 32 client
//! ids up to the highest taken, over the GROUP_SENDs to the groups homed
//! here), each entry naming the group, the message's number and time. A
//! retry gets the original number and time; below the window it is
//! refused. Each entry is 32 bytes, so a sender device costs a shard it
//! sent group messages to about 1 KiB once it sent 32 (and 53 bytes of
//! `Sent` record per entry in the group log after a rewrite).

pub mod envelope;

use std::collections::BTreeMap;
use std::sync::Arc;

use foldhash::HashMap;

use crate::proto::{ErrorCode, GroupEvent};
use crate::shard::home_shard;
use crate::store::groups::Record;
use crate::store::window::{Taken, Windows};
use crate::store::{Origin, Seen};

/// One group, on its home shard.
#[derive(Clone, Debug, Default)]
pub struct Group {
    /// Members and whether each is an admin, by user id (sorted, so a
    /// member list and its fan-out are in a stable order).
    members: BTreeMap<u64, bool>,
    /// Admins among `members`; at least 1 while the group has members.
    admins: u32,
    /// The last number of the group's order given (messages and events).
    last_msg: u64,
    /// Per shard, the members homed there; `None` until a fan-out needs
    /// it, dropped at every change of membership.
    by_shard: Option<Arc<[Arc<[u64]>]>>,
}

impl Group {
    /// Whether `user` is a member.
    pub fn is_member(&self, user: u64) -> bool {
        self.members.contains_key(&user)
    }

    /// Whether `user` is an admin.
    pub fn is_admin(&self, user: u64) -> bool {
        self.members.get(&user) == Some(&true)
    }

    /// The members, by user id, with their admin flag.
    pub fn members(&self) -> impl ExactSizeIterator<Item = (u64, bool)> + '_ {
        self.members.iter().map(|(&u, &a)| (u, a))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no member (it is being deleted).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The last number of the group's order given.
    pub fn last_msg(&self) -> u64 {
        self.last_msg
    }

    /// Per shard of `shards`, the members homed there (empty slices for
    /// shards homing none). Built once per membership, shared by every
    /// fan-out until the next change.
    pub fn by_shard(&mut self, shards: usize) -> Arc<[Arc<[u64]>]> {
        if let Some(b) = &self.by_shard {
            if b.len() == shards {
                return b.clone();
            }
        }
        let mut lists = vec![Vec::new(); shards];
        for &user in self.members.keys() {
            lists[home_shard(user, shards)].push(user);
        }
        let built: Arc<[Arc<[u64]>]> = lists.into_iter().map(Arc::from).collect();
        self.by_shard = Some(built.clone());
        built
    }

    fn set(&mut self, user: u64, admin: bool) {
        let was = self.members.insert(user, admin);
        if was == Some(true) {
            self.admins -= 1;
        }
        if admin {
            self.admins += 1;
        }
        self.by_shard = None;
    }

    fn unset(&mut self, user: u64) -> bool {
        let Some(was) = self.members.remove(&user) else {
            return false;
        };
        if was {
            self.admins -= 1;
        }
        self.by_shard = None;
        true
    }
}

/// A change the rules allowed: the records that make it durable (already
/// applied to the state) and, unless nothing changed, the event that
/// announces it, in the group's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The group.
    pub group: u64,
    /// The event and its number in the group's order; `None`: nothing
    /// changed (adding a member again).
    pub event: Option<(GroupEvent, u64)>,
    /// Who made it.
    pub actor: u64,
    /// Whom it is about.
    pub subject: u64,
    /// Who gets the event: the members after the change, and the user
    /// removed or leaving.
    pub audience: Vec<u64>,
}

/// Why the rules refused a request: the ERROR code and its text.
pub type Refusal = (ErrorCode, &'static str);

/// A GROUP_SEND the rules allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Taken now as message `msg`: its `Message` and `Sent` records are
    /// staged (the window entry is in already).
    New {
        /// Its number in the group's order.
        msg: u64,
    },
    /// A retry of one taken before: the original ACK's number and time;
    /// nothing to store or fan out.
    Again {
        /// The original number in the group's order.
        msg: u64,
        /// The original time, ms since the Unix epoch.
        time_ms: u64,
    },
}

/// The groups homed on one shard, and the limits on them.
#[derive(Debug)]
pub struct Groups {
    groups: HashMap<u64, Group>,
    /// Per user, the groups of this shard it is in (entries only for
    /// users in at least one).
    per_user: HashMap<u64, u32>,
    /// The highest group id this shard ever gave (ids are never reused).
    last_id: u64,
    /// Per sender device, the GROUP_SENDs taken among the last
    /// [`crate::store::WINDOW`] client ids: the message's number as the
    /// server id, its group as the location.
    windows: Windows<u64>,
    shard: usize,
    shards: usize,
    members_max: usize,
    per_user_max: usize,
}

impl Groups {
    /// No groups, on shard `shard` of `shards`, with the limits
    /// `group_members_max` and `groups_per_user_max`.
    pub fn new(shard: usize, shards: usize, members_max: usize, per_user_max: usize) -> Groups {
        assert!(shard < shards);
        Groups {
            groups: HashMap::default(),
            per_user: HashMap::default(),
            last_id: 0,
            windows: Windows::default(),
            shard,
            shards,
            members_max,
            per_user_max,
        }
    }

    /// The group `id`, if this shard homes it.
    pub fn get(&self, id: u64) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// The group `id`, if this shard homes it, to build its fan-out lists.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Group> {
        self.groups.get_mut(&id)
    }

    /// Groups homed here.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether no group is homed here.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Memberships of the groups homed here.
    pub fn memberships(&self) -> usize {
        self.groups.values().map(Group::len).sum()
    }

    /// The groups of this shard `user` is in.
    pub fn count_of(&self, user: u64) -> usize {
        self.per_user.get(&user).map_or(0, |&n| n as usize)
    }

    /// A member, for a request about `group` from `user`.
    fn member(&self, group: u64, user: u64) -> Result<&Group, Refusal> {
        let g = self
            .groups
            .get(&group)
            .ok_or((ErrorCode::UnknownGroup, "no such group"))?;
        if !g.is_member(user) {
            return Err((ErrorCode::NotMember, "not a member of the group"));
        }
        Ok(g)
    }

    /// An admin, for a change of `group` by `actor`.
    fn admin(&self, group: u64, actor: u64) -> Result<(), Refusal> {
        if !self.member(group, actor)?.is_admin(actor) {
            return Err((ErrorCode::NotAdmin, "only an admin may do this"));
        }
        Ok(())
    }

    /// The members of `group`, for `user`, a member.
    pub fn members_for(&self, group: u64, user: u64) -> Result<&Group, Refusal> {
        self.member(group, user)
    }

    /// GROUP_CREATE by `creator`: a new group homed here, `creator` its
    /// admin. The id is the next one above every id given whose home is
    /// this shard (about `shards` tries).
    pub fn create(&mut self, creator: u64, out: &mut Vec<Record>) -> Result<Change, Refusal> {
        let mut id = self.last_id + 1;
        // Bounded: a hash spreads consecutive ids over the shards, so one
        // of about `shards` is ours; a 64-bit space never runs out here.
        while home_shard(id, self.shards) != self.shard {
            id += 1;
        }
        self.create_as(id, creator, out)
    }

    /// GROUP_CREATE by `creator` of the group `id`, given by the caller
    /// (a cluster node's, unique in the cluster: `cluster::groups`). An
    /// id already in use here is refused.
    pub fn create_as(
        &mut self,
        id: u64,
        creator: u64,
        out: &mut Vec<Record>,
    ) -> Result<Change, Refusal> {
        if self.count_of(creator) >= self.per_user_max {
            return Err((ErrorCode::TooManyGroups, "in too many groups"));
        }
        if id == 0 || self.groups.contains_key(&id) {
            return Err((ErrorCode::UnknownGroup, "that group id is taken"));
        }
        let record = Record::Created { group: id, creator };
        self.apply(&record);
        out.push(record);
        Ok(self.changed(id, GroupEvent::Created, creator, creator, None))
    }

    /// GROUP_ADD of `user` to `group` by `actor`, an admin.
    pub fn add(
        &mut self,
        group: u64,
        actor: u64,
        user: u64,
        out: &mut Vec<Record>,
    ) -> Result<Change, Refusal> {
        self.admin(group, actor)?;
        let g = &self.groups[&group];
        if g.is_member(user) {
            return Ok(Change {
                group,
                event: None,
                actor,
                subject: user,
                audience: Vec::new(),
            });
        }
        if user == 0 {
            return Err((ErrorCode::BadRecipient, "user 0 does not exist"));
        }
        if g.len() >= self.members_max {
            return Err((
                ErrorCode::GroupFull,
                "the group is full (group_members_max)",
            ));
        }
        if self.count_of(user) >= self.per_user_max {
            return Err((ErrorCode::TooManyGroups, "the user is in too many groups"));
        }
        let record = Record::Added { group, user };
        self.apply(&record);
        out.push(record);
        Ok(self.changed(group, GroupEvent::Added, actor, user, None))
    }

    /// GROUP_REMOVE of `user` from `group` by `actor`, an admin.
    pub fn remove(
        &mut self,
        group: u64,
        actor: u64,
        user: u64,
        out: &mut Vec<Record>,
    ) -> Result<Change, Refusal> {
        self.admin(group, actor)?;
        let g = &self.groups[&group];
        if !g.is_member(user) {
            return Err((ErrorCode::NoSuchMember, "the user is not a member"));
        }
        if g.is_admin(user) && g.admins == 1 && g.len() > 1 {
            return Err((ErrorCode::LastAdmin, "the group's last admin stays"));
        }
        let record = Record::Removed { group, user };
        self.apply(&record);
        out.push(record);
        Ok(self.changed(group, GroupEvent::Removed, actor, user, Some(user)))
    }

    /// GROUP_LEAVE of `group` by `user`, a member. The last member leaving
    /// deletes the group.
    pub fn leave(
        &mut self,
        group: u64,
        user: u64,
        out: &mut Vec<Record>,
    ) -> Result<Change, Refusal> {
        let g = self.member(group, user)?;
        if g.is_admin(user) && g.admins == 1 && g.len() > 1 {
            return Err((
                ErrorCode::LastAdmin,
                "the last admin may not leave: make another member admin first",
            ));
        }
        let record = Record::Removed { group, user };
        self.apply(&record);
        out.push(record);
        Ok(self.changed(group, GroupEvent::Left, user, user, Some(user)))
    }

    /// GROUP_ADMIN: `actor`, an admin, makes `user` an admin of `group` or
    /// revokes it.
    pub fn set_admin(
        &mut self,
        group: u64,
        actor: u64,
        user: u64,
        admin: bool,
        out: &mut Vec<Record>,
    ) -> Result<Change, Refusal> {
        self.admin(group, actor)?;
        let g = &self.groups[&group];
        let Some(&was) = g.members.get(&user) else {
            return Err((ErrorCode::NoSuchMember, "the user is not a member"));
        };
        if was == admin {
            return Ok(Change {
                group,
                event: None,
                actor,
                subject: user,
                audience: Vec::new(),
            });
        }
        if was && g.admins == 1 {
            return Err((ErrorCode::LastAdmin, "the group's last admin stays"));
        }
        let record = Record::Admin { group, user, admin };
        self.apply(&record);
        out.push(record);
        let event = if admin {
            GroupEvent::Admin
        } else {
            GroupEvent::Unadmin
        };
        Ok(self.changed(group, event, actor, user, None))
    }

    /// GROUP_SEND `origin` from `from` to `group` at `time_ms`: new if
    /// `from` is a member and the client_id was not taken (its records
    /// staged in `out`), the original answer of a retry, or refused
    /// (`stale_client_id` below the window, or for a client_id taken by a
    /// message to another group).
    pub fn send(
        &mut self,
        group: u64,
        from: u64,
        origin: Origin,
        time_ms: u64,
        body: Arc<[u8]>,
        out: &mut Vec<Record>,
    ) -> Result<Sent, Refusal> {
        // Before the membership: a sender removed since its message was
        // taken still gets that message's ACK.
        match self.windows.seen(from, origin) {
            Seen::New => {}
            Seen::Taken { server_id, time_ms } => {
                let taken = self.windows.get(from, origin).map(|t| t.loc);
                if taken != Some(group) {
                    return Err((
                        ErrorCode::StaleClientId,
                        "client_id already used for another group's message",
                    ));
                }
                return Ok(Sent::Again {
                    msg: server_id,
                    time_ms,
                });
            }
            Seen::Stale { .. } => {
                return Err((
                    ErrorCode::StaleClientId,
                    "client_id is 32 or more below the highest taken from this device",
                ));
            }
        }
        self.member(group, from)?;
        let g = self.groups.get_mut(&group).expect("checked");
        g.last_msg += 1;
        let msg = g.last_msg;
        out.push(Record::Message {
            group,
            msg,
            from,
            time_ms,
            client_id: origin.client_id,
            event: None,
            subject: 0,
            body,
        });
        let sent = Record::Sent {
            group,
            msg,
            from,
            time_ms,
            client_id: origin.client_id,
            device: origin.device,
        };
        self.apply(&sent);
        out.push(sent);
        Ok(Sent::New { msg })
    }

    /// A change made: its number in the order, and its audience (the
    /// members now, plus `gone`).
    fn changed(
        &mut self,
        group: u64,
        event: GroupEvent,
        actor: u64,
        subject: u64,
        gone: Option<u64>,
    ) -> Change {
        let Some(g) = self.groups.get_mut(&group) else {
            // The last member left: the group is gone, nobody to tell.
            return Change {
                group,
                event: None,
                actor,
                subject,
                audience: Vec::new(),
            };
        };
        g.last_msg += 1;
        let mut audience: Vec<u64> = g.members.keys().copied().collect();
        audience.extend(gone);
        Change {
            group,
            event: Some((event, g.last_msg)),
            actor,
            subject,
            audience,
        }
    }

    /// Applies one record (a change made now, or replayed from the log).
    pub fn apply(&mut self, record: &Record) {
        // Every record names a group id this shard gave: never given again.
        self.last_id = self.last_id.max(record.group());
        match *record {
            Record::Created { group, creator } => {
                let g = self.groups.entry(group).or_default();
                if !g.is_member(creator) {
                    *self.per_user.entry(creator).or_default() += 1;
                }
                g.set(creator, true);
            }
            Record::Added { group, user } => {
                let g = self.groups.entry(group).or_default();
                if !g.is_member(user) {
                    *self.per_user.entry(user).or_default() += 1;
                }
                g.set(user, false);
            }
            Record::Removed { group, user } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                if g.unset(user) {
                    if let Some(n) = self.per_user.get_mut(&user) {
                        *n -= 1;
                        if *n == 0 {
                            self.per_user.remove(&user);
                        }
                    }
                }
                if g.is_empty() {
                    self.groups.remove(&group);
                }
            }
            Record::Admin { group, user, admin } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    if g.is_member(user) {
                        g.set(user, admin);
                    }
                }
            }
            Record::Message { group, msg, .. }
            | Record::Order {
                group,
                last_msg: msg,
            } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.last_msg = g.last_msg.max(msg);
                }
            }
            Record::FannedOut { .. } => {}
            Record::Sent {
                group,
                msg,
                from,
                time_ms,
                client_id,
                device,
            } => {
                let taken = Taken {
                    client_id,
                    server_id: msg,
                    time_ms,
                    loc: group,
                };
                self.windows
                    .insert(from, Origin { device, client_id }, taken);
                self.windows.prune(from, device, |_| {});
            }
        }
    }

    /// The records that rebuild the whole state (a rewrite of the log):
    /// per group, its creation by its first admin, its other members, its
    /// admins, and its order counter; then every dedupe window entry.
    pub fn snapshot(&self, out: &mut Vec<Record>) {
        for (&group, g) in &self.groups {
            Self::group_records(group, g, out);
        }
        if self.last_id > 0 && !self.groups.contains_key(&self.last_id) {
            // A deleted group's id stays given: an `Order` record of a
            // group that does not exist only keeps its id from reuse.
            out.push(Record::Order {
                group: self.last_id,
                last_msg: 0,
            });
        }
        for (from, origin, t) in self.windows.iter() {
            out.push(Record::Sent {
                group: t.loc,
                msg: t.server_id,
                from,
                time_ms: t.time_ms,
                client_id: origin.client_id,
                device: origin.device,
            });
        }
    }

    /// The records that rebuild `group` alone (nothing if it does not
    /// exist): as [`Groups::snapshot`] writes it, then the dedupe window
    /// entries of messages to it. A cluster node keeps each group's state
    /// apart (`cluster::groups::State`).
    pub fn snapshot_group(&self, group: u64, out: &mut Vec<Record>) {
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        Self::group_records(group, g, out);
        for (from, origin, t) in self.windows.iter() {
            if t.loc == group {
                out.push(Record::Sent {
                    group,
                    msg: t.server_id,
                    from,
                    time_ms: t.time_ms,
                    client_id: origin.client_id,
                    device: origin.device,
                });
            }
        }
    }

    /// `group`'s creation by its first admin, its other members, its
    /// admins, and its order counter.
    fn group_records(group: u64, g: &Group, out: &mut Vec<Record>) {
        let Some((&first, _)) = g.members.iter().find(|(_, &a)| a) else {
            return; // never: a group with members has an admin
        };
        out.push(Record::Created {
            group,
            creator: first,
        });
        for (&user, &admin) in &g.members {
            if user == first {
                continue;
            }
            out.push(Record::Added { group, user });
            if admin {
                out.push(Record::Admin { group, user, admin });
            }
        }
        out.push(Record::Order {
            group,
            last_msg: g.last_msg,
        });
    }
}

#[cfg(test)]
mod tests;
