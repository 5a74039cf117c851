//! The optional `[cluster]` section of the configuration (docs/CLUSTER.md).

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Largest partition count: partition numbers travel as `u16`.
pub const PARTITIONS_MAX: u32 = 65_536;

/// Membership of a Tern cluster on NATS JetStream. Absent (the default):
/// the node runs standalone and nothing of the cluster runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name in the cluster: 1 to 64 bytes of `A-Za-z0-9_-`.
    /// Required.
    pub node_id: String,
    /// NATS servers to connect to (`nats://host:port`); at least one. Required.
    pub nats_urls: Vec<String>,
    /// `host:port` that clients are sent to in a REDIRECT naming this node.
    /// Required.
    pub public_addr: String,
    /// Number of partitions users hash into, 1 to 65536, fixed for the
    /// cluster's life. Default 4096.
    #[serde(default = "partitions_default")]
    pub partitions: u32,
    /// Lease length in seconds, 3 to 3600; the owner renews every third of
    /// it. Default 10.
    #[serde(default = "lease_s_default")]
    pub lease_s: u32,
    /// Copies JetStream keeps of each message stream `TERN_<g>` and of the lease bucket,
    /// 1 to 5; an ACK leaves once this many servers stored the message.
    /// Default 3 (a 3-server NATS cluster). Against a NATS server without
    /// clustering, which can keep only 1, the streams get 1 and the node
    /// logs a warning (docs/CLUSTER.md, "Replicas").
    #[serde(default = "stream_replicas_default")]
    pub stream_replicas: u32,
}

fn partitions_default() -> u32 {
    4096
}

fn lease_s_default() -> u32 {
    10
}

/// Largest `stream_replicas`: JetStream keeps at most 5 copies of a stream.
pub const STREAM_REPLICAS_MAX: u32 = 5;

fn stream_replicas_default() -> u32 {
    3
}

/// Whether `id` is a node id: 1 to 64 bytes of `A-Za-z0-9_-` (so it is
/// one token of a NATS subject).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ClusterConfig {
    /// Checks each key; the error names it as `cluster.KEY`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError {
            key: format!("cluster.{key}"),
            message: message.to_string(),
        };
        if !valid_node_id(&self.node_id) {
            return Err(bad("node_id", "must be 1 to 64 bytes of A-Za-z0-9_-"));
        }
        if self.nats_urls.is_empty() || self.nats_urls.iter().any(|u| u.is_empty()) {
            return Err(bad("nats_urls", "must list at least one NATS server"));
        }
        // Parsed by the NATS client; a build without it (no `cluster`
        // feature) refuses the whole section before this (`Config::validate`).
        #[cfg(feature = "cluster")]
        if let Some(url) = self
            .nats_urls
            .iter()
            .find(|u| u.parse::<async_nats::ServerAddr>().is_err())
        {
            return Err(bad(
                "nats_urls",
                &format!("{url:?} is not a NATS URL (nats://host:port)"),
            ));
        }
        // A REDIRECT names host and port; a bare host would leave the client guessing.
        let has_port = self
            .public_addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !has_port {
            return Err(bad("public_addr", "must be host:port with a port above 0"));
        }
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return Err(bad("partitions", "must be between 1 and 65536"));
        }
        if !(3..=3600).contains(&self.lease_s) {
            return Err(bad("lease_s", "must be between 3 and 3600 seconds"));
        }
        if !(1..=STREAM_REPLICAS_MAX).contains(&self.stream_replicas) {
            return Err(bad("stream_replicas", "must be between 1 and 5"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterConfig {
        ClusterConfig {
            node_id: "a-1".into(),
            nats_urls: vec![
                "nats://127.0.0.1:4222".into(),
                "nats://10.0.0.2:4222".into(),
            ],
            public_addr: "tern-a.example:5222".into(),
            partitions: 4096,
            lease_s: 10,
            stream_replicas: 3,
        }
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(sample().validate(), Ok(()));
    }

    #[test]
    fn each_bad_key_is_named() {
        type Spoil = fn(&mut ClusterConfig);
        let cases: [(Spoil, &str); 9] = [
            (|c| c.node_id.clear(), "cluster.node_id"),
            (|c| c.node_id = "a b".into(), "cluster.node_id"),
            (|c| c.nats_urls.clear(), "cluster.nats_urls"),
            (|c| c.public_addr = "host".into(), "cluster.public_addr"),
            (|c| c.partitions = PARTITIONS_MAX + 1, "cluster.partitions"),
            (|c| c.lease_s = 2, "cluster.lease_s"),
            (|c| c.lease_s = 3601, "cluster.lease_s"),
            (|c| c.stream_replicas = 0, "cluster.stream_replicas"),
            (|c| c.stream_replicas = 6, "cluster.stream_replicas"),
        ];
        for (spoil, key) in cases {
            let mut c = sample();
            spoil(&mut c);
            assert_eq!(c.validate().unwrap_err().key, key);
        }
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn a_bad_nats_url_is_named() {
        let mut c = sample();
        c.nats_urls.push("nats://host:port".into());
        assert_eq!(c.validate().unwrap_err().key, "cluster.nats_urls");
    }

    #[test]
    fn edges_are_valid() {
        let mut c = sample();
        c.partitions = 1;
        c.lease_s = 3;
        c.stream_replicas = 1;
        assert_eq!(c.validate(), Ok(()));
        c.partitions = PARTITIONS_MAX;
        c.lease_s = 3600;
        c.stream_replicas = STREAM_REPLICAS_MAX;
        assert_eq!(c.validate(), Ok(()));
    }
}
