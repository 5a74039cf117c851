//! Client tests against a scripted fake server: a std `TcpListener` in a
//! thread that plays the server side with `tern::proto`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tern::proto::{self, ByeReason, DecodeError, ErrorCode, Frame, OwnedFrame, ReceiptKind};

use crate::{Client, ClientError, LoginInfo, BACKLOG_FRAMES_MAX};

/// How long the fake server waits for the client before failing the test.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The server end of one connection.
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    /// Reads the next frame the client sent; panics on timeout or EOF.
    fn read_frame(&mut self) -> OwnedFrame {
        loop {
            if let Some((frame, used)) =
                proto::decode(&self.buf, &proto::Limits::default()).expect("client sent bad bytes")
            {
                let frame = frame.to_owned();
                self.buf.drain(..used);
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("peer read");
            assert!(n > 0, "client closed before sending a frame");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads exactly `n` raw bytes.
    fn read_raw(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            let got = self.stream.read(&mut chunk).expect("peer read");
            assert!(got > 0, "client closed early");
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// Reads LOGIN and checks its version and token.
    fn expect_login(&mut self, token: &str) {
        match self.read_frame() {
            OwnedFrame::Login { version, token: t } => {
                assert_eq!(version, proto::VERSION);
                assert_eq!(t, token.as_bytes());
            }
            other => panic!("expected LOGIN, got {other:?}"),
        }
    }

    /// Writes all `frames` in one write.
    fn send(&mut self, frames: &[Frame<'_>]) {
        let mut out = Vec::new();
        for frame in frames {
            proto::encode(frame, &mut out);
        }
        self.stream.write_all(&out).expect("peer write");
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("peer write");
    }
}

/// Starts a fake server that accepts one connection and runs `script` on it.
/// Join the handle to surface the script's panics.
fn serve(script: impl FnOnce(Peer) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
        script(Peer {
            stream,
            buf: Vec::new(),
        });
    });
    (addr, handle)
}

/// A fake server that answers LOGIN with LOGIN_OK and then runs `script`.
fn serve_logged_in(script: impl FnOnce(Peer) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    serve(move |mut peer| {
        peer.expect_login("tok");
        peer.send(&[Frame::LoginOk {
            server_time_ms: 1,
            offline_count: 0,
        }]);
        script(peer);
    })
}

fn login(addr: SocketAddr) -> Client {
    let (client, _) = Client::login(addr, "tok").expect("login");
    client
}

fn pong(nonce: u64) -> OwnedFrame {
    OwnedFrame::Pong { nonce }
}

#[test]
fn login_ok_keeps_frames_that_follow_in_the_same_read() {
    let (addr, server) = serve(|mut peer| {
        peer.expect_login("v1.42.99.mac");
        peer.send(&[
            Frame::LoginOk {
                server_time_ms: 1234,
                offline_count: 1,
            },
            Frame::Deliver {
                server_id: 5,
                from: 7,
                server_time_ms: 1000,
                client_id: None,
                body: b"while you were away",
            },
        ]);
    });
    let (mut client, info) = Client::login(addr, "v1.42.99.mac").expect("login");
    assert_eq!(
        info,
        LoginInfo {
            server_time_ms: 1234,
            offline_count: 1
        }
    );
    assert_eq!(
        client.recv().unwrap(),
        OwnedFrame::Deliver {
            server_id: 5,
            from: 7,
            server_time_ms: 1000,
            client_id: None,
            body: b"while you were away".to_vec(),
        }
    );
    server.join().unwrap();
    assert!(matches!(client.recv(), Err(ClientError::Closed)));
    // Closed stays closed.
    assert!(matches!(client.recv(), Err(ClientError::Closed)));
    assert!(client.is_closed());
}

#[test]
fn login_err_is_rejected_with_code_and_text() {
    let (addr, server) = serve(|mut peer| {
        peer.expect_login("bad");
        peer.send(&[Frame::LoginErr {
            code: ErrorCode::BadToken,
            text: "signature mismatch",
        }]);
    });
    match Client::login(addr, "bad") {
        Err(ClientError::LoginRejected { code, text }) => {
            assert_eq!(code, ErrorCode::BadToken);
            assert_eq!(text, "signature mismatch");
        }
        other => panic!("expected LoginRejected, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn login_answered_by_other_frame_is_unexpected() {
    let (addr, server) = serve(|mut peer| {
        peer.expect_login("tok");
        peer.send(&[Frame::Bye {
            reason: ByeReason::Shutdown,
        }]);
    });
    match Client::login(addr, "tok") {
        Err(ClientError::Unexpected(OwnedFrame::Bye {
            reason: ByeReason::Shutdown,
        })) => {}
        other => panic!("expected Unexpected(BYE), got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn login_closed_without_answer() {
    let (addr, server) = serve(|mut peer| peer.expect_login("tok"));
    assert!(matches!(
        Client::login(addr, "tok"),
        Err(ClientError::Closed)
    ));
    server.join().unwrap();
}

#[test]
fn connect_to_closed_port_is_io_error() {
    // Bind then drop, so the port is very likely unused.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(matches!(
        Client::login(addr, "tok"),
        Err(ClientError::Io(_))
    ));
}

#[test]
fn sends_reach_the_server_as_frames_and_raw_bytes() {
    let (addr, server) = serve_logged_in(|mut peer| {
        assert_eq!(
            peer.read_frame(),
            OwnedFrame::Send {
                client_id: 1,
                to: 2,
                body: b"hi".to_vec()
            }
        );
        assert_eq!(peer.read_frame(), OwnedFrame::Delivered { server_id: 9 });
        assert_eq!(
            peer.read_frame(),
            OwnedFrame::Read {
                server_id: 9,
                from: 3
            }
        );
        assert_eq!(peer.read_raw(3), [0xde, 0xad, 0xbe]);
    });
    let mut client = login(addr);
    client.send_msg(1, 2, b"hi").unwrap();
    client.send_delivered(9).unwrap();
    client.send_read(9, 3).unwrap();
    client.send_raw(&[0xde, 0xad, 0xbe]).unwrap();
    server.join().unwrap();
}

#[test]
fn recv_until_returns_match_and_backlogs_the_rest_in_order() {
    let (addr, server) = serve_logged_in(|mut peer| {
        peer.send(&[
            Frame::Deliver {
                server_id: 1,
                from: 7,
                server_time_ms: 10,
                client_id: None,
                body: b"a",
            },
            Frame::Receipt {
                kind: ReceiptKind::Delivered,
                server_id: 3,
                peer: 7,
            },
            Frame::Ack {
                client_id: 11,
                server_id: 4,
                server_time_ms: 20,
            },
            Frame::Pong { nonce: 5 },
        ]);
    });
    let mut client = login(addr);
    let ack = client
        .recv_until(|f| matches!(f, OwnedFrame::Ack { client_id: 11, .. }))
        .unwrap();
    assert_eq!(
        ack,
        OwnedFrame::Ack {
            client_id: 11,
            server_id: 4,
            server_time_ms: 20
        }
    );
    assert_eq!(client.backlog_len(), 2);
    assert!(matches!(
        client.recv().unwrap(),
        OwnedFrame::Deliver { server_id: 1, .. }
    ));
    assert!(matches!(
        client.recv().unwrap(),
        OwnedFrame::Receipt {
            kind: ReceiptKind::Delivered,
            ..
        }
    ));
    assert_eq!(client.recv().unwrap(), pong(5));
    server.join().unwrap();
    assert!(matches!(client.recv(), Err(ClientError::Closed)));
}

#[test]
fn recv_until_searches_the_backlog_first() {
    let (addr, server) = serve_logged_in(|mut peer| {
        peer.send(&[
            Frame::Pong { nonce: 1 },
            Frame::Pong { nonce: 2 },
            Frame::Pong { nonce: 3 },
        ]);
    });
    let mut client = login(addr);
    assert_eq!(client.recv_until(|f| *f == pong(3)).unwrap(), pong(3));
    // Taken from the middle of the backlog, without touching the socket.
    assert_eq!(client.recv_until(|f| *f == pong(2)).unwrap(), pong(2));
    assert_eq!(client.recv_timeout(Duration::ZERO).unwrap(), Some(pong(1)));
    server.join().unwrap();
}

#[test]
fn recv_until_timeout_keeps_skipped_frames() {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_logged_in(move |mut peer| {
        peer.send(&[Frame::Pong { nonce: 1 }]);
        // Stay open until the client has timed out.
        done_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    });
    let mut client = login(addr);
    let started = Instant::now();
    let result = client.recv_until_timeout(Duration::from_millis(100), |f| {
        matches!(f, OwnedFrame::Ack { .. })
    });
    assert!(matches!(result, Err(ClientError::Timeout)), "{result:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(client.backlog_len(), 1);
    assert_eq!(client.recv().unwrap(), pong(1));
    done_tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn recv_until_gives_up_when_the_backlog_is_full() {
    let (addr, server) = serve_logged_in(|mut peer| {
        let frames: Vec<Frame<'_>> = (0..=BACKLOG_FRAMES_MAX as u64)
            .map(|nonce| Frame::Pong { nonce })
            .collect();
        peer.send(&frames);
    });
    let mut client = login(addr);
    match client.recv_until(|_| false) {
        Err(ClientError::Unexpected(frame)) => {
            assert_eq!(frame, pong(BACKLOG_FRAMES_MAX as u64));
        }
        other => panic!("expected Unexpected, got {other:?}"),
    }
    assert_eq!(client.backlog_len(), BACKLOG_FRAMES_MAX);
    assert_eq!(client.recv().unwrap(), pong(0));
    server.join().unwrap();
}

#[test]
fn recv_times_out_and_the_connection_stays_usable() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_logged_in(move |mut peer| {
        go_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        peer.send(&[Frame::Pong { nonce: 8 }]);
    });
    let mut client = login(addr);
    client.set_read_timeout(Duration::from_millis(100));
    assert_eq!(client.read_timeout(), Duration::from_millis(100));
    let started = Instant::now();
    assert!(matches!(client.recv(), Err(ClientError::Timeout)));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert!(waited < PEER_TIMEOUT, "{waited:?}");
    assert_eq!(
        client.recv_timeout(Duration::from_millis(50)).unwrap(),
        None
    );

    go_tx.send(()).unwrap();
    client.set_read_timeout(PEER_TIMEOUT);
    assert_eq!(client.recv().unwrap(), pong(8));
    server.join().unwrap();
}

#[test]
fn partial_frame_survives_a_timeout() {
    let (half_tx, half_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_logged_in(move |mut peer| {
        let mut wire = Vec::new();
        proto::encode(
            &Frame::Deliver {
                server_id: 77,
                from: 1,
                server_time_ms: 2,
                client_id: None,
                body: b"split across two writes",
            },
            &mut wire,
        );
        let (first, second) = wire.split_at(wire.len() / 2);
        peer.send_raw(first);
        half_tx.send(()).unwrap();
        go_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        peer.send_raw(second);
    });
    let mut client = login(addr);
    half_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    assert_eq!(
        client.recv_timeout(Duration::from_millis(50)).unwrap(),
        None
    );
    go_tx.send(()).unwrap();
    match client.recv().unwrap() {
        OwnedFrame::Deliver {
            server_id: 77,
            body,
            ..
        } => assert_eq!(body, b"split across two writes"),
        other => panic!("expected DELIVER, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn zero_timeout_still_reads_what_has_arrived() {
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_logged_in(move |mut peer| {
        peer.send(&[Frame::Pong { nonce: 3 }]);
        sent_tx.send(()).unwrap();
    });
    let mut client = login(addr);
    sent_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    server.join().unwrap();
    // Loopback delivery is immediate, but give it a moment anyway.
    thread::sleep(Duration::from_millis(20));
    assert_eq!(client.recv_timeout(Duration::ZERO).unwrap(), Some(pong(3)));
}

#[test]
fn ping_waits_for_its_pong_and_backlogs_the_rest() {
    let (addr, server) = serve_logged_in(|mut peer| {
        assert_eq!(peer.read_frame(), OwnedFrame::Ping { nonce: 99 });
        peer.send(&[
            Frame::Pong { nonce: 1 },
            Frame::Receipt {
                kind: ReceiptKind::Read,
                server_id: 2,
                peer: 3,
            },
            Frame::Pong { nonce: 99 },
        ]);
    });
    let mut client = login(addr);
    client.ping(99).unwrap();
    assert_eq!(client.recv().unwrap(), pong(1));
    assert!(matches!(
        client.recv().unwrap(),
        OwnedFrame::Receipt {
            kind: ReceiptKind::Read,
            ..
        }
    ));
    server.join().unwrap();
}

#[test]
fn wait_closed_returns_backlog_and_final_frames() {
    let (addr, server) = serve_logged_in(|mut peer| {
        peer.send(&[
            Frame::Pong { nonce: 1 },
            Frame::Ack {
                client_id: 1,
                server_id: 1,
                server_time_ms: 1,
            },
            Frame::Error {
                code: ErrorCode::Malformed,
                client_id: 0,
                text: "bad varint",
            },
            Frame::Bye {
                reason: ByeReason::Error,
            },
        ]);
    });
    let mut client = login(addr);
    client
        .recv_until(|f| matches!(f, OwnedFrame::Ack { .. }))
        .unwrap();
    let frames = client.wait_closed(PEER_TIMEOUT).unwrap();
    assert_eq!(
        frames,
        vec![
            pong(1),
            OwnedFrame::Error {
                code: ErrorCode::Malformed,
                client_id: 0,
                text: "bad varint".to_string()
            },
            OwnedFrame::Bye {
                reason: ByeReason::Error
            },
        ]
    );
    assert_eq!(client.backlog_len(), 0);
    server.join().unwrap();
    // Closing again is immediate and sees nothing new.
    assert_eq!(client.wait_closed(Duration::ZERO).unwrap(), vec![]);
}

#[test]
fn wait_closed_times_out_on_an_open_connection() {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_logged_in(move |mut peer| {
        peer.send(&[Frame::Pong { nonce: 4 }]);
        done_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    });
    let mut client = login(addr);
    assert!(matches!(
        client.wait_closed(Duration::from_millis(100)),
        Err(ClientError::Timeout)
    ));
    // What was seen is not lost.
    assert_eq!(client.recv().unwrap(), pong(4));
    done_tx.send(()).unwrap();
    server.join().unwrap();
    assert_eq!(client.wait_closed(PEER_TIMEOUT).unwrap(), vec![]);
}

#[test]
fn wait_closed_treats_reset_as_closed() {
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_logged_in(move |mut peer| {
        sent_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        peer.send(&[Frame::Bye {
            reason: ByeReason::Slow,
        }]);
        // Let BYE leave before the close: closing with the client's bytes
        // unread makes the kernel send RST instead of FIN.
        thread::sleep(Duration::from_millis(50));
    });
    let mut client = login(addr);
    client.send_raw(b"unread by the server").unwrap();
    thread::sleep(Duration::from_millis(20));
    sent_tx.send(()).unwrap();
    server.join().unwrap();
    let frames = client.wait_closed(PEER_TIMEOUT).unwrap();
    assert_eq!(
        frames,
        vec![OwnedFrame::Bye {
            reason: ByeReason::Slow
        }]
    );
}

#[test]
fn undecodable_server_bytes_are_decode_errors() {
    let (addr, server) = serve_logged_in(|mut peer| {
        // A one-byte frame with type 0xff.
        peer.send_raw(&[0x01, 0xff]);
    });
    let mut client = login(addr);
    assert!(matches!(
        client.recv(),
        Err(ClientError::Decode(DecodeError::UnknownType(0xff)))
    ));
    server.join().unwrap();
}

#[test]
fn oversized_frame_is_refused_by_the_client_limits() {
    let (addr, server) = serve_logged_in(|mut peer| {
        // Length prefix 0x10_0000 (1 MiB) as LEB128; no body needed.
        peer.send_raw(&[0x80, 0x80, 0x40]);
    });
    let mut client = login(addr);
    assert!(matches!(
        client.recv(),
        Err(ClientError::Decode(DecodeError::TooLarge { .. }))
    ));
    server.join().unwrap();
}

#[test]
fn close_in_the_middle_of_a_frame_is_a_decode_error() {
    let (addr, server) = serve_logged_in(|mut peer| {
        let mut wire = Vec::new();
        proto::encode(&Frame::Pong { nonce: 300 }, &mut wire);
        peer.send_raw(&wire[..wire.len() - 1]);
    });
    let mut client = login(addr);
    server.join().unwrap();
    assert!(matches!(
        client.recv(),
        Err(ClientError::Decode(DecodeError::Malformed(_)))
    ));
}

#[test]
fn shutdown_write_lets_the_client_still_read() {
    let (addr, server) = serve_logged_in(|mut peer| {
        let mut rest = Vec::new();
        peer.stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        peer.send(&[Frame::Bye {
            reason: ByeReason::Idle,
        }]);
    });
    let mut client = login(addr);
    client.shutdown_write().unwrap();
    assert_eq!(
        client.wait_closed(PEER_TIMEOUT).unwrap(),
        vec![OwnedFrame::Bye {
            reason: ByeReason::Idle
        }]
    );
    server.join().unwrap();
}

#[test]
fn addresses_and_debug() {
    let (addr, server) = serve_logged_in(|_| {});
    let client = login(addr);
    assert_eq!(client.peer_addr().unwrap(), addr);
    assert_eq!(client.local_addr().unwrap().ip(), addr.ip());
    assert!(client.stream().nodelay().unwrap());
    let debug = format!("{client:?}");
    assert!(debug.contains("backlog_frames"), "{debug}");
    server.join().unwrap();
}

#[test]
fn error_display() {
    let rejected = ClientError::LoginRejected {
        code: ErrorCode::TokenExpired,
        text: "expired at 100".to_string(),
    };
    let shown = rejected.to_string();
    assert!(shown.starts_with("login rejected: "), "{shown}");
    assert!(shown.contains(ErrorCode::TokenExpired.as_str()), "{shown}");
    assert!(shown.contains("expired at 100"), "{shown}");
    assert_eq!(
        ClientError::Closed.to_string(),
        "connection closed by server"
    );
    let unexpected = ClientError::Unexpected(pong(1)).to_string();
    assert!(
        unexpected.contains(Frame::Pong { nonce: 1 }.name()),
        "{unexpected}"
    );
    let decode = ClientError::from(DecodeError::UnknownType(0x42)).to_string();
    assert!(decode.contains("0x42"), "{decode}");
}
