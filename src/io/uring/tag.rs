//! The `user_data` of every submission: which operation, on which ring, for
//! which connection (slot key and generation).
//!
//! Layout, from the top bit down:
//!
//! | bits    | field | range                                  |
//! |---------|-------|----------------------------------------|
//! | 63..59  | op    | [`Op`], 1..=18 (0 is never used)       |
//! | 58..50  | ring  | `0..RINGS_MAX`                         |
//! | 49..32  | gen   | `0..=GEN_MASK` (wraps; 0 is skipped)   |
//! | 31..0   | key   | the connection's slab key, or a slot   |
//!
//! Handoff tags ([`Op::HandoffIn`], [`Op::HandoffFail`]) carry a 59-bit
//! handoff id instead of ring, gen and key: they are written by another
//! shard's MSG_RING and name the connection by that id.

/// Rings one shard can have at most (9 bits of `user_data`: 512 rings of
/// RLIMIT_NOFILE slots, millions of connections per shard).
pub(super) const RINGS_MAX: usize = 1 << RING_BITS;
/// Generations wrap at this mask (18 bits of `user_data`). A stale CQE is
/// only mistaken for a live one if its slot key was reused `GEN_MASK` times
/// while it was in flight, which the zombie rule (a key is reused only after
/// all its operations completed) makes impossible.
pub(super) const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
/// Handoff ids are below this (59 bits).
pub(super) const HANDOFF_ID_LIMIT: u64 = 1 << ID_BITS;

const OP_SHIFT: u32 = 59;
const RING_BITS: u32 = 9;
const RING_SHIFT: u32 = 50;
const GEN_BITS: u32 = 18;
const GEN_SHIFT: u32 = 32;
const ID_BITS: u32 = 59;

/// What a completion belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Op {
    /// The listener's multishot accept (ring 0).
    Accept = 1,
    /// The READ of the shard's eventfd (ring 0).
    WakeRead = 2,
    /// A connection's receive (single-shot or multishot).
    Recv = 3,
    /// A connection's SEND.
    Send = 4,
    /// A connection's SHUTDOWN(SHUT_WR).
    Shutdown = 5,
    /// A cancel of a connection's receive (pause) or of all its operations (close).
    Cancel = 6,
    /// The final CLOSE of a connection's slot.
    Close = 7,
    /// MSG_RING moving a connection from ring 0 to one of our data rings.
    Move = 8,
    /// Posted on a data ring by a [`Op::Move`]: the slot that arrived. No SQE.
    Arrive = 9,
    /// MSG_RING handing a connection to another shard.
    HandoffOut = 10,
    /// CLOSE of the source slot, linked after a [`Op::Move`] or [`Op::HandoffOut`].
    SourceClose = 11,
    /// Posted on ring 0 by another shard's [`Op::HandoffOut`]. No SQE; id tag.
    HandoffIn = 12,
    /// Posted on ring 0 by another shard whose handoff gave up. No SQE; id tag.
    HandoffFail = 13,
    /// CLOSE of a slot that has no connection (`key` is the slot).
    CloseRaw = 14,
    /// Ring-level operations whose completion needs no handling (cancels of
    /// the accept, drop-time cancels, failure notices sent to peers).
    Misc = 15,
    /// getsockopt(SO_PEERNAME) of a just-accepted connection (its source
    /// address, for the per-address limits).
    Peer = 16,
    /// FIXED_FD_INSTALL of a connection kept for a successor process.
    FdInstall = 17,
    /// FILES_UPDATE installing a connection carried from a predecessor.
    FilesUpdate = 18,
}

impl Op {
    fn from_bits(bits: u64) -> Option<Op> {
        Some(match bits {
            1 => Op::Accept,
            2 => Op::WakeRead,
            3 => Op::Recv,
            4 => Op::Send,
            5 => Op::Shutdown,
            6 => Op::Cancel,
            7 => Op::Close,
            8 => Op::Move,
            9 => Op::Arrive,
            10 => Op::HandoffOut,
            11 => Op::SourceClose,
            12 => Op::HandoffIn,
            13 => Op::HandoffFail,
            14 => Op::CloseRaw,
            15 => Op::Misc,
            16 => Op::Peer,
            17 => Op::FdInstall,
            18 => Op::FilesUpdate,
            _ => return None,
        })
    }

    /// True when the completion answers a submission made on the ring it
    /// arrives on (so it counts against that ring's operations in flight).
    /// MSG_RING targets get CQEs nobody submitted there.
    pub(super) fn submitted_here(self) -> bool {
        !matches!(self, Op::Arrive | Op::HandoffIn | Op::HandoffFail)
    }

