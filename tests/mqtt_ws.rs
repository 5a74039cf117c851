//! MQTT over WebSocket (docs/MQTT.md, "Over WebSocket"): a WebSocket
//! client of the `ws_listen` port that offers the `mqtt` subprotocol is an
//! MQTT session, exactly as on `mqtt_listen`; one that does not is a Tern
//! one. Driven by hand-made packets over a real socket, and by mqtt.js (the
//! npm package `mqtt`) in a real headless Chromium.
//!
//! Without `node`, Chromium or clients/web/node_modules/mqtt (`npm ci` in
//! clients/web) the browser test skips with a printed reason; with
//! `TERN_REQUIRE_BROWSER=1` (CI's `.ci/run` exports it) it fails instead.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::ws::{client_frame, WsClient};
use common::*;
use tern::mqtt::codec::{
    self, Connect, Filters, Packet, Props, PubAck, Publish, Subscribe, Version,
};
use tern::proto::{self, ReceiptKind};

fn ws_server() -> TestServer {
    TestServer::start_with(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()))
}

fn ws_addr(srv: &TestServer) -> SocketAddr {
    srv.server().ws_addr().expect("ws_listen is set")
}

fn encode(p: &Packet<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode(p, Version::V311, &mut out);
    out
}

/// The next whole MQTT packet from the binary messages, decoded and handed
/// to `f` (packets may span messages and a message may hold several).
fn next_packet<T>(ws: &mut WsClient, f: impl FnOnce(Packet<'_>) -> T) -> T {
    loop {
        let stream = ws.stream();
        let used = match codec::decode(stream, Some(Version::V311), usize::MAX).unwrap() {
            Some((_, used)) => used,
            None => {
                ws.recv_stream();
                continue;
            }
        };
        let bytes: Vec<u8> = stream.drain(..used).collect();
        let (p, _) = codec::decode(&bytes, Some(Version::V311), usize::MAX)
            .unwrap()
            .unwrap();
        return f(p);
    }
}

/// Upgrades with the `mqtt` subprotocol; the answer must choose it.
fn mqtt_ws(addr: SocketAddr) -> WsClient {
    let (ws, head) = WsClient::upgrade_with(addr, "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"),
        "{head}"
    );
    ws
}

