//! The rules of groups, without sockets.

use super::*;
use crate::store::WINDOW;

const SHARDS: usize = 2;

fn groups() -> Groups {
    Groups::new(0, SHARDS, 4, 3)
}

/// A group created by 1 with members 2 and 3.
fn with_three(g: &mut Groups, out: &mut Vec<Record>) -> u64 {
    let id = g.create(1, out).unwrap().group;
    g.add(id, 1, 2, out).unwrap();
    g.add(id, 1, 3, out).unwrap();
    id
}

#[test]
fn create_gives_ids_homed_here_and_the_creator_is_admin() {
    let mut out = Vec::new();
    for shard in 0..SHARDS {
        let mut g = Groups::new(shard, SHARDS, 4, 3);
        let mut last = 0;
        for _ in 0..3 {
            let c = g.create(7, &mut out).unwrap();
            assert!(c.group > last, "ids increase");
            last = c.group;
            assert_eq!(home_shard(c.group, SHARDS), shard);
            assert_eq!(c.event, Some((GroupEvent::Created, 1)));
            assert_eq!(c.audience, [7]);
            let grp = g.get(c.group).unwrap();
            assert!(grp.is_admin(7));
            assert_eq!(grp.len(), 1);
        }
        // groups_per_user_max (3) per shard.
        assert_eq!(
            g.create(7, &mut out).unwrap_err().0,
            ErrorCode::TooManyGroups
        );
        assert_eq!(g.count_of(7), 3);
    }
}

#[test]
fn only_admins_change_membership() {
    let mut g = groups();
    let mut out = Vec::new();
    let id = with_three(&mut g, &mut out);
    out.clear();
    assert_eq!(
        g.add(id, 2, 4, &mut out).unwrap_err().0,
        ErrorCode::NotAdmin
    );
    assert_eq!(
        g.remove(id, 2, 3, &mut out).unwrap_err().0,
        ErrorCode::NotAdmin
    );
    assert_eq!(
        g.set_admin(id, 2, 2, true, &mut out).unwrap_err().0,
        ErrorCode::NotAdmin
    );
    assert_eq!(
        g.add(id, 9, 4, &mut out).unwrap_err().0,
        ErrorCode::NotMember
    );
    assert_eq!(
        g.add(99, 1, 4, &mut out).unwrap_err().0,
        ErrorCode::UnknownGroup
    );
    assert!(out.is_empty(), "a refusal writes nothing");
    assert_eq!(g.get(id).unwrap().len(), 3);
    // An admin may; the new admin may too.
    let c = g.set_admin(id, 1, 2, true, &mut out).unwrap();
    assert_eq!(c.event, Some((GroupEvent::Admin, 4)));
    let c = g.remove(id, 2, 3, &mut out).unwrap();
    assert_eq!(c.event, Some((GroupEvent::Removed, 5)));
    // The removed member hears of it too.
    assert_eq!(c.audience, [1, 2, 3]);
    assert!(!g.get(id).unwrap().is_member(3));
    assert_eq!(
        g.remove(id, 1, 3, &mut out).unwrap_err().0,
        ErrorCode::NoSuchMember
    );
}

#[test]
fn adding_again_changes_nothing_and_limits_hold() {
    let mut g = groups();
    let mut out = Vec::new();
    let id = with_three(&mut g, &mut out);
    out.clear();
    let c = g.add(id, 1, 2, &mut out).unwrap();
    assert_eq!(c.event, None);
    assert!(out.is_empty());
    g.add(id, 1, 4, &mut out).unwrap();
    // group_members_max = 4.
    assert_eq!(
        g.add(id, 1, 5, &mut out).unwrap_err().0,
        ErrorCode::GroupFull
    );
    assert_eq!(
        g.add(id, 1, 0, &mut out).unwrap_err().0,
        ErrorCode::BadRecipient
    );
    // groups_per_user_max = 3: user 9 in three groups of this shard.
    let mut g = groups();
    let other = g.create(1, &mut out).unwrap().group;
    for _ in 0..3 {
        g.create(9, &mut out).unwrap();
    }
    assert_eq!(g.count_of(9), 3);
    assert_eq!(
        g.add(other, 1, 9, &mut out).unwrap_err().0,
        ErrorCode::TooManyGroups
    );
}

