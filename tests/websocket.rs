//! The WebSocket listener (`ws_listen`, RFC 6455) over real sockets, with
//! the tests' WebSocket client (tests/common/ws.rs): the upgrade, LOGIN and messages
//! between a WebSocket client and a TCP one, refused upgrades (bad request,
//! wrong Origin, oversized headers, one that never ends), and the close
//! codes for unmasked, text and oversized frames; ping/pong and close.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::ws::{client_frame, request, WsClient, ACCEPT};
use common::*;
use tern::proto::{self, Frame, OwnedFrame};

fn ws_server() -> TestServer {
    TestServer::start_with(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()))
}

fn ws_addr(srv: &TestServer) -> SocketAddr {
    srv.server().ws_addr().expect("ws_listen is set")
}

#[test]
fn websocket_and_tcp_clients_message_each_other() {
    let srv = ws_server();
    let (a, b) = cross_pair();
    let mut ws = WsClient::upgrade(ws_addr(&srv));
    ws.login(&token(a));
    let mut tcp = srv.login(b);

    // WebSocket → TCP.
    ws.send(&[Frame::Send {
        client_id: 1,
        to: b,
        body: b"from the browser",
    }]);
    assert!(matches!(
        ws.recv_until(|f| matches!(f, OwnedFrame::Ack { .. })),
        OwnedFrame::Ack { client_id: 1, .. }
    ));
    match tcp.recv_until(|f| matches!(f, OwnedFrame::Deliver { .. })) {
        Ok(OwnedFrame::Deliver { from, body, .. }) => {
            assert_eq!((from, &body[..]), (a, &b"from the browser"[..]))
        }
        other => panic!("{other:?}"),
    }

    // TCP → WebSocket.
    tcp.send_msg(2, a, b"from the app").unwrap();
    match ws.recv_until(|f| matches!(f, OwnedFrame::Deliver { .. })) {
        OwnedFrame::Deliver { from, body, .. } => {
            assert_eq!((from, &body[..]), (b, &b"from the app"[..]))
        }
        other => panic!("{other:?}"),
    }

    // A SEND split over a fragmented message, and across two messages:
    // the payloads are one byte stream.
    let mut bytes = Vec::new();
    proto::encode(
        &Frame::Send {
            client_id: 3,
            to: b,
            body: b"in pieces",
        },
        &mut bytes,
    );
    let (one, rest) = bytes.split_at(3);
    let (two, three) = rest.split_at(4);
    ws.frame(0x02, one, true);
    ws.frame(0x89, b"mid", true); // a ping between fragments
    ws.frame(0x80, two, true);
    ws.frame(0x82, three, true);
    match tcp.recv_until(|f| matches!(f, OwnedFrame::Deliver { .. })) {
        Ok(OwnedFrame::Deliver { body, .. }) => assert_eq!(body, b"in pieces"),
        other => panic!("{other:?}"),
    }
    assert_eq!(ws.next(), Some((0xA, b"mid".to_vec())), "pong first");
    assert!(matches!(
        ws.recv_until(|f| matches!(f, OwnedFrame::Ack { .. })),
        OwnedFrame::Ack { client_id: 3, .. }
    ));
}

#[test]
fn ping_is_answered_and_close_is_echoed() {
    let srv = ws_server();
    let mut ws = WsClient::upgrade(ws_addr(&srv));
    ws.frame(0x89, b"nonce", true);
    assert_eq!(ws.next(), Some((0xA, b"nonce".to_vec())));
    ws.login(&token(users_on(0, SHARDS, 1)[0]));
    ws.frame(0x88, &1000u16.to_be_bytes(), true);
    assert_eq!(ws.close_code(), 1000);
}

