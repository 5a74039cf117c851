//! Connection bookkeeping: the shard's half of every connection (buffers,
//! TLS), accepting, decoding frames from the bytes the backend handed out,
//! writing and flushing output, back-pressure and lingering close,
//! WebSocket framing. The protocol half of a connection lives in
//! [`crate::session`].

use std::time::Duration;

use crate::io::{ConnId, Listener};
use crate::limit::addr::Refusal;
use crate::mqtt::bridge::{Inflight, Mode as MqttMode};
use crate::proto::{self, ByeReason, ErrorCode, Frame};
use crate::session::{self, Event, Flow, State};
use crate::tls::TlsConn;
use crate::upgrade::{
    self,
    state::{Carried, Transport},
};
use crate::ws::{self, WsRx};

use super::{Msg, Shard};

/// Buffers of one connection; held only while a frame is partial or
/// output is pending, given back to [`Conns`]'s spares when drained.
#[derive(Default)]
pub(super) struct Bufs {
    inp: Vec<u8>,
    out: Vec<u8>,
    /// TLS connections: plaintext written since the last flush; encrypted
    /// into `out` by the flush. Always empty on plaintext connections.
    plain: Vec<u8>,
    /// Bytes of `out` already sent.
    out_sent: usize,
    /// WebSocket connections: a partial frame or fragmented message.
    /// Idle (no allocation) otherwise.
    ws: WsRx,
    /// MQTT connections: input not yet mapped (a partial packet, or
    /// packets held back while the connection is blocked).
    pub(super) mqtt_in: Vec<u8>,
    /// MQTT connections: deliveries waiting for their PUBACK.
    pub(super) inflight: Inflight,
}

impl Bufs {
    /// Whether nothing but drained buffers is left (they may go).
    fn is_idle(&self) -> bool {
        self.inp.is_empty()
            && self.ws.is_idle()
            && self.mqtt_in.is_empty()
            && self.inflight.is_empty()
    }
}

/// A connection's WebSocket stage; one byte per connection, kept beside
/// the slots (the slot has no spare byte).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum WsMode {
    /// Not a WebSocket connection.
    #[default]
    No,
    /// From the TLS listener, nothing decrypted yet: the first plaintext
    /// bytes tell a WebSocket upgrade (wss) from a Tern LOGIN.
    Detect,
    /// From the WebSocket listener, reading the HTTP upgrade (in `inp`).
    Handshake,
    /// Upgraded: output is wrapped in binary messages.
    Open,
    /// A close frame or an HTTP refusal was sent: nothing more may be.
    Closed,
}

/// The shard's per-connection slot. Kept small: an idle connection is this
/// plus the session layer's slot, one timer entry and (when logged in) one
/// entry in the online map.
#[derive(Default)]
pub(super) struct Slot {
    bufs: Option<Box<Bufs>>,
    /// TLS state of a connection from the TLS listener.
    tls: Option<Box<TlsConn>>,
}

/// Bytes of the shard's per-connection slot (16).
pub(super) const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

// Two pointers: with the session layer's 24-byte slot, the 40 bytes the
// single slot took before the layers were split.
const _: () = assert!(SLOT_BYTES <= 16);
const _: () = assert!(SLOT_BYTES + crate::session::SLOT_BYTES <= 40);

impl Slot {
    fn out_pending(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b.out.len() - b.out_sent + b.plain.len())
    }
}

/// Every connection's slot, and the connections the loop must revisit.
#[derive(Default)]
pub(super) struct Conns {
    slots: Vec<Slot>,
    /// Each connection's WebSocket stage, by slot index (grown with
    /// `slots`).
    ws: Vec<WsMode>,
    /// Each MQTT connection's state, by slot index (grown only as far as
    /// the highest slot an MQTT connection took; the default is "not
    /// MQTT").
    mqtt: Vec<MqttMode>,
    /// Connections with output to flush this iteration (may repeat; the
    /// flush sorts them and drops repeats).
    dirty: Vec<ConnId>,
    /// Connections stopped by back-pressure, retried each iteration.
    blocked: Vec<ConnId>,
    /// Drained buffers kept for the next connection with traffic, at most
    /// [`SPARE_BUFS_MAX`], each with at most [`SPARE_BUF_BYTES_MAX`] of
    /// capacity: a busy connection's buffers go idle and come back every
    /// iteration, and reusing them keeps steady traffic from allocating.
    // Boxed: a slot holds `Box<Bufs>` (a slot stays 16 bytes), and reusing
    // the box saves its allocation too.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Bufs>>,
}

/// Most drained buffer sets kept for reuse per shard.
const SPARE_BUFS_MAX: usize = 32;
/// Carried connections a shard installs at most per loop iteration
/// (live upgrade, successor).
const ADOPT_PER_ITERATION: usize = 256;
/// Carried connections that could not be installed are logged once per
/// this many.
const ADOPT_FAILED_LOG_EVERY: u64 = 1024;
/// Largest capacity (input, output and TLS plaintext together) of a buffer
/// set kept for reuse, bytes: so the spares hold at most 1 MiB per shard,
/// and a burst's large buffers are freed, not kept.
const SPARE_BUF_BYTES_MAX: usize = 32 * 1024;

impl Conns {
    /// Bytes written to `conn` and not yet sent.
    pub(super) fn out_pending(&self, conn: ConnId) -> usize {
        self.slots.get(conn.index()).map_or(0, Slot::out_pending)
    }

    /// Whether `conn` holds buffers: a partial frame read or output not
    /// yet sent (an idle connection holds none).
    pub(super) fn has_bufs(&self, conn: ConnId) -> bool {
        self.slots
            .get(conn.index())
            .is_some_and(|s| s.bufs.is_some())
    }

