//! `--protocol mqtt`: the load generator over MQTT 3.1.1, against Tern's
//! MQTT listener (`mqtt_listen`, started in this process on loopback) and,
//! with `--broker generic`, against a mosquitto broker this test starts on
//! a loopback port (skipped with a printed reason when `mosquitto` is not
//! installed, unless `TERN_REQUIRE_MOSQUITTO` is set). Only counts are
//! asserted, no timings.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern::config::Config;
use tern::server::Server;

mod common;
use common::{engines, loadgen, loadgen_with_secret, server_config, start_server, test_backend, u};

/// A server with an MQTT listener.
fn start(dir: &Path) -> Server {
    start_server(Config {
        mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..server_config(dir)
    })
}

/// A chat of 200 users and 400 messages over MQTT to `server`, on
/// `engine`; `extra`: more options.
fn chat(
    server: &str,
    broker: &str,
    engine: &str,
    base: u64,
    extra: &[&str],
    json: &Path,
) -> (i32, Value) {
    let base = base.to_string();
    let mut args = vec![
        "chat",
        "--protocol",
        "mqtt",
        "--broker",
        broker,
        "--server",
        server,
        "--engine",
        engine,
        "--conns",
        "200",
        "--rate",
        "2000/s",
        "--msg-rate",
        "400/s",
        "--duration",
        "1s",
        "--drain",
        "20s",
        "--user-base",
        &base,
    ];
    args.extend_from_slice(extra);
    loadgen(&args, json)
}

/// Every message PUBLISHed, PUBACKed and delivered exactly once, in order:
/// none lost, none left unverified. MQTT 3.1.1 has no receipts.
fn assert_chat_lost_nothing(engine: &str, status: i32, r: &Value) {
    assert_eq!(status, 0, "{engine}: exit status");
    assert_eq!(u(r, &["connections", "failed"]), 0, "{engine}: {r:#}");
    assert_eq!(u(r, &["counters", "login_ok"]), 200);
    let scheduled = u(r, &["messages", "scheduled"]);
    assert_eq!(scheduled, 400);
    for field in ["sent", "acked", "delivered"] {
        assert_eq!(u(r, &["messages", field]), scheduled, "{engine}: {field}");
    }
    for field in [
        "lost",
        "unverified",
        "duplicates",
        "out_of_order",
        "foreign",
        "refused",
        "receipted",
    ] {
        assert_eq!(u(r, &["messages", field]), 0, "{engine}: {field}: {r:#}");
    }
}

/// Users chat over Tern's MQTT listener with every engine: all connected
/// and subscribed, every message PUBACKed and delivered, none lost.
#[test]
fn chat_over_tern_mqtt_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mqtt = server.mqtt_addr().expect("mqtt listener").to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-{engine}.json"));
        let (status, r) = chat(
            &mqtt,
            "tern",
            engine,
            50_000_000 + i as u64 * 1_000_000,
            &[],
            &json,
        );
        assert_chat_lost_nothing(engine, status, &r);
    }
    server.shutdown();
    server.join();
}

/// `--protocol mqtt --tls`: the same chat over Tern's MQTT-over-TLS
/// listener (`mqtt_tls_listen`), both engines, with a CA made here.
#[test]
fn chat_over_tern_mqtt_tls_loses_nothing() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "loadgen test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let (cert_path, key_path, ca_path) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    // The server refuses a private key that group or others can read.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&key_path, private).unwrap();
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let server = Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        mqtt_tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: cert_path,
        tls_key: key_path,
        shards: 2,
        stats_socket: dir.path().join("tern.sock"),
        data_dir: dir.path().join("data"),
        io: test_backend(),
        ..Default::default()
    })
    .expect("server starts");
    let addr = server.mqtt_tls_addr().unwrap().to_string();
    let ca_arg = ca_path.to_str().unwrap();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-tls-{engine}.json"));
        let base = 56_000_000 + i as u64 * 1_000_000;
        let extra = ["--tls", "--tls-ca", ca_arg];
        let (status, r) = chat(&addr, "tern", engine, base, &extra, &json);
        assert_chat_lost_nothing(engine, status, &r);
    }
    server.shutdown();
    server.join();
}

/// `connect` holds MQTT connections with PINGREQ keepalives: the
/// PINGREQs get their PINGRESPs (PONGs), nothing drops.
#[test]
fn connect_holds_with_pingreq_keepalives() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mqtt = server.mqtt_addr().expect("mqtt listener").to_string();
    let json = dir.path().join("hold.json");
    let (status, r) = loadgen(
        &[
            "connect",
            "--protocol",
            "mqtt",
            "--server",
            &mqtt,
            "--conns",
            "50",
            "--hold",
            "1s",
            "--ping-every",
            "200ms",
            "--user-base",
            "57000000",
        ],
        &json,
    );
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(u(&r, &["counters", "login_ok"]), 50, "{r:#}");
    assert_eq!(u(&r, &["connections", "failed"]), 0, "{r:#}");
    let pings = u(&r, &["counters", "pings"]);
    assert!(pings >= 50, "every connection pinged at least once: {r:#}");
    // A PINGREQ written just before the close may miss its PINGRESP: at
    // most one per connection.
    let pongs = u(&r, &["counters", "pongs"]);
    assert!(pongs <= pings && pongs + 50 >= pings, "{r:#}");
    server.shutdown();
    server.join();
}

