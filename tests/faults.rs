//! Fault paths of the store and the supervisor (issue 21), over real
//! sockets, with faults injected through the store's file layer
//! (`tern::store::fault`, compiled into debug builds) or made for real (a
//! small tmpfs that fills up):
//!
//! - a write that finds the disk full (ENOSPC, EDQUOT) is rolled back: its
//!   SENDs are refused with `storage_full`, no DELIVER of them ever leaves,
//!   the server keeps serving and takes SENDs again once space is back;
//! - an fsync that fails (EIO) crashes the shard, which restarts and replays;
//! - a shard whose store cannot reopen gives up past the restart intensity,
//!   and the process exits with status 70;
//! - while a shard is restarting, its users' logins and SENDs to them get
//!   `unavailable`, and `show shards` says `restarting`;
//! - a real filesystem filled end to end: refusals, deliveries, space back,
//!   SENDs taken again, a restart on the full disk, nothing ACKed lost.
//!
//! Every wait has a generous bound; nothing asserts how fast anything was.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tern::proto::ErrorCode;
use tern::store::fault::{self, Op, Rule};
use tern_client::{Client, ClientError};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// A fault rule on `op` for paths containing `dir`'s shard `shard`.
fn rule(dir: &Path, shard: usize, op: Op, skip: u32, times: u32, errno: i32) -> Rule {
    Rule {
        path_contains: format!("{}/shard-{shard}/", dir.display()),
        op,
        skip,
        times,
        errno,
    }
}

/// The data directory of a [`TestServer`] (see `test_config`).
fn data_dir(srv: &TestServer) -> PathBuf {
    srv.dir().join("data")
}

fn no_space_write_is_rolled_back(errno: i32) {
    let (x, y) = cross_pair();
    let srv = TestServer::start();
    let mut xc = srv.login(x);
    let mut yc = srv.login(y);
    // One message goes through: y has it.
    xc.send_msg(1, y, b"first").unwrap();
    let first = recv_ack(&mut xc, 1);
    let d = recv_deliver(&mut yc);
    assert_eq!((d.server_id, d.body.as_slice()), (first, &b"first"[..]));
    yc.send_delivered(first).unwrap();
    // Its tombstone is committed before the fault is armed (PONG follows).
    yc.ping(1).unwrap();

    // y's shard finds its disk full at the next write of its message log
    // (segments are named by number; the device log, where the first
    // receipt's outbox entry may still be closing, keeps its records
    // through a full disk on its own).
    let data = data_dir(&srv);
    fault::inject(Rule {
        path_contains: format!("{}/shard-1/0", data.display()),
        ..rule(&data, 1, Op::Write, 0, 1, errno)
    });
    xc.send_msg(2, y, b"lost to a full disk").unwrap();
    assert_eq!(ack_or_error(&mut xc, 2), Err(ErrorCode::StorageFull));
    srv.wait_metric("tern_store_rollbacks_total", |n| n >= 1);
    fault::clear(&data.display().to_string());

    // Space is back (the fault is gone and statvfs shows plenty): the next
    // SEND is taken. y's next DELIVER is that one, never the refused one.
    let mut next = 3;
    let accepted = wait_for(|| {
        next += 1;
        xc.send_msg(next, y, format!("after {next}").as_bytes())
            .unwrap();
        ack_or_error(&mut xc, next).is_ok()
    });
    assert!(
        accepted,
        "SENDs still refused after the disk had space again"
    );
    let d = recv_deliver(&mut yc);
    assert_eq!(d.body, format!("after {next}").into_bytes());
    yc.send_delivered(d.server_id).unwrap();
    assert_eq!(srv.metric_sum("tern_restarts_total"), 0, "no crash");
    assert_eq!(srv.info_u64("Queued"), 0);
}

#[test]
fn enospc_on_write_refuses_the_batch_and_sends_nothing_of_it() {
    no_space_write_is_rolled_back(libc::ENOSPC);
}

#[test]
fn edquot_on_write_is_handled_like_enospc() {
    no_space_write_is_rolled_back(libc::EDQUOT);
}

