//! Partition leases, the pure part (docs/CLUSTER.md, "Ownership"): what a
//! node holds, what it should claim next. The bridge does the KV I/O and
//! reports results back here; nothing in this file talks to NATS.

use std::collections::{BTreeMap, BTreeSet};

use super::partition::share;

/// KV key of partition `p`'s lease.
pub fn partition_key(p: u32) -> String {
    format!("p.{p}")
}

/// KV key of node `node_id`'s heartbeat.
pub fn node_key(node_id: &str) -> String {
    format!("n.{node_id}")
}

/// What one listing of the lease bucket showed. A listing can name a key
/// twice: it follows the bucket's stream, so a key rewritten while the
/// listing runs (another node's heartbeat or renewal) comes again at its new
/// revision. Both sets count each key once.
#[derive(Debug, Default)]
pub struct Listing {
    /// Partitions with a live lease (anyone's).
    pub taken: BTreeSet<u32>,
    /// Ids of the nodes with a live heartbeat, this one included once it
    /// wrote its own.
    nodes: BTreeSet<String>,
}

impl Listing {
    /// Sorts one key of the bucket into the listing; other keys are ignored
    /// (a later version may add some).
    pub fn add_key(&mut self, key: &str) {
        if let Some(p) = key.strip_prefix("p.").and_then(|n| n.parse().ok()) {
            self.taken.insert(p);
        } else if let Some(node) = key.strip_prefix("n.") {
            if !self.nodes.contains(node) {
                self.nodes.insert(node.to_owned());
            }
        }
    }

    /// Distinct nodes with a live heartbeat.
    pub fn live_nodes(&self) -> u32 {
        self.nodes.len() as u32
    }
}

/// The partitions this node holds, each with the KV revision its last write
/// returned: the next renewal must name that revision, which is the fence.
#[derive(Debug)]
pub struct Leases {
    partitions: u32,
    /// Where this node starts looking for free partitions, so nodes that
    /// start together do not all race for partition 0 first.
    start: u32,
    owned: BTreeMap<u32, u64>,
}

impl Leases {
    /// No leases yet, out of `partitions`; `start` spreads first claims.
    pub fn new(partitions: u32, start: u32) -> Leases {
        assert!(partitions > 0);
        Leases {
            partitions,
            start: start % partitions,
            owned: BTreeMap::new(),
        }
    }

    /// Partitions held now.
    pub fn owned(&self) -> usize {
        self.owned.len()
    }

    /// Whether this node holds partition `p`.
    pub fn owns(&self, p: u32) -> bool {
        self.owned.contains_key(&p)
    }

    /// Held partitions and the revisions to renew them on.
    pub fn renewals(&self) -> Vec<(u32, u64)> {
        self.owned.iter().map(|(&p, &r)| (p, r)).collect()
    }

    /// A claim or renewal of `p` succeeded at `revision`.
    pub fn held(&mut self, p: u32, revision: u64) {
        debug_assert!(p < self.partitions);
        self.owned.insert(p, revision);
    }

    /// A renewal of `p` failed on its revision: someone else holds it now,
    /// or it expired. Stop serving it at once.
    pub fn lost(&mut self, p: u32) {
        self.owned.remove(&p);
    }

    /// Everything is lost (NATS unreachable for a whole lease).
    pub fn lose_all(&mut self) {
        self.owned.clear();
    }

    /// Free partitions to try to claim, in order, up to this node's even
    /// share given `listing`. A claim can still lose the race (create fails
    /// because another node created the key first).
    pub fn to_claim(&self, listing: &Listing) -> Vec<u32> {
        let want = share(self.partitions, listing.live_nodes()) as usize;
        let room = want.saturating_sub(self.owned.len());
        (0..self.partitions)
            .map(|i| (self.start + i) % self.partitions)
            .filter(|p| !listing.taken.contains(p) && !self.owned.contains_key(p))
            .take(room)
            .collect()
    }

    /// Partitions above this node's even share given `listing` (a node
    /// joined): they are to be let go by not renewing them, so they expire
    /// and the newcomer claims them. Letting a lease lapse, rather than
    /// deleting it, keeps the one fence: only an expired key can be
    /// claimed. Gives up those furthest from `start` in claim order.
    pub fn to_release(&self, listing: &Listing) -> Vec<u32> {
        let want = share(self.partitions, listing.live_nodes()) as usize;
        let extra = self.owned.len().saturating_sub(want);
        let mut by_claim_order: Vec<u32> = self.owned.keys().copied().collect();
        by_claim_order.sort_by_key(|&p| (p + self.partitions - self.start) % self.partitions);
        by_claim_order.split_off(by_claim_order.len() - extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(keys: &[&str]) -> Listing {
        let mut l = Listing::default();
        for k in keys {
            l.add_key(k);
        }
        l
    }

    #[test]
    fn a_lone_node_claims_everything_from_its_start() {
        let leases = Leases::new(4, 2);
        assert_eq!(leases.to_claim(&listing(&["n.a"])), vec![2, 3, 0, 1]);
    }

    #[test]
    fn a_second_node_takes_only_its_share_of_the_free_ones() {
        let mut leases = Leases::new(4, 0);
        leases.held(0, 7);
        let l = listing(&["n.a", "n.b", "p.0", "p.3"]);
        assert_eq!(leases.to_claim(&l), vec![1]);
    }

    #[test]
    fn a_full_share_claims_nothing_and_a_lost_lease_frees_room() {
        let mut leases = Leases::new(2, 0);
        leases.held(0, 1);
        leases.held(1, 2);
        assert!(leases.to_claim(&listing(&["n.a"])).is_empty());
        leases.lost(1);
        assert!(!leases.owns(1));
        assert_eq!(leases.renewals(), vec![(0, 1)]);
        assert_eq!(leases.to_claim(&listing(&["n.a"])), vec![1]);
    }

    #[test]
    fn a_node_above_its_share_releases_the_last_claimed() {
        let mut leases = Leases::new(4, 2);
        for p in 0..4 {
            leases.held(p, 1);
        }
        assert!(leases.to_release(&listing(&["n.a"])).is_empty());
        // Claim order from start 2 is 2, 3, 0, 1: 0 and 1 go.
        assert_eq!(leases.to_release(&listing(&["n.a", "n.b"])), vec![0, 1]);
        let four = listing(&["n.a", "n.b", "n.c", "n.d"]);
        assert_eq!(leases.to_release(&four), vec![3, 0, 1]);
    }

    /// Issue 15: a key rewritten during the listing is listed again. Counted
    /// twice, one heartbeat made 2 nodes look like 3, and each node let a
    /// share of its partitions lapse (their users got `unavailable` and
    /// their sessions BYE(moved)) until the next round.
    #[test]
    fn a_key_listed_twice_counts_once() {
        let l = listing(&["n.a", "p.0", "n.b", "p.1", "n.b", "p.0"]);
        assert_eq!(l.live_nodes(), 2);
        assert_eq!(l.taken.iter().copied().collect::<Vec<_>>(), vec![0, 1]);
        let mut leases = Leases::new(4, 0);
        leases.held(0, 1);
        leases.held(1, 1);
        assert!(leases.to_release(&l).is_empty(), "2 of 4 is a fair share");
    }

    #[test]
    fn unknown_keys_and_bad_numbers_are_ignored() {
        let l = listing(&["x.1", "p.zz", "p.1"]);
        assert_eq!(l.taken.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(l.live_nodes(), 0);
    }

    #[test]
    fn one_partition_wraps_the_start() {
        let leases = Leases::new(1, 5);
        assert_eq!(leases.to_claim(&Listing::default()), vec![0]);
    }
}
