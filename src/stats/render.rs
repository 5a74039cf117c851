//! The shared [`StatsView`] and the text answers to stats commands.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::counters::{Counter, Kind, ShardStats};
use super::latency::{bucket_le_seconds, Histogram, Latency, Merged, LATENCY_BUCKETS};
use crate::store::QUEUE_LEN_BUCKETS;
use crate::supervisor::ShardState;

/// What the stats socket can see: process facts plus every shard's counters.
/// Built once at start-up and shared read-only with the stats thread.
#[derive(Debug)]
pub struct StatsView {
    /// Crate version, `env!("CARGO_PKG_VERSION")`.
    pub version: &'static str,
    /// I/O backend in use, e.g. `"poll (epoll)"`.
    pub backend: &'static str,
    /// When the server started; uptime is measured from here.
    pub started: Instant,
    /// Most connections the process holds (`Config::conns_max`).
    pub conns_max: usize,
    /// One block per shard, indexed by shard id.
    pub shards: Vec<Arc<ShardStats>>,
    /// The TLS settings `reload tls` re-reads; `None` without `tls_listen`.
    pub tls: Option<Arc<crate::tls::TlsContext>>,
    /// The cluster bridge's counters; `None` without a `[cluster]` section.
    pub cluster: Option<Arc<crate::cluster::ClusterStats>>,
    /// The push thread's counters; `None` without a `push_url`.
    pub push: Option<Arc<crate::push::PushStats>>,
    /// Pid, generation and live-upgrade state (`show info`, `upgrade`).
    pub upgrade: Arc<crate::upgrade::UpgradeInfo>,
    /// Flags `GET /readyz` reads besides the shards' state (draining).
    pub health: Arc<super::health::Health>,
    /// The operators' commands (`kick`, `ban`, `drain`, ...); `None` where
    /// no server runs behind the view.
    pub ops: Option<Arc<crate::ops::Ops>>,
}

impl StatsView {
    /// A view with this crate's version, started now, with `shard_count`
    /// zeroed shard blocks.
    pub fn new(backend: &'static str, conns_max: usize, shard_count: usize) -> StatsView {
        StatsView {
            version: env!("CARGO_PKG_VERSION"),
            backend,
            started: Instant::now(),
            conns_max,
            shards: (0..shard_count).map(|_| Arc::default()).collect(),
            tls: None,
            cluster: None,
            push: None,
            upgrade: Arc::default(),
            health: Arc::default(),
            ops: None,
        }
    }

    /// Sum of one field over every shard. Shards are read one after another,
    /// so the sum is not a snapshot of a single instant.
    fn sum(&self, get: Getter) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(get(s).get()))
    }

    /// One latency histogram added up over every shard.
    fn merged(&self, get: fn(&Latency) -> &Histogram) -> Merged {
        let mut m = Merged::default();
        for s in &self.shards {
            m.add(get(&s.latency));
        }
        m
    }
}

/// The commands, with their one-line descriptions, as `help` lists them.
const COMMANDS: &[(&str, &str)] = &[
    ("help", "this message"),
    (
        "show info",
        "process totals: version, uptime, connections, users, messages, memory",
    ),
    (
        "show shards",
        "one row per shard: connections, users, messages, queues, rings, loop latency",
    ),
    (
        "show limits",
        "one row per shard: what the abuse limits refused, banned and closed",
    ),
    (
        "show latency",
        "server-side latency, SEND decoded to ACK and to DELIVER written: quantiles and buckets",
    ),
    (
        "show metrics",
        "every counter of every shard in Prometheus text format 0.0.4",
    ),
    (
        "reload tls",
        "re-read tls_cert and tls_key; new TLS handshakes use them",
    ),
    (
        "upgrade [BINARY]",
        "live upgrade: hand the listeners and the data directory to BINARY (default: this \
         binary's path, re-read); as SIGUSR2",
    ),
    (
        "show user U",
        "user U: online or not, shard, one Session line per device (transport, address, DELIVERs in \
         flight, unsent bytes), queue and its oldest age, last seen, ban",
    ),
    (
        "show conns [sort by queue|age|bytes] [limit N]",
        "the top N (10) logged-in connections by queue length, oldest queued message or unsent output",
    ),
    (
        "kick user U [REASON]",
        "close U's connection with BYE(kicked); nothing queued is lost; REASON goes to the log",
    ),
    (
        "ban user U [for DURATION]",
        "refuse U's logins (LOGIN_ERR banned) and kick it; kept in <data_dir>/bans",
    ),
    ("unban user U", "lift U's ban"),
    (
        "device remove U D",
        "remove device D of user U: its session gets BYE(device_removed), U's other v2 devices \
         DEVICE_REMOVED",
    ),
    ("show bans", "the users banned, with the time left"),
    (
        "trace user U [for DURATION] [bodies]",
        "log every frame of U's connection for DURATION (60s; 0s stops): types, ids, sizes",
    ),
    (
        "set log level LEVEL",
        "off, error, warn, info, debug or trace, until the next change or restart",
    ),
    (
        "drain [for DURATION]",
        "refuse new connections with BYE(moving), close sessions evenly over DURATION (60s), idle \
         ones first",
    ),
];

/// Facts about the process that are read from the OS at render time; tests
/// pass fixed ones.
#[derive(Clone, Copy, Debug)]
struct Process {
    uptime: Duration,
    rss_bytes: u64,
    /// Open file descriptors; `None` where the OS will not say cheaply.
    open_fds: Option<u64>,
    /// The open-files limit (soft RLIMIT_NOFILE); `None` when unlimited.
    open_fds_max: Option<u64>,
}

/// Renders the answer to one command line. Pure except for reading the
/// resident memory from the OS (for `show info` and `show metrics`).
///
/// The line is trimmed and split on whitespace, so `show  info` works;
/// words are case-sensitive. Every answer ends with a newline.
pub fn render(view: &StatsView, command: &str) -> String {
    render_with(view, command, || Process {
        uptime: view.started.elapsed(),
        rss_bytes: rss_bytes(),
        open_fds: open_fds(),
        open_fds_max: open_fds_max(),
    })
}

