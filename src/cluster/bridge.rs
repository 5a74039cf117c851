//! The bridge thread (docs/CLUSTER.md, "The bridge"): the one place NATS
//! runs. It owns a current-thread tokio runtime that lives on this thread
//! only, so no shard ever sees an async runtime. Today it holds this node's
//! partition leases and heartbeat and keeps the partition table
//! ([`Owners`]) that shards read at LOGIN and SEND; it does not yet carry
//! messages.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures_util::{StreamExt, TryStreamExt};

use super::config::ClusterConfig;
use super::lease::{node_key, partition_key, Leases, Listing};
use super::link::BridgeEnds;
use super::owners::{Owner, Owners};
use super::relay::{Relay, Replay};
use super::stats::ClusterStats;
use super::streams;

/// JetStream KV bucket holding the leases and heartbeats.
pub const LEASE_BUCKET: &str = "tern_leases";

/// How often the bridge looks at its stop flag while it waits.
const STOP_POLL: Duration = Duration::from_millis(100);

/// KV writes (renewals, claims) a lease round keeps in flight at once.
/// One after another, a node's 2,048 renewals (half of the default 4096
/// partitions) took longer than a lease under load and the leases expired
/// (issue 15); pipelined, a round takes a few round trips. Bounded so a
/// round does not flood NATS with thousands of requests at one instant.
const LEASE_WRITES_IN_FLIGHT: usize = 128;

/// The running bridge thread.
#[derive(Debug)]
pub struct Bridge {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    stats: Arc<ClusterStats>,
}

impl Bridge {
    /// Starts the bridge thread for `config` (already validated). It
    /// connects in the background and retries while NATS is unreachable, so
    /// a NATS outage at start does not keep the node from serving.
    /// `owners` is the table it keeps current for the shards; `ends` its
    /// rings to and from them.
    pub fn start(
        config: ClusterConfig,
        owners: Arc<Owners>,
        ends: BridgeEnds,
        group_limits: (usize, usize),
    ) -> std::io::Result<Bridge> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ClusterStats::default());
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("tern-bridge".into())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            log::error!("cluster bridge: cannot build its runtime: {e}");
                            return;
                        }
                    };
                    runtime.block_on(run(config, owners, ends, stop, stats, group_limits));
                })?
        };
        Ok(Bridge {
            thread,
            stop,
            stats,
        })
    }

    /// The counters the stats socket shows.
    pub fn stats(&self) -> Arc<ClusterStats> {
        self.stats.clone()
    }

    /// Stops the thread and waits for it. Leases are left to expire rather
    /// than deleted, so a node stopping never races a node taking over.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Sleeps `total`, or less if `stop` is raised; returns whether it was.
async fn nap(total: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + total;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep(STOP_POLL.min(until - Instant::now())).await;
    }
    stop.load(Ordering::Relaxed)
}

