//! The log record format: pure encode and decode, no I/O.
//!
//! ```text
//! offset  size  field
//!      0     4  len      u32 LE: bytes from `kind` to the end of the record
//!      4     4  crc      u32 LE: crc32c (Castagnoli) of those `len` bytes
//!      8     1  kind     1 = Queued, 2 = Delivered, 3 = Queued with its
//!                        origin, 4 = Taken (0 is never valid, so
//!                        zero-filled space never parses)
//! Queued (kind 1, a protocol v1 sender), len = 33 + body length:
//!      9     8  user       recipient's user id
//!     17     8  server_id
//!     25     8  from       sender's user id
//!     33     8  time_ms    when the server accepted it, ms since the Unix epoch
//!     41     …  body       the rest of the record
//! Delivered (kind 2, the tombstone of a Queued record), len = 17:
//!      9     8  user
//!     17     8  server_id
//! Queued with its origin (kind 3, a protocol v2 sender), len = 45 + body:
//!      9    32  user, server_id, from, time_ms, as in kind 1
//!     41     4  device     the sender's device (0 until devices exist)
//!     45     8  client_id  the sender's id for the message
//!     53     …  body
//! Taken (kind 4: a v2 SEND taken, whose message is gone but whose
//! client_id is still in its sender's dedupe window), len = 37:
//!      9     8  from
//!     17     4  device
//!     21     8  client_id
//!     29     8  server_id
//!     37     8  time_ms
//! Body (kind 13: the body of a group message, stored once per shard for
//! all its members homed there), len = 25 + body:
//!      9     8  server_id  the id every member's copy has
//!     17     8  from       sender's user id (the group marker)
//!     25     8  time_ms
//!     33     …  body
//! Member (kind 14: a member's copy of the Body with the same server_id;
//! its tombstone is a Delivered record), len = 17:
//!      9     8  user
//!     17     8  server_id
//! ```
//!
//! Kinds 1 and 2 are the whole of format version 1; kinds 3 and 4 came with
//! idempotent SEND (protocol v2). A log written before them has none and
//! opens as it is; a v1 message keeps its kind 1 record.
//!
//! All integers are little-endian and fixed-width. The length is checked
//! against [`PAYLOAD_BYTES_MAX`] before anything looks at the payload, and
//! [`decode`] keeps "not all bytes here yet" ([`Decoded::Incomplete`]) apart
//! from "these bytes are wrong" ([`Decoded::Malformed`]).

use super::Origin;

/// Bytes before the payload: `len` and `crc`.
pub(crate) const HEADER_BYTES: usize = 8;
/// Payload bytes of a Queued record besides its body.
pub(crate) const QUEUED_FIXED_BYTES: usize = 1 + 4 * 8;
/// Payload bytes of a Delivered record.
pub(crate) const DELIVERED_BYTES: usize = 1 + 2 * 8;
/// Payload bytes of a Queued record with its origin, besides its body.
pub(crate) const QUEUED_ORIGIN_FIXED_BYTES: usize = QUEUED_FIXED_BYTES + 4 + 8;
/// Payload bytes of a Taken record.
pub(crate) const TAKEN_BYTES: usize = 1 + 8 + 4 + 3 * 8;
/// Payload bytes of a Body record besides its body.
pub(crate) const BODY_FIXED_BYTES: usize = 1 + 3 * 8;
/// Payload bytes of a Member record.
pub(crate) const MEMBER_BYTES: usize = 1 + 2 * 8;
/// Largest body a record holds: 16 MiB, the largest `frame_bytes_max` the
/// config accepts, so any body the protocol lets in fits.
pub const BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest `len` a valid record has.
pub(crate) const PAYLOAD_BYTES_MAX: usize = QUEUED_ORIGIN_FIXED_BYTES + BODY_BYTES_MAX;

