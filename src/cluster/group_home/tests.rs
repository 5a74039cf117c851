//! A partition's groups through requests, redeliveries and a takeover,
//! without NATS.

use super::*;

const PARTITIONS: u32 = 64;
const HOME: u32 = 5;

fn home() -> Home {
    Home::new(HOME, PARTITIONS, 4, 3)
}

fn op(actor: u64, group: u64, id: u64, request: Request) -> Op {
    Op {
        actor,
        device: 1,
        group,
        id,
        reply: (0, 1, 1),
        sent_ns: 0,
        node: "a".into(),
        request,
    }
}

fn send(actor: u64, group: u64, client_id: u64, body: &[u8]) -> Op {
    op(
        actor,
        group,
        client_id,
        Request::Send {
            body: body.to_vec().into(),
        },
    )
}

/// Applies `o` at `seq` and, as the node would, keeps the state written
/// in `bucket`.
fn step(h: &mut Home, bucket: &mut HashMap<u64, State>, seq: u64, o: &Op) -> Outcome {
    let out = h.request(seq, o, 1_000 + seq);
    if let Some((group, state)) = &out.write {
        // What is written reads back the same.
        assert_eq!(State::decode(&state.encode()).as_ref(), Some(state));
        bucket.insert(*group, state.clone());
    }
    out
}

/// Creates a group by 1 at sequence 10 and adds 2 and 3 (11, 12).
fn with_three(h: &mut Home, bucket: &mut HashMap<u64, State>) -> u64 {
    let created = step(h, bucket, 10, &op(1, 0, 1, Request::Create));
    let Some(Answer::Ok { group }) = created.answer else {
        panic!("{created:?}");
    };
    assert_eq!(group, group_id(HOME, 10, PARTITIONS).unwrap());
    assert_eq!(created.audience, [1]);
    assert_eq!(
        created.ordered.as_ref().map(|o| (o.event, o.msg)),
        Some((Some(GroupEvent::Created), 1))
    );
    for (seq, user) in [(11, 2), (12, 3)] {
        let added = step(h, bucket, seq, &op(1, group, seq, Request::Add { user }));
        assert_eq!(added.answer, Some(Answer::Ok { group }));
        assert!(added.audience.contains(&user), "{added:?}");
    }
    group
}

#[test]
fn a_message_goes_to_the_members_in_order_and_is_written_first() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let group = with_three(&mut h, &mut bucket);
    assert!(h.has(group) && !h.has(group + 64));
    let out = step(&mut h, &mut bucket, 13, &send(2, group, 7, b"hi"));
    assert_eq!(
        out.answer,
        Some(Answer::Ack {
            msg: 4,
            time_ms: 1_013
        })
    );
    let m = out.ordered.unwrap();
    assert_eq!(
        (m.msg, m.from, m.client_id, &*m.body),
        (4, 2, 7, &b"hi"[..])
    );
    assert_eq!(out.audience, [1, 2, 3]);
    let (written, state) = out.write.unwrap();
    assert_eq!((written, state.applied_seq), (group, 13));
    // The next one is numbered after it.
    let next = step(&mut h, &mut bucket, 14, &send(3, group, 1, b"yo"));
    assert_eq!(next.ordered.unwrap().msg, 5);
}

#[test]
fn refusals_write_nothing_and_send_nothing() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let group = with_three(&mut h, &mut bucket);
    let cases = [
        (send(9, group, 1, b"x"), ErrorCode::NotMember),
        (
            op(2, group, 1, Request::Add { user: 4 }),
            ErrorCode::NotAdmin,
        ),
        (op(9, group, 1, Request::Members), ErrorCode::NotMember),
        (
            op(1, group + 64, 1, Request::Leave),
            ErrorCode::UnknownGroup,
        ),
        // Not homed by this partition.
        (op(1, group + 1, 1, Request::Leave), ErrorCode::UnknownGroup),
    ];
    for (seq, (o, code)) in (20..).zip(cases) {
        let out = step(&mut h, &mut bucket, seq, &o);
        assert!(
            matches!(out.answer, Some(Answer::Refused { code: c, .. }) if c == code),
            "{o:?}: {out:?}"
        );
        assert_eq!((out.write, out.ordered), (None, None), "{o:?}");
    }
    // Adding a member again changes nothing: answered, nothing written.
    let again = step(
        &mut h,
        &mut bucket,
        30,
        &op(1, group, 1, Request::Add { user: 2 }),
    );
    assert_eq!(again.answer, Some(Answer::Ok { group }));
    assert_eq!((again.write, again.ordered), (None, None));
    // The member list, from a member.
    let list = step(&mut h, &mut bucket, 31, &op(3, group, 5, Request::Members));
    assert_eq!(
        list.answer,
        Some(Answer::List {
            group,
            members: vec![(1, true), (2, false), (3, false)]
        })
    );
}

#[test]
fn removed_before_a_message_does_not_get_it_but_gets_its_removal() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let group = with_three(&mut h, &mut bucket);
    let removed = step(
        &mut h,
        &mut bucket,
        13,
        &op(1, group, 9, Request::Remove { user: 3 }),
    );
    assert_eq!(removed.audience, [1, 2, 3]);
    let m = step(&mut h, &mut bucket, 14, &send(1, group, 2, b"after"));
    assert_eq!(m.audience, [1, 2]);
    // An added member gets what is ordered after its addition only.
    let added = step(
        &mut h,
        &mut bucket,
        15,
        &op(1, group, 10, Request::Add { user: 4 }),
    );
    assert_eq!(added.ordered.unwrap().msg, 6);
    let later = step(&mut h, &mut bucket, 16, &send(1, group, 3, b"later"));
    assert_eq!(later.audience, [1, 2, 4]);
}

