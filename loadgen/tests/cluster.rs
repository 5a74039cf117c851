//! The load generator against a two-node Tern cluster on one `nats-server`
//! with JetStream (docs/CLUSTER.md), all on loopback ports in temp dirs:
//! every connection goes to node `a`, and those whose users node `b` serves
//! follow the REDIRECT there. Only counts are asserted, no timings. Skipped,
//! with a message, only when `nats-server` is not on PATH.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern::cluster::ClusterConfig;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

mod common;
use common::{engines, test_backend, u};

/// Upper bound for the two nodes to split the partitions (a lease is 3 s).
const SETTLE: Duration = Duration::from_secs(40);

/// A `nats-server -js` this test started; killed by its PID when dropped.
struct Nats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Option<Nats> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let spawned = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIPPED: nats-server is not on PATH (apt-get install nats-server)");
                return None;
            }
            Err(e) => panic!("cannot run nats-server: {e}"),
        };
        let nats = Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        assert!(
            until(|| TcpStream::connect(addr).is_ok()),
            "nats-server never listened on {addr}"
        );
        Some(nats)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free a moment ago; nats-server takes no port 0.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `cond` every 100 ms until it holds or [`SETTLE`] passes.
fn until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// One Tern node whose `public_addr` is its client address.
struct Node {
    server: Option<Server>,
    addr: SocketAddr,
    stats: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(nats: &Nats, id: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let stats = dir.path().join("tern.sock");
        let server = Server::start(Config {
            listen: addr,
            shards: 2,
            stats_socket: stats.clone(),
            data_dir: dir.path().join("data"),
            io: test_backend(),
            cluster: Some(ClusterConfig {
                node_id: id.into(),
                nats_urls: vec![nats.url.clone()],
                public_addr: addr.to_string(),
                partitions: 16,
                lease_s: 3,
                stream_replicas: 1,
            }),
            ..Default::default()
        })
        .expect("node starts");
        Node {
            server: Some(server),
            addr,
            stats,
            _dir: dir,
        }
    }

    /// A number from `show info`.
    fn info(&self, key: &str) -> u64 {
        let text = tern::stats::query(&self.stats, "show info").expect("stats answer");
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.join();
        }
    }
}

/// Runs the load generator with `args`; returns the exit status, the JSON
/// report and the summary.
fn loadgen(args: &[&str], json: &std::path::Path) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(args)
        .args(["--secret", DEV_TOKEN_SECRET, "--source", "127.0.0.1"])
        .args(["--quiet", "--max-time", "120s", "--json"])
        .arg(json)
        .output()
        .expect("tern-loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("no report ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    let r: Value = serde_json::from_str(&text).expect("report is JSON");
    (out.status.code().unwrap_or(-1), r, stdout)
}

/// `connect` and `chat` through node `a` only: the connections of users
/// that node `b` serves are redirected, log in at `b`, and every message
/// (most of them across nodes, through JetStream) is ACKed, delivered and
/// receipted once.
#[test]
fn connect_and_chat_through_one_node_follow_redirects() {
    let Some(nats) = Nats::start() else { return };
    let a = Node::start(&nats, "a");
    let b = Node::start(&nats, "b");
    let split = until(|| {
        [&a, &b].iter().all(|n| {
            n.info("Cluster_partitions_owned") == 8
                && n.info("Cluster_partitions_unowned") == 0
                && n.info("Cluster_consumers") == 8
        })
    });
    assert!(split, "the nodes never split 16 partitions 8/8");
    let dir = tempfile::tempdir().unwrap();
    let server = a.addr.to_string();
    for (i, engine) in engines().into_iter().enumerate() {
        let base = (30_000_000 + i * 1_000_000).to_string();
        let json = dir.path().join(format!("connect-{engine}.json"));
        let (status, r, summary) = loadgen(
            &[
                "connect",
                "--server",
                &server,
                "--engine",
                engine,
                "--conns",
                "60",
                "--rate",
                "600/s",
                "--hold",
                "1s",
                "--user-base",
                &base,
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: {summary}\n{r:#}");
        assert_eq!(u(&r, &["connections", "failed"]), 0, "{engine}: {r:#}");
        assert_eq!(u(&r, &["connections", "up_max"]), 60);
        assert_eq!(u(&r, &["counters", "login_ok"]), 60);
        let redirects = u(&r, &["counters", "redirects"]);
        // About half the users are b's; 60 users all on one node would be
        // odds of 2^-60.
        assert!(redirects > 0 && redirects < 60, "{engine}: {redirects}");
        // Each redirected connection opened twice.
        assert_eq!(u(&r, &["counters", "opened"]), 60 + redirects);
        assert!(
            summary.contains(&format!("redirects {redirects} ")),
            "{summary}"
        );

        let json = dir.path().join(format!("chat-{engine}.json"));
        let (status, r, summary) = loadgen(
            &[
                "chat",
                "--server",
                &server,
                "--engine",
                engine,
                "--conns",
                "60",
                "--rate",
                "600/s",
                "--msg-rate",
                "100/s",
                "--duration",
                "2s",
                "--drain",
                "30s",
                "--user-base",
                &base,
            ],
            &json,
        );
        assert_eq!(status, 0, "{engine}: {summary}\n{r:#}");
        assert_eq!(u(&r, &["connections", "failed"]), 0, "{engine}: {r:#}");
        assert_eq!(u(&r, &["counters", "login_ok"]), 60);
        assert_eq!(u(&r, &["counters", "redirects"]), redirects, "same users");
        let scheduled = u(&r, &["messages", "scheduled"]);
        assert_eq!(scheduled, 200);
        for key in ["sent", "acked", "delivered", "receipted"] {
            assert_eq!(
                u(&r, &["messages", key]),
                scheduled,
                "{engine} {key}: {r:#}"
            );
        }
        for key in ["lost", "duplicates", "out_of_order", "foreign"] {
            assert_eq!(u(&r, &["messages", key]), 0, "{engine} {key}: {r:#}");
        }
    }
    // Every redirected login was answered by `a` with REDIRECT.
    assert!(a.info("Cluster_redirects") > 0);
    assert!(b.info("Cluster_published") > 0, "b's users sent too");
}
