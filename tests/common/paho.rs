//! The paho-mqtt driver (`tests/mqtt_paho.py`, commands in, event lines
//! out). A missing paho skips the test with a printed reason, unless
//! `TERN_REQUIRE_MQTT_CLIENTS=1` (set by .ci/run): then it fails.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{token, WAIT};

const REQUIRE: &str = "TERN_REQUIRE_MQTT_CLIENTS";

/// Whether python3 with paho-mqtt is there (else the test skips, or fails
/// when `TERN_REQUIRE_MQTT_CLIENTS=1`).
pub fn have_paho() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var(REQUIRE).as_deref() != Ok("1"),
            "paho-mqtt is missing and {REQUIRE}=1"
        );
        eprintln!("skipped: paho-mqtt is not installed (pip paho-mqtt)");
    }
    ok
}

/// One paho client, in its own python process.
pub struct Paho {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Paho {
    /// Connects as `user` (MQTT `version` 311 or 5, clean session),
    /// keepalive 30 s; returns the client and the CONNACK's code.
    pub fn connect(addr: SocketAddr, user: u64, version: u16) -> (Paho, u32) {
        let (p, rc, _) = Paho::connect_with(addr, user, version, true, "");
        (p, rc)
    }

    /// Connects as `user` (MQTT `version` 311 or 5), keepalive 30 s, with
    /// `clean` session or not and `extra` words for the driver (see
    /// `tests/mqtt_paho.py`); returns the client and the CONNACK's (code,
    /// session present).
    pub fn connect_with(
        addr: SocketAddr,
        user: u64,
        version: u16,
        clean: bool,
        extra: &str,
    ) -> (Paho, u32, bool) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mqtt_paho.py");
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Paho {
            child,
            stdin,
            lines,
        };
        p.cmd(&format!(
            "connect 127.0.0.1 {} {user} {} {version} {} 30 {extra}",
            addr.port(),
            token(user),
            u8::from(clean)
        ));
        let w = p.expect("connack");
        (p, w[1].parse().unwrap(), w[2] == "1")
    }

    /// Sends one command line.
    pub fn cmd(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to paho");
        self.stdin.flush().unwrap();
    }

    /// The next event line, split in words; panics after [`WAIT`] or on
    /// an `error` line.
    pub fn next(&mut self) -> Vec<String> {
        self.next_within(WAIT)
            .unwrap_or_else(|| panic!("paho said nothing within {WAIT:?}"))
    }

    /// The next event, which must be `what`.
    pub fn expect(&mut self, what: &str) -> Vec<String> {
        let w = self.next();
        assert_eq!(w[0], what, "{w:?}");
        w
    }

    /// The next event line within `wait`, if one came.
    pub fn next_within(&mut self, wait: Duration) -> Option<Vec<String>> {
        let line = self.line_within(wait)?;
        assert!(!line.starts_with("error"), "paho: {line}");
        Some(line.split(' ').map(str::to_string).collect())
    }

    /// The next line as it is within `wait`, an `error` line too.
    pub fn line_within(&mut self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }
}

impl Drop for Paho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
