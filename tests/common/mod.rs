//! Helpers shared by the integration tests: a server on a free loopback port
//! with its stats socket in a temporary directory, tokens, users picked by
//! home shard, and bounded waits on stats.
//!
//! Every wait here has a generous upper bound ([`WAIT`]) and fails only if
//! the expected event never happens; nothing asserts how fast it happened.

// Each test file compiles this module separately and uses a different part.
#![allow(dead_code)]

pub mod child;
pub mod cut;
pub mod gateway;
pub mod paho;
pub mod pass;
pub mod proxy;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern::config::Config;
use tern::proto::{ByeReason, ErrorCode, OwnedFrame, ReceiptKind};
use tern::server::Server;
use tern_client::Client;

/// The token secret every test server uses.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// Shards of the default test server.
pub const SHARDS: usize = 2;

/// A token for `user` valid for an hour.
pub fn token(user: u64) -> String {
    tern::token::mint(SECRET.as_bytes(), user, tern::token::now_unix_s() + 3600)
}

/// A token for `device` of `user` valid for an hour (docs/PROTOCOL.md,
/// "Login tokens").
pub fn device_token(user: u64, device: u32) -> String {
    tern::token::mint_device(
        SECRET.as_bytes(),
        user,
        device,
        tern::token::now_unix_s() + 3600,
    )
}

/// The first `n` user ids (from 1 up) whose home is `shard` of `shards`.
pub fn users_on(shard: usize, shards: usize, n: usize) -> Vec<u64> {
    let users: Vec<u64> = (1..100_000u64)
        .filter(|&u| tern::shard::home_shard(u, shards) == shard)
        .take(n)
        .collect();
    assert_eq!(users.len(), n, "not enough users homed on shard {shard}");
    users
}

/// Two users homed on different shards of a 2-shard server: (shard 0, shard 1).
pub fn cross_pair() -> (u64, u64) {
    (users_on(0, SHARDS, 1)[0], users_on(1, SHARDS, 1)[0])
}

/// Two users homed on the same shard of a 2-shard server.
pub fn same_pair() -> (u64, u64) {
    let users = users_on(1, SHARDS, 2);
    (users[0], users[1])
}

/// The I/O backend the suite runs on: `TERN_TEST_IO=auto|uring|poll`
/// (default auto). CI runs the suite once with the default and once with poll.
/// With `TERN_REQUIRE_URING=1` (set by CI), auto means uring, so a kernel
/// without it fails the suite instead of quietly testing poll twice.
pub fn test_backend() -> tern::io::Backend {
    let backend = match std::env::var("TERN_TEST_IO") {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("TERN_TEST_IO: {e}")),
        Err(_) => tern::io::Backend::default(),
    };
    let required = std::env::var_os(tern::io::REQUIRE_URING_ENV).is_some_and(|v| v == "1");
    match backend {
        tern::io::Backend::Auto if required && cfg!(target_os = "linux") => {
            tern::io::Backend::Uring
        }
        other => other,
    }
}

/// The configuration of a test server: 2 shards, port 0, the stats socket in
/// `dir`, the test secret and a short shutdown grace.
pub fn test_config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: SHARDS,
        stats_socket: dir.join("tern.sock"),
        data_dir: dir.join("data"),
        io: test_backend(),
        token_secret: SECRET.into(),
        shutdown_grace_ms: 1000,
        ..Config::default()
    }
}

/// A running server that is shut down and joined when dropped. Declare it
/// before the clients, so the clients are dropped (and disconnect) first.
pub struct TestServer {
    server: Option<Server>,
    /// Holds the stats socket; removed after the server stopped.
    _dir: tempfile::TempDir,
    /// The client listener.
    pub addr: SocketAddr,
    /// The TLS listener, when the config has `tls_listen`.
    pub tls_addr: Option<SocketAddr>,
    /// The stats socket.
    pub stats: PathBuf,
}

impl TestServer {
    /// A server with [`test_config`].
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// A server with [`test_config`] changed by `tweak`.
    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = Server::start(config).expect("server starts");
        TestServer {
            addr: server.local_addr(),
            tls_addr: server.tls_addr(),
            stats: server.stats_socket().to_path_buf(),
            server: Some(server),
            _dir: dir,
        }
    }

    /// The server itself.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// The temporary directory holding the stats socket and the data dir.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Connects and logs in as `user`; panics unless LOGIN_OK comes back.
    pub fn login(&self, user: u64) -> Client {
        self.login_info(user).0
    }

    /// Like [`TestServer::login`], also returning LOGIN_OK's fields.
    pub fn login_info(&self, user: u64) -> (Client, tern_client::LoginInfo) {
        Client::login(self.addr, &token(user))
            .unwrap_or_else(|e| panic!("login of user {user} failed: {e}"))
    }

    /// The answer to one stats command.
    pub fn query(&self, command: &str) -> String {
        tern::stats::query(&self.stats, command)
            .unwrap_or_else(|e| panic!("stats query {command:?} failed: {e}"))
    }

    /// `show info` as a key → value map.
    pub fn info(&self) -> HashMap<String, String> {
        parse_info(&self.query("show info"))
    }

    /// One numeric `show info` value.
    pub fn info_u64(&self, key: &str) -> u64 {
        let info = self.info();
        let value = info
            .get(key)
            .unwrap_or_else(|| panic!("show info has no {key}: {info:?}"));
        value
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number: {value}"))
    }

    /// Sum over the shards of one metric family from `show metrics`,
    /// e.g. `tern_slow_closes_total`.
    pub fn metric_sum(&self, name: &str) -> u64 {
        metric_sum(&self.query("show metrics"), name)
    }

    /// Polls `show info` until `key` satisfies `pred`; panics with the last
    /// value if that never happens within [`WAIT`].
    pub fn wait_info(&self, key: &str, pred: impl Fn(u64) -> bool) -> u64 {
        let mut last = 0;
        let ok = wait_for(|| {
            last = self.info_u64(key);
            pred(last)
        });
        assert!(ok, "show info {key} stayed at {last}");
        last
    }

    /// Polls `show metrics` until the sum of `name` satisfies `pred`.
    pub fn wait_metric(&self, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
        let mut last = 0;
        let ok = wait_for(|| {
            last = self.metric_sum(name);
            pred(last)
        });
        assert!(ok, "metric {name} stayed at {last}");
        last
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            server.join();
        }
    }
}