#[test]
fn the_last_admin_stays_while_others_remain() {
    let mut g = groups();
    let mut out = Vec::new();
    let id = with_three(&mut g, &mut out);
    assert_eq!(
        g.leave(id, 1, &mut out).unwrap_err().0,
        ErrorCode::LastAdmin
    );
    assert_eq!(
        g.set_admin(id, 1, 1, false, &mut out).unwrap_err().0,
        ErrorCode::LastAdmin
    );
    assert_eq!(
        g.leave(id, 9, &mut out).unwrap_err().0,
        ErrorCode::NotMember
    );
    let c = g.leave(id, 2, &mut out).unwrap();
    assert_eq!(c.event, Some((GroupEvent::Left, 4)));
    assert_eq!(c.audience, [1, 3, 2]);
    g.set_admin(id, 1, 3, true, &mut out).unwrap();
    g.set_admin(id, 3, 1, false, &mut out).unwrap();
    g.leave(id, 1, &mut out).unwrap();
    // The last member leaving deletes the group, unannounced; its id is
    // not reused.
    assert_eq!(g.leave(id, 3, &mut out).unwrap().event, None);
    assert!(g.get(id).is_none());
    assert_eq!(g.count_of(3), 0);
    let next = g.create(3, &mut out).unwrap().group;
    assert!(next > id);
}

/// GROUP_SEND `client_id` from device 0 of `from`, at time `client_id`.
fn send(g: &mut Groups, group: u64, from: u64, client_id: u64) -> Result<Sent, Refusal> {
    let origin = Origin {
        device: 0,
        client_id,
    };
    let body: Arc<[u8]> = Arc::from(&b"hi"[..]);
    g.send(group, from, origin, client_id, body, &mut Vec::new())
}

fn order(g: &mut Groups, group: u64, from: u64) -> Result<u64, Refusal> {
    let cid = 1000 + g.get(group).map_or(0, Group::last_msg);
    match send(g, group, from, cid)? {
        Sent::New { msg } => Ok(msg),
        again => panic!("{again:?}"),
    }
}

#[test]
fn order_numbers_messages_and_events_together() {
    let mut g = groups();
    let mut out = Vec::new();
    let id = with_three(&mut g, &mut out);
    assert_eq!(g.get(id).unwrap().last_msg(), 3);
    assert_eq!(order(&mut g, id, 2), Ok(4));
    assert_eq!(order(&mut g, id, 9).unwrap_err().0, ErrorCode::NotMember);
    let c = g.remove(id, 1, 2, &mut out).unwrap();
    assert_eq!(c.event, Some((GroupEvent::Removed, 5)));
    assert_eq!(order(&mut g, id, 2).unwrap_err().0, ErrorCode::NotMember);
    assert_eq!(order(&mut g, id, 3), Ok(6));
}

#[test]
fn by_shard_lists_follow_membership() {
    let mut g = Groups::new(0, 1, 1024, 8);
    let mut out = Vec::new();
    let id = g.create(1, &mut out).unwrap().group;
    for u in 2..=40 {
        g.add(id, 1, u, &mut out).unwrap();
    }
    let grp = g.get_mut(id).unwrap();
    let lists = grp.by_shard(3);
    assert_eq!(lists.len(), 3);
    assert_eq!(lists.iter().map(|l| l.len()).sum::<usize>(), 40);
    for (shard, list) in lists.iter().enumerate() {
        assert!(list.iter().all(|&u| home_shard(u, 3) == shard));
    }
    // Cached until a change.
    assert!(Arc::ptr_eq(&lists, &grp.by_shard(3)));
    g.remove(id, 1, 40, &mut out).unwrap();
    let grp = g.get_mut(id).unwrap();
    let again = grp.by_shard(3);
    assert_eq!(again.iter().map(|l| l.len()).sum::<usize>(), 39);
}

#[test]
fn replaying_the_records_or_a_snapshot_rebuilds_the_state() {
    let mut g = groups();
    let mut out = Vec::new();
    let a = with_three(&mut g, &mut out);
    let b = g.create(2, &mut out).unwrap().group;
    g.add(b, 2, 1, &mut out).unwrap();
    g.set_admin(a, 1, 3, true, &mut out).unwrap();
    g.remove(a, 3, 2, &mut out).unwrap();
    order(&mut g, a, 1).unwrap();
    out.push(Record::Order {
        group: a,
        last_msg: g.get(a).unwrap().last_msg(),
    });
    let c = g.create(5, &mut out).unwrap().group;
    g.leave(c, 5, &mut out).unwrap();

    let check = |r: &Groups| {
        assert_eq!(r.len(), 2);
        let ga = r.get(a).unwrap();
        assert_eq!(ga.members().collect::<Vec<_>>(), [(1, true), (3, true)]);
        assert_eq!(ga.last_msg(), g.get(a).unwrap().last_msg());
        assert_eq!(
            r.get(b).unwrap().members().collect::<Vec<_>>(),
            [(1, false), (2, true)]
        );
        assert_eq!((r.count_of(1), r.count_of(2), r.count_of(5)), (2, 1, 0));
        assert_eq!(r.memberships(), 4);
    };
    let mut replayed = groups();
    out.iter().for_each(|r| replayed.apply(r));
    check(&replayed);
    let mut snap = Vec::new();
    g.snapshot(&mut snap);
    let mut again = groups();
    snap.iter().for_each(|r| again.apply(r));
    check(&again);
    // The deleted group's id is not given again.
    assert!(again.create(7, &mut out).unwrap().group > c);
}

