//! The TypeScript client library (clients/js) against this server: runs its
//! `node --test` suite (codec against docs/PROTOCOL.md's examples, session
//! bookkeeping, and live tests over WebSocket) with a server started here on
//! the backend under test, and checks that the committed compiled modules
//! (clients/js/dist, which `serve --demo` embeds) are what `tsc` makes of
//! the sources.
//!
//! Without `node` (or, for the dist check, without `npm ci` in clients/js)
//! the test skips with a printed reason; with `TERN_REQUIRE_BROWSER=1`
//! (CI's `.ci/run` exports it) it fails instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// clients/js in this checkout.
fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// True when CI says the JavaScript and browser tools must be there.
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

fn node_works() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `node` arguments that give it a global WebSocket (a flag on Node 20/21).
fn node_websocket_args() -> Vec<&'static str> {
    let global = Command::new("node")
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if global {
        vec![]
    } else {
        vec!["--experimental-websocket"]
    }
}

#[test]
fn node_test_suite_passes_against_this_server() {
    if !usable(
        node_works(),
        "node is not on the PATH (Debian package nodejs)",
    ) {
        return;
    }
    let srv = TestServer::start_with(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()));
    let ws = srv.server().ws_addr().expect("ws_listen is set");
    let out = Command::new("node")
        .args(node_websocket_args())
        .args(["--test", "--test-reporter=spec", "test/"])
        .current_dir(js_dir())
        .env("TERN_WS_URL", format!("ws://{ws}/"))
        .env("TERN_TEST_SECRET", SECRET)
        .output()
        .expect("run node --test");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node --test failed:\n{report}");
    // The suite ran its tests, not zero of them.
    let passed = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("ℹ pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no pass count in the report:\n{report}"));
    assert!(passed >= 15, "only {passed} tests passed:\n{report}");
}

#[test]
fn committed_dist_is_what_tsc_makes_of_the_sources() {
    let dir = js_dir();
    let tsc = dir.join("node_modules/.bin/tsc");
    if !usable(
        node_works(),
        "node is not on the PATH (Debian package nodejs)",
    ) || !usable(tsc.exists(), "clients/js/node_modules is missing (npm ci)")
    {
        return;
    }
    let out_dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new(&tsc)
        .args(["-p", "."])
        .arg("--outDir")
        .arg(out_dir.path())
        .current_dir(&dir)
        .status()
        .expect("run tsc");
    assert!(status.success(), "tsc failed");
    let mut compared = 0;
    for entry in std::fs::read_dir(out_dir.path()).unwrap() {
        let entry = entry.unwrap();
        let built = std::fs::read(entry.path()).unwrap();
        let committed = dir.join("dist").join(entry.file_name());
        let committed = std::fs::read(&committed)
            .unwrap_or_else(|e| panic!("{}: {e} (run npm run build)", committed.display()));
        assert!(
            built == committed,
            "clients/js/dist/{} is stale: run `npm run build` in clients/js and commit dist/",
            entry.file_name().to_string_lossy()
        );
        compared += 1;
    }
    assert!(compared >= 8, "tsc wrote only {compared} files");
}
