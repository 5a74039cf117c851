//! nats-server processes for the cluster tests: one server, or a cluster of
//! three with routes between them, each with JetStream in its own temporary
//! directory on free loopback ports. Every process is one this test
//! started, killed by its PID (never by name).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Attempts at starting NATS: a port picked free can be taken (by another
/// test's connection) before nats-server binds it, and nats-server then
/// exits; the next attempt picks new ports.
const ATTEMPTS: usize = 5;

/// Upper bound for a NATS cluster to elect its JetStream meta leader.
const ELECTION: Duration = Duration::from_secs(30);

/// A port free a moment ago; nats-server takes no port 0.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One `nats-server` process this test started.
struct Server {
    child: Option<Child>,
    port: u16,
    /// Its HTTP monitoring port.
    http: u16,
}

impl Server {
    /// Runs `nats-server` with `args`: `None` when it is not installed,
    /// `Some(None)` when it exited before listening (a port taken).
    fn spawn(args: &[String], port: u16, http: u16) -> Option<Option<Server>> {
        let spawned = Command::new("nats-server")
            .args(args)
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
        let mut server = Server {
            child: Some(child),
            port,
            http,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut exited = false;
        let up = super::common::wait_for(|| {
            let child = server.child.as_mut().expect("child");
            exited = !matches!(child.try_wait(), Ok(None));
            exited || TcpStream::connect(addr).is_ok()
        });
        if exited {
            server.kill();
            return Some(None);
        }
        assert!(up, "nats-server never listened on {addr}");
        Some(Some(server))
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL and reap; nothing if already done.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its `/jsz` monitoring page, if it answers.
    fn jsz(&self) -> Option<String> {
        self.monitor("/jsz")
    }

    /// A page of its monitoring port, headers included, if it answers.
    fn monitor(&self, path: &str) -> Option<String> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.http).into();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// NATS for a test: one server or a cluster of three, each server with
/// JetStream. Dropped: every server killed, the directory removed.
pub struct Nats {
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

impl Nats {
    /// One `nats-server -js` without clustering, or `None` when
    /// `nats-server` is not installed.
    pub fn start() -> Option<Nats> {
        for _ in 0..ATTEMPTS {
            if let Some(nats) = Nats::start_once()? {
                return Some(nats);
            }
        }
        panic!("nats-server exited before listening, {ATTEMPTS} times");
    }

    /// One attempt of [`Nats::start`]: `Some(None)` if a port was taken.
    fn start_once() -> Option<Option<Nats>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, http) = (free_port(), free_port());
        let args: Vec<String> = vec![
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-m".into(),
            http.to_string(),
            "-sd".into(),
            dir.path().display().to_string(),
        ];
        let Some(server) = Server::spawn(&args, port, http)? else {
            return Some(None);
        };
        Some(Some(Nats {
            servers: vec![server],
            dir,
        }))
    }

    /// Three servers in one NATS cluster (`server_name` n1..n3, routes to
    /// each other), returned once JetStream has a meta leader, so streams
    /// with 3 replicas can be created. `None` when `nats-server` is not
    /// installed.
    pub fn start_cluster() -> Option<Nats> {
        for _ in 0..ATTEMPTS {
            if let Some(nats) = Nats::start_cluster_once()? {
                return Some(nats);
            }
        }
        panic!("a nats-server of the cluster exited before listening, {ATTEMPTS} times");
    }

    /// One attempt of [`Nats::start_cluster`]: `Some(None)` if a port was
    /// taken (the servers already started are killed on drop).
    fn start_cluster_once() -> Option<Option<Nats>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, &route) in routes.iter().enumerate() {
            let (port, http) = (free_port(), free_port());
            let others: Vec<String> = routes
                .iter()
                .filter(|&&r| r != route)
                .map(|r| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            let conf = dir.path().join(format!("n{}.conf", i + 1));
            write_conf(&conf, i + 1, port, http, route, &others, dir.path());
            let args = vec!["-c".to_string(), conf.display().to_string()];
            let Some(server) = Server::spawn(&args, port, http)? else {
                return Some(None);
            };
            servers.push(server);
        }
        let nats = Nats { servers, dir };
        nats.wait_meta_leader();
        Some(Some(nats))
    }

    /// Every server's client URL, for `nats_urls` (a dead one included: a
    /// client skips it).
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Server::url).collect()
    }

    /// The first server's URL.
    pub fn url(&self) -> String {
        self.servers[0].url()
    }

    /// SIGKILL server `i` (0-based), as a crash.
    pub fn kill9(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Per live server, the records its copies of the message streams
    /// (`TERN_<g>`) hold; `None` for a server whose page did not answer.
    pub fn message_records(&self) -> Vec<Option<u64>> {
        let live = self.servers.iter().filter(|s| s.child.is_some());
        live.map(|s| {
            let page = s.monitor("/jsz?accounts=true&streams=true")?;
            let (_, body) = page.split_once("\r\n\r\n")?;
            let jsz: serde_json::Value = serde_json::from_str(body).ok()?;
            let mut records = 0;
            for account in jsz["account_details"].as_array()? {
                for stream in account["stream_detail"].as_array().into_iter().flatten() {
                    if stream["name"].as_str()?.starts_with("TERN_") {
                        records += stream["state"]["messages"].as_u64()?;
                    }
                }
            }
            Some(records)
        })
        .collect()
    }

    /// Waits until every live server names a JetStream meta leader with
    /// all the cluster's peers known; panics after [`ELECTION`].
    pub fn wait_meta_leader(&self) {
        let deadline = Instant::now() + ELECTION;
        let mut last = String::new();
        while Instant::now() < deadline {
            let live: Vec<&Server> = self.servers.iter().filter(|s| s.child.is_some()).collect();
            let pages: Vec<Option<String>> = live.iter().map(|s| s.jsz()).collect();
            if pages.iter().all(|p| p.as_deref().is_some_and(has_leader)) {
                return;
            }
            last = format!("{pages:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no JetStream meta leader in {ELECTION:?} ({}): {last}",
            self.dir.path().display()
        );
    }
}

/// Whether a `/jsz` page names a meta leader. Its `meta_cluster` object has
/// `"leader":"<server_name>"` once one is elected.
fn has_leader(page: &str) -> bool {
    page.split_once("\"meta_cluster\"")
        .and_then(|(_, meta)| meta.split_once("\"leader\""))
        .is_some_and(|(_, rest)| {
            let value = rest.trim_start_matches([':', ' ']);
            value.starts_with('"') && !value.starts_with("\"\"")
        })
}

/// One server's configuration file: JetStream in its own directory, a route
/// to each of `others`.
fn write_conf(
    path: &Path,
    n: usize,
    port: u16,
    http: u16,
    route: u16,
    others: &[String],
    dir: &Path,
) {
    let store = dir.join(format!("n{n}"));
    let text = format!(
        "server_name: n{n}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
         jetstream {{ store_dir: {store:?} }}\n\
         cluster {{\n  name: tern_test\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
        others.join(", ")
    );
    std::fs::write(path, text).expect("write nats-server config");
}