#[test]
fn a_retried_send_gets_its_original_number_and_time() {
    let mut g = groups();
    let mut out = Vec::new();
    let a = with_three(&mut g, &mut out);
    let b = g.create(2, &mut out).unwrap().group;
    let mut staged = Vec::new();
    let o = |device, client_id| Origin { device, client_id };
    let body: Arc<[u8]> = Arc::from(&b"x"[..]);
    let first = g.send(a, 2, o(1, 50), 7, body.clone(), &mut staged);
    assert_eq!(first, Ok(Sent::New { msg: 4 }));
    assert!(matches!(
        staged[..],
        [
            Record::Message { msg: 4, .. },
            Record::Sent {
                msg: 4,
                device: 1,
                client_id: 50,
                ..
            }
        ]
    ));
    staged.clear();
    // The retry, later: same number and time, nothing staged, no number.
    let again = g.send(a, 2, o(1, 50), 99, body.clone(), &mut staged);
    assert_eq!(again, Ok(Sent::Again { msg: 4, time_ms: 7 }));
    assert!(staged.is_empty());
    assert_eq!(g.get(a).unwrap().last_msg(), 4);
    // Another device of the same user has its own window.
    assert_eq!(
        g.send(a, 2, o(2, 50), 8, body.clone(), &mut staged),
        Ok(Sent::New { msg: 5 })
    );
    // The same client_id for another group is refused, not answered
    // with the first group's ACK.
    let other = g.send(b, 2, o(1, 50), 9, body.clone(), &mut staged);
    assert_eq!(other.unwrap_err().0, ErrorCode::StaleClientId);
    // Below the window: refused; inside it and not taken: new.
    assert_eq!(
        g.send(a, 2, o(1, 50 + WINDOW), 10, body.clone(), &mut staged),
        Ok(Sent::New { msg: 6 })
    );
    let stale = g.send(a, 2, o(1, 50), 11, body.clone(), &mut staged);
    assert_eq!(stale.unwrap_err().0, ErrorCode::StaleClientId);
    assert_eq!(
        g.send(a, 2, o(1, 51), 12, body.clone(), &mut staged),
        Ok(Sent::New { msg: 7 })
    );
    // A sender removed since still gets its message's ACK, not a new one.
    g.remove(a, 1, 2, &mut out).unwrap();
    assert_eq!(
        g.send(a, 2, o(1, 51), 13, body.clone(), &mut staged),
        Ok(Sent::Again {
            msg: 7,
            time_ms: 12
        })
    );
    assert_eq!(
        g.send(a, 2, o(1, 52), 13, body, &mut staged).unwrap_err().0,
        ErrorCode::NotMember
    );
}

#[test]
fn windows_survive_a_replay_and_a_snapshot_bounded() {
    let mut g = groups();
    let mut out = Vec::new();
    let a = with_three(&mut g, &mut out);
    let body: Arc<[u8]> = Arc::from(&b"x"[..]);
    for cid in 1..=100 {
        let o = Origin {
            device: 3,
            client_id: cid,
        };
        g.send(a, 2, o, cid * 10, body.clone(), &mut out).unwrap();
    }
    let check = |r: &mut Groups| {
        for cid in [1, 68] {
            let o = Origin {
                device: 3,
                client_id: cid,
            };
            let e = r.send(a, 2, o, 0, body.clone(), &mut Vec::new());
            assert_eq!(e.unwrap_err().0, ErrorCode::StaleClientId, "{cid}");
        }
        for cid in [69, 100] {
            let o = Origin {
                device: 3,
                client_id: cid,
            };
            let e = r.send(a, 2, o, 0, body.clone(), &mut Vec::new());
            // Messages 4.. after the three events of with_three.
            assert_eq!(
                e,
                Ok(Sent::Again {
                    msg: cid + 3,
                    time_ms: cid * 10
                })
            );
        }
    };
    let mut replayed = groups();
    out.iter().for_each(|r| replayed.apply(r));
    check(&mut replayed);
    let mut snap = Vec::new();
    g.snapshot(&mut snap);
    // Bounded: one `Sent` per entry of the window, not per message.
    let sent = snap
        .iter()
        .filter(|r| matches!(r, Record::Sent { .. }))
        .count();
    assert_eq!(sent, WINDOW as usize);
    // What the documents say an entry costs in memory.
    let entry = std::mem::size_of::<crate::store::window::Taken<u64>>();
    assert_eq!(entry, 32);
    let mut again = groups();
    snap.iter().for_each(|r| again.apply(r));
    check(&mut again);
}
