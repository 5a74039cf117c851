//! The WebSocket listener (`ws_listen`, RFC 6455) over real sockets, with a
//! small WebSocket client written here: the upgrade, LOGIN and messages
//! between a WebSocket client and a TCP one, refused upgrades (bad request,
//! wrong Origin, oversized headers, one that never ends), and the close
//! codes for unmasked, text and oversized frames; ping/pong and close.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;
use tern::proto::{self, Frame, Limits, OwnedFrame};

/// A key and the `Sec-WebSocket-Accept` RFC 6455 §1.3 derives from it.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// An upgrade request with `extra` header lines (each ending in CRLF).
fn request(extra: &str) -> String {
    format!(
        "GET /tern HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn ws_server() -> TestServer {
    TestServer::start_with(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()))
}

fn ws_addr(srv: &TestServer) -> SocketAddr {
    srv.server().ws_addr().expect("ws_listen is set")
}

/// A WebSocket client: raw socket plus the bytes read and not yet used.
struct Ws {
    s: TcpStream,
    /// Bytes read from the socket, not yet parsed as WebSocket frames.
    raw: Vec<u8>,
    /// Payload of binary messages, not yet decoded as Tern frames.
    stream: Vec<u8>,
}

impl Ws {
    /// Sends `req` and reads the HTTP answer's head; returns the client
    /// and the head.
    fn open(addr: SocketAddr, req: &str) -> (Ws, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        Ws::answered(s)
    }

    /// Reads the HTTP answer's head on `s`, whose request went out.
    fn answered(mut s: TcpStream) -> (Ws, String) {
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before an HTTP answer: {raw:?}");
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(raw[..end].to_vec()).unwrap();
        raw.drain(..end);
        let ws = Ws {
            s,
            raw,
            stream: Vec::new(),
        };
        (ws, head)
    }

