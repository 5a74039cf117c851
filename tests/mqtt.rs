//! The MQTT listener (`mqtt_listen`, docs/MQTT.md) driven by clients nobody
//! here wrote: paho-mqtt (Python, through `tests/mqtt_paho.py`) and the
//! mosquitto command-line clients, against Tern-protocol users of the
//! Rust client; plus hand-made malformed packets over a raw socket.
//!
//! A missing client skips its test with a printed reason, unless
//! `TERN_REQUIRE_MQTT_CLIENTS=1` (set by .ci/run): then it fails.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::child::{serve_command, TernChild};
use common::paho::{self, Paho};
use common::*;
use tern::mqtt::codec::{self, Connect, Packet, Props, PropsBuf, Publish, Version};
use tern::proto::{OwnedFrame, ReceiptKind};

const REQUIRE: &str = "TERN_REQUIRE_MQTT_CLIENTS";

/// Whether `cmd` runs (and, with `success`, exits 0); else skip (or fail
/// when [`REQUIRE`] says so).
fn have(what: &str, cmd: &mut Command, success: bool) -> bool {
    let ok = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success() || !success);
    if !ok {
        assert!(
            std::env::var(REQUIRE).as_deref() != Ok("1"),
            "{what} is missing and {REQUIRE}=1"
        );
        eprintln!("skipped: {what} is not installed (apt mosquitto-clients, pip paho-mqtt)");
    }
    ok
}

fn have_mosquitto() -> bool {
    // `--help` exits 1: that it runs at all is the check.
    have(
        "mosquitto_pub",
        Command::new("mosquitto_pub").arg("--help"),
        false,
    ) && have(
        "mosquitto_sub",
        Command::new("mosquitto_sub").arg("--help"),
        false,
    )
}

fn mqtt_server() -> TestServer {
    TestServer::start_with(|c| {
        c.mqtt_listen = Some("127.0.0.1:0".parse().unwrap());
        // The keepalive test's first check comes at the login deadline.
        c.login_timeout_ms = 2000;
    })
}

fn mqtt_addr(srv: &TestServer) -> SocketAddr {
    srv.server().mqtt_addr().expect("mqtt_listen is set")
}

/// Runs a mosquitto client to its end (bounded by its own `-W` or the
/// kill after [`WAIT`]).
fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT * 2) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // SAFETY-free: kill by the pid we spawned.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} did not finish");
        }
    }
}

fn mosquitto(tool: &str, addr: SocketAddr, user: u64) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-u", &user.to_string(), "-P", &token(user)]);
    cmd
}

