//! A TCP proxy on loopback that delays every byte by a fixed time in each
//! direction: a slow link (long round trip, unlimited bandwidth) where the
//! kernel has no netem.
//!
//! Each direction of each connection is a reader thread, which stamps what
//! it reads with its due time, and a writer thread, which writes it once due.
//! The reader never waits for the writer, so a sender is never held back by
//! the delay itself: what is in flight sits in the proxy, as on a long link.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// A running delaying proxy; stopped (its connections cut) when dropped.
pub struct DelayProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Both ends of every proxied connection, to cut them at the end.
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Proxies connections to `upstream`, delaying each direction by half
    /// of `rtt`.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let one_way = rtt / 2;
        let acceptor = {
            let (stop, streams) = (stop.clone(), streams.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            let server = TcpStream::connect(upstream).expect("proxy upstream");
                            for s in [&client, &server] {
                                s.set_nodelay(true).unwrap();
                                streams.lock().unwrap().push(s.try_clone().unwrap());
                            }
                            pipe(
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                one_way,
                            );
                            pipe(server, client, one_way);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(ACCEPT_POLL)
                        }
                        Err(e) => panic!("proxy accept: {e}"),
                    }
                }
            })
        };
        DelayProxy {
            addr,
            stop,
            streams,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // Readers see end of stream and writers their channel close: every
        // pipe thread ends.
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read; the
/// end of stream is passed on the same way.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // An empty chunk: end of stream, due like the rest.
        let _ = tx.send((Instant::now() + delay, Vec::new()));
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if chunk.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                break;
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
    });
}