    /// Whether `conn` came through the TLS listener.
    pub(super) fn is_tls(&self, conn: ConnId) -> bool {
        self.slots
            .get(conn.index())
            .is_some_and(|s| s.tls.is_some())
    }

    /// Whether `conn` speaks WebSocket (from the WebSocket listener, or an
    /// upgrade on the TLS listener).
    pub(super) fn is_ws(&self, conn: ConnId) -> bool {
        !matches!(self.ws_mode(conn), WsMode::No | WsMode::Detect)
    }

    fn ws_mode(&self, conn: ConnId) -> WsMode {
        self.ws.get(conn.index()).copied().unwrap_or_default()
    }

    /// `conn`'s MQTT state, if it came through the MQTT listener.
    pub(super) fn mqtt_mode(&self, conn: ConnId) -> Option<MqttMode> {
        self.mqtt.get(conn.index()).copied().filter(|m| m.is_mqtt())
    }

    /// Whether `conn` came through the MQTT listener.
    pub(super) fn is_mqtt(&self, conn: ConnId) -> bool {
        self.mqtt_mode(conn).is_some()
    }

    /// Sets `conn`'s MQTT state (the default: not MQTT).
    pub(super) fn set_mqtt(&mut self, conn: ConnId, mode: MqttMode) {
        if mode.is_mqtt() {
            session::grow_slots(&mut self.mqtt, conn.index());
        }
        if let Some(m) = self.mqtt.get_mut(conn.index()) {
            *m = mode;
        }
    }

    /// Whether `conn` has decoded input waiting (blocked by back-pressure).
    pub(super) fn frames_waiting(&self, conn: ConnId) -> bool {
        self.bufs_of(conn).is_some_and(|b| !b.inp.is_empty())
    }

    /// `conn`'s buffers, if it has some.
    pub(super) fn bufs_of(&self, conn: ConnId) -> Option<&Bufs> {
        self.slots.get(conn.index())?.bufs.as_deref()
    }

    /// `conn`'s buffers, made when it has none.
    pub(super) fn bufs_mut(&mut self, conn: ConnId) -> &mut Bufs {
        self.bufs(conn)
    }

    /// Takes `conn`'s deliveries waiting for PUBACK (to put back with
    /// `bufs_mut` when some are left).
    pub(super) fn take_inflight(&mut self, conn: ConnId) -> Inflight {
        self.slots
            .get_mut(conn.index())
            .and_then(|s| s.bufs.as_mut())
            .map(|b| std::mem::take(&mut b.inflight))
            .unwrap_or_default()
    }

    fn set_ws(&mut self, conn: ConnId, mode: WsMode) {
        if let Some(m) = self.ws.get_mut(conn.index()) {
            *m = mode;
        }
    }

    /// Puts a handed-over connection's partial WebSocket input back.
    pub(super) fn set_rx(&mut self, conn: ConnId, rx: WsRx) {
        self.bufs(conn).ws = rx;
    }

    fn mark_dirty(&mut self, conn: ConnId) {
        if self.dirty.last() != Some(&conn) {
            self.dirty.push(conn);
        }
    }

    /// Gives back the capacity of the revisit lists beyond `keep_bytes`
    /// each, when they are empty.
    pub(super) fn trim(&mut self, keep_bytes: usize) {
        crate::memory::trim_vec(&mut self.dirty, keep_bytes);
        crate::memory::trim_vec(&mut self.blocked, keep_bytes);
    }

    /// Forgets every connection (after a crash).
    pub(super) fn clear(&mut self) {
        self.slots.clear();
        self.ws.clear();
        self.mqtt.clear();
        self.dirty.clear();
        self.blocked.clear();
        self.spare.clear();
    }

    /// The buffers of `conn`, taken from the spares when it has none.
    fn bufs(&mut self, conn: ConnId) -> &mut Bufs {
        let Conns { slots, spare, .. } = self;
        slots[conn.index()]
            .bufs
            .get_or_insert_with(|| spare.pop().unwrap_or_default())
    }

    /// Takes `conn`'s drained buffers back into the spares (or frees them).
    fn recycle(&mut self, conn: ConnId) {
        let Some(mut b) = self.slots[conn.index()].bufs.take() else {
            return;
        };
        let bytes = b.inp.capacity() + b.out.capacity() + b.plain.capacity();
        if self.spare.len() < SPARE_BUFS_MAX && bytes <= SPARE_BUF_BYTES_MAX {
            debug_assert!(b.is_idle() && b.out.is_empty() && b.plain.is_empty());
            b.out_sent = 0;
            self.spare.push(b);
        }
    }
}

