//! What a clustered node publishes to JetStream (docs/CLUSTER.md,
//! "Cross-node messages"): a message for a partition's user, or a receipt
//! for a partition's sender. Our own small binary layout, versioned by its
//! first byte, with the protocol's varints:
//!
//! ```text
//! message: 01 to from time_ms client_id(0 = v1 sender) body(rest)
//! receipt: 02 user kind server_id peer
//! ```
//!
//! The subject names the partition; the stream sequence is the server id.

use crate::proto::{put_varint, ReceiptKind};

const KIND_MESSAGE: u8 = 1;
const KIND_RECEIPT: u8 = 2;

/// One record of a message stream `TERN_<g>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A message for `to`.
    Message {
        /// Recipient.
        to: u64,
        /// Sender.
        from: u64,
        /// When the sender's node took it (publish time), ms since the epoch.
        time_ms: u64,
        /// The sender's client_id if it spoke version 2, else 0.
        client_id: u64,
        /// The body.
        body: Box<[u8]>,
    },
    /// A receipt for `user`, the original sender.
    Receipt {
        /// Who gets it.
        user: u64,
        /// Delivered or read.
        kind: ReceiptKind,
        /// The message it is about.
        server_id: u64,
        /// Who received or read it.
        peer: u64,
    },
}

impl Record {
    /// The bytes published.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Record::Message {
                to,
                from,
                time_ms,
                client_id,
                body,
            } => {
                out.reserve(32 + body.len());
                out.push(KIND_MESSAGE);
                for v in [*to, *from, *time_ms, *client_id] {
                    put_varint(v, &mut out);
                }
                out.extend_from_slice(body);
            }
            Record::Receipt {
                user,
                kind,
                server_id,
                peer,
            } => {
                out.push(KIND_RECEIPT);
                for v in [*user, *kind as u64, *server_id, *peer] {
                    put_varint(v, &mut out);
                }
            }
        }
        out
    }

    /// Parses a published record; `None` for anything else (a record from
    /// a newer version, or garbage someone published on our subjects).
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let (&kind, mut rest) = bytes.split_first()?;
        let mut next = || -> Option<u64> {
            let (v, used) = varint(rest)?;
            rest = &rest[used..];
            Some(v)
        };
        match kind {
            KIND_MESSAGE => {
                let (to, from, time_ms, client_id) = (next()?, next()?, next()?, next()?);
                Some(Record::Message {
                    to,
                    from,
                    time_ms,
                    client_id,
                    body: rest.into(),
                })
            }
            KIND_RECEIPT => {
                let user = next()?;
                let kind = ReceiptKind::from_u64(next()?)?;
                let (server_id, peer) = (next()?, next()?);
                rest.is_empty().then_some(Record::Receipt {
                    user,
                    kind,
                    server_id,
                    peer,
                })
            }
            _ => None,
        }
    }
}

/// A LEB128 varint at the front of `b`: its value and length.
pub(super) fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Message {
                to: 7,
                from: u64::MAX,
                time_ms: 1_767_225_600_123,
                client_id: 0,
                body: b"hello".to_vec().into(),
            },
            Record::Message {
                to: 1,
                from: 2,
                time_ms: 3,
                client_id: 300,
                body: Box::default(),
            },
            Record::Receipt {
                user: 9,
                kind: ReceiptKind::Read,
                server_id: 1 << 40,
                peer: 3,
            },
        ];
        for r in records {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        assert_eq!(Record::decode(b""), None);
        assert_eq!(Record::decode(&[3, 1, 1]), None);
        assert_eq!(Record::decode(&[KIND_MESSAGE, 1, 2, 0x80]), None);
        assert_eq!(Record::decode(&[KIND_RECEIPT, 1, 9, 1, 1]), None);
        assert_eq!(Record::decode(&[KIND_RECEIPT, 1, 1, 1, 1, 0]), None);
    }
}
