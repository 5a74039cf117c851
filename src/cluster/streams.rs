//! The JetStream streams of a cluster (the messages' `TERN`, the leases'
//! `KV_tern_leases`): created if missing and kept at the configured number
//! of replicas (docs/CLUSTER.md, "Replicas").

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, stream, ErrorCode};

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
        let error = match js.get_stream(&name).await {
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
            Ok(_) => return Ok(replicas),
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
            _ => return Err(error.into()),
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
        Ok(_) => {
            log::info!("cluster: stream {name} had {had} replicas, updated to {replicas}");
            Ok(replicas)
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