impl Shard {
    pub(super) fn on_accept(&mut self, conn: ConnId, which: Listener) {
        self.stats.accepted.inc();
        // Taken first: the backend keeps it only until asked.
        let ip = self.io.peer_ip(conn);
        let now = self.clock.now();
        if now.duration_since(self.accept_window.0) >= Duration::from_secs(1) {
            self.accept_window = (now, 0);
        }
        self.accept_window.1 += 1;
        let rate_max = self.config.accept_rate_per_s_max;
        if self.drain.is_some() {
            // Taken out of service: the client is told to go elsewhere.
            self.stats.rejected.inc();
            self.refuse_frame(
                conn,
                which,
                &Frame::Bye {
                    reason: ByeReason::Moving,
                },
            );
            return;
        }
        let refuse = if self.io.len() > self.conns_max {
            Some((ErrorCode::ServerFull, "server is at its connection limit"))
        } else if rate_max != 0 && self.accept_window.1 > rate_max {
            Some((
                ErrorCode::RateLimited,
                "too many new connections, retry later",
            ))
        } else {
            None
        };
        if let Some((code, text)) = refuse {
            self.stats.rejected.inc();
            self.refuse(conn, which, code, text);
            return;
        }
        if let Err(why) = self.admission.check(ip, self.now.unix_ms) {
            let (counter, text) = match why {
                Refusal::Banned => (
                    &self.stats.addr_refused_banned,
                    "too many failed logins from your address, retry later",
                ),
                Refusal::Rate => (
                    &self.stats.addr_refused_rate,
                    "too many new connections from your address, retry later",
                ),
                Refusal::Pending => (
                    &self.stats.addr_refused_pending,
                    "too many connections from your address not logged in",
                ),
                Refusal::Table => (
                    &self.stats.addr_refused_table,
                    "too many addresses connecting, retry later",
                ),
            };
            counter.inc();
            self.stats.rejected.inc();
            log::debug!(
                "shard {}: connection from {ip:?} refused: {}",
                self.id,
                why.as_str()
            );
            self.refuse(conn, which, ErrorCode::RateLimited, text);
            return;
        }
        let tls = match which {
            Listener::Plain | Listener::Ws | Listener::Mqtt => None,
            Listener::Tls | Listener::MqttTls => match self.tls.as_ref().map(|t| t.accept()) {
                Some(Ok(tls)) => Some(Box::new(tls)),
                other => {
                    log::warn!(
                        "shard {}: TLS connection refused: {:?}",
                        self.id,
                        other.map(|r| r.err())
                    );
                    self.stats.tls_failures.inc();
                    self.admission.cancel(ip, self.now.unix_ms);
                    self.io.close(conn);
                    return;
                }
            },
        };
        if let Some(old) = self.admission.evict(self.now.unix_ms) {
            self.evict(old);
        }
        let ws = match which {
            Listener::Ws => WsMode::Handshake,
            Listener::Tls => WsMode::Detect,
            Listener::Plain | Listener::Mqtt | Listener::MqttTls => WsMode::No,
        };
        let mqtt = match which {
            Listener::Mqtt | Listener::MqttTls => MqttMode::accepted(),
            _ => MqttMode::default(),
        };
        self.open_conn(conn, tls, ws, mqtt);
        self.admission.pending(conn, ip);
        self.stats.pending.set(self.admission.len() as u64);
    }

    /// Refuses a connection at accept: `ERROR(code, 0, text)` and close
    /// (TLS connections are closed without a word: a plaintext ERROR means
    /// nothing to a TLS client).
    fn refuse(&mut self, conn: ConnId, which: Listener, code: ErrorCode, text: &str) {
        let frame = Frame::Error {
            code,
            client_id: 0,
            text,
        };
        self.refuse_frame(conn, which, &frame);
    }

    /// Closes `conn` at accept, after `frame` on plaintext (TLS and
    /// WebSocket connections are closed without one: there is no session
    /// to carry it).
    fn refuse_frame(&mut self, conn: ConnId, which: Listener, frame: &Frame<'_>) {
        if which == Listener::Plain {
            self.frame_buf.clear();
            proto::encode(frame, &mut self.frame_buf);
            let _ = self.io.send(conn, &self.frame_buf);
        }
        self.io.close(conn);
    }

    /// Closes `conn`, not logged in, to make room for a new connection
    /// under `pending_max`: `ERROR(server_full)` on plaintext, then close.
    fn evict(&mut self, conn: ConnId) {
        self.stats.pending_evicted.inc();
        let plain = self.conns.slots[conn.index()].tls.is_none();
        if plain && self.sessions.state(conn) == State::Login {
            self.frame_buf.clear();
            proto::encode(
                &Frame::Error {
                    code: ErrorCode::ServerFull,
                    client_id: 0,
                    text: "too many connections waiting to log in; yours waited longest",
                },
                &mut self.frame_buf,
            );
            let frame = std::mem::take(&mut self.frame_buf);
            self.write_bytes(conn, &frame);
            self.frame_buf = frame;
        }
        self.event(Event::Failed(conn));
    }

    /// `conn` no longer waits for its LOGIN (logged in, moved, or closed).
    pub(super) fn pending_end(&mut self, conn: ConnId) {
        self.admission.end(conn, self.now.unix_ms);
        self.stats.pending.set(self.admission.len() as u64);
    }

    /// Takes `conn` (accepted or attached) into a fresh slot, waiting for
    /// its LOGIN. An MQTT connection's deliveries wait for its inbox
    /// subscription (docs/MQTT.md).
    pub(super) fn open_conn(
        &mut self,
        conn: ConnId,
        tls: Option<Box<TlsConn>>,
        ws: WsMode,
        mqtt: MqttMode,
    ) {
        session::grow_slots(&mut self.conns.slots, conn.index());
        session::grow_slots(&mut self.conns.ws, conn.index());
        self.conns.slots[conn.index()] = Slot { bufs: None, tls };
        self.conns.ws[conn.index()] = ws;
        self.conns.set_mqtt(conn, mqtt);
        self.event(Event::Opened(conn));
        if mqtt.is_mqtt() && !mqtt.inbox() {
            self.event(Event::Deliveries { conn, on: false });
        }
    }

    /// Bytes arrived for `conn`: TLS connections decrypt them first.
    pub(super) fn on_recv(&mut self, conn: ConnId, data: &[u8]) {
        let tls = self
            .conns
            .slots
            .get_mut(conn.index())
            .and_then(|s| s.tls.take());
        match tls {
            None if self.conns.is_ws(conn) => self.on_ws_bytes(conn, data),
            None if self.conns.is_mqtt(conn) => self.on_mqtt_bytes(conn, data),
            None => self.on_bytes(conn, data),
            Some(tls) => self.on_tls_bytes(conn, tls, data),
        }
    }