    /// Upgrades; panics unless the answer is 101 with the right accept key.
    fn upgrade(addr: SocketAddr) -> Ws {
        let (ws, head) = Ws::open(addr, &request(""));
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")),
            "{head}"
        );
        ws
    }

    /// Sends one frame: `first` is the FIN/opcode byte.
    fn frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut f = vec![first];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n <= 125 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = if masked {
            [0xa1, 0x5e, 0x07, 0x3c]
        } else {
            [0; 4]
        };
        if masked {
            f.extend_from_slice(&mask);
        }
        f.extend(payload.iter().enumerate().map(|(i, &b)| b ^ mask[i & 3]));
        self.s.write_all(&f).unwrap();
    }

    /// Sends `frames` encoded, in one binary message.
    fn send(&mut self, frames: &[Frame<'_>]) {
        let mut bytes = Vec::new();
        for f in frames {
            proto::encode(f, &mut bytes);
        }
        self.frame(0x82, &bytes, true);
    }

    /// The next server frame: (opcode, payload); `None` at end of stream.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.raw.len() >= 2 {
                assert_eq!(self.raw[0] & 0x80, 0x80, "server frames are whole");
                assert_eq!(self.raw[1] & 0x80, 0, "server frames are unmasked");
                let (len, at) = match self.raw[1] & 0x7f {
                    126 if self.raw.len() >= 4 => {
                        (u16::from_be_bytes([self.raw[2], self.raw[3]]) as usize, 4)
                    }
                    127 if self.raw.len() >= 10 => (
                        u64::from_be_bytes(self.raw[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.raw.len() >= at + len {
                    let op = self.raw[0] & 0x0f;
                    let payload = self.raw[at..at + len].to_vec();
                    self.raw.drain(..at + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 16384];
            let n = self.s.read(&mut chunk).expect("read within the wait");
            if n == 0 {
                assert!(self.raw.is_empty(), "a partial frame at EOF");
                return None;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next Tern frame from the binary messages.
    fn recv(&mut self) -> OwnedFrame {
        loop {
            if let Some((f, used)) = proto::decode(&self.stream, &Limits::default()).unwrap() {
                let owned = f.to_owned();
                self.stream.drain(..used);
                return owned;
            }
            match self.next() {
                Some((0x2, payload)) => self.stream.extend_from_slice(&payload),
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// The next Tern frame matching `want`, skipping others.
    fn recv_until(&mut self, want: impl Fn(&OwnedFrame) -> bool) -> OwnedFrame {
        loop {
            let f = self.recv();
            if want(&f) {
                return f;
            }
        }
    }

    /// Reads to the end: the close code the server sent, then EOF.
    fn close_code(&mut self) -> u16 {
        loop {
            match self.next() {
                Some((0x8, p)) => {
                    assert_eq!(self.next(), None, "nothing after the close frame");
                    return u16::from_be_bytes([p[0], p[1]]);
                }
                Some(_) => continue,
                None => panic!("no close frame before EOF"),
            }
        }
    }

    fn login(&mut self, user: u64) {
        let token = token(user);
        self.send(&[Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        }]);
        match self.recv() {
            OwnedFrame::LoginOk { .. } => {}
            other => panic!("expected LOGIN_OK, got {other:?}"),
        }
    }
}

/// Reads to EOF; returns what came.
fn read_to_end(mut s: TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("closed within the wait");
    rest
}

#[test]
fn websocket_and_tcp_clients_message_each_other() {
    let srv = ws_server();
    let (a, b) = cross_pair();
    let mut ws = Ws::upgrade(ws_addr(&srv));
    ws.login(a);
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
    let mut ws = Ws::upgrade(ws_addr(&srv));
    ws.frame(0x89, b"nonce", true);
    assert_eq!(ws.next(), Some((0xA, b"nonce".to_vec())));
    ws.login(users_on(0, SHARDS, 1)[0]);
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
        let (ws, head) = Ws::open(addr, &req);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{req:?}: {head}"
        );
        assert!(
            read_to_end(ws.s).is_empty(),
            "{req:?}: closed after the answer"
        );
    }
    let (ws, head) = Ws::open(addr, &request("Origin: https://chat.example\r\n"));
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
    assert!(read_to_end(s).is_empty(), "closed without a word");
}

#[test]
fn frame_violations_close_with_their_codes() {
    let srv = ws_server();
    let addr = ws_addr(&srv);
    let mut ws = Ws::upgrade(addr);
    ws.frame(0x82, b"\x00", false);
    assert_eq!(ws.close_code(), 1002, "unmasked");

    let mut ws = Ws::upgrade(addr);
    ws.frame(0x81, b"hello", true);
    assert_eq!(ws.close_code(), 1003, "text");

    let mut ws = Ws::upgrade(addr);
    ws.frame(0x80, b"x", true);
    assert_eq!(ws.close_code(), 1002, "continuation without a message");

    // Over the limit: refused from the header, before the payload.
    let mut ws = Ws::upgrade(addr);
    ws.s.write_all(&[0x82, 0xff]).unwrap();
    ws.s.write_all(&(1u64 << 20).to_be_bytes()).unwrap();
    ws.s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(ws.close_code(), 1009, "oversized");

    // Over the limit across fragments (the payload starts a Tern frame
    // of 65000 bytes, so the session waits for the rest).
    let mut ws = Ws::upgrade(addr);
    let mut first = vec![0xe8, 0xfb, 0x03]; // varint 65000
    first.resize(40_000, 0);
    ws.frame(0x02, &first, true);
    ws.frame(0x00, &[0; 40_000], true);
    assert_eq!(ws.close_code(), 1009, "oversized fragmented");
}

#[test]
fn server_bye_ends_with_a_close_frame() {
    let srv = ws_server();
    let mut ws = Ws::upgrade(ws_addr(&srv));
    ws.login(users_on(1, SHARDS, 1)[0]);
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
    let mut ws = Ws::upgrade(got);
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
        let mut ws = Ws::upgrade(ws_addr(&srv));
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
        let mut wire = masked_message(&login);
        let second = masked_message(&send);
        wire.extend_from_slice(&second[..7]);
        ws.s.write_all(&wire).unwrap();
        assert!(matches!(ws.recv(), OwnedFrame::LoginOk { .. }));
        ws.s.write_all(&second[7..]).unwrap();
        assert!(matches!(
            ws.recv_until(|f| matches!(f, OwnedFrame::Ack { .. })),
            OwnedFrame::Ack { client_id: 9, .. }
        ));
    }
}

/// One masked binary message holding `payload` (under 126 bytes).
fn masked_message(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [9, 8, 7, 6];
    let mut m = vec![0x82, 0x80 | payload.len() as u8];
    m.extend_from_slice(&mask);
    m.extend(payload.iter().enumerate().map(|(i, &b)| b ^ mask[i & 3]));
    m
}

#[test]
fn a_live_upgrade_says_bye_to_websocket_connections_not_logged_in() {
    let srv = ws_server();
    let mut ws = Ws::upgrade(ws_addr(&srv));
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
    let (mut ws, head) = Ws::answered(s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")));
    let (a, b) = cross_pair();
    ws.login(a);

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
    let mask = [9u8, 8, 7, 6];
    both.extend_from_slice(&[0x82, 0x80 | login.len() as u8]);
    both.extend_from_slice(&mask);
    both.extend(login.iter().enumerate().map(|(i, &x)| x ^ mask[i & 3]));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&both).unwrap();
    let (mut ws2, head) = Ws::answered(s);
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
