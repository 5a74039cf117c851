//! Who owns which partition, as this node last heard it (docs/CLUSTER.md,
//! "Clients: REDIRECT on LOGIN"). The bridge writes it; every shard reads it
//! at LOGIN and SEND. It changes a few times per lease round at most and is
//! read far more often, so it is a table of atomics rather than a copy per
//! shard kept current through the rings: a read is one relaxed load, with no
//! lock and no message.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::partition::partition_of;

/// Distinct (node id, address) pairs one process can learn in its life.
/// Far more than the nodes of a cluster: a node that comes back with a new
/// address is a new pair, the old one stays (unused) until restart.
pub const NODES_MAX: usize = 4096;

/// Where a user's partition is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner<'a> {
    /// By this node.
    Here,
    /// By another node, reachable by clients at `addr` (`host:port`).
    Elsewhere {
        /// The owner's node id.
        node: &'a str,
        /// The owner's `public_addr`.
        addr: &'a str,
    },
    /// By nobody this node knows of: the lease is free or being taken over.
    Nobody,
}

/// A known node: its id and client address.
#[derive(Debug)]
struct Node {
    id: String,
    addr: String,
}

/// The partition → owner table.
#[derive(Debug)]
pub struct Owners {
    partitions: u32,
    /// Per partition: 0 for nobody, 1 for this node, `2 + i` for `nodes[i]`.
    slots: Box<[AtomicU32]>,
    /// Append-only: written once each, by the bridge only.
    nodes: Box<[OnceLock<Node>]>,
    /// How many of `nodes` are set (the bridge's own count, mirrored for
    /// readers that want to list them).
    known: AtomicU32,
    /// Bumped whenever a partition this node owned is no longer its own, so
    /// shards know to close the sessions of users it no longer serves.
    losses: AtomicU64,
    /// Bumped at every change of a partition's entry, so a reader that
    /// follows owners (presence subscriptions) looks only after one.
    changes: AtomicU64,
    /// Base of `proven_until_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` until which this node's leases are proven
    /// (see [`Owners::prove_until`]); `u64::MAX` until the bridge first
    /// proves them, so a table no bridge writes (tests) never expires.
    proven_until_ms: AtomicU64,
}

const NOBODY: u32 = 0;
const HERE: u32 = 1;

impl Owners {
    /// A table of `partitions` partitions, none owned yet.
    pub fn new(partitions: u32) -> Owners {
        assert!(partitions > 0);
        Owners {
            partitions,
            slots: (0..partitions).map(|_| AtomicU32::new(NOBODY)).collect(),
            nodes: (0..NODES_MAX).map(|_| OnceLock::new()).collect(),
            known: AtomicU32::new(0),
            losses: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            epoch: Instant::now(),
            proven_until_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Who serves `user`.
    pub fn of_user(&self, user: u64) -> Owner<'_> {
        self.of(partition_of(user, self.partitions))
    }

    /// Who serves partition `p`. This node's own partitions read as
    /// [`Owner::Nobody`] once its leases are no longer proven: a node
    /// resumed after a pause longer than its lease acknowledges and
    /// delivers nothing for them, even before its bridge has run again.
    pub fn of(&self, p: u32) -> Owner<'_> {
        match self.slots[p as usize].load(Ordering::Acquire) {
            NOBODY => Owner::Nobody,
            HERE if self.expired() => Owner::Nobody,
            HERE => Owner::Here,
            i => match self.nodes[(i - 2) as usize].get() {
                Some(node) => Owner::Elsewhere {
                    node: &node.id,
                    addr: &node.addr,
                },
                None => Owner::Nobody,
            },
        }
    }

    /// How many partitions this node knows no owner of (free leases, or
    /// being taken over).
    pub fn unowned(&self) -> u32 {
        (0..self.partitions)
            .filter(|&p| self.of(p) == Owner::Nobody)
            .count() as u32
    }

