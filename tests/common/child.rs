//! `tern serve` as a child process (the real binary), for tests that need a
//! process of its own: kill -9, umask, exit status and start-up errors.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::WAIT;

/// The `tern` binary of this build.
pub const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// A running `tern serve`; killed (SIGKILL) and reaped when dropped.
pub struct TernChild {
    child: Child,
    /// The client listener, from its `listening on ADDR` line.
    pub addr: SocketAddr,
    /// Its stderr so far, line by line.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// `tern serve` with the test secret and no inherited secret, and `args`.
pub fn serve_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(TERN);
    cmd.env_remove("TERN_TOKEN_SECRET")
        .env("RUST_LOG", "info")
        .arg("serve")
        .args(["--token-secret", super::SECRET])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

impl TernChild {
    /// Runs `cmd` (see [`serve_command`]) and waits until it listens.
    /// `Err((status, log))` if it exits first.
    /// It runs on the suite's I/O backend ([`super::test_backend`]) unless
    /// `cmd` names one, so the poll pass runs child processes on poll too.
    pub fn start(mut cmd: Command) -> Result<TernChild, (ExitStatus, String)> {
        if !cmd.get_args().any(|a| a == "--io") {
            let io = format!("{:?}", super::test_backend()).to_lowercase();
            cmd.args(["--io", &io]);
        }
        let mut child = cmd.spawn().expect("spawn tern serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        // Read stderr to the end so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, rest)) = line.split_once("listening on ") {
                    let addr = rest.split_once(": ").map_or(rest, |(a, _)| a);
                    let _ = tx.send(Some(addr.trim().to_string()));
                }
                lines.lock().unwrap().push(line);
            }
            let _ = tx.send(None);
        });
        let deadline = Instant::now() + WAIT;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Some(addr)) => Ok(TernChild {
                child,
                addr: addr
                    .parse()
                    .unwrap_or_else(|e| panic!("bad address {addr:?}: {e}")),
                log,
            }),
            Ok(None) => {
                // stderr closed: the process is exiting.
                let status = child.wait().expect("reap tern serve");
                let text = log.lock().unwrap().join("\n");
                Err((status, text))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tern serve neither listened nor exited ({e}); its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        }
    }

    /// Like [`TernChild::start`], panicking (with its log) if it exits.
    pub fn expect_start(cmd: Command) -> TernChild {
        TernChild::start(cmd)
            .unwrap_or_else(|(status, log)| panic!("tern serve exited with {status}:\n{log}"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, reap, and return its log.
    pub fn kill9(mut self) -> String {
        self.child.kill().expect("SIGKILL tern serve");
        self.child.wait().expect("reap tern serve");
        let text = self.log.lock().unwrap().join("\n");
        text
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for TernChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