#[test]
fn mosquitto_clients_and_a_tern_user_message_each_other() {
    if !have_mosquitto() {
        return;
    }
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair(); // a: Tern protocol, b: MQTT
    let mut tern = srv.login(a);

    // MQTT -> Tern: mosquitto_pub returns once its PUBACK came.
    for v in ["mqttv311", "mqttv5"] {
        let out = run(mosquitto("mosquitto_pub", addr, b).args([
            "-q",
            "1",
            "-V",
            v,
            "-t",
            &format!("u/{a}"),
            "-m",
            v,
        ]));
        assert!(out.status.success(), "{v}: {out:?}");
        let d = recv_deliver(&mut tern);
        assert_eq!((d.from, &d.body[..]), (b, v.as_bytes()));
        tern.send_delivered(d.server_id).unwrap();
    }

    // Tern -> MQTT, offline first: a clean-session subscriber gets what
    // waited once it subscribed, and its PUBACK is the DELIVERED.
    tern.send_msg(1, b, b"to mqtt").unwrap();
    let sid = recv_ack(&mut tern, 1);
    let out = run(mosquitto("mosquitto_sub", addr, b).args([
        "-q",
        "1",
        "-t",
        &format!("u/{b}"),
        "-C",
        "1",
        "-W",
        "10",
    ]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "to mqtt");
    expect_receipt(&mut tern, ReceiptKind::Delivered, sid, b);
}

#[test]
fn mosquitto_sub_5_gets_a_backlog_beyond_its_receive_maximum() {
    if !have_mosquitto() {
        return;
    }
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair();
    let mut tern = srv.login(a);
    // mosquitto_sub says Receive Maximum 20 and treats a 21st PUBLISH in
    // flight as a protocol error: the server's window for it is 20.
    for i in 0..50u64 {
        tern.send_msg(i + 1, b, &indexed_body(i, 0)).unwrap();
        recv_ack(&mut tern, i + 1);
    }
    let out = run(mosquitto("mosquitto_sub", addr, b).args([
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        &format!("u/{b}"),
        "-C",
        "50",
        "-W",
        "10",
    ]));
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = (0..50)
        .map(|i| String::from_utf8(indexed_body(i, 0)).unwrap())
        .collect();
    assert_eq!(lines, want);
}

#[test]
fn a_publisher_does_not_take_its_users_messages() {
    if !have_mosquitto() {
        return;
    }
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair();
    let mut tern = srv.login(a);
    tern.send_msg(1, b, b"waiting").unwrap();
    recv_ack(&mut tern, 1);
    // b publishes (clean session, no SUBSCRIBE): nothing is delivered to it.
    let out = run(mosquitto("mosquitto_pub", addr, b).args([
        "-q",
        "1",
        "-t",
        &format!("u/{a}"),
        "-m",
        "hi",
    ]));
    assert!(out.status.success(), "{out:?}");
    let out = run(mosquitto("mosquitto_sub", addr, b).args([
        "-q",
        "1",
        "-t",
        &format!("u/{b}"),
        "-C",
        "1",
        "-W",
        "10",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "waiting");
}

#[test]
fn mosquitto_refusals_for_foreign_topics() {
    if !have_mosquitto() {
        return;
    }
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair();
    let mut tern = srv.login(a);
    // Subscribing to another user's inbox: SUBACK failure; mosquitto_sub
    // gives up when all its subscriptions were denied.
    let out = run(mosquitto("mosquitto_sub", addr, b).args([
        "-q",
        "1",
        "-t",
        &format!("u/{a}"),
        "-C",
        "1",
        "-W",
        "5",
    ]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("denied"),
        "{out:?}"
    );
    // Publishing to your own inbox (3.1.1): the connection is closed, not
    // PUBACKed, and nothing reaches anyone.
    let out = run(mosquitto("mosquitto_pub", addr, b).args([
        "-q",
        "1",
        "-t",
        &format!("u/{b}"),
        "-m",
        "self",
    ]));
    assert!(!out.status.success(), "{out:?}");
    let out =
        run(mosquitto("mosquitto_pub", addr, b).args(["-q", "1", "-t", "chat/room", "-m", "x"]));
    assert!(!out.status.success(), "{out:?}");
    // A wrong password (token of another user) is refused at CONNECT.
    let out = run(Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-u", &b.to_string(), "-P", &token(a)])
        .args(["-q", "1", "-t", &format!("u/{a}"), "-m", "x"]));
    assert!(!out.status.success(), "{out:?}");
    assert!(tern
        .recv_timeout(Duration::from_millis(200))
        .unwrap()
        .is_none());
}

#[test]
fn paho_qos1_puback_after_commit_user_properties_and_receipts() {
    if !paho::have_paho() {
        return;
    }
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair();
    let mut tern = srv.login(a);
    let (mut p, rc, present) = Paho::connect_with(addr, b, 5, true, "");
    assert_eq!((rc, present), (0, false));
    p.cmd(&format!("sub u/{b}/receipts 0"));
    p.cmd(&format!("sub u/{b} 1"));
    assert_eq!(p.expect("suback")[1], "0");
    assert_eq!(p.expect("suback")[1], "1");
    p.cmd(&format!("pub u/{a} 1 hello"));
    let w = p.expect("puback");
    assert_eq!(w[2], "0");
    let sid: u64 = w[3].parse().expect("server_id user property");
    // The PUBACK came after the commit: the message is there.
    let d = recv_deliver(&mut tern);
    assert_eq!((d.server_id, d.from, &d.body[..]), (sid, b, &b"hello"[..]));
    tern.send_delivered(sid).unwrap();
    tern.send_read(sid, b).unwrap();
    let w = p.expect("msg");
    // The payload is three words: `delivered <server_id> <peer>`.
    let want = [
        format!("u/{b}/receipts"),
        "0".into(),
        "delivered".into(),
        sid.to_string(),
        a.to_string(),
    ];
    assert_eq!(w[1..6], want);
    let w = p.expect("msg");
    assert_eq!(
        w[3..6],
        ["read".to_string(), sid.to_string(), a.to_string()]
    );
    // Tern -> MQTT 5: the sender in a user property; paho's PUBACK is the
    // DELIVERED.
    tern.send_msg(2, b, b"back").unwrap();
    let sid2 = recv_ack(&mut tern, 2);
    let w = p.expect("msg");
    assert_eq!(
        w[1..6],
        [
            format!("u/{b}"),
            "1".into(),
            "back".into(),
            a.to_string(),
            sid2.to_string()
        ]
    );
    expect_receipt(&mut tern, ReceiptKind::Delivered, sid2, b);
    // Foreign subscribe and own-inbox publish are refused, the connection stays.
    p.cmd(&format!("sub u/{a} 1"));
    assert_eq!(p.expect("suback")[1], "135");
    p.cmd(&format!("pub u/{b} 1 self"));
    assert_eq!(p.expect("puback")[2], "135");
    p.cmd("disconnect");
}

#[test]
fn paho_persistent_session_is_the_offline_queue() {
    if !paho::have_paho() {
        return;
    }
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair();
    let mut tern = srv.login(a);
    // A user per round: the last message's PUBACK may not leave before
    // paho's DISCONNECT, and then it is rightly sent again next time.
    for (b, v, extra) in [(b, 311u16, ""), (b + 1000, 5, "3600")] {
        let (mut p, _, _) = Paho::connect_with(addr, b, v, false, extra);
        p.cmd(&format!("sub u/{b} 1"));
        p.expect("suback");
        p.cmd("disconnect");
        p.expect("disconnected");
        drop(p);
        for i in 0..5u64 {
            tern.send_msg(i + 1, b, &indexed_body(i, 0)).unwrap();
            recv_ack(&mut tern, i + 1);
        }
        // Back, no SUBSCRIBE: session present, and the five, in order.
        let (mut p, rc, present) = Paho::connect_with(addr, b, v, false, extra);
        assert_eq!((rc, present), (0, true), "MQTT {v}");
        for i in 0..5u64 {
            let w = p.expect("msg");
            assert_eq!(
                w[3],
                String::from_utf8(indexed_body(i, 0)).unwrap(),
                "MQTT {v}"
            );
        }
        p.cmd("disconnect");
    }
}

// ---- raw packets ---------------------------------------------------------

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT * 2)).unwrap();
    s
}

fn connect_bytes(version: Version, user: u64, keepalive_s: u16) -> Vec<u8> {
    let tok = token(user);
    let name = user.to_string();
    let c = Connect {
        version,
        clean: true,
        keepalive_s,
        props: Props::default(),
        client_id: "raw",
        will: None,
        username: Some(&name),
        password: Some(tok.as_bytes()),
    };
    let mut out = Vec::new();
    codec::encode(&Packet::Connect(c), version, &mut out);
    out
}

/// Reads until the server closes; returns everything it sent.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let deadline = Instant::now() + WAIT * 2;
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "not closed: {all:02x?}");
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e} after {all:02x?}"),
        }
    }
}