#[test]
fn enospc_on_segment_create_refuses_and_keeps_acked_messages() {
    let (x, offline) = cross_pair();
    let srv = TestServer::start_with(|c| c.segment_bytes_max = 600);
    let mut xc = srv.login(x);
    // 200-byte bodies: two per 600-byte segment, so segments roll often.
    let mut acked = Vec::new();
    for i in 1..=4 {
        xc.send_msg(i, offline, &indexed_body(i, 200)).unwrap();
        acked.push(recv_ack(&mut xc, i));
    }
    let data = data_dir(&srv);
    fault::inject(rule(&data, 1, Op::Create, 0, 1, libc::ENOSPC));
    let mut refused = 0;
    for i in 5..=8 {
        xc.send_msg(i, offline, &indexed_body(i, 200)).unwrap();
        match ack_or_error(&mut xc, i) {
            Ok(id) => acked.push(id),
            Err(code) => {
                assert_eq!(code, ErrorCode::StorageFull);
                refused += 1;
            }
        }
    }
    assert!(refused >= 1, "the failed create refused nothing");
    fault::clear(&data.display().to_string());
    drop(xc);
    let (mut oc, info) = srv.login_info(offline);
    assert_eq!(info.offline_count, acked.len() as u64);
    let got: Vec<u64> = (0..acked.len())
        .map(|_| recv_deliver(&mut oc).server_id)
        .collect();
    assert_eq!(got, acked);
}

#[test]
fn eio_on_fsync_crashes_the_shard_which_replays_and_goes_on() {
    let (x, offline) = cross_pair();
    let srv = TestServer::start_with(|c| c.shard_restart_backoff_ms = 10);
    let mut xc = srv.login(x);
    let acked: Vec<u64> = (1..=3)
        .map(|i| {
            xc.send_msg(i, offline, &indexed_body(i, 50)).unwrap();
            recv_ack(&mut xc, i)
        })
        .collect();
    let data = data_dir(&srv);
    fault::inject(rule(&data, 1, Op::Sync, 0, 1, libc::EIO));
    xc.send_msg(4, offline, &indexed_body(4, 50)).unwrap();
    // The commit failed: no ACK for it. The shard restarts and refuses it.
    match ack_or_error(&mut xc, 4) {
        Err(ErrorCode::Internal) => {}
        other => panic!("expected ERROR(internal) for the failed commit, got {other:?}"),
    }
    srv.wait_metric("tern_restarts_total", |n| n == 1);
    fault::clear(&data.display().to_string());
    let (mut oc, info) = srv.login_info(offline);
    assert!(info.offline_count >= 3, "{info:?}");
    let got: Vec<u64> = (0..3).map(|_| recv_deliver(&mut oc).server_id).collect();
    assert_eq!(got, acked);
    assert!(srv.query("show shards").contains(" up"));
}

#[test]
fn a_shard_that_cannot_reopen_its_store_makes_the_server_give_up() {
    let (x, y) = cross_pair();
    let srv = TestServer::start_with(|c| {
        c.shard_restarts_max = 2;
        c.shard_restart_backoff_ms = 10;
    });
    let mut xc = srv.login(x);
    let data = data_dir(&srv);
    // Every sync of shard 1 fails from now on: its commit, then each reopen
    // (which rewrites meta).
    fault::inject(rule(&data, 1, Op::Sync, 0, u32::MAX, libc::EIO));
    xc.send_msg(1, y, b"doomed").unwrap();
    assert!(
        wait_for(|| srv.server().fatal().is_some()),
        "the server never gave up"
    );
    let reason = srv.server().fatal().unwrap();
    assert!(reason.contains("shard 1"), "{reason}");
    assert!(reason.contains("shard_restarts_max"), "{reason}");
    assert!(srv.query("show shards").contains("down"));
    assert_eq!(srv.metric_sum("tern_restarts_total"), 1);
    fault::clear(&data.display().to_string());
}