fn render_with(view: &StatsView, command: &str, process: impl FnOnce() -> Process) -> String {
    let command = command.trim();
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["help"] => render_help(),
        ["show", "info"] => render_info(view, process()),
        ["show", "shards"] => render_table(view, SHARD_COLUMNS, true),
        ["show", "limits"] => render_table(view, LIMIT_COLUMNS, false),
        ["show", "latency"] => render_latency(view),
        ["show", "metrics"] => render_metrics(view, process()),
        ["reload", "tls"] => match &view.tls {
            Some(tls) => match tls.reload() {
                Ok(done) => format!("{done}\n"),
                Err(e) => format!("TLS reload failed, the old certificate stays: {e}\n"),
            },
            None => "TLS is not configured (no tls_listen).\n".to_string(),
        },
        ["upgrade"] | ["upgrade", _] => {
            let binary = words.get(1).map(std::path::PathBuf::from);
            match view.upgrade.request(binary) {
                Ok(text) | Err(text) => format!("{text}\n"),
            }
        }
        _ => view
            .ops
            .as_ref()
            .and_then(|ops| ops.answer(&words))
            .unwrap_or_else(|| format!("Unknown command: '{command}'. Try 'help'.\n")),
    }
}

fn render_help() -> String {
    let width = COMMANDS.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    let mut out = String::from("The following commands are valid:\n");
    for (command, description) in COMMANDS {
        // `write!` to a String cannot fail.
        let _ = writeln!(out, "  {command:<width$} : {description}");
    }
    out
}

fn render_info(view: &StatsView, process: Process) -> String {
    let conns = view.sum(|s| &s.conns);
    let bytes_per_conn = process.rss_bytes.checked_div(conns).unwrap_or(0);
    let lines: [(&str, String); 21] = [
        ("Version", view.version.to_string()),
        ("Pid", view.upgrade.pid.to_string()),
        ("Generation", view.upgrade.generation.to_string()),
        (
            "Upgraded_unix_ms",
            view.upgrade.upgraded_unix_ms.to_string(),
        ),
        ("Last_upgrade", view.upgrade.last()),
        ("Backend", view.backend.to_string()),
        ("Uptime_sec", process.uptime.as_secs().to_string()),
        ("Shards", view.shards.len().to_string()),
        ("Conns", conns.to_string()),
        ("Conns_max", view.conns_max.to_string()),
        ("Users_online", view.sum(|s| &s.users_online).to_string()),
        (
            "Sessions_online",
            view.sum(|s| &s.sessions_online).to_string(),
        ),
        ("Queued", view.sum(|s| &s.queued).to_string()),
        ("Msgs_in", view.sum(|s| &s.msgs_in).to_string()),
        ("Msgs_out", view.sum(|s| &s.msgs_out).to_string()),
        ("Panics", view.sum(|s| &s.panics).to_string()),
        ("Restarts", view.sum(|s| &s.restarts).to_string()),
        (
            "Devices_expired",
            view.sum(|s| &s.devices_expired).to_string(),
        ),
        (
            "Receipts_waiting",
            view.sum(|s| &s.receipts_waiting).to_string(),
        ),
        ("Rss_bytes", process.rss_bytes.to_string()),
        ("Bytes_per_conn", bytes_per_conn.to_string()),
    ];
    let mut out = String::new();
    for (key, value) in lines {
        let _ = writeln!(out, "{key}: {value}");
    }
    for (key, _, value) in cluster_gauges(view) {
        let _ = writeln!(out, "{key}: {value}");
    }
    if let Some(push) = &view.push {
        for (key, _, _, value) in push.rows() {
            let _ = writeln!(out, "{key}: {value}");
        }
    }
    if view.cluster.is_some() {
        // Summed over shards; per shard they are `tern_redirects_total` etc.
        let sessions: [(&str, Getter); 2] = [
            ("Cluster_redirects", |s| &s.redirects),
            ("Cluster_moved_closes", |s| &s.moved_closes),
        ];
        for (key, get) in sessions {
            let _ = writeln!(out, "{key}: {}", view.sum(get));
        }
    }
    if let Some(ops) = &view.ops {
        let draining = if ops.draining() { "yes" } else { "no" };
        let _ = writeln!(out, "Draining: {draining}");
        let banned = ops.bans_now();
        let _ = writeln!(out, "Bans: {banned}");
    }
    out
}

/// The cluster bridge's gauges as (`show info` key, help, value); none
/// without a `[cluster]` section.
fn cluster_gauges(view: &StatsView) -> Vec<(&'static str, &'static str, u64)> {
    let Some(c) = &view.cluster else {
        return Vec::new();
    };
    vec![
        (
            "Cluster_partitions_owned",
            "Partitions this node holds a lease on.",
            c.partitions_owned.get(),
        ),
        (
            "Cluster_partitions_unowned",
            "Partitions with no owner in this node's table at the last lease round.",
            c.partitions_unowned.get(),
        ),
        (
            "Cluster_live_nodes",
            "Nodes with a live heartbeat in the lease bucket, this one included.",
            c.live_nodes.get(),
        ),
        (
            "Cluster_leases_lost",
            "Partition leases lost since start (renewal refused, or NATS out of reach for a lease).",
            c.leases_lost.get(),
        ),
        (
            "Cluster_nats_up",
            "1 while the last lease round reached NATS, else 0.",
            c.nats_up.get(),
        ),
        (
            "Cluster_published",
            "SENDs published to JetStream since start.",
            c.published.get(),
        ),
        (
            "Cluster_publish_failures",
            "SENDs whose JetStream publish failed (refused with unavailable).",
            c.publish_failures.get(),
        ),
        (
            "Cluster_receipts_lost",
            "Receipts whose JetStream publish failed.",
            c.receipts_lost.get(),
        ),
        (
            "Cluster_pending_acks",
            "Records handed to this node's shards whose JetStream ack waits: messages not yet DELIVERED, receipts not yet written to every device of their user or kept in a stored user state.",
            c.pending_acks.get(),
        ),
        (
            "Cluster_consumers",
            "JetStream consumers running: one per message stream held whole, one per partition held of a stream shared with other nodes.",
            c.consumers.get(),
        ),
        (
            "Cluster_publishes_in_flight",
            "SENDs and receipts published to JetStream whose publish ack has not come back yet.",
            c.publishes_in_flight.get(),
        ),
        (
            "Cluster_presence_watches",
            "Presence subscriptions of this node's connections to users another node serves (or nobody, for now).",
            c.presence_watches.get(),
        ),
        (
            "Cluster_states_published",
            "User states (registered devices, waiting receipts, last seen, privacy) stored in the state streams TERNS_<g> (publish acknowledged).",
            c.states_published.get(),
        ),
        (
            "Cluster_states_in_flight",
            "User states published to the state streams whose publish ack has not come back yet.",
            c.states_in_flight.get(),
        ),
        (
            "Cluster_state_publish_failures",
            "User states not kept: publish failed, or the user's partition was no longer this node's.",
            c.state_publish_failures.get(),
        ),
        (
            "Cluster_states_replayed",
            "User states read from the state streams when this node claimed partitions.",
            c.states_replayed.get(),
        ),
        (
            "Cluster_stream_replicas",
            "Copies JetStream keeps of the message streams TERN_<g>, the fewest of any (1 on a NATS server without clustering).",
            c.stream_replicas.get(),
        ),
        (
            "Cluster_lease_round_ms",
            "Time the last successful lease round took (heartbeat, renewals, listing, claims): milliseconds in show info, seconds in Prometheus.",
            c.lease_round_ms.get(),
        ),
    ]
}