fn packets(bytes: &[u8], v: Version) -> Vec<Packet<'_>> {
    let mut at = 0;
    let mut all = Vec::new();
    while at < bytes.len() {
        let (p, n) = codec::decode(&bytes[at..], Some(v), usize::MAX)
            .unwrap()
            .expect("whole packets");
        all.push(p);
        at += n;
    }
    all
}

#[test]
fn keepalive_expiry_closes_a_silent_connection() {
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (_, b) = cross_pair();
    for v in [Version::V311, Version::V5] {
        let mut s = raw(addr);
        s.write_all(&connect_bytes(v, b, 1)).unwrap();
        let got = read_to_close(&mut s);
        let p = packets(&got, v);
        assert!(matches!(p[0], Packet::ConnAck(a) if a.code == 0), "{p:?}");
        if v == Version::V5 {
            // DISCONNECT 0x8D keep alive timeout, then the close.
            assert!(
                matches!(p[1..], [Packet::Disconnect(d)] if d.code == 0x8D),
                "{p:?}"
            );
        } else {
            assert_eq!(p.len(), 1, "{p:?}");
        }
    }
    // The server took it as a keepalive close.
    srv.wait_metric("tern_idle_closes_total", |n| n >= 2);
}

#[test]
fn malformed_packets_get_the_specs_answer_or_a_clean_close() {
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, b) = cross_pair();
    let mut conn5 = connect_bytes(Version::V5, b, 30);
    let publish_qos2 = {
        // PUBLISH QoS 2, topic u/a, packet id 1, no properties.
        let topic = format!("u/{a}");
        let mut p = vec![0x34, (2 + topic.len() + 2 + 1 + 1) as u8];
        p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        p.extend_from_slice(topic.as_bytes());
        p.extend_from_slice(&[0, 1, 0, b'x']);
        p
    };
    conn5.extend_from_slice(&publish_qos2);
    let mut bad_level = connect_bytes(Version::V311, b, 30);
    bad_level[8] = 3;
    let mut huge = connect_bytes(Version::V311, b, 30);
    huge.extend_from_slice(&[0x30, 0xFF, 0xFF, 0x7F]); // 2 MiB PUBLISH
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("PINGREQ before CONNECT", vec![0xC0, 0], vec![]),
        (
            "five-byte remaining length",
            vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            vec![],
        ),
        ("protocol level 3", bad_level, vec![0x20, 2, 0, 1]),
        (
            "protocol name",
            b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x1e\x00\x00".to_vec(),
            vec![],
        ),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw(addr);
        s.write_all(&bytes).unwrap();
        assert_eq!(read_to_close(&mut s), want, "{what}");
    }
    // After a CONNECT: an oversized packet closes (3.1.1: after CONNACK only).
    let mut s = raw(addr);
    s.write_all(&huge).unwrap();
    let got = read_to_close(&mut s);
    assert!(
        matches!(packets(&got, Version::V311)[..], [Packet::ConnAck(_)]),
        "{got:02x?}"
    );
    // 5.0: QoS 2 gets DISCONNECT 0x9B.
    let mut s = raw(addr);
    s.write_all(&conn5).unwrap();
    let got = read_to_close(&mut s);
    let p = packets(&got, Version::V5);
    assert!(
        matches!(p[..], [Packet::ConnAck(_), Packet::Disconnect(d)] if d.code == 0x9B),
        "{p:?}"
    );
    // The server is fine: a Tern client and an MQTT publish still work.
    let mut tern = srv.login(a);
    let mut s = raw(addr);
    let mut pb = connect_bytes(Version::V311, b, 30);
    let topic = format!("u/{a}");
    codec::encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: &topic,
            pid: 7,
            props: PropsBuf::default().props(),
            payload: b"still here",
        }),
        Version::V311,
        &mut pb,
    );
    s.write_all(&pb).unwrap();
    let d = recv_deliver(&mut tern);
    assert_eq!(&d.body[..], b"still here");
}

