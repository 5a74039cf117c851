//! WebSocket transport (RFC 6455) on its own listener (`ws_listen`), for
//! browsers, which cannot open a raw TCP connection.
//!
//! Like TLS ([`crate::tls`]) this is a per-connection transform the session
//! logic never sees: the shard hands a WebSocket connection's bytes to its
//! [`WsRx`], runs the usual frame processing on the payload bytes that come
//! out, and wraps its output in one binary message per flush.
//!
//! **Stream, not messages.** The payloads of a connection's binary messages
//! are one byte stream of Tern frames, exactly as on TCP: a message may hold
//! several frames or part of one. A message (all its fragments together)
//! holds at most `frame_bytes_max` bytes.
//!
//! **Memory.** An open, idle WebSocket connection keeps no buffer: only
//! a partial frame (or a fragmented message still open) keeps a [`WsRx`]
//! in the connection's on-demand buffers, which go when it is complete.
//!
//! Everything here is pure: bytes in, bytes out, no sockets.

use base64::Engine as _;

/// Largest HTTP upgrade request, bytes: a browser's is under 1 KiB, so
/// 4 KiB is generous; a longer one is refused with 431.
pub const HANDSHAKE_BYTES_MAX: usize = 4096;
/// Most header lines in an upgrade request; more is refused with 431.
const HEADERS_MAX: usize = 32;
/// The GUID RFC 6455 §1.3 appends to the client's key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest payload of a control frame (RFC 6455 §5.5).
const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Largest frame header: 2 bytes, 8 of extended length, 4 of mask.
const HEADER_BYTES_MAX: usize = 14;

/// The WebSocket subprotocol that makes a connection an MQTT one.
pub const MQTT_SUBPROTOCOL: &str = "mqtt";

/// Close codes the server sends (RFC 6455 §7.4.1).
pub mod close {
    /// Normal closure: the server ends the connection (after a BYE) or
    /// answers the client's close.
    pub const NORMAL: u16 = 1000;
    /// Protocol error: an unmasked client frame, reserved bits or opcodes,
    /// a bad continuation, a fragmented or oversized control frame.
    pub const PROTOCOL: u16 = 1002;
    /// Unsupported data: a text message (Tern frames are binary).
    pub const UNSUPPORTED: u16 = 1003;
    /// Message too big: more than `frame_bytes_max` bytes in one message.
    pub const TOO_BIG: u16 = 1009;
}

/// What [`handshake`] made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The request is not complete yet (and is under the size limit).
    Incomplete,
    /// The upgrade is accepted: send `response`; bytes after the request
    /// start at `used` and are WebSocket frames.
    Accept {
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Bytes of the request.
        used: usize,
        /// The client offered the `mqtt` subprotocol and it was chosen:
        /// the payload stream is MQTT, not Tern frames (docs/MQTT.md).
        mqtt: bool,
    },
    /// The request is refused: send `response` (an HTTP error) and close.
    Refuse {
        /// The HTTP status sent.
        status: u16,
        /// The whole response.
        response: Vec<u8>,
    },
}

fn refuse(status: u16, reason: &str, extra: &str) -> Handshake {
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes();
    Handshake::Refuse { status, response }
}