/// Reads one field of a shard's block.
type Getter = fn(&ShardStats) -> &Counter;

/// Columns of `show shards`, after the leading `shard` column.
const SHARD_COLUMNS: &[(&str, Getter)] = &[
    ("conns", |s| &s.conns),
    ("users", |s| &s.users_online),
    ("msgs_in", |s| &s.msgs_in),
    ("msgs_out", |s| &s.msgs_out),
    ("queued", |s| &s.queued),
    ("ring_in", |s| &s.ring_in_depth),
    ("ring_out", |s| &s.ring_out_depth),
    ("ring_full", |s| &s.ring_full),
    ("loop_p50_us", |s| &s.loop_p50_us),
    ("loop_p99_us", |s| &s.loop_p99_us),
];

/// Columns of `show limits` (docs/HARDENING.md), after the `shard` column.
const LIMIT_COLUMNS: &[(&str, Getter)] = &[
    ("pending", |s| &s.pending),
    ("addrs", |s| &s.addrs_tracked),
    ("limited_sends", |s| &s.limited_sends),
    ("limited_receipts", |s| &s.limited_receipts),
    ("limited_pings", |s| &s.limited_pings),
    ("limited_closes", |s| &s.limited_closes),
    ("unknown_message", |s| &s.unknown_message_refusals),
    ("refused_banned", |s| &s.addr_refused_banned),
    ("refused_rate", |s| &s.addr_refused_rate),
    ("refused_pending", |s| &s.addr_refused_pending),
    ("refused_table", |s| &s.addr_refused_table),
    ("bans", |s| &s.addr_bans),
    ("pending_evicted", |s| &s.pending_evicted),
];

/// A table: header row, then one row per shard (with a last `state` column
/// when `state`). Cells are separated by single spaces and padded to the
/// column width (the shard id on the left, numbers on the right), so both
/// eyes and `split_whitespace` can read it.
fn render_table(view: &StatsView, columns: &[(&str, Getter)], state: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(view.shards.len() + 1);
    let mut header = vec!["shard".to_string()];
    header.extend(columns.iter().map(|(name, _)| name.to_string()));
    if state {
        header.push("state".to_string());
    }
    rows.push(header);
    for (id, shard) in view.shards.iter().enumerate() {
        let mut row = vec![id.to_string()];
        row.extend(columns.iter().map(|(_, get)| get(shard).get().to_string()));
        if state {
            row.push(ShardState::from_u64(shard.state.get()).as_str().to_string());
        }
        rows.push(row);
    }
    format_rows(&rows)
}

/// A table of latency histograms.
type Latencies = &'static [(&'static str, &'static str, fn(&Latency) -> &Histogram)];

/// The latency histograms: name, what it measures (the Prometheus help
/// text), and the field.
const LATENCIES: Latencies = &[
    (
        "send_to_ack",
        "Time from a SEND decoded to its ACK written, all shards.",
        |l| &l.send_to_ack,
    ),
    (
        "send_to_deliver",
        "Time from a SEND decoded to its DELIVER to an online recipient written, all shards.",
        |l| &l.send_to_deliver,
    ),
    (
        "fsync",
        "Time of each group commit's fdatasync of its segment (durability fsync), all shards.",
        |l| &l.fsync,
    ),
    (
        "loop_iteration",
        "Time of each event-loop iteration (the work between two waits), all shards.",
        |l| &l.loop_iteration,
    ),
];

/// Every latency histogram shown: the shards' [`LATENCIES`], merged over
/// shards, then, with a `[cluster]` section, the bridge's
/// `cluster_publish` (docs/CLUSTER.md, "Stats").
fn latencies(view: &StatsView) -> Vec<(&'static str, &'static str, Merged)> {
    let mut all: Vec<_> = LATENCIES
        .iter()
        .map(|(name, what, get)| (*name, *what, view.merged(*get)))
        .collect();
    if let Some(c) = &view.cluster {
        let mut m = Merged::default();
        m.add(&c.publish_latency);
        all.push((
            "cluster_publish",
            "Time from a SEND or receipt taken by the cluster bridge to JetStream's publish ack (or failure) for it.",
            m,
        ));
    }
    all
}

