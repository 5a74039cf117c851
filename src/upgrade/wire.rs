//! The hand-over protocol's messages, pure: bytes in, messages out.
//!
//! Every message is one `SOCK_SEQPACKET` packet (the boundaries are the
//! kernel's), laid out as `kind: u8` then the fields, little-endian:
//!
//! | kind | message     | fields                                          | direction |
//! |------|-------------|-------------------------------------------------|-----------|
//! | 1    | `Hello`     | `format: u16`, `pid: u32`                       | new → old |
//! | 2    | `Listeners` | `format: u16`, `generation: u64`, `counts: [u16; 5]` (plain, TLS, WebSocket, MQTT, MQTT over TLS) | old → new |
//! | 3    | `Fds`       | `count: u16`, with `count` descriptors (SCM_RIGHTS) | old → new |
//! | 4    | `Released`  | (none)                                          | old → new |
//! | 5    | `Serving`   | `pid: u32`                                      | new → old |
//! | 6    | `Carried`   | `count: u32`: that many connections were sent   | old → new |
//! | 7    | (connections) | a [`super::state`] batch, with its sockets    | old → new |
//! | 8    | `Tickets`   | `present: u8`, then (if 1) the TLS ticket keys ([`crate::ticket::TicketKeys::encode`]) | old → new |
//!
//! Format 4 carries WebSocket and MQTT connections too: each record of
//! kind 7 says its transport and that layer's state ([`super::state`]);
//! format 3 carried plaintext Tern connections only. Format 4's
//! `Listeners` counts every kind of listener (all are handed over, so no
//! connection attempt on any port is refused during an upgrade); format
//! 3's counted plain and TLS only (a shorter packet, read with the missing
//! counts 0, so the successor can name the old format). Otherwise the
//! messages are those of format 3.
//! In format 3 `Tickets` follows the listeners' descriptors: the
//! successor seals and opens TLS session tickets with the old process's
//! keys, so TLS clients resume after their BYE(upgrade). The carried
//! connections come after `Released`, in batches
//! (kind 7: 1 to [`FDS_PER_MESSAGE_MAX`] records, the `i`-th for the `i`-th
//! descriptor), while the successor already serves; `Carried` ends them
//! and says how many there were. So neither process ever holds more
//! than a few batches of them as process descriptors (a million
//! connections pass an open-files limit of 20,000). Format 2 sent
//! `Carried` first, then one connection per packet, all before
//! `Released`; format 1 carried none.
//! `format` is [`FORMAT_VERSION`] of the sender; each side refuses a format
//! it does not know, so binaries of different versions either agree or the
//! old one keeps serving. Example, a `Hello` of format 1 from pid 4660:
//! `01 01 00 34 12 00 00`.

use std::fmt;

use crate::io::LISTENERS;
use crate::ticket::{TicketKeys, ENCODED_BYTES as TICKET_KEYS_BYTES};

/// The hand-over format this build speaks. A new format gets a new number;
/// a process refuses a peer whose number it does not know.
pub const FORMAT_VERSION: u16 = 4;

/// Descriptors at most in one `Fds` message: under the kernel's
/// `SCM_MAX_FD` (253).
pub const FDS_PER_MESSAGE_MAX: usize = 250;

/// The kind byte of a packet of carried connections (their states and
/// descriptors), read by [`super::channel::Channel::recv_carried`], never
/// by [`Message::decode`].
pub const CARRIED_KIND: u8 = 7;

/// Bytes of the largest packet of carried connections: a connection whose
/// partial input and unsent output do not fit alone is closed instead (its
/// client reconnects). Under the Unix socket's default send buffer
/// (208 KiB), so one packet always goes.
pub const CARRIED_PACKET_BYTES_MAX: usize = 160 * 1024;

/// Bytes of the largest message (`Tickets` with keys).
pub const MESSAGE_BYTES_MAX: usize = 2 + TICKET_KEYS_BYTES;

/// One message of the hand-over protocol; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// The successor validated its configuration and is ready to take over.
    Hello {
        /// Its hand-over format.
        format: u16,
        /// Its process id.
        pid: u32,
    },
    /// The listening sockets follow, in `Fds` messages: `counts[k]` of
    /// listener kind `k` ([`crate::io::Listener::ALL`] order: one per shard, or none
    /// when that listener is not configured), kind after kind.
    Listeners {
        /// The old process's hand-over format.
        format: u16,
        /// The old process's generation; the successor's is one more.
        generation: u64,
        /// Listeners of each kind, in [`crate::io::Listener::ALL`] order.
        counts: [u16; LISTENERS],
    },
    /// `count` descriptors travel with this packet.
    Fds {
        /// How many, `1..=FDS_PER_MESSAGE_MAX`.
        count: u16,
    },
    /// The old process has closed its logs and released the data
    /// directory's lock: the successor may open them.
    Released,
    /// The successor serves; the old process exits.
    Serving {
        /// The successor's process id.
        pid: u32,
    },
    /// The old process's TLS session ticket keys (`None` without TLS).
    Tickets {
        /// The keys.
        keys: Option<TicketKeys>,
    },
    /// The carried connections' packets are over: `count` connections
    /// were sent (the successor checks it took as many).
    Carried {
        /// How many.
        count: u32,
    },
}

/// A packet that is not a message of this format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed hand-over message: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

