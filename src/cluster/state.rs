//! Per-user state that outlives a node (docs/CLUSTER.md, "Per-user state
//! across nodes"): a user's registered devices, the receipts waiting for
//! its offline devices, its last seen and its privacy setting, kept in
//! JetStream next to the messages so that a partition's new owner knows
//! them before it answers a LOGIN for the partition.
//!
//! One state stream per message stream group `g`: `TERNS_<g>`, limits
//! retention, one record per subject (`max_messages_per_subject` 1), so
//! the stream holds each user's latest record and nothing else. A user's
//! subject is `terns.<g>.<p>.<user>`. The record is the user's whole
//! state, written with the device log's and the presence log's own record
//! codecs (`store::devices`, `store::presence`):
//!
//! ```text
//! 01 devices u8  receipts u16 LE  group_receipts u16 LE
//!    Registered records (kind 5) × devices, Receipt records (kind 11) × receipts,
//!    GroupKept records (kind 15) × group_receipts, LastSeen (kind 8), Privacy (kind 9)
//! ```
//!
//! A record whose user has nothing left (no device, no receipt, never
//! seen, not hidden) is still published: it replaces the older one.

use std::collections::HashMap;

use super::streams::{stream_of, PARTITIONS_PER_STREAM};
use crate::store::devices::{self, Dev, Kept, KeptGroup, LANES};
use crate::store::presence::{self, Seen};

const VERSION: u8 = 1;

/// The receipts (and, apart, the group receipts) one record carries at
/// most: the rest (the oldest) are dropped from the durable copy, as a
/// full receipt list drops them in memory.
pub const RECEIPTS_MAX: usize = u16::MAX as usize;

/// A user's state, as kept in its state stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserState {
    /// Its registered devices, online or not.
    pub devices: Vec<Dev>,
    /// Receipts waiting for some of its devices, oldest first.
    pub receipts: Vec<Kept>,
    /// Group receipts waiting for some of its devices, oldest first.
    pub group_receipts: Vec<KeptGroup>,
    /// Its last seen and privacy setting.
    pub seen: Seen,
}

impl UserState {
    /// The bytes published for `user`.
    pub fn encode(&self, user: u64) -> Vec<u8> {
        let devices = &self.devices[..self.devices.len().min(LANES)];
        let skip = self.receipts.len().saturating_sub(RECEIPTS_MAX);
        let receipts = &self.receipts[skip..];
        let skip = self.group_receipts.len().saturating_sub(RECEIPTS_MAX);
        let group_receipts = &self.group_receipts[skip..];
        let mut out = Vec::with_capacity(6 + 30 * devices.len() + 38 * receipts.len() + 44);
        out.push(VERSION);
        out.push(devices.len() as u8);
        out.extend_from_slice(&(receipts.len() as u16).to_le_bytes());
        out.extend_from_slice(&(group_receipts.len() as u16).to_le_bytes());
        for d in devices {
            devices::Record::Registered {
                user,
                device: d.device,
                lane: d.lane,
                at_ms: d.last_ms,
            }
            .encode(&mut out);
        }
        for &kept in receipts {
            devices::Record::Receipt { user, kept }.encode(&mut out);
        }
        for kept in group_receipts {
            devices::Record::GroupKept {
                user,
                kept: kept.clone(),
            }
            .encode(&mut out);
        }
        presence::Record::LastSeen {
            user,
            last_seen_ms: self.seen.last_seen_ms,
        }
        .encode(&mut out);
        presence::Record::Privacy {
            user,
            hidden: self.seen.hidden,
        }
        .encode(&mut out);
        out
    }

    /// Parses a published record of `user`; `None` for anything else (a
    /// newer version, another user's record, garbage). Never panics.
    pub fn decode(user: u64, bytes: &[u8]) -> Option<UserState> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION || rest.len() < 5 {
            return None;
        }
        let devices_len = rest[0] as usize;
        let receipts_len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let groups_len = u16::from_le_bytes([rest[3], rest[4]]) as usize;
        if devices_len > LANES {
            return None;
        }
        let mut at = &rest[5..];
        let mut state = UserState::default();
        let receipts_end = devices_len + receipts_len;
        for i in 0..receipts_end + groups_len {
            let (record, used) = devices::decode(at)?;
            at = &at[used..];
            match record {
                devices::Record::Registered {
                    user: u,
                    device,
                    lane,
                    at_ms,
                } if u == user && i < devices_len => state.devices.push(Dev {
                    device,
                    lane,
                    last_ms: at_ms,
                }),
                devices::Record::Receipt { user: u, kept }
                    if u == user && (devices_len..receipts_end).contains(&i) =>
                {
                    state.receipts.push(kept)
                }
                devices::Record::GroupKept { user: u, kept } if u == user && i >= receipts_end => {
                    state.group_receipts.push(kept)
                }
                _ => return None,
            }
        }
        let mut seen = HashMap::new();
        for _ in 0..2 {
            let (record, used) = presence::decode(at)?;
            at = &at[used..];
            match record {
                presence::Record::LastSeen { user: u, .. }
                | presence::Record::Privacy { user: u, .. }
                    if u == user =>
                {
                    presence::apply(&mut seen, record)
                }
                _ => return None,
            }
        }
        let lanes_unique = state
            .devices
            .iter()
            .enumerate()
            .all(|(i, d)| state.devices[..i].iter().all(|e| e.lane != d.lane));
        if !at.is_empty() || !lanes_unique {
            return None;
        }
        state.seen = seen.remove(&user).unwrap_or_default();
        Some(state)
    }
}

