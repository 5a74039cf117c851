//! The bridge of a build without the `cluster` feature (Cargo.toml): a type
//! with no values, so the server's code that starts, shows and stops a
//! bridge is the same in every build and, here, never runs past `start`.

use std::sync::Arc;

use super::{BridgeEnds, ClusterConfig, ClusterStats, Owners, NO_CLUSTER};

/// Stands for the bridge thread; none can exist in this build.
#[derive(Debug)]
pub enum Bridge {}

impl Bridge {
    /// Refuses: this build has no NATS client. The configuration's
    /// validation refuses a `[cluster]` section before this is reached.
    pub fn start(
        _config: ClusterConfig,
        _owners: Arc<Owners>,
        _ends: BridgeEnds,
        _group_limits: (usize, usize),
    ) -> std::io::Result<Bridge> {
        Err(std::io::Error::other(NO_CLUSTER))
    }

    /// The counters the stats socket shows.
    pub fn stats(&self) -> Arc<ClusterStats> {
        match *self {}
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        match self {}
    }
}
