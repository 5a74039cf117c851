//! A small WebSocket client (RFC 6455) for tests that need one beside
//! their own: the upgrade, masked binary messages (whole, fragmented or
//! cut anywhere), ping, and the server's frames read back as Tern frames.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use tern::proto::{self, Frame, Limits, OwnedFrame};

use super::WAIT;

/// The RFC 6455 §1.3 example key; the server must answer with
/// [`ACCEPT`].
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// One WebSocket client connection.
pub struct WsClient {
    s: TcpStream,
    /// Read from the socket, not yet parsed as WebSocket frames.
    raw: Vec<u8>,
    /// Payload of binary messages, not yet decoded as Tern frames.
    stream: Vec<u8>,
}

/// A masked client frame: `first` is the FIN/opcode byte.
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    ws_frame(first, payload, true)
}

/// A frame with a client's mask or, to test the refusal, without one.
pub fn ws_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut f = vec![first];
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
    f
}

/// An upgrade request for `/tern` with `extra` header lines (each ending
/// in CRLF).
pub fn request(extra: &str) -> String {
    format!(
        "GET /tern HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {extra}\r\n"
    )
}

/// `frames` encoded back to back.
pub fn tern_bytes(frames: &[Frame<'_>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for f in frames {
        proto::encode(f, &mut bytes);
    }
    bytes
}

impl WsClient {
    /// Connects to `addr` and upgrades; panics unless the answer is 101
    /// with the right accept key.
    pub fn upgrade(addr: SocketAddr) -> WsClient {
        WsClient::upgrade_with(addr, "").0
    }

    /// Upgrades with `extra` header lines (each ending in CRLF); returns
    /// the client and the head of the 101 answer.
    pub fn upgrade_with(addr: SocketAddr, extra: &str) -> (WsClient, String) {
        let (client, head) = WsClient::open(addr, &request(extra));
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")),
            "{head}"
        );
        (client, head)
    }

    /// Connects, sends `req` as it is and reads the HTTP answer's head,
    /// whatever it is; returns the client and the head.
    pub fn open(addr: SocketAddr, req: &str) -> (WsClient, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        WsClient::answered(s)
    }

    /// Reads the HTTP answer's head on `s`, whose request went out.
    pub fn answered(mut s: TcpStream) -> (WsClient, String) {
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
        let client = WsClient {
            s,
            raw,
            stream: Vec::new(),
        };
        (client, head)
    }

    /// Reads to EOF (the server closes); returns what came.
    pub fn read_to_end(mut self) -> Vec<u8> {
        let mut rest = self.raw;
        self.s
            .read_to_end(&mut rest)
            .expect("closed within the wait");
        rest
    }

    /// Sends one frame, masked or not: `first` is the FIN/opcode byte.
    pub fn frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        self.send_raw(&ws_frame(first, payload, masked));
    }

    /// The payload stream of the binary messages so far plus the next
    /// one's (for protocols other than Tern's); panics on anything but a
    /// binary message.
    pub fn recv_stream(&mut self) -> &mut Vec<u8> {
        match self.next() {
            Some((0x2, payload)) => self.stream.extend_from_slice(&payload),
            other => panic!("expected a binary message, got {other:?}"),
        }
        &mut self.stream
    }

    /// The payload bytes received and not yet used.
    pub fn stream(&mut self) -> &mut Vec<u8> {
        &mut self.stream
    }

    /// Sends `bytes` as they are (frames, or a piece of one).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Sends `frames` in one binary message.
    pub fn send(&mut self, frames: &[Frame<'_>]) {
        self.send_raw(&client_frame(0x82, &tern_bytes(frames)));
    }

    /// The next server frame, (opcode, payload); `None` at end of stream.
    pub fn next(&mut self) -> Option<(u8, Vec<u8>)> {
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

    /// The next Tern frame from the binary messages; a pong's payload
    /// goes to `pongs`. Panics on anything else (a close, the end).
    pub fn recv_with_pongs(&mut self, pongs: &mut Vec<Vec<u8>>) -> OwnedFrame {
        loop {
            if let Some((f, used)) = proto::decode(&self.stream, &Limits::default()).unwrap() {
                let owned = f.to_owned();
                self.stream.drain(..used);
                return owned;
            }
            match self.next() {
                Some((0x2, payload)) => self.stream.extend_from_slice(&payload),
                Some((0xA, payload)) => pongs.push(payload),
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// The next Tern frame from the binary messages.
    pub fn recv(&mut self) -> OwnedFrame {
        let mut pongs = Vec::new();
        let f = self.recv_with_pongs(&mut pongs);
        assert!(pongs.is_empty(), "unexpected pong {pongs:?}");
        f
    }

    /// The next Tern frame matching `want`, skipping others.
    pub fn recv_until(&mut self, want: impl Fn(&OwnedFrame) -> bool) -> OwnedFrame {
        loop {
            let f = self.recv();
            if want(&f) {
                return f;
            }
        }
    }

    /// Reads to the end: the close code the server sent, then EOF.
    pub fn close_code(&mut self) -> u16 {
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

    /// LOGIN as `token`; panics unless LOGIN_OK comes.
    pub fn login(&mut self, token: &str) {
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