#[test]
fn mqtt_over_websocket_and_a_tern_user_message_each_other() {
    let srv = ws_server();
    let (a, b) = cross_pair(); // a: Tern protocol, b: MQTT over WebSocket
    let mut tern = srv.login(a);
    let mut ws = mqtt_ws(ws_addr(&srv));

    // CONNECT split over two messages: the payloads are one stream.
    let tok = token(b);
    let name = b.to_string();
    let connect = encode(&Packet::Connect(Connect {
        version: Version::V311,
        clean: true,
        keepalive_s: 60,
        props: Props::default(),
        client_id: "ws",
        will: None,
        username: Some(&name),
        password: Some(tok.as_bytes()),
    }));
    let (one, two) = connect.split_at(5);
    ws.send_raw(&client_frame(0x82, one));
    ws.send_raw(&client_frame(0x82, two));
    next_packet(&mut ws, |p| match p {
        Packet::ConnAck(c) => assert_eq!(c.code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    });

    // SUBSCRIBE to the own inbox (granted QoS 1) and a foreign one
    // (refused), and a QoS 1 PUBLISH to the Tern user, in one message.
    let mut fbuf = Vec::new();
    let inbox = format!("u/{b}");
    let foreign = format!("u/{a}");
    let mut both = encode(&Packet::Subscribe(Subscribe {
        pid: 1,
        props: Props::default(),
        filters: Filters::build(&[(&inbox, 1), (&foreign, 1)], true, &mut fbuf),
    }));
    both.extend(encode(&Packet::Publish(Publish {
        dup: false,
        qos: 1,
        retain: false,
        topic: &foreign,
        pid: 2,
        props: Props::default(),
        payload: b"from mqtt over ws",
    })));
    ws.send_raw(&client_frame(0x82, &both));
    next_packet(&mut ws, |p| match p {
        Packet::SubAck(s) => assert_eq!((s.pid, s.codes), (1, &[1, 0x80][..])),
        other => panic!("expected SUBACK, got {other:?}"),
    });
    next_packet(&mut ws, |p| match p {
        Packet::PubAck(p) => assert_eq!((p.pid, p.code), (2, 0)),
        other => panic!("expected PUBACK, got {other:?}"),
    });
    // The PUBACK came after the commit: the message is there.
    let d = recv_deliver(&mut tern);
    assert_eq!((d.from, &d.body[..]), (b, &b"from mqtt over ws"[..]));

    // Tern -> MQTT over WebSocket: a QoS 1 PUBLISH on the inbox; its
    // PUBACK is the DELIVERED the Tern sender sees.
    tern.send_msg(7, b, b"from tern").unwrap();
    let sid = recv_ack(&mut tern, 7);
    let pid = next_packet(&mut ws, |p| match p {
        Packet::Publish(p) => {
            assert_eq!(
                (p.topic, p.qos, p.payload),
                (&inbox[..], 1, &b"from tern"[..])
            );
            p.pid
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    });
    ws.send_raw(&client_frame(
        0x82,
        &encode(&Packet::PubAck(PubAck {
            pid,
            code: 0,
            props: Props::default(),
        })),
    ));
    expect_receipt(&mut tern, ReceiptKind::Delivered, sid, b);

    // PINGREQ is answered inside a binary message; DISCONNECT ends the
    // connection with a normal WebSocket close.
    ws.send_raw(&client_frame(0x82, &encode(&Packet::PingReq)));
    next_packet(&mut ws, |p| assert_eq!(p, Packet::PingResp));
    ws.send_raw(&client_frame(
        0x82,
        &encode(&Packet::Disconnect(codec::Disconnect {
            code: 0,
            props: Props::default(),
        })),
    ));
    match ws.next() {
        Some((0x8, payload)) => assert_eq!(payload, 1000u16.to_be_bytes()),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(ws.next(), None);
}

#[test]
fn without_the_subprotocol_it_is_tern_and_bad_mqtt_is_refused() {
    let srv = ws_server();
    let (a, b) = cross_pair();
    // No subprotocol (or another one): Tern frames, none chosen.
    let (mut ws, head) = WsClient::upgrade_with(ws_addr(&srv), "Sec-WebSocket-Protocol: chat\r\n");
    assert!(!head.contains("Sec-WebSocket-Protocol"), "{head}");
    ws.login(&token(a));
    let mut tern = srv.login(b);
    ws.send(&[proto::Frame::Send {
        client_id: 1,
        to: b,
        body: b"tern over ws",
    }]);
    let d = recv_deliver(&mut tern);
    assert_eq!((d.from, &d.body[..]), (a, &b"tern over ws"[..]));

    // With it, a CONNECT whose token is not its user's is refused with
    // CONNACK 0x04 (bad user name or password) in a binary message, then
    // a close.
    let mut ws = mqtt_ws(ws_addr(&srv));
    let tok = token(a);
    let name = b.to_string();
    ws.send_raw(&client_frame(
        0x82,
        &encode(&Packet::Connect(Connect {
            version: Version::V311,
            clean: true,
            keepalive_s: 0,
            props: Props::default(),
            client_id: "",
            will: None,
            username: Some(&name),
            password: Some(tok.as_bytes()),
        })),
    ));
    next_packet(&mut ws, |p| match p {
        Packet::ConnAck(c) => assert_eq!(c.code, 4),
        other => panic!("expected CONNACK, got {other:?}"),
    });
    assert_eq!(ws.next().map(|(op, _)| op), Some(0x8));
    // A packet before CONNECT closes the connection cleanly, never a crash.
    let mut ws = mqtt_ws(ws_addr(&srv));
    ws.send_raw(&client_frame(0x82, &encode(&Packet::PingReq)));
    assert_eq!(ws.next().map(|(op, _)| op), Some(0x8));
    // And a text message is refused as on any WebSocket connection.
    let mut ws = mqtt_ws(ws_addr(&srv));
    ws.send_raw(&client_frame(0x81, b"hello"));
    match ws.next() {
        Some((0x8, payload)) => assert_eq!(payload, 1003u16.to_be_bytes()),
        other => panic!("{other:?}"),
    }
}

// ---- mqtt.js in headless Chromium ------------------------------------------

fn required() -> bool {
    std::env::var_os("TERN_REQUIRE_BROWSER").is_some_and(|v| v == "1")
}

/// Skips (prints why, returns false) or, when required, fails.
fn usable(ok: bool, why: &str) -> bool {
    if !ok {
        assert!(!required(), "TERN_REQUIRE_BROWSER=1 but {why}");
        eprintln!("skipped: {why}");
    }
    ok
}

/// The Chromium to drive: `CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

#[test]
fn mqtt_js_pages_in_chromium_message_each_other_and_a_tern_user() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/web");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable(node, "node is not on the PATH (Debian package nodejs)")
        || !usable(
            chromium().exists(),
            "no Chromium (Debian package chromium, or set CHROMIUM)",
        )
        || !usable(
            web.join("node_modules/playwright-core").exists()
                && web.join("node_modules/mqtt/dist/mqtt.min.js").exists(),
            "clients/web/node_modules is missing (npm ci in clients/web)",
        )
    {
        return;
    }
    let srv = ws_server();
    let (a, b) = cross_pair(); // two mqtt.js pages
    let c = users_on(0, 2, 2)[1]; // a Tern-protocol user
    assert!(c != a && c != b);
    let mut tern = srv.login(c);
    // Waits in a's inbox until its page subscribes.
    tern.send_msg(1, a, b"from tern").unwrap();
    let sid = recv_ack(&mut tern, 1);

    let out = Command::new("node")
        .args([
            "--test",
            "--test-reporter=spec",
            "--test-timeout=60000",
            "mqtt-test/",
        ])
        .current_dir(&web)
        .env("TERN_WS_URL", format!("ws://{}/", ws_addr(&srv)))
        .env("TERN_MQTT_A", format!("{a} {}", token(a)))
        .env("TERN_MQTT_B", format!("{b} {}", token(b)))
        .env("TERN_MQTT_TERN_USER", c.to_string())
        .env("CHROMIUM", chromium())
        .output()
        .expect("run node --test");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "browser test failed:\n{report}");
    assert!(report.contains("ℹ pass 1"), "{report}");
    // The page's PUBACK was the DELIVERED; what it published reached us.
    expect_receipt(&mut tern, ReceiptKind::Delivered, sid, a);
    let d = recv_deliver(&mut tern);
    assert_eq!((d.from, &d.body[..]), (a, &b"from mqtt.js to tern"[..]));
}
