//! Helpers shared by the load generator's tests against a real server:
//! the server's configuration, the load generator run to its JSON report.

// Each test file compiles this module separately and uses a different part.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

/// The server's I/O backend: `TERN_TEST_IO=auto|uring|poll` (default auto),
/// as in the server's own suite.
pub fn test_backend() -> tern::io::Backend {
    std::env::var("TERN_TEST_IO").map_or(tern::io::Backend::Auto, |v| {
        v.parse().unwrap_or_else(|e| panic!("TERN_TEST_IO: {e}"))
    })
}

/// The load generator's engines this platform has.
pub fn engines() -> Vec<&'static str> {
    if cfg!(target_os = "linux") {
        vec!["uring", "poll"]
    } else {
        vec!["poll"]
    }
}

/// The number at `path` in a JSON report; panics with the report if absent.
pub fn u(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

/// A test server's configuration: loopback port 0, 2 shards, the stats
/// socket and data in `dir`, the suite's backend, the development secret.
pub fn server_config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        stats_socket: dir.join("tern.sock"),
        data_dir: dir.join("data"),
        io: test_backend(),
        ..Default::default()
    }
}

/// The server of `config`, started.
pub fn start_server(config: Config) -> Server {
    Server::start(config).expect("server starts")
}

/// Runs the load generator with `args` and the development secret; the
/// exit status and its JSON report.
pub fn loadgen(args: &[&str], json: &Path) -> (i32, Value) {
    let (status, r, _) = loadgen_with_secret(args, DEV_TOKEN_SECRET, json);
    (status, r)
}

/// Like [`loadgen`], also returning the summary it printed.
pub fn loadgen_out(args: &[&str], json: &Path) -> (i32, Value, String) {
    loadgen_with_secret(args, DEV_TOKEN_SECRET, json)
}

/// Runs the load generator with `args` and `secret`; the exit status, its
/// JSON report and the summary it printed (both outputs are shown when it
/// fails).
pub fn loadgen_with_secret(args: &[&str], secret: &str, json: &Path) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(args)
        .args(["--secret", secret, "--source", "127.0.0.1", "--quiet"])
        .arg("--json")
        .arg(json)
        .output()
        .expect("tern-loadgen runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("no report ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    let status = out.status.code().unwrap_or(-1);
    if status != 0 {
        eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    }
    let r = serde_json::from_str(&text).expect("report is JSON");
    (status, r, stdout.into_owned())
}
