//! A push gateway for the push tests (`tests/push.rs`,
//! `tests/push_figures.rs`): a std HTTP/1.1 server on a loopback port that
//! records every request and answers as the test scripts it.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::WAIT;

/// Largest request the gateway reads.
const REQUEST_BYTES_MAX: usize = 1 << 20;

/// How the gateway answers one request.
pub enum Answer {
    /// With this status at once.
    Status(u16),
    /// With 200 once the sender is dropped or sends.
    Hold(Receiver<()>),
}

/// One request the gateway got.
#[derive(Debug)]
pub struct Request {
    /// `POST`.
    pub method: String,
    /// The request target.
    pub path: String,
    /// Header names in lowercase.
    pub headers: HashMap<String, String>,
    /// The body, `Content-Length` bytes.
    pub body: Vec<u8>,
}

impl Request {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// (user, device, waiting, oldest_ms) of each notice.
    pub fn notices(&self) -> Vec<(u64, u64, u64, u64)> {
        self.json()["notices"]
            .as_array()
            .expect("notices is an array")
            .iter()
            .map(|n| {
                let f = |k: &str| n[k].as_u64().unwrap_or_else(|| panic!("{k} in {n}"));
                (f("user"), f("device"), f("waiting"), f("oldest_ms"))
            })
            .collect()
    }

    /// Users named, in order.
    pub fn users(&self) -> Vec<u64> {
        self.notices().iter().map(|n| n.0).collect()
    }
}

/// A push gateway on a loopback port: answers each request with the next
/// scripted [`Answer`] (200 once the script is used up) and hands the
/// request to the test before answering.
pub struct Gateway {
    addr: SocketAddr,
    requests: Receiver<Request>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Gateway {
    pub fn start() -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::channel();
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (script, stop) = (script.clone(), stop.clone());
            std::thread::spawn(move || serve(listener, &tx, &script, &stop))
        };
        Gateway {
            addr,
            requests,
            script,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/push", self.addr)
    }

    /// Answers the next requests these ways, in order.
    pub fn then(&self, answer: Answer) {
        self.script.lock().unwrap().push_back(answer);
    }

    /// The next request; panics after [`WAIT`].
    pub fn next(&self) -> Request {
        self.requests
            .recv_timeout(WAIT)
            .expect("a push request within WAIT")
    }

    /// Requests until one names `user`; returns them all.
    pub fn until_user(&self, user: u64) -> Vec<Request> {
        let mut seen = Vec::new();
        while !seen
            .last()
            .is_some_and(|r: &Request| r.users().contains(&user))
        {
            seen.push(self.next());
        }
        seen
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: TcpListener,
    tx: &Sender<Request>,
    script: &Mutex<VecDeque<Answer>>,
    stop: &AtomicBool,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else { continue };
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let Some(request) = read_request(&stream) else {
            continue;
        };
        let answer = script.lock().unwrap().pop_front();
        if tx.send(request).is_err() {
            return;
        }
        let status = match answer {
            None => 200,
            Some(Answer::Status(s)) => s,
            Some(Answer::Hold(release)) => {
                let _ = release.recv();
                200
            }
        };
        // `Connection: close`: one request per connection, so the server
        // never finds a pooled connection closed under it.
        let _ = (&stream).write_all(
            format!("HTTP/1.1 {status} Scripted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
    }
}

/// One HTTP/1.1 request with a `Content-Length` body.
fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    assert!(len <= REQUEST_BYTES_MAX, "request of {len} bytes");
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}