    /// Bytes arrived on a WebSocket connection: the HTTP upgrade first,
    /// then frames, whose payload goes to [`Shard::on_bytes`].
    fn on_ws_bytes(&mut self, conn: ConnId, data: &[u8]) {
        let state = self.sessions.state(conn);
        if state == State::Free || state.is_closing() {
            return; // read and drop what a closing peer still sends
        }
        match self.conns.ws_mode(conn) {
            WsMode::Handshake => self.ws_upgrade(conn, data),
            WsMode::Open => self.ws_frames(conn, data),
            WsMode::Closed | WsMode::No | WsMode::Detect => {}
        }
    }

    /// Plaintext from a TLS connection: Tern frames or, after a WebSocket
    /// upgrade (wss), WebSocket frames. The first two bytes decide: an HTTP
    /// request starts with `GE` (`GET`), a Tern client with LOGIN, whose
    /// second byte is its type `01` (a length prefix of `47`, `G`, is one
    /// byte long), so no Tern client is ever taken for a WebSocket one.
    /// On the MQTT-over-TLS listener, it is MQTT (over wss, MQTT comes out
    /// of the WebSocket frames).
    fn on_tls_plain(&mut self, conn: ConnId, data: &[u8]) {
        if self.conns.is_mqtt(conn) && !self.conns.is_ws(conn) {
            return self.on_mqtt_bytes(conn, data);
        }
        match self.conns.ws_mode(conn) {
            WsMode::No => self.on_bytes(conn, data),
            WsMode::Detect => {
                // A lone first byte waits in `inp`, where both paths look.
                let seen = self.conns.slots[conn.index()]
                    .bufs
                    .as_ref()
                    .map_or(&[][..], |b| &b.inp[..]);
                let mut head = seen.iter().chain(data).take(2).copied();
                match (head.next(), head.next()) {
                    (None, _) => {}
                    (Some(b'G'), None) => self.conns.bufs(conn).inp.extend_from_slice(data),
                    (Some(b'G'), Some(b'E')) => {
                        self.conns.set_ws(conn, WsMode::Handshake);
                        self.ws_upgrade(conn, data);
                    }
                    _ => {
                        self.conns.set_ws(conn, WsMode::No);
                        self.on_bytes(conn, data);
                    }
                }
            }
            WsMode::Handshake | WsMode::Open | WsMode::Closed => self.on_ws_bytes(conn, data),
        }
    }

    /// Reads the HTTP upgrade request (at most
    /// [`ws::HANDSHAKE_BYTES_MAX`]; its time is bounded by the login
    /// timeout, which runs from accept), then answers it.
    fn ws_upgrade(&mut self, conn: ConnId, data: &[u8]) {
        // A request nearly always comes in one read: it is parsed where it
        // lies and no buffer is made for it. Only a partial one is kept (a
        // ramp of many upgrades at once would otherwise leave the allocator
        // holding their buffers' high-water mark, tens of bytes per
        // connection after they are gone).
        let held = self
            .conns
            .slots
            .get_mut(conn.index())
            .and_then(|s| s.bufs.as_mut())
            .map(|b| std::mem::take(&mut b.inp))
            .filter(|inp| !inp.is_empty());
        let joined = held.map(|mut inp| {
            inp.extend_from_slice(data);
            inp
        });
        let request = joined.as_deref().unwrap_or(data);
        match ws::handshake(request, &self.config.ws_origins) {
            ws::Handshake::Incomplete => {
                self.conns.bufs(conn).inp = joined.unwrap_or_else(|| data.to_vec());
            }
            ws::Handshake::Refuse { status, response } => {
                self.stats.protocol_errors.inc();
                log::debug!(
                    "shard {}: WebSocket upgrade on connection {} refused: {status}",
                    self.id,
                    conn.0
                );
                self.write_ws(conn, &response);
                self.conns.set_ws(conn, WsMode::Closed);
                self.event(Event::Failed(conn));
            }
            ws::Handshake::Accept {
                response,
                used,
                mqtt,
            } => {
                let rest = &request[used..];
                self.write_ws(conn, &response);
                self.conns.set_ws(conn, WsMode::Open);
                if mqtt {
                    // MQTT over WebSocket: from here on the payload stream
                    // is MQTT, exactly as on the MQTT listener.
                    self.conns.set_mqtt(conn, MqttMode::accepted());
                    self.event(Event::Deliveries { conn, on: false });
                }
                if !rest.is_empty() {
                    self.ws_frames(conn, rest);
                }
            }
        }
    }

    /// WebSocket frames arrived: control frames are answered, binary
    /// payload goes to [`Shard::on_bytes`]. The receive state is back in
    /// the connection's buffers before any frame is handled (a LOGIN may
    /// hand the connection to another shard).
    fn ws_frames(&mut self, conn: ConnId, data: &[u8]) {
        let mut rx = self.conns.slots[conn.index()]
            .bufs
            .as_mut()
            .map(|b| std::mem::take(&mut b.ws))
            .unwrap_or_default();
        let mut plain = std::mem::take(&mut self.tls_plain);
        plain.clear();
        let mut control = Vec::new();
        // One message holds at most one largest frame with its prefix.
        let message_bytes_max = self.config.frame_bytes_max + proto::LEN_PREFIX_BYTES_MAX;
        let result = rx.read(data, message_bytes_max, &mut plain, &mut control);
        if !rx.is_idle() {
            self.conns.bufs(conn).ws = rx;
        } else if self.conns.slots[conn.index()]
            .bufs
            .as_ref()
            .is_some_and(|b| b.is_idle() && b.out.is_empty() && b.plain.is_empty())
        {
            // The partial frame that kept the buffers is complete (and no
            // partial MQTT packet or unanswered delivery keeps them).
            self.conns.recycle(conn);
        }
        if !control.is_empty() {
            self.write_ws(conn, &control);
        }
        match result {
            Err(code) => {
                self.stats.protocol_errors.inc();
                log::debug!(
                    "shard {}: WebSocket connection {} closed with {code}",
                    self.id,
                    conn.0
                );
                self.conns.set_ws(conn, WsMode::Closed);
                self.event(Event::Failed(conn));
            }
            Ok(outcome) => {
                let gen = self.sessions.gen(conn);
                if !plain.is_empty() {
                    if self.conns.is_mqtt(conn) {
                        self.on_mqtt_bytes(conn, &plain);
                    } else {
                        self.on_bytes(conn, &plain);
                    }
                }
                if outcome.peer_closed
                    && self.sessions.gen(conn) == gen
                    && self.sessions.state(conn) != State::Free
                {
                    // The answering close is in `out`; nothing may follow it.
                    self.conns.set_ws(conn, WsMode::Closed);
                    self.event(Event::Failed(conn));
                }
            }
        }
        self.tls_plain = plain;
    }

