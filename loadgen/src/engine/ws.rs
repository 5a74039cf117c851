//! WebSocket (RFC 6455) over any [`Engine`] (`--ws`): each connection does
//! the HTTP upgrade, then carries the driver's Tern bytes as masked binary
//! messages and hands it the payloads of the server's binary messages.
//!
//! The driver sees the same contract: [`Event::Connected`] comes once the
//! server answered `101 Switching Protocols` with the right
//! `Sec-WebSocket-Accept` (not at the TCP connect), [`Event::Recv`] carries
//! payload bytes, and [`Engine::send`] takes Tern bytes (one binary message
//! per call). A refused or malformed upgrade is [`Event::ConnectFailed`]
//! with `EPROTO` (the inner slot is closed here and its release swallowed);
//! a close frame from the server is [`Event::PeerClosed`] with errno 0 (after
//! a close frame is sent back), a frame breaking the protocol (masked,
//! text, reserved bits or opcodes) is [`Event::PeerClosed`] with `EPROTO`.
//! Server pings are answered with pongs.
//!
//! Memory: one byte per slot; a buffer only while an upgrade answer or a
//! server frame is partial (in a map, so idle connections own none).

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use base64::Engine as _;

use super::{Engine, EngineStats, Event};

/// Largest upgrade answer taken; a longer one fails the connect.
const RESPONSE_BYTES_MAX: usize = 4096;
/// Largest server frame buffered while partial; a longer one breaks the
/// connection (`EPROTO`). The server sends one message per flush.
const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Slot phases.
const P_IDLE: u8 = 0;
/// Upgrade request sent, answer not complete.
const P_UPGRADING: u8 = 1;
/// Upgraded; `Connected` reported.
const P_OPEN: u8 = 2;
/// A close frame or protocol error was seen: nothing more is read or sent.
const P_DONE: u8 = 3;

/// What the upgrade looks like: the same for every connection but its key.
#[derive(Clone, Debug)]
pub struct WsSettings {
    /// `Host` header: the first `--server`.
    pub host: String,
    /// `Origin` header, if any (`--ws-origin`).
    pub origin: Option<String>,
}

/// Wraps an engine with WebSocket; see the module docs.
pub struct WsEngine<E> {
    inner: E,
    settings: WsSettings,
    phase: Vec<u8>,
    /// Partial upgrade answers and partial server frames, by slot.
    partial: HashMap<u32, Vec<u8>>,
    /// Expected `Sec-WebSocket-Accept` of slots upgrading.
    accept: HashMap<u32, String>,
    /// The inner slot was closed here after a failed upgrade: its
    /// `Released` is not the driver's business.
    swallow_release: Vec<bool>,
    rng: u64,
    inner_events: Vec<Event>,
    inner_scratch: Vec<u8>,
    out: Vec<u8>,
}

/// What [`decode`] found in the bytes of an open connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// All complete frames taken; bytes from `used` on are a partial frame.
    More {
        /// Bytes consumed.
        used: usize,
    },
    /// The server sent a close frame (its code, or 1000 without one).
    Closed(u16),
    /// The server broke the protocol.
    Broken,
}

/// Appends `payload` as one masked client frame with `opcode` (FIN set).
pub fn put_masked(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n <= 125 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, &b)| b ^ mask[i & 3]));
}

/// Takes the server frames in `b`: binary (and continuation) payloads are
/// appended to `plain`, ping payloads to `pings` (one `Vec` each, answered
/// by the caller).
pub fn decode(b: &[u8], plain: &mut Vec<u8>, pings: &mut Vec<Vec<u8>>) -> Decoded {
    let mut at = 0;
    loop {
        let f = &b[at..];
        if f.len() < 2 {
            return Decoded::More { used: at };
        }
        let (rsv, opcode, masked) = (f[0] & 0x70, f[0] & 0x0f, f[1] & 0x80 != 0);
        if rsv != 0 || masked {
            return Decoded::Broken; // no extensions; servers never mask
        }
        let (len, head) = match f[1] & 0x7f {
            126 if f.len() >= 4 => (u64::from(u16::from_be_bytes([f[2], f[3]])), 4),
            127 if f.len() >= 10 => (u64::from_be_bytes(f[2..10].try_into().unwrap()), 10),
            126 | 127 => return Decoded::More { used: at },
            n => (u64::from(n), 2),
        };
        if len > FRAME_BYTES_MAX as u64 {
            return Decoded::Broken;
        }
        let end = head + len as usize;
        if f.len() < end {
            return Decoded::More { used: at };
        }
        let payload = &f[head..end];
        match opcode {
            0x0 | 0x2 => plain.extend_from_slice(payload),
            0x9 if payload.len() <= 125 => pings.push(payload.to_vec()),
            0xA => {}
            0x8 => {
                let code = match payload {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => 1000,
                };
                return Decoded::Closed(code);
            }
            _ => return Decoded::Broken, // text, reserved, oversized ping
        }
        at += end;
    }
}