/// Name of the state stream of message stream group `g`.
pub fn stream_name(g: u32) -> String {
    format!("TERNS_{g}")
}

/// Subjects of state stream `g`.
pub fn stream_filter(g: u32) -> String {
    format!("terns.{g}.>")
}

/// Subject of `user`'s state; `p` is its partition.
pub fn subject(p: u32, user: u64) -> String {
    format!("terns.{}.{p}.{user}", stream_of(p))
}

/// Filter of partition `p`'s users' states.
fn partition_filter(p: u32) -> String {
    format!("terns.{}.{p}.*", stream_of(p))
}

/// The user and partition a state subject names.
pub fn parse_subject(subject: &str) -> Option<(u32, u64)> {
    let mut parts = subject.split('.');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("terns"), Some(_), Some(p), Some(user), None) => {
            Some((p.parse().ok()?, user.parse().ok()?))
        }
        _ => None,
    }
}

/// The filters that read the states of `partitions` (sorted): a whole
/// stream's filter where all its partitions are asked for, else one per
/// partition.
pub fn filters(partitions: &[u32], total: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < partitions.len() {
        let g = stream_of(partitions[i]);
        let first = g * PARTITIONS_PER_STREAM;
        let last = (first + PARTITIONS_PER_STREAM).min(total);
        let of_g: Vec<u32> = partitions[i..]
            .iter()
            .copied()
            .take_while(|&p| stream_of(p) == g)
            .collect();
        i += of_g.len();
        if of_g.len() as u32 == last - first {
            out.push((g, stream_filter(g)));
        } else {
            out.extend(of_g.into_iter().map(|p| (g, partition_filter(p))));
        }
    }
    out
}

// The state streams on NATS: their configuration and the replay, the
// bridge's part, built with the `cluster` feature only (Cargo.toml).
#[cfg(feature = "cluster")]
mod replay;
#[cfg(feature = "cluster")]
pub use replay::{replay, stream_config};

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UserState {
        UserState {
            devices: vec![
                Dev {
                    device: 0,
                    lane: 0,
                    last_ms: 5,
                },
                Dev {
                    device: 9,
                    lane: 3,
                    last_ms: 1_767_225_600_123,
                },
            ],
            receipts: vec![Kept {
                kind: 1,
                server_id: 1 << 50,
                peer: 77,
                lanes: 0b1000,
            }],
            group_receipts: vec![KeptGroup {
                kind: 2,
                lanes: 0b1001,
                group: 1 << 40,
                msg: 12,
                members: vec![5, 6, 7].into(),
            }],
            seen: Seen {
                last_seen_ms: 1_767_225_600_000,
                hidden: true,
            },
        }
    }

    #[test]
    fn states_round_trip() {
        for state in [sample(), UserState::default()] {
            assert_eq!(UserState::decode(42, &state.encode(42)), Some(state));
        }
    }

    #[test]
    fn a_record_costs_79_bytes_with_one_device_30_per_more_38_per_receipt() {
        let mut state = sample();
        // The group receipt: 38 bytes and 8 per member.
        assert_eq!(state.encode(1).len(), 79 + 30 + 38 + 38 + 3 * 8);
        state.devices.truncate(1);
        state.receipts.clear();
        state.group_receipts.clear();
        assert_eq!(state.encode(1).len(), 79);
    }

    #[test]
    fn another_user_s_record_or_garbage_is_refused() {
        let bytes = sample().encode(42);
        assert_eq!(UserState::decode(43, &bytes), None);
        for cut in 0..bytes.len() {
            assert_eq!(UserState::decode(42, &bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(UserState::decode(42, &longer), None);
        let mut flipped = bytes.clone();
        flipped[10] ^= 1;
        assert_eq!(UserState::decode(42, &flipped), None);
        assert_eq!(UserState::decode(42, &[2, 0, 0, 0, 0, 0]), None);
        assert_eq!(UserState::decode(42, &[]), None);
        // Two devices on one lane.
        let mut twin = sample();
        twin.devices[1].lane = 0;
        assert_eq!(UserState::decode(42, &twin.encode(42)), None);
    }

    #[test]
    fn subjects_name_their_partition_and_user() {
        assert_eq!(subject(130, 7), "terns.2.130.7");
        assert_eq!(parse_subject(&subject(130, 7)), Some((130, 7)));
        assert_eq!(parse_subject("terns.2.130"), None);
        assert_eq!(parse_subject("tern.2.p.130"), None);
        assert_eq!(stream_name(2), "TERNS_2");
    }

    #[test]
    fn a_whole_stream_is_read_with_one_filter() {
        let whole: Vec<u32> = (64..128).collect();
        assert_eq!(filters(&whole, 4096), vec![(1, "terns.1.>".to_string())]);
        assert_eq!(
            filters(&[3, 64], 4096),
            vec![
                (0, "terns.0.3.*".to_string()),
                (1, "terns.1.64.*".to_string())
            ]
        );
        // A cluster of 16 partitions: one stream of 16.
        let all: Vec<u32> = (0..16).collect();
        assert_eq!(filters(&all, 16), vec![(0, "terns.0.>".to_string())]);
    }
}
