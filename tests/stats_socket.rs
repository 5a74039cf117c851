//! Who may use the stats socket: 0600 whatever the umask, a configured mode
//! and group applied before anyone can connect, a bad group refused at
//! start-up naming the key.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use common::child::{serve_command, TernChild};
use common::*;
use tern::config::{FileMode, Group};

/// Backend flag of the suite's backend.
fn io_flag() -> String {
    format!("{:?}", test_backend()).to_lowercase()
}

/// Permission bits of `path`.
fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// With umask 0 a plain bind would leave the socket 0777 (anyone on the box
/// could read the stats); the server makes it 0600 all the same.
#[test]
fn stats_socket_is_0600_under_a_permissive_umask() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tern.sock");
    let mut cmd = serve_command(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--io",
        &io_flag(),
    ]);
    cmd.arg("--stats-socket")
        .arg(&sock)
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let server = TernChild::expect_start(cmd);
    assert_eq!(mode_of(&sock), 0o600, "log:\n{}", server.log_text());
    // The umask really was 0 in there (Linux shows it in /proc).
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", server.pid())) {
        assert!(status.contains("Umask:\t0000"), "{status}");
    }
    // The owner (us) still talks to it.
    let info = tern::stats::query(&sock, "show info").unwrap();
    assert!(info.contains("Backend"), "{info}");
}

/// The first group in the group database that is not ours, as (name, gid).
fn another_group() -> (String, u32) {
    // SAFETY: getegid(2) cannot fail.
    let ours = unsafe { libc::getegid() };
    let text = std::fs::read_to_string("/etc/group").unwrap();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_string();
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            Some((name, gid))
        })
        .find(|(name, gid)| *gid != ours && !name.is_empty())
        .expect("a group other than ours in /etc/group")
}

/// `stats_socket_mode` and `stats_socket_group` (as a name, a numeric string
/// and an integer) end up on the socket.
#[test]
fn configured_mode_and_group_are_applied() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Only root may give a file to a group it is not a member of.
        return eprintln!("skipping: needs root to chown to another group");
    }
    let (name, gid) = another_group();
    for group in [
        Group::Name(name.clone()),
        Group::Name(gid.to_string()),
        Group::Id(gid),
    ] {
        let srv = TestServer::start_with(|c| {
            c.stats_socket_mode = FileMode(0o660);
            c.stats_socket_group = Some(group.clone());
        });
        let meta = std::fs::metadata(&srv.stats).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "{group:?}");
        assert_eq!(meta.gid(), gid, "{group:?}");
        assert!(srv.query("show info").contains("Backend"));
    }
}

/// A group name the system does not know stops the start with exit status
/// 1 and an error naming the key and the group; nothing is left behind.
#[test]
fn unknown_stats_socket_group_is_a_start_up_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tern.sock");
    let mut cmd = serve_command(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--io",
        &io_flag(),
        "--stats-socket-group",
        "no-such-group-for-tern",
    ]);
    cmd.arg("--stats-socket")
        .arg(&sock)
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    let (status, log) = match TernChild::start(cmd) {
        Ok(child) => panic!("started with an unknown group:\n{}", child.log_text()),
        Err(exit) => exit,
    };
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("tern: `stats_socket_group`: no group named \"no-such-group-for-tern\""),
        "{log}"
    );
    assert!(!sock.exists());
}

/// A mode that locks the owner out is a configuration error naming the key.
#[test]
fn stats_socket_mode_must_let_the_owner_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.stats_socket_mode = FileMode(0o060);
    let err = tern::server::Server::start(config).err().expect("refused");
    assert!(err.to_string().contains("`stats_socket_mode`"), "{err}");
    assert!(!dir.path().join("tern.sock").exists());
}

/// A server that may not give the socket to the group (not root, not a
/// member) stops at start-up naming the key, and leaves no socket behind.
#[test]
fn a_group_the_server_may_not_use_is_a_start_up_error() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return eprintln!("skipping: needs root to start a server as another user");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("tern.sock");
    let mut cmd = serve_command(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--io",
        &io_flag(),
        "--stats-socket-group",
        "0",
    ]);
    cmd.arg("--stats-socket")
        .arg(&sock)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // nobody, who is not in group 0
        .uid(65534)
        .gid(65534);
    let (status, log) = match TernChild::start(cmd) {
        Ok(child) => panic!("started:\n{}", child.log_text()),
        Err(exit) => exit,
    };
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("`stats_socket_group`: giving") && log.contains("Operation not permitted"),
        "{log}"
    );
    assert!(!sock.exists());
}
