//! A simulated client: one user speaking protocol v1 or v2 through the real
//! codec over a simulated socket.
//!
//! It logs in with a real token, sends messages to random users, answers
//! DELIVERED (and sometimes READ) after a random delay, pings when quiet,
//! goes offline and comes back. Its outbox keeps every message until the
//! server ACKs it and resends after a reconnect or a temporary refusal, as
//! the client library does. Everything it receives is checked at once
//! ([`Checker`]); a violation is returned as the run's failure.

use std::collections::VecDeque;
use std::time::Duration;

use super::check::{self, Checker};
use super::hostile::{self, Hostile, Kind};
use crate::io::sim::{Net, ReadState, SockId};
use crate::proto::{self, ByeReason, ErrorCode, Frame, Limits};

/// Decode limits: the simulated server's.
const LIMITS: Limits = Limits {
    frame_bytes_max: super::FRAME_BYTES_MAX,
    body_bytes_max: super::FRAME_BYTES_MAX - 41,
};

/// How a client behaves, for the whole run (the simulator picks it per seed).
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    /// Mean time between a client's actions.
    pub think: Duration,
    /// Per million actions: send a message.
    pub send_per_million: u32,
    /// Per million actions: go offline (close the connection).
    pub leave_per_million: u32,
    /// Longest time offline before reconnecting.
    pub offline_max: Duration,
    /// Longest delay before answering a DELIVER with DELIVERED.
    pub answer_max: Duration,
    /// Per million DELIVERs: also answer READ.
    pub read_per_million: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Offline,
    LoggingIn,
    Online,
}

struct Outgoing {
    client_id: u64,
    to: u64,
    seq: u64,
    /// Written on the current connection (and not refused since).
    sent: bool,
    /// Written at least once before, on any connection: writing it again
    /// is a retry.
    tried: bool,
}

/// One simulated user.
pub struct Client {
    index: u32,
    user: u64,
    /// The protocol version it logs in with: 1, or 2 (idempotent SEND, and
    /// a retry keeps its client_id, as the client library does).
    version: u8,
    token: Vec<u8>,
    state: State,
    sock: Option<SockId>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    next_client_id: u64,
    next_seq: u64,
    outbox: VecDeque<Outgoing>,
    /// DELIVERs to answer: (when, server id, sender, also READ).
    answers: VecDeque<(u64, u64, u64, bool)>,
    /// When the client last wrote, simulated nanoseconds.
    last_write_ns: u64,
    /// Simulated nanoseconds at which it reconnects while offline.
    back_at_ns: u64,
    /// Draining: no new messages, no leaving.
    pub(super) calm: bool,
    /// A hostile client's own PRNG: it also forges receipts. `None` for an
    /// honest client, so honest runs draw nothing from it.
    forge: Option<fastrand::Rng>,
    /// The LOGIN in flight carries a forged token (another user's id under
    /// this user's MAC): the server must refuse it with `bad_token`.
    impostor: bool,
    /// A hostile client's kind and PRNG (see [`hostile`]); `None` for an
    /// honest one, which draws nothing from it.
    hostile: Option<Hostile>,
    /// Bytes that break the wire format were written: the server must
    /// answer ERROR with this code (client id 0) and close. Nothing more
    /// is written on this connection.
    doomed: Option<ErrorCode>,
    /// The fatal ERROR came: nothing may follow it but the close.
    fatal_seen: bool,
    /// `Checker::restarts` when the bad bytes were written: a shard
    /// restart since then may have closed the connection first.
    doomed_restarts: u64,
    /// A slow reader leaves its socket unread until its next turn.
    deaf: bool,
    /// Closed with BYE(`rate_limited`): away until `back_at_ns`, even while
    /// draining.
    rate_closed: bool,
    /// A SEND was refused as `rate_limited`: nothing is written again
    /// before this time, simulated nanoseconds (the server's bucket is per
    /// user, so this outlives the connection).
    resend_at_ns: u64,
}

/// What the world must do after a client acted.
pub struct Next {
    /// When the client wants to act again, simulated nanoseconds.
    pub wake_ns: u64,
}

