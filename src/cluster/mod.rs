//! Clustering on NATS JetStream (docs/CLUSTER.md): several Tern nodes share
//! users by partition. Built so far: the configuration and the bridge
//! thread holding partition leases; the Status section of docs/CLUSTER.md
//! says what is not.

pub mod bridge;
pub mod config;
pub mod group_home;
pub mod groups;
pub mod lease;
pub mod link;
pub mod owners;
pub mod partition;
pub mod presence;
pub mod relay;
pub mod state;
pub mod streams;
pub mod wire;

pub use bridge::{Bridge, ClusterStats};
pub use config::ClusterConfig;
pub use link::{links, BridgeEnds, ShardLink};
pub use owners::{Owner, Owners};
pub use partition::partition_of;
