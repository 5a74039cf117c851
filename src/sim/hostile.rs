//! Hostile simulated clients, beyond receipt forgers: what each one writes
//! and the answer docs/PROTOCOL.md promises for it.
//!
//! A hostile client is an honest user otherwise (it logs in with its own
//! token, sends, answers), so everything it is sent must still reach it.
//! On some of its turns it misbehaves in one way, drawn per client:
//!
//! - [`Kind::Garbage`], [`Kind::Malformed`], [`Kind::Oversized`] write bytes
//!   that break the wire format. The documented answer is fatal:
//!   ERROR(code, 0) and the connection closed ("Errors" in PROTOCOL.md).
//! - [`Kind::Flood`] makes a burst of SENDs past `sends_burst_max`; the ones
//!   over the rate get ERROR(`rate_limited`, client_id) and are retried, and
//!   past `rate_refusals_max` refusals the connection gets
//!   BYE(`rate_limited`).
//! - [`Kind::SlowReader`] reads its socket rarely or (until the drain)
//!   never, so the server's output to it backs up; the bound on unsent
//!   output (`conn_out_bytes_max`, BYE(`slow`)) is checked by the world.

use crate::proto::{ErrorCode, Limits};

/// How a hostile client misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Random bytes (redrawn until the codec calls them an error, so the
    /// server cannot wait for more).
    Garbage,
    /// A frame with a bad type byte, a truncated field, a varint that is
    /// not minimal, trailing bytes, or an empty length.
    Malformed,
    /// A length prefix above `frame_bytes_max`.
    Oversized,
    /// Bursts of SENDs past the per-user SEND rate.
    Flood,
    /// Reads only on some turns, or not at all until the drain.
    SlowReader,
}

/// The kinds, in the order of the bits of `Faults::hostile_kinds`.
pub const KINDS: [Kind; 5] = [
    Kind::Garbage,
    Kind::Malformed,
    Kind::Oversized,
    Kind::Flood,
    Kind::SlowReader,
];

/// A hostile client's state: its kind and its own PRNG (so its misdeeds do
/// not shift what the honest clients draw).
pub struct Hostile {
    /// What it does.
    pub kind: Kind,
    /// Its PRNG.
    pub rng: fastrand::Rng,
    /// A slow reader: reads on one turn in this many (0: never, until the
    /// drain).
    pub read_every_turns: u32,
}

/// A hostile client misbehaves on one turn in this many (on average).
pub const MISBEHAVE_EVERY_TURNS: u32 = 8;

/// New SENDs in one flood: past the simulated server's `sends_burst_max`.
pub const FLOOD_SENDS: u32 = 60;

/// Bytes that break the wire format for `kind` (a fatal kind), with the
/// code the server must answer in ERROR(code, 0) before it closes.
pub fn bad_bytes(kind: Kind, rng: &mut fastrand::Rng, limits: &Limits) -> (Vec<u8>, ErrorCode) {
    match kind {
        Kind::Garbage => garbage(rng, limits),
        Kind::Malformed => malformed(rng),
        Kind::Oversized => {
            // Any length above the limit, alone or with a few bytes after
            // it: the prefix is refused on its own.
            let len = rng.u64(limits.frame_bytes_max as u64 + 1..=1 << 40);
            let mut out = Vec::new();
            varint(len, &mut out);
            out.extend((0..rng.usize(..16)).map(|_| rng.u8(..)));
            (out, ErrorCode::TooLarge)
        }
        Kind::Flood | Kind::SlowReader => unreachable!("{kind:?} writes no bad bytes"),
    }
}

/// Random bytes the codec rejects (not a valid frame, not a prefix of
/// one), and the code it rejects them with: `malformed`, `unknown_type` or
/// `too_large`, per PROTOCOL.md's framing rules.
fn garbage(rng: &mut fastrand::Rng, limits: &Limits) -> (Vec<u8>, ErrorCode) {
    for _ in 0..8 {
        let bytes: Vec<u8> = (0..rng.usize(1..=32)).map(|_| rng.u8(..)).collect();
        if let Err(e) = crate::proto::decode(&bytes, limits) {
            return (bytes, e.code());
        }
    }
    // An empty frame: `L` = 0.
    (vec![0], ErrorCode::Malformed)
}

/// One malformed frame, each shape with the code PROTOCOL.md gives it.
fn malformed(rng: &mut fastrand::Rng) -> (Vec<u8>, ErrorCode) {
    /// DELIVERED, PING: client frames with one varint field.
    const DELIVERED: u8 = 0x07;
    const PING: u8 = 0x0A;
    match rng.u32(..5) {
        // "An unknown type byte (0x00, 0x13..0x17, 0x1D..0x1F, 0x2D and
        // above)": 0x10 and 0x11 are the device frames, 0x12 is SENT,
        // 0x18..=0x1C are the presence frames, 0x20..=0x2C the group ones.
        0 => {
            let ty = match rng.u32(..4) {
                0 => 0,
                1 => rng.u8(0x13..=0x17),
                2 => rng.u8(0x1D..=0x1F),
                _ => rng.u8(0x2D..),
            };
            let mut out = vec![0, ty];
            out.extend((0..rng.usize(..8)).map(|_| rng.u8(..)));
            out[0] = (out.len() - 1) as u8;
            (out, ErrorCode::UnknownType)
        }
        // A frame that ends inside a field: "truncated field".
        1 => (
            vec![2, DELIVERED, 0x80 | rng.u8(..0x80)],
            ErrorCode::Malformed,
        ),
        // A varint that is not the shortest encoding.
        2 => (
            vec![3, DELIVERED, 0x80 | rng.u8(..0x80), 0],
            ErrorCode::Malformed,
        ),
        // Extra bytes after the last field: "trailing bytes".
        3 => (
            vec![3, PING, rng.u8(..0x80), rng.u8(..)],
            ErrorCode::Malformed,
        ),
        // `L` = 0: "empty frame".
        _ => (vec![0], ErrorCode::Malformed),
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::decode;

    const LIMITS: Limits = Limits {
        frame_bytes_max: 65536,
        body_bytes_max: 65000,
    };

    /// The codec agrees with the code each shape is documented to get.
    #[test]
    fn every_bad_shape_gets_its_documented_code() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            for kind in [Kind::Garbage, Kind::Malformed, Kind::Oversized] {
                let (bytes, code) = bad_bytes(kind, &mut rng, &LIMITS);
                let got = decode(&bytes, &LIMITS).map(|f| f.map(|(f, _)| f.name()));
                assert!(
                    matches!(&got, Err(e) if e.code() == code),
                    "{kind:?} {bytes:02x?}: {got:?}, documented {code}"
                );
            }
        }
    }
}