const PING_EVERY_NS: u64 = 60_000_000_000;

/// Most SENDs a client writes again in one go (at a turn, or at LOGIN_OK);
/// the rest wait for its next turn.
const RESENDS_MAX: u32 = 16;

/// How long a client waits after ERROR(`rate_limited`, client_id) before
/// it writes SENDs again. Retried at every turn (tens of ms apart), a
/// flooder's outbox was refused far faster than the bucket refills, passed
/// `rate_refusals_max` within a second of every reconnect and got
/// BYE(`rate_limited`): about 4 ACKs a second, so 600 messages did not
/// drain in 120 s. A second refills `SENDS_PER_S_MAX` (20), more than the
/// `RESENDS_MAX` (16) it then writes.
const RATE_RETRY_NS: u64 = 1_000_000_000;

const _: () = assert!(RESENDS_MAX <= super::SENDS_PER_S_MAX);

/// Shortest time away after BYE(`rate_limited`), even while draining: the
/// simulated server's `rate_refusals_window_ms` (the default, 10 s). A
/// refusal within the window closes the connection again at once, so a
/// client that came straight back with its outbox would be closed in a
/// loop; the client library backs off too.
const RATE_BYE_AWAY_NS: u64 = 10_000_000_000;

/// A forger forges a receipt on one turn in this many, and a LOGIN on one
/// connect in this many (on average).
const FORGE_EVERY_TURNS: u32 = 4;

/// `token` (`v1.USER.EXPIRY.MAC`) with its user swapped for `other`: a
/// token that claims another user under a MAC that does not cover it.
fn forged_token(token: &[u8], other: u64) -> Vec<u8> {
    let text = String::from_utf8_lossy(token);
    let mut parts: Vec<String> = text.split('.').map(str::to_owned).collect();
    if let Some(user) = parts.get_mut(1) {
        *user = other.to_string();
    }
    parts.join(".").into_bytes()
}

impl Client {
    /// Client `index` for `user`, logging in with `token` and protocol
    /// `version`; with `forge`, a hostile client that also forges receipts
    /// from that PRNG; with `hostile`, one that misbehaves so.
    pub fn new(
        index: u32,
        user: u64,
        version: u8,
        token: String,
        forge: Option<fastrand::Rng>,
        hostile: Option<Hostile>,
    ) -> Client {
        Client {
            index,
            user,
            version,
            token: token.into_bytes(),
            state: State::Offline,
            sock: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            next_client_id: 1,
            next_seq: 1,
            outbox: VecDeque::new(),
            answers: VecDeque::new(),
            last_write_ns: 0,
            back_at_ns: 0,
            calm: false,
            forge,
            impostor: false,
            hostile,
            doomed: None,
            fatal_seen: false,
            doomed_restarts: 0,
            deaf: false,
            rate_closed: false,
            resend_at_ns: 0,
        }
    }

    /// A slow reader that reads on this turn: the world reads its socket
    /// for it now (it skipped the news since its last turn).
    pub fn reads_at_turn(&self) -> bool {
        !self.deaf
            && self
                .hostile
                .as_ref()
                .is_some_and(|h| h.kind == Kind::SlowReader)
    }

    /// True when logged in with nothing outstanding.
    pub fn settled(&self) -> bool {
        self.state == State::Online && self.outbox.is_empty() && self.answers.is_empty()
    }

    /// What keeps the client from being settled, for a failure report.
    pub fn describe(&self) -> String {
        format!(
            "user {} {:?}{}, {} unACKed ({} written), {} answers due",
            self.user,
            self.state,
            match (&self.hostile, self.doomed) {
                (_, Some(code)) => format!(" (waits for ERROR({code}))"),
                (Some(h), None) => format!(" ({:?}, deaf {})", h.kind, self.deaf),
                (None, None) => String::new(),
            },
            self.outbox.len(),
            self.outbox.iter().filter(|o| o.sent).count(),
            self.answers.len()
        )
    }

    /// Messages this client has sent (resends not counted).
    pub fn sent(&self) -> u64 {
        self.next_seq - 1
    }

