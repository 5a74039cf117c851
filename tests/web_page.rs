//! The demo web chat page in a real headless Chromium: starts `tern serve
//! --demo` (the real binary, on the backend under test, every port
//! ephemeral) and runs clients/web's `node --test` suite against the page it
//! serves: two browser profiles chat, the ticks appear, a page that left
//! comes back and gets what was sent meanwhile, a reload reconnects. Also
//! checks the demo-only token endpoint and the embedded files over plain
//! HTTP.
//!
//! Without `node`, Chromium or clients/web/node_modules (`npm ci`) the
//! browser test skips with a printed reason; with `TERN_REQUIRE_BROWSER=1`
//! (CI's `.ci/run` exports it) it fails instead.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::child::{serve_command, TernChild};
use common::*;

fn required() -> bool {
    std::env::var_os("TERN_REQUIRE_BROWSER").is_some_and(|v| v == "1")
}

/// Skips (prints why, returns false) or, when required, fails.
fn usable(ok: bool, why: &str) -> bool {
    if !ok {
        assert!(!required(), "TERN_REQUIRE_BROWSER=1 but {why}");
        eprintln!("skipped: {why}");
    }
    ok
}

/// The Chromium to drive: `CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// A running `tern serve --demo` and its page's address.
struct Demo {
    child: TernChild,
    page: SocketAddr,
    _dir: tempfile::TempDir,
}

fn start_demo() -> Demo {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = format!("{:?}", test_backend()).to_lowercase();
    let stats = dir.path().join("tern.sock");
    let data = dir.path().join("data");
    let mut cmd = serve_command(&[
        "--demo",
        "--demo-http",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--ws-listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--io",
        &backend,
    ]);
    cmd.arg("--stats-socket")
        .arg(&stats)
        .arg("--data-dir")
        .arg(&data);
    let child = TernChild::expect_start(cmd);
    let mut page = None;
    let found = wait_for(|| {
        page = child.log_text().lines().find_map(|l| {
            let rest = l.split_once("demo chat page at http://")?.1;
            rest.split_once('/')?.0.parse::<SocketAddr>().ok()
        });
        page.is_some()
    });
    assert!(found, "no demo page line in the log:\n{}", child.log_text());
    Demo {
        child,
        page: page.unwrap(),
        _dir: dir,
    }
}

/// One HTTP/1.1 GET; returns (status code, headers and body as text).
fn get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    (code, answer)
}

#[test]
fn demo_serves_the_page_and_mints_tokens_for_demo_users_only() {
    let demo = start_demo();
    let (code, page) = get(demo.page, "/");
    assert_eq!(code, 200);
    assert!(page.contains("text/html") && page.contains("<script type=\"module\" src=\"app.js\">"));
    for path in ["/app.js", "/style.css", "/tern/index.js", "/tern/client.js"] {
        assert_eq!(get(demo.page, path).0, 200, "{path}");
    }
    // The library served is the committed build, byte for byte.
    let lib = get(demo.page, "/tern/codec.js").1;
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/dist/codec.js"),
    )
    .unwrap();
    assert!(lib.ends_with(&committed));
    assert_eq!(get(demo.page, "/nothing").0, 404);
    assert_eq!(get(demo.page, "/../Cargo.toml").0, 404);

    // A token for a demo user logs that user in over TCP.
    let (code, json) = get(demo.page, "/demo/token?user=1003&device=7");
    assert_eq!(code, 200, "{json}");
    let token = json
        .split("\"token\":\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .expect("a token in the answer");
    assert!(token.starts_with("v2.1003.7."), "{token}");
    let mut client = tern_client::Client::login_version(demo.child.addr, token, 2)
        .unwrap_or_else(|e| panic!("demo token refused: {e}"))
        .0;
    client.ping(1).unwrap();
    // Anyone else, or nonsense, gets nothing.
    assert_eq!(get(demo.page, "/demo/token?user=42").0, 403);
    assert_eq!(get(demo.page, "/demo/token?user=1").0, 403);
    assert_eq!(get(demo.page, "/demo/token?user=1001&device=-1").0, 400);
    assert_eq!(get(demo.page, "/demo/token").0, 400);
    let mut s = TcpStream::connect(demo.page).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"POST /demo/token?user=1001 HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    // A request head past 8 KiB is refused, not buffered on.
    let mut s = TcpStream::connect(demo.page).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let long = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    let _ = s.write_all(long.as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn without_demo_there_is_no_page() {
    let out = Command::new(common::child::TERN)
        .args(["serve", "--demo-http", "127.0.0.1:0", "--print-config"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "--demo-http without --demo was taken"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--demo"));
}

#[test]
fn two_browser_pages_chat_with_ticks_and_reconnect() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/web");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable(node, "node is not on the PATH (Debian package nodejs)")
        || !usable(
            chromium().exists(),
            "no Chromium (Debian package chromium, or set CHROMIUM)",
        )
        || !usable(
            web.join("node_modules/playwright-core").exists(),
            "clients/web/node_modules is missing (npm ci in clients/web)",
        )
    {
        return;
    }
    let demo = start_demo();
    let out = Command::new("node")
        .args([
            "--test",
            "--test-reporter=spec",
            "--test-timeout=90000",
            "test/",
        ])
        .current_dir(&web)
        .env("TERN_DEMO_URL", format!("http://{}/", demo.page))
        .env("CHROMIUM", chromium())
        .output()
        .expect("run node --test");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "browser test failed:\n{report}\nserver log:\n{}",
        demo.child.log_text()
    );
    assert!(report.contains("ℹ pass 4"), "{report}");
}
