//! Health checks and monitoring over real sockets (issue 24):
//!
//! - `GET /healthz` and `GET /readyz` on the metrics listener answer 200
//!   `ok`, and 503 with a one-line reason while a shard restarts, while a
//!   store refuses writes, and (readiness only) while draining;
//! - `/metrics` carries the queue shape (per-shard oldest message age, users
//!   by queue length) and login failures by reason, and passes
//!   `promtool check metrics`;
//! - every metric name used by the alert rules and the Grafana dashboard in
//!   `tuning/monitoring/` is one a live server exports, and the rules pass
//!   `promtool check rules`.
//!
//! promtool (Debian package `prometheus`) is used when it is on the PATH;
//! with `TERN_REQUIRE_PROMTOOL=1` (CI's `.ci/run` sets it) a missing one
//! fails instead of skipping those two checks.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use tern::proto::ErrorCode;
use tern_client::{Client, ClientError};

/// A test server with a metrics listener on a free loopback port.
fn start_with(tweak: impl FnOnce(&mut tern::config::Config)) -> (TestServer, SocketAddr) {
    let srv = TestServer::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(c);
    });
    let addr = srv.server().metrics_addr().expect("metrics listener");
    (srv, addr)
}

/// `GET path` over HTTP/1.1: (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics listener");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: tern\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a blank line");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_string())
}

/// Polls `path` until it answers `status` with a body containing `text`.
fn wait_health(addr: SocketAddr, path: &str, status: u16, text: &str) -> String {
    let mut last = (0, String::new());
    let ok = wait_for(|| {
        last = get(addr, path);
        last.0 == status && last.1.contains(text)
    });
    assert!(ok, "{path} never answered {status} {text:?}; last {last:?}");
    last.1
}

/// The value of the sample `series` (name with labels, exactly as exported).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().expect("numeric sample"))
    })
}

/// Sum of the samples whose name is `name` and whose labels contain every
/// `k="v"` in `labels`.
fn sum_where(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            s.split('{').next() == Some(name) && labels.iter().all(|kv| s.contains(kv))
        })
        .map(|(_, v)| v.parse::<f64>().expect("numeric sample"))
        .sum()
}

/// Whether promtool can be run; panics when it cannot but is required.
fn promtool() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("TERN_REQUIRE_PROMTOOL").is_none_or(|v| v != "1"),
            "TERN_REQUIRE_PROMTOOL=1 but promtool is not on the PATH (Debian package prometheus)"
        );
        eprintln!("skipped: promtool not on the PATH (Debian package prometheus)");
    }
    found
}

/// Runs promtool with `args` and `stdin`; panics with its output on failure.
fn run_promtool(args: &[&str], stdin: &str) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn health_and_readiness_follow_shards_and_draining() {
    let (x, y) = cross_pair();
    let (srv, addr) = start_with(|c| {
        // Long enough to see the restarting shard, short enough to wait.
        c.shard_restart_backoff_ms = 3000;
    });
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(addr, "/readyz"), (200, "ok\n".to_string()));
    assert_eq!(get(addr, "/health").0, 404);

    // Draining: not ready for new clients, but nothing to restart.
    srv.server().health().set_draining(true);
    assert_eq!(get(addr, "/readyz"), (503, "draining\n".to_string()));
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_string()));
    srv.server().health().set_draining(false);
    assert_eq!(get(addr, "/readyz").0, 200);

    // A shard crashes (debug hook: a SEND to CRASH_USER from y's shard 1).
    let _xc = srv.login(x);
    let mut yc = srv.login(y);
    yc.send_msg(1, tern::shard::CRASH_USER, b"boom").unwrap();
    let body = wait_health(addr, "/healthz", 503, "shard 1 restarting");
    assert_eq!(body.lines().count(), 1, "one line: {body:?}");
    assert_eq!(get(addr, "/readyz").0, 503);
    // Its supervisor brings it back.
    wait_health(addr, "/healthz", 200, "ok");
    wait_health(addr, "/readyz", 200, "ok");
}

#[test]
fn a_store_refusing_writes_fails_health() {
    // A floor of free space no disk has: every store refuses new messages.
    let (x, y) = cross_pair();
    let (srv, addr) = start_with(|c| c.disk_free_bytes_min = 1 << 60);
    // Each shard publishes once a second, not in step: wait for both.
    let mut last = (0, String::new());
    let both = wait_for(|| {
        last = get(addr, "/healthz");
        last.1.contains("shard 0 store") && last.1.contains("shard 1 store")
    });
    assert!(both, "/healthz never named both shards: {last:?}");
    let (status, body) = last;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("shard 0 store refusing writes (disk short, "),
        "{body}"
    );
    assert!(
        body.contains(" bytes free); shard 1 store refusing writes"),
        "{body}"
    );
    assert_eq!(body.lines().count(), 1, "one line: {body:?}");
    assert_eq!(get(addr, "/readyz").0, 503);
    // What the reason says is what a client sees.
    let mut xc = srv.login(x);
    xc.send_msg(1, y, b"hello").unwrap();
    assert_eq!(ack_or_error(&mut xc, 1), Err(ErrorCode::StorageFull));
}

