//! `tern serve --demo`: the web chat page (clients/web, with the TypeScript
//! client library's compiled modules from clients/js/dist), embedded in the
//! binary, and a demo-only endpoint minting tokens for the demo users.
//!
//! It has a listener of its own (`--demo-http`, default 127.0.0.1:5380),
//! started only with `--demo`: the token endpoint hands out logins to anyone
//! who asks, so it must not exist on a listener a production server has
//! (the client listeners, the WebSocket listener on the shards, or the
//! metrics listener operators expose to their monitoring). Serving files
//! from the shards would also put HTTP responses on the event loops' path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The demo users the page offers; the token endpoint mints for these only.
pub const DEMO_USERS: [u64; 4] = [1001, 1002, 1003, 1004];

/// How long a demo token stays valid, seconds.
const TOKEN_TTL_S: u64 = 3600;

/// Longest request head read, bytes; a longer one gets 431.
const HEAD_BYTES_MAX: usize = 8192;

/// Most headers parsed in one request; more gets 431.
const HEADERS_MAX: usize = 32;

/// Longest a client may take to send its request or read the answer.
const CLIENT_TIME_MAX: Duration = Duration::from_secs(5);

/// Most bytes read away after a 431, so the answer is not lost to a reset.
const LINGER_BYTES_MAX: usize = 64 * 1024;

/// Connections served at once (a thread each); more are closed at once.
const CONNS_MAX: usize = 32;

/// One embedded file: URL path, content type, bytes.
type File = (&'static str, &'static str, &'static [u8]);

const JS: &str = "text/javascript; charset=utf-8";

/// The page and the client library, as served.
const FILES: [File; 7] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../clients/web/index.html"),
    ),
    ("/app.js", JS, include_bytes!("../clients/web/app.js")),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../clients/web/style.css"),
    ),
    (
        "/tern/index.js",
        JS,
        include_bytes!("../clients/js/dist/index.js"),
    ),
    (
        "/tern/codec.js",
        JS,
        include_bytes!("../clients/js/dist/codec.js"),
    ),
    (
        "/tern/state.js",
        JS,
        include_bytes!("../clients/js/dist/state.js"),
    ),
    (
        "/tern/client.js",
        JS,
        include_bytes!("../clients/js/dist/client.js"),
    ),
];

/// What the demo endpoint needs to mint tokens and name the WebSocket port.
struct Demo {
    secret: Vec<u8>,
    ws_port: u16,
}

/// Binds `listen` and serves the page on a thread of its own until the
/// process exits. Returns the bound address (the real port when 0 was asked).
pub fn spawn(listen: SocketAddr, secret: &[u8], ws_port: u16) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .map_err(|e| io::Error::new(e.kind(), format!("binding --demo-http {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let demo = Arc::new(Demo {
        secret: secret.to_vec(),
        ws_port,
    });
    std::thread::Builder::new()
        .name("tern-demo-web".into())
        .spawn(move || accept_loop(listener, demo))?;
    log::warn!(
        "DEMO ONLY: http://{addr}/ serves the web chat page and mints login tokens for users \
         {DEMO_USERS:?} to anyone who asks; never run --demo on a real server"
    );
    Ok(addr)
}

fn accept_loop(listener: TcpListener, demo: Arc<Demo>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // EMFILE, ECONNABORTED...: skip this one; the next may work.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= CONNS_MAX {
            busy.fetch_sub(1, Ordering::AcqRel);
            continue; // dropped: closed at once
        }
        let (demo, done) = (demo.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("tern-demo-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &demo) {
                    log::debug!("demo page: {e}");
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// An answer: status line text, content type, body.
type Answer = (&'static str, &'static str, Vec<u8>);

fn text(status: &'static str, body: &str) -> Answer {
    (
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

/// Reads one request head, answers it, closes.
fn serve(mut stream: TcpStream, demo: &Demo) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIME_MAX))?;
    stream.set_write_timeout(Some(CLIENT_TIME_MAX))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let answer = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(()); // left before finishing its request
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => break route(&req, demo),
            Ok(httparse::Status::Partial) if head.len() < HEAD_BYTES_MAX => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                break text("431 Request Header Fields Too Large", "request too large\n")
            }
            Err(_) => break text("400 Bad Request", "bad request\n"),
        }
    };
    let (status, content_type, body) = answer;
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; connect-src 'self' ws: wss:\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    stream.write_all(&out)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    if status.starts_with("431") {
        // The rest of the head is unread: closing now would reset the
        // connection, and the client might lose the answer. Read it away
        // (bounded, and within the read timeout) first.
        let mut left = LINGER_BYTES_MAX;
        while left > 0 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
    Ok(())
}

fn route(req: &httparse::Request<'_, '_>, demo: &Demo) -> Answer {
    if req.method != Some("GET") {
        return text("405 Method Not Allowed", "GET only\n");
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/demo/token" {
        return token(query, demo);
    }
    let path = if path == "/index.html" { "/" } else { path };
    match FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, body)) => ("200 OK", content_type, body.to_vec()),
        None => text("404 Not Found", "not found\n"),
    }
}

/// `GET /demo/token?user=U&device=D`: a token for demo user U's device D
/// (default 0) and the WebSocket port, as JSON.
fn token(query: &str, demo: &Demo) -> Answer {
    let mut user = None;
    let mut device = Some(0u32);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("user", v)) => user = v.parse::<u64>().ok(),
            Some(("device", v)) => device = v.parse::<u32>().ok(),
            _ => {}
        }
    }
    let (Some(user), Some(device)) = (user, device) else {
        return text("400 Bad Request", "want ?user=U&device=D\n");
    };
    if !DEMO_USERS.contains(&user) {
        return text("403 Forbidden", "not a demo user\n");
    }
    let expiry = tern::token::now_unix_s() + TOKEN_TTL_S;
    let token = tern::token::mint_device(&demo.secret, user, device, expiry);
    let json = format!(
        "{{\"user\":{user},\"device\":{device},\"token\":\"{token}\",\"ws_port\":{}}}\n",
        demo.ws_port
    );
    ("200 OK", "application/json", json.into_bytes())
}
