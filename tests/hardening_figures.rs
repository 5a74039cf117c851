//! Memory figures of the abuse limits for `results/hardening/` (ignored:
//! run by hand, preferably with `--release`):
//!
//! ```text
//! cargo test --release -p tern --test hardening_figures -- --ignored --nocapture --test-threads 1
//! ```
//!
//! The server runs as a child process (`tern serve`), so its resident
//! memory is its own. Each figure starts a fresh server. Clients connect
//! from 250 source addresses (127.0.2.x), as many users behind many
//! addresses would, so the per-address limits stay at their defaults.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tern::proto::{Frame, OwnedFrame};
use tern_client::Client;

const SECRET: &str = "figures-secret-0123456789abcdef";

struct Server {
    child: Child,
    addr: SocketAddr,
    stats: std::path::PathBuf,
}

impl Server {
    fn start(dir: &std::path::Path, extra: &[&str]) -> Server {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stats = dir.join(format!("tern-{}.sock", addr.port()));
        let io = std::env::var("TERN_TEST_IO").unwrap_or_else(|_| "auto".to_string());
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["serve", "--durability", "memory", "--shards", "2"])
            .args(["--io", &io, "--listen", &addr.to_string()])
            .arg("--stats-socket")
            .arg(&stats)
            .args(["--accept-rate-per-s-max", "0"])
            .args(extra)
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
        std::thread::sleep(Duration::from_millis(300));
        Server { child, addr, stats }
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

    fn users_online(&self) -> u64 {
        let info = tern::stats::query(&self.stats, "show info").unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("Users_online: "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect_from(i: usize, addr: SocketAddr) -> Client {
    let ip = IpAddr::from([127, 0, 2, 1 + (i % 250) as u8]);
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    Client::from_stream(socket.into()).unwrap()
}

fn conns() -> usize {
    std::env::var("TERN_FIG_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

/// Logs in `n` users, each sends itself `msgs` messages and answers their
/// DELIVERs with DELIVERED (so the server remembers them for READ), then
/// they all sit idle. Returns the server's RSS growth per connection.
fn bytes_per_conn(extra: &[&str], msgs: u64) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), extra);
    let n = conns();
    let before = srv.rss_bytes();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let user = 1 + i as u64;
        let token = tern::token::mint(SECRET.as_bytes(), user, tern::token::now_unix_s() + 3600);
        let mut c = connect_from(i, srv.addr);
        c.login_here(&token).expect("login");
        if msgs > 0 {
            let mut wire = Vec::new();
            for id in 1..=msgs {
                let send = Frame::Send {
                    client_id: id,
                    to: user,
                    body: b"figure",
                };
                tern::proto::encode(&send, &mut wire);
            }
            c.send_raw(&wire).unwrap();
            let mut delivered = 0;
            while delivered < msgs {
                if let OwnedFrame::Deliver { server_id, .. } = c.recv().unwrap() {
                    c.send_delivered(server_id).unwrap();
                    delivered += 1;
                }
            }
        }
        clients.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while srv.users_online() < n as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = srv.rss_bytes();
    let per = after.saturating_sub(before) / n as u64;
    println!(
        "conns={n} msgs_each={msgs} flags={extra:?}: server RSS {before} -> {after} bytes, \
         {per} bytes per connection"
    );
    drop(clients);
    per
}

/// Idle logged-in connections with the limits at their defaults and with
/// every one of them off, then after 1 and 16 messages each (remembered
/// for READ checks).
#[test]
#[ignore]
fn idle_bytes_per_connection_with_and_without_limits() {
    let off = [
        "--sends-per-s-max",
        "0",
        "--receipts-per-s-max",
        "0",
        "--pings-per-s-max",
        "0",
        "--delivered-recent-max",
        "0",
        "--addr-logins-failed-max",
        "0",
        "--addr-conns-per-s-max",
        "0",
        "--addr-pending-max",
        "0",
        "--pending-max",
        "0",
    ];
    let limits_off = bytes_per_conn(&off, 0);
    let limits_on = bytes_per_conn(&[], 0);
    let one = bytes_per_conn(&[], 1);
    let sixteen = bytes_per_conn(&[], 16);
    let sixteen_off = bytes_per_conn(&off, 16);
    println!(
        "idle: limits off {limits_off} B, on {limits_on} B; after 1 message {one} B, \
         after 16 messages {sixteen} B (check off: {sixteen_off} B)"
    );
}
