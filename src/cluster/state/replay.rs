//! The state streams on NATS: their configuration, and reading the latest
//! state of a partition's users on a claim.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use super::{filters, parse_subject, stream_filter, stream_name, UserState};

/// How long a replay waits for the records JetStream said it holds.
const REPLAY_WAIT: Duration = Duration::from_secs(10);

/// The configuration of state stream `g`: the latest record per subject,
/// on disk, never expiring.
pub fn stream_config(g: u32) -> stream::Config {
    stream::Config {
        name: stream_name(g),
        subjects: vec![stream_filter(g)],
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Reads the latest state of every user of `partitions` (of a cluster of
/// `total`) from the state streams. A record that does not parse is
/// logged and skipped.
pub async fn replay(
    js: &jetstream::Context,
    partitions: &[u32],
    total: u32,
) -> Result<Vec<(u64, UserState)>, async_nats::Error> {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    for (g, filter) in filters(&sorted, total) {
        let stream = js.get_stream(stream_name(g)).await?;
        let mut consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ack_policy: consumer::AckPolicy::None,
                memory_storage: true,
                num_replicas: 1,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await?;
        let read = read_consumer(&mut consumer, &sorted, &mut out, g).await;
        // Gone by itself after `inactive_threshold`; deleted now so a claim
        // of many partitions leaves no pile of them on the servers.
        let name = consumer.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
        read?;
    }
    Ok(out)
}

/// Reads every record `consumer` has (the latest per subject) into `out`,
/// keeping those of `partitions` (sorted) that parse.
async fn read_consumer(
    consumer: &mut consumer::PullConsumer,
    partitions: &[u32],
    out: &mut Vec<(u64, UserState)>,
    g: u32,
) -> Result<(), async_nats::Error> {
    let mut left = consumer.info().await?.num_pending;
    if left == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await?;
    while left > 0 {
        let message = tokio::time::timeout(REPLAY_WAIT, messages.next())
            .await
            .map_err(|_| format!("state replay of {}: records missing", stream_name(g)))?
            .ok_or("state replay: consumer ended")??;
        left = message.info()?.pending;
        match parse_subject(&message.subject)
            .filter(|&(p, _)| partitions.binary_search(&p).is_ok())
            .and_then(|(_, user)| Some((user, UserState::decode(user, &message.payload)?)))
        {
            Some(got) => out.push(got),
            None => log::warn!(
                "cluster: state record on {} not understood, skipped",
                message.subject
            ),
        }
    }
    Ok(())
}
