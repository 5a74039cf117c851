//! The JetStream streams of a cluster (the messages' `TERN_<g>`, the
//! leases' `KV_tern_leases`): their layout, created if missing and kept at
//! the configured number of replicas (docs/CLUSTER.md, "Streams" and
//! "Replicas").

// Creating and updating the streams on NATS: the bridge's part, built with
// the `cluster` feature only (Cargo.toml).
#[cfg(feature = "cluster")]
mod setup;
#[cfg(feature = "cluster")]
pub use setup::{ensure, ensure_messages};

/// Partitions per message stream. nats-server 2.9 looks at every consumer
/// of a stream for each record stored in it, so a record's cost grows with
/// the consumers on its stream (one per partition): with all 4096 default
/// partitions on one stream it spent ~2 CPU ms per message (issue 15,
/// results/cluster/README.md). Stream `g` holds partitions
/// `g * 64 .. (g + 1) * 64`, so a record touches at most 64 consumers.
/// Part of the cluster's fixed layout, like the partition count.
pub const PARTITIONS_PER_STREAM: u32 = 64;

/// The single stream of the layout before streams were split; it covered
/// every subject `tern.>` and so cannot coexist with the split streams.
pub const OLD_STREAM: &str = "TERN";

/// The message stream holding partition `p`.
pub fn stream_of(p: u32) -> u32 {
    p / PARTITIONS_PER_STREAM
}

/// Message streams of a cluster of `partitions`.
pub fn stream_count(partitions: u32) -> u32 {
    partitions.div_ceil(PARTITIONS_PER_STREAM)
}

/// Name of message stream `g`.
pub fn stream_name(g: u32) -> String {
    format!("TERN_{g}")
}

/// Subject of a message (SEND) for a user of partition `p`.
pub fn message_subject(p: u32) -> String {
    format!("tern.{}.p.{p}", stream_of(p))
}

/// Subject of a receipt for a user of partition `p`.
pub fn receipt_subject(p: u32) -> String {
    format!("tern.{}.r.{p}", stream_of(p))
}

/// Filter of partition `p`'s consumer: its messages and receipts.
pub fn partition_filter(p: u32) -> String {
    format!("tern.{}.*.{p}", stream_of(p))
}

/// Filter of stream `g`'s consumer when one node holds all its
/// partitions: every subject of the stream.
pub fn stream_filter(g: u32) -> String {
    format!("tern.{g}.>")
}

/// The partition a message or receipt subject (`tern.<g>.<p|r>.<p>`) is
/// for; `None` for a subject of another shape.
pub fn partition_of_subject(subject: &str) -> Option<u32> {
    let mut parts = subject.split('.');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("tern"), Some(_), Some("p" | "r"), Some(p), None) => p.parse().ok(),
        _ => None,
    }
}

/// Bits of a server id below the stream number: a stream's sequences stay
/// below 2^48 (JetStream would need 2^48 records in one stream).
const SEQUENCE_BITS: u32 = 48;

/// The server id of the record at `sequence` in partition `p`'s stream:
/// the stream number above the sequence. Each stream numbers its records
/// from 1, so the bare sequence would name different messages in different
/// streams (the relay's pending acks are keyed by server id); with the
/// stream on top, ids are unique in the cluster and still increase in the
/// order one recipient's messages are delivered (one partition, one
/// stream). Stream 0's ids are its bare sequences.
pub fn server_id(p: u32, sequence: u64) -> u64 {
    debug_assert!(sequence < 1 << SEQUENCE_BITS);
    (u64::from(stream_of(p)) << SEQUENCE_BITS) | sequence
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_group_into_streams_of_64() {
        assert_eq!(stream_count(4096), 64);
        assert_eq!(stream_count(64), 1);
        assert_eq!(stream_count(65), 2);
        assert_eq!(stream_count(1), 1);
        assert_eq!(stream_count(65_536), 1024);
        assert_eq!((stream_of(0), stream_of(63), stream_of(64)), (0, 0, 1));
        assert_eq!(stream_name(stream_of(4095)), "TERN_63");
    }

    #[test]
    fn a_partition_s_subjects_match_its_filter_and_stream() {
        assert_eq!(message_subject(130), "tern.2.p.130");
        assert_eq!(receipt_subject(130), "tern.2.r.130");
        assert_eq!(partition_filter(130), "tern.2.*.130");
        assert_eq!(stream_filter(2), "tern.2.>");
        for subject in [message_subject(130), receipt_subject(130)] {
            assert_eq!(partition_of_subject(&subject), Some(130));
        }
        for bad in [
            "tern.2.x.130",
            "tern.2.p",
            "tern.2.p.130.1",
            "nats.2.p.1",
            "tern.2.p.z",
        ] {
            assert_eq!(partition_of_subject(bad), None, "{bad}");
        }
    }

    #[test]
    fn server_ids_differ_across_streams_and_increase_within_one() {
        assert_eq!(server_id(5, 7), 7);
        assert_ne!(server_id(5, 7), server_id(64, 7));
        assert!(server_id(64, 7) < server_id(64, 8));
        assert_eq!(server_id(65_535, 1) >> 48, 1023);
    }
}