#[test]
fn a_redelivered_request_is_done_once_its_last_one_published_again() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let group = with_three(&mut h, &mut bucket);
    let first = step(&mut h, &mut bucket, 13, &send(2, group, 7, b"hi"));
    // The node died after writing 13, perhaps before all its copies left:
    // 13 again publishes the same copies (same numbers, same members;
    // JetStream drops the ones stored) and answers the same ACK.
    let again = step(&mut h, &mut bucket, 13, &send(2, group, 7, b"hi"));
    assert_eq!(again.write, None);
    assert_eq!(again.answer, first.answer);
    assert_eq!(again.audience, first.audience);
    assert_eq!(again.ordered, first.ordered);
    // Earlier requests, done whole before 13 was taken: only acked.
    for seq in [10, 11, 12] {
        assert_eq!(
            h.request(seq, &send(2, group, 1, b"x"), 5),
            Outcome::default()
        );
    }
    // A change redelivered at its sequence: its event again.
    let removed = step(
        &mut h,
        &mut bucket,
        14,
        &op(1, group, 9, Request::Remove { user: 3 }),
    );
    let again = h.request(14, &op(1, group, 9, Request::Remove { user: 3 }), 9_999);
    assert_eq!(again.audience, removed.audience);
    assert_eq!(
        again.ordered.map(|o| (o.msg, o.event, o.subject)),
        removed.ordered.map(|o| (o.msg, o.event, o.subject))
    );
    // A retry of a taken GROUP_SEND with a new record: the first ACK, no copy.
    let retry = step(&mut h, &mut bucket, 15, &send(2, group, 7, b"hi"));
    assert_eq!(retry.answer, first.answer);
    assert_eq!((retry.write, retry.ordered), (None, None));
}

#[test]
fn a_new_owner_continues_from_the_bucket() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let group = with_three(&mut h, &mut bucket);
    let sent = step(&mut h, &mut bucket, 13, &send(2, group, 7, b"hi"));
    step(
        &mut h,
        &mut bucket,
        14,
        &op(
            1,
            group,
            9,
            Request::Admin {
                user: 2,
                admin: true,
            },
        ),
    );
    // Another node claims the partition and reads every state.
    let mut taken = home();
    for (group, state) in &bucket {
        taken.load(*group, State::decode(&state.encode()).as_ref().unwrap());
    }
    assert_eq!(taken.len(), 1);
    let list = taken.request(15, &op(3, group, 1, Request::Members), 0);
    assert_eq!(
        list.answer,
        Some(Answer::List {
            group,
            members: vec![(1, true), (2, true), (3, false)]
        })
    );
    // The sender's retry is recognised; a new message is numbered next.
    assert_eq!(
        taken.request(16, &send(2, group, 7, b"hi"), 0).answer,
        sent.answer
    );
    let next = taken.request(17, &send(3, group, 1, b"x"), 0);
    assert_eq!(next.ordered.unwrap().msg, 6);
    // 2 is an admin now: it may add.
    let add = taken.request(18, &op(2, group, 2, Request::Add { user: 4 }), 0);
    assert_eq!(add.answer, Some(Answer::Ok { group }));
}

#[test]
fn the_last_member_leaving_leaves_a_tombstone() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let created = step(&mut h, &mut bucket, 10, &op(1, 0, 1, Request::Create));
    let Some(Answer::Ok { group }) = created.answer else {
        panic!();
    };
    let left = step(&mut h, &mut bucket, 11, &op(1, group, 2, Request::Leave));
    assert_eq!(left.answer, Some(Answer::Ok { group }));
    let (_, tomb) = left.write.unwrap();
    assert!(tomb.records.is_empty());
    assert_eq!(tomb.applied_seq, 11);
    assert!(h.is_empty() && !h.has(group));
    // The create redelivered after that does not make it again, on this
    // node or on one that read the tombstone.
    assert_eq!(
        h.request(10, &op(1, 0, 1, Request::Create), 0),
        Outcome::default()
    );
    let mut taken = home();
    taken.load(group, &tomb);
    assert_eq!(
        taken.request(10, &op(1, 0, 1, Request::Create), 0),
        Outcome::default()
    );
    assert!(taken.is_empty());
}

#[test]
fn limits_hold_per_partition() {
    let (mut h, mut bucket) = (home(), HashMap::default());
    let group = with_three(&mut h, &mut bucket);
    step(
        &mut h,
        &mut bucket,
        13,
        &op(1, group, 1, Request::Add { user: 4 }),
    );
    // group_members_max 4.
    let full = step(
        &mut h,
        &mut bucket,
        14,
        &op(1, group, 2, Request::Add { user: 5 }),
    );
    assert!(matches!(
        full.answer,
        Some(Answer::Refused {
            code: ErrorCode::GroupFull,
            ..
        })
    ));
    // groups_per_user_max 3 over this partition's groups.
    for seq in [20, 21] {
        step(&mut h, &mut bucket, seq, &op(1, 0, 1, Request::Create));
    }
    let over = step(&mut h, &mut bucket, 22, &op(1, 0, 1, Request::Create));
    assert!(matches!(
        over.answer,
        Some(Answer::Refused {
            code: ErrorCode::TooManyGroups,
            ..
        })
    ));
}