const KIND_QUEUED: u8 = 1;
const KIND_DELIVERED: u8 = 2;
const KIND_QUEUED_ORIGIN: u8 = 3;
const KIND_TAKEN: u8 = 4;
const KIND_BODY: u8 = 13;
const KIND_MEMBER: u8 = 14;

// The header's u32 length must be able to express every valid payload.
const _: () = assert!(PAYLOAD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(DELIVERED_BYTES < QUEUED_FIXED_BYTES);
// The smallest payload bounds the length check in `decode`; a Taken record
// is never longer than the Queued record (with origin) it may stand in for.
const _: () = assert!(DELIVERED_BYTES < TAKEN_BYTES && TAKEN_BYTES <= QUEUED_ORIGIN_FIXED_BYTES);
const _: () = assert!(DELIVERED_BYTES <= MEMBER_BYTES && BODY_FIXED_BYTES < QUEUED_FIXED_BYTES);

/// One log record, borrowing its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// `server_id` was queued for `user`; `origin` for a v2 sender.
    Queued {
        user: u64,
        server_id: u64,
        from: u64,
        time_ms: u64,
        origin: Option<Origin>,
        body: &'a [u8],
    },
    /// `server_id` was delivered to `user` (or otherwise removed).
    Delivered { user: u64, server_id: u64 },
    /// `from`'s SEND `origin` was taken as `server_id` at `time_ms`: a
    /// dedupe window entry that outlived its message.
    Taken {
        from: u64,
        origin: Origin,
        server_id: u64,
        time_ms: u64,
    },
    /// The body of group message `server_id`, shared by the `Member`
    /// records with that id (a group copy is never from a v2 origin).
    Body {
        server_id: u64,
        from: u64,
        time_ms: u64,
        body: &'a [u8],
    },
    /// `user`'s copy of the body `server_id` was queued.
    Member { user: u64, server_id: u64 },
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A valid record and its encoded size (header included).
    Record(Record<'a>, usize),
    /// The buffer ends before the record does (or before its header).
    Incomplete,
    /// The bytes are not a valid record.
    Malformed(&'static str),
}

impl Record<'_> {
    /// Encoded size of a Queued record with a `body_len`-byte body.
    pub(crate) const fn queued_bytes(body_len: usize) -> usize {
        HEADER_BYTES + QUEUED_FIXED_BYTES + body_len
    }

    /// Encoded size of a Queued record with an origin and a `body_len`-byte
    /// body.
    pub(crate) const fn queued_origin_bytes(body_len: usize) -> usize {
        HEADER_BYTES + QUEUED_ORIGIN_FIXED_BYTES + body_len
    }

    /// Encoded size of a Delivered record.
    pub(crate) const fn delivered_bytes() -> usize {
        HEADER_BYTES + DELIVERED_BYTES
    }

    /// Encoded size of a Taken record.
    pub(crate) const fn taken_bytes() -> usize {
        HEADER_BYTES + TAKEN_BYTES
    }

    /// Encoded size of a Body record with a `body_len`-byte body.
    pub(crate) const fn body_bytes(body_len: usize) -> usize {
        HEADER_BYTES + BODY_FIXED_BYTES + body_len
    }

    /// Encoded size of a Member record.
    pub(crate) const fn member_bytes() -> usize {
        HEADER_BYTES + MEMBER_BYTES
    }

    /// Encoded size, header included.
    pub(crate) fn encoded_len(&self) -> usize {
        match self {
            Record::Queued {
                origin: None, body, ..
            } => Self::queued_bytes(body.len()),
            Record::Queued {
                origin: Some(_),
                body,
                ..
            } => Self::queued_origin_bytes(body.len()),
            Record::Delivered { .. } => Self::delivered_bytes(),
            Record::Taken { .. } => Self::taken_bytes(),
            Record::Body { body, .. } => Self::body_bytes(body.len()),
            Record::Member { .. } => Self::member_bytes(),
        }
    }

    /// Whether the record is one we may write: the body must fit
    /// [`BODY_BYTES_MAX`]. Checked before append and after read-back.
    pub(crate) fn is_valid(&self) -> bool {
        match self {
            Record::Queued { body, .. } | Record::Body { body, .. } => body.len() <= BODY_BYTES_MAX,
            Record::Delivered { .. } | Record::Taken { .. } | Record::Member { .. } => true,
        }
    }

    /// Appends the encoded record to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.is_valid(), "invalid record {self:?}");
        let start = out.len();
        let payload_len = self.encoded_len() - HEADER_BYTES;
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]); // crc, filled in below
        match *self {
            Record::Queued {
                user,
                server_id,
                from,
                time_ms,
                origin,
                body,
            } => {
                out.push(if origin.is_some() {
                    KIND_QUEUED_ORIGIN
                } else {
                    KIND_QUEUED
                });
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&server_id.to_le_bytes());
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&time_ms.to_le_bytes());
                if let Some(o) = origin {
                    out.extend_from_slice(&o.device.to_le_bytes());
                    out.extend_from_slice(&o.client_id.to_le_bytes());
                }
                out.extend_from_slice(body);
            }
            Record::Delivered { user, server_id } => {
                out.push(KIND_DELIVERED);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&server_id.to_le_bytes());
            }
            Record::Taken {
                from,
                origin,
                server_id,
                time_ms,
            } => {
                out.push(KIND_TAKEN);
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&origin.device.to_le_bytes());
                out.extend_from_slice(&origin.client_id.to_le_bytes());
                out.extend_from_slice(&server_id.to_le_bytes());
                out.extend_from_slice(&time_ms.to_le_bytes());
            }
            Record::Body {
                server_id,
                from,
                time_ms,
                body,
            } => {
                out.push(KIND_BODY);
                out.extend_from_slice(&server_id.to_le_bytes());
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&time_ms.to_le_bytes());
                out.extend_from_slice(body);
            }
            Record::Member { user, server_id } => {
                out.push(KIND_MEMBER);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&server_id.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, self.encoded_len());
        // Paired with the read-back check in recovery: what we write decodes
        // to what we meant.
        debug_assert_eq!(
            decode(&out[start..]),
            Decoded::Record(*self, out.len() - start)
        );
    }
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Decodes the record at the start of `buf`. Never allocates, never panics.
pub(crate) fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_BYTES {
        return Decoded::Incomplete;
    }
    let len = u32_at(buf, 0) as usize;
    // Bounds first: a wild length must not send us past the buffer or make a
    // caller wait for gigabytes.
    if !(DELIVERED_BYTES..=PAYLOAD_BYTES_MAX).contains(&len) {
        return Decoded::Malformed("record length out of range");
    }
    let Some(payload) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Decoded::Incomplete;
    };
    if crc32c::crc32c(payload) != u32_at(buf, 4)
        && !crate::sim::planted(crate::sim::Planted::SkipChecksum)
    {
        return Decoded::Malformed("checksum mismatch");
    }
    let record = match payload[0] {
        KIND_QUEUED => {
            if len < QUEUED_FIXED_BYTES {
                return Decoded::Malformed("queued record shorter than its fields");
            }
            Record::Queued {
                user: u64_at(payload, 1),
                server_id: u64_at(payload, 9),
                from: u64_at(payload, 17),
                time_ms: u64_at(payload, 25),
                origin: None,
                body: &payload[QUEUED_FIXED_BYTES..],
            }
        }
        KIND_QUEUED_ORIGIN => {
            if len < QUEUED_ORIGIN_FIXED_BYTES {
                return Decoded::Malformed("queued record shorter than its fields");
            }
            Record::Queued {
                user: u64_at(payload, 1),
                server_id: u64_at(payload, 9),
                from: u64_at(payload, 17),
                time_ms: u64_at(payload, 25),
                origin: Some(Origin {
                    device: u32_at(payload, 33),
                    client_id: u64_at(payload, 37),
                }),
                body: &payload[QUEUED_ORIGIN_FIXED_BYTES..],
            }
        }
        KIND_TAKEN => {
            if len != TAKEN_BYTES {
                return Decoded::Malformed("taken record of the wrong length");
            }
            Record::Taken {
                from: u64_at(payload, 1),
                origin: Origin {
                    device: u32_at(payload, 9),
                    client_id: u64_at(payload, 13),
                },
                server_id: u64_at(payload, 21),
                time_ms: u64_at(payload, 29),
            }
        }
        KIND_DELIVERED => {
            if len != DELIVERED_BYTES {
                return Decoded::Malformed("delivered record of the wrong length");
            }
            Record::Delivered {
                user: u64_at(payload, 1),
                server_id: u64_at(payload, 9),
            }
        }
        KIND_BODY => {
            if len < BODY_FIXED_BYTES {
                return Decoded::Malformed("body record shorter than its fields");
            }
            Record::Body {
                server_id: u64_at(payload, 1),
                from: u64_at(payload, 9),
                time_ms: u64_at(payload, 17),
                body: &payload[BODY_FIXED_BYTES..],
            }
        }
        KIND_MEMBER => {
            if len != MEMBER_BYTES {
                return Decoded::Malformed("member record of the wrong length");
            }
            Record::Member {
                user: u64_at(payload, 1),
                server_id: u64_at(payload, 9),
            }
        }
        _ => return Decoded::Malformed("unknown record kind"),
    };
    Decoded::Record(record, HEADER_BYTES + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = (u8, u64, u64, u64, u64, Vec<u8>)> {
        (
            0u8..6,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
    }

    fn make(t: &(u8, u64, u64, u64, u64, Vec<u8>)) -> Record<'_> {
        let (kind, user, server_id, from, time_ms, body) = t;
        // The record's own fields stand in for the origin's.
        let origin = Origin {
            device: *from as u32,
            client_id: time_ms.rotate_left(7),
        };
        match kind {
            0 | 2 => Record::Queued {
                user: *user,
                server_id: *server_id,
                from: *from,
                time_ms: *time_ms,
                origin: (*kind == 2).then_some(origin),
                body,
            },
            1 => Record::Delivered {
                user: *user,
                server_id: *server_id,
            },
            4 => Record::Body {
                server_id: *server_id,
                from: *from,
                time_ms: *time_ms,
                body,
            },
            5 => Record::Member {
                user: *user,
                server_id: *server_id,
            },
            _ => Record::Taken {
                from: *user,
                origin,
                server_id: *server_id,
                time_ms: *time_ms,
            },
        }
    }

    proptest! {
        #[test]
        fn round_trip(t in arb_record(), junk in prop::collection::vec(any::<u8>(), 0..20)) {
            let rec = make(&t);
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            prop_assert_eq!(buf.len(), rec.encoded_len());
            // Trailing bytes (the next record) are not consumed.
            buf.extend_from_slice(&junk);
            prop_assert_eq!(decode(&buf), Decoded::Record(rec, rec.encoded_len()));
        }

        #[test]
        fn any_bit_flip_is_rejected(t in arb_record(), bit in any::<prop::sample::Index>()) {
            let rec = make(&t);
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            let bit = bit.index(buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            // crc32c detects every single-bit error in the payload; a flip in
            // the length gives a range error, a short read or a crc mismatch.
            prop_assert!(!matches!(decode(&buf), Decoded::Record(..)), "flip {} accepted", bit);
        }

        #[test]
        fn every_prefix_is_incomplete(t in arb_record()) {
            let rec = make(&t);
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut]), Decoded::Incomplete);
            }
        }
    }

    #[test]
    fn checksum_mismatch_is_malformed() {
        let mut buf = Vec::new();
        Record::Delivered {
            user: 7,
            server_id: 1025,
        }
        .encode(&mut buf);
        buf[12] ^= 0x40;
        assert_eq!(decode(&buf), Decoded::Malformed("checksum mismatch"));
    }

    #[test]
    fn zeros_and_wild_lengths_are_malformed() {
        assert_eq!(
            decode(&[0; 64]),
            Decoded::Malformed("record length out of range")
        );
        let mut buf = vec![0xff; 64];
        buf[..4].copy_from_slice(&((PAYLOAD_BYTES_MAX + 1) as u32).to_le_bytes());
        assert_eq!(
            decode(&buf),
            Decoded::Malformed("record length out of range")
        );
    }

    #[test]
    fn unknown_kind_and_wrong_sizes() {
        let with = |kind: u8, len: usize| {
            let mut payload = vec![kind];
            payload.resize(len, 3);
            let mut buf = (len as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            buf
        };
        assert_eq!(
            decode(&with(0, 20)),
            Decoded::Malformed("unknown record kind")
        );
        assert_eq!(
            decode(&with(5, 20)),
            Decoded::Malformed("unknown record kind")
        );
        assert_eq!(
            decode(&with(KIND_QUEUED, QUEUED_FIXED_BYTES - 1)),
            Decoded::Malformed("queued record shorter than its fields")
        );
        assert_eq!(
            decode(&with(KIND_DELIVERED, DELIVERED_BYTES + 1)),
            Decoded::Malformed("delivered record of the wrong length")
        );
        // The edges that are valid.
        assert!(matches!(
            decode(&with(KIND_QUEUED, QUEUED_FIXED_BYTES)),
            Decoded::Record(Record::Queued { body: [], .. }, 41)
        ));
        assert!(matches!(
            decode(&with(KIND_DELIVERED, DELIVERED_BYTES)),
            Decoded::Record(Record::Delivered { .. }, 25)
        ));
        assert_eq!(
            decode(&with(KIND_QUEUED_ORIGIN, QUEUED_ORIGIN_FIXED_BYTES - 1)),
            Decoded::Malformed("queued record shorter than its fields")
        );
        assert!(matches!(
            decode(&with(KIND_QUEUED_ORIGIN, QUEUED_ORIGIN_FIXED_BYTES)),
            Decoded::Record(
                Record::Queued {
                    origin: Some(_),
                    body: [],
                    ..
                },
                53
            )
        ));
        assert_eq!(
            decode(&with(KIND_TAKEN, TAKEN_BYTES + 1)),
            Decoded::Malformed("taken record of the wrong length")
        );
        assert!(matches!(
            decode(&with(KIND_TAKEN, TAKEN_BYTES)),
            Decoded::Record(Record::Taken { .. }, 45)
        ));
        assert_eq!(
            decode(&with(KIND_BODY, BODY_FIXED_BYTES - 1)),
            Decoded::Malformed("body record shorter than its fields")
        );
        assert!(matches!(
            decode(&with(KIND_BODY, BODY_FIXED_BYTES)),
            Decoded::Record(Record::Body { body: [], .. }, 33)
        ));
        assert_eq!(
            decode(&with(KIND_MEMBER, MEMBER_BYTES + 1)),
            Decoded::Malformed("member record of the wrong length")
        );
        assert!(matches!(
            decode(&with(KIND_MEMBER, MEMBER_BYTES)),
            Decoded::Record(Record::Member { .. }, 25)
        ));
    }

    #[test]
    fn largest_body_round_trips() {
        let body = vec![0x5a; BODY_BYTES_MAX];
        let rec = Record::Queued {
            user: u64::MAX,
            server_id: u64::MAX,
            from: 0,
            time_ms: 1,
            origin: Some(Origin {
                device: u32::MAX,
                client_id: u64::MAX,
            }),
            body: &body,
        };
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        assert_eq!(decode(&buf), Decoded::Record(rec, buf.len()));
    }
}