/// A token signed with another secret: Tern's CONNACK refuses it (0x04,
/// bad user name or password), which the report counts as a refused login.
#[test]
fn a_bad_token_is_refused_at_connack() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mqtt = server.mqtt_addr().expect("mqtt listener").to_string();
    let json = dir.path().join("bad.json");
    let (status, r, _) = loadgen_with_secret(
        &[
            "connect",
            "--protocol",
            "mqtt",
            "--server",
            &mqtt,
            "--conns",
            "5",
            "--hold",
            "0s",
            "--user-base",
            "53000000",
        ],
        "not-the-server-secret",
        &json,
    );
    assert_eq!(status, 3, "{r:#}");
    assert_eq!(
        u(&r, &["connections", "failures", "login:bad_token"]),
        5,
        "{r:#}"
    );
    assert_eq!(u(&r, &["counters", "login_ok"]), 0);
    server.shutdown();
    server.join();
}

/// A storm over MQTT: every connection is reset, connects and subscribes
/// again, on each engine.
#[test]
fn storm_over_mqtt_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mqtt = server.mqtt_addr().expect("mqtt listener").to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("storm-{engine}.json"));
        let base = (54_000_000 + i * 1_000_000).to_string();
        let (status, r) = loadgen(
            &[
                "storm",
                "--protocol",
                "mqtt",
                "--server",
                &mqtt,
                "--engine",
                engine,
                "--conns",
                "100",
                "--rate",
                "2000/s",
                "--hold",
                "200ms",
                "--jitter",
                "300ms",
                "--rounds",
                "1",
                "--user-base",
                &base,
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: {r:#}");
        let round = &r["storm"]["rounds"][0];
        assert_eq!(round["recovered"], true, "{engine}: {r:#}");
        assert_eq!(u(round, &["up"]), 100);
        assert_eq!(u(&r, &["counters", "login_ok"]), 200, "{engine}");
    }
    server.shutdown();
    server.join();
}

/// Options MQTT has no meaning for are refused before anything connects.
#[test]
fn options_mqtt_cannot_carry_are_refused() {
    let cases: [&[&str]; 4] = [
        &["offline", "--protocol", "mqtt"],
        &["chat", "--protocol", "mqtt", "--cut-rate", "5/s"],
        &["connect", "--protocol", "mqtt", "--devices", "2"],
        &["connect", "--protocol", "mqtt", "--raw"],
    ];
    for args in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
            .args(args)
            // Nothing listens there: an attempt to connect would fail
            // differently (and later) than the refusal.
            .args(["--server", "127.0.0.1:1", "--quiet"])
            .output()
            .expect("tern-loadgen runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("mqtt"), "{args:?}: {stderr}");
        assert!(!stderr.contains("ramp"), "{args:?} started: {stderr}");
    }
}

/// A mosquitto broker on a loopback port, stopped (by its PID) on drop.
struct Mosquitto {
    child: Child,
    port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts mosquitto with a generated configuration (anonymous, no
/// persistence, no in-flight or queue limits that would drop a message);
/// `None` when it is not installed (and not required).
fn mosquitto(dir: &Path) -> Option<Mosquitto> {
    // Debian puts the broker in /usr/sbin, often not on a user's PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let bin = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file());
    let Some(bin) = bin else {
        assert!(
            std::env::var_os("TERN_REQUIRE_MOSQUITTO").is_none(),
            "TERN_REQUIRE_MOSQUITTO is set but the mosquitto broker is not installed"
        );
        eprintln!("skipped: the mosquitto broker is not installed (apt-get install mosquitto)");
        return None;
    };
    // A free port: bound, read and released (mosquitto cannot report one).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 0\nmax_queued_messages 0\nlog_dest none\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    let m = Mosquitto { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(m)
}

/// The same chat against mosquitto (`--broker generic`: no user name or
/// password, the same `u/<id>` topics): nothing lost either.
#[test]
fn chat_over_mosquitto_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = mosquitto(dir.path()) else {
        return;
    };
    let addr = format!("127.0.0.1:{}", broker.port);
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-{engine}.json"));
        let (status, r) = chat(
            &addr,
            "generic",
            engine,
            55_000_000 + i as u64 * 1_000_000,
            &[],
            &json,
        );
        assert_chat_lost_nothing(engine, status, &r);
    }
}