async fn run(
    config: ClusterConfig,
    owners: Arc<Owners>,
    ends: BridgeEnds,
    stop: Arc<AtomicBool>,
    stats: Arc<ClusterStats>,
    group_limits: (usize, usize),
) {
    let stats_arc = stats;
    let stats = &*stats_arc;
    let lease = Duration::from_secs(config.lease_s.into());
    // A third of the lease: two renewals may fail before the lease ends.
    let every = lease / 3;
    let client = match async_nats::ConnectOptions::new()
        .name(format!("tern {}", config.node_id))
        .retry_on_initial_connect()
        // One address per URL: async-nats reads a joined string as one URL.
        .connect(config.nats_urls.as_slice())
        .await
    {
        Ok(client) => client,
        Err(e) => {
            log::error!("cluster bridge: bad NATS address: {e}");
            return;
        }
    };
    let js = jetstream::new(client);
    let relay = Relay::new(
        config.node_id.clone(),
        ends,
        js.clone(),
        owners.clone(),
        stats_arc.clone(),
        group_limits,
        lease,
    );
    let replays = relay.replays();
    tokio::spawn(relay.run(stop.clone()));
    let start = node_start(&config.node_id, config.partitions);
    let mut leases = Leases::new(config.partitions, start);
    let mut last_ok = Instant::now();
    let mut store: Option<kv::Store> = None;
    // Other nodes' partitions the last listing did not show.
    let mut unlisted = BTreeSet::new();
    // Partitions claimed whose users' states are not in the shards yet.
    let mut unready = BTreeSet::new();
    loop {
        let round = async {
            if store.is_none() {
                let replicas = config.stream_replicas as usize;
                stats
                    .stream_replicas
                    .set(streams::ensure_messages(&js, config.partitions, replicas).await? as u64);
                let kv = bucket(&js, lease, replicas).await?;
                groups_bucket(&js, replicas).await?;
                tokio::spawn(watch(kv.clone(), owners.clone(), config.node_id.clone()));
                store = Some(kv);
            }
            let kv = store.as_ref().expect("just set");
            let round = Round {
                config: &config,
                owners: &owners,
                stats,
                replays: &replays,
            };
            lease_round(kv, &round, &mut leases, &mut unlisted, &mut unready).await
        };
        match round.await {
            Ok(()) => {
                last_ok = Instant::now();
                stats.nats_up.set(1);
            }
            Err(e) => {
                stats.nats_up.set(0);
                log::warn!("cluster bridge: lease round failed: {e}");
                // Unproven for a whole lease: another node may hold them now.
                if last_ok.elapsed() >= lease && leases.owned() > 0 {
                    log::warn!(
                        "cluster bridge: NATS out of reach for a lease, dropping {} partitions",
                        leases.owned()
                    );
                    stats.leases_lost.add(leases.owned() as u64);
                    for (p, _) in leases.renewals() {
                        owners.set_other(p, None);
                    }
                    leases.lose_all();
                }
            }
        }
        stats.partitions_owned.set(leases.owned() as u64);
        stats.partitions_unowned.set(u64::from(owners.unowned()));
        if nap(every, &stop).await {
            return;
        }
    }
}

/// Where node `node_id` starts looking for free partitions: a hash of its
/// name, so nodes started together spread their first claims.
fn node_start(node_id: &str, partitions: u32) -> u32 {
    let h = node_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % u64::from(partitions)) as u32
}

