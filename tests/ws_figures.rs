//! WebSocket figures for `results/ws/` (ignored: run by hand, preferably
//! with `--release`):
//!
//! ```text
//! cargo test --release -p tern --test ws_figures -- --ignored --nocapture --test-threads 1
//! ```
//!
//! The server runs as a child process (`tern serve`), so its resident memory
//! is its own: the clients live in the test process. Each figure starts a
//! fresh server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern::proto::{self, Frame};
use tern_client::Client;

const SECRET: &str = "figures-secret-0123456789abcdef";

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Server {
    child: Child,
    plain: SocketAddr,
    ws: SocketAddr,
    stats: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path, io: &str) -> Server {
        let (plain, ws) = (free_port(), free_port());
        let stats = dir.join(format!("tern-{}.sock", plain.port()));
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args([
                "serve",
                "--durability",
                "memory",
                "--io",
                io,
                "--shards",
                "2",
            ])
            .args(["--listen", &plain.to_string()])
            .args(["--ws-listen", &ws.to_string()])
            .arg("--stats-socket")
            .arg(&stats)
            .args([
                "--accept-rate-per-s-max",
                "0",
                "--addr-conns-per-s-max",
                "0",
            ])
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
            ws,
            stats,
        }
    }

    fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
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

/// Upgrades and logs in over WebSocket; returns the socket once LOGIN_OK
/// (a binary message) has come.
fn ws_login(addr: SocketAddr, user: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let token = token(user);
    let mut login = Vec::new();
    proto::encode(
        &Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        },
        &mut login,
    );
    // One masked binary message (mask 0: the XOR leaves the bytes as they are).
    let mut msg = vec![0x82, 0x80 | 126];
    msg.extend_from_slice(&(login.len() as u16).to_be_bytes());
    msg.extend_from_slice(&[0; 4]);
    msg.extend_from_slice(&login);
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(&msg).unwrap();
    // The 101 answer, then a binary message holding LOGIN_OK (type 0x02).
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during login");
        got.extend_from_slice(&chunk[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = &got[end + 4..];
            if rest.len() >= 4 {
                assert_eq!(rest[0], 0x82);
                assert_eq!(rest[3], 0x02, "LOGIN_OK");
                return s;
            }
        }
    }
}

/// Server RSS growth per idle, logged-in connection: plaintext, then
/// WebSocket (each on a fresh server).
#[test]
#[ignore]
fn idle_bytes_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let n: usize = std::env::var("TERN_FIG_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let io = std::env::var("TERN_TEST_IO").unwrap_or_else(|_| "auto".to_string());
    for ws in [false, true] {
        let srv = Server::start(dir.path(), &io);
        std::thread::sleep(Duration::from_millis(300));
        let before = srv.rss_bytes();
        let mut plain = Vec::new();
        let mut sockets = Vec::new();
        for i in 0..n {
            let user = 1 + i as u64;
            if ws {
                sockets.push(ws_login(srv.ws, user));
            } else {
                plain.push(Client::login(srv.plain, &token(user)).unwrap().0);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while srv.conns() < n as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = srv.rss_bytes();
        println!(
            "idle {} conns={n} io={io}: server RSS {before} -> {after} bytes, {} bytes per connection",
            if ws { "WebSocket" } else { "plain" },
            after.saturating_sub(before) / n as u64
        );
    }
}