    /// Ciphertext arrived on a TLS connection: handshake records are
    /// answered, application data goes to [`Shard::on_bytes`]. The TLS state
    /// is back in the slot before any frame is handled (a LOGIN may hand
    /// the connection, TLS state and all, to another shard).
    fn on_tls_bytes(&mut self, conn: ConnId, mut tls: Box<TlsConn>, data: &[u8]) {
        let state = self.sessions.state(conn);
        if state == State::Free || state.is_closing() {
            self.conns.slots[conn.index()].tls = Some(tls);
            return; // read and drop what a closing peer still sends
        }
        let gen = self.sessions.gen(conn);
        let was_handshaken = tls.is_handshaken();
        let mut plain = std::mem::take(&mut self.tls_plain);
        plain.clear();
        let mut records = Vec::new();
        let result = tls.read(data, &mut plain, &mut records);
        self.conns.slots[conn.index()].tls = Some(tls);
        if !records.is_empty() {
            self.write_records(conn, &records);
        }
        match result {
            Err(e) => {
                self.stats.protocol_errors.inc();
                self.stats.tls_failures.inc();
                log::debug!(
                    "shard {}: TLS error on connection {} ({}): {e}",
                    self.id,
                    conn.0,
                    if was_handshaken {
                        "after the handshake"
                    } else {
                        "handshake"
                    }
                );
                // Whatever rustls queued (an alert) goes out, then FIN.
                self.event(Event::Failed(conn));
            }
            Ok(outcome) => {
                if outcome.handshake_done {
                    self.stats.tls_handshakes.inc();
                }
                if !plain.is_empty() {
                    self.on_tls_plain(conn, &plain);
                }
                if outcome.peer_closed
                    && self.sessions.gen(conn) == gen
                    && self.sessions.state(conn) != State::Free
                {
                    self.event(Event::Closed(conn));
                }
            }
        }
        self.tls_plain = plain;
    }

    /// Bytes arrived for `conn`.
    pub(super) fn on_bytes(&mut self, conn: ConnId, data: &[u8]) {
        if self.event(Event::Received(conn)) == Flow::Stop {
            return; // closing or gone: read and drop
        }
        let gen = self.sessions.gen(conn);
        match self.conns.slots[conn.index()].bufs.as_mut() {
            Some(b) if !b.inp.is_empty() => {
                b.inp.extend_from_slice(data);
                self.process_buffered(conn);
            }
            _ => {
                let Some(consumed) = self.process(conn, gen, data) else {
                    return;
                };
                if consumed < data.len() {
                    self.conns
                        .bufs(conn)
                        .inp
                        .extend_from_slice(&data[consumed..]);
                }
            }
        }
    }

    /// Decodes what is in the connection's input buffer.
    fn process_buffered(&mut self, conn: ConnId) {
        let gen = self.sessions.gen(conn);
        let Some(bufs) = self.conns.slots[conn.index()].bufs.as_mut() else {
            return;
        };
        let inp = std::mem::take(&mut bufs.inp);
        if let Some(consumed) = self.process(conn, gen, &inp) {
            let bufs = self.conns.bufs(conn);
            debug_assert!(bufs.inp.is_empty());
            bufs.inp = inp;
            bufs.inp.drain(..consumed);
        }
    }

    /// Hands the frames in `data` to the session layer; returns how many
    /// bytes were consumed, or `None` when the connection is closing or gone.
    fn process(&mut self, conn: ConnId, gen: u32, data: &[u8]) -> Option<usize> {
        let limits = *self.sessions.limits();
        let mut at = 0;
        loop {
            let (frame, used) = match proto::decode(&data[at..], &limits) {
                Ok(None) => return Some(at),
                Ok(Some(frame)) => frame,
                Err(error) => {
                    self.event(Event::Undecodable { conn, error });
                    return None;
                }
            };
            if !self.traced.is_empty() {
                self.trace(conn, "in", &frame);
            }
            let rest = &data[at + used..];
            match self.event_with_rest(Event::Frame { conn, frame, rest }, rest) {
                Flow::Next => at += used,
                Flow::Blocked => {
                    self.io.set_recv(conn, false);
                    self.conns.blocked.push(conn);
                    return Some(at);
                }
                Flow::Stop => return None,
            }
            if self.sessions.gen(conn) != gen || self.sessions.state(conn).is_closing() {
                return None;
            }
        }
    }

    /// Reads again from connections stopped by back-pressure.
    pub(super) fn retry_blocked(&mut self) {
        if self.conns.blocked.is_empty() {
            return;
        }
        for conn in std::mem::take(&mut self.conns.blocked) {
            if self.sessions.state(conn) == State::Active {
                self.io.set_recv(conn, true);
                self.guarded(conn, |shard| {
                    shard.process_buffered(conn);
                    // MQTT packets held back behind the blocked frames.
                    if shard.conns.is_mqtt(conn) && !shard.conns.frames_waiting(conn) {
                        shard.on_mqtt_bytes(conn, &[]);
                    }
                });
            }
        }
    }

