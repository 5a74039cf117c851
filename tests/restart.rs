//! Restarting on the same port: a listener nobody holds any more (what a
//! killed io_uring server leaves for up to a second) is waited out within
//! `listen_retry_ms`; a live listener is refused at once.

mod common;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::child::{serve_command, TernChild};
use common::*;
use socket2::{Domain, Socket, Type};
use tern::claim::Holder;
use tern::server::Server;

/// Sends `fd` over `via` (SCM_RIGHTS) without anyone receiving it: while
/// the message waits in `via`'s peer, the file is open in no process.
fn send_fd(via: &UnixStream, fd: RawFd) {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // u64s keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` and `control`, both alive and of the
    // lengths given; the first header fits in `control` (CMSG_SPACE).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null());
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        let sent = libc::sendmsg(via.as_raw_fd(), &msg, 0);
        assert_eq!(sent, 1, "sendmsg: {}", std::io::Error::last_os_error());
    }
}

/// A socket listening on a fresh loopback port that no process holds: like
/// a killed io_uring server's listener before its ring is torn down. It
/// goes away when the returned pair is dropped.
fn dying_listener() -> (SocketAddr, (UnixStream, UnixStream)) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(16).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let pair = UnixStream::pair().unwrap();
    send_fd(&pair.0, socket.as_raw_fd());
    drop(socket);
    assert_eq!(tern::claim::holder(addr.port()), Holder::Dying);
    (addr, pair)
}

/// Start-up meets a port held only by a dying listener: it retries, and
/// comes up once the listener is gone.
#[test]
fn a_dying_listener_is_waited_out() {
    let (addr, pair) = dying_listener();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.listen = addr;
    config.listen_retry_ms = WAIT.as_millis() as u64;
    let starting = std::thread::spawn(move || Server::start(config).map_err(|e| e.to_string()));
    // Let the start meet the busy port (if it is quicker, the test still
    // passes without proving much; it cannot fail for that).
    std::thread::sleep(Duration::from_millis(300));
    drop(pair);
    let server = starting
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("start failed: {e}"));
    assert_eq!(server.local_addr(), addr);
    let mut client = tern_client::Client::login(addr, &token(7)).unwrap().0;
    client.ping(1).unwrap();
    drop(client);
    server.shutdown();
    server.join();
}

/// Past `listen_retry_ms` the start fails with the clear error.
#[test]
fn a_listener_that_stays_fails_the_start_after_listen_retry_ms() {
    let (addr, _pair) = dying_listener();
    for (retry_ms, says) in [
        (0, "Address already in use"),
        (
            200,
            "still in use after retrying for 200 ms (listen_retry_ms)",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.listen = addr;
        config.listen_retry_ms = retry_ms;
        let err = Server::start(config).err().expect("start refused");
        let err = err.to_string();
        assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
        assert!(err.contains(says), "{err}");
    }
}

/// A port a live server listens on is refused at once, naming the process,
/// even with a long `listen_retry_ms`.
#[test]
fn a_live_listener_is_refused_at_once() {
    let first = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.listen = first.addr;
    config.listen_retry_ms = 3_600_000;
    let err = Server::start(config).err().expect("second server refused");
    let err = err.to_string();
    assert!(
        err.contains(&format!("process {} listens there", std::process::id())),
        "{err}"
    );
    first.login(1).ping(1).unwrap();
}

/// A server started as another user cannot look into our processes: our
/// live listener is refused at once all the same (not retried as dying).
#[test]
fn another_users_listener_is_refused_at_once() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return eprintln!("skipping: needs root to start a server as another user");
    }
    let first = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let listen = first.addr.to_string();
    let mut cmd = serve_command(&["--listen", &listen, "--shards", "1", "--io", "poll"]);
    cmd.args(["--listen-retry-ms", "3600000"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--stats-socket")
        .arg(dir.path().join("tern.sock"))
        // nobody
        .uid(65534)
        .gid(65534);
    let (status, log) = match TernChild::start(cmd) {
        Ok(second) => panic!("a second server started:\n{}", second.log_text()),
        Err(exit) => exit,
    };
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "cannot listen on {listen}: Address already in use (os error 98): another user's process listens there"
        )),
        "{log}"
    );
    first.login(1).ping(1).unwrap();
}

/// `tern serve` on io_uring with fsync durability, SIGKILLed with messages
/// queued, and started again at once on the same port: it comes up and
/// delivers every ACKed message. A second server on the live port is still
/// refused (exit status 1).
#[test]
fn restart_right_after_kill_9_comes_up_on_the_same_port() {
    if let Err(e) = uring_probe() {
        return tern::io::uring_unavailable(&e);
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let command = |name: &str| {
        let mut cmd = serve_command(&[
            "--listen",
            &listen,
            "--shards",
            "2",
            "--io",
            "uring",
            "--durability",
            "fsync",
        ]);
        cmd.arg("--data-dir")
            .arg(dir.path().join(name))
            .arg("--stats-socket")
            .arg(dir.path().join(format!("{name}.sock")));
        cmd
    };
    let (sender, offline) = cross_pair();
    let mut acked = Vec::new();
    let mut server = TernChild::expect_start(command("data"));
    for round in 0..3u64 {
        // Connections open and messages queued when the kill comes.
        let mut client = tern_client::Client::login(server.addr, &token(sender))
            .unwrap()
            .0;
        let _idle: Vec<_> = (0..20)
            .map(|i| tern_client::Client::login(server.addr, &token(1000 + i)).unwrap())
            .collect();
        for i in 0..20 {
            let n = round * 20 + i;
            client.send_msg(n, offline, &indexed_body(n, 32)).unwrap();
            recv_ack(&mut client, n);
            acked.push(n);
        }
        let log = server.kill9();
        server = TernChild::start(command("data")).unwrap_or_else(|(status, restart)| {
            panic!(
                "round {round}: restart after kill -9 failed ({status}):\n{restart}\nkilled server's log:\n{log}"
            )
        });
        assert_eq!(server.addr.port(), port);
        let retried = server.log_text().contains("retrying for up to");
        eprintln!("round {round}: restarted; waited for the killed server's listener: {retried}");
    }
    let mut recipient = tern_client::Client::login(server.addr, &token(offline))
        .unwrap()
        .0;
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let d = recv_deliver(&mut recipient);
        recipient.send_delivered(d.server_id).unwrap();
        got.push(body_index(&d.body));
    }
    assert_eq!(got, acked);

    // Another server (its own data dir) on the live port: refused, naming
    // the holder.
    let (status, log) = match TernChild::start(command("other")) {
        Ok(second) => panic!("a second server started:\n{}", second.log_text()),
        Err(exit) => exit,
    };
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("process {} listens there", server.pid())),
        "{log}"
    );
    recipient.ping(1).unwrap();
}

/// Whether io_uring works here (the server's own backend on a scratch
/// listener).
fn uring_probe() -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let options = tern::io::IoOptions {
        backend: tern::io::Backend::Uring,
        shard: 0,
        conns_max: 16,
        ring_slots_max: 0,
        batch_wait: Duration::ZERO,
    };
    tern::io::Io::new(tern::io::Listeners::plain(listener), &options).map(drop)
}