/// The lease bucket, created if missing, with `replicas` copies like the
/// message streams: a lease must outlive one NATS server as much as the
/// messages do. Its max age is the lease: a key
/// not rewritten for a lease vanishes, which is how leases expire with no
/// clock shared between nodes.
///
/// The bucket's stream is created directly, with the settings a KV bucket
/// has (`KV_` name, `$KV.` subjects, one value per key, rollups, no
/// deletes), because async-nats' `create_key_value` first reads the account
/// info, which it cannot parse from nats-server 2.9.
async fn bucket(
    js: &jetstream::Context,
    lease: Duration,
    replicas: usize,
) -> Result<kv::Store, async_nats::Error> {
    let config = jetstream::stream::Config {
        name: format!("KV_{LEASE_BUCKET}"),
        subjects: vec![format!("$KV.{LEASE_BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: lease,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    // Another node may have created it first, with its own lease_s: kept.
    streams::ensure(js, config, replicas).await?;
    Ok(js.get_key_value(LEASE_BUCKET).await?)
}

/// The groups' state bucket (docs/CLUSTER.md, "Groups across nodes"),
/// created if missing like the lease bucket, with `replicas` copies and no
/// max age: a group's state lives as long as the group.
async fn groups_bucket(js: &jetstream::Context, replicas: usize) -> Result<(), async_nats::Error> {
    let config = jetstream::stream::Config {
        name: format!("KV_{}", super::groups::BUCKET),
        subjects: vec![format!("$KV.{}.>", super::groups::BUCKET)],
        max_messages_per_subject: 1,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    streams::ensure(js, config, replicas).await?;
    Ok(())
}

/// What a lease round works with.
struct Round<'a> {
    config: &'a ClusterConfig,
    owners: &'a Owners,
    stats: &'a ClusterStats,
    /// Where claimed partitions' states are replayed (the relay).
    replays: &'a tokio::sync::mpsc::UnboundedSender<Replay>,
}

/// One heartbeat, renewal and claim round. `unlisted` carries, from one
/// round to the next, the partitions of other nodes the listing missed;
/// `unready` the partitions claimed whose users' states were not replayed
/// into the shards yet (not served until they are).
async fn lease_round(
    kv: &kv::Store,
    round: &Round<'_>,
    leases: &mut Leases,
    unlisted: &mut BTreeSet<u32>,
    unready: &mut BTreeSet<u32>,
) -> Result<(), async_nats::Error> {
    let Round {
        config,
        owners,
        stats,
        replays,
    } = *round;
    let started = Instant::now();
    let value = format!("{} {}", config.node_id, config.public_addr);
    kv.put(node_key(&config.node_id), value.clone().into())
        .await?;
    let renewed: Vec<_> = futures_util::stream::iter(leases.renewals())
        .map(|(p, revision)| {
            let update = kv.update(partition_key(p), value.clone().into(), revision);
            async move { (p, update.await) }
        })
        .buffer_unordered(LEASE_WRITES_IN_FLIGHT)
        .collect()
        .await;
    // Every answer is applied before an error returns: a renewal that
    // succeeded moved the revision the next one must name.
    let mut failed = None;
    for (p, result) in renewed {
        match result {
            Ok(next) => leases.held(p, next),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                log::warn!("cluster bridge: lease on partition {p} lost");
                stats.leases_lost.inc();
                leases.lost(p);
                if owners.of(p) == Owner::Here {
                    owners.set_other(p, None);
                }
            }
            Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    // Every lease still held was rewritten after `started`; claims below
    // are written later still.
    owners.prove_until(started + Duration::from_secs(config.lease_s.into()));
    // The live keys, from one STREAM.INFO the bucket's stream leader
    // answers. `kv.keys()` creates a consumer every round (seen in the
    // nats-server logs of the kill -9 test, issue 15): a proposal through
    // the JetStream meta leader per node and round, and a round that waits
    // while a dead server's meta leadership moves.
    let mut listing = Listing::default();
    let prefix = format!("{}.", kv.prefix.trim_end_matches('.'));
    let mut subjects = kv.stream.info_with_subjects(format!("{prefix}>")).await?;
    while let Some((subject, _)) = subjects.try_next().await? {
        if let Some(key) = subject.strip_prefix(&prefix) {
            listing.add_key(key);
        }
    }
    // Keys whose holder's heartbeat is gone (a dead node's, expiring).
    let stale: Vec<u32> = listing
        .taken
        .iter()
        .copied()
        .filter(
            |&p| matches!(owners.of(p), Owner::Elsewhere { node, .. } if !listing.is_live(node)),
        )
        .collect();
    listing.stale.extend(stale);
    stats.live_nodes.set(listing.live_nodes().into());
    let released = leases.to_release(&listing);
    if !released.is_empty() {
        log::info!(
            "cluster bridge: {} nodes live, letting {} partitions lapse for them",
            listing.live_nodes(),
            released.len()
        );
    }
    for p in released {
        leases.lost(p);
        owners.set_other(p, None);
    }
    // Leases that expired with no one taking them yet (a dead node's). A
    // listing can miss a key its owner rewrites while it runs (issue 15:
    // a served partition showed no owner until the next round, and its
    // users got `unavailable`), so only a key missing from two listings in
    // a row counts as expired.
    let mut missing = BTreeSet::new();
    for p in 0..config.partitions {
        if !listing.taken.contains(&p) && !leases.owns(p) && owners.of(p) != Owner::Nobody {
            if unlisted.contains(&p) {
                log::info!("cluster bridge: lease on partition {p} expired, no owner now");
                owners.set_other(p, None);
            } else {
                missing.insert(p);
            }
        }
    }
    *unlisted = missing;
    let created: Vec<_> = futures_util::stream::iter(leases.to_claim(&listing))
        .map(|p| {
            let create = kv.create(partition_key(p), value.clone().into());
            async move { (p, create.await) }
        })
        .buffer_unordered(LEASE_WRITES_IN_FLIGHT)
        .collect()
        .await;
    let mut claimed = 0;
    let mut failed = None;
    for (p, result) in created {
        match result {
            Ok(revision) => {
                leases.held(p, revision);
                unready.insert(p);
                claimed += 1;
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => failed = Some(e),
        }
    }
    if claimed > 0 {
        log::info!(
            "cluster bridge: claimed {claimed} partitions, {} held, {} nodes live",
            leases.owned(),
            listing.live_nodes()
        );
    }
    serve_replayed(leases, unready, owners, replays, config.lease_s).await;
    if let Some(e) = failed {
        return Err(e.into());
    }
    stats
        .lease_round_ms
        .set(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    Ok(())
}

/// Serves the partitions of `unready` still held once the relay replayed
/// their users' states into the shards (docs/CLUSTER.md, "Per-user state
/// across nodes"): until then LOGIN answers `unavailable` and no consumer
/// runs for them. Waits at most a third of a lease; what is not done is
/// tried again next round.
async fn serve_replayed(
    leases: &Leases,
    unready: &mut BTreeSet<u32>,
    owners: &Owners,
    replays: &tokio::sync::mpsc::UnboundedSender<Replay>,
    lease_s: u32,
) {
    unready.retain(|&p| leases.owns(p));
    if unready.is_empty() {
        return;
    }
    let partitions: Vec<u32> = unready.iter().copied().collect();
    let (done, replayed) = tokio::sync::oneshot::channel();
    let asked = replays.send(Replay {
        partitions: partitions.clone(),
        done,
    });
    let wait = Duration::from_secs(lease_s.into()) / 3;
    if asked.is_err() || !matches!(tokio::time::timeout(wait, replayed).await, Ok(Ok(()))) {
        log::warn!(
            "cluster bridge: states of {} claimed partitions not replayed yet; tried again \
             next round",
            partitions.len()
        );
        return;
    }
    for p in partitions {
        owners.set_here(p);
        unready.remove(&p);
    }
}

/// Follows every write to the lease bucket and records in `owners` which
/// other node holds each partition. A lease that expires writes nothing, so
/// the lease round clears those from its listing. Restarts the watch after
/// an error; ends with the runtime.
async fn watch(kv: kv::Store, owners: Arc<Owners>, node_id: String) {
    loop {
        match kv.watch_all().await {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    match entry {
                        Ok(entry) => observe(&owners, &node_id, &entry),
                        Err(e) => {
                            log::warn!("cluster bridge: lease watch: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => log::warn!("cluster bridge: cannot watch the lease bucket: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One write to the lease bucket, as seen by [`watch`]: a partition key
/// written by another node makes that node its owner here. This node's own
/// leases are the lease round's business.
fn observe(owners: &Owners, node_id: &str, entry: &kv::Entry) {
    let Some(p) = entry
        .key
        .strip_prefix("p.")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|&p| p < owners.partitions())
    else {
        return;
    };
    if entry.operation != kv::Operation::Put {
        owners.set_other(p, None);
        return;
    }
    let value = String::from_utf8_lossy(&entry.value);
    let Some((node, addr)) = value.split_once(' ') else {
        log::warn!(
            "cluster bridge: lease {} has a bad value {value:?}",
            entry.key
        );
        return;
    };
    if node == node_id {
        return;
    }
    match owners.node_index(node, addr) {
        Some(i) => owners.set_other(p, Some(i)),
        None => log::error!(
            "cluster bridge: more than {} nodes seen",
            super::owners::NODES_MAX
        ),
    }
}
