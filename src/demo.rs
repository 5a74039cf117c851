//! `tern serve --demo`: two built-in clients exchange a message through the
//! running server and print each tick, so a first run shows it working.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tern::proto::{self, Frame, OwnedFrame};

const ALICE: u64 = 1001;
const BOB: u64 = 1002;

/// Runs the exchange and logs the outcome; never panics the server.
pub fn run(addr: SocketAddr, secret: &[u8]) {
    match exchange(addr, secret) {
        Ok(()) => log::info!("demo: all four ticks seen; the server works. Ctrl-C to stop."),
        Err(e) => log::error!("demo failed: {e}"),
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn login(addr: SocketAddr, secret: &[u8], user: u64) -> std::io::Result<Conn> {
        let token = tern::token::mint(secret, user, tern::token::now_unix_s() + 300);
        let mut conn = Conn {
            stream: TcpStream::connect(addr)?,
            buf: Vec::new(),
        };
        conn.stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.send(&Frame::Login {
            version: proto::VERSION,
            token: token.as_bytes(),
        })?;
        match conn.recv()? {
            OwnedFrame::LoginOk { .. } => Ok(conn),
            other => Err(std::io::Error::other(format!("login answered {other:?}"))),
        }
    }

    fn send(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        let mut out = Vec::new();
        proto::encode(frame, &mut out);
        self.stream.write_all(&out)
    }

    fn recv(&mut self) -> std::io::Result<OwnedFrame> {
        loop {
            match proto::decode(&self.buf, &proto::Limits::default()) {
                Ok(Some((frame, used))) => {
                    let frame = frame.to_owned();
                    self.buf.drain(..used);
                    return Ok(frame);
                }
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn exchange(addr: SocketAddr, secret: &[u8]) -> std::io::Result<()> {
    let mut alice = Conn::login(addr, secret, ALICE)?;
    let mut bob = Conn::login(addr, secret, BOB)?;
    log::info!("demo: users {ALICE} and {BOB} logged in");
    alice.send(&Frame::Send {
        client_id: 1,
        to: BOB,
        body: b"hello from the demo",
    })?;
    let ack = alice.recv()?;
    log::info!("demo: {ALICE} got {ack:?}  (one tick: the server has it)");
    let server_id = match bob.recv()? {
        OwnedFrame::Deliver {
            server_id, body, ..
        } => {
            log::info!(
                "demo: {BOB} got DELIVER {:?}",
                String::from_utf8_lossy(&body)
            );
            server_id
        }
        other => {
            return Err(std::io::Error::other(format!(
                "expected DELIVER, got {other:?}"
            )))
        }
    };
    bob.send(&Frame::Delivered { server_id })?;
    log::info!("demo: {ALICE} got {:?}  (two ticks)", alice.recv()?);
    bob.send(&Frame::Read {
        server_id,
        from: ALICE,
    })?;
    log::info!("demo: {ALICE} got {:?}  (blue ticks)", alice.recv()?);
    Ok(())
}
