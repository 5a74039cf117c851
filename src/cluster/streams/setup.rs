//! Creating the streams on NATS and keeping them at the configured number
//! of replicas (docs/CLUSTER.md, "Streams" and "Replicas"): at the bridge's
//! start.

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, stream, ErrorCode};
use futures_util::{StreamExt, TryStreamExt};

use super::{stream_count, stream_filter, stream_name, OLD_STREAM};

/// Streams created or checked at once when a node starts.
const ENSURE_IN_FLIGHT: usize = 16;

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
    // state of `cluster::state`, with as many copies).
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
                crate::cluster::state::stream_config(i - groups)
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
