//! Clustering on NATS JetStream (docs/CLUSTER.md): several Tern nodes share
//! users by partition. Only the configuration is built so far; the Status
//! section of docs/CLUSTER.md says what is not.

pub mod config;

pub use config::ClusterConfig;
