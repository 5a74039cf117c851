//! Giving memory back: the capacity rules of drained structures and the
//! allocator's share.
//!
//! Two things keep a server's memory at its peak after a burst of traffic
//! has drained. Collections keep their capacity when emptied (a user's
//! queue, the maps of users and receipts), and the allocator keeps the
//! pages a thread freed for that thread's next allocations: the server
//! binary allocates with mimalloc (`src/main.rs`), which returns freed
//! pages to the operating system only while the owning thread keeps
//! allocating, and a shard that went quiet does not.
//!
//! So structures that drain call [`shrink_map`] and [`shrink_deque`] (a
//! collection at most a quarter full gives half of its capacity back; the
//! factor between the two keeps a hot user's queue from reallocating on
//! every message), and each shard calls [`release`] every
//! `memory_release_ms` (see `Config`), which asks mimalloc to collect the
//! calling thread's heap and return its free pages.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Below this capacity (entries) a collection is never shrunk: small ones
/// cost little and would churn.
pub const KEEP_CAPACITY_MIN: usize = 16;

/// Shrinks `map` to twice its length when it is at most a quarter full
/// and holds more than [`KEEP_CAPACITY_MIN`] entries of capacity.
pub fn shrink_map<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > KEEP_CAPACITY_MIN && map.len() * 4 <= map.capacity() {
        map.shrink_to((map.len() * 2).max(KEEP_CAPACITY_MIN));
    }
}

/// [`shrink_map`] for a queue.
pub fn shrink_deque<T>(queue: &mut VecDeque<T>) {
    if queue.capacity() > KEEP_CAPACITY_MIN && queue.len() * 4 <= queue.capacity() {
        queue.shrink_to((queue.len() * 2).max(KEEP_CAPACITY_MIN));
    }
}

/// Makes room for one more entry in `queue`: doubling it up to
/// [`DOUBLE_UPTO`] entries (a queue that fills and drains with every burst
/// is rebuilt in a few steps), then growing it by a quarter of its length,
/// so that a long queue of held messages wastes at most a fifth of its
/// capacity instead of half. A queue is at most `queue_len_max` long, so
/// this costs a few more copies of a long queue (some 20 reallocations up
/// to 1000 entries).
pub fn reserve_one<T>(queue: &mut VecDeque<T>) {
    if queue.len() == queue.capacity() {
        let len = queue.len();
        let more = if len < DOUBLE_UPTO { len } else { len / 4 };
        queue.reserve_exact(more.max(4));
    }
}

/// Length up to which [`reserve_one`] doubles a queue.
pub const DOUBLE_UPTO: usize = 64;

/// Shrinks `v`, a buffer reused empty between uses, to at most
/// `keep_bytes` of capacity; nothing when it holds anything.
pub fn trim_vec<T>(v: &mut Vec<T>, keep_bytes: usize) {
    let keep = keep_bytes / std::mem::size_of::<T>().max(1);
    if v.is_empty() && v.capacity() > keep {
        v.shrink_to(keep);
    }
}

/// Asks the allocator to return the calling thread's free pages to the
/// operating system. Without `force`, pages freed less than mimalloc's
/// purge delay ago (1 s) stay for now and go at a later call; `force`
/// returns them all (once, after a replay). Costs a walk of the thread's
/// heap pages (well under a millisecond for a heap of a few hundred MB);
/// harmless when the process allocates with something else (test binaries
/// with a counting allocator), since mimalloc's heap is then empty.
pub fn release(force: bool) {
    // SAFETY: mi_collect takes no pointers and may be called from any
    // thread at any time; it only touches the calling thread's heap and the
    // shared arenas under mimalloc's own locks.
    unsafe { libmimalloc_sys::mi_collect(force) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_queue_gives_capacity_back() {
        let mut q: VecDeque<u64> = VecDeque::new();
        for i in 0..10_000 {
            reserve_one(&mut q);
            q.push_back(i);
        }
        assert!(
            q.capacity() < 10_000 * 3 / 2 + 8,
            "grows by half, not double"
        );
        while q.len() > 10 {
            q.pop_front();
            shrink_deque(&mut q);
        }
        assert!(q.capacity() <= 4 * 10, "capacity {} for 10", q.capacity());
        q.clear();
        shrink_deque(&mut q);
        assert!(q.capacity() <= KEEP_CAPACITY_MIN * 4);
    }

    #[test]
    fn hysteresis_keeps_a_hot_queue() {
        // Hovering around one length never reallocates.
        let mut q: VecDeque<u64> = (0..100).collect();
        let cap = q.capacity();
        for i in 0..1000 {
            q.pop_front();
            shrink_deque(&mut q);
            reserve_one(&mut q);
            q.push_back(i);
        }
        assert_eq!(q.capacity(), cap);
    }

    #[test]
    fn drained_map_gives_capacity_back() {
        let mut m: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        for i in 0..9_990 {
            m.remove(&i);
            shrink_map(&mut m);
        }
        assert!(m.capacity() <= 64, "capacity {} for 10", m.capacity());
        assert_eq!(m.len(), 10);
    }

    #[test]
    fn release_is_harmless() {
        let v = vec![1u8; 1 << 20];
        drop(v);
        release(false);
        release(true);
    }
}