/// A shard whose device log cannot be opened again after a crash (the disk
/// that crashed it still failing) is restarted within the restart intensity
/// and then given up, with the reason, as one whose message store cannot
/// be: the reopen's error is an error, not a panic outside the supervisor
/// (found by the simulator, seed 7247: the panic took the shard's thread).
#[test]
fn a_shard_that_cannot_reopen_its_device_log_makes_the_server_give_up() {
    let (_, y) = cross_pair();
    let srv = TestServer::start_with(|c| {
        c.shard_restarts_max = 2;
        c.shard_restart_backoff_ms = 10;
    });
    let data = data_dir(&srv);
    let log = format!("{}/shard-1/devices.rec", data.display());
    let fail = |op, times, errno| Rule {
        path_contains: log.clone(),
        op,
        skip: 0,
        times,
        errno,
    };
    // The shard opens its device log once running (an empty one is
    // written anew through `devices.rec.new`).
    assert!(wait_for(|| Path::new(&log).exists()), "no device log");
    // Shard 1's next device log write fills the disk half way and cannot be
    // cut back, so the log must be written anew, which fails from now on:
    // the shard crashes, and each reopen finds a torn log it cannot write
    // anew either.
    fault::inject(fail(Op::Write, 1, libc::ENOSPC));
    fault::inject(fail(Op::Truncate, u32::MAX, libc::EIO));
    fault::inject(fail(Op::Create, u32::MAX, libc::EIO));
    // y's device registers and goes offline: a device log record on shard 1.
    drop(
        Client::login_version(srv.addr, &device_token(y, 1), tern::proto::VERSION_2)
            .expect("login"),
    );
    assert!(
        wait_for(|| srv.server().fatal().is_some()),
        "the server never gave up"
    );
    let reason = srv.server().fatal().unwrap();
    assert!(reason.contains("shard 1"), "{reason}");
    assert!(reason.contains("open device log"), "{reason}");
    assert!(reason.contains("shard_restarts_max"), "{reason}");
    assert!(srv.query("show shards").contains("down"));
    fault::clear(&data.display().to_string());
}