/// `Key: value` lines as a map.
pub fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Sum of the samples of the metric family `name` in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    let mut found = false;
    let mut sum = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let family = series.split('{').next().unwrap_or(series);
        if family == name {
            found = true;
            sum += value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("bad sample: {line}"));
        }
    }
    assert!(found, "no metric {name} in:\n{text}");
    sum
}

/// Calls `cond` every 20 ms until it returns true (→ true) or [`WAIT`]
/// passes (→ false).
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until the server closes; asserts that the only frame before the
/// close was ERROR(`code`, client_id 0).
pub fn expect_error_then_close(client: &mut Client, code: ErrorCode) {
    let frames = client
        .wait_closed(WAIT)
        .unwrap_or_else(|e| panic!("expected ERROR({code}) then close, got {e}"));
    match frames.as_slice() {
        [OwnedFrame::Error {
            code: got,
            client_id: 0,
            ..
        }] if *got == code => {}
        other => panic!("expected ERROR({code}) then close, got {other:?}"),
    }
}

/// Reads until the server closes; asserts that the last frame before the
/// close was BYE(`reason`) and returns the frames before it.
pub fn expect_bye_then_close(client: &mut Client, reason: ByeReason) -> Vec<OwnedFrame> {
    let mut frames = client
        .wait_closed(WAIT)
        .unwrap_or_else(|e| panic!("expected BYE({reason}) then close, got {e}"));
    match frames.pop() {
        Some(OwnedFrame::Bye { reason: got }) if got == reason => frames,
        other => panic!("expected BYE({reason}) then close, got {other:?} after {frames:?}"),
    }
}

/// Waits for ACK or ERROR of `client_id`: `Ok(server_id)` or `Err(code)`.
pub fn ack_or_error(client: &mut Client, client_id: u64) -> Result<u64, ErrorCode> {
    match client.recv_until(|f| {
        matches!(f, OwnedFrame::Ack { client_id: c, .. } | OwnedFrame::Error { client_id: c, .. } if *c == client_id)
    }) {
        Ok(OwnedFrame::Ack { server_id, .. }) => Ok(server_id),
        Ok(OwnedFrame::Error { code, .. }) => Err(code),
        other => panic!("expected ACK or ERROR for client_id {client_id}, got {other:?}"),
    }
}

/// Waits for the ACK of `client_id` and returns its server id.
pub fn recv_ack(client: &mut Client, client_id: u64) -> u64 {
    match client.recv_until(|f| {
        matches!(f, OwnedFrame::Ack { client_id: c, .. } | OwnedFrame::Error { client_id: c, .. } if *c == client_id)
    }) {
        Ok(OwnedFrame::Ack { server_id, .. }) => server_id,
        other => panic!("expected ACK for client_id {client_id}, got {other:?}"),
    }
}

/// A received DELIVER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The message's server id.
    pub server_id: u64,
    /// Sender.
    pub from: u64,
    /// Server acceptance time.
    pub server_time_ms: u64,
    /// Body.
    pub body: Vec<u8>,
}

/// Waits for the next DELIVER (other frames stay in the backlog).
pub fn recv_deliver(client: &mut Client) -> Delivered {
    match client.recv_until(|f| matches!(f, OwnedFrame::Deliver { .. })) {
        Ok(OwnedFrame::Deliver {
            server_id,
            from,
            server_time_ms,
            body,
            ..
        }) => Delivered {
            server_id,
            from,
            server_time_ms,
            body,
        },
        other => panic!("expected DELIVER, got {other:?}"),
    }
}

/// A message body carrying its index, `msg-<i>`, optionally padded with
/// `pad` bytes to `len` bytes.
pub fn indexed_body(i: u64, len: usize) -> Vec<u8> {
    let mut body = format!("msg-{i:08}").into_bytes();
    if body.len() < len {
        body.resize(len, b'.');
    }
    body
}

/// The index carried by a body made with [`indexed_body`].
pub fn body_index(body: &[u8]) -> u64 {
    std::str::from_utf8(&body[4..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an indexed body: {:?}", String::from_utf8_lossy(body)))
}

/// Encodes frames back to back, for pipelined writes.
pub fn encode_all(frames: &[tern::proto::Frame<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        tern::proto::encode(f, &mut out);
    }
    out
}

/// Waits for the next RECEIPT and checks its kind, message and peer.
pub fn expect_receipt(client: &mut Client, kind: ReceiptKind, server_id: u64, peer: u64) {
    match client.recv_until(|f| matches!(f, OwnedFrame::Receipt { .. })) {
        Ok(OwnedFrame::Receipt {
            kind: k,
            server_id: sid,
            peer: p,
        }) => assert_eq!((k, sid, p), (kind, server_id, peer)),
        other => panic!("expected RECEIPT({kind:?}), got {other:?}"),
    }
}