#[test]
fn pipelined_packets_after_connect_follow_it_to_the_home_shard() {
    let srv = mqtt_server();
    let addr = mqtt_addr(&srv);
    let (a, _) = cross_pair();
    let mut tern = srv.login(a);
    // CONNECT, SUBSCRIBE and PUBLISH in one write, from users homed on
    // either shard: whichever shard accepts, the packets after the CONNECT
    // go with its LOGIN to the home shard and are answered in order.
    for user in users_on(0, SHARDS, 4)
        .into_iter()
        .chain(users_on(1, SHARDS, 4))
    {
        if user == a {
            continue;
        }
        let mut bytes = connect_bytes(Version::V311, user, 30);
        let inbox = format!("u/{user}");
        let mut fbuf = Vec::new();
        let sub = codec::Subscribe {
            pid: 1,
            props: Props::default(),
            filters: codec::Filters::build(&[(&inbox, 1)], true, &mut fbuf),
        };
        codec::encode(&Packet::Subscribe(sub), Version::V311, &mut bytes);
        let to = format!("u/{a}");
        let body = user.to_string();
        let publish = Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: &to,
            pid: 2,
            props: Props::default(),
            payload: body.as_bytes(),
        };
        codec::encode(&Packet::Publish(publish), Version::V311, &mut bytes);
        let mut s = raw(addr);
        s.write_all(&bytes).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while packets_complete(&got) < 3 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "user {user}: closed after {got:02x?}");
            got.extend_from_slice(&buf[..n]);
        }
        let p = packets(&got, Version::V311);
        assert!(
            matches!(p[..], [Packet::ConnAck(c), Packet::SubAck(sa), Packet::PubAck(pa)]
                if c.code == 0 && sa.codes == [1] && pa.pid == 2),
            "user {user}: {p:?}"
        );
        let d = recv_deliver(&mut tern);
        assert_eq!((d.from, d.body), (user, body.into_bytes()));
    }
}