/// Whether a comma-separated header value has `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`: base64 of
/// the SHA-1 of the key and the GUID (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// Parses an HTTP upgrade request in `buf` (everything received so far)
/// and decides. `origins` is the allow-list of `Origin` values; empty
/// allows any (and requests without `Origin`, as non-browser clients send).
pub fn handshake(buf: &[u8], origins: &[String]) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= HANDSHAKE_BYTES_MAX => n,
        Ok(httparse::Status::Complete(_)) => {
            return refuse(431, "Request Header Fields Too Large", "")
        }
        Ok(httparse::Status::Partial) if buf.len() < HANDSHAKE_BYTES_MAX => {
            return Handshake::Incomplete
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return refuse(431, "Request Header Fields Too Large", "")
        }
        Err(_) => return refuse(400, "Bad Request", ""),
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return refuse(400, "Bad Request", "");
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let upgrade = header("Upgrade").is_some_and(|v| has_token(v, "websocket"));
    let connection = header("Connection").is_some_and(|v| has_token(v, "upgrade"));
    if !upgrade || !connection {
        return refuse(400, "Bad Request", "");
    }
    if header("Sec-WebSocket-Version") != Some(b"13") {
        return refuse(426, "Upgrade Required", "Sec-WebSocket-Version: 13\r\n");
    }
    let Some(key) = header("Sec-WebSocket-Key").map(<[u8]>::trim_ascii) else {
        return refuse(400, "Bad Request", "");
    };
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return refuse(400, "Bad Request", "");
    }
    if !origins.is_empty() {
        let allowed = header("Origin")
            .is_some_and(|o| origins.iter().any(|a| a.as_bytes() == o.trim_ascii()));
        if !allowed {
            return refuse(403, "Forbidden", "");
        }
    }
    // MQTT over WebSocket (MQTT 3.1.1 §6, 5.0 §6): the client offers
    // `mqtt` among its subprotocols. The header may repeat; subprotocol
    // names are case-sensitive (RFC 6455 §4.1), the answer must match.
    let mqtt = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| t.trim_ascii() == MQTT_SUBPROTOCOL.as_bytes());
    let protocol = if mqtt {
        "Sec-WebSocket-Protocol: mqtt\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{protocol}\r\n",
        accept_key(key)
    )
    .into_bytes();
    Handshake::Accept {
        response,
        used,
        mqtt,
    }
}