/// `show latency`: one row per histogram (count, sum and quantiles, merged
/// over shards), a blank line, then the cumulative count of each histogram
/// per bucket bound `le_us`, like Prometheus buckets. A quantile is the
/// bound of the bucket holding it (`-` when empty, `+Inf` past the last).
fn render_latency(view: &StatsView) -> String {
    let all = latencies(view);
    let quantile = |m: &Merged, q: f64| match m.quantile_us(q) {
        None => "-".to_string(),
        Some(u64::MAX) => "+Inf".to_string(),
        Some(us) => us.to_string(),
    };
    let mut rows = vec![[
        "name", "count", "sum_us", "p50_us", "p90_us", "p99_us", "p999_us",
    ]
    .map(String::from)
    .to_vec()];
    for (name, _, m) in &all {
        rows.push(vec![
            name.to_string(),
            m.total().to_string(),
            (m.sum_ns / 1000).to_string(),
            quantile(m, 0.5),
            quantile(m, 0.9),
            quantile(m, 0.99),
            quantile(m, 0.999),
        ]);
    }
    let mut out = format_rows(&rows);
    out.push('\n');
    let mut rows = vec![std::iter::once("le_us")
        .chain(all.iter().map(|(name, _, _)| *name))
        .map(String::from)
        .collect::<Vec<_>>()];
    let mut cumulative = vec![0u64; all.len()];
    for i in 0..=LATENCY_BUCKETS {
        let le = if i < LATENCY_BUCKETS {
            (1u64 << i).to_string()
        } else {
            "+Inf".to_string()
        };
        let mut row = vec![le];
        for (c, (_, _, m)) in cumulative.iter_mut().zip(&all) {
            *c += m.buckets[i];
            row.push(c.to_string());
        }
        rows.push(row);
    }
    out.push_str(&format_rows(&rows));
    out
}

/// Rows of cells, padded to each column's width: the first column on the
/// left, the others on the right.
fn format_rows(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|col| rows.iter().map(|r| r[col].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        for (col, (cell, width)) in row.iter().zip(&widths).enumerate() {
            let _ = match col {
                0 => write!(out, "{cell:<width$}"),
                _ => write!(out, " {cell:>width$}"),
            };
        }
        out.push('\n');
    }
    out
}

/// Prometheus text exposition format 0.0.4: every family has `# HELP` and
/// `# TYPE`, then one sample per shard labelled `shard="N"`. Summing across
/// shards is left to the scraper.
fn render_metrics(view: &StatsView, process: Process) -> String {
    let mut out = String::new();
    for field in ShardStats::FIELDS {
        let (name, kind) = match field.kind {
            Kind::Gauge => (format!("tern_{}", field.name), "gauge"),
            Kind::Counter => (format!("tern_{}_total", field.name), "counter"),
            // Windowed percentiles stay on `show shards`; the histogram
            // below is their exported form.
            Kind::Window => continue,
            // Rendered by family below.
            Kind::Labelled => continue,
        };
        let _ = writeln!(out, "# HELP {name} {}", escape_help(field.help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (id, shard) in view.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{id}\"}} {}", (field.get)(shard).get());
        }
    }
    for (name, what, m) in latencies(view) {
        let name = format!("tern_{name}_seconds");
        let _ = writeln!(out, "# HELP {name} {what}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in m.buckets.iter().enumerate() {
            cumulative += b;
            let _ = match i < LATENCY_BUCKETS {
                true => writeln!(
                    out,
                    "{name}_bucket{{le=\"{}\"}} {cumulative}",
                    bucket_le_seconds(i)
                ),
                false => writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
            };
        }
        let _ = writeln!(out, "{name}_sum {}", m.sum_ns as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
    for (name, help, label, members) in LABELLED {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (id, shard) in view.shards.iter().enumerate() {
            for (value, get) in *members {
                let n = get(shard).get();
                let _ = writeln!(out, "{name}{{shard=\"{id}\",{label}=\"{value}\"}} {n}");
            }
        }
    }
    render_user_queues(view, &mut out);
    let process_gauges: [(&str, &str, String); 3] = [
        (
            "tern_uptime_seconds",
            "Seconds since the server started.",
            format!("{:.3}", process.uptime.as_secs_f64()),
        ),
        (
            "tern_resident_memory_bytes",
            "Resident memory of the process in bytes (peak on systems without /proc).",
            process.rss_bytes.to_string(),
        ),
        (
            "tern_conns_max",
            "Most client connections the process holds.",
            view.conns_max.to_string(),
        ),
    ];
    // Connections on the poll backend each hold a descriptor; io_uring
    // ones sit in the rings' fixed tables (tern_io_slots_used) instead.
    let fds: [(&str, &str, Option<u64>); 2] = [
        (
            "tern_open_fds",
            "Open file descriptors of the process.",
            process.open_fds,
        ),
        (
            "tern_open_fds_max",
            "The process's open-files limit (soft RLIMIT_NOFILE).",
            process.open_fds_max,
        ),
    ];
    let fds = fds
        .into_iter()
        .filter_map(|(name, help, v)| v.map(|v| (name, help, v.to_string())));
    let ops = view.ops.iter().flat_map(|ops| {
        let banned = ops.bans_now();
        [
            (
                "tern_bans",
                "Users banned now (ban user; bans that ran out are not counted).",
                banned.to_string(),
            ),
            (
                "tern_draining",
                "1 while the server is draining (taken out of service), else 0.",
                u8::from(ops.draining()).to_string(),
            ),
        ]
    });
    for (name, help, value) in process_gauges.into_iter().chain(fds).chain(ops) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    }
    for (key, help, value) in cluster_gauges(view) {
        let name = format!("tern_{}", key.to_ascii_lowercase());
        // Prometheus wants base units: `show info`'s milliseconds become
        // seconds here.
        let (name, value) = match name.strip_suffix("_ms") {
            Some(stem) => (format!("{stem}_seconds"), (value as f64 / 1e3).to_string()),
            None => (name, value.to_string()),
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    }
    if let Some(push) = &view.push {
        for (key, help, counter, value) in push.rows() {
            let (name, kind) = match counter {
                true => (
                    format!("tern_{}_total", key.to_ascii_lowercase()),
                    "counter",
                ),
                false => (format!("tern_{}", key.to_ascii_lowercase()), "gauge"),
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP tern_build_info Version and I/O backend; always 1."
    );
    let _ = writeln!(out, "# TYPE tern_build_info gauge");
    let _ = writeln!(
        out,
        "tern_build_info{{version=\"{}\",backend=\"{}\"}} 1",
        escape_label(view.version),
        escape_label(view.backend),
    );
    out
}

/// The members of a labelled family: each label value and its field.
type Members = &'static [(&'static str, Getter)];

/// Counter families with a label: (name, help, label, members). Their
/// fields are [`Kind::Labelled`].
const LABELLED: &[(&str, &str, &str, Members)] = &[(
    "tern_login_failures_total",
    "Failed logins by reason (bad_token: malformed or bad signature; token_expired; bad_version: protocol version not spoken; banned: by the operator; too_many_devices: devices_per_user_max online).",
    "reason",
    &[
        ("bad_token", |s| &s.login_failures_bad_token),
        ("token_expired", |s| &s.login_failures_token_expired),
        ("bad_version", |s| &s.login_failures_bad_version),
        ("banned", |s| &s.login_failures_banned),
        ("too_many_devices", |s| &s.login_failures_too_many_devices),
    ],
)];

/// `tern_user_queue_length`: users with queued messages by queue length,
/// merged over shards. The bucket counts are levels (users now), not running
/// totals, so they go down as queues drain; `_sum` is the messages queued.
fn render_user_queues(view: &StatsView, out: &mut String) {
    let name = "tern_user_queue_length";
    let _ = writeln!(
        out,
        "# HELP {name} Users with queued messages by queue length (current levels, not running totals), all shards; _sum is the messages queued."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for i in 0..=QUEUE_LEN_BUCKETS {
        cumulative += view
            .shards
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.user_queues[i].get()));
        let _ = match i < QUEUE_LEN_BUCKETS {
            true => writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", 1u64 << i),
            false => writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
        };
    }
    let _ = writeln!(out, "{name}_sum {}", view.sum(|s| &s.queued));
    let _ = writeln!(out, "{name}_count {cumulative}");
}

/// `# HELP` text escapes backslash and newline (format 0.0.4).
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values also escape the double quote (format 0.0.4).
fn escape_label(s: &str) -> String {
    escape_help(s).replace('"', "\\\"")
}

/// Open file descriptors of this process: the entries of `/proc/self/fd`
/// (one of them the directory being read, not counted).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((entries.count() as u64).saturating_sub(1))
}