/// How many whole packets `bytes` holds.
fn packets_complete(bytes: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while let Ok(Some((_, used))) = codec::decode(&bytes[at..], Some(Version::V311), usize::MAX) {
        at += used;
        n += 1;
    }
    n
}

// ---- kill -9 ---------------------------------------------------------------

fn serve_mqtt(dir: &Path) -> (TernChild, SocketAddr) {
    let mut cmd = serve_command(&["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"]);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--stats-socket")
        .arg(dir.join("s.sock"))
        .args(["--shards", "2", "--durability", "fsync"]);
    let child = TernChild::expect_start(cmd);
    let deadline = Instant::now() + WAIT;
    let mqtt = loop {
        let log = child.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("MQTT listening on ")) {
            let addr = line.rsplit("MQTT listening on ").next().unwrap().trim();
            break addr.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no MQTT listener: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, mqtt)
}

#[test]
fn kill_9_loses_no_pubacked_message() {
    if !paho::have_paho() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (serve, addr) = serve_mqtt(dir.path());
    let (a, b) = cross_pair();
    let (mut p, rc, _) = Paho::connect_with(addr, b, 311, true, "");
    assert_eq!(rc, 0);
    // Under the default send rate burst: a 3.1.1 client over it is closed.
    p.cmd(&format!("pubmany u/{a} 500"));
    // Kill in the middle of the stream, after some PUBACKs (or once the
    // server closed the client for its rate: on a busy box that may come
    // after fewer than 50).
    let mut acked = Vec::new();
    while acked.len() < 50 {
        let w = p.next();
        match w[0].as_str() {
            "published" => acked.push(w[1].clone()),
            "disconnected" => break,
            _ => {}
        }
    }
    assert!(!acked.is_empty(), "no PUBACK before the close");
    serve.kill9();
    // Whatever else paho printed before it saw the close was PUBACKed too.
    while let Some(line) = p.line_within(Duration::from_millis(500)) {
        if let Some(body) = line.strip_prefix("published ") {
            acked.push(body.to_string());
        }
    }
    drop(p);
    let (_serve, _) = serve_mqtt(dir.path());
    let tern_addr = _serve.addr;
    let (mut tern, _) = tern_client::Client::login(tern_addr, &token(a)).unwrap();
    let mut got = std::collections::HashSet::new();
    let wanted: std::collections::HashSet<String> = acked.iter().cloned().collect();
    while !wanted.is_subset(&got) {
        match tern.recv_timeout(WAIT).unwrap() {
            Some(OwnedFrame::Deliver {
                server_id, body, ..
            }) => {
                got.insert(String::from_utf8(body).unwrap());
                tern.send_delivered(server_id).unwrap();
            }
            Some(_) => {}
            None => {
                let missing: Vec<_> = wanted.difference(&got).take(5).collect();
                panic!(
                    "{} PUBACKed messages lost, e.g. {missing:?}",
                    wanted.len() - got.len()
                );
            }
        }
    }
}