    /// When the first DELIVERED is due, if any: the client's turn must come
    /// no later.
    pub fn answer_due_ns(&self) -> Option<u64> {
        self.answers.front().map(|a| a.0)
    }

    /// The socket, if connected.
    pub fn sock(&self) -> Option<SockId> {
        self.sock
    }

    fn write(&mut self, net: &Net, frame: &Frame<'_>, now_ns: u64) {
        let Some(sock) = self.sock else { return };
        self.out.clear();
        proto::encode(frame, &mut self.out);
        net.write(sock, &self.out);
        self.last_write_ns = now_ns;
    }

    fn go_offline(
        &mut self,
        net: &Net,
        now_ns: u64,
        behaviour: &Behaviour,
        rng: &mut fastrand::Rng,
    ) {
        self.disconnect(net);
        let away = rng.u64(0..=behaviour.offline_max.as_nanos() as u64);
        self.back_at_ns = now_ns + away;
    }

    fn disconnect(&mut self, net: &Net) {
        self.impostor = false;
        self.doomed = None;
        self.fatal_seen = false;
        self.deaf = false;
        if let Some(sock) = self.sock.take() {
            net.close(sock);
        }
        self.state = State::Offline;
        self.inbuf.clear();
        // The server redelivers what was not answered.
        self.answers.clear();
        for o in &mut self.outbox {
            o.sent = false;
        }
    }

    /// The client's turn: connect, send, answer, ping or leave. Returns when
    /// it wants its next turn.
    // The world's parts it uses, each borrowed separately.
    #[allow(clippy::too_many_arguments)]
    pub fn act(
        &mut self,
        net: &Net,
        shards: usize,
        users: u64,
        now_ns: u64,
        b: &Behaviour,
        rng: &mut fastrand::Rng,
        checker: &mut Checker,
    ) -> Next {
        let think = rng.u64(1..=2 * b.think.as_nanos().max(1) as u64);
        match self.state {
            State::Offline => {
                if now_ns >= self.back_at_ns || (self.calm && !self.rate_closed) {
                    self.rate_closed = false;
                    let sock = net.connect(rng.usize(..shards), self.index);
                    self.sock = Some(sock);
                    self.state = State::LoggingIn;
                    let other = self.user % users + 1;
                    let impostor = !self.calm
                        && other != self.user
                        && self
                            .forge
                            .as_mut()
                            .is_some_and(|r| r.u32(..FORGE_EVERY_TURNS) == 0);
                    let token = if impostor {
                        checker.forged += 1;
                        self.impostor = true;
                        forged_token(&self.token, other)
                    } else {
                        std::mem::take(&mut self.token)
                    };
                    self.write(
                        net,
                        &Frame::Login {
                            version: self.version,
                            token: &token,
                        },
                        now_ns,
                    );
                    if !impostor {
                        self.token = token;
                    }
                    return Next {
                        wake_ns: now_ns + think,
                    };
                }
                return Next {
                    wake_ns: self.back_at_ns,
                };
            }
            State::LoggingIn => {
                return Next {
                    wake_ns: now_ns + think,
                }
            }
            State::Online if self.doomed.is_some() => {
                // Waiting for the fatal ERROR and the close.
                return Next {
                    wake_ns: now_ns + think,
                };
            }
            State::Online => {}
        }
        while self.answers.front().is_some_and(|a| a.0 <= now_ns) {
            let (_, server_id, from, read) = self.answers.pop_front().expect("checked");
            self.write(net, &Frame::Delivered { server_id }, now_ns);
            checker.answered(self.user, server_id, false);
            if read {
                self.write(net, &Frame::Read { server_id, from }, now_ns);
                checker.answered(self.user, server_id, true);
            }
        }
        self.maybe_forge(net, now_ns, checker);
        if self.misbehave(net, now_ns, users, checker) {
            return Next {
                wake_ns: now_ns + think,
            };
        }
        if !self.calm && rng.u32(..1_000_000) < b.leave_per_million {
            self.go_offline(net, now_ns, b, rng);
            return Next {
                wake_ns: self.back_at_ns,
            };
        }
        if !self.calm && rng.u32(..1_000_000) < b.send_per_million {
            let mut to = rng.u64(1..=users);
            if to == self.user {
                to = to % users + 1;
            }
            self.new_message(to, checker);
        }
        self.send_unsent(net, now_ns, checker);
        if now_ns.saturating_sub(self.last_write_ns) >= PING_EVERY_NS {
            self.write(net, &Frame::Ping { nonce: now_ns }, now_ns);
        }
        let mut wake = now_ns + think.min(PING_EVERY_NS);
        if let Some(a) = self.answers.front() {
            wake = wake.min(a.0);
        }
        Next { wake_ns: wake }
    }

