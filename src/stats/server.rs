//! The stats socket: a Unix socket answering one command per connection,
//! like HAProxy's runtime API in non-interactive mode, plus an optional tiny
//! HTTP listener for Prometheus `GET /metrics` and the health checks
//! `GET /healthz` and `GET /readyz` (see [`super::health`]).
//!
//! One background thread, `tern-stats`, serves both listeners with blocking
//! std sockets. The listeners themselves are nonblocking and polled every
//! [`POLL_INTERVAL`]; clients are answered one at a time, each within
//! [`CLIENT_TIME_MAX`], so a stuck client delays the others by at most that
//! and cannot wedge the thread.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use super::health::{check, Probe};
use super::render::{render, StatsView};
use super::socket::{claim_path, SocketAccess, SocketFile};

/// How often the stats thread checks its listeners (and the stop flag) when
/// nothing is happening. Also the slowest `stop` can be.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Longest the stats thread spends on one client, reading its request and
/// writing the answer together.
pub const CLIENT_TIME_MAX: Duration = Duration::from_secs(2);

/// Longest command line accepted on the Unix socket, newline included.
pub const COMMAND_BYTES_MAX: usize = 1024;

/// Longest HTTP request head accepted on the metrics listener.
pub const HTTP_HEAD_BYTES_MAX: usize = 8192;

/// Most bytes discarded from a client whose request was too long, so that
/// closing does not reset the connection before it reads our answer.
const LINGER_BYTES_MAX: usize = 64 * 1024;

/// Clients served per listener before checking the other listener and the
/// stop flag again.
const ACCEPTS_PER_TICK_MAX: usize = 64;

/// Least time between two warnings about failing `accept` calls.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// How long [`query`] waits for the server to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A running stats server. Dropping it stops it too; [`StatsServer::stop`]
/// just says so out loud.
pub struct StatsServer {
    /// The `tern-stats` thread; `None` once joined.
    thread: Option<JoinHandle<()>>,
    /// Set to ask the thread to return.
    stop: Arc<AtomicBool>,
    metrics_addr: Option<SocketAddr>,
    /// Removed when the server is dropped, after the thread has been joined
    /// (fields drop after `Drop::drop`).
    socket_file: SocketFile,
}

impl StatsServer {
    /// Binds the Unix socket at `path` and, if given, an HTTP listener for
    /// `GET /metrics` at `metrics_listen` (port 0 picks a free port), then
    /// serves both on a thread named `tern-stats`.
    ///
    /// If `path` exists and something answers a connect on it, fails with
    /// `AddrInUse` ("another tern is serving stats at PATH"). If it is a
    /// socket nobody answers on, it was left by a process that died: it is
    /// removed and bound again. Anything that is not a socket is left alone
    /// and fails with `AlreadyExists`. Two processes starting at the same
    /// instant on one path can both see it stale; the last to bind wins.
    ///
    /// # Errors
    ///
    /// The cases above; binding either listener (the error names which);
    /// spawning the thread. On error nothing is left bound and no socket
    /// file of ours remains.
    ///
    /// The socket gets `access`'s mode and group before it listens, so no
    /// client connects under wider permissions (the umask's) in between.
    pub fn spawn(
        path: &Path,
        access: SocketAccess,
        metrics_listen: Option<SocketAddr>,
        view: Arc<StatsView>,
    ) -> io::Result<StatsServer> {
        claim_path(path)?;
        let tcp = match metrics_listen {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .map_err(|e| context(e, format_args!("binding metrics listener {addr}")))?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
        };
        let metrics_addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        SockAddr::unix(path)
            .and_then(|addr| socket.bind(&addr))
            .map_err(|e| context(e, format_args!("binding stats socket {}", path.display())))?;
        let socket_file = match fs::symlink_metadata(path) {
            Ok(meta) => SocketFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
            Err(e) => {
                // We just created it, so this is unexpected; undo the bind.
                let _ = fs::remove_file(path);
                return Err(context(e, format_args!("inspecting {}", path.display())));
            }
        };
        // From here on, an early return drops `socket_file` and removes it.
        // Not listening yet: a connect is refused until the bits are right.
        access.apply(path)?;
        socket.listen(STATS_BACKLOG)?;
        let unix = UnixListener::from(std::os::fd::OwnedFd::from(socket));
        unix.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            unix,
            tcp,
            view,
            stop: Arc::clone(&stop),
            accept_warned: None,
        };
        let thread = thread::Builder::new()
            .name("tern-stats".to_string())
            .spawn(move || worker.run())?;
        log::info!("stats socket at {}", path.display());
        if let Some(addr) = metrics_addr {
            log::info!("metrics at http://{addr}/metrics");
        }
        Ok(StatsServer {
            thread: Some(thread),
            stop,
            metrics_addr,
            socket_file,
        })
    }

    /// The address the metrics listener is bound to (the real port when 0
    /// was asked for), or `None` when there is no metrics listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops the thread (within about [`POLL_INTERVAL`], plus the client
    /// being served, if any), joins it and removes the socket file.
    pub fn stop(self) {
        drop(self);
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        thread.thread().unpark();
        if thread.join().is_err() {
            log::error!("the tern-stats thread panicked");
        }
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for StatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsServer")
            .field("path", &self.socket_file.path)
            .field("metrics_addr", &self.metrics_addr)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

/// Client side for `tern stats`: connects to the socket at `path`, writes
/// `command` and a newline, and reads the answer to EOF.
///
/// The server answers only the first line, so a `command` containing a
/// newline is cut there. Gives up after [`QUERY_TIMEOUT`] without an answer.
///
/// # Errors
///
/// `NotFound` or `ConnectionRefused` when no server runs at `path` (the
/// message names the path), `WouldBlock`/`TimedOut` when it does not answer
/// in time, `InvalidData` if the answer is not UTF-8.
pub fn query(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        context(
            e,
            format_args!("connecting to stats socket {}", path.display()),
        )
    })?;
    stream.set_read_timeout(Some(QUERY_TIMEOUT))?;
    stream.set_write_timeout(Some(QUERY_TIMEOUT))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// listen(2) backlog of the stats socket: clients are served one at a time.
