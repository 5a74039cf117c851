//! A session over the frame-level [`Client`]: the hard part of a messaging
//! client, done once.
//!
//! [`Session`] keeps one logged-in connection to a server alive for an app:
//!
//! - **Reconnect** with jittered exponential backoff ("full jitter": a
//!   random wait up to `backoff_min * 2^attempt`, at most `backoff_max`),
//!   so a fleet of clients does not storm a server that just came back.
//! - **Outbox:** every message the app hands to [`Session::send`] is kept in
//!   an [`Outbox`] until the server ACKs it, and resent in order, with its
//!   client id, after every reconnect. Client ids increase per session (the
//!   first is the clock in microseconds, so they also increase across app
//!   restarts). The default [`MemOutbox`] lives in memory; implement the
//!   trait to keep it on disk across app restarts.
//! - **Protocol version 2:** the session logs in with version 2, so a SEND
//!   resent after a lost ACK is answered with its original ACK and stored
//!   once (idempotent SEND), and DELIVERs carry the sender's client id.
//! - **Duplicate filter:** a DELIVER whose server id the app has already
//!   seen (the server re-delivers what was not answered before a drop), or
//!   whose (sender, client id) it has already seen, is not shown again;
//!   one the app already accepted is answered DELIVERED again at once. The
//!   filter remembers the last `dedupe_window` messages.
//! - **DELIVERED** goes only when the app calls [`Session::accept`], so a
//!   crash of the app before it stored a message gets it delivered again.
//! - **Keepalive:** a PING whenever nothing was sent for `keepalive`, so the
//!   server's idle timeout never closes a quiet session.
//! - Everything else comes out of [`Session::poll`] as an [`Event`].
//!
//! Refusals the server documents as temporary (`storage_full`,
//! `queue_full`, `unavailable`, `rate_limited`, `internal`) are retried
//! after a backoff, with the same client id; a message retried that way may
//! arrive after messages the app sent after it. Other refusals
//! (`bad_recipient`, `too_large`, `stale_client_id`: 32 or more newer
//! messages to that recipient's group were taken while this one kept being
//! refused, ...) drop the message from the outbox and come out as
//! [`Event::Refused`].
//!
//! The session is blocking and single-threaded, like [`Client`]: no async
//! runtime. Call [`poll`](Session::poll) in a loop; it connects, resends,
//! reads and pings as needed and returns after at most its timeout.
//!
//! ```no_run
//! use std::time::Duration;
//! use tern_client::session::{Event, Session, SessionConfig};
//!
//! let config = SessionConfig::new("127.0.0.1:5222".parse().unwrap(), "v1.1.1900000000.<mac>");
//! let mut session = Session::new(config);
//! let id = session.send(2, b"hello").unwrap(); // kept until ACKed
//! loop {
//!     match session.poll(Duration::from_secs(1)) {
//!         Ok(Some(Event::Acked { client_id, .. })) if client_id == id => break,
//!         Ok(Some(Event::Message { server_id, body, .. })) => {
//!             println!("{}", String::from_utf8_lossy(&body));
//!             session.accept(server_id).unwrap();
//!         }
//!         Ok(_) => {}
//!         Err(e) => panic!("{e}"),
//!     }
//! }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::ClientConfig;
use tern::proto::{ByeReason, ErrorCode, Frame, OwnedFrame, ReceiptKind, VERSION_2};

use crate::dedupe::Incoming;
use crate::session_state::{Refusal, SessionState};
use crate::{Client, ClientError};

pub use crate::outbox::{is_frame_refusal, is_retryable, MemOutbox, Outbox, Outgoing};

/// Default first reconnect delay bound.
pub const BACKOFF_MIN_DEFAULT: Duration = Duration::from_millis(100);
/// Default largest reconnect delay.
pub const BACKOFF_MAX_DEFAULT: Duration = Duration::from_secs(30);
/// Default keepalive: well under the server's default idle timeout (5 min).
pub const KEEPALIVE_DEFAULT: Duration = Duration::from_secs(60);
/// Default number of server ids the duplicate filter remembers.
pub const DEDUPE_WINDOW_DEFAULT: usize = 4096;

/// How a [`Session`] connects and behaves.
#[derive(Clone)]
pub struct SessionConfig {
    /// The server's client listener.
    pub addr: SocketAddr,
    /// The login token.
    pub token: String,
    /// TLS: the client config (see [`crate::tls_config`]) and the server
    /// name to check. `None`: plaintext.
    pub tls: Option<(Arc<ClientConfig>, String)>,
    /// First reconnect delay bound; doubled per failed attempt.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// A PING goes when nothing was sent for this long.
    pub keepalive: Duration,
    /// Server ids the duplicate filter remembers; at least 1.
    pub dedupe_window: usize,
}

