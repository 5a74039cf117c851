//! Helpers shared by the load generator's tests against a real server.

use serde_json::Value;

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
