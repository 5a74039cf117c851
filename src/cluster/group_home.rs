//! The home of a partition's groups on the node that owns the partition
//! (docs/CLUSTER.md, "Groups across nodes"): the pure step from one
//! request record, in stream order, to what the node must do about it.
//! The rules are those of one box (`crate::group::Groups`); what this
//! adds is the cluster's crash story.
//!
//! The node takes a group's requests one at a time, and for each does,
//! in this order: write [`Outcome::write`] to the bucket with the
//! revision it read (refused: the partition has another owner, stop);
//! publish a copy of [`Outcome::ordered`] to each of [`Outcome::audience`]
//! (deduplicated by `copy_msg_id`); answer the actor; ack the record.
//! So a crash anywhere leaves the group's last written request, and only
//! it, possibly half published, and its record unacked: the new owner
//! gets it again with the sequence the state names (`applied_seq`) and
//! publishes its copies again, to the members the state holds, which are
//! the members it was ordered with (nothing later was applied).

use foldhash::HashMap;

use crate::group::{Change, Groups, Sent};
use crate::proto::{ErrorCode, GroupEvent};
use crate::store::Origin;

use super::groups::{group_id, home_of, Op, Ordered, Request, State};

/// What the actor of a request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// GROUP_OK naming the group.
    Ok {
        /// The group.
        group: u64,
    },
    /// ACK of a GROUP_SEND.
    Ack {
        /// The message's number in the group's order.
        msg: u64,
        /// When the home ordered it, ms since the Unix epoch.
        time_ms: u64,
    },
    /// ERROR naming the request.
    Refused {
        /// Why.
        code: ErrorCode,
        /// The ERROR's text.
        text: &'static str,
    },
    /// GROUP_LIST frames.
    List {
        /// The group.
        group: u64,
        /// Members and their admin flag.
        members: Vec<(u64, bool)>,
    },
}

/// What to do about one request, in the order of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The group's new state and its key's group, written before
    /// anything else leaves (a state without records: the group is gone,
    /// a tombstone that keeps a redelivered create from making it again).
    pub write: Option<(u64, State)>,
    /// The message or membership event ordered, if any.
    pub ordered: Option<Ordered>,
    /// Who gets a copy of it.
    pub audience: Vec<u64>,
    /// The answer; `None` for a request done before (its answer left
    /// then, or was lost with the connection it named).
    pub answer: Option<Answer>,
}

/// The groups one partition homes.
#[derive(Debug)]
pub struct Home {
    partition: u32,
    partitions: u32,
    groups: Groups,
    /// Per group, the stream sequence of the last request written.
    applied: HashMap<u64, u64>,
}

impl Home {
    /// No groups yet, for `partition` of `partitions`, with the limits
    /// `group_members_max` and `groups_per_user_max` (the latter counted
    /// over the groups this partition homes, as one box counts per shard).
    pub fn new(partition: u32, partitions: u32, members_max: usize, per_user_max: usize) -> Home {
        Home {
            partition,
            partitions,
            groups: Groups::new(0, 1, members_max, per_user_max),
            applied: HashMap::default(),
        }
    }

    /// Takes a group's state as read from the bucket (when the partition
    /// is claimed, before its first request).
    pub fn load(&mut self, group: u64, state: &State) {
        for r in &state.records {
            self.groups.apply(r);
        }
        self.applied.insert(group, state.applied_seq);
    }

    /// Whether `group` is homed here (its state read, and not deleted).
    pub fn has(&self, group: u64) -> bool {
        self.groups.get(group).is_some()
    }

