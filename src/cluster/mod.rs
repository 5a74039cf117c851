//! Clustering on NATS JetStream (docs/CLUSTER.md): several Tern nodes share
//! users by partition. Built so far: the configuration and the bridge
//! thread holding partition leases; the Status section of docs/CLUSTER.md
//! says what is not.
//!
//! The bridge and its relay (and the NATS parts of `streams` and `state`)
//! are built with the `cluster` feature only (Cargo.toml, on by default);
//! the plain types the session layer uses are in every build. Without the
//! feature, `absent::Bridge` stands in for the bridge: it cannot be
//! started, and a `[cluster]` section is refused when the configuration is
//! validated.

#[cfg(not(feature = "cluster"))]
pub mod absent;
#[cfg(feature = "cluster")]
pub mod bridge;
pub mod config;
pub mod group_home;
pub mod groups;
pub mod lease;
pub mod link;
pub mod owners;
pub mod partition;
pub mod presence;
#[cfg(feature = "cluster")]
pub mod relay;
pub mod state;
pub mod stats;
pub mod streams;
pub mod wire;

#[cfg(not(feature = "cluster"))]
pub use absent::Bridge;
#[cfg(feature = "cluster")]
pub use bridge::Bridge;
pub use config::ClusterConfig;
pub use link::{links, BridgeEnds, ShardLink};
pub use owners::{Owner, Owners};
pub use partition::partition_of;
pub use stats::ClusterStats;

/// Why a build without the `cluster` feature refuses a `[cluster]` section.
pub const NO_CLUSTER: &str = "this build has no cluster support: rebuild with --features cluster";