#[test]
fn metrics_show_queue_shape_and_login_failures_and_pass_promtool() {
    let (x, y) = cross_pair();
    let (srv, addr) = start_with(|_| {});
    let metrics = || get(addr, "/metrics").1;

    // y is offline: three messages wait in its queue on shard 1.
    let mut xc = srv.login(x);
    for id in 1..=3 {
        xc.send_msg(id, y, b"queued").unwrap();
        recv_ack(&mut xc, id);
    }
    let mut last = String::new();
    let shaped = wait_for(|| {
        last = metrics();
        sample(&last, "tern_user_queue_length_count") == Some(1.0)
            && sum_where(&last, "tern_queue_oldest_age_seconds", &["shard=\"1\""]) >= 1.0
    });
    assert!(shaped, "queue shape never showed:\n{last}");
    assert_eq!(
        sample(&last, "tern_user_queue_length_bucket{le=\"2\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&last, "tern_user_queue_length_bucket{le=\"4\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&last, "tern_user_queue_length_sum"), Some(3.0));
    assert_eq!(
        sample(&last, "tern_queue_oldest_age_seconds{shard=\"0\"}"),
        Some(0.0)
    );

    // y comes back and takes them: the queue and its age are gone.
    let mut yc = srv.login(y);
    for _ in 0..3 {
        let d = recv_deliver(&mut yc);
        yc.send_delivered(d.server_id).unwrap();
    }
    let drained = wait_for(|| {
        last = metrics();
        sample(&last, "tern_user_queue_length_count") == Some(0.0)
            && sum_where(&last, "tern_queue_oldest_age_seconds", &[]) == 0.0
    });
    assert!(drained, "queue shape never emptied:\n{last}");

    // Login failures by reason: a forged token and an expired one.
    let forged = tern::token::mint(b"not-the-secret", x, tern::token::now_unix_s() + 3600);
    let expired = tern::token::mint(SECRET.as_bytes(), x, tern::token::now_unix_s() - 10);
    for (token, code) in [
        (forged, ErrorCode::BadToken),
        (expired, ErrorCode::TokenExpired),
    ] {
        match Client::login(srv.addr, &token) {
            Err(ClientError::LoginRejected { code: got, .. }) => assert_eq!(got, code),
            other => panic!("expected LOGIN_ERR({code}), got {other:?}"),
        }
    }
    let counted = wait_for(|| {
        last = metrics();
        let reason = |r: &str| sum_where(&last, "tern_login_failures_total", &[r]);
        reason("reason=\"bad_token\"") == 1.0 && reason("reason=\"token_expired\"") == 1.0
    });
    assert!(counted, "login failures by reason never showed:\n{last}");
    assert_eq!(
        sum_where(
            &last,
            "tern_login_failures_total",
            &["reason=\"bad_version\""]
        ),
        0.0
    );
    assert_eq!(sum_where(&last, "tern_logins_failed_total", &[]), 2.0);

    // The loop histogram replaced the abbreviated-unit gauges.
    assert!(last.contains("# TYPE tern_loop_iteration_seconds histogram\n"));
    assert!(!last.contains("tern_loop_p99_us"));
    if promtool() {
        run_promtool(&["check", "metrics"], &last);
    }
}

/// Every `tern_…` name in `text`.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tern_") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn alert_rules_and_dashboard_use_only_exported_metrics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/monitoring");
    let rules = std::fs::read_to_string(dir.join("tern-alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(dir.join("tern-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            targets.iter().all(|t| t["expr"].is_string()),
            "{}",
            p["title"]
        );
    }

    let (_srv, addr) = start_with(|_| {});
    let metrics = get(addr, "/metrics").1;
    // Sample names, and family names (a histogram's name has no sample).
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(String::from)
        .collect();
    for (file, text) in [
        ("tern-alerts.yml", &rules),
        ("tern-dashboard.json", &dashboard),
    ] {
        let used = names_used(text);
        assert!(used.len() >= 10, "{file} uses only {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the server does not export: {missing:?}"
        );
    }
    if promtool() {
        run_promtool(
            &[
                "check",
                "rules",
                dir.join("tern-alerts.yml").to_str().unwrap(),
            ],
            "",
        );
    }
}
