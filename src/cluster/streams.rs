//! The JetStream streams of a cluster (the messages' `TERN_<g>`, the
//! leases' `KV_tern_leases`): their layout, created if missing and kept at
//! the configured number of replicas (docs/CLUSTER.md, "Streams" and
//! "Replicas").

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, stream, ErrorCode};
use futures_util::{StreamExt, TryStreamExt};

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

/// Streams created or checked at once when a node starts.
const ENSURE_IN_FLIGHT: usize = 16;

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

/// Makes every message stream of a cluster of `partitions` exist with
/// `replicas` copies: subjects `tern.<g>.>`, kept until acked (work-queue
/// retention), on disk; and every state stream `TERNS_<g>` likewise. Returns the fewest copies any stream has (see
/// [`ensure`]). Refuses while the old single stream `TERN` still holds
/// records; an empty one is deleted (docs/CLUSTER.md, "Upgrading").
pub async fn ensure_messages(
    js: &jetstream::Context,
    partitions: u32,
    replicas: usize,
) -> Result<usize, async_nats::Error> {
    retire_old_stream(js).await?;
    let groups = stream_count(partitions);
    // Each group's message stream, then its state stream (the per-user
    // state of `super::state`, with as many copies).
    let copies: Vec<usize> = futures_util::stream::iter(0..2 * groups)
        .map(|i| {
            let config = if i < groups {
                stream::Config {
                    name: stream_name(i),
                    subjects: vec![stream_filter(i)],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    ..Default::default()
                }
            } else {
                super::state::stream_config(i - groups)
            };
            ensure(js, config, replicas)
        })
        .buffer_unordered(ENSURE_IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(copies.into_iter().min().unwrap_or(replicas))
}

/// Deletes the old stream `TERN` if it is empty; an error if it holds
/// records (they would be stranded: its subjects overlap the new streams').
async fn retire_old_stream(js: &jetstream::Context) -> Result<(), async_nats::Error> {
    let mut old = match js.get_stream(OLD_STREAM).await {
        Ok(old) => old,
        Err(e) => {
            return match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(())
                }
                _ => Err(e.into()),
            }
        }
    };
    let records = old.info().await?.state.messages;
    if records > 0 {
        return Err(format!(
            "stream {OLD_STREAM} (the layout before split streams) still holds {records} \
             records: drain it with the previous Tern version first (docs/CLUSTER.md, \
             \"Upgrading\")"
        )
        .into());
    }
    js.delete_stream(OLD_STREAM).await?;
    log::info!("cluster: deleted the empty stream {OLD_STREAM} of the previous layout");
    Ok(())
}

/// How many times a stream is looked up and created when another node
/// creates it in between.
const ATTEMPTS: usize = 3;

/// Makes stream `config.name` exist with `replicas` copies and returns the
/// copies it has now. A stream another node created keeps its settings but
/// is updated to `replicas`. A NATS server without clustering can keep only
/// one copy: then the stream keeps (or gets) one, with a warning, so a
/// single-server development setup runs with the default. Any other refusal
/// is an error naming both counts.
pub async fn ensure(
    js: &jetstream::Context,
    mut config: stream::Config,
    replicas: usize,
) -> Result<usize, async_nats::Error> {
    let name = config.name.clone();
    for _ in 0..ATTEMPTS {
        let found = js.get_stream(&name).await;
        // A server answered: its INFO is known. One without clustering can
        // keep one copy; asked for more, nats-server 2.9 refuses a create
        // but may take an update and report the copies asked for (a node
        // that found the streams another node had just created reported 3
        // on a single server, tests/cluster/scale.rs).
        let replicas = if replicas > 1 && js.client().server_info().cluster.is_none() {
            warn_single(&name, replicas);
            1
        } else {
            replicas
        };
        let error = match found {
            Ok(stream) => return update(js, stream.cached_info().config.clone(), replicas).await,
            Err(e) => e,
        };
        let missing = matches!(error.kind(), GetStreamErrorKind::JetStream(j)
            if j.error_code() == ErrorCode::STREAM_NOT_FOUND);
        if !missing {
            return Err(error.into());
        }
        config.num_replicas = replicas;
        let error = match js.create_stream(config.clone()).await {
            // What the server says it keeps: a racing node may have made
            // the stream first, with the copies a single server allows.
            Ok(stream) => return Ok(stream.cached_info().config.num_replicas.max(1)),
            Err(e) => e,
        };
        match error.kind() {
            CreateStreamErrorKind::JetStream(j) if single_server(j.error_code()) => {
                warn_single(&name, replicas);
                config.num_replicas = 1;
                js.create_stream(config.clone()).await?;
                return Ok(1);
            }
            // Another node created it first: look again.
            CreateStreamErrorKind::JetStream(j)
                if j.error_code() == ErrorCode::STREAM_NAME_EXIST => {}
            _ => {
                return Err(format!(
                    "stream {name} not created with cluster.stream_replicas = {replicas}: {error}"
                )
                .into())
            }
        }
    }
    Err(format!("stream {name} neither found nor created in {ATTEMPTS} attempts").into())
}

/// Brings an existing stream, configured as `have`, to `replicas` copies.
async fn update(
    js: &jetstream::Context,
    have: stream::Config,
    replicas: usize,
) -> Result<usize, async_nats::Error> {
    // The server reports 1 for a stream created with the default 0.
    let had = have.num_replicas.max(1);
    if had == replicas {
        return Ok(had);
    }
    let name = have.name.clone();
    let want = stream::Config {
        num_replicas: replicas,
        ..have
    };
    match js.update_stream(want).await {
        // A single server may take the update yet keep one copy: report
        // what it says it keeps.
        Ok(info) => {
            let now = info.config.num_replicas.max(1);
            if now == replicas {
                log::info!("cluster: stream {name} had {had} replicas, updated to {replicas}");
            } else {
                warn_single(&name, replicas);
            }
            Ok(now)
        }
        Err(e) => match e.kind() {
            CreateStreamErrorKind::JetStream(j) if single_server(j.error_code()) => {
                warn_single(&name, replicas);
                Ok(had)
            }
            _ => Err(format!(
                "stream {name} has {had} replicas, cluster.stream_replicas is {replicas}, \
                 and NATS refused the change: {e}"
            )
            .into()),
        },
    }
}

/// Whether NATS refused replicas because it runs without clustering.
fn single_server(code: ErrorCode) -> bool {
    code == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
}

fn warn_single(name: &str, replicas: usize) {
    log::warn!(
        "cluster: NATS runs without clustering and keeps 1 copy of stream {name}, not \
         cluster.stream_replicas = {replicas}: an ACK means stored on one server only"
    );
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
