//! The TypeScript client library (clients/js) against this server: runs its
//! `node --test` suite (codec against docs/PROTOCOL.md's examples, session
//! bookkeeping, and live tests over WebSocket) with a server started here on
//! the backend under test, the live tests again over wss (the TLS
//! listener), and checks that the committed compiled modules
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

/// Runs `node --test` on `files` in clients/js with `env`; returns the
/// number of tests passed, panicking with the report if any failed.
fn node_test(files: &[&str], env: &[(&str, String)]) -> u32 {
    let out = Command::new("node")
        .args(node_websocket_args())
        // A hung test fails (each file within a minute) rather than
        // holding up the suite.
        .args(["--test", "--test-reporter=spec", "--test-timeout=60000"])
        .args(files)
        .current_dir(js_dir())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run node --test");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node --test failed:\n{report}");
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix("ℹ pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no pass count in the report:\n{report}"))
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
    let passed = node_test(
        &["test/"],
        &[
            ("TERN_WS_URL", format!("ws://{ws}/")),
            ("TERN_TEST_SECRET", SECRET.to_string()),
            // test/redirect.test.mjs starts a two-node cluster of its own.
            ("TERN_BIN", env!("CARGO_BIN_EXE_tern").to_string()),
        ],
    );
    // The suite ran its tests, not zero of them.
    assert!(passed >= 29, "only {passed} tests passed");
}

#[test]
fn live_tests_pass_over_wss_on_the_tls_listener() {
    if !usable(
        node_works(),
        "node is not on the PATH (Debian package nodejs)",
    ) {
        return;
    }
    // A CA and a certificate for 127.0.0.1, which node trusts through
    // NODE_EXTRA_CA_CERTS.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "js test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path, ca_path) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&key_path, private).unwrap();
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let srv = TestServer::start_with(move |c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = cert_path;
        c.tls_key = key_path;
    });
    let tls = srv.tls_addr.expect("tls_listen is set");
    let passed = node_test(
        &["test/live.test.mjs"],
        &[
            ("TERN_WS_URL", format!("wss://{tls}/")),
            ("TERN_TEST_SECRET", SECRET.to_string()),
            ("NODE_EXTRA_CA_CERTS", ca_path.display().to_string()),
        ],
    );
    assert!(passed >= 8, "only {passed} tests passed");
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
