//! The session state of carried connections, pure: bytes in, records out.
//!
//! The hand-over sends the records in batches, one packet each with the
//! connections' sockets attached
//! ([`super::channel::Channel::send_carried`]); a batch holds at most
//! [`FDS_PER_MESSAGE_MAX`] records, the `i`-th for the `i`-th descriptor.
//!
//! What travels for a plaintext, logged-in connection (Tern, WebSocket
//! after its upgrade, or MQTT after its CONNECT), and why only this:
//!
//! - `user`, `device` and `version`: the successor installs the session
//!   on the user's home shard of *its own* shard count (it may differ), so
//!   the old shard is not carried; the device keeps its own
//!   idempotent-SEND window and its place among the user's sessions.
//! - `input`: Tern bytes read but not decoded (a partial frame, or frames
//!   held back by back-pressure), at most `frame_bytes_max` of the
//!   successor's configuration, checked before allocating.
//! - `output`: bytes written but not sent (answers, DELIVERs), already in
//!   the connection's wire form (WebSocket frames, MQTT packets), at most
//!   [`OUTPUT_BYTES_MAX`]; a connection with more pending gets BYE(upgrade)
//!   instead of being carried.
//! - `transport`: how the bytes are wrapped ([`Transport`]) and that
//!   layer's state: for WebSocket whether a fragmented message is open and
//!   its size so far; for MQTT its [`Mode`] (protocol level, keepalive,
//!   Receive Maximum, subscriptions, session flags) and the deliveries
//!   waiting for their PUBACK (packet id to server id).
//! - `raw`: WebSocket and MQTT connections: bytes from the socket not yet
//!   read by that layer (a partial WebSocket frame or MQTT packet, and
//!   whatever arrived after the freeze), at most `frame_bytes_max` +
//!   [`RAW_SLACK_BYTES`]. A Tern connection's are in `input`.
//!
//! On io_uring the connection's socket is a direct descriptor: the old
//! process installs it as a process descriptor just before sending
//! (IORING_OP_FIXED_FD_INSTALL) and closes that at once; the successor
//! registers it into its own fixed-file table (IORING_OP_FILES_UPDATE)
//! and closes it too. Either process may run either backend.
//!
//! DELIVERs sent and not yet DELIVERED are not carried: they are in the
//! store, which the successor replays, and its session re-delivers them
//! with the same server id (a duplicate the protocol allows: a Tern
//! client drops a server id it has seen; an MQTT delivery still waiting
//! for its PUBACK goes again under its packet id with DUP set). TLS
//! connections (also wss and MQTT over TLS) are never carried (their keys
//! stay in the old process): they get BYE(upgrade) and close_notify.
//!
//! Layout, little-endian: `count: u16`, then `count` records of
//! `user: u64`, `device: u32`, `version: u8`, `transport: u8` (0 Tern,
//! 1 WebSocket, 2 MQTT), `input_len: u32`, `output_len: u32`,
//! `raw_len: u32`, the transport's fields (Tern: none; WebSocket:
//! `in_message: u8`, `message_bytes: u32`; MQTT: the mode's 5 bytes
//! `flags: u8`, `keepalive_s: u16`, `receive_max: u16`, then
//! `inflight: u16` and that many `pid: u16`, `server_id: u64`), the input
//! bytes, the output bytes, the raw bytes. Example, one Tern record of
//! user 7, device 3, version 1, input `AB`, no output:
//! `01 00  07 00 00 00 00 00 00 00  03 00 00 00  01  00  02 00 00 00
//! 00 00 00 00  00 00 00 00  41 42`.

use std::fmt;

use super::wire::FDS_PER_MESSAGE_MAX;
use crate::mqtt::bridge::{Inflight, Mode, MODE_WIRE_BYTES};

/// Most unsent output bytes a carried connection may have; one with more
/// is closed with BYE(upgrade) instead (a slow reader, whose backlog is
/// still in the store).
pub const OUTPUT_BYTES_MAX: usize = 64 * 1024;

