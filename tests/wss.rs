//! WebSocket over TLS (wss) on the TLS listener, which tells a WebSocket
//! upgrade from a Tern client by the first two plaintext bytes: both kinds
//! of client on one port, messages between them, a Tern LOGIN whose first
//! byte is `G` (and arrives alone in its own TLS record), refused upgrades,
//! close codes, ping/pong, and the close frame after a BYE, all encrypted;
//! MQTT over wss (the `mqtt` subprotocol) beside a TLS Tern client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tern::mqtt::codec::{
    self, Connect, Disconnect, Filters, Packet, Props, Publish, Subscribe, Version,
};
use tern::proto::{self, Frame, Limits, OwnedFrame};
use tern_client::rustls::pki_types::ServerName;
use tern_client::rustls::{ClientConfig, ClientConnection, StreamOwned};
use tern_client::{tls_config, Client};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A TLS server (certificate for `localhost` from a fresh CA) and the
/// client configuration that trusts it.
struct Wss {
    srv: TestServer,
    config: Arc<ClientConfig>,
    _dir: tempfile::TempDir,
}

fn wss_server() -> Wss {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wss test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (cert_path, key_path, ca_path): (PathBuf, PathBuf, PathBuf) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let srv = TestServer::start_with(move |c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = cert_path;
        c.tls_key = key_path;
    });
    Wss {
        config: tls_config(&ca_path).unwrap(),
        srv,
        _dir: dir,
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("localhost".to_string()).unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    StreamOwned::new(conn, tcp)
}

/// A WebSocket client over TLS.
struct WsClient {
    s: Tls,
    raw: Vec<u8>,
    stream: Vec<u8>,
}

impl WsClient {
    /// Sends `req`; returns the client and the HTTP answer's head.
    fn open(w: &Wss, req: &str) -> (WsClient, String) {
        let mut s = tls_connect(w.srv.tls_addr.unwrap(), &w.config);
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before an HTTP answer: {raw:?}");
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(raw[..end].to_vec()).unwrap();
        raw.drain(..end);
        let ws = WsClient {
            s,
            raw,
            stream: Vec::new(),
        };
        (ws, head)
    }

    fn upgrade(w: &Wss) -> WsClient {
        let (ws, head) = WsClient::open(w, &request(""));
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")));
        ws
    }