    /// Moves `conn` to shard `home`, where `user` lives, with `leftover`
    /// (the input after its LOGIN frame). The session layer already freed
    /// its session slot.
    pub(super) fn hand_off(
        &mut self,
        conn: ConnId,
        user: u64,
        device: u32,
        version: u8,
        home: usize,
        leftover: &[u8],
    ) {
        let mqtt = self.conns.mqtt_mode(conn);
        // An MQTT connection's leftover is the MQTT input after its CONNECT.
        let leftover = match mqtt {
            Some(_) => std::mem::take(&mut self.mqtt_rest),
            None => leftover.to_vec(),
        };
        self.conns.set_mqtt(conn, MqttMode::default());
        let mut slot = std::mem::take(&mut self.conns.slots[conn.index()]);
        let ws_mode = std::mem::take(&mut self.conns.ws[conn.index()]);
        // TLS records (session tickets) or WebSocket ones (the upgrade
        // answer, a pong) may wait to be sent; frames may not.
        debug_assert!(
            slot.bufs.as_ref().is_none_or(|b| b.plain.is_empty()),
            "nothing is written before LOGIN_OK"
        );
        debug_assert!(slot.tls.is_some() || ws_mode != WsMode::No || slot.out_pending() == 0);
        let (out, rx) = slot
            .bufs
            .take()
            .map(|mut b| (b.out[b.out_sent..].to_vec(), std::mem::take(&mut b.ws)))
            .unwrap_or_default();
        let tls = slot.tls.take();
        let ws = !matches!(ws_mode, WsMode::No | WsMode::Detect);
        let ws_rx = (!rx.is_idle()).then(|| Box::new(rx));
        match self.io.detach(conn, home) {
            Ok(detached) => self.outboxes.push(
                home,
                Msg::Handoff {
                    conn: detached,
                    user,
                    device,
                    version,
                    leftover,
                    tls,
                    ws,
                    ws_rx,
                    mqtt,
                    out,
                },
            ),
            Err(e) => log::warn!("shard {}: detach for handoff failed: {e}", self.id),
        }
    }

    // ---- live upgrade: carried connections ----------------------------------

    /// An upgrade's shutdown on a backend that carries connections: every
    /// logged-in plaintext connection (Tern, WebSocket, MQTT) is frozen (no
    /// more input is read, its output still flushes) to go to the
    /// successor; every other one gets BYE(upgrade) (TLS ones with
    /// close_notify, wss ones with a close frame too: their keys cannot
    /// leave this process).
    pub(super) fn freeze_carried(&mut self) {
        self.carrying_on = true;
        for i in 0..self.sessions.slots() {
            let conn = ConnId(i as u32);
            // An MQTT connection is logged in once its CONNECT was taken;
            // MQTT over WebSocket has no hand-over form: it gets the BYE.
            let plaintext = self.conns.slots.get(i).is_some_and(|s| s.tls.is_none())
                && matches!(self.conns.ws_mode(conn), WsMode::No | WsMode::Open)
                && self
                    .conns
                    .mqtt_mode(conn)
                    .is_none_or(|m| m.version().is_some())
                && !(self.conns.is_ws(conn) && self.conns.is_mqtt(conn));
            if self.sessions.state(conn) == State::Active && plaintext {
                self.io.set_recv(conn, false);
                self.carrying.push(conn);
            } else {
                self.event(Event::Shutdown(Some(conn)));
            }
        }
        log::info!(
            "shard {}: upgrade: {} connections frozen for the successor",
            self.id,
            self.carrying.len()
        );
    }

    /// The last step of an upgrade's shutdown (everything read is committed
    /// and answered): keeps every frozen connection that is still logged
    /// in, with its partial input, unsent output and its WebSocket or MQTT
    /// state, for the successor ([`super::Outgoing`]). One whose state does
    /// not fit a hand-over packet is closed (its client reconnects).
    pub(super) fn carry_out(&mut self) {
        self.flush_output();
        for conn in std::mem::take(&mut self.carrying) {
            let Some((user, device, version)) = self.sessions.logged_in(conn) else {
                continue;
            };
            let slot = std::mem::take(&mut self.conns.slots[conn.index()]);
            let ws = std::mem::take(&mut self.conns.ws[conn.index()]);
            let mqtt = self.conns.mqtt_mode(conn);
            self.conns.set_mqtt(conn, MqttMode::default());
            let b = slot.bufs.map(|b| *b).unwrap_or_default();
            // Flushed: a WebSocket's frames were wrapped into `out`.
            debug_assert!(b.plain.is_empty());
            let output = b.out[b.out_sent..].to_vec();
            let (transport, raw) = match (mqtt, ws) {
                (Some(mode), _) => (
                    Transport::Mqtt {
                        mode,
                        inflight: b.inflight,
                    },
                    b.mqtt_in,
                ),
                (None, WsMode::Open) => {
                    let (in_message, message_bytes, raw) = b.ws.into_parts();
                    let transport = Transport::WebSocket {
                        in_message,
                        message_bytes: u32::try_from(message_bytes).unwrap_or(u32::MAX),
                    };
                    (transport, raw)
                }
                _ => (Transport::Tern, Vec::new()),
            };
            let carried = Carried {
                user,
                device,
                version,
                input: b.inp,
                output,
                transport,
                raw,
            };
            let bytes = upgrade::state::packet_bytes(&carried);
            if bytes > upgrade::wire::CARRIED_PACKET_BYTES_MAX
                || carried.output.len() > upgrade::state::OUTPUT_BYTES_MAX
            {
                log::info!(
                    "shard {}: upgrade: user {user} has {bytes} bytes pending, closed not carried",
                    self.id
                );
                continue;
            }
            match self.io.keep(conn) {
                Ok(kept) => self.kept.push((kept, carried)),
                Err(e) => log::warn!("shard {}: upgrade: keeping user {user}: {e}", self.id),
            }
        }
        log::info!(
            "shard {}: upgrade: {} connections kept for the successor",
            self.id,
            self.kept.len()
        );
    }