#[test]
fn bad_upgrades_get_an_http_error_and_close() {
    let srv = TestServer::start_with(|c| {
        c.ws_listen = Some("127.0.0.1:0".parse().unwrap());
        c.ws_origins = vec!["https://chat.example".to_string()];
    });
    let addr = ws_addr(&srv);
    let cases = [
        ("not HTTP".to_string(), "400"),
        ("POST / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), "400"),
        (
            request("").replace("Upgrade: websocket", "Upgrade: h2c"),
            "400",
        ),
        (request("").replace("Version: 13", "Version: 8"), "426"),
        (request("Origin: https://evil.example\r\n"), "403"),
        (request(""), "403"), // an allow-list needs an Origin
        (request(&format!("X-Pad: {}\r\n", "a".repeat(5000))), "431"),
    ];
    for (req, status) in cases {
        let req = if req.ends_with("\r\n\r\n") {
            req
        } else {
            format!("{req}\r\n\r\n")
        };
        let (ws, head) = WsClient::open(addr, &req);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{req:?}: {head}"
        );
        assert!(
            ws.read_to_end().is_empty(),
            "{req:?}: closed after the answer"
        );
    }
    let (ws, head) = WsClient::open(addr, &request("Origin: https://chat.example\r\n"));
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    drop(ws);
}