/// Open file descriptors of this process: not rendered elsewhere (FreeBSD
/// would need a `kern.proc.filedesc` walk per scrape).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn open_fds() -> Option<u64> {
    None
}

/// The soft open-files limit, `None` when unlimited or unknown.
// rlim_t is u64 on Linux and i64 on FreeBSD: the conversion is only
// fallible on the one.
#[allow(clippy::useless_conversion, clippy::unnecessary_fallible_conversions)]
fn open_fds_max() -> Option<u64> {
    // SAFETY: `rlimit` is plain old data, so all-zero bytes are a valid value.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is a valid, writable `rlimit` for the call to fill in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    // EFAULT/EINVAL cannot happen with these arguments; report unknown.
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    u64::try_from(limit.rlim_cur).ok()
}

/// Resident memory of this process in bytes, 0 if the OS will not say.
///
/// Linux: resident pages from `/proc/self/statm` times the page size.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    // Fields: size resident shared text lib data dt, all in pages.
    let Some(pages) = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
    else {
        return 0;
    };
    // SAFETY: sysconf only reads a system constant; it has no preconditions.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // -1 means the value is unknown.
    u64::try_from(page_bytes).map_or(0, |b| pages.saturating_mul(b))
}

/// Resident memory of this process in bytes, 0 if the OS will not say.
///
/// FreeBSD: the current resident size, `ki_rssize` (pages) of the process's
/// `kinfo_proc` from sysctl `kern.proc.pid.<pid>` (as procstat(1) and ps(1)
/// read it), times the page size. Not `ru_maxrss`, which is the peak and
/// would make `Bytes_per_conn` never go down after a busy hour.
#[cfg(target_os = "freebsd")]
pub(crate) fn rss_bytes() -> u64 {
    let Ok(pid) = libc::pid_t::try_from(std::process::id()) else {
        return 0;
    };
    let mib = [libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid];
    // SAFETY: `kinfo_proc` is plain old data, so all-zero bytes are a valid value.
    let mut info: libc::kinfo_proc = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::kinfo_proc>();
    // SAFETY: `mib` holds 4 ints; `info` is a writable buffer of `len`
    // bytes, and the kernel writes at most `len` bytes and stores the count
    // in `len`; no new value is set (null, 0).
    let rc = unsafe {
        libc::sysctl(
            mib.as_ptr(),
            mib.len() as libc::c_uint,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    // ENOMEM would mean a kernel whose kinfo_proc is larger than ours; a
    // short answer, one we cannot read. Report unknown rather than guess.
    if rc != 0 || len != std::mem::size_of::<libc::kinfo_proc>() {
        return 0;
    }
    let pages = u64::try_from(info.ki_rssize).unwrap_or(0);
    // SAFETY: sysconf only reads a system constant; it has no preconditions.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // -1 means the value is unknown.
    u64::try_from(page_bytes).map_or(0, |b| pages.saturating_mul(b))
}

/// Resident memory of this process in bytes, 0 if the OS will not say.
///
/// Elsewhere (macOS, other BSDs: development only) this is `getrusage`'s
/// `ru_maxrss`: the *peak* resident size, in bytes on Apple systems and in
/// KiB on the BSDs.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub(crate) fn rss_bytes() -> u64 {
    // SAFETY: `rusage` is plain old data, so all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` for the call to fill in.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        // EFAULT/EINVAL cannot happen with these arguments; report unknown.
        return 0;
    }
    let max_rss = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    if cfg!(any(target_os = "macos", target_os = "ios")) {
        max_rss
    } else {
        max_rss.saturating_mul(1024)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// Two shards with distinct, recognisable values.
    pub(crate) fn fake_view() -> StatsView {
        let view = StatsView {
            version: "9.8.7",
            backend: "fake \"backend\"",
            started: Instant::now(),
            conns_max: 1000,
            shards: vec![Arc::default(), Arc::default()],
            tls: None,
            cluster: None,
            push: None,
            upgrade: Arc::default(),
            health: Arc::default(),
            ops: None,
        };
        let (a, b) = (&view.shards[0], &view.shards[1]);
        a.conns.set(3);
        b.conns.set(4);
        a.users_online.set(2);
        b.users_online.set(1);
        a.queued.set(10);
        b.queued.set(20);
        a.msgs_in.add(100);
        b.msgs_in.add(200);
        a.msgs_out.add(1000);
        b.msgs_out.add(2000);
        b.panics.inc();
        a.ring_in_depth.set(5);
        b.ring_out_depth.set(6);
        b.ring_full.add(7);
        a.loop_p50_us.set(12);
        a.loop_p99_us.set(345);
        a.latency.send_to_ack.record(3_000);
        b.latency.send_to_ack.record(5_000);
        b.latency.send_to_ack.record(40_000_000_000);
        a.latency.send_to_deliver.record(900);
        b.login_failures_token_expired.add(2);
        a.user_queues[0].set(2);
        b.user_queues[0].set(1);
        b.user_queues[2].set(1);
        view
    }

    fn fixed() -> Process {
        Process {
            uptime: Duration::from_millis(61_500),
            rss_bytes: 7_000,
            open_fds: Some(12),
            open_fds_max: Some(20_000),
        }
    }

    fn info_map(text: &str) -> HashMap<String, String> {
        text.lines()
            .map(|l| {
                let (k, v) = l.split_once(": ").expect("Key: value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn help_lists_every_command() {
        let out = render(&fake_view(), "help");
        assert!(out.ends_with('\n'));
        for (command, _) in COMMANDS {
            assert!(out.contains(command), "{command} missing from {out}");
        }
    }

    #[test]
    fn info_sums_shards() {
        let out = render_with(&fake_view(), "  show info \n", fixed);
        assert!(out.ends_with('\n'));
        let info = info_map(&out);
        let expect = [
            ("Version", "9.8.7"),
            ("Backend", "fake \"backend\""),
            ("Uptime_sec", "61"),
            ("Shards", "2"),
            ("Conns", "7"),
            ("Conns_max", "1000"),
            ("Users_online", "3"),
            ("Sessions_online", "0"),
            ("Queued", "30"),
            ("Msgs_in", "300"),
            ("Msgs_out", "3000"),
            ("Panics", "1"),
            ("Restarts", "0"),
            ("Devices_expired", "0"),
            ("Receipts_waiting", "0"),
            ("Rss_bytes", "7000"),
            ("Bytes_per_conn", "1000"),
            ("Generation", "0"),
            ("Upgraded_unix_ms", "0"),
            ("Last_upgrade", "none"),
        ];
        let pid = std::process::id().to_string();
        assert_eq!(info.get("Pid"), Some(&pid));
        assert_eq!(info.len(), expect.len() + 1, "{out}");
        for (k, v) in expect {
            assert_eq!(info.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[test]
    fn upgrade_needs_the_serve_signal_handler_and_runs_once() {
        let view = fake_view();
        let out = render(&view, "upgrade");
        assert!(out.contains("needs `tern serve`"), "{out}");
        // With the handler (here: the phase alone, no signal raised), a
        // second request while one runs is refused.
        view.upgrade.begin();
        view.upgrade.enable_signal();
        let out = render(&view, "upgrade /usr/bin/other");
        assert!(
            out.starts_with("refused: an upgrade is already in progress"),
            "{out}"
        );
        assert_eq!(
            info_map(&render(&view, "show info"))["Last_upgrade"],
            "in progress"
        );
        view.upgrade.end("failed: test".to_string());
        assert_eq!(
            info_map(&render(&view, "show info"))["Last_upgrade"],
            "failed: test"
        );
    }

    #[test]
    fn info_with_no_connections() {
        let view = StatsView::new("none", 10, 0);
        let info = info_map(&render_with(&view, "show info", fixed));
        assert_eq!(info["Conns"], "0");
        assert_eq!(info["Bytes_per_conn"], "0");
        assert_eq!(info["Version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn info_reads_real_rss() {
        let info = info_map(&render(&fake_view(), "show info"));
        let rss: u64 = info["Rss_bytes"].parse().unwrap();
        if cfg!(any(target_os = "linux", target_os = "freebsd")) {
            assert!(rss > 0);
        }
        let per_conn: u64 = info["Bytes_per_conn"].parse().unwrap();
        assert_eq!(per_conn, rss / 7);
    }

    /// The figure is the current resident size, not the peak: it rises
    /// while 256 MiB are touched and falls once they are unmapped (the peak,
    /// `ru_maxrss`, would stay up). Half the size as margin keeps other tests
    /// of this process from mattering.
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    #[test]
    fn rss_is_current_not_peak() {
        const LEN: usize = 256 << 20;
        const MARGIN: u64 = (LEN / 2) as u64;
        let before = rss_bytes();
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANON,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of 256 MiB failed");
        // SAFETY: `p` is a writable mapping of LEN bytes, ours alone.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, LEN) };
        let touched = rss_bytes();
        // SAFETY: unmaps exactly the mapping made above, no longer used.
        assert_eq!(unsafe { libc::munmap(p, LEN) }, 0);
        let after = rss_bytes();
        assert!(
            touched >= before + MARGIN,
            "before {before}, touched {touched}"
        );
        assert!(
            after + MARGIN <= touched,
            "touched {touched}, after unmap {after}"
        );
    }

    #[test]
    fn shards_table() {
        let out = render(&fake_view(), "show shards");
        assert!(out.ends_with('\n'));
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "shard",
                "conns",
                "users",
                "msgs_in",
                "msgs_out",
                "queued",
                "ring_in",
                "ring_out",
                "ring_full",
                "loop_p50_us",
                "loop_p99_us",
                "state"
            ]
        );
        assert_eq!(
            rows[1],
            ["0", "3", "2", "100", "1000", "10", "5", "0", "0", "12", "345", "up"]
        );
        assert_eq!(
            rows[2],
            ["1", "4", "1", "200", "2000", "20", "0", "6", "7", "0", "0", "up"]
        );
        assert_eq!(rows.len(), 3);
        // Aligned: every line has the same width, and no trailing space.
        let widths: HashSet<usize> = out.lines().map(str::len).collect();
        assert_eq!(widths.len(), 1, "{out}");
        assert!(out.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn limits_table() {
        let view = fake_view();
        view.shards[1].addr_bans.add(3);
        let out = render(&view, "show limits");
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].len(), LIMIT_COLUMNS.len() + 1);
        let bans = rows[0].iter().position(|c| *c == "bans").unwrap();
        assert_eq!((rows[1][bans], rows[2][bans]), ("0", "3"));
    }

    #[test]
    fn shards_table_without_shards_is_a_header() {
        let out = render(&StatsView::new("none", 10, 0), "show shards");
        assert_eq!(out.lines().count(), 1);
        assert!(out.starts_with("shard "));
    }

    /// A parsed sample line: `name{labels} value` or `name value`.
    fn parse_sample(line: &str) -> (String, HashMap<String, String>, f64) {
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value.parse().expect("numeric value");
        let (name, labels) = match series.split_once('{') {
            None => (series, HashMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = HashMap::new();
                // Values here hold no commas or escaped quotes except build_info's.
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").expect("key=\"");
                    let mut end = 0;
                    let bytes = after.as_bytes();
                    while bytes[end] != b'"' {
                        end += if bytes[end] == b'\\' { 2 } else { 1 };
                    }
                    labels.insert(key.to_string(), after[..end].to_string());
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name, labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.starts_with("tern_"),
            "bad name {name}"
        );
        (name.to_string(), labels, value)
    }

    #[test]
    fn metrics_parse_and_are_described() {
        let out = render_with(&fake_view(), "show metrics", fixed);
        assert!(out.ends_with('\n'));
        let mut help = HashSet::new();
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap();
                assert!(!text.is_empty());
                assert!(help.insert(name.to_string()), "HELP twice for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(help.contains(name), "TYPE before HELP for {name}");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none());
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (name, labels, value) = parse_sample(line);
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                .unwrap_or(&name);
            assert!(types.contains_key(family), "sample before TYPE: {line}");
            samples.push((name, labels, value));
        }
        // Every described metric has samples; counters and only counters end in _total.
        for (name, kind) in &types {
            assert!(
                samples.iter().any(|(n, _, _)| n.starts_with(name.as_str())),
                "{name} has no sample"
            );
            assert_eq!(name.ends_with("_total"), kind == "counter", "{name}");
        }
        // The two windowed percentiles are not exported and the five
        // login failure reasons are one family; the five histograms, three
        // process gauges and build_info come on top.
        let exported = ShardStats::FIELDS
            .iter()
            .filter(|f| f.kind == Kind::Gauge || f.kind == Kind::Counter)
            .count();
        assert_eq!(exported, ShardStats::FIELDS.len() - 7);
        assert_eq!(types.len(), exported + 12);
        // Histograms: merged over shards, cumulative buckets ending in +Inf
        // that equal _count.
        let buckets: Vec<_> = samples
            .iter()
            .filter(|(n, _, _)| n == "tern_send_to_ack_seconds_bucket")
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS + 1);
        assert!(buckets.windows(2).all(|w| w[0].2 <= w[1].2));
        assert_eq!(buckets[0].1["le"], "0.000001");
        assert_eq!(buckets[2].2, 1.0); // 3 µs <= 4 µs
        assert_eq!(buckets[3].2, 2.0); // 5 µs <= 8 µs
        assert_eq!(buckets[LATENCY_BUCKETS - 1].2, 2.0);
        assert_eq!(buckets[LATENCY_BUCKETS].1["le"], "+Inf");
        assert_eq!(buckets[LATENCY_BUCKETS].2, 3.0);
        let find = |name: &str| samples.iter().find(|(n, _, _)| n == name).unwrap();
        assert_eq!(find("tern_send_to_ack_seconds_count").2, 3.0);
        assert!((find("tern_send_to_ack_seconds_sum").2 - 40.000008).abs() < 1e-9);
        assert_eq!(find("tern_send_to_deliver_seconds_count").2, 1.0);
        let get = |name: &str, shard: &str| {
            samples
                .iter()
                .find(|(n, l, _)| n == name && l.get("shard").map(String::as_str) == Some(shard))
                .map(|s| s.2)
        };
        assert_eq!(get("tern_msgs_in_total", "0"), Some(100.0));
        assert_eq!(get("tern_msgs_in_total", "1"), Some(200.0));
        assert_eq!(get("tern_conns", "1"), Some(4.0));
        assert_eq!(get("tern_ring_full_total", "1"), Some(7.0));
        assert_eq!(get("tern_loop_p99_us", "0"), None, "windowed, not exported");
        assert_eq!(types["tern_loop_iteration_seconds"], "histogram");
        assert_eq!(get("tern_conns", "2"), None);
        let per_shard = samples
            .iter()
            .filter(|(_, l, _)| l.contains_key("shard"))
            .count();
        assert_eq!(per_shard, (exported + LABELLED[0].3.len()) * 2);
        let failures = samples
            .iter()
            .find(|(n, l, _)| {
                n == "tern_login_failures_total"
                    && l["shard"] == "1"
                    && l["reason"] == "token_expired"
            })
            .expect("login failures by reason");
        assert_eq!(failures.2, 2.0);
        // Users by queue length: 3 users with 1 message, 1 with 3.
        let queues: Vec<_> = samples
            .iter()
            .filter(|(n, _, _)| n == "tern_user_queue_length_bucket")
            .map(|(_, l, v)| (l["le"].as_str(), *v))
            .collect();
        assert_eq!(queues.len(), QUEUE_LEN_BUCKETS + 1);
        assert_eq!(&queues[..3], &[("1", 3.0), ("2", 3.0), ("4", 4.0)]);
        assert_eq!(queues[QUEUE_LEN_BUCKETS], ("+Inf", 4.0));
        assert_eq!(find("tern_user_queue_length_count").2, 4.0);
        assert_eq!(find("tern_user_queue_length_sum").2, 30.0);
        assert_eq!(find("tern_uptime_seconds").2, 61.5);
        assert_eq!(find("tern_resident_memory_bytes").2, 7000.0);
        assert_eq!(find("tern_conns_max").2, 1000.0);
        assert_eq!(find("tern_open_fds").2, 12.0);
        assert_eq!(find("tern_open_fds_max").2, 20_000.0);
        let build = find("tern_build_info");
        assert_eq!(build.2, 1.0);
        assert_eq!(build.1["version"], "9.8.7");
        assert_eq!(build.1["backend"], "fake \\\"backend\\\"");
    }

    #[test]
    fn push_counters_only_with_a_push_thread() {
        let plain = render_with(&fake_view(), "show info", fixed);
        assert!(!plain.contains("Push_"), "{plain}");
        let mut view = fake_view();
        let push = Arc::new(crate::push::PushStats::default());
        push.sent.store(5, std::sync::atomic::Ordering::Relaxed);
        push.pending.store(2, std::sync::atomic::Ordering::Relaxed);
        view.push = Some(push);
        let info = info_map(&render_with(&view, "show info", fixed));
        assert_eq!(info.keys().filter(|k| k.starts_with("Push_")).count(), 8);
        assert_eq!(info["Push_sent"], "5");
        let metrics = render_with(&view, "show metrics", fixed);
        for line in [
            "# TYPE tern_push_sent_total counter",
            "tern_push_sent_total 5",
            "# TYPE tern_push_pending gauge",
            "tern_push_pending 2",
            "tern_push_queue_full_total 0",
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no {line:?} in\n{metrics}"
            );
        }
    }

    #[test]
    fn latency_table() {
        let out = render(&fake_view(), "show latency");
        let (summary, buckets) = out.split_once("\n\n").unwrap();
        let rows: Vec<Vec<&str>> = summary
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            ["name", "count", "sum_us", "p50_us", "p90_us", "p99_us", "p999_us"]
        );
        assert_eq!(
            rows[1],
            ["send_to_ack", "3", "40000008", "8", "+Inf", "+Inf", "+Inf"]
        );
        assert_eq!(rows[2], ["send_to_deliver", "1", "0", "1", "1", "1", "1"]);
        assert_eq!(rows[3], ["fsync", "0", "0", "-", "-", "-", "-"]);
        assert_eq!(rows[4], ["loop_iteration", "0", "0", "-", "-", "-", "-"]);
        let rows: Vec<Vec<&str>> = buckets
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "le_us",
                "send_to_ack",
                "send_to_deliver",
                "fsync",
                "loop_iteration"
            ]
        );
        assert_eq!(rows.len(), LATENCY_BUCKETS + 2);
        assert_eq!(rows[3], ["4", "1", "1", "0", "0"]);
        assert_eq!(rows[LATENCY_BUCKETS + 1], ["+Inf", "3", "1", "0", "0"]);
        let empty = render(&StatsView::new("none", 10, 1), "show latency");
        let row: Vec<&str> = empty.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row, ["send_to_ack", "0", "0", "-", "-", "-", "-"]);
    }

    /// With a `[cluster]` section the bridge's publish latency is one more
    /// row and histogram, and publishes in flight one more gauge; standalone
    /// shows neither.
    #[test]
    fn cluster_publish_latency_and_in_flight() {
        let mut view = fake_view();
        assert!(!render(&view, "show latency").contains("cluster_publish"));
        assert!(!render(&view, "show metrics").contains("tern_cluster_publish"));
        let cluster = Arc::new(crate::cluster::ClusterStats::default());
        cluster.publish_latency.record(1_500_000);
        cluster.publish_latency.record(3_000_000);
        cluster.publishes_in_flight.set(2);
        view.cluster = Some(cluster);

        let out = render(&view, "show latency");
        let row: Vec<&str> = out
            .lines()
            .find(|l| l.starts_with("cluster_publish "))
            .expect("a cluster_publish row")
            .split_whitespace()
            .collect();
        assert_eq!(
            row,
            [
                "cluster_publish",
                "2",
                "4500",
                "2048",
                "4096",
                "4096",
                "4096"
            ]
        );
        let header = out.split_once("\n\n").unwrap().1.lines().next().unwrap();
        assert!(header.ends_with(" cluster_publish"), "{header}");

        let metrics = render(&view, "show metrics");
        for line in [
            "# TYPE tern_cluster_publish_seconds histogram",
            "tern_cluster_publish_seconds_bucket{le=\"0.002048\"} 1",
            "tern_cluster_publish_seconds_bucket{le=\"+Inf\"} 2",
            "tern_cluster_publish_seconds_sum 0.0045",
            "tern_cluster_publish_seconds_count 2",
            "# TYPE tern_cluster_publishes_in_flight gauge",
            "tern_cluster_publishes_in_flight 2",
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no {line:?} in\n{metrics}"
            );
        }
        assert!(render(&view, "show info").contains("\nCluster_publishes_in_flight: 2\n"));
    }

    #[test]
    fn unknown_commands() {
        let view = fake_view();
        assert_eq!(
            render(&view, "show bogus"),
            "Unknown command: 'show bogus'. Try 'help'.\n"
        );
        assert_eq!(
            render(&view, "SHOW INFO"),
            "Unknown command: 'SHOW INFO'. Try 'help'.\n"
        );
        assert_eq!(
            render(&view, "show info extra"),
            "Unknown command: 'show info extra'. Try 'help'.\n"
        );
        assert_eq!(render(&view, " \r\n"), "Unknown command: ''. Try 'help'.\n");
        assert!(render(&view, "show   shards").starts_with("shard "));
    }

    #[test]
    fn label_escaping() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("a\\b\"c\nd"), "a\\\\b\"c\\nd");
    }
}
