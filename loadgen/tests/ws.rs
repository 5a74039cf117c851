//! `--ws`: the load generator over the server's WebSocket listener
//! (`ws_listen`), started in this process on loopback. Only counts are
//! asserted, no timings.

use std::path::{Path, PathBuf};
use tern::config::Config;
use tern::server::Server;

mod common;
use common::{engines, loadgen, server_config, start_server, u};

const ORIGIN: &str = "https://chat.example";

/// A server with a WebSocket listener that allows only [`ORIGIN`].
fn start(dir: &Path) -> Server {
    start_server(Config {
        ws_listen: Some("127.0.0.1:0".parse().unwrap()),
        ws_origins: vec![ORIGIN.to_string()],
        ..server_config(dir)
    })
}

/// Users chat over WebSocket with every engine: all logged in, every
/// message ACKed, delivered and receipted, none lost.
#[test]
fn chat_over_websocket_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ws = server.ws_addr().expect("ws listener").to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-{engine}.json"));
        let base = (40_000_000 + i * 1_000_000).to_string();
        let (status, r) = loadgen(
            &[
                "chat",
                "--ws",
                "--ws-origin",
                ORIGIN,
                "--server",
                &ws,
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
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: exit status");
        assert_eq!(u(&r, &["connections", "failed"]), 0, "{engine}: {r:#}");
        assert_eq!(u(&r, &["counters", "login_ok"]), 200);
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert_eq!(scheduled, 400);
        for field in ["sent", "acked", "delivered", "receipted"] {
            assert_eq!(u(&r, &["messages", field]), scheduled, "{engine}: {field}");
        }
        for field in ["lost", "duplicates", "out_of_order", "foreign"] {
            assert_eq!(u(&r, &["messages", field]), 0, "{engine}: {field}");
        }
    }
    server.shutdown();
    server.join();
}

/// An `Origin` outside the server's allow-list is refused at the upgrade:
/// every connection fails as `connect:EPROTO`, none logs in.
#[test]
fn a_wrong_origin_fails_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ws = server.ws_addr().expect("ws listener").to_string();
    let json = dir.path().join("origin.json");
    let (status, r) = loadgen(
        &[
            "connect",
            "--ws",
            "--ws-origin",
            "https://evil.example",
            "--server",
            &ws,
            "--conns",
            "5",
            "--hold",
            "0s",
            "--user-base",
            "43000000",
        ],
        &json,
    );
    assert_eq!(status, 3, "{r:#}");
    assert_eq!(u(&r, &["connections", "failed"]), 5, "{r:#}");
    assert_eq!(
        u(&r, &["connections", "failures", "connect:EPROTO"]),
        5,
        "{r:#}"
    );
    assert_eq!(u(&r, &["counters", "login_ok"]), 0);
    server.shutdown();
    server.join();
}

/// A storm over WebSocket: every connection is reset and upgrades and
/// logs in again, on each engine.
#[test]
fn storm_over_websocket_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ws = server.ws_addr().expect("ws listener").to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("storm-{engine}.json"));
        let base = (44_000_000 + i * 1_000_000).to_string();
        let (status, r) = loadgen(
            &[
                "storm",
                "--ws",
                "--ws-origin",
                ORIGIN,
                "--server",
                &ws,
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

/// A CA and a `localhost` certificate signed by it, written to `dir`:
/// (cert, key, ca) paths; the key is private to its owner, as the server wants.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "wss test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let paths = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &paths.1,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(&paths.2, ca_cert.pem()).unwrap();
    paths
}

/// `--wss`: users chat over WebSocket over TLS on the server's TLS
/// listener (the same port TLS Tern clients use), with every engine: all
/// logged in, every message ACKed, delivered and receipted, none lost. A
/// wrong `Origin` is still refused at the upgrade, inside TLS.
#[test]
fn chat_over_wss_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (tls_cert, tls_key, ca) = certificates(dir.path());
    let server = start_server(Config {
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert,
        tls_key,
        ws_origins: vec![ORIGIN.to_string()],
        ..server_config(dir.path())
    });
    let tls = server.tls_addr().expect("tls listener").to_string();
    let ca = ca.to_str().unwrap().to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let json = dir.path().join(format!("chat-wss-{engine}.json"));
        let base = (46_000_000 + i * 1_000_000).to_string();
        let (status, r) = loadgen(
            &[
                "chat",
                "--wss",
                "--tls-ca",
                &ca,
                "--ws-origin",
                ORIGIN,
                "--server",
                &tls,
                "--engine",
                engine,
                "--conns",
                "100",
                "--rate",
                "2000/s",
                "--msg-rate",
                "200/s",
                "--duration",
                "1s",
                "--drain",
                "20s",
                "--user-base",
                &base,
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: exit status");
        assert_eq!(u(&r, &["connections", "failed"]), 0, "{engine}: {r:#}");
        assert_eq!(u(&r, &["counters", "login_ok"]), 100);
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert_eq!(scheduled, 200);
        for field in ["sent", "acked", "delivered", "receipted"] {
            assert_eq!(u(&r, &["messages", field]), scheduled, "{engine}: {field}");
        }
        for field in ["lost", "duplicates", "out_of_order", "foreign"] {
            assert_eq!(u(&r, &["messages", field]), 0, "{engine}: {field}");
        }
    }
    let json = dir.path().join("wss-origin.json");
    let (status, r) = loadgen(
        &[
            "connect",
            "--wss",
            "--tls-ca",
            &ca,
            "--ws-origin",
            "https://evil.example",
            "--server",
            &tls,
            "--conns",
            "5",
            "--hold",
            "0s",
            "--user-base",
            "48000000",
        ],
        &json,
    );
    assert_eq!(status, 3, "{r:#}");
    assert_eq!(
        u(&r, &["connections", "failures", "connect:EPROTO"]),
        5,
        "{r:#}"
    );
    assert_eq!(u(&r, &["counters", "login_ok"]), 0);
    server.shutdown();
    server.join();
}