#[test]
fn the_binary_exits_70_when_a_shard_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let shard1 = format!("{}/shard-1/", data.display());
    let mut child = Command::new(TERN)
        .args(["serve", "--shards", "2", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--stats-socket")
        .arg(dir.path().join("tern.sock"))
        .args([
            "--shard-restarts-max",
            "1",
            "--shard-restart-backoff-ms",
            "10",
        ])
        .env("TERN_TOKEN_SECRET", SECRET)
        // Its log writes fail (a crash), and so does every reopen's meta
        // sync after the one at start-up.
        .env(
            "TERN_FAILPOINTS",
            format!("write:{shard1}0000:0:all:EIO;sync:{shard1}meta.tmp:1:all:EIO"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (x, y) = cross_pair();
    let mut xc = None;
    assert!(wait_for(|| {
        xc = Client::login(addr, &token(x)).ok().map(|(c, _)| c);
        xc.is_some()
    }));
    let mut xc = xc.unwrap();
    xc.send_msg(1, y, b"doomed").unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit after its shard gave up");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(70));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("giving up"), "{err}");
}

#[test]
fn while_a_shard_restarts_its_users_get_unavailable() {
    let (x, y) = cross_pair();
    let srv = TestServer::start_with(|c| {
        // Long enough to look at the restarting shard, short enough to wait.
        c.shard_restart_backoff_ms = 3000;
    });
    let mut xc = srv.login(x);
    let mut yc = srv.login(y);
    // Crash y's shard (debug hook): a SEND to CRASH_USER from y's shard.
    yc.send_msg(1, tern::shard::CRASH_USER, b"boom").unwrap();
    assert!(wait_for(|| srv.query("show shards").contains("restarting")));
    // x (shard 0) sending to y (shard 1): refused at once, not left hanging.
    xc.send_msg(2, y, b"hello?").unwrap();
    assert_eq!(ack_or_error(&mut xc, 2), Err(ErrorCode::Unavailable));
    // y logging in again on shard 0: LOGIN_ERR(unavailable). A connection
    // the kernel gives shard 1 waits in its backlog; try a few.
    let mut refused = false;
    for _ in 0..20 {
        let mut c = match Client::connect(srv.addr) {
            Ok(c) => c,
            Err(_) => continue,
        };
        c.set_read_timeout(Duration::from_millis(200));
        match c.login_here(&token(y)) {
            Err(ClientError::LoginRejected { code, .. }) => {
                assert_eq!(code, ErrorCode::Unavailable);
                refused = true;
                break;
            }
            // Waiting in shard 1's backlog.
            Err(ClientError::Timeout | ClientError::Io(_)) => continue,
            other => panic!("unexpected login answer while restarting: {other:?}"),
        }
    }
    assert!(refused, "no login was answered unavailable");
    assert!(srv.metric_sum("tern_unavailable_total") >= 2);
    // Back up: the same SEND is taken.
    assert!(wait_for(|| !srv
        .query("show shards")
        .contains("restarting")));
    xc.send_msg(3, y, b"hello again").unwrap();
    assert!(ack_or_error(&mut xc, 3).is_ok());
}

// ---- a real filesystem that fills up --------------------------------------

/// A tmpfs of `mib` MiB mounted for the test; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this process may not mount (not root): the caller says so.
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0700"))
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills `fs` with a filler file until the disk is full.
fn fill(fs: &Path) -> PathBuf {
    use std::io::Write;
    let path = fs.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 64 * 1024];
    for _ in 0..100_000 {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    // Byte by byte for the last partial block.
    for _ in 0..64 * 1024 {
        if f.write_all(&[0]).is_err() {
            break;
        }
    }
    path
}

#[test]
fn a_real_disk_fills_refuses_drains_and_takes_sends_again() {
    let Some(fs) = Tmpfs::mount(8) else {
        if std::env::var_os("CI").is_some() {
            panic!("cannot mount a tmpfs (CI runs as root; this test needs it)");
        }
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let data = fs.path().join("data");
    let senders: Vec<u64> = users_on(0, SHARDS, 4);
    let recipients: Vec<u64> = users_on(1, SHARDS, 4);
    const BODY: usize = 1000;
    let mut acked: Vec<(u64, u64, u64)> = Vec::new(); // (recipient, server id, index)
    let mut refusals = 0u64;
    {
        let srv = TestServer::start_with(|c| {
            c.data_dir = data.clone();
            c.queue_len_max = 10_000;
        });
        let mut clients: Vec<Client> = senders.iter().map(|&u| srv.login(u)).collect();
        // 8 MiB at ~1 KB a message: well under 10,000 fills it.
        let mut i = 0u64;
        'fill: for _round in 0..3000 {
            for (k, c) in clients.iter_mut().enumerate() {
                i += 1;
                let to = recipients[(i as usize + k) % recipients.len()];
                c.send_msg(i, to, &indexed_body(i, BODY)).unwrap();
                match ack_or_error(c, i) {
                    Ok(id) => acked.push((to, id, i)),
                    Err(code) => {
                        assert_eq!(code, ErrorCode::StorageFull, "client id {i}");
                        refusals += 1;
                        if refusals >= 20 {
                            break 'fill;
                        }
                    }
                }
            }
        }
        assert!(
            refusals >= 20,
            "the disk never filled ({} ACKed)",
            acked.len()
        );
        assert!(acked.len() > 1000, "only {} ACKed", acked.len());
        // Gauges are sampled once a second.
        assert!(wait_for(|| srv
            .query("show metrics")
            .contains("tern_disk_short{shard=\"1\"} 1")));

        // Deliver half of every recipient's queue: space comes back by
        // itself, and SENDs are taken again without a restart.
        for &r in &recipients {
            let (mut rc, info) = srv.login_info(r);
            let mine: Vec<&(u64, u64, u64)> = acked.iter().filter(|a| a.0 == r).collect();
            assert_eq!(info.offline_count, mine.len() as u64);
            for a in mine.iter().take(mine.len() / 2) {
                let d = recv_deliver(&mut rc);
                assert_eq!((d.server_id, body_index(&d.body)), (a.1, a.2));
                rc.send_delivered(d.server_id).unwrap();
            }
            rc.ping(7).unwrap();
        }
        let delivered: std::collections::HashSet<u64> = recipients
            .iter()
            .flat_map(|&r| {
                let mine: Vec<u64> = acked.iter().filter(|a| a.0 == r).map(|a| a.1).collect();
                let half = mine.len() / 2;
                mine.into_iter().take(half)
            })
            .collect();
        acked.retain(|a| !delivered.contains(&a.1));
        let c = &mut clients[0];
        let mut n = 1_000_000u64;
        let accepted = wait_for(|| {
            n += 1;
            c.send_msg(n, recipients[0], &indexed_body(n, BODY))
                .unwrap();
            match ack_or_error(c, n) {
                Ok(id) => {
                    acked.push((recipients[0], id, n));
                    true
                }
                Err(_) => false,
            }
        });
        assert!(
            accepted,
            "SENDs never taken again after deliveries freed space"
        );
    }

    // Someone else fills the disk to the last byte; the server starts on it
    // and takes nothing new, serves the whole backlog, and the deliveries
    // (written into its reserve) free enough space to take SENDs again,
    // filler and all.
    let filler = fill(fs.path());
    let srv = TestServer::start_with(|c| {
        c.data_dir = data.clone();
        c.queue_len_max = 10_000;
    });
    let mut sc = srv.login(senders[0]);
    sc.send_msg(1, recipients[0], b"x").unwrap();
    assert_eq!(ack_or_error(&mut sc, 1), Err(ErrorCode::StorageFull));
    for &r in &recipients {
        let (mut rc, info) = srv.login_info(r);
        let mine: Vec<&(u64, u64, u64)> = acked.iter().filter(|a| a.0 == r).collect();
        assert_eq!(info.offline_count, mine.len() as u64, "user {r}");
        for a in &mine {
            let d = recv_deliver(&mut rc);
            assert_eq!((d.server_id, body_index(&d.body)), (a.1, a.2));
            rc.send_delivered(d.server_id).unwrap();
        }
    }
    let mut n = 1;
    let accepted = wait_for(|| {
        n += 1;
        sc.send_msg(n, recipients[0], b"after the drain").unwrap();
        ack_or_error(&mut sc, n).is_ok()
    });
    assert!(
        accepted,
        "delivering the backlog never freed space on the full disk"
    );
    assert!(filler.exists());
}

/// Issue 23: the shard loop does not stop for fdatasync. While the sync of a
/// batch is held (a disk as slow as the test likes), the recipient's shard
/// goes on: it answers PINGs, takes a login and stages the next SEND; the
/// held batch's ACK has not left. Once released, both ACKs arrive, in order.
#[test]
fn a_slow_fsync_does_not_stop_the_shard_loop() {
    let (x, offline) = cross_pair();
    let srv = TestServer::start();
    let data = data_dir(&srv);
    let mut xc = srv.login(x);
    // The log exists before the hold: its first segment and directory sync
    // happen on the shard's thread, only the batch syncs run off it.
    xc.send_msg(1, offline, b"before").unwrap();
    recv_ack(&mut xc, 1);
    let held = format!("{}/shard-1/0", data.display());
    fault::hold(&held);
    xc.send_msg(2, offline, b"held").unwrap();
    assert!(
        wait_for(|| fault::held(&held) == 1),
        "the batch's sync never started"
    );
    // Shard 1's loop runs: a user homed there logs in and is answered.
    let local = users_on(1, SHARDS, 2)[1];
    let mut lc = srv.login(local);
    lc.ping(7).unwrap();
    // The next SEND is staged behind the held batch.
    xc.send_msg(3, offline, b"next").unwrap();
    lc.ping(8).unwrap();
    // The sender's PONG comes back, and no ACK before it: the held batch is
    // not durable, so its ACK must wait.
    xc.ping(9).unwrap();
    assert!(
        xc.recv_timeout(Duration::ZERO).unwrap().is_none(),
        "a frame (an ACK?) arrived while the batch's fsync was held"
    );
    assert!(srv.metric_sum("tern_sync_overlaps_total") > 0);
    fault::release(&held);
    let second = recv_ack(&mut xc, 2);
    let third = recv_ack(&mut xc, 3);
    assert!(second < third);
    let (mut oc, info) = srv.login_info(offline);
    assert_eq!(info.offline_count, 3);
    let got: Vec<u64> = (0..3).map(|_| recv_deliver(&mut oc).server_id).collect();
    assert_eq!(got[1..], [second, third]);
    assert!(srv.query("show latency").contains("fsync"));
}
