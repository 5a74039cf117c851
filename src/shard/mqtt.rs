//! The MQTT listener's side of a shard (docs/MQTT.md): an MQTT connection's
//! bytes are decoded into packets ([`crate::mqtt::codec`]), mapped onto Tern
//! frames ([`crate::mqtt::bridge`]) and fed to the same frame processing as
//! a Tern client's; the frames the session layer writes to it are mapped
//! back into MQTT packets on their way to the output buffer. The session
//! layer never sees MQTT.
//!
//! Per connection the shard keeps a 6-byte [`Mode`] beside the slots; a
//! partial packet and the packet ids of deliveries waiting for PUBACK live
//! in the connection's on-demand buffers, only while they exist.

use crate::io::ConnId;
use crate::mqtt::bridge::{self, Ctx, Mode, Step};
use crate::mqtt::codec::{self, Packet};
use crate::proto;
use crate::session::{Event, Flow, State};

use super::Shard;

impl Shard {
    fn mqtt_ctx(&self, conn: ConnId) -> Ctx {
        let (user, device) = self
            .sessions
            .logged_in(conn)
            .map_or((0, 0), |(user, device, _)| (user, device));
        Ctx {
            user,
            device,
            body_bytes_max: self.config.body_bytes_max,
            packet_bytes_max: self.config.frame_bytes_max,
            idle_timeout_ms: self.config.idle_timeout_ms,
        }
    }

    /// Bytes arrived on an MQTT connection: each whole packet is mapped
    /// and its Tern frames handled before the next is decoded (a CONNECT
    /// may move the connection to its user's home shard, which goes on
    /// with the rest).
    pub(super) fn on_mqtt_bytes(&mut self, conn: ConnId, data: &[u8]) {
        // Every packet is activity (keepalive), also those that make no
        // Tern frame (SUBSCRIBE).
        if self.event(Event::Received(conn)) == Flow::Stop {
            return; // closing or gone: read and drop
        }
        if self.conns.frames_waiting(conn) {
            // Blocked on back-pressure: kept until `retry_blocked`.
            self.conns.bufs_mut(conn).mqtt_in.extend_from_slice(data);
            return;
        }
        let partial = self
            .conns
            .bufs_of(conn)
            .is_some_and(|b| !b.mqtt_in.is_empty());
        let owned;
        let input: &[u8] = if partial {
            let mut all = std::mem::take(&mut self.conns.bufs_mut(conn).mqtt_in);
            all.extend_from_slice(data);
            owned = all;
            &owned
        } else {
            data
        };
        let mut at = 0;
        while at < input.len() {
            let Some(mode) = self.conns.mqtt_mode(conn) else {
                return; // closed or moved
            };
            let version = mode.version();
            let (packet, used) =
                match codec::decode(&input[at..], version, self.config.frame_bytes_max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.protocol_errors.inc();
                        log::debug!("shard {}: MQTT connection {} closed: {e}", self.id, conn.0);
                        let mut out = Vec::new();
                        bridge::refused(mode, e, &mut out);
                        self.write_mqtt(conn, &out);
                        self.event(Event::Failed(conn));
                        return;
                    }
                };
            at += used;
            if !self.on_packet(conn, mode, packet, &input[at..]) {
                return;
            }
            if self.conns.frames_waiting(conn) {
                break; // blocked: the rest waits with the partial packet
            }
        }
        if at < input.len() {
            self.conns
                .bufs_mut(conn)
                .mqtt_in
                .extend_from_slice(&input[at..]);
        }
    }

    /// One packet; `rest` is the input after it. False when the
    /// connection is gone from here (closed, refused, moved).
    fn on_packet(&mut self, conn: ConnId, mut mode: Mode, packet: Packet<'_>, rest: &[u8]) -> bool {
        let ctx = self.mqtt_ctx(conn);
        let connect = matches!(packet, Packet::Connect(_));
        let mut inflight = self.conns.take_inflight(conn);
        // Scratch kept by the shard: a packet allocates nothing here.
        let mut tern = std::mem::take(&mut self.mqtt_tern);
        let mut out = std::mem::take(&mut self.mqtt_out);
        tern.clear();
        out.clear();
        let step = bridge::on_packet(&mut mode, &mut inflight, packet, &ctx, &mut tern, &mut out);
        if !inflight.is_empty() {
            self.conns.bufs_mut(conn).inflight = inflight;
        }
        self.conns.set_mqtt(conn, mode);
        if !out.is_empty() {
            self.write_mqtt(conn, &out);
        }
        self.mqtt_out = out;
        if step == Step::Close {
            self.mqtt_tern = tern;
            self.event(Event::Failed(conn));
            return false;
        }
        let gen = self.sessions.gen(conn);
        if tern.is_empty() {
            self.mqtt_tern = tern;
        } else {
            if connect {
                // The LOGIN may hand the connection over: the bytes after
                // the CONNECT go with it.
                self.mqtt_rest.clear();
                self.mqtt_rest.extend_from_slice(rest);
            }
            self.on_bytes(conn, &tern);
            self.mqtt_rest.clear();
            self.mqtt_tern = tern;
            if self.sessions.gen(conn) != gen || self.sessions.state(conn) != State::Active {
                return false;
            }
            if connect && mode.inbox() {
                // A persistent session: deliveries from the CONNACK on.
                self.event(Event::Deliveries { conn, on: true });
            }
        }
        match step {
            Step::Resume => {
                self.event(Event::Deliveries { conn, on: true });
            }
            Step::Pause => {
                self.event(Event::Deliveries { conn, on: false });
            }
            Step::Next | Step::Close => {}
        }
        self.sessions.gen(conn) == gen && self.sessions.state(conn) == State::Active
    }

    /// Frames the session layer wrote to an MQTT connection, written as
    /// MQTT packets. A refusal 3.1.1 cannot say closes the connection once
    /// the actions are done ([`Shard::mqtt_settle`]).
    pub(super) fn mqtt_write(&mut self, conn: ConnId, mode: Mode, bytes: &[u8]) {
        let ctx = self.mqtt_ctx(conn);
        let limits = *self.sessions.limits();
        let mut inflight = self.conns.take_inflight(conn);
        let mut out = std::mem::take(&mut self.mqtt_out);
        out.clear();
        let mut at = 0;
        while at < bytes.len() {
            let Ok(Some((frame, used))) = proto::decode(&bytes[at..], &limits) else {
                debug_assert!(false, "the session layer writes whole frames");
                break;
            };
            at += used;
            if bridge::on_frame(mode, &mut inflight, &frame, &ctx, &mut out) == Step::Close {
                self.mqtt_close.push((conn, self.sessions.gen(conn)));
            }
        }
        if !inflight.is_empty() {
            self.conns.bufs_mut(conn).inflight = inflight;
        }
        if !out.is_empty() {
            self.write_mqtt(conn, &out);
        }
        self.mqtt_out = out;
    }

    /// Closes the MQTT connections whose refusals 3.1.1 cannot say (after
    /// the session layer's actions, never inside them).
    pub(super) fn mqtt_settle(&mut self) {
        while let Some((conn, gen)) = self.mqtt_close.pop() {
            if self.sessions.gen(conn) == gen && self.sessions.state(conn) == State::Active {
                self.event(Event::Failed(conn));
            }
        }
    }
}