    /// Groups homed here (tombstones not counted).
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether no group is homed here.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The request `op`, the record at `seq` of its stream, taken at
    /// `now_ms`.
    pub fn request(&mut self, seq: u64, op: &Op, now_ms: u64) -> Outcome {
        let group = if op.request == Request::Create {
            match group_id(self.partition, seq, self.partitions) {
                Some(id) => id,
                None => return refused(ErrorCode::Unavailable, "no group id left"),
            }
        } else {
            op.group
        };
        if home_of(group, self.partitions) != self.partition {
            // Published to a partition that does not home it: no client
            // of ours does that.
            return refused(ErrorCode::UnknownGroup, "no such group");
        }
        let applied = self.applied.get(&group).copied().unwrap_or(0);
        if seq < applied {
            return Outcome::default();
        }
        if seq == applied {
            return self.again(group, op, now_ms);
        }
        let origin = Origin {
            device: op.device,
            client_id: op.id,
        };
        let mut records = Vec::new();
        let g = &mut self.groups;
        let done = match &op.request {
            Request::Create => g.create_as(group, op.actor, &mut records),
            Request::Add { user } => g.add(group, op.actor, *user, &mut records),
            Request::Remove { user } => g.remove(group, op.actor, *user, &mut records),
            Request::Leave => g.leave(group, op.actor, &mut records),
            Request::Admin { user, admin } => {
                g.set_admin(group, op.actor, *user, *admin, &mut records)
            }
            Request::Members => {
                return match g.members_for(group, op.actor) {
                    Ok(found) => Outcome {
                        answer: Some(Answer::List {
                            group,
                            members: found.members().collect(),
                        }),
                        ..Outcome::default()
                    },
                    Err((code, text)) => refused(code, text),
                };
            }
            Request::Send { body } => {
                let shared = body.to_vec().into();
                return match g.send(group, op.actor, origin, now_ms, shared, &mut records) {
                    Ok(Sent::New { msg }) => {
                        let audience = self.members(group);
                        Outcome {
                            write: Some((group, self.state(group, seq))),
                            ordered: Some(message(group, msg, op, body, now_ms)),
                            audience,
                            answer: Some(Answer::Ack {
                                msg,
                                time_ms: now_ms,
                            }),
                        }
                    }
                    // A retry of a message written by an earlier request.
                    Ok(Sent::Again { msg, time_ms }) => Outcome {
                        answer: Some(Answer::Ack { msg, time_ms }),
                        ..Outcome::default()
                    },
                    Err((code, text)) => refused(code, text),
                };
            }
        };
        match done {
            Err((code, text)) => refused(code, text),
            // Nothing changed (adding a member again): nothing to write.
            Ok(Change { event: None, .. }) if records.is_empty() => Outcome {
                answer: Some(Answer::Ok { group }),
                ..Outcome::default()
            },
            Ok(change) => {
                let ordered = change.event.map(|(event, msg)| Ordered {
                    group,
                    msg,
                    from: change.actor,
                    time_ms: now_ms,
                    client_id: 0,
                    event: Some(event),
                    subject: change.subject,
                    body: Box::default(),
                });
                Outcome {
                    write: Some((group, self.state(group, seq))),
                    ordered,
                    audience: change.audience,
                    answer: Some(Answer::Ok { group }),
                }
            }
        }
    }

    /// A request redelivered with the sequence its group's state names:
    /// written, perhaps not all published. Its copies again (to the
    /// members now, those it was ordered with) and its answer again.
    fn again(&mut self, group: u64, op: &Op, now_ms: u64) -> Outcome {
        let Some(g) = self.groups.get(group) else {
            return Outcome::default(); // its group is gone since: nobody to tell
        };
        let last = g.last_msg();
        let members = self.members(group);
        let event = |event, subject, gone: Option<u64>| {
            let mut audience = members.clone();
            audience.extend(gone);
            let ordered = Ordered {
                group,
                msg: last,
                from: op.actor,
                time_ms: now_ms,
                client_id: 0,
                event: Some(event),
                subject,
                body: Box::default(),
            };
            Outcome {
                write: None,
                ordered: Some(ordered),
                audience,
                answer: Some(Answer::Ok { group }),
            }
        };
        match &op.request {
            Request::Create => event(GroupEvent::Created, op.actor, None),
            Request::Add { user } => event(GroupEvent::Added, *user, None),
            Request::Remove { user } => event(GroupEvent::Removed, *user, Some(*user)),
            Request::Leave => event(GroupEvent::Left, op.actor, Some(op.actor)),
            Request::Admin { user, admin: true } => event(GroupEvent::Admin, *user, None),
            Request::Admin { user, admin: false } => event(GroupEvent::Unadmin, *user, None),
            // Never written, so never at the state's sequence.
            Request::Members => Outcome::default(),
            Request::Send { body } => {
                let origin = Origin {
                    device: op.device,
                    client_id: op.id,
                };
                let mut records = Vec::new();
                let sent = self.groups.send(
                    group,
                    op.actor,
                    origin,
                    now_ms,
                    body.to_vec().into(),
                    &mut records,
                );
                let Ok(Sent::Again { msg, time_ms }) = sent else {
                    // The state names this request, so its window does.
                    return Outcome::default();
                };
                Outcome {
                    write: None,
                    ordered: Some(message(group, msg, op, body, time_ms)),
                    audience: members,
                    answer: Some(Answer::Ack { msg, time_ms }),
                }
            }
        }
    }

    /// The members of `group`, by user id.
    fn members(&self, group: u64) -> Vec<u64> {
        self.groups
            .get(group)
            .map(|g| g.members().map(|(u, _)| u).collect())
            .unwrap_or_default()
    }

    /// `group`'s state to write, as of the request at `seq`.
    fn state(&mut self, group: u64, seq: u64) -> State {
        self.applied.insert(group, seq);
        let mut records = Vec::new();
        self.groups.snapshot_group(group, &mut records);
        State {
            applied_seq: seq,
            records,
        }
    }
}

/// A refusal: nothing written, nothing sent, the ERROR.
fn refused(code: ErrorCode, text: &'static str) -> Outcome {
    Outcome {
        answer: Some(Answer::Refused { code, text }),
        ..Outcome::default()
    }
}

/// The message `msg` of `op`, a GROUP_SEND of `body`, ordered at
/// `time_ms`.
fn message(group: u64, msg: u64, op: &Op, body: &[u8], time_ms: u64) -> Ordered {
    Ordered {
        group,
        msg,
        from: op.actor,
        time_ms,
        client_id: op.id,
        event: None,
        subject: 0,
        body: body.into(),
    }
}

#[cfg(test)]
mod tests;