impl SessionConfig {
    /// Plaintext to `addr` with `token` and the defaults.
    pub fn new(addr: SocketAddr, token: &str) -> SessionConfig {
        SessionConfig {
            addr,
            token: token.to_string(),
            tls: None,
            backoff_min: BACKOFF_MIN_DEFAULT,
            backoff_max: BACKOFF_MAX_DEFAULT,
            keepalive: KEEPALIVE_DEFAULT,
            dedupe_window: DEDUPE_WINDOW_DEFAULT,
        }
    }
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("addr", &self.addr)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("keepalive", &self.keepalive)
            .field("dedupe_window", &self.dedupe_window)
            .finish_non_exhaustive()
    }
}

/// What [`Session::poll`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Logged in (again); the session resent its outbox.
    Connected {
        /// Messages queued for this user while it was away.
        offline_count: u64,
    },
    /// The connection dropped; the session reconnects by itself (except
    /// after [`ByeReason::Replaced`]: another login of the same user took
    /// over, and [`Session::reconnect`] must be called to fight for it).
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// The server took the message: one tick.
    Acked {
        /// The app's message.
        client_id: u64,
        /// The server's id for it.
        server_id: u64,
        /// When the server took it, unix milliseconds.
        server_time_ms: u64,
    },
    /// The server refused the message for now (a temporary code); the
    /// session sends it again after a backoff, with the same client id. It
    /// may then arrive after messages sent after it.
    Retrying {
        /// The app's message.
        client_id: u64,
        /// Why.
        code: ErrorCode,
    },
    /// The server refused the message for good; it left the outbox.
    Refused {
        /// The app's message.
        client_id: u64,
        /// Why.
        code: ErrorCode,
        /// The server's words.
        text: String,
    },
    /// A message for the app, shown once. Call [`Session::accept`] once it
    /// is stored, so the server can forget it.
    Message {
        /// The server's id: the key for `accept` and read receipts.
        server_id: u64,
        /// The sender.
        from: u64,
        /// When the server took it, unix milliseconds.
        server_time_ms: u64,
        /// The body.
        body: Vec<u8>,
    },
    /// A delivery or read receipt for a message the app sent.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The message (its server id, from [`Event::Acked`]).
        server_id: u64,
        /// Who received or read it.
        peer: u64,
    },
}

/// Why a session cannot go on by itself.
#[derive(Debug)]
pub enum SessionError {
    /// The server refused the token (bad or expired: set a new one with
    /// [`Session::set_token`]) or the user (`banned` by the operator:
    /// retrying would be refused too until the ban is lifted).
    Login {
        /// The reason code from LOGIN_ERR.
        code: ErrorCode,
        /// The server's words.
        text: String,
    },
    /// The outbox failed to store or forget a message.
    Outbox(io::Error),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Login { code, text } => write!(f, "login refused: {code} ({text})"),
            SessionError::Outbox(e) => write!(f, "outbox: {e}"),
        }
    }
}

impl std::error::Error for SessionError {}

/// Reconnect delays: full jitter over an exponential bound.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// The wait before the next attempt; each call doubles the bound.
    fn next_delay(&mut self) -> Duration {
        let bound = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // splitmix64: no dependency for a little randomness.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let nanos = bound.as_nanos().max(1) as u64;
        Duration::from_nanos(z % nanos)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A self-healing session for one user. See the module docs.
pub struct Session<O: Outbox = MemOutbox> {
    config: SessionConfig,
    /// Outbox, client ids and duplicate filter: the part without I/O.
    state: SessionState<O>,
    conn: Option<Client>,
    events: VecDeque<Event>,
    backoff: Backoff,
    /// When the next connection attempt may start.
    connect_at: Instant,
    /// Refused-for-now messages: resend at that time (while connected).
    retries: VecDeque<(Instant, u64)>,
    /// When the last frame was written.
    last_tx: Instant,
    /// No automatic reconnect (after BYE(replaced)).
    halted: bool,
}

impl<O: Outbox> fmt::Debug for Session<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .field("connected", &self.conn.is_some())
            .field("outbox", &self.state.outbox().len())
            .field("next_client_id", &self.state.next_client_id())
            .field("halted", &self.halted)
            .finish_non_exhaustive()
    }
}

impl Session<MemOutbox> {
    /// A session with an in-memory outbox. It connects at the first
    /// [`poll`](Session::poll).
    pub fn new(config: SessionConfig) -> Session<MemOutbox> {
        Session::with_outbox(config, MemOutbox::default())
    }
}

