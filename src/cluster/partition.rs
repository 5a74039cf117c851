//! Which partition a user belongs to (docs/CLUSTER.md, "Partitions").

/// The partition of `user` among `partitions`: a fixed hash of the id, so
/// every node agrees. Deliberately not the home-shard hash (a different
/// seed), so resharding a node does not move partitions and vice versa.
pub fn partition_of(user: u64, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    // splitmix64 finaliser with its own seed: sequential ids spread evenly.
    let mut z = user.wrapping_add(0x6a09_e667_f3bc_c908);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % u64::from(partitions)) as u32
}

/// Partitions one node may own with `live_nodes` nodes alive:
/// `ceil(partitions / live_nodes)`, so ownership spreads evenly and the first
/// node up does not keep everything once others join.
pub fn share(partitions: u32, live_nodes: u32) -> u32 {
    partitions.div_ceil(live_nodes.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_lands_in_range_and_spreads() {
        let partitions = 64;
        let mut counts = vec![0u32; partitions as usize];
        for user in 0..64_000u64 {
            let p = partition_of(user, partitions);
            assert!(p < partitions);
            counts[p as usize] += 1;
        }
        // 1000 expected per partition; a sound hash stays well within ±20%.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn one_partition_holds_everyone() {
        assert_eq!(partition_of(u64::MAX, 1), 0);
        assert_eq!(partition_of(0, 1), 0);
    }

    #[test]
    fn share_rounds_up_and_survives_zero_nodes() {
        assert_eq!(share(4096, 1), 4096);
        assert_eq!(share(4096, 3), 1366);
        assert_eq!(share(1, 2), 1);
        assert_eq!(share(10, 0), 10);
    }
}
