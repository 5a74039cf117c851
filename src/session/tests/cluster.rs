//! The session layer in a cluster: REDIRECT at LOGIN, SEND refused for a
//! recipient another node serves, BYE(moved) once a partition is lost.

use super::*;
use crate::cluster::{partition_of, Owners};

/// Two partitions: 0 here, 1 on node "b" at `B_ADDR`.
const B_ADDR: &str = "10.0.0.2:7333";

fn clustered() -> Harness {
    let mut h = Harness::one();
    let owners = Owners::new(2);
    owners.set_here(0);
    let b = owners.node_index("b", B_ADDR).unwrap();
    owners.set_other(1, Some(b));
    h.env.owners = Some(owners);
    h
}

/// The first user of partition `p` (of 2).
fn user_in(p: u32) -> u64 {
    (1..).find(|&u| partition_of(u, 2) == p).unwrap()
}

fn login_frame(h: &mut Harness, conn: ConnId, user: u64, version: u8) -> Out {
    h.step(Event::Opened(conn));
    let token = h.token(user);
    h.frame(
        conn,
        Frame::Login {
            version,
            token: token.as_bytes(),
        },
    )
}

#[test]
fn a_v2_login_for_another_nodes_user_is_redirected_there() {
    let mut h = clustered();
    let out = login_frame(&mut h, A, user_in(1), proto::VERSION_2);
    assert_eq!(
        out.to(A)[..],
        [&OwnedFrame::Redirect {
            addr: B_ADDR.into()
        }]
    );
    assert!(out.closes_after_flush(A));
    assert_eq!(h.s.user_of(A), None);
    assert_eq!(h.s.stats.redirects.get(), 1);
}

#[test]
fn a_v1_login_for_another_nodes_user_gets_other_node_naming_it() {
    let mut h = clustered();
    let out = login_frame(&mut h, A, user_in(1), proto::VERSION);
    match out.to(A)[..] {
        [OwnedFrame::LoginErr { code, text }] => {
            assert_eq!(*code, ErrorCode::OtherNode);
            assert!(text.contains("node b") && text.contains(B_ADDR), "{text}");
        }
        ref other => panic!("{other:?}"),
    }
    assert!(out.closes_after_flush(A));
}

#[test]
fn a_login_for_an_unowned_partition_is_unavailable() {
    let mut h = clustered();
    h.env.owners.as_ref().unwrap().set_other(1, None);
    let out = login_frame(&mut h, A, user_in(1), proto::VERSION_2);
    assert!(
        matches!(
            out.to(A)[..],
            [OwnedFrame::LoginErr {
                code: ErrorCode::Unavailable,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn a_login_for_this_nodes_user_is_served() {
    let mut h = clustered();
    let user = user_in(0);
    let out = login_frame(&mut h, A, user, proto::VERSION_2);
    assert!(
        matches!(out.to(A)[..], [OwnedFrame::LoginOk { .. }]),
        "{out:?}"
    );
    assert_eq!(h.s.user_of(A), Some(user));
}

#[test]
fn a_send_to_another_nodes_user_is_refused_and_nothing_is_stored() {
    let mut h = clustered();
    login_frame(&mut h, A, user_in(0), proto::VERSION_2);
    let to = user_in(1);
    let out = h.send(0, 9, to, b"hi");
    match out.to(A)[..] {
        [OwnedFrame::Error {
            code,
            client_id,
            text,
        }] => {
            assert_eq!((*code, *client_id), (ErrorCode::OtherNode, 9));
            assert!(text.contains(B_ADDR), "{text}");
        }
        ref other => panic!("{other:?}"),
    }
    assert!(!out.closes_after_flush(A));
    assert_eq!(h.s.store().len(to), 0);
    assert_eq!(h.s.stats.other_node_sends.get(), 1);
}

#[test]
fn losing_a_partition_closes_its_users_with_moved_and_no_one_else() {
    let mut h = clustered();
    let owners = h.env.owners.as_ref().unwrap();
    owners.set_here(1);
    let (stays, goes) = (user_in(0), user_in(1));
    login_frame(&mut h, A, stays, proto::VERSION_2);
    login_frame(&mut h, B, goes, proto::VERSION);
    let owners = h.env.owners.as_ref().unwrap();
    let b = owners.node_index("b", B_ADDR).unwrap();
    owners.set_other(1, Some(b));
    assert_eq!(owners.losses(), 1);
    let out = h.step(Event::Moved);
    assert_eq!(
        out.to(B)[..],
        [&OwnedFrame::Bye {
            reason: ByeReason::Moved
        }]
    );
    assert!(out.to(A).is_empty());
    assert_eq!(h.s.stats.moved_closes.get(), 1);
}
