//! A TCP proxy on loopback that cuts each connection after a random number
//! of bytes in either direction, so cuts fall before, inside and after
//! frames, including between the server's commit and the ACK reaching the
//! client. Each direction of each connection is one thread; the budget of
//! bytes is shared by both.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A proxy that forwards both ways and cuts each connection after a random
/// number of bytes in either direction (so cuts fall before, inside and
/// after frames, including between the server's commit and the ACK reaching
/// the client). Stops after `cuts_max` cuts: then it only forwards.
pub struct CuttingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Cuts made so far.
    pub cuts: Arc<AtomicU64>,
    acceptor: Option<JoinHandle<()>>,
}

impl CuttingProxy {
    /// Proxies to `upstream` (connected anew for each client connection,
    /// so the server may restart behind it), cutting up to `cuts_max`
    /// times, at points drawn from `seed`.
    pub fn start(upstream: SocketAddr, seed: u64, cuts_max: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), cuts.clone());
        let acceptor = std::thread::spawn(move || {
            let mut rng = seed;
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                rng = splitmix(rng);
                // Cut after 1..400 bytes of either direction (a login is
                // ~70, a message ~25), while cuts remain to be made.
                let budget = if c.load(Ordering::Relaxed) < cuts_max {
                    1 + rng % 400
                } else {
                    u64::MAX
                };
                let left = Arc::new(AtomicU64::new(budget));
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let (left, c, s) = (left.clone(), c.clone(), s.clone());
                    std::thread::spawn(move || pump(from, to, &left, &c, &s));
                }
            }
        });
        CuttingProxy {
            addr,
            stop,
            cuts,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// splitmix64.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Copies `from` to `to` until either closes or the shared byte budget of
/// the connection runs out; then cuts both ways.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    left: &AtomicU64,
    cuts: &AtomicU64,
    stop: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let budget = left.load(Ordering::Relaxed);
        if budget != u64::MAX {
            let take = (n as u64).min(budget) as usize;
            left.fetch_sub(take as u64, Ordering::Relaxed);
            let _ = to.write_all(&buf[..take]);
            if take < n || budget == take as u64 {
                cuts.fetch_add(1, Ordering::Relaxed);
                break;
            }
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