const STATS_BACKLOG: i32 = 128;

/// State of the `tern-stats` thread.
struct Worker {
    unix: UnixListener,
    tcp: Option<TcpListener>,
    view: Arc<StatsView>,
    stop: Arc<AtomicBool>,
    /// When the last accept failure was logged, to keep fd exhaustion from
    /// flooding the log every [`POLL_INTERVAL`].
    accept_warned: Option<Instant>,
}

impl Worker {
    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let mut served = 0;
            for _ in 0..ACCEPTS_PER_TICK_MAX {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                match self.unix.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        if let Err(e) = serve_unix(stream, &self.view) {
                            log::debug!("stats client: {e}");
                        }
                    }
                    Err(e) => {
                        if self.accept_failed(e, "stats socket") {
                            break;
                        }
                    }
                }
            }
            for _ in 0..ACCEPTS_PER_TICK_MAX {
                let Some(tcp) = &self.tcp else { break };
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                match tcp.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        if let Err(e) = serve_http(stream, &self.view) {
                            log::debug!("metrics client: {e}");
                        }
                    }
                    Err(e) => {
                        if self.accept_failed(e, "metrics listener") {
                            break;
                        }
                    }
                }
            }
            if served == 0 {
                // `stop` unparks us, so stopping does not wait out the interval.
                thread::park_timeout(POLL_INTERVAL);
            }
        }
    }

    /// Handles an `accept` error; returns true when the listener should be
    /// left alone until the next tick.
    fn accept_failed(&mut self, e: io::Error, what: &str) -> bool {
        match e.kind() {
            // EAGAIN: nobody is waiting.
            io::ErrorKind::WouldBlock => return true,
            // EINTR: a signal arrived; just try again.
            io::ErrorKind::Interrupted => return false,
            // ECONNABORTED: the client gave up while queued; next one.
            io::ErrorKind::ConnectionAborted => return false,
            _ => {}
        }
        let now = Instant::now();
        let quiet = self
            .accept_warned
            .is_some_and(|t| now.saturating_duration_since(t) < ACCEPT_WARN_INTERVAL);
        if !quiet {
            self.accept_warned = Some(now);
            match e.raw_os_error() {
                // EMFILE/ENFILE: out of file descriptors; ENOBUFS/ENOMEM: out
                // of kernel memory. Shards are likely struggling too; wait.
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    log::warn!("{what}: accept: {e} (retrying)");
                }
                _ => log::error!("{what}: accept: {e} (retrying)"),
            }
        }
        true
    }
}