    /// True for tags that carry a handoff id rather than ring/gen/key.
    fn is_id_tag(self) -> bool {
        matches!(self, Op::HandoffIn | Op::HandoffFail)
    }
}

/// A decoded `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tag {
    pub op: Op,
    /// Ring index, `0..RINGS_MAX`.
    pub ring: u16,
    /// Connection generation, `0..=GEN_MASK`.
    pub gen: u32,
    /// Connection slab key (or a fixed slot for [`Op::CloseRaw`]).
    pub key: u32,
}

impl Tag {
    /// A tag for `op` on `ring` about connection `key` of generation `gen`.
    pub fn new(op: Op, ring: usize, key: u32, gen: u32) -> Tag {
        debug_assert!(ring < RINGS_MAX, "ring {ring} out of range");
        debug_assert!(gen <= GEN_MASK, "gen {gen} out of range");
        debug_assert!(!op.is_id_tag());
        Tag {
            op,
            ring: ring as u16,
            gen,
            key,
        }
    }

    /// A ring-level tag with no connection.
    pub fn ring(op: Op, ring: usize) -> Tag {
        Tag::new(op, ring, 0, 0)
    }

    pub fn encode(self) -> u64 {
        ((self.op as u64) << OP_SHIFT)
            | ((self.ring as u64) << RING_SHIFT)
            | (((self.gen & GEN_MASK) as u64) << GEN_SHIFT)
            | self.key as u64
    }

    /// `None` for a `user_data` we never wrote (op 0) or an id tag.
    pub fn decode(user_data: u64) -> Option<Tag> {
        let op = Op::from_bits(user_data >> OP_SHIFT)?;
        if op.is_id_tag() {
            return None;
        }
        Some(Tag {
            op,
            ring: ((user_data >> RING_SHIFT) & (RINGS_MAX as u64 - 1)) as u16,
            gen: ((user_data >> GEN_SHIFT) as u32) & GEN_MASK,
            key: user_data as u32,
        })
    }
}

/// The op of any `user_data` (id tags included).
pub(super) fn op_of(user_data: u64) -> Option<Op> {
    Op::from_bits(user_data >> OP_SHIFT)
}

/// `user_data` carrying a handoff id.
pub(super) fn id_tag(op: Op, id: u64) -> u64 {
    debug_assert!(op.is_id_tag());
    debug_assert!(id < HANDOFF_ID_LIMIT);
    ((op as u64) << OP_SHIFT) | (id & (HANDOFF_ID_LIMIT - 1))
}

/// The handoff id of an id tag.
pub(super) fn id_of(user_data: u64) -> u64 {
    user_data & (HANDOFF_ID_LIMIT - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_the_edges() {
        for op in [
            Op::Accept,
            Op::Recv,
            Op::Close,
            Op::CloseRaw,
            Op::Misc,
            Op::Peer,
        ] {
            for ring in [0, 1, RINGS_MAX - 1] {
                for gen in [0, 1, GEN_MASK] {
                    for key in [0, 1, u32::MAX - 1, u32::MAX] {
                        let tag = Tag::new(op, ring, key, gen);
                        assert_eq!(Tag::decode(tag.encode()), Some(tag));
                        assert_eq!(op_of(tag.encode()), Some(op));
                    }
                }
            }
        }
    }

    #[test]
    fn id_tags_keep_their_id_and_are_not_conn_tags() {
        for id in [0, 1, (7 << 40) | 12345, HANDOFF_ID_LIMIT - 1] {
            let ud = id_tag(Op::HandoffIn, id);
            assert_eq!(op_of(ud), Some(Op::HandoffIn));
            assert_eq!(id_of(ud), id);
            assert_eq!(Tag::decode(ud), None);
        }
    }

    #[test]
    fn zero_and_foreign_user_data_decode_to_nothing() {
        assert_eq!(Tag::decode(0), None);
        assert_eq!(op_of(0), None);
        assert_eq!(op_of(42), None);
    }

    #[test]
    fn only_msg_ring_targets_are_not_submitted_here() {
        assert!(!Op::Arrive.submitted_here());
        assert!(!Op::HandoffIn.submitted_here());
        assert!(!Op::HandoffFail.submitted_here());
        assert!(Op::Move.submitted_here());
        assert!(Op::HandoffOut.submitted_here());
    }
}
