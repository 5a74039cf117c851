//! Groups on a cluster node (docs/CLUSTER.md, "Groups and the device
//! registry across nodes"): not served yet. Every group request and
//! GROUP_SEND of a version 2 client gets ERROR(`unavailable`) naming it,
//! nothing is taken, and the connection goes on with 1:1 messages.

use tern::proto::{ErrorCode, Frame, GroupFrame, OwnedFrame};

use super::common::{indexed_body, recv_ack, recv_deliver};
use super::nats::Nats;
use super::{login_v2, reachable_node, settle_halves, user_on_each};

#[test]
fn group_frames_on_a_cluster_are_unavailable_and_the_connection_stays() {
    let Some(nats) = Nats::start() else { return };
    let a = reachable_node(&nats, "a", 16);
    let b = reachable_node(&nats, "b", 16);
    settle_halves(&a, &b, 16);
    let (x, y) = user_on_each(&a);
    let mut cx = login_v2(a.addr, x);
    let mut cy = login_v2(a.addr, y);
    let requests = [
        (1, GroupFrame::Create { req: 1 }),
        (
            2,
            GroupFrame::Add {
                req: 2,
                group: 7,
                user: y,
            },
        ),
        (3, GroupFrame::Members { req: 3, group: 7 }),
        (4, GroupFrame::Leave { req: 4, group: 7 }),
        (
            5,
            GroupFrame::Send {
                client_id: 5,
                group: 7,
                body: &b"hello"[..],
            },
        ),
    ];
    for (id, g) in requests {
        cx.send_frame(&Frame::Group(g)).expect("group frame");
        match cx.recv() {
            Ok(OwnedFrame::Error {
                code: ErrorCode::Unavailable,
                client_id,
                ..
            }) => assert_eq!(client_id, id, "the ERROR names the request"),
            other => panic!("expected ERROR(unavailable, {id}), got {other:?}"),
        }
    }
    // The connection stays and 1:1 messages cross nodes as before.
    cx.send_msg(9, y, &indexed_body(1, 0)).expect("send");
    let id = recv_ack(&mut cx, 9);
    let got = recv_deliver(&mut cy);
    assert_eq!((got.server_id, got.from), (id, x));
}
