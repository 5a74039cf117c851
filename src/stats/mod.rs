//! Per-shard counters and the stats socket, modelled on HAProxy's runtime API.
//!
//! Each shard owns one [`ShardStats`] block and is its only writer: a
//! [`Counter`] update is a relaxed load and store, never a shared
//! read-modify-write, and each block sits on its own cache lines. The stats
//! thread reads every block through a [`StatsView`] and answers one text
//! command per connection on a Unix socket ([`StatsServer`], [`query`]):
//!
//! - `help`: the commands, one line each.
//! - `show info`: process totals as `Key: value` lines.
//! - `show shards`: a whitespace-separated table, one row per shard.
//! - `show latency`: server-side latency histograms, merged over shards.
//! - `show metrics`: Prometheus text format 0.0.4, one sample per shard,
//!   also served over HTTP at `GET /metrics` when a metrics address is set,
//!   beside `GET /healthz` and `GET /readyz` ([`check`]).
//!
//! Totals read while shards run are not a snapshot of one instant: each
//! counter is read whole, but one after another.

mod counters;
mod health;
mod latency;
mod render;
mod server;
mod socket;

pub use counters::{Counter, Field, Kind, LoopTimer, ShardStats, LOOP_US_MAX, LOOP_WINDOW};
pub use health::{check, Health, Probe};
pub use latency::{bucket_le_seconds, Histogram, Latency, Merged, LATENCY_BUCKETS};
pub use render::{render, StatsView};
pub use server::{
    query, StatsServer, CLIENT_TIME_MAX, COMMAND_BYTES_MAX, HTTP_HEAD_BYTES_MAX, POLL_INTERVAL,
    QUERY_TIMEOUT,
};
pub use socket::SocketAccess;