impl<E: Engine> WsEngine<E> {
    /// Wraps `inner` (slots `0..conns`); `seed` varies the keys and masks.
    pub fn new(inner: E, conns: u32, settings: WsSettings, seed: u64) -> Self {
        WsEngine {
            inner,
            settings,
            phase: vec![P_IDLE; conns as usize],
            partial: HashMap::new(),
            accept: HashMap::new(),
            swallow_release: vec![false; conns as usize],
            rng: seed | 1,
            inner_events: Vec::new(),
            inner_scratch: Vec::new(),
            out: Vec::new(),
        }
    }

    /// xorshift64: keys and masks need not be secret from a load generator.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_ne_bytes()
    }

    /// Sends the upgrade request on slot `l`, just connected.
    fn upgrade(&mut self, l: u32) {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.next().to_ne_bytes());
        key[8..].copy_from_slice(&self.next().to_ne_bytes());
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        let origin = match &self.settings.origin {
            Some(o) => format!("Origin: {o}\r\n"),
            None => String::new(),
        };
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n",
            self.settings.host
        );
        self.accept.insert(l, tern::ws::accept_key(key.as_bytes()));
        self.phase[l as usize] = P_UPGRADING;
        self.inner.send(l, req.as_bytes());
    }

    /// The upgrade of slot `l` failed: close it, tell the driver the connect failed.
    fn fail_upgrade(&mut self, l: u32, errno: i32, events: &mut Vec<Event>) {
        self.forget(l);
        self.swallow_release[l as usize] = true;
        self.inner.close(l);
        events.push(Event::ConnectFailed(l, errno));
    }

    fn forget(&mut self, l: u32) {
        self.phase[l as usize] = P_IDLE;
        self.partial.remove(&l);
        self.accept.remove(&l);
    }

    /// Upgrade answer bytes on slot `l`; what follows the answer is frames.
    fn on_upgrade_bytes(
        &mut self,
        l: u32,
        data: &[u8],
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) {
        let mut buf = self.partial.remove(&l).unwrap_or_default();
        buf.extend_from_slice(data);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > RESPONSE_BYTES_MAX {
                return self.fail_upgrade(l, libc::EPROTO, events);
            }
            self.partial.insert(l, buf);
            return;
        };
        let head = &buf[..end + 2];
        let expected = self.accept.remove(&l).unwrap_or_default();
        let ok = head.starts_with(b"HTTP/1.1 101 ")
            && head.split(|&b| b == b'\n').any(|line| {
                let line = line.trim_ascii();
                line.len() > 21
                    && line[..21].eq_ignore_ascii_case(b"sec-websocket-accept:")
                    && line[21..].trim_ascii() == expected.as_bytes()
            });
        if !ok {
            return self.fail_upgrade(l, libc::EPROTO, events);
        }
        self.phase[l as usize] = P_OPEN;
        events.push(Event::Connected(l));
        let rest = buf[end + 4..].to_vec();
        if !rest.is_empty() {
            self.on_frames(l, &rest, events, scratch);
        }
    }

    /// Frame bytes on open slot `l`.
    fn on_frames(&mut self, l: u32, data: &[u8], events: &mut Vec<Event>, scratch: &mut Vec<u8>) {
        let held = self.partial.remove(&l);
        let joined;
        let bytes = match held {
            Some(mut h) => {
                h.extend_from_slice(data);
                joined = h;
                &joined[..]
            }
            None => data,
        };
        let begin = scratch.len();
        let mut pings = Vec::new();
        let decoded = decode(bytes, scratch, &mut pings);
        if scratch.len() > begin {
            events.push(Event::Recv(l, begin, scratch.len() - begin));
        }
        for p in pings {
            let mask = self.mask();
            self.out.clear();
            put_masked(0xA, &p, mask, &mut self.out);
            self.inner.send(l, &self.out);
        }
        match decoded {
            Decoded::More { used } => {
                if used < bytes.len() {
                    self.partial.insert(l, bytes[used..].to_vec());
                }
            }
            Decoded::Closed(code) => {
                let mask = self.mask();
                self.out.clear();
                put_masked(0x8, &code.to_be_bytes(), mask, &mut self.out);
                self.inner.send(l, &self.out);
                self.phase[l as usize] = P_DONE;
                events.push(Event::PeerClosed(l, 0));
            }
            Decoded::Broken => {
                self.phase[l as usize] = P_DONE;
                events.push(Event::PeerClosed(l, libc::EPROTO));
            }
        }
    }
}