    /// Puts a new message to `to` in the outbox.
    fn new_message(&mut self, to: u64, checker: &mut Checker) {
        let seq = self.next_seq;
        self.next_seq += 1;
        checker.sent(self.user, to, seq);
        self.outbox.push_back(Outgoing {
            client_id: self.next_client_id,
            to,
            seq,
            sent: false,
            tried: false,
        });
        self.next_client_id += 1;
    }

    /// A hostile client's misdeed on this turn, if any (never while
    /// draining). Returns `true` when it wrote bytes that break the wire
    /// format: it writes nothing more on this connection.
    fn misbehave(&mut self, net: &Net, now_ns: u64, users: u64, checker: &mut Checker) -> bool {
        let Some(h) = self.hostile.as_mut() else {
            return false;
        };
        if self.calm {
            self.deaf = false;
            return false;
        }
        if h.kind == Kind::SlowReader {
            self.deaf = h.read_every_turns == 0 || h.rng.u32(..h.read_every_turns) != 0;
            return false;
        }
        if h.rng.u32(..hostile::MISBEHAVE_EVERY_TURNS) != 0 {
            return false;
        }
        checker.hostile += 1;
        if h.kind == Kind::Flood {
            let user = self.user;
            let to: Vec<u64> = (0..hostile::FLOOD_SENDS)
                .map(|_| match h.rng.u64(1..=users) {
                    to if to == user => to % users + 1,
                    to => to,
                })
                .collect();
            for to in to {
                self.new_message(to, checker);
            }
            return false;
        }
        let (bytes, code) = hostile::bad_bytes(h.kind, &mut h.rng, &LIMITS);
        if let Some(sock) = self.sock {
            net.write(sock, &bytes);
            self.last_write_ns = now_ns;
            self.doomed = Some(code);
            self.doomed_restarts = checker.restarts;
        }
        true
    }

    /// A forger's turn may send a DELIVERED or READ for a message it never
    /// received (another user's, or an id no message has). The server must
    /// answer ERROR(`unknown_message`, 0) and relay nothing: the checker
    /// fails any RECEIPT the real recipient did not earn.
    fn maybe_forge(&mut self, net: &Net, now_ns: u64, checker: &mut Checker) {
        if self.calm {
            return;
        }
        let Some(rng) = self.forge.as_mut() else {
            return;
        };
        if rng.u32(..FORGE_EVERY_TURNS) != 0 {
            return;
        }
        let (roll, read) = (rng.u64(..), rng.bool());
        let (server_id, from) = checker.forgeable(self.user, roll);
        let frame = if read {
            Frame::Read { server_id, from }
        } else {
            Frame::Delivered { server_id }
        };
        self.write(net, &frame, now_ns);
        checker.forged += 1;
    }

    fn send_unsent(&mut self, net: &Net, now_ns: u64, checker: &mut Checker) {
        if now_ns < self.resend_at_ns {
            return; // backing off after ERROR(rate_limited)
        }
        let mut frames = Vec::new();
        let mut resends = 0;
        for o in self.outbox.iter_mut().filter(|o| !o.sent) {
            if o.tried {
                // Paced: a whole outbox resent at once (after a flood) can
                // pass `rate_refusals_max` before any ACK comes back, and
                // BYE(rate_limited) each time it reconnects.
                if resends == RESENDS_MAX {
                    continue;
                }
                resends += 1;
            }
            o.sent = true;
            if o.tried {
                checker.retries += 1;
            }
            o.tried = true;
            frames.push((o.client_id, o.to, check::body(self.user, o.to, o.seq)));
        }
        for (client_id, to, body) in frames {
            self.write(
                net,
                &Frame::Send {
                    client_id,
                    to,
                    body: &body,
                },
                now_ns,
            );
        }
    }