/// Raw bytes a carried WebSocket or MQTT connection may have beyond
/// `frame_bytes_max`: a WebSocket frame's header (14) and the Tern
/// length prefix inside it, or an MQTT fixed header (5).
pub const RAW_SLACK_BYTES: usize = 32;

/// Bytes of a record before its transport's fields.
pub const RECORD_HEAD_BYTES: usize = 8 + 4 + 1 + 1 + 4 + 4 + 4;

/// Bytes of one MQTT in-flight entry: packet id and server id.
const INFLIGHT_ENTRY_BYTES: usize = 2 + 8;

/// How a carried connection's bytes are wrapped, and that layer's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Tern frames on the socket.
    #[default]
    Tern,
    /// Binary WebSocket messages (the HTTP upgrade is done).
    WebSocket {
        /// A fragmented message is open (its first frame had no FIN).
        in_message: bool,
        /// Its payload bytes so far.
        message_bytes: u32,
    },
    /// MQTT packets (the CONNECT was taken).
    Mqtt {
        /// What its CONNECT and SUBSCRIBEs said.
        mode: Mode,
        /// Deliveries waiting for their PUBACK.
        inflight: Inflight,
    },
}

impl Transport {
    fn kind(&self) -> u8 {
        match self {
            Transport::Tern => 0,
            Transport::WebSocket { .. } => 1,
            Transport::Mqtt { .. } => 2,
        }
    }

    /// Bytes of its fields in a record.
    fn bytes(&self) -> usize {
        match self {
            Transport::Tern => 0,
            Transport::WebSocket { .. } => 1 + 4,
            Transport::Mqtt { inflight, .. } => {
                MODE_WIRE_BYTES + 2 + INFLIGHT_ENTRY_BYTES * inflight.entries().len()
            }
        }
    }
}

/// The session state of one carried connection; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    /// The user its LOGIN proved.
    pub user: u64,
    /// The device its token named (0 for a `v1.` token).
    pub device: u32,
    /// The protocol version of its LOGIN, `1..=proto::VERSION_MAX`.
    pub version: u8,
    /// Tern bytes read and not yet decoded (a partial frame).
    pub input: Vec<u8>,
    /// Written and not yet sent, in the connection's wire form.
    pub output: Vec<u8>,
    /// How the bytes are wrapped, and that layer's state.
    pub transport: Transport,
    /// WebSocket and MQTT: socket bytes that layer has not read yet.
    pub raw: Vec<u8>,
}

/// Bytes of a packet holding `carried` alone: more than
/// [`super::wire::CARRIED_PACKET_BYTES_MAX`] and it cannot be carried.
pub fn packet_bytes(carried: &Carried) -> usize {
    1 + 2 + record_bytes(carried)
}

/// Bytes of `carried`'s record in a batch.
pub fn record_bytes(carried: &Carried) -> usize {
    RECORD_HEAD_BYTES
        + carried.transport.bytes()
        + carried.input.len()
        + carried.output.len()
        + carried.raw.len()
}

/// A state payload that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed carried state: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Appends one batch (`1..=FDS_PER_MESSAGE_MAX` records) to `out`.
pub fn encode(batch: &[Carried], out: &mut Vec<u8>) {
    debug_assert!((1..=FDS_PER_MESSAGE_MAX).contains(&batch.len()));
    out.extend_from_slice(&(batch.len() as u16).to_le_bytes());
    for c in batch {
        debug_assert!(c.output.len() <= OUTPUT_BYTES_MAX, "{}", c.output.len());
        out.extend_from_slice(&c.user.to_le_bytes());
        out.extend_from_slice(&c.device.to_le_bytes());
        out.push(c.version);
        out.push(c.transport.kind());
        out.extend_from_slice(&(c.input.len() as u32).to_le_bytes());
        out.extend_from_slice(&(c.output.len() as u32).to_le_bytes());
        out.extend_from_slice(&(c.raw.len() as u32).to_le_bytes());
        match &c.transport {
            Transport::Tern => {}
            Transport::WebSocket {
                in_message,
                message_bytes,
            } => {
                out.push(u8::from(*in_message));
                out.extend_from_slice(&message_bytes.to_le_bytes());
            }
            Transport::Mqtt { mode, inflight } => {
                out.extend_from_slice(&mode.to_bytes());
                let entries = inflight.entries();
                debug_assert!(entries.len() <= usize::from(u16::MAX));
                out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
                for &(pid, server_id) in entries {
                    out.extend_from_slice(&pid.to_le_bytes());
                    out.extend_from_slice(&server_id.to_le_bytes());
                }
            }
        }
        out.extend_from_slice(&c.input);
        out.extend_from_slice(&c.output);
        out.extend_from_slice(&c.raw);
    }
}

