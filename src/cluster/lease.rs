//! Partition leases, the pure part (docs/CLUSTER.md, "Ownership"): what a
//! node holds, what it should claim next. The bridge does the KV I/O and
//! reports results back here; nothing in this file talks to NATS.

use std::collections::{BTreeMap, BTreeSet};

use super::partition::share;
use super::streams::{stream_count, stream_of, PARTITIONS_PER_STREAM};

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
    /// Partitions of `taken` whose holder has no live heartbeat: a dead
    /// node's, whose keys expire about now (its heartbeat key, written
    /// first in each round, expires first). They do not keep a stream from
    /// being claimed whole, nor count as a holder of a split stream; the
    /// bridge fills this in from who it last saw write each key.
    pub stale: BTreeSet<u32>,
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

    /// Whether node `id` has a live heartbeat.
    pub fn is_live(&self, id: &str) -> bool {
        self.nodes.contains(id)
    }

    /// Whether `p`'s key is live and its holder too.
    fn held_by_live(&self, p: u32) -> bool {
        self.taken.contains(&p) && !self.stale.contains(&p)
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
    ///
    /// With at least as many message streams as live nodes the share is
    /// counted in whole streams (see [`Leases::stream_aligned`]): first the
    /// free partitions of streams this node already holds part of (so they
    /// become whole), then streams with no partition taken by anyone, whole,
    /// up to `ceil(streams / live_nodes)` streams (keys of dead nodes, see
    /// [`Listing::stale`], do not count as taken for this). A stream part of
    /// which another live node holds is left to that node. With fewer streams than
    /// nodes, partitions are claimed one by one up to
    /// `ceil(partitions / live_nodes)`.
    pub fn to_claim(&self, listing: &Listing) -> Vec<u32> {
        if !self.stream_aligned(listing) {
            let want = share(self.partitions, listing.live_nodes()) as usize;
            let room = want.saturating_sub(self.owned.len());
            return (0..self.partitions)
                .map(|i| (self.start + i) % self.partitions)
                .filter(|&p| self.free(p, listing))
                .take(room)
                .collect();
        }
        let held = self.held_streams();
        let want = share(self.streams(), listing.live_nodes()) as usize;
        let mut room = want.saturating_sub(held.len());
        let mut claim = Vec::new();
        for &g in &held {
            claim.extend(self.stream(g).filter(|&p| self.free(p, listing)));
        }
        for g in self.streams_in_claim_order() {
            if room == 0 {
                break;
            }
            if !held.contains(&g) && self.stream(g).all(|p| !listing.held_by_live(p)) {
                // Stale keys are claimed once expired, as part of a
                // stream held.
                claim.extend(self.stream(g).filter(|&p| self.free(p, listing)));
                room -= 1;
            }
        }
        claim
    }

    /// Partitions above this node's even share given `listing` (a node
    /// joined): they are to be let go by not renewing them, so they expire
    /// and the newcomer claims them. Letting a lease lapse, rather than
    /// deleting it, keeps the one fence: only an expired key can be
    /// claimed. Gives up those furthest from `start` in claim order.
    ///
    /// Aligned to streams ([`Leases::stream_aligned`]), whole streams go,
    /// and of a stream split with other nodes (two nodes raced for it, or
    /// the node count changed) only the holder of its lowest taken
    /// partition keeps its part; the others let theirs lapse, and the
    /// keeper makes the stream whole once they expired ([`Leases::to_claim`]).
    pub fn to_release(&self, listing: &Listing) -> Vec<u32> {
        if !self.stream_aligned(listing) {
            let want = share(self.partitions, listing.live_nodes()) as usize;
            let extra = self.owned.len().saturating_sub(want);
            let mut by_claim_order: Vec<u32> = self.owned.keys().copied().collect();
            by_claim_order.sort_by_key(|&p| self.claim_rank(p));
            return by_claim_order.split_off(by_claim_order.len() - extra);
        }
        let mut release = Vec::new();
        let mut kept = Vec::new();
        for g in self.held_streams() {
            let lowest_taken = self
                .stream(g)
                .find(|&p| self.owns(p) || listing.held_by_live(p));
            if lowest_taken.is_some_and(|p| !self.owns(p)) {
                release.extend(self.stream(g).filter(|&p| self.owns(p)));
            } else {
                kept.push(g);
            }
        }
        let want = share(self.streams(), listing.live_nodes()) as usize;
        let extra = kept.len().saturating_sub(want);
        kept.sort_by_key(|&g| self.stream_rank(g));
        for g in kept.split_off(kept.len() - extra) {
            release.extend(self.stream(g).filter(|&p| self.owns(p)));
        }
        release
    }

    /// Whether claims and releases go by whole message streams: when there
    /// are at least as many streams as live nodes, so every node can hold
    /// whole ones. A node holding a whole stream consumes it with one
    /// JetStream consumer instead of one per partition (issue 15: with
    /// three NATS servers each consumer is a Raft group, and 4096 of them
    /// kept NATS busy even idle). With fewer streams than nodes (small
    /// partition counts) nodes share streams, partition by partition.
    pub fn stream_aligned(&self, listing: &Listing) -> bool {
        self.streams() >= listing.live_nodes()
    }

    /// Message streams of the cluster.
    fn streams(&self) -> u32 {
        stream_count(self.partitions)
    }

    /// The partitions of stream `g`, in order.
    fn stream(&self, g: u32) -> std::ops::Range<u32> {
        g * PARTITIONS_PER_STREAM..((g + 1) * PARTITIONS_PER_STREAM).min(self.partitions)
    }

    /// Streams this node holds at least one partition of, in order.
    fn held_streams(&self) -> Vec<u32> {
        let mut held: Vec<u32> = self.owned.keys().map(|&p| stream_of(p)).collect();
        held.dedup();
        held
    }

    /// Whether `p` is neither held here nor taken in `listing`.
    fn free(&self, p: u32, listing: &Listing) -> bool {
        !listing.taken.contains(&p) && !self.owned.contains_key(&p)
    }

    /// Position of partition `p` in this node's claim order.
    fn claim_rank(&self, p: u32) -> u32 {
        (p + self.partitions - self.start) % self.partitions
    }

    /// Position of stream `g` in this node's claim order: from the stream
    /// of `start`.
    fn stream_rank(&self, g: u32) -> u32 {
        (g + self.streams() - stream_of(self.start)) % self.streams()
    }

    /// Every stream, in this node's claim order.
    fn streams_in_claim_order(&self) -> impl Iterator<Item = u32> + '_ {
        let (n, first) = (self.streams(), stream_of(self.start));
        (0..n).map(move |i| (first + i) % n)
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
    fn a_lone_node_claims_everything() {
        let leases = Leases::new(4, 2);
        assert_eq!(leases.to_claim(&listing(&["n.a"])), vec![0, 1, 2, 3]);
        let leases = Leases::new(4096, 1000);
        let all = leases.to_claim(&listing(&["n.a"]));
        assert_eq!(all.len(), 4096);
        // Whole streams from the stream of its start (1000 / 64 = 15).
        assert_eq!((all[0], all[63], all[64]), (960, 1023, 1024));
    }

    /// Keys `p.<p>` of `parts`, plus heartbeats of `nodes`.
    fn keys(nodes: &[&str], parts: impl IntoIterator<Item = u32>) -> Listing {
        let mut l = listing(nodes);
        for p in parts {
            l.add_key(&partition_key(p));
        }
        l
    }

    #[test]
    fn with_streams_to_spare_a_node_claims_whole_free_streams_up_to_its_share() {
        // 4 streams of 64, 2 nodes: 2 streams each. Stream 0 has a
        // partition taken elsewhere, so it is not free: 1 and 2 are taken.
        let leases = Leases::new(256, 0);
        let l = keys(&["n.a", "n.b"], [5]);
        assert!(leases.stream_aligned(&l));
        assert_eq!(leases.to_claim(&l), (64..192).collect::<Vec<_>>());
        // 64 streams, 3 nodes: ceil(64 / 3) = 22 streams.
        let leases = Leases::new(4096, 0);
        let three = listing(&["n.a", "n.b", "n.c"]);
        assert_eq!(leases.to_claim(&three).len(), 22 * 64);
    }

    #[test]
    fn a_partly_held_stream_is_made_whole_first() {
        let mut leases = Leases::new(256, 0);
        for p in 64..100 {
            leases.held(p, 1);
        }
        // Its share (2 streams) allows one more free stream after it.
        let l = keys(&["n.a", "n.b"], (64..100).chain([0]));
        let want: Vec<u32> = (100..128).chain(128..192).collect();
        assert_eq!(leases.to_claim(&l), want);
        assert!(leases.to_release(&l).is_empty());
    }

    #[test]
    fn of_a_split_stream_only_the_holder_of_its_lowest_partition_keeps_its_part() {
        let mut loser = Leases::new(128, 0);
        for p in 70..128 {
            loser.held(p, 1);
        }
        let l = keys(&["n.a", "n.b"], 64..128);
        assert_eq!(loser.to_release(&l), (70..128).collect::<Vec<_>>());
        let mut keeper = Leases::new(128, 0);
        for p in 64..70 {
            keeper.held(p, 1);
        }
        assert!(keeper.to_release(&l).is_empty());
        // Once the loser's keys expired the keeper makes it whole.
        let later = keys(&["n.a", "n.b"], 64..70);
        assert_eq!(keeper.to_claim(&later), (70..128).collect::<Vec<_>>());
    }

    #[test]
    fn above_its_share_a_node_releases_whole_streams_last_in_claim_order() {
        let mut leases = Leases::new(256, 64);
        for p in 0..256 {
            leases.held(p, 1);
        }
        let l = keys(&["n.a", "n.b"], 0..256);
        // Claim order from stream 1: 1, 2, 3, 0; streams 3 and 0 go.
        let want: Vec<u32> = (192..256).chain(0..64).collect();
        assert_eq!(leases.to_release(&l), want);
    }

    /// A dead node's keys expire one by one: a listing in between sees its
    /// stream partly free. Its keys left, marked stale, do not stop the
    /// claim of the free ones, nor make the claimant give them up.
    #[test]
    fn a_dead_node_s_stream_half_expired_is_still_claimed() {
        let mut leases = Leases::new(128, 0);
        for p in 0..64 {
            leases.held(p, 1);
        }
        let mut l = keys(&["n.a"], (0..64).chain(64..80));
        assert_eq!(leases.to_claim(&l), Vec::<u32>::new());
        l.stale.extend(64..80);
        assert_eq!(leases.to_claim(&l), (80..128).collect::<Vec<_>>());
        for p in 80..128 {
            leases.held(p, 1);
        }
        assert!(leases.to_release(&l).is_empty());
        assert_eq!(
            leases.to_claim(&keys(&["n.a"], 0..64)),
            (64..80).collect::<Vec<_>>()
        );
    }

    #[test]
    fn with_fewer_streams_than_nodes_partitions_go_one_by_one() {
        let leases = Leases::new(128, 0);
        let three = listing(&["n.a", "n.b", "n.c"]);
        assert!(!leases.stream_aligned(&three));
        assert_eq!(leases.to_claim(&three), (0..43).collect::<Vec<_>>());
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
