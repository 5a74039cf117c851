//! `tern-loadgen saturate` against a real server started in this process:
//! the report has a step per window, every tick flows, and the CPU fields
//! are filled from /proc. No timings are asserted.

use std::process::Command;

use serde_json::Value;
use tern::config::{Config, DEV_TOKEN_SECRET};
use tern::server::Server;

fn start(dir: &std::path::Path) -> Server {
    Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        stats_socket: dir.join("tern.sock"),
        data_dir: dir.join("data"),
        io: std::env::var("TERN_TEST_IO").map_or(tern::io::Backend::Auto, |v| {
            v.parse().unwrap_or_else(|e| panic!("TERN_TEST_IO: {e}"))
        }),
        // A few users sending as fast as they can: what these limits refuse.
        sends_per_s_max: 0,
        receipts_per_s_max: 0,
        addr_conns_per_s_max: 0,
        ..Default::default()
    })
    .expect("server starts")
}

fn saturate(server: &Server, shape: &str, users: &str) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(["saturate", "--server", &server.local_addr().to_string()])
        .args(["--shape", shape, "--users", users, "--windows", "1,4"])
        .args([
            "--step-time",
            "300ms",
            "--warmup",
            "100ms",
            "--p99-bound",
            "30s",
        ])
        .args(["--max-time", "60s", "--secret", DEV_TOKEN_SECRET])
        .args(["--server-pid", &std::process::id().to_string()])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("tern-loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, stdout)
}

fn check(report: &Value, stdout: &str, shape: &str, users: u64) {
    assert_eq!(report["shape"], shape);
    assert_eq!(report["users"], users);
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{report}");
    for (step, window) in steps.iter().zip([1, 4]) {
        assert_eq!(step["window"], window);
        for key in [
            "msgs_per_s",
            "acks_per_s",
            "delivers_per_s",
            "receipts_delivered_per_s",
            "receipts_read_per_s",
        ] {
            assert!(step[key].as_f64().unwrap() > 0.0, "{key}: {step}");
        }
        assert_eq!(step["errors"], 0);
        assert_eq!(step["within_bound"], true, "{step}");
        assert!(
            step["deliver_p99_us"].as_u64().unwrap() >= step["deliver_p50_us"].as_u64().unwrap()
        );
        if cfg!(target_os = "linux") {
            assert!(step["server_cpu_us_per_msg"].as_f64().is_some(), "{step}");
            assert!(step["loadgen_cpu_percent"].as_f64().is_some(), "{step}");
        }
    }
    let best = report["best_msgs_per_s"].as_f64().unwrap();
    assert!(steps.iter().any(|s| s["msgs_per_s"].as_f64() == Some(best)));
    assert!(
        stdout.contains("highest rate within deliver p99 <= 30000000 us"),
        "{stdout}"
    );
}

#[test]
fn pipelined_steps_report_all_four_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let (report, stdout) = saturate(&server, "pipelined", "4");
    check(&report, &stdout, "pipelined", 4);
    server.shutdown();
    server.join();
}

#[test]
fn chat_steps_report_all_four_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let (report, stdout) = saturate(&server, "chat", "20");
    check(&report, &stdout, "chat", 20);
    server.shutdown();
    server.join();
}
