//! The session state of carried connections, pure: bytes in, records out.
//!
//! The hand-over sends the records in batches, one packet each with the
//! connections' sockets attached
//! ([`super::channel::Channel::send_carried`]); a batch holds at most
//! [`FDS_PER_MESSAGE_MAX`] records, the `i`-th for the `i`-th descriptor.
//!
//! What travels for a plaintext, logged-in connection, and why only this:
//!
//! - `user`, `device` and `version`: the successor installs the session
//!   on the user's home shard of *its own* shard count (it may differ), so
//!   the old shard is not carried; the device keeps its own
//!   idempotent-SEND window and its place among the user's sessions.
//! - `input`: bytes read but not decoded (a partial frame), at most
//!   `frame_bytes_max` of the successor's configuration, checked before
//!   allocating.
//! - `output`: bytes written but not sent (answers, DELIVERs), at most
//!   [`OUTPUT_BYTES_MAX`]; a connection with more pending gets BYE(upgrade)
//!   instead of being carried.
//!
//! On io_uring the connection's socket is a direct descriptor: the old
//! process installs it as a process descriptor just before sending
//! (IORING_OP_FIXED_FD_INSTALL) and closes that at once; the successor
//! registers it into its own fixed-file table (IORING_OP_FILES_UPDATE)
//! and closes it too. Either process may run either backend.
//!
//! DELIVERs sent and not yet DELIVERED are not carried: they are in the
//! store, which the successor replays, and its session re-delivers them
//! with the same server id (a duplicate the protocol allows: the client
//! drops a server id it has seen). TLS connections are never carried
//! (their keys stay in the old process): they get BYE(upgrade) and
//! close_notify.
//!
//! Layout, little-endian: `count: u16`, then `count` records of
//! `user: u64`, `device: u32`, `version: u8`, `input_len: u32`,
//! `output_len: u32`, the input bytes, the output bytes. Example, one record
//! of user 7, device 3, version 1, input `AB`, no output:
//! `01 00  07 00 00 00 00 00 00 00  03 00 00 00  01  02 00 00 00  00 00 00 00  41 42`.

use std::fmt;

use super::wire::FDS_PER_MESSAGE_MAX;

/// Most unsent output bytes a carried connection may have; one with more
/// is closed with BYE(upgrade) instead (a slow reader, whose backlog is
/// still in the store).
pub const OUTPUT_BYTES_MAX: usize = 64 * 1024;

/// Bytes of a record before its input and output.
pub const RECORD_HEAD_BYTES: usize = 8 + 4 + 1 + 4 + 4;

/// The session state of one carried connection; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    /// The user its LOGIN proved.
    pub user: u64,
    /// The device its token named (0 for a `v1.` token).
    pub device: u32,
    /// The protocol version of its LOGIN, `1..=proto::VERSION_MAX`.
    pub version: u8,
    /// Read and not yet decoded (a partial frame).
    pub input: Vec<u8>,
    /// Written and not yet sent.
    pub output: Vec<u8>,
}

/// Bytes of a packet holding `carried` alone: more than
/// [`super::wire::CARRIED_PACKET_BYTES_MAX`] and it cannot be carried.
pub fn packet_bytes(carried: &Carried) -> usize {
    1 + 2 + RECORD_HEAD_BYTES + carried.input.len() + carried.output.len()
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
        out.extend_from_slice(&(c.input.len() as u32).to_le_bytes());
        out.extend_from_slice(&(c.output.len() as u32).to_le_bytes());
        out.extend_from_slice(&c.input);
        out.extend_from_slice(&c.output);
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
    let mut batch = Vec::with_capacity(count);
    for _ in 0..count {
        let head = take(RECORD_HEAD_BYTES)?;
        let user = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let device = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let version = head[12];
        let input_len = u32::from_le_bytes(head[13..17].try_into().expect("4 bytes")) as usize;
        let output_len = u32::from_le_bytes(head[17..21].try_into().expect("4 bytes")) as usize;
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
        let input = take(input_len)?.to_vec();
        let output = take(output_len)?.to_vec();
        batch.push(Carried {
            user,
            device,
            version,
            input,
            output,
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
        }
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
                0x01, 0x00, 0x07, 0, 0, 0, 0, 0, 0, 0, 0x03, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0, 0,
                0, 0x41, 0x42
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
            },
            carried(1, b"", b""),
        ];
        for batch in [vec![carried(7, b"", b"")], edges, full] {
            let b = bytes(&batch);
            assert_eq!(decode(&b, 16), Ok(batch.clone()));
            for cut in [0, 1, 2, b.len() / 2, b.len() - 1] {
                assert!(decode(&b[..cut], 16).is_err(), "cut at {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(decode(&long, 16), Err(Malformed("trailing bytes")));
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
        // An output length past the limit, with no bytes behind it: refused
        // for the length, not read.
        let mut huge = good.clone();
        huge[19..23].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&huge, 16),
            Err(Malformed("unsent output over the limit"))
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
}