    fn frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        assert!(payload.len() <= 125, "short frames only here");
        let mask = [0xa1, 0x5e, 0x07, 0x3c];
        let mut f = vec![first, payload.len() as u8 | if masked { 0x80 } else { 0 }];
        if masked {
            f.extend_from_slice(&mask);
            f.extend(payload.iter().enumerate().map(|(i, &b)| b ^ mask[i & 3]));
        } else {
            f.extend_from_slice(payload);
        }
        self.s.write_all(&f).unwrap();
    }

    fn send(&mut self, frame: &Frame<'_>) {
        let mut bytes = Vec::new();
        proto::encode(frame, &mut bytes);
        self.frame(0x82, &bytes, true);
    }

    /// The next server WebSocket frame (short ones only: these tests' frames
    /// are), or `None` at the end of the stream.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.raw.len() >= 2 {
                let len = (self.raw[1] & 0x7f) as usize;
                assert!(len <= 125, "short server frames here");
                if self.raw.len() >= 2 + len {
                    let op = self.raw[0] & 0x0f;
                    let payload = self.raw[2..2 + len].to_vec();
                    self.raw.drain(..2 + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.raw.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next Tern frame from the binary messages.
    fn recv(&mut self) -> OwnedFrame {
        loop {
            if let Some((frame, used)) = proto::decode(&self.stream, &Limits::default()).unwrap() {
                let frame = frame.to_owned();
                self.stream.drain(..used);
                return frame;
            }
            let (op, payload) = self.next().expect("a frame before the end");
            assert_eq!(op, 2, "binary message, got opcode {op}");
            self.stream.extend_from_slice(&payload);
        }
    }

    /// The close code of the next frame, which must be a close.
    fn close_code(&mut self) -> u16 {
        let (op, payload) = self.next().expect("a close frame");
        assert_eq!(op, 8, "close frame, got opcode {op} {payload:?}");
        u16::from_be_bytes([payload[0], payload[1]])
    }
}

fn request(extra: &str) -> String {
    format!(
        "GET /tern HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn login(ws: &mut WsClient, user: u64) {
    ws.send(&Frame::Login {
        version: proto::VERSION_2,
        token: token(user).as_bytes(),
    });
    assert!(matches!(ws.recv(), OwnedFrame::LoginOk { .. }));
}

#[test]
fn wss_and_tern_clients_share_the_tls_port_and_message_each_other() {
    let w = wss_server();
    let (a, b) = cross_pair();
    let mut ws = WsClient::upgrade(&w);
    login(&mut ws, a);
    // A Tern client over TLS on the same port.
    let mut tern = Client::login_tls(w.srv.tls_addr.unwrap(), "localhost", &w.config, &token(b))
        .unwrap()
        .0;
    tern.send_msg(1, a, b"to the browser").unwrap();
    match ws.recv() {
        OwnedFrame::Deliver {
            from,
            body,
            server_id,
            ..
        } => {
            assert_eq!((from, body.as_slice()), (b, &b"to the browser"[..]));
            ws.send(&Frame::Delivered { server_id });
        }
        other => panic!("expected DELIVER, got {other:?}"),
    }
    ws.send(&Frame::Send {
        client_id: 7,
        to: b,
        body: b"from the browser",
    });
    assert!(matches!(ws.recv(), OwnedFrame::Ack { client_id: 7, .. }));
    let got = tern
        .recv_until(|f| matches!(f, OwnedFrame::Deliver { .. }))
        .unwrap();
    assert!(
        matches!(got, OwnedFrame::Deliver { from, ref body, .. } if from == a && body == b"from the browser")
    );
    // Ping is answered inside TLS; a client close is echoed.
    ws.frame(0x89, b"hi", true);
    assert_eq!(ws.next(), Some((0x0a, b"hi".to_vec())));
    ws.frame(0x88, &1000u16.to_be_bytes(), true);
    assert_eq!(ws.close_code(), 1000);
    assert_eq!(ws.next(), None);
}

#[test]
fn a_tern_login_starting_with_g_is_not_taken_for_websocket() {
    let w = wss_server();
    // A LOGIN of 71 bytes has the length prefix 0x47, "G": a 69-byte token
    // (user and device digits 10 together).
    let user = 123_456;
    let token = device_token(user, 1234);
    assert_eq!(token.len(), 69);
    let mut bytes = Vec::new();
    proto::encode(
        &Frame::Login {
            version: proto::VERSION_2,
            token: token.as_bytes(),
        },
        &mut bytes,
    );
    assert_eq!(&bytes[..2], &[b'G', 0x01]);
    let mut s = tls_connect(w.srv.tls_addr.unwrap(), &w.config);
    // The "G" alone in its own TLS record first: the server waits for more.
    s.write_all(&bytes[..1]).unwrap();
    s.flush().unwrap();
    s.write_all(&bytes[1..]).unwrap();
    let mut answer = Vec::new();
    while proto::decode(&answer, &Limits::default())
        .unwrap()
        .is_none()
    {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {answer:?}");
        answer.extend_from_slice(&chunk[..n]);
    }
    let (frame, _) = proto::decode(&answer, &Limits::default()).unwrap().unwrap();
    assert!(matches!(frame, Frame::LoginOk { .. }), "{frame:?}");
}

#[test]
fn wss_refusals_and_close_codes_are_encrypted_too() {
    let w = wss_server();
    // No key: 400, then the end of the (TLS) stream.
    let (mut ws, head) = WsClient::open(
        &w,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert_eq!(ws.next(), None);
    // Wrong version: 426.
    let (_, head) = WsClient::open(&w, &request("").replace(": 13", ": 8"));
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    // Unmasked: 1002. Text: 1003.
    let mut ws = WsClient::upgrade(&w);
    ws.frame(0x82, &[3, 0x0a, 0xac, 0x02], false);
    assert_eq!(ws.close_code(), 1002);
    let mut ws = WsClient::upgrade(&w);
    ws.frame(0x81, b"text", true);
    assert_eq!(ws.close_code(), 1003);
    // A Tern-level error: ERROR in a binary message, then close 1000.
    let mut ws = WsClient::upgrade(&w);
    ws.frame(0x82, &[0x00], true);
    assert!(matches!(ws.recv(), OwnedFrame::Error { .. }));
    assert_eq!(ws.close_code(), 1000);
    // A BYE (the same device logs in again) ends with a close frame.
    let user = users_on(0, SHARDS, 3)[2];
    let mut first = WsClient::upgrade(&w);
    login(&mut first, user);
    let mut second = WsClient::upgrade(&w);
    login(&mut second, user);
    assert!(matches!(first.recv(), OwnedFrame::Bye { .. }));
    assert_eq!(first.close_code(), 1000);
    assert_eq!(first.next(), None);
}

/// The next MQTT 3.1.1 packet from the binary messages, handed to `f`.
fn next_mqtt<T>(ws: &mut WsClient, f: impl FnOnce(Packet<'_>) -> T) -> T {
    loop {
        if let Some((_, used)) = codec::decode(&ws.stream, Some(Version::V311), usize::MAX).unwrap()
        {
            let bytes: Vec<u8> = ws.stream.drain(..used).collect();
            let (p, _) = codec::decode(&bytes, Some(Version::V311), usize::MAX)
                .unwrap()
                .unwrap();
            return f(p);
        }
        let (op, payload) = ws.next().expect("a frame before the end");
        assert_eq!(op, 2, "binary message, got opcode {op}");
        ws.stream.extend_from_slice(&payload);
    }
}

fn mqtt_bytes(p: &Packet<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode(p, Version::V311, &mut out);
    out
}

#[test]
fn mqtt_over_wss_messages_a_tern_client_on_the_same_port() {
    let w = wss_server();
    let (a, b) = cross_pair(); // a: Tern over TLS, b: MQTT over wss
    let mut tern = Client::login_tls(w.srv.tls_addr.unwrap(), "localhost", &w.config, &token(a))
        .unwrap()
        .0;
    let (mut ws, head) = WsClient::open(&w, &request("Sec-WebSocket-Protocol: mqtt\r\n"));
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"),
        "{head}"
    );
    let (tok, name) = (token(b), b.to_string());
    let connect = mqtt_bytes(&Packet::Connect(Connect {
        version: Version::V311,
        clean: true,
        keepalive_s: 60,
        props: Props::default(),
        client_id: "",
        will: None,
        username: Some(&name),
        password: Some(tok.as_bytes()),
    }));
    // Short frames only here: the CONNECT in two messages.
    let (one, two) = connect.split_at(connect.len() / 2);
    ws.frame(0x82, one, true);
    ws.frame(0x82, two, true);
    next_mqtt(&mut ws, |p| {
        assert!(matches!(p, Packet::ConnAck(c) if c.code == 0), "{p:?}")
    });
    let mut fbuf = Vec::new();
    let inbox = format!("u/{b}");
    ws.frame(
        0x82,
        &mqtt_bytes(&Packet::Subscribe(Subscribe {
            pid: 1,
            props: Props::default(),
            filters: Filters::build(&[(&inbox, 1)], true, &mut fbuf),
        })),
        true,
    );
    next_mqtt(&mut ws, |p| {
        assert!(matches!(p, Packet::SubAck(s) if s.codes == [1]), "{p:?}")
    });
    let to = format!("u/{a}");
    ws.frame(
        0x82,
        &mqtt_bytes(&Packet::Publish(Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: &to,
            pid: 9,
            props: Props::default(),
            payload: b"over wss",
        })),
        true,
    );
    next_mqtt(&mut ws, |p| {
        assert!(matches!(p, Packet::PubAck(x) if x.pid == 9), "{p:?}")
    });
    let d = recv_deliver(&mut tern);
    assert_eq!((d.from, &d.body[..]), (b, &b"over wss"[..]));
    tern.send_msg(2, b, b"back over wss").unwrap();
    next_mqtt(&mut ws, |p| match p {
        Packet::Publish(p) => assert_eq!((p.topic, p.payload), (&inbox[..], &b"back over wss"[..])),
        other => panic!("expected PUBLISH, got {other:?}"),
    });
    ws.frame(
        0x82,
        &mqtt_bytes(&Packet::Disconnect(Disconnect {
            code: 0,
            props: Props::default(),
        })),
        true,
    );
    assert_eq!(ws.close_code(), 1000);
}