impl<E: Engine> Engine for WsEngine<E> {
    fn open(&mut self, conn: u32, src: usize, dst: usize) -> io::Result<()> {
        self.inner.open(conn, src, dst)
    }

    fn send(&mut self, conn: u32, bytes: &[u8]) {
        if self.phase[conn as usize] != P_OPEN {
            return;
        }
        let mask = self.mask();
        self.out.clear();
        put_masked(0x2, bytes, mask, &mut self.out);
        self.inner.send(conn, &self.out);
    }

    fn close(&mut self, conn: u32) {
        self.forget(conn);
        self.inner.close(conn);
    }

    fn poll(
        &mut self,
        timeout: Duration,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.inner_scratch.clear();
        let mut inner_events = std::mem::take(&mut self.inner_events);
        let mut inner_scratch = std::mem::take(&mut self.inner_scratch);
        let result = self
            .inner
            .poll(timeout, &mut inner_events, &mut inner_scratch);
        for ev in inner_events.drain(..) {
            match ev {
                Event::Connected(l) => self.upgrade(l),
                Event::Recv(l, start, len) => {
                    let data = &inner_scratch[start..start + len];
                    match self.phase[l as usize] {
                        P_UPGRADING => self.on_upgrade_bytes(l, data, events, scratch),
                        P_OPEN => self.on_frames(l, data, events, scratch),
                        _ => {}
                    }
                }
                Event::PeerClosed(l, errno) => match self.phase[l as usize] {
                    P_UPGRADING => self.fail_upgrade(
                        l,
                        if errno == 0 { libc::ECONNRESET } else { errno },
                        events,
                    ),
                    P_OPEN => events.push(ev),
                    // P_DONE: already reported.
                    _ => {}
                },
                Event::Released(l) => {
                    if std::mem::take(&mut self.swallow_release[l as usize]) {
                        continue;
                    }
                    self.forget(l);
                    events.push(ev);
                }
                Event::ConnectFailed(..) => events.push(ev),
            }
        }
        self.inner_events = inner_events;
        self.inner_scratch = inner_scratch;
        result
    }

    fn stats(&self) -> EngineStats {
        self.inner.stats()
    }

    fn server_index(&mut self, addr: std::net::SocketAddr) -> Option<usize> {
        self.inner.server_index(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_are_masked_and_the_server_reads_them() {
        let mut out = Vec::new();
        for len in [0, 5, 125, 126, 65535, 65536] {
            out.clear();
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            put_masked(0x2, &payload, [1, 2, 3, 4], &mut out);
            let mut rx = tern::ws::WsRx::default();
            let (mut plain, mut answer) = (Vec::new(), Vec::new());
            rx.read(&out, 1 << 20, &mut plain, &mut answer).unwrap();
            assert_eq!(plain, payload, "{len}");
            assert!(answer.is_empty());
        }
    }

    #[test]
    fn server_frames_decode_in_any_split() {
        let mut wire = Vec::new();
        tern::ws::put_binary(b"hello", &mut wire);
        tern::ws::put_binary(&[7; 300], &mut wire);
        wire.extend_from_slice(&[0x89, 2, b'h', b'i']); // ping
        tern::ws::put_binary(&[9; 70_000], &mut wire);
        for cut in [1, 3, 7, 306, 310, wire.len() - 1] {
            let (mut plain, mut pings) = (Vec::new(), Vec::new());
            let Decoded::More { used } = decode(&wire[..cut], &mut plain, &mut pings) else {
                panic!()
            };
            let rest = wire[used..].to_vec();
            assert_eq!(
                decode(&rest, &mut plain, &mut pings),
                Decoded::More { used: rest.len() }
            );
            assert_eq!(plain.len(), 5 + 300 + 70_000, "{cut}");
            assert_eq!(&plain[..5], b"hello");
            assert_eq!(pings, vec![b"hi".to_vec()]);
        }
    }

    #[test]
    fn close_and_violations() {
        let (mut plain, mut pings) = (Vec::new(), Vec::new());
        let mut close = Vec::new();
        tern::ws::put_close(1002, &mut close);
        assert_eq!(
            decode(&close, &mut plain, &mut pings),
            Decoded::Closed(1002)
        );
        assert_eq!(
            decode(&[0x81, 1, b'x'], &mut plain, &mut pings),
            Decoded::Broken
        );
        assert_eq!(
            decode(&[0x82, 0x81, 0, 0, 0, 0, b'x'], &mut plain, &mut pings),
            Decoded::Broken
        );
        assert_eq!(decode(&[0xc2, 0], &mut plain, &mut pings), Decoded::Broken);
    }
}