/// A CA (its PEM) and a server certificate and key for `localhost`
/// (127.0.0.1 too), made with rcgen, written to `dir`: (ca, cert, key).
fn tls_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tern test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    // The server refuses a private key others can read.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&paths.2, private).unwrap();
    paths
}

/// `mqtt_tls_listen` (docs/MQTT.md, "TLS"): mosquitto_pub and
/// mosquitto_sub with `--cafile` exchange messages with a Tern-protocol
/// user through it, 3.1.1 and 5.0; a client that does not speak TLS there
/// gets no MQTT answer.
#[test]
fn mosquitto_clients_over_tls() {
    if !have_mosquitto() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(files.path());
    let srv = TestServer::start_with(move |c| {
        c.mqtt_tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = cert;
        c.tls_key = key;
    });
    let addr = srv
        .server()
        .mqtt_tls_addr()
        .expect("mqtt_tls_listen is set");
    let (a, b) = cross_pair(); // a: Tern protocol, b: MQTT over TLS
    let mut tern = srv.login(a);
    let tls = |tool: &str| {
        let mut cmd = mosquitto(tool, addr, b);
        // The certificate names localhost: the client checks it.
        cmd.args(["-h", "localhost", "--cafile"]).arg(&ca);
        cmd
    };

    for v in ["mqttv311", "mqttv5"] {
        let out =
            run(tls("mosquitto_pub").args(["-q", "1", "-V", v, "-t", &format!("u/{a}"), "-m", v]));
        assert!(out.status.success(), "{v}: {out:?}");
        let d = recv_deliver(&mut tern);
        assert_eq!((d.from, &d.body[..]), (b, v.as_bytes()));
        tern.send_delivered(d.server_id).unwrap();
    }

    tern.send_msg(1, b, b"to mqtt over tls").unwrap();
    let sid = recv_ack(&mut tern, 1);
    let out =
        run(tls("mosquitto_sub").args(["-q", "1", "-t", &format!("u/{b}"), "-C", "1", "-W", "10"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "to mqtt over tls"
    );
    expect_receipt(&mut tern, ReceiptKind::Delivered, sid, b);

    // Plain MQTT on the TLS port: the CONNECT is no TLS record, so the
    // server closes without a CONNACK (nothing MQTT comes back).
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let mut connect = Vec::new();
    let password = token(b);
    let user = b.to_string();
    codec::encode(
        &Packet::Connect(Connect {
            version: Version::V311,
            clean: true,
            keepalive_s: 0,
            props: Props(&[]),
            client_id: "plain",
            will: None,
            username: Some(&user),
            password: Some(password.as_bytes()),
        }),
        Version::V311,
        &mut connect,
    );
    raw.write_all(&connect).unwrap();
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(
        codec::decode(&got, Some(Version::V311), 1 << 16)
            .map_or(true, |p| !matches!(p, Some((Packet::ConnAck(_), _)))),
        "a CONNACK in the clear: {got:?}"
    );
}