impl Message {
    /// Appends the packet's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Message::Hello { format, pid } => {
                out.push(1);
                out.extend_from_slice(&format.to_le_bytes());
                out.extend_from_slice(&pid.to_le_bytes());
            }
            Message::Listeners {
                format,
                generation,
                counts,
            } => {
                out.push(2);
                out.extend_from_slice(&format.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                let kinds = if format < 4 { 2 } else { LISTENERS };
                for count in &counts[..kinds] {
                    out.extend_from_slice(&count.to_le_bytes());
                }
            }
            Message::Fds { count } => {
                debug_assert!((1..=FDS_PER_MESSAGE_MAX).contains(&usize::from(count)));
                out.push(3);
                out.extend_from_slice(&count.to_le_bytes());
            }
            Message::Released => out.push(4),
            Message::Serving { pid } => {
                out.push(5);
                out.extend_from_slice(&pid.to_le_bytes());
            }
            Message::Carried { count } => {
                out.push(6);
                out.extend_from_slice(&count.to_le_bytes());
            }
            Message::Tickets { keys } => {
                out.push(8);
                out.push(u8::from(keys.is_some()));
                if let Some(keys) = keys {
                    keys.encode(out);
                }
            }
        }
    }

    /// Decodes one whole packet.
    pub fn decode(packet: &[u8]) -> Result<Message, Malformed> {
        let (&kind, mut rest) = packet.split_first().ok_or(Malformed("empty packet"))?;
        let mut take = |n: usize| -> Result<&[u8], Malformed> {
            if rest.len() < n {
                return Err(Malformed("packet too short for its kind"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u16_at = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let message = match kind {
            1 => Message::Hello {
                format: u16_at(take(2)?),
                pid: u32_at(take(4)?),
            },
            2 => {
                let format = u16_at(take(2)?);
                let generation = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
                // Formats up to 3 counted plain and TLS only: the rest
                // read as 0 (the successor then names the old format).
                let kinds = if format < 4 { 2 } else { LISTENERS };
                let mut counts = [0u16; LISTENERS];
                for count in &mut counts[..kinds] {
                    *count = u16_at(take(2)?);
                }
                Message::Listeners {
                    format,
                    generation,
                    counts,
                }
            }
            3 => {
                let count = u16_at(take(2)?);
                if count == 0 || usize::from(count) > FDS_PER_MESSAGE_MAX {
                    return Err(Malformed("descriptor count out of range"));
                }
                Message::Fds { count }
            }
            4 => Message::Released,
            5 => Message::Serving {
                pid: u32_at(take(4)?),
            },
            6 => Message::Carried {
                count: u32_at(take(4)?),
            },
            8 => match take(1)?[0] {
                0 => Message::Tickets { keys: None },
                1 => Message::Tickets {
                    keys: Some(
                        TicketKeys::decode(take(TICKET_KEYS_BYTES)?)
                            .map_err(|_| Malformed("bad ticket keys"))?,
                    ),
                },
                _ => return Err(Malformed("bad ticket keys flag")),
            },
            _ => return Err(Malformed("unknown kind")),
        };
        if !rest.is_empty() {
            return Err(Malformed("trailing bytes"));
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(m: Message) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    #[test]
    fn a_format_3_listeners_packet_reads_with_the_missing_counts_zero() {
        // kind 2, format 3, generation 7, plain 2, TLS 2: no more counts.
        let mut packet = vec![2, 3, 0];
        packet.extend_from_slice(&7u64.to_le_bytes());
        packet.extend_from_slice(&[2, 0, 2, 0]);
        assert_eq!(
            Message::decode(&packet),
            Ok(Message::Listeners {
                format: 3,
                generation: 7,
                counts: [2, 2, 0, 0, 0],
            })
        );
        // Without the TLS count it is too short.
        assert!(Message::decode(&packet[..packet.len() - 2]).is_err());
    }

    #[test]
    fn every_message_round_trips_and_fits() {
        let all = [
            Message::Hello {
                format: FORMAT_VERSION,
                pid: 4660,
            },
            Message::Listeners {
                format: FORMAT_VERSION,
                generation: u64::MAX,
                counts: [1024, 0, 1024, 1024, 0],
            },
            Message::Fds { count: 1 },
            Message::Fds {
                count: FDS_PER_MESSAGE_MAX as u16,
            },
            Message::Released,
            Message::Serving { pid: u32::MAX },
            Message::Carried { count: 0 },
            Message::Carried { count: u32::MAX },
            Message::Tickets { keys: None },
            Message::Tickets {
                keys: Some(TicketKeys::generate().unwrap()),
            },
        ];
        for m in all {
            let b = bytes(m);
            assert!(b.len() <= MESSAGE_BYTES_MAX, "{m:?}");
            assert_eq!(Message::decode(&b), Ok(m));
            // Every cut is refused, never misread.
            for cut in 0..b.len() {
                assert!(Message::decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(Message::decode(&long), Err(Malformed("trailing bytes")));
        }
    }

    #[test]
    fn the_documented_example() {
        let hello = Message::Hello {
            format: 1,
            pid: 4660,
        };
        assert_eq!(bytes(hello), [0x01, 0x01, 0x00, 0x34, 0x12, 0x00, 0x00]);
    }

    #[test]
    fn bad_kinds_and_counts_are_refused() {
        assert_eq!(Message::decode(&[0]), Err(Malformed("unknown kind")));
        assert_eq!(
            Message::decode(&[CARRIED_KIND]),
            Err(Malformed("unknown kind"))
        );
        assert_eq!(
            Message::decode(&[3, 0, 0]),
            Err(Malformed("descriptor count out of range"))
        );
        let over = (FDS_PER_MESSAGE_MAX as u16 + 1).to_le_bytes();
        assert_eq!(
            Message::decode(&[3, over[0], over[1]]),
            Err(Malformed("descriptor count out of range"))
        );
    }
}
