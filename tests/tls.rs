//! TLS 1.3 on `tls_listen`: handshake and message flow beside plaintext
//! clients, certificate checks on the client, a plaintext client on the TLS
//! port, session resumption and certificate reload. The CA and certificates
//! are made here with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tern::proto::{ByeReason, OwnedFrame, ReceiptKind};
use tern_client::rustls::{ClientConfig, HandshakeKind};
use tern_client::{tls_config, Client};

/// A test CA: its certificate (for the client's roots) and key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A server certificate for `host`, with `serial`, optionally expired.
    fn issue(&self, host: &str, serial: u64, expired: bool) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, host);
        params.serial_number = Some(serial.into());
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// Files of one test: the CA and the server's certificate and key.
struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn new(ca: &Ca, cert_pem: &str, key_pem: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ca: dir.path().join("ca.pem"),
            dir,
        };
        std::fs::write(&files.ca, ca.cert.pem()).unwrap();
        files.write(cert_pem, key_pem);
        files
    }

    fn write(&self, cert_pem: &str, key_pem: &str) {
        std::fs::write(&self.cert, cert_pem).unwrap();
        std::fs::write(&self.key, key_pem).unwrap();
        // The server refuses a private key others can read.
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&self.key, private).unwrap();
    }

    fn client_config(&self) -> Arc<ClientConfig> {
        tls_config(&self.ca).unwrap()
    }
}

fn tls_server(cert: &Path, key: &Path) -> TestServer {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    TestServer::start_with(move |c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = cert;
        c.tls_key = key;
    })
}

/// A CA, a valid certificate for `localhost` and a server using it.
fn setup() -> (Ca, Files, TestServer) {
    let ca = Ca::new("tern test CA");
    let (cert, key, _) = ca.issue("localhost", 1, false);
    let files = Files::new(&ca, &cert, &key);
    let srv = tls_server(&files.cert, &files.key);
    (ca, files, srv)
}

fn login_tls(srv: &TestServer, config: &Arc<ClientConfig>, user: u64) -> Client {
    Client::login_tls(srv.tls_addr.unwrap(), "localhost", config, &token(user))
        .unwrap_or_else(|e| panic!("TLS login of {user} failed: {e}"))
        .0
}

fn ack(client: &mut Client, client_id: u64) -> u64 {
    match client.recv_until(|f| matches!(f, OwnedFrame::Ack { .. } | OwnedFrame::Error { .. })) {
        Ok(OwnedFrame::Ack {
            client_id: id,
            server_id,
            ..
        }) if id == client_id => server_id,
        other => panic!("expected ACK({client_id}), got {other:?}"),
    }
}

fn deliver(client: &mut Client) -> (u64, u64, Vec<u8>) {
    match client.recv_until(|f| matches!(f, OwnedFrame::Deliver { .. })) {
        Ok(OwnedFrame::Deliver {
            server_id,
            from,
            body,
            ..
        }) => (server_id, from, body),
        other => panic!("expected DELIVER, got {other:?}"),
    }
}

fn receipt(client: &mut Client) -> (ReceiptKind, u64, u64) {
    match client.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. })) {
        Ok(OwnedFrame::Receipt {
            kind,
            server_id,
            peer,
        }) => (kind, server_id, peer),
        other => panic!("expected RECEIPT, got {other:?}"),
    }
}

/// SEND → ACK → DELIVER → DELIVERED → RECEIPT both ways between a TLS
/// client and a plaintext client homed on different shards (so the TLS
/// connection, TLS state and all, is handed to its home shard).
#[test]
fn tls_and_plain_clients_exchange_messages() {
    let (_ca, files, srv) = setup();
    let config = files.client_config();
    let (a, b) = cross_pair();
    for (tls_user, plain_user) in [(a, b), (b, a)] {
        let mut t = login_tls(&srv, &config, tls_user);
        let mut p = srv.login(plain_user);

        t.send_msg(1, plain_user, b"over tls").unwrap();
        let sid = ack(&mut t, 1);
        assert_eq!(deliver(&mut p), (sid, tls_user, b"over tls".to_vec()));
        p.send_delivered(sid).unwrap();
        assert_eq!(receipt(&mut t), (ReceiptKind::Delivered, sid, plain_user));

        // A body larger than one TLS record (16 KiB) both ways.
        let big = vec![7u8; 40_000];
        p.send_msg(2, tls_user, &big).unwrap();
        let sid = ack(&mut p, 2);
        let (got, from, body) = deliver(&mut t);
        assert!(
            got == sid && from == plain_user && body == big,
            "DELIVER {got} from {from}"
        );
        t.send_delivered(sid).unwrap();
        assert_eq!(receipt(&mut p), (ReceiptKind::Delivered, sid, tls_user));
        t.send_msg(3, plain_user, &big).unwrap();
        let sid = ack(&mut t, 3);
        let (got, from, body) = deliver(&mut p);
        assert!(
            got == sid && from == tls_user && body == big,
            "DELIVER {got} from {from}"
        );
        p.send_delivered(sid).unwrap();
        assert_eq!(receipt(&mut t), (ReceiptKind::Delivered, sid, plain_user));
        t.ping(9).unwrap();
    }
    assert!(srv.metric_sum("tern_tls_handshakes_total") >= 2);
    assert_eq!(srv.metric_sum("tern_tls_failures_total"), 0);
}

