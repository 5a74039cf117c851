//! The shape of one shard's queues, for the stats: how many users hold how
//! many messages, and how old the oldest queued message is.
//!
//! Kept up to date by the store at every change of a queue's length or
//! head ([`Shape::update`]: two array updates, and a `BTreeSet` step only
//! when the head changes), so publishing it each second never walks the
//! queues; a shard with half a million offline users would stall its loop
//! for milliseconds doing that.

use std::collections::BTreeSet;

/// Finite buckets of the queue-length histogram: bucket `i` counts queues
/// of at most `2^i` messages (1 up to 2^20, over any sane `queue_len_max`);
/// one more bucket takes the rest.
pub const QUEUE_LEN_BUCKETS: usize = 21;

/// The queues of one shard, summarised. Only the store that owns the queues
/// updates it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Non-empty queues by length, non-cumulative: bucket `i` holds lengths
    /// in `(2^(i-1), 2^i]` (bucket 0 holds length 1); the last one is `+Inf`.
    users: [u64; QUEUE_LEN_BUCKETS + 1],
    /// `(time_ms, user)` of every non-empty queue's first (oldest) message;
    /// its first element is the shard's oldest queued message.
    heads: BTreeSet<(u64, u64)>,
}

impl Shape {
    /// Bucket of a non-empty queue of `len` messages.
    fn bucket(len: usize) -> usize {
        debug_assert!(len > 0);
        // The smallest i with len <= 2^i.
        let i = (usize::BITS - (len - 1).leading_zeros()) as usize;
        i.min(QUEUE_LEN_BUCKETS)
    }

    /// Records that `user`'s queue went from `before` to `after`, each its
    /// length and the `time_ms` of its first message (`(0, None)` for an
    /// empty queue). Cheap when neither the bucket nor the head changed.
    pub fn update(&mut self, user: u64, before: (usize, Option<u64>), after: (usize, Option<u64>)) {
        debug_assert_eq!(before.0 == 0, before.1.is_none());
        debug_assert_eq!(after.0 == 0, after.1.is_none());
        let (old, new) = (
            (before.0 > 0).then(|| Self::bucket(before.0)),
            (after.0 > 0).then(|| Self::bucket(after.0)),
        );
        if old != new {
            if let Some(b) = old {
                debug_assert!(self.users[b] > 0, "a queue counted in bucket {b}");
                self.users[b] = self.users[b].saturating_sub(1);
            }
            if let Some(b) = new {
                self.users[b] += 1;
            }
        }
        if before.1 != after.1 {
            if let Some(t) = before.1 {
                let was = self.heads.remove(&(t, user));
                debug_assert!(was, "user {user}'s head was recorded");
            }
            if let Some(t) = after.1 {
                self.heads.insert((t, user));
            }
        }
    }

    /// Users with a non-empty queue, by length: non-cumulative counts, the
    /// last one `+Inf` (see [`QUEUE_LEN_BUCKETS`]).
    pub fn users(&self) -> &[u64; QUEUE_LEN_BUCKETS + 1] {
        &self.users
    }

    /// When the oldest queued message was accepted (ms since the Unix
    /// epoch); `None` with every queue empty.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.heads.first().map(|&(t, _)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(Shape::bucket(1), 0);
        assert_eq!(Shape::bucket(2), 1);
        assert_eq!(Shape::bucket(3), 2);
        assert_eq!(Shape::bucket(4), 2);
        assert_eq!(Shape::bucket(5), 3);
        assert_eq!(Shape::bucket(1 << 20), 20);
        assert_eq!(Shape::bucket((1 << 20) + 1), QUEUE_LEN_BUCKETS);
        assert_eq!(Shape::bucket(usize::MAX), QUEUE_LEN_BUCKETS);
    }

    #[test]
    fn queues_grow_and_empty() {
        let mut s = Shape::default();
        assert_eq!(s.oldest_ms(), None);
        // User 7 gets three messages (times 100, 200, 300), user 8 one (50).
        s.update(7, (0, None), (1, Some(100)));
        s.update(7, (1, Some(100)), (2, Some(100)));
        s.update(7, (2, Some(100)), (3, Some(100)));
        s.update(8, (0, None), (1, Some(50)));
        assert_eq!(&s.users()[..3], &[1, 0, 1]);
        assert_eq!(s.oldest_ms(), Some(50));
        // User 8's message is delivered; user 7's first one too.
        s.update(8, (1, Some(50)), (0, None));
        s.update(7, (3, Some(100)), (2, Some(200)));
        assert_eq!(&s.users()[..3], &[0, 1, 0]);
        assert_eq!(s.oldest_ms(), Some(200));
        s.update(7, (2, Some(200)), (1, Some(300)));
        s.update(7, (1, Some(300)), (0, None));
        assert_eq!(s, Shape::default());
    }

    #[test]
    fn equal_times_of_different_users_are_both_kept() {
        let mut s = Shape::default();
        s.update(1, (0, None), (1, Some(10)));
        s.update(2, (0, None), (1, Some(10)));
        s.update(1, (1, Some(10)), (0, None));
        assert_eq!(s.oldest_ms(), Some(10));
        assert_eq!(s.users()[0], 1);
    }
}