#[test]
fn an_upgrade_that_never_ends_is_closed_at_the_login_timeout() {
    let srv = TestServer::start_with(|c| {
        c.ws_listen = Some("127.0.0.1:0".parse().unwrap());
        c.login_timeout_ms = 200;
    });
    let mut s = TcpStream::connect(ws_addr(&srv)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("closed within the wait");
    assert!(rest.is_empty(), "closed without a word");
}

#[test]
fn frame_violations_close_with_their_codes() {
    let srv = ws_server();
    let addr = ws_addr(&srv);
    let mut ws = WsClient::upgrade(addr);
    ws.frame(0x82, b"\x00", false);
    assert_eq!(ws.close_code(), 1002, "unmasked");

    let mut ws = WsClient::upgrade(addr);
    ws.frame(0x81, b"hello", true);
    assert_eq!(ws.close_code(), 1003, "text");

    let mut ws = WsClient::upgrade(addr);
    ws.frame(0x80, b"x", true);
    assert_eq!(ws.close_code(), 1002, "continuation without a message");

    // Over the limit: refused from the header, before the payload.
    let mut ws = WsClient::upgrade(addr);
    ws.send_raw(&[0x82, 0xff]);
    ws.send_raw(&(1u64 << 20).to_be_bytes());
    ws.send_raw(&[1, 2, 3, 4]);
    assert_eq!(ws.close_code(), 1009, "oversized");

    // Over the limit across fragments (the payload starts a Tern frame
    // of 65000 bytes, so the session waits for the rest).
    let mut ws = WsClient::upgrade(addr);
    let mut first = vec![0xe8, 0xfb, 0x03]; // varint 65000
    first.resize(40_000, 0);
    ws.frame(0x02, &first, true);
    ws.frame(0x00, &[0; 40_000], true);
    assert_eq!(ws.close_code(), 1009, "oversized fragmented");
}

#[test]
fn server_bye_ends_with_a_close_frame() {
    let srv = ws_server();
    let mut ws = WsClient::upgrade(ws_addr(&srv));
    ws.login(&token(users_on(1, SHARDS, 1)[0]));
    // A malformed Tern frame in a valid message: ERROR, then close 1000.
    ws.frame(0x82, &[1, 0xEE], true);
    assert_eq!(ws.close_code(), 1000);
}

#[test]
fn a_successor_takes_over_the_websocket_listener() {
    // Port 0: the successor serves the port its predecessor got, on the
    // listening sockets handed over (a successor binding its own would get
    // another port).
    let ws_listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let old = TestServer::start_with(|c| c.ws_listen = Some(ws_listen));
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.ws_listen = Some(ws_listen);
    let handover = tern::server::Handover {
        listeners: Some(old.server().listeners().unwrap()),
        ..Default::default()
    };
    let got = old.server().ws_addr().expect("a WebSocket listener");
    let new = tern::server::Server::start_with(config, handover).expect("successor starts");
    assert_eq!(new.ws_addr(), Some(got));
    old.server().shutdown_for_upgrade();
    drop(old);
    // The successor serves the port.
    let mut ws = WsClient::upgrade(got);
    ws.frame(0x89, b"x", true);
    assert_eq!(ws.next(), Some((0xA, b"x".to_vec())));
    new.shutdown();
    new.join();
}

#[test]
fn a_partial_frame_after_login_survives_the_move_to_the_home_shard() {
    let srv = ws_server();
    let (peer, _) = cross_pair();
    // One user per shard: whichever shard a connection lands on, one of
    // the two moves to its home shard after LOGIN.
    for user in [users_on(0, SHARDS, 2)[1], users_on(1, SHARDS, 2)[1]] {
        let mut ws = WsClient::upgrade(ws_addr(&srv));
        let token = token(user);
        let mut login = Vec::new();
        proto::encode(
            &Frame::Login {
                version: proto::VERSION,
                token: token.as_bytes(),
            },
            &mut login,
        );
        let mut send = Vec::new();
        proto::encode(
            &Frame::Send {
                client_id: 9,
                to: peer,
                body: b"after the move",
            },
            &mut send,
        );
        // LOGIN's message and the first 7 bytes of the SEND's, in one write.
        let mut wire = client_frame(0x82, &login);
        let second = client_frame(0x82, &send);
        wire.extend_from_slice(&second[..7]);
        ws.send_raw(&wire);
        assert!(matches!(ws.recv(), OwnedFrame::LoginOk { .. }));
        ws.send_raw(&second[7..]);
        assert!(matches!(
            ws.recv_until(|f| matches!(f, OwnedFrame::Ack { .. })),
            OwnedFrame::Ack { client_id: 9, .. }
        ));
    }
}

#[test]
fn a_live_upgrade_says_bye_to_websocket_connections_not_logged_in() {
    let srv = ws_server();
    let mut ws = WsClient::upgrade(ws_addr(&srv));
    // Logged-in WebSocket connections are carried to the successor
    // (tests/upgrade.rs); one not logged in yet gets BYE(upgrade), then a
    // close frame.
    srv.server().shutdown_for_upgrade();
    assert!(matches!(
        ws.recv_until(|f| matches!(f, OwnedFrame::Bye { .. })),
        OwnedFrame::Bye {
            reason: proto::ByeReason::Upgrade
        }
    ));
    assert_eq!(ws.close_code(), 1000);
}

/// The upgrade request is parsed where it lies when it comes whole, and
/// kept only while partial: a request cut into pieces, and a request with
/// the masked LOGIN right behind it in the same write, both log in.
#[test]
fn an_upgrade_in_pieces_and_one_with_the_login_behind_it_both_log_in() {
    let srv = ws_server();
    let addr = ws_addr(&srv);
    let req = request("");

    // In pieces: the first ends mid-line, the second mid-terminator. The
    // pauses only make separate reads likely (nothing the server does
    // before the request is whole can be observed); the test holds either way.
    let (one, rest) = req.as_bytes().split_at(20);
    let (two, three) = rest.split_at(rest.len() - 3);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    for piece in [one, two] {
        s.write_all(piece).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s.write_all(three).unwrap();
    let (mut ws, head) = WsClient::answered(s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")));
    let (a, b) = cross_pair();
    ws.login(&token(a));

    // Request and LOGIN in one write.
    let mut login = Vec::new();
    let token = token(b);
    proto::encode(
        &Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        },
        &mut login,
    );
    let mut both = req.into_bytes();
    both.extend_from_slice(&client_frame(0x82, &login));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&both).unwrap();
    let (mut ws2, head) = WsClient::answered(s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(matches!(ws2.recv(), OwnedFrame::LoginOk { .. }));

    // They talk.
    ws.send(&[Frame::Send {
        client_id: 1,
        to: b,
        body: b"in pieces",
    }]);
    match ws2.recv_until(|f| matches!(f, OwnedFrame::Deliver { .. })) {
        OwnedFrame::Deliver { from, body, .. } => {
            assert_eq!((from, &body[..]), (a, &b"in pieces"[..]))
        }
        other => panic!("{other:?}"),
    }
}