#[test]
fn certificate_for_another_host_is_refused() {
    let (_ca, files, srv) = setup();
    let config = files.client_config();
    let err = Client::connect_tls(srv.tls_addr.unwrap(), "not-localhost.example", &config)
        .expect_err("a certificate for localhost must not pass for another name");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[test]
fn expired_certificate_is_refused() {
    let ca = Ca::new("tern test CA");
    let (cert, key, _) = ca.issue("localhost", 2, true);
    let files = Files::new(&ca, &cert, &key);
    let srv = tls_server(&files.cert, &files.key);
    let err = Client::connect_tls(srv.tls_addr.unwrap(), "localhost", &files.client_config())
        .expect_err("an expired certificate must be refused");
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
}

/// A plaintext LOGIN on the TLS port: the server closes the connection
/// (no panic), counts a TLS failure and a protocol error, and goes on.
#[test]
fn plaintext_client_on_tls_port_is_closed() {
    let (_ca, files, srv) = setup();
    let result = Client::login(srv.tls_addr.unwrap(), &token(1));
    match result {
        Err(tern_client::ClientError::Closed) | Err(tern_client::ClientError::Decode(_)) => {}
        Err(tern_client::ClientError::Io(e)) => {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "{e}"
            );
        }
        other => panic!("expected the server to close, got {other:?}"),
    }
    srv.wait_metric("tern_tls_failures_total", |n| n >= 1);
    srv.wait_metric("tern_protocol_errors_total", |n| n >= 1);
    assert_eq!(srv.info_u64("Panics"), 0);
    // Both listeners still serve.
    let config = files.client_config();
    let _t = login_tls(&srv, &config, 2);
    let _p = srv.login(3);
}

/// A second login replaces the first: the first gets BYE(replaced) over TLS,
/// then the end of the TLS stream and of the connection.
#[test]
fn replaced_tls_session_gets_bye_then_close() {
    let (_ca, files, srv) = setup();
    let config = files.client_config();
    let (a, _) = same_pair();
    let mut first = login_tls(&srv, &config, a);
    let _second = login_tls(&srv, &config, a);
    let frames = first.wait_closed(WAIT).expect("closed by the server");
    assert!(
        frames.iter().any(|f| matches!(
            f,
            OwnedFrame::Bye {
                reason: ByeReason::Replaced
            }
        )),
        "{frames:?}"
    );
    assert_eq!(srv.metric_sum("tern_tls_failures_total"), 0);
}

#[test]
fn reconnect_resumes_the_session() {
    let (_ca, files, srv) = setup();
    let config = files.client_config();
    let (a, _) = same_pair();
    let first = login_tls(&srv, &config, a);
    assert_eq!(first.tls_handshake_kind(), Some(HandshakeKind::Full));
    drop(first);
    let second = login_tls(&srv, &config, a);
    assert_eq!(second.tls_handshake_kind(), Some(HandshakeKind::Resumed));
    // A fresh client config has no ticket: full handshake.
    let third = login_tls(&srv, &files.client_config(), a);
    assert_eq!(third.tls_handshake_kind(), Some(HandshakeKind::Full));
}

#[test]
fn reload_tls_switches_the_certificate() {
    let ca = Ca::new("tern test CA");
    let (cert1, key1, der1) = ca.issue("localhost", 101, false);
    let files = Files::new(&ca, &cert1, &key1);
    let srv = tls_server(&files.cert, &files.key);
    let peer_leaf = |srv: &TestServer| {
        let c = Client::connect_tls(srv.tls_addr.unwrap(), "localhost", &files.client_config())
            .unwrap();
        c.tls_peer_certificates().unwrap()[0].to_vec()
    };
    assert_eq!(peer_leaf(&srv), der1);

    let (cert2, key2, der2) = ca.issue("localhost", 202, false);
    files.write(&cert2, &key2);
    let answer = srv.query("reload tls");
    assert!(answer.contains("reloaded"), "{answer}");
    assert_eq!(peer_leaf(&srv), der2);

    // A broken file keeps the current certificate.
    std::fs::write(&files.key, "not a key").unwrap();
    let answer = srv.query("reload tls");
    assert!(answer.contains("failed"), "{answer}");
    assert_eq!(peer_leaf(&srv), der2);
    let _ = files.dir.path();
}

#[test]
fn start_fails_naming_a_missing_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls_cert = dir.path().join("missing-cert.pem");
    config.tls_key = dir.path().join("missing-key.pem");
    let err = tern::server::Server::start(config)
        .err()
        .expect("start must fail");
    let text = err.to_string();
    assert!(
        text.contains("tls_cert") && text.contains("missing-cert.pem"),
        "{text}"
    );
}

/// SIGHUP to a `tern serve` process re-reads the certificate and keeps
/// serving (it is not a shutdown signal).
#[test]
fn sighup_reloads_the_certificate() {
    let ca = Ca::new("tern test CA");
    let (cert1, key1, der1) = ca.issue("localhost", 301, false);
    let files = Files::new(&ca, &cert1, &key1);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (plain, tls) = (free(), free());
    let stats = files.dir.path().join("tern.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--durability", "memory", "--shards", "1"])
        .args(["--listen", &plain.to_string()])
        .args(["--tls-listen", &tls.to_string()])
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .arg("--stats-socket")
        .arg(&stats)
        .env("TERN_TOKEN_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn tern");
    assert!(
        wait_for(|| tern::stats::query(&stats, "show info").is_ok()),
        "server did not start"
    );
    let config = files.client_config();
    let leaf = || {
        Client::connect_tls(tls, "localhost", &config)
            .ok()
            .and_then(|c| c.tls_peer_certificates())
            .map(|c| c[0].to_vec())
    };
    assert_eq!(leaf(), Some(der1));
    let (cert2, key2, der2) = ca.issue("localhost", 302, false);
    files.write(&cert2, &key2);
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    assert!(
        wait_for(|| leaf() == Some(der2.clone())),
        "the new certificate never showed"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the server"
    );
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