/// Timeout setters shared by the two stream types.
trait Client: Read + Write {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Client for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Client for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// Time left until `deadline`, as a socket timeout, or `TimedOut`.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        // A zero timeout means "block forever" to setsockopt; std rejects it.
        Some(left) if left >= Duration::from_millis(1) => Ok(left),
        _ => Err(io::Error::new(io::ErrorKind::TimedOut, "client too slow")),
    }
}

/// How reading a request ended.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `done` held on the first `n` bytes read.
    Complete(usize),
    /// The client closed its side after `n` bytes, before `done` held.
    Eof(usize),
    /// The buffer filled up before `done` held.
    TooLong,
}

/// Reads into `buf` until `done` holds on what was read, the client closes
/// its side, or `buf` is full, all before `deadline`.
fn read_request(
    stream: &mut impl Client,
    buf: &mut [u8],
    deadline: Instant,
    done: impl Fn(&[u8]) -> bool,
) -> io::Result<Request> {
    let mut n = 0;
    // Bounded: every pass reads at least one byte or returns.
    loop {
        if done(&buf[..n]) {
            return Ok(Request::Complete(n));
        }
        if n == buf.len() {
            return Ok(Request::TooLong);
        }
        stream.set_timeouts(remaining(deadline)?)?;
        match stream.read(&mut buf[n..]) {
            Ok(0) => return Ok(Request::Eof(n)),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `bytes` before `deadline`.
fn write_answer(stream: &mut impl Client, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    // Bounded: every pass writes at least one byte or returns.
    while !bytes.is_empty() {
        stream.set_timeouts(remaining(deadline)?)?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => bytes = &bytes[k..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers one command line on the Unix socket, then closes.
fn serve_unix(mut stream: UnixStream, view: &StatsView) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIME_MAX;
    // BSD and macOS hand out accepted sockets with the listener's O_NONBLOCK.
    stream.set_nonblocking(false)?;
    let mut buf = [0u8; COMMAND_BYTES_MAX];
    let line = match read_request(&mut stream, &mut buf, deadline, |b| b.contains(&b'\n'))? {
        Request::Complete(n) | Request::Eof(n) if n > 0 => {
            let end = buf[..n].iter().position(|&b| b == b'\n').unwrap_or(n);
            String::from_utf8_lossy(&buf[..end]).into_owned()
        }
        // Connected and left without a word (e.g. a liveness probe).
        Request::Complete(_) | Request::Eof(_) => return Ok(()),
        Request::TooLong => {
            let answer = format!("Command too long (more than {COMMAND_BYTES_MAX} bytes).\n");
            write_answer(&mut stream, answer.as_bytes(), deadline)?;
            return linger(
                &mut stream,
                |s| s.shutdown(std::net::Shutdown::Write),
                deadline,
            );
        }
    };
    write_answer(&mut stream, render(view, &line).as_bytes(), deadline)
}

/// Closes our side of a client that still has unread input, then discards
/// that input until it closes too (bounded by `deadline` and
/// [`LINGER_BYTES_MAX`]). Closing with unread input would reset the
/// connection, and the client could lose our answer.
fn linger<S: Client>(
    stream: &mut S,
    shutdown: impl FnOnce(&S) -> io::Result<()>,
    deadline: Instant,
) -> io::Result<()> {
    match shutdown(stream) {
        // ENOTCONN: the client already closed; nothing left to protect.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    let mut scratch = [0u8; 4096];
    let mut discarded = 0;
    // Bounded: every pass discards at least one byte or returns.
    while discarded < LINGER_BYTES_MAX {
        stream.set_timeouts(remaining(deadline)?)?;
        match stream.read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(k) => discarded += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What an HTTP request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// `GET /healthz` or `GET /readyz`.
    Health(Probe),
    /// A well-formed request for anything else.
    NotFound,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

/// Routes a request by its head (request line plus headers).
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || target.is_empty() {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", "/healthz") => Route::Health(Probe::Health),
        ("GET", "/readyz") => Route::Health(Probe::Ready),
        _ => Route::NotFound,
    }
}

/// True once `head` holds a whole request head (ends in a blank line).
fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Answers one HTTP request on the metrics listener, then closes.
fn serve_http(mut stream: TcpStream, view: &StatsView) -> io::Result<()> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let deadline = Instant::now() + CLIENT_TIME_MAX;
    stream.set_nonblocking(false)?;
    let mut buf = vec![0u8; HTTP_HEAD_BYTES_MAX];
    let request = read_request(&mut stream, &mut buf, deadline, head_complete)?;
    let (status, content_type, body) = match request {
        Request::Complete(n) => match route(&buf[..n]) {
            Route::Metrics => ("200 OK", METRICS_CONTENT_TYPE, render(view, "show metrics")),
            Route::Health(probe) => match check(view, probe) {
                Ok(()) => ("200 OK", TEXT, "ok\n".to_string()),
                Err(reason) => ("503 Service Unavailable", TEXT, format!("{reason}\n")),
            },
            Route::NotFound => ("404 Not Found", TEXT, "Not Found\n".to_string()),
            Route::BadRequest => ("400 Bad Request", TEXT, "Bad Request\n".to_string()),
        },
        // The client left before finishing its request; nobody to answer.
        Request::Eof(_) => return Ok(()),
        Request::TooLong => (
            "431 Request Header Fields Too Large",
            TEXT,
            "Request Header Fields Too Large\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_answer(&mut stream, response.as_bytes(), deadline)?;
    let shutdown = |s: &TcpStream| s.shutdown(std::net::Shutdown::Write);
    if request == Request::TooLong {
        // The rest of the head is still unread.
        return linger(&mut stream, shutdown, deadline);
    }
    // Tell the client the answer is complete before the socket is dropped.
    match shutdown(&stream) {
        // ENOTCONN: the client already closed; it has what it wanted or left.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// Prefixes `e`'s message with what we were doing, keeping its kind.
pub(super) fn context(e: io::Error, what: fmt::Arguments<'_>) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::render::tests::fake_view;
    use std::net::Shutdown;

    fn spawn_fake(path: &Path, metrics: bool) -> StatsServer {
        let listen = metrics.then(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        StatsServer::spawn(path, SocketAccess::PRIVATE, listen, Arc::new(fake_view()))
            .expect("spawn")
    }

    fn http_get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    /// Splits a response into status line, lower-cased headers and body.
    fn parse_response(response: &str) -> (String, Vec<(String, String)>, String) {
        let (head, body) = response.split_once("\r\n\r\n").expect("blank line");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").expect("header");
                (k.to_ascii_lowercase(), v.to_string())
            })
            .collect();
        (status, headers, body.to_string())
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
        &headers.iter().find(|(k, _)| k == name).expect(name).1
    }

    #[test]
    fn query_each_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let server = spawn_fake(&path, false);
        let view = fake_view();
        assert_eq!(query(&path, "help").unwrap(), render(&view, "help"));
        assert_eq!(
            query(&path, "show shards").unwrap(),
            render(&view, "show shards")
        );
        let info = query(&path, "show info").unwrap();
        assert!(info.starts_with("Version: 9.8.7\n"), "{info}");
        assert!(info.contains("\nConns: 7\n"), "{info}");
        assert!(info.ends_with('\n'));
        let metrics = query(&path, "show metrics").unwrap();
        assert!(
            metrics.contains("\ntern_msgs_in_total{shard=\"1\"} 200\n"),
            "{metrics}"
        );
        assert!(metrics.ends_with(" 1\n"), "ends with build_info");
        assert_eq!(
            query(&path, "show nothing").unwrap(),
            "Unknown command: 'show nothing'. Try 'help'.\n"
        );
        assert_eq!(
            query(&path, "help\nshow info").unwrap(),
            render(&view, "help"),
            "only the first line is answered"
        );
        server.stop();
    }

    #[test]
    fn command_without_newline_or_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let _server = spawn_fake(&path, false);

        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(b"show shards\r").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, render(&fake_view(), "show shards"));

        let long = "x".repeat(COMMAND_BYTES_MAX);
        let answer = query(&path, &long).unwrap();
        assert!(answer.starts_with("Command too long"), "{answer}");

        let just_fits = format!("{}\n", "y".repeat(COMMAND_BYTES_MAX - 1));
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(just_fits.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("Unknown command: 'yyy"), "{answer}");
    }

    #[test]
    fn stuck_client_does_not_wedge_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let _server = spawn_fake(&path, false);
        let mut silent = UnixStream::connect(&path).unwrap();
        // Make sure the server picks up the silent client first.
        thread::sleep(POLL_INTERVAL * 3);
        let start = Instant::now();
        assert_eq!(query(&path, "help").unwrap(), render(&fake_view(), "help"));
        assert!(start.elapsed() < CLIENT_TIME_MAX + Duration::from_secs(2));
        // The silent client was dropped without an answer.
        let mut rest = Vec::new();
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        // A listener that is dropped leaves its file behind, like a crash.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = spawn_fake(&path, false);
        assert!(query(&path, "show info").unwrap().starts_with("Version: "));
        server.stop();
        assert!(!path.exists());
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let first = spawn_fake(&path, false);
        let err = StatsServer::spawn(&path, SocketAccess::PRIVATE, None, Arc::new(fake_view()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            format!("another tern is serving stats at {}", path.display())
        );
        // The first server is unharmed.
        assert!(query(&path, "help").unwrap().contains("show info"));
        first.stop();
        assert!(!path.exists());
    }

    #[test]
    fn non_socket_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        fs::write(&path, b"precious").unwrap();
        let err = StatsServer::spawn(&path, SocketAccess::PRIVATE, None, Arc::new(fake_view()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn failed_metrics_bind_leaves_no_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = StatsServer::spawn(
            &path,
            SocketAccess::PRIVATE,
            Some(addr),
            Arc::new(fake_view()),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("metrics listener"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn stop_removes_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let server = spawn_fake(&path, true);
        assert!(path.exists());
        let start = Instant::now();
        server.stop();
        assert!(start.elapsed() < Duration::from_secs(1), "stop is prompt");
        assert!(!path.exists());
        let err = query(&path, "help").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);

        // Dropping without `stop` cleans up too.
        drop(spawn_fake(&path, false));
        assert!(!path.exists());
    }

    #[test]
    fn stop_leaves_a_replaced_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let server = spawn_fake(&path, false);
        fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        server.stop();
        assert!(path.exists(), "another process's socket survives");
        drop(other);
    }

    #[test]
    fn http_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let server = spawn_fake(&path, true);
        let addr = server.metrics_addr().expect("metrics listener");
        assert_ne!(addr.port(), 0);

        let response = http_get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        );
        let (status, headers, body) = parse_response(&response);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            header(&headers, "content-type"),
            "text/plain; version=0.0.4"
        );
        assert_eq!(header(&headers, "content-length"), body.len().to_string());
        assert_eq!(header(&headers, "connection"), "close");
        assert!(
            body.contains("# TYPE tern_msgs_in_total counter\n"),
            "{body}"
        );
        assert!(body.contains("tern_build_info{version=\"9.8.7\""), "{body}");

        let response = http_get(addr, "GET /metrics?x=1 HTTP/1.0\n\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    }

    #[test]
    fn http_other_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.sock");
        let server = spawn_fake(&path, true);
        let addr = server.metrics_addr().unwrap();
        for request in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET /metricsx HTTP/1.1\r\n\r\n",
            "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (status, headers, body) = parse_response(&http_get(addr, request));
            assert_eq!(status, "HTTP/1.1 404 Not Found", "{request}");
            assert_eq!(header(&headers, "content-length"), body.len().to_string());
        }
        let (status, _, _) = parse_response(&http_get(addr, "nonsense\r\n\r\n"));
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(HTTP_HEAD_BYTES_MAX)
        );
        let (status, _, _) = parse_response(&http_get(addr, &huge));
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
        // The Unix socket still works alongside.
        assert!(query(&path, "help").is_ok());
    }

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?a=b HTTP/1.0\n\n"), Route::Metrics);
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"GET /healthz HTTP/1.1\r\n\r\n"),
            Route::Health(Probe::Health)
        );
        assert_eq!(
            route(b"GET /readyz?verbose HTTP/1.0\n\n"),
            Route::Health(Probe::Ready)
        );
        assert_eq!(route(b"GET /healthz/x HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /Metrics HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET  /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
    }
}