    /// Installs connections carried from the predecessor (successor, as
    /// they arrive): same socket, same session, no second LOGIN_OK; unsent
    /// output goes first, then whatever the store holds undelivered. At
    /// most [`ADOPT_PER_ITERATION`] per loop iteration, so the loop's other
    /// work goes on during a long hand-over.
    pub(super) fn adopt_carried(&mut self) {
        for (fd, c) in self.adopt.take(self.id, ADOPT_PER_ITERATION) {
            let id = match self.io.adopt_socket(fd) {
                Ok(id) => id,
                Err(e) => {
                    // Closed: its client reconnects. Logged once per
                    // ADOPT_FAILED_LOG_EVERY (a full box fails them all).
                    self.adopt_failed += 1;
                    if self.adopt_failed % ADOPT_FAILED_LOG_EVERY == 1 {
                        log::warn!(
                            "shard {}: upgrade: adopting user {}: {e}; closed ({} so far)",
                            self.id,
                            c.user,
                            self.adopt_failed
                        );
                    }
                    continue;
                }
            };
            self.stats.handoffs_in.inc();
            let Carried {
                user,
                device,
                version,
                input,
                output,
                transport,
                raw,
            } = c;
            match transport {
                Transport::Tern => self.open_conn(id, None, WsMode::No, MqttMode::default()),
                Transport::WebSocket {
                    in_message,
                    message_bytes,
                } => {
                    self.open_conn(id, None, WsMode::Open, MqttMode::default());
                    if in_message {
                        self.conns
                            .set_rx(id, WsRx::resume(true, message_bytes as usize));
                    }
                }
                Transport::Mqtt { mode, inflight } => {
                    // Deliveries still waiting for their PUBACK keep their
                    // packet ids when the session sends them again.
                    self.open_conn(id, None, WsMode::No, mode);
                    if !inflight.is_empty() {
                        self.conns.bufs_mut(id).inflight = inflight;
                    }
                }
            }
            // Already in the connection's wire form.
            if !output.is_empty() {
                self.write_records(id, &output);
            }
            self.guarded(id, |shard| {
                shard.event(Event::HandedOver {
                    conn: id,
                    user,
                    device,
                    version,
                    resumed: true,
                });
                let gen = shard.sessions.gen(id);
                if !input.is_empty() {
                    shard.on_bytes(id, &input);
                }
                if raw.is_empty()
                    || shard.sessions.gen(id) != gen
                    || shard.sessions.state(id) != State::Active
                {
                    return;
                }
                if shard.conns.is_mqtt(id) {
                    shard.on_mqtt_bytes(id, &raw);
                } else {
                    shard.on_ws_bytes(id, &raw);
                }
            });
        }
    }

    // ---- output ------------------------------------------------------------

    /// Queues encoded frames; on a TLS connection they are encrypted at flush.
    pub(super) fn write_bytes(&mut self, conn: ConnId, bytes: &[u8]) {
        let state = self.sessions.state(conn);
        if state == State::Free || state == State::Shut {
            return;
        }
        if !self.traced.is_empty() {
            self.trace_out(conn, bytes);
        }
        if let Some(mode) = self.conns.mqtt_mode(conn) {
            self.mqtt_write(conn, mode, bytes);
            return;
        }
        let wrapped = self.conns.slots[conn.index()].tls.is_some() || self.conns.is_ws(conn);
        let bufs = self.conns.bufs(conn);
        if wrapped {
            bufs.plain.extend_from_slice(bytes);
        } else {
            bufs.out.extend_from_slice(bytes);
        }
        self.conns.mark_dirty(conn);
    }

    /// Queues TLS records (handshake, tickets, alerts) or WebSocket
    /// control frames and HTTP answers as they are.
    pub(super) fn write_records(&mut self, conn: ConnId, records: &[u8]) {
        let state = self.sessions.state(conn);
        if state == State::Free || state == State::Shut {
            return;
        }
        self.conns.bufs(conn).out.extend_from_slice(records);
        self.conns.mark_dirty(conn);
    }

    /// Queues MQTT packets as they are, or encrypted on an MQTT-over-TLS
    /// connection; over WebSocket they are wrapped in a binary message by
    /// the flush, like Tern frames.
    pub(super) fn write_mqtt(&mut self, conn: ConnId, packets: &[u8]) {
        if !self.conns.is_ws(conn) {
            return self.write_ws(conn, packets);
        }
        let state = self.sessions.state(conn);
        if state == State::Free || state == State::Shut {
            return;
        }
        self.conns.bufs(conn).plain.extend_from_slice(packets);
        self.conns.mark_dirty(conn);
    }

    /// Queues WebSocket-level bytes (an HTTP answer, control frames) as
    /// they are, or encrypted on a wss connection. They may pass frames
    /// written before and not flushed yet: WebSocket lets control frames
    /// come between messages, and the upgrade answer precedes any frame.
    fn write_ws(&mut self, conn: ConnId, bytes: &[u8]) {
        if !self.conns.is_tls(conn) {
            return self.write_records(conn, bytes);
        }
        let state = self.sessions.state(conn);
        if state == State::Free || state == State::Shut {
            return;
        }
        self.conns.bufs(conn);
        let slot = &mut self.conns.slots[conn.index()];
        let (Some(tls), Some(bufs)) = (slot.tls.as_mut(), slot.bufs.as_mut()) else {
            return;
        };
        if let Err(e) = tls.encrypt(bytes, &mut bufs.out) {
            log::debug!("shard {}: TLS encrypt: {e}", self.id);
            self.stats.tls_failures.inc();
            self.event(Event::Closed(conn));
            return;
        }
        self.conns.mark_dirty(conn);
    }