/// Appends a frame header for an unmasked server frame (FIN set).
fn put_header(opcode: u8, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    if len <= 125 {
        out.push(len as u8);
    } else if len <= 0xffff {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends `payload` as one binary message (server frames are unmasked).
pub fn put_binary(payload: &[u8], out: &mut Vec<u8>) {
    put_header(0x2, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and no reason.
pub fn put_close(code: u16, out: &mut Vec<u8>) {
    put_header(0x8, 2, out);
    out.extend_from_slice(&code.to_be_bytes());
}

/// What one [`WsRx::read`] found besides payload bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The peer sent a close frame; the answer is in `out`, nothing more
    /// may be sent.
    pub peer_closed: bool,
}

/// Receive state of an open WebSocket connection; [`WsRx::is_idle`] when
/// no frame or message is partial (then it owns no allocation and the
/// shard does not keep it).
#[derive(Debug, Default)]
pub struct WsRx {
    /// Bytes of a frame not yet complete; at most 14 + `frame_bytes_max`
    /// (the length is checked from the header, before the payload waits).
    raw: Vec<u8>,
    /// A fragmented binary message is open (its first frame had no FIN).
    in_message: bool,
    /// Payload bytes of the open message so far, `0..=frame_bytes_max`.
    message_bytes: usize,
}

impl WsRx {
    /// True when nothing is partial.
    pub fn is_idle(&self) -> bool {
        self.raw.is_empty() && !self.in_message
    }

    /// Live upgrade: the state in parts, (a fragmented message is open,
    /// its payload bytes so far, the bytes of a frame not yet complete).
    pub fn into_parts(self) -> (bool, usize, Vec<u8>) {
        (self.in_message, self.message_bytes, self.raw)
    }

    /// Live upgrade: the state of [`WsRx::into_parts`] without its partial
    /// frame, which is then fed to [`WsRx::read`] with what followed it.
    /// `message_bytes` must be at most the `message_bytes_max` given to
    /// `read`.
    pub fn resume(in_message: bool, message_bytes: usize) -> WsRx {
        WsRx {
            raw: Vec::new(),
            in_message,
            message_bytes: if in_message { message_bytes } else { 0 },
        }
    }

    /// Takes `data` from the socket: binary payload bytes (unmasked) are
    /// appended to `plain`, frames to send (pong, close) to `out`. On a
    /// protocol violation a close frame with the code is in `out` and the
    /// code is returned: send `out`, then close the connection.
    pub fn read(
        &mut self,
        data: &[u8],
        message_bytes_max: usize,
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<ReadOutcome, u16> {
        let buffered = !self.raw.is_empty();
        let mut raw = std::mem::take(&mut self.raw);
        if buffered {
            raw.extend_from_slice(data);
        }
        let bytes: &[u8] = if buffered { &raw } else { data };
        let mut at = 0;
        let mut outcome = ReadOutcome::default();
        // Each round consumes one frame of at least 2 bytes.
        for _ in 0..bytes.len() / 2 + 1 {
            match self.frame(&bytes[at..], message_bytes_max, plain, out) {
                Ok(Some((used, closed))) => {
                    at += used;
                    if closed {
                        outcome.peer_closed = true;
                        return Ok(outcome);
                    }
                }
                Ok(None) => break,
                Err(code) => {
                    put_close(code, out);
                    return Err(code);
                }
            }
        }
        if at < bytes.len() {
            let rest = bytes[at..].to_vec();
            self.raw = rest;
        }
        Ok(outcome)
    }

    /// Handles the frame at the start of `b`: `Ok(None)` when it is not
    /// complete, else its length and whether it was a close.
    fn frame(
        &mut self,
        b: &[u8],
        message_bytes_max: usize,
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Option<(usize, bool)>, u16> {
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
        let masked = b[1] & 0x80 != 0;
        if rsv != 0 || !masked {
            return Err(close::PROTOCOL); // no extensions; clients must mask
        }
        let (len, mut at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()), 10),
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        let control = opcode & 0x8 != 0;
        if control && (!fin || len > CONTROL_PAYLOAD_BYTES_MAX as u64) {
            return Err(close::PROTOCOL);
        }
        match opcode {
            0x1 => return Err(close::UNSUPPORTED),
            0x0 if !self.in_message => return Err(close::PROTOCOL),
            0x2 if self.in_message => return Err(close::PROTOCOL),
            0x0 | 0x2 | 0x8 | 0x9 | 0xA => {}
            _ => return Err(close::PROTOCOL),
        }
        if !control {
            // Checked before the payload is waited for: `raw` stays bounded.
            let so_far = if opcode == 0x0 { self.message_bytes } else { 0 };
            if len > message_bytes_max.saturating_sub(so_far) as u64 {
                return Err(close::TOO_BIG);
            }
        }
        debug_assert!(at + 4 <= HEADER_BYTES_MAX);
        if b.len() < at + 4 {
            return Ok(None);
        }
        let mask: [u8; 4] = b[at..at + 4].try_into().unwrap();
        at += 4;
        let len = len as usize;
        if b.len() < at + len {
            return Ok(None);
        }
        let unmasked = b[at..at + len]
            .iter()
            .enumerate()
            .map(|(i, &x)| x ^ mask[i & 3]);
        let used = at + len;
        match opcode {
            0x0 | 0x2 => {
                plain.extend(unmasked);
                self.in_message = !fin;
                self.message_bytes = if fin {
                    0
                } else {
                    self.message_bytes * usize::from(opcode == 0x0) + len
                };
                Ok(Some((used, false)))
            }
            0x9 => {
                let payload: Vec<u8> = unmasked.collect();
                put_header(0xA, payload.len(), out);
                out.extend_from_slice(&payload);
                Ok(Some((used, false)))
            }
            0xA => Ok(Some((used, false))),
            _ => {
                // Close: echo the peer's code (RFC 6455 §5.5.1), or 1000.
                let payload: Vec<u8> = unmasked.take(2).collect();
                let code = match payload[..] {
                    [a, b] => u16::from_be_bytes([a, b]),
                    _ => close::NORMAL,
                };
                put_close(code, out);
                Ok(Some((used, true)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first];
        match payload.len() {
            n if n <= 125 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, &x)| x ^ mask[i & 3]));
        f
    }

    const REQ: &str = "GET /tern HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nOrigin: https://chat.example\r\n\r\n";

    #[test]
    fn a_state_resumed_from_its_parts_reads_on_as_before() {
        // A fragmented message (first frame whole), then half of the last.
        let mut bytes = client_frame(0x02, b"hello ");
        let last = client_frame(0x80, b"world");
        bytes.extend_from_slice(&last[..4]);
        let mut rx = WsRx::default();
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        rx.read(&bytes, 64, &mut plain, &mut out).unwrap();
        assert_eq!(plain, b"hello ");
        let (in_message, message_bytes, raw) = rx.into_parts();
        assert_eq!((in_message, message_bytes), (true, 6));
        assert_eq!(raw, last[..4]);
        // The successor: the partial frame and the rest arrive together.
        let mut rx = WsRx::resume(in_message, message_bytes);
        let mut rest = raw;
        rest.extend_from_slice(&last[4..]);
        plain.clear();
        rx.read(&rest, 64, &mut plain, &mut out).unwrap();
        assert_eq!(plain, b"world");
        assert!(rx.is_idle() && out.is_empty());
        // The size limit counts the bytes before the hand-over, and a
        // state larger than the successor's limit is refused, not a panic.
        let mut rx = WsRx::resume(true, 60);
        assert_eq!(
            rx.read(&client_frame(0x80, b"world"), 64, &mut plain, &mut out),
            Err(close::TOO_BIG)
        );
        let mut rx = WsRx::resume(true, 100);
        assert_eq!(
            rx.read(&client_frame(0x80, b"x"), 64, &mut plain, &mut out),
            Err(close::TOO_BIG)
        );
    }

    #[test]
    fn the_mqtt_subprotocol_is_chosen_when_offered() {
        let with = |protocols: &str| {
            let req = REQ.replacen(
                "\r\n\r\n",
                &format!("\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"),
                1,
            );
            match handshake(req.as_bytes(), &[]) {
                Handshake::Accept { response, mqtt, .. } => {
                    (mqtt, String::from_utf8(response).unwrap())
                }
                other => panic!("{other:?}"),
            }
        };
        for offer in ["mqtt", "chat, mqtt", "mqttv3.1 ,mqtt"] {
            let (mqtt, text) = with(offer);
            assert!(mqtt, "{offer}");
            assert!(
                text.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"),
                "{text}"
            );
            assert!(text.ends_with("\r\n\r\n"));
        }
        // Other subprotocols only: Tern frames, and none is chosen.
        let (mqtt, text) = with("mqttv3.1, MQTT, chat");
        assert!(!mqtt);
        assert!(!text.contains("Sec-WebSocket-Protocol"), "{text}");
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3's example key and answer.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn handshake_accepts_refuses_and_waits() {
        let Handshake::Accept {
            response,
            used,
            mqtt,
        } = handshake(REQ.as_bytes(), &[])
        else {
            panic!()
        };
        assert_eq!(used, REQ.len());
        assert!(!mqtt);
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!text.contains("Sec-WebSocket-Protocol"), "{text}");
        assert_eq!(handshake(&REQ.as_bytes()[..40], &[]), Handshake::Incomplete);
        let status = |req: &[u8], origins: &[String]| match handshake(req, origins) {
            Handshake::Refuse { status, .. } => status,
            other => panic!("{other:?}"),
        };
        let ok = ["https://chat.example".to_string()];
        assert!(matches!(
            handshake(REQ.as_bytes(), &ok),
            Handshake::Accept { .. }
        ));
        assert_eq!(status(REQ.as_bytes(), &["https://other".to_string()]), 403);
        assert_eq!(status(b"POST / HTTP/1.1\r\n\r\n", &[]), 400);
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n", &[]), 400);
        assert_eq!(status(REQ.replace("13", "8").as_bytes(), &[]), 426);
        assert_eq!(
            status(REQ.replace("Upgrade: websocket", "X: y").as_bytes(), &[]),
            400
        );
        let long = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(HANDSHAKE_BYTES_MAX)
        );
        assert_eq!(status(long.as_bytes(), &[]), 431);
    }

    #[test]
    fn frames_carry_a_byte_stream() {
        let mut rx = WsRx::default();
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        // A fragmented message, then a ping, then a whole message; fed a
        // byte at a time.
        let mut wire = client_frame(0x02, b"hel");
        wire.extend(client_frame(0x89, b"hi"));
        wire.extend(client_frame(0x80, b"lo"));
        wire.extend(client_frame(0x82, &[7; 300]));
        for b in &wire {
            assert_eq!(
                rx.read(&[*b], 1000, &mut plain, &mut out),
                Ok(ReadOutcome::default())
            );
        }
        assert!(rx.is_idle());
        assert_eq!(&plain[..5], b"hello");
        assert_eq!(plain[5..], [7; 300]);
        assert_eq!(out, [0x8a, 2, b'h', b'i']);
        out.clear();
        let r = rx.read(
            &client_frame(0x88, &1001u16.to_be_bytes()),
            1000,
            &mut plain,
            &mut out,
        );
        assert_eq!(r, Ok(ReadOutcome { peer_closed: true }));
        assert_eq!(out, [0x88, 2, 0x03, 0xe9]);
    }

    #[test]
    fn violations_close_with_their_code() {
        let code = |wire: &[u8]| {
            let (mut plain, mut out) = (Vec::new(), Vec::new());
            let r = WsRx::default().read(wire, 100, &mut plain, &mut out);
            if let Err(c) = r {
                assert_eq!(out, [0x88, 2, (c >> 8) as u8, c as u8]);
            }
            r.err()
        };
        assert_eq!(code(&[0x82, 0x01, 0x00]), Some(close::PROTOCOL)); // unmasked
        assert_eq!(code(&client_frame(0x81, b"text")), Some(close::UNSUPPORTED));
        assert_eq!(code(&client_frame(0x80, b"x")), Some(close::PROTOCOL)); // stray continuation
        assert_eq!(code(&client_frame(0xc2, b"x")), Some(close::PROTOCOL)); // RSV1
        assert_eq!(code(&client_frame(0x09, b"x")), Some(close::PROTOCOL)); // fragmented ping
        assert_eq!(code(&client_frame(0x82, &[0; 101])), Some(close::TOO_BIG));
        // The header alone is enough to refuse: no payload is waited for.
        assert_eq!(
            code(&client_frame(0x82, &[0; 70000])[..14]),
            Some(close::TOO_BIG)
        );
        let mut two = client_frame(0x02, &[0; 60]);
        two.extend(client_frame(0x80, &[0; 41]));
        assert_eq!(code(&two), Some(close::TOO_BIG));
        let mut ok = client_frame(0x02, &[0; 60]);
        ok.extend(client_frame(0x80, &[0; 40]));
        assert_eq!(code(&ok), None);
    }

    #[test]
    fn protocol_doc_example_holds() {
        let doc = include_str!("../docs/PROTOCOL.md");
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut ping = Vec::new();
        crate::proto::encode(&crate::proto::Frame::Ping { nonce: 300 }, &mut ping);
        let client = [0x82, 0x84, 0xa1, 0x5e, 0x07, 0x3c, 0xa2, 0x54, 0xab, 0x3e];
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        WsRx::default()
            .read(&client, 100, &mut plain, &mut out)
            .unwrap();
        assert_eq!(plain, ping);
        let mut pong = Vec::new();
        crate::proto::encode(&crate::proto::Frame::Pong { nonce: 300 }, &mut pong);
        let mut server = Vec::new();
        put_binary(&pong, &mut server);
        assert!(doc.contains(&format!("client: {}\n", hex(&client))));
        assert!(doc.contains(&format!("server: {}\n", hex(&server))));
        assert!(doc.contains(&format!(
            "`dGhlIHNhbXBsZSBub25jZQ==` (RFC 6455's example) the server\nanswers `Sec-WebSocket-Accept: {}`",
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ==")
        )));
    }

    #[test]
    fn server_frames_use_the_short_and_long_lengths() {
        for (len, header) in [(5, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            put_binary(&vec![1; len], &mut out);
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x82);
        }
    }
}