impl<O: Outbox> Session<O> {
    /// A session over `outbox`: its messages are resent at the first
    /// connection, and new client ids continue above its last one.
    pub fn with_outbox(config: SessionConfig, outbox: O) -> Session<O> {
        let state = SessionState::new(outbox, now_us() + 1, config.dedupe_window);
        let now = Instant::now();
        Session {
            backoff: Backoff {
                min: config.backoff_min,
                max: config.backoff_max,
                attempt: 0,
                rng: state.next_client_id(),
            },
            state,
            config,
            conn: None,
            events: VecDeque::new(),
            connect_at: now,
            retries: VecDeque::new(),
            last_tx: now,
            halted: false,
        }
    }

    /// Hands a message to the session: kept in the outbox, sent now if
    /// connected, resent after reconnects until ACKed. Returns its client id
    /// (see [`Event::Acked`]).
    pub fn send(&mut self, to: u64, body: &[u8]) -> Result<u64, SessionError> {
        let client_id = self.state.send(to, body).map_err(SessionError::Outbox)?;
        self.write(&Frame::Send {
            client_id,
            to,
            body,
        });
        Ok(client_id)
    }

    /// The app stored message `server_id`: the server may forget it
    /// (DELIVERED). If the connection is down, the server delivers it again
    /// after the reconnect and the session answers for the app.
    pub fn accept(&mut self, server_id: u64) -> Result<(), SessionError> {
        self.state.accept(server_id);
        self.write(&Frame::Delivered { server_id });
        Ok(())
    }

    /// Tells `from`, the sender of `server_id`, that the user read it.
    pub fn read(&mut self, server_id: u64, from: u64) {
        self.write(&Frame::Read { server_id, from });
    }

    /// Messages handed to [`send`](Session::send) and not yet ACKed.
    pub fn outbox_len(&self) -> usize {
        self.state.outbox().len()
    }

    /// The outbox.
    pub fn outbox(&self) -> &O {
        self.state.outbox()
    }

    /// Whether a connection is logged in right now.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Replaces the login token (after [`SessionError::Login`]); the next
    /// connection uses it.
    pub fn set_token(&mut self, token: &str) {
        self.config.token = token.to_string();
        self.halted = false;
    }

    /// Drops the connection now and reconnects after a backoff (also
    /// resumes a session halted by BYE(replaced)).
    pub fn reconnect(&mut self) {
        self.halted = false;
        self.drop_conn("reconnect asked by the app".to_string());
    }