    /// The session layer closes `conn` after its output: unread input is
    /// dropped, the flush shuts the write side, and reading goes on (to
    /// notice the peer's close).
    pub(super) fn closing(&mut self, conn: ConnId) {
        if let Some(b) = self.conns.slots[conn.index()].bufs.as_mut() {
            b.inp = Vec::new();
            b.mqtt_in = Vec::new();
        }
        self.conns.mark_dirty(conn);
        self.io.set_recv(conn, true);
    }

    /// Closes `conn` at once; its session slot is already free.
    pub(super) fn close_conn(&mut self, conn: ConnId) {
        self.pending_end(conn);
        if let Some(s) = self.conns.slots.get_mut(conn.index()) {
            *s = Slot::default();
        }
        self.conns.set_ws(conn, WsMode::No);
        self.conns.set_mqtt(conn, MqttMode::default());
        self.io.close(conn);
    }

    pub(super) fn flush_output(&mut self) {
        let mut dirty = std::mem::take(&mut self.conns.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for conn in dirty.drain(..) {
            self.flush_conn(conn);
        }
        if self.conns.dirty.is_empty() {
            self.conns.dirty = dirty; // keep the allocation
        }
    }

    /// Sends what the connection has pending; closes it when it will not
    /// drain (slow reader) or failed.
    pub(super) fn flush_conn(&mut self, conn: ConnId) {
        let state = self.sessions.state(conn);
        if state == State::Free {
            return;
        }
        if state == State::Closing
            && self.conns.ws_mode(conn) == WsMode::Open
            && conn.index() < self.conns.slots.len()
        {
            // A WebSocket's close frame goes out even with nothing else
            // pending (an MQTT DISCONNECT).
            self.conns.bufs(conn);
        }
        let Conns { slots, ws, .. } = &mut self.conns;
        let Some(s) = slots.get_mut(conn.index()) else {
            return;
        };
        let ws_mode = ws.get_mut(conn.index());
        let Some(bufs) = s.bufs.as_mut() else {
            if state == State::Closing {
                self.io.shutdown_write(conn);
                self.event(Event::WriteShut(conn));
            }
            return;
        };
        let mode = ws_mode.as_deref().copied().unwrap_or_default();
        if !bufs.plain.is_empty() {
            match s.tls.as_mut() {
                Some(tls) if tls.is_handshaken() => {
                    let Bufs { plain, out, .. } = &mut **bufs;
                    let result = match mode {
                        WsMode::No | WsMode::Detect => tls.encrypt(plain, out),
                        // wss: a binary message, encrypted.
                        WsMode::Open => {
                            let mut message = Vec::with_capacity(plain.len() + 10);
                            ws::put_binary(plain, &mut message);
                            tls.encrypt(&message, out)
                        }
                        // Not upgraded yet or closed: nothing can carry them.
                        WsMode::Handshake | WsMode::Closed => Ok(()),
                    };
                    if let Err(e) = result {
                        log::debug!("shard {}: TLS encrypt: {e}", self.id);
                        self.stats.tls_failures.inc();
                        self.event(Event::Closed(conn));
                        return;
                    }
                }
                None if ws_mode.as_deref() == Some(&WsMode::Open) => {
                    ws::put_binary(&bufs.plain, &mut bufs.out);
                }
                // Frames for a TLS connection whose handshake did not finish
                // (a BYE at shutdown), or a WebSocket one not upgraded or
                // already closed: nothing can carry them.
                _ => {}
            }
            bufs.plain.clear();
        }
        if state == State::Closing {
            // After the last frames, a WebSocket's close frame (encrypted
            // on wss), then the TLS stream ends before the FIN.
            if let Some(mode @ WsMode::Open) = ws_mode {
                match s.tls.as_mut() {
                    Some(tls) => {
                        let mut close = Vec::with_capacity(4);
                        ws::put_close(ws::close::NORMAL, &mut close);
                        // An error means the TLS stream is closed already.
                        let _ = tls.encrypt(&close, &mut bufs.out);
                    }
                    None => ws::put_close(ws::close::NORMAL, &mut bufs.out),
                }
                *mode = WsMode::Closed;
            }
            if let Some(tls) = s.tls.as_mut() {
                tls.close_notify(&mut bufs.out);
            }
        }
        if bufs.out_sent < bufs.out.len() {
            match self.io.send(conn, &bufs.out[bufs.out_sent..]) {
                Ok(n) => {
                    bufs.out_sent += n;
                    self.stats.bytes_out.add(n as u64);
                }
                Err(_) => {
                    self.event(Event::Closed(conn));
                    return;
                }
            }
        }
        let pending = bufs.out.len() - bufs.out_sent;
        let mut shut = false;
        let mut idle = false;
        if pending == 0 {
            bufs.out.clear();
            bufs.out_sent = 0;
            idle = bufs.is_idle();
            if state == State::Closing {
                shut = true;
                self.io.shutdown_write(conn);
            }
        } else if bufs.out_sent > bufs.out.len() / 2 {
            bufs.out.drain(..bufs.out_sent);
            bufs.out_sent = 0;
        }
        if idle {
            self.conns.recycle(conn); // idle again: no buffers
        }
        if shut {
            self.event(Event::WriteShut(conn));
        }
        if pending > self.config.conn_out_bytes_max && state == State::Active {
            self.event(Event::Slow(conn));
        }
    }
}