    /// Reads and handles what the server sent on `sock`.
    // The world's parts it uses, each borrowed separately.
    #[allow(clippy::too_many_arguments)]
    pub fn on_news(
        &mut self,
        sock: SockId,
        net: &Net,
        now_ns: u64,
        b: &Behaviour,
        rng: &mut fastrand::Rng,
        checker: &mut Checker,
        trace: &mut u32,
    ) -> Result<(), String> {
        if self.sock != Some(sock) {
            return Ok(()); // an old connection's leftovers
        }
        if self.deaf {
            return Ok(()); // a slow reader, until its next turn
        }
        let mut inbuf = std::mem::take(&mut self.inbuf);
        let state = net.read(sock, &mut inbuf);
        let mut at = 0;
        let mut result = Ok(());
        while self.sock == Some(sock) {
            let (frame, used) = match proto::decode(&inbuf[at..], &LIMITS) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    result = Err(format!(
                        "user {}: undecodable server output: {e}",
                        self.user
                    ));
                    break;
                }
            };
            *trace = crc32c::crc32c_append(*trace, &inbuf[at..at + used]);
            at += used;
            if let Err(e) = self.on_frame(frame, net, now_ns, b, rng, checker) {
                result = Err(e);
                break;
            }
        }
        inbuf.drain(..at);
        if self.sock == Some(sock) {
            self.inbuf = inbuf;
            if let (ReadState::Eof, Some(code), false, Ok(()), true) = (
                state,
                self.doomed,
                self.fatal_seen,
                &result,
                checker.restarts == self.doomed_restarts,
            ) {
                result = Err(format!(
                    "user {}: connection closed without the documented ERROR({code}, 0) \
                     after bytes that break the wire format",
                    self.user
                ));
            }
            if state != ReadState::Open {
                self.go_offline(net, now_ns, b, rng);
            }
        }
        result
    }

    fn on_frame(
        &mut self,
        frame: Frame<'_>,
        net: &Net,
        now_ns: u64,
        b: &Behaviour,
        rng: &mut fastrand::Rng,
        checker: &mut Checker,
    ) -> Result<(), String> {
        let user = self.user;
        if self.fatal_seen {
            return Err(format!(
                "user {user}: {} after the fatal ERROR, which must end the connection",
                frame.name()
            ));
        }
        match frame {
            // The documented answer to bytes that break the wire format
            // (PROTOCOL.md, "Errors"): ERROR(code, 0), then the close.
            // (A forger's refused receipt may come first.)
            Frame::Error {
                code, client_id: 0, ..
            } if self.doomed.is_some()
                && !(self.forge.is_some()
                    && matches!(code, ErrorCode::UnknownMessage | ErrorCode::RateLimited)) =>
            {
                let expected = self.doomed.expect("checked");
                if code != expected {
                    return Err(format!(
                        "user {user}: got ERROR({code}) for bytes that break the wire format; \
                         documented: {expected}"
                    ));
                }
                self.fatal_seen = true;
                checker.fatal += 1;
            }
            Frame::LoginOk { .. } if self.impostor => {
                return Err(format!(
                    "user {user} logged in with a forged token (another user's id)"
                ));
            }
            // The forged LOGIN refused as documented; the server closes the
            // connection, and the client comes back with its own token.
            Frame::LoginErr {
                code: ErrorCode::BadToken,
                ..
            } if self.impostor => {
                self.disconnect(net);
                self.back_at_ns = now_ns;
            }
            Frame::LoginOk { .. } if self.state == State::LoggingIn => {
                self.state = State::Online;
                self.send_unsent(net, now_ns, checker);
            }
            Frame::LoginErr {
                code: ErrorCode::Unavailable,
                ..
            } => self.go_offline(net, now_ns, b, rng),
            // The server's accept-rate refusal (`accept_rate_per_s_max`): it
            // closes the connection; come back later, as a real client does.
            Frame::Error {
                code: ErrorCode::RateLimited,
                client_id: 0,
                ..
            } if self.state == State::LoggingIn => self.go_offline(net, now_ns, b, rng),
            // A forged receipt refused, as documented (PROTOCOL.md,
            // `unknown_message`); honest clients never earn one. A forger
            // may also pass the per-user DELIVERED/READ rate.
            Frame::Error {
                code: ErrorCode::UnknownMessage | ErrorCode::RateLimited,
                client_id: 0,
                ..
            } if self.forge.is_some() && self.state == State::Online => {}
            Frame::Ack {
                client_id,
                server_id,
                ..
            } => {
                let Some(i) = self.outbox.iter().position(|o| o.client_id == client_id) else {
                    return Err(format!(
                        "user {user}: ACK for unknown client id {client_id}"
                    ));
                };
                let o = self.outbox.remove(i).expect("found");
                checker.acked(user, o.seq, server_id)?;
            }
            Frame::Error {
                code,
                client_id,
                text,
            } if client_id != 0 => {
                let temporary = matches!(
                    code,
                    ErrorCode::StorageFull
                        | ErrorCode::QueueFull
                        | ErrorCode::Unavailable
                        | ErrorCode::Internal
                        | ErrorCode::RateLimited
                );
                let Some(i) = self.outbox.iter().position(|o| o.client_id == client_id) else {
                    return Err(format!(
                        "user {user}: ERROR for unknown client id {client_id}"
                    ));
                };
                // v2: 32 newer SENDs to that recipient's group were taken
                // while this one kept being refused; the server cannot tell
                // whether it took it. Given up, as the client library does
                // (not ACKed, so the checker does not wait for it).
                if code == ErrorCode::StaleClientId && self.version >= proto::VERSION_2 {
                    self.outbox.remove(i);
                    return Ok(());
                }
                let o = &mut self.outbox[i];
                if !temporary {
                    return Err(format!("user {user}: SEND refused with {code}: {text}"));
                }
                // Resent at the client's next turn; after `rate_limited`,
                // not before the bucket has refilled.
                o.sent = false;
                if code == ErrorCode::RateLimited {
                    self.resend_at_ns = now_ns + RATE_RETRY_NS;
                }
            }
            Frame::Deliver {
                server_id,
                from,
                client_id,
                body,
                ..
            } => {
                // A v2 connection gets type 0x0E (with the client_id), a v1
                // connection 0x06.
                if client_id.is_some() != (self.version >= proto::VERSION_2) {
                    return Err(format!(
                        "user {user} (protocol v{}) got DELIVER {server_id} of the other version",
                        self.version
                    ));
                }
                checker.delivered(user, server_id, from, client_id, body)?;
                let due = now_ns + rng.u64(0..=b.answer_max.as_nanos() as u64);
                let read = rng.u32(..1_000_000) < b.read_per_million;
                // Answers go in order; a later DELIVER is answered no sooner.
                let due = self.answers.back().map_or(due, |a| a.0.max(due));
                self.answers.push_back((due, server_id, from, read));
            }
            Frame::Receipt {
                kind,
                server_id,
                peer,
            } => checker.receipt(user, kind, server_id, peer)?,
            Frame::Ping { nonce } => self.write(net, &Frame::Pong { nonce }, now_ns),
            Frame::Pong { .. } => {}
            Frame::Bye { reason } => {
                if matches!(reason, ByeReason::Replaced | ByeReason::Error) {
                    return Err(format!("user {user}: unexpected BYE({reason})"));
                }
                self.go_offline(net, now_ns, b, rng);
                match reason {
                    ByeReason::Slow => checker.slow_byes += 1,
                    ByeReason::RateLimited => checker.rate_byes += 1,
                    _ => {}
                }
                if reason == ByeReason::RateLimited {
                    self.back_at_ns = self.back_at_ns.max(now_ns + RATE_BYE_AWAY_NS);
                    self.rate_closed = true;
                }
            }
            other => {
                return Err(format!(
                    "user {user}: unexpected {} in state {:?}",
                    other.name(),
                    self.state
                ))
            }
        }
        Ok(())
    }
}