    /// How many times this node lost partitions so far.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Acquire)
    }

    /// Changes whenever this node stops serving partitions: at each loss,
    /// and when its leases go unproven (or proven again). Shards compare it
    /// with the value they last acted on.
    pub fn fencing(&self) -> u64 {
        2 * self.losses() + u64::from(self.expired())
    }

    /// Bridge only: this node's leases hold until `deadline` (the start of
    /// the lease round that renewed them, plus the lease). No other node
    /// can hold them before: a key lives for a lease after its last write,
    /// and that write left after the round started.
    pub fn prove_until(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.epoch).as_millis() as u64;
        self.proven_until_ms.store(ms, Ordering::Release);
    }

    /// Whether the proof of this node's leases ran out.
    fn expired(&self) -> bool {
        let until = self.proven_until_ms.load(Ordering::Acquire);
        until != u64::MAX && self.epoch.elapsed().as_millis() as u64 >= until
    }

    /// Bridge only: this node holds `p`.
    pub fn set_here(&self, p: u32) {
        if self.slots[p as usize].swap(HERE, Ordering::AcqRel) != HERE {
            self.changes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// How many times an entry of the table changed so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Bridge only: `p` is held by node `index` (from [`Owners::node_index`]),
    /// or by nobody with `None`. Counts a loss if this node held it.
    pub fn set_other(&self, p: u32, index: Option<u32>) {
        let value = index.map_or(NOBODY, |i| i + 2);
        let was = self.slots[p as usize].swap(value, Ordering::AcqRel);
        if was != value {
            self.changes.fetch_add(1, Ordering::AcqRel);
        }
        if was == HERE {
            self.losses.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Bridge only: the index of node `id` at `addr`, added if new; `None`
    /// once [`NODES_MAX`] pairs are known.
    pub fn node_index(&self, id: &str, addr: &str) -> Option<u32> {
        let known = self.known.load(Ordering::Acquire) as usize;
        if let Some(i) = self.nodes[..known]
            .iter()
            .position(|n| n.get().is_some_and(|n| n.id == id && n.addr == addr))
        {
            return Some(i as u32);
        }
        if known == NODES_MAX {
            return None;
        }
        let node = Node {
            id: id.to_owned(),
            addr: addr.to_owned(),
        };
        self.nodes[known]
            .set(node)
            .expect("only the bridge adds nodes");
        self.known.store(known as u32 + 1, Ordering::Release);
        Some(known as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_count_entries_that_changed_only() {
        let owners = Owners::new(4);
        let b = owners.node_index("b", "10.0.0.2:7333").unwrap();
        owners.set_here(0);
        owners.set_here(0);
        owners.set_other(1, Some(b));
        owners.set_other(1, Some(b));
        assert_eq!(owners.changes(), 2);
        owners.set_other(1, None);
        assert_eq!(owners.changes(), 3);
    }

    #[test]
    fn a_new_table_owns_nothing() {
        let owners = Owners::new(4);
        assert_eq!(owners.of(3), Owner::Nobody);
        assert_eq!(owners.losses(), 0);
    }

    #[test]
    fn other_nodes_are_named_with_their_address() {
        let owners = Owners::new(4);
        let b = owners.node_index("b", "10.0.0.2:7333").unwrap();
        assert_eq!(owners.node_index("b", "10.0.0.2:7333"), Some(b));
        let b2 = owners.node_index("b", "10.0.0.9:7333").unwrap();
        assert_ne!(b, b2);
        owners.set_other(1, Some(b2));
        assert_eq!(
            owners.of(1),
            Owner::Elsewhere {
                node: "b",
                addr: "10.0.0.9:7333"
            }
        );
    }

    #[test]
    fn losing_a_held_partition_is_counted_once() {
        let owners = Owners::new(4);
        owners.set_here(2);
        assert_eq!(owners.of(2), Owner::Here);
        let c = owners.node_index("c", "h:1").unwrap();
        owners.set_other(2, Some(c));
        owners.set_other(2, None);
        assert_eq!(owners.losses(), 1);
        assert_eq!(owners.of(2), Owner::Nobody);
    }

    #[test]
    fn own_partitions_expire_with_their_proof() {
        let owners = Owners::new(2);
        owners.set_here(0);
        let before = owners.fencing();
        owners.prove_until(Instant::now() + std::time::Duration::from_secs(3600));
        assert_eq!(owners.of(0), Owner::Here);
        owners.prove_until(Instant::now());
        assert_eq!(owners.of(0), Owner::Nobody);
        assert_ne!(owners.fencing(), before, "shards must sweep");
        owners.prove_until(Instant::now() + std::time::Duration::from_secs(3600));
        assert_eq!(owners.of(0), Owner::Here);
    }

    #[test]
    fn every_user_maps_to_a_partition_of_the_table() {
        let owners = Owners::new(2);
        owners.set_here(0);
        owners.set_here(1);
        assert!((0..100).all(|u| owners.of_user(u) == Owner::Here));
    }
}
