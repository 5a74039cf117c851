//! Live upgrade, poll backend: what the shards share while they carry
//! their connections to a successor, and how they agree that nothing is in
//! flight between them any more.
//!
//! Frozen shards read no client input, but work may still travel: a SEND
//! read just before the freeze goes to the recipient's home shard, whose
//! ACK comes back. A shard that left before that ACK arrived would lose
//! it. So a shard carries out only once every shard is idle (nothing to
//! commit, nothing waiting for ring room, no connection but the frozen
//! ones) and every message pushed onto a ring has been taken off: the
//! four-counter method (Mattern), two waves of the same counts in a row.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::upgrade::state::Carried;

/// One shard's published counts (written only by that shard).
#[derive(Debug, Default)]
struct Counts {
    /// Messages it pushed to other shards' outboxes, ever.
    pushed: AtomicU64,
    /// Messages it took off its rings and handled, ever.
    popped: AtomicU64,
    /// Whether it was idle when it last published.
    idle: AtomicBool,
}

/// Shared by every shard of one server.
#[derive(Debug, Default)]
pub struct Carry {
    /// The connections the shards carry, left for the process.
    pub out: Mutex<Vec<(OwnedFd, Carried)>>,
    counts: Vec<Counts>,
    /// The previous wave's sums (pushed, popped), all idle; detector only.
    last: Mutex<Option<(u64, u64)>>,
    /// Set once quiet: every shard carries out and stops.
    quiet: AtomicBool,
}

impl Carry {
    /// For `shards` shards.
    pub fn new(shards: usize) -> Carry {
        Carry {
            counts: (0..shards).map(|_| Counts::default()).collect(),
            ..Carry::default()
        }
    }

    /// Shard `id` publishes its counts and whether it is idle.
    pub fn publish(&self, id: usize, pushed: u64, popped: u64, idle: bool) {
        let c = &self.counts[id];
        c.pushed.store(pushed, Ordering::Release);
        c.popped.store(popped, Ordering::Release);
        c.idle.store(idle, Ordering::Release);
    }

    /// One wave (shard 0 calls it each iteration): true once two waves in
    /// a row found every shard idle and the same sums, pushed == popped.
    pub fn detect(&self) -> bool {
        if self.quiet.load(Ordering::Acquire) {
            return true;
        }
        let mut pushed = 0;
        let mut popped = 0;
        let mut idle = true;
        for c in &self.counts {
            idle &= c.idle.load(Ordering::Acquire);
            pushed += c.pushed.load(Ordering::Acquire);
            popped += c.popped.load(Ordering::Acquire);
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let wave = (idle && pushed == popped).then_some((pushed, popped));
        let quiet = wave.is_some() && *last == wave;
        *last = wave;
        if quiet {
            self.quiet.store(true, Ordering::Release);
        }
        quiet
    }

    /// Whether the shards agreed nothing is in flight.
    pub fn quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_takes_two_equal_idle_waves() {
        let c = Carry::new(2);
        c.publish(0, 5, 3, true);
        c.publish(1, 3, 5, true);
        assert!(!c.detect(), "first wave");
        assert!(!c.quiet());
        // A message in flight (pushed 9, popped 8): never quiet.
        c.publish(0, 6, 3, true);
        assert!(!c.detect());
        assert!(!c.detect());
        // Taken off and handled, but shard 1 is busy (its commit).
        c.publish(1, 3, 6, false);
        assert!(!c.detect());
        c.publish(1, 3, 6, true);
        assert!(!c.detect(), "one idle wave is not enough");
        assert!(c.detect());
        assert!(c.quiet());
    }

    #[test]
    fn counts_that_move_between_waves_start_over() {
        let c = Carry::new(2);
        c.publish(0, 1, 1, true);
        c.publish(1, 1, 1, true);
        assert!(!c.detect());
        // Work happened between the waves (and ended): not quiet yet.
        c.publish(0, 2, 2, true);
        assert!(!c.detect());
        assert!(c.detect());
    }
}