    /// Drives the session for up to `timeout`: connects when due, resends,
    /// reads, pings. Returns the next event, or `None` if nothing happened.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<Event>, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut first = true;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let now = Instant::now();
            // At least one look, then no longer than asked, even while
            // frames that are not events (PONGs) keep coming.
            if !first && now >= deadline {
                return Ok(None);
            }
            first = false;
            if self.conn.is_none() {
                if self.halted {
                    return Ok(None);
                }
                if now >= self.connect_at {
                    self.connect()?;
                    continue;
                }
                if now >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(self.connect_at.min(deadline) - now);
                continue;
            }
            self.resend_due(now);
            if now.duration_since(self.last_tx) >= self.config.keepalive {
                self.write(&Frame::Ping { nonce: 0 });
            }
            let keepalive_at = self.last_tx + self.config.keepalive;
            let mut wait = deadline.min(keepalive_at).saturating_duration_since(now);
            if let Some(&(at, _)) = self.retries.front() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            let Some(conn) = self.conn.as_mut() else {
                continue; // a write failed above
            };
            match conn.recv_timeout(wait) {
                Ok(Some(frame)) => self.on_frame(frame)?,
                Ok(None) => {
                    if Instant::now() >= deadline && self.events.is_empty() {
                        return Ok(None);
                    }
                }
                Err(e) => self.drop_conn(e.to_string()),
            }
        }
    }

    fn connect(&mut self) -> Result<(), SessionError> {
        // Version 2: a resent SEND is idempotent, DELIVERs carry client ids.
        let attempt = match &self.config.tls {
            None => Client::login_version(self.config.addr, &self.config.token, VERSION_2),
            Some((tls, name)) => {
                Client::connect_tls(self.config.addr, name, tls).and_then(|mut c| {
                    let info = c.login_here_version(&self.config.token, VERSION_2)?;
                    Ok((c, info))
                })
            }
        };
        match attempt {
            Ok((conn, info)) => {
                self.conn = Some(conn);
                self.backoff.reset();
                self.retries.clear();
                self.last_tx = Instant::now();
                self.events.push_back(Event::Connected {
                    offline_count: info.offline_count,
                });
                // Everything not ACKed goes again, in order, same ids.
                for m in self.state.resend() {
                    self.write(&Frame::Send {
                        client_id: m.client_id,
                        to: m.to,
                        body: &m.body,
                    });
                }
                Ok(())
            }
            Err(ClientError::LoginRejected { code, text })
                if matches!(
                    code,
                    ErrorCode::BadToken | ErrorCode::TokenExpired | ErrorCode::Banned
                ) =>
            {
                self.halted = true;
                Err(SessionError::Login { code, text })
            }
            Err(e) => {
                self.connect_at = Instant::now() + self.backoff.next_delay();
                self.events.push_back(Event::Disconnected {
                    reason: format!("connect: {e}"),
                });
                Ok(())
            }
        }
    }

    fn drop_conn(&mut self, reason: String) {
        if self.conn.take().is_some() {
            self.connect_at = Instant::now() + self.backoff.next_delay();
            self.events.push_back(Event::Disconnected { reason });
        }
    }

    /// Writes a frame if connected; a failed write drops the connection
    /// (what was not ACKed goes again after the reconnect).
    fn write(&mut self, frame: &Frame<'_>) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.send_frame(frame) {
            Ok(()) => self.last_tx = Instant::now(),
            Err(e) => self.drop_conn(format!("write: {e}")),
        }
    }

    fn resend_due(&mut self, now: Instant) {
        while let Some(&(at, client_id)) = self.retries.front() {
            if at > now {
                break;
            }
            self.retries.pop_front();
            if let Some(m) = self.state.pending(client_id) {
                self.write(&Frame::Send {
                    client_id,
                    to: m.to,
                    body: &m.body,
                });
            }
        }
    }

    fn on_frame(&mut self, frame: OwnedFrame) -> Result<(), SessionError> {
        match frame {
            OwnedFrame::Ack {
                client_id,
                server_id,
                server_time_ms,
            } => {
                self.state.on_ack(client_id).map_err(SessionError::Outbox)?;
                self.events.push_back(Event::Acked {
                    client_id,
                    server_id,
                    server_time_ms,
                });
            }
            OwnedFrame::Error {
                code,
                client_id,
                text,
            } if client_id != 0 => {
                match self
                    .state
                    .on_refused(client_id, code)
                    .map_err(SessionError::Outbox)?
                {
                    Refusal::Retry => {
                        let delay = self.config.backoff_min.max(Duration::from_millis(10));
                        self.retries.push_back((Instant::now() + delay, client_id));
                        self.events.push_back(Event::Retrying { client_id, code });
                    }
                    Refusal::Final(_) => self.events.push_back(Event::Refused {
                        client_id,
                        code,
                        text,
                    }),
                }
            }
            // A READ, DELIVERED or PING the server did not take (over its
            // rate, or naming a message not delivered on this connection):
            // the connection stays, and so does the message on the server.
            OwnedFrame::Error { code, .. } if is_frame_refusal(code) => {}
            OwnedFrame::Error { code, text, .. } => {
                self.drop_conn(format!("server error {code}: {text}"));
            }
            OwnedFrame::Deliver {
                server_id,
                from,
                server_time_ms,
                client_id,
                body,
            } => match self.state.on_deliver(server_id, from, client_id) {
                Incoming::Show => self.events.push_back(Event::Message {
                    server_id,
                    from,
                    server_time_ms,
                    body,
                }),
                Incoming::AnswerDelivered => self.write(&Frame::Delivered { server_id }),
                Incoming::Ignore => {}
            },
            OwnedFrame::Receipt {
                kind,
                server_id,
                peer,
            } => self.events.push_back(Event::Receipt {
                kind,
                server_id,
                peer,
            }),
            OwnedFrame::Bye { reason } => {
                if reason == ByeReason::Replaced {
                    self.halted = true;
                }
                self.drop_conn(format!("server said BYE({reason})"));
            }
            // PONG answers our keepalive; anything else is not for a
            // logged-in client and is ignored.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_under_a_doubling_bound() {
        let mut b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
            attempt: 0,
            rng: 7,
        };
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for bound in bounds {
            let d = b.next_delay();
            assert!(d < Duration::from_millis(bound), "{d:?} >= {bound} ms");
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
        // Not all the same: the jitter spreads a fleet out.
        let spread: std::collections::HashSet<u128> = (0..20)
            .map(|_| {
                b.reset();
                b.next_delay().as_nanos()
            })
            .collect();
        assert!(spread.len() > 10);
    }
}
