//! TLS figures for `results/tls/` (ignored: run by hand, preferably with
//! `--release`):
//!
//! ```text
//! cargo test --release -p tern --test tls_figures -- --ignored --nocapture --test-threads 1
//! ```
//!
//! The server runs as a child process (`tern serve`), so its resident memory
//! is its own: the clients live in the test process. Each figure starts a
//! fresh server, so memory freed by one phase is not reused by the next.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tern_client::rustls::client::Resumption;
use tern_client::rustls::{ClientConfig, HandshakeKind};
use tern_client::{tls_config, Client};

const SECRET: &str = "figures-secret-0123456789abcdef";

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Server {
    child: Child,
    plain: SocketAddr,
    tls: SocketAddr,
    stats: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path, shards: usize, io: &str) -> Server {
        let (plain, tls) = (free_port(), free_port());
        let stats = dir.join(format!("tern-{}.sock", plain.port()));
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["serve", "--durability", "memory", "--io", io])
            .args(["--shards", &shards.to_string()])
            .args(["--listen", &plain.to_string()])
            .args(["--tls-listen", &tls.to_string()])
            .arg("--tls-cert")
            .arg(dir.join("cert.pem"))
            .arg("--tls-key")
            .arg(dir.join("key.pem"))
            .arg("--stats-socket")
            .arg(&stats)
            .args(["--accept-rate-per-s-max", "0"])
            .env("TERN_TOKEN_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tern");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tern::stats::query(&stats, "show info").is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server {
            child,
            plain,
            tls,
            stats,
        }
    }

    fn rss_bytes(&self) -> u64 {
        let mut s = String::new();
        std::fs::File::open(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// CPU seconds the server used so far (user + system).
    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line, in clock ticks.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks as f64 / hz
    }

    fn conns(&self) -> u64 {
        let info = tern::stats::query(&self.stats, "show info").unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("Conns: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(user: u64) -> String {
    tern::token::mint(SECRET.as_bytes(), user, tern::token::now_unix_s() + 3600)
}

/// A CA and a `localhost` certificate in `dir`; returns the CA file.
fn certs(dir: &Path) -> std::path::PathBuf {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "figures CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    // The server refuses a private key others can read.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(dir.join("key.pem"), private).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    dir.join("ca.pem")
}

fn idle_conns() -> usize {
    std::env::var("TERN_FIG_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

fn io() -> String {
    std::env::var("TERN_TEST_IO").unwrap_or_else(|_| "auto".to_string())
}

/// Server RSS growth per idle, logged-in connection: plaintext, then TLS
/// (each on a fresh server).
#[test]
#[ignore]
fn idle_bytes_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let config = tls_config(&ca).unwrap();
    let n = idle_conns();
    for tls in [false, true] {
        let srv = Server::start(dir.path(), 2, &io());
        std::thread::sleep(Duration::from_millis(300));
        let before = srv.rss_bytes();
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let user = 1 + i as u64;
            let c = if tls {
                Client::login_tls(srv.tls, "localhost", &config, &token(user))
            } else {
                Client::login(srv.plain, &token(user))
            };
            clients.push(c.unwrap().0);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while srv.conns() < n as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = srv.rss_bytes();
        println!(
            "idle {} conns={n} io={}: server RSS {} -> {} bytes, {} bytes per connection",
            if tls { "TLS" } else { "plain" },
            io(),
            before,
            after,
            (after.saturating_sub(before)) / n as u64
        );
        drop(clients);
    }
}

/// Handshakes per wall-clock second, per server CPU second, and the share
/// that resumed.
fn handshakes(
    srv: &Server,
    config: &Arc<ClientConfig>,
    threads: usize,
    secs: f64,
) -> (f64, f64, f64) {
    let cpu = srv.cpu_s();
    let started = Instant::now();
    let counts: Vec<(usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let config = config.clone();
                let addr = srv.tls;
                let token = token(1 + t as u64);
                s.spawn(move || {
                    let (mut n, mut resumed) = (0, 0);
                    while started.elapsed().as_secs_f64() < secs {
                        // LOGIN too: the session ticket comes after the
                        // handshake, and a client that never reads has none.
                        let (c, _) = Client::login_tls(addr, "localhost", &config, &token).unwrap();
                        if c.tls_handshake_kind() == Some(HandshakeKind::Resumed) {
                            resumed += 1;
                        }
                        drop(c);
                        n += 1;
                    }
                    (n, resumed)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: usize = counts.iter().map(|c| c.0).sum();
    let resumed: usize = counts.iter().map(|c| c.1).sum();
    let cpu = srv.cpu_s() - cpu;
    (
        total as f64 / started.elapsed().as_secs_f64(),
        total as f64 / cpu.max(0.01),
        resumed as f64 / total.max(1) as f64,
    )
}

/// TLS connects (handshake + LOGIN) per second, full and resumed, client
/// threads on the same box.
#[test]
#[ignore]
fn handshakes_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let srv = Server::start(dir.path(), 1, &io());
    let resumed = tls_config(&ca).unwrap();
    let mut full = (*tls_config(&ca).unwrap()).clone();
    full.resumption = Resumption::disabled();
    let full = Arc::new(full);
    // Warm the resumption cache.
    let c = Client::connect_tls(srv.tls, "localhost", &resumed).unwrap();
    drop(c);
    for (name, config) in [("full", &full), ("resumed", &resumed)] {
        let (rate, per_cpu, share) = handshakes(&srv, config, 2, 5.0);
        println!(
            "handshakes {name}: {rate:.0}/s wall, {per_cpu:.0} per server CPU second, {:.0}% resumed (1 server shard, io={}, 2 client threads)",
            share * 100.0,
            io()
        );
    }
}

/// Chat throughput: N pairs exchanging 100-byte messages one at a time
/// (SEND, ACK, DELIVER, DELIVERED, RECEIPT) over plaintext and over TLS;
/// messages per second. Latency-bound: the clients share the box.
#[test]
#[ignore]
fn chat_tls_vs_plain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let config = tls_config(&ca).unwrap();
    let srv = Server::start(dir.path(), 2, &io());
    let pairs = 8u64;
    let secs = 5.0;
    let mut rates = Vec::new();
    for tls in [false, true] {
        let base = if tls { 10_000 } else { 1 };
        let cpu = srv.cpu_s();
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..pairs)
                .map(|p| {
                    let config = config.clone();
                    let srv = &srv;
                    s.spawn(move || {
                        let (a, b) = (base + 2 * p, base + 2 * p + 1);
                        let login = |u: u64| {
                            if tls {
                                Client::login_tls(srv.tls, "localhost", &config, &token(u))
                            } else {
                                Client::login(srv.plain, &token(u))
                            }
                            .unwrap()
                            .0
                        };
                        let (mut ca, mut cb) = (login(a), login(b));
                        let body = [b'x'; 100];
                        let mut n = 0u64;
                        while started.elapsed().as_secs_f64() < secs {
                            ca.send_msg(n, b, &body).unwrap();
                            let sid = match cb
                                .recv_until(|f| {
                                    matches!(f, tern::proto::OwnedFrame::Deliver { .. })
                                })
                                .unwrap()
                            {
                                tern::proto::OwnedFrame::Deliver { server_id, .. } => server_id,
                                _ => unreachable!(),
                            };
                            cb.send_delivered(sid).unwrap();
                            ca.recv_until(|f| matches!(f, tern::proto::OwnedFrame::Ack { .. }))
                                .unwrap();
                            ca.recv_until(|f| matches!(f, tern::proto::OwnedFrame::Receipt { .. }))
                                .unwrap();
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let rate = total as f64 / started.elapsed().as_secs_f64();
        let cpu_us = (srv.cpu_s() - cpu) * 1e6 / total.max(1) as f64;
        println!(
            "chat {}: {rate:.0} msgs/s, {cpu_us:.1} server CPU us per message ({pairs} pairs, 100-byte bodies, io={})",
            if tls { "TLS" } else { "plain" },
            io()
        );
        rates.push((rate, cpu_us));
    }
    println!(
        "chat TLS/plain: throughput ratio {:.2}, server CPU per message ratio {:.2}",
        rates[1].0 / rates[0].0,
        rates[1].1 / rates[0].1
    );
}
