//! Presence across nodes (docs/CLUSTER.md, "Presence across nodes"): a
//! SUBSCRIBE to a user another node serves gets the state now and every
//! change; privacy is the owner's; a node going away shows its users
//! offline, and the subscription follows them to their new node.

use tern::proto::{Frame, OwnedFrame, PresenceState};
use tern_client::Client;

use super::nats::Nats;
use super::{
    login_v2, login_v2_here, reachable_node, retry_unavailable, settle, settle_halves, user_on_each,
};

/// A user other than `not` that node `a` serves.
fn another_user_on(a: &super::TestServer, not: u64) -> u64 {
    (1..=64u64)
        .filter(|&u| u != not)
        .find(|&u| retry_unavailable(|| login_v2_here(a.addr, u)).is_ok())
        .expect("a serves two users of 64")
}

fn subscribe(c: &mut Client, user: u64) {
    c.send_frame(&Frame::Subscribe { user }).expect("subscribe");
}

/// The next PRESENCE on `c` (other frames skipped): (user, state, last seen).
fn presence(c: &mut Client) -> (u64, PresenceState, u64) {
    match c.recv_until(|f| matches!(f, OwnedFrame::Presence { .. })) {
        Ok(OwnedFrame::Presence {
            user,
            state,
            last_seen_ms,
        }) => (user, state, last_seen_ms),
        other => panic!("expected PRESENCE, got {other:?}"),
    }
}

/// The next TYPING on `c` (other frames skipped): the typist.
fn typing(c: &mut Client) -> u64 {
    match c.recv_until(|f| matches!(f, OwnedFrame::Typing { .. })) {
        Ok(OwnedFrame::Typing { user }) => user,
        other => panic!("expected TYPING, got {other:?}"),
    }
}

/// A subscriber on node a watches a user served by node b: the state now,
/// online, offline with its last seen, hidden and shown again; TYPING
/// both ways; UNSUBSCRIBE ends it on both nodes.
#[test]
fn a_user_of_another_node_is_watched_like_a_local_one() {
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    settle_halves(&a, &b, 16);
    let (x, y) = user_on_each(&a);

    let mut cx = login_v2(a.addr, x);
    subscribe(&mut cx, y);
    assert_eq!(presence(&mut cx), (y, PresenceState::Offline, 0));
    assert_eq!(a.info_u64("Cluster_presence_watches"), 1);
    b.wait_metric("tern_presence_subs", |n| n == 1);

    let cy = login_v2(a.addr, y);
    assert_eq!(cy.peer_addr().expect("peer"), b.addr, "y is served by b");
    assert_eq!(presence(&mut cx), (y, PresenceState::Online, 0));
    drop(cy);
    let (u, state, last_seen) = presence(&mut cx);
    assert_eq!((u, state), (y, PresenceState::Offline));
    assert!(last_seen > 0, "last seen is when the session ended");

    // Privacy is the owner's: hidden, then shown (online) again.
    let mut cy = login_v2(a.addr, y);
    assert_eq!(presence(&mut cx), (y, PresenceState::Online, 0));
    // TYPING crosses nodes both ways.
    cx.send_frame(&Frame::Typing { user: y }).expect("typing");
    assert_eq!(typing(&mut cy), x);
    cy.send_frame(&Frame::Typing { user: x }).expect("typing");
    assert_eq!(typing(&mut cx), y);
    cy.send_frame(&Frame::Privacy { hidden: true })
        .expect("privacy");
    assert_eq!(presence(&mut cx), (y, PresenceState::Hidden, 0));
    // A second subscriber, on a, sees hidden at once.
    let z = another_user_on(&a, x);
    let mut cz = login_v2(a.addr, z);
    subscribe(&mut cz, y);
    assert_eq!(presence(&mut cz), (y, PresenceState::Hidden, 0));
    cy.send_frame(&Frame::Privacy { hidden: false })
        .expect("privacy");
    assert_eq!(presence(&mut cx), (y, PresenceState::Online, 0));
    assert_eq!(presence(&mut cz), (y, PresenceState::Online, 0));

    // UNSUBSCRIBE and a closed subscriber end them on both nodes.
    cx.send_frame(&Frame::Unsubscribe { user: y })
        .expect("unsubscribe");
    drop(cz);
    a.wait_info("Cluster_presence_watches", |n| n == 0);
    b.wait_metric("tern_presence_subs", |n| n == 0);
    // The change after it reaches nobody: x's next frame is its PONG.
    drop(cy);
    cx.send_frame(&Frame::Ping { nonce: 7 }).expect("ping");
    match cx.recv() {
        Ok(OwnedFrame::Pong { nonce: 7 }) => {}
        other => panic!("expected PONG(7) after unsubscribing, got {other:?}"),
    }
}

/// The watched user's node stops: its subscriber on the other node sees it
/// offline; once the survivor serves the user, the subscription follows it
/// there and shows it online when it logs in again.
#[test]
fn a_node_going_away_shows_its_users_offline_and_the_watch_follows_them() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    settle_halves(&a, &b, 16);
    let (x, y) = user_on_each(&a);
    let mut cx = login_v2(a.addr, x);
    let _cy = login_v2(a.addr, y);
    subscribe(&mut cx, y);
    assert_eq!(presence(&mut cx), (y, PresenceState::Online, 0));

    drop(b);
    let (u, state, last_seen) = presence(&mut cx);
    assert_eq!((u, state), (y, PresenceState::Offline));
    assert!(last_seen > 0, "offline since b went away");
    let all = settle(|| a.info_u64("Cluster_partitions_owned") == 16);
    assert!(all, "a never took b's partitions over");
    // The subscription is on a's home shard of y now.
    a.wait_info("Cluster_presence_watches", |n| n == 0);
    a.wait_metric("tern_presence_subs", |n| n == 1);
    // The survivor answers the moved subscription with the state it knows
    // (offline; last seen stays with the node that saw it), then online.
    let _cy = login_v2(a.addr, y);
    loop {
        match presence(&mut cx) {
            (u, PresenceState::Offline, _) if u == y => continue,
            got => {
                assert_eq!(got, (y, PresenceState::Online, 0));
                break;
            }
        }
    }
}