/// Decodes one whole batch. `input_bytes_max` is the successor's
/// `frame_bytes_max`: a partial frame longer than that could never
/// complete. Every length is checked before anything is allocated.
pub fn decode(bytes: &[u8], input_bytes_max: usize) -> Result<Vec<Carried>, Malformed> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8], Malformed> {
        if rest.len() < n {
            return Err(Malformed("too short"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = usize::from(u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")));
    if count == 0 || count > FDS_PER_MESSAGE_MAX {
        return Err(Malformed("record count out of range"));
    }
    let u32_at = |b: &[u8], at: usize| -> usize {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize
    };
    let mut batch = Vec::with_capacity(count);
    for _ in 0..count {
        let head = take(RECORD_HEAD_BYTES)?;
        let user = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let device = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let version = head[12];
        let kind = head[13];
        let input_len = u32_at(head, 14);
        let output_len = u32_at(head, 18);
        let raw_len = u32_at(head, 22);
        if user == 0 {
            return Err(Malformed("user 0 is never logged in"));
        }
        if !(1..=crate::proto::VERSION_MAX).contains(&version) {
            return Err(Malformed("unknown protocol version"));
        }
        if input_len > input_bytes_max {
            return Err(Malformed("partial input longer than a frame"));
        }
        if output_len > OUTPUT_BYTES_MAX {
            return Err(Malformed("unsent output over the limit"));
        }
        // The WebSocket limit of a message: a frame and its length prefix.
        let message_bytes_max = input_bytes_max + crate::proto::LEN_PREFIX_BYTES_MAX;
        let transport = match kind {
            0 => Transport::Tern,
            1 => {
                let f = take(1 + 4)?;
                let in_message = match f[0] {
                    0 => false,
                    1 => true,
                    _ => return Err(Malformed("bad WebSocket message flag")),
                };
                let message_bytes = u32::from_le_bytes(f[1..5].try_into().expect("4 bytes"));
                if message_bytes as usize > message_bytes_max || (!in_message && message_bytes != 0)
                {
                    return Err(Malformed("WebSocket message size out of range"));
                }
                Transport::WebSocket {
                    in_message,
                    message_bytes,
                }
            }
            2 => {
                let m: [u8; MODE_WIRE_BYTES] =
                    take(MODE_WIRE_BYTES)?.try_into().expect("mode bytes");
                let mode = Mode::from_bytes(m).ok_or(Malformed("bad MQTT state"))?;
                let n = usize::from(u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")));
                let entries = take(n * INFLIGHT_ENTRY_BYTES)?
                    .chunks_exact(INFLIGHT_ENTRY_BYTES)
                    .map(|e| {
                        let pid = u16::from_le_bytes([e[0], e[1]]);
                        (
                            pid,
                            u64::from_le_bytes(e[2..10].try_into().expect("8 bytes")),
                        )
                    })
                    .collect();
                let inflight =
                    Inflight::from_entries(entries).ok_or(Malformed("bad MQTT packet ids"))?;
                Transport::Mqtt { mode, inflight }
            }
            _ => return Err(Malformed("unknown transport")),
        };
        if matches!(transport, Transport::Tern) && raw_len != 0 {
            return Err(Malformed("raw bytes on a Tern connection"));
        }
        if raw_len > input_bytes_max + RAW_SLACK_BYTES {
            return Err(Malformed("raw input longer than a frame"));
        }
        let input = take(input_len)?.to_vec();
        let output = take(output_len)?.to_vec();
        let raw = take(raw_len)?.to_vec();
        batch.push(Carried {
            user,
            device,
            version,
            input,
            output,
            transport,
            raw,
        });
    }
    if !rest.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried(user: u64, input: &[u8], output: &[u8]) -> Carried {
        Carried {
            user,
            device: 3,
            version: 1,
            input: input.to_vec(),
            output: output.to_vec(),
            transport: Transport::Tern,
            raw: Vec::new(),
        }
    }

    /// An MQTT 5.0 connection subscribed to its inbox, keepalive 30 s,
    /// Receive Maximum 2 (flags: MQTT, CONNECTED, V5, INBOX).
    fn mqtt_mode() -> Mode {
        Mode::from_bytes([0x80 | 0x01 | 0x02 | 0x10, 30, 0, 2, 0]).expect("a connected mode")
    }

    fn bytes(batch: &[Carried]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(batch, &mut out);
        out
    }

    #[test]
    fn the_documented_example() {
        assert_eq!(
            bytes(&[carried(7, b"AB", b"")]),
            [
                0x01, 0x00, 0x07, 0, 0, 0, 0, 0, 0, 0, 0x03, 0, 0, 0, 0x01, 0x00, 0x02, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0x41, 0x42
            ]
        );
    }

    #[test]
    fn batches_round_trip_and_every_cut_is_refused() {
        let full: Vec<Carried> = (1..=FDS_PER_MESSAGE_MAX as u64)
            .map(|u| carried(u, &[u as u8; 3], &[]))
            .collect();
        let edges = vec![
            Carried {
                user: u64::MAX,
                device: u32::MAX,
                version: crate::proto::VERSION_MAX,
                input: vec![9; 16],
                output: vec![8; OUTPUT_BYTES_MAX],
                transport: Transport::Tern,
                raw: Vec::new(),
            },
            carried(1, b"", b""),
        ];
        let transports = vec![
            Carried {
                transport: Transport::WebSocket {
                    in_message: true,
                    message_bytes: 16 + crate::proto::LEN_PREFIX_BYTES_MAX as u32,
                },
                raw: vec![0x82; 16 + RAW_SLACK_BYTES],
                ..carried(5, b"partial", b"\x82\x01x")
            },
            Carried {
                transport: Transport::Mqtt {
                    mode: mqtt_mode(),
                    inflight: Inflight::from_entries(vec![(65535, 9), (1, 10)]).unwrap(),
                },
                raw: vec![0x30, 0x05],
                ..carried(6, b"", b"\x40\x02\x00\x01")
            },
        ];
        for batch in [vec![carried(7, b"", b"")], edges, transports, full] {
            let b = bytes(&batch);
            assert_eq!(decode(&b, 16), Ok(batch.clone()));
            for cut in [0, 1, 2, b.len() / 2, b.len() - 1] {
                assert!(decode(&b[..cut], 16).is_err(), "cut at {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(decode(&long, 16), Err(Malformed("trailing bytes")));
        }
        // A record alone: its packet is the kind byte and the batch.
        for c in [
            carried(7, b"AB", b"C"),
            Carried {
                transport: Transport::Mqtt {
                    mode: mqtt_mode(),
                    inflight: Inflight::from_entries(vec![(3, 4)]).unwrap(),
                },
                ..carried(6, b"", b"")
            },
        ] {
            assert_eq!(packet_bytes(&c), 1 + bytes(std::slice::from_ref(&c)).len());
        }
    }

    #[test]
    fn out_of_range_fields_are_refused_before_allocating() {
        let good = bytes(&[carried(7, b"AB", b"")]);
        assert_eq!(
            decode(&good, 1),
            Err(Malformed("partial input longer than a frame"))
        );
        let mut zero = good.clone();
        zero[2] = 0;
        assert_eq!(
            decode(&zero, 16),
            Err(Malformed("user 0 is never logged in"))
        );
        for v in [0, crate::proto::VERSION_MAX + 1] {
            let mut bad = good.clone();
            bad[14] = v;
            assert_eq!(decode(&bad, 16), Err(Malformed("unknown protocol version")));
        }
        let mut kind = good.clone();
        kind[15] = 3;
        assert_eq!(decode(&kind, 16), Err(Malformed("unknown transport")));
        // An output length past the limit, with no bytes behind it: refused
        // for the length, not read.
        let mut huge = good.clone();
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&huge, 16),
            Err(Malformed("unsent output over the limit"))
        );
        let mut raw = good.clone();
        raw[24..28].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            decode(&raw, 16),
            Err(Malformed("raw bytes on a Tern connection"))
        );
        assert_eq!(
            decode(&[0, 0], 16),
            Err(Malformed("record count out of range"))
        );
        let over = (FDS_PER_MESSAGE_MAX as u16 + 1).to_le_bytes();
        assert_eq!(
            decode(&over, 16),
            Err(Malformed("record count out of range"))
        );
    }

    #[test]
    fn any_byte_changed_decodes_or_is_refused_never_panics() {
        let batch = [
            carried(5, b"AB", b"C"),
            Carried {
                transport: Transport::WebSocket {
                    in_message: true,
                    message_bytes: 3,
                },
                raw: vec![0x80, 0x81],
                ..carried(6, b"D", b"")
            },
            Carried {
                transport: Transport::Mqtt {
                    mode: mqtt_mode(),
                    inflight: Inflight::from_entries(vec![(1, 2), (3, 4)]).unwrap(),
                },
                raw: vec![0x30],
                ..carried(7, b"", b"E")
            },
        ];
        let good = bytes(&batch);
        for at in 0..good.len() {
            for v in [0, 1, 2, 0x7f, 0xff] {
                let mut b = good.clone();
                b[at] = v;
                if let Ok(got) = decode(&b, 16) {
                    assert!(got.iter().all(|c| c.input.len() <= 16 && c.user != 0));
                }
            }
        }
    }

    #[test]
    fn bad_websocket_and_mqtt_state_is_refused() {
        let ws = |in_message, message_bytes, raw: usize| Carried {
            transport: Transport::WebSocket {
                in_message,
                message_bytes,
            },
            raw: vec![1; raw],
            ..carried(5, b"", b"")
        };
        let message_max = 16 + crate::proto::LEN_PREFIX_BYTES_MAX as u32;
        assert_eq!(
            decode(&bytes(&[ws(true, message_max + 1, 0)]), 16),
            Err(Malformed("WebSocket message size out of range"))
        );
        assert_eq!(
            decode(&bytes(&[ws(false, 1, 0)]), 16),
            Err(Malformed("WebSocket message size out of range"))
        );
        assert_eq!(
            decode(&bytes(&[ws(false, 0, 16 + RAW_SLACK_BYTES + 1)]), 16),
            Err(Malformed("raw input longer than a frame"))
        );
        let mut flag = bytes(&[ws(false, 0, 0)]);
        flag[28] = 2;
        assert_eq!(
            decode(&flag, 16),
            Err(Malformed("bad WebSocket message flag"))
        );
        let mqtt = Carried {
            transport: Transport::Mqtt {
                mode: mqtt_mode(),
                inflight: Inflight::from_entries(vec![(3, 4), (5, 6)]).unwrap(),
            },
            ..carried(6, b"", b"")
        };
        let good = bytes(&[mqtt]);
        // Not connected (the MQTT flag alone).
        let mut mode = good.clone();
        mode[28] = 0x80;
        assert_eq!(decode(&mode, 16), Err(Malformed("bad MQTT state")));
        // The second packet id repeats the first.
        let mut pids = good.clone();
        pids[45..47].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(decode(&pids, 16), Err(Malformed("bad MQTT packet ids")));
        // An in-flight count past the bytes there: too short, not read.
        let mut count = good.clone();
        count[33..35].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(decode(&count, 16), Err(Malformed("too short")));
    }
}
